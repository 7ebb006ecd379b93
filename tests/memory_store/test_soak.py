"""A short soak (scripts/soak.py runs it for minutes): a writer, a deleter, four readers at once."""

from __future__ import annotations

from memory_store.testing.soak import run_soak


def test_soak_writer_deleter_and_readers_nothing_inconsistent_nothing_lost(tmp_path):
    r = run_soak(str(tmp_path / "store"), 8.0, readers=4)
    problems = r.pop("problems")
    print(f"soak: {r}")
    assert not problems, "\n".join(problems[:10])
    assert r["flushes"] > 5 and r["streams_deleted"] > 0 and r["opens"] > 20 and r["blocks_read"] > 100, r


def test_soak_on_the_s3_server(s3_url):
    """The same on object storage: segments, the lease, commit objects, readers in other processes."""
    r = run_soak(s3_url, 8.0, readers=3)
    problems = r.pop("problems")
    print(f"soak on S3: {r}")
    assert not problems, "\n".join(problems[:10])
    assert r["flushes"] > 3 and r["streams_deleted"] > 0 and r["opens"] > 5 and r["blocks_read"] > 30, r


def test_a_reader_opening_across_a_delete_opens_the_newer_commit(tmp_path, monkeypatch):
    """The race the soak found, made deterministic: a reader reads commit g, then (before it rebuilds
    the index from the landmark chunks) the writer commits a delete and removes that stream's chunks.
    The reader must open the newer commit, not fail with CorruptBlockError('chunk missing')."""
    import shutil

    import torch
    from _store_helpers import LAYOUT, make_blocks

    from memory_store import StoreConfig, TieredStore
    from memory_store.index import LandmarkIndex

    # one chunk per row (no shards), so deleting a stream removes its chunks at once
    cfg = StoreConfig(device="cpu", sync_mode="none", index_backend="exact", shard_rows=None)
    path = tmp_path / "s"
    k, v, lm = make_blocks(4, seed=3)
    with TieredStore.open(path, "w", layout=LAYOUT, config=cfg) as w:
        w.put_blocks("old", k[:2], v[:2], lm[:2])
        w.put_blocks("new", k[2:], v[2:], lm[2:])
    shutil.rmtree(path / "index")  # the reader rebuilds the index: it reads every live landmark chunk
    real = LandmarkIndex.open_or_rebuild.__func__
    calls = []

    def delete_then_rebuild(cls, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # the first reader open: the writer deletes "old" in between
            with TieredStore.open(path, "a", config=cfg) as w:  # (its own open is call 2)
                w.delete_stream("old")
                w.flush()
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(LandmarkIndex, "open_or_rebuild", classmethod(delete_then_rebuild))
    with TieredStore.open(path, "r", config=cfg) as r:
        assert r.streams() == ["new"] and len(calls) == 3  # reader, writer, the reader again
        K, V = r.get_layer(r.stream_blocks("new").tolist(), 1)
        assert torch.equal(K, k[2:, 1]) and torch.equal(V, v[2:, 1])
