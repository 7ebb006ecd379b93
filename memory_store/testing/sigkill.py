"""SIGKILL crash trials: a zygote process that forks store writers and readers, and the checks.

Importing torch costs seconds per process, so one zygote (this module run with `python -m`)
imports everything once and forks a cheap child per writer or reader. Commands on stdin, one
per line:

    writer PATH BATCH_MAX      fork a writer: appends blocks whose contents derive from their ids, flushes,
                               prints "ACK <pid> <n_rows>" after each flush returned; runs until killed
    reader PATH ROUNDS         fork a reader: ROUNDS times opens PATH read-only, checks every visible block
                               bit-exact, prints "READ <pid> <n_rows>" (or "ERR <pid> <message>"), then "END <pid>"
    reap PID                   waitpid(PID); prints "REAPED <pid> <status>"
    quit

Every fork prints "PID <pid>" first. No thread is started in the zygote itself, so forking is safe.
`Zygote` drives it; `run_crash_trials` kills writers at random moments and checks that every
acknowledged flush survived bit-exact (tests/memory_store/test_crash.py, scripts/store_stress.py).
"""

from __future__ import annotations

import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
import traceback

import torch

from .. import StoreConfig, StoreNotFoundError, TieredStore
from .blocks import TEST_LAYOUT as LAYOUT
from .blocks import make_blocks

__all__ = ["Zygote", "run_crash_trials", "check", "block_data"]

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # (the zygote imports memory_store from here)

STREAMS = ("alpha", "beta")


def block_data(block_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The content of block `block_id`: a pure function of the id, so any process can check it."""
    k, v, lm = make_blocks(1, seed=1000 + block_id)
    return k[0], v[0], lm[0]


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def writer(path: str, batch_max: int) -> None:
    cfg = StoreConfig(device_budget_bytes=4 * LAYOUT.block_bytes(), host_budget_bytes=4 * LAYOUT.block_bytes(),
                      save_index="never")
    store = TieredStore.open(path, "a", layout=LAYOUT, config=cfg)
    rng = torch.Generator().manual_seed(os.getpid())
    pid = os.getpid()
    while True:
        n = int(torch.randint(1, batch_max + 1, (1,), generator=rng))
        start = len(store)  # ids are dense here: this writer never deletes
        parts = [block_data(start + i) for i in range(n)]
        stream = STREAMS[start % 2]
        store.put_blocks(stream, *(torch.stack(p) for p in zip(*parts)))
        store.set_stream_meta(stream, {"n_rows_after": start + n})
        store.flush()
        say(f"ACK {pid} {start + n}")


def check(path: str) -> int:
    """Open read-only and verify everything visible; returns the committed row count."""
    with TieredStore.open(path, "r", config=StoreConfig(device_budget_bytes=0, host_budget_bytes=0)) as s:
        n = len(s)
        if n:
            ids = list(range(n))
            want = [block_data(i) for i in ids]
            for layer in range(LAYOUT.n_layers):
                k, v = s.get_layer(ids, layer)
                assert torch.equal(k, torch.stack([w[0][layer] for w in want])), f"K mismatch at layer {layer}"
                assert torch.equal(v, torch.stack([w[1][layer] for w in want])), f"V mismatch at layer {layer}"
            assert len(s.index) == n, f"index has {len(s.index)} keys for {n} blocks"
            lm_ids, _ = s.index.search(0, torch.stack([w[2][0].float() for w in want[-2:]]), k=1)
            assert set(lm_ids.flatten().tolist()) <= set(ids)
            assert sum(len(s.stream_blocks(x)) for x in STREAMS) == n
            metas = [s.get_stream_meta(x).get("n_rows_after", 0) for x in STREAMS]
            assert max(metas) == n, f"stream meta says {metas} but {n} blocks are committed"
        return n


def reader(path: str, rounds: int) -> None:
    pid = os.getpid()
    for _ in range(rounds):
        try:
            say(f"READ {pid} {check(path)}")
        except Exception as e:  # report any failure to the test, which fails on it
            say(f"ERR {pid} {e!r} {traceback.format_exc().replace(chr(10), ' | ')}")
    say(f"END {pid}")


def main() -> None:
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "quit":
            return
        if cmd == "reap":
            _, status = os.waitpid(int(args[0]), 0)
            say(f"REAPED {args[0]} {status}")
            continue
        pid = os.fork()
        if pid:
            say(f"PID {pid}")
            continue
        code = 0
        try:
            if cmd == "writer":
                writer(args[0], int(args[1]))
            elif cmd == "reader":
                reader(args[0], int(args[1]))
        except BaseException:  # the child must never return into the zygote loop
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            os._exit(code)


class Zygote:
    """The zygote process (this module run as a script), driven from a test or a script."""

    def __init__(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1, env=env, cwd=_REPO)
        self.lines: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()
        self.backlog: list[str] = []

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def send(self, cmd: str) -> None:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def expect(self, prefix: str, timeout: float = 60.0) -> str:
        """Next line starting with prefix; other lines are kept in self.backlog."""
        deadline = time.monotonic() + timeout
        for i, line in enumerate(self.backlog):
            if line.startswith(prefix):
                return self.backlog.pop(i)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no line starting with {prefix!r} (backlog {self.backlog[-5:]})")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line.startswith(prefix):
                return line
            self.backlog.append(line)

    def drain(self) -> list[str]:
        while True:
            try:
                self.backlog.append(self.lines.get_nowait())
            except queue.Empty:
                return self.backlog

    def fork(self, cmd: str) -> int:
        self.send(cmd)
        return int(self.expect("PID ").split()[1])

    def reap(self, pid: int) -> int:
        self.send(f"reap {pid}")
        return int(self.expect(f"REAPED {pid} ").split()[2])

    def close(self) -> None:
        try:
            self.send("quit")
            self.proc.wait(timeout=10)
        except (BrokenPipeError, subprocess.TimeoutExpired):
            self.proc.kill()


def run_crash_trials(z: Zygote, path: str, trials: int, seed: int, max_delay: float = 0.25) -> list[tuple[int, int]]:
    """Returns (acknowledged rows, visible rows) per trial; raises AssertionError on any violation."""
    rnd = random.Random(seed)
    results = []
    acked_total = 0
    for _ in range(trials):
        pid = z.fork(f"writer {path} 3")
        time.sleep(rnd.uniform(0.0, max_delay) + (0.3 if not acked_total else 0.0))  # the first open creates
        os.kill(pid, signal.SIGKILL)
        status = z.reap(pid)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"writer ended early: {status}"
        for line in z.drain():
            if line.startswith(f"ACK {pid} "):
                acked_total = max(acked_total, int(line.split()[2]))
        z.backlog.clear()
        try:
            visible = check(path)  # bit-exact contents, index, stream meta (raises on violation)
        except StoreNotFoundError:
            if acked_total:
                raise
            visible = 0  # killed before its first commit created the store (a loaded machine): nothing promised
        assert visible >= acked_total, f"acknowledged {acked_total} blocks but only {visible} survived"
        results.append((acked_total, visible))
        acked_total = visible  # a commit can land after its ACK line was lost
    return results


if __name__ == "__main__":
    main()
