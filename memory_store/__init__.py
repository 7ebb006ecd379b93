"""memory_store: a tiered (device -> host -> zarr) persistent KV-block store behind a landmark index.

Knows nothing of models. Entry points: `TieredStore.open(where, mode, layout=..., config=...)`,
`StoreLayout`, `StoreConfig`, the tiers (`DeviceTier`, `HostTier`, `DiskTier`) and the seams the store
composes them through (`CacheTier`, `DiskLog`, `BlobStore` protocols), `LRUPolicy`,
`LandmarkIndex`, `WriterLock` (one writer per store), and the error hierarchy in `memory_store.errors`.
"""

from .commit import CommitRecord
from .config import StoreConfig
from .disk import DiskTier
from .errors import (BudgetError, ClosedError, CorruptBlockError, FormatVersionError, InvalidArgumentError,
                     LandmarkIndexError, LayoutMismatchError, ReadOnlyError, ShapeError, StoreError,
                     StoreIOError, StoreLockedError, StoreNotFoundError, StreamDeletedError, UnknownBlockError,
                     UnknownStreamError)
from .eviction import EvictionPolicy, LRUPolicy
from .index import LandmarkIndex
from .layout import StoreLayout
from .protocols import BlobStore, CacheTier, DiskLog
from .store import Block, TieredStore
from .tiers import DeviceTier, HostTier, MemoryTier, Tier
from .writer_lock import NoWriterLockWarning, WriterLock

__all__ = [
    "TieredStore", "StoreConfig", "StoreLayout", "Block", "LandmarkIndex",
    "Tier", "MemoryTier", "DeviceTier", "HostTier", "DiskTier", "CommitRecord",
    "CacheTier", "DiskLog", "BlobStore", "EvictionPolicy", "LRUPolicy", "WriterLock", "NoWriterLockWarning",
    "StoreError", "StoreNotFoundError", "LayoutMismatchError", "FormatVersionError", "ReadOnlyError", "ClosedError",
    "StoreLockedError", "StoreIOError", "StreamDeletedError", "UnknownBlockError", "UnknownStreamError", "CorruptBlockError", "InvalidArgumentError",
    "ShapeError", "BudgetError", "LandmarkIndexError",
]
