"""Energy of the timed region (bench/energy.py): RAPL where readable, else no figure; peak RSS;
the record's per-call and per-token figures, the report's columns and the energy plot (issue 16)."""
import pytest

from mamba_decoder.bench import energy
from mamba_decoder.bench.energy import EnergyMeter, EnergyReading, energy_fields

from .conftest import make_record


def _rapl(root, *values, max_range=None):
    for i, v in enumerate(values):
        d = root / f"intel-rapl:{i}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "energy_uj").write_text(str(v))
        (d / "max_energy_range_uj").write_text(str(max_range or 10 ** 12))
        sub = root / f"intel-rapl:{i}:0"      # a sub-domain (core): counted in its package already
        sub.mkdir(exist_ok=True)
        (sub / "energy_uj").write_text("999999999")


def test_rapl_packages_summed_with_wraparound(tmp_path, monkeypatch):
    monkeypatch.setattr(energy, "RAPL_ROOT", tmp_path)
    _rapl(tmp_path, 1_000_000, 9_000_000, max_range=10_000_000)
    m = EnergyMeter("cpu")
    m.start()
    _rapl(tmp_path, 3_500_000, 500_000, max_range=10_000_000)    # package 1 wrapped
    e = m.stop()
    assert e.source == "rapl" and e.joules == pytest.approx(2.5 + 1.5)
    assert e.watts == pytest.approx(e.joules / e.seconds)


def test_a_wrapped_counter_with_an_unreadable_range_gives_no_figure(tmp_path, monkeypatch):
    """A wrap needs max_energy_range_uj; where it cannot be read the region has no energy figure
    (never a guess, never an error that costs the config its record)."""
    monkeypatch.setattr(energy, "RAPL_ROOT", tmp_path)
    _rapl(tmp_path, 9_000_000)
    m = EnergyMeter("cpu")
    m.start()
    _rapl(tmp_path, 500_000)                                      # wrapped
    (tmp_path / "intel-rapl:0" / "max_energy_range_uj").unlink()
    e = m.stop()
    assert e.joules is None and e.source is None


def test_no_counter_no_figure(tmp_path, monkeypatch):
    monkeypatch.setattr(energy, "RAPL_ROOT", tmp_path / "absent")
    m = EnergyMeter("cpu")
    m.start()
    e = m.stop()
    assert e.joules is None and e.source is None and e.watts is None
    assert energy_fields(e, 10, 64)["energy_per_token_j"] is None


def test_peak_rss_of_the_region():
    m = EnergyMeter("cpu")
    m.start()
    block = bytearray(64 * 2 ** 20)            # 64 MB touched inside the region
    block[::4096] = b"x" * len(block[::4096])
    e = m.stop()
    if e.peak_rss_mb is None:
        pytest.skip("/proc/self/clear_refs is not writable here")
    assert e.peak_rss_mb >= 64
    del block


def test_energy_fields_per_call_and_token():
    f = energy_fields(EnergyReading(joules=12.0, seconds=2.0, source="nvml", peak_rss_mb=100.0), 6, 1024)
    assert f == dict(energy_j=12.0, energy_per_call_j=2.0, energy_per_token_j=2.0 / 1024, avg_power_w=6.0,
                     energy_source="nvml", host_peak_rss_mb=100.0)


def test_report_and_plot_show_energy(tmp_path, monkeypatch):
    from mamba_decoder.bench import plots
    from mamba_decoder.bench.plots import ENERGY_PLOT_FILE, plot_benchmark_results
    monkeypatch.setattr(plots, "DPI", 30)   # what is drawn, not how finely
    from mamba_decoder.bench.report import summary_table
    recs = [make_record(m, seq=q, energy_j=1.0, energy_per_call_j=0.25, energy_per_token_j=0.25 / q,
                        avg_power_w=300.0, energy_source="nvml") for m in ("Regular Mamba", "MLABlock")
            for q in (8, 16)]
    table = summary_table(recs)
    assert "mJ/token" in table and "Avg W" in table and "31.2" in table   # 0.25 J / 8 tokens
    assert tmp_path / ENERGY_PLOT_FILE in plot_benchmark_results(recs, tmp_path)
    assert tmp_path / "none" / ENERGY_PLOT_FILE not in plot_benchmark_results([make_record()], tmp_path / "none")


def test_nvml_counter_in_millijoules(monkeypatch):
    """The CUDA path on a fake NVML (the counter in mJ since the driver loaded)."""
    import sys
    import types

    import torch
    counter = iter([1_000_000, 1_004_500])
    fake = types.SimpleNamespace(nvmlDeviceGetTotalEnergyConsumption=lambda h: next(counter))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(energy, "_nvml_handle", lambda device: "handle")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    m = EnergyMeter("cuda:0")
    m.start()
    e = m.stop()
    assert e.source == "nvml" and e.joules == pytest.approx(4.5)


def test_a_config_gets_its_energy_from_one_window_not_from_its_rounds(monkeypatch):
    """A counter that moves in 100 ms steps (NVML's coarsest) read around blocks of two short calls
    gives nonsense (an H100 run: 110 W and 1385 W on a 700 W card); read around one window of
    back-to-back calls after the rounds, it gives the power the counter was fed."""
    import time
    from pathlib import Path

    from mamba_decoder.bench.runner import run_sweep
    from mamba_decoder.bench.settings import SweepSettings

    watts, step = 50.0, 0.1

    def counter(self):   # uJ, as RAPL: the energy at the last 100 ms step
        return [int((time.perf_counter() // step) * step * watts * 1e6)]
    monkeypatch.setattr(energy, "_rapl_domains", lambda: [Path("fake")])
    monkeypatch.setattr(EnergyMeter, "_read", counter)
    monkeypatch.setattr(energy, "ENERGY_WINDOW_S", 1.0, raising=False)
    from mamba_decoder.bench import runner
    monkeypatch.setattr(runner, "ENERGY_WINDOW_S", 1.0, raising=False)
    s = SweepSettings(device="cpu", dim=16, sequence_lengths=[8], batch_sizes=[1], models=["Regular Mamba"],
                      warmup=1, runs=6)
    (r,) = run_sweep(s, progress=False)
    assert r.energy_source == "rapl" and r.avg_power_w == pytest.approx(watts, rel=0.15)
    assert r.energy_per_call_j == pytest.approx(r.energy_j / round(r.energy_j / r.energy_per_call_j))
    decode = run_sweep(s.model_copy(update={"mode": "decode"}), progress=False)[0]
    assert decode.ok and decode.energy_j is None          # no window for a decode session: no figure
