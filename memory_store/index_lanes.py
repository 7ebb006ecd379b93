"""Batched max-aggregated search over several lanes, each over its own streams (mixed into LandmarkIndex).

Training searches every lane's window at once (4 lanes x 1,024 queries per layer): one
batched matmul per key tile over the lanes' keys, padded to the longest lane.
Shape letters: B lanes, Q queries, H KV heads, D head_dim, m keys of the longest lane.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .errors import LandmarkIndexError, ShapeError
from .max_scores import max_scores

__all__ = ["LanesSearch"]


class LanesSearch:
    """search_max_lanes and the cached lane layout it scores over."""

    def search_max_lanes(self, layer: int, queries: torch.Tensor, k: int,
                         streams: Sequence[Sequence[str]], key_map: torch.Tensor | None = None, *,
                         heads_first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """`search_max` for several lanes at once, each over its own streams.

        queries (B, Q, n_kv_heads, head_dim): lane b's Q queries; streams: one sequence of
        stream names per lane (a lane searches only those). Returns ids (B, H, k) int64
        padded with -1 and scores (B, H, k) float32 padded with -inf, sorted by descending
        score: row b equals `search_max(layer, queries[b], k, streams[b])[0]`. Exact search
        scores each lane's queries against its own keys (lanes padded to the longest) in one
        batched matmul per key tile (training: 4 lanes x 1,024 queries per layer); over the
        faiss threshold it runs `search_max` per lane. key_map: optional (head_dim, head_dim)
        matrix; the scores are then q . (k @ key_map) (e.g. every key rotated by one RoPE
        position, so queries already rotated for attention need no second rotation): the
        keys are mapped (a few per lane), or, over the faiss threshold, the queries by its
        transpose (the same scores). heads_first=True: queries are (lanes, n_kv_heads, n_q,
        head_dim) instead (attention's layout: scored without a transposing copy).
        """
        with self._lock:
            if not isinstance(queries, torch.Tensor) or queries.ndim != 4:
                raise ShapeError(f"search_max_lanes: queries of shape {getattr(queries, 'shape', None)}, "
                                 "expected a (lanes, n_q, n_kv_heads, head_dim) tensor")
            if isinstance(streams, (str, bytes)) or len(streams) != queries.shape[0]:
                raise LandmarkIndexError(f"search_max_lanes: {len(streams)} stream lists for "
                                         f"{queries.shape[0]} lanes, expected one per lane")
            if heads_first:
                queries = queries.transpose(1, 2)  # (B, Q, H, D) view
            for s in streams:
                if s is None:
                    raise LandmarkIndexError("search_max_lanes: every lane needs a sequence of streams, got None")
                self._check_search(layer, queries[0], k, s)
            if key_map is not None and (not isinstance(key_map, torch.Tensor)
                                        or tuple(key_map.shape) != (self.head_dim, self.head_dim)):
                raise ShapeError(f"search_max_lanes: key_map of shape {tuple(getattr(key_map, 'shape', ()))}, "
                                 f"expected ({self.head_dim}, {self.head_dim})")
            B, n_q, H = queries.shape[0], queries.shape[1], self.n_kv_heads
            k = int(k)
            lane_rows, rows_t, padding, groups = self._lanes_layout(streams, H)
            m = max((len(r) for r in lane_rows), default=0)
            out_ids = torch.full((B, H, k), -1, dtype=torch.int64, device=self.device)
            out_s = torch.full((B, H, k), float("-inf"), dtype=torch.float32, device=self.device)
            if m == 0 or n_q == 0:
                return out_ids.to(queries.device), out_s.to(queries.device)
            if self._use_faiss(m):
                if key_map is not None:
                    queries = queries.detach().float() @ key_map.to(queries.device, torch.float32).T
                parts = [self.search_max(layer, queries[b], k, streams[b]) for b in range(B)]
                return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            keys = self._keys[layer].index_select(1, rows_t).view(H, B, m, -1).transpose(0, 1).reshape(B * H, m, -1)
            if key_map is not None:
                keys = keys @ key_map.to(self.device, torch.float32)
            q_rows = queries.detach().to(self.device, torch.float32).transpose(1, 2).reshape(B * H, n_q, -1)  # (B*H, Q, D)
            best = torch.empty(B * H, m, dtype=torch.float32, device=self.device)  # past a lane's keys: unused
            for lo, hi, n_keys in groups:  # the fused CPU kernel where registered, else bmm tiles (max_scores.py)
                max_scores(q_rows[lo:hi], keys[lo:hi, :n_keys], best[lo:hi, :n_keys])
            best = best.view(B, H, m)
            ids = self._device_ids()
            kc = min(k, m)
            # one top-k over every lane (padding -inf) when its result cannot depend on how ties
            # are broken: no two equal finite scores among any lane's best k+1. Otherwise (e.g.
            # layer 0, where every landmark key is the same) per lane as below.
            padded = best.masked_fill(padding, float("-inf"))
            top_s, top_i = padded.topk(min(k + 1, m), dim=-1)  # (B, H, k+1), descending
            fin = torch.isfinite(top_s)
            if not bool(((top_s[..., 1:] == top_s[..., :-1]) & fin[..., 1:]).any()):
                top_s, top_i, fin = top_s[..., :kc], top_i[..., :kc], fin[..., :kc]
                rows = torch.gather(rows_t.view(B, 1, m).expand(B, H, m), 2, top_i)
                out_ids[..., :kc] = ids[rows].masked_fill(~fin, -1)
                out_s[..., :kc] = top_s
                return out_ids.to(queries.device), out_s.to(queries.device)
            for b, r in enumerate(lane_rows):
                # top-k over exactly the lane's keys in row order: the input search_max gets, so
                # equal scores (every block's landmark key is the same at layer 0) resolve alike
                k_eff = min(k, len(r))
                if k_eff:
                    top_s, top_i = best[b, :, : len(r)].topk(k_eff, dim=-1)  # (H, k')
                    out_ids[b, :, :k_eff] = ids[rows_t[b * m:b * m + len(r)][top_i]]
                    out_s[b, :, :k_eff] = top_s
            return out_ids.to(queries.device), out_s.to(queries.device)

    def _lanes_layout(self, streams: Sequence[Sequence[str]], H: int):
        """search_max_lanes' view of the lanes (cached with the stream rows, until the next add
        or delete; every layer of a training step asks for the same lanes): each lane's rows
        in row order (as search_max gathers them), those rows padded to the longest lane
        (B*m,) on the device, which of those padded slots are padding (B, 1, m), and the row groups
        scored together: all lanes in one batched matmul when they are of similar length,
        lane by lane when one long document sits among short ones (padding to the longest
        would more than 1.5x the work)."""
        key = ("lanes", H, tuple(frozenset(st) for st in streams))
        got = self._rows_cache.get(key)
        if got is None:
            self._bound_rows_cache()
            lane_rows = []
            for st in streams:
                rows, _ = self._stream_rows(st)
                lane_rows.append(np.arange(self._n) if rows is None else rows)
            B, m = len(lane_rows), max((len(r) for r in lane_rows), default=0)
            pad = np.zeros((B, m), dtype=np.int64)
            for b, r in enumerate(lane_rows):
                pad[b, : len(r)] = r
            rows_t = torch.from_numpy(pad.reshape(-1)).to(self.device)
            lens = torch.tensor([len(r) for r in lane_rows], device=self.device)
            padding = torch.arange(m, device=self.device) >= lens[:, None, None]  # (B, 1, m)
            if B * m <= 1.5 * sum(len(r) for r in lane_rows):
                groups = [(0, B * H, m)]  # (first row, end row, keys) of best scored together
            else:
                groups = [(b * H, (b + 1) * H, len(r)) for b, r in enumerate(lane_rows)]
            got = self._rows_cache[key] = (lane_rows, rows_t, padding, groups)
        return got

