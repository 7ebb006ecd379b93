"""The memory_store error hierarchy: one root, one class per way things go wrong.

Every error the store raises on purpose derives from `StoreError`, so callers can
catch the whole family with one clause. Each message says what was wrong (the
offending value and what was expected). None of these errors is raised after a
partial mutation: a bad call leaves the stored data exactly as it was.
"""

from __future__ import annotations

import errno

__all__ = [
    "StoreError",
    "StoreNotFoundError",
    "LayoutMismatchError",
    "FormatVersionError",
    "ReadOnlyError",
    "StoreLockedError",
    "StreamDeletedError",
    "StoreIOError",
    "ClosedError",
    "UnknownBlockError",
    "UnknownStreamError",
    "CorruptBlockError",
    "InvalidArgumentError",
    "ShapeError",
    "BudgetError",
    "LandmarkIndexError",
]


class StoreError(Exception):
    """Root of every error raised on purpose by memory_store."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """No Folio store at that place (and none may be created: mode "r", or mode "a" without a layout)."""


class LayoutMismatchError(StoreError):
    """A store was opened with a layout (or model fingerprint) other than the one it was written with."""

    def __init__(self, message: str, *, stored: object = None, requested: object = None) -> None:
        super().__init__(message)
        self.stored = stored
        self.requested = requested


class FormatVersionError(StoreError):
    """The on-disk format version is not one this code can read (or the files are not a Folio store)."""


class ReadOnlyError(StoreError):
    """A mutating call was made on a store opened with mode="r", or a store whose directory
    cannot be written was opened for writing."""


class StoreLockedError(StoreError):
    """Another writer holds the store's writer lock (see writer_lock.py); raised at open, before
    anything in the store was touched. `holder` is what the lock file says about that writer
    ({"pid", "host", "since", "command"}; {} when it recorded nothing yet)."""

    def __init__(self, message: str, *, path: str, holder: dict) -> None:
        super().__init__(message)
        self.path = path
        self.holder = holder


class StoreIOError(StoreError, OSError):
    """Reading, writing, syncing, renaming or removing a file of the store failed: a full disk
    (ENOSPC), a failing one (EIO), a file system remounted read-only (EROFS), a file this user may
    not read (EACCES). `errno` and `filename` are the failed call's; the message says what the store
    was doing, e.g. "[Errno 28] store /s: writing blocks 40-45 failed (ENOSPC: No space left on
    device): '/s/kv/c.5.0.0.0.0.0'".

    Nothing is committed past the last flush() that returned, and that commit stays readable. A
    put that raised it stored nothing; blocks whose put returned are kept in memory (the
    background writer's queue) and written again: free the space and call flush() again.
    (After EIO from fsync the kernel may have dropped the pages it failed to write, so a retried
    flush can report success for data the disk never got: treat EIO as a failing disk.)"""


class ClosedError(StoreError):
    """A call was made on a store (or tier) after close()."""


class UnknownBlockError(StoreError, KeyError):
    """A block id that was never put, or was deleted."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else ""


class StreamDeletedError(StoreError):
    """A reader asked for blocks of a stream that the writer deleted after the reader opened the
    store (its chunks are gone). Names the stream and the generations; reopen to read the current state."""

    def __init__(self, message: str, *, streams: list[str], opened: int, current: int) -> None:
        super().__init__(message)
        self.streams, self.opened, self.current = streams, opened, current


class UnknownStreamError(StoreError, KeyError):
    """A stream name that holds no blocks and has no metadata."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CorruptBlockError(StoreError):
    """A stored chunk failed its checksum (or could not be decoded). Names the block and layer."""

    def __init__(self, message: str, *, block_id: int | None = None, layer: int | None = None) -> None:
        super().__init__(message)
        self.block_id = block_id
        self.layer = layer


class InvalidArgumentError(StoreError, ValueError):
    """An argument is out of range or of the wrong kind (layer index, stream name, stream metadata, k)."""


class ShapeError(InvalidArgumentError):
    """A tensor argument has the wrong shape or dtype (a StoreError and a ValueError)."""


class BudgetError(StoreError):
    """A request cannot be satisfied within the configured byte budgets."""


class LandmarkIndexError(StoreError):
    """Misuse of the landmark index (bad ids, duplicate ids, bad key shapes, unreadable saved index)."""


def io_error(e: OSError, where: str, doing: str, *, gone: bool, generation: int) -> StoreError:
    """The typed error for a failed file-system call `e` the store at `where` made while `doing`:
    StoreNotFoundError when its directory is `gone`, else StoreIOError (StoreErrors pass as they are)."""
    if isinstance(e, StoreError):
        return e
    if gone:
        return StoreNotFoundError(f"store {where}: {doing} failed: the store was deleted (its "
                                  f"directory is gone or replaced) while open ({e})")
    name = errno.errorcode.get(e.errno, str(e.errno)) if e.errno is not None else "error"
    return StoreIOError(e.errno, f"store {where}: {doing} failed ({name}: {e.strerror or e}); the "
                        f"last commit (generation {generation}) is intact", e.filename)
