"""One writer at a time, many readers: the store's writer lock (memory_store/writer_lock.py).

Real processes race for the lock (children forked from a forkserver that imported torch
once, so a child costs milliseconds): exactly one writes, the other is refused at open and
leaves the store byte-identical to what the winner alone writes. A writer killed with
SIGKILL releases the lock; `wait_s` waits for it; readers never block or are blocked; a
second writer in the same process is refused too; a read-only directory is a clear error.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import math
import multiprocessing as mp
import os
import queue
import signal
import socket
import subprocess
import threading
import time
import traceback
import warnings
from pathlib import Path

import pytest
import torch
import zarr
from _store_helpers import LAYOUT, make_blocks

from memory_store import (DiskTier, InvalidArgumentError, LayoutMismatchError, NoWriterLockWarning, ReadOnlyError,
                          StoreConfig, StoreError, StoreLockedError, TieredStore, WriterLock)
from memory_store.writer_lock import LOCK_NAME, read_holder

N_RACES = 20  # the slow test runs 100
N_BLOCKS = 6  # per racing writer, in two flushes

# deterministic bytes (no write-behind thread deciding batch boundaries), no fsync, no faiss
RACE_CONFIG = StoreConfig(device="cpu", device_budget_bytes=2 * LAYOUT.block_bytes(),
                          host_budget_bytes=2 * LAYOUT.block_bytes(), write_behind=False, sync_mode="none",
                          save_index="never", index_backend="exact")
CFG = StoreConfig(device="cpu", device_budget_bytes=0, host_budget_bytes=0, sync_mode="none",
                  save_index="never", index_backend="exact")

_CTX = mp.get_context("forkserver")
_CTX.set_forkserver_preload(["torch", "memory_store", "_store_helpers", __name__])


# -- what a writer does (in a child, and in this process for the reference stores) -----------------
def write_stream(path: str, mode: str, stream: str, seed: int, store: TieredStore | None = None) -> None:
    """Open (unless given), put N_BLOCKS seeded blocks into `stream` in two flushes, close."""
    k, v, lm = make_blocks(N_BLOCKS, seed=seed)
    s = store if store is not None else TieredStore.open(path, mode, layout=LAYOUT, config=RACE_CONFIG)
    with s:
        half = N_BLOCKS // 2
        s.put_blocks(stream, k[:half], v[:half], lm[:half])
        s.flush()
        s.put_blocks(stream, k[half:], v[half:], lm[half:])


def _race_child(path: str, mode: str, stream: str, seed: int, barrier, go, out) -> None:
    try:
        barrier.wait(timeout=60)
        try:
            store = TieredStore.open(path, mode, layout=LAYOUT, config=RACE_CONFIG)
        except StoreLockedError as e:
            out.put(("locked", stream, os.getpid(), str(e), e.holder))
            return
        out.put(("opened", stream, os.getpid(), "", {}))
        go.wait(timeout=60)  # the parent lets the winner write once the loser has tried
        write_stream(path, mode, stream, seed, store)
        out.put(("done", stream, os.getpid(), "", {}))
    except BaseException:  # report everything: the parent fails the test on it
        out.put(("error", stream, os.getpid(), traceback.format_exc(), {}))


def _holding_child(path: str, hold_s: float, out) -> None:
    """Open for writing (write-behind on), commit N_BLOCKS blocks, report, hold the lock `hold_s`, close."""
    try:
        k, v, lm = make_blocks(N_BLOCKS, seed=7)
        store = TieredStore.open(path, "a", layout=LAYOUT, config=StoreConfig(device="cpu", sync_mode="none",
                                                                             index_backend="exact"))
        store.put_blocks("held", k, v, lm)
        store.flush()
        out.put(("ready", os.getpid()))
        time.sleep(hold_s)
        store.close()
        out.put(("closed", os.getpid()))
    except BaseException:
        out.put(("error", traceback.format_exc()))


def _reader_child(path: str, out) -> None:
    try:
        with TieredStore.open(path, "r", config=CFG) as r:
            out.put(("read", len(r)))
    except BaseException:
        out.put(("error", traceback.format_exc()))


def _get(out, timeout: float = 60.0):
    try:
        return out.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"no message from the child within {timeout} s") from None


# -- helpers ---------------------------------------------------------------------------------------
def tree(root: Path, *, skip: tuple[str, ...] = (LOCK_NAME,)) -> dict[str, bytes]:
    """{relative path: sha256} of every file under root (but `skip`)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).digest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in skip}


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root (the root too) with its mtime, size and content hash: any touch shows."""
    out = {}
    for p in [root, *sorted(root.rglob("*"))]:
        st = p.stat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
        out[str(p.relative_to(root))] = (st.st_mtime_ns, st.st_size, st.st_mode, digest)
    return out


def check_stream(path: Path, stream: str, seed: int, others: tuple[str, ...] = ()) -> None:
    k, v, _ = make_blocks(N_BLOCKS, seed=seed)
    with TieredStore.open(path, "r", config=CFG) as r:
        assert r.streams() == [*others, stream]
        ids = r.stream_blocks(stream)
        assert len(ids) == N_BLOCKS
        for layer in range(LAYOUT.n_layers):
            K, V = r.get_layer(ids, layer)
            assert torch.equal(K, k[:, layer]) and torch.equal(V, v[:, layer])


def run_races(tmp_path: Path, trials: int) -> dict[str, int]:
    """`trials` races of two writer processes; returns how often each child won. Odd trials race two
    creators of a missing store with mode "w", even ones two "a" writers (every third on an existing
    store). Asserts everything the module docstring promises."""
    refs: dict[tuple, dict[str, bytes]] = {}
    wins = {"s-a": 0, "s-b": 0}
    seeds = {"s-a": 11, "s-b": 12}
    for trial in range(trials):
        mode = "w" if trial % 2 else "a"
        existing = mode == "a" and trial % 3 == 0
        path = tmp_path / f"race{trial}"
        if existing:
            write_stream(str(path), "w", "base", 10)
        barrier, go, out = _CTX.Barrier(2), _CTX.Event(), _CTX.Queue()
        procs = [_CTX.Process(target=_race_child, args=(str(path), mode, s, seeds[s], barrier, go, out))
                 for s in ("s-a", "s-b")]
        for p in procs:
            p.start()
        first = [_get(out), _get(out)]
        go.set()
        msgs = first + [_get(out) for m in first if m[0] == "opened"]
        for p in procs:
            p.join(30)
            assert p.exitcode == 0, f"trial {trial}: child exit code {p.exitcode}"
        errors = [m for m in msgs if m[0] == "error"]
        assert not errors, f"trial {trial}: a child failed:\n{errors[0][3]}"
        kinds = sorted(m[0] for m in first)
        assert kinds == ["locked", "opened"], f"trial {trial} ({mode}): expected a writer and a refusal, got {kinds}"
        winner = next(m for m in first if m[0] == "opened")
        loser = next(m for m in first if m[0] == "locked")
        assert ("done", winner[1]) in [(m[0], m[1]) for m in msgs]
        wins[winner[1]] += 1
        # the refusal names the winner
        assert loser[4].get("pid") == winner[2] and f"pid {winner[2]}" in loser[3], loser[3]
        assert "wait_s=" in loser[3] and socket.gethostname() in loser[3]
        # the store is exactly what the winner alone leaves: the loser created and changed nothing
        key = (mode, existing, winner[1])
        if key not in refs:
            ref = tmp_path / f"ref-{mode}-{existing}-{winner[1]}"
            if existing:
                write_stream(str(ref), "w", "base", 10)
            write_stream(str(ref), mode, winner[1], seeds[winner[1]])
            refs[key] = tree(ref)
        got = tree(path)
        assert got == refs[key], (f"trial {trial}: files differ from the winner's alone: "
                                  f"{sorted(set(got) ^ set(refs[key]))} or their bytes")
        assert (path / LOCK_NAME).read_bytes() == b""  # released: the winner emptied its record
        check_stream(path, winner[1], seeds[winner[1]], others=("base",) if existing else ())
    return wins


# -- 1. two writer processes at once ------------------------------------------------------------------
def test_two_racing_writer_processes_one_writes_the_other_is_refused_untouched(tmp_path):
    wins = run_races(tmp_path, N_RACES)
    assert sum(wins.values()) == N_RACES


@pytest.mark.slow
def test_two_racing_writer_processes_many_times(tmp_path):
    wins = run_races(tmp_path, 100)
    assert min(wins.values()) > 0, f"one child always won ({wins}): the race was not a race"


def test_a_refused_writer_touches_nothing(tmp_path):
    path = tmp_path / "s"
    write_stream(str(path), "w", "doc", 1)
    holder = TieredStore.open(path, "a", config=CFG)
    before = snapshot(path)
    for mode, wait_s in (("a", 0.0), ("w", 0.0), ("a", 0.2)):
        with pytest.raises(StoreLockedError) as e:
            TieredStore.open(path, mode, layout=LAYOUT, config=CFG, wait_s=wait_s)
        assert e.value.path == str(path) and e.value.holder == holder.disk.writer_lock.holder()
        assert snapshot(path) == before, f"mode {mode!r}: the refused writer changed the store"
    with pytest.raises(StoreLockedError):
        DiskTier.open(path, "w", layout=LAYOUT)  # the tier alone is refused the same way
    assert snapshot(path) == before
    holder.close()
    check_stream(path, "doc", 1)


# -- 2. a killed writer ---------------------------------------------------------------------------------
def test_a_writer_killed_while_holding_the_lock_releases_it(tmp_path):
    path = tmp_path / "s"
    out = _CTX.Queue()
    p = _CTX.Process(target=_holding_child, args=(str(path), 600.0, out))
    p.start()
    msg = _get(out)
    assert msg[0] == "ready", msg
    assert read_holder(path)["pid"] == p.pid
    with pytest.raises(StoreLockedError):
        TieredStore.open(path, "a", config=CFG)
    os.kill(p.pid, signal.SIGKILL)
    p.join(30)
    assert p.exitcode == -signal.SIGKILL
    assert read_holder(path)["pid"] == p.pid  # the dead holder's record stays: informative only
    t0 = time.monotonic()
    with TieredStore.open(path, "a", config=CFG) as s:  # no wait_s: the kernel dropped the lock
        assert time.monotonic() - t0 < 2.0
        assert len(s) == N_BLOCKS and s.streams() == ["held"]  # what the killed writer committed
        assert read_holder(path)["pid"] == os.getpid()


# -- 3. wait_s ---------------------------------------------------------------------------------------------
def test_wait_s_gets_the_lock_once_the_holder_closes(tmp_path):
    path = tmp_path / "s"
    a = TieredStore.open(path, "w", layout=LAYOUT, config=CFG)
    k, v, lm = make_blocks(3, seed=2)
    a.put_blocks("doc", k, v, lm)
    got: dict = {}

    def second() -> None:
        t0 = time.monotonic()
        try:
            got["store"] = TieredStore.open(path, "a", config=CFG, wait_s=30)
        except StoreError as e:
            got["error"] = e
        got["waited"] = time.monotonic() - t0

    t = threading.Thread(target=second)
    t.start()
    time.sleep(0.4)
    assert "store" not in got and "error" not in got  # still waiting
    a.close()
    t.join(30)
    assert "error" not in got, got.get("error")
    assert 0.3 < got["waited"] < 5.0, got["waited"]
    with got["store"] as b:
        assert len(b) == 3  # everything the first writer committed on close


def test_wait_s_times_out_naming_the_holder(tmp_path):
    path = tmp_path / "s"
    with TieredStore.open(path, "w", layout=LAYOUT, config=CFG) as a:
        t0 = time.monotonic()
        with pytest.raises(StoreLockedError) as e:
            TieredStore.open(path, "a", config=CFG, wait_s=0.3)
        waited = time.monotonic() - t0
        assert 0.3 <= waited < 2.0, waited
        h = a.disk.writer_lock.holder()
        assert e.value.holder == h and h["pid"] == os.getpid() and h["host"] == socket.gethostname()
        msg = str(e.value)
        for part in (str(path), f"pid {os.getpid()}", h["host"], h["since"], "wait_s=", "0.3 s", "this process"):
            assert part in msg, f"{part!r} not in {msg!r}"


def test_wait_s_across_processes(tmp_path):
    path = tmp_path / "s"
    out = _CTX.Queue()
    p = _CTX.Process(target=_holding_child, args=(str(path), 0.5, out))
    p.start()
    assert _get(out)[0] == "ready"
    t0 = time.monotonic()
    with TieredStore.open(path, "a", config=CFG, wait_s=30) as s:
        assert time.monotonic() - t0 < 10
        assert len(s) == N_BLOCKS
    assert _get(out)[0] == "closed"
    p.join(30)
    assert p.exitcode == 0


@pytest.mark.parametrize("bad", [-1, math.nan, True, "1", None])
def test_wait_s_must_be_seconds(tmp_path, bad):
    with pytest.raises(InvalidArgumentError, match="wait_s"):
        TieredStore.open(tmp_path / "s", "w", layout=LAYOUT, config=CFG, wait_s=bad)
    assert not (tmp_path / "s").exists()


# -- 4. readers ---------------------------------------------------------------------------------------------
def test_readers_open_beside_a_writer_and_never_block_it(tmp_path):
    path = tmp_path / "s"
    k, v, lm = make_blocks(4, seed=3)
    w = TieredStore.open(path, "w", layout=LAYOUT, config=CFG)
    w.put_blocks("doc", k[:2], v[:2], lm[:2])
    w.flush()
    w.put_blocks("doc", k[2:], v[2:], lm[2:])  # not committed yet
    holder_before = (path / LOCK_NAME).read_bytes()
    readers = [TieredStore.open(path, "r", config=CFG, wait_s=0) for _ in range(3)]
    for r in readers:  # committed data only
        assert len(r) == 2
        K, V = r.get_layer([0, 1], 1)
        assert torch.equal(K, k[:2, 1]) and torch.equal(V, v[:2, 1])
    out = _CTX.Queue()  # a reader in another process too (it takes no lock, so it opens at once)
    p = _CTX.Process(target=_reader_child, args=(str(path), out))
    p.start()
    assert _get(out) == ("read", 2)
    p.join(30)
    assert (path / LOCK_NAME).read_bytes() == holder_before  # readers left the lock file alone
    w.close()
    # a writer opens while readers are open; they keep their snapshot
    with TieredStore.open(path, "a", config=CFG) as w2:
        assert len(w2) == 4
        w2.put_blocks("more", k[:1], v[:1], lm[:1])
    for r in readers:
        assert len(r) == 2
        r.close()
    with TieredStore.open(path, "r", config=CFG) as r:
        assert len(r) == 5


def test_a_reader_never_creates_the_lock_file(tmp_path):
    path = tmp_path / "s"
    write_stream(str(path), "w", "doc", 4)
    (path / LOCK_NAME).unlink()  # (a store written before the lock existed)
    with TieredStore.open(path, "r", config=CFG) as r:
        assert len(r) == N_BLOCKS
    assert not (path / LOCK_NAME).exists()


# -- 5. one process ---------------------------------------------------------------------------------------------
def test_same_process_reopen_after_close_and_a_second_open_is_refused(tmp_path):
    path = tmp_path / "s"
    k, v, lm = make_blocks(2, seed=5)
    for mode in ("w", "a", "a", "w", "a"):
        with TieredStore.open(path, mode, layout=LAYOUT, config=CFG) as s:
            s.put_blocks("doc", k, v, lm)
    first = TieredStore.open(path, "a", config=CFG)
    with pytest.raises(StoreLockedError, match="this process"):  # a second fd of the same file conflicts
        TieredStore.open(path, "a", config=CFG)
    with pytest.raises(StoreLockedError):
        TieredStore.open(zarr.storage.LocalStore(path), "w", layout=LAYOUT, config=CFG)  # same directory
    first.put_blocks("doc", k, v, lm)  # the holder is unaffected by the refusals
    first.close()
    first.close()  # idempotent
    with TieredStore.open(path, "a", config=CFG) as s:
        assert len(s) == 6  # ("w" replaced the store twice)


def test_a_failed_open_releases_the_lock(tmp_path):
    path = tmp_path / "s"
    write_stream(str(path), "w", "doc", 6)
    with pytest.raises(LayoutMismatchError):  # raised after the lock was taken
        TieredStore.open(path, "a", layout=dataclasses.replace(LAYOUT, n_layers=3), config=CFG)
    with TieredStore.open(path, "a", config=CFG) as s:
        assert len(s) == N_BLOCKS


def test_a_store_collected_without_close_releases_the_lock(tmp_path):
    path = tmp_path / "s"
    s = TieredStore.open(path, "w", layout=LAYOUT, config=StoreConfig(device="cpu", write_behind=False,
                                                                     sync_mode="none", index_backend="exact"))
    with pytest.raises(StoreLockedError):
        TieredStore.open(path, "a", config=CFG)
    del s
    gc.collect()
    TieredStore.open(path, "a", config=CFG).close()
    lock = WriterLock.acquire(path)
    del lock  # the lock object alone, too
    WriterLock.acquire(path).release()


def test_a_forked_child_never_releases_its_parents_lock(tmp_path):
    lock = WriterLock.acquire(tmp_path / "s")
    pid = os.fork()
    if pid == 0:  # the child: drop its inherited copy both ways, then leave without cleanup
        code = 0
        try:
            lock.release()
            del lock
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    with pytest.raises(StoreLockedError):
        WriterLock.acquire(tmp_path / "s")
    lock.release()
    WriterLock.acquire(tmp_path / "s").release()


# -- 6. a directory that cannot be written ----------------------------------------------------------------------
def _make_read_only(path: Path) -> None:
    """chmod a-w; as root (which ignores modes) set the immutable attribute instead, or skip."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        return
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("running as root, and chattr +i is not available here: cannot make a read-only directory")


def _make_writable(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    path.chmod(0o755)


def test_a_read_only_store_directory_is_a_clear_error(tmp_path):
    path = tmp_path / "s"
    write_stream(str(path), "w", "doc", 8)
    _make_read_only(path)
    try:
        before = snapshot(path)
        for mode in ("a", "w"):
            with pytest.raises(ReadOnlyError, match="mode 'r'") as e:
                TieredStore.open(path, mode, layout=LAYOUT, config=CFG)
            assert str(path) in str(e.value)
        assert snapshot(path) == before
        check_stream(path, "doc", 8)  # reading works
        _make_writable(path)
        _make_read_only(tmp_path)
        with pytest.raises(ReadOnlyError):  # a new store under a read-only directory
            TieredStore.open(tmp_path / "new", "a", layout=LAYOUT, config=CFG)
    finally:
        _make_writable(tmp_path)
        _make_writable(path)


# -- non-local stores ----------------------------------------------------------------------------------------------
def test_a_non_local_store_opens_without_a_lock_and_says_so():
    mem = zarr.storage.MemoryStore()
    k, v, lm = make_blocks(2, seed=9)
    with pytest.warns(NoWriterLockWarning, match="no writer lock"):
        a = TieredStore.open(mem, "w", layout=LAYOUT, config=CFG)
    assert a.disk.writer_lock is None
    a.put_blocks("doc", k, v, lm)
    a.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoWriterLockWarning)  # a reader is not warned
        with TieredStore.open(mem, "r", config=CFG) as r:
            assert len(r) == 2
