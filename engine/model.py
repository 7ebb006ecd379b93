"""The decoder-only landmark transformer: RoPE, RMSNorm, SwiGLU, grouped-query attention.

Tokens arrive with landmarks already inserted (`engine.landmarks.insert_landmarks`), a
sequence starting at a block boundary. Attention is selected per call:
  "vectorized"  landmark grouped softmax over a training window (T <= max_seq_len),
  "blockwise"   the same math with linear memory, for long prefill and decoding,
  "sdpa"        plain causal attention (the `causal` baseline mode).
Keys are rotated inside attention, so the pre-RoPE keys are what the KV cache (and
the block store) keep; `forward(..., return_kv=True)` hands them out per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.attention import (causal_attention, landmark_attention,
                              landmark_attention_blockwise)
from engine.config import ModelConfig, RopeScaling
from engine.kv_cache import KVCache
from engine.memory import AttentionMemory, ResidualMemory

Impl = Literal["auto", "vectorized", "blockwise", "sdpa"]
IMPLS = get_args(Impl)


_ROPE_CACHE_MAX = 16384  # positions below this come from a cached table (identical values)
_rope_tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _rope_compute(positions: torch.Tensor, head_dim: int, theta: float,
                  dtype: torch.dtype, scaling: RopeScaling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device,
                                         dtype=torch.float64) / head_dim))  # (D/2,)
    if scaling is not None:
        inv = scaling.inv_freq(inv)
    ang = positions.to(torch.float64)[:, None] * inv[None, :]  # (T, D/2)
    ang = torch.cat([ang, ang], dim=-1)  # (T, D)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float | tuple[float, RopeScaling | None],
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables for the given positions: each (T, head_dim).

    theta: the RoPE base, or `ModelConfig.rope` (base, frequency scaling or None).

    Small non-negative integer positions (the local window, stingy prefixes, training
    windows) are gathered from a per-(head_dim, theta, dtype, device) table computed the
    same way, so the values are bit-identical to computing them directly."""
    theta, scaling = theta if isinstance(theta, tuple) else (theta, None)
    if (positions.numel() and not positions.is_floating_point() and not positions.requires_grad
            and positions.device.type == "cpu"):
        lo, hi = int(positions.min()), int(positions.max())
        if lo >= 0 and hi < _ROPE_CACHE_MAX:
            key = (head_dim, float(theta), scaling, dtype, positions.device)
            tab = _rope_tables.get(key)
            if tab is None:
                tab = _rope_compute(torch.arange(_ROPE_CACHE_MAX, device=positions.device), head_dim, theta,
                                    dtype, scaling)
                _rope_tables[key] = tab
            idx = positions.reshape(-1)
            return tab[0].index_select(0, idx), tab[1].index_select(0, idx)
    return _rope_compute(positions, head_dim, theta, dtype, scaling)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., T, D) by the tables (T, D); Llama's rotate-half convention."""
    d = x.shape[-1] // 2
    rot = torch.cat([-x[..., d:], x[..., :d]], dim=-1)
    return x * cos + rot * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x if x.dtype == torch.float64 else x.float()  # half precisions in float32; float64 (tests) stays
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


@dataclass
class LayerKV:
    """One layer's keys (before RoPE) and values of the tokens just processed."""

    k: torch.Tensor  # (B, Hkv, T, D)
    v: torch.Tensor  # (B, Hkv, T, D)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * self.hd, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * self.hd, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * self.hd, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * self.hd, cfg.d_model, bias=cfg.o_bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], impl: str,
                layer_cache: "KVCache.Layer | None" = None, memory: AttentionMemory | None = None, layer_idx: int = 0
                ) -> tuple[torch.Tensor, LayerKV]:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, H, T, D)
        k = self.wk(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.wv(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, Hkv, T, D)
        new_kv = LayerKV(k, v)
        if memory is not None:
            # the memory owns positions and the local window; it rotates what it needs
            y = memory.attend(layer_idx, q, k, v)
        else:
            cos, sin = rope  # (T, D) for the new tokens' positions
            q_rot = apply_rope(q, cos, sin)
            if layer_cache is not None:
                # rotated keys of everything cached plus the new tokens
                k_all, v_all, q_offset = layer_cache.append(k, v, apply_rope(k, cos, sin))
            else:
                k_all, v_all, q_offset = apply_rope(k, cos, sin), v, 0
            if impl == "sdpa":
                y = causal_attention(q_rot, k_all, v_all, q_offset=q_offset)
            elif impl == "vectorized":
                y = landmark_attention(q_rot, k_all, v_all, self.cfg.block_len, q_offset=q_offset)
            else:
                y = landmark_attention_blockwise(q_rot, k_all, v_all, self.cfg.block_len,
                                                 q_offset=q_offset)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd)  # (B, T, H*D)
        return self.wo(y), new_kv


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.d_model, cfg.ffn_hidden)

    def forward(self, x, rope, impl, layer_cache=None, memory=None, layer_idx=0):
        a, kv = self.attn(self.attn_norm(x), rope, impl, layer_cache, memory, layer_idx)
        x = x + a
        return x + self.ffn(self.ffn_norm(x)), kv


class LandmarkTransformer(nn.Module):
    """Decoder-only transformer with landmark (or plain causal) attention."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.uio is not None:  # UIO-LLMs' memory modules (engine/uio.py): slot, encoder and head LoRAs
            from engine.uio import UIOConfig, UIOModules

            self.uio = UIOModules(cfg, UIOConfig(**cfg.uio))
        self.apply(self._init)
        self.to(getattr(torch, cfg.dtype))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if not isinstance(tokens, torch.Tensor):
            raise ValueError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens.dtype={tokens.dtype} is invalid: allowed int64 or int32")
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise ValueError(f"tokens.shape={tuple(tokens.shape)} is invalid: must be (B, T), T >= 1")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.cfg.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"tokens contain id {bad}: allowed 0..{self.cfg.vocab_size - 1}")

    def resolve_impl(self, impl: Impl, T: int, cached: bool) -> Impl:
        if impl not in IMPLS:
            raise ValueError(f"impl={impl!r} is invalid: allowed {IMPLS}")
        if not self.cfg.landmarks:
            if impl not in ("auto", "sdpa"):
                raise ValueError(f"impl={impl!r} needs attention='landmark'; this model is "
                                 f"attention={self.cfg.attention!r} (allowed: auto, sdpa)")
            return "sdpa"
        if impl == "sdpa":
            raise ValueError("impl='sdpa' is plain causal attention; this model is "
                             "attention='landmark' (allowed: auto, vectorized, blockwise)")
        if impl == "auto":
            return "vectorized" if (not cached and T <= self.cfg.max_seq_len) else "blockwise"
        return impl

    def forward(self, tokens: torch.Tensor, *, cache: KVCache | None = None, impl: Impl = "auto",
                memory: AttentionMemory | None = None, return_kv: bool = False,
                positions: torch.Tensor | None = None):
        """tokens (B, T) with landmarks in place -> logits (B, T, vocab).

        cache: continue after the tokens already in it (prefill chunks or decoding).
        impl: "auto", "vectorized" (window only: T <= max_seq_len), "blockwise", "sdpa".
        memory: an `AttentionMemory` (engine/memory.py: retrieval, folded context, UIO memories).
        positions: (T,) RoPE positions (default: the cache length onward).
        return_kv: also return a list of per-layer `LayerKV` (pre-RoPE keys).
        Raises ValueError on bad tokens, an unknown impl, or a window overflow.
        """
        self._check_tokens(tokens)
        B, T = tokens.shape
        start = cache.length if cache is not None else 0
        impl = self.resolve_impl(impl, T, cache is not None)
        if impl == "vectorized" and start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {start + T} exceeds max_seq_len="
                             f"{self.cfg.max_seq_len} for impl='vectorized' (the training "
                             f"window); use impl='blockwise' or a cache for longer inputs")
        if memory is not None and cache is not None:
            raise ValueError("pass either cache= or memory= (a retrieval memory keeps its own window)")
        if memory is not None:
            impl = "blockwise"
        if cache is not None and (cache.batch != B):
            raise ValueError(f"cache batch {cache.batch} != tokens batch {B}")
        if positions is None:
            positions = torch.arange(start, start + T, device=tokens.device)
        dt = self.tok_emb.weight.dtype
        rope = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope, dt)
        x = self.tok_emb(tokens)  # (B, T, d)
        # a memory that feeds hidden states in at layer 0 (folded context, variant B: the previous
        # window's top-layer states evolve again with this window) and reads the top layer's back
        residual = isinstance(memory, ResidualMemory)
        prefix = memory.prefix_states(x) if residual else None
        if prefix is not None:
            x = torch.cat([prefix, x], dim=1)  # (B, P + T, d)
        kvs = []
        for i, layer in enumerate(self.layers):
            lc = cache.layers[i] if cache is not None else None
            x, kv = layer(x, rope, impl, lc, memory, i)
            if return_kv:
                kvs.append(kv)
        if prefix is not None:
            x = x[:, prefix.shape[1]:]
        if residual:
            memory.top_states(x)
        if cache is not None:
            cache.length += T
        logits = self.lm_head(self.norm(x))  # (B, T, vocab)
        return (logits, kvs) if return_kv else logits

    def new_cache(self, batch: int, max_len: int, device: torch.device | str | None = None
                  ) -> KVCache:
        """An empty KV cache for `batch` sequences of up to `max_len` positions."""
        dev = device if device is not None else self.tok_emb.weight.device
        return KVCache(self.cfg.n_layers, batch, self.cfg.n_kv_heads, self.cfg.head_dim,
                       max_len, dtype=self.tok_emb.weight.dtype, device=dev)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
