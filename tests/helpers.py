import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def randomize_(module: torch.nn.Module, scale: float = 0.5) -> torch.nn.Module:
    """Give every parameter and float buffer random values (the inits hold ones and zeros that
    would hide a wrong norm weight, D skip or routing bias)."""
    with torch.no_grad():
        for name, p in list(module.named_parameters()) + list(module.named_buffers()):
            if not p.is_floating_point() or "expert_usage" in name:
                continue
            if name.endswith("A_log"):
                p.copy_(torch.rand_like(p) * 2 - 1)
            elif "adaptive_bias" in name:
                p.copy_(torch.randn_like(p) * 0.1)
            elif p.dim() == 1:
                p.copy_(1 + scale * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return module


SCAN_GRAD_NAMES = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias"]


def run_with_grads(fn, inp, h0=None, seed=1, names=SCAN_GRAD_NAMES, **kw):
    """Forward + backward of a random linear functional of (out, final state)."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inp.items()}
    h0l = h0.detach().clone().requires_grad_(True) if h0 is not None else None
    out, hf = fn(**leaves, initial_state=h0l, return_final_state=True, **kw)
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(out.shape, generator=g).to(out.device)
    gh = torch.randn(hf.shape, generator=g).to(out.device)
    ((out.float() * go).sum() + (hf * gh).sum()).backward()
    grads = {k: leaves[k].grad for k in names}
    if h0l is not None:
        grads["initial_state"] = h0l.grad
    return out.detach(), hf.detach(), grads


def small_scan_tiles(mp, triton_bdl) -> None:
    """Shrink the Triton scan's tiles through `mp` (a pytest MonkeyPatch) so the interpreter stays
    fast and partial ED blocks, time tiles and state chunks (8 steps) still occur."""
    mp.setitem(triton_bdl.FWD_TILES, "chan", dict(BLOCK_D=4, CHUNK=16, num_warps=1))
    mp.setitem(triton_bdl.FWD_TILES, "lane", dict(BLOCK_D=16, CHUNK=4, NS=2, num_warps=1))
    mp.setitem(triton_bdl.BWD_TILES, "lane", dict(BLOCK_D=16, NS=2, E=4, num_warps=1, ATOMIC=False))
    mp.setitem(triton_bdl.BWD_TILES, "lane-small", dict(BLOCK_D=8, NS=4, E=2, num_warps=1, ATOMIC=True))
    mp.setitem(triton_bdl.BWD_CONFIG, "CHUNK", 8)
