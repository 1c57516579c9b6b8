"""Chunked CPU selective scan.

Per chunk of T timesteps the decay exp(delta*A) and the input delta*B*x are built vectorized as
(T, B, ED, N) (time-major so each step's slice is contiguous), then a short in-place time loop
turns the input buffer into the states, and one batched contraction with C gives y. Only one
chunk of (T, B, ED, N) is alive at a time, so memory is O(chunk) without autograd.

With autograd enabled the loop uses out-of-place ops (autograd must keep every step's state
anyway), so that path is O(L) memory, like any plain-torch autograd scan.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

DEFAULT_CHUNK = 32  # measured best at ED=1024, N=16 on 2 cores (fits cache)


@contextlib.contextmanager
def _one_thread():
    """The chunk loop is hundreds of small ops on cache-sized (T, B, ED, N) tiles: splitting
    each over threads buys little and costs a barrier per op, which becomes a stall whenever
    another process holds a core (scan at B4 L512 ED1024, loaded 2-core machine: 5.0 s with 2
    threads, 0.18 s with 1). The GEMMs around the scan keep the caller's thread count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def selective_scan_cpu(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True,
                       initial_state=None, return_final_state=False, chunk=DEFAULT_CHUNK):
    Bsz, L, ED = x.shape
    N = A.shape[1]
    xf = x.float()  # (B, L, ED)
    dtf = dt.float()
    if dt_bias is not None:
        dtf = dtf + dt_bias.float()
    delta = F.softplus(dtf) if dt_softplus else dtf  # (B, L, ED)
    Af = A.float()  # (ED, N)
    Bf = B.float()  # (B, L, N)  (strided views are fine: only read per chunk)
    Cf = C.float()  # (B, L, N)
    dx = delta * xf  # (B, L, ED)

    if initial_state is not None:
        h = initial_state.float()  # (B, ED, N)
    else:
        h = xf.new_zeros(Bsz, ED, N)

    track_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (x, dt, A, B, C, D, z, dt_bias, initial_state))

    with _one_thread():
        ys, h = _chunks(delta, Af, Bf, Cf, dx, h, L, chunk, track_grad)
    y = torch.cat(ys, dim=1) if ys else xf.new_zeros(Bsz, 0, ED)  # (B, L, ED)
    if D is not None:
        y = y + D.float() * xf
    if z is not None:
        y = y * F.silu(z.float())
    out = y.to(x.dtype)
    if return_final_state:
        return out, h
    return out


def _chunks(delta, Af, Bf, Cf, dx, h, L, chunk, track_grad):
    Bsz, _, ED = delta.shape
    N = Af.shape[1]
    ys = []
    for s in range(0, L, chunk):
        e = min(s + chunk, L)
        d_c = delta[:, s:e].transpose(0, 1)  # (T, B, ED)
        dA = torch.exp(d_c.unsqueeze(-1) * Af)  # (T, B, ED, N)
        B_c = Bf[:, s:e].transpose(0, 1)  # (T, B, N)
        # (T, B, ED, 1) * (T, B, 1, N) -> (T, B, ED, N)
        u = dx[:, s:e].transpose(0, 1).unsqueeze(-1) * B_c.unsqueeze(2)
        if track_grad:
            hs = []
            for t in range(e - s):
                h = torch.addcmul(u[t], dA[t], h)  # (B, ED, N)
                hs.append(h)
            hs = torch.stack(hs, dim=0)  # (T, B, ED, N)
        else:
            hs = u.contiguous()  # turned into the states in place
            hs[0].addcmul_(dA[0], h)
            for t in range(1, e - s):
                hs[t].addcmul_(dA[t], hs[t - 1])
            h = hs[-1].clone()
        C_c = Cf[:, s:e].transpose(0, 1)  # (T, B, N)
        # (T*B, ED, N) @ (T*B, N, 1) -> (T, B, ED)
        T = e - s
        y_c = torch.bmm(hs.reshape(T * Bsz, ED, N), C_c.reshape(T * Bsz, N, 1)).view(T, Bsz, ED)
        ys.append(y_c.transpose(0, 1))  # (B, T, ED)
    return ys, h
