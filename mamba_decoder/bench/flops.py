"""Analytic FLOP and byte counts of the blocks, read off a model's own modules.

Conventions (documented in the README):
- A multiply-add is 2 FLOPs. GEMMs, einsums, the depthwise conv and attention are "matmul" FLOPs,
  what `torch.utils.flop_counter` counts; the selective scan's elementwise work (exp(dt*A),
  dt*B*x, the state update) is counted apart as `scan_flops`, 7 FLOPs per (token, channel, state).
- Attention of a causal prefill counts the useful half of the score matrix (S*(S+1)/2 pairs),
  as FlashAttention's papers do; `causal=False` counts the full S*T matrix that an einsum
  reference computes.
- The MoE counts n_activated routed experts per token plus the shared expert and the router.
- Training = forward + backward = 3x the forward's matmul FLOPs (the scan's backward ~2x its forward).

Bytes (`peak_bytes`, what a config needs before it runs): the parameters (in training also their
gradients and, with AdamW, two moments), the input and residual stream, and the largest live set
of one module's tensors (inference) or every module's saved tensors plus the largest transient set
(training). The terms that grow fastest are the reference scan's (B, L, ED, N) temporaries
(mambapy: exp(dt*A), dt*B, dt*B*x, and pscan's two clones padded to a power of two) and the
reference attention's (B, S, H, T) scores (two einsums in the dtype, the fp32 mask and softmax).
The fast backends keep neither (a scan state per channel; a fused attention). It is an estimate
for refusing what cannot fit, not a measurement.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..kernels import cpu_attention
from ..models.mamba import MambaMixer
from ..models.mla import MLA
from ..models.moe import MoE

SCAN_FLOPS_PER_ELEM = 7


@dataclass
class FlopCount:
    matmul: float = 0.0
    scan: float = 0.0

    @property
    def total(self) -> float:
        return self.matmul + self.scan

    def __add__(self, other: "FlopCount") -> "FlopCount":
        return FlopCount(self.matmul + other.matmul, self.scan + other.scan)

    def __mul__(self, k: float) -> "FlopCount":
        return FlopCount(self.matmul * k, self.scan * k)


def mamba_flops(m: MambaMixer, T: int) -> FlopCount:
    c = m.config
    D, ED, N, R, K = c.d_model, c.d_inner, c.d_state, c.dt_rank, c.d_conv
    mm = 2 * T * (D * 2 * ED + ED * (R + 2 * N) + R * ED + ED * D)
    mm += 2 * T * ED * K                       # depthwise conv
    mm += 2 * T * ED * N                       # y = h . C
    return FlopCount(mm, SCAN_FLOPS_PER_ELEM * T * ED * N)


def moe_flops(m: MoE, T: int) -> FlopCount:
    D, E, k = m.dim, m.n_experts, m.n_activated
    return FlopCount(2 * T * (D * E + k * 3 * D * m.expert_inter_dim + 3 * D * m.shared_expert_inter_dim))


def mla_flops(m: MLA, B: int, S: int, T: int | None = None, causal: bool = True, absorb: bool | None = None) -> FlopCount:
    """S queries per sequence attending to T keys (T = S in prefill; T = context in decode)."""
    T = S if T is None else T
    if absorb is None:  # what a cache-less forward runs (the fast backend always expands)
        absorb = m.attn_impl == "absorb" and m.backend == "reference"
    H, D, C, R = m.n_heads, m.dim, m.kv_lora_rank, m.qk_rope_head_dim
    nope, dv, dqk = m.qk_nope_head_dim, m.v_head_dim, m.qk_head_dim
    tok = B * S
    q = D * H * dqk if m.q_lora_rank == 0 else D * m.q_lora_rank + m.q_lora_rank * H * dqk
    mm = 2 * tok * (q + D * (C + R) + H * dv * D)
    pairs = B * (S * (S + 1) // 2 + S * (T - S)) if causal else B * S * T   # (query, key) pairs
    if absorb:
        mm += 2 * tok * H * (nope * C + C * dv)        # query into the latent, latent out to v
        mm += 2 * pairs * H * ((C + R) + C)            # scores over C+R, p @ latent over C
    else:
        mm += 2 * tok * C * H * (nope + dv)            # expand the new keys' latents to K/V
        mm += 2 * pairs * H * (dqk + dv)
    return FlopCount(mm)


def forward_flops(model: nn.Module, batch: int, seq: int, context: int | None = None,
                  causal: bool = True, absorb: bool | None = None) -> FlopCount:
    """FLOPs of one forward over (batch, seq) tokens; `context` = keys attended (default seq);
    `absorb`: MLA attends in the latent space (decoding with a latent cache); None: what a
    cache-less forward of the model's backend runs."""
    total = FlopCount()
    T = batch * seq
    counted: set[int] = set()
    for mod in model.modules():
        if isinstance(mod, MambaMixer):
            total = total + mamba_flops(mod, T)
        elif isinstance(mod, MoE):
            total = total + moe_flops(mod, T)
        elif isinstance(mod, MLA):
            total = total + mla_flops(mod, batch, seq, context, causal, absorb)
        else:
            continue
        counted.update(id(m) for m in mod.modules())
    for mod in model.modules():   # what is left: a language model's head
        if isinstance(mod, nn.Linear) and id(mod) not in counted:
            total = total + FlopCount(2 * T * mod.in_features * mod.out_features)
    return total


def train_flops(model: nn.Module, batch: int, seq: int) -> FlopCount:
    f = forward_flops(model, batch, seq)
    return FlopCount(3 * f.matmul, 3 * f.scan)


def decode_bytes(model: nn.Module, batch: int, context: int, cache_bytes: int, elt: int) -> float:
    """Bytes one decode step must move at least: every weight read once (all experts: with
    batch*k >= n_experts each is touched) and the cache read once, plus the new token's entry."""
    weights = sum(p.numel() for p in model.parameters()) * elt
    return weights + cache_bytes


@dataclass
class MemoryEstimate:
    weights: float = 0.0        # parameters (+ gradients and AdamW moments in training), bytes
    activations: float = 0.0    # the input, residual stream and the peak of one call's tensors, bytes

    @property
    def total(self) -> float:
        return self.weights + self.activations


def _npo2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _module_bytes(mod: nn.Module, B: int, L: int, elt: int, cpu: bool,
                  train: bool = False) -> tuple[float, float]:
    """(live, saved): the bytes one forward of `mod` holds at its peak, and what training keeps of
    them for the backward (the reference scan's and attention's big temporaries included)."""
    T = B * L
    if isinstance(mod, MambaMixer):
        c = mod.config
        ED, N, R = c.d_inner, c.d_state, c.dt_rank
        acts = T * (7 * ED + R + 2 * N) * elt                  # xz, conv, x_proj, dt, y, layout copies
        scan = 0.0
        if mod.backend == "reference":   # (B, L, ED, N): dt*A, exp, dt*B, dt*B*x; pscan's 2 padded clones
            scan = (4 * B * L + 2 * B * _npo2(L)) * ED * N * elt
        return acts + scan, acts + scan
    if isinstance(mod, MoE):
        D, E, k = mod.dim, mod.n_experts, mod.n_activated
        acts = T * (4 * E + elt * (k * 3 * mod.expert_inter_dim + 3 * mod.shared_expert_inter_dim + 2 * D))
        return acts, acts
    if isinstance(mod, MLA):
        H, C, R = mod.n_heads, mod.kv_lora_rank, mod.qk_rope_head_dim
        dqk, dv = mod.qk_head_dim, mod.v_head_dim
        acts = T * (H * dqk + C + R + H * dv) * elt            # q, latent + rope key, attention out
        # (B, H, S, T) scores: two in the dtype, the fp32 softmax, the causal mask; a fused
        # attention keeps none: on CUDA, and on the CPU where SDPA takes its flash kernel, which
        # needs Dv == Dqk (the policy's mla_pad_v pads a narrower V to Dqk); its math path, which
        # materializes the scores, runs only for a V that is left narrower or is wider
        scores = B * H * L * L * (2 * elt + 4) + L * L * 4
        if mod.backend == "reference":
            if mod.attn_impl == "absorb":
                acts += 2 * T * H * C * elt                    # queries into the latent, latent out
            else:
                acts += T * H * (dqk + dv) * elt               # expanded keys and values
        else:
            acts += T * H * (dqk + dv) * elt                   # expanded keys and values
            # the blocked attention runs only on fp32 inference (elt 4: fp32, the one 4-byte dtype)
            d = mod.policy.decide(torch.device("cpu"), torch.float32 if elt == 4 else torch.bfloat16,
                                  grad=train) if cpu else None
            pad_v = cpu and dv < dqk and d.mla_pad_v
            blocked = cpu and d.cpu_attention and cpu_attention.takes(L, L)   # naive_sdpa's test
            # the padded copy of V (SDPA's flash kernel), or the blocked attention's V^T
            # (kernels/cpu_attention.py, its keys written heads-major in place of k): the larger
            acts += T * H * max(dqk if pad_v else 0, dv if blocked else 0) * elt
            # the blocked attention keeps one (BLOCK, T) block of scores, not (B, H, S, S)
            scores = scores if cpu and dv != dqk and not pad_v and not blocked else 0.0
        return acts + scores, acts + scores
    return 0.0, 0.0


def peak_bytes(model: nn.Module, batch: int, seq: int, elt: int, *, cpu: bool = True, train: bool = False,
               optimizer_step: bool = False, token_ids: bool = False) -> MemoryEstimate:
    """The estimated peak bytes of one call of `model` on (batch, seq) tokens in a dtype of `elt`
    bytes (a model on the meta device will do: only shapes are read), on the CPU or (cpu=False) CUDA.
    `token_ids`: a language model's input (int64 ids in, logits out)."""
    n_params = sum(p.numel() for p in model.parameters())
    weights = n_params * elt * (1 + train + 2 * optimizer_step)
    T = batch * seq
    dim = next((m.dim for m in model.modules() if isinstance(m, (MoE, MLA))), None)
    if dim is None:
        dim = next(m.config.d_model for m in model.modules() if isinstance(m, MambaMixer))
    io = T * 8 if token_ids else T * dim * elt
    io += 3 * T * dim * elt                                     # residual stream, norm out, block out
    live = [_module_bytes(m, batch, seq, elt, cpu, train) for m in model.modules()]
    counted = {id(s) for m in model.modules() if isinstance(m, (MambaMixer, MoE, MLA)) for s in m.modules()}
    head = sum(T * m.out_features * (elt + 4 * train) for m in model.modules()
               if isinstance(m, nn.Linear) and id(m) not in counted)   # logits (+ fp32 loss grads)
    peak_live = max((a for a, _ in live), default=0.0)
    if not train:
        return MemoryEstimate(weights, io + head + peak_live)
    return MemoryEstimate(weights, 2 * io + 2 * head + sum(sv for _, sv in live) + peak_live)


def max_layers_fitting(per_layer: float, fixed: float, available: float) -> int:
    """How many layers of `per_layer` bytes fit beside `fixed` bytes in `available` bytes."""
    return max(0, math.floor((available - fixed) / per_layer)) if per_layer > 0 else 2**31


# Dense peak rates (TFLOP/s) from vendors' datasheets, SXM parts, no sparsity. fp32 on GPUs is
# the non-tensor-core rate (PyTorch's default keeps TF32 off for matmuls).
PEAK_TFLOPS = {
    "H100": {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0},
    "H200": {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0},
    "A100": {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5},
}


def peak_tflops(device_name: str, dtype: str) -> float | None:
    for key, rates in PEAK_TFLOPS.items():
        if key in device_name:
            return rates.get(dtype)
    return None
