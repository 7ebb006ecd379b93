"""CrashRunner: run a store workload in a child process that dies at a chosen file-system call.

Crash points are enumerated, not sampled: a dry run of the workload (no fault, trace=True)
numbers every mutating call it makes (faults.py), each labelled with its commit-protocol step;
then, for each number n, a fresh child repeats the workload on a fresh copy of the starting
directory with Fault(n, action="exit") (dies just before call n) or "torn" (a write leaves half its
bytes, then the process dies). The parent compares what a later open finds with what the child
acknowledged: the report file holds the child's acknowledgements (one per flush that returned),
the call it died at, and, for a dry run, its trace. A workload is deterministic when the same
call numbers mean the same calls in every run; `ChildResult.died` lets the caller check that.

Children fork from a multiprocessing forkserver that imported torch and memory_store once
(importing torch costs ~2 s per process; a fork ~10 ms), so the forked child starts with no
threads and none of the parent's locks. As with any multiprocessing start method but fork, a
script that uses CrashRunner needs the `if __name__ == "__main__":` guard (pytest has it).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import tempfile
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .faults import CRASH_EXIT, Call, Fault, FaultInjector

__all__ = ["CrashRunner", "ChildResult", "commits_before"]


@dataclass(slots=True)
class ChildResult:
    """What one child run left: its exit status and its report."""

    exitcode: int | None
    acks: list[Any] = field(default_factory=list)  # what the child acknowledged (JSON values), in order
    died: Call | None = None  # the call an "exit"/"torn" fault ended the child at
    trace: list[Call] = field(default_factory=list)  # every mutating call (trace=True and a clean exit)
    error: str | None = None  # the traceback of an exception that ended the child

    @property
    def crashed(self) -> bool:
        return self.exitcode == CRASH_EXIT


def commits_before(trace: Sequence[Call], n: int, commit_name: str = "commit.json") -> int:
    """How many commit records were in place before call n: renames onto `commit_name` among calls < n."""
    return sum(1 for c in trace if c.n < n and c.kind == "rename" and os.path.basename(c.target) == commit_name)


def _child(report_path: str, fn: Callable[..., None], args: tuple, faults: list[Fault], trace: bool,
           skip_sync: bool) -> None:
    fd = os.open(report_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def emit(obj: dict) -> None:  # one write per line: whole lines survive an os._exit
        os.write(fd, (json.dumps(obj) + "\n").encode())

    inj = FaultInjector(faults, trace=trace, skip_sync=skip_sync, report=lambda c: emit({"died": asdict(c)}))
    try:
        with inj:
            fn(*args, ack=lambda a: emit({"ack": a}))
    except BaseException:  # reported to the parent, which fails the test with it
        emit({"error": traceback.format_exc()})
        os._exit(1)
    if trace:
        emit({"trace": [asdict(c) for c in inj.calls]})
    os._exit(0)


class CrashRunner:
    """Runs `fn(*args, ack=...)` in forked children under a FaultInjector. `preload`: modules the
    forkserver imports once (the module of every `fn` should be among them)."""

    def __init__(self, preload: Sequence[str] = ("memory_store.testing.workload",)) -> None:
        self._ctx = multiprocessing.get_context("forkserver")
        # (no effect when this process's forkserver already runs: children then import on their own)
        self._ctx.set_forkserver_preload(["memory_store.testing.crash", *preload])
        self.runs = 0

    def run(self, fn: Callable[..., None], args: Sequence[Any], *, faults: Sequence[Fault] = (),
            trace: bool = False, skip_sync: bool = True, timeout: float = 120.0) -> ChildResult:
        """Run one child to its end; a child still running after `timeout` seconds is killed
        (TimeoutError). skip_sync: see FaultInjector (on by default: a crash sweep observes a
        process crash, which keeps the page cache)."""
        fd, report = tempfile.mkstemp(prefix="folio-crash-", suffix=".jsonl")
        os.close(fd)
        try:
            p = self._ctx.Process(target=_child, args=(report, fn, tuple(args), list(faults), trace,
                                                                skip_sync))
            p.start()
            p.join(timeout)
            if p.is_alive():
                p.kill()
                p.join()
                raise TimeoutError(f"child {fn.__name__}{tuple(args)!r:.200} still running after {timeout} s "
                                   f"(faults {list(faults)})")
            self.runs += 1
            out = ChildResult(p.exitcode)
            with open(report) as f:
                for line in f:
                    d = json.loads(line)
                    if "ack" in d:
                        out.acks.append(d["ack"])
                    elif "died" in d:
                        out.died = Call(**d["died"])
                    elif "trace" in d:
                        out.trace = [Call(**c) for c in d["trace"]]
                    elif "error" in d:
                        out.error = d["error"]
            return out
        finally:
            os.unlink(report)
