"""Kernels: one file or folder per op, each with its reference twin. Triton kernels live in
modules imported only when they run; this package itself never imports triton."""
from __future__ import annotations

import functools
import importlib.util


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    """Whether triton can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None
