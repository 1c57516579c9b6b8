"""The Mamba-1 mixer and "Regular Mamba" (one residual mambapy layer).

`MambaMixer` *is* mambapy's `MambaBlock` (same parameters, same init, same state dict); the
reference backend runs mambapy's own code, the fast backend replaces the scan with
`kernels.selective_scan` on the same parameters.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F
from mambapy.mamba import MambaBlock, MambaConfig
from mambapy.mamba import RMSNorm as MambaRMSNorm
from torch import nn

from ..config import DEFAULT_BACKEND, check_backend, rest_backend
from ..kernels import autocast_dtype, cpu_fused, cpu_gemm
from ..policy import DEFAULT_POLICY, KernelPolicy
from .derived import derived
from .inputs import check_hidden, check_tokens


@dataclass
class MambaCache:
    """What a Mamba mixer carries between decoding steps: constant in the context length."""

    conv: torch.Tensor  # (B, ED, d_conv - 1) the last inputs of the causal conv, activation dtype
    #                     (d_conv of them on the mamba_ssm backend, whose conv step keeps the window)
    ssm: torch.Tensor   # (B, ED, N) the SSM state, fp32

    def nbytes(self, length: Optional[int] = None) -> int:
        """Bytes held (at any context `length`: the state does not grow)."""
        return sum(t.numel() * t.element_size() for t in (self.conv, self.ssm))


class MambaMixer(MambaBlock):
    """mambapy's MambaBlock with a `backend` switch. Input and output (B, L, D)."""

    def __init__(self, config: MambaConfig, backend: str = DEFAULT_BACKEND,
                 policy: Optional[KernelPolicy] = None):
        if config.use_cuda:
            raise ValueError("MambaConfig.use_cuda=True asks for the mamba_ssm CUDA kernels; "
                             "use backend='fast' instead (accepted: use_cuda=False)")
        super().__init__(config)
        self.backend = check_backend(backend)
        self.policy = policy or DEFAULT_POLICY
        if backend == "mamba_ssm":
            self._attach_mamba_ssm()

    def _attach_mamba_ssm(self) -> None:
        """mamba_ssm's `Mamba` on this module's own parameters (the same tensors: one state dict,
        which loads into it with strict=True), kept out of the module tree so the state dict
        stays mambapy's. Forward and training run its `mamba_inner_fn`, decoding its `step`."""
        from ..kernels import mamba_ssm_ext

        mamba_ssm_ext.require()
        from mamba_ssm.modules.mamba_simple import Mamba

        cfg = self.config
        if cfg.inner_layernorms:
            raise ValueError("backend 'mamba_ssm' has no inner_layernorms (accepted: inner_layernorms=False)")
        peer = Mamba(cfg.d_model, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand_factor,
                     dt_rank=cfg.dt_rank, conv_bias=cfg.conv_bias, bias=cfg.bias, use_fast_path=True,
                     layer_idx=0, device="meta")
        for name, _ in list(peer.named_parameters()):
            owner, _, attr = name.rpartition(".")
            setattr(peer.get_submodule(owner) if owner else peer, attr, self.get_parameter(name))
        object.__setattr__(self, "_mamba_ssm", peer)

    def _forward_mamba_ssm(self, x: torch.Tensor, cache: Optional[MambaCache]) -> torch.Tensor:
        from ..kernels import mamba_ssm_ext

        mamba_ssm_ext.require(x.device)
        peer = self._mamba_ssm
        if cache is None:
            return peer(x)
        if x.shape[1] == 1:
            return peer.step(x, cache.conv, cache.ssm)[0]
        # mamba_ssm's prefill fills a cache but starts from zero states: it cannot continue one
        if torch.count_nonzero(cache.ssm) or torch.count_nonzero(cache.conv):
            raise ValueError("backend 'mamba_ssm' prefills an empty cache only (mamba_ssm's prefill "
                             "does not continue a state); decode one token at a time instead")
        params = SimpleNamespace(key_value_memory_dict={0: (cache.conv, cache.ssm)}, seqlen_offset=0)
        return peer(x, inference_params=params)

    def ssm(self, x, z):
        # mambapy adds D * x in fp32 and returns fp32, which then meets a bf16 out_proj and fails
        # ("expected m1 and m2 to have the same dtype"). The one change: hand back x's dtype.
        return super().ssm(x, z).to(x.dtype)

    def init_cache(self, batch_size: int, device=None, dtype=None) -> MambaCache:
        p = self.in_proj.weight
        device, dtype = device or p.device, dtype or p.dtype
        ED, N, K = self.config.d_inner, self.config.d_state, self.config.d_conv
        window = K if self.backend == "mamba_ssm" else K - 1
        return MambaCache(torch.zeros(batch_size, ED, window, device=device, dtype=dtype),
                          torch.zeros(batch_size, ED, N, device=device, dtype=torch.float32))

    def forward(self, x: torch.Tensor, cache: Optional[MambaCache] = None,
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, L, D) -> (B, L, D). With `cache`, x continues the sequence the cache has seen,
        and the cache is updated in place to include x. `residual` (B, L, D), if given, is added
        to the output (the fast channel-major path adds it inside the output projection's GEMM;
        not under autocast, where the sum keeps the residual's own dtype as `out + residual` does)."""
        if residual is not None and autocast_dtype(x.device) not in (None, residual.dtype):
            return self.forward(x, cache) + residual
        if self.backend == "fast" and cache is None and self._layout(x) == "BDL":
            return self._forward_fast(x, residual=residual)
        if self.backend == "fast" and cache is not None and x.shape[1] == 1:
            return self._step_fast(x[:, 0], cache, None if residual is None else residual[:, 0]).unsqueeze(1)
        out = self._forward_mamba_ssm(x, cache) if self.backend == "mamba_ssm" else self._forward(x, cache)
        return out if residual is None else out + residual

    def _forward(self, x: torch.Tensor, cache: Optional[MambaCache]) -> torch.Tensor:
        if cache is None:
            return super().forward(x) if self.backend == "reference" else self._forward_fast(x)
        if self.backend == "reference":
            # mambapy's own decoding path, one token at a time.
            ys = []
            for t in range(x.shape[1]):
                y, (h, inputs) = self.step(x[:, t], (cache.ssm, cache.conv))
                cache.ssm.copy_(h)
                cache.conv.copy_(inputs)
                ys.append(y)
            return torch.stack(ys, 1)
        if x.shape[1] == 1:
            return self._step_fast(x[:, 0], cache).unsqueeze(1)
        return self._forward_fast(x, cache)

    def ssm_step(self, x, h):
        # mambapy's step with its state in fp32 and its output in x's dtype (mambapy's own
        # mixes an fp32 state with bf16 C in one matmul and fails outside fp32). The math is
        # kernels.mamba_step's twin, which the fused Triton step is tested against.
        from ..kernels.mamba_step import ssm_step_torch

        cfg = self.config
        dt, B, C = torch.split(self.x_proj(x), [cfg.dt_rank, cfg.d_state, cfg.d_state], dim=-1)
        dt, B, C = self._apply_layernorms(dt, B, C)
        return ssm_step_torch(x, self.dt_proj(dt), self.A_log, B, C, self.D, h)  # (B, ED), (B, ED, N)

    def _fused_impl(self, x: torch.Tensor) -> str:
        """"triton" or "torch" for the conv + SiLU of the channel-major forward (the policy's
        mamba_fused)."""
        return "triton" if self.policy.decide(x.device, x.dtype).mamba_fused else "torch"

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        """Causal depthwise conv, x (B, L, ED) -> (B, L, ED) (the channel-major path runs
        kernels.causal_conv)."""
        L = x.shape[1]
        return self.conv1d(x.transpose(1, 2))[:, :, :L].transpose(1, 2)  # causal depthwise, (B, L, ED)

    def _scan_params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A = -exp(A_log), D, dt bias), fp32, as the scan takes them; cached in inference
        (models/derived.py): five small ops fewer per eager forward, which is launch-bound at
        small shapes."""
        return derived(self, "scan_params", (self.A_log, self.D, self.dt_proj.bias),
                       lambda: (-torch.exp(self.A_log.float()), self.D.float(), self.dt_proj.bias.float()))

    def _ssm_inputs(self, x: torch.Tensor, channel_major: bool = False):
        cfg = self.config
        A = self._scan_params()[0]                                      # (ED, N) = -exp(A_log)
        if channel_major:
            # x (B, ED, L): dBC^T = W_x x -> (B, R + 2N, L); B^T, C^T are (B, N, L) slices
            Bsz = x.shape[0]
            dBC = torch.bmm(self.x_proj.weight.expand(Bsz, -1, -1), x)
            if self.x_proj.bias is not None:
                dBC = dBC + self.x_proj.bias[:, None]
            R, N = cfg.dt_rank, cfg.d_state
            dt, B, C = dBC[:, :R], dBC[:, R:R + N], dBC[:, R + N:]
            # (B, ED, L); bias fused in the scan
            dt = torch.bmm(self.dt_proj.weight.expand(Bsz, -1, -1), dt)
            return dt, A, B, C
        onednn = self.policy.decide(x.device, x.dtype, self._needs_grad(x)).cpu_gemm
        dBC = cpu_gemm.linear(x, self.x_proj.weight, self.x_proj.bias, onednn)   # (B, L, R + 2N)
        dt, B, C = torch.split(dBC, [cfg.dt_rank, cfg.d_state, cfg.d_state], dim=-1)
        dt, B, C = self._apply_layernorms(dt, B, C)
        dt = cpu_gemm.linear(dt, self.dt_proj.weight, None, onednn)     # (B, L, ED); bias fused in the scan
        return dt, A, B, C

    def _needs_grad(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))

    def _layout(self, x: torch.Tensor) -> str:
        # Channel-major ("BDL": activations (B, ED, L), L contiguous) on CUDA, where the Triton
        # scan reads coalesced time rows and the GEMMs write that layout directly; (B, L, ED) on
        # CPU, where it measured faster (NOTES.md): the policy's mamba_layout. inner_layernorms
        # normalize over dt_rank / d_state, which is the BLD path's last axis: that config
        # always runs BLD.
        return self._layout_on(x.device, x.dtype)

    def _layout_on(self, device: torch.device, dtype=None) -> str:
        if self.config.inner_layernorms:
            return "BLD"
        return self.policy.decide(device, dtype).mamba_layout

    def _forward_fast(self, x: torch.Tensor, cache: Optional[MambaCache] = None,
                      residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        from ..kernels.selective_scan import selective_scan

        if self._layout(x) == "BDL":
            return self._forward_fast_bdl(x, cache, selective_scan, residual)

        d = self.policy.decide(x.device, x.dtype, self._needs_grad(x))
        xz = cpu_gemm.linear(x, self.in_proj.weight, self.in_proj.bias, d.cpu_gemm)   # (B, L, 2 ED)
        x, z = xz.chunk(2, dim=-1)                                      # (B, L, ED) each
        if cache is None and d.cpu_fused and cpu_fused.runs(x, self.conv1d.weight):
            x = cpu_fused.causal_conv1d_silu_bld(x, self.conv1d.weight, self.conv1d.bias)  # one C pass
        elif cache is None:
            x = F.silu(self._conv(x))
        else:
            K = self.config.d_conv
            xt = torch.cat([cache.conv, x.transpose(1, 2)], dim=2)     # (B, ED, K - 1 + L)
            cache.conv.copy_(xt[:, :, xt.shape[2] - (K - 1):])            # K = 1: no columns (not -0:)
            x = F.conv1d(xt, self.conv1d.weight, self.conv1d.bias, groups=self.config.d_inner)
            x = F.silu(x.transpose(1, 2))                               # (B, L, ED)
        dt, A, B, C = self._ssm_inputs(x)
        _, D, dt_bias = self._scan_params()
        y = selective_scan(x, dt, A, B, C, D, z=z, dt_bias=dt_bias,
                           dt_softplus=True, initial_state=None if cache is None else cache.ssm,
                           return_final_state=cache is not None)        # (B, L, ED), gated by silu(z)
        if cache is not None:
            y, h = y
            cache.ssm.copy_(h)
        return cpu_gemm.linear(y, self.out_proj.weight, self.out_proj.bias, d.cpu_gemm)

    def _forward_fast_bdl(self, x, cache, selective_scan, residual=None):
        """Channel-major fast path: x (B, L, D) -> (B, L, D) (a transposed view of (B, D, L))."""
        Bsz = x.shape[0]
        ED = self.config.d_inner
        if cache is None and self._trains_fused(x):
            # the whole mixer in one autograd node, the parameters as they are (A = -exp(A_log)
            # and the fp32 reads happen inside): launches and autograd nodes are the host's cost,
            # and the host bounds small shapes
            return _MixerCoreTrain.apply(x, self.in_proj.weight, self.in_proj.bias, self.conv1d.weight,
                                         self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight,
                                         self.A_log, self.D, self.dt_proj.bias, self.out_proj.weight,
                                         self.out_proj.bias, residual)
        xz = _in_proj_bdl(x, self.in_proj.weight, self.in_proj.bias)     # (B, 2 ED, L)
        xi, z = xz[:, :ED], xz[:, ED:]                                  # (B, ED, L) views, read by stride
        # causal conv + SiLU, (B, ED, L); with a cache, prepend its window and write the new one
        state = None if cache is None else cache.conv
        if self._fused_impl(xi) == "triton":
            from ..kernels.causal_conv import causal_conv1d_silu as conv_silu
        else:
            from ..kernels.causal_conv import causal_conv1d_silu_torch as conv_silu
        xi = conv_silu(xi, self.conv1d.weight, self.conv1d.bias, state, state)
        dt, A, B, C = self._ssm_inputs(xi, channel_major=True)
        _, D, dt_bias = self._scan_params()
        y = selective_scan(xi, dt, A, B, C, D, z=z, dt_bias=dt_bias,
                           dt_softplus=True, initial_state=None if cache is None else cache.ssm,
                           return_final_state=cache is not None, layout="BDL")  # (B, ED, L)
        if cache is not None:
            y, h = y
            cache.ssm.copy_(h)
        # y^T W^T straight into (B, L, D) (cuBLAS reads both transposed operands in place), the
        # residual accumulated by the same GEMM: no strided (B, D, L) -> (B, L, D) add after it.
        wT = self.out_proj.weight.t().expand(Bsz, -1, -1)               # (B, ED, D)
        if residual is not None:
            out = torch.baddbmm(residual, y.transpose(1, 2), wT)
        else:
            out = torch.bmm(y.transpose(1, 2), wT)                      # (B, L, D)
        if self.out_proj.bias is not None:
            out = out + self.out_proj.bias
        return out

    def _trains_fused(self, x: torch.Tensor) -> bool:
        """Whether the channel-major forward takes the fused training path (_MixerCoreTrain):
        with autograd on, where the Triton conv and scan run (CUDA; CPU tensors when forced under
        TRITON_INTERPRET=1), and x_proj has no bias (mambapy's never has)."""
        return (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
                and self._fused_impl(x) == "triton" and self.x_proj.bias is None)

    def _out_proj(self, y: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.Tensor:
        """out_proj(y) (+ residual, added by the GEMM itself where out_proj has no bias: one
        launch fewer per decoding step)."""
        if residual is None:
            return self.out_proj(y)
        if self.out_proj.bias is None:
            return torch.addmm(residual, y, self.out_proj.weight.t())
        return self.out_proj(y) + residual

    def _step_fast(self, x: torch.Tensor, cache: MambaCache, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One token, x (B, D) -> (B, D) (+ residual (B, D) if given): a fixed sequence of device
        ops with no host sync and in-place cache updates, so it can be captured in a CUDA graph.
        On CUDA: in_proj, the fused conv step, x_proj, dt_proj (bias in the SSM kernel), the fused
        SSM step, out_proj with the residual added in its GEMM."""
        from ..kernels import mamba_step as ms

        cfg = self.config
        x, z = self.in_proj(x).chunk(2, dim=-1)                         # (B, ED) views each
        if autocast_dtype(x.device) is not None:
            x = x.to(cache.conv.dtype)  # the window's dtype (autocast's in_proj gave its own)
        conv_w, conv_b = self.conv1d.weight[:, 0], self.conv1d.bias      # (ED, K), (ED,)
        # The Triton step has no backward and inner_layernorms normalize B, C, dt in between:
        # both keep the PyTorch ops.
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        if self.policy.decide(x.device, x.dtype, needs_grad).mamba_step and not cfg.inner_layernorms:
            x = ms.conv_step(x, cache.conv, conv_w, conv_b)             # (B, ED), cache shifted
            dt, B, C = torch.split(self.x_proj(x), [cfg.dt_rank, cfg.d_state, cfg.d_state], dim=-1)
            dt = F.linear(dt, self.dt_proj.weight)                      # (B, ED), bias fused
            y = ms.ssm_step(x, dt, self.A_log, B, C, self.D, cache.ssm, self.dt_proj.bias, z)
            return self._out_proj(y, residual)
        x = ms.conv_step_torch(x, cache.conv, conv_w, conv_b)
        # with autograd on, the step's backward needs the old state: don't overwrite it in place
        y, h = self.ssm_step(x, cache.ssm.clone() if needs_grad else cache.ssm)
        cache.ssm.copy_(h)
        return self._out_proj(y * F.silu(z), residual)

    def kernel_choice(self, device: torch.device, dtype: torch.dtype) -> dict[str, str]:
        if self.backend == "reference":
            return {"scan": "mambapy-pscan" if self.config.pscan else "mambapy-seq"}
        if self.backend == "mamba_ssm":
            return {"scan": "mamba_ssm mamba_inner_fn (selective_scan_cuda)", "conv": "causal_conv1d",
                    "step": "mamba_ssm step (selective_state_update)"}
        d = self.policy.decide(device, dtype)
        bdl = self._layout_on(device, dtype) == "BDL"
        conv = "triton-conv-silu" if d.mamba_fused and bdl else "torch-conv1d"
        if d.cpu_fused and not bdl:
            conv = "cpu-conv-silu (inference), torch-conv1d otherwise"
        out = {"scan": d.scan, "conv": conv,
               "step": "triton-fused" if d.mamba_step and not self.config.inner_layernorms else "torch"}
        if d.cpu_gemm:
            out["gemm"] = cpu_gemm.KERNEL_NAME
        return out


class _MixerCoreTrain(torch.autograd.Function):
    """The channel-major mixer for training: x (B, L, D) -> in_proj (B, 2 ED, L) -> conv + SiLU ->
    x_proj -> dt_proj -> selective scan (gated by silu(z)) -> out_proj (+ residual) -> (B, L, D),
    with one hand-written backward, as mamba_ssm's mamba_inner_fn does. It takes
    the parameters as they are (conv1d's (ED, 1, K) weight, A_log, D and dt_proj's bias in their
    own dtype: the kernels read them in fp32) and saves x, xz, dBC and the scan's chunk states:
    the conv output and dt are recomputed in the backward, and the gated scan output y, which
    out_proj's weight gradient needs, is rebuilt by the scan's backward on its way (nothing of
    size (B, ED, L) beyond xz is kept). dx and dz are written straight into one dxz, the conv's
    and the scan's backward each filling its half. The backward's sums (dB, dC and every small
    parameter's gradient) go into one zeroed fp32 buffer, the small parameters' gradients cast
    to their dtype in one op: the host's launches, not the GPU, bound small shapes."""

    @staticmethod
    def forward(ctx, x, w_in, b_in, conv_w, conv_b, w_x, w_dt, A_log, D, dt_bias, w_out, b_out, residual):
        # under autocast: the GEMMs' operands in its dtype, as autocast would run them (the conv
        # and the scan read their small parameters in fp32 either way), and no autocast inside,
        # since the backward runs outside it
        amp = autocast_dtype(x.device)
        if amp is not None:
            x, w_in, b_in, w_x, w_dt, w_out, b_out = (
                None if t is None else t.to(amp) for t in (x, w_in, b_in, w_x, w_dt, w_out, b_out))
        with torch.autocast(x.device.type, enabled=False):
            return _MixerCoreTrain._forward(ctx, x, w_in, b_in, conv_w, conv_b, w_x, w_dt, A_log, D,
                                            dt_bias, w_out, b_out, residual)

    @staticmethod
    def _forward(ctx, x, w_in, b_in, conv_w, conv_b, w_x, w_dt, A_log, D, dt_bias, w_out, b_out, residual):
        from ..kernels.causal_conv import _launch as conv_fwd
        from ..kernels.selective_scan import triton_bdl as tb

        xz = _in_proj_bdl(x, w_in, b_in)                                       # (B, 2 ED, L)
        Bsz, ED2, L = xz.shape
        ED, R = ED2 // 2, w_dt.shape[1]
        N = A_log.shape[1]
        A = -torch.exp(A_log.float())
        xi, z = xz[:, :ED], xz[:, ED:]
        xc = conv_fwd(xi, conv_w[:, 0], conv_b, None, None, {})                # (B, ED, L)
        dBC = torch.bmm(w_x.expand(Bsz, -1, -1), xc)                           # (B, R + 2N, L)
        dt = torch.bmm(w_dt.expand(Bsz, -1, -1), dBC[:, :R])                   # (B, ED, L)
        y, _, states, chunk = tb._fwd(xc, dt, A, dBC[:, R:R + N], dBC[:, R + N:], D, z, dt_bias,
                                      None, True, True)
        wT = w_out.t().expand(Bsz, -1, -1)                                     # (B, ED, D)
        out = (torch.baddbmm(residual, y.transpose(1, 2), wT) if residual is not None
               else torch.bmm(y.transpose(1, 2), wT))                          # (B, L, D)
        if b_out is not None:
            out = out + b_out
        ctx.save_for_backward(x, w_in, xz, conv_w, conv_b, w_x, w_dt, A, D, dt_bias, w_out, dBC, states)
        ctx.chunk, ctx.has_residual, ctx.has_b_out = chunk, residual is not None, b_out is not None
        ctx.has_b_in = b_in is not None
        ctx.small_dtypes = (A_log.dtype, D.dtype, None if dt_bias is None else dt_bias.dtype,
                            conv_w.dtype, None if conv_b is None else conv_b.dtype)
        return out

    @staticmethod
    def backward(ctx, dout):
        from ..kernels.causal_conv import _launch as conv_fwd
        from ..kernels.causal_conv import _launch_bwd as conv_bwd
        from ..kernels.selective_scan import triton_bdl as tb

        x, w_in, xz, conv_w, conv_b, w_x, w_dt, A, D, dt_bias, w_out, dBC, states = ctx.saved_tensors
        Bsz, ED2, L = xz.shape
        ED, R = ED2 // 2, w_dt.shape[1]
        N, K = A.shape[1], conv_w.shape[2]
        xi, z = xz[:, :ED], xz[:, ED:]
        w_conv = conv_w[:, 0]                                                  # (ED, K) view
        xc = conv_fwd(xi, w_conv, conv_b, None, None, {})                      # recomputed
        dt = torch.bmm(w_dt.expand(Bsz, -1, -1), dBC[:, :R])
        dy = torch.bmm(w_out.t().expand(Bsz, -1, -1), dout.transpose(1, 2))   # (B, ED, L)
        dxz = torch.empty_like(xz)
        y = torch.empty_like(xc)
        # one zeroed fp32 buffer: the scan's sums (dB, dC (B, 2N, L); dA_log (ED, N); dD, ddt_bias
        # (ED,)), then the conv's (dw (ED, K), db (ED,)): the small grads lie together after dBC
        n_scan = tb.scan_sums_numel(Bsz, ED, N, L)
        sums = torch.zeros(n_scan + ED * (K + 1), device=xz.device, dtype=torch.float32)
        dxc, ddt, _, _, _, _, _, _, _ = tb._bwd(
            dy, None, xc, dt, A, dBC[:, R:R + N], dBC[:, R + N:], D, z, dt_bias, states, True,
            ctx.chunk, dz_out=dxz[:, ED:], y_out=y, ddt_over_dt=True, sums=sums[:n_scan], dA_log=True)
        # ddt was written over dt; each (B, ED, L) temporary is freed once its last use is
        # done, so the conv backward's fp32 buffer does not come on top of them: the train
        # step's peak is the scan backward's moment.
        del dy, dt
        dw_out = _batch_sum(torch.bmm(dout.transpose(1, 2), y.transpose(1, 2)))    # (D, ED)
        del y
        ddt_low = torch.bmm(w_dt.t().expand(Bsz, -1, -1), ddt)                 # (B, R, L)
        dw_dt = _batch_sum(torch.bmm(ddt, dBC[:, :R].transpose(1, 2)))        # (ED, R)
        del ddt
        n_bc = Bsz * 2 * N * L
        ddBC = torch.cat([ddt_low, sums[:n_bc].view(Bsz, 2 * N, L).to(dBC.dtype)], 1)   # (B, R + 2N, L)
        dw_x = _batch_sum(torch.bmm(ddBC, xc.transpose(1, 2)))                 # (R + 2N, ED)
        del xc
        dxc.baddbmm_(w_x.t().expand(Bsz, -1, -1), ddBC)                        # in place: no second (B, ED, L)
        conv_bwd(xi, w_conv, conv_b, dxc, dx=dxz[:, :ED], sums=sums[n_scan:])
        # the small parameters' grads, cast in one op where their dtypes agree; a copy even where
        # no cast is needed (fp32): views of `sums` would keep its (B, 2N, L) bulk alive as .grad
        dtypes = {t for t in ctx.small_dtypes if t is not None}
        small = sums[n_bc:].to(dtypes.pop() if len(dtypes) == 1 else torch.float32, copy=True)
        sizes = [ED * N, ED, ED, ED * K, ED]
        dA_log, dD, ddt_bias, dconv_w, dconv_b = torch.split(small, sizes)
        a_t, d_t, b_t, w_t, cb_t = ctx.small_dtypes
        # the in-projection's backward: (B, L, D) input grad and the weight's, summed over batch
        dx = torch.bmm(dxz.transpose(1, 2), w_in.expand(Bsz, -1, -1))         # (B, L, D)
        dw_in = _batch_sum(torch.bmm(dxz, x))                                  # (2 ED, D)
        return (dx, dw_in, dxz.sum((0, 2)) if ctx.has_b_in else None,
                dconv_w.view(ED, 1, K).to(w_t), None if conv_b is None else dconv_b.to(cb_t),
                dw_x, dw_dt, dA_log.view(ED, N).to(a_t), dD.to(d_t),
                None if dt_bias is None else ddt_bias.to(b_t), dw_out,
                dout.sum((0, 1)) if ctx.has_b_out else None, dout if ctx.has_residual else None)


def _in_proj_bdl(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """in_proj of x (B, L, D) straight into the channel-major (B, 2 ED, L) (cuBLAS reads x
    transposed in place)."""
    xz = torch.bmm(w.expand(x.shape[0], -1, -1), x.transpose(1, 2))
    return xz if b is None else xz + b[:, None]


def _batch_sum(t: torch.Tensor) -> torch.Tensor:
    """t.sum(0) over a (B, M, N) batch of weight-gradient products; a view at batch 1 (one
    reduction launch fewer)."""
    return t[0] if t.shape[0] == 1 else t.sum(0)


class RMSNorm(MambaRMSNorm):
    """mambapy's RMSNorm (same parameter, same math); the fast backend runs it as one fused
    `F.rms_norm` (fp32 inside) instead of mambapy's five elementwise ops, or on the CPU in fp32
    inference (the policy's cpu_fused) as one C pass (`kernels.cpu_fused.rms_norm_cpu`)."""

    def __init__(self, d_model: int, eps: float = 1e-5, use_mup: bool = False,
                 backend: str = DEFAULT_BACKEND, policy: Optional[KernelPolicy] = None):
        super().__init__(d_model, eps, use_mup)
        self.backend = check_backend(backend)
        self.policy = policy or DEFAULT_POLICY

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "reference":
            return super().forward(x)
        w = None if self.use_mup else self.weight
        if x.device.type == "cpu" and self.policy.decide(x.device, x.dtype).cpu_fused \
                and cpu_fused.runs(x, *([] if w is None else [w])):
            return cpu_fused.rms_norm_cpu(x, w, self.eps)
        return F.rms_norm(x, (x.shape[-1],), w, self.eps)


class ResidualLayer(nn.Module):
    """mambapy's ResidualBlock, mixer(norm(x)) + x, with the mixer's backend chosen."""

    def __init__(self, config: MambaConfig, backend: str = DEFAULT_BACKEND,
                 policy: Optional[KernelPolicy] = None):
        super().__init__()
        self.mixer = MambaMixer(config, backend, policy)
        self.norm = RMSNorm(config.d_model, config.rms_norm_eps, config.mup, rest_backend(backend), policy)

    def forward(self, x: torch.Tensor, cache: Optional[MambaCache] = None) -> torch.Tensor:
        return self.mixer(self.norm(x), cache, residual=x)


class RegularMamba(nn.Module):
    """mambapy's `Mamba` (state dict `layers.{i}.mixer.*`, `layers.{i}.norm.weight`), any backend.

    The suite's baseline is `RegularMamba(MambaConfig(d_model=dim, n_layers=1))`.
    """

    def __init__(self, config: MambaConfig, backend: str = DEFAULT_BACKEND,
                 policy: Optional[KernelPolicy] = None):
        super().__init__()
        self.config, self.dim = config, config.d_model
        self.layers = nn.ModuleList([ResidualLayer(config, backend, policy) for _ in range(config.n_layers)])

    def init_cache(self, batch_size: int, device=None, dtype=None, *, max_len: Optional[int] = None,
                   kind: Optional[str] = None) -> list[MambaCache]:
        """One state per layer, constant in the context (`max_len`, `kind`: see MambaDecoderBlock)."""
        return [layer.mixer.init_cache(batch_size, device, dtype) for layer in self.layers]

    def forward(self, x: torch.Tensor, cache: Optional[list[MambaCache]] = None, *,
                start_pos=None) -> torch.Tensor:
        if self.layers:
            check_hidden(x, self.dim, "RegularMamba", self.layers[0].mixer.in_proj.weight)
        for i, layer in enumerate(self.layers):
            x = layer(x, None if cache is None else cache[i])
        return x


class MambaLM(nn.Module):
    """mambapy's `LM` (embedding, `mamba` = depth residual layers, `norm_f`, `lm_head`; the same
    state dict) with this project's mixer. mambapy's own module can't be imported without
    mamba_ssm (its lm.py imports mamba2, which needs it). Token ids (B, L) -> logits (B, L, vocab).
    mambapy's muP and custom init are not reproduced: the benchmark times the function."""

    def __init__(self, config: MambaConfig, vocab_size: int, backend: str = DEFAULT_BACKEND,
                 policy: Optional[KernelPolicy] = None):
        super().__init__()
        if config.mup:
            raise ValueError("MambaConfig.mup=True is not supported by MambaLM (accepted: mup=False)")
        self.config = config
        self.embedding = nn.Embedding(vocab_size, config.d_model, padding_idx=0)
        self.mamba = RegularMamba(config, backend, policy)
        self.norm_f = RMSNorm(config.d_model, config.rms_norm_eps, config.mup, rest_backend(backend))
        self.lm_head = nn.Linear(config.d_model, vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        check_tokens(tokens, "MambaLM")
        return self.lm_head(self.norm_f(self.mamba(self.embedding(tokens))))
