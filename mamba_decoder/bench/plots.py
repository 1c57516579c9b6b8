"""The spec's eight plots and the decode / train plots, drawn from records only (so a saved run
can be redrawn).

Which records each plot shows:
  * The spec's eight plots (PLOT_FILES, fixed names) show ONE mode: the forward records when the
    run has any, else the records of the run's mode (decode before train if a run holds both
    and no forward). A decode-only run therefore still gets all eight, drawn from its decode
    records: x is the context length and latency is per decode step, i.e. per generated token
    of each sequence; a train-only run's eight show the training step (forward + backward, plus
    AdamW when the variant says so). Axis labels and titles name the mode. Records of the other
    modes never mix into these eight.
  * Decode records also get decode_latency_vs_context.png (median latency per generated token,
    p10-p90 bars) and cache_memory_vs_context.png (the cache held at the context, MiB, log-log:
    Mamba's state is flat, MLA's latent or full K/V cache grows); train records get
    train_step_time_vs_seq.png (median step time, p10-p90 bars). One panel per batch size.
  * One line per (model, backend, dtype, variant): colour = model, line style = backend,
    marker = dtype (dtype and variant when the run has several variants). Legends name the model and backend, the
    dtype and variant when a run has several; a single non-default variant is named in the title.
  * Plot 6 (efficiency) shows tokens/s per million TOTAL parameters (solid) and per million
    ACTIVE parameters (dashed; the MoE activates n_activated of n_experts), the latter drawn only
    where it differs from the total; there markers, not line styles, tell backends apart.
  * Titles name the device (the records' device_name, else environment.json's, else the device
    type) and dtype; records from more than one device_name say "MIXED DEVICES: a, b".

matplotlib is imported inside `plot_benchmark_results`, not when the package is imported, and
figures are drawn on the Agg canvas directly (no pyplot, no global backend switch). Failed
configs (OOM / error) are left out of every plot (a gap, never a zero) and counted in a footnote;
heatmap cells of failed configs are hatched and say OOM or ERR.
"""
from __future__ import annotations

import math
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

from .names import (MAMBA_LM, MODEL_COLORS, REGULAR_MAMBA, is_mixed, join_variant, mixed_devices, sig3,
                    variant_tags)
from .results import REFERENCE_SIDE, BenchmarkResult, backend_pairs, latency_ratio, record_devices, swept_sizes
from .timing import Ratio, ratio

DPI = 300
SWEEP_PLOT_FILE = "param_sweep_{}.png"   # one per swept size: latency and throughput against it
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
# Drawn in addition to the eight when the run has records of that mode.
MODE_PLOT_FILES = {
    "decode_latency": "decode_latency_vs_context.png",
    "cache_memory": "cache_memory_vs_context.png",
    "train_step": "train_step_time_vs_seq.png",
}
ENERGY_PLOT_FILE = "energy_per_token_vs_seq.png"   # drawn when records carry energy (NVML / RAPL)
BACKEND_PLOT_FILE = "backend_ratio_vs_seq.png"     # drawn when the run holds fast and another backend
_EXTRA_COLORS = ["#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000"]
BACKEND_STYLES = {"reference": "-", "fast": "--"}
_LINESTYLES = ["-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 1)), (0, (8, 2))]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">"]
DTYPE_MARKERS = {"float32": "o", "bfloat16": "s", "float16": "^"}
STYLE = {
    "font.size": 8, "axes.titlesize": 9, "axes.labelsize": 8, "legend.fontsize": 8,
    "xtick.labelsize": 7, "ytick.labelsize": 7, "axes.spines.top": False,
    "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3, "grid.linewidth": 0.5,
    "lines.linewidth": 1.6, "lines.markersize": 4.5, "figure.facecolor": "white",
    "text.parse_math": False,   # saved names are plain text: a `$` in one must not crash the plots
}
MODES_ORDER = ("forward", "decode", "train")
# What the x axis and the latency / throughput of a record mean in each mode.
MODE_TEXT = {
    "forward": dict(x="sequence length", latency="latency", lat_unit="ms", throughput="throughput",
                    tp_unit="tokens/s", title=""),
    "decode": dict(x="context length", latency="latency per generated token", lat_unit="ms",
                   throughput="decode throughput", tp_unit="generated tokens/s",
                   title=" (decode)"),
    "train": dict(x="sequence length", latency="training step time", lat_unit="ms",
                  throughput="training throughput", tp_unit="tokens/s",
                  title=" (train step)"),
}

Series = tuple[str, str, str, str]   # (model, backend, dtype, variant)


def _backend_order(b: str) -> tuple:
    order = list(BACKEND_STYLES)
    return (order.index(b) if b in order else len(order), b)


def _mode_of(records: Sequence[BenchmarkResult]) -> str:
    modes = {r.mode for r in records}
    return next((m for m in MODES_ORDER if m in modes), min(modes) if modes else "forward")


class _Data:
    """Records of one mode indexed for plotting: series -> (seq, batch) -> record."""

    def __init__(self, records: Sequence[BenchmarkResult], mode: Optional[str] = None):
        self.records = list(records)
        self.mode = mode or _mode_of(self.records)
        self.text = MODE_TEXT.get(self.mode, MODE_TEXT["forward"])
        self.by_series: dict[Series, dict[tuple[int, int], BenchmarkResult]] = defaultdict(dict)
        # A sweep over sizes: each config is a series of its own, its swept sizes (n_experts=8)
        # joined to the variant, so legends tell configs apart; the speedup's baseline is the
        # Regular Mamba series of the sizes it shares (base_variant).
        self.sizes = swept_sizes(self.records)
        self.baseline = MAMBA_LM if self.records and all(r.level == "model" for r in self.records) \
            else REGULAR_MAMBA
        base_keys = {k for r in self.records if r.model_name == self.baseline for k in r.block_config}
        self.base_variant: dict[Series, str] = {}
        for r in self.records:
            s = (r.model_name, r.backend, r.dtype, self.series_variant(r))
            self.by_series[s][(r.sequence_length, r.batch_size)] = r
            self.base_variant[s] = self.series_variant(r, base_keys)
        self.seqs = sorted({r.sequence_length for r in self.records})
        self.batches = sorted({r.batch_size for r in self.records})
        self.backends = sorted({r.backend for r in self.records}, key=_backend_order)
        self.dtypes = sorted({r.dtype for r in self.records})
        self.variants = sorted({s[3] for s in self.by_series})   # with a sweep's sizes
        self.models = list(dict.fromkeys(r.model_name for r in self.records))
        self.failed = [r for r in self.records if not r.ok]
        self._speedups: dict[tuple, tuple[Optional[Ratio], bool]] = {}
        # marker per (dtype, variant) when variants differ; per (backend, dtype, variant) in plot 6
        self._dv = sorted({(s[2], s[3]) for s in self.by_series})
        self._markers = sorted({(s[1], s[2], s[3]) for s in self.by_series},
                               key=lambda c: (_backend_order(c[0]), c[1], c[2]))

    def series_variant(self, r: BenchmarkResult, keys=None) -> str:
        """The record's variant with its swept sizes (those in `keys`, if given) as more tags."""
        return join_variant([*variant_tags(r.variant), *(f"{k}={r.block_config[k]}" for k in self.sizes
                                                          if k in r.block_config and (keys is None or k in keys))])

    @staticmethod
    def variant_name(v: str) -> str:
        return v or "default"

    def label(self, s: Series) -> str:
        extra = ([s[1]] + ([s[2]] if len(self.dtypes) > 1 else [])
                 + ([self.variant_name(s[3])] if len(self.variants) > 1 else []))
        return f"{s[0]} ({', '.join(extra)})"

    def color(self, model: str) -> str:
        return MODEL_COLORS.get(model) or _EXTRA_COLORS[self.models.index(model) % len(_EXTRA_COLORS)]

    def style(self, s: Series) -> dict:
        if len(self.variants) > 1:
            marker = _MARKERS[self._dv.index((s[2], s[3])) % len(_MARKERS)]
        else:
            marker = DTYPE_MARKERS.get(s[2], "D")
        return dict(color=self.color(s[0]), linestyle=BACKEND_STYLES.get(s[1], ":"), marker=marker,
                    label=self.label(s))

    def marker_style(self, s: Series) -> dict:
        """Colour = model, marker = (backend, dtype, variant), solid line: for plots whose line
        style says something else (plot 6: total vs active parameters)."""
        marker = _MARKERS[self._markers.index((s[1], s[2], s[3])) % len(_MARKERS)]
        return dict(color=self.color(s[0]), linestyle="-", marker=marker, label=self.label(s))

    def value(self, s: Series, seq: int, batch: int, metric: str) -> float:
        """The metric of a config, NaN when it failed or was not run (a gap in the plot)."""
        r = self.by_series[s].get((seq, batch))
        if r is None or not r.ok:
            return math.nan
        if metric == "latency":           # every plot draws the median
            return _nan(r.latency_median_ms)
        if metric == "latency_median":
            return _nan(r.latency_median_ms)
        if metric == "latency_p10":
            return _nan(r.latency_p10_ms)
        if metric == "latency_p90":
            return _nan(r.latency_p90_ms)
        if metric == "throughput":        # from the median latency
            return _median_throughput(r)
        if metric == "efficiency":
            return _median_throughput(r) / (r.num_parameters / 1e6) if r.num_parameters else math.nan
        if metric == "efficiency_active":
            return (_median_throughput(r) / (r.active_parameters / 1e6)
                    if r.active_parameters else math.nan)
        if metric == "energy_mj_per_token":
            return r.energy_per_token_j * 1e3 if r.energy_per_token_j is not None else math.nan
        if metric == "cache_mib":
            return r.cache_bytes / 2 ** 20 if r.cache_bytes else math.nan
        if metric in ("speedup", "speedup_lo", "speedup_hi"):
            sp, _ = self.speedup(s, seq, batch)
            return math.nan if sp is None else {"speedup": sp.value, "speedup_lo": sp.lo,
                                                 "speedup_hi": sp.hi}[metric]
        raise ValueError(metric)

    def speedup(self, s: Series, seq: int, batch: int) -> tuple[Optional[Ratio], bool]:
        """(median speedup vs the baseline with its 95% interval, noisy), (None, False) where
        either failed: the same figures as the console and the report (`timing.ratio`)."""
        key = (s, seq, batch)
        if key not in self._speedups:
            r = self.by_series[s].get((seq, batch))
            base = self.by_series.get((self.baseline, s[1], s[2], self.base_variant.get(s, s[3])),
                                      {}).get((seq, batch))
            if r is None or base is None or not (r.ok and base.ok):
                self._speedups[key] = (None, False)
            else:
                sp = latency_ratio(base, r)
                self._speedups[key] = (sp, sp.crosses_one or base.high_spread or r.high_spread)
        return self._speedups[key]

    def device_text(self, env: Optional[dict]) -> str:
        """The device for a title: `record_devices` (records without a device_name take the
        environment's), with the records' device types."""
        kinds = record_devices(self.records, default=(env or {}).get("device_name"))
        if len(kinds) > 1:
            return mixed_devices(kinds)
        name = next(iter(kinds), None)
        if name and is_mixed(name):
            return str(name)
        types = {r.device for r in self.records}
        devices = ", ".join(sorted(types))
        return f"{devices} ({name})" if name and name not in {t.split(":")[0] for t in types} else devices

    def title_suffix(self, env: Optional[dict]) -> str:
        dims = sorted({r.dim for r in self.records})
        out = f"{self.device_text(env)} · {', '.join(self.dtypes)} · dim {', '.join(map(str, dims))}"
        if self.mode != "forward":
            out += f" · mode {self.mode}"
        if {r.level for r in self.records} == {"model"}:
            out += " · language models"
        if len(self.variants) == 1 and self.variants[0]:
            out += f" · variant {self.variants[0]}"
        return out


def _nan(v: Optional[float]) -> float:
    return math.nan if v is None else v


def _median_throughput(r: BenchmarkResult) -> float:
    tokens = r.tokens_per_call or r.batch_size * r.sequence_length
    return tokens / r.latency_median_ms * 1e3 if r.latency_median_ms else math.nan


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
        n = len(data.failed)
        parts = ", ".join(f"{k} {label}" for st, label in (("oom", "OOM"), ("error", "error"),
                                                          ("skipped", "skipped"))
                          if (k := sum(r.status == st for r in data.failed)))
        sub += (f"\n{n} failed or skipped config{'s' if n != 1 else ''} ({parts}): "
                "gaps in lines, hatched cells in heatmaps")
    # Wrap to the figure's width (a one-panel figure is narrow): about 11 bold characters per inch at 10 pt.
    width = max(40, int(fig.get_figwidth() * 11))
    lines = [w for part in f"{title}\n{sub}".split("\n") for w in textwrap.wrap(part, width) or [""]]
    fig.suptitle("\n".join(lines), fontsize=10, fontweight="bold")
    if handles and handles[0]:   # as many columns as fit the figure's width, at most 4
        per_col = (34 + 4.6 * max(len(label) for label in handles[1])) / 72   # inches at 8 pt
        ncols = max(1, min(4, len(handles[0]), int(fig.get_figwidth() * 0.95 / per_col)))
        fig.legend(*handles, loc="outside lower center", ncols=ncols, frameon=False)
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
                 logy: bool, series: Optional[list[Series]] = None, baseline_line: bool = False,
                 active_metric: Optional[str] = None):
    """One panel per batch size (x = seq) or per sequence length (x = batch), a line per series.

    Latency metrics get p10-p90 bars. With `active_metric`, each series is drawn twice: `metric`
    solid and `active_metric` dashed (where it differs), markers telling the series apart.
    """
    xs = data.seqs if x == "seq" else data.batches
    panels = data.batches if x == "seq" else data.seqs
    series = series if series is not None else list(data.by_series)
    fig = _new_figure(max(1, len(panels)))
    axes, _, _ = _grid(fig, max(1, len(panels)))
    handles: dict[str, object] = {}
    any_active = any_noisy = False
    for ax, p in zip(axes, panels):
        for s in series:
            def at(v, m=metric):
                return data.value(s, v, p, m) if x == "seq" else data.value(s, p, v, m)
            ys = [at(v) for v in xs]
            if all(math.isnan(y) for y in ys):
                continue
            st = data.marker_style(s) if active_metric else data.style(s)
            if metric == "speedup":     # 95% interval bars; noisy points hollow
                lo = [max(y - at(v, "speedup_lo"), 0.0) if not math.isnan(y) else math.nan
                      for v, y in zip(xs, ys)]
                hi = [max(at(v, "speedup_hi") - y, 0.0) if not math.isnan(y) else math.nan
                      for v, y in zip(xs, ys)]
                h = ax.errorbar(xs, ys, yerr=[lo, hi], capsize=2, elinewidth=0.8, **st)
                noisy = [(v, y) for v, y in zip(xs, ys) if not math.isnan(y)
                         and (data.speedup(s, v, p) if x == "seq" else data.speedup(s, p, v))[1]]
                if noisy:
                    ax.plot(*zip(*noisy), linestyle="none", marker=st["marker"], markerfacecolor="white",
                            markeredgecolor=st["color"], zorder=4)
                    any_noisy = True
            elif metric in ("latency", "latency_median"):   # p10-p90 bars: positive on a log axis
                lo = [max(y - at(v, "latency_p10"), 0.0) if not math.isnan(y) else math.nan
                      for v, y in zip(xs, ys)]
                hi = [max(at(v, "latency_p90") - y, 0.0) if not math.isnan(y) else math.nan
                      for v, y in zip(xs, ys)]
                h = ax.errorbar(xs, ys, yerr=[lo, hi], capsize=2, elinewidth=0.8, **st)
            else:
                (h,) = ax.plot(xs, ys, **st)
            handles[st["label"]] = h
            if active_metric:
                ya = [at(v, active_metric) for v in xs]
                differs = any(not math.isnan(a) and not math.isnan(t) and not math.isclose(a, t, rel_tol=1e-9)
                              for a, t in zip(ya, ys))
                if differs:
                    ax.plot(xs, ya, **{**st, "linestyle": "--", "markerfacecolor": "white", "label": None})
                    any_active = True
        if baseline_line:
            ax.axhline(1.0, color=MODEL_COLORS.get(data.baseline, "0.3"), linewidth=1, linestyle=":")
        _log2_axis(ax, xs)
        if logy:
            ax.set_yscale("log")
            _plain_log_ticks(ax.yaxis, *ax.get_ylim())
        ax.set_title(f"batch size {p}" if x == "seq" else f"{data.text['x']} {p}")
        ax.set_xlabel(f"{data.text['x']} (tokens, log2)" if x == "seq" else "batch size (log2)")
        ax.set_ylabel(ylabel)
    if not handles:
        axes[0].text(0.5, 0.5, "no successful configs to plot", ha="center", va="center",
                     transform=axes[0].transAxes, color="0.4")
    if any_noisy:
        from matplotlib.lines import Line2D

        handles["hollow: noisy (95% interval crosses 1, or high spread)"] = Line2D(
            [], [], color="0.3", linestyle="none", marker="o", markerfacecolor="white")
    if active_metric:
        from matplotlib.lines import Line2D

        handles["solid: per M total parameters"] = Line2D([], [], color="0.3", linestyle="-")
        handles["dashed, open markers: per M active parameters"
                + ("" if any_active else " (= total here)")] = Line2D(
            [], [], color="0.3", linestyle="--", marker="o", markerfacecolor="white")
    return _finish(fig, data, title, env, path, (list(handles.values()), list(handles)))


def _heatmap(ax, matrix, status, row_labels, col_labels, *, cmap, norm, fmt, cbar_label, fig,
             cbar_ticks=None, marks=frozenset()):
    """`marks`: (row, column) cells whose label gets a "~" (noisy)."""
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
                ax.text(j, i, fmt(v) + ("~" if (i, j) in marks else ""), ha="center", va="center", fontsize=6,
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
            row.append("n/a" if r is None else {"oom": "OOM", "error": "ERR", "skipped": "SKIP"}.get(r.status, "n/a"))
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
    t = data.text
    for k, (metric, cmap, label) in enumerate((("latency", "magma_r", f"{t['latency']} ({t['lat_unit']}, median)"),
                                               ("throughput", "viridis", f"{t['throughput']} ({t['tp_unit']}, median)"))):
        vals = [data.value(s, q, b, metric) for s in series for q in data.seqs for b in data.batches]
        finite = [v for v in vals if not math.isnan(v) and v > 0]
        norm = LogNorm(min(finite), max(finite)) if finite and min(finite) < max(finite) else None
        for i, s in enumerate(series):
            ax = fig.add_subplot(len(series), 2, 2 * i + k + 1)
            matrix = [[data.value(s, q, b, metric) for q in data.seqs] for b in data.batches]
            _heatmap(ax, matrix, _status_grid(data, s), data.batches, data.seqs, cmap=cmap, norm=norm,
                     fmt=_fmt_num, cbar_label=label, fig=fig)
            ax.set_title(f"{data.label(s)}: {metric}")
            ax.set_xlabel(f"{t['x']} (tokens)")
            ax.set_ylabel("batch size")
    return _finish(fig, data, "Latency and throughput of every configuration" + t["title"], env, path)


def _speedup_heatmaps_figure(data: _Data, env, path: Path) -> Path:
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    base = data.baseline
    series = [s for s in data.by_series if s[0] != base]
    title = (f"Speedup vs {base} (median of {base} latency / model latency; ~ hatched: noisy, "
             "95% interval crosses 1 or high spread)" + data.text["title"])
    vals = [data.value(s, q, b, "speedup") for s in series for q in data.seqs for b in data.batches]
    finite = [v for v in vals if not math.isnan(v) and v > 0]
    span = max([abs(math.log2(v)) for v in finite] + [0.1])
    norm = LogNorm(2 ** -span, 2 ** span)   # symmetric around 1x: red slower, blue faster
    fig = _new_figure(len(series), panel_w=0.55 * len(data.seqs) + 2.2,
                      panel_h=0.35 * len(data.batches) + 1.2)
    axes, _, _ = _grid(fig, len(series))
    for ax, s in zip(axes, series):
        matrix = [[data.value(s, q, b, "speedup") for q in data.seqs] for b in data.batches]
        noisy = {(i, j) for i, b in enumerate(data.batches) for j, q in enumerate(data.seqs)
                 if data.speedup(s, q, b)[1]}
        _heatmap(ax, matrix, _status_grid(data, s), data.batches, data.seqs, cmap="RdBu", norm=norm,
                 fmt=lambda v: f"{sig3(v)}x", marks=noisy, cbar_label="speedup (x, median, log scale)", fig=fig,
                 cbar_ticks=[2.0 ** k for k in range(-math.ceil(span), math.ceil(span) + 1)
                             if abs(k) <= span + 1e-9])
        for i, j in noisy:
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="..",
                                   edgecolor="0.35", linewidth=0))
        ax.set_title(data.label(s))
        ax.set_xlabel(f"{data.text['x']} (tokens)")
        ax.set_ylabel("batch size")
    return _finish(fig, data, title, env, path)


def _cache_tag(variant: str) -> str:
    """The cache part of a variant ("cache=full"); "" when the run used the default cache."""
    return next((t for t in variant_tags(variant) if t.startswith("cache=")), "")


def _cache_figure(data: _Data, env, path: Path) -> Path:
    """Decode cache (MiB) vs context, log-log, a panel per batch size; one line per (model, dtype,
    cache kind): backends and other variant tags (compile, cuda-graphs) hold the same cache, so
    their lines merge, and say which when they do not. A line hidden under an equal one of an
    earlier model is drawn thin on top of it."""
    groups: dict[tuple[str, str, str], list[Series]] = defaultdict(list)
    for s in data.by_series:
        groups[(s[0], s[2], _cache_tag(s[3]))].append(s)
    tags = sorted({k[2] for k in groups})
    tags_of = {m: {k[2] for k in groups if k[0] == m} for m in data.models}
    fig = _new_figure(max(1, len(data.batches)))
    axes, _, _ = _grid(fig, max(1, len(data.batches)))
    handles: dict[str, object] = {}
    for ax, b in zip(axes, data.batches):
        drawn: set[tuple] = set()
        for (model, dtype, tag), members in groups.items():
            curves: dict[tuple, list[Series]] = {}
            for s in members:
                ys = tuple(data.value(s, q, b, "cache_mib") for q in data.seqs)
                if not all(math.isnan(y) for y in ys):
                    curves.setdefault(tuple(None if math.isnan(y) else round(y, 9) for y in ys), []).append(s)
            for key, ss in curves.items():
                extra = ([", ".join(dict.fromkeys(f"{s[1]} {data.variant_name(s[3])}" for s in ss))]
                         if len(curves) > 1 else []) + ([dtype] if len(data.dtypes) > 1 else [])
                if len(tags_of[model]) > 1 or (tag and len(tags) > 1):
                    extra.append(tag or "cache=latent")
                label = model + (f" ({', '.join(extra)})" if extra else "")
                hidden = key in drawn
                drawn.add(key)
                (h,) = ax.plot(data.seqs, [math.nan if y is None else y for y in key], label=label,
                               color=data.color(model), linestyle=_LINESTYLES[tags.index(tag) % len(_LINESTYLES)],
                               marker=DTYPE_MARKERS.get(dtype, "D"), zorder=3 if hidden else 2,
                               linewidth=0.9 if hidden else None, markersize=2.5 if hidden else None)
                handles.setdefault(label, h)
        _log2_axis(ax, data.seqs)
        ax.set_yscale("log")
        _plain_log_ticks(ax.yaxis, *ax.get_ylim())
        ax.set_title(f"batch size {b}")
        ax.set_xlabel("context length (tokens, log2)")
        ax.set_ylabel("cache held (MiB, log)")
    if not handles:
        axes[0].text(0.5, 0.5, "no cache sizes recorded", ha="center", va="center",
                     transform=axes[0].transAxes, color="0.4")
    return _finish(fig, data, "Decode cache memory vs context length (whole batch: Mamba state, MLA K/V cache)",
                   env, path, (list(handles.values()), list(handles)))


def _param_sweep_figure(data: _Data, key: str, env, path: Path) -> Path:
    """Latency (top row) and throughput (bottom row) against the swept size `key`, a column per
    sequence length (at the run's largest batch size); a line per (model, backend, dtype,
    variant, the other swept sizes). Models without that size (Regular Mamba in an n_experts
    sweep) are left out."""
    batch = data.batches[-1]
    seqs = data.seqs[-4:]
    lines: dict[tuple, dict[int, dict[int, BenchmarkResult]]] = defaultdict(lambda: defaultdict(dict))
    for r in data.records:
        if key not in r.block_config or not r.ok or r.batch_size != batch:
            continue
        others = ", ".join(f"{k}={r.block_config[k]}" for k in data.sizes if k != key and k in r.block_config)
        lines[(r.model_name, r.backend, r.dtype, r.variant, others)][r.sequence_length][r.block_config[key]] = r
    fig = _new_figure(1)
    fig.set_size_inches(3.0 * len(seqs) + 0.6, 2.6 * 2 + 1.3)
    gs = fig.add_gridspec(2, len(seqs))
    handles: dict[str, object] = {}
    xs_all = sorted({v for line in lines.values() for per in line.values() for v in per})
    for col, seq in enumerate(seqs):
        for row, (metric, ylabel) in enumerate((("latency", f"{data.text['latency']} (ms, log)"),
                                               ("throughput", f"{data.text['throughput']} ({data.text['tp_unit']}, log)"))):
            ax = fig.add_subplot(gs[row, col])
            for i, (k, line) in enumerate(lines.items()):
                per = line.get(seq, {})
                xs = sorted(per)
                ys = [per[x].latency_ms if metric == "latency" else per[x].throughput_tokens_per_sec for x in xs]
                extra = [k[1]] + ([k[2]] if len(data.dtypes) > 1 else []) + ([k[3]] if k[3] else []) + ([k[4]] if k[4] else [])
                label = f"{k[0]} ({', '.join(extra)})"
                (h,) = ax.plot(xs, ys, marker=_MARKERS[i % len(_MARKERS)], color=data.color(k[0]),
                               linestyle=BACKEND_STYLES.get(k[1], ":"), label=label)
                handles.setdefault(label, h)
            if xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 8:
                ax.set_xscale("log", base=2)
                ax.set_xticks(xs_all)
                ax.set_xticklabels([str(v) for v in xs_all])
            ax.set_yscale("log")
            _plain_log_ticks(ax.yaxis, *ax.get_ylim())
            ax.set_title(f"L={seq}, batch {batch}")
            ax.set_xlabel(key)
            if col == 0:
                ax.set_ylabel(ylabel)
    return _finish(fig, data, f"Sweep over {key}: latency and throughput{data.text['title']}", env, path,
                   (list(handles.values()), list(handles)))


def _backend_figure(records: Sequence[BenchmarkResult], env, path: Path) -> Optional[Path]:
    """fast's median latency over each other backend's (mamba_ssm, reference), config by config
    (results.backend_pairs), against sequence length: one panel per (mode, other backend), a
    line per (model, batch size), bars the 95% interval, hollow markers where noisy; below the
    dotted line at 1 the fast backend is faster."""
    pairs = backend_pairs(records)
    if not pairs:
        return None
    panels = sorted({(f.mode, o.backend) for f, o in pairs}, key=lambda p: (MODES_ORDER.index(p[0])
                                                                             if p[0] in MODES_ORDER else 9, p[1]))
    fig = _new_figure(len(panels))
    axes, _, _ = _grid(fig, len(panels))
    handles = {}
    batches = sorted({f.batch_size for f, _ in pairs})
    markers = "osD^v<>"
    for ax, (mode, other) in zip(axes, panels):
        lines: dict[tuple, list] = defaultdict(list)
        for f, o in pairs:
            if (f.mode, o.backend) == (mode, other):
                rt = latency_ratio(f, o)
                lines[(f.model_name, f.batch_size)].append((f.sequence_length, rt, rt.crosses_one or f.high_spread
                                                            or o.high_spread))
        for (model, batch), pts in sorted(lines.items()):
            pts.sort(key=lambda p: p[0])
            xs = [p[0] for p in pts]
            ys = [p[1].value for p in pts]
            err = [[p[1].value - p[1].lo for p in pts], [p[1].hi - p[1].value for p in pts]]
            color = MODEL_COLORS.get(model, "#555555")
            m = markers[batches.index(batch) % len(markers)]
            label = f"{model}, batch {batch}"
            h = ax.errorbar(xs, ys, yerr=err, color=color, marker=m, ms=4, lw=1.2, capsize=2, label=label)
            handles.setdefault(label, h)
            noisy = [(x, y) for (x, _, n), y in zip(pts, ys) if n]
            if noisy:
                ax.plot(*zip(*noisy), ls="none", marker=m, ms=7, mfc="white", mec=color)
        ax.axhline(1.0, color="#444444", ls=":", lw=1)
        ax.set_yscale("log")
        _plain_log_ticks(ax.yaxis, *ax.get_ylim())
        _log2_axis(ax, sorted({f.sequence_length for f, o in pairs if (f.mode, o.backend) == (mode, other)}))
        ax.set_title(f"{mode}: {REFERENCE_SIDE} / {other}")
        ax.set_xlabel("sequence length")
        ax.set_ylabel(f"latency {REFERENCE_SIDE} / {other}\n(median; bars 95% CI; log)")
    data = _Data(list(records))
    return _finish(fig, data, f"{REFERENCE_SIDE} against the other backends (< 1: {REFERENCE_SIDE} is faster; "
                              "hollow: noisy)", env, path, (list(handles.values()), list(handles)))


def _spec_plots(data: _Data, env, f: dict[str, Path]) -> list[Path]:
    """The spec's eight plots of one mode's records (labels say what latency means in that mode);
    the two speedup plots only when the run holds the baseline and another model (no placeholder)."""
    t = data.text
    cap = lambda v: v[:1].upper() + v[1:]   # noqa: E731
    sep = " " if data.mode == "forward" else "\n"   # the spec's labels stay one line
    lat_label = f"{t['latency']}{sep}({t['lat_unit']}, median; bars p10-p90)"
    tp_label = f"{t['throughput']}{sep}({t['tp_unit']}, median, log)"
    base = data.baseline
    others = [s for s in data.by_series if s[0] != base]
    has_base = any(s[0] == base for s in data.by_series)
    speedup = has_base and others
    paths = [
        _line_figure(data, x="seq", metric="latency", ylabel=lat_label, logy=True, env=env,
                     title=f"{cap(t['latency'])} vs {t['x']}{t['title']}", path=f["latency_vs_seq_len"]),
        _line_figure(data, x="seq", metric="throughput", ylabel=tp_label, logy=True, env=env,
                     title=f"{cap(t['throughput'])} vs {t['x']}{t['title']}", path=f["throughput_vs_seq_len"]),
        _line_figure(data, x="batch", metric="latency", ylabel=lat_label, logy=True, env=env,
                     title=f"{cap(t['latency'])} vs batch size{t['title']}", path=f["latency_vs_batch"]),
        _line_figure(data, x="batch", metric="throughput", ylabel=tp_label, logy=True, env=env,
                     title=f"{cap(t['throughput'])} vs batch size{t['title']}", path=f["throughput_vs_batch"]),
        _line_figure(data, x="seq", metric="speedup", series=others, baseline_line=True,
                     ylabel=f"speedup vs {base}\n(x, median; bars 95% CI; log)", logy=True,
                     title=f"Speedup vs {base} (> 1 is faster; dotted line = {base})" + t["title"],
                     env=env, path=f["speedup"])
        if speedup else None,
        _line_figure(data, x="seq", metric="efficiency", active_metric="efficiency_active",
                     ylabel=f"{t['tp_unit']}{sep}per million parameters (log)", logy=True, env=env,
                     title="Scaling efficiency: throughput per parameter (total and active)" + t["title"],
                     path=f["efficiency"]),
        _heatmaps_figure(data, env, f["heatmaps"]),
        _speedup_heatmaps_figure(data, env, f["speedup_heatmaps"]) if speedup else None,
    ]
    return [p for p in paths if p is not None]


def plot_benchmark_results(results: Sequence[BenchmarkResult], output_dir: str | Path = "benchmark_plots",
                           env: Optional[dict] = None) -> list[Path]:
    """Draw the plots of `results` into `output_dir` as 300 DPI PNGs; returns their paths.

    The spec's eight (of the forward records, else of the run's one mode: see the module
    docstring; the two speedup plots only where the run holds the baseline, Regular Mamba or
    Mamba LM, and another model), then decode_latency_vs_context.png and cache_memory_vs_context.png when there are
    decode records and train_step_time_vs_seq.png when there are train records.
    """
    import matplotlib

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_mode: dict[str, list[BenchmarkResult]] = defaultdict(list)
    for r in results:
        by_mode[r.mode].append(r)
    spec_mode = _mode_of(list(results))
    data = _Data(by_mode.get(spec_mode, []), spec_mode)
    f = {k: out / v for k, v in PLOT_FILES.items()}
    m = {k: out / v for k, v in MODE_PLOT_FILES.items()}
    with matplotlib.rc_context(STYLE):
        if not data.records:
            return []
        paths = _spec_plots(data, env, f)
        paths += [_param_sweep_figure(data, key, env, out / SWEEP_PLOT_FILE.format(key)) for key in data.sizes
                  if key.replace("_", "").isalnum()]
        if by_mode.get("decode"):
            dec = data if spec_mode == "decode" else _Data(by_mode["decode"], "decode")
            paths += [
                _line_figure(dec, x="seq", metric="latency_median", logy=True, env=env,
                             ylabel="latency per generated token\n(ms, median; bars p10-p90)",
                             title="Decode latency per generated token vs context length",
                             path=m["decode_latency"]),
                _cache_figure(dec, env, m["cache_memory"]),
            ]
        if by_mode.get("train"):
            tr = data if spec_mode == "train" else _Data(by_mode["train"], "train")
            step = ("forward + backward" + (" + AdamW" if all("adamw" in variant_tags(v) for v in tr.variants)
                                            else " (+ AdamW where the variant says adamw)"
                                            if any("adamw" in variant_tags(v) for v in tr.variants) else ""))
            paths.append(_line_figure(tr, x="seq", metric="latency_median", logy=True, env=env,
                                      ylabel="training step time\n(ms, median; bars p10-p90)",
                                      title=f"Training step time vs sequence length (step = {step})",
                                      path=m["train_step"]))
        backend_fig = _backend_figure(results, env, out / BACKEND_PLOT_FILE)
        if backend_fig is not None:
            paths.append(backend_fig)
        energy = [r for r in data.records if r.ok and r.energy_per_token_j is not None]
        if energy:
            en = _Data(energy)
            src = ", ".join(sorted({r.energy_source for r in energy}))
            paths.append(_line_figure(en, x="seq", metric="energy_mj_per_token", logy=True, env=env,
                                      ylabel="energy per token\n(mJ, log)",
                                      title=f"Energy per token vs sequence length ({src}: the whole "
                                            f"device's energy over back-to-back calls after the timed runs){en.text['title']}",
                                      path=out / ENERGY_PLOT_FILE))
    return paths
