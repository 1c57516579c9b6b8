"""Mamba+MoE and MLA+MoE decoder blocks, and a benchmark suite that measures them."""
from .config import BACKENDS, MambaConfig, MLAConfig, MoEConfig
from .models import MLA, MambaDecoder, MambaDecoderBlock, MLABlock, MoE, RegularMamba
from .policy import KernelPolicy

__all__ = ["MambaDecoderBlock", "MLABlock", "MambaDecoder", "RegularMamba", "MLA", "MoE",
           "MambaConfig", "MoEConfig", "MLAConfig", "BACKENDS", "KernelPolicy"]
__version__ = "0.1.0"
