"""What the console shows: the banner, one line per config, the summary table and comparisons.

Everything here reads records (and settings for the banner), never models.
"""
from __future__ import annotations

import base64
import html
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Optional, Sequence

from tqdm import tqdm

from .names import REGULAR_MAMBA, RecordKey
from .plots import plot_benchmark_results
from .results import (CSV_NAME, ENV_NAME, JSONL_NAME, BenchmarkResult, OutputWriteError, UsageError,
                      config_label, load_run, lock_dir, record_devices, same_sizes, swept_sizes,
                      note_written, read_environment, write_csv)
from .timing import HIGH_SPREAD, mann_whitney_u

RULE = "=" * 100
NAME_WIDTH = 26   # the spec's lines align '|' at column 27


def banner(device: str, dim: int, sequence_lengths: Sequence[int], batch_sizes: Sequence[int],
           *, backends: Sequence[str] = (), dtypes: Sequence[str] = (), threads: Optional[int] = None,
           kernels: Optional[dict[str, dict[str, str]]] = None) -> str:
    """The spec's banner, then what this run adds: backend, dtype, threads and kernels per model."""
    lines = [RULE, "COMPREHENSIVE BENCHMARKING SUITE", RULE,
             f"Device: {device}",
             f"Model Dimension: {dim}",
             f"Sequence Lengths: {list(sequence_lengths)}",
             f"Batch Sizes: {list(batch_sizes)}"]
    if backends:
        lines.append(f"Backend: {', '.join(backends)}")
    if dtypes:
        lines.append(f"Dtype: {', '.join(dtypes)}")
    if threads is not None:
        lines.append(f"CPU Threads: {threads}")
    for label, k in (kernels or {}).items():
        lines.append(f"Kernels {label}: " + ", ".join(f"{op}={impl}" for op, impl in k.items()))
    lines += [RULE, ""]
    return "\n".join(lines)


def format_params(n: Optional[int]) -> str:
    return "n/a" if n is None else f"{n / 1e6:.2f}M"


def format_line(r: BenchmarkResult) -> str:
    """The spec's per-config line; a failed config says OOM/ERROR and why; noisy ones say so."""
    head = f"{r.model_name:<{NAME_WIDTH}} | SeqLen: {r.sequence_length:>4} | Batch: {r.batch_size:>2}"
    if not r.ok:
        return f"{head} | {r.status.upper()}: {r.message}"
    line = (f"{head} | Latency: {r.latency_ms:>6.2f}±{r.latency_std_ms:.2f} ms"
            f" | Throughput: {r.throughput_tokens_per_sec:>9.2f} tokens/s"
            f" | Params: {format_params(r.num_parameters)}")
    if r.high_spread:
        line += (f" | HIGH SPREAD: IQR {r.latency_iqr_ms / r.latency_median_ms:.0%} of median"
                 f" (> {HIGH_SPREAD:.0%})")
    return line


def console_printer(multi: bool, file=None, sizes: Sequence[str] = ()):
    """A callback printing each record's line as it finishes (above the progress bar).

    When a run sweeps several (backend, dtype) pairs, a header line precedes each pair's lines,
    since the spec's line format has no place for them; so does each point of a sweep over
    block sizes (`sizes`: the swept ones), e.g. "--- n_experts=64 ---".
    """
    last: list = [None, ""]

    def show(r: BenchmarkResult) -> None:
        out = file or sys.stdout
        if multi and (r.backend, r.dtype) != last[0]:
            last[0] = (r.backend, r.dtype)
            tqdm.write(f"--- backend: {r.backend} | dtype: {r.dtype} ---", file=out)
        label = config_label(r, sizes)
        if label and label != last[1]:
            last[1] = label
            tqdm.write(f"--- {label} ---", file=out)
        tqdm.write(format_line(r), file=out)
        out.flush()
    return show


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], align: str) -> str:
    rows = [list(map(str, r)) for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def fmt(cells):
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(cells, widths, align))
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows])


def _label(r: BenchmarkResult, many: bool, modes: bool = False, variants: bool = False, sizes=()) -> str:
    extra = ([r.backend, r.dtype] if many else []) + ([r.mode] if modes else []) \
        + ([r.variant or "default"] if variants else []) + ([config_label(r, sizes)] if config_label(r, sizes) else [])
    return f"{r.model_name} ({', '.join(extra)})" if extra else r.model_name


def _opt(v: Optional[float], fmt: str, scale: float = 1.0) -> str:
    return "n/a" if v is None else format(v * scale, fmt)


def summary_table(results: Sequence[BenchmarkResult]) -> str:
    """One row per record. Where the records carry them, compute columns (TFLOP/s, MFU in percent
    of the device's dense peak; on the CPU of the GEMM rate probed beside the config) for forward and train records, and memory-traffic columns (GB/s,
    prefill ms, cache MiB) for decode records; a record of the other kind shows "-" there."""
    many = len({(r.backend, r.dtype) for r in results}) > 1
    modes = len({r.mode for r in results}) > 1
    variants = len({r.variant for r in results}) > 1
    sizes = swept_sizes(results)
    ok = [r for r in results if r.ok]
    compute = any(r.mode != "decode" and r.tflops_per_sec is not None for r in ok)
    decode = any(r.mode == "decode" for r in ok)
    energy = any(r.energy_per_token_j is not None for r in ok)
    rows = []
    for r in results:
        label = _label(r, many, modes, variants, sizes)
        if r.ok:
            mem = "n/a" if r.memory_mb is None else f"{r.memory_mb:.1f}"
            tpm = r.throughput_tokens_per_sec / (r.num_parameters / 1e6) if r.num_parameters else float("nan")
            row = [label, r.sequence_length, r.batch_size,
                   f"{r.latency_ms:.2f}±{r.latency_std_ms:.2f}",
                   f"{r.latency_median_ms:.2f}", f"{r.latency_iqr_ms:.2f}" + (" !" if r.high_spread else ""),
                   f"{r.throughput_tokens_per_sec:.1f}", f"{tpm:.1f}", mem]
            if compute:
                row += (["-", "-"] if r.mode == "decode" else
                        [_opt(r.tflops_per_sec, ".3f"), _opt(r.mfu, ".1f", 100.0)])
            if decode:
                row += ([_opt(r.gb_per_sec, ".1f"), _opt(r.prefill_ms, ".2f"),
                         _opt(r.cache_bytes, ".2f", 1 / 2 ** 20)] if r.mode == "decode" else ["-", "-", "-"])
            if energy:
                row += [_opt(r.energy_per_token_j, ".3g", 1e3), _opt(r.avg_power_w, ".0f")]
            rows.append(row + [f"{format_params(r.num_parameters)}/{format_params(r.active_parameters)}", "ok"])
        else:
            rows.append([label, r.sequence_length, r.batch_size, "-", "-", "-", "-", "-", "-"]
                        + ["-"] * (2 * compute + 3 * decode + 2 * energy)
                        + [format_params(r.num_parameters), f"{r.status.upper()}: {r.message[:60]}"])
    header = ["Model", "SeqLen", "Batch", "Mean±Std ms", "Median ms", "IQR ms", "Tokens/s",
              "Tok/s per M", "Mem MB"] + ["TFLOP/s", "MFU %"] * compute \
        + ["GB/s", "Prefill ms", "Cache MiB"] * decode + ["mJ/token", "Avg W"] * energy + ["Params tot/act", "Status"]
    if decode and not modes:
        header[1] = "Context"   # decode: the context each generated token follows
    return "SUMMARY\n" + _table(header, rows, "l" + "r" * (len(header) - 2) + "l")


def speedups(results: Sequence[BenchmarkResult], baseline: str = REGULAR_MAMBA
             ) -> list[tuple[BenchmarkResult, Optional[float]]]:
    """(record, baseline latency / record latency) for every non-baseline record; None if either failed.

    A speedup above 1 means faster than the baseline at the same backend, dtype, shape and mode
    (and, in a sweep over sizes, the baseline's sizes the record shares: results.same_sizes).
    """
    base: dict[tuple, list[BenchmarkResult]] = defaultdict(list)
    for r in results:
        if r.model_name == baseline:
            base[(r.backend, r.dtype, r.mode, r.dim, r.batch_size, r.sequence_length)].append(r)
    out = []
    for r in results:
        if r.model_name == baseline:
            continue
        b = next((b for b in base.get((r.backend, r.dtype, r.mode, r.dim, r.batch_size, r.sequence_length), [])
                  if same_sizes(b, r)), None)
        ok = b is not None and b.ok and r.ok
        out.append((r, b.latency_ms / r.latency_ms if ok else None))
    return out


def comparison_table(results: Sequence[BenchmarkResult], baseline: str = REGULAR_MAMBA) -> str:
    pairs = speedups(results, baseline)
    if not pairs or not any(r.model_name == baseline for r in results):
        return f"COMPARISON vs {baseline}: {baseline} not in this run"
    many = len({(r.backend, r.dtype) for r in results}) > 1
    sizes = swept_sizes(results)
    rows = [[_label(r, many, sizes=sizes), r.sequence_length, r.batch_size,
             "n/a" if sp is None else f"{sp:.2f}x",
             "n/a" if sp is None else ("faster" if sp > 1 else "slower")] for r, sp in pairs]
    geo: dict[str, list[float]] = defaultdict(list)
    for r, sp in pairs:
        if sp is not None:
            geo[_label(r, many, sizes=sizes)].append(sp)
    lines = [f"COMPARISON vs {baseline} (speedup = {baseline} latency / model latency; > 1 is faster)",
             _table(["Model", "SeqLen", "Batch", "Speedup", ""], rows, "lrrrl")]
    for label, v in geo.items():
        lines.append(f"geometric mean speedup, {label}: "
                     f"{math.exp(sum(map(math.log, v)) / len(v)):.2f}x over {len(v)} configs")
    return "\n".join(lines)


def print_summary_table(results: Sequence[BenchmarkResult], file=None) -> None:
    out = file or sys.stdout
    print("\n" + RULE, file=out)
    print(summary_table(results), file=out)
    print("\n" + comparison_table(results), file=out)
    failed = [r for r in results if not r.ok]
    if failed:
        counts = ", ".join(f"{sum(r.status == st for r in failed)} {label}"
                           for st, label in (("oom", "OOM"), ("error", "error"), ("timeout", "timeout"),
                                             ("skipped", "skipped"))
                           if st not in ("skipped", "timeout") or any(r.status == st for r in failed))
        print(f"\n{len(failed)} of {len(results)} configs failed or were skipped ({counts})", file=out)
    print(RULE, file=out)


# ---------------------------------------------------------------- compare two saved runs
def _run_devices(run_dir, records: Sequence[BenchmarkResult]) -> str:
    """The device(s) a run measured on (`record_devices`; records without a device_name take
    environment.json's device_name or device); "" when nothing says."""
    default = None
    if not records or not all(r.device_name for r in records):
        env = read_environment(Path(run_dir) / ENV_NAME)
        default = env.get("device_name") or env.get("device")
    if not records:
        return str(default or "")
    return ", ".join(sorted(record_devices(records, default=default)))


# Record-key fields that `compare --ignore` may leave out when pairing configs of two runs.
IGNORABLE = ("backend", "dtype", "variant", "config_hash")   # config_hash: pair configs of other sizes


def _pairing(records, ignore: Sequence[str], run_dir) -> dict:
    keep = [f for f in RecordKey._fields if f not in ignore]
    out: dict = {}
    for r in records:
        k = tuple(getattr(r.key, f) for f in keep)
        if k in out:
            raise ValueError(f"{run_dir}: with --ignore {' '.join(ignore)}, two configs pair with one "
                             f"({r.model_name} L={r.sequence_length} B={r.batch_size}); ignore fewer fields")
        out[k] = r
    return out


def compare_runs(base_dir, new_dir, *, threshold: float = 0.05, alpha: float = 0.05,
                 ignore: Sequence[str] = ()) -> tuple[str, bool]:
    """Per-config median latency ratio NEW/BASE with a Mann-Whitney U test on the raw samples.

    Configs pair by their record key; `ignore` leaves fields out of it (backend, dtype, variant),
    e.g. to compare a fast-backend run with a reference-backend run of the same grid.

    A config regresses when NEW is slower by more than `threshold` (ratio > 1 + threshold) and the
    U test says the difference is significant (p < alpha). Returns (text, any regression). When the
    runs were measured on different devices, the text's first line is a warning that says so (the
    regression verdict is unchanged).
    """
    base_records, new_records = load_run(base_dir), load_run(new_dir)
    base, new = _pairing(base_records, ignore, base_dir), _pairing(new_records, ignore, new_dir)
    base_dev, new_dev = _run_devices(base_dir, base_records), _run_devices(new_dir, new_records)
    rows, regressed = [], []
    for key, n in new.items():
        b = base.get(key)
        if b is None:
            continue
        label = f"{n.model_name} ({_side(b.backend, n.backend)}, {_side(b.dtype, n.dtype)}, {n.mode})"
        if not (b.ok and n.ok) or not b.samples_ms or not n.samples_ms:
            rows.append([label, n.sequence_length, n.batch_size, "-", "-", "-", "-",
                         f"not comparable (base {b.status}, new {n.status})"])
            continue
        ratio = n.latency_median_ms / b.latency_median_ms
        _, p = mann_whitney_u(b.samples_ms, n.samples_ms)
        significant = p < alpha
        if ratio > 1 + threshold and significant:
            verdict = "SLOWER (regression)"
            regressed.append(label)
        elif ratio < 1 - threshold and significant:
            verdict = "faster"
        else:
            verdict = "same" if not significant else "within threshold"
        rows.append([label, n.sequence_length, n.batch_size, f"{b.latency_median_ms:.3f}",
                     f"{n.latency_median_ms:.3f}", f"{ratio:.3f}", f"{p:.3g}", verdict])
    lines = [f"warning: comparing different devices: base {base_dev}, new {new_dev}"] \
        if base_dev and new_dev and base_dev != new_dev else []
    lines += [f"COMPARE  base: {base_dir}  new: {new_dir}",
             f"ratio = new median / base median latency; regression: ratio > {1 + threshold:.3f} "
             f"and Mann-Whitney U p < {alpha}",
             _table(["Config", "SeqLen", "Batch", "Base ms", "New ms", "Ratio", "p", "Verdict"],
                    rows, "lrrrrrrl") if rows else "(no config present in both runs)"]
    for name, run, other in (("base", base, new), ("new", new, base)):
        only = [r for k, r in run.items() if k not in other]
        if only:
            lines.append(f"only in {name} ({len(only)}): " + "; ".join(
                f"{r.model_name} ({r.backend}, {r.dtype}, {r.mode}) L={r.sequence_length} "
                f"B={r.batch_size} dim={r.dim}" for r in only))
    lines.append(f"{len(regressed)} regression(s)" + (": " + ", ".join(dict.fromkeys(regressed)) if regressed else ""))
    return "\n".join(lines), bool(regressed)


def _side(base: str, new: str) -> str:
    return base if base == new else f"{base} -> {new}"


# ---------------------------------------------------------------- report.md / report.html
def _md_cell(c) -> str:
    """A Markdown table cell from saved text: HTML escaped (a renderer would run it), `|` and
    line breaks kept inside the cell."""
    return html.escape(" ".join(str(c).split())).replace("|", "\\|")


def _md_table(header, rows) -> str:
    out = ["| " + " | ".join(map(_md_cell, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in rows]
    return "\n".join(out)


def _named(r, sizes) -> str:
    """The model's name, with its swept sizes when the run swept some."""
    label = config_label(r, sizes)
    return f"{r.model_name} ({label})" if label else r.model_name


def _record_rows(results):
    rows = []
    sizes = swept_sizes(results)
    for r in results:
        if r.ok:
            rows.append([_named(r, sizes), r.backend, r.dtype, r.sequence_length, r.batch_size,
                         f"{r.latency_ms:.3f} ± {r.latency_std_ms:.3f}", f"{r.latency_median_ms:.3f}",
                         f"{r.latency_iqr_ms:.3f}" + (" (high spread)" if r.high_spread else ""),
                         f"{r.throughput_tokens_per_sec:.1f}",
                         "n/a" if r.memory_mb is None else f"{r.memory_mb:.1f}",
                         format_params(r.num_parameters), r.n_runs, _energy_cell(r), "ok"])
        else:
            rows.append([_named(r, sizes), r.backend, r.dtype, r.sequence_length, r.batch_size,
                         "-", "-", "-", "-", "-", format_params(r.num_parameters), 0, "-",
                         f"{r.status.upper()}: {r.message}"])
    return rows


_RECORD_HEADER = ["Model", "Backend", "Dtype", "SeqLen", "Batch", "Latency ms (mean ± std)", "Median ms",
                  "IQR ms", "Tokens/s", "Mem MB", "Params", "Runs", "Energy", "Status"]


def _energy_cell(r) -> str:
    """'0.123 mJ/token, 412 W (nvml); peak RSS 812 MB', or n/a where not measured."""
    parts = []
    if r.energy_per_token_j is not None:
        parts.append(f"{r.energy_per_token_j * 1e3:.3g} mJ/token, {r.energy_per_call_j:.3g} J/call, "
                     f"{_opt(r.avg_power_w, '.0f')} W ({r.energy_source})")
    if r.host_peak_rss_mb is not None:
        parts.append(f"peak RSS {r.host_peak_rss_mb:.0f} MB")
    return "; ".join(parts) or "n/a"


def write_report(run_dir, output_dir) -> list:
    """Redraw the plots from run_dir's records and write report.md and a self-contained report.html
    (into output_dir, which must not hold another run's records), holding output_dir's lock."""
    run_dir, out = Path(run_dir), Path(output_dir)
    results = load_run(run_dir)
    env = read_environment(run_dir / ENV_NAME)
    if out.resolve() != run_dir.resolve() and (out / JSONL_NAME).exists():
        raise UsageError(f"--output-dir: {str(out)!r} holds another run's records ({JSONL_NAME}); "
                         "a report never writes over them (choose an empty folder)")
    lock = lock_dir(out)
    try:
        return _write_report(run_dir, out, results, env)
    except OSError as e:   # a full disk: one error line naming the file (the records are untouched)
        if isinstance(e, OutputWriteError):
            raise
        raise OutputWriteError(getattr(e, "filename", None) or out, e) from None
    finally:
        lock.release()


def _write_report(run_dir: Path, out: Path, results, env) -> list:
    write_csv(results, out / CSV_NAME)
    pngs = plot_benchmark_results(results, out, env=env)
    env_rows = [[k, v if not isinstance(v, dict) else ", ".join(f"{a} {b}" for a, b in v.items())]
                for k, v in env.items()]
    sizes = swept_sizes(results)
    sp_rows = [[_named(r, sizes), r.backend, r.dtype, r.sequence_length, r.batch_size,
                "n/a" if sp is None else f"{sp:.2f}x"] for r, sp in speedups(results)]
    md = ["# Benchmark report", "", f"Records: `{run_dir}` ({len(results)} configs, "
          f"{sum(not r.ok for r in results)} failed)", "", "## Environment", "",
          _md_table(["Key", "Value"], env_rows) if env_rows else "(no environment.json)", "",
          "## Results", "", _md_table(_RECORD_HEADER, _record_rows(results)), "",
          "## Speedup vs Regular Mamba", "",
          _md_table(["Model", "Backend", "Dtype", "SeqLen", "Batch", "Speedup"], sp_rows) if sp_rows
          else "(Regular Mamba or the other models missing)", "", "## Plots", ""]
    md += [f"![{p.stem}]({p.name})" for p in pngs]   # the tool's own file names
    md_path = out / "report.md"
    md_path.write_text("\n".join(md) + "\n", encoding="utf-8")

    def h_table(header, rows):
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    imgs = "".join(
        f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode("ascii")}"><figcaption>{html.escape(p.stem)}'
        f"</figcaption></figure>" for p in pngs)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Benchmark report</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;font-size:13px;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
th{{background:#f3f3f3}}td:first-child,th:first-child{{text-align:left}}img{{max-width:100%}}
figure{{margin:2em 0}}figcaption{{color:#666;font-size:12px}}</style></head><body>
<h1>Benchmark report</h1><p>Records: <code>{html.escape(str(run_dir))}</code> ({len(results)} configs,
{sum(not r.ok for r in results)} failed)</p>
<h2>Environment</h2>{h_table(["Key", "Value"], env_rows)}
<h2>Results</h2>{h_table(_RECORD_HEADER, _record_rows(results))}
<h2>Speedup vs Regular Mamba</h2>{h_table(["Model", "Backend", "Dtype", "SeqLen", "Batch", "Speedup"], sp_rows)}
<h2>Plots</h2>{imgs}
</body></html>
"""
    html_path = out / "report.html"
    html_path.write_text(page, encoding="utf-8")
    note_written(out, [md_path, html_path, *pngs])
    return [md_path, html_path, *pngs]
