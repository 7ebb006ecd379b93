"""The seams a TieredStore composes through, declared as the methods it really calls.

`Tier` (tiers.py) is the small keyed-cache interface every tier offers (get/put/delete/
contains and batched forms). The store needs more than that from each kind of tier, and
these protocols name exactly what:

- `CacheTier`: a memory tier of the read cascade (reads.py): batched reads, the policy's
  victims, slot-to-slot demotion, budgets. DeviceTier and HostTier implement it.
- `DiskLog`: the persistent log of rows (store.py, write_behind.py, reads.py): bulk row
  writes, batched reads into caller buffers, the commit protocol. DiskTier implements it.
- `BlobStore`: where the derived landmark index is saved (index_io.py). DiskTier too.

They are `runtime_checkable`, so tests/memory_store/test_tiers.py checks each implementation
against its protocol as well as for behaviour.
Shape letters: M entries, N rows, L layers, H KV heads, T block_len, D head_dim.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from .commit import CommitRecord
from .layout import StoreLayout

__all__ = ["CacheTier", "DiskLog", "BlobStore"]

Key = tuple[int, int]  # (block_id, layer)


@runtime_checkable
class CacheTier(Protocol):
    """A bounded memory tier: entries (block_id, layer) -> K, V (H, T, D) in slab slots."""

    name: str
    layout: StoreLayout
    budget_bytes: int

    @property
    def max_entries(self) -> int: ...
    @property
    def free_entries(self) -> int: ...
    @property
    def device(self) -> torch.device: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def allocated_bytes(self) -> int: ...
    def __len__(self) -> int: ...

    def contains(self, key: Key) -> bool: ...
    def delete(self, key: Key) -> bool: ...
    def delete_many(self, keys: Sequence[Key]) -> int: ...
    def put_many(self, keys: Sequence[Key], k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v (M, H, T, D); BudgetError (nothing stored) when the new keys do not fit."""
    def get_stacked(self, keys: Sequence[Key]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """K, V (M, H, T, D); None (nothing touched) when any key misses."""
    def gather_heads(self, keys: Sequence[Key], pos: np.ndarray, heads: np.ndarray
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Row i: head heads[i] of entry keys[pos[i]], K, V (n, T, D); None when any key misses."""
    def victim_keys(self, n: int) -> list[Key]: ...
    def evict(self, n: int) -> list[Key]: ...
    def pop_victims(self, n: int) -> tuple[list[Key], torch.Tensor, torch.Tensor]: ...
    def can_copy_from(self, src: CacheTier) -> bool: ...
    def put_from(self, src: CacheTier, keys: Sequence[Key]) -> None: ...
    def close(self) -> None: ...


@runtime_checkable
class BlobStore(Protocol):
    """Small named blobs beside the data (the saved landmark index)."""

    def write_blob(self, key: str, data: bytes | bytearray) -> None: ...
    def read_blob(self, key: str) -> bytes | None: ...
    def list_dir(self, prefix: str) -> list[str]: ...
    def delete_prefix(self, prefix: str) -> None: ...


@runtime_checkable
class DiskLog(BlobStore, Protocol):
    """The persistent, append-only log of rows and its commit record (see commit.py)."""

    where: str
    layout: StoreLayout

    @property
    def gone(self) -> bool:
        """True when the store's directory was deleted or replaced while open."""
    def check_present(self) -> None: ...

    def write_rows(self, start: int, k: np.ndarray, v: np.ndarray, landmarks: np.ndarray,
                   stream_codes: np.ndarray, ordinals: np.ndarray) -> None:
        """Rows [start, start + N): k, v (N, L, H, T, D), landmarks (N, L, H, D), storage dtype."""
    def write_rows_meta(self, start: int, stream_codes: np.ndarray, ordinals: np.ndarray) -> None: ...
    def read_layer_into(self, rows: np.ndarray, layer: int, out_k: np.ndarray, out_v: np.ndarray) -> np.ndarray:
        """Layer `layer` of rows into out_k, out_v (M, H, T, D); the found mask (M,)."""
    def read_landmarks(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
    def read_row_meta(self, n_rows: int) -> tuple[np.ndarray, np.ndarray]: ...
    def delete_rows(self, rows: Sequence[int]) -> None: ...
    def make_durable(self) -> None: ...
    def commit(self, record: CommitRecord) -> None: ...
    def close(self) -> None: ...
