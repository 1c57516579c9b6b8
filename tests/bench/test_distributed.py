"""Sweeps under torchrun (gloo, CPU): sharding, one merged result set, a killed rank, --resume.

The end-to-end tests launch `python -m torch.distributed.run --standalone` with 2 and 3 processes
at tiny sizes (12 configs, 1 thread each); the whole file takes about a minute on two cores.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from mamba_decoder.bench import torchrun as D
from mamba_decoder.bench.flops import forward_flops
from mamba_decoder.bench.registry import build_model
from mamba_decoder.bench.results import BenchmarkResult, load_run, read_jsonl
from mamba_decoder.bench.runner import Config, SweepSettings, iter_configs

from .conftest import make_record

ARGS = ["--dim", "32", "--seq-lens", "8", "16", "--batch-sizes", "1", "2", "--runs", "1",
        "--warmup", "0", "--no-cuda", "--no-progress", "--threads", "1"]
SETTINGS = SweepSettings(dim=32, sequence_lengths=[8, 16], batch_sizes=[1, 2], warmup=0, runs=1,
                         threads=1)
ALL_KEYS = {c.key(SETTINGS) for c in iter_configs(SETTINGS)}


def _cost(c: Config) -> float:
    return D.expected_cost(c, SETTINGS)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "DYING_RANK")}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def _bench(out: Path, *extra: str, nproc: int | None = None, env=None,
           entry=("-m", "mamba_decoder.bench.distributed")) -> subprocess.CompletedProcess:
    """`python -m mamba_decoder.bench.distributed run`, under torchrun when nproc is given."""
    launcher = [] if nproc is None else ["-m", "torch.distributed.run", "--standalone",
                                         "--nproc-per-node", str(nproc)]
    cmd = [sys.executable, *launcher, *entry, "run", *ARGS, "--output-dir", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env or _env())


def _rank_records(out: Path) -> dict[int, list[tuple[BenchmarkResult, dict]]]:
    return {int(p.stem.split("-")[1]): D.read_rank_file(p)
            for p in sorted((out / "ranks").glob("rank-*.jsonl"))}


def _lines(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


# ---------------------------------------------------------------- sharding
def _configs(n_models=3) -> list[Config]:
    s = SweepSettings(dim=512, backends=["reference", "fast"], dtypes=["float32", "bfloat16"],
                      models=list(SETTINGS.models)[:n_models])
    return list(iter_configs(s)), s


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8, 200])
def test_shard_puts_every_config_in_exactly_one_shard_in_sweep_order(world):
    configs, s = _configs()
    shards = D.shard(configs, world, lambda c: D.expected_cost(c, s))
    assert len(shards) == world
    flat = [c for sh in shards for c in sh]
    assert Counter(flat) == Counter(configs) and len(flat) == len(configs) == 240
    pos = {c: i for i, c in enumerate(configs)}
    for sh in shards:   # a rank keeps the sweep's order, so it reuses its built models
        assert [pos[c] for c in sh] == sorted(pos[c] for c in sh)
    if world > len(configs):
        assert sum(1 for sh in shards if not sh) == world - len(configs)


def test_shard_is_deterministic_and_independent_of_input_order():
    configs, s = _configs()
    cost = lambda c: D.expected_cost(c, s)  # noqa: E731
    a = D.shard(configs, 4, cost)
    assert D.shard(configs, 4, cost) == a
    shuffled = configs[::-1][1::2] + configs[::-1][0::2]
    b = D.shard(shuffled, 4, cost)
    assert [set(x) for x in b] == [set(x) for x in a]
    # equal costs: ties go by config key, so the unit-cost plan is a fixed round robin of keys
    u = D.shard(configs, 3)
    by_key = sorted(configs, key=D._order_key)
    assert [set(x) for x in u] == [set(by_key[r::3]) for r in range(3)]


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_shard_balances_expected_cost(world):
    configs, s = _configs()
    costs = {c: D.expected_cost(c, s) for c in configs}
    loads = [sum(costs[c] for c in sh) for sh in D.shard(configs, world, costs.__getitem__)]
    total, biggest = sum(costs.values()), max(costs.values())
    lower_bound = max(total / world, biggest)   # no plan beats this
    assert max(loads) <= 4 / 3 * lower_bound + 1e-6 * total
    assert max(loads) <= total / world + biggest
    assert sum(loads) == pytest.approx(total)


def test_shard_is_within_four_thirds_of_the_brute_force_optimum():
    costs = [13.0, 11.0, 9.0, 7.0, 7.0, 5.0, 4.0, 3.0, 2.0]   # LPT's classic near-worst cases
    configs = [Config("Regular Mamba", "reference", "float32", 8, b) for b in range(1, len(costs) + 1)]
    cost = dict(zip(configs, costs))
    for world in (2, 3):
        lpt = max(sum(cost[c] for c in sh) for sh in D.shard(configs, world, cost.__getitem__))
        opt = min(max(sum(c for c, r in zip(costs, owner) if r == k) for k in range(world))
                  for owner in itertools.product(range(world), repeat=len(costs)))
        assert opt <= lpt <= (4 / 3 - 1 / (3 * world)) * opt + 1e-9
    # the instance where greedy in input order is bad and LPT is optimal: 2 ranks, [3,3,2,2,2]
    five = configs[:5]
    c5 = dict(zip(five, [3.0, 3.0, 2.0, 2.0, 2.0]))
    assert max(sum(c5[c] for c in sh) for sh in D.shard(five, 2, c5.__getitem__)) == 7.0


def test_shard_rejects_bad_input():
    configs, _ = _configs(1)
    with pytest.raises(ValueError, match="world_size: 0 is not an integer >= 1"):
        D.shard(configs, 0)
    with pytest.raises(ValueError, match="duplicates"):
        D.shard(configs + configs[:1], 2)
    with pytest.raises(ValueError, match="costs must be finite"):
        D.shard(configs, 2, lambda c: float("nan"))


def test_expected_cost_is_the_forward_flops_of_the_model():
    for name in SETTINGS.models:
        with torch.device("meta"):
            m = build_model(name, 32, "reference", max_seq_len=4096)
        cfg = Config(name, "reference", "float32", 16, 2)
        assert D.expected_cost(cfg, SETTINGS) == forward_flops(m, 2, 16).total > 0
    mla = [D.expected_cost(Config("MLABlock", "reference", "float32", L, 1), SETTINGS) for L in (8, 16)]
    assert mla[1] > 2 * mla[0]   # attention is quadratic in the sequence


# ---------------------------------------------------------------- environment and provenance
def test_dist_env_reads_torchrun_variables(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert D.dist_env() is None
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert D.dist_env() == (5, 8, 1) and D.dist_env().local_rank == 1
    monkeypatch.setenv("RANK", "8")
    with pytest.raises(ValueError, match="RANK 8 / WORLD_SIZE 8"):
        D.dist_env()


def test_init_turns_multicast_off_and_picks_gloo_on_cpu(monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for k in D.MULTICAST_OFF:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")   # a user's own setting is kept (setdefault)
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(port)).items():
        monkeypatch.setenv(k, v)
    assert D.init() == (0, 1, 0)
    try:
        assert torch.distributed.get_backend() == "gloo"
        assert {k: os.environ[k] for k in D.MULTICAST_OFF} == {
            "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    finally:
        torch.distributed.destroy_process_group()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="backend 'nccl' needs CUDA"):
            D.init("nccl")


def test_rank_lines_carry_provenance_and_a_cut_line_is_skipped(tmp_path):
    info = {"rank": 3, "world_size": 4, "host": "node7", "device_name": "NVIDIA H100 80GB HBM3"}
    recs = [make_record(seq=8), make_record(seq=16, model="MLABlock")]
    path = tmp_path / "rank-3.jsonl"
    text = "".join(D.rank_line(r, info) + "\n" for r in recs)
    line = json.loads(text.splitlines()[0])
    assert (line["rank"], line["host"], line["device_name"]) == (3, "node7", "NVIDIA H100 80GB HBM3")
    path.write_text(text + text.splitlines()[0][:40])   # a kill mid-write leaves half a line
    back = D.read_rank_file(path)
    assert [r for r, _ in back] == [r.model_copy(update=info) for r in recs]   # the record's own fields
    assert all(p == info for _, p in back)
    path.write_text(text.splitlines()[0][:40] + "\n" + text)
    with pytest.raises(ValueError, match="rank-3.jsonl:1: not a valid rank record"):
        D.read_rank_file(path)


def test_device_kinds_and_the_mixed_devices_warning():
    a, b = make_record(seq=8, device="cuda:0"), make_record(seq=16, device="cuda:1")
    c = make_record(seq=32, device="cpu")
    prov = {(a.key, a.timestamp): {"device_name": "NVIDIA H100 80GB HBM3"},
            (b.key, b.timestamp): {"device_name": "NVIDIA H200"}}
    assert D.device_kinds([a, b, c], prov) == {"NVIDIA H100 80GB HBM3", "NVIDIA H200", "cpu"}
    assert D.device_kinds([a, b]) == {"cuda"}
    assert D.device_kinds([a, c], prov, default="AMD EPYC") == {"NVIDIA H100 80GB HBM3", "AMD EPYC"}
    assert D.mixed_devices_warning({"x"}) is None
    infos = [{"rank": r, "local_rank": r, "host": "h", "device": f"cuda:{r}", "device_name": n}
             for r, n in enumerate(["NVIDIA H100 80GB HBM3", "NVIDIA H200"])]
    env = D.run_environment({"device_name": "NVIDIA H100 80GB HBM3"}, infos, "nccl",
                            D.device_kinds([a, b], prov), [[a], [b]], {0: 1, 1: 1}, {})
    assert env["device_name"] == "MIXED DEVICES: NVIDIA H100 80GB HBM3; NVIDIA H200"
    assert env["distributed"]["warning"].startswith("records come from 2 kinds of device")
    assert [r["device_name"] for r in env["distributed"]["ranks"]] == ["NVIDIA H100 80GB HBM3", "NVIDIA H200"]


@pytest.mark.parametrize("variant", [dict(compile=True), dict(mode="decode", cache_kind="full"),
                                     dict(mode="train", optimizer_step=True)])
def test_merge_records_unfinished_configs_of_a_variant_under_their_own_key(variant, tmp_path):
    """A rank that did not finish: each of its configs gets an error record whose key is the
    config's own, variant and level included, so the merge returns every config of the sweep."""
    s = SweepSettings(dim=32, sequence_lengths=[8, 16], batch_sizes=[1], warmup=0, runs=1,
                      models=["Regular Mamba"], **variant)
    assert s.variant
    configs = list(iter_configs(s))
    shards = [configs[:1], configs[1:]]
    infos = [{"rank": r, "world_size": 2, "local_rank": r, "host": "h", "device": "cpu",
              "device_name": "cpu"} for r in range(2)]
    done = make_record(seq=8, mode=s.mode, variant=s.variant, backend=configs[0].backend,
                       dim=32, warmup=0)
    assert done.key == configs[0].key(s)
    out = D.merge(tmp_path, s, shards, {0: [(done, infos[0])], 1: []}, infos, {1: "killed"})
    assert [r.key for r in out] == [c.key(s) for c in configs]
    (failed,) = out[1:]
    assert (failed.status, failed.variant, failed.level, failed.mode) == ("error", s.variant, "block", s.mode)
    assert failed.message == "rank 1 did not finish (killed)"
    assert {r.key for r in load_run(tmp_path)} == {c.key(s) for c in configs}


# ---------------------------------------------------------------- end to end under torchrun
@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The same command without torchrun: the ordinary single-process run."""
    out = tmp_path_factory.mktemp("single") / "out"
    p = _bench(out, "--no-plots")
    assert p.returncode == 0, p.stderr[-2000:]
    assert not (out / "ranks").exists()
    return out


def test_two_ranks_give_the_single_process_result_set(single, tmp_path):
    out = tmp_path / "two"
    p = _bench(out, nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    single_keys = {r.key for r in load_run(single)}
    assert single_keys == ALL_KEYS and len(single_keys) == 12
    lines = read_jsonl(out / "results.jsonl")
    assert len(lines) == 12 and {r.key for r in lines} == single_keys   # none twice
    assert all(r.ok and r.latency_ms > 0 for r in lines)
    per_rank = _rank_records(out)
    assert sorted(per_rank) == [0, 1]
    expected = D.shard(list(iter_configs(SETTINGS)), 2, _cost)
    for r, recs in per_rank.items():
        assert [rec.key for rec, _ in recs] == [c.key(SETTINGS) for c in expected[r]]
        assert {(p["rank"], p["world_size"], p["host"]) for _, p in recs} == {(r, 2, socket.gethostname())}
        assert all(p["device_name"] for _, p in recs)
    assert Counter(rec.key for recs in per_rank.values() for rec, _ in recs) == Counter(ALL_KEYS)
    prov = D.read_provenance(out)
    assert len(prov) == 12 and {v["rank"] for v in prov.values()} == {0, 1}
    env = json.loads((out / "environment.json").read_text())
    ranks = env["distributed"]["ranks"]
    assert [(x["rank"], x["host"], x["device"], x["configs_recorded"], x["finished"]) for x in ranks] \
        == [(0, socket.gethostname(), "cpu", len(expected[0]), True),
            (1, socket.gethostname(), "cpu", len(expected[1]), True)]
    assert env["distributed"]["warning"] is None and len(env["distributed"]["device_kinds"]) == 1
    # the host allocator the ranks measured with (the default, retain), as the single run says
    assert env["host_allocator"] == json.loads((single / "environment.json").read_text())["host_allocator"]
    assert len(list(out.glob("*.png"))) == 8 and (out / "results.csv").is_file()
    assert "[rank 1]" in p.stdout and "[rank 0]" in p.stdout
    # the one banner (execute's): the kernels each model runs, then the ranks' shares
    assert "Kernels Regular Mamba (fast, float32): scan=cpu" in p.stdout and "distributed: 2 ranks" in p.stdout


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """3 ranks; rank 1 dies (os._exit) right after its first record."""
    out = tmp_path_factory.mktemp("killed") / "out"
    p = _bench(out, "--no-plots", nproc=3, env=_env(DYING_RANK="1:1"),
               entry=(str(Path(__file__).with_name("dying_rank.py")),))
    return out, p


def test_a_killed_rank_loses_only_its_unfinished_configs(killed, single):
    out, p = killed
    assert p.returncode != 0
    shards = D.shard(list(iter_configs(SETTINGS)), 3, _cost)
    assert len(shards[1]) >= 2, "rank 1 must have configs left when it dies"
    recs = load_run(out)
    by_key = {r.key: r for r in recs}
    # every config has a record (on failure, torchrun's own account of the run: seen empty once in CI)
    assert set(by_key) == {r.key for r in load_run(single)}, (
        f"rc {p.returncode}; files {[(f.name, f.stat().st_size) for f in out.iterdir() if f.is_file()]}\n"
        f"{p.stderr[:3000]}")
    assert len(read_jsonl(out / "results.jsonl")) == 12       # none twice
    first_of_1 = shards[1][0].key(SETTINGS)
    per_rank = _rank_records(out)
    assert [rec.key for rec, _ in per_rank[1]] == [first_of_1]
    written = {rec.key: rec for recs in per_rank.values() for rec, _ in recs}
    for rank, shard_ in enumerate(shards):
        for cfg in shard_:
            r = by_key[cfg.key(SETTINGS)]
            if r.key in written:   # every record a rank finished is in the result set, as written
                assert r == written[r.key] and r.ok and r.latency_ms > 0
            elif rank == 1:
                assert r.status == "error" and r.latency_ms is None
                assert r.message == "rank 1 did not finish (no word from it: its process was killed or crashed)"
            else:   # torchrun stops the healthy ranks when one fails: named as such
                assert r.status == "error" and r.message.startswith(
                    f"rank {rank} did not finish (stopped by SIGTERM: torchrun stops every rank")
    assert sum(r.ok for r in recs) == len(written) >= 1
    env = json.loads((out / "environment.json").read_text())
    assert [x["configs_recorded"] for x in env["distributed"]["ranks"]] == \
        [len(per_rank.get(r, [])) for r in range(3)]
    assert [x["finished"] for x in env["distributed"]["ranks"]] == \
        [len(per_rank.get(r, [])) == len(shards[r]) for r in range(3)]
    assert env["distributed"]["ranks"][1]["configs_recorded"] == 1
    assert "finish them with --resume" in p.stderr


def test_resume_on_two_ranks_finishes_the_killed_ranks_configs(killed, single, tmp_path):
    src, _ = killed
    out = tmp_path / "resumed"
    shutil.copytree(src, out)
    before = {r.key: r for r in load_run(out)}
    unfinished = {k for k, r in before.items() if not r.ok}
    assert len(unfinished) >= 1
    p = _bench(out, "--no-plots", "--resume", nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resume: {12 - len(unfinished)} configs already recorded ok; {len(unfinished)} to measure" in p.stderr
    after = {r.key: r for r in load_run(out)}
    assert set(after) == {r.key for r in load_run(single)} and all(r.ok for r in after.values())
    for k, r in before.items():   # what finished before is kept as it was, not run again
        if r.ok:
            assert after[k] == r
    new = [rec.key for recs in _rank_records(out).values() for rec, _ in recs]
    assert Counter(new) == Counter(unfinished)   # re-run exactly the unfinished, each once
    assert sorted(p.name for p in (out / "ranks" / "attempt-1").glob("rank-*.jsonl")) == \
        ["rank-0.jsonl", "rank-1.jsonl", "rank-2.jsonl"]
    assert len(read_jsonl(out / "results.jsonl")) == 12 + len(unfinished)
