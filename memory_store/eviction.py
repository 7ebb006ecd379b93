"""Eviction policies: which cached entry a full tier gives up next.

A policy only tracks keys (any hashable: the store uses (block_id, layer)); it never
sees tensors, so it is tested on its own. A tier calls `insert` when it gains a key,
`touch` on every hit, `remove` when the key leaves for another reason, and asks
`victim()` for the key to demote when it needs room. `victim` takes a set of keys it
must not return (entries being read right now), so a batch never evicts itself.

`LRUPolicy` (least recently used) is the default; a new policy subclasses
`EvictionPolicy` and is passed to the tiers through StoreConfig.eviction.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Container, Hashable, Iterator

__all__ = ["EvictionPolicy", "LRUPolicy", "make_policy", "POLICIES"]


class EvictionPolicy(ABC):
    """Tracks a set of keys and names the next one to evict."""

    @abstractmethod
    def insert(self, key: Hashable) -> None:
        """A key entered the tier (re-inserting a known key counts as a use)."""

    @abstractmethod
    def touch(self, key: Hashable) -> None:
        """A key was used (a hit). Unknown keys are ignored."""

    @abstractmethod
    def remove(self, key: Hashable) -> None:
        """A key left the tier. Unknown keys are ignored."""

    @abstractmethod
    def victim(self, exclude: Container[Hashable] = ()) -> Hashable | None:
        """The key to evict next, never one in `exclude`; None when every key is excluded (or none is held)."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __contains__(self, key: object) -> bool: ...

    @abstractmethod
    def __iter__(self) -> Iterator[Hashable]:
        """Keys from the next victim to the last, lazily: the caller takes what it needs and
        changes the policy only after it stops iterating."""


class LRUPolicy(EvictionPolicy):
    """Least recently used: the key touched longest ago goes first."""

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()  # oldest first

    def insert(self, key: Hashable) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def touch(self, key: Hashable) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: Hashable) -> None:
        self._order.pop(key, None)

    def victim(self, exclude: Container[Hashable] = ()) -> Hashable | None:
        for key in self._order:
            if key not in exclude:
                return key
        return None

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._order

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._order)


POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LRUPolicy}


def make_policy(name: str) -> EvictionPolicy:
    """A fresh policy by name (one of POLICIES); ValueError otherwise."""
    if name not in POLICIES:
        raise ValueError(f"eviction policy {name!r}: expected one of {sorted(POLICIES)}")
    return POLICIES[name]()
