"""Triton, optional: the one place the kernels import it from. Importing this module imports
triton (when installed); the library's top level never does (kernels load lazily)."""
from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # triton is optional: the PyTorch twins still import and run
    triton = tl = None
    HAS_TRITON = False


def jit(fn):
    """triton.jit where triton is installed; the plain function otherwise (never launched)."""
    return triton.jit(fn) if HAS_TRITON else fn


def interpreting() -> bool:
    """TRITON_INTERPRET=1: the kernels run on CPU tensors through Triton's interpreter (tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"
