"""Import path of the code the specification came from: `from mamba_decoder.mamba_block import ...`."""
from .config import MambaConfig, MoEConfig
from .models import MambaDecoder, MambaDecoderBlock, MLABlock

__all__ = ["MambaDecoder", "MambaDecoderBlock", "MLABlock", "MambaConfig", "MoEConfig"]
