"""Residual add + RMSNorm in one pass, the blocks' second norm: (h, n) = (x + y, rms_norm(x + y)).

    h = x + y                                   (rounded to the activations' dtype, as the add is)
    n = h / sqrt(mean(h^2) + eps) * weight      (fp32 inside)

On CUDA in inference one Triton launch (torch's add and rms_norm are two launches, and the
fast out-projections' GEMM + residual a device copy and a GEMM); elsewhere, and with autograd,
the PyTorch ops (`add_rms_norm_torch`, the twin). Launch-bound shapes (batch 1, seq 128) count
these host operations.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import triton_installed

MAX_DIM = 16384          # one row per program, whole in registers


def add_rms_norm_torch(x: torch.Tensor, y: torch.Tensor, weight, eps: float):
    h = x + y
    return h, F.rms_norm(h, (h.shape[-1],), weight, eps)


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, norm: torch.nn.RMSNorm, fused: bool = True,
                 impl: str = "auto"):
    """(x + y, norm(x + y)) for x, y (..., D) of one shape and dtype and an nn.RMSNorm over D.
    `fused=False` (the reference backend) always takes the PyTorch ops. `impl`: "auto" (Triton on
    CUDA), "triton" (also CPU tensors under TRITON_INTERPRET=1: the tests), "torch"."""
    eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
    w = norm.weight
    D = x.shape[-1]
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad or
                                              (w is not None and w.requires_grad))
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"impl={impl!r} is not one of auto, triton, torch")
    use = fused and not needs_grad and x.shape == y.shape and x.dtype == y.dtype and D <= MAX_DIM
    if impl == "auto":
        use = use and x.is_cuda and triton_installed()
    if not use or impl == "torch":
        return add_rms_norm_torch(x, y, w, eps)
    from .rms_norm_triton import add_rms_norm_triton   # imports triton: only when it runs

    return add_rms_norm_triton(x, y, w, eps)
