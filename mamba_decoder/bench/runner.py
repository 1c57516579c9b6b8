"""The sweep: models x backends x dtypes x sequence lengths x batch sizes, one record per config.

Each config is measured in-process (models built once per (model, backend, dtype) and reused
across shapes) or, with `isolate=True`, in its own `python -m mamba_decoder.bench.worker`
subprocess, so a segfault or a CUDA error costs that row only. An out-of-memory config becomes a
status "oom" record and any other exception a status "error" record; the sweep goes on. Records
are handed to `on_record` (console lines) and `writer` (JSONL, fsynced) as each one finishes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..kernels import cpu_gemm
from ..models import kernel_choices
from . import flops, host_alloc, registry, timing
from ..models.moe import deferred_packing
from .registry import NO_MAMBA_MIXER, build_lm, build_model, parameter_counts
from .results import BenchmarkResult, RecordWriter, UsageError, cpu_model, latest, read_jsonl, record_identity
from .settings import CACHE_KINDS, DTYPES, LEVELS, MODES, Config, SweepSettings, iter_configs  # noqa: F401
from .energy import ENERGY_WINDOW_S, EnergyMeter, EnergyReading, energy_fields, energy_window
from .names import RecordKey
from .timing import PROCESS_ROUNDS, REWARM_BELOW_MS, calibration_kernel, time_callable, time_interleaved  # noqa: F401
from .workloads import DecodeSession, GraphedForward, TrainStep

MB = 2 ** 20


# ---------------------------------------------------------------- scenarios (what is timed)
def forward_scenario(model: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    """One inference forward pass over the whole (B, L, dim) input."""
    model.eval()

    def step() -> Any:
        with torch.inference_mode():
            return model(x)
    return step


def banner_kernels(s: SweepSettings) -> dict[str, dict[str, str]]:
    """'model (backend, dtype)' -> kernel choices, from models built on the meta device (no memory)."""
    out = {}
    for backend in s.backends:
        for dtype in s.dtypes:
            for name in s.models:
                label = f"{name} ({backend}, {dtype})"
                try:
                    with torch.device("meta"):
                        m = registry_build(name, s, backend, _first_sizes(s))
                    out[label] = kernel_choices(m, torch.device(s.device), DTYPES[dtype])
                except Exception as e:  # noqa: BLE001 -- the banner must not stop the sweep
                    out[label] = {"unavailable": f"{type(e).__name__}: {e}".splitlines()[0][:120]}
    return out


def _first_sizes(s: SweepSettings):
    grid = s.size_grid()
    return grid[0] if grid else None


def _max_seq_len(s: SweepSettings) -> int:
    return max(4096, max(s.sequence_lengths))


# ---------------------------------------------------------------- measuring one config
class _Built:
    def __init__(self, model: Optional[nn.Module] = None, error: Optional[BaseException] = None):
        self.model, self.error = model, error


def _build(cfg: Config, s: SweepSettings) -> nn.Module:
    torch.manual_seed(s.seed)   # same weights for the same (model, dim, seed)
    device = torch.device(s.device)
    # On CUDA the weights are made there (a published width, e.g. 256 experts of 7168 x 2048,
    # would take minutes to initialise on the host and as much host memory as fp32 weights). The
    # MoEs pack their experts at the .to() below, in the run's dtype (models.moe.deferred_packing).
    with torch.device(device) if device.type == "cuda" else contextlib.nullcontext(), deferred_packing():
        model = registry_build(cfg.model_name, s, cfg.backend, cfg.sizes)
    model = model.to(device=device, dtype=DTYPES[cfg.dtype])
    if s.compile:
        model.compile()         # in place: the module keeps its type, its cache API and state dict
    return model


def registry_build(name: str, s: SweepSettings, backend: str, sizes=None) -> nn.Module:
    """The model factory (tests patch `runner.build_model` to inject failures); `sizes`: the
    config's BlockSizes (passed on only when the sweep sets sizes: the defaults build as before)."""
    kw = dict(sizes=sizes) if s.sizes and sizes is not None else {}
    if s.level == "model":
        return build_lm(name, s.dim, backend, depth=s.depth, vocab_size=s.vocab_size,
                        max_seq_len=_max_seq_len(s), **kw)
    return build_model(name, s.dim, backend, max_seq_len=_max_seq_len(s), **kw)


# ---------------------------------------------------------------- memory, before running
GiB = 2 ** 30


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes a config may still take on `device`: CUDA's free memory plus what torch's allocator
    holds unused; on the CPU the kernel's MemAvailable, capped by this cgroup's limit. None: unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    avail = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        limit = open("/sys/fs/cgroup/memory.max", encoding="ascii").read().strip()
        used = int(open("/sys/fs/cgroup/memory.current", encoding="ascii").read())
        if limit != "max":
            room = max(0, int(limit) - used)
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    return avail


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(map(_tensor_bytes, obj))
    return sum(map(_tensor_bytes, vars(obj).values())) if hasattr(obj, "__dict__") else 0


def _meta_model(cfg: Config, s: SweepSettings) -> nn.Module:
    """The config's model, shapes without memory (the registry's own factories, as registry_build
    calls them: not a measured build)."""
    kw = dict(sizes=cfg.sizes) if s.sizes else {}
    with torch.device("meta"):
        if s.level == "model":
            return registry.build_lm(cfg.model_name, s.dim, cfg.backend, depth=s.depth, vocab_size=s.vocab_size,
                                     max_seq_len=_max_seq_len(s), **kw)
        return registry.build_model(cfg.model_name, s.dim, cfg.backend, max_seq_len=_max_seq_len(s), **kw)


def estimate_peak(cfg: Config, s: SweepSettings, meta: Optional[nn.Module] = None) -> int:
    """Estimated peak bytes of measuring `cfg` (flops.peak_bytes on a meta-device model, plus the
    decode cache): what is compared with `available_memory` before the config runs."""
    meta = meta if meta is not None else _meta_model(cfg, s)
    dtype = DTYPES[cfg.dtype]
    elt = torch.finfo(dtype).bits // 8
    est = flops.peak_bytes(meta, cfg.batch_size, cfg.sequence_length, elt, cpu=torch.device(s.device).type == "cpu",
                           train=s.mode == "train",
                           optimizer_step=s.optimizer_step, token_ids=s.level == "model").total
    if s.mode == "decode":
        steps = s.warmup + s.runs * (4 if s.min_time_s > 0 else 1)
        cache = meta.init_cache(cfg.batch_size, max_len=cfg.sequence_length + steps, kind=s.cache_kind,
                                device="meta", dtype=dtype)
        est += _tensor_bytes(cache)
    return int(est)


def check_depth_fits(s: SweepSettings) -> None:
    """--depth bounded by memory: the smallest config of each language model at this depth must fit
    (weights and one call), else a UsageError naming the deepest that fits; before any model is built."""
    if s.level != "model" or s.force:
        return
    avail = available_memory(torch.device(s.device))
    if avail is None:
        return
    dtype = min(s.dtypes, key=lambda d: torch.finfo(DTYPES[d]).bits)
    smallest = (dtype, min(s.sequence_lengths), min(s.batch_sizes))
    for cfg in iter_configs(s):
        if (cfg.dtype, cfg.sequence_length, cfg.batch_size) == smallest:
            name, backend = cfg.model_name, cfg.backend
            one, two = (estimate_peak(cfg, s.model_copy(update={"depth": d})) for d in (1, 2))
            per_layer, fixed = two - one, 2 * one - two
            need = fixed + per_layer * s.depth
            if need > avail:
                most = flops.max_layers_fitting(per_layer, fixed, avail)
                raise UsageError(f"--depth: {s.depth} needs about {need / GiB:.3g} GiB for {name} "
                                 f"({backend}, {dtype}, seq {cfg.sequence_length}, batch {cfg.batch_size}) but "
                                 f"{avail / GiB:.3g} GiB is available (accepted here: 1..{most}; --force runs it)")


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in msg or "not enough memory" in msg)


class _Prepared:
    """A config ready to time: its record's fields so far, the callable, its cap on runs and the
    object that owns the callable's state."""

    def __init__(self, fields: dict, step: Callable[[], Any], max_runs: int, workload: Any):
        self.fields, self.step, self.max_runs, self.workload = fields, step, max_runs, workload


def _prepare(cfg: Config, s: SweepSettings, cache: dict) -> "_Prepared | BenchmarkResult":
    """Build (or reuse) the model and make the workload; a failure is returned as its record."""
    device = torch.device(s.device)
    cuda = device.type == "cuda"
    fields: dict[str, Any] = dict(record_identity(cfg, s, str(device)), threads=torch.get_num_threads(),
                                  device_name=device_name(device))
    if cfg.backend == "mamba_ssm" and cfg.model_name in NO_MAMBA_MIXER:
        return BenchmarkResult.failed("skipped", f"{cfg.model_name} has no Mamba mixer: backend "
                                      "mamba_ssm (which replaces the mixer alone) does not apply", **fields)
    try:
        ck = (cfg.model_name, cfg.backend, cfg.dtype, cfg.block_config)
        mk = ("meta", cfg.model_name, cfg.backend, cfg.block_config)
        if mk not in cache:
            cache[mk] = _meta_model(cfg, s)
        est = estimate_peak(cfg, s, cache[mk])
        fields.update(estimated_peak_mb=est / MB)
        avail = None if s.force else available_memory(device)
        if avail is not None and est > avail:   # a kill would take the whole sweep: not run
            return BenchmarkResult.failed(
                "oom", f"estimated peak {est / GiB:.3g} GiB exceeds the {avail / GiB:.3g} GiB available "
                "(not run; --force runs it)", **fields)
        if ck not in cache:
            for old in [k for k in cache if k[:3] == ck[:3]]:   # this model's previous sizes
                del cache[old]
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            try:
                cache[ck] = _Built(_build(cfg, s))
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 -- recorded; every shape of this model gets it
                cache[ck] = _Built(error=e)
        built = cache[ck]
        if built.error is not None:
            raise built.error
        model = built.model
        total, active = parameter_counts(model)
        fields.update(num_parameters=total, active_parameters=active,
                      weights_mb=sum(p.numel() * p.element_size() for p in model.parameters()) / MB,
                      kernels=kernel_choices(model, device, DTYPES[cfg.dtype]))
        torch.manual_seed((s.seed * 1_000_003 + cfg.sequence_length * 1009 + cfg.batch_size) % 2**64)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
        step, max_runs, workload = _workload(model, cfg, s, device, fields)
        if device.type == "cuda":   # what this config's inputs (and cache) hold on top of the weights
            fields["_inputs"] = torch.cuda.memory_allocated(device) - base
        return _Prepared(fields, step, max_runs, workload)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 -- one config's failure is a record, not the end of the sweep
        return _failed(e, fields, device)


def _failed(e: BaseException, fields: dict, device: torch.device) -> BenchmarkResult:
    status, message = "oom" if _is_oom(e) else "error", f"{type(e).__name__}: {e}"
    e = None  # noqa: F841 -- the traceback no longer pins the tensors
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    fields = {k: v for k, v in fields.items() if not k.startswith("_")}
    return BenchmarkResult.failed(status, message, **fields)


def measure_group(cfgs: list[Config], s: SweepSettings, cache: Optional[dict] = None) -> list[BenchmarkResult]:
    """Measure configs of one shape together in this process, in interleaved rounds
    (`timing.time_interleaved`), the calibration kernel timed before each round. Never raises,
    except KeyboardInterrupt. One config's failure (build, OOM, error) is its record alone."""
    cache = {} if cache is None else cache
    device = torch.device(s.device)
    if device.type == "cpu":
        host_alloc.release()   # the last shape's buffers: this shape's host peak is its own
    prepared = [_prepare(c, s, cache) for c in cfgs]
    live = [p for p in prepared if isinstance(p, _Prepared)]
    order = s.order if len(cfgs) > 1 or s.order == "blocked" else "blocked"
    rounds_id = uuid.uuid4().hex[:12]
    meters = [_BlockMeter(device) for _ in live]
    try:
        timed, calibration = time_interleaved(
            [p.step for p in live], device, warmup=s.warmup, runs=s.runs, min_time_s=s.min_time_s,
            max_runs=[p.max_runs for p in live], calibrate=calibration_kernel(device),
            around=[(m.start, m.stop) for m in meters],
            # a decode session has room for the steps it was sized for: no untimed steps between rounds
            rewarm_below_ms=0.0 if s.mode == "decode" else REWARM_BELOW_MS)
        out: dict[int, BenchmarkResult] = {}
        for p, t, m in zip(live, timed, meters):
            fields = {k: v for k, v in p.fields.items() if not k.startswith("_")}
            reading, calls = m.reading(), len(t.samples)
            # energy from one window of this config's calls alone (energy.energy_window); a decode
            # session has room for its timed steps only: no window, no figure
            if t.error is None and s.mode != "decode" and m.meter.available:
                try:
                    window, calls = energy_window(p.step, device, ENERGY_WINDOW_S, m.meter)
                    reading = EnergyReading(window.joules, window.seconds, window.source, reading.peak_rss_mb)
                except Exception as e:  # noqa: BLE001
                    t.error = e
            if t.error is None and device.type == "cpu" and s.mode != "decode" and host_alloc.retaining():
                try:   # the blocks' peak held what the group's other configs freed (kept for reuse)
                    reading = dataclasses.replace(reading, peak_rss_mb=_host_peak_alone(p))
                except Exception as e:  # noqa: BLE001
                    t.error = e
            fields.update(energy_fields(reading, calls, fields.get("tokens_per_call")))
            if t.error is None and device.type == "cuda":
                try:
                    fields.update(_memory(p, device))
                except Exception as e:  # noqa: BLE001
                    t.error = e
            if t.error is not None:
                out[id(p)] = _failed(t.error, p.fields, device)
                t.error = None
                continue
            if device.type == "cpu" and s.mode != "decode":
                # the CPU floor: this machine's GEMM rate in the same minute (no datasheet peak)
                fields.update(peak_tflops=cpu_gemm_tflops(DTYPES[p.fields["dtype"]]))
            r = BenchmarkResult.from_samples(t.samples, sample_rounds=t.rounds, rounds_id=rounds_id,
                                             calibration_ms=calibration, order=order, **fields)
            _add_rates(r, s, device)
            out[id(p)] = r
    finally:
        for p in live:
            p.step = p.workload = None
    return [out[id(p)] if isinstance(p, _Prepared) else p for p in prepared]


class _BlockMeter:
    """The host memory peak over the blocks of one config's timed runs (its rounds): the largest
    block's. No energy: the counters move too coarsely for blocks of a few calls (see
    energy.energy_window, which gives a config its energy figure)."""

    def __init__(self, device: torch.device):
        self.meter, self.seconds = EnergyMeter(device), 0.0
        self.rss: Optional[float] = None

    def start(self) -> None:
        self.meter.start()

    def stop(self) -> None:
        e = self.meter.stop()
        self.seconds += e.seconds
        if e.peak_rss_mb is not None:
            self.rss = max(self.rss or 0.0, e.peak_rss_mb)

    def reading(self) -> EnergyReading:
        return EnergyReading(None, self.seconds, None, self.rss)


def _host_peak_alone(p: _Prepared) -> Optional[float]:
    """One more call of the config alone, after its timed runs, from a trimmed heap: its host
    peak (VmHWM, MB). With the retain allocator (host_alloc) the timed blocks' peak also held the
    buffers the shape's other configs freed, kept for reuse between their interleaved rounds."""
    host_alloc.release()
    meter = EnergyMeter("cpu")
    meter.start()
    p.step()
    return meter.stop().peak_rss_mb


def _memory(p: _Prepared, device: torch.device) -> dict:
    """One more call of the config alone, after its timed runs: peak_memory_mb is the peak of that
    call, memory_mb what the config's inputs and that call's activations take above the weights."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    p.step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return dict(peak_memory_mb=peak / MB, memory_mb=(p.fields["_inputs"] + peak - before) / MB)


def measure(cfg: Config, s: SweepSettings, cache: Optional[dict] = None) -> BenchmarkResult:
    """Measure one config in this process, alone (its runs in rounds of its own). Never raises,
    except KeyboardInterrupt."""
    return measure_group([cfg], s, cache)[0]


def _workload(model: nn.Module, cfg: Config, s: SweepSettings, device: torch.device,
              fields: dict[str, Any]) -> tuple[Callable[[], Any], int, Any]:
    """The callable the timer runs for this mode, the most runs it may take, and the object that
    owns its state. Adds the mode's own figures (tokens per call, FLOPs, prefill, cache) to `fields`."""
    B, L, dtype = cfg.batch_size, cfg.sequence_length, DTYPES[cfg.dtype]
    if s.mode == "decode":
        # Room for every step the timer may take: warmup + runs (4x runs when --min-time asks for
        # more), and one more for the memory figure (CUDA).
        max_runs = s.runs * (4 if s.min_time_s > 0 else 1)
        session = DecodeSession(model, B, L, s.warmup + max_runs + 1, device, dtype,
                                cache_kind=s.cache_kind, cuda_graph=s.cuda_graphs)
        prefill = time_callable(session.prefill, device, warmup=1, runs=3)
        session.prefill()
        mid = L + (s.warmup + max_runs) // 2           # the context of a typical timed step
        f = flops.forward_flops(model, B, 1, context=mid, absorb=(s.cache_kind or "latent") == "latent")
        elt = torch.finfo(dtype).bits // 8
        fields.update(tokens_per_call=B, prefill_ms=sorted(prefill)[1], cache_bytes=session.cache_bytes(L),
                      flops=f.total, bytes_per_call=flops.decode_bytes(model, B, mid, session.cache_bytes(mid), elt))
        return session.step, max_runs, session
    if s.level == "model":
        x = torch.randint(0, s.vocab_size, (B, L), device=device)
    else:
        x = torch.randn(B, L, s.dim, device=device, dtype=dtype)
    fields.update(tokens_per_call=B * L)
    if s.mode == "train":
        fields.update(flops=flops.train_flops(model, B, L).total)
        step = TrainStep(model, x, optimizer_step=s.optimizer_step)
        return step, 10_000, step
    fields.update(flops=flops.forward_flops(model, B, L).total)
    if s.cuda_graphs:
        graphed = GraphedForward(model, x)
        return graphed, 10_000, graphed
    return forward_scenario(model, x), 10_000, x


def _add_rates(r: BenchmarkResult, s: SweepSettings, device: torch.device) -> None:
    """Achieved TFLOP/s, MFU against the device's peak for the dtype (on the CPU the GEMM rate
    probed beside the config: the fraction of its GEMM floor), and GB/s (decode)."""
    sec = r.latency_median_ms / 1e3
    if r.flops:
        r.tflops_per_sec = r.flops / sec / 1e12
        r.peak_tflops = r.peak_tflops or flops.peak_tflops(r.device_name or "", r.dtype)
        r.mfu = r.tflops_per_sec / r.peak_tflops if r.peak_tflops else None
    if r.bytes_per_call:
        r.gb_per_sec = r.bytes_per_call / sec / 1e9


def cpu_gemm_tflops(dtype: torch.dtype = torch.float32, n: int = 1024, runs: int = 3) -> float:
    """This CPU's GEMM rate now (TFLOP/s): the median of `runs` (n x n) x (n x n) products (after
    one warm-up) on the suite's timer, at the current thread count, through the library the fast
    backend's GEMMs use (kernels/cpu_gemm.py: oneDNN for fp32, 2x MKL's rate on this project's
    AMD EPYC; torch's own oneDNN path for bf16). The suite probes it beside every CPU config, so a
    config's fraction of its GEMM floor is against what the machine gave in the same minute (a
    shared machine drifts 3x within seconds)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    onednn = cpu_gemm.usable(torch.device("cpu"), dtype)
    with torch.inference_mode():
        ms = timing.summarize(timing.time_callable(lambda: cpu_gemm.linear(a, b, None, onednn), "cpu",
                                                   warmup=1, runs=runs)).median
    return 2 * n ** 3 / (ms * 1e9)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


# ---------------------------------------------------------------- isolation
def worker_command() -> list[str]:
    return [sys.executable, "-m", "mamba_decoder.bench.worker"]


RECORD_PREFIX = "RECORD "
READY_LINE = "READY\n"    # a worker's first line: settings read, about to measure
WORKER_START_S = 300.0    # --processes: a worker's time to start (import torch, a CUDA context) before READY
DEFAULT_CONFIG_TIMEOUT_S = 1800.0    # --isolate: a worker past this is killed and recorded as timeout;
                                     # --processes: a worker's seconds per config of its shape


def measure_isolated(cfg: Config, s: SweepSettings) -> BenchmarkResult:
    """Measure one config in a fresh subprocess; a crash becomes an error record naming its cause."""
    payload = json.dumps({"settings": s.model_dump(), "config": asdict(cfg)})
    fields = record_identity(cfg, s, s.device)
    timeout = s.config_timeout_s or DEFAULT_CONFIG_TIMEOUT_S
    try:
        proc = subprocess.run(worker_command(), input=payload, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:   # run() has killed the worker (SIGKILL) and reaped it
        return BenchmarkResult.failed("timeout", f"worker ran past --config-timeout {timeout:g} s "
                                      "and was killed", **fields)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RECORD_PREFIX):
            try:
                r = BenchmarkResult.model_validate_json(line[len(RECORD_PREFIX):])
            except ValueError as e:     # cut short or garbled: this row only
                first = str(e).splitlines()[0]
                return BenchmarkResult.failed("error", f"worker's record is not valid ({first}): "
                                              f"{line[:120]}", **fields)
            if r.key != cfg.key(s):
                return BenchmarkResult.failed("error", f"worker's record is for another config "
                                              f"({r.key}), not this one", **fields)
            return r
    return BenchmarkResult.failed("error", _worker_end("worker", proc.returncode, proc.stderr), **fields)


def _worker_end(who: str, returncode: int, stderr: str) -> str:
    """How a worker ended, in words: the signal that killed it (SIGKILL: possibly the OOM killer)
    or its exit code, and its last line on stderr."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        cause = f"{who} killed by {name} (signal {-returncode})"
        if name == "SIGKILL":
            cause += ", possibly out of host memory"
    else:
        cause = f"{who} exited with code {returncode}"
    last = [ln for ln in stderr.splitlines() if ln.strip()]
    if last:
        cause += f": {last[-1].strip()}"
    return cause


# ---------------------------------------------------------------- several processes
def _process_records(configs: list[Config], s: SweepSettings, p: int, staged: dict[RecordKey, BenchmarkResult],
                     stage: Optional[RecordWriter] = None,
                     on_part: Optional[Callable[[BenchmarkResult], None]] = None) -> dict[RecordKey, BenchmarkResult]:
    """Process p of `s.processes` measures the `configs` not already in `staged` (its records from
    an interrupted run) with its share of the runs, in a fresh worker (`worker.py`, "configs");
    its records by key. Each record of a config it was given is taken as the worker prints it
    (others are ignored, as --isolate refuses them): written to `stage` (the
    run's processes/ file for p, fsynced) and passed to `on_part`, so an interrupt keeps it.
    A worker that dies (a crash, the OOM killer) or prints nothing for --config-timeout seconds
    a config of the shape it is on (DEFAULT_CONFIG_TIMEOUT_S) costs that shape's configs only
    (error / timeout records naming the cause): a fresh worker measures the rest, unless two
    in a row end before they are ready to measure (a worker that cannot start: the rest is
    recorded so)."""
    got = dict(staged)

    def take(r: BenchmarkResult) -> None:
        got[r.key] = r
        if stage is not None and r.ok:
            stage.write(r)
        if on_part is not None:
            on_part(r)

    who = f"process {p + 1} of {s.processes}"
    unready = 0         # workers in a row that ended before they were ready to measure
    while True:
        todo = [c for c in configs if c.key(s) not in got]
        if not todo:
            return got
        status, cause, ready = _run_worker(todo, s, s.process_share(p), who, take)
        rest = [c for c in todo if c.key(s) not in got]
        unready = 0 if ready else unready + 1
        # two workers in a row that could not start: the rest goes too (two shapes in a row that
        # crash or hang, say the largest two running out of memory, cost those two shapes only)
        for c in rest if unready >= 2 else _first_group(rest, s):
            take(BenchmarkResult.failed(status, f"not measured: {cause}", **record_identity(c, s, s.device)))


def _first_group(configs: list[Config], s: SweepSettings) -> list[Config]:
    """The configs a worker measures together first (measure_each): interleaved, the leading
    run of one shape; blocked, one config."""
    if not configs or s.order != "interleaved":
        return configs[:1]
    shape = (configs[0].sequence_length, configs[0].batch_size)
    n = next((i for i, c in enumerate(configs) if (c.sequence_length, c.batch_size) != shape), len(configs))
    return configs[:n]


def _run_worker(todo: list[Config], s: SweepSettings, share: SweepSettings, who: str,
                take: Callable[[BenchmarkResult], None]) -> tuple[str, str, bool]:
    """One worker measuring `todo` with `share`, each record handed to `take` as it is printed;
    once it ends, (status, cause) for the configs it left unmeasured, and whether it got ready to
    measure (its READY line, or a record): a watchdog kills it when the shape it is on goes past
    its time (status timeout)."""
    per_config = s.config_timeout_s or DEFAULT_CONFIG_TIMEOUT_S
    left = {c.key(s): c for c in todo}      # not yet printed, in sweep order
    # (start, limit) of the shape it is on, one tuple: the watchdog reads both at once (read one
    # by one, a record taken between the reads paired the old start with the next shape's limit)
    first = per_config * max(1, len(_first_group(list(left.values()), s)))
    clock = [(time.monotonic(), max(first, WORKER_START_S))]     # until READY: starting up
    ready = False
    timed_out = threading.Event()
    payload = json.dumps({"settings": share.model_dump(), "configs": [asdict(c) for c in todo]})
    # stderr to a file, not a pipe: a worker that fills a pipe nobody reads would stall
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(worker_command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=err, text=True)

        def watch() -> None:
            while proc.poll() is None:
                start, limit = clock[0]
                if time.monotonic() - start > limit:
                    timed_out.set()
                    proc.kill()
                    return
                time.sleep(min(1.0, limit / 10))
        threading.Thread(target=watch, daemon=True).start()
        try:
            # a worker gone before it read them (an import failed, the watchdog killed it while a
            # payload larger than the pipe was being written) is read and reported like any other
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.write(payload)
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
            for line in proc.stdout:      # one line as each config (or shape's group) finishes
                if line == READY_LINE:    # started (torch imported): the first shape's time from here
                    ready, clock[0] = True, (time.monotonic(), first)
                if not line.startswith(RECORD_PREFIX):
                    continue
                ready = True
                try:
                    r = BenchmarkResult.model_validate_json(line[len(RECORD_PREFIX):])
                except ValueError:
                    continue              # a garbled line: that config is reported missing
                if left.pop(r.key, None) is None:
                    continue              # a config it was not asked for (or printed again): not staged or counted
                take(r)
                clock[0] = (time.monotonic(), per_config * max(1, len(_first_group(list(left.values()), s))))
            proc.wait()
        except BaseException:             # Ctrl-C: the worker goes too; what it finished is staged
            proc.kill()
            proc.wait()
            raise
        if timed_out.is_set() and not ready:
            return "timeout", f"{who} did not start within {clock[0][1]:g} s and was killed", ready
        if timed_out.is_set():
            return "timeout", (f"{who} printed no record for {clock[0][1]:g} s (--config-timeout "
                               f"{per_config:g} s a config of the shape it was on) and was killed"), ready
        err.seek(0)
        cause = _worker_end(who, proc.returncode, err.read())
    return "error", cause if proc.returncode else f"{cause} without this config's record", ready


def merge_processes(parts: list[BenchmarkResult], s: SweepSettings) -> BenchmarkResult:
    """One record from the same config measured by several processes: the samples of all, each
    sample's round numbered p * PROCESS_ROUNDS + its round in process p (so ratios still pair by
    round, and timing's bootstrap resamples processes, then rounds); the host and device peaks
    the largest (memory_mb from the process of that device peak), the CPU GEMM probe the median,
    energy from the first process. A config that failed in any process is that failure (naming
    the process)."""
    bad = [(p, r) for p, r in enumerate(parts) if not r.ok]
    if bad:
        p, r = bad[0]
        same = all(not x.ok and x.status == r.status and x.message == r.message for x in parts)
        if len(parts) == 1 or same or f"process {p + 1} of" in r.message:
            return r     # the same in every process (a skipped config), or the message names it already
        return r.model_copy(update=dict(message=f"process {p + 1} of {len(parts)}: {r.message}"))
    first = parts[0]
    samples = [v for r in parts for v in r.samples_ms]
    rounds = [p * PROCESS_ROUNDS + x for p, r in enumerate(parts)
              for x in (r.sample_rounds or range(len(r.samples_ms)))]
    stats = {"latency_ms", "latency_std_ms", "latency_median_ms", "latency_iqr_ms", "latency_p10_ms",
             "latency_p90_ms", "throughput_tokens_per_sec", "samples_ms", "n_runs", "high_spread", "status",
             "timestamp", "sample_rounds", "rounds_id", "calibration_ms", "tflops_per_sec", "mfu",
             "gb_per_sec", "message"}
    fields = {k: v for k, v in first.model_dump().items() if k not in stats}
    for k in ("peak_memory_mb", "host_peak_rss_mb"):
        vals = [getattr(r, k) for r in parts if getattr(r, k) is not None]
        fields[k] = max(vals) if vals else None
    if fields["peak_memory_mb"] is not None:   # memory_mb from the same call as the peak kept
        fields["memory_mb"] = max((r for r in parts if r.peak_memory_mb is not None),
                                  key=lambda r: r.peak_memory_mb).memory_mb
    probes = [r.peak_tflops for r in parts if r.peak_tflops is not None]
    if first.device.startswith("cpu") and probes:
        fields["peak_tflops"] = float(np.median(probes))
    r = BenchmarkResult.from_samples(samples, sample_rounds=rounds,
                                     rounds_id="+".join(x.rounds_id for x in parts) if all(x.rounds_id for x in parts) else "",
                                     calibration_ms=[v for x in parts for v in x.calibration_ms], **fields)
    _add_rates(r, s, torch.device(s.device))
    return r


def measure_in_processes(configs: list[Config], s: SweepSettings, staging: Optional[Path] = None,
                         on_part: Optional[Callable[[BenchmarkResult], None]] = None) -> Iterator[BenchmarkResult]:
    """`s.processes` fresh worker processes, one after another, each measuring every config with
    its share of the timed runs (asv's design: a config's samples then span the machine's states
    over the whole sweep, not the seconds of one block); the records merged in sweep order once
    every process has measured every config. With `staging` (the run's processes/ folder) each
    process's ok records are kept there as they come (process-{p}.jsonl), so an interrupted run
    loses none: its --resume measures only what each process still lacks."""
    if not configs:
        return
    parts = []
    wanted = {c.key(s) for c in configs}    # not those merged already (or resumed without)
    for p in range(s.processes):
        path = None if staging is None else staging / f"process-{p + 1}.jsonl"
        staged = ({r.key: r for r in latest(read_jsonl(path)) if r.ok and r.key in wanted}
                  if path is not None and path.is_file() else {})
        if path is not None:
            path.parent.mkdir(exist_ok=True)
        for r in staged.values():
            if on_part is not None:
                on_part(r)
        with contextlib.ExitStack() as stack:
            stage = stack.enter_context(RecordWriter(path, "a")) if path is not None else None
            parts.append(_process_records(configs, s, p, staged, stage, on_part))
    for c in configs:
        yield merge_processes([got[c.key(s)] for got in parts], s)


# ---------------------------------------------------------------- the sweep
def measure_each(configs: Iterable[Config], s: SweepSettings) -> Iterator[BenchmarkResult]:
    """Measure `configs` in order (lazily): each model is built once per (model, backend, dtype).
    Interleaved, each run of consecutive configs of one shape is timed together in rounds and every
    model is kept for the run; blocked, configs are timed one by one and a backend/dtype's models
    are freed when the next one starts."""
    cache: dict = {}
    cache_for: Optional[tuple] = None
    if s.isolate:
        for cfg in configs:
            yield measure_isolated(cfg, s)
        return
    if s.order == "interleaved":   # consecutive configs of one shape are timed together; models kept
        group: list[Config] = []
        for cfg in configs:
            if group and (cfg.sequence_length, cfg.batch_size) != (group[0].sequence_length, group[0].batch_size):
                yield from measure_group(group, s, cache)
                group = []
            group.append(cfg)
        if group:
            yield from measure_group(group, s, cache)
        return
    for cfg in configs:
        if (cfg.backend, cfg.dtype) != cache_for:
            cache.clear()
            gc.collect()
            cache_for = (cfg.backend, cfg.dtype)
        yield measure(cfg, s, cache)


def apply_process_settings(s: SweepSettings) -> None:
    """What a sweep sets for the whole process that measures it (the main one, or a worker):
    torch's CPU threads, and on CPU runs the host allocator (bench/host_alloc.py)."""
    if s.threads is not None:
        torch.set_num_threads(s.threads)
    if torch.device(s.device).type == "cpu":
        host_alloc.apply(s.host_allocator)


def run_sweep(s: SweepSettings, *, writer: Optional[RecordWriter] = None,
              on_record: Optional[Callable[[BenchmarkResult], None]] = None,
              done: Optional[dict[tuple, BenchmarkResult]] = None,
              progress: bool = True, staging: Optional[Path] = None) -> list[BenchmarkResult]:
    """Run every config of `s` and return its records in sweep order.

    `done` maps keys of configs already recorded ok (a resumed run) to their records: those are
    passed to `on_record` but neither measured nor written again. A KeyboardInterrupt propagates
    after every finished record was written. With `s.processes` > 1, `staging` is the folder
    where each process's records are kept until all are merged (measure_in_processes), and the
    progress bar counts each config once per process.
    """
    done = done or {}
    apply_process_settings(s)
    results: list[BenchmarkResult] = []
    per = s.processes
    bar = tqdm(total=s.n_configs * per, file=sys.stderr, disable=not progress or not sys.stderr.isatty(),
               unit="config" if per == 1 else "config-process", dynamic_ncols=True, leave=False)

    def part(r: BenchmarkResult) -> None:       # one process's record of one config
        bar.set_description(f"{r.model_name} L={r.sequence_length} B={r.batch_size}")
        bar.update()

    pending = (c for c in iter_configs(s) if c.key(s) not in done)
    measured = (measure_in_processes(list(pending), s, staging, part) if per > 1 else measure_each(pending, s))
    try:
        for cfg in iter_configs(s):
            key = cfg.key(s)
            if key in done:   # recorded ok by the run being resumed: shown, not measured again
                r = done[key]
                bar.update(per)
            else:
                if per == 1:
                    bar.set_description(f"{cfg.model_name} L={cfg.sequence_length} B={cfg.batch_size}")
                r = next(measured)
                if writer is not None:
                    writer.write(r)
                if per == 1:
                    bar.update()
            results.append(r)
            if on_record is not None:
                on_record(r)
    finally:
        bar.close()
    return results
