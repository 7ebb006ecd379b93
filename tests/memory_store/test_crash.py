"""Crash safety and concurrent readers, with real processes.

Crash: a writer child appends and flushes in a loop, printing each acknowledged flush; it is
killed with SIGKILL at a random moment, then the store is reopened and every acknowledged block
must be there bit-exact, and nothing beyond the commit (no partial block) may be visible. The
same store is reused across trials, so each trial also checks that a writer can reopen after a
crash and continue. Concurrency: reader processes open read-only while a writer appends; each
must see a consistent state as of some flush.
"""

from __future__ import annotations

import os
import signal

import pytest

from memory_store.testing.sigkill import Zygote, check, run_crash_trials

N_TRIALS = 24


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


def test_sigkill_writer_loses_nothing_acknowledged(zygote, tmp_path):
    results = run_crash_trials(zygote, str(tmp_path / "crash"), N_TRIALS, seed=1)
    assert len(results) == N_TRIALS
    assert results[-1][1] > 0, "no flush ever completed: the kills came too early to test anything"


def test_readers_see_consistent_state_while_writer_appends(zygote, tmp_path):
    path = str(tmp_path / "conc")
    writer = zygote.fork(f"writer {path} 2")
    zygote.expect(f"ACK {writer} ")  # the store exists before readers open it
    readers = [zygote.fork(f"reader {path} 6") for _ in range(3)]
    seen: dict[int, list[int]] = {r: [] for r in readers}
    for r in readers:
        zygote.expect(f"END {r}", timeout=120)
    os.kill(writer, signal.SIGKILL)
    zygote.reap(writer)
    for r in readers:
        zygote.reap(r)
    lines = zygote.drain()
    errors = [line for line in lines if line.startswith("ERR")]
    assert not errors, errors[0]
    for line in lines:
        if line.startswith("READ "):
            _, pid, n = line.split()
            seen[int(pid)].append(int(n))
    final = check(path)
    for r, ns in seen.items():
        assert len(ns) == 6 and ns == sorted(ns) and ns[-1] <= final, (r, ns, final)
    assert any(len(set(ns)) > 1 for ns in seen.values()), "readers never overlapped with an append"
