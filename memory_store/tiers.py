"""The tier interface and the two memory tiers (device, host).

A tier maps a key (block_id, layer) to an entry: that block's K and V for that
layer, each (n_kv_heads, block_len, head_dim) in the layout's dtype. The interface
is small on purpose (LMCache's grew to eleven abstract methods by leaking backend
details): four abstract methods (`get`, `put`, `delete`, `contains`), batched forms
with default loops that a tier overrides when it can do better, a miss returned as
None, and capability properties (`persistent`, `supports_writes`, `max_entries`).

Memory tiers keep entries in a *slab*: one preallocated pair of tensors
(slots, n_kv_heads, block_len, head_dim) grown by doubling up to the budget. A
batched read is then one `index_select` on the slab (as fast as a read from one big
tensor), a pinned slab is one pinned allocation (many small pinned allocations are
slow), and the allocated bytes can never exceed the budget:
`slots * block_bytes <= budget_bytes` always, so the budget holds for memory really
allocated, not just for entries counted. A memory tier never evicts on its own:
`put` into a full tier raises BudgetError; the TieredStore asks `pop_victims` for
room (the eviction policy picks) and demotes what it gets.

`DeviceTier` lives on CUDA when present (ordinary memory otherwise); `HostTier`
lives in CPU memory, pinned when CUDA is present so host->device copies can be
asynchronous on a side stream.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import torch

from .errors import BudgetError, ClosedError, ShapeError
from .eviction import EvictionPolicy, LRUPolicy
from .layout import StoreLayout

__all__ = ["Key", "Entry", "Tier", "MemoryTier", "DeviceTier", "HostTier", "default_device"]

Key = tuple[int, int]  # (block_id, layer)
Entry = tuple[torch.Tensor, torch.Tensor]  # K, V: (H, T, D) each


def default_device() -> torch.device:
    """cuda when a GPU is present, else cpu."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class Tier(ABC):
    """A keyed cache level. A miss is None, never an exception."""

    name: str = "tier"
    layout: StoreLayout

    # -- capabilities -------------------------------------------------------------
    @property
    def persistent(self) -> bool:
        """True when entries survive the process."""
        return False

    @property
    def supports_writes(self) -> bool:
        """False for a tier opened read-only."""
        return True

    @property
    def max_entries(self) -> int | None:
        """Most entries the tier can hold (None: unbounded)."""
        return None

    @property
    def device(self) -> torch.device:
        """Where `get` returns its tensors."""
        return torch.device("cpu")

    # -- the four abstract methods ------------------------------------------------
    @abstractmethod
    def get(self, key: Key) -> Entry | None:
        """(K, V) of the entry, each (H, T, D), as tensors the caller owns; None on a miss."""

    @abstractmethod
    def put(self, key: Key, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store (or overwrite) one entry. k, v: (H, T, D) in the layout dtype."""

    @abstractmethod
    def delete(self, key: Key) -> bool:
        """Remove an entry; True when it was there."""

    @abstractmethod
    def contains(self, key: Key) -> bool:
        """True when the tier holds the entry."""

    # -- batched forms: loops by default ------------------------------------------
    def get_many(self, keys: Sequence[Key]) -> list[Entry | None]:
        """One get per key."""
        return [self.get(key) for key in keys]

    def get_stacked(self, keys: Sequence[Key]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """K, V of every key stacked, (M, H, T, D) each; None when any key misses."""
        entries = self.get_many(keys)
        if any(e is None for e in entries):
            return None
        if not entries:
            empty = torch.empty((0, *self.layout.kv_shape), dtype=self.layout.torch_dtype, device=self.device)
            return empty, empty.clone()
        return torch.stack([e[0] for e in entries]), torch.stack([e[1] for e in entries])  # (M, H, T, D)

    def put_many(self, keys: Sequence[Key], k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: (M, H, T, D) for M keys."""
        for i, key in enumerate(keys):
            self.put(key, k[i], v[i])

    def delete_many(self, keys: Sequence[Key]) -> int:
        """Number of keys that were there."""
        return sum(self.delete(key) for key in keys)

    def contains_many(self, keys: Sequence[Key]) -> list[bool]:
        return [self.contains(key) for key in keys]

    def flush(self) -> None:
        """Make everything put so far durable (no-op for volatile tiers)."""

    def close(self) -> None:
        """Release resources; later calls raise ClosedError."""

    # -- shared validation ----------------------------------------------------------
    def _check_entry(self, k: torch.Tensor, v: torch.Tensor, batched: bool) -> None:
        want = self.layout.kv_shape
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise ShapeError(f"{self.name} tier: {name} must be a torch.Tensor, got {type(t).__name__}")
            shape = tuple(t.shape[1:]) if batched else tuple(t.shape)
            if shape != want or (batched and t.dim() != 4):
                exp = f"(M, {', '.join(map(str, want))})" if batched else str(want)
                raise ShapeError(f"{self.name} tier: {name} has shape {tuple(t.shape)}, expected {exp}")
            if t.dtype != self.layout.torch_dtype:
                raise ShapeError(f"{self.name} tier: {name} has dtype {t.dtype}, expected {self.layout.torch_dtype}")


class MemoryTier(Tier):
    """Entries in one growable slab of slots on `device`; capacity = budget_bytes // block_bytes."""

    _GROW_MIN = 16  # first slab allocation, in slots

    def __init__(self, layout: StoreLayout, budget_bytes: int, *, device: torch.device | str,
                 pin_memory: bool = False, policy: EvictionPolicy | None = None, name: str = "memory") -> None:
        if not isinstance(budget_bytes, int) or budget_bytes < 0:
            raise ValueError(f"{name} tier budget_bytes={budget_bytes!r}: expected an int >= 0")
        self.name = name
        self.layout = layout
        self.budget_bytes = budget_bytes
        self._device = torch.device(device)
        self._pin = bool(pin_memory) and self._device.type == "cpu"
        self.policy = policy if policy is not None else LRUPolicy()
        self._max = budget_bytes // layout.block_bytes()
        self._slot: dict[Key, int] = {}
        self._free: list[int] = []  # slots below _hw not in use
        self._hw = 0  # slots ever handed out
        self._k = self._alloc(0)  # (S, H, T, D)
        self._v = self._alloc(0)  # (S, H, T, D)
        self._closed = False
        self._views()

    # -- capabilities -------------------------------------------------------------
    @property
    def max_entries(self) -> int:
        return self._max

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def pinned(self) -> bool:
        return self._pin

    def __len__(self) -> int:
        return len(self._slot)

    @property
    def nbytes(self) -> int:
        """Bytes of the entries held."""
        return len(self._slot) * self.layout.block_bytes()

    @property
    def allocated_bytes(self) -> int:
        """Bytes of the slab really allocated (always <= budget_bytes)."""
        return self._k.shape[0] * self.layout.block_bytes()

    @property
    def free_entries(self) -> int:
        return self._max - len(self._slot)

    def keys(self) -> list[Key]:
        return list(self._slot)

    # -- slab management ----------------------------------------------------------
    def _alloc(self, n: int) -> torch.Tensor:
        return torch.empty((n, *self.layout.kv_shape), dtype=self.layout.torch_dtype, device=self._device,
                           pin_memory=self._pin)  # (S, H, T, D)

    def _views(self) -> None:
        # CPU slabs are gathered and scattered through numpy: single-threaded copies run at memory speed and,
        # unlike torch's OpenMP kernels, do not stall when another thread (the disk writer) holds a core.
        self._np = self._device.type == "cpu" and not self._pin
        if self._np:
            self._kn, self._vn = self.layout.to_storage(self._k), self.layout.to_storage(self._v)

    def _take_slots(self, n: int) -> list[int]:
        if n > self.free_entries:
            raise BudgetError(f"{self.name} tier: {n} new entries do not fit: {len(self._slot)} of {self._max} slots "
                              f"used (budget {self.budget_bytes} bytes, {self.layout.block_bytes()} bytes per entry)")
        slots = [self._free.pop() for _ in range(min(n, len(self._free)))]
        rest = n - len(slots)
        if rest:
            need = self._hw + rest
            cap = self._k.shape[0]
            if need > cap:  # grow by doubling, never past the budget
                new_cap = min(self._max, max(cap * 2, need, self._GROW_MIN))
                k, v = self._alloc(new_cap), self._alloc(new_cap)
                k[:cap].copy_(self._k)
                v[:cap].copy_(self._v)
                self._k, self._v = k, v
                self._views()
            slots.extend(range(self._hw, need))
            self._hw = need
        return slots

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"{self.name} tier is closed")

    # -- the interface --------------------------------------------------------------
    def get(self, key: Key) -> Entry | None:
        self._check_open()
        s = self._slot.get(key)
        if s is None:
            return None
        self.policy.touch(key)
        return self._k[s].clone(), self._v[s].clone()

    def put(self, key: Key, k: torch.Tensor, v: torch.Tensor) -> None:
        self._check_entry(k, v, batched=False)
        self.put_many([key], k.unsqueeze(0), v.unsqueeze(0))

    def delete(self, key: Key) -> bool:
        self._check_open()
        s = self._slot.pop(key, None)
        if s is None:
            return False
        self._free.append(s)
        self.policy.remove(key)
        return True

    def contains(self, key: Key) -> bool:
        self._check_open()
        return key in self._slot

    def _touched_slots(self, keys: Sequence[Key]) -> list[int] | None:
        """The slots of every key, each touched in the eviction policy; None (nothing
        touched) when any key misses."""
        self._check_open()
        slots = [self._slot.get(key) for key in keys]
        if any(s is None for s in slots):
            return None
        for key in keys:
            self.policy.touch(key)
        return slots

    def gather_heads(self, keys: Sequence[Key], pos: np.ndarray, heads: np.ndarray
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """One head of several entries in one gather: row i of the result is head heads[i] of
        entry keys[pos[i]]; K, V (n, T, D) each. None (nothing touched) when any key misses."""
        slots = self._touched_slots(keys)
        if slots is None:
            return None
        H, T, D = self.layout.kv_shape
        flat = np.asarray(slots, dtype=np.int64)[pos] * H + heads  # (n,) rows of the (S*H, T, D) slab
        if self._np:
            lay = self.layout
            return (lay.from_storage(np.take(self._kn.reshape(-1, T, D), flat, axis=0)),
                    lay.from_storage(np.take(self._vn.reshape(-1, T, D), flat, axis=0)))
        idx = torch.from_numpy(flat).to(self._device)
        return self._k.view(-1, T, D).index_select(0, idx), self._v.view(-1, T, D).index_select(0, idx)

    def get_stacked(self, keys: Sequence[Key]) -> tuple[torch.Tensor, torch.Tensor] | None:
        slots = self._touched_slots(keys)
        if slots is None:
            return None
        if self._np:
            lay = self.layout
            return (lay.from_storage(np.take(self._kn, slots, axis=0)),  # (M, H, T, D)
                    lay.from_storage(np.take(self._vn, slots, axis=0)))
        idx = torch.tensor(slots, dtype=torch.long, device=self._device)
        if self._pin:  # keep the result pinned so the host->device copy can be asynchronous
            shape = (len(slots), *self.layout.kv_shape)
            k = torch.empty(shape, dtype=self._k.dtype, pin_memory=True)
            v = torch.empty(shape, dtype=self._v.dtype, pin_memory=True)
            return torch.index_select(self._k, 0, idx, out=k), torch.index_select(self._v, 0, idx, out=v)
        return self._k.index_select(0, idx), self._v.index_select(0, idx)  # (M, H, T, D) each

    def get_many(self, keys: Sequence[Key]) -> list[Entry | None]:
        return [self.get(key) for key in keys]

    def put_many(self, keys: Sequence[Key], k: torch.Tensor, v: torch.Tensor) -> None:
        """Store M entries at once; BudgetError (and nothing stored) when the new ones do not fit."""
        self._check_open()
        self._check_entry(k, v, batched=True)
        if k.shape[0] != len(keys) or v.shape[0] != len(keys):
            raise ShapeError(f"{self.name} tier: {len(keys)} keys but k has {k.shape[0]} and v {v.shape[0]} entries")
        if len(set(keys)) != len(keys):
            raise ValueError(f"{self.name} tier: put_many keys must be unique")
        new = [key for key in keys if key not in self._slot]
        fresh = iter(self._take_slots(len(new)))
        slots = []
        for key in keys:
            s = self._slot.get(key)
            if s is None:
                s = next(fresh)
                self._slot[key] = s
            slots.append(s)
            self.policy.insert(key)
        if self._np:
            lay = self.layout
            self._kn[slots] = lay.to_storage(k.detach().to("cpu").contiguous())
            self._vn[slots] = lay.to_storage(v.detach().to("cpu").contiguous())
            return
        idx = torch.tensor(slots, dtype=torch.long, device=self._device)
        self._k.index_copy_(0, idx, k.to(self._device, non_blocking=True))
        self._v.index_copy_(0, idx, v.to(self._device, non_blocking=True))

    def victim_keys(self, n: int, exclude: frozenset[Key] | set[Key] = frozenset()) -> list[Key]:
        """Up to n keys the policy would evict next (never one in `exclude`), oldest first; nothing is removed."""
        keys: list[Key] = []
        chosen: set[Key] = set(exclude)
        for key in self.policy:
            if len(keys) >= n:
                break
            if key not in chosen:
                keys.append(key)
                chosen.add(key)
        return keys

    def evict(self, n: int, exclude: frozenset[Key] | set[Key] = frozenset()) -> list[Key]:
        """Remove up to n entries chosen by the policy (never one in `exclude`) without copying them out."""
        self._check_open()
        keys = self.victim_keys(n, exclude)
        self.delete_many(keys)
        return keys

    def can_copy_from(self, src: MemoryTier) -> bool:
        """True when put_from(src, ...) copies slab to slab (both plain CPU memory)."""
        return self._np and src._np and self.layout == src.layout

    def put_from(self, src: MemoryTier, keys: Sequence[Key]) -> None:
        """Copy those entries of `src` (held there, new here, and fitting) slot to slot: no gathered
        temporary (whose fresh pages fault in on every demotion). Requires can_copy_from(src)."""
        self._check_open()
        if not self.can_copy_from(src):
            raise ValueError(f"{self.name} tier: put_from({src.name}) needs two plain CPU tiers of one layout")
        if any(key in self._slot for key in keys):
            raise ValueError(f"{self.name} tier: put_from keys must be new to this tier")
        for key, s in zip(keys, self._take_slots(len(keys))):
            ss = src._slot[key]
            self._kn[s] = src._kn[ss]
            self._vn[s] = src._vn[ss]
            self._slot[key] = s
            self.policy.insert(key)

    def pop_victims(self, n: int, exclude: frozenset[Key] | set[Key] = frozenset()) -> tuple[list[Key], torch.Tensor, torch.Tensor]:
        """Remove up to n entries chosen by the policy (never one in `exclude`) and return them
        (keys, K (n', H, T, D), V) as copies, oldest first, so the caller can demote them."""
        self._check_open()
        keys = self.victim_keys(n, exclude)
        stacked = self.get_stacked(keys)
        assert stacked is not None  # every policy key is held
        for key in keys:
            self.delete(key)
        return keys, stacked[0], stacked[1]

    def clear(self) -> None:
        for key in list(self._slot):
            self.delete(key)

    def close(self) -> None:
        self._slot.clear()
        self._free.clear()
        self._hw = 0
        self._k = self._alloc(0)
        self._v = self._alloc(0)
        self._views()
        self._closed = True


class DeviceTier(MemoryTier):
    """The fastest tier: CUDA memory when a GPU is present, ordinary memory otherwise."""

    def __init__(self, layout: StoreLayout, budget_bytes: int, *, device: torch.device | str | None = None,
                 policy: EvictionPolicy | None = None) -> None:
        super().__init__(layout, budget_bytes, device=device if device is not None else default_device(),
                         pin_memory=False, policy=policy, name="device")


class HostTier(MemoryTier):
    """CPU memory; pinned when CUDA is present (asynchronous host->device copies)."""

    def __init__(self, layout: StoreLayout, budget_bytes: int, *, pin_memory: bool | None = None,
                 policy: EvictionPolicy | None = None) -> None:
        pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        super().__init__(layout, budget_bytes, device="cpu", pin_memory=pin, policy=policy, name="host")
