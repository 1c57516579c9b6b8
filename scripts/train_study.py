"""Training-path study on a GPU, on the suite's timer: the selective-scan backward's tiles, the
scan's and the Mamba mixer's forward + backward against mamba_ssm (when it imports), peak memory,
and where the mixer's train step spends its GPU time.

    python scripts/train_study.py [--budget S] [--skip-tune] [--profile]

One JSON line per measurement (median ms of CUDA-event-timed runs). mamba_ssm is the peer:
load it as ../shared/peer/README.md says (PYTHONPATH with its extensions and Python sources).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from mamba_decoder import MambaConfig
from mamba_decoder.bench.timing import summarize, time_callable
from mamba_decoder.kernels.selective_scan import triton_bdl as tb
from mamba_decoder.models.mamba import MambaMixer

DEV = "cuda"
SHAPES = [(8, 2048), (8, 8192), (1, 8192), (1, 128)]      # (batch, seq) at dim 512: ED 1024, N 16


def emit(**kw):
    print(json.dumps(kw), flush=True)


def med(fn, warmup=3, runs=15):
    return summarize(time_callable(fn, DEV, warmup=warmup, runs=runs)).median


def peer_modules():
    try:
        from mamba_ssm.modules.mamba_simple import Mamba
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        return Mamba, selective_scan_fn
    except ImportError as e:
        emit(what="peer", error=repr(e)[:200])
        return None, None


def scan_inputs(Bsz, L, ED=1024, N=16, R=32, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    rn = lambda *s: torch.randn(*s, device=DEV, generator=g)  # noqa: E731
    xBC = rn(Bsz, R + 2 * N, L).to(dtype)
    return dict(x=rn(Bsz, ED, L).to(dtype), dt=(rn(Bsz, ED, L) - 2.0).to(dtype),
                z=rn(Bsz, ED, L).to(dtype), A=-torch.exp(rn(ED, N).clamp(-1, 1)),
                B=xBC[:, R:R + N], C=xBC[:, R + N:], D=rn(ED), dt_bias=0.5 * rn(ED))


# (BLOCK_D, NS, E, num_warps, ATOMIC, state chunk): the default first and last (a drift check),
# then tiles of 2 and 4 warps: BLOCK_D channels a program, so ED / BLOCK_D programs add into each
# (b, n, t) of dB and dC (128 atomics an element at 8 x 4 and ED 1024; 64 and 32 with more warps)
BWD_TUNE = [(8, 4, 8, 1, True, 32), (16, 4, 8, 2, True, 32), (32, 4, 8, 4, True, 32), (16, 4, 4, 2, True, 32),
            (8, 8, 8, 2, True, 32), (4, 8, 8, 1, True, 32), (8, 4, 8, 1, True, 128), (8, 4, 8, 1, True, 32)]


def tune_bwd(budget_s, shapes=((8, 2048), (8, 8192))):
    """The backward alone from stored states, bf16, ED 1024, N 16, per tile config (BWD_TUNE),
    each config at every shape before the next (one compile serves both)."""
    t0 = time.time()
    data = {}
    for Bsz, L in shapes:
        inp = scan_inputs(Bsz, L)
        data[Bsz, L] = ([inp[k] for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")], torch.randn_like(inp["x"]))
    for bd, ns, e, nw, at, chunk in BWD_TUNE:
        cfg = dict(BLOCK_D=bd, NS=ns, E=e, num_warps=nw, ATOMIC=at)
        for (Bsz, L), (args, dout) in data.items():
            if time.time() - t0 > budget_s:
                emit(what="tune_bwd", B=Bsz, L=L, chunk=chunk, skipped=cfg)
                continue
            try:
                with torch.no_grad():
                    _, _, states, _ = tb._fwd(*args, None, True, True, STATE_CHUNK=chunk)
                    ms = med(lambda: tb._bwd(dout, None, *args, states, True, chunk, **cfg))
                emit(what="tune_bwd", B=Bsz, L=L, ms=round(ms, 4), chunk=chunk, cfg=cfg,
                     t_s=round(time.time() - t0, 1))
            except Exception as ex:  # a config that does not compile is a row, not the end
                emit(what="tune_bwd", B=Bsz, L=L, chunk=chunk, cfg=cfg, error=repr(ex)[:300])


def tune_segments(budget_s):
    """The forward storing states and the backward alone, each over time segments
    (triton_bdl.time_segments), at small batches where the grid of (d-block, batch) programs is
    small."""
    t0 = time.time()
    for Bsz, L in [(1, 8192), (1, 2048), (2, 8192)]:
        inp = scan_inputs(Bsz, L)
        args = [inp[k] for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")]
        dout = torch.randn_like(inp["x"])
        with torch.no_grad():
            _, _, states, _ = tb._fwd(*args, None, True, True)
            for bd, ns, segs in ((8, 4, 1), (4, 8, 1), (8, 4, 4), (8, 4, 8), (8, 4, 16), (4, 8, 4)):
                ms = med(lambda: tb._fwd(*args, None, True, True, variant="lane", BLOCK_D=bd, NS=ns,
                                         CHUNK=8, SEGMENTS=segs))
                emit(what="fwd_states", B=Bsz, L=L, BLOCK_D=bd, NS=ns, SEGMENTS=segs, ms=round(ms, 4))
            for tiles in (dict(BLOCK_D=4, NS=8, E=8), dict(BLOCK_D=8, NS=4, E=8)):
                for segs in (1, 2, 4, 8, 16):
                    if time.time() - t0 > budget_s:
                        emit(what="tune_segments", skipped=[Bsz, L, tiles, segs])
                        continue
                    cfg = dict(tiles, num_warps=1, ATOMIC=True, SEGMENTS=segs)
                    ms = med(lambda: tb._bwd(dout, None, *args, states, True, 32, **cfg))
                    emit(what="tune_segments", B=Bsz, L=L, ms=round(ms, 4), **cfg)


def scan_fwd_bwd(selective_scan_fn):
    """The scan alone, forward + backward (autograd.grad of every input), ours vs the peer's."""
    from mamba_decoder.kernels.selective_scan import selective_scan
    for Bsz, L in SHAPES:
        inp = {k: v.requires_grad_(True) if k not in ("B", "C") else v
               for k, v in scan_inputs(Bsz, L).items()}
        xBC_leaf = inp["B"]._base.requires_grad_(True)
        R = xBC_leaf.shape[1] - 32
        gy = torch.randn_like(inp["x"])
        names = ["x", "dt", "z", "A", "D", "dt_bias"]

        def ours():
            B, C = xBC_leaf[:, R:R + 16], xBC_leaf[:, R + 16:]
            y = selective_scan(inp["x"], inp["dt"], inp["A"], B, C, inp["D"], z=inp["z"],
                               dt_bias=inp["dt_bias"], impl="triton", layout="BDL")
            return torch.autograd.grad(y, [inp[k] for k in names] + [xBC_leaf], gy)

        def peer():
            B, C = xBC_leaf[:, R:R + 16], xBC_leaf[:, R + 16:]
            y = selective_scan_fn(inp["x"], inp["dt"], inp["A"], B, C, inp["D"], inp["z"],
                                  inp["dt_bias"], delta_softplus=True)
            return torch.autograd.grad(y, [inp[k] for k in names] + [xBC_leaf], gy)

        row = dict(what="scan_fwd_bwd", B=Bsz, L=L, ours=round(med(ours), 4))
        if selective_scan_fn is not None:
            go, gp = ours(), peer()
            row["grad_rel"] = {n: round(((a.float() - b.float()).norm() / b.float().norm()).item(), 6)
                               for n, a, b in zip(names + ["xBC"], go, gp)}
            row["peer"] = round(med(peer), 4)
            row["ratio"] = round(row["ours"] / row["peer"], 3)
        emit(**row)


def mixer_fwd_bwd(Peer, profile):
    """MambaMixer (fast) vs mamba_ssm's Mamba on one state dict, bf16: forward + backward of
    x and every parameter, and the peak memory above the inputs."""
    torch.manual_seed(0)
    ours = MambaMixer(MambaConfig(d_model=512, n_layers=1), backend="fast").to(DEV)
    peer = None
    if Peer is not None:
        peer = Peer(d_model=512, d_state=16, d_conv=4, expand=2, use_fast_path=True).to(DEV)
        peer.load_state_dict(ours.state_dict(), strict=True)
        x = torch.randn(2, 300, 512, device=DEV, requires_grad=True)
        ya, yb = ours(x), peer(x)
        gy = torch.randn_like(ya)
        ga = torch.autograd.grad(ya, [x, *ours.parameters()], gy)
        gb = torch.autograd.grad(yb, [x, *peer.parameters()], gy)
        emit(what="mixer_fp32_match", fwd_rel=((ya - yb).norm() / yb.norm()).item(),
             grad_rel_max=max(((a - b).norm() / b.norm()).item() for a, b in zip(ga, gb)))
        peer = peer.to(torch.bfloat16)
    ours = ours.to(torch.bfloat16)
    mods = {"ours": ours, "peer": peer}
    for Bsz, L in SHAPES:
        x = torch.randn(Bsz, L, 512, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        gy = torch.randn_like(x)
        row = dict(what="mixer_fwd_bwd", B=Bsz, L=L)
        for name, m in mods.items():
            if m is None:
                continue
            params = [x, *m.parameters()]
            step = lambda m=m, params=params: torch.autograd.grad(m(x), params, gy)  # noqa: E731
            row[name] = round(med(step), 4)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            row[name + "_peak_mb"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
        if peer is not None:
            row["ratio"] = round(row["ours"] / row["peer"], 3)
        emit(**row)
    if profile:
        from torch.profiler import ProfilerActivity, profile as prof
        for Bsz, L in [(8, 2048), (8, 8192)]:
            x = torch.randn(Bsz, L, 512, device=DEV, dtype=torch.bfloat16, requires_grad=True)
            gy = torch.randn_like(x)
            for name, m in mods.items():
                if m is None:
                    continue
                params = [x, *m.parameters()]
                for _ in range(3):
                    torch.autograd.grad(m(x), params, gy)
                torch.cuda.synchronize()
                with prof(activities=[ProfilerActivity.CUDA]) as p:
                    for _ in range(5):
                        torch.autograd.grad(m(x), params, gy)
                    torch.cuda.synchronize()
                print(f"### {name} B{Bsz} L{L} fwd+bwd, 5 steps")
                print(p.key_averages().table(sort_by="cuda_time_total", row_limit=16, max_name_column_width=60))


def host_costs(Peer, profile=False):
    """Host time of the mixer's train step and of each launch in it, at B1 L128 (the GPU idles:
    every figure is the time the host takes to enqueue), perf_counter over many calls."""
    from mamba_decoder.kernels.causal_conv import _launch as conv_fwd, _launch_bwd as conv_bwd
    from profile_gpu import host_ms     # scripts/ is on the path when this runs as a script

    def per_call_us(fn):
        return round(host_ms(fn, 200)[0] * 1e3, 1)

    torch.manual_seed(0)
    ours = MambaMixer(MambaConfig(d_model=512, n_layers=1), backend="fast").to(DEV).to(torch.bfloat16)
    mods = {"ours": ours}
    if Peer is not None:
        peer = Peer(d_model=512, d_state=16, d_conv=4, expand=2, use_fast_path=True).to(DEV)
        peer.load_state_dict(ours.state_dict(), strict=True)
        mods["peer"] = peer.to(torch.bfloat16)
    x = torch.randn(1, 128, 512, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn_like(x)
    row = dict(what="host_us", B=1, L=128)
    for name, m in mods.items():
        params = [x, *m.parameters()]
        row[name + "_step"] = per_call_us(lambda: torch.autograd.grad(m(x), params, gy))
        row[name + "_fwd"] = per_call_us(lambda: m(x))
        with torch.no_grad():
            row[name + "_fwd_nograd"] = per_call_us(lambda: m(x))
    inp = scan_inputs(1, 128)
    args = [inp[k] for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")]
    with torch.no_grad():
        _, _, states, _ = tb._fwd(*args, None, True, True)
        dout = torch.randn_like(inp["x"])
        w = torch.randn(1024, 4, device=DEV, dtype=torch.bfloat16)
        b = torch.randn(1024, device=DEV, dtype=torch.bfloat16)
        row["scan_fwd"] = per_call_us(lambda: tb._fwd(*args, None, True, True))
        row["scan_bwd"] = per_call_us(lambda: tb._bwd(dout, None, *args, states, True, 32))
        row["conv_fwd"] = per_call_us(lambda: conv_fwd(inp["x"], w, b, None, None, {}))
        row["conv_bwd"] = per_call_us(lambda: conv_bwd(inp["x"], w, b, dout))
        row["bmm"] = per_call_us(lambda: torch.bmm(inp["x"], inp["x"].transpose(1, 2)))
        row["empty"] = per_call_us(lambda: torch.empty_like(inp["x"]))
        row["sum0"] = per_call_us(lambda: inp["x"].sum(0))
    emit(**row)
    if profile:
        from torch.profiler import ProfilerActivity, profile as prof
        for name, m in mods.items():
            params = [x, *m.parameters()]
            with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
                for _ in range(20):
                    torch.autograd.grad(m(x), params, gy)
                torch.cuda.synchronize()
            print(f"### host: {name} B1 L128 fwd+bwd, 20 steps")
            print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=50))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=200.0, help="seconds for the backward tile sweep")
    ap.add_argument("--skip-tune", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--host", action="store_true", help="host time of the train step and its launches")
    ap.add_argument("--host-profile", action="store_true", help="with --host: a CPU profile table")
    ap.add_argument("--only-host", action="store_true")
    ap.add_argument("--segments", action="store_true", help="the backward's time segments at small batches")
    ap.add_argument("--skip-scan", action="store_true", help="no scan-alone forward + backward rows")
    a = ap.parse_args()
    emit(what="env", torch=torch.__version__, device=torch.cuda.get_device_name())
    Peer, ssfn = peer_modules()
    if a.host or a.only_host:
        host_costs(Peer, a.host_profile)
        if a.only_host:
            return
    if a.segments:
        tune_segments(a.budget)
    if not a.skip_tune:
        tune_bwd(a.budget)
    if not a.skip_scan:
        scan_fwd_bwd(ssfn)
    mixer_fwd_bwd(Peer, a.profile)


if __name__ == "__main__":
    main()
