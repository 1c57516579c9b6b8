"""Build and load `cpu_kernels.c`, the fast backend's compiled CPU kernels, at first use.

Why a plain C file, built here and loaded with ctypes, rather than torch.utils.cpp_extension or
numba: the kernels need nothing from torch but pointers and strides, so without torch's headers
the build takes about a second (a torch extension takes a minute on a laptop core and needs
ninja); numba's exp does not vectorize without Intel's SVML, and it adds a compiler of its own as
a dependency. Here the only requirement is a C compiler (`cc`, or `$CC`), which Linux and macOS
machines that build Python packages have.

The library is cached under `$MAMBA_DECODER_CACHE` (default `~/.cache/mamba_decoder`), keyed by
a hash of the source, the compiler command and this CPU's model and flags (it is built with
-march=native), and written by rename, so concurrent first uses in several processes are safe.
Nothing is built at import: `load()` builds on its first call. A failed build raises
`CPUKernelsUnavailable` with the compiler's message.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("cpu_kernels.c")
# -fopenmp-simd: the `omp simd` loops vectorize with masks (no OpenMP runtime is linked);
# -ffp-contract=fast: FMAs in the polynomials (off by default under -std=c99).
FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-fno-strict-aliasing", "-ffp-contract=fast",
         "-fopenmp-simd", "-std=c99"]


_P, _I = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {   # the C functions' parameters, in order
    "scan_fwd": [_P, _I, _I, _I],
    "scan_bwd": [_P, _I, _I, _I, _I],
    "causal_conv_silu": [_P, _I, _I, _P, _P, _P, _I, _I, _I, _I, _I, _I],
    "swiglu_rows": [_P, _P, _P, _I, _I, _I],
    "rms_norm_rows": [_P, _I, _P, ctypes.c_float, _P, _I, _I, _I],
    "attn_softmax_rows": [_P, _I, _I, _I, ctypes.c_float, _P, _I, _I],
    "attn_store_rows": [_P, _I, _I, _P, _P, _I, _I, _I],
}


class CPUKernelsUnavailable(RuntimeError):
    """The compiled CPU kernels could not be built or loaded on this machine."""


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(sorted(set(keep)))
    except OSError:
        return platform.processor() + platform.machine()


def cache_dir() -> Path:
    return Path(os.environ.get("MAMBA_DECODER_CACHE", Path.home() / ".cache" / "mamba_decoder"))


def _compiler() -> list[str]:
    cc = shlex.split(os.environ.get("CC", "cc"))
    if not cc or shutil.which(cc[0]) is None:
        raise CPUKernelsUnavailable(f"no C compiler found (tried {cc[0] if cc else '$CC'!r}; set CC)")
    return cc


def library_path() -> Path:
    cc = _compiler()
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(cc + FLAGS), _cpu_signature(),
                                    platform.machine()]).encode()).hexdigest()[:16]
    return cache_dir() / f"cpu_kernels-{key}.so"


def _build(target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = _compiler() + FLAGS + ["-o", tmp, str(SOURCE), "-lm"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CPUKernelsUnavailable(f"building {SOURCE.name} failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
        os.replace(tmp, target)   # atomic: a concurrent build writes the same bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.lru_cache(maxsize=None)
def load() -> ctypes.CDLL:
    """The compiled library (built on the first call on this machine, then cached)."""
    target = library_path()
    if not target.exists():
        _build(target)
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as e:
        raise CPUKernelsUnavailable(f"loading {target} failed: {e}") from e
    for name, args in _SIGNATURES.items():   # without argtypes ctypes would pass 32-bit ints
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, None
    return lib


@functools.lru_cache(maxsize=None)
def available() -> tuple[bool, str]:
    """(whether the compiled kernels load here, why not)."""
    try:
        load()
        return True, ""
    except CPUKernelsUnavailable as e:
        return False, str(e).splitlines()[0]


_POOL: dict[int, "concurrent.futures.ThreadPoolExecutor"] = {}


def run_tasks(fn, tasks) -> None:
    """Call fn(*task) for every task on torch.get_num_threads() threads (ctypes releases the GIL,
    so the C calls run in parallel), dynamically scheduled: a thread that falls behind, e.g. on a
    core another process holds, takes fewer tasks instead of stalling the others at a barrier."""
    import concurrent.futures

    import torch

    n = torch.get_num_threads()
    if n <= 1 or len(tasks) <= 1:
        for t in tasks:
            fn(*t)
        return
    pool = _POOL.get(n)
    if pool is None:
        pool = _POOL[n] = concurrent.futures.ThreadPoolExecutor(n, thread_name_prefix="mamba-cpu")
    for f in [pool.submit(fn, *t) for t in tasks]:
        f.result()
