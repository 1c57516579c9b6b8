from .blocks import MambaDecoderBlock, MLABlock, kernel_choices, set_kernel_policy
from .decoder import MambaDecoder
from .mamba import MambaLM, MambaMixer, RegularMamba
from .mla import MLA, FullCache, LatentCache, MLACache
from .moe import MoE

__all__ = ["MambaDecoderBlock", "MLABlock", "MambaDecoder", "MambaMixer", "MambaLM", "RegularMamba", "MLA",
           "MLACache", "LatentCache", "FullCache", "MoE", "kernel_choices", "set_kernel_policy"]
