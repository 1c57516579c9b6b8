"""On the card, where mamba_ssm and causal_conv1d import: the fast backend against the field's
fused kernels (backend="mamba_ssm") on one state dict, outputs and gradients, fp32 and bf16, and
decoding. Skipped without CUDA or mamba_ssm (CI has neither)."""
import pytest
import torch
from helpers import randomize_, rel_err

from mamba_decoder import MambaConfig
from mamba_decoder.kernels import mamba_ssm_ext
from mamba_decoder.models import MambaDecoderBlock, RegularMamba
from mamba_decoder.models.mamba import MambaMixer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or mamba_ssm_ext.import_error() is not None,
                                reason="needs CUDA and mamba_ssm")
DEV = torch.device("cuda")
TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 3e-2)}   # (forward, gradients)


def _pair(cls, dtype, **kw):
    fast = randomize_(cls(**kw, backend="fast")).to(DEV, dtype)
    peer = cls(**kw, backend="mamba_ssm").to(DEV, dtype)
    peer.load_state_dict(fast.state_dict(), strict=True)
    return fast, peer


def test_state_dict_loads_into_mamba_ssm_strictly():
    from mamba_ssm.modules.mamba_simple import Mamba
    ours = MambaMixer(MambaConfig(d_model=64, n_layers=1), backend="fast")
    peer = Mamba(64, d_state=16, d_conv=4, expand=2)
    peer.load_state_dict(ours.state_dict(), strict=True)
    shared = MambaMixer(MambaConfig(d_model=64, n_layers=1), backend="mamba_ssm")
    assert shared.state_dict().keys() == ours.state_dict().keys()
    assert shared._mamba_ssm.in_proj.weight is shared.in_proj.weight   # the same tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("d_model,d_state,shape", [(64, 16, (1, 128)), (72, 6, (2, 333)), (64, 16, (3, 1000))],
                         ids=["B1-L128", "odd-dim-N6-L333", "B3-L1000"])
def test_fast_mixer_equals_mamba_ssm(dtype, d_model, d_state, shape):
    cfg = MambaConfig(d_model=d_model, n_layers=1, d_state=d_state)
    fast, peer = _pair(MambaMixer, dtype, config=cfg)
    x = torch.randn(*shape, d_model, device=DEV, dtype=dtype, requires_grad=True)
    gy = torch.randn_like(x)
    out = {}
    for name, m in (("fast", fast), ("peer", peer)):
        y = m(x)
        out[name] = (y.detach(), torch.autograd.grad(y, [x, *m.parameters()], gy))
    tol_f, tol_g = TOL[dtype]
    assert rel_err(out["fast"][0], out["peer"][0]) < tol_f
    names = ["x"] + [n for n, _ in fast.named_parameters()]
    for n, a, b in zip(names, out["fast"][1], out["peer"][1]):
        assert rel_err(a, b) < tol_g, n


@pytest.mark.parametrize("cls,kw", [(RegularMamba, dict(config=MambaConfig(d_model=64, n_layers=2))),
                                    (MambaDecoderBlock, dict(dim=64))], ids=["regular", "block"])
def test_blocks_on_mamba_ssm_equal_fast_and_decode(cls, kw):
    fast, peer = _pair(cls, torch.float32, **kw)
    fast.eval(), peer.eval()
    x = torch.randn(2, 40, 64, device=DEV)
    with torch.no_grad():
        want = fast(x)
        assert rel_err(peer(x), want) < 1e-5
        cache = peer.init_cache(2, device=DEV, dtype=torch.float32)
        got = [peer(x[:, :25], cache)] + [peer(x[:, t:t + 1], cache) for t in range(25, 40)]
    assert rel_err(torch.cat(got, 1), want) < 1e-5
    with torch.no_grad(), pytest.raises(ValueError, match="empty cache"):
        peer(x[:, :5], cache)
