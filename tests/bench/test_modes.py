"""Decode, train and model-level runs end to end through the CLI, on the CPU."""
import json

import pytest

from mamba_decoder.bench.results import read_jsonl

from .conftest import run

TINY = ["--dim", "32", "--seq-lens", "8", "16", "--batch-sizes", "2", "--runs", "3", "--warmup", "1",
        "--no-plots", "--no-progress", "--no-cuda"]


def _records(argv, tmp_path, capsys):
    code, out, err = run(["run", *TINY, *argv, "--output-dir", str(tmp_path / "o")], capsys)
    assert code == 0, err
    return read_jsonl(tmp_path / "o" / "results.jsonl"), out


def test_decode_mode(tmp_path, capsys):
    recs, out = _records(["--mode", "decode"], tmp_path, capsys)
    assert len(recs) == 6 and all(r.ok for r in recs), [r.message for r in recs]
    for r in recs:
        assert r.mode == "decode" and r.tokens_per_call == 2 and r.n_runs == 3
        assert r.throughput_tokens_per_sec == pytest.approx(2 / r.latency_ms * 1e3)
        assert r.prefill_ms > 0 and r.cache_bytes > 0 and r.flops > 0 and r.gb_per_sec > 0
    by = {(r.model_name, r.sequence_length): r for r in recs}
    # Mamba's state is constant in the context; MLA's latent cache doubles with it
    assert by["MambaDecoderBlock", 8].cache_bytes == by["MambaDecoderBlock", 16].cache_bytes
    assert by["MLABlock", 16].cache_bytes == 2 * by["MLABlock", 8].cache_bytes == 2 * 2 * 8 * (512 + 64) * 4


def test_decode_with_the_full_cache(tmp_path, capsys):
    recs, _ = _records(["--mode", "decode", "--cache-kind", "full", "--models", "MLABlock"], tmp_path, capsys)
    assert all(r.ok and r.variant == "cache=full" for r in recs)
    assert recs[0].cache_bytes == 2 * 8 * 16 * (192 + 128) * 4


def test_train_mode_with_optimizer(tmp_path, capsys):
    recs, _ = _records(["--mode", "train", "--optimizer-step"], tmp_path, capsys)
    assert len(recs) == 6 and all(r.ok for r in recs), [r.message for r in recs]
    assert all(r.variant == "adamw" and r.tokens_per_call == 2 * r.sequence_length for r in recs)


@pytest.mark.parametrize("mode", ["forward", "train"])
def test_model_level(mode, tmp_path, capsys):
    recs, _ = _records(["--level", "model", "--mode", mode, "--depth", "2", "--vocab-size", "50"],
                       tmp_path, capsys)
    assert {r.model_name for r in recs} == {"Mamba LM", "MambaDecoder", "MambaDecoder+MLA"}
    assert all(r.ok and r.level == "model" and r.variant == "depth=2" for r in recs), [r.message for r in recs]


def test_compile_runs_or_records_its_failure(tmp_path, capsys):
    recs, _ = _records(["--compile", "--models", "Regular Mamba", "--seq-lens", "8"], tmp_path, capsys)
    (r,) = recs
    assert r.variant == "compile" and (r.ok or "compile" in r.message.lower() or r.status == "error")


@pytest.mark.parametrize("argv,needle", [
    (["--mode", "decode", "--level", "model"], "--mode decode runs at --level block"),
    (["--cuda-graphs", "--mode", "decode"], "--cuda-graphs applies to --mode forward or decode on CUDA"),
    (["--cuda-graphs", "--mode", "train"], "--cuda-graphs applies to --mode forward or decode on CUDA"),
    (["--cache-kind", "full"], "--cache-kind applies to --mode decode"),
    (["--optimizer-step"], "--optimizer-step applies to --mode train"),
    (["--mode", "sideways"], "sideways"),
    (["--level", "model", "--models", "MLABlock"], "'MLABlock' is not one of"),
])
def test_bad_mode_combinations(argv, needle, tmp_path, capsys):
    code, out, err = run(["run", *TINY, *argv, "--output-dir", str(tmp_path / "o")], capsys)
    assert code == 2 and needle in err and err.count("\n") == 1, err
