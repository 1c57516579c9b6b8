"""Triton SwiGLU over rows: (M, 2I) = [x W1^T | x W3^T] -> silu(h1) * h3 (M, I), optionally
each row scaled (a MoE pair's routing weight). One read of h13, one write; the twin is
`kernels.moe.swiglu_rows`'s PyTorch path. Imported only when it runs (triton is optional)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _swiglu_rows_kernel(H, S, OUT, I, s_hm, s_om, HAS_S: tl.constexpr, BLOCK: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < I
    a = tl.load(H + m * s_hm + offs, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(H + m * s_hm + I + offs, mask=ok, other=0.0).to(tl.float32)
    y = a / (1.0 + tl.exp(-a)) * b
    if HAS_S:
        y = y * tl.load(S + m).to(tl.float32)
    tl.store(OUT + m * s_om + offs, y.to(OUT.dtype.element_ty), mask=ok)


def swiglu_rows_triton(h13: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    M, I2 = h13.shape
    I = I2 // 2
    out = torch.empty(M, I, device=h13.device, dtype=h13.dtype)
    block = min(1024, triton.next_power_of_2(I))
    _swiglu_rows_kernel[(M, triton.cdiv(I, block))](
        h13, scale if scale is not None else h13, out, I, h13.stride(0), out.stride(0),
        HAS_S=scale is not None, BLOCK=block, num_warps=4)
    return out
