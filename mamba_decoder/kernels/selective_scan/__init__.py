"""Mamba-1 selective scan kernels.

impl names:
  "reference": sequential fp32 loop (ground truth, slow)
  "cpu":       chunked torch path (fast on CPU, works on any device)
  "cpu-compiled": one loop over time in C (cpu_compiled.py; built at first use with the system
               C compiler), CPU tensors
  "triton":    Triton kernels, fused forward + chunk-recomputing Triton backward (CUDA, or CPU
               tensors under TRITON_INTERPRET=1)
  "auto":      "triton" for CUDA tensors; "cpu-compiled" for CPU tensors, or "cpu" with a warning
               (once) naming why where the C kernels cannot be built
"""

from __future__ import annotations

import os
import warnings

import torch

from .. import cpu_native, triton_installed
from .cpu import selective_scan_cpu
from .reference import selective_scan_pscan, selective_scan_ref

__all__ = ["selective_scan", "selective_scan_ref", "selective_scan_pscan", "selective_scan_cpu",
           "available_impls", "auto_impl"]

_IMPLS = ("reference", "cpu", "cpu-compiled", "triton")
_LAYOUTS = ("BLD", "BDL")




_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def available_impls(device) -> list[str]:
    """Impls that can run on tensors of `device`."""
    device = torch.device(device)
    impls = ["reference", "cpu"]
    if device.type == "cpu" and cpu_native.available()[0]:
        impls.append("cpu-compiled")
    if triton_installed() and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        impls.append("triton")
    return impls


def auto_impl(device) -> str:
    """The impl that impl="auto" picks for tensors on `device`."""
    device = torch.device(device)
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu":
        ok, why = cpu_native.available()
        if not ok:
            _warn_once(f"selective_scan: the compiled CPU scan is unavailable ({why}); "
                       "using the chunked torch scan ('cpu')")
        return "cpu-compiled" if ok else "cpu"
    raise ValueError(f"selective_scan: no auto impl for device type {device.type!r}")


def _validate(x, dt, A, B, C, D, z, dt_bias, initial_state, layout="BLD"):
    if layout not in _LAYOUTS:
        raise ValueError(f"selective_scan: unknown layout {layout!r}; expected one of {_LAYOUTS}")
    if x.dim() != 3:
        raise ValueError(f"x must be 3-D ({layout}), got shape {tuple(x.shape)}")
    if layout == "BLD":
        Bsz, L, ED = x.shape
    else:
        Bsz, ED, L = x.shape
    if dt.shape != x.shape:
        raise ValueError(f"dt shape {tuple(dt.shape)} != x shape {tuple(x.shape)}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"z shape {tuple(z.shape)} != x shape {tuple(x.shape)}")
    if A.dim() != 2 or A.shape[0] != ED:
        raise ValueError(f"A must be (ED={ED}, N), got {tuple(A.shape)}")
    N = A.shape[1]
    bc_shape = (Bsz, L, N) if layout == "BLD" else (Bsz, N, L)
    for name, t in (("B", B), ("C", C)):
        if t.shape != bc_shape:
            raise ValueError(f"{name} must be {'(B, L, N)' if layout == 'BLD' else '(B, N, L)'}"
                             f"={bc_shape}, got {tuple(t.shape)}")
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
                   initial_state=None, return_final_state=False, impl="auto", layout="BLD"):
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

    layout="BDL" (channel-major): x, dt, z and the output are (B, ED, L) and B, C are (B, N, L),
    all with L the contiguous axis (B, C typically slices of one (B, R+2N, L) tensor). The
    triton kernels are channel-major (coalesced along time); reference / cpu are (B, L, ED);
    either runs the other layout on transposed views, without copies.
    """
    _validate(x, dt, A, B, C, D, z, dt_bias, initial_state, layout)
    if impl == "auto":
        impl = auto_impl(x.device)
    kw = dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, initial_state=initial_state,
              return_final_state=return_final_state)
    if impl == "triton":
        if not triton_installed():
            raise ValueError("selective_scan impl='triton': triton is not importable")
        from .triton_bdl import selective_scan_triton_bdl as fn  # raises ValueError off CUDA
        native = "BDL"
    elif impl in ("reference", "cpu"):
        fn = selective_scan_ref if impl == "reference" else selective_scan_cpu
        native = "BLD"
    elif impl == "cpu-compiled":
        from .cpu_compiled import selective_scan_cpu_compiled as fn
        native = "BLD"
    else:
        raise ValueError(f"selective_scan: unknown impl {impl!r}; expected 'auto' or one of {_IMPLS}")
    if layout == native:
        return fn(x, dt, A, B, C, **kw)
    # The other layout: the same kernel on transposed views (every impl reads by stride), the
    # output transposed back. For triton that is slower than channel-major inputs, which the
    # fast mixer produces on CUDA.
    tr = (lambda t: t.transpose(1, 2) if t is not None else None)
    kw["z"] = tr(z)
    res = fn(tr(x), tr(dt), A, tr(B), tr(C), **kw)
    return (tr(res[0]), res[1]) if return_final_state else tr(res)
