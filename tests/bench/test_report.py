import json
import re

import pytest

from mamba_decoder.bench.report import (banner, comparison_table, format_line, speedups,
                                        summary_table)
from mamba_decoder.bench.results import BenchmarkResult

from .conftest import FAILED_RE, LINE_RE, make_record

SPEC_LINES = [
    "Regular Mamba              | SeqLen:  128 | Batch:  1 | Latency:  12.34±0.56 ms | Throughput:  10368.42 tokens/s | Params: 2.45M",
    "MambaDecoderBlock          | SeqLen:  128 | Batch:  1 | Latency:  15.67±0.78 ms | Throughput:   8168.23 tokens/s | Params: 3.21M",
    "MLABlock                   | SeqLen:  128 | Batch:  1 | Latency:  18.92±1.12 ms | Throughput:   6764.89 tokens/s | Params: 4.12M",
]
SPEC_BANNER = """\
====================================================================================================
COMPREHENSIVE BENCHMARKING SUITE
====================================================================================================
Device: cuda
Model Dimension: 512
Sequence Lengths: [128, 256, 512, 1024, 2048]
Batch Sizes: [1, 2, 4, 8]
====================================================================================================
"""


@pytest.mark.parametrize("line", SPEC_LINES)
def test_spec_lines_match_regex(line):
    assert LINE_RE.match(line)


@pytest.mark.parametrize("line,values", list(zip(SPEC_LINES, [
    ("Regular Mamba", 12.34, 0.56, 10368.42, 2_450_000), ("MambaDecoderBlock", 15.67, 0.78, 8168.23, 3_210_000),
    ("MLABlock", 18.92, 1.12, 6764.89, 4_120_000)])))
def test_format_line_reproduces_spec_exactly(line, values):
    name, lat, std, tp, params = values
    r = BenchmarkResult(model_name=name, sequence_length=128, batch_size=1, latency_ms=lat,
                        latency_std_ms=std, throughput_tokens_per_sec=tp, num_parameters=params,
                        dim=512, backend="reference", dtype="float32", device="cuda")
    assert format_line(r) == line


def test_banner_is_the_spec_banner():
    assert banner("cuda", 512, [128, 256, 512, 1024, 2048], [1, 2, 4, 8]) == SPEC_BANNER
    extended = banner("cpu", 64, [8], [1], backends=["reference"], dtypes=["float32"], threads=2,
                      kernels={"MLABlock (reference, float32)": {"attn": "absorb-einsum"}})
    assert "Backend: reference\nDtype: float32\nCPU Threads: 2\n" in extended
    assert "Kernels MLABlock (reference, float32): attn=absorb-einsum" in extended


def test_failed_and_noisy_lines():
    oom = BenchmarkResult.failed("oom", "CUDA out of memory", model_name="MLABlock", sequence_length=2048,
                                 batch_size=8, dim=512, backend="reference", dtype="float32", device="cuda")
    line = format_line(oom)
    assert FAILED_RE.match(line) and line.endswith("| OOM: CUDA out of memory")
    noisy = make_record(samples=[1.0, 2.0, 3.0, 4.0])
    m = LINE_RE.match(format_line(noisy))
    assert m and m["spread"] and "IQR 60% of median" in m["spread"]
    assert LINE_RE.match(format_line(make_record(samples=[1.0, 1.0, 1.01])))["spread"] is None


def test_speedup_relative_to_regular_mamba():
    rm = make_record("Regular Mamba", samples=[10.0])
    fast = make_record("MambaDecoderBlock", samples=[5.0])
    slow = make_record("MLABlock", samples=[40.0])
    sp = dict((r.model_name, s) for r, s in speedups([rm, fast, slow]))
    assert sp == {"MambaDecoderBlock": pytest.approx(2.0), "MLABlock": pytest.approx(0.25)}
    text = comparison_table([rm, fast, slow])
    assert "2.00x" in text and "0.250x" in text   # three significant digits
    table = summary_table([rm, fast, slow])
    assert "MambaDecoderBlock" in table and "10.00±0.00" in table


def _columns(table: str) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a summary table, cells split on runs of 2+ spaces."""
    import re

    lines = table.splitlines()[1:]   # after "SUMMARY"
    split = [re.split(r" {2,}", ln.strip()) for ln in lines if not set(ln) <= {"-", " "}]
    return split[0], split[1:]


def test_summary_shows_compute_columns_for_forward_and_train():
    r = make_record(samples=[2.0], tflops_per_sec=1.234, mfu=0.0567)
    n = make_record(seq=16, samples=[2.0])            # no FLOPs measured: n/a
    header, rows = _columns(summary_table([r, n]))
    assert header[-4:] == ["TFLOP/s", "MFU %", "Params tot/act", "Status"] and "GB/s" not in header
    assert rows[0][header.index("TFLOP/s")] == "1.234" and rows[0][header.index("MFU %")] == "5.7"
    assert rows[1][header.index("TFLOP/s")] == "n/a"
    header, _ = _columns(summary_table([make_record()]))
    assert "TFLOP/s" not in header and "MFU %" not in header   # absent when no record has them


def test_summary_shows_decode_columns():
    d = make_record("MLABlock", seq=128, mode="decode", tokens_per_call=1, gb_per_sec=45.67, prefill_ms=3.21,
                    cache_bytes=3 * 2 ** 20, tflops_per_sec=0.5, mfu=0.01)
    header, rows = _columns(summary_table([d]))
    assert header[1] == "Context" and "TFLOP/s" not in header
    cells = dict(zip(header, rows[0]))
    assert (cells["GB/s"], cells["Prefill ms"], cells["Cache MiB"]) == ("45.7", "3.21", "3.00")
    # a mixed run: each record fills its own mode's columns, "-" in the other's; labels name the mode
    f = make_record(tflops_per_sec=1.0, mfu=0.5)
    header, rows = _columns(summary_table([f, d]))
    assert header[1] == "SeqLen"
    fwd, dec = (dict(zip(header, row)) for row in rows)
    assert fwd["Model"] == "Regular Mamba (forward)" and dec["Model"] == "MLABlock (decode)"
    assert (fwd["MFU %"], fwd["GB/s"], dec["MFU %"], dec["Cache MiB"]) == ("50.0", "-", "-", "3.00")


def test_summary_failed_rows_keep_the_columns():
    ok = make_record(tflops_per_sec=1.0, mfu=0.1)
    bad = BenchmarkResult.failed("oom", "out of memory", model_name="MLABlock", sequence_length=8, batch_size=1,
                                 dim=32, backend="reference", dtype="float32", device="cpu")
    header, rows = _columns(summary_table([ok, bad]))
    assert len(rows[1]) == len(header) and rows[1][-1] == "OOM: out of memory"


def _run_dir(d, device_name=None, env=None, scale=1.0):
    import json

    from mamba_decoder.bench.results import RecordWriter

    d.mkdir()
    base = [10.0, 10.2, 9.9, 10.1, 10.05, 9.95, 10.15, 10.0, 9.85, 10.1]
    with RecordWriter(d / "results.jsonl", "w") as w:
        w.write(make_record(samples=[x * scale for x in base], device_name=device_name))
    if env is not None:
        (d / "environment.json").write_text(json.dumps(env))
    return d


def test_compare_warns_when_devices_differ(tmp_path):
    from mamba_decoder.bench.report import compare_runs

    a = _run_dir(tmp_path / "a", "NVIDIA H100 80GB HBM3")
    b = _run_dir(tmp_path / "b", "NVIDIA A100-SXM4-80GB", scale=1.3)
    text, regressed = compare_runs(a, b)
    assert text.splitlines()[0] == ("warning: comparing different devices: "
                                    "base NVIDIA H100 80GB HBM3, new NVIDIA A100-SXM4-80GB")
    assert regressed   # the verdict is unchanged by the warning
    text, regressed = compare_runs(a, a)
    assert text.startswith("COMPARE") and not regressed
    # no device_name on the records: environment.json's device_name, else its device
    c = _run_dir(tmp_path / "c", env={"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3"})
    d = _run_dir(tmp_path / "d", env={"device": "cpu"})
    assert compare_runs(a, c)[0].startswith("COMPARE")
    text, regressed = compare_runs(c, d)
    assert text.splitlines()[0] == "warning: comparing different devices: base NVIDIA H100 80GB HBM3, new cpu"
    assert not regressed


def test_compare_across_backends_pairs_configs_and_flags_the_slower_one(tmp_path):
    from mamba_decoder.bench.report import compare_runs
    from mamba_decoder.bench.results import RecordWriter

    from .conftest import make_record

    for name, backend, ms in (("fast", "fast", 1.0), ("ref", "reference", 3.0)):
        (tmp_path / name).mkdir()
        with RecordWriter(tmp_path / name / "results.jsonl", "w") as w:
            w.write(make_record(backend=backend, samples=(ms, ms * 1.01, ms * 0.99, ms) * 3))
    # every record differs in backend alone: compared across it, and the output says so
    text, regressed = compare_runs(tmp_path / "fast", tmp_path / "ref")
    assert regressed and "differ only in backend" in text and "fast -> reference" in text
    text, regressed = compare_runs(tmp_path / "fast", tmp_path / "ref", ignore=["backend"])
    assert regressed and "fast -> reference" in text and "SLOWER (regression)" in text
    assert "differ only in" not in text
    g = json.loads(compare_runs(tmp_path / "fast", tmp_path / "ref", fmt="json")[0])["geomean"]
    assert g["configs"] == 1 and g["lo"] <= g["ratio"] <= g["hi"] and g["ratio"] == pytest.approx(3.0)


def test_compare_of_processes_runs_resamples_their_processes(tmp_path):
    """Two --processes 3 runs whose processes disagree by 5 and 10% (a machine's slow and fast
    states): compare's interval resamples the processes (their rounds say which), so it is wider
    than the same samples' interval without them, which treated 60 samples as independent, and
    a verdict needs that interval to exclude 1 (the U test alone takes the samples as independent)."""
    from mamba_decoder.bench.report import compare_data
    from mamba_decoder.bench.results import RecordWriter
    from mamba_decoder.bench.timing import PROCESS_ROUNDS, ratio

    from .conftest import make_record

    wobble = [1.0, 1.01, 0.99, 1.0, 1.02, 0.98, 1.0, 1.01, 0.99, 1.0] * 2
    rounds = [p * PROCESS_ROUNDS + i // 2 for p in (0, 1, 2) for i in range(20)]
    recs = {}
    for name, scale in (("base", 1.0), ("new", 1.05)):
        samples = [level * scale * w for level in (1.0, 1.05, 1.1) for w in wobble]
        recs[name] = make_record(samples=samples, sample_rounds=rounds, rounds_id=name)
        (tmp_path / name).mkdir()
        with RecordWriter(tmp_path / name / "results.jsonl", "w") as w:
            w.write(recs[name])
    (row,) = compare_data(tmp_path / "base", tmp_path / "new", threshold=0.02)["rows"]
    flat = ratio(recs["new"].samples_ms, recs["base"].samples_ms, paired=False)
    assert row["ratio"] == pytest.approx(flat.value)
    assert row["ratio_hi"] - row["ratio_lo"] > 1.5 * (flat.hi - flat.lo)
    # 5% slower with a U test p far below 0.05, but the processes' interval holds 1: no regression
    assert row["p"] < 1e-3 and row["ratio_lo"] < 1 < row["ratio_hi"] and row["verdict"] == "same"


def test_compare_of_runs_sharing_no_config_exits_distinctly_naming_the_fields(tmp_path, capsys):
    from mamba_decoder.bench.results import RecordWriter

    from .conftest import make_record, run

    for name, dim, seq in (("a", 32, 8), ("b", 64, 16)):
        (tmp_path / name).mkdir()
        with RecordWriter(tmp_path / name / "results.jsonl", "w") as w:
            w.write(make_record(dim=dim, seq=seq, samples=[1.0, 1.1, 0.9]))
    code, out, err = run(["compare", str(tmp_path / "a"), str(tmp_path / "b")], capsys)
    assert code == 5 and out == "" and err.count("\n") == 1
    assert "share no config" in err and "sequence_length (8 vs 16)" in err and "dim (32 vs 64)" in err


def test_compare_warns_on_threads_and_torch_and_prints_md_and_json(tmp_path, capsys):
    from .conftest import run

    a = _run_dir(tmp_path / "a", env={"device": "cpu", "torch_threads": 2, "torch": "2.5.0"})
    b = _run_dir(tmp_path / "b", env={"device": "cpu", "torch_threads": 1, "torch": "2.6.0"}, scale=1.02)
    code, out, _ = run(["compare", str(a), str(b)], capsys)
    assert code == 0
    assert "warning: threads differ: base 2, new 1" in out and "warning: torch differ: base 2.5.0, new 2.6.0" in out
    m = re.search(r"geometric mean ratio new/base \(median\): (\S+)x \[(\S+), (\S+)\] over 1 configs", out)
    assert m and float(m[2]) <= float(m[1]) <= float(m[3]) and float(m[1]) == pytest.approx(1.02, abs=0.01)
    code, out, _ = run(["compare", str(a), str(b), "--format", "md"], capsys)
    assert code == 0 and out.startswith("# Compare") and "| Config | SeqLen |" in out
    code, out, _ = run(["compare", str(a), str(b), "--format", "json"], capsys)
    d = json.loads(out)
    assert code == 0 and d["rows"][0]["ratio"] == pytest.approx(1.02, abs=0.01) and len(d["warnings"]) == 2


# ---------------------------------------------------------------- one statistic, noise (issue 14)
def _pair(base_ms, model_ms, rounds_id="r1", **kw):
    n = len(base_ms)
    rounds = [i // 2 for i in range(n)]
    rm = make_record("Regular Mamba", samples=base_ms, sample_rounds=rounds, rounds_id=rounds_id, **kw)
    m = make_record("MambaDecoderBlock", samples=model_ms, sample_rounds=rounds, rounds_id=rounds_id, **kw)
    return rm, m


def test_speedup_is_the_median_paired_by_round_not_the_mean():
    from mamba_decoder.bench.report import speedup_ratios

    # round 3 is slow for both (drift): the mean ratio is pulled to 1.55x, the paired median stays 2x
    base = [2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 60.0, 60.0, 2.0, 2.0]
    model = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 40.0, 40.0, 1.0, 1.0]
    rm, m = _pair(base, model)
    (r, sp, noisy), = speedup_ratios([rm, m])
    assert rm.latency_ms / m.latency_ms == pytest.approx(1.545, abs=1e-3)
    assert sp.paired and sp.value == pytest.approx(2.0) and sp.lo <= 2.0 <= sp.hi
    assert speedups([rm, m])[0][1] == pytest.approx(2.0)
    text = comparison_table([rm, m])
    assert "median" in text and "per round" in text and "2.00x" in text and "[" in text


def test_noisy_speedups_are_marked_in_the_console_and_the_report(tmp_path):
    from mamba_decoder.bench.report import speedup_ratios, write_report
    from mamba_decoder.bench.results import RecordWriter

    rm, m = _pair([1.0, 1.0, 1.1, 0.9, 1.0, 1.2, 0.8, 1.0], [1.1, 0.9, 1.0, 1.0, 0.9, 1.1, 1.2, 0.8])
    (_, sp, noisy), = speedup_ratios([rm, m])
    assert sp.crosses_one and noisy
    text = comparison_table([rm, m])
    assert "x~" in text and "~ noisy" in text
    d = tmp_path / "run"
    d.mkdir()
    with RecordWriter(d / "results.jsonl", "w") as w:
        w.write(rm)
        w.write(m)
    write_report(d, d)
    md = (d / "report.md").read_text()
    assert "| noisy |" in md and "Speedup (median)" in md and "Geometric mean speedup (median)" in md


def test_drift_and_load_warnings_name_the_cause_and_the_remedy():
    from mamba_decoder.bench.report import noise_warnings

    calm = make_record(calibration_ms=[1.0, 1.02, 0.99], rounds_id="a")
    assert noise_warnings([calm], {"load_average": [0.5, 0.5, 0.5], "cpu_count": 2}) == []
    drifting = make_record(calibration_ms=[1.0, 3.0, 1.0], rounds_id="b")
    (w,) = noise_warnings([calm, drifting], {"load_average": [0.5, 0.5, 0.5], "cpu_count": 2})
    assert "drifted 200%" in w and "--threads" in w and "--min-time" in w and "other jobs" in w
    (w,) = noise_warnings([calm], {"load_average": [3.5, 3.0, 2.0], "cpu_count": 2})
    assert "loaded" in w and "load average 3.5 on 2 CPUs" in w and "--threads" in w
    assert "--processes 3" in w       # a one-process run is told how its intervals can cover the machine's states
    (w,) = noise_warnings([calm], {"load_average": [3.5, 3.0, 2.0], "cpu_count": 2, "settings": {"processes": 3}})
    assert "--processes" not in w


def test_model_level_compares_against_mamba_lm():
    lm = make_record("Mamba LM", samples=[4.0], level="model")
    dec = make_record("MambaDecoder", samples=[2.0], level="model")
    text = comparison_table([lm, dec])
    assert text.startswith("COMPARISON vs Mamba LM") and "2.00x" in text


def test_latencies_keep_three_significant_digits_and_oom_messages_their_useful_part():
    from mamba_decoder.bench.report import fmt_ms, short_message

    assert fmt_ms(0.021345) == "0.0213" and fmt_ms(12.345) == "12.35" and fmt_ms(0.5) == "0.500"
    line = format_line(make_record(samples=[0.0213, 0.0214, 0.0212]))
    assert "Latency: 0.0213±0.0001 ms" in line
    oom = BenchmarkResult.failed(
        "oom", "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
        "capacity of 79.10 GiB of which 1.25 GiB is free. Including non-PyTorch memory, this process "
        "has 77.8 GiB memory in use. Of the allocated memory 75.1 GiB is allocated by PyTorch",
        model_name="MLABlock", sequence_length=8, batch_size=1, dim=32, backend="fast", dtype="float32",
        device="cuda")
    assert short_message(oom) == ("out of memory: Tried to allocate 2.00 GiB, of which 1.25 GiB is free, "
                                  "75.1 GiB is allocated by PyTorch")[:57] + "..."
    assert "Tried to allocate 2.00 GiB" in format_line(oom)


# ---------------------------------------------------------------- backends side by side (issue 12)
def test_a_run_with_two_backends_shows_fast_over_the_other_in_console_report_and_plot(tmp_path):
    """One run holding fast and mamba_ssm records: the console, report.md and a plot give
    fast's latency over mamba_ssm's per config, paired by round, with its interval and the
    geometric mean; configs the other backend skipped are left out, not shown as 0 or inf."""
    from mamba_decoder.bench.plots import BACKEND_PLOT_FILE
    from mamba_decoder.bench.report import backend_ratios, backend_table, write_report
    from mamba_decoder.bench.results import RecordWriter

    rounds = [i // 2 for i in range(10)]
    fast = [make_record(m, seq=s, backend="fast", samples=[0.8 * k] * 10, sample_rounds=rounds, rounds_id="r")
            for m, k in (("Regular Mamba", 1.0), ("MambaDecoderBlock", 2.0)) for s in (8, 16)]
    peer = [make_record(m, seq=s, backend="mamba_ssm", samples=[1.0 * k] * 10, sample_rounds=rounds, rounds_id="r")
            for m, k in (("Regular Mamba", 1.0), ("MambaDecoderBlock", 2.0)) for s in (8, 16)]
    skipped = BenchmarkResult.failed(model_name="MLABlock", sequence_length=8, batch_size=1, dim=32,
                                     backend="mamba_ssm", dtype="float32", device="cpu", status="skipped",
                                     message="no Mamba mixer")
    records = fast + peer + [skipped]
    pairs = backend_ratios(records)
    assert len(pairs) == 4 and all(o.backend == "mamba_ssm" and rt.paired for _, o, rt, _ in pairs)
    assert all(rt.value == pytest.approx(0.8) for *_, rt, _ in pairs)
    text = backend_table(records)
    assert "fast latency / other backend's latency" in text and "0.800" in text
    assert "geometric mean fast / mamba_ssm, MambaDecoderBlock: 0.800x" in text
    assert backend_table(fast) == ""          # one backend: no table
    d = tmp_path / "run"
    d.mkdir()
    with RecordWriter(d / "results.jsonl", "w") as w:
        for r in records:
            w.write(r)
    paths = write_report(d, d)
    assert (d / BACKEND_PLOT_FILE) in paths
    md = (d / "report.md").read_text()
    assert "## fast against the other backends" in md and "| mamba_ssm |" in md


def test_a_backend_table_split_to_fit_repeats_every_config_column():
    """A narrow terminal splits the backends table into column groups; each group repeats what
    identifies a row (model, vs, dtype, seq len, batch), so a ratio is never shown without its shape."""
    from mamba_decoder.bench.report import backend_table

    rounds = [i // 2 for i in range(10)]
    records = [make_record(m, seq=s, backend=b, samples=[k] * 10, sample_rounds=rounds, rounds_id="r")
               for b, k in (("fast", 0.8), ("reference", 1.0))
               for m in ("Regular Mamba", "Mamba+MoE Decoder Block") for s in (8, 16)]
    groups = [g for g in backend_table(records, 70).split("\n\n")]
    tables = [g for g in groups if "Model" in g]
    assert len(tables) > 1
    for t in tables:
        header = next(ln for ln in t.splitlines() if ln.startswith("Model"))
        assert header.split()[:5] == ["Model", "vs", "Dtype", "SeqLen", "Batch"], header


def test_table_rows_wider_than_the_terminal_stay_whole_rows():
    """Where the config columns alone are wider than the terminal (long labels: backend, dtype and
    swept sizes), a comparison or backends row stays one line (the terminal wraps it), not broken by
    words into pieces that no longer line up with the header and the rule."""
    from mamba_decoder.bench.report import backend_table

    rounds = [i // 2 for i in range(10)]
    records = [make_record(m, seq=s, backend=b, samples=[k * (1 + (m != "Regular Mamba"))] * 10,
                           sample_rounds=rounds, rounds_id="r")
               for b, k in (("fast", 0.8), ("reference", 1.0))
               for m in ("Regular Mamba", "Mamba+MoE Decoder Block") for s in (8, 16)]
    for text in (comparison_table(records, width=40), backend_table(records, 40)):
        rows = [ln for ln in text.splitlines() if ln.startswith(("Regular Mamba", "Mamba+MoE"))]
        assert rows and all(re.search(r"\s(8|16)\s", ln) for ln in rows), text
        rules = [ln for ln in text.splitlines() if ln.startswith("---")]
        assert all(re.fullmatch(r"-+(  -+)*", ln) for ln in rules), text
