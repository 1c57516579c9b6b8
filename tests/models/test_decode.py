"""Incremental decoding equals the full forward, for every block and backend."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton MLA decode test; before any triton import

from helpers import randomize_, rel_err  # noqa: E402
from mambapy.mamba import MambaBlock  # noqa: E402

from mamba_decoder import KernelPolicy, MambaConfig, MambaDecoder, MambaDecoderBlock, MLABlock, MoEConfig  # noqa: E402
from mamba_decoder.models import MambaMixer, RegularMamba, set_kernel_policy  # noqa: E402

D = 40
MOE = MoEConfig(dim=D, n_experts=4, n_activated=2, expert_inter_dim=48)


def _build(name, backend):
    if name == "Regular Mamba":
        return RegularMamba(MambaConfig(d_model=D, n_layers=2), backend)
    if name == "MambaDecoderBlock":
        return MambaDecoderBlock(D, MambaConfig(d_model=D, n_layers=1), MOE, backend)
    if name == "MLABlock":
        return MLABlock(dim=D, n_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                        v_head_dim=12, n_experts=4, n_activated=2, expert_inter_dim=48, backend=backend)
    return MambaDecoder(heads=4, vocab_size=61, max_seq_len=32, depth=2, dim=D,
                        mamba_config=MambaConfig(d_model=D, n_layers=1), moe_config=MOE,
                        post_mamba_mla_block=True, backend=backend)


def _run(model, name, x, prefill, max_len):
    """Prefill `prefill` tokens, then one token at a time."""
    B = x.shape[0]
    if name == "MLABlock":
        cache = model.init_cache(B, max_len)
        step = lambda chunk, pos: model(chunk, pos, None, cache)  # noqa: E731
    elif name == "MambaDecoder":
        cache = model.init_cache(B, max_len)
        step = lambda chunk, pos: model(chunk, pos, None, cache)  # noqa: E731
    else:
        cache = model.init_cache(B)
        step = lambda chunk, pos: model(chunk, cache)  # noqa: E731
    outs = [step(x[:, :prefill], 0)]
    for t in range(prefill, x.shape[1]):
        outs.append(step(x[:, t:t + 1], t))
    return torch.cat(outs, 1)


@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.parametrize("name", ["Regular Mamba", "MambaDecoderBlock", "MLABlock", "MambaDecoder"])
@pytest.mark.parametrize("prefill", [1, 7])
def test_decode_equals_forward(name, backend, prefill):
    model = randomize_(_build(name, backend)).eval()
    x = torch.randint(0, 61, (2, 13)) if name == "MambaDecoder" else torch.randn(2, 13, D)
    with torch.no_grad():
        want = model(x)
        got = _run(model, name, x, prefill, 16)
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("name", ["Regular Mamba", "MambaDecoderBlock", "MLABlock"])
def test_fast_decode_in_bf16_follows_fp32(name):
    model = randomize_(_build(name, "fast")).eval()
    x = torch.randn(2, 10, D)
    with torch.no_grad():
        want = _run(model, name, x, 4, 12)
        got = _run(model.to(torch.bfloat16), name, x.bfloat16(), 4, 12)
    assert got.dtype == torch.bfloat16 and rel_err(got, want) < 3e-2


def test_reference_step_is_mambapys_step():
    ours = randomize_(MambaMixer(MambaConfig(d_model=D, n_layers=1)))
    theirs = MambaBlock(MambaConfig(d_model=D, n_layers=1))
    theirs.load_state_dict(ours.state_dict())
    cache = ours.init_cache(3)
    h, inputs = torch.zeros_like(cache.ssm), torch.zeros_like(cache.conv)
    for _ in range(4):
        x = torch.randn(3, D)
        want, (h, inputs) = theirs.step(x, (h, inputs))
        got = ours(x.unsqueeze(1), cache)[:, 0]
        assert rel_err(got, want) < 1e-6
    assert rel_err(cache.ssm, h) < 1e-6 and rel_err(cache.conv, inputs) < 1e-6


def test_mamba_cache_is_constant_and_mla_cache_grows():
    mamba = _build("MambaDecoderBlock", "fast")
    mla = _build("MLABlock", "fast")
    assert mamba.init_cache(2).nbytes() == (2 * 80 * 3 + 2 * 80 * 16) * 4
    c = mla.init_cache(2, 100)
    assert c.nbytes(50) * 2 == c.nbytes(100) == 2 * 100 * (32 + 8) * 4
    full = mla.init_cache(2, 100, kind="full")
    assert full.nbytes() == 2 * 100 * 4 * (24 + 12) * 4


@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.parametrize("kind", ["latent", "full"])
def test_mla_decode_step_with_a_tensor_position_equals_forward(backend, kind):
    model = randomize_(_build("MLABlock", backend)).eval()
    x = torch.randn(2, 11, D)
    with torch.no_grad():
        want = model(x)
        cache = model.init_cache(2, 16, kind=kind)
        outs = [model(x[:, :5], 0, None, cache)]
        for t in range(5, 11):
            outs.append(model.decode_step(x[:, t:t + 1], torch.tensor(t), cache))
    assert rel_err(torch.cat(outs, 1), want) < 1e-5


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="forcing the Triton decode on CPU needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("prefill", [1, 7])
def test_mla_block_triton_decode_step_equals_forward(prefill):
    """MLABlock.decode_step through the Triton split-K kernel (forced on CPU, interpreted),
    as the CUDA-graphed step runs it: token by token equal to the full causal forward."""
    model = set_kernel_policy(randomize_(_build("MLABlock", "fast")).eval(), KernelPolicy(mla_decode="triton"))
    x = torch.randn(3, 12, D)
    with torch.no_grad():
        want = model(x)
        cache = model.init_cache(3, 16)
        outs = [model(x[:, :prefill], 0, None, cache)]
        pos = torch.tensor(prefill)
        for t in range(prefill, 12):
            outs.append(model.decode_step(x[:, t:t + 1], pos, cache))
            pos.add_(1)                                 # in place, as a graph replay sees it
    assert rel_err(torch.cat(outs, 1), want) < 1e-5


# -- the fused Triton decode step (and the Triton conv of the channel-major prefill), forced on
# CPU tensors under TRITON_INTERPRET=1 (set at the top of this module without CUDA)

NEEDS_INTERPRET = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                     reason="forcing the Triton kernels on CPU needs TRITON_INTERPRET=1")


def _force_fused(model, layout):
    mixers = [m for m in model.modules() if isinstance(m, MambaMixer)]
    for m in mixers:
        m.policy = KernelPolicy(mamba_fused="triton", mamba_layout=layout)
    return mixers


def _count_kernel_calls(monkeypatch):
    from mamba_decoder.kernels import causal_conv, mamba_step

    calls = {"conv_step": 0, "ssm_step": 0, "causal_conv1d_silu": 0}
    for mod, name in ((mamba_step, "conv_step"), (mamba_step, "ssm_step"),
                      (causal_conv, "causal_conv1d_silu")):
        real = getattr(mod, name)

        def wrapped(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)
        monkeypatch.setattr(mod, name, wrapped)
    return calls


@NEEDS_INTERPRET
@pytest.mark.parametrize("name,layout,batch", [   # both blocks, layouts and an odd / unit batch
    ("Regular Mamba", "BDL", 3), ("Regular Mamba", "BLD", 1),
    ("MambaDecoderBlock", "BDL", 1), ("MambaDecoderBlock", "BLD", 3)])
def test_fused_triton_decode_equals_forward(name, layout, batch, monkeypatch):
    model = randomize_(_build(name, "fast")).eval()
    x = torch.randn(batch, 13, D)
    with torch.no_grad():
        want = model(x)                                   # PyTorch ops only on CPU
        mixers = _force_fused(model, layout)
        calls = _count_kernel_calls(monkeypatch)
        got = _run(model, name, x, 7, 16)
    assert rel_err(got, want) < 1e-5
    n_steps = (13 - 7) * len(mixers)
    assert calls["conv_step"] == calls["ssm_step"] == n_steps
    # the cached BDL prefill runs the Triton conv (initial state in, new state written in place)
    assert calls["causal_conv1d_silu"] == (len(mixers) if layout == "BDL" else 0)


@NEEDS_INTERPRET
def test_fused_triton_decode_in_bf16_follows_fp32():
    name = "MambaDecoderBlock"
    model = randomize_(_build(name, "fast")).eval()
    x = torch.randn(3, 10, D)
    with torch.no_grad():
        want = _run(model, name, x, 4, 12)               # fp32, PyTorch ops
        _force_fused(model, "BDL")
        got = _run(model.to(torch.bfloat16), name, x.bfloat16(), 4, 12)
    assert got.dtype == torch.bfloat16 and rel_err(got, want) < 3e-2


@NEEDS_INTERPRET
@pytest.mark.parametrize("name", ["MambaDecoderBlock", "MLABlock"])
def test_decode_steps_with_autograd_on_keep_every_gradient(name, monkeypatch):
    """A one-token step with autograd on must not take the Triton step kernels (no backward),
    even with the input projection frozen: every other parameter still gets its gradient."""
    calls = _count_kernel_calls(monkeypatch)
    from mamba_decoder.kernels import mla_decode as md
    mla_calls = []
    real = md.mla_decode
    monkeypatch.setattr(md, "mla_decode", lambda *a, **k: mla_calls.append(1) or real(*a, **k))
    model = randomize_(_build(name, "fast"))
    if name == "MambaDecoderBlock":
        _force_fused(model, "BDL")
        model.mixer.in_proj.weight.requires_grad_(False)
        cache = model.init_cache(2)
        out = model(torch.randn(2, 1, D), cache)
    else:
        model.attn.policy = KernelPolicy(mla_decode="triton")
        model.attn.wq.weight.requires_grad_(False)
        cache = model.init_cache(2, 8)
        model(torch.randn(2, 3, D), 0, None, cache)
        out = model(torch.randn(2, 1, D), 3, None, cache)
    out.square().sum().backward()
    assert calls["conv_step"] == calls["ssm_step"] == 0 and not mla_calls
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad and "gate" not in n
               and "experts" not in n]   # (unrouted experts get no gradient, as in the reference)
    assert trained and all(p.grad is not None for _, p in trained), \
        [n for n, p in trained if p.grad is None]


def test_one_decoding_interface_for_every_block():
    """init_cache(batch, max_len=...) and block(x, start_pos=..., cache=...) for all three blocks;
    a device-tensor start_pos is MLA's graph-safe step and equals the int-position forward."""
    torch.manual_seed(0)
    x = torch.randn(2, 9, D)
    for name in ("Regular Mamba", "MambaDecoderBlock", "MLABlock"):
        model = randomize_(_build(name, "fast")).eval()
        with torch.no_grad():
            want = model(x)
            outs = {}
            for pos_kind in ("int", "tensor"):
                cache = model.init_cache(2, max_len=16)
                seq = [model(x[:, :5], start_pos=0, cache=cache)]
                for t in range(5, 9):
                    pos = t if pos_kind == "int" else torch.tensor(t)
                    seq.append(model(x[:, t:t + 1], start_pos=pos, cache=cache))
                outs[pos_kind] = torch.cat(seq, 1)
        assert rel_err(outs["int"], want) < 1e-5 and rel_err(outs["tensor"], want) < 1e-5, name
    mla = _build("MLABlock", "fast")
    with pytest.raises(ValueError, match="a tensor start_pos is one decoding step"):
        mla(x, start_pos=torch.tensor(0), cache=mla.init_cache(2, 16))
