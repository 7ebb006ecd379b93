"""UIO-LLMs' memory (arXiv 2406.18173): every window is compressed into a few memory slots per
layer by an encoder (the model's own weights plus a LoRA on W_Q and W_V); later windows attend
to all earlier windows' memories through a transfer head (W_K, W_V plus their own LoRA).

The specification is `../shared/seeds/UIO.md` ([paper], [code] and [Folio] parts); the
gradient estimator that trains it (incremental TBPTT with a reservoir and the unbiasing
factor) is `train/uio_tbptt.py`.

- Segment = one window of T positions; m = T / ratio memory slots.
- Encoder input: the window's tokens, then m slot embeddings (one learned vector for every
  slot, initialised from a token's embedding, e.g. EOS). Mask: ordinary tokens are causal and
  never see slots; slot i sees tokens [0, (i+1) T/m) and itself, at RoPE position (i+1) T/m.
  The encoder sees only its own window, never earlier memories. Its attention is one plain
  softmax (a landmark model's landmark tokens are ordinary tokens to it).
- A memory: at every layer, the normalised hidden state entering attention at the slot
  positions, (B, m, d_model).
- Decoder: at layer l the memories of all earlier windows (oldest first, at most
  `max_memories` slots: FIFO) become keys and values through the transfer head and join the
  local softmax group, visible to every query, slot j of M at RoPE position p0 - M + j (p0 the
  window's first position); the window's own tokens use the unmodified projections, so with no
  memory the decoder is exactly the base model (bitwise: test U6). In a landmark model the
  memory keys join group 0 of the grouped softmax. The memory tokens are a key source
  (`MemoryTokens`) of the composed attention of engine/sources.py.

Shapes: B batch, T window positions, m slots per window, M memory slots attended, H query heads,
Hkv KV heads, D head dim, d d_model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.config import ModelConfig
from engine.model import LandmarkTransformer, apply_rope, rope_cos_sin
from engine.sources import KeyGroup, KeySource, compose, grouped_attention

Memory = list[torch.Tensor]
"""One window's memory: per layer (B, m, d_model)."""


@dataclass(kw_only=True, slots=True)
class UIOConfig:
    """UIO memory settings (the model's; the estimator's S and factor are `train.uio_tbptt`'s too)."""

    ratio: int = 8
    """Window positions per memory slot: m = window / ratio."""
    enc_rank: int = 8
    """Rank of the encoder's LoRA on W_Q and W_V."""
    head_rank: int = 8
    """Rank of the transfer head's LoRA on W_K and W_V."""
    lora_alpha: float = 16.0
    """LoRA scale alpha / rank, both LoRAs."""
    max_memories: int = 1024
    """Most memory slots a window attends to (oldest dropped first)."""
    S: int = 2
    """Reservoir size: encoder graphs kept alive during a document (training)."""
    factor: bool = True
    """Scale the gradient late windows send into memories by c_t = max(1, t / S) (unbiased)."""
    train_base: bool = False
    """Train the model's own weights too (the paper: frozen, only the LoRAs and the slot)."""
    max_windows: int = 64
    """Windows per TBPTT sequence: a longer document is cut into several, each from no memory."""

    def __post_init__(self) -> None:
        for name, lo in (("ratio", 1), ("enc_rank", 0), ("head_rank", 0), ("max_memories", 1), ("S", 0),
                         ("max_windows", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"UIOConfig.{name}={v!r} is invalid: an int >= {lo}")
        if not self.lora_alpha > 0:
            raise ValueError(f"UIOConfig.lora_alpha={self.lora_alpha!r} is invalid: must be > 0")
        for name in ("factor", "train_base"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"UIOConfig.{name}={getattr(self, name)!r} is invalid: a bool")

    def slots(self, window: int) -> int:
        if window % self.ratio:
            raise ValueError(f"window={window} is not a multiple of UIOConfig.ratio={self.ratio}")
        return window // self.ratio

    def to_dict(self) -> dict:
        return asdict(self)


class LoRA(nn.Module):
    """x -> (alpha / r) x A^T B^T, A (r, d_in), B (d_out, r); B starts at 0 (the base at start)."""

    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float):
        super().__init__()
        self.scale = alpha / rank if rank else 0.0
        self.A = nn.Parameter(torch.randn(rank, d_in) / math.sqrt(d_in))
        self.B = nn.Parameter(torch.zeros(d_out, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.A.shape[0]:
            return torch.zeros(*x.shape[:-1], self.B.shape[0], dtype=x.dtype, device=x.device)
        return (x @ self.A.t()) @ self.B.t() * self.scale


class UIOModules(nn.Module):
    """What UIO adds to a model: the slot embedding, per layer the encoder's LoRA on W_Q and W_V
    and the transfer head's LoRA on W_K and W_V."""

    def __init__(self, cfg: ModelConfig, uio: UIOConfig, *, slot_init: torch.Tensor | None = None):
        super().__init__()
        self.cfg, self.uio = cfg, uio
        d, hq, hkv = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        r, a = uio.enc_rank, uio.lora_alpha
        self.slot = nn.Parameter(slot_init.detach().clone() if slot_init is not None else torch.randn(d) * 0.02)
        self.enc_q = nn.ModuleList(LoRA(d, hq, r, a) for _ in range(cfg.n_layers))
        self.enc_v = nn.ModuleList(LoRA(d, hkv, r, a) for _ in range(cfg.n_layers))
        self.head_k = nn.ModuleList(LoRA(d, hkv, uio.head_rank, a) for _ in range(cfg.n_layers))
        self.head_v = nn.ModuleList(LoRA(d, hkv, uio.head_rank, a) for _ in range(cfg.n_layers))


def attach(model: LandmarkTransformer, uio: UIOConfig, *, slot_token: int | None = None) -> UIOModules:
    """Add UIO's modules to `model` as `model.uio` (their parameters then train and checkpoint
    with the model's); the slot starts from `slot_token`'s embedding if given. With
    uio.train_base False the model's own weights are frozen."""
    init = model.tok_emb.weight[slot_token] if slot_token is not None else None
    mods = UIOModules(model.cfg, uio, slot_init=init).to(model.tok_emb.weight.dtype)
    if not uio.train_base:
        for p in model.parameters():
            p.requires_grad_(False)
    model.uio = mods
    return mods


def _modules(model: LandmarkTransformer) -> UIOModules:
    mods = getattr(model, "uio", None)
    if mods is None:
        from engine.errors import ModelMismatchError

        raise ModelMismatchError("this model was trained without UIO memories (no UIO modules): it cannot read "
                                 "or write them; train one with UIO (train.uio_tbptt) or use another memory")
    return mods


def encoder_mask(T: int, m: int, device=None) -> torch.Tensor:
    """(T + m, T + m) bool, True = may attend: tokens causal and blind to slots; slot i sees
    tokens [0, (i+1) T/m) and itself."""
    n = T + m
    allowed = torch.zeros(n, n, dtype=torch.bool, device=device)
    allowed[:T, :T] = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    span = T // m
    for i in range(m):
        allowed[T + i, :(i + 1) * span] = True
        allowed[T + i, T + i] = True
    return allowed


def encode(model: LandmarkTransformer, tokens: torch.Tensor) -> Memory:
    """The memory of one window: tokens (B, T) -> per layer (B, m, d_model), the normalised
    hidden states entering attention at the slot positions (differentiable)."""
    mods = _modules(model)
    cfg = model.cfg
    B, T = tokens.shape
    m = mods.uio.slots(T)
    dev = tokens.device
    dt = model.tok_emb.weight.dtype
    x = torch.cat([model.tok_emb(tokens), mods.slot.to(dt).expand(B, m, -1)], dim=1)  # (B, T+m, d)
    pos = torch.cat([torch.arange(T, device=dev), (torch.arange(m, device=dev) + 1) * (T // m)])
    cos, sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope, dt)
    mask = encoder_mask(T, m, dev)
    out: Memory = []
    for i, layer in enumerate(model.layers):
        a = layer.attn
        h = layer.attn_norm(x)
        out.append(h[:, T:])
        q = (a.wq(h) + mods.enc_q[i](h)).view(B, T + m, a.n_heads, a.hd).transpose(1, 2)
        k = a.wk(h).view(B, T + m, a.n_kv, a.hd).transpose(1, 2)
        v = (a.wv(h) + mods.enc_v[i](h)).view(B, T + m, a.n_kv, a.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        G = a.n_heads // a.n_kv
        y = F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), attn_mask=mask)
        x = x + a.wo(y.transpose(1, 2).reshape(B, T + m, -1))
        x = x + layer.ffn(layer.ffn_norm(x))
    return out


class UIOMemory:
    """The decoder side: earlier windows' memories join every layer's attention.

    memories: the earlier windows' `Memory`s, oldest first (tensors, possibly leaves with
    requires_grad: their .grad collects dJ/dm). p0: the window's first RoPE position.
    """

    def __init__(self, model: LandmarkTransformer, memories: Sequence[Memory], *, p0: int = 0,
                 kv: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None, cache: bool = False,
                 sources: Sequence[KeySource] = ()):
        """kv: instead of memories, per layer the memory keys and values already through the
        transfer head (pre-RoPE, (B, Hkv, M, D)), as `ingest` stores them. cache: keep the window's
        own keys and values between forwards (decoding continues the window; `end_chunk`).
        sources: more `KeySource`s (engine/sources.py) whose keys join every layer's attention."""
        self.model, self.mods = model, _modules(model)
        self.cfg = model.cfg
        self.p0 = p0
        cap = self.mods.uio.max_memories
        self.per_layer: list[torch.Tensor | None] = []
        self.kv = None
        if kv is not None:
            self.kv = [(k[:, :, -cap:], v[:, :, -cap:]) if k.shape[2] else None for k, v in kv]
            self.per_layer = [None] * self.cfg.n_layers
        for layer in range(self.cfg.n_layers if kv is None else 0):
            if memories:
                h = torch.cat([mem[layer] for mem in memories], dim=1)  # (B, M, d)
                self.per_layer.append(h[:, -cap:])
            else:
                self.per_layer.append(None)
        self.cache = cache
        self.local: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * self.cfg.n_layers
        self._pending: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * self.cfg.n_layers
        self.n_pos = 0  # window positions cached (cache=True)
        self.sources: list[KeySource] = [MemoryTokens(self), *sources]

    @property
    def n_slots(self) -> int:
        if self.kv is not None:
            return 0 if self.kv[0] is None else self.kv[0][0].shape[2]
        h = self.per_layer[0]
        return 0 if h is None else h.shape[1]

    def memory_kv(self, layer: int, B: int, dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Layer's memory keys (pre-RoPE) and values (B, Hkv, M, D), or None without memory."""
        if self.kv is not None:
            kv = self.kv[layer]
            return None if kv is None else (kv[0].to(dtype), kv[1].to(dtype))
        h = self.per_layer[layer]
        if h is None:
            return None
        return transfer(self.model, layer, h.to(dtype))

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, H, T, D), k, v (B, Hkv, T, D) pre-RoPE -> (B, H, T, D): the window (causal, its
        own grouped softmax for a landmark model) with every source's keys (the memory tokens)."""
        B, H, T, D = q.shape
        cfg = self.cfg
        n0 = self.n_pos
        cos, sin = rope_cos_sin(torch.arange(self.p0, self.p0 + n0 + T, device=q.device), D, cfg.rope, q.dtype)
        q_rot = apply_rope(q, cos[n0:], sin[n0:])
        if self.cache:
            self._pending[layer] = (k, v)
            if self.local[layer] is not None:
                k = torch.cat([self.local[layer][0], k], 2)
                v = torch.cat([self.local[layer][1], v], 2)
        k_rot = apply_rope(k, cos, sin)
        q_local = torch.arange(n0, n0 + T, device=q.device)
        groups = [src.keys(layer, q, q_local) for src in self.sources]
        # without memory keys: exactly the base model's attention
        return grouped_attention(compose(q_rot, k_rot, v, n0, groups), cfg.block_len,
                                 "vectorized" if cfg.landmarks else "causal")

    def end_chunk(self) -> int:
        """With cache=True, the forward's keys and values join the window (decoding)."""
        if self.cache:
            for layer, (k, v) in enumerate(self._pending):
                lc = self.local[layer]
                self.local[layer] = (k, v) if lc is None else (torch.cat([lc[0], k], 2), torch.cat([lc[1], v], 2))
            self.n_pos += self._pending[0][0].shape[2]
            self._pending = [None] * self.cfg.n_layers
        return 0


class MemoryTokens:
    """The compressed memory tokens of a `UIOMemory` as a key source: every query sees them in
    group 0 (scores as they are), at RoPE positions p0 - M .. p0 - 1 just before the window."""

    def __init__(self, memory: UIOMemory):
        self.memory = memory

    def keys(self, layer: int, q: torch.Tensor, q_local: torch.Tensor) -> KeyGroup | None:
        mkv = self.memory.memory_kv(layer, q.shape[0], q.dtype)
        if mkv is None:
            return None
        return memory_key_group(*mkv, self.memory.p0, self.memory.cfg.rope, q.dtype, const=False)


def memory_key_group(km: torch.Tensor, vm: torch.Tensor, p0: int, rope, dtype, *, const: bool = True) -> KeyGroup:
    """Memory keys (pre-RoPE) and values (B, Hkv, M, D) as a group-0 `KeyGroup` at RoPE positions
    p0 - M .. p0 - 1, just before a window starting at p0."""
    M = km.shape[2]
    cos, sin = rope_cos_sin(torch.arange(p0 - M, p0, device=km.device), km.shape[3], rope, dtype)
    return KeyGroup(apply_rope(km.to(dtype), cos, sin), vm.to(dtype), kind="group0", const=const)


def transfer(model: LandmarkTransformer, layer: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The transfer head: memory hidden states h (B, M, d) of `layer` -> keys (pre-RoPE) and
    values (B, Hkv, M, D): the layer's W_K, W_V plus the head's LoRA."""
    mods = _modules(model)
    a = model.layers[layer].attn
    B, M, _ = h.shape
    km = (a.wk(h) + mods.head_k[layer](h)).view(B, M, a.n_kv, a.hd).transpose(1, 2)
    vm = (a.wv(h) + mods.head_v[layer](h)).view(B, M, a.n_kv, a.hd).transpose(1, 2)
    return km, vm


def memory_kv(model: LandmarkTransformer, mem: Memory) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One window's memory through the transfer head of every layer: (k pre-RoPE, v), (B, Hkv, m, D)."""
    return [transfer(model, layer, mem[layer]) for layer in range(model.cfg.n_layers)]


def put_memory(store, stream: str, model: LandmarkTransformer, mem: Memory | None = None, *,
               kv: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None) -> int:
    """Put one window's memory (through the transfer head: K pre-RoPE, V; or its `memory_kv`
    given as kv) into the store under `stream` (a UIO model's streams hold memories, not token
    blocks), as m / block_len blocks per layer. Returns the blocks put."""
    cfg = model.cfg
    L = cfg.block_len
    kv = memory_kv(model, mem) if kv is None else kv
    m = kv[0][0].shape[2]
    if m % L:
        raise ValueError(f"a window's {m} memory slots do not fill whole blocks of block_len={L}: UIO memories "
                         f"are stored only when window / ratio is a multiple of block_len")
    from engine.block_select import to_store_layout
    from engine.training_free import block_keys

    ks, vs = zip(*kv)  # (1, Hkv, m, D) each
    K, V, _ = to_store_layout([k[0] for k in ks], [v[0] for v in vs], L, store.layout.torch_dtype, store.device)
    ids = store.put_blocks(stream, K, V, block_keys(K, L, "mean").contiguous())
    return len(ids)


def stored_memory_kv(store, stream: str, model: LandmarkTransformer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's stored memory keys and values of `stream`, oldest first: (1, Hkv, M, D) each
    (at most the model's max_memories slots, the newest)."""
    from engine.block_select import stream_kv

    cfg = model.cfg
    ids = store.stream_blocks(stream) if stream in store.streams() else []
    cap_blocks = -(-_modules(model).uio.max_memories // cfg.block_len)
    ids = ids[-cap_blocks:] if len(ids) else ids
    out = []
    dev = model.tok_emb.weight.device
    for layer in range(cfg.n_layers):
        if not len(ids):
            z = torch.zeros(1, cfg.n_kv_heads, 0, cfg.head_dim, device=dev)
            out.append((z, z))
            continue
        k, v = stream_kv(store, ids, layer, dev)
        out.append((k.float(), v.float()))
    return out


__all__ = ["UIOConfig", "UIOModules", "UIOMemory", "MemoryTokens", "LoRA", "attach", "encode", "encoder_mask", "Memory", "transfer",
           "put_memory", "memory_key_group", "memory_kv", "stored_memory_kv"]
