"""MLA against open_kimi's, causality, naive == absorb, fast == reference, cached decoding."""
import pytest
import torch
from helpers import randomize_, rel_err
from open_kimi.mla import MLA as KimiMLA

from mamba_decoder.kernels.attention import causal_mask
from mamba_decoder.models import MLA

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
