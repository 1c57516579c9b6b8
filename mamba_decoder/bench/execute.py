"""The one path a run takes, whoever starts it (the CLI, the API, torchrun):

    settings -> execute(settings, launcher, output):
        launcher.plan     the output directory checked and prepared, what --resume skips
        banner, environment.json
        launcher.run      every config measured -> records (JSONL as they finish)
        results.csv, summary table, plots, the closing line

The launcher decides how configs are measured: in this process, one subprocess each
(`launchers.Local`), or sharded over torchrun's ranks (`torchrun.Torchrun`). Everything else a run
does is here, once.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol

import torch

from . import host_alloc, report
from .plots import plot_benchmark_results
from .results import (CSV_NAME, ENV_NAME, JSONL_NAME, PROCESSES_DIR, BenchmarkResult, OutputWriteError,
                      environment, lock_dir, note_written, read_environment, resumed_environment,
                      rewrite_csv, write_environment)
from .runner import apply_process_settings, banner_kernels, check_depth_fits
from .settings import SweepSettings

EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE, EXIT_REGRESSION, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_WRITE = 4   # the run's files could not be written (a full disk): whole records kept, --resume continues
EXIT_NO_COMMON = 5   # compare: the two runs share no config


@dataclass
class Output:
    """Where a run's records go and what it shows."""

    dir: Optional[Path] = None          # None: records are returned only (the API's default)
    resume: bool = False                # continue `dir`, skipping configs recorded ok
    overwrite: bool = False             # replace the records and plots already in `dir`
    verbose: bool = True                # banner and one line per config
    report: bool = True                 # summary table, plots (unless `plots` is off), closing line
    plots: bool = True
    progress: bool = True               # progress bar on stderr
    cuda_hint: Optional[str] = None     # CUDA was asked for and is missing: the notice names this
    command: Optional[list[str]] = None  # the command line saved with the run (default: sys.argv)


@dataclass
class Plan:
    """What the launcher's `plan` decided: the records to reuse, extra banner lines, or a stop."""

    done: dict = field(default_factory=dict)   # key -> record already ok (shown, not measured)
    banner: list[str] = field(default_factory=list)
    stop: Optional[int] = None                 # a rank that only learns the run cannot start


@dataclass
class Outcome:
    results: list[BenchmarkResult]
    code: int = EXIT_OK
    interrupted: bool = False          # stopped early: no summary (the records so far are kept)
    closing: str = ""                  # appended to the closing line (e.g. where rank files are)
    error: Optional[str] = None        # one stderr line after the closing line


class Launcher(Protocol):
    main: bool    # the process that prepares the output directory, merges and reports

    def plan(self, s: SweepSettings, o: Output) -> Plan: ...

    def run(self, s: SweepSettings, o: Output, plan: Plan,
            show: Optional[Callable[[BenchmarkResult], None]]) -> Outcome: ...


def resolve_device(use_cuda: bool) -> str:
    """'cuda' when asked for and present, else 'cpu' (execute prints the notice, after validation)."""
    return "cuda" if use_cuda and torch.cuda.is_available() else "cpu"


def cuda_notice(silence_hint: str = "pass --no-cuda") -> None:
    print(f"notice: CUDA is not available; running on CPU ({silence_hint} to silence this)",
          file=sys.stderr)


def execute(s: SweepSettings, launcher: Launcher, o: Output) -> Outcome:
    """Run the sweep `s` with `launcher`; returns its records (sweep order) and exit code. The
    main process holds the output directory's lock throughout (a second run there is refused).
    A file of the run that cannot be written (a full disk) raises OutputWriteError after every
    whole record is in results.jsonl (the CLI: one `error:` line, exit code EXIT_WRITE; the run
    continues with --resume once there is room)."""
    lock = lock_dir(o.dir) if launcher.main and o.dir is not None else None
    try:
        return _execute(s, launcher, o)
    except OutputWriteError as e:
        if o.dir is not None:
            e.kept = f"every whole record is kept in {o.dir / JSONL_NAME} (make room, then continue with --resume)"
        raise
    finally:
        if lock is not None:
            lock.release()


def _execute(s: SweepSettings, launcher: Launcher, o: Output) -> Outcome:
    apply_process_settings(s)
    check_depth_fits(s)     # before a 10**9-layer model is built even on the meta device
    plan = launcher.plan(s, o)
    if plan.stop is not None:
        return Outcome([], plan.stop)
    if launcher.main:
        if o.cuda_hint is not None:
            cuda_notice(o.cuda_hint)
        if o.verbose:
            width = report.console_width()
            print(report.banner(s.device, s.dim, s.sequence_lengths, s.batch_sizes, backends=s.backends,
                                dtypes=s.dtypes, threads=torch.get_num_threads(),
                                kernels=banner_kernels(s), width=width,
                                host_allocator=host_alloc.describe() if s.device.startswith("cpu") else None),
                  flush=True)
            for line in plan.banner:
                print(report.fit_line(line, width, sep=" "), flush=True)
            if s.processes > 1:
                split = "/".join(str(s.process_share(p).runs) for p in range(s.processes))
                print(report.fit_line(f"Processes: {s.processes}, one after another (each config's {s.runs} timed "
                                      f"runs split {split}; intervals resample the processes, then rounds)",
                                      width, sep=" "), flush=True)
            if s.sizes:   # --preset / --model-config / the size flags: what the blocks were built with
                print(report.fit_line("Block sizes: " + ", ".join(f"{k}={v[0] if len(v) == 1 else v}"
                                                                  for k, v in s.sizes.items())
                                      + " (the rest at the suite's defaults; each record's block_config has them all)",
                                      width, sep=" "), flush=True)
        if o.dir is not None:
            env = dict(environment(s.device, torch.get_num_threads()),
                       command_line=list(o.command if o.command is not None else sys.argv),
                       seed=s.seed, settings=s.model_dump(mode="json"))
            if o.resume:
                env = resumed_environment(env, read_environment(o.dir / ENV_NAME))
            write_environment(env, o.dir / ENV_NAME)
    show = report.console_printer(multi=len(s.backends) * len(s.dtypes) > 1,
                                  sizes=s.swept_sizes()) if o.verbose else None
    outcome = launcher.run(s, o, plan, show)
    if not launcher.main:
        return outcome
    if o.dir is not None:
        rewrite_csv(o.dir)    # a full disk: OutputWriteError, the old CSV (or none) stays, no .tmp left
    if outcome.interrupted:
        if o.dir is not None:
            staged = (f"; each process's finished records in {o.dir / PROCESSES_DIR}"
                      if s.processes > 1 and (o.dir / PROCESSES_DIR).is_dir() else "")
            print(f"interrupted: every finished record is kept in {o.dir / JSONL_NAME}{staged} "
                  f"(continue with --resume)", file=sys.stderr)
        return outcome
    if o.report:
        report.print_summary_table(outcome.results)
        for line in report.noise_warnings(outcome.results, read_environment(o.dir / ENV_NAME)
                                          if o.dir is not None else None):
            print(report.wrap80(line), file=sys.stderr)
        paths = []
        if o.plots and o.dir is not None:
            try:
                paths = plot_benchmark_results(outcome.results, o.dir, env=read_environment(o.dir / ENV_NAME))
                note_written(o.dir, paths)
            except OSError as e:
                raise OutputWriteError(getattr(e, "filename", None) or o.dir, e) from None
        if o.dir is not None:
            print("\n" + report.fit_line(f"records: {o.dir / JSONL_NAME}, {o.dir / CSV_NAME}; environment: "
                                         f"{o.dir / ENV_NAME}; {outcome.closing}{len(paths)} plots in {o.dir}",
                                         report.console_width(), sep="; "))
    if outcome.error:
        print(outcome.error, file=sys.stderr)
    return outcome
