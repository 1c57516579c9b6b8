"""torch's RMSNorm (the blocks' norm1 / norm2, MLA's q_norm / kv_norm: same parameter, same state
dict) with a backend and a kernel policy: the fast backend runs fp32 CPU inference as one C pass
(`kernels.cpu_fused.rms_norm_cpu`, the policy's cpu_fused) instead of torch's composite (four
passes over x); everything else is torch's own forward."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..config import DEFAULT_BACKEND, check_backend
from ..kernels import cpu_fused
from ..policy import DEFAULT_POLICY, KernelPolicy


class RMSNorm(nn.RMSNorm):
    def __init__(self, dim: int, backend: str = DEFAULT_BACKEND, policy: Optional[KernelPolicy] = None):
        super().__init__(dim)
        self.backend = check_backend(backend)
        self.policy = policy or DEFAULT_POLICY

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (self.backend != "reference" and x.device.type == "cpu" and len(self.normalized_shape) == 1
                and self.policy.decide(x.device, x.dtype).cpu_fused
                and cpu_fused.runs(x, *([] if w is None else [w]))):
            eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
            return cpu_fused.rms_norm_cpu(x, w, eps)
        return super().forward(x)
