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
  4. composes them, as one key source among any others given (engine/sources.py), with the
     local window (`engine.local_window.LocalWindow`) into ONE grouped-softmax call
     (`landmark_attention_blockwise`, or the vectorized kernel with `kernel="vectorized"`,
     which training uses), so landmark scores gate retrieved blocks exactly as in training.

After each chunk, `end_chunk()` puts every newly completed block (per-layer K before
RoPE, V, and the landmark key = the pre-RoPE key at the block's last slot) into the
store under the memory's stream and trims the local window to `local_blocks` complete
blocks plus the unfinished one. Batch size is 1 (one stream per memory); a batch of
memories is `engine.retrieval_lanes.BatchMemory` (re-exported here).

Shapes: Hkv KV heads, G = H // Hkv, L block_len, D head dim, kk = top_k.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np
import torch

from engine.block_select import (check_store_layout, choose_blocks, gather_selected, mask_excluded, rotated_prefix,
                                 stream_kv, to_store_layout, with_sinks)
from engine.config import ModelConfig
from engine.local_window import LocalWindow
from engine.memory import BlockStore
from engine.model import apply_rope, rope_cos_sin
from engine.retrieval_lanes import BatchMemory, end_chunks
from engine.sources import KernelInputs, KeyGroup, KeySource, compose, grouped_attention, run_kernel
from memory_store.index import aggregate_max

PositionMode = Literal["stingy", "true"]
SelectionMode = Literal["chunk", "token"]
RetrievalKernel = Literal["blockwise", "vectorized"]
POSITION_MODES, SELECTION_MODES, KERNELS = get_args(PositionMode), get_args(SelectionMode), get_args(RetrievalKernel)


@dataclass(kw_only=True, slots=True)
class RetrievalConfig:
    """How queries pick and see stored blocks."""

    top_k: int = 4
    """Blocks retrieved per layer and KV head (0 = local window only)."""
    local_blocks: int = 2
    """Complete blocks kept in the local window (attended directly, never retrieved)."""
    sink_blocks: int = 0
    """The stream's first blocks, attended by every query beside the top_k retrieved ones
    (attention sinks; gated by their landmark scores like any retrieved block). A document's
    opening (a chat template's first turn) can score high for every query and would otherwise
    take the top_k slots the query's own blocks need. 0 = none."""
    positions: PositionMode = "stingy"
    """'stingy': retrieved blocks get positions in a short prefix before the local window;
    'true': they keep their positions in the stream."""
    selection: SelectionMode = "chunk"
    """'chunk': one choice per head for the whole chunk (max over its queries);
    'token': every query chooses its own blocks (slower; for small inputs)."""
    chunk_len: int | None = None
    """Positions (landmarks included) processed per forward during prefill. None: the model's
    window minus the local blocks (384 for a 512-position window and 2 blocks of 64), so the
    last query of a chunk sees exactly one training window of local positions; at least one
    block. See `chunk_for`."""
    decode_reselect: int = 1
    """Decode steps (forwards of at most two positions: a token and its landmark) between two
    block selections of a layer: the prompt's chunk selection serves the next steps until this
    many steps passed. 1 (default): every step selects by its own query. A model trained with
    `TrainConfig.selection_before_answer` (its answers attend to the blocks the question chose)
    matches it with a large value (the whole answer on the question's selection)."""
    kernel: RetrievalKernel = "blockwise"
    """Attention implementation over [retrieved + local]: 'blockwise' (memory linear in the
    keys; inference) or 'vectorized' (keeps the weights for the backward, faster for the
    short windows of training)."""

    def __post_init__(self) -> None:
        if not isinstance(self.decode_reselect, int) or isinstance(self.decode_reselect, bool) or self.decode_reselect < 1:
            raise ValueError(f"RetrievalConfig.decode_reselect={self.decode_reselect!r} is invalid: "
                             f"must be an int >= 1 (steps)")
        for name in ("top_k", "local_blocks", "sink_blocks"):
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

    @property
    def slots(self) -> int:
        """Retrieved-block slots of the key axis: the sinks and the top_k blocks."""
        return self.sink_blocks + self.top_k

    def chunk_for(self, cfg) -> int:
        """The prefill chunk for a model config: chunk_len, or (None) max(block_len,
        max_seq_len - local_blocks * block_len)."""
        if self.chunk_len is not None:
            return self.chunk_len
        return max(cfg.block_len, cfg.max_seq_len - self.local_blocks * cfg.block_len)

    def attention(self, q, k, v, block_len: int, *, q_offset: int, kv_valid, const_keys: int = 0):
        """The configured kernel on [retrieved + local] keys; the first const_keys keys
        (the retrieved blocks: constants) get no gradient in the vectorized kernel."""
        return run_kernel(q, k, v, block_len, self.kernel, q_offset=q_offset, kv_valid=kv_valid, const_keys=const_keys)


@dataclass(slots=True)
class RetrievalStats:
    blocks_fetched: int = 0
    bytes_fetched: int = 0
    searches: int = 0
    reused: int = 0  # layer selections equal to the previous one: nothing fetched
    blocks_put: int = 0
    per_layer_blocks: list[int] = field(default_factory=list)
    taken_bytes: int = 0
    peak_window_bytes: int = 0
    """Largest local window a chunk attended over: K and V of every layer, as `attend` holds them."""
    peak_retrieved_bytes: int = 0
    """Largest retrieved K/V (rotated K and V of the selected blocks) of one chunk, all layers."""
    chunk_retrieved_bytes: int = 0  # the running sum of the current chunk, for the peak

    def count_window(self, layer: int, nbytes: int) -> None:
        """`attend` of `layer` holds a local window of `nbytes` (every layer); layer 0 starts a chunk."""
        self.peak_window_bytes = max(self.peak_window_bytes, nbytes)
        if layer == 0:
            self.chunk_retrieved_bytes = 0

    def count_retrieved(self, nbytes: int) -> None:
        """One layer's retrieved K/V of the current chunk: `nbytes`."""
        self.chunk_retrieved_bytes += nbytes
        self.peak_retrieved_bytes = max(self.peak_retrieved_bytes, self.chunk_retrieved_bytes)

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


class RetrievalMemory:
    """Local window + store-backed retrieval for one stream (batch size 1).

    store: a `BlockStore` (a `memory_store.TieredStore`) whose layout matches the model.
    stream: where completed blocks are written (persist=True) and, by default, the
    only stream searched. read_streams: streams to search (None = all in the store).
    persist: False keeps completed blocks in the local window instead of the store
    (used for questions, so asking never changes what is stored).
    sources: more `KeySource`s whose keys join every layer's attention after the
    retrieved blocks (engine/sources.py).

    The memory is itself the source of its retrieved blocks (`keys`); `window` is its
    `LocalWindow`.
    """

    def __init__(self, cfg: ModelConfig, store: BlockStore, *, stream: str | None,
                 retrieval: RetrievalConfig | None = None, persist: bool = True,
                 read_streams: Sequence[str] | None | str = "own", sources: Sequence[KeySource] = ()):
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
        self.window = LocalWindow(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, self.L, self.device)
        self.sources: list[KeySource] = [self, *sources]
        self.n_pos = 0  # stream positions processed so far
        # per layer, the last selection and its fetched, rotated blocks: consecutive decode steps
        # (and chunks) often select the same blocks, which then are not fetched again. Safe:
        # stored blocks never change and ids are never reused.
        self._ret_memo: list[tuple[torch.Tensor, tuple] | None] = [None] * cfg.n_layers
        # per layer, the raw K/V of the last selection's blocks: a selection that changes in a
        # few blocks (consecutive decode steps) fetches only those
        self._ret_blocks: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in range(cfg.n_layers)]
        self._sinks: list[int] | None = None  # sink_ids() once complete
        # per layer, the last chunk selection and the decode steps it has served (decode_reselect)
        self._last_sel: list[tuple[torch.Tensor, int] | None] = [None] * cfg.n_layers
        # training (`TrainConfig.selection_before_answer`): which of the chunk's queries select
        # blocks, (T,) bool; None = all of them
        self.query_keep: torch.Tensor | None = None
        # training (`TrainConfig.answer_token_selection`): chunk rows (local indices, (n,) int64)
        # whose output is recomputed with their own query's selection, as a decode step's is
        self.token_rows: torch.Tensor | None = None
        self.promote_reads = True  # False during one-query (decode) steps: see _fetch_rotated
        self.stats = RetrievalStats(per_layer_blocks=[0] * cfg.n_layers)

    # -- state ---------------------------------------------------------------------------
    def resume_from_store(self) -> None:
        """Continue the memory's stream after its last stored block: load the last
        `local_blocks` blocks into the local window and set positions after them."""
        ids = self.store.stream_blocks(self.stream) if self.stream else np.empty(0, np.int64)
        n = len(ids)
        keep = ids[max(0, n - self.rc.local_blocks):]
        self.n_pos = n * self.L
        kv = [stream_kv(self.store, keep, layer, self.device) for layer in range(self.cfg.n_layers)] if len(keep) else []
        self.window.load(keep, kv, (n - len(keep)) * self.L)

    # -- selection -----------------------------------------------------------------------
    def select(self, layer: int, q: torch.Tensor, q_local_pos: torch.Tensor) -> torch.Tensor:
        """Top-k block ids per KV head for these queries, and the sinks (`sink_ids`): (Hkv,
        sink_blocks + top_k) int64, -1 = none.

        Always that wide (absent blocks first, masked in attention), so every memory with
        the same config lays out the same key axis and a batch of them runs as one call.
        Ids are sorted ascending (store order = stream order) so the prefix is chronological.
        """
        kk, Hkv = self.rc.top_k, self.cfg.n_kv_heads
        if self.rc.slots == 0 or len(self.store) == 0:
            return torch.full((Hkv, self.rc.slots), -1, dtype=torch.long)
        exclude = self.window.stored_ids()
        sinks = [i for i in self.sink_ids() if i not in exclude]
        if kk == 0:
            return with_sinks(torch.empty(Hkv, 0, dtype=torch.long), sinks, self.rc.sink_blocks)
        exclude = exclude + sinks
        n_q = int(q_local_pos.numel())
        chunk = self.rc.selection == "chunk"
        prev = self._last_sel[layer]
        if chunk and n_q <= 2 and prev is not None and prev[1] < self.rc.decode_reselect:
            self._last_sel[layer] = (prev[0], prev[1] + 1)  # a decode step keeps the last selection
            return prev[0]
        qs = _search_vectors(q, q_local_pos, self.cfg)[0]  # (T*G, Hkv, D), row g*T + t
        if self.query_keep is not None and bool(self.query_keep.any()):
            qs = qs[self.query_keep.to(qs.device).repeat(qs.shape[0] // n_q)]  # the answer's queries do not select
        k_search = kk + len(exclude)  # the local window's stored blocks may take slots: ask for more
        if chunk:
            # max over the chunk's queries inside the index: one matmul per call, no per-query top-k
            ids, scores = self.store.index.search_max(layer, qs, k_search, streams=self.read_streams)
        else:
            ids, scores = self.store.index.search(layer, qs, k_search, streams=self.read_streams)
        self.stats.searches += 1
        ids, scores = ids.cpu(), scores.float().cpu()  # (n_q, Hkv, k'); n_q = 1 from search_max
        scores = mask_excluded(ids, scores, exclude)
        if ids.shape[0] > 1:  # per-query results: per head the distinct ids with the best max score
            ids, scores = aggregate_max(ids, scores, k_search)
        sel = with_sinks(choose_blocks(ids, scores, kk)[0], sinks, self.rc.sink_blocks)  # (Hkv, slots)
        if chunk:
            self._last_sel[layer] = (sel, 1)
        return sel

    def sink_ids(self) -> list[int]:
        """The attention sinks' ids: the first `sink_blocks` stored blocks of the memory's own
        stream, or (a memory that only reads, e.g. a question's) of the first stream it reads;
        fewer while the stream is shorter, none without a named stream."""
        sb = self.rc.sink_blocks
        if sb == 0:
            return []
        if self._sinks is not None:
            return self._sinks
        stream = self.stream or (self.read_streams[0] if self.read_streams else None)
        if stream is None:
            return []
        ids = [int(i) for i in self.store.stream_blocks(stream)[:sb]]
        if len(ids) == sb:  # complete: stored blocks never change
            self._sinks = ids
        return ids

    def keys(self, layer: int, q: torch.Tensor, q_local: torch.Tensor) -> KeyGroup:
        """The retrieved blocks as a source's group: selected, fetched and rotated."""
        return KeyGroup(*self._retrieved(layer, self.select(layer, q, q_local)))

    # -- fetching ------------------------------------------------------------------------
    def _retrieved(self, layer: int, sel: torch.Tensor):
        """Fetch and rotate the selected blocks of one layer.

        sel (Hkv, kk). Returns k_rot, v (1, Hkv, kk*L, D), valid (1, Hkv, kk*L) bool.
        """
        memo = self._ret_memo[layer]
        if memo is not None and memo[0].shape == sel.shape and torch.equal(memo[0], sel):
            self.stats.reused += 1
            out = memo[1]
        else:
            out = self._fetch_rotated(layer, sel)
            self._ret_memo[layer] = (sel.clone(), out)
        self.stats.count_retrieved(out[0].nbytes + out[1].nbytes)
        return out

    def _fetch_rotated(self, layer: int, sel: torch.Tensor):
        Hkv, kk = sel.shape
        L, D = self.L, self.cfg.head_dim
        valid_blk = sel >= 0  # (Hkv, kk)
        # a decode step (one query) reads its new blocks through: promoting each would demote
        # a device entry for a block most likely not read again
        k_sel, v_sel, uniq, n_new = gather_selected(self.store, layer, sel[None], self.device,
                                                     promote=self.promote_reads, cache=self._ret_blocks[layer])
        self.stats.count_fetched(layer, n_new, self.store.layout)
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
        return rotated_prefix(k_sel, v_sel, sel[None], cos, sin)

    def local_positions(self, n_prefix: int, n: int, start_local: int) -> torch.Tensor:
        """RoPE positions of n local-window entries from local index start_local, after n_prefix
        keys of sources ('stingy'; 'true': their stream positions)."""
        idx = torch.arange(start_local, start_local + n, device=self.device)
        if self.rc.positions == "stingy":
            return n_prefix + idx
        return self.window.start + idx

    # -- attention -----------------------------------------------------------------------
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One layer's attention for the chunk. q (1, H, T, D); k, v (1, Hkv, T, D), pre-RoPE.
        Returns (1, H, T, D)."""
        if q.shape[0] != 1:
            raise ValueError(f"retrieval memory works on batch size 1, got {q.shape[0]}")
        self.promote_reads = q.shape[2] > 1
        n_before, T = self.window.k[layer].shape[2], q.shape[2]
        k_loc, v_loc = self.window.with_chunk(layer, k, v)  # (1, Hkv, n_loc, D)
        # every layer's window has this length during a chunk (end_chunk extends them together)
        self.stats.count_window(layer, 2 * self.cfg.n_layers * k_loc[0].numel() * k_loc.element_size())
        q_local = torch.arange(n_before, n_before + T)
        if self.rc.selection == "token" and self.rc.slots > 0:
            outs = [self._attend_once(layer, q[:, :, t:t + 1], k_loc, v_loc, q_local[t:t + 1])
                    for t in range(T)]
            return torch.cat(outs, dim=2)
        return self.with_token_rows(layer, q, k_loc, v_loc, self._attend_once(layer, q, k_loc, v_loc, q_local))

    def with_token_rows(self, layer: int, q: torch.Tensor, k_loc: torch.Tensor, v_loc: torch.Tensor,
                        out: torch.Tensor) -> torch.Tensor:
        """`out` (1, H, T, D) of the chunk with the rows in `token_rows` replaced: each row's
        attention recomputed over the blocks its own query selects (query_keep ignored), the
        local window k_loc, v_loc (1, Hkv, n_loc, D; pre-RoPE, the chunk last) as the chunk saw
        it — what a decode step at that position attends to. No token_rows: out unchanged."""
        rows = self.token_rows
        if rows is None or rows.numel() == 0 or self.rc.slots == 0 or self.rc.selection == "token":
            return out
        n_before = k_loc.shape[2] - q.shape[2]
        keep, self.query_keep = self.query_keep, None
        try:
            outs = [self._attend_once(layer, q[:, :, t:t + 1], k_loc, v_loc, torch.tensor([n_before + t]))
                    for t in rows.tolist()]
        finally:
            self.query_keep = keep
        return out.index_copy(2, rows.to(out.device), torch.cat(outs, dim=2).to(out.dtype))

    def prepare_chunk(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> KernelInputs:
        """`attend` up to the kernel call (chunk selection): for batching memories."""
        self.promote_reads = q.shape[2] > 1
        n_before, T = self.window.k[layer].shape[2], q.shape[2]
        k_loc, v_loc = self.window.with_chunk(layer, k, v)
        return self.prepare(layer, q, k_loc, v_loc, torch.arange(n_before, n_before + T))

    def _attend_once(self, layer, q, k_loc, v_loc, q_local):
        return grouped_attention(self.prepare(layer, q, k_loc, v_loc, q_local), self.L, self.rc.kernel).to(q.dtype)

    def prepare(self, layer, q, k_loc, v_loc, q_local) -> KernelInputs:
        """Every source's keys for these queries (the retrieved blocks first), the local window
        rotated after them: the grouped-softmax call's inputs."""
        groups = [src.keys(layer, q, q_local) for src in self.sources]
        n_pre = sum(g.k.shape[2] for g in groups if g is not None and g.kind == "blocks")
        cos, sin = rope_cos_sin(self.local_positions(n_pre, k_loc.shape[2], 0), q.shape[3], self.cfg.rope)
        k_loc_rot = apply_rope(k_loc.float(), cos, sin)
        qc, qs = cos[q_local[0]:q_local[-1] + 1], sin[q_local[0]:q_local[-1] + 1]
        q_rot = apply_rope(q.float(), qc, qs)  # (1, H, T, D)
        return compose(q_rot, k_loc_rot, v_loc.float(), int(q_local[0]), groups)

    # -- after each forward -------------------------------------------------------------
    def end_chunk(self) -> int:
        """Commit the chunk just processed: put it into the store (persist=True) and move the
        window on. Returns the number of blocks put."""
        if self.whole_chunk_pending():
            return self.put_whole_chunk()
        return self.commit_through_window()

    def commit_through_window(self) -> int:
        """`end_chunk`'s general path: extend the local window, put its completed blocks into
        the store (persist=True), trim it to `local_blocks` complete blocks plus the unfinished one."""
        self.n_pos += self.window.append_pending()
        new, k, v = self.window.new_blocks()
        if new > 0:
            if self.persist:
                self.window.ids.extend(int(i) for i in self._put_blocks(torch.stack(k), torch.stack(v)))
            else:
                self.window.ids.extend([None] * new)
        self.window.trim(self.rc.local_blocks)
        return new if self.persist else 0

    def whole_chunk_pending(self) -> bool:
        """Whether the pending chunk can go straight into the store: whole blocks and nothing
        stays local (training windows with local_blocks=0)."""
        w = self.window
        return (self.persist and self.rc.local_blocks == 0 and not w.ids and len(w) == 0
                and all(p is not None for p in w.pending) and w.pending[0][0].shape[2] % self.L == 0)

    def put_whole_chunk(self) -> int:
        """`end_chunk` when `whole_chunk_pending()`: the chunk's K/V go to the store as they
        are, without passing through the local window; the same store contents as
        `commit_through_window`. The chunk ends only once the put succeeded."""
        n = len(self._put_blocks([p[0][0] for p in self.window.pending], [p[1][0] for p in self.window.pending]))
        self.end_whole_chunk()
        return n

    def end_whole_chunk(self) -> None:
        """The pending whole-block chunk went to the store: the window is empty again."""
        self.n_pos += self.window.skip_pending()

    def _put_blocks(self, k: Sequence[torch.Tensor], v: Sequence[torch.Tensor]) -> np.ndarray:
        """Put whole blocks, per layer k and v (Hkv, new*L, D) pre-RoPE, into the store under
        the memory's stream, with their landmark keys. Returns the ids."""
        ids = self.store.put_blocks(self.stream, *to_store_layout(k, v, self.L, self.dtype, self.device))
        self.stats.blocks_put += len(ids)
        return ids

    def unfinished_positions(self) -> int:
        """Positions of the current, not yet complete block."""
        return self.n_pos % self.L


__all__ = ["BatchMemory", "POSITION_MODES", "KERNELS", "RetrievalConfig", "RetrievalMemory", "RetrievalStats",
           "SELECTION_MODES", "end_chunks"]
