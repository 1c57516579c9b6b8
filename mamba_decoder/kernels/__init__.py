"""Kernels: one file or folder per op, each with its reference twin. Triton kernels live in
modules imported only when they run; this package itself never imports triton."""
from __future__ import annotations

import functools
import importlib.util
import warnings
from typing import Optional

import torch


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    """Whether triton can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def triton_runs(choice: str, device) -> bool:
    """Whether an op set to `choice` takes its Triton kernel for tensors on `device` (a
    torch.device): "auto" on CUDA where triton is installed; "triton" always (forced: CPU tensors
    need TRITON_INTERPRET=1, and the kernel fails loudly where it cannot run); "torch" never."""
    if choice == "auto":
        return device.type == "cuda" and triton_installed()
    if choice in ("triton", "torch"):
        return choice == "triton"
    raise ValueError(f"kernel choice {choice!r} is not one of: auto, triton, torch")


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype autocast runs GEMMs in on `device`'s type, or None where autocast is off there.
    A hand-written autograd Function (the fused mixer's, the training MoE's) casts its GEMM
    operands to it itself and runs its forward with autocast off: its backward runs outside
    autocast and would otherwise meet fp32 weights and bf16 activations in one GEMM. Autograd
    casts the gradients it returns back to each input's dtype."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def alert_not_deterministic(what: str) -> None:
    """PyTorch's contract for `torch.use_deterministic_algorithms(True)`, kept by the Triton
    backwards that add gradients atomically (their last bits vary run to run, as mamba_ssm's do):
    under it they raise, or warn with warn_only=True, as torch's own such ops do."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    msg = (f"{what} does not have a deterministic implementation (it adds gradients atomically), "
           "but you set 'torch.use_deterministic_algorithms(True)': use backend='reference', or "
           "warn_only=True if run-to-run differences in the last bits are acceptable")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(msg, stacklevel=3)
    else:
        raise RuntimeError(msg)
