"""Every fault survived, injected on purpose (memory_store/testing: the injector, the crash runner, the oracle).

Crash sweeps: a scripted writer (puts, stream meta, delete_stream, flushes, close with the index
save) runs in a child process; a dry run numbers every write, sync and rename it makes, then one
child per number dies there (os._exit just before the call; "torn": half-way through a write).
After each death the store must show exactly the commit in place at that moment (the last
acknowledged flush, or the one whose rename had just landed), bit-exact against a dict oracle, and
a next writer must continue: put, flush, reopen, read everything back, no temp files left.

Disk errors: ENOSPC and EIO at each call of a put, of the background writer and of a flush must
reach the caller as a StoreIOError naming the error; the store stays readable at its last commit
from another handle; once the fault is gone ("space freed") a retried flush commits everything
acknowledged. Real file systems too, where root may mount them: a full tmpfs, a read-only remount,
a missing permission (a child that drops to nobody), a store directory deleted under its reader.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import replace

import _fault_children
import pytest
import torch
from _store_helpers import LAYOUT

from memory_store import StoreConfig, TieredStore
from memory_store.errors import ClosedError, ReadOnlyError, StoreIOError, StoreNotFoundError
from memory_store.testing import (Call, CrashRunner, Fault, FaultInjector, Oracle, StoreState, block_data, check_state,
                                  commits_before, run_script, unsynced_at_commits)

CFG = StoreConfig(device_budget_bytes=4 * LAYOUT.block_bytes(), host_budget_bytes=4 * LAYOUT.block_bytes(),
                  device="cpu", shard_rows=8, sync_mode="syncfs")
FAST = replace(CFG, sync_mode="none")  # for the set-up and the writer that continues after a crash

# the base commit: 40 blocks in shards 0-4 (shard_rows=8), capacity 64
BASE = [("put", "base", 40), ("meta", "base", {"v": 0}), ("close",)]
# alpha fills shards 5 and 6 alone, so deleting it removes their files after the second commit; beta
# and gamma grow the arrays past 64 rows; close saves the index and drops the old one
SCRIPT = [("put", "alpha", 16), ("meta", "alpha", {"step": 1}), ("flush",),
          ("put", "beta", 2), ("delete", "alpha"), ("put", "gamma", 8), ("meta", "beta", {"step": 2}), ("flush",),
          ("close",)]
START = Oracle(BASE).final
_UUID = re.compile(r"[0-9a-f]{32}")
TEMP_SUFFIXES = (".tmp", ".partial")


@pytest.fixture(scope="module")
def runner() -> CrashRunner:
    return CrashRunner(preload=["memory_store.testing.workload", "_fault_children"])


def make_base(where: str, cfg: StoreConfig) -> str:
    run_script(where, BASE, LAYOUT, replace(cfg, sync_mode="none"))
    return where


def temp_files(root: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
                  if f.endswith(TEMP_SUFFIXES))


def continue_and_check(path: str, state: StoreState, what: str) -> list[str]:
    """A next writer opens what the crash left, sees `state`, appends, flushes; a reader then sees it all.
    Returns the temp files left behind (none expected)."""
    with TieredStore.open(path, "a", config=FAST) as s:
        check_state(s, state, LAYOUT, f"{what}, the next writer")
        run_more = [("put", "after", 3), ("flush",)]
        for step in run_more:
            if step[0] == "put":
                s.put_blocks("after", *block_data(LAYOUT, range(state.n_rows, state.n_rows + 3)))
            else:
                s.flush()
    with TieredStore.open(path, "r", config=FAST) as s:
        check_state(s, Oracle(run_more, state).final, LAYOUT, f"{what}, after the next writer")
    return [f"{what}: {f}" for f in temp_files(path)]


def _same_call(a, b) -> bool:
    def norm(c):  # (temp files have random names)
        return (c.kind, c.op, c.step, _UUID.sub("*", c.target))
    return norm(a) == norm(b)


def crash_sweep(runner: CrashRunner, tmp, cfg: StoreConfig, script=SCRIPT, action: str = "exit",
                kinds: tuple[str, ...] | None = None) -> collections.Counter:
    """Kill the scripted writer at every call (of `kinds`) of a dry run; check each outcome.
    Returns the crash points tried per protocol step."""
    base = make_base(str(tmp / "base"), cfg)
    oracle = Oracle(script, START)
    # every run uses the same path: fsync mode syncs a set of paths, whose order follows their hashes
    trial = str(tmp / "trial")
    shutil.copytree(base, trial)
    dry = runner.run(run_script, (trial, script, LAYOUT, cfg), trace=True)
    assert dry.exitcode == 0 and dry.error is None, dry.error
    assert dry.acks == list(range(len(oracle.acks)))
    with TieredStore.open(trial, "r", config=FAST) as s:
        check_state(s, oracle.final, LAYOUT, "dry run")
    lost = unsynced_at_commits(dry.trace, trial)  # the order of syncs a power cut needs
    assert not lost, lost
    os.rename(trial, f"{trial}-dry")
    points = [c for c in dry.trace if kinds is None or c.kind in kinds]
    per_step: collections.Counter = collections.Counter()
    litter: list[str] = []
    for call in points:
        what = f"{action} at {call.describe(trial)}"
        shutil.copytree(base, trial)
        res = runner.run(run_script, (trial, script, LAYOUT, cfg), faults=[Fault(call.n, action=action)])
        assert res.crashed, f"{what}: the child did not die there (exit {res.exitcode}): {res.error}"
        assert res.died is not None and _same_call(res.died, call), \
            f"{what}: the child died at {res.died and res.died.describe(trial)} (the workload is not deterministic)"
        done = commits_before(dry.trace, call.n)  # commits whose rename had happened
        acked = oracle.acks[res.acks[-1]] if res.acks else 0
        assert acked <= done <= acked + 1, f"{what}: {done} commits landed but {acked} were acknowledged"
        with TieredStore.open(trial, "r", config=FAST) as s:
            check_state(s, oracle.commits[done], LAYOUT, what)
        litter += continue_and_check(trial, oracle.commits[done], what)
        os.rename(trial, f"{trial}-{call.n}")  # (out of the way: cheaper than deleting, on a busy disk)
        per_step[call.step] += 1
    print(f"\ncrash sweep ({action}, sync_mode={cfg.sync_mode}, shard_rows={cfg.shard_rows}, "
          f"write_behind={cfg.write_behind}): {sum(per_step.values())} crash points: {dict(per_step)}")
    assert not litter, f"{len(litter)} crash points left temp files after the next writer: {litter[:5]}"
    return per_step


def test_crash_at_every_call_of_the_commit_protocol(runner, tmp_path):
    per_step = crash_sweep(runner, tmp_path, CFG)
    for step in ("write rows", "row metadata", "grow arrays", "seal shards", "sync", "commit record",
                 "delete rows", "index save"):
        assert per_step[step] > 0, f"no crash point in step {step!r}: {dict(per_step)}"


SLOW_SWEEPS = {
    "torn writes": (CFG, "torn", ("write",)),
    "fsync mode": (replace(CFG, sync_mode="fsync"), "exit", None),
    "one file per chunk": (replace(CFG, shard_rows=None), "exit", None),
    "one file per chunk, torn": (replace(CFG, shard_rows=None), "torn", ("write",)),
    "no write-behind, index saved every flush": (replace(CFG, write_behind=False, save_index="flush"), "exit", None),
    "lazy writes": (replace(CFG, lazy_writes=True), "exit", None),
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(SLOW_SWEEPS))
def test_crash_sweep_variants(runner, tmp_path, variant):
    cfg, action, kinds = SLOW_SWEEPS[variant]
    per_step = crash_sweep(runner, tmp_path, cfg, action=action, kinds=kinds)
    assert sum(per_step.values()) > 20, f"{variant}: only {dict(per_step)} crash points"


# -- disk errors in this process: ENOSPC and EIO at each call of a put, the background writer, a flush ------

MORE = 6  # blocks 40-45: the put the faults hit (shard 5, a new file)
AFTER = Oracle([("put", "more", MORE), ("flush",)], START).final
AFTER_DELETE = Oracle([("delete", "base"), ("put", "more", MORE), ("flush",)], START).final
ERRNOS = (errno.ENOSPC, errno.EIO)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return make_base(str(tmp_path_factory.mktemp("fault-base") / "base"), CFG)


def fresh(base: str, tmp, name: str = "s") -> str:
    """A copy of the base store at tmp/name (a previous one is moved aside: cheaper than deleting it)."""
    path = str(tmp / name)
    if os.path.exists(path):
        os.rename(path, f"{path}-{len(os.listdir(tmp))}")
    shutil.copytree(base, path)
    return path


def put_more(store: TieredStore, stream: str = "more", n: int = MORE, first: int = 40) -> None:
    store.put_blocks(stream, *block_data(LAYOUT, range(first, first + n)))


def generation_on_disk(path: str) -> int:
    with open(os.path.join(path, "commit.json")) as f:
        return json.load(f)["generation"]


def reader_sees(path: str, state: StoreState, what: str) -> None:
    """Another handle (read-only) sees exactly `state`."""
    with TieredStore.open(path, "r", config=FAST) as r:
        check_state(r, state, LAYOUT, what)


def wait_until(cond, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def traced(base: str, tmp, cfg: StoreConfig, before, op) -> tuple[list[Call], int]:
    """The mutating calls `before(store)` then `op(store)` make on a copy of the base, and how many
    of them are before's."""
    path = fresh(base, tmp, "dry")
    store = TieredStore.open(path, "a", config=cfg)
    try:
        with FaultInjector(trace=True) as inj:
            before(store)
            n_before = inj.count
            op(store)
        return inj.calls, n_before
    finally:
        store.close()


def assert_io_error(e: BaseException, err: int, *words: str) -> None:
    assert isinstance(e, StoreIOError) and isinstance(e, OSError), f"{type(e).__name__}: {e}"
    assert e.errno == err and errno.errorcode[err] in str(e), f"expected {errno.errorcode[err]} in: {e}"
    for w in words:
        assert w in str(e), f"expected {w!r} in: {e}"


@pytest.mark.parametrize("err", ERRNOS, ids=errno.errorcode.get)
def test_disk_error_during_put_stores_nothing_and_a_retry_succeeds(base, tmp_path, err):
    cfg = replace(CFG, write_behind=False)  # the put writes its chunks itself
    calls, _ = traced(base, tmp_path, cfg, lambda s: None, put_more)
    assert {c.kind for c in calls} >= {"open", "write"}, calls
    for call in calls:
        what = f"{errno.errorcode[err]} at {call.describe()}"
        path = fresh(base, tmp_path)
        with TieredStore.open(path, "a", config=cfg) as s:
            with FaultInjector([Fault.at(call, calls, errno=err, sticky=True)]) as inj:
                with pytest.raises(StoreIOError) as e:
                    put_more(s)
                assert_io_error(e.value, err, "writing blocks 40-45")
                check_state(s, START, LAYOUT, f"{what}: the writer")
                reader_sees(path, START, what)
                inj.clear()  # space freed
                put_more(s)
                s.flush()
        reader_sees(path, AFTER, f"{what}, retried")
        assert not temp_files(path)
    print(f"\nput faults ({errno.errorcode[err]}): {len(calls)} calls faulted")


@pytest.mark.parametrize("seen_by", ["put", "flush", "close"])
@pytest.mark.parametrize("err", ERRNOS, ids=errno.errorcode.get)
def test_disk_error_in_background_writer_reaches_the_next_call(base, tmp_path, err, seen_by):
    def put_and_drain(s: TieredStore) -> None:
        put_more(s)
        wait_until(lambda: s.stats()["queued_write_bytes"] == 0, "the writer")

    calls, _ = traced(base, tmp_path, CFG, lambda s: None, put_and_drain)
    assert calls and all(c.step in ("write rows", "grow arrays") for c in calls), calls
    for call in calls:
        what = f"{errno.errorcode[err]} at {call.describe()}, seen by {seen_by}"
        path = fresh(base, tmp_path)
        s = TieredStore.open(path, "a", config=CFG)
        with FaultInjector([Fault.at(call, calls, errno=err, sticky=True)]) as inj:
            put_more(s)  # acknowledged: the writer fails after it returned
            wait_until(lambda: s.background_error is not None, "the writer's failure")
            with pytest.raises(StoreIOError) as e:
                if seen_by == "put":
                    put_more(s, "extra", 2, first=46)  # refused: stores nothing
                else:
                    getattr(s, seen_by)()
            assert_io_error(e.value, err, "background writer", "blocks 40-45")
            reader_sees(path, START, what)
            inj.clear()
            if seen_by == "close":  # closed without committing: a next writer continues from the last commit
                with pytest.raises(ClosedError):
                    s.flush()
                s = TieredStore.open(path, "a", config=CFG)
                check_state(s, START, LAYOUT, f"{what}: the next writer")
                put_more(s)
            s.flush()  # the retry: the writer writes its queue again
            check_state(s, AFTER, LAYOUT, f"{what}: the writer, retried")
            s.close()
        reader_sees(path, AFTER, f"{what}, retried")
        assert not temp_files(path)
    print(f"\nbackground writer faults ({errno.errorcode[err]}, raised by {seen_by}): {len(calls)} calls faulted")


FLUSH_CASES = {"put": (lambda s: put_more(s), AFTER),
               "delete and put": (lambda s: (s.delete_stream("base"), put_more(s)), AFTER_DELETE)}


def flush_fault_sweep(base: str, tmp_path, cfg: StoreConfig, before: str, err: int) -> int:
    """ENOSPC/EIO at each call of one flush (make_durable, commit, delete rows, index save)."""
    pre, expect = FLUSH_CASES[before]
    cfg = replace(cfg, write_behind=False, save_index="flush")  # the flush's own calls only; the index too
    calls, n_pre = traced(base, tmp_path, cfg, pre, lambda s: s.flush())
    for call in calls[n_pre:]:
        what = f"{errno.errorcode[err]} at {call.describe()} ({before}, sync_mode={cfg.sync_mode})"
        path = fresh(base, tmp_path)
        s = TieredStore.open(path, "a", config=cfg)
        with FaultInjector([Fault.at(call, calls, errno=err, sticky=True)], trace=True) as inj:
            pre(s)
            with pytest.raises(StoreIOError) as e:
                s.flush()
            assert_io_error(e.value, err, "flush")
            landed = commits_before(calls, call.n) > 0  # the fault came after the commit's rename
            reader_sees(path, expect if landed else START, what)
            failed_generation = generation_on_disk(path)
            inj.clear()
            if call.step == "sync":  # a failed data sync is never retried (see DiskTier.make_durable)
                with pytest.raises(StoreIOError, match="earlier sync"):
                    s.flush()
                with pytest.raises(StoreIOError, match="earlier sync"):
                    s.close()
                s = TieredStore.open(path, "a", config=cfg)
                check_state(s, START, LAYOUT, f"{what}: the next writer")
                pre(s)
            s.flush()
            check_state(s, expect, LAYOUT, f"{what}: the writer, retried")
            if landed and call.step == "commit record":  # landed, yet its flush failed: committed again,
                assert generation_on_disk(path) > failed_generation, f"{what}: generation reused"  # under a new number
            s.close()
        reader_sees(path, expect, f"{what}, retried")
        assert not temp_files(path), f"{what}: {temp_files(path)}"
        lost = unsynced_at_commits(inj.calls, path)  # what a power cut after the retry would lose
        assert not lost, f"{what}: {lost}"
    return len(calls) - n_pre


FLUSH_MATRIX = [(mode, before, err) for mode in ("syncfs", "fsync") for before in FLUSH_CASES for err in ERRNOS]
FLUSH_DEFAULT = [("syncfs", "put", errno.EIO), ("syncfs", "delete and put", errno.ENOSPC)]


def _flush_id(case) -> str:
    return f"{case[0]}-{case[1].replace(' ', '_')}-{errno.errorcode[case[2]]}"


@pytest.mark.parametrize("case", [pytest.param(c, marks=() if c in FLUSH_DEFAULT else pytest.mark.slow)
                                  for c in FLUSH_MATRIX], ids=_flush_id)
def test_disk_error_during_flush_keeps_the_last_commit_and_a_retry_commits(base, tmp_path, case):
    mode, before, err = case
    n = flush_fault_sweep(base, tmp_path, replace(CFG, sync_mode=mode), before, err)
    print(f"\nflush faults ({_flush_id(case)}): {n} calls faulted")
    assert n > 20, f"only {n} calls in a flush with its index save"


# -- real file systems: a full tmpfs, a read-only remount, immutable files, another user, a deleted store ------

def _root_can(cmd: list[str]) -> str | None:
    """None when `cmd` (as root) ran, else why it could not."""
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which(cmd[0]) is None:
        return f"no {cmd[0]} here"
    r = subprocess.run(cmd, capture_output=True, text=True)
    return None if r.returncode == 0 else f"{' '.join(cmd)} failed: {r.stderr.strip()}"


@contextlib.contextmanager
def tmpfs(where: str, size: str):
    os.makedirs(where)
    why = _root_can(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", where])
    if why:
        pytest.skip(f"cannot mount a tmpfs: {why}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", where], check=False)


def fill(mnt: str) -> str:
    """Fill the file system at `mnt` with a ballast file; returns its path."""
    ballast = os.path.join(mnt, "ballast")
    with open(ballast, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    return ballast


def test_real_full_disk_then_space_freed(tmp_path):
    with tmpfs(str(tmp_path / "mnt"), "512k") as mnt:
        path = make_base(os.path.join(mnt, "s"), CFG)
        ballast = fill(mnt)
        s = TieredStore.open(path, "a", config=CFG)
        steps: list = []
        err = None
        for i in range(64):  # until the full disk shows: at a put (the writer's failure) or a flush
            step = ("put", f"p{i}", 8)
            try:
                s.put_blocks(step[1], *block_data(LAYOUT, range(40 + 8 * i, 48 + 8 * i)))
                steps.append(step)
                s.flush()
                steps.append(("flush",))
            except StoreIOError as e:
                err = e
                break
        assert err is not None, "the full disk never showed"
        assert_io_error(err, errno.ENOSPC)
        acked = Oracle(steps + [("flush",)], START)
        reader_sees(path, acked.commits[acked.acks[-2]] if len(acked.acks) > 1 else START, "full disk")
        os.unlink(ballast)  # space freed
        s.flush()
        check_state(s, acked.final, LAYOUT, "space freed: the writer")
        s.close()
        reader_sees(path, acked.final, "space freed")
        assert not temp_files(path)


def test_read_only_file_system(tmp_path):
    with tmpfs(str(tmp_path / "mnt"), "4m") as mnt:
        path = make_base(os.path.join(mnt, "s"), CFG)
        why = _root_can(["mount", "-o", "remount,ro", mnt])
        if why:
            pytest.skip(why)
        with pytest.raises(ReadOnlyError, match="cannot be opened for writing.*Read-only file system"):
            TieredStore.open(path, "a", config=CFG)
        with pytest.raises(ReadOnlyError, match="Read-only file system"):
            TieredStore.open(os.path.join(mnt, "new"), "a", layout=LAYOUT, config=CFG)
        reader_sees(path, START, "read-only file system")
        subprocess.run(["mount", "-o", "remount,rw", mnt], check=True)
        with TieredStore.open(path, "a", config=CFG) as s:
            put_more(s)
        reader_sees(path, AFTER, "remounted read-write")


def test_files_made_immutable_under_an_open_writer(tmp_path):
    path = make_base(str(tmp_path / "s"), CFG)
    s = TieredStore.open(path, "a", config=CFG)
    why = _root_can(["chattr", "-R", "+i", path])
    try:
        if why:
            pytest.skip(why)
        put_more(s)
        with pytest.raises(StoreIOError) as e:
            s.flush()
        assert_io_error(e.value, errno.EPERM, "background writer")
        reader_sees(path, START, "immutable")
    finally:
        subprocess.run(["chattr", "-R", "-i", path], check=False)
    s.flush()  # writable again: the retry commits
    s.close()
    reader_sees(path, AFTER, "mutable again")


def test_another_user_without_write_permission(runner, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root (to run a child as nobody)")
    top = tempfile.mkdtemp(prefix="folio-perm-", dir="/tmp")  # (tmp_path's parents are root-only)
    try:
        os.chmod(top, 0o755)
        path = make_base(os.path.join(top, "s"), CFG)

        def as_nobody() -> dict:
            res = runner.run(_fault_children.as_nobody, (path, 40))
            assert res.exitcode == 0, res.error
            return {k: v for a in res.acks for k, v in a.items()}

        got = as_nobody()
        assert "ReadOnlyError" in got["write"]["error"] and "Permission denied" in got["write"]["message"], got
        assert got["read"] == {"ok": 40}, got
        for what, target in [("a shard", "kv/c.1.0.0.0.0.0"), ("the kv directory", "kv"),
                             ("the commit record", "commit.json"), ("the group metadata", "zarr.json"),
                             ("the row metadata", "block_stream/c.0")]:
            full = os.path.join(path, target)
            mode = os.stat(full).st_mode
            os.chmod(full, 0o700 if os.path.isdir(full) else 0o600)
            try:
                got = as_nobody()["read"]
            finally:
                os.chmod(full, mode)
            assert "error" in got, f"{what} unreadable, yet the read succeeded: {got}"
            assert "StoreError" in got["error"], f"{what} unreadable: an untyped error {got}"
            assert "Permission denied" in got["message"] and target.split("/")[-1] in got["message"], got
    finally:
        shutil.rmtree(top)


def test_store_deleted_under_its_reader_and_writer(tmp_path):
    path = make_base(str(tmp_path / "s"), CFG)
    k, v, _ = block_data(LAYOUT, range(40))
    r = TieredStore.open(path, "r", config=FAST)
    w = TieredStore.open(path, "a", config=CFG)
    r.get_layer([0], 0)  # shard 0 is open now: its data stays readable (POSIX keeps the unlinked inode)
    shutil.rmtree(path)
    gk, _ = r.get_layer([1], 1)
    assert torch.equal(gk, k[[1], 1])
    with pytest.raises(StoreNotFoundError, match="deleted"):
        r.get_layer([30], 0)  # shard 3 was never opened
    r.close()
    with pytest.raises(StoreNotFoundError):
        TieredStore.open(path, "r", config=FAST)
    put_more(w)
    with pytest.raises(StoreNotFoundError, match="deleted"):
        w.flush()
    assert not os.path.exists(path), f"the writer recreated the deleted store: {os.listdir(path)}"
    with pytest.raises(StoreNotFoundError):
        w.close()
    assert not os.path.exists(path), f"the writer recreated the deleted store: {os.listdir(path)}"


def test_a_reader_of_a_stream_the_writer_deleted_is_told_so(tmp_path):
    from _store_helpers import make_blocks

    from memory_store.errors import CorruptBlockError, StreamDeletedError
    cfg = StoreConfig(device="cpu", device_budget_bytes=0, host_budget_bytes=0, save_index="never",
                      index_backend="exact", sync_mode="none", shard_rows=2)
    path = tmp_path / "s"
    k, v, lm = make_blocks(6, seed=4)
    with TieredStore.open(path, "w", layout=LAYOUT, config=cfg) as w:
        w.put_blocks("old", k[:4], v[:4], lm[:4])  # rows 0-3: shards 0 and 1, whole
        w.put_blocks("new", k[4:], v[4:], lm[4:])
    r = TieredStore.open(path, "r", config=cfg)
    opened = r.generation
    with TieredStore.open(path, "a", config=cfg) as w:
        w.delete_stream("old")
        w.flush()  # committed, then the chunks go: shards 0 and 1 are removed whole
    with pytest.raises(StreamDeletedError, match=r"stream\(s\) \['old'\].*deleted it after this store was opened "
                                                 rf"at generation {opened}.*reopen") as e:
        r.get_layer([0, 1], 0)
    assert e.value.streams == ["old"] and e.value.current > e.value.opened == opened
    K, _ = r.get_layer([4, 5], 1)  # the other stream still reads
    assert torch.equal(K, k[4:, 1])
    r.close()
    # chunks missing for a stream that is alive: the store is damaged, and says so
    with TieredStore.open(path, "r", config=cfg) as r2:
        for f in (path / "kv").iterdir():
            if f.name.startswith("c.2."):
                f.unlink()
        with pytest.raises(CorruptBlockError, match=r"stream\(s\) \['new'\].*damaged"):
            r2.get_layer([4], 0)


# -- the seam: every file memory_store writes goes through the names the injector replaces ------------------

_MUTATING_OS = {"open", "write", "writev", "pwrite", "pwritev", "fsync", "fdatasync", "replace", "rename", "unlink",
                "remove", "rmdir", "truncate", "ftruncate", "makedirs", "mkdir", "link", "symlink", "removedirs"}


def test_the_seam_covers_every_file_write():
    """Outside SEAM_MODULES no memory_store module calls a mutating os/shutil function or opens a file
    for writing, and none imports such a function by name (which the injector could not replace)."""
    import ast

    import memory_store
    from memory_store.testing.faults import SEAM_MODULES
    root = os.path.dirname(memory_store.__file__)
    offenders = []
    for name in sorted(os.listdir(root)):
        if not name.endswith(".py"):
            continue
        module = f"memory_store.{name[:-3]}"
        tree = ast.parse(open(os.path.join(root, name)).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in ("os", "shutil"):
                offenders.append(f"{module}:{node.lineno} imports from {node.module} by name")
            if not isinstance(node, ast.Call) or module in SEAM_MODULES:
                continue
            f = node.func
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and (
                    (f.value.id == "os" and f.attr in _MUTATING_OS) or f.value.id == "shutil"):
                offenders.append(f"{module}:{node.lineno} calls {f.value.id}.{f.attr}")
            if isinstance(f, ast.Name) and f.id == "open":
                modes = [a.value for a in node.args[1:2] + [k.value for k in node.keywords if k.arg == "mode"]
                         if isinstance(a, ast.Constant)]
                if not modes or any(c in modes[0] for c in "wax+"):
                    offenders.append(f"{module}:{node.lineno} opens a file for writing")
            if isinstance(f, ast.Attribute) and f.attr in ("write_bytes", "write_text"):
                offenders.append(f"{module}:{node.lineno} calls .{f.attr}() (a pathlib write?)")
    assert not offenders, "file writes outside the fault-injection seam:\n" + "\n".join(offenders)
