"""Folded context, variant A (same-layer carry): every layer also attends to the previous
window's keys and values at that same layer.

A RECONSTRUCTION, not the authors' code: Paeng & Kwon, "Folded context condensation in Path
Integral formalism for infinite context transformers" (arXiv 2405.04620) published no code
and its method section could not be read; this follows our reading of its abstracts
(`../shared/seeds/FOLDED.md`, variant A).

The stream is cut into windows of N = `ModelConfig.folded_window` positions. At layer l of
window w the queries attend, in ONE softmax group (the grouped landmark softmax for a
landmark model), to [window w-1's pre-RoPE keys and values at layer l (all visible), window
w (causal)], the previous window at RoPE positions 0..N-1 and the current one at N..2N-1.
For a landmark model the previous window is a blocks group (engine/sources.py) before the
window's own keys in one grouped-softmax call per query window.
After the window the layer's carry becomes window w's keys and values. Information moves
back one window per layer, so a token at distance d can reach a query iff d <= N (n_layers
+ 1) - 1 (`reach`): with N = 12 and 12 layers, 155 tokens. The state is n_layers x 2 x N x
n_kv_heads x head_dim numbers (plus the unfinished window's), constant in the document's
length; a model learns to use it by training on windows in order (`train/folded_memory.py`).

Gradients: the carry passed from one forward to the next is detached (stop-gradient, the
default). A forward over several windows at once (a training step of K windows) computes the
same banded attention with the graph kept across its windows: BPTT over K windows, exactly
the one-shot model with the block-banded mask (window w sees w-1 and itself).

`FoldedMemory` is passed to `LandmarkTransformer.forward(..., memory=...)` like the retrieval
memories, and `end_chunk()` commits each forward. With a store it also puts every completed
block under its stream (K before RoPE, V, and index keys), so `resume_from_store` can rebuild
the state from the stream's last blocks: a later `ask` continues where `ingest` stopped.
Shapes: B lanes, H query heads, Hkv KV heads, D head dim, T new positions, p positions of
the unfinished window already processed, L block_len.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from engine.attention import causal_attention
from engine.block_select import check_store_layout, stream_kv, to_store_layout
from engine.config import ModelConfig
from engine.errors import ModelMismatchError
from engine.model import apply_rope, rope_cos_sin
from engine.retrieval import RetrievalStats
from engine.sources import KeyGroup, compose, grouped_attention
from engine.training_free import block_keys

LaneCarry = tuple[list[torch.Tensor], list[torch.Tensor]]
"""One lane's carry: per layer K and V (Hkv, N, D), pre-RoPE."""


def reach(window: int, n_layers: int) -> int:
    """The longest distance (positions) information can fold forward: N (n_layers + 1) - 1."""
    return window * (n_layers + 1) - 1


def state_numbers(cfg: ModelConfig) -> int:
    """Numbers in a full carry: n_layers x 2 (K, V) x N x n_kv_heads x head_dim."""
    return cfg.n_layers * 2 * cfg.folded_window * cfg.n_kv_heads * cfg.head_dim


@dataclass(kw_only=True, slots=True)
class FoldedConfig:
    """How a folded-context model runs over a stream (the memory itself has no knobs: it is the
    model's, `ModelConfig.folded_window`)."""

    chunk_len: int | None = None
    """Positions per forward during prefill (ingest, prompts): a multiple of the model's folded
    window. None: the largest multiple of it that is <= 512 (at least one window). The result
    does not depend on it beyond float rounding."""

    def __post_init__(self) -> None:
        if self.chunk_len is not None and (not isinstance(self.chunk_len, int) or isinstance(self.chunk_len, bool)
                                           or self.chunk_len < 1):
            raise ValueError(f"FoldedConfig.chunk_len={self.chunk_len!r} is invalid: None (auto) or an int >= 1")

    def chunk_for(self, cfg: ModelConfig) -> int:
        N = cfg.folded_window
        if self.chunk_len is None:
            return N * max(1, 512 // N)
        if self.chunk_len % N:
            raise ValueError(f"FoldedConfig.chunk_len={self.chunk_len} is invalid: a multiple of the model's "
                             f"folded_window={N}")
        return self.chunk_len


class FoldedMemory:
    """The folded-context state of B lanes (one stream each; a store only with B = 1).

    store/stream/persist: with persist=True every completed block is put under `stream`.
    lanes: per lane its carry at the start (None = a document's first window), for training.
    detach: cut the graph between forwards (stop-gradient); False keeps it (BPTT across calls).
    """

    def __init__(self, cfg: ModelConfig, store=None, *, stream: str | None = None, persist: bool = False,
                 lanes: Sequence[LaneCarry | None] | None = None, detach: bool = True,
                 config: FoldedConfig | None = None):
        if not cfg.folded_window:
            raise ModelMismatchError("this model was trained without folded context (folded_window=0); "
                                     "a folded memory needs a model with ModelConfig.folded_window > 0")
        if store is not None:
            check_store_layout(cfg, store)
        if persist and (store is None or not stream):
            raise ValueError("persist=True needs a store and a stream name to write blocks to")
        self.cfg, self.store, self.stream, self.persist, self.detach = cfg, store, stream, persist, detach
        self.rc = config or FoldedConfig()
        self.N, self.L = cfg.folded_window, cfg.block_len
        nl = cfg.n_layers
        lanes = list(lanes) if lanes is not None else [None]
        self.batch = len(lanes)
        if store is not None and self.batch != 1:
            raise ValueError(f"a folded memory with a store has one lane, got {self.batch}")
        self.carry_k: list[torch.Tensor | None] = [None] * nl  # (B, Hkv, N, D) pre-RoPE, or None
        self.carry_v: list[torch.Tensor | None] = [None] * nl
        self.carry_valid = torch.tensor([c is not None for c in lanes])  # (B,) lanes with a carry
        if bool(self.carry_valid.any()):
            ref = next(c for c in lanes if c is not None)
            for layer in range(nl):
                zk = torch.zeros_like(ref[0][layer])
                self.carry_k[layer] = torch.stack([c[0][layer] if c is not None else zk for c in lanes])
                self.carry_v[layer] = torch.stack([c[1][layer] if c is not None else zk for c in lanes])
        self.cur_k: list[torch.Tensor | None] = [None] * nl  # (B, Hkv, p, D): the unfinished window
        self.cur_v: list[torch.Tensor | None] = [None] * nl
        self.cur_len = 0  # p
        self.n_pos = 0  # stream positions processed (the same for every lane)
        self._pending: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * nl
        self.stats = RetrievalStats(per_layer_blocks=[0] * nl)  # ingest reports blocks put, bytes fetched

    # -- state ---------------------------------------------------------------------------
    def lane_carry(self, b: int) -> LaneCarry | None:
        """Lane b's carry (per layer K, V (Hkv, N, D)), None if it has none yet."""
        if self.carry_k[0] is None or not bool(self.carry_valid[b]):
            return None
        return [k[b] for k in self.carry_k], [v[b] for v in self.carry_v]

    def state_bytes(self) -> int:
        """Bytes held: the carry and the unfinished window, every layer and lane."""
        return sum(t.numel() * t.element_size() for t in self.carry_k + self.carry_v + self.cur_k + self.cur_v
                   if t is not None)

    def reset(self) -> None:
        """Forget everything (a document boundary): the next window sees only itself."""
        nl = self.cfg.n_layers
        self.carry_k, self.carry_v = [None] * nl, [None] * nl
        self.cur_k, self.cur_v = [None] * nl, [None] * nl
        self.carry_valid = torch.zeros(self.batch, dtype=torch.bool)
        self.cur_len, self._pending = 0, [None] * nl

    def resume_from_store(self, stream: str | None = None) -> None:
        """Continue after `stream`'s (default: the memory's own) last stored block: the stream's
        last complete window becomes the carry and the stored blocks of its unfinished window
        the current part (its unfinished block's tokens are the caller's to re-run)."""
        stream = stream or self.stream
        if self.store is None:
            raise ValueError("resume_from_store needs a memory with a store")
        ids = self.store.stream_blocks(stream) if stream else np.empty(0, np.int64)
        self.reset()
        N, L = self.N, self.L
        n = len(ids)
        self.n_pos = n * L
        ws = self.n_pos // N * N  # the unfinished window's start
        cur, carry = ids[ws // L:], ids[max(0, ws - N) // L: ws // L] if ws >= N else ids[:0]
        dev = self.store.device
        for layer in range(self.cfg.n_layers):
            for part, kk, vv in ((carry, self.carry_k, self.carry_v), (cur, self.cur_k, self.cur_v)):
                if len(part):
                    k, v = stream_kv(self.store, part, layer, dev)
                    kk[layer], vv[layer] = k.float(), v.float()
        self.carry_valid = torch.tensor([len(carry) > 0])
        self.cur_len = self.n_pos - ws
        self.stats.bytes_fetched += (len(carry) + len(cur)) * self.store.layout.block_bytes()

    def unfinished_positions(self) -> int:
        return self.n_pos % self.L

    # -- attention -----------------------------------------------------------------------
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, H, T, D), k, v (B, Hkv, T, D) pre-RoPE -> (B, H, T, D): attention over
        [previous window (all), current window (causal)] for every query, windows of N."""
        B, H, T, D = q.shape
        if B != self.batch:
            raise ValueError(f"batch of {B} rows but the folded memory has {self.batch} lanes")
        N, p = self.N, self.cur_len
        has_carry = self.carry_k[layer] is not None and bool(self.carry_valid.any())
        off = N if has_carry else 0  # key index of the current window's first position
        parts_k = ([self.carry_k[layer].to(k.dtype)] if has_carry else []) + \
            ([self.cur_k[layer].to(k.dtype)] if p else []) + [k]
        parts_v = ([self.carry_v[layer].to(v.dtype)] if has_carry else []) + \
            ([self.cur_v[layer].to(v.dtype)] if p else []) + [v]
        k_all = torch.cat(parts_k, dim=2) if len(parts_k) > 1 else k  # (B, Hkv, S, D)
        v_all = torch.cat(parts_v, dim=2) if len(parts_v) > 1 else v
        S = k_all.shape[2]
        cos, sin = rope_cos_sin(torch.arange(S, device=q.device), D, self.cfg.rope, q.dtype)
        k_rot = apply_rope(k_all, cos, sin)
        q_rot = apply_rope(q, cos[off + p:], sin[off + p:])
        self._pending[layer] = (k, v)
        valid = self.carry_valid.to(q.device) if has_carry else None
        if self.cfg.landmarks:
            return self._landmark(q_rot, k_rot, v_all, off, p, valid)
        one_window = p + T <= N
        if one_window and (valid is None or bool(valid.all())):  # carry all visible + causal: plain causal
            return causal_attention(q_rot, k_rot, v_all, q_offset=off + p)
        r_q = p + torch.arange(T, device=q.device)  # window-relative positions
        r_k = torch.arange(S, device=q.device) - off
        mask = (r_k[None, :] <= r_q[:, None]) & (torch.div(r_k, N, rounding_mode="floor")[None, :]
                                                 >= torch.div(r_q, N, rounding_mode="floor")[:, None] - 1)
        mask = mask[None, None].expand(B, 1, T, S)
        if valid is not None:
            mask = mask & ((r_k >= 0)[None, :] | valid[:, None])[:, None, None, :]
        G = H // k_rot.shape[1]
        if G > 1:
            k_rot, v_all = k_rot.repeat_interleave(G, dim=1), v_all.repeat_interleave(G, dim=1)
        return F.scaled_dot_product_attention(q_rot, k_rot, v_all, attn_mask=mask)

    def _landmark(self, q_rot, k_rot, v_all, off: int, p: int, valid: torch.Tensor | None) -> torch.Tensor:
        """The grouped softmax per query window: its previous window's keys (the carry, or the
        window before it in this forward) as a blocks group before its own, causal, keys."""
        B, H, T, D = q_rot.shape
        N, L = self.N, self.L
        out = []
        for w in range(p // N, (p + T - 1) // N + 1):
            i0, i1 = max(0, w * N - p), min(T, (w + 1) * N - p)  # this window's query rows
            k0, ws = max(0, (w - 1) * N + off), off + w * N  # key index of the previous / own window's start
            k1 = off + p + i1  # keys up to the last query's own position
            prev = None
            if ws > k0:
                pv = None
                if w == 0 and valid is not None:  # lanes without a carry: its keys are absent
                    pv = valid[:, None, None].expand(B, k_rot.shape[1], ws - k0)
                prev = KeyGroup(k_rot[:, :, k0:ws], v_all[:, :, k0:ws], pv, const=False)
            inp = compose(q_rot[:, :, i0:i1], k_rot[:, :, ws:k1], v_all[:, :, ws:k1], p + i0 - w * N, [prev])
            out.append(grouped_attention(inp, L, "vectorized"))
        return torch.cat(out, dim=2) if len(out) > 1 else out[0]

    # -- after each forward -------------------------------------------------------------
    def end_chunk(self) -> int:
        """Commit the forward just run: the last complete window becomes the carry, the rest the
        unfinished window; completed blocks go to the store (persist). Returns blocks put."""
        if any(x is None for x in self._pending):
            raise RuntimeError("end_chunk() called before every layer attended this chunk")
        N, L, p = self.N, self.L, self.cur_len
        T = self._pending[0][0].shape[2]
        full = (p + T) // N
        n0, n1 = self.n_pos, self.n_pos + T
        ws = n0 - p  # stream position of the unfinished window's start
        b0, b1 = n0 // L * L, n1 // L * L  # completed blocks to put: [b0, b1)
        put_k, put_v = [], []
        for layer, (k, v) in enumerate(self._pending):
            if self.detach:
                k, v = k.detach(), v.detach()
            allk = torch.cat([self.cur_k[layer], k], dim=2) if p else k  # (B, Hkv, p + T, D)
            allv = torch.cat([self.cur_v[layer], v], dim=2) if p else v
            if self.persist and b1 > b0:
                put_k.append(allk[0, :, b0 - ws:b1 - ws].detach())
                put_v.append(allv[0, :, b0 - ws:b1 - ws].detach())
            if full:
                self.carry_k[layer] = allk[:, :, (full - 1) * N: full * N]
                self.carry_v[layer] = allv[:, :, (full - 1) * N: full * N]
            self.cur_k[layer] = allk[:, :, full * N:] if p + T > full * N else None
            self.cur_v[layer] = allv[:, :, full * N:] if p + T > full * N else None
        if full:
            self.carry_valid = torch.ones(self.batch, dtype=torch.bool)
        self.cur_len = p + T - full * N
        self.n_pos = n1
        self._pending = [None] * self.cfg.n_layers
        if not put_k:
            return 0
        K, V, lm = to_store_layout(put_k, put_v, L, self.store.layout.torch_dtype, self.store.device)
        # index keys as the retrieval memories write them: the landmark slot's, or the mean key
        keys = lm if self.cfg.landmarks else block_keys(K, L, "mean").contiguous()
        ids = self.store.put_blocks(self.stream, K, V, keys)
        self.stats.blocks_put += len(ids)
        return len(ids)


class FoldedRecurrence:
    """Folded context, variant B (folded recurrence; the other reading of the paper's v3-v5
    abstracts, ../shared/seeds/FOLDED.md): the previous window's TOP-layer hidden states (before
    the final norm) enter as a prefix at layer 0 and evolve again, through every layer, with the
    current window; the current window's top states become the next prefix. One plain causal
    softmax over [prefix (positions 0..P-1), window (P..)]; the reach is unbounded (information
    passes through every window's states), at about 2x the FFN and 4x the attention of a window.
    Causal models; whole windows of N per forward (training and bench.folded; no store).

    detach: cut the graph between forwards (stop-gradient); False: BPTT across them.
    lanes: B (each lane's prefix starts empty; all lanes advance together)."""

    def __init__(self, cfg: ModelConfig, *, lanes: int = 1, detach: bool = True):
        if not cfg.folded_window:
            raise ModelMismatchError("a folded recurrence needs a model with ModelConfig.folded_window > 0")
        if cfg.landmarks:
            raise ValueError("folded context variant B is built for causal models (attention='causal')")
        self.cfg, self.N, self.batch, self.detach = cfg, cfg.folded_window, lanes, detach
        self.prefix: torch.Tensor | None = None  # (B, N, d)
        self._P = 0

    def reset(self) -> None:
        self.prefix = None

    def state_bytes(self) -> int:
        return 0 if self.prefix is None else self.prefix.numel() * self.prefix.element_size()

    def prefix_states(self, x: torch.Tensor) -> torch.Tensor | None:
        if x.shape[1] != self.N:
            raise ValueError(f"a folded recurrence runs one window of {self.N} positions per forward, "
                             f"got {x.shape[1]}")
        self._P = 0 if self.prefix is None else self.prefix.shape[1]
        return None if self.prefix is None else self.prefix.to(x.dtype)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        S = q.shape[2]
        cos, sin = rope_cos_sin(torch.arange(S, device=q.device), q.shape[-1], self.cfg.rope, q.dtype)
        return causal_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)

    def top_states(self, x: torch.Tensor) -> None:
        self.prefix = x.detach() if self.detach else x

    def end_chunk(self) -> int:
        return 0


__all__ = ["FoldedConfig", "FoldedMemory", "FoldedRecurrence", "LaneCarry", "reach", "state_numbers"]
