import pytest
import torch

from mamba_decoder.kernels.attention import join_last


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_join_last_is_cat_with_broadcast(dtype):
    """join_last equals torch.cat of a and b broadcast over a's leading dims, values and gradients
    (b's summed over the broadcast heads), for strided views as MLA passes them."""
    g = torch.Generator().manual_seed(0)
    kvb = torch.randn(2, 7, 3, 5 + 4, generator=g).to(dtype).requires_grad_()
    pe = torch.randn(2, 7, 6, generator=g).to(dtype).requires_grad_()
    a = kvb[..., :5]                                         # a strided view, as split gives
    out = join_last(a, pe.unsqueeze(2))
    ref = torch.cat([a, pe.unsqueeze(2).expand(-1, -1, 3, -1)], dim=-1)
    assert out.shape == (2, 7, 3, 11) and out.is_contiguous()
    assert torch.equal(out, ref)
    go = torch.randn(out.shape, generator=g).to(dtype)
    got = torch.autograd.grad(out, (kvb, pe), go)
    want = torch.autograd.grad(ref, (kvb, pe), go)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
