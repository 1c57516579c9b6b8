"""Configuration shared by the blocks: the MoE and MLA configs (validated) and the backend names."""
from __future__ import annotations

from typing import Literal, Optional

from mambapy.mamba import MambaConfig  # the field's own config, re-exported unchanged
from pydantic import (BaseModel, ConfigDict, NonNegativeInt, PositiveFloat, PositiveInt, ValidationError,
                      model_validator)

__all__ = ["MambaConfig", "MoEConfig", "MLAConfig", "Backend", "BACKENDS", "DEFAULT_BACKEND", "check_backend",
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


def one_line_errors(message):
    """A pydantic wrap validator turning a field's ValidationError into one ValueError line,
    `message(cls, err)` (err: pydantic's first error dict); value errors of the model's own
    validators pass through as they are."""
    @model_validator(mode="wrap")
    @classmethod
    def _validator(cls, data, handler):
        try:
            return handler(data)
        except ValidationError as e:
            err = e.errors()[0]
            if err["type"] == "value_error" or not err["loc"]:
                raise
            raise ValueError(message(cls, err)) from None
    return _validator


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


class MLAConfig(BaseModel):
    """Multi-head Latent Attention settings, as open_kimi's MLA takes them (DeepSeek-V2's names)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dim: PositiveInt = 2048                 # model width
    n_heads: PositiveInt = 16
    q_lora_rank: NonNegativeInt = 0         # 0: no query LoRA (wq), else wq_a -> q_norm -> wq_b
    kv_lora_rank: PositiveInt = 512         # the latent the decoding cache holds
    qk_nope_head_dim: PositiveInt = 128     # per-head query/key width without RoPE
    qk_rope_head_dim: PositiveInt = 64      # per-head RoPE width (shared key), even
    v_head_dim: PositiveInt = 128
    max_seq_len: PositiveInt = 4096         # RoPE table length built up front (grown on demand)
    max_batch_size: PositiveInt = 8         # open_kimi's; a plain forward takes any batch size
    attn_impl: Literal["naive", "absorb"] = "absorb"   # absorb: latent decoding cache; naive: per-head K/V
    rope_theta: float = 10000.0
    mscale: float = 1.0                     # open_kimi's YaRN scale (unused without YaRN, as there)

    # errors as "<field>=<value>: <what is wrong>", one line
    _name_the_value = one_line_errors(lambda cls, err: f"{err['loc'][0]}={err['input']!r}: {err['msg'].lower()}")

    @model_validator(mode="after")
    def _rope_pairs(self) -> "MLAConfig":
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even (RoPE rotates pairs)")
        return self
