"""`python -m mamba_decoder.bench.distributed run ...`: the CLI's `run`, for torchrun.

    torchrun --nproc-per-node 8 -m mamba_decoder.bench.distributed run --output-dir out ...

An entry point only (the CLI's `run` does the same under torchrun); the launcher is torchrun.py.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from .cli import _guarded, build_parser, run_command
from .results import UsageError


def main(argv: Optional[Sequence[str]] = None) -> int:
    def go(a):
        args = build_parser().parse_args(a)
        if args.command != "run":
            raise UsageError("only `run` is distributed (report and compare read a saved run: "
                             "use mamba-bench)")
        return run_command(args)
    return _guarded(go, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
