"""Training-free retrieval (a model without landmarks) through the store: exactness when every
block is retrieved, sinks and window bookkeeping, resumable ingest, ask writes nothing."""

from __future__ import annotations

import pytest
import torch

from engine.inference import GenerateConfig, generate, ingest, make_memory, open_store
from engine.model import LandmarkTransformer
from tests.engine._models import tiny_causal_model
from engine.tokenizer import ByteTokenizer
from engine.training_free import TrainingFreeConfig, TrainingFreeMemory, block_keys
from memory_store import StoreConfig

L = 8


def _model(seed: int = 0) -> LandmarkTransformer:
    return tiny_causal_model(seed, block_len=L)


def _tokens(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("chunk", [L, 3 * L, 5])
def test_every_block_retrieved_equals_full_attention(tmp_path, chunk):
    """No sinks, top_k >= every block that left the window: each query sees every earlier key at
    its true distance (the present blocks abut the window), so chunked prefill through the store
    gives the logits of one causal forward over the whole sequence."""
    m = _model()
    toks = _tokens(12 * L + 3)
    rc = TrainingFreeConfig(top_k=16, local_blocks=2, sink_blocks=0, chunk_len=chunk)
    store = open_store(tmp_path / "s", m.cfg, "a")
    mem = make_memory(m.cfg, store, stream="doc", retrieval=rc, persist=True)
    assert isinstance(mem, TrainingFreeMemory)
    with torch.no_grad():
        want = m(toks[None])
        got = []
        for a in range(0, toks.numel(), chunk):
            got.append(m(toks[None, a:a + chunk], memory=mem))
            mem.end_chunk()
    got = torch.cat(got, dim=1)
    diff = (got - want).abs()
    assert diff.max() < 1e-4, f"max {diff.max():.2e} mean {diff.mean():.2e}"
    assert len(store) == 12 and mem.stats.blocks_fetched > 0
    store.close()


def test_top_k_limits_what_is_seen(tmp_path):
    """With top_k=1 the far past is mostly out of sight: the logits differ from full attention."""
    m = _model()
    toks = _tokens(12 * L)
    store = open_store(tmp_path / "s", m.cfg, "a")
    mem = make_memory(m.cfg, store, stream="doc", persist=True,
                      retrieval=TrainingFreeConfig(top_k=1, local_blocks=1, sink_blocks=0, chunk_len=L))
    with torch.no_grad():
        want = m(toks[None])
        got = []
        for a in range(0, toks.numel(), L):
            got.append(m(toks[None, a:a + L], memory=mem))
            mem.end_chunk()
    assert (torch.cat(got, 1) - want)[:, 4 * L:].abs().max() > 1e-3
    store.close()


def test_sinks_are_the_streams_first_blocks_and_survive_reopen(tmp_path):
    m = _model()
    tok = ByteTokenizer()
    rc = TrainingFreeConfig(top_k=2, local_blocks=2, sink_blocks=2, chunk_len=L)
    store = open_store(tmp_path / "s", m.cfg, "a")
    ingest(m, store, "doc", _tokens(10 * L + 5), retrieval=rc, tokenizer=tok)
    ids = store.stream_blocks("doc")
    assert len(ids) == 10
    k0, _ = store.get_layer(ids[:2], 0)
    store.close()
    store = open_store(tmp_path / "s", m.cfg, "r")
    mem = TrainingFreeMemory(m.cfg, store, stream=None, retrieval=rc, persist=False, read_streams=["doc"])
    mem.resume_from_store("doc")
    assert mem.sink_ids == [int(i) for i in ids[:2]] and mem.window.ids == [int(i) for i in ids[-2:]]
    sink = mem.sink_k[0][0].view(m.cfg.n_kv_heads, 2, L, -1).transpose(0, 1)  # (2, Hkv, L, D)
    assert torch.equal(sink, k0.float())
    # the sinks and the local window are never among the retrieved
    with torch.no_grad():
        m(_tokens(2 * L, seed=5)[None], memory=mem)
    sel = mem.select(0, torch.randn(1, 4, 3, m.cfg.head_dim))
    chosen = set(sel[sel >= 0].tolist())
    assert chosen and not chosen & (set(mem.sink_ids) | {i for i in mem.window.ids if i is not None})
    store.close()


def test_resumed_ingest_stores_what_one_ingest_stores(tmp_path):
    m = _model()
    toks = _tokens(9 * L + 3)
    rc = TrainingFreeConfig(top_k=2, local_blocks=1, sink_blocks=1, chunk_len=2 * L)
    a = open_store(tmp_path / "a", m.cfg, "a")
    ingest(m, a, "doc", toks, source="f", retrieval=rc)
    b = open_store(tmp_path / "b", m.cfg, "a")
    ingest(m, b, "doc", toks[:4 * L + 2], source="f", retrieval=rc)
    b.close()
    b = open_store(tmp_path / "b", m.cfg, "a")
    r = ingest(m, b, "doc", toks, source="f", retrieval=rc)
    assert r.skipped == 4 * L + 2
    ia, ib = a.stream_blocks("doc"), b.stream_blocks("doc")
    assert len(ia) == len(ib) == 9
    for layer in range(m.cfg.n_layers):
        ka, va = a.get_layer(ia, layer)
        kb, vb = b.get_layer(ib, layer)
        assert (ka - kb).abs().max() < 1e-5 and (va - vb).abs().max() < 1e-5
    assert a.get_stream_meta("doc")["tail"] == b.get_stream_meta("doc")["tail"] == toks[-3:].tolist()
    a.close()
    b.close()


def test_generate_reads_only_and_stops(tmp_path):
    m = _model()
    store = open_store(tmp_path / "s", m.cfg, "a")
    ingest(m, store, "doc", _tokens(6 * L))
    n = len(store)
    out = list(generate(m, store, _tokens(5, seed=3), streams=["doc"], gen=GenerateConfig(max_new_tokens=7)))
    assert len(out) == 7 and all(0 <= t < 256 for t in out)
    assert len(store) == n
    store.close()


def test_block_keys_and_config_errors():
    k = torch.randn(3, 2, 2, L, 4)  # (N, layers, Hkv, L, D)
    assert torch.allclose(block_keys(k, L, "mean"), k.mean(3))
    mx = block_keys(k, L, "max-norm")
    idx = k.norm(dim=-1).argmax(-1)
    assert torch.equal(mx[1, 0, 1], k[1, 0, 1, idx[1, 0, 1]])
    with pytest.raises(ValueError, match="block_key"):
        TrainingFreeConfig(block_key="first")
    with pytest.raises(ValueError, match="top_k"):
        TrainingFreeConfig(top_k=-1)


def test_landmark_and_causal_models_do_not_share_stores_or_configs(tmp_path):
    from engine.config import preset
    from engine.retrieval import RetrievalConfig
    from memory_store.errors import LayoutMismatchError

    causal = _model()
    store = open_store(tmp_path / "s", causal.cfg, "a")
    with pytest.raises(ValueError, match="TrainingFreeConfig"):
        ingest(causal, store, "doc", _tokens(20), retrieval=RetrievalConfig())
    ingest(causal, store, "doc", _tokens(20))
    store.close()
    lm_cfg = preset("tiny", block_len=L, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2)
    with pytest.raises(LayoutMismatchError):
        open_store(tmp_path / "s", lm_cfg, "r", config=StoreConfig())


def test_decode_steps_reuse_rotated_keys_and_stay_exact(tmp_path):
    """One-token steps after a chunked prefill (the decode path: its rotated-key buffer is reused
    and appended to, refreshed when the selection changes, rebuilt when the window slides) give
    the logits of one full forward when every block is retrieved."""
    m = _model()
    toks = _tokens(7 * L + 2 + 3 * L)
    n_prefill = 7 * L + 2
    rc = TrainingFreeConfig(top_k=16, local_blocks=2, sink_blocks=0, chunk_len=2 * L)
    store = open_store(tmp_path / "s", m.cfg, "a")
    mem = make_memory(m.cfg, store, stream="doc", retrieval=rc, persist=True)
    with torch.no_grad():
        want = m(toks[None])
        got = []
        for a in range(0, n_prefill, 2 * L):
            got.append(m(toks[None, a:min(a + 2 * L, n_prefill)], memory=mem))
            mem.end_chunk()
        for t in range(n_prefill, toks.numel()):
            got.append(m(toks[None, t:t + 1], memory=mem))
            mem.end_chunk()
    diff = (torch.cat(got, 1) - want).abs()
    assert diff.max() < 1e-4, f"max {diff.max():.2e}"
    assert mem.stats.reused > 0  # some steps kept their buffer
    steps = toks.numel() - n_prefill
    assert mem.stats.searches < (steps + 4) * m.cfg.n_layers  # decode steps kept selections (decode_reselect)
    store.close()


def test_decode_reselect_every_step_searches_every_step(tmp_path):
    m = _model()
    store = open_store(tmp_path / "s", m.cfg, "a")
    ingest(m, store, "doc", _tokens(6 * L))
    rc = TrainingFreeConfig(top_k=2, local_blocks=1, decode_reselect=1)
    mem = TrainingFreeMemory(m.cfg, store, stream=None, retrieval=rc, persist=False, read_streams=["doc"])
    mem.resume_from_store("doc")
    with torch.no_grad():
        m(_tokens(3)[None], memory=mem)
        mem.end_chunk()
        before = mem.stats.searches
        for t in _tokens(5, seed=9).tolist():
            m(torch.tensor([[t]]), memory=mem)
            mem.end_chunk()
    assert mem.stats.searches - before == 5 * m.cfg.n_layers
    with pytest.raises(ValueError, match="decode_reselect"):
        TrainingFreeConfig(decode_reselect=0)
    store.close()


def test_shared_question_selection_is_the_best_z_over_every_layer_and_head():
    """The scoring pass keeps, per block, its best z-score over the (layer, KV head) pairs (each
    standardised over its own candidates) and shares the top_k of them with every head."""
    from types import SimpleNamespace

    rc = TrainingFreeConfig(top_k=2, question_selection="shared")
    mem = TrainingFreeMemory.__new__(TrainingFreeMemory)  # the scoring bookkeeping alone
    mem.rc, mem.cfg = rc, SimpleNamespace(n_kv_heads=2, n_layers=3)
    mem.window = SimpleNamespace(pending=[1, 2, 3])
    mem.begin_scoring()
    ninf = float("-inf")
    ids = torch.tensor([[10, 11, 12, 13, 14], [10, 11, 12, 13, 14]])
    # layer A: head 0 flat but for 12, head 1 spread evenly (no block stands out); 14 excluded
    mem._record_z(ids, torch.tensor([[0.0, 0.1, 5.0, 0.0, ninf], [1.0, 2.0, 3.0, 4.0, ninf]]), 2)
    # layer B: block 10 is head 1's outlier; head 0 has one candidate only (no spread: skipped)
    mem._record_z(ids, torch.tensor([[ninf, ninf, ninf, 9.0, ninf], [8.0, 0.0, 0.2, 0.1, 0.0]]), 2)
    z = dict(mem._best_z)
    sel = mem.finish_scoring()
    s = torch.tensor([8.0, 0.0, 0.2, 0.1, 0.0], dtype=torch.float64)
    assert z[10] == pytest.approx(float((8.0 - s.mean()) / s.std()))
    assert sel.tolist() == [[10, 12], [10, 12]]  # the two outliers, ascending, for both heads
    assert mem.window.pending == [None] * 3 and mem._best_z is None
    with pytest.raises(ValueError, match="question_selection"):
        TrainingFreeConfig(question_selection="global")


def test_shared_question_selection_runs_the_question_again_on_the_shared_blocks(tmp_path):
    """generate with question_selection='shared': one scoring pass per prompt chunk, then every
    layer and head attends the same blocks, and the answer equals that of a memory that was
    simply given those blocks (the scoring pass leaves nothing behind)."""
    m = _model()
    store = open_store(tmp_path / "s", m.cfg, "a")
    ingest(m, store, "doc", _tokens(20 * L))
    question, gen = _tokens(11, seed=5), GenerateConfig(max_new_tokens=6)
    rc = TrainingFreeConfig(top_k=3, local_blocks=2, question_selection="shared")
    seen: dict = {"shared": [], "selected": []}
    real_finish, real_select = TrainingFreeMemory.finish_scoring, TrainingFreeMemory.select

    def finish(self):
        seen["shared"].append(real_finish(self).clone())
        return self.shared

    def select(self, layer, q):
        sel = real_select(self, layer, q)
        if self._best_z is None:
            seen["selected"].append(sel.clone())
        return sel

    mp = pytest.MonkeyPatch()
    mp.setattr(TrainingFreeMemory, "finish_scoring", finish)
    mp.setattr(TrainingFreeMemory, "select", select)
    with torch.no_grad():
        got = list(generate(m, store, question, streams=["doc"], retrieval=rc, gen=gen))
    mp.undo()
    assert len(seen["shared"]) == 1  # one prompt chunk: one scoring pass
    shared = seen["shared"][0]
    assert (shared >= 0).all() and (shared == shared[0]).all()  # the same blocks for every head
    assert seen["selected"] and all(torch.equal(s, shared) for s in seen["selected"])  # every layer, every step

    class Given(TrainingFreeMemory):  # the reference: those blocks handed over, no scoring pass
        def select(self, layer, q):
            return shared

    import engine.inference as inference

    mp.setattr(inference, "make_memory", lambda cfg, st, **kw: Given(cfg, st, stream=kw["stream"],
                                                                       retrieval=kw["retrieval"], persist=kw["persist"],
                                                                       read_streams=kw["read_streams"]))
    with torch.no_grad():
        want = list(generate(m, store, question, streams=["doc"],
                             retrieval=TrainingFreeConfig(top_k=3, local_blocks=2), gen=gen))
    mp.undo()
    assert got == want
    seen["selected"].clear()  # per layer (the default), heads and layers choose differently here
    mp.setattr(TrainingFreeMemory, "select", select)
    with torch.no_grad():
        list(generate(m, store, question, streams=["doc"], retrieval=TrainingFreeConfig(top_k=3, local_blocks=2),
                      gen=gen))
    mp.undo()
    firsts = seen["selected"][:m.cfg.n_layers]  # the question chunk's selection of each layer
    assert any(not (s == s[0]).all() for s in firsts) or any(not torch.equal(s, firsts[0]) for s in firsts)
    store.close()
