"""The training MoE's Function against autograd through the PyTorch ops, on a GPU, interleaved
in one process (old, new, old, new, ...), on the suite's timer.

    python scripts/moe_train_study.py [--rounds 6] [--runs 5]
    python scripts/moe_train_study.py --profile     # where the blocks' B8 L2048 train step spends host and GPU time

Measures (bf16, dim 512, the suite's MoE: 6 experts, top-2, a shared expert of the same width):
the MoE alone, forward + backward, at 8 x 2048 and 8 x 8192 tokens; then the suite's train step
(forward + backward of a sum, no optimizer step) of MambaDecoderBlock and MLABlock at B8 L2048 and
L8192, with the MoE's training path swapped. "old" is autograd through kernels.moe.routed_grouped
with the shared expert on its own (the path before the Function); "new" is
kernels.moe.routed_grouped_train. One JSON line per measurement: medians over rounds and the
median of the per-round ratios new / old.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

from mamba_decoder import MambaConfig, MambaDecoderBlock, MLABlock, MoEConfig
from mamba_decoder.bench.timing import time_callable
from mamba_decoder.kernels import moe as mk

DEV, DT = "cuda", torch.bfloat16
NEW = mk.routed_grouped_train


def old_path(x, weights, indices, w1s, w2s, w3s, n_always_on=0, triton=False):
    """What MoE._forward_fast trained through before the Function: autograd over routed_grouped
    on stacked weights, the always-on (shared) expert as its own three linears."""
    n = len(w1s) - n_always_on
    out = mk.routed_grouped(x, weights, indices, torch.stack(w1s[:n]), torch.stack(w2s[:n]),
                            torch.stack(w3s[:n]), None, False)
    for e in range(n, len(w1s)):
        out = out + F.linear(F.silu(F.linear(x, w1s[e])) * F.linear(x, w3s[e]), w2s[e])
    return out


def interleaved(fns: dict, rounds: int, runs: int) -> dict:
    samples = {k: [] for k in fns}
    for fn in fns.values():
        time_callable(fn, DEV, warmup=3, runs=1)
    for _ in range(rounds):
        for k, fn in fns.items():
            samples[k].append(statistics.median(time_callable(fn, DEV, warmup=1, runs=runs)))
    ratios = [n / o for n, o in zip(samples["new"], samples["old"])]
    return {"old_ms": round(statistics.median(samples["old"]), 4), "new_ms": round(statistics.median(samples["new"]), 4),
            "new_over_old": round(statistics.median(ratios), 3),
            "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    torch.manual_seed(0)
    if a.profile:
        return profile()
    D, I, E, K = 512, 1024, 6, 2
    for T in (8 * 2048, 8 * 8192):
        x = torch.randn(T, D, device=DEV, dtype=DT, requires_grad=True)
        scores = torch.randn(T, E, device=DEV, dtype=DT, requires_grad=True)
        ws = [[(torch.randn(*s, device=DEV) / s[-1] ** 0.5).to(DT).requires_grad_(True) for _ in range(E + 1)]
              for s in ((I, D), (D, I), (I, D))]
        g = torch.randn(T, D, device=DEV, dtype=DT)

        def step(fn):
            def run():
                w, idx = mk.topk_route(scores, None, K)
                out = fn(x, w, idx, *ws, n_always_on=1, triton=True)
                torch.autograd.backward(out, g)
            return run
        print(json.dumps({"what": "moe_fwd_bwd", "tokens": T, **interleaved({"old": step(old_path), "new": step(NEW)},
                                                                                a.rounds, a.runs)}), flush=True)
        del x, scores, ws, g
    for L in (2048, 8192):
        for name, make in (("MambaDecoderBlock", lambda: MambaDecoderBlock(512, MambaConfig(d_model=512, n_layers=1),
                                                                            MoEConfig(dim=512))),
                           ("MLABlock", lambda: MLABlock(dim=512))):
            block = make().to(DEV, DT).train()
            xb = torch.randn(8, L, 512, device=DEV, dtype=DT, requires_grad=True)

            def step(fn):
                def run():
                    mk.routed_grouped_train = fn
                    try:
                        block(xb).sum().backward()
                    finally:
                        mk.routed_grouped_train = NEW
                    block.zero_grad(set_to_none=True)
                return run
            print(json.dumps({"what": "train_step", "model": name, "B": 8, "L": L,
                              **interleaved({"old": step(old_path), "new": step(NEW)}, a.rounds, a.runs)}), flush=True)
            del block, xb
            torch.cuda.empty_cache()


def profile():
    """torch.profiler over 5 train steps of each block at B8 L2048: wall per step, GPU time per
    step, launches per step, and the ops with the most host time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof_ctx

    from mamba_decoder.bench.registry import build_model

    for name in ("Regular Mamba", "MambaDecoderBlock", "MLABlock"):
        block = build_model(name, 512, "fast").to(DEV, DT).train()
        xb = torch.randn(8, 2048, 512, device=DEV, dtype=DT)
        g = torch.randn(8, 2048, 512, device=DEV, dtype=DT)

        def step():
            block(xb).backward(g)
            block.zero_grad(set_to_none=True)
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        with prof_ctx(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as p:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        ev = p.key_averages()
        gpu_us = sum(e.self_device_time_total for e in ev) / 5
        launches = sum(e.count for e in ev if e.device_type == torch.autograd.DeviceType.CUDA) / 5
        wall = statistics.median(time_callable(step, DEV, warmup=3, runs=20))
        print(json.dumps({"what": "profile", "model": name, "wall_ms": round(wall, 3),
                          "gpu_ms": round(gpu_us / 1e3, 3), "kernels_per_step": launches}), flush=True)
        rows = sorted(ev, key=lambda e: -e.self_cpu_time_total)[:25]
        for e in rows:
            print(f"   host {e.self_cpu_time_total / 5 / 1e3:7.3f} ms  n {e.count // 5:4d}  gpu {e.self_device_time_total / 5 / 1e3:7.3f} ms  {e.key[:90]}")
        rows = sorted(ev, key=lambda e: -e.self_device_time_total)[:12]
        for e in rows:
            print(f"   GPU  {e.self_device_time_total / 5 / 1e3:7.3f} ms  n {e.count // 5:4d}  {e.key[:100]}")
        for e in p.key_averages(group_by_stack_n=6):
            if e.key in ("aten::cat", "aten::copy_") and e.device_time_total / 5 > 50:
                print(f"   {e.key} gpu {e.device_time_total / 5 / 1e3:.3f} ms n {e.count // 5}: "
                      + " <- ".join(f.split("(")[0].split("/")[-1] + ":" + f.split("(")[-1].split(")")[0]
                                    for f in e.stack[:6]))
        del block, xb, g
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
