"""The spec's programmatic API: `run_scaling_benchmarks` (re-exported by benchmark_suite.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch
from pydantic import ValidationError

from ..config import DEFAULT_BACKEND
from .execute import Output, execute, resolve_device
from .launchers import Local
from .names import BLOCK_MODELS
from .results import BenchmarkResult, UsageError
from .settings import SweepSettings, model_sizes, one_line

Size = Union[int, Sequence[int], None]   # one value, or several (one more axis of the grid)


def run_scaling_benchmarks(dim: int = 512, sequence_lengths: Optional[Sequence[int]] = None,
                           batch_sizes: Optional[Sequence[int]] = None, use_cuda: bool = True, *,
                           models: Optional[Sequence[str]] = None,
                           backend: str | Sequence[str] = DEFAULT_BACKEND,
                           dtype: str | torch.dtype | Sequence[str | torch.dtype] = "float32", warmup: int = 5, runs: int = 20,
                           min_time: float = 0.0, threads: Optional[int] = None, seed: int = 0,
                           isolate: bool = False, config_timeout: Optional[float] = None,
                           force: bool = False, order: str = "interleaved", host_allocator: str = "retain", processes: int = 1,
                           output_dir: Optional[str | Path] = None,
                           resume: bool = False, overwrite: bool = False, verbose: bool = True,
                           progress: bool = True, preset: Optional[str] = None,
                           model_config: Union[str, Path, Mapping, None] = None,
                           d_state: Size = None, expand: Size = None, d_conv: Size = None, dt_rank: Size = None,
                           n_experts: Size = None, n_activated: Size = None, expert_dim: Size = None,
                           shared_expert_dim: Size = None, heads: Size = None, q_lora_rank: Size = None,
                           kv_lora_rank: Size = None, qk_nope_dim: Size = None, qk_rope_dim: Size = None,
                           v_head_dim: Size = None) -> list[BenchmarkResult]:
    """Measure every model at every (sequence length, batch size); one record per config.

    Prints the banner and one line per config (the spec's format) unless `verbose=False`.
    `order="interleaved"` times the models of each shape in rounds, round robin; "blocked" one
    config after another.
    `use_cuda=True` without CUDA runs on the CPU with one notice on stderr. With `output_dir`,
    records go to results.jsonl (as they finish), results.csv and environment.json there; a
    directory that holds files needs `resume=True` (skip configs already recorded ok) or
    `overwrite=True`, as on the command line. Bad arguments raise ValueError; Ctrl-C raises
    KeyboardInterrupt once every finished record is written.

    The block hyperparameters (d_state ... v_head_dim, as the CLI's flags) take one value or
    several (one more axis of the grid); `preset` (presets.PRESETS) and `model_config` (a TOML
    file's path, or its keys as a dict) set several at once, explicit keywords winning. A preset
    sets the width unless `dim` is given explicitly (not 512).
    """
    for name, flag in (("use_cuda", use_cuda), ("resume", resume), ("overwrite", overwrite),
                       ("verbose", verbose), ("progress", progress)):
        if not isinstance(flag, bool):   # 'no' is truthy: never read a string as a yes
            raise UsageError(f"{name}: {flag!r} is not True or False")
    device = resolve_device(use_cuda)
    explicit = dict(d_state=d_state, expand=expand, d_conv=d_conv, dt_rank=dt_rank, n_experts=n_experts,
                    n_activated=n_activated, expert_dim=expert_dim, shared_expert_dim=shared_expert_dim,
                    heads=heads, q_lora_rank=q_lora_rank, kv_lora_rank=kv_lora_rank, qk_nope_dim=qk_nope_dim,
                    qk_rope_dim=qk_rope_dim, v_head_dim=v_head_dim)
    m = model_sizes(preset, model_config, dim=None if dim == 512 else dim, sizes=explicit)
    try:
        s = SweepSettings(   # the settings' validators check every value (one ValueError naming it)
            dim=m.get("dim", dim), sizes=m.get("sizes", {}),
            sequence_lengths=sequence_lengths if sequence_lengths is not None else [128, 256, 512, 1024, 2048],
            batch_sizes=batch_sizes if batch_sizes is not None else [1, 2, 4, 8],
            models=models if models is not None else list(BLOCK_MODELS),
            backends=backend, dtypes=dtype,
            device=device, warmup=warmup, runs=runs, min_time_s=min_time, threads=threads, seed=seed,
            isolate=isolate, config_timeout_s=config_timeout, force=force, order=order,
            host_allocator=host_allocator, processes=processes)
    except ValidationError as e:
        raise UsageError(one_line(e)) from None
    o = Output(dir=None if output_dir is None else Path(output_dir), resume=resume, overwrite=overwrite,
               verbose=verbose, report=False, plots=False, progress=progress,
               cuda_hint="pass use_cuda=False" if use_cuda and device == "cpu" else None)
    outcome = execute(s, Local(), o)
    if outcome.interrupted:
        raise KeyboardInterrupt
    return outcome.results
