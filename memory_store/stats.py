"""StoreStats: the counters a TieredStore's parts update (under the store lock) and `stats()` reports."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

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

    def report(self, tiers: Sequence[Any], **extra: Any) -> dict:
        """`counters()`, the get latency percentiles (ms), each memory tier's fill, then `extra`."""
        out = self.counters()
        lat = np.array(self.latencies, dtype=np.float64) * 1e3
        out["get_latency_ms"] = {f"p{q}": (float(np.percentile(lat, q)) if lat.size else None) for q in (50, 90, 99)}
        out["get_latency_ms"]["count"] = int(lat.size)
        out["tiers"] = {t.name: {"entries": len(t), "bytes": t.nbytes, "allocated_bytes": t.allocated_bytes,
                                 "budget_bytes": t.budget_bytes, "device": str(t.device)} for t in tiers}
        out.update(extra)
        return out
