"""Triton split-K MLA decode (kernels/mla_decode.py) against absorb_ref with a length mask.

Runs under TRITON_INTERPRET=1 on CPU at small shapes. Bounds: fp32 <= 1e-5, bf16 <= 2e-2
(against an fp64 reference on the same bf16 inputs). Both the one-split path (the kernel
normalizes itself) and the multi-split path (partials + combine kernel) are covered: a small
MIN_SPLIT forces several splits on these short caches.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any triton import

from helpers import rel_err  # noqa: E402

from mamba_decoder.kernels import mla_decode as md  # noqa: E402
from mamba_decoder.kernels.attention import absorb_ref  # noqa: E402

pytestmark = pytest.mark.triton
DEV = "cuda" if torch.cuda.is_available() else "cpu"
SPLITS = {"one-split": None, "splits-of-32": dict(MIN_SPLIT=32)}


def make(B, H, C, R, T, dtype=torch.float32, seed=0):
    """Strided inputs laid out as the model has them: q_lat a (H, B, C) buffer seen as (B, H, C);
    kv / pe slices of one (B + 1, T, C + R) buffer (a cache holding more rows than the batch)."""
    g = torch.Generator().manual_seed(seed)
    q_lat = torch.randn(H, B, C, generator=g).to(DEV, dtype).transpose(0, 1)
    q_pe = torch.randn(B, H, R, generator=g).to(DEV, dtype)
    buf = torch.randn(B + 1, T, C + R, generator=g).to(DEV, dtype)
    return q_lat, q_pe, buf[:B, :, :C], buf[:B, :, C:]


def reference(q_lat, q_pe, kv, pe, n, scale):
    """absorb_ref in fp64, one query per sequence, positions >= n masked out."""
    T = kv.shape[1]
    mask = torch.zeros(1, T, dtype=torch.float64, device=kv.device)
    mask[:, n:] = float("-inf")
    d = [t.double() for t in (q_lat, q_pe, kv, pe)]
    return absorb_ref(d[0][:, None], d[1][:, None], d[2], d[3], scale, mask)[:, 0]


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("n", [1, 32, 45, 80], ids=lambda n: f"len{n}")
@pytest.mark.parametrize("B,H,C,R", [(1, 4, 32, 8), (3, 16, 48, 8)], ids=["B1-H4-C32", "B3-H16-C48"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_decode_equals_absorb_ref(dtype, tol, B, H, C, R, n, split):
    T = 80                                    # BLOCK_T 32: n=32 ends a block, 45 inside one
    q_lat, q_pe, kv, pe = make(B, H, C, R, T, dtype)
    length = torch.tensor([n], device=DEV)
    got = md.mla_decode(q_lat, q_pe, kv, pe, length, 0.3, config=SPLITS[split])
    want = reference(q_lat, q_pe, kv, pe, n, 0.3)
    assert got.shape == (B, H, C) and got.dtype == dtype
    assert rel_err(got, want) < tol


def test_split_path_is_really_taken():
    # The fixture of the test above: 3 splits of 32 for T=80 with MIN_SPLIT=32; 1 by default.
    dev = torch.device(DEV)
    assert md.split_plan(3, 80, 1, dev, dict(MIN_SPLIT=32)) == (32, 3)
    assert md.split_plan(3, 80, 1, dev)[1] == 1


def test_int_length_and_length_offset_agree_with_a_tensor_length():
    q_lat, q_pe, kv, pe = make(2, 4, 32, 16, 70)
    cfg = dict(MIN_SPLIT=32)
    want = md.mla_decode(q_lat, q_pe, kv, pe, torch.tensor([37], device=DEV), 0.25, config=cfg)
    as_int = md.mla_decode(q_lat, q_pe, kv, pe, 37, 0.25, config=cfg)
    pos = torch.tensor(36, device=DEV)          # decode_step's 0-d position, +1 in the kernel
    as_pos = md.mla_decode(q_lat, q_pe, kv, pe, pos.view(1), 0.25, length_offset=1, config=cfg)
    assert torch.equal(as_int, want) and torch.equal(as_pos, want)
    assert rel_err(want, reference(q_lat, q_pe, kv, pe, 37, 0.25)) < 1e-5


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("n", [5, 33])
def test_positions_at_or_past_length_are_never_used(n, split):
    q_lat, q_pe, kv, pe = make(2, 4, 32, 8, 100)
    length = torch.tensor([n], device=DEV)
    want = md.mla_decode(q_lat, q_pe, kv, pe, length, 0.3, config=SPLITS[split])
    kv[:, n:] = float("nan")
    pe[:, n:] = float("inf")
    got = md.mla_decode(q_lat, q_pe, kv, pe, length, 0.3, config=SPLITS[split])
    assert torch.isfinite(got).all() and torch.equal(got, want)


def test_length_clamps_to_the_cache():
    q_lat, q_pe, kv, pe = make(1, 4, 32, 8, 40)
    got = md.mla_decode(q_lat, q_pe, kv, pe, torch.tensor([1000], device=DEV), 0.3)
    assert rel_err(got, reference(q_lat, q_pe, kv, pe, 40, 0.3)) < 1e-5


def test_output_in_q_dtype_over_a_bf16_cache_and_into_strided_out():
    q_lat, q_pe, kv, pe = make(2, 4, 32, 8, 50)
    kv16, pe16 = kv.bfloat16(), pe.bfloat16()
    out = torch.full((4, 2, 32), float("nan"), device=DEV).transpose(0, 1)   # (B, H, C) view
    got = md.mla_decode(q_lat, q_pe, kv16, pe16, 50, 0.3, out=out)
    assert got is out and got.dtype == torch.float32 and torch.isfinite(out).all()
    assert rel_err(got, reference(q_lat, q_pe, kv16, pe16, 50, 0.3)) < 2e-2


def test_split_plan_at_the_benchmark_size():
    # B=8, 16 heads (one head group), a cache of 8192 + 64: every split a whole number of
    # blocks, the splits exactly cover the cache, and there are enough programs for the SMs.
    dev = torch.device(DEV)
    split, n = md.split_plan(8, 8256, 1, dev)
    bt = md.CONFIG["BLOCK_T"]
    assert split % bt == 0 and (n - 1) * split < 8256 <= n * split
    assert n <= md.CONFIG["MAX_SPLITS"] and 8 * n >= 132
    assert md.split_plan(8, 8256, 1, dev) == (split, n)     # a fixed function of the cache


@pytest.mark.parametrize("bad,match", [
    (dict(q_pe=torch.zeros(2, 4, 7)), "do not match"),
    (dict(length=torch.tensor([1.0])), "integer tensor"),
    (dict(length=0), "not in"),
])
def test_bad_arguments(bad, match):
    q_lat, q_pe, kv, pe = make(2, 4, 32, 8, 20)
    args = dict(q_lat=q_lat, q_pe=q_pe, kv=kv, pe=pe, length=torch.tensor([3]), scale=0.3)
    args.update({k: (v.to(DEV) if isinstance(v, torch.Tensor) else v) for k, v in bad.items()})
    with pytest.raises(ValueError, match=match):
        md.mla_decode(**args)


@pytest.mark.parametrize("pos_kind", ["tensor", "int"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("H,C,nope", [(4, 32, 16), (3, 40, 12)], ids=["H4-C32", "H3-C40"])
def test_prologue_equals_rope_norm_and_cache_write(H, C, nope, dtype, tol, pos_kind):
    """The prologue against its twin: open_kimi's apply_rotary_emb on the query's rope half and
    on the rope key, nn.RMSNorm on the latent, both written at pos; nothing else touched."""
    from open_kimi.mla import apply_rotary_emb, precompute_freqs_cis

    B, R, T, pos = 3, 8, 20, 13
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, nope + R, generator=g).to(DEV, dtype)
    kva = torch.randn(B, C + R, generator=g).to(DEV, dtype)
    norm = torch.nn.RMSNorm(C).to(DEV)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(C, generator=g))
    freqs = precompute_freqs_cis(R, T).to(DEV)
    ckv = torch.randn(B + 1, T, C, generator=g).to(DEV, dtype)   # rows past the batch stay
    cpe = torch.randn(B + 1, T, R, generator=g).to(DEV, dtype)
    want_q = q.clone()
    want_q[..., nope:] = apply_rotary_emb(q[:, None, :, nope:], freqs[pos:pos + 1])[:, 0]
    want_kv, want_pe = ckv.clone(), cpe.clone()
    want_kv[:B, pos] = norm.to(dtype)(kva[:, :C])
    want_pe[:B, pos] = apply_rotary_emb(kva[:, None, None, C:], freqs[pos:pos + 1])[:, 0, 0]
    p = torch.tensor([pos], device=DEV) if pos_kind == "tensor" else pos
    eps = torch.finfo(dtype).eps                                  # nn.RMSNorm's eps=None
    md.mla_decode_prologue(q, kva, p, freqs, norm.weight.to(dtype), eps, ckv[:B], cpe[:B], nope)
    assert rel_err(q, want_q) <= tol
    assert rel_err(ckv, want_kv) <= tol and rel_err(cpe, want_pe) <= tol
    assert torch.equal(ckv[B], want_kv[B]) and torch.equal(ckv[:, :pos], want_kv[:, :pos])


def test_prologue_past_the_cache_writes_nothing():
    """A device position at or past the cache end (a graph replayed once too often) leaves the
    caches and the query untouched instead of writing into the next sequence's rows."""
    from open_kimi.mla import precompute_freqs_cis

    B, H, nope, R, C, T = 2, 4, 16, 8, 32, 10
    q = torch.randn(B, H, nope + R, device=DEV)
    kva = torch.randn(B, C + R, device=DEV)
    ckv, cpe = torch.randn(B + 1, T, C, device=DEV), torch.randn(B + 1, T, R, device=DEV)
    before = [t.clone() for t in (q, ckv, cpe)]
    md.mla_decode_prologue(q, kva, torch.tensor([T], device=DEV), precompute_freqs_cis(R, 2 * T).to(DEV),
                           None, 1e-6, ckv[:B], cpe[:B], nope)
    assert all(torch.equal(a, b) for a, b in zip((q, ckv, cpe), before))
