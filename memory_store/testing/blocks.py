"""A small store layout and seeded block contents, shared by the store's tests and scripts."""

from __future__ import annotations

import torch

from ..layout import StoreLayout

__all__ = ["TEST_LAYOUT", "make_blocks"]

TEST_LAYOUT = StoreLayout(n_layers=2, n_kv_heads=2, block_len=4, head_dim=8, fingerprint="test-model")


def make_blocks(n: int, seed: int, layout: StoreLayout = TEST_LAYOUT) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k, v (n, L, H, T, D) and landmarks (n, L, H, D) in the layout dtype, from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    L, H, T, D = layout.n_layers, layout.n_kv_heads, layout.block_len, layout.head_dim
    k = torch.randn((n, L, H, T, D), generator=g).to(layout.torch_dtype)
    v = torch.randn((n, L, H, T, D), generator=g).to(layout.torch_dtype)
    lm = torch.randn((n, L, H, D), generator=g).to(layout.torch_dtype)
    return k, v, lm
