"""The MoE against open_kimi's, and the fast routed-expert paths against the loop."""
import pytest
import torch
from helpers import randomize_, rel_err
from open_kimi.moe import MoE as KimiMoE
from pydantic import ValidationError

from mamba_decoder import MoEConfig
from mamba_decoder.kernels import moe as K
from mamba_decoder.models import MoE


def _pair(dim=32, E=6, k=2, inter=48, shared=40):
    theirs = randomize_(KimiMoE(dim, E, k, inter, shared))
    ours = MoE(dim, E, k, inter, shared, backend="reference")
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


@pytest.mark.parametrize("shape", [(2, 16), (1, 33), (3, 5)], ids=lambda s: "B{}-L{}".format(*s))
def test_reference_equals_open_kimi(shape):
    ours, theirs = _pair()
    x = torch.randn(*shape, 32)
    assert rel_err(ours(x), theirs(x)) < 1e-6


def test_state_dict_names_are_open_kimis():
    ours, theirs = _pair()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert "gate.adaptive_bias" in ours.state_dict() and "experts.5.w3.weight" in ours.state_dict()


@pytest.mark.parametrize("impl", ["grouped_mm", "dense", "loop"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_routed_impls_equal_loop(impl, dtype, tol):
    if impl == "grouped_mm" and not K.grouped_mm_works("cpu", None, dtype):
        pytest.skip("torch._grouped_mm unavailable for this dtype on CPU")
    T, D, E, I, k = 45, 24, 5, 40, 2
    x = torch.randn(T, D)
    w = torch.rand(T, k).softmax(-1)
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    w1, w3 = torch.randn(E, I, D) / D ** 0.5, torch.randn(E, I, D) / D ** 0.5
    w2 = torch.randn(E, D, I) / I ** 0.5
    want = K.routed_loop(x, w, idx, w1, w2, w3)
    got = K.routed_experts(*(t.to(dtype) if t.is_floating_point() else t
                             for t in (x, w, idx, w1, w2, w3)), impl=impl)
    assert rel_err(got, want) < tol


def test_routed_handles_an_expert_with_no_tokens():
    T, D, E, I = 12, 16, 4, 32
    x, w = torch.randn(T, D), torch.rand(T, 2)
    idx = torch.stack([torch.tensor([0, 2])] * T)  # experts 1 and 3 idle
    ws = torch.randn(E, I, D), torch.randn(E, D, I), torch.randn(E, I, D)
    want = K.routed_loop(x, w, idx, *ws)
    assert rel_err(K.routed_experts(x, w, idx, *ws, impl="dense"), want) < 1e-5
    if K.grouped_mm_works("cpu", None, torch.float32):
        assert rel_err(K.routed_experts(x, w, idx, *ws, impl="grouped_mm"), want) < 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_fast_moe_equals_reference(dtype, tol):
    ref, _ = _pair()
    fast = MoE(32, 6, 2, 48, 40, backend="fast")
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(3, 17, 32, dtype=dtype)
    ref, fast = ref.to(dtype), fast.to(dtype)
    # Same dtype on both sides: a bf16 router may pick other experts than an fp32 one on near
    # ties, and that is not the fast path's doing. The routing itself must be identical.
    assert torch.equal(fast.route(x.view(-1, 32))[1], ref.gate(x.view(-1, 32))[1])
    assert rel_err(fast(x), ref(x)) < tol


def test_fast_routing_and_training_bias_update_equal_open_kimi():
    ref, theirs = _pair()
    fast = MoE(32, 6, 2, 48, 40, backend="fast")
    fast.load_state_dict(ref.state_dict())
    theirs.train(), fast.train()
    x = torch.randn(4, 9, 32)
    w_t, i_t = theirs.gate(x.view(-1, 32))
    w_f, i_f = fast.route(x.view(-1, 32))
    assert torch.equal(i_f, i_t) and rel_err(w_f, w_t) < 1e-6
    for name in ("adaptive_bias", "expert_usage"):
        assert rel_err(getattr(fast.gate, name), getattr(theirs.gate, name)) < 1e-6, name


def test_fast_moe_gradients_equal_reference():
    ref, _ = _pair()
    fast = MoE(32, 6, 2, 48, 40, backend="fast")
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 13, 32)
    g = torch.randn_like(x)
    (ref(x) * g).sum().backward()
    (fast(x) * g).sum().backward()
    for (name, pr), (_, pf) in zip(ref.named_parameters(), fast.named_parameters()):
        if pr.grad is None:
            assert pf.grad is None or pf.grad.abs().max() == 0, name
            continue
        assert rel_err(pf.grad, pr.grad) < 1e-5, name


def test_inference_weight_cache_follows_in_place_updates():
    ref, _ = _pair()
    fast = MoE(32, 6, 2, 48, 40, backend="fast")
    fast.load_state_dict(ref.state_dict())
    ref.eval(), fast.eval()  # in train mode every forward moves the routing bias
    x = torch.randn(2, 8, 32)
    with torch.no_grad():
        fast(x)
        for m in (ref, fast):
            m.experts[1].w2.weight.mul_(2.0)
        assert rel_err(fast(x), ref(x)) < 1e-5


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_experts=2, n_activated=3), "n_activated=3 must be <= n_experts=2"),
    (dict(n_experts=0), "n_experts"),
    (dict(dim=-4), "dim"),
    (dict(bias_update_rate=0), "bias_update_rate"),
])
def test_config_is_validated(kwargs, match):
    with pytest.raises(ValidationError, match=match):
        MoEConfig(**kwargs)


def test_config_defaults():
    c = MoEConfig()
    assert (c.dim, c.n_experts, c.n_activated) == (512, 6, 2)
