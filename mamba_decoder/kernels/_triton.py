"""Triton, optional: the one place the kernels import it from. Importing this module imports
triton (when installed); the library's top level never does (kernels load lazily).

`launch(kernel, grid, *args, **kw)` is `kernel[grid](*args, **kw)` with Triton's per-call Python
(argument binding, cache key, device and stream queries: ~40 us a launch on the lent H100/H200
hosts, where an aten op costs ~10) cut to a dictionary lookup and the compiled kernel's own
launcher. The cache key holds everything Triton specializes a compiled kernel on: each tensor's
dtype and 16-byte alignment, each int's == 1 / % 16 == 0 / 32-bit range (except arguments the
kernel marks do_not_specialize), the values of everything else (constexprs, launch options).
A new key goes through `kernel[grid]` (compiling if needed) and stores what it returned."""
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


# The compiled kernel's launcher takes (grid x, y, z, stream, function, packed metadata, launch
# metadata, enter hook, exit hook, *every argument in signature order, constexprs included)
# from Triton 3.4 on (read in 3.6 and 3.9); other versions launch the ordinary way.
_LEAN = HAS_TRITON and (3, 4) <= tuple(int(v) for v in triton.__version__.split(".")[:2]) < (4, 0)
_COMPILED: dict = {}


def _spec(a, kind: int):
    """What a compiled kernel depends on of argument `a`: kind 0 specialized, 1 do_not_specialize,
    2 constexpr (its value)."""
    import torch

    if kind == 2:
        return a
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % 16 == 0
    if isinstance(a, bool):
        return bool, a
    if isinstance(a, int):
        return (int,) if kind else (int, a == 1, a % 16 == 0, -2**31 <= a < 2**31)
    if isinstance(a, float):
        return float
    return a


def launch(kernel, grid, *args, **kw):
    """kernel[grid](*args, **kw) (constexprs and launch options by keyword), launched lean
    where it can be: CUDA, a Triton whose launcher is known, no launch hooks set."""
    if not _LEAN or interpreting() or _hooks_set():
        return kernel[grid](*args, **kw)
    import torch

    dev = torch.cuda.current_device()
    kinds = _kinds(kernel)
    key = (kernel, dev, tuple(kw.items()), tuple(_spec(a, k) for a, k in zip(args, kinds)))
    hit = _COMPILED.get(key)
    if hit is None:
        compiled = kernel[grid](*args, **kw)       # binds, compiles if new, launches
        names = kernel.arg_names
        hit = _COMPILED[key] = (compiled, tuple(kw[n] for n in names[len(args):]))
        return compiled
    compiled, tail = hit
    g = tuple(grid) + (1, 1)
    compiled.run(g[0], g[1], g[2], torch._C._cuda_getCurrentRawStream(dev), compiled.function,
                 compiled.packed_metadata, None, None, None, *args, *tail)
    return compiled


def _hooks_set() -> bool:
    """Whether a launch hook is registered (a profiler's): then launches take Triton's own path.
    Triton 3.6 keeps the hooks in (possibly empty) HookChains."""
    rt = triton.knobs.runtime
    return any(h is not None and getattr(h, "calls", True) for h in (rt.launch_enter_hook, rt.launch_exit_hook))


def _kinds(kernel) -> tuple:
    """Per parameter: 2 constexpr, 1 do_not_specialize, 0 specialized (see _spec)."""
    kinds = kernel.__dict__.get("_lean_kinds")
    if kinds is None:
        kinds = kernel._lean_kinds = tuple(2 if p.is_constexpr else int(bool(p.do_not_specialize))
                                           for p in kernel.params)
    return kinds
