"""The Triton causal depthwise conv1d + SiLU (channel-major) against its PyTorch twin.

Triton runs under TRITON_INTERPRET=1 on CPU tensors without a GPU. fp32 <= 1e-5; bf16 inputs
against the fp32 twin on the same values <= 2e-2; gradients (the backward recomputes with
PyTorch) <= 1e-5. Small BLOCK_L overrides give several time tiles at small L, so the halo
across tiles and the state reads of the first tile are both exercised.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any triton import

from helpers import rel_err  # noqa: E402

from mamba_decoder.kernels.causal_conv import causal_conv1d_silu, causal_conv1d_silu_torch  # noqa: E402

pytestmark = pytest.mark.triton
DEV = "cuda" if torch.cuda.is_available() else "cpu"
F32, BF16 = torch.float32, torch.bfloat16
SMALL = dict(BLOCK_D=16, BLOCK_L=32, num_warps=2)

# (B, ED, L, K): batch 1 and 3, ED not a power of two, L not a multiple of the block (also
# below K-1, where the new state keeps old state columns), K = 4 and 2
CASES = [(1, 40, 100, 4), (3, 100, 37, 4), (3, 40, 70, 2), (2, 24, 2, 4), (1, 16, 1, 2)]


def _ids(c):
    return "B{}-ED{}-L{}-K{}".format(*c)


def _inputs(Bsz, ED, L, K, dtype=F32, bias=True):
    x = torch.randn(Bsz, ED, L, device=DEV)
    w = torch.randn(ED, K, device=DEV) / K ** 0.5
    b = torch.randn(ED, device=DEV) if bias else None
    s0 = torch.randn(Bsz, ED, K - 1, device=DEV)
    cast = (lambda t: t.to(dtype) if t is not None else None)
    return cast(x), cast(w), cast(b), cast(s0)


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("state", ["none", "initial", "in-place"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_conv_equals_twin_fp32(case, state, bias):
    x, w, b, s0 = _inputs(*case, bias=bias)
    init = None if state == "none" else s0
    f_ref = torch.full_like(s0, float("nan"))
    if state == "in-place":          # the cache path: the new window overwrites the old one
        s_ref, s_got = s0.clone(), s0.clone()
        want = causal_conv1d_silu_torch(x, w, b, s_ref, s_ref)
        got = causal_conv1d_silu(x, w, b, s_got, s_got, **SMALL)
        f_ref, f_got = s_ref, s_got
    else:
        f_got = torch.full_like(s0, float("nan"))
        want = causal_conv1d_silu_torch(x, w, b, init, f_ref)
        got = causal_conv1d_silu(x, w, b, init, f_got, **SMALL)
    assert got.dtype == F32 and got.shape == x.shape
    assert rel_err(got, want) < 1e-5
    assert torch.equal(f_got, f_ref)                     # copies of inputs: exact
    if case[2] >= case[3] - 1:
        assert torch.equal(f_got, x[:, :, x.shape[2] - (case[3] - 1):])


@pytest.mark.parametrize("case", CASES[:3], ids=_ids)
def test_conv_bf16_follows_fp32(case):
    x, w, b, s0 = _inputs(*case, dtype=BF16)
    want = causal_conv1d_silu_torch(x.float(), w.float(), b.float(), s0.float())
    s = s0.clone()
    got = causal_conv1d_silu(x, w, b, s, s)
    assert got.dtype == BF16 and rel_err(got, want) < 2e-2
    assert torch.equal(s, x[:, :, -(case[3] - 1):])


def test_conv_default_tiles_and_conv1d_weight_layout():
    """The default (GPU) tile config, several time tiles; conv1d's (ED, 1, K) weight."""
    x, w, b, s0 = _inputs(2, 20, 600, 4)
    want = causal_conv1d_silu_torch(x, w, b, s0)
    assert rel_err(causal_conv1d_silu(x, w.unsqueeze(1), b, s0), want) < 1e-5


def test_conv_reads_strided_inputs():
    """x a channel slice of a larger tensor and a non-contiguous state: read by stride."""
    big = torch.randn(3, 50, 90, device=DEV)
    x = big[:, 5:45]
    _, w, b, _ = _inputs(3, 40, 90, 4)
    s0 = torch.randn(3, 4, 40, device=DEV).transpose(1, 2)[:, :, :3]     # (3, 40, 3), strided
    want = causal_conv1d_silu_torch(x, w, b, s0)
    assert rel_err(causal_conv1d_silu(x, w, b, s0, **SMALL), want) < 1e-5


def test_conv_matches_the_mixers_conv1d():
    """The twin is conv1d(padding K-1)[:L] + SiLU, what MambaMixer's nn.Conv1d computes."""
    conv = torch.nn.Conv1d(40, 40, 4, groups=40, padding=3).to(DEV)
    x = torch.randn(2, 40, 33, device=DEV)
    want = torch.nn.functional.silu(conv(x)[:, :, :33])
    assert rel_err(causal_conv1d_silu(x, conv.weight, conv.bias, **SMALL), want) < 1e-5


@pytest.mark.parametrize("case", [(2, 40, 70, 4), (3, 24, 2, 4), (1, 16, 45, 2)], ids=_ids)
@pytest.mark.parametrize("with_state", [False, True], ids=["nostate", "state"])
def test_conv_gradients_equal_twin(case, with_state):
    x, w, b, s0 = _inputs(*case)
    gy = torch.randn_like(x)
    grads = {}
    for name, fn in (("twin", causal_conv1d_silu_torch),
                     ("triton", lambda *a: causal_conv1d_silu(*a, **SMALL))):
        leaves = [t.clone().requires_grad_() for t in (x, w, b, s0)]
        y = fn(*leaves[:3], leaves[3] if with_state else None)
        (y * gy).sum().backward()
        grads[name] = [t.grad for t in leaves]
    for i, name in enumerate(["x", "weight", "bias", "initial_state"]):
        want, got = grads["twin"][i], grads["triton"][i]
        if not with_state and name == "initial_state":
            assert got is None and want is None
            continue
        assert rel_err(got, want) < 1e-5, name


def test_conv_gradient_with_an_in_place_cache_update():
    """With autograd on, updating the state in place must not corrupt the backward, which
    recomputes from the state the forward read."""
    x, w, b, s0 = _inputs(2, 24, 20, 4)
    gy = torch.randn_like(x)
    xr = x.clone().requires_grad_()
    (causal_conv1d_silu_torch(xr, w, b, s0.clone()) * gy).sum().backward()
    xt, cache = x.clone().requires_grad_(), s0.clone()
    y = causal_conv1d_silu(xt, w, b, cache, cache, **SMALL)
    (y * gy).sum().backward()
    assert rel_err(xt.grad, xr.grad) < 1e-5
    assert torch.equal(cache, x[:, :, -3:])


def test_conv_rejects_a_wrong_state_shape():
    x, w, b, s0 = _inputs(2, 24, 20, 4)
    with pytest.raises(ValueError, match="initial_state"):
        causal_conv1d_silu(x, w, b, s0[:, :, :2])


@pytest.mark.parametrize("case", [(2, 40, 70, 4), (1, 24, 3, 4), (3, 17, 45, 2)], ids=_ids)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_conv_triton_backward_tiles(case, bias, monkeypatch):
    """The Triton backward (no initial state) at tiles smaller than L, so the K-1 halo of ds
    crosses time tiles and dw / db sum partials of several tiles; ED not a multiple of BLOCK_D."""
    from mamba_decoder.kernels import causal_conv as cc
    monkeypatch.setattr(cc, "CONV_BWD_CONFIG", dict(BLOCK_D=16, BLOCK_L=16, num_warps=2))
    x, w, b, _ = _inputs(*case, bias=bias)
    gy = torch.randn_like(x)
    dx, dw, db = cc._launch_bwd(x, w, b, gy)
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    (causal_conv1d_silu_torch(*leaves) * gy).sum().backward()
    assert rel_err(dx, leaves[0].grad) < 1e-5
    assert rel_err(dw, leaves[1].grad) < 1e-5
    if bias:
        assert rel_err(db, leaves[2].grad) < 1e-5
    else:
        assert db is None


def test_conv_triton_backward_bf16():
    """bf16 activations and weights: gradients against the fp32 twin on the same values."""
    x, w, b, _ = _inputs(2, 40, 70, 4, dtype=BF16)
    gy = torch.randn_like(x)
    got = [t.clone().requires_grad_() for t in (x, w, b)]
    (causal_conv1d_silu(*got, **SMALL).float() * gy.float()).sum().backward()
    want = [t.float().clone().requires_grad_() for t in (x, w, b)]
    (causal_conv1d_silu_torch(*want) * gy.float()).sum().backward()
    for name, g, r in zip(("x", "weight", "bias"), got, want):
        assert g.grad.dtype == BF16
        assert rel_err(g.grad, r.grad) < 2e-2, name
