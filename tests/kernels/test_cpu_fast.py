"""The fast backend's CPU kernels (issue 17) against their twins, fp32 tight (<= 1e-5 relative,
in fp64 where the twin can run it) and bf16 against fp32 within a stated bound, at odd sizes:

- kernels.cpu_gemm.linear (oneDNN for fp32 inference) vs F.linear in fp64, and where it falls back;
- kernels.cpu_fused: the (B, L, ED) conv + SiLU vs causal_conv1d_silu_torch, the SwiGLU rows and
  the RMSNorm vs the torch ops (fp32 only: bf16 takes the torch twins, covered by the blocks);
- kernels.moe's oneDNN per-expert path vs routed_loop (open_kimi's loop);
- kernels.attention.naive_sdpa with V padded (the CPU flash kernel) vs naive_ref;
- kernels.cpu_attention.causal_attention (query blocks through oneDNN) vs naive_ref in fp64, and
  where naive_sdpa takes it; MLA's chunked prefill over a latent cache through it;
- the policy's CPU decisions; each block, fast backend in inference (where these kernels run)
  vs the reference backend, fp32 and bf16.
"""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers import randomize_, rel_err  # noqa: E402
from mamba_decoder.kernels import attention, cpu_attention, cpu_fused, cpu_gemm, cpu_native  # noqa: E402
from mamba_decoder.kernels import moe as K  # noqa: E402
from mamba_decoder.kernels.causal_conv import causal_conv1d_silu_torch  # noqa: E402
from mamba_decoder.policy import KernelPolicy  # noqa: E402

needs_cc = pytest.mark.skipif(not cpu_native.available()[0], reason=cpu_native.available()[1])
needs_onednn = pytest.mark.skipif(not cpu_gemm.onednn_available(), reason="no oneDNN fp32 linear in this torch")
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _onednn_at_test_sizes(monkeypatch):
    """oneDNN takes GEMMs from 2^24 multiply-adds; the tests' small ones must run it too."""
    monkeypatch.setattr(cpu_gemm, "MIN_MACS", 0)


# ---------------------------------------------------------------- GEMM
@needs_onednn
@pytest.mark.parametrize("M,Kd,N", [(16, 24, 40), (33, 17, 129), (1000, 512, 96)], ids=lambda v: str(v))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_linear_is_fp32_exact_to_rounding(M, Kd, N, bias):
    x, w = torch.randn(M, Kd), torch.randn(N, Kd)
    b = torch.randn(N) if bias else None
    with torch.inference_mode():
        assert cpu_gemm.runs_onednn(x, w)
        got = cpu_gemm.linear(x, w, b, onednn=True)
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.dtype == torch.float32 and rel_err(got, want) <= 1e-5


@needs_onednn
def test_linear_takes_strided_and_3d_inputs():
    xz = torch.randn(3, 11, 2 * 20)
    x = xz[..., :20]                                    # a strided half, as Mamba's in_proj gives
    w = torch.randn(7, 20)
    with torch.inference_mode():
        got = cpu_gemm.linear(x, w, onednn=True)
    assert got.shape == (3, 11, 7) and rel_err(got, F.linear(x.double(), w.double())) <= 1e-5


def test_linear_falls_back_to_f_linear_exactly_where_onednn_does_not_run(monkeypatch):
    w = torch.randn(8, 12)
    small = torch.randn(cpu_gemm.MIN_ROWS - 1, 12)      # decode-sized
    assert not cpu_gemm.runs_onednn(small, w)
    assert torch.equal(cpu_gemm.linear(small, w, onednn=True), F.linear(small, w))
    bf = torch.randn(64, 12, dtype=torch.bfloat16)
    assert not cpu_gemm.runs_onednn(bf, w.bfloat16())
    x = torch.randn(64, 12, requires_grad=True)         # autograd: F.linear, which has a backward
    assert not cpu_gemm.runs_onednn(x, w)
    cpu_gemm.linear(x, w, onednn=True).sum().backward()
    assert torch.allclose(x.grad, w.sum(0).expand(64, -1))
    monkeypatch.setattr(cpu_gemm, "MIN_MACS", 1 << 24)  # below 2^24 MACs: MKL's one-thread path
    with torch.inference_mode():
        x, w = torch.randn(32, 128), torch.randn(512, 128)          # 2M MACs: the README example's in_proj
        assert not cpu_gemm.runs_onednn(x, w)
        assert torch.equal(cpu_gemm.linear(x, w, onednn=True), F.linear(x, w))
        assert cpu_gemm.runs_onednn(torch.randn(128, 512), torch.randn(2048, 512)) == cpu_gemm.onednn_available()


# ---------------------------------------------------------------- conv + SiLU, SwiGLU, RMSNorm
@needs_cc
@pytest.mark.parametrize("Bsz,L,ED,K", [(1, 1, 16, 4), (3, 70, 33, 4), (2, 9, 40, 2), (2, 5, 17, 7)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_conv_silu_bld_matches_torch_twin(Bsz, L, ED, K, bias):
    xz = torch.randn(Bsz, L, 2 * ED)
    x = xz[..., :ED]                                    # read by strides, as in the mixer
    w, b = torch.randn(ED, 1, K), (torch.randn(ED) if bias else None)
    with torch.inference_mode():
        assert cpu_fused.runs(x, w)
        got = cpu_fused.causal_conv1d_silu_bld(x, w, b)
    want = causal_conv1d_silu_torch(x.transpose(1, 2).double(), w.double(),
                                    None if b is None else b.double()).transpose(1, 2)
    assert got.is_contiguous() and rel_err(got, want) <= 1e-5


@needs_cc
def test_cpu_fused_rejects_what_it_does_not_run():
    with pytest.raises(ValueError, match="fp32 CPU"):
        cpu_fused.causal_conv1d_silu_bld(torch.randn(1, 4, 8, dtype=torch.bfloat16), torch.randn(8, 1, 4), None)
    with pytest.raises(ValueError, match="fp32 CPU"):
        cpu_fused.rms_norm_cpu(torch.randn(4, 8).t(), None, 1e-5)
    with pytest.raises(ValueError, match="fp32 CPU"):
        cpu_fused.swiglu_rows_cpu(torch.randn(4, 8, dtype=torch.bfloat16))
    x = torch.randn(2, 3, 16, requires_grad=True)       # no backward: autograd never takes them
    assert not cpu_fused.runs(x) and not cpu_fused.runs(torch.randn(4, 8).t())


@needs_cc
@pytest.mark.parametrize("M,I", [(1, 16), (77, 50), (300, 1024)], ids=lambda v: str(v))
@pytest.mark.parametrize("scaled", [True, False], ids=["scale", "no-scale"])
def test_swiglu_rows_matches_torch_ops(M, I, scaled):
    h13, s = torch.randn(M, 2 * I), (torch.rand(M) if scaled else None)
    hd = h13.double()
    want = F.silu(hd[:, :I]) * hd[:, I:] * (s.double()[:, None] if scaled else 1)
    with torch.inference_mode():
        assert rel_err(cpu_fused.swiglu_rows_cpu(h13, s), want) <= 1e-5
        assert rel_err(K.swiglu_rows(h13, s, cpu=True), want) <= 1e-5      # the dispatch takes it


@needs_cc
@pytest.mark.parametrize("shape", [(1, 1, 16), (3, 7, 31), (2, 50, 512)], ids=lambda v: str(v))
@pytest.mark.parametrize("weighted", [True, False], ids=["weight", "no-weight"])
def test_rms_norm_matches_torch(shape, weighted):
    x = torch.randn(*shape[:-1], shape[-1] + 3)[..., :shape[-1]]      # strided rows
    w = torch.randn(shape[-1]) if weighted else None
    want = F.rms_norm(x.double(), (shape[-1],), None if w is None else w.double(), 1e-5)
    with torch.inference_mode():
        assert rel_err(cpu_fused.rms_norm_cpu(x, w, 1e-5), want) <= 1e-5


# ---------------------------------------------------------------- MoE
@needs_onednn
@needs_cc
@pytest.mark.parametrize("T", [65, 300], ids=lambda v: f"T{v}")
def test_onednn_experts_match_the_loop(T):
    E, Kk, D, I = 7, 3, 24, 40
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, D, generator=g)
    idx = torch.randint(0, E - 1, (T, Kk), generator=g)   # expert E-1 gets no token: a 0-row group
    w = torch.rand(T, Kk, generator=g)
    w1, w2, w3 = (torch.randn(E, I, D, generator=g) / D ** 0.5, torch.randn(E, D, I, generator=g) / I ** 0.5,
                  torch.randn(E, I, D, generator=g) / D ** 0.5)
    w13 = torch.cat([w1, w3], dim=1)
    want = K.routed_loop(x.double(), w.double(), idx, w1.double(), w2.double(), w3.double())
    with torch.inference_mode():
        assert cpu_gemm.runs_onednn(x, w13[0])
        for fused in (True, False):
            got = K.routed_grouped(x, w, idx, w1, w2, w3, w13, onednn=True, cpu_fused=fused)
            assert rel_err(got, want) <= 1e-5
            assert rel_err(K.routed_grouped_onednn(x, w, idx, w13, w2, fused), want) <= 1e-5


# ---------------------------------------------------------------- attention
@pytest.mark.parametrize("S,T,masked", [(37, 37, False), (5, 37, False), (37, 37, True)],
                         ids=["causal", "suffix-queries", "explicit-mask"])
def test_naive_sdpa_with_padded_v_matches_reference(S, T, masked):
    B, H, Dqk, Dv = 2, 3, 24, 16
    q, k, v = torch.randn(B, S, H, Dqk), torch.randn(B, T, H, Dqk), torch.randn(B, T, H, Dv)
    mask = attention.causal_mask(S, T, "cpu") if masked else None
    want = attention.naive_ref(q.double(), k.double(), v.double(), Dqk ** -0.5, mask)
    with torch.inference_mode():
        got = attention.naive_sdpa(q, k, v, Dqk ** -0.5, mask, pad_v=True)
        # the point of the padding: SDPA's CPU flash kernel takes it (it refuses Dv != Dqk)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            flash = attention.naive_sdpa(q, k, v, Dqk ** -0.5, mask, pad_v=True)
    assert got.shape == (B, S, H, Dv) and rel_err(got, want) <= 1e-5 and torch.equal(flash, got)


def test_padded_v_has_gradients_of_the_unpadded():
    B, S, H, Dqk, Dv = 1, 9, 2, 12, 8
    leaves = [torch.randn(B, S, H, d, dtype=torch.float64, requires_grad=True) for d in (Dqk, Dqk, Dv)]
    g = torch.randn(B, S, H, Dv, dtype=torch.float64)
    grads = []
    for pad in (True, False):
        (attention.naive_sdpa(*leaves, Dqk ** -0.5, None, pad_v=pad) * g).sum().backward()
        grads.append([t.grad.clone() for t in leaves])
        for t in leaves:
            t.grad = None
    assert all(torch.allclose(a, b) for a, b in zip(*grads))


@needs_cc
@needs_onednn
@pytest.mark.parametrize("S,T,H,Dqk,Dv,block", [
    (37, 37, 3, 24, 16, 8),      # causal, S not a multiple of the block
    (64, 64, 2, 16, 16, 16),     # a multiple
    (5, 37, 3, 24, 16, 4),       # queries at the last S of T positions (a prefill after a cache)
    (37, 37, 2, 16, 24, 8),      # Dv > Dqk
    (1, 9, 1, 8, 8, 4),          # one query: sees every key
    (20, 20, 1, 8, 8, 256),      # one block larger than S
], ids=["causal", "multiple", "suffix-queries", "wide-v", "one-query", "one-block"])
def test_cpu_blocked_attention_matches_reference(S, T, H, Dqk, Dv, block):
    B = 2
    q, k, v = torch.randn(B, S, H, Dqk), torch.randn(B, T, H, Dqk), torch.randn(B, T, H, Dv)
    want = attention.naive_ref(q.double(), k.double(), v.double(), Dqk ** -0.5)
    with torch.inference_mode():
        got = cpu_attention.causal_attention(q, k, v, Dqk ** -0.5, block=block)
        # keys given heads-major (what MLA's join_last(heads_major=True) makes) read in place
        kh = attention.join_last(k[..., :Dqk - 3], k[..., Dqk - 3:], heads_major=True)
        assert torch.equal(kh, k) and kh.permute(0, 2, 1, 3).is_contiguous()
        assert torch.equal(cpu_attention.causal_attention(q, kh, v, Dqk ** -0.5, block=block), got)
    assert got.shape == (B, S, H, Dv) and got.is_contiguous() and rel_err(got, want) <= 1e-5


def test_join_last_heads_major_gives_cats_values_in_a_heads_major_tensor():
    a, b = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 1, 2)
    want = torch.cat([a, b.expand(2, 5, 3, 2)], -1)
    got = attention.join_last(a, b, heads_major=True)
    assert torch.equal(got, want) and got.permute(0, 2, 1, 3).is_contiguous() and not got.is_contiguous()
    assert torch.equal(attention.join_last(a, b), want) and attention.join_last(a, b).is_contiguous()


@needs_cc
@needs_onednn
def test_naive_sdpa_takes_the_blocked_path_exactly_where_it_should(monkeypatch):
    """cpu_blocked, causal (no mask) and S * T >= MIN_SCORES: the blocked path; an explicit mask, a
    smaller call or cpu_blocked off: SDPA. The same values either way."""
    B, H, S, Dqk, Dv = 2, 3, 40, 24, 16
    q, k, v = torch.randn(B, S, H, Dqk), torch.randn(B, S, H, Dqk), torch.randn(B, S, H, Dv)
    calls = []
    real = cpu_attention.causal_attention
    monkeypatch.setattr(cpu_attention, "causal_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(cpu_attention, "MIN_SCORES", S * S)
    want = attention.naive_ref(q.double(), k.double(), v.double(), Dqk ** -0.5)
    with torch.inference_mode():
        for mask, blocked, S_, taken in ((None, True, S, 1), (attention.causal_mask(S, S, "cpu"), True, S, 0),
                                         (None, False, S, 0), (None, True, S - 1, 0)):
            calls.clear()
            got = attention.naive_sdpa(q[:, :S_], k[:, :S_], v[:, :S_], Dqk ** -0.5, mask, pad_v=True,
                                       cpu_blocked=blocked)
            assert len(calls) == taken and rel_err(got, want[:, :S_] if S_ == S else
                                                    attention.naive_ref(q[:, :S_].double(), k[:, :S_].double(),
                                                                        v[:, :S_].double(), Dqk ** -0.5)) <= 1e-5


@needs_cc
@needs_onednn
def test_mla_chunked_prefill_over_a_latent_cache_through_the_blocked_path(monkeypatch):
    """A fast MLA prefill of 37 tokens in two chunks (20, then 17 over a latent cache: queries at
    the end of the keys) equals the 37-token forward and the reference backend, with every chunk
    through the blocked attention."""
    from mamba_decoder.models.mla import MLA

    monkeypatch.setattr(cpu_attention, "MIN_SCORES", 0)
    calls = []
    real = cpu_attention.causal_attention
    monkeypatch.setattr(cpu_attention, "causal_attention", lambda *a, **kw: calls.append(a[0].shape[1]) or real(*a, **kw))
    torch.manual_seed(0)
    ref = randomize_(MLA(48, 3, q_lora_rank=16, kv_lora_rank=24, qk_nope_head_dim=12, qk_rope_head_dim=8,
                         v_head_dim=10, backend="reference")).eval()
    fast = MLA(48, 3, q_lora_rank=16, kv_lora_rank=24, qk_nope_head_dim=12, qk_rope_head_dim=8,
               v_head_dim=10, backend="fast").eval()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 37, 48)
    with torch.inference_mode():
        want = ref(x)
        whole = fast(x)
        cache = fast.init_cache(2, 40)
        parts = torch.cat([fast(x[:, :20], start_pos=0, cache=cache), fast(x[:, 20:], start_pos=20, cache=cache)], 1)
    assert calls == [37, 20, 17]
    assert rel_err(whole, want) <= 1e-5 and rel_err(parts, want) <= 1e-5


@needs_cc
@needs_onednn
def test_blocked_attention_takes_fp32_only_also_under_autocast(monkeypatch):
    """An fp32 MLA under CPU autocast (bf16): the policy decides on x (fp32), but q, k and v come
    out of the projections in bf16. Those go to SDPA (the C passes read fp32: bf16 scores through
    them corrupted the heap), and causal_attention refuses anything but fp32 CPU tensors."""
    from mamba_decoder.models.mla import MLA

    monkeypatch.setattr(cpu_attention, "MIN_SCORES", 0)
    monkeypatch.setattr(cpu_gemm, "MIN_MACS", 1 << 62)   # torch's linears (autocast's bf16), as at small sizes
    seen = []
    real = cpu_attention.causal_attention

    def spy(q, k, v, *a, **kw):
        seen.append((q.dtype, k.dtype, v.dtype))
        assert q.dtype == k.dtype == v.dtype == torch.float32, seen[-1]   # else a corrupted heap
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(cpu_attention, "causal_attention", spy)
    torch.manual_seed(0)
    kw = dict(q_lora_rank=16, kv_lora_rank=24, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10)
    ref = randomize_(MLA(48, 3, backend="reference", **kw)).eval()
    fast = MLA(48, 3, backend="fast", **kw).eval()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 37, 48)
    with torch.inference_mode():
        assert rel_err(fast(x), ref(x)) <= 1e-5 and seen == [(torch.float32,) * 3]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want, got = ref(x), fast(x)
    assert got.dtype == torch.bfloat16 and rel_err(got, want) <= 3e-2
    q = torch.randn(1, 8, 2, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="fp32 CPU"):
        real(q, q, q, 0.25)


# ---------------------------------------------------------------- policy
def test_policy_takes_the_cpu_kernels_for_fp32_inference_only():
    d = KernelPolicy().decide(CPU, torch.float32)
    assert d.cpu_gemm == cpu_gemm.onednn_available() and d.cpu_fused == cpu_native.available()[0]
    assert d.cpu_attention == (cpu_gemm.onednn_available() and cpu_native.available()[0])
    assert d.mla_pad_v and d.moe == ("onednn-experts" if d.cpu_gemm and K.auto_impl(CPU, torch.float32)
                                     == "grouped_mm" else K.auto_impl(CPU, torch.float32))
    for off in (KernelPolicy().decide(CPU, torch.float32, grad=True), KernelPolicy().decide(CPU, torch.bfloat16),
                KernelPolicy(cpu_kernels="torch").decide(CPU, torch.float32),
                KernelPolicy().decide(torch.device("cuda"), torch.float32)):
        assert not off.cpu_gemm and not off.cpu_fused and not off.cpu_attention and off.moe != "onednn-experts"
    with pytest.raises(ValueError, match="cpu_kernels='triton' is not one of: auto, torch"):
        KernelPolicy(cpu_kernels="triton")


# ---------------------------------------------------------------- blocks, inference
def _blocks():
    from mamba_decoder.bench.registry import MODELS, build_model
    return [pytest.param(name, build_model, id=name.replace(" ", "")) for name in MODELS]


@pytest.mark.parametrize("name,build", _blocks())
def test_fast_blocks_in_inference_match_reference(name, build, monkeypatch):
    """B3 L70 dim 64: 210 tokens, so the MoE takes the oneDNN per-expert path; every fast CPU
    kernel of the block runs (counted). fp32 <= 1e-5; bf16 fast vs fp32 reference <= 3e-2; the
    policy's cpu_kernels="torch" gives the same function without them."""
    from mamba_decoder.models import set_kernel_policy

    torch.manual_seed(0)
    ref = randomize_(build(name, 64, "reference")).eval()
    fast = build(name, 64, "fast").eval()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(3, 70, 64)
    calls = []
    monkeypatch.setattr(cpu_attention, "MIN_SCORES", 0)
    for mod, fn in ((cpu_gemm, "linear"), (cpu_fused, "causal_conv1d_silu_bld"), (cpu_fused, "rms_norm_cpu"),
                    (cpu_fused, "swiglu_rows_cpu"), (K, "routed_grouped_onednn"), (cpu_attention, "causal_attention")):
        real = getattr(mod, fn)
        monkeypatch.setattr(mod, fn, lambda *a, _f=fn, _r=real, **k: calls.append(_f) or _r(*a, **k))
    with torch.inference_mode():
        want = ref(x)
        assert rel_err(fast(x), want) <= 1e-5
        if cpu_native.available()[0] and cpu_gemm.onednn_available():
            expect = {"Regular Mamba": {"linear", "causal_conv1d_silu_bld", "rms_norm_cpu"},
                      "MambaDecoderBlock": {"linear", "causal_conv1d_silu_bld", "swiglu_rows_cpu",
                                            "routed_grouped_onednn", "rms_norm_cpu"},
                      "MLABlock": {"linear", "swiglu_rows_cpu", "routed_grouped_onednn", "rms_norm_cpu",
                                   "causal_attention"}}[name]
            assert expect <= set(calls), set(calls)
        set_kernel_policy(fast, KernelPolicy(cpu_kernels="torch"))
        assert rel_err(fast(x), want) <= 1e-5
        set_kernel_policy(fast, KernelPolicy())
        out = fast.to(torch.bfloat16)(x.bfloat16())
    assert out.dtype == torch.bfloat16 and rel_err(out, want) <= 3e-2
