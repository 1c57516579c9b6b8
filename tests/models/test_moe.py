"""The MoE against open_kimi's, and the fast routed-expert paths against the loop."""
import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_, rel_err
from open_kimi.moe import MoE as KimiMoE
from pydantic import ValidationError

from mamba_decoder import MoEConfig
from mamba_decoder.kernels import moe as K
from mamba_decoder.models import MoE
from mamba_decoder.policy import KernelPolicy

TRITON = KernelPolicy(moe_triton="triton")   # the MoE's Triton passes, forced (CPU tensors: interpreted)


def stack_dense_small(w1s, w2s, w3s):
    """routed_dense_small's weight layout built independently of the model: W13 (E' * 2I, D) =
    [w1_0; w3_0; w1_1; w3_1; ...], W2 (D, E' * I) = [w2_0, w2_1, ...]."""
    return torch.cat([w for pair in zip(w1s, w3s) for w in pair], dim=0), torch.cat(list(w2s), dim=1)


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


@pytest.mark.parametrize("shape", [(3, 17), (5, 17)], ids=["dense-small-T51", "routed-T85"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_fast_moe_equals_reference(dtype, tol, shape):
    ref, _ = _pair()
    fast = MoE(32, 6, 2, 48, 40, backend="fast")
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(*shape, 32, dtype=dtype)
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


@pytest.mark.parametrize("shared,shape", [(40, (2, 13)), (48, (2, 13)), (48, (5, 17))],
                         ids=["dense-small", "dense-small-folded", "routed"])
def test_fast_moe_gradients_equal_reference(shared, shape):
    ref, _ = _pair(shared=shared)
    fast = MoE(32, 6, 2, 48, shared, backend="fast")
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(*shape, 32)
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


# -- dense-small: every expert on every token, weighted by a dense gate (few tokens: decoding)

def _experts(E, D, I, dtype=torch.float32):
    w1, w3 = torch.randn(E, I, D) / D ** 0.5, torch.randn(E, I, D) / D ** 0.5
    w2 = torch.randn(E, D, I) / I ** 0.5
    return tuple(t.to(dtype) for t in (w1, w2, w3))


def _picks(T, E, k):
    w = torch.rand(T, k).softmax(-1)
    return w, torch.stack([torch.randperm(E)[:k] for _ in range(T)])


@pytest.mark.parametrize("T", [1, 5, 64])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_dense_small_equals_loop(T, dtype, tol):
    D, E, I, k = 24, 5, 40, 2
    x, (w, idx), ws = torch.randn(T, D), _picks(T, E, k), _experts(E, D, I)
    want = K.routed_loop(x, w, idx, *ws)
    w1, w2, w3 = (t.to(dtype) for t in ws)
    got = K.routed_dense_small(x.to(dtype), w.to(dtype), idx, E, 0, *stack_dense_small(w1, w2, w3))
    assert got.dtype == dtype and rel_err(got, want) < tol


def test_dense_small_folds_an_always_on_expert():
    """The shared expert as expert E with gate 1: routed experts + shared expert."""
    T, D, E, I, k = 7, 24, 5, 40, 2
    x, (w, idx), ws = torch.randn(T, D), _picks(T, E, k), _experts(E, D, I)
    sw1, sw2, sw3 = _experts(1, D, I)
    want = K.routed_loop(x, w, idx, *ws) + (F.silu(x @ sw1[0].t()) * (x @ sw3[0].t())) @ sw2[0].t()
    stacked = stack_dense_small(*(torch.cat([a, b]) for a, b in zip(ws, (sw1, sw2, sw3))))
    got = K.routed_dense_small(x, w, idx, E, 1, *stacked)
    assert rel_err(got, want) < 1e-5


@pytest.mark.triton
@pytest.mark.parametrize("T,E,fold,I", [(1, 6, 1, 40), (9, 5, 0, 48), (70, 6, 1, 1100)],
                         ids=["T1-fold", "T9-nofold", "T70-I1100"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
def test_gated_swiglu_triton_equals_twin(monkeypatch, T, E, fold, I, dtype, tol):
    """The one-pass Triton gated SwiGLU of dense-small against its PyTorch twin (dense gate,
    silu, products), fresh random inputs; I > 1024 spans two column blocks."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    from mamba_decoder.kernels.moe_triton import gated_swiglu_triton
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    w, idx = _picks(T, E, 2)
    H = torch.randn(T, (E + fold) * 2 * I).to(dev, dtype)
    w, idx = w.to(dev, dtype), idx.to(dev)
    want = K.gated_swiglu(H, w, idx, E, fold)
    got = gated_swiglu_triton(H, w, idx, E, fold)
    assert got.shape == (T, (E + fold) * I) and got.dtype == dtype
    assert rel_err(got, want) < tol
    # unpicked experts are exactly zero
    picked = torch.zeros(T, E + fold, dtype=torch.bool, device=dev).scatter(1, idx, True)
    if fold:
        picked[:, E] = True
    assert torch.all(got.view(T, E + fold, I)[~picked] == 0)


def test_dense_gate_is_exactly_zero_off_the_picks():
    T, E, k = 9, 6, 2
    w, idx = _picks(T, E, k)
    gate = K.dense_gate(w, idx, E, n_always_on=1)
    assert gate.shape == (T, E + 1) and torch.equal(gate[:, E], torch.ones(T))
    picked = torch.zeros(T, E, dtype=torch.bool).scatter(1, idx, True)
    assert torch.equal(gate[:, :E][~picked], torch.zeros(int((~picked).sum())))
    assert torch.equal(gate[:, :E].gather(1, idx), w)


def _fast_like(theirs, **kw):
    fast = MoE(theirs.dim, theirs.n_experts, theirs.n_activated, theirs.expert_inter_dim,
               theirs.shared_expert_inter_dim, backend="fast", **kw)
    fast.load_state_dict(theirs.state_dict(), strict=True)
    return fast


@pytest.mark.parametrize("shared", [40, 48, None], ids=["separate-shared", "folded-shared", "default-shared"])
@pytest.mark.parametrize("shape", [(8, 1), (1, 1), (4, 16)], ids=["decode-B8", "decode-B1", "T64"])
@pytest.mark.parametrize("train", [True, False], ids=["train-mode", "eval"])
def test_dense_small_moe_equals_open_kimi(shared, shape, train, monkeypatch):
    """The fast MoE takes dense-small for few tokens (counted) and equals open_kimi's loop, with a
    random adaptive bias (randomize_) routing the tokens: in train mode from route()'s picks
    (which move the bias), in eval from the router's scores (scored_dense_small)."""
    theirs = randomize_(KimiMoE(32, 6, 2, 48, shared)).train(train)
    assert theirs.gate.adaptive_bias.abs().min() > 0
    fast = _fast_like(theirs).train(train)
    assert fast.folds_shared_expert() == (shared != 40)
    calls = []
    path = "routed_dense_small" if train else "scored_dense_small"
    real = getattr(K, path)
    monkeypatch.setattr(K, path, lambda *a: calls.append(1) or real(*a))
    x = torch.randn(*shape, 32)
    with torch.no_grad():
        assert rel_err(fast(x), theirs(x)) < 1e-5
    assert calls == [1]


def test_dense_small_off_above_the_threshold(monkeypatch):
    theirs = randomize_(KimiMoE(32, 6, 2, 48, 48))
    fast = _fast_like(theirs)
    monkeypatch.setattr(K, "routed_dense_small", None)   # would fail if called
    monkeypatch.setattr(K, "scored_dense_small", None)
    x = torch.randn(1, K.dense_small_max_tokens(torch.device("cpu")) + 1, 32)
    with torch.no_grad():
        assert rel_err(fast(x), theirs(x)) < 1e-5
        theirs.eval(), fast.eval()
        assert rel_err(fast(x), theirs(x)) < 1e-5


def test_dense_small_with_routing_ties_equals_open_kimi():
    """Experts 0 and 1 (and 2 and 3) with identical gate rows and biases: equal probabilities,
    so top-k breaks ties; the fast path must route (and weigh) exactly like open_kimi."""
    theirs = randomize_(KimiMoE(32, 6, 2, 48, 48))
    with torch.no_grad():
        g = theirs.gate
        g.gate_weight[1] = g.gate_weight[0]
        g.gate_weight[3] = g.gate_weight[2]
        g.adaptive_bias[1] = g.adaptive_bias[0]
        g.adaptive_bias[3] = g.adaptive_bias[2]
    fast = _fast_like(theirs)
    x = torch.randn(8, 1, 32)
    with torch.no_grad():
        w, idx = fast.route(x.view(-1, 32))
        assert torch.equal(idx, theirs.gate(x.view(-1, 32))[1])
        assert (w[:, 0] == w[:, 1]).any()                   # some token took a tied pair
        assert rel_err(fast(x), theirs(x)) < 1e-5


def test_dense_small_training_forward_and_bias_update_equal_open_kimi():
    theirs = randomize_(KimiMoE(32, 6, 2, 48, 48)).train()
    fast = _fast_like(theirs).train()
    for _ in range(3):                                      # the bias moves every forward
        x = torch.randn(8, 1, 32)
        assert rel_err(fast(x), theirs(x)) < 1e-5
    for name in ("adaptive_bias", "expert_usage"):
        assert rel_err(getattr(fast.gate, name), getattr(theirs.gate, name)) < 1e-6, name


def test_dense_small_weight_cache_follows_the_shared_expert():
    theirs = randomize_(KimiMoE(32, 6, 2, 48, 48)).eval()
    fast = _fast_like(theirs).eval()
    x = torch.randn(8, 1, 32)
    with torch.no_grad():
        W13, _ = fast.dense_small_weights()
        assert fast.dense_small_weights()[0].data_ptr() == W13.data_ptr()   # cached in inference
        assert W13.data_ptr() == fast.grouped_weights()[3].data_ptr()       # one copy, shared
        fast(x)
        for m in (theirs, fast):
            m.shared_expert.w3.weight.mul_(-1.5)
        assert rel_err(fast(x), theirs(x)) < 1e-5


def test_kernel_choice_names_both_paths():
    fast = MoE(32, 6, 2, 48, 48, backend="fast")
    choice = fast.kernel_choice(torch.device("cpu"), torch.float32)["moe"]
    n = K.dense_small_max_tokens(torch.device("cpu"))
    impl = K.auto_impl(torch.device("cpu"), torch.float32)
    train = "; train: grouped Function, swiglu=torch" if impl == "grouped_mm" else ""
    if impl == "grouped_mm" and fast.policy.decide(torch.device("cpu"), torch.float32).cpu_gemm:
        impl = "onednn per-expert GEMMs (inference), grouped_mm with autograd"
    assert choice == f"{impl} (T > {n}), dense-small (T <= {n}){train}"
    bf16 = fast.kernel_choice(torch.device("cpu"), torch.bfloat16)["moe"]
    assert bf16.startswith(f"{K.auto_impl(torch.device('cpu'), torch.bfloat16)} (T > {n})")


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


@pytest.mark.triton
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
def test_triton_swiglu_rows_equals_twin(monkeypatch, dtype, tol, scaled):
    """The fused SwiGLU (+ row scale) against its PyTorch twin; I not a power of two."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    from mamba_decoder.kernels import moe as mk
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    h13 = torch.randn(37, 2 * 45, device=dev).to(dtype)
    scale = torch.rand(37, device=dev).to(dtype) if scaled else None
    want = mk.swiglu_rows(h13.float(), None if scale is None else scale.float(), triton=False)
    got = mk.swiglu_rows(h13, scale, triton=True)
    assert got.dtype == dtype and got.shape == (37, 45)
    assert rel_err(got, want) <= tol


@pytest.mark.triton
def test_grouped_path_with_folded_shared_expert_equals_reference(monkeypatch):
    """The fast MoE's grouped path (shared expert folded in as an always-on group, Triton SwiGLU
    with the routing weight) against open_kimi's loop, with the grouped path forced."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    from mamba_decoder.kernels import moe as mk
    if not mk.grouped_mm_works("cpu", None, torch.float32) and not torch.cuda.is_available():
        pytest.skip("torch._grouped_mm does not run here")
    monkeypatch.setattr(mk, "auto_impl", lambda device, dtype: "grouped_mm")
    torch.manual_seed(0)
    ref = randomize_(MoE(24, n_experts=4, n_activated=2, expert_inter_dim=20,
                         shared_expert_inter_dim=20, backend="reference")).eval()
    fast = MoE(24, n_experts=4, n_activated=2, expert_inter_dim=20, shared_expert_inter_dim=20,
               backend="fast", policy=KernelPolicy(moe_triton="triton", dense_small_max_tokens=0)).eval()
    fast.load_state_dict(ref.state_dict())   # dense_small_max_tokens=0: the grouped path even for few tokens
    assert fast.folds_shared_expert()
    x = torch.randn(3, 29, 24)
    with torch.no_grad():
        assert rel_err(fast(x), ref(x)) < 1e-5


def test_weights_cached_under_inference_mode_serve_a_later_backward():
    """The stacked-weight cache filled under inference_mode holds ordinary tensors: a later
    forward with autograd on (frozen experts, an input that wants its gradient) backpropagates."""
    moe = randomize_(MoE(16, n_experts=4, n_activated=2, expert_inter_dim=24, backend="fast")).eval()
    moe.requires_grad_(False)
    x = torch.randn(2, 40, 16)
    with torch.inference_mode():
        want = moe(x)
    xg = x.clone().requires_grad_(True)
    got = moe(xg)
    got.sum().backward()
    assert xg.grad is not None and rel_err(got.detach(), want) < 1e-6


def test_derived_weights_follow_in_place_updates_and_clear_derived():
    from mamba_decoder.models.derived import clear_derived
    ref = randomize_(MoE(16, n_experts=4, n_activated=2, expert_inter_dim=24, backend="reference")).eval()
    fast = MoE(16, n_experts=4, n_activated=2, expert_inter_dim=24, backend="fast").eval()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 40, 16)
    with torch.no_grad():
        fast(x)
        for m in (ref, fast):
            m.experts[1].w3.weight.mul_(-1.5)          # in place: the version counter moves
        assert rel_err(fast(x), ref(x)) < 1e-5
        for m in (ref, fast):
            m.experts[2].w1.weight.data.mul_(2.0)      # through .data: not seen until cleared
        clear_derived(fast)
        assert rel_err(fast(x), ref(x)) < 1e-5


def test_dense_small_limit_follows_the_device(monkeypatch):
    """Launch-bound CUDA takes dense-small up to 4096 tokens; on the CPU, where its extra expert
    FLOPs are the cost, and with autograd, only decode-sized calls; an instance attribute
    overrides them; the record names both limits where they differ."""
    assert K.dense_small_max_tokens(torch.device("cuda")) == 4096
    assert K.dense_small_max_tokens(torch.device("cpu")) == 64
    assert K.dense_small_max_tokens(torch.device("meta")) == 64
    assert K.dense_small_max_tokens(torch.device("cuda"), autograd=True) == 64
    moe = MoE(32, 6, 2, 48, 48, backend="fast")
    assert moe.policy.decide(torch.device("cuda"), torch.float32).dense_small_max_tokens == 4096
    assert moe.policy.decide(torch.device("cuda"), torch.float32, grad=True).dense_small_max_tokens == 64
    monkeypatch.setitem(K.DENSE_SMALL_MAX_TOKENS, "cpu", 4096)      # CPU tensors stand in for CUDA
    assert "dense-small (T <= 4096; 64 with autograd)" in moe.kernel_choice(torch.device("cpu"), torch.float32)["moe"]
    moe.policy = KernelPolicy(dense_small_max_tokens=7)           # a policy overrides the limit
    assert moe.policy.decide(torch.device("cuda"), torch.float32).dense_small_max_tokens == 7


def test_training_forward_takes_dense_small_at_decode_sizes_only(monkeypatch):
    """With autograd on, tokens past the autograd limit take the grouped path even where the
    inference limit is larger (the limits patched: CPU tensors stand in for CUDA ones)."""
    monkeypatch.setitem(K.DENSE_SMALL_MAX_TOKENS, "cpu", 4096)
    theirs = randomize_(KimiMoE(32, 6, 2, 48, 48))
    fast = _fast_like(theirs)
    calls = []
    real = K.routed_dense_small
    monkeypatch.setattr(K, "routed_dense_small", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(2, 100, 32)                              # 200 tokens: 64 < T <= 4096
    with torch.no_grad():
        assert rel_err(fast(x), theirs(x)) < 1e-5
    assert calls == [1]
    got = fast(x)                                            # parameters want gradients
    assert calls == [1] and rel_err(got.detach(), theirs(x)) < 1e-5
    got.sum().backward()
    assert fast.experts[0].w1.weight.grad is not None


@pytest.fixture
def triton_dev(monkeypatch):
    """Where the Triton kernels run here: CUDA, else CPU tensors through TRITON_INTERPRET=1."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    return "cuda" if torch.cuda.is_available() else "cpu"


def _gate_probe(T, E, fold, I, dtype, device):
    """H whose SwiGLU is exactly 32 in every column (silu(32) rounds to 32 in fp32; h3 = 1): the
    gated output divided by 32 is the dense gate itself, bit for bit."""
    H = torch.ones(T, E + fold, 2, I, dtype=dtype, device=device)
    H[:, :, 0] = 32
    return H.view(T, -1)


def _tie_scores(T, E, dtype, device, seed):
    """Scores on a coarse grid (many exact ties in the probabilities), else continuous."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(T, E, generator=g)
    s[: 3 * T // 4] = torch.randint(-2, 3, (3 * T // 4, E), generator=g).float() / 2
    return s.to(device, dtype)


@pytest.mark.triton
@pytest.mark.parametrize("E,k,fold,bias", [(6, 2, 1, True), (6, 2, 0, False), (5, 3, 0, True), (32, 4, 1, True)],
                         ids=["E6k2-fold-bias", "E6k2", "E5k3-bias", "E32k4-fold-bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_scored_swiglu_triton_routes_like_topk_route(monkeypatch, triton_dev, E, k, fold, bias, dtype):
    """The fused router + gated SwiGLU against topk_route + the dense gate: the same experts
    (ties to the lowest index, CUDA's rule; this CPU's topk breaks ties otherwise) and the same
    weights, within an ulp of the exp here (numpy's vs torch's) and bit for bit on CUDA
    (tests/gpu). Then the full pass against its twin on random H."""
    from mamba_decoder.kernels.moe_triton import scored_swiglu_triton
    dev = triton_dev
    T, I = (48, 40) if E <= 8 else (12, 8)           # the interpreter runs one program per (T, E')
    s = _tie_scores(T, E, dtype, dev, seed=E + k)
    # a bias on the scores' grid keeps the ties
    b = (torch.randint(-1, 2, (E,)).float() / 4).to(dev, dtype) if bias else None
    gate = scored_swiglu_triton(_gate_probe(T, E, fold, I, dtype, dev), s, b, k, E, fold)
    gate = gate.view(T, E + fold, I)[:, :, 0].float() / 32
    assert torch.all(gate[:, E:] == 1)
    probs = F.softmax(s + b if bias else s, dim=-1)
    idx = torch.argsort(-probs.float(), dim=-1, stable=True)[:, :k]           # ties: lowest index
    w = probs.gather(1, idx)
    w = w / (w.sum(-1, keepdim=True) + 1e-8)
    want = K.dense_gate(w, idx, E).float()
    assert torch.equal(gate[:, :E] != 0, want != 0)
    if dev == "cuda" and (k <= K.FUSED_ROUTER_MAX_TOPK or dtype != torch.float32):
        assert torch.equal(gate[:, :E], want)
    else:
        assert rel_err(gate[:, :E], want) < (1e-6 if dtype == torch.float32 else 4e-3)
    if E == 6:
        tied = (probs.float().sort(-1, descending=True).values[:, 1:3].diff(dim=-1) == 0).squeeze(-1)
        assert tied.sum() >= 3                                               # the grid made ties
    H = torch.randn(T, (E + fold) * 2 * I).to(dev, dtype)
    assert rel_err(scored_swiglu_triton(H, s, b, k, E, fold),
                   K.gated_swiglu(H, w, idx, E, fold)) < (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.triton
def test_fused_router_nan_row(triton_dev):
    """A row of scores holding a NaN: NaN gates for that token's experts (as torch's NaN
    probabilities give), weights NaN and experts still in range from the standalone router."""
    from mamba_decoder.kernels.moe_triton import scored_swiglu_triton, topk_route_triton
    s = torch.randn(3, 6, device=triton_dev)
    s[1, 4] = float("nan")
    out = scored_swiglu_triton(_gate_probe(3, 6, 1, 8, torch.float32, triton_dev), s, None, 2, 6, 1).view(3, 7, 8)
    assert torch.isnan(out[1, :6]).all() and not torch.isnan(out[[0, 2]]).any()
    w, idx = topk_route_triton(s, None, 2)
    assert torch.isnan(w[1]).all() and not torch.isnan(w[[0, 2]]).any()
    assert idx.min() >= 0 and idx.max() < 6                 # indexes the experts safely


def test_scored_swiglu_rejects_wide_routers(triton_dev):
    from mamba_decoder.kernels.moe_triton import scored_swiglu_triton
    with pytest.raises(ValueError, match="up to 32 experts"):
        scored_swiglu_triton(torch.zeros(2, 33 * 4), torch.zeros(2, 33), None, 2, 33, 0)


def test_router_fuses_within_its_limits_only():
    pytest.importorskip("triton")
    cuda = torch.device("cuda")
    assert K.router_fuses(cuda, torch.bfloat16, 6, 2, True) and K.router_fuses(cuda, torch.float32, 32, 1, True)
    assert not K.router_fuses(cuda, torch.bfloat16, 6, 3, True)   # k > 2: torch's sum order differs
    assert not K.router_fuses(cuda, torch.bfloat16, 33, 2, True)  # wider than one warp's softmax
    assert not K.router_fuses(cuda, torch.float64, 6, 2, True)
    cpu = torch.device("cpu")                                     # the default policy: no Triton on the CPU
    assert not K.router_fuses(cpu, torch.bfloat16, 6, 2, KernelPolicy().decide(cpu, torch.bfloat16).moe_triton)


@pytest.mark.triton
@pytest.mark.parametrize("E,k,bias", [(6, 2, True), (5, 1, False), (32, 2, True)], ids=["E6k2-bias", "E5k1", "E32k2-bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_topk_route_triton_equals_topk_route(triton_dev, E, k, bias, dtype):
    """The grouped path's fused router against topk_route: the same (expert, weight) pairs, slots
    by descending weight, ties to the lowest index (CUDA's rule; bit for bit on CUDA)."""
    from mamba_decoder.kernels.moe_triton import topk_route_triton
    dev = triton_dev
    T = 64
    s = _tie_scores(T, E, dtype, dev, seed=E)
    b = (torch.randint(-1, 2, (E,)).float() / 4).to(dev, dtype) if bias else None
    w, idx = topk_route_triton(s, b, k)
    assert w.shape == idx.shape == (T, k) and w.dtype == dtype and idx.dtype == torch.int64
    assert torch.all(w[:, :-1] >= w[:, 1:])                                  # descending slots
    probs = F.softmax(s + b if bias else s, dim=-1)
    want_idx = torch.argsort(-probs.float(), dim=-1, stable=True)[:, :k]
    want_w = probs.gather(1, want_idx)
    want_w = want_w / (want_w.sum(-1, keepdim=True) + 1e-8)
    assert torch.equal(idx, want_idx)
    if dev == "cuda":
        assert torch.equal(w, want_w)
    else:
        assert rel_err(w, want_w) < (1e-6 if dtype == torch.float32 else 4e-3)


@pytest.mark.triton
@pytest.mark.parametrize("shared", [48, 40], ids=["folded-shared", "separate-shared"])
def test_grouped_path_with_the_fused_router_equals_open_kimi(monkeypatch, triton_dev, shared):
    """The fast MoE in eval above the dense-small limit routes through topk_route_triton (Triton
    forced on CPU tensors, counted) and equals open_kimi's loop."""
    from mamba_decoder.kernels import moe_triton
    dev = triton_dev
    theirs = randomize_(KimiMoE(32, 6, 2, 48, shared)).eval().to(dev)
    fast = _fast_like(theirs, policy=KernelPolicy(moe_triton="triton", dense_small_max_tokens=0)).eval().to(dev)
    calls = []
    real = moe_triton.topk_route_triton
    monkeypatch.setattr(moe_triton, "topk_route_triton", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(2, 9, 32, device=dev)
    with torch.no_grad():
        assert rel_err(fast(x), theirs(x)) < 1e-5
    assert calls == [1]


@pytest.mark.triton
@pytest.mark.parametrize("T", [12, 100], ids=["dense-small", "grouped"])
def test_eval_moe_takes_the_fused_router_and_equals_open_kimi(monkeypatch, triton_dev, T):
    """Through the dispatchers (Triton forced on CPU tensors): dense-small routes inside the gated
    pass, the grouped path through topk_route_triton (each counted), and both equal open_kimi."""
    from mamba_decoder.kernels import moe_triton
    theirs = randomize_(KimiMoE(32, 6, 2, 48, 48)).eval().to(triton_dev)
    fast = _fast_like(theirs, policy=KernelPolicy(moe_triton="triton", dense_small_max_tokens=64)).eval().to(triton_dev)
    calls = []
    for name in ("scored_swiglu_triton", "topk_route_triton"):
        real = getattr(moe_triton, name)
        monkeypatch.setattr(moe_triton, name, lambda *a, name=name, real=real: calls.append(name) or real(*a))
    x = torch.randn(1, T, 32, device=triton_dev)
    with torch.no_grad():
        assert rel_err(fast(x), theirs(x)) < 1e-5
    assert calls == ["scored_swiglu_triton" if T <= 64 else "topk_route_triton"]


@pytest.mark.triton
def test_router_stays_torch_under_autocast_and_for_float64(monkeypatch, triton_dev):
    """Under autocast torch's softmax runs in fp32 whatever the scores' dtype, and fp64 is no
    dtype the kernel rounds to: both take the torch router; the fp64 MoE still runs (the gated
    kernel from (weights, indices) takes any dtype)."""
    from mamba_decoder.kernels import moe_triton
    monkeypatch.setattr(moe_triton, "topk_route_triton", None)          # would fail if called
    monkeypatch.setattr(moe_triton, "scored_swiglu_triton", None)
    s = torch.randn(8, 6, device=triton_dev)
    with torch.autocast(torch.device(triton_dev).type, dtype=torch.bfloat16):
        w, idx = K.route_scores(s.bfloat16(), None, 2, triton=True)
    assert torch.equal(idx, K.topk_route(s.bfloat16(), None, 2)[1])
    theirs = randomize_(KimiMoE(32, 6, 2, 48, 48)).eval().double().to(triton_dev)
    fast = _fast_like(theirs, policy=TRITON).eval().double().to(triton_dev)
    x = torch.randn(1, 12, 32, device=triton_dev, dtype=torch.float64)
    with torch.no_grad():
        got = fast(x)
    assert got.dtype == torch.float64 and rel_err(got, theirs(x)) < 1e-6   # the kernel computes in fp32


def _grouped_twin(x, w, idx, w1s, w2s, w3s, n_on):
    """Autograd through routed_grouped (the PyTorch ops), the always-on experts appended as
    picks of weight 1: the twin of routed_grouped_train."""
    T = x.shape[0]
    if n_on:
        n = len(w1s)
        idx = torch.cat([idx, torch.arange(n - n_on, n).expand(T, n_on)], 1)
        w = torch.cat([w, w.new_ones(T, n_on)], 1)
    return K.routed_grouped(x, w, idx, torch.stack(w1s), torch.stack(w2s), torch.stack(w3s))


@pytest.mark.parametrize("E,k,n_on", [(4, 1, 0), (6, 2, 1), (64, 8, 1), (5, 3, 0)],
                         ids=["E4-top1", "E6-top2-shared", "E64-top8-shared", "E5-top3"])
@pytest.mark.parametrize("triton", [False, True], ids=["torch", "triton"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
def test_routed_grouped_train_equals_autograd_twin(monkeypatch, E, k, n_on, triton, dtype, tol):
    """The training MoE's Function (grouped GEMMs, its own backward) against autograd through
    the PyTorch ops: the output and the gradients of x, the routing weights and every expert
    weight, with experts that get no token (E 64) and T not a multiple of anything."""
    if triton:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        pytest.importorskip("triton")
    if not K.grouped_mm_works("cpu", None, dtype):
        pytest.skip("torch._grouped_mm does not run here")
    torch.manual_seed(E * 10 + k)
    T, D, I = 23, 16, 24   # bf16 grouped GEMMs need 16-byte strides
    n = E + n_on
    x = torch.randn(T, D).to(dtype)
    w = torch.softmax(torch.randn(T, k), -1).to(dtype)
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    ws = [[(torch.randn(*s) / s[-1] ** 0.5).to(dtype) for _ in range(n)] for s in ((I, D), (D, I), (I, D))]
    g = torch.randn(T, D).to(dtype)

    def run(fn):
        leaves = [t.clone().requires_grad_(True) for t in [x, w] + [p for l in ws for p in l]]
        xl, wl, ps = leaves[0], leaves[1], leaves[2:]
        out = fn(xl, wl, idx, ps[:n], ps[n:2 * n], ps[2 * n:], n_on)
        (out.float() * g.float()).sum().backward()
        return out, [t.grad for t in leaves]

    want, want_g = run(lambda *a: _grouped_twin(*[t.float() if torch.is_tensor(t) and t.is_floating_point()
                                                  else [p.float() for p in t] if isinstance(t, list) else t
                                                  for t in a]))
    got, got_g = run(lambda *a: K.routed_grouped_train(*a, triton=triton))
    assert got.dtype == dtype and rel_err(got, want) < tol
    names = ["x", "weights"] + [f"w{j}[{e}]" for j in (1, 2, 3) for e in range(n)]
    for name, a, b in zip(names, got_g, want_g):
        assert a is not None and a.dtype == dtype, name
        if b.abs().max() == 0:      # an expert no token picked: exactly zero
            assert a.abs().max() == 0, name
        else:
            assert rel_err(a, b) < tol, name


@pytest.mark.triton
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("I", [45, 1100], ids=["I45", "I1100-two-blocks"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
def test_triton_swiglu_rows_bwd_equals_twin(monkeypatch, dtype, tol, scaled, I):
    """The SwiGLU backward pass (dh13, the rebuilt h, the row scale's gradient) against its
    PyTorch twin, and h bit for bit the forward kernel's output."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    M = 7
    h13 = torch.randn(M, 2 * I).to(dtype)
    scale = torch.rand(M).to(dtype) if scaled else None
    dh = torch.randn(M, I).to(dtype)
    want = K.swiglu_rows_bwd(h13.float(), None if scale is None else scale.float(), dh.float(), triton=False)
    got = K.swiglu_rows_bwd(h13, scale, dh, triton=True)
    assert got[0].dtype == got[1].dtype == dtype
    assert rel_err(got[0], want[0]) <= tol and rel_err(got[1], want[1]) <= tol
    assert torch.equal(got[1], K.swiglu_rows(h13, scale, triton=True))
    if scaled:
        assert rel_err(got[2], want[2]) <= tol
    else:
        assert got[2] is None and want[2] is None
