import json
import sys

import pytest
import torch

from mamba_decoder.kernels.moe import DENSE_SMALL_MAX_TOKENS
from mamba_decoder.policy import KernelPolicy

from mamba_decoder.bench import runner
from mamba_decoder.bench.runner import SweepSettings, measure_isolated, Config, iter_configs, run_sweep
from mamba_decoder.kernels.selective_scan import auto_impl  # noqa: E402  (cpu-compiled where a C compiler builds it)


def tiny(**kw) -> SweepSettings:
    base = dict(dim=32, sequence_lengths=[8, 16], batch_sizes=[1, 2], warmup=0, runs=2, device="cpu")
    base.update(kw)
    return SweepSettings(**base)


def _inject(monkeypatch, exc, model="MambaDecoderBlock", seq=16):
    real = runner.build_model

    def factory(name, dim, backend="reference", max_seq_len=4096):
        m = real(name, dim, backend, max_seq_len=max_seq_len)
        if name == model:
            forward = m.forward

            def failing(x):
                if x.shape[1] == seq:
                    raise exc
                return forward(x)
            m.forward = failing
        return m
    monkeypatch.setattr(runner, "build_model", factory)


def test_sweep_records_every_config_in_spec_order():
    s = tiny()
    seen = []
    out = run_sweep(s, on_record=seen.append, progress=False)
    assert out == seen and len(out) == 12
    assert [(r.sequence_length, r.batch_size, r.model_name) for r in out[:3]] == [
        (8, 1, "Regular Mamba"), (8, 1, "MambaDecoderBlock"), (8, 1, "MLABlock")]
    for r in out:
        assert r.ok, r.message
        assert r.n_runs == 2 and len(r.samples_ms) == 2
        assert r.throughput_tokens_per_sec == pytest.approx(r.batch_size * r.sequence_length / r.latency_ms * 1e3)
        assert r.num_parameters > 0 and r.active_parameters <= r.num_parameters
        assert r.memory_mb is None and r.weights_mb > 0        # CPU: no per-config memory figure
        assert r.kernels and r.threads == torch.get_num_threads()
        # the CPU floor: MFU against the GEMM rate probed beside this config
        assert r.peak_tflops > 0 and r.mfu == pytest.approx(r.tflops_per_sec / r.peak_tflops)
    mdb = next(r for r in out if r.model_name == "MambaDecoderBlock")
    d = KernelPolicy().decide(torch.device("cpu"), torch.float32)
    gemm = {"gemm": "onednn (inference, >= 16 rows and 2^24 MACs), torch otherwise"} if d.cpu_gemm else {}
    moe = "onednn per-expert GEMMs (inference), grouped_mm with autograd" if d.moe == "onednn-experts" else d.moe
    dg = KernelPolicy().decide(torch.device("cpu"), torch.float32, grad=True)
    train = "; train: grouped Function, swiglu=torch" if dg.moe == "grouped_mm" else ""
    assert mdb.kernels == {"scan": auto_impl("cpu"),
                           "conv": "cpu-conv-silu (inference), torch-conv1d otherwise" if d.cpu_fused else "torch-conv1d",
                           "step": "torch", **gemm,
                           "moe": "{1} (T > {0}), dense-small (T <= {0}){2}".format(DENSE_SMALL_MAX_TOKENS["cpu"], moe, train),
                           "router": "torch"}


def test_model_built_once_per_model_backend_dtype(monkeypatch):
    builds = []
    real = runner.build_model
    monkeypatch.setattr(runner, "build_model", lambda *a, **k: builds.append(a[0]) or real(*a, **k))
    run_sweep(tiny(), progress=False)
    assert sorted(builds) == sorted(["Regular Mamba", "MambaDecoderBlock", "MLABlock"])


def test_oom_in_one_config_is_recorded_and_sweep_continues(monkeypatch):
    _inject(monkeypatch, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    out = run_sweep(tiny(batch_sizes=[1]), progress=False)
    assert len(out) == 6
    bad = [r for r in out if not r.ok]
    assert [(r.model_name, r.sequence_length) for r in bad] == [("MambaDecoderBlock", 16)]
    assert all(r.status == "oom" and "out of memory" in r.message for r in bad)
    assert all(r.latency_ms is None and r.throughput_tokens_per_sec is None for r in bad)
    assert sum(r.ok for r in out) == 5
    assert [r.model_name for r in out[3:]] == ["Regular Mamba", "MambaDecoderBlock", "MLABlock"]


def test_error_in_one_config_is_recorded_and_sweep_continues(monkeypatch):
    _inject(monkeypatch, ValueError("shape mismatch\nsecond line"), model="MLABlock", seq=8)
    out = run_sweep(tiny(batch_sizes=[1]), progress=False)
    bad = [r for r in out if not r.ok]
    assert len(bad) == 1 and all(r.status == "error" for r in bad)
    assert bad[0].message == "ValueError: shape mismatch second line"
    assert sum(r.ok for r in out) == 5


def test_build_failure_marks_every_shape_of_that_model(monkeypatch):
    real = runner.build_model

    def factory(name, *a, **k):
        if name == "MLABlock":
            raise ImportError("fast kernel missing")
        return real(name, *a, **k)
    monkeypatch.setattr(runner, "build_model", factory)
    out = run_sweep(tiny(batch_sizes=[1]), progress=False)
    mla = [r for r in out if r.model_name == "MLABlock"]
    assert len(mla) == 2 and all(r.status == "error" and "fast kernel missing" in r.message for r in mla)


def test_validate_rejects_bad_settings():
    for kw, msg in [(dict(dim=0), "dim"), (dict(sequence_lengths=[8, -1]), "sequence lengths"),
                    (dict(batch_sizes=[]), "batch sizes"), (dict(models=["GPT"]), "'GPT'"),
                    (dict(backends=["cuda"]), "backend"), (dict(dtypes=["int8"]), "dtype"),
                    (dict(runs=0), "runs"), (dict(min_time_s=-1.0), "min time")]:
        with pytest.raises(ValueError, match=msg):
            tiny(**kw)


def test_isolated_config_runs_in_subprocess():
    s = tiny(models=["Regular Mamba"], sequence_lengths=[8], batch_sizes=[1], isolate=True)
    r = measure_isolated(Config("Regular Mamba", "reference", "float32", 8, 1), s)
    assert r.ok and r.n_runs == 2 and r.kernels == {"scan": "mambapy-pscan"}


def test_isolated_crash_costs_one_row_and_names_the_signal(monkeypatch):
    monkeypatch.setattr(runner, "worker_command", lambda: [
        sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"])
    out = run_sweep(tiny(models=["Regular Mamba"], batch_sizes=[1], isolate=True), progress=False)
    assert len(out) == 2
    assert all(r.status == "error" and "SIGSEGV" in r.message for r in out)


def test_settings_errors_are_one_line_naming_the_value_and_what_is_accepted():
    from pydantic import ValidationError

    from mamba_decoder.bench.settings import one_line

    for kw, msg in [(dict(dim=True), "dim: True is not an integer >= 1"),
                    (dict(batch_sizes=[]), "batch sizes: none given (accepted: an integer >= 1)"),
                    (dict(min_time_s=float("inf")), "min time: inf is not a finite number of seconds >= 0"),
                    (dict(backends=["cuda"]), "backend 'cuda' is not one of: 'reference', 'fast'"),
                    (dict(mode="decode", level="model"), "--mode decode runs at --level block"),
                    (dict(bogus=1), "bogus: extra inputs are not permitted")]:
        with pytest.raises(ValidationError) as e:
            SweepSettings(**kw)
        assert one_line(e.value).startswith(msg) and "\n" not in one_line(e.value)


def test_interleaved_sweep_times_each_shape_in_rounds(monkeypatch):
    calls = []
    real = runner.time_interleaved
    monkeypatch.setattr(runner, "time_interleaved", lambda fns, *a, **k: calls.append(len(fns)) or real(fns, *a, **k))
    out = run_sweep(tiny(runs=4), progress=False)
    assert calls == [3, 3, 3, 3]                        # one interleaved timing per shape, 3 models each
    for r in out:
        assert r.order == "interleaved" and r.sample_rounds == [0, 0, 1, 1] and len(r.calibration_ms) == 2
    ids = [r.rounds_id for r in out]
    assert all(ids[i] == ids[i - i % 3] for i in range(12)) and len(set(ids)) == 4


def test_blocked_order_times_configs_one_at_a_time(monkeypatch):
    calls = []
    real = runner.time_interleaved
    monkeypatch.setattr(runner, "time_interleaved", lambda fns, *a, **k: calls.append(len(fns)) or real(fns, *a, **k))
    out = run_sweep(tiny(runs=2, order="blocked", batch_sizes=[1]), progress=False)
    assert calls == [1] * 6 and all(r.order == "blocked" for r in out) and len({r.rounds_id for r in out}) == 6


def test_interleaved_order_puts_backends_and_dtypes_inside_each_shape():
    from mamba_decoder.bench.settings import iter_configs

    s = tiny(backends=["reference", "fast"], sequence_lengths=[8], batch_sizes=[1, 2], models=["Regular Mamba"])
    assert [(c.batch_size, c.backend) for c in iter_configs(s)] == [
        (1, "reference"), (1, "fast"), (2, "reference"), (2, "fast")]
    blocked = s.model_copy(update={"order": "blocked"})
    assert [(c.batch_size, c.backend) for c in iter_configs(blocked)] == [
        (1, "reference"), (2, "reference"), (1, "fast"), (2, "fast")]


# ---------------------------------------------------------------- --processes
def test_processes_split_each_configs_runs_and_merge_them_paired_by_round():
    """Two worker processes, 10 timed runs: 5/5 per process (3 rounds each, at 2 runs a round);
    each record holds all 10 samples, its rounds numbered by process (timing.PROCESS_ROUNDS), one rounds_id per
    shape shared by its models, so speedups stay paired."""
    from mamba_decoder.bench.results import latency_ratio
    from mamba_decoder.bench.timing import PROCESS_ROUNDS

    s = tiny(models=["Regular Mamba", "MambaDecoderBlock"], sequence_lengths=[8], batch_sizes=[1], runs=10,
             processes=2)
    assert [s.process_share(p).runs for p in range(2)] == [5, 5]
    assert [tiny(runs=10, processes=3).process_share(p).runs for p in range(3)] == [4, 3, 3]
    out = run_sweep(s, progress=False)
    assert [r.model_name for r in out] == ["Regular Mamba", "MambaDecoderBlock"] and all(r.ok for r in out)
    for r in out:
        assert r.n_runs == 10 and sorted({x // PROCESS_ROUNDS for x in r.sample_rounds}) == [0, 1]
        assert r.rounds_id.count("+") == 1
    assert out[0].rounds_id == out[1].rounds_id
    assert latency_ratio(out[1], out[0]).paired


def test_a_config_that_fails_in_one_process_is_that_failure_naming_the_process(monkeypatch):
    from mamba_decoder.bench.results import BenchmarkResult

    s = tiny(processes=2)
    ok = BenchmarkResult.from_samples([1.0, 1.1], sample_rounds=[0, 0], rounds_id="a", model_name="Regular Mamba",
                                      sequence_length=8, batch_size=1, dim=32, backend="fast", dtype="float32",
                                      device="cpu", num_parameters=1)
    bad = BenchmarkResult.failed("oom", "out of memory", model_name="Regular Mamba", sequence_length=8, batch_size=1,
                                 dim=32, backend="fast", dtype="float32", device="cpu")
    merged = runner.merge_processes([ok, bad], s)
    assert merged.status == "oom" and merged.message == "process 2 of 2: out of memory"
    skipped = BenchmarkResult.failed("skipped", "no Mamba mixer", model_name="MLABlock", sequence_length=8,
                                     batch_size=1, dim=32, backend="mamba_ssm", dtype="float32", device="cpu")
    assert runner.merge_processes([skipped, skipped], s).message == "no Mamba mixer"   # the same everywhere: as is
    both = runner.merge_processes([ok, ok.model_copy(update=dict(rounds_id="b"))], s)
    assert both.ok and both.samples_ms == [1.0, 1.1, 1.0, 1.1] and both.rounds_id == "a+b"


def test_a_worker_process_that_dies_leaves_error_records_naming_it(monkeypatch):
    monkeypatch.setattr(runner, "worker_command", lambda: [sys.executable, "-c", "import sys; sys.exit(3)"])
    out = run_sweep(tiny(models=["Regular Mamba"], batch_sizes=[1], processes=2), progress=False)
    assert len(out) == 2
    assert all(r.status == "error" and r.message.startswith("not measured: process 1 of 2 exited with code 3")
               for r in out)


def _fake_worker(tmp_path, s, bad_shapes, how, startup_s=0.0):
    """A stand-in for worker.py that starts in milliseconds: it prints READY, then a ready-made ok
    record for each config it is given, and on `bad_shapes` ((seq, batch)...) crashes (SIGSEGV)
    or hangs."""
    lines = {f"{c.model_name}|{c.sequence_length}|{c.batch_size}": "RECORD " + _ok_record(c, s).model_dump_json()
             for c in iter_configs(s)}
    (tmp_path / "records.json").write_text(json.dumps(lines))
    script = tmp_path / "worker.py"
    script.write_text(f"""import json, os, signal, sys, time
lines = json.load(open({str(tmp_path / "records.json")!r}))
configs = json.loads(sys.stdin.read())["configs"]
time.sleep({startup_s!r})
print("READY", flush=True)
for c in configs:
    if [c["sequence_length"], c["batch_size"]] in {[list(b) for b in bad_shapes]!r}:
        if {how!r} == "crash":
            os.kill(os.getpid(), signal.SIGSEGV)
        time.sleep(600)
    print(lines[f"{{c['model_name']}}|{{c['sequence_length']}}|{{c['batch_size']}}"], flush=True)
""")
    return [sys.executable, str(script)]


@pytest.mark.parametrize("how", ["crash", "hang"])
def test_a_worker_that_crashes_or_hangs_costs_its_shape_only(tmp_path, monkeypatch, how):
    """--processes 2 over 4 shapes, the worker crashing (SIGSEGV) or hanging (past a 1 s
    --config-timeout) at the second: that shape's config is the failure, naming the process and
    the cause; a fresh worker measured the two shapes after it, in both processes."""
    s = tiny(models=["Regular Mamba"], processes=2, config_timeout_s=1.0)
    cmd = _fake_worker(tmp_path, s, [(8, 2)], how)
    monkeypatch.setattr(runner, "worker_command", lambda: cmd)
    out = run_sweep(s, progress=False)
    assert [(r.sequence_length, r.batch_size) for r in out] == [(8, 1), (8, 2), (16, 1), (16, 2)]
    bad = out[1]
    assert [r.ok for r in out] == [True, False, True, True] and all(r.n_runs == 2 for r in out if r.ok)
    if how == "crash":
        assert bad.status == "error" and bad.message.startswith("not measured: process 1 of 2 killed by SIGSEGV")
    else:
        assert bad.status == "timeout" and bad.message.startswith(
            "not measured: process 1 of 2 printed no record for 1 s (--config-timeout 1 s a config")


def test_a_workers_start_up_does_not_count_against_its_first_shape(tmp_path, monkeypatch):
    """A worker takes 2 s to start (importing torch, a CUDA context) under a 1 s --config-timeout:
    start-up has its own limit (WORKER_START_S, 5 s here) and the first shape's time runs from
    the READY line, not from the launch."""
    monkeypatch.setattr(runner, "WORKER_START_S", 5.0)
    s = tiny(models=["Regular Mamba"], processes=2, config_timeout_s=1.0)
    monkeypatch.setattr(runner, "worker_command", lambda: _fake_worker(tmp_path, s, [], "crash", startup_s=2.0))
    out = run_sweep(s, progress=False)
    assert all(r.ok for r in out), [r.message for r in out]


def test_two_shapes_in_a_row_that_crash_cost_those_two_only(tmp_path, monkeypatch):
    """Two shapes in a row whose first config kills its worker (say, two sizes running out of
    memory; here SIGSEGV at the 1st and 2nd shape, each the first a fresh worker meets): each
    costs its shape, and the worker after them measures the rest. Only workers that end before
    they are ready to measure count as unable to start (these two were ready)."""
    s = tiny(models=["Regular Mamba"], processes=2)
    monkeypatch.setattr(runner, "worker_command", lambda: _fake_worker(tmp_path, s, [(8, 1), (8, 2)], "crash"))
    out = run_sweep(s, progress=False)
    assert [r.ok for r in out] == [False, False, True, True]
    assert all("killed by SIGSEGV" in r.message for r in out[:2])


def test_the_watchdog_pairs_each_limit_with_its_own_start(tmp_path, monkeypatch):
    """The watchdog read the start, then the limit: a record taken between its two reads paired the
    old start (a group of 3 configs, 6 s, some 3 s in) with the new limit (the next group's one
    config, 2 s) and killed a worker that was on time. Setting the start before the limit did not
    help (the reads came in the same order). Here the watchdog is held between its reads until
    the group's records are taken; the worker then measures the last config in 0.5 s."""
    import threading
    import time
    import types

    s = tiny(models=["Regular Mamba", "MambaDecoderBlock", "MLABlock"], sequence_lengths=[8], processes=2,
             config_timeout_s=2.0)
    todo = list(iter_configs(s))[:4]                        # shape (8, 1): 3 configs, then (8, 2): 1
    lines = [f"RECORD {_ok_record(c, s).model_dump_json()}" for c in todo]
    (tmp_path / "lines.json").write_text(json.dumps(lines))
    script = tmp_path / "worker.py"
    script.write_text(f"""import json, sys, time
lines = json.load(open({str(tmp_path / "lines.json")!r}))
sys.stdin.read()
print("READY", flush=True)
time.sleep(3.5)
print("\\n".join(lines[:3]), flush=True)
time.sleep(0.5)
print(lines[3], flush=True)
""")
    monkeypatch.setattr(runner, "worker_command", lambda: [sys.executable, str(script)])
    main, taken = threading.current_thread(), threading.Event()

    class Now(float):
        def __sub__(self, other):
            if threading.current_thread() is not main and float(self) - other > 2.5 and not taken.is_set():
                taken.wait(20)      # the watchdog, its start read 2.5 s on: held till a record is
                time.sleep(0.3)     # taken and the group's new limits are set
            return float(self) - other
    monkeypatch.setattr(runner, "time", types.SimpleNamespace(monotonic=lambda: Now(time.monotonic()),
                                                              sleep=time.sleep))
    got = []
    status, cause, ready = runner._run_worker(todo, s, s.process_share(0), "process 1 of 2",
                                              lambda r: got.append(r) or taken.set())
    assert [r.key for r in got] == [c.key(s) for c in todo], (status, cause)


def test_a_worker_that_cannot_start_costs_every_config_after_two_tries(monkeypatch):
    calls = []
    monkeypatch.setattr(runner, "worker_command",
                        lambda: calls.append(1) or [sys.executable, "-c", "import sys; sys.exit(3)"])
    out = run_sweep(tiny(models=["Regular Mamba"], processes=2), progress=False)
    assert len(out) == 4 and len(calls) == 4     # two tries a process, then the rest recorded
    assert all(r.status == "error" and r.message.startswith("not measured: process 1 of 2 exited with code 3")
               for r in out)


def _ok_record(c, s):
    from mamba_decoder.bench.results import BenchmarkResult, record_identity

    return BenchmarkResult.from_samples([1.0], num_parameters=1, **record_identity(c, s, s.device))


def test_a_record_for_a_config_the_worker_was_not_asked_for_is_ignored(tmp_path, monkeypatch):
    """A worker printing a record of a config it was not given (here: every config of the
    sweep, though asked for the last three): it was staged in processes/, counted by the progress
    bar and restarted the watchdog's clock. As --isolate does, only the configs asked for count."""
    from mamba_decoder.bench.results import read_jsonl

    s = tiny(models=["Regular Mamba"], processes=2)
    configs = list(iter_configs(s))
    (tmp_path / "all.txt").write_text("".join(f"RECORD {_ok_record(c, s).model_dump_json()}\n" for c in configs))
    monkeypatch.setattr(runner, "worker_command", lambda: [
        sys.executable, "-c", f"import sys; sys.stdin.read(); print(open({str(tmp_path / 'all.txt')!r}).read())"])
    parts = []
    out = list(runner.measure_in_processes(configs[1:], s, tmp_path / "processes", parts.append))
    assert [r.key for r in out] == [c.key(s) for c in configs[1:]] and all(r.ok for r in out)
    assert sorted(r.key for r in parts) == sorted(c.key(s) for c in configs[1:] for _ in range(2))
    for p in (1, 2):
        assert {r.key for r in read_jsonl(tmp_path / "processes" / f"process-{p}.jsonl")} == {
            c.key(s) for c in configs[1:]}


def test_staged_records_of_configs_not_measured_now_are_not_counted(tmp_path, monkeypatch):
    """--resume of a --processes run interrupted while its merged records were being written (or
    resumed with fewer --models): processes/ still holds records of configs already merged into
    results.jsonl, which run_sweep counts as done. They were passed to on_part too, so the progress
    bar counted those configs twice and went past its total."""
    from mamba_decoder.bench.results import RecordWriter

    s = tiny(models=["Regular Mamba"], processes=2)
    configs = list(iter_configs(s))
    (tmp_path / "processes").mkdir()
    for p in (1, 2):
        with RecordWriter(tmp_path / "processes" / f"process-{p}.jsonl") as w:
            for c in configs:
                w.write(_ok_record(c, s))
    monkeypatch.setattr(runner, "worker_command", lambda: pytest.fail("every config was staged"))
    parts = []
    out = list(runner.measure_in_processes(configs[1:], s, tmp_path / "processes", parts.append))
    assert [r.key for r in out] == [c.key(s) for c in configs[1:]]
    assert len(parts) == 2 * 3


def test_a_worker_that_ends_before_reading_its_configs_is_recorded_not_raised(monkeypatch):
    """A worker that ends before it reads stdin (an import that fails; or one the watchdog kills
    while the parent is still writing a payload larger than the pipe holds): writing the configs
    raised BrokenPipeError out of the whole sweep. Now it is a worker that ended before a record."""
    import subprocess

    class Ended(subprocess.Popen):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.wait()        # the worker is gone before the parent writes its configs

    monkeypatch.setattr(runner.subprocess, "Popen", Ended)
    monkeypatch.setattr(runner, "worker_command", lambda: [sys.executable, "-c", "import sys; sys.exit(3)"])
    out = run_sweep(tiny(models=["Regular Mamba"], processes=2), progress=False)
    assert len(out) == 4
    assert all(r.status == "error" and r.message.startswith("not measured: process 1 of 2 exited with code 3")
               for r in out)


def test_processes_with_a_config_timeout_measure_in_the_real_worker():
    """--processes 2 --config-timeout: each worker rebuilds its share's settings (worker.py), which
    kept config_timeout_s with processes=1 and no --isolate, so validation refused them ("--config-
    timeout applies to --isolate and --processes"): every worker exited at start and every config
    became an error record. The timeout is the parent's watchdog's, not the worker's."""
    s = tiny(models=["Regular Mamba"], sequence_lengths=[8], batch_sizes=[1], processes=2, config_timeout_s=600.0)
    out = run_sweep(s, progress=False)
    assert len(out) == 1 and out[0].ok and out[0].n_runs == 2, out[0].message


def test_processes_refuse_isolate_and_more_processes_than_runs():
    with pytest.raises(ValueError, match="--isolate .* does not combine"):
        tiny(processes=2, isolate=True)
    with pytest.raises(ValueError, match=r"--processes 3 .* at least as many runs \(--runs 2\)"):
        tiny(processes=3)


def test_merged_processes_take_the_gemm_probes_median_and_keep_memory_with_its_peak():
    """Two processes' CPU GEMM probes of 1 and 3 TFLOP/s: the median is 2 (not the larger one),
    and MFU is against it. CUDA's memory_mb (the config's memory above the weights) comes from
    the process whose peak_memory_mb the merged record keeps (the largest), so that
    peak_memory_mb - memory_mb is still one process's weights and base, not a mix."""
    from mamba_decoder.bench.results import BenchmarkResult

    ident = dict(model_name="Regular Mamba", sequence_length=8, batch_size=1, dim=32, backend="fast",
                 dtype="float32", num_parameters=1, flops=2e9)
    cpu = [BenchmarkResult.from_samples([1.0, 1.0], sample_rounds=[0, 0], rounds_id=i, device="cpu",
                                        peak_tflops=t, **ident) for i, t in (("a", 1.0), ("b", 3.0))]
    m = runner.merge_processes(cpu, tiny(processes=2))
    assert m.peak_tflops == pytest.approx(2.0) and m.mfu == pytest.approx(m.tflops_per_sec / 2.0)
    gpu = [BenchmarkResult.from_samples([1.0, 1.0], sample_rounds=[0, 0], rounds_id=i, device="cuda",
                                        peak_memory_mb=peak, memory_mb=mem, **ident)
           for i, peak, mem in (("a", 100.0, 40.0), ("b", 130.0, 70.0))]
    m = runner.merge_processes(gpu, tiny(processes=2))
    assert m.peak_memory_mb == 130.0 and m.memory_mb == 70.0


def test_a_worker_process_killed_by_a_signal_is_named_as_isolate_names_it(monkeypatch):
    """The kernel's OOM killer (SIGKILL) ending process 2: its records say so, as --isolate's
    do, not 'exited with code -9'."""
    kill = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    monkeypatch.setattr(runner, "worker_command", lambda: [sys.executable, "-c", kill])
    out = run_sweep(tiny(models=["Regular Mamba"], batch_sizes=[1], sequence_lengths=[8], processes=2),
                    progress=False)
    (r,) = out
    assert r.status == "error" and "killed by SIGKILL (signal 9), possibly out of host memory" in r.message, r.message
