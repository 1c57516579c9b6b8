"""The Mamba-1 mixer and "Regular Mamba" (one residual mambapy layer).

`MambaMixer` *is* mambapy's `MambaBlock` (same parameters, same init, same state dict); the
reference backend runs mambapy's own code, the fast backend replaces the scan with
`kernels.selective_scan` on the same parameters.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from mambapy.mamba import MambaBlock, MambaConfig
from mambapy.mamba import RMSNorm as MambaRMSNorm
from torch import nn

from ..config import check_backend


class MambaMixer(MambaBlock):
    """mambapy's MambaBlock with a `backend` switch. Input and output (B, L, D)."""

    def __init__(self, config: MambaConfig, backend: str = "reference"):
        if config.use_cuda:
            raise ValueError("MambaConfig.use_cuda=True asks for the mamba_ssm CUDA kernels; "
                             "use backend='fast' instead (accepted: use_cuda=False)")
        super().__init__(config)
        self.backend = check_backend(backend)

    def ssm(self, x, z):
        # mambapy adds D * x in fp32 and returns fp32, which then meets a bf16 out_proj and fails
        # ("expected m1 and m2 to have the same dtype"). The one change: hand back x's dtype.
        return super().ssm(x, z).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "reference":
            return super().forward(x)
        return self._forward_fast(x)

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        L = x.shape[1]
        return self.conv1d(x.transpose(1, 2))[:, :, :L].transpose(1, 2)  # causal depthwise, (B, L, ED)

    def _ssm_inputs(self, x: torch.Tensor):
        cfg = self.config
        dBC = self.x_proj(x)                                            # (B, L, R + 2N)
        dt, B, C = torch.split(dBC, [cfg.dt_rank, cfg.d_state, cfg.d_state], dim=-1)
        dt, B, C = self._apply_layernorms(dt, B, C)
        dt = F.linear(dt, self.dt_proj.weight)                          # (B, L, ED); bias fused in the scan
        A = -torch.exp(self.A_log.float())                              # (ED, N)
        return dt, A, B, C

    def _forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        from ..kernels.selective_scan import selective_scan

        xz = self.in_proj(x)                                            # (B, L, 2 ED)
        x, z = xz.chunk(2, dim=-1)                                      # (B, L, ED) each
        x = F.silu(self._conv(x))
        dt, A, B, C = self._ssm_inputs(x)
        y = selective_scan(x, dt, A, B, C, self.D.float(), z=z, dt_bias=self.dt_proj.bias.float(),
                           dt_softplus=True)                            # (B, L, ED), gated by silu(z)
        return self.out_proj(y)

    def kernel_choice(self, device: torch.device, dtype: torch.dtype) -> dict[str, str]:
        if self.backend == "reference":
            return {"scan": "mambapy-pscan" if self.config.pscan else "mambapy-seq"}
        from ..kernels.selective_scan import auto_impl

        return {"scan": auto_impl(device)}


class ResidualLayer(nn.Module):
    """mambapy's ResidualBlock, mixer(norm(x)) + x, with the mixer's backend chosen."""

    def __init__(self, config: MambaConfig, backend: str = "reference"):
        super().__init__()
        self.mixer = MambaMixer(config, backend)
        self.norm = MambaRMSNorm(config.d_model, config.rms_norm_eps, config.mup)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mixer(self.norm(x)) + x


class RegularMamba(nn.Module):
    """mambapy's `Mamba` (state dict `layers.{i}.mixer.*`, `layers.{i}.norm.weight`), any backend.

    The suite's baseline is `RegularMamba(MambaConfig(d_model=dim, n_layers=1))`.
    """

    def __init__(self, config: MambaConfig, backend: str = "reference"):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList([ResidualLayer(config, backend) for _ in range(config.n_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x
