"""What a power cut could lose: audit a traced run for commits that name data not yet synced.

A process crash keeps the page cache, so the crash sweeps (crash.py) never see a missing sync. A
power cut loses every write not yet synced, so the commit protocol promises an order: each file
written since the last commit, and each directory that gained an entry, is synced before the
rename that publishes commit.json, and the directory holding commit.json is synced after it.
`unsynced_at_commits` replays a trace (faults.py, trace=True) and lists each place that order is
broken. It models fsync(path) and syncfs (syncs everything); writes under `index/` (derived, rebuilt
when lost) and to the writer lock (informative) need no sync. Removals and truncations need none
either: a file (or tail) that reappears after a power cut is one no commit names, and the next
writer removes it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from .faults import Call

__all__ = ["unsynced_at_commits"]

_EXEMPT_TOP = ("index", "writer.lock")


def unsynced_at_commits(trace: Sequence[Call], root: str, commit_name: str = "commit.json") -> list[str]:
    """Every "commit at call #n names unsynced <path>" of a traced run in the store directory
    `root` (absolute), plus a last commit whose directory was never synced. [] when the order holds."""
    root = os.path.abspath(root)
    dirty: dict[str, int] = {}  # path -> the call that dirtied it
    problems = []

    def needs_sync(path: str) -> bool:
        rel = os.path.relpath(path, root)
        return not rel.startswith("..") and rel.split(os.sep)[0] not in _EXEMPT_TOP and ".tmp" not in rel

    def touch(path: str, n: int) -> None:
        if needs_sync(path):
            dirty.setdefault(path, n)

    for c in trace:
        target = os.path.abspath(c.target) if c.target.startswith("/") else c.target
        if c.kind == "write":
            touch(target, c.n)
            if c.op == "zarr.put":  # (zarr writes a temp file and renames it: a new directory entry)
                touch(os.path.dirname(target), c.n)
        elif c.kind == "open" or c.op == "mkdir":  # (memory_store's makedirs: of the root, or under index/)
            touch(target, c.n)
            touch(os.path.dirname(target), c.n)
        elif c.kind == "rename":
            if os.path.basename(target) == commit_name and os.path.dirname(target) == root:
                for path, since in sorted(dirty.items(), key=lambda kv: kv[1]):
                    if path != root:  # (the directory of commit.json is synced after the rename)
                        problems.append(f"the commit at call #{c.n} names {os.path.relpath(path, root)}, "
                                        f"written at #{since} and not synced since")
                dirty = {p: n for p, n in dirty.items() if p == root}
                dirty[root] = dirty.get(root, c.n)
            else:
                touch(os.path.dirname(target), c.n)
                touch(target, c.n)
        elif c.kind == "fsync":
            if c.op == "syncfs":
                dirty.clear()
            else:
                dirty.pop(target, None)
    if root in dirty and any(c.kind == "rename" and os.path.basename(c.target) == commit_name for c in trace):
        problems.append(f"the last commit's directory {root} was not synced after its rename (call #{dirty[root]})")
    return problems
