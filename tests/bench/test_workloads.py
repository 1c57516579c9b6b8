"""Decode sessions and training steps, on the CPU (CUDA graphs are checked on the GPU run)."""
import pytest
import torch
from helpers import randomize_, rel_err

from mamba_decoder.bench.registry import MODELS, build_model
from mamba_decoder.bench.workloads import DecodeSession, TrainStep


@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.parametrize("name", list(MODELS))
def test_decode_session_follows_the_full_forward(name, backend):
    model = randomize_(build_model(name, 32, backend, max_seq_len=64)).eval()
    s = DecodeSession(model, batch=2, context=6, capacity=4, device=torch.device("cpu"), dtype=torch.float32)
    s.prefill()
    outs = []
    for _ in range(3):
        with torch.inference_mode():
            outs.append(s._eager_step())
        s.pos += 1
    # the same token fed 3 times after the prompt: compare with one forward over it all
    seq = torch.cat([s.prompt] + [s.token] * 3, 1)
    with torch.inference_mode():
        want = model(seq)[:, 6:]
    assert rel_err(torch.cat(outs, 1), want) < 1e-5


def test_decode_capacity_is_enforced_and_prefill_resets():
    model = build_model("MLABlock", 32, "fast", max_seq_len=64)
    s = DecodeSession(model, 1, 4, 2, torch.device("cpu"), torch.float32)
    s.prefill()
    s.step(), s.step()
    with pytest.raises(RuntimeError, match="capacity of 2"):
        s.step()
    s.prefill()
    assert s.pos == 4
    s.step()


def test_cache_bytes_grow_for_mla_only():
    mla = DecodeSession(build_model("MLABlock", 32, max_seq_len=64), 2, 8, 8, torch.device("cpu"), torch.float32)
    mamba = DecodeSession(build_model("MambaDecoderBlock", 32), 2, 8, 8, torch.device("cpu"), torch.float32)
    assert mla.cache_bytes(16) == 2 * mla.cache_bytes(8) == 2 * 2 * 8 * (512 + 64) * 4
    assert mamba.cache_bytes(16) == mamba.cache_bytes(8) == 2 * 64 * (3 + 16) * 4
    full = DecodeSession(build_model("MLABlock", 32, max_seq_len=64), 2, 8, 8, torch.device("cpu"),
                         torch.float32, cache_kind="full")
    assert full.cache_bytes(8) == 2 * 8 * 16 * (192 + 128) * 4


def test_cuda_graph_needs_cuda():
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        DecodeSession(build_model("MambaDecoderBlock", 32, "fast"), 1, 4, 4, torch.device("cpu"),
                      torch.float32, cuda_graph=True)


@pytest.mark.parametrize("name", list(MODELS))
def test_train_step_gradients_fast_equal_reference(name):
    ref = randomize_(build_model(name, 32, "reference", max_seq_len=32))
    fast = build_model(name, 32, "fast", max_seq_len=32)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 16, 32)
    grads = []
    for m in (ref, fast):
        torch.manual_seed(1)  # the same output gradient for both
        TrainStep(m, x, keep_grads=True)()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert rel_err(grads[1][n], grads[0][n]) < 1e-4, n


def test_train_step_with_optimizer_changes_weights():
    m = build_model("MambaDecoderBlock", 32, "fast")
    before = m.norm1.weight.detach().clone()
    TrainStep(m, torch.randn(2, 8, 32), optimizer_step=True)()
    assert not torch.equal(before, m.norm1.weight)
    assert all(p.grad is None for p in m.parameters())
