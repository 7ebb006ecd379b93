"""UIO memories and landmark retrieval in one attention layer (engine/uio_inference.py): the
composed memory equals each memory alone where the other has nothing to add, ingest stores both
(memories in the stream, token blocks in its companion), a split ingest equals one, and a
question retrieves from the blocks beside the memories."""

from __future__ import annotations

import pytest
import torch
import zarr

from engine.block_select import stream_kv
from engine.config import ModelConfig
from engine.inference import GenerateConfig, generate, ingest, open_store
from engine.model import LandmarkTransformer
from engine.retrieval import RetrievalConfig, RetrievalMemory
from engine.tokenizer import ByteTokenizer
from engine.uio import UIOMemory, encode, stored_memory_kv, transfer
from engine.uio_inference import BLOCKS_OF, blocks_stream, composed_memory
from memory_store import StoreConfig

L, T = 4, 32  # block_len, window (positions); ratio 4 -> 8 slots = 2 blocks per window
TOK = ByteTokenizer()


def _model(attention="landmark", seed=0, max_memories=1024) -> LandmarkTransformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=260, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64,
                      max_seq_len=T, block_len=L, attention=attention,
                      uio={"ratio": 4, "enc_rank": 2, "head_rank": 2, "max_memories": max_memories})
    m = LandmarkTransformer(cfg).eval()
    mods = m.uio
    for lora in [*mods.enc_q, *mods.enc_v, *mods.head_k, *mods.head_v]:
        torch.nn.init.normal_(lora.B, std=0.1)  # the LoRAs matter
    return m


def _store(m):
    return open_store(zarr.storage.MemoryStore(), m.cfg, "w", config=StoreConfig(sync_mode="none"))


def _window(seed: int) -> torch.Tensor:
    """One window of T positions with its landmarks (byte tokens)."""
    from engine.landmarks import insert_landmarks

    g = torch.Generator().manual_seed(seed)
    return insert_landmarks(torch.randint(32, 127, (T - T // L,), generator=g), L, TOK.landmark_id)[None]


def _kv(m, windows):
    return [(torch.cat([transfer(m, i, encode(m, w)[i])[0] for w in windows], 2),
             torch.cat([transfer(m, i, encode(m, w)[i])[1] for w in windows], 2)) for i in range(m.cfg.n_layers)]


@torch.no_grad()
def test_composed_with_nothing_retrieved_equals_the_uio_memory():
    """top_k = 0 and a fresh local window: the composed memory is UIO's attention (memories at
    positions -M..-1 before the window), logits equal; and the memories change them."""
    m = _model()
    kv = _kv(m, [_window(1), _window(2)])
    x = _window(3)
    store = _store(m)
    comp = composed_memory(m, store, kv, RetrievalConfig(top_k=0, local_blocks=T // L), stream=None, persist=False,
                           read_streams=None)
    got = m(x, memory=comp)
    want = m(x, memory=UIOMemory(m, [], kv=kv))
    assert (got - want).abs().max() < 1e-4
    bare = m(x, memory=UIOMemory(m, []))
    assert (got - bare).abs().max() > 1e-2
    store.close()


@torch.no_grad()
def test_composed_without_memories_equals_landmark_retrieval():
    m = _model()
    store = _store(m)
    rc = RetrievalConfig(top_k=2, local_blocks=2)
    plain = RetrievalMemory(m.cfg, store, stream="doc", retrieval=rc, persist=True)
    windows = [_window(s) for s in range(4)]
    for w in windows[:3]:
        m(w, memory=plain)
        plain.end_chunk()
    empty = [(torch.zeros(1, 2, 0, 8), torch.zeros(1, 2, 0, 8)) for _ in range(2)]
    a = RetrievalMemory(m.cfg, store, stream=None, retrieval=rc, persist=False, read_streams=["doc"])
    b = composed_memory(m, store, empty, rc, stream=None, persist=False, read_streams=["doc"])
    assert torch.equal(m(windows[3], memory=a), m(windows[3], memory=b))
    # with memories the same retrieval gives another answer
    c = composed_memory(m, store, _kv(m, windows[:3]), rc, stream=None, persist=False, read_streams=["doc"])
    assert (m(windows[3], memory=c) - m(windows[3], memory=a)).abs().max() > 1e-2
    store.close()


TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. The pass key is 73519. ") * 4


@torch.no_grad()
def test_ingest_stores_memories_and_token_blocks_and_a_split_ingest_equals_one():
    m = _model()
    ids = TOK.encode(TEXT)
    one = _store(m)
    r = ingest(m, one, "doc", ids)
    per = T - T // L
    n_win = len(ids) // per
    assert set(one.streams()) == {"doc", blocks_stream("doc")}
    assert len(one.stream_blocks("doc")) == n_win * (T // 4 // L)  # 2 memory blocks per window
    assert len(one.stream_blocks(blocks_stream("doc"))) == n_win * (T // L)  # every token block
    assert r.blocks_put == n_win * (T // 4 // L + T // L)
    assert one.get_stream_meta(blocks_stream("doc"))[BLOCKS_OF] == "doc"
    split = _store(m)
    cut = 2 * per + 5  # mid-window: the rest of the window waits in the stream's tail
    ingest(m, split, "doc", ids[:cut], source="f")
    ingest(m, split, "doc", ids, source="f")
    for s in ("doc", blocks_stream("doc")):
        a, b = one.stream_blocks(s), split.stream_blocks(s)
        assert len(a) == len(b)
        for layer in range(m.cfg.n_layers):
            ka, va = stream_kv(one, a, layer, "cpu")
            kb, vb = stream_kv(split, b, layer, "cpu")
            assert (ka.float() - kb.float()).abs().max() < 1e-5 and (va.float() - vb.float()).abs().max() < 1e-5
    # the memories stored are the encoder's of each window
    kv = stored_memory_kv(one, "doc", m)
    assert kv[0][0].shape[2] == n_win * (T // 4)
    one.close()
    split.close()


@torch.no_grad()
def test_a_question_retrieves_beside_the_memories_and_top_k_0_is_the_memories_alone():
    m = _model()
    store = _store(m)
    ingest(m, store, "doc", TOK.encode(TEXT))
    q = torch.tensor(TOK.encode("What is the pass key?"))
    gen = GenerateConfig(max_new_tokens=6)
    both = list(generate(m, store, q, streams=["doc"], gen=gen, retrieval=RetrievalConfig(top_k=2)))
    alone = list(generate(m, store, q, streams=["doc"], gen=gen, retrieval=RetrievalConfig(top_k=0)))
    assert len(both) == len(alone) == 6
    # top_k 0 answers exactly as the UIO memory alone does (its decode cache path)
    from engine.uio_inference import generate_uio

    again = list(generate_uio(m, store, q, streams=["doc"], gc=gen, on_text=None, tok=TOK, continue_stream=True,
                              retrieval=RetrievalConfig(top_k=0)))
    assert alone == again
    # the question reads the blocks: its logits through the composed memory differ from the
    # memories alone, and blocks were retrieved
    from engine.landmarks import insert_landmarks

    x = insert_landmarks(q, L, TOK.landmark_id)[None]
    kv = stored_memory_kv(store, "doc", m)
    comp = composed_memory(m, store, kv, RetrievalConfig(top_k=2), stream=None, persist=False,
                           read_streams=[blocks_stream("doc")])
    got = m(x, memory=comp)
    assert comp.stats.blocks_fetched > 0
    assert (got - m(x, memory=UIOMemory(m, [], kv=kv))).abs().max() > 1e-3
    # with no stream named, the companion stream is not a candidate
    assert list(generate(m, store, q, streams=None, gen=gen, retrieval=RetrievalConfig(top_k=2))) == both
    store.close()


def test_a_causal_uio_model_stores_memories_only():
    m = _model("causal")
    store = _store(m)
    ingest(m, store, "doc", TOK.encode(TEXT))
    assert store.streams() == ["doc"]
    store.close()


@pytest.mark.parametrize("positions", ["stingy", "true"])
@torch.no_grad()
def test_memory_tokens_sit_just_before_the_local_window(positions):
    m = _model()
    store = _store(m)
    rc = RetrievalConfig(top_k=2, local_blocks=2, positions=positions)
    mem = composed_memory(m, store, _kv(m, [_window(1)]), rc, stream="doc", persist=True, read_streams=["doc"])
    for s in range(3):
        m(_window(10 + s), memory=mem)
        mem.end_chunk()
    first = mem.sources[1].first_position()
    assert first == (2 * L if positions == "stingy" else mem.window.start)
    assert mem.window.start > 0
    store.close()


def test_the_composition_benchmark_runs_every_mode_on_the_same_documents():
    from bench.uio_compose import MODES, format_md, run

    res = run(steps=2, train_windows=2, lengths=(2,), docs=1, top_k=1, log=lambda *_: None)
    rows = res["perplexity"]
    assert len(rows) == len(MODES) + 2
    assert all(1 < r["2"] < 1e4 for r in rows.values())
    # the memory sources change the score of the same last window
    uio = {k.split(": ")[1]: v["2"] for k, v in rows.items() if k.startswith("UIO-trained")}
    assert len(set(uio.values())) == len(MODES)
    res.update(command="x", machine="y")
    assert "UIO + landmark" in format_md(res)
