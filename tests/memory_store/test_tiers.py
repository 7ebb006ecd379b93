"""One conformance suite that every tier passes (subclassed per tier), plus the eviction policy.

Each tier is also checked against the protocol the TieredStore composes it through
(memory_store.protocols): the memory tiers as CacheTier, the disk tier as DiskLog (and
BlobStore), both by isinstance (runtime_checkable) and by the behaviour the store relies on."""

from __future__ import annotations

import fsspec
import numpy as np
import pytest
import torch
import zarr

from memory_store.disk import DiskTier
from memory_store.errors import BudgetError, ClosedError, ReadOnlyError, ShapeError
from memory_store.eviction import LRUPolicy, make_policy
from memory_store.layout import StoreLayout
from memory_store.protocols import BlobStore, CacheTier, DiskLog
from memory_store.tiers import DeviceTier, HostTier, Tier

from _store_helpers import LAYOUT

BF16 = StoreLayout(n_layers=2, n_kv_heads=2, block_len=4, head_dim=8, dtype="bfloat16")


def entry(seed: int, layout: StoreLayout = LAYOUT) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(layout.kv_shape, generator=g).to(layout.torch_dtype),
            torch.randn(layout.kv_shape, generator=g).to(layout.torch_dtype))


class TierConformance:
    """Every tier: put/get bit-exact, a miss is None, contains/delete, batched forms, bad input, close."""

    def make_tier(self, tmp_path, layout: StoreLayout = LAYOUT) -> Tier:
        raise NotImplementedError

    def test_roundtrip_bit_exact(self, tmp_path):
        tier = self.make_tier(tmp_path)
        k, v = entry(1)
        tier.put((3, 1), k, v)
        got = tier.get((3, 1))
        assert got is not None
        assert torch.equal(got[0].cpu(), k) and torch.equal(got[1].cpu(), v)

    def test_bfloat16_roundtrip(self, tmp_path):
        tier = self.make_tier(tmp_path, BF16)
        k, v = entry(2, BF16)
        tier.put((0, 0), k, v)
        got = tier.get((0, 0))
        assert got[0].dtype == torch.bfloat16 and torch.equal(got[0].cpu(), k) and torch.equal(got[1].cpu(), v)

    def test_miss_is_none(self, tmp_path):
        tier = self.make_tier(tmp_path)
        assert tier.get((7, 0)) is None
        assert not tier.contains((7, 0))
        assert tier.get_many([(7, 0), (8, 1)]) == [None, None]
        assert tier.get_stacked([(7, 0)]) is None

    def test_contains_and_delete(self, tmp_path):
        tier = self.make_tier(tmp_path)
        tier.put((1, 0), *entry(3))
        assert tier.contains((1, 0)) and not tier.contains((1, 1))
        assert tier.delete((1, 0)) is True
        assert tier.delete((1, 0)) is False
        assert tier.get((1, 0)) is None

    def test_overwrite(self, tmp_path):
        tier = self.make_tier(tmp_path)
        tier.put((1, 1), *entry(4))
        k, v = entry(5)
        tier.put((1, 1), k, v)
        got = tier.get((1, 1))
        assert torch.equal(got[0].cpu(), k) and torch.equal(got[1].cpu(), v)

    def test_batched_forms(self, tmp_path):
        tier = self.make_tier(tmp_path)
        keys = [(i, i % 2) for i in range(5)]
        ks = torch.stack([entry(10 + i)[0] for i in range(5)])  # (M, H, T, D)
        vs = torch.stack([entry(10 + i)[1] for i in range(5)])
        tier.put_many(keys, ks, vs)
        k, v = tier.get_stacked(list(reversed(keys)))
        assert torch.equal(k.cpu(), ks.flip(0)) and torch.equal(v.cpu(), vs.flip(0))
        many = tier.get_many(keys + [(99, 0)])
        assert many[-1] is None and all(torch.equal(m[0].cpu(), ks[i]) for i, m in enumerate(many[:-1]))
        assert tier.contains_many(keys[:2] + [(99, 0)]) == [True, True, False]
        assert tier.delete_many(keys[:2] + [(99, 0)]) == 2
        assert tier.get((0, 0)) is None and tier.get((2, 0)) is not None

    def test_bad_shape_and_dtype(self, tmp_path):
        tier = self.make_tier(tmp_path)
        k, v = entry(6)
        with pytest.raises(ShapeError, match="shape"):
            tier.put((0, 0), k[:, :2], v)
        with pytest.raises(ShapeError, match="dtype"):
            tier.put((0, 0), k.double(), v)
        assert tier.get((0, 0)) is None  # nothing half-stored

    def test_closed(self, tmp_path):
        tier = self.make_tier(tmp_path)
        tier.close()
        with pytest.raises(ClosedError):
            tier.get((0, 0))


class MemoryTierConformance(TierConformance):
    def test_budget_never_exceeded(self, tmp_path):
        tier = self.make_tier(tmp_path)
        cap = tier.max_entries
        for i in range(cap):
            tier.put((i, 0), *entry(i))
            assert tier.nbytes <= tier.budget_bytes and tier.allocated_bytes <= tier.budget_bytes
        with pytest.raises(BudgetError):
            tier.put((cap, 0), *entry(0))
        assert len(tier) == cap

    def test_pop_victims_is_lru(self, tmp_path):
        tier = self.make_tier(tmp_path)
        for i in range(4):
            tier.put((i, 0), *entry(i))
        tier.get((0, 0))  # 0 becomes most recent
        keys, k, _ = tier.pop_victims(2, exclude={(1, 0)})
        assert keys == [(2, 0), (3, 0)]
        assert torch.equal(k[0].cpu(), entry(2)[0])
        assert not tier.contains((2, 0)) and tier.contains((1, 0))

    def test_is_a_cache_tier(self, tmp_path):
        tier = self.make_tier(tmp_path)
        assert isinstance(tier, CacheTier)
        assert tier.max_entries == 6 and tier.free_entries == 6
        for i in range(3):
            tier.put((i, 0), *entry(i))
        assert tier.free_entries == 3 and tier.victim_keys(2) == [(0, 0), (1, 0)]  # nothing removed
        H, T, D = LAYOUT.kv_shape
        k, v = tier.gather_heads([(2, 0), (0, 0)], np.array([0, 1, 1]), np.array([1, 0, 1]))  # (n, T, D)
        assert k.shape == (3, T, D)
        assert torch.equal(k[0].cpu(), entry(2)[0][1]) and torch.equal(v[2].cpu(), entry(0)[1][1])
        assert tier.gather_heads([(9, 0)], np.array([0]), np.array([0])) is None  # a miss: None
        assert tier.evict(1) == [(1, 0)] and not tier.contains((1, 0))  # the gather touched 2 and 0
        other = HostTier(LAYOUT, 6 * LAYOUT.block_bytes(), pin_memory=False)
        if other.can_copy_from(tier):
            other.put_from(tier, [(2, 0)])
            assert torch.equal(other.get((2, 0))[0], entry(2)[0])


class TestDeviceTier(MemoryTierConformance):
    def make_tier(self, tmp_path, layout=LAYOUT):
        return DeviceTier(layout, 6 * layout.block_bytes() + 5)


class TestHostTier(MemoryTierConformance):
    def make_tier(self, tmp_path, layout=LAYOUT):
        return HostTier(layout, 6 * layout.block_bytes())


class DiskConformance(TierConformance):
    def make_store(self, tmp_path):
        raise NotImplementedError

    shard_rows: int | None = 256

    def make_tier(self, tmp_path, layout=LAYOUT):
        tier, record = DiskTier.open(self.make_store(tmp_path), "w", layout=layout, sync_mode="none",
                                     shard_rows=self.shard_rows)
        assert record.n_rows == 0
        return tier

    def test_read_only_refuses_writes(self, tmp_path):
        where = self.make_store(tmp_path)
        tier, record = DiskTier.open(where, "w", layout=LAYOUT, sync_mode="none", shard_rows=self.shard_rows)
        tier.put((0, 0), *entry(1))
        tier.flush()
        record.generation += 1  # (an object store never takes one generation twice)
        tier.commit(record)  # a reader sees what was committed
        ro, _ = DiskTier.open(where if not isinstance(where, zarr.storage.LocalStore) else where.root, "r")
        assert not ro.supports_writes
        with pytest.raises(ReadOnlyError):
            ro.put((1, 0), *entry(2))
        assert torch.equal(ro.get((0, 0))[0], entry(1)[0])

    def test_is_a_disk_log(self, tmp_path):
        """Rows written in bulk read back bit-exact only once made durable and committed, layer by
        layer into the caller's buffers; row metadata and blobs round-trip."""
        where = self.make_store(tmp_path)
        tier, record = DiskTier.open(where, "w", layout=LAYOUT, sync_mode="none", shard_rows=self.shard_rows)
        assert isinstance(tier, DiskLog) and isinstance(tier, BlobStore)
        n, (L, H, T, D) = 3, (LAYOUT.n_layers, *LAYOUT.kv_shape)
        g = torch.Generator().manual_seed(7)
        k, v = (torch.randn((n, L, H, T, D), generator=g) for _ in range(2))
        lm = torch.randn((n, L, H, D), generator=g)
        st = LAYOUT.to_storage
        tier.write_rows(0, st(k), st(v), st(lm), np.array([0, 0, 1], np.int32), np.array([0, 1, 0], np.int64))
        tier.make_durable()
        record.n_rows, record.generation = n, 1
        tier.commit(record)
        assert tier.read_commit().n_rows == n and tier.read_commit().generation == 1
        codes, ords = tier.read_row_meta(n)
        assert codes.tolist() == [0, 0, 1] and ords.tolist() == [0, 1, 0]
        out_k = np.empty((2, H, T, D), dtype=LAYOUT.zarr_dtype)
        out_v = np.empty_like(out_k)
        found = tier.read_layer_into(np.array([2, 0, 5]), 1, np.empty((3, H, T, D), LAYOUT.zarr_dtype),
                                     np.empty((3, H, T, D), LAYOUT.zarr_dtype))
        assert found.tolist() == [True, True, False]  # row 5 was never written
        assert tier.read_layer_into(np.array([2, 0]), 1, out_k, out_v).all()
        assert torch.equal(LAYOUT.from_storage(out_k), k[[2, 0], 1]) and torch.equal(LAYOUT.from_storage(out_v), v[[2, 0], 1])
        got, found = tier.read_landmarks(np.array([1]))
        assert found.all() and torch.equal(LAYOUT.from_storage(got), lm[[1]])
        tier.delete_rows([1])
        assert not tier.read_layer_into(np.array([1]), 0, out_k[:1], out_v[:1]).any()
        tier.write_blob("index/g1/meta.json", b"{}")
        assert tier.read_blob("index/g1/meta.json") == b"{}" and tier.list_dir("index") == ["g1"]
        tier.delete_prefix("index/g1")
        assert tier.read_blob("index/g1/meta.json") is None and not tier.gone
        tier.check_present()
        tier.close()


class TestDiskTierLocal(DiskConformance):
    def make_store(self, tmp_path):
        return zarr.storage.LocalStore(tmp_path / "store")


class TestDiskTierLocalUnsharded(TestDiskTierLocal):
    """Format 3's local layout (one file per chunk), still read and appended to."""

    shard_rows = None


class TestDiskTierLocalSmallShards(TestDiskTierLocal):
    """Shards of 2 rows: every conformance test crosses shard boundaries."""

    shard_rows = 2


class TestDiskTierMemoryStore(DiskConformance):
    def make_store(self, tmp_path):
        return zarr.storage.MemoryStore()


class TestDiskTierFsspec(DiskConformance):
    """An fsspec-backed zarr store (fsspec's memory filesystem) as the object-storage stand-in."""

    def make_store(self, tmp_path):
        fs = fsspec.filesystem("memory", asynchronous=False)
        root = f"/folio-{tmp_path.name}"
        return zarr.storage.FsspecStore.from_url(f"memory://{root}")


def test_lru_policy_without_tensors():
    p = LRUPolicy()
    for key in "abcd":
        p.insert(key)
    p.touch("a")
    p.touch("zz")  # unknown: ignored
    assert list(p) == ["b", "c", "d", "a"] and len(p) == 4
    assert p.victim() == "b" and p.victim(exclude={"b", "c"}) == "d"
    p.remove("b")
    p.insert("c")  # re-insert counts as use
    assert list(p) == ["d", "a", "c"] and "b" not in p
    assert p.victim(exclude={"a", "c", "d"}) is None
    with pytest.raises(ValueError, match="lru"):
        make_policy("mru")


def test_put_from_copies_slot_to_slot_and_refuses_held_keys():
    src, dst = DeviceTier(LAYOUT, 4 * LAYOUT.block_bytes(), device="cpu"), HostTier(LAYOUT, 4 * LAYOUT.block_bytes(),
                                                                                     pin_memory=False)
    assert dst.can_copy_from(src)
    for i in range(3):
        src.put((i, 0), *entry(i))
    dst.put((9, 0), *entry(9))
    dst.put_from(src, [(0, 0), (2, 0)])
    for i in (0, 2):
        got = dst.get((i, 0))
        assert torch.equal(got[0], entry(i)[0]) and torch.equal(got[1], entry(i)[1])
    assert torch.equal(dst.get((9, 0))[0], entry(9)[0]) and src.contains((0, 0))  # a copy: src keeps it
    with pytest.raises(ValueError, match="new to this tier"):
        dst.put_from(src, [(1, 0), (2, 0)])
    assert not dst.contains((1, 0))  # refused before anything was stored


def test_bad_shard_rows_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="shard_rows=0: expected an int >= 1 or None"):
        DiskTier.open(tmp_path / "s", "w", layout=LAYOUT, shard_rows=0)
    assert not (tmp_path / "s").exists()
