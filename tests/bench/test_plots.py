import math

import pytest

from mamba_decoder.bench.plots import PLOT_FILES, _Data
from mamba_decoder.bench.results import BenchmarkResult

from .conftest import make_record, png_dpi


def test_eight_plots_at_300_dpi(tiny_run):
    pngs = sorted(tiny_run.glob("*.png"))
    assert [p.name for p in pngs] == sorted(PLOT_FILES.values())
    assert len(pngs) == 8
    for p in pngs:
        x, y = png_dpi(p)
        assert x == pytest.approx(300, abs=0.5) and y == pytest.approx(300, abs=0.5), p.name


def test_failed_configs_are_gaps_not_zeros(tmp_path):
    recs = [make_record("Regular Mamba", seq=8), make_record("MLABlock", seq=8, samples=[2.0]),
            make_record("Regular Mamba", seq=16),
            BenchmarkResult.failed("oom", "out of memory", model_name="MLABlock", sequence_length=16,
                                   batch_size=1, dim=32, backend="reference", dtype="float32", device="cpu")]
    d = _Data(recs)
    s = ("MLABlock", "reference", "float32", "")
    assert math.isnan(d.value(s, 16, 1, "latency")) and math.isnan(d.value(s, 16, 1, "speedup"))
    assert d.value(s, 8, 1, "speedup") == pytest.approx(1.0 / 2.0, rel=0.05)
    # rendering with a failed config is covered by tiny_run (MLABlock seq 16 batch 2 is OOM)


def test_plot_files_have_content(tiny_run):
    for p in tiny_run.glob("*.png"):
        assert p.stat().st_size > 20_000, p.name


def test_plots_import_matplotlib_lazily():
    import subprocess
    import sys

    code = ("import sys, mamba_decoder, mamba_decoder.bench.plots, mamba_decoder.bench.cli, "
            "mamba_decoder.bench.runner; print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- decode / train plots
H100 = "NVIDIA H100 80GB HBM3"
MAMBA_STATE = 3 * 64 * 16 * 4   # bytes: Mamba's decode state does not grow with the context


def _decode(model, ctx, lat, **kw):
    cache = MAMBA_STATE if model != "MLABlock" else ctx * (512 + 64) * 4
    return make_record(model, seq=ctx, samples=[lat * 0.9, lat, lat * 1.1], mode="decode", tokens_per_call=1,
                       cache_bytes=cache, prefill_ms=lat * ctx, device="cuda", device_name=H100, **kw)


def _train(model, seq, lat, **kw):
    return make_record(model, seq=seq, samples=[lat * 0.9, lat, lat * 1.1], mode="train", variant="adamw",
                       tokens_per_call=seq, device="cuda", device_name=H100, **kw)


@pytest.fixture
def figures(monkeypatch):
    """Every figure plot_benchmark_results saves, by file name: (figure, title) to inspect."""
    from mamba_decoder.bench import plots

    seen = {}
    real = plots._finish

    def capture(fig, data, title, env, path, handles=None):
        seen[path.name] = (fig, title)
        return real(fig, data, title, env, path, handles)
    monkeypatch.setattr(plots, "_finish", capture)
    return seen


def _lines(fig, ax_index=0):
    """{legend label: y values} of one panel's labelled lines (plain or with error bars)."""
    ax = fig.axes[ax_index]
    out = {ln.get_label(): list(ln.get_ydata()) for ln in ax.get_lines() if not ln.get_label().startswith("_")}
    out.update({c.get_label(): list(c.lines[0].get_ydata()) for c in ax.containers if c.get_label()})
    return out


def test_mode_plots_at_300_dpi_from_their_own_records(tmp_path, figures):
    from mamba_decoder.bench.plots import MODE_PLOT_FILES, plot_benchmark_results

    fwd = [make_record("Regular Mamba", seq=s, samples=[5.0 * s / 8], device="cuda", device_name=H100)
           for s in (8, 16)]
    dec = [_decode(m, c, lat) for m, base in (("Regular Mamba", 0.5), ("MLABlock", 0.8))
           for c, lat in ((8, base), (16, base * 1.5))]
    trn = [_train("MambaDecoderBlock", s, 3.0 * s / 8) for s in (8, 16)]
    paths = plot_benchmark_results(fwd + dec + trn, tmp_path)
    # the forward records hold Regular Mamba alone: no speedup plots (5, 8), never a placeholder
    assert [p.name for p in paths] == [v for k, v in PLOT_FILES.items() if "speedup" not in k] \
        + list(MODE_PLOT_FILES.values())
    assert not (tmp_path / PLOT_FILES["speedup"]).exists()
    for p in paths:
        assert p.is_file() and png_dpi(p) == pytest.approx((300, 300), abs=0.5), p.name

    # the spec's eight show the forward records only: their values, their labels
    fig, title = figures["1_latency_vs_sequence_length.png"]
    assert title == "Latency vs sequence length" and "NVIDIA H100 80GB HBM3" in fig._suptitle.get_text()
    assert _lines(fig) == {"Regular Mamba (reference)": pytest.approx([5.0, 10.0])}
    assert fig.axes[0].get_ylabel() == "latency (ms, median; bars p10-p90)"

    fig, _ = figures[MODE_PLOT_FILES["decode_latency"]]
    assert "per generated token" in fig.axes[0].get_ylabel()
    assert fig.axes[0].get_xlabel() == "context length (tokens, log2)"
    assert _lines(fig) == {"Regular Mamba (reference)": pytest.approx([0.5, 0.75]),
                           "MLABlock (reference)": pytest.approx([0.8, 1.2])}   # medians

    fig, _ = figures[MODE_PLOT_FILES["cache_memory"]]
    cache = _lines(fig)
    assert cache["Regular Mamba"] == pytest.approx([MAMBA_STATE / 2 ** 20] * 2)            # flat
    assert cache["MLABlock"] == pytest.approx([8 * 576 * 4 / 2 ** 20, 16 * 576 * 4 / 2 ** 20])  # grows
    assert fig.axes[0].get_yscale() == "log" and fig.axes[0].get_xscale() == "log"

    fig, title = figures[MODE_PLOT_FILES["train_step"]]
    assert "forward + backward + AdamW" in title and "variant adamw" in fig._suptitle.get_text()
    assert _lines(fig) == {"MambaDecoderBlock (reference)": pytest.approx([3.0, 6.0])}


def test_decode_only_run_draws_the_eight_per_token(tmp_path, figures):
    from mamba_decoder.bench.plots import MODE_PLOT_FILES, plot_benchmark_results

    dec = [_decode(m, 8, lat) for m, lat in (("Regular Mamba", 0.5), ("MLABlock", 1.0))]
    paths = plot_benchmark_results(dec, tmp_path)
    assert [p.name for p in paths] == list(PLOT_FILES.values()) + list(MODE_PLOT_FILES.values())[:2]
    fig, title = figures["1_latency_vs_sequence_length.png"]
    assert title == "Latency per generated token vs context length (decode)"
    assert fig.axes[0].get_ylabel().startswith("latency per generated token")
    assert "mode decode" in fig._suptitle.get_text()
    fig, _ = figures["5_speedup_vs_regular_mamba.png"]
    assert _lines(fig) == {"MLABlock (reference)": pytest.approx([0.5])}


def test_efficiency_plot_shows_total_and_active_parameters(tmp_path, figures):
    from mamba_decoder.bench.plots import plot_benchmark_results

    recs = [make_record("Regular Mamba", samples=[1.0], num_parameters=2_000_000, active_parameters=2_000_000),
            make_record("MambaDecoderBlock", samples=[2.0], num_parameters=8_000_000, active_parameters=4_000_000)]
    plot_benchmark_results(recs, tmp_path)
    fig, title = figures[PLOT_FILES["efficiency"]]
    ax = fig.axes[0]
    by = [(ln.get_color(), ln.get_linestyle(), ln.get_ydata()[0]) for ln in ax.get_lines()
          if len(ln.get_ydata()) == 1]
    # 8 tokens / 1 ms = 8000 tokens/s over 2M params; 4000 tokens/s over 8M total and 4M active
    assert ("#0072B2", "-", pytest.approx(4000.0)) in by
    assert ("#D55E00", "-", pytest.approx(500.0)) in by and ("#D55E00", "--", pytest.approx(1000.0)) in by
    assert not any(c == "#0072B2" and ls == "--" for c, ls, _ in by)   # active == total: one line
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "solid: per M total parameters" in legend
    assert "dashed, open markers: per M active parameters" in legend


def test_titles_name_the_device_and_say_when_mixed():
    rec = dict(device="cuda")
    one = _Data([make_record(device_name=H100, **rec), make_record(seq=16, device_name=H100, **rec)])
    assert one.title_suffix(None).startswith(f"cuda ({H100}) · float32 · dim 32")
    mixed = _Data([make_record(device_name=H100, **rec), make_record(seq=16, device_name="NVIDIA A100", **rec)])
    assert mixed.title_suffix(None).startswith(f"MIXED DEVICES: NVIDIA A100, {H100} · float32")
    fallback = _Data([make_record()])          # no device_name on the record: the environment's
    assert fallback.title_suffix({"device_name": "Xeon"}).startswith("cpu (Xeon) · float32")
    assert fallback.title_suffix(None).startswith("cpu · float32")


def test_legend_names_backend_and_variant_when_several():
    d = _Data([make_record("MLABlock", mode="decode", variant=v, backend=b)
               for v in ("", "cache=full") for b in ("reference", "fast")])
    assert sorted(d.label(s) for s in d.by_series) == [
        "MLABlock (fast, cache=full)", "MLABlock (fast, default)",
        "MLABlock (reference, cache=full)", "MLABlock (reference, default)"]
    styles = {s: d.style(s) for s in d.by_series}
    assert len({(st["linestyle"], st["marker"]) for st in styles.values()}) == 4   # all tell apart


def test_train_only_run_draws_the_eight_as_step_time(tmp_path, figures):
    from mamba_decoder.bench.plots import MODE_PLOT_FILES, plot_benchmark_results

    paths = plot_benchmark_results([_train("Regular Mamba", 8, 2.0), _train("MLABlock", 8, 4.0)], tmp_path)
    assert [p.name for p in paths] == list(PLOT_FILES.values()) + [MODE_PLOT_FILES["train_step"]]
    fig, title = figures["1_latency_vs_sequence_length.png"]
    assert title == "Training step time vs sequence length (train step)"
    assert _lines(fig) == {"Regular Mamba (reference)": pytest.approx([2.0]),
                           "MLABlock (reference)": pytest.approx([4.0])}


def test_speedup_plot_draws_the_median_with_interval_bars_and_hollow_noisy_points(tmp_path, figures):
    """Issue 14: plot 5 is the same median speedup as the console, with its 95% interval; a noisy
    one (interval crossing 1) is hollow; the heatmap marks it too."""
    from mamba_decoder.bench.plots import PLOT_FILES, plot_benchmark_results

    rounds = [0, 0, 1, 1, 2, 2, 3, 3]
    recs = []
    for seq, model_ms in ((8, [0.5, 0.5, 0.52, 0.48, 0.5, 0.51, 0.49, 0.5]),      # clean 2x
                          (16, [1.0, 1.1, 0.9, 1.2, 0.8, 1.0, 1.05, 0.95])):     # noisy ~1x
        recs.append(make_record("Regular Mamba", seq=seq, samples=[1.0, 1.0, 1.02, 0.98, 1.0, 1.01, 0.99, 1.0],
                                sample_rounds=rounds, rounds_id=f"s{seq}"))
        recs.append(make_record("MambaDecoderBlock", seq=seq, samples=model_ms, sample_rounds=rounds,
                                rounds_id=f"s{seq}"))
    paths = plot_benchmark_results(recs, tmp_path)
    assert len(paths) == 8
    fig, _ = figures[PLOT_FILES["speedup"]]
    ax = fig.axes[0]
    (bars,) = ax.containers
    assert list(bars.lines[0].get_ydata()) == pytest.approx([2.0, 1.0], abs=0.05)
    assert "median" in ax.get_ylabel() and "95% CI" in ax.get_ylabel()
    hollow = [ln for ln in ax.get_lines() if ln.get_markerfacecolor() == "white"]
    assert len(hollow) == 1 and list(hollow[0].get_xdata()) == [16]
    fig, _ = figures[PLOT_FILES["speedup_heatmaps"]]
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert any(t.endswith("x~") for t in labels) and any(t.endswith("x") and "~" not in t for t in labels)
