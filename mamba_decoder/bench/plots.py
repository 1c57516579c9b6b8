"""The spec's eight plots, drawn from records only (so a saved run can be redrawn).

matplotlib is imported inside `plot_benchmark_results`, not when the package is imported, and
figures are drawn on the Agg canvas directly (no pyplot, no global backend switch). Failed
configs (OOM / error) are left out of every plot (a gap, never a zero) and counted in a footnote;
heatmap cells of failed configs are hatched and say OOM or ERR.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

from .registry import MLA_BLOCK, MAMBA_DECODER_BLOCK, REGULAR_MAMBA
from .results import BenchmarkResult

DPI = 300
PLOT_FILES = {
    "latency_vs_seq_len": "1_latency_vs_sequence_length.png",
    "throughput_vs_seq_len": "2_throughput_vs_sequence_length.png",
    "latency_vs_batch": "3_latency_vs_batch_size.png",
    "throughput_vs_batch": "4_throughput_vs_batch_size.png",
    "speedup": "5_speedup_vs_regular_mamba.png",
    "efficiency": "6_scaling_efficiency.png",
    "heatmaps": "7_heatmaps_latency_throughput.png",
    "speedup_heatmaps": "8_speedup_heatmaps.png",
}
# Okabe-Ito colours: one per model, the same in every plot.
MODEL_COLORS = {REGULAR_MAMBA: "#0072B2", MAMBA_DECODER_BLOCK: "#D55E00", MLA_BLOCK: "#009E73"}
_EXTRA_COLORS = ["#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000"]
BACKEND_STYLES = {"reference": "-", "fast": "--"}
DTYPE_MARKERS = {"float32": "o", "bfloat16": "s", "float16": "^"}
STYLE = {
    "font.size": 8, "axes.titlesize": 9, "axes.labelsize": 8, "legend.fontsize": 8,
    "xtick.labelsize": 7, "ytick.labelsize": 7, "axes.spines.top": False,
    "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3, "grid.linewidth": 0.5,
    "lines.linewidth": 1.6, "lines.markersize": 4.5, "figure.facecolor": "white",
}

Series = tuple[str, str, str]   # (model, backend, dtype)


class _Data:
    """Records indexed for plotting: series -> (seq, batch) -> record."""

    def __init__(self, records: Sequence[BenchmarkResult]):
        self.records = list(records)
        self.by_series: dict[Series, dict[tuple[int, int], BenchmarkResult]] = defaultdict(dict)
        for r in self.records:
            self.by_series[(r.model_name, r.backend, r.dtype)][(r.sequence_length, r.batch_size)] = r
        self.seqs = sorted({r.sequence_length for r in self.records})
        self.batches = sorted({r.batch_size for r in self.records})
        self.backends = sorted({r.backend for r in self.records})
        self.dtypes = sorted({r.dtype for r in self.records})
        self.failed = [r for r in self.records if not r.ok]

    def label(self, s: Series) -> str:
        extra = [s[1]] + ([s[2]] if len(self.dtypes) > 1 else [])
        return f"{s[0]} ({', '.join(extra)})"

    def style(self, s: Series) -> dict:
        models = list(dict.fromkeys(r.model_name for r in self.records))
        color = MODEL_COLORS.get(s[0]) or _EXTRA_COLORS[models.index(s[0]) % len(_EXTRA_COLORS)]
        return dict(color=color, linestyle=BACKEND_STYLES.get(s[1], ":"),
                    marker=DTYPE_MARKERS.get(s[2], "D"), label=self.label(s))

    def value(self, s: Series, seq: int, batch: int, metric: str) -> float:
        """The metric of a config, NaN when it failed or was not run (a gap in the plot)."""
        r = self.by_series[s].get((seq, batch))
        if r is None or not r.ok:
            return math.nan
        if metric == "latency":
            return r.latency_ms
        if metric == "latency_p10":
            return r.latency_p10_ms
        if metric == "latency_p90":
            return r.latency_p90_ms
        if metric == "throughput":
            return r.throughput_tokens_per_sec
        if metric == "efficiency":
            return r.throughput_tokens_per_sec / (r.num_parameters / 1e6) if r.num_parameters else math.nan
        if metric == "speedup":
            base = self.by_series.get((REGULAR_MAMBA, s[1], s[2]), {}).get((seq, batch))
            return base.latency_ms / r.latency_ms if base is not None and base.ok else math.nan
        raise ValueError(metric)

    def title_suffix(self, env: Optional[dict]) -> str:
        devices = sorted({r.device for r in self.records})
        dev = ", ".join(devices)
        if env and env.get("device_name"):
            dev += f" ({env['device_name']})"
        dims = sorted({r.dim for r in self.records})
        return f"{dev} · {', '.join(self.dtypes)} · dim {', '.join(map(str, dims))}"


def _grid(fig, n: int):
    ncols = min(n, 3) if n != 4 else 2
    nrows = math.ceil(n / ncols)
    return [fig.add_subplot(nrows, ncols, i + 1) for i in range(n)], nrows, ncols


def _new_figure(n_panels: int, panel_w: float = 3.4, panel_h: float = 2.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = min(n_panels, 3) if n_panels != 4 else 2
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(panel_w * ncols + 0.6, panel_h * nrows + 1.3), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _finish(fig, data: _Data, title: str, env: Optional[dict], path: Path, handles=None) -> Path:
    sub = data.title_suffix(env)
    if data.failed:   # said in the title, where constrained layout keeps it clear of the axes
        n_oom = sum(r.status == "oom" for r in data.failed)
        n = len(data.failed)
        sub += (f"\n{n} failed config{'s' if n != 1 else ''} ({n_oom} OOM, {n - n_oom} error): "
                "gaps in lines, hatched cells in heatmaps")
    fig.suptitle(f"{title}\n{sub}", fontsize=10, fontweight="bold")
    if handles and handles[0]:
        fig.legend(*handles, loc="outside lower center", ncols=min(4, len(handles[0])), frameon=False)
    fig.savefig(path, dpi=DPI)
    return path


def _tick(v: float, _pos=None) -> str:
    """Plain tick labels on log axes: 0.5, 3, 40, 1.2k, 35k (no 4 x 10^0)."""
    if v <= 0:
        return ""
    if v >= 1e6:
        return f"{v / 1e6:g}M"
    if v >= 1e3:
        return f"{v / 1e3:g}k"
    return f"{v:.3g}"


def _plain_log_ticks(axis, lo: float, hi: float) -> None:
    """Readable labels on a log axis; minor ticks labelled only when the range is under ~1.5 decades."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    axis.set_major_formatter(FuncFormatter(_tick))
    few = lo > 0 and hi / lo < 30
    axis.set_minor_formatter(FuncFormatter(_tick) if few else NullFormatter())


def _log2_axis(ax, ticks: Sequence[int]) -> None:
    from matplotlib.ticker import FixedLocator, NullLocator

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(list(ticks)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(t) for t in ticks])
    if len(ticks) == 1:
        ax.set_xlim(ticks[0] / 1.5, ticks[0] * 1.5)


def _line_figure(data: _Data, *, x: str, metric: str, ylabel: str, title: str, env, path: Path,
                 logy: bool, series: Optional[list[Series]] = None, baseline_line: bool = False):
    xs = data.seqs if x == "seq" else data.batches
    panels = data.batches if x == "seq" else data.seqs
    series = series if series is not None else list(data.by_series)
    fig = _new_figure(max(1, len(panels)))
    axes, _, _ = _grid(fig, max(1, len(panels)))
    handles: dict[str, object] = {}
    for ax, p in zip(axes, panels):
        for s in series:
            def at(v, m=metric):
                return data.value(s, v, p, m) if x == "seq" else data.value(s, p, v, m)
            ys = [at(v) for v in xs]
            if all(math.isnan(y) for y in ys):
                continue
            st = data.style(s)
            if metric == "latency":   # p10-p90 bars: positive on a log axis, unlike mean - std
                lo = [max(y - at(v, "latency_p10"), 0.0) if not math.isnan(y) else math.nan
                      for v, y in zip(xs, ys)]
                hi = [max(at(v, "latency_p90") - y, 0.0) if not math.isnan(y) else math.nan
                      for v, y in zip(xs, ys)]
                h = ax.errorbar(xs, ys, yerr=[lo, hi], capsize=2, elinewidth=0.8, **st)
            else:
                (h,) = ax.plot(xs, ys, **st)
            handles[st["label"]] = h
        if baseline_line:
            ax.axhline(1.0, color=MODEL_COLORS[REGULAR_MAMBA], linewidth=1, linestyle=":")
        _log2_axis(ax, xs)
        if logy:
            ax.set_yscale("log")
            _plain_log_ticks(ax.yaxis, *ax.get_ylim())
        ax.set_title(f"batch size {p}" if x == "seq" else f"sequence length {p}")
        ax.set_xlabel("sequence length (tokens, log2)" if x == "seq" else "batch size (log2)")
        ax.set_ylabel(ylabel)
    if not handles:
        axes[0].text(0.5, 0.5, "no successful configs to plot", ha="center", va="center",
                     transform=axes[0].transAxes, color="0.4")
    return _finish(fig, data, title, env, path, (list(handles.values()), list(handles)))


def _no_baseline(data: _Data, title: str, env, path: Path, why: str) -> Path:
    fig = _new_figure(1)
    ax = fig.add_subplot(1, 1, 1)
    ax.axis("off")
    ax.text(0.5, 0.5, why, ha="center", va="center", color="0.3", transform=ax.transAxes)
    return _finish(fig, data, title, env, path)


def _heatmap(ax, matrix, status, row_labels, col_labels, *, cmap, norm, fmt, cbar_label, fig,
             cbar_ticks=None):
    import numpy as np

    m = np.ma.masked_invalid(np.asarray(matrix, dtype=float))
    from matplotlib import colormaps
    from matplotlib.patches import Rectangle

    cm = colormaps[cmap].with_extremes(bad="0.92")
    im = ax.imshow(m, cmap=cm, norm=norm, aspect="auto", origin="lower")
    ax.set_xticks(range(len(col_labels)), [str(c) for c in col_labels])
    ax.set_yticks(range(len(row_labels)), [str(r) for r in row_labels])
    ax.grid(False)
    for i in range(len(row_labels)):
        for j in range(len(col_labels)):
            v = matrix[i][j]
            if math.isnan(v):
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///",
                                       edgecolor="0.6", linewidth=0))
                ax.text(j, i, status[i][j], ha="center", va="center", fontsize=6, color="0.25")
            else:
                rgba = im.cmap(im.norm(v))
                light = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] > 0.55
                ax.text(j, i, fmt(v), ha="center", va="center", fontsize=6,
                        color="black" if light else "white")
    if m.count() == 0:   # every cell failed: no scale to show
        return im
    cb = fig.colorbar(im, ax=ax, shrink=0.9)
    cb.set_label(cbar_label, fontsize=7)
    if cbar_ticks is not None:
        cb.set_ticks(cbar_ticks, labels=[_tick(t) + "x" for t in cbar_ticks])
        cb.ax.minorticks_off()
    elif norm is not None:
        _plain_log_ticks(cb.ax.yaxis, norm.vmin, norm.vmax)
    cb.ax.tick_params(labelsize=6)
    return im


def _status_grid(data: _Data, s: Series) -> list[list[str]]:
    out = []
    for b in data.batches:
        row = []
        for q in data.seqs:
            r = data.by_series[s].get((q, b))
            row.append("n/a" if r is None else {"oom": "OOM", "error": "ERR"}.get(r.status, "n/a"))
        out.append(row)
    return out


def _fmt_num(v: float) -> str:
    if v >= 1e4:
        return f"{v / 1e3:.0f}k"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _heatmaps_figure(data: _Data, env, path: Path) -> Path:
    from matplotlib.colors import LogNorm

    series = list(data.by_series)
    fig = _new_figure(2, panel_w=0.55 * len(data.seqs) + 2.2, panel_h=0.35 * len(data.batches) + 1.2)
    fig.set_size_inches(fig.get_figwidth(), (0.35 * len(data.batches) + 1.2) * len(series) + 1.0)
    for k, (metric, cmap, label) in enumerate((("latency", "magma_r", "latency (ms, mean)"),
                                               ("throughput", "viridis", "throughput (tokens/s)"))):
        vals = [data.value(s, q, b, metric) for s in series for q in data.seqs for b in data.batches]
        finite = [v for v in vals if not math.isnan(v) and v > 0]
        norm = LogNorm(min(finite), max(finite)) if finite and min(finite) < max(finite) else None
        for i, s in enumerate(series):
            ax = fig.add_subplot(len(series), 2, 2 * i + k + 1)
            matrix = [[data.value(s, q, b, metric) for q in data.seqs] for b in data.batches]
            _heatmap(ax, matrix, _status_grid(data, s), data.batches, data.seqs, cmap=cmap, norm=norm,
                     fmt=_fmt_num, cbar_label=label, fig=fig)
            ax.set_title(f"{data.label(s)}: {metric}")
            ax.set_xlabel("sequence length (tokens)")
            ax.set_ylabel("batch size")
    return _finish(fig, data, "Latency and throughput of every configuration", env, path)


def _speedup_heatmaps_figure(data: _Data, env, path: Path) -> Path:
    from matplotlib.colors import LogNorm

    series = [s for s in data.by_series if s[0] != REGULAR_MAMBA]
    title = "Speedup vs Regular Mamba (Regular Mamba latency / model latency)"
    if not any(s[0] == REGULAR_MAMBA for s in data.by_series) or not series:
        return _no_baseline(data, title, env, path,
                            "needs Regular Mamba and at least one other model in the run")
    vals = [data.value(s, q, b, "speedup") for s in series for q in data.seqs for b in data.batches]
    finite = [v for v in vals if not math.isnan(v) and v > 0]
    span = max([abs(math.log2(v)) for v in finite] + [0.1])
    norm = LogNorm(2 ** -span, 2 ** span)   # symmetric around 1x: red slower, blue faster
    fig = _new_figure(len(series), panel_w=0.55 * len(data.seqs) + 2.2,
                      panel_h=0.35 * len(data.batches) + 1.2)
    axes, _, _ = _grid(fig, len(series))
    for ax, s in zip(axes, series):
        matrix = [[data.value(s, q, b, "speedup") for q in data.seqs] for b in data.batches]
        _heatmap(ax, matrix, _status_grid(data, s), data.batches, data.seqs, cmap="RdBu", norm=norm,
                 fmt=lambda v: f"{v:.2f}x", cbar_label="speedup (x, log scale)", fig=fig,
                 cbar_ticks=[2.0 ** k for k in range(-math.ceil(span), math.ceil(span) + 1)
                             if abs(k) <= span + 1e-9])
        ax.set_title(data.label(s))
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel("batch size")
    return _finish(fig, data, title, env, path)


def plot_benchmark_results(results: Sequence[BenchmarkResult], output_dir: str | Path = "benchmark_plots",
                           env: Optional[dict] = None) -> list[Path]:
    """Draw the eight plots of `results` into `output_dir` as 300 DPI PNGs; returns their paths."""
    import matplotlib

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = _Data(results)
    f = {k: out / v for k, v in PLOT_FILES.items()}
    with matplotlib.rc_context(STYLE):
        if not data.records:
            return [_no_baseline(data, t, env, p, "no records") for t, p in
                    zip(PLOT_FILES, f.values())]
        others = [s for s in data.by_series if s[0] != REGULAR_MAMBA]
        has_base = any(s[0] == REGULAR_MAMBA for s in data.by_series)
        paths = [
            _line_figure(data, x="seq", metric="latency", ylabel="latency (ms, mean; bars p10-p90)",
                         title="Latency vs sequence length", env=env, path=f["latency_vs_seq_len"], logy=True),
            _line_figure(data, x="seq", metric="throughput", ylabel="throughput (tokens/s, log)",
                         title="Throughput vs sequence length", env=env, path=f["throughput_vs_seq_len"],
                         logy=True),
            _line_figure(data, x="batch", metric="latency", ylabel="latency (ms, mean; bars p10-p90)",
                         title="Latency vs batch size", env=env, path=f["latency_vs_batch"], logy=True),
            _line_figure(data, x="batch", metric="throughput", ylabel="throughput (tokens/s, log)",
                         title="Throughput vs batch size", env=env, path=f["throughput_vs_batch"], logy=True),
            _line_figure(data, x="seq", metric="speedup", series=others, baseline_line=True,
                         ylabel="speedup vs Regular Mamba (x, log)", logy=True,
                         title="Speedup vs Regular Mamba (> 1 is faster; dotted line = Regular Mamba)",
                         env=env, path=f["speedup"])
            if has_base and others else
            _no_baseline(data, "Speedup vs Regular Mamba", env, f["speedup"],
                         "needs Regular Mamba and at least one other model in the run"),
            _line_figure(data, x="seq", metric="efficiency", ylabel="tokens/s per million parameters (log)",
                         title="Scaling efficiency: throughput per parameter", env=env,
                         path=f["efficiency"], logy=True),
            _heatmaps_figure(data, env, f["heatmaps"]),
            _speedup_heatmaps_figure(data, env, f["speedup_heatmaps"]),
        ]
    return paths
