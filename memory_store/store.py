"""TieredStore: blocks in device -> host -> disk tiers behind a landmark index.

The caching unit is one (block_id, layer) entry, so a query at layer l moves only layer l
of the selected blocks. The store is a facade over named parts, each with its own module:

- RowTable (rows.py): ids (= zarr rows, never reused), streams, ordinals, live flags.
- WriteBehind (write_behind.py): a put hands a CPU copy to a background writer through a
  bounded queue (`write_queue_bytes`: a put waits when it is full); with write_behind=False
  the put writes its chunks itself. Either way nothing is durable before flush().
- ReadCascade (reads.py): reads take each entry from the fastest of device tier, host
  tier, write-behind queue, disk; it owns the "memory tiers are exclusive" rule, promotion,
  demotion (budgets hold for memory really allocated) and prefetch.
- DiskTier (disk.py, the source of truth) with its commit protocol (commit.py): `flush()`
  waits for the writer, makes the chunks durable and atomically replaces the commit
  record; it returns once everything put so far is durable.
- LandmarkIndex (index.py): derived; saved beside the data on close (or every flush with
  save_index="flush"), loaded on open when it matches the commit, else rebuilt (index_io.py).

Failures. A write, sync or rename that fails (disk full, I/O error, read-only remount) raises
StoreIOError (errno and file of the failed call) and leaves the last commit intact and readable.
A put that raises stored nothing. The background writer's failure is raised once, by the next
put, flush or close; the writer then pauses until the next put or flush resumes it, so once
space is freed a flush() writes and commits everything acknowledged. After a failed sync of the
data files the store never commits again: reopen it (commit.py says why). A store directory
deleted under an open store gives StoreNotFoundError, and nothing is written into its place.
memory_store/testing injects these faults (tests/memory_store/test_faults.py).

One writer at a time, many readers. Modes "a" and "w" take the store's writer lock
(writer_lock.py) before touching anything; a second writer is refused with StoreLockedError
naming the holder, or waits `wait_s` seconds. Readers (mode "r") take no lock and see the
commit record as of their open: rows < n_rows whose stream is alive; a writer never rewrites
a committed row. `delete_stream` is committed by the next flush, its chunks removed after that
commit (a crash in between leaves unreachable chunks, never a half-deleted stream).

Thread safety: one re-entrant lock around every public method; the writer and prefetch
threads take it only for bookkeeping, never while doing I/O.
Shape letters: N blocks, M entries, L layers, H KV heads, T block_len, D head_dim.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from zarr.abc.store import Store

from .commit import CommitRecord
from .config import StoreConfig
from .disk import DiskTier
from .errors import (ClosedError, CorruptBlockError, InvalidArgumentError, ReadOnlyError, StoreError, StoreIOError,
                     UnknownBlockError, io_error)
from .index import LandmarkIndex
from .layout import StoreLayout
from .reads import ReadCascade, heads_selection
from .rows import RowTable, check_finite, check_parts, check_stream_name
from .stats import StoreStats
from .write_behind import WriteBehind

__all__ = ["StoreConfig", "Block", "TieredStore"]

_READER_RETRIES = 5  # reopens of a reader whose commit was superseded while it opened


def _has_newer_commit(disk: DiskTier, record: CommitRecord) -> bool:
    try:
        return disk.read_commit().generation != record.generation
    except (StoreError, OSError):
        return False


@dataclass(frozen=True, slots=True)
class Block:
    """One whole block, all layers."""

    id: int
    stream: str
    ordinal: int
    k: torch.Tensor  # (L, H, T, D)
    v: torch.Tensor  # (L, H, T, D)
    landmarks: torch.Tensor  # (L, H, D)


class TieredStore:
    """The store. Open with TieredStore.open(); see the module docstring for what it promises."""

    # -- opening --------------------------------------------------------------------
    def __init__(self, disk: DiskTier, record: CommitRecord, *, mode: str, config: StoreConfig) -> None:
        self.layout: StoreLayout = record.layout
        self.config = config
        self.mode = mode
        self.device: torch.device = config.resolve_device()
        self._disk = disk
        self._lock = threading.RLock()
        self._cv = threading.Condition(self._lock)
        self._flush_lock = threading.Lock()  # one flush at a time (taken before _lock)
        self._closed = False
        self._read_only = mode == "r"
        self._generation = record.generation
        self._attempted_generation = record.generation  # a failed commit's number is never reused
        self._dirty = False
        self._pending_deletes: list[int] = []  # rows whose chunks go once a commit no longer names them

        codes, ords = disk.read_row_meta(record.n_rows)
        self._rows = RowTable(record.streams, codes, ords, where=disk.where)
        self._stats = StoreStats(latencies=deque(maxlen=config.latency_window))
        self._writes = WriteBehind(disk, self._rows, self._stats, self._cv,
                                   background=not self._read_only and config.write_behind,
                                   queue_bytes=config.write_queue_bytes, lazy=config.lazy_writes,
                                   nice=config.writer_nice, written_upto=record.n_rows, io_error=self._io_error)
        self._reads = ReadCascade(self.layout, self.device, device_budget_bytes=config.device_budget_bytes,
                                  host_budget_bytes=config.host_budget_bytes, eviction=config.eviction,
                                  lock=self._lock, rows=self._rows, writes=self._writes, disk=disk,
                                  stats=self._stats, generation=lambda: self._generation)
        self.index: LandmarkIndex
        self.index, self.index_source = LandmarkIndex.open_or_rebuild(
            disk, record.generation, record.n_rows, self._rows.n_alive, self._rows.live_stream_rows(),
            self._read_landmarks,
            n_layers=self.layout.n_layers, n_kv_heads=self.layout.n_kv_heads, head_dim=self.layout.head_dim,
            backend=config.index_backend, device=self.device, where=disk.where)

    @classmethod
    def open(cls, where: str | os.PathLike | Store, mode: str = "a", *, layout: StoreLayout | None = None,
             config: StoreConfig | None = None, wait_s: float = 0.0) -> TieredStore:
        """Open a store at a local path or in any zarr Store.

        mode "r": read-only (must exist); "a": read/append, created when missing (layout required then);
        "w": create, replacing what is there (layout required). Raises LayoutMismatchError (naming both
        layouts), StoreNotFoundError, FormatVersionError, ReadOnlyError, and StoreLockedError when another
        writer holds the lock after `wait_s` seconds (modes "a", "w"; see DiskTier.open). A store left
        unclosed keeps its lock until the process exits (its writer thread keeps it alive): use `with`.
        """
        if mode not in ("r", "a", "w"):
            raise InvalidArgumentError(f"TieredStore.open mode={mode!r}: expected 'r', 'a' or 'w'")
        if layout is not None and not isinstance(layout, StoreLayout):
            raise InvalidArgumentError(f"TieredStore.open layout must be a StoreLayout, got {type(layout).__name__}")
        config = config or StoreConfig()
        for attempt in range(_READER_RETRIES + 1):
            disk, record = DiskTier.open(where, mode, layout=layout, sync_mode=config.sync_mode,
                                         shard_rows=config.shard_rows, wait_s=wait_s)
            try:
                return cls(disk, record, mode=mode, config=config)
            except CorruptBlockError:
                # a reader that read commit g while the writer committed a delete and removed its
                # chunks finds them missing (e.g. rebuilding the index): open the newer commit instead
                newer = mode == "r" and attempt < _READER_RETRIES and _has_newer_commit(disk, record)
                disk.close()
                if not newer:
                    raise
            except BaseException:
                disk.close()  # (releases the writer lock: a store that failed to open holds nothing)
                raise
        raise AssertionError("unreachable")

    def __enter__(self) -> TieredStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- checks -------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"store {self._disk.where} is closed")

    def _check_writable(self) -> None:
        """ClosedError, ReadOnlyError, or the background writer's failure (raised once, to this caller)."""
        self._check_open()
        if self._read_only:
            raise ReadOnlyError(f"store {self._disk.where} was opened read-only (mode 'r')")
        with self._lock:
            err = self._writes.take_error()
        if err is not None:
            raise err

    def _io_error(self, e: OSError, doing: str) -> StoreError:
        return io_error(e, self._disk.where, doing, gone=self._disk.gone, generation=self._generation)

    @property
    def background_error(self) -> BaseException | None:
        """The background writer's failure that the next put/flush/close will raise (None: none pending)."""
        with self._lock:
            return self._writes.error

    def _check_layer(self, layer: int) -> int:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < self.layout.n_layers:
            raise InvalidArgumentError(f"layer={layer!r}: expected an int in [0, {self.layout.n_layers})")
        return int(layer)

    # -- writes ---------------------------------------------------------------------------
    def put_blocks(self, stream: str, k: torch.Tensor, v: torch.Tensor, landmarks: torch.Tensor) -> np.ndarray:
        """Append N blocks to `stream`; returns their new ids (N,) int64 (ordinals continue the stream's).

        k, v: (N, L, H, T, D) and landmarks (N, L, H, D), all in the layout dtype, on any device.
        Raises ShapeError, InvalidArgumentError (stream name), ReadOnlyError, ClosedError, StoreIOError
        (see put_streams).
        """
        n = k.shape[0] if isinstance(k, torch.Tensor) and k.dim() >= 1 else 0  # else a ShapeError below
        return self.put_streams([(stream, n)], k, v, landmarks)[0]

    def put_streams(self, parts: Sequence[tuple[str, int]], k: torch.Tensor, v: torch.Tensor,
                    landmarks: torch.Tensor, *, copy: bool = True) -> list[np.ndarray]:
        """Append blocks to several streams in one call: the same as `put_blocks` for each
        part in order (same ids, ordinals and contents), with one host copy, one write-behind
        job and one tier admission for all of them (training puts every lane's window so).
        copy=False skips the host copy of CPU tensors: the caller hands them over and must
        not modify them afterwards (the write-behind queue reads them later).

        parts: (stream, n_blocks) per part; k, v (N, L, H, T, D) and landmarks (N, L, H, D)
        hold the parts' blocks one after the other, N = sum of n_blocks. Returns each part's
        ids. Everything is checked before anything changes: an error stores no part.
        Raises ShapeError, InvalidArgumentError, LandmarkIndexError, ReadOnlyError, ClosedError, and
        StoreIOError (this put's own write failed, write_behind=False; or the background writer failed
        since the last call: raised once, the earlier puts stay queued and are retried)."""
        self._check_writable()
        checked = check_parts(parts)
        n = sum(c for _, c in checked)
        self.layout.check_blocks(k, v, landmarks, n)
        if n == 0:
            return [np.empty(0, dtype=np.int64) for _ in checked]
        # CPU copies for the disk (the caller may reuse its tensors)
        # (numpy copies: single-threaded, so they do not stall on a core held by the writer thread)
        cpu = [t.detach().to("cpu").contiguous() for t in (k, v, landmarks)]
        check_finite(cpu[:2], ("k", "v"), [s for s, c in checked for _ in range(c)])  # (landmarks: the index's check)
        host = [self.layout.to_storage(t) for t in cpu]
        k_np, v_np, lm_np = (a.copy() if copy else a for a in host)
        lm_cpu = self.layout.from_storage(lm_np)  # (N, L, H, D)
        with self._cv:
            self._check_writable()
            self._writes.resume()  # (after a reported failure: the queue is retried, this put joins it)
            self._writes.wait_for_room(k_np.nbytes + v_np.nbytes + lm_np.nbytes, self._check_writable)
            rows = self._rows
            start = rows.next_id
            rows.grow(start + n)  # (allocations first: nothing below may fail half-way)
            codes, ords = rows.plan(checked)  # worked out before anything changes
            if not self._writes.background:
                # written before anything changes, so a put that fails on disk stores nothing (rows it
                # wrote lie past the committed count, are never read, and the next put writes them again)
                try:
                    self._disk.write_rows(start, k_np, v_np, lm_np, codes, ords)
                except OSError as e:
                    raise self._io_error(e, f"writing blocks {start}-{start + n - 1}") from e
            # the index checks every part (landmarks finite, ids new) before it changes: an error here
            # leaves the store as it was
            offs = np.cumsum([0] + [c for _, c in checked])
            out = [np.arange(start + offs[i], start + offs[i + 1], dtype=np.int64) for i in range(len(checked))]
            self.index.add_parts([(stream, ids, lm_cpu[offs[i]:offs[i + 1]])
                                  for i, ((stream, _), ids) in enumerate(zip(checked, out))])
            rows.append(checked, out, codes, ords)
            self._dirty = True
            self._writes.submit(start, k_np, v_np, lm_np, codes, ords)
            self._reads.place_new(start, k, v)
        return out

    def flush(self) -> None:
        """Return once every block, deletion and stream meta change made so far is durable and committed.
        No-op on a read-only store.

        What is committed is the store as it was when flush was called: puts, deletes and meta
        changes another thread makes while flush waits for the writer belong to the next
        flush (the commit never counts rows the writer may not have written yet, and rows are
        unlinked only after every job that wrote them finished). Concurrent flushes run one
        after the other.

        Raises StoreIOError when a file could not be written, synced or renamed (or the background
        writer's failure, raised once): the last commit stays intact and everything acknowledged
        stays queued for a later flush() (after a failed data sync every later flush raises; see
        commit.py). StoreNotFoundError when the store's directory was deleted while open."""
        self._check_open()
        if self._read_only:
            return
        with self._flush_lock, self._cv:
            self._check_writable()
            writes, rows = self._writes, self._rows
            writes.resume()  # (after a reported failure: this flush retries the queue)
            target = writes.seq  # every row < next_id is in a job <= target
            snapshot = alive = None
            if self._dirty:
                snapshot = (rows.next_id, rows.snapshot_streams(), self._pending_deletes)
                self._pending_deletes, self._dirty = [], False
                alive = rows.alive[:rows.next_id].copy()
            try:
                written = writes.wait_written(target, alive)
                self._check_writable()
                if not written:
                    last = writes.failure
                    raise StoreIOError(getattr(last, "errno", None), f"store {self._disk.where}: the background "
                                       f"writer failed (raised to another call: {last}); nothing past generation "
                                       f"{self._generation} is committed; call flush() again to retry",
                                       getattr(last, "filename", None))
                if snapshot is None:
                    return
                n_rows, streams, deletes = snapshot
                # a commit that failed may still have landed (its rename done, the directory sync not):
                # the retry takes a new number, so two different records never share one
                gen = self._attempted_generation = max(self._generation, self._attempted_generation) + 1
                try:
                    self._disk.make_durable()
                    record = CommitRecord(generation=gen, n_rows=n_rows, layout=self.layout,
                                          streams=streams, writer_stats=self._stats.counters())
                    self._disk.commit(record)
                except OSError as e:
                    raise self._io_error(e, f"flush (committing generation {gen})") from e
            except BaseException:
                if snapshot is not None:  # not committed: the next flush commits it
                    self._pending_deletes = snapshot[2] + self._pending_deletes
                    self._dirty = True
                raise
            self._generation = record.generation
            if deletes:
                try:
                    self._disk.delete_rows(deletes)
                except BaseException as e:
                    self._pending_deletes = deletes + self._pending_deletes  # retried by the next flush
                    self._dirty = True
                    if isinstance(e, OSError):
                        raise self._io_error(e, f"flush, after committing, removing the chunks of "
                                                f"{len(deletes)} deleted blocks (retried by the next flush)") from e
                    raise
            # the index as committed: only when nothing changed while flush waited (else the next
            # flush saves it; an index of another generation is rebuilt at open)
            if self.config.save_index == "flush" and not self._dirty:
                self._save_index("flush, after committing,")

    def delete_stream(self, stream: str) -> int:
        """Remove every block of `stream` from all tiers and the index (durable after the next flush).
        Returns how many blocks were removed (0 for an unknown stream)."""
        self._check_writable()
        if not isinstance(stream, str):
            raise InvalidArgumentError(f"stream={stream!r}: expected a str")
        with self._lock:
            rows = self._rows.delete_stream(stream)
            if rows is None:
                return 0
            self._reads.drop([(int(r), layer) for r in rows for layer in range(self.layout.n_layers)])
            self.index.remove_stream(stream)
            self._pending_deletes.extend(rows.tolist())
            self._dirty = True
            return int(rows.shape[0])

    def set_stream_meta(self, stream: str, meta: dict) -> None:
        """Replace the small JSON metadata of `stream` (persisted by flush). Creates the stream if new."""
        self._check_writable()
        check_stream_name(stream)
        try:
            meta = json.loads(json.dumps(meta, allow_nan=False))
        except (TypeError, ValueError) as e:
            raise InvalidArgumentError(f"stream meta of {stream!r} must be JSON-serialisable ({e})") from e
        if not isinstance(meta, dict):
            raise InvalidArgumentError(f"stream meta of {stream!r} must be a dict, got {type(meta).__name__}")
        with self._lock:
            self._rows.set_meta(stream, meta)
            self._dirty = True

    # -- reads -----------------------------------------------------------------------------
    def get_layer(self, ids: Sequence[int] | torch.Tensor, layer: int, *, promote: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of `layer` for those blocks, (M, H, T, D) each on self.device, in the order given.
        Promotes them to the device tier (promote=False: read through, the tiers unchanged —
        for one-off reads such as a decode step's new blocks, which would otherwise each
        demote a device entry). Raises UnknownBlockError, CorruptBlockError, InvalidArgumentError."""
        t0 = time.perf_counter()
        self._check_open()
        layer = self._check_layer(layer)
        with self._lock:
            rows = self._rows.check_ids(ids)
        uniq, inverse = np.unique(rows, return_inverse=True)
        self._reads.wait_inflight([(int(r), layer) for r in uniq])
        with self._lock:
            self._check_open()
            self._rows.check_ids(uniq)  # a delete may have raced the wait
            k, v = self._reads.fetch(uniq, layer, promote)
        if not np.array_equal(uniq, rows):
            inv = torch.from_numpy(inverse.reshape(-1)).to(k.device)
            k, v = k.index_select(0, inv), v.index_select(0, inv)  # (M, H, T, D)
        self._reads.sync_copies()
        self._stats.latencies.append(time.perf_counter() - t0)
        return k, v

    def get_heads(self, sel: torch.Tensor, layer: int, *, promote: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """One KV head per selected block: sel (B, H, k) int64 block ids (-1: none), entry
        [b, h, j] being head h of block sel[b, h, j] -> K, V (B, H, k, T, D) on self.device,
        zeros where sel is -1 (batched retrieval: each lane and head its own blocks). One
        gather from the device tier when it holds every block (training); otherwise
        `get_layer` of the distinct blocks (promote as there), then the gather.
        Raises InvalidArgumentError, UnknownBlockError, CorruptBlockError."""
        t0 = time.perf_counter()
        sel_np, uniq, pos, heads = heads_selection(sel, self.layout.n_kv_heads)
        self._check_open()
        layer = self._check_layer(layer)
        if not uniq.size:
            return self._reads.absent_heads(sel_np.shape)
        with self._lock:
            self._rows.check_ids(uniq)
            got = self._reads.gather_heads([(int(r), layer) for r in uniq], pos, heads)
        if got is None:
            k_u, v_u = self.get_layer(uniq, layer, promote=promote)  # (M, H, T, D)
            got = self._reads.heads_of(k_u, v_u, pos, heads)
        else:
            self._stats.latencies.append(time.perf_counter() - t0)
        return self._reads.shape_heads(got, sel_np)

    def get(self, block_id: int) -> Block | None:
        """The whole block (all layers) or None when the id is unknown or deleted."""
        self._check_open()
        bid = int(block_id)
        if not self.contains(bid):
            return None
        # get_layer waits for in-flight prefetches, which need the lock: it must not be held here
        ks, vs = [], []
        try:
            for layer in range(self.layout.n_layers):
                k, v = self.get_layer([bid], layer)
                ks.append(k[0])
                vs.append(v[0])
        except UnknownBlockError:
            return None  # deleted by another thread meanwhile
        with self._lock:
            if not self._rows.alive[bid]:
                return None
            ids_t = torch.tensor([bid], dtype=torch.int64)
            lms = torch.stack([self.index.keys(layer, ids_t)[0] for layer in range(self.layout.n_layers)])  # (L, H, D)
            name = self._rows.names(np.array([bid]))[0]
            ordinal = int(self._rows.ords[bid])
        return Block(bid, name, ordinal, torch.stack(ks), torch.stack(vs),
                     lms.to(device=self.device, dtype=self.layout.torch_dtype))

    def contains(self, block_id: int) -> bool:
        """True when the block is live (put and not deleted)."""
        self._check_open()
        return self._rows.is_live(int(block_id))

    # -- prefetch ----------------------------------------------------------------------------
    def prefetch(self, ids: Sequence[int] | torch.Tensor, layer: int | None = None) -> None:
        """Warm those blocks (one layer, or all) into memory in the background; returns at once.
        A later get_layer of them waits for this load instead of reading disk."""
        self._check_open()
        layers = range(self.layout.n_layers) if layer is None else [self._check_layer(layer)]
        with self._lock:
            self._reads.prefetch(np.unique(self._rows.check_ids(ids)), layers)

    # -- metadata ------------------------------------------------------------------------------
    def block_meta(self, ids: Sequence[int] | torch.Tensor) -> tuple[list[str], np.ndarray]:
        """Stream names and ordinals (M,) int64 of those blocks. UnknownBlockError for unknown ids."""
        self._check_open()
        with self._lock:
            rows = self._rows.check_ids(ids)
            return self._rows.names(rows), self._rows.ords[rows].copy()

    def stream_blocks(self, stream: str) -> np.ndarray:
        """Ids of `stream`'s blocks in ordinal order ((0,) for an unknown stream)."""
        self._check_open()
        with self._lock:
            return self._rows.rows_of(stream)

    def streams(self) -> list[str]:
        """Names of the live streams, in creation order."""
        self._check_open()
        with self._lock:
            return self._rows.live_streams()

    def get_stream_meta(self, stream: str) -> dict:
        """A copy of the stream's metadata ({} when none was set or the stream is unknown)."""
        self._check_open()
        with self._lock:
            return self._rows.meta_of(stream)

    def __len__(self) -> int:
        return self._rows.n_alive

    @property
    def generation(self) -> int:
        """Generation of the last commit (flush) this store made or opened."""
        return self._generation

    @property
    def disk(self) -> DiskTier:
        return self._disk

    @property
    def tiers(self) -> list:
        """[device, host, disk]."""
        return [self._reads.device_tier, self._reads.host_tier, self._disk]

    # -- the derived index (index_io.py) ---------------------------------------------------------
    def _read_landmarks(self, rows: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        lm, found = self._disk.read_landmarks(rows)
        return self.layout.from_storage(lm).float(), found

    def _save_index(self, doing: str) -> None:
        try:
            self.index.save_generation(self._disk, self._generation)
        except OSError as e:
            raise self._io_error(e, f"{doing} saving the landmark index (derived: rebuilt at open when missing)") from e

    # -- stats and lifecycle ----------------------------------------------------------------------
    def bytes_moved(self) -> dict[str, int]:
        """The `bytes_moved` counters of `stats()` alone (cheap: no latency percentiles)."""
        with self._lock:
            return dict(self._stats.moved)

    def stats(self) -> dict:
        """Hits and misses per tier, bytes moved between tiers, get latency percentiles (ms), tier fill."""
        with self._lock:
            return self._stats.report(self._reads.memory, blocks=len(self), streams=len(self._rows.stream_code),
                                      generation=self._generation, queued_write_bytes=self._writes.queued_bytes,
                                      index_source=self.index_source)

    def close(self) -> None:
        """Flush (when writable), save the index, stop the background threads, release the writer lock.
        Idempotent. Raises what that flush raises, or a background writer's failure not yet raised
        (then the blocks put since the last flush are not committed) — in either case only after
        everything is closed and released."""
        if self._closed:
            return
        try:
            if not self._read_only:
                # a background failure not yet raised: raised here (the blocks put since the last
                # flush are not committed); else the final flush retries a paused writer
                self._check_writable()
                self.flush()
                if self.config.save_index != "never" and self._rows.next_id:
                    with self._lock:
                        if not self._dirty:  # (changed by another thread since: rebuilt at open)
                            self._save_index("close")
        finally:
            self._writes.stop()
            self._reads.stop_prefetch()
            with self._lock:
                self._closed = True
                self._reads.close()
                self._disk.close()

    def __repr__(self) -> str:
        return (f"TieredStore({self._disk.where!r}, mode={self.mode!r}, blocks={len(self)}, "
                f"generation={self._generation}, device={self.device})")
