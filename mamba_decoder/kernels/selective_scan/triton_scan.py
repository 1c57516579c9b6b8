"""Triton selective scan (Mamba-1): chunked forward and a chunk-recomputing reverse backward.

Layout of the work: one program per (ED-block, batch). It keeps a (BLOCK_D, BLOCK_N) fp32 state
in registers and walks time in chunks of CHUNK steps. Inside a chunk the recurrence
h_t = a_t * h_{t-1} + b_t is solved with tl.associative_scan over the time axis of
(BLOCK_D, CHUNK, BLOCK_N) tiles, then the carried state is folded in:
h_t = prefix_b_t + prefix_a_t * h_carry. (B, L, ED, N) never exists in global memory.

Backward: the forward stores the state entering every chunk, (B, n_chunks, ED, N) fp32. The
backward kernel walks the chunks in reverse, recomputes the chunk's states from that boundary
state, and runs a reverse-time scan for the state adjoint
g_t = dA_{t+1} * g_{t+1} + C_t * dy_t. Grads that reduce over ED (dB, dC) or batch (dA, dD,
dt_bias) are written as fp32 per-program partials and summed in torch (no atomics).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Defaults picked on an H100 (torch 2.11, triton 3.6) by bench_gpu.py --tune at
# (B, L, ED, N) = (8, 2048, 1024, 16): larger (BLOCK_D * CHUNK * N) tiles spill registers.
# The backward uses the forward's CHUNK since it restarts from the states stored at the
# forward's chunk boundaries; CHUNK=32 was best for fwd + bwd together.
FWD_CONFIG = dict(BLOCK_D=8, CHUNK=32, num_warps=4)
BWD_CONFIG = dict(BLOCK_D=8, num_warps=4)
# Candidate configs for tuning (used by bench_gpu.py --tune; never tried automatically, since
# autotuning under TRITON_INTERPRET=1 is very slow).
TUNE_CONFIGS = [
    dict(BLOCK_D=bd, CHUNK=ch, num_warps=nw)
    for bd in (4, 8, 16) for ch in (32, 64) for nw in (2, 4, 8)
]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# Triton's interpreter runs tl.associative_scan with a custom combine fn one element at a time in
# Python (~0.5 ms per element), which makes CPU tests crawl. Under TRITON_INTERPRET=1 the chunk
# scan therefore defaults to an equivalent step-by-step loop over the chunk (whole-tile numpy
# ops). Set MAMBA_SCAN_INTERPRET_ASSOC=1 (or this flag to False) to interpret the real
# tl.associative_scan path; the tests do that at a tiny shape. On GPU the scan is always used.
INTERPRET_SEQ_SCAN = os.environ.get("MAMBA_SCAN_INTERPRET_ASSOC") != "1"


def _seq_scan_flag() -> bool:
    return _interpreting() and INTERPRET_SEQ_SCAN


@triton.jit
def _scan_combine(a1, b1, a2, b2):
    # (a1, b1) is the earlier step: h -> a2 * (a1 * h + b1) + b2
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _chunk_scan(a, b, offs_t, CHUNK: tl.constexpr, REVERSE: tl.constexpr, SEQ: tl.constexpr):
    """Inclusive scan of h -> a*h + b along axis 1 of (BLOCK_D, CHUNK, BLOCK_N) tiles.

    Returns (prod of a over the prefix, prefix result from h = 0); REVERSE runs from the end.
    """
    if SEQ:
        # interpreter-only twin of the associative scan: one whole-tile step per timestep
        acc_a = tl.sum(a * 0.0, axis=1) + 1.0  # (BLOCK_D, BLOCK_N)
        acc_b = tl.sum(b * 0.0, axis=1)
        pa = a * 0.0
        pb = b * 0.0
        for k in tl.static_range(CHUNK):
            if REVERSE:
                sel = (offs_t == CHUNK - 1 - k)[None, :, None]
            else:
                sel = (offs_t == k)[None, :, None]
            a_k = tl.sum(tl.where(sel, a, 0.0), axis=1)
            b_k = tl.sum(tl.where(sel, b, 0.0), axis=1)
            acc_b = a_k * acc_b + b_k
            acc_a = acc_a * a_k
            pa = tl.where(sel, acc_a[:, None, :], pa)
            pb = tl.where(sel, acc_b[:, None, :], pb)
        return pa, pb
    else:
        return tl.associative_scan((a, b), axis=1, combine_fn=_scan_combine, reverse=REVERSE)


@triton.jit
def _softplus(u):
    # stable log(1 + exp(u))
    return tl.maximum(u, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(u)))


@triton.jit
def _ssm_fwd_kernel(
    x_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, A_ptr, D_ptr, bias_ptr, h0_ptr,
    out_ptr, hfin_ptr, states_ptr,
    L, ED, N,
    sx_b, sx_l, sx_d, sdt_b, sdt_l, sdt_d, sz_b, sz_l, sz_d,
    sB_b, sB_l, sB_n, sC_b, sC_l, sC_n, sA_d, sA_n,
    so_b, so_l, so_d,
    HAS_Z: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    SOFTPLUS: tl.constexpr, STORE_STATES: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, SEQ_SCAN: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    offs_t = tl.arange(0, CHUNK)  # (CHUNK,)
    mask_d = offs_d < ED
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]  # (BLOCK_D, BLOCK_N)

    # padded d / n lanes get A = 0 and B = C = 0, so they stay inert
    A = tl.load(A_ptr + offs_d[:, None] * sA_d + offs_n[None, :] * sA_n,
                mask=mask_dn, other=0.0).to(tl.float32)  # (BLOCK_D, BLOCK_N)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)

    st_off = offs_d[:, None] * N + offs_n[None, :]  # into a contiguous (ED, N) slab
    if HAS_H0:
        h = tl.load(h0_ptr + pid_b * ED * N + st_off, mask=mask_dn, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)

    x_base = x_ptr + pid_b * sx_b
    dt_base = dt_ptr + pid_b * sdt_b
    z_base = z_ptr + pid_b * sz_b
    B_base = B_ptr + pid_b * sB_b
    C_base = C_ptr + pid_b * sC_b
    o_base = out_ptr + pid_b * so_b

    n_chunks = tl.cdiv(L, CHUNK)
    for c in range(0, n_chunks):
        if STORE_STATES:
            # state entering chunk c, for the backward's recomputation
            tl.store(states_ptr + (pid_b * n_chunks + c) * ED * N + st_off, h, mask=mask_dn)
        t = c * CHUNK + offs_t  # (CHUNK,)
        mask_t = t < L
        mask_dt = mask_d[:, None] & mask_t[None, :]  # (BLOCK_D, CHUNK)
        mask_tn = mask_t[:, None] & mask_n[None, :]  # (CHUNK, BLOCK_N)

        x = tl.load(x_base + t[None, :] * sx_l + offs_d[:, None] * sx_d,
                    mask=mask_dt, other=0.0).to(tl.float32)  # (BLOCK_D, CHUNK)
        u = tl.load(dt_base + t[None, :] * sdt_l + offs_d[:, None] * sdt_d,
                    mask=mask_dt, other=0.0).to(tl.float32)  # (BLOCK_D, CHUNK)
        if HAS_BIAS:
            u = u + bias[:, None]
        if SOFTPLUS:
            delta = _softplus(u)
        else:
            delta = u
        # padded steps get delta = 0: decay 1, input 0, so the carried state passes through
        delta = tl.where(mask_dt, delta, 0.0)
        Bm = tl.load(B_base + t[:, None] * sB_l + offs_n[None, :] * sB_n,
                     mask=mask_tn, other=0.0).to(tl.float32)  # (CHUNK, BLOCK_N)
        Cm = tl.load(C_base + t[:, None] * sC_l + offs_n[None, :] * sC_n,
                     mask=mask_tn, other=0.0).to(tl.float32)  # (CHUNK, BLOCK_N)

        dA = tl.exp(delta[:, :, None] * A[:, None, :])  # (BLOCK_D, CHUNK, BLOCK_N)
        dBx = (delta * x)[:, :, None] * Bm[None, :, :]  # (BLOCK_D, CHUNK, BLOCK_N)
        pa, pb = _chunk_scan(dA, dBx, offs_t, CHUNK, False, SEQ_SCAN)
        hs = pb + pa * h[:, None, :]  # (BLOCK_D, CHUNK, BLOCK_N)

        y = tl.sum(hs * Cm[None, :, :], axis=2)  # (BLOCK_D, CHUNK)
        if HAS_D:
            y = y + Dv[:, None] * x
        if HAS_Z:
            z = tl.load(z_base + t[None, :] * sz_l + offs_d[:, None] * sz_d,
                        mask=mask_dt, other=0.0).to(tl.float32)
            y = y * (z * tl.sigmoid(z))
        tl.store(o_base + t[None, :] * so_l + offs_d[:, None] * so_d,
                 y.to(out_ptr.dtype.element_ty), mask=mask_dt)

        # carry the chunk's last state
        h = tl.sum(tl.where((offs_t == CHUNK - 1)[None, :, None], hs, 0.0), axis=1)

    tl.store(hfin_ptr + pid_b * ED * N + st_off, h, mask=mask_dn)


@triton.jit
def _ssm_bwd_kernel(
    x_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, A_ptr, D_ptr, bias_ptr, states_ptr,
    dout_ptr, dhfin_ptr,
    dx_ptr, ddt_ptr, dz_ptr, dBp_ptr, dCp_ptr, dAp_ptr, dDp_ptr, dbiasp_ptr, dh0_ptr,
    Bsz, L, ED, N,
    sx_b, sx_l, sx_d, sdt_b, sdt_l, sdt_d, sz_b, sz_l, sz_d,
    sB_b, sB_l, sB_n, sC_b, sC_l, sC_n, sA_d, sA_n,
    sdo_b, sdo_l, sdo_d,
    HAS_Z: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_DHFIN: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, SEQ_SCAN: tl.constexpr,
):
    # dx, ddt, dz: (B, L, ED) contiguous. dBp, dCp: (n_dblocks, B, L, N) fp32 partials.
    # dAp: (B, ED, N) fp32, dDp / dbiasp: (B, ED) fp32, dh0: (B, ED, N) fp32.
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, CHUNK)
    mask_d = offs_d < ED
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]

    A = tl.load(A_ptr + offs_d[:, None] * sA_d + offs_n[None, :] * sA_n,
                mask=mask_dn, other=0.0).to(tl.float32)  # (BLOCK_D, BLOCK_N)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)

    st_off = offs_d[:, None] * N + offs_n[None, :]
    # adjoint of the state at the start of the chunk after the current one
    if HAS_DHFIN:
        carry = tl.load(dhfin_ptr + pid_b * ED * N + st_off, mask=mask_dn, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)

    dA_acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)

    x_base = x_ptr + pid_b * sx_b
    dt_base = dt_ptr + pid_b * sdt_b
    z_base = z_ptr + pid_b * sz_b
    B_base = B_ptr + pid_b * sB_b
    C_base = C_ptr + pid_b * sC_b
    do_base = dout_ptr + pid_b * sdo_b
    g_base = pid_b * L * ED  # contiguous (B, L, ED) grads
    part_base = (pid_d * Bsz + pid_b) * L * N  # (n_dblocks, B, L, N) partials

    n_chunks = tl.cdiv(L, CHUNK)
    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        t = c * CHUNK + offs_t  # (CHUNK,)
        mask_t = t < L
        mask_dt = mask_d[:, None] & mask_t[None, :]
        mask_tn = mask_t[:, None] & mask_n[None, :]
        # previous step (local step 0 gets the identity: its h_{t-1} is the boundary state)
        tp = t - 1
        mask_tp = (offs_t > 0) & mask_t
        mask_dtp = mask_d[:, None] & mask_tp[None, :]
        # next step (its decay multiplies the adjoint flowing back into step t)
        tn = t + 1
        mask_dtn = mask_d[:, None] & (tn < L)[None, :]

        x = tl.load(x_base + t[None, :] * sx_l + offs_d[:, None] * sx_d,
                    mask=mask_dt, other=0.0).to(tl.float32)  # (BLOCK_D, CHUNK)
        u = tl.load(dt_base + t[None, :] * sdt_l + offs_d[:, None] * sdt_d,
                    mask=mask_dt, other=0.0).to(tl.float32)
        x_p = tl.load(x_base + tp[None, :] * sx_l + offs_d[:, None] * sx_d,
                      mask=mask_dtp, other=0.0).to(tl.float32)
        u_p = tl.load(dt_base + tp[None, :] * sdt_l + offs_d[:, None] * sdt_d,
                      mask=mask_dtp, other=0.0).to(tl.float32)
        u_n = tl.load(dt_base + tn[None, :] * sdt_l + offs_d[:, None] * sdt_d,
                      mask=mask_dtn, other=0.0).to(tl.float32)
        if HAS_BIAS:
            u = u + bias[:, None]
            u_p = u_p + bias[:, None]
            u_n = u_n + bias[:, None]
        if SOFTPLUS:
            delta = _softplus(u)
            delta_p = _softplus(u_p)
            delta_n = _softplus(u_n)
        else:
            delta = u
            delta_p = u_p
            delta_n = u_n
        delta = tl.where(mask_dt, delta, 0.0)
        delta_p = tl.where(mask_dtp, delta_p, 0.0)
        delta_n = tl.where(mask_dtn, delta_n, 0.0)

        Bm = tl.load(B_base + t[:, None] * sB_l + offs_n[None, :] * sB_n,
                     mask=mask_tn, other=0.0).to(tl.float32)  # (CHUNK, BLOCK_N)
        Bm_p = tl.load(B_base + tp[:, None] * sB_l + offs_n[None, :] * sB_n,
                       mask=mask_tp[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        Cm = tl.load(C_base + t[:, None] * sC_l + offs_n[None, :] * sC_n,
                     mask=mask_tn, other=0.0).to(tl.float32)
        dout = tl.load(do_base + t[None, :] * sdo_l + offs_d[:, None] * sdo_d,
                       mask=mask_dt, other=0.0).to(tl.float32)  # (BLOCK_D, CHUNK)

        # --- recompute h_{t-1} for the chunk from its boundary state (shifted scan)
        h_in = tl.load(states_ptr + (pid_b * n_chunks + c) * ED * N + st_off,
                       mask=mask_dn, other=0.0)  # (BLOCK_D, BLOCK_N)
        dA_p = tl.exp(delta_p[:, :, None] * A[:, None, :])  # (BLOCK_D, CHUNK, BLOCK_N)
        dBx_p = (delta_p * x_p)[:, :, None] * Bm_p[None, :, :]
        pa, pb = _chunk_scan(dA_p, dBx_p, offs_t, CHUNK, False, SEQ_SCAN)
        h_prev = pb + pa * h_in[:, None, :]  # h_{t-1}, (BLOCK_D, CHUNK, BLOCK_N)
        dA = tl.exp(delta[:, :, None] * A[:, None, :])
        dx_delta = delta * x  # (BLOCK_D, CHUNK)
        h = dA * h_prev + dx_delta[:, :, None] * Bm[None, :, :]  # h_t

        # --- output gate
        if HAS_Z:
            z = tl.load(z_base + t[None, :] * sz_l + offs_d[:, None] * sz_d,
                        mask=mask_dt, other=0.0).to(tl.float32)
            y = tl.sum(h * Cm[None, :, :], axis=2)
            if HAS_D:
                y = y + Dv[:, None] * x
            sig = tl.sigmoid(z)
            dz = dout * y * sig * (1.0 + z * (1.0 - sig))
            tl.store(dz_ptr + g_base + t[None, :] * ED + offs_d[:, None],
                     dz.to(dz_ptr.dtype.element_ty), mask=mask_dt)
            dy = dout * z * sig
        else:
            dy = dout
        # dC_t[n] = sum_d dy_t[d] h_t[d, n]  (partial over this d-block)
        dC = tl.sum(dy[:, :, None] * h, axis=0)  # (CHUNK, BLOCK_N)
        tl.store(dCp_ptr + part_base + t[:, None] * N + offs_n[None, :], dC, mask=mask_tn)

        # --- reverse scan for the state adjoint g_t = dA_{t+1} g_{t+1} + dy_t C_t
        dA_n = tl.exp(delta_n[:, :, None] * A[:, None, :])
        ga, gb = _chunk_scan(dA_n, dy[:, :, None] * Cm[None, :, :], offs_t, CHUNK, True,
                             SEQ_SCAN)
        g = gb + ga * carry[:, None, :]  # (BLOCK_D, CHUNK, BLOCK_N)

        gB = tl.sum(g * Bm[None, :, :], axis=2)  # (BLOCK_D, CHUNK)
        dx = delta * gB
        if HAS_D:
            dx = dx + dy * Dv[:, None]
            dD_acc += tl.sum(dy * x, axis=1)
        tl.store(dx_ptr + g_base + t[None, :] * ED + offs_d[:, None],
                 dx.to(dx_ptr.dtype.element_ty), mask=mask_dt)
        gh = g * h_prev * dA  # grad wrt (delta * A), (BLOCK_D, CHUNK, BLOCK_N)
        ddelta = tl.sum(gh * A[:, None, :], axis=2) + x * gB  # (BLOCK_D, CHUNK)
        dA_acc += tl.sum(gh * delta[:, :, None], axis=1)
        dB = tl.sum(g * dx_delta[:, :, None], axis=0)  # (CHUNK, BLOCK_N)
        tl.store(dBp_ptr + part_base + t[:, None] * N + offs_n[None, :], dB, mask=mask_tn)
        if SOFTPLUS:
            du = ddelta * tl.sigmoid(u)
        else:
            du = ddelta
        du = tl.where(mask_dt, du, 0.0)
        tl.store(ddt_ptr + g_base + t[None, :] * ED + offs_d[:, None],
                 du.to(ddt_ptr.dtype.element_ty), mask=mask_dt)
        dbias_acc += tl.sum(du, axis=1)

        # adjoint at this chunk's first step, handed to the previous chunk
        carry = tl.sum(tl.where((offs_t == 0)[None, :, None], g, 0.0), axis=1)

    # h_0 = dA_0 * h_init + ...  =>  dh_init = dA_0 * g_0
    mask_d0 = mask_d & ((offs_d * 0 + L) > 0)  # step 0 exists
    u0 = tl.load(dt_base + offs_d * sdt_d, mask=mask_d0, other=0.0).to(tl.float32)
    if HAS_BIAS:
        u0 = u0 + bias
    if SOFTPLUS:
        d0 = _softplus(u0)
    else:
        d0 = u0
    d0 = tl.where(mask_d0, d0, 0.0)
    dh0 = carry * tl.exp(d0[:, None] * A)
    tl.store(dh0_ptr + pid_b * ED * N + st_off, dh0, mask=mask_dn)
    tl.store(dAp_ptr + pid_b * ED * N + st_off, dA_acc, mask=mask_dn)
    tl.store(dDp_ptr + pid_b * ED + offs_d, dD_acc, mask=mask_d)
    tl.store(dbiasp_ptr + pid_b * ED + offs_d, dbias_acc, mask=mask_d)


def _check_device(x: torch.Tensor):
    if not x.is_cuda and not _interpreting():
        raise ValueError(
            "selective_scan impl='triton' needs CUDA tensors (got device "
            f"{x.device}); set TRITON_INTERPRET=1 to run the Triton kernels on CPU tensors")


def _fwd(x, dt, A, B, C, D, z, dt_bias, initial_state, softplus, store_states,
         BLOCK_D=None, CHUNK=None, num_warps=None):
    Bsz, L, ED = x.shape
    N = A.shape[1]
    BLOCK_D = BLOCK_D or FWD_CONFIG["BLOCK_D"]
    CHUNK = CHUNK or FWD_CONFIG["CHUNK"]
    num_warps = num_warps or FWD_CONFIG["num_warps"]
    BLOCK_N = triton.next_power_of_2(N)
    out = torch.empty((Bsz, L, ED), device=x.device, dtype=x.dtype)
    hfin = torch.empty((Bsz, ED, N), device=x.device, dtype=torch.float32)
    n_chunks = triton.cdiv(L, CHUNK)
    states = (torch.empty((Bsz, n_chunks, ED, N), device=x.device, dtype=torch.float32)
              if store_states else hfin)
    h0 = initial_state.float().contiguous() if initial_state is not None else hfin
    zz = z if z is not None else x
    grid = (triton.cdiv(ED, BLOCK_D), Bsz)
    _ssm_fwd_kernel[grid](
        x, dt, zz, B, C, A, D if D is not None else A, dt_bias if dt_bias is not None else A, h0,
        out, hfin, states,
        L, ED, N,
        *x.stride(), *dt.stride(), *zz.stride(), *B.stride(), *C.stride(), *A.stride(),
        *out.stride(),
        HAS_Z=z is not None, HAS_D=D is not None, HAS_BIAS=dt_bias is not None,
        HAS_H0=initial_state is not None, SOFTPLUS=softplus, STORE_STATES=store_states,
        BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, CHUNK=CHUNK, SEQ_SCAN=_seq_scan_flag(),
        num_warps=num_warps,
    )
    return out, hfin, (states if store_states else None), CHUNK


def _bwd(dout, dhfin, x, dt, A, B, C, D, z, dt_bias, states, softplus, CHUNK,
         BLOCK_D=None, num_warps=None):
    Bsz, L, ED = x.shape
    N = A.shape[1]
    BLOCK_D = BLOCK_D or BWD_CONFIG["BLOCK_D"]
    num_warps = num_warps or BWD_CONFIG["num_warps"]
    BLOCK_N = triton.next_power_of_2(N)
    n_db = triton.cdiv(ED, BLOCK_D)
    dev = x.device
    f32 = torch.float32
    dx = torch.empty((Bsz, L, ED), device=dev, dtype=x.dtype)
    ddt = torch.empty((Bsz, L, ED), device=dev, dtype=dt.dtype)
    dz = torch.empty((Bsz, L, ED), device=dev, dtype=z.dtype) if z is not None else dx
    dBp = torch.empty((n_db, Bsz, L, N), device=dev, dtype=f32)
    dCp = torch.empty((n_db, Bsz, L, N), device=dev, dtype=f32)
    dAp = torch.empty((Bsz, ED, N), device=dev, dtype=f32)
    dDp = torch.empty((Bsz, ED), device=dev, dtype=f32)
    dbp = torch.empty((Bsz, ED), device=dev, dtype=f32)
    dh0 = torch.empty((Bsz, ED, N), device=dev, dtype=f32)
    zz = z if z is not None else x
    dhf = dhfin.float().contiguous() if dhfin is not None else dh0
    grid = (n_db, Bsz)
    _ssm_bwd_kernel[grid](
        x, dt, zz, B, C, A, D if D is not None else A, dt_bias if dt_bias is not None else A,
        states, dout, dhf,
        dx, ddt, dz, dBp, dCp, dAp, dDp, dbp, dh0,
        Bsz, L, ED, N,
        *x.stride(), *dt.stride(), *zz.stride(), *B.stride(), *C.stride(), *A.stride(),
        *dout.stride(),
        HAS_Z=z is not None, HAS_D=D is not None, HAS_BIAS=dt_bias is not None,
        HAS_DHFIN=dhfin is not None, SOFTPLUS=softplus,
        BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, CHUNK=CHUNK, SEQ_SCAN=_seq_scan_flag(),
        num_warps=num_warps,
    )
    dB = dBp.sum(0)  # (B, L, N)
    dC = dCp.sum(0)
    dA = dAp.sum(0)  # (ED, N)
    dD = dDp.sum(0)  # (ED,)
    dbias = dbp.sum(0)
    return dx, ddt, (dz if z is not None else None), dA, dB, dC, dD, dbias, dh0


class _SelectiveScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, initial_state, softplus, cfg):
        need_grad = any(ctx.needs_input_grad[:9])
        ctx.set_materialize_grads(False)  # unused outputs give None grads: skip zero-filling
        out, hfin, states, chunk = _fwd(x, dt, A, B, C, D, z, dt_bias, initial_state, softplus,
                                        store_states=need_grad, **cfg)
        if need_grad:
            ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, states)
            ctx.softplus = softplus
            ctx.chunk = chunk
        return out, hfin

    @staticmethod
    def backward(ctx, dout, dhfin):
        x, dt, A, B, C, D, z, dt_bias, states = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(x)
        dx, ddt, dz, dA, dB, dC, dD, dbias, dh0 = _bwd(
            dout, dhfin, x, dt, A, B, C, D, z, dt_bias, states, ctx.softplus, ctx.chunk)
        nig = ctx.needs_input_grad
        return (
            dx if nig[0] else None,
            ddt if nig[1] else None,
            dA.to(A.dtype) if nig[2] else None,
            dB.to(B.dtype) if nig[3] else None,
            dC.to(C.dtype) if nig[4] else None,
            dD.to(D.dtype) if D is not None and nig[5] else None,
            dz if nig[6] else None,
            dbias.to(dt_bias.dtype) if dt_bias is not None and nig[7] else None,
            dh0 if nig[8] else None,
            None, None,
        )


def selective_scan_triton(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True,
                          initial_state=None, return_final_state=False, **cfg):
    """Triton selective scan. cfg may override BLOCK_D / CHUNK / num_warps of the forward."""
    _check_device(x)
    out, hfin = _SelectiveScanTriton.apply(x, dt, A, B, C, D, z, dt_bias, initial_state,
                                           bool(dt_softplus), cfg)
    if return_final_state:
        return out, hfin
    return out
