"""The two decoder blocks of the benchmark (DESIGN.md, "Architecture of the blocks"):

    MambaDecoderBlock:  h = x + mixer(norm1(x));   out = h + moe(norm2(h))
    MLABlock:           h = x + attn(norm1(x));    out = h + moe(norm2(h))     (causal)
"""
from __future__ import annotations

from typing import Literal, Optional, Union

import torch
from torch import nn

from ..config import DEFAULT_BACKEND, MambaConfig, MLAConfig, MoEConfig, check_backend, rest_backend
from ..policy import KernelPolicy
from .inputs import check_hidden
from .mamba import MambaCache, MambaMixer
from .mla import MLA, MLACache
from .moe import MoE
from .norms import RMSNorm


def kernel_choices(module: nn.Module, device, dtype) -> dict[str, str]:
    """Which implementation each op of `module` runs on this device and dtype (for records)."""
    out: dict[str, str] = {}
    for m in module.modules():
        if hasattr(m, "kernel_choice"):
            out.update(m.kernel_choice(torch.device(device), dtype))
    return out


def set_kernel_policy(module: nn.Module, policy: KernelPolicy) -> nn.Module:
    """Give every part of `module` that takes a kernel policy this one (returns `module`)."""
    for m in module.modules():
        if hasattr(m, "policy"):
            m.policy = policy
    return module


class MambaDecoderBlock(nn.Module):
    def __init__(self, dim: int = 512, mamba_config: Optional[MambaConfig] = None,
                 moe_config: Optional[MoEConfig] = None, backend: str = DEFAULT_BACKEND,
                 policy: Optional[KernelPolicy] = None):
        super().__init__()
        mamba_config = mamba_config or MambaConfig(d_model=dim, n_layers=1)
        moe_config = moe_config or MoEConfig(dim=dim)
        if mamba_config.d_model != dim:
            raise ValueError(f"mamba_config.d_model={mamba_config.d_model} must equal dim={dim}")
        if moe_config.dim != dim:
            raise ValueError(f"moe_config.dim={moe_config.dim} must equal dim={dim}")
        self.dim, self.backend = dim, check_backend(backend)
        self.norm1 = RMSNorm(dim, rest_backend(backend), policy)
        self.mixer = MambaMixer(mamba_config, backend, policy)
        self.norm2 = RMSNorm(dim, rest_backend(backend), policy)
        self.moe = MoE.from_config(moe_config, rest_backend(backend), policy)

    def init_cache(self, batch_size: int, device=None, dtype=None, *, max_len: Optional[int] = None,
                   kind: Optional[str] = None) -> MambaCache:
        """Decoding state: the mixer's conv window and SSM state, constant in the context length
        (`max_len` and MLA's cache `kind` take nothing here: one interface for every block)."""
        return self.mixer.init_cache(batch_size, device, dtype)

    def forward(self, x: torch.Tensor, cache: Optional[MambaCache] = None, *,
                start_pos: Union[int, torch.Tensor, None] = None) -> torch.Tensor:
        """x (B, L, D) -> (B, L, D); with `cache`, x continues the cached sequence (updated in place).
        `start_pos` takes nothing (the state holds the position): the blocks' one interface."""
        check_hidden(x, self.dim, "MambaDecoderBlock", self.norm1.weight)
        h = self.mixer(self.norm1(x), cache, residual=x)
        return h + self.moe(self.norm2(h))


class MLABlock(nn.Module):
    """The spec's keyword constructor, `MLABlock(dim=..., n_heads=..., n_experts=..., n_activated=...)`,
    validated as an MLAConfig and a MoEConfig; `from_configs` takes those directly."""

    def __init__(self, dim: int = 2048, n_heads: int = 16, q_lora_rank: int = 0,
                 kv_lora_rank: int = 512, qk_nope_head_dim: int = 128, qk_rope_head_dim: int = 64,
                 v_head_dim: int = 128, max_batch_size: int = 8, max_seq_len: int = 4096,
                 attn_impl: Literal["naive", "absorb"] = "absorb", rope_theta: float = 10000.0,
                 mscale: float = 1.0, n_experts: int = 12, n_activated: int = 4,
                 expert_inter_dim: Optional[int] = None, shared_expert_inter_dim: Optional[int] = None,
                 use_adaptive_bias: bool = True, bias_update_rate: float = 0.01,
                 backend: str = DEFAULT_BACKEND, policy: Optional[KernelPolicy] = None):
        super().__init__()
        if check_backend(backend) == "mamba_ssm":
            raise ValueError("MLABlock has no Mamba mixer, so backend 'mamba_ssm' does not apply "
                             "(accepted: reference, fast)")
        self.mla_config = MLAConfig(
            dim=dim, n_heads=n_heads, q_lora_rank=q_lora_rank, kv_lora_rank=kv_lora_rank,
            qk_nope_head_dim=qk_nope_head_dim, qk_rope_head_dim=qk_rope_head_dim, v_head_dim=v_head_dim,
            max_seq_len=max_seq_len, max_batch_size=max_batch_size, attn_impl=attn_impl,
            rope_theta=rope_theta, mscale=mscale)
        self.moe_config = MoEConfig(
            dim=dim, n_experts=n_experts, n_activated=n_activated, expert_inter_dim=expert_inter_dim,
            shared_expert_inter_dim=shared_expert_inter_dim, use_adaptive_bias=use_adaptive_bias,
            bias_update_rate=bias_update_rate)
        self.dim, self.backend = dim, check_backend(backend)
        self.norm1 = RMSNorm(dim, rest_backend(backend), policy)
        self.attn = MLA.from_config(self.mla_config, backend, policy)
        self.norm2 = RMSNorm(dim, rest_backend(backend), policy)
        self.moe = MoE.from_config(self.moe_config, backend, policy)

    @classmethod
    def from_configs(cls, mla_config: MLAConfig, moe_config: MoEConfig, backend: str = DEFAULT_BACKEND,
                     policy: Optional[KernelPolicy] = None) -> "MLABlock":
        if moe_config.dim != mla_config.dim:
            raise ValueError(f"moe_config.dim={moe_config.dim} must equal mla_config.dim={mla_config.dim}")
        return cls(**mla_config.model_dump(), **moe_config.model_dump(exclude={"dim"}), backend=backend,
                   policy=policy)

    def init_cache(self, batch_size: int, max_len: int, kind: Optional[str] = None,
                   device=None, dtype=None) -> MLACache:
        """Decoding state for up to `max_len` positions: the latent cache ("latent", absorb's) or
        full per-head K/V ("full", naive's); it grows with the context, unlike Mamba's."""
        return self.attn.init_cache(batch_size, max_len, kind, device, dtype)

    def forward(self, x: torch.Tensor, start_pos: Union[int, torch.Tensor] = 0,
                mask: Optional[torch.Tensor] = None, cache: Optional[MLACache] = None) -> torch.Tensor:
        """x (B, S, D) at positions start_pos.. -> (B, S, D). See `MLA.forward` for cache and mask
        (a device-tensor start_pos: one CUDA-graph-safe decoding step)."""
        check_hidden(x, self.dim, "MLABlock", self.norm1.weight)
        h = x + self.attn(self.norm1(x), start_pos, mask, cache)
        return h + self.moe(self.norm2(h))

    def decode_step(self, x: torch.Tensor, pos: torch.Tensor, cache: MLACache) -> torch.Tensor:
        """One token (B, 1, D) at device-tensor position `pos`: CUDA-graph friendly (MLA.decode_step)."""
        h = x + self.attn.decode_step(self.norm1(x), pos, cache)
        return h + self.moe(self.norm2(h))
