"""Choosing and fetching retrieved blocks: the steps every retrieval memory shares.

A memory searches the landmark index (landmark retrieval) or the block-key index
(training-free retrieval) and gets candidate ids and scores per lane and KV head; then
`mask_excluded` drops the blocks already in its local window, `choose_blocks` keeps the
best k in stream order, and `gather_selected` fetches their keys and values from the store
with one fetch for their union (reusing those of the previous selection). Also the plumbing
every memory that keeps blocks in a store shares: the layout check (`check_store_layout`),
whole blocks to the store's layout (`to_store_layout`) and a stream's blocks back as one
key axis (`stream_kv`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.errors import ModelMismatchError
from engine.model import apply_rope


def check_store_layout(cfg, store) -> None:
    """Raise ModelMismatchError (a ValueError) unless the store's block shape is the model's."""
    lay = store.layout
    want = (cfg.n_layers, cfg.n_kv_heads, cfg.block_len, cfg.head_dim)
    have = (lay.n_layers, lay.n_kv_heads, lay.block_len, lay.head_dim)
    if want != have:
        raise ModelMismatchError(f"store layout (n_layers, n_kv_heads, block_len, head_dim)={have} does not "
                                 f"match the model's {want}")


def to_store_layout(k: Sequence, v: Sequence, L: int, dtype, device):
    """Per layer, K and V (Hkv, S, D) pre-RoPE of S whole blocks -> the store's K, V (N,
    n_layers, Hkv, L, D) and landmark keys (each block's last slot, (N, n_layers, Hkv, D)).
    k[layer] (and v[layer]) is one tensor (a (n_layers, Hkv, S, D) tensor works too) or a
    sequence of them, e.g. one per lane, whose blocks follow each other (the same as their
    concatenation along the positions, without making it): one copy per part."""
    k = [[t] if isinstance(t, torch.Tensor) else list(t) for t in k]
    v = [[t] if isinstance(t, torch.Tensor) else list(t) for t in v]
    nl, (Hkv, _, D) = len(k), k[0][0].shape
    sizes = [t.shape[1] // L for t in k[0]]
    K = torch.empty(sum(sizes), nl, Hkv, L, D, dtype=dtype, device=device)
    V = torch.empty_like(K)
    for layer in range(nl):
        n0 = 0
        for tk, tv, n in zip(k[layer], v[layer], sizes):
            K[n0:n0 + n, layer].copy_(tk.detach().view(Hkv, n, L, D).transpose(0, 1))
            V[n0:n0 + n, layer].copy_(tv.detach().view(Hkv, n, L, D).transpose(0, 1))
            n0 += n
    return K, V, K[:, :, :, L - 1].contiguous()


def stream_kv(store, ids, layer: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks `ids` of `layer` read from the store as one key axis: K, V (1, Hkv, m*L, D)."""
    k, v = store.get_layer(ids, layer)  # (m, Hkv, L, D)
    return (k.to(device).permute(1, 0, 2, 3).reshape(1, k.shape[1], -1, k.shape[3]),
            v.to(device).permute(1, 0, 2, 3).reshape(1, v.shape[1], -1, v.shape[3]))


def mask_excluded(ids: torch.Tensor, scores: torch.Tensor, exclude: Sequence[int]) -> torch.Tensor:
    """scores with -inf where ids is one of `exclude` (the local window's stored blocks)."""
    if not exclude:
        return scores
    return scores.masked_fill(torch.isin(ids, torch.tensor(exclude, dtype=torch.long)), float("-inf"))


def choose_blocks(ids: torch.Tensor, scores: torch.Tensor, kk: int) -> torch.Tensor:
    """Distinct search results ids, scores (B, Hkv, k') on the CPU -> the best kk per lane
    and head, (B, Hkv, kk) int64: ascending ids (store order = stream order), absent (-1)
    first, so real blocks abut the window."""
    out = torch.full((*ids.shape[:2], kk), -1, dtype=torch.long)
    n = min(kk, ids.shape[2])
    top_s, top_i = scores.topk(n, dim=-1)  # (B, Hkv, n)
    chosen = ids.gather(2, top_i).masked_fill(~torch.isfinite(top_s), -1)
    out[:, :, kk - n:] = torch.sort(chosen, dim=-1).values
    return out


def with_sinks(sel: torch.Tensor, sinks: Sequence[int], sink_blocks: int) -> torch.Tensor:
    """A selection sel (..., Hkv, top_k) with the sink ids (present ones, fewer than
    sink_blocks while the stream is short) added in every row: (..., Hkv, sink_blocks + top_k),
    ascending, absent (-1) first, as `choose_blocks` lays a selection out."""
    if sink_blocks == 0:
        return sel
    pad = torch.full((*sel.shape[:-1], sink_blocks), -1, dtype=torch.long)
    if sinks:
        pad[..., sink_blocks - len(sinks):] = torch.tensor(sinks, dtype=torch.long)
    return torch.sort(torch.cat([pad, sel], dim=-1), dim=-1).values


def gather_selected(store, layer: int, sel: torch.Tensor, device, promote: bool = True,
                     cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None):
    """The selected blocks of one layer with one store fetch for their union.

    sel (B, Hkv, kk) ids, -1 = none. cache: optional id -> (K, V) (Hkv, L, D) of blocks
    fetched before (a memory's previous selection of this layer): those are not fetched
    again, and on return it holds exactly this selection's blocks. Returns k, v
    (B, Hkv, kk, L, D) float32 on `device` (zeros where none), the distinct ids (M,)
    ascending, and how many of them came from the store.
    """
    B, Hkv, kk = sel.shape
    L, D = store.layout.block_len, store.layout.head_dim
    valid_blk = sel >= 0
    uniq = torch.unique(sel[valid_blk])
    if not len(uniq):
        if cache is not None:
            cache.clear()
        return (torch.zeros(B, Hkv, kk, L, D, device=device), torch.zeros(B, Hkv, kk, L, D, device=device), uniq, 0)
    ids = uniq.tolist()
    need = ids if cache is None else [i for i in ids if i not in cache]
    if need:
        k_new, v_new = store.get_layer(need, layer, promote=promote)  # (n, Hkv, L, D)
        k_new, v_new = k_new.to(device).float(), v_new.to(device).float()
    if len(need) == len(ids):
        k, v = k_new, v_new
    else:  # some blocks were fetched for the previous selection: reuse them
        got = dict(zip(need, range(len(need))))
        k = torch.stack([k_new[got[i]] if i in got else cache[i][0] for i in ids])  # (M, Hkv, L, D)
        v = torch.stack([v_new[got[i]] if i in got else cache[i][1] for i in ids])
    if cache is not None:
        cache.clear()
        cache.update((i, (k[j], v[j])) for j, i in enumerate(ids))
    pos = torch.searchsorted(uniq, sel.clamp(min=0))  # (B, Hkv, kk) row in k
    flat = (pos * Hkv + torch.arange(Hkv)[None, :, None]).reshape(-1).to(k.device)  # (row, head) in k
    k_sel = k.reshape(-1, L, D).index_select(0, flat).view(B, Hkv, kk, L, D)
    v_sel = v.reshape(-1, L, D).index_select(0, flat).view(B, Hkv, kk, L, D)
    if not bool(valid_blk.all()):
        absent = ~valid_blk.to(k.device)[..., None, None]
        k_sel.masked_fill_(absent, 0.0)
        v_sel.masked_fill_(absent, 0.0)
    return k_sel, v_sel, uniq, len(need)


def rotated_prefix(k_sel: torch.Tensor, v_sel: torch.Tensor, sel: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Selected blocks k_sel, v_sel (B, Hkv, kk, L, D) -> the retrieved prefix of the key axis:
    K rotated by cos/sin ((kk*L, D) or per head (Hkv, kk*L, D)), V, and which keys are
    present, (B, Hkv, kk*L) bool from sel (B, Hkv, kk), -1 = none."""
    B, Hkv, kk, L, D = k_sel.shape
    valid = (sel >= 0).repeat_interleave(L, dim=-1).to(k_sel.device)
    return apply_rope(k_sel.reshape(B, Hkv, kk * L, D), cos, sin), v_sel.reshape(B, Hkv, kk * L, D), valid
