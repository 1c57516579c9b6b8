"""The fast backend's CPU kernels against their twins, fp32 tight (<= 1e-5 relative) and bf16
against fp32 within a stated bound, at odd sizes:

- kernels.cpu_gemm.linear (oneDNN for fp32 inference) vs F.linear in fp64;
- kernels.cpu_fused: the (B, L, ED) conv + SiLU vs causal_conv1d_silu_torch, the SwiGLU rows and
  the RMSNorm vs the torch ops;
- kernels.moe's oneDNN grouped path vs routed_loop (open_kimi's loop);
- kernels.attention.naive_sdpa with V padded for the CPU flash kernel vs naive_ref;
- each block, fast backend in inference (where these kernels run) vs the reference backend.
"""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers import randomize_, rel_err  # noqa: E402
from mamba_decoder.kernels import attention, cpu_fused, cpu_gemm, cpu_native  # noqa: E402
from mamba_decoder.kernels import moe as K  # noqa: E402
from mamba_decoder.kernels.causal_conv import causal_conv1d_silu_torch  # noqa: E402

needs_cc = pytest.mark.skipif(not cpu_native.available()[0], reason=cpu_native.available()[1])
needs_onednn = pytest.mark.skipif(not cpu_gemm.onednn_available(), reason="no oneDNN fp32 linear in this torch")


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
        got = cpu_gemm.linear(x, w, b)
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.dtype == torch.float32 and rel_err(got, want) <= 1e-5


@needs_onednn
def test_linear_takes_strided_and_3d_inputs():
    xz = torch.randn(3, 11, 2 * 20)
    x = xz[..., :20]                                    # a strided half, as Mamba's in_proj gives
    w = torch.randn(7, 20)
    with torch.inference_mode():
        got = cpu_gemm.linear(x, w)
    assert got.shape == (3, 11, 7) and rel_err(got, F.linear(x.double(), w.double())) <= 1e-5


def test_linear_falls_back_to_f_linear_exactly_where_onednn_does_not_run():
    w = torch.randn(8, 12)
    small = torch.randn(cpu_gemm.MIN_ROWS - 1, 12)      # decode-sized
    assert not cpu_gemm.runs_onednn(small, w)
    assert torch.equal(cpu_gemm.linear(small, w), F.linear(small, w))
    bf = torch.randn(64, 12, dtype=torch.bfloat16)
    assert not cpu_gemm.runs_onednn(bf, w.bfloat16())
    x = torch.randn(64, 12, requires_grad=True)         # autograd: F.linear, which has a backward
    assert not cpu_gemm.runs_onednn(x, w)
    cpu_gemm.linear(x, w).sum().backward()
    assert torch.allclose(x.grad, w.sum(0).expand(64, -1))


def test_small_gemms_stay_on_f_linear(monkeypatch):
    """Below MIN_MACS multiply-adds F.linear runs (one thread, no 2-thread stall)."""
    monkeypatch.setattr(cpu_gemm, "MIN_MACS", 1 << 24)
    with torch.inference_mode():
        x, w = torch.randn(32, 128), torch.randn(512, 128)          # 2M MACs: the README example's in_proj
        assert not cpu_gemm.runs_onednn(x, w)
        assert torch.equal(cpu_gemm.linear(x, w), F.linear(x, w))
        big = torch.randn(128, 512)
        assert cpu_gemm.runs_onednn(big, torch.randn(2048, 512)) == cpu_gemm.onednn_available()


# ---------------------------------------------------------------- conv + SiLU, SwiGLU
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
    want = causal_conv1d_silu_torch(x.transpose(1, 2), w, b).transpose(1, 2)
    assert got.is_contiguous() and rel_err(got, want) <= 1e-5


@needs_cc
def test_conv_silu_bld_rejects_what_it_does_not_run():
    with pytest.raises(ValueError, match="fp32 CPU"):
        cpu_fused.causal_conv1d_silu_bld(torch.randn(1, 4, 8, dtype=torch.bfloat16), torch.randn(8, 1, 4), None)


@needs_cc
@pytest.mark.parametrize("M,I", [(1, 16), (77, 50), (300, 1024)], ids=lambda v: str(v))
@pytest.mark.parametrize("scaled", [True, False], ids=["scale", "no-scale"])
def test_swiglu_rows_matches_torch_ops(M, I, scaled):
    h13, s = torch.randn(M, 2 * I), (torch.rand(M) if scaled else None)
    want = F.silu(h13[:, :I]) * h13[:, I:] * (s[:, None] if scaled else 1)
    with torch.inference_mode():
        assert rel_err(cpu_fused.swiglu_rows_cpu(h13, s), want) <= 1e-5
        assert rel_err(K.swiglu_rows(h13, s), want) <= 1e-5      # the dispatch takes it


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
def test_grouped_onednn_matches_the_loop(T):
    E, Kk, D, I = 7, 3, 24, 40
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, D, generator=g)
    idx = torch.randint(0, E - 1, (T, Kk), generator=g)   # expert E-1 gets no token: a 0-row group
    w = torch.rand(T, Kk, generator=g)
    w1, w2, w3 = (torch.randn(E, I, D, generator=g) / D ** 0.5, torch.randn(E, D, I, generator=g) / I ** 0.5,
                  torch.randn(E, I, D, generator=g) / D ** 0.5)
    w13 = torch.cat([w1, w3], dim=1)
    with torch.inference_mode():
        assert cpu_gemm.runs_onednn(x, w13)
        got = K.routed_grouped(x, w, idx, w1, w2, w3, w13)
        want = K.routed_loop(x.double(), w.double(), idx, w1.double(), w2.double(), w3.double())
    assert rel_err(got, want) <= 1e-5


# ---------------------------------------------------------------- attention
@pytest.mark.parametrize("S,T,masked", [(37, 37, False), (5, 37, False), (37, 37, True)],
                         ids=["causal", "suffix-queries", "explicit-mask"])
def test_naive_sdpa_with_padded_v_matches_reference(S, T, masked):
    B, H, Dqk, Dv = 2, 3, 24, 16
    q, k, v = torch.randn(B, S, H, Dqk), torch.randn(B, T, H, Dqk), torch.randn(B, T, H, Dv)
    mask = attention.causal_mask(S, T, "cpu") if masked else None
    with torch.inference_mode():
        got = attention.naive_sdpa(q, k, v, Dqk ** -0.5, mask)
    want = attention.naive_ref(q.double(), k.double(), v.double(), Dqk ** -0.5, mask)
    assert got.shape == (B, S, H, Dv) and rel_err(got, want) <= 1e-5


# ---------------------------------------------------------------- blocks, inference
def _blocks():
    from mamba_decoder.bench.registry import MODELS, build_model
    return [pytest.param(name, build_model, id=name.replace(" ", "")) for name in MODELS]


@pytest.mark.parametrize("name,build", _blocks())
def test_fast_blocks_in_inference_match_reference(name, build):
    """B3 L70 dim 64: 210 tokens, so the MoE takes the grouped (oneDNN) path; every fast CPU
    kernel of the block runs. fp32 <= 1e-5; bf16 fast vs fp32 reference <= 3e-2."""
    torch.manual_seed(0)
    ref = randomize_(build(name, 64, "reference")).eval()
    fast = build(name, 64, "fast").eval()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(3, 70, 64)
    with torch.inference_mode():
        want = ref(x)
        assert rel_err(fast(x), want) <= 1e-5
        fast_bf16 = fast.to(torch.bfloat16)
        out = fast_bf16(x.bfloat16())
    assert out.dtype == torch.bfloat16 and rel_err(out, want) <= 3e-2
