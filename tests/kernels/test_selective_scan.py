"""Selective scan (Mamba-1): every impl vs the sequential fp32 reference.

Bounds (relative L2 error vs selective_scan_ref on the same inputs):
  fp32: cpu <= 1e-5, triton (interpreter) <= 1e-4;  bf16 inputs: <= 2e-2 (output rounded to bf16).
Triton tests run under TRITON_INTERPRET=1 when no GPU is present, at small shapes.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any triton import

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # repo root, for mamba_decoder

from mamba_decoder.kernels.selective_scan import (  # noqa: E402
    auto_impl, available_impls, selective_scan, selective_scan_pscan, selective_scan_ref)
from helpers import SCAN_GRAD_NAMES as GRAD_NAMES  # noqa: E402
from helpers import run_with_grads, small_scan_tiles  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def sid(shape, dtype):
    Bsz, L, ED, N = shape
    return f"B{Bsz}-L{L}-ED{ED}-N{N}-{'fp32' if dtype == torch.float32 else 'bf16'}"


def make_inputs(Bsz, L, ED, N, dtype=torch.float32, seed=0, R=3, device=DEV):
    """Random non-degenerate inputs; B and C are strided slices of one (B, L, R+2N) tensor."""
    g = torch.Generator().manual_seed(seed)

    def rn(*s):
        return torch.randn(*s, generator=g)

    xBC = rn(Bsz, L, R + 2 * N)
    inp = dict(
        x=rn(Bsz, L, ED), dt=rn(Bsz, L, ED) - 2.0, z=rn(Bsz, L, ED),
        A=-torch.exp(torch.rand(ED, N, generator=g)), D=rn(ED), dt_bias=0.5 * rn(ED),
    )
    out = {k: v.to(device) for k, v in inp.items()}
    for k in ("x", "dt", "z"):
        out[k] = out[k].to(dtype)
    xBC = xBC.to(device=device, dtype=dtype)
    out["B"] = xBC[..., R:R + N]
    out["C"] = xBC[..., R + N:]
    assert not out["B"].is_contiguous()
    h0 = rn(Bsz, ED, N).to(device)
    return out, h0


def impl_fn(impl):
    return lambda **kw: selective_scan(**kw, impl=impl)


# ---------------------------------------------------------------- reference


def test_reference_matches_mambapy_pscan():
    pytest.importorskip("mambapy")
    inp, h0 = make_inputs(2, 37, 48, 16, device="cpu")
    for h in (None, h0):
        r, rh = selective_scan_ref(**inp, initial_state=h, return_final_state=True)
        p, ph = selective_scan_pscan(**inp, initial_state=h, return_final_state=True)
        assert rel(p, r) <= 1e-5 and rel(ph, rh) <= 1e-5


def test_reference_without_options_matches_pscan():
    pytest.importorskip("mambapy")
    inp, _ = make_inputs(1, 16, 8, 4, device="cpu")
    kw = dict(x=inp["x"], dt=inp["dt"].exp(), A=inp["A"], B=inp["B"], C=inp["C"])
    r = selective_scan_ref(**kw, dt_softplus=False)
    p = selective_scan_pscan(**kw, dt_softplus=False)
    assert rel(p, r) <= 1e-5


# ---------------------------------------------------------------- shared checks per impl

IMPL_TOL = {"cpu": 1e-5, "triton": 1e-4}
FWD_SHAPES = [(2, 37, 48, 16), (1, 70, 20, 16), (2, 5, 16, 4), (1, 33, 40, 8)]


def _impls():
    params = [pytest.param("cpu", id="cpu")]
    params.append(pytest.param("triton", id="triton", marks=pytest.mark.triton))
    return params


@pytest.fixture
def impl(request):
    name = request.param
    if name == "triton":
        pytest.importorskip("triton")
        from mamba_decoder.kernels.selective_scan import triton_bdl
        # (B, L, ED) inputs run the channel-major kernels on transposed views; small tiles keep
        # the interpreter fast and still leave partial ED blocks and chunks
        mp = pytest.MonkeyPatch()
        if DEV == "cpu":
            small_scan_tiles(mp, triton_bdl)
        yield name
        mp.undo()
    else:
        yield name


@pytest.mark.parametrize("impl", _impls(), indirect=True)
@pytest.mark.parametrize("shape,dtype", [
    pytest.param(s, d, id=sid(s, d))
    for s in FWD_SHAPES for d in (torch.float32,)
] + [pytest.param((2, 37, 48, 16), torch.bfloat16, id=sid((2, 37, 48, 16), torch.bfloat16))])
def test_forward(impl, shape, dtype):
    inp, h0 = make_inputs(*shape, dtype=dtype)
    with torch.no_grad():
        out, hf = selective_scan(**inp, initial_state=h0, return_final_state=True, impl=impl)
        ref, rhf = selective_scan_ref(**inp, initial_state=h0, return_final_state=True)
    assert out.dtype == dtype and out.shape == inp["x"].shape
    assert hf.dtype == torch.float32
    tol = IMPL_TOL[impl] if dtype == torch.float32 else 2e-2
    assert rel(out, ref) <= tol
    assert rel(hf, rhf) <= max(tol, 1e-4)


@pytest.mark.parametrize("impl", _impls(), indirect=True)
@pytest.mark.parametrize("opts", [
    pytest.param(dict(), id="all-options"),
    pytest.param(dict(z=None, D=None, dt_bias=None, dt_softplus=False), id="bare"),
])
def test_gradients(impl, opts):
    shape = (2, 37, 48, 16) if "z" not in opts else (1, 21, 20, 8)
    inp, h0 = make_inputs(*shape)
    if opts.get("dt_softplus") is False:
        inp["dt"] = torch.nn.functional.softplus(inp["dt"])  # keep delta positive
    use = {k: v for k, v in inp.items() if opts.get(k, 0) is not None}
    kw = {"dt_softplus": opts.get("dt_softplus", True)}

    def with_none(fn):
        def f(**leaves):
            return fn(**leaves, **{k: None for k in GRAD_NAMES if k not in leaves}, **kw)
        return f

    names = [k for k in GRAD_NAMES if k in use]
    o, hf, g = run_with_grads(with_none(impl_fn(impl)), use, h0, names=names)
    ro, rhf, rg = run_with_grads(with_none(selective_scan_ref), use, h0, names=names)
    tol = IMPL_TOL[impl]
    assert rel(o, ro) <= tol and rel(hf, rhf) <= tol
    for k in names + ["initial_state"]:
        assert g[k] is not None, k
        assert rel(g[k], rg[k]) <= 10 * tol, (k, rel(g[k], rg[k]))


@pytest.mark.parametrize("impl", _impls(), indirect=True)
def test_gradients_bf16(impl):
    inp, h0 = make_inputs(1, 30, 24, 8, dtype=torch.bfloat16)
    o, hf, g = run_with_grads(impl_fn(impl), inp, h0)
    ro, rhf, rg = run_with_grads(selective_scan_ref, inp, h0)
    assert rel(o, ro) <= 2e-2
    for k in GRAD_NAMES:
        assert g[k].dtype == inp[k].dtype
        assert rel(g[k], rg[k]) <= 2e-2, k


@pytest.mark.parametrize("impl", _impls(), indirect=True)
def test_two_halves_equal_whole(impl):
    inp, h0 = make_inputs(2, 40, 24, 16)
    cut = 17
    with torch.no_grad():
        whole, hw = selective_scan(**inp, initial_state=h0, return_final_state=True, impl=impl)
        first = {k: (v[:, :cut] if k in ("x", "dt", "z", "B", "C") else v) for k, v in inp.items()}
        second = {k: (v[:, cut:] if k in ("x", "dt", "z", "B", "C") else v) for k, v in inp.items()}
        o1, h1 = selective_scan(**first, initial_state=h0, return_final_state=True, impl=impl)
        o2, h2 = selective_scan(**second, initial_state=h1, return_final_state=True, impl=impl)
    assert rel(torch.cat([o1, o2], 1), whole) <= IMPL_TOL[impl]
    assert rel(h2, hw) <= IMPL_TOL[impl]


@pytest.mark.parametrize("impl", _impls(), indirect=True)
def test_strided_and_contiguous_BC_agree(impl):
    inp, _ = make_inputs(1, 19, 16, 8)
    with torch.no_grad():
        a = selective_scan(**inp, impl=impl)
        inp2 = dict(inp, B=inp["B"].contiguous(), C=inp["C"].contiguous())
        b = selective_scan(**inp2, impl=impl)
    assert rel(a, b) <= 1e-6


# ---------------------------------------------------------------- triton specifics


@pytest.mark.triton
def test_triton_requires_cuda_without_interpreter(monkeypatch):
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("CPU-tensor rejection only testable without a GPU")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    inp, _ = make_inputs(1, 4, 8, 4, device="cpu")
    with pytest.raises(ValueError, match="CUDA"):
        selective_scan(**inp, impl="triton")


# ---------------------------------------------------------------- API


def test_auto_and_available():
    assert auto_impl(torch.device("cpu")) == "cpu-compiled"   # this machine has a C compiler
    assert auto_impl(torch.device("cuda")) == "triton"
    assert {"reference", "cpu", "cpu-compiled"} <= set(available_impls("cpu"))
    inp, _ = make_inputs(1, 9, 8, 4, device="cpu")
    with torch.no_grad():
        a = selective_scan(**inp)  # auto on CPU = cpu-compiled
        b = selective_scan(**inp, impl="cpu-compiled")
    assert torch.equal(a, b)


def test_bad_impl_and_shapes_raise():
    inp, _ = make_inputs(1, 9, 8, 4, device="cpu")
    with pytest.raises(ValueError, match="unknown impl"):
        selective_scan(**inp, impl="cuda-magic")
    with pytest.raises(ValueError):
        selective_scan(**dict(inp, D=torch.ones(3)))


def test_cpu_no_grad_memory_is_chunked():
    """Without autograd, the cpu path never allocates a (B, L, ED, N) tensor."""
    from mamba_decoder.kernels.selective_scan import cpu as cpu_mod
    Bsz, L, ED, N = 1, 256, 32, 16
    inp, _ = make_inputs(Bsz, L, ED, N, device="cpu")
    biggest = []
    orig = torch.exp

    def spy(t, *a, **k):
        biggest.append(t.numel())
        return orig(t, *a, **k)

    mp = pytest.MonkeyPatch()
    mp.setattr(cpu_mod.torch, "exp", spy)
    try:
        with torch.no_grad():
            selective_scan(**inp, impl="cpu")
    finally:
        mp.undo()
    assert max(biggest) <= cpu_mod.DEFAULT_CHUNK * Bsz * ED * N < L * Bsz * ED * N


def test_auto_without_the_compiled_scan_warns_and_takes_the_torch_scan(monkeypatch):
    """Where the C kernels cannot be built, auto falls back to the chunked torch scan, loudly,
    naming why; and the result still equals the reference."""
    from mamba_decoder.kernels import cpu_native
    from mamba_decoder.kernels import selective_scan as ss

    monkeypatch.setattr(cpu_native, "available", lambda: (False, "no C compiler (cc) found"))
    monkeypatch.setattr(ss, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="no C compiler"):
        assert auto_impl(torch.device("cpu")) == "cpu"
    assert "cpu-compiled" not in available_impls("cpu")
    g = torch.Generator().manual_seed(0)
    x, dt, z = (torch.randn(1, 9, 6, generator=g) for _ in range(3))
    A = -torch.rand(6, 4, generator=g)
    Bm, C = (torch.randn(1, 9, 4, generator=g) for _ in range(2))
    with pytest.warns(RuntimeWarning):
        monkeypatch.setattr(ss, "_WARNED", set())
        got = selective_scan(x, dt, A, Bm, C, z=z, impl="auto")
    assert torch.allclose(got, selective_scan(x, dt, A, Bm, C, z=z, impl="reference"), atol=1e-5)


def test_auto_on_cpu_takes_the_compiled_scan_and_equals_the_reference():
    g = torch.Generator().manual_seed(1)
    x, dt, z = (torch.randn(2, 19, 20, generator=g) for _ in range(3))
    A = -torch.rand(20, 16, generator=g)
    Bm, C = (torch.randn(2, 19, 16, generator=g) for _ in range(2))
    got = selective_scan(x, dt, A, Bm, C, z=z, impl="auto")
    want = selective_scan(x, dt, A, Bm, C, z=z, impl="reference")
    assert auto_impl("cpu") == "cpu-compiled"
    assert ((got - want).norm() / want.norm()).item() < 1e-5
