"""Fast vs reference backend on this CPU, interleaved in one process (issues 3 and 17).

    python scripts/cpu_fast_vs_reference.py                      # B8 L1024, 2 threads, fp32, 5 rounds
    python scripts/cpu_fast_vs_reference.py --seq 2048 --backends fast
    python scripts/cpu_fast_vs_reference.py --seq 64 --batch 1 --rounds 20 --backends fast   # sweep cost

Each round times one forward of every (model, backend) and one GEMM-rate probe
(`bench.runner.cpu_gemm_tflops`, the suite's CPU floor) back to back on the suite's timer, so
drift of a shared machine hits them alike; ratios and floor fractions are per round, then their
median (range in brackets). Same weights for both backends. The GEMM floor of a config is its
matmul FLOPs (bench/flops.py) at the rate probed in that round.
"""
import argparse
import statistics
import time

import torch

from mamba_decoder.bench import flops, host_alloc
from mamba_decoder.bench.registry import MODELS, build_model
from mamba_decoder.bench.runner import cpu_gemm_tflops, forward_scenario
from mamba_decoder.bench.timing import time_callable

p = argparse.ArgumentParser()
p.add_argument("--batch", type=int, default=8)
p.add_argument("--seq", type=int, default=1024)
p.add_argument("--dim", type=int, default=512)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--rounds", type=int, default=5)
p.add_argument("--dtype", default="float32")
p.add_argument("--backends", nargs="+", default=["reference", "fast"])
p.add_argument("--models", nargs="+", default=list(MODELS))
p.add_argument("--host-allocator", default=host_alloc.DEFAULT, choices=host_alloc.CHOICES,
               help="as the suite's flag (bench/host_alloc.py; default: retain)")
a = p.parse_args()

torch.set_num_threads(a.threads)
print("host allocator:", host_alloc.apply(a.host_allocator))
dtype = getattr(torch, a.dtype)
x = torch.randn(a.batch, a.seq, a.dim, dtype=dtype)
steps, floor_flops = {}, {}
for name in a.models:
    torch.manual_seed(0)
    ref = build_model(name, a.dim, "reference").to(dtype).eval()
    for backend in a.backends:
        m = ref if backend == "reference" else build_model(name, a.dim, backend).to(dtype).eval()
        m.load_state_dict(ref.state_dict())
        steps[name, backend] = forward_scenario(m, x)
        steps[name, backend]()                                   # warm up (and build kernels)
        if backend == "fast":
            floor_flops[name] = flops.forward_flops(m, a.batch, a.seq).matmul
ms = {k: [] for k in steps}
gemm = []
t0 = time.time()
for _ in range(a.rounds):
    gemm.append(cpu_gemm_tflops(dtype))
    for k, step in steps.items():
        ms[k] += time_callable(step, "cpu", warmup=0, runs=1)
print(f"B{a.batch} L{a.seq} dim {a.dim} {a.dtype} {a.threads} threads, {a.rounds} rounds in {time.time() - t0:.0f} s; "
      f"{a.dtype} GEMM rate per round {', '.join(f'{g * 1e3:.0f}' for g in gemm)} GFLOP/s")
for name in a.models:
    row = [f"{name:18s}"]
    for backend in a.backends:
        row.append(f"{backend} {statistics.median(ms[name, backend]):8.1f} ms")
    if {"reference", "fast"} <= set(a.backends):
        r = [rr / ff for rr, ff in zip(ms[name, "reference"], ms[name, "fast"])]
        row.append(f"speedup {statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f})")
    if name in floor_flops:
        f = [floor_flops[name] / (g * 1e12) / (t / 1e3) for g, t in zip(gemm, ms[name, "fast"])]
        row.append(f"fast at {statistics.median(f):.0%} of the GEMM rate "
                   f"({min(f):.0%}-{max(f):.0%}; floor {floor_flops[name] / 1e9:.1f} GFLOP)")
    print("  ".join(row), flush=True)
