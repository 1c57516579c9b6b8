"""Triton split-K ("flash-decoding") attention for absorbed MLA, one query token per sequence.

q_lat (B, H, C), q_pe (B, H, R) attend to the shared latent cache kv (B, T_max, C) / pe
(B, T_max, R): scores = (q_lat . kv + q_pe . pe) * scale, output softmax(scores) @ kv (B, H, C).
Only positions [0, length) count. `length` may be a device tensor (read by the kernel, never by
the host, so a decode step stays CUDA-graph capturable with shapes fixed by T_max) or an int.

Stage 1, grid (B, n_splits, head groups): each program takes all heads of one sequence (a
(BLOCK_H >= 16, BLOCK_T) score tile, so both q.K^T and P.V are tl.dot) over one split of
SPLIT_LEN positions, in key blocks of BLOCK_T; the latent block is loaded once and used as both
key and value. It writes an fp32 partial (running max m, sum l, unnormalized acc); a split
that starts at or beyond `length` loads nothing and writes m=-inf, l=0. The loop bound is the
valid length, so the cost follows the context, not T_max. Stage 2 merges the splits of each
(sequence, head, column chunk) with log-sum-exp weights, reading only the splits that hold
positions. With one split, stage 1 normalizes and writes the output itself (one launch).

n_splits depends only on (B, T_max, H, device), fixed for a cache: graph capture safe.
Softmax in fp32 (exp2, scale folded with log2 e); bf16/fp16 probabilities go into P.V in the
cache dtype, as flash attention does.
"""
from __future__ import annotations

import functools
from typing import Optional, Union

import torch
import triton
import triton.language as tl

from ._triton import interpreting as _interpreting

LOG2E = 1.4426950408889634

# Defaults for the H100 (kv_lora_rank 512, rope 64, 16 heads), from sm_90 compiles (ptxas,
# no device): a (32, 512) bf16 latent block goes to shared memory by cp.async (2 stages, 55 KiB)
# and 4 warps need ~187 registers a thread (two programs an SM); BLOCK_T 64 doubles the shared
# memory for little. Splits: about PROGRAMS_PER_SM programs per SM over the whole cache, each
# split at least MIN_SPLIT positions (fewer partials to write and merge) and at most MAX_SPLITS
# of them (bounds stage 2's tile). Not yet timed on hardware; override per call with `config=`.
CONFIG = dict(BLOCK_T=32, num_warps=4, num_stages=2, MIN_SPLIT=128, MAX_SPLITS=128,
              PROGRAMS_PER_SM=2, COMBINE_BLOCK_C=64, combine_warps=4)
# fp32 caches: no tensor cores for exact fp32 dots, and a 32-row block spills (1.1 KiB of stack
# at 255 registers); 16 rows fit in 142 registers.
CONFIG_FP32 = dict(BLOCK_T=16)
NOMINAL_SMS = 132   # for the interpreter (no device to ask): an H100's count


_DOT_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _dot_dtype(cache_dtype: torch.dtype):
    """tl.dot operand type: the cache's 16-bit type on the GPU (tensor cores). The interpreter
    multiplies bf16 as raw 16-bit integers (triton 3.x), so there, and for fp32 or other caches,
    fp32 (a no-op cast on the GPU's 16-bit path)."""
    if _interpreting():
        return tl.float32
    return _DOT_DTYPES.get(cache_dtype, tl.float32)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def split_plan(batch: int, t_max: int, n_head_groups: int, device: torch.device,
               config: Optional[dict] = None) -> tuple[int, int]:
    """(split_len, n_splits) for a cache of t_max positions: split_len is a multiple of BLOCK_T."""
    cfg = {**CONFIG, **(config or {})}
    bt = cfg["BLOCK_T"]
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else NOMINAL_SMS
    target = cfg["PROGRAMS_PER_SM"] * sms
    per_prog = triton.cdiv(batch * n_head_groups * t_max, target)
    split = max(triton.next_power_of_2(per_prog), cfg["MIN_SPLIT"], triton.cdiv(t_max, cfg["MAX_SPLITS"]))
    split = triton.cdiv(split, bt) * bt
    split = min(split, triton.cdiv(t_max, bt) * bt)          # never longer than the cache
    return split, triton.cdiv(t_max, split)


@triton.jit
def _valid_length(LEN, T, LEN_IS_PTR: tl.constexpr, LEN_OFFSET: tl.constexpr):
    """The number of positions that count: a device scalar (graphs) or an int, plus the offset,
    at most T; always a tensor."""
    if LEN_IS_PTR:
        n = tl.load(LEN).to(tl.int32) + LEN_OFFSET
    else:
        n = tl.full([], LEN + LEN_OFFSET, tl.int32)
    return tl.minimum(n, T)


@triton.jit(do_not_specialize=["LEN"])   # an int length changes every eager step: no recompiles
def _split_kernel(Q, QPE, KV, PE, LEN, M_OUT, L_OUT, ACC_OUT, OUT,
                  scale_log2, T, H, C, R, split_len, n_splits,
                  s_qb, s_qh, s_qc, s_pb, s_ph, s_pr,
                  s_kb, s_kt, s_kc, s_eb, s_et, s_er,
                  s_ob, s_oh, s_oc,
                  LEN_IS_PTR: tl.constexpr, LEN_OFFSET: tl.constexpr, SINGLE: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_T: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr):
    b = tl.program_id(0)
    sp = tl.program_id(1)
    hg = tl.program_id(2)
    n = _valid_length(LEN, T, LEN_IS_PTR, LEN_OFFSET)
    start = sp * split_len
    stop = tl.minimum(start + split_len, n)
    # A split past the valid length is a neutral partial: no rows are loaded or stored but
    # m, l. (Head bound 0 rather than `& live`: the interpreter can't broadcast a 0-d mask.)
    h_lim = tl.where(start < n, H, 0)

    offs_h = hg * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_c = tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    offs_t = tl.arange(0, BLOCK_T)
    h_ok = offs_h < H
    h_ld = offs_h < h_lim
    c_ok = offs_c < C
    r_ok = offs_r < R
    b64 = b.to(tl.int64)
    el = DOT_DTYPE

    # Padded heads and columns load zeros: they add nothing to real rows' scores.
    q = tl.load(Q + b64 * s_qb + offs_h[:, None] * s_qh + offs_c[None, :] * s_qc,
                mask=h_ld[:, None] & c_ok[None, :], other=0.0).to(el)
    qp = tl.load(QPE + b64 * s_pb + offs_h[:, None] * s_ph + offs_r[None, :] * s_pr,
                 mask=h_ld[:, None] & r_ok[None, :], other=0.0).to(el)
    kv_base = KV + b64 * s_kb + offs_c[None, :] * s_kc
    pe_base = PE + b64 * s_eb + offs_r[None, :] * s_er

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
    for t0 in range(start, stop, BLOCK_T):
        t = t0 + offs_t
        t_ok = t < stop
        k = tl.load(kv_base + t[:, None] * s_kt, mask=t_ok[:, None] & c_ok[None, :], other=0.0).to(el)
        kp = tl.load(pe_base + t[:, None] * s_et, mask=t_ok[:, None] & r_ok[None, :], other=0.0).to(el)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        s = tl.dot(qp, tl.trans(kp), acc=s, input_precision=DOT_PREC)
        s = tl.where(t_ok[None, :], s * scale_log2, float("-inf"))
        # Every block run here holds a valid position, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(el), k, acc=acc, input_precision=DOT_PREC)
        m_i = m_new

    if SINGLE:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(OUT + b64 * s_ob + offs_h[:, None] * s_oh + offs_c[None, :] * s_oc,
                 o.to(OUT.dtype.element_ty), mask=h_ok[:, None] & c_ok[None, :])
    else:
        row = (b64 * n_splits + sp) * H + offs_h                  # partials (B, n_splits, H[, C])
        tl.store(M_OUT + row, m_i, mask=h_ok)
        tl.store(L_OUT + row, l_i, mask=h_ok)
        tl.store(ACC_OUT + row[:, None] * C + offs_c[None, :], acc,
                 mask=h_ld[:, None] & c_ok[None, :])


@triton.jit(do_not_specialize=["LEN"])
def _combine_kernel(LEN, M_IN, L_IN, ACC_IN, OUT, T, H, C, split_len, n_splits,
                    s_ob, s_oh, s_oc,
                    LEN_IS_PTR: tl.constexpr, LEN_OFFSET: tl.constexpr,
                    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    cb = tl.program_id(2)
    n = _valid_length(LEN, T, LEN_IS_PTR, LEN_OFFSET)
    n_live = tl.minimum(tl.cdiv(n, split_len), n_splits)    # splits past it were never filled
    offs_s = tl.arange(0, BLOCK_S)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    s_ok = offs_s < n_live
    c_ok = offs_c < C
    b64 = b.to(tl.int64)
    row = (b64 * n_splits + offs_s) * H + h
    m = tl.load(M_IN + row, mask=s_ok, other=float("-inf"))
    l = tl.load(L_IN + row, mask=s_ok, other=0.0)
    a = tl.load(ACC_IN + row[:, None] * C + offs_c[None, :], mask=s_ok[:, None] & c_ok[None, :], other=0.0)
    w = tl.where(s_ok, tl.exp2(m - tl.max(m, axis=0)), 0.0)
    denom = tl.sum(w * l, axis=0)
    o = tl.sum(a * w[:, None], axis=0) / tl.where(denom > 0, denom, 1.0)
    tl.store(OUT + b64 * s_ob + h * s_oh + offs_c * s_oc, o.to(OUT.dtype.element_ty), mask=c_ok)


def mla_decode(q_lat: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor,
               length: Union[torch.Tensor, int], scale: float, *, length_offset: int = 0,
               out: Optional[torch.Tensor] = None, config: Optional[dict] = None) -> torch.Tensor:
    """softmax((q_lat kv^T + q_pe pe^T) * scale) kv over positions [0, length + length_offset).

    q_lat (B, H, C), q_pe (B, H, R), kv (B, T, C), pe (B, T, R): any strides. `length`: a
    1-element integer tensor on the device (read only by the kernels) or an int; at least 1 valid
    position is assumed (at most T are used). `length_offset` is added in the kernel (decode
    passes the position itself with offset 1: no extra launch). `out` (B, H, C), any strides,
    default a new tensor of q_lat's dtype.
    """
    B, H, C = q_lat.shape
    R = q_pe.shape[-1]
    T = kv.shape[1]
    if q_pe.shape != (B, H, R) or kv.shape != (B, T, C) or pe.shape != (B, T, R):
        raise ValueError(f"shapes q_lat {tuple(q_lat.shape)}, q_pe {tuple(q_pe.shape)}, "
                         f"kv {tuple(kv.shape)}, pe {tuple(pe.shape)} do not match")
    if not (kv.is_cuda or _interpreting()):
        raise ValueError("mla_decode needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    if pe.dtype != kv.dtype:
        raise ValueError(f"kv ({kv.dtype}) and pe ({pe.dtype}) must share a dtype")
    if isinstance(length, torch.Tensor):
        if length.numel() != 1 or length.is_floating_point() or length.device != kv.device:
            raise ValueError("length must be a 1-element integer tensor on kv's device")
        len_arg, len_is_ptr = length, True
    else:
        if not 1 <= int(length) + length_offset <= T:
            raise ValueError(f"length {length}+{length_offset} is not in [1, {T}]")
        len_arg, len_is_ptr = int(length), False
    cfg = {**CONFIG, **(CONFIG_FP32 if kv.element_size() >= 4 else {}), **(config or {})}
    if out is None:
        out = torch.empty(B, H, C, device=q_lat.device, dtype=q_lat.dtype)
    elif out.shape != (B, H, C):
        raise ValueError(f"out {tuple(out.shape)} must be {(B, H, C)}")

    block_h = max(16, min(64, triton.next_power_of_2(H)))   # tl.dot needs M >= 16
    n_hg = triton.cdiv(H, block_h)
    split_len, n_splits = split_plan(B, T, n_hg, kv.device, cfg)
    single = n_splits == 1
    if single:
        m_buf = l_buf = acc_buf = out                         # unused: SINGLE prunes the stores
    else:
        m_buf = torch.empty(B, n_splits, H, device=kv.device, dtype=torch.float32)
        l_buf = torch.empty_like(m_buf)
        acc_buf = torch.empty(B, n_splits, H, C, device=kv.device, dtype=torch.float32)
    common = dict(LEN_IS_PTR=len_is_ptr, LEN_OFFSET=length_offset)
    _split_kernel[(B, n_splits, n_hg)](
        q_lat, q_pe, kv, pe, len_arg, m_buf, l_buf, acc_buf, out,
        float(scale) * LOG2E, T, H, C, R, split_len, n_splits,
        *q_lat.stride(), *q_pe.stride(), *kv.stride(), *pe.stride(), *out.stride(),
        SINGLE=single, BLOCK_H=block_h, BLOCK_C=max(16, triton.next_power_of_2(C)),
        BLOCK_R=max(16, triton.next_power_of_2(R)), BLOCK_T=cfg["BLOCK_T"],
        DOT_DTYPE=_dot_dtype(kv.dtype),
        # fp32 caches: full-precision dots (TF32 would cost ~1e-3 relative error).
        DOT_PREC="ieee" if kv.dtype == torch.float32 else "tf32",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **common)
    if not single:
        bc = min(cfg["COMBINE_BLOCK_C"], triton.next_power_of_2(C))
        _combine_kernel[(B, H, triton.cdiv(C, bc))](
            len_arg, m_buf, l_buf, acc_buf, out, T, H, C, split_len, n_splits, *out.stride(),
            BLOCK_S=triton.next_power_of_2(n_splits), BLOCK_C=bc,
            num_warps=cfg["combine_warps"], **common)
    return out


@triton.jit(do_not_specialize=["POS"])
def _prologue_kernel(Q, KVA, POS, FREQ, NW, CKV, CPE, H, T, eps,
                     s_qb, s_qs, s_qh, s_qd, s_ab, s_as, s_ad, s_ft, s_fi,
                     s_cb, s_ct, s_cc, s_eb, s_et, s_er,
                     NOPE: tl.constexpr, R: tl.constexpr, C: tl.constexpr,
                     POS_IS_PTR: tl.constexpr, HAS_W: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr):
    # program (s, b): token s of sequence b, at position POS + s (S on the grid's first axis,
    # which takes 2^31 - 1 programs; the second takes 65535)
    s = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    if POS_IS_PTR:
        pos = tl.load(POS).to(tl.int64) + s
    else:
        pos = tl.full([], POS, tl.int64) + s
    # a position past the cache (a graph replayed too often) writes nothing and leaves q as is
    # (bounds through tl.where: the interpreter takes no 0-d masks)
    i = tl.arange(0, R // 2)
    im = i < tl.where(pos < T, R // 2, 0)
    cos = tl.load(FREQ + pos * s_ft + i * s_fi, mask=im, other=1.0)   # freqs as (T, R/2, 2) real
    sin = tl.load(FREQ + pos * s_ft + i * s_fi + 1, mask=im, other=0.0)
    # the query's rope half, every head, rotated in place: (x0 + i x1)(cos + i sin)
    h = tl.arange(0, BLOCK_H)
    hm = (h < H)[:, None]
    qp = Q + b * s_qb + s * s_qs + h[:, None] * s_qh + (NOPE + 2 * i)[None, :] * s_qd
    x0 = tl.load(qp, mask=hm, other=0.0).to(tl.float32)
    x1 = tl.load(qp + s_qd, mask=hm, other=0.0).to(tl.float32)
    tl.store(qp, (x0 * cos - x1 * sin).to(Q.dtype.element_ty), mask=hm)
    tl.store(qp + s_qd, (x0 * sin + x1 * cos).to(Q.dtype.element_ty), mask=hm)
    # the latent: RMSNorm (fp32 inside), written to the cache at pos
    a_row = KVA + b * s_ab + s * s_as
    c = tl.arange(0, BLOCK_C)
    cm = c < C
    cw = c < tl.where(pos < T, C, 0)
    kv = tl.load(a_row + c * s_ad, mask=cm, other=0.0).to(tl.float32)
    kv = kv * tl.rsqrt(tl.sum(kv * kv, axis=0) / C + eps)
    if HAS_W:
        kv = kv * tl.load(NW + c, mask=cm, other=0.0).to(tl.float32)
    tl.store(CKV + b * s_cb + pos * s_ct + c * s_cc, kv.to(CKV.dtype.element_ty), mask=cw)
    # the shared rope key, rotated, written to the cache at pos
    kp = a_row + (C + 2 * i) * s_ad
    k0 = tl.load(kp).to(tl.float32)
    k1 = tl.load(kp + s_ad).to(tl.float32)
    ep = CPE + b * s_eb + pos * s_et + 2 * i * s_er
    tl.store(ep, (k0 * cos - k1 * sin).to(CPE.dtype.element_ty), mask=im)
    tl.store(ep + s_er, (k0 * sin + k1 * cos).to(CPE.dtype.element_ty), mask=im)


def mla_decode_prologue(q: torch.Tensor, kva: torch.Tensor, pos: Union[torch.Tensor, int],
                        freqs: torch.Tensor, norm_weight: Optional[torch.Tensor], eps: float,
                        cache_kv: torch.Tensor, cache_pe: torch.Tensor, nope: int) -> None:
    """Everything of one MLA decode step between the projections and the attention, in one
    launch (it was ~12 small kernels): rotate the rope half of the query in place, and write
    the step's key into the latent cache at `pos`: RMSNorm of the latent, rotated rope key.

    q (B, H, nope + R) (rotated in place); kva (B, C + R): wkv_a's output; pos: a 1-element
    device tensor (graph capture) or an int; freqs (T, R/2) complex64 (open_kimi's table);
    norm_weight (C,) or None; cache_kv (B, T, C), cache_pe (B, T, R). Twin: MLA's PyTorch path
    (open_kimi's apply_rotary_emb, nn.RMSNorm, index_copy_)."""
    mla_prologue(q.unsqueeze(1), kva.unsqueeze(1), pos, freqs, norm_weight, eps, cache_kv,
                 cache_pe, nope)


def mla_prologue(q: torch.Tensor, kva: torch.Tensor, pos: Union[torch.Tensor, int],
                 freqs: torch.Tensor, norm_weight: Optional[torch.Tensor], eps: float,
                 cache_kv: torch.Tensor, cache_pe: torch.Tensor, nope: int) -> None:
    """`mla_decode_prologue` for S tokens per sequence at positions pos .. pos + S - 1 (a
    prefill, or one decode step with S = 1): q (B, S, H, nope + R), kva (B, S, C + R); the
    keys go to cache_kv / cache_pe (B, T, *) at those positions (for a cache-less forward, a
    (B, S, *) buffer and pos 0). One launch, grid (S, B)."""
    B, S, H, D = q.shape
    R = D - nope
    C = kva.shape[2] - R
    if (R % 2 or R & (R - 1) or kva.shape[:2] != (B, S) or cache_kv.shape[2] != C
            or cache_pe.shape[2] != R):
        raise ValueError(f"mla_prologue: shapes q {tuple(q.shape)}, kva {tuple(kva.shape)}, "
                         f"caches {tuple(cache_kv.shape)} / {tuple(cache_pe.shape)} (rope dim a power of 2)")
    fr = torch.view_as_real(freqs)                                 # (T, R/2, 2) fp32, a view
    pos_is_ptr = isinstance(pos, torch.Tensor)
    _prologue_kernel[(S, B)](
        q, kva, pos, fr, norm_weight if norm_weight is not None else kva, cache_kv, cache_pe,
        H, cache_kv.shape[1], float(eps), *q.stride(), *kva.stride(), fr.stride(0), fr.stride(1),
        *cache_kv.stride(), *cache_pe.stride(),
        NOPE=nope, R=R, C=C, POS_IS_PTR=pos_is_ptr, HAS_W=norm_weight is not None,
        BLOCK_H=triton.next_power_of_2(H), BLOCK_C=triton.next_power_of_2(C), num_warps=4)


__all__ = ["mla_decode", "mla_decode_prologue", "mla_prologue", "split_plan", "CONFIG"]
