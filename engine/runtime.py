"""Process set-up, in one place: the C allocator, its page-decay phases, heap trims, threads.

Long ingests and training steps free and allocate megabyte-sized temporaries thousands of
times; glibc's malloc keeps the freed pages and RSS grows with the document, jemalloc gives
them back. jemalloc must be chosen before the process starts (LD_PRELOAD), so entry points
call `enter`, which re-executes the command once with it preloaded when the machine has it
(the system's `libjemalloc2`, or the copy scripts/fetch_jemalloc.sh puts in the virtual
environment). Training keeps freed pages a few seconds (TRAINING_CONF): a step reuses the same
tensors every step, and returning them would fault them in again; inference uses jemalloc's
defaults. FOLIO_MALLOC=system turns jemalloc off; FOLIO_MALLOC=/path/libjemalloc.so.2 names it.
Nothing is downloaded at run time; Linux only (elsewhere every call here is a no-op).
"""

from __future__ import annotations

import contextlib
import ctypes.util
import os
import sys
from collections.abc import Iterator, Mapping, Sequence

ENV = "FOLIO_MALLOC"
_DONE = "FOLIO_MALLOC_ACTIVE"  # set in the re-executed process: never re-execute twice
TRAINING_DECAY_MS = (5000, 5000)
TRAINING_CONF = "dirty_decay_ms:5000,muzzy_decay_ms:5000"  # freed pages kept 5 s (forever grew RSS without bound)
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
def training_phase():
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


def inference_phase() -> None:
    """After training in the same process (`folio demo`): back to jemalloc's default decay,
    which keeps a long ingest's peak RSS lower. Only when the training setting is folio's own
    (set by `enter`), never a MALLOC_CONF the user chose."""
    if os.environ.get("MALLOC_CONF") == TRAINING_CONF:
        set_page_decay(*JEMALLOC_DEFAULT_DECAY_MS)


_MALLOC_TRIM = None


def trim_heap() -> None:
    """Give freed C-heap pages back to the OS (glibc's malloc_trim; a no-op elsewhere). A long
    ingest's temporaries change size as the store grows, and glibc keeps their pages."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            _MALLOC_TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


def set_threads(n: int | None) -> None:
    """Threads of torch's CPU ops (and the fused kernels, which follow torch); None: unchanged."""
    if n is not None:
        import torch

        torch.set_num_threads(n)


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """torch's CPU ops on n threads inside the block (a measurement at one thread), then back."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def child_env(*, malloc: str | None = None, default_threads: int | None = None,
              mmap_threshold: int | None = None) -> dict[str, str]:
    """The environment of a child process that measures something: this one's, with
    FOLIO_MALLOC=malloc, OMP_NUM_THREADS=default_threads unless set already, and glibc's
    mmap threshold fixed (MALLOC_MMAP_THRESHOLD_: its dynamic threshold moves RSS by run)."""
    env = dict(os.environ)
    if malloc is not None:
        env[ENV] = malloc
    if default_threads is not None:
        env.setdefault("OMP_NUM_THREADS", str(default_threads))
    if mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    return env


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


def enter(argv: Sequence[str], *, training: bool = False) -> None:
    """Process set-up of an entry point, first thing (before torch loads): re-execute with
    jemalloc preloaded when the machine has it, keeping freed pages when `training`.
    ValueError: FOLIO_MALLOC names no file."""
    maybe_reexec(argv, conf=TRAINING_CONF if training else None)
