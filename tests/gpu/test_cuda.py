"""On a CUDA device: every fast path against its reference twin, CUDA graphs against eager.

Skipped without CUDA (CI has none); run on the GPU machine with `pytest tests/gpu`.
"""
import pytest
import torch
from helpers import randomize_, rel_err

from mamba_decoder.bench.registry import MODELS, build_model
from mamba_decoder.bench.workloads import DecodeSession
from mamba_decoder.kernels import moe as moe_kernels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEV = torch.device("cuda")


def _pair(name, dim=256, seq=512):
    ref = randomize_(build_model(name, dim, "reference", max_seq_len=seq)).to(DEV).eval()
    fast = build_model(name, dim, "fast", max_seq_len=seq).to(DEV).eval()
    fast.load_state_dict(ref.state_dict(), strict=True)
    return ref, fast


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("shape", [(1, 128), (2, 333), (4, 512)], ids=lambda s: "B{}-L{}".format(*s))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
def test_fast_block_equals_reference_on_cuda(name, shape, dtype, tol):
    ref, fast = _pair(name)
    x = torch.randn(*shape, 256, device=DEV, dtype=dtype)
    with torch.no_grad():
        ref, fast = ref.to(dtype), fast.to(dtype)
        # The same dtype on both sides: a bf16 router may pick other experts than an fp32 one on
        # near ties (seen: 3.3% at B1-L128), which is not the fast path's doing.
        want = ref(x)
        got = fast(x)
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert rel_err(got, want) < tol      # fp32: allows TF32 in cuDNN's conv


@pytest.mark.parametrize("name", list(MODELS))
def test_graphed_forward_equals_eager(name):
    from mamba_decoder.bench.workloads import GraphedForward

    _, fast = _pair(name)
    x = torch.randn(2, 256, 256, device=DEV, dtype=torch.bfloat16)
    fast = fast.to(torch.bfloat16)
    with torch.inference_mode():
        want = fast(x)
    g = GraphedForward(fast, x)
    with torch.inference_mode():
        g.out.fill_(float("nan"))   # poison: the replay must write every element
    g()
    assert rel_err(g.out, want) < 1e-2 and torch.isfinite(g.out).all()


@pytest.mark.parametrize("name", list(MODELS))
def test_fast_gradients_equal_reference_on_cuda(name):
    ref, fast = _pair(name, dim=128, seq=256)
    x = torch.randn(2, 200, 128, device=DEV)
    g = torch.randn_like(x)
    for m in (ref, fast):
        m.train()
        m(x).backward(g)
    for (n, pr), (_, pf) in zip(ref.named_parameters(), fast.named_parameters()):
        if pr.grad is not None:
            assert rel_err(pf.grad, pr.grad) < 2e-3, n


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_routed_experts_on_cuda(dtype):
    T, D, E, I, k = 1000, 256, 6, 512, 2
    x = torch.randn(T, D, device=DEV, dtype=dtype)
    w = torch.rand(T, k, device=DEV).softmax(-1)
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).to(DEV)
    w1, w3 = (torch.randn(E, I, D, device=DEV, dtype=dtype) / D ** 0.5 for _ in range(2))
    w2 = torch.randn(E, D, I, device=DEV, dtype=dtype) / I ** 0.5
    want = moe_kernels.routed_loop(x.float(), w, idx, w1.float(), w2.float(), w3.float())
    got = moe_kernels.routed_experts(x, w, idx, w1, w2, w3)
    assert rel_err(got, want) < (2e-2 if dtype == torch.bfloat16 else 1e-3)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_cuda_graph_decode_equals_eager(name, dtype):
    torch.manual_seed(0)
    model = randomize_(build_model(name, 256, "fast", max_seq_len=512)).to(DEV, dtype).eval()
    outs = {}
    for graph in (False, True):
        torch.manual_seed(1)
        s = DecodeSession(model, 4, 100, 8, DEV, dtype, cuda_graph=graph)
        s.prefill()
        for _ in range(5):
            s.step()
        outs[graph] = [t.clone() for t in s._tensors()]
    for a, b in zip(outs[False], outs[True]):
        assert rel_err(b, a) < (2e-2 if dtype == torch.bfloat16 else 1e-4)


# -- Triton split-K decode over MLA's latent cache, at the benchmark's sizes.

@pytest.mark.parametrize("length", [1, 513, 8192])
def test_triton_mla_decode_equals_absorb_ref_on_cuda(length):
    from mamba_decoder.kernels.attention import absorb_ref
    from mamba_decoder.kernels.mla_decode import mla_decode

    B, H, C, R, T = 8, 16, 512, 64, 8192 + 64
    g = torch.Generator(device=DEV).manual_seed(0)
    a = torch.randn(B + 1, T, C, device=DEV, generator=g).bfloat16()     # cache rows beyond B
    b = torch.randn(B + 1, T, R, device=DEV, generator=g).bfloat16()
    kv, pe = a[:B], b[:B]
    q_lat = torch.randn(H, B, C, device=DEV, generator=g).bfloat16().transpose(0, 1)   # strided
    q_pe = torch.randn(B, H, R, device=DEV, generator=g).bfloat16()
    scale = 192 ** -0.5
    got = mla_decode(q_lat, q_pe, kv, pe, torch.tensor([length], device=DEV), scale)
    mask = torch.zeros(1, T, device=DEV)
    mask[:, length:] = float("-inf")
    want = absorb_ref(q_lat[:, None].float(), q_pe[:, None].float(), kv.float(), pe.float(), scale, mask)[:, 0]
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert rel_err(got, want) < 2e-2


def test_mla_block_graphed_triton_decode_step_equals_eager():
    from mamba_decoder.models import MLABlock

    torch.manual_seed(0)
    B, P, steps, T = 8, 700, 6, 1024 + 64
    model = randomize_(MLABlock(dim=512, n_heads=16, n_experts=6, n_activated=2, max_seq_len=T,
                                backend="fast")).to(DEV, torch.bfloat16).eval()
    assert "triton prologue + split-k" in model.attn.kernel_choice(DEV, torch.bfloat16)["attn"]
    x = torch.randn(B, P + steps, 512, device=DEV, dtype=torch.bfloat16)
    with torch.inference_mode():
        cache = model.init_cache(B, T)
        model(x[:, :P], 0, None, cache)
        gcache = type(cache)(*(t.clone() for t in cache.tensors()))
        want = [model.decode_step(x[:, t:t + 1], torch.tensor(t, device=DEV), cache)
                for t in range(P, P + steps)]
        tok, pos = x[:, P:P + 1].clone(), torch.tensor(P, device=DEV)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):                   # compile and warm up outside the graph
                model.decode_step(tok, pos, gcache)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model.decode_step(tok, pos, gcache)
        got = []
        for t in range(P, P + steps):
            tok.copy_(x[:, t:t + 1])
            pos.fill_(t)
            out.fill_(float("nan"))              # the replay must write every element
            graph.replay()
            got.append(out.clone())
    assert all(torch.equal(g, c) for g, c in zip(gcache.tensors(), cache.tensors()))
    for t, (g, w) in enumerate(zip(got, want)):
        assert torch.isfinite(g).all() and rel_err(g, w) < 1e-2, t
    # and the Triton steps (prologue + split-k) against the causal full forward of the attention
    with torch.inference_mode():
        h = model.norm1(x)
        full = model.attn(h)[:, P:P + steps]
        c2 = model.init_cache(B, T)
        model.attn(h[:, :P], 0, None, c2)
        steps_out = torch.cat([model.attn.decode_step(h[:, t:t + 1], torch.tensor(t, device=DEV), c2)
                               for t in range(P, P + steps)], 1)
    assert rel_err(steps_out, full) < 2e-2


# -- The fused Mamba decode step, the Triton causal conv + SiLU and the dense-small MoE, at the
# benchmark's sizes (dim 512: ED 1024, N 16, K 4; batch 8; L 2048).

@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float32, 1e-5)], ids=["bf16", "fp32"])
def test_fused_mamba_step_equals_twin_on_cuda(dtype, tol):
    from mamba_decoder.kernels import mamba_step as ms

    B, ED, N, K, R = 8, 1024, 16, 4, 32
    g = torch.Generator(device=DEV).manual_seed(0)
    rn = lambda *s: torch.randn(*s, device=DEV, generator=g)  # noqa: E731
    xz, dbc = rn(B, 2 * ED).to(dtype), rn(B, R + 2 * N).to(dtype)
    x, z, Bm, Cm = xz[:, :ED], xz[:, ED:], dbc[:, R:R + N], dbc[:, R + N:]
    state, w, cb = rn(B, ED, K - 1).to(dtype), (rn(ED, K) / 2).to(dtype), rn(ED).to(dtype)
    dt, dtb, A_log, D = (rn(B, ED) - 1).to(dtype), (rn(ED) / 2).to(dtype), rn(ED, N).to(dtype), rn(ED).to(dtype)
    h = rn(B, ED, N)
    f = (lambda t: t.float())
    s_ref = state.float().clone()                                      # the twin shifts it in place
    xc_ref = ms.conv_step_torch(f(x), s_ref, f(w), f(cb))
    y_ref, h_ref = ms.ssm_step_torch(xc_ref, f(dt), f(A_log), f(Bm), f(Cm), f(D), h, f(dtb), f(z))
    s_got, h_got = state.clone(), h.clone()
    xc = ms.conv_step(x, s_got, w, cb)
    y = ms.ssm_step(xc, dt, A_log, Bm, Cm, D, h_got, dtb, z)
    torch.cuda.synchronize()
    assert xc.dtype == y.dtype == dtype and torch.equal(s_got.float(), s_ref)
    assert rel_err(xc, xc_ref) < tol and rel_err(y, y_ref) < tol and rel_err(h_got, h_ref) < tol


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float32, 1e-5)], ids=["bf16", "fp32"])
@pytest.mark.parametrize("cached", [False, True], ids=["no-state", "cache-in-place"])
def test_triton_causal_conv_equals_twin_on_cuda(dtype, tol, cached, monkeypatch):
    from mamba_decoder.kernels.causal_conv import causal_conv1d_silu, causal_conv1d_silu_torch

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)   # an exact fp32 twin
    B, ED, L, K = 8, 1024, 2048, 4
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(B, ED, L, device=DEV, generator=g).to(dtype)
    w = (torch.randn(ED, K, device=DEV, generator=g) / 2).to(dtype)
    b = torch.randn(ED, device=DEV, generator=g).to(dtype)
    s0 = torch.randn(B, ED, K - 1, device=DEV, generator=g).to(dtype) if cached else None
    want = causal_conv1d_silu_torch(x.float(), w.float(), b.float(), None if s0 is None else s0.float())
    state = s0.clone() if cached else None
    got = causal_conv1d_silu(x, w, b, state, state)
    assert got.dtype == dtype and rel_err(got, want) < tol
    if cached:
        assert torch.equal(state, x[:, :, -(K - 1):])


def test_triton_causal_conv_gradients_on_cuda(monkeypatch):
    from mamba_decoder.kernels.causal_conv import causal_conv1d_silu, causal_conv1d_silu_torch

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    args = [torch.randn(2, 96, 333, device=DEV), torch.randn(96, 4, device=DEV) / 2,
            torch.randn(96, device=DEV), torch.randn(2, 96, 3, device=DEV)]
    gy = torch.randn(2, 96, 333, device=DEV)
    grads = []
    for fn in (causal_conv1d_silu_torch, causal_conv1d_silu):
        leaves = [a.clone().requires_grad_() for a in args]
        (fn(*leaves) * gy).sum().backward()
        grads.append([t.grad for t in leaves])
    for name, want, got in zip(["x", "weight", "bias", "initial_state"], *grads):
        assert rel_err(got, want) < 1e-5, name


def test_graphed_mamba_decoder_block_decode_equals_eager():
    """MambaDecoderBlock at dim 512, batch 8, bf16: the fused Triton step + dense-small MoE,
    captured in a CUDA graph and replayed, equals eager steps; eager fused equals the PyTorch
    ops step (policy mamba_fused="torch")."""
    from mamba_decoder import KernelPolicy
    from mamba_decoder.models import MambaDecoderBlock

    torch.manual_seed(0)
    B, P, steps = 8, 300, 6
    model = randomize_(MambaDecoderBlock(512, backend="fast")).to(DEV, torch.bfloat16).eval()
    kinds = model.mixer.kernel_choice(DEV, torch.bfloat16)
    assert kinds["step"] == "triton-fused" and kinds["conv"] == "triton-conv-silu"
    assert f"dense-small (T <= {moe_kernels.dense_small_max_tokens(DEV)}" in model.moe.kernel_choice(DEV, torch.bfloat16)["moe"]
    x = torch.randn(B, P + steps, 512, device=DEV, dtype=torch.bfloat16)
    with torch.inference_mode():
        caches = {}
        for impl in ("torch", "triton", "graph"):
            model.mixer.policy = KernelPolicy(mamba_fused="torch" if impl == "torch" else "triton")
            caches[impl] = model.init_cache(B)
            model(x[:, :P], caches[impl])                        # prefill (Triton conv unless torch)
        model.mixer.policy = KernelPolicy(mamba_fused="torch")
        want = [model(x[:, t:t + 1], caches["torch"]) for t in range(P, P + steps)]
        model.mixer.policy = KernelPolicy(mamba_fused="triton")
        eager = [model(x[:, t:t + 1], caches["triton"]) for t in range(P, P + steps)]
        gcache = caches["graph"]
        tok = x[:, P:P + 1].clone()
        warm = type(gcache)(gcache.conv.clone(), gcache.ssm.clone())
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):                                   # compile, fill weight caches
                model(tok, warm)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(tok, gcache)
        got = []
        for t in range(P, P + steps):
            tok.copy_(x[:, t:t + 1])
            out.fill_(float("nan"))                              # the replay must write it all
            graph.replay()
            got.append(out.clone())
    for t in range(steps):
        assert torch.isfinite(got[t]).all() and rel_err(got[t], eager[t]) < 1e-2, t
        assert rel_err(eager[t], want[t]) < 2e-2, t
    assert rel_err(gcache.conv, caches["triton"].conv) < 1e-2
    assert rel_err(gcache.ssm, caches["triton"].ssm) < 1e-2
    assert rel_err(caches["triton"].ssm, caches["torch"].ssm) < 2e-2



# -- The fused router (routing inside the dense-small MoE's gated SwiGLU pass) against torch's
# CUDA ops bit for bit: the same experts and the same weights, ties included.

@pytest.mark.parametrize("E,k,bias", [(6, 2, True), (6, 2, False), (32, 2, True), (7, 1, True),
                                     (32, 4, True), (7, 3, True)],
                         ids=["E6k2-bias", "E6k2", "E32k2-bias", "E7k1-bias", "E32k4-bias", "E7k3-bias"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16], ids=["bf16", "fp32", "fp16"])
def test_fused_router_equals_torch_routing_bitwise_on_cuda(E, k, bias, dtype):
    from mamba_decoder.kernels.moe_triton import scored_swiglu_triton

    T, I = 1 << 16, 8
    g = torch.Generator(device=DEV).manual_seed(E * 10 + k)
    s = torch.randn(T, E, device=DEV, generator=g) * 2
    # a quarter on a coarse grid (exact ties in the probabilities), a quarter nearly uniform
    s[: T // 4] = torch.randint(-2, 3, (T // 4, E), device=DEV, generator=g).float() / 2
    s[T // 4: T // 2] *= 1e-3
    s = s.to(dtype)
    b = (torch.randint(-1, 2, (E,), device=DEV, generator=g).float() / 4).to(dtype) if bias else None
    H = torch.ones(T, E + 1, 2, I, device=DEV, dtype=dtype)
    H[:, :, 0] = 32                                          # silu(32) * 1 = 32: out / 32 is the gate
    gate = scored_swiglu_triton(H.view(T, -1), s, b, k, E, 1).view(T, E + 1, I)[:, :E, 0].float() / 32
    w, idx = moe_kernels.topk_route(s, b, k)
    want = moe_kernels.dense_gate(w, idx, E).float()
    assert torch.equal(gate != 0, want != 0), "different experts"
    if k <= moe_kernels.FUSED_ROUTER_MAX_TOPK or dtype != torch.float32:
        assert torch.equal(gate, want), f"weights differ at {int((gate != want).sum())} of {T * E}"
    else:   # the renormalizing sum of k > 2 weights in another order: an ulp (not fused: router_fuses)
        assert rel_err(gate, want) < 1e-6


@pytest.mark.parametrize("E,k,bias", [(6, 2, True), (6, 1, False), (32, 2, True)], ids=["E6k2-bias", "E6k1", "E32k2-bias"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_fused_topk_route_equals_torch_routing_bitwise_on_cuda(E, k, bias, dtype):
    """The grouped path's fused router (weights, experts) against torch's ops: the same pairs bit
    for bit (compared as dense gates: tied weights may sit in either slot)."""
    from mamba_decoder.kernels.moe_triton import topk_route_triton

    T = 1 << 16
    g = torch.Generator(device=DEV).manual_seed(E * 10 + k + 1)
    s = torch.randn(T, E, device=DEV, generator=g) * 2
    s[: T // 4] = torch.randint(-2, 3, (T // 4, E), device=DEV, generator=g).float() / 2
    s[T // 4: T // 2] *= 1e-3
    s = s.to(dtype)
    b = (torch.randint(-1, 2, (E,), device=DEV, generator=g).float() / 4).to(dtype) if bias else None
    w, idx = topk_route_triton(s, b, k)
    w_t, idx_t = moe_kernels.topk_route(s, b, k)
    assert w.dtype == w_t.dtype and torch.equal(torch.sort(idx, 1).values, torch.sort(idx_t, 1).values)
    assert torch.equal(moe_kernels.dense_gate(w, idx, E), moe_kernels.dense_gate(w_t, idx_t, E))


@pytest.mark.parametrize("T", [512, 16384], ids=["dense-small", "grouped"])
def test_fused_router_moe_equals_unfused_bitwise_on_cuda(monkeypatch, T):
    """The MoE's forward with the fused router (inside dense-small's gated pass; alone before
    the grouped GEMMs) equals the PyTorch router's bit for bit, at the benchmark's sizes."""
    from mamba_decoder.models import MoE

    from mamba_decoder.kernels import moe_triton

    moe = randomize_(MoE(512, 6, 2, backend="fast")).to(DEV, torch.bfloat16).eval()
    x = torch.randn(1, T, 512, device=DEV, dtype=torch.bfloat16)
    calls = []
    for name in ("scored_swiglu_triton", "topk_route_triton"):
        real = getattr(moe_triton, name)
        monkeypatch.setattr(moe_triton, name, lambda *a, real=real: calls.append(1) or real(*a))
    with torch.inference_mode():
        fused = moe(x)
        assert calls == [1]                                   # the fused router ran
        monkeypatch.setattr(moe_kernels, "FUSED_ROUTER_MAX_EXPERTS", 0)
        unfused = moe(x)
        assert calls == [1]                                   # and then did not
    assert torch.equal(fused, unfused)


@pytest.mark.parametrize("T,E,k", [(4096, 6, 2), (3001, 64, 8)], ids=["T4096-E6-top2", "T3001-E64-top8"])
def test_moe_training_function_equals_autograd_twin_on_cuda(T, E, k):
    """The training MoE's Function (grouped GEMMs with ragged K for the weight gradients, the
    Triton SwiGLU backward) against autograd through the PyTorch ops, bf16 and fp32 inputs
    upcast as the reference, at the benchmark's widths; the shared expert folded in."""
    D, I = 512, 1024
    n = E + 1
    x = torch.randn(T, D, device=DEV, dtype=torch.bfloat16)
    w = torch.softmax(torch.randn(T, k, device=DEV), -1).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(E, device=DEV)[:k] for _ in range(T)]) if T < 4000 else \
        torch.rand(T, E, device=DEV).topk(k, -1).indices
    ws = [[(torch.randn(*s, device=DEV) / s[-1] ** 0.5).to(torch.bfloat16) for _ in range(n)]
          for s in ((I, D), (D, I), (I, D))]
    g = torch.randn(T, D, device=DEV, dtype=torch.bfloat16)

    def run(fn, dtype):
        leaves = [t.to(dtype).clone().requires_grad_(True) for t in [x, w] + [p for l in ws for p in l]]
        out = fn(leaves[0], leaves[1], idx, leaves[2:2 + n], leaves[2 + n:2 + 2 * n], leaves[2 + 2 * n:])
        torch.autograd.backward(out, g.to(dtype))
        return [out] + [t.grad for t in leaves]

    def twin(x, w, idx, w1s, w2s, w3s):
        out = moe_kernels.routed_dense(x, w, idx, torch.stack(w1s[:E]), torch.stack(w2s[:E]), torch.stack(w3s[:E]))
        return out + torch.nn.functional.linear(torch.nn.functional.silu(x @ w1s[E].t()) * (x @ w3s[E].t()), w2s[E])

    want = run(twin, torch.float32)
    got = run(lambda *a: moe_kernels.routed_grouped_train(*a, n_always_on=1, triton=True), torch.bfloat16)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == torch.bfloat16 and torch.isfinite(a).all(), i
        assert rel_err(a, b) < 3e-2, i
