"""Import path of the code the specification came from: `from mamba_decoder.simple_mla import SimpleMLA`."""
from .models.mla import MLA as SimpleMLA

__all__ = ["SimpleMLA"]
