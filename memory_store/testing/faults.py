"""FaultInjector: fail, or end the process at, any write, sync or rename that memory_store makes.

The seam. memory_store reaches the file system through a few module-level names, and a test
replaces exactly those, for the length of a `with FaultInjector(...)` block:

- `os` in every module of SEAM_MODULES: every creating open, write, writev,
  pwrite(v), fsync, replace, unlink, truncate, mkdir of the store's own files;
- `open` in memory_store.chunks (the saved index's blobs) and `shutil` in memory_store.disk
  (mode "w" clearing the directory);
- `memory_store.commit._SYNCFS`, the libc syncfs(2) handle (a failure comes back as -1 and errno,
  as from libc);
- zarr's LocalStore: `zarr.storage._local._put` (each key zarr writes: the per-row metadata chunks,
  array metadata when the arrays grow, the group at creation) and its `shutil` (delete_dir).

The production code calls `os.fsync` etc. as usual and knows nothing of this module. A proxy
stands in for each module and passes everything else (os.path, constants, reads) straight through:
reads are never counted or failed. `tests/memory_store/test_faults.py` checks that no other
memory_store module calls a mutating os function, so the seam stays complete.

Each mutating call gets a number (1, 2, ... in call order, over all threads) and a kind: "open"
(one that may create or truncate: O_CREAT, O_TRUNC; opening an existing file to write it changes
nothing, its writes are counted), "write", "fsync", "rename", "remove" (unlink, rmtree), "truncate", "mkdir". A Fault
matches calls by kind (and optionally a path substring) and at its nth match either raises
OSError(errno) before the call (ENOSPC, EIO, EROFS, ...; `sticky`: every match from then on, until
`clear()`: a disk stays full until space is freed), or ends the process with os._exit(CRASH_EXIT)
before the call ("exit"), or for a write writes the first half of its bytes and then ends it
("torn"). With trace=True every call is recorded with the commit-protocol step it belongs to (see
`protocol_step`); crash.py numbers crash points so.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import os
import shutil
import sys
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["FaultInjector", "Fault", "Call", "CRASH_EXIT", "KINDS", "SEAM_MODULES", "protocol_step"]

CRASH_EXIT = 86  # exit status of a process ended by an "exit" or "torn" fault
# the memory_store modules whose `os` is replaced (the only ones that may write files: see test_faults.py)
SEAM_MODULES = ("memory_store.disk", "memory_store.chunks", "memory_store.commit", "memory_store.shards",
                "memory_store.writer_lock")
KINDS = ("open", "write", "fsync", "rename", "remove", "truncate", "mkdir")
_CREATE_FLAGS = os.O_CREAT | os.O_TRUNC  # an open that may create or empty a file (others change nothing)
_REAL_OPEN = open

# memory_store functions -> the protocol step a call under them belongs to (innermost match wins;
# functions not listed, e.g. fsync_path or ShardSet.write, take the step of their caller)
_STEP_OF = {
    "write_blob": "index save", "delete_prefix": "index save", "_save_index": "index save",
    "commit": "commit record", "seal": "seal shards", "_write_pending_meta": "row metadata",
    "ensure_capacity": "grow arrays", "make_durable": "sync", "write_rows": "write rows",
    "write_rows_meta": "write rows", "_put_chunks": "write rows", "delete_rows": "delete rows",
    "recover": "recover", "_create": "create", "_clear_local": "create", "acquire": "writer lock",
    "release": "writer lock",
}


@dataclass(frozen=True, slots=True)
class Call:
    """One mutating file-system call memory_store made."""

    n: int  # 1-based, in call order over all threads
    kind: str  # one of KINDS
    op: str  # the function: "pwritev", "fsync", "syncfs", "zarr.put", ...
    target: str  # the path written, synced or renamed to ("" when unknown)
    step: str  # the commit-protocol step (protocol_step), "" when not traced

    def describe(self, root: str = "") -> str:
        target = os.path.relpath(self.target, root) if root and self.target.startswith(root) else self.target
        return f"#{self.n} {self.step or '?'}: {self.op}({target})"


@dataclass(slots=True)
class Fault:
    """What to do at the nth call matching `kinds` (and `path`, a substring of its target).

    action "raise": OSError(errno) instead of the call (sticky: at every match from the nth on);
    "exit": os._exit(CRASH_EXIT) before the call; "torn": a write writes half its bytes, then exits
    (other kinds: as "exit")."""

    nth: int
    kinds: tuple[str, ...] = KINDS
    action: str = "raise"
    errno: int = errno_mod.ENOSPC
    sticky: bool = False
    path: str | None = None
    seen: int = field(default=0, init=False)
    fired: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.action not in ("raise", "exit", "torn"):
            raise ValueError(f"Fault.action={self.action!r}: expected 'raise', 'exit' or 'torn'")
        if isinstance(self.kinds, str):
            self.kinds = (self.kinds,)
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not isinstance(self.nth, int) or self.nth < 1:
            raise ValueError(f"Fault(nth={self.nth!r}, kinds={self.kinds!r}): expected nth >= 1 and kinds from {KINDS}")

    @classmethod
    def at(cls, call: Call, trace: Sequence[Call], **kw: Any) -> Fault:
        """A fault at `call` of a traced run, counted among the calls of its own kind: a sticky fault
        then hits only that kind (a full disk fails writes, not the unlink that cleans up after one)."""
        nth = sum(1 for c in trace if c.kind == call.kind and c.n <= call.n)
        return cls(nth, kinds=(call.kind,), **kw)

    def matches(self, kind: str, target: str) -> bool:
        return kind in self.kinds and (self.path is None or self.path in target)


def protocol_step(frames: Iterable[Any]) -> str:
    """The step of the innermost memory_store function (of _STEP_OF) among `frames` (innermost first)."""
    for f in frames:
        mod = f.f_globals.get("__name__", "")
        if mod.startswith("memory_store.") and not mod.startswith("memory_store.testing"):
            step = _STEP_OF.get(f.f_code.co_name)
            if step:
                return step
    return ""


def _stack(frame: Any) -> list[Any]:
    out = []
    while frame is not None:
        out.append(frame)
        frame = frame.f_back
    return out


class _Proxy:
    """Stands in for a module (os, shutil) where memory_store uses it: the wrapped names go
    through the injector, every other attribute is the real module's."""

    def __init__(self, real: Any, wrapped: dict[str, Callable]) -> None:
        self._real = real
        self._wrapped = wrapped

    def __getattr__(self, name: str) -> Any:
        fn = self._wrapped.get(name)
        return fn if fn is not None else getattr(self._real, name)


class _File:
    """A file opened for writing through the injected `open`: its writes are counted too."""

    def __init__(self, f: Any, path: str, inj: FaultInjector) -> None:
        self._f, self._path, self._inj = f, path, inj

    def write(self, data: Any) -> int:
        return self._inj._call("write", "file.write", self._path, lambda: self._f.write(data),
                               torn=lambda: (self._f.write(_half([data])), self._f.flush()))

    def __enter__(self) -> _File:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


class FaultInjector:
    """Counts (and with trace=True records) every mutating call memory_store makes inside the
    `with` block, and applies `faults`. Not re-entrant: one injector at a time per process.

    `report`: called with the Call just before an "exit"/"torn" fault ends the process (the crash
    harness writes it to its report file). `fired` is set once any fault fired. skip_sync: fsync and
    syncfs are counted (and faulted) but not made: for crash sweeps, whose os._exit keeps the page
    cache (a process crash, not a power cut), so a sync changes nothing they can observe.
    """

    def __init__(self, faults: Iterable[Fault] = (), *, trace: bool = False, skip_sync: bool = False,
                 report: Callable[[Call], None] | None = None) -> None:
        self.faults: list[Fault] = list(faults)
        self.trace = trace
        self.skip_sync = skip_sync
        self.calls: list[Call] = []
        self.count = 0
        self.fired = threading.Event()
        self._report = report
        self._lock = threading.Lock()
        self._saved: list[tuple[Any, str, Any]] = []

    # -- control ------------------------------------------------------------------------
    def add(self, fault: Fault) -> None:
        with self._lock:
            self.faults.append(fault)

    def clear(self) -> None:
        """Remove every fault ("space is freed"); counting and tracing go on."""
        with self._lock:
            self.faults = []

    def kinds_seen(self) -> set[str]:
        return {c.kind for c in self.calls}

    # -- patching -----------------------------------------------------------------------
    def __enter__(self) -> FaultInjector:
        import importlib

        from zarr.storage import _local as zarr_local  # (imported here: the seam is zarr's private module)

        seams = [importlib.import_module(m) for m in SEAM_MODULES]
        disk, chunks, commit = (importlib.import_module(f"memory_store.{m}") for m in ("disk", "chunks", "commit"))
        torn = {"write": _torn_write, "writev": _torn_writev, "pwrite": _torn_pwrite, "pwritev": _torn_pwritev}
        wrapped: dict[str, Callable] = {"open": self._os_open}
        for kind, target, ops in [("write", _fd_target, torn), ("fsync", _fd_target, ("fsync", "fdatasync")),
                                  ("rename", _dst_target, ("replace", "rename")),
                                  ("remove", _path_target, ("unlink", "remove", "rmdir")),
                                  ("truncate", _path_target, ("truncate",)), ("truncate", _fd_target, ("ftruncate",)),
                                  ("mkdir", _path_target, ("makedirs", "mkdir"))]:
            for op in ops:
                wrapped[op] = self._wrap(kind, op, target, torn=torn.get(op))
        os_proxy = _Proxy(os, wrapped)
        shutil_proxy = _Proxy(shutil, {"rmtree": self._wrap("remove", "rmtree", _path_target, module=shutil)})
        patches = [*((mod, "os", os_proxy) for mod in seams),
                   (disk, "shutil", shutil_proxy), (chunks, "open", self._builtin_open),
                   (zarr_local, "shutil", shutil_proxy), (zarr_local, "_put", self._zarr_put(zarr_local._put))]
        if commit._SYNCFS is not None:
            patches.append((commit, "_SYNCFS", self._syncfs(commit._SYNCFS)))
        for mod, name, value in patches:
            self._saved.append((mod, name, mod.__dict__.get(name, _MISSING)))
            setattr(mod, name, value)
        return self

    def __exit__(self, *exc: object) -> None:
        for mod, name, old in reversed(self._saved):
            if old is _MISSING:
                delattr(mod, name)
            else:
                setattr(mod, name, old)
        self._saved.clear()

    # -- the wrappers ---------------------------------------------------------------------
    def _wrap(self, kind: str, op: str, target: Callable[..., str], torn: Callable | None = None,
              module: Any = os) -> Callable:
        real = getattr(module, op)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return self._call(kind, op, target(*args), lambda: real(*args, **kwargs),
                              torn=(lambda: torn(*args)) if torn is not None else None)
        return wrapper

    def _os_open(self, path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if not flags & _CREATE_FLAGS:
            return os.open(path, flags, *args, **kwargs)
        return self._call("open", "open", os.fspath(path), lambda: os.open(path, flags, *args, **kwargs))

    def _builtin_open(self, file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if not any(c in mode for c in "wax+"):
            return _REAL_OPEN(file, mode, *args, **kwargs)
        path = os.fspath(file)
        if any(c in mode for c in "wax"):
            f = self._call("open", "open", path, lambda: _REAL_OPEN(file, mode, *args, **kwargs))
        else:  # "r+": creates nothing (its writes are counted)
            f = _REAL_OPEN(file, mode, *args, **kwargs)
        return _File(f, path, self)

    def _syncfs(self, real: Callable[[int], int]) -> Callable[[int], int]:
        def syncfs(fd: int) -> int:
            try:
                return self._call("fsync", "syncfs", _fd_target(fd), lambda: real(fd))
            except OSError as e:  # libc's way: -1 and errno (commit.py reads ctypes.get_errno())
                ctypes.set_errno(e.errno)
                return -1
        return syncfs

    def _zarr_put(self, real: Callable) -> Callable:
        def put(path: Path, value: Any, exclusive: bool = False) -> int:
            def torn() -> None:  # what zarr's temp-file write leaves when it dies half-way
                data = bytes(value.as_buffer_like())
                with _REAL_OPEN(path.with_suffix(f".{uuid.uuid4().hex}.partial"), "wb") as f:
                    f.write(data[:len(data) // 2])
            return self._call("write", "zarr.put", str(path), lambda: real(path, value, exclusive=exclusive), torn=torn)
        return put

    # -- the decision -----------------------------------------------------------------------
    def _call(self, kind: str, op: str, target: str, do: Callable[[], Any],
              torn: Callable[[], Any] | None = None) -> Any:
        with self._lock:
            self.count += 1
            call = Call(self.count, kind, op, target, self._step() if self.trace else "")
            if self.trace:
                self.calls.append(call)
            action = None
            for fault in self.faults:
                if not fault.matches(kind, target):
                    continue
                fault.seen += 1
                if fault.seen == fault.nth or (fault.sticky and fault.seen > fault.nth):
                    fault.fired += 1
                    action = fault
                    break
        if action is None:
            if self.skip_sync and kind == "fsync":
                return 0
            return do()
        self.fired.set()
        if action.action == "raise":
            raise OSError(action.errno, os.strerror(action.errno), target or None)
        if self._report is not None:
            self._report(call if self.trace else Call(call.n, kind, op, target, self._step()))
        if action.action == "torn" and torn is not None:
            torn()
        os._exit(CRASH_EXIT)

    @staticmethod
    def _step() -> str:
        """The protocol step of this call: from the calling thread's stack, else (a call zarr makes on
        its own worker thread) from the one other thread inside a labelled memory_store function."""
        me = threading.get_ident()
        step = protocol_step(_stack(sys._getframe(2)))
        if step:
            return step
        others = {protocol_step(_stack(f)) for tid, f in sys._current_frames().items() if tid != me}
        others.discard("")
        return others.pop() if len(others) == 1 else ""


_MISSING = object()


def _fd_target(fd: int, *_: Any) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"fd {fd}"


def _path_target(path: Any, *_: Any) -> str:
    return os.fspath(path) if isinstance(path, (str, bytes, os.PathLike)) else str(path)


def _dst_target(src: Any, dst: Any, *_: Any) -> str:
    return os.fspath(dst)


def _half(parts: Iterable[Any]) -> bytes:
    data = b"".join(bytes(memoryview(p).cast("B")) for p in parts)
    return data[:len(data) // 2]


def _torn_write(fd: int, data: Any) -> None:
    os.write(fd, _half([data]))


def _torn_writev(fd: int, parts: Any) -> None:
    os.write(fd, _half(parts))


def _torn_pwrite(fd: int, data: Any, offset: int) -> None:
    os.pwrite(fd, _half([data]), offset)


def _torn_pwritev(fd: int, parts: Any, offset: int, *_: Any) -> None:
    os.pwrite(fd, _half(parts), offset)
