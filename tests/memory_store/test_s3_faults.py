"""Faults injected into the S3 requests of a store on a real S3 API server (moto's server mode):
memory_store.testing.s3_faults fails, or ends the writer at, each request of a flush in turn.

- A request that fails (EIO, as s3fs reports one that failed after its retries): the flush raises
  a typed StoreError, a reader sees exactly the last acknowledged commit, and the same writer's
  retry succeeds with every block intact.
- A writer killed before each request of a flush (a child process ending itself there): a reader
  sees the last acknowledged commit (or the new one, when the kill came after its record was
  published), the next writer takes the store once the lease expires, removes the killed writer's
  uncommitted objects, and continues.
The number of points tried is printed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import torch
from _store_helpers import LAYOUT, make_blocks

from memory_store import StoreConfig, StoreError, TieredStore
from memory_store.testing.s3_faults import S3Fault, S3Faults

CFG = StoreConfig(device="cpu", device_budget_bytes=0, host_budget_bytes=0, save_index="never",
                  index_backend="exact", shard_rows=4)
_VERSION = re.compile(r"/v(\d+)(?:-\d+\.bin|\.idx)$")


def _base(url: str) -> None:
    """Commit A: stream "a", 6 blocks over two shards."""
    k, v, lm = make_blocks(6, seed=1)
    with TieredStore.open(url, "w", layout=LAYOUT, config=CFG) as s:
        s.put_blocks("a", k, v, lm)
        s.flush()


def _flush_b(s: TieredStore) -> None:
    k, v, lm = make_blocks(5, seed=2)
    s.put_blocks("b", k, v, lm)  # rows 6-10: the end of shard 1, all of shard 2
    s.flush()


def _check(url: str, streams: dict[str, int]) -> None:
    """The store holds exactly these streams, every block equal to what was put."""
    with TieredStore.open(url, "r", config=CFG) as r:
        assert r.streams() == sorted(streams), (r.streams(), streams)
        for name, seed in [("a", 1), ("b", 2), ("c", 3)]:
            if name not in streams:
                continue
            k, v, lm = make_blocks(streams[name], seed=seed)
            ids = r.stream_blocks(name).tolist()
            assert len(ids) == streams[name]
            for layer in range(LAYOUT.n_layers):
                K, V = r.get_layer(ids, layer)
                assert torch.equal(K, k[:, layer]) and torch.equal(V, v[:, layer]), (name, layer)


def _flush_requests(url: str) -> list[tuple[str, str]]:
    _base(url)
    with TieredStore.open(url, "a", config=CFG) as s, S3Faults(trace=True) as t:
        _flush_b(s)
    return t.mutating_calls()


def test_every_failed_request_of_a_flush_is_a_typed_error_and_a_retry_succeeds(s3_url):
    calls = _flush_requests(s3_url + "-trace")
    kinds = {re.sub(r"[0-9]+", "N", key) for _, key in calls}
    assert any("/seg/" in k and k.endswith(".bin") for k in kinds) and any(k.endswith(".idx") for k in kinds)
    assert any("commits/" in k for k in kinds)
    points = 0
    for i in range(1, len(calls) + 1):
        url = f"{s3_url}-{i}"
        _base(url)
        with TieredStore.open(url, "a", config=CFG) as s:
            with S3Faults(S3Fault(nth=i)) as f:
                try:
                    _flush_b(s)
                    failed = False
                except StoreError:
                    failed = True
                except OSError as e:  # noqa: PERF203 - the point: not a StoreError
                    raise AssertionError(f"request {i} {f.fired}: an untyped {type(e).__name__}: {e}") from e
            assert f.fired, f"request {i} was never made"
            name, key = f.fired[0]
            if failed:
                _check(url, {"a": 6})  # the last acknowledged commit, nothing of b
            else:  # only a request after the record is out may fail silently: pruning old objects
                assert name.startswith("delete"), (i, name, key)
            s.flush()  # the retry, the server reachable again
            _check(url, {"a": 6, "b": 5})
        points += 1
    print(f"S3 request faults: {points} failed requests of a flush, each a typed error or harmless, the last "
          f"commit intact, the retry complete")


_KILLED = textwrap.dedent("""
    import sys
    from memory_store import StoreConfig, TieredStore
    from memory_store.testing.blocks import TEST_LAYOUT, make_blocks
    from memory_store.testing.s3_faults import S3Fault, S3Faults
    cfg = StoreConfig(device="cpu", device_budget_bytes=0, host_budget_bytes=0, save_index="never",
                      index_backend="exact", shard_rows=4)
    s = TieredStore.open(sys.argv[1], "a", config=cfg)
    k, v, lm = make_blocks(5, seed=2)
    with S3Faults(S3Fault(nth=int(sys.argv[2]), action="exit")):
        s.put_blocks("b", k, v, lm)
        s.flush()
    print("survived", flush=True)
""")


def _keys(url: str, prefix: str) -> list[str]:
    from zarr.core.sync import sync

    from memory_store.object_store import open_url

    store = open_url(url, read_only=True)
    store.fs.invalidate_cache()

    async def go():
        return [k async for k in store.list_prefix(prefix)]

    return sorted(sync(go()))


def test_a_writer_killed_before_each_request_of_a_flush(s3_url):
    calls = _flush_requests(s3_url + "-trace")
    n = len(calls)
    record = next(j for j, (_, key) in enumerate(calls, 1) if "commits/" in key)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "FOLIO_LEASE_TTL_S": "1"}
    published = 0
    # every point with FOLIO_FULL_SWEEPS=1; by default every other one, the record's and the last (a
    # process start each: the suite's time)
    points = (range(1, n + 1) if os.environ.get("FOLIO_FULL_SWEEPS") == "1"
              else sorted({*range(1, n + 1, 2), record, n}))
    for i in points:
        url = f"{s3_url}-{i}"
        _base(url)
        out = subprocess.run([sys.executable, "-c", _KILLED, url, str(i)], env=env, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 86, (i, out.returncode, out.stderr[-2000:])
        with TieredStore.open(url, "r", config=CFG) as r:
            has_b = "b" in r.streams()
        published += has_b
        _check(url, {"a": 6, "b": 5} if has_b else {"a": 6})
        k, v, lm = make_blocks(2, seed=3)
        with TieredStore.open(url, "a", config=CFG, wait_s=15) as s:  # once the killed writer's lease expires
            newest = max([0, *(x for d in s.disk.read_commit().shards.values() for x in d.values())])
            left = [key for key in _keys(url, "kv/seg/") + _keys(url, "landmarks/seg/")
                    if int(_VERSION.search(key).group(1)) > newest]
            assert not left, f"kill before request {i}: uncommitted objects left {left}"
            s.put_blocks("c", k, v, lm)
            s.flush()
        _check(url, {"a": 6, "b": 5, "c": 2} if has_b else {"a": 6, "c": 2})
    assert published == sum(1 for i in points if i > record)  # before the record: the old commit; after: the new
    print(f"S3 writer kills: {len(points)} of the {n} points of a flush, {published} after its record was "
          f"published; every one recovered by the next writer")
