"""The Mixture-of-Experts feed-forward: open_kimi's `MoE`, with a `backend` switch.

The module *is* open_kimi's MoE (same parameters and buffers: gate.gate_weight,
gate.adaptive_bias, gate.expert_usage, experts.{i}.w1/w2/w3, shared_expert.w1/w2/w3). The
reference backend runs open_kimi's loop (one host sync per expert); the fast backend routes with
the same gate math and applies the experts through `kernels.moe` with no host sync: grouped GEMMs
over the sorted (token, expert) pairs, or for few tokens (decoding, small prefills) "dense-small",
every expert (the shared one folded in) on every token in two GEMMs weighted by a dense gate,
with the routing itself done inside the gate's pass on CUDA (`kernels.moe.scored_swiglu`).

The experts' weights live in two packed tensors (`MoE.pack_experts`), each expert's nn.Linear
weights views of them, so the grouped paths read them with no stacked copy: at DeepSeek-V3's
sizes (22.6 GB of bf16 expert weights) a copy per train step, saved for the backward, is what
kept a step off an 80 GB GPU. The state dict is open_kimi's all the same.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from open_kimi.moe import MoE as KimiMoE

from ..config import DEFAULT_BACKEND, MoEConfig, check_backend
from ..kernels import autocast_dtype
from ..kernels import moe as moe_kernels
from ..policy import DEFAULT_POLICY, KernelPolicy, dense_small_excess, moe_dense_small_limit
from .derived import derived


def _expert_params(experts) -> list[torch.Tensor]:
    """[w1, w2, w3 of expert 0, of expert 1, ...]: by the modules' dicts (nn.Module attribute
    lookups cost ~1 us each, and the fast path gathers these every forward)."""
    return [e._modules[n]._parameters["weight"] for e in experts for n in ("w1", "w2", "w3")]


def _packed_addresses(w13: torch.Tensor, w2: torch.Tensor) -> list[int]:
    """The data_ptr()s of [w1, w2, w3 of expert 0, ...] when they are views of the packed w13
    (E', 2I, D) (w1 = w13[e, :I], w3 = w13[e, I:]) and w2 (E', D, I)."""
    s13, s2 = w13.stride(0) * w13.element_size(), w2.stride(0) * w2.element_size()
    b13, b2, half = w13.data_ptr(), w2.data_ptr(), w13.stride(1) * (w13.shape[1] // 2) * w13.element_size()
    return [a for e in range(w13.shape[0]) for a in (b13 + e * s13, b2 + e * s2, b13 + e * s13 + half)]


_PACKED = "_packed_experts"   # the MoE's __dict__ entry: (w13, w2, their _packed_addresses)
_DEFER_PACKING = contextvars.ContextVar("defer_moe_packing", default=False)


@contextlib.contextmanager
def deferred_packing() -> Iterator[None]:
    """MoEs built inside pack their experts at their first `.to()` (`_apply`) instead of at
    construction. Packing copies: built in fp32 and packed at once, the expert weights are held
    twice in fp32 (DeepSeek-V3's 256 experts: 90 GB, more than an 80 GB GPU) before a `.to(bf16)`
    halves them; deferred, the conversion frees the fp32 weights one by one and packing then
    holds the bf16 ones twice (45 GB), briefly. The suite's builder (bench.runner) uses it."""
    token = _DEFER_PACKING.set(True)
    try:
        yield
    finally:
        _DEFER_PACKING.reset(token)


class MoE(KimiMoE):
    """open_kimi's MoE with a backend; its arguments are validated as a MoEConfig (`.config`)."""

    def __init__(self, dim: int, n_experts: int = 6, n_activated: int = 2,
                 expert_inter_dim: Optional[int] = None, shared_expert_inter_dim: Optional[int] = None,
                 use_adaptive_bias: bool = True, bias_update_rate: float = 0.01,
                 backend: str = DEFAULT_BACKEND, policy: Optional[KernelPolicy] = None):
        config = MoEConfig(dim=dim, n_experts=n_experts, n_activated=n_activated,
                           expert_inter_dim=expert_inter_dim, shared_expert_inter_dim=shared_expert_inter_dim,
                           use_adaptive_bias=use_adaptive_bias, bias_update_rate=bias_update_rate)
        super().__init__(**config.model_dump())
        self.config = config
        self.backend = check_backend(backend)
        self.policy = policy or DEFAULT_POLICY
        if not _DEFER_PACKING.get():
            self.pack_experts()

    @classmethod
    def from_config(cls, cfg: MoEConfig, backend: str = DEFAULT_BACKEND,
                    policy: Optional[KernelPolicy] = None) -> "MoE":
        return cls(**cfg.model_dump(), backend=backend, policy=policy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "reference":
            return super().forward(x)
        return self._forward_fast(x)

    def route(self, x_flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """open_kimi's MoEGate.forward, same ops in the same order, but the training-mode usage
        count is a scatter_add (bincount needs the max on the host: a sync)."""
        g = self.gate
        w, idx = moe_kernels.topk_route(F.linear(x_flat, g.gate_weight), self._route_bias(), g.top_k)
        if g.use_adaptive_bias and g.training:
            with torch.no_grad():
                flat = idx.flatten()
                usage = torch.zeros(g.n_experts, device=x_flat.device).scatter_add_(
                    0, flat, torch.ones_like(flat, dtype=torch.float32))
                usage = usage / flat.numel()
                g.adaptive_bias -= g.bias_update_rate * (usage - 1.0 / g.n_experts)
                g.expert_usage = 0.9 * g.expert_usage + 0.1 * usage
        return w, idx

    def _route_bias(self) -> Optional[torch.Tensor]:
        g = self.gate
        return g.adaptive_bias if g.use_adaptive_bias and g.adaptive_bias is not None else None

    def pack_experts(self) -> bool:
        """Move the weights of `_all_experts()` into two packed tensors, w13 (E', 2I, D) holding
        each expert's [w1; w3] and w2 (E', D, I), and point each expert's w1/w2/w3 weight (the
        same Parameter objects: optimizers and state-dict keys see no change) at its view; the
        values are unchanged, so either backend may pack. Done at construction and after `_apply`
        (`.to`, `.cuda()`, `.half()` give each parameter its own storage); the experts' weights
        must share a dtype and device (else nothing is packed). While it copies, the parameters'
        own storage and the packed tensors are both alive: twice the expert weights, briefly.
        Returns whether it packed; `packed_weights` tells whether the packing still holds."""
        self.__dict__.pop(_PACKED, None)
        try:
            params = _expert_params(self._all_experts())
        except KeyError:   # a weight moved out of _parameters (torch.nn.utils.prune, parametrizations)
            return False
        w1, w2 = params[0], params[1]
        if any((p.dtype, p.device, p.shape) != (w1.dtype, w1.device, (w2 if i % 3 == 1 else w1).shape)
               for i, p in enumerate(params)):
            return False
        (I, D), n = w1.shape, len(params) // 3
        with torch.no_grad():
            w13 = torch.empty(n, 2 * I, D, dtype=w1.dtype, device=w1.device)
            w2s = torch.empty(n, D, I, dtype=w1.dtype, device=w1.device)
            for e in range(n):
                p1, p2, p3 = params[3 * e:3 * e + 3]
                w13[e, :I].copy_(p1)
                w13[e, I:].copy_(p3)
                w2s[e].copy_(p2)
                p1.data, p2.data, p3.data = w13[e, :I], w2s[e], w13[e, I:]
        self.__dict__[_PACKED] = (w13, w2s, _packed_addresses(w13, w2s))
        return True

    def packed_weights(self, params: Optional[list] = None) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """The packed (w13, w2) of `pack_experts` while every expert weight in `params` (default:
        those of `_all_experts()`) is still its view there, else None: anything that gave a
        weight other storage (`p.data = ...`, a new Parameter, `load_state_dict(assign=True)`)
        breaks the packing, and the experts are stacked from the parameters again (a copy) until
        `pack_experts()`. One data_ptr() read per weight, no copies: per forward."""
        packed = self.__dict__.get(_PACKED)
        if packed is None:
            return None
        w13, w2, addresses = packed
        if addresses[:1] != [w13.data_ptr()] or addresses[1:2] != [w2.data_ptr()]:
            # their storage moved in place (share_memory_): the views moved with it
            addresses = _packed_addresses(w13, w2)
            self.__dict__[_PACKED] = (w13, w2, addresses)
        if params is None:
            try:
                params = _expert_params(self._all_experts())
            except KeyError:   # a weight moved out of _parameters: not a view of the packing
                return None
        return (w13, w2) if [p.data_ptr() for p in params] == addresses else None

    def _apply(self, fn, recurse=True):
        """nn.Module._apply (`.to`, `.cuda()`, `.half()`, ...), then the experts packed again
        where the conversion gave them their own storage (not after one that kept it, such as
        `.to` to the same dtype or `share_memory()`)."""
        super()._apply(fn, recurse)
        if self.packed_weights() is None:
            self.pack_experts()
        return self

    def __getstate__(self):
        """Without the packed tensors: deepcopy and pickle copy each parameter on its own (a
        Parameter's deepcopy clones its data), and `__setstate__` packs them again."""
        state = super().__getstate__()
        state.pop(_PACKED, None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        if "experts" in self._modules:
            self.pack_experts()

    def _packed_views(self, params: list) -> Optional[tuple[torch.Tensor, ...]]:
        """(w1, w2, w3, w13) over `_all_experts()` as views of the packed tensors (`params` their
        weights), where those serve: the packing holds and no gradient has to reach the
        parameters through them (autograd sees the packed tensors as constants). Else None."""
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return None
        packed = self.packed_weights(params)
        if packed is None:
            return None
        w13, w2 = packed
        I = w13.shape[1] // 2
        return w13[:, :I], w2, w13[:, I:], w13

    def stacked_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w1, w2, w3) of the routed experts stacked to (E, I, D), (E, D, I), (E, I, D): views of
        the packed tensors where `_packed_views` serve, else rebuilt every call with autograd on
        and cached otherwise (models/derived.py)."""
        views = self._packed_views(_expert_params(self._all_experts()))
        if views is not None:
            return tuple(w[:self.n_experts] for w in views[:3])
        params = _expert_params(self.experts)
        return derived(self, "stacked", params, lambda: tuple(torch.stack(params[i::3]) for i in range(3)))

    def _all_experts(self) -> list:
        """The routed experts, then the shared one where it folds in (`folds_shared_expert`)."""
        return list(self.experts) + ([self.shared_expert] if self.folds_shared_expert() else [])

    def grouped_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w1, w2, w3, w13) of kernels.moe.routed_grouped over `_all_experts()` (the shared
        expert runs as expert E on every token, weight 1). w13 (E', 2I, D) holds each expert's
        [w1; w3]; w1 and w3 are views of it. Where packed, views of the packed tensors
        (`_packed_views`: nothing copied or cached); else stacked from the parameters, cached in
        inference, and dense-small reads the same w13 storage."""
        experts = self._all_experts()
        params = _expert_params(experts)
        views = self._packed_views(params)
        if views is not None:
            return views

        def build():
            w13 = torch.stack([torch.cat([e.w1.weight, e.w3.weight]) for e in experts])
            I = experts[0].w1.weight.shape[0]
            return w13[:, :I], torch.stack([e.w2.weight for e in experts]), w13[:, I:], w13
        return derived(self, "grouped", params, build)

    def folds_shared_expert(self) -> bool:
        """Whether the shared expert runs as one more expert (gate 1) in dense-small and in the
        grouped path: it needs the routed experts' inner dim."""
        return self.shared_expert.w1.weight.shape[0] == self.experts[0].w1.weight.shape[0]

    def dense_small_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W13, W2) of kernels.moe.routed_dense_small over `_all_experts()`: W13 is the grouped
        w13 seen as (E' * 2I, D); W2 (D, E' * I) the w2's side by side. Where packed, W13 is the
        packed w13 itself and W2 (another layout) a cached copy of the w2's, kept for dense-small
        only; else one cache entry for both. One check of the expert weights per forward either
        way (decoding steps count host time)."""
        params = _expert_params(self._all_experts())
        views = self._packed_views(params)
        if views is not None:
            w2s = params[1::3]
            return (views[3].view(-1, views[3].shape[-1]),
                    derived(self, "dense_small_w2", w2s, lambda: torch.cat(w2s, dim=1)))

        def build():
            w13 = self.grouped_weights()[3]
            return w13.reshape(-1, w13.shape[-1]), torch.cat(params[1::3], dim=1)
        return derived(self, "dense_small", params, build)

    def _forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_flat = x.reshape(-1, shape[-1])                                 # (T, D)
        training = torch.is_grad_enabled() and (x.requires_grad or self.experts[0].w1.weight.requires_grad)
        # the dtype the experts' GEMMs run in: under autocast the training Function casts to its
        # dtype (so on CUDA, where grouped GEMMs take bf16 only, an fp32 x still trains grouped);
        # in inference torch._grouped_mm is not cast by autocast, so x's own
        gemm_dtype = (autocast_dtype(x_flat.device) if training else None) or x_flat.dtype
        d = self.policy.decide(x_flat.device, gemm_dtype, training)
        g = self.gate
        # In train mode the routing bias moves with each forward's picks: route() does that
        # update. Otherwise the scores alone route, fused into a Triton pass on CUDA.
        updates_bias = g.use_adaptive_bias and g.training
        if x_flat.shape[0] <= moe_dense_small_limit(self.policy, d, self.n_experts, g.top_k):
            fold = self.folds_shared_expert()
            if updates_bias:
                w, idx = self.route(x_flat)
                out = moe_kernels.routed_dense_small(x_flat, w, idx, self.n_experts, int(fold),
                                                     *self.dense_small_weights(), d.moe_triton)
            else:
                out = moe_kernels.scored_dense_small(
                    x_flat, F.linear(x_flat, g.gate_weight), self._route_bias(), g.top_k,
                    self.n_experts, int(fold), *self.dense_small_weights(), d.moe_triton)
            return (out if fold else out + self.shared_expert(x_flat)).view(shape)
        if updates_bias:
            w, idx = self.route(x_flat)
        else:
            w, idx = moe_kernels.route_scores(F.linear(x_flat, g.gate_weight), self._route_bias(), g.top_k,
                                              d.moe_triton)
        impl = self._impl(d.moe, gemm_dtype)    # rows of fp32 that fit (a width of 4k) need not in bf16
        if impl == "grouped_mm" and training:
            # training: one autograd Function with its own backward (kernels.moe); the shared
            # expert joins the grouped GEMMs where it folds in; packed weights go in as they are
            fold = self.folds_shared_expert()
            params = _expert_params(self._all_experts())
            out = moe_kernels.routed_grouped_train(x_flat, w, idx, params[0::3], params[1::3], params[2::3],
                                                   int(fold), d.moe_swiglu_train, self.packed_weights(params))
            return (out if fold else out + self.shared_expert(x_flat)).view(shape)
        if impl in ("grouped_mm", "onednn-experts"):
            w1, w2, w3, w13 = self.grouped_weights()
            kw = dict(onednn=impl == "onednn-experts", cpu_fused=d.cpu_fused)
            if self.folds_shared_expert():
                # the shared expert as one more group holding every token with weight 1: its
                # GEMMs join the grouped ones and its output the sum over slots
                T = x_flat.shape[0]
                idx = torch.cat([idx, idx.new_full((T, 1), self.n_experts)], dim=1)
                w = torch.cat([w, w.new_ones(T, 1)], dim=1)
                return moe_kernels.routed_grouped(x_flat, w, idx, w1, w2, w3, w13, d.moe_triton, **kw).view(shape)
            out = moe_kernels.routed_grouped(x_flat, w, idx, w1, w2, w3, w13, d.moe_triton, **kw)
        else:
            w1, w2, w3 = self.stacked_weights()
            out = moe_kernels.routed_experts(x_flat, w, idx, w1, w2, w3, impl=impl)
        return (out + self.shared_expert(x_flat)).view(shape)

    def _impl(self, impl: str, dtype: torch.dtype) -> str:
        """The policy's MoE path, or "dense" where the widths don't fit torch._grouped_mm
        (`kernels.moe.grouped_mm_fits`; `kernel_choice` names why)."""
        if impl in ("grouped_mm", "onednn-experts") and not moe_kernels.grouped_mm_fits(
                self.dim, self.experts[0].w1.weight.shape[0], dtype):
            return "dense"
        return impl

    def kernel_choice(self, device: torch.device, dtype: torch.dtype) -> dict[str, str]:
        if self.backend == "reference":
            return {"moe": "open_kimi-loop"}
        d, dg = self.policy.decide(device, dtype), self.policy.decide(device, dtype, grad=True)
        n, ng = (moe_dense_small_limit(self.policy, x, self.n_experts, self.gate.top_k) for x in (d, dg))
        grad = "" if ng == n else f"; {ng} with autograd"
        if n == 0 and self.policy.dense_small_max_tokens is None:   # the size rules it out: named
            grad += (f"; off: {self.n_experts} experts top-{self.gate.top_k} would compute "
                     f"{dense_small_excess(self.n_experts, self.gate.top_k):.1f}x the routed work")
        fused = moe_kernels.router_fuses(torch.device(device), dtype, self.n_experts, self.gate.top_k, d.moe_triton)
        train = (f"; train: grouped Function, swiglu={'triton' if dg.moe_swiglu_train else 'torch'}"
                 if self._impl(dg.moe, dtype) == "grouped_mm" else "")
        impl = self._impl(d.moe, dtype)
        if impl != d.moe:
            impl = (f"dense (width {self.dim} and expert width {self.experts[0].w1.weight.shape[0]}: "
                    f"grouped_mm needs rows of a multiple of 16 bytes)")
        if impl == "onednn-experts":
            impl = f"onednn per-expert GEMMs (inference), {dg.moe} with autograd"
        return {"moe": f"{impl} (T > {n}), dense-small (T <= {n}{grad}){train}",
                "router": ("triton, one launch, inside dense-small's gated pass (inference in eval mode; "
                           "torch ops in train mode or with autograd)") if fused else "torch"}
