"""What is timed beyond one inference forward: training steps and token-by-token decoding.

A workload owns its state (inputs, optimizer, caches) and exposes the callables the timer runs;
it knows nothing about timing or records.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..models import MambaDecoderBlock, MLABlock, RegularMamba


class TrainStep:
    """forward + backward (+ an AdamW step) on a fresh random batch, in train mode.

    The loss is <y, g> for a fixed random g: the same backward work as a real loss at the
    block level, with nothing but the block in it."""

    def __init__(self, model: nn.Module, x: torch.Tensor, optimizer_step: bool = False,
                 keep_grads: bool = False):
        self.model, self.x, self.keep_grads = model.train(), x, keep_grads
        self.grad_out: Optional[torch.Tensor] = None   # drawn at the first call, shaped like the output
        fused = x.is_cuda
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused) if optimizer_step else None

    def __call__(self) -> None:
        y = self.model(self.x)
        if self.grad_out is None:
            self.grad_out = torch.randn_like(y)
        y.backward(self.grad_out)
        if self.opt is not None:
            self.opt.step()
        if not self.keep_grads:
            self.model.zero_grad(set_to_none=True)


class GraphedForward:
    """One inference forward captured in a CUDA graph and replayed: what a serving stack does to
    take the launch overhead of many small kernels out of small shapes. Needs a forward with no
    host sync (the fast backend); a capture failure surfaces as the config's error."""

    def __init__(self, model: nn.Module, x: torch.Tensor):
        self.model, self.x = model.eval(), x
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(3):                      # compile kernels and fill caches outside the graph
                model(x)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph):
            self.out = model(x)                     # the graph's output buffer, kept alive

    def __call__(self) -> None:
        self.graph.replay()


def supports_decode(model: nn.Module) -> bool:
    return isinstance(model, (RegularMamba, MambaDecoderBlock, MLABlock))


class DecodeSession:
    """Prefill `context` tokens, then decode one token at a time with the model's own cache.

    Every block decodes through one interface: `init_cache(batch, max_len=..., kind=...)` and
    `model(x, start_pos=..., cache=...)`, where start_pos may be a device tensor (MLA's
    CUDA-graph-safe step; Mamba's state holds its position and takes none). `cache_kind` picks
    MLA's cache: "latent" (absorb) or "full" (naive per-head K/V); Mamba has one kind. With
    `cuda_graph=True` one step is captured once and replayed (fast backend, CUDA only), at a
    device-tensor position. `capacity` is the number of tokens that can be decoded after a prefill.
    """

    def __init__(self, model: nn.Module, batch: int, context: int, capacity: int,
                 device: torch.device, dtype: torch.dtype, cache_kind: Optional[str] = None,
                 cuda_graph: bool = False):
        if not supports_decode(model):
            raise ValueError(f"{type(model).__name__} has no incremental decoding")
        self.model = model.eval()
        self.batch, self.context, self.capacity = batch, context, capacity
        self.prompt = torch.randn(batch, context, model.dim, device=device, dtype=dtype)
        self.token = torch.randn(batch, 1, model.dim, device=device, dtype=dtype)   # static input buffer
        self.cache = model.init_cache(batch, max_len=context + capacity, kind=cache_kind, device=device,
                                      dtype=dtype)
        self.pos = context
        self.pos_t = torch.tensor(context, device=device)
        # a graphed step advances the device position only where it is read: Mamba's state holds its own
        self.advances_pos_t = isinstance(model, MLABlock)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        if cuda_graph:
            if device.type != "cuda":
                raise ValueError("CUDA graphs need a CUDA device (got --device cpu)")
            self._capture()

    # -- state
    def _caches(self) -> list:
        return self.cache if isinstance(self.cache, list) else [self.cache]   # RegularMamba: one per layer

    def _tensors(self) -> list[torch.Tensor]:
        return [getattr(c, f.name) for c in self._caches() for f in fields(c)]

    def cache_bytes(self, length: Optional[int] = None) -> int:
        """Bytes the cache holds for `length` positions (default: the current one)."""
        n = self.pos if length is None else length
        return sum(c.nbytes(n) for c in self._caches())

    def prefill(self) -> None:
        """Reset the cache and run the prompt through it (in place: a captured graph stays valid)."""
        with torch.inference_mode():
            for t in self._tensors():
                t.zero_()
            self.model(self.prompt, start_pos=0, cache=self.cache)
        self.pos = self.context
        self.pos_t.fill_(self.context)

    # -- one token
    def _eager_step(self) -> Any:
        return self.model(self.token, start_pos=self.pos, cache=self.cache)

    def _graph_step(self) -> Any:
        out = self.model(self.token, start_pos=self.pos_t, cache=self.cache)
        if self.advances_pos_t:
            self.pos_t.add_(1)
        return out

    def _capture(self) -> None:
        self.prefill()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(3):                      # warm up kernels / allocator outside the graph
                self._graph_step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph):
            self._graph_step()
        self.prefill()                              # the warm-up steps moved the state: start over

    def step(self) -> None:
        if self.pos >= self.context + self.capacity:
            raise RuntimeError(f"decoded past the cache's capacity of {self.capacity} tokens")
        if self.graph is not None:
            self.graph.replay()
        else:
            with torch.inference_mode():
                self._eager_step()
        self.pos += 1

    def step_fn(self) -> Callable[[], None]:
        return self.step
