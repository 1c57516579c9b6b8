"""Measure one config in this process and print its record: `python -m mamba_decoder.bench.worker`.

Reads {"settings": SweepSettings fields, "config": Config fields} as JSON on stdin and prints
one line `RECORD {json}` on stdout. Used by `--isolate`, so that a crash costs one row only.
"""
from __future__ import annotations

import json
import sys


from .runner import RECORD_PREFIX, apply_process_settings, measure
from .settings import Config, SweepSettings


def main() -> int:
    payload = json.loads(sys.stdin.read())
    s = SweepSettings(**payload["settings"])
    apply_process_settings(s)
    r = measure(Config(**payload["config"]), s)
    sys.stdout.write(RECORD_PREFIX + r.model_dump_json() + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
