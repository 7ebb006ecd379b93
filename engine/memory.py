"""The memory seam: what `LandmarkTransformer.forward(..., memory=m)` asks of a memory.

Every memory source Folio has goes through this one seam, and the model knows none of them:

  landmark retrieval      engine.retrieval.RetrievalMemory / BatchMemory
  training-free retrieval engine.training_free.TrainingFreeMemory
  folded context          engine.folded.FoldedMemory (variant A) / FoldedRecurrence (variant B)
  UIO memories            engine.uio.UIOMemory

Per forward the model calls `attend(layer, q, k, v)` once per layer with the chunk's pre-RoPE
queries (B, H, T, D), keys and values (B, Hkv, T, D): the memory owns positions (it rotates what
it needs) and returns the attention output (B, H, T, D) over whatever it adds to the chunk's own
keys. After the forward the caller calls `end_chunk()` (the memory commits the chunk: its window
grows, blocks go to the store, carries move on). Two optional hooks let a memory work on the
residual stream instead: `prefix_states(x)` returns hidden states (B, P, d) placed before the
chunk's embeddings at layer 0 (or None), and `top_states(x)` receives the top layer's hidden
states of the chunk (before the final norm).

Memories that persist in a block store also have `resume_from_store(...)` (continue a stream
after its last stored block) and `n_pos` (stream positions processed), which ingest and generate
use. Composition in one softmax: a landmark model's retrieval with a local part of one window
is folded context plus retrieval (tests/engine/test_folded.py); UIO memories join the local group
of their own attention; UIO together with retrieval in one layer is not built yet.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class MemorySource(Protocol):
    """The methods `LandmarkTransformer.forward` and ingest/generate call on `memory=`."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, H, T, D), k, v (B, Hkv, T, D) pre-RoPE -> (B, H, T, D)."""
        ...

    def end_chunk(self) -> int:
        """Commit the forward just run; returns the number of blocks put into a store (0 if none)."""
        ...


__all__ = ["MemorySource"]
