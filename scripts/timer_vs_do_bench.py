"""Our timer against triton.testing.do_bench on the same CUDA callables (median ms, agreement)."""
import torch
from triton.testing import do_bench

from mamba_decoder.bench.registry import build_model
from mamba_decoder.bench.timing import summarize, time_callable

dev = torch.device("cuda")
for name, (B, L) in [("MambaDecoderBlock", (8, 2048)), ("MLABlock", (8, 2048)), ("Regular Mamba", (1, 128))]:
    m = build_model(name, 512, max_seq_len=L).to(dev, torch.bfloat16).eval()
    x = torch.randn(B, L, 512, device=dev, dtype=torch.bfloat16)

    def fn():
        with torch.inference_mode():
            m(x)

    ours = summarize(time_callable(fn, dev, warmup=10, runs=100)).median
    theirs = do_bench(fn, warmup=50, rep=300, return_mode="median")
    print(f"{name:18s} B{B} L{L}: ours {ours:.4f} ms  do_bench {theirs:.4f} ms  "
          f"ratio {ours / theirs:.3f}  ({'within' if abs(ours / theirs - 1) <= 0.05 else 'OUTSIDE'} 5%)")
