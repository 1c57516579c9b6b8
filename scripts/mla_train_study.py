"""Where an MLABlock / MambaDecoderBlock train step's time goes on the GPU (bf16, dim 512), and
which SDPA backend trains MLA's attention fastest.

python scripts/mla_train_study.py    one JSON line per measurement:
  sdpa_train: MLA-shaped causal attention (16 heads, q/k 192, v 128) forward + backward by SDPA
              backend (the default choice, cuDNN, memory-efficient, flash with v padded to 192),
              with each one's error against fp32 math
  join_ab:    an MLABlock train step with its per-head q/k joined by torch.cat (A) or by
              kernels.attention.join_last (B), interleaved A, B, A, B in one process
  --train-ms: only MLABlock's train-step median at B8 L2048 / L8192 (for an A/B of two trees run
              as alternating processes: python3 scripts/mla_train_study.py --train-ms NAME, with PYTHONPATH at each tree)
  profile:    the top CUDA kernels of one train step of each block at B8 L2048 and L8192
"""
import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from mamba_decoder.bench.registry import build_model
from mamba_decoder.bench.timing import summarize, time_callable
from mamba_decoder.bench.workloads import TrainStep

dev, dt = torch.device("cuda"), torch.bfloat16


def emit(**kv):
    print(json.dumps(kv), flush=True)


def attention(q, k, v, backend):
    if backend == "flash-pad":
        vp = F.pad(v, (0, q.shape[-1] - v.shape[-1]))
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, vp, is_causal=True)[..., :v.shape[-1]]
    if backend == "default":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    with sdpa_kernel([getattr(SDPBackend, backend)]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def sdpa_train():
    for B, S in [(8, 2048), (8, 8192), (1, 8192)]:
        q, k = (torch.randn(B, 16, S, 192, device=dev, dtype=dt, requires_grad=True) for _ in range(2))
        v = torch.randn(B, 16, S, 128, device=dev, dtype=dt, requires_grad=True)
        g = torch.randn(B, 16, S, 128, device=dev, dtype=dt)
        ref = None
        if S <= 2048:
            q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
            with sdpa_kernel([SDPBackend.MATH]):
                o = F.scaled_dot_product_attention(q32, k32, v32, is_causal=True)
            o.backward(g.float())
            ref = [o.detach(), q32.grad, k32.grad, v32.grad]
        for be in ["default", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "flash-pad"]:
            def step():
                q.grad = k.grad = v.grad = None
                attention(q, k, v, be).backward(g)
            try:
                ms = summarize(time_callable(step, dev, warmup=3, runs=10)).median
                err = None
                if ref is not None:
                    q.grad = k.grad = v.grad = None
                    o = attention(q, k, v, be)
                    o.backward(g)
                    err = [round(((a.float() - b).norm() / b.norm()).item(), 5)
                           for a, b in zip([o, q.grad, k.grad, v.grad], ref)]
                emit(kind="sdpa_train", B=B, S=S, backend=be, ms=round(ms, 3), rel_err_o_dq_dk_dv=err)
            except Exception as e:  # a backend that does not take this shape
                emit(kind="sdpa_train", B=B, S=S, backend=be, error=f"{type(e).__name__}: {str(e)[:200]}")


def join_ab(rounds=6):
    from mamba_decoder.kernels import attention

    join = attention.join_last

    def cat(a, b):
        return torch.cat([a, b.expand(*a.shape[:-1], b.shape[-1])], dim=-1)

    for L in [2048, 8192]:
        m = build_model("MLABlock", 512, backend="fast", max_seq_len=L).to(dev, dt)
        step = TrainStep(m, torch.randn(8, L, 512, device=dev, dtype=dt))
        ms = {"cat": [], "join_last": []}
        for _ in range(rounds):
            for name, fn in (("cat", cat), ("join_last", join)):
                attention.join_last = fn
                ms[name] += time_callable(step, dev, warmup=2, runs=5)
        attention.join_last = join
        med = {k: round(summarize(v).median, 3) for k, v in ms.items()}
        emit(kind="join_ab", model="MLABlock", B=8, L=L, train_ms=med,
             ratio=round(med["join_last"] / med["cat"], 3))
        del m, step
        torch.cuda.empty_cache()


def profile_steps():
    for name in ["MLABlock", "MambaDecoderBlock"]:
        for L in [2048, 8192]:
            m = build_model(name, 512, backend="fast", max_seq_len=L).to(dev, dt)
            step = TrainStep(m, torch.randn(8, L, 512, device=dev, dtype=dt))
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
            rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
            total = sum(e.self_device_time_total for e in rows) / 3e3
            top = [(e.key[:70], round(e.self_device_time_total / 3e3, 3)) for e in
                   sorted(rows, key=lambda e: -e.self_device_time_total)[:14]]
            emit(kind="profile", model=name, B=8, L=L, gpu_ms_per_step=round(total, 3), top_self_ms=top)
            del m, step
            torch.cuda.empty_cache()


if __name__ == "__main__":
    print(torch.__version__, torch.backends.cudnn.version(), file=sys.stderr)
    if "--train-ms" in sys.argv:
        for L in [2048, 8192]:
            m = build_model("MLABlock", 512, backend="fast", max_seq_len=L).to(dev, dt)
            step = TrainStep(m, torch.randn(8, L, 512, device=dev, dtype=dt))
            emit(kind="train_ms", model="MLABlock", B=8, L=L, tree=sys.argv[-1],
                 ms=round(summarize(time_callable(step, dev, warmup=3, runs=15)).median, 3))
        sys.exit()
    if "--profile" in sys.argv:
        profile_steps()
        sys.exit()
    if "--ab" in sys.argv:
        join_ab()
        sys.exit()
    sdpa_train()
    profile_steps()
