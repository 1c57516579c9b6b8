"""Mamba-1 selective scan kernels.

impl names:
  "reference": sequential fp32 loop (ground truth, slow)
  "cpu":       chunked torch path (fast on CPU, works on any device)
  "triton":    Triton kernels, fused forward + chunk-recomputing Triton backward (CUDA, or CPU
               tensors under TRITON_INTERPRET=1)
  "auto":      "triton" for CUDA tensors, "cpu" for CPU tensors
"""

from __future__ import annotations

import os

import torch

from .cpu import selective_scan_cpu
from .reference import selective_scan_pscan, selective_scan_ref

__all__ = ["selective_scan", "selective_scan_ref", "selective_scan_pscan", "selective_scan_cpu",
           "available_impls", "auto_impl"]

_IMPLS = ("reference", "cpu", "triton")


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def available_impls(device) -> list[str]:
    """Impls that can run on tensors of `device`."""
    device = torch.device(device)
    impls = ["reference", "cpu"]
    if _triton_importable() and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        impls.append("triton")
    return impls


def auto_impl(device) -> str:
    """The impl that impl="auto" picks for tensors on `device`."""
    device = torch.device(device)
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu":
        return "cpu"
    raise ValueError(f"selective_scan: no auto impl for device type {device.type!r}")


def _validate(x, dt, A, B, C, D, z, dt_bias, initial_state):
    if x.dim() != 3:
        raise ValueError(f"x must be (B, L, ED), got shape {tuple(x.shape)}")
    Bsz, L, ED = x.shape
    if dt.shape != x.shape:
        raise ValueError(f"dt shape {tuple(dt.shape)} != x shape {tuple(x.shape)}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"z shape {tuple(z.shape)} != x shape {tuple(x.shape)}")
    if A.dim() != 2 or A.shape[0] != ED:
        raise ValueError(f"A must be (ED={ED}, N), got {tuple(A.shape)}")
    N = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.shape != (Bsz, L, N):
            raise ValueError(f"{name} must be (B, L, N)={(Bsz, L, N)}, got {tuple(t.shape)}")
    for name, t in (("D", D), ("dt_bias", dt_bias)):
        if t is not None and t.shape != (ED,):
            raise ValueError(f"{name} must be (ED,)=({ED},), got {tuple(t.shape)}")
    if initial_state is not None and initial_state.shape != (Bsz, ED, N):
        raise ValueError(f"initial_state must be (B, ED, N)={(Bsz, ED, N)}, "
                         f"got {tuple(initial_state.shape)}")
    devs = {t.device for t in (x, dt, A, B, C, D, z, dt_bias, initial_state) if t is not None}
    if len(devs) != 1:
        raise ValueError(f"selective_scan: all tensors must be on one device, got {devs}")


def selective_scan(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True,
                   initial_state=None, return_final_state=False, impl="auto"):
    """Mamba-1 selective scan.

    x, dt, z: (B, L, ED); A: (ED, N) fp32 (already negative, = -exp(A_log)); B, C: (B, L, N)
    (may be NON-contiguous slices of a (B, L, R+2N) tensor: read by stride, not copied);
    D, dt_bias: (ED,); initial_state: (B, ED, N) fp32.
    delta = softplus(dt + dt_bias); h_t = exp(delta_t A) h_{t-1} + delta_t B_t x_t;
    y_t = h_t C_t + D x_t; out = y * silu(z).
    Returns out (B, L, ED) in x.dtype, and if return_final_state also the final state
    (B, ED, N) fp32. impl: "auto" | "reference" | "cpu" | "triton"; "auto" = triton on CUDA
    tensors, cpu on CPU tensors. An impl that can't run the inputs raises ValueError (no silent
    fallback).
    """
    _validate(x, dt, A, B, C, D, z, dt_bias, initial_state)
    if impl == "auto":
        impl = auto_impl(x.device)
    kw = dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, initial_state=initial_state,
              return_final_state=return_final_state)
    if impl == "reference":
        return selective_scan_ref(x, dt, A, B, C, **kw)
    if impl == "cpu":
        return selective_scan_cpu(x, dt, A, B, C, **kw)
    if impl == "triton":
        if not _triton_importable():
            raise ValueError("selective_scan impl='triton': triton is not importable")
        from .triton_scan import selective_scan_triton  # raises ValueError on non-CUDA tensors
        return selective_scan_triton(x, dt, A, B, C, **kw)
    raise ValueError(f"selective_scan: unknown impl {impl!r}; expected 'auto' or one of {_IMPLS}")
