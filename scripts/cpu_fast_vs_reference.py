"""Fast vs reference backend on this CPU, side by side in one process (issue 3's CPU target).

    python scripts/cpu_fast_vs_reference.py   # 2 threads, fp32, batch 4, seq 512, dim 512
"""
import torch

from mamba_decoder.bench.registry import MODELS, build_model
from mamba_decoder.bench.timing import time_callable

torch.set_num_threads(2)
x = torch.randn(4, 512, 512)
for name in MODELS:
    torch.manual_seed(0)
    ref = build_model(name, 512, "reference").eval()
    fast = build_model(name, 512, "fast").eval()
    fast.load_state_dict(ref.state_dict())
    times = {"reference": [], "fast": []}
    with torch.inference_mode():
        ref(x), fast(x)                                   # warm up
        for _ in range(5):                                # interleaved: the same machine state for both
            for label, m in (("reference", ref), ("fast", fast)):
                times[label] += time_callable(lambda: m(x), "cpu", warmup=0, runs=1)   # the suite's timer, ms
    med = {k: sorted(v)[2] for k, v in times.items()}
    print(f"{name:18s} reference {med['reference']:7.0f} ms  fast {med['fast']:7.0f} ms  "
          f"speedup {med['reference'] / med['fast']:.2f}x")
