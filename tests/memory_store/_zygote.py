"""Drive tests/memory_store/_store_proc.py from a test or a script: send commands, wait for lines."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))


class Zygote:
    def __init__(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "_store_proc.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1, env=env,
                                     cwd=os.path.dirname(os.path.dirname(HERE)))
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
