"""The Triton kernel of `kernels.rms_norm.add_rms_norm` (imported only when it runs)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(X, Y, W, H, N, D, s_x, s_y, eps, HAS_W: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < D
    x = tl.load(X + r * s_x + offs, mask=ok, other=0.0).to(tl.float32)
    y = tl.load(Y + r * s_y + offs, mask=ok, other=0.0).to(tl.float32)
    h = (x + y).to(H.dtype.element_ty)
    tl.store(H + r * D + offs, h, mask=ok)
    hf = h.to(tl.float32)
    n = hf / tl.sqrt(tl.sum(hf * hf, axis=0) / D + eps)
    if HAS_W:
        n = n * tl.load(W + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(N + r * D + offs, n.to(N.dtype.element_ty), mask=ok)


def _rows(t: torch.Tensor, D: int) -> torch.Tensor:
    """t (..., D) as (M, D) rows of unit column stride, without a copy where the strides allow."""
    t = t if t.stride(-1) == 1 else t.contiguous()
    try:
        return t.view(-1, D)
    except RuntimeError:
        return t.reshape(-1, D)


def add_rms_norm_triton(x: torch.Tensor, y: torch.Tensor, weight, eps: float):
    D = x.shape[-1]
    xr, yr = _rows(x, D), _rows(y, D)
    h = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    n = torch.empty_like(h)
    w = weight if weight is not None else xr
    _add_rms_norm_kernel[(xr.shape[0],)](
        xr, yr, w.contiguous(), h, n, D, xr.stride(0), yr.stride(0), float(eps),
        HAS_W=weight is not None, BLOCK=triton.next_power_of_2(D), num_warps=4)
    return h, n
