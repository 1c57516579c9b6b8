"""Training under autocast with fp32 weights, the way mixed-precision training runs: the fast
backend's hand-written autograd Functions (the fused Mamba mixer, the training MoE's grouped
GEMMs) cast their GEMM operands themselves, since their backwards run outside autocast. On the
CPU here through the Triton interpreter, CPU autocast in bf16; every gradient against the fp32
reference and held to a small multiple of the reference backend's own autocast error."""
import copy

import pytest
import torch

from helpers import randomize_, rel_err, small_scan_tiles
from mamba_decoder.policy import KernelPolicy

DEV = "cuda" if torch.cuda.is_available() else "cpu"
AMP = torch.bfloat16


def grads_under(module, x, autocast: bool):
    """(output, the input's gradient, every parameter's gradient by name) of a random linear
    functional, under autocast or not."""
    xl = x.clone().requires_grad_(True)
    with torch.autocast(DEV, dtype=AMP, enabled=autocast):
        y = module(xl)
    g = torch.Generator().manual_seed(7)
    (y.float() * torch.randn(y.shape, generator=g).to(DEV)).sum().backward()
    return y, xl.grad, {n: p.grad for n, p in module.named_parameters() if p.grad is not None}


def block(kind: str, backend: str):
    from mambapy.mamba import MambaConfig

    from mamba_decoder.models import MambaDecoderBlock, MLABlock, RegularMamba
    # the CPU's fast paths would be its C kernels or the BLD layout: force the CUDA ones
    policy = KernelPolicy(mamba_fused="triton", mamba_layout="BDL") if backend == "fast" and DEV == "cpu" else None
    if kind == "RegularMamba":
        return RegularMamba(MambaConfig(d_model=16, n_layers=1, d_state=6), backend, policy)
    if kind == "MambaDecoderBlock":
        return MambaDecoderBlock(16, MambaConfig(d_model=16, n_layers=1, d_state=6), backend=backend, policy=policy)
    return MLABlock(dim=16, n_heads=2, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                    n_experts=4, n_activated=2, backend=backend, policy=policy)


@pytest.mark.triton
@pytest.mark.parametrize("kind", ["RegularMamba", "MambaDecoderBlock", "MLABlock"])
def test_fast_backend_trains_under_autocast_with_fp32_weights(monkeypatch, kind):
    """Output dtype, gradient dtypes and values: the fast backend under autocast against the fp32
    reference, within 3x the reference backend's own autocast error (+0.01). Before the Functions
    cast for themselves, the fused mixer's backward failed ("expected scalar type Float but found
    BFloat16"). 72 tokens: the MoE takes its grouped training Function, not dense-small."""
    pytest.importorskip("triton")
    from mamba_decoder.kernels.selective_scan import triton_bdl
    if DEV == "cpu":
        small_scan_tiles(monkeypatch, triton_bdl)
    torch.manual_seed(0)
    ref = randomize_(block(kind, "reference")).to(DEV)
    if kind != "RegularMamba":   # decisive routing: a token whose top-k flips under bf16 rounding
        with torch.no_grad():     # would move whole rows of an expert's gradient
            ref.moe.gate.gate_weight.mul_(10)
    fast = block(kind, "fast").to(DEV)
    fast.load_state_dict(copy.deepcopy(ref.state_dict()))
    x = torch.randn(2, 36, 16, device=DEV)
    exact = grads_under(copy.deepcopy(ref), x, autocast=False)
    ref_amp = grads_under(copy.deepcopy(ref), x, autocast=True)
    if kind != "MLABlock":   # the fused Function ran, not the op-by-op graph
        import mamba_decoder.models.mamba as mm
        seen = []
        real = mm._MixerCoreTrain.apply
        monkeypatch.setattr(mm._MixerCoreTrain, "apply", lambda *a: seen.append(1) or real(*a))
    got = grads_under(fast, x, autocast=True)
    if kind != "MLABlock":
        assert seen
    assert got[0].dtype == ref_amp[0].dtype           # the residual stream keeps fp32 as the reference's
    assert got[1].dtype == torch.float32
    assert {g.dtype for g in got[2].values()} == {torch.float32}
    assert got[2].keys() == exact[2].keys()
    pairs = [("out", got[0], ref_amp[0], exact[0]), ("x", got[1], ref_amp[1], exact[1])]
    pairs += [(n, got[2][n], ref_amp[2][n], exact[2][n]) for n in exact[2]]
    for name, g, r, e in pairs:
        assert rel_err(g, e) <= 3 * rel_err(r, e) + 0.01, (name, rel_err(g, e), rel_err(r, e))


def test_grouped_mm_probe_ignores_the_callers_autocast():
    """The once-per-process probe of torch._grouped_mm compares against a plain product: under
    the caller's bf16 autocast that product came out bf16 and an fp32 probe failed (the MoE then
    took the dense path for the rest of the process)."""
    from mamba_decoder.kernels import moe as moe_kernels

    plain = moe_kernels.grouped_mm_works("cpu", None, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert moe_kernels.grouped_mm_works("cpu", None, torch.float32) == plain


@pytest.mark.triton
@pytest.mark.parametrize("kind", ["RegularMamba", "MambaDecoderBlock", "MLABlock"])
def test_fast_backend_infers_and_decodes_under_autocast(monkeypatch, kind):
    """Inference under autocast with fp32 weights and an fp32 cache: the forward and one token
    at a time (after a prefill for MLA) against the fp32 reference forward. The Triton conv step
    refused the bf16 input beside its fp32 window ("conv_state dtype torch.float32 != x dtype
    torch.bfloat16"); the step now reads the input in the window's dtype."""
    pytest.importorskip("triton")
    from mamba_decoder.kernels.selective_scan import triton_bdl
    if DEV == "cpu":
        small_scan_tiles(monkeypatch, triton_bdl)
    torch.manual_seed(0)
    ref = randomize_(block(kind, "reference")).to(DEV).eval()
    fast = block(kind, "fast").to(DEV).eval()
    fast.load_state_dict(copy.deepcopy(ref.state_dict()))
    x = torch.randn(2, 12, 16, device=DEV)
    with torch.no_grad():
        exact = ref(x)
        with torch.autocast(DEV, dtype=AMP):
            full = fast(x)
            if kind == "MLABlock":
                cache = fast.init_cache(batch_size=2, max_len=64)
                steps = [fast(x[:, :8], 0, None, cache)] + [fast(x[:, i:i + 1], i, None, cache) for i in range(8, 12)]
            else:
                cache = fast.init_cache(2)
                steps = [fast(x[:, i:i + 1], cache) for i in range(12)]
    assert rel_err(full, exact) <= 0.03
    assert rel_err(torch.cat(steps, 1), exact) <= 0.03


def test_moe_whose_widths_fit_grouped_gemms_in_fp32_only_trains_under_autocast():
    """An expert width of 12: rows of 48 bytes in fp32, which torch._grouped_mm takes, of 24 in
    bf16, which it refuses ("strides should be multiple of 16 bytes"). The width check read x's
    fp32, so under bf16 autocast the training Function's bf16 grouped GEMMs raised; the check now
    reads the dtype they run in, and that MoE trains on the dense path, as it would in bf16."""
    from mamba_decoder.models import MLABlock

    def mla(backend):
        return MLABlock(dim=16, n_heads=2, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                        n_experts=4, n_activated=2, expert_inter_dim=12, shared_expert_inter_dim=12, backend=backend)
    torch.manual_seed(0)
    ref = randomize_(mla("reference")).to(DEV)
    with torch.no_grad():
        ref.moe.gate.gate_weight.mul_(10)     # decisive routing, as above
    fast = mla("fast").to(DEV)
    fast.load_state_dict(copy.deepcopy(ref.state_dict()))
    x = torch.randn(2, 36, 16, device=DEV)
    exact = grads_under(copy.deepcopy(ref), x, autocast=False)
    ref_amp = grads_under(copy.deepcopy(ref), x, autocast=True)
    got = grads_under(fast, x, autocast=True)
    assert {g.dtype for g in got[2].values()} == {torch.float32} and got[2].keys() == exact[2].keys()
    for name in exact[2]:
        g, r, e = got[2][name], ref_amp[2][name], exact[2][name]
        assert rel_err(g, e) <= 3 * rel_err(r, e) + 0.01, (name, rel_err(g, e), rel_err(r, e))


def test_moe_trains_through_grouped_gemms_where_they_take_autocasts_dtype_only(monkeypatch):
    """On CUDA torch._grouped_mm is a grouped kernel for bf16 only (kernels.moe.auto_impl): fp32
    takes the dense path. Under bf16 autocast the training Function runs its GEMMs in bf16, so the
    MoE's choice reads that dtype, not x's fp32 (it took the dense path: every expert on every
    token). Here the CPU stands in for CUDA through auto_impl."""
    from mamba_decoder.kernels import moe as moe_kernels
    from mamba_decoder.models import MambaDecoderBlock

    monkeypatch.setattr(moe_kernels, "auto_impl",
                        lambda device, dtype: "grouped_mm" if dtype == torch.bfloat16 else "dense")
    seen = []
    real = moe_kernels.routed_grouped_train
    monkeypatch.setattr(moe_kernels, "routed_grouped_train", lambda *a, **k: seen.append(1) or real(*a, **k))
    blk = MambaDecoderBlock(dim=16)
    x = torch.randn(2, 40, 16, requires_grad=True)     # 80 tokens: above dense-small's 64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        blk(x).float().sum().backward()
    assert seen == [1]
    seen.clear()
    blk(x).sum().backward()                              # fp32 without autocast: the dense path
    assert seen == []
