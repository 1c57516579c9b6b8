"""Where the fast blocks' time goes on the GPU (bf16, dim 512).

python scripts/profile_gpu.py           the top CUDA kernels of one forward at batch 8, seq 2048
python scripts/profile_gpu.py --host    host time of eager forwards at batch 1, seq 128 (launch-bound):
                                        per block and per part, host-only vs wall, syncs, and the
                                        Python profile of one selective-scan call
"""
import cProfile
import pstats
import sys
import time
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

from mamba_decoder.bench.registry import MODELS, build_model
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


def kernel_report():
    x = torch.randn(8, 2048, 512, device=dev, dtype=dt)
    for name in MODELS:
        m = build_model(name, 512, max_seq_len=2048).to(dev, dt).eval()
        with torch.inference_mode():
            for _ in range(3):
                m(x)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as p:
                for _ in range(5):
                    m(x)
                torch.cuda.synchronize()
        print(f"\n### {name} (fast, bf16, B8 L2048): CUDA time per forward by kernel (5 forwards)")
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    host_report() if "--host" in sys.argv[1:] else kernel_report()
