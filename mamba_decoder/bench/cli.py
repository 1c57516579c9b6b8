"""The command line: `mamba-bench run | report | compare` (and the spec's run_benchmark.py flags).

Every bad input ends as one line `error: ...` on stderr naming the value and what is accepted,
exit code 2; an unexpected failure prints one line and exits 1; Ctrl-C exits 130 keeping every
finished record; `compare` exits 3 when the new run is significantly slower than the base.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE, EXIT_REGRESSION, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

# --quick: a useful look in about a minute on a 2-core CPU (reference backend).
QUICK = dict(dim=64, seq_lens=[32, 64, 128], batch_sizes=[1, 2], warmup=1, runs=5)
SPEC_DEFAULTS = dict(dim=512, seq_lens=[128, 256, 512, 1024, 2048], batch_sizes=[1, 2, 4, 8],
                     warmup=5, runs=20)
# Files a run writes; --overwrite removes exactly these (never anything else in the directory).
PLOT_GLOB = "*.png"


class UsageError(Exception):
    """Bad input from the user: printed as one `error:` line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block, no SystemExit traceback
        raise UsageError(message)


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            v = int(text, 10)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= {lo}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= {lo}")
        return v
    parse.__name__ = f"integer >= {lo}"
    return parse


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0") from None
    if not (v >= 0) or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number of seconds >= 0")
    return v


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    from ..config import BACKENDS, DEFAULT_BACKEND
    from .registry import LM_MODELS, MODELS
    from .runner import DTYPES

    pos, nonneg = _int_at_least(1), _int_at_least(0)
    p.add_argument("--dim", type=pos, default=None, help="model dimension (default: 512)")
    p.add_argument("--seq-lens", type=pos, nargs="+", default=None, metavar="L",
                   help="sequence lengths (default: 128 256 512 1024 2048)")
    p.add_argument("--batch-sizes", type=pos, nargs="+", default=None, metavar="B",
                   help="batch sizes (default: 1 2 4 8)")
    p.add_argument("--output-dir", default="benchmark_plots",
                   help="directory for records and plots (default: benchmark_plots)")
    p.add_argument("--no-cuda", action="store_true", help="disable CUDA (use CPU only)")
    p.add_argument("--dtype", nargs="+", default=["float32"], metavar="DTYPE",
                   help=f"one or more of {', '.join(DTYPES)} (default: float32)")
    p.add_argument("--backend", nargs="+", default=[DEFAULT_BACKEND], metavar="BACKEND",
                   help=f"one or more of {', '.join(BACKENDS)} (default: {DEFAULT_BACKEND})")
    p.add_argument("--models", nargs="+", default=None, metavar="MODEL",
                   help=f"subset of: {', '.join(map(repr, MODELS))} (with --level model: "
                        f"{', '.join(map(repr, LM_MODELS))}; case-insensitive; default: all)")
    p.add_argument("--warmup", type=nonneg, default=None, help="warmup runs per shape (default: 5)")
    p.add_argument("--runs", type=pos, default=None, help="timed runs per config (default: 20)")
    p.add_argument("--min-time", type=_seconds, default=0.0, metavar="SECONDS",
                   help="also repeat until the timed runs add up to SECONDS (default: 0)")
    p.add_argument("--threads", type=pos, default=None,
                   help="torch CPU threads (default: torch's current setting)")
    p.add_argument("--seed", type=nonneg, default=0, help="seed for weights and inputs (default: 0)")
    p.add_argument("--quick", action="store_true",
                   help="preset for a ~1 minute look on a small CPU: dim 64, seq 32 64 128, batch 1 2, "
                        "warmup 1, runs 5 (explicit flags win)")
    p.add_argument("--resume", action="store_true",
                   help="continue a run in --output-dir, skipping configs already recorded ok")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the records and plots already in --output-dir")
    p.add_argument("--isolate", action="store_true",
                   help="measure each config in its own subprocess (a crash costs one row)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--no-plots", action="store_true",
                   help="skip the plots (draw them later with `mamba-bench report`)")
    from .runner import CACHE_KINDS, LEVELS, MODES
    p.add_argument("--mode", default="forward", choices=MODES,
                   help="forward: one inference pass over (batch, seq); decode: prefill a context of "
                        "seq tokens, then time one token per call; train: forward + backward (default: forward)")
    p.add_argument("--level", default="block", choices=LEVELS,
                   help="block: the three blocks; model: language models on token ids (default: block)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model's forward")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="forward or decode: capture one forward / one decode step in a CUDA graph "
                        "and replay it (fast backend, CUDA)")
    p.add_argument("--cache-kind", default=None, choices=CACHE_KINDS,
                   help="decode: MLA's cache, latent (absorb; the default) or full per-head K/V (naive)")
    p.add_argument("--optimizer-step", action="store_true", help="train: add an AdamW step")
    p.add_argument("--depth", type=pos, default=4, help="model level: Mamba blocks per model (default: 4)")
    p.add_argument("--vocab-size", type=_int_at_least(2), default=32000,
                   help="model level: vocabulary size (default: 32000)")


def settings_from_args(args: argparse.Namespace, device: str):
    from .registry import models_for
    from .runner import SweepSettings

    known = models_for(args.level)
    preset = QUICK if args.quick else SPEC_DEFAULTS

    def pick(name: str):
        v = getattr(args, name)
        return preset[name] if v is None else v

    models = list(known)
    if args.models is not None:
        by_lower = {m.lower(): m for m in known}
        models = []
        for m in args.models:
            if m.lower() not in by_lower:
                raise UsageError(f"--models: {m!r} is not one of {', '.join(map(repr, known))}")
            models.append(by_lower[m.lower()])
    s = SweepSettings(dim=pick("dim"), sequence_lengths=list(dict.fromkeys(pick("seq_lens"))),
                      batch_sizes=list(dict.fromkeys(pick("batch_sizes"))),
                      models=list(dict.fromkeys(models)), backends=list(dict.fromkeys(args.backend)),
                      dtypes=list(dict.fromkeys(args.dtype)), device=device, warmup=pick("warmup"),
                      runs=pick("runs"), min_time_s=args.min_time, threads=args.threads,
                      seed=args.seed, isolate=args.isolate, mode=args.mode, level=args.level,
                      compile=args.compile, cuda_graphs=args.cuda_graphs, cache_kind=args.cache_kind,
                      optimizer_step=args.optimizer_step, depth=args.depth, vocab_size=args.vocab_size)
    if s.threads is not None and s.threads > (os.cpu_count() or 1):
        raise UsageError(f"--threads: {s.threads} is more than the {os.cpu_count()} CPUs here "
                         f"(accepted: 1..{os.cpu_count()})")
    try:
        s.validate()
    except ValueError as e:
        raise UsageError(str(e)) from None
    return s


def resolve_device(use_cuda: bool, notify: bool = True, silence_hint: str = "pass --no-cuda") -> str:
    """'cuda' when asked for and present; otherwise 'cpu', with one notice line if CUDA was asked for."""
    import torch

    if use_cuda and torch.cuda.is_available():
        return "cuda"
    if use_cuda and notify:
        cuda_notice(silence_hint)
    return "cpu"


def cuda_notice(silence_hint: str = "pass --no-cuda") -> None:
    print(f"notice: CUDA is not available; running on CPU ({silence_hint} to silence this)",
          file=sys.stderr)


def prepare_output_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    from .results import CSV_NAME, ENV_NAME, JSONL_NAME

    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other (choose one)")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir: {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (resume or overwrite):
            raise UsageError(f"--output-dir: {str(out)!r} is not empty "
                             "(pass --resume to continue it, --overwrite to replace its results)")
        if overwrite:
            from .distributed import PROVENANCE_NAME, RANKS_DIR

            for name in (JSONL_NAME, CSV_NAME, ENV_NAME, "report.md", "report.html", PROVENANCE_NAME):
                (out / name).unlink(missing_ok=True)
            shutil.rmtree(out / RANKS_DIR, ignore_errors=True)   # a torchrun run's per-rank files
            for png in out.glob(PLOT_GLOB):
                png.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--output-dir: cannot create {str(out)!r} ({e.strerror})") from None


def _sigterm_as_interrupt():
    """`kill` (SIGTERM) ends a run like Ctrl-C: finished records kept, CSV rewritten, exit 130."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt
    return signal.signal(signal.SIGTERM, handler)


def _restore_sigterm(previous) -> None:
    import signal

    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def run_command(args: argparse.Namespace) -> int:
    """Validate, sweep (records written as they finish), then summary table and plots."""
    from . import report
    from .results import (CSV_NAME, JSONL_NAME, ENV_NAME, RecordWriter, environment, read_environment,
                          recorded_ok, rewrite_csv, write_environment)
    from .runner import banner_kernels, run_sweep

    from .distributed import dist_env

    env = dist_env()
    if env is not None and env.world_size > 1:   # under torchrun: shard the sweep, rank 0 merges
        from .distributed import run_distributed

        return run_distributed(args)
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir: {str(out)!r} exists and is not a directory")
    device = resolve_device(not args.no_cuda, notify=False)
    s = settings_from_args(args, device)
    prepare_output_dir(out, resume=args.resume, overwrite=args.overwrite)
    if device == "cpu" and not args.no_cuda:   # after validation: bad input stays one line
        cuda_notice()
    done = recorded_ok(out) if args.resume else {}
    if args.resume and (out / JSONL_NAME).is_file():
        print(f"resume: {len(done)} configs already recorded ok in {out / JSONL_NAME}", file=sys.stderr)
    import torch

    if s.threads is not None:
        torch.set_num_threads(s.threads)
    print(report.banner(device, s.dim, s.sequence_lengths, s.batch_sizes, backends=s.backends,
                        dtypes=s.dtypes, threads=torch.get_num_threads(), kernels=banner_kernels(s)),
          flush=True)
    write_environment(environment(device, torch.get_num_threads()), out / ENV_NAME)
    show = report.console_printer(multi=len(s.backends) * len(s.dtypes) > 1)
    writer = RecordWriter(out / JSONL_NAME, "a")
    previous = _sigterm_as_interrupt()
    try:
        results = run_sweep(s, writer=writer, on_record=show, done=done, progress=not args.no_progress)
    except KeyboardInterrupt:
        writer.close()
        rewrite_csv(out)
        print(f"interrupted: every finished record is kept in {out / JSONL_NAME} "
              f"(continue with --resume)", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        _restore_sigterm(previous)
    writer.close()
    rewrite_csv(out)
    report.print_summary_table(results)
    paths = []
    if not args.no_plots:
        from .plots import plot_benchmark_results

        paths = plot_benchmark_results(results, out, env=read_environment(out / ENV_NAME))
    print(f"\nrecords: {out / JSONL_NAME}, {out / CSV_NAME}; environment: {out / ENV_NAME}; "
          f"{len(paths)} plots in {out}")
    return EXIT_OK


def report_command(args: argparse.Namespace) -> int:
    from .report import write_report

    run_dir, out = Path(args.run_dir), Path(args.output_dir or args.run_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir: {str(out)!r} exists and is not a directory")
    paths = write_report(run_dir, out)
    print("wrote " + ", ".join(str(p) for p in paths))
    return EXIT_OK


def compare_command(args: argparse.Namespace) -> int:
    from .report import compare_runs
    from .results import RecordFileError

    if not (0 <= args.threshold < 10):
        raise UsageError(f"--threshold: {args.threshold!r} is not a fraction in [0, 10) (e.g. 0.05 = 5%)")
    if not (0 < args.alpha < 1):
        raise UsageError(f"--alpha: {args.alpha!r} is not a probability in (0, 1)")
    try:
        text, regressed = compare_runs(Path(args.base_dir), Path(args.new_dir), threshold=args.threshold,
                                       alpha=args.alpha, ignore=args.ignore)
    except ValueError as e:
        if isinstance(e, RecordFileError):
            raise
        raise UsageError(str(e)) from None
    print(text)
    return EXIT_REGRESSION if regressed else EXIT_OK


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mamba-bench", description="Benchmark MambaDecoderBlock, MLABlock and Regular Mamba.")
    sub = p.add_subparsers(dest="command", metavar="{run,report,compare}")
    run = sub.add_parser("run", help="run a sweep (the spec's flags)")
    add_run_arguments(run)
    rep = sub.add_parser("report", help="redraw plots and write report.md/html from a saved run")
    rep.add_argument("run_dir", help="a run directory holding results.jsonl")
    rep.add_argument("--output-dir", default=None, help="where to write (default: RUN_DIR)")
    cmp_ = sub.add_parser("compare", help="compare two saved runs config by config")
    cmp_.add_argument("base_dir")
    cmp_.add_argument("new_dir")
    cmp_.add_argument("--threshold", type=_float, default=0.05,
                      help="slowdown (median ratio - 1) that counts as a regression (default: 0.05)")
    cmp_.add_argument("--alpha", type=_float, default=0.05,
                      help="significance level of the Mann-Whitney U test (default: 0.05)")
    cmp_.add_argument("--ignore", nargs="+", default=[], choices=["backend", "dtype", "variant"],
                      help="pair configs without these fields, e.g. --ignore backend to compare a "
                           "fast run with a reference run")
    return p


def _guarded(fn, argv) -> int:
    """Run fn(argv) mapping every outcome to an exit code and at most one stderr line."""
    from .results import RecordFileError

    try:
        return fn(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RecordFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as e:   # --help / --version
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 -- the promise: one line, never a traceback
        msg = " ".join(str(e).split())
        print(f"error: unexpected {type(e).__name__}: {msg}", file=sys.stderr)
        return EXIT_UNEXPECTED


def _main(argv: Optional[Sequence[str]]) -> int:
    args = build_parser().parse_args(argv)
    commands = {"run": run_command, "report": report_command, "compare": compare_command}
    if args.command is None:
        raise UsageError("choose a command: run, report or compare (see mamba-bench --help)")
    return commands[args.command](args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`mamba-bench`: returns the exit code (0 ok, 1 unexpected, 2 bad input, 3 regression, 130 Ctrl-C)."""
    return _guarded(_main, list(sys.argv[1:] if argv is None else argv))


def run_main(argv: Optional[Sequence[str]] = None, prog: str = "run_benchmark.py") -> int:
    """The spec's entry points (run_benchmark.py, benchmark_suite.py): the run flags, no subcommand."""
    def go(a):
        p = _Parser(prog=prog, description="Comprehensive benchmarking suite (run).")
        add_run_arguments(p)
        return run_command(p.parse_args(a))
    return _guarded(go, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
