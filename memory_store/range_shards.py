"""RangeShards: a sharded (format 4) store read from object storage by byte ranges, read-only.

A local store's shard files (shards.py: zarr's sharding_indexed codec, index at the end,
appended to) copied to a bucket as they are (`aws s3 sync`, `fs.put`) open here with mode
"r": the commit record names each shard's committed length, the index that ends there is one
range GET (cached: committed bytes never change), and each chunk one more, all of a read
gathered concurrently. This is what zarr's own sharding codec does on an fsspec store.

Why only reads: these shard files are appended to in place at every flush, and an object cannot
be appended to. A store created on object storage is sharded differently, as immutable segment
and index objects that a writer can add to (segments.py); this module serves local stores
copied to a bucket as they are: ingest locally, serve from the bucket.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import crc32c
import numpy as np
from zarr.abc.store import RangeByteRequest, Store
from zarr.core.sync import sync

from .chunks import ChunkIO
from .commit import Durability
from .errors import CorruptBlockError, ReadOnlyError, StoreIOError
from .layout import StoreLayout
from .shards import CRC_BYTES, EMPTY, fill_checked

__all__ = ["RangeShards"]


class _Ranges:
    """One sharded array ("kv" or "landmarks") of an object store, read by byte ranges."""

    def __init__(self, store: Store, name: str, suffix: str, S: int, per_row: int, lengths: dict[int, int],
                 proto) -> None:
        self.store, self.name, self.suffix, self.S, self.per_row = store, name, suffix, S, per_row
        self.entries = S * per_row
        self.index_bytes = self.entries * 16 + CRC_BYTES
        self.lengths = dict(lengths)
        self._proto = proto
        self._index: dict[int, np.ndarray | None] = {}

    def key(self, no: int) -> str:
        return f"{self.name}/c.{no}{self.suffix}"

    async def _get(self, key: str, start: int, end: int) -> bytes | None:
        try:
            buf = await self.store.get(key, prototype=self._proto, byte_range=RangeByteRequest(start, end))
        except OSError as e:
            raise StoreIOError(e.errno, f"{self.store}: reading {key} bytes {start}-{end} failed ({e})",
                               key) from e
        return None if buf is None else buf.to_bytes()

    async def _load_index(self, no: int) -> None:
        length = self.lengths.get(no)
        if length is None:
            self._index[no] = None  # no commit names it: its rows have no chunks
            return
        first = no * self.S
        where = f"shard {self.key(no)} (blocks {first}-{first + self.S - 1})"
        if length < self.index_bytes:
            raise CorruptBlockError(f"{where}: committed length {length} is shorter than its index", block_id=first)
        raw = await self._get(self.key(no), length - self.index_bytes, length)
        if raw is None or len(raw) != self.index_bytes:
            raise CorruptBlockError(f"{where}: the object is missing or shorter than its committed length {length}",
                                    block_id=first)
        body = raw[:-CRC_BYTES]
        if crc32c.crc32c(body) != int.from_bytes(raw[-CRC_BYTES:], "little"):
            raise CorruptBlockError(f"{where}: its index failed its crc32c check", block_id=first)
        self._index[no] = np.frombuffer(body, dtype="<u8").reshape(self.entries, 2)

    async def read(self, items: Sequence[tuple[int, int, Sequence[memoryview]]], found: np.ndarray) -> None:
        shards = {row // self.S for row, _, _ in items} - self._index.keys()
        await asyncio.gather(*(self._load_index(no) for no in shards))
        jobs, where = [], []
        for i, (row, sub, mvs) in enumerate(items):
            index = self._index[row // self.S]
            if index is None:
                continue
            off, n = (int(x) for x in index[(row % self.S) * self.per_row + sub])
            if off == int(EMPTY):
                continue
            jobs.append(self._get(self.key(row // self.S), off, off + n))
            where.append(i)
        for i, raw in zip(where, await asyncio.gather(*jobs), strict=True):
            row, sub, mvs = items[i]
            layer = sub if self.per_row > 1 else -1
            fill_checked(f"{self.key(row // self.S)} chunk ({row % self.S}, {sub})", mvs, raw or b"", row, layer)
            found[i] = True


class RangeShards(ChunkIO):
    """Format 4 on a non-local zarr store, read-only (see the module docstring)."""

    def __init__(self, store: Store, layout: StoreLayout, durability: Durability, where: str, *,
                 rows_per_shard: int, committed: dict[str, dict[int, int]]) -> None:
        super().__init__(store, layout, durability, where)
        L = layout.n_layers
        self._kv = _Ranges(store, "kv", ".0.0.0.0.0", rows_per_shard, L, committed.get("kv", {}), self._proto)
        self._lm = _Ranges(store, "landmarks", ".0.0.0", rows_per_shard, 1, committed.get("landmarks", {}),
                           self._proto)

    def read_kv(self, rows, layers, out_k, out_v):
        found = np.zeros(len(rows), dtype=bool)
        sync(self._kv.read([(r, la, (memoryview(out_k[i]).cast("B"), memoryview(out_v[i]).cast("B")))
                            for i, (r, la) in enumerate(zip(rows, layers))], found))
        return found

    def read_landmarks(self, rows, out):
        found = np.zeros(len(rows), dtype=bool)
        sync(self._lm.read([(r, 0, (memoryview(out[i]).cast("B"),)) for i, r in enumerate(rows)], found))
        return found

    def contains_kv(self, row, layer):
        k = np.empty((1, *self.layout.kv_shape), dtype=self.layout.zarr_dtype)
        return bool(self.read_kv([row], [layer], k, np.empty_like(k))[0])

    def _read_only(self, *_args, **_kw):
        raise ReadOnlyError(f"{self.where}: a sharded store on object storage is read-only (see range_shards.py)")

    write_rows = put_kv = delete_kv = delete_rows = write_blob = _read_only
