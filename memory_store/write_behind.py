"""WriteBehind: the queue of put blocks not yet on disk, and the thread that writes them.

A put hands its host copy over as one job (rows [start, end)); the writer thread writes jobs
in order through `DiskLog.write_rows` and advances `written_upto` (rows below it are on disk,
maybe not yet durable). The queue is bounded (`write_queue_bytes`): a put waits in
`wait_for_room`. Rows deleted while queued are recorded without their chunks
(`write_rows_meta`), except the rows a pending flush counts alive (its snapshot).
With lazy writes (write-back) the writer leaves jobs queued until the queue holds more than
half its bytes, a put waits for room, or a flush asks (`wait_written`).

A write that fails is kept as `error`, raised once to the next put/flush/close (the store's
`take_error`); its job stays first in the queue and the writer pauses until `resume()`.
A writer that dies stays paused for good. Without a thread (write_behind=False) the store
writes each put itself and `submit` only records it as written.

Every method runs under the store's condition `cv` (the store's lock), except the writer's
disk I/O, which runs outside it.
"""

from __future__ import annotations

import bisect
import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .protocols import DiskLog
from .rows import RowTable
from .stats import StoreStats

__all__ = ["WriteBehind", "WriteJob"]


@dataclass(slots=True)
class WriteJob:
    seq: int
    start: int
    k: np.ndarray  # (N, L, H, T, D) storage dtype
    v: np.ndarray  # (N, L, H, T, D)
    landmarks: np.ndarray  # (N, L, H, D)
    codes: np.ndarray  # (N,) int32
    ordinals: np.ndarray  # (N,) int64

    @property
    def end(self) -> int:
        return self.start + self.k.shape[0]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.landmarks.nbytes


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of True in a 1-D bool array."""
    d = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist()))


class WriteBehind:
    """The write-behind queue and its writer thread (none when background=False)."""

    def __init__(self, disk: DiskLog, rows: RowTable, stats: StoreStats, cv: threading.Condition, *,
                 background: bool, queue_bytes: int, lazy: bool, nice: int, written_upto: int,
                 io_error: Callable[[OSError, str], BaseException]) -> None:
        self._disk = disk
        self._rows = rows
        self._stats = stats
        self._cv = cv
        self._queue_bytes_max = queue_bytes
        self._lazy = lazy
        self._nice = nice
        self._io_error = io_error
        self.jobs: deque[WriteJob] = deque()
        self._job_starts: list[int] = []
        self.queued_bytes = 0
        self.seq = 0
        self.done_seq = 0
        self._drain_seq = 0  # lazy writes: a flush asks the writer to write every job up to this one
        # a flush's snapshot: rows alive when it was taken, for the jobs up to its target (the writer
        # writes their data even if they are deleted meanwhile: the commit counts them alive)
        self._flush_alive: np.ndarray | None = None
        self._flush_target = 0
        self._put_waiting = 0  # puts waiting for room in the queue
        self.written_upto = written_upto  # rows below are on disk (written, maybe not yet durable)
        self.error: BaseException | None = None  # a failure not yet raised to a caller
        self.failure: BaseException | None = None  # the latest one, reported or not
        self._paused = False
        self.stopping = False
        self.thread: threading.Thread | None = None
        if background:
            self.thread = threading.Thread(target=self._run, name="folio-store-writer", daemon=True)
            self.thread.start()

    @property
    def background(self) -> bool:
        return self.thread is not None

    # -- what the store calls (lock held) ----------------------------------------------
    def take_error(self) -> BaseException | None:
        """The failure not yet raised to a caller, handed to this one (then cleared)."""
        err, self.error = self.error, None
        return err

    def resume(self) -> None:
        """Let a writer paused by a reported failure retry its queue."""
        alive = self.thread is not None and self.thread.is_alive()
        if self._paused and self.error is None and alive:
            self._paused = False
            self._cv.notify_all()

    def wait_for_room(self, nbytes: int, check: Callable[[], None]) -> None:
        """Back-pressure: wait until a job of `nbytes` fits the queue (`check()` after each wake-up)."""
        self._put_waiting += 1
        try:
            while self.jobs and self.queued_bytes + nbytes > self._queue_bytes_max:
                self._cv.notify_all()  # (a lazy writer writes while a put waits)
                self._cv.wait()
                check()
        finally:
            self._put_waiting -= 1

    def submit(self, start: int, k: np.ndarray, v: np.ndarray, landmarks: np.ndarray,
               codes: np.ndarray, ords: np.ndarray) -> None:
        """Queue rows [start, start + N) for the writer; without one, record them as written (the put
        wrote them itself)."""
        self.seq += 1
        job = WriteJob(self.seq, start, k, v, landmarks, codes, ords)
        if self.thread is None:
            self.written_upto = job.end
            self.done_seq = job.seq
            self._stats.moved["to_disk"] += job.nbytes
            return
        self.jobs.append(job)
        self._job_starts.append(job.start)
        self.queued_bytes += job.nbytes
        if self._may_write():  # (a lazy writer that would go back to sleep is left asleep:
            self._cv.notify_all()  # waking it costs the main thread a GIL hand-over)

    def job_of(self, row: int) -> WriteJob:
        """The queued job holding `row` (row >= written_upto)."""
        return self.jobs[bisect.bisect_right(self._job_starts, row) - 1]

    def wait_written(self, target: int, alive: np.ndarray | None) -> bool:
        """A flush: wait until every job up to `target` is written (True) or the writer paused on a
        failure (False). alive: the rows the flush's commit counts alive (written even if deleted
        meanwhile), or None."""
        if alive is not None:
            self._flush_alive, self._flush_target = alive, target
        try:
            self._drain_seq = max(self._drain_seq, target)  # a lazy writer writes up to here now
            self._cv.notify_all()
            # (paused, not failed: another call may have taken the error first)
            while self.done_seq < target and not self._paused:
                self._cv.wait()
        finally:
            self._flush_alive = None
        return self.done_seq >= target

    def stop(self) -> None:
        """Stop the writer (what is still queued stays unwritten) and wait for it. Lock not held."""
        with self._cv:
            self.stopping = True
            self._cv.notify_all()
        if self.thread is not None:
            self.thread.join()

    # -- the writer thread --------------------------------------------------------------
    def _run(self) -> None:
        if self._nice and hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
            try:  # on Linux a thread's priority is its own (PRIO_PROCESS with the thread id)
                tid = threading.get_native_id()
                os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + self._nice)
            except OSError:
                pass  # not allowed here: write at the process's priority
        try:
            self._write_jobs()
        except BaseException as e:  # never die silently: put/flush would wait on it forever
            with self._cv:
                if self.error is None:
                    self.error = self.failure = e
                self._paused = True  # for good: resume() does not revive a dead thread
                self._cv.notify_all()
            raise

    def _may_write(self) -> bool:
        """(Lock held.) Whether the writer takes the next job now (or, with no jobs, stops)."""
        if self._paused:  # after a failure: until resumed, or stopped (the queue stays unwritten)
            return self.stopping
        if not self.jobs:
            return self.stopping
        if self.stopping or not self._lazy:
            return True
        return (self.queued_bytes > self._queue_bytes_max // 2 or self._put_waiting > 0
                or self._drain_seq >= self.jobs[0].seq)

    def _write_jobs(self) -> None:
        while True:
            with self._cv:
                while not self._may_write():
                    self._cv.wait()
                if not self.jobs or self._paused:
                    return
                job = self.jobs[0]
                alive = self._rows.alive[job.start:job.end].copy()
                if self._flush_alive is not None and job.seq <= self._flush_target:
                    alive |= self._flush_alive[job.start:job.end]
            try:
                if alive.all():
                    self._disk.write_rows(job.start, job.k, job.v, job.landmarks, job.codes, job.ordinals)
                else:  # rows deleted while queued (their stream ended): never written, only recorded
                    for a, b in _runs(~alive):
                        self._disk.write_rows_meta(job.start + a, job.codes[a:b], job.ordinals[a:b])
                    for a, b in _runs(alive):
                        self._disk.write_rows(job.start + a, job.k[a:b], job.v[a:b], job.landmarks[a:b],
                                              job.codes[a:b], job.ordinals[a:b])
            except Exception as e:  # raised to the next put/flush/close; the job stays queued for a retry
                with self._cv:
                    self.error = self.failure = (
                        self._io_error(e, f"the background writer, writing blocks {job.start}-{job.end - 1},")
                        if isinstance(e, OSError) else e)
                    self._paused = True
                    self._cv.notify_all()
                continue
            with self._cv:
                self.jobs.popleft()
                self._job_starts.pop(0)
                self.queued_bytes -= job.nbytes
                self.written_upto = job.end
                self.done_seq = job.seq
                written = job.nbytes * int(alive.sum()) // len(alive)
                self._stats.moved["to_disk"] += written
                self._stats.moved["never_written"] += job.nbytes - written
                self._cv.notify_all()
