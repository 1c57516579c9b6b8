"""Multi-head Latent Attention with the parameters of open_kimi's `MLA`, causal in prefill.

Parameter names (wq or wq_a/q_norm/wq_b, wkv_a, kv_norm, wkv_b, wo) and the math (RoPE through
open_kimi's functions, softmax scale, fp32 softmax) are open_kimi's, so state dicts move both ways
with strict=True. Two differences, both fixes: `mask=None` means causal (open_kimi attends to the
future), and a plain forward needs no preallocated cache (open_kimi writes every call into a
(max_batch_size, max_seq_len) buffer). Decoding uses an explicit cache (`init_cache`): a
`LatentCache` (absorb's) or a `FullCache` (naive's per-head K/V).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar, Literal, Optional, Union

import torch
from open_kimi.mla import apply_rotary_emb, precompute_freqs_cis
from torch import nn

from ..config import DEFAULT_BACKEND, MLAConfig, check_backend
from ..kernels import attention as attn_kernels
from ..kernels import cpu_attention, cpu_gemm
from ..policy import DEFAULT_POLICY, KernelPolicy, mla_triton_unfit
from .norms import RMSNorm



class _Cache:
    """Keys and values of the positions seen so far, for incremental decoding: two (B, T_max, ...)
    buffers written in place (a CUDA graph replays over the same storage). `filled`: how many
    positions hold the current sequence (None after a device-tensor step, which cannot tell the
    host without a sync: positions are then not checked)."""

    filled: Optional[int] = 0

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(getattr(self, f.name) for f in fields(self))

    @property
    def max_len(self) -> int:
        return self.tensors()[0].shape[1]

    def nbytes(self, length: Optional[int] = None) -> int:
        """Bytes held for `length` positions (all allocated positions by default)."""
        n = self.max_len if length is None else length
        return sum(t[:, :n].numel() * t.element_size() for t in self.tensors())


@dataclass
class LatentCache(_Cache):
    """What MLA is for (absorb): the normalized latent and the rotated rope key of each position."""

    kv: torch.Tensor   # (B, T_max, kv_lora_rank)
    pe: torch.Tensor   # (B, T_max, qk_rope_head_dim)
    kind: ClassVar[str] = "latent"


@dataclass
class FullCache(_Cache):
    """An ordinary per-head K/V cache (naive), for comparison."""

    k: torch.Tensor    # (B, T_max, H, qk_nope_head_dim + qk_rope_head_dim)
    v: torch.Tensor    # (B, T_max, H, v_head_dim)
    kind: ClassVar[str] = "full"


MLACache = Union[LatentCache, FullCache]


def check_start(start_pos: int, cache: MLACache) -> None:
    """New tokens go at start_pos in 0..filled: after the cached positions, or over some of them;
    never before 0 nor past a gap of empty slots (they would be attended as keys)."""
    filled = cache.filled
    if start_pos < 0 or (filled is not None and start_pos > filled):
        raise ValueError(f"start_pos={start_pos} is not in 0..{filled if filled is not None else cache.max_len}: "
                         f"the cache holds {filled if filled is not None else 'an unknown number of'} positions "
                         "(a new token goes right after them, or over some of them)")
CACHES = {"latent": LatentCache, "full": FullCache}


class MLA(nn.Module):
    def __init__(self, dim: int, n_heads: int, q_lora_rank: int = 0, kv_lora_rank: int = 512,
                 qk_nope_head_dim: int = 128, qk_rope_head_dim: int = 64, v_head_dim: int = 128,
                 max_seq_len: int = 4096, max_batch_size: int = 8,
                 attn_impl: Literal["naive", "absorb"] = "absorb", rope_theta: float = 10000.0,
                 mscale: float = 1.0, backend: str = DEFAULT_BACKEND,
                 policy: Optional[KernelPolicy] = None):
        super().__init__()
        self.config = cfg = MLAConfig(
            dim=dim, n_heads=n_heads, q_lora_rank=q_lora_rank, kv_lora_rank=kv_lora_rank,
            qk_nope_head_dim=qk_nope_head_dim, qk_rope_head_dim=qk_rope_head_dim, v_head_dim=v_head_dim,
            max_seq_len=max_seq_len, max_batch_size=max_batch_size, attn_impl=attn_impl,
            rope_theta=rope_theta, mscale=mscale)
        self.dim, self.n_heads = cfg.dim, cfg.n_heads
        self.q_lora_rank, self.kv_lora_rank = cfg.q_lora_rank, cfg.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.qk_head_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        self.v_head_dim = cfg.v_head_dim
        self.max_seq_len, self.max_batch_size = cfg.max_seq_len, cfg.max_batch_size
        self.attn_impl, self.rope_theta, self.mscale = cfg.attn_impl, cfg.rope_theta, cfg.mscale
        self.backend = check_backend(backend)
        # The Triton paths (policy.mla_prologue: the multi-token RoPE / latent norm / rope key as
        # one launch; policy.mla_decode: one-token attention over a latent cache, split-K)
        self.policy = policy or DEFAULT_POLICY

        if cfg.q_lora_rank == 0:
            self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.qk_head_dim, bias=False)
        else:
            self.wq_a = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, self.backend, self.policy)
            self.wq_b = nn.Linear(cfg.q_lora_rank, cfg.n_heads * self.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(cfg.dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, self.backend, self.policy)
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.v_head_dim, cfg.dim, bias=False)
        # open_kimi scales by mscale only with YaRN (original_seq_len set), which this block does
        # not take: the scale is 1/sqrt(qk_head_dim), as there.
        self.softmax_scale = self.qk_head_dim ** -0.5
        # RoPE table, complex64 and per device. Not a buffer: Module.to(bfloat16) would cast a
        # complex buffer to real and drop the imaginary part (it does so to open_kimi's MLA).
        self._freqs: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def from_config(cls, cfg: MLAConfig, backend: str = DEFAULT_BACKEND,
                    policy: Optional[KernelPolicy] = None) -> "MLA":
        return cls(**cfg.model_dump(), backend=backend, policy=policy)

    def freqs(self, end: int, device: torch.device) -> torch.Tensor:
        """(end, rope/2) complex rotations; grown on demand (plain RoPE: values don't depend on the length)."""
        f = self._freqs.get(device)
        if f is None or f.shape[0] < end:
            # an ordinary tensor even when first built under inference_mode: a later forward
            # with autograd on saves it for backward (an inference tensor can't be)
            with torch.inference_mode(False):
                f = precompute_freqs_cis(self.qk_rope_head_dim, max(end, self.max_seq_len),
                                         self.rope_theta).to(device)
            self._freqs[device] = f
        return f[:end]

    def init_cache(self, batch_size: int, max_len: int, kind: Optional[str] = None,
                   device=None, dtype=None) -> MLACache:
        kind = kind or ("latent" if self.attn_impl == "absorb" else "full")
        p = self.wkv_a.weight
        device, dtype = device or p.device, dtype or p.dtype
        if kind == "latent":
            return LatentCache(torch.zeros(batch_size, max_len, self.kv_lora_rank, device=device, dtype=dtype),
                               torch.zeros(batch_size, max_len, self.qk_rope_head_dim, device=device, dtype=dtype))
        if kind == "full":
            return FullCache(
                torch.zeros(batch_size, max_len, self.n_heads, self.qk_head_dim, device=device, dtype=dtype),
                torch.zeros(batch_size, max_len, self.n_heads, self.v_head_dim, device=device, dtype=dtype))
        raise ValueError(f"cache kind={kind!r} is not one of {', '.join(CACHES)}")

    def _linear(self, x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
        """layer(x); the fast backend's through kernels.cpu_gemm (oneDNN where the policy's
        cpu_gemm says so: fp32 CPU inference)."""
        if self.backend != "fast":
            return layer(x)
        return cpu_gemm.linear(x, layer.weight, layer.bias, self._decision(x).cpu_gemm)

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        if self.q_lora_rank == 0:
            q = self._linear(x, self.wq)
        else:
            q = self._linear(self.q_norm(self._linear(x, self.wq_a)), self.wq_b)
        return q.view(*x.shape[:2], self.n_heads, self.qk_head_dim)          # (B, S, H, Dqk)

    def forward(self, x: torch.Tensor, start_pos: Union[int, torch.Tensor] = 0,
                mask: Optional[torch.Tensor] = None, cache: Optional[MLACache] = None) -> torch.Tensor:
        """x (B, S, D) -> (B, S, D). Positions start_pos .. start_pos+S-1.

        Without `cache`, the S tokens attend among themselves (start_pos must be 0). With it,
        their keys are written at [start_pos, start_pos+S) and they attend to [0, start_pos+S).
        `mask`: additive, broadcastable to (B, S, T); None = causal. A device-tensor start_pos
        (one token, with a cache and no mask) takes `decode_step`: no host sync, CUDA-graph safe.
        """
        if isinstance(start_pos, torch.Tensor):
            if cache is None or mask is not None or x.shape[1] != 1:
                raise ValueError("a tensor start_pos is one decoding step: one token, a cache, no mask "
                                 f"(got {x.shape[1]} tokens, cache {type(cache).__name__}, mask "
                                 f"{'given' if mask is not None else 'None'})")
            cache.filled = None
            return self.decode_step(x, start_pos, cache)
        bsz, seqlen, _ = x.shape
        end = start_pos + seqlen
        if cache is None and start_pos != 0:
            raise ValueError(f"start_pos={start_pos} needs a cache holding the earlier positions "
                             "(MLA.init_cache); without one, start_pos must be 0")
        if cache is not None and end > cache.max_len:
            raise ValueError(f"start_pos + seq_len = {end} exceeds the cache length {cache.max_len}")
        if cache is not None:
            check_start(start_pos, cache)
            cache.filled = end                  # later positions hold another (older) sequence
        if mask is None and self._fused_prologue(x, cache):
            return self._prefill_fused(x, start_pos, cache)
        freqs = self.freqs(end, x.device)[start_pos:end]
        if cache is None:
            return self._attend(x, freqs, mask, None, None)
        return self._attend(x, freqs, mask, cache, slice(start_pos, end))

    def _fused_prologue(self, x: torch.Tensor, cache: Optional[MLACache]) -> bool:
        """Whether a causal multi-token forward takes `_prefill_fused` (policy.mla_prologue)."""
        if self.backend != "fast" or (cache is not None and x.shape[1] == 1):
            return False
        return self._decision(x).mla_prologue and self._rope_fits_triton()

    def _prefill_fused(self, x: torch.Tensor, start_pos: int, cache: Optional[MLACache]) -> torch.Tensor:
        """The fast causal forward of S tokens at start_pos..: the projections, one Triton
        prologue (query RoPE in place, latent RMSNorm and rotated rope key written to the latent
        cache at their positions, or to fresh (B, S, *) buffers without one), the latent
        expanded to per-head K/V, SDPA. The same function as `_attend`'s fast multi-token path
        (its twin in the tests)."""
        from ..kernels.mla_decode import mla_prologue

        bsz, seqlen, _ = x.shape
        end = start_pos + seqlen
        q = self._query(x)                                                    # (B, S, H, Dqk)
        kva = self.wkv_a(x)                                                   # (B, S, C + R)
        C, R = self.kv_lora_rank, self.qk_rope_head_dim
        if isinstance(cache, LatentCache):
            kv_buf, pe_buf, p0 = cache.kv[:bsz], cache.pe[:bsz], start_pos
        else:
            kv_buf = x.new_empty(bsz, seqlen, C)
            pe_buf = x.new_empty(bsz, seqlen, R)
            p0 = 0
        eps = self.kv_norm.eps if self.kv_norm.eps is not None else torch.finfo(x.dtype).eps
        freqs = self.freqs(end, x.device)[start_pos - p0:]                   # row p0 + s: position start_pos + s
        mla_prologue(q, kva, p0, freqs, self.kv_norm.weight, eps, kv_buf, pe_buf, self.qk_nope_head_dim)
        # keys [0, end) (latent cache) or [0, S)
        k, v = self._expand_kv(kv_buf[:, : p0 + seqlen], pe_buf[:, : p0 + seqlen])
        if isinstance(cache, FullCache):
            cache.k[:bsz, start_pos:end] = k
            cache.v[:bsz, start_pos:end] = v
            k, v = cache.k[:bsz, :end], cache.v[:bsz, :end]
        o = attn_kernels.naive_sdpa(q, k, v, self.softmax_scale, None)      # (B, S, H, Dv)
        return self.wo(o.flatten(2))

    def decode_step(self, x: torch.Tensor, pos: torch.Tensor, cache: MLACache) -> torch.Tensor:
        """One token x (B, 1, D) at position `pos` (a 0-d long tensor on x's device).

        Shapes don't depend on the position: the key is written with index_copy_, and the query
        attends over the whole cache, either through the Triton kernel, which reads `pos` on the
        device and stops at it, or through SDPA with positions after `pos` masked out. No host
        sync, so a step can be captured in a CUDA graph and replayed with `pos` updated in place."""
        T = cache.max_len
        if self._triton_decode(x, cache):
            return self._decode_step_triton(x, cache, pos.view(1))
        freqs = self.freqs(T, x.device).index_select(0, pos.view(1))          # (1, R/2)
        k_pos = torch.arange(T, device=x.device)
        mask = torch.zeros(1, T, device=x.device).masked_fill(k_pos > pos, float("-inf"))
        return self._attend(x, freqs, mask, cache, pos.view(1))

    def _triton_decode(self, x: torch.Tensor, cache: Optional[MLACache]) -> bool:
        if self.backend != "fast" or not isinstance(cache, LatentCache) or x.shape[1] != 1:
            return False
        return self._decision(x).mla_decode and self._rope_fits_triton()

    def _decision(self, x: torch.Tensor):
        """The policy's decision for x; with autograd on, no Triton path (the kernels rotate in
        place and have no backward: a call that wants gradients takes the PyTorch path)."""
        grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        return self.policy.decide(x.device, x.dtype, grad)

    def _rope_fits_triton(self) -> bool:
        return mla_triton_unfit(self.qk_rope_head_dim) is None   # policy.py: the kernels' size limits

    def _expand_kv(self, kv: torch.Tensor, k_pe: torch.Tensor,
                   heads_major: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalized latent kv (B, T, C) and rotated rope key k_pe (B, T, R) as per-head
        keys (B, T, H, nope + R) and values (B, T, H, v) (the values a strided view; the keys a
        view of a (B, H, T, nope + R) tensor with `heads_major`, for the CPU's blocked attention)."""
        if self.backend == "fast" and self._decision(kv).cpu_gemm:             # the same product, oneDNN
            kvb = cpu_gemm.linear(kv, self.wkv_b.weight, None, True).view(*kv.shape[:2], self.n_heads, -1)
        else:
            wkv_b = self.wkv_b.weight.view(self.n_heads, -1, self.kv_lora_rank)   # (H, nope + v, C)
            kvb = torch.einsum("btc,hdc->bthd", kv, wkv_b)                        # (B, T, H, nope + v)
        k_nope, v = torch.split(kvb, [self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        return attn_kernels.join_last(k_nope, k_pe.unsqueeze(2), heads_major), v

    def _attend(self, x, freqs, mask, cache: Optional[MLACache], where) -> torch.Tensor:
        """Attention of x's tokens (rotated by `freqs`); with a cache, their keys are written at
        `where` (a slice, or an index tensor for decode_step) and the queries read the cache up
        to the end of `where` (or all of it, for an index). One-token steps over a latent cache
        go to the Triton kernels where they run (`_triton_decode`)."""
        bsz, seqlen = x.shape[:2]
        if mask is None and self._triton_decode(x, cache):
            return self._decode_step_triton(x, cache, where.start)
        q_full = self._query(x)                                               # (B, S, H, Dqk)
        q_nope, q_pe = torch.split(q_full, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_pe = apply_rotary_emb(q_pe, freqs)
        kv, k_pe = torch.split(self._linear(x, self.wkv_a), [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        k_pe = apply_rotary_emb(k_pe.unsqueeze(2), freqs).squeeze(2)          # (B, S, R)
        kv = self.kv_norm(kv)                                                 # (B, S, C)
        wkv_b = self.wkv_b.weight.view(self.n_heads, -1, self.kv_lora_rank)   # (H, nope + v, C)
        fast = self.backend == "fast"

        def store(buf: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
            if isinstance(where, slice):
                buf[:bsz, where] = val
                return buf[:bsz, : where.stop]
            buf[:bsz].index_copy_(1, where, val)
            return buf[:bsz]

        # The fast backend expands the latent to per-head K/V ("naive") for every multi-token
        # call, with or without a (latent) cache: the same function, and for prefill far fewer
        # FLOPs than attending over the 576-wide latent keys. attn_impl then picks only the
        # decoding cache (absorb -> latent), which one-token steps read in latent form.
        if cache is not None:
            use_latent = isinstance(cache, LatentCache) and not (fast and seqlen > 1)
        else:
            use_latent = self.attn_impl == "absorb" and not fast
        if use_latent:
            if cache is not None:
                kv, k_pe = store(cache.kv, kv), store(cache.pe, k_pe)
            q_lat = torch.einsum("bshd,hdc->bshc", q_nope, wkv_b[:, : self.qk_nope_head_dim])
            attend = attn_kernels.absorb_sdpa if fast else attn_kernels.absorb_ref
            o = attend(q_lat, q_pe, kv, k_pe, self.softmax_scale, mask)           # (B, S, H, C)
            o = torch.einsum("bshc,hdc->bshd", o, wkv_b[:, -self.v_head_dim:])
        else:
            if isinstance(cache, LatentCache):
                # Latent prefill: store the latent, then expand all of [0, end) (earlier
                # positions come from the cache) to per-head K/V.
                kv, k_pe = store(cache.kv, kv), store(cache.pe, k_pe)
            d = self._decision(x)
            blocked = (fast and d.cpu_attention and mask is None and not isinstance(cache, FullCache)
                       and cpu_attention.takes(seqlen, kv.shape[1]))
            k, v = self._expand_kv(kv, k_pe, heads_major=blocked)
            if isinstance(cache, FullCache):
                k, v = store(cache.k, k), store(cache.v, v)
            if fast and not torch.is_grad_enabled():
                q_full[..., self.qk_nope_head_dim:] = q_pe                    # rope in place: no new (B, S, H, Dqk)
                q = q_full
            else:
                q = attn_kernels.join_last(q_nope, q_pe)
            if fast:
                o = attn_kernels.naive_sdpa(q, k, v, self.softmax_scale, mask, pad_v=d.mla_pad_v,
                                            cpu_blocked=d.cpu_attention)      # (B, S, H, Dv)
            else:
                o = attn_kernels.naive_ref(q, k, v, self.softmax_scale, mask)
        return self._linear(o.flatten(2), self.wo)

    def _decode_step_triton(self, x: torch.Tensor, cache: MLACache, pos) -> torch.Tensor:
        """One token per sequence, x (B, 1, D) at position `pos` (an int, or a 1-element device
        tensor for graph capture), over the latent cache with the Triton kernels: a prologue
        (query rope in place, the step's normalized latent and rotated rope key into the cache)
        and the split-K attention over positions [0, pos]. Heads are the batch of both latent
        projections: (H, B, *) bmm's on strided views, no copies. Inference only (no backward)."""
        from ..kernels.mla_decode import mla_decode, mla_decode_prologue

        bsz = x.shape[0]
        q = self._query(x).view(bsz, self.n_heads, self.qk_head_dim)                   # (B, H, Dqk)
        kv_a, pe = cache.kv[:bsz], cache.pe[:bsz]
        eps = self.kv_norm.eps if self.kv_norm.eps is not None else torch.finfo(x.dtype).eps
        mla_decode_prologue(q, self.wkv_a(x).view(bsz, -1), pos, self.freqs(cache.max_len, x.device),
                            self.kv_norm.weight, eps, kv_a, pe, self.qk_nope_head_dim)
        wkv_b = self.wkv_b.weight.view(self.n_heads, -1, self.kv_lora_rank)            # (H, nope + v, C)
        q_nope = q[..., : self.qk_nope_head_dim].transpose(0, 1)                        # (H, B, nope)
        q_lat = torch.bmm(q_nope, wkv_b[:, : self.qk_nope_head_dim])                    # (H, B, C)
        o_lat = torch.empty_like(q_lat)
        mla_decode(q_lat.transpose(0, 1), q[..., self.qk_nope_head_dim:], kv_a, pe,
                   pos, self.softmax_scale, length_offset=1, out=o_lat.transpose(0, 1))  # (B, H, C)
        o = torch.bmm(o_lat, wkv_b[:, -self.v_head_dim:].transpose(1, 2))               # (H, B, Dv)
        return self.wo(o.transpose(0, 1).reshape(bsz, 1, -1))

    def kernel_choice(self, device: torch.device, dtype: torch.dtype) -> dict[str, str]:
        if self.backend == "reference":
            return {"attn": f"{self.attn_impl}-einsum"}
        d, rope = self.policy.decide(device, dtype), self._rope_fits_triton()
        why = f" ({mla_triton_unfit(self.qk_rope_head_dim)})"   # a Triton path the size rules out: named
        prefill = "triton prologue + naive-sdpa" if d.mla_prologue and rope else "naive-sdpa" + why * d.mla_prologue
        if d.mla_pad_v and self.v_head_dim < self.qk_head_dim:
            prefill += " (V padded to Dqk: the CPU flash kernel)"
        if d.cpu_attention:
            prefill = (f"cpu-blocked onednn (causal, S*T >= {cpu_attention.MIN_SCORES}), " + prefill
                       + " otherwise")
        gemm = {"gemm": cpu_gemm.KERNEL_NAME} if d.cpu_gemm else {}
        if self.attn_impl != "absorb":
            return {"attn": f"prefill {prefill}, decode full-cache sdpa", **gemm}
        decode = "triton prologue + split-k" if d.mla_decode and rope else "sdpa" + why * d.mla_decode
        return {"attn": f"prefill {prefill}, decode latent cache {decode} (full cache sdpa)", **gemm}
