"""What the blocks take, checked at their entry: a wrong shape or dtype is a ValueError naming the
expected one, not "not enough values to unpack" from deep inside a kernel."""
from __future__ import annotations

import torch


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"shape {tuple(x.shape)}, {x.dtype}"
    return type(x).__name__


def check_hidden(x, dim: int, who: str, like: torch.Tensor) -> None:
    """x must be (batch, seq, dim) in the dtype of the block's weights `like` (any float under autocast)."""
    if (isinstance(x, torch.Tensor) and x.dim() == 3 and x.shape[-1] == dim and x.is_floating_point()
            and (x.dtype == like.dtype or torch.is_autocast_enabled(x.device.type))):
        return
    raise ValueError(f"{who} takes x of shape (batch, seq, {dim}) in {like.dtype} (its weights' dtype); "
                     f"got {_describe(x)}")


def check_tokens(x, who: str) -> None:
    """x must be token ids (batch, seq) of an integer dtype."""
    if isinstance(x, torch.Tensor) and x.dim() == 2 and not (x.is_floating_point() or x.is_complex()
                                                             or x.dtype == torch.bool):
        return
    raise ValueError(f"{who} takes token ids of shape (batch, seq), an integer dtype (torch.long); "
                     f"got {_describe(x)}")
