"""S3Faults: fail, or end the process at, any request memory_store makes to an S3 server.

The seam is s3fs's one door to botocore, `S3FileSystem._call_s3(method, **kwargs)`: every
GET, PUT, DELETE and LIST of the store (zarr's FsspecStore, the lease, the commit records,
the segments) goes through it. Inside a `with S3Faults(...)` block each request gets a
number and is matched against the faults by method ("put_object", "delete_object",
"delete_objects", "get_object", "list_objects_v2", "head_object", ...; "mutating" = the three
that change the bucket) and optionally a key substring; the nth match either raises
OSError(EIO) before the request is sent (the error s3fs gives for a request that failed after
its retries) or ends the process with os._exit(CRASH_EXIT) before it is sent (a writer killed
between two requests). `trace=True` records every request (method, key) in `calls`.

Only the requests of this process are seen; the S3 server is real (moto's server mode in the
tests), so what a fault leaves behind is what a real bucket would hold.
"""

from __future__ import annotations

import errno as errno_mod
import os
import threading
from dataclasses import dataclass

from .faults import CRASH_EXIT

__all__ = ["S3Faults", "S3Fault", "MUTATING"]

MUTATING = ("put_object", "delete_object", "delete_objects", "copy_object", "complete_multipart_upload")


@dataclass
class S3Fault:
    """Match requests of `method` ("mutating": any of MUTATING) whose key contains `key`; act at the nth."""

    method: str = "mutating"
    nth: int = 1
    action: str = "raise"  # "raise" (OSError) or "exit" (os._exit(CRASH_EXIT))
    errno: int = errno_mod.EIO
    key: str = ""
    sticky: bool = False  # every match from the nth on
    seen: int = 0

    def matches(self, method: str, key: str) -> bool:
        ok = method in MUTATING if self.method == "mutating" else method == self.method
        return ok and self.key in key


class S3Faults:
    """A context manager patching s3fs.S3FileSystem._call_s3 (see the module docstring)."""

    def __init__(self, *faults: S3Fault, trace: bool = False) -> None:
        self.faults = list(faults)
        self.trace = trace
        self.calls: list[tuple[str, str]] = []
        self.fired: list[tuple[str, str]] = []
        self._mu = threading.Lock()
        self._saved = None

    def __enter__(self) -> S3Faults:
        import s3fs

        real = s3fs.S3FileSystem._call_s3
        me = self

        async def call_s3(fs, method, *args, **kwargs):
            name = method if isinstance(method, str) else getattr(method, "__name__", str(method))
            key = str(kwargs.get("Key", kwargs.get("Prefix", "")))
            act = None
            with me._mu:
                if me.trace:
                    me.calls.append((name, key))
                for f in me.faults:
                    if f.matches(name, key):
                        f.seen += 1
                        if f.seen == f.nth or (f.sticky and f.seen > f.nth):
                            act = f
                            me.fired.append((name, key))
                            break
            if act is not None:
                if act.action == "exit":
                    os._exit(CRASH_EXIT)
                raise OSError(act.errno, f"injected fault: {name} {key} failed ({os.strerror(act.errno)})")
            return await real(fs, method, *args, **kwargs)

        self._saved = real
        s3fs.S3FileSystem._call_s3 = call_s3
        return self

    def __exit__(self, *exc) -> None:
        import s3fs

        s3fs.S3FileSystem._call_s3 = self._saved

    def clear(self) -> None:
        """No more faults (the server is reachable again)."""
        with self._mu:
            self.faults = []

    def mutating_calls(self) -> list[tuple[str, str]]:
        return [c for c in self.calls if c[0] in MUTATING]
