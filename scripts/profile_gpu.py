"""Where the fast blocks' time goes on the GPU (bf16, dim 512).

python scripts/profile_gpu.py           the top CUDA kernels of one forward at batch 8, seq 2048
python scripts/profile_gpu.py --host    host time of eager forwards at batch 1, seq 128 (launch-bound):
                                        per block and per part, host-only vs wall, syncs, and the
                                        Python profile of one selective-scan call
python scripts/profile_gpu.py --ops     host time by op of one eager forward of each block (torch
                                        profiler), batch 1 seq 128 and batch 8 seq 2048
python scripts/profile_gpu.py --moe     the MoE's dense-small path against the grouped one by token
                                        count: eager and graphed ms (where the threshold belongs)
python scripts/profile_gpu.py --sdpa    MLA's prefill attention by SDPA backend (cuDNN, efficient):
                                        eager host/wall and graphed ms, and MLABlock with cuDNN off
"""
import cProfile
import pstats
import sys
import time
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

from mamba_decoder.bench.registry import MODELS, build_model
from mamba_decoder.kernels import moe as moe_kernels
from mamba_decoder.models import set_kernel_policy
from mamba_decoder.policy import KernelPolicy
from mamba_decoder.kernels.selective_scan import selective_scan

dev, dt = torch.device("cuda"), torch.bfloat16


def host_ms(fn, n=100):
    """(ms per call until the host returns, ms per call until the GPU is done)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n * 1e3
    torch.cuda.synchronize()
    return round(host, 4), round((time.perf_counter() - t) / n * 1e3, 4)


def host_report():
    x = torch.randn(1, 128, 512, device=dev, dtype=dt)
    models = {name: build_model(name, 512, max_seq_len=2048).to(dev, dt).eval() for name in MODELS}
    with torch.inference_mode():
        for name, m in models.items():
            m(x)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                m(x)
            torch.cuda.set_sync_debug_mode(0)
            print(f"{name}: host/wall ms per forward {host_ms(lambda: m(x))}; "
                  f"syncs: {[str(i.message)[:100] for i in w if 'synchroniz' in str(i.message)]}")
            mixer = m.layers[0].mixer if name == "Regular Mamba" else getattr(m, "mixer", None) or m.attn
            parts = {"mixer/attn": lambda: mixer(x)}
            if hasattr(m, "moe"):
                parts["moe"] = lambda: m.moe(x)
            for k, f in parts.items():
                print(f"  {k}: host/wall {host_ms(f)}")
        xb = torch.randn(8, 2048, 512, device=dev, dtype=dt)
        for name, m in models.items():
            print(f"{name} batch 8 seq 2048: host/wall ms per forward {host_ms(lambda: m(xb), n=30)}")
        # A/B of the fast paths' switches, host/wall per forward at (1, 128) and (8, 2048)
        from mamba_decoder.kernels.selective_scan import triton_bdl as tb
        for name, m in models.items():
            moe, attn = getattr(m, "moe", None), getattr(m, "attn", None)
            variants = {"default": {}}
            if moe is not None:
                variants.update({"moe dense-small <= 64": dict(moe=64), "moe dense-small <= 4096": dict(moe=4096),
                                 "moe router unfused": dict(router=0)})
            if attn is not None:
                variants["mla fused prologue off"] = dict(fused="torch")
            if name != "MLABlock":
                variants.update({f"scan {v}": dict(scan=v) for v in tb.FWD_TILES})
            for vname, v in variants.items():
                set_kernel_policy(m, KernelPolicy(dense_small_max_tokens=v.get("moe"),
                                                  mla_prologue=v.get("fused", "auto")))
                old, old_router = tb.FWD_BY_DTYPE[dt], moe_kernels.FUSED_ROUTER_MAX_EXPERTS
                tb.FWD_BY_DTYPE[dt] = v.get("scan", old)
                moe_kernels.FUSED_ROUTER_MAX_EXPERTS = v.get("router", old_router)
                try:
                    print(f"  {name} [{vname}]: (1,128) {host_ms(lambda: m(x))}  (8,2048) {host_ms(lambda: m(xb), n=30)}")
                finally:
                    tb.FWD_BY_DTYPE[dt], moe_kernels.FUSED_ROUTER_MAX_EXPERTS = old, old_router
        # the Python profile of whole eager forwards at (1, 128): where host time goes besides launches
        for name, m in models.items():
            set_kernel_policy(m, KernelPolicy())            # the A/B loop left its last switch
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(100):
                m(x)
            pr.disable()
            print(f"### cProfile, {name} (1, 128), 100 forwards")
            pstats.Stats(pr).sort_stats("tottime").print_stats(25)
        ED, N, L = 1024, 16, 128
        xs = torch.randn(1, ED, L, device=dev, dtype=dt)
        A, D = -torch.rand(ED, N, device=dev), torch.randn(ED, device=dev)
        BC = torch.randn(1, 2 * N, L, device=dev, dtype=dt)
        scan = lambda: selective_scan(xs, xs, A, BC[:, :N], BC[:, N:], D, z=xs, dt_bias=D, layout="BDL")  # noqa: E731
        print(f"selective_scan alone (1, 1024, 128): host/wall {host_ms(scan)}; "
              f"one elementwise op: {host_ms(lambda: xs.add(1))}")
        # does an op cost more host time right after a Triton launch than after an aten op?
        y = torch.randn(1, 128, 512, device=dev, dtype=dt)
        print(f"pow alone {host_ms(lambda: y.pow(2))}; scan then pow "
              f"{host_ms(lambda: (scan(), y.pow(2)))}; add then pow {host_ms(lambda: (xs.add(1), y.pow(2)))}; "
              f"F.rms_norm alone {host_ms(lambda: torch.nn.functional.rms_norm(y, (512,)))}")
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(200):
            scan()
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(15)


def _profiled(m, x, activities, n):
    """The torch profiler over n inference forwards of m, after warm-up."""
    with torch.inference_mode():
        for _ in range(5):
            m(x)
        torch.cuda.synchronize()
        with profile(activities=activities) as p:
            for _ in range(n):
                m(x)
            torch.cuda.synchronize()
    return p


def kernel_report():
    x = torch.randn(8, 2048, 512, device=dev, dtype=dt)
    for name in MODELS:
        m = build_model(name, 512, max_seq_len=2048).to(dev, dt).eval()
        p = _profiled(m, x, [ProfilerActivity.CUDA], 5)
        print(f"\n### {name} (fast, bf16, B8 L2048): CUDA time per forward by kernel (5 forwards)")
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))


def ops_report():
    for B, L in [(1, 128), (8, 2048)]:
        x = torch.randn(B, L, 512, device=dev, dtype=dt)
        for name in MODELS:
            m = build_model(name, 512, max_seq_len=2048).to(dev, dt).eval()
            ev = _profiled(m, x, [ProfilerActivity.CPU, ProfilerActivity.CUDA], 10).key_averages()
            launches = sum(e.count for e in ev if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                              "cudaLaunchKernelExC", "cuLaunchKernelEx"))
            with torch.inference_mode():
                hw = host_ms(lambda: m(x))
            print(f"\n### {name} B{B} L{L}: {launches / 10:.1f} kernel launches per forward; "
                  f"host/wall {hw} ms")
            print(ev.table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=50))


def median_ms(fn, runs=30):
    """The suite's own timer (CUDA events per run) and statistics: the median ms of fn()."""
    from mamba_decoder.bench.timing import summarize, time_callable

    return round(summarize(time_callable(fn, dev, runs=runs)).median, 4)


class _SDPA(torch.nn.Module):
    """MLA-shaped causal attention of queries q against fixed k, v through one SDPA backend (a
    module, so GraphedForward can capture it)."""

    def __init__(self, backend, k, v):
        super().__init__()
        self.backend, self.k, self.v = backend, k, v

    def forward(self, q):
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel([self.backend]):
            return torch.nn.functional.scaled_dot_product_attention(q, self.k, self.v, is_causal=True)


def sdpa_report():
    """MLA's prefill attention (16 heads, q/k 192, v 128, causal) by SDPA backend: eager host/wall
    ms (launch-bound at small shapes: cuDNN's frontend costs host time) and graphed GPU ms; then
    MLABlock forwards with cuDNN attention on and off."""
    from torch.nn.attention import SDPBackend

    from mamba_decoder.bench.workloads import GraphedForward

    with torch.inference_mode():
        for B, S in [(1, 128), (8, 128), (1, 2048), (8, 2048), (8, 8192)]:
            q, k = (torch.randn(B, 16, S, 192, device=dev, dtype=dt) for _ in range(2))
            v = torch.randn(B, 16, S, 128, device=dev, dtype=dt)
            row = []
            for be in (SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
                attn = _SDPA(be, k, v)
                row.append(f"{be.name} host/wall {host_ms(lambda: attn(q), n=50)} "
                           f"graphed {median_ms(GraphedForward(attn, q))}")
            print(f"sdpa B{B} S{S}: " + "; ".join(row), flush=True)
        with torch.inference_mode(False):   # ordinary parameters: derived() caches only those
            m = build_model("MLABlock", 512, max_seq_len=8192).to(dev, dt).eval()
        for B, L in [(1, 128), (8, 2048)]:
            x = torch.randn(B, L, 512, device=dev, dtype=dt)
            row = []
            for on in (True, False):
                torch.backends.cuda.enable_cudnn_sdp(on)
                row.append(f"cudnn {'on' if on else 'off'} host/wall {host_ms(lambda: m(x), n=50)} "
                           f"graphed {median_ms(GraphedForward(m, x))}")
            torch.backends.cuda.enable_cudnn_sdp(True)
            print(f"MLABlock B{B} L{L}: " + "; ".join(row), flush=True)


def moe_report():
    from mamba_decoder.bench.workloads import GraphedForward
    from mamba_decoder.models.moe import MoE

    moe = MoE(512, 6, 2, backend="fast").to(dev, dt).eval()
    print("T, dense-small eager/graphed ms, grouped eager/graphed ms")
    for T in [8, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]:
        x = torch.randn(1, T, 512, device=dev, dtype=dt)
        row = [T]
        for limit in (10**9, 0):
            moe.policy = KernelPolicy(dense_small_max_tokens=limit)
            with torch.inference_mode():
                row += [median_ms(lambda: moe(x)), median_ms(GraphedForward(moe, x))]
        print(row, flush=True)


if __name__ == "__main__":
    arg = sys.argv[1] if len(sys.argv) > 1 else ""
    {"--host": host_report, "--ops": ops_report, "--moe": moe_report, "--sdpa": sdpa_report}.get(arg, kernel_report)()
