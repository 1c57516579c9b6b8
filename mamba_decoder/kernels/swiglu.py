"""Triton SwiGLU over rows: (M, 2I) = [x W1^T | x W3^T] -> silu(h1) * h3 (M, I), optionally
each row scaled (a MoE pair's routing weight); and the dense-small MoE's gated form over every
expert of a token. One read, one write; the twins are `kernels.moe.swiglu_rows` and
`kernels.moe.gated_swiglu`'s PyTorch paths. Imported only when it runs (triton is optional)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


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
def _gated_swiglu_kernel(H, W, IDX, OUT, I, E, s_hm, s_wm, s_wk, s_im, s_ik, s_om,
                         K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    e = tl.program_id(1)
    offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < I
    # the dense gate of (token m, expert e): its routing weight if picked, 0 if not, 1 for an
    # always-on expert (e >= E)
    k = tl.arange(0, BLOCK_K)
    wk = tl.load(W + m * s_wm + k * s_wk, mask=k < K, other=0.0).to(tl.float32)
    ik = tl.load(IDX + m * s_im + k * s_ik, mask=k < K, other=-1)
    g = tl.sum(tl.where(ik == e, wk, 0.0), axis=0) + tl.where(e >= E, 1.0, 0.0)
    row = H + m * s_hm + e * 2 * I
    a = tl.load(row + offs, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(row + I + offs, mask=ok, other=0.0).to(tl.float32)
    y = a / (1.0 + tl.exp(-a)) * b * g
    tl.store(OUT + m * s_om + e * I + offs, y.to(OUT.dtype.element_ty), mask=ok)


def gated_swiglu_triton(H: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                        n_experts: int, n_always_on: int) -> torch.Tensor:
    """H (T, E' * 2I) = x @ W13^T ([w1_e; w3_e] per expert) -> (T, E' * I): silu(h1_e) * h3_e
    times the dense gate of (token, e) built from the router's (weights, indices) (T, K)."""
    T = H.shape[0]
    E_all = n_experts + n_always_on
    I = H.shape[1] // (2 * E_all)
    out = torch.empty(T, E_all * I, device=H.device, dtype=H.dtype)
    K = indices.shape[1]
    block = min(1024, triton.next_power_of_2(I))
    _gated_swiglu_kernel[(T, E_all, triton.cdiv(I, block))](
        H, weights, indices, out, I, n_experts, H.stride(0), *weights.stride(), *indices.stride(),
        out.stride(0), K=K, BLOCK_K=triton.next_power_of_2(K), BLOCK=block, num_warps=4)
    return out
