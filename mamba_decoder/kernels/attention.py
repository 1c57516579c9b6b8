"""Attention for MLA, in its two forms, each as an einsum reference and an SDPA fast path.

naive:  q (B, S, H, Dqk), k (B, T, H, Dqk), v (B, T, H, Dv)            -> (B, S, H, Dv)
absorb: q_lat (B, S, H, C), q_pe (B, S, H, R), kv (B, T, C), pe (B, T, R) -> (B, S, H, C)
        (the query already multiplied into the latent space; keys and values are the shared latent)
`mask` is additive, broadcastable to (B, S, T) (open_kimi's convention), or None for causal with
the S queries at the last S positions of the T keys. Softmax in fp32, as open_kimi does.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import cpu_attention


def causal_mask(S: int, T: int, device, dtype=torch.float32) -> torch.Tensor:
    """Additive (S, T) mask: query i sits at position T - S + i and sees keys j <= that."""
    q_pos = torch.arange(T - S, T, device=device).unsqueeze(1)
    k_pos = torch.arange(T, device=device).unsqueeze(0)
    return torch.zeros(S, T, device=device, dtype=dtype).masked_fill_(k_pos > q_pos, float("-inf"))


def _softmax(scores: torch.Tensor, mask: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    S, T = scores.shape[1], scores.shape[3]                      # scores (B, S, H, T)
    if mask is None:
        mask = causal_mask(S, T, scores.device)
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    scores = scores + mask.unsqueeze(2)                          # (B|1, S, 1, T)
    return scores.softmax(dim=-1, dtype=torch.float32).type_as(like)


def join_last(a: torch.Tensor, b: torch.Tensor, heads_major: bool = False) -> torch.Tensor:
    """torch.cat([a, b], -1) with b broadcast to a's leading dims, written by two slice copies
    into one new tensor. The same values and gradients as cat, whose batched-copy kernel is slow
    on strided parts such as MLA's per-head [k_nope | k_pe] and [q_nope | q_pe]. H200, bf16, an
    MLABlock train step at B8 interleaved with cat: 0.95x at L2048, 1.01x (no gain) at L8192.
    `heads_major`: a (B, T, H, d) result is a view of a contiguous (B, H, T, d) tensor (what the
    CPU's blocked attention reads; the same values)."""
    na = a.shape[-1]
    if heads_major and a.dim() == 4:
        B, T, H, _ = a.shape
        out = a.new_empty(B, H, T, na + b.shape[-1]).permute(0, 2, 1, 3)
    else:
        out = a.new_empty(*a.shape[:-1], na + b.shape[-1])
    out[..., :na] = a
    out[..., na:] = b
    return out


def naive_ref(q, k, v, scale: float, mask=None):
    scores = torch.einsum("bshd,bthd->bsht", q, k) * scale
    return torch.einsum("bsht,bthd->bshd", _softmax(scores, mask, q), v)


def absorb_ref(q_lat, q_pe, kv, pe, scale: float, mask=None):
    scores = (torch.einsum("bshc,btc->bsht", q_lat, kv)
              + torch.einsum("bshr,btr->bsht", q_pe, pe)) * scale
    return torch.einsum("bsht,btc->bshc", _softmax(scores, mask, q_lat), kv)


def _sdpa_mask(mask, S: int, T: int, device, dtype):
    """SDPA arguments for our mask convention: is_causal only where its top-left alignment
    agrees with ours (S == T); otherwise an explicit mask."""
    if mask is None:
        if S == T:
            return None, True
        if S == 1:
            return None, False                                   # one query at the end sees all
        mask = causal_mask(S, T, device)
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)                                 # (B, 1, S, T)
    return mask.to(dtype), False


def naive_sdpa(q, k, v, scale: float, mask=None, pad_v: bool = False, cpu_blocked: bool = False):
    """SDPA of the naive form. With `pad_v` (the policy's mla_pad_v: the CPU) and Dv < Dqk, V is
    zero-padded to Dqk and the extra output columns (exact zeros) dropped: the CPU's flash kernel
    needs Dv == Dqk, else SDPA runs its math path, which materializes the (B, H, S, T) scores
    (B8 H16 L1024 Dqk 192 Dv 128, fp32, 2 threads: 1155-2940 ms unpadded, 497-567 ms padded).
    With `cpu_blocked` (the policy's cpu_attention: fp32 CPU inference), a causal call large
    enough (`cpu_attention.takes`) runs `cpu_attention.causal_attention` instead: query blocks
    through oneDNN GEMMs, V unpadded."""
    S, T = q.shape[1], k.shape[1]
    # the tensors' own dtype, not the caller's decision alone: under CPU autocast an fp32 MLA
    # (decided on fp32 x) attends with bf16 q, k, v
    if (cpu_blocked and mask is None and cpu_attention.takes(S, T)
            and all(cpu_attention.usable(t.device, t.dtype) for t in (q, k, v))):
        return cpu_attention.causal_attention(q, k, v, scale)
    attn_mask, causal = _sdpa_mask(mask, S, T, q.device, q.dtype)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))             # (B, H, *, d)
    # Dv (128) != Dqk (192): SDPA picks a kernel that takes it (cuDNN on Hopper, else the
    # memory-efficient one); padding v for flash would copy V for nothing there. One-token
    # decode steps see a new key length every call, and cuDNN builds a plan per shape (an
    # eager full-cache decode step took 40-57 ms on the H100): those skip cuDNN.
    if S == 1 and q.is_cuda:
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal, scale=scale)
    elif pad_v and v.shape[-1] < q.shape[-1]:
        Dv = v.shape[-1]
        vp = v.new_empty(*v.shape[:-1], q.shape[-1])               # each element written once
        vp[..., :Dv] = v                                            # (F.pad fills, then copies)
        vp[..., Dv:] = 0
        o = F.scaled_dot_product_attention(q, k, vp, attn_mask=attn_mask, is_causal=causal, scale=scale)[..., :Dv]
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal, scale=scale)
    return o.transpose(1, 2)                                     # (B, S, H, Dv)


def absorb_sdpa(q_lat, q_pe, kv, pe, scale: float, mask=None):
    B, S, H, C = q_lat.shape
    T = kv.shape[1]
    attn_mask, causal = _sdpa_mask(mask, S, T, q_lat.device, q_lat.dtype)
    q = torch.cat([q_lat, q_pe], dim=-1).transpose(1, 2)         # (B, H, S, C + R)
    k = torch.cat([kv, pe], dim=-1).unsqueeze(1).expand(B, H, T, -1)  # shared by all heads
    v = kv.unsqueeze(1).expand(B, H, T, C)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal, scale=scale)
    return o.transpose(1, 2)                                     # (B, S, H, C)
