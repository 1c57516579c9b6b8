"""The memory estimate (flops.peak_bytes, via runner.estimate_peak) against the measured rise of
the resident set over one CPU forward, each config in a fresh process:

    python scripts/memory_estimate_check.py            # the table in docs/BENCHMARKS.md (issue 15)
"""
from __future__ import annotations

import subprocess
import sys

CONFIGS = [("Regular Mamba", "reference", 256, 2, 1024), ("Regular Mamba", "reference", 64, 2, 1000),
           ("MambaDecoderBlock", "reference", 256, 2, 1024), ("MLABlock", "reference", 256, 2, 1024),
           ("MambaDecoderBlock", "fast", 256, 2, 1024), ("MLABlock", "fast", 256, 2, 1024),
           ("MLABlock", "fast", 128, 4, 512), ("Regular Mamba", "fast", 512, 4, 2048)]

ONE = """
import sys, torch
from mamba_decoder.bench.runner import estimate_peak, registry_build, forward_scenario
from mamba_decoder.bench.settings import SweepSettings, Config

def status(key):   # bytes
    return int(next(ln for ln in open("/proc/self/status") if ln.startswith(key)).split()[1]) * 1024

name, backend, dim, B, L = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
torch.set_num_threads(1)
s = SweepSettings(dim=dim)
m = registry_build(name, s, backend)
forward_scenario(m, torch.randn(1, 8, dim))()        # libraries and allocator warmed up
open("/proc/self/clear_refs", "w").write("5")        # the peak resident set starts again here
base = status("VmRSS:")
forward_scenario(m, torch.randn(B, L, dim))()
w = sum(p.numel() * p.element_size() for p in m.parameters())
print((status("VmHWM:") - base) / 2**20, (estimate_peak(Config(name, backend, "float32", L, B), s) - w) / 2**20)
"""


def main() -> None:
    print("| model | backend | dim | batch | seq | measured MiB | estimated MiB | estimate / measured |")
    print("|---|---|---|---|---|---|---|---|")
    for name, backend, dim, B, L in CONFIGS:
        out = subprocess.run([sys.executable, "-c", ONE, name, backend, str(dim), str(B), str(L)],
                             capture_output=True, text=True, check=True).stdout.split()
        measured, est = map(float, out[-2:])
        print(f"| {name} | {backend} | {dim} | {B} | {L} | {measured:.0f} | {est:.0f} | {est / measured:.2f} |")


if __name__ == "__main__":
    main()
