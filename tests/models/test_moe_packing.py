"""The MoE's packed expert weights (MoE.pack_experts): open_kimi's state dict all the same, kept
through conversions and loads, no stacked copy on the fast paths, and a correct fallback where
the packing breaks."""
import copy

import pytest
import torch
from helpers import randomize_, rel_err
from open_kimi.moe import MoE as KimiMoE

from mamba_decoder.kernels import moe as K
from mamba_decoder.models import MoE

GROUPED_T = (3, 29)        # 87 tokens: past the CPU's dense-small limit (64), the grouped path


def _grouped_mm_or_skip(dtype=torch.float32):
    if not K.grouped_mm_works("cpu", None, dtype):
        pytest.skip("torch._grouped_mm does not run here")


def _experts(moe):
    return list(moe.experts) + ([moe.shared_expert] if moe.folds_shared_expert() else [])


def assert_packed(moe):
    """Every expert weight of `_all_experts()` is a view of the packed w13 / w2, where expected."""
    packed = moe.packed_weights()
    assert packed is not None
    w13, w2 = packed
    I = w13.shape[1] // 2
    experts = _experts(moe)
    assert w13.shape[0] == w2.shape[0] == len(experts)
    for e, ex in enumerate(experts):
        for p, view in ((ex.w1.weight, w13[e, :I]), (ex.w3.weight, w13[e, I:]), (ex.w2.weight, w2[e])):
            assert p.untyped_storage().data_ptr() == view.untyped_storage().data_ptr()
            assert p.data_ptr() == view.data_ptr() and p.shape == view.shape and p.stride() == view.stride()


def _pair(dim, E, k, inter, shared, seed=3):
    theirs = randomize_(KimiMoE(dim, E, k, inter, shared))
    fast = MoE(dim, E, k, inter, shared, backend="fast")
    fast.load_state_dict(theirs.state_dict(), strict=True)
    return fast, theirs


@pytest.mark.parametrize("backend", ["fast", "reference"])
@pytest.mark.parametrize("shared", [48, 40], ids=["folded-shared", "separate-shared"])
def test_state_dict_is_open_kimis_and_loads_both_ways_keeping_the_packing(backend, shared):
    torch.manual_seed(11)
    theirs = KimiMoE(32, 6, 2, 48, shared)
    torch.manual_seed(11)
    ours = MoE(32, 6, 2, 48, shared, backend=backend)
    assert_packed(ours)
    mine, kimi = ours.state_dict(), theirs.state_dict()
    assert list(mine) == list(kimi)
    for name in kimi:                                    # same init draws: same values
        assert mine[name].shape == kimi[name].shape and torch.equal(mine[name], kimi[name]), name
    params = list(ours.parameters())
    randomize_(theirs)
    ours.load_state_dict(theirs.state_dict(), strict=True)   # in place, into the packed storage
    assert_packed(ours)
    assert all(a is b for a, b in zip(params, ours.parameters()))
    x = torch.randn(*GROUPED_T, 32)
    with torch.no_grad():
        assert rel_err(ours(x), theirs(x)) < 1e-6
    back = KimiMoE(32, 6, 2, 48, shared)
    back.load_state_dict(ours.state_dict(), strict=True)
    for name, t in back.state_dict().items():
        assert torch.equal(t, theirs.state_dict()[name]), name


@pytest.mark.parametrize("convert,dtype,tol", [
    (lambda m: m.to(torch.float64), torch.float64, 1e-12),
    (lambda m: m.double(), torch.float64, 1e-12),
    (lambda m: m.to(torch.bfloat16), torch.bfloat16, 2e-2),
], ids=["to-fp64", "double", "to-bf16"])
def test_packing_holds_after_dtype_conversion(convert, dtype, tol):
    fast, theirs = _pair(32, 6, 2, 48, 48)
    params = list(fast.parameters())
    convert(fast), convert(theirs)
    assert fast.experts[0].w1.weight.dtype == dtype
    assert_packed(fast)
    assert all(a is b for a, b in zip(params, fast.parameters()))   # the same Parameters
    x = torch.randn(*GROUPED_T, 32, dtype=dtype)
    with torch.no_grad():
        assert rel_err(fast(x), theirs(x)) < tol
        small = torch.randn(2, 3, 32, dtype=dtype)                 # dense-small
        assert rel_err(fast(small), theirs(small)) < tol


def test_packing_holds_after_to_empty_from_meta_and_after_deepcopy():
    with torch.device("meta"):
        moe = MoE(24, 5, 2, 40, 40, backend="fast")
    moe.to_empty(device="cpu")
    assert_packed(moe)
    randomize_(moe)
    twin = copy.deepcopy(moe)
    assert_packed(twin)
    assert twin.packed_weights()[0].data_ptr() != moe.packed_weights()[0].data_ptr()
    x = torch.randn(*GROUPED_T, 24)
    with torch.no_grad():
        assert torch.equal(twin(x), moe(x))


def _fwd_bwd(moe, x, g):
    moe.zero_grad(set_to_none=True)
    xl = x.clone().requires_grad_(True)
    out = moe(xl)
    (out.float() * g).sum().backward()
    return out.detach(), xl.grad, {n: p.grad for n, p in moe.named_parameters()}


def _assert_train_step_equals_reference(fast, ref, x, tol):
    g = torch.randn(x.shape)
    want, want_dx, want_g = _fwd_bwd(ref, x, g)
    got, got_dx, got_g = _fwd_bwd(fast, x, g)
    assert rel_err(got, want) < tol and rel_err(got_dx, want_dx) < tol
    for name, b in want_g.items():
        a = got_g[name]
        if b is None:
            assert a is None or a.abs().max() == 0, name
        elif b.abs().max() == 0:          # an expert no token picked
            assert a is None or a.abs().max() == 0, name
        else:
            assert rel_err(a, b) < tol, name


@pytest.mark.parametrize("dtype,tol,D,I,shared", [
    (torch.float32, 1e-5, 20, 12, 12), (torch.float32, 1e-5, 20, 12, 28),
    (torch.bfloat16, 3e-2, 24, 40, 40), (torch.bfloat16, 3e-2, 24, 40, 48),
], ids=["fp32-folded-shared", "fp32-separate-shared", "bf16-folded-shared", "bf16-separate-shared"])
def test_packed_train_step_equals_reference(dtype, tol, D, I, shared):
    """The fast backend's forward + backward (grouped train Function on the packed weights)
    against the reference backend's: the output and the gradients of the input and of every
    parameter, 5 experts top-2, 87 tokens, widths no power of two (odd ones fail: torch's grouped
    GEMMs need 16-byte row strides, packed or not)."""
    _grouped_mm_or_skip(dtype)
    ref = randomize_(MoE(D, 5, 2, I, shared, backend="reference")).to(dtype)
    fast = MoE(D, 5, 2, I, shared, backend="fast").to(dtype)
    fast.load_state_dict(ref.state_dict(), strict=True)
    assert fast.folds_shared_expert() == (shared == I)
    assert_packed(fast)
    x = torch.randn(*GROUPED_T, D, dtype=dtype)
    for _ in range(2):                    # train mode: the routing bias moves between the steps
        _assert_train_step_equals_reference(fast, ref, x, tol)


def test_a_broken_packing_falls_back_to_stacking_and_stays_correct(monkeypatch):
    """A weight given other storage (through .data, or load_state_dict(assign=True)) breaks the
    packing: the forward sees it and stacks the weights (counted), and outputs and gradients
    still equal the reference; pack_experts() packs again."""
    _grouped_mm_or_skip()
    fast, _ = _pair(20, 5, 2, 12, 12)
    ref = MoE(20, 5, 2, 12, 12, backend="reference")
    ref.load_state_dict(fast.state_dict())
    stacks = []
    real = torch.stack
    monkeypatch.setattr(torch, "stack", lambda *a, **kw: stacks.append(1) or real(*a, **kw))
    w = fast.experts[2].w1.weight
    w.data = w.data.clone()
    assert fast.packed_weights() is None
    x = torch.randn(*GROUPED_T, 20)
    _assert_train_step_equals_reference(fast, ref, x, 1e-5)
    with torch.no_grad():
        fast.eval(), ref.eval()
        assert rel_err(fast(x), ref(x)) < 1e-5
        fast.train(), ref.train()
    assert stacks                                             # the fallback stacked
    assert fast.pack_experts()
    assert_packed(fast)
    _assert_train_step_equals_reference(fast, ref, x, 1e-5)
    sd = {k: v.clone() for k, v in fast.state_dict().items()}
    fast.load_state_dict(sd, strict=True, assign=True)
    assert fast.packed_weights() is None
    _assert_train_step_equals_reference(fast, ref, x, 1e-5)


@pytest.mark.parametrize("shared", [48, 40], ids=["folded-shared", "separate-shared"])
def test_no_stacked_copy_when_packed(monkeypatch, shared):
    """Packed, no path stacks or caches the expert weights: torch.stack fails if called, in a
    train step and in inference (oneDNN experts or grouped GEMMs, and dense-small); the only
    cached weights are dense-small's W2 (another layout)."""
    _grouped_mm_or_skip()
    fast, theirs = _pair(32, 6, 2, 48, shared)
    fast.eval(), theirs.eval()            # the train step below leaves the routing bias as it is

    def no_stack(*a, **kw):
        raise AssertionError("torch.stack called on a packed MoE")
    monkeypatch.setattr(torch, "stack", no_stack)
    x = torch.randn(*GROUPED_T, 32, requires_grad=True)
    fast(x).sum().backward()
    assert x.grad is not None and fast.experts[0].w1.weight.grad is not None
    w13 = fast.packed_weights()[0]
    with torch.no_grad():
        for shape in (GROUPED_T, (2, 3)):                       # grouped, dense-small
            xi = torch.randn(*shape, 32)
            assert rel_err(fast(xi), theirs(xi)) < 1e-5
        assert fast.grouped_weights()[3] is w13
        assert fast.dense_small_weights()[0].data_ptr() == w13.data_ptr()
        assert tuple(fast.stacked_weights()[0].shape) == (6, 48, 32)
    cached = [t for _, v in fast.__dict__.get("_derived_cache", {}).values()
              for t in (v if isinstance(v, tuple) else (v,))]
    assert all(t.numel() < w13.numel() for t in cached)


def test_expert_grads_share_one_storage():
    """The train Function returns each expert's gradient as a view of one dw13 / dw2, and
    AccumulateGrad takes them as they are (no copy) where .grad is None: two storages in all."""
    _grouped_mm_or_skip()
    fast, _ = _pair(32, 6, 2, 48, 48)
    fast(torch.randn(*GROUPED_T, 32)).sum().backward()
    experts = _experts(fast)
    for names in (("w1", "w3"), ("w2",)):
        grads = [getattr(e, n).weight.grad for e in experts for n in names]
        assert len({g.untyped_storage().data_ptr() for g in grads}) == 1, names
        assert grads[0].untyped_storage().nbytes() == sum(g.numel() * g.element_size() for g in grads)


def test_in_place_update_before_backward_raises():
    """The packed weights are read in the backward: updating a parameter in place between the
    forward and the backward raises autograd's error, as it does for nn.Linear, rather than a
    backward through other weights than the forward's."""
    _grouped_mm_or_skip()
    fast, _ = _pair(32, 6, 2, 48, 48)
    out = fast(torch.randn(*GROUPED_T, 32))
    with torch.no_grad():
        fast.experts[1].w2.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_deferred_packing_packs_at_the_first_conversion_in_its_dtype():
    """Built inside `deferred_packing` (the suite's builder), the experts stay apart until the
    .to() that gives them the run's dtype, then pack: no fp32 packed copy beside the fp32 weights."""
    from mamba_decoder.models.moe import deferred_packing

    with deferred_packing():
        moe = MoE(24, n_experts=4, n_activated=2, expert_inter_dim=16)
    assert moe.packed_weights() is None
    moe = moe.to(torch.bfloat16)
    assert_packed(moe)
    assert moe.packed_weights()[0].dtype == torch.bfloat16
    with deferred_packing():
        same = MoE(24, n_experts=4, n_activated=2, expert_inter_dim=16)
    assert_packed(same.to(torch.float32))        # a conversion that keeps the storage packs too
    assert_packed(MoE(24, n_experts=4, n_activated=2, expert_inter_dim=16))   # outside: at construction


def test_the_suites_models_are_packed_in_their_dtype():
    from mamba_decoder.bench import runner
    from mamba_decoder.bench.settings import SweepSettings, iter_configs

    s = SweepSettings(device="cpu", dim=32, sequence_lengths=[8], batch_sizes=[1], models=["MambaDecoderBlock"],
                      dtypes=["bfloat16"])
    model = runner._build(next(iter(iter_configs(s))), s)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    assert moes and all(m.packed_weights() is not None and m.packed_weights()[0].dtype == torch.bfloat16
                        for m in moes)


@pytest.mark.parametrize("wrap", ["prune", "weight_norm"])
def test_a_pruned_or_parametrized_expert_weight_still_converts_and_copies(wrap):
    """torch.nn.utils.prune and parametrizations move an expert's `weight` out of its
    _parameters: the MoE (reference backend, open_kimi's loop) still takes .double() and a
    deepcopy, as before the packing; its experts are left unpacked."""
    from torch.nn.utils import prune
    from torch.nn.utils.parametrizations import weight_norm

    moe = MoE(16, 4, 2, 32, 32, backend="reference")
    x = torch.randn(2, 5, 16)
    if wrap == "prune":
        prune.l1_unstructured(moe.experts[0].w1, "weight", 0.5)
    else:
        weight_norm(moe.experts[0].w1)
        twin = copy.deepcopy(moe)
        assert twin.packed_weights() is None
        with torch.no_grad():
            assert torch.equal(twin(x), moe(x))
    with torch.no_grad():
        want = moe(x).double()
        moe.double()
        assert moe.packed_weights() is None
        assert rel_err(moe(x.double()), want) < 1e-2   # fp32 against fp64


@pytest.mark.parametrize("dim,inter", [(30, 16), (24, 18)])
def test_widths_grouped_mm_cannot_take_run_the_dense_path_and_say_so(dim, inter):
    """torch._grouped_mm needs 16-byte rows: a width of 30 (or an expert width of 18) in fp32 made
    every fast MoE forward and train step raise "strides should be multiple of 16 bytes"; now it
    runs the dense path, named in the kernel choice, with the reference's outputs and gradients."""
    torch.manual_seed(0)
    fast = MoE(dim, n_experts=5, n_activated=2, expert_inter_dim=inter, backend="fast")
    ref = MoE(dim, n_experts=5, n_activated=2, expert_inter_dim=inter, backend="reference")
    ref.load_state_dict(fast.state_dict())
    for m in (fast, ref):
        m.gate.use_adaptive_bias = False           # the same routing in both (no bias updates)
    x = torch.randn(*GROUPED_T, dim)
    with torch.no_grad():
        assert rel_err(fast(x), ref(x)) < 1e-5
    xf, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    fast(xf).square().sum().backward()
    ref(xr).square().sum().backward()
    assert rel_err(xf.grad, xr.grad) < 1e-5
    for (n, pf), pr in zip(fast.named_parameters(), ref.parameters()):
        if pr.grad is not None:
            assert rel_err(pf.grad, pr.grad) < 1e-5, n
    choice = fast.kernel_choice(torch.device("cpu"), torch.float32)["moe"]
    assert choice.startswith(f"dense (width {dim} and expert width {inter}") and "train:" not in choice


def test_the_first_fast_forward_leaves_the_callers_random_stream_alone():
    """The grouped_mm probe (run once, at the first decision for a device and dtype) drew from the
    global generator, so a model's first forward moved the caller's random stream: a train step's
    random upstream gradient then differed between the fast and reference backends whenever the
    probe ran between them (tests/models/test_block_sizes.py failed run alone)."""
    import subprocess
    import sys
    code = ("import torch\nfrom mamba_decoder.models import MoE\n"
            "m = MoE(16, n_experts=4, n_activated=2, expert_inter_dim=8, backend='fast')\n"
            "x = torch.randn(3, 29, 16)\ntorch.manual_seed(1)\nm(x)\nprint(torch.randn(1).item())\n"
            "torch.manual_seed(1)\nprint(torch.randn(1).item())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.split()
    assert first == second
