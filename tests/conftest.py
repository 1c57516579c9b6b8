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
