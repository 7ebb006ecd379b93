"""`folio train` in a child process that SIGKILLs itself at a point the test chooses.

    python tests/train/_kill_child.py WHERE N train --preset smoke ...

WHERE is "backward" (the N-th DeepSpeed backward of this process: mid training step, after
the forward and before the optimizer update) or "write_model" (the N-th checkpoint's
model.safetensors has just been written: DeepSpeed's files are there, folio_meta.json is
not, so the step folder is half-written). The hook lives here, in the test's child, so the
production code has no test switch and the kill lands at the same point on every run.
"""

from __future__ import annotations

import os
import signal
import sys


def _kill_on_call(owner: object, name: str, n: int, *, after: bool) -> None:
    real = getattr(owner, name)
    calls = [0]

    def hooked(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n and not after:
            os.kill(os.getpid(), signal.SIGKILL)
        out = real(*args, **kwargs)
        if calls[0] == n and after:
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    setattr(owner, name, hooked)


def main() -> int:
    where, n, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    if where == "backward":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from deepspeed.runtime.engine import DeepSpeedEngine

        _kill_on_call(DeepSpeedEngine, "backward", n, after=False)
    elif where == "write_model":
        import train.loop

        _kill_on_call(train.loop, "write_model", n, after=True)
    else:
        raise SystemExit(f"unknown kill point {where!r}")
    from train.cli import main as folio

    return folio(argv)


if __name__ == "__main__":
    sys.exit(main())
