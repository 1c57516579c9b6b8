"""The record of one measured configuration, its files (JSON Lines, CSV) and the environment.

Files in a run directory:
    results.jsonl      one BenchmarkResult per line, appended, flushed and fsynced as each config
                       finishes, so a killed run keeps every finished record; the latest line for a
                       key wins (a resumed run appends retries)
    results.csv        the same records, flat (lists and dicts as JSON strings), rewritten from
                       the JSONL at the end of a run and by `mamba-bench report`
    environment.json   versions, device, CPU, threads, git commit, time, host
Nothing read back is unpickled or executed: records are validated plain JSON.
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Iterable, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .timing import summarize

JSONL_NAME, CSV_NAME, ENV_NAME = "results.jsonl", "results.csv", "environment.json"
Status = Literal["ok", "oom", "error"]


class RecordFileError(ValueError):
    """A saved results file that is missing or does not hold valid records (message names file:line)."""


class BenchmarkResult(BaseModel):
    """One (model, backend, mode, dtype, batch, seq, dim, variant) measurement.

    latency_ms is the mean over `n_runs` timed runs and throughput_tokens_per_sec =
    tokens_per_call / latency_ms * 1000 from that same mean, where tokens_per_call is
    batch_size * sequence_length (forward, train) or batch_size (one decode step; there
    sequence_length is the context the step follows). Memory (CUDA only; None
    on the CPU, where no per-config peak is measured honestly in-process): peak_memory_mb is
    torch.cuda.max_memory_allocated over the timed region (weights + input + activations), and
    memory_mb is that peak minus what was allocated before the input was made (the model's
    weights), i.e. what one forward of this shape costs on top of the weights. weights_mb is
    the parameters' size. Failed configs (status oom/error) carry None for every measured value.
    """

    model_config = ConfigDict(extra="forbid")

    # the spec's fields
    model_name: str
    sequence_length: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    latency_ms: Optional[float] = None
    throughput_tokens_per_sec: Optional[float] = None
    memory_mb: Optional[float] = None
    num_parameters: Optional[int] = None
    # what a reader needs to trust it
    latency_std_ms: Optional[float] = None
    latency_median_ms: Optional[float] = None
    latency_iqr_ms: Optional[float] = None
    latency_p10_ms: Optional[float] = None
    latency_p90_ms: Optional[float] = None
    samples_ms: list[float] = Field(default_factory=list)
    n_runs: int = 0
    warmup: int = 0
    high_spread: bool = False
    active_parameters: Optional[int] = None
    peak_memory_mb: Optional[float] = None
    weights_mb: Optional[float] = None
    dim: int = Field(gt=0)
    mode: str = "forward"
    backend: str
    dtype: str
    device: str
    threads: Optional[int] = None
    kernels: dict[str, str] = Field(default_factory=dict)
    # the workload: what one timed call did (forward and train: the whole (batch, seq) input;
    # decode: one token for each of `batch_size` sequences after a context of `sequence_length`)
    variant: str = ""                           # "+"-joined: compile, cuda-graphs, cache=full, adamw
    level: str = "block"                        # block, or model (language models on token ids)
    tokens_per_call: Optional[int] = None       # batch*seq (forward, train) or batch (decode)
    prefill_ms: Optional[float] = None          # decode: median prefill of the context
    cache_bytes: Optional[int] = None           # decode: cache held at the context length
    flops: Optional[float] = None               # analytic FLOPs per call (bench/flops.py)
    tflops_per_sec: Optional[float] = None      # flops / median latency
    mfu: Optional[float] = None                 # tflops_per_sec / peak_tflops
    peak_tflops: Optional[float] = None         # GPU: the datasheet's dense peak; CPU: the GEMM rate probed beside the config
    bytes_per_call: Optional[float] = None      # decode: weights + cache read per step
    gb_per_sec: Optional[float] = None          # bytes_per_call / median latency
    # provenance (a torchrun sweep: which process measured it)
    rank: Optional[int] = None
    world_size: Optional[int] = None
    host: Optional[str] = None
    device_name: Optional[str] = None           # e.g. "NVIDIA H100 80GB HBM3", or the CPU model
    status: Status = "ok"
    message: str = ""
    timestamp: str = ""

    @property
    def key(self) -> tuple:
        return config_key(self.model_name, self.backend, self.mode, self.dtype, self.batch_size,
                          self.sequence_length, self.dim, self.variant)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @classmethod
    def from_samples(cls, samples_ms: list[float], **fields) -> "BenchmarkResult":
        """An ok record whose statistics and throughput all come from `samples_ms`."""
        s = summarize(samples_ms)
        tokens = fields.get("tokens_per_call") or fields["batch_size"] * fields["sequence_length"]
        return cls(latency_ms=s.mean, latency_std_ms=s.std, latency_median_ms=s.median,
                   latency_iqr_ms=s.iqr, latency_p10_ms=s.p10, latency_p90_ms=s.p90,
                   throughput_tokens_per_sec=tokens / s.mean * 1e3, samples_ms=list(samples_ms),
                   n_runs=s.n, high_spread=s.high_spread, status="ok", timestamp=now(), **fields)

    @classmethod
    def failed(cls, status: Status, message: str, **fields) -> "BenchmarkResult":
        one_line = " ".join(str(message).split())[:500]
        return cls(status=status, message=one_line, timestamp=now(), **fields)


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def config_key(model_name: str, backend: str, mode: str, dtype: str, batch_size: int,
               sequence_length: int, dim: int, variant: str = "") -> tuple:
    return (model_name, backend, mode, dtype, batch_size, sequence_length, dim, variant)


# ---------------------------------------------------------------- JSON Lines
class RecordWriter:
    """Appends records to a JSONL file, flushed and fsynced one by one (a kill loses no finished row)."""

    def __init__(self, path: Path | str, mode: str = "a"):
        self.path = Path(path)
        self._f = open(self.path, mode, encoding="utf-8")

    def write(self, record: BenchmarkResult) -> None:
        self._f.write(record.model_dump_json() + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_jsonl(path: Path | str) -> list[BenchmarkResult]:
    """All records of a JSONL file, validated; a bad line raises RecordFileError naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise RecordFileError(f"{path}: no such results file")
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(BenchmarkResult.model_validate_json(line))
            except ValidationError as e:
                err = e.errors()[0]
                where = ".".join(map(str, err.get("loc", ()))) or "line"
                raise RecordFileError(f"{path}:{i}: not a valid record ({where}: {err['msg']})") from None
    return out


def latest(records: Iterable[BenchmarkResult]) -> list[BenchmarkResult]:
    """One record per key, the last one written (order of first appearance kept)."""
    by_key: dict[tuple, BenchmarkResult] = {}
    for r in records:
        by_key[r.key] = r
    return list(by_key.values())


def load_run(run_dir: Path | str) -> list[BenchmarkResult]:
    """The records of a run directory (its results.jsonl), latest per key."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RecordFileError(f"{run_dir}: not a directory (expected a run directory with {JSONL_NAME})")
    return latest(read_jsonl(run_dir / JSONL_NAME))


def recorded_ok(run_dir: Path | str) -> dict[tuple, "BenchmarkResult"]:
    """Key -> record of the configs a run directory already holds with status ok (what --resume
    skips); empty when it has no results file yet."""
    path = Path(run_dir) / JSONL_NAME
    return {r.key: r for r in latest(read_jsonl(path)) if r.ok} if path.is_file() else {}


def rewrite_csv(run_dir: Path | str) -> None:
    """results.csv from results.jsonl (latest record per key)."""
    run_dir = Path(run_dir)
    write_csv(latest(read_jsonl(run_dir / JSONL_NAME)), run_dir / CSV_NAME)


# ---------------------------------------------------------------- CSV
_JSON_COLUMNS = ("samples_ms", "kernels")
_EMPTY_STR_FIELDS = tuple(n for n, f in BenchmarkResult.model_fields.items() if f.default == "")


def write_csv(records: Iterable[BenchmarkResult], path: Path | str) -> None:
    fields = list(BenchmarkResult.model_fields)
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in records:
            row = r.model_dump()
            for c in _JSON_COLUMNS:
                row[c] = json.dumps(row[c])
            w.writerow({k: "" if v is None else v for k, v in row.items()})
    os.replace(tmp, path)


def read_csv(path: Path | str) -> list[BenchmarkResult]:
    path = Path(path)
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.DictReader(f), 2):
            try:
                data = {k: (None if v == "" else v) for k, v in row.items()}
                for c in _JSON_COLUMNS:
                    data[c] = json.loads(data[c]) if data.get(c) else ([] if c == "samples_ms" else {})
                for name in _EMPTY_STR_FIELDS:   # CSV writes "" and None alike
                    data[name] = data.get(name) or ""
                out.append(BenchmarkResult.model_validate(data))
            except (ValidationError, json.JSONDecodeError, TypeError) as e:
                raise RecordFileError(f"{path}:{i}: not a valid record ({str(e).splitlines()[0]})") from None
    return out


# ---------------------------------------------------------------- environment
def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> Optional[str]:
    # A copy of the tree without its own history (e.g. shipped to a GPU host) names its commit.
    if os.environ.get("MAMBA_BENCH_GIT_COMMIT"):
        return os.environ["MAMBA_BENCH_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
                           timeout=5).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def environment(device: str = "cpu", threads: Optional[int] = None) -> dict:
    """What a reader needs to reproduce or trust a run."""
    import torch

    cuda = torch.cuda.is_available()
    dev_name = torch.cuda.get_device_name(0) if cuda and device.startswith("cuda") else cpu_model()
    return {
        "time": now(),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "device": device,
        "device_name": dev_name,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "packages": {name: _version(name) for name in
                     ("mamba-decoder-bench", "mambapy", "open-kimi", "triton", "numpy", "matplotlib",
                      "pydantic")},
        "git_commit": _git_commit(),
    }


def write_environment(env: dict, path: Path | str) -> None:
    Path(path).write_text(json.dumps(env, indent=2) + "\n", encoding="utf-8")


def read_environment(path: Path | str) -> dict:
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        env = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RecordFileError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(env, dict):
        raise RecordFileError(f"{path}:1: expected a JSON object")
    return env
