"""DiskTier: the persistent tier, one zarr v3 group: its layout, opening, rows and blobs.

On-disk layout (a plain zarr v3 group that zarr-python opens and reads on its own):

    zarr.json               group; attributes["folio"] = {format, format_version, layout}
    kv/                     (capacity, n_layers, 2, n_kv_heads, block_len, head_dim): K at [:, :, 0],
                            V at [:, :, 1]; inner chunk (1, 1, 2, H, T, D): K and V of one (block,
                            layer), read with one preadv. A local store (format 4) groups
                            ROWS_PER_SHARD rows into one shard file (zarr's sharding_indexed codec,
                            index at the end), appended to in place (see shards.py). An object
                            store (fsspec: S3, ...) shards them as immutable segment and index
                            objects (segments.py; group attribute folio.shard_storage = "segments").
                            A MemoryStore, or shard_rows=None, keeps one object per inner chunk
                            (format 3's layout, also still read and appended to locally)
    landmarks/              (capacity, n_layers, n_kv_heads, head_dim), inner chunk (1, L, H, D),
                            sharded like kv
                            keys use zarr's "." separator (kv/c.<shard>.0.0.0.0.0): one directory
                            per array
    block_stream/           (capacity,) int32: stream code of each row
    block_ordinal/          (capacity,) int64: ordinal of each row within its stream
    commit.json             the commit record (commit.py)
    index/g<generation>/    the saved landmark index (derived; see index_io.py)
    writer.lock             the writer lock (local stores; see writer_lock.py), not a zarr key

Row r of every array is block id r: ids are never reused, so a row once written is
never rewritten while it is visible. Every array uses the bytes codec followed by
zarr's Crc32cCodec, one kv chunk per (block, layer). Chunks are read and written by
chunks.py (one backend per kind of store, chosen here at open), never through zarr's
codec pipeline, whose per-chunk overhead dominates random reads. bfloat16 is stored as
its uint16 bits. Capacity grows by doubling (`ensure_capacity`). The per-row metadata
(block_stream, block_ordinal) written with a batch of rows is buffered and written
through zarr once per `make_durable()`, before the sync: rows are invisible until the
commit that follows, so nothing can read them earlier. Crash safety: commit.py.

One writer. Opening for writing (mode "a" or "w") takes the store's WriterLock before
anything in it is read or written (a missing directory is created with the lock file and
nothing else), and close() releases it; a second writer is refused at open with
StoreLockedError. Readers never take it. Mode "w" clears the directory around the lock
file (zarr's own "w" would delete the locked file with the rest), commit.json first, so
an interrupted clear reads as an interrupted creation. A store that is not a local
directory takes a lease object instead when it is an fsspec store (S3...: lease.py, whose
commits are new objects: object_store.py); a zarr MemoryStore, seen by one process only,
opens with a NoWriterLockWarning, one writer being the caller's job.

Failures. A commit.json or blob temp file whose write fails is removed; those of a killed writer
(and zarr's `*.partial` files) are removed by the next writer at open, under the lock. A failed
data write leaves the shard's in-memory index as it was (the next write goes at the same offset),
and the per-row metadata not written stays buffered for the next make_durable.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.abc.store import Store
from zarr.codecs import Crc32cCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from .chunks import ChunkFiles, ChunkIO, ShardedChunks, ZarrChunks, kv_key, landmark_key
from .commit import (COMMIT_KEY, FORMAT_NAME, FORMAT_VERSION, READABLE_VERSIONS, CommitRecord, Durability,
                     StreamRecord)
from .errors import (ClosedError, FormatVersionError, LayoutMismatchError, ReadOnlyError,
                     ShapeError, StoreError, StoreIOError, StoreNotFoundError)
from .layout import StoreLayout
from .lease import LEASE_KEY, WriterLease
from .object_store import COMMITS_PREFIX, is_object_store, is_url, open_url, read_newest_commit
from .range_shards import RangeShards
from .row_meta import META_CHUNK, RowMeta
from .segments import SHARD_STORAGE, SegmentShards
from .shards import check_shard_rows
from .tiers import Entry, Key, Tier
from .writer_lock import LOCK_NAME, NoWriterLockWarning, WriterLock, check_wait_s

__all__ = ["DiskTier", "CommitRecord", "StreamRecord", "FORMAT_NAME", "FORMAT_VERSION", "COMMIT_KEY",
           "check_shard_rows"]

ROWS_PER_SHARD = 256  # rows (blocks) per shard file of a local store
INITIAL_CAPACITY = 64
_DATA_ARRAYS = ("kv", "landmarks", "block_stream", "block_ordinal")
# the temp files of a write that never finished: ours (commit.json.<uuid>.tmp, saved-index blobs) and
# zarr's LocalStore (<key without suffix>.<uuid>.partial)
_TEMP_NAME = re.compile(r"\.[0-9a-f]{32}\.(tmp|partial)$")


class DiskTier(Tier):
    """The zarr v3 tier. Unbounded, persistent; see the module docstring for layout and protocol."""

    name = "disk"

    def __init__(self, store: Store, group: zarr.Group, layout: StoreLayout, *, read_only: bool,
                 sync_mode: str = "auto", where: str = "", record: CommitRecord | None = None,
                 writer_lock: WriterLock | WriterLease | None = None) -> None:
        self.store = store
        self.group = group
        self.layout = layout
        self.where = where or str(store)
        self._read_only = read_only
        self._writer_lock = writer_lock  # released by close() (or when this tier is collected)
        self._root: str | None = str(store.root) if isinstance(store, LocalStore) else None
        self._durable = Durability(store, self._root, sync_mode, self.where)
        self.sync_mode = self._durable.sync_mode
        self._arrays = {name: group[name] for name in _DATA_ARRAYS}
        # a writer killed inside ensure_capacity leaves some arrays grown and others not:
        # the capacity is the shortest, so the next growth reaches every array
        self._capacity = min(int(a.shape[0]) for a in self._arrays.values())
        self._meta = RowMeta(self._arrays["block_stream"], self._arrays["block_ordinal"], self._durable, self.where)
        self._proto = default_buffer_prototype()
        self._closed = False
        if not read_only and self._root is not None:
            _remove_temp_files(self._root)
        self._chunks = self._open_chunks(record)

    def _open_chunks(self, record: CommitRecord | None) -> ChunkIO:
        """The one backend this store's chunks go through."""
        if self._arrays["kv"].shards is not None:
            if self._root is None and _shard_storage(self.group) == SHARD_STORAGE:
                return SegmentShards(self.store, self.layout, self._durable, self.where,
                                     rows_per_shard=self._arrays["kv"].shards[0],
                                     committed=record.shards if record is not None else {},
                                     writable=not self._read_only)
            if self._root is None:
                if not self._read_only:
                    raise FormatVersionError(f"{self.where}: this sharded store was copied from a local directory "
                                             f"(zarr's shard files, appended to in place): on object storage it "
                                             f"opens with mode 'r' (read by byte ranges: range_shards.py). A store "
                                             f"created on object storage is written as segments (segments.py)")
                return RangeShards(self.store, self.layout, self._durable, self.where,
                                   rows_per_shard=self._arrays["kv"].shards[0],
                                   committed=record.shards if record is not None else {})
            return ShardedChunks(self.store, self.layout, self._durable, self.where, self._root,
                                 rows_per_shard=self._arrays["kv"].shards[0],
                                 committed=record.shards if record is not None else {},
                                 n_rows=record.n_rows if record is not None else 0, writable=not self._read_only)
        if self._root is not None:
            return ChunkFiles(self.store, self.layout, self._durable, self.where, self._root)
        return ZarrChunks(self.store, self.layout, self._durable, self.where)

    # -- opening ------------------------------------------------------------------
    @classmethod
    def open(cls, where: str | os.PathLike | Store, mode: str = "a", *, layout: StoreLayout | None = None,
             sync_mode: str = "auto", shard_rows: int | None = ROWS_PER_SHARD,
             wait_s: float = 0.0, storage_options: dict | None = None) -> tuple[DiskTier, CommitRecord]:
        """Open or create the group; returns the tier and the current commit record.

        mode "r": must exist; "a": open, or create when missing (layout required); "w": create, replacing
        anything there. A stored layout other than `layout` raises LayoutMismatchError naming both.
        shard_rows (creation of a local store only): rows per shard file, or None for one file per
        chunk (format 3's layout; slower to write, see shards.py).
        Modes "a" and "w" take the writer lock first, waiting up to `wait_s` seconds for another
        writer: StoreLockedError (naming the holder) when it is still held, ReadOnlyError when the
        directory cannot be written. `where` may be an fsspec URL (s3://bucket/path; `storage_options`
        for its filesystem): an object store's writer takes a lease instead (lease.py); a zarr
        MemoryStore opens without a lock (NoWriterLockWarning).
        """
        check_shard_rows(shard_rows)
        if mode not in ("r", "a", "w"):
            raise ValueError(f"store mode={mode!r}: expected 'r', 'a' or 'w'")
        wait_s = check_wait_s(wait_s)
        read_only = mode == "r"
        if isinstance(where, Store):
            store, label = where, str(where)
            root = str(where.root) if isinstance(where, LocalStore) else None
        elif is_url(where):
            store, label, root = open_url(where, storage_options=storage_options, read_only=read_only), where, None
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
            elif is_object_store(store):
                lock = WriterLease.acquire(store, label, wait_s)
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
                     shard_rows: int | None, lock: WriterLock | WriterLease | None
                     ) -> tuple[DiskTier, CommitRecord]:
        read_only = mode == "r"
        raw = None if mode == "w" else _read_commit_bytes(store)
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
        # zarr parses the group's and each array's zarr.json here: a damaged one (not JSON, not an
        # object, a key flipped) surfaces as ValueError/TypeError/AttributeError/UnicodeDecodeError
        try:
            group = zarr.open_group(store, mode="r" if read_only else "r+", zarr_format=3)
            attrs = group.attrs.get("folio", {})
            if not isinstance(attrs, dict):
                raise TypeError(f"the group's 'folio' attributes are {type(attrs).__name__}, not an object")
            if attrs.get("format_version") not in READABLE_VERSIONS:
                raise FormatVersionError(f"{label}: group format version {attrs.get('format_version')!r}; "
                                         f"this code reads versions {list(READABLE_VERSIONS)} (versions before 3 kept "
                                         f"K and V in separate arrays; re-ingest the documents with this version)")
            missing = [name for name in _DATA_ARRAYS if name not in group]
            if missing:
                raise FormatVersionError(f"{label}: arrays {missing} are missing from the group")
            for name in _DATA_ARRAYS:
                group[name]  # (each array's metadata, checked before anything is read or written)
        except FormatVersionError:
            raise
        except (FileNotFoundError, ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise FormatVersionError(f"{label}: the zarr metadata (zarr.json of the group or of an array) is "
                                     f"damaged or not a Folio store's ({type(e).__name__}: {e})") from e
        tier = cls(store, group, record.layout, read_only=read_only, sync_mode=sync_mode, where=label, record=record,
                   writer_lock=lock)
        return tier, record

    @classmethod
    def _create(cls, store: Store, layout: StoreLayout, label: str, sync_mode: str,
                shard_rows: int | None = ROWS_PER_SHARD,
                lock: WriterLock | WriterLease | None = None) -> tuple[DiskTier, CommitRecord]:
        if isinstance(store, LocalStore):
            _clear_local(str(store.root))  # (keeps the lock file, which zarr's "w" would delete)
            group = zarr.open_group(store, mode="a", zarr_format=3)
        elif is_object_store(store):
            _clear_objects(store)  # (keeps the lease, which zarr's "w" would delete)
            group = zarr.open_group(store, mode="a", zarr_format=3)
        else:
            group = zarr.open_group(store, mode="w", zarr_format=3)
        L, H, T, D = layout.n_layers, layout.n_kv_heads, layout.block_len, layout.head_dim
        # a local directory shards kv and landmarks (appends into open files; see shards.py); an object
        # store shards them as immutable segments and index objects (segments.py); a MemoryStore (one
        # process) keeps one object per chunk, as does shard_rows=None anywhere
        segments = is_object_store(store) and shard_rows is not None
        sharded = (isinstance(store, LocalStore) or segments) and shard_rows is not None
        S = shard_rows or 1
        cap = max(S, INITIAL_CAPACITY) if sharded else INITIAL_CAPACITY
        spec = {
            "kv": ((cap, L, 2, H, T, D), (1, 1, 2, H, T, D), layout.zarr_dtype, (S, L, 2, H, T, D)),
            "landmarks": ((cap, L, H, D), (1, L, H, D), layout.zarr_dtype, (S, L, H, D)),
            "block_stream": ((cap,), (META_CHUNK,), "int32", None),
            "block_ordinal": ((cap,), (META_CHUNK,), "int64", None),
        }
        for name, (shape, chunks, dtype, shards) in spec.items():
            group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, compressors=[Crc32cCodec()],
                               shards=shards if sharded else None,
                               fill_value=0 if name != "block_stream" else -1,
                               chunk_key_encoding={"name": "default", "separator": "."})
        group.attrs["folio"] = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "layout": layout.to_dict(),
                                "note": "rows < commit.json n_rows whose stream is alive are valid blocks; "
                                        "bfloat16 is stored as uint16 bits",
                                **({"shard_storage": SHARD_STORAGE} if segments else {})}
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
    def writer_lock(self) -> WriterLock | WriterLease | None:
        """The writer lock (local) or lease (object store) this tier holds (None: opened read-only, or a
        MemoryStore)."""
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
    kv_key = staticmethod(kv_key)
    landmark_key = staticmethod(landmark_key)

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
            if self._root is not None:
                self._durable.written(os.path.join(self._root, name, "zarr.json"))
        self._capacity = cap

    def write_rows(self, start: int, k: np.ndarray, v: np.ndarray, landmarks: np.ndarray,
                   stream_codes: np.ndarray, ordinals: np.ndarray) -> None:
        """Write rows [start, start + N): k, v (N, L, H, T, D), landmarks (N, L, H, D) in the storage dtype,
        stream_codes (N,) int32, ordinals (N,) int64. Not durable until make_durable()."""
        self._check_writable()
        self.ensure_capacity(start + k.shape[0])
        self._chunks.write_rows(start, k, v, landmarks)
        self._meta.append(start, stream_codes, ordinals)

    def write_rows_meta(self, start: int, stream_codes: np.ndarray, ordinals: np.ndarray) -> None:
        """Record rows [start, start + N) without their chunks: rows deleted before they were
        written (they read as absent, like rows whose chunks delete_rows removed)."""
        self._check_writable()
        self.ensure_capacity(start + len(stream_codes))
        self._chunks.rows_seen(start + len(stream_codes))  # (a shard these rows end is complete)
        self._meta.append(start, stream_codes, ordinals)

    def read_layer_into(self, rows: np.ndarray, layer: int, out_k: np.ndarray, out_v: np.ndarray) -> np.ndarray:
        """Read layer `layer` of `rows` into out_k, out_v (M, H, T, D) (storage dtype, C-contiguous).
        Returns a bool mask of rows whose chunks exist. Raises CorruptBlockError."""
        self._check_open()
        rows_l = rows.tolist()
        return self._chunks.read_kv(rows_l, [layer] * len(rows_l), out_k, out_v)

    def read_landmarks(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Landmark keys of rows, (M, L, H, D) in the storage dtype, and the found mask."""
        self._check_open()
        out = np.empty((len(rows), *self.layout.landmark_shape), dtype=self.layout.zarr_dtype)
        return out, self._chunks.read_landmarks(rows.tolist(), out)

    def read_row_meta(self, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
        """block_stream and block_ordinal of rows < n_rows (through zarr, crc-checked)."""
        self._check_open()
        return self._meta.read(n_rows, flush=not self._read_only)

    def delete_rows(self, rows: Sequence[int]) -> None:
        """Remove every chunk of those rows (after a commit that no longer covers them)."""
        self._check_writable()
        self._chunks.delete_rows(rows)

    # -- durability and the commit record (commit.py) -------------------------------------
    def make_durable(self) -> None:
        """Force every chunk written so far to stable storage (local directories; other stores: no-op).
        After a failed sync of the data files this raises for good: see commit.py."""
        self._check_writable()
        self._durable.make_durable(self._write_buffered)

    def _write_buffered(self) -> None:
        self._meta._write_pending_meta()
        self._chunks.seal()

    @property
    def gone(self) -> bool:
        """True when the local directory this tier opened was deleted or replaced since (False for
        other stores)."""
        return self._durable.gone

    def check_present(self) -> None:
        """StoreNotFoundError when the store's directory was deleted (or replaced) while open."""
        self._durable.check_present()

    def read_commit(self) -> CommitRecord:
        """The commit record as stored now."""
        self._check_open()
        raw = _read_commit_bytes(self.store)
        if raw is None:
            raise FormatVersionError(f"{self.where}: {COMMIT_KEY} is missing")
        return CommitRecord.from_json(raw, self.where)

    def commit(self, record: CommitRecord) -> None:
        """Atomically replace the commit record (call make_durable() first)."""
        self._check_writable()
        lengths = self._chunks.shard_lengths()
        if lengths:
            record.shards = lengths
        if isinstance(self._writer_lock, WriterLease):
            self._writer_lock.check()  # fencing: a writer whose lease was taken over commits nothing
        self._durable.commit(record)
        self._chunks.committed()

    # -- small blobs (the saved index) --------------------------------------------------
    def write_blob(self, key: str, data: bytes | bytearray) -> None:
        self._check_writable()
        self._chunks.write_blob(key, data)

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
        return self._chunks.size_bytes()

    # -- the Tier interface -----------------------------------------------------------
    def get(self, key: Key) -> Entry | None:
        got = self.get_stacked([key])
        return None if got is None else (got[0][0], got[1][0])

    def get_stacked(self, keys: Sequence[Key]) -> tuple[torch.Tensor, torch.Tensor] | None:
        self._check_open()
        out_k = np.empty((len(keys), *self.layout.kv_shape), dtype=self.layout.zarr_dtype)  # (M, H, T, D)
        out_v = np.empty_like(out_k)
        for row, layer in keys:
            self._check_key(row, layer)
        found = self._chunks.read_kv([int(r) for r, _ in keys], [int(la) for _, la in keys], out_k, out_v)
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
        self._chunks.put_kv(int(row), int(layer), kn, vn)

    def delete(self, key: Key) -> bool:
        self._check_writable()
        there = self.contains(key)
        self._chunks.delete_kv(int(key[0]), int(key[1]))
        return there

    def contains(self, key: Key) -> bool:
        self._check_open()
        row, layer = key
        self._check_key(row, layer)
        return self._chunks.contains_kv(int(row), int(layer))

    def chunk_location(self, row: int, layer: int) -> tuple[str, int, int] | None:
        """(file, byte offset, bytes incl. the crc) of the kv chunk of (row, layer), or of the landmark
        chunk of `row` when layer is -1; None when absent. Local stores only (tools and tests)."""
        self._check_open()
        return self._chunks.chunk_location(int(row), int(layer))

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
            self._chunks.close()
        finally:
            if self._writer_lock is not None:
                self._writer_lock.release()


def _shard_storage(group: zarr.Group) -> str | None:
    attrs = group.attrs.get("folio", {})
    return attrs.get("shard_storage") if isinstance(attrs, dict) else None


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


def _clear_objects(store: Store) -> None:
    """Delete every key of an object store but its writer lease: the commit records first, so an
    interrupted clear reads as an interrupted creation (recreated)."""
    async def keys() -> list[str]:
        return [k async for k in store.list()]

    found = sync(keys())
    first = [k for k in found if k == COMMIT_KEY or k.startswith(f"{COMMITS_PREFIX}/")]
    for key in first + [k for k in found if k not in first and k != LEASE_KEY]:
        sync(store.delete(key))


def _read_commit_bytes(store: Store) -> bytes | None:
    """The current commit record: commit.json of a local directory, the newest of commits/ elsewhere."""
    if isinstance(store, LocalStore):
        return _get_bytes(store, COMMIT_KEY)
    try:
        return read_newest_commit(store, COMMIT_KEY)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StoreIOError(e.errno, f"{store}: reading its commit record failed ({e.strerror or e})",
                           e.filename) from e


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


def _get_bytes(store: Store, key: str) -> bytes | None:
    try:
        buf = sync(store.get(key, prototype=default_buffer_prototype()))
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StoreIOError(e.errno, f"{store}: reading {key} failed ({e.strerror})", e.filename) from e
    return None if buf is None else buf.to_bytes()
