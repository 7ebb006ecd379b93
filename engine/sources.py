"""The memory-source seam: a layer's attention as a composition of key sources.

A memory builds one layer's attention from its local window (the chunk's own keys after the
window's earlier ones, causal) and any number of sources, each contributing a `KeyGroup` of
keys, already rotated to their positions, and values:

  kind="blocks"  whole blocks of block_len placed before the local window on the key axis, each
                 gated by its landmark as the grouped softmax does with earlier blocks
                 (landmark-retrieved blocks, the previous window's states); `valid` marks absent
                 blocks (False over a whole block).
  kind="group0"  keys every query sees as plain members of group 0, scored as they are
                 (compressed memory tokens); `valid` marks absent keys.

`compose` lays the groups out ([blocks groups in order, local window]) and `grouped_attention`
runs ONE grouped-softmax call over them: the configured kernel (engine/attention.py, the fused
CPU kernels on the hot path) when every group is "blocks", else one dense softmax of the
grouped scores (engine/attention_reference.grouped_scores) with the group-0 keys' raw scores
beside them. A memory asks its sources in order and never looks inside them, so a new source is
one new class with `keys`.

Shapes: B batch, H query heads, Hkv KV heads, G = H // Hkv, T queries, n keys of a group, D head
dim, L block_len.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from engine.attention import causal_attention, landmark_attention, landmark_attention_blockwise
from engine.attention_reference import grouped_scores

Kernel = Literal["blockwise", "vectorized", "causal"]


@dataclass(slots=True)
class KeyGroup:
    """Keys one source adds to a layer's attention."""

    k: torch.Tensor
    """(B, Hkv, n, D), rotated to the group's positions."""
    v: torch.Tensor
    """(B, Hkv, n, D)."""
    valid: torch.Tensor | None = None
    """(B, Hkv, n) bool, False = absent; None = all present."""
    kind: Literal["blocks", "group0"] = "blocks"
    const: bool = True
    """Constants (stored blocks): the vectorized kernel computes no dK, dV for a leading run of them."""


@runtime_checkable
class KeySource(Protocol):
    """A source of keys for one layer's attention (see the module docstring)."""

    def keys(self, layer: int, q: torch.Tensor, q_local: torch.Tensor) -> KeyGroup | None:
        """q (B, H, T, D) pre-RoPE; q_local (T,) the queries' indices in the local window.
        Returns this layer's group, or None when the source has nothing for it."""
        ...


@dataclass(slots=True)
class KernelInputs:
    """One grouped-softmax call: the key axis [blocks groups, local window] and the group-0 keys."""

    q: torch.Tensor  # (B, H, T, D) rotated
    k: torch.Tensor  # (B, Hkv, S, D) rotated
    v: torch.Tensor  # (B, Hkv, S, D)
    kv_valid: torch.Tensor | None  # (B, Hkv, S) bool or None
    q_offset: int  # key index of the first query
    const_keys: int  # leading keys that are constants
    group0: tuple[KeyGroup, ...] = ()


def _present(g: KeyGroup) -> torch.Tensor | None:
    """The group's mask, or None when every key is present (one sync)."""
    return None if g.valid is None or bool(g.valid.all()) else g.valid


def compose(q_rot: torch.Tensor, k_loc: torch.Tensor, v_loc: torch.Tensor, q_local0: int,
            groups: Sequence[KeyGroup | None] = ()) -> KernelInputs:
    """Lay out one layer's keys: q_rot (B, H, T, D) and the local window k_loc, v_loc (B, Hkv,
    n_loc, D), rotated, with the queries at local index q_local0 onwards; groups from the
    sources (None and empty groups are skipped). One concatenation of the key axis when a
    blocks group is present, none otherwise."""
    groups = [g for g in groups if g is not None and g.k.shape[2]]
    blocks = [g for g in groups if g.kind == "blocks"]
    group0 = tuple(g for g in groups if g.kind == "group0")
    if not blocks:
        return KernelInputs(q_rot, k_loc, v_loc, None, q_local0, 0, group0)
    n_pre = sum(g.k.shape[2] for g in blocks)
    const = 0
    for g in blocks:
        if not g.const:
            break
        const += g.k.shape[2]
    k_all = torch.cat([g.k for g in blocks] + [k_loc], dim=2)  # (B, Hkv, n_pre + n_loc, D)
    v_all = torch.cat([g.v for g in blocks] + [v_loc], dim=2)
    masks = [_present(g) for g in blocks]
    valid = None
    if any(m is not None for m in masks):
        B, Hkv = k_loc.shape[:2]
        ones = lambda n: torch.ones(B, Hkv, n, dtype=torch.bool, device=k_loc.device)  # noqa: E731
        valid = torch.cat([m if m is not None else ones(g.k.shape[2]) for m, g in zip(masks, blocks)]
                          + [ones(k_loc.shape[2])], dim=2)
    return KernelInputs(q_rot, k_all, v_all, valid, n_pre + q_local0, const, group0)


def run_kernel(q, k, v, block_len: int, kernel: Kernel, *, q_offset: int, kv_valid=None,
               const_keys: int = 0) -> torch.Tensor:
    """The configured kernel on a block-laid key axis: 'blockwise' (memory linear in the keys),
    'vectorized' (keeps the weights for the backward; the first const_keys keys get no gradient)
    or 'causal' (no landmarks: every key before a query is visible; no mask)."""
    if kernel == "vectorized":
        return landmark_attention(q, k, v, block_len, q_offset=q_offset, kv_valid=kv_valid, const_keys=const_keys)
    if kernel == "causal":
        if kv_valid is not None:
            raise ValueError("the causal kernel takes no key-validity mask")
        return causal_attention(q, k, v, q_offset=q_offset)
    return landmark_attention_blockwise(q, k, v, block_len, q_offset=q_offset, kv_valid=kv_valid)


def grouped_attention(inp: KernelInputs, block_len: int, kernel: Kernel) -> torch.Tensor:
    """ONE grouped-softmax call over composed keys -> (B, H, T, D) (the kernel's dtype).

    Without group-0 keys: the kernel itself. With them, for a causal model they precede the key
    axis (all visible); for a landmark model the block-laid axis gets its grouped scores s'
    (`grouped_scores`) and the group-0 keys their raw scores, in one softmax."""
    if not inp.group0:
        return run_kernel(inp.q, inp.k, inp.v, block_len, kernel, q_offset=inp.q_offset, kv_valid=inp.kv_valid,
                          const_keys=inp.const_keys)
    km = torch.cat([g.k for g in inp.group0], dim=2) if len(inp.group0) > 1 else inp.group0[0].k  # (B, Hkv, M, D)
    vm = torch.cat([g.v for g in inp.group0], dim=2) if len(inp.group0) > 1 else inp.group0[0].v
    M = km.shape[2]
    if kernel == "causal":  # keys before every query: causal with an offset sees them all
        if inp.kv_valid is not None or any(g.valid is not None for g in inp.group0):
            raise ValueError("the causal kernel takes no key-validity mask")
        return causal_attention(inp.q, torch.cat([km, inp.k], 2), torch.cat([vm, inp.v], 2), q_offset=M + inp.q_offset)
    q_rot, k_rot, v = inp.q, inp.k, inp.v
    B, H, T, D = q_rot.shape
    G = H // k_rot.shape[1]
    scale = D ** -0.5
    L, Sk = block_len, k_rot.shape[2]
    pad = -Sk % L  # the grouped scores work on whole blocks; keys past Sk are masked
    kp = F.pad(k_rot, (0, 0, 0, pad)) if pad else k_rot
    v = F.pad(v, (0, 0, 0, pad)) if pad else v
    valid = None
    if inp.kv_valid is not None:
        valid = F.pad(inp.kv_valid, (0, pad), value=False).repeat_interleave(G, 1)  # (B, H, Sk + pad)
    s_loc = (q_rot @ kp.repeat_interleave(G, 1).transpose(-1, -2)) * scale  # (B, H, T, Sk + pad)
    s_loc, _, _ = grouped_scores(s_loc, torch.arange(inp.q_offset, inp.q_offset + T, device=q_rot.device), 0, L, Sk,
                                 valid)
    s_mem = (q_rot @ km.repeat_interleave(G, 1).transpose(-1, -2)) * scale  # (B, H, T, M)
    if any(g.valid is not None for g in inp.group0):
        vmask = torch.cat([g.valid if g.valid is not None else torch.ones(g.k.shape[:3], dtype=torch.bool,
                                                                           device=g.k.device)
                           for g in inp.group0], dim=2)
        s_mem = s_mem.masked_fill(~vmask.repeat_interleave(G, 1)[:, :, None, :], float("-inf"))
    w = torch.softmax(torch.cat([s_mem, s_loc], -1), -1)
    return w[..., :M] @ vm.repeat_interleave(G, 1) + w[..., M:] @ v.repeat_interleave(G, 1)


__all__ = ["Kernel", "KernelInputs", "KeyGroup", "KeySource", "compose", "grouped_attention", "run_kernel"]
