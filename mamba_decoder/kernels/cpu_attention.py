"""Causal attention on the CPU for MLA's prefill: query blocks through oneDNN GEMMs.

torch's CPU flash-attention kernel runs its block products through the BLAS it was built with
(MKL), which on this project's AMD EPYC ran at about a quarter of oneDNN's fp32 GEMM rate; and it
needs Dv == Dqk, so MLA's V (128 wide against 192) had to be zero-padded, a third more work on the
P V side. Here each (batch, head) is a loop over query blocks of BLOCK rows: the block's scores
against every key it can see, S = Q_blk K[:end]^T, as one oneDNN GEMM; the causal softmax
numerators in place and each row's 1/sum in one C pass (`attn_softmax_rows`); (P V)^T =
V^T[:, :end] P^T as a second oneDNN GEMM with the unpadded V; then the rows, scaled by 1/sum,
written into the (B, S, H, Dv) output in a last C pass. The scores above the diagonal of the
block's last BLOCK keys are computed and zeroed: (1 + BLOCK / S) times the causal FLOPs.

B8 H16 L2048, Dqk 192, Dv 128, fp32, 2 threads, quiet (session 9's prototype, torch ops for the
softmax): 905-946 ms against the flash kernel's 1553-2155 ms with V padded.

fp32 CPU inference only (no autograd: the policy's `cpu_attention` is off under grad); the
caller (`attention.naive_sdpa`) keeps SDPA for everything else: masks other than causal, other
dtypes, and calls too small for the host loop to pay (`takes`). Keys given as a (B, H, T, Dqk)
contiguous tensor's permuted view (`attention.join_last(heads_major=True)`) are read in place.
"""
from __future__ import annotations

import torch

from . import cpu_native

BLOCK = 256          # query rows per block: scores (BLOCK, end) stay in L2 up to end ~ 2048
MIN_SCORES = 1 << 18 # S * T per head at least this (512 x 512): below it the host loop over
                     # (batch, head, block) costs more than it saves (B8 H16 L256: 0.90-1.04x
                     # of flash's time, L128: 1.6x; L512 and up: 0.6-0.76x)


def usable(device: torch.device, dtype) -> bool:
    """Whether this path can serve tensors of this device and dtype (for the policy)."""
    from .cpu_gemm import onednn_available

    return device.type == "cpu" and dtype == torch.float32 and onednn_available() and cpu_native.available()[0]


def takes(S: int, T: int) -> bool:
    """Whether a causal call of S queries over T keys is large enough for this path."""
    return S * T >= MIN_SCORES


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     block: int = BLOCK) -> torch.Tensor:
    """softmax(q k^T * scale, causal) v: q (B, S, H, Dqk), k (B, T, H, Dqk), v (B, T, H, Dv) fp32
    CPU, T >= S, query i at position T - S + i seeing keys j <= T - S + i -> (B, S, H, Dv)."""
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in (q, k, v)):   # the C passes read fp32
        raise ValueError(f"causal_attention takes fp32 CPU tensors, got q {q.dtype} {q.device}, "
                         f"k {k.dtype} {k.device}, v {v.dtype} {v.device}")
    B, S, H, Dqk = q.shape
    T, Dv = k.shape[1], v.shape[-1]
    if T < S or k.shape[-1] != Dqk or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"causal_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "do not fit (B, S, H, Dqk), (B, T >= S, H, Dqk), (B, T, H, Dv)")
    lin = torch.ops.mkldnn._linear_pointwise
    lib = cpu_native.load()
    kh = k.permute(0, 2, 1, 3).contiguous()                     # (B, H, T, Dqk): each head's keys a weight
                                                                # (no copy if k is such a view)
    vt = v.permute(0, 2, 3, 1).contiguous()                     # (B, H, Dv, T)
    if q.stride(-1) != 1:
        q = q.contiguous()
    out = q.new_empty(B, S, H, Dv)
    inv = q.new_empty(block)
    ip = inv.data_ptr()
    rows = -(-block // torch.get_num_threads())                 # the softmax pass: one task per thread
    off = T - S
    so = out.stride(1)
    for b in range(B):
        for h in range(H):
            for i in range(0, S, block):
                i1 = min(i + block, S)
                n, end = i1 - i, off + i1
                s = lin(q[b, i:i1, h], kh[b, h, :end], None, "none", [], "")          # (n, end)
                sp, first = s.data_ptr(), off + i
                cpu_native.run_tasks(lambda r0, r1: lib.attn_softmax_rows(sp, end, end, first, scale, ip, r0, r1),
                                     [(r, min(r + rows, n)) for r in range(0, n, rows)])
                ot = lin(vt[b, h, :, :end], s, None, "none", [], "")                  # (Dv, n)
                lib.attn_store_rows(ot.data_ptr(), n, Dv, ip, out[b, i, h].data_ptr(), so, 0, n)
    return out
