"""KV cache for incremental decoding: preallocated per-layer buffers, one `append`.

It keeps keys both before RoPE (what the block store persists) and rotated (what
attention reads), so decoding never re-rotates the whole past.
"""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer (B, Hkv, max_len, D) buffers; `length` positions are filled."""

    class Layer:
        def __init__(self, owner: "KVCache", shape: tuple[int, int, int, int],
                     dtype: torch.dtype, device: torch.device | str):
            self.owner = owner
            self.k = torch.zeros(shape, dtype=dtype, device=device)  # (B, Hkv, max_len, D) pre-RoPE
            self.k_rot = torch.zeros(shape, dtype=dtype, device=device)  # rotated
            self.v = torch.zeros(shape, dtype=dtype, device=device)

        def append(self, k: torch.Tensor, v: torch.Tensor, k_rot: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, int]:
            """Write the new tokens after the cached ones.

            k, v, k_rot: (B, Hkv, T, D). Returns (rotated keys, values) of all positions
            so far, each (B, Hkv, length + T, D), and the query offset (old length).
            The owner advances `length` once every layer has appended.
            """
            start, T = self.owner.length, k.shape[2]
            end = start + T
            if end > self.k.shape[2]:
                raise ValueError(f"KV cache overflow: {end} positions > max_len={self.k.shape[2]}")
            self.k[:, :, start:end] = k
            self.k_rot[:, :, start:end] = k_rot
            self.v[:, :, start:end] = v
            return self.k_rot[:, :, :end], self.v[:, :, :end], start

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, max_len: int,
                 *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if max_len < 1:
            raise ValueError(f"max_len={max_len} must be >= 1")
        self.batch = batch
        self.length = 0
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.layers = [KVCache.Layer(self, shape, dtype, device) for _ in range(n_layers)]

    @property
    def max_len(self) -> int:
        return self.layers[0].k.shape[2]

    def reset(self) -> None:
        self.length = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for l in self.layers for t in (l.k, l.k_rot, l.v))
