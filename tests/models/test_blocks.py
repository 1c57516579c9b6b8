"""The blocks and the decoder compute DESIGN.md's architecture ("Architecture of the blocks")
with the field's own modules."""
import os

import pytest
import torch
from helpers import randomize_, rel_err
from mambapy.mamba import MambaBlock
from open_kimi.mla import MLA as KimiMLA
from open_kimi.moe import MoE as KimiMoE

from mamba_decoder import MambaConfig, MambaDecoder, MambaDecoderBlock, MLABlock, MoEConfig
from mamba_decoder.kernels.attention import causal_mask

D = 48
MLA_KW = dict(n_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12)


def _mamba_block(backend="reference"):
    return MambaDecoderBlock(D, MambaConfig(d_model=D, n_layers=1),
                             MoEConfig(dim=D, n_experts=4, n_activated=2, expert_inter_dim=64),
                             backend=backend).eval()


def _mla_block(backend="reference", attn_impl="absorb"):
    return MLABlock(dim=D, **MLA_KW, max_seq_len=64, max_batch_size=2, attn_impl=attn_impl,
                    n_experts=4, n_activated=2, expert_inter_dim=64, backend=backend).eval()


def test_mamba_decoder_block_is_the_documented_diagram():
    blk = randomize_(_mamba_block())
    mixer = MambaBlock(MambaConfig(d_model=D, n_layers=1))
    mixer.load_state_dict(blk.mixer.state_dict(), strict=True)
    moe = KimiMoE(D, 4, 2, 64).eval()
    moe.load_state_dict(blk.moe.state_dict(), strict=True)
    x = torch.randn(2, 19, D)
    h = x + mixer(blk.norm1(x))
    want = h + moe(blk.norm2(h))
    assert rel_err(blk(x), want) < 1e-6
    assert {"norm1.weight", "norm2.weight", "mixer.A_log", "moe.gate.gate_weight"} <= set(blk.state_dict())


def test_mla_block_is_the_documented_diagram_and_causal():
    blk = randomize_(_mla_block())
    attn = KimiMLA(D, **MLA_KW, max_seq_len=64, max_batch_size=2)
    attn.load_state_dict(blk.attn.state_dict(), strict=True)
    moe = KimiMoE(D, 4, 2, 64).eval()
    moe.load_state_dict(blk.moe.state_dict(), strict=True)
    x = torch.randn(2, 17, D)
    h = x + attn(blk.norm1(x), 0, causal_mask(17, 17, "cpu"))
    want = h + moe(blk.norm2(h))
    assert rel_err(blk(x, start_pos=0, mask=None), want) < 1e-5


@pytest.mark.parametrize("make", [_mamba_block, _mla_block], ids=["mamba", "mla"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
def test_fast_block_equals_reference_block(make, dtype, tol):
    ref = randomize_(make("reference")).to(dtype)
    fast = make("fast").to(dtype)
    fast.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(3, 23, D, dtype=dtype)
    assert rel_err(fast(x), ref(x)) < tol


def test_mla_block_runs_any_batch_size():
    blk = randomize_(_mla_block())  # max_batch_size=2
    assert blk(torch.randn(5, 70, D)).shape == (5, 70, D)


def test_blocks_reject_mismatched_configs():
    with pytest.raises(ValueError, match="d_model=32 must equal dim=48"):
        MambaDecoderBlock(D, MambaConfig(d_model=32, n_layers=1), MoEConfig(dim=D))
    with pytest.raises(ValueError, match="moe_config.dim=512 must equal dim=48"):
        MambaDecoderBlock(D, MambaConfig(d_model=D, n_layers=1), MoEConfig())
    with pytest.raises(ValueError, match="backend='cuda'"):
        MambaDecoderBlock(D, backend="cuda")


@pytest.mark.parametrize("post_mla", [False, True])
def test_decoder_is_embedding_blocks_mla_norm_head(post_mla):
    moe = MoEConfig(dim=D, n_experts=4, n_activated=2, expert_inter_dim=64)
    model = randomize_(MambaDecoder(heads=4, vocab_size=97, max_seq_len=32, depth=2, dim=D,
                                    mamba_config=MambaConfig(d_model=D, n_layers=1), moe_config=moe,
                                    post_mamba_mla_block=post_mla)).eval()
    ids = torch.randint(0, 97, (2, 12))
    x = model.norm(model.embedding(ids))
    for layer in model.layers:
        x = layer(x)
    if post_mla:
        x = model.mla_block(x)
    want = model.head[1](model.head[0](x))
    got = model(ids, start_pos=0, mask=None)
    assert got.shape == (2, 12, 97) and rel_err(got, want) < 1e-6
    assert (model.mla_block is not None) == post_mla


def test_legacy_import_paths():
    from mamba_decoder.mamba_block import MambaConfig as MC
    from mamba_decoder.mamba_block import MambaDecoder as MD
    from mamba_decoder.mamba_block import MambaDecoderBlock as MDB
    from mamba_decoder.mamba_block import MLABlock as MB
    from mamba_decoder.mamba_block import MoEConfig as MoC
    from mamba_decoder.simple_mla import SimpleMLA
    from mamba_decoder.models import MLA

    assert (MD, MDB, MB, MC, MoC) == (MambaDecoder, MambaDecoderBlock, MLABlock, MambaConfig, MoEConfig)
    assert SimpleMLA is MLA


def test_importing_the_library_does_not_import_matplotlib_or_triton():
    import subprocess
    import sys

    code = ("import sys, mamba_decoder, mamba_decoder.mamba_block;"
            "print(any(m in sys.modules for m in ('matplotlib', 'triton')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_fast_is_the_default_backend_everywhere():
    from mamba_decoder.bench.registry import MODELS, build_model

    assert MambaDecoderBlock(D).backend == "fast" and MLABlock(dim=D, **MLA_KW).backend == "fast"
    for name in MODELS:
        model = build_model(name, 32)
        assert {m.backend for m in model.modules() if hasattr(m, "backend")} == {"fast"}, name


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="forcing the Triton conv on CPU tensors needs TRITON_INTERPRET=1")
def test_the_policy_given_is_what_runs_and_what_kernel_choice_reports(monkeypatch):
    """One decision: a policy given at construction drives the forward (counted) and the
    kernels a record names; set_kernel_policy swaps it for every part of a block."""
    from mamba_decoder import KernelPolicy
    from mamba_decoder.kernels import causal_conv
    from mamba_decoder.kernels import moe as moe_kernels
    from mamba_decoder.models import kernel_choices, set_kernel_policy

    calls = []
    for name in ("causal_conv1d_silu", "causal_conv1d_silu_torch"):
        real = getattr(causal_conv, name)
        monkeypatch.setattr(causal_conv, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    grouped = moe_kernels.routed_grouped
    monkeypatch.setattr(moe_kernels, "routed_grouped", lambda *a, **k: calls.append("grouped") or grouped(*a, **k))
    # cpu_kernels="torch": the CPU's oneDNN experts would stand in for the grouped_mm this names
    policy = KernelPolicy(mamba_fused="triton", mamba_layout="BDL", dense_small_max_tokens=0, cpu_kernels="torch")
    block = MambaDecoderBlock(32, MambaConfig(d_model=32, n_layers=1), MoEConfig(dim=32), policy=policy).eval()
    cpu = torch.device("cpu")
    if not moe_kernels.grouped_mm_works("cpu", None, torch.float32):
        pytest.skip("torch._grouped_mm does not run here")
    k = kernel_choices(block, cpu, torch.float32)
    assert k["conv"] == "triton-conv-silu" and k["moe"].startswith("grouped_mm (T > 0)")
    with torch.no_grad():
        block(torch.randn(2, 8, 32))
    assert calls == ["causal_conv1d_silu", "grouped"]
    calls.clear()
    set_kernel_policy(block, KernelPolicy(cpu_kernels="torch"))   # the defaults, CPU kernels off: PyTorch conv, dense-small
    k = kernel_choices(block, cpu, torch.float32)
    assert k["conv"] == "torch-conv1d" and "dense-small (T <= 64)" in k["moe"]
    with torch.no_grad():
        block(torch.randn(2, 8, 32))
    assert calls == []                                  # BLD on the CPU: no causal_conv kernel at all


def test_mla_block_from_typed_configs_is_the_keyword_block():
    """The spec's keyword constructor and MLABlock.from_configs build the same block (same
    parameters for the same seed); the configs are validated, naming the bad value."""
    from mamba_decoder import MLAConfig

    torch.manual_seed(0)
    flat = MLABlock(dim=D, **MLA_KW, n_experts=4, n_activated=2, backend="reference")
    torch.manual_seed(0)
    typed = MLABlock.from_configs(MLAConfig(dim=D, **MLA_KW), MoEConfig(dim=D, n_experts=4, n_activated=2),
                                  backend="reference")
    assert typed.mla_config == flat.mla_config and typed.moe_config == flat.moe_config
    a, b = flat.state_dict(), typed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="must equal mla_config.dim"):
        MLABlock.from_configs(MLAConfig(dim=D, **MLA_KW), MoEConfig(dim=2 * D))
    with pytest.raises(ValueError, match="n_heads=0"):
        MLAConfig(dim=D, n_heads=0)
