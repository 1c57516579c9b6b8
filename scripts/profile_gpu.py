"""Where the fast blocks' time goes on the GPU: the top CUDA kernels of one forward (bf16, B8 L2048)."""
import torch
from torch.profiler import ProfilerActivity, profile

from mamba_decoder.bench.registry import MODELS, build_model

dev = torch.device("cuda")
x = torch.randn(8, 2048, 512, device=dev, dtype=torch.bfloat16)
for name in MODELS:
    m = build_model(name, 512, max_seq_len=2048).to(dev, torch.bfloat16).eval()
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
