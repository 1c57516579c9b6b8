"""Routed-expert computation of the MoE: a sort + grouped-GEMM path with no host sync, and twins;
and a "dense-small" path for few tokens (decoding), which runs every expert on every token.

The routed paths take the flat tokens x (T, D), the router's weights and indices (T, K) and the experts'
stacked weights in nn.Linear layout: w1, w3 (E, I, D) and w2 (E, D, I); they return the weighted
sum over each token's K experts, (T, D), without the shared expert.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import autocast_dtype, cpu_fused, cpu_gemm

IMPLS = ("grouped_mm", "dense", "loop")


def _swiglu(h1: torch.Tensor, h3: torch.Tensor) -> torch.Tensor:
    return F.silu(h1) * h3


def swiglu_rows(h13: torch.Tensor, scale: torch.Tensor | None = None, triton: bool = False,
                cpu: bool = False) -> torch.Tensor:
    """h13 (M, 2I) = [x W1^T | x W3^T] -> silu(h1) * h3 (M, I), each row times scale[m] if given.

    With `triton` (the kernel policy's moe_triton), one pass over h13 instead of silu + mul
    (+ mul): at T*K = 32K rows and I = 1024 that is 64 MB less traffic; with `cpu` (the policy's
    cpu_fused) the same single pass in C on fp32 CPU rows. Otherwise, or with autograd, the same
    ops in PyTorch (the twin)."""
    M, I2 = h13.shape
    I = I2 // 2
    needs_grad = torch.is_grad_enabled() and (h13.requires_grad or (scale is not None and scale.requires_grad))
    if cpu and not needs_grad and h13.is_contiguous() and cpu_fused.runs(h13):
        return cpu_fused.swiglu_rows_cpu(h13, scale)
    if needs_grad or h13.stride(1) != 1 or not triton:
        y = _swiglu(h13[:, :I], h13[:, I:])
        return y if scale is None else y * scale.unsqueeze(-1).to(y.dtype)
    from .moe_triton import swiglu_rows_triton   # imports triton: only when it runs

    return swiglu_rows_triton(h13, scale)


def swiglu_rows_bwd(h13: torch.Tensor, scale: torch.Tensor | None, dh: torch.Tensor, triton: bool = False):
    """The backward of `swiglu_rows(h13, scale)` given dh (M, I): (dh13 (M, 2I) in h13's dtype,
    h (M, I) = the forward's output again, dscale (M,) fp32 or None). With `triton`, one pass
    (kernels.moe_triton); otherwise these PyTorch ops (the twin), h by the forward's own ops."""
    if triton:
        from .moe_triton import swiglu_rows_bwd_triton   # imports triton: only when it runs

        return swiglu_rows_bwd_triton(h13, scale, dh)
    I = h13.shape[1] // 2
    h = swiglu_rows(h13, scale)
    a, b, g = h13[:, :I].float(), h13[:, I:].float(), dh.float()
    sig = torch.sigmoid(a)
    ds = None
    if scale is not None:
        ds = (g * a * sig * b).sum(1)
        g = g * scale.float().unsqueeze(-1)
    dh13 = torch.cat([g * b * sig * (1 + a * (1 - sig)), g * a * sig], dim=1).to(h13.dtype)
    return dh13, h, ds


def routed_loop(x, weights, indices, w1, w2, w3):
    """Reference twin: one expert at a time over its tokens (what open_kimi's loop computes)."""
    out = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        tok, slot = torch.nonzero(indices == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        h = _swiglu(x[tok] @ w1[e].t(), x[tok] @ w3[e].t()) @ w2[e].t()   # (n_e, D)
        out.index_add_(0, tok, h * weights[tok, slot].unsqueeze(-1).to(h.dtype))
    return out


def routed_dense(x, weights, indices, w1, w2, w3):
    """Every expert on every token, then pick the K chosen: E/K times the FLOPs, but sync-free.

    The fallback where grouped GEMMs are not available for the device and dtype.
    """
    h = _swiglu(torch.einsum("td,eid->tei", x, w1), torch.einsum("td,eid->tei", x, w3))  # (T, E, I)
    y = torch.einsum("tei,edi->ted", h, w2)                                              # (T, E, D)
    picked = torch.gather(y, 1, indices.unsqueeze(-1).expand(-1, -1, y.shape[-1]))       # (T, K, D)
    return (picked * weights.unsqueeze(-1).to(y.dtype)).sum(1)


def _sort_pairs(indices: torch.Tensor, n_experts: int):
    """The (token, expert) pairs of `indices` (T, K) sorted by expert: (order, tok, offs, inverse),
    where pair j of the sorted list is flat pair order[j] of token tok[j], offs (E,) int32 are
    the experts' row ends and inverse undoes the sort. No host sync."""
    flat = indices.reshape(-1)                                                     # (T*K,)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(n_experts, dtype=torch.int32, device=indices.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return order, order // indices.shape[1], torch.cumsum(counts, 0, dtype=torch.int32), inverse


def routed_grouped(x, weights, indices, w1, w2, w3, w13=None, triton: bool = False,
                   onednn: bool = False, cpu_fused: bool = False):
    """Sort the T*K (token, expert) pairs by expert, run the experts as grouped GEMMs over
    contiguous row ranges, gather back and sum the K slots. No host sync anywhere.

    Given `w13` = cat([w1, w3], 1) (E, 2I, D) (inference: the model caches it), w1 and w3 run
    as one grouped GEMM; without it (training: no per-step weight copy) as two. Each pair's
    routing weight scales its hidden row before w2 (linear in w2), in the same pass as the
    SwiGLU (`swiglu_rows`). With `onednn` (the policy's "onednn-experts": fp32 CPU inference)
    and `w13`, `routed_grouped_onednn` instead."""
    if onednn and w13 is not None and cpu_gemm.runs_onednn(x, w13[0]):
        return routed_grouped_onednn(x, weights, indices, w13, w2, cpu_fused)
    T, K = indices.shape
    order, tok, offs, inverse = _sort_pairs(indices, w1.shape[0])
    xs = x.index_select(0, tok)                                                    # (T*K, D)
    pair_w = weights.reshape(-1).index_select(0, order)                           # (T*K,)
    if w13 is not None:
        h13 = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)                # (T*K, 2I)
        h = swiglu_rows(h13, pair_w.to(h13.dtype), triton)                         # (T*K, I)
    else:
        h = _swiglu(torch._grouped_mm(xs, w1.transpose(1, 2), offs=offs),
                    torch._grouped_mm(xs, w3.transpose(1, 2), offs=offs))
        h = h * pair_w.unsqueeze(-1).to(h.dtype)
    y = torch._grouped_mm(h, w2.transpose(1, 2), offs=offs)                        # (T*K, D), weighted
    # Back to (token, slot) order by a gather, then the sum over the K slots: no scatter-add
    # (bf16 atomics cost 0.14 ms per call at T=16K on an H100) and deterministic.
    return y.index_select(0, inverse).view(T, K, -1).sum(1)


def routed_grouped_onednn(x, weights, indices, w13, w2, cpu_fused: bool = False):
    """`routed_grouped` for fp32 CPU inference: the same sort, gather and slot sum, each expert's
    row range through oneDNN's GEMM (`cpu_gemm`), which ran 2x the rate of the MKL GEMMs that
    torch._grouped_mm loops over on the CPU (at T = 8192: 675-1220 vs 1321-2510 ms, interleaved,
    2 threads, in issue 17's first session). The loop is over the E' groups (7 in the benchmark:
    6 routed, the shared one folded in), their row counts read on the host (no device sync on the
    CPU); each iteration is two GEMMs of about T*K/E' rows, so the loop's own cost (~10 us per
    group) is nothing beside them. Not a loop over small ops: no per-expert nonzero or index_add
    as the reference has. SwiGLU rows in one C pass where `cpu_fused`."""
    T, K = indices.shape
    order, tok, offs, inverse = _sort_pairs(indices, w13.shape[0])
    xs = x.index_select(0, tok)                                                    # (T*K, D) by expert
    pair_w = weights.reshape(-1).index_select(0, order)
    y = x.new_empty(T * K, w2.shape[1])
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            rows = slice(start, end)
            h13 = cpu_gemm.linear(xs[rows], w13[e], None, True)                    # (n, 2I)
            h = swiglu_rows(h13, pair_w[rows], cpu=cpu_fused)                      # (n, I), weighted
            y[rows] = cpu_gemm.linear(h, w2[e], None, True)                        # (n, D)
        start = end
    return y.index_select(0, inverse).view(T, K, -1).sum(1)


class _RoutedGroupedTrain(torch.autograd.Function):
    """The routed experts for training, forward and a hand-written backward over grouped GEMMs:
    x (T, D), the router's weights (T, K) (differentiable) and indices, and the experts'
    w1 / w2 / w3 (nn.Linear layout) as three lists; the last `n_always_on` experts take every
    token with weight 1 (the shared expert folded in). The same function as autograd through
    `routed_grouped` (its twin in the tests), in fewer launches and passes: the experts' w1 and
    w3 run as one grouped GEMM over [w1; w3], the SwiGLU's forward and backward are one pass each
    (`swiglu_rows`, `swiglu_rows_bwd`), the weight gradients are grouped GEMMs over the sorted rows
    (ragged K), and the scatters of autograd's index_select backward (atomic adds) become
    gathers by the inverse permutation and a sum over each token's K slots. Saves h13 (M, 2I)
    and the sort; the gathered tokens xs are gathered again in the backward. The weights in the
    (E, 2I, D) / (E, D, I) layout: the caller's packed ones, else stacked here."""

    @staticmethod
    def forward(ctx, x, weights, indices, n_always_on, triton, packed, *params):
        # under autocast: the experts' GEMMs in its dtype, as nn.Linear's would run (the
        # backward runs outside autocast; autograd casts the gradients back to the inputs')
        amp = autocast_dtype(x.device)
        with torch.autocast(x.device.type, enabled=False):
            return _RoutedGroupedTrain._forward(ctx, amp, x, weights, indices, n_always_on, triton, packed, *params)

    @staticmethod
    def _forward(ctx, amp, x, weights, indices, n_always_on, triton, packed, *params):
        n = len(params) // 3
        w1s, w2s, w3s = params[:n], params[n:2 * n], params[2 * n:]
        T, K = indices.shape
        if n_always_on:
            on = torch.arange(n - n_always_on, n, device=indices.device).expand(T, n_always_on)
            indices = torch.cat([indices, on], dim=1)
            weights = torch.cat([weights, weights.new_ones(T, n_always_on)], dim=1)
        order, tok, offs, inverse = _sort_pairs(indices, n)
        if packed is None:
            w13 = torch.stack([w for pair in zip(w1s, w3s) for w in pair])          # (2E, I, D)
            w13 = w13.view(n, 2 * w13.shape[1], w13.shape[2])                      # (E, 2I, D) = [w1_e; w3_e]
            w2 = torch.stack(w2s)                                                  # (E, D, I)
            versioned = ()
        else:
            # the parameters are views of these: saved too, so that an in-place update of one
            # before the backward raises autograd's error (the packed tensors have their own
            # version counters) instead of a backward through other weights
            w13, w2 = packed
            versioned = params
        if amp is not None:
            x, w13, w2 = x.to(amp), w13.to(amp), w2.to(amp)
        xs = x.index_select(0, tok)                                                # (M, D), M = T*K'
        h13 = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)                # (M, 2I)
        pw = weights.reshape(-1).index_select(0, order).to(h13.dtype)             # (M,)
        h = swiglu_rows(h13, pw, triton)                                           # (M, I), weighted
        y = torch._grouped_mm(h, w2.transpose(1, 2), offs=offs)                    # (M, D)
        ctx.save_for_backward(x, h13, pw, tok, offs, inverse, w13, w2, *versioned)
        ctx.K, ctx.n, ctx.triton, ctx.wdtype = K, n, triton, weights.dtype
        return y.index_select(0, inverse).view(T, -1, y.shape[1]).sum(1)

    @staticmethod
    def backward(ctx, dout):
        x, h13, pw, tok, offs, inverse, w13, w2 = ctx.saved_tensors[:8]
        T, I = x.shape[0], h13.shape[1] // 2
        dy = dout.to(h13.dtype).index_select(0, tok)                               # (M, D)
        dh = torch._grouped_mm(dy, w2, offs=offs)                                  # (M, I)
        dh13, h, dpw = swiglu_rows_bwd(h13, pw, dh, ctx.triton)
        dw2 = torch._grouped_mm(dy.t(), h, offs=offs)                              # (E, D, I)
        dw13 = torch._grouped_mm(dh13.t(), x.index_select(0, tok), offs=offs)     # (E, 2I, D)
        dxs = torch._grouped_mm(dh13, w13, offs=offs)                              # (M, D)
        dx = dxs.index_select(0, inverse).view(T, -1, dxs.shape[1]).sum(1)
        dweights = dpw.index_select(0, inverse).view(T, -1)[:, :ctx.K].to(ctx.wdtype)
        n = ctx.n
        # views of one dw13 / dw2 in the parameters' layout: autograd's AccumulateGrad takes them
        # as the .grad (no copy) where that is None (tests/models/test_moe_packing.py)
        return (dx, dweights, None, None, None, None, *(dw13[e, :I] for e in range(n)),
                *(dw2[e] for e in range(n)), *(dw13[e, I:] for e in range(n)))


def routed_grouped_train(x, weights, indices, w1s, w2s, w3s, n_always_on: int = 0, triton: bool = False,
                         packed: tuple[torch.Tensor, torch.Tensor] | None = None):
    """`routed_grouped` for training (the same function; `_RoutedGroupedTrain`'s backward): the
    experts' weights as lists of their (I, D), (D, I), (I, D) parameters, the last `n_always_on`
    of them on every token with weight 1. `triton` (the policy's moe_swiglu_train) runs the
    SwiGLU's forward and backward as Triton passes. `packed` = (w13 (E, 2I, D), w2 (E, D, I)),
    where the parameters are views of them (w1s[e] = w13[e, :I], w3s[e] = w13[e, I:], w2s[e] =
    w2[e]: the MoE's packed storage), is used as it is; without it the weights are stacked into
    that layout every step (a copy of them all, saved for the backward)."""
    return _RoutedGroupedTrain.apply(x, weights, indices, n_always_on, triton, packed, *w1s, *w2s, *w3s)


# "dense-small": at most this many tokens, every expert runs on every token as two plain GEMMs
# over stacked weights (kernels below): (E' / (K + 1)) times the grouped path's expert FLOPs
# (7/3 for the benchmark's 6 experts, top-2 and a shared one), but no sort / count / index /
# gather, ~15 launches fewer. On CUDA, measured on an H200 (bf16, dim 512, `scripts/profile_gpu.py
# --moe`, docs/BENCHMARKS.md): graphed, dense-small is faster up to 4096 tokens (0.23 vs 0.30 ms)
# and slower at 16384 (0.75 vs 0.64); eager it is ~0.6 ms faster at every size (host launches).
# On the CPU the FLOPs are the cost: only decode-sized calls. With autograd (measured for
# inference only) the backward would also run every expert and the weights would be
# re-concatenated every step: decode sizes there too. For E >> K it computes experts no token
# picked: the limits assume the benchmark's few experts.
DENSE_SMALL_MAX_TOKENS = {"cuda": 4096, "cpu": 64}
DENSE_SMALL_MAX_TOKENS_AUTOGRAD = 64


def dense_small_max_tokens(device: torch.device, autograd: bool = False) -> int:
    """The dense-small limit for tensors on `device` (other device types: the CPU's)."""
    n = DENSE_SMALL_MAX_TOKENS.get(device.type, DENSE_SMALL_MAX_TOKENS["cpu"])
    return min(n, DENSE_SMALL_MAX_TOKENS_AUTOGRAD) if autograd else n


def dense_gate(weights, indices, n_experts: int, n_always_on: int = 0):
    """The router's top-k (weights, indices) (T, K) as a dense (T, E) gate, exactly zero for the
    experts a token did not pick, and `n_always_on` columns of ones appended (a shared expert)."""
    gate = weights.new_zeros(indices.shape[0], n_experts + n_always_on)
    if n_always_on:
        gate[:, n_experts:] = 1
    # in place into a fresh tensor: one launch fewer than scatter + cat (decode counts launches)
    return gate.scatter_add_(1, indices, weights)


def gated_swiglu(H, weights, indices, n_experts: int, n_always_on: int = 0, triton: bool = False):
    """H (T, E' * 2I) = x @ W13^T -> (T, E' * I): each expert's silu(h1) * h3 times its dense
    gate (`dense_gate`: the routing weight if the token picked it, exactly 0 if not, 1 for the
    always-on experts appended last). With `triton`, one Triton pass in inference (no gate
    tensor, one launch instead of five); the PyTorch ops otherwise and with autograd (the twin)."""
    T = H.shape[0]
    E = n_experts + n_always_on
    needs_grad = torch.is_grad_enabled() and (H.requires_grad or weights.requires_grad)
    if not needs_grad and H.stride(1) == 1 and triton:
        from .moe_triton import gated_swiglu_triton   # imports triton: only when it runs

        return gated_swiglu_triton(H, weights, indices, n_experts, n_always_on)
    Hv = H.view(T, E, 2, -1)
    gate = dense_gate(weights, indices, n_experts, n_always_on)                    # (T, E')
    h = _swiglu(Hv[:, :, 0], Hv[:, :, 1]) * gate.unsqueeze(-1).to(H.dtype)         # (T, E', I)
    return h.reshape(T, -1)


def topk_route(scores, bias, top_k: int):
    """open_kimi's MoEGate after its GEMM, op for op: scores (T, E) (+ the adaptive bias (E,),
    or None), softmax, top-k, the k weights renormalized -> (weights, indices) (T, k)."""
    if bias is not None:
        scores = scores + bias.unsqueeze(0)
    probs = F.softmax(scores, dim=-1)
    w, idx = torch.topk(probs, top_k, dim=-1)
    return w / (w.sum(dim=-1, keepdim=True) + 1e-8), idx


# The fused router (routing inside the gated SwiGLU's pass): softmax rows of up to this many
# experts (torch's one-warp softmax, whose summation order the kernel repeats), top-k of up to 2
# (the renormalizing sum of two weights has one order; torch's order for more was measured to
# differ in fp32, by an ulp of the weights: docs/BENCHMARKS.md), in these dtypes.
FUSED_ROUTER_MAX_EXPERTS = 32
FUSED_ROUTER_MAX_TOPK = 2
_ROUTER_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def router_fuses(device: torch.device, dtype: torch.dtype, n_experts: int, top_k: int,
                 triton: bool) -> bool:
    """Whether `scored_swiglu` and `route_scores` route in Triton for this dtype and router when
    `triton` (the policy's moe_triton) allows it (in inference; with autograd they never do).
    Not under autocast on `device`, where torch's softmax and sum run in fp32 whatever the
    scores' dtype (the kernel rounds to the scores')."""
    return (triton and dtype in _ROUTER_DTYPES and n_experts <= FUSED_ROUTER_MAX_EXPERTS
            and top_k <= FUSED_ROUTER_MAX_TOPK and not torch.is_autocast_enabled(device.type))


def _fused_router_runs(scores, bias, top_k: int, n_experts: int, *others, triton: bool) -> bool:
    """Whether these tensors take the Triton router: `router_fuses`, no autograd through any of
    them (the kernels have no backward), a bias of a router dtype, unit column strides."""
    tensors = (scores, *others) if bias is None else (scores, bias, *others)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return ((bias is None or bias.dtype in _ROUTER_DTYPES)
            and all(t.stride(1) == 1 for t in (scores, *others))
            and router_fuses(scores.device, scores.dtype, n_experts, top_k, triton))


def route_scores(scores, bias, top_k: int, triton: bool = False):
    """`topk_route(scores, bias, top_k)`; with `triton`, in inference, one Triton launch instead of
    six (the grouped path's router), bit for bit the same (weights, experts) (tests/gpu; the slots
    of tied weights may come in another order, which the weighted sum over slots does not see)."""
    if _fused_router_runs(scores, bias, top_k, scores.shape[1], triton=triton):
        from .moe_triton import topk_route_triton   # imports triton: only when it runs

        return topk_route_triton(scores, bias, top_k)
    return topk_route(scores, bias, top_k)


def scored_swiglu(H, scores, bias, top_k: int, n_experts: int, n_always_on: int = 0, triton: bool = False):
    """`gated_swiglu` of the routing `topk_route(scores, bias, top_k)`. With `triton`, in inference,
    one Triton pass routes and gates (six launches fewer than the PyTorch router: decoding and
    small prefills are launch-bound); bit for bit the PyTorch ops' routing (tests/gpu). Otherwise,
    with autograd, or past the FUSED_ROUTER_* limits, those ops then `gated_swiglu` (the twin)."""
    if _fused_router_runs(scores, bias, top_k, n_experts, H, triton=triton):
        from .moe_triton import scored_swiglu_triton   # imports triton: only when it runs

        return scored_swiglu_triton(H, scores, bias, top_k, n_experts, n_always_on)
    w, idx = topk_route(scores, bias, top_k)
    return gated_swiglu(H, w, idx, n_experts, n_always_on, triton)


def routed_dense_small(x, weights, indices, n_experts: int, n_always_on: int, W13, W2, triton: bool = False):
    """Every expert on every token, weighted by the dense gate of the router's (weights,
    indices) (T, K): x (T, D), W13 (E' * 2I, D) = [w1_0; w3_0; w1_1; w3_1; ...] (the grouped
    path's w13 (E', 2I, D) seen flat) and W2 (D, E' * I) = [w2_0, w2_1, ...] (each expert's w2
    side by side), the `n_always_on` experts last -> sum_e gate[:, e] * expert_e(x).
    Two GEMMs and one elementwise pass: no sort, no index, no host sync. The gate scales the
    hidden activations (linear in W2), so unpicked experts contribute exactly zero."""
    H = F.linear(x, W13)                                                           # (T, E' * 2I)
    return F.linear(gated_swiglu(H, weights, indices, n_experts, n_always_on, triton), W2)  # (T, D)


def scored_dense_small(x, scores, bias, top_k: int, n_experts: int, n_always_on: int, W13, W2,
                       triton: bool = False):
    """`routed_dense_small` of the routing `topk_route(scores, bias, top_k)`, the routing fused
    into the gated pass where it runs (`scored_swiglu`)."""
    H = F.linear(x, W13)
    return F.linear(scored_swiglu(H, scores, bias, top_k, n_experts, n_always_on, triton), W2)


@functools.lru_cache(maxsize=None)
def grouped_mm_fits(dim: int, inter: int, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm takes a MoE of these widths: every operand's row stride must be a
    multiple of 16 bytes (the model width and the expert width, times the element size), else it
    raises "strides should be multiple of 16 bytes" (e.g. --dim 30 in fp32, an expert width of 100
    in bf16)."""
    elt = dtype.itemsize               # called per forward: no tensor made for it
    return dim * elt % 16 == 0 and inter * elt % 16 == 0


def grouped_mm_works(device_type: str, device_index: int | None, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm runs for this device and dtype (probed once, at a tiny size, on
    numbers from its own generator: the first forward must not move the caller's random stream;
    outside autocast, whose bf16 reference product would fail the fp32 probe for good)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    dev = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    g = torch.Generator().manual_seed(0)
    try:
        a = torch.randn(32, 16, generator=g).to(dev, dtype)
        b = torch.randn(2, 32, 16, generator=g).to(dev, dtype).transpose(1, 2)
        offs = torch.tensor([16, 32], device=dev, dtype=torch.int32)
        with torch.autocast(dev.type, enabled=False):
            got = torch._grouped_mm(a, b, offs=offs)
            want = torch.cat([a[:16] @ b[0], a[16:] @ b[1]])
        return bool(torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2))
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def auto_impl(device: torch.device, dtype: torch.dtype) -> str:
    """grouped_mm where it is a real grouped kernel: on CUDA that is bf16 on sm90+ (for other
    dtypes torch 2.11 falls back to a loop that copies the offsets to the host: a sync, and no
    CUDA graph); on the CPU wherever it runs. Elsewhere the sync-free dense path."""
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        native = dtype == torch.bfloat16 and torch.cuda.get_device_capability(idx) >= (9, 0)
        return "grouped_mm" if native and grouped_mm_works("cuda", idx, dtype) else "dense"
    return "grouped_mm" if grouped_mm_works(device.type, device.index, dtype) else "dense"


def routed_experts(x, weights, indices, w1, w2, w3, impl: str = "auto"):
    if impl == "auto":
        impl = auto_impl(x.device, x.dtype)
    if impl == "grouped_mm":
        return routed_grouped(x, weights, indices, w1, w2, w3)
    if impl == "dense":
        return routed_dense(x, weights, indices, w1, w2, w3)
    if impl == "loop":
        return routed_loop(x, weights, indices, w1, w2, w3)
    raise ValueError(f"impl={impl!r} is not one of auto, {', '.join(IMPLS)}")
