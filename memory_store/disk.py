"""DiskTier: the persistent tier, one zarr v3 group, and its commit record.

On-disk layout (a plain zarr v3 group that zarr-python opens and reads on its own):

    zarr.json               group; attributes["folio"] = {format, format_version, layout}
    kv/                     (capacity, n_layers, 2, n_kv_heads, block_len, head_dim): K at [:, :, 0],
                            V at [:, :, 1]; inner chunk (1, 1, 2, H, T, D): K and V of one (block,
                            layer), read with one preadv. A local store (format 4) groups
                            ROWS_PER_SHARD rows into one shard file (zarr's sharding_indexed codec,
                            index at the end), appended to in place: creating a file costs
                            0.12-0.24 ms on this VM's ext4, writing 32 KiB into an open one ~0.01 ms
                            (see shards.py for the append-only protocol). Any other zarr store
                            keeps one object per inner chunk (format 3's layout, also still read
                            and appended to locally)
    landmarks/              (capacity, n_layers, n_kv_heads, head_dim), inner chunk (1, L, H, D),
                            sharded like kv
                            keys use zarr's "." separator (kv/c.<shard>.0.0.0.0.0): one directory
                            per array
    block_stream/           (capacity,) int32: stream code of each row
    block_ordinal/          (capacity,) int64: ordinal of each row within its stream
    commit.json             the commit record (below)
    index/g<generation>/    the saved landmark index (derived; see store.py)
    writer.lock             the writer lock (local stores; see writer_lock.py), not a zarr key

Row r of every array is block id r: ids are never reused, so a row once written is
never rewritten while it is visible. Every array uses the bytes codec followed by
zarr's Crc32cCodec, one kv chunk per (block, layer). Shards are read by this tier
chunk by chunk (one preadv at the offset its index gives), never through zarr's
sharding codec (zarr's own random reads of sharded arrays measured 16-27x slower
than unsharded here). bfloat16 is stored as its uint16 bits.
Capacity grows by doubling (`resize`). The per-row metadata (block_stream,
block_ordinal) written with a batch of rows is buffered and written through zarr once
per `make_durable()`, before the sync: rows are invisible until the commit that
follows, so nothing can read them earlier.

Commit protocol (crash safety). Data rows are written first, anywhere beyond the
committed row count (in a shard: appended past its committed length); `make_durable()`
then appends each written shard's index and forces everything to stable storage, and
only then `commit()` replaces commit.json (the committed row count `n_rows`, the stream
table with per-stream metadata, every shard's committed length, a generation number)
in one atomic step: for a
local directory a temp file that is fsynced, renamed over commit.json, and the
directory fsynced; for any other zarr store a single-key put (as atomic as that
store's puts). Readers trust rows < n_rows only, so a writer killed at any moment
leaves either the old or the new commit, never a half-visible block. zarr's
LocalStore writes each key through a temp file and a rename but never fsyncs;
this tier therefore fsyncs itself: one `syncfs(2)` of the file system when libc
has it (one call instead of one fsync per chunk and directory), else an fsync of
every file written and of every directory above it.

One writer. Opening for writing (mode "a" or "w") takes the store's WriterLock before
anything in it is read or written (a missing directory is created with the lock file and
nothing else), and close() releases it; a second writer is refused at open with
StoreLockedError. Readers never take it. Mode "w" clears the directory around the lock
file (zarr's own "w" would delete the locked file with the rest), commit.json first, so
an interrupted clear reads as an interrupted creation. A store that is not a local
directory has no lock: it opens with a NoWriterLockWarning, one writer being the caller's
job (an object store has no lock primitive that a killed writer releases).

Failures. A commit.json or blob temp file whose write fails is removed; those of a killed writer
(and zarr's `*.partial` files) are removed by the next writer at open, under the lock. A failed
data write leaves the shard's in-memory index as it was (the next write goes at the same offset),
and the per-row metadata not written stays buffered for the next make_durable. A failed sync of
the data files (fsync or syncfs in make_durable) is never retried: Linux marks the pages it could
not write back clean, so a second fsync would report success for data the disk never got;
`make_durable` raises from then on and the writer must reopen. (A failed commit is retried: each
attempt writes and syncs a fresh temp file.) A local directory deleted or replaced under the tier is detected
(device and inode) before anything is written, so no write recreates it.

Fast paths. zarr's own indexing reads 256 random chunks at ~0.04x a numpy memmap
here (per-chunk Python overhead in the codec pipeline), so chunk bytes are read and
written directly: for a local directory with `preadv`/`pwritev` on open shard files
into and out of the caller's buffers (0.75x a numpy memmap in `bench.store`, against
0.35x for gathered `store.get` on zarr's event loop); for any other zarr store by
gathering `store.get`/`store.set` on zarr's event loop. Either way the bytes are
exactly what zarr itself writes (raw little-endian array bytes, then a 4-byte
little-endian crc32c), and the crc is checked on every read: a mismatch raises
CorruptBlockError naming the block and layer.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import re
import shutil
import threading
import uuid
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import crc32c
import numpy as np
import torch
import zarr
from zarr.abc.store import Store
from zarr.codecs import Crc32cCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from .errors import (ClosedError, CorruptBlockError, FormatVersionError, LayoutMismatchError, ReadOnlyError,
                     ShapeError, StoreError, StoreIOError, StoreNotFoundError)
from .layout import StoreLayout
from .shards import CRC_BYTES, ShardSet, check_crc
from .tiers import Entry, Key, Tier
from .writer_lock import LOCK_NAME, NoWriterLockWarning, WriterLock, check_wait_s

__all__ = ["DiskTier", "CommitRecord", "StreamRecord", "FORMAT_NAME", "FORMAT_VERSION", "COMMIT_KEY"]

FORMAT_NAME = "folio-store"
FORMAT_VERSION = 4  # 2: "." chunk keys; 3: K and V in one "kv" array; 4: local stores shard kv and landmarks
READABLE_VERSIONS = (3, 4)  # a version-3 store (one file per chunk) is read and appended to as it is
ROWS_PER_SHARD = 256  # rows (blocks) per shard file of a local store
COMMIT_KEY = "commit.json"
INITIAL_CAPACITY = 64
META_CHUNK = 4096  # rows per chunk of block_stream / block_ordinal
_CRC = CRC_BYTES  # bytes of the crc32c trailer of every chunk
_DATA_ARRAYS = ("kv", "landmarks", "block_stream", "block_ordinal")
# the temp files of a write that never finished: ours (commit.json.<uuid>.tmp, saved-index blobs) and
# zarr's LocalStore (<key without suffix>.<uuid>.partial)
_TEMP_NAME = re.compile(r"\.[0-9a-f]{32}\.(tmp|partial)$")


def check_shard_rows(value: object, name: str = "shard_rows") -> None:
    """ValueError unless `value` is a valid rows-per-shard setting: an int >= 1, or None."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name}={value!r}: expected an int >= 1 or None")


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
        try:
            return cls(generation=int(d["generation"]), n_rows=int(d["n_rows"]),
                       layout=StoreLayout.from_dict(d["layout"]),
                       streams=[StreamRecord(s["name"], bool(s["alive"]), int(s["n_blocks"]), dict(s["meta"]))
                                for s in d["streams"]],
                       writer_stats=dict(d.get("writer_stats", {})),
                       shards={str(name): {int(no): int(n) for no, n in lengths.items()}
                               for name, lengths in d.get("shards", {}).items()})
        except (KeyError, TypeError, ValueError) as e:
            raise FormatVersionError(f"{where}: {COMMIT_KEY} is malformed ({e!r})") from e


def _load_syncfs():
    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_SYNCFS = _load_syncfs()


def _fsync_path(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_PARALLEL_READ_BYTES = 4 << 20  # a batched local read this big is split across threads
_READ_POOL: ThreadPoolExecutor | None = None
_READ_POOL_PID = 0
_READ_POOL_LOCK = threading.Lock()


def _read_workers() -> int:
    """Threads for a big batched local read: FOLIO_READ_THREADS (default 1).

    Opt-in: on the 2-vCPU VM this was built on, 2 threads read 256 random 512 KiB chunks
    10-60% faster in a direct test but, inside `bench.store`, 3x slower in 3 runs of 5
    (0.5 vs 1.6 GB/s; bimodal, cause not found), so it is not the default."""
    env = os.environ.get("FOLIO_READ_THREADS", "")
    try:
        return max(1, int(env)) if env else 1
    except ValueError:
        raise ValueError(f"FOLIO_READ_THREADS={env!r}: expected an int >= 1") from None


def _read_pool() -> ThreadPoolExecutor:
    global _READ_POOL, _READ_POOL_PID
    with _READ_POOL_LOCK:
        if _READ_POOL is None or _READ_POOL_PID != os.getpid():  # a forked child has none of its threads
            _READ_POOL = ThreadPoolExecutor(max_workers=_read_workers(), thread_name_prefix="folio-disk-read")
            _READ_POOL_PID = os.getpid()
        return _READ_POOL


def _write_fully(fd: int, parts: Sequence[memoryview | bytes]) -> None:
    total = sum(len(p) for p in parts)
    n = os.writev(fd, parts)
    if n != total:  # short write (rare on regular files): finish with plain writes
        rest = memoryview(b"".join(bytes(p) for p in parts))[n:]
        while rest:
            rest = rest[os.write(fd, rest):]


class DiskTier(Tier):
    """The zarr v3 tier. Unbounded, persistent; see the module docstring for layout and protocol."""

    name = "disk"

    def __init__(self, store: Store, group: zarr.Group, layout: StoreLayout, *, read_only: bool,
                 sync_mode: str = "auto", where: str = "", record: CommitRecord | None = None,
                 writer_lock: WriterLock | None = None) -> None:
        if sync_mode not in ("auto", "syncfs", "fsync", "none"):
            raise ValueError(f"DiskTier sync_mode={sync_mode!r}: expected 'auto', 'syncfs', 'fsync' or 'none'")
        if sync_mode == "auto":
            sync_mode = "syncfs" if _SYNCFS is not None else "fsync"
        if sync_mode == "syncfs" and _SYNCFS is None:
            raise ValueError("DiskTier sync_mode='syncfs': libc has no syncfs on this system")
        self.store = store
        self.group = group
        self.layout = layout
        self.where = where or str(store)
        self.sync_mode = sync_mode
        self._read_only = read_only
        self._writer_lock = writer_lock  # released by close() (or when this tier is collected)
        self._root: str | None = str(store.root) if isinstance(store, LocalStore) else None
        # the directory this tier opened: one deleted (or replaced) under it is never written again
        self._root_id = _dir_id(self._root) if self._root is not None else None
        self._arrays = {name: group[name] for name in _DATA_ARRAYS}
        # a writer killed inside ensure_capacity leaves some arrays grown and others not:
        # the capacity is the shortest, so the next growth reaches every array
        self._capacity = min(int(a.shape[0]) for a in self._arrays.values())
        self._unsynced: set[str] = set()  # local files written since the last make_durable (fsync mode)
        self._sync_error: OSError | None = None  # a failed sync of data files: see make_durable
        self._meta_pending: list[tuple[int, np.ndarray, np.ndarray]] = []  # (start, codes, ordinals)
        self._meta_lock = threading.Lock()
        self._proto = default_buffer_prototype()
        self._closed = False
        self._shards: dict[str, ShardSet] = {}
        if not read_only and self._root is not None:
            _remove_temp_files(self._root)
        if self._arrays["kv"].shards is not None:
            if self._root is None:
                raise FormatVersionError(f"{self.where}: a sharded (local) Folio store opens only from a local "
                                         f"directory path or zarr LocalStore")
            L, H, T, D = layout.n_layers, layout.n_kv_heads, layout.block_len, layout.head_dim
            lengths = record.shards if record is not None else {}
            geometry = {"kv": (".0.0.0.0.0", L, 2 * H * T * D * layout.itemsize),
                        "landmarks": (".0.0.0", 1, L * H * D * layout.itemsize)}
            for name, (suffix, per_row, nbytes) in geometry.items():
                sset = ShardSet(os.path.join(self._root, name), name, suffix, self._arrays[name].shards[0], per_row,
                                nbytes, lengths.get(name, {}), writable=not read_only)
                if not read_only:
                    sset.recover()  # what a killed writer left past the last commit
                sset.set_rows_seen(record.n_rows if record is not None else 0)
                self._shards[name] = sset

    # -- opening ------------------------------------------------------------------
    @classmethod
    def open(cls, where: str | os.PathLike | Store, mode: str = "a", *, layout: StoreLayout | None = None,
             sync_mode: str = "auto", shard_rows: int | None = ROWS_PER_SHARD,
             wait_s: float = 0.0) -> tuple[DiskTier, CommitRecord]:
        """Open or create the group; returns the tier and the current commit record.

        mode "r": must exist; "a": open, or create when missing (layout required); "w": create, replacing
        anything there. A stored layout other than `layout` raises LayoutMismatchError naming both.
        shard_rows (creation of a local store only): rows per shard file, or None for one file per
        chunk (format 3's layout; slower to write, see shards.py).
        Modes "a" and "w" take the writer lock first, waiting up to `wait_s` seconds for another
        writer: StoreLockedError (naming the holder) when it is still held, ReadOnlyError when the
        directory cannot be written. A non-local store opens without a lock (NoWriterLockWarning).
        """
        check_shard_rows(shard_rows)
        if mode not in ("r", "a", "w"):
            raise ValueError(f"store mode={mode!r}: expected 'r', 'a' or 'w'")
        wait_s = check_wait_s(wait_s)
        read_only = mode == "r"
        if isinstance(where, Store):
            store, label = where, str(where)
            root = str(where.root) if isinstance(where, LocalStore) else None
        else:
            path = Path(where)
            label, root = str(path), str(path)
            if read_only and not (path / "zarr.json").exists():
                raise StoreNotFoundError(f"no Folio store at {label} (no zarr.json)")
            store = LocalStore(path, read_only=read_only)
        lock = None
        if not read_only:
            if root is not None:
                lock = WriterLock.acquire(root, wait_s)  # before anything in the store is read or written
            else:
                warnings.warn(NoWriterLockWarning(
                    f"{label} is not a local directory, so no writer lock is taken: nothing stops a second "
                    f"writer from opening it at the same time and losing blocks; keep to one writer"),
                    stacklevel=3)
        try:
            return cls._open_locked(store, label, mode, layout, sync_mode, shard_rows, lock)
        except OSError as e:  # from zarr, mostly: say which store and what, as a StoreError
            if lock is not None:
                lock.release()
            if isinstance(e, StoreError):
                raise
            raise StoreIOError(e.errno, f"store {label} cannot be opened ({e.strerror or e})", e.filename) from e
        except BaseException:
            if lock is not None:
                lock.release()
            raise

    @classmethod
    def _open_locked(cls, store: Store, label: str, mode: str, layout: StoreLayout | None, sync_mode: str,
                     shard_rows: int | None, lock: WriterLock | None) -> tuple[DiskTier, CommitRecord]:
        read_only = mode == "r"
        raw = None if mode == "w" else _get_bytes(store, COMMIT_KEY)
        if raw is None and mode != "w":
            group_meta = _get_bytes(store, "zarr.json")
            if group_meta is not None and b'"folio"' not in group_meta:
                raise FormatVersionError(f"{label}: a zarr group that is not a Folio store (no 'folio' attributes)")
            if read_only:
                raise StoreNotFoundError(f"no Folio store at {label} (no {COMMIT_KEY})")
            # missing, or a creation that was interrupted before its first commit: (re)create
        if raw is None:
            if layout is None:
                raise StoreNotFoundError(f"no Folio store at {label}; a layout is required to create one")
            return cls._create(store, layout, label, sync_mode, shard_rows, lock)
        record = CommitRecord.from_json(raw, label)
        if layout is not None and layout != record.layout:
            raise LayoutMismatchError(
                f"{label}: the store was written with layout [{record.layout.describe()}] but opened with "
                f"[{layout.describe()}]", stored=record.layout, requested=layout)
        try:
            group = zarr.open_group(store, mode="r" if read_only else "r+", zarr_format=3)
        except (FileNotFoundError, ValueError, KeyError) as e:
            raise FormatVersionError(f"{label}: cannot open the zarr group ({e})") from e
        attrs = group.attrs.get("folio", {})
        if attrs.get("format_version") not in READABLE_VERSIONS:
            raise FormatVersionError(f"{label}: group format version {attrs.get('format_version')!r}; "
                                     f"this code reads versions {list(READABLE_VERSIONS)} (versions before 3 kept K "
                                     f"and V in separate arrays; re-ingest the documents with this version)")
        missing = [name for name in _DATA_ARRAYS if name not in group]
        if missing:
            raise FormatVersionError(f"{label}: arrays {missing} are missing from the group")
        tier = cls(store, group, record.layout, read_only=read_only, sync_mode=sync_mode, where=label, record=record,
                   writer_lock=lock)
        return tier, record

    @classmethod
    def _create(cls, store: Store, layout: StoreLayout, label: str, sync_mode: str,
                shard_rows: int | None = ROWS_PER_SHARD,
                lock: WriterLock | None = None) -> tuple[DiskTier, CommitRecord]:
        if isinstance(store, LocalStore):
            _clear_local(str(store.root))  # (keeps the lock file, which zarr's "w" would delete)
            group = zarr.open_group(store, mode="a", zarr_format=3)
        else:
            group = zarr.open_group(store, mode="w", zarr_format=3)
        L, H, T, D = layout.n_layers, layout.n_kv_heads, layout.block_len, layout.head_dim
        # a local directory shards kv and landmarks (appends into open files; see shards.py); any other
        # zarr store keeps one object per chunk (an object store has no append, and no file-creation cost)
        local = isinstance(store, LocalStore) and shard_rows is not None
        S = shard_rows or 1
        cap = max(S, INITIAL_CAPACITY) if local else INITIAL_CAPACITY
        spec = {
            "kv": ((cap, L, 2, H, T, D), (1, 1, 2, H, T, D), layout.zarr_dtype, (S, L, 2, H, T, D)),
            "landmarks": ((cap, L, H, D), (1, L, H, D), layout.zarr_dtype, (S, L, H, D)),
            "block_stream": ((cap,), (META_CHUNK,), "int32", None),
            "block_ordinal": ((cap,), (META_CHUNK,), "int64", None),
        }
        for name, (shape, chunks, dtype, shards) in spec.items():
            group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, compressors=[Crc32cCodec()],
                               shards=shards if local else None,
                               fill_value=0 if name != "block_stream" else -1,
                               chunk_key_encoding={"name": "default", "separator": "."})
        group.attrs["folio"] = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "layout": layout.to_dict(),
                                "note": "rows < commit.json n_rows whose stream is alive are valid blocks; "
                                        "bfloat16 is stored as uint16 bits"}
        record = CommitRecord(generation=0, n_rows=0, layout=layout, streams=[])
        tier = cls(store, group, layout, read_only=False, sync_mode=sync_mode, where=label, record=record,
                   writer_lock=lock)
        tier.make_durable()
        tier.commit(record)
        return tier, record

    # -- capabilities -------------------------------------------------------------
    @property
    def persistent(self) -> bool:
        return True

    @property
    def supports_writes(self) -> bool:
        return not self._read_only

    @property
    def is_local(self) -> bool:
        return self._root is not None

    @property
    def writer_lock(self) -> WriterLock | None:
        """The writer lock this tier holds (None: opened read-only, or not a local directory)."""
        return self._writer_lock

    @property
    def capacity(self) -> int:
        return self._capacity

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"disk tier {self.where} is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self._read_only:
            raise ReadOnlyError(f"disk tier {self.where} was opened read-only")

    # -- keys -----------------------------------------------------------------------
    @staticmethod
    def kv_key(row: int, layer: int) -> str:
        return f"kv/c.{row}.{layer}.0.0.0.0"

    @staticmethod
    def landmark_key(row: int) -> str:
        return f"landmarks/c.{row}.0.0.0"

    # -- raw chunk I/O ----------------------------------------------------------------
    def _put_chunks(self, items: list[tuple[str, list[np.ndarray]]]) -> None:
        """Write each (key, [contiguous arrays]) as one chunk: the arrays' bytes back to back (zarr's
        bytes codec of the chunk they make up) and their crc32c, as zarr's Crc32cCodec would."""
        if self._root is not None:
            for key, parts in items:
                mvs = [memoryview(a).cast("B") for a in parts]
                c = 0
                for mv in mvs:
                    c = crc32c.crc32c(mv, c)
                crc = c.to_bytes(_CRC, "little")
                path = os.path.join(self._root, key)
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                except FileNotFoundError:  # the array's directory (first chunk of the array); never its
                    try:                   # parent: a store directory deleted under its writer stays deleted
                        os.mkdir(os.path.dirname(path))
                    except FileExistsError:
                        pass
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    _write_fully(fd, [*mvs, crc])
                finally:
                    os.close(fd)
                if self.sync_mode == "fsync":
                    self._unsynced.add(path)
            return
        bufs = []
        for key, parts in items:
            data = b"".join(bytes(memoryview(a).cast("B")) for a in parts)
            bufs.append((key, self._proto.buffer.from_bytes(data + crc32c.crc32c(data).to_bytes(_CRC, "little"))))

        async def put_all() -> None:
            await asyncio.gather(*(self.store.set(key, buf) for key, buf in bufs))

        sync(put_all())

    def _get_chunks(self, items: list[tuple[str, list[np.ndarray], int, int]]) -> np.ndarray:
        """Read each (key, [destination views], block id, layer): the chunk's bytes fill the views in
        order, and its crc is checked. Returns a bool mask of the chunks found. Raises CorruptBlockError."""
        found = np.zeros(len(items), dtype=bool)
        if self._root is not None:
            nbytes = sum(d.nbytes for d in items[0][1]) * len(items) if items else 0
            workers = _read_workers()
            if workers > 1 and nbytes >= _PARALLEL_READ_BYTES and len(items) >= 2 * workers:
                # readv and crc32c release the GIL: the copies out of the page cache can run
                # on several cores (the batched read is bound by those copies)
                bounds = np.linspace(0, len(items), workers + 1).astype(int)
                futs = [_read_pool().submit(self._read_local, items, int(a), int(b), found)
                        for a, b in zip(bounds[:-1], bounds[1:])]
                errors = [f.exception() for f in futs]  # wait for all before raising
                for e in errors:
                    if e is not None:
                        raise e
            else:
                self._read_local(items, 0, len(items), found)
            return found

        async def get_all() -> list:
            return await asyncio.gather(*(self.store.get(key, prototype=self._proto) for key, *_ in items))

        for i, ((key, dsts, row, layer), buf) in enumerate(zip(items, sync(get_all()), strict=True)):
            if buf is None:
                continue
            raw = buf.as_numpy_array().view(np.uint8)
            mvs = [memoryview(d).cast("B") for d in dsts]
            size = sum(len(m) for m in mvs)
            extra = raw.shape[0] - size - _CRC
            if extra == 0:
                off = 0
                for m in mvs:
                    m[:] = raw[off:off + len(m)].data
                    off += len(m)
            check_crc(key, mvs, raw[size:].tobytes() if extra == 0 else b"", extra, row, layer)
            found[i] = True
        return found

    def _read_local(self, items: list[tuple[str, list[np.ndarray], int, int]], lo: int, hi: int,
                    found: np.ndarray) -> None:
        """_get_chunks for items[lo:hi] of a local directory: open, readv, close, check."""
        crc = bytearray(_CRC + 1)  # one extra byte detects a chunk longer than expected
        crc_mv = memoryview(crc)
        for i in range(lo, hi):
            key, dsts, row, layer = items[i]
            mvs = [memoryview(d).cast("B") for d in dsts]
            path = os.path.join(self._root, key)
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise StoreIOError(e.errno, f"{self.where}: block {row} chunk {key} cannot be opened ({e.strerror})",
                                   path) from e
            try:
                n = os.readv(fd, [*mvs, crc_mv])
            except OSError as e:
                raise StoreIOError(e.errno, f"{self.where}: reading block {row} chunk {key} failed ({e.strerror})",
                                   path) from e
            finally:
                os.close(fd)
            check_crc(key, mvs, bytes(crc[:_CRC]), n - sum(len(m) for m in mvs) - _CRC, row, layer)
            found[i] = True

    # -- bulk rows (the store's write-behind path) ------------------------------------
    def ensure_capacity(self, n_rows: int) -> None:
        """Grow every array (doubling) so rows < n_rows exist."""
        self._check_writable()
        if n_rows <= self._capacity:
            return
        self.check_present()  # (zarr would recreate a deleted store directory for the array metadata)
        cap = max(n_rows, self._capacity * 2)
        for name, arr in self._arrays.items():
            if arr.shape[0] >= cap:  # grown by a writer killed mid-way: never shrink (it drops chunks)
                continue
            arr.resize((cap, *arr.shape[1:]))
            if self._root is not None and self.sync_mode == "fsync":
                self._unsynced.add(os.path.join(self._root, name, "zarr.json"))
        self._capacity = cap

    def write_rows(self, start: int, k: np.ndarray, v: np.ndarray, landmarks: np.ndarray,
                   stream_codes: np.ndarray, ordinals: np.ndarray) -> None:
        """Write rows [start, start + N): k, v (N, L, H, T, D), landmarks (N, L, H, D) in the storage dtype,
        stream_codes (N,) int32, ordinals (N,) int64. Not durable until make_durable()."""
        self._check_writable()
        n = k.shape[0]
        self.ensure_capacity(start + n)
        if self._shards:
            self._shards["kv"].write([(start + i, layer, (_bytes_of(k[i, layer]), _bytes_of(v[i, layer])))
                                      for i in range(n) for layer in range(self.layout.n_layers)])
            self._shards["landmarks"].write([(start + i, 0, (_bytes_of(landmarks[i]),)) for i in range(n)])
        else:
            items = []
            for i in range(n):
                row = start + i
                for layer in range(self.layout.n_layers):
                    items.append((self.kv_key(row, layer), [k[i, layer], v[i, layer]]))
                items.append((self.landmark_key(row), [landmarks[i]]))
            self._put_chunks(items)
        self._append_meta(start, stream_codes, ordinals)

    def write_rows_meta(self, start: int, stream_codes: np.ndarray, ordinals: np.ndarray) -> None:
        """Record rows [start, start + N) without their chunks: rows deleted before they were
        written (they read as absent, like rows whose chunks delete_rows removed)."""
        self._check_writable()
        self.ensure_capacity(start + len(stream_codes))
        for sset in self._shards.values():  # rows past these count as seen: a shard they end is complete
            sset.set_rows_seen(start + len(stream_codes))
        self._append_meta(start, stream_codes, ordinals)

    def _append_meta(self, start: int, stream_codes: np.ndarray, ordinals: np.ndarray) -> None:
        # the small per-row metadata goes through zarr at the next make_durable (one
        # read-modify-write per metadata chunk instead of one per batch of rows)
        with self._meta_lock:
            self._meta_pending.append((start, np.array(stream_codes, dtype=np.int32, copy=True),
                                       np.array(ordinals, dtype=np.int64, copy=True)))

    def _write_pending_meta(self) -> None:
        """Write buffered block_stream / block_ordinal rows, coalescing contiguous runs."""
        with self._meta_lock:
            pending, self._meta_pending = self._meta_pending, []
        if not pending:
            return
        try:
            self._write_meta_runs(pending)
        except BaseException:
            with self._meta_lock:  # not written (or not all): the next make_durable writes them again
                self._meta_pending = pending + self._meta_pending
            raise

    def _write_meta_runs(self, pending: list[tuple[int, np.ndarray, np.ndarray]]) -> None:
        pending.sort(key=lambda t: t[0])
        runs: list[list] = []
        for start, codes, ords in pending:
            if runs and runs[-1][0] + len(runs[-1][1]) == start:
                runs[-1][1] = np.concatenate([runs[-1][1], codes])
                runs[-1][2] = np.concatenate([runs[-1][2], ords])
            else:
                runs.append([start, codes, ords])
        for start, codes, ords in runs:
            n = len(codes)
            for name in ("block_stream", "block_ordinal"):
                if self._arrays[name].shape[0] < start + n:  # zarr clips slices silently: never let it drop rows
                    raise StoreError(f"{self.where}: {name} holds {self._arrays[name].shape[0]} rows, "
                                     f"cannot write rows up to {start + n} (ensure_capacity was skipped)")
            self._arrays["block_stream"][start:start + n] = codes
            self._arrays["block_ordinal"][start:start + n] = ords
            if self._root is not None and self.sync_mode == "fsync":
                for name in ("block_stream", "block_ordinal"):
                    for c in range(start // META_CHUNK, (start + n - 1) // META_CHUNK + 1):
                        self._unsynced.add(os.path.join(self._root, name, f"c.{c}"))

    def read_layer_into(self, rows: np.ndarray, layer: int, out_k: np.ndarray, out_v: np.ndarray) -> np.ndarray:
        """Read layer `layer` of `rows` into out_k, out_v (M, H, T, D) (storage dtype, C-contiguous).
        Returns a bool mask of rows whose chunks exist. Raises CorruptBlockError."""
        self._check_open()
        if self._shards:
            found = np.zeros(len(rows), dtype=bool)
            self._shards["kv"].read_into([(row, layer, (_bytes_of(out_k[i]), _bytes_of(out_v[i])))
                                          for i, row in enumerate(rows.tolist())], found)
            return found
        items = [(self.kv_key(row, layer), [out_k[i], out_v[i]], row, layer) for i, row in enumerate(rows.tolist())]
        return self._get_chunks(items)

    def read_landmarks(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Landmark keys of rows, (M, L, H, D) in the storage dtype, and the found mask."""
        self._check_open()
        out = np.empty((len(rows), *self.layout.landmark_shape), dtype=self.layout.zarr_dtype)
        if self._shards:
            found = np.zeros(len(rows), dtype=bool)
            self._shards["landmarks"].read_into([(r, 0, (_bytes_of(out[i]),)) for i, r in enumerate(rows.tolist())],
                                                found)
            return out, found
        found = self._get_chunks([(self.landmark_key(r), [out[i]], r, -1) for i, r in enumerate(rows.tolist())])
        return out, found

    def read_row_meta(self, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
        """block_stream and block_ordinal of rows < n_rows (through zarr, crc-checked)."""
        self._check_open()
        if not self._read_only:
            self._write_pending_meta()
        try:
            codes = np.asarray(self._arrays["block_stream"][:n_rows], dtype=np.int32)
            ords = np.asarray(self._arrays["block_ordinal"][:n_rows], dtype=np.int64)
        except ValueError as e:  # zarr's crc32c codec raises ValueError on a checksum mismatch
            raise CorruptBlockError(f"{self.where}: the per-block metadata arrays are corrupt ({e})") from e
        except OSError as e:
            raise StoreIOError(e.errno, f"{self.where}: reading the per-block metadata failed ({e.strerror})",
                               e.filename) from e
        return codes, ords

    def delete_rows(self, rows: Sequence[int]) -> None:
        """Remove every chunk of those rows (after a commit that no longer covers them)."""
        self._check_writable()
        if self._shards:
            for sset in self._shards.values():
                sset.delete_rows(rows)
            return
        if self._root is not None:
            for row in rows:
                keys = [self.kv_key(row, layer) for layer in range(self.layout.n_layers)] + [self.landmark_key(row)]
                for key in keys:
                    try:
                        os.unlink(os.path.join(self._root, key))
                    except FileNotFoundError:
                        pass
            return
        keys = [self.kv_key(row, layer) for row in rows
                for layer in range(self.layout.n_layers)] + [self.landmark_key(row) for row in rows]

        async def delete_all() -> None:
            await asyncio.gather(*(self.store.delete(key) for key in keys))

        sync(delete_all())

    # -- durability and the commit record ---------------------------------------------
    def make_durable(self) -> None:
        """Force every chunk written so far to stable storage (local directories; other stores: no-op)."""
        self._check_writable()
        self.check_present()
        if self._sync_error is not None:
            raise StoreIOError(self._sync_error.errno, f"store {self.where}: an earlier sync of its files failed "
                               f"({self._sync_error}); the kernel may have dropped the data it could not write, so "
                               f"nothing written since the last commit is ever committed by this writer: close, "
                               f"reopen (the last commit is intact) and put it again", self._sync_error.filename)
        self._write_pending_meta()
        try:
            for sset in self._shards.values():
                sset.seal()
        finally:
            # (after a failed seal too: the shards sealed before it are no longer dirty, and no later
            # seal would name them again.) Synced by path with the rest, and kept in _unsynced until
            # every sync succeeded
            for sset in self._shards.values():
                paths = sset.take_to_sync()
                if self._root is not None and self.sync_mode == "fsync":
                    self._unsynced.update(paths)  # (their directories are synced with them)
        if self._root is None or self.sync_mode == "none":
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
            fd = os.open(self._root, os.O_RDONLY | os.O_DIRECTORY)
            try:
                if _SYNCFS(fd) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"syncfs({self._root}) failed: {os.strerror(err)}", self._root)
            finally:
                os.close(fd)
            return
        dirs: set[str] = set()
        root = os.path.abspath(self._root)
        for path in self._unsynced:
            if os.path.exists(path):
                _fsync_path(path)
            d = os.path.dirname(os.path.abspath(path))
            while d.startswith(root) and d not in dirs:
                dirs.add(d)
                d = os.path.dirname(d)
        for d in dirs:
            if os.path.isdir(d):
                _fsync_path(d, directory=True)
        self._unsynced.clear()

    @property
    def gone(self) -> bool:
        """True when the local directory this tier opened was deleted or replaced since (False for
        other stores)."""
        return self._root is not None and _dir_id(self._root) != self._root_id

    def check_present(self) -> None:
        """StoreNotFoundError when the store's directory was deleted (or replaced) while open."""
        if self.gone:
            raise StoreNotFoundError(f"store {self.where} was deleted (its directory is gone or replaced) while "
                                     f"open; nothing more is read from or written to it")

    def read_commit(self) -> CommitRecord:
        """The commit record as stored now."""
        self._check_open()
        raw = _get_bytes(self.store, COMMIT_KEY)
        if raw is None:
            raise FormatVersionError(f"{self.where}: {COMMIT_KEY} is missing")
        return CommitRecord.from_json(raw, self.where)

    def commit(self, record: CommitRecord) -> None:
        """Atomically replace the commit record (call make_durable() first)."""
        self._check_writable()
        if self._shards:
            record.shards = {name: sset.lengths() for name, sset in self._shards.items()}
        raw = record.to_json()
        if self._root is None:
            sync(self.store.set(COMMIT_KEY, self._proto.buffer.from_bytes(raw)))
            return
        self.check_present()  # a record written into a recreated directory would name data that is gone
        final = os.path.join(self._root, COMMIT_KEY)
        tmp = f"{final}.{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            try:
                _write_fully(fd, [raw])
                if self.sync_mode != "none":
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except BaseException:
            _unlink_quietly(tmp)  # a full disk must not also fill up with half-written records
            raise
        if self.sync_mode != "none":
            _fsync_path(self._root, directory=True)

    # -- small blobs (the saved index) --------------------------------------------------
    def write_blob(self, key: str, data: bytes | bytearray) -> None:
        self._check_writable()
        if self._root is not None:  # straight to a file (zarr's buffer would copy the bytes again)
            self.check_present()
            path = os.path.join(self._root, key)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except BaseException:
                _unlink_quietly(tmp)
                raise
            if self.sync_mode == "fsync":
                self._unsynced.add(path)
            return
        sync(self.store.set(key, self._proto.buffer.from_bytes(bytes(data))))

    def read_blob(self, key: str) -> bytes | None:
        self._check_open()
        return _get_bytes(self.store, key)

    def list_dir(self, prefix: str) -> list[str]:
        async def go() -> list[str]:
            return [k async for k in self.store.list_dir(prefix)]

        return sync(go())

    def delete_prefix(self, prefix: str) -> None:
        self._check_writable()
        sync(self.store.delete_dir(prefix))

    def size_bytes(self) -> int:
        """Bytes the store occupies (every key)."""
        if self._root is not None:
            total = 0
            for dirpath, _, files in os.walk(self._root):
                for f in files:
                    try:
                        total += os.path.getsize(os.path.join(dirpath, f))
                    except FileNotFoundError:
                        pass
            return total

        async def go() -> int:
            total = 0
            async for key in self.store.list():
                total += await self.store.getsize(key)
            return total

        return sync(go())

    # -- the Tier interface -----------------------------------------------------------
    def get(self, key: Key) -> Entry | None:
        got = self.get_stacked([key])
        return None if got is None else (got[0][0], got[1][0])

    def get_stacked(self, keys: Sequence[Key]) -> tuple[torch.Tensor, torch.Tensor] | None:
        self._check_open()
        m = len(keys)
        out_k = np.empty((m, *self.layout.kv_shape), dtype=self.layout.zarr_dtype)  # (M, H, T, D)
        out_v = np.empty_like(out_k)
        for row, layer in keys:
            self._check_key(row, layer)
        if self._shards:
            found = np.zeros(m, dtype=bool)
            self._shards["kv"].read_into([(int(row), int(layer), (_bytes_of(out_k[i]), _bytes_of(out_v[i])))
                                          for i, (row, layer) in enumerate(keys)], found)
        else:
            found = self._get_chunks([(self.kv_key(row, layer), [out_k[i], out_v[i]], row, layer)
                                      for i, (row, layer) in enumerate(keys)])
        if not found.all():
            return None
        return self.layout.from_storage(out_k), self.layout.from_storage(out_v)

    def put(self, key: Key, k: torch.Tensor, v: torch.Tensor) -> None:
        self._check_writable()
        self._check_entry(k, v, batched=False)
        row, layer = key
        self._check_key(row, layer)
        self.ensure_capacity(row + 1)
        kn = self.layout.to_storage(k.detach().cpu().contiguous())
        vn = self.layout.to_storage(v.detach().cpu().contiguous())
        if self._shards:
            self._shards["kv"].write([(int(row), int(layer), (_bytes_of(kn), _bytes_of(vn)))])
            return
        self._put_chunks([(self.kv_key(row, layer), [kn, vn])])

    def delete(self, key: Key) -> bool:
        self._check_writable()
        there = self.contains(key)
        row, layer = key
        if self._shards:
            self._shards["kv"].delete_chunk(int(row), int(layer))
            return there
        sync(self.store.delete(self.kv_key(row, layer)))
        return there

    def contains(self, key: Key) -> bool:
        self._check_open()
        row, layer = key
        self._check_key(row, layer)
        if self._shards:
            return self._shards["kv"].locate(int(row), int(layer)) is not None
        return bool(sync(self.store.exists(self.kv_key(row, layer))))

    def chunk_location(self, row: int, layer: int) -> tuple[str, int, int] | None:
        """(file, byte offset, bytes incl. the crc) of the kv chunk of (row, layer), or of the landmark
        chunk of `row` when layer is -1; None when absent. Local stores only (tools and tests)."""
        self._check_open()
        if self._root is None:
            raise StoreError(f"{self.where}: chunk_location needs a local store")
        if not self._shards:
            key = self.kv_key(row, layer) if layer >= 0 else self.landmark_key(row)
            path = os.path.join(self._root, key)
            return (path, 0, os.path.getsize(path)) if os.path.exists(path) else None
        sset = self._shards["kv" if layer >= 0 else "landmarks"]
        loc = sset.locate(int(row), max(0, int(layer)))
        return None if loc is None else (sset.path(int(row) // sset.S), loc[1], loc[2])

    def _check_key(self, row: int, layer: int) -> None:
        if not (0 <= int(layer) < self.layout.n_layers) or int(row) < 0:
            raise ShapeError(f"disk tier: key ({row}, {layer}) out of range (block id >= 0, "
                             f"0 <= layer < {self.layout.n_layers})")

    def flush(self) -> None:
        if not self._read_only:
            self.make_durable()

    def close(self) -> None:
        self._closed = True
        try:
            for sset in self._shards.values():
                sset.close()
        finally:
            if self._writer_lock is not None:
                self._writer_lock.release()


def _clear_local(root: str) -> None:
    """Delete everything in a local store directory but its writer lock: commit.json first, so
    an interrupted clear leaves a store that reads as an interrupted creation (recreated)."""
    if not os.path.isdir(root):
        return
    try:
        os.unlink(os.path.join(root, COMMIT_KEY))
    except FileNotFoundError:
        pass
    for entry in os.scandir(root):
        if entry.name == LOCK_NAME:
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


def _dir_id(path: str) -> tuple[int, int] | None:
    """(device, inode) of a directory, None when there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass  # (the error being raised matters more than this one)


def _remove_temp_files(root: str) -> None:
    """Delete the temp files that writers killed mid-write left in a local store. Only a writer makes
    temp files, and the caller holds the writer lock, so every one found is a dead writer's; a crash
    between the write of a temp file and its rename would otherwise leave one behind per crash."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            if _TEMP_NAME.search(name):
                try:
                    os.unlink(os.path.join(dirpath, name))
                except FileNotFoundError:
                    pass


def _bytes_of(a: np.ndarray) -> memoryview:
    """A flat byte view of a C-contiguous array (no copy)."""
    return memoryview(a).cast("B")


def _get_bytes(store: Store, key: str) -> bytes | None:
    try:
        buf = sync(store.get(key, prototype=default_buffer_prototype()))
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StoreIOError(e.errno, f"{store}: reading {key} failed ({e.strerror})", e.filename) from e
    return None if buf is None else buf.to_bytes()
