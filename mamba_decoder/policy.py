"""The kernel policy: which implementation each op of the fast backend takes.

A block takes one at construction (`policy=`; the default is `KernelPolicy()`, all "auto") or
gets one later with `models.set_kernel_policy`. `decide(device, dtype, grad)` turns it into a
`KernelDecision` once per (device, dtype, grad) (cached: the limits in kernels.moe are read
when a decision is first made); the forward and `kernel_choice()` (what a record's `kernels`
field says) read that same decision.

Choices: "auto" takes the Triton kernel on CUDA where triton is installed and PyTorch ops
elsewhere; "triton" forces the kernel (CPU tensors need TRITON_INTERPRET=1, which the tests
use; where it cannot run the kernel fails loudly); "torch" never takes it. Kernels without a
backward never run with autograd on, whatever the policy says.

On the CPU, `cpu_kernels` ("auto" or "torch") decides the fast backend's fp32 inference kernels
besides the scan: oneDNN GEMMs (kernels/cpu_gemm.py, also the MoE's experts, one GEMM pair per
expert over sorted rows), and the C passes of kernels/cpu_fused.py (Mamba's conv + SiLU, RMSNorm,
the MoE's SwiGLU rows). "auto" takes them where they load (fp32, CPU, no autograd), "torch" never.
MLA's causal prefill on fp32 CPU inference runs in query blocks through oneDNN GEMMs
(`cpu_attention`, kernels/cpu_attention.py) where the call is large enough; otherwise SDPA, with V
padded to Dqk on the CPU (`mla_pad_v`) so that it runs its CPU flash kernel instead of its math
path (which materializes the scores): the padded columns are exact zeros.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import Literal, Optional

import torch

from .kernels import cpu_attention, cpu_fused, cpu_gemm, triton_runs
from .kernels import moe as moe_kernels
from .kernels.selective_scan import auto_impl as scan_impl

IMPLS = ("auto", "triton", "torch")
LAYOUTS = ("BLD", "BDL")
Impl = Literal["auto", "triton", "torch"]
CPU_IMPLS = ("auto", "torch")


@dataclass(frozen=True)
class KernelPolicy:
    mamba_fused: Impl = "auto"        # Mamba's conv + SiLU (channel-major forward) and one-token step
    mamba_layout: Optional[Literal["BLD", "BDL"]] = None   # None: BDL on CUDA, BLD elsewhere (NOTES.md)
    moe_triton: Impl = "auto"         # the MoE's SwiGLU and router passes (kernels.moe)
    dense_small_max_tokens: Optional[int] = None   # None: kernels.moe's limit per device; 0: never
    mla_prologue: Impl = "auto"       # MLA's multi-token RoPE / latent norm / rope key in one launch
    mla_decode: Impl = "auto"         # one-token attention over the latent cache (torch: SDPA)
    cpu_kernels: Literal["auto", "torch"] = "auto"   # oneDNN GEMMs and C passes, fp32 CPU inference

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "mamba_layout":
                ok, accepted = v is None or v in LAYOUTS, "None, " + ", ".join(LAYOUTS)
            elif f.name == "dense_small_max_tokens":
                ok = v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0)
                accepted = "None or an integer >= 0"
            elif f.name == "cpu_kernels":
                ok, accepted = v in CPU_IMPLS, ", ".join(CPU_IMPLS)
            else:
                ok, accepted = v in IMPLS, ", ".join(IMPLS)
            if not ok:
                raise ValueError(f"{f.name}={v!r} is not one of: {accepted}")

    def decide(self, device, dtype: Optional[torch.dtype] = None, grad: bool = False) -> "KernelDecision":
        device = device if isinstance(device, torch.device) else torch.device(device)
        return _decide(self, device, dtype, bool(grad))   # forwards call this: a cache lookup


@dataclass(frozen=True)
class KernelDecision:
    """What runs on one (device, dtype, grad)."""

    device: torch.device
    dtype: Optional[torch.dtype]
    scan: str                    # selective scan: "triton" on CUDA, "cpu-compiled" (C) or "cpu" (torch) elsewhere
    mamba_fused: bool            # Triton conv + SiLU in the channel-major forward
    mamba_step: bool             # Triton one-token step (no backward)
    mamba_layout: str            # "BDL" (channel-major) or "BLD"
    moe_triton: bool             # Triton SwiGLU and router passes (no backward)
    moe_swiglu_train: bool       # Triton SwiGLU forward + backward passes in the training MoE's Function
    dense_small_max_tokens: int  # dense-small MoE up to this many tokens
    mla_prologue: bool           # Triton prefill prologue (no backward)
    mla_decode: bool             # Triton split-K one-token attention (no backward)
    cpu_gemm: bool = False       # fp32 CPU GEMMs through oneDNN, MoE experts too (no backward)
    cpu_fused: bool = False      # C conv + SiLU, RMSNorm, SwiGLU rows on fp32 CPU (no backward)
    mla_pad_v: bool = False      # MLA prefill SDPA with V padded to Dqk (the CPU flash kernel)
    cpu_attention: bool = False  # MLA causal prefill in query blocks through oneDNN on fp32 CPU (no backward)

    @functools.cached_property
    def moe(self) -> str:
        """Routed experts above the dense-small limit: grouped_mm, dense, or on the CPU with
        cpu_gemm "onednn-experts" (the grouped path's sort and gather, each expert's rows through
        oneDNN: torch._grouped_mm loops over MKL GEMMs there). Found on first use
        (it probes the device once), so a block without a MoE never probes, even under compile."""
        if self.dtype is None or (self.device.type == "cuda" and not torch.cuda.is_available()):
            return "n/a"   # no dtype, or a device this process cannot see
        impl = moe_kernels.auto_impl(self.device, self.dtype)
        return "onednn-experts" if impl == "grouped_mm" and self.cpu_gemm else impl


@functools.lru_cache(maxsize=None)
def _decide(p: KernelPolicy, device: torch.device, dtype: Optional[torch.dtype], grad: bool) -> KernelDecision:
    fused = triton_runs(p.mamba_fused, device)
    cpu = p.cpu_kernels == "auto" and device.type == "cpu" and not grad
    dense_small = (moe_kernels.dense_small_max_tokens(device, grad) if p.dense_small_max_tokens is None
                   else p.dense_small_max_tokens)
    return KernelDecision(
        device=device, dtype=dtype,
        scan=scan_impl(device) if device.type in ("cpu", "cuda") else "cpu",
        mamba_fused=fused, mamba_step=fused and not grad,
        mamba_layout=p.mamba_layout or ("BDL" if device.type == "cuda" else "BLD"),
        moe_triton=triton_runs(p.moe_triton, device) and not grad,
        moe_swiglu_train=triton_runs(p.moe_triton, device),
        dense_small_max_tokens=dense_small,
        mla_prologue=triton_runs(p.mla_prologue, device) and not grad,
        mla_decode=triton_runs(p.mla_decode, device) and not grad,
        cpu_gemm=cpu and cpu_gemm.usable(device, dtype),
        cpu_fused=cpu and cpu_fused.usable(device, dtype),
        mla_pad_v=device.type == "cpu",
        cpu_attention=cpu and cpu_attention.usable(device, dtype))


DEFAULT_POLICY = KernelPolicy()


# ---------------------------------------------------------------- sizes a kernel cannot take
# Where a block's hyperparameters rule a Triton kernel out, the op takes its PyTorch path and the
# block's kernel_choice (the record's `kernels`) names why. The other sizes the kernels take as
# they come: any d_state (the scan's lanes are fitted to it, triton_bdl._lane_tile), any expert
# count and top-k (the MoE's fused router runs up to kernels.moe.FUSED_ROUTER_MAX_EXPERTS experts
# and top-FUSED_ROUTER_MAX_TOPK, else torch's topk: kernel_choice's "router"), any head count.
# Dense-small runs every expert on every token: (E + 1) / (k + 1) times the routed FLOPs, and it
# reads every expert's weights. Its limits (kernels.moe) were tuned at the suite's 6 experts top-2
# (7/3); a MoE whose excess is above this takes the grouped path at every token count (unless the
# policy sets dense_small_max_tokens itself): at DeepSeek-V3's 256 experts top-8 dense-small would
# compute 28x the routed work and read 22 GB of weights per decoding step.
DENSE_SMALL_MAX_EXCESS = 4.0


def moe_dense_small_limit(policy: KernelPolicy, decision: KernelDecision, n_experts: int, top_k: int) -> int:
    """The token count up to which a MoE of this size takes dense-small (0: never)."""
    if policy.dense_small_max_tokens is None and dense_small_excess(n_experts, top_k) > DENSE_SMALL_MAX_EXCESS:
        return 0
    return decision.dense_small_max_tokens


def dense_small_excess(n_experts: int, top_k: int) -> float:
    return (n_experts + 1) / (top_k + 1)


def mla_triton_unfit(qk_rope_head_dim: int) -> Optional[str]:
    """Why MLA's Triton prologue and split-K decode cannot take this head shape (None: they can)."""
    if qk_rope_head_dim & (qk_rope_head_dim - 1):
        return f"qk_rope_dim {qk_rope_head_dim} is not a power of two, which the Triton MLA prologue needs: torch ops"
    return None
