import json

import pytest

from mamba_decoder.bench.results import (BenchmarkResult, RecordFileError, RecordWriter, environment,
                                         latest, read_csv, read_jsonl, write_csv)

from .conftest import make_record


def test_throughput_from_mean_latency():
    r = make_record(seq=16, batch=4, samples=[2.0, 4.0, 3.0])
    assert r.latency_ms == pytest.approx(3.0)
    assert r.throughput_tokens_per_sec == pytest.approx(4 * 16 / 3.0 * 1000)
    assert r.latency_median_ms == pytest.approx(3.0) and r.n_runs == 3
    assert r.samples_ms == [2.0, 4.0, 3.0]


def test_jsonl_and_csv_round_trip(tmp_path):
    recs = [make_record(), make_record(model="MLABlock", seq=16, kernels={"attn": "absorb-einsum"}),
            BenchmarkResult.failed("oom", "CUDA out of memory.\nTried 2 GiB", model_name="MLABlock",
                                   sequence_length=32, batch_size=8, dim=32, backend="reference",
                                   dtype="float32", device="cpu")]
    with RecordWriter(tmp_path / "r.jsonl", "w") as w:
        for r in recs:
            w.write(r)
    back = read_jsonl(tmp_path / "r.jsonl")
    assert back == recs
    assert back[2].message == "CUDA out of memory. Tried 2 GiB"   # one line
    write_csv(back, tmp_path / "r.csv")
    assert read_csv(tmp_path / "r.csv") == recs


def test_malformed_line_names_file_and_line(tmp_path):
    p = tmp_path / "results.jsonl"
    p.write_text(make_record().model_dump_json() + "\n" + '{"model_name": "x"}\n')
    with pytest.raises(RecordFileError, match=r"results\.jsonl:2: "):
        read_jsonl(p)
    p.write_text("not json at all\n")
    with pytest.raises(RecordFileError, match=r"results\.jsonl:1: "):
        read_jsonl(p)


def test_latest_keeps_last_record_per_key():
    a = BenchmarkResult.failed("error", "boom", model_name="MLABlock", sequence_length=8, batch_size=1,
                               dim=32, backend="reference", dtype="float32", device="cpu")
    b = make_record(model="MLABlock")
    c = make_record(model="Regular Mamba")
    assert latest([a, c, b]) == [b, c]


def test_environment_has_versions():
    env = environment("cpu", 2)
    json.dumps(env)
    assert env["torch"] and env["torch_threads"] == 2 and env["cpu_model"]
    assert env["packages"]["mambapy"] and env["packages"]["open-kimi"]
    assert {"cuda", "cudnn", "git_commit", "hostname", "time"} <= set(env)
