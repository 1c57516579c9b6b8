"""The spec's programmatic API: `run_scaling_benchmarks` (re-exported by benchmark_suite.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from ..config import DEFAULT_BACKEND
from .registry import MODELS
from .results import (ENV_NAME, JSONL_NAME, BenchmarkResult, RecordWriter, environment, recorded_ok,
                      rewrite_csv, write_environment)


def run_scaling_benchmarks(dim: int = 512, sequence_lengths: Optional[Sequence[int]] = None,
                           batch_sizes: Optional[Sequence[int]] = None, use_cuda: bool = True, *,
                           models: Optional[Sequence[str]] = None,
                           backend: str | Sequence[str] = DEFAULT_BACKEND,
                           dtype: str | Sequence[str] = "float32", warmup: int = 5, runs: int = 20,
                           min_time: float = 0.0, threads: Optional[int] = None, seed: int = 0,
                           isolate: bool = False, output_dir: Optional[str | Path] = None,
                           resume: bool = False, verbose: bool = True,
                           progress: bool = True) -> list[BenchmarkResult]:
    """Measure every model at every (sequence length, batch size); one record per config.

    Prints the banner and one line per config (the spec's format) unless `verbose=False`.
    `use_cuda=True` without CUDA runs on the CPU with one notice on stderr. With `output_dir`,
    records go to results.jsonl (as they finish), results.csv and environment.json there;
    `resume=True` then skips configs already recorded ok. Bad arguments raise ValueError.
    """
    import torch

    from . import report
    from .cli import resolve_device
    from .runner import SweepSettings, banner_kernels, run_sweep

    s = SweepSettings(
        dim=dim,
        sequence_lengths=list(sequence_lengths if sequence_lengths is not None else [128, 256, 512, 1024, 2048]),
        batch_sizes=list(batch_sizes if batch_sizes is not None else [1, 2, 4, 8]),
        models=list(models if models is not None else MODELS),
        backends=[backend] if isinstance(backend, str) else list(backend),
        dtypes=[dtype] if isinstance(dtype, str) else list(dtype),
        device="cpu", warmup=warmup, runs=runs, min_time_s=min_time, threads=threads, seed=seed,
        isolate=isolate).validate()
    s.device = resolve_device(use_cuda, silence_hint="pass use_cuda=False")
    if s.threads is not None:
        torch.set_num_threads(s.threads)
    if verbose:
        print(report.banner(s.device, s.dim, s.sequence_lengths, s.batch_sizes, backends=s.backends,
                            dtypes=s.dtypes, threads=torch.get_num_threads(), kernels=banner_kernels(s)))
    writer, done = None, {}
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        if resume:
            done = recorded_ok(out)
        write_environment(environment(s.device, torch.get_num_threads()), out / ENV_NAME)
        writer = RecordWriter(out / JSONL_NAME, "a" if resume else "w")

    show = report.console_printer(multi=len(s.backends) * len(s.dtypes) > 1) if verbose else None
    try:
        return run_sweep(s, writer=writer, on_record=show, done=done, progress=progress)
    finally:
        if writer is not None:
            writer.close()
            rewrite_csv(output_dir)
