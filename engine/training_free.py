"""Training-free retrieval for pretrained models that never saw a landmark (InfLLM-style).

A checkpoint imported as it is (`engine.convert`) has plain causal attention. Its past
context is still cut into blocks of `block_len` ordinary tokens (no landmark token) kept in
the same tiered store; each block's index key is computed from the block's own pre-RoPE
keys (`block_key`: their mean, per KV head). Per layer and KV head a chunk's queries pick
the top-k blocks (max over the chunk's queries, as the landmark path's chunk selection),
and attention is ONE ordinary softmax over

    [attention sinks: the stream's first `sink_blocks` blocks] + [retrieved blocks] + [local window]

with positions compressed as the landmark path's "stingy" ones: sinks at 0.., retrieved
blocks right after them in stream order, then the local window and the chunk, so every
position stays inside the model's trained range however long the document is.

Same store, index and chunked prefill as `engine.retrieval.RetrievalMemory` (it is the
memory `ingest`/`generate` use for a causal model); see InfLLM (arXiv 2402.04617).

Shapes: Hkv KV heads, G = H // Hkv, L block_len, D head dim, kk = top_k, S sink positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from engine.config import ModelConfig
from engine.errors import ModelMismatchError
from engine.local_window import LocalWindow
from engine.model import apply_rope, rope_cos_sin
from engine.block_select import (check_store_layout, choose_blocks, gather_selected, mask_excluded, stream_kv,
                                 to_store_layout)
from engine.retrieval import RetrievalStats

BLOCK_KEYS = ("mean", "max-norm")
QUERY_AGGS = ("mean", "max")


@dataclass(kw_only=True, slots=True)
class TrainingFreeConfig:
    """How a model without landmarks picks and sees stored blocks."""

    top_k: int = 8
    """Blocks retrieved per layer and KV head (0 = sinks + local window only)."""
    local_blocks: int = 16
    """Complete blocks kept in the local window (attended directly, never retrieved)."""
    sink_blocks: int = 1
    """The stream's first blocks, always attended (attention sinks; 0 = none)."""
    chunk_len: int = 512
    """Tokens per forward during prefill; retrieval is chosen once per chunk."""
    block_key: Literal["mean", "max-norm"] = "mean"
    """The index key of a block: the mean of its pre-RoPE keys, or its key of largest norm."""
    decode_reselect: int = 16
    """Decode steps (one token each) between two block selections of a layer: the blocks the
    prompt's chunk chose serve the next steps, until this many steps passed or the local window
    slid (1 = a new search every step). Chunks (prefill) always select anew."""
    query_agg: Literal["mean", "max"] = "mean"
    """How a chunk's queries (and the query heads of a KV head) score a block: the mean of their
    scores (= the mean query against the block key), or the best one."""
    search_distance: int | None = None
    """Queries are rotated by this distance before they score the (pre-RoPE) block keys, since
    RoPE scores depend on the distance: None = where retrieved blocks sit from the chunk, the
    local window plus half the retrieved span, (local_blocks + top_k / 2) * block_len; 0 =
    unrotated."""

    question_selection: Literal["layer", "shared"] = "layer"
    """How a question (the prompt of `generate`) picks its blocks. 'layer': each layer and KV
    head its own top_k, as during ingest. 'shared': one set of top_k blocks for every layer and
    head, from a scoring pass over the prompt: each (layer, KV head) scores every stored block,
    the scores are standardised per (layer, head) (z-scores over the candidate blocks), and the
    blocks with the highest z in any (layer, head) are kept; the prompt then runs again on them
    and the answer keeps them. Costs a second forward over the prompt. In SmolLM2 a needle's
    block stands out in a few heads only (bench/selection_probe.py), so each layer's own top-k
    mostly misses it while the best z over all heads finds it."""

    def __post_init__(self) -> None:
        if self.question_selection not in ("layer", "shared"):
            raise ValueError(f"TrainingFreeConfig.question_selection={self.question_selection!r} is invalid: "
                             f"'layer' or 'shared'")
        for name in ("top_k", "local_blocks", "sink_blocks"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"TrainingFreeConfig.{name}={v!r} is invalid: must be an int >= 0")
        if not isinstance(self.decode_reselect, int) or isinstance(self.decode_reselect, bool) or self.decode_reselect < 1:
            raise ValueError(f"TrainingFreeConfig.decode_reselect={self.decode_reselect!r} is invalid: "
                             f"must be an int >= 1 (steps)")
        if not isinstance(self.chunk_len, int) or isinstance(self.chunk_len, bool) or self.chunk_len < 1:
            raise ValueError(f"TrainingFreeConfig.chunk_len={self.chunk_len!r} is invalid: must be an int >= 1")
        if self.query_agg not in QUERY_AGGS:
            raise ValueError(f"TrainingFreeConfig.query_agg={self.query_agg!r} is invalid: one of {QUERY_AGGS}")
        if self.block_key not in BLOCK_KEYS:
            raise ValueError(f"TrainingFreeConfig.block_key={self.block_key!r} is invalid: one of {BLOCK_KEYS}")
        if self.search_distance is not None and (not isinstance(self.search_distance, int) or self.search_distance < 0):
            raise ValueError(f"TrainingFreeConfig.search_distance={self.search_distance!r} is invalid: "
                             f"None or an int >= 0")

    def chunk_for(self, cfg: ModelConfig) -> int:
        return self.chunk_len

    def distance_for(self, cfg: ModelConfig) -> int:
        """The rotation applied to search queries (see search_distance)."""
        if self.search_distance is not None:
            return self.search_distance
        return (self.local_blocks * 2 + self.top_k) * cfg.block_len // 2

    def span(self, cfg: ModelConfig) -> int:
        """The most positions one query can see: sinks + retrieved + local + a chunk."""
        return (self.sink_blocks + self.top_k + self.local_blocks + 1) * cfg.block_len + self.chunk_len


@dataclass(slots=True)
class _Rotated:
    """One layer's attended keys (rotated) and values with room to append, and what they hold."""

    k: torch.Tensor  # (1, Hkv, cap, D)
    v: torch.Tensor  # (1, Hkv, cap, D)
    n: int  # filled positions
    key: tuple  # (sink positions, first local block, selection shape): the layout of the positions
    sel: torch.Tensor  # (Hkv, kk) the blocks in the retrieved part


def block_keys(k: torch.Tensor, L: int, how: str) -> torch.Tensor:
    """Index keys of whole blocks. k (N, n_layers, Hkv, L, D) pre-RoPE -> (N, n_layers, Hkv, D)."""
    if how == "mean":
        return k.float().mean(dim=3).to(k.dtype)
    norms = k.float().norm(dim=-1)  # (N, nl, Hkv, L)
    idx = norms.argmax(dim=-1)  # (N, nl, Hkv)
    return k.gather(3, idx[..., None, None].expand(*idx.shape, 1, k.shape[-1])).squeeze(3)


class TrainingFreeMemory:
    """Sinks + retrieved blocks + local window for one stream (batch size 1).

    The same roles as `RetrievalMemory`: store (layout matching the model), stream (where
    completed blocks go with persist=True), read_streams (searched; "own" = [stream], None =
    every stream), persist=False keeps completed blocks local (questions never write).
    """

    def __init__(self, cfg: ModelConfig, store, *, stream: str | None,
                 retrieval: TrainingFreeConfig | None = None, persist: bool = True,
                 read_streams: Sequence[str] | None | str = "own"):
        if cfg.landmarks:
            raise ModelMismatchError("training-free retrieval is for models without landmarks "
                                     "(attention='causal'); this one is landmark-trained: use RetrievalMemory")
        check_store_layout(cfg, store)
        lay = store.layout
        if persist and not stream:
            raise ValueError("persist=True needs a stream name to write blocks to")
        self.cfg, self.store, self.stream, self.persist = cfg, store, stream, persist
        self.rc = retrieval or TrainingFreeConfig()
        self.read_streams = [stream] if read_streams == "own" else read_streams
        self.L = cfg.block_len
        self.dtype, self.device = lay.torch_dtype, store.device
        empty = torch.zeros(1, cfg.n_kv_heads, 0, cfg.head_dim, device=self.device)
        nl = cfg.n_layers
        self.window = LocalWindow(nl, cfg.n_kv_heads, cfg.head_dim, self.L, self.device)
        self.sink_k, self.sink_v = [empty] * nl, [empty] * nl  # (1, Hkv, S, D) pre-RoPE
        self.sink_ids: list[int] = []
        self.n_pos = 0
        self._blocks: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in range(nl)]
        self._rot: list[_Rotated | None] = [None] * nl
        self._steps = [0] * nl  # per layer, decode steps served by its current selection
        self.stats = RetrievalStats(per_layer_blocks=[0] * nl)
        # question_selection='shared': the blocks every layer and head attend (Hkv, top_k), and
        # during a scoring pass each candidate block's best z-score so far
        self.shared: torch.Tensor | None = None
        self._best_z: dict[int, float] | None = None

    @property
    def wants_scoring_pass(self) -> bool:
        """Whether `generate` runs a scoring pass over each prompt chunk first (see
        `TrainingFreeConfig.question_selection`)."""
        return self.rc.question_selection == "shared" and self.rc.top_k > 0

    def begin_scoring(self) -> None:
        """Start a scoring pass: the next forward selects per layer as usual and records every
        (layer, KV head)'s z-scores; nothing of it is kept (`finish_scoring`)."""
        self.shared, self._best_z = None, {}

    def finish_scoring(self) -> torch.Tensor:
        """End a scoring pass: the shared selection (Hkv, top_k), ascending ids, absent (-1) first;
        the pass's pending chunk and rotated buffers are dropped, so the chunk runs again."""
        best = self._best_z or {}
        self._best_z = None
        kk, Hkv = self.rc.top_k, self.cfg.n_kv_heads
        top = sorted(sorted(best, key=lambda i: -best[i])[:kk])
        row = torch.full((kk,), -1, dtype=torch.long)
        if top:
            row[kk - len(top):] = torch.tensor(top, dtype=torch.long)
        self.shared = row[None].expand(Hkv, kk).clone()
        self.window.pending = [None] * self.cfg.n_layers
        self._rot = [None] * self.cfg.n_layers
        self._steps = [0] * self.cfg.n_layers
        return self.shared

    @property
    def local_first_block(self) -> int:
        """Stream block index of the first local block."""
        return self.window.start // self.L

    @property
    def _pending(self) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        return self.window.pending

    # -- state ---------------------------------------------------------------------------
    def resume_from_store(self, stream: str | None = None) -> None:
        """Continue after `stream`'s (default: the memory's own) last stored block: its first
        blocks become the sinks, its last `local_blocks` the local window."""
        stream = stream or self.stream
        ids = self.store.stream_blocks(stream) if stream else np.empty(0, np.int64)
        n, sb = len(ids), self.rc.sink_blocks
        sinks = ids[:min(n, sb)]
        first_local = max(len(sinks), n - self.rc.local_blocks)
        local = ids[first_local:]
        self.n_pos = n * self.L
        self.sink_ids = [int(i) for i in sinks]
        kv = []
        for layer in range(self.cfg.n_layers):
            if len(sinks):
                k, v = stream_kv(self.store, sinks, layer, self.device)
                self.sink_k[layer], self.sink_v[layer] = k.float(), v.float()
            if len(local):
                k, v = stream_kv(self.store, local, layer, self.device)
                kv.append((k.float(), v.float()))
        self.window.load(local, kv, first_local * self.L)

    def unfinished_positions(self) -> int:
        return self.n_pos % self.L

    # -- selection -----------------------------------------------------------------------
    def select(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Top-k block ids per KV head for the chunk's queries q (1, H, T, D) pre-RoPE:
        (Hkv, top_k) int64 ascending (stream order), absent (-1) first."""
        kk, Hkv = self.rc.top_k, self.cfg.n_kv_heads
        if kk == 0 or len(self.store) == 0:
            return torch.full((Hkv, kk), -1, dtype=torch.long)
        if self.shared is not None:  # (a scoring pass clears it until it ends)
            return self.shared  # question_selection='shared': the scoring pass chose for every layer
        _, H, T, D = q.shape
        qf = q.float()
        dist = self.rc.distance_for(self.cfg)
        if dist:
            cos, sin = rope_cos_sin(torch.tensor([dist]), D, self.cfg.rope)
            qf = apply_rope(qf, cos, sin)
        qs = qf[0].view(Hkv, H // Hkv, T, D).permute(1, 2, 0, 3).reshape(-1, Hkv, D)  # (G*T, Hkv, D)
        if self.rc.query_agg == "mean":  # the mean score over queries is the mean query's score
            qs = qs.mean(dim=0, keepdim=True)  # (1, Hkv, D)
        exclude = self.sink_ids + self.window.stored_ids()
        # a scoring pass needs every block's score (the z-scores' mean and spread): all of them
        k_search = len(self.store) if self._best_z is not None else kk + len(exclude)
        ids, scores = self.store.index.search_max(layer, qs, k_search, streams=self.read_streams)
        self.stats.searches += 1
        ids = ids.cpu()
        scores = mask_excluded(ids, scores.float().cpu(), exclude)
        if self._best_z is not None:
            self._record_z(ids[0], scores[0], kk)
        return choose_blocks(ids, scores, kk)[0]

    def _record_z(self, ids: torch.Tensor, scores: torch.Tensor, kk: int) -> None:
        """Scoring pass: per KV head, the z-scores of its top kk candidates (ids, scores (Hkv, n),
        excluded ones -inf) kept as each block's best over the (layer, head) pairs seen."""
        for h in range(ids.shape[0]):
            ok = torch.isfinite(scores[h]) & (ids[h] >= 0)
            if int(ok.sum()) < 2:
                continue
            s, i = scores[h][ok].double(), ids[h][ok]
            sd = float(s.std())
            if not sd > 0:
                continue
            z = (s - s.mean()) / sd
            zt, at = z.topk(min(kk, z.numel()))
            for zz, b in zip(zt.tolist(), i[at].tolist()):
                if zz > self._best_z.get(b, float("-inf")):
                    self._best_z[b] = zz

    def _fetch(self, layer: int, sel: torch.Tensor, promote: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of the selected blocks, (1, Hkv, kk*L, D) float32 pre-RoPE, zeros where absent.
        Blocks of this layer's previous selection are reused, not fetched again."""
        Hkv, kk = sel.shape
        k_sel, v_sel, _, n_new = gather_selected(self.store, layer, sel[None], self.device, promote=promote,
                                                  cache=self._blocks[layer])  # (1, Hkv, kk, L, D)
        if n_new:
            self.stats.count_fetched(layer, n_new, self.store.layout)
        else:
            self.stats.reused += 1
        D = k_sel.shape[-1]
        return k_sel.reshape(1, Hkv, kk * self.L, D), v_sel.reshape(1, Hkv, kk * self.L, D)

    # -- attention -----------------------------------------------------------------------
    def _rotated_keys(self, layer: int, sel: torch.Tensor, S: int, n_prefix: int, T: int) -> "_Rotated":
        """This layer's rotated keys and values of [sinks | selected blocks | local window]
        (positions 0..n_prefix-1), with room for T more. Decode steps that keep the selection
        reuse the previous step's buffer (its new entries are the local window's now) instead of
        fetching and rotating every key again; anything else rebuilds it."""
        key = (S, self.local_first_block, tuple(sel.shape))
        buf = self._rot[layer]
        Hkv, D = self.cfg.n_kv_heads, self.cfg.head_dim
        n_ret = sel.shape[1] * self.L
        if buf is not None and buf.key == key and buf.n == n_prefix and buf.k.shape[2] >= n_prefix + T:
            if torch.equal(buf.sel, sel):
                self.stats.reused += 1
                return buf
            # a step that changed the blocks: only the retrieved part is fetched and rotated again
            k_ret, v_ret = self._fetch(layer, sel, promote=T > 1)
            cos, sin = rope_cos_sin(torch.arange(S, S + n_ret, device=self.device), D, self.cfg.rope)
            buf.k[:, :, S:S + n_ret] = apply_rope(k_ret, cos, sin)
            buf.v[:, :, S:S + n_ret] = v_ret
            buf.sel = sel.clone()
            return buf
        k_ret, v_ret = self._fetch(layer, sel, promote=T > 1)  # a decode step reads through
        cap = n_prefix + T + (self.L if T == 1 else 0)  # decode: room for a block of steps
        k_buf = torch.empty(1, Hkv, cap, D, device=self.device)
        v_buf = torch.empty(1, Hkv, cap, D, device=self.device)
        cos, sin = rope_cos_sin(torch.arange(n_prefix, device=self.device), D, self.cfg.rope)
        k_buf[:, :, :n_prefix] = apply_rope(torch.cat([self.sink_k[layer], k_ret, self.window.k[layer]], dim=2), cos, sin)
        v_buf[:, :, :n_prefix] = torch.cat([self.sink_v[layer], v_ret, self.window.v[layer]], dim=2)
        buf = _Rotated(k_buf, v_buf, n_prefix, key, sel.clone())
        self._rot[layer] = buf
        return buf

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One layer's attention for the chunk. q (1, H, T, D); k, v (1, Hkv, T, D), pre-RoPE.
        Returns (1, H, T, D) in q's dtype."""
        if q.shape[0] != 1:
            raise ValueError(f"retrieval memory works on batch size 1, got {q.shape[0]}")
        self._pending[layer] = (k, v)
        _, H, T, D = q.shape
        Hkv = self.cfg.n_kv_heads
        S, n_before = self.sink_k[layer].shape[2], self.window.k[layer].shape[2]
        prev = self._rot[layer]
        if (T == 1 and prev is not None and self._steps[layer] < self.rc.decode_reselect
                and prev.key[:2] == (S, self.local_first_block) and prev.n == S + prev.sel.shape[1] * self.L + n_before):
            sel = prev.sel  # a decode step keeps the layer's last selection (see decode_reselect)
            self._steps[layer] += 1
        else:
            sel = self.select(layer, q)  # (Hkv, kk), absent (-1) first
            # leading slots no head fills are dropped: the present blocks keep abutting the window
            kk = int((sel >= 0).sum(-1).max()) if sel.numel() else 0
            sel = sel[:, sel.shape[1] - kk:]
            self._steps[layer] = 1
        n_ret = sel.shape[1] * self.L
        q_first = S + n_ret + n_before
        buf = self._rotated_keys(layer, sel, S, q_first, T)  # [sinks | retrieved | local], rotated
        cos, sin = rope_cos_sin(torch.arange(q_first, q_first + T, device=self.device), D, self.cfg.rope)
        buf.k[:, :, q_first:q_first + T] = apply_rope(k.float(), cos, sin)
        buf.v[:, :, q_first:q_first + T] = v.float()
        buf.n = q_first + T
        k_all, v_all = buf.k[:, :, :buf.n], buf.v[:, :, :buf.n]  # (1, Hkv, S + n_ret + n_loc, D)
        q_rot = apply_rope(q.float(), cos, sin)  # (1, H, T, D)
        pos = torch.arange(buf.n, device=self.device)
        # which keys each query sees: sinks, present retrieved blocks, local keys up to itself
        mask = None
        if T > 1:
            mask = (pos[None, :] <= (q_first + torch.arange(T, device=self.device))[:, None])[None, None]  # (1, 1, T, S_all)
        if bool((sel < 0).any()):  # some head has fewer blocks: a mask per head
            present = torch.ones(Hkv, k_all.shape[2], dtype=torch.bool, device=self.device)
            present[:, S:S + n_ret] = (sel >= 0).repeat_interleave(self.L, dim=1).to(self.device)
            per_head = present.repeat_interleave(H // Hkv, dim=0)[None, :, None, :]  # (1, H, 1, S_all)
            mask = per_head if mask is None else per_head & mask
        # grouped-query attention without copying keys per query head
        out = F.scaled_dot_product_attention(q_rot, k_all, v_all, attn_mask=mask, enable_gqa=True)  # (1, H, T, D)
        return out.to(q.dtype)

    # -- after each forward -------------------------------------------------------------
    def end_chunk(self) -> int:
        """Commit the chunk just processed: extend the local window, put completed blocks into
        the store (persist=True) with their block keys, move the stream's first blocks to the
        sinks and trim the window to `local_blocks`. Returns the number of blocks put."""
        L = self.L
        self.n_pos += self.window.append_pending()
        new, k, v = self.window.new_blocks()
        if new > 0:
            if self.persist:
                K, V, _ = to_store_layout(k, v, L, self.dtype, self.device)  # (new, nl, Hkv, L, D)
                ids = self.store.put_blocks(self.stream, K, V, block_keys(K, L, self.rc.block_key).contiguous())
                self.stats.blocks_put += len(ids)
                self.window.ids.extend(int(i) for i in ids)
            else:
                self.window.ids.extend([None] * new)
        self._trim()
        return new if self.persist else 0

    def _trim(self) -> None:
        """Keep `local_blocks` complete stored blocks (+ the unfinished one); blocks leaving the
        window that are among the stream's first `sink_blocks` become sinks."""
        w, L = self.window, self.L
        drop = w.droppable(self.rc.local_blocks)
        if not drop:
            return
        n_sink = max(0, min(drop, self.rc.sink_blocks - self.local_first_block))
        if n_sink:
            for layer in range(self.cfg.n_layers):
                self.sink_k[layer] = torch.cat([self.sink_k[layer], w.k[layer][:, :, :n_sink * L]], dim=2)
                self.sink_v[layer] = torch.cat([self.sink_v[layer], w.v[layer][:, :, :n_sink * L]], dim=2)
        self.sink_ids.extend(int(i) for i in w.ids[:n_sink])
        w.drop(drop)
