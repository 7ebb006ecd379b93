"""WriterLease: the one-writer rule of a store on object storage (an fsspec store, e.g. S3).

An object store has no lock that a killed process releases, so the writer holds a lease: the
object `writer.lease` in the store, {"owner" (a random token), "pid", "host", "since",
"expires" (unix seconds), "ttl_s", "command"}. Opening for writing creates it (only if absent:
S3's `If-None-Match: *`), or takes over one whose `expires` has passed (only if unchanged since
read: `If-Match: <etag>`); a lease that is still live refuses the open with StoreLockedError
naming its holder and when it expires, or waits `wait_s` seconds for it. A thread renews the
lease every ttl/3; close() deletes it. A writer killed with SIGKILL keeps the store until its
lease expires (FOLIO_LEASE_TTL_S, default 30 s): the next writer waits that long at most.

Fencing. Before each commit the writer checks that the lease is still its own and unexpired
(a writer paused past its ttl, e.g. a stopped VM, finds it taken over and stops with
StoreLockedError), and commit records are created only if absent (object_store.py), so two
writers never both publish one generation. Expiry compares wall clocks of different hosts:
keep them in sync (NTP), and the ttl well above their skew. Where the filesystem has no
conditional writes, create and take-over are plain puts checked by reading back: two writers
starting within the same moment could both believe they won (a best effort, documented).
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import socket
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Any

from zarr.abc.store import Store

from .errors import InvalidArgumentError, StoreError, StoreLockedError
from .object_store import Objects
from .writer_lock import POLL_S, check_wait_s

__all__ = ["WriterLease", "LEASE_KEY", "lease_ttl_s", "read_lease"]

LEASE_KEY = "writer.lease"
DEFAULT_TTL_S = 30.0


def lease_ttl_s() -> float:
    """The lease ttl: FOLIO_LEASE_TTL_S (seconds > 0), default 30."""
    env = os.environ.get("FOLIO_LEASE_TTL_S", "")
    try:
        ttl = float(env) if env else DEFAULT_TTL_S
    except ValueError:
        ttl = -1.0
    if not ttl > 0 or ttl == float("inf"):
        raise InvalidArgumentError(f"FOLIO_LEASE_TTL_S={env!r}: expected a number of seconds > 0")
    return ttl


def read_lease(store: Store) -> dict[str, Any]:
    """The lease record as stored ({} when there is none or it is unreadable)."""
    got = Objects(store).get(LEASE_KEY)
    return _parse(got[0]) if got else {}


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        rec = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return rec if isinstance(rec, dict) else {}


def _describe(rec: dict[str, Any], now: float) -> str:
    left = float(rec.get("expires", 0)) - now
    return (f"pid {rec.get('pid', '?')} on host {rec.get('host', '?')} since {rec.get('since', '?')} (lease "
            f"expires in {max(0.0, left):.1f} s unless renewed), command: {str(rec.get('command', '?'))[:160]}")


class WriterLease:
    """The writer lease of one object store. Take it with `WriterLease.acquire`; `check()` before a commit."""

    def __init__(self, store: Store, where: str, objects: Objects, record: dict[str, Any], etag: str | None,
                 ttl_s: float) -> None:
        self.store, self.path, self.ttl_s = store, where, ttl_s
        self._objects = objects
        self._record = record
        self._etag = etag
        self._lost: str | None = None  # why this writer no longer holds the store
        self._stop = threading.Event()
        self._mu = threading.Lock()
        self._thread = threading.Thread(target=self._renew_loop, name="folio-lease", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(cls, store: Store, where: str, wait_s: float = 0.0, ttl_s: float | None = None) -> WriterLease:
        """Take the lease, waiting up to `wait_s` seconds for a live one to be released or to expire.
        StoreLockedError (naming the holder) when it is still held after that."""
        wait_s = check_wait_s(wait_s)
        ttl_s = lease_ttl_s() if ttl_s is None else float(ttl_s)
        objects = Objects(store)
        deadline = time.monotonic() + wait_s
        token = secrets.token_hex(16)
        while True:
            got = objects.get(LEASE_KEY)
            now = time.time()
            held = _parse(got[0]) if got else {}
            record = {"owner": token, "pid": os.getpid(), "host": socket.gethostname(),
                      "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      "expires": now + ttl_s, "ttl_s": ttl_s,
                      "command": shlex.join(getattr(sys, "orig_argv", sys.argv))}
            raw = json.dumps(record).encode()
            if got is None:
                won = objects.create(LEASE_KEY, raw)
            elif not held or float(held.get("expires", 0)) < now:  # expired (or unreadable): take it over
                won = objects.replace(LEASE_KEY, raw, got[1])
            else:
                won = False
            if won:
                mine = objects.get(LEASE_KEY)  # read back: without conditional puts this is the only check
                if mine is not None and _parse(mine[0]).get("owner") == token:
                    return cls(store, where, objects, record, mine[1], ttl_s)
                held = _parse(mine[0]) if mine else held
            left = deadline - time.monotonic()
            if left <= 0:
                waited = f"after waiting {wait_s:g} s" if wait_s > 0 else "at once (wait_s=0)"
                raise StoreLockedError(
                    f"store {where} is already open for writing by {_describe(held, time.time())}; refused "
                    f"{waited}. One writer at a time: wait for it to close, pass wait_s=<seconds> (a killed "
                    f"writer's lease expires after its ttl), or open with mode 'r' to read (readers are never "
                    f"blocked)", path=where, holder=held)
            time.sleep(min(POLL_S * 5, left))

    @property
    def held(self) -> bool:
        return not self._stop.is_set() and self._lost is None

    def holder(self) -> dict[str, Any]:
        return dict(self._record)

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except Exception:  # noqa: BLE001 - a network error: the next round retries; check() sees expiry
                pass

    def renew(self) -> None:
        """Push the expiry forward (ours only: a lease taken over is left to its new owner)."""
        with self._mu:
            if self._stop.is_set() or self._lost is not None:
                return
            got = self._objects.get(LEASE_KEY)
            if got is None or _parse(got[0]).get("owner") != self._record["owner"]:
                holder = _parse(got[0]) if got else {}
                self._lost = f"taken over by {_describe(holder, time.time())}" if holder else "deleted"
                return
            record = {**self._record, "expires": time.time() + self.ttl_s}
            if self._objects.replace(LEASE_KEY, json.dumps(record).encode(), got[1]):
                self._record = record
                mine = self._objects.get(LEASE_KEY)
                self._etag = mine[1] if mine else None

    def check(self) -> None:
        """StoreLockedError unless this writer still holds an unexpired lease (called before each commit:
        one GET, so a lease taken over is seen at the next commit, not the next renewal)."""
        if self._stop.is_set():
            raise StoreError(f"store {self.path}: the writer lease was released (store closed)")
        with self._mu:
            if self._lost is None:
                got = self._objects.get(LEASE_KEY)
                holder = _parse(got[0]) if got else {}
                if holder.get("owner") != self._record["owner"]:
                    self._lost = f"taken over by {_describe(holder, time.time())}" if holder else "deleted"
        if self._lost is None and float(self._record["expires"]) - time.time() < self.ttl_s / 3:
            self.renew()  # (the renewal thread is late: renew now rather than commit on a stale lease)
        if self._lost is None and float(self._record["expires"]) <= time.time():
            self._lost = "expired (not renewed in time)"
        if self._lost is not None:
            raise StoreLockedError(f"store {self.path}: this writer's lease was {self._lost}; nothing more is "
                                   f"committed by it (the last commit stands): reopen the store",
                                   path=self.path, holder=read_lease(self.store))

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours (idempotent)."""
        if self._stop.is_set():
            return
        with self._mu:
            self._stop.set()
            if self._lost is not None:
                return
            try:
                got = self._objects.get(LEASE_KEY)
                if got is not None and _parse(got[0]).get("owner") == self._record["owner"]:
                    self._objects.delete(LEASE_KEY)
            except OSError:
                pass  # it expires by itself

    def __repr__(self) -> str:
        return f"WriterLease({self.path!r}, held={self.held}, ttl_s={self.ttl_s:g})"
