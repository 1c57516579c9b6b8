"""Time the Triton MLA decode attention alone at the benchmark's size (bf16, batch 8, 16 heads,
latent 512, rope 64, cache of 8192 + 64) over a few tile / split configs, at lengths 512, 2048,
8192. Bytes read at length n: 8 * n * 576 * 2. python scripts/tune_mla_decode.py"""
import json

import torch

from mamba_decoder.kernels import mla_decode as md

B, H, C, R, T = 8, 16, 512, 64, 8192 + 64
dev = torch.device("cuda")
q_lat = torch.randn(B, H, C, device=dev, dtype=torch.bfloat16)
q_pe = torch.randn(B, H, R, device=dev, dtype=torch.bfloat16)
kv = torch.randn(B, T, C, device=dev, dtype=torch.bfloat16)
pe = torch.randn(B, T, R, device=dev, dtype=torch.bfloat16)
CONFIGS = [{}, dict(BLOCK_T=64), dict(num_warps=8), dict(BLOCK_T=64, num_warps=8),
           dict(PROGRAMS_PER_SM=4), dict(PROGRAMS_PER_SM=4, BLOCK_T=64), dict(num_stages=3),
           dict(MIN_SPLIT=256), dict(PROGRAMS_PER_SM=1)]


def time_ms(fn, iters=200):
    g = torch.cuda.CUDAGraph()            # replay a graph of `iters` calls: no launch overhead
    fn()
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        for _ in range(iters):
            fn()
    g.replay()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    g.replay()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / iters


for n in (512, 2048, 8192):
    length = torch.tensor([n], device=dev)
    for cfg in CONFIGS:
        try:
            ms = time_ms(lambda: md.mla_decode(q_lat, q_pe, kv, pe, length, 0.07, config=cfg))
        except Exception as e:  # a config that does not compile
            print(json.dumps(dict(length=n, cfg=cfg, error=str(e)[:150])), flush=True)
            continue
        print(json.dumps(dict(length=n, cfg=cfg, us=round(ms * 1e3, 2),
                              GBps=round(B * n * (C + R) * 2 / ms / 1e6, 1),
                              plan=md.split_plan(B, T, 1, dev, {**md.CONFIG, **cfg}))), flush=True)
