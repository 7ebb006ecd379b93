"""The store on an S3-compatible server: moto's server mode on a loopback port (conftest's s3_server),
reached through s3fs and zarr's FsspecStore exactly as a real bucket would be (no client mock).

Write, flush, reopen, read, delete_stream; commit records as new objects (the newest wins); a
reader in another process sees the state of some flush; a writer killed with SIGKILL leaves
exactly its last acknowledged flush, and its lease lets the next writer in once it expires; a
second writer is refused naming the holder, `wait_s` waits, a lease taken over fences the old
writer's commits.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from _store_helpers import LAYOUT, make_blocks

from memory_store import StoreConfig, StoreLockedError, StoreNotFoundError, TieredStore
from memory_store.lease import LEASE_KEY, WriterLease, read_lease
from memory_store.object_store import KEEP_COMMITS, Objects, open_url

CFG = StoreConfig(device="cpu", device_budget_bytes=0, host_budget_bytes=0, save_index="never",
                  index_backend="exact")

# a writer process: round g puts 3 blocks (seed g) into stream doc<g % 3>, flushes, then says so
_WRITER = textwrap.dedent("""
    import sys
    from memory_store import StoreConfig, TieredStore
    from memory_store.testing.blocks import TEST_LAYOUT, make_blocks
    cfg = StoreConfig(device="cpu", device_budget_bytes=0, host_budget_bytes=0, save_index="never",
                      index_backend="exact")
    s = TieredStore.open(sys.argv[1], "a", layout=TEST_LAYOUT, config=cfg)
    g = 0
    while True:
        k, v, lm = make_blocks(3, seed=g)
        s.put_blocks(f"doc{g % 3}", k, v, lm)
        print(f"flushing {g}", flush=True)
        s.flush()
        print(f"flushed {g} {s.generation}", flush=True)
        g += 1
""")

# a reader process: the committed state it opened, each block checked against the writer's rounds
_READER = textwrap.dedent("""
    import json, sys, torch
    from memory_store import TieredStore
    from memory_store.testing.blocks import make_blocks
    with TieredStore.open(sys.argv[1], "r") as s:
        n, bad = len(s), 0
        for g in range(n // 3):
            k, v, lm = make_blocks(3, seed=g)
            for layer in range(s.layout.n_layers):
                K, V = s.get_layer([3 * g, 3 * g + 1, 3 * g + 2], layer)
                bad += int(not (torch.equal(K, k[:, layer]) and torch.equal(V, v[:, layer])))
        print(json.dumps({"n": n, "generation": s.generation, "bad": bad, "rem": n % 3}))
""")


def _child_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **extra}


def _read_state(url: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _READER, url], env=_child_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _keys(url: str, prefix: str) -> list[str]:
    """The store's keys starting with `prefix` (listed afresh)."""
    from zarr.core.sync import sync

    store = open_url(url, read_only=True)
    store.fs.invalidate_cache()

    async def go():
        return [k async for k in store.list()]

    return sorted(k for k in sync(go()) if k.startswith(prefix))


@pytest.mark.parametrize("shard_rows", [2, None], ids=["segments", "chunk-objects"])
def test_write_flush_reopen_read_delete(s3_url, shard_rows):
    import dataclasses

    cfg = dataclasses.replace(CFG, shard_rows=shard_rows)
    k, v, lm = make_blocks(8, seed=1)
    with TieredStore.open(s3_url, "w", layout=LAYOUT, config=cfg) as s:
        assert isinstance(s.disk.writer_lock, WriterLease)
        s.put_blocks("a", k[:5], v[:5], lm[:5])
        s.flush()
        s.put_blocks("b", k[5:], v[5:], lm[5:])
        s.set_stream_meta("b", {"n": 3})
        s.flush()
        for g in range(KEEP_COMMITS + 3):  # more commits than are kept
            s.set_stream_meta("a", {"round": g})
            s.flush()
        gen = s.generation
    assert _keys(s3_url, LEASE_KEY) == []  # close() released the lease
    commits = _keys(s3_url, "commits/")
    assert commits[-1] == f"commits/g{gen:012d}.json" and len(commits) <= KEEP_COMMITS + 1
    assert _keys(s3_url, "commit.json") == []  # never overwritten in place: new objects only
    with TieredStore.open(s3_url, "r") as r:
        assert r.generation == gen and r.streams() == ["a", "b"] and r.get_stream_meta("b") == {"n": 3}
        for layer in range(LAYOUT.n_layers):
            K, V = r.get_layer(list(range(8)), layer)
            assert torch.equal(K, k[:, layer]) and torch.equal(V, v[:, layer])
    with TieredStore.open(s3_url, "a", config=cfg) as s:
        assert s.delete_stream("a") == 5
        s.flush()
        with TieredStore.open(s3_url, "r") as r:
            assert r.streams() == ["b"] and len(r) == 3
            K, _ = r.get_layer([5, 6, 7], 1)
            assert torch.equal(K, k[5:, 1])
        if shard_rows is None:
            kv = _keys(s3_url, "kv/c.")
            assert kv and not any(key.startswith(f"kv/c.{row}.") for key in kv for row in range(5))  # removed
            return
        # segments: rows 0-3 filled shards 0 and 1; their chunks are dropped after the commit that
        # deleted the stream, at the next seal no index references their segments, and readers of the
        # last KEEP_COMMITS records may still read them, so they go KEEP_COMMITS commits after that one
        assert _keys(s3_url, "kv/seg/0/") and not _keys(s3_url, "kv/c.")  # (not zarr's shard keys)
        dead = [key for key in _keys(s3_url, "kv/seg/0/") + _keys(s3_url, "kv/seg/1/") if key.endswith(".bin")]
        assert dead
        for g in range(KEEP_COMMITS + 1):
            if g == KEEP_COMMITS:
                assert set(dead) <= set(_keys(s3_url, "kv/seg/"))  # still there one commit before
            s.set_stream_meta("b", {"round": g})
            s.flush()
        left = [key for key in _keys(s3_url, "kv/seg/") if key.endswith(".bin")]
        assert not set(dead) & set(left) and left  # b's segments stay
        assert len([key for key in _keys(s3_url, "kv/seg/0/") if key.endswith(".idx")]) == 1  # superseded gone
    with TieredStore.open(s3_url, "r") as r:
        K, V = r.get_layer([5, 6, 7], 0)
        assert torch.equal(K, k[5:, 0]) and torch.equal(V, v[5:, 0])


def test_missing_store_is_a_typed_error(s3_url):
    with pytest.raises(StoreNotFoundError, match="no Folio store"):
        TieredStore.open(s3_url, "r")


def test_reader_in_another_process_sees_the_last_flush(s3_url):
    cfg = StoreConfig(device="cpu", device_budget_bytes=0, host_budget_bytes=0, save_index="never",
                      index_backend="exact", write_behind=False)  # the unflushed blocks really are in the bucket
    with TieredStore.open(s3_url, "w", layout=LAYOUT, config=cfg) as s:
        for g in range(2):
            k, v, lm = make_blocks(3, seed=g)
            s.put_blocks(f"doc{g % 3}", k, v, lm)
        s.flush()
        committed = s.generation
        k, v, lm = make_blocks(3, seed=2)
        s.put_blocks("doc2", k, v, lm)  # written, not committed
        assert _read_state(s3_url) == {"n": 6, "generation": committed, "bad": 0, "rem": 0}
        s.flush()
    assert _read_state(s3_url) == {"n": 9, "generation": committed + 1, "bad": 0, "rem": 0}


def test_sigkill_writer_leaves_its_last_acknowledged_flush(s3_url):
    env = _child_env(FOLIO_LEASE_TTL_S="4")
    w = subprocess.Popen([sys.executable, "-c", _WRITER, s3_url], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    acked, in_flight, seen = -1, -1, []
    try:
        deadline = time.monotonic() + 120
        while acked < 5 and time.monotonic() < deadline:
            line = w.stdout.readline()
            assert line, f"writer died: {w.stderr.read()[-3000:]}"
            word, g, *_ = line.split()
            if word == "flushing":
                in_flight = int(g)
            else:
                acked = int(g)
                if acked == 2:  # a reader in another process while the writer runs
                    seen.append(_read_state(s3_url))
        w.send_signal(signal.SIGKILL)
        w.wait(30)
        for line in w.stdout.read().splitlines():  # what it printed before the kill landed
            word, g, *_ = line.split()
            if word == "flushing":
                in_flight = int(g)
            else:
                acked = int(g)
    finally:
        if w.poll() is None:
            w.kill()
            w.wait()
    assert acked >= 5, "the writer never reached 5 flushes"
    (state,) = seen
    assert state["bad"] == 0 and state["rem"] == 0 and state["n"] >= 9  # consistent as of some flush
    with pytest.raises(StoreLockedError, match=f"pid {w.pid}"):  # its lease is still live
        TieredStore.open(s3_url, "a", config=CFG)
    after = _read_state(s3_url)
    rounds = after["n"] // 3
    # exactly the last acknowledged flush, or the one in flight when killed (it may have landed)
    assert after["bad"] == 0 and after["rem"] == 0
    assert rounds == acked + 1 or (in_flight == acked + 1 and rounds == acked + 2), (after, acked, in_flight)
    t0 = time.monotonic()
    with TieredStore.open(s3_url, "a", config=CFG, wait_s=30) as s:  # the expired lease is taken over
        assert time.monotonic() - t0 < 10
        k, v, lm = make_blocks(3, seed=rounds)
        s.put_blocks("next", k, v, lm)
    assert _read_state(s3_url)["n"] == after["n"] + 3


def test_a_second_writer_is_refused_naming_the_holder_and_wait_s_waits(s3_url):
    a = TieredStore.open(s3_url, "w", layout=LAYOUT, config=CFG)
    try:
        with pytest.raises(StoreLockedError, match=rf"pid {os.getpid()} on host .*refused at once") as e:
            TieredStore.open(s3_url, "a", config=CFG)
        assert e.value.holder["pid"] == os.getpid() and e.value.path == s3_url
        t0 = time.monotonic()
        with pytest.raises(StoreLockedError, match="after waiting 0.5 s"):
            TieredStore.open(s3_url, "a", config=CFG, wait_s=0.5)
        assert time.monotonic() - t0 >= 0.5
        with TieredStore.open(s3_url, "r") as r:  # readers never take the lease
            assert len(r) == 0
        threading.Timer(1.0, a.close).start()
        t0 = time.monotonic()
        with TieredStore.open(s3_url, "a", config=CFG, wait_s=20) as b:
            assert time.monotonic() - t0 >= 0.9 and b.disk.writer_lock.held
    finally:
        a.close()


def _plant_lease(url: str, expires_in: float) -> None:
    store = open_url(url)
    Objects(store).delete(LEASE_KEY)
    rec = {"owner": "someone-else", "pid": 424242, "host": "elsewhere", "since": "earlier",
           "expires": time.time() + expires_in, "ttl_s": 30, "command": "folio ingest"}
    assert Objects(store).create(LEASE_KEY, json.dumps(rec).encode())


def test_a_live_lease_refuses_and_an_expired_one_is_taken_over(s3_url):
    with TieredStore.open(s3_url, "w", layout=LAYOUT, config=CFG):
        pass
    _plant_lease(s3_url, 60)
    with pytest.raises(StoreLockedError, match="pid 424242 on host elsewhere"):
        TieredStore.open(s3_url, "a", config=CFG)
    _plant_lease(s3_url, -1)  # its writer died a while ago
    with TieredStore.open(s3_url, "a", config=CFG) as s:
        assert read_lease(open_url(s3_url))["pid"] == os.getpid()
        s.set_stream_meta("x", {})


def test_a_writer_whose_lease_was_taken_over_commits_nothing(s3_url):
    k, v, lm = make_blocks(3, seed=4)
    a = TieredStore.open(s3_url, "w", layout=LAYOUT, config=CFG)
    a.put_blocks("doc", k, v, lm)
    a.flush()
    gen = a.generation
    _plant_lease(s3_url, 60)  # another writer took the store over (this one was paused past its ttl)
    a.put_blocks("doc", k, v, lm)
    with pytest.raises(StoreLockedError, match="lease was taken over by pid 424242"):
        a.flush()
    with pytest.raises(StoreLockedError):
        a.close()
    with TieredStore.open(s3_url, "r") as r:
        assert r.generation == gen and len(r) == 3
    assert read_lease(open_url(s3_url))["pid"] == 424242  # the new owner's lease is left alone


def test_a_sharded_local_store_copied_to_the_bucket_reads_by_byte_ranges(s3_url, s3_server, tmp_path):
    import s3fs

    from memory_store import FormatVersionError

    k, v, lm = make_blocks(7, seed=5)
    local = tmp_path / "local"
    cfg = StoreConfig(device="cpu", device_budget_bytes=0, host_budget_bytes=0, save_index="never",
                      index_backend="exact", sync_mode="none", shard_rows=2)  # 4 shards, the last one partial
    with TieredStore.open(local, "w", layout=LAYOUT, config=cfg) as s:
        s.put_blocks("a", k[:4], v[:4], lm[:4])
        s.flush()
        s.put_blocks("b", k[4:], v[4:], lm[4:])  # appended: the shard files hold two indexes now
    fs = s3fs.S3FileSystem(endpoint_url=s3_server["endpoint_url"])
    fs.put(str(local) + "/", s3_url.removeprefix("s3://"), recursive=True)
    with TieredStore.open(s3_url, "r", config=CFG) as r:
        assert r.streams() == ["a", "b"] and len(r) == 7
        for layer in range(LAYOUT.n_layers):
            K, V = r.get_layer([6, 0, 3, 5], layer)
            assert torch.equal(K, k[[6, 0, 3, 5], layer]) and torch.equal(V, v[[6, 0, 3, 5], layer])
        assert torch.equal(r.get(2).landmarks, lm[2])
    with pytest.raises(FormatVersionError, match="copied from a local directory"):
        TieredStore.open(s3_url, "a", config=CFG)
    assert read_lease(open_url(s3_url)) == {}  # the refused writer left no lease behind


def test_cli_ingest_in_one_process_ask_and_inspect_from_another(s3_url, s3_server, tmp_path, capsys):
    from train.cli import main

    doc = tmp_path / "doc.txt"
    doc.write_text("The pass key is 777. " * 30)
    code = "import sys; from train.cli import main; sys.exit(main(sys.argv[1:]))"
    out = subprocess.run([sys.executable, "-c", code, "ingest", "--model", "random:tiny", "--store", s3_url,
                          str(doc), "--no-progress"], env=_child_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tokens ingested" in out.stdout
    opts = json.dumps({"endpoint_url": s3_server["endpoint_url"], "key": "testing", "secret": "testing"})
    assert main(["ask", "--model", "random:tiny", "--store", s3_url, "--storage-options", opts, "--stream",
                 "doc.txt", "What is the pass key?", "--max-tokens", "4"]) == 0
    assert main(["store", "inspect", s3_url]) == 0
    assert "doc.txt" in capsys.readouterr().out
    assert main(["store", "inspect", s3_url, "--storage-options", "{nope"]) == 2
    assert "not JSON" in capsys.readouterr().err


def test_the_server_honours_conditional_writes(s3_url):
    """The lease and the commit records rely on S3's If-None-Match / If-Match: check the server does them."""
    objects = Objects(open_url(s3_url))
    assert objects.conditional
    assert objects.create("probe", b"one") and not objects.create("probe", b"two")
    data, etag = objects.get("probe")
    assert data == b"one" and etag
    assert not objects.replace("probe", b"three", '"not-the-etag"') and objects.get("probe")[0] == b"one"
    assert objects.replace("probe", b"four", etag) and objects.get("probe")[0] == b"four"
    from memory_store.object_store import write_commit

    write_commit(open_url(s3_url), 7, b"record", s3_url)
    write_commit(open_url(s3_url), 7, b"record", s3_url)  # the same record again: idempotent
    with pytest.raises(StoreLockedError, match="generation 7 was already written by another writer"):
        write_commit(open_url(s3_url), 7, b"another record", s3_url)


def test_a_live_writer_renews_its_lease(s3_url, monkeypatch):
    monkeypatch.setenv("FOLIO_LEASE_TTL_S", "0.6")
    k, v, lm = make_blocks(3, seed=8)
    with TieredStore.open(s3_url, "w", layout=LAYOUT, config=CFG) as s:
        first = read_lease(open_url(s3_url))["expires"]
        time.sleep(2.0)  # more than three ttls: only the renewals keep it
        assert read_lease(open_url(s3_url))["expires"] > first + 1.0
        with pytest.raises(StoreLockedError):
            TieredStore.open(s3_url, "a", config=CFG)
        s.put_blocks("doc", k, v, lm)
        s.flush()  # still its own: commits
    with TieredStore.open(s3_url, "r") as r:
        assert len(r) == 3


def test_a_reader_on_an_old_commit_after_its_objects_were_pruned(s3_url):
    """Segments superseded by a delete are kept for KEEP_COMMITS commits; a reader that opened before and
    reads after that is told its stream was deleted (not "corrupt")."""
    import dataclasses

    from memory_store import StreamDeletedError

    cfg = dataclasses.replace(CFG, shard_rows=2)
    k, v, lm = make_blocks(6, seed=9)
    with TieredStore.open(s3_url, "w", layout=LAYOUT, config=cfg) as w:
        w.put_blocks("old", k[:4], v[:4], lm[:4])
        w.put_blocks("new", k[4:], v[4:], lm[4:])
    r = TieredStore.open(s3_url, "r", config=cfg)
    with TieredStore.open(s3_url, "a", config=cfg) as w:
        w.delete_stream("old")
        w.flush()
        K, _ = r.get_layer([0, 1], 0)  # still there for readers of the older records
        assert torch.equal(K, k[:2, 0])
        for g in range(KEEP_COMMITS + 1):
            w.set_stream_meta("new", {"g": g})
            w.flush()
    with pytest.raises(StreamDeletedError, match=r"\['old'\].*reopen"):
        r.get_layer([2, 3], 1)  # (shard 1: never read by this reader, its objects are gone now)
    K, _ = r.get_layer([4, 5], 1)
    assert torch.equal(K, k[4:, 1])
    r.close()


def test_writers_racing_for_the_lease_exactly_one_wins(s3_url):
    """Eight contenders start together, for a free lease and for an expired one, 10 rounds each: the
    server's conditional writes (If-None-Match: *, If-Match: etag) let exactly one through every time."""
    import json as _json

    from memory_store.object_store import Objects

    rounds, contenders = 10, 8
    won_counts = []
    for r in range(2 * rounds):
        url = f"{s3_url}-{r}"
        store = open_url(url)
        if r >= rounds:  # an expired lease left by a killed writer: a take-over race (If-Match)
            assert Objects(store).create(LEASE_KEY, _json.dumps({"owner": "dead", "expires": 1.0}).encode())
        barrier = threading.Barrier(contenders)
        got: list = []
        mu = threading.Lock()

        def contend():
            barrier.wait()
            try:
                lease = WriterLease.acquire(open_url(url), url, wait_s=0, ttl_s=30)
            except StoreLockedError:
                return
            with mu:
                got.append(lease)

        threads = [threading.Thread(target=contend) for _ in range(contenders)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        won_counts.append(len(got))
        assert len(got) == 1, f"round {r}: {len(got)} writers hold the lease"
        assert read_lease(store)["owner"] == got[0].holder()["owner"]
        got[0].release()
    print(f"lease races: {len(won_counts)} rounds of {contenders} contenders, one winner in each")


def test_a_reader_whose_index_was_pruned_reads_a_newer_one(s3_url):
    """The race the S3 soak found: a reader opens, the writer keeps appending to the same shard (each
    flush a new index object) past KEEP_COMMITS, and only then the reader first reads that shard."""
    import dataclasses

    cfg = dataclasses.replace(CFG, shard_rows=64)
    k, v, lm = make_blocks(2 + KEEP_COMMITS + 2, seed=12)
    with TieredStore.open(s3_url, "w", layout=LAYOUT, config=cfg) as w:
        w.put_blocks("a", k[:2], v[:2], lm[:2])
    r = TieredStore.open(s3_url, "r", config=cfg)
    mine = r.disk.read_commit().shards["kv"][0]  # the index version the reader's record names
    with TieredStore.open(s3_url, "a", config=cfg) as w:
        for i in range(2, k.shape[0]):
            w.put_blocks(f"s{i}", k[i:i + 1], v[i:i + 1], lm[i:i + 1])
            w.flush()
    kept = sorted(key for key in _keys(s3_url, "kv/seg/0/") if key.endswith(".idx"))
    assert f"kv/seg/0/v{mine:010d}.idx" not in kept and kept  # the reader's version is gone
    K, V = r.get_layer([1, 0], 1)
    assert torch.equal(K, k[[1, 0], 1]) and torch.equal(V, v[[1, 0], 1])
    assert r.streams() == ["a"]  # still the state it opened
    r.close()
