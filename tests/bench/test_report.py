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
    assert "2.00x" in text and "0.25x" in text
    table = summary_table([rm, fast, slow])
    assert "MambaDecoderBlock" in table and "10.00±0.00" in table
