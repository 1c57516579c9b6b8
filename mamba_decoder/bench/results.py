"""The record of one measured configuration, its files (JSON Lines, CSV) and the environment.

Files in a run directory:
    results.jsonl      one BenchmarkResult per line, appended, flushed and fsynced as each config
                       finishes, so a killed run keeps every finished record; the latest line for a
                       key wins (a resumed run appends retries)
    results.csv        the same records, flat (lists and dicts as JSON strings), rewritten from
                       the JSONL at the end of a run and by `mamba-bench report`
    environment.json   versions, device, CPU, threads, git commit, time, host
    .mamba-bench-files the names of the plots and reports the tool wrote (what --overwrite may remove)
    .mamba-bench.lock  held (filelock) while a run or report writes there: a second one is refused
A record cut short by a kill or a full disk (the last line only) is dropped with a warning.
Nothing read back is unpickled or executed: records are validated plain JSON.
"""
from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Annotated, Iterable, Literal, Optional

from filelock import FileLock, Timeout
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from . import host_alloc
from .names import RecordKey, is_mixed
from .timing import Ratio, ratio, summarize

JSONL_NAME, CSV_NAME, ENV_NAME = "results.jsonl", "results.csv", "environment.json"
WRITTEN_NAME, LOCK_NAME = ".mamba-bench-files", ".mamba-bench.lock"
RANKS_DIR, PROVENANCE_NAME = "ranks", "provenance.jsonl"   # a torchrun run's per-rank files
PROCESSES_DIR = "processes"   # a --processes run's records of each process, until they are merged
# skipped: the config does not apply; timeout: an --isolate worker ran past --config-timeout
Status = Literal["ok", "oom", "error", "skipped", "timeout"]
MAX_SEQUENCE_LENGTH = 2**31 - 1     # positions are int32 in every kernel
Ms = Annotated[float, Field(gt=0, allow_inf_nan=False)]          # a duration: finite and > 0
NonNeg = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class UsageError(ValueError):
    """Bad input from the user: the CLI prints it as one `error:` line (exit code 2), the API raises it."""


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
    the parameters' size. Failed configs (status oom/error/skipped) carry None for every measured value.
    """

    model_config = ConfigDict(extra="forbid")

    # the spec's fields
    model_name: str
    sequence_length: int = Field(gt=0, le=MAX_SEQUENCE_LENGTH)
    batch_size: int = Field(gt=0, le=MAX_SEQUENCE_LENGTH)
    latency_ms: Optional[Ms] = None
    throughput_tokens_per_sec: Optional[Ms] = None
    memory_mb: Optional[NonNeg] = None
    num_parameters: Optional[int] = Field(None, ge=0)
    # what a reader needs to trust it
    latency_std_ms: Optional[NonNeg] = None
    latency_median_ms: Optional[Ms] = None
    latency_iqr_ms: Optional[NonNeg] = None
    latency_p10_ms: Optional[Ms] = None
    latency_p90_ms: Optional[Ms] = None
    samples_ms: list[Ms] = Field(default_factory=list)
    # interleaved timing: the round of each sample; records timed in the same rounds share
    # rounds_id (their ratios pair by round); the calibration kernel's ms before each round
    sample_rounds: list[int] = Field(default_factory=list)
    rounds_id: str = ""
    calibration_ms: list[Ms] = Field(default_factory=list)
    order: str = ""                             # interleaved, or blocked (one config at a time)
    n_runs: int = Field(0, ge=0)
    warmup: int = Field(0, ge=0)
    high_spread: bool = False
    active_parameters: Optional[int] = Field(None, ge=0)
    peak_memory_mb: Optional[NonNeg] = None
    estimated_peak_mb: Optional[NonNeg] = None  # flops.peak_bytes before the run (an oom past the memory available)
    weights_mb: Optional[NonNeg] = None
    dim: int = Field(gt=0)
    mode: str = "forward"
    backend: str
    dtype: str
    device: str
    threads: Optional[int] = None
    kernels: dict[str, str] = Field(default_factory=dict)
    # the workload: what one timed call did (forward and train: the whole (batch, seq) input;
    # decode: one token for each of `batch_size` sequences after a context of `sequence_length`)
    variant: str = ""                           # names.join_variant of compile, cuda-graphs, cache=full, adamw
    level: str = "block"                        # block, or model (language models on token ids)
    block_config: dict[str, int] = Field(default_factory=dict)   # the model's whole config (dim, its parts' sizes)
    config_hash: str = ""                       # config_hash of its non-default sizes ("" for the defaults): in the key
    tokens_per_call: Optional[int] = None       # batch*seq (forward, train) or batch (decode)
    prefill_ms: Optional[float] = None          # decode: median prefill of the context
    cache_bytes: Optional[int] = None           # decode: cache held at the context length
    flops: Optional[float] = None               # analytic FLOPs per call (bench/flops.py)
    tflops_per_sec: Optional[float] = None      # flops / median latency
    mfu: Optional[float] = None                 # tflops_per_sec / peak_tflops
    peak_tflops: Optional[float] = None         # GPU: the datasheet's dense peak; CPU: the GEMM rate probed beside the config
    bytes_per_call: Optional[float] = None      # decode: weights + cache read per step
    gb_per_sec: Optional[float] = None          # bytes_per_call / median latency
    # energy of the timed region (bench/energy.py): NVML on CUDA, RAPL on the CPU where readable,
    # else None (never a guess); the whole device's or package's energy, idle power included
    energy_j: Optional[NonNeg] = None           # all timed calls together
    energy_per_call_j: Optional[NonNeg] = None  # per forward / train step / decode step
    energy_per_token_j: Optional[NonNeg] = None # per call / tokens_per_call
    avg_power_w: Optional[NonNeg] = None        # energy_j / the region's wall time
    energy_source: Optional[str] = None         # "nvml" or "rapl"
    host_peak_rss_mb: Optional[NonNeg] = None   # host resident-memory high-water mark of the timed region
    # provenance (a torchrun sweep: which process measured it)
    rank: Optional[int] = None
    world_size: Optional[int] = None
    host: Optional[str] = None
    device_name: Optional[str] = None           # e.g. "NVIDIA H100 80GB HBM3", or the CPU model
    status: Status = "ok"
    message: str = ""
    timestamp: str = ""

    @model_validator(mode="after")
    def _ok_is_measured(self) -> "BenchmarkResult":
        """An ok record carries what every reader divides by; a failed one carries no latency."""
        if self.sample_rounds and len(self.sample_rounds) != len(self.samples_ms):
            raise ValueError(f"sample_rounds has {len(self.sample_rounds)} entries for "
                             f"{len(self.samples_ms)} samples")
        if self.status == "ok":
            missing = [f for f in _MEASURED if getattr(self, f) is None]
            if missing:
                raise ValueError(f"an ok record needs {', '.join(missing)}")
        return self

    @property
    def key(self) -> RecordKey:
        return RecordKey(*(getattr(self, f) for f in RecordKey._fields))

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @classmethod
    def from_samples(cls, samples_ms: list[float], **fields) -> "BenchmarkResult":
        """An ok record whose statistics and throughput all come from `samples_ms` (`fields` may
        carry sample_rounds, rounds_id, calibration_ms, order)."""
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


_MEASURED = ("latency_ms", "throughput_tokens_per_sec")   # what every reader of an ok record uses


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def config_hash(sizes: dict) -> str:
    """A short hash of a model's sizes (8 hex digits of the SHA-256 of their sorted JSON), part
    of the record key, so resume, compare and the rank merge tell configs apart. It hashes the
    sizes that differ from the suite's defaults (settings.Config.size_changes): "" for the
    defaults, so records made before the sizes could change keep their keys."""
    if not sizes:
        return ""
    text = json.dumps(dict(sorted(dict(sizes).items())), separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]


def config_key(cfg, s) -> RecordKey:
    """The key of the record that config `cfg` of settings `s` makes (settings.Config,
    settings.SweepSettings): the same as that record's `.key`, whichever launcher made it."""
    return RecordKey(cfg.model_name, cfg.backend, s.mode, cfg.dtype, cfg.batch_size,
                     cfg.sequence_length, s.dim, s.variant, config_hash(cfg.size_changes))


def record_identity(cfg, s, device: str) -> dict:
    """The fields every record of config `cfg` under settings `s` carries, measured or not: the
    one builder behind `measure`, `measure_isolated` and torchrun's records of unfinished configs."""
    return dict(model_name=cfg.model_name, sequence_length=cfg.sequence_length,
                batch_size=cfg.batch_size, dim=s.dim, mode=s.mode, backend=cfg.backend,
                dtype=cfg.dtype, device=str(device), warmup=s.warmup, variant=s.variant, level=s.level,
                block_config=dict(cfg.block_config), config_hash=config_hash(cfg.size_changes))


def swept_sizes(records: Iterable["BenchmarkResult"]) -> list[str]:
    """The block_config entries that differ between records of one model (what a sweep over
    sizes varied, e.g. n_experts): the plots' and tables' labels name these."""
    values: dict[tuple, set] = {}
    for r in records:
        for k, v in r.block_config.items():
            values.setdefault((r.model_name, k), set()).add(v)
    return list(dict.fromkeys(k for (_, k), vs in values.items() if len(vs) > 1))


def config_label(r: "BenchmarkResult", keys: Iterable[str]) -> str:
    """'n_experts=8, d_state=16': the record's values of `keys` (those its model has)."""
    return ", ".join(f"{k}={r.block_config[k]}" for k in keys if k in r.block_config)


def same_sizes(a: "BenchmarkResult", b: "BenchmarkResult") -> bool:
    """Whether two records agree on every size both have (a Mamba block and a Mamba+MoE block of
    the same d_state: the like-for-like baseline of a sweep)."""
    return all(b.block_config[k] == v for k, v in a.block_config.items() if k in b.block_config)


def latency_ratio(num: "BenchmarkResult", den: "BenchmarkResult") -> Ratio:
    """num's median latency / den's, with its 95% interval: paired by round when both were timed
    in the same interleaved rounds, else from the two sets of samples independently."""
    if not num.samples_ms or not den.samples_ms:    # a record written without its samples
        v = num.latency_median_ms / den.latency_median_ms
        return Ratio(v, v, v, False)
    return ratio(num.samples_ms, den.samples_ms, num.sample_rounds, den.sample_rounds,
                 paired=bool(num.rounds_id) and num.rounds_id == den.rounds_id)


REFERENCE_SIDE = "fast"   # backend ratios are this backend's latency over each other backend's


def backend_pairs(records: Iterable["BenchmarkResult"]) -> list[tuple["BenchmarkResult", "BenchmarkResult"]]:
    """(fast record, the same config on another backend) for every config of a run measured on
    the fast backend and another one (mamba_ssm, reference), both ok: what "fast / mamba_ssm"
    ratios are made of."""
    groups: dict[tuple, dict[str, BenchmarkResult]] = {}
    for r in records:
        k = (r.model_name, r.mode, r.level, r.dtype, r.dim, r.batch_size, r.sequence_length, r.variant,
             r.config_hash)
        groups.setdefault(k, {})[r.backend] = r
    return [(g[REFERENCE_SIDE], o) for g in groups.values() if REFERENCE_SIDE in g and g[REFERENCE_SIDE].ok
            for b, o in g.items() if b != REFERENCE_SIDE and o.ok]


# ---------------------------------------------------------------- JSON Lines
class RecordWriter:
    """Appends records to a JSONL file, flushed and fsynced one by one (a kill loses no finished row).
    A write that fails (a full disk) is undone, so the file keeps whole records only, and raises
    OutputWriteError."""

    def __init__(self, path: Path | str, mode: str = "a"):
        self.path, self._fd = Path(path), None
        if mode == "a":
            _heal_tail(self.path)
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode == "a" else os.O_TRUNC),
                               0o644)
        except OSError as e:
            raise OutputWriteError(self.path, e) from None

    def write(self, record: BenchmarkResult) -> None:
        data = (record.model_dump_json() + "\n").encode("utf-8")
        start = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
        except OSError as e:
            try:
                os.ftruncate(self._fd, start)    # no half record left behind
            except OSError:
                pass                             # then the next reader drops the torn tail
            raise OutputWriteError(self.path, e) from None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class OutputWriteError(OSError):
    """A file of the run could not be written (a full disk, a folder made read-only mid-run): one
    `error:` line (exit code EXIT_WRITE); every whole record stays in results.jsonl."""

    def __init__(self, path: Path | str, cause: OSError):
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.path = Path(path)
        self.kept = ""       # what was saved, said by whoever knows (execute: the records)

    def __str__(self) -> str:
        return f"cannot write {self.path} ({self.strerror})" + (f"; {self.kept}" if self.kept else "")


def _heal_tail(path: Path) -> None:
    """Before appending: a last line without its newline gets one when it is a whole record, and
    is cut off (with a warning) when it is a record torn by a kill or a full disk."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    try:
        with open(path, "rb+") as f:
            data = f.read()
            if data.endswith(b"\n"):
                return
            start = data.rfind(b"\n") + 1
            try:
                BenchmarkResult.model_validate_json(data[start:])
                f.write(b"\n")
            except ValidationError:
                _warn_torn(path, data.count(b"\n") + 1)
                f.truncate(start)
    except OSError as e:
        raise OutputWriteError(path, e) from None


def _warn_torn(path: Path, line: int) -> None:
    print(f"warning: {path}:{line}: the last record is cut short (a killed run or a full disk); "
          "dropped, every whole record kept", file=sys.stderr)


def _decode(path: Path, i: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordFileError(f"{path}:{i}: not UTF-8 text (byte {e.start + 1} of the line)") from None


def read_jsonl(path: Path | str) -> list[BenchmarkResult]:
    """All records of a JSONL file, validated; a bad line raises RecordFileError naming file:line,
    except a bad last line without its newline, which is what a kill leaves: dropped with a warning."""
    path = Path(path)
    if not path.is_file():
        raise RecordFileError(f"{path}: no such results file")
    out = []
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as e:
        raise RecordFileError(f"{path}: cannot be read ({e.strerror})") from None
    # torn: the last line has no newline (a write cut short); a finished line is never torn
    last = len(lines) if lines and lines[-1].strip() else 0
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            out.append(BenchmarkResult.model_validate_json(_decode(path, i, raw)))
        except (ValidationError, RecordFileError) as e:
            if i == last:
                _warn_torn(path, i)
                break
            if isinstance(e, RecordFileError):
                raise
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
    """results.csv from results.jsonl (latest record per key); OutputWriteError when it cannot be
    written (the old CSV, or none, stays)."""
    run_dir = Path(run_dir)
    records = latest(read_jsonl(run_dir / JSONL_NAME))
    try:
        write_csv(records, run_dir / CSV_NAME)
    except OSError as e:
        raise OutputWriteError(run_dir / CSV_NAME, e) from None


def lock_dir(out: Path, flag: str = "--output-dir") -> FileLock:
    """Create `out` if needed and hold its lock (release it when done): a folder that cannot be
    created or written, or that another run holds, is a UsageError naming it, before any banner."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag}: {str(out)!r} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        # a read-only folder whose lock file is left from an earlier run would take the lock and
        # fail at its first write, after the banner: check the folder and the files a run rewrites
        for p in (out, *(out / n for n in (JSONL_NAME, CSV_NAME, ENV_NAME, WRITTEN_NAME))):
            if (p == out or p.exists()) and not os.access(p, os.W_OK):
                raise UsageError(f"{flag}: cannot write to {str(p)!r} (not writable; choose another folder)")
        lock = FileLock(out / LOCK_NAME, timeout=0)
        lock.acquire()
    except Timeout:
        raise UsageError(f"{flag}: {str(out)!r} is in use by another run (wait for it to finish, "
                         "or choose another folder)") from None
    except OSError as e:
        raise UsageError(f"{flag}: cannot write to {str(out)!r} ({e.strerror})") from None
    return lock


def note_written(out: Path, paths: Iterable[Path]) -> None:
    """Add plots and reports the tool wrote to the folder's list (what --overwrite removes)."""
    names = _written(out) | {Path(p).name for p in paths if Path(p).parent == out}
    (out / WRITTEN_NAME).write_text("".join(n + "\n" for n in sorted(names)), encoding="utf-8")


def _written(out: Path) -> set[str]:
    try:
        return {n for n in (out / WRITTEN_NAME).read_text(encoding="utf-8").splitlines()
                if n and "/" not in n and n not in (".", "..")}
    except (OSError, UnicodeDecodeError):
        return set()


def prepare_run_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Check and create a run directory. A non-empty one needs `resume` (continue it) or
    `overwrite`, which removes exactly the files a run writes (the records, and the plots and
    reports named in .mamba-bench-files), never anything else there."""
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other (choose one)")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir: {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir()):
        if not (resume or overwrite):
            raise UsageError(f"--output-dir: {str(out)!r} is not empty "
                             "(pass --resume to continue it, --overwrite to replace its results)")
        if overwrite:
            for name in (JSONL_NAME, CSV_NAME, ENV_NAME, PROVENANCE_NAME, *_written(out), WRITTEN_NAME):
                (out / name).unlink(missing_ok=True)
            shutil.rmtree(out / RANKS_DIR, ignore_errors=True)
            shutil.rmtree(out / PROCESSES_DIR, ignore_errors=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--output-dir: cannot create {str(out)!r} ({e.strerror})") from None


# ---------------------------------------------------------------- CSV
_JSON_COLUMNS = ("samples_ms", "kernels", "block_config", "sample_rounds", "calibration_ms")
_LIST_COLUMNS = ("samples_ms", "sample_rounds", "calibration_ms")
_EMPTY_STR_FIELDS = tuple(n for n, f in BenchmarkResult.model_fields.items() if f.default == "")


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")   # OWASP: what a spreadsheet may run as a formula


def _cell(v):
    """A CSV cell: text that a spreadsheet would read as a formula gets a leading ' (OWASP)."""
    if v is None:
        return ""
    if isinstance(v, str) and v.startswith(_FORMULA_START):
        return "'" + v
    return v


def write_csv(records: Iterable[BenchmarkResult], path: Path | str) -> None:
    """Written to a temporary file and renamed: a failure (a full disk) leaves the old file or none,
    never a part of one, and removes the temporary file."""
    fields = list(BenchmarkResult.model_fields)
    tmp = Path(str(path) + ".tmp")
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            for r in records:
                row = r.model_dump()
                for c in _JSON_COLUMNS:
                    row[c] = json.dumps(row[c])
                w.writerow({k: _cell(v) for k, v in row.items()})
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_csv(path: Path | str) -> list[BenchmarkResult]:
    path = Path(path)
    out = []
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        bad = e.object[:e.start].count(b"\n") + 1
        raise RecordFileError(f"{path}:{bad}: not UTF-8 text") from None
    import io
    with io.StringIO(text, newline="") as f:
        for i, row in enumerate(csv.DictReader(f), 2):
            try:
                data = {k: (None if v == "" else v[1:] if v.startswith("'") and v[1:].startswith(_FORMULA_START)
                            else v) for k, v in row.items()}
                for c in _JSON_COLUMNS:
                    data[c] = json.loads(data[c]) if data.get(c) else ([] if c in _LIST_COLUMNS else {})
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


def record_devices(records: Iterable["BenchmarkResult"], provenance: Optional[dict[tuple, dict]] = None,
                   default: Optional[str] = None) -> set[str]:
    """The kinds of device (e.g. 'NVIDIA H200', a CPU model) that produced `records`, the one
    answer for the rank merge, plots and compare: each record's device_name field if it has one,
    else its provenance line (torchrun), else `default` (the run's environment.json device_name),
    else its device type."""
    kinds = set()
    for r in records:
        name = getattr(r, "device_name", None)
        if not name and provenance is not None:
            name = (provenance.get((r.key, r.timestamp)) or {}).get("device_name")
        kinds.add(name or default or str(r.device).split(":")[0])
    return kinds


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
                      "pydantic", "scipy")},
        "git_commit": _git_commit(),
        "version": tool_version(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "host_allocator": host_alloc.describe() if device.startswith("cpu") else None,
    }


def tool_version() -> str:
    """This tool's version (the installed distribution's, else the package's own)."""
    v = _version("mamba-decoder-bench")
    if v is None:   # a source tree that was never installed: the package's __version__, read, not
        # imported (importing the package would load the models into plots and reports)
        text = (Path(__file__).resolve().parents[1] / "__init__.py").read_text(encoding="utf-8")
        v = next((ln.split("=", 1)[1].strip().strip("\"'") for ln in text.splitlines()
                  if ln.startswith("__version__")), "unknown")
    return v


# Settings that only choose which configs a sweep holds (or how each is isolated): a resumed run
# may add configs along these. Every other setting defines the measurement and must match.
# threads is checked as the environment's torch_threads (the count in effect, also when unset).
RESUMABLE_SETTINGS = ("sequence_lengths", "batch_sizes", "models", "backends", "dtypes", "sizes", "isolate",
                      "threads", "force", "config_timeout_s")
RESUME_ENV_FIELDS = ("torch_threads", "torch", "device_name")
# Settings added after runs were saved without them, and the value those runs were measured with:
# a run saved before --processes measured in one process, one before --host-allocator with the C
# library's defaults (so resuming it needs --host-allocator system, which the refusal names).
SAVED_BEFORE = {"processes": 1, "host_allocator": "system"}


def check_resume(out: Path, settings: dict, env: dict) -> None:
    """--resume: refuse (UsageError naming the field) when the run saved in `out` was measured
    with other settings or in another environment than this one would be."""
    saved = read_environment(Path(out) / ENV_NAME)
    if not saved:
        return
    if "settings" not in saved:
        print(f"warning: --resume: {Path(out) / ENV_NAME} predates saved settings; cannot check that "
              "this run measures the same way", file=sys.stderr)
        return
    pairs = [(k, saved["settings"].get(k, SAVED_BEFORE.get(k)), v) for k, v in settings.items()
             if k not in RESUMABLE_SETTINGS]
    pairs += [(k, saved.get(k), env.get(k)) for k in RESUME_ENV_FIELDS]
    for name, old, new in pairs:
        if name == "device_name" and (is_mixed(old) or is_mixed(new)):
            continue   # a torchrun run over several kinds of device: no one name to compare
        if old != new:
            raise UsageError(f"--resume: {name} differs from the run in {str(out)!r} ({old!r} there, "
                             f"{new!r} now); resume with the same settings, or choose another "
                             "--output-dir or --overwrite")


def resumed_environment(env: dict, saved: dict) -> dict:
    """environment.json of a resumed run: the original start kept as `time`, this session added
    to `resumptions` (its time, command line and versions)."""
    if not saved:
        return env
    out = dict(env, time=saved.get("time", env["time"]))
    this = {k: env.get(k) for k in ("time", "command_line", "git_commit", "version", "load_average")}
    out["resumptions"] = list(saved.get("resumptions", [])) + [this]
    if "command_line" in saved:
        out["command_line"] = saved["command_line"]
    return out


def write_environment(env: dict, path: Path | str) -> None:
    """Write `env`; a run continued (--resume) keeps the start time ("time") of the run it continues."""
    path = Path(path)
    try:
        first = read_environment(path).get("time")
    except RecordFileError as e:   # unreadable: it is replaced, and the reader is told what was lost
        print(f"warning: {e}; written again (the original start time is lost)", file=sys.stderr)
        first = None
    if isinstance(first, str) and first:
        env = {**env, "time": first}
    try:
        path.write_text(json.dumps(env, indent=2) + "\n", encoding="utf-8")
    except OSError as e:
        raise OutputWriteError(path, e) from None


def read_environment(path: Path | str) -> dict:
    path = Path(path)
    if not path.is_file():
        return {}
    raw = path.read_bytes()
    try:
        env = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise RecordFileError(f"{path}:{line}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise RecordFileError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(env, dict):
        raise RecordFileError(f"{path}:1: expected a JSON object")
    return env
