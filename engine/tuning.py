"""Tile sizes of the attention kernels, in one torch-free module.

The kernels (engine/attention.py) and the memory planner (plan/) both read these, so
the planner's activation model follows the kernels without importing torch.
"""

from __future__ import annotations

VECTORIZED_Q_CHUNK = 128
"""Query rows per chunk of `landmark_attention` (times the G query heads of a KV head)."""
BLOCKWISE_Q_CHUNK = 256
"""Query rows per tile of `landmark_attention_blockwise` (its default q_chunk)."""
BLOCKWISE_K_CHUNK = 512
"""Key columns per blockwise tile when the key axis is long."""
BLOCKWISE_ONE_TILE_MAX = 1024
"""Key axes up to this (padded) length run as one blockwise tile."""


def default_k_chunk(n_keys: int, block_len: int) -> int:
    """The blockwise kernel's default key tile: the whole key axis (padded to whole blocks)
    when it is at most BLOCKWISE_ONE_TILE_MAX positions (retrieval and training shapes: one
    tile is faster than two, forward and backward), else BLOCKWISE_K_CHUNK rounded down to
    whole blocks."""
    padded = -(-n_keys // block_len) * block_len
    if padded <= BLOCKWISE_ONE_TILE_MAX:
        return max(block_len, padded)
    return max(block_len, (BLOCKWISE_K_CHUNK // block_len) * block_len)
