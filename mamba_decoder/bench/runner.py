"""The sweep: models x backends x dtypes x sequence lengths x batch sizes, one record per config.

Each config is measured in-process (models built once per (model, backend, dtype) and reused
across shapes) or, with `isolate=True`, in its own `python -m mamba_decoder.bench.worker`
subprocess, so a segfault or a CUDA error costs that row only. An out-of-memory config becomes a
status "oom" record and any other exception a status "error" record; the sweep goes on. Records
are handed to `on_record` (console lines) and `writer` (JSONL, fsynced) as each one finishes.
"""
from __future__ import annotations

import gc
import json
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import nn
from tqdm import tqdm

from ..config import BACKENDS, DEFAULT_BACKEND
from ..models import kernel_choices
from . import flops
from .registry import build_lm, build_model, models_for, parameter_counts
from .results import BenchmarkResult, RecordWriter, config_key, cpu_model
from .timing import cpu_gemm_tflops, time_callable
from .workloads import DecodeSession, GraphedForward, TrainStep

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                  "float16": torch.float16}
MB = 2 ** 20


# ---------------------------------------------------------------- scenarios (what is timed)
def forward_scenario(model: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    """One inference forward pass over the whole (B, L, dim) input."""
    model.eval()

    def step() -> Any:
        with torch.inference_mode():
            return model(x)
    return step


MODES = ("forward", "decode", "train")
LEVELS = ("block", "model")
CACHE_KINDS = ("latent", "full")


# ---------------------------------------------------------------- settings and configs
@dataclass
class SweepSettings:
    """Everything a sweep needs; `validate` checks it once, at the edge (CLI or API)."""

    dim: int = 512
    sequence_lengths: list[int] = field(default_factory=lambda: [128, 256, 512, 1024, 2048])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    models: list[str] = field(default_factory=list)   # empty: every model of `level`
    backends: list[str] = field(default_factory=lambda: [DEFAULT_BACKEND])
    dtypes: list[str] = field(default_factory=lambda: ["float32"])
    device: str = "cpu"
    mode: str = "forward"
    warmup: int = 5
    runs: int = 20
    min_time_s: float = 0.0
    threads: Optional[int] = None   # torch CPU threads; None keeps torch's current setting
    seed: int = 0
    isolate: bool = False
    level: str = "block"            # block: the three blocks; model: language models on token ids
    compile: bool = False           # torch.compile the model's forward (nn.Module.compile)
    cuda_graphs: bool = False       # decode: capture one step in a CUDA graph and replay it
    cache_kind: Optional[str] = None  # decode: MLA's cache, latent (absorb) or full (naive K/V)
    optimizer_step: bool = False    # train: add an AdamW step to forward + backward
    depth: int = 4                  # model level: number of Mamba blocks
    vocab_size: int = 32000         # model level

    @property
    def variant(self) -> str:
        """What distinguishes runs of the same mode beyond the grid (part of the record key)."""
        tags = ["compile"] * self.compile + ["cuda-graphs"] * self.cuda_graphs
        if self.cache_kind is not None:
            tags.append(f"cache={self.cache_kind}")
        if self.optimizer_step:
            tags.append("adamw")
        if self.level == "model":
            tags.append(f"depth={self.depth}")
        return "+".join(tags)

    def validate(self) -> "SweepSettings":
        def ints(name: str, values, lo: int) -> None:
            vals = values if isinstance(values, (list, tuple)) else [values]
            if isinstance(values, (list, tuple)) and not values:
                raise ValueError(f"{name} is empty (give at least one integer >= {lo})")
            for v in vals:
                if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                    raise ValueError(f"{name}: {v!r} is not an integer >= {lo}")

        ints("dim", self.dim, 1)
        ints("sequence lengths", self.sequence_lengths, 1)
        ints("batch sizes", self.batch_sizes, 1)
        ints("warmup", self.warmup, 0)
        ints("runs", self.runs, 1)
        ints("seed", self.seed, 0)
        if self.threads is not None:
            ints("threads", self.threads, 1)
        if isinstance(self.min_time_s, bool) or not isinstance(self.min_time_s, (int, float)) \
                or not self.min_time_s >= 0 or self.min_time_s == float("inf"):
            raise ValueError(f"min time: {self.min_time_s!r} is not a finite number of seconds >= 0")
        if not self.models:     # all models of the level
            self.models = list(models_for(self.level))
        ints("depth", self.depth, 1)
        ints("vocab size", self.vocab_size, 2)
        for name, values, accepted in (("model", self.models, list(models_for(self.level))),
                                       ("backend", self.backends, list(BACKENDS)),
                                       ("dtype", self.dtypes, list(DTYPES)),
                                       ("mode", [self.mode], list(MODES)),
                                       ("level", [self.level], list(LEVELS)),
                                       ("cache kind", [self.cache_kind or "latent"], list(CACHE_KINDS))):
            if not values:
                raise ValueError(f"no {name} given (accepted: {', '.join(accepted)})")
            for v in values:
                if v not in accepted:
                    raise ValueError(f"{name} {v!r} is not one of: {', '.join(map(repr, accepted))}")
        dev = torch.device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} requested but CUDA is not available")
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"device {self.device!r} is not 'cpu' or 'cuda'")
        if dev.type == "cpu" and "float16" in self.dtypes and not cpu_supports_float16():
            raise ValueError("dtype 'float16' is not supported on this CPU (accepted: float32, bfloat16)")
        if self.cuda_graphs and (self.mode == "train" or dev.type != "cuda"):
            raise ValueError(f"--cuda-graphs applies to --mode forward or decode on CUDA "
                             f"(got mode {self.mode!r} on {dev.type})")
        if self.cache_kind is not None and self.mode != "decode":
            raise ValueError(f"--cache-kind applies to --mode decode (got mode {self.mode!r})")
        if self.optimizer_step and self.mode != "train":
            raise ValueError(f"--optimizer-step applies to --mode train (got mode {self.mode!r})")
        if self.mode == "decode" and self.level != "block":
            raise ValueError("--mode decode runs at --level block (the blocks' own caches)")
        return self

    @property
    def n_configs(self) -> int:
        return (len(self.models) * len(self.backends) * len(self.dtypes)
                * len(self.sequence_lengths) * len(self.batch_sizes))


def cpu_supports_float16() -> bool:
    try:
        a = torch.randn(4, 4).half()
        (a @ a).sum().item()
        return True
    except RuntimeError:
        return False


@dataclass(frozen=True)
class Config:
    model_name: str
    backend: str
    dtype: str
    sequence_length: int
    batch_size: int

    def key(self, s: SweepSettings) -> tuple:
        return config_key(self.model_name, self.backend, s.mode, self.dtype, self.batch_size,
                          self.sequence_length, s.dim, s.variant)


def iter_configs(s: SweepSettings) -> Iterator[Config]:
    """The spec's order: for each shape, every model (so models compare line by line)."""
    for backend in s.backends:
        for dtype in s.dtypes:
            for seq in s.sequence_lengths:
                for batch in s.batch_sizes:
                    for name in s.models:
                        yield Config(name, backend, dtype, seq, batch)


def banner_kernels(s: SweepSettings) -> dict[str, dict[str, str]]:
    """'model (backend, dtype)' -> kernel choices, from models built on the meta device (no memory)."""
    out = {}
    for backend in s.backends:
        for dtype in s.dtypes:
            for name in s.models:
                label = f"{name} ({backend}, {dtype})"
                try:
                    with torch.device("meta"):
                        m = registry_build(name, s, backend)
                    out[label] = kernel_choices(m, torch.device(s.device), DTYPES[dtype])
                except Exception as e:  # noqa: BLE001 -- the banner must not stop the sweep
                    out[label] = {"unavailable": f"{type(e).__name__}: {e}".splitlines()[0][:120]}
    return out


def _max_seq_len(s: SweepSettings) -> int:
    return max(4096, max(s.sequence_lengths))


# ---------------------------------------------------------------- measuring one config
class _Built:
    def __init__(self, model: Optional[nn.Module] = None, error: Optional[BaseException] = None):
        self.model, self.error = model, error


def _build(cfg: Config, s: SweepSettings) -> nn.Module:
    torch.manual_seed(s.seed)   # same weights for the same (model, dim, seed)
    model = registry_build(cfg.model_name, s, cfg.backend)
    model = model.to(device=torch.device(s.device), dtype=DTYPES[cfg.dtype])
    if s.compile:
        model.compile()         # in place: the module keeps its type, its cache API and state dict
    return model


def registry_build(name: str, s: SweepSettings, backend: str) -> nn.Module:
    """The model factory (tests patch `runner.build_model` to inject failures)."""
    if s.level == "model":
        return build_lm(name, s.dim, backend, depth=s.depth, vocab_size=s.vocab_size,
                        max_seq_len=_max_seq_len(s))
    return build_model(name, s.dim, backend, max_seq_len=_max_seq_len(s))


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in msg or "not enough memory" in msg)


def measure(cfg: Config, s: SweepSettings, cache: Optional[dict] = None) -> BenchmarkResult:
    """Measure one config in this process. Never raises, except KeyboardInterrupt."""
    cache = {} if cache is None else cache
    device = torch.device(s.device)
    cuda = device.type == "cuda"
    fields: dict[str, Any] = dict(model_name=cfg.model_name, sequence_length=cfg.sequence_length,
                                  batch_size=cfg.batch_size, dim=s.dim, mode=s.mode,
                                  backend=cfg.backend, dtype=cfg.dtype, device=str(device),
                                  threads=torch.get_num_threads(), warmup=s.warmup,
                                  variant=s.variant, level=s.level, device_name=device_name(device))
    failure: Optional[tuple[str, str]] = None
    result = None
    step = workload = None
    try:
        ck = (cfg.model_name, cfg.backend, cfg.dtype)
        if ck not in cache:
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
        if cuda:
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
        torch.manual_seed(s.seed * 1_000_003 + cfg.sequence_length * 1009 + cfg.batch_size)
        step, max_runs, workload = _workload(model, cfg, s, device, fields)
        reset = (lambda: torch.cuda.reset_peak_memory_stats(device)) if cuda else None
        samples = time_callable(step, device, warmup=s.warmup, runs=s.runs, max_runs=max_runs,
                                min_time_s=s.min_time_s, before_timing=reset)
        if cuda:
            peak = torch.cuda.max_memory_allocated(device)
            fields.update(peak_memory_mb=peak / MB, memory_mb=(peak - base) / MB)
        elif device.type == "cpu":
            fields.update(peak_tflops=cpu_gemm_tflops(DTYPES[cfg.dtype]))
        result = BenchmarkResult.from_samples(samples, **fields)
        _add_rates(result, s, device)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 -- one config's failure is a record, not the end of the sweep
        failure = ("oom" if _is_oom(e) else "error", f"{type(e).__name__}: {e}")
    finally:
        step = workload = None
    if failure is not None:   # outside `except`, so the traceback no longer pins the tensors
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        result = BenchmarkResult.failed(failure[0], failure[1], **fields)
    return result


def _workload(model: nn.Module, cfg: Config, s: SweepSettings, device: torch.device,
              fields: dict[str, Any]) -> tuple[Callable[[], Any], int, Any]:
    """The callable the timer runs for this mode, the most runs it may take, and the object that
    owns its state. Adds the mode's own figures (tokens per call, FLOPs, prefill, cache) to `fields`."""
    B, L, dtype = cfg.batch_size, cfg.sequence_length, DTYPES[cfg.dtype]
    if s.mode == "decode":
        # Room for every step the timer may take: warmup + runs (4x runs when --min-time asks for more).
        max_runs = s.runs * (4 if s.min_time_s > 0 else 1)
        session = DecodeSession(model, B, L, s.warmup + max_runs, device, dtype,
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
    """Achieved TFLOP/s, MFU against the device's peak for the dtype, and GB/s (decode)."""
    sec = r.latency_median_ms / 1e3
    if r.flops:
        r.tflops_per_sec = r.flops / sec / 1e12
        r.peak_tflops = r.peak_tflops or flops.peak_tflops(r.device_name or "", r.dtype)
        r.mfu = r.tflops_per_sec / r.peak_tflops if r.peak_tflops else None
    if r.bytes_per_call:
        r.gb_per_sec = r.bytes_per_call / sec / 1e9


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


# ---------------------------------------------------------------- isolation
def worker_command() -> list[str]:
    return [sys.executable, "-m", "mamba_decoder.bench.worker"]


RECORD_PREFIX = "RECORD "


def measure_isolated(cfg: Config, s: SweepSettings) -> BenchmarkResult:
    """Measure one config in a fresh subprocess; a crash becomes an error record naming its cause."""
    payload = json.dumps({"settings": asdict(s), "config": asdict(cfg)})
    proc = subprocess.run(worker_command(), input=payload, capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RECORD_PREFIX):
            return BenchmarkResult.model_validate_json(line[len(RECORD_PREFIX):])
    fields = dict(model_name=cfg.model_name, sequence_length=cfg.sequence_length,
                  batch_size=cfg.batch_size, dim=s.dim, mode=s.mode, backend=cfg.backend,
                  dtype=cfg.dtype, device=s.device, warmup=s.warmup, variant=s.variant, level=s.level)
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        cause = f"worker killed by {name} (signal {-proc.returncode})"
        if name == "SIGKILL":
            cause += ", possibly out of host memory"
    else:
        cause = f"worker exited with code {proc.returncode}"
    last = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    if last:
        cause += f": {last[-1].strip()}"
    return BenchmarkResult.failed("error", cause, **fields)


# ---------------------------------------------------------------- the sweep
def measure_each(configs: Iterable[Config], s: SweepSettings) -> Iterator[BenchmarkResult]:
    """Measure `configs` in order (lazily): each model is built once per (model, backend, dtype),
    and a backend/dtype's models are freed when the next one starts."""
    cache: dict = {}
    cache_for: Optional[tuple] = None
    for cfg in configs:
        if (cfg.backend, cfg.dtype) != cache_for:
            cache.clear()
            gc.collect()
            cache_for = (cfg.backend, cfg.dtype)
        yield measure_isolated(cfg, s) if s.isolate else measure(cfg, s, cache)


def run_sweep(s: SweepSettings, *, writer: Optional[RecordWriter] = None,
              on_record: Optional[Callable[[BenchmarkResult], None]] = None,
              done: Optional[dict[tuple, BenchmarkResult]] = None,
              progress: bool = True) -> list[BenchmarkResult]:
    """Run every config of `s` and return its records in sweep order.

    `done` maps keys of configs already recorded ok (a resumed run) to their records: those are
    passed to `on_record` but neither measured nor written again. A KeyboardInterrupt propagates after every finished record was written.
    """
    done = done or {}
    if s.threads is not None:
        torch.set_num_threads(s.threads)
    results: list[BenchmarkResult] = []
    measured = measure_each((c for c in iter_configs(s) if c.key(s) not in done), s)
    bar = tqdm(total=s.n_configs, file=sys.stderr, disable=not progress, unit="config",
               dynamic_ncols=True, leave=False)
    try:
        for cfg in iter_configs(s):
            key = cfg.key(s)
            if key in done:   # recorded ok by the run being resumed: shown, not measured again
                r = done[key]
            else:
                bar.set_description(f"{cfg.model_name} L={cfg.sequence_length} B={cfg.batch_size}")
                r = next(measured)
                if writer is not None:
                    writer.write(r)
            results.append(r)
            if on_record is not None:
                on_record(r)
            bar.update()
    finally:
        bar.close()
    return results
