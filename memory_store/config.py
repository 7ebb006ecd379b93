"""StoreConfig: the budgets and behaviour a TieredStore is opened with (not persisted: each open chooses)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .eviction import make_policy
from .shards import check_shard_rows

__all__ = ["StoreConfig", "SyncMode", "SaveIndex", "IndexBackend"]

_MiB = 1 << 20

SyncMode = Literal["auto", "syncfs", "fsync", "none"]
SaveIndex = Literal["close", "flush", "never"]
IndexBackend = Literal["auto", "exact", "flat", "ivf", "hnsw"]
SYNC_MODES: tuple[str, ...] = SyncMode.__args__
SAVE_INDEX: tuple[str, ...] = SaveIndex.__args__


@dataclass(kw_only=True, slots=True)
class StoreConfig:
    """Budgets and behaviour of a TieredStore (not persisted: each open may choose its own)."""

    device_budget_bytes: int = 512 * _MiB
    """Most bytes the device tier allocates (0 disables the tier)."""
    host_budget_bytes: int = 2048 * _MiB
    """Most bytes the host tier allocates (0 disables the tier)."""
    device: str = "auto"
    """Where get_layer returns tensors and the device tier lives: "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:N"."""
    write_behind: bool = True
    """Write chunks on a background thread (True) or inside put_blocks (False)."""
    write_queue_bytes: int = 256 * _MiB
    """Most bytes of K/V waiting for the background writer; put_blocks waits beyond it."""
    lazy_writes: bool = False
    """Write-back instead of write-behind (needs write_behind): the writer leaves put blocks
    in the write queue (memory; reads are served from it) until the queue holds more than
    half of write_queue_bytes, a put waits for room, or flush()/close() asks; blocks whose
    stream was deleted by then are never written. For short-lived streams (training: a
    document's stream lives a few steps), whose disk writes would otherwise take CPU from
    compute. Durability is unchanged: nothing is durable before flush() in either mode."""
    writer_nice: int = 0
    """Niceness the background writer thread adds to itself (Linux; 0 keeps the process's). A niced
    writer yields the cores to compute but falls behind, so the write-behind queue (memory) fills."""
    index_backend: IndexBackend = "auto"
    """LandmarkIndex backend."""
    eviction: str = "lru"
    """Eviction policy of the memory tiers (see eviction.POLICIES)."""
    sync_mode: SyncMode = "auto"
    """Durability of local directories: "auto" (syncfs if available, else fsync), "syncfs", "fsync", "none" (tests only)."""
    save_index: SaveIndex = "close"
    """When to save the derived index: "close", "flush" (every commit) or "never" (always rebuilt on open)."""
    latency_window: int = 10_000
    """How many recent get latencies the percentiles are taken over."""
    shard_rows: int | None = 256
    """Creating a local store: blocks per shard file (appended to; see memory_store/shards.py), or None for one
    file per (block, layer) chunk (format 3's layout: creating a file costs far more than writing into one)."""

    def __post_init__(self) -> None:
        if isinstance(self.writer_nice, bool) or not isinstance(self.writer_nice, int) or not 0 <= self.writer_nice <= 19:
            raise ValueError(f"StoreConfig.writer_nice={self.writer_nice!r}: expected an int in [0, 19]")
        for name in ("device_budget_bytes", "host_budget_bytes", "write_queue_bytes"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"StoreConfig.{name}={v!r}: expected an int >= 0")
        if self.write_queue_bytes == 0:
            raise ValueError("StoreConfig.write_queue_bytes=0: expected an int >= 1")
        if not isinstance(self.lazy_writes, bool) or (self.lazy_writes and not self.write_behind):
            raise ValueError(f"StoreConfig.lazy_writes={self.lazy_writes!r}: expected a bool, and "
                             "write_behind=True with it (the writer thread holds the blocks)")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"StoreConfig.device={self.device!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
        if self.sync_mode not in SYNC_MODES:
            raise ValueError(f"StoreConfig.sync_mode={self.sync_mode!r}: expected 'auto', 'syncfs', 'fsync' or 'none'")
        if self.save_index not in SAVE_INDEX:
            raise ValueError(f"StoreConfig.save_index={self.save_index!r}: expected 'close', 'flush' or 'never'")
        make_policy(self.eviction)  # ValueError naming the allowed policies
        check_shard_rows(self.shard_rows, "StoreConfig.shard_rows")
        if not isinstance(self.latency_window, int) or self.latency_window < 1:
            raise ValueError(f"StoreConfig.latency_window={self.latency_window!r}: expected an int >= 1")

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        return torch.device(self.device)
