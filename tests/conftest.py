import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py

# Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter, which
# triton.jit picks when a kernel module is first imported: set it before any test imports one
# (`make test` sets it too), so no test depends on the order the others ran in.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _patch_triton_lang_once_per_launch() -> None:
    """Triton's interpreter re-patches triton.language (an inspect.getmembers walk of its
    modules, ~1.5 ms) at every call of a jit helper inside a kernel, tl.sum's combine included:
    for the scan kernels that was half their interpreted time. Inside one launch a helper whose
    language modules the launch already patched gets nothing new from it, so it is skipped; the
    launch's own patch, and a helper bringing a module not yet patched (tl.core, by triton's own
    helpers), run as triton runs them. Kernels compute the same; only the interpreter's repeated
    work goes. Where the interpreter's private hooks differ, nothing changes."""
    try:
        from triton.runtime import interpreter as ti
    except ImportError:
        return
    orig, launch = getattr(ti, "_patch_lang", None), getattr(getattr(ti, "GridExecutor", None), "__call__", None)
    tl = getattr(ti, "tl", None)
    core = getattr(tl, "core", None)
    if orig is None or launch is None or core is None or getattr(orig, "_once_per_launch", False):
        return
    patched: list = []        # per launch under way: the ids of the language modules it patched

    def patch_lang(fn):
        langs = {id(v) for v in fn.__globals__.values() if v is tl or v is core}
        if patched and langs <= patched[-1]:
            return ti._LangPatchScope()
        scope = orig(fn)
        if patched:
            patched[-1].update(langs)
        return scope

    def run_launch(self, *args, **kwargs):
        patched.append(set())
        try:
            return launch(self, *args, **kwargs)
        finally:
            patched.pop()

    patch_lang._once_per_launch = True
    ti._patch_lang = patch_lang
    ti.GridExecutor.__call__ = run_launch


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_triton_lang_once_per_launch()


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "triton: Triton kernel test (runs under TRITON_INTERPRET=1 without a GPU)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_kernel_decisions():
    """Kernel decisions are cached per (policy, device, dtype, grad) and read kernels.moe's
    limits when first made: a test that patches a limit sees it in a fresh decision."""
    from mamba_decoder.policy import _decide

    _decide.cache_clear()
    yield
    _decide.cache_clear()
