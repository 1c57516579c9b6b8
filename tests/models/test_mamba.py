"""The Mamba mixer and Regular Mamba against mambapy, under shared weights."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the forced Triton conv tests; before any triton import

from helpers import randomize_, rel_err  # noqa: E402
from mambapy.mamba import Mamba, MambaBlock, MambaConfig  # noqa: E402

from mamba_decoder.models import MambaMixer, RegularMamba  # noqa: E402
from mamba_decoder.kernels.selective_scan import auto_impl  # noqa: E402  (cpu-compiled where a C compiler builds it)

NEEDS_INTERPRET = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                     reason="forcing the Triton kernels on CPU needs TRITON_INTERPRET=1")

CASES = [(2, 16, 32), (1, 37, 48), (3, 8, 40)]  # (B, L, D): odd L, batch 1, D not a power of two


def _ids(c):
    return "B{}-L{}-D{}".format(*c)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_reference_mixer_equals_mambapy(case):
    B, L, D = case
    cfg = MambaConfig(d_model=D, n_layers=1)
    theirs = randomize_(MambaBlock(cfg))
    ours = MambaMixer(MambaConfig(d_model=D, n_layers=1), backend="reference")
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(B, L, D)
    assert rel_err(ours(x), theirs(x)) < 1e-6


def test_state_dict_moves_both_ways():
    cfg = MambaConfig(d_model=24, n_layers=2)
    ours = randomize_(RegularMamba(cfg, backend="fast"))
    theirs = Mamba(MambaConfig(d_model=24, n_layers=2))
    theirs.load_state_dict(ours.state_dict(), strict=True)
    back = RegularMamba(MambaConfig(d_model=24, n_layers=2), backend="reference")
    back.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 11, 24)
    assert rel_err(back(x), theirs(x)) < 1e-6


@pytest.mark.parametrize("n_layers", [1, 2])
def test_regular_mamba_equals_mambapy_mamba(n_layers):
    theirs = randomize_(Mamba(MambaConfig(d_model=32, n_layers=n_layers)))
    ours = RegularMamba(MambaConfig(d_model=32, n_layers=n_layers), backend="reference")
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 20, 32)
    assert rel_err(ours(x), theirs(x)) < 1e-6


def test_reference_runs_in_bf16_where_mambapy_fails():
    cfg = MambaConfig(d_model=32, n_layers=1)
    theirs = Mamba(cfg).to(torch.bfloat16)
    x = torch.randn(2, 16, 32, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="dtype"):
        theirs(x)  # mambapy's own bf16 failure, which the reference backend fixes
    ours = RegularMamba(MambaConfig(d_model=32, n_layers=1), backend="reference").to(torch.bfloat16)
    ours.load_state_dict(theirs.state_dict())
    ref32 = RegularMamba(MambaConfig(d_model=32, n_layers=1), backend="reference")
    ref32.load_state_dict(theirs.float().state_dict())
    y = ours(x)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, ref32(x.float())) < 2e-2


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)],
                         ids=["fp32", "bf16"])
def test_fast_mixer_equals_reference(case, dtype, tol):
    B, L, D = case
    ref = randomize_(MambaMixer(MambaConfig(d_model=D, n_layers=1), backend="reference"))
    fast = MambaMixer(MambaConfig(d_model=D, n_layers=1), backend="fast")
    fast.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(B, L, D)
    want = ref(x)
    got = fast.to(dtype)(x.to(dtype))
    assert got.dtype == dtype
    assert rel_err(got, want) < tol


@pytest.mark.parametrize("path", ["default", pytest.param("triton-conv", marks=NEEDS_INTERPRET)])
def test_fast_mixer_gradients_equal_reference(path):
    """Gradients of every parameter and the input, fast vs mambapy: the CPU default path, and the
    channel-major path with the Triton conv (its backward recomputes in PyTorch)."""
    ref = randomize_(MambaMixer(MambaConfig(d_model=24, n_layers=1), backend="reference"))
    fast = MambaMixer(MambaConfig(d_model=24, n_layers=1), backend="fast")
    if path == "triton-conv":
        fast = _fused_bdl(fast)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 19, 24)
    g = torch.randn(2, 19, 24)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    (ref(xr) * g).sum().backward()
    (fast(xf) * g).sum().backward()
    assert rel_err(xf.grad, xr.grad) < 1e-5
    for (name, pr), (_, pf) in zip(ref.named_parameters(), fast.named_parameters()):
        assert rel_err(pf.grad, pr.grad) < 1e-5, name


def test_use_cuda_config_is_rejected():
    with pytest.raises(ValueError, match="use_cuda"):
        MambaMixer(MambaConfig(d_model=16, n_layers=1, use_cuda=True))


def test_mamba_lm_has_mambapy_lm_state_dict_names():
    from mamba_decoder.models import MambaLM

    lm = MambaLM(MambaConfig(d_model=16, n_layers=2), vocab_size=30)
    names = set(lm.state_dict())
    assert {"embedding.weight", "mamba.layers.1.mixer.A_log", "norm_f.weight", "lm_head.weight"} <= names
    assert lm(torch.randint(0, 30, (2, 7))).shape == (2, 7, 30)


# -- the channel-major fast path with the Triton causal conv + SiLU, forced on CPU tensors

def _fused_bdl(mixer):
    from mamba_decoder import KernelPolicy
    mixer.policy = KernelPolicy(mamba_layout="BDL", mamba_fused="triton")
    return mixer


@NEEDS_INTERPRET
@pytest.mark.parametrize("case", CASES[1:], ids=_ids)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)],
                         ids=["fp32", "bf16"])
def test_fast_mixer_with_triton_conv_equals_reference(case, dtype, tol, monkeypatch):
    from mamba_decoder.kernels import causal_conv

    B, L, D = case
    ref = randomize_(MambaMixer(MambaConfig(d_model=D, n_layers=1), backend="reference"))
    fast = _fused_bdl(MambaMixer(MambaConfig(d_model=D, n_layers=1), backend="fast"))
    fast.load_state_dict(ref.state_dict(), strict=True)
    calls = []
    real = causal_conv.causal_conv1d_silu
    monkeypatch.setattr(causal_conv, "causal_conv1d_silu", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(B, L, D)
    want = ref(x)
    with torch.no_grad():
        got = fast.to(dtype)(x.to(dtype))
    assert got.dtype == dtype and calls == [1]
    assert rel_err(got, want) < tol


def test_kernel_choice_names_conv_and_step():
    fast = MambaMixer(MambaConfig(d_model=24, n_layers=1), backend="fast")
    cpu = torch.device("cpu")
    d = fast.policy.decide(cpu, torch.float32)
    gemm = {"gemm": "onednn (inference, >= 16 rows and 2^24 MACs), torch otherwise"} if d.cpu_gemm else {}
    conv = "cpu-conv-silu (inference), torch-conv1d otherwise" if d.cpu_fused else "torch-conv1d"
    assert fast.kernel_choice(cpu, torch.float32) == {"scan": auto_impl("cpu"), "conv": conv, "step": "torch", **gemm}
    assert fast.kernel_choice(cpu, torch.bfloat16) == {"scan": auto_impl("cpu"), "conv": "torch-conv1d", "step": "torch"}
    _fused_bdl(fast)
    assert fast.kernel_choice(cpu, torch.float32) == {
        "scan": auto_impl("cpu"), "conv": "triton-conv-silu", "step": "triton-fused", **gemm}


def test_fast_mixer_sees_in_place_parameter_updates_in_inference():
    """The fp32 (A, D, dt bias) the fast mixer caches in inference follow in-place updates."""
    torch.manual_seed(0)
    cfg = MambaConfig(d_model=16, n_layers=1)
    ref, fast = MambaMixer(cfg, backend="reference"), MambaMixer(cfg, backend="fast")
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        fast(x)                                          # fills the cache
        for m in (ref, fast):
            m.A_log.add_(0.3)
            m.D.mul_(-2.0)
            m.dt_proj.bias.add_(0.5)
        assert rel_err(fast(x), ref(x)) < 1e-5
