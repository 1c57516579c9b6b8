"""Compiled CPU selective scan: one loop over time in C (`kernels/cpu_kernels.c`), vectorized over
16 channels, each channel's (N,) state kept in L1; no (B, L, ED, N) temporary in the forward.

Same signature as `selective_scan_ref` (its twin in the tests). fp32 math whatever the input
dtype (16-bit inputs are upcast once, the output cast back), like the reference.

Autograd: the forward keeps the state at every CHUNK-th step ((B, L / CHUNK, N, ED) fp32); the
backward recomputes each chunk's states from it and runs the chunk in reverse, in C too.

Work is split into (batch, channel range) tasks run on torch's intra-op thread count
(`cpu_native.run_tasks`).
"""
from __future__ import annotations

import ctypes

import torch

from .. import cpu_native

CHUNK = 64   # steps between saved states: backward buffers (CHUNK, N, 16) x 4 stay in L2
VL = 16      # channels per vector in cpu_kernels.c


class _Args(ctypes.Structure):
    _fields_ = ([(k, ctypes.c_int64) for k in ("Bsz", "L", "ED", "N", "chunk")]
                + [("softplus", ctypes.c_int)]
                + [(k, ctypes.c_void_p) for k in ("x", "dt", "z", "Bm", "Cm", "At", "D", "bias", "h0")]
                + [(k, ctypes.c_int64) for k in ("sx_b", "sx_l", "sdt_b", "sdt_l", "sz_b", "sz_l",
                                                  "sB_b", "sB_l", "sB_n", "sC_b", "sC_l", "sC_n",
                                                  "sh0_b", "sh0_d", "sh0_n")]
                + [(k, ctypes.c_void_p) for k in ("out", "hsave", "hfin")]
                + [(k, ctypes.c_int64) for k in ("so_b", "so_l")]
                + [(k, ctypes.c_void_p) for k in ("gout", "ghfin")]
                + [(k, ctypes.c_int64) for k in ("sg_b", "sg_l")]
                + [(k, ctypes.c_void_p) for k in ("gx", "gdt", "gz", "gA", "gD", "gbias", "gB", "gC", "gh0")]
                + [("n_split", ctypes.c_int64)])


def _ptr(t):
    return None if t is None else t.data_ptr()


def _rows(t):
    """fp32, unit stride along the last axis (copies only where needed)."""
    t = t.float()
    return t if t.stride(-1) == 1 else t.contiguous()


def _splits(Bsz: int, ED: int, max_vec: int = 8) -> list[tuple[int, int]]:
    """Channel ranges (multiples of VL) so that B x ranges gives every thread several tasks."""
    nvec = -(-ED // VL)
    want = max(1, -(-4 * torch.get_num_threads() // Bsz))
    per = min(max_vec, -(-nvec // min(nvec, want)))
    return [(d, min(d + per * VL, ED)) for d in range(0, ED, per * VL)]


def _prepare(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state):
    Bsz, L, ED = x.shape
    N = A.shape[1]
    t = dict(x=_rows(x), dt=_rows(dt), z=None if z is None else _rows(z), B=B.float(), C=C.float(),
             At=A.float().t().contiguous(), D=None if D is None else D.float().contiguous(),
             bias=None if dt_bias is None else dt_bias.float().contiguous(),
             h0=None if initial_state is None else initial_state.float())
    a = _Args(Bsz=Bsz, L=L, ED=ED, N=N, chunk=CHUNK, softplus=int(bool(dt_softplus)),
              x=_ptr(t["x"]), dt=_ptr(t["dt"]), z=_ptr(t["z"]), Bm=_ptr(t["B"]), Cm=_ptr(t["C"]),
              At=_ptr(t["At"]), D=_ptr(t["D"]), bias=_ptr(t["bias"]), h0=_ptr(t["h0"]))
    a.sx_b, a.sx_l = t["x"].stride(0), t["x"].stride(1)
    a.sdt_b, a.sdt_l = t["dt"].stride(0), t["dt"].stride(1)
    if t["z"] is not None:
        a.sz_b, a.sz_l = t["z"].stride(0), t["z"].stride(1)
    a.sB_b, a.sB_l, a.sB_n = t["B"].stride()
    a.sC_b, a.sC_l, a.sC_n = t["C"].stride()
    if t["h0"] is not None:
        a.sh0_b, a.sh0_d, a.sh0_n = t["h0"].stride()
    return a, t


def _forward(a, x, keep_states: bool):
    """Runs the forward; returns (out fp32 (B, L, ED), final state (B, ED, N), saved states)."""
    Bsz, L, ED = x.shape
    out = x.new_empty(Bsz, L, ED, dtype=torch.float32)
    hfin = x.new_empty(Bsz, ED, a.N, dtype=torch.float32)
    hsave = x.new_empty(Bsz, -(-L // CHUNK), a.N, ED, dtype=torch.float32) if keep_states else None
    a.out, a.hfin, a.hsave = out.data_ptr(), hfin.data_ptr(), _ptr(hsave)
    a.so_b, a.so_l = out.stride(0), out.stride(1)
    fn = cpu_native.load().scan_fwd
    ref = ctypes.addressof(a)
    cpu_native.run_tasks(lambda b, d0, d1: fn(ref, b, d0, d1),
                         [(b, d0, d1) for b in range(Bsz) for d0, d1 in _splits(Bsz, ED)])
    return out, hfin, hsave


class _Scan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, initial_state, dt_softplus):
        a, t = _prepare(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state)
        out, hfin, hsave = _forward(a, t["x"], keep_states=True)
        ctx.save_for_backward(t["x"], t["dt"], t["z"], t["B"], t["C"], t["At"], t["D"], t["bias"], t["h0"], hsave)
        ctx.dt_softplus = dt_softplus
        ctx.dtypes = tuple(None if v is None else v.dtype for v in (x, dt, A, B, C, D, z, dt_bias, initial_state))
        return out.to(x.dtype), hfin

    @staticmethod
    def backward(ctx, gout, ghfin):
        xf, dtf, zf, Bf, Cf, At, Df, bf, h0f, hsave = ctx.saved_tensors
        a, _ = _prepare(xf, dtf, At.t(), Bf, Cf, Df, zf, bf, ctx.dt_softplus, h0f)
        Bsz, L, ED = xf.shape
        N = a.N
        splits = _splits(Bsz, ED)
        gout = _rows(gout) if gout is not None else xf.new_zeros(Bsz, L, ED)
        ghfin = ghfin.float().contiguous() if ghfin is not None else None
        g = dict(gx=torch.empty_like(xf), gdt=torch.empty_like(xf),
                 gz=torch.empty_like(xf) if zf is not None else None,
                 gA=xf.new_empty(Bsz, N, ED), gD=xf.new_empty(Bsz, ED), gbias=xf.new_empty(Bsz, ED),
                 gB=xf.new_empty(len(splits), Bsz, L, N), gC=xf.new_empty(len(splits), Bsz, L, N),
                 gh0=xf.new_empty(Bsz, ED, N))
        a.hsave, a.gout, a.ghfin = hsave.data_ptr(), gout.data_ptr(), _ptr(ghfin)
        a.sg_b, a.sg_l = gout.stride(0), gout.stride(1)
        for k, v in g.items():
            setattr(a, k, _ptr(v))
        a.n_split = len(splits)
        fn = cpu_native.load().scan_bwd
        ref = ctypes.addressof(a)
        cpu_native.run_tasks(lambda b, d0, d1, s: fn(ref, b, d0, d1, s),
                             [(b, d0, d1, s) for b in range(Bsz) for s, (d0, d1) in enumerate(splits)])
        dx, ddt, dA, dB, dC, dD, dz, dbias, dh0 = ctx.dtypes
        cast = (lambda v, dtype: None if dtype is None else v.to(dtype))
        return (cast(g["gx"], dx), cast(g["gdt"], ddt), cast(g["gA"].sum(0).t(), dA),
                cast(g["gB"].sum(0), dB), cast(g["gC"].sum(0), dC), cast(g["gD"].sum(0), dD),
                cast(g["gz"], dz) if g["gz"] is not None else None, cast(g["gbias"].sum(0), dbias),
                cast(g["gh0"], dh0), None)


def selective_scan_cpu_compiled(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True,
                                initial_state=None, return_final_state=False):
    """Shapes as in `selective_scan` (layout (B, L, ED)); CPU tensors only."""
    if x.device.type != "cpu":
        raise ValueError(f"selective_scan impl='cpu_compiled' runs CPU tensors, got {x.device}")
    tensors = (x, dt, A, B, C, D, z, dt_bias, initial_state)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        out, hfin = _Scan.apply(x, dt, A, B, C, D, z, dt_bias, initial_state, bool(dt_softplus))
    else:
        a, t = _prepare(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state)
        out, hfin, _ = _forward(a, t["x"], keep_states=False)
        out = out.to(x.dtype)
    return (out, hfin) if return_final_state else out
