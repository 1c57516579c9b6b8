"""Triton selective scan (Mamba-1), channel-major ("BDL") layout.

x, dt, z, y: (B, ED, L) with L contiguous; B, C: (B, N, L) with L contiguous (typically slices
of one (B, R + 2N, L) tensor, read by stride), so every load and store is coalesced along time.

Forward, two kernels picked by input dtype (FWD_BY_DTYPE; NOTES.md has the measurements):
- "chan" (16-bit): time-parallel per channel: (BLOCK_D, CHUNK) tiles of x and delta, and for
  each state n an associative scan over the CHUNK axis, y accumulated over n; the state is
  carried across tiles (per-state rates and states as tuples of (BLOCK_D,) vectors).
- "lane" (fp32): sequential in time, one lane per (channel, N/NS of its states), steps moved
  as (BLOCK_D, NS, CHUNK) register tiles split into per-step registers.
Both fuse softplus(dt + bias), the D skip and the silu(z) gate, use exp2 with A pre-multiplied
by log2(e), and store the backward's chunk-boundary states only when a backward will follow.

With the backward's states stored (training) the lane forward runs for every dtype.

Backward ("lane", `_bdl_bwd_lane_kernel`): the lane layout run backwards over the stored state
chunks: the states recomputed tile by tile from each chunk's stored state, the adjoint
g_t = exp(delta_{t+1} A) g_{t+1} + C_t dy_t step by step. Grads reducing over ED (dB, dC) are
summed over a program's channels and those reducing over batch and time (dA, dD, dt_bias) over
its steps, all added atomically into one zeroed fp32 buffer (scan_sums). Where the grid is small
the lane kernels also split time into segments run at once (time_segments). (The earlier chunk
backward, two associative scans a chunk, is retired: NOTES.md run 7.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import alert_not_deterministic
from .._triton import interpreting as _interpreting

LOG2E = 1.4426950408889634

# Forward kernel by input dtype, and each kernel's tiles (NOTES.md, run 6: H200, at
# (8,2048,1024,16): bf16 chan 0.378 ms, lane 0.384, the retired seqt 0.444; fp32 lane 0.490,
# chan 0.499, seqt 0.614). chan's CHUNK is the time tile scanned per state; lane's CHUNK is its
# register tile of steps (it must divide the backward's state chunk), NS the lanes sharing a
# channel (BLOCK_D * NS = 32 * num_warps).
FWD_BY_DTYPE = {torch.float32: "lane", torch.bfloat16: "chan", torch.float16: "chan"}
# With the backward's states stored (training), lane for every dtype: chan stores them with a
# masked store per state and step of its time tile, lane once per state chunk (H200, bf16,
# (8,2048,1024,16), the mixer's train step profiled: chan storing states 0.59 ms a forward
# against mamba_ssm's 0.30; NOTES.md run 7).
FWD_TRAIN_BY_DTYPE = {torch.float32: "lane", torch.bfloat16: "lane", torch.float16: "lane"}
FWD_TILES = {"chan": dict(BLOCK_D=1, CHUNK=512, num_warps=1),
             "lane": dict(BLOCK_D=8, NS=4, CHUNK=8, num_warps=1)}
# Backward: it restarts from the states the forward stores every BWD_CONFIG["CHUNK"] steps.
# H200, bf16, (8,2048,1024,16), the backward alone (scripts/train_study.py, NOTES.md run 7):
# lane (8 channels x 4 lanes, E 8, 1 warp, dB/dC added atomically) 1.21 ms; 4 x 8: 1.30; 4 x 8 E 4:
# 1.47; 2 x 16: 2.06; with per-program partials instead of atomics 2.76; the older chunk kernel
# (2 channels, two associative scans a chunk) 3.33. The state chunk: 32 and 128 within 2%.
BWD_CONFIG = dict(CHUNK=32)
# At batch 1 (128 programs of 8 channels at ED 1024) 8 x 4 starves the card: B1 L8192 scan
# forward + backward 4.85 ms with 8 x 4, 2.33 with 4 x 8 (mamba_ssm 0.95). Below
# BWD_LANE_MIN_PROGRAMS programs (~8 resident 1-warp programs on each of 132 SMs at ~250
# registers) the backward takes "lane-small".
BWD_TILES = {"lane": dict(BLOCK_D=8, NS=4, E=8, num_warps=1, ATOMIC=True),
             "lane-small": dict(BLOCK_D=4, NS=8, E=8, num_warps=1, ATOMIC=True)}
BWD_LANE_MIN_PROGRAMS = 1024
# Where its grid is below BWD_LANE_MIN_PROGRAMS (see below) the backward also splits time into
# about BWD_SEG_PROGRAMS / programs segments of whole state chunks, all run at once: a first
# kernel runs the adjoint back over each segment from zero (_bdl_bwd_carry_kernel), and each
# segment's backward folds the later segments' carries into its starting adjoint. At batch 1
# the grid has (ED / BLOCK_D) programs of one warp, each walking the whole sequence: too few to
# hide each step's latency.
# H100, bf16, (1, 8192, 1024, 16), backward alone, lane-small (256 programs): 1, 2, 4, 8, 16
# segments 1.96, 1.43, 0.91, 0.85, 0.84 ms; at L2048 0.47 -> 0.31 with 8 (NOTES.md run 8).
# Only grids below BWD_LANE_MIN_PROGRAMS split: a full grid (batch 8) gains nothing and pays
# the carry pass (the mixer's B8 L8192 forward + backward: 9.03 ms at e36b7bd, where batch 8
# took two segments, against 8.44 with one in an earlier call; mamba_ssm 8.12 / 8.14).
BWD_SEG_PROGRAMS = 2048
# The same for the lane forward (training's, and fp32 inference's): a first kernel runs each
# segment's state from zero (_bdl_fwd_carry_kernel), then every segment's forward runs at once.
# H100, bf16, the forward storing states (8 x 4 tiles, 128 programs): 1, 4, 8, 16 segments
# 1.55, 0.61, 0.36, 0.36 ms at (1, 8192); at (1, 2048) 0.35, 0.18, 0.17, 0.29.
FWD_SEG_PROGRAMS = 1024
# No segment shorter than this: short sequences are bound by launches and latency, not by how
# many programs walk them (and each split costs two more launches).
SEG_MIN_STEPS = 256
FWD_TUNE = ([dict(variant="chan", BLOCK_D=bd, CHUNK=ch, num_warps=nw)
              for bd, ch, nw in [(1, 512, 1), (2, 256, 1), (1, 256, 1), (1, 1024, 2)]]
            + [dict(variant="lane", BLOCK_D=bd, NS=ns, CHUNK=e, num_warps=nw)
               for bd, ns, e, nw in [(32, 1, 8, 1), (32, 1, 4, 1), (16, 2, 8, 1), (16, 2, 4, 1),
                                     (8, 4, 8, 1), (64, 1, 8, 2), (32, 2, 8, 2), (16, 4, 8, 2)]])


@triton.jit
def _combine(a1, b1, a2, b2):
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _softplus(u):
    # stable log(1 + exp(u)) through exp2 / log2
    return tl.maximum(u, 0.0) + 0.6931471805599453 * tl.log2(
        1.0 + tl.exp2(-tl.abs(u) * 1.4426950408889634))


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _last_t(v, last):
    """The last time column of a (BLOCK_D, CHUNK) tile, as (BLOCK_D,) in every lane: a max
    over the column mask (max(x, -inf) = x, NaN kept) -- no sum's in-thread adds of zeros."""
    return tl.reduce(tl.where(last, v, -float("inf")), 1, _max_nan)


@triton.jit
def _bdl_fwd_chan_kernel(
    x_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, A_ptr, D_ptr, bias_ptr, h0_ptr,
    out_ptr, hfin_ptr, states_ptr,
    L, ED,
    sx_b, sx_d, sx_l, sdt_b, sdt_d, sdt_l, sz_b, sz_d, sz_l,
    sB_b, sB_n, sB_l, sC_b, sC_n, sC_l, sA_d, sA_n,
    so_b, so_d, so_l,
    HAS_Z: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    SOFTPLUS: tl.constexpr, STORE_STATES: tl.constexpr,
    N: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
    STATE_CHUNK: tl.constexpr,
):
    """Time-parallel per channel. Program (d-block, batch) holds (BLOCK_D, CHUNK) tiles of x,
    delta, y and, for each of the N states in turn, scans h -> exp(delta A_n) h + delta x B_n
    along time (tl.associative_scan over the CHUNK axis: per-thread runs, then shuffles) and
    accumulates y += h C_n. The per-state rates A_n and carried states h_n are N-tuples of
    (BLOCK_D,) vectors indexed by the unrolled state loop: no (BLOCK_D, N) tiles to pick them
    from across lanes; the carry is the chunk's last column by a max (no in-thread adds)."""
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_t = tl.arange(0, CHUNK)
    mask_d = offs_d < ED
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    st_base = pid_b * ED * N + offs_d * N  # (BD,) into a (B, ED, N) slab; + n
    n_states = tl.cdiv(L, STATE_CHUNK)
    A2 = ()
    H = ()
    for n in tl.static_range(N):
        A2 = A2 + (tl.load(A_ptr + offs_d * sA_d + n * sA_n, mask=mask_d, other=0.0).to(tl.float32)
                   * 1.4426950408889634,)
        if HAS_H0:
            H = H + (tl.load(h0_ptr + st_base + n, mask=mask_d, other=0.0).to(tl.float32),)
        else:
            H = H + (tl.zeros([BLOCK_D], dtype=tl.float32),)
        if STORE_STATES:
            tl.store(states_ptr + pid_b * n_states * ED * N + offs_d * N + n, H[n], mask=mask_d)

    x_base = x_ptr + pid_b * sx_b + offs_d[:, None] * sx_d
    dt_base = dt_ptr + pid_b * sdt_b + offs_d[:, None] * sdt_d
    z_base = z_ptr + pid_b * sz_b + offs_d[:, None] * sz_d
    o_base = out_ptr + pid_b * so_b + offs_d[:, None] * so_d
    B_base = B_ptr + pid_b * sB_b
    C_base = C_ptr + pid_b * sC_b
    last = (offs_t == CHUNK - 1)[None, :]

    for c in range(0, tl.cdiv(L, CHUNK)):
        t = c * CHUNK + offs_t
        mask_t = t < L
        m = mask_d[:, None] & mask_t[None, :]
        xt = tl.load(x_base + t[None, :] * sx_l, mask=m, other=0.0).to(tl.float32)
        ut = tl.load(dt_base + t[None, :] * sdt_l, mask=m, other=0.0).to(tl.float32)
        if HAS_BIAS:
            ut = ut + bias[:, None]
        if SOFTPLUS:
            dlt = _softplus(ut)
        else:
            dlt = ut
        dlt = tl.where(m, dlt, 0.0)  # padded steps: decay 1, input 0 -> the state passes through
        dxt = dlt * xt
        yt = tl.zeros([BLOCK_D, CHUNK], dtype=tl.float32)
        for n in tl.static_range(N):
            Bn = tl.load(B_base + n * sB_n + t * sB_l, mask=mask_t, other=0.0).to(tl.float32)
            Cn = tl.load(C_base + n * sC_n + t * sC_l, mask=mask_t, other=0.0).to(tl.float32)
            pa, pb = tl.associative_scan((tl.exp2(dlt * A2[n][:, None]), dxt * Bn[None, :]), axis=1,
                                         combine_fn=_combine)
            hs = pb + pa * H[n][:, None]  # (BD, CHUNK): h_t for every step of the chunk
            yt += hs * Cn[None, :]
            if STORE_STATES:
                # the backward restarts from the state before every STATE_CHUNK-th step
                nxt = t + 1
                sm = m & ((nxt % STATE_CHUNK) == 0)[None, :] & (nxt < L)[None, :]
                s_ptr = (states_ptr + ((pid_b * n_states + nxt[None, :] // STATE_CHUNK) * ED
                                       + offs_d[:, None]) * N + n)
                tl.store(s_ptr, hs, mask=sm)
            H = H[:n] + (_last_t(hs, last),) + H[n + 1:]
        if HAS_D:
            yt += Dv[:, None] * xt
        if HAS_Z:
            zt = tl.load(z_base + t[None, :] * sz_l, mask=m, other=0.0).to(tl.float32)
            yt = yt * zt * tl.sigmoid(zt)
        tl.store(o_base + t[None, :] * so_l, yt.to(out_ptr.dtype.element_ty), mask=m)
    for n in tl.static_range(N):
        tl.store(hfin_ptr + st_base + n, H[n], mask=mask_d)


@triton.jit
def _cols(t, BD: tl.constexpr, NS: tl.constexpr, E: tl.constexpr):
    """(BD, NS, E) -> E-tuple of (BD, NS), in step order. The step axis is held in-thread
    (sizePerThread covers it), so the splits move no data and cost no instructions."""
    if E == 2:
        a, b = tl.split(t)
        return (a, b)
    elif E == 4:
        a, b = tl.split(tl.reshape(t, (BD, NS, 2, 2)))
        a0, a1 = tl.split(a)
        b0, b1 = tl.split(b)
        return (a0, b0, a1, b1)
    else:
        a, b = tl.split(tl.reshape(t, (BD, NS, 4, 2)))     # a: even steps, b: odd (by e // 2)
        aa, ab = tl.split(tl.reshape(a, (BD, NS, 2, 2)))   # aa: 0, 4; ab: 2, 6
        ba, bb = tl.split(tl.reshape(b, (BD, NS, 2, 2)))   # ba: 1, 5; bb: 3, 7
        e0, e4 = tl.split(aa)
        e2, e6 = tl.split(ab)
        e1, e5 = tl.split(ba)
        e3, e7 = tl.split(bb)
        return (e0, e1, e2, e3, e4, e5, e6, e7)


@triton.jit
def _join_cols(c, BD: tl.constexpr, NS: tl.constexpr, E: tl.constexpr):
    """The inverse of _cols: E (BD, NS) columns -> (BD, NS, E)."""
    if E == 2:
        return tl.join(c[0], c[1])
    elif E == 4:
        return tl.reshape(tl.join(tl.join(c[0], c[2]), tl.join(c[1], c[3])), (BD, NS, 4))
    else:
        a = tl.reshape(tl.join(tl.join(c[0], c[4]), tl.join(c[2], c[6])), (BD, NS, 4))
        b = tl.reshape(tl.join(tl.join(c[1], c[5]), tl.join(c[3], c[7])), (BD, NS, 4))
        return tl.reshape(tl.join(a, b), (BD, NS, 8))


@triton.jit
def _lane_index(ED, BLOCK_D: tl.constexpr, NS: tl.constexpr, E: tl.constexpr):
    """The lane kernels' index tiles for program (d-block, batch): channels (BD, 1, 1), lanes
    (1, NS, 1), steps (1, 1, E) and the channel mask; then the states' (BD, NS) channel and lane
    indices and their mask."""
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_s = tl.arange(0, NS)
    d3 = offs_d[:, None, None]
    d2 = offs_d[:, None]
    s2 = offs_s[None, :]
    return (d3, offs_s[None, :, None], tl.arange(0, E)[None, None, :], d3 < ED, d2, s2,
            (d2 < ED) & (s2 < NS))


@triton.jit
def _lane_delta(x_b, dt_b, t3, m, sx_l, sdt_l, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """One (BD, NS, E) step tile: x, dt + bias and delta = softplus(dt + bias), fp32. Padded
    steps get delta 0: decay 1, input 0, so the state passes through them."""
    xt = tl.load(x_b + t3 * sx_l, mask=m, other=0.0).to(tl.float32)
    ut, dlt = _lane_dt(dt_b, t3, m, sdt_l, bias, HAS_BIAS, SOFTPLUS)
    return xt, ut, dlt


@triton.jit
def _lane_dt(dt_b, t3, m, sdt_l, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """_lane_delta without x: (dt + bias, delta), delta 0 at padded steps."""
    ut = tl.load(dt_b + t3 * sdt_l, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        ut = ut + bias
    if SOFTPLUS:
        dlt = _softplus(ut)
    else:
        dlt = ut
    return ut, tl.where(m, dlt, 0.0)


@triton.jit
def _carry_setup(bias_ptr, A_ptr, ED, sA_d, sA_n, HAS_BIAS: tl.constexpr, N: tl.constexpr,
                 BLOCK_D: tl.constexpr, NS: tl.constexpr, E: tl.constexpr):
    """The carry kernels' start: _lane_index's tiles, dt's bias (BD, NS, 1) (0.0 without one),
    A * log2(e) and a zero carry as N/NS-tuples of (BD, NS), a zero (BD, NS, 1) sum of delta."""
    NL: tl.constexpr = N // NS
    d3, s3, e3, md3, d2, s2, md2 = _lane_index(ED, BLOCK_D, NS, E)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d3 + s3 * 0, mask=md3, other=0.0).to(tl.float32)
    else:
        bias = 0.0
    A2 = ()
    Z = ()
    for j in tl.static_range(NL):
        A2 = A2 + (tl.load(A_ptr + d2 * sA_d + (s2 * NL + j) * sA_n, mask=md2,
                           other=0.0).to(tl.float32) * 1.4426950408889634,)
        Z = Z + (tl.zeros([BLOCK_D, NS], dtype=tl.float32),)
    return d3, s3, e3, md3, d2, s2, md2, bias, A2, Z, tl.zeros([BLOCK_D, NS, 1], dtype=tl.float32)


@triton.jit
def _bdl_fwd_carry_kernel(
    x_ptr, dt_ptr, B_ptr, A_ptr, bias_ptr, carry_ptr, dsum_ptr,
    L, ED, SEGS, CPS,
    sx_b, sx_d, sx_l, sdt_b, sdt_d, sdt_l, sB_b, sB_n, sB_l, sA_d, sA_n,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    N: tl.constexpr, BLOCK_D: tl.constexpr, NS: tl.constexpr, E: tl.constexpr,
    STATE_CHUNK: tl.constexpr,
):
    """The time-segmented forward's first pass: for time segment s < SEGS - 1 (CPS state
    chunks each), the state run over the segment from zero, h <- exp(delta A) h + delta x B,
    stored as carry (B, SEGS, ED, N) fp32 with the segment's sum of delta (B, SEGS, ED): the
    state leaving a segment is exp(A sum delta) h_in + carry, so _bdl_fold_kernel gives every
    segment its starting state and all segments' forwards run at once. No C, z or y."""
    NL: tl.constexpr = N // NS
    NT: tl.constexpr = STATE_CHUNK // E
    pid1 = tl.program_id(1)
    pid_b = (pid1 // (SEGS - 1)).to(tl.int64)
    seg = pid1 % (SEGS - 1)
    d3, s3, e3, md3, d2, s2, md2, bias, A2, H, dsum = _carry_setup(
        bias_ptr, A_ptr, ED, sA_d, sA_n, HAS_BIAS, N, BLOCK_D, NS, E)
    x_b = x_ptr + pid_b * sx_b + d3 * sx_d + s3 * 0
    dt_b = dt_ptr + pid_b * sdt_b + d3 * sdt_d + s3 * 0
    B_b = B_ptr + pid_b * sB_b + (s3 * NL) * sB_n + d3 * 0
    t_lo = seg * CPS * STATE_CHUNK
    # never the last segment: every step is < L (the time masks stay: without them ptxas spills
    # here, sm_90 compile with Triton 3.9)
    for k in range(0, CPS * NT):
        t3 = t_lo + k * E + e3
        xt, ut, dlt = _lane_delta(x_b, dt_b, t3, md3 & (t3 < L), sx_l, sdt_l, bias, HAS_BIAS, SOFTPLUS)
        dsum += tl.sum(dlt, axis=2, keep_dims=True)
        dl = _cols(dlt, BLOCK_D, NS, E)
        dx = _cols(dlt * xt, BLOCK_D, NS, E)
        for j in tl.static_range(NL):
            Bj = _cols(tl.load(B_b + j * sB_n + t3 * sB_l, mask=t3 < L, other=0.0).to(tl.float32),
                       BLOCK_D, NS, E)
            h = H[j]
            for e in tl.static_range(E):
                h = tl.exp2(dl[e] * A2[j]) * h + dx[e] * Bj[e]
            H = H[:j] + (h,) + H[j + 1:]
    slab = pid_b * SEGS + seg
    for j in tl.static_range(NL):
        tl.store(carry_ptr + slab * ED * N + d2 * N + s2 * NL + j, H[j], mask=md2)
    tl.store(dsum_ptr + slab * ED + d3 + s3 * 0, dsum, mask=md3 & (s3 == 0))


@triton.jit
def _bdl_fwd_lane_kernel(
    x_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, A_ptr, D_ptr, bias_ptr, h0_ptr,
    out_ptr, hfin_ptr, states_ptr, hin_ptr,
    L, ED, SEGS, CPS,
    sx_b, sx_d, sx_l, sdt_b, sdt_d, sdt_l, sz_b, sz_d, sz_l,
    sB_b, sB_n, sB_l, sC_b, sC_n, sC_l, sA_d, sA_n,
    so_b, so_d, so_l,
    HAS_Z: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    SOFTPLUS: tl.constexpr, STORE_STATES: tl.constexpr, HAS_HIN: tl.constexpr,
    N: tl.constexpr, BLOCK_D: tl.constexpr, NS: tl.constexpr, E: tl.constexpr,
    STATE_CHUNK: tl.constexpr,
):
    """Sequential in time, one lane per (channel, N/NS of its states). Tiles (BLOCK_D, NS, E):
    each lane loads E consecutive steps of its channel as one vector (coalesced along time)
    and of B_n, C_n for its states (the same address across channels: a broadcast), splits
    them into per-step registers (no data movement) and runs h_n = exp(delta A_n) h_n +
    delta x B_n, y += h_n C_n step by step: ~5 instructions and one exp2 per (d, n, t), no
    shuffles but the NS-lane sum of y. The states are N/NS-tuples of (BLOCK_D, NS) vectors.
    With HAS_HIN, program (d-block, batch * SEGS + s) runs time segment s (CPS state chunks)
    from its starting state in hin (B, SEGS, ED, N) (_bdl_fold_kernel)."""
    NL: tl.constexpr = N // NS
    NT: tl.constexpr = STATE_CHUNK // E
    slab = tl.program_id(1)                   # batch * SEGS + time segment
    seg = slab % SEGS
    pid_b = (slab // SEGS).to(tl.int64)
    slab = slab.to(tl.int64)
    d3, s3, e3, md3, d2, s2, md2 = _lane_index(ED, BLOCK_D, NS, E)
    if HAS_D:
        Dv = tl.load(D_ptr + d3 + s3 * 0, mask=md3, other=0.0).to(tl.float32)   # (BD, NS, 1)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d3 + s3 * 0, mask=md3, other=0.0).to(tl.float32)
    else:
        bias = 0.0
    st2 = d2 * N + s2 * NL   # (BD, NS) offsets into an (ED, N) slab; + j for state s * NL + j
    n_states = tl.cdiv(L, STATE_CHUNK)
    A2 = ()
    H = ()
    c_lo = seg * CPS                          # the segment's state chunks: [c_lo, c_hi)
    c_hi = tl.minimum(n_states, c_lo + CPS)
    for j in tl.static_range(NL):
        A2 = A2 + (tl.load(A_ptr + d2 * sA_d + (s2 * NL + j) * sA_n, mask=md2,
                           other=0.0).to(tl.float32) * 1.4426950408889634,)
        if HAS_HIN:
            H = H + (tl.load(hin_ptr + slab * ED * N + st2 + j, mask=md2, other=0.0),)
        elif HAS_H0:
            H = H + (tl.load(h0_ptr + pid_b * ED * N + st2 + j, mask=md2, other=0.0).to(tl.float32),)
        else:
            H = H + (tl.zeros([BLOCK_D, NS], dtype=tl.float32),)
        if STORE_STATES:
            tl.store(states_ptr + (pid_b * n_states + c_lo) * ED * N + st2 + j, H[j], mask=md2)

    x_b = x_ptr + pid_b * sx_b + d3 * sx_d + s3 * 0
    dt_b = dt_ptr + pid_b * sdt_b + d3 * sdt_d + s3 * 0
    z_b = z_ptr + pid_b * sz_b + d3 * sz_d + s3 * 0
    o_b = out_ptr + pid_b * so_b + d3 * so_d + s3 * 0
    B_b = B_ptr + pid_b * sB_b + (s3 * NL) * sB_n + d3 * 0
    C_b = C_ptr + pid_b * sC_b + (s3 * NL) * sC_n + d3 * 0

    for c in range(c_lo * NT, tl.minimum(tl.cdiv(L, E), c_hi * NT)):
        t3 = c * E + e3
        mt = t3 < L
        m = md3 & mt
        xt, ut, dlt = _lane_delta(x_b, dt_b, t3, m, sx_l, sdt_l, bias, HAS_BIAS, SOFTPLUS)
        Bt = ()
        Ct = ()
        for j in tl.static_range(NL):
            Bt = Bt + (_cols(tl.load(B_b + j * sB_n + t3 * sB_l, mask=mt, other=0.0).to(tl.float32),
                             BLOCK_D, NS, E),)
            Ct = Ct + (_cols(tl.load(C_b + j * sC_n + t3 * sC_l, mask=mt, other=0.0).to(tl.float32),
                             BLOCK_D, NS, E),)
        dl = _cols(dlt, BLOCK_D, NS, E)
        dx = _cols(dlt * xt, BLOCK_D, NS, E)
        ys = ()
        for k in tl.static_range(E):
            h = tl.exp2(dl[k] * A2[0]) * H[0] + dx[k] * Bt[0][k]
            y_k = h * Ct[0][k]
            H = (h,) + H[1:]
            for j in tl.static_range(1, NL):
                h = tl.exp2(dl[k] * A2[j]) * H[j] + dx[k] * Bt[j][k]
                y_k += h * Ct[j][k]
                H = H[:j] + (h,) + H[j + 1:]
            ys = ys + (y_k,)
        if STORE_STATES:
            # the backward restarts from the state before every STATE_CHUNK-th step
            nxt = c * E + E     # (the next segment stores its own starting state)
            if (nxt % STATE_CHUNK == 0) & (nxt < L) & (nxt < c_hi * STATE_CHUNK):
                for j in tl.static_range(NL):
                    tl.store(states_ptr + (pid_b * n_states + nxt // STATE_CHUNK) * ED * N + st2 + j,
                             H[j], mask=md2)
        y = tl.sum(_join_cols(ys, BLOCK_D, NS, E), axis=1, keep_dims=True)  # (BD, 1, E): over NS lanes
        if HAS_D:
            y += Dv * xt
        if HAS_Z:
            zt = tl.load(z_b + t3 * sz_l, mask=m, other=0.0).to(tl.float32)
            y = y * zt * tl.sigmoid(zt)
        tl.store(o_b + t3 * so_l, y.to(out_ptr.dtype.element_ty), mask=m & (s3 == 0))
    for j in tl.static_range(NL):       # the final state: the last segment's
        tl.store(hfin_ptr + pid_b * ED * N + st2 + j, H[j], mask=md2 & (s2 * 0 + seg == SEGS - 1))


@triton.jit
def _bdl_bwd_carry_kernel(
    dt_ptr, z_ptr, C_ptr, A_ptr, bias_ptr, dout_ptr, carry_ptr, dsum_ptr,
    L, ED, SEGS, CPS,
    sdt_b, sdt_d, sdt_l, sz_b, sz_d, sz_l, sC_b, sC_n, sC_l, sA_d, sA_n,
    sdo_b, sdo_d, sdo_l,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    N: tl.constexpr, BLOCK_D: tl.constexpr, NS: tl.constexpr, E: tl.constexpr,
    STATE_CHUNK: tl.constexpr,
):
    """The time-segmented backward's first pass: for time segment s >= 1 (CPS state chunks each),
    the adjoint run back over the segment from zero, g_t = G + C_t dy_t, G <- exp(delta_t A) g_t,
    stored as carry (B, SEGS, ED, N) fp32 with the segment's sum of delta (B, SEGS, ED): the
    adjoint leaving the segment is exp(A sum delta) G_in + carry, linear in the G_in coming from
    the later segments, so _bdl_fold_kernel gives every segment its G_in and all segments'
    backwards run at once. Only dt, dout, z and C are read; one exp2 and three FMAs a (d, n, t)."""
    NL: tl.constexpr = N // NS
    NT: tl.constexpr = STATE_CHUNK // E
    pid1 = tl.program_id(1)
    pid_b = (pid1 // (SEGS - 1)).to(tl.int64)
    seg = 1 + pid1 % (SEGS - 1)
    d3, s3, e3, md3, d2, s2, md2, bias, A2, G, dsum = _carry_setup(
        bias_ptr, A_ptr, ED, sA_d, sA_n, HAS_BIAS, N, BLOCK_D, NS, E)
    dt_b = dt_ptr + pid_b * sdt_b + d3 * sdt_d + s3 * 0
    z_b = z_ptr + pid_b * sz_b + d3 * sz_d + s3 * 0
    do_b = dout_ptr + pid_b * sdo_b + d3 * sdo_d + s3 * 0
    C_b = C_ptr + pid_b * sC_b + (s3 * NL) * sC_n + d3 * 0
    n_states = tl.cdiv(L, STATE_CHUNK)
    c_lo = seg * CPS
    n_tiles = (tl.minimum(n_states, c_lo + CPS) - c_lo) * NT
    for kk in range(0, n_tiles):
        t3 = c_lo * STATE_CHUNK + (n_tiles - 1 - kk) * E + e3
        mt = t3 < L
        m = md3 & mt
        ut, dlt = _lane_dt(dt_b, t3, m, sdt_l, bias, HAS_BIAS, SOFTPLUS)
        dsum += tl.sum(dlt, axis=2, keep_dims=True)
        dyt = tl.load(do_b + t3 * sdo_l, mask=m, other=0.0).to(tl.float32)
        if HAS_Z:
            zt = tl.load(z_b + t3 * sz_l, mask=m, other=0.0).to(tl.float32)
            dyt = dyt * zt * tl.sigmoid(zt)
        dl = _cols(dlt, BLOCK_D, NS, E)
        dy = _cols(dyt, BLOCK_D, NS, E)
        for j in tl.static_range(NL):
            Cj = _cols(tl.load(C_b + j * sC_n + t3 * sC_l, mask=mt, other=0.0).to(tl.float32),
                       BLOCK_D, NS, E)
            g = G[j]
            for e in tl.static_range(E - 1, -1, -1):
                g = tl.exp2(dl[e] * A2[j]) * (g + Cj[e] * dy[e])
            G = G[:j] + (g,) + G[j + 1:]
    slab = pid_b * SEGS + seg
    for j in tl.static_range(NL):
        tl.store(carry_ptr + slab * ED * N + d2 * N + s2 * NL + j, G[j], mask=md2)
    tl.store(dsum_ptr + slab * ED + d3 + s3 * 0, dsum, mask=md3 & (s3 == 0))


@triton.jit
def _bdl_fold_kernel(carry_ptr, dsum_ptr, A_ptr, g0_ptr, gin_ptr, ED, SEGS, sA_d, sA_n,
                     HAS_G0: tl.constexpr, REVERSE: tl.constexpr, N: tl.constexpr,
                     BLOCK: tl.constexpr):
    """The carry entering each time segment, gin (B, SEGS, ED, N) fp32, from the segments'
    own carries (each run from zero: _bdl_fwd_carry_kernel, _bdl_bwd_carry_kernel) and sums
    of delta: G <- exp(A sum delta) G + carry, segment by segment, from g0 (the initial state,
    or with REVERSE the final state's gradient; zero if absent) at the first segment (the
    last with REVERSE). One program per BLOCK (d, n) elements of a batch row."""
    b = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)     # d * N + n
    m = offs < ED * N
    d = offs // N
    A2 = tl.load(A_ptr + d * sA_d + (offs % N) * sA_n, mask=m, other=0.0).to(tl.float32) * 1.4426950408889634
    if HAS_G0:
        g = tl.load(g0_ptr + b * ED * N + offs, mask=m, other=0.0).to(tl.float32)
    else:
        g = tl.zeros([BLOCK], dtype=tl.float32)
    for q in range(0, SEGS):
        if REVERSE:
            s = SEGS - 1 - q
        else:
            s = q
        tl.store(gin_ptr + (b * SEGS + s) * ED * N + offs, g, mask=m)
        if q < SEGS - 1:
            dsum = tl.load(dsum_ptr + (b * SEGS + s) * ED + d, mask=m, other=0.0)
            g = tl.exp2(A2 * dsum) * g + tl.load(carry_ptr + (b * SEGS + s) * ED * N + offs,
                                                  mask=m, other=0.0)


@triton.jit
def _bdl_bwd_lane_kernel(
    x_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, A_ptr, D_ptr, bias_ptr, states_ptr,
    dout_ptr, dhfin_ptr,
    dx_ptr, ddt_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, dh0_ptr, scratch_ptr,
    y_ptr, gin_ptr,
    Bsz, L, ED, SEGS, CPS, sdB_b,
    sx_b, sx_d, sx_l, sdt_b, sdt_d, sdt_l, sz_b, sz_d, sz_l,
    sB_b, sB_n, sB_l, sC_b, sC_n, sC_l, sA_d, sA_n,
    sdo_b, sdo_d, sdo_l, sdz_b, sdz_d,
    HAS_Z: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_DHFIN: tl.constexpr, SOFTPLUS: tl.constexpr, ATOMIC: tl.constexpr, STORE_Y: tl.constexpr,
    HAS_GIN: tl.constexpr, DA_LOG: tl.constexpr,
    N: tl.constexpr, BLOCK_D: tl.constexpr, NS: tl.constexpr, E: tl.constexpr,
    STATE_CHUNK: tl.constexpr,
):
    """The lane forward's layout run backwards: one lane per (channel, N/NS of its states),
    (BLOCK_D, NS, E) register tiles of E steps, reverse over the stored state chunks.
    Per chunk: one pass from its stored state writes the state at each tile's start to a small
    program-private scratch (B, NT, ED, N) fp32 (L2-resident; loops over tiles stay loops, not
    unrolled code: registers and compile time stay small); then, tile by tile from the last, the
    tile's states are recomputed from there (h_{t-1} kept per step in registers),
    y is rebuilt for the z gate's gradient, and the adjoint runs back step by step:
        g_t = G + C_t dy_t,   G <- exp(delta_t A) g_t   (G: the adjoint flowing into h_{t-1}).
    Sums over states (dx, ddelta) are NS-lane sums; sums over channels (dB, dC) are summed over
    the program's channels and either stored as per-program partials (n_dblocks, B, N, L) or,
    with ATOMIC, added into one fp32 (B, N, L); dA (times A with DA_LOG), dD and dt_bias are
    added atomically into (ED, N) / (ED,). With HAS_GIN, program (d-block, batch * SEGS + s)
    runs time segment s (CPS state chunks) from its adjoint in gin (_bdl_fold_kernel), and only
    segment 0 writes dh0. Nothing of size (B, L, ED, N) is materialized:
    each (d, n, t) costs three exp2 and ~15 FMAs."""
    NL: tl.constexpr = N // NS
    NT: tl.constexpr = STATE_CHUNK // E
    pid_d = tl.program_id(0)
    slab = tl.program_id(1)                   # batch * SEGS + time segment
    seg = slab % SEGS
    pid_b = (slab // SEGS).to(tl.int64)
    slab = slab.to(tl.int64)
    d3, s3, e3, md3, d2, s2, md2 = _lane_index(ED, BLOCK_D, NS, E)
    s_r = tl.arange(0, NS)[:, None]       # (NS, 1): rows of the channel-summed (NS, E) tiles
    e_r = tl.arange(0, E)[None, :]
    if HAS_D:
        Dv = tl.load(D_ptr + d3 + s3 * 0, mask=md3, other=0.0).to(tl.float32)   # (BD, NS, 1)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d3 + s3 * 0, mask=md3, other=0.0).to(tl.float32)
    else:
        bias = 0.0
    st2 = d2 * N + s2 * NL   # (BD, NS) offsets into an (ED, N) slab; + j for state s * NL + j
    n_states = tl.cdiv(L, STATE_CHUNK)
    A1 = ()
    A2 = ()
    G = ()
    dA_acc = ()
    for j in tl.static_range(NL):
        a_j = tl.load(A_ptr + d2 * sA_d + (s2 * NL + j) * sA_n, mask=md2, other=0.0).to(tl.float32)
        A1 = A1 + (a_j,)
        A2 = A2 + (a_j * 1.4426950408889634,)
        if HAS_GIN:     # time segments: the adjoint entering this one (_bdl_fold_kernel)
            G = G + (tl.load(gin_ptr + slab * ED * N + st2 + j, mask=md2, other=0.0),)
        elif HAS_DHFIN:
            G = G + (tl.load(dhfin_ptr + pid_b * ED * N + st2 + j, mask=md2, other=0.0).to(tl.float32),)
        else:
            G = G + (tl.zeros([BLOCK_D, NS], dtype=tl.float32),)
        dA_acc = dA_acc + (tl.zeros([BLOCK_D, NS], dtype=tl.float32),)
    dD_acc = tl.zeros([BLOCK_D, NS, 1], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_D, NS, 1], dtype=tl.float32)

    x_b = x_ptr + pid_b * sx_b + d3 * sx_d + s3 * 0
    dt_b = dt_ptr + pid_b * sdt_b + d3 * sdt_d + s3 * 0
    z_b = z_ptr + pid_b * sz_b + d3 * sz_d + s3 * 0
    do_b = dout_ptr + pid_b * sdo_b + d3 * sdo_d + s3 * 0
    B_b = B_ptr + pid_b * sB_b + (s3 * NL) * sB_n + d3 * 0
    C_b = C_ptr + pid_b * sC_b + (s3 * NL) * sC_n + d3 * 0
    g_b = pid_b * ED * L + d3 * L + s3 * 0           # contiguous (B, ED, L) grads (and y)
    gz_b = pid_b * sdz_b + d3 * sdz_d + s3 * 0       # dz: L contiguous, may be a slice of dxz
    if ATOMIC:
        r_b = pid_b * sdB_b + (s_r * NL) * L          # fp32 (B, N, L) rows, batch stride sdB_b
    else:
        r_b = (pid_d * Bsz + pid_b) * N * L + (s_r * NL) * L   # (n_db, B, N, L) partials

    sc_b = slab * NT * ED * N + st2           # this program's (NT, ED, N) slice of the scratch
    c_lo = seg * CPS                          # the segment's state chunks: [c_lo, c_hi)
    c_hi = tl.minimum(n_states, c_lo + CPS)
    for i in range(0, c_hi - c_lo):
        c = c_hi - 1 - i
        # pass 1: the state at the start of each of the chunk's NT tiles, into the scratch
        H = ()
        for j in tl.static_range(NL):
            H = H + (tl.load(states_ptr + (pid_b * n_states + c) * ED * N + st2 + j, mask=md2,
                             other=0.0),)
        tl.debug_barrier()                      # the previous chunk's pass 2 read its tile states
        for k in range(0, NT):
            for j in tl.static_range(NL):
                tl.store(scratch_ptr + sc_b + k * ED * N + j, H[j], mask=md2)
            if k < NT - 1:
                t3 = c * STATE_CHUNK + k * E + e3
                mt = t3 < L
                m = md3 & mt
                xt, ut, dlt = _lane_delta(x_b, dt_b, t3, m, sx_l, sdt_l, bias, HAS_BIAS, SOFTPLUS)
                dl = _cols(dlt, BLOCK_D, NS, E)
                dx = _cols(dlt * xt, BLOCK_D, NS, E)
                for j in tl.static_range(NL):
                    Bj = _cols(tl.load(B_b + j * sB_n + t3 * sB_l, mask=mt, other=0.0).to(tl.float32),
                               BLOCK_D, NS, E)
                    h = H[j]
                    for e in tl.static_range(E):
                        h = tl.exp2(dl[e] * A2[j]) * h + dx[e] * Bj[e]
                    H = H[:j] + (h,) + H[j + 1:]
        tl.debug_barrier()                      # pass 1's stores are visible to every lane
        # pass 2: tiles from the last, each recomputed from its start, then the adjoint back
        for kk in range(0, NT):
            k = NT - 1 - kk
            t3 = c * STATE_CHUNK + k * E + e3
            mt = t3 < L
            m = md3 & mt
            xt, ut, dlt = _lane_delta(x_b, dt_b, t3, m, sx_l, sdt_l, bias, HAS_BIAS, SOFTPLUS)
            dout = tl.load(do_b + t3 * sdo_l, mask=m, other=0.0).to(tl.float32)
            dl = _cols(dlt, BLOCK_D, NS, E)
            dx = _cols(dlt * xt, BLOCK_D, NS, E)
            Bt = ()
            Ct = ()
            for j in tl.static_range(NL):
                Bt = Bt + (_cols(tl.load(B_b + j * sB_n + t3 * sB_l, mask=mt, other=0.0).to(tl.float32),
                                 BLOCK_D, NS, E),)
                Ct = Ct + (_cols(tl.load(C_b + j * sC_n + t3 * sC_l, mask=mt, other=0.0).to(tl.float32),
                                 BLOCK_D, NS, E),)
            H = ()
            for j in tl.static_range(NL):
                H = H + (tl.load(scratch_ptr + sc_b + k * ED * N + j, mask=md2, other=0.0),)
            HP = ()      # h_{t-1} per step and state, flat: e * NL + j
            ys = ()
            for e in tl.static_range(E):
                HP = HP + H
                h = tl.exp2(dl[e] * A2[0]) * H[0] + dx[e] * Bt[0][e]
                y_e = h * Ct[0][e]
                H = (h,) + H[1:]
                for j in tl.static_range(1, NL):
                    h = tl.exp2(dl[e] * A2[j]) * H[j] + dx[e] * Bt[j][e]
                    y_e += h * Ct[j][e]
                    H = H[:j] + (h,) + H[j + 1:]
                ys = ys + (y_e,)
            if HAS_Z:
                y = tl.sum(_join_cols(ys, BLOCK_D, NS, E), axis=1, keep_dims=True)   # (BD, 1, E)
                if HAS_D:
                    y += Dv * xt
                zt = tl.load(z_b + t3 * sz_l, mask=m, other=0.0).to(tl.float32)
                sig = tl.sigmoid(zt)
                dz = dout * y * sig * (1.0 + zt * (1.0 - sig))
                tl.store(dz_ptr + gz_b + t3, dz.to(dz_ptr.dtype.element_ty), mask=m & (s3 == 0))
                dyt = dout * zt * sig
                if STORE_Y:     # the gated output again, for the output projection's weight grad
                    tl.store(y_ptr + g_b + t3, (y * zt * sig).to(y_ptr.dtype.element_ty),
                             mask=m & (s3 == 0))
            else:
                dyt = dout
            dy = _cols(dyt, BLOCK_D, NS, E)
            gbs = ()
            dds = ()
            dBs = ()     # flat: e * NL + j, built from the last step
            dCs = ()
            for e in tl.static_range(E - 1, -1, -1):
                gb = tl.zeros([BLOCK_D, NS], dtype=tl.float32)
                dd = tl.zeros([BLOCK_D, NS], dtype=tl.float32)
                dBe = ()
                dCe = ()
                for j in tl.static_range(NL):
                    g = G[j] + Ct[j][e] * dy[e]
                    a = tl.exp2(dl[e] * A2[j])
                    hp = HP[e * NL + j]
                    gb += g * Bt[j][e]
                    gn = a * g
                    term = gn * hp
                    dd += term * A1[j]
                    dA_acc = dA_acc[:j] + (dA_acc[j] + term * dl[e],) + dA_acc[j + 1:]
                    dBe = dBe + (g * dx[e],)
                    dCe = dCe + (dy[e] * (a * hp + dx[e] * Bt[j][e]),)
                    G = G[:j] + (gn,) + G[j + 1:]
                gbs = (gb,) + gbs
                dds = (dd,) + dds
                dBs = dBe + dBs
                dCs = dCe + dCs
            gB = tl.sum(_join_cols(gbs, BLOCK_D, NS, E), axis=1, keep_dims=True)   # (BD, 1, E)
            ddl = tl.sum(_join_cols(dds, BLOCK_D, NS, E), axis=1, keep_dims=True) + xt * gB
            dxo = dlt * gB
            if HAS_D:
                dxo += Dv * dyt
                dD_acc += tl.sum(dyt * xt, axis=2, keep_dims=True)
            tl.store(dx_ptr + g_b + t3, dxo.to(dx_ptr.dtype.element_ty), mask=m & (s3 == 0))
            if SOFTPLUS:
                du = ddl * tl.sigmoid(ut)
            else:
                du = ddl
            du = tl.where(m, du, 0.0)
            tl.store(ddt_ptr + g_b + t3, du.to(ddt_ptr.dtype.element_ty), mask=m & (s3 == 0))
            db_acc += tl.sum(du, axis=2, keep_dims=True)
            t_r = c * STATE_CHUNK + k * E + e_r      # (1, E)
            m_r = (t_r < L) & (s_r < NS)
            for j in tl.static_range(NL):
                col_b = ()
                col_c = ()
                for e in tl.static_range(E):
                    col_b = col_b + (dBs[e * NL + j],)
                    col_c = col_c + (dCs[e * NL + j],)
                rb = tl.sum(_join_cols(col_b, BLOCK_D, NS, E), axis=0)   # (NS, E): over channels
                rc = tl.sum(_join_cols(col_c, BLOCK_D, NS, E), axis=0)
                if ATOMIC:
                    tl.atomic_add(dB_ptr + r_b + j * L + t_r, rb, mask=m_r, sem="relaxed")
                    tl.atomic_add(dC_ptr + r_b + j * L + t_r, rc, mask=m_r, sem="relaxed")
                else:
                    tl.store(dB_ptr + r_b + j * L + t_r, rb, mask=m_r)
                    tl.store(dC_ptr + r_b + j * L + t_r, rc, mask=m_r)

    for j in tl.static_range(NL):
        # the adjoint of the initial state: the first segment's
        tl.store(dh0_ptr + pid_b * ED * N + st2 + j, G[j], mask=md2 & (s2 * 0 + seg == 0))
        if DA_LOG:      # the gradient of A_log, A = -exp(A_log): dA * A
            dA_acc = dA_acc[:j] + (dA_acc[j] * A1[j],) + dA_acc[j + 1:]
        tl.atomic_add(dA_ptr + st2 + j, dA_acc[j], mask=md2, sem="relaxed")
    m_d = md3 & (s3 == 0)
    if HAS_D:
        tl.atomic_add(dD_ptr + d3 + s3 * 0, dD_acc, mask=m_d, sem="relaxed")
    tl.atomic_add(dbias_ptr + d3 + s3 * 0, db_acc, mask=m_d, sem="relaxed")


def _check_device(x: torch.Tensor):
    if not x.is_cuda and not _interpreting():
        raise ValueError(
            "selective_scan impl='triton' needs CUDA tensors (got device "
            f"{x.device}); set TRITON_INTERPRET=1 to run the Triton kernels on CPU tensors")


def _fwd(x, dt, A, B, C, D, z, dt_bias, initial_state, softplus, store_states,
         variant=None, STATE_CHUNK=None, **tiles):
    """x, dt, z: (B, ED, L); B, C: (B, N, L). Returns out (B, ED, L), hfin, states (or None),
    and the state chunk. `variant` / `tiles` (BLOCK_D, CHUNK, num_warps; lane also NS, its
    CHUNK being the step tile E) override the tables."""
    table = FWD_TRAIN_BY_DTYPE if store_states else FWD_BY_DTYPE
    variant = variant or table.get(x.dtype, "lane")
    if variant not in FWD_TILES:
        raise ValueError(f"forward variant {variant!r} is not one of {', '.join(FWD_TILES)}")
    cfg = {**FWD_TILES[variant], **{k: v for k, v in tiles.items() if v is not None}}
    state_chunk = STATE_CHUNK or BWD_CONFIG["CHUNK"]
    if variant == "chan":
        return _fwd_chan(x, dt, A, B, C, D, z, dt_bias, initial_state, softplus, store_states,
                         cfg["BLOCK_D"], cfg["CHUNK"], cfg["num_warps"], state_chunk)
    return _fwd_lane(x, dt, A, B, C, D, z, dt_bias, initial_state, softplus, store_states,
                     cfg["BLOCK_D"], cfg["NS"], cfg["CHUNK"], cfg["num_warps"], state_chunk,
                     cfg.get("SEGMENTS"))


def _lane_tile(what: str, N: int, BLOCK_D: int, NS: int, E: int, num_warps: int, state_chunk: int):
    """A lane kernel's (BLOCK_D, NS) for d_state N, after checking the tile: fewer lanes per
    channel (and more channels) where NS does not divide N (e.g. N = 6)."""
    if NS & (NS - 1) or state_chunk % E or BLOCK_D * NS != 32 * num_warps or E not in (2, 4, 8):
        raise ValueError(f"{what}: NS={NS} a power of two, E={E} (2, 4 or 8) dividing the "
                         f"state chunk {state_chunk}, and BLOCK_D*NS={BLOCK_D * NS} = 32*num_warps")
    while N % NS:
        NS //= 2
        BLOCK_D *= 2
    return BLOCK_D, NS


def _fwd_lane(x, dt, A, B, C, D, z, dt_bias, initial_state, softplus, store_states,
              BLOCK_D, NS, E, num_warps, state_chunk, segments=None):
    Bsz, ED, L = x.shape
    N = A.shape[1]
    BLOCK_D, NS = _lane_tile("lane forward", N, BLOCK_D, NS, E, num_warps, state_chunk)
    n_db = triton.cdiv(ED, BLOCK_D)
    segs, cps = time_segments(Bsz * n_db, triton.cdiv(L, state_chunk), FWD_SEG_PROGRAMS, segments,
                              state_chunk)
    hin = A         # unread with one segment
    if segs > 1:    # each segment's starting state first
        carry, dsum = _carries(Bsz, segs, ED, N, x.device)
        _bdl_fwd_carry_kernel[(n_db, Bsz * (segs - 1))](
            x, dt, B, A, dt_bias if dt_bias is not None else A, carry, dsum, L, ED, segs, cps,
            *x.stride(), *dt.stride(), *B.stride(), *A.stride(),
            HAS_BIAS=dt_bias is not None, SOFTPLUS=softplus,
            N=N, BLOCK_D=BLOCK_D, NS=NS, E=E, STATE_CHUNK=state_chunk, num_warps=num_warps)
        hin = _fold(carry, dsum, A, initial_state, reverse=False)
    return _launch_fwd(_bdl_fwd_lane_kernel, x, dt, A, B, C, D, z, dt_bias, initial_state, softplus,
                       store_states, state_chunk, (hin,), (segs, cps), segs,
                       HAS_HIN=segs > 1, BLOCK_D=BLOCK_D, NS=NS, E=E, num_warps=num_warps)


def _fwd_chan(x, dt, A, B, C, D, z, dt_bias, initial_state, softplus, store_states,
              BLOCK_D, CHUNK, num_warps, state_chunk):
    # no tile longer than the sequence needs (the scan's cost grows with the tile)
    CHUNK = max(16, min(CHUNK, triton.next_power_of_2(x.shape[2])))
    return _launch_fwd(_bdl_fwd_chan_kernel, x, dt, A, B, C, D, z, dt_bias, initial_state, softplus,
                       store_states, state_chunk, (), (), 1, BLOCK_D=BLOCK_D, CHUNK=CHUNK,
                       num_warps=num_warps)


def _launch_fwd(kernel, x, dt, A, B, C, D, z, dt_bias, initial_state, softplus, store_states,
                state_chunk, buffers, sizes, segs, **meta):
    """Both forward kernels' buffers and common arguments; `buffers` and `sizes`: the kernel's
    own tensors after the states and integers after (L, ED); `meta`: its own constants and
    tiles (BLOCK_D among them: the grid is (ED / BLOCK_D, B * segs))."""
    Bsz, ED, L = x.shape
    N = A.shape[1]
    dev = x.device
    out = torch.empty((Bsz, ED, L), device=dev, dtype=x.dtype)
    hfin = torch.empty((Bsz, ED, N), device=dev, dtype=torch.float32)
    states = (torch.empty((Bsz, triton.cdiv(L, state_chunk), ED, N), device=dev,
                          dtype=torch.float32) if store_states else hfin)
    h0 = initial_state.float().contiguous() if initial_state is not None else hfin
    zz = z if z is not None else x
    kernel[(triton.cdiv(ED, meta["BLOCK_D"]), Bsz * segs)](
        x, dt, zz, B, C, A, D if D is not None else A, dt_bias if dt_bias is not None else A, h0,
        out, hfin, states, *buffers, L, ED, *sizes,
        *x.stride(), *dt.stride(), *zz.stride(), *B.stride(), *C.stride(), *A.stride(),
        *out.stride(),
        HAS_Z=z is not None, HAS_D=D is not None, HAS_BIAS=dt_bias is not None,
        HAS_H0=initial_state is not None, SOFTPLUS=softplus, STORE_STATES=store_states,
        N=N, STATE_CHUNK=state_chunk, **meta,
    )
    return out, hfin, (states if store_states else None), state_chunk


def _bwd(dout, dhfin, x, dt, A, B, C, D, z, dt_bias, states, softplus, CHUNK, dz_out=None,
         y_out=None, ddt_over_dt=False, sums=None, dA_log=False, **tiles):
    """Gradients from the forward's states (stored every CHUNK steps), by the lane backward;
    `tiles` (BLOCK_D, NS, E, num_warps, ATOMIC, SEGMENTS) override BWD_TILES. `dz_out` (B, ED, L)
    with L contiguous (e.g. half of the in-projection's gradient) receives dz; `y_out` (B, ED, L)
    contiguous receives the gated output y * silu(z) recomputed on the way. `ddt_over_dt`: ddt
    is written over dt (contiguous, and dead after this call), one (B, ED, L) buffer fewer: safe
    because each program writes ddt only at steps whose dt it has already read, its value
    computed from that read, and the tiles are one warp (every lane reads before any writes).
    The sums (dB and dC as one (B, 2N, L), dA (ED, N), dD and dt_bias (ED,)) are added into one
    zeroed fp32 buffer, `sums` if given (at least scan_sums_numel elements: a caller's larger
    zeroed buffer shares one fill), else a new one: one fill, no reductions after the kernel.
    `dA_log`: dA comes out as the gradient of A_log, where A = -exp(A_log)."""
    alert_not_deterministic("the Triton selective-scan backward")
    Bsz, ED, L = x.shape
    N = A.shape[1]
    table = BWD_TILES["lane"]
    if Bsz * triton.cdiv(ED, table["BLOCK_D"]) < BWD_LANE_MIN_PROGRAMS:
        table = BWD_TILES["lane-small"]          # too few programs to fill the card: more of them
    cfg = {**table, **{k: v for k, v in tiles.items() if v is not None}}
    BLOCK_D, NS, E, nw, atomic = cfg["BLOCK_D"], cfg["NS"], cfg["E"], cfg["num_warps"], cfg["ATOMIC"]
    BLOCK_D, NS = _lane_tile("lane backward", N, BLOCK_D, NS, E, nw, CHUNK)
    n_db = triton.cdiv(ED, BLOCK_D)
    segs, cps = time_segments(Bsz * n_db, triton.cdiv(L, CHUNK), BWD_SEG_PROGRAMS, cfg.get("SEGMENTS"),
                              CHUNK, full=BWD_LANE_MIN_PROGRAMS)
    if (dz_out is not None or y_out is not None) and z is None:
        raise ValueError("dz_out / y_out take the backward of a gated scan (z given)")
    dev = x.device
    f32 = torch.float32
    dx = torch.empty((Bsz, ED, L), device=dev, dtype=x.dtype)
    if ddt_over_dt and (nw != 1 or not dt.is_contiguous()):
        raise ValueError("lane backward: ddt over dt needs one-warp tiles and a contiguous dt")
    ddt = dt if ddt_over_dt else torch.empty((Bsz, ED, L), device=dev, dtype=dt.dtype)
    dz = dz_out if dz_out is not None else (
        torch.empty((Bsz, ED, L), device=dev, dtype=z.dtype) if z is not None else dx)
    if dz.stride(2) != 1 or (y_out is not None and not y_out.is_contiguous()):
        raise ValueError("lane backward: dz_out needs L contiguous and y_out to be contiguous")
    if sums is None:
        sums = torch.zeros(scan_sums_numel(Bsz, ED, N, L), device=dev, dtype=f32)
    dBC, dA, dD, dbias = scan_sums(sums, Bsz, ED, N, L)
    dh0 = torch.empty((Bsz, ED, N), device=dev, dtype=f32)
    if atomic:
        dBp, dCp = dBC[:, :N], dBC[:, N:]
    else:       # per-program partials, summed below (the tests' small tiles)
        dBp, dCp = (torch.empty((n_db, Bsz, N, L), device=dev, dtype=f32) for _ in range(2))
    scratch = torch.empty((Bsz * segs, CHUNK // E, ED, N), device=dev, dtype=f32)
    zz = z if z is not None else x
    dhf = dhfin.float().contiguous() if dhfin is not None else dh0
    bias = dt_bias if dt_bias is not None else A
    gin = dh0       # unread with one segment
    if segs > 1:    # each segment's starting adjoint first
        carry, dsum = _carries(Bsz, segs, ED, N, dev)
        _bdl_bwd_carry_kernel[(n_db, Bsz * (segs - 1))](
            dt, zz, C, A, bias, dout, carry, dsum, L, ED, segs, cps,
            *dt.stride(), *zz.stride(), *C.stride(), *A.stride(), *dout.stride(),
            HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=softplus,
            N=N, BLOCK_D=BLOCK_D, NS=NS, E=E, STATE_CHUNK=CHUNK, num_warps=nw)
        gin = _fold(carry, dsum, A, dhfin, reverse=True)
    _bdl_bwd_lane_kernel[(n_db, Bsz * segs)](
        x, dt, zz, B, C, A, D if D is not None else A, bias,
        states, dout, dhf, dx, ddt, dz, dBp, dCp, dA, dD, dbias, dh0, scratch,
        y_out if y_out is not None else dx, gin, Bsz, L, ED, segs, cps, dBC.stride(0),
        *x.stride(), *dt.stride(), *zz.stride(), *B.stride(), *C.stride(), *A.stride(),
        *dout.stride(), dz.stride(0), dz.stride(1),
        HAS_Z=z is not None, HAS_D=D is not None, HAS_BIAS=dt_bias is not None,
        HAS_DHFIN=dhfin is not None, SOFTPLUS=softplus, ATOMIC=atomic, STORE_Y=y_out is not None,
        HAS_GIN=segs > 1, DA_LOG=dA_log, N=N, BLOCK_D=BLOCK_D, NS=NS, E=E, STATE_CHUNK=CHUNK,
        num_warps=nw)
    if not atomic:
        dBC[:, :N].copy_(dBp.sum(0))
        dBC[:, N:].copy_(dCp.sum(0))
    return dx, ddt, (dz if z is not None else None), dA, dBC[:, :N], dBC[:, N:], dD, dbias, dh0


def scan_sums_numel(Bsz: int, ED: int, N: int, L: int) -> int:
    """Elements of the backward's fp32 sums buffer: dB and dC (B, 2N, L), dA (ED, N), dD and
    dt_bias (ED,) each."""
    return Bsz * 2 * N * L + ED * N + 2 * ED


def scan_sums(buf: torch.Tensor, Bsz: int, ED: int, N: int, L: int):
    """The views (dBC (B, 2N, L), dA (ED, N), dD (ED,), dbias (ED,)) of a sums buffer."""
    n_bc = Bsz * 2 * N * L
    dBC = buf[:n_bc].view(Bsz, 2 * N, L)
    dA = buf[n_bc:n_bc + ED * N].view(ED, N)
    rest = buf[n_bc + ED * N:n_bc + ED * N + 2 * ED]
    return dBC, dA, rest[:ED], rest[ED:]


def _carries(Bsz: int, segs: int, ED: int, N: int, device):
    """A carry kernel's outputs: each segment's carry (B, segs, ED, N) and sum of delta
    (B, segs, ED), fp32."""
    return (torch.empty((Bsz, segs, ED, N), device=device, dtype=torch.float32),
            torch.empty((Bsz, segs, ED), device=device, dtype=torch.float32))


def _fold(carry, dsum, A, g0, reverse: bool) -> torch.Tensor:
    """The state (or with `reverse` the adjoint) entering each time segment, (B, segs, ED, N)
    fp32, by _bdl_fold_kernel from the carries and g0: the initial state, or with `reverse` the
    final state's gradient (None: zero)."""
    Bsz, segs, ED, N = carry.shape
    gin = torch.empty_like(carry)
    g0 = g0.float().contiguous() if g0 is not None else carry
    _bdl_fold_kernel[(triton.cdiv(ED * N, 1024), Bsz)](
        carry, dsum, A, g0, gin, ED, segs, *A.stride(),
        HAS_G0=g0 is not carry, REVERSE=reverse, N=N, BLOCK=1024, num_warps=4)
    return gin


def time_segments(programs: int, n_chunks: int, target: int, segments=None, chunk: int = 1,
                  full: int = 0) -> tuple[int, int]:
    """(segments, state chunks per segment) of a lane kernel over time: one segment where the
    grid of (d-block, batch) programs fills the card (`full` programs or more, default
    `target`), else as many as bring it to about `target`, each a whole number of state chunks
    (of `chunk` steps), none but the last shorter than SEG_MIN_STEPS steps and none empty;
    `segments` overrides."""
    if segments is None:
        segments = 1 if programs >= (full or target) else min(-(-target // programs),
                                                              n_chunks * chunk // SEG_MIN_STEPS)
    want = max(1, min(int(segments), n_chunks))
    cps = -(-n_chunks // want)
    return -(-n_chunks // cps), cps


class _SelectiveScanBDL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, initial_state, softplus, cfg):
        need_grad = any(ctx.needs_input_grad[:9])
        ctx.set_materialize_grads(False)
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
        # dA, dD and dbias are views of _bwd's one sums buffer, whose bulk is dB and dC
        # (B, 2N, L): copies even where no cast is needed, or a leaf's .grad keeps it alive
        return (
            dx if nig[0] else None,
            ddt if nig[1] else None,
            dA.to(A.dtype, copy=True) if nig[2] else None,
            dB.to(B.dtype) if nig[3] else None,
            dC.to(C.dtype) if nig[4] else None,
            dD.to(D.dtype, copy=True) if D is not None and nig[5] else None,
            dz if nig[6] else None,
            dbias.to(dt_bias.dtype, copy=True) if dt_bias is not None and nig[7] else None,
            dh0 if nig[8] else None,
            None, None,
        )


def selective_scan_triton_bdl(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True,
                              initial_state=None, return_final_state=False, **cfg):
    """Channel-major Triton selective scan: x, dt, z (B, ED, L); B, C (B, N, L); out (B, ED, L).
    cfg may override variant / BLOCK_D / CHUNK / num_warps of the forward (no-grad calls)."""
    _check_device(x)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, dt, A, B, C, D, z, dt_bias, initial_state)):
        out, hfin = _SelectiveScanBDL.apply(x, dt, A, B, C, D, z, dt_bias, initial_state,
                                            bool(dt_softplus), cfg)
    else:   # inference: no autograd node, no saved states (host time counts at small shapes)
        out, hfin = _fwd(x, dt, A, B, C, D, z, dt_bias, initial_state, bool(dt_softplus), False,
                         **cfg)[:2]
    if return_final_state:
        return out, hfin
    return out

