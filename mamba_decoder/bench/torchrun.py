"""Multi-process sweeps under torchrun: each rank measures its share, rank 0 keeps one result set.

    torchrun --nproc-per-node 8 -m mamba_decoder.bench.cli run --output-dir out ...
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:PORT \
        -m mamba_decoder.bench.cli run --output-dir /shared/out ...

(`-m mamba_decoder.bench.distributed run` is the same command.) Without torchrun's environment
(RANK, WORLD_SIZE, LOCAL_RANK) it is the ordinary single-process `mamba-bench run`; under it the
CLI hands `execute` this module's launcher, `Torchrun`:
- the configs still to measure are sharded by `shard` (longest expected cost first onto the least
  loaded rank; `expected_cost` is the forward's analytic FLOPs), the same plan on every rank
  because rank 0 computes it and broadcasts it;
- each rank pins its device (cuda:LOCAL_RANK) and appends its records, flushed and fsynced one by
  one, to <output_dir>/ranks/rank-{r}.jsonl: the record's JSON plus rank, world_size, host and
  device_name;
- after its shard every rank meets the others at a monitored barrier over a gloo group; rank 0
  gathers every rank's records over that group (so nodes need no shared disk when all goes
  well) and appends them to the run's results.jsonl, rewrites results.csv and environment.json
  (every rank's host and device) and draws the plots;
- when a rank dies, the barrier fails, or torchrun stops the group (SIGTERM), rank 0 merges what
  the rank files on its disk hold and records every config that did not finish as status "error"
  with message "rank R did not finish (...)". `--resume` (or torchrun's own restart,
  --max-restarts) measures those again, resharded over the ranks it runs on. Rank files of a
  multi-node run reach rank 0 on failure only when --output-dir is on a shared file system.

Each merged record carries rank, world_size, host and device_name; the rank files and
<output_dir>/provenance.jsonl (one line per merged record, keyed by the record's key and
timestamp) hold them too, for runs recorded before the records had those fields. `device_kinds`
reads any of them.
"""
from __future__ import annotations

import datetime as _dt
import heapq
import json
import os
import shutil
import signal
import socket
import sys
import time
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist

from . import report
from .execute import EXIT_INTERRUPTED, EXIT_UNEXPECTED, EXIT_USAGE, Outcome, Plan
from .flops import forward_flops
from .names import is_mixed, mixed_devices
from .registry import build_model
from .results import record_devices as device_kinds  # noqa: F401 (the rank merge's name for it)
from .results import (ENV_NAME, JSONL_NAME, PROVENANCE_NAME, RANKS_DIR, BenchmarkResult,
                      RecordWriter, UsageError, check_resume, environment, latest, prepare_run_dir,
                      read_environment, read_jsonl, record_identity, recorded_ok,
                      write_environment)
from .runner import apply_process_settings, measure_each
from .settings import Config, SweepSettings, iter_configs

# What a rank file adds to each record (and what BenchmarkResult should grow as fields).
PROVENANCE_FIELDS = ("rank", "world_size", "host", "device_name")
# NVLink multicast (NVLS / symmetric memory) stays off: set before the process group exists.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                 "NVSHMEM_DISABLE_NVLS": "1"}
# How long ranks wait for each other after their shards. A dead peer is seen at once (its socket
# closes); this bounds a hung one, so it must cover the slowest rank's lead over the fastest.
BARRIER_TIMEOUT_S = float(os.environ.get("MAMBA_BENCH_BARRIER_TIMEOUT_S", 6 * 3600))
# After a failure, how long rank 0 waits for the other ranks' status files before it merges.
STATUS_GRACE_S = 5.0


class DistEnv(NamedTuple):
    rank: int
    world_size: int
    local_rank: int


class Terminated(BaseException):
    """SIGTERM (torchrun stopping the group) or Ctrl-C; a BaseException so `measure` lets it pass."""


# ---------------------------------------------------------------- process group
def dist_env() -> Optional[DistEnv]:
    """(rank, world_size, local_rank) from torchrun's variables, or None outside torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise ValueError("RANK, WORLD_SIZE and LOCAL_RANK must be integers "
                         f"(got {os.environ.get('RANK')!r}, {os.environ.get('WORLD_SIZE')!r}, "
                         f"{os.environ.get('LOCAL_RANK')!r})") from None
    if not (world >= 1 and 0 <= rank < world and local >= 0):
        raise ValueError(f"RANK {rank} / WORLD_SIZE {world} / LOCAL_RANK {local}: "
                         "need 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0")
    return DistEnv(rank, world, local)


def disable_multicast() -> None:
    for k, v in MULTICAST_OFF.items():
        os.environ.setdefault(k, v)


def init(backend: Optional[str] = None, timeout_s: float = BARRIER_TIMEOUT_S) -> DistEnv:
    """Join torchrun's group: nccl when CUDA is present (device cuda:LOCAL_RANK pinned), else gloo."""
    env = dist_env()
    if env is None:
        raise RuntimeError("not under torchrun: RANK and WORLD_SIZE are not set")
    disable_multicast()
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise ValueError("backend 'nccl' needs CUDA, which is not available (use 'gloo')")
    if cuda:
        if env.local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {env.local_rank} but only {torch.cuda.device_count()} "
                             "CUDA devices are visible")
        torch.cuda.set_device(env.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=_dt.timedelta(seconds=timeout_s))
    return env


@lru_cache(maxsize=None)
def control_group():
    """A gloo group for the sweep's own messages (objects, monitored barrier) whatever the backend."""
    return None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


# ---------------------------------------------------------------- cost and sharding
@lru_cache(maxsize=None)
def _meta_model(name: str, dim: int, backend: str, max_seq_len: int):
    with torch.device("meta"):
        return build_model(name, dim, backend, max_seq_len=max_seq_len)


def expected_cost(cfg: Config, s: SweepSettings) -> float:
    """Relative cost of measuring `cfg`: FLOPs of one forward at its (batch, seq) (flops.py).

    Every config of a sweep runs the same warmup + runs, so this is proportional to its time up
    to per-model speed; models are built on the meta device once per (model, dim, backend). If a
    model cannot be built there, 2 * dim^2 * tokens (a dense layer per token) stands in.
    """
    tokens = cfg.batch_size * cfg.sequence_length
    try:
        model = _meta_model(cfg.model_name, s.dim, cfg.backend, max(4096, cfg.sequence_length))
        flops = forward_flops(model, cfg.batch_size, cfg.sequence_length).total
    except Exception:  # noqa: BLE001 -- a cost estimate must not stop the sweep
        flops = 0.0
    return float(flops) if flops > 0 else 2.0 * s.dim ** 2 * tokens


def _order_key(cfg: Config) -> tuple:
    return (cfg.model_name, cfg.backend, cfg.dtype, cfg.sequence_length, cfg.batch_size)


def shard(configs: Sequence[Config], world_size: int,
          cost: Optional[Callable[[Config], float]] = None) -> list[list[Config]]:
    """Split `configs` over `world_size` ranks, balanced by `cost` (default: 1 per config).

    Longest processing time first: configs by decreasing cost (ties by config key), each onto
    the rank with the least load so far (ties: the lower rank). Max load <= 4/3 of the optimum.
    Every config lands in exactly one shard, listed in its input (sweep) order so a rank reuses
    its built models; the same inputs give the same shards.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size: {world_size!r} is not an integer >= 1")
    configs = list(configs)
    if len(set(configs)) != len(configs):
        raise ValueError("configs hold duplicates; each config must be measured once")
    cost = cost or (lambda c: 1.0)
    costs = [float(cost(c)) for c in configs]
    for c, v in zip(configs, costs):
        if not v >= 0:
            raise ValueError(f"cost of {c} is {v!r}; costs must be finite numbers >= 0")
    order = sorted(range(len(configs)), key=lambda i: (-costs[i], _order_key(configs[i])))
    heap = [(0.0, r) for r in range(world_size)]
    owner = [0] * len(configs)
    for i in order:
        load, r = heapq.heappop(heap)
        owner[i] = r
        heapq.heappush(heap, (load + costs[i], r))
    return [[c for i, c in enumerate(configs) if owner[i] == r] for r in range(world_size)]


# ---------------------------------------------------------------- rank files and provenance
def rank_file(out: Path, rank: int) -> Path:
    return Path(out) / RANKS_DIR / f"rank-{rank}.jsonl"


def _status_file(out: Path, rank: int) -> Path:
    return Path(out) / RANKS_DIR / f"rank-{rank}.status.json"


def _key_json(key: tuple) -> list:
    return list(key)


def with_provenance(r: BenchmarkResult, info: dict) -> BenchmarkResult:
    """The record with rank/host/device_name set, once BenchmarkResult has those fields."""
    upd = {k: info[k] for k in PROVENANCE_FIELDS if k in BenchmarkResult.model_fields and k in info}
    return r.model_copy(update=upd) if upd else r


def rank_line(r: BenchmarkResult, info: dict) -> str:
    d = json.loads(r.model_dump_json())
    d.update({k: info[k] for k in PROVENANCE_FIELDS})
    return json.dumps(d)


def parse_rank_line(line: str) -> tuple[BenchmarkResult, dict]:
    d = json.loads(line)
    prov = {k: d[k] for k in PROVENANCE_FIELDS}
    for k in PROVENANCE_FIELDS:
        if k not in BenchmarkResult.model_fields:
            del d[k]
    return BenchmarkResult.model_validate(d), prov


def read_rank_file(path: Path) -> list[tuple[BenchmarkResult, dict]]:
    """(record, provenance) pairs; a line cut short by a kill (the last) is skipped, not fatal."""
    out = []
    if not Path(path).is_file():
        return out
    with open(path, encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip()]
    for i, line in enumerate(lines):
        try:
            out.append(parse_rank_line(line))
        except (ValueError, KeyError) as e:
            if i != len(lines) - 1:
                raise ValueError(f"{path}:{i + 1}: not a valid rank record ({e})") from None
            print(f"warning: {path}:{i + 1}: skipped a line cut short ({len(line)} chars)",
                  file=sys.stderr)
    return out


def read_provenance(out: Path) -> dict[tuple, dict]:
    """(record key, timestamp) -> {rank, world_size, host, device, device_name}."""
    path = Path(out) / PROVENANCE_NAME
    prov: dict[tuple, dict] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                d = json.loads(line)
                prov[(tuple(d.pop("key")), d.pop("timestamp"))] = d
    return prov


def mixed_devices_warning(kinds: set[str]) -> Optional[str]:
    if len(kinds) <= 1:
        return None
    return (f"records come from {len(kinds)} kinds of device ({'; '.join(sorted(kinds))}): "
            "latencies of different devices are not comparable")


# ---------------------------------------------------------------- signals
_defer = {"depth": 0, "pending": False}


def _on_sigterm(signum, frame):
    if _defer["depth"]:
        _defer["pending"] = True
        return
    raise Terminated(_stopped_by(signum))


def _stopped_by(signum) -> str:
    return (f"stopped by {signal.Signals(signum).name}: torchrun stops every rank when one fails "
            "or the run is interrupted")


@contextmanager
def _no_interrupt():
    """Let a record's write finish before a SIGTERM takes effect (no half-written line)."""
    _defer["depth"] += 1
    try:
        yield
    finally:
        _defer["depth"] -= 1
        if not _defer["depth"] and _defer["pending"]:
            _defer["pending"] = False
            raise Terminated(_stopped_by(signal.SIGTERM))


def _write_status(out: Path, rank: int, state: str, detail: str = "") -> None:
    try:
        _status_file(out, rank).write_text(json.dumps({"rank": rank, "state": state,
                                                       "detail": detail}) + "\n")
    except OSError:
        pass


# ---------------------------------------------------------------- one rank's shard
def run_shard(configs: Sequence[Config], s: SweepSettings, path: Path, info: dict,
              on_record: Optional[Callable[[BenchmarkResult], None]] = None) -> list[BenchmarkResult]:
    """Measure `configs` in order, appending each record (with `info`) to `path` as it finishes."""
    if s.threads is not None:
        torch.set_num_threads(s.threads)
    path.parent.mkdir(parents=True, exist_ok=True)
    results: list[BenchmarkResult] = []
    with open(path, "a", encoding="utf-8") as f:
        for r in measure_each(configs, s):
            r = with_provenance(r, info)
            with _no_interrupt():
                f.write(rank_line(r, info) + "\n")
                f.flush()
                os.fsync(f.fileno())
            results.append(r)
            if on_record is not None:
                on_record(r)
    return results


# ---------------------------------------------------------------- merging (rank 0)
def merge(out: Path, s: SweepSettings, shards: Sequence[Sequence[Config]],
          rank_records: dict[int, list[tuple[BenchmarkResult, dict]]],
          rank_infos: Sequence[dict], reasons: dict[int, str]) -> list[BenchmarkResult]:
    """Append this attempt's records (and an "error" record per unfinished config) to results.jsonl.

    `rank_records`: rank -> its (record, provenance) pairs of this attempt. Records already in
    results.jsonl (same key and timestamp) are not appended twice. Returns the run's latest record
    per config, in sweep order.
    """
    out = Path(out)
    jsonl = out / JSONL_NAME
    have = {(r.key, r.timestamp) for r in read_jsonl(jsonl)} if jsonl.is_file() else set()
    finished: set[tuple] = set()
    new: list[tuple[BenchmarkResult, dict]] = []
    for rank in sorted(rank_records):
        for r, prov in rank_records[rank]:
            finished.add(r.key)
            if (r.key, r.timestamp) not in have:
                new.append((r, prov))
    for rank, configs in enumerate(shards):
        info = rank_infos[rank]
        for cfg in configs:
            if cfg.key(s) not in finished:
                why = reasons.get(rank, "its process ended before its shard was done")
                r = BenchmarkResult.failed("error", f"rank {rank} did not finish ({why})",
                                           **record_identity(cfg, s, info["device"]))
                new.append((with_provenance(r, info), info))
    with RecordWriter(jsonl, "a") as w, open(out / PROVENANCE_NAME, "a", encoding="utf-8") as p:
        for r, prov in new:
            w.write(r)
            p.write(json.dumps({"key": _key_json(r.key), "timestamp": r.timestamp, "status": r.status,
                                "device": r.device, **{k: prov.get(k) for k in PROVENANCE_FIELDS}})
                    + "\n")
    all_latest = {r.key: r for r in latest(read_jsonl(jsonl))}
    return [all_latest[c.key(s)] for c in iter_configs(s) if c.key(s) in all_latest]


def reconcile(out: Path) -> int:
    """Before a new attempt: append records left in rank files (a run killed before rank 0 merged)
    to results.jsonl, then move the rank files to ranks/attempt-N/. Returns records appended."""
    out = Path(out)
    ranks = out / RANKS_DIR
    files = sorted(ranks.glob("rank-*.jsonl")) if ranks.is_dir() else []
    jsonl = out / JSONL_NAME
    have = {(r.key, r.timestamp) for r in read_jsonl(jsonl)} if jsonl.is_file() else set()
    n = 0
    with RecordWriter(jsonl, "a") as w, open(out / PROVENANCE_NAME, "a", encoding="utf-8") as p:
        for path in files:
            for r, prov in read_rank_file(path):
                if (r.key, r.timestamp) in have:
                    continue
                have.add((r.key, r.timestamp))
                w.write(r)
                p.write(json.dumps({"key": _key_json(r.key), "timestamp": r.timestamp,
                                    "status": r.status, "device": r.device, **prov}) + "\n")
                n += 1
    leftovers = files + (sorted(ranks.glob("rank-*.status.json")) if ranks.is_dir() else [])
    if leftovers:
        k = 1
        while (ranks / f"attempt-{k}").exists():
            k += 1
        (ranks / f"attempt-{k}").mkdir()
        for path in leftovers:
            shutil.move(str(path), ranks / f"attempt-{k}" / path.name)
    return n


def run_environment(base: dict, rank_infos: Sequence[dict], backend: str,
                    kinds: set[str], shards: Sequence[Sequence[Config]], recorded: dict[int, int],
                    reasons: dict[int, str]) -> dict:
    """Rank 0's environment plus every rank's host and device; device_name names a mix as such."""
    env = dict(base)
    warning = mixed_devices_warning(kinds)
    if warning:
        env["device_name"] = mixed_devices(kinds, sep="; ")
    elif kinds:
        env["device_name"] = next(iter(kinds))
    env["distributed"] = {
        "world_size": len(rank_infos), "backend": backend,
        "device_kinds": sorted(kinds), "warning": warning,
        "ranks": [{**{k: info[k] for k in ("rank", "local_rank", "host", "device", "device_name")},
                   "configs_assigned": len(shards[info["rank"]]),
                   "configs_recorded": recorded.get(info["rank"], 0),
                   "finished": info["rank"] not in reasons,
                   **({"failure": reasons[info["rank"]]} if info["rank"] in reasons else {})}
                  for info in rank_infos],
    }
    return env


# ---------------------------------------------------------------- the launcher
def _device_name(device: str, local_rank: int, base_env: dict) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(local_rank)
    return base_env.get("cpu_model") or base_env.get("device_name") or "cpu"


class Torchrun:
    """`execute`'s launcher under torchrun (see the module docstring): every rank measures its
    shard; rank 0 (`main`) prepares the output directory, plans the shards and merges."""

    def __init__(self, s: SweepSettings, env: DistEnv):
        init("nccl" if s.device.startswith("cuda") else "gloo")
        self.group = control_group()
        self.rank, self.world = env.rank, env.world_size
        self.main = self.rank == 0
        self.prior: Optional[str] = None    # rank 0: the device_name of the run being resumed
        apply_process_settings(s)           # before `base`: its threads and host allocator
        self.old_handler = signal.signal(signal.SIGTERM, _on_sigterm)
        self.base = environment(s.device, torch.get_num_threads())
        self.info = {"rank": self.rank, "world_size": self.world, "local_rank": env.local_rank,
                     "host": socket.gethostname(), "device": s.device,
                     "device_name": _device_name(s.device, env.local_rank, self.base)}
        self.rank_infos: list = [None] * self.world
        dist.all_gather_object(self.rank_infos, self.info, group=self.group)

    @staticmethod
    def rank_device(device: str, env: DistEnv) -> str:
        """Each rank's device: cuda:LOCAL_RANK on CUDA."""
        return f"cuda:{env.local_rank}" if device == "cuda" else device

    def _plan(self, s: SweepSettings, o) -> dict:
        """Rank 0: prepare the output directory and shard what is left. Never raises (errors travel)."""
        out = o.dir
        if s.processes > 1:   # every rank would spawn its own workers on a shared device
            return {"error": f"--processes {s.processes} runs on one machine without torchrun (each torchrun "
                             "rank is a process already)", "usage": True, "shards": None}
        try:
            resume = o.resume or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
            if resume and not o.resume:
                print("resume: torchrun restarted the group; continuing the run", file=sys.stderr)
            if resume and not (out / JSONL_NAME).is_file() and (out / RANKS_DIR).is_dir():
                (out / JSONL_NAME).touch()   # killed before rank 0 merged: rank files hold the records
            prepare_run_dir(out, resume=resume, overwrite=o.overwrite)
            if resume:
                check_resume(out, s.model_dump(mode="json"), self.base)
            prior = read_environment(out / ENV_NAME).get("device_name")   # before this run rewrites it
            self.prior = None if not prior or is_mixed(prior) else str(prior)
            (out / JSONL_NAME).touch()   # so a run killed before its merge can be resumed
            recovered = reconcile(out)
            if recovered:
                print(f"resume: recovered {recovered} records from rank files", file=sys.stderr)
            done = set(recorded_ok(out)) if resume else set()
            todo = [c for c in iter_configs(s) if c.key(s) not in done]
            if resume:
                print(f"resume: {len(done)} configs already recorded ok; {len(todo)} to measure "
                      f"on {self.world} ranks", file=sys.stderr)
            return {"error": None, "shards": shard(todo, self.world, lambda c: expected_cost(c, s))}
        except UsageError as e:
            return {"error": str(e), "usage": True}
        except Exception as e:  # noqa: BLE001 -- every rank must hear of it, not wait at a barrier
            return {"error": f"{type(e).__name__}: {' '.join(str(e).split())}", "usage": False}

    def plan(self, s: SweepSettings, o) -> Plan:
        plan = [self._plan(s, o) if self.main else None]
        dist.broadcast_object_list(plan, src=0, group=self.group)
        plan = plan[0]
        if plan["error"] is not None:
            _finish_group()
            if not self.main:
                return Plan(stop=EXIT_USAGE if plan["usage"] else EXIT_UNEXPECTED)
            if plan["usage"]:
                raise UsageError(plan["error"])
            raise RuntimeError(plan["error"])
        self.shards = plan["shards"]
        return Plan(banner=[f"distributed: {self.world} ranks, {sum(map(len, self.shards))} configs; per rank: "
                            + ", ".join(f"{i['rank']}@{i['host']}/{i['device']}={len(self.shards[i['rank']])}"
                                        for i in self.rank_infos)])

    def run(self, s: SweepSettings, o, plan: Plan, show=None) -> Outcome:
        """Every rank: measure its shard, then meet the others and send its records to rank 0,
        which merges (`_merge`). `show` is unused: every rank prints its own lines, prefixed."""
        failure, gathered = self._measure_and_gather(s, o.dir)
        if self.rank != 0:
            _finish_group()
            signal.signal(signal.SIGTERM, self.old_handler)
            if failure is not None:
                return Outcome([], EXIT_INTERRUPTED if failure.startswith("stopped") else EXIT_UNEXPECTED)
            return Outcome([])   # its shard is recorded, even if a peer's failure broke the gather
        return self._merge(s, o.dir, failure, gathered)

    def _measure_and_gather(self, s: SweepSettings, out: Path) -> tuple[Optional[str], Optional[list]]:
        """(this rank's failure or None, rank 0: every rank's record lines, or None if the group broke)."""
        rank, world, group, shards = self.rank, self.world, self.group, self.shards

        def show_rank(r: BenchmarkResult) -> None:
            print(f"[rank {rank}] {report.format_line(r)}", flush=True)

        failure: Optional[str] = None
        try:
            run_shard(shards[rank], s, rank_file(out, rank), self.info, on_record=show_rank)
            with _no_interrupt():
                _write_status(out, rank, "done")
        except (Terminated, KeyboardInterrupt) as e:
            failure = f"{e}" if isinstance(e, Terminated) else "stopped by Ctrl-C"
            _write_status(out, rank, "stopped", failure)
        except Exception as e:  # noqa: BLE001 -- this rank's failure must not hide the others' records
            failure = f"failed: {type(e).__name__}: {' '.join(str(e).split())}"[:300]
            _write_status(out, rank, "failed", failure)

        gathered = None
        if failure is None:
            # Rank 0 merges whatever happens next, so a SIGTERM from here on only waits: torchrun
            # sends it when it sees a dead peer, often while rank 0 sits in the barrier below (a
            # C call, which a Python handler cannot interrupt). Raised as the call returns, it
            # would end rank 0 before the merge with no record written at all.
            if rank == 0:
                _defer["depth"] += 1
            try:
                with _no_interrupt():
                    lines = (rank_file(out, rank).read_text(encoding="utf-8").splitlines()
                             if rank_file(out, rank).is_file() else [])
                _barrier(group)
                gathered = [None] * world if rank == 0 else None
                dist.gather_object(lines, gathered, dst=0, group=group)
            except (Terminated, KeyboardInterrupt) as e:
                failure = str(e) or "stopped"
            except Exception as e:  # noqa: BLE001 -- a peer is gone: fall back to the rank files
                print(f"[rank {rank}] lost the group after its shard: {' '.join(str(e).split())[:300]}",
                      file=sys.stderr)
                gathered = None
            finally:
                if rank == 0:
                    signal.signal(signal.SIGTERM, signal.SIG_IGN)   # merge now; torchrun's stop waits
                    _defer["depth"] -= 1
                    _defer["pending"] = False
        return failure, gathered

    def _merge(self, s: SweepSettings, out: Path, failure: Optional[str], gathered: Optional[list]) -> Outcome:
        """Rank 0: one result set from what the ranks sent (or, when the group broke, from their
        rank files), an error record per unfinished config, environment.json for every rank."""
        world, shards = self.world, self.shards
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # a second SIGTERM waits for the merge
        reasons: dict[int, str] = {}
        if gathered is not None:
            rank_records = {r: [parse_rank_line(ln) for ln in lines if ln.strip()]
                            for r, lines in enumerate(gathered)}
        else:
            _await_statuses(out, world, STATUS_GRACE_S)   # stopped peers say so as they leave
            rank_records = {r: read_rank_file(rank_file(out, r)) for r in range(world)}
            for r in range(world):
                status = _read_status(out, r)
                if status is None:
                    reasons[r] = "no word from it: its process was killed or crashed"
                elif status["state"] != "done":
                    reasons[r] = status["detail"] or status["state"]
            if failure is not None:
                reasons[0] = failure
        results = merge(out, s, shards, rank_records, self.rank_infos, reasons)
        kinds = device_kinds(results, read_provenance(out), default=self.prior)
        recorded = {r: len(v) for r, v in rank_records.items()}
        unfinished = {r for r, shard_ in enumerate(shards)
                      if len({c.key(s) for c in shard_} - {rec.key for rec, _ in rank_records[r]})}
        reasons = {r: reasons.get(r, "its process ended before its shard was done") for r in unfinished}
        env_all = run_environment(self.base, self.rank_infos, dist.get_backend(), kinds, shards,
                                  recorded, reasons)
        saved = read_environment(out / ENV_NAME)   # what execute wrote: the start, command, settings
        env_all.update({k: saved[k] for k in ("time", "command_line", "seed", "settings", "resumptions")
                        if k in saved})
        write_environment(env_all, out / ENV_NAME)
        _finish_group()
        if env_all["distributed"]["warning"]:
            print(f"warning: {env_all['distributed']['warning']}", file=sys.stderr)
        outcome = Outcome(results, closing=f"rank files: {out / RANKS_DIR}; ")
        if unfinished:
            n = sum(1 for r in results if r.status == "error" and "did not finish" in r.message)
            outcome.error = (f"error: {n} configs unfinished (ranks {', '.join(map(str, sorted(unfinished)))}); "
                             f"finish them with --resume on any number of ranks")
            outcome.code = EXIT_INTERRUPTED if failure is not None else EXIT_UNEXPECTED
        return outcome


def _read_status(out: Path, rank: int) -> Optional[dict]:
    try:
        return json.loads(_status_file(out, rank).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _await_statuses(out: Path, world: int, grace_s: float) -> None:
    """Wait (a little) until every rank left its status file: a record being written lands first."""
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if all(_status_file(out, r).is_file() for r in range(world)):
            return
        time.sleep(0.1)


def _barrier(group) -> None:
    timeout = _dt.timedelta(seconds=BARRIER_TIMEOUT_S)
    if dist.get_backend(group) == "gloo":
        dist.monitored_barrier(group=group, timeout=timeout, wait_all_ranks=True)
    else:
        dist.barrier(group=group)


def _finish_group() -> None:
    control_group.cache_clear()
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 -- a broken group cannot be torn down cleanly; the process ends
        pass
