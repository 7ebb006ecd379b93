"""TieredStore: round trips, persistence, tiers and budgets, the derived index, prefetch, other zarr stores."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time

import fsspec
import numpy as np
import pytest
import torch
import zarr
from _store_helpers import LAYOUT, make_blocks

from memory_store import InvalidArgumentError, StoreConfig, StoreLayout, TieredStore, UnknownBlockError
from memory_store.disk import COMMIT_KEY

EB = LAYOUT.block_bytes()


def small_config(**kw) -> StoreConfig:
    base = dict(device_budget_bytes=3 * EB, host_budget_bytes=5 * EB, sync_mode="none")
    base.update(kw)
    return StoreConfig(**base)


def written_store(path, n: int, seed: int, config: StoreConfig | None = None):
    """Put n seeded blocks into a new store at `path` (stream "doc") and close it; returns k, v, lm."""
    k, v, lm = make_blocks(n, seed=seed)
    with TieredStore.open(path, "w", layout=LAYOUT, config=config or small_config()) as s:
        s.put_blocks("doc", k, v, lm)
    return k, v, lm


def check_budgets(store: TieredStore) -> None:
    for tier in store.tiers[:2]:
        assert tier.nbytes <= tier.budget_bytes and tier.allocated_bytes <= tier.budget_bytes, tier.name
    dev = set(store.tiers[0].keys())
    assert not dev & set(store.tiers[1].keys()), "memory tiers must be exclusive"


def test_put_get_every_layer_bit_exact(tmp_path):
    k, v, lm = make_blocks(7, seed=1)
    with TieredStore.open(tmp_path / "s", "a", layout=LAYOUT, config=small_config()) as s:
        ids = s.put_blocks("doc", k[:4], v[:4], lm[:4])
        ids2 = s.put_blocks("doc", k[4:], v[4:], lm[4:])
        assert ids.tolist() == [0, 1, 2, 3] and ids2.tolist() == [4, 5, 6]
        for layer in range(LAYOUT.n_layers):
            order = [6, 0, 3, 3, 5]
            K, V = s.get_layer(order, layer)
            assert torch.equal(K, k[order, layer]) and torch.equal(V, v[order, layer])
            check_budgets(s)
        names, ords = s.block_meta([5, 1])
        assert names == ["doc", "doc"] and ords.tolist() == [5, 1]
        b = s.get(2)
        assert b.stream == "doc" and b.ordinal == 2 and torch.equal(b.k, k[2]) and torch.equal(b.landmarks, lm[2])
        assert s.get(99) is None and s.contains(6) and not s.contains(7)


def test_put_streams_equals_put_blocks_per_part_and_a_bad_part_stores_nothing(tmp_path):
    """One put_streams call (with or without its host copy) == put_blocks per part in order:
    ids, ordinals, contents, tier placement, search results, and what a reopen reads; a
    non-finite landmark in any part, or a bad part, stores no part at all."""
    from memory_store import InvalidArgumentError, LandmarkIndexError

    k, v, lm = make_blocks(9, seed=6)
    parts = [("a", 3), ("b", 0), ("c", 2), ("a", 4)]
    q = torch.randn(5, LAYOUT.n_kv_heads, LAYOUT.head_dim, generator=torch.Generator().manual_seed(1))
    seen = []
    for mode in ("batched", "handed over", "per part"):
        path = tmp_path / mode.replace(" ", "-")
        with TieredStore.open(path, "w", layout=LAYOUT, config=small_config()) as s:
            s.put_blocks("a", k[:0], v[:0], lm[:0])  # nothing: no stream is made
            if mode != "per part":  # copy=False: the store keeps the caller's (fresh) tensors
                ids = s.put_streams(parts, *(t.clone() for t in (k, v, lm)), copy=mode == "batched")
            else:
                ids, off = [], 0
                for name, n in parts:
                    ids.append(s.put_blocks(name, k[off:off + n], v[off:off + n], lm[off:off + n]))
                    off += n
            tiers = [sorted(t.keys()) for t in s.tiers[:2]]
            found = [s.index.search_max(layer, q, 3, streams=[name])[0].tolist()
                     for layer in range(LAYOUT.n_layers) for name in ("a", "c")]
        with TieredStore.open(path, "r", layout=LAYOUT, config=small_config()) as s:
            meta = s.block_meta(list(range(9)))
            data = [torch.equal(s.get_layer(list(range(9)), layer)[0], k[:, layer]) for layer in range(LAYOUT.n_layers)]
            seen.append(([i.tolist() for i in ids], tiers, found, meta[0], meta[1].tolist(), s.streams(), data))
    assert seen[0] == seen[1] == seen[2]
    assert seen[0][0] == [[0, 1, 2], [], [3, 4], [5, 6, 7, 8]] and seen[0][4] == [0, 1, 2, 0, 1, 3, 4, 5, 6]
    assert all(seen[0][6])

    bad = lm.clone()
    bad[7, 0, 0, 0] = float("nan")  # in the last part only
    with TieredStore.open(tmp_path / "bad", "w", layout=LAYOUT, config=small_config()) as s:
        with pytest.raises(LandmarkIndexError, match="finite"):
            s.put_streams(parts, k, v, bad)
        with pytest.raises(InvalidArgumentError, match="n_blocks"):
            s.put_streams([("a", 3), ("c", -1)], k[:3], v[:3], lm[:3])
        with pytest.raises(InvalidArgumentError, match="stream"):
            s.put_streams([("a", 3), ("", 6)], k, v, lm)
        with pytest.raises(InvalidArgumentError, match="pair"):
            s.put_streams(["a"], k, v, lm)
        assert len(s) == 0 and s.streams() == []
        real_grow = type(s.index)._grow

        def no_memory(self, need):  # room for the first part, not for all of them
            if need > 3:
                raise MemoryError("simulated: the index cannot grow")
            return real_grow(self, need)

        type(s.index)._grow = no_memory  # no part may be stored while a later one fails
        try:
            with pytest.raises(MemoryError):
                s.put_streams(parts, k, v, lm)
        finally:
            type(s.index)._grow = real_grow
        assert len(s) == 0 and s.streams() == [] and len(s.index) == 0
        assert s.put_streams([("a", 9)], k, v, lm)[0].tolist() == list(range(9))  # still usable


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="thread priorities: POSIX only")
def test_the_background_writer_runs_niced_and_bad_niceness_is_refused(tmp_path):
    import time

    base = os.getpriority(os.PRIO_PROCESS, 0)
    k, v, lm = make_blocks(2, seed=1)
    cfg = dataclasses.replace(small_config(), writer_nice=10)
    with TieredStore.open(tmp_path / "s", "a", layout=LAYOUT, config=cfg) as s:
        s.put_blocks("doc", k, v, lm)
        s.flush()  # the writer has run
        tid = s._writes.thread.native_id
        for _ in range(100):  # its first act: lower its own priority
            if os.getpriority(os.PRIO_PROCESS, tid) != base:
                break
            time.sleep(0.01)
        assert os.getpriority(os.PRIO_PROCESS, tid) == min(19, base + 10)
        assert os.getpriority(os.PRIO_PROCESS, 0) == base  # the caller's thread is untouched
    for bad in (-1, 20, 2.0, True):
        with pytest.raises(ValueError, match="writer_nice"):
            StoreConfig(writer_nice=bad)


def test_reopen_has_every_flushed_block_and_meta(tmp_path):
    k, v, lm = make_blocks(9, seed=2)
    with TieredStore.open(tmp_path / "s", "w", layout=LAYOUT, config=small_config()) as s:
        s.put_blocks("a", k[:5], v[:5], lm[:5])
        s.put_blocks("b", k[5:], v[5:], lm[5:])
        s.set_stream_meta("a", {"tail": [1, 2, 3], "n": 5})
    with TieredStore.open(tmp_path / "s", "a", config=small_config()) as s:
        assert s.index_source == "loaded"
        assert s.streams() == ["a", "b"]
        assert s.stream_blocks("b").tolist() == [5, 6, 7, 8]
        assert s.get_stream_meta("a") == {"tail": [1, 2, 3], "n": 5}
        K, V = s.get_layer(np.arange(9), 1)
        assert torch.equal(K, k[:, 1]) and torch.equal(V, v[:, 1])
        ids = s.put_blocks("a", k[:1], v[:1], lm[:1])  # ordinals continue after reopen
        assert ids.tolist() == [9] and s.block_meta(ids)[1].tolist() == [5]


def test_zarr_python_reads_the_store_on_its_own(tmp_path):
    k, v, lm = make_blocks(3, seed=3)
    with TieredStore.open(tmp_path / "s", "w", layout=LAYOUT, config=small_config()) as s:
        s.put_blocks("doc", k, v, lm)
    g = zarr.open_group(tmp_path / "s", mode="r")
    assert np.array_equal(g["kv"][:3, :, 0], k.numpy()) and np.array_equal(g["kv"][:3, :, 1], v.numpy())
    assert np.array_equal(g["landmarks"][:3], lm.numpy())
    assert g["kv"].chunks == (1, 1, 2, LAYOUT.n_kv_heads, LAYOUT.block_len, LAYOUT.head_dim)
    assert g.attrs["folio"]["layout"] == LAYOUT.to_dict()
    assert json.loads((tmp_path / "s" / COMMIT_KEY).read_text())["n_rows"] == 3


def test_zarr_python_reads_appended_shards_after_many_commits(tmp_path):
    # shards of 2 rows; blocks put over several commits and two opens: every shard file holds chunks,
    # superseded indexes, more chunks and its last index, and zarr-python reads it all
    k, v, lm = make_blocks(9, seed=31)
    cfg = small_config(shard_rows=2, device_budget_bytes=0, host_budget_bytes=0)
    with TieredStore.open(tmp_path / "s", "w", layout=LAYOUT, config=cfg) as s:
        for i in range(0, 5, 1):
            s.put_blocks("doc", k[i:i + 1], v[i:i + 1], lm[i:i + 1])
            s.flush()
    with TieredStore.open(tmp_path / "s", "a", config=cfg) as s:
        s.put_blocks("doc", k[5:], v[5:], lm[5:])
    g = zarr.open_group(tmp_path / "s", mode="r")
    assert g["kv"].shards == (2, *g["kv"].shape[1:]) and g["kv"].chunks == (1, 1, *g["kv"].shape[2:])
    assert np.array_equal(g["kv"][:9, :, 0], k.numpy()) and np.array_equal(g["kv"][:9, :, 1], v.numpy())
    assert np.array_equal(g["landmarks"][:9], lm.numpy())
    assert sorted(p.name for p in (tmp_path / "s" / "kv").glob("c.*")) == [f"c.{i}.0.0.0.0.0" for i in range(5)]


def test_a_killed_writers_appends_are_cut_off_on_reopen(tmp_path):
    k, v, lm = make_blocks(6, seed=32)
    cfg = small_config(shard_rows=4)
    s = TieredStore.open(tmp_path / "s", "w", layout=LAYOUT, config=cfg)
    s.put_blocks("doc", k[:3], v[:3], lm[:3])
    s.flush()
    committed = {p.name: p.stat().st_size for p in (tmp_path / "s" / "kv").glob("c.*")}
    s.put_blocks("doc", k[3:], v[3:], lm[3:])  # rows 3 (shard 0) and 4-5 (a new shard 1)
    with s._cv:
        while s._writes.jobs:
            s._cv.wait()  # written (appended to shard 0, shard 1 created), never committed
    s._writes.stopping = True  # "killed": never flushed
    s.disk.writer_lock.release()  # (the kernel drops a killed process's flock)
    kv = tmp_path / "s" / "kv"
    assert (kv / "c.1.0.0.0.0.0").exists() and (kv / "c.0.0.0.0.0.0").stat().st_size > committed["c.0.0.0.0.0.0"]
    with TieredStore.open(tmp_path / "s", "r", config=cfg) as r:  # a reader ignores what is past the commit
        assert len(r) == 3
        K, _ = r.get_layer([2, 0], 1)
        assert torch.equal(K, k[[2, 0], 1])
    with TieredStore.open(tmp_path / "s", "a", config=cfg) as w:  # the next writer cuts it off, then appends
        assert {p.name: p.stat().st_size for p in kv.glob("c.*")} == committed
        assert len(w) == 3
        w.put_blocks("doc", k[3:], v[3:], lm[3:])
    with TieredStore.open(tmp_path / "s", "r", config=cfg) as r:
        K, V = r.get_layer([5, 3, 0], 0)
        assert torch.equal(K, k[[5, 3, 0], 0]) and torch.equal(V, v[[5, 3, 0], 0])
    assert np.array_equal(zarr.open_group(tmp_path / "s", mode="r")["kv"][:6, :, 1], v.numpy())


def test_a_shard_whose_blocks_are_all_deleted_is_removed(tmp_path):
    k, v, lm = make_blocks(7, seed=33)
    cfg = small_config(shard_rows=2)
    with TieredStore.open(tmp_path / "s", "w", layout=LAYOUT, config=cfg) as s:
        s.put_blocks("a", k[:3], v[:3], lm[:3])  # rows 0-2: shard 0 and half of shard 1
        s.put_blocks("b", k[3:], v[3:], lm[3:])  # rows 3-6
        s.flush()
        s.delete_stream("a")
        s.flush()
        names = sorted(p.name for p in (tmp_path / "s" / "kv").glob("c.*"))
        assert names == ["c.1.0.0.0.0.0", "c.2.0.0.0.0.0", "c.3.0.0.0.0.0"]  # shard 1 still holds row 3
    with TieredStore.open(tmp_path / "s", "r", config=cfg) as r:
        assert r.streams() == ["b"]
        K, V = r.get_layer([3, 6], 1)
        assert torch.equal(K, k[[3, 6], 1]) and torch.equal(V, v[[3, 6], 1])
    assert np.array_equal(zarr.open_group(tmp_path / "s", mode="r")["kv"][3:7, :, 0], k[3:].numpy())


def test_unflushed_blocks_are_invisible_after_reopen(tmp_path):
    k, v, lm = make_blocks(4, seed=4)
    s = TieredStore.open(tmp_path / "s", "w", layout=LAYOUT, config=small_config())
    s.put_blocks("doc", k[:2], v[:2], lm[:2])
    s.flush()
    s.put_blocks("doc", k[2:], v[2:], lm[2:])
    s._stopping = True  # simulate a crash: never flushed, threads abandoned
    with TieredStore.open(tmp_path / "s", "r", config=small_config()) as r:
        assert len(r) == 2 and r.index_source == "rebuilt" and len(r.index) == 2
        assert r.stream_blocks("doc").tolist() == [0, 1]


@pytest.mark.parametrize("device_entries,host_entries", [(0, 0), (1, 0), (0, 2), (3, 5), (40, 40)])
def test_budgets_hold_and_reads_stay_exact(tmp_path, device_entries, host_entries):
    k, v, lm = make_blocks(12, seed=5)
    cfg = small_config(device_budget_bytes=device_entries * EB, host_budget_bytes=host_entries * EB + 3)
    rng = np.random.default_rng(0)
    with TieredStore.open(tmp_path / "s", "w", layout=LAYOUT, config=cfg) as s:
        s.put_blocks("x", k, v, lm)
        check_budgets(s)
        for step in range(20):
            ids = rng.choice(12, size=rng.integers(1, 8), replace=True)
            layer = int(rng.integers(0, 2))
            K, V = s.get_layer(ids, layer)
            assert torch.equal(K, k[ids, layer]) and torch.equal(V, v[ids, layer])
            check_budgets(s)
            if step == 10:
                s.flush()
        st = s.stats()
        assert st["tiers"]["device"]["bytes"] <= device_entries * EB
        assert st["get_latency_ms"]["count"] == 20 and st["get_latency_ms"]["p50"] > 0


@contextlib.contextmanager
def ten_blocks_over_three_tiers(path, seed: int):
    """A store of 10 flushed blocks (stream "x") with room for 2 on the device and 2 on
    the host; yields (store, k, v)."""
    k, v, lm = make_blocks(10, seed=seed)
    cfg = small_config(device_budget_bytes=4 * EB, host_budget_bytes=4 * EB)
    with TieredStore.open(path, "w", layout=LAYOUT, config=cfg) as s:
        s.put_blocks("x", k, v, lm)
        s.flush()
        yield s, k, v


def test_reads_hit_fastest_tier_and_promote(tmp_path):
    with ten_blocks_over_three_tiers(tmp_path / "s", seed=6) as (s, _, _):
        dev, host = s.tiers[0], s.tiers[1]
        assert set(dev.keys()) == {(8, 0), (8, 1), (9, 0), (9, 1)}  # newest writes on the device
        assert set(host.keys()) == {(6, 0), (6, 1), (7, 0), (7, 1)}  # demoted to host
        before = s.stats()
        s.get_layer([8], 0)
        s.get_layer([6], 0)
        s.get_layer([0], 0)
        after = s.stats()
        assert after["hits"]["device"] - before["hits"]["device"] == 1
        assert after["hits"]["host"] - before["hits"]["host"] == 1
        assert after["hits"]["disk"] - before["hits"]["disk"] == 1
        assert dev.contains((6, 0)) and dev.contains((0, 0)) and not host.contains((6, 0))
        s.get_layer([0], 0)
        assert s.stats()["hits"]["device"] - after["hits"]["device"] == 1


def test_read_through_without_promotion_leaves_the_tiers_as_they_were(tmp_path):
    """get_layer(promote=False) (decode steps): the same bytes, from host and disk, and
    no entry moves between tiers."""
    with ten_blocks_over_three_tiers(tmp_path / "s", seed=7) as (s, k, v):
        dev, host = s.tiers[0], s.tiers[1]
        keys_before = (set(dev.keys()), set(host.keys()))
        moved = dict(s.stats()["bytes_moved"])
        gk, gv = s.get_layer([6, 0, 8], 1, promote=False)  # host, disk, device
        for i, bid in enumerate((6, 0, 8)):
            assert torch.equal(gk[i], k[bid, 1]) and torch.equal(gv[i], v[bid, 1])
        assert (set(dev.keys()), set(host.keys())) == keys_before
        assert s.stats()["bytes_moved"]["device_to_host"] == moved["device_to_host"]
        s.get_layer([0], 1)  # the default promotes
        assert dev.contains((0, 1))


def test_delete_stream_removes_data_and_index(tmp_path):
    k, v, lm = make_blocks(6, seed=7)
    with TieredStore.open(tmp_path / "s", "w", layout=LAYOUT, config=small_config(save_index="flush")) as s:
        s.put_blocks("keep", k[:3], v[:3], lm[:3])
        s.put_blocks("gone", k[3:], v[3:], lm[3:])
        s.flush()
        assert s.delete_stream("gone") == 3 and s.delete_stream("gone") == 0
        assert s.streams() == ["keep"] and not s.contains(4) and len(s.index) == 3
        ids, _ = s.index.search(0, lm[4, 0].float().unsqueeze(0), k=6)
        assert set(ids.flatten().tolist()) <= {0, 1, 2, -1}
        s.flush()
        for row in (3, 4, 5):  # chunks removed (from their shard's index) after the commit
            assert all(s.disk.chunk_location(row, layer) is None for layer in (-1, 0, 1))
        assert s.disk.chunk_location(0, 1) is not None  # (live blocks are found)
        s.put_blocks("gone", k[3:4], v[3:4], lm[3:4])  # a name can come back, as a new stream
    with TieredStore.open(tmp_path / "s", "r") as r:
        assert r.index_source == "loaded" and len(r.index) == 4
        assert r.streams() == ["keep", "gone"] and r.stream_blocks("gone").tolist() == [6]
        assert r.block_meta([6])[1].tolist() == [0]
        K, _ = r.get_layer([0, 1, 2, 6], 0)
        assert torch.equal(K, k[[0, 1, 2, 3], 0])


def test_stale_or_missing_index_is_rebuilt(tmp_path):
    k, v, lm = make_blocks(5, seed=8)
    with TieredStore.open(tmp_path / "s", "w", layout=LAYOUT, config=small_config()) as s:
        s.put_blocks("doc", k, v, lm)
    q = torch.randn(3, LAYOUT.n_kv_heads, LAYOUT.head_dim)
    with TieredStore.open(tmp_path / "s", "r") as r:
        want = r.index.search(1, q, 3)
    # stale: a later commit that did not save the index
    with TieredStore.open(tmp_path / "s", "a", config=small_config(save_index="never")) as s:
        s.set_stream_meta("doc", {"x": 1})
    with TieredStore.open(tmp_path / "s", "r") as r:
        assert r.index_source == "rebuilt"
        got = r.index.search(1, q, 3)
        assert torch.equal(got[0], want[0]) and torch.allclose(got[1], want[1])


def test_prefetch_then_get_does_not_touch_disk(tmp_path):
    k, v, lm = written_store(tmp_path / "s", 8, seed=9)
    cfg = small_config(device_budget_bytes=8 * EB, host_budget_bytes=8 * EB)
    with TieredStore.open(tmp_path / "s", "r", config=cfg) as s:
        s.prefetch([1, 2, 3], layer=1)
        s.prefetch([1, 2, 3], layer=1)  # already in flight or warm: no second load
        K, V = s.get_layer([3, 1, 2], 1)
        st = s.stats()
        assert st["hits"]["disk"] == 3 and st["prefetched_entries"] == 3 and st["hits"]["device"] == 3
        assert torch.equal(K, k[[3, 1, 2], 1]) and torch.equal(V, v[[3, 1, 2], 1])
        s.prefetch([5])  # all layers
        K, _ = s.get_layer([5], 0)
        assert torch.equal(K, k[[5], 0])


def test_get_whole_block_while_a_prefetch_is_reading_does_not_deadlock(tmp_path):
    # Regression: get() once held the store lock while waiting for the prefetch, which needs that lock to finish.
    import threading
    import time

    k, v, lm = written_store(tmp_path / "s", 4, seed=11)
    cfg = small_config(device_budget_bytes=8 * EB, host_budget_bytes=8 * EB)
    with TieredStore.open(tmp_path / "s", "r", config=cfg) as s:
        slow_read = s.disk.read_layer_into

        def read_slowly(*a, **kw):
            time.sleep(0.3)  # the prefetch is mid-read, outside the lock, when get() starts
            return slow_read(*a, **kw)

        s.disk.read_layer_into = read_slowly
        s.prefetch([2])
        got = []
        t = threading.Thread(target=lambda: got.append(s.get(2)), daemon=True)
        t.start()
        t.join(timeout=30)
        assert not t.is_alive(), "get() deadlocked against the prefetch thread"
        assert torch.equal(got[0].k, k[2]) and torch.equal(got[0].v, v[2])


def test_write_through_and_queue_reads(tmp_path):
    k, v, lm = make_blocks(6, seed=10)
    for wb in (False, True):
        cfg = small_config(write_behind=wb, device_budget_bytes=0, host_budget_bytes=0)
        with TieredStore.open(tmp_path / f"s{wb}", "w", layout=LAYOUT, config=cfg) as s:
            s.put_blocks("doc", k, v, lm)  # nothing fits in memory: reads come from queue or disk
            K, V = s.get_layer([5, 0], 1)
            assert torch.equal(K, k[[5, 0], 1]) and torch.equal(V, v[[5, 0], 1])


@pytest.mark.parametrize("kind", ["memory", "fsspec-chunks", "fsspec-segments"])
def test_other_zarr_stores(kind, tmp_path):
    if kind == "memory":
        store = zarr.storage.MemoryStore()
    else:
        fsspec.filesystem("memory").rm("/folio-test", recursive=True) if fsspec.filesystem("memory").exists(
            "/folio-test") else None
        store = zarr.storage.FsspecStore.from_url("memory:///folio-test")
    k, v, lm = make_blocks(5, seed=11)
    # an fsspec store (object storage) shards as segments unless shard_rows=None (one object per chunk)
    cfg = small_config(shard_rows=2 if kind == "fsspec-segments" else None)
    with TieredStore.open(store, "w", layout=LAYOUT, config=cfg) as s:
        s.put_blocks("doc", k, v, lm)
        s.set_stream_meta("doc", {"n": 5})
    with TieredStore.open(store, "r", layout=LAYOUT) as r:
        assert r.index_source == "loaded" and r.get_stream_meta("doc") == {"n": 5}
        K, V = r.get_layer([4, 2], 0)
        assert torch.equal(K, k[[4, 2], 0]) and torch.equal(V, v[[4, 2], 0])
        assert torch.equal(r.get(3).landmarks, lm[3])
    if kind != "fsspec-segments":  # one object per chunk: zarr-python reads the arrays on its own
        assert np.array_equal(zarr.open_group(store, mode="r")["kv"][:5, :, 1], v.numpy())
    else:  # segments are Folio's (segments.py): zarr sees the metadata, and fill values
        assert zarr.open_group(store, mode="r").attrs["folio"]["shard_storage"] == "segments"


def test_bfloat16_store(tmp_path):
    lay = StoreLayout(n_layers=1, n_kv_heads=1, block_len=2, head_dim=4, dtype="bfloat16")
    k, v, lm = make_blocks(3, seed=12, layout=lay)
    with TieredStore.open(tmp_path / "s", "w", layout=lay, config=small_config()) as s:
        s.put_blocks("doc", k, v, lm)
    with TieredStore.open(tmp_path / "s", "r") as r:
        K, V = r.get_layer([0, 1, 2], 0)
        assert K.dtype == torch.bfloat16 and torch.equal(K, k[:, 0]) and torch.equal(V, v[:, 0])
        assert torch.equal(r.get(1).landmarks, lm[1])


def test_config_validation():
    with pytest.raises(ValueError, match="device_budget_bytes"):
        StoreConfig(device_budget_bytes=-1)
    with pytest.raises(ValueError, match="save_index"):
        StoreConfig(save_index="sometimes")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="shard_rows"):
            StoreConfig(shard_rows=bad)
    with pytest.raises(ValueError, match="eviction"):
        StoreConfig(eviction="fifo")
    with pytest.raises(ValueError, match="dtype"):
        StoreLayout(n_layers=1, n_kv_heads=1, block_len=1, head_dim=1, dtype="int8")


def test_inspect_report(tmp_path):
    from memory_store.inspect import inspect_store

    k, v, lm = make_blocks(5, seed=13)
    with TieredStore.open(tmp_path / "s", "w", layout=LAYOUT, config=small_config()) as s:
        s.put_blocks("alpha", k[:3], v[:3], lm[:3])
        s.put_blocks("beta", k[3:], v[3:], lm[3:])
    report = inspect_store(tmp_path / "s")
    assert LAYOUT.describe() in report and "on disk" in report and "p50" in report
    assert any(line.split()[:2] == ["alpha", "3"] for line in report.splitlines())
    assert any(line.split()[:2] == ["beta", "2"] for line in report.splitlines())


def test_reopen_after_a_writer_died_inside_ensure_capacity(tmp_path):
    # A writer SIGKILLed between resizing the K/V arrays and the row-metadata arrays leaves them of
    # different lengths; the next writer must grow the short ones, not silently clip their rows.
    k, v, lm = make_blocks(80, seed=12)
    with TieredStore.open(tmp_path / "s", "w", layout=LAYOUT, config=small_config()) as s:
        s.put_blocks("doc", k[:60], v[:60], lm[:60])
    root = zarr.open_group(str(tmp_path / "s"), mode="r+")
    short = int(root["block_stream"].shape[0])
    for name in ("kv", "landmarks"):  # the half-finished growth
        arr = root[name]
        arr.resize((2 * short, *arr.shape[1:]))
    with TieredStore.open(tmp_path / "s", "a", config=small_config()) as s:
        s.put_blocks("doc", k[60:], v[60:], lm[60:])  # rows past the short arrays' end
    with TieredStore.open(tmp_path / "s", "r", config=small_config()) as s:
        assert len(s) == 80 and s.stream_blocks("doc").tolist() == list(range(80))
        names, ords = s.block_meta(list(range(80)))
        assert set(names) == {"doc"} and ords.tolist() == list(range(80))
        K, _ = s.get_layer([79, 3], 1)
        assert torch.equal(K, k[[79, 3], 1])


def test_parallel_batched_disk_read_is_bit_exact_and_still_detects_corruption(tmp_path, monkeypatch):
    import memory_store.chunks as chunks_mod
    from memory_store.errors import CorruptBlockError

    monkeypatch.setattr(chunks_mod, "_PARALLEL_READ_BYTES", 1)  # every batch of >= 2 chunks per thread
    monkeypatch.setenv("FOLIO_READ_THREADS", "3")
    # the threaded read is the one-file-per-chunk layout's (format 3); sharded stores read on the caller's thread
    cfg = small_config(device_budget_bytes=0, host_budget_bytes=0, shard_rows=None)
    k, v, lm = written_store(tmp_path / "s", 12, seed=13, config=cfg)
    order = [11, 0, 5, 3, 7, 2, 9, 1, 10]
    with TieredStore.open(tmp_path / "s", "r", config=cfg) as s:
        for layer in range(LAYOUT.n_layers):
            K, V = s.get_layer(order, layer)
            assert torch.equal(K, k[order, layer]) and torch.equal(V, v[order, layer])
    chunk = tmp_path / "s" / "kv" / "c.9.1.0.0.0.0"
    raw = bytearray(chunk.read_bytes())
    raw[5] ^= 0x01
    chunk.write_bytes(bytes(raw))
    with TieredStore.open(tmp_path / "s", "r", config=cfg) as s:
        with pytest.raises(CorruptBlockError, match="block 9 layer 1"):
            s.get_layer(order, 1)
        K, _ = s.get_layer(order, 0)  # the other layer is intact
        assert torch.equal(K, k[order, 0])


# -- lazy_writes (write-back): blocks wait in the queue; deleted streams are never written --------

def _chunk_files(path) -> list[str]:
    return sorted(p.name for p in (path / "kv").glob("c.*"))


@pytest.mark.parametrize("shard_rows", [None, 2])
def test_lazy_writes_hold_blocks_until_flush_and_never_write_deleted_streams(tmp_path, shard_rows):
    k, v, lm = make_blocks(9, seed=40)
    cfg = small_config(lazy_writes=True, device_budget_bytes=0, host_budget_bytes=0,
                       **({"shard_rows": shard_rows} if shard_rows else {}))
    with TieredStore.open(tmp_path / "s", "w", layout=LAYOUT, config=cfg) as s:
        s.put_streams([("a", 3), ("b", 2), ("c", 1)], k[:6], v[:6], lm[:6])  # one job: three streams
        s.put_blocks("d", k[6:], v[6:], lm[6:])
        time.sleep(0.2)  # a write-behind writer would have written by now
        assert _chunk_files(tmp_path / "s") == [] and s.stats()["bytes_moved"]["to_disk"] == 0
        K, V = s.get_layer([5, 0, 8], 1)  # no memory tier: served from the queue
        assert torch.equal(K, k[[5, 0, 8], 1]) and torch.equal(V, v[[5, 0, 8], 1])
        assert s.delete_stream("b") == 2 and s.delete_stream("d") == 3
        s.flush()  # writes only what is alive: rows 0-2 (a) and 5 (c)
        moved = s.stats()["bytes_moved"]
        assert s.bytes_moved() == moved  # the cheap accessor (training reads it every step)
        row = (k[:1].numel() + v[:1].numel() + lm[:1].numel()) * k.element_size()
        assert moved["to_disk"] == 4 * row and moved["never_written"] == 5 * row
        got = zarr.open_group(tmp_path / "s", mode="r")["kv"]
        assert np.array_equal(got[[0, 1, 2, 5], :, 0], k[[0, 1, 2, 5]].numpy())
        assert not np.array_equal(got[[3, 4], :, 0], k[[3, 4]].numpy())  # never written: the fill value
    with TieredStore.open(tmp_path / "s", "a", config=cfg) as r:
        assert r.streams() == ["a", "c"] and r.stream_blocks("c").tolist() == [5]
        K, V = r.get_layer([0, 1, 2, 5], 0)
        assert torch.equal(K, k[[0, 1, 2, 5], 0]) and torch.equal(V, v[[0, 1, 2, 5], 0])
        assert r.put_blocks("c", k[:1], v[:1], lm[:1]).tolist() == [9]  # rows continue after the gap
        assert r.block_meta([9])[1].tolist() == [1]


def test_lazy_writes_write_when_the_queue_passes_half_and_a_big_put_never_deadlocks(tmp_path):
    k, v, lm = make_blocks(12, seed=41)
    job = (k[:1].numel() + v[:1].numel() + lm[:1].numel()) * k.element_size()  # bytes of one block's job
    cfg = small_config(lazy_writes=True, write_queue_bytes=4 * job, device_budget_bytes=0, host_budget_bytes=0)
    with TieredStore.open(tmp_path / "s", "w", layout=LAYOUT, config=cfg) as s:
        for i in range(3):  # 3 blocks queued: past half of the queue, so the writer starts
            s.put_blocks("doc", k[i:i + 1], v[i:i + 1], lm[i:i + 1])
        deadline = time.monotonic() + 10
        while s.stats()["queued_write_bytes"] > 2 * job and time.monotonic() < deadline:
            time.sleep(0.01)
        assert s.stats()["queued_write_bytes"] <= 2 * job and s.stats()["bytes_moved"]["to_disk"] > 0
        s.put_blocks("doc", k[3:4], v[3:4], lm[3:4])
        s.put_blocks("doc", k[4:12], v[4:12], lm[4:12])  # bigger than the room left: waits for the writer
        K, V = s.get_layer(np.arange(12), 0)
        assert torch.equal(K, k[:, 0]) and torch.equal(V, v[:, 0])


@pytest.mark.parametrize("lazy", [False, True])
def test_flush_commits_the_store_as_it_was_when_called(tmp_path, lazy):
    """Puts and deletes another thread makes while flush waits for the writer belong to the
    next flush: the commit never counts rows the writer may not have written yet, a stream
    deleted while its job still waits in the queue is written in full (the commit counts it
    alive), and a deleted stream's rows are unlinked only by a flush that waited for them."""
    import threading

    k, v, lm = make_blocks(8, seed=43)
    cfg = small_config(device_budget_bytes=0, host_budget_bytes=0, lazy_writes=lazy)
    path = tmp_path / "s"
    with TieredStore.open(path, "w", layout=LAYOUT, config=cfg) as s:
        s.put_blocks("a", k[:2], v[:2], lm[:2])
        s.flush()
        gate, entered = threading.Event(), threading.Event()
        real = s._disk.write_rows

        def held_write(*a, **kw):  # the writer stops inside its next job until the gate opens
            entered.set()
            assert gate.wait(10)
            return real(*a, **kw)

        s._disk.write_rows = held_write
        s.put_blocks("b", k[2:4], v[2:4], lm[2:4])
        s.put_blocks("c", k[4:6], v[4:6], lm[4:6])  # queued behind "b"
        flusher = threading.Thread(target=s.flush)
        flusher.start()
        deadline = time.monotonic() + 10
        while (s._dirty or not entered.is_set()) and time.monotonic() < deadline:
            time.sleep(0.001)  # until flush took its snapshot and the writer is inside "b"
        assert not s._dirty and entered.is_set()
        s.put_blocks("d", k[6:8], v[6:8], lm[6:8])  # all three after flush was called
        assert s.delete_stream("c") == 2 and s.delete_stream("a") == 2
        gate.set()
        flusher.join(10)
        assert not flusher.is_alive()
        with TieredStore.open(path, "r", config=cfg) as r:  # what that flush committed
            assert r.streams() == ["a", "b", "c"] and len(r) == 6
            K, V = r.get_layer(np.arange(6), 1)
            assert torch.equal(K, k[:6, 1]) and torch.equal(V, v[:6, 1])
        s.flush()
        with TieredStore.open(path, "r", config=cfg) as r:
            assert r.streams() == ["b", "d"] and len(r) == 4
            K, V = r.get_layer([2, 3, 6, 7], 0)
            assert torch.equal(K, k[[2, 3, 6, 7], 0]) and torch.equal(V, v[[2, 3, 6, 7], 0])
            with pytest.raises(UnknownBlockError):
                r.get_layer([0, 4], 0)


def test_lazy_writes_need_the_background_writer():
    with pytest.raises(ValueError, match="lazy_writes"):
        StoreConfig(lazy_writes=True, write_behind=False)
    with pytest.raises(ValueError, match="lazy_writes"):
        StoreConfig(lazy_writes=1)


@pytest.mark.parametrize("device_entries,host_entries", [(100, 0), (2, 3), (0, 0)])
def test_get_heads_gathers_each_lanes_and_heads_blocks(tmp_path, device_entries, host_entries):
    """get_heads == get_layer + picking head h of block sel[b, h, j], zeros for -1: from the
    device tier in one gather when it holds every block, else through get_layer."""
    k, v, lm = make_blocks(8, seed=42)
    cfg = small_config(device_budget_bytes=device_entries * EB, host_budget_bytes=host_entries * EB)
    with TieredStore.open(tmp_path / "s", "w", layout=LAYOUT, config=cfg) as s:
        s.put_blocks("doc", k, v, lm)
        s.flush()
        sel = torch.tensor([[[3, 0, -1], [7, 7, 1]], [[-1, -1, -1], [2, 5, 6]]])  # (B=2, H=2, 3)
        hits = s.stats()["hits"]["device"]
        K, V = s.get_heads(sel, 1)
        assert K.shape == (2, 2, 3, LAYOUT.block_len, LAYOUT.head_dim)
        for b in range(2):
            for h in range(2):
                for j in range(3):
                    i = int(sel[b, h, j])
                    want_k = k[i, 1, h] if i >= 0 else torch.zeros_like(k[0, 1, 0])
                    want_v = v[i, 1, h] if i >= 0 else torch.zeros_like(v[0, 1, 0])
                    assert torch.equal(K[b, h, j], want_k) and torch.equal(V[b, h, j], want_v), (b, h, j)
        if device_entries >= 8:
            assert s.stats()["hits"]["device"] == hits + 7  # the 7 distinct blocks, from the device tier
        Z, _ = s.get_heads(torch.full((1, 2, 2), -1), 0)
        assert not Z.any()
        for bad in (sel[0], sel.int(), torch.zeros(1, 3, 2, dtype=torch.int64)):
            with pytest.raises(InvalidArgumentError, match="get_heads"):
                s.get_heads(bad, 0)
        with pytest.raises(UnknownBlockError):
            s.get_heads(torch.tensor([[[0], [99]]]), 0)


def test_lazy_writes_a_shard_whose_rows_were_never_written_is_still_removed(tmp_path):
    """Rows deleted before the writer reached them still complete their shard: once every
    row of the shard is deleted, its file goes (as when all were written)."""
    k, v, lm = make_blocks(4, seed=43)
    cfg = small_config(lazy_writes=True, shard_rows=4)
    with TieredStore.open(tmp_path / "s", "w", layout=LAYOUT, config=cfg) as s:
        s.put_blocks("a", k[:2], v[:2], lm[:2])
        s.flush()  # rows 0-1 written to shard 0
        s.put_blocks("b", k[2:], v[2:], lm[2:])
        s.delete_stream("b")
        s.flush()  # rows 2-3 never written
        assert _chunk_files(tmp_path / "s") == ["c.0.0.0.0.0.0"]
        s.delete_stream("a")
        s.flush()
        assert _chunk_files(tmp_path / "s") == []
    with TieredStore.open(tmp_path / "s", "r", config=cfg) as r:
        assert r.streams() == [] and len(r) == 0
