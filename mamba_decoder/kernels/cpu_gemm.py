"""The fast backend's fp32 GEMMs on the CPU: oneDNN instead of MKL.

torch's CPU fp32 matmul calls MKL, which on this project's AMD EPYC (Zen 5, AVX-512) machine ran
2-3x below oneDNN's fp32 GEMM at the blocks' shapes, interleaved in one process, 2 threads
((8192, 512) x (512, 2048): 41-56 vs 99-123 GFLOP/s on 2026-12-07; both true fp32). oneDNN is
the library torch already uses for bf16 CPU GEMMs; its fp32 linear is reachable on dense tensors
as `torch.ops.mkldnn._linear_pointwise` (what torch.compile's CPU backend emits).

Whether a block may take it is the kernel policy's decision (`KernelDecision.cpu_gemm`: fp32 on
the CPU, no autograd, oneDNN present); `linear(..., onednn=True)` then takes it for GEMMs of at
least MIN_ROWS rows and MIN_MACS multiply-adds. Below that MKL runs small products on one thread,
while a 2-thread oneDNN call stalls a scheduler tick (~8 ms) whenever another process holds a
core (the README example, dim 128 B1 L32, measured 33 ms with oneDNN GEMMs, 2.2 ms without).
Everything else (other devices and dtypes, autograd: the op has no backward) is F.linear.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

MIN_ROWS = 16
MIN_MACS = 1 << 24   # ~0.3 ms at 100 GFLOP/s


@functools.lru_cache(maxsize=None)
def onednn_available() -> bool:
    """Whether this torch has oneDNN's fp32 linear on dense CPU tensors and it agrees with F.linear
    (probed once per process, at a tiny size)."""
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(s, generator=g) for s in ((32, 24), (40, 24), (40,)))
        with torch.inference_mode():
            return bool(torch.allclose(op(x, w, b, "none", [], ""), F.linear(x, w, b), rtol=1e-4, atol=1e-4))
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def usable(device: torch.device, dtype) -> bool:
    """Whether fp32 oneDNN GEMMs can serve tensors of this device and dtype (for the policy)."""
    return device.type == "cpu" and dtype == torch.float32 and onednn_available()


def runs_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear(x, weight, onednn=True)` takes oneDNN: fp32 CPU tensors, no autograd
    through them, at least MIN_ROWS rows and MIN_MACS multiply-adds."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    rows = x.numel() // max(1, x.shape[-1])
    return rows >= MIN_ROWS and x.numel() * weight.shape[0] >= MIN_MACS and onednn_available()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           onednn: bool = False) -> torch.Tensor:
    """F.linear(x, weight, bias): x (..., K), weight (N, K) -> (..., N); through oneDNN where
    `onednn` (the policy's cpu_gemm) and `runs_onednn` allow."""
    if not (onednn and runs_onednn(x, weight)):
        return F.linear(x, weight, bias)
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    y = torch.ops.mkldnn._linear_pointwise(x2, weight, bias, "none", [], "")
    return y.view(*x.shape[:-1], weight.shape[0])


KERNEL_NAME = f"onednn (inference, >= {MIN_ROWS} rows and 2^{MIN_MACS.bit_length() - 1} MACs), torch otherwise"
