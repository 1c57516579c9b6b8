"""GPU check + study of the Triton selective scan (channel-major kernels), on the suite's timer.

python scripts/scan_study.py [--tune] [--skip-check] [--budget S]

Prints one JSON line per measurement:
  check: rel. errors of every forward variant (fwd, final state, the backward's stored states)
         and of fwd + bwd through autograd, against selective_scan_ref, fp32 and bf16, odd shapes;
  tune:  (--tune) forward tiles per dtype at (8, 2048, 1024, 16) (the backward's: scripts/train_study.py);
  table: the default kernels at the bench shapes: forward, forward + backward (CUDA events,
         median), GB/s of the forward (x, dt, z, B, C read once, y written), peak memory, and
         the same through mambapy's pscan;
  layer: RegularMamba (one residual layer, dim 512) fast vs reference, bf16, batch 8 seq 2048.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import torch

from mamba_decoder import MambaConfig
from mamba_decoder.bench.timing import summarize, time_callable
from mamba_decoder.kernels.selective_scan import selective_scan_pscan, selective_scan_ref
from mamba_decoder.kernels.selective_scan import triton_bdl as tb
from mamba_decoder.models import RegularMamba

BENCH_SHAPES = [(1, 128, 1024, 16), (8, 2048, 1024, 16), (8, 8192, 1024, 16)]
CHECK_SHAPES = [(2, 37, 48, 16), (1, 200, 1000, 16), (3, 130, 96, 8), (2, 513, 256, 16)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SEQ = ("x", "dt", "z", "B", "C")
ARGS = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")


def emit(**kw):
    print(json.dumps(kw), flush=True)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def make_bdl(Bsz, L, ED, N, dtype, R=8, seed=0):
    """x, dt, z (B, ED, L); B, C (B, N, L) slices of one (B, R + 2N, L) tensor."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rn(*s):
        return torch.randn(*s, device="cuda", generator=g)

    xBC = rn(Bsz, R + 2 * N, L).to(dtype)
    return dict(x=rn(Bsz, ED, L).to(dtype), dt=(rn(Bsz, ED, L) - 2.0).to(dtype),
                z=rn(Bsz, ED, L).to(dtype), A=-torch.exp(torch.rand(ED, N, device="cuda", generator=g)),
                B=xBC[:, R:R + N], C=xBC[:, R + N:], D=rn(ED), dt_bias=0.5 * rn(ED))


def bld_view(inp):
    return {k: (v.transpose(1, 2) if k in SEQ else v) for k, v in inp.items()}


def cuda_time(fn, iters=50, warmup=5):
    """Median ms over `iters` runs (the suite's timer: CUDA events around each run)."""
    return summarize(time_callable(fn, "cuda", warmup=warmup, runs=iters)).median


def fwd_bwd(inp, h0=None, seed=1, impl="triton"):
    """Forward + backward of a random linear functional of (out, final state) on channel-major
    inputs, through the Triton autograd path or the reference (on transposed views); returns
    out (B, ED, L), the final state and the grads."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inp.items()}
    h0l = h0.detach().clone().requires_grad_(True) if h0 is not None else None
    if impl == "triton":
        out, hf = tb.selective_scan_triton_bdl(**leaves, initial_state=h0l, return_final_state=True)
    else:
        out, hf = selective_scan_ref(**bld_view(leaves), initial_state=h0l, return_final_state=True)
        out = out.transpose(1, 2)
    g = torch.Generator(device="cuda").manual_seed(seed)
    go = torch.randn(out.shape, device="cuda", generator=g)
    gh = torch.randn(hf.shape, device="cuda", generator=g)
    ((out.float() * go).sum() + (hf * gh).sum()).backward()
    grads = {k: leaves[k].grad for k in ARGS}
    if h0l is not None:
        grads["initial_state"] = h0l.grad
    return out.detach(), hf.detach(), grads


def check():
    for (Bsz, L, ED, N) in CHECK_SHAPES:
        for dname, dtype in DTYPES.items():
            inp = make_bdl(Bsz, L, ED, N, dtype)
            h0 = torch.randn(Bsz, ED, N, device="cuda")
            args = [inp[k] for k in ARGS] + [h0]
            with torch.no_grad():
                ref, rhf = selective_scan_ref(**bld_view(inp), initial_state=h0, return_final_state=True)
                _, _, st_lane, _ = tb._fwd(*args, True, True, variant="lane")
                for variant in tb.FWD_TILES:
                    o, hf, st, _ = tb._fwd(*args, True, True, variant=variant)
                    emit(kind="check_fwd", variant=variant, shape=[Bsz, L, ED, N], dtype=dname,
                         out=rel(o, ref.transpose(1, 2)), hfin=rel(hf, rhf), states=rel(st, st_lane))
            o, hf, g = fwd_bwd(inp, h0)
            ro, rhf, rg = fwd_bwd(inp, h0, impl="reference")
            errs = {"out": rel(o, ro), "hfin": rel(hf, rhf)}
            errs.update({f"d_{k}": rel(g[k], rg[k]) for k in g})
            emit(kind="check_fwd_bwd", variant=tb.FWD_BY_DTYPE[dtype], shape=[Bsz, L, ED, N],
                 dtype=dname, max_rel=max(errs.values()), **{k: float(f"{v:.2e}") for k, v in errs.items()})


def tune(deadline, dtypes=tuple(DTYPES)):
    Bsz, L, ED, N = 8, 2048, 1024, 16
    for dname, dtype in DTYPES.items():
        if dname not in dtypes:
            continue
        args = [make_bdl(Bsz, L, ED, N, dtype)[k] for k in ARGS] + [None]
        best = None
        with torch.no_grad():
            for cfg in tb.FWD_TUNE:
                if time.time() > deadline:
                    break
                try:
                    ms = cuda_time(lambda: tb._fwd(*args, True, False, **cfg))
                except Exception as e:  # a tile that does not compile (registers, shared memory)
                    emit(kind="tune_fwd", dtype=dname, cfg=cfg, error=str(e)[:200])
                    continue
                emit(kind="tune_fwd", dtype=dname, cfg=cfg, ms=round(ms, 4))
                best = min(best or (ms, cfg), (ms, cfg), key=lambda r: r[0])
        emit(kind="tune_fwd_best", dtype=dname, ms=round(best[0], 4), cfg=best[1],
             table=dict(variant=tb.FWD_BY_DTYPE[dtype], **tb.FWD_TILES[tb.FWD_BY_DTYPE[dtype]]))
    # the backward's tiles: scripts/train_study.py

def table():
    for shape in BENCH_SHAPES:
        Bsz, L, ED, N = shape
        nbytes_el = Bsz * L * (4 * ED + 2 * N)   # x, dt, z, y + B, C elements
        for dname, dtype in DTYPES.items():
            inp = make_bdl(Bsz, L, ED, N, dtype)
            args = [inp[k] for k in ARGS] + [None]
            row = dict(kind="table", shape=list(shape), dtype=dname, fwd_variant=tb.FWD_BY_DTYPE[dtype])
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            with torch.no_grad():
                ms = cuda_time(lambda: tb._fwd(*args, True, False))
            row.update(fwd_ms=round(ms, 4), fwd_GBps=round(nbytes_el * dtype.itemsize / ms / 1e6, 1),
                       fwd_peak_extra_MiB=round((torch.cuda.max_memory_allocated() - base) / 2**20, 1))
            row["fwd_bwd_ms"] = round(cuda_time(lambda: fwd_bwd(inp), iters=10), 3)
            if shape[1] <= 2048:   # mambapy's pscan materializes (B, L, ED, N)
                with torch.no_grad():
                    row["pscan_fwd_ms"] = round(cuda_time(
                        lambda: selective_scan_pscan(**bld_view(inp)), iters=10), 3)
            emit(**row)


def layer(Bsz=8, L=2048, dim=512):
    x = torch.randn(Bsz, L, dim, device="cuda", dtype=torch.bfloat16)
    for backend in ("fast", "reference"):
        torch.manual_seed(0)
        m = RegularMamba(MambaConfig(d_model=dim, n_layers=1), backend).to("cuda", torch.bfloat16)
        with torch.inference_mode():
            f = cuda_time(lambda: m(x), iters=20)
        xg = x.clone().requires_grad_(True)
        fb = cuda_time(lambda: m(xg).float().sum().backward(), iters=5)
        emit(kind="layer", model="RegularMamba", backend=backend, shape=[Bsz, L, dim], dtype="bf16",
             fwd_ms=round(f, 3), fwd_bwd_ms=round(fb, 3))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tune", action="store_true", help="sweep forward and backward tiles")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--budget", type=float, default=200.0, help="seconds for the tile sweep")
    ap.add_argument("--tune-dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--skip-table", action="store_true", help="no table / layer steps")
    a = ap.parse_args()
    assert torch.cuda.is_available(), "scan_study needs a CUDA device"
    emit(kind="env", device=torch.cuda.get_device_name(), torch=torch.__version__,
         triton=__import__("triton").__version__, fwd_by_dtype={str(k): v for k, v in tb.FWD_BY_DTYPE.items()},
         fwd_tiles=tb.FWD_TILES, bwd_config=tb.BWD_CONFIG)
    t0 = time.time()
    steps = ([] if a.skip_check else [("check", check)]) + \
        ([("tune", lambda: tune(t0 + a.budget, a.tune_dtypes))] if a.tune else []) + \
        ([] if a.skip_table else [("table", table), ("layer", layer)])
    for name, fn in steps:
        try:
            fn()
        except Exception:  # keep going: one GPU run must report everything it can
            emit(kind="error", step=name, error=traceback.format_exc()[-1500:])
        emit(kind="elapsed", step=name, s=round(time.time() - t0, 1))


if __name__ == "__main__":
    main()
