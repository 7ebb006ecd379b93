"""ReadCascade: where each read entry comes from, and where it goes afterwards.

The one owner of the rule "the memory tiers are exclusive": an entry (block_id, layer)
lives in at most one of [device, host]. A read takes each entry from the fastest tier
holding it, then the write-behind queue, then disk (one batched, crc-checked read), and
promotes every entry not already on the device into the device tier. Room is made by the
policy's victims: device victims are demoted to the host tier (slot to slot when both are
plain CPU memory), host victims are dropped. Dropping is always safe: an entry is in memory
only while it is on disk or still held by the write-behind queue. A batch larger than a
tier overflows to the next.

`prefetch` loads entries on a background thread into the device tier; a later read of them
waits for that load rather than reading disk again. On CUDA, host->device copies run from
pinned memory on a side stream and the consumer stream waits on it.

Every method but `prefetch`, `wait_inflight` and `close` runs with the store lock held.
Shape letters: M entries, H KV heads, T block_len, D head_dim.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from .errors import CorruptBlockError, InvalidArgumentError, StoreError, StreamDeletedError
from .eviction import make_policy
from .layout import StoreLayout
from .protocols import CacheTier, DiskLog
from .rows import RowTable
from .stats import StoreStats
from .tiers import DeviceTier, HostTier, Key
from .write_behind import WriteBehind

__all__ = ["ReadCascade", "heads_selection"]


def heads_selection(sel: torch.Tensor, n_kv_heads: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """get_heads' plan for sel (B, H, k) int64 block ids (-1: none): sel as numpy, its distinct ids
    (M,) sorted, and per slot of sel flattened the entry of those ids (pos) and the head it takes.
    InvalidArgumentError for a sel of another shape or dtype."""
    H = n_kv_heads
    if not isinstance(sel, torch.Tensor) or sel.dtype != torch.int64 or sel.dim() != 3 or sel.shape[1] != H:
        raise InvalidArgumentError(f"get_heads: sel must be a (B, n_kv_heads={H}, k) int64 tensor, got "
                                   f"{tuple(getattr(sel, 'shape', ()))} {getattr(sel, 'dtype', type(sel).__name__)}")
    s = sel.detach().cpu().numpy()
    if s.size and s.min() < -1:  # (only -1 means "none": another negative id is a caller's bug)
        raise InvalidArgumentError(f"get_heads: sel holds block id {int(s.min())}; ids are >= 0, and -1 marks "
                                   f"an empty slot")
    valid = s >= 0
    uniq = np.sort(s[valid])  # np.unique, without its overhead (a few us here, not 30)
    uniq = uniq[np.concatenate(([True], uniq[1:] != uniq[:-1]))] if uniq.size else uniq
    if not uniq.size:
        return s, uniq, uniq, uniq
    pos = np.searchsorted(uniq, np.where(valid, s, uniq[0])).reshape(-1)  # entry of uniq per slot
    heads = np.arange(s.size) // s.shape[2] % H  # the head of each slot (B, H, k) flattened
    return s, uniq, pos, heads


class ReadCascade:
    """The device and host tiers above the write-behind queue and the disk log."""

    def __init__(self, layout: StoreLayout, device: torch.device, *, device_budget_bytes: int,
                 host_budget_bytes: int, eviction: str, lock: threading.RLock, rows: RowTable,
                 writes: WriteBehind, disk: DiskLog, stats: StoreStats,
                 generation: Callable[[], int] = lambda: -1) -> None:
        self.layout = layout
        self.device = device
        self.device_tier = DeviceTier(layout, device_budget_bytes, device=device, policy=make_policy(eviction))
        self.host_tier = HostTier(layout, host_budget_bytes, pin_memory=device.type == "cuda",
                                  policy=make_policy(eviction))
        self.memory: list[CacheTier] = [self.device_tier, self.host_tier]
        self._lock = lock
        self._rows = rows
        self._writes = writes
        self._disk = disk
        self._stats = stats
        self._generation = generation  # the store's committed generation (for error messages)
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="folio-store-prefetch")
        self._inflight: dict[Key, Future] = {}
        self.closed = False

    @property
    def room(self) -> int:
        """Entries the memory tiers hold at most, together."""
        return self.device_tier.max_entries + self.host_tier.max_entries

    # -- reads ------------------------------------------------------------------------------
    def fetch(self, rows: np.ndarray, layer: int, promote: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V (M, H, T, D) on the device from the fastest holders; promoted unless promote=False."""
        m = rows.shape[0]
        keys = [(int(r), layer) for r in rows]
        dev_pos, host_pos, miss_pos = [], [], []
        for i, key in enumerate(keys):
            if self.device_tier.contains(key):
                dev_pos.append(i)
            elif self.host_tier.contains(key):
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
            sources.append((dev_pos, self.device_tier.get_stacked([keys[i] for i in dev_pos])))
        if host_pos:
            sources.append((host_pos, self.host_tier.get_stacked([keys[i] for i in host_pos])))
            st.moved["host_to_device"] += len(host_pos) * eb
        if miss_pos:
            sources.append((miss_pos, self.load(rows[miss_pos], layer)))
            st.moved["disk_to_device"] += len(miss_pos) * eb
        if len(sources) == 1:  # the common all-from-one-holder case: its tensors are the answer, no extra copy
            out_k, out_v = (self.to_device(t) for t in sources[0][1])
        else:
            out_k = torch.empty((m, *self.layout.kv_shape), dtype=self.layout.torch_dtype, device=self.device)
            out_v = torch.empty_like(out_k)  # (M, H, T, D)
            for pos, (k, v) in sources:
                idx = torch.tensor(pos, dtype=torch.long, device=self.device)
                out_k.index_copy_(0, idx, self.to_device(k))
                out_v.index_copy_(0, idx, self.to_device(v))
        room = self.room
        promote = sorted(host_pos + miss_pos) if promote else []
        promote = promote[-room:] if room else []  # entries beyond every budget would be dropped anyway
        if promote:
            pos = torch.tensor(promote, dtype=torch.long, device=self.device)
            self.admit(0, [keys[i] for i in promote], out_k.index_select(0, pos), out_v.index_select(0, pos),
                       source="get")
        return out_k, out_v

    def gather_heads(self, keys: list[Key], pos: np.ndarray, heads: np.ndarray
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The device tier's one-gather read of single heads (see CacheTier.gather_heads); None
        unless it holds every key."""
        got = self.device_tier.gather_heads(keys, pos, heads)
        if got is not None:
            self._stats.hits["device"] += len(keys)
        return got

    def heads_of(self, k: torch.Tensor, v: torch.Tensor, pos: np.ndarray, heads: np.ndarray
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Head heads[i] of entry pos[i] of k, v (M, H, T, D) -> K, V (n, T, D)."""
        H, T, D = self.layout.kv_shape
        flat = torch.from_numpy(pos * H + heads).to(k.device)
        return k.reshape(-1, T, D).index_select(0, flat), v.reshape(-1, T, D).index_select(0, flat)

    def shape_heads(self, got: tuple[torch.Tensor, torch.Tensor], sel: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Gathered heads (n, T, D) on the device, zero where sel (B, H, k) is -1, viewed (B, H, k, T, D)."""
        _, T, D = self.layout.kv_shape
        if got[0].device != self.device:  # a host-side device tier (CPU store): copy over
            got = (self.to_device(got[0]), self.to_device(got[1]))
            self.sync_copies()
        valid = sel >= 0
        if not valid.all():  # the gathers are new tensors: their absent slots are zeroed in place
            absent = torch.from_numpy(np.flatnonzero(~valid)).to(got[0].device)
            for t in got:
                t.index_fill_(0, absent, 0.0)
        return tuple(t.view(*sel.shape, T, D) for t in got)

    def absent_heads(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeros K, V (*shape, T, D): a selection with no block."""
        _, T, D = self.layout.kv_shape
        z = torch.zeros((*shape, T, D), dtype=self.layout.torch_dtype, device=self.device)
        return z, z.clone()

    def load(self, rows: np.ndarray, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Entries not in memory: from the write-behind queue or disk, as CPU tensors (M, H, T, D)."""
        m = rows.shape[0]
        kt, kn = self.host_buffer(m)
        vt, vn = self.host_buffer(m)
        writes = self._writes
        on_disk = rows < writes.written_upto
        for i in np.flatnonzero(~on_disk).tolist():  # still queued for the writer
            row = int(rows[i])
            job = writes.job_of(row)
            kn[i] = job.k[row - job.start, layer]
            vn[i] = job.v[row - job.start, layer]
            self._stats.hits["write_queue"] += 1
        if on_disk.any():
            if on_disk.all():
                found = self._disk.read_layer_into(rows, layer, kn, vn)
            else:
                idx = np.flatnonzero(on_disk)
                _, k2 = self.host_buffer(idx.shape[0])
                _, v2 = self.host_buffer(idx.shape[0])
                found = self._disk.read_layer_into(rows[idx], layer, k2, v2)
                kn[idx], vn[idx] = k2, v2
            if not found.all():
                self._missing(rows[on_disk][~found], layer)
            self._stats.hits["disk"] += int(on_disk.sum())
        return kt, vt

    def _missing(self, rows: np.ndarray, layer: int) -> None:
        """Raise for committed rows whose chunks are not there: StoreNotFoundError when the store was
        deleted, StreamDeletedError when the writer has since committed the deletion of their stream
        (a reader opened before it), else CorruptBlockError (the store is damaged)."""
        bad = rows[:8].tolist()
        self._disk.check_present()  # (deleted under this store: say so, not "corrupt")
        names = sorted(set(self._rows.names(rows)))
        try:
            now = self._disk.read_commit()
        except (StoreError, OSError):
            now = None
        if now is not None:
            alive = {s.name for s in now.streams if s.alive}
            gone = [n for n in names if n not in alive]
            if gone:
                raise StreamDeletedError(
                    f"blocks {bad} layer {layer} of stream(s) {gone}: the writer deleted {'them' if len(gone) > 1 else 'it'} "
                    f"after this store was opened at generation {self._generation()} (the store is at "
                    f"generation {now.generation} now); reopen it to read the current state",
                    streams=gone, opened=self._generation(), current=now.generation)
        raise CorruptBlockError(f"blocks {bad} layer {layer} of stream(s) {names}: committed but their chunks are "
                                f"missing from {self._disk.where}: the store is damaged", block_id=bad[0], layer=layer)

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
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

    def sync_copies(self) -> None:
        """Wait for the side-stream copies a read queued (CUDA only)."""
        if self._copy_stream is not None:
            torch.cuda.current_stream(self.device).synchronize()

    def host_buffer(self, m: int) -> tuple[torch.Tensor, np.ndarray]:
        """A (M, H, T, D) CPU tensor (pinned on CUDA machines) and its numpy view in the storage dtype."""
        if self._copy_stream is None:
            # numpy, not torch.empty: numpy madvises large buffers for transparent huge pages, which
            # spares the first-touch page faults of a fresh 4 KiB-paged output
            a = np.empty((m, *self.layout.kv_shape), dtype=self.layout.zarr_dtype)  # (M, H, T, D)
            return self.layout.from_storage(a), a
        t = torch.empty((m, *self.layout.kv_shape), dtype=self.layout.torch_dtype, pin_memory=True)
        return t, self.layout.to_storage(t)

    # -- placement: the exclusive-tiers rule ---------------------------------------------------
    def place_new(self, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """A put's blocks start.. (new ids: in no tier yet), k, v (N, L, H, T, D), into the device tier:
        only the newest entries that fit anywhere are worth placing."""
        keep = self.room
        if not keep:
            return
        n, L, H, T, D = k.shape
        keys = [(int(r), layer) for r in range(start, start + n) for layer in range(L)]
        kk = k.detach().reshape(n * L, H, T, D)  # (N*L, H, T, D), rows ordered (block, layer)
        vv = v.detach().reshape(n * L, H, T, D)
        self.admit(0, keys[-keep:], kk[-keep:], vv[-keep:], source="put")

    def drop(self, keys: list[Key]) -> None:
        """Remove entries from every memory tier (their blocks were deleted)."""
        for tier in self.memory:
            tier.delete_many(keys)

    def admit(self, level: int, keys: list[Key], k: torch.Tensor, v: torch.Tensor, *, source: str) -> None:
        """Place entries in memory tier `level` (0 device, 1 host), demoting the policy's victims a level down.
        Entries that fit nowhere are dropped: they are on disk or in the write-behind queue."""
        if level >= len(self.memory) or not keys:
            return
        if source != "put":  # the memory tiers are exclusive (a put's ids are new: in no tier yet)
            for tier in self.memory:
                for key in keys:
                    tier.delete(key)
        tier = self.memory[level]
        over = max(0, len(keys) - tier.max_entries)
        older = (keys[:over], k[:over], v[:over])
        keys, k, v = keys[over:], k[over:], v[over:]
        self._make_room(level, len(keys) - tier.free_entries)
        if keys:
            tier.put_many(keys, k, v)
        if over:
            self.admit(level + 1, *older, source=source)

    def _make_room(self, level: int, need: int) -> None:
        """Free `need` slots of memory tier `level`: the policy's victims move a level down (or are dropped
        past the last: they are on disk or in the write-behind queue)."""
        if need <= 0:
            return
        tier = self.memory[level]
        below = self.memory[level + 1] if level + 1 < len(self.memory) else None
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
            self.admit(level + 1, vkeys, vk, vv, source="demote")
        if level == 0:
            self._stats.moved["device_to_host"] += len(keep) * self.layout.block_bytes()

    # -- prefetch ----------------------------------------------------------------------------
    def prefetch(self, rows: np.ndarray, layers: Sequence[int]) -> None:
        """(Lock held.) Start loading those entries into the device tier in the background."""
        for lay in layers:
            todo = [int(r) for r in rows if (int(r), lay) not in self._inflight
                    and not self.device_tier.contains((int(r), lay)) and not self.host_tier.contains((int(r), lay))]
            if not todo:
                continue
            fut: Future = Future()
            for r in todo:
                self._inflight[(r, lay)] = fut
            self._prefetcher.submit(self._prefetch_run, np.array(todo, dtype=np.int64), lay, fut)

    def _prefetch_run(self, rows: np.ndarray, layer: int, fut: Future) -> None:
        alive = self._rows  # (its arrays grow: read them under the lock each time)
        try:
            with self._lock:
                if self.closed:
                    return
                live = alive.alive[rows] & (rows < self._writes.written_upto)
                queued = rows[~live & alive.alive[rows]]
                disk_rows = rows[live]
                qk = self.load(queued, layer) if queued.size else None  # queue copies need the lock
            if disk_rows.size:  # the slow part, outside the lock (written rows never change)
                kt, kn = self.host_buffer(disk_rows.shape[0])
                vt, vn = self.host_buffer(disk_rows.shape[0])
                found = self._disk.read_layer_into(disk_rows, layer, kn, vn)
            with self._lock:
                if self.closed:
                    return
                batches = []
                if qk is not None:
                    batches.append((queued, qk[0], qk[1]))
                if disk_rows.size:
                    batches.append((disk_rows[found], kt[torch.from_numpy(found)], vt[torch.from_numpy(found)]))
                    self._stats.hits["disk"] += int(found.sum())
                    self._stats.moved["disk_to_device"] += int(found.sum()) * self.layout.block_bytes()
                for rs, k, v in batches:
                    keep = alive.alive[rs]  # a delete may have raced the read
                    keys = [(int(r), layer) for r in rs[keep]]
                    if keys:
                        sel = torch.from_numpy(keep)
                        self.admit(0, keys, self.to_device(k[sel]), self.to_device(v[sel]), source="prefetch")
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

    def wait_inflight(self, keys: list[Key]) -> None:
        """Wait for the prefetches loading any of those entries. Lock not held."""
        if self._lock._is_owned():  # the prefetch thread needs the lock to finish: waiting here would deadlock
            raise RuntimeError("TieredStore: waiting for a prefetch while holding the store lock")
        with self._lock:
            futs = {id(f): f for key in keys if (f := self._inflight.get(key)) is not None}
        for f in futs.values():
            try:
                f.result()
            except StoreError:
                pass  # the get below reads the entry itself and raises a precise error if it must

    # -- lifecycle ---------------------------------------------------------------------------
    def stop_prefetch(self) -> None:
        """Wait for running prefetches and stop the thread. Lock not held."""
        self._prefetcher.shutdown(wait=True)

    def close(self) -> None:
        """(Lock held.) Release the memory tiers."""
        self.closed = True
        for tier in self.memory:
            tier.close()
