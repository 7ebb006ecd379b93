"""The memory-source seam (engine/sources.py): a test-only source of fixed key/value vectors joins
a memory's attention without editing it, and the result equals attention built by hand."""

import pytest
import torch
import zarr

from engine.attention import landmark_attention_reference, max_abs_diff
from engine.config import ModelConfig
from engine.inference import open_store
from engine.memory import AttentionMemory, BlockStore, LaneBlockStore, lanes_store
from engine.model import LandmarkTransformer, apply_rope, rope_cos_sin
from engine.retrieval import RetrievalConfig, RetrievalMemory
from engine.sources import KeyGroup, KeySource, compose, grouped_attention
from engine.uio import UIOConfig, UIOMemory, attach
from memory_store import StoreConfig

H, HKV, D, L = 4, 2, 8, 4


class FixedKeys:
    """A test-only source: the same M key/value vectors (already at their positions) for every
    query, in group 0 ("group0") or as whole blocks before the window ("blocks")."""

    def __init__(self, M: int, kind: str = "group0", seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.k = torch.randn(1, HKV, M, D, generator=g)
        self.v = torch.randn(1, HKV, M, D, generator=g)
        self.kind = kind

    def keys(self, layer, q, q_local):
        return KeyGroup(self.k.to(q.dtype), self.v.to(q.dtype), kind=self.kind)


def _cfg(attention: str) -> ModelConfig:
    return ModelConfig(vocab_size=40, d_model=H * D, n_layers=2, n_heads=H, n_kv_heads=HKV, ffn_hidden=48,
                       max_seq_len=64, block_len=L, attention=attention)


def _hand_built(q, k, v, xk, xv, landmark: bool):
    """Explicit softmax, float64, one query at a time. q (H, T, D) and k, v (Hkv, T, D) rotated,
    the queries at key positions 0..T-1; xk, xv (Hkv, M, D) the extra keys every query sees in
    group 0. Landmark model: the paper's grouped softmax (an earlier block's tokens weighted by
    their softmax within the block times its landmark's group-0 weight)."""
    q, k, v, xk, xv = (t.double() for t in (q, k, v, xk, xv))
    out = torch.zeros_like(q)
    for h in range(H):
        kh, vh, xkh, xvh = k[h // (H // HKV)], v[h // (H // HKV)], xk[h // (H // HKV)], xv[h // (H // HKV)]
        for i in range(q.shape[1]):
            s = kh[: i + 1] @ q[h, i] / D ** 0.5  # keys up to the query
            sx = xkh @ q[h, i] / D ** 0.5
            if not landmark:
                w = torch.softmax(torch.cat([sx, s]), 0)
                out[h, i] = w[: len(sx)] @ xvh + w[len(sx):] @ vh[: i + 1]
                continue
            c = i // L
            own = [j for j in range(c * L, i + 1) if j % L != L - 1]
            g0 = torch.softmax(torch.cat([sx, s[own], s[[b * L + L - 1 for b in range(c)]]]), 0)
            o = g0[: len(sx)] @ xvh + g0[len(sx): len(sx) + len(own)] @ vh[own]
            for b in range(c):
                toks = list(range(b * L, b * L + L - 1))
                o = o + g0[len(sx) + len(own) + b] * (torch.softmax(s[toks], 0) @ vh[toks])
            out[h, i] = o
    return out


def _qkv(T: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, H, T, D, generator=g), torch.randn(1, HKV, T, D, generator=g),
            torch.randn(1, HKV, T, D, generator=g))


def _rotated(q, k, first: int = 0):
    cos, sin = rope_cos_sin(torch.arange(first, first + k.shape[2]), D, _cfg("landmark").rope)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


@pytest.mark.parametrize("kernel", ["blockwise", "vectorized"])
def test_a_fixed_source_joins_retrieval_attention_as_built_by_hand(kernel):
    cfg = _cfg("landmark")
    store = open_store(zarr.storage.MemoryStore(), cfg, "w", config=StoreConfig(sync_mode="none"))
    src = FixedKeys(5)
    assert isinstance(src, KeySource)
    mem = RetrievalMemory(cfg, store, stream=None, persist=False, read_streams=None, sources=[src],
                          retrieval=RetrievalConfig(top_k=2, kernel=kernel))  # an empty store: nothing retrieved
    q, k, v = _qkv(11)
    got = mem.attend(0, q, k, v)
    # stingy positions: the (absent) retrieved prefix of top_k blocks, then the window
    q_rot, k_rot = _rotated(q, k, first=2 * L)
    want = _hand_built(q_rot[0], k_rot[0], v[0], src.k[0], src.v[0], landmark=True)
    err = max_abs_diff(got[0], want)
    assert err < 1e-5, f"max {err}, mean {(got[0].double() - want).abs().mean():.3g}"
    without = RetrievalMemory(cfg, store, stream=None, persist=False, read_streams=None,
                              retrieval=RetrievalConfig(top_k=2, kernel=kernel)).attend(0, q, k, v)
    assert max_abs_diff(got, without) > 1e-3  # the source's keys changed the result
    store.close()


def test_a_fixed_source_joins_uio_attention_as_built_by_hand():
    torch.manual_seed(0)
    for attention in ("causal", "landmark"):
        model = LandmarkTransformer(_cfg(attention)).eval()
        attach(model, UIOConfig(ratio=4))
        src = FixedKeys(3, seed=2)
        mem = UIOMemory(model, [], sources=[src])  # no memories of its own: only the test source
        q, k, v = _qkv(9)
        got = mem.attend(1, q, k, v)
        q_rot, k_rot = _rotated(q, k)
        want = _hand_built(q_rot[0], k_rot[0], v[0], src.k[0], src.v[0], landmark=attention == "landmark")
        assert max_abs_diff(got[0], want) < 1e-5, attention


def test_blocks_sources_come_before_the_window_gated_by_their_landmarks():
    """A "blocks" group: whole blocks before the local window, as retrieved blocks are."""
    src = FixedKeys(2 * L, kind="blocks", seed=3)
    q, k, v = _qkv(6)
    q_rot, k_rot = _rotated(q, k, first=2 * L)
    for kernel in ("blockwise", "vectorized"):
        inp = compose(q_rot, k_rot, v, 0, [src.keys(0, q, None), None])
        assert inp.q_offset == 2 * L and inp.const_keys == 2 * L and inp.kv_valid is None
        want = landmark_attention_reference(q_rot, torch.cat([src.k, k_rot], 2), torch.cat([src.v, v], 2), L,
                                            q_offset=2 * L)
        assert max_abs_diff(grouped_attention(inp, L, kernel), want) < 1e-5
    # an absent block is masked like an absent retrieved block: the same as leaving it out
    valid = torch.ones(1, HKV, 2 * L, dtype=torch.bool)
    valid[:, :, :L] = False
    half = compose(q_rot, k_rot, v, 0, [KeyGroup(src.k, src.v, valid)])
    alone = landmark_attention_reference(q_rot, torch.cat([src.k[:, :, L:], k_rot], 2),
                                         torch.cat([src.v[:, :, L:], v], 2), L, q_offset=L)
    assert max_abs_diff(grouped_attention(half, L, "blockwise"), alone) < 1e-5


def test_the_store_and_memory_seams_are_protocols(tmp_path):
    cfg = _cfg("landmark")
    store = open_store(str(tmp_path / "s"), cfg, "w")
    assert isinstance(store, BlockStore) and isinstance(store, LaneBlockStore) and lanes_store(store)
    assert not lanes_store(object()) and isinstance(RetrievalMemory(cfg, store, stream="x"), AttentionMemory)
    store.close()
