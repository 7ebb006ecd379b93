"""The memory seams: what `LandmarkTransformer.forward(..., memory=m)` asks of a memory, and what
a memory asks of its block store.

Every memory Folio has goes through `AttentionMemory`, and the model knows none of them:

  landmark retrieval      engine.retrieval.RetrievalMemory / engine.retrieval_lanes.BatchMemory
  training-free retrieval engine.training_free.TrainingFreeMemory
  folded context          engine.folded.FoldedMemory (variant A) / FoldedRecurrence (variant B)
  UIO memories            engine.uio.UIOMemory

Per forward the model calls `attend(layer, q, k, v)` once per layer with the chunk's pre-RoPE
queries (B, H, T, D), keys and values (B, Hkv, T, D): the memory owns positions (it rotates what
it needs) and returns the attention output (B, H, T, D) over whatever it adds to the chunk's own
keys. After the forward the caller calls `end_chunk()` (the memory commits the chunk: its window
grows, blocks go to the store, carries move on). A `ResidualMemory` also works on the residual
stream: `prefix_states(x)` returns hidden states (B, P, d) placed before the chunk's embeddings
at layer 0 (or None), and `top_states(x)` receives the top layer's hidden states of the chunk
(before the final norm).

Inside a memory, a layer's attention is a composition of key sources (engine/sources.py): the
local window, landmark-retrieved blocks, compressed memory tokens, ... each contributes a
`KeyGroup` to one grouped-softmax call.

Memories that persist in a block store also have `resume_from_store(...)` (continue a stream
after its last stored block) and `n_pos` (stream positions processed), which ingest and generate
use. The store is a `BlockStore` (a `memory_store.TieredStore`, or the flat store of
bench.inference); training's batched lanes need a `LaneBlockStore` (per-head gathers, one put for
several streams).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import torch

if TYPE_CHECKING:
    from memory_store import StoreLayout


@runtime_checkable
class AttentionMemory(Protocol):
    """The methods `LandmarkTransformer.forward` and ingest/generate call on `memory=`."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, H, T, D), k, v (B, Hkv, T, D) pre-RoPE -> (B, H, T, D)."""
        ...

    def end_chunk(self) -> int:
        """Commit the forward just run; returns the number of blocks put into a store (0 if none)."""
        ...


MemorySource = AttentionMemory  # the earlier name of the same seam


@runtime_checkable
class ResidualMemory(AttentionMemory, Protocol):
    """A memory that also works on the residual stream (folded context, variant B)."""

    def prefix_states(self, x: torch.Tensor) -> torch.Tensor | None:
        """x (B, T, d) the chunk's embeddings -> hidden states (B, P, d) placed before them, or None."""
        ...

    def top_states(self, x: torch.Tensor) -> None:
        """Receives the top layer's hidden states (B, T, d) of the chunk (before the final norm)."""
        ...


@runtime_checkable
class BlockIndex(Protocol):
    """The search a memory runs on a store's index (`memory_store.LandmarkIndex`)."""

    def search(self, layer: int, queries: torch.Tensor, k: int,
               streams: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (Q, Hkv, D) -> ids, scores (Q, Hkv, k): top-k blocks per query and KV head."""
        ...

    def search_max(self, layer: int, queries: torch.Tensor, k: int,
                   streams: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (Q, Hkv, D) -> ids, scores (1, Hkv, k): top-k by the best score over the queries."""
        ...


@runtime_checkable
class LaneIndex(BlockIndex, Protocol):
    """An index that searches several lanes at once, each over its own streams."""

    def search_max_lanes(self, layer: int, queries: torch.Tensor, k: int, streams: Sequence[Sequence[str]],
                         key_map: torch.Tensor | None = None, *, heads_first: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """`search_max` per lane: queries (B, Q, Hkv, D) (heads_first: (B, Hkv, Q, D)) -> (B, Hkv, k)."""
        ...


@runtime_checkable
class BlockStore(Protocol):
    """What the memories call on a block store: blocks of (n_layers, Hkv, L, D) K and V under
    streams, with a landmark (or block-key) index."""

    layout: StoreLayout
    device: torch.device
    index: BlockIndex

    def __len__(self) -> int: ...

    def put_blocks(self, stream: str, k: torch.Tensor, v: torch.Tensor, landmarks: torch.Tensor) -> np.ndarray:
        """k, v (N, n_layers, Hkv, L, D), landmarks (N, n_layers, Hkv, D) -> the new ids (N,)."""
        ...

    def get_layer(self, ids: Sequence[int] | torch.Tensor, layer: int, *, promote: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of `layer` of those blocks, (M, Hkv, L, D) each, in the order given."""
        ...

    def block_meta(self, ids: Sequence[int] | torch.Tensor) -> tuple[list[str], np.ndarray]:
        """(streams, ordinals) of those blocks."""
        ...

    def stream_blocks(self, stream: str) -> np.ndarray:
        """The stream's block ids in stream order."""
        ...


@runtime_checkable
class LaneBlockStore(BlockStore, Protocol):
    """A store training's batched lanes run on: one gather of every lane's and head's own blocks,
    one put of every lane's window, one search over every lane's streams (index.search_max_lanes)."""

    def get_heads(self, sel: torch.Tensor, layer: int, *, promote: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """sel (B, Hkv, k) ids (-1 none) -> K, V (B, Hkv, k, L, D), zeros where none."""
        ...

    def put_streams(self, parts: Sequence[tuple[str, int]], k: torch.Tensor, v: torch.Tensor,
                    landmarks: torch.Tensor, *, copy: bool = True) -> list[np.ndarray]:
        """`put_blocks` for several (stream, n_blocks) parts in one call; returns each part's ids."""
        ...


def lanes_store(store: object) -> bool:
    """Whether `store` can serve batched lanes (a `LaneBlockStore` whose index searches lanes)."""
    return isinstance(store, LaneBlockStore) and isinstance(store.index, LaneIndex)


__all__ = ["AttentionMemory", "BlockIndex", "BlockStore", "LaneBlockStore", "LaneIndex", "MemorySource", "ResidualMemory", "lanes_store"]
