"""Comprehensive benchmarking suite: the spec's entry point and programmatic API.

    from benchmark_suite import run_scaling_benchmarks, plot_benchmark_results, print_summary_table
    results = run_scaling_benchmarks(dim=512, sequence_lengths=[128, 256], batch_sizes=[1, 2])
    print_summary_table(results)
    plot_benchmark_results(results, output_dir="my_results")

The work is done by `mamba_decoder.bench`; this file keeps the spec's names.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

from mamba_decoder.bench.api import run_scaling_benchmarks
from mamba_decoder.bench.cli import run_main
from mamba_decoder.bench.plots import plot_benchmark_results
from mamba_decoder.bench.report import print_summary_table
from mamba_decoder.bench.results import BenchmarkResult

__all__ = ["run_scaling_benchmarks", "print_summary_table", "plot_benchmark_results",
           "BenchmarkResult", "main"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(argv, prog=Path(__file__).name)


if __name__ == "__main__":
    sys.exit(main())
