import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mamba_decoder.bench import runner
from mamba_decoder.bench.cli import main
from mamba_decoder.bench.results import BenchmarkResult, RecordWriter, read_csv, read_jsonl

from .conftest import LINE_RE, TINY, make_record, run

ROOT = Path(__file__).resolve().parents[2]



def test_run_prints_spec_lines_and_writes_records(tiny_run, capsys):
    recs = read_jsonl(tiny_run / "results.jsonl")
    assert len(recs) == 12 and sum(r.ok for r in recs) == 11
    (oom,) = [r for r in recs if not r.ok]
    assert (oom.model_name, oom.sequence_length, oom.batch_size, oom.status) == ("MLABlock", 16, 2, "oom")
    assert read_csv(tiny_run / "results.csv") == recs
    env = json.loads((tiny_run / "environment.json").read_text())
    assert env["device"] == "cpu" and env["packages"]["mambapy"]


def test_console_lines(tmp_path, capsys):
    code, out, err = run(["run", *TINY, "--models", "regular mamba", "--no-plots", "--output-dir",
                          str(tmp_path / "o")], capsys)
    assert code == 0, err
    lines = [ln for ln in out.splitlines() if "| SeqLen:" in ln]
    assert len(lines) == 4 and all(LINE_RE.match(ln) for ln in lines), lines
    assert out.startswith("=" * 100 + "\nCOMPREHENSIVE BENCHMARKING SUITE\n" + "=" * 100 + "\nDevice: cpu\n"
                          "Model Dimension: 32\nSequence Lengths: [8, 16]\nBatch Sizes: [1, 2]\n")
    assert "Kernels Regular Mamba (fast, float32): scan=cpu" in out
    assert "SUMMARY" in out and "Traceback" not in out + err


@pytest.mark.parametrize("argv,needle", [
    (["--dim", "0"], "'0' is not an integer >= 1"),
    (["--dim", "-3"], "'-3'"),
    (["--dim", "1.5"], "'1.5'"),
    (["--seq-lens", "8", "x"], "'x'"),
    (["--batch-sizes", "0"], "'0'"),
    (["--models", "GPT2"], "'GPT2' is not one of"),
    (["--backend", "cuda"], "backend 'cuda' is not one of"),
    (["--dtype", "int8"], "dtype 'int8' is not one of"),
    (["--runs", "0"], "--runs"),
    (["--warmup", "-1"], "--warmup"),
    (["--min-time", "nan"], "'nan'"),
    (["--threads", "100000"], "--threads"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_input_exits_2_with_one_line(argv, needle, tmp_path, capsys):
    code, out, err = run(["run", "--no-cuda", "--output-dir", str(tmp_path / "o"), *argv], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err
    assert "Traceback" not in out + err
    assert not (tmp_path / "o").exists()


def test_output_dir_that_is_a_file_or_not_empty(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    code, _, err = run(["run", *TINY, "--output-dir", str(f)], capsys)
    assert code == 2 and "is not a directory" in err and err.count("\n") == 1
    d = tmp_path / "full"
    d.mkdir()
    (d / "keep.txt").write_text("mine")
    code, _, err = run(["run", *TINY, "--output-dir", str(d)], capsys)
    assert code == 2 and "is not empty" in err and "--resume" in err
    assert (d / "keep.txt").read_text() == "mine"


def test_use_cuda_without_cuda_prints_one_notice(tmp_path, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    argv = [a for a in TINY if a != "--no-cuda"]
    code, out, err = run(["run", *argv, "--models", "Regular Mamba", "--seq-lens", "8", "--batch-sizes",
                          "1", "--no-plots", "--output-dir", str(tmp_path / "o")], capsys)
    assert code == 0
    notices = [ln for ln in (out + err).splitlines() if "CUDA is not available" in ln]
    assert len(notices) == 1 and "pass --no-cuda" in notices[0] and "Device: cpu" in out


def test_interrupt_keeps_records_then_resume_finishes(tmp_path, capsys, monkeypatch):
    out_dir = tmp_path / "o"
    real = runner.time_interleaved
    calls = {"n": 0}

    def interrupting(*a, **k):   # one call per shape (its 3 models interleaved)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(runner, "time_interleaved", interrupting)
    code, _, err = run(["run", *TINY, "--no-plots", "--output-dir", str(out_dir)], capsys)
    assert code == 130 and "--resume" in err
    kept = read_jsonl(out_dir / "results.jsonl")
    assert len(kept) == 3 and all(r.ok for r in kept)
    assert read_csv(out_dir / "results.csv") == kept

    calls["n"] = -1000   # no more interrupts; count what is measured
    code, out, err = run(["run", *TINY, "--no-plots", "--resume", "--output-dir", str(out_dir)], capsys)
    assert code == 0, err
    assert calls["n"] == -1000 + 3          # only the 3 missing shapes (9 configs) were measured
    final = read_jsonl(out_dir / "results.jsonl")
    assert len(final) == 12 and len({r.key for r in final}) == 12
    assert sum("| SeqLen:" in ln for ln in out.splitlines()) == 12


def test_resume_retries_failed_configs(tmp_path, capsys):
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    failed = BenchmarkResult.failed("error", "boom", model_name="Regular Mamba", sequence_length=8,
                                    batch_size=1, dim=32, backend="fast", dtype="float32", device="cpu")
    with RecordWriter(out_dir / "results.jsonl", "w") as w:
        w.write(failed)
    code, _, err = run(["run", *TINY, "--models", "Regular Mamba", "--seq-lens", "8", "--batch-sizes", "1",
                        "--no-plots", "--resume", "--output-dir", str(out_dir)], capsys)
    assert code == 0, err
    from mamba_decoder.bench.results import load_run
    (r,) = load_run(out_dir)
    assert r.ok


def test_overwrite_replaces_records(tiny_run, tmp_path, capsys):
    d = tmp_path / "copy"
    shutil.copytree(tiny_run, d)
    code, _, err = run(["run", *TINY, "--models", "MLABlock", "--seq-lens", "8", "--batch-sizes", "1",
                        "--no-plots", "--overwrite", "--output-dir", str(d)], capsys)
    assert code == 0, err
    assert len(read_jsonl(d / "results.jsonl")) == 1 and not list(d.glob("*.png"))


def test_isolate_flag(tmp_path, capsys):
    code, out, err = run(["run", *TINY, "--models", "Regular Mamba", "--seq-lens", "8", "--batch-sizes", "1",
                          "--isolate", "--no-plots", "--output-dir", str(tmp_path / "o")], capsys)
    assert code == 0, err
    (r,) = read_jsonl(tmp_path / "o" / "results.jsonl")
    assert r.ok and LINE_RE.match([ln for ln in out.splitlines() if "SeqLen" in ln][0])


def test_report_redraws_from_records(tiny_run, tmp_path, capsys):
    code, out, err = run(["report", str(tiny_run), "--output-dir", str(tmp_path / "rep")], capsys)
    assert code == 0, err
    rep = tmp_path / "rep"
    assert len(list(rep.glob("*.png"))) == 8
    md = (rep / "report.md").read_text()
    assert "## Environment" in md and "MambaDecoderBlock" in md and "![" in md
    html = (rep / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 8 and "<img" in html and 'src="1_' not in html


def test_report_rejects_malformed_records(tmp_path, capsys):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "results.jsonl").write_text(make_record().model_dump_json() + "\n{broken\n")
    code, _, err = run(["report", str(d)], capsys)
    assert code == 2 and err.count("\n") == 1 and "results.jsonl:2:" in err
    code, _, err = run(["compare", str(d), str(tmp_path / "missing")], capsys)
    assert code == 2 and err.count("\n") == 1


def test_report_of_a_file_names_the_run_directory_not_a_flag_not_given(tmp_path, capsys):
    f = tmp_path / "results.jsonl"
    f.write_text("")
    code, _, err = run(["report", str(f)], capsys)
    assert code == 2 and err.startswith("error: run directory:") and "--output-dir" not in err


def _write_run(d: Path, scale: float, extra=None):
    d.mkdir()
    with RecordWriter(d / "results.jsonl", "w") as w:
        for model in ("Regular Mamba", "MLABlock"):
            base = [10.0, 10.2, 9.9, 10.1, 10.05, 9.95, 10.15, 10.0, 9.85, 10.1]
            w.write(make_record(model, samples=[x * (scale if model == "MLABlock" else 1.0) for x in base]))
        for r in extra or []:
            w.write(r)


def test_compare_flags_significant_regression(tmp_path, capsys):
    _write_run(tmp_path / "base", 1.0, [make_record("MambaDecoderBlock", seq=64)])
    _write_run(tmp_path / "new", 1.3)
    code, out, _ = run(["compare", str(tmp_path / "base"), str(tmp_path / "new")], capsys)
    assert code == 3
    assert "SLOWER (regression)" in out and "1.300" in out
    assert "only in base (1): MambaDecoderBlock" in out
    code, out, _ = run(["compare", str(tmp_path / "base"), str(tmp_path / "new"), "--threshold", "0.5"], capsys)
    assert code == 0       # 30% slower is within a 50% threshold
    code, out, _ = run(["compare", str(tmp_path / "base"), str(tmp_path / "base")], capsys)
    assert code == 0 and "0 regression(s)" in out


def test_compare_faster_is_not_a_regression(tmp_path, capsys):
    _write_run(tmp_path / "base", 1.0)
    _write_run(tmp_path / "new", 0.7)
    code, out, _ = run(["compare", str(tmp_path / "base"), str(tmp_path / "new")], capsys)
    assert code == 0 and "faster" in out


def test_run_benchmark_script_and_spec_snippet(tmp_path):
    """The spec's entry point and its programmatic snippet, at tiny sizes, in fresh interpreters."""
    out = subprocess.run([sys.executable, "run_benchmark.py", *TINY, "--models", "Regular Mamba",
                          "--seq-lens", "8", "--batch-sizes", "1", "--no-plots", "--output-dir",
                          str(tmp_path / "rb")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert sum(bool(LINE_RE.match(ln)) for ln in out.stdout.splitlines()) == 1, out.stdout
    bad = subprocess.run([sys.executable, "run_benchmark.py", "--dim", "0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "Traceback" not in bad.stderr
    snippet = f"""
from benchmark_suite import run_scaling_benchmarks, plot_benchmark_results, print_summary_table
results = run_scaling_benchmarks(dim=32, sequence_lengths=[8], batch_sizes=[1, 2], use_cuda=True,
                                 warmup=0, runs=2, progress=False)
print_summary_table(results)
plot_benchmark_results(results, output_dir={str(tmp_path / 'my_results')!r})
assert len(results) == 6 and all(r.ok for r in results)
"""
    out = subprocess.run([sys.executable, "-c", snippet], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert sum(bool(LINE_RE.match(ln)) for ln in out.stdout.splitlines()) == 6
    assert "SUMMARY" in out.stdout and len(list((tmp_path / "my_results").glob("*.png"))) == 8
    assert out.stderr.count("CUDA is not available") == 1 and "pass use_cuda=False" in out.stderr


_TOKENS = st.sampled_from([
    "--dim", "16", "32", "0", "-1", "abc", "1e3", "--seq-lens", "4", "8", "--batch-sizes", "1", "2",
    "--models", "MLABlock", "Regular Mamba", "nope", "--backend", "reference", "fast", "gpu",
    "--dtype", "float32", "bfloat16", "float16", "double", "--runs", "--warmup", "--min-time", "0.0",
    "-0.5", "inf", "--threads", "--seed", "--quick", "--resume", "--overwrite", "--no-cuda", "--", "",
    "--output-dir", "report", "compare", "run", "--threshold", "--help", "\x00", "é",
])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tokens=st.lists(_TOKENS, max_size=8), sub=st.sampled_from(["run", "report", "compare", ""]))
def test_fuzz_cli_never_tracebacks(tokens, sub, tmp_path_factory, capsys, monkeypatch):
    monkeypatch.setattr("mamba_decoder.bench.plots.plot_benchmark_results", lambda *a, **k: [])
    out_dir = tmp_path_factory.mktemp("fuzz") / "o"
    argv = ([sub] if sub else []) + tokens
    if sub == "run":   # keep any run that is valid tiny: sizes, runs, models last so they win
        argv += ["--dim", "16", "--seq-lens", "4", "--batch-sizes", "1", "--runs", "1", "--warmup", "0",
                 "--models", "Regular Mamba", "--no-progress", "--output-dir", str(out_dir)]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code in (0, 1, 2), (argv, code, err)
    assert "Traceback" not in out + err
    if code == 2:
        assert err.count("\n") == 1 and err.startswith("error: "), (argv, err)


def test_min_time_and_groups_of_backend_dtype(tmp_path, capsys):
    code, out, err = run(["run", *TINY, "--models", "Regular Mamba", "--seq-lens", "8", "--batch-sizes", "1",
                          "--dtype", "float32", "bfloat16", "--min-time", "0.05", "--no-plots",
                          "--output-dir", str(tmp_path / "o")], capsys)
    assert code == 0, err
    recs = read_jsonl(tmp_path / "o" / "results.jsonl")
    assert [r.dtype for r in recs] == ["float32", "bfloat16"] and all(r.ok for r in recs)
    for r in recs:   # both conditions: >= --runs and >= --min-time of timed runs
        assert r.n_runs >= 2 and sum(r.samples_ms) >= 50.0
    assert "--- backend: fast | dtype: bfloat16 ---" in out


def test_api_checks_its_output_dir_as_the_cli_does(tmp_path, capsys):
    """The API runs execute's one path: a non-empty output_dir needs resume or overwrite, and
    records, CSV and environment land there as they do from the CLI."""
    from mamba_decoder.bench.api import run_scaling_benchmarks

    kw = dict(dim=16, sequence_lengths=[4], batch_sizes=[1], use_cuda=False, models=["Regular Mamba"],
              warmup=0, runs=1, verbose=False, progress=False)
    out = tmp_path / "api"
    (r,) = run_scaling_benchmarks(output_dir=out, **kw)
    assert r.ok and read_jsonl(out / "results.jsonl") == [r] and read_csv(out / "results.csv") == [r]
    assert (out / "environment.json").is_file()
    with pytest.raises(ValueError, match="is not empty"):
        run_scaling_benchmarks(output_dir=out, **kw)
    assert run_scaling_benchmarks(output_dir=out, resume=True, **kw) == [r]   # recorded ok: not measured again
    (again,) = run_scaling_benchmarks(output_dir=out, overwrite=True, **kw)
    assert read_jsonl(out / "results.jsonl") == [again] and again.timestamp >= r.timestamp
    with pytest.raises(ValueError, match="dim: 0 is not an integer >= 1"):
        run_scaling_benchmarks(output_dir=tmp_path / "bad", **{**kw, "dim": 0})
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------- runs that cannot mix (issue 14)
def test_resume_refuses_other_settings_naming_the_field_and_keeps_the_start(tmp_path, capsys):
    import json

    d = tmp_path / "o"
    one = ["run", "--dim", "32", "--seq-lens", "8", "--batch-sizes", "1", "--runs", "2", "--warmup", "0",
           "--no-cuda", "--no-progress", "--no-plots", "--models", "Regular Mamba", "--output-dir", str(d)]
    assert run(one, capsys)[0] == 0
    env = json.loads((d / "environment.json").read_text())
    assert env["command_line"] == ["mamba-bench", *one] and env["seed"] == 0 and env["version"]
    assert env["settings"]["runs"] == 2 and "resumptions" not in env
    assert env["settings"]["host_allocator"] == "retain" and env["host_allocator"]
    for flag, value, field in (("--runs", "3", "runs"), ("--warmup", "1", "warmup"), ("--dim", "64", "dim"),
                               ("--seed", "1", "seed"), ("--order", "blocked", "order"),
                               ("--host-allocator", "system", "host_allocator"), ("--processes", "2", "processes")):
        argv = [*one, "--resume"]
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
        code, _, err = run(argv, capsys)
        assert code == 2 and err.startswith(f"error: --resume: {field} differs") and err.count("\n") == 1, err
    assert len(read_jsonl(d / "results.jsonl")) == 1          # nothing appended
    code, _, err = run([*one, "--resume", "--seq-lens", "8", "16"], capsys)   # along the sweep's axes
    assert code == 0, err
    env2 = json.loads((d / "environment.json").read_text())
    assert env2["time"] == env["time"] and env2["command_line"] == env["command_line"]
    assert len(env2["resumptions"]) == 1 and env2["resumptions"][0]["command_line"][-3:] == ["--seq-lens", "8", "16"]


def test_version(capsys):
    from mamba_decoder.bench.results import tool_version

    code, out, _ = run(["--version"], capsys)
    assert code == 0 and out.strip() == f"mamba-bench {tool_version()}" and tool_version()


def test_no_progress_bar_when_stderr_is_not_a_terminal(tmp_path, capsys):
    argv = [a for a in TINY if a != "--no-progress"]
    code, _, err = run(["run", *argv, "--models", "Regular Mamba", "--seq-lens", "8", "--batch-sizes", "1",
                        "--no-plots", "--output-dir", str(tmp_path / "o")], capsys)
    assert code == 0 and "config/s" not in err and "\r" not in err


def test_every_console_line_fits_80_columns_when_the_terminal_has_80(tmp_path, capsys, monkeypatch):
    """Issue 14: lines that survive an 80-column terminal (stdout a terminal of 80 columns: the
    width as shutil reads it, $COLUMNS first); on a pipe or a file the spec's lines stay whole."""
    import sys as _sys
    argv = ["run", *TINY, "--backend", "fast", "reference", "--no-plots"]
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setattr(_sys.stdout, "isatty", lambda: True)
    code, out, err = run([*argv, "--output-dir", str(tmp_path / "narrow")], capsys)
    assert code == 0, err
    long = [ln for ln in (out + err).splitlines() if len(ln) > 80]
    assert not long, long
    assert "Throughput:" in out and "Params tot/act" in out and "95% CI" in out   # nothing dropped
    monkeypatch.undo()                       # a pipe, $COLUMNS set or not: one line per config
    monkeypatch.setenv("COLUMNS", "80")
    code, out, err = run([*argv, "--output-dir", str(tmp_path / "wide")], capsys)
    lines = [ln for ln in out.splitlines() if "| SeqLen:" in ln]
    assert code == 0 and len(lines) == 24 and all(LINE_RE.match(ln) for ln in lines)   # 12 configs x 2 backends


def test_processes_on_the_command_line_say_how_the_runs_are_split(tmp_path, capsys):
    import json

    d = tmp_path / "p"
    code, out, err = run(["run", "--dim", "32", "--seq-lens", "8", "--batch-sizes", "1", "--runs", "3", "--warmup", "0",
                          "--no-cuda", "--no-progress", "--no-plots", "--models", "Regular Mamba", "--processes", "2",
                          "--output-dir", str(d)], capsys)
    assert code == 0, err
    assert "Processes: 2, one after another (each config's 3 timed runs split 2/1;" in out
    (r,) = read_jsonl(d / "results.jsonl")
    assert r.ok and r.n_runs == 3
    assert json.loads((d / "environment.json").read_text())["settings"]["processes"] == 2
    code, _, err = run(["run", "--no-cuda", "--runs", "2", "--processes", "3"], capsys)
    assert code == 2 and err.startswith("error: --processes 3 splits") and err.count("\n") == 1


def test_interrupted_processes_run_keeps_each_process_records_then_resume_finishes(tmp_path, capsys, monkeypatch):
    """Ctrl-C while the second of two worker processes runs: the first process's records and the
    second's finished one stay in processes/ (nothing merged yet), the message says so; --resume
    starts no worker for the first process and measures only the configs the second still
    lacks, then merges all 4 configs (2 processes each) and removes processes/."""
    d = tmp_path / "p"
    args = ["run", *TINY, "--models", "Regular Mamba", "--no-plots", "--processes", "2", "--output-dir", str(d)]
    real = runner._process_records
    measured = []

    def interrupting(configs, s, p, staged, stage=None, on_part=None):
        measured.append((p, len([c for c in configs if c.key(s) not in staged])))

        def part(r):
            on_part(r)
            if p == 1 and interrupt:
                raise KeyboardInterrupt
        return real(configs, s, p, staged, stage, part)
    monkeypatch.setattr(runner, "_process_records", interrupting)
    interrupt = True
    code, _, err = run(args, capsys)
    assert code == 130 and "--resume" in err and str(d / "processes") in err, err
    assert measured == [(0, 4), (1, 4)]
    assert not read_jsonl(d / "results.jsonl")
    first, second = (read_jsonl(d / "processes" / f"process-{p}.jsonl") for p in (1, 2))
    assert len(first) == 4 and len(second) == 1 and all(r.ok and r.n_runs == 1 for r in first + second)

    interrupt, measured[:] = False, []
    code, out, err = run([*args, "--resume"], capsys)
    assert code == 0, err
    assert "staged by the interrupted run's processes (process-1 4, process-2 1) are reused" in err
    assert measured == [(0, 0), (1, 3)]
    final = read_jsonl(d / "results.jsonl")
    assert len({r.key for r in final}) == 4 and all(r.ok and r.n_runs == 2 for r in final)
    assert not (d / "processes").exists()
    done = next(r for r in final if r.key == second[0].key)
    assert second[0].samples_ms[0] in done.samples_ms     # the staged sample merged, not measured again


def _run_saved_without(setting: str, tmp_path, capsys):
    """A finished one-config run whose environment.json lacks `setting` (as one saved before the
    setting existed): (its command line, its environment, the directory)."""
    import json

    d = tmp_path / "old"
    one = ["run", "--dim", "32", "--seq-lens", "8", "--batch-sizes", "1", "--runs", "2", "--warmup", "0",
           "--no-cuda", "--no-progress", "--no-plots", "--models", "Regular Mamba", "--output-dir", str(d)]
    assert run(one, capsys)[0] == 0
    env = json.loads((d / "environment.json").read_text())
    del env["settings"][setting]
    (d / "environment.json").write_text(json.dumps(env))
    return one, env, d


def test_resume_of_a_run_saved_before_processes_existed(tmp_path, capsys):
    """A run directory written before --processes (its saved settings have no "processes") was
    measured in one process: resuming it with the default --processes 1 is the same measurement,
    not "processes differs (None there, 1 now)"; --processes 2 is still refused."""
    import json

    one, env, d = _run_saved_without("processes", tmp_path, capsys)
    code, _, err = run([*one, "--resume", "--seq-lens", "8", "16"], capsys)
    assert code == 0, err
    (d / "environment.json").write_text(json.dumps(env))
    code, _, err = run([*one, "--resume", "--processes", "2"], capsys)
    assert code == 2 and err.startswith("error: --resume: processes differs"), err


def test_resume_of_a_run_saved_before_the_host_allocator_setting_names_what_it_used(tmp_path, capsys):
    """A run saved before --host-allocator was measured with glibc's defaults: resuming it under
    the new default (retain) would mix two measurements and is refused, naming the field; with
    --host-allocator system it resumes."""
    one, _, _ = _run_saved_without("host_allocator", tmp_path, capsys)
    code, _, err = run([*one, "--resume", "--seq-lens", "8", "16"], capsys)
    assert code == 2 and err.startswith("error: --resume: host_allocator differs") and "('system' there, 'retain' now)" in err
    code, _, err = run([*one, "--resume", "--seq-lens", "8", "16", "--host-allocator", "system"], capsys)
    assert code == 0, err
