"""Configuration shared by the blocks: the MoE config (validated) and the backend names."""
from __future__ import annotations

from typing import Literal, Optional

from mambapy.mamba import MambaConfig  # the field's own config, re-exported unchanged
from pydantic import BaseModel, ConfigDict, PositiveFloat, PositiveInt, model_validator

__all__ = ["MambaConfig", "MoEConfig", "Backend", "BACKENDS", "DEFAULT_BACKEND", "check_backend",
           "rest_backend"]

# reference: the field's own code paths; fast: this project's kernels; mamba_ssm: the Mamba mixer
# through state-spaces/mamba's CUDA kernels (optional), the rest of each block as fast.
Backend = Literal["reference", "fast", "mamba_ssm"]
BACKENDS: tuple[str, ...] = ("reference", "fast", "mamba_ssm")
DEFAULT_BACKEND = "fast"  # every block, the CLI and the API default to it


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
    return backend


def rest_backend(backend: str) -> str:
    """The backend of a block's parts other than its Mamba mixer (norms, MoE, MLA): mamba_ssm
    replaces the mixer alone."""
    return "fast" if check_backend(backend) == "mamba_ssm" else backend


class MoEConfig(BaseModel):
    """Mixture-of-Experts settings, as open_kimi's MoE takes them (validated once, here)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dim: PositiveInt = 512                            # model width the MoE reads and writes
    n_experts: PositiveInt = 6                        # routed experts
    n_activated: PositiveInt = 2                      # experts per token (top-k)
    expert_inter_dim: Optional[PositiveInt] = None    # routed expert hidden size; None -> 2 * dim
    shared_expert_inter_dim: Optional[PositiveInt] = None  # shared expert hidden; None -> expert's
    use_adaptive_bias: bool = True                    # aux-loss-free balancing bias (updated in train mode)
    bias_update_rate: PositiveFloat = 0.01            # step of that bias per training forward

    @model_validator(mode="after")
    def _k_le_e(self) -> "MoEConfig":
        if self.n_activated > self.n_experts:
            raise ValueError(
                f"n_activated={self.n_activated} must be <= n_experts={self.n_experts}")
        return self
