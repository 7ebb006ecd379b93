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
reuse for a few seconds (a decay of 5 s, and no separate muzzy stage) instead of being
returned at once. A training step allocates and frees the same
megabyte-sized tensors (attention tiles, activations, gradients) every step; returning them
makes every step fault the pages in again. Measured on the 2-core test machine (tiny preset,
4 lanes, plain loop, three interleaved runs each): glibc malloc 54 / 71 ms per step (without /
with retrieval), jemalloc's defaults 62 / 82 ms, jemalloc keeping freed pages forever
(decay -1, the setting before this one) 51 / 65 ms. Forever was wrong for a bigger model:
the SmolLM2-135M LoRA fine-tune (49k-token vocabulary, window 512) grew +250 MB of RSS per
step until the kernel killed it at 24 GB, with the huge-allocation arena purging too; with
a 5 s decay its RSS stayed at 2.4 GB over 10 steps (glibc's malloc: 5.0 GB), same step time.

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
TRAINING_DECAY_MS = (5000, 5000)
TRAINING_CONF = "dirty_decay_ms:5000,muzzy_decay_ms:5000"  # keep freed pages a while (see above)
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


def _get(f, name: str, ctype):
    v = ctype()
    size = ctypes.c_size_t(ctypes.sizeof(v))
    return int(v.value) if f(name.encode(), ctypes.byref(v), ctypes.byref(size), None, 0) == 0 else None


def _set(f, name: str, value: int) -> bool:
    v = ctypes.c_ssize_t(value)
    return f(name.encode(), None, None, ctypes.byref(v), ctypes.sizeof(v)) == 0


def _huge_arena(f) -> int | None:
    """Index of jemalloc's arena for huge allocations (>= opt.oversize_threshold), if any."""
    if not _get(f, "opt.oversize_threshold", ctypes.c_size_t):
        return None
    return _get(f, "opt.narenas", ctypes.c_uint)  # it follows the automatic arenas


def page_decay(arena: int | None = None) -> tuple[int, int] | None:
    """(dirty, muzzy) decay times in ms (-1: freed pages are kept) that jemalloc gives new
    arenas, or those of one arena; None when jemalloc is not loaded (or no such arena)."""
    f = _mallctl()
    if f is None:
        return None
    scope = "arenas" if arena is None else f"arena.{arena}"
    got = [_get(f, f"{scope}.{kind}_decay_ms", ctypes.c_ssize_t) for kind in ("dirty", "muzzy")]
    return None if None in got else (got[0], got[1])


def set_page_decay(dirty_ms: int, muzzy_ms: int) -> bool:
    """Set jemalloc's decay times at run time: the default for arenas made from now on, then
    every arena in use (its arena of huge allocations as jemalloc itself would: 0 where the
    default decays, it purges those eagerly), and give the pages freed so far back when
    decay is on. False (nothing done) when jemalloc is not loaded."""
    f = _mallctl()
    if f is None:
        return False
    if not (_set(f, "arenas.dirty_decay_ms", dirty_ms) and _set(f, "arenas.muzzy_decay_ms", muzzy_ms)):
        return False
    huge = _huge_arena(f)
    for i in range(_get(f, "arenas.narenas", ctypes.c_uint) or 0):
        d, m = dirty_ms, muzzy_ms
        if i == huge:
            d, m = (0 if d > 0 else d), (0 if m > 0 else m)
        _set(f, f"arena.{i}.dirty_decay_ms", d)  # a slot not in use refuses: it takes the default when made
        _set(f, f"arena.{i}.muzzy_decay_ms", m)
    if dirty_ms >= 0:
        f(b"arena.4096.purge", None, None, None, 0)  # 4096: MALLCTL_ARENAS_ALL
    return True


@contextlib.contextmanager
def kept_pages():
    """Within: jemalloc keeps freed pages (TRAINING_CONF's decay times), when jemalloc is loaded
    and MALLOC_CONF is not set (a process started without `folio`'s re-execution: jemalloc
    preloaded by a container, torchrun, Python); the previous times are restored after.
    `train.loop.train` runs inside it. (Restores with set_page_decay: per-arena times someone
    set by hand inside are not kept.)"""
    prev = None if os.environ.get("MALLOC_CONF") else page_decay()
    changed = prev is not None and prev != TRAINING_DECAY_MS and set_page_decay(*TRAINING_DECAY_MS)
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
