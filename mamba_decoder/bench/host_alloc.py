"""How the host allocator treats the large, short-lived buffers of a CPU forward.

torch allocates CPU tensors with the C library's malloc. glibc serves a request above its mmap
threshold (128 KiB, adapting up to 32 MiB) with a fresh mmap and returns it to the system on free,
so every activation of a CPU forward at the benchmark's sizes (8 x 2048 x 1024 fp32 = 64 MiB) is
new memory whose pages fault in on first touch, once per call: 120 000 minor faults and ~100 ms of
a 390 ms Regular Mamba forward (B8 L2048, dim 512, fp32, this project's 2-core VM, measured with
getrusage). The page faults, not the arithmetic, then set the pace, and they make the CPU's
figures depend on the kernel's memory management (a VM's nested paging, memory reclaim daemons)
more than on the model.

`retain()` (the suite's default on CPU runs, `--host-allocator retain`) raises glibc's mmap and
trim thresholds with mallopt, so freed buffers stay in the heap and the next call reuses them:
0 faults per steady-state forward and 255-270 ms for the same forward. This is what the caching
allocators of the field do (PyTorch's CPU tuning guide recommends jemalloc or tcmalloc for the
same reason; torch's CUDA allocator caches by design). It is a process setting: every backend and
model the process times gets it alike. `release()` hands the retained memory back (malloc_trim)
between shapes, so a config's host peak is its own. Elsewhere than glibc (macOS, musl, Windows)
`retain()` changes nothing and says so; `--host-allocator system` keeps glibc's defaults.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform
from typing import Optional

CHOICES = ("retain", "system")
DEFAULT = "retain"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3       # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 1 << 30                          # below 1 GiB from the heap (reused after free)
TRIM_THRESHOLD = (1 << 31) - 1                    # mallopt takes an int: the largest


@functools.lru_cache(maxsize=None)
def _glibc() -> Optional[ctypes.CDLL]:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


_STATE = {"mode": None}


def retain() -> str:
    """Keep freed host memory for reuse (glibc); returns what is in effect, for the environment."""
    libc = _glibc()
    if libc is None:
        return describe()
    if _STATE["mode"] != "retain":
        ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        _STATE["mode"] = "retain" if ok else "retain-refused"
    return describe()


def apply(choice: str) -> str:
    """Put `choice` ("retain" or "system") in effect for this process; returns `describe()`.
    "system" after "retain" puts glibc's default thresholds back (128 KiB) and releases what the
    heap holds; only the thresholds' adaptation (up to 32 MiB) does not come back."""
    if choice not in CHOICES:
        raise ValueError(f"host allocator {choice!r} is not one of: {', '.join(map(repr, CHOICES))}")
    if choice == "retain":
        return retain()
    libc = _glibc()
    if libc is not None and _STATE["mode"] == "retain":
        libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
        libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024)
        libc.malloc_trim(0)
    _STATE["mode"] = "system"
    return describe()


def release() -> None:
    """Return the free memory the heap holds to the system (between shapes: each config's host
    peak, which the record keeps, is then its own, not an earlier config's)."""
    libc = _glibc()
    if libc is not None and _STATE["mode"] == "retain":
        libc.malloc_trim(0)


def retaining() -> bool:
    """Whether freed host memory is being kept for reuse (retain in effect)."""
    return _STATE["mode"] == "retain"


def describe() -> str:
    """What the host allocator does in this process, in words (environment.json, the banner)."""
    if _glibc() is None:
        return f"system ({platform.system()} {platform.libc_ver()[0] or 'libc'}: retain applies to glibc only)"
    mode = _STATE["mode"]
    if mode == "retain":
        return "retain (glibc malloc; freed memory reused: mmap threshold 1 GiB, trim threshold 2 GiB)"
    if mode == "retain-refused":
        return "system (glibc refused mallopt)"
    return "system (glibc malloc defaults: large buffers mapped fresh per allocation)"
