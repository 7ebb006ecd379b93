"""Bad input: every bad call raises a typed error saying what was wrong, and the store still reads back bit-exact."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
import torch
import zarr
from _store_helpers import LAYOUT, make_blocks

from memory_store import StoreConfig, TieredStore
from memory_store.errors import (ClosedError, CorruptBlockError, FormatVersionError, InvalidArgumentError,
                                 LayoutMismatchError, ReadOnlyError, ShapeError, StoreError, StoreNotFoundError,
                                 UnknownBlockError)

CFG = StoreConfig(device_budget_bytes=2 * LAYOUT.block_bytes(), host_budget_bytes=2 * LAYOUT.block_bytes(),
                  sync_mode="none")
K, V, LM = make_blocks(6, seed=21)


def assert_intact(store: TieredStore, n: int = 6) -> None:
    for layer in range(LAYOUT.n_layers):
        k, v = store.get_layer(list(range(n)), layer)
        assert torch.equal(k, K[:n, layer]) and torch.equal(v, V[:n, layer])
    assert len(store) == n and store.stream_blocks("doc").tolist() == list(range(n))


@pytest.fixture
def store(tmp_path):
    s = TieredStore.open(tmp_path / "s", "w", layout=LAYOUT, config=CFG)
    s.put_blocks("doc", K, V, LM)
    s.flush()
    yield s
    s.close()


BAD_PUTS = [
    ("shape", lambda: (K[:, :, :1], V, LM)),
    ("shape", lambda: (K, V[:3], LM)),
    ("shape", lambda: (K, V, LM[:, :1])),
    ("dtype", lambda: (K.double(), V, LM)),
    ("dtype", lambda: (K, V, LM.half())),
    ("torch.Tensor", lambda: (K.numpy(), V, LM)),
]


@pytest.mark.parametrize("what,args", BAD_PUTS)
def test_bad_put_raises_shape_error_and_changes_nothing(store, what, args):
    with pytest.raises(ShapeError, match=what) as e:
        store.put_blocks("doc", *args())
    assert isinstance(e.value, ValueError) and isinstance(e.value, StoreError)
    assert_intact(store)
    assert store.put_blocks("doc", K[:1], V[:1], LM[:1]).tolist() == [6]  # ids did not advance on failure


def test_bad_ids_layers_and_arguments(store):
    with pytest.raises(UnknownBlockError, match=r"\[6, -1\]"):
        store.get_layer([0, 6, -1], 0)
    with pytest.raises(UnknownBlockError):
        store.block_meta([42])
    with pytest.raises(ShapeError, match="integers"):
        store.get_layer([0.5], 0)
    with pytest.raises(InvalidArgumentError, match="layer"):
        store.get_layer([0], LAYOUT.n_layers)
    with pytest.raises(InvalidArgumentError, match="stream"):
        store.put_blocks("", K[:1], V[:1], LM[:1])
    with pytest.raises(InvalidArgumentError, match="JSON"):
        store.set_stream_meta("doc", {"x": object()})
    with pytest.raises(UnknownBlockError):
        store.prefetch([100])
    assert_intact(store)


def test_read_only_and_closed(tmp_path, store):
    store.close()
    with pytest.raises(ClosedError):
        store.get_layer([0], 0)
    with pytest.raises(ClosedError):
        store.put_blocks("doc", K[:1], V[:1], LM[:1])
    with TieredStore.open(tmp_path / "s", "r", config=CFG) as r:
        for call in (lambda: r.put_blocks("doc", K[:1], V[:1], LM[:1]), lambda: r.delete_stream("doc"),
                     lambda: r.set_stream_meta("doc", {})):
            with pytest.raises(ReadOnlyError, match="read-only"):
                call()
        assert_intact(r)


def test_layout_and_fingerprint_mismatch_names_both(tmp_path, store):
    store.close()
    for other in (replace(LAYOUT, fingerprint="another-model"), replace(LAYOUT, block_len=8),
                  replace(LAYOUT, dtype="float16")):
        with pytest.raises(LayoutMismatchError) as e:
            TieredStore.open(tmp_path / "s", "a", layout=other)
        assert LAYOUT.describe() in str(e.value) and other.describe() in str(e.value)
    with TieredStore.open(tmp_path / "s", "r", layout=LAYOUT, config=CFG) as r:
        assert_intact(r)


def test_version_mismatch_and_not_a_store(tmp_path, store):
    store.close()
    commit = tmp_path / "s" / "commit.json"
    good = commit.read_text()
    d = json.loads(good)
    d["format_version"] = 99
    commit.write_text(json.dumps(d))
    with pytest.raises(FormatVersionError, match="99"):
        TieredStore.open(tmp_path / "s", "r")
    commit.write_text(good)
    with TieredStore.open(tmp_path / "s", "r", config=CFG) as r:
        assert_intact(r)
    with pytest.raises(StoreNotFoundError):
        TieredStore.open(tmp_path / "nothing", "r")
    with pytest.raises(StoreNotFoundError, match="layout"):
        TieredStore.open(tmp_path / "nothing2", "a")
    zarr.open_group(tmp_path / "plain", mode="w").create_array("x", shape=(2,), dtype="int8")
    with pytest.raises(FormatVersionError, match="not a Folio store"):
        TieredStore.open(tmp_path / "plain", "a", layout=LAYOUT)
    assert (tmp_path / "plain" / "x").exists()  # someone else's data is left alone


def _flip(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def test_corrupted_chunk_is_detected_and_named(tmp_path, store):
    path, off, n = store.disk.chunk_location(4, 1)  # K then V of block 4, layer 1, then its crc
    store.close()
    _flip(path, off + n // 2 + 10)  # a bit of V
    with TieredStore.open(tmp_path / "s", "r", config=CFG) as r:
        with pytest.raises(CorruptBlockError, match="block 4 layer 1") as e:
            r.get_layer([2, 4], 1)
        assert e.value.block_id == 4 and e.value.layer == 1
        k, v = r.get_layer([0, 1, 2, 3, 5], 1)  # the rest still reads bit-exact
        assert torch.equal(v, V[[0, 1, 2, 3, 5], 1])
        k, v = r.get_layer([4], 0)  # and so does the same block's other layer
        assert torch.equal(k, K[[4], 0])
    _flip(path, off + n // 2 + 10)  # mend it
    size = os.path.getsize(path)
    _flip(path, size - 20)  # a bit of the shard's index
    with TieredStore.open(tmp_path / "s", "r", config=CFG) as r:
        with pytest.raises(CorruptBlockError, match=r"shard kv/c\.0\.0\.0\.0\.0\.0 \(blocks 0-255\): its index failed"):
            r.get_layer([4], 1)
    _flip(path, size - 20)
    os.truncate(path, size - 7)  # truncated (the commit names a longer file)
    with TieredStore.open(tmp_path / "s", "r", config=CFG) as r:
        with pytest.raises(CorruptBlockError, match="commit says"):
            r.get_layer([4], 1)
    os.unlink(path)  # lost
    with TieredStore.open(tmp_path / "s", "r", config=CFG) as r:
        with pytest.raises(CorruptBlockError, match="missing"):
            r.get_layer([4], 1)


def test_corrupted_chunk_one_file_per_chunk(tmp_path):
    cfg = replace(CFG, shard_rows=None)  # format 3's layout
    with TieredStore.open(tmp_path / "s", "w", layout=LAYOUT, config=cfg) as s:
        s.put_blocks("doc", K, V, LM)
    chunk = tmp_path / "s" / "kv" / "c.4.1.0.0.0.0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2 + 10] ^= 0x40  # a bit of V
    chunk.write_bytes(bytes(raw))
    with TieredStore.open(tmp_path / "s", "r", config=CFG) as r:
        with pytest.raises(CorruptBlockError, match="block 4 layer 1"):
            r.get_layer([2, 4], 1)
        k, v = r.get_layer([0, 1, 2, 3, 5], 1)
        assert torch.equal(v, V[[0, 1, 2, 3, 5], 1])
    chunk.write_bytes(bytes(raw[:-7]))  # truncated
    with TieredStore.open(tmp_path / "s", "r", config=CFG) as r:
        with pytest.raises(CorruptBlockError, match="block 4 layer 1.*size"):
            r.get_layer([4], 1)
    chunk.unlink()  # lost
    with TieredStore.open(tmp_path / "s", "r", config=CFG) as r:
        with pytest.raises(CorruptBlockError, match="missing"):
            r.get_layer([4], 1)