"""The fused CPU row kernels of the vectorized landmark attention (engine/landmark_cpu.c).

Built on first use with the machine's C compiler (``$CC``, else ``cc``; about a second)
into a per-user cache (``$FOLIO_KERNEL_CACHE``, else ``~/.cache/folio/kernels``), keyed
by the source, the compiler flags and the CPU, and loaded with ctypes: no torch headers,
no Python extension build. Where no compiler works, `get()` returns None once with a
warning and attention runs the pure-torch path, with the same results (tested).
``FOLIO_CPU_KERNELS=0`` turns the kernels off.

Threads: the kernels split their rows over ``torch.get_num_threads()`` OpenMP threads.
The library links libgomp.so.1; where torch ships its OpenMP runtime under that name (the
PyPI wheels for Linux do), the loader resolves it to torch's own copy: the same thread
pool as torch's ops. A torch built on another OpenMP runtime (renamed libgomp, LLVM's or
Intel's) gets a second pool beside its own.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("landmark_cpu.c")
# Compiled and linked in two steps: -ffast-math only at compile time, because gcc links a
# crtfastmath.o constructor into a -ffast-math *link*, which would switch flush-to-zero on
# for the whole process (for the loading thread only, even) when the library is loaded.
COMPILE_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-c"]
if platform.machine().lower() in ("x86_64", "amd64"):
    COMPILE_FLAGS.insert(2, "-mprefer-vector-width=512")  # AVX-512 exp where the CPU has it (gcc picks 256 otherwise)
LINK_FLAGS = ["-shared", "-fopenmp"]
_CPU_KEYS = ("model name", "flags", "Features", "CPU implementer", "CPU architecture", "CPU variant", "CPU part")
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def enabled() -> bool:
    return os.environ.get("FOLIO_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    if os.environ.get("FOLIO_KERNEL_CACHE"):
        return Path(os.environ["FOLIO_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "folio" / "kernels"


def _cpu_id() -> str:
    """What -march=native code depends on: the CPU's model and features (x86 and Arm)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    seen: dict[str, str] = {}
    for ln in text.splitlines():
        name = ln.split(":", 1)[0].strip()
        if name in _CPU_KEYS and name not in seen:
            seen[name] = ln
    return "\n".join(seen.values()) or platform.machine()


def _compiler(cc: str) -> list[str]:
    return shlex.split(cc)  # CC may carry arguments ("ccache gcc")


def _library_path(cc: str) -> Path:
    """The cached library for this source, compiler (and its version), flags, libc and CPU."""
    try:
        version = subprocess.run([*_compiler(cc), "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    parts = [SOURCE.read_bytes(), " ".join([cc, *COMPILE_FLAGS, *LINK_FLAGS]).encode(), version.encode(),
             repr(platform.libc_ver()).encode(), _cpu_id().encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    return cache_dir() / f"landmark_cpu-{key}.so"


def _private_temp_dir() -> Path:
    """A per-user directory under the temp dir, made 0700 and checked to be this user's and
    writable by nobody else (a library loaded from a directory another user controls would
    run their code)."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    d = Path(tempfile.gettempdir()) / f"folio-kernels-{uid}"
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = d.lstat()
    if not d.is_dir() or d.is_symlink() or (hasattr(os, "getuid") and st.st_uid != uid) or st.st_mode & 0o022:
        raise RuntimeError(f"{d} is not a private directory of this user (owner {st.st_uid}, mode "
                           f"{oct(st.st_mode & 0o777)}): set FOLIO_KERNEL_CACHE to a directory of your own")
    return d


def build(cc: str | None = None) -> Path:
    """Compile the kernels (if not cached) and return the library's path. Raises
    RuntimeError with the compiler's message when the build fails. A cache directory that
    cannot be made or written (read-only home) is replaced by a private one under the
    system's temp dir."""
    cc = cc or os.environ.get("CC") or "cc"
    argv = _compiler(cc)
    if not argv or shutil.which(argv[0]) is None:
        raise RuntimeError(f"no C compiler: {cc!r} is not on PATH (set CC to one)")
    path = _library_path(cc)
    if path.exists():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(path.parent, os.W_OK):
            raise PermissionError(f"{path.parent} is not writable")
    except OSError:
        path = _private_temp_dir() / path.name
        if path.exists():
            return path
    with tempfile.TemporaryDirectory(dir=path.parent) as work:  # atomic: concurrent ranks may build
        obj, lib = os.path.join(work, "landmark_cpu.o"), os.path.join(work, "lib.so")
        for cmd in ([*argv, *COMPILE_FLAGS, "-o", obj, str(SOURCE)], [*argv, *LINK_FLAGS, "-o", lib, obj, "-lm"]):
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if proc.returncode != 0:
                raise RuntimeError(f"building {SOURCE.name} with {cc} failed:\n{proc.stderr.strip()[-2000:]}")
        os.replace(lib, path)
    return path


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    vp, lg, it = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    lib.folio_landmark_fwd.argtypes = [vp, vp, vp, lg, lg, lg, lg, lg, lg, lg, it]
    lib.folio_landmark_fwd.restype = it
    lib.folio_landmark_bwd.argtypes = [vp, vp, vp, vp, vp, lg, lg, lg, lg, lg, lg, lg, it]
    lib.folio_landmark_bwd.restype = it
    lib.folio_max_dot.argtypes = [vp, vp, vp, lg, lg, lg, lg, lg, lg, lg, it]
    lib.folio_max_dot.restype = it
    return lib


def get() -> ctypes.CDLL | None:
    """The loaded kernels, or None (disabled, or no working compiler: warned once)."""
    global _lib, _tried
    if not enabled():
        return None
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            try:
                path = build()
                try:
                    _lib = _load(path)
                except OSError:  # a cached build this machine cannot load (shared cache): rebuild once
                    path.unlink(missing_ok=True)
                    _lib = _load(build())
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                warnings.warn(f"folio: fused CPU attention kernels unavailable, using the torch path "
                              f"(same results, slower): {e}", RuntimeWarning, stacklevel=2)
                _lib = None
            _tried = True
    return _lib


def reset() -> None:
    """Forget the loaded library (tests: rebuild or re-check the environment)."""
    global _lib, _tried
    with _lock:
        _lib, _tried = None, False


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def landmark_forward(lib: ctypes.CDLL, x: torch.Tensor, g: torch.Tensor, present: torch.Tensor | None,
                     C: int, L: int, p0: int) -> None:
    """In place: raw scores x (n_mat, R, nb*L) -> weights P; g (n_mat, R, nb) written.

    present: None or (n_mat, nb_total) uint8. All contiguous float32 on the CPU."""
    n_mat, R, Kc = x.shape
    rc = lib.folio_landmark_fwd(_ptr(x), _ptr(g), _ptr(present), present.shape[1] if present is not None else 0,
                                n_mat, R, C, Kc // L, L, p0, torch.get_num_threads())
    if rc != 0:
        raise MemoryError("folio_landmark_fwd: out of memory for its row scratch")


def landmark_backward(lib: ctypes.CDLL, dp: torch.Tensor, p: torch.Tensor, g: torch.Tensor,
                      delta: torch.Tensor, present: torch.Tensor | None, C: int, L: int, p0: int) -> None:
    """In place: dP (n_mat, R, nb*L) -> gradient wrt the raw scores, from P, g, delta (n_mat, R)."""
    n_mat, R, Kc = dp.shape
    lib.folio_landmark_bwd(_ptr(dp), _ptr(p), _ptr(g), _ptr(delta), _ptr(present),
                           present.shape[1] if present is not None else 0,
                           n_mat, R, C, Kc // L, L, p0, torch.get_num_threads())


def max_scores(queries: torch.Tensor, keys: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """best[b, n] = max over q of queries[b, q] . keys[b, n] without writing the (N x Q) scores.

    queries (B, Q, D), keys (B, N, D): float32 on the CPU, each batch's rows contiguous
    (batches may be strided: a key tile of a larger tensor is read in place). out: None or
    a (B, N) float32 tensor whose rows are contiguous. Returns out (B, N), or None when the
    kernel does not apply (disabled, unbuilt, another device or dtype, Q or N zero): the
    caller then runs its torch path, which computes the same up to float rounding.
    Registered with the landmark index (memory_store/max_scores.py) when this module loads.
    """
    if (queries.device.type != "cpu" or keys.device.type != "cpu" or queries.dtype != torch.float32
            or keys.dtype != torch.float32 or queries.ndim != 3 or keys.ndim != 3):
        return None
    B, Q, D = queries.shape
    N = keys.shape[1]
    if Q == 0 or N == 0 or keys.shape[0] != B or keys.shape[2] != D:
        return None
    lib = get()
    if lib is None:
        return None
    if queries.stride(2) != 1 or queries.stride(1) != D:
        queries = queries.contiguous()
    if keys.stride(2) != 1 or keys.stride(1) != D:
        keys = keys.contiguous()
    if out is None:
        out = torch.empty(B, N, dtype=torch.float32)
    elif out.shape != (B, N) or out.dtype != torch.float32 or out.device.type != "cpu" or (N > 1 and out.stride(1) != 1):
        raise ValueError(f"max_scores: out of shape {tuple(out.shape)} {out.dtype} on {out.device}, expected a "
                         f"({B}, {N}) float32 CPU tensor with contiguous rows")
    rc = lib.folio_max_dot(_ptr(queries), _ptr(keys), _ptr(out), B, Q, N, D, queries.stride(0), keys.stride(0),
                           out.stride(0), torch.get_num_threads())
    if rc != 0:
        raise MemoryError("folio_max_dot: out of memory for its key-tile scratch")
    return out


def _register() -> None:
    from memory_store import max_scores as _ms  # engine imports memory_store (downward), never the reverse

    _ms.set_kernel(max_scores)


_register()
