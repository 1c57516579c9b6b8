"""H100 check + benchmark of the Triton selective scan.

python -m mamba_decoder.kernels.selective_scan.bench_gpu [--tune] [--skip-check] [--skip-bench]

Prints one JSON line per measurement:
  (1) rel. errors of triton fwd + bwd vs selective_scan_ref (fp32 and bf16, incl. odd shapes);
  (2) CUDA-event timings (median of 50 after warmup) of triton fwd, triton fwd+bwd and the
      mambapy pscan path, with GB/s (bytes: read x, dt, z, B, C once, write y) and peak memory;
  (3) with --tune, a sweep of (BLOCK_D, CHUNK, num_warps) for fwd and bwd.
"""

from __future__ import annotations

import argparse
import json

import torch

from mamba_decoder.kernels.selective_scan import selective_scan_pscan, selective_scan_ref
from mamba_decoder.kernels.selective_scan import triton_scan as ts

BENCH_SHAPES = [(1, 128, 1024, 16), (8, 2048, 1024, 16), (8, 8192, 1024, 16)]
CHECK_SHAPES = [(2, 37, 48, 16), (1, 200, 1000, 16), (3, 130, 96, 8), (2, 513, 256, 16)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def emit(**kw):
    print(json.dumps(kw), flush=True)


def make_inputs(Bsz, L, ED, N, dtype, R=8, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"

    def rn(*s):
        return torch.randn(*s, device=dev, generator=g)

    x = rn(Bsz, L, ED).to(dtype)
    dt = (rn(Bsz, L, ED) - 2.0).to(dtype)
    z = rn(Bsz, L, ED).to(dtype)
    A = -torch.exp(torch.rand(ED, N, device=dev, generator=g))  # fp32
    xBC = rn(Bsz, L, R + 2 * N).to(dtype)  # B, C are strided slices of this
    B = xBC[..., R:R + N]
    C = xBC[..., R + N:]
    D = rn(ED)
    dt_bias = 0.5 * rn(ED)
    return dict(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def check():
    names = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias"]
    for (Bsz, L, ED, N) in CHECK_SHAPES:
        for dname, dtype in DTYPES.items():
            inp = make_inputs(Bsz, L, ED, N, dtype)
            leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inp.items()}
            h0 = torch.randn(Bsz, ED, N, device="cuda").requires_grad_(True)
            res = {}
            for impl, fn in (("ref", selective_scan_ref), ("triton", ts.selective_scan_triton)):
                for v in list(leaves.values()) + [h0]:
                    v.grad = None
                out, hf = fn(**leaves, initial_state=h0, return_final_state=True)
                gen = torch.Generator(device="cuda").manual_seed(1)
                go = torch.randn(out.shape, device="cuda", generator=gen).to(out.dtype)
                gh = torch.randn(hf.shape, device="cuda", generator=gen)
                ((out.float() * go.float()).sum() + (hf * gh).sum()).backward()
                res[impl] = (out.detach(), hf.detach(),
                             {k: leaves[k].grad.clone() for k in names}, h0.grad.clone())
            r, t = res["ref"], res["triton"]
            errs = {"out": rel(t[0], r[0]), "final_state": rel(t[1], r[1]),
                    "d_initial_state": rel(t[3], r[3])}
            errs.update({f"d_{k}": rel(t[2][k], r[2][k]) for k in names})
            emit(kind="check", shape=[Bsz, L, ED, N], dtype=dname, max_rel=max(errs.values()),
                 **errs)


def cuda_time(fn, iters=50, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2]  # ms


def measure(name, fn, shape, dname, nbytes, iters=50):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    try:
        ms = cuda_time(fn, iters=iters)
    except torch.OutOfMemoryError:
        emit(kind="bench", impl=name, shape=list(shape), dtype=dname, error="OOM")
        torch.cuda.empty_cache()
        return
    peak = torch.cuda.max_memory_allocated() - base
    emit(kind="bench", impl=name, shape=list(shape), dtype=dname, ms=round(ms, 4),
         GBps=round(nbytes / ms / 1e6, 1), peak_extra_MiB=round(peak / 2**20, 1))


def bench():
    for shape in BENCH_SHAPES:
        Bsz, L, ED, N = shape
        for dname, dtype in DTYPES.items():
            inp = make_inputs(Bsz, L, ED, N, dtype)
            es = torch.tensor([], dtype=dtype).element_size()
            # read x, dt, z, B, C once, write y
            nbytes = es * (4 * Bsz * L * ED + 2 * Bsz * L * N)
            with torch.no_grad():
                measure("triton_fwd", lambda: ts.selective_scan_triton(**inp), shape, dname, nbytes)
            leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inp.items()}
            # B and C are separate leaves here; fine for timing
            go = torch.randn(Bsz, L, ED, device="cuda", dtype=dtype)

            def fb():
                out = ts.selective_scan_triton(**leaves)
                out.backward(go)

            measure("triton_fwd_bwd", fb, shape, dname, nbytes)
            try:
                import mambapy.pscan  # noqa: F401
            except ImportError:
                emit(kind="bench", impl="mambapy_pscan", error="mambapy not importable")
                continue
            iters = 50 if L * Bsz <= 8 * 2048 else 10
            with torch.no_grad():
                measure("mambapy_pscan_fwd", lambda: selective_scan_pscan(**inp), shape, dname,
                        nbytes, iters=iters)

            def pb():
                out = selective_scan_pscan(**leaves)
                out.backward(go)

            measure("mambapy_pscan_fwd_bwd", pb, shape, dname, nbytes, iters=iters)
            del leaves, inp
            torch.cuda.empty_cache()


def tune():
    shape = (8, 2048, 1024, 16)
    Bsz, L, ED, N = shape
    for dname, dtype in DTYPES.items():
        inp = make_inputs(Bsz, L, ED, N, dtype)
        go = torch.randn(Bsz, L, ED, device="cuda", dtype=dtype)
        args = [inp[k] for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")]
        best_f, best_b = None, None
        for cfg in ts.TUNE_CONFIGS:
            try:
                ms = cuda_time(lambda: ts._fwd(*args, None, True, False, **cfg), iters=20)
            except Exception as e:  # e.g. out of resources
                emit(kind="tune_fwd", dtype=dname, cfg=cfg, error=type(e).__name__)
                continue
            emit(kind="tune_fwd", dtype=dname, cfg=cfg, ms=round(ms, 4))
            if best_f is None or ms < best_f[0]:
                best_f = (ms, cfg)
        for chunk in (32, 64):
            _, _, states, _ = ts._fwd(*args, None, True, True, CHUNK=chunk)
            for bd in (4, 8, 16):
                for nw in (2, 4, 8):
                    try:
                        ms = cuda_time(lambda: ts._bwd(go, None, *args, states, True, chunk,
                                                       BLOCK_D=bd, num_warps=nw), iters=10)
                    except Exception as e:
                        emit(kind="tune_bwd", dtype=dname, error=type(e).__name__,
                             cfg=dict(CHUNK=chunk, BLOCK_D=bd, num_warps=nw))
                        continue
                    cfg = dict(CHUNK=chunk, BLOCK_D=bd, num_warps=nw)
                    emit(kind="tune_bwd", dtype=dname, cfg=cfg, ms=round(ms, 4))
                    if best_b is None or ms < best_b[0]:
                        best_b = (ms, cfg)
        emit(kind="tune_best", dtype=dname, shape=list(shape),
             fwd=best_f and {"ms": round(best_f[0], 4), **best_f[1]},
             bwd=best_b and {"ms": round(best_b[0], 4), **best_b[1]})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    a = ap.parse_args()
    assert torch.cuda.is_available(), "bench_gpu needs a CUDA device"
    emit(kind="env", device=torch.cuda.get_device_name(), torch=torch.__version__,
         triton=__import__("triton").__version__, fwd_config=ts.FWD_CONFIG,
         bwd_config=ts.BWD_CONFIG)
    if not a.skip_check:
        check()
    if a.tune:
        tune()
    if not a.skip_bench:
        bench()


if __name__ == "__main__":
    main()
