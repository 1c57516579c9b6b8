"""Convenience entry point of the benchmarking suite (same flags as benchmark_suite.py).

    python run_benchmark.py --dim 1024 --seq-lens 256 512 1024 2048 --batch-sizes 1 2 4 8
    python run_benchmark.py --no-cuda --quick
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

from mamba_decoder.bench.cli import run_main


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(argv, prog=Path(__file__).name)


if __name__ == "__main__":
    sys.exit(main())
