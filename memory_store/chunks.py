"""Chunk I/O of the disk tier: one class per backend, chosen once when the store opens.

- `ShardedChunks`: a local directory in format 4: kv and landmarks in append-only shard
  files (shards.py), read and written with preadv/pwritev on open descriptors.
- `ChunkFiles`: a local directory in format 3's layout: one file per (block, layer) chunk,
  written with writev and read with readv (no zarr codec pipeline per chunk).
- `ZarrChunks`: any other zarr store (memory, fsspec, object storage): one object per
  chunk, gathered `store.get`/`store.set` on zarr's event loop.

Every backend writes exactly the bytes zarr itself writes (raw little-endian array bytes,
then a 4-byte little-endian crc32c) and checks the crc on every read: a mismatch raises
CorruptBlockError naming the block and layer. A read fills the caller's buffers and
returns a bool mask of the chunks found (a miss is not an error here). Chunk keys use
zarr's "." separator: kv/c.<row>.<layer>.0.0.0.0 and landmarks/c.<row>.0.0.0.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import crc32c
import numpy as np
from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from .commit import Durability, unlink_quietly, write_fully
from .errors import StoreError, StoreIOError
from .layout import StoreLayout
from .shards import CRC_BYTES, ShardSet, check_crc

__all__ = ["ChunkIO", "ShardedChunks", "ChunkFiles", "ZarrChunks", "kv_key", "landmark_key"]

_CRC = CRC_BYTES
_PARALLEL_READ_BYTES = 4 << 20  # a batched local read this big is split across threads
_READ_POOL: ThreadPoolExecutor | None = None
_READ_POOL_PID = 0
_READ_POOL_LOCK = threading.Lock()


def kv_key(row: int, layer: int) -> str:
    return f"kv/c.{row}.{layer}.0.0.0.0"


def landmark_key(row: int) -> str:
    return f"landmarks/c.{row}.0.0.0"


def _bytes_of(a: np.ndarray) -> memoryview:
    """A flat byte view of a C-contiguous array (no copy)."""
    return memoryview(a).cast("B")


def _read_workers() -> int:
    """Threads for a big batched local read: FOLIO_READ_THREADS (default 1: opt-in, its gain was not
    reliable; see BENCHMARKS.md)."""
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


class ChunkIO:
    """The chunk I/O one backend does for the disk tier. k, v, landmarks are C-contiguous arrays in the
    storage dtype; rows and layers are plain int lists."""

    def __init__(self, store: Store, layout: StoreLayout, durability: Durability, where: str) -> None:
        self.store = store
        self.layout = layout
        self.durability = durability
        self.where = where
        self._proto = default_buffer_prototype()

    # -- what every backend implements ---------------------------------------------------
    def write_rows(self, start: int, k: np.ndarray, v: np.ndarray, landmarks: np.ndarray) -> None:
        """Every chunk of rows [start, start + N): k, v (N, L, H, T, D), landmarks (N, L, H, D)."""
        raise NotImplementedError

    def read_kv(self, rows: Sequence[int], layers: Sequence[int], out_k: np.ndarray, out_v: np.ndarray) -> np.ndarray:
        """Entry i = (rows[i], layers[i]) into out_k[i], out_v[i] ((M, H, T, D)); the found mask (M,)."""
        raise NotImplementedError

    def read_landmarks(self, rows: Sequence[int], out: np.ndarray) -> np.ndarray:
        """Landmark chunk of rows[i] into out[i] ((M, L, H, D)); the found mask (M,)."""
        raise NotImplementedError

    def put_kv(self, row: int, layer: int, k: np.ndarray, v: np.ndarray) -> None:
        raise NotImplementedError

    def delete_kv(self, row: int, layer: int) -> None:
        raise NotImplementedError

    def contains_kv(self, row: int, layer: int) -> bool:
        raise NotImplementedError

    def delete_rows(self, rows: Sequence[int]) -> None:
        """Remove every chunk of those rows."""
        raise NotImplementedError

    def write_blob(self, key: str, data: bytes | bytearray) -> None:
        sync(self.store.set(key, self._proto.buffer.from_bytes(bytes(data))))

    def size_bytes(self) -> int:
        async def go() -> int:
            total = 0
            async for key in self.store.list():
                total += await self.store.getsize(key)
            return total

        return sync(go())

    # -- what only sharded files need ----------------------------------------------------
    def rows_seen(self, n: int) -> None:
        """Rows < n were written or recorded without chunks (a shard they end is complete)."""

    def seal(self) -> None:
        """Make what was written readable at the next commit (shards: append their indexes)."""

    def shard_lengths(self) -> dict[str, dict[int, int]]:
        """Each shard's length (segments: its index version), for the commit record ({} when not sharded)."""
        return {}

    def committed(self) -> None:
        """A commit record naming what `shard_lengths` returned was published."""

    def chunk_location(self, row: int, layer: int) -> tuple[str, int, int] | None:
        raise StoreError(f"{self.where}: chunk_location needs a local store")

    def close(self) -> None:
        pass


class _LocalFiles(ChunkIO):
    """What both local-directory backends share: blobs straight to files, size by walking the tree."""

    def __init__(self, store: Store, layout: StoreLayout, durability: Durability, where: str, root: str) -> None:
        super().__init__(store, layout, durability, where)
        self.root = root

    def write_blob(self, key: str, data: bytes | bytearray) -> None:
        self.durability.check_present()  # (straight to a file: zarr's buffer would copy the bytes again)
        path = os.path.join(self.root, key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            unlink_quietly(tmp)
            raise
        self.durability.written(path)

    def size_bytes(self) -> int:
        total = 0
        for dirpath, _, files in os.walk(self.root):
            for f in files:
                try:
                    total += os.path.getsize(os.path.join(dirpath, f))
                except FileNotFoundError:
                    pass
        return total


class ShardedChunks(_LocalFiles):
    """Format 4: kv and landmarks in append-only shard files (see shards.py)."""

    def __init__(self, store: Store, layout: StoreLayout, durability: Durability, where: str, root: str, *,
                 rows_per_shard: int, committed: dict[str, dict[int, int]], n_rows: int, writable: bool) -> None:
        super().__init__(store, layout, durability, where, root)
        L, H, T, D = layout.n_layers, layout.n_kv_heads, layout.block_len, layout.head_dim
        geometry = {"kv": (".0.0.0.0.0", L, 2 * H * T * D * layout.itemsize),
                    "landmarks": (".0.0.0", 1, L * H * D * layout.itemsize)}
        self.shards: dict[str, ShardSet] = {}
        for name, (suffix, per_row, nbytes) in geometry.items():
            sset = ShardSet(os.path.join(root, name), name, suffix, rows_per_shard, per_row, nbytes,
                            committed.get(name, {}), writable=writable)
            if writable:
                sset.recover()  # what a killed writer left past the last commit
            sset.set_rows_seen(n_rows)
            self.shards[name] = sset
        self._kv, self._lm = self.shards["kv"], self.shards["landmarks"]

    def write_rows(self, start, k, v, landmarks):
        L = self.layout.n_layers
        self._kv.write([(start + i, layer, (_bytes_of(k[i, layer]), _bytes_of(v[i, layer])))
                        for i in range(k.shape[0]) for layer in range(L)])
        self._lm.write([(start + i, 0, (_bytes_of(landmarks[i]),)) for i in range(k.shape[0])])

    def read_kv(self, rows, layers, out_k, out_v):
        found = np.zeros(len(rows), dtype=bool)
        self._kv.read_into([(row, layer, (_bytes_of(out_k[i]), _bytes_of(out_v[i])))
                            for i, (row, layer) in enumerate(zip(rows, layers))], found)
        return found

    def read_landmarks(self, rows, out):
        found = np.zeros(len(rows), dtype=bool)
        self._lm.read_into([(r, 0, (_bytes_of(out[i]),)) for i, r in enumerate(rows)], found)
        return found

    def put_kv(self, row, layer, k, v):
        self._kv.write([(row, layer, (_bytes_of(k), _bytes_of(v)))])

    def delete_kv(self, row, layer):
        self._kv.delete_chunk(row, layer)

    def contains_kv(self, row, layer):
        return self._kv.locate(row, layer) is not None

    def delete_rows(self, rows):
        for sset in self.shards.values():
            sset.delete_rows(rows)

    def rows_seen(self, n):
        for sset in self.shards.values():
            sset.set_rows_seen(n)

    def seal(self):
        try:
            for sset in self.shards.values():
                sset.seal()
        finally:
            # (after a failed seal too: the shards sealed before it are no longer dirty, and no later
            # seal would name them again; their directories are synced with them)
            for sset in self.shards.values():
                self.durability.written_many(sset.take_to_sync())

    def shard_lengths(self):
        return {name: sset.lengths() for name, sset in self.shards.items()}

    def chunk_location(self, row, layer):
        sset = self._kv if layer >= 0 else self._lm
        loc = sset.locate(row, max(0, layer))
        return None if loc is None else (sset.path(row // sset.S), loc[1], loc[2])

    def close(self):
        for sset in self.shards.values():
            sset.close()


class _OneObjectPerChunk:
    """The row operations of a backend keeping one file or object per chunk, in terms of its
    `_put_chunks(items)` and `_read(items)`."""

    def write_rows(self, start, k, v, landmarks):
        self._put_chunks(_row_items(self.layout.n_layers, start, k, v, landmarks))

    def read_kv(self, rows, layers, out_k, out_v):
        return self._read([(kv_key(row, layer), [out_k[i], out_v[i]], row, layer)
                           for i, (row, layer) in enumerate(zip(rows, layers))])

    def read_landmarks(self, rows, out):
        return self._read([(landmark_key(r), [out[i]], r, -1) for i, r in enumerate(rows)])

    def put_kv(self, row, layer, k, v):
        self._put_chunks([(kv_key(row, layer), [k, v])])


class ChunkFiles(_OneObjectPerChunk, _LocalFiles):
    """Format 3's local layout: one file per chunk."""

    def _put_chunks(self, items: list[tuple[str, list[np.ndarray]]]) -> None:
        """Write each (key, [contiguous arrays]) as one file: the arrays' bytes back to back (zarr's
        bytes codec of the chunk they make up) and their crc32c, as zarr's Crc32cCodec would."""
        for key, parts in items:
            mvs = [memoryview(a).cast("B") for a in parts]
            c = 0
            for mv in mvs:
                c = crc32c.crc32c(mv, c)
            path = os.path.join(self.root, key)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            except FileNotFoundError:  # the array's directory (first chunk of the array); never its
                try:                   # parent: a store directory deleted under its writer stays deleted
                    os.mkdir(os.path.dirname(path))
                except FileExistsError:
                    pass
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                write_fully(fd, [*mvs, c.to_bytes(_CRC, "little")])
            finally:
                os.close(fd)
            self.durability.written(path)

    def delete_kv(self, row, layer):
        try:
            os.unlink(os.path.join(self.root, kv_key(row, layer)))
        except FileNotFoundError:
            pass

    def contains_kv(self, row, layer):
        return os.path.exists(os.path.join(self.root, kv_key(row, layer)))

    def delete_rows(self, rows):
        for row in rows:
            for key in [kv_key(row, layer) for layer in range(self.layout.n_layers)] + [landmark_key(row)]:
                try:
                    os.unlink(os.path.join(self.root, key))
                except FileNotFoundError:
                    pass

    def chunk_location(self, row, layer):
        path = os.path.join(self.root, kv_key(row, layer) if layer >= 0 else landmark_key(row))
        return (path, 0, os.path.getsize(path)) if os.path.exists(path) else None

    def _read(self, items: list[tuple[str, list[np.ndarray], int, int]]) -> np.ndarray:
        found = np.zeros(len(items), dtype=bool)
        nbytes = sum(d.nbytes for d in items[0][1]) * len(items) if items else 0
        workers = _read_workers()
        if workers > 1 and nbytes >= _PARALLEL_READ_BYTES and len(items) >= 2 * workers:
            # readv and crc32c release the GIL: the copies out of the page cache can run on several cores
            bounds = np.linspace(0, len(items), workers + 1).astype(int)
            futs = [_read_pool().submit(self._read_range, items, int(a), int(b), found)
                    for a, b in zip(bounds[:-1], bounds[1:])]
            errors = [f.exception() for f in futs]  # wait for all before raising
            for e in errors:
                if e is not None:
                    raise e
        else:
            self._read_range(items, 0, len(items), found)
        return found

    def _read_range(self, items: list[tuple[str, list[np.ndarray], int, int]], lo: int, hi: int,
                    found: np.ndarray) -> None:
        """items[lo:hi]: open, readv, close, check."""
        crc = bytearray(_CRC + 1)  # one extra byte detects a chunk longer than expected
        crc_mv = memoryview(crc)
        for i in range(lo, hi):
            key, dsts, row, layer = items[i]
            mvs = [memoryview(d).cast("B") for d in dsts]
            path = os.path.join(self.root, key)
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


class ZarrChunks(_OneObjectPerChunk, ChunkIO):
    """Any zarr store that is not a local directory: one object per chunk."""

    def _put_chunks(self, items: list[tuple[str, list[np.ndarray]]]) -> None:
        bufs = []
        for key, parts in items:
            data = b"".join(bytes(memoryview(a).cast("B")) for a in parts)
            bufs.append((key, self._proto.buffer.from_bytes(data + crc32c.crc32c(data).to_bytes(_CRC, "little"))))

        async def put_all() -> None:
            await asyncio.gather(*(self.store.set(key, buf) for key, buf in bufs))

        sync(put_all())

    def delete_kv(self, row, layer):
        sync(self.store.delete(kv_key(row, layer)))

    def contains_kv(self, row, layer):
        return bool(sync(self.store.exists(kv_key(row, layer))))

    def delete_rows(self, rows):
        keys = [kv_key(row, layer) for row in rows
                for layer in range(self.layout.n_layers)] + [landmark_key(row) for row in rows]

        async def delete_all() -> None:
            await asyncio.gather(*(self.store.delete(key) for key in keys))

        sync(delete_all())

    def _read(self, items: list[tuple[str, list[np.ndarray], int, int]]) -> np.ndarray:
        found = np.zeros(len(items), dtype=bool)

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


def _row_items(n_layers: int, start: int, k: np.ndarray, v: np.ndarray,
               landmarks: np.ndarray) -> list[tuple[str, list[np.ndarray]]]:
    """(key, [arrays]) of every chunk of rows [start, start + N), one object or file each."""
    items = []
    for i in range(k.shape[0]):
        row = start + i
        for layer in range(n_layers):
            items.append((kv_key(row, layer), [k[i, layer], v[i, layer]]))
        items.append((landmark_key(row), [landmarks[i]]))
    return items
