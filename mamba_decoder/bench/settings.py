"""What a sweep measures: its settings (validated once, at the edge) and its configs.

A config is one (model, backend, dtype, sequence length, batch size) of the grid; with the
settings it makes one record, identified by `results.config_key`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from ..config import BACKENDS, DEFAULT_BACKEND
from .names import models_for
from .names import RecordKey
from .results import UsageError, config_key  # noqa: F401 (UsageError: settings' errors)

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                  "float16": torch.float16}
MODES = ("forward", "decode", "train")
LEVELS = ("block", "model")
CACHE_KINDS = ("latent", "full")


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

    def key(self, s: SweepSettings) -> RecordKey:
        return config_key(self, s)


def iter_configs(s: SweepSettings) -> Iterator[Config]:
    """The spec's order: for each shape, every model (so models compare line by line)."""
    for backend in s.backends:
        for dtype in s.dtypes:
            for seq in s.sequence_lengths:
                for batch in s.batch_sizes:
                    for name in s.models:
                        yield Config(name, backend, dtype, seq, batch)
