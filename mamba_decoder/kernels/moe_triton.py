"""The MoE's Triton kernels. SwiGLU over rows: (M, 2I) = [x W1^T | x W3^T] -> silu(h1) * h3
(M, I), optionally each row scaled (a MoE pair's routing weight); the dense-small MoE's gated
form over every expert of a token, its gate from the router's (weights, indices) or computed in
the same pass from the router's scores; and the router alone (scores -> weights, indices). One
read, one write; the twins are `kernels.moe.swiglu_rows`, `gated_swiglu`, `scored_swiglu` and
`route_scores`' PyTorch paths. Imported only when it runs (triton is optional)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ._triton import interpreting


@triton.jit
def _swiglu_rows_kernel(H, S, OUT, I, s_hm, s_om, HAS_S: tl.constexpr, BLOCK: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < I
    a = tl.load(H + m * s_hm + offs, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(H + m * s_hm + I + offs, mask=ok, other=0.0).to(tl.float32)
    y = a / (1.0 + tl.exp(-a)) * b
    if HAS_S:
        y = y * tl.load(S + m).to(tl.float32)
    tl.store(OUT + m * s_om + offs, y.to(OUT.dtype.element_ty), mask=ok)


def swiglu_rows_triton(h13: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    M, I2 = h13.shape
    I = I2 // 2
    out = torch.empty(M, I, device=h13.device, dtype=h13.dtype)
    block = min(1024, triton.next_power_of_2(I))
    _swiglu_rows_kernel[(M, triton.cdiv(I, block))](
        h13, scale if scale is not None else h13, out, I, h13.stride(0), out.stride(0),
        HAS_S=scale is not None, BLOCK=block, num_warps=4)
    return out


@triton.jit
def _round(x, ROUND: tl.constexpr):
    """x (fp32) rounded to the dtype torch computes that step in (0: fp32, 1: bf16, 2: fp16)."""
    if ROUND == 1:
        # round to nearest even by the bits (what cvt.rn.bf16 does; Triton's interpreter
        # truncates a .to(bfloat16)); NaNs are the callers' to flag
        b = x.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        x = b.to(tl.float32, bitcast=True)
    elif ROUND == 2:
        x = x.to(tl.float16).to(tl.float32)
    return x


@triton.jit
def _picked_gate(W, IDX, m, e, s_wm, s_wk, s_im, s_ik, K: tl.constexpr, BLOCK_K: tl.constexpr):
    """Token m's routing weight for expert e from the router's (weights, indices): 0 if not picked."""
    k = tl.arange(0, BLOCK_K)
    wk = tl.load(W + m * s_wm + k * s_wk, mask=k < K, other=0.0).to(tl.float32)
    ik = tl.load(IDX + m * s_im + k * s_ik, mask=k < K, other=-1)
    return tl.sum(tl.where(ik == e, wk, 0.0), axis=0)


@triton.jit
def _topk_picks(S, BIAS, m, s_sm, E, K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
                LOG2_BLOCK_E: tl.constexpr, HAS_BIAS: tl.constexpr, ROUND: tl.constexpr,
                PRECISE: tl.constexpr):
    """Token m's routing from its row of router scores, by kernels.moe.topk_route's ops with
    torch's CUDA roundings: + bias (rounded); softmax as torch's one-warp kernel for rows of up
    to 32 (fp32, CUDA's expf, the sum by a butterfly over next_pow2(E) lanes, a correctly
    rounded division; rounded); top-k with ties to the lowest index (torch's gather of the k-th
    value); w / (sum of the k + 1e-8), each step rounded. Returns the K slots' (weights, experts)
    as (BLOCK_K,) vectors, descending, and whether the row holds a NaN (then the weights are NaN
    and the experts 0..K-1, in range)."""
    j = tl.arange(0, BLOCK_E)
    ok = j < E
    s = tl.load(S + m * s_sm + j, mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        s = _round(s + tl.load(BIAS + j, mask=ok, other=0.0).to(tl.float32), ROUND)
    s = tl.where(ok, s, float("-inf"))
    s = s - tl.max(s, axis=0)
    if PRECISE:
        p = libdevice.exp(s)            # expf, what torch's softmax calls
    else:
        p = tl.exp(s)                   # the interpreter's (numpy's)
    tot = p                             # exp(-inf) = 0 in the padding lanes, as in torch's
    for _ in tl.static_range(LOG2_BLOCK_E):
        tot = tl.sum(tl.reshape(tot, (2, tot.shape[0] // 2)), axis=0)    # lane i + lane i ^ half
    q = _round(tl.math.div_rn(p, tot), ROUND)
    nan = tl.max((q != q).to(tl.int32), axis=0) > 0
    q = tl.where(ok, q, -1.0)           # never picked (probabilities are >= 0)
    kk = tl.arange(0, BLOCK_K)
    pv = tl.zeros((BLOCK_K,), dtype=tl.float32)
    pi = kk                             # what a NaN row keeps: experts 0..K-1
    wsum = 0.0
    for k in tl.static_range(K):
        v = tl.max(q, axis=0)
        i = tl.min(tl.where(q == v, j, BLOCK_E), axis=0)
        wsum += v
        pv = tl.where(kk == k, v, pv)
        pi = tl.where((kk == k) & (i < E), i, pi)       # a NaN row may pick no real expert
        q = tl.where(j == i, -1.0, q)
    den = _round(_round(wsum, ROUND) + 1e-8, ROUND)
    w = _round(tl.math.div_rn(pv, den), ROUND)
    return tl.where(nan, float("nan"), w), pi, nan


@triton.jit
def _scored_gate(S, BIAS, m, e, s_sm, E, K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
                 LOG2_BLOCK_E: tl.constexpr, HAS_BIAS: tl.constexpr, ROUND: tl.constexpr,
                 PRECISE: tl.constexpr):
    """Token m's routing weight for expert e from its row of scores (`_topk_picks`): 0 if not
    picked; NaN for every expert of a row holding a NaN."""
    w, pi, nan = _topk_picks(S, BIAS, m, s_sm, E, K, BLOCK_K, BLOCK_E, LOG2_BLOCK_E, HAS_BIAS, ROUND, PRECISE)
    g = tl.sum(tl.where((pi == e) & (tl.arange(0, BLOCK_K) < K), w, 0.0), axis=0)
    return tl.where(nan, float("nan"), g)


@triton.jit
def _topk_route_kernel(S, BIAS, W, IDX, E, s_sm, K: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_E: tl.constexpr, LOG2_BLOCK_E: tl.constexpr, HAS_BIAS: tl.constexpr,
                       ROUND: tl.constexpr, PRECISE: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    w, pi, nan = _topk_picks(S, BIAS, m, s_sm, E, K, BLOCK_K, BLOCK_E, LOG2_BLOCK_E, HAS_BIAS, ROUND, PRECISE)
    kk = tl.arange(0, BLOCK_K)
    tl.store(W + m * K + kk, w.to(W.dtype.element_ty), mask=kk < K)
    tl.store(IDX + m * K + kk, pi.to(tl.int64), mask=kk < K)


@triton.jit
def _gated_swiglu_kernel(H, W, IDX, S, BIAS, OUT, I, E, s_hm, s_wm, s_wk, s_im, s_ik, s_sm, s_om,
                         K: tl.constexpr, BLOCK_K: tl.constexpr, FROM_SCORES: tl.constexpr,
                         BLOCK_E: tl.constexpr, LOG2_BLOCK_E: tl.constexpr, HAS_BIAS: tl.constexpr,
                         ROUND: tl.constexpr, PRECISE: tl.constexpr, BLOCK: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    e = tl.program_id(1)
    offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < I
    # the dense gate of (token m, expert e): its routing weight if picked, 0 if not, 1 for an
    # always-on expert (e >= E)
    if FROM_SCORES:
        g = _scored_gate(S, BIAS, m, e, s_sm, E, K, BLOCK_K, BLOCK_E, LOG2_BLOCK_E, HAS_BIAS, ROUND, PRECISE)
    else:
        g = _picked_gate(W, IDX, m, e, s_wm, s_wk, s_im, s_ik, K, BLOCK_K)
    g = tl.where(e >= E, 1.0, g)
    row = H + m * s_hm + e * 2 * I
    a = tl.load(row + offs, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(row + I + offs, mask=ok, other=0.0).to(tl.float32)
    y = a / (1.0 + tl.exp(-a)) * b * g
    tl.store(OUT + m * s_om + e * I + offs, y.to(OUT.dtype.element_ty), mask=ok)


def _launch_gated(H, n_experts, n_always_on, K, w=None, idx=None, scores=None, bias=None):
    """One launch of _gated_swiglu_kernel: the gate from (w, idx), or from (scores, bias)."""
    T = H.shape[0]
    E_all = n_experts + n_always_on
    I = H.shape[1] // (2 * E_all)
    out = torch.empty(T, E_all * I, device=H.device, dtype=H.dtype)
    block = min(1024, triton.next_power_of_2(I))
    block_e = triton.next_power_of_2(n_experts)
    from_scores = scores is not None
    if from_scores:
        # the dtype torch rounds each routing step to: scores + bias promotes
        rdt = scores.dtype if bias is None else torch.result_type(scores, bias)
        w_args = (scores, scores, 0, 0, 0, 0)             # (weights, indices) unused
        s_args = (scores, scores if bias is None else bias, scores.stride(0))
    else:
        rdt = None                                         # no routing: nothing rounded
        w_args = (w, idx, *w.stride(), *idx.stride())
        s_args = (w, w, 0)                                 # (scores, bias) unused
    W, IDX, s_wm, s_wk, s_im, s_ik = w_args
    S, BIAS, s_sm = s_args
    _gated_swiglu_kernel[(T, E_all, triton.cdiv(I, block))](
        H, W, IDX, S, BIAS, out, I, n_experts, H.stride(0), s_wm, s_wk, s_im, s_ik, s_sm,
        out.stride(0), K=K, BLOCK_K=triton.next_power_of_2(K), FROM_SCORES=from_scores,
        BLOCK_E=block_e, LOG2_BLOCK_E=block_e.bit_length() - 1,
        HAS_BIAS=from_scores and bias is not None, ROUND=_ROUND[rdt] if from_scores else 0,
        PRECISE=not interpreting(),
        BLOCK=block, num_warps=4)
    return out


_ROUND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _check_router(scores: torch.Tensor, n_experts: int):
    if n_experts > 32 or scores.stride(1) != 1:
        raise ValueError(f"the fused router takes up to 32 experts in unit-stride rows "
                         f"(got E={n_experts}, stride {scores.stride(1)})")


def topk_route_triton(scores: torch.Tensor, bias: torch.Tensor | None, top_k: int):
    """kernels.moe.topk_route (softmax, top-k, renormalized weights) in one launch: (weights,
    indices) (T, k), the weights in torch's promoted dtype, slots by descending weight (ties by
    the lower expert). The same limits and guarantees as `scored_swiglu_triton`."""
    T, E = scores.shape
    _check_router(scores, E)
    rdt = scores.dtype if bias is None else torch.result_type(scores, bias)
    w = torch.empty(T, top_k, device=scores.device, dtype=rdt)
    idx = torch.empty(T, top_k, device=scores.device, dtype=torch.int64)
    block_e = triton.next_power_of_2(E)
    _topk_route_kernel[(T,)](
        scores, scores if bias is None else bias, w, idx, E, scores.stride(0), K=top_k,
        BLOCK_K=triton.next_power_of_2(top_k), BLOCK_E=block_e, LOG2_BLOCK_E=block_e.bit_length() - 1,
        HAS_BIAS=bias is not None, ROUND=_ROUND[rdt], PRECISE=not interpreting(), num_warps=1)
    return w, idx


def gated_swiglu_triton(H: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                        n_experts: int, n_always_on: int) -> torch.Tensor:
    """H (T, E' * 2I) = x @ W13^T ([w1_e; w3_e] per expert) -> (T, E' * I): silu(h1_e) * h3_e
    times the dense gate of (token, e) built from the router's (weights, indices) (T, K)."""
    return _launch_gated(H, n_experts, n_always_on, indices.shape[1], w=weights, idx=indices)


def scored_swiglu_triton(H: torch.Tensor, scores: torch.Tensor, bias: torch.Tensor | None, top_k: int,
                         n_experts: int, n_always_on: int) -> torch.Tensor:
    """`gated_swiglu_triton` with the routing done in the same pass from the router's scores
    (T, E) (x @ gate^T) and adaptive bias (E,) or None: kernels.moe.topk_route's function, for
    E <= 32 and scores of unit column stride. Bit for bit against torch's CUDA ops for top_k <= 2
    (tests/gpu); for larger k the weights' renormalizing sum runs in slot order, which in fp32
    differs from torch's by an ulp of some weights (the experts picked are the same)."""
    _check_router(scores, n_experts)
    return _launch_gated(H, n_experts, n_always_on, top_k, scores=scores, bias=bias)


@triton.jit
def _swiglu_rows_bwd_kernel(H, S, DH, DH13, HOUT, DS, I, s_hm, s_dm, s_gm, s_om,
                            HAS_S: tl.constexpr, BLOCK: tl.constexpr):
    """One row m of the SwiGLU's backward: from h13 = [a | b], the row's scale s and dh, writes
    dh13 = [dh s b sig(a) (1 + a (1 - sig(a))) | dh s silu(a)], h = silu(a) b s (the forward's
    output again, bit for bit: the same ops as _swiglu_rows_kernel) and ds = sum_i dh silu(a) b."""
    m = tl.program_id(0).to(tl.int64)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, I, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < I
        a = tl.load(H + m * s_hm + offs, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(H + m * s_hm + I + offs, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(DH + m * s_dm + offs, mask=ok, other=0.0).to(tl.float32)
        e = 1.0 + tl.exp(-a)
        silu_b = a / e * b                                   # the forward's y before the scale
        sig = 1.0 / e
        if HAS_S:
            s = tl.load(S + m).to(tl.float32)
            tl.store(HOUT + m * s_om + offs, (silu_b * s).to(HOUT.dtype.element_ty), mask=ok)
            acc += g * silu_b
            g = g * s
        else:
            tl.store(HOUT + m * s_om + offs, silu_b.to(HOUT.dtype.element_ty), mask=ok)
        da = g * b * sig * (1.0 + a * (1.0 - sig))
        db = g * a * sig
        tl.store(DH13 + m * s_gm + offs, da.to(DH13.dtype.element_ty), mask=ok)
        tl.store(DH13 + m * s_gm + I + offs, db.to(DH13.dtype.element_ty), mask=ok)
    if HAS_S:
        tl.store(DS + m, tl.sum(acc, axis=0))


def swiglu_rows_bwd_triton(h13: torch.Tensor, scale: torch.Tensor | None, dh: torch.Tensor):
    """(dh13 (M, 2I), h (M, I), dscale (M,) fp32 or None): kernels.moe.swiglu_rows_bwd in one
    pass (reads h13 and dh once, writes dh13 and h once)."""
    M, I2 = h13.shape
    I = I2 // 2
    dh = dh.contiguous()
    dh13 = torch.empty_like(h13)
    h = torch.empty(M, I, device=h13.device, dtype=h13.dtype)
    ds = torch.empty(M, device=h13.device, dtype=torch.float32) if scale is not None else None
    block = min(1024, triton.next_power_of_2(I))
    _swiglu_rows_bwd_kernel[(M,)](
        h13, scale if scale is not None else h13, dh, dh13, h, ds if ds is not None else h, I,
        h13.stride(0), dh.stride(0), dh13.stride(0), h.stride(0),
        HAS_S=scale is not None, BLOCK=block, num_warps=4)
    return dh13, h, ds
