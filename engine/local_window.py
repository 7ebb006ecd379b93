"""The local window of a retrieval memory: the recent positions every query attends directly.

A `LocalWindow` holds, per layer, the pre-RoPE keys and values of its positions (1, Hkv, n, D),
the store id of each complete block in it (None: not stored, e.g. a question's blocks), the
stream position of its first entry, and the chunk being processed (`pending`, per layer, until
the memory commits it). The memories (engine/retrieval.py and the batched lanes of
engine/retrieval_lanes.py, engine/training_free.py) read and change their windows only through it.

Shapes: Hkv KV heads, n window positions, T chunk positions, D head dim, L block_len.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class LocalWindow:
    """Per layer K, V (1, Hkv, n, D) pre-RoPE of the window, its blocks' ids and the pending chunk."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, block_len: int, device):
        self.L, self.device = block_len, device
        empty = torch.zeros(1, n_kv_heads, 0, head_dim, device=device)
        self.k: list[torch.Tensor] = [empty] * n_layers  # (1, Hkv, n, D) pre-RoPE
        self.v: list[torch.Tensor] = [empty] * n_layers
        self.ids: list[int | None] = []  # per complete block: its store id (None: not stored)
        self.start = 0  # stream position of the first entry
        self.pending: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layers

    def __len__(self) -> int:
        """Positions held (the same at every layer)."""
        return self.k[0].shape[2]

    def stored_ids(self) -> list[int]:
        """Store ids of the window's stored blocks (a search must not retrieve them again)."""
        return [i for i in self.ids if i is not None]

    def with_chunk(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Record the chunk's k, v (1, Hkv, T, D) as pending; returns the window's K, V followed
        by them, (1, Hkv, n + T, D) float32."""
        self.pending[layer] = (k, v)
        return torch.cat([self.k[layer], k.float()], dim=2), torch.cat([self.v[layer], v.float()], dim=2)

    def pending_len(self) -> int:
        """Positions of the pending chunk; raises RuntimeError unless every layer attended it."""
        if any(p is None for p in self.pending):
            raise RuntimeError("end_chunk() called before every layer attended this chunk")
        return self.pending[0][0].shape[2]

    def append_pending(self) -> int:
        """Move the pending chunk into the window (detached: in training a window's gradient
        stops at its own tokens, so the graph never spans windows). Returns its length."""
        T = self.pending_len()
        for layer, (k, v) in enumerate(self.pending):
            self.k[layer] = torch.cat([self.k[layer], k.detach().to(self.device).float()], dim=2)
            self.v[layer] = torch.cat([self.v[layer], v.detach().to(self.device).float()], dim=2)
        self.pending = [None] * len(self.k)
        return T

    def new_blocks(self) -> tuple[int, list[torch.Tensor], list[torch.Tensor]]:
        """The complete blocks without an id yet: their count and per layer K, V (Hkv, new*L, D)."""
        new = len(self) // self.L - len(self.ids)
        s0, n = len(self.ids) * self.L, max(new, 0) * self.L
        return max(new, 0), [k[0, :, s0:s0 + n] for k in self.k], [v[0, :, s0:s0 + n] for v in self.v]

    def droppable(self, keep_blocks: int) -> int:
        """How many of the oldest blocks `trim(keep_blocks)` drops: stored blocks beyond
        `keep_blocks` complete ones (unstored blocks stay: nothing else holds them)."""
        drop = 0
        while len(self.ids) - drop > keep_blocks and self.ids[drop] is not None:
            drop += 1
        return drop

    def drop(self, n_blocks: int) -> None:
        """Forget the oldest n_blocks blocks; the window then starts after them."""
        if n_blocks:
            n = n_blocks * self.L
            self.k = [k[:, :, n:] for k in self.k]
            self.v = [v[:, :, n:] for v in self.v]
            self.ids = self.ids[n_blocks:]
            self.start += n

    def trim(self, keep_blocks: int) -> int:
        """Drop the `droppable(keep_blocks)` oldest blocks. Returns how many."""
        n = self.droppable(keep_blocks)
        self.drop(n)
        return n

    def skip_pending(self) -> int:
        """The pending chunk went to the store as it is (whole blocks, nothing kept): the window
        stays empty and moves past it. Returns its length."""
        T = self.pending_len()
        self.pending = [None] * len(self.k)
        self.start += T
        return T

    def load(self, ids: Sequence[int], kv: Sequence[tuple[torch.Tensor, torch.Tensor]], start: int) -> None:
        """Hold stored blocks `ids` (per layer their K, V (1, Hkv, len(ids)*L, D)) from stream position start."""
        self.ids = [int(i) for i in ids]
        self.start = start
        if len(ids):
            self.k = [k for k, _ in kv]
            self.v = [v for _, v in kv]


__all__ = ["LocalWindow"]
