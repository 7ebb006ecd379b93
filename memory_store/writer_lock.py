"""WriterLock: one writer per store at a time, held as an OS file lock.

A store opened for writing (mode "a" or "w") holds `flock(LOCK_EX)` on `<store>/writer.lock`
from before it reads or writes anything in the directory until `close()`. The kernel drops
the lock when the descriptor closes: on close(), when the lock object is garbage-collected,
and when the process dies (SIGKILL included), so a crashed writer never leaves a stale lock
behind. Readers (mode "r") never touch the lock and are never blocked by it; they trust only
the commit record (see disk.py).

The file's content records the holder (pid, host, since when, the command line) as JSON,
written after the lock is taken and emptied just before it is released. It is informative
only: the flock is the truth, and the content left by a killed holder is stale. The file is
never replaced, renamed or deleted (a second inode would let a second writer lock it), and
the store's "w" mode clears the directory around it.

Two descriptors of the file conflict even inside one process (flock locks belong to the
open file description), so opening the same store twice for writing in one process is
refused like a second process. A forked child inherits the parent's descriptor and with it
a share of the lock; it never unlocks the parent's lock (release() in a child only closes
its copy).

Network file systems. On Linux >= 2.6.12 an NFS client emulates flock with fcntl byte-range
locks, which the server honours across clients only when its lock manager works (NFSv4, or
NFSv3 with lockd); older servers, SMB/CIFS mounts and some FUSE file systems may grant the
lock to two hosts at once. Use a local disk for the writer, or make sure there is only one
writer host. A file system that refuses locks outright (ENOLCK) makes the writer's open fail
with a StoreError saying so.

Stores that are not a local directory have no file to lock. An fsspec store (S3, ...) takes a
lease object instead (lease.py: owner, expiry, renewed; a killed writer's lease expires). A
zarr MemoryStore, seen by its own process only, opens without a lock, with a
NoWriterLockWarning, keeping to one writer being the caller's job (see disk.py).
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import shlex
import socket
import sys
import time
from datetime import datetime, timezone
from typing import Any

from .errors import InvalidArgumentError, ReadOnlyError, StoreError, StoreLockedError, StoreNotFoundError

__all__ = ["WriterLock", "read_holder", "check_wait_s", "NoWriterLockWarning", "LOCK_NAME", "POLL_S"]

LOCK_NAME = "writer.lock"
POLL_S = 0.1  # how often a waiting writer retries the lock
_BUSY = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES)  # EACCES: fcntl-emulated flock on some NFS clients


class NoWriterLockWarning(UserWarning):
    """A store was opened for writing where no writer lock or lease is taken (a zarr MemoryStore)."""


def check_wait_s(wait_s: object) -> float:
    """`wait_s` as a float; InvalidArgumentError unless it is a number of seconds >= 0 (inf: wait forever)."""
    if isinstance(wait_s, bool) or not isinstance(wait_s, (int, float)) or math.isnan(wait_s) or wait_s < 0:
        raise InvalidArgumentError(f"wait_s={wait_s!r}: expected a number of seconds >= 0 (0: do not wait)")
    return float(wait_s)


def read_holder(path: str | os.PathLike) -> dict[str, Any]:
    """What `<path>/writer.lock` says about its holder: {"pid", "host", "since", "command"}.

    {} when there is no lock file, it is empty (no writer, or one that has just taken the lock
    and not yet written it), or it is unreadable. Reading never takes or blocks the lock. The
    content of a writer that was killed stays behind: only the flock says whether it is held.
    """
    try:
        with open(os.path.join(os.fspath(path), LOCK_NAME), "rb") as f:
            raw = f.read(64 << 10)
    except OSError:
        return {}
    try:
        holder = json.loads(raw) if raw.strip() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}  # half-written by a holder that was killed while writing it
    return holder if isinstance(holder, dict) else {}


def _holder_record() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join(getattr(sys, "orig_argv", sys.argv))}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "a writer that has not recorded itself yet"
    here = holder.get("host") == socket.gethostname()
    mine = " (this process: close the other store object first)" if here and holder.get("pid") == os.getpid() else ""
    command = str(holder.get("command", "?"))
    if len(command) > 160:
        command = command[:160] + " ..."
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {holder.get('since', '?')}{mine}, "
            f"command: {command}")


class WriterLock:
    """The exclusive writer lock of one store directory. Take it with `WriterLock.acquire`."""

    def __init__(self, path: str, fd: int, holder: dict[str, Any]) -> None:
        self.path = path
        self._fd: int | None = fd
        self._pid = os.getpid()  # a forked child must not unlock its parent's lock
        self._holder = holder

    @classmethod
    def acquire(cls, path: str | os.PathLike, wait_s: float = 0.0) -> WriterLock:
        """Take the writer lock of the store directory `path` (created when missing, with the lock
        file and nothing else), waiting up to `wait_s` seconds for another writer to release it.

        Raises StoreLockedError (naming the holder) when it is still held after `wait_s`;
        ReadOnlyError when the directory or the lock file cannot be written; StoreError when the
        file system refuses locks; InvalidArgumentError for a bad `wait_s`.
        """
        wait_s = check_wait_s(wait_s)
        path = os.fspath(path)
        lock_path = os.path.join(path, LOCK_NAME)
        deadline = time.monotonic() + wait_s
        fd = cls._open(path, lock_path)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    if e.errno == errno.ENOLCK:
                        raise StoreError(f"store {path}: the file system refuses file locks (ENOLCK), so the "
                                         f"writer lock {lock_path} cannot be taken; use a local disk for the "
                                         f"writer") from e
                    if e.errno not in _BUSY:
                        raise
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise cls._locked_error(path, wait_s) from None
                    time.sleep(min(POLL_S, left))
                    continue
                if cls._same_file(fd, lock_path):
                    break
                # the file was deleted or replaced after we opened it: our lock is on an orphan inode
                # that no other writer would ever see, so lock the file that is there now
                os.close(fd)
                fd = cls._open(path, lock_path)
            holder = _holder_record()
            try:  # in place, never by rename: the lock lives on this inode
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(holder).encode() + b"\n", 0)
            except OSError:
                pass  # informative only: a full disk must not turn a held lock into an error here
            return cls(path, fd, holder)
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def _open(path: str, lock_path: str) -> int:
        if os.path.exists(path) and not os.path.isdir(path):
            raise StoreNotFoundError(f"store path {path} is a file, not a store directory: give a directory "
                                     f"(an existing store, or a new one to create)")
        try:
            os.makedirs(path, exist_ok=True)
            if not os.access(path, os.W_OK):  # (a lock file already there would open: check the directory)
                # say which: access() answers EACCES for a read-only file system too
                code = errno.EROFS if os.statvfs(path).f_flag & os.ST_RDONLY else errno.EACCES
                raise OSError(code, os.strerror(code), path)
            return os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            raise ReadOnlyError(f"store {path} cannot be opened for writing: {e.strerror} ({e.filename}); "
                                f"open it with mode 'r' to read it, or make the directory writable") from e

    @staticmethod
    def _same_file(fd: int, lock_path: str) -> bool:
        try:
            st = os.stat(lock_path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    @staticmethod
    def _locked_error(path: str, wait_s: float) -> StoreLockedError:
        holder = read_holder(path)
        for _ in range(5):  # the holder may have just taken the lock and not yet written its record
            if holder:
                break
            time.sleep(0.01)
            holder = read_holder(path)
        waited = f"after waiting {wait_s:g} s" if wait_s > 0 else "at once (wait_s=0)"
        return StoreLockedError(
            f"store {path} is already open for writing by {_describe(holder)}; refused {waited}. One writer "
            f"at a time: wait for it to close, pass wait_s=<seconds> to TieredStore.open to wait for the lock, "
            f"or open with mode 'r' to read (readers are never blocked)", path=path, holder=holder)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def holder(self) -> dict[str, Any]:
        """The record this lock wrote into the lock file (pid, host, since, command)."""
        return dict(self._holder)

    def release(self) -> None:
        """Release the lock (idempotent). In a forked child: only close the inherited descriptor."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if os.getpid() == self._pid:
                try:  # empty the record first: the next holder writes its own
                    os.ftruncate(fd, 0)
                except OSError:
                    pass
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __del__(self) -> None:  # a store dropped without close() still lets the next writer in
        if getattr(self, "_fd", None) is not None:
            try:
                self.release()
            except OSError:
                pass

    def __repr__(self) -> str:
        return f"WriterLock({self.path!r}, held={self.held})"
