"""Issue 15: nothing lost, nothing crashes (the API on a finished run, a full disk, unwritable
folders, --isolate faults, memory estimates, Ctrl-C, bad input)."""
import errno
import json
import os

import pytest
import torch

from mamba_decoder.bench import results as R
from mamba_decoder.bench.results import read_jsonl

from .conftest import TINY, run

ONE = dict(dim=16, sequence_lengths=[4, 8], batch_sizes=[1], use_cuda=False, models=["Regular Mamba"],
           warmup=0, runs=1, verbose=False, progress=False)


def test_api_refuses_a_finished_run_without_resume_and_keeps_its_records(tmp_path):
    from mamba_decoder.bench.api import run_scaling_benchmarks

    out = tmp_path / "run"
    first = run_scaling_benchmarks(output_dir=out, **ONE)
    with pytest.raises(ValueError, match="is not empty .*--resume"):
        run_scaling_benchmarks(output_dir=out, **{**ONE, "sequence_lengths": [4]})
    assert read_jsonl(out / "results.jsonl") == first and len(first) == 2


def test_resume_keeps_the_original_start_time(tmp_path):
    from mamba_decoder.bench.api import run_scaling_benchmarks

    out = tmp_path / "run"
    run_scaling_benchmarks(output_dir=out, **{**ONE, "sequence_lengths": [4]})
    env = json.loads((out / "environment.json").read_text())
    env["time"] = "2001-01-01T00:00:00+00:00"        # the run began long ago
    (out / "environment.json").write_text(json.dumps(env))
    run_scaling_benchmarks(output_dir=out, resume=True, **ONE)
    assert json.loads((out / "environment.json").read_text())["time"] == "2001-01-01T00:00:00+00:00"
    run_scaling_benchmarks(output_dir=out, overwrite=True, **ONE)   # a new run: a new start
    assert json.loads((out / "environment.json").read_text())["time"] != "2001-01-01T00:00:00+00:00"


def _disk_full_after(monkeypatch, n_ok: int):
    """os.write in results.py fails with ENOSPC after `n_ok` calls, once half a record is out."""
    real, calls = os.write, {"n": 0}

    def write(fd, data):
        calls["n"] += 1
        if calls["n"] > n_ok:
            real(fd, bytes(data[:len(data) // 2]))        # a torn half, as a full disk leaves it
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)
    monkeypatch.setattr(R.os, "write", write)


def test_disk_full_mid_sweep_is_one_line_keeps_whole_records_and_resumes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    argv = ["run", *TINY, "--models", "Regular Mamba", "--no-plots", "--output-dir", str(out)]
    with monkeypatch.context() as mp:
        _disk_full_after(mp, 2)
        code, _, err = run(argv, capsys)
    assert code == 4, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines == [f"error: cannot write {out / 'results.jsonl'} (No space left on device); every whole "
                     f"record is kept in {out / 'results.jsonl'} (make room, then continue with --resume)"]
    assert (out / "results.jsonl").read_bytes().endswith(b"\n")      # no half record left
    assert len(read_jsonl(out / "results.jsonl")) == 2
    assert not list(out.glob("*.tmp"))
    code, _, err = run([*argv, "--resume"], capsys)
    assert code == 0, err
    final = read_jsonl(out / "results.jsonl")
    assert len(final) == 4 and all(r.ok for r in final) and len({r.key for r in final}) == 4


def test_disk_full_writing_the_csv_is_one_line_and_leaves_no_tmp(tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"

    def replace(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(R.os, "replace", replace)
    code, _, err = run(["run", *TINY, "--seq-lens", "8", "--batch-sizes", "1", "--no-plots",
                        "--output-dir", str(out)], capsys)
    assert code == 4 and err.count("\n") == 1 and "results.csv (No space left on device)" in err
    assert sorted(p.name for p in out.iterdir()) == [".mamba-bench.lock", "environment.json", "results.jsonl"]
    assert len(read_jsonl(out / "results.jsonl")) == 3


@pytest.mark.parametrize("cmd", ["run", "resume", "report"])
def test_an_unwritable_output_folder_is_refused_before_starting(cmd, tmp_path, capsys, monkeypatch):
    """Tests run as root, for whom permission bits allow everything: os.access says what a
    read-only folder (or a read-only mount, shown live in the report) answers."""
    from mamba_decoder.bench.api import run_scaling_benchmarks

    out = tmp_path / "ro"
    if cmd != "run":
        run_scaling_benchmarks(output_dir=out, **{**ONE, "sequence_lengths": [4]})
    before = {p.name: p.read_bytes() for p in out.iterdir()} if out.exists() else {}
    real = os.access
    monkeypatch.setattr(R.os, "access", lambda p, mode, **k: False if str(p).startswith(str(out)) and
                        mode & os.W_OK else real(p, mode, **k))
    argv = {"run": ["run", *TINY, "--output-dir", str(out)],
            "resume": ["run", *TINY, "--resume", "--output-dir", str(out)],
            "report": ["report", str(out)]}[cmd]
    code, stdout, err = run(argv, capsys)
    assert code == 2 and err == f"error: --output-dir: cannot write to '{out}' (not writable; choose another folder)\n"
    assert "COMPREHENSIVE" not in stdout               # refused before the banner
    if before:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def _worker_printing(monkeypatch, code: str):
    import sys

    from mamba_decoder.bench import runner
    monkeypatch.setattr(runner, "worker_command", lambda: [sys.executable, "-c", code])


BAD_RECORD_LINES = [
    'RECORD {"model_name": "Regular Mamba", "sequence_len',            # cut short
    'RECORD not json at all',
    'RECORD {"model_name": "x"}',                                      # valid JSON, not a record
]


def test_isolate_a_malformed_record_line_costs_that_row_only(monkeypatch):
    from mamba_decoder.bench import runner
    from mamba_decoder.bench.runner import run_sweep
    from mamba_decoder.bench.settings import SweepSettings

    import sys

    from mamba_decoder.bench.results import record_identity
    from mamba_decoder.bench.settings import Config

    s = SweepSettings(dim=32, sequence_lengths=[8], batch_sizes=[1, 2, 3, 4], models=["Regular Mamba"],
                      backends=["reference"], warmup=0, runs=1, isolate=True)
    good = R.BenchmarkResult.from_samples([1.0], **record_identity(Config("Regular Mamba", "reference",
                                                                         "float32", 8, 1), s, "cpu"))
    lines = ["RECORD " + good.model_dump_json(), *BAD_RECORD_LINES]
    calls = {"n": 0}

    def command():     # the first config's worker prints a whole record; the others a bad line
        calls["n"] += 1
        return [sys.executable, "-c", f"print({lines[calls['n'] - 1]!r})"]
    monkeypatch.setattr(runner, "worker_command", command)
    out = run_sweep(s, progress=False)
    assert [r.status for r in out] == ["ok", "error", "error", "error"] and out[0] == good
    assert all("worker's record is not valid" in r.message for r in out[1:])
    assert [r.batch_size for r in out] == [1, 2, 3, 4]


def test_isolate_a_hanging_worker_is_killed_and_recorded_as_timeout(monkeypatch, tmp_path, capsys):
    _worker_printing(monkeypatch, "import time; time.sleep(60)")
    code, out, err = run(["run", *TINY, "--seq-lens", "8", "--batch-sizes", "1", "--isolate", "--no-plots",
                          "--models", "Regular Mamba", "--config-timeout", "0.5", "--output-dir", str(tmp_path / "o")], capsys)
    assert code == 0, err
    recs = read_jsonl(tmp_path / "o" / "results.jsonl")
    assert len(recs) == 1 and recs[0].status == "timeout"
    assert "worker ran past --config-timeout 0.5 s and was killed" in recs[0].message
    assert "TIMEOUT: worker ran past" in out and "1 timeout" in out


def test_config_timeout_is_validated():
    from mamba_decoder.bench.runner import DEFAULT_CONFIG_TIMEOUT_S
    from mamba_decoder.bench.settings import SweepSettings

    assert SweepSettings(isolate=True).config_timeout_s is None and DEFAULT_CONFIG_TIMEOUT_S == 1800
    with pytest.raises(ValueError, match="--config-timeout applies to --isolate"):
        SweepSettings(config_timeout_s=5.0)
    with pytest.raises(ValueError, match="config timeout: -1.0 is not a finite number of seconds > 0"):
        SweepSettings(isolate=True, config_timeout_s=-1.0)


def test_memory_estimate_counts_the_reference_scan_and_attention_scores():
    from mamba_decoder.bench import flops
    from mamba_decoder.bench.runner import _meta_model
    from mamba_decoder.bench.settings import Config, SweepSettings

    s = SweepSettings(dim=64)
    B, ED, N = 2, 128, 16
    ref, fast = (_meta_model(Config("Regular Mamba", b, "float32", 8, 1), s) for b in ("reference", "fast"))
    # the scan's (B, L, ED, N) temporaries: 4 at L and 2 clones padded to a power of two
    for L in (1000, 1024):
        gap = (flops.peak_bytes(ref, B, L, 4).activations - flops.peak_bytes(fast, B, L, 4).activations)
        assert gap == (4 * B * L + 2 * B * 1024) * ED * N * 4
    mla = _meta_model(Config("MLABlock", "reference", "float32", 8, 1), s)
    a1, a2 = (flops.peak_bytes(mla, 1, L, 4).activations for L in (512, 1024))
    H = 16   # (B, H, S, S) scores: two fp32 einsum results and the fp32 softmax, plus the (S, S) mask
    assert a2 - 2 * a1 == (H * 12 + 4) * (1024 ** 2 - 2 * 512 ** 2)
    fast_mla = _meta_model(Config("MLABlock", "fast", "float32", 8, 1), s)
    assert flops.peak_bytes(fast_mla, 1, 1024, 2, cpu=False).activations < a2 / 10   # fused on CUDA
    w = flops.peak_bytes(ref, 1, 8, 4)
    t = flops.peak_bytes(ref, 1, 8, 4, train=True, optimizer_step=True)
    assert t.weights == 4 * w.weights and t.activations > w.activations


def test_memory_estimate_of_the_fast_mla_on_the_cpu_has_no_scores_where_sdpa_runs_flash():
    """The fast MLA pads V to Dqk on the CPU (policy's mla_pad_v), so SDPA runs its flash kernel
    and keeps no (B, H, S, S) scores: the estimate grows linearly in the sequence (it counted the
    math path's scores: 3.3x the measured peak at dim 256 B2 L1024, a 96 GiB `oom` at B8 L8192)."""
    from mamba_decoder.bench import flops
    from mamba_decoder.bench.runner import _meta_model
    from mamba_decoder.bench.settings import Config, SweepSettings
    from mamba_decoder.policy import KernelPolicy

    s = SweepSettings(dim=64)
    fast_mla = _meta_model(Config("MLABlock", "fast", "float32", 8, 1), s)
    a1, a2 = (flops.peak_bytes(fast_mla, 1, L, 4).activations for L in (2048, 4096))
    assert a2 < 2.01 * a1                                  # linear in L: no (S, S) term
    ref_mla = _meta_model(Config("MLABlock", "reference", "float32", 8, 1), s)
    r1, r2 = (flops.peak_bytes(ref_mla, 1, L, 4).activations for L in (2048, 4096))
    assert r2 > 3.5 * r1                                   # the reference's einsums keep them
    attn = next(m for m in fast_mla.modules() if type(m).__name__ == "MLA")
    attn.policy = KernelPolicy(cpu_kernels="torch")        # pad_v is not a cpu_kernels switch
    assert flops.peak_bytes(fast_mla, 1, 4096, 4).activations == a2


def test_memory_estimate_of_the_fast_mla_on_the_cpu_follows_the_blocked_attention():
    """With V wider than Dqk SDPA runs its math path (the scores), but fp32 CPU inference at
    S * T >= MIN_SCORES takes kernels/cpu_attention.py, which keeps no (B, H, S, S) scores: the
    estimate is linear in L there (it counted the scores: 935 MB against a measured 177 MB peak at
    dim 64 B1 L2048 v_head_dim 256). bf16 and training never take the blocked path: their estimate
    has neither its V^T nor fewer scores than with the CPU kernels off."""
    from mamba_decoder.bench import flops
    from mamba_decoder.bench.registry import build_model
    from mamba_decoder.config import BlockSizes
    from mamba_decoder.kernels import cpu_attention
    from mamba_decoder.policy import KernelPolicy

    with torch.device("meta"):
        m = build_model("MLABlock", 64, "fast", max_seq_len=8192, sizes=BlockSizes(v_head_dim=256))
    attn = next(x for x in m.modules() if type(x).__name__ == "MLA")
    if attn.policy.decide(torch.device("cpu"), torch.float32).cpu_attention:
        a1, a2 = (flops.peak_bytes(m, 1, L, 4).activations for L in (2048, 4096))
        assert a2 < 2.01 * a1                                  # linear in L: no (S, S) term
        assert cpu_attention.takes(2048, 2048)
    on = [flops.peak_bytes(m, 1, 2048, elt, train=train).activations for elt, train in ((2, False), (4, True))]
    attn.policy = KernelPolicy(cpu_kernels="torch")
    off = [flops.peak_bytes(m, 1, 2048, elt, train=train).activations for elt, train in ((2, False), (4, True))]
    assert on == off


def test_a_config_that_cannot_fit_is_recorded_oom_without_running_unless_forced(tmp_path, capsys, monkeypatch):
    from mamba_decoder.bench import runner

    built = []
    real = runner._build
    monkeypatch.setattr(runner, "_build", lambda cfg, s: built.append(cfg) or real(cfg, s))
    monkeypatch.setattr(runner, "available_memory", lambda device: 4 * 2**20)   # 4 MiB free
    argv = ["run", *TINY, "--models", "MLABlock", "--seq-lens", "8", "--batch-sizes", "1", "--no-plots"]
    code, out, err = run([*argv, "--output-dir", str(tmp_path / "a")], capsys)
    assert code == 0, err
    (r,) = read_jsonl(tmp_path / "a" / "results.jsonl")
    assert r.status == "oom" and "exceeds the 0.00391 GiB available (not run; --force runs it)" in r.message
    assert r.estimated_peak_mb > 4 and built == []
    code, out, err = run([*argv, "--force", "--output-dir", str(tmp_path / "b")], capsys)
    (r,) = read_jsonl(tmp_path / "b" / "results.jsonl")
    assert code == 0 and r.ok and r.estimated_peak_mb > 4 and len(built) == 1


def test_depth_is_bounded_by_memory_before_anything_is_built(tmp_path, capsys):
    import time

    t = time.perf_counter()
    code, out, err = run(["run", *TINY, "--level", "model", "--depth", "1000000000", "--models", "Mamba LM",
                          "--output-dir", str(tmp_path / "o")], capsys)
    assert time.perf_counter() - t < 5
    assert code == 2 and err.startswith("error: --depth: 1000000000 needs about ") and "accepted here: 1.." in err
    assert err.count("\n") == 1 and out == ""


def test_a_second_ctrl_c_while_winding_down_is_ignored():
    """A first Ctrl-C ends the run (exit 130); one a few ms later, which used to land in torch's
    atexit callback with a traceback, is ignored (live: 15 double Ctrl-C runs, 2-15 ms apart)."""
    import signal

    from mamba_decoder.bench.cli import _guarded

    previous = signal.getsignal(signal.SIGINT)

    def interrupted(argv):
        os.kill(os.getpid(), signal.SIGINT)      # the first Ctrl-C
        raise AssertionError("not interrupted")
    try:
        assert _guarded(interrupted, []) == 130
        os.kill(os.getpid(), signal.SIGINT)      # the second, during the wind-down or atexit
    finally:
        signal.signal(signal.SIGINT, previous)
    assert _guarded(lambda argv: 0, []) == 0 and signal.getsignal(signal.SIGINT) is previous


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("argv,needle", [
    (["--dim", "3_2"], "--dim: '3_2' is not an integer >= 1 (digits 0-9 only)"),
    (["--runs", "\u0663"], "--runs: '\u0663' is not an integer >= 1"),
    (["--batch-sizes", " 2"], "--batch-sizes: ' 2' is not an integer >= 1"),
    (["--min-time", "1_0"], "--min-time: '1_0' is not a number of seconds"),
    (["--seed", str(2**63)], f"seed: {2**63} is not an integer in 0..{2**63 - 1}"),
    (["--config-timeout", "5"], "--config-timeout applies to --isolate"),
])
def test_cli_numbers_are_read_strictly(argv, needle, tmp_path, capsys):
    code, out, err = run(["run", *TINY, *argv, "--output-dir", str(tmp_path / "o")], capsys)
    assert code == 2 and needle in err and err.count("\n") == 1 and out == ""


def test_the_largest_seed_measures():
    from mamba_decoder.bench.runner import measure
    from mamba_decoder.bench.settings import Config, SweepSettings

    s = SweepSettings(dim=16, sequence_lengths=[4], batch_sizes=[1], warmup=0, runs=1, seed=2**63 - 1)
    r = measure(Config("Regular Mamba", "reference", "float32", 4, 1), s)
    assert r.ok, r.message


@pytest.mark.parametrize("kw,message", [
    (dict(batch_sizes=5), "batch sizes: 5 is not a list (each an integer >= 1)"),
    (dict(sequence_lengths="16"), "sequence lengths: '16' is not a list"),
    (dict(dtype=torch.int8), "dtype 'torch.int8' is not one of: 'float32', 'bfloat16', 'float16'"),
    (dict(output_dir="/dev/null"), "--output-dir: '/dev/null' exists and is not a directory"),
    (dict(models="GPT"), "model 'GPT' is not one of"),
    (dict(use_cuda="no"), "use_cuda: 'no' is not True or False"),
    (dict(resume=1), "resume: 1 is not True or False"),
    (dict(isolate="no"), "isolate: 'no' is not True or False"),
    (dict(threads=999), "--threads: 999 is more than the"),
    (dict(seed=2**64), "seed: 18446744073709551616 is not an integer in 0.."),
    (dict(backend=None), "backend: None is not a list"),
], ids=lambda v: str(v)[:30])
def test_api_arguments_are_value_errors_naming_the_argument(kw, message, tmp_path):
    from mamba_decoder.bench.api import run_scaling_benchmarks

    with pytest.raises(ValueError) as e:
        run_scaling_benchmarks(**{**ONE, **kw})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_api_reads_one_name_a_torch_dtype_and_duplicates_as_meant():
    from mamba_decoder.bench.settings import SweepSettings

    s = SweepSettings(models="MLABlock", dtypes=torch.bfloat16, sequence_lengths=[16, 16, 8],
                      batch_sizes=(1, 1), backends=["reference", "reference"])
    assert (s.models, s.dtypes, s.sequence_lengths, s.batch_sizes, s.backends, s.n_configs) == (
        ["MLABlock"], ["bfloat16"], [16, 8], [1], ["reference"], 2)


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_mla_positions_outside_the_filled_cache_are_refused_alike(backend):
    from mamba_decoder.models import MLABlock

    torch.manual_seed(0)
    block = MLABlock(dim=32, n_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                     n_experts=2, n_activated=1, backend=backend)
    cache = block.init_cache(1, max_len=16)
    x = torch.randn(1, 4, 32)
    for bad in (-1, 1):                 # nothing filled yet: only 0 is a place to start
        with pytest.raises(ValueError, match=rf"start_pos={bad} is not in 0\.\.0: the cache holds 0 positions"):
            block(x, start_pos=bad, cache=cache)
    block(x, start_pos=0, cache=cache)
    block(x[:, :1], start_pos=4, cache=cache)         # right after the filled positions
    with pytest.raises(ValueError, match=r"start_pos=6 is not in 0\.\.5"):
        block(x[:, :1], start_pos=6, cache=cache)     # a gap of empty slots
    block(x, start_pos=0, cache=cache)                # over the old sequence: it now holds 4
    with pytest.raises(ValueError, match=r"start_pos=5 is not in 0\.\.4"):
        block(x[:, :1], start_pos=5, cache=cache)


def _blocks():
    from mamba_decoder.bench.registry import build_lm, build_model

    for name in ("Regular Mamba", "MambaDecoderBlock", "MLABlock"):
        yield name, build_model(name, 32, "reference", max_seq_len=64), False
    yield "Mamba LM", build_lm("Mamba LM", 32, "reference", depth=1, vocab_size=50), True
    yield "MambaDecoder", build_lm("MambaDecoder", 32, "reference", depth=1, vocab_size=50), True


def test_wrong_input_shapes_and_dtypes_name_what_the_blocks_take():
    for name, model, ids in _blocks():
        bads = ([torch.randn(2, 8), torch.randint(0, 50, (2, 8, 1)), torch.randint(0, 50, (8,))] if ids else
                [torch.randn(2, 8), torch.randn(2, 8, 16), torch.randint(0, 5, (2, 8, 32)),
                 torch.randn(2, 8, 32, dtype=torch.float64), torch.randn(1, 2, 8, 32)])
        expected = ("token ids of shape (batch, seq), an integer dtype" if ids else
                    "x of shape (batch, seq, 32) in torch.float32")
        for x in bads:
            with pytest.raises(ValueError) as e:
                model(x)
            assert expected in str(e.value) and f"got shape {tuple(x.shape)}, {x.dtype}" in str(e.value), name
