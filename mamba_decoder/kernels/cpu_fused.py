"""Three memory-bound passes of the fast backend on the CPU, compiled with the scan
(`cpu_kernels.c`, built at first use by `cpu_native`); fp32 CPU tensors, inference (no backward).
Whether a block takes them is the kernel policy's decision (`KernelDecision.cpu_fused`); `runs`
is the per-call check (no autograd through the tensors, unit last stride).

- `causal_conv1d_silu_bld`: Mamba's causal depthwise conv + SiLU in the (B, L, ED) layout the CPU
  path runs, reading x (a strided half of in_proj's output) in place. Its twin is
  `kernels.causal_conv.causal_conv1d_silu_torch` on the transposed view.
- `rms_norm_cpu`: RMSNorm over the last axis in one pass (torch's composite takes four); twin
  `F.rms_norm`.
- `swiglu_rows_cpu`: the MoE's silu(h1) * h3 * row scale in one pass over h13 = [h1 | h3], the
  twin of `kernels.moe.swiglu_rows`'s torch ops (three passes, two of them over strided halves).
"""
from __future__ import annotations

import torch

from . import cpu_native


def usable(device: torch.device, dtype) -> bool:
    """Whether these kernels can serve tensors of this device and dtype (for the policy; builds
    the library on first call)."""
    return device.type == "cpu" and dtype == torch.float32 and cpu_native.available()[0]


def runs(x: torch.Tensor, *params: torch.Tensor) -> bool:
    """Whether a call on x (and these parameters) can take the compiled kernels: fp32 CPU, no
    autograd through them, unit stride along the last axis."""
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return False
    return x.stride(-1) == 1 and usable(x.device, x.dtype)


def causal_conv1d_silu_bld(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (B, L, ED) with unit stride along ED; weight (ED, 1, K) or (ED, K); bias (ED,) or None ->
    silu(causal conv) (B, L, ED) contiguous fp32."""
    Bsz, L, ED = x.shape
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.stride(2) != 1:
        raise ValueError(f"causal_conv1d_silu_bld takes fp32 CPU (B, L, ED) with unit ED stride, got "
                         f"{x.dtype} {x.device} strides {x.stride()}")
    w = weight.reshape(ED, -1)
    K = w.shape[1]
    wT = w.t().float().contiguous()                                           # (K, ED)
    b = bias.float().contiguous() if bias is not None else x.new_zeros(ED)
    out = x.new_empty(Bsz, L, ED)
    fn = cpu_native.load().causal_conv_silu
    # (batch, channel range) tasks, ranges multiples of 16 channels, >= 4 tasks per thread
    step = max(16, -(-ED // max(1, -(-4 * torch.get_num_threads() // Bsz))) // 16 * 16)
    cpu_native.run_tasks(lambda bb, d0, d1: fn(x.data_ptr(), x.stride(0), x.stride(1), wT.data_ptr(),
                                                b.data_ptr(), out.data_ptr(), L, ED, K, bb, d0, d1),
                         [(bb, d, min(d + step, ED)) for bb in range(Bsz) for d in range(0, ED, step)])
    return out


def swiglu_rows_cpu(h13: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """h13 (M, 2I) contiguous fp32 -> silu(h13[:, :I]) * h13[:, I:] * scale[:, None] (M, I)."""
    M, I2 = h13.shape
    if h13.dtype != torch.float32 or h13.device.type != "cpu" or not h13.is_contiguous():
        raise ValueError(f"swiglu_rows_cpu takes contiguous fp32 CPU rows, got {h13.dtype} {h13.device}")
    s = scale.float().contiguous() if scale is not None else None
    out = h13.new_empty(M, I2 // 2)
    fn = cpu_native.load().swiglu_rows
    rows = max(1, -(-M // (4 * torch.get_num_threads())))
    cpu_native.run_tasks(lambda r0, r1: fn(h13.data_ptr(), None if s is None else s.data_ptr(),
                                           out.data_ptr(), I2 // 2, r0, r1),
                         [(r, min(r + rows, M)) for r in range(0, M, rows)])
    return out


def rms_norm_cpu(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x (..., D) fp32 CPU, unit stride along D -> x * rsqrt(mean(x^2, -1) + eps) * weight, contiguous."""
    D = x.shape[-1]
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.stride(-1) != 1:
        raise ValueError(f"rms_norm_cpu takes fp32 CPU rows with unit stride, got {x.dtype} {x.device} "
                         f"strides {x.stride()}")
    x2 = x.reshape(-1, D)
    w = weight.float().contiguous() if weight is not None else None
    out = x.new_empty(x2.shape)
    M = x2.shape[0]
    fn = cpu_native.load().rms_norm_rows
    rows = max(1, -(-M // (4 * torch.get_num_threads())))
    cpu_native.run_tasks(lambda r0, r1: fn(x2.data_ptr(), x2.stride(0), None if w is None else w.data_ptr(),
                                           float(eps), out.data_ptr(), D, r0, r1),
                         [(r, min(r + rows, M)) for r in range(0, M, rows)])
    return out.view(x.shape)
