"""The analytic FLOP model against torch.utils.flop_counter on the reference path."""
import pytest
import torch
from helpers import randomize_
from torch.utils.flop_counter import FlopCounterMode

from mamba_decoder.bench.flops import forward_flops, peak_tflops, train_flops
from mamba_decoder.bench.registry import MODELS, build_model


def _counted(model, x, backward=False):
    with FlopCounterMode(display=False) as fc:
        y = model(x)
        if backward:
            y.float().pow(2).mean().backward()
    ops = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    # flop_counter's convolution_backward formula ignores `groups`: it bills the depthwise conv's
    # backward as a dense conv (ED times too much). Bill it at 2x the forward conv instead.
    conv_bwd = ops.get("aten.convolution_backward", 0)
    return fc.get_total_flops() - conv_bwd + (2 * ops.get("aten.convolution", 0) if conv_bwd else 0)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("shape", [(2, 32), (1, 64)], ids=lambda s: "B{}-L{}".format(*s))
def test_forward_flops_match_flop_counter(name, shape):
    B, L = shape
    model = randomize_(build_model(name, 64, "reference", max_seq_len=L)).eval()
    x = torch.randn(B, L, 64)
    with torch.no_grad():
        counted = _counted(model, x)
    # The einsum reference computes the full score matrix: compare with causal=False.
    predicted = forward_flops(model, B, L, causal=False).matmul
    assert abs(predicted - counted) / counted < 0.10, (predicted, counted)


@pytest.mark.parametrize("name", list(MODELS))
def test_train_flops_match_flop_counter(name):
    model = randomize_(build_model(name, 64, "reference", max_seq_len=32)).eval()
    x = torch.randn(2, 32, 64)
    counted = _counted(model, x, backward=True)
    model_f = forward_flops(model, 2, 32, causal=False).matmul
    assert abs(3 * model_f - counted) / counted < 0.10, (3 * model_f, counted)
    assert train_flops(model, 2, 32).matmul == 3 * forward_flops(model, 2, 32).matmul


def test_causal_attention_counts_half_the_pairs():
    model = build_model("MLABlock", 64, max_seq_len=128)
    full = forward_flops(model, 1, 128, causal=False).matmul
    causal = forward_flops(model, 1, 128, causal=True).matmul
    assert causal < full


def test_peak_table():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.0
    assert peak_tflops("Intel Xeon", "float32") is None
