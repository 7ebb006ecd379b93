"""RowMeta: the per-row metadata arrays of the disk tier (block_stream, block_ordinal), buffered.

A batch of rows records its stream codes and ordinals here; they are written through zarr
once per `make_durable()`, before the sync (one read-modify-write per metadata chunk instead
of one per batch). Rows are invisible until the commit that follows, so nothing reads them
earlier. Metadata that failed to be written stays buffered for the next make_durable.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import zarr

from .commit import Durability
from .errors import CorruptBlockError, StoreError, StoreIOError

__all__ = ["RowMeta", "META_CHUNK"]

META_CHUNK = 4096  # rows per chunk of block_stream / block_ordinal


class RowMeta:
    """Buffered writes and crc-checked reads of block_stream (int32) and block_ordinal (int64)."""

    def __init__(self, codes: zarr.Array, ordinals: zarr.Array, durable: Durability, where: str) -> None:
        self._arrays = {"block_stream": codes, "block_ordinal": ordinals}
        self._durable = durable
        self.where = where
        self._pending: list[tuple[int, np.ndarray, np.ndarray]] = []  # (start, codes, ordinals)
        self._lock = threading.Lock()

    def append(self, start: int, stream_codes: np.ndarray, ordinals: np.ndarray) -> None:
        """Buffer rows [start, start + N)'s codes (N,) and ordinals (N,) (copied)."""
        with self._lock:
            self._pending.append((start, np.array(stream_codes, dtype=np.int32, copy=True),
                                  np.array(ordinals, dtype=np.int64, copy=True)))

    def _write_pending_meta(self) -> None:
        """Write the buffered rows, coalescing contiguous runs."""
        with self._lock:
            pending, self._pending = self._pending, []
        if not pending:
            return
        try:
            self._write_runs(pending)
        except BaseException:
            with self._lock:  # not written (or not all): the next make_durable writes them again
                self._pending = pending + self._pending
            raise

    def _write_runs(self, pending: list[tuple[int, np.ndarray, np.ndarray]]) -> None:
        pending.sort(key=lambda t: t[0])
        runs: list[list] = []
        for start, codes, ords in pending:
            if runs and runs[-1][0] + len(runs[-1][1]) == start:
                runs[-1][1] = np.concatenate([runs[-1][1], codes])
                runs[-1][2] = np.concatenate([runs[-1][2], ords])
            else:
                runs.append([start, codes, ords])
        for start, codes, ords in runs:
            n = len(codes)
            for name, arr in self._arrays.items():
                if arr.shape[0] < start + n:  # zarr clips slices silently: never let it drop rows
                    raise StoreError(f"{self.where}: {name} holds {arr.shape[0]} rows, "
                                     f"cannot write rows up to {start + n} (ensure_capacity was skipped)")
            self._arrays["block_stream"][start:start + n] = codes
            self._arrays["block_ordinal"][start:start + n] = ords
            if self._durable.tracks_files:
                for name in self._arrays:
                    for c in range(start // META_CHUNK, (start + n - 1) // META_CHUNK + 1):
                        self._durable.written(os.path.join(self._durable.root, name, f"c.{c}"))

    def read(self, n_rows: int, *, flush: bool) -> tuple[np.ndarray, np.ndarray]:
        """Codes (n_rows,) int32 and ordinals (n_rows,) int64 (flush: write the buffered rows first)."""
        if flush:
            self._write_pending_meta()
        try:
            codes = np.asarray(self._arrays["block_stream"][:n_rows], dtype=np.int32)
            ords = np.asarray(self._arrays["block_ordinal"][:n_rows], dtype=np.int64)
        except ValueError as e:  # zarr's crc32c codec raises ValueError on a checksum mismatch
            raise CorruptBlockError(f"{self.where}: the per-block metadata arrays are corrupt ({e})") from e
        except OSError as e:
            raise StoreIOError(e.errno, f"{self.where}: reading the per-block metadata failed ({e.strerror})",
                               e.filename) from e
        return codes, ords
