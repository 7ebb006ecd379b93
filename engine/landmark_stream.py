"""The token stream an ingest prefills: ordinary tokens with a landmark after every block's
ordinary tokens, built a piece at a time so that a long document's landmarked copy is never
held whole."""

from __future__ import annotations

import torch

from engine.landmarks import insert_landmarks


class LandmarkedStream:
    """`insert_landmarks(cat([tail, new]))`, made a piece at a time: slices are read in
    increasing order, and only the positions from the block holding the last slice's start
    on are kept, so the memory does not grow with the document (a 1M-token document as
    int64 with landmarks would be ~8.5 MB, and ~40 MB of temporaries to build it)."""

    PIECE_BLOCKS = 256  # blocks landmarked per piece

    def __init__(self, tail: torch.Tensor, new: torch.Tensor, block_len: int, landmark: int | None):
        self.tail, self.new, self.L, self.landmark = tail, new, block_len, landmark
        self._per = block_len - 1 if landmark is not None else block_len  # ordinary tokens per block
        self._n_ord = tail.numel() + new.numel()  # ordinary tokens, tail included
        self._numel = self._n_ord + (self._n_ord // self._per if landmark is not None else 0)
        self._piece_ord = self.PIECE_BLOCKS * self._per  # ordinary tokens per piece
        self._buf = torch.empty(0, dtype=torch.long)
        self._buf_start = 0  # stream position (in this sequence) of _buf[0]
        self._next_ord = 0  # ordinary tokens (tail included) landmarked so far

    def numel(self) -> int:
        return self._numel

    def ordinary_before(self, pos: int) -> int:
        """Ordinary tokens (tail included) among the first `pos` positions."""
        return pos - pos // self.L if self.landmark is not None else pos

    def _ordinary(self, a: int, b: int) -> torch.Tensor:
        """Ordinary tokens [a, b) of cat([tail, new]) as int64."""
        nt = self.tail.numel()
        parts = []
        if a < nt:
            parts.append(self.tail[a:min(b, nt)])
        if b > nt:
            parts.append(self.new[max(a - nt, 0):b - nt].to(torch.long))
        return torch.cat(parts) if len(parts) > 1 else parts[0].to(torch.long)

    def slice(self, a: int, b: int) -> torch.Tensor:
        """Positions [a, b); a never decreases below the block of an earlier slice's start."""
        if a < self._buf_start:
            raise ValueError(f"LandmarkedStream: position {a} was already released")
        keep = (a // self.L) * self.L  # _commit reads the unfinished block from its start
        if keep > self._buf_start:
            self._buf = self._buf[keep - self._buf_start:]
            self._buf_start = keep
        while self._buf_start + self._buf.numel() < b and self._next_ord < self._n_ord:
            hi = min(self._n_ord, self._next_ord + self._piece_ord)  # pieces start at block boundaries
            piece = self._ordinary(self._next_ord, hi)
            if self.landmark is not None:
                piece = insert_landmarks(piece, self.L, self.landmark)
            self._buf = torch.cat([self._buf, piece])
            self._next_ord = hi
        return self._buf[a - self._buf_start:b - self._buf_start]

    def __getitem__(self, sl: slice) -> torch.Tensor:
        return self.slice(sl.start, sl.stop)
