"""Configuration shared by the blocks: the MoE and MLA configs (validated) and the backend names."""
from __future__ import annotations

from typing import Annotated, Literal, Optional

from mambapy.mamba import MambaConfig  # the field's own config, re-exported unchanged
from pydantic import (BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt, ValidationError,
                      model_validator)

__all__ = ["MambaConfig", "MoEConfig", "MLAConfig", "BlockSizes", "SIZE_PARTS", "Backend", "BACKENDS", "DEFAULT_BACKEND", "check_backend",
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


# ---------------------------------------------------------------- the suite's block sizes
# Which hyperparameters each part of a block takes (BlockSizes' field names, the CLI's flags
# with "_" -> "-", the keys of a --model-config file).
MAMBA_SIZES = ("d_state", "expand", "d_conv", "dt_rank")
MOE_SIZES = ("n_experts", "n_activated", "expert_dim", "shared_expert_dim")
MLA_SIZES = ("heads", "q_lora_rank", "kv_lora_rank", "qk_nope_dim", "qk_rope_dim", "v_head_dim")
SIZE_PARTS = {"mamba": MAMBA_SIZES, "moe": MOE_SIZES, "mla": MLA_SIZES}
_Size = Optional[Annotated[int, Field(strict=True, ge=1)]]      # strict: true/1.5/"8" are refused
_Size0 = Optional[Annotated[int, Field(strict=True, ge=0)]]


class BlockSizes(BaseModel):
    """The blocks' hyperparameters beyond the width; None takes the suite's default (`resolved`):
    mambapy's Mamba (d_state 16, expand 2, d_conv 4, dt_rank ceil(dim / 16)), a MoE of 6 experts
    with 2 active, SwiGLU width 2 * dim and one shared expert of the routed width, and MLA with
    16 heads, no query LoRA, latent 512, nope 128, rope 64, v 128 (DeepSeek-V2's head shape).
    Validated once, here: a bad value is one ValueError line naming it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    d_state: _Size = None
    expand: _Size = None
    d_conv: _Size = None
    dt_rank: _Size = None
    n_experts: _Size = None
    n_activated: _Size = None
    expert_dim: _Size = None          # routed expert's SwiGLU width
    shared_expert_dim: _Size = None   # the one shared expert's width
    heads: _Size = None
    q_lora_rank: _Size0 = None      # 0: no query LoRA
    kv_lora_rank: _Size = None
    qk_nope_dim: _Size = None
    qk_rope_dim: _Size = None
    v_head_dim: _Size = None

    _name_the_value = one_line_errors(lambda cls, err: f"{err['loc'][0]}={err['input']!r}: {err['msg'].lower()}")

    @model_validator(mode="after")
    def _consistent(self) -> "BlockSizes":
        r = self.resolved(1)
        if r["n_activated"] > r["n_experts"]:
            raise ValueError(f"n_activated={r['n_activated']} must be <= n_experts={r['n_experts']}")
        if r["qk_rope_dim"] % 2:
            raise ValueError(f"qk_rope_dim={r['qk_rope_dim']} must be even (RoPE rotates pairs)")
        return self

    def resolved(self, dim: int) -> dict[str, int]:
        """Every size at width `dim`, the suite's default where this one says None."""
        defaults = dict(d_state=16, expand=2, d_conv=4, dt_rank=-(-dim // 16), n_experts=6, n_activated=2,
                        expert_dim=2 * dim, shared_expert_dim=None, heads=16, q_lora_rank=0,
                        kv_lora_rank=512, qk_nope_dim=128, qk_rope_dim=64, v_head_dim=128)
        out = {k: (getattr(self, k) if getattr(self, k) is not None else v) for k, v in defaults.items()}
        if out["shared_expert_dim"] is None:
            out["shared_expert_dim"] = out["expert_dim"]
        return out

    def applied(self, dim: int, parts) -> dict[str, int]:
        """The resolved sizes of the parts (`SIZE_PARTS` keys) a model has, with its width."""
        r = self.resolved(dim)
        return {"dim": dim, **{k: r[k] for p in parts for k in SIZE_PARTS[p]}}

    def mamba(self, dim: int, n_layers: int = 1) -> MambaConfig:
        r = self.resolved(dim)
        return MambaConfig(d_model=dim, n_layers=n_layers, d_state=r["d_state"], expand_factor=r["expand"],
                           d_conv=r["d_conv"], dt_rank=r["dt_rank"])

    def moe(self, dim: int) -> MoEConfig:
        r = self.resolved(dim)
        return MoEConfig(dim=dim, n_experts=r["n_experts"], n_activated=r["n_activated"],
                         expert_inter_dim=r["expert_dim"], shared_expert_inter_dim=r["shared_expert_dim"])

    def mla(self, dim: int, max_seq_len: int = 4096) -> MLAConfig:
        r = self.resolved(dim)
        return MLAConfig(dim=dim, n_heads=r["heads"], q_lora_rank=r["q_lora_rank"], kv_lora_rank=r["kv_lora_rank"],
                         qk_nope_head_dim=r["qk_nope_dim"], qk_rope_head_dim=r["qk_rope_dim"],
                         v_head_dim=r["v_head_dim"], max_seq_len=max_seq_len)
