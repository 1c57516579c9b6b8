"""What a sweep measures: its settings (validated once, at the edge) and its configs.

A config is one (model, backend, dtype, sequence length, batch size) of the grid; with the
settings it makes one record, identified by `results.config_key`.
"""
from __future__ import annotations

import itertools
import os
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Annotated, Iterator, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..config import BACKENDS, DEFAULT_BACKEND, BlockSizes, one_line_errors
from ..kernels import mamba_ssm_ext
from . import host_alloc
from .names import MODEL_PARTS, RecordKey, join_variant, models_for
from .results import UsageError, config_key  # noqa: F401 (UsageError: settings' errors)

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                  "float16": torch.float16}
MODES = ("forward", "decode", "train")
LEVELS = ("block", "model")
CACHE_KINDS = ("latent", "full")
ORDERS = ("interleaved", "blocked")


def _field(title: str, accepted: str, default=..., **kw):
    """A field whose errors read "<title>: <value> is not <accepted>" (`_one_line`)."""
    return Field(default, title=title, description=accepted, **kw)


def _choices(values) -> str:
    return "one of: " + ", ".join(map(repr, values))


PosInt = Annotated[int, Field(strict=True, ge=1)]
Flag = Annotated[bool, Field(strict=True)]
MAX_SEED = 2**63 - 1       # torch.manual_seed takes up to 2**64-1; runner derives per-shape seeds mod 2**64
Backend = Literal[BACKENDS]
DType = Literal[tuple(DTYPES)]


def _field_message(fields, err) -> str:
    """A field error as one line naming the field, the value and what is accepted."""
    name = str(err["loc"][0])
    f = fields.get(name)
    if f is None or f.description is None:
        return f"{name}: {err['msg'].lower()}"
    if err["type"] == "list_type":
        return f"{f.title}: {err['input']!r} is not a list (each {f.description})"
    if err["type"] == "too_short":
        return f"{f.title}: none given (accepted: {f.description})"
    sep = " " if f.description.startswith("one of") else ": "
    return f"{f.title}{sep}{err['input']!r} is not {f.description}"


class SweepSettings(BaseModel):
    """Everything a sweep needs, validated when it is made (at the edge: CLI, API, worker).

    A bad value raises ValueError (pydantic's ValidationError) with one line that names the
    value and what is accepted; the CLI prints it as its `error:` line."""

    model_config = ConfigDict(extra="forbid")

    dim: PosInt = _field("dim", "an integer >= 1", 512)
    sequence_lengths: list[PosInt] = _field("sequence lengths", "an integer >= 1",
                                            default_factory=lambda: [128, 256, 512, 1024, 2048], min_length=1)
    batch_sizes: list[PosInt] = _field("batch sizes", "an integer >= 1",
                                       default_factory=lambda: [1, 2, 4, 8], min_length=1)
    models: list[str] = Field(default_factory=list)   # empty: every model of `level`
    backends: list[Backend] = _field("backend", _choices(BACKENDS), default_factory=lambda: [DEFAULT_BACKEND],
                                     min_length=1)
    dtypes: list[DType] = _field("dtype", _choices(DTYPES), default_factory=lambda: ["float32"], min_length=1)
    device: str = "cpu"
    mode: Literal[MODES] = _field("mode", _choices(MODES), "forward")
    warmup: Annotated[int, Field(strict=True, ge=0)] = _field("warmup", "an integer >= 0", 5)
    runs: PosInt = _field("runs", "an integer >= 1", 20)
    min_time_s: Annotated[float, Field(strict=True, ge=0, allow_inf_nan=False)] = _field(
        "min time", "a finite number of seconds >= 0", 0.0)
    threads: Optional[PosInt] = _field("threads", "an integer >= 1", None)  # None keeps torch's setting
    seed: Annotated[int, Field(strict=True, ge=0, le=MAX_SEED)] = _field(
        "seed", f"an integer in 0..{MAX_SEED} (2**63-1)", 0)
    isolate: Flag = _field("isolate", "True or False", False)
    # the sweep measured in this many worker processes one after another, each config's timed runs
    # split between them (runner.measure_in_processes); intervals then resample processes too
    processes: PosInt = _field("processes", "an integer >= 1", 1)
    force: Flag = _field("force", "True or False", False)  # run configs whose estimated peak memory exceeds what is available
    # --isolate: seconds one config's worker may take; --processes: a worker's seconds per config of
    # the shape it is on, between two records (None: runner.DEFAULT_CONFIG_TIMEOUT_S)
    config_timeout_s: Optional[Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)]] = _field(
        "config timeout", "a finite number of seconds > 0", None)
    # interleaved: at each shape every config is timed in rounds, round robin (drift hits all
    # alike; ratios pair by round); blocked: each config's runs in one block (the old order)
    order: Literal[ORDERS] = _field("order", _choices(ORDERS), "interleaved")
    # CPU runs: whether freed host memory is kept for reuse (bench/host_alloc.py)
    host_allocator: Literal[host_alloc.CHOICES] = _field("host allocator", _choices(host_alloc.CHOICES),
                                                          host_alloc.DEFAULT)
    level: Literal[LEVELS] = _field("level", _choices(LEVELS), "block")  # block: the three blocks; model: LMs
    compile: Flag = False           # torch.compile the model's forward (nn.Module.compile)
    cuda_graphs: Flag = False       # forward / decode: capture one call in a CUDA graph and replay it
    cache_kind: Optional[Literal[CACHE_KINDS]] = _field("cache kind", _choices(CACHE_KINDS), None)  # decode: MLA's cache
    optimizer_step: Flag = False    # train: add an AdamW step to forward + backward
    depth: PosInt = _field("depth", "an integer >= 1", 4)                    # model level: Mamba blocks
    vocab_size: Annotated[int, Field(strict=True, ge=2)] = _field("vocab size", "an integer >= 2", 32000)
    # block hyperparameters (config.BlockSizes field -> its values; several values: one more axis
    # of the grid; a size not given takes the suite's default)
    sizes: dict[str, list] = Field(default_factory=dict)

    _one_line = one_line_errors(lambda cls, err: _field_message(cls.model_fields, err))

    @field_validator("models", "backends", "dtypes", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        """One name is a list of one (the API's `models="MLABlock"`, never its letters); a torch
        dtype is its name (`dtype=torch.float32`)."""
        if isinstance(v, (str, torch.dtype)):
            v = [v]
        if isinstance(v, (list, tuple)):
            v = [_dtype_name(x) if isinstance(x, torch.dtype) else x for x in v]
        return v

    @field_validator("sequence_lengths", "batch_sizes", mode="before")
    @classmethod
    def _sequence(cls, v):
        """A tuple or range is a list; one integer is not (pydantic names it)."""
        return list(v) if isinstance(v, (tuple, range)) else v

    @model_validator(mode="after")
    def _consistent(self) -> "SweepSettings":
        """What no one field says alone: models of the level, the device, and which flags apply."""
        known = models_for(self.level)
        for name in ("sequence_lengths", "batch_sizes", "models", "backends", "dtypes"):   # each once
            setattr(self, name, list(dict.fromkeys(getattr(self, name))))
        if self.threads is not None and self.threads > (os.cpu_count() or 1):
            raise ValueError(f"--threads: {self.threads} is more than the {os.cpu_count()} CPUs here "
                             f"(accepted: 1..{os.cpu_count()})")
        if not self.models:
            self.models = list(known)
        for m in self.models:
            if m not in known:
                raise ValueError(f"model {m!r} is not {_choices(known)}")
        dev = torch.device(self.device)
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"device {self.device!r} is not 'cpu' or 'cuda'")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} requested but CUDA is not available")
        if dev.type == "cpu" and "float16" in self.dtypes and not cpu_supports_float16():
            raise ValueError("dtype 'float16' is not supported on this CPU (accepted: float32, bfloat16)")
        if "mamba_ssm" in self.backends:
            mamba_ssm_ext.require(dev)     # the install hint, or why it cannot run here
        if self.cuda_graphs and (self.mode == "train" or dev.type != "cuda"):
            raise ValueError(f"--cuda-graphs applies to --mode forward or decode on CUDA "
                             f"(got mode {self.mode!r} on {dev.type})")
        if self.cache_kind is not None and self.mode != "decode":
            raise ValueError(f"--cache-kind applies to --mode decode (got mode {self.mode!r})")
        if self.processes > 1 and self.isolate:
            raise ValueError(f"--processes {self.processes} measures the sweep in {self.processes} worker "
                             "processes; --isolate (a worker per config) does not combine with it")
        if self.processes > self.runs:
            raise ValueError(f"--processes {self.processes} splits each config's timed runs between the "
                             f"processes: it needs at least as many runs (--runs {self.runs})")
        if self.config_timeout_s is not None and not self.isolate and self.processes == 1:
            raise ValueError("--config-timeout applies to --isolate and --processes (a config measured "
                             "in this process cannot be stopped safely)")
        if self.optimizer_step and self.mode != "train":
            raise ValueError(f"--optimizer-step applies to --mode train (got mode {self.mode!r})")
        if self.mode == "decode" and self.level != "block":
            raise ValueError("--mode decode runs at --level block (the blocks' own caches)")
        for name, values in self.sizes.items():
            if name not in BlockSizes.model_fields:
                raise ValueError(f"model size {name!r} is not one of: {', '.join(BlockSizes.model_fields)}")
            if not isinstance(values, list) or not values:
                raise ValueError(f"model size {name}: no value given (accepted: one or more integers)")
            for v in values:   # a list or table in a TOML file: named here, not a TypeError in size_grid
                if not isinstance(v, Hashable):
                    raise ValueError(f"model size {name}: {v!r} is not an integer (accepted: one or more integers)")
        self.size_grid()   # each point of the grid checked once, here (one line)
        return self

    def process_share(self, p: int) -> "SweepSettings":
        """The settings process p (0-based) of `processes` measures with: its share of the timed
        runs (and of --min-time), the rest the same but --config-timeout, which the parent's
        watchdog applies (runner._run_worker): a worker's settings (one process, no --isolate)
        would refuse it."""
        n = self.processes
        return self.model_copy(update=dict(runs=self.runs // n + (p < self.runs % n), processes=1,
                                           min_time_s=self.min_time_s / n, config_timeout_s=None))

    def size_grid(self) -> list[BlockSizes]:
        """Every combination of the given sizes (the grid's hyperparameter axes), validated."""
        names = list(self.sizes)
        out = []
        for values in itertools.product(*(list(dict.fromkeys(self.sizes[n])) for n in names)):
            try:
                out.append(BlockSizes(**dict(zip(names, values))))
            except ValidationError as e:
                raise ValueError(one_line(e)) from None
        return out

    def swept_sizes(self) -> list[str]:
        """The sizes given more than one value (the sweep's hyperparameter axes)."""
        return [n for n, v in self.sizes.items() if len(dict.fromkeys(v)) > 1]

    def block_config(self, model_name: str, sizes: BlockSizes) -> tuple[tuple[str, int], ...]:
        """The whole config a model of this sweep has at `sizes` (its record's block_config)."""
        d = sizes.applied(self.dim, MODEL_PARTS[model_name])
        if self.level == "model":
            d.update(depth=self.depth, vocab_size=self.vocab_size)
        return tuple(d.items())

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
        return join_variant(tags)

    @property
    def n_configs(self) -> int:
        per_shape = sum(len({self.block_config(m, z) for z in self.size_grid()}) for m in self.models)
        return per_shape * len(self.backends) * len(self.dtypes) * len(self.sequence_lengths) * len(self.batch_sizes)


def _dtype_name(d: torch.dtype):
    """A torch dtype's name in DTYPES, or the dtype itself (then refused, named, by the field)."""
    return next((name for name, t in DTYPES.items() if t == d), str(d))


def cpu_supports_float16() -> bool:
    try:
        a = torch.ones(4, 4).half()
        (a @ a).sum().item()
        return True
    except RuntimeError:
        return False


def one_line(e: ValidationError) -> str:
    """The settings' error as the one line the CLI prints."""
    return e.errors()[0]["msg"].removeprefix("Value error, ")


@dataclass(frozen=True)
class Config:
    model_name: str
    backend: str
    dtype: str
    sequence_length: int
    batch_size: int
    # the model's whole config, (name, value) pairs: dim, the sizes of its parts (MODEL_PARTS),
    # depth and vocab_size at the model level; () for the suite's defaults at s.dim
    block_config: tuple = ()

    def __post_init__(self):   # from JSON (the --isolate worker): lists back to pairs
        object.__setattr__(self, "block_config", tuple(tuple(p) for p in self.block_config))

    def key(self, s: SweepSettings) -> RecordKey:
        return config_key(self, s)

    @property
    def size_changes(self) -> dict:
        """The entries of block_config that differ from the suite's defaults at its width (what
        the key's config_hash hashes: the defaults hash to "", as records made before sizes
        could change, so those keep their keys)."""
        d = dict(self.block_config)
        if not d:
            return {}
        parts = MODEL_PARTS.get(self.model_name, ())
        default = {**BlockSizes().applied(d["dim"], parts), "depth": 4, "vocab_size": 32000}
        return {k: v for k, v in d.items() if k != "dim" and default.get(k) != v}

    @property
    def sizes(self) -> BlockSizes:
        """The BlockSizes that builds this config's model."""
        return BlockSizes(**{k: v for k, v in self.block_config if k in BlockSizes.model_fields})


def iter_configs(s: SweepSettings) -> Iterator[Config]:
    """The spec's order: for each shape, every model (so models compare line by line); a
    hyperparameter sweep repeats that for each point of its grid (a model the swept size does
    not apply to is measured once). Interleaved (and not --isolate), each shape holds every
    backend and dtype too, since they are timed together."""
    seen: set = set()
    if s.order == "interleaved" and not s.isolate:
        grid = ((backend, dtype, sizes, seq, batch) for sizes in s.size_grid() for seq in s.sequence_lengths
                for batch in s.batch_sizes for backend in s.backends for dtype in s.dtypes)
    else:
        grid = ((backend, dtype, sizes, seq, batch) for backend in s.backends for dtype in s.dtypes
                for sizes in s.size_grid() for seq in s.sequence_lengths for batch in s.batch_sizes)
    for backend, dtype, sizes, seq, batch in grid:
        for name in s.models:
            cfg = Config(name, backend, dtype, seq, batch, s.block_config(name, sizes))
            if cfg not in seen:
                seen.add(cfg)
                yield cfg


# ---------------------------------------------------------------- model sizes: preset, file, flags
MODEL_FILE_KEYS = ("preset", "dim", "depth", "vocab_size", *BlockSizes.model_fields)


def read_model_config(path) -> dict:
    """A --model-config TOML file: top-level keys of MODEL_FILE_KEYS (a size may be a list of
    values: one more grid axis). Its values are checked where every size is (BlockSizes)."""
    import sys
    from pathlib import Path
    if sys.version_info >= (3, 11):
        import tomllib
    else:   # pragma: no cover
        import tomli as tomllib
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(f"--model-config: cannot read {str(p)!r} ({e.strerror or e})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"--model-config: {str(p)!r} is not valid TOML ({e})") from None
    for k in data:
        if k not in MODEL_FILE_KEYS:
            raise UsageError(f"--model-config: {str(p)!r}: key {k!r} is not one of: {', '.join(MODEL_FILE_KEYS)}")
    return data


def model_sizes(preset: Optional[str] = None, model_config=None, *, dim=None, depth=None, vocab_size=None,
                sizes: Optional[dict] = None) -> dict:
    """dim, depth, vocab_size and sizes for SweepSettings from a preset (presets.PRESETS), a
    --model-config file (a path, or its dict) and explicit values, later ones winning: the
    one place the CLI and the API merge them. A value not set anywhere is left out (the
    settings' default)."""
    from ..presets import PRESETS
    if not (model_config is None or isinstance(model_config, (str, bytes, Mapping)) or hasattr(model_config, "__fspath__")):
        raise UsageError(f"model_config: {model_config!r} is not a TOML file's path or a dict of its keys")
    file = read_model_config(model_config) if isinstance(model_config, (str, bytes)) or hasattr(
        model_config, "__fspath__") else dict(model_config or {})
    for k in file:
        if k not in MODEL_FILE_KEYS:
            raise UsageError(f"model_config: key {k!r} is not one of: {', '.join(MODEL_FILE_KEYS)}")
    name = preset if preset is not None else file.get("preset")
    out: dict = {}
    merged: dict = {}
    if name is not None:
        if not isinstance(name, str) or name not in PRESETS:
            raise UsageError(f"--preset: {name!r} is not one of: {', '.join(PRESETS)}")
        p = PRESETS[name]
        out.update(dim=p.dim, depth=p.depth, vocab_size=p.vocab_size)
        merged.update({k: [v] for k, v in p.sizes.items()})
    out.update({k: file[k] for k in ("dim", "depth", "vocab_size") if k in file})
    merged.update({k: (v if isinstance(v, list) else [v]) for k, v in file.items() if k in BlockSizes.model_fields})
    out.update({k: v for k, v in dict(dim=dim, depth=depth, vocab_size=vocab_size).items() if v is not None})
    for k, v in (sizes or {}).items():
        if k not in BlockSizes.model_fields:
            raise UsageError(f"model size {k!r} is not one of: {', '.join(BlockSizes.model_fields)}")
        if v is not None:
            merged[k] = list(v) if isinstance(v, (list, tuple)) else [v]
    if merged:
        out["sizes"] = merged
    return out
