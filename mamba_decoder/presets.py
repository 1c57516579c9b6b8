"""Presets: the block shapes of published architectures (`--preset NAME`, `mamba-bench presets`).

A preset sets the width, the block hyperparameters (config.BlockSizes) and, for `--level model`,
the depth and vocabulary. Every number is taken from the published model config named in the
preset's docstring; where a published model has no part that a block of this suite has (a
Mamba-1 model has no MoE and no MLA), the preset leaves that part at the suite's default and says
so. Both blocks of a sweep get the same width and the same MoE, so an MLA+MoE preset also gives
the MambaDecoderBlock (Mamba+MoE) of that width and MoE: the comparison is like for like.

open_kimi's MoE (this suite's) has one shared expert: a model with s shared experts of width w
becomes one shared expert of width s * w (the same parameters and FLOPs: the s SwiGLUs side by
side are one SwiGLU of the summed width, their outputs added).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

__all__ = ["Preset", "PRESETS", "get_preset"]


@dataclass(frozen=True)
class Preset:
    name: str
    dim: int
    sizes: dict = field(default_factory=dict)   # config.BlockSizes fields
    depth: int = 4                              # --level model: blocks
    vocab_size: int = 32000                     # --level model
    doc: str = ""                               # where the numbers come from (the factory's docstring)

    @property
    def source(self) -> str:
        return " ".join(self.doc.split())


PRESETS: dict[str, Preset] = {}


def _preset(fn: Callable[[], Preset]) -> Callable[[], Preset]:
    p = fn()
    PRESETS[p.name] = Preset(p.name, p.dim, p.sizes, p.depth, p.vocab_size, fn.__doc__ or "")
    return fn


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"preset {name!r} is not one of: {', '.join(PRESETS)}")
    return PRESETS[name]


# ---------------------------------------------------------------- Mamba-1 (state-spaces/mamba)
_MAMBA_SOURCE = ("huggingface.co/state-spaces/mamba-{size}/blob/main/config.json (d_model {dim}, n_layer "
                 "{depth}, vocab_size 50277 padded to a multiple of 8 (pad_vocab_size_multiple 8): 50280); "
                 "d_state 16, expand 2, d_conv 4 and dt_rank ceil(d_model / 16) are mamba_ssm's Mamba "
                 "defaults (state-spaces/mamba, mamba_ssm/modules/mamba_simple.py), which these configs "
                 "keep (ssm_cfg {{}}); dt_rank is left to the suite's default, ceil(dim / 16), so it follows "
                 "a --dim given with the preset. A Mamba-1 model has no MoE and no MLA: those parts keep "
                 "the suite's defaults.")


for _size, _dim, _depth in (("130m", 768, 24), ("370m", 1024, 48), ("790m", 1536, 48), ("1.4b", 2048, 48),
                            ("2.8b", 2560, 64)):
    PRESETS[f"mamba-{_size}"] = Preset(
        f"mamba-{_size}", _dim, dict(d_state=16, expand=2, d_conv=4), depth=_depth,
        vocab_size=50280, doc=_MAMBA_SOURCE.format(size=_size, dim=_dim, depth=_depth))


# ---------------------------------------------------------------- MLA + MoE
@_preset
def _deepseek_v2_lite():
    """DeepSeek-V2-Lite: huggingface.co/deepseek-ai/DeepSeek-V2-Lite/blob/main/config.json
    (hidden_size 2048, num_attention_heads 16, q_lora_rank null (no query LoRA: 0 here),
    kv_lora_rank 512, qk_nope_head_dim 128, qk_rope_head_dim 64, v_head_dim 128, n_routed_experts
    64, num_experts_per_tok 6, n_shared_experts 2, moe_intermediate_size 1408, num_hidden_layers
    27, vocab_size 102400). The 2 shared experts of width 1408 are one shared expert of width 2816
    here (open_kimi's MoE has one). The Mamba sizes are the suite's defaults (V2-Lite has no
    Mamba). Not modelled: the first layer's dense FFN (first_k_dense_replace 1), grouped routing,
    YaRN RoPE scaling."""
    return Preset("deepseek-v2-lite", 2048, dict(
        heads=16, q_lora_rank=0, kv_lora_rank=512, qk_nope_dim=128, qk_rope_dim=64, v_head_dim=128,
        n_experts=64, n_activated=6, expert_dim=1408, shared_expert_dim=2 * 1408), depth=27, vocab_size=102400)


@_preset
def _deepseek_v3():
    """DeepSeek-V3 (671B): deepseek-ai/DeepSeek-V3, inference/configs/config_671B.json and
    huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/config.json (dim / hidden_size 7168, n_heads
    128, q_lora_rank 1536, kv_lora_rank 512, qk_nope_head_dim 128, qk_rope_head_dim 64, v_head_dim
    128, n_routed_experts 256, n_activated_experts / num_experts_per_tok 8, n_shared_experts 1,
    moe_inter_dim / moe_intermediate_size 2048, n_layers 61, vocab_size 129280). The Mamba sizes are
    the suite's defaults. Not modelled: the first 3 layers' dense FFN (n_dense_layers 3), sigmoid
    scores with grouped routing (8 groups, 4 taken), route_scale 2.5, YaRN, multi-token prediction."""
    return Preset("deepseek-v3", 7168, dict(
        heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_dim=128, qk_rope_dim=64, v_head_dim=128,
        n_experts=256, n_activated=8, expert_dim=2048, shared_expert_dim=2048), depth=61, vocab_size=129280)


@_preset
def _kimi_k2():
    """Kimi K2: huggingface.co/moonshotai/Kimi-K2-Instruct/blob/main/config.json (hidden_size
    7168, num_attention_heads 64, q_lora_rank 1536, kv_lora_rank 512, qk_nope_head_dim 128,
    qk_rope_head_dim 64, v_head_dim 128, n_routed_experts 384, num_experts_per_tok 8,
    n_shared_experts 1, moe_intermediate_size 2048, num_hidden_layers 61, vocab_size 163840). The
    Mamba sizes are the suite's defaults. Not modelled: the first layer's dense FFN
    (first_k_dense_replace 1), sigmoid scores, routed_scaling_factor, YaRN."""
    return Preset("kimi-k2", 7168, dict(
        heads=64, q_lora_rank=1536, kv_lora_rank=512, qk_nope_dim=128, qk_rope_dim=64, v_head_dim=128,
        n_experts=384, n_activated=8, expert_dim=2048, shared_expert_dim=2048), depth=61, vocab_size=163840)
