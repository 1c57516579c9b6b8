"""Ground-truth implementations of the Mamba-1 selective scan.

`selective_scan_ref` is the readable twin every fast path is tested against: fp32 math,
one explicit step per timestep. `selective_scan_pscan` runs the same op through mambapy's
`pscan`, the way mambapy's MambaBlock.selective_scan does, so tests can pin our reference
to the field's own implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _prepare(x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    """Upcast everything to fp32 and compute delta. Returns fp32 tensors."""
    xf = x.float()  # (B, L, ED)
    dtf = dt.float()  # (B, L, ED)
    if dt_bias is not None:
        dtf = dtf + dt_bias.float()
    delta = F.softplus(dtf) if dt_softplus else dtf  # (B, L, ED)
    Af = A.float()  # (ED, N)
    Bf = B.float()  # (B, L, N)
    Cf = C.float()  # (B, L, N)
    Df = D.float() if D is not None else None  # (ED,)
    zf = z.float() if z is not None else None  # (B, L, ED)
    return xf, delta, Af, Bf, Cf, Df, zf


def _finish(y, xf, Df, zf, out_dtype):
    # y: (B, L, ED) fp32
    if Df is not None:
        y = y + Df * xf
    if zf is not None:
        y = y * F.silu(zf)
    return y.to(out_dtype)


def selective_scan_ref(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True,
                       initial_state=None, return_final_state=False):
    """Sequential fp32 reference. Shapes as in `selective_scan`. Differentiable."""
    xf, delta, Af, Bf, Cf, Df, zf = _prepare(x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    Bsz, L, ED = xf.shape
    N = Af.shape[1]
    if initial_state is not None:
        h = initial_state.float()  # (B, ED, N)
    else:
        h = xf.new_zeros(Bsz, ED, N)
    ys = []
    for t in range(L):
        d_t = delta[:, t, :, None]  # (B, ED, 1)
        dA = torch.exp(d_t * Af)  # (B, ED, N)
        dBx = d_t * Bf[:, t, None, :] * xf[:, t, :, None]  # (B, ED, N)
        h = dA * h + dBx  # (B, ED, N)
        ys.append((h * Cf[:, t, None, :]).sum(-1))  # (B, ED)
    y = torch.stack(ys, dim=1) if L > 0 else xf.new_zeros(Bsz, 0, ED)  # (B, L, ED)
    out = _finish(y, xf, Df, zf, x.dtype)
    if return_final_state:
        return out, h
    return out


def selective_scan_pscan(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True,
                         initial_state=None, return_final_state=False):
    """Same op through mambapy's parallel scan (materializes (B, L, ED, N), as mambapy does)."""
    from mambapy.pscan import pscan

    xf, delta, Af, Bf, Cf, Df, zf = _prepare(x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    deltaA = torch.exp(delta.unsqueeze(-1) * Af)  # (B, L, ED, N)
    deltaB = delta.unsqueeze(-1) * Bf.unsqueeze(2)  # (B, L, ED, N)
    BX = deltaB * xf.unsqueeze(-1)  # (B, L, ED, N)
    if initial_state is not None:
        # h_0 = dA_0 * h_init + BX_0: fold the initial state into the first input.
        first = BX[:, :1] + deltaA[:, :1] * initial_state.float().unsqueeze(1)
        BX = torch.cat([first, BX[:, 1:]], dim=1)
    hs = pscan(deltaA, BX)  # (B, L, ED, N)
    y = (hs @ Cf.unsqueeze(-1)).squeeze(3)  # (B, L, ED)
    out = _finish(y, xf, Df, zf, x.dtype)
    if return_final_state:
        return out, hs[:, -1]
    return out
