"""A bounded soak of one store: one writer appending and flushing, a deleter of old streams (a thread
of the writer: one writer at a time), and reader processes reopening and reading random committed
blocks, all at once for `seconds`. Used by scripts/soak.py and tests/memory_store/test_soak.py.

Every block's content is a pure function of its id and its stream is too (stream `s000012` holds
ids 96..103, ordinals 0..7), so a reader checks what it sees without asking the writer. The writer
publishes two watermarks in shared memory: `acked`, the next id once a flush returned (every id
below it is committed), and `deleted_below`, raised before a stream is deleted (streams below it
may be gone). A reader reads `acked` before it opens and `deleted_below` after it has read, so:

- inconsistent: a stream other than the newest visible one that is partial, ids or ordinals other
  than the scheme's, a block whose bytes differ (reads skip the memory tiers, so every block comes
  from disk through its crc check), an error reading a stream no deletion has reached;
- lost: an id below `acked` that is not visible while its stream is at or above `deleted_below`.

A read that fails because the stream was deleted after the reader opened is counted (raced_delete):
a reader sees the commit as of its open, and a deleted stream's chunks are removed after the commit
that drops it. At the end the parent reads the whole store back against the scheme.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import random
import threading
import time
import traceback

import torch

from .. import StoreConfig, TieredStore
from .blocks import TEST_LAYOUT as LAYOUT
from .blocks import make_blocks

__all__ = ["run_soak", "STREAM_BLOCKS", "KEEP_STREAMS"]

STREAM_BLOCKS = 8  # blocks per stream
KEEP_STREAMS = 6  # the deleter deletes the oldest stream when more are alive
READ_CFG = StoreConfig(device="cpu", device_budget_bytes=0, host_budget_bytes=0, index_backend="exact")


def stream_of(block_id: int) -> str:
    return f"s{block_id // STREAM_BLOCKS:06d}"


def block_data(block_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    k, v, lm = make_blocks(1, seed=5000 + block_id)
    return k[0], v[0], lm[0]


def _adopt(env: dict[str, str]) -> None:
    """The parent's AWS_* settings (a forkserver started before them would not pass them on)."""
    os.environ.update(env)


def _writer(path: str, seconds: float, seed: int, acked, deleted_below, out, env: dict[str, str]) -> None:
    _adopt(env)
    counts = {"puts": 0, "blocks_put": 0, "flushes": 0, "streams_deleted": 0, "blocks_deleted": 0}
    errors: list[str] = []
    try:
        cfg = StoreConfig(device="cpu", device_budget_bytes=8 * LAYOUT.block_bytes(),
                          host_budget_bytes=8 * LAYOUT.block_bytes(), index_backend="exact")
        store = TieredStore.open(path, "w", layout=LAYOUT, config=cfg)
        rng = random.Random(seed)
        stop = time.monotonic() + seconds
        done = threading.Event()

        def deleter() -> None:
            try:
                while not done.wait(0.05):
                    live = sorted(s for s in store.streams())
                    if len(live) <= KEEP_STREAMS:
                        continue
                    oldest = live[0]
                    with deleted_below.get_lock():
                        deleted_below.value = max(deleted_below.value, int(oldest[1:]) + 1)
                    counts["blocks_deleted"] += store.delete_stream(oldest)
                    store.flush()
                    counts["streams_deleted"] += 1
            except BaseException:
                errors.append("deleter: " + traceback.format_exc())

        t = threading.Thread(target=deleter, daemon=True)
        t.start()
        next_id = 0
        while time.monotonic() < stop and not errors:
            left_in_stream = STREAM_BLOCKS - next_id % STREAM_BLOCKS
            n = min(rng.randint(1, 4), left_in_stream)
            parts = [block_data(next_id + i) for i in range(n)]
            ids = store.put_blocks(stream_of(next_id), *(torch.stack(p) for p in zip(*parts)))
            if ids.tolist() != list(range(next_id, next_id + n)):
                errors.append(f"writer: put returned ids {ids.tolist()}, expected {next_id}..{next_id + n - 1}")
            next_id += n
            counts["puts"] += 1
            counts["blocks_put"] += n
            if rng.random() < 0.4:
                store.flush()
                counts["flushes"] += 1
                acked.value = next_id  # every id below is committed
        done.set()
        t.join(30)
        store.flush()
        acked.value = next_id
        store.close()
    except BaseException:
        errors.append("writer: " + traceback.format_exc())
    out.put(("writer", counts, errors))


def _check_snapshot(r: TieredStore, acked: int, deleted_below, rng: random.Random, counts: dict,
                    problems: list[str]) -> None:
    names = r.streams()
    visible: dict[int, list[int]] = {}
    for s in names:
        if not (len(s) == 7 and s[0] == "s" and s[1:].isdigit()):
            problems.append(f"inconsistent: unexpected stream {s!r}")
            continue
        visible[int(s[1:])] = r.stream_blocks(s).tolist()
    top = max(visible, default=-1)
    for i, ids in visible.items():
        want = list(range(i * STREAM_BLOCKS, i * STREAM_BLOCKS + len(ids)))
        if ids != want or not ids or (i != top and len(ids) != STREAM_BLOCKS):
            problems.append(f"inconsistent: stream s{i:06d} holds ids {ids} (newest stream s{top:06d})")
    all_ids = [b for ids in visible.values() for b in ids]
    if all_ids:
        streams, ords = r.block_meta(all_ids)
        for b, s, o in zip(all_ids, streams, ords.tolist()):
            if s != stream_of(b) or o != b % STREAM_BLOCKS:
                problems.append(f"inconsistent: block {b} says stream {s!r} ordinal {o}")
                break
    counts["empty_snapshots"] += not all_ids
    sample = rng.sample(all_ids, min(6, len(all_ids)))
    layer = rng.randrange(LAYOUT.n_layers)
    try:
        if sample:
            k, v = r.get_layer(sample, layer)
            for j, b in enumerate(sample):
                wk, wv, _ = block_data(b)
                if not (torch.equal(k[j], wk[layer]) and torch.equal(v[j], wv[layer])):
                    problems.append(f"inconsistent: block {b} layer {layer} reads back different bytes")
            counts["blocks_read"] += len(sample)
    except Exception as e:  # noqa: BLE001 - a delete after our open may have removed the chunks
        if min(b // STREAM_BLOCKS for b in sample) < deleted_below.value:
            counts["raced_delete"] += 1
        else:
            problems.append(f"inconsistent: reading blocks {sample} of live streams failed: {e!r}")
    below = deleted_below.value  # read after the reads: streams under it may have gone meanwhile
    for i in range(below, top):
        if i not in visible:
            problems.append(f"lost: stream s{i:06d} is missing (deletions reached s{below - 1:06d})")
    for b in range(below * STREAM_BLOCKS, acked):
        if b not in visible.get(b // STREAM_BLOCKS, ()):
            problems.append(f"lost: block {b} was acknowledged (acked {acked}) but is not visible")
            break


def _reader(path: str, seconds: float, seed: int, acked, deleted_below, out, env: dict[str, str]) -> None:
    _adopt(env)
    counts = {"opens": 0, "empty_snapshots": 0, "blocks_read": 0, "raced_delete": 0}
    problems: list[str] = []
    rng = random.Random(seed)
    stop = time.monotonic() + seconds
    try:
        while time.monotonic() < stop and len(problems) < 20:
            a = acked.value
            try:
                r = TieredStore.open(path, "r", config=READ_CFG)
            except Exception as e:  # noqa: BLE001 - before the writer's first commit the store may not exist yet
                if a > 0:
                    problems.append(f"inconsistent: open failed after a commit: {e!r}")
                time.sleep(0.01)
                continue
            with r:
                counts["opens"] += 1
                _check_snapshot(r, a, deleted_below, rng, counts, problems)
    except BaseException:
        problems.append("reader: " + traceback.format_exc())
    out.put(("reader", counts, problems))


def final_audit(path: str, acked: int, deleted_below: int) -> list[str]:
    """Everything committed and not deleted is there, bit-exact, and nothing else."""
    problems = []
    with TieredStore.open(path, "r", config=READ_CFG) as r:
        want = list(range(deleted_below * STREAM_BLOCKS, acked))
        got = sorted(b for s in r.streams() for b in r.stream_blocks(s).tolist())
        if got != want:
            problems.append(f"final: blocks {sorted(set(want) ^ set(got))[:10]}... differ from those committed "
                            f"and not deleted")
        for layer in range(LAYOUT.n_layers):
            if got:
                k, v = r.get_layer(got, layer)
                for j, b in enumerate(got):
                    wk, wv, _ = block_data(b)
                    if not (torch.equal(k[j], wk[layer]) and torch.equal(v[j], wv[layer])):
                        problems.append(f"final: block {b} layer {layer} differs")
    return problems


def run_soak(path: str, seconds: float, *, readers: int = 4, seed: int = 0) -> dict:
    """Run the soak at `path` (a new store) for `seconds`; returns the counts and the problems found
    ("inconsistent: ...", "lost: ...", or a process's traceback). Empty problems: the soak passed."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "memory_store", __name__])
    acked, deleted_below = ctx.Value("q", 0), ctx.Value("q", 0)
    out = ctx.Queue()
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}  # (an S3 store's endpoint, credentials)
    procs = [ctx.Process(target=_writer, args=(path, seconds, seed, acked, deleted_below, out, env))]
    procs += [ctx.Process(target=_reader, args=(path, seconds, seed + 1 + i, acked, deleted_below, out, env))
              for i in range(readers)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    totals: dict = {"readers": readers}
    problems: list[str] = []
    for _ in procs:
        try:
            kind, counts, probs = out.get(timeout=seconds + 120)
        except queue.Empty:
            problems.append("a soak process sent nothing back")
            break
        for k, v in counts.items():
            totals[k] = totals.get(k, 0) + v
        problems += probs
    for p in procs:
        p.join(60)
        if p.exitcode != 0:
            problems.append(f"a soak process exited {p.exitcode}")
    totals["seconds"] = round(time.monotonic() - t0, 1)
    if not any(p.startswith("writer") for p in problems):
        problems += final_audit(path, acked.value, deleted_below.value)
    totals["acked_blocks"] = acked.value
    totals["inconsistencies"] = sum(1 for p in problems if not p.startswith("lost"))
    totals["lost"] = sum(1 for p in problems if p.startswith("lost"))
    totals["problems"] = problems
    return totals
