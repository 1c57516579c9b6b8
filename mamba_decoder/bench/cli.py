"""The command line: `mamba-bench run | report | compare` (and the spec's run_benchmark.py flags).

Every bad input ends as one line `error: ...` on stderr naming the value and what is accepted,
exit code 2; an unexpected failure prints one line and exits 1; Ctrl-C exits 130 keeping every
finished record; `compare` exits 3 when the new run is significantly slower than the base and 5
when the two runs share no config; a run whose files cannot be written mid-run (a full disk)
exits 4 with one line, every whole record kept.
"""
from __future__ import annotations

import argparse
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Optional, Sequence

from pydantic import ValidationError

from ..config import BACKENDS, DEFAULT_BACKEND, SIZE_PARTS
from ..presets import PRESETS
from . import host_alloc
from .execute import (EXIT_INTERRUPTED, EXIT_NO_COMMON, EXIT_OK, EXIT_REGRESSION, EXIT_UNEXPECTED,  # noqa: F401
                      EXIT_USAGE, EXIT_WRITE,
                      Output, execute, resolve_device)
from .launchers import Local
from .names import LM_MODELS, models_for
from .registry import MODELS
from .report import IGNORABLE, NoCommonConfigs, compare_runs, write_report
from .results import OutputWriteError, RecordFileError, UsageError, tool_version
from .settings import CACHE_KINDS, DTYPES, LEVELS, MODES, ORDERS, SweepSettings, model_sizes, one_line
from .torchrun import Torchrun, dist_env

# --quick: a useful look in about a minute on a 2-core CPU (reference backend).
QUICK = dict(dim=64, seq_lens=[32, 64, 128], batch_sizes=[1, 2], warmup=1, runs=5)
SPEC_DEFAULTS = dict(dim=512, seq_lens=[128, 256, 512, 1024, 2048], batch_sizes=[1, 2, 4, 8],
                     warmup=5, runs=20)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block, no SystemExit traceback
        raise UsageError(message)


_DECIMAL = re.compile(r"[0-9]+")                                  # int() also takes 3_2, ' 32', '٣٢'
_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|[+-]?(inf|infinity|nan)", re.I)


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        if not _DECIMAL.fullmatch(text):
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= {lo} (digits 0-9 only)")
        v = int(text, 10)
        if v < lo:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= {lo}")
        return v
    parse.__name__ = f"integer >= {lo}"
    return parse


def _seconds(text: str) -> float:
    try:
        if not _NUMBER.fullmatch(text):
            raise ValueError(text)
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0") from None
    if not (v >= 0) or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number of seconds >= 0")
    return v


def _positive_seconds(text: str) -> float:
    try:
        v = _seconds(text)
    except argparse.ArgumentTypeError:
        v = 0.0
    if v == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number of seconds > 0")
    return v


def add_run_arguments(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--order", default="interleaved", choices=ORDERS,
                   help="interleaved: at each shape time every model in rounds, round robin, so a "
                        "slow period hits all alike; blocked: each config's runs in one block "
                        "(default: interleaved)")
    p.add_argument("--host-allocator", default=host_alloc.DEFAULT, choices=host_alloc.CHOICES,
                   help="CPU runs: retain keeps freed host memory for reuse (glibc), so a forward's "
                        "large buffers do not fault in afresh on every call; system keeps the C "
                        "library's defaults (default: retain)")
    p.add_argument("--processes", type=pos, default=1, metavar="N",
                   help="measure the sweep N times in fresh worker processes, one after another, each "
                        "config's timed runs split between them; ratios' intervals then resample the "
                        "processes too, so they cover where a rerun on this machine lands (asv's "
                        "approach; default: 1, this process)")
    p.add_argument("--isolate", action="store_true",
                   help="measure each config in its own subprocess (a crash costs one row)")
    p.add_argument("--force", action="store_true",
                   help="run configs (and --depth) whose estimated peak memory exceeds what is available "
                        "(default: record them as oom without running them)")
    p.add_argument("--config-timeout", type=_positive_seconds, default=None, metavar="SECONDS",
                   help="with --isolate: a config whose worker runs longer is killed and recorded as "
                        "timeout; with --processes: the same per config of the shape a worker is on "
                        "(default: 1800)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--no-plots", action="store_true",
                   help="skip the plots (draw them later with `mamba-bench report`)")
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
    p.add_argument("--depth", type=pos, default=None,
                   help="model level: Mamba blocks per model (default: the preset's, else 4)")
    p.add_argument("--vocab-size", type=_int_at_least(2), default=None,
                   help="model level: vocabulary size (default: the preset's, else 32000)")
    g = p.add_argument_group("model sizes", "each takes one or more values (several: one more axis of "
                             "the grid); explicit flags win over --model-config, which wins over --preset")
    for part, names in SIZE_PARTS.items():
        for name in names:
            g.add_argument("--" + name.replace("_", "-"), dest="size_" + name, nargs="+", default=None,
                           metavar="N", type=nonneg if name == "q_lora_rank" else pos,
                           help=f"{part}: {SIZE_HELP[name]}")
    g.add_argument("--model-config", default=None, metavar="FILE",
                   help="a TOML file of any of: preset, dim, depth, vocab_size and the sizes above "
                        "(underscores: d_state = 32, n_experts = [8, 64])")
    g.add_argument("--preset", default=None, metavar="NAME",
                   help=f"a published architecture's block shape: {', '.join(PRESETS)} "
                        "(`mamba-bench presets` lists their sources)")


SIZE_HELP = dict(
    d_state="SSM state size (default 16)", expand="inner width / dim (default 2)",
    d_conv="causal conv width (default 4)", dt_rank="dt projection rank (default ceil(dim/16))",
    n_experts="routed experts (default 6)", n_activated="experts per token, top-k (default 2)",
    expert_dim="routed expert SwiGLU width (default 2*dim)",
    shared_expert_dim="the shared expert's width (default: --expert-dim)",
    heads="MLA heads (default 16)", q_lora_rank="query LoRA rank, 0: none (default 0)",
    kv_lora_rank="KV latent rank (default 512)", qk_nope_dim="per-head q/k width without RoPE (default 128)",
    qk_rope_dim="per-head RoPE width, even (default 64)", v_head_dim="per-head value width (default 128)")


def settings_from_args(args: argparse.Namespace, device: str) -> SweepSettings:
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
    m = model_sizes(args.preset, args.model_config, dim=args.dim, depth=args.depth, vocab_size=args.vocab_size,
                    sizes={k[len("size_"):]: v for k, v in vars(args).items() if k.startswith("size_")})
    dim = m.get("dim", pick("dim"))
    try:
        s = SweepSettings(dim=dim, sequence_lengths=list(dict.fromkeys(pick("seq_lens"))),
                          batch_sizes=list(dict.fromkeys(pick("batch_sizes"))),
                          models=list(dict.fromkeys(models)), backends=list(dict.fromkeys(args.backend)),
                          dtypes=list(dict.fromkeys(args.dtype)), device=device, warmup=pick("warmup"),
                          runs=pick("runs"), min_time_s=args.min_time, threads=args.threads,
                          seed=args.seed, isolate=args.isolate, order=args.order,
                          host_allocator=args.host_allocator, processes=args.processes,
                          config_timeout_s=args.config_timeout, force=args.force, mode=args.mode, level=args.level,
                          compile=args.compile, cuda_graphs=args.cuda_graphs, cache_kind=args.cache_kind,
                          optimizer_step=args.optimizer_step, depth=m.get("depth", 4),
                          vocab_size=m.get("vocab_size", 32000), sizes=m.get("sizes", {}))
    except ValidationError as e:
        raise UsageError(one_line(e)) from None
    return s


def run_command(args: argparse.Namespace) -> int:
    """Flags -> settings -> execute, inline, one subprocess per config (--isolate) or under torchrun."""
    env = dist_env()
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        what = "--output-dir" if args.output_dir else "run directory"
        raise UsageError(f"{what}: {str(out)!r} exists and is not a directory")
    device = resolve_device(not args.no_cuda)
    torchrun = env is not None and env.world_size > 1   # shard the sweep over ranks, rank 0 merges
    s = settings_from_args(args, Torchrun.rank_device(device, env) if torchrun else device)
    o = Output(dir=out, resume=args.resume, overwrite=args.overwrite, plots=not args.no_plots,
               progress=not args.no_progress,
               cuda_hint="pass --no-cuda" if device == "cpu" and not args.no_cuda else None,
               command=getattr(args, "argv", None))
    return execute(s, Torchrun(s, env) if torchrun else Local(), o).code


def report_command(args: argparse.Namespace) -> int:
    run_dir, out = Path(args.run_dir), Path(args.output_dir or args.run_dir)
    if out.exists() and not out.is_dir():
        what = "--output-dir" if args.output_dir else "run directory"
        raise UsageError(f"{what}: {str(out)!r} exists and is not a directory")
    paths = write_report(run_dir, out)
    print("wrote " + ", ".join(str(p) for p in paths))
    return EXIT_OK


def compare_command(args: argparse.Namespace) -> int:
    if not (0 <= args.threshold < 10):
        raise UsageError(f"--threshold: {args.threshold!r} is not a fraction in [0, 10) (e.g. 0.05 = 5%)")
    if not (0 < args.alpha < 1):
        raise UsageError(f"--alpha: {args.alpha!r} is not a probability in (0, 1)")
    try:
        text, regressed = compare_runs(Path(args.base_dir), Path(args.new_dir), threshold=args.threshold,
                                       alpha=args.alpha, ignore=args.ignore, fmt=args.format)
    except NoCommonConfigs as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NO_COMMON
    except ValueError as e:
        if isinstance(e, RecordFileError):
            raise
        raise UsageError(str(e)) from None
    print(text)
    return EXIT_REGRESSION if regressed else EXIT_OK


def presets_command(args: argparse.Namespace) -> int:
    """The presets with their shapes and the published configs they come from."""
    for p in PRESETS.values():
        sizes = ", ".join(f"{k}={v}" for k, v in p.sizes.items())
        print(f"{p.name}: dim={p.dim}, {sizes}; model level: depth={p.depth}, vocab_size={p.vocab_size}")
        print(f"    source: {p.source}")
    return EXIT_OK


def _float(text: str) -> float:
    try:
        if not _NUMBER.fullmatch(text):
            raise ValueError(text)
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mamba-bench", description="Benchmark MambaDecoderBlock, MLABlock and Regular Mamba.")
    p.add_argument("--version", action="version", version=f"mamba-bench {tool_version()}")
    sub = p.add_subparsers(dest="command", metavar="{run,report,compare,presets}")
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
    cmp_.add_argument("--ignore", nargs="+", default=[], choices=IGNORABLE,
                      help="pair configs without these fields, e.g. --ignore backend to compare a "
                           "fast run with a reference run (automatic when the runs differ in one "
                           "of them uniformly)")
    cmp_.add_argument("--format", default="text", choices=("text", "md", "json"),
                      help="output: text (default), md (Markdown) or json")
    sub.add_parser("presets", help="list the presets of published architectures and their sources")
    return p


def _interrupt_once():
    """Ctrl-C raises KeyboardInterrupt once; later ones are ignored, so a second Ctrl-C a few ms
    later cannot break the wind-down (records, CSV) or an atexit callback with a traceback.
    Returns (handler, previous), or None off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt
    return handler, signal.signal(signal.SIGINT, handler)


def _guarded(fn, argv) -> int:
    """Run fn(argv) mapping every outcome to an exit code and at most one stderr line."""
    once = _interrupt_once()
    try:
        return _outcome(fn, argv)
    finally:   # not interrupted: the caller's handler back (an interrupted process stays deaf to more)
        if once is not None and signal.getsignal(signal.SIGINT) is once[0]:
            signal.signal(signal.SIGINT, once[1])


def _outcome(fn, argv) -> int:
    try:
        return fn(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RecordFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OutputWriteError as e:    # a full disk mid-run: whole records kept, --resume continues
        print(f"error: {e}", file=sys.stderr)
        return EXIT_WRITE
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
    args.argv = ["mamba-bench", *argv]
    commands = {"run": run_command, "report": report_command, "compare": compare_command,
                "presets": presets_command}
    if args.command is None:
        raise UsageError("choose a command: run, report, compare or presets (see mamba-bench --help)")
    return commands[args.command](args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`mamba-bench`: returns the exit code (0 ok, 1 unexpected, 2 bad input, 3 regression,
    4 output not writable mid-run (a full disk; whole records kept, --resume continues),
    5 compare: no config in common, 130 Ctrl-C)."""
    return _guarded(_main, list(sys.argv[1:] if argv is None else argv))


def run_main(argv: Optional[Sequence[str]] = None, prog: str = "run_benchmark.py") -> int:
    """The spec's entry points (run_benchmark.py, benchmark_suite.py): the run flags, no subcommand."""
    def go(a):
        p = _Parser(prog=prog, description="Comprehensive benchmarking suite (run).")
        add_run_arguments(p)
        p.add_argument("--version", action="version", version=f"{prog} (mamba-bench {tool_version()})")
        args = p.parse_args(a)
        args.argv = [prog, *a]
        return run_command(args)
    return _guarded(go, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
