"""The commit protocol: what makes a Folio store crash-safe, in one place.

The promise. A reader trusts only what the commit record (commit.json) names: rows < n_rows
whose stream is alive, and every shard's committed length. The record carries a crc32c of its
own canonical JSON ("checksum"): a record altered or damaged in place is refused by name. A writer killed at any moment
leaves either the old record or the new one, never a half-visible block, and a record is
published only after every file it names is on stable storage. So:

1. Data rows are written first, anywhere beyond the committed row count (in a shard:
   appended past its committed length). Nothing reads them yet.
2. `Durability.make_durable()` writes what is still buffered (the per-row metadata, each
   written shard's index) and then forces everything to stable storage: one `syncfs(2)` of
   the file system when libc has it, else an fsync of every file written and of every
   directory above it (zarr's LocalStore renames its temp files but never fsyncs).
3. Only then `Durability.commit()` replaces commit.json in one atomic step: for a local
   directory a temp file that is fsynced, renamed over commit.json, and the directory
   fsynced; for any other zarr store (object storage) a new object commits/g<generation>.json,
   created only if absent, the reader taking the newest (object_store.py).

Failures. A failed sync of the data files is never retried: Linux marks the pages it could
not write back clean, so a second fsync would report success for data the disk never got;
`make_durable` raises from then on and the writer must reopen (the last commit is intact).
A failed commit is retried: each attempt writes and syncs a fresh temp file, and a temp file
whose write failed is removed. A local directory deleted or replaced under the writer is
detected (device and inode) before anything is written, so no write recreates it.
"""

from __future__ import annotations

import ctypes
import json
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import crc32c
from zarr.abc.store import Store

from .errors import FormatVersionError, StoreIOError, StoreNotFoundError
from .layout import StoreLayout
from .object_store import write_commit

__all__ = ["CommitRecord", "StreamRecord", "Durability", "FORMAT_NAME", "FORMAT_VERSION", "READABLE_VERSIONS",
           "COMMIT_KEY", "SYNC_MODES"]

FORMAT_NAME = "folio-store"
FORMAT_VERSION = 4  # 2: "." chunk keys; 3: K and V in one "kv" array; 4: local stores shard kv and landmarks
READABLE_VERSIONS = (3, 4)  # a version-3 store (one file per chunk) is read and appended to as it is
COMMIT_KEY = "commit.json"
SYNC_MODES = ("auto", "syncfs", "fsync", "none")


@dataclass(slots=True)
class StreamRecord:
    """One stream (document) in the commit record."""

    name: str
    alive: bool = True
    n_blocks: int = 0  # blocks ever put = next ordinal
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class CommitRecord:
    """What a reader may trust: rows < n_rows whose stream is alive."""

    generation: int
    n_rows: int
    layout: StoreLayout
    streams: list[StreamRecord]
    writer_stats: dict[str, Any] = field(default_factory=dict)
    shards: dict[str, dict[int, int]] = field(default_factory=dict)  # array -> shard number -> committed length

    def to_json(self) -> bytes:
        d = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "generation": self.generation,
             "n_rows": self.n_rows, "layout": self.layout.to_dict(),
             "streams": [{"name": s.name, "alive": s.alive, "n_blocks": s.n_blocks, "meta": s.meta} for s in self.streams],
             "writer_stats": self.writer_stats,
             "shards": {name: {str(no): n for no, n in sorted(lengths.items())} for name, lengths in self.shards.items()}}
        d["checksum"] = _checksum(d)
        return json.dumps(d, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> CommitRecord:
        try:
            d = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FormatVersionError(f"{where}: {COMMIT_KEY} is not valid JSON ({e})") from e
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            raise FormatVersionError(f"{where}: {COMMIT_KEY} is not a {FORMAT_NAME!r} commit record")
        if d.get("format_version") not in READABLE_VERSIONS:
            raise FormatVersionError(f"{where}: store format version {d.get('format_version')!r}; "
                                     f"this code reads versions {list(READABLE_VERSIONS)}")
        if "checksum" in d:  # (records before it have none; another version's are refused above)
            body = {k: v for k, v in d.items() if k != "checksum"}
            if d["checksum"] != _checksum(body):
                raise FormatVersionError(f"{where}: {COMMIT_KEY} failed its checksum (stored {d['checksum']!r}, "
                                         f"computed {_checksum(body)!r}): the record was altered or damaged; "
                                         f"nothing is read from it")
        try:
            return cls(generation=int(d["generation"]), n_rows=int(d["n_rows"]),
                       layout=StoreLayout.from_dict(d["layout"]),
                       streams=[StreamRecord(s["name"], bool(s["alive"]), int(s["n_blocks"]), dict(s["meta"]))
                                for s in d["streams"]],
                       writer_stats=dict(d.get("writer_stats", {})),
                       # version 4 always writes "shards" ({} when unsharded): missing means damaged
                       shards={str(name): {int(no): int(n) for no, n in lengths.items()}
                               for name, lengths in (d["shards"] if d["format_version"] >= 4 else {}).items()})
        except (KeyError, TypeError, ValueError) as e:
            raise FormatVersionError(f"{where}: {COMMIT_KEY} is malformed ({e!r})") from e


def _checksum(d: dict[str, Any]) -> str:
    """crc32c of the record's canonical JSON (sorted keys), everything but the checksum itself."""
    return f"crc32c:{crc32c.crc32c(json.dumps(d, sort_keys=True).encode()):08x}"


def _load_syncfs():
    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_SYNCFS = _load_syncfs()  # (memory_store.testing.faults replaces it to fail a sync)


def resolve_sync_mode(sync_mode: str) -> str:
    """"auto" -> "syncfs" when libc has it, else "fsync"; ValueError for an unknown or unavailable mode."""
    if sync_mode not in SYNC_MODES:
        raise ValueError(f"DiskTier sync_mode={sync_mode!r}: expected 'auto', 'syncfs', 'fsync' or 'none'")
    if sync_mode == "auto":
        return "syncfs" if _SYNCFS is not None else "fsync"
    if sync_mode == "syncfs" and _SYNCFS is None:
        raise ValueError("DiskTier sync_mode='syncfs': libc has no syncfs on this system")
    return sync_mode


def fsync_path(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_fully(fd: int, parts: Sequence[memoryview | bytes]) -> None:
    total = sum(len(p) for p in parts)
    n = os.writev(fd, parts)
    if n != total:  # short write (rare on regular files): finish with plain writes
        rest = memoryview(b"".join(bytes(p) for p in parts))[n:]
        while rest:
            rest = rest[os.write(fd, rest):]


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass  # (the error being raised matters more than this one)


def dir_id(path: str) -> tuple[int, int] | None:
    """(device, inode) of a directory, None when there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


class Durability:
    """Steps 2 and 3 of the protocol for one open store: which files await a sync, the sync, the
    atomic commit, and the "directory deleted under us" check. `root` None: not a local directory
    (syncs are no-ops; the commit is one put)."""

    def __init__(self, store: Store, root: str | None, sync_mode: str, where: str) -> None:
        self.store = store
        self.root = root
        self.sync_mode = resolve_sync_mode(sync_mode)
        self.where = where
        self._root_id = dir_id(root) if root is not None else None  # the directory opened
        self._unsynced: set[str] = set()  # local files written since the last make_durable (fsync mode)
        self._sync_error: OSError | None = None  # a failed sync of data files: never committed past

    @property
    def tracks_files(self) -> bool:
        """True when each written file must be named (fsync mode of a local directory)."""
        return self.root is not None and self.sync_mode == "fsync"

    def written(self, path: str) -> None:
        """A local file was written (or created) and must be synced before the next commit."""
        if self.tracks_files:
            self._unsynced.add(path)

    def written_many(self, paths: Sequence[str] | set[str]) -> None:
        if self.tracks_files:
            self._unsynced.update(paths)

    @property
    def gone(self) -> bool:
        """True when the local directory opened was deleted or replaced since (False for other stores)."""
        return self.root is not None and dir_id(self.root) != self._root_id

    def check_present(self) -> None:
        """StoreNotFoundError when the store's directory was deleted (or replaced) while open."""
        if self.gone:
            raise StoreNotFoundError(f"store {self.where} was deleted (its directory is gone or replaced) while "
                                     f"open; nothing more is read from or written to it")

    def make_durable(self, write_buffered: Callable[[], None]) -> None:
        """Step 2: `write_buffered()` (what the data writes left in memory: row metadata, shard
        indexes), then force every file written so far to stable storage. StoreIOError after a
        failed sync, for good (see the module docstring)."""
        self.check_present()
        if self._sync_error is not None:
            raise StoreIOError(self._sync_error.errno, f"store {self.where}: an earlier sync of its files failed "
                               f"({self._sync_error}); the kernel may have dropped the data it could not write, so "
                               f"nothing written since the last commit is ever committed by this writer: close, "
                               f"reopen (the last commit is intact) and put it again", self._sync_error.filename)
        write_buffered()
        if self.root is None or self.sync_mode == "none":
            return
        try:
            self._sync()
        except OSError as e:
            # (fsyncgate) after a failed writeback Linux marks the pages clean, and a second fsync
            # reports success for data that never reached the disk: never commit past one
            self._sync_error = e
            raise

    def _sync(self) -> None:
        if self.sync_mode == "syncfs":
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
            try:
                if _SYNCFS(fd) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"syncfs({self.root}) failed: {os.strerror(err)}", self.root)
            finally:
                os.close(fd)
            return
        dirs: set[str] = set()
        root = os.path.abspath(self.root)
        for path in self._unsynced:
            if os.path.exists(path):
                fsync_path(path)
            d = os.path.dirname(os.path.abspath(path))
            while d.startswith(root) and d not in dirs:
                dirs.add(d)
                d = os.path.dirname(d)
        for d in dirs:
            if os.path.isdir(d):
                fsync_path(d, directory=True)
        self._unsynced.clear()

    def commit(self, record: CommitRecord) -> None:
        """Step 3: atomically replace the commit record (after make_durable)."""
        raw = record.to_json()
        if self.root is None:  # a new object per commit (objects are immutable; object_store.py)
            write_commit(self.store, record.generation, raw, self.where)
            return
        self.check_present()  # a record written into a recreated directory would name data that is gone
        final = os.path.join(self.root, COMMIT_KEY)
        tmp = f"{final}.{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            try:
                write_fully(fd, [raw])
                if self.sync_mode != "none":
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except BaseException:
            unlink_quietly(tmp)  # a full disk must not also fill up with half-written records
            raise
        if self.sync_mode != "none":
            fsync_path(self.root, directory=True)
