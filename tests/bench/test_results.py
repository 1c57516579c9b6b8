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


def test_torn_last_record_is_dropped_and_appending_heals_it(tmp_path, capsys):
    from mamba_decoder.bench.results import RecordWriter
    p = tmp_path / "results.jsonl"
    whole = make_record().model_dump_json()
    p.write_text(whole + "\n" + whole[: len(whole) // 2])      # killed mid-write
    assert len(read_jsonl(p)) == 1 and "cut short" in capsys.readouterr().err
    with RecordWriter(p) as w:                                 # --resume appends after the cut
        w.write(make_record())
    assert len(read_jsonl(p)) == 2
    p.write_text(whole)                                        # a whole record without its newline
    with RecordWriter(p) as w:
        w.write(make_record())
    assert len(read_jsonl(p)) == 2


def test_saved_records_with_nan_or_zero_latency_or_null_fields_are_refused(tmp_path):
    import json
    good = json.loads(make_record().model_dump_json())
    for bad in ({"latency_ms": float("nan")}, {"latency_median_ms": 0.0}, {"latency_ms": -1.0},
                {"latency_ms": None}, {"sequence_length": 10**30}, {"samples_ms": [float("inf")]}):
        p = tmp_path / "results.jsonl"
        p.write_text(json.dumps({**good, **bad}) + "\n")
        with pytest.raises(RecordFileError, match=r"results\.jsonl:1: "):
            read_jsonl(p)


def test_invalid_utf8_names_file_and_line(tmp_path):
    p = tmp_path / "results.jsonl"
    p.write_bytes(make_record().model_dump_json().encode() + b"\n\xff\xfe\n")
    with pytest.raises(RecordFileError, match=r"results\.jsonl:2: not UTF-8"):
        read_jsonl(p)


def test_csv_cells_that_a_spreadsheet_would_run_are_neutralized(tmp_path):
    from mamba_decoder.bench.results import read_csv, write_csv
    r = make_record().model_copy(update={"message": "=HYPERLINK(\"x\")", "model_name": "@SUM(A1)"})
    write_csv([r], tmp_path / "r.csv")
    text = (tmp_path / "r.csv").read_text()
    assert "'=HYPERLINK" in text and "'@SUM" in text and ",=" not in text
    assert read_csv(tmp_path / "r.csv")[0].message == r.message
    assert not list(tmp_path.glob("*.tmp"))


def test_overwrite_removes_only_the_tools_files(tmp_path):
    from mamba_decoder.bench.results import note_written, prepare_run_dir
    (tmp_path / "results.jsonl").write_text("")
    (tmp_path / "mine.png").write_text("user's")
    (tmp_path / "report.md").write_text("user's")
    (tmp_path / "latency_vs_seq.png").write_text("tool's")
    note_written(tmp_path, [tmp_path / "latency_vs_seq.png"])
    prepare_run_dir(tmp_path, resume=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.png", "report.md"]


def test_a_held_output_dir_refuses_a_second_run(tmp_path):
    from mamba_decoder.bench.results import UsageError, lock_dir
    lock = lock_dir(tmp_path)
    try:
        with pytest.raises(UsageError, match="in use by another run"):
            lock_dir(tmp_path)
    finally:
        lock.release()
