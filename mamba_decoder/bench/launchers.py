"""How the configs of a sweep are measured on one machine: inline (in this process) or one
subprocess per config (`--isolate`: a segfault or a poisoned CUDA context costs one row).
The torchrun launcher, which shards them over processes, is `torchrun.Torchrun`."""
from __future__ import annotations

import shutil
import signal
import sys
import threading
from typing import Callable, Optional

import torch

from .execute import EXIT_INTERRUPTED, Outcome, Output, Plan
from .results import (JSONL_NAME, PROCESSES_DIR, BenchmarkResult, RecordWriter, check_resume, environment,
                      prepare_run_dir, read_jsonl, recorded_ok)
from .runner import run_sweep
from .settings import SweepSettings


class Local:
    """Inline, or with `SweepSettings.isolate` a worker subprocess per config (runner.measure_each)."""

    main = True

    def plan(self, s: SweepSettings, o: Output) -> Plan:
        if o.dir is None:
            return Plan()
        prepare_run_dir(o.dir, resume=o.resume, overwrite=o.overwrite)
        if o.resume:
            check_resume(o.dir, s.model_dump(mode="json"), environment(s.device, torch.get_num_threads()))
        done = recorded_ok(o.dir) if o.resume else {}
        if o.resume and (o.dir / JSONL_NAME).is_file():
            print(f"resume: {len(done)} configs already recorded ok in {o.dir / JSONL_NAME}", file=sys.stderr)
        staged = sorted((o.dir / PROCESSES_DIR).glob("process-*.jsonl")) if o.resume and s.processes > 1 else []
        if staged:
            counts = ", ".join(f"{p.stem} {len(read_jsonl(p))}" for p in staged)
            print(f"resume: records staged by the interrupted run's processes ({counts}) are reused",
                  file=sys.stderr)
        return Plan(done=done)

    def run(self, s: SweepSettings, o: Output, plan: Plan,
            show: Optional[Callable[[BenchmarkResult], None]]) -> Outcome:
        writer = RecordWriter(o.dir / JSONL_NAME, "a") if o.dir is not None else None
        # --processes: each process's records kept here until merged (what an interrupt leaves)
        staging = o.dir / PROCESSES_DIR if o.dir is not None and s.processes > 1 else None
        previous = _sigterm_as_interrupt()
        try:
            results = run_sweep(s, writer=writer, on_record=show, done=plan.done, progress=o.progress,
                                staging=staging)
            if staging is not None:     # every config merged into results.jsonl
                shutil.rmtree(staging, ignore_errors=True)
            return Outcome(results)
        except KeyboardInterrupt:
            return Outcome([], EXIT_INTERRUPTED, interrupted=True)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            if writer is not None:
                writer.close()


def _sigterm_as_interrupt():
    """`kill` (SIGTERM) ends a run like Ctrl-C: finished records kept, CSV rewritten, exit 130."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt
    return signal.signal(signal.SIGTERM, handler)
