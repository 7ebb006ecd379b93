"""StoreStats: the counters a TieredStore's parts update (under the store lock) and `stats()` reports."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

__all__ = ["StoreStats"]


@dataclass(slots=True)
class StoreStats:
    hits: dict[str, int] = field(default_factory=lambda: {"device": 0, "host": 0, "write_queue": 0, "disk": 0})
    misses: dict[str, int] = field(default_factory=lambda: {"device": 0, "host": 0})
    moved: dict[str, int] = field(default_factory=lambda: {"host_to_device": 0, "disk_to_device": 0,
                                                           "device_to_host": 0, "to_disk": 0,
                                                           "never_written": 0})
    prefetched: int = 0
    latencies: deque = field(default_factory=deque)

    def counters(self) -> dict:
        """Hits, misses, bytes moved and prefetched entries (copies; no latency percentiles)."""
        return {"hits": dict(self.hits), "misses": dict(self.misses), "bytes_moved": dict(self.moved),
                "prefetched_entries": self.prefetched}
