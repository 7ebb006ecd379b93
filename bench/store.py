"""Benchmark of the tiered store against baselines measured in the same run.

    flock /tmp/folio-bench.lock python -m bench.store [--quick] [--out PATH]
    python -m bench.store --s3 [--quick]     (object storage: a local moto S3 server)

Figures (ratio = store throughput / baseline throughput, higher is better):
- disk_read_vs_memmap: `TieredStore.get_layer` of 256 random blocks with empty memory tiers
  (so every entry comes from the zarr tier: chunk reads, crc32c checks) against a fancy-indexed
  read of the same blocks from a numpy memmap of the same data. Both warm in the page cache.
  Goal >= 0.5.
- host_read_vs_index_select: `HostTier.get_stacked` of 256 random entries against
  `torch.index_select` of the same rows from one preallocated tensor. Goal >= 0.8.
- write_vs_dd: sustained put_blocks + flush (durable: syncfs/fsync) throughput against
  `dd if=/dev/zero bs=4M conv=fdatasync` to the same file system; three of each, alternated,
  ratio of the medians. Goal >= 0.5.
- index_recall_at_k, index_speedup_vs_exact, ...: from bench/store_index.py (`run(quick)`) when present.

--s3 (needs the dev extra: moto[server], s3fs) measures only the object-store figures, each beside
the same figure on a local store in the same run: `s3_read_ms` (get_layer of `batch` random
blocks, empty memory tiers, against a moto server on a loopback port: one GET per chunk) against
`local_read_ms`, and `s3_write_mbps` (put_blocks + flush) against `local_write_mbps`; the S3 store
in the sharded layout (segments, the default) and with one object per chunk (`s3_chunk_objects_*`). moto keeps
objects in memory in this process, so these are protocol and request costs, not a real
network's or bucket's.

Writes runs/bench/store.json (store_s3.json with --s3; --out PATH to choose).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from bench import RUNS
from memory_store import StoreConfig, StoreLayout, TieredStore
from memory_store.tiers import HostTier

RESULTS = str(RUNS / "store.json")
GOALS = {"disk_read_vs_memmap": 0.5, "host_read_vs_index_select": 0.8, "write_vs_dd": 0.5}


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up (page cache, allocator)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def dd_bandwidth(directory: str, mib: int) -> float:
    """Bytes/s of a sequential, fdatasync'ed dd write into `directory`."""
    target = os.path.join(directory, "dd.bin")
    t0 = time.perf_counter()
    out = subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=4M", f"count={mib // 4}", "conv=fdatasync"],
                         capture_output=True, text=True, check=True)
    elapsed = time.perf_counter() - t0
    os.unlink(target)
    m = re.search(r"copied, ([0-9.]+) s", out.stderr)
    secs = float(m.group(1)) if m else elapsed
    return mib * 2**20 / secs


def make_data(layout: StoreLayout, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    L, H, T, D = layout.n_layers, layout.n_kv_heads, layout.block_len, layout.head_dim
    k = torch.randn((n, L, H, T, D), generator=g)  # (N, L, H, T, D)
    v = torch.randn((n, L, H, T, D), generator=g)
    lm = torch.randn((n, L, H, D), generator=g)  # (N, L, H, D)
    return k, v, lm


def bench_disk_read(layout: StoreLayout, k, v, lm, work: str, batch: int, repeats: int) -> dict[str, float]:
    path = os.path.join(work, "read_store")
    cfg = StoreConfig(device="cpu", device_budget_bytes=0, host_budget_bytes=0, sync_mode="none")
    with TieredStore.open(path, "w", layout=layout, config=cfg) as s:
        for i in range(0, k.shape[0], 64):
            s.put_blocks("doc", k[i:i + 64], v[i:i + 64], lm[i:i + 64])
    np.save(os.path.join(work, "k.npy"), k.numpy())
    np.save(os.path.join(work, "v.npy"), v.numpy())
    os.sync()  # no background writeback of the setup competing with the timed reads
    mk = np.load(os.path.join(work, "k.npy"), mmap_mode="r")
    mv = np.load(os.path.join(work, "v.npy"), mmap_mode="r")
    rng = np.random.default_rng(1)
    ids = np.sort(rng.choice(k.shape[0], size=batch, replace=False))
    layer = layout.n_layers - 1
    nbytes = 2 * batch * layout.kv_shape[0] * layout.kv_shape[1] * layout.kv_shape[2] * layout.itemsize

    def memmap_read():
        return torch.from_numpy(mk[ids, layer]), torch.from_numpy(mv[ids, layer])  # (M, H, T, D) copies

    with TieredStore.open(path, "r", config=cfg) as s:
        got = s.get_layer(ids, layer)
        assert torch.equal(got[0], k[ids, layer]) and torch.equal(got[1], v[ids, layer])
        t_store = best_of(lambda: s.get_layer(ids, layer), repeats)
    t_mm = best_of(memmap_read, repeats)
    return {"disk_read_vs_memmap": t_mm / t_store, "disk_read_gbps": nbytes / t_store / 1e9,
            "memmap_read_gbps": nbytes / t_mm / 1e9}


def bench_host_read(layout: StoreLayout, n_entries: int, batch: int, repeats: int) -> dict[str, float]:
    tier = HostTier(layout, n_entries * layout.block_bytes())
    g = torch.Generator().manual_seed(2)
    K = torch.randn((n_entries, *layout.kv_shape), generator=g)  # (E, H, T, D) the one preallocated tensor
    V = torch.randn((n_entries, *layout.kv_shape), generator=g)
    keys = [(i, 0) for i in range(n_entries)]
    tier.put_many(keys, K, V)
    rng = np.random.default_rng(3)
    pick = rng.choice(n_entries, size=batch, replace=False)
    pick_keys = [keys[i] for i in pick]
    idx = torch.from_numpy(pick)
    got = tier.get_stacked(pick_keys)
    assert torch.equal(got[0], K[idx]) and torch.equal(got[1], V[idx])
    t_tier = best_of(lambda: tier.get_stacked(pick_keys), repeats)
    t_sel = best_of(lambda: (K.index_select(0, idx), V.index_select(0, idx)), repeats)
    nbytes = batch * layout.block_bytes()
    return {"host_read_vs_index_select": t_sel / t_tier, "host_read_gbps": nbytes / t_tier / 1e9,
            "index_select_gbps": nbytes / t_sel / 1e9}


def bench_write(layout: StoreLayout, k, v, lm, work: str, rounds: int, trials: int = 3) -> dict[str, float]:
    """Alternates `trials` store runs (fresh store: put_blocks of every block `rounds` times, then a durable
    flush) with `trials` dd runs of the same byte count; the ratio is of the medians. Disk bandwidth
    can swing severalfold between runs seconds apart: one dd against one store run would measure that."""
    cfg = StoreConfig(device="cpu", device_budget_bytes=64 << 20, host_budget_bytes=64 << 20)
    n = k.shape[0]
    nbytes = (k.nbytes + v.nbytes + lm.nbytes) * rounds
    t_store, dd_bw = [], []
    for t in range(trials):
        path = os.path.join(work, f"write_store{t}")
        with TieredStore.open(path, "w", layout=layout, config=cfg) as s:
            s.put_blocks("warm", k[:8], v[:8], lm[:8])
            s.flush()
            t0 = time.perf_counter()
            for r in range(rounds):
                for i in range(0, n, 32):
                    s.put_blocks(f"doc{r}", k[i:i + 32], v[i:i + 32], lm[i:i + 32])
                s.flush()  # durable (syncfs / fsync) before the clock stops
            t_store.append(time.perf_counter() - t0)
            sync_mode = s.disk.sync_mode
        shutil.rmtree(path)
        os.sync()
        dd_bw.append(dd_bandwidth(work, max(64, int(nbytes / 2**20) // 4 * 4)))
    store_bw = nbytes / float(np.median(t_store))
    dd = float(np.median(dd_bw))
    return {"write_vs_dd": store_bw / dd, "write_mbps": store_bw / 1e6, "dd_mbps": dd / 1e6,
            "write_mbps_runs": [round(nbytes / x / 1e6) for x in t_store],
            "dd_mbps_runs": [round(x / 1e6) for x in dd_bw], "write_sync_mode": sync_mode}


def _read_and_write(where: str, layout: StoreLayout, k, v, lm, batch: int, repeats: int,
                    shard_rows: int | None = 256) -> dict[str, float]:
    """Random get_layer of `batch` blocks (ms, median) and put_blocks + flush throughput (MB/s) of one store."""
    cfg = StoreConfig(device="cpu", device_budget_bytes=0, host_budget_bytes=0, save_index="never",
                      index_backend="exact", shard_rows=shard_rows)
    t0 = time.perf_counter()
    with TieredStore.open(where, "w", layout=layout, config=cfg) as s:
        for i in range(0, k.shape[0], 32):
            s.put_blocks("doc", k[i:i + 32], v[i:i + 32], lm[i:i + 32])
        s.flush()  # durable (local: syncfs/fsync; S3: every PUT answered)
        t_write = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    ids = np.sort(rng.choice(k.shape[0], size=batch, replace=False))
    layer = layout.n_layers - 1
    with TieredStore.open(where, "r", config=cfg) as s:
        got = s.get_layer(ids, layer)
        assert torch.equal(got[0], k[ids, layer]) and torch.equal(got[1], v[ids, layer])
        t_read = best_of(lambda: s.get_layer(ids, layer), repeats)
    return {"read_ms": t_read * 1e3, "write_mbps": (k.nbytes + v.nbytes + lm.nbytes) / t_write / 1e6}


def run_s3(quick: bool) -> dict:
    """The object-store figures beside the local ones, measured in the same run (see the module docstring)."""
    layout = StoreLayout(n_layers=2, n_kv_heads=8, block_len=64, head_dim=128, dtype="bfloat16")
    n_blocks, batch, repeats = (128, 32, 3) if quick else (256, 64, 5)
    k, v, lm = (t.to(torch.bfloat16) for t in make_data(layout, n_blocks))
    work = tempfile.mkdtemp(prefix="folio-bench-s3-", dir=os.environ.get("FOLIO_BENCH_DIR", "/tmp"))
    from memory_store.testing.s3_server import moto_server

    with moto_server("folio-bench"):
        local = _read_and_write(os.path.join(work, "local"), layout, k, v, lm, batch, repeats)
        s3 = _read_and_write("s3://folio-bench/store", layout, k, v, lm, batch, repeats)  # segments (default)
        chunks = _read_and_write("s3://folio-bench/chunks", layout, k, v, lm, batch, repeats, shard_rows=None)
    shutil.rmtree(work, ignore_errors=True)
    figures = {"s3_read_ms": s3["read_ms"], "local_read_ms": local["read_ms"],
               "s3_read_vs_local": local["read_ms"] / s3["read_ms"],
               "s3_write_mbps": s3["write_mbps"], "local_write_mbps": local["write_mbps"],
               "s3_write_vs_local": s3["write_mbps"] / local["write_mbps"],
               "s3_chunk_objects_read_ms": chunks["read_ms"], "s3_chunk_objects_write_mbps": chunks["write_mbps"],
               "s3_segments_write_vs_chunk_objects": s3["write_mbps"] / chunks["write_mbps"]}
    meta = {"command": "python -m bench.store --s3" + (" --quick" if quick else ""), "quick": quick,
            "layout": layout.to_dict(), "blocks": n_blocks, "batch": batch, "endpoint": "moto (loopback)",
            "machine": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
            "torch": torch.__version__, "notes": ["S3 (s3_*): the sharded layout as segments (segments.py: one object "
                                                  "per shard a write touches, an index object per shard at a flush); "
                                                  "s3_chunk_objects_*: shard_rows=None, one object per (block, layer) "
                                                  "chunk; the local store is sharded (format 4)"]}
    return {"figures": figures, "goals": {}, "meta": meta}


def run(quick: bool, with_index: bool = True) -> dict:
    layout = StoreLayout(n_layers=2, n_kv_heads=8, block_len=64, head_dim=128, dtype="float32")
    n_blocks = 384 if quick else 1024
    repeats = 5 if quick else 11
    work = tempfile.mkdtemp(prefix="folio-bench-store-", dir=os.environ.get("FOLIO_BENCH_DIR", "/tmp"))
    results: dict = {}
    notes: list[str] = []
    try:
        k, v, lm = make_data(layout, n_blocks)
        results.update(bench_disk_read(layout, k, v, lm, work, batch=256, repeats=repeats))
        results.update(bench_host_read(layout, n_entries=n_blocks, batch=256, repeats=repeats))
        results.update(bench_write(layout, k, v, lm, work, rounds=1 if quick else 2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not with_index:
        notes.append("index figures skipped (--skip-index)")
    else:
        try:
            from bench import store_index
        except ImportError as e:
            notes.append(f"index figures skipped: bench.store_index not importable ({e})")
        else:
            results.update(store_index.run(quick))
    meta = {"command": "python -m bench.store" + (" --quick" if quick else "") + ("" if with_index else " --skip-index"),
            "quick": quick,
            "layout": layout.to_dict(), "blocks": n_blocks, "batch": 256, "machine": platform.platform(),
            "cpus": os.cpu_count(), "python": sys.version.split()[0], "torch": torch.__version__, "notes": notes}
    return {"figures": results, "goals": GOALS, "meta": meta}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller data, fewer repeats (under 60 s)")
    ap.add_argument("--skip-index", action="store_true", help="leave out bench.store_index (the slow part)")
    ap.add_argument("--s3", action="store_true", help="only the object-store figures (local moto S3 server)")
    ap.add_argument("--out", default=None, help="where to write the JSON")
    args = ap.parse_args(argv)
    args.out = args.out or (RESULTS.replace("store.json", "store_s3.json") if args.s3 else RESULTS)
    t0 = time.perf_counter()
    out = run_s3(args.quick) if args.s3 else run(args.quick, with_index=not args.skip_index)
    out["meta"]["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"{'figure':<34} {'value':>12} {'goal':>8}")
    for name, val in out["figures"].items():
        goal = GOALS.get(name)
        shown = f"{val:12.3f}" if isinstance(val, float) else f"{val!s:>12}"
        mark = "" if goal is None else ("  ok" if val >= goal else "  MISSED")
        print(f"{name:<34} {shown} {'' if goal is None else f'>= {goal}':>8}{mark}")
    for note in out["meta"]["notes"]:
        print("note:", note)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.out} ({out['meta']['seconds']} s)")


if __name__ == "__main__":
    main()
