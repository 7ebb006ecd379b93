"""Retrieval for a batch of streams: one `RetrievalMemory` per batch row (a training step's lanes).

`BatchMemory` is the `memory=` of a batched forward. When every lane can share one pass per
layer (`_lanes_batchable`: one `LaneBlockStore`, one config with chunk selection and stingy
positions, the same local-window length) it runs every lane's selection, fetch and rotation
batched: one index search (`search_max_lanes`), one store gather of every lane's and head's
own blocks, one rotation of all local keys and queries, one kernel call. Otherwise each row
prepares its own inputs and they share one kernel call when their key axes agree. Same result
as each memory alone (tested). `end_chunks` commits the lanes' chunks with one store put.

The lanes read their memories through public members only: `window` (engine/local_window.py),
`stats`, `rc`, `store`, `read_streams`, `local_positions`, `whole_chunk_pending`,
`end_whole_chunk`, and the training hooks `query_keep`, `token_rows`, `with_token_rows`.

Shapes: B lanes, H query heads, Hkv KV heads, T chunk positions, D head dim, L block_len,
kk retrieved blocks per head.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.block_select import choose_blocks, mask_excluded, rotated_prefix, to_store_layout, with_sinks
from engine.memory import LaneBlockStore, lanes_store
from engine.model import apply_rope, rope_cos_sin
from engine.sources import KeyGroup, compose, grouped_attention, run_kernel

if TYPE_CHECKING:
    from engine.retrieval import RetrievalMemory


@functools.lru_cache(maxsize=64)
def _rope_key_map(position: int, head_dim: int, theta) -> torch.Tensor:
    """(D, D) matrix M with k @ M == k rotated by RoPE to `position` (for a key map in search).
    Cached: callers must not modify it."""
    cos, sin = rope_cos_sin(torch.tensor([position]), head_dim, theta)
    return apply_rope(torch.eye(head_dim), cos, sin)


class BatchMemory:
    """One `RetrievalMemory` per batch row (each row its own stream): all lanes in one pass
    per layer when they can share it (`_attend_lanes`), else row by row."""

    def __init__(self, memories: Sequence["RetrievalMemory"]):
        self.memories = list(memories)
        self._ropes: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # every layer rotates alike
        # checked once: a protocol check costs more than the rest of `_lanes_batchable`, per layer
        self._one_lanes_store = bool(self.memories) and lanes_store(self.memories[0].store) and all(
            m.store is self.memories[0].store for m in self.memories)

    def _rope(self, first: int, n: int, stingy_top: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of n positions from `first` (stingy_top: of a memory's stingy positions for
        n local entries after stingy_top retrieved blocks), computed once per batch for all layers."""
        key = (first, n, stingy_top)
        if key not in self._ropes:
            m0 = self.memories[0]
            pos = (m0.local_positions(stingy_top * m0.L, n, first) if stingy_top is not None
                   else torch.arange(first, first + n, device=m0.device))
            self._ropes[key] = rope_cos_sin(pos, m0.cfg.head_dim, m0.cfg.rope)
        return self._ropes[key]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.shape[0] != len(self.memories):
            raise ValueError(f"batch of {q.shape[0]} rows but {len(self.memories)} memories")
        return self._with_token_rows(layer, q, k, v, self._attend_batch(layer, q, k, v))

    def _with_token_rows(self, layer, q, k, v, out: torch.Tensor) -> torch.Tensor:
        """`RetrievalMemory.with_token_rows` of every lane that has token rows (training's
        `answer_token_selection`), row by row: each such query selects its own blocks."""
        if all(m.token_rows is None for m in self.memories):
            return out
        rows = []
        for b, m in enumerate(self.memories):
            o = out[b:b + 1]
            if m.token_rows is not None:  # the lane's window as its chunk saw it (pending: this chunk already)
                k_loc, v_loc = m.window.with_chunk(layer, k[b:b + 1], v[b:b + 1])
                o = m.with_token_rows(layer, q[b:b + 1], k_loc, v_loc, o)
            rows.append(o)
        return torch.cat(rows, dim=0)

    def _attend_batch(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self._lanes_batchable(layer):
            return self._attend_lanes(layer, q, k, v)
        if any(m.rc.selection != "chunk" for m in self.memories):
            return torch.cat([m.attend(layer, q[b:b + 1], k[b:b + 1], v[b:b + 1])
                              for b, m in enumerate(self.memories)], dim=0)
        preps = [m.prepare_chunk(layer, q[b:b + 1], k[b:b + 1], v[b:b + 1])
                 for b, m in enumerate(self.memories)]
        L, rc = self.memories[0].L, self.memories[0].rc
        if len({(p.k.shape, p.q_offset) for p in preps}) != 1 or any(p.group0 for p in preps):
            return torch.cat([grouped_attention(p, L, rc.kernel) for p in preps], dim=0).to(q.dtype)  # one call per row
        valid = None
        if any(p.kv_valid is not None for p in preps):
            valid = torch.cat([p.kv_valid if p.kv_valid is not None
                               else torch.ones(p.k.shape[:3], dtype=torch.bool, device=p.k.device)
                               for p in preps], dim=0)  # (B, Hkv, S)
        cat = lambda name: torch.cat([getattr(p, name) for p in preps], dim=0)  # noqa: E731
        return rc.attention(cat("q"), cat("k"), cat("v"), L, q_offset=preps[0].q_offset, kv_valid=valid).to(q.dtype)

    # -- all lanes in one pass -------------------------------------------------------------
    def _lanes_batchable(self, layer: int) -> bool:
        """Whether every lane can go through `_attend_lanes`: one `LaneBlockStore`, one config
        with chunk selection and stingy positions (the same key axis for every lane), the same
        local window length, explicit streams to search, and no sources beyond the retrieval."""
        m0 = self.memories[0]
        return (len(self.memories) > 1 and self._one_lanes_store
                and m0.rc.selection == "chunk" and m0.rc.positions == "stingy" and m0.rc.slots > 0
                and all(m.rc == m0.rc and m.read_streams is not None and len(m.sources) == 1
                        and m.window.k[layer].shape[2] == m0.window.k[layer].shape[2] for m in self.memories))

    def _attend_lanes(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Every lane's `prepare_chunk` + one kernel call, with the per-lane work batched:
        one index search (`search_max_lanes`), one store fetch for the union of the lanes'
        blocks, one rotation of all local keys and queries. Same result as the per-lane
        path (tested)."""
        mems, m0 = self.memories, self.memories[0]
        for b, m in enumerate(mems):
            m.window.pending[layer] = (k[b:b + 1], v[b:b + 1])
        n_before = m0.window.k[layer].shape[2]
        if n_before:
            k_loc = torch.cat([torch.cat([m.window.k[layer] for m in mems]), k.float()], dim=2)  # (B, Hkv, n_loc, D)
            v_loc = torch.cat([torch.cat([m.window.v[layer] for m in mems]), v.float()], dim=2)
        else:  # training (no local blocks carried over): the window alone
            k_loc, v_loc = k.float(), v.float()
        # one rotation for every lane, at the untrimmed stingy positions (the same as each
        # memory alone): local entry j at slots*L + j, retrieved slots (sinks + top_k) before it
        cos, sin = self._rope(0, k_loc.shape[2], stingy_top=m0.rc.slots)
        k_loc = apply_rope(k_loc, cos, sin)
        q_rot = apply_rope(q.float(), cos[n_before:], sin[n_before:])  # (B, H, T, D)
        sel = self._select_lanes(layer, q_rot)  # (B, Hkv, slots), absent blocks (-1) first
        # leading slots no lane and head fills carry no keys: dropped in _attend_rows (the real
        # blocks keep their positions, abutting the window). Lanes with no block at all (a
        # document's first window) stay in the same call, their prefix absent: a second call
        # for them costs more (row gathers and their backward scatters) than the fused kernel
        # spends on absent blocks
        return self._attend_rows(layer, q_rot, k_loc, v_loc, sel, n_before).to(q.dtype)

    def _attend_rows(self, layer, q_rot, k_loc_rot, v_loc, sel, n_before: int) -> torch.Tensor:
        """The kernel call of `_attend_lanes` (queries and local keys rotated), with sel
        trimmed to the slots any lane fills."""
        m0 = self.memories[0]
        kk = int((sel >= 0).sum(-1).max())
        sel = sel[:, :, sel.shape[2] - kk:]
        groups = [KeyGroup(*self._fetch_lanes(layer, sel))] if kk else []
        inp = compose(q_rot, k_loc_rot, v_loc, n_before, groups)
        return run_kernel(inp.q, inp.k, inp.v, m0.L, m0.rc.kernel, q_offset=inp.q_offset, kv_valid=inp.kv_valid,
                          const_keys=inp.const_keys)

    def _select_lanes(self, layer: int, q_rot: torch.Tensor) -> torch.Tensor:
        """`RetrievalMemory.select` of every lane: (B, Hkv, slots) int64, -1 = none.

        q_rot (B, H, T, D): the queries rotated for attention (at slots*L + their local
        index). The index holds pre-RoPE landmark keys; `select` scores R(n_before+i+1) q_i
        against them, the rotation to a landmark just before the local window. RoPE scores
        depend only on the distance, so the same scores are q_rot_i against every key rotated
        to position slots*L - 1: one small key map in the index instead of a second rotation
        of every query."""
        mems, m0 = self.memories, self.memories[0]
        kk, cfg, sb = m0.rc.top_k, m0.cfg, m0.rc.sink_blocks
        if len(m0.store) == 0:
            return torch.full((len(mems), cfg.n_kv_heads, m0.rc.slots), -1, dtype=torch.long)
        excludes = [m.window.stored_ids() for m in mems]
        sinks = [[i for i in m.sink_ids() if i not in e] for m, e in zip(mems, excludes)]
        if kk == 0:
            empty = torch.empty(cfg.n_kv_heads, 0, dtype=torch.long)
            return torch.stack([with_sinks(empty, s, sb) for s in sinks])
        excludes = [e + s for e, s in zip(excludes, sinks)]
        k_search = kk + max(len(e) for e in excludes)
        B, H, T, D = q_rot.shape
        Hkv = cfg.n_kv_heads
        keep = [m.query_keep for m in mems]
        if any(kp is not None for kp in keep):  # selection_before_answer: the answer's queries do not select
            q_rot = masked_queries(q_rot, keep)
        qs = q_rot.reshape(B, Hkv, H // Hkv * T, D)  # each KV head's queries (its G heads' rows)
        ids, scores = m0.store.index.search_max_lanes(layer, qs, k_search, [m.read_streams for m in mems],
                                                      key_map=_rope_key_map(m0.rc.slots * m0.L - 1, D, cfg.rope),
                                                      heads_first=True)
        for m in mems:
            m.stats.searches += 1
        ids, scores = ids.cpu(), scores.float().cpu()  # (B, Hkv, k')
        if any(excludes):
            scores = torch.stack([mask_excluded(ids[b], scores[b], e) for b, e in enumerate(excludes)])
        sel = choose_blocks(ids, scores, kk)
        return torch.stack([with_sinks(sel[b], s, sb) for b, s in enumerate(sinks)]) if sb else sel

    def _fetch_lanes(self, layer: int, sel: torch.Tensor):
        """`RetrievalMemory._fetch_rotated` (stingy) of every lane with one store gather.

        sel (B, Hkv, kk). Returns k_rot, v (B, Hkv, kk*L, D), valid (B, Hkv, kk*L) bool.
        """
        m0 = self.memories[0]
        kk = sel.shape[2]
        L, dev = m0.L, m0.device
        k_sel, v_sel = m0.store.get_heads(sel, layer)  # (B, Hkv, kk, L, D): each lane's and head's blocks
        k_sel, v_sel = k_sel.to(dev).float(), v_sel.to(dev).float()
        # per-lane accounting, as if each lane fetched its own: its distinct blocks
        srt = np.sort(sel.reshape(sel.shape[0], -1).numpy(), axis=1)
        distinct = (srt[:, 0] >= 0) + ((srt[:, 1:] != srt[:, :-1]) & (srt[:, 1:] >= 0)).sum(1)
        for m, n in zip(self.memories, distinct.tolist()):
            if n:
                m.stats.count_fetched(layer, n, m.store.layout)
        first = (m0.rc.slots - kk) * L  # trimmed slots: the real blocks keep their positions
        cos, sin = self._rope(first, kk * L)
        return rotated_prefix(k_sel, v_sel, sel, cos, sin)


def masked_queries(q_rot: torch.Tensor, keep: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """q_rot (B, H, T, D) with each lane's dropped queries (keep[b] (T,) False) replaced by its
    first kept one, which leaves a max over the queries as over the kept ones alone (a lane
    with None, or with none kept, keeps all)."""
    rows = [kp is not None and bool(kp.any()) and not bool(kp.all()) for kp in keep]
    if not any(rows):
        return q_rot
    out = q_rot.clone()
    for b, (kp, r) in enumerate(zip(keep, rows)):
        if r:
            kp = kp.to(q_rot.device)
            i = int(kp.nonzero()[0, 0])
            out[b][:, ~kp] = q_rot[b][:, i:i + 1]
    return out


def end_chunks(memories: Sequence["RetrievalMemory"]) -> list[int]:
    """`end_chunk` of several memories (a training step's lanes). When every chunk goes
    straight into one store (training windows), they are put with one `put_streams` (one
    host copy, write job and tier admission instead of one per lane). Same store contents,
    ids and memory states as calling end_chunk on each in order (tested). Returns the
    blocks put per memory. If the put fails, no memory's chunk is ended."""
    store = memories[0].store if memories else None
    if (len(memories) < 2 or not isinstance(store, LaneBlockStore)
            or not all(m.store is store and m.whole_chunk_pending() for m in memories)):
        return [m.end_chunk() for m in memories]
    m0 = memories[0]
    T = [m.window.pending[0][0].shape[2] for m in memories]
    # per layer, every lane's chunk one after the other: the lanes' blocks in lane order, as
    # put_streams takes them
    n_layers = len(m0.window.pending)
    lanes = [[[m.window.pending[layer][i][0] for m in memories] for layer in range(n_layers)] for i in (0, 1)]
    K, V, lm = to_store_layout(lanes[0], lanes[1], m0.L, m0.dtype, m0.device)
    ids = store.put_streams([(m.stream, t // m0.L) for m, t in zip(memories, T)], K, V, lm,
                            copy=False)  # K, V are this call's own: the store may keep them
    for m, got in zip(memories, ids):
        m.end_whole_chunk()
        m.stats.blocks_put += len(got)
    return [len(got) for got in ids]


__all__ = ["BatchMemory", "end_chunks"]
