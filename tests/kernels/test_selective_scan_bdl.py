"""Channel-major ("BDL") selective scan: x, dt, z, y (B, ED, L); B, C (B, N, L).

Every impl in layout="BDL" against selective_scan_ref run on the same data in (B, L, ED).
Bounds as in test_selective_scan.py: fp32 triton (interpreter) <= 1e-4 (grads 1e-3),
bf16 inputs <= 2e-2. Triton runs under TRITON_INTERPRET=1 without a GPU, at small shapes.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any triton import

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mamba_decoder.kernels.selective_scan import selective_scan, selective_scan_ref  # noqa: E402
from helpers import SCAN_GRAD_NAMES as GRAD_NAMES  # noqa: E402
from helpers import run_with_grads, small_scan_tiles  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SEQ_KEYS = ("x", "dt", "z", "B", "C")


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_bdl(Bsz, L, ED, N, dtype=torch.float32, seed=0, R=3):
    """BDL inputs; B and C are (B, N, L) slices of one (B, R + 2N, L) tensor."""
    g = torch.Generator().manual_seed(seed)

    def rn(*s):
        return torch.randn(*s, generator=g)

    xBC = rn(Bsz, R + 2 * N, L).to(device=DEV, dtype=dtype)
    inp = dict(x=rn(Bsz, ED, L), dt=rn(Bsz, ED, L) - 2.0, z=rn(Bsz, ED, L))
    inp = {k: v.to(device=DEV, dtype=dtype) for k, v in inp.items()}
    inp.update(A=-torch.exp(torch.rand(ED, N, generator=g)).to(DEV), D=rn(ED).to(DEV),
               dt_bias=(0.5 * rn(ED)).to(DEV))
    inp["B"] = xBC[:, R:R + N]
    inp["C"] = xBC[:, R + N:]
    assert inp["B"].stride() == ((R + 2 * N) * L, L, 1)  # a strided slice, read in place
    h0 = rn(Bsz, ED, N).to(DEV)
    return inp, h0


def to_bld(inp):
    return {k: (v.transpose(1, 2) if k in SEQ_KEYS and v is not None else v)
            for k, v in inp.items()}


def bdl_fn(impl):
    return lambda **kw: selective_scan(**kw, impl=impl, layout="BDL")


def ref_on_bdl(**kw):
    """The BLD reference on transposed views; output back to (B, ED, L)."""
    kw = to_bld(kw)
    out, hf = selective_scan_ref(**kw)
    return out.transpose(1, 2), hf


@pytest.fixture
def small_tiles(monkeypatch):
    """Small tiles keep the interpreter fast and leave partial ED blocks, time tiles and chunks."""
    pytest.importorskip("triton")
    from mamba_decoder.kernels.selective_scan import triton_bdl
    if DEV == "cpu":
        small_scan_tiles(monkeypatch, triton_bdl)
    return triton_bdl


def use_variant(tb, monkeypatch, variant):
    """Route every dtype to one forward kernel."""
    for table in (tb.FWD_BY_DTYPE, tb.FWD_TRAIN_BY_DTYPE):
        for dt in list(table):
            monkeypatch.setitem(table, dt, variant)


IMPLS = [pytest.param("cpu", id="cpu"), pytest.param("reference", id="reference"),
         pytest.param("triton", id="triton", marks=pytest.mark.triton)]
TOL = {"cpu": 1e-5, "reference": 1e-6, "triton": 1e-4}


@pytest.mark.parametrize("variant", ["chan", "lane"])
@pytest.mark.parametrize("shape,dtype", [
    ((2, 37, 48, 16), torch.float32),   # L not a multiple of the tiles, partial ED block
    ((1, 70, 20, 16), torch.float32),   # batch 1, ED not a power of two
    ((2, 5, 16, 4), torch.float32),     # L shorter than a tile
    ((1, 33, 40, 8), torch.float32),
    ((2, 37, 48, 16), torch.bfloat16),
], ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v).split(".")[-1])
@pytest.mark.triton
def test_triton_bdl_forward(small_tiles, variant, shape, dtype, monkeypatch):
    use_variant(small_tiles, monkeypatch, variant)
    inp, h0 = make_bdl(*shape, dtype=dtype)
    with torch.no_grad():
        out, hf = selective_scan(**inp, initial_state=h0, return_final_state=True,
                                 impl="triton", layout="BDL")
        ref, rhf = ref_on_bdl(**inp, initial_state=h0, return_final_state=True)
    Bsz, L, ED, N = shape
    assert out.shape == (Bsz, ED, L) and out.dtype == dtype and out.is_contiguous()
    assert hf.dtype == torch.float32
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert rel(out, ref) <= tol
    assert rel(hf, rhf) <= max(tol, 1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_bdl_forward_no_state(impl, request):
    if impl == "triton":
        request.getfixturevalue("small_tiles")
    inp, _ = make_bdl(2, 21, 24, 8)
    with torch.no_grad():
        out = selective_scan(**inp, impl=impl, layout="BDL")
        ref = selective_scan_ref(**to_bld(inp)).transpose(1, 2)
    assert out.shape == inp["x"].shape
    assert rel(out, ref) <= TOL[impl]


@pytest.mark.triton
@pytest.mark.parametrize("opts", [
    pytest.param(dict(), id="all-options"),
    pytest.param(dict(z=None, D=None, dt_bias=None, dt_softplus=False), id="bare"),
])
@pytest.mark.parametrize("shape", [(2, 37, 24, 16), (1, 21, 20, 8)], ids=["B2-L37", "B1-L21"])
def test_triton_bdl_gradients(small_tiles, opts, shape):
    inp, h0 = make_bdl(*shape)
    if opts.get("dt_softplus") is False:
        inp["dt"] = torch.nn.functional.softplus(inp["dt"])
    use = {k: v for k, v in inp.items() if opts.get(k, 0) is not None}
    names = [k for k in GRAD_NAMES if k in use]
    kw = {"dt_softplus": opts.get("dt_softplus", True)}
    kw.update({k: None for k in GRAD_NAMES if k not in use})
    o, hf, g = run_with_grads(bdl_fn("triton"), use, h0, names=names, **kw)
    ro, rhf, rg = run_with_grads(ref_on_bdl, use, h0, names=names, **kw)
    assert rel(o, ro) <= 1e-4 and rel(hf, rhf) <= 1e-4
    for k in names + ["initial_state"]:
        assert g[k] is not None and g[k].shape == use.get(k, h0).shape, k
        assert rel(g[k], rg[k]) <= 1e-3, (k, rel(g[k], rg[k]))


@pytest.mark.triton
def test_triton_bdl_gradients_bf16(small_tiles):
    inp, h0 = make_bdl(1, 30, 24, 8, dtype=torch.bfloat16)
    o, hf, g = run_with_grads(bdl_fn("triton"), inp, h0)
    ro, rhf, rg = run_with_grads(ref_on_bdl, inp, h0)
    assert rel(o, ro) <= 2e-2
    for k in GRAD_NAMES:
        assert g[k].dtype == inp[k].dtype
        assert rel(g[k], rg[k]) <= 2e-2, k


@pytest.mark.triton
@pytest.mark.parametrize("tiles", [dict(BLOCK_D=16, NS=4, E=4, num_warps=2, ATOMIC=True),
                                   dict(BLOCK_D=8, NS=8, E=2, num_warps=2, ATOMIC=True)],
                         ids=["16x4-2warps", "8x8-2warps"])
def test_lane_backward_over_several_warps(small_tiles, monkeypatch, tiles):
    """The backward's tiles of more than one warp (scripts/train_study.py's candidates: fewer
    programs add into each dB / dC element), against the reference; a partial channel block."""
    monkeypatch.setitem(small_tiles.BWD_TILES, "lane", tiles)
    monkeypatch.setattr(small_tiles, "BWD_LANE_MIN_PROGRAMS", 1)
    inp, h0 = make_bdl(2, 19, 40, 8)
    o, hf, g = run_with_grads(bdl_fn("triton"), inp, h0)
    ro, rhf, rg = run_with_grads(ref_on_bdl, inp, h0)
    for k in GRAD_NAMES + ["initial_state"]:
        assert rel(g[k], rg[k]) <= 1e-3, (k, rel(g[k], rg[k]))


@pytest.mark.parametrize("impl", ["cpu", "reference"])
def test_bdl_grads_cpu_and_reference(impl):
    inp, h0 = make_bdl(1, 13, 12, 4)
    o, hf, g = run_with_grads(bdl_fn(impl), inp, h0)
    ro, rhf, rg = run_with_grads(ref_on_bdl, inp, h0)
    for k in GRAD_NAMES + ["initial_state"]:
        assert rel(g[k], rg[k]) <= 1e-4, k


@pytest.mark.triton
def test_triton_bdl_two_halves_equal_whole(small_tiles):
    inp, h0 = make_bdl(2, 40, 24, 16)
    cut = 17
    with torch.no_grad():
        whole, hw = selective_scan(**inp, initial_state=h0, return_final_state=True,
                                   impl="triton", layout="BDL")
        first = {k: (v[..., :cut] if k in SEQ_KEYS else v) for k, v in inp.items()}
        second = {k: (v[..., cut:] if k in SEQ_KEYS else v) for k, v in inp.items()}
        o1, h1 = selective_scan(**first, initial_state=h0, return_final_state=True,
                                impl="triton", layout="BDL")
        o2, h2 = selective_scan(**second, initial_state=h1, return_final_state=True,
                                impl="triton", layout="BDL")
    assert rel(torch.cat([o1, o2], -1), whole) <= 1e-4
    assert rel(h2, hw) <= 1e-4


def test_bdl_bad_shapes_raise():
    inp, _ = make_bdl(1, 9, 8, 4)
    inp = {k: v.cpu() for k, v in inp.items()}
    with pytest.raises(ValueError):
        selective_scan(**to_bld(inp), impl="cpu", layout="BDL")  # B, C in the wrong layout
    with pytest.raises(ValueError, match="layout"):
        selective_scan(**inp, impl="cpu", layout="LBD")


def test_fast_mixer_bdl_path_equals_reference():
    """The mixer's channel-major path (the CUDA default), forced on CPU, vs mambapy."""
    pytest.importorskip("mambapy")
    from mambapy.mamba import MambaConfig

    from mamba_decoder import KernelPolicy
    from mamba_decoder.models import MambaMixer
    torch.manual_seed(0)
    ref = MambaMixer(MambaConfig(d_model=24, n_layers=1), backend="reference")
    fast = MambaMixer(MambaConfig(d_model=24, n_layers=1), backend="fast",
                      policy=KernelPolicy(mamba_layout="BDL"))
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 19, 24)
    assert rel(fast(x), ref(x)) < 1e-5
    # prefill continuing from a cache
    c1, c2 = ref.init_cache(2), fast.init_cache(2)
    a = torch.cat([ref(x[:, :7], c1), ref(x[:, 7:], c1)], 1)
    b = torch.cat([fast(x[:, :7], c2), fast(x[:, 7:], c2)], 1)
    assert rel(b, a) < 1e-5
    assert rel(c2.ssm, c1.ssm) < 1e-5 and rel(c2.conv, c1.conv) < 1e-6
    # grads flow to every parameter
    x.requires_grad_(True)
    fast(x).square().sum().backward()
    assert all(p.grad is not None for p in fast.parameters())


@pytest.mark.triton
@pytest.mark.parametrize("variant,shape,dtype", [
    ("chan", (2, 37, 24, 16), torch.float32),    # 3 time tiles, the last partial; 5 state chunks
    ("chan", (1, 70, 20, 8), torch.float32),     # ED % BLOCK_D != 0
    ("chan", (1, 30, 24, 8), torch.bfloat16),
    ("lane", (2, 37, 24, 16), torch.float32),
    ("lane", (1, 70, 20, 8), torch.float32),
    ("lane", (1, 30, 24, 8), torch.bfloat16),
    ("lane", (1, 19, 20, 5), torch.float32),     # N odd: one lane per channel (NS 2 -> 1)
])
def test_triton_bdl_fwd_bwd(small_tiles, monkeypatch, variant, shape, dtype):
    """Each forward stores the backward's chunk-boundary states; gradients from them match."""
    use_variant(small_tiles, monkeypatch, variant)
    inp, h0 = make_bdl(*shape, dtype=dtype)
    o, hf, g = run_with_grads(bdl_fn("triton"), inp, h0)
    ro, rhf, rg = run_with_grads(ref_on_bdl, inp, h0)
    tol_f, tol_g = (1e-4, 1e-3) if dtype == torch.float32 else (2e-2, 2e-2)
    assert rel(o, ro) <= tol_f and rel(hf, rhf) <= max(tol_f, 1e-4)
    for k in GRAD_NAMES + ["initial_state"]:
        assert rel(g[k], rg[k]) <= tol_g, (k, rel(g[k], rg[k]))
    # no initial state, no final state requested
    with torch.no_grad():
        out = selective_scan(**inp, impl="triton", layout="BDL")
        ref = selective_scan_ref(**to_bld(inp)).transpose(1, 2)
    assert rel(out, ref) <= tol_f


@pytest.mark.triton
@pytest.mark.parametrize("dtype,variant", [(torch.bfloat16, "chan"), (torch.float16, "chan"),
                                           (torch.float32, "lane")])
def test_triton_bdl_forward_by_dtype(small_tiles, monkeypatch, dtype, variant):
    """The dtype table picks the forward: chan for 16-bit inputs, lane for fp32."""
    calls = []
    for name in ("chan", "lane"):
        real = getattr(small_tiles, f"_fwd_{name}")
        monkeypatch.setattr(small_tiles, f"_fwd_{name}",
                            lambda *a, _n=name, _r=real, **k: calls.append(_n) or _r(*a, **k))
    inp, _ = make_bdl(1, 12, 8, 4, dtype=dtype)
    with torch.no_grad():
        selective_scan(**inp, impl="triton", layout="BDL")
    assert calls == [variant]
    # storing the backward's states (training), lane for every dtype
    args = [inp[k] for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")]
    small_tiles._fwd(*args, None, True, True)
    assert calls == [variant, "lane"]
    with pytest.raises(ValueError, match="variant"):
        small_tiles._fwd(*[inp[k] for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")], None,
                         True, False, variant="segt")


@pytest.mark.triton
@pytest.mark.parametrize("tiles", [dict(BLOCK_D=8, NS=4, CHUNK=8, num_warps=1),
                                   dict(BLOCK_D=16, NS=2, CHUNK=2, num_warps=1),
                                   dict(BLOCK_D=32, NS=1, CHUNK=8, num_warps=1)],
                         ids=["E8-NS4", "E2-NS2", "E8-NS1"])
@pytest.mark.parametrize("N", [16, 6], ids=["N16", "N6"])
def test_lane_step_tiles_and_lane_splits(monkeypatch, tiles, N):
    """The lane forward at its step tiles E = 8 (the default, with 4 lanes a channel) and 2,
    with N = 6 where 4 lanes don't divide the states (2 are used), stored states included."""
    pytest.importorskip("triton")
    from mamba_decoder.kernels.selective_scan import triton_bdl
    monkeypatch.setitem(triton_bdl.FWD_TILES, "lane", tiles)
    use_variant(triton_bdl, monkeypatch, "lane")
    inp, h0 = make_bdl(1, 19, 20, N)
    args = [inp[k] for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")]
    with torch.no_grad():
        out, hf, states, chunk = triton_bdl._fwd(*args, h0, True, True, STATE_CHUNK=8)
        ref, rhf = ref_on_bdl(**inp, initial_state=h0, return_final_state=True)
        # the stored state before step 8: the reference's final state after 8 steps
        first = {k: (v[..., :8] if k in SEQ_KEYS else v) for k, v in inp.items()}
        _, h8 = ref_on_bdl(**first, initial_state=h0, return_final_state=True)
    assert rel(out, ref) <= 1e-5 and rel(hf, rhf) <= 1e-5
    assert rel(states[:, 0], h0) <= 1e-7 and rel(states[:, 1], h8) <= 1e-5


@pytest.mark.triton
@pytest.mark.parametrize("d_model,d_state,shape,dtype", [
    (24, 16, (2, 19), torch.float32),     # L not a multiple of the state chunk or the tiles
    (20, 6, (1, 37), torch.float32),      # batch 1, d_state 6 (fewer lanes a channel), ED 40
    (24, 16, (2, 19), torch.bfloat16),
], ids=["B2-L19", "B1-L37-N6", "B2-L19-bf16"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_fused_mixer_training_path_equals_reference(small_tiles, d_model, d_state, shape, dtype, residual):
    """The channel-major mixer's fused training path (one autograd Function around the Triton
    conv, scan and their backwards) against mambapy's mixer: output, the input's gradient and
    every parameter's, on random weights."""
    fused_mixer_case(d_model, d_state, shape, dtype, residual)


@pytest.mark.triton
def test_fused_mixer_training_path_with_projection_biases(small_tiles):
    """The same with biases on in_proj and out_proj and none on the conv (mambapy's bias=True,
    conv_bias=False): every bias's gradient, and none asked of the missing one."""
    fused_mixer_case(12, 8, (2, 19), torch.float32, True, bias=True, conv_bias=False)


def fused_mixer_case(d_model, d_state, shape, dtype, residual, **config):
    pytest.importorskip("mambapy")
    from mambapy.mamba import MambaConfig

    from helpers import randomize_
    from mamba_decoder.models import MambaMixer
    from mamba_decoder.policy import KernelPolicy

    cfg = MambaConfig(d_model=d_model, n_layers=1, d_state=d_state, **config)
    ref = randomize_(MambaMixer(cfg, backend="reference")).to(DEV, dtype)
    fast = MambaMixer(cfg, backend="fast", policy=KernelPolicy(mamba_fused="triton", mamba_layout="BDL")).to(DEV, dtype)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(*shape, d_model, device=DEV, dtype=dtype)
    res = torch.randn_like(x) if residual else None
    gy = torch.randn_like(x)
    out = {}
    for name, m in (("ref", ref), ("fast", fast)):
        xl = x.clone().requires_grad_(True)
        rl = res.clone().requires_grad_(True) if residual else None
        y = m(xl, residual=rl) if name == "fast" else m(xl) + (rl if residual else 0)
        if name == "fast":   # the fused Function ran, not the op-by-op autograd graph
            assert type(y.grad_fn).__name__ == "_MixerCoreTrainBackward"
        leaves = [xl, *m.parameters()] + ([rl] if residual else [])
        out[name] = (y.detach(), torch.autograd.grad(y, leaves, gy))
    tol_f, tol_g = (1e-5, 1e-4) if dtype == torch.float32 else (2e-2, 3e-2)
    assert rel(out["fast"][0], out["ref"][0]) <= tol_f
    names = ["x"] + [n for n, _ in fast.named_parameters()] + (["residual"] if residual else [])
    for n, a, b in zip(names, out["fast"][1], out["ref"][1]):
        assert a.dtype == b.dtype and rel(a, b) <= tol_g, (n, rel(a, b))


@pytest.mark.triton
@pytest.mark.parametrize("min_programs,want", [(1, "lane"), (10**9, "lane-small")])
def test_lane_backward_takes_smaller_tiles_when_the_grid_is_small(small_tiles, monkeypatch, min_programs, want):
    """Below BWD_LANE_MIN_PROGRAMS programs the backward runs lane-small's tiles; both give the
    reference's gradients."""
    monkeypatch.setattr(small_tiles, "BWD_LANE_MIN_PROGRAMS", min_programs)
    seen = []
    real = small_tiles._bdl_bwd_lane_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*a, **kw):
                seen.append(kw["BLOCK_D"])
                return real[grid](*a, **kw)
            return launch
    monkeypatch.setattr(small_tiles, "_bdl_bwd_lane_kernel", Spy())
    inp, h0 = make_bdl(1, 19, 24, 8)
    o, hf, g = run_with_grads(bdl_fn("triton"), inp, h0)
    ro, rhf, rg = run_with_grads(ref_on_bdl, inp, h0)
    assert seen == [small_tiles.BWD_TILES[want]["BLOCK_D"]]
    for k in GRAD_NAMES + ["initial_state"]:
        assert rel(g[k], rg[k]) <= 1e-3, k


def test_bwd_segments_split_time_into_whole_chunks(small_tiles):
    def seg(programs, n_chunks, segments=None, chunk=32, full=0):
        return small_tiles.time_segments(programs, n_chunks, 1024, segments, chunk, full)
    short = small_tiles.SEG_MIN_STEPS
    assert seg(1024, 256) == (1, 256)               # a full grid: one segment
    assert seg(256, 256) == (4, 64)                 # a quarter of it: four segments
    assert seg(512, 256, full=512) == (1, 256)      # full below the target: no split either
    assert seg(256, 256, full=512) == (4, 64)
    assert seg(1, 64 * short // 32) == (64, short // 32)   # none shorter than SEG_MIN_STEPS
    assert seg(256, 2 * short // 32) == (2, short // 32)
    assert seg(256, short // 32 - 1) == (1, short // 32 - 1)   # short sequences: one segment
    assert seg(1, 5, segments=2) == (2, 3)          # the last segment may be shorter
    assert seg(1, 5, segments=4) == (3, 2)          # ... and none is empty
    assert seg(1, 3, segments=10) == (3, 1)         # never more segments than state chunks
    assert seg(10**9, 5, segments=1) == (1, 5)


@pytest.mark.triton
@pytest.mark.parametrize("segments", [1, 2, 3, 5])
@pytest.mark.parametrize("opts", [pytest.param(dict(), id="gated"),
                                  pytest.param(dict(z=None, D=None, dt_bias=None), id="bare")])
def test_triton_bdl_backward_over_time_segments(small_tiles, monkeypatch, segments, opts):
    """The time-segmented backward (each segment's starting adjoint folded from the later
    segments' carries) gives the reference's gradients, the initial and final state's included,
    at every segment count: 5 state chunks of 8 steps on the CPU's small tiles, the last one
    partial (L 37)."""
    for name in ("lane", "lane-small"):
        monkeypatch.setitem(small_tiles.BWD_TILES, name,
                            {**small_tiles.BWD_TILES[name], "SEGMENTS": segments})
    calls = []
    real = small_tiles._bdl_bwd_carry_kernel

    class Spy:
        def __getitem__(self, grid):
            calls.append(grid)
            return real[grid]
    monkeypatch.setattr(small_tiles, "_bdl_bwd_carry_kernel", Spy())
    inp, h0 = make_bdl(2, 37, 20, 8)
    use = {k: v for k, v in inp.items() if opts.get(k, 0) is not None}
    names = [k for k in GRAD_NAMES if k in use]
    kw = {k: None for k in GRAD_NAMES if k not in use}
    o, hf, g = run_with_grads(bdl_fn("triton"), use, h0, names=names, **kw)
    ro, rhf, rg = run_with_grads(ref_on_bdl, use, h0, names=names, **kw)
    n_chunks = -(-37 // small_tiles.BWD_CONFIG["CHUNK"])     # 5 on the CPU's small tiles
    want_segs = small_tiles.time_segments(1, n_chunks, 1, segments)[0]
    assert [grid[1] for grid in calls] == ([2 * (want_segs - 1)] if want_segs > 1 else [])
    for k in names + ["initial_state"]:
        assert rel(g[k], rg[k]) <= 1e-4, (k, rel(g[k], rg[k]))


@pytest.mark.triton
@pytest.mark.parametrize("segments", [1, 2, 3, 5])
@pytest.mark.parametrize("with_h0", [False, True], ids=["zero-state", "initial-state"])
def test_triton_bdl_lane_forward_over_time_segments(small_tiles, monkeypatch, segments, with_h0):
    """The time-segmented lane forward (each segment's starting state folded from the earlier
    segments' carries) gives the reference's output and final state, and the backward's stored
    chunk states equal the one-segment forward's: 5 state chunks of 8 steps, the last partial."""
    tb = small_tiles
    inp, h0 = make_bdl(2, 37, 20, 8)
    h0 = h0 if with_h0 else None
    args = [inp[k] for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")]
    lane = dict(variant="lane", BLOCK_D=16, NS=2, CHUNK=4, num_warps=1)
    out1, hf1, st1, _ = tb._fwd(*args, h0, True, True, STATE_CHUNK=8, SEGMENTS=1, **lane)
    out, hf, st, _ = tb._fwd(*args, h0, True, True, STATE_CHUNK=8, SEGMENTS=segments, **lane)
    ref, rhf = ref_on_bdl(**inp, initial_state=h0, return_final_state=True)
    assert rel(out, ref) <= 1e-5 and rel(hf, rhf) <= 1e-5
    assert rel(st, st1) <= 1e-6 and rel(out, out1) <= 1e-6
    monkeypatch.setitem(tb.FWD_TILES, "lane", {**tb.FWD_TILES["lane"], "SEGMENTS": segments})
    with torch.no_grad():       # fp32 inference takes the lane forward too
        o2 = selective_scan(**inp, initial_state=h0, impl="triton", layout="BDL")
    assert rel(o2, ref) <= 1e-5


def segment_tiles(tb, monkeypatch, segments, atomic=None):
    """Force `segments` time segments on the lane forward and both backward tables (and the
    backward's ATOMIC if given)."""
    monkeypatch.setitem(tb.FWD_TILES, "lane", {**tb.FWD_TILES["lane"], "SEGMENTS": segments})
    for name in ("lane", "lane-small"):
        extra = {} if atomic is None else {"ATOMIC": atomic}
        monkeypatch.setitem(tb.BWD_TILES, name, {**tb.BWD_TILES[name], "SEGMENTS": segments, **extra})


@pytest.mark.triton
@pytest.mark.parametrize("segments", [2, 3])
@pytest.mark.parametrize("case", [
    pytest.param(dict(N=6, atomic=False, h0=True, final=True), id="N6-partials-h0"),
    pytest.param(dict(N=8, atomic=True, h0=False, final=False), id="no-state-grads"),
])
def test_lane_backward_segments_partials_and_missing_states(small_tiles, monkeypatch, segments, case):
    """Time segments with the per-program partials (ATOMIC=False, the full 'lane' table), d_state 6,
    and without an initial state or a final state's gradient (the fold starts from zero)."""
    tb = small_tiles
    monkeypatch.setattr(tb, "BWD_LANE_MIN_PROGRAMS", 1)       # the 'lane' table
    segment_tiles(tb, monkeypatch, segments, atomic=case["atomic"])
    inp, h0 = make_bdl(2, 37, 20, case["N"])
    h0 = h0 if case["h0"] else None

    def fn(impl):
        def run(**kw):
            out, hf = (bdl_fn(impl) if impl == "triton" else ref_on_bdl)(**kw)
            return out, (hf if case["final"] else hf.detach() * 0)
        return run
    o, hf, g = run_with_grads(fn("triton"), inp, h0)
    ro, rhf, rg = run_with_grads(fn("reference"), inp, h0)
    assert rel(o, ro) <= 1e-5
    for k in GRAD_NAMES + (["initial_state"] if h0 is not None else []):
        assert rel(g[k], rg[k]) <= 1e-4, (k, rel(g[k], rg[k]))


@pytest.mark.triton
def test_fused_mixer_training_path_over_time_segments(small_tiles, monkeypatch):
    """The fused mixer with its forward and backward split into 3 time segments (5 state chunks,
    the last partial; batch 2, d_state 6): dz into half of dxz, y rebuilt, ddt over dt and dA_log
    in the sums buffer."""
    segment_tiles(small_tiles, monkeypatch, 3)
    fused_mixer_case(12, 6, (2, 37), torch.float32, True)


@pytest.mark.triton
@pytest.mark.parametrize("small_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "mixed"])
def test_fused_mixer_small_grads_do_not_hold_the_sums_buffer(small_tiles, small_dtype):
    """The small parameters' grads come from one fp32 sums buffer whose bulk is dB and dC
    (B, 2N, L): where no cast is needed (fp32 parameters) they must still be their own tensors,
    not views keeping that buffer alive for as long as .grad lives."""
    pytest.importorskip("mambapy")
    from mambapy.mamba import MambaConfig

    from mamba_decoder.models import MambaMixer
    from mamba_decoder.policy import KernelPolicy

    cfg = MambaConfig(d_model=20, n_layers=1, d_state=6)
    m = MambaMixer(cfg, backend="fast", policy=KernelPolicy(mamba_fused="triton", mamba_layout="BDL")).to(DEV)
    if small_dtype != torch.float32:        # bf16 weights, fp32 A_log / D / dt bias
        m.to(small_dtype)
        for p in (m.A_log, m.D, m.dt_proj.bias):
            p.data = p.data.float()
    # B * 2N * L * 4 bytes of sums (7.7 KB) above the bound below for A_log (960 B): a view shows
    x = torch.randn(2, 80, 20, device=DEV, dtype=small_dtype, requires_grad=True)
    y = m(x)
    assert type(y.grad_fn).__name__ == "_MixerCoreTrainBackward"
    y.float().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad.dtype == p.dtype, name
        assert p.grad.untyped_storage().nbytes() <= 2 * p.numel() * p.element_size() + 4096, name


@pytest.mark.triton
def test_scan_backward_small_grads_do_not_hold_the_sums_buffer(small_tiles):
    """The same for the scan's own autograd node: fp32 leaves A, D and dt_bias get grads of
    their own size, not views of the (B, 2N, L) sums."""
    inp, _ = make_bdl(1, 16, 20, 8)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inp.items()}
    bdl_fn("triton")(**leaves).sum().backward()
    for k in ("A", "D", "dt_bias"):
        g = leaves[k].grad
        assert g.untyped_storage().nbytes() == g.numel() * g.element_size(), k


@pytest.fixture
def deterministic():
    """torch.use_deterministic_algorithms for one test: set(warn_only) -> the caller's mode back after."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())

    def set_(warn_only: bool):
        torch.use_deterministic_algorithms(True, warn_only=warn_only)
    yield set_
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@pytest.mark.triton
def test_atomic_backwards_keep_torchs_determinism_contract(small_tiles, deterministic):
    """The Triton scan and conv backwards add gradients atomically (last bits vary run to run):
    under torch.use_deterministic_algorithms(True) they raise, as torch's own such ops do, and
    with warn_only=True they warn and run; the forward alone is never refused."""
    from mamba_decoder.kernels.causal_conv import causal_conv1d_silu

    inp, _ = make_bdl(1, 12, 8, 4)
    leaves = {k: v.clone().requires_grad_(k in ("x", "dt")) for k, v in inp.items()}
    w = torch.randn(8, 4, device=DEV, requires_grad=True)
    deterministic(False)
    with torch.no_grad():
        selective_scan(**inp, impl="triton", layout="BDL")             # forward only: runs
    out = selective_scan(**leaves, impl="triton", layout="BDL")
    with pytest.raises(RuntimeError, match="selective-scan backward does not have a deterministic"):
        out.sum().backward()
    y = causal_conv1d_silu(inp["x"], w)
    with pytest.raises(RuntimeError, match="causal-conv backward does not have a deterministic"):
        y.sum().backward()
    deterministic(True)
    with pytest.warns(UserWarning, match="selective-scan backward does not have a deterministic"):
        selective_scan(**leaves, impl="triton", layout="BDL").sum().backward()
    assert leaves["x"].grad is not None
