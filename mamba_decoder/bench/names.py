"""Plain data the whole suite shares: model names and the record's key fields (no torch, no models).

Plots and reports import these, never the registry, so a saved run can be redrawn (and these
modules imported) without building a model.
"""
from __future__ import annotations

from typing import NamedTuple

# The three blocks (--level block) and the language models (--level model), one name each:
# the same string in the CLI, the records and the plots.
REGULAR_MAMBA = "Regular Mamba"
MAMBA_DECODER_BLOCK = "MambaDecoderBlock"
MLA_BLOCK = "MLABlock"
BLOCK_MODELS = (REGULAR_MAMBA, MAMBA_DECODER_BLOCK, MLA_BLOCK)

MAMBA_LM = "Mamba LM"                      # mambapy's LM layout: embedding, depth residual Mamba layers, head
MAMBA_DECODER = "MambaDecoder"             # depth MambaDecoderBlocks
MAMBA_DECODER_MLA = "MambaDecoder+MLA"     # the same, then one MLABlock
LM_MODELS = (MAMBA_LM, MAMBA_DECODER, MAMBA_DECODER_MLA)

# Okabe-Ito colours: one per model, the same in every plot.
MODEL_COLORS = {REGULAR_MAMBA: "#0072B2", MAMBA_DECODER_BLOCK: "#D55E00", MLA_BLOCK: "#009E73"}


# The parts of each model whose sizes apply to it (config.SIZE_PARTS keys): what its record's
# block_config holds and what a hyperparameter sweep varies for it.
MODEL_PARTS = {REGULAR_MAMBA: ("mamba",), MAMBA_DECODER_BLOCK: ("mamba", "moe"), MLA_BLOCK: ("mla", "moe"),
               MAMBA_LM: ("mamba",), MAMBA_DECODER: ("mamba", "moe"), MAMBA_DECODER_MLA: ("mamba", "moe", "mla")}


def models_for(level: str) -> tuple[str, ...]:
    return BLOCK_MODELS if level == "block" else LM_MODELS


class RecordKey(NamedTuple):
    """What identifies a config: two records with the same key measured the same thing (the
    latest one wins in a run directory; --resume skips keys recorded ok)."""

    model_name: str
    backend: str
    mode: str
    dtype: str
    batch_size: int
    sequence_length: int
    dim: int
    variant: str = ""
    config_hash: str = ""   # results.config_hash of its non-default sizes ("" for the defaults and older records)


# A record's variant: what distinguishes runs of one mode beyond the grid, as tags joined by "+"
# (compile, cuda-graphs, cache=full, adamw, depth=4); "" is the default.
VARIANT_SEP = "+"


def join_variant(tags) -> str:
    return VARIANT_SEP.join(tags)


def variant_tags(variant: str) -> list[str]:
    return variant.split(VARIANT_SEP) if variant else []


# environment.json's and the plots' device_name when records come from more than one device
MIXED_DEVICES = "MIXED DEVICES: "


def mixed_devices(names, sep: str = ", ") -> str:
    return MIXED_DEVICES + sep.join(sorted(names))


def is_mixed(device_name) -> bool:
    return str(device_name).startswith(MIXED_DEVICES)


def sig3(v: float) -> str:
    """A number with three significant digits, trailing zeros kept: 2.00, 0.0213, 10.5, 123."""
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:#.3g}"
