"""TieredStore: blocks in device -> host -> disk tiers behind a landmark index.

Composition. A DeviceTier and a HostTier (memory, byte budgets, an eviction policy
each) sit above a DiskTier (zarr v3, the source of truth). The caching unit is one
(block_id, layer) entry, so a query at layer l moves only layer l of the selected
blocks. The two memory tiers are exclusive: an entry lives in at most one of them.

- Reads (`get_layer`) take each entry from the fastest tier holding it, then the
  write-behind queue, then disk (one batched, crc-checked read), and promote every
  entry not already on the device into the device tier. Room is made by the policy's
  victims (LRU by default): device victims are demoted to the host tier, host victims
  are dropped. Dropping is always safe: an entry is dropped from memory only when
  it is on disk or still held by the write-behind queue, so eviction never loses the
  only copy of an entry that is not yet durable.
- Budgets hold for memory really allocated (slab slots), checked before every
  insertion; a batch larger than a tier simply overflows to the next tier.
- Writes (`put_blocks`) assign ids (= zarr rows, never reused), add the landmark
  keys to the index, place the new entries in the device tier (overflow demoted as
  above) and hand a CPU copy to a background writer thread (write-behind). The queue
  is bounded (`write_queue_bytes`): a put waits when it is full. `flush()` waits for
  the writer, makes the chunks durable and atomically replaces the commit record;
  it returns once everything put so far is durable. With write_behind=False the put
  writes its chunks itself (still committed only by flush()).
- `prefetch(ids)` loads entries on a background thread into the device tier (host
  overflow); a later get of them waits for that load rather than reading disk again.
  On CUDA, host->device copies run from pinned memory on a side stream
  (torch.cuda.Stream) and the consumer stream waits on it.
- The index is derived. It is saved beside the data (keys index/g<generation>/...
  through the zarr store) on close (or every flush with save_index="flush"), tagged
  with the commit generation; on open it is loaded when its generation matches the
  commit record, else rebuilt from the persisted landmark keys of the live blocks.
- Failures. A write, sync or rename that fails (disk full, I/O error, read-only remount) raises
  StoreIOError (errno and file of the failed call) and leaves the last commit intact and readable.
  A put that raises stored nothing. The background writer's failure is raised once, by the next
  put, flush or close; its job stays at the head of the queue and the writer pauses until the
  next put or flush resumes it, so once space is freed a flush() writes and commits everything
  acknowledged. A commit is published only after every file it names is synced; after a failed
  sync of the data files the store never commits again (the kernel may have dropped what it
  could not write): reopen it. A store directory deleted under an open store gives
  StoreNotFoundError, and nothing is written into its place. Temp files left by a killed writer
  are removed by the next one. memory_store/testing injects these faults (tests/memory_store/test_faults.py).
- One writer at a time, many readers. Opening with mode "a" or "w" takes the store's
  writer lock (an OS file lock, released on close() or when the process dies; see
  writer_lock.py) before touching anything; a second writer, in this process or
  another, is refused at open with StoreLockedError naming the holder, or waits
  `wait_s` seconds for it. Readers (mode "r") take no lock and see the commit record
  as of their open: rows < n_rows whose stream is alive. A writer never rewrites a
  committed row, so many reader processes can read while the writer appends.
  `delete_stream` is committed by the next flush; its chunks are removed after that
  commit (a crash in between leaves unreachable chunks, never a visible half-deleted
  stream).

Thread safety: one re-entrant lock around every public method; the writer and
prefetch threads take it only for bookkeeping, never while doing I/O.
Shape letters: N blocks, M entries, L layers, H KV heads, T block_len, D head_dim.
"""

from __future__ import annotations

import bisect
import copy
import errno
import json
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from zarr.abc.store import Store

from .disk import CommitRecord, DiskTier, StreamRecord, check_shard_rows
from .errors import (ClosedError, CorruptBlockError, InvalidArgumentError, ReadOnlyError,
                     ShapeError, StoreError, StoreIOError, StoreNotFoundError, UnknownBlockError)
from .eviction import make_policy
from .index import LandmarkIndex
from .layout import StoreLayout
from .tiers import DeviceTier, HostTier, Key, MemoryTier

__all__ = ["StoreConfig", "Block", "TieredStore"]

_MiB = 1 << 20


@dataclass(kw_only=True, slots=True)
class StoreConfig:
    """Budgets and behaviour of a TieredStore (not persisted: each open may choose its own)."""

    device_budget_bytes: int = 512 * _MiB
    """Most bytes the device tier allocates (0 disables the tier)."""
    host_budget_bytes: int = 2048 * _MiB
    """Most bytes the host tier allocates (0 disables the tier)."""
    device: str = "auto"
    """Where get_layer returns tensors and the device tier lives: "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:N"."""
    write_behind: bool = True
    """Write chunks on a background thread (True) or inside put_blocks (False)."""
    write_queue_bytes: int = 256 * _MiB
    """Most bytes of K/V waiting for the background writer; put_blocks waits beyond it."""
    lazy_writes: bool = False
    """Write-back instead of write-behind (needs write_behind): the writer leaves put blocks
    in the write queue (memory; reads are served from it) until the queue holds more than
    half of write_queue_bytes, a put waits for room, or flush()/close() asks; blocks whose
    stream was deleted by then are never written. For short-lived streams (training: a
    document's stream lives a few steps), whose disk writes would otherwise take CPU from
    compute. Durability is unchanged: nothing is durable before flush() in either mode."""
    writer_nice: int = 0
    """Niceness the background writer thread adds to itself (Linux; 0 keeps the process's).
    A niced writer yields the cores to compute, but it then falls behind and the write-behind
    queue (memory) fills: on the 2-core test machine nice 10 gained no measurable ingest time
    and raised peak RSS, so it is off by default."""
    index_backend: str = "auto"
    """LandmarkIndex backend ("auto", "exact", "flat", "ivf", "hnsw")."""
    eviction: str = "lru"
    """Eviction policy of the memory tiers (see eviction.POLICIES)."""
    sync_mode: str = "auto"
    """Durability of local directories: "auto" (syncfs if available, else fsync), "syncfs", "fsync", "none" (tests only)."""
    save_index: str = "close"
    """When to save the derived index: "close", "flush" (every commit) or "never" (always rebuilt on open)."""
    latency_window: int = 10_000
    """How many recent get latencies the percentiles are taken over."""
    shard_rows: int | None = 256
    """Creating a local store: blocks per shard file (appended to; see memory_store/shards.py), or None for one
    file per (block, layer) chunk (format 3's layout: creating a file costs far more than writing into one)."""

    def __post_init__(self) -> None:
        if isinstance(self.writer_nice, bool) or not isinstance(self.writer_nice, int) or not 0 <= self.writer_nice <= 19:
            raise ValueError(f"StoreConfig.writer_nice={self.writer_nice!r}: expected an int in [0, 19]")
        for name in ("device_budget_bytes", "host_budget_bytes", "write_queue_bytes"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"StoreConfig.{name}={v!r}: expected an int >= 0")
        if self.write_queue_bytes == 0:
            raise ValueError("StoreConfig.write_queue_bytes=0: expected an int >= 1")
        if not isinstance(self.lazy_writes, bool) or (self.lazy_writes and not self.write_behind):
            raise ValueError(f"StoreConfig.lazy_writes={self.lazy_writes!r}: expected a bool, and "
                             "write_behind=True with it (the writer thread holds the blocks)")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"StoreConfig.device={self.device!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
        if self.sync_mode not in ("auto", "syncfs", "fsync", "none"):
            raise ValueError(f"StoreConfig.sync_mode={self.sync_mode!r}: expected 'auto', 'syncfs', 'fsync' or 'none'")
        if self.save_index not in ("close", "flush", "never"):
            raise ValueError(f"StoreConfig.save_index={self.save_index!r}: expected 'close', 'flush' or 'never'")
        make_policy(self.eviction)  # ValueError naming the allowed policies
        check_shard_rows(self.shard_rows, "StoreConfig.shard_rows")
        if not isinstance(self.latency_window, int) or self.latency_window < 1:
            raise ValueError(f"StoreConfig.latency_window={self.latency_window!r}: expected an int >= 1")

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        return torch.device(self.device)


@dataclass(frozen=True, slots=True)
class Block:
    """One whole block, all layers."""

    id: int
    stream: str
    ordinal: int
    k: torch.Tensor  # (L, H, T, D)
    v: torch.Tensor  # (L, H, T, D)
    landmarks: torch.Tensor  # (L, H, D)


@dataclass(slots=True)
class _WriteJob:
    seq: int
    start: int
    k: np.ndarray  # (N, L, H, T, D) storage dtype
    v: np.ndarray  # (N, L, H, T, D)
    landmarks: np.ndarray  # (N, L, H, D)
    codes: np.ndarray  # (N,) int32
    ordinals: np.ndarray  # (N,) int64

    @property
    def end(self) -> int:
        return self.start + self.k.shape[0]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.landmarks.nbytes


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of True in a 1-D bool array."""
    d = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist()))


@dataclass(slots=True)
class _Stats:
    hits: dict[str, int] = field(default_factory=lambda: {"device": 0, "host": 0, "write_queue": 0, "disk": 0})
    misses: dict[str, int] = field(default_factory=lambda: {"device": 0, "host": 0})
    moved: dict[str, int] = field(default_factory=lambda: {"host_to_device": 0, "disk_to_device": 0,
                                                           "device_to_host": 0, "to_disk": 0,
                                                           "never_written": 0})
    prefetched: int = 0
    latencies: deque = field(default_factory=deque)


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

        self._device_tier = DeviceTier(self.layout, config.device_budget_bytes, device=self.device,
                                       policy=make_policy(config.eviction))
        self._host_tier = HostTier(self.layout, config.host_budget_bytes, pin_memory=self.device.type == "cuda",
                                   policy=make_policy(config.eviction))
        self._memory: list[MemoryTier] = [self._device_tier, self._host_tier]
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

        # committed state -> in-memory bookkeeping
        n = record.n_rows
        codes, ords = disk.read_row_meta(n)
        self._generation = record.generation
        self._streams: list[StreamRecord] = copy.deepcopy(record.streams)
        self._stream_code: dict[str, int] = {s.name: c for c, s in enumerate(self._streams) if s.alive}
        if n and (codes.min() < 0 or codes.max() >= len(self._streams)):
            raise CorruptBlockError(f"{disk.where}: block_stream holds codes outside the {len(self._streams)} streams")
        cap = max(64, n)
        self._codes = np.full(cap, -1, dtype=np.int32)
        self._ords = np.zeros(cap, dtype=np.int64)
        self._alive = np.zeros(cap, dtype=bool)
        self._codes[:n], self._ords[:n] = codes, ords
        alive_codes = np.array([s.alive for s in self._streams] or [False], dtype=bool)
        self._alive[:n] = alive_codes[codes] if n else False
        self._n_alive = int(self._alive[:n].sum())  # live blocks (len(store)), kept in step with _alive
        self._stream_rows: dict[int, list[np.ndarray]] = {}
        for code in self._stream_code.values():
            rows = np.flatnonzero(codes == code).astype(np.int64)
            self._stream_rows[code] = [rows[np.argsort(ords[rows], kind="stable")]]
        self._next_id = n
        self._attempted_generation = record.generation  # a failed commit's number is never reused
        self._dirty = False
        self._pending_deletes: list[int] = []

        # write-behind
        self._jobs: deque[_WriteJob] = deque()
        self._job_starts: list[int] = []
        self._queued_bytes = 0
        self._seq = 0
        self._done_seq = 0
        self._drain_seq = 0  # lazy_writes: flush() asks the writer to write every job up to this one
        # a flush's snapshot: rows alive when it was taken, for the jobs up to its target (the writer
        # writes their data even if they are deleted meanwhile: the commit counts them alive)
        self._flush_alive: np.ndarray | None = None
        self._flush_target = 0
        self._put_waiting = 0  # puts waiting for room in the queue
        self._written_upto = n  # rows below are on disk (written, maybe not yet durable)
        # a failure of the background writer not yet raised to a caller; the writer then pauses (its
        # failed job stays first in the queue) until a put or flush resumes it, which retries the job
        self._writer_error: BaseException | None = None
        self._writer_paused = False
        self._writer_failure: BaseException | None = None  # the latest one, reported or not
        self._stopping = False
        self._writer: threading.Thread | None = None
        if not self._read_only and config.write_behind:
            self._writer = threading.Thread(target=self._writer_loop, name="folio-store-writer", daemon=True)
            self._writer.start()

        self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="folio-store-prefetch")
        self._inflight: dict[Key, Future] = {}
        self._stats = _Stats(latencies=deque(maxlen=config.latency_window))

        self.index_source = "new"
        self.index: LandmarkIndex = self._load_index(record)

    @classmethod
    def open(cls, where: str | os.PathLike | Store, mode: str = "a", *, layout: StoreLayout | None = None,
             config: StoreConfig | None = None, wait_s: float = 0.0) -> TieredStore:
        """Open a store at a local path or in any zarr Store.

        mode "r": read-only (must exist); "a": read/append, created when missing (layout required then);
        "w": create, replacing what is there (layout required). A layout other than the stored one raises
        LayoutMismatchError naming both; a missing store StoreNotFoundError; another format FormatVersionError.
        Modes "a" and "w" take the writer lock, held until close(): when another writer holds it, wait up
        to `wait_s` seconds (0: not at all; ignored by mode "r"), then raise StoreLockedError naming the
        holder, before anything in the store was touched. A directory that cannot be written raises
        ReadOnlyError. A store that is not a local directory has no lock (NoWriterLockWarning).
        A store left unclosed keeps its lock until it is collected (its write-behind thread keeps it
        alive until the process exits): close it, or use `with`.
        """
        if mode not in ("r", "a", "w"):
            raise InvalidArgumentError(f"TieredStore.open mode={mode!r}: expected 'r', 'a' or 'w'")
        if layout is not None and not isinstance(layout, StoreLayout):
            raise InvalidArgumentError(f"TieredStore.open layout must be a StoreLayout, got {type(layout).__name__}")
        config = config or StoreConfig()
        disk, record = DiskTier.open(where, mode, layout=layout, sync_mode=config.sync_mode,
                                     shard_rows=config.shard_rows, wait_s=wait_s)
        try:
            return cls(disk, record, mode=mode, config=config)
        except BaseException:
            disk.close()  # (releases the writer lock: a store that failed to open holds nothing)
            raise

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
            err, self._writer_error = self._writer_error, None
        if err is not None:
            raise err

    def _resume_writer(self) -> None:
        """(Lock held.) Let a writer paused by a reported failure retry its queue."""
        alive = self._writer is not None and self._writer.is_alive()
        if self._writer_paused and self._writer_error is None and alive:
            self._writer_paused = False
            self._cv.notify_all()

    def _io_error(self, e: OSError, doing: str) -> StoreError:
        """The typed error for a failed file-system call `e` made while `doing` (StoreErrors pass as they are)."""
        if isinstance(e, StoreError):
            return e
        if self._disk.gone:
            return StoreNotFoundError(f"store {self._disk.where}: {doing} failed: the store was deleted (its "
                                      f"directory is gone or replaced) while open ({e})")
        name = errno.errorcode.get(e.errno, str(e.errno)) if e.errno is not None else "error"
        return StoreIOError(e.errno, f"store {self._disk.where}: {doing} failed ({name}: {e.strerror or e}); the "
                            f"last commit (generation {self._generation}) is intact", e.filename)

    @property
    def background_error(self) -> BaseException | None:
        """The background writer's failure that the next put/flush/close will raise (None: none pending)."""
        with self._lock:
            return self._writer_error

    def _check_layer(self, layer: int) -> int:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < self.layout.n_layers:
            raise InvalidArgumentError(f"layer={layer!r}: expected an int in [0, {self.layout.n_layers})")
        return int(layer)

    def _as_ids(self, ids: Sequence[int] | torch.Tensor | np.ndarray | int) -> np.ndarray:
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        arr = np.asarray(ids)
        if arr.ndim > 1:
            raise ShapeError(f"block ids must be a 1-D sequence, got shape {arr.shape}")
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise ShapeError(f"block ids must be integers, got dtype {arr.dtype}")
        return arr.reshape(-1).astype(np.int64)

    def _check_ids(self, ids: Sequence[int] | torch.Tensor | np.ndarray) -> np.ndarray:
        rows = self._as_ids(ids)
        inside = (rows >= 0) & (rows < self._next_id)
        ok = inside.copy()
        ok[inside] = self._alive[rows[inside]]
        if not ok.all():
            bad = rows[~ok][:8].tolist()
            raise UnknownBlockError(f"unknown block ids {bad}{' ...' if (~ok).sum() > 8 else ''}: never put, "
                                    f"deleted, or not committed when this store was opened")
        return rows

    def _check_tensor(self, name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
        if not isinstance(t, torch.Tensor):
            raise ShapeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ShapeError(f"{name} has shape {tuple(t.shape)}, expected {shape} "
                             f"(N, n_layers, n_kv_heads{', block_len' if len(shape) == 5 else ''}, head_dim)")
        if t.dtype != self.layout.torch_dtype:
            raise ShapeError(f"{name} has dtype {t.dtype}, expected {self.layout.torch_dtype} (the store layout dtype)")

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
        hold the parts' blocks one after the other, N = sum of n_blocks. Returns each
        part's ids. Everything is checked (and the index grown) before anything changes: a
        bad part, or the index failing to grow, stores no part.
        Raises ShapeError, InvalidArgumentError, LandmarkIndexError, ReadOnlyError, ClosedError, and
        StoreIOError: with write_behind=False when this put's own write fails (it then stored nothing);
        with write-behind when the background writer failed since the last call (raised once; this
        put then stored nothing, the earlier ones stay queued and the writer retries them).
        """
        self._check_writable()
        if isinstance(parts, (str, bytes)):
            raise InvalidArgumentError(f"parts={parts!r}: expected a sequence of (stream, n_blocks) pairs")
        checked = []
        for part in parts:
            if not (isinstance(part, (tuple, list)) and len(part) == 2):
                raise InvalidArgumentError(f"part {part!r}: expected a (stream, n_blocks) pair")
            stream, n_part = part
            if not isinstance(stream, str) or not stream:
                raise InvalidArgumentError(f"stream={stream!r}: expected a non-empty str")
            if not isinstance(n_part, (int, np.integer)) or isinstance(n_part, bool) or n_part < 0:
                raise InvalidArgumentError(f"part ({stream!r}, {n_part!r}): n_blocks must be an int >= 0")
            checked.append((stream, int(n_part)))
        L, H, T, D = self.layout.n_layers, self.layout.n_kv_heads, self.layout.block_len, self.layout.head_dim
        n = sum(c for _, c in checked)
        self._check_tensor("k", k, (n, L, H, T, D))
        self._check_tensor("v", v, (n, L, H, T, D))
        self._check_tensor("landmarks", landmarks, (n, L, H, D))
        if n == 0:
            return [np.empty(0, dtype=np.int64) for _ in checked]
        # CPU copies for the disk (the caller may reuse its tensors)
        # (numpy copies: single-threaded, so they do not stall on a core held by the writer thread)
        host = [self.layout.to_storage(t.detach().to("cpu").contiguous()) for t in (k, v, landmarks)]
        k_np, v_np, lm_np = (a.copy() if copy else a for a in host)
        lm_cpu = self.layout.from_storage(lm_np)  # (N, L, H, D)
        job_bytes = k_np.nbytes + v_np.nbytes + lm_np.nbytes
        with self._cv:
            self._check_writable()
            self._resume_writer()  # (after a reported failure: the queue is retried, this put joins it)
            self._put_waiting += 1
            try:
                while self._jobs and self._queued_bytes + job_bytes > self.config.write_queue_bytes:
                    self._cv.notify_all()  # (a lazy writer writes while a put waits)
                    self._cv.wait()  # back-pressure: the writer drains the queue
                    self._check_writable()
            finally:
                self._put_waiting -= 1
            start = self._next_id
            self._grow_rows(start + n)  # (allocations first: nothing below may fail half-way)
            offs = np.cumsum([0] + [c for _, c in checked])
            out = [np.arange(start + offs[i], start + offs[i + 1], dtype=np.int64) for i in range(len(checked))]
            # stream codes and ordinals, worked out before anything changes (new streams take the next codes)
            codes = np.empty(n, dtype=np.int32)
            ords = np.empty(n, dtype=np.int64)
            new_codes: dict[str, int] = {}
            given: dict[int, int] = {}  # code -> ordinals given out by this put
            for i, (stream, n_part) in enumerate(checked):
                if n_part == 0:
                    continue
                code = self._stream_code.get(stream, new_codes.get(stream))
                if code is None:
                    code = new_codes[stream] = len(self._streams) + len(new_codes)
                first_ord = (self._streams[code].n_blocks if code < len(self._streams) else 0) + given.get(code, 0)
                given[code] = given.get(code, 0) + n_part
                codes[offs[i]:offs[i + 1]] = code
                ords[offs[i]:offs[i + 1]] = np.arange(first_ord, first_ord + n_part)
            if self._writer is None:
                # written before anything changes, so a put that fails on disk stores nothing (rows it
                # wrote lie past the committed count, are never read, and the next put writes them again)
                try:
                    self._disk.write_rows(start, k_np, v_np, lm_np, codes, ords)
                except OSError as e:
                    raise self._io_error(e, f"writing blocks {start}-{start + n - 1}") from e
            # the index checks every part (landmarks finite, ids new) before it changes: an error here
            # leaves the store as it was
            self.index.add_parts([(stream, ids, lm_cpu[offs[i]:offs[i + 1]])
                                  for i, ((stream, _), ids) in enumerate(zip(checked, out))])
            for i, ((stream, n_part), ids) in enumerate(zip(checked, out)):
                if n_part == 0:
                    continue
                code = int(codes[offs[i]])
                if code == len(self._streams):  # a new stream (codes were given in this order)
                    self._streams.append(StreamRecord(stream))
                    self._stream_code[stream] = code
                    self._stream_rows[code] = []
                self._streams[code].n_blocks += n_part
                self._stream_rows[code].append(ids)
            self._codes[start:start + n], self._ords[start:start + n], self._alive[start:start + n] = codes, ords, True
            self._n_alive += n
            self._next_id = start + n
            self._dirty = True
            job = _WriteJob(self._seq + 1, start, k_np, v_np, lm_np, codes, ords)
            self._seq += 1
            if self._writer is not None:
                self._jobs.append(job)
                self._job_starts.append(job.start)
                self._queued_bytes += job.nbytes
                if self._writer_may_write():  # (a lazy writer that would go back to sleep is left asleep:
                    self._cv.notify_all()     # waking it costs the main thread a GIL hand-over)
            else:  # (written above)
                self._written_upto = job.end
                self._done_seq = job.seq
                self._stats.moved["to_disk"] += job.nbytes
            # writes go to the device tier; only the newest entries that fit anywhere are worth placing
            keep = self._device_tier.max_entries + self._host_tier.max_entries
            if keep:
                keys = [(int(r), layer) for r in range(start, start + n) for layer in range(L)]
                kk = k.detach().reshape(n * L, H, T, D)  # (N*L, H, T, D), rows ordered (block, layer)
                vv = v.detach().reshape(n * L, H, T, D)
                self._admit(0, keys[-keep:], kk[-keep:], vv[-keep:], source="put")
        return out

    def _grow_rows(self, n: int) -> None:
        if n <= self._codes.shape[0]:
            return
        cap = max(n, 2 * self._codes.shape[0])
        self._codes = np.concatenate([self._codes, np.full(cap - self._codes.shape[0], -1, np.int32)])
        self._ords = np.concatenate([self._ords, np.zeros(cap - self._ords.shape[0], np.int64)])
        self._alive = np.concatenate([self._alive, np.zeros(cap - self._alive.shape[0], bool)])

    def _writer_loop(self) -> None:
        if self.config.writer_nice and hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
            try:  # on Linux a thread's priority is its own (PRIO_PROCESS with the thread id)
                tid = threading.get_native_id()
                os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + self.config.writer_nice)
            except OSError:
                pass  # not allowed here: write at the process's priority
        try:
            self._write_jobs()
        except BaseException as e:  # never die silently: put/flush would wait on it forever
            with self._cv:
                if self._writer_error is None:
                    self._writer_error = self._writer_failure = e
                self._writer_paused = True  # for good: _resume_writer does not revive a dead thread
                self._cv.notify_all()
            raise

    def _writer_may_write(self) -> bool:
        """(Lock held.) Whether the writer takes the next job now (or, with no jobs, stops)."""
        if self._writer_paused:  # after a failure: until resumed, or stopped (the queue stays unwritten)
            return self._stopping
        if not self._jobs:
            return self._stopping
        if self._stopping or not self.config.lazy_writes:
            return True
        return (self._queued_bytes > self.config.write_queue_bytes // 2 or self._put_waiting > 0
                or self._drain_seq >= self._jobs[0].seq)

    def _write_jobs(self) -> None:
        while True:
            with self._cv:
                while not self._writer_may_write():
                    self._cv.wait()
                if not self._jobs or self._writer_paused:
                    return
                job = self._jobs[0]
                alive = self._alive[job.start:job.end].copy()
                if self._flush_alive is not None and job.seq <= self._flush_target:
                    alive |= self._flush_alive[job.start:job.end]
            try:
                if alive.all():
                    self._disk.write_rows(job.start, job.k, job.v, job.landmarks, job.codes, job.ordinals)
                else:  # rows deleted while queued (their stream ended): never written, only recorded
                    for a, b in _runs(~alive):
                        self._disk.write_rows_meta(job.start + a, job.codes[a:b], job.ordinals[a:b])
                    for a, b in _runs(alive):
                        self._disk.write_rows(job.start + a, job.k[a:b], job.v[a:b], job.landmarks[a:b],
                                              job.codes[a:b], job.ordinals[a:b])
            except Exception as e:  # raised to the next put/flush/close; the job stays queued for a retry
                with self._cv:
                    self._writer_error = self._writer_failure = (
                        self._io_error(e, f"the background writer, writing blocks {job.start}-{job.end - 1},")
                        if isinstance(e, OSError) else e)
                    self._writer_paused = True
                    self._cv.notify_all()
                continue
            with self._cv:
                self._jobs.popleft()
                self._job_starts.pop(0)
                self._queued_bytes -= job.nbytes
                self._written_upto = job.end
                self._done_seq = job.seq
                written = job.nbytes * int(alive.sum()) // len(alive)
                self._stats.moved["to_disk"] += written
                self._stats.moved["never_written"] += job.nbytes - written
                self._cv.notify_all()

    def flush(self) -> None:
        """Return once every block, deletion and stream meta change made so far is durable and committed.
        No-op on a read-only store.

        What is committed is the store as it was when flush was called: puts, deletes and meta
        changes another thread makes while flush waits for the writer belong to the next
        flush (the commit never counts rows the writer may not have written yet, and rows are
        unlinked only after every job that wrote them finished). Concurrent flushes run one
        after the other.

        Raises StoreIOError when a file could not be written, synced or renamed (disk full, I/O
        error; or the background writer's failure, raised once): the last commit stays intact and
        everything acknowledged stays queued, so a later flush() retries (after a failed sync of
        the data files every later flush raises; see DiskTier.make_durable). StoreNotFoundError
        when the store's directory was deleted while open."""
        self._check_open()
        if self._read_only:
            return
        with self._flush_lock, self._cv:
            self._check_writable()
            self._resume_writer()  # (after a reported failure: this flush retries the queue)
            target = self._seq  # every row < _next_id is in a job <= target
            snapshot = None
            if self._dirty:
                snapshot = (self._next_id, copy.deepcopy(self._streams), self._pending_deletes)
                self._pending_deletes, self._dirty = [], False
                self._flush_alive, self._flush_target = self._alive[:self._next_id].copy(), target
            try:
                self._drain_seq = max(self._drain_seq, target)  # a lazy writer writes up to here now
                self._cv.notify_all()
                # (paused, not failed: another call may have taken the error first)
                while self._done_seq < target and not self._writer_paused:
                    self._cv.wait()
                self._flush_alive = None
                self._check_writable()
                if self._done_seq < target:
                    last = self._writer_failure
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
                                          streams=streams, writer_stats=self._stats_counters())
                    self._disk.commit(record)
                except OSError as e:
                    raise self._io_error(e, f"flush (committing generation {gen})") from e
            except BaseException:
                self._flush_alive = None
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
                self._save_index_checked("flush, after committing,")

    def delete_stream(self, stream: str) -> int:
        """Remove every block of `stream` from all tiers and the index (durable after the next flush).
        Returns how many blocks were removed (0 for an unknown stream)."""
        self._check_writable()
        with self._lock:
            code = self._stream_code.pop(stream, None)
            if code is None:
                return 0
            parts = self._stream_rows.pop(code)
            rows = np.concatenate(parts) if parts else np.empty(0, np.int64)
            self._streams[code].alive = False
            self._n_alive -= int(self._alive[rows].sum())
            self._alive[rows] = False
            for tier in self._memory:
                tier.delete_many([(int(r), layer) for r in rows for layer in range(self.layout.n_layers)])
            self.index.remove_stream(stream)
            self._pending_deletes.extend(rows.tolist())
            self._dirty = True
            return int(rows.shape[0])

    def set_stream_meta(self, stream: str, meta: dict) -> None:
        """Replace the small JSON metadata of `stream` (persisted by flush). Creates the stream if new."""
        self._check_writable()
        if not isinstance(stream, str) or not stream:
            raise InvalidArgumentError(f"stream={stream!r}: expected a non-empty str")
        try:
            meta = json.loads(json.dumps(meta))
        except (TypeError, ValueError) as e:
            raise InvalidArgumentError(f"stream meta of {stream!r} must be JSON-serialisable ({e})") from e
        if not isinstance(meta, dict):
            raise InvalidArgumentError(f"stream meta of {stream!r} must be a dict, got {type(meta).__name__}")
        with self._lock:
            code = self._stream_code.get(stream)
            if code is None:
                code = len(self._streams)
                self._streams.append(StreamRecord(stream))
                self._stream_code[stream] = code
                self._stream_rows[code] = []
            self._streams[code].meta = meta
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
            rows = self._check_ids(ids)
        uniq, inverse = np.unique(rows, return_inverse=True)
        self._wait_inflight([(int(r), layer) for r in uniq])
        with self._lock:
            self._check_open()
            self._check_ids(uniq)  # a delete may have raced the wait
            k, v = self._fetch(uniq, layer, promote)
        if not np.array_equal(uniq, rows):
            inv = torch.from_numpy(inverse.reshape(-1)).to(k.device)
            k, v = k.index_select(0, inv), v.index_select(0, inv)  # (M, H, T, D)
        if self._copy_stream is not None:
            torch.cuda.current_stream(self.device).synchronize()
        self._stats.latencies.append(time.perf_counter() - t0)
        return k, v

    def get_heads(self, sel: torch.Tensor, layer: int, *, promote: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """One KV head per selected block: sel (B, H, k) int64 block ids (-1: none), entry
        [b, h, j] being head h of block sel[b, h, j] -> K, V (B, H, k, T, D) on self.device,
        zeros where sel is -1 (batched retrieval: each lane and head its own blocks). One
        gather from the device tier when it holds every block (training); otherwise
        `get_layer` of the distinct blocks (promote as there), then the gather.
        Raises InvalidArgumentError, UnknownBlockError, CorruptBlockError."""
        H, T, D = self.layout.kv_shape
        if not isinstance(sel, torch.Tensor) or sel.dtype != torch.int64 or sel.dim() != 3 or sel.shape[1] != H:
            raise InvalidArgumentError(f"get_heads: sel must be a (B, n_kv_heads={H}, k) int64 tensor, got "
                                       f"{tuple(getattr(sel, 'shape', ()))} {getattr(sel, 'dtype', type(sel).__name__)}")
        t0 = time.perf_counter()
        self._check_open()
        layer = self._check_layer(layer)
        s = sel.detach().cpu().numpy()
        valid = s >= 0
        uniq = np.sort(s[valid])  # np.unique, without its overhead (a few us here, not 30)
        uniq = uniq[np.concatenate(([True], uniq[1:] != uniq[:-1]))] if uniq.size else uniq
        if not uniq.size:
            z = torch.zeros((*s.shape, T, D), dtype=self.layout.torch_dtype, device=self.device)
            return z, z.clone()
        pos = np.searchsorted(uniq, np.where(valid, s, uniq[0])).reshape(-1)  # entry of uniq per slot
        heads = np.arange(s.size) // s.shape[2] % H  # the head of each slot (B, H, k) flattened
        with self._lock:
            self._check_ids(uniq)
            got = self._device_tier.gather_heads([(int(r), layer) for r in uniq], pos, heads)
            if got is not None:
                self._stats.hits["device"] += int(uniq.size)
        if got is None:
            k_u, v_u = self.get_layer(uniq, layer, promote=promote)  # (M, H, T, D)
            flat = torch.from_numpy(pos * H + heads).to(k_u.device)
            got = k_u.reshape(-1, T, D).index_select(0, flat), v_u.reshape(-1, T, D).index_select(0, flat)
        else:
            if got[0].device != self.device:  # a host-side device tier (CPU store): copy over
                got = (self._to_device(got[0]), self._to_device(got[1]))
                if self._copy_stream is not None:
                    torch.cuda.current_stream(self.device).synchronize()
            self._stats.latencies.append(time.perf_counter() - t0)
        if not valid.all():  # the gathers are new tensors: their absent slots are zeroed in place
            absent = torch.from_numpy(np.flatnonzero(~valid)).to(got[0].device)
            for t in got:
                t.index_fill_(0, absent, 0.0)
        return tuple(t.view(*s.shape, T, D) for t in got)

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
            if not self._alive[bid]:
                return None
            ids_t = torch.tensor([bid], dtype=torch.int64)
            lms = torch.stack([self.index.keys(layer, ids_t)[0] for layer in range(self.layout.n_layers)])  # (L, H, D)
            name = self._streams[self._codes[bid]].name
            ordinal = int(self._ords[bid])
        return Block(bid, name, ordinal, torch.stack(ks), torch.stack(vs),
                     lms.to(device=self.device, dtype=self.layout.torch_dtype))

    def contains(self, block_id: int) -> bool:
        """True when the block is live (put and not deleted)."""
        self._check_open()
        bid = int(block_id)
        return 0 <= bid < self._next_id and bool(self._alive[bid])

    def _fetch(self, rows: np.ndarray, layer: int, promote: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Assemble (M, H, T, D) K and V on the device from the fastest holders; promote
        (unless promote=False). Lock held."""
        L_shape = self.layout.kv_shape
        m = rows.shape[0]
        keys = [(int(r), layer) for r in rows]
        dev_pos, host_pos, miss_pos = [], [], []
        for i, key in enumerate(keys):
            if self._device_tier.contains(key):
                dev_pos.append(i)
            elif self._host_tier.contains(key):
                host_pos.append(i)
            else:
                miss_pos.append(i)
        st = self._stats
        st.hits["device"] += len(dev_pos)
        st.misses["device"] += len(host_pos) + len(miss_pos)
        st.hits["host"] += len(host_pos)
        st.misses["host"] += len(miss_pos)
        eb = self.layout.block_bytes()
        sources = []  # (positions, (K, V)) from each holder
        if dev_pos:
            sources.append((dev_pos, self._device_tier.get_stacked([keys[i] for i in dev_pos])))
        if host_pos:
            sources.append((host_pos, self._host_tier.get_stacked([keys[i] for i in host_pos])))
            st.moved["host_to_device"] += len(host_pos) * eb
        if miss_pos:
            sources.append((miss_pos, self._load(rows[miss_pos], layer)))
            st.moved["disk_to_device"] += len(miss_pos) * eb
        if len(sources) == 1:  # the common all-from-one-holder case: its tensors are the answer, no extra copy
            out_k, out_v = (self._to_device(t) for t in sources[0][1])
        else:
            out_k = torch.empty((m, *L_shape), dtype=self.layout.torch_dtype, device=self.device)  # (M, H, T, D)
            out_v = torch.empty_like(out_k)
            for pos, (k, v) in sources:
                idx = torch.tensor(pos, dtype=torch.long, device=self.device)
                out_k.index_copy_(0, idx, self._to_device(k))
                out_v.index_copy_(0, idx, self._to_device(v))
        room = self._device_tier.max_entries + self._host_tier.max_entries
        promote = sorted(host_pos + miss_pos) if promote else []
        promote = promote[-room:] if room else []  # entries beyond every budget would be dropped anyway
        if promote:
            pos = torch.tensor(promote, dtype=torch.long, device=self.device)
            self._admit(0, [keys[i] for i in promote], out_k.index_select(0, pos), out_v.index_select(0, pos),
                        source="get")
        return out_k, out_v

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if t.device == self.device:
            return t
        if self._copy_stream is None or t.device.type != "cpu":
            return t.to(self.device)
        src = t if t.is_pinned() else t.pin_memory()
        with torch.cuda.stream(self._copy_stream):
            out = src.to(self.device, non_blocking=True)
        torch.cuda.current_stream(self.device).wait_stream(self._copy_stream)
        out.record_stream(torch.cuda.current_stream(self.device))
        return out

    def _host_buffer(self, m: int) -> tuple[torch.Tensor, np.ndarray]:
        """A (M, H, T, D) CPU tensor (pinned on CUDA machines) and its numpy view in the storage dtype."""
        if self._copy_stream is None:
            # numpy, not torch.empty: numpy madvises large buffers for transparent huge pages, and first-touch
            # page faults of a fresh 4 KiB-paged output measured ~2x the whole read time here
            a = np.empty((m, *self.layout.kv_shape), dtype=self.layout.zarr_dtype)  # (M, H, T, D)
            return self.layout.from_storage(a), a
        t = torch.empty((m, *self.layout.kv_shape), dtype=self.layout.torch_dtype, pin_memory=True)
        return t, self.layout.to_storage(t)

    def _load(self, rows: np.ndarray, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Entries not in memory: from the write-behind queue or disk, as CPU tensors (M, H, T, D)."""
        m = rows.shape[0]
        kt, kn = self._host_buffer(m)
        vt, vn = self._host_buffer(m)
        on_disk = rows < self._written_upto
        for i in np.flatnonzero(~on_disk).tolist():  # still queued for the writer
            row = int(rows[i])
            job = self._jobs[bisect.bisect_right(self._job_starts, row) - 1]
            kn[i] = job.k[row - job.start, layer]
            vn[i] = job.v[row - job.start, layer]
            self._stats.hits["write_queue"] += 1
        if on_disk.any():
            if on_disk.all():
                found = self._disk.read_layer_into(rows, layer, kn, vn)
            else:
                idx = np.flatnonzero(on_disk)
                _, k2 = self._host_buffer(idx.shape[0])
                _, v2 = self._host_buffer(idx.shape[0])
                found = self._disk.read_layer_into(rows[idx], layer, k2, v2)
                kn[idx], vn[idx] = k2, v2
            if not found.all():
                bad = rows[on_disk][~found][:8].tolist()
                self._disk.check_present()  # (deleted under this store: say so, not "corrupt")
                raise CorruptBlockError(f"blocks {bad} layer {layer}: committed but their chunks are missing from "
                                        f"{self._disk.where}", block_id=bad[0], layer=layer)
            self._stats.hits["disk"] += int(on_disk.sum())
        return kt, vt

    def _admit(self, level: int, keys: list[Key], k: torch.Tensor, v: torch.Tensor, *, source: str) -> None:
        """Place entries in memory tier `level` (0 device, 1 host), demoting the policy's victims a level down.
        Entries that fit nowhere are dropped: they are on disk or in the write-behind queue."""
        if level >= len(self._memory) or not keys:
            return
        if source != "put":  # the memory tiers are exclusive (a put's ids are new: in no tier yet)
            for tier in self._memory:
                for key in keys:
                    tier.delete(key)
        tier = self._memory[level]
        cap = tier.max_entries
        over = max(0, len(keys) - cap)
        older = (keys[:over], k[:over], v[:over])
        keys, k, v = keys[over:], k[over:], v[over:]
        self._make_room(level, len(keys) - tier.free_entries)
        if keys:
            tier.put_many(keys, k, v)
        if over:
            self._admit(level + 1, *older, source=source)

    def _make_room(self, level: int, need: int) -> None:
        """Free `need` slots of memory tier `level`: the policy's victims move a level down (or are dropped
        past the last: they are on disk or in the write-behind queue)."""
        if need <= 0:
            return
        tier = self._memory[level]
        below = self._memory[level + 1] if level + 1 < len(self._memory) else None
        if below is None or below.max_entries == 0:
            tier.evict(need)  # no copy out
            return
        if below.can_copy_from(tier):  # CPU to CPU: slot to slot
            vkeys = tier.victim_keys(need)  # oldest first
            keep = vkeys[max(0, len(vkeys) - below.max_entries):]
            self._make_room(level + 1, len(keep) - below.free_entries)
            below.put_from(tier, keep)
            tier.delete_many(vkeys)
        else:
            vkeys, vk, vv = tier.pop_victims(need)
            keep = vkeys
            self._admit(level + 1, vkeys, vk, vv, source="demote")
        if level == 0:
            self._stats.moved["device_to_host"] += len(keep) * self.layout.block_bytes()

    # -- prefetch ----------------------------------------------------------------------------
    def prefetch(self, ids: Sequence[int] | torch.Tensor, layer: int | None = None) -> None:
        """Warm those blocks (one layer, or all) into memory in the background; returns at once.
        A later get_layer of them waits for this load instead of reading disk."""
        self._check_open()
        layers = range(self.layout.n_layers) if layer is None else [self._check_layer(layer)]
        with self._lock:
            rows = np.unique(self._check_ids(ids))
            for lay in layers:
                todo = [int(r) for r in rows if (int(r), lay) not in self._inflight
                        and not self._device_tier.contains((int(r), lay)) and not self._host_tier.contains((int(r), lay))]
                if not todo:
                    continue
                fut: Future = Future()
                for r in todo:
                    self._inflight[(r, lay)] = fut
                self._prefetcher.submit(self._prefetch_run, np.array(todo, dtype=np.int64), lay, fut)

    def _prefetch_run(self, rows: np.ndarray, layer: int, fut: Future) -> None:
        try:
            with self._lock:
                if self._closed:
                    return
                live = self._alive[rows] & (rows < self._written_upto)
                queued = rows[~live & self._alive[rows]]
                disk_rows = rows[live]
                qk = self._load(queued, layer) if queued.size else None  # queue copies need the lock
            if disk_rows.size:  # the slow part, outside the lock (written rows never change)
                kt, kn = self._host_buffer(disk_rows.shape[0])
                vt, vn = self._host_buffer(disk_rows.shape[0])
                found = self._disk.read_layer_into(disk_rows, layer, kn, vn)
            with self._lock:
                if self._closed:
                    return
                batches = []
                if qk is not None:
                    batches.append((queued, qk[0], qk[1]))
                if disk_rows.size:
                    batches.append((disk_rows[found], kt[torch.from_numpy(found)], vt[torch.from_numpy(found)]))
                    self._stats.hits["disk"] += int(found.sum())
                    self._stats.moved["disk_to_device"] += int(found.sum()) * self.layout.block_bytes()
                for rs, k, v in batches:
                    keep = self._alive[rs]  # a delete may have raced the read
                    keys = [(int(r), layer) for r in rs[keep]]
                    if keys:
                        sel = torch.from_numpy(keep)
                        self._admit(0, keys, self._to_device(k[sel]), self._to_device(v[sel]), source="prefetch")
                        self._stats.prefetched += len(keys)
                if self._copy_stream is not None:
                    self._copy_stream.synchronize()
        except Exception as e:  # a failed prefetch only means the get reads disk itself (and raises there)
            fut.set_exception(e)
        else:
            fut.set_result(None)
        finally:
            with self._lock:
                for r in rows.tolist():
                    if self._inflight.get((r, layer)) is fut:
                        del self._inflight[(r, layer)]

    def _wait_inflight(self, keys: list[Key]) -> None:
        if self._lock._is_owned():  # the prefetch thread needs the lock to finish: waiting here would deadlock
            raise RuntimeError("TieredStore: waiting for a prefetch while holding the store lock")
        with self._lock:
            futs = {id(f): f for key in keys if (f := self._inflight.get(key)) is not None}
        for f in futs.values():
            try:
                f.result()
            except StoreError:
                pass  # the get below reads the entry itself and raises a precise error if it must

    # -- metadata ------------------------------------------------------------------------------
    def block_meta(self, ids: Sequence[int] | torch.Tensor) -> tuple[list[str], np.ndarray]:
        """Stream names and ordinals (M,) int64 of those blocks. UnknownBlockError for unknown ids."""
        self._check_open()
        with self._lock:
            rows = self._check_ids(ids)
            return [self._streams[c].name for c in self._codes[rows].tolist()], self._ords[rows].copy()

    def stream_blocks(self, stream: str) -> np.ndarray:
        """Ids of `stream`'s blocks in ordinal order ((0,) for an unknown stream)."""
        self._check_open()
        with self._lock:
            code = self._stream_code.get(stream)
            parts = self._stream_rows.get(code, []) if code is not None else []
            return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def streams(self) -> list[str]:
        """Names of the live streams, in creation order."""
        self._check_open()
        with self._lock:
            return [s.name for s in self._streams if s.alive]

    def get_stream_meta(self, stream: str) -> dict:
        """A copy of the stream's metadata ({} when none was set or the stream is unknown)."""
        self._check_open()
        with self._lock:
            code = self._stream_code.get(stream)
            return copy.deepcopy(self._streams[code].meta) if code is not None else {}

    def __len__(self) -> int:
        return self._n_alive

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
        return [self._device_tier, self._host_tier, self._disk]

    # -- search ---------------------------------------------------------------------------------
    def search(self, layer: int, queries: torch.Tensor, k: int, streams: Sequence[str] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k blocks per query and KV head by landmark score; see LandmarkIndex.search."""
        self._check_open()
        return self.index.search(layer, queries, k, streams)

    def search_max(self, layer: int, queries: torch.Tensor, k: int, streams: Sequence[str] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k blocks per KV head by their best score over all queries; see LandmarkIndex.search_max."""
        self._check_open()
        return self.index.search_max(layer, queries, k, streams)

    def search_max_lanes(self, layer: int, queries: torch.Tensor, k: int, streams: Sequence[Sequence[str]],
                         key_map: torch.Tensor | None = None, *, heads_first: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """`search_max` for several lanes, each over its own streams; see LandmarkIndex.search_max_lanes."""
        self._check_open()
        return self.index.search_max_lanes(layer, queries, k, streams, key_map, heads_first=heads_first)

    # -- the derived index -----------------------------------------------------------------------
    def _save_index(self) -> None:
        gen = self._generation
        self.index.generation = gen
        prefix = f"index/g{gen}"
        self.index.save(lambda key, data: self._disk.write_blob(f"{prefix}/{key}", data))
        for name in self._disk.list_dir("index"):
            if name != f"g{gen}":
                self._disk.delete_prefix(f"index/{name}")

    def _save_index_checked(self, doing: str) -> None:
        try:
            self._save_index()
        except OSError as e:
            raise self._io_error(e, f"{doing} saving the landmark index (derived: rebuilt at open when missing)") from e

    def _load_index(self, record: CommitRecord) -> LandmarkIndex:
        L, H, D = self.layout.n_layers, self.layout.n_kv_heads, self.layout.head_dim
        live = int(self._alive[:self._next_id].sum())
        idx = None
        if self._next_id:
            try:
                idx = LandmarkIndex.load(lambda key: self._disk.read_blob(f"index/g{record.generation}/{key}"),
                                         device=self.device)
            except (StoreError, ValueError, OSError):
                idx = None  # unreadable or half-deleted by a writer: it is derived, rebuild it
            if idx is not None and (idx.generation != record.generation or len(idx) != live
                                    or (idx.n_layers, idx.n_kv_heads, idx.head_dim) != (L, H, D)
                                    or idx.backend != self.config.index_backend):
                idx = None
            if idx is not None:
                self.index_source = "loaded"
                return idx
        idx = LandmarkIndex(L, H, D, backend=self.config.index_backend, device=self.device)
        if self._next_id:
            self.index_source = "rebuilt"
            for name, code in self._stream_code.items():
                rows = np.concatenate(self._stream_rows[code]) if self._stream_rows[code] else np.empty(0, np.int64)
                for s in range(0, rows.shape[0], 4096):
                    part = rows[s:s + 4096]
                    lm, found = self._disk.read_landmarks(part)
                    if not found.all():
                        raise CorruptBlockError(f"block {int(part[~found][0])}: landmark chunk missing from "
                                                f"{self._disk.where}", block_id=int(part[~found][0]))
                    idx.add(name, part, self.layout.from_storage(lm).float())
        idx.generation = record.generation
        return idx

    # -- stats and lifecycle ----------------------------------------------------------------------
    def _stats_counters(self) -> dict:
        st = self._stats
        return {"hits": dict(st.hits), "misses": dict(st.misses), "bytes_moved": dict(st.moved),
                "prefetched_entries": st.prefetched}

    def bytes_moved(self) -> dict[str, int]:
        """The `bytes_moved` counters of `stats()` alone (cheap: no latency percentiles)."""
        with self._lock:
            return dict(self._stats.moved)

    def stats(self) -> dict:
        """Hits and misses per tier, bytes moved between tiers, get latency percentiles (ms), tier fill."""
        with self._lock:
            out = self._stats_counters()
            lat = np.array(self._stats.latencies, dtype=np.float64) * 1e3
            out["get_latency_ms"] = {f"p{q}": (float(np.percentile(lat, q)) if lat.size else None) for q in (50, 90, 99)}
            out["get_latency_ms"]["count"] = int(lat.size)
            out["tiers"] = {t.name: {"entries": len(t), "bytes": t.nbytes, "allocated_bytes": t.allocated_bytes,
                                     "budget_bytes": t.budget_bytes, "device": str(t.device)} for t in self._memory}
            out["blocks"] = len(self)
            out["streams"] = len(self._stream_code)
            out["generation"] = self._generation
            out["queued_write_bytes"] = self._queued_bytes
            out["index_source"] = self.index_source
            return out

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
                if self.config.save_index != "never" and self._next_id:
                    with self._lock:
                        if not self._dirty:  # (changed by another thread since: rebuilt at open)
                            self._save_index_checked("close")
        finally:
            with self._cv:
                self._stopping = True
                self._cv.notify_all()
            if self._writer is not None:
                self._writer.join()
            self._prefetcher.shutdown(wait=True)
            with self._lock:
                self._closed = True
                for tier in self._memory:
                    tier.close()
                self._disk.close()

    def __repr__(self) -> str:
        return (f"TieredStore({self._disk.where!r}, mode={self.mode!r}, blocks={len(self)}, "
                f"generation={self._generation}, device={self.device})")

