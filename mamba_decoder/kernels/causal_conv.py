"""Causal depthwise conv1d + SiLU over channel-major activations (B, ED, L), L contiguous.

y[b, d, t] = silu(bias[d] + sum_k w[d, k] xx[b, d, t + k]),  xx = [initial_state, x] along time
(K-1 zeros when there is no initial state): Mamba's short conv (conv1d with padding K-1, groups
= ED, first L outputs) and its SiLU in one pass. PyTorch's bf16 depthwise conv runs ~6x above
the memory floor at (8, 1024, 2048); this kernel reads x once (the K shifted tap tiles of a
program overlap in L1) and writes y once.

Optionally writes the last K-1 inputs of xx (the next conv cache) into `final_state`, which may
be the initial state itself (an in-place cache update).

Autograd: a torch.autograd.Function whose backward recomputes the conv with PyTorch
(`causal_conv1d_silu_torch`, the twin) on the saved input: simple and exact; the forward, which
training and prefill both run, is the part this kernel speeds up.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import alert_not_deterministic
from ._triton import HAS_TRITON, interpreting as _interpreting, jit as _jit, tl, triton


# (8, 1024, 2048) bf16 is 32 MB in, 32 MB out: memory bound. (8 channels, 256 steps) tiles,
# 4 warps: 16 elements a thread, 8192 programs at the target. The unshifted tap and the store
# can vectorize along time; the K-1 shifted taps (not provably aligned) re-read the same lines
# from L1, and the K-1 halo adds ~1% of DRAM reads. Not swept on a GPU (0.03 ms there at the
# target, docs/BENCHMARKS.md); cfg overrides.
CONV_CONFIG = dict(BLOCK_D=8, BLOCK_L=256, num_warps=4)
# Backward (no initial state): the same tiles, two passes (ds = dy * silu'(s) to an fp32 buffer
# with the weight grads added atomically, then dx as the conv's transpose of ds). One pass
# that rebuilt s at the K shifts of every tile (K^2 tap loads, K sigmoids an element) took
# 0.17 ms at (8, 1024, 2048) bf16 on the H200, against causal_conv1d's 0.035 (NOTES.md run 7).
CONV_BWD_CONFIG = dict(BLOCK_D=8, BLOCK_L=256, num_warps=4)


def causal_conv1d_silu_torch(x, weight, bias=None, initial_state=None, final_state=None):
    """PyTorch twin. x (B, ED, L); weight (ED, K) (or conv1d's (ED, 1, K)); bias (ED,) or None;
    initial_state (B, ED, K-1) or None (zeros); final_state (B, ED, K-1) or None: receives the
    last K-1 inputs (may be initial_state itself). Returns silu(conv) (B, ED, L), x's dtype."""
    if weight.dim() == 2:
        weight = weight.unsqueeze(1)
    ED, K = weight.shape[0], weight.shape[2]
    if initial_state is None:
        L = x.shape[2]
        y = F.conv1d(x, weight, bias, padding=K - 1, groups=ED)[:, :, :L]
        if final_state is not None:
            final_state.copy_(F.pad(x, (K - 1, 0))[:, :, x.shape[2]:])
    else:
        xx = torch.cat([initial_state, x], dim=2)                       # (B, ED, K-1+L)
        if final_state is not None:
            final_state.copy_(xx[:, :, xx.shape[2] - (K - 1):])
        y = F.conv1d(xx, weight, bias, groups=ED)
    return F.silu(y)


@_jit
def _causal_conv_kernel(x_ptr, w_ptr, bias_ptr, s0_ptr, out_ptr, sf_ptr, ED, L,
                        sx_b, sx_d, sx_l, sw_d, sw_k, s0_b, s0_d, s0_k, so_b, so_d, so_l,
                        sf_b, sf_d, sf_k,
                        K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_S0: tl.constexpr,
                        STORE_SF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
                        BLOCK_S: tl.constexpr):
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    md = offs_d < ED
    x_row = x_ptr + b * sx_b + offs_d[:, None] * sx_d
    s_row = s0_ptr + b * s0_b + offs_d[:, None] * s0_d

    acc = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
    for k in tl.static_range(K):
        # tap k reads xx[t + k]: x[t + k - (K-1)] where that is >= 0, else state column t + k
        # (only the first time tile has such columns, since BLOCK_L >= K - 1).
        src = offs_l + (k - (K - 1))
        v = tl.load(x_row + src[None, :] * sx_l,
                    mask=md[:, None] & ((src >= 0) & (src < L))[None, :], other=0.0).to(tl.float32)
        if HAS_S0:
            col = offs_l + k
            v += tl.load(s_row + col[None, :] * s0_k, mask=md[:, None] & (col < K - 1)[None, :],
                         other=0.0).to(tl.float32)
        w_k = tl.load(w_ptr + offs_d * sw_d + k * sw_k, mask=md, other=0.0).to(tl.float32)
        acc += w_k[:, None] * v
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=md, other=0.0).to(tl.float32)[:, None]
    y = acc / (1.0 + tl.exp(-acc))                                      # silu
    tl.store(out_ptr + b * so_b + offs_d[:, None] * so_d + offs_l[None, :] * so_l,
             y.to(out_ptr.dtype.element_ty), mask=md[:, None] & (offs_l < L)[None, :])

    if STORE_SF:
        if pid_l == 0:
            # new state column j = xx[L + j]: x[L - (K-1) + j], or old state column L + j when
            # L < K-1. The state may be updated in place: only this (first) time tile reads it,
            # and it writes the new one after all its threads have read the old (barrier).
            # (names distinct from the loop's: Triton rejects a variable whose shape changes
            # inside an `if`)
            offs_s = tl.arange(0, BLOCK_S)
            ms = md[:, None] & (offs_s < K - 1)[None, :]
            src_s = L - (K - 1) + offs_s
            v_s = tl.load(x_row + src_s[None, :] * sx_l, mask=ms & (src_s >= 0)[None, :], other=0.0)
            if HAS_S0:
                col_s = L + offs_s
                v_s += tl.load(s_row + col_s[None, :] * s0_k, mask=ms & (col_s < K - 1)[None, :],
                               other=0.0)
            tl.debug_barrier()
            tl.store(sf_ptr + b * sf_b + offs_d[:, None] * sf_d + offs_s[None, :] * sf_k,
                     v_s.to(sf_ptr.dtype.element_ty), mask=ms)


def _launch(x, weight, bias, initial_state, final_state, cfg):
    Bsz, ED, L = x.shape
    K = weight.shape[1]
    c = {**CONV_CONFIG, **cfg}
    if c["BLOCK_L"] < K - 1:
        raise ValueError(f"causal_conv1d_silu: BLOCK_L={c['BLOCK_L']} must be >= K-1={K - 1}")
    out = torch.empty(Bsz, ED, L, device=x.device, dtype=x.dtype)
    s0 = initial_state if initial_state is not None else x
    sf = final_state if final_state is not None else x
    grid = (triton.cdiv(L, c["BLOCK_L"]), triton.cdiv(ED, c["BLOCK_D"]), Bsz)
    _causal_conv_kernel[grid](
        x, weight, bias if bias is not None else weight, s0, out, sf, ED, L,
        *x.stride(), weight.stride(0), weight.stride(1), *s0.stride(), *out.stride(), *sf.stride(),
        K=K, HAS_BIAS=bias is not None, HAS_S0=initial_state is not None,
        STORE_SF=final_state is not None, BLOCK_D=c["BLOCK_D"], BLOCK_L=c["BLOCK_L"],
        BLOCK_S=max(triton.next_power_of_2(K - 1), 1), num_warps=c["num_warps"])
    return out


@_jit
def _conv_bwd_ds_kernel(x_ptr, w_ptr, bias_ptr, dy_ptr, ds_ptr, dw_ptr, db_ptr, ED, L,
                        sx_b, sx_d, sx_l, sw_d, sw_k, sdy_b, sdy_d, sdy_l,
                        K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_L: tl.constexpr):
    """Backward of silu(conv(x) + bias), no initial state, step 1: the pre-activation s again
    (K tap loads, the shifted ones L1 hits), ds = dy * silu'(s) into an fp32 (B, ED, L) buffer,
    and dw[k] = sum_t ds[t] x[t + k - (K-1)], db = sum_t ds[t], each program's sums added
    atomically into zeroed fp32 (ED, K) / (ED,) buffers."""
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    md = offs_d < ED
    x_row = x_ptr + b * sx_b + offs_d[:, None] * sx_d
    s = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
    if HAS_BIAS:
        s += tl.load(bias_ptr + offs_d, mask=md, other=0.0).to(tl.float32)[:, None]
    X = ()
    for k in tl.static_range(K):
        src = offs_l + (k - (K - 1))
        v = tl.load(x_row + src[None, :] * sx_l,
                    mask=md[:, None] & ((src >= 0) & (src < L))[None, :], other=0.0).to(tl.float32)
        X = X + (v,)
        s += tl.load(w_ptr + offs_d * sw_d + k * sw_k, mask=md, other=0.0).to(tl.float32)[:, None] * v
    m = md[:, None] & (offs_l < L)[None, :]
    dy = tl.load(dy_ptr + b * sdy_b + offs_d[:, None] * sdy_d + offs_l[None, :] * sdy_l,
                 mask=m, other=0.0).to(tl.float32)
    sig = tl.sigmoid(s)
    ds = dy * sig * (1.0 + s * (1.0 - sig))
    tl.store(ds_ptr + b * ED * L + offs_d[:, None] * L + offs_l[None, :], ds, mask=m)
    for k in tl.static_range(K):
        tl.atomic_add(dw_ptr + offs_d * K + k, tl.sum(ds * X[k], axis=1), mask=md, sem="relaxed")
    if HAS_BIAS:
        tl.atomic_add(db_ptr + offs_d, tl.sum(ds, axis=1), mask=md, sem="relaxed")


@_jit
def _conv_bwd_dx_kernel(ds_ptr, w_ptr, dx_ptr, ED, L, sw_d, sw_k, sdx_b, sdx_d, sdx_l,
                        K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """Step 2: dx[t] = sum_j w[K-1-j] ds[t + j] (the conv's transpose: K shifted loads of ds)."""
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    md = offs_d < ED
    ds_row = ds_ptr + b * ED * L + offs_d[:, None] * L
    acc = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
    for j in tl.static_range(K):
        tj = offs_l + j
        v = tl.load(ds_row + tj[None, :], mask=md[:, None] & (tj < L)[None, :], other=0.0)
        acc += tl.load(w_ptr + offs_d * sw_d + (K - 1 - j) * sw_k, mask=md, other=0.0).to(tl.float32)[:, None] * v
    tl.store(dx_ptr + b * sdx_b + offs_d[:, None] * sdx_d + offs_l[None, :] * sdx_l,
             acc.to(dx_ptr.dtype.element_ty), mask=md[:, None] & (offs_l < L)[None, :])


def _launch_bwd(x, weight, bias, dy, dx=None, sums=None, **cfg):
    """(dx (B, ED, L), dweight (ED, K), dbias (ED,) or None), the weight grads as fp32 sums; dx
    into `dx` if given (any strides, e.g. half of the in-projection's gradient); the weight
    grads added into `sums` if given (a zeroed fp32 buffer of ED * (K + 1) elements or more:
    dweight, then dbias), else into a new one. `cfg` overrides CONV_BWD_CONFIG."""
    alert_not_deterministic("the Triton causal-conv backward")
    Bsz, ED, L = x.shape
    K = weight.shape[1]
    c = {**CONV_BWD_CONFIG, **cfg}
    n_l = triton.cdiv(L, c["BLOCK_L"])
    dx = torch.empty(Bsz, ED, L, device=x.device, dtype=x.dtype) if dx is None else dx
    if sums is None:
        sums = torch.zeros(ED * (K + 1), device=x.device, dtype=torch.float32)
    dw, db = sums[:ED * K].view(ED, K), sums[ED * K:ED * (K + 1)]
    ds = torch.empty(Bsz, ED, L, device=x.device, dtype=torch.float32)
    grid = (n_l, triton.cdiv(ED, c["BLOCK_D"]), Bsz)
    _conv_bwd_ds_kernel[grid](
        x, weight, bias if bias is not None else weight, dy, ds, dw, db, ED, L,
        *x.stride(), weight.stride(0), weight.stride(1), *dy.stride(),
        K=K, HAS_BIAS=bias is not None, BLOCK_D=c["BLOCK_D"], BLOCK_L=c["BLOCK_L"],
        num_warps=c["num_warps"])
    _conv_bwd_dx_kernel[grid](
        ds, weight, dx, ED, L, weight.stride(0), weight.stride(1), *dx.stride(),
        K=K, BLOCK_D=c["BLOCK_D"], BLOCK_L=c["BLOCK_L"], num_warps=c["num_warps"])
    return dx, dw, (db if bias is not None else None)


class _CausalConvSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, initial_state, final_state, cfg):
        y = _launch(x, weight, bias, initial_state, final_state, cfg)
        ctx.save_for_backward(x, weight, bias, initial_state)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, bias, s0 = ctx.saved_tensors
        needs = ctx.needs_input_grad[:4]
        if s0 is None:      # training's case: the Triton backward
            dx, dw, db = _launch_bwd(x, weight, bias, gy)
            return (dx if needs[0] else None, dw.to(weight.dtype) if needs[1] else None,
                    db.to(bias.dtype) if needs[2] and db is not None else None, None, None, None)
        leaves = [t.detach().requires_grad_(n) if t is not None else None
                  for t, n in zip((x, weight, bias, s0), needs)]
        with torch.enable_grad():
            y = causal_conv1d_silu_torch(*leaves)
            wanted = [t for t, n in zip(leaves, needs) if n and t is not None]
            got = iter(torch.autograd.grad(y, wanted, gy)) if wanted else iter(())
        grads = [next(got) if n and t is not None else None for t, n in zip(leaves, needs)]
        return (*grads, None, None)


def causal_conv1d_silu(x, weight, bias=None, initial_state=None, final_state=None, **cfg):
    """Triton twin of `causal_conv1d_silu_torch` (same arguments), differentiable in x, weight,
    bias and initial_state; final_state is written as a side effect (a cache: not tracked)."""
    if not HAS_TRITON:
        raise ValueError("causal_conv1d_silu: triton is not importable")
    if not x.is_cuda and not _interpreting():
        raise ValueError(f"causal_conv1d_silu needs CUDA tensors (got device {x.device}); "
                         "set TRITON_INTERPRET=1 to run the Triton kernel on CPU tensors")
    if weight.dim() == 3:
        weight = weight[:, 0]                                           # conv1d's (ED, 1, K)
    Bsz, ED, L = x.shape
    K = weight.shape[1]
    if weight.shape[0] != ED:
        raise ValueError(f"causal_conv1d_silu: weight {tuple(weight.shape)} for x {tuple(x.shape)}")
    for name, s in (("initial_state", initial_state), ("final_state", final_state)):
        if s is not None and s.shape != (Bsz, ED, K - 1):
            raise ValueError(f"causal_conv1d_silu: {name} must be {(Bsz, ED, K - 1)}, got {tuple(s.shape)}")
    if final_state is not None and final_state.dtype != x.dtype:
        raise ValueError(f"causal_conv1d_silu: final_state dtype {final_state.dtype} != {x.dtype}")
    bias = bias.contiguous() if bias is not None else None              # read with stride 1
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, initial_state))
    if not grad:
        return _launch(x, weight, bias, initial_state, final_state, cfg)
    if initial_state is not None and final_state is not None:
        # the backward recomputes from the initial state, which the in-place update overwrites
        initial_state = initial_state.clone()
    return _CausalConvSiLU.apply(x, weight, bias, initial_state, final_state, cfg)
