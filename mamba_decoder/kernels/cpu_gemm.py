"""The fast backend's fp32 GEMMs on the CPU: oneDNN instead of MKL.

torch's CPU fp32 matmul calls MKL, which on this project's AMD EPYC (Zen 5, AVX-512) machine
ran 2-8x below oneDNN's fp32 GEMM at the blocks' shapes, interleaved in one process, 2 threads
(e.g. (8192, 512) x (512, 2048): 45-49 vs 83-91 GFLOP/s; both true fp32: 2.4e-7 / 4.1e-7
relative error against fp64). oneDNN is the library torch already uses for bf16 CPU GEMMs; its
fp32 linear is reachable on dense tensors as `torch.ops.mkldnn._linear_pointwise` (what
torch.compile's CPU backend emits). `linear` takes it for fp32 CPU inference with at least
MIN_ROWS rows and MIN_MACS multiply-adds (below that MKL's small-matrix path is as fast and runs
on one thread, where a 2-thread oneDNN call can stall a scheduler tick whenever another process
holds a core; decode steps stay as they were), and F.linear everywhere else: other devices and dtypes, and with autograd (the op has no
backward). Whether it runs is probed once per process against F.linear.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

MIN_ROWS = 16
MIN_MACS = 1 << 24   # ~0.3 ms at 100 GFLOP/s


@functools.lru_cache(maxsize=None)
def onednn_available() -> bool:
    """Whether this torch has oneDNN's fp32 linear on dense CPU tensors and it agrees with F.linear."""
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(s, generator=g) for s in ((32, 24), (40, 24), (40,)))
        return bool(torch.allclose(op(x, w, b, "none", [], ""), F.linear(x, w, b), rtol=1e-4, atol=1e-4))
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def runs_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    rows = x.numel() // max(1, x.shape[-1])
    return rows >= MIN_ROWS and x.numel() * weight.shape[0] >= MIN_MACS and onednn_available()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias): x (..., K), weight (N, K) -> (..., N)."""
    if not runs_onednn(x, weight):
        return F.linear(x, weight, bias)
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    y = torch.ops.mkldnn._linear_pointwise(x2, weight, bias, "none", [], "")
    return y.view(*x.shape[:-1], weight.shape[0])


def kernel_name(device: torch.device, dtype: torch.dtype) -> str:
    """What a record's kernels field says about the fast backend's GEMMs on this device."""
    if torch.device(device).type == "cpu" and dtype == torch.float32 and onednn_available():
        return f"onednn (inference, >= {MIN_ROWS} rows and 2^24 MACs), torch otherwise"
    return "torch"
