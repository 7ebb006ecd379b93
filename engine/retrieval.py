"""Retrieval attention: a query attends over [top-k stored blocks + its local window].

One implementation, used by ingest, ask, generate and the trainer. A `RetrievalMemory`
is passed to `LandmarkTransformer.forward(..., memory=mem)`; each layer then calls
`mem.attend(layer, q, k, v)` with the chunk's PRE-RoPE queries and keys, and the memory:

  1. searches the store's landmark index of that layer (per KV head) with the chunk's
     queries and keeps the top-k blocks by landmark score, aggregated over the chunk's
     queries by max (the paper's offload mode; exact: a block in the max-aggregated
     top-k is in the per-query top-k of the query that attains its max), or per token;
  2. fetches ONLY those blocks' K/V of that layer from the store (device tier hits,
     misses promoted from host or disk);
  3. rotates their keys to positions in a short prefix before the local window (the
     paper's "stingy" positions) or to their true positions;
  4. runs the grouped softmax over [retrieved blocks + local tokens]
     (`landmark_attention_blockwise`, or the vectorized kernel with `kernel="vectorized"`,
     which training uses), so landmark scores gate retrieved blocks exactly
     as in training.

After each chunk, `end_chunk()` puts every newly completed block (per-layer K before
RoPE, V, and the landmark key = the pre-RoPE key at the block's last slot) into the
store under the memory's stream and trims the local window to `local_blocks` complete
blocks plus the unfinished one. Batch size is 1 (one stream per memory).

Shapes: Hkv KV heads, G = H // Hkv, L block_len, D head dim, kk = top_k.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.attention import landmark_attention, landmark_attention_blockwise
from engine.block_select import (check_store_layout, choose_blocks, gather_selected, mask_excluded, stream_kv,
                                 to_store_layout)
from engine.config import ModelConfig
from engine.model import apply_rope, rope_cos_sin
from memory_store.index import aggregate_max

POSITION_MODES = ("stingy", "true")
_WHOLE_CHUNK_PUT = True  # end_chunk's direct path for whole-block chunks with no local window (tests turn it off)
SELECTION_MODES = ("chunk", "token")
KERNELS = ("blockwise", "vectorized")


@dataclass(kw_only=True, slots=True)
class RetrievalConfig:
    """How queries pick and see stored blocks."""

    top_k: int = 4
    """Blocks retrieved per layer and KV head (0 = local window only)."""
    local_blocks: int = 2
    """Complete blocks kept in the local window (attended directly, never retrieved)."""
    positions: str = "stingy"
    """'stingy': retrieved blocks get positions in a short prefix before the local window;
    'true': they keep their positions in the stream."""
    selection: str = "chunk"
    """'chunk': one choice per head for the whole chunk (max over its queries);
    'token': every query chooses its own blocks (slower; for small inputs)."""
    chunk_len: int | None = None
    """Positions (landmarks included) processed per forward during prefill. None: the model's
    window minus the local blocks (384 for a 512-position window and 2 blocks of 64), so the
    last query of a chunk sees exactly one training window of local positions; at least one
    block. See `chunk_for`."""
    kernel: str = "blockwise"
    """Attention implementation over [retrieved + local]: 'blockwise' (memory linear in the
    keys; inference) or 'vectorized' (keeps the weights for the backward, faster for the
    short windows of training)."""

    def __post_init__(self) -> None:
        for name in ("top_k", "local_blocks"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"RetrievalConfig.{name}={v!r} is invalid: must be an int >= 0")
        if self.chunk_len is not None and (not isinstance(self.chunk_len, int) or isinstance(self.chunk_len, bool)
                                           or self.chunk_len < 1):
            raise ValueError(f"RetrievalConfig.chunk_len={self.chunk_len!r} is invalid: must be None (auto) or an int >= 1")
        if self.positions not in POSITION_MODES:
            raise ValueError(f"RetrievalConfig.positions={self.positions!r} is invalid: one of {POSITION_MODES}")
        if self.selection not in SELECTION_MODES:
            raise ValueError(f"RetrievalConfig.selection={self.selection!r} is invalid: one of {SELECTION_MODES}")
        if self.kernel not in KERNELS:
            raise ValueError(f"RetrievalConfig.kernel={self.kernel!r} is invalid: one of {KERNELS}")

    def chunk_for(self, cfg) -> int:
        """The prefill chunk for a model config: chunk_len, or (None) max(block_len,
        max_seq_len - local_blocks * block_len)."""
        if self.chunk_len is not None:
            return self.chunk_len
        return max(cfg.block_len, cfg.max_seq_len - self.local_blocks * cfg.block_len)

    def attention(self, q, k, v, block_len: int, *, q_offset: int, kv_valid, const_keys: int = 0):
        """The configured kernel on [retrieved + local] keys; the first const_keys keys
        (the retrieved blocks: constants) get no gradient in the vectorized kernel."""
        if self.kernel == "vectorized":
            return landmark_attention(q, k, v, block_len, q_offset=q_offset, kv_valid=kv_valid, const_keys=const_keys)
        return landmark_attention_blockwise(q, k, v, block_len, q_offset=q_offset, kv_valid=kv_valid)


@dataclass(slots=True)
class RetrievalStats:
    blocks_fetched: int = 0
    bytes_fetched: int = 0
    searches: int = 0
    reused: int = 0  # layer selections equal to the previous one: nothing fetched
    blocks_put: int = 0
    per_layer_blocks: list[int] = field(default_factory=list)
    taken_bytes: int = 0

    def count_fetched(self, layer: int, n: int, layout) -> None:
        """n distinct blocks of `layer` fetched from a store of this `StoreLayout` (K and V)."""
        self.blocks_fetched += n
        self.per_layer_blocks[layer] += n
        self.bytes_fetched += n * 2 * layout.n_kv_heads * layout.block_len * layout.head_dim * layout.itemsize

    def take_fetched(self) -> int:
        """Bytes fetched since the previous call (for per-step accounting)."""
        n = self.bytes_fetched - self.taken_bytes
        self.taken_bytes = self.bytes_fetched
        return n


def _search_vectors(q: torch.Tensor, q_local_pos: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """(B, H, T, D) pre-RoPE queries -> (B, T*G, Hkv, D) search vectors.

    The index holds pre-RoPE landmark keys, so the query is rotated by the distance
    it would have to a landmark just before the local window (RoPE scores depend only
    on the distance): score = R(d) q . k_lm.
    """
    B, H, T, D = q.shape
    Hkv = cfg.n_kv_heads
    cos, sin = rope_cos_sin(q_local_pos + 1, D, cfg.rope, q.dtype)
    qs = apply_rope(q.float(), cos, sin)  # (B, H, T, D)
    return qs.view(B, Hkv, H // Hkv, T, D).permute(0, 2, 3, 1, 4).reshape(B, -1, Hkv, D)


def _rotated_prefix(k_sel: torch.Tensor, v_sel: torch.Tensor, sel: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Selected blocks k_sel, v_sel (B, Hkv, kk, L, D) -> the retrieved prefix of the key axis:
    K rotated by cos/sin ((kk*L, D) or per head (Hkv, kk*L, D)), V, and which keys are
    present, (B, Hkv, kk*L) bool from sel (B, Hkv, kk), -1 = none."""
    B, Hkv, kk, L, D = k_sel.shape
    valid = (sel >= 0).repeat_interleave(L, dim=-1).to(k_sel.device)
    return apply_rope(k_sel.reshape(B, Hkv, kk * L, D), cos, sin), v_sel.reshape(B, Hkv, kk * L, D), valid


def _key_valid(valid_ret: torch.Tensor, n_loc: int) -> torch.Tensor | None:
    """The kernel's kv_valid for [retrieved (valid_ret (B, Hkv, kk*L)) + n_loc local keys],
    or None when every retrieved key is present."""
    if bool(valid_ret.all()):
        return None
    B, Hkv = valid_ret.shape[:2]
    return torch.cat([valid_ret, torch.ones(B, Hkv, n_loc, dtype=torch.bool, device=valid_ret.device)], dim=2)


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

    def _rope(self, first: int, n: int, stingy_top: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of n positions from `first` (stingy_top: of a memory's stingy positions for
        n local entries with top_k=stingy_top), computed once per batch for all layers."""
        key = (first, n, stingy_top)
        if key not in self._ropes:
            m0 = self.memories[0]
            pos = (m0._positions(stingy_top, n, first) if stingy_top is not None
                   else torch.arange(first, first + n, device=m0.device))
            self._ropes[key] = rope_cos_sin(pos, m0.cfg.head_dim, m0.cfg.rope)
        return self._ropes[key]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.shape[0] != len(self.memories):
            raise ValueError(f"batch of {q.shape[0]} rows but {len(self.memories)} memories")
        if self._lanes_batchable(layer):
            return self._attend_lanes(layer, q, k, v)
        if any(m.rc.selection != "chunk" for m in self.memories):
            return torch.cat([m.attend(layer, q[b:b + 1], k[b:b + 1], v[b:b + 1])
                              for b, m in enumerate(self.memories)], dim=0)
        preps = [m.prepare_chunk(layer, q[b:b + 1], k[b:b + 1], v[b:b + 1])
                 for b, m in enumerate(self.memories)]
        L, rc = self.memories[0].L, self.memories[0].rc
        if len({(p[1].shape, p[4]) for p in preps}) != 1:  # key axes differ: one call per row
            return torch.cat([rc.attention(p[0], p[1], p[2], L, q_offset=p[4], kv_valid=p[3])
                              for p in preps], dim=0).to(q.dtype)
        valid = None
        if any(p[3] is not None for p in preps):
            valid = torch.cat([p[3] if p[3] is not None else torch.ones(p[1].shape[:3], dtype=torch.bool,
                                                                         device=p[1].device)
                               for p in preps], dim=0)  # (B, Hkv, S)
        cat = lambda i: torch.cat([p[i] for p in preps], dim=0)  # noqa: E731
        return rc.attention(cat(0), cat(1), cat(2), L, q_offset=preps[0][4], kv_valid=valid).to(q.dtype)

    # -- all lanes in one pass -------------------------------------------------------------
    def _lanes_batchable(self, layer: int) -> bool:
        """Whether every lane can go through `_attend_lanes`: one store, one config with
        chunk selection and stingy positions (the same key axis for every lane), the same
        local window length, and explicit streams to search (a store with an index and
        get_heads)."""
        m0 = self.memories[0]
        return (len(self.memories) > 1 and hasattr(m0.store, "index") and hasattr(m0.store, "get_heads")
                and m0.rc.selection == "chunk" and m0.rc.positions == "stingy" and m0.rc.top_k > 0
                and all(m.store is m0.store and m.rc == m0.rc and m.read_streams is not None
                        and m.local_k[layer].shape[2] == m0.local_k[layer].shape[2] for m in self.memories))

    def _attend_lanes(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Every lane's `prepare_chunk` + one kernel call, with the per-lane work batched:
        one index search (`search_max_lanes`), one store fetch for the union of the lanes'
        blocks, one rotation of all local keys and queries. Same result as the per-lane
        path (tested)."""
        mems, m0 = self.memories, self.memories[0]
        for b, m in enumerate(mems):
            m._pending[layer] = (k[b:b + 1], v[b:b + 1])
        n_before = m0.local_k[layer].shape[2]
        if n_before:
            k_loc = torch.cat([torch.cat([m.local_k[layer] for m in mems]), k.float()], dim=2)  # (B, Hkv, n_loc, D)
            v_loc = torch.cat([torch.cat([m.local_v[layer] for m in mems]), v.float()], dim=2)
        else:  # training (no local blocks carried over): the window alone
            k_loc, v_loc = k.float(), v.float()
        # one rotation for every lane, at the untrimmed stingy positions (the same as each
        # memory alone): local entry j at top_k*L + j, retrieved slots before it
        cos, sin = self._rope(0, k_loc.shape[2], stingy_top=m0.rc.top_k)
        k_loc = apply_rope(k_loc, cos, sin)
        q_rot = apply_rope(q.float(), cos[n_before:], sin[n_before:])  # (B, H, T, D)
        sel = self._select_lanes(layer, q_rot)  # (B, Hkv, top_k), absent blocks (-1) first
        # leading slots no lane and head fills carry no keys: dropped in _attend_rows (the real
        # blocks keep their positions, abutting the window). Lanes with no block at all (a
        # document's first window) stay in the same call, their prefix absent: a second call for
        # them measured ~1.2 ms per step slower (the row gathers and their backward scatters
        # cost more than the fused kernel spends on absent blocks)
        return self._attend_rows(layer, q_rot, k_loc, v_loc, sel, n_before).to(q.dtype)

    def _attend_rows(self, layer, q_rot, k_loc_rot, v_loc, sel, n_before: int) -> torch.Tensor:
        """The kernel call of `_attend_lanes` (queries and local keys rotated), with sel
        trimmed to the slots any lane fills."""
        m0 = self.memories[0]
        rc, L = m0.rc, m0.L
        n_loc = k_loc_rot.shape[2]
        kk = int((sel >= 0).sum(-1).max())
        sel = sel[:, :, sel.shape[2] - kk:]
        if kk == 0:
            return rc.attention(q_rot, k_loc_rot, v_loc, L, q_offset=n_before, kv_valid=None)
        k_ret, v_ret, valid_ret = self._fetch_lanes(layer, sel)
        k_all = torch.cat([k_ret, k_loc_rot], dim=2)  # (B, Hkv, kk*L + n_loc, D)
        v_all = torch.cat([v_ret, v_loc], dim=2)
        return rc.attention(q_rot, k_all, v_all, L, q_offset=kk * L + n_before, kv_valid=_key_valid(valid_ret, n_loc),
                            const_keys=kk * L)

    def _select_lanes(self, layer: int, q_rot: torch.Tensor) -> torch.Tensor:
        """`RetrievalMemory.select` of every lane: (B, Hkv, top_k) int64, -1 = none.

        q_rot (B, H, T, D): the queries rotated for attention (at top_k*L + their local
        index). The index holds pre-RoPE landmark keys; `select` scores R(n_before+i+1) q_i
        against them, the rotation to a landmark just before the local window. RoPE scores
        depend only on the distance, so the same scores are q_rot_i against every key rotated
        to position top_k*L - 1: one small key map in the index instead of a second rotation
        of every query."""
        mems, m0 = self.memories, self.memories[0]
        kk, cfg = m0.rc.top_k, m0.cfg
        if len(m0.store) == 0:
            return torch.full((len(mems), cfg.n_kv_heads, kk), -1, dtype=torch.long)
        excludes = [m._stored_local_ids() for m in mems]
        k_search = kk + max(len(e) for e in excludes)
        B, H, T, D = q_rot.shape
        Hkv = cfg.n_kv_heads
        qs = q_rot.reshape(B, Hkv, H // Hkv * T, D)  # each KV head's queries (its G heads' rows)
        ids, scores = m0.store.index.search_max_lanes(layer, qs, k_search, [m.read_streams for m in mems],
                                                      key_map=_rope_key_map(kk * m0.L - 1, D, cfg.rope),
                                                      heads_first=True)
        for m in mems:
            m.stats.searches += 1
        ids, scores = ids.cpu(), scores.float().cpu()  # (B, Hkv, k')
        if any(excludes):
            scores = torch.stack([mask_excluded(ids[b], scores[b], e) for b, e in enumerate(excludes)])
        return choose_blocks(ids, scores, kk)

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
                m._count_fetched(layer, n)
        first = (m0.rc.top_k - kk) * L  # trimmed slots: the real blocks keep their positions
        cos, sin = self._rope(first, kk * L)
        return _rotated_prefix(k_sel, v_sel, sel, cos, sin)


def end_chunks(memories: Sequence["RetrievalMemory"]) -> list[int]:
    """`end_chunk` of several memories (a training step's lanes). When every chunk goes
    straight into one store (training windows), they are put with one `put_streams` (one
    host copy, write job and tier admission instead of one per lane). Same store contents,
    ids and memory states as calling end_chunk on each in order (tested). Returns the
    blocks put per memory. If the put fails, no memory's chunk is ended."""
    store = memories[0].store if memories else None
    if (len(memories) < 2 or not hasattr(store, "put_streams")
            or not all(m.store is store and m._whole_chunk_put() for m in memories)):
        return [m.end_chunk() for m in memories]
    m0 = memories[0]
    T = [m._pending[0][0].shape[2] for m in memories]
    # per layer, every lane's chunk one after the other: the lanes' blocks in lane order, as
    # put_streams takes them
    lanes = [[[m._pending[layer][i][0] for m in memories] for layer in range(len(m0._pending))] for i in (0, 1)]
    K, V, lm = to_store_layout(lanes[0], lanes[1], m0.L, m0.dtype, m0.device)
    ids = store.put_streams([(m.stream, t // m0.L) for m, t in zip(memories, T)], K, V, lm,
                            copy=False)  # K, V are this call's own: the store may keep them
    for m, t, got in zip(memories, T, ids):
        m._end_whole_chunk(t)
        m.stats.blocks_put += len(got)
    return [len(got) for got in ids]


class RetrievalMemory:
    """Local window + store-backed retrieval for one stream (batch size 1).

    store: a `memory_store.TieredStore` whose layout matches the model.
    stream: where completed blocks are written (persist=True) and, by default, the
    only stream searched. read_streams: streams to search (None = all in the store).
    persist: False keeps completed blocks in the local window instead of the store
    (used for questions, so asking never changes what is stored).
    """

    def __init__(self, cfg: ModelConfig, store, *, stream: str | None,
                 retrieval: RetrievalConfig | None = None, persist: bool = True,
                 read_streams: Sequence[str] | None | str = "own"):
        if not cfg.landmarks:
            raise ValueError("retrieval needs a model with attention='landmark'")
        check_store_layout(cfg, store)
        if persist and not stream:
            raise ValueError("persist=True needs a stream name to write blocks to")
        self.cfg = cfg
        self.store = store
        self.stream = stream
        self.rc = retrieval or RetrievalConfig()
        self.persist = persist
        self.read_streams = [stream] if read_streams == "own" else read_streams
        self.L = cfg.block_len
        self.dtype = store.layout.torch_dtype
        self.device = store.device
        Hkv, D = cfg.n_kv_heads, cfg.head_dim
        empty = torch.zeros(1, Hkv, 0, D, device=self.device)
        self.local_k = [empty] * cfg.n_layers  # (1, Hkv, n_local, D) pre-RoPE
        self.local_v = [empty] * cfg.n_layers
        self.local_ids: list[int | None] = []  # per complete local block: its store id (None: not stored)
        self.local_start = 0  # stream position of the first local token
        self.n_pos = 0  # stream positions processed so far
        self._pending: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * cfg.n_layers
        # per layer, the last selection and its fetched, rotated blocks: consecutive decode steps
        # (and chunks) often select the same blocks, which then are not fetched again. Safe:
        # stored blocks never change and ids are never reused.
        self._ret_memo: list[tuple[torch.Tensor, tuple] | None] = [None] * cfg.n_layers
        # per layer, the raw K/V of the last selection's blocks: a selection that changes in a
        # few blocks (consecutive decode steps) fetches only those
        self._ret_blocks: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in range(cfg.n_layers)]
        self._promote_reads = True  # False during one-query (decode) steps: see _fetch_rotated
        self.stats = RetrievalStats(per_layer_blocks=[0] * cfg.n_layers)

    # -- state ---------------------------------------------------------------------------
    def resume_from_store(self) -> None:
        """Continue the memory's stream after its last stored block: load the last
        `local_blocks` blocks into the local window and set positions after them."""
        ids = self.store.stream_blocks(self.stream) if self.stream else np.empty(0, np.int64)
        n = len(ids)
        keep = ids[max(0, n - self.rc.local_blocks):]
        self.n_pos = n * self.L
        self.local_start = (n - len(keep)) * self.L
        self.local_ids = [int(i) for i in keep]
        for layer in range(self.cfg.n_layers):
            if len(keep):
                self.local_k[layer], self.local_v[layer] = stream_kv(self.store, keep, layer, self.device)

    def _stored_local_ids(self) -> list[int]:
        return [i for i in self.local_ids if i is not None]

    # -- selection -----------------------------------------------------------------------
    def select(self, layer: int, q: torch.Tensor, q_local_pos: torch.Tensor) -> torch.Tensor:
        """Top-k block ids per KV head for these queries: (Hkv, top_k) int64, -1 = none.

        Always top_k wide (absent blocks first, masked in attention), so every memory with
        the same config lays out the same key axis and a batch of them runs as one call.
        Ids are sorted ascending (store order = stream order) so the prefix is chronological.
        """
        kk = self.rc.top_k
        if kk == 0 or len(self.store) == 0:
            return torch.full((self.cfg.n_kv_heads, kk), -1, dtype=torch.long)
        exclude = self._stored_local_ids()
        qs = _search_vectors(q, q_local_pos, self.cfg)[0]  # (T*G, Hkv, D)
        k_search = kk + len(exclude)  # the local window's stored blocks may take slots: ask for more
        if self.rc.selection == "chunk":
            # max over the chunk's queries inside the index: one matmul per call, no per-query top-k
            ids, scores = self.store.index.search_max(layer, qs, k_search, streams=self.read_streams)
        else:
            ids, scores = self.store.index.search(layer, qs, k_search, streams=self.read_streams)
        self.stats.searches += 1
        ids, scores = ids.cpu(), scores.float().cpu()  # (n_q, Hkv, k'); n_q = 1 from search_max
        scores = mask_excluded(ids, scores, exclude)
        if ids.shape[0] > 1:  # per-query results: per head the distinct ids with the best max score
            ids, scores = aggregate_max(ids, scores, k_search)
        return choose_blocks(ids, scores, kk)[0]  # (Hkv, kk)

    # -- attention -----------------------------------------------------------------------
    def _retrieved(self, layer: int, sel: torch.Tensor):
        """Fetch and rotate the selected blocks of one layer.

        sel (Hkv, kk). Returns k_rot, v (1, Hkv, kk*L, D), valid (1, Hkv, kk*L) bool.
        """
        memo = self._ret_memo[layer]
        if memo is not None and memo[0].shape == sel.shape and torch.equal(memo[0], sel):
            self.stats.reused += 1
            return memo[1]
        out = self._fetch_rotated(layer, sel)
        self._ret_memo[layer] = (sel.clone(), out)
        return out

    def _fetch_rotated(self, layer: int, sel: torch.Tensor):
        Hkv, kk = sel.shape
        L, D = self.L, self.cfg.head_dim
        valid_blk = sel >= 0  # (Hkv, kk)
        # a decode step (one query) reads its new blocks through: promoting each would demote
        # a device entry for a block most likely not read again
        k_sel, v_sel, uniq, n_new = gather_selected(self.store, layer, sel[None], self.device,
                                                     promote=self._promote_reads, cache=self._ret_blocks[layer])
        self._count_fetched(layer, n_new)
        if self.rc.positions == "stingy":
            p = torch.arange(kk * L, device=self.device)  # same prefix for every head
            cos, sin = rope_cos_sin(p, D, self.cfg.rope)
        else:
            ords = torch.zeros(Hkv, kk, dtype=torch.long)
            if len(uniq):
                _, o = self.store.block_meta(uniq.tolist())
                ords_u = torch.as_tensor(o, dtype=torch.long)
                ords = torch.where(valid_blk, ords_u[torch.searchsorted(uniq, sel.clamp(min=0))], ords)
            p = (ords[..., None] * L + torch.arange(L)).reshape(Hkv, kk * L).to(self.device)
            cos, sin = rope_cos_sin(p.reshape(-1), D, self.cfg.rope)
            cos, sin = cos.view(Hkv, kk * L, D), sin.view(Hkv, kk * L, D)
        return _rotated_prefix(k_sel, v_sel, sel[None], cos, sin)

    def _count_fetched(self, layer: int, n: int) -> None:
        """Stats for n distinct blocks of `layer` fetched from the store."""
        self.stats.count_fetched(layer, n, self.store.layout)

    def _positions(self, kk: int, n: int, start_local: int) -> torch.Tensor:
        """RoPE positions of n local-window entries starting at local index start_local."""
        idx = torch.arange(start_local, start_local + n, device=self.device)
        if self.rc.positions == "stingy":
            return kk * self.L + idx
        return self.local_start + idx

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One layer's attention for the chunk. q (1, H, T, D); k, v (1, Hkv, T, D), pre-RoPE.
        Returns (1, H, T, D)."""
        if q.shape[0] != 1:
            raise ValueError(f"retrieval memory works on batch size 1, got {q.shape[0]}")
        self._pending[layer] = (k, v)
        self._promote_reads = q.shape[2] > 1
        k_loc = torch.cat([self.local_k[layer], k.float()], dim=2)  # (1, Hkv, n_loc, D)
        v_loc = torch.cat([self.local_v[layer], v.float()], dim=2)
        n_before, T = self.local_k[layer].shape[2], q.shape[2]
        q_local = torch.arange(n_before, n_before + T)
        if self.rc.selection == "token" and self.rc.top_k > 0:
            outs = [self._attend_once(layer, q[:, :, t:t + 1], k_loc, v_loc, q_local[t:t + 1])
                    for t in range(T)]
            return torch.cat(outs, dim=2)
        return self._attend_once(layer, q, k_loc, v_loc, q_local)

    def prepare_chunk(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """`attend` up to the kernel call (chunk selection): for batching memories."""
        self._pending[layer] = (k, v)
        self._promote_reads = q.shape[2] > 1
        k_loc = torch.cat([self.local_k[layer], k.float()], dim=2)
        v_loc = torch.cat([self.local_v[layer], v.float()], dim=2)
        n_before, T = self.local_k[layer].shape[2], q.shape[2]
        return self.prepare(layer, q, k_loc, v_loc, torch.arange(n_before, n_before + T))

    def _attend_once(self, layer, q, k_loc, v_loc, q_local):
        q_rot, k_all, v_all, valid, q_offset = self.prepare(layer, q, k_loc, v_loc, q_local)
        return self.rc.attention(q_rot, k_all, v_all, self.L, q_offset=q_offset, kv_valid=valid,
                                 const_keys=q_offset - int(q_local[0])).to(q.dtype)

    def prepare(self, layer, q, k_loc, v_loc, q_local):
        """Select, fetch and rotate: the kernel's inputs for these queries.

        Returns q_rot (1, H, T, D), k_all, v_all (1, Hkv, kk*L + n_loc, D), kv_valid
        (1, Hkv, kk*L + n_loc) bool or None, and the queries' offset in the key axis.
        """
        n_loc, D = k_loc.shape[2], q.shape[3]
        sel = self.select(layer, q, q_local)  # (Hkv, kk)
        kk = sel.shape[1]
        k_ret, v_ret, valid_ret = self._retrieved(layer, sel)
        cos, sin = rope_cos_sin(self._positions(kk, n_loc, 0), D, self.cfg.rope)
        k_loc_rot = apply_rope(k_loc.float(), cos, sin)
        qc, qs = cos[q_local[0]:q_local[-1] + 1], sin[q_local[0]:q_local[-1] + 1]
        q_rot = apply_rope(q.float(), qc, qs)  # (1, H, T, D)
        k_all = torch.cat([k_ret, k_loc_rot], dim=2)  # (1, Hkv, kk*L + n_loc, D)
        v_all = torch.cat([v_ret, v_loc.float()], dim=2)
        return q_rot, k_all, v_all, _key_valid(valid_ret, n_loc), kk * self.L + int(q_local[0])

    # -- after each forward -------------------------------------------------------------
    def end_chunk(self) -> int:
        """Commit the chunk just processed: extend the local window, put completed blocks
        into the store (persist=True), trim the window. Returns the number of blocks put."""
        if any(p is None for p in self._pending):
            raise RuntimeError("end_chunk() called before every layer attended this chunk")
        T = self._pending[0][0].shape[2]
        if self._whole_chunk_put():
            return self._put_whole_chunk(T)
        for layer, (k, v) in enumerate(self._pending):
            # detached: in training, a window's gradient stops at its own tokens (the store
            # holds constants), so the graph never spans windows
            self.local_k[layer] = torch.cat([self.local_k[layer], k.detach().to(self.device).float()], dim=2)
            self.local_v[layer] = torch.cat([self.local_v[layer], v.detach().to(self.device).float()], dim=2)
        self._pending = [None] * self.cfg.n_layers
        self.n_pos += T
        L = self.L
        n_complete = self.local_k[0].shape[2] // L
        new = n_complete - len(self.local_ids)
        put = 0
        if new > 0:
            s0 = len(self.local_ids) * L
            if self.persist:
                ids = self._put_blocks(torch.stack([lk[0, :, s0:s0 + new * L] for lk in self.local_k]),
                                       torch.stack([lv[0, :, s0:s0 + new * L] for lv in self.local_v]))
                self.local_ids.extend(int(i) for i in ids)
                put = new
            else:
                self.local_ids.extend([None] * new)
        # trim: keep `local_blocks` complete stored blocks (+ the unfinished one)
        drop = 0
        while len(self.local_ids) - drop > self.rc.local_blocks and self.local_ids[drop] is not None:
            drop += 1
        if drop:
            for layer in range(self.cfg.n_layers):
                self.local_k[layer] = self.local_k[layer][:, :, drop * L:]
                self.local_v[layer] = self.local_v[layer][:, :, drop * L:]
            self.local_ids = self.local_ids[drop:]
            self.local_start += drop * L
        return put

    def _whole_chunk_put(self) -> bool:
        """Whether `end_chunk` can put the pending chunk straight into the store: whole
        blocks and nothing stays local (training windows with local_blocks=0)."""
        return (_WHOLE_CHUNK_PUT and self.persist and self.rc.local_blocks == 0 and not self.local_ids
                and self.local_k[0].shape[2] == 0 and all(p is not None for p in self._pending)
                and self._pending[0][0].shape[2] % self.L == 0)

    def _put_whole_chunk(self, T: int) -> int:
        """`end_chunk` when `_whole_chunk_put()`: the chunk's K/V go to the store as they
        are, without passing through the local window. Same store contents as the general path.
        The chunk ends only once the put succeeded."""
        n = len(self._put_blocks([p[0][0] for p in self._pending], [p[1][0] for p in self._pending]))
        self._end_whole_chunk(T)
        return n

    def _end_whole_chunk(self, T: int) -> None:
        """A whole-block chunk of T positions went to the store: the window is empty again."""
        self._pending = [None] * self.cfg.n_layers
        self.n_pos += T
        self.local_start += T

    def _put_blocks(self, k: Sequence[torch.Tensor], v: Sequence[torch.Tensor]) -> np.ndarray:
        """Put whole blocks, per layer k and v (Hkv, new*L, D) pre-RoPE, into the store under
        the memory's stream, with their landmark keys. Returns the ids."""
        ids = self.store.put_blocks(self.stream, *to_store_layout(k, v, self.L, self.dtype, self.device))
        self.stats.blocks_put += len(ids)
        return ids

    def unfinished_positions(self) -> int:
        """Positions of the current, not yet complete block."""
        return self.n_pos % self.L
