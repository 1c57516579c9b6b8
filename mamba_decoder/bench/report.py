"""What the console shows: the banner, one line per config, the summary table and comparisons.

Everything here reads records (and settings for the banner), never models.
"""
from __future__ import annotations

import base64
import html
import json
import math
import re
import shutil
import sys
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Optional, Sequence

from tqdm import tqdm

from .names import MAMBA_LM, REGULAR_MAMBA, RecordKey, sig3
from .plots import plot_benchmark_results
from .results import (CSV_NAME, ENV_NAME, JSONL_NAME, REFERENCE_SIDE, BenchmarkResult, OutputWriteError,
                      UsageError, backend_pairs, config_label, latency_ratio, load_run, lock_dir, record_devices,
                      same_sizes, swept_sizes, note_written, read_environment, write_csv)
from .timing import DRIFT_WARN, HIGH_SPREAD, PROCESS_ROUNDS, Ratio, drift, geomean_ratio, mann_whitney_u, ratio

RULE = "=" * 100
NAME_WIDTH = 26   # the spec's lines align '|' at column 27


def console_width(file=None) -> Optional[int]:
    """The columns a console line may take: the terminal's width ($COLUMNS overrides it, as
    `shutil.get_terminal_size` reads it) when `file` (stdout) is a terminal; None (no limit: the
    spec's one-line format) for a pipe or a file, so logs and parsers keep every config on one line.
    ($COLUMNS alone is not enough: a parent that loaded GNU readline exports it to every child.)"""
    out = file or sys.stdout
    try:
        tty = out.isatty()
    except (AttributeError, ValueError):
        tty = False
    return shutil.get_terminal_size().columns if tty else None


def fit_line(line: str, width: Optional[int], sep: str = " | ", indent: str = "    ") -> str:
    """`line` as is if it fits `width`, else broken at its `sep` separators into lines of at most
    `width` columns (continuations indented), so a narrow terminal does not wrap it mid-field; a
    field longer than a line is wrapped by words."""
    if width is None or len(line) <= width:
        return line
    parts = line.split(sep)
    lines, cur = [], parts[0]
    for part in parts[1:]:
        if len(cur) + len(sep) + len(part) <= width:
            cur += sep + part
        else:
            lines.append(cur)
            cur = indent + part
    lines.append(cur)
    out = []
    for ln in lines:
        out += textwrap.wrap(ln, width, subsequent_indent=indent, break_on_hyphens=False) if len(ln) > width else [ln]
    return "\n".join(out)


def fit_table(table: str, width: Optional[int], keep: int = 3) -> str:
    """A table from `_table` (header, rule, rows; columns two spaces apart) that is wider than
    `width`, split into several tables of at most `width` columns, each repeating the first `keep`
    columns (which config a row is). Unchanged when it fits or `width` is None."""
    lines = table.split("\n")
    if width is None or len(lines) < 2 or max(map(len, lines)) <= width:
        return table
    # column spans from the rule line ("-----  ---  ...")
    spans = [(m.start(), m.end()) for m in re.finditer(r"-+", lines[1])]
    if len(spans) <= keep:
        return table
    cut = [(spans[i][0], spans[i + 1][0] if i + 1 < len(spans) else max(map(len, lines)))
           for i in range(len(spans))]
    key = cut[:keep]
    key_w = key[-1][1] if key else 0
    groups, cur, used = [], [], key_w
    for c in cut[keep:]:
        w = c[1] - c[0]
        if cur and used + w > width:
            groups.append(cur)
            cur, used = [], key_w
        cur.append(c)
        used += w
    groups.append(cur)
    out = []
    for g in groups:
        out.append("\n".join((ln[:key_w] + "".join(ln[a:b] for a, b in g)).rstrip() for ln in lines))
    return "\n\n".join(out)


def banner(device: str, dim: int, sequence_lengths: Sequence[int], batch_sizes: Sequence[int],
           *, backends: Sequence[str] = (), dtypes: Sequence[str] = (), threads: Optional[int] = None,
           kernels: Optional[dict[str, dict[str, str]]] = None, width: Optional[int] = None,
           host_allocator: Optional[str] = None) -> str:
    """The spec's banner, then what this run adds: backend, dtype, threads and kernels per model
    (`width`: the console's columns, `console_width`; None keeps the spec's 100-column rules)."""
    rule = RULE[:width] if width else RULE
    lines = [rule, "COMPREHENSIVE BENCHMARKING SUITE", rule,
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
    if host_allocator:
        lines.append(_wrap(f"Host Allocator: {host_allocator}", width))
    for label, k in (kernels or {}).items():
        lines.append(_wrap(f"Kernels {label}: " + ", ".join(f"{op}={impl}" for op, impl in k.items()), width))
    lines += [rule, ""]
    return "\n".join(lines)


def format_params(n: Optional[int]) -> str:
    return "n/a" if n is None else f"{n / 1e6:.2f}M"


def fmt_ms(v: float) -> str:
    """A latency with the spec's two decimals, and at least three significant digits below 1 ms
    (0.0213, not 0.02)."""
    return f"{v:.2f}" if abs(v) >= 1 or v == 0 else f"{v:#.3g}"


def fmt_mean_std(mean: float, std: float) -> str:
    """mean±std, the std with as many decimals as the mean (12.34±0.56, 0.0213±0.0001)."""
    m = fmt_ms(mean)
    return f"{m}±{std:.{len(m.partition('.')[2])}f}"


_OOM_PARTS = (re.compile(r"Tried to allocate [\d.]+ [KMGT]?i?B"),
              re.compile(r"of which [\d.]+ [KMGT]?i?B is free"),
              re.compile(r"[\d.]+ [KMGT]?i?B is allocated by PyTorch"))


def short_message(r: BenchmarkResult, width: int = 60) -> str:
    """A failure's message cut to `width` keeping its useful part: for an out-of-memory error what
    was asked for and what was free (torch's message puts them after a long preamble)."""
    msg = r.message
    if r.status == "oom":
        parts = [m.group(0) for rx in _OOM_PARTS if (m := rx.search(msg))]
        if parts:
            msg = "out of memory: " + ", ".join(parts)
    return msg if len(msg) <= width else msg[:width - 3] + "..."


def format_line(r: BenchmarkResult) -> str:
    """The spec's per-config line; a failed config says OOM/ERROR and why; noisy ones say so."""
    head = f"{r.model_name:<{NAME_WIDTH}} | SeqLen: {r.sequence_length:>4} | Batch: {r.batch_size:>2}"
    if not r.ok:
        return f"{head} | {r.status.upper()}: {short_message(r, 200)}"
    m, sd = fmt_mean_std(r.latency_ms, r.latency_std_ms).split("±")
    line = (f"{head} | Latency: {m:>6}±{sd} ms"
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
        tqdm.write(fit_line(format_line(r), console_width(out)), file=out)
        out.flush()
    return show


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], align: str, width: Optional[int] = None,
           keep: int = 3) -> str:
    """Columns two spaces apart under a header and a rule; split to fit `width` (`fit_table`), each
    part repeating the first `keep` columns (those that say which config a row is)."""
    rows = [list(map(str, r)) for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def fmt(cells):
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(cells, widths, align))
    return fit_table("\n".join([fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]), width,
                     keep)


def _wrap(line: str, width: Optional[int]) -> str:
    """Lines of prose wrapped to `width` (continuations indented); as is when `width` is None."""
    if "\n" in line:
        return "\n".join(_wrap(ln, width) for ln in line.split("\n"))
    if width is None or len(line) <= width:
        return line
    return "\n".join(textwrap.wrap(line, width, subsequent_indent="  ", break_on_hyphens=False))


def _label(r: BenchmarkResult, many: bool, modes: bool = False, variants: bool = False, sizes=()) -> str:
    extra = ([r.backend, r.dtype] if many else []) + ([r.mode] if modes else []) \
        + ([r.variant or "default"] if variants else []) + ([config_label(r, sizes)] if config_label(r, sizes) else [])
    return f"{r.model_name} ({', '.join(extra)})" if extra else r.model_name


def _opt(v: Optional[float], fmt: str, scale: float = 1.0) -> str:
    return "n/a" if v is None else format(v * scale, fmt)


def summary_table(results: Sequence[BenchmarkResult], width: Optional[int] = None) -> str:
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
                   fmt_mean_std(r.latency_ms, r.latency_std_ms),
                   fmt_ms(r.latency_median_ms), fmt_ms(r.latency_iqr_ms) + (" !" if r.high_spread else ""),
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
                        + [format_params(r.num_parameters), f"{r.status.upper()}: {short_message(r)}"])
    header = ["Model", "SeqLen", "Batch", "Mean±Std ms", "Median ms", "IQR ms", "Tokens/s",
              "Tok/s per M", "Mem MB"] + ["TFLOP/s", "MFU %"] * compute \
        + ["GB/s", "Prefill ms", "Cache MiB"] * decode + ["mJ/token", "Avg W"] * energy + ["Params tot/act", "Status"]
    if decode and not modes:
        header[1] = "Context"   # decode: the context each generated token follows
    return "SUMMARY\n" + _table(header, rows, "l" + "r" * (len(header) - 2) + "l", width)


def baseline_for(results: Sequence[BenchmarkResult]) -> str:
    """What speedups are measured against: Regular Mamba for blocks, Mamba LM for language models."""
    return MAMBA_LM if results and all(r.level == "model" for r in results) else REGULAR_MAMBA


def _baseline_records(results: Sequence[BenchmarkResult], baseline: str):
    """record -> its baseline record: the same backend, dtype, variant, shape and mode (and, in a sweep over
    sizes, the baseline's sizes the record shares: results.same_sizes), or None."""
    base: dict[tuple, list[BenchmarkResult]] = defaultdict(list)
    for r in results:
        if r.model_name == baseline:
            base[(r.backend, r.dtype, r.mode, r.variant, r.dim, r.batch_size, r.sequence_length)].append(r)

    def of(r: BenchmarkResult) -> Optional[BenchmarkResult]:
        key = (r.backend, r.dtype, r.mode, r.variant, r.dim, r.batch_size, r.sequence_length)
        return next((b for b in base.get(key, []) if same_sizes(b, r)), None)
    return of


def speedup_ratios(results: Sequence[BenchmarkResult], baseline: Optional[str] = None
                   ) -> list[tuple[BenchmarkResult, Optional[Ratio], bool]]:
    """(record, speedup with its interval, noisy) for every non-baseline record: speedup = the
    baseline's median latency / the record's, paired by round where they were interleaved; None
    if either failed. noisy: the interval crosses 1 or either record has a high spread."""
    baseline = baseline or baseline_for(results)
    base_of = _baseline_records(results, baseline)
    out = []
    for r in results:
        if r.model_name == baseline:
            continue
        b = base_of(r)
        if b is None or not (b.ok and r.ok):
            out.append((r, None, False))
            continue
        sp = latency_ratio(b, r)
        out.append((r, sp, sp.crosses_one or b.high_spread or r.high_spread))
    return out


def speedups(results: Sequence[BenchmarkResult], baseline: Optional[str] = None
             ) -> list[tuple[BenchmarkResult, Optional[float]]]:
    """(record, median speedup) for every non-baseline record; None if either failed.

    A speedup above 1 means faster than the baseline at the same backend, dtype, shape and mode
    (and, in a sweep over sizes, the baseline's sizes the record shares: results.same_sizes).
    """
    return [(r, None if sp is None else sp.value) for r, sp, _ in speedup_ratios(results, baseline)]


def geomean_speedups(results: Sequence[BenchmarkResult], baseline: Optional[str] = None,
                     label=lambda r: r.model_name) -> dict[str, tuple[Ratio, int]]:
    """label -> (geometric-mean speedup with its 95% interval, configs) over the configs where
    both the record and the baseline are ok."""
    baseline = baseline or baseline_for(results)
    base_of = _baseline_records(results, baseline)
    parts: dict[str, list] = defaultdict(list)
    for r in results:
        b = None if r.model_name == baseline else base_of(r)
        if b is None or not (b.ok and r.ok) or not (b.samples_ms and r.samples_ms):
            continue
        parts[label(r)].append((b.samples_ms, r.samples_ms, b.sample_rounds, r.sample_rounds,
                                bool(b.rounds_id) and b.rounds_id == r.rounds_id))
    return {k: (geomean_ratio(v), len(v)) for k, v in parts.items()}


def format_ratio(x: Ratio) -> str:
    return f"{sig3(x.value)}x [{sig3(x.lo)}, {sig3(x.hi)}]"


NOISY_MARK = "~"
NOISY_NOTE = (f"{NOISY_MARK} noisy: the 95% interval crosses 1 or a config has a high spread "
              f"(IQR > {HIGH_SPREAD:.0%} of median)")


def comparison_table(results: Sequence[BenchmarkResult], baseline: Optional[str] = None,
                     width: Optional[int] = None) -> str:
    baseline = baseline or baseline_for(results)
    pairs = speedup_ratios(results, baseline)
    if not pairs or not any(r.model_name == baseline for r in results):
        return f"COMPARISON vs {baseline}: {baseline} not in this run"
    many = len({(r.backend, r.dtype) for r in results}) > 1
    sizes = swept_sizes(results)
    rows = [[_label(r, many, sizes=sizes), r.sequence_length, r.batch_size,
             "n/a" if sp is None else f"{sig3(sp.value)}x" + (NOISY_MARK if noisy else ""),
             "" if sp is None else f"[{sig3(sp.lo)}, {sig3(sp.hi)}]",
             "n/a" if sp is None else ("faster" if sp.value > 1 else "slower")] for r, sp, noisy in pairs]
    paired = all(sp.paired for _, sp, _ in pairs if sp is not None)
    lines = [f"COMPARISON vs {baseline}: speedup = median({baseline} latency / model latency)"
             + (" per round" if paired else ""),
             "(> 1 is faster; [95% interval], bootstrap over " + ("rounds)" if paired else "samples)"),
             _table(["Model", "SeqLen", "Batch", "Speedup", "95% CI", ""], rows, "lrrrrl", width)]
    if any(noisy for _, _, noisy in pairs):
        lines.append(NOISY_NOTE)
    for lab, (g, n) in geomean_speedups(results, baseline, lambda r: _label(r, many, sizes=sizes)).items():
        lines.append(f"geometric mean speedup, {lab}: {format_ratio(g)} over {n} configs")
    # the table as fit_table left it: a row wider than the terminal stays one row
    return "\n".join(ln if i == 2 else _wrap(ln, width) for i, ln in enumerate(lines))


def backend_ratios(results: Sequence[BenchmarkResult]) -> list[tuple[BenchmarkResult, BenchmarkResult, Ratio, bool]]:
    """(fast record, other backend's record, latency ratio fast / other with its 95% interval,
    noisy) for each config a run measured on the fast backend and another (results.backend_pairs)."""
    out = []
    for f, o in backend_pairs(results):
        rt = latency_ratio(f, o)
        out.append((f, o, rt, rt.crosses_one or f.high_spread or o.high_spread))
    return out


def backend_table(results: Sequence[BenchmarkResult], width: Optional[int] = None) -> str:
    """The fast backend against the run's other backends, config by config, and the geometric
    mean per model and backend; "" when the run has one backend (or no fast records)."""
    pairs = backend_ratios(results)
    if not pairs:
        return ""
    many = len({r.mode for r in results}) > 1
    rows = [[f.model_name + (f" ({f.mode})" if many else ""), o.backend, f.dtype, f.sequence_length,
             f.batch_size, f"{sig3(rt.value)}" + (NOISY_MARK if noisy else ""), f"[{sig3(rt.lo)}, {sig3(rt.hi)}]"]
            for f, o, rt, noisy in pairs]
    paired = all(rt.paired for _, _, rt, _ in pairs)
    lines = [f"BACKENDS: latency ratio = median({REFERENCE_SIDE} latency / other backend's latency)"
             + (" per round" if paired else ""),
             f"(< 1: {REFERENCE_SIDE} is faster; [95% interval])",
             _table(["Model", "vs", "Dtype", "SeqLen", "Batch", "Ratio", "95% CI"], rows, "llllrrr", width, keep=5)]
    if any(noisy for *_, noisy in pairs):
        lines.append(NOISY_NOTE)
    parts: dict[tuple, list] = defaultdict(list)
    for f, o, _, _ in pairs:
        if f.samples_ms and o.samples_ms:
            parts[(f.model_name, o.backend)].append((f.samples_ms, o.samples_ms, f.sample_rounds, o.sample_rounds,
                                                     bool(f.rounds_id) and f.rounds_id == o.rounds_id))
    for (model, other), v in parts.items():
        lines.append(f"geometric mean {REFERENCE_SIDE} / {other}, {model}: {format_ratio(geomean_ratio(v))} "
                     f"over {len(v)} configs")
    # the table as fit_table left it: a row wider than the terminal stays one row
    return "\n".join(ln if i == 2 else _wrap(ln, width) for i, ln in enumerate(lines))


def noise_warnings(results: Sequence[BenchmarkResult], env: Optional[dict] = None) -> list[str]:
    """Warnings that the machine's speed moved while it measured (the calibration kernel's drift
    over a shape's rounds) or that it was loaded when the run started; each names what to do."""
    threads = (env or {}).get("torch_threads") or max((r.threads or 1 for r in results), default=1)
    fewer = "--threads 1" if threads > 1 else "fewer --threads"
    remedy = (f"stop other jobs, use {fewer} (threads that wait for each other suffer most from a "
              "busy CPU), or raise --min-time (e.g. --min-time 1) so each config's runs span the "
              "slow periods")
    if ((env or {}).get("settings") or {}).get("processes", 1) == 1:
        remedy += ("; --processes 3 measures in three processes at different times, so the intervals "
                   "cover the machine's slow and fast states")
    out = []
    groups = {r.rounds_id: r for r in results if r.ok and r.calibration_ms}
    worst = max(groups.values(), key=lambda r: drift(r.calibration_ms), default=None)
    if worst is not None and drift(worst.calibration_ms) > DRIFT_WARN:
        out.append(f"warning: the machine's speed drifted {drift(worst.calibration_ms):.0%} "
                   f"(calibration kernel between rounds, at L={worst.sequence_length} "
                   f"B={worst.batch_size}; > {DRIFT_WARN:.0%}): something else uses this "
                   f"{'GPU' if str(worst.device).startswith('cuda') else 'CPU'}; {remedy}")
    load, cpus = (env or {}).get("load_average"), (env or {}).get("cpu_count")
    if load and cpus and load[0] >= cpus:
        out.append(f"warning: the machine was loaded when the run started (load average "
                   f"{load[0]:.1f} on {cpus} CPUs): other jobs compete with the timed runs; {remedy}")
    spread = [r for r in results if r.ok and r.high_spread]
    if spread and len(spread) * 4 >= sum(r.ok for r in results):
        out.append(f"warning: {len(spread)} of {sum(r.ok for r in results)} configs have a high "
                   f"spread (IQR > {HIGH_SPREAD:.0%} of median); {remedy}")
    return out


def wrap80(line: str) -> str:
    """A long message for the console, wrapped to 80 columns (continuation lines indented)."""
    return _wrap(line, 80)


def print_summary_table(results: Sequence[BenchmarkResult], file=None) -> None:
    out = file or sys.stdout
    width = console_width(out)
    rule = RULE[:width] if width else RULE
    print("\n" + rule, file=out)
    print(summary_table(results, width), file=out)
    print("\n" + comparison_table(results, width=width), file=out)
    if table := backend_table(results, width):
        print("\n" + table, file=out)
    failed = [r for r in results if not r.ok]
    if failed:
        counts = ", ".join(f"{sum(r.status == st for r in failed)} {label}"
                           for st, label in (("oom", "OOM"), ("error", "error"), ("timeout", "timeout"),
                                             ("skipped", "skipped"))
                           if st not in ("skipped", "timeout") or any(r.status == st for r in failed))
        print(f"\n{len(failed)} of {len(results)} configs failed or were skipped ({counts})", file=out)
    print(rule, file=out)


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


class NoCommonConfigs(ValueError):
    """compare: the two runs share no config (the CLI's distinct exit code); names the fields."""


def _differing_fields(base: dict, new: dict) -> list[str]:
    """Key fields whose values differ between two runs' records, with the values: 'backend
    (fast vs reference)'."""
    out = []
    for i, f in enumerate(RecordKey._fields):
        a = sorted({str(k[i]) for k in base}) if base else []
        b = sorted({str(k[i]) for k in new}) if new else []
        if a != b:
            out.append(f"{f} ({', '.join(a) or '-'} vs {', '.join(b) or '-'})")
    return out


def _uniform_difference(base: dict, new: dict) -> Optional[str]:
    """The one ignorable key field in which every base record has one value and every new record
    another (all fast vs all reference, all bf16 vs all fp32), or None."""
    diff = []
    for f in IGNORABLE:
        i = RecordKey._fields.index(f)
        a, b = {k[i] for k in base}, {k[i] for k in new}
        if a != b:
            diff.append((f, a, b))
    if len(diff) == 1 and len(diff[0][1]) == 1 and len(diff[0][2]) == 1:
        return diff[0][0]
    return None


ENV_WARN_FIELDS = (("torch_threads", "threads"), ("torch", "torch"))


def _processes(r: BenchmarkResult) -> int:
    """How many --processes workers measured record r (its rounds say: timing.PROCESS_ROUNDS)."""
    return len({x // PROCESS_ROUNDS for x in r.sample_rounds}) if r.sample_rounds else 1


def compare_data(base_dir, new_dir, *, threshold: float = 0.05, alpha: float = 0.05,
                 ignore: Sequence[str] = ()) -> dict:
    """compare_runs' findings as plain data (what `--format json` prints)."""
    base_records, new_records = load_run(base_dir), load_run(new_dir)
    full_b = {r.key: r for r in base_records}
    full_n = {r.key: r for r in new_records}
    ignore = list(ignore)
    across = None
    if not ignore and not (set(full_b) & set(full_n)):
        across = _uniform_difference(full_b, full_n)
        if across is not None:
            ignore = [across]
    base, new = _pairing(base_records, ignore, base_dir), _pairing(new_records, ignore, new_dir)
    if not (set(base) & set(new)):
        fields = _differing_fields(full_b, full_n)
        raise NoCommonConfigs(f"{base_dir} and {new_dir} share no config; they differ in "
                              + ("; ".join(fields) if fields else "nothing (one run is empty)")
                              + (" (pass --ignore FIELD to compare across backend, dtype or variant)"
                                 if any(f.split()[0] in IGNORABLE for f in fields) else ""))
    warnings = []
    base_dev, new_dev = _run_devices(base_dir, base_records), _run_devices(new_dir, new_records)
    if base_dev and new_dev and base_dev != new_dev:
        warnings.append(f"warning: comparing different devices: base {base_dev}, new {new_dev}")
    env_b, env_n = read_environment(Path(base_dir) / ENV_NAME), read_environment(Path(new_dir) / ENV_NAME)
    for key, name in ENV_WARN_FIELDS:
        if env_b.get(key) is not None and env_n.get(key) is not None and env_b[key] != env_n[key]:
            warnings.append(f"warning: {name} differ: base {env_b[key]}, new {env_n[key]}")
    rows, parts = [], []
    for key, n in new.items():
        b = base.get(key)
        if b is None:
            continue
        row = dict(model=n.model_name, backend=_side(b.backend, n.backend), dtype=_side(b.dtype, n.dtype),
                   mode=n.mode, variant=_side(b.variant, n.variant), sequence_length=n.sequence_length,
                   batch_size=n.batch_size)
        if not (b.ok and n.ok) or not b.samples_ms or not n.samples_ms:
            rows.append(dict(row, verdict=f"not comparable (base {b.status}, new {n.status})"))
            continue
        # two runs: never paired; a --processes run's rounds name each sample's process, so
        # the interval resamples its processes too (timing._Term)
        x = ratio(n.samples_ms, b.samples_ms, n.sample_rounds, b.sample_rounds, paired=False)
        _, p = mann_whitney_u(b.samples_ms, n.samples_ms)
        # the U test takes every sample as independent; a --processes run's samples are not (a
        # process's machine state is shared by all of its): there the interval must exclude 1 too
        significant = p < alpha and not (x.crosses_one and (_processes(b) > 1 or _processes(n) > 1))
        if x.value > 1 + threshold and significant:
            verdict = "SLOWER (regression)"
        elif x.value < 1 - threshold and significant:
            verdict = "faster"
        else:
            verdict = "same" if not significant else "within threshold"
        noisy = b.high_spread or n.high_spread
        rows.append(dict(row, base_median_ms=b.latency_median_ms, new_median_ms=n.latency_median_ms,
                         ratio=x.value, ratio_lo=x.lo, ratio_hi=x.hi, p=p, noisy=bool(noisy), verdict=verdict))
        parts.append((n.samples_ms, b.samples_ms, n.sample_rounds, b.sample_rounds, False))
    geo = geomean_ratio(parts)
    only = {name: [dict(model=r.model_name, backend=r.backend, dtype=r.dtype, mode=r.mode,
                        sequence_length=r.sequence_length, batch_size=r.batch_size, dim=r.dim)
                   for k, r in run.items() if k not in other]
            for name, run, other in (("base", base, new), ("new", new, base))}
    return dict(base=str(base_dir), new=str(new_dir), threshold=threshold, alpha=alpha,
                across=across, ignore=ignore, warnings=warnings, rows=rows, only=only,
                geomean=None if geo is None else dict(ratio=geo.value, lo=geo.lo, hi=geo.hi, configs=len(parts)),
                regressions=[f"{r['model']} ({r['backend']}, {r['dtype']}, {r['mode']})"
                             for r in rows if r["verdict"].startswith("SLOWER")])


def _compare_rows(d: dict) -> list[list]:
    out = []
    for r in d["rows"]:
        label = f"{r['model']} ({r['backend']}, {r['dtype']}, {r['mode']})"
        if "ratio" not in r:
            out.append([label, r["sequence_length"], r["batch_size"], "-", "-", "-", "-", "-", r["verdict"]])
            continue
        out.append([label, r["sequence_length"], r["batch_size"], sig3(r["base_median_ms"]),
                    sig3(r["new_median_ms"]), f"{r['ratio']:.3f}" + (NOISY_MARK if r["noisy"] else ""),
                    f"[{sig3(r['ratio_lo'])}, {sig3(r['ratio_hi'])}]", f"{r['p']:.3g}", r["verdict"]])
    return out


_COMPARE_HEADER = ["Config", "SeqLen", "Batch", "Base ms", "New ms", "Ratio", "95% CI", "p", "Verdict"]


def format_compare(d: dict, fmt: str = "text") -> str:
    """compare_data's findings as text (the console), Markdown or JSON."""
    if fmt == "json":
        return json.dumps(d, indent=2)
    lines = list(d["warnings"])
    if d["across"]:
        lines.append(f"note: the runs differ only in {d['across']} (every record): compared across it")
    rule = (f"ratio = new median / base median latency (95% bootstrap interval); regression: "
            f"ratio > {1 + d['threshold']:.3f} and Mann-Whitney U p < {d['alpha']}")
    only = [f"only in {name} ({len(v)}): " + "; ".join(
        f"{r['model']} ({r['backend']}, {r['dtype']}, {r['mode']}) L={r['sequence_length']} "
        f"B={r['batch_size']} dim={r['dim']}" for r in v) for name, v in d["only"].items() if v]
    g = d["geomean"]
    summary = ([f"geometric mean ratio new/base (median): {sig3(g['ratio'])}x "
                f"[{sig3(g['lo'])}, {sig3(g['hi'])}] over {g['configs']} configs"] if g else [])
    regs = d["regressions"]
    verdict = f"{len(regs)} regression(s)" + (": " + ", ".join(dict.fromkeys(regs)) if regs else "")
    if fmt == "md":
        md = [f"# Compare: `{d['base']}` (base) vs `{d['new']}` (new)", ""]
        md += [f"- {w}" for w in lines] + ([""] if lines else [])
        md += [rule, "", _md_table(_COMPARE_HEADER, _compare_rows(d)), ""]
        md += [f"- {x}" for x in only + summary + [verdict]]
        return "\n".join(md)
    lines += [f"COMPARE  base: {d['base']}  new: {d['new']}", rule,
              _table(_COMPARE_HEADER, _compare_rows(d), "lrrrrrrrl")]
    if any(r.get("noisy") for r in d["rows"]):
        lines.append(f"{NOISY_MARK} noisy: a config has a high spread (IQR > {HIGH_SPREAD:.0%} of median)")
    return "\n".join(lines + only + summary + [verdict])


def compare_runs(base_dir, new_dir, *, threshold: float = 0.05, alpha: float = 0.05,
                 ignore: Sequence[str] = (), fmt: str = "text") -> tuple[str, bool]:
    """Per-config median latency ratio NEW/BASE with its 95% bootstrap interval and a
    Mann-Whitney U test on the raw samples, and their geometric mean with its interval.

    Configs pair by their record key; `ignore` leaves fields out of it (backend, dtype, variant),
    e.g. to compare a fast-backend run with a reference-backend run of the same grid. When the
    runs share no config but differ uniformly in one of those fields, they are compared across it
    and the text says so; when they share none even then, NoCommonConfigs names the fields.

    A config regresses when NEW is slower by more than `threshold` (ratio > 1 + threshold) and the
    U test says the difference is significant (p < alpha). Returns (text, any regression). When the
    runs were measured on different devices, or with other threads or torch, the text's first
    lines are warnings that say so (the regression verdict is unchanged).
    """
    d = compare_data(base_dir, new_dir, threshold=threshold, alpha=alpha, ignore=ignore)
    return format_compare(d, fmt), bool(d["regressions"])


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
    base_name = baseline_for(results)
    sizes = swept_sizes(results)
    sp_rows = [[_named(r, sizes), r.backend, r.dtype, r.sequence_length, r.batch_size,
                "n/a" if sp is None else f"{sig3(sp.value)}x", "" if sp is None else f"[{sig3(sp.lo)}, {sig3(sp.hi)}]",
                "noisy" if noisy else ""] for r, sp, noisy in speedup_ratios(results)]
    sp_header = ["Model", "Backend", "Dtype", "SeqLen", "Batch", "Speedup (median)", "95% CI", "Noise"]
    geo_lines = [f"Geometric mean speedup (median), {k}: {format_ratio(g)} over {n} configs"
                 for k, (g, n) in geomean_speedups(results).items()]
    warn_lines = noise_warnings(results, env)
    md = ["# Benchmark report", "", f"Records: `{run_dir}` ({len(results)} configs, "
          f"{sum(not r.ok for r in results)} failed)", "", "## Environment", "",
          _md_table(["Key", "Value"], env_rows) if env_rows else "(no environment.json)", "",
          "## Results", "", _md_table(_RECORD_HEADER, _record_rows(results)), "",
          f"## Speedup vs {base_name}", "",
          f"Speedup = median of {base_name} latency / model latency (per interleaved round where "
          "measured so), with its 95% bootstrap interval. Noisy: the interval crosses 1 or a "
          f"config has a high spread (IQR > {HIGH_SPREAD:.0%} of median).", "",
          _md_table(sp_header, sp_rows) if sp_rows
          else f"({base_name} or the other models missing)", ""]
    md += [f"- {ln}" for ln in geo_lines + warn_lines] + [""]
    be_rows = [[f.model_name, f.mode, o.backend, f.dtype, f.sequence_length, f.batch_size, sig3(rt.value),
                f"[{sig3(rt.lo)}, {sig3(rt.hi)}]", "noisy" if noisy else ""]
               for f, o, rt, noisy in backend_ratios(results)]
    be_header = ["Model", "Mode", "vs backend", "Dtype", "SeqLen", "Batch",
                 f"Latency {REFERENCE_SIDE} / other (median)", "95% CI", "Noise"]
    if be_rows:
        md += [f"## {REFERENCE_SIDE} against the other backends", "",
               f"Median of {REFERENCE_SIDE}'s latency over the other backend's (per interleaved round "
               f"where measured so), with its 95% bootstrap interval; below 1 {REFERENCE_SIDE} is faster.", "",
               _md_table(be_header, be_rows), ""]
    md += ["## Plots", ""]
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
<h2>Speedup vs {html.escape(base_name)}</h2>{h_table(sp_header, sp_rows)}
{"".join(f"<p>{html.escape(ln)}</p>" for ln in geo_lines + warn_lines)}
{f"<h2>{REFERENCE_SIDE} against the other backends</h2>" + h_table(be_header, be_rows) if be_rows else ""}
<h2>Plots</h2>{imgs}
</body></html>
"""
    html_path = out / "report.html"
    html_path.write_text(page, encoding="utf-8")
    note_written(out, [md_path, html_path, *pngs])
    return [md_path, html_path, *pngs]
