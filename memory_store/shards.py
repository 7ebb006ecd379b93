"""Append-only zarr v3 shard files: the local disk tier's I/O for the "kv" and "landmarks" arrays.

Why: creating a file costs far more than writing a chunk into an open one, so one file per
(block, layer) chunk made file creation most of the cost of every write. A shard holds the chunks of
`rows_per_shard` consecutive rows in one file, so a block write is a `pwritev` into a
file that is already open, and a block read one `preadv` from a cached descriptor.

The files are exactly zarr's `sharding_indexed` codec with `index_location="end"`, inner
chunks of one (block, layer) encoded bytes + crc32c, and an index of (offset, nbytes)
uint64 pairs in C order over the shard's chunk grid, followed by its own crc32c. zarr
reads an index from the last bytes of a shard and chunks at any offset it names, which
is what makes an append-only shard possible:

    [chunks of batch 1][index 1][chunks of batch 2][index 2] ...

New chunks are appended after everything already in the file, never over it; at each
`seal()` (the store's make_durable, before a commit) every shard written since the last
one gets a fresh index appended at its end, and the commit record stores each shard's
length at that moment. Bytes below a committed length are never rewritten, so:
- a reader trusts a shard up to its committed length, reads the index that ends there,
  and sees a consistent state while a writer appends beyond it;
- a writer killed at any moment leaves, at worst, bytes past the committed lengths (or
  files no commit names); the next writer truncates or removes them before appending;
- between commits zarr-python itself would read the last index, which may be an older
  one or half-written chunks: open the store with zarr-python once a writer has flushed
  or closed (the commit then ends every shard with its index).

Superseded indexes and chunks of deleted rows stay in the file as dead bytes (an index is
16 bytes per chunk of the shard, once per commit that touched it); a shard whose rows
are all deleted is removed as a whole.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence

import crc32c
import numpy as np

from .errors import CorruptBlockError, StoreError, StoreIOError

__all__ = ["ShardSet", "check_crc", "check_shard_rows", "fill_checked", "CRC_BYTES", "EMPTY"]

CRC_BYTES = 4
EMPTY = np.uint64(2**64 - 1)  # zarr's marker of an absent chunk in a shard index
_IOV_MAX = 512  # iovecs per pwritev (Linux allows 1024)
_MAX_OPEN = 256  # shards kept open (descriptor and index) beyond the ones with unsealed writes


def check_shard_rows(value: object, name: str = "shard_rows") -> None:
    """ValueError unless `value` is a valid rows-per-shard setting: an int >= 1, or None."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name}={value!r}: expected an int >= 1 or None")


def check_crc(key: str, data: Sequence[memoryview], stored: bytes, extra: int, row: int, layer: int) -> None:
    """Raise CorruptBlockError naming the block unless `data` has the right size (extra == 0) and crc."""
    where = f"block {row}" + (f" layer {layer}" if layer >= 0 else " (landmarks)")
    if extra != 0:
        raise CorruptBlockError(f"{where}: chunk {key} has the wrong size ({'+' if extra > 0 else ''}{extra} bytes "
                                f"against the layout)", block_id=row, layer=layer if layer >= 0 else None)
    want = int.from_bytes(stored, "little")
    got = 0
    for part in data:
        got = crc32c.crc32c(part, got)
    if got != want:
        raise CorruptBlockError(f"{where}: chunk {key} failed its crc32c check (stored {want:#010x}, computed "
                                f"{got:#010x})", block_id=row, layer=layer if layer >= 0 else None)


def fill_checked(key: str, mvs: Sequence[memoryview], raw: bytes, row: int, layer: int) -> None:
    """Copy a fetched chunk (its bytes, then its crc32c) into the caller's buffers `mvs` and check it:
    CorruptBlockError (check_crc) when its size is not the layout's or its crc differs."""
    size = sum(len(m) for m in mvs)
    if len(raw) == size + CRC_BYTES:
        off = 0
        for m in mvs:
            m[:] = raw[off:off + len(m)]
            off += len(m)
    check_crc(key, mvs, raw[size:], len(raw) - size - CRC_BYTES, row, layer)


class _Shard:
    __slots__ = ("no", "fd", "end", "durable", "index", "dirty", "writable")

    def __init__(self, no: int, fd: int, end: int, index: np.ndarray, writable: bool) -> None:
        self.no = no
        self.fd = fd
        self.end = end  # bytes in the file (the next chunk goes here)
        self.durable = end  # length at the last seal (what a commit may name)
        self.index = index  # (entries, 2) uint64: offset, nbytes
        self.dirty = False  # written or deleted since the last seal
        self.writable = writable


class ShardSet:
    """The shard files of one array in one local directory.

    Rows map to shards of `rows_per_shard`; each row has `per_row` inner chunks ("sub": the
    layer for kv, 0 for landmarks) of `chunk_bytes` bytes plus a crc32c. `lengths` is the
    committed length of every shard (from the commit record); a writable set first removes
    what a killed writer left beyond them (`recover`).
    """

    def __init__(self, directory: str, name: str, key_suffix: str, rows_per_shard: int, per_row: int,
                 chunk_bytes: int, lengths: dict[int, int], *, writable: bool) -> None:
        self.dir = directory
        self.name = name
        self.suffix = key_suffix  # ".0.0.0.0.0" for kv, ".0.0.0" for landmarks
        self.S = int(rows_per_shard)
        self.per_row = int(per_row)
        self.chunk_bytes = int(chunk_bytes)
        self.entries = self.S * self.per_row
        self.index_bytes = self.entries * 16 + CRC_BYTES
        self.writable = writable
        self._lengths: dict[int, int] = {int(k): int(v) for k, v in lengths.items()}  # durable lengths
        self._open: OrderedDict[int, _Shard] = OrderedDict()
        self._lock = threading.RLock()
        self._rows_seen = 0  # 1 + the highest row written (a shard is complete once rows pass its end)
        # files sealed or created (a new directory entry) since take_to_sync() last took them: kept until
        # taken, so a seal or sync that fails part-way loses none of them (see DiskTier.make_durable)
        self._to_sync: set[str] = set()

    # -- names -----------------------------------------------------------------------------
    def key(self, no: int) -> str:
        return f"{self.name}/c.{no}{self.suffix}"

    def path(self, no: int) -> str:
        return os.path.join(self.dir, f"c.{no}{self.suffix}")

    def lengths(self) -> dict[int, int]:
        """Committed-to-be lengths: every shard's length at the last seal."""
        with self._lock:
            return dict(self._lengths)

    def set_rows_seen(self, n: int) -> None:
        with self._lock:
            self._rows_seen = max(self._rows_seen, int(n))

    # -- recovery (writers) ------------------------------------------------------------
    def recover(self) -> None:
        """Truncate every shard to its committed length; remove shard files no commit names."""
        if not os.path.isdir(self.dir):
            return
        for fname in os.listdir(self.dir):
            if not (fname.startswith("c.") and fname.endswith(self.suffix)):
                continue
            try:
                no = int(fname[2:len(fname) - len(self.suffix)])
            except ValueError:
                continue
            path = os.path.join(self.dir, fname)
            want = self._lengths.get(no)
            if want is None:
                os.unlink(path)  # created by a writer that died before committing it
            elif os.path.getsize(path) > want:
                os.truncate(path, want)
        for no in [n for n in self._lengths if not os.path.exists(self.path(n))]:
            del self._lengths[no]  # removed (all rows deleted) before the commit that would drop it

    # -- shards ------------------------------------------------------------------------
    def _shard(self, no: int, create: bool) -> _Shard | None:
        """The open shard `no` (lock held); None when it has no file (and create is False)."""
        sh = self._open.get(no)
        if sh is not None:
            self._open.move_to_end(no)
            return sh
        length = self._lengths.get(no, 0)
        path = self.path(no)
        if length == 0 and not create:
            return None
        flags = (os.O_RDWR | (os.O_CREAT if create else 0)) if self.writable else os.O_RDONLY
        try:
            try:
                fd = os.open(path, flags, 0o644)
            except FileNotFoundError:
                if not create:
                    return None  # a committed shard whose rows were all deleted and the file removed
                try:  # the array's directory only: a store directory deleted under its writer stays deleted
                    os.mkdir(self.dir)
                except FileExistsError:
                    pass
                fd = os.open(path, flags, 0o644)
        except OSError as e:
            if create:
                raise  # (a writer's error: the store names the blocks it was writing)
            raise StoreIOError(e.errno, f"shard {self.key(no)} (blocks {no * self.S}-{(no + 1) * self.S - 1}) "
                               f"cannot be opened ({e.strerror})", path) from e
        try:
            if length:
                index = self._read_index(fd, no, length)
            else:
                index = np.full((self.entries, 2), EMPTY, dtype=np.uint64)
                if create:
                    self._to_sync.add(path)
                    if os.fstat(fd).st_size:  # left by a killed writer (recover() missed it): start clean
                        os.ftruncate(fd, 0)
        except BaseException:
            os.close(fd)
            raise
        sh = _Shard(no, fd, length, index, self.writable)
        self._open[no] = sh
        self._trim_open()
        return sh

    def _read_index(self, fd: int, no: int, length: int) -> np.ndarray:
        first = no * self.S
        where = f"{self.key(no)} (blocks {first}-{first + self.S - 1})"
        if length < self.index_bytes:
            raise CorruptBlockError(f"shard {where}: committed length {length} is shorter than its index "
                                    f"({self.index_bytes} bytes)", block_id=first)
        raw = os.pread(fd, self.index_bytes, length - self.index_bytes)
        if len(raw) != self.index_bytes:
            raise CorruptBlockError(f"shard {where}: the file holds {os.fstat(fd).st_size} bytes, its commit "
                                    f"says {length}", block_id=first)
        body = raw[:-CRC_BYTES]
        if crc32c.crc32c(body) != int.from_bytes(raw[-CRC_BYTES:], "little"):
            raise CorruptBlockError(f"shard {where}: its index failed its crc32c check", block_id=first)
        index = np.frombuffer(body, dtype="<u8").reshape(self.entries, 2).astype(np.uint64)
        present = index[:, 0] != EMPTY
        if present.any() and int((index[present, 0] + index[present, 1]).max()) > length:
            raise CorruptBlockError(f"shard {where}: its index points past the committed length {length}",
                                    block_id=first)
        return index

    def _trim_open(self) -> None:
        while len(self._open) > _MAX_OPEN:
            for no, sh in self._open.items():
                if not sh.dirty:
                    os.close(sh.fd)
                    del self._open[no]
                    break
            else:
                return  # every open shard has unsealed writes: keep them

    # -- writes --------------------------------------------------------------------------
    def write(self, items: Sequence[tuple[int, int, Sequence[memoryview]]]) -> None:
        """Append chunks: (row, sub, [byte views]) each, the views' bytes back to back plus their crc32c."""
        if not self.writable:
            raise StoreError(f"{self.dir}: shard set opened read-only")
        by_shard: dict[int, list] = {}
        for row, sub, parts in items:
            by_shard.setdefault(row // self.S, []).append((row, sub, parts))
        with self._lock:
            for no, group in by_shard.items():
                sh = self._shard(no, create=True)
                iov: list = []
                pos = sh.end
                updates = []
                for row, sub, parts in group:
                    c = 0
                    n = 0
                    for p in parts:
                        c = crc32c.crc32c(p, c)
                        n += len(p)
                    iov.extend(parts)
                    iov.append(c.to_bytes(CRC_BYTES, "little"))
                    updates.append(((row - no * self.S) * self.per_row + sub, pos, n + CRC_BYTES))
                    pos += n + CRC_BYTES
                _pwritev_fully(sh.fd, iov, sh.end)
                for e, off, n in updates:
                    sh.index[e, 0] = off
                    sh.index[e, 1] = n
                sh.end = pos
                sh.dirty = True
                self._rows_seen = max(self._rows_seen, max(r for r, _, _ in group) + 1)

    def delete_rows(self, rows: Sequence[int]) -> None:
        """Mark every chunk of those rows absent (the next seal writes the index); a complete shard
        whose chunks are all absent is removed."""
        with self._lock:
            touched: set[int] = set()
            for row in rows:
                no = int(row) // self.S
                sh = self._shard(no, create=False)
                if sh is None:
                    continue
                e = (int(row) - no * self.S) * self.per_row
                sh.index[e:e + self.per_row] = EMPTY
                sh.dirty = True
                touched.add(no)
            for no in touched:
                sh = self._open[no]
                if (no + 1) * self.S <= self._rows_seen and bool((sh.index[:, 0] == EMPTY).all()):
                    os.close(sh.fd)
                    del self._open[no]
                    self._lengths.pop(no, None)
                    try:
                        os.unlink(self.path(no))
                    except FileNotFoundError:
                        pass

    def delete_chunk(self, row: int, sub: int) -> None:
        """Mark one chunk absent (the Tier interface's delete)."""
        with self._lock:
            sh = self._shard(row // self.S, create=False)
            if sh is not None:
                sh.index[(row - sh.no * self.S) * self.per_row + sub] = EMPTY
                sh.dirty = True

    def seal(self) -> None:
        """Append a fresh index to every shard written since the last seal and take their lengths as
        the ones to commit; the files written join `take_to_sync()`."""
        with self._lock:
            for sh in self._open.values():
                if not sh.dirty:
                    continue
                body = sh.index.astype("<u8", copy=False).tobytes()
                crc = crc32c.crc32c(body).to_bytes(CRC_BYTES, "little")
                _pwritev_fully(sh.fd, [body, crc], sh.end)
                sh.end += len(body) + CRC_BYTES
                sh.durable = sh.end
                sh.dirty = False
                self._lengths[sh.no] = sh.end
                self._to_sync.add(self.path(sh.no))
            self._trim_open()

    def take_to_sync(self) -> list[str]:
        """The files sealed or created since the last call (an fsync-mode sync syncs them and their directories)."""
        with self._lock:
            out, self._to_sync = sorted(self._to_sync), set()
            return out

    # -- reads ------------------------------------------------------------------------------
    def locate(self, row: int, sub: int) -> tuple[int, int, int] | None:
        """(fd, offset, nbytes) of a chunk, or None when absent."""
        with self._lock:
            no = row // self.S
            sh = self._shard(no, create=False)
            if sh is None:
                return None
            off, n = sh.index[(row - no * self.S) * self.per_row + sub]
            if off == EMPTY:
                return None
            return sh.fd, int(off), int(n)

    def read_into(self, items: Sequence[tuple[int, int, Sequence[memoryview]]], found: np.ndarray) -> None:
        """Fill items (row, sub, [destination views]) from their chunks and check each crc;
        found[i] = True for the chunks present. Raises CorruptBlockError."""
        crc = bytearray(CRC_BYTES)
        crc_mv = memoryview(crc)
        # the lock is held throughout: a descriptor must not be closed (shard eviction) mid-read;
        # the writer only appends, so the bytes at a located offset never change
        with self._lock:
            for i, (row, sub, mvs) in enumerate(items):
                loc = self.locate(row, sub)
                if loc is None:
                    continue
                fd, off, n = loc
                size = sum(len(m) for m in mvs)
                key = f"{self.key(row // self.S)} chunk ({row % self.S}, {sub})"
                layer = sub if self.per_row > 1 else -1
                if n != size + CRC_BYTES:
                    check_crc(key, mvs, b"", n - size - CRC_BYTES, row, layer)
                try:
                    got = os.preadv(fd, [*mvs, crc_mv], off)
                except OSError as e:
                    raise StoreIOError(e.errno, f"{key}: reading block {row} failed ({e.strerror})",
                                       self.path(row // self.S)) from e
                check_crc(key, mvs, bytes(crc), got - size - CRC_BYTES, row, layer)
                found[i] = True

    def close(self) -> None:
        with self._lock:
            for sh in self._open.values():
                os.close(sh.fd)
            self._open.clear()


def _pwritev_fully(fd: int, parts: list, offset: int) -> None:
    """pwritev all of `parts` at `offset` (in groups of at most _IOV_MAX; short writes finished)."""
    for s in range(0, len(parts), _IOV_MAX):
        group = [memoryview(p).cast("B") if not isinstance(p, bytes) else p for p in parts[s:s + _IOV_MAX]]
        total = sum(len(p) for p in group)
        n = os.pwritev(fd, group, offset)
        if n != total:  # short write (rare on regular files): finish with plain pwrites
            rest = memoryview(b"".join(bytes(p) for p in group))[n:]
            pos = offset + n
            while rest:
                w = os.pwrite(fd, rest, pos)
                rest, pos = rest[w:], pos + w
        offset += total
