"""Tensors derived from parameters (fp32 copies, stacked expert weights), cached for inference.

With autograd on and a parameter requiring grad they are rebuilt every call, so gradients reach
the parameters. Otherwise they are cached on the module and rebuilt when a parameter is replaced
or modified in place (its storage address or version counter changes). Not detected:
writes through `param.data`, which bypass the version counter; call `clear_derived(module)`.
Parameters that are inference tensors (created under torch.inference_mode) are never cached:
they have no version counter.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

_ATTR = "_derived_cache"


def derived(module: nn.Module, name: str, params: Sequence[torch.Tensor], build: Callable[[], Any]):
    """build() (a function of `params`), cached on `module` under `name` as described above."""
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        return build()
    try:
        # A parameter's storage address and version counter: a new dtype or device is new
        # storage (allocated while the old one is alive: a new address), an in-place write
        # bumps the version. Per forward on launch-bound shapes this check is host time.
        key = [(p.data_ptr(), p._version) for p in params]
    except RuntimeError:                        # inference tensors have no version counter
        with torch.no_grad():
            return build()
    cache = module.__dict__.setdefault(_ATTR, {})
    hit = cache.get(name)
    if hit is None or hit[0] != key:
        # ordinary tensors even when first called under inference_mode (a later call with
        # autograd on may save them for backward)
        with torch.inference_mode(False), torch.no_grad():
            hit = cache[name] = (key, build())
    return hit[1]


def clear_derived(module: nn.Module) -> None:
    """Drop every cached derived tensor of `module` and its submodules."""
    for m in module.modules():
        m.__dict__.pop(_ATTR, None)
