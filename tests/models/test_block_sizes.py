"""Block hyperparameters (config.BlockSizes) reach the modules, fast equals reference at
non-default sizes, and the presets of published architectures build (issue 16)."""
import math

import pytest
import torch

from mamba_decoder.bench.registry import build_lm, build_model, parameter_counts
from mamba_decoder.config import BlockSizes, MambaConfig, MoEConfig
from mamba_decoder.models import MambaDecoderBlock, MLABlock, RegularMamba, set_kernel_policy
from mamba_decoder.policy import KernelPolicy
from mamba_decoder.presets import PRESETS

from helpers import randomize_, rel_err

DIM = 16


def _direct(name, dim, **z):
    """The block built directly from its constructor, with the sizes spelled out."""
    r = BlockSizes(**z).resolved(dim)
    mamba = MambaConfig(d_model=dim, n_layers=1, d_state=r["d_state"], expand_factor=r["expand"],
                        d_conv=r["d_conv"], dt_rank=r["dt_rank"])
    moe = MoEConfig(dim=dim, n_experts=r["n_experts"], n_activated=r["n_activated"],
                    expert_inter_dim=r["expert_dim"], shared_expert_inter_dim=r["shared_expert_dim"])
    if name == "Regular Mamba":
        return RegularMamba(mamba)
    if name == "MambaDecoderBlock":
        return MambaDecoderBlock(dim, mamba, moe)
    return MLABlock(dim=dim, n_heads=r["heads"], q_lora_rank=r["q_lora_rank"], kv_lora_rank=r["kv_lora_rank"],
                    qk_nope_head_dim=r["qk_nope_dim"], qk_rope_head_dim=r["qk_rope_dim"],
                    v_head_dim=r["v_head_dim"], n_experts=r["n_experts"], n_activated=r["n_activated"],
                    expert_inter_dim=r["expert_dim"], shared_expert_inter_dim=r["shared_expert_dim"])


# one non-default value per hyperparameter, and the model it applies to
ONE_EACH = [("Regular Mamba", "d_state", 8), ("Regular Mamba", "expand", 3), ("Regular Mamba", "d_conv", 3),
            ("Regular Mamba", "dt_rank", 5), ("MambaDecoderBlock", "n_experts", 4),
            ("MambaDecoderBlock", "n_activated", 1), ("MambaDecoderBlock", "expert_dim", 24),
            ("MambaDecoderBlock", "shared_expert_dim", 40), ("MLABlock", "heads", 4),
            ("MLABlock", "q_lora_rank", 12), ("MLABlock", "kv_lora_rank", 20), ("MLABlock", "qk_nope_dim", 24),
            ("MLABlock", "qk_rope_dim", 16), ("MLABlock", "v_head_dim", 20)]


def test_every_size_has_a_case():
    assert {f for _, f, _ in ONE_EACH} == set(BlockSizes.model_fields)


@pytest.mark.parametrize("name,field,value", ONE_EACH)
def test_each_size_reaches_the_module(name, field, value):
    got = build_model(name, DIM, "reference", sizes=BlockSizes(**{field: value}))
    assert parameter_counts(got) == parameter_counts(_direct(name, DIM, **{field: value}))
    # and it changed something: the count (or, for top-k, the active count) moved from the default
    assert parameter_counts(got) != parameter_counts(build_model(name, DIM, "reference"))


def test_sizes_reach_the_language_models():
    z = BlockSizes(d_state=8, n_experts=4, heads=4, q_lora_rank=8)
    lm = build_lm("MambaDecoder+MLA", DIM, "reference", depth=2, vocab_size=50, sizes=z)
    assert lm.layers[0].mixer.config.d_state == 8 and lm.layers[1].moe.n_experts == 4
    assert lm.mla_block.attn.n_heads == 4 and lm.mla_block.attn.q_lora_rank == 8
    assert build_lm("Mamba LM", DIM, "reference", depth=2, sizes=z).mamba.layers[0].mixer.config.d_state == 8


# fast vs reference at non-default sizes: d_state 8/32, 4 and 64 experts at top-1 and top-8,
# 4 heads, a query LoRA rank, a rope dim that is no power of two (the Triton prologue's limit)
CASES = [("MambaDecoderBlock", dict(d_state=8, n_experts=4, n_activated=1)),
         ("MambaDecoderBlock", dict(d_state=32, n_experts=64, n_activated=8, expert_dim=8)),
         ("MLABlock", dict(heads=4, q_lora_rank=12, kv_lora_rank=16, qk_nope_dim=8, qk_rope_dim=8, v_head_dim=8,
                           n_experts=64, n_activated=8, expert_dim=8)),
         ("MLABlock", dict(heads=4, kv_lora_rank=16, qk_nope_dim=8, qk_rope_dim=6, v_head_dim=8, n_experts=4,
                           n_activated=1)),
         ("Regular Mamba", dict(d_state=32, expand=3, d_conv=3, dt_rank=3))]
# auto (torch ops on the CPU), and every Triton kernel forced (interpreted on CPU tensors; the
# MoE's grouped path instead of dense-small)
POLICIES = {"auto": KernelPolicy(),
            "triton": KernelPolicy(mamba_fused="triton", mamba_layout="BDL", moe_triton="triton",
                                   mla_prologue="triton", mla_decode="triton", dense_small_max_tokens=0)}


@pytest.mark.triton
@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("name,z", CASES, ids=[f"{n}-{'-'.join(f'{k}{v}' for k, v in z.items())}" for n, z in CASES])
def test_fast_equals_reference_at_other_sizes(name, z, policy):
    ref = randomize_(build_model(name, DIM, "reference", max_seq_len=16, sizes=BlockSizes(**z))).eval()
    fast = set_kernel_policy(build_model(name, DIM, "fast", max_seq_len=16, sizes=BlockSizes(**z)), POLICIES[policy])
    fast.load_state_dict(ref.state_dict())
    fast.eval()
    x = torch.randn(2, 8, DIM)
    with torch.no_grad():
        assert rel_err(fast(x), ref(x)) < 1e-4


@pytest.mark.parametrize("d_conv", [1, 2])
def test_decoding_equals_the_full_forward_at_any_d_conv(d_conv):
    """--d-conv 1 (a width-1 conv: no window to keep) decodes: the fast CPU prefill kept
    xt[:, :, -(K - 1):], which is the whole sequence at K = 1 (-0), not an empty window."""
    torch.manual_seed(0)
    m = randomize_(build_model("MambaDecoderBlock", DIM, "fast", sizes=BlockSizes(d_conv=d_conv))).eval()
    x = torch.randn(2, 7, DIM)
    with torch.no_grad():
        full = m(x)
        cache = m.init_cache(2)
        steps = [m(x[:, :5], cache=cache)] + [m(x[:, t:t + 1], cache=cache) for t in (5, 6)]
    assert rel_err(torch.cat(steps, 1), full) < 1e-5


def test_a_rope_dim_the_prologue_cannot_take_is_named():
    """qk_rope_dim 6 (no power of two): the Triton prologue is not taken, and the record says so."""
    m = build_model("MLABlock", DIM, "fast", sizes=BlockSizes(heads=4, qk_rope_dim=6))
    set_kernel_policy(m, KernelPolicy(mla_prologue="triton", mla_decode="triton"))
    attn = m.attn.kernel_choice(torch.device("cpu"), torch.float32)["attn"]
    assert "triton prologue" not in attn and attn.count("qk_rope_dim 6 is not a power of two") == 2, attn


# ---------------------------------------------------------------- presets
def _mla_params(dim, heads, q, kv, nope, rope, v):
    q_part = dim * heads * (nope + rope) if q == 0 else dim * q + q + q * heads * (nope + rope)
    return q_part + dim * (kv + rope) + kv + kv * heads * (nope + v) + heads * v * dim


def _moe_params(dim, n, inter, shared):
    return n * 3 * dim * inter + 3 * dim * shared + n * dim


@pytest.mark.parametrize("preset", [p for p in PRESETS if not p.startswith("mamba-")])
def test_mla_presets_at_full_size_on_the_meta_device(preset):
    """The published shape, counted without memory: MLA and MoE parameters from the config's numbers."""
    p = PRESETS[preset]
    z = BlockSizes(**p.sizes)
    with torch.device("meta"):
        mla = build_model("MLABlock", p.dim, "fast", sizes=z)
        mamba = build_model("MambaDecoderBlock", p.dim, "fast", sizes=z)
    r = z.resolved(p.dim)
    attn = sum(q.numel() for q in mla.attn.parameters())
    assert attn == _mla_params(p.dim, r["heads"], r["q_lora_rank"], r["kv_lora_rank"], r["qk_nope_dim"],
                               r["qk_rope_dim"], r["v_head_dim"])
    moe = _moe_params(p.dim, r["n_experts"], r["expert_dim"], r["shared_expert_dim"])
    assert sum(q.numel() for q in mla.moe.parameters()) == moe
    assert sum(q.numel() for q in mamba.moe.parameters()) == moe   # the same MoE in the Mamba block
    if preset == "deepseek-v3":   # 187,105,280 MLA weights per layer (+ the two norms), 256 x 3 x 7168 x 2048 experts
        assert attn == 187_105_280 + 1536 + 512
        assert moe == 257 * 3 * 7168 * 2048 + 256 * 7168


def _reduced(p):
    """A preset at width 64: the expert counts, top-k, shared-expert ratio and Mamba state kept,
    every width scaled down."""
    z = dict(p.sizes)
    for k, small in dict(expert_dim=16, heads=4, kv_lora_rank=16, qk_nope_dim=8, qk_rope_dim=8, v_head_dim=8).items():
        if k in z:
            z[k] = min(z[k], small)
    if "shared_expert_dim" in z:
        z["shared_expert_dim"] = 16 * max(1, p.sizes["shared_expert_dim"] // p.sizes["expert_dim"])
    if z.get("q_lora_rank"):
        z["q_lora_rank"] = 12
    if "dt_rank" in z:
        z["dt_rank"] = math.ceil(64 / 16)
    return BlockSizes(**z)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_build_and_run_at_reduced_width(preset):
    z = _reduced(PRESETS[preset])
    x = torch.randn(1, 4, 64)
    for name in ("Regular Mamba", "MambaDecoderBlock", "MLABlock"):
        m = build_model(name, 64, "fast", max_seq_len=16, sizes=z).eval()
        with torch.no_grad():
            assert torch.isfinite(m(x)).all(), name
    assert build_model("MLABlock", 64, sizes=z).moe.n_experts == PRESETS[preset].sizes.get("n_experts", 6)


def test_presets_cite_their_source():
    for p in PRESETS.values():
        assert "config.json" in p.source, p.name
    assert "one shared expert of width 2816" in PRESETS["deepseek-v2-lite"].source


@pytest.mark.parametrize("name,z", [
    ("MambaDecoderBlock", dict(d_state=8, n_experts=64, n_activated=8, expert_dim=8, shared_expert_dim=16)),
    ("MLABlock", dict(heads=4, q_lora_rank=12, kv_lora_rank=16, qk_nope_dim=8, qk_rope_dim=8, v_head_dim=8,
                      n_experts=4, n_activated=1, expert_dim=8))])
def test_train_gradients_fast_equal_reference_at_other_sizes(name, z):
    from mamba_decoder.bench.workloads import TrainStep
    ref = randomize_(build_model(name, DIM, "reference", max_seq_len=16, sizes=BlockSizes(**z)))
    fast = build_model(name, DIM, "fast", max_seq_len=16, sizes=BlockSizes(**z))
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 8, DIM)
    grads = []
    for m in (ref, fast):
        torch.manual_seed(1)
        TrainStep(m, x, keep_grads=True)()
        # an expert no token picked has no gradient on one path and zeros on the other
        grads.append({n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                      for n, p in m.named_parameters()})
    for n in grads[0]:
        # top-1: the normalized routing weight is 1 whatever the score, so the router's gradient
        # is rounding noise (about 1e-6) on both paths: compared absolutely there
        assert rel_err(grads[1][n], grads[0][n]) < 1e-4 or (grads[1][n] - grads[0][n]).abs().max() < 1e-5, n


def test_dense_small_is_off_for_many_experts_and_says_so(monkeypatch):
    """Dense-small (every expert on every token) at 64 experts top-8 would do 7x the routed work:
    the grouped path is taken at every token count, and the record's kernels say why; at the
    suite's 6 experts top-2 nothing changes, and a policy's explicit limit is kept."""
    from mamba_decoder.kernels import moe as K
    calls = []
    monkeypatch.setattr(K, "scored_dense_small", lambda *a, **k: calls.append("dense") or 1 / 0)
    big = build_model("MambaDecoderBlock", DIM, "fast", sizes=BlockSizes(n_experts=64, n_activated=8)).eval()
    with torch.no_grad():
        big(torch.randn(1, 4, DIM))
    assert calls == []
    assert "off: 64 experts top-8 would compute 7.2x the routed work" in big.moe.kernel_choice(
        torch.device("cpu"), torch.float32)["moe"]
    small = build_model("MambaDecoderBlock", DIM, "fast").eval()
    assert "off" not in small.moe.kernel_choice(torch.device("cpu"), torch.float32)["moe"]
    set_kernel_policy(big, KernelPolicy(dense_small_max_tokens=64))
    with torch.no_grad(), pytest.raises(ZeroDivisionError):
        big(torch.randn(1, 4, DIM))            # the explicit limit: dense-small again
