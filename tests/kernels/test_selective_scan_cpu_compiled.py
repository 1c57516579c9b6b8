"""The compiled CPU scan (kernels/cpu_kernels.c) against the sequential fp32 reference, at the sizes
its code treats specially: time not a multiple of the saved-state chunk (64) in the backward,
channels not a multiple of the 16-wide vector (a partial last vector), batch 1, d_state 6,
every option on or off, initial and final state. Bounds: fp32 <= 1e-5 (outputs and every
gradient); bf16 inputs <= 2e-2 (rounding the inputs and the output to bf16 dominates).

test_selective_scan.py runs the shared impl checks on it too (halves, strided B/C, bf16 grads).
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mamba_decoder.kernels import cpu_native  # noqa: E402
from mamba_decoder.kernels.selective_scan import selective_scan_ref  # noqa: E402
from mamba_decoder.kernels.selective_scan import cpu_compiled  # noqa: E402
from mamba_decoder.kernels.selective_scan.cpu_compiled import selective_scan_cpu_compiled as scan  # noqa: E402
from helpers import SCAN_GRAD_NAMES, run_with_grads  # noqa: E402
from test_selective_scan import make_inputs, rel  # noqa: E402

pytestmark = pytest.mark.skipif(not cpu_native.available()[0], reason=cpu_native.available()[1])

SHAPES = [(1, 150, 33, 6), (2, 64, 16, 16), (3, 129, 50, 16), (2, 1, 17, 4), (1, 200, 8, 1)]
OPTIONS = {
    "all": {},
    "no-z": dict(z=None),
    "no-D-bias": dict(D=None, dt_bias=None),
    "no-softplus": dict(dt_softplus=False, dt_bias=None),   # delta = dt itself: kept positive
    "bare": dict(z=None, D=None, dt_bias=None),
}


def sid(shape):
    return "B{}-L{}-ED{}-N{}".format(*shape)


def _inputs(shape, opts, dtype=torch.float32, seed=0):
    inp, h0 = make_inputs(*shape, dtype=dtype, seed=seed, device="cpu")
    if opts.get("dt_softplus") is False:
        inp["dt"] = torch.nn.functional.softplus(inp["dt"].float()).to(dtype)  # keep delta positive
    for k, v in opts.items():
        if k != "dt_softplus":
            inp[k] = v
    return inp, h0, {"dt_softplus": opts.get("dt_softplus", True)}


@pytest.mark.parametrize("shape", SHAPES, ids=sid)
@pytest.mark.parametrize("opt", list(OPTIONS))
@pytest.mark.parametrize("with_h0", [True, False], ids=["h0", "zero-h0"])
def test_forward_fp32(shape, opt, with_h0):
    inp, h0, kw = _inputs(shape, OPTIONS[opt])
    h0 = h0 if with_h0 else None
    with torch.no_grad():
        out, hf = scan(**inp, **kw, initial_state=h0, return_final_state=True)
        ref, rhf = selective_scan_ref(**inp, **kw, initial_state=h0, return_final_state=True)
    assert out.dtype == torch.float32 and out.shape == inp["x"].shape and hf.shape == rhf.shape
    assert rel(out, ref) <= 1e-5 and rel(hf, rhf) <= 1e-5
    assert torch.equal(scan(**inp, **kw, initial_state=h0), out)   # deterministic, final state or not


@pytest.mark.parametrize("where", ["dt", "x", "z"])
def test_a_nan_input_gives_nan_where_the_reference_does(where):
    """A NaN in an input (a diverged run) comes out as NaN where the reference's output is NaN,
    not as finite numbers: the kernels' exp clamps keep NaN (they turned it into exp(-87))."""
    inp, _, kw = _inputs((1, 40, 20, 4), {})
    inp[where][0, 10, 3] = float("nan")
    with torch.no_grad():
        out = scan(**inp, **kw)
        ref = selective_scan_ref(**inp, **kw)
    assert ref.isnan().any() and torch.equal(out.isnan(), ref.isnan())
    ok = ~ref.isnan()
    assert rel(out[ok], ref[ok]) <= 1e-5


@pytest.mark.parametrize("shape", SHAPES[:3], ids=sid)
@pytest.mark.parametrize("opt", list(OPTIONS))
def test_gradients_fp32(shape, opt):
    inp, h0, kw = _inputs(shape, OPTIONS[opt])
    names = [k for k in SCAN_GRAD_NAMES if inp.get(k) is not None]
    use = {k: inp[k] for k in names}
    o, hf, g = run_with_grads(scan, use, h0, names=names, **kw)
    ro, rhf, rg = run_with_grads(selective_scan_ref, use, h0, names=names, **kw)
    assert rel(o, ro) <= 1e-5 and rel(hf, rhf) <= 1e-5
    for k in names + ["initial_state"]:
        assert rel(g[k], rg[k]) <= 1e-5, (k, rel(g[k], rg[k]))


def test_gradient_of_output_only():
    """No gradient flows into the final state (it is unused): the backward starts from zero there."""
    inp, h0, _ = _inputs((2, 70, 20, 16), {})
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inp.items()}
    ref_leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inp.items()}
    g = torch.randn(inp["x"].shape)
    (scan(**leaves) * g).sum().backward()
    (selective_scan_ref(**ref_leaves) * g).sum().backward()
    for k in leaves:
        assert rel(leaves[k].grad, ref_leaves[k].grad) <= 1e-5, k


@pytest.mark.parametrize("shape", [(2, 37, 48, 16), (1, 150, 33, 6)], ids=sid)
def test_bf16_bound(shape):
    """bf16 inputs: the compiled scan is as close to the fp32 reference on those same bf16 inputs as
    rounding the output allows, and within 2e-2 of the fp32 scan of the unrounded inputs."""
    inp, h0, _ = _inputs(shape, {}, dtype=torch.bfloat16)
    inp32, _, _ = _inputs(shape, {}, dtype=torch.float32)
    with torch.no_grad():
        out = scan(**inp, initial_state=h0)
        ref = selective_scan_ref(**inp, initial_state=h0)
        ref32 = selective_scan_ref(**inp32, initial_state=h0)
    assert out.dtype == torch.bfloat16
    assert rel(out, ref) <= 8e-3          # the output's own rounding: 2^-8
    assert rel(out, ref32) <= 2e-2


@pytest.mark.parametrize("threads", [1, 3])
def test_thread_counts_agree(threads):
    """The task split depends on the thread count; the result must not."""
    inp, h0, _ = _inputs((3, 90, 70, 16), {})
    n = torch.get_num_threads()
    with torch.no_grad():
        want = scan(**inp, initial_state=h0)
        torch.set_num_threads(threads)
        try:
            got = scan(**inp, initial_state=h0)
        finally:
            torch.set_num_threads(n)
    assert torch.equal(got, want)


def test_empty_sequence_returns_initial_state():
    inp, h0, _ = _inputs((2, 5, 16, 4), {})
    empty = {k: (v[:, :0] if k in ("x", "dt", "z", "B", "C") else v) for k, v in inp.items()}
    with torch.no_grad():
        out, hf = scan(**empty, initial_state=h0, return_final_state=True)
    assert out.shape == (2, 0, 16) and torch.equal(hf, h0)


def test_rejects_cuda_tensors(monkeypatch):
    x = torch.zeros(1, 2, 16)
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda", 0)))
    with pytest.raises(ValueError, match="CPU tensors"):
        scan(x, x, torch.zeros(16, 4), torch.zeros(1, 2, 4), torch.zeros(1, 2, 4))


def test_build_is_cached_and_keyed(tmp_path, monkeypatch):
    """A fresh cache dir builds once; a second load reuses the file; the key changes with the flags."""
    monkeypatch.setenv("MAMBA_DECODER_CACHE", str(tmp_path))
    path = cpu_native.library_path()
    assert path.parent == tmp_path and not path.exists()
    cpu_native._build(path)
    assert path.exists()
    mtime = path.stat().st_mtime_ns
    monkeypatch.setattr(cpu_native, "FLAGS", cpu_native.FLAGS + ["-DUNUSED"])
    assert cpu_native.library_path() != path
    assert path.stat().st_mtime_ns == mtime


def test_missing_compiler_is_reported(monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler-xyz")
    with pytest.raises(cpu_native.CPUKernelsUnavailable, match="no C compiler"):
        cpu_native.library_path()


def test_chunk_size_does_not_change_gradients(monkeypatch):
    inp, h0, _ = _inputs((1, 100, 24, 8), {})
    _, _, g64 = run_with_grads(scan, inp, h0)
    monkeypatch.setattr(cpu_compiled, "CHUNK", 7)
    _, _, g7 = run_with_grads(scan, inp, h0)
    for k in g64:
        assert rel(g7[k], g64[k]) <= 1e-6, k
