"""The fused Mamba decode-step kernels (conv step, SSM step) against their PyTorch twins.

Triton runs under TRITON_INTERPRET=1 on CPU tensors without a GPU. fp32 <= 1e-5; bf16 inputs
against the fp32 twin on the same values <= 2e-2. Inputs are strided the way the mixer hands
them over: x, z halves of one (B, 2 ED) in_proj output, B, C slices of one (B, R + 2N) x_proj
output.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any triton import

from helpers import rel_err  # noqa: E402

from mamba_decoder.kernels import mamba_step as MS  # noqa: E402

pytestmark = pytest.mark.triton
DEV = "cuda" if torch.cuda.is_available() else "cpu"
F32, BF16 = torch.float32, torch.bfloat16


def _conv_inputs(Bsz, ED, K, dtype, bias=True):
    xz = torch.randn(Bsz, 2 * ED, device=DEV)
    state = torch.randn(Bsz, ED, K - 1, device=DEV)
    w = torch.randn(ED, K, device=DEV) / K ** 0.5
    b = torch.randn(ED, device=DEV) if bias else None
    cast = (lambda t: t.to(dtype) if t is not None else None)
    return cast(xz)[:, :ED], cast(state), cast(w), cast(b)              # x: a strided half


def _ssm_inputs(Bsz, ED, N, dtype, R=5):
    xz = torch.randn(Bsz, 2 * ED, device=DEV).to(dtype)                 # cast, then slice
    dbc = torch.randn(Bsz, R + 2 * N, device=DEV).to(dtype)
    inp = dict(dt=torch.randn(Bsz, ED, device=DEV) - 1.0, A_log=torch.rand(ED, N, device=DEV) * 2 - 1,
               D=torch.randn(ED, device=DEV), dt_bias=0.5 * torch.randn(ED, device=DEV))
    inp = {k: v.to(dtype) for k, v in inp.items()}
    inp.update(x=xz[:, :ED], z=xz[:, ED:], B=dbc[:, R:R + N], C=dbc[:, R + N:])
    assert inp["x"].stride() == (2 * ED, 1) and inp["C"].stride() == (R + 2 * N, 1)
    h = torch.randn(Bsz, ED, N, device=DEV)                             # the state stays fp32
    return inp, h


CONV_CASES = [(1, 40, 4), (3, 100, 4), (3, 40, 2), (2, 130, 3)]  # (B, ED, K): ED past one block


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "B{}-ED{}-K{}".format(*c))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_conv_step_equals_twin_fp32(case, bias):
    x, state, w, b = _conv_inputs(*case, F32, bias)
    s_ref, s_got = state.clone(), state.clone()
    want = MS.conv_step_torch(x, s_ref, w, b)
    got = MS.conv_step(x, s_got, w, b)
    assert got.dtype == F32 and rel_err(got, want) < 1e-5
    assert torch.equal(s_got, s_ref)                                     # shifted in place
    assert torch.equal(s_got[:, :, -1], x) and not torch.equal(s_got, state)


@pytest.mark.parametrize("case", CONV_CASES[:3], ids=lambda c: "B{}-ED{}-K{}".format(*c))
def test_conv_step_bf16_follows_fp32(case):
    x, state, w, b = _conv_inputs(*case, BF16)
    s32, s16 = state.float(), state.clone()
    want = MS.conv_step_torch(x.float(), s32, w.float(), b.float())
    got = MS.conv_step(x, s16, w, b)
    assert got.dtype == BF16 and rel_err(got, want) < 2e-2
    assert torch.equal(s16.float(), s32)                                 # a shift: exact in bf16


def test_conv_step_takes_conv1d_weight_layout():
    x, state, w, b = _conv_inputs(2, 40, 4, F32)
    s1, s2 = state.clone(), state.clone()
    assert torch.equal(MS.conv_step(x, s1, w.unsqueeze(1), b), MS.conv_step(x, s2, w, b))


SSM_CASES = [(1, 40, 16), (3, 100, 16), (3, 40, 5), (2, 130, 16)]  # (B, ED, N): N=5 not a power of 2


@pytest.mark.parametrize("case", SSM_CASES, ids=lambda c: "B{}-ED{}-N{}".format(*c))
@pytest.mark.parametrize("gate,bias", [(True, True), (False, False), (True, False)],
                         ids=["z-bias", "noz-nobias", "z-nobias"])
def test_ssm_step_equals_twin_fp32(case, gate, bias):
    inp, h = _ssm_inputs(*case, F32)
    z, dt_bias = inp.pop("z"), inp.pop("dt_bias")
    z, dt_bias = (z if gate else None), (dt_bias if bias else None)
    want, h_want = MS.ssm_step_torch(**inp, h=h, dt_bias=dt_bias, z=z)
    h_got = h.clone()
    got = MS.ssm_step(**inp, h=h_got, dt_bias=dt_bias, z=z)
    assert got.dtype == F32 and rel_err(got, want) < 1e-5
    assert rel_err(h_got, h_want) < 1e-5 and rel_err(h_got, h) > 1e-2   # updated in place


@pytest.mark.parametrize("case", SSM_CASES[:3], ids=lambda c: "B{}-ED{}-N{}".format(*c))
def test_ssm_step_bf16_follows_fp32(case):
    inp, h = _ssm_inputs(*case, BF16)
    want, h_want = MS.ssm_step_torch(**{k: v.float() for k, v in inp.items()}, h=h)
    h_got = h.clone()
    got = MS.ssm_step(**inp, h=h_got)
    assert got.dtype == BF16 and h_got.dtype == F32
    assert rel_err(got, want) < 2e-2 and rel_err(h_got, h_want) < 2e-2


def test_ssm_step_softplus_is_accurate_at_the_tails():
    """delta = softplus(dt + dt_bias) to fp32 accuracy where log(1 + exp(u)) alone is not
    (u << 0: log1p) and where torch returns u itself (u > 20). With h = 0, D = 0 and B = C = 1,
    y = delta * x * N, so y measures delta elementwise."""
    Bsz, ED, N = 2, 8, 4
    dt = torch.tensor([-30.0, -15.0, -9.0, -2.0, 0.0, 3.0, 19.0, 25.0], device=DEV).repeat(Bsz, 1)
    x = torch.ones(Bsz, ED, device=DEV)
    ones = torch.ones(Bsz, N, device=DEV)
    args = dict(A_log=torch.zeros(ED, N, device=DEV), B=ones, C=ones, D=torch.zeros(ED, device=DEV))
    want, _ = MS.ssm_step_torch(x, dt, h=torch.zeros(Bsz, ED, N, device=DEV), **args)
    got = MS.ssm_step(x, dt, h=torch.zeros(Bsz, ED, N, device=DEV), **args)
    assert ((got - want).abs() / want.abs()).max() < 1e-5


def test_ssm_step_rejects_a_16_bit_state():
    inp, h = _ssm_inputs(2, 40, 16, F32)
    with pytest.raises(ValueError, match="fp32"):
        MS.ssm_step(**inp, h=h.bfloat16())


def test_steps_chain_like_the_twin():
    """Ten conv + SSM steps in a row: the in-place caches carry the sequence like the twin's."""
    Bsz, ED, N, K = 3, 40, 16, 4
    _, state, w, b = _conv_inputs(Bsz, ED, K, F32)
    inp, h = _ssm_inputs(Bsz, ED, N, F32)
    caches = {"twin": (state.clone(), h.clone()), "triton": (state.clone(), h.clone())}
    for _ in range(10):
        x, dt, z = torch.randn(Bsz, ED), torch.randn(Bsz, ED) - 1, torch.randn(Bsz, ED)
        out = {}
        for name, (s, hh) in caches.items():
            step_in = dict(dt=dt, A_log=inp["A_log"], B=inp["B"], C=inp["C"], D=inp["D"],
                           dt_bias=inp["dt_bias"], z=z)
            if name == "twin":
                xc = MS.conv_step_torch(x, s, w, b)
                out[name], h_new = MS.ssm_step_torch(xc, h=hh, **step_in)
                hh.copy_(h_new)
            else:
                xc = MS.conv_step(x, s, w, b)
                out[name] = MS.ssm_step(xc, h=hh, **step_in)
        assert rel_err(out["triton"], out["twin"]) < 1e-5
    assert torch.equal(caches["triton"][0], caches["twin"][0])
    assert rel_err(caches["triton"][1], caches["twin"][1]) < 1e-5
