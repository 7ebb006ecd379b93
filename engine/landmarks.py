"""Landmark token layout: where landmarks go and which targets they mask.

A landmark is inserted after every `block_len - 1` ordinary tokens, so position p of
a landmarked sequence is a landmark exactly when `p % block_len == block_len - 1`.
Sequences (and training windows) start at a block boundary. A landmark's own logits
predict the next ordinary token; the position before a landmark predicts nothing
(the landmark is inserted, not predicted).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

IGNORE_INDEX = -100


def _check_block_len(block_len: int) -> None:
    if not isinstance(block_len, int) or block_len < 2:
        raise ValueError(f"block_len={block_len!r} is invalid: must be an int >= 2")


def insert_landmarks(tokens: Sequence[int] | torch.Tensor, block_len: int, landmark_id: int,
                     *, offset: int = 0) -> torch.Tensor:
    """Insert a landmark after every `block_len - 1` ordinary tokens.

    tokens: (n,) ordinary token ids. `offset` is how many ordinary tokens of the current
    (unfinished) block precede `tokens` in their stream, so a stream can be landmarked in
    pieces. Returns (n + number of landmarks,) int64; a landmark is added after the last
    token only when it completes a block.
    """
    _check_block_len(block_len)
    per = block_len - 1
    if not 0 <= offset < per:
        raise ValueError(f"offset={offset} is invalid: allowed 0..{per - 1}")
    t = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)  # (n,)
    n = t.numel()
    if n == 0:
        return t.clone()
    # ordinary token i (0-based in this piece) has in-block index (offset + i) % per;
    # a landmark follows it when that index is per - 1.
    idx = torch.arange(n)
    n_lm_before = (offset + idx) // per  # landmarks inserted before token i (in this piece)
    out_len = n + (offset + n) // per
    out = torch.full((out_len,), landmark_id, dtype=torch.long)
    out[idx + n_lm_before] = t
    return out


def landmark_positions(T: int, block_len: int, *, start: int = 0,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """(T,) bool: which positions start..start+T-1 are landmark slots."""
    _check_block_len(block_len)
    pos = torch.arange(start, start + T, device=device)
    return pos % block_len == block_len - 1


def strip_landmarks(tokens: torch.Tensor, landmark_id: int) -> torch.Tensor:
    """Drop landmark tokens from a 1-D sequence."""
    return tokens[tokens != landmark_id]


def next_token_targets(tokens: torch.Tensor, landmark_id: int, pad_id: int) -> torch.Tensor:
    """Next-token targets for a landmarked batch.

    tokens: (B, T). Returns (B, T) int64: targets[:, t] = tokens[:, t + 1], with
    IGNORE_INDEX where that next token is a landmark or padding, and at t = T - 1.
    """
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be (B, T), got shape {tuple(tokens.shape)}")
    tgt = torch.full_like(tokens, IGNORE_INDEX)
    nxt = tokens[:, 1:]
    tgt[:, :-1] = torch.where((nxt == landmark_id) | (nxt == pad_id),
                              torch.full_like(nxt, IGNORE_INDEX), nxt)
    return tgt
