"""Model names -> factories. One name per model, used the same way in the CLI, records and plots."""
from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from ..config import DEFAULT_BACKEND, BlockSizes, check_backend
from ..models import MambaDecoder, MambaDecoderBlock, MambaLM, MLABlock, RegularMamba
from ..models.moe import MoE
from .names import (LM_MODELS, MAMBA_DECODER, MAMBA_DECODER_BLOCK, MAMBA_DECODER_MLA, MAMBA_LM,
                    MLA_BLOCK, REGULAR_MAMBA, models_for)

__all__ = ["MODELS", "LM_MODELS", "models_for", "build_model", "build_lm", "parameter_counts"]

# The suite's sizes at width `dim` (config.BlockSizes, whose None fields take the defaults):
# mambapy's Mamba (d_state 16, expand 2, dt_rank dim/16), the same MoE in both blocks (6 experts,
# 2 active, SwiGLU width 2*dim, one shared expert) and DeepSeek-V2-style MLA heads (16 heads,
# latent 512, nope 128, rope 64, v 128, no query LoRA); --d-state, --n-experts, ... or a preset
# change them.
_DEFAULT = BlockSizes()


def _regular_mamba(dim: int, backend: str, max_seq_len: int, sizes: BlockSizes = _DEFAULT) -> nn.Module:
    return RegularMamba(sizes.mamba(dim), backend=backend)


def _mamba_decoder_block(dim: int, backend: str, max_seq_len: int, sizes: BlockSizes = _DEFAULT) -> nn.Module:
    return MambaDecoderBlock(dim, sizes.mamba(dim), sizes.moe(dim), backend=backend)


def _mla_block(dim: int, backend: str, max_seq_len: int, sizes: BlockSizes = _DEFAULT) -> nn.Module:
    return MLABlock.from_configs(sizes.mla(dim, max_seq_len), sizes.moe(dim), backend=backend)


# Models with no Mamba mixer: backend "mamba_ssm" (which swaps the mixer alone) does not apply.
NO_MAMBA_MIXER = frozenset({MLA_BLOCK})

MODELS: dict[str, Callable[..., nn.Module]] = {
    REGULAR_MAMBA: _regular_mamba,
    MAMBA_DECODER_BLOCK: _mamba_decoder_block,
    MLA_BLOCK: _mla_block,
}


# Language models on token ids (--level model), at the same width and depth: names.LM_MODELS.
def build_lm(name: str, dim: int, backend: str = DEFAULT_BACKEND, depth: int = 4,
             vocab_size: int = 32000, max_seq_len: int = 4096, sizes: Optional[BlockSizes] = None) -> nn.Module:
    """A language model (token ids (B, L) -> logits (B, L, vocab)) of the suite at `dim` x `depth`."""
    check_backend(backend)
    sizes = sizes or _DEFAULT
    if name == MAMBA_LM:
        return MambaLM(sizes.mamba(dim, n_layers=depth), vocab_size, backend)
    if name in (MAMBA_DECODER, MAMBA_DECODER_MLA):
        mla = sizes.mla(dim, max_seq_len)
        return MambaDecoder(heads=mla.n_heads, vocab_size=vocab_size, max_seq_len=max_seq_len, depth=depth,
                            dim=dim, mamba_config=sizes.mamba(dim), moe_config=sizes.moe(dim),
                            post_mamba_mla_block=name == MAMBA_DECODER_MLA, backend=backend, mla_config=mla)
    raise ValueError(f"model {name!r} is not one of {', '.join(map(repr, LM_MODELS))}")


def build_model(name: str, dim: int, backend: str = DEFAULT_BACKEND, max_seq_len: int = 4096,
                sizes: Optional[BlockSizes] = None) -> nn.Module:
    """A freshly initialised model of the suite: input and output (batch, seq, dim); `sizes`
    (config.BlockSizes) sets the hyperparameters beyond the width (None: the suite's defaults)."""
    if name not in MODELS:
        raise ValueError(f"model {name!r} is not one of {', '.join(map(repr, MODELS))}")
    return MODELS[name](dim, check_backend(backend), max_seq_len, sizes or _DEFAULT)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(total, active per token) trainable parameters; a MoE activates n_activated of n_experts."""
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    idle = 0
    for m in model.modules():
        if isinstance(m, MoE):
            per_expert = sum(p.numel() for p in m.experts[0].parameters() if p.requires_grad)
            idle += per_expert * (m.n_experts - m.n_activated)
    return total, total - idle

