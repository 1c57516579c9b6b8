"""Measure configs in this process and print their records: `python -m mamba_decoder.bench.worker`.

Reads {"settings": SweepSettings fields, "config": Config fields} as JSON on stdin and prints
`READY` once the settings are read (--processes: a worker that ends before it could not start),
then one line `RECORD {json}` on stdout. Used by `--isolate`, so that a crash costs one row only.
With "configs" (a list) instead of "config", measures them as a sweep does (interleaved by
shape) and prints a line per record as it finishes: one process of `--processes`.
"""
from __future__ import annotations

import json
import sys

from .runner import READY_LINE, RECORD_PREFIX, apply_process_settings, measure, measure_each
from .settings import Config, SweepSettings


def main() -> int:
    payload = json.loads(sys.stdin.read())
    s = SweepSettings(**payload["settings"])
    apply_process_settings(s)
    sys.stdout.write(READY_LINE)    # started: a crash from here on is a config's, not the worker's
    sys.stdout.flush()
    if "configs" in payload:
        records = measure_each([Config(**c) for c in payload["configs"]], s)
    else:
        records = [measure(Config(**payload["config"]), s)]
    for r in records:
        sys.stdout.write(RECORD_PREFIX + r.model_dump_json() + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
