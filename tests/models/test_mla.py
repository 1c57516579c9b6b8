"""MLA against open_kimi's, causality, naive == absorb, fast == reference, cached decoding."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton decode tests; before any triton import

from helpers import randomize_, rel_err  # noqa: E402
from open_kimi.mla import MLA as KimiMLA  # noqa: E402

from mamba_decoder.kernels import attention as attn_kernels  # noqa: E402
from mamba_decoder.kernels import triton_installed  # noqa: E402
from mamba_decoder.kernels.attention import causal_mask  # noqa: E402
from mamba_decoder.models import MLA  # noqa: E402
from mamba_decoder.policy import KernelPolicy  # noqa: E402

SMALL = dict(dim=48, n_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12)


def _mla(backend="reference", attn_impl="absorb", q_lora_rank=0, **kw):
    return MLA(**{**SMALL, **kw}, q_lora_rank=q_lora_rank, attn_impl=attn_impl, backend=backend,
               max_seq_len=64, max_batch_size=4)


@pytest.mark.parametrize("q_lora_rank", [0, 24], ids=["no-qlora", "qlora24"])
@pytest.mark.parametrize("L", [1, 13, 32])
def test_reference_equals_open_kimi_with_a_causal_mask(q_lora_rank, L):
    theirs = randomize_(KimiMLA(**SMALL, q_lora_rank=q_lora_rank, max_seq_len=64, max_batch_size=4))
    ours = _mla(q_lora_rank=q_lora_rank)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(3, L, 48)
    want = theirs(x, 0, causal_mask(L, L, "cpu"))
    for impl in ("absorb", "naive"):
        ours.attn_impl = impl
        assert rel_err(ours(x), want) < 1e-5, impl


def test_open_kimi_without_mask_sees_the_future_and_we_do_not():
    theirs = randomize_(KimiMLA(**SMALL, max_seq_len=64, max_batch_size=4))
    ours = _mla()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 10, 48)
    x2 = x.clone()
    x2[:, 6:] = torch.randn(2, 4, 48)  # change only the future of positions 0..5
    assert not torch.allclose(theirs(x)[:, :6], theirs(x2)[:, :6])  # the bug this project fixes
    for impl in ("absorb", "naive"):
        for backend in ("reference", "fast"):
            m = _mla(backend, impl)
            m.load_state_dict(ours.state_dict())
            assert torch.equal(m(x)[:, :6], m(x2)[:, :6]), (impl, backend)


@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.parametrize("q_lora_rank", [0, 24], ids=["no-qlora", "qlora24"])
def test_naive_equals_absorb(backend, q_lora_rank):
    a = randomize_(_mla(backend, "absorb", q_lora_rank))
    n = _mla(backend, "naive", q_lora_rank)
    n.load_state_dict(a.state_dict())
    x = torch.randn(2, 21, 48)
    assert rel_err(n(x), a(x)) < 1e-5


@pytest.mark.parametrize("impl", ["absorb", "naive"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(1, 1), (2, 17), (3, 40)], ids=lambda s: "B{}-L{}".format(*s))
def test_fast_equals_reference(impl, dtype, tol, shape):
    ref = randomize_(_mla("reference", impl))
    fast = _mla("fast", impl)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(*shape, 48)
    want = ref(x)
    got = fast.to(dtype)(x.to(dtype))
    assert got.dtype == dtype and rel_err(got, want) < tol


def test_any_batch_size_and_length_without_a_preallocated_cache():
    m = randomize_(_mla())  # max_batch_size=4, max_seq_len=64
    y = m(torch.randn(9, 100, 48))
    assert y.shape == (9, 100, 48) and torch.isfinite(y).all()


def test_explicit_additive_mask_is_used():
    m = randomize_(_mla())
    x = torch.randn(2, 8, 48)
    full = torch.zeros(8, 8)  # attend everywhere: differs from causal
    assert not torch.allclose(m(x, 0, full), m(x))
    assert rel_err(m(x, 0, causal_mask(8, 8, "cpu")), m(x)) < 1e-6


@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.parametrize("impl,kind", [("absorb", "latent"), ("naive", "full"), ("absorb", "full")])
def test_cached_prefill_then_decode_equals_full_forward(backend, impl, kind):
    m = randomize_(_mla(backend, impl))
    x = torch.randn(2, 15, 48)
    want = m(x)
    cache = m.init_cache(2, 20, kind=kind)
    parts = [m(x[:, :9], 0, None, cache)]
    for t in range(9, 15):
        parts.append(m(x[:, t:t + 1], t, None, cache))
    assert rel_err(torch.cat(parts, 1), want) < 1e-5


def test_start_pos_without_cache_is_an_error():
    m = _mla()
    with pytest.raises(ValueError, match="start_pos=3 needs a cache"):
        m(torch.randn(1, 2, 48), start_pos=3)


def test_bf16_module_keeps_its_rope_table():
    m = randomize_(_mla()).to(torch.bfloat16)
    ref = _mla()
    ref.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
    x = torch.randn(2, 12, 48)
    assert rel_err(m(x.bfloat16()), ref(x)) < 2e-2


@pytest.mark.parametrize("kwargs,match", [
    (dict(attn_impl="flash"), "attn_impl='flash'"),
    (dict(qk_rope_head_dim=7), "even"),
    (dict(n_heads=0), "n_heads=0"),
    (dict(backend="turbo"), "backend='turbo'"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MLA(**{**SMALL, **kwargs})


# -- Triton split-K decode over the latent cache (forced on CPU under TRITON_INTERPRET=1) and
#    the fast latent prefill through per-head K/V.

needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="forcing the Triton decode on CPU needs TRITON_INTERPRET=1")


def _count_kernel_calls(monkeypatch):
    from mamba_decoder.kernels import mla_decode as md
    calls = []
    real = md.mla_decode

    def counted(*args, **kw):
        calls.append(args[4])                 # the position it was given
        return real(*args, **kw)

    monkeypatch.setattr(md, "mla_decode", counted)
    monkeypatch.setitem(md.CONFIG, "MIN_SPLIT", 32)   # several splits even in a short cache
    return calls


@needs_interpreter
@pytest.mark.parametrize("q_lora_rank", [0, 24], ids=["no-qlora", "qlora24"])
@pytest.mark.parametrize("B", [1, 3])
def test_triton_decode_equals_full_forward(monkeypatch, B, q_lora_rank):
    calls = _count_kernel_calls(monkeypatch)
    m = randomize_(_mla("fast", q_lora_rank=q_lora_rank, policy=KernelPolicy(mla_decode="triton")))
    x = torch.randn(B, 40, 48)
    with torch.no_grad():
        want = m(x)
        cache = m.init_cache(B, 80)
        outs = [m(x[:, :30], 0, None, cache)]
        for t in range(30, 35):                            # eager forward: int length
            outs.append(m(x[:, t:t + 1], t, None, cache))
        for t in range(35, 40):                            # decode_step: device-tensor length
            outs.append(m.decode_step(x[:, t:t + 1], torch.tensor(t), cache))
    assert len(calls) == 10 and calls[:5] == [30, 31, 32, 33, 34]   # positions (length_offset=1)
    assert all(isinstance(c, torch.Tensor) for c in calls[5:])
    assert rel_err(torch.cat(outs, 1), want) < 1e-5


@needs_interpreter
def test_triton_decode_in_bf16_follows_fp32(monkeypatch):
    _count_kernel_calls(monkeypatch)
    m = randomize_(_mla("fast", policy=KernelPolicy(mla_decode="triton")))
    x = torch.randn(2, 12, 48)
    outs = {}
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            m = m.to(dtype)
            cache = m.init_cache(2, 40)
            seq = [m(x[:, :6].to(dtype), 0, None, cache)]
            seq += [m.decode_step(x[:, t:t + 1].to(dtype), torch.tensor(t), cache) for t in range(6, 12)]
            outs[dtype] = torch.cat(seq, 1)
    assert outs[torch.bfloat16].dtype == torch.bfloat16
    assert rel_err(outs[torch.bfloat16], outs[torch.float32]) < 2e-2


def test_decode_kernel_choice_follows_the_device():
    m = _mla("fast")
    cpu = m.kernel_choice(torch.device("cpu"), torch.bfloat16)["attn"]
    assert cpu == ("prefill naive-sdpa (V padded to Dqk: the CPU flash kernel), "
                   "decode latent cache sdpa (full cache sdpa)")
    assert m.kernel_choice(torch.device("cuda"), torch.bfloat16)["attn"].startswith(
        "prefill triton prologue + naive-sdpa" if triton_installed() else "prefill naive-sdpa")
    m.policy = KernelPolicy(mla_decode="triton")
    assert "latent cache triton prologue + split-k" in m.kernel_choice(torch.device("cpu"), torch.bfloat16)["attn"]
    m.policy = KernelPolicy(mla_decode="torch")
    assert "latent cache sdpa" in m.kernel_choice(torch.device("cuda"), torch.bfloat16)["attn"]
    with pytest.raises(ValueError, match="mla_decode='flash'"):
        KernelPolicy(mla_decode="flash")


@pytest.mark.parametrize("q_lora_rank", [0, 24], ids=["no-qlora", "qlora24"])
def test_fast_latent_prefill_expands_keys_and_equals_latent_attention(monkeypatch, q_lora_rank):
    """Fast prefill into a latent cache goes through per-head K/V (naive_sdpa), also for a
    second chunk whose earlier positions come from the cache; the reference backend still
    attends in the latent space (absorb_ref): outputs and caches must agree."""
    ref = randomize_(_mla("reference", q_lora_rank=q_lora_rank))
    fast = _mla("fast", q_lora_rank=q_lora_rank)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 20, 48)
    c_ref, c_fast = ref.init_cache(2, 24), fast.init_cache(2, 24)
    naive_calls = []
    real_naive = attn_kernels.naive_sdpa

    def naive(*a, **k):
        naive_calls.append(a[1].shape)       # the expanded keys (B, T, H, Dqk)
        return real_naive(*a, **k)

    def no_latent(*a, **k):
        raise AssertionError("latent prefill must not attend in the latent space")

    monkeypatch.setattr(attn_kernels, "naive_sdpa", naive)
    monkeypatch.setattr(attn_kernels, "absorb_sdpa", no_latent)
    with torch.no_grad():
        for lo, hi in [(0, 12), (12, 20)]:
            want = ref(x[:, lo:hi], lo, None, c_ref)
            got = fast(x[:, lo:hi], lo, None, c_fast)
            assert rel_err(got, want) < 1e-5, (lo, hi)
    assert naive_calls == [(2, 12, 4, 24), (2, 20, 4, 24)]
    # the fast latent norm is one C pass on the CPU (kernels.cpu_fused): equal to rounding, not bits
    assert rel_err(c_fast.kv, c_ref.kv) <= 1e-6 and torch.equal(c_fast.pe, c_ref.pe)


@needs_interpreter
@pytest.mark.parametrize("q_lora_rank", [0, 24], ids=["no-qlora", "qlora24"])
@pytest.mark.parametrize("kind", [None, "latent", "full"], ids=["no-cache", "latent", "full"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_fused_prologue_prefill_equals_the_torch_path(monkeypatch, q_lora_rank, kind, dtype, tol):
    """The fast forward with the Triton prologue (query RoPE in place, latent RMSNorm, rope
    key) against the same module's PyTorch path on fresh inputs: a first chunk and, with a
    cache, a second one at start_pos > 0 whose earlier keys come from the cache; cache contents
    too. Then decode steps continue from the prologue-filled cache."""
    from mamba_decoder.kernels import mla_decode as md
    calls = []
    real = md.mla_prologue
    monkeypatch.setattr(md, "mla_prologue", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    torch_path = randomize_(_mla("fast", q_lora_rank=q_lora_rank, policy=KernelPolicy(mla_prologue="torch"))).to(dtype)
    fused = _mla("fast", q_lora_rank=q_lora_rank, policy=KernelPolicy(mla_prologue="triton")).to(dtype)
    fused.load_state_dict(torch_path.state_dict())
    x = torch.randn(2, 21, 48).to(dtype)
    with torch.no_grad():
        if kind is None:
            assert rel_err(fused(x), torch_path(x)) < tol
            assert calls == [0]
            return
        # caches for 3 sequences, 2 in use: the third row must stay untouched
        c_t, c_f = torch_path.init_cache(3, 32, kind), fused.init_cache(3, 32, kind)
        for lo, hi in [(0, 13), (13, 20)]:
            assert rel_err(fused(x[:, lo:hi], lo, None, c_f), torch_path(x[:, lo:hi], lo, None, c_t)) < tol
        (fa, fb), (ta, tb) = c_f.tensors(), c_t.tensors()   # (kv, pe) or (k, v)
        assert rel_err(fa[:2, :20], ta[:2, :20]) < tol and rel_err(fb[:2, :20], tb[:2, :20]) < tol
        assert fa[2].abs().sum() == 0 and fb[2].abs().sum() == 0
        # the latent cache is written at the chunk's positions; full K/V go through a (B, S) buffer
        assert calls == ([0, 13] if kind == "latent" else [0, 0])
        # a one-token step is not a prefill: it takes the decode path
        assert rel_err(fused(x[:, 20:21], 20, None, c_f), torch_path(x[:, 20:21], 20, None, c_t)) < tol
    assert len(calls) == 2


def test_fused_prologue_is_off_with_autograd_and_for_a_bad_name():
    m = _mla("fast", policy=KernelPolicy(mla_prologue="triton"))
    x = torch.randn(1, 5, 48)
    assert not m._fused_prologue(x, None)          # parameters want gradients: the PyTorch path
    with torch.no_grad():
        assert m._fused_prologue(x, None)
    with pytest.raises(ValueError, match="mla_prologue='cuda'"):
        KernelPolicy(mla_prologue="cuda")


def test_rope_table_built_under_inference_mode_serves_a_later_backward():
    """The cached RoPE table is an ordinary tensor even when the first forward ran under
    inference_mode: a later forward with autograd on (as in a benchmark's train step after an
    inference one) backpropagates instead of failing to save an inference tensor."""
    m = randomize_(_mla("fast"))
    x = torch.randn(2, 9, 48)
    with torch.inference_mode():
        want = m(x)
    got = m(x)
    got.square().sum().backward()
    assert m.wq.weight.grad is not None and rel_err(got.detach(), want) < 1e-6


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [dict(), dict(qk_nope_head_dim=6, qk_rope_head_dim=4, q_lora_rank=24)],
                         ids=["default", "small-heads-qlora"])
def test_fast_gradients_equal_reference(dtype, bound, shape):
    """The fast training path (whole-query RoPE, two expansion GEMMs, join_last) against the
    reference's: output, the input's and every parameter's gradient, at an odd length, batch 1."""
    shape = dict(shape)
    q_lora = shape.pop("q_lora_rank", 0)
    ref = randomize_(_mla("reference", "naive", q_lora, **shape)).to(dtype)
    fast = _mla("fast", "naive", q_lora, **shape).to(dtype)
    fast.load_state_dict(ref.state_dict(), strict=True)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 13, 48, generator=g).to(dtype)
    go = torch.randn(1, 13, 48, generator=g).to(dtype)
    outs, grads = [], []
    for m in (ref, fast):
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.backward(go)
        outs.append(y.float())
        grads.append({"x": xi.grad.float(), **{n: p.grad.float() for n, p in m.named_parameters()}})
    assert rel_err(outs[1], outs[0]) <= bound
    for name, want in grads[0].items():
        assert rel_err(grads[1][name], want) <= bound, name
