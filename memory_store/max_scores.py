"""The max-aggregated scores of exact search: best[b, n] = max over q of queries[b, q] . keys[b, n].

`LandmarkIndex.search_max` and `search_max_lanes` (a chunk's queries choose blocks by their
best score over the chunk) reduce a (keys x queries) score matrix with a max. In torch that
is a batched matmul per key tile followed by a max over the tile's scores: at a 1M-token
ingest of the tiny model (16k blocks, 768 queries per chunk) that product was 40% of the
ingest's time. A fused CPU kernel (engine/landmark_cpu.c, `folio_max_dot`) computes the
same without writing the scores, 1.3-1.5x faster on this machine (bench/search_max.py); engine/cpu_kernels.py
registers it here when it loads (memory_store imports nothing from engine: nothing
imports upward). Without it (no C compiler, FOLIO_CPU_KERNELS=0, a GPU, another dtype)
the torch path runs; the two agree up to float rounding (tested).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["max_scores", "set_kernel", "kernel"]

_MAX_CHUNK_ELEMS = 1 << 20  # scores per key tile of the torch path (cache-sized; GPUs do not mind)

# fn(queries (B, Q, D), keys (B, N, D), out (B, N)) -> out, or None where it does not apply
_kernel: Callable[..., torch.Tensor | None] | None = None


def set_kernel(fn: Callable[..., torch.Tensor | None] | None) -> None:
    """Register the fused kernel (None: the torch path only)."""
    global _kernel
    _kernel = fn


def kernel() -> Callable[..., torch.Tensor | None] | None:
    """The registered kernel, or None."""
    return _kernel


def max_scores(queries: torch.Tensor, keys: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[b, n] = max over q of queries[b, q] . keys[b, n]; returns out.

    queries (B, Q, D) with Q >= 1, keys (B, N, D), out (B, N) float32 (a view of a larger
    tensor is fine), all on one device. The registered kernel where it applies, else key
    tiles small enough that each (B, C, Q) score tile stays in cache for its max (faster
    on CPU than one big matmul followed by a strided reduction).
    """
    if keys.shape[1] == 0:
        return out
    if _kernel is not None and out.stride(-1) == 1:
        r = _kernel(queries, keys, out)
        if r is not None:
            return out
    B, Q = queries.shape[0], queries.shape[1]
    qt = queries.transpose(1, 2)  # (B, D, Q): bmm reads the transpose as it is
    chunk = max(64, _MAX_CHUNK_ELEMS // max(1, B * Q))
    for start in range(0, keys.shape[1], chunk):
        end = min(keys.shape[1], start + chunk)
        out[:, start:end] = torch.bmm(keys[:, start:end], qt).amax(dim=2)  # (B, C)
    return out
