"""SegmentShards: the sharded layout written to object storage, where nothing can be appended to.

A local shard file is appended to at every flush (shards.py); an object cannot be, and
rewriting a whole shard object per flush would upload up to 256 rows again and replace an
object under its readers. So on object storage (an fsspec store: S3, ...) a shard is kept as
immutable objects, each written once:

    kv/seg/<shard>/v<version>-<n>.bin    a segment: the chunks one write put into this shard,
                                         each chunk's bytes + crc32c (zarr's encoding), back to back
    kv/seg/<shard>/v<version>.idx        the shard's index at a seal: for every chunk of the
                                         shard (segment, offset, nbytes), or EMPTY; cumulative

(and the same under landmarks/). A write of N rows is one PUT per shard it touches (a flush of
64 rows into one shard: one object, where one object per chunk would be 64 x (layers + 1));
`seal()` (the store's make_durable) PUTs a fresh index object for every shard written since
the last seal, and the commit record names each shard's newest index version
(`CommitRecord.shards[name][shard] = version`), so:
- a reader trusts only the index versions its commit record names; each is one GET (cached:
  immutable), then one range GET per chunk, all of a read gathered concurrently;
- a writer killed at any moment leaves objects of versions no commit names (above the newest
  one named); the next writer deletes them at open, under its lease, before writing;
- no object a published record names is ever overwritten: every seal takes a new version.

Superseded index versions, and segments no index references any more (their rows deleted),
are deleted KEEP_COMMITS commits after the commit that superseded them, so a reader on one of
the last few records still finds everything it names. A reader that loads a shard's index later
than that (it opened long ago) reads the oldest newer index instead: indexes are cumulative and
rows never rewritten, so it places the same chunks, less those of rows deleted since. A writer that closes in between leaves
them as dead bytes (reclaimed by nothing: the price of not listing the store at every open).

Plain zarr-python sees the arrays' metadata but none of these objects (its shard keys are
kv/c.<shard>...): read a store on object storage with Folio, or copy a local store (its
shard files are zarr's own format) to the bucket, which opens through range_shards.py.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Sequence

import crc32c
import numpy as np
from zarr.abc.store import RangeByteRequest, Store
from zarr.core.sync import sync

from .chunks import ChunkIO
from .commit import Durability
from .errors import CorruptBlockError, StoreIOError
from .layout import StoreLayout
from .object_store import KEEP_COMMITS
from .shards import CRC_BYTES, EMPTY, fill_checked

__all__ = ["SegmentShards", "SHARD_STORAGE"]

SHARD_STORAGE = "segments"  # the group attribute folio.shard_storage of a store written this way
_KEY = re.compile(r"^v(\d+)(?:-\d+\.bin|\.idx)$")
_MAGIC = b"FSEG1\n"


def _encode_index(segments: list[str], entries: np.ndarray) -> bytes:
    head = json.dumps({"segments": segments}).encode()
    body = _MAGIC + len(head).to_bytes(8, "little") + head + entries.astype("<u8").tobytes()
    return body + crc32c.crc32c(body).to_bytes(CRC_BYTES, "little")


def _decode_index(raw: bytes, n_entries: int, where: str, block: int) -> tuple[list[str], np.ndarray]:
    body, crc = raw[:-CRC_BYTES], raw[-CRC_BYTES:]
    if len(raw) < len(_MAGIC) + 8 + CRC_BYTES or not body.startswith(_MAGIC):
        raise CorruptBlockError(f"{where}: not a segment index (truncated or another file)", block_id=block)
    if crc32c.crc32c(body) != int.from_bytes(crc, "little"):
        raise CorruptBlockError(f"{where}: the index failed its crc32c check", block_id=block)
    n = int.from_bytes(body[len(_MAGIC):len(_MAGIC) + 8], "little")
    start = len(_MAGIC) + 8
    try:
        segments = list(json.loads(body[start:start + n])["segments"])
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptBlockError(f"{where}: its header is damaged ({e})", block_id=block) from e
    entries = np.frombuffer(body[start + n:], dtype="<u8")
    if entries.size != 3 * n_entries:
        raise CorruptBlockError(f"{where}: {entries.size // 3} entries, the layout has {n_entries}", block_id=block)
    return segments, entries.reshape(n_entries, 3).copy()


class _Shard:
    """One shard's index in memory: the segments it references and (segment, offset, nbytes) per chunk."""

    __slots__ = ("version", "segments", "entries", "dirty", "sealed_refs")

    def __init__(self, version: int | None, segments: list[str], entries: np.ndarray) -> None:
        self.version, self.segments, self.entries, self.dirty = version, segments, entries, False
        self.sealed_refs = self.refs()  # the segments the last sealed index references

    def refs(self) -> set[str]:
        return {self.segments[int(i)] for i in np.unique(self.entries[:, 0]) if i != EMPTY}


class _SegmentArray:
    """One array ("kv" or "landmarks") kept as segments and index objects (see the module docstring)."""

    def __init__(self, store: Store, name: str, S: int, per_row: int, committed: dict[int, int], proto,
                 where: str, writable: bool = False) -> None:
        self.store, self.name, self.S, self.per_row = store, name, S, per_row
        self.writable = writable
        self.entries = S * per_row
        self.committed = dict(committed)  # shard -> index version the last commit named
        self.where = where
        self._proto = proto
        self._shards: dict[int, _Shard] = {}
        self._seq = 0

    def prefix(self, no: int) -> str:
        return f"{self.name}/seg/{no}"

    # -- objects -----------------------------------------------------------------------
    async def _get(self, key: str, byte_range=None) -> bytes | None:
        try:
            buf = await self.store.get(key, prototype=self._proto, byte_range=byte_range)
        except OSError as e:
            raise StoreIOError(e.errno, f"{self.where}: reading {key} failed ({e})", key) from e
        return None if buf is None else buf.to_bytes()

    async def _put(self, key: str, data: bytes) -> None:
        try:
            await self.store.set(key, self._proto.buffer.from_bytes(data))
        except OSError as e:
            raise StoreIOError(e.errno, f"{self.where}: writing {key} failed ({e})", key) from e

    async def _shard(self, no: int) -> _Shard:
        sh = self._shards.get(no)
        if sh is not None:
            return sh
        version = self.committed.get(no)
        if version is None:
            sh = _Shard(None, [], np.full((self.entries, 3), EMPTY, dtype=np.uint64))
        else:
            key = f"{self.prefix(no)}/v{version:010d}.idx"
            raw = await self._get(key)
            where = f"{self.where}: shard index {key} (blocks {no * self.S}-{no * self.S + self.S - 1})"
            if raw is None and self.writable:  # (a fresh index would drop every chunk the lost one named)
                raise CorruptBlockError(f"{where} named by the commit record is missing: the store is damaged",
                                        block_id=no * self.S)
            if raw is None:  # a reader whose record is KEEP_COMMITS+ commits old: its index was pruned
                raw = await self._newer_index(no, version)
            if raw is None:  # no index at all: its chunks read as missing (the caller says why: reads.py)
                sh = _Shard(version, [], np.full((self.entries, 3), EMPTY, dtype=np.uint64))
            else:
                segments, entries = _decode_index(raw, self.entries, where, no * self.S)
                sh = _Shard(version, segments, entries)
        self._shards[no] = sh
        return sh

    async def _newer_index(self, no: int, version: int) -> bytes | None:
        """The oldest index of shard `no` newer than `version` that is still there. Indexes are
        cumulative and rows are never rewritten, so a newer one places every chunk the pruned one
        did, except chunks of rows deleted since (EMPTY: the reader is told their stream was
        deleted), and more rows, which a reader of the older record never asks for."""
        for _ in range(3):  # (one pruned between the listing and the get: list again)
            versions = []
            async for key in self.store.list_prefix(f"{self.prefix(no)}/"):
                m = _KEY.match(key.rsplit("/", 1)[-1])
                if m and key.endswith(".idx") and int(m.group(1)) > version:
                    versions.append(int(m.group(1)))
            if not versions:
                return None
            for v in sorted(versions):
                raw = await self._get(f"{self.prefix(no)}/v{v:010d}.idx")
                if raw is not None:
                    return raw
        return None

    # -- writes ------------------------------------------------------------------------
    async def write(self, items: Sequence[tuple[int, int, Sequence[memoryview]]], version: int) -> None:
        """Chunks (row, sub, [byte views]) as one new segment per shard they fall in."""
        by_shard: dict[int, list] = {}
        for it in items:
            by_shard.setdefault(it[0] // self.S, []).append(it)
        shards = {no: await self._shard(no) for no in by_shard}
        jobs, updates = [], []
        for no, its in by_shard.items():
            self._seq += 1
            seg = f"v{version:010d}-{self._seq}.bin"
            parts, off, placed = [], 0, []
            for row, sub, mvs in its:
                data = b"".join(mvs)
                data += crc32c.crc32c(data).to_bytes(CRC_BYTES, "little")
                parts.append(data)
                placed.append(((row % self.S) * self.per_row + sub, off, len(data)))
                off += len(data)
            jobs.append(self._put(f"{self.prefix(no)}/{seg}", b"".join(parts)))
            updates.append((no, seg, placed))
        await asyncio.gather(*jobs)  # (an error: no index changes; the objects written are orphans)
        for no, seg, placed in updates:
            sh = shards[no]
            sh.segments.append(seg)
            i = len(sh.segments) - 1
            for e, off, n in placed:
                sh.entries[e] = (i, off, n)
            sh.dirty = True

    async def delete(self, rows: Sequence[int], sub: int | None = None) -> None:
        for row in rows:
            sh = await self._shard(row // self.S)
            base = (row % self.S) * self.per_row
            subs = range(self.per_row) if sub is None else (sub,)
            for s in subs:
                if sh.entries[base + s, 0] != EMPTY:
                    sh.entries[base + s] = EMPTY
                    sh.dirty = True

    async def seal(self, version: int) -> list[str]:
        """A new index object for every dirty shard; returns the keys it supersedes (the shards'
        previous index objects, and segments no index references any more)."""
        dirty = [(no, sh) for no, sh in self._shards.items() if sh.dirty]
        await asyncio.gather(*(self._put(f"{self.prefix(no)}/v{version:010d}.idx",
                                         _encode_index(sh.segments, sh.entries)) for no, sh in dirty))
        superseded = []
        for no, sh in dirty:
            if sh.version is not None:
                superseded.append(f"{self.prefix(no)}/v{sh.version:010d}.idx")
            refs = sh.refs()
            superseded += [f"{self.prefix(no)}/{seg}" for seg in sorted(sh.sealed_refs - refs)]
            sh.version, sh.dirty, sh.sealed_refs = version, False, refs
        return superseded

    def lengths(self) -> dict[int, int]:
        out = dict(self.committed)
        out.update({no: sh.version for no, sh in self._shards.items() if sh.version is not None})
        return out

    # -- reads -------------------------------------------------------------------------
    async def read(self, items: Sequence[tuple[int, int, Sequence[memoryview]]], found: np.ndarray) -> None:
        for no in {row // self.S for row, _, _ in items} - self._shards.keys():
            await self._shard(no)
        jobs, where = [], []
        for i, (row, sub, _) in enumerate(items):
            sh = self._shards[row // self.S]
            seg, off, n = (int(x) for x in sh.entries[(row % self.S) * self.per_row + sub])
            if seg == int(EMPTY):
                continue
            key = f"{self.prefix(row // self.S)}/{sh.segments[seg]}"
            jobs.append(self._get(key, RangeByteRequest(off, off + n)))
            where.append((i, key))
        for (i, key), raw in zip(where, await asyncio.gather(*jobs), strict=True):
            if raw is None:  # missing: the caller says why (a stream deleted under a reader, or damage)
                continue
            row, sub, mvs = items[i]
            fill_checked(key, mvs, raw, row, sub if self.per_row > 1 else -1)
            found[i] = True


class SegmentShards(ChunkIO):
    """The sharded layout on an object store, written as segments (see the module docstring)."""

    def __init__(self, store: Store, layout: StoreLayout, durability: Durability, where: str, *,
                 rows_per_shard: int, committed: dict[str, dict[int, int]], writable: bool) -> None:
        super().__init__(store, layout, durability, where)
        self._kv = _SegmentArray(store, "kv", rows_per_shard, layout.n_layers, committed.get("kv", {}), self._proto,
                                 where, writable)
        self._lm = _SegmentArray(store, "landmarks", rows_per_shard, 1, committed.get("landmarks", {}), self._proto,
                                 where, writable)
        self._arrays = (self._kv, self._lm)
        self._mu = threading.Lock()  # the write-behind thread writes while readers read
        newest = max([0, *committed.get("kv", {}).values(), *committed.get("landmarks", {}).values()])
        self._version = newest + 1  # every seal takes a new one: no published object is overwritten
        self._retired: list[tuple[int, str]] = []  # (commits left to wait, key) to delete
        if writable:
            self._remove_orphans(newest)

    def _remove_orphans(self, newest: int) -> None:
        """Delete what a writer killed after the last commit left: objects of versions above it."""
        async def go() -> None:
            doomed = []
            for arr in self._arrays:
                async for key in self.store.list_prefix(f"{arr.name}/seg/"):
                    m = _KEY.match(key.rsplit("/", 1)[-1])
                    if m and int(m.group(1)) > newest:
                        doomed.append(key)
            await asyncio.gather(*(self.store.delete(k) for k in doomed))

        sync(go())

    def _items(self, rows, layers, out_k, out_v):
        return [(r, la, (memoryview(out_k[i]).cast("B"), memoryview(out_v[i]).cast("B")))
                for i, (r, la) in enumerate(zip(rows, layers))]

    def write_rows(self, start, k, v, landmarks):
        N, L = k.shape[0], self.layout.n_layers
        kv = [(start + i, la, (memoryview(k[i, la]).cast("B"), memoryview(v[i, la]).cast("B")))
              for i in range(N) for la in range(L)]
        lm = [(start + i, 0, (memoryview(landmarks[i]).cast("B"),)) for i in range(N)]

        async def go() -> None:
            await asyncio.gather(self._kv.write(kv, self._version), self._lm.write(lm, self._version))

        with self._mu:
            sync(go())

    def read_kv(self, rows, layers, out_k, out_v):
        found = np.zeros(len(rows), dtype=bool)
        with self._mu:
            sync(self._kv.read(self._items(rows, layers, out_k, out_v), found))
        return found

    def read_landmarks(self, rows, out):
        found = np.zeros(len(rows), dtype=bool)
        with self._mu:
            sync(self._lm.read([(r, 0, (memoryview(out[i]).cast("B"),)) for i, r in enumerate(rows)], found))
        return found

    def put_kv(self, row, layer, k, v):
        with self._mu:
            sync(self._kv.write([(row, layer, (memoryview(k).cast("B"), memoryview(v).cast("B")))], self._version))

    def delete_kv(self, row, layer):
        with self._mu:
            sync(self._kv.delete([row], layer))

    def contains_kv(self, row, layer):
        with self._mu:
            sh = sync(self._kv._shard(row // self._kv.S))
        return bool(sh.entries[(row % self._kv.S) * self._kv.per_row + layer, 0] != EMPTY)

    def delete_rows(self, rows):
        async def go() -> None:
            await self._kv.delete(rows)
            await self._lm.delete(rows)

        with self._mu:
            sync(go())

    def seal(self):
        with self._mu:
            async def go() -> list[list[str]]:
                return await asyncio.gather(*(arr.seal(self._version) for arr in self._arrays))

            try:
                superseded = sync(go())
            finally:
                self._version += 1  # (a failed seal too: its objects may have landed; never reuse it)
            # kept until KEEP_COMMITS more records are published: readers of the older ones use them
            self._retired += [(KEEP_COMMITS + 1, key) for keys in superseded for key in keys]

    def shard_lengths(self):
        return {arr.name: arr.lengths() for arr in self._arrays}

    def committed(self) -> None:
        """After a published commit: superseded objects KEEP_COMMITS commits old are deleted."""
        with self._mu:
            for arr in self._arrays:
                arr.committed = arr.lengths()
            self._retired = [(n - 1, key) for n, key in self._retired]
            doomed = [key for n, key in self._retired if n <= 0]
            self._retired = [(n, key) for n, key in self._retired if n > 0]
        if doomed:
            async def go() -> None:
                await asyncio.gather(*(self.store.delete(k) for k in doomed))

            try:
                sync(go())
            except OSError:
                pass  # dead bytes; nothing reads them
