"""RowTable: which row (block id) belongs to which stream, at which ordinal, and whether it is live.

Plain numpy and dicts, no tensors and no I/O, so it is tested on its own (like eviction.py).
Row r is block id r; ids are never reused. A stream's rows are kept as a list of id arrays in
ordinal order (one array per put), concatenated on demand. Not thread-safe: the store calls it
under its lock.

Shape letters: N rows.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch

from .commit import StreamRecord
from .errors import CorruptBlockError, InvalidArgumentError, ShapeError, UnknownBlockError

__all__ = ["RowTable", "as_ids", "check_finite", "check_parts", "check_stream_name"]

MAX_STREAM_NAME = 1024  # characters; a name is a label in the commit record, not a path


def check_stream_name(stream: object) -> str:
    """`stream` if it is a valid new stream name, else InvalidArgumentError saying why: a non-empty
    str of at most MAX_STREAM_NAME characters, without path separators (names print as paths and
    file names in tools), control characters (they break one-line output) or lone surrogates (not
    encodable as UTF-8)."""
    if not isinstance(stream, str) or not stream:
        raise InvalidArgumentError(f"stream={stream!r}: expected a non-empty str")
    if len(stream) > MAX_STREAM_NAME:
        raise InvalidArgumentError(f"stream name of {len(stream)} characters: at most {MAX_STREAM_NAME} allowed")
    bad = next((c for c in stream if c in "/\\" or ord(c) < 32 or 127 <= ord(c) < 160
                or 0xD800 <= ord(c) < 0xE000), None)
    if bad is not None:
        what = "a path separator" if bad in "/\\" else "a lone surrogate" if ord(bad) >= 0xD800 \
            else "a control character"
        raise InvalidArgumentError(f"stream={stream!r}: holds {what} ({bad!r}); stream names are printable text "
                                   f"without '/' or '\\'")
    if stream in (".", ".."):
        raise InvalidArgumentError(f"stream={stream!r}: not a name (use e.g. the document's file name)")
    return stream


def check_parts(parts: object) -> list[tuple[str, int]]:
    """A put's (stream, n_blocks) pairs, checked. InvalidArgumentError otherwise."""
    if isinstance(parts, (str, bytes)):
        raise InvalidArgumentError(f"parts={parts!r}: expected a sequence of (stream, n_blocks) pairs")
    checked = []
    for part in parts:
        if not (isinstance(part, (tuple, list)) and len(part) == 2):
            raise InvalidArgumentError(f"part {part!r}: expected a (stream, n_blocks) pair")
        stream, n_part = part
        check_stream_name(stream)
        if not isinstance(n_part, (int, np.integer)) or isinstance(n_part, bool) or n_part < 0:
            raise InvalidArgumentError(f"part ({stream!r}, {n_part!r}): n_blocks must be an int >= 0")
        checked.append((stream, int(n_part)))
    return checked


def check_finite(tensors: Sequence[torch.Tensor], names: Sequence[str], streams: Sequence[str]) -> None:
    """InvalidArgumentError naming the tensor, block and stream when a put's CPU tensors (N, ...) hold
    NaN or Inf: a non-finite key or value would turn every later attention over it into NaN."""
    for t, name in zip(tensors, names):
        if not t.is_floating_point() or bool(torch.isfinite(t).all()):
            continue
        i = int((~torch.isfinite(t).reshape(t.shape[0], -1).all(dim=1)).nonzero()[0, 0])
        raise InvalidArgumentError(f"{name} holds NaN or Inf in block {i} of this put (stream {streams[i]!r}); "
                                   f"the store takes finite values only")


def as_ids(ids: Sequence[int] | torch.Tensor | np.ndarray | int) -> np.ndarray:
    """Block ids as a 1-D int64 array. ShapeError for a 2-D or non-integer input."""
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.ndim > 1:
        raise ShapeError(f"block ids must be a 1-D sequence, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ShapeError(f"block ids must be integers, got dtype {arr.dtype}")
    return arr.reshape(-1).astype(np.int64)


class RowTable:
    """Per-row stream code, ordinal and live flag, and the stream table, for rows < next_id."""

    def __init__(self, streams: Sequence[StreamRecord], codes: np.ndarray, ords: np.ndarray, *, where: str = "") -> None:
        """streams: the committed stream table (copied); codes (N,) int32 and ords (N,) int64 of the
        committed rows. CorruptBlockError when a code names no stream."""
        n = codes.shape[0]
        self.streams: list[StreamRecord] = copy.deepcopy(list(streams))
        self.stream_code: dict[str, int] = {s.name: c for c, s in enumerate(self.streams) if s.alive}
        if n and (codes.min() < 0 or codes.max() >= len(self.streams)):
            raise CorruptBlockError(f"{where}: block_stream holds codes outside the {len(self.streams)} streams")
        cap = max(64, n)
        self.codes = np.full(cap, -1, dtype=np.int32)
        self.ords = np.zeros(cap, dtype=np.int64)
        self.alive = np.zeros(cap, dtype=bool)
        self.codes[:n], self.ords[:n] = codes, ords
        alive_codes = np.array([s.alive for s in self.streams] or [False], dtype=bool)
        self.alive[:n] = alive_codes[codes] if n else False
        self.n_alive = int(self.alive[:n].sum())  # live rows (len(store)), kept in step with alive
        self.stream_rows: dict[int, list[np.ndarray]] = {}
        for code in self.stream_code.values():
            rows = np.flatnonzero(codes == code).astype(np.int64)
            self.stream_rows[code] = [rows[np.argsort(ords[rows], kind="stable")]]
        self.next_id = n

    # -- lookups ------------------------------------------------------------------------
    def check_ids(self, ids: Sequence[int] | torch.Tensor | np.ndarray) -> np.ndarray:
        """The ids as rows (M,) int64; UnknownBlockError unless every one is live."""
        rows = as_ids(ids)
        inside = (rows >= 0) & (rows < self.next_id)
        ok = inside.copy()
        ok[inside] = self.alive[rows[inside]]
        if not ok.all():
            bad = rows[~ok][:8].tolist()
            raise UnknownBlockError(f"unknown block ids {bad}{' ...' if (~ok).sum() > 8 else ''}: never put, "
                                    f"deleted, or not committed when this store was opened")
        return rows

    def is_live(self, row: int) -> bool:
        return 0 <= row < self.next_id and bool(self.alive[row])

    def rows_of(self, stream: str) -> np.ndarray:
        """Rows of a live stream in ordinal order ((0,) for an unknown stream)."""
        code = self.stream_code.get(stream)
        parts = self.stream_rows.get(code, []) if code is not None else []
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def live_stream_rows(self) -> list[tuple[str, np.ndarray]]:
        """(name, rows in ordinal order) of every live stream."""
        return [(name, self.rows_of(name)) for name in self.stream_code]

    def names(self, rows: np.ndarray) -> list[str]:
        return [self.streams[c].name for c in self.codes[rows].tolist()]

    def live_streams(self) -> list[str]:
        return [s.name for s in self.streams if s.alive]

    def meta_of(self, stream: str) -> dict:
        code = self.stream_code.get(stream)
        return copy.deepcopy(self.streams[code].meta) if code is not None else {}

    def snapshot_streams(self) -> list[StreamRecord]:
        """A copy of the stream table, for a commit record."""
        return copy.deepcopy(self.streams)

    # -- changes ------------------------------------------------------------------------
    def grow(self, n: int) -> None:
        """Make room for rows < n (doubling); called before anything changes, so a put cannot fail half-way."""
        if n <= self.codes.shape[0]:
            return
        cap = max(n, 2 * self.codes.shape[0])
        self.codes = np.concatenate([self.codes, np.full(cap - self.codes.shape[0], -1, np.int32)])
        self.ords = np.concatenate([self.ords, np.zeros(cap - self.ords.shape[0], np.int64)])
        self.alive = np.concatenate([self.alive, np.zeros(cap - self.alive.shape[0], bool)])

    def plan(self, parts: Sequence[tuple[str, int]]) -> tuple[np.ndarray, np.ndarray]:
        """Stream codes (N,) int32 and ordinals (N,) int64 that appending `parts` ((stream, n) each,
        N = sum of n) would give, new streams taking the next codes in order. Changes nothing."""
        n = sum(c for _, c in parts)
        codes = np.empty(n, dtype=np.int32)
        ords = np.empty(n, dtype=np.int64)
        new_codes: dict[str, int] = {}
        given: dict[int, int] = {}  # code -> ordinals given out by these parts
        off = 0
        for stream, n_part in parts:
            if n_part == 0:
                continue
            code = self.stream_code.get(stream, new_codes.get(stream))
            if code is None:
                code = new_codes[stream] = len(self.streams) + len(new_codes)
            first_ord = (self.streams[code].n_blocks if code < len(self.streams) else 0) + given.get(code, 0)
            given[code] = given.get(code, 0) + n_part
            codes[off:off + n_part] = code
            ords[off:off + n_part] = np.arange(first_ord, first_ord + n_part)
            off += n_part
        return codes, ords

    def append(self, parts: Sequence[tuple[str, int]], ids: Sequence[np.ndarray], codes: np.ndarray,
               ords: np.ndarray) -> None:
        """Append the rows `plan(parts)` gave (codes, ords) at next_id, ids[i] (next_id onwards) being
        part i's. Call grow(next_id + N) first."""
        start = self.next_id
        n = codes.shape[0]
        for (stream, n_part), part_ids in zip(parts, ids):
            if n_part == 0:
                continue
            code = int(codes[part_ids[0] - start])
            if code == len(self.streams):  # a new stream (codes were given in this order)
                self._new_stream(stream)
            self.streams[code].n_blocks += n_part
            self.stream_rows[code].append(part_ids)
        self.codes[start:start + n], self.ords[start:start + n], self.alive[start:start + n] = codes, ords, True
        self.n_alive += n
        self.next_id = start + n

    def delete_stream(self, stream: str) -> np.ndarray | None:
        """Mark every row of a live stream dead and the stream deleted; returns its rows (None: unknown)."""
        code = self.stream_code.pop(stream, None)
        if code is None:
            return None
        parts = self.stream_rows.pop(code)
        rows = np.concatenate(parts) if parts else np.empty(0, np.int64)
        self.streams[code].alive = False
        self.n_alive -= int(self.alive[rows].sum())
        self.alive[rows] = False
        return rows

    def set_meta(self, stream: str, meta: dict) -> None:
        """Replace a stream's metadata, creating the stream (with no rows) when new."""
        code = self.stream_code.get(stream)
        if code is None:
            code = self._new_stream(stream)
        self.streams[code].meta = meta

    def _new_stream(self, stream: str) -> int:
        code = len(self.streams)
        self.streams.append(StreamRecord(stream))
        self.stream_code[stream] = code
        self.stream_rows[code] = []
        return code
