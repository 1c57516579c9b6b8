"""MambaDecoder: a language model of stacked MambaDecoderBlocks, optionally ending in an MLABlock."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..config import DEFAULT_BACKEND, MambaConfig, MLAConfig, MoEConfig, check_backend, rest_backend
from ..policy import KernelPolicy
from .blocks import MambaDecoderBlock, MLABlock
from .inputs import check_tokens


class MambaDecoder(nn.Module):
    """token ids (B, L) -> Embedding -> RMSNorm (post_embed_norm) -> depth x MambaDecoderBlock
    -> MLABlock (post_mamba_mla_block) -> RMSNorm -> Linear -> logits (B, L, vocab_size)."""

    def __init__(self, heads: int = 64, vocab_size: int = 50000, max_seq_len: int = 512,
                 depth: int = 6, dim: int = 512, post_embed_norm: bool = True,
                 mamba_config: Optional[MambaConfig] = None, moe_config: Optional[MoEConfig] = None,
                 post_mamba_mla_block: bool = False, backend: str = DEFAULT_BACKEND,
                 policy: Optional[KernelPolicy] = None, mla_config: Optional[MLAConfig] = None):
        super().__init__()
        for name, v in dict(heads=heads, vocab_size=vocab_size, max_seq_len=max_seq_len,
                            depth=depth, dim=dim).items():
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}={v!r} must be a positive integer")
        moe_config = moe_config or MoEConfig(dim=dim)
        self.dim, self.vocab_size, self.max_seq_len = dim, vocab_size, max_seq_len
        self.post_embed_norm, self.post_mamba_mla_block = post_embed_norm, post_mamba_mla_block
        self.backend = check_backend(backend)
        self.embedding = nn.Embedding(vocab_size, dim)
        self.norm = nn.RMSNorm(dim) if post_embed_norm else None
        self.layers = nn.ModuleList(
            [MambaDecoderBlock(dim, mamba_config, moe_config, backend, policy) for _ in range(depth)])
        # mla_config: the MLA block's whole config (its n_heads wins over `heads`)
        self.mla_block = MLABlock.from_configs(
            mla_config or MLAConfig(dim=dim, n_heads=heads, max_seq_len=max_seq_len), moe_config,
            rest_backend(backend), policy,
        ) if post_mamba_mla_block else None
        self.head = nn.Sequential(nn.RMSNorm(dim), nn.Linear(dim, vocab_size))

    def init_cache(self, batch_size: int, max_len: Optional[int] = None, device=None, dtype=None) -> list:
        """One cache per block: Mamba states, then the MLA block's latent cache (if any)."""
        caches: list = [layer.init_cache(batch_size, device, dtype) for layer in self.layers]
        if self.mla_block is not None:
            caches.append(self.mla_block.init_cache(batch_size, max_len or self.max_seq_len,
                                                    device=device, dtype=dtype))
        return caches

    def forward(self, x: torch.Tensor, start_pos: int = 0, mask: Optional[torch.Tensor] = None,
                cache: Optional[list] = None) -> torch.Tensor:
        """token ids (B, L) -> logits (B, L, vocab). With `cache` (init_cache), the tokens continue
        the cached sequence at position start_pos."""
        check_tokens(x, "MambaDecoder")
        x = self.embedding(x)                                   # (B, L, D)
        if self.norm is not None:
            x = self.norm(x)
        for i, layer in enumerate(self.layers):
            x = layer(x, None if cache is None else cache[i])
        if self.mla_block is not None:
            x = self.mla_block(x, start_pos, mask, None if cache is None else cache[-1])
        return self.head(x)                                     # (B, L, vocab)
