"""The Mixture-of-Experts feed-forward: open_kimi's `MoE`, with a `backend` switch.

The module *is* open_kimi's MoE (same parameters and buffers: gate.gate_weight,
gate.adaptive_bias, gate.expert_usage, experts.{i}.w1/w2/w3, shared_expert.w1/w2/w3). The
reference backend runs open_kimi's loop (one host sync per expert); the fast backend routes with
the same gate math and applies the experts through `kernels.moe` with no host sync.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from open_kimi.moe import MoE as KimiMoE

from ..config import DEFAULT_BACKEND, MoEConfig, check_backend
from ..kernels import moe as moe_kernels


class MoE(KimiMoE):
    def __init__(self, dim: int, n_experts: int = 6, n_activated: int = 2,
                 expert_inter_dim: Optional[int] = None, shared_expert_inter_dim: Optional[int] = None,
                 use_adaptive_bias: bool = True, bias_update_rate: float = 0.01,
                 backend: str = DEFAULT_BACKEND):
        MoEConfig(dim=dim, n_experts=n_experts, n_activated=n_activated,
                  expert_inter_dim=expert_inter_dim, shared_expert_inter_dim=shared_expert_inter_dim,
                  use_adaptive_bias=use_adaptive_bias, bias_update_rate=bias_update_rate)  # validate
        super().__init__(dim, n_experts, n_activated, expert_inter_dim, shared_expert_inter_dim,
                         use_adaptive_bias, bias_update_rate)
        self.backend = check_backend(backend)
        self._stack_cache: tuple | None = None

    @classmethod
    def from_config(cls, cfg: MoEConfig, backend: str = DEFAULT_BACKEND) -> "MoE":
        return cls(**cfg.model_dump(), backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "reference":
            return super().forward(x)
        return self._forward_fast(x)

    def route(self, x_flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """open_kimi's MoEGate.forward, same ops in the same order, but the training-mode usage
        count is a scatter_add (bincount needs the max on the host: a sync)."""
        g = self.gate
        scores = F.linear(x_flat, g.gate_weight)                          # (T, E)
        if g.use_adaptive_bias and g.adaptive_bias is not None:
            scores = scores + g.adaptive_bias.unsqueeze(0)
        probs = F.softmax(scores, dim=-1)
        w, idx = torch.topk(probs, g.top_k, dim=-1)                       # (T, K)
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-8)
        if g.use_adaptive_bias and g.training:
            with torch.no_grad():
                flat = idx.flatten()
                usage = torch.zeros(g.n_experts, device=x_flat.device).scatter_add_(
                    0, flat, torch.ones_like(flat, dtype=torch.float32))
                usage = usage / flat.numel()
                g.adaptive_bias -= g.bias_update_rate * (usage - 1.0 / g.n_experts)
                g.expert_usage = 0.9 * g.expert_usage + 0.1 * usage
        return w, idx

    def stacked_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w1, w2, w3) of the routed experts stacked to (E, I, D), (E, D, I), (E, I, D).

        With autograd on, stacked every call (gradients reach experts.{i}); in inference,
        cached and rebuilt only when a weight is replaced or modified in place."""
        params = [(e.w1.weight, e.w2.weight, e.w3.weight) for e in self.experts]
        if torch.is_grad_enabled() and any(p.requires_grad for trio in params for p in trio):
            return tuple(torch.stack(ws) for ws in zip(*params))
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for trio in params for p in trio)
        if self._stack_cache is None or self._stack_cache[0] != key:
            with torch.no_grad():
                self._stack_cache = (key, tuple(torch.stack(ws) for ws in zip(*params)))
        return self._stack_cache[1]

    def _forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_flat = x.reshape(-1, shape[-1])                                 # (T, D)
        w, idx = self.route(x_flat)
        w1, w2, w3 = self.stacked_weights()
        out = moe_kernels.routed_experts(x_flat, w, idx, w1, w2, w3)
        return (out + self.shared_expert(x_flat)).view(shape)

    def kernel_choice(self, device: torch.device, dtype: torch.dtype) -> dict[str, str]:
        if self.backend == "reference":
            return {"moe": "open_kimi-loop"}
        return {"moe": moe_kernels.auto_impl(device, dtype)}
