"""Which C allocator the process runs on: jemalloc when the machine has it, else glibc's.

Why: a long ingest frees and allocates megabyte-sized temporaries (attention tiles,
index search tiles, store copies) thousands of times. glibc's malloc serves them from
its main heap, which fragments: its in-use bytes stay flat (~105 MiB through a 384k
ingest) while free-but-resident pages pile up between trims, so peak RSS grows with the
document (bench.inference, glibc: 16k 310 MiB, 256k 390-480 MiB). jemalloc returns those
pages and keeps peak RSS flat at the same speed (256k 329 MiB; measured side by side
in `python -m bench.inference`). It has to be chosen before the process starts
(LD_PRELOAD), so the `folio` command re-executes itself once with jemalloc preloaded
when it finds the library: the system's (Debian/Ubuntu: `apt install libjemalloc2`) or
the copy `make install` unpacks into the virtual environment's lib/ when the system has
none (scripts/fetch_jemalloc.sh: `apt-get download`, which installs nothing).

Training (`folio train`, `folio demo`, `python -m bench.train`) also sets jemalloc's
MALLOC_CONF to TRAINING_CONF unless MALLOC_CONF is already set: freed pages are kept for
reuse instead of being returned to the system. A training step allocates and frees the same
megabyte-sized tensors (attention tiles, activations, gradients) every step; returning them
makes every step fault the pages in again. Measured on the 2-core test machine (tiny preset,
4 lanes, plain loop, three interleaved runs each): glibc malloc 54 / 71 ms per step (without /
with retrieval), jemalloc's defaults 62 / 82 ms, jemalloc with TRAINING_CONF 51 / 65 ms. The
resident set stays at the step's peak (a training step's peak repeats every step).

FOLIO_MALLOC=system (or glibc) turns this off; FOLIO_MALLOC=/path/to/libjemalloc.so.2
names the library. Nothing is downloaded at run time; Linux only (elsewhere this is a no-op).
"""

from __future__ import annotations

import contextlib
import ctypes.util
import os
import sys
from collections.abc import Mapping, Sequence

ENV = "FOLIO_MALLOC"
_DONE = "FOLIO_MALLOC_ACTIVE"  # set in the re-executed process: never re-execute twice
TRAINING_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"  # keep freed pages (see above)
_CANDIDATES = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
               "/usr/lib64/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2")


def venv_copy() -> str:
    """Where scripts/fetch_jemalloc.sh puts jemalloc: <sys.prefix>/lib/libjemalloc.so.2."""
    return os.path.join(sys.prefix, "lib", "libjemalloc.so.2")


def find_jemalloc(env: Mapping[str, str] | None = None) -> str | None:
    """Path of the jemalloc shared library to preload, or None (absent, disabled, not Linux)."""
    env = os.environ if env is None else env
    choice = env.get(ENV, "auto").strip()
    if choice.lower() in ("system", "glibc", "off", "0", "none") or not sys.platform.startswith("linux"):
        return None
    if choice and choice.lower() != "auto":
        if not os.path.isfile(choice):
            raise ValueError(f"{ENV}={choice!r}: no such file; use 'auto', 'system' or a path to libjemalloc.so")
        return choice
    for path in (*_CANDIDATES, venv_copy()):
        if os.path.isfile(path):
            return path
    name = ctypes.util.find_library("jemalloc")
    return name if name and os.path.isabs(name) else None


def preload_env(env: Mapping[str, str] | None = None, conf: str | None = None) -> dict[str, str] | None:
    """The environment to re-execute with (jemalloc preloaded; MALLOC_CONF=conf unless
    MALLOC_CONF is set already), or None when there is nothing to do: no jemalloc,
    disabled, or already re-executed / preloaded."""
    env = dict(os.environ if env is None else env)
    if env.get(_DONE) or "jemalloc" in env.get("LD_PRELOAD", ""):
        return None
    lib = find_jemalloc(env)
    if lib is None:
        return None
    env["LD_PRELOAD"] = f"{lib} {env['LD_PRELOAD']}".strip() if env.get("LD_PRELOAD") else lib
    env[_DONE] = lib
    if conf and not env.get("MALLOC_CONF"):
        env["MALLOC_CONF"] = conf
    return env


JEMALLOC_DEFAULT_DECAY_MS = (10_000, 0)  # jemalloc 5.3's own dirty / muzzy decay times


def _mallctl():
    """jemalloc's mallctl when jemalloc is loaded into this process, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        f = ctypes.CDLL(None).mallctl
    except (AttributeError, OSError):
        return None
    f.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.c_void_p,
                  ctypes.c_size_t]
    f.restype = ctypes.c_int
    return f


def page_decay() -> tuple[int, int] | None:
    """(dirty, muzzy) decay times in ms of jemalloc's arena 0 (-1: freed pages are kept), or
    None when jemalloc is not loaded."""
    f = _mallctl()
    if f is None:
        return None
    out = []
    for kind in ("dirty", "muzzy"):
        v, size = ctypes.c_ssize_t(), ctypes.c_size_t(ctypes.sizeof(ctypes.c_ssize_t))
        if f(f"arena.0.{kind}_decay_ms".encode(), ctypes.byref(v), ctypes.byref(size), None, 0) != 0:
            return None
        out.append(int(v.value))
    return out[0], out[1]


def set_page_decay(dirty_ms: int, muzzy_ms: int) -> bool:
    """Set jemalloc's decay times at run time, for every arena and the ones made later, and
    give pages freed so far back to the system when decay is on (a training run hands over to
    inference: `folio demo`). False (nothing done) when jemalloc is not loaded."""
    f = _mallctl()
    if f is None:
        return False
    n, size = ctypes.c_uint(), ctypes.c_size_t(ctypes.sizeof(ctypes.c_uint))
    if f(b"arenas.narenas", ctypes.byref(n), ctypes.byref(size), None, 0) != 0:
        return False
    for scope in ["arenas", *(f"arena.{i}" for i in range(n.value))]:
        for kind, ms in (("dirty", dirty_ms), ("muzzy", muzzy_ms)):
            v = ctypes.c_ssize_t(ms)
            # an arena slot not yet in use refuses (it takes the "arenas" default when made)
            if f(f"{scope}.{kind}_decay_ms".encode(), None, None, ctypes.byref(v), ctypes.sizeof(v)) != 0 \
                    and scope == "arenas":
                return False
    if dirty_ms >= 0:
        f(b"arena.4096.purge", None, None, None, 0)  # 4096: MALLCTL_ARENAS_ALL
    return True


@contextlib.contextmanager
def kept_pages():
    """Within: jemalloc keeps freed pages (TRAINING_CONF's decay times), when jemalloc is loaded
    and MALLOC_CONF is not set (a process started without `folio`'s re-execution: jemalloc
    preloaded by a container, torchrun, Python); the previous times are restored after.
    `train.loop.train` runs inside it."""
    prev = None if os.environ.get("MALLOC_CONF") else page_decay()
    changed = prev is not None and prev != (-1, -1) and set_page_decay(-1, -1)
    try:
        yield
    finally:
        if changed:
            set_page_decay(*prev)


def active() -> str:
    """'jemalloc' if it is loaded into this process, else 'system'."""
    try:
        with open("/proc/self/maps") as f:
            return "jemalloc" if "libjemalloc" in f.read() else "system"
    except OSError:
        return "system"


def maybe_reexec(argv: Sequence[str], conf: str | None = None) -> None:
    """Re-execute this Python command (`sys.executable *argv`) with jemalloc preloaded
    (and MALLOC_CONF=conf, see preload_env) when the machine has it. Returns (doing
    nothing) when it does not, or when this already is the re-executed process. Call
    first thing in a console entry point, before heavy imports."""
    env = preload_env(conf=conf)
    if env is None:
        return
    try:
        os.execve(sys.executable, [sys.executable, *argv], env)
    except OSError:
        return  # cannot re-execute here: go on with the system allocator
