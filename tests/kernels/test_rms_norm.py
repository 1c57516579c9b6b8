"""The fused residual add + RMSNorm against its PyTorch twin (Triton under TRITON_INTERPRET=1
on CPU tensors; the CUDA check at the benchmark's size is in tests/gpu)."""
import pytest
import torch
from helpers import rel_err
from torch import nn

from mamba_decoder.kernels import rms_norm as rn
from mamba_decoder.kernels.rms_norm import add_rms_norm, add_rms_norm_torch

pytestmark = pytest.mark.triton


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")


DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("shape", [(1, 7, 96), (3, 5, 1000), (2, 1, 512)], ids=["D96", "D1000", "decode"])
@pytest.mark.parametrize("affine", [True, False], ids=["weight", "no-weight"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
def test_add_rms_norm_triton_equals_twin(shape, affine, dtype, tol, monkeypatch):
    norm = nn.RMSNorm(shape[-1], elementwise_affine=affine).to(DEV, dtype)
    if affine:
        with torch.no_grad():
            norm.weight.copy_(1 + 0.5 * torch.randn_like(norm.weight))
    x, y = torch.randn(*shape, device=DEV).to(dtype), torch.randn(*shape, device=DEV).to(dtype)
    want_h, want_n = add_rms_norm(x, y, norm, fused=False)
    monkeypatch.setattr(rn, "add_rms_norm_torch", None)  # would fail if the twin ran
    with torch.no_grad():                                  # the weight wants grad: else the twin
        h, n = add_rms_norm(x, y, norm, impl="triton")
    assert h.shape == n.shape == x.shape and h.dtype == n.dtype == dtype
    assert rel_err(h, want_h) < tol and rel_err(n, want_n) < tol


def test_add_rms_norm_reads_strided_rows():
    """x a transposed view (rows not adjacent), y a slice: read by stride, outputs contiguous."""
    norm = nn.RMSNorm(64, eps=1e-5).to(DEV)
    x = torch.randn(2, 64, 9, device=DEV).transpose(1, 2)            # (2, 9, 64), last dim stride 9
    y = torch.randn(2, 9, 80, device=DEV)[..., :64]
    with torch.no_grad():
        h, n = add_rms_norm(x, y, norm, impl="triton")
    want_h, want_n = add_rms_norm_torch(x, y, norm.weight, 1e-5)
    assert h.is_contiguous() and rel_err(h, want_h) < 1e-6 and rel_err(n, want_n) < 1e-6


def test_add_rms_norm_takes_the_twin_with_autograd():
    norm = nn.RMSNorm(32).to(DEV)
    x = torch.randn(2, 3, 32, device=DEV, requires_grad=True)
    h, n = add_rms_norm(x, torch.randn(2, 3, 32, device=DEV), norm, impl="triton")
    n.sum().backward()                                    # the PyTorch ops: gradients flow
    assert x.grad is not None and norm.weight.grad is not None
    assert not h.is_contiguous() or h.grad_fn is not None


def test_add_rms_norm_rejects_an_unknown_impl():
    norm = nn.RMSNorm(8)
    with pytest.raises(ValueError, match="impl='cuda' is not one of auto, triton, torch"):
        add_rms_norm(torch.zeros(1, 8), torch.zeros(1, 8), norm, impl="cuda")
