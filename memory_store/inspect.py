"""`folio store inspect PATH`: a human report of a store (layout, streams, size on disk, stats).

Opens the store read-only (so it is safe beside a running writer), reads the commit
record, and reports: the layout and format, the committed generation and block
count, blocks per live stream, bytes on disk, the state of the saved index, the
statistics the writer recorded at its last flush, and the statistics of a short
probe read made by this inspection (latency of reading a few committed blocks).
"""

from __future__ import annotations

import json
import os

import numpy as np
from zarr.abc.store import Store

from .store import StoreConfig, TieredStore

__all__ = ["inspect_store"]


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def inspect_store(where: str | os.PathLike | Store, *, probe_blocks: int = 16) -> str:
    """The report for `folio store inspect PATH` as one string. Raises the store's typed errors
    (StoreNotFoundError, FormatVersionError, ...) when `where` is not a readable Folio store."""
    cfg = StoreConfig(device="cpu", device_budget_bytes=0, host_budget_bytes=0)
    with TieredStore.open(where, "r", config=cfg) as s:
        lay = s.layout
        record = s.disk.read_commit()
        lines = [f"Folio store {s.disk.where}",
                 f"  layout      {lay.describe()}",
                 f"  entry       {_human(lay.block_bytes())} per (block, layer) K+V; "
                 f"{_human(lay.block_bytes() * lay.n_layers)} per block",
                 f"  generation  {record.generation} (commits so far)",
                 f"  blocks      {len(s)} live of {record.n_rows} rows written",
                 f"  size        {_human(s.disk.size_bytes())} on disk",
                 f"  index       {s.index_source} ({len(s.index)} landmark keys, backend {s.index.backend})",
                 "  streams"]
        names = s.streams()
        if not names:
            lines.append("    (none)")
        for name in names:
            meta = s.get_stream_meta(name)
            extra = f"  meta {json.dumps(meta)[:60]}" if meta else ""
            lines.append(f"    {name:<24} {len(s.stream_blocks(name)):>8} blocks{extra}")
        if record.writer_stats:
            lines.append("  writer stats at last flush")
            for key, val in record.writer_stats.items():
                lines.append(f"    {key:<20} {json.dumps(val)}")
        if len(s):  # a short probe read, so latency figures mean something for this store here
            rng = np.random.default_rng(0)
            live = np.concatenate([s.stream_blocks(n) for n in names])
            ids = rng.choice(live, size=min(probe_blocks, live.shape[0]), replace=False)
            for layer in range(min(lay.n_layers, 4)):
                s.get_layer(ids, layer)
            st = s.stats()
            lat = st["get_latency_ms"]
            lines.append(f"  probe       {len(ids)} random blocks x {min(lay.n_layers, 4)} layers from disk: "
                         f"get p50 {lat['p50']:.2f} ms, p90 {lat['p90']:.2f} ms, p99 {lat['p99']:.2f} ms")
            lines.append(f"  stats       hits {json.dumps(st['hits'])} misses {json.dumps(st['misses'])}")
            lines.append(f"              bytes moved {json.dumps(st['bytes_moved'])}")
        return "\n".join(lines)
