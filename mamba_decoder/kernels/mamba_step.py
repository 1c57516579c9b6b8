"""One Mamba-1 decoding step as two fused kernels, and their PyTorch twins.

The decode step of the mixer is in_proj -> conv step -> x_proj -> dt_proj -> SSM step ->
out_proj. The GEMMs stay cuBLAS; everything between them is tiny elementwise work on (B, ED) and
(B, ED, N) tensors (~30 PyTorch launches per step), which these two kernels do in one launch each:

  conv_step: x (B, ED), conv state (B, ED, K-1) shifted in place, weight (ED, K), bias (ED,)
             -> silu(sum_k w_k window_k + bias), window = [state, x]
  ssm_step:  delta = softplus(dt + dt_bias); A = -exp(A_log)          (fp32)
             h = exp(delta A) h + (delta x) B                          (h (B, ED, N) fp32, in place)
             y = (sum_n h C + D x) * silu(z)                           (x's dtype)

The *_torch functions are the math's one home: the mixer's CPU / autograd step runs them (and
`MambaMixer.ssm_step`, mambapy's step contract, is `ssm_step_torch` without the gate), and the
kernels are tested against them. The kernels have no backward (decoding is inference), read
every input by stride (x and z are halves of the in_proj output, B and C slices of the x_proj
output), never sync with the host, and so can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON, interpreting as _interpreting, jit as _jit, tl, triton


# Launch-latency bound at the target (B=8, ED=1024, N=16: 64 KB of conv data, 512 KB of state):
# tiles only need to give enough programs to spread over the SMs. conv: 128 channels per
# program, one per thread (64 programs at B=8); SSM: 64 channels x N per program, 8 states per
# thread (128 programs), the n-sum in registers plus intra-warp shuffles. Untuned (no GPU
# yet): **cfg overrides both.
CONV_STEP_CONFIG = dict(BLOCK_D=128, num_warps=4)
SSM_STEP_CONFIG = dict(BLOCK_D=64, num_warps=4)


def _check_device(*ts):
    x = ts[0]
    if not HAS_TRITON:
        raise ValueError("mamba_step Triton kernels: triton is not importable")
    if not x.is_cuda and not _interpreting():
        raise ValueError(f"mamba_step Triton kernels need CUDA tensors (got device {x.device}); "
                         "set TRITON_INTERPRET=1 to run them on CPU tensors")
    devs = {t.device for t in ts if t is not None}
    if len(devs) != 1:
        raise ValueError(f"mamba_step: all tensors must be on one device, got {devs}")


# ---------------------------------------------------------------------------------------------
# PyTorch twins (the reference math)

def conv_step_torch(x, conv_state, weight, bias=None):
    """x (B, ED), conv_state (B, ED, K-1) (updated in place: x shifted in), weight (ED, K),
    bias (ED,) or None -> silu(causal conv at the newest position) (B, ED), x's dtype."""
    window = torch.cat([conv_state, x.unsqueeze(2)], dim=2)           # (B, ED, K)
    conv_state.copy_(window[:, :, 1:])
    out = (window * weight).sum(-1)
    if bias is not None:
        out = out + bias
    return F.silu(out)


def ssm_step_torch(x, dt, A_log, B, C, D, h, dt_bias=None, z=None):
    """One selective-scan step. x, dt (B, ED); A_log (ED, N); B, C (B, N); D (ED,); h (B, ED, N)
    fp32 (not modified); dt_bias (ED,) or None; z (B, ED) or None.
    Returns (y, h_new): y = (h_new C + D x) [* silu(z)] in x's dtype, h_new fp32.
    mambapy's step order: h = exp(delta A) h + (delta x) B, delta = softplus(dt + dt_bias) (fp32)."""
    A = -torch.exp(A_log.float())                                       # (ED, N)
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    delta = F.softplus(dt)                                              # (B, ED)
    xf = x.float()
    h = torch.exp(delta.unsqueeze(-1) * A) * h + (delta * xf).unsqueeze(-1) * B.float().unsqueeze(1)
    y = (h @ C.float().unsqueeze(-1)).squeeze(2) + D.float() * xf
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype), h


# ---------------------------------------------------------------------------------------------
# Triton kernels

@_jit
def _conv_step_kernel(x_ptr, s_ptr, w_ptr, bias_ptr, out_ptr, ED,
                      sx_b, sx_d, ss_b, ss_d, ss_k, sw_d, sw_k, so_b, so_d,
                      K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m = offs < ED
    x = tl.load(x_ptr + b * sx_b + offs * sx_d, mask=m, other=0.0)
    acc = x.to(tl.float32) * tl.load(w_ptr + offs * sw_d + (K - 1) * sw_k, mask=m, other=0.0).to(tl.float32)
    s_row = s_ptr + b * ss_b + offs * ss_d
    # Every (channel, tap) of the state is read and written by the same thread (one 1-D layout
    # for all vectors), and tap k is stored to k-1 only after it was read: the shift is safe in
    # place without a barrier.
    for k in tl.static_range(K - 1):
        s_k = tl.load(s_row + k * ss_k, mask=m, other=0.0)
        acc += s_k.to(tl.float32) * tl.load(w_ptr + offs * sw_d + k * sw_k, mask=m, other=0.0).to(tl.float32)
        if k > 0:
            tl.store(s_row + (k - 1) * ss_k, s_k, mask=m)
    if K > 1:
        tl.store(s_row + (K - 2) * ss_k, x.to(s_ptr.dtype.element_ty), mask=m)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs, mask=m, other=0.0).to(tl.float32)
    y = acc / (1.0 + tl.exp(-acc))                                      # silu
    tl.store(out_ptr + b * so_b + offs * so_d, y.to(out_ptr.dtype.element_ty), mask=m)


@_jit
def _softplus_f32(u):
    # torch's softplus (log1p(exp(u)), u past 20 returned as is) in a stable form; log1p(e) by
    # Goldberg's e * log(1+e) / ((1+e) - 1), exact where log(1 + e) alone loses e < 1e-4.
    e = tl.exp(-tl.abs(u))
    w = 1.0 + e
    tiny = w == 1.0
    l1p = tl.where(tiny, e, tl.log(w) * (e / tl.where(tiny, 1.0, w - 1.0)))
    return tl.maximum(u, 0.0) + l1p


@_jit
def _ssm_step_kernel(x_ptr, dt_ptr, dtb_ptr, alog_ptr, B_ptr, C_ptr, D_ptr, z_ptr, h_ptr, out_ptr,
                     ED, N,
                     sx_b, sx_d, sdt_b, sdt_d, sa_d, sa_n, sB_b, sB_n, sC_b, sC_n, sz_b, sz_d,
                     sh_b, sh_d, sh_n, so_b, so_d,
                     HAS_BIAS: tl.constexpr, HAS_Z: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    md = offs_d < ED
    mn = offs_n < N
    m2 = md[:, None] & mn[None, :]

    x = tl.load(x_ptr + b * sx_b + offs_d * sx_d, mask=md, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + b * sdt_b + offs_d * sdt_d, mask=md, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(dtb_ptr + offs_d, mask=md, other=0.0).to(tl.float32)
    delta = _softplus_f32(dt)                                           # (BLOCK_D,)
    A = -tl.exp(tl.load(alog_ptr + offs_d[:, None] * sa_d + offs_n[None, :] * sa_n,
                        mask=m2, other=0.0).to(tl.float32))              # (BLOCK_D, BLOCK_N)
    Bv = tl.load(B_ptr + b * sB_b + offs_n * sB_n, mask=mn, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + b * sC_b + offs_n * sC_n, mask=mn, other=0.0).to(tl.float32)
    h_ptrs = h_ptr + b * sh_b + offs_d[:, None] * sh_d + offs_n[None, :] * sh_n
    h = tl.load(h_ptrs, mask=m2, other=0.0)
    h = tl.exp(delta[:, None] * A) * h + (delta * x)[:, None] * Bv[None, :]
    tl.store(h_ptrs, h, mask=m2)

    y = tl.sum(h * Cv[None, :], axis=1) + tl.load(D_ptr + offs_d, mask=md, other=0.0).to(tl.float32) * x
    if HAS_Z:
        z = tl.load(z_ptr + b * sz_b + offs_d * sz_d, mask=md, other=0.0).to(tl.float32)
        y = y * (z / (1.0 + tl.exp(-z)))
    tl.store(out_ptr + b * so_b + offs_d * so_d, y.to(out_ptr.dtype.element_ty), mask=md)


# ---------------------------------------------------------------------------------------------
# Launchers

def conv_step(x, conv_state, weight, bias=None, **cfg):
    """Triton twin of `conv_step_torch` (same arguments; conv_state shifted in place).
    weight may be (ED, K) or conv1d's (ED, 1, K)."""
    _check_device(x, conv_state, weight, bias)
    if weight.dim() == 3:
        weight = weight[:, 0]
    Bsz, ED = x.shape
    K = weight.shape[1]
    if weight.shape[0] != ED or conv_state.shape != (Bsz, ED, K - 1):
        raise ValueError(f"conv_step: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                         f"conv_state {tuple(conv_state.shape)} do not agree")
    if conv_state.dtype != x.dtype:
        raise ValueError(f"conv_step: conv_state dtype {conv_state.dtype} != x dtype {x.dtype}")
    bias = bias.contiguous() if bias is not None else None            # read with stride 1
    c = {**CONV_STEP_CONFIG, **cfg}
    out = torch.empty(Bsz, ED, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(ED, c["BLOCK_D"]), Bsz)
    _conv_step_kernel[grid](
        x, conv_state, weight, bias if bias is not None else weight, out, ED,
        x.stride(0), x.stride(1), *conv_state.stride(), weight.stride(0), weight.stride(1),
        out.stride(0), out.stride(1),
        K=K, HAS_BIAS=bias is not None, BLOCK_D=c["BLOCK_D"], num_warps=c["num_warps"])
    return out


def ssm_step(x, dt, A_log, B, C, D, h, dt_bias=None, z=None, **cfg):
    """Triton twin of `ssm_step_torch` (same arguments), except that h is updated IN PLACE and
    only y is returned."""
    _check_device(x, dt, A_log, B, C, D, h, dt_bias, z)
    Bsz, ED = x.shape
    N = A_log.shape[1]
    if dt.shape != x.shape or (z is not None and z.shape != x.shape) or A_log.shape[0] != ED \
            or B.shape != (Bsz, N) or C.shape != (Bsz, N) or D.shape != (ED,) \
            or h.shape != (Bsz, ED, N) or (dt_bias is not None and dt_bias.shape != (ED,)):
        raise ValueError("ssm_step: shapes do not agree: x {}, dt {}, A_log {}, B {}, C {}, D {}, "
                         "h {}".format(*(tuple(t.shape) for t in (x, dt, A_log, B, C, D, h))))
    if h.dtype != torch.float32:
        raise ValueError(f"ssm_step: the state must be fp32, got {h.dtype}")
    D = D.contiguous()                                                  # read with stride 1
    dt_bias = dt_bias.contiguous() if dt_bias is not None else None
    c = {**SSM_STEP_CONFIG, **cfg}
    out = torch.empty(Bsz, ED, device=x.device, dtype=x.dtype)
    zz = z if z is not None else x
    grid = (triton.cdiv(ED, c["BLOCK_D"]), Bsz)
    _ssm_step_kernel[grid](
        x, dt, dt_bias if dt_bias is not None else D, A_log, B, C, D, zz, h, out, ED, N,
        x.stride(0), x.stride(1), dt.stride(0), dt.stride(1), A_log.stride(0), A_log.stride(1),
        B.stride(0), B.stride(1), C.stride(0), C.stride(1), zz.stride(0), zz.stride(1),
        *h.stride(), out.stride(0), out.stride(1),
        HAS_BIAS=dt_bias is not None, HAS_Z=z is not None,
        BLOCK_D=c["BLOCK_D"], BLOCK_N=triton.next_power_of_2(N), num_warps=c["num_warps"])
    return out
