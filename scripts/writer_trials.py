"""Two `folio ingest` commands into one store at once, many times: one writes, the other is refused.

    python scripts/writer_trials.py [--trials 100] [--keep DIR]

Each trial forks two writers from a forkserver that imported torch and the CLI once, so a
trial costs a fraction of a second, not two interpreter starts. Both run the real command
(`train.cli.main(["ingest", ...])`, random:tiny model) into one store, started together behind
a barrier. A hook in the child (here, not in folio) reports each writer's open and holds the
winner until the other writer has tried, so every trial is a real contest. Checked each trial:

- exactly one writer exits 0; the other exits 2 with a one-line message (no traceback) naming the
  winner's pid and host, before touching anything: the store's files are those the winner alone
  leaves (the writer lock's own file aside);
- every block the winner flushed reads back bit-exact (against the same ingest into a fresh
  store), and what was there before (every third trial starts from a store holding a stream) too;
- a writer killed with SIGKILL while holding the lock releases it: the next writer opens at once
  (wait_s=0) and sees everything committed.

Exits 1 at the first violated trial, printing what was wrong. tests/memory_store/test_writer_trials.py
runs a few trials in the suite.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import multiprocessing as mp
import os
import queue
import signal
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

MODEL = "random:tiny:7"
LOCK_NAME = "writer.lock"
DOC = {"s-a": "The first writer's document. " * 40, "s-b": "A second, different document! " * 40,
       "base": "What the store held before the race. " * 30}


def _ctx():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "train.cli", "engine.inference", "memory_store", "writer_trials"])
    return ctx


def _ingest_argv(store: str, stream: str, doc: Path) -> list[str]:
    return ["ingest", "--model", MODEL, "--store", store, "--stream", stream, "--no-progress", "--flush-interval", "1000", str(doc)]


def _writer_child(store: str, stream: str, doc: str, barrier, go, out, hold: bool) -> None:
    """One `folio ingest`, reporting its open ("opened" / "locked") and its exit code and stderr."""
    try:
        import engine.inference as inference
        from memory_store import StoreLockedError
        from train.cli import main

        real_open = inference.open_store

        def reporting_open(*args, **kwargs):
            try:
                s = real_open(*args, **kwargs)
            except StoreLockedError:
                out.put(("locked", stream, os.getpid()))
                raise
            out.put(("opened", stream, os.getpid()))
            if hold:
                go.wait(timeout=120)  # the parent lets the winner write once the other has tried
            return s

        inference.open_store = reporting_open
        err = io.StringIO()
        if barrier is not None:
            barrier.wait(timeout=120)
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(_ingest_argv(store, stream, Path(doc)))
        out.put(("exit", stream, os.getpid(), rc, err.getvalue()))
    except BaseException:
        out.put(("exit", stream, os.getpid(), -1, traceback.format_exc()))


def _get(out, timeout: float = 120.0):
    try:
        return out.get(timeout=timeout)
    except queue.Empty:
        raise TrialError(f"no message from a writer within {timeout} s") from None


class TrialError(AssertionError):
    """A trial broke a promise (the message says which)."""


def tree(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under root but the lock file."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != LOCK_NAME}


def stream_bytes(store: Path) -> dict[str, list[str]]:
    """{stream: sha256 of every block's K and V, all layers, in ordinal order}: the content a reader gets."""
    from memory_store import StoreConfig, TieredStore

    cfg = StoreConfig(device="cpu", device_budget_bytes=0, host_budget_bytes=0, index_backend="exact")
    with TieredStore.open(store, "r", config=cfg) as r:
        got = {}
        for s in r.streams():
            ids = r.stream_blocks(s).tolist()
            digests = []
            for layer in range(r.layout.n_layers):
                k, v = r.get_layer(ids, layer)
                digests.append(hashlib.sha256(_raw(k) + _raw(v)).hexdigest())
            got[s] = digests
        return got


def _raw(t) -> bytes:
    """A tensor's bytes exactly (bf16 included: numpy has no bf16, so as uint8)."""
    import torch

    return t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


class Trials:
    """The race trials in one work directory (documents, reference stores)."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.ctx = _ctx()
        self.docs = {}
        for name, text in DOC.items():
            p = work / f"{name}.txt"
            p.write_text(text)
            self.docs[name] = p
        self.refs: dict[tuple[str, bool], tuple[dict, dict]] = {}
        self.counts = {"trials": 0, "refused": 0, "kills": 0, "wins s-a": 0, "wins s-b": 0}

    def _run_alone(self, store: Path, stream: str) -> None:
        """One ingest in a forked child (the parent stays free of torch threads before forking)."""
        out = self.ctx.Queue()
        p = self.ctx.Process(target=_writer_child, args=(str(store), stream, str(self.docs[stream]), None,
                                                         None, out, False))
        p.start()
        msg = _get(out)
        while msg[0] != "exit":
            msg = _get(out)
        p.join(60)
        if msg[3] != 0:
            raise TrialError(f"ingest of {stream!r} alone failed (rc {msg[3]}): {msg[4]}")

    def reference(self, stream: str, existing: bool) -> tuple[dict, dict]:
        key = (stream, existing)
        if key not in self.refs:
            ref = self.work / f"ref-{stream}-{int(existing)}"
            if existing:
                self._run_alone(ref, "base")
            self._run_alone(ref, stream)
            self.refs[key] = (tree(ref), stream_bytes(ref))
        return self.refs[key]

    def race(self, trial: int) -> None:
        existing = trial % 3 == 0
        store = self.work / f"race{trial}"
        if existing:
            self._run_alone(store, "base")
        barrier, go, out = self.ctx.Barrier(2), self.ctx.Event(), self.ctx.Queue()
        procs = [self.ctx.Process(target=_writer_child, args=(str(store), s, str(self.docs[s]), barrier, go, out,
                                                              True)) for s in ("s-a", "s-b")]
        for p in procs:
            p.start()
        opens, exits = [], []
        while len(opens) < 2 or len(exits) < 2:
            m = _get(out)
            (opens if m[0] != "exit" else exits).append(m)
            if m[0] == "exit" and m[3] not in (0, 2):
                go.set()
                raise TrialError(f"trial {trial}: writer {m[1]} failed (rc {m[3]}):\n{m[4]}")
            if len(opens) == 2:
                go.set()
        for p in procs:
            p.join(60)
        kinds = sorted(m[0] for m in opens)
        if kinds != ["locked", "opened"]:
            raise TrialError(f"trial {trial}: expected one writer and one refusal, got {kinds}")
        winner = next(m for m in opens if m[0] == "opened")
        loser = next(m for m in opens if m[0] == "locked")
        rc = {m[1]: (m[3], m[4]) for m in exits}
        if rc[winner[1]][0] != 0:
            raise TrialError(f"trial {trial}: the winner exited {rc[winner[1]][0]}: {rc[winner[1]][1]}")
        code, err = rc[loser[1]]
        lines = err.strip().splitlines()
        if code != 2 or len(lines) != 1 or "Traceback" in err:
            raise TrialError(f"trial {trial}: the refused writer should exit 2 with one line, got rc {code}:\n{err}")
        for part in ("folio ingest: error:", str(store), "already open for writing", f"pid {winner[2]}",
                     socket.gethostname()):
            if part not in lines[0]:
                raise TrialError(f"trial {trial}: {part!r} missing from the refusal: {lines[0]}")
        ref_tree, ref_bytes = self.reference(winner[1], existing)
        got = tree(store)
        if got != ref_tree:
            diff = sorted(k for k in set(got) | set(ref_tree) if got.get(k) != ref_tree.get(k))
            raise TrialError(f"trial {trial}: the store differs from the winner's alone in {diff}")
        if stream_bytes(store) != ref_bytes:
            raise TrialError(f"trial {trial}: blocks read back differ from the winner's alone")
        self.counts["refused"] += 1
        self.counts[f"wins {winner[1]}"] += 1
        self.kill_holder(trial, store, ref_bytes)
        self.counts["trials"] += 1

    def kill_holder(self, trial: int, store: Path, committed: dict) -> None:
        """SIGKILL a writer holding the lock (held at open by the hook); the next writer opens at once."""
        from memory_store import StoreConfig, StoreLockedError, TieredStore

        go, out = self.ctx.Event(), self.ctx.Queue()
        p = self.ctx.Process(target=_writer_child, args=(str(store), "s-a", str(self.docs["s-a"]), None, go,
                                                         out, True))
        p.start()
        m = _get(out)
        if m[0] != "opened":
            raise TrialError(f"trial {trial}: the writer to be killed could not open: {m}")
        os.kill(p.pid, signal.SIGKILL)
        p.join(60)
        cfg = StoreConfig(device="cpu", device_budget_bytes=0, host_budget_bytes=0, index_backend="exact",
                          save_index="never")
        t0 = time.monotonic()
        try:
            s = TieredStore.open(store, "a", config=cfg, wait_s=0)
        except StoreLockedError as e:
            raise TrialError(f"trial {trial}: the killed writer's lock was not released: {e}") from None
        s.close()
        if time.monotonic() - t0 > 5:
            raise TrialError(f"trial {trial}: reopening after the kill took {time.monotonic() - t0:.1f} s")
        if stream_bytes(store) != committed:
            raise TrialError(f"trial {trial}: the store changed across the killed writer")
        self.counts["kills"] += 1


def run(trials: int, work: Path) -> dict[str, int]:
    """`trials` races in `work`; returns the counts. Raises TrialError at the first violation."""
    t = Trials(work)
    for i in range(trials):
        t.race(i)
    return t.counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--keep", help="work directory to keep (default: a temporary one)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="folio-writers-") as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        try:
            counts = run(args.trials, work)
        except TrialError as e:
            print(f"FAILED: {e}", file=sys.stderr)
            return 1
    print(f"{counts['trials']}/{args.trials} concurrent-writer trials passed in {time.perf_counter() - t0:.1f} s: "
          f"{counts['refused']} second writers refused untouched (wins: s-a {counts['wins s-a']}, "
          f"s-b {counts['wins s-b']}), {counts['kills']} SIGKILLed lock holders released at once, "
          f"nothing lost")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
