"""Retrieval attention, ingest, ask/generate, passkey harness and the engine CLI."""

import dataclasses
import json

import numpy as np
import pytest
import torch
import zarr

from engine.attention import max_abs_diff
from engine.config import preset
from engine.inference import GenerateConfig, TOKENIZER, ask, generate, ingest, open_store
from engine.landmarks import insert_landmarks
from engine.model import LandmarkTransformer
from engine.passkey import PasskeyConfig, build_passkey_prompt, parse_answer, run_passkey, write_outputs
from engine.retrieval import RetrievalConfig, RetrievalMemory
from memory_store import LayoutMismatchError, StoreConfig

SMALL = StoreConfig(device_budget_bytes=1 << 20, host_budget_bytes=1 << 20, sync_mode="none")


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return LandmarkTransformer(preset("tiny", block_len=8, max_seq_len=64, **kw)).eval()


def _mem_store(m, cfg=SMALL):
    return open_store(zarr.storage.MemoryStore(), m.cfg, "w", config=cfg)


@pytest.mark.parametrize("kernel", ["blockwise", "vectorized"])
@pytest.mark.parametrize("local_blocks,chunk", [(0, 5), (1, 16), (3, 13)])
def test_ingest_with_all_blocks_and_true_positions_reproduces_full_forward(local_blocks, chunk, kernel):
    """k >= stored blocks + true positions: chunked retrieval == full landmark attention."""
    m = _model()
    toks = insert_landmarks(torch.randint(0, 256, (90,), generator=torch.Generator().manual_seed(1)),
                            8, TOKENIZER.LANDMARK)[None]  # (1, 102)
    store = _mem_store(m)
    mem = RetrievalMemory(m.cfg, store, stream="doc",
                          retrieval=RetrievalConfig(top_k=100, local_blocks=local_blocks,
                                                    positions="true", chunk_len=chunk, kernel=kernel))
    with torch.no_grad():
        full = m(toks, impl="blockwise")
        parts = []
        for a in range(0, toks.shape[1], chunk):
            parts.append(m(toks[:, a:a + chunk], memory=mem))
            mem.end_chunk()
    out = torch.cat(parts, 1)
    assert max_abs_diff(out, full) <= 1e-4, max_abs_diff(out, full)
    assert len(store) == 102 // 8  # every completed block went to the store
    assert mem.stats.blocks_fetched > 0


def test_only_selected_blocks_are_fetched():
    m = _model()
    store = _mem_store(m)
    toks = torch.randint(0, 256, (700,), generator=torch.Generator().manual_seed(2))
    rc = RetrievalConfig(top_k=2, local_blocks=1, chunk_len=32)
    ingest(m, store, "doc", toks, retrieval=rc)
    n_blocks = len(store)
    assert n_blocks == 800 // 8 or n_blocks == (700 + 700 // 7) // 8
    mem = RetrievalMemory(m.cfg, store, stream=None, persist=False, read_streams=["doc"], retrieval=rc)
    with torch.no_grad():
        m(insert_landmarks(toks[:20], 8, TOKENIZER.LANDMARK)[None], memory=mem)
    # per layer at most top_k * n_kv_heads distinct blocks, far fewer than stored
    for per_layer in mem.stats.per_layer_blocks:
        assert 1 <= per_layer <= rc.top_k * m.cfg.n_kv_heads < n_blocks


def test_a_repeated_selection_is_not_fetched_again_and_a_new_one_is():
    m = _model()
    store = _mem_store(m)
    ingest(m, store, "doc", torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(3)),
           retrieval=RetrievalConfig(top_k=2, local_blocks=1, chunk_len=32))
    mem = RetrievalMemory(m.cfg, store, stream=None, persist=False, read_streams=["doc"],
                          retrieval=RetrievalConfig(top_k=2))
    calls = []
    real = store.get_layer
    store.get_layer = lambda ids, layer, **kw: calls.append((list(ids), layer)) or real(ids, layer, **kw)
    Hkv = m.cfg.n_kv_heads
    a = torch.tensor([[0, 3]] * Hkv)
    b = torch.tensor([[1, 3]] * Hkv)
    first = mem._retrieved(0, a)
    again = mem._retrieved(0, a.clone())
    assert len(calls) == 1 and mem.stats.reused == 1
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    other = mem._retrieved(0, b)  # a different selection: only its new block is fetched
    assert len(calls) == 2 and calls[-1][0] == [1]
    assert mem.stats.blocks_fetched == 3  # 0 and 3, then 1
    fresh = RetrievalMemory(m.cfg, store, stream=None, persist=False, read_streams=["doc"],
                            retrieval=RetrievalConfig(top_k=2))._retrieved(0, b)
    assert all(torch.equal(x, y) for x, y in zip(other, fresh))
    mem._retrieved(1, a)  # per layer: layer 1 has no memo or blocks of its own yet
    assert len(calls) == 4 and calls[-1] == ([0, 3], 1)  # (the 3rd call was the fresh memory's)
    c = torch.tensor([[0, 1]] * Hkv)
    back = mem._retrieved(0, c)  # 1 kept from b; 0 fetched again (b's selection dropped it)
    assert calls[-1] == ([0], 0)
    want = RetrievalMemory(m.cfg, store, stream=None, persist=False, read_streams=["doc"],
                           retrieval=RetrievalConfig(top_k=2))._retrieved(0, c)
    assert all(torch.equal(x, y) for x, y in zip(back, want))


def test_token_selection_matches_chunk_selection_for_single_query():
    m = _model()
    store = _mem_store(m)
    ingest(m, store, "doc", torch.randint(0, 256, (300,)), retrieval=RetrievalConfig(chunk_len=32))
    outs = []
    for sel in ("chunk", "token"):
        mem = RetrievalMemory(m.cfg, store, stream=None, persist=False,
                              retrieval=RetrievalConfig(top_k=2, selection=sel), read_streams=None)
        with torch.no_grad():
            outs.append(m(torch.tensor([[5]]), memory=mem))
    assert max_abs_diff(*outs) <= 1e-5


def test_ingest_resume_equals_uninterrupted(tmp_path):
    """A run stopped at a flush (a chunk end) and resumed stores what one run stores."""
    m = _model()
    toks = torch.randint(0, 256, (500,), generator=torch.Generator().manual_seed(3))
    rc = RetrievalConfig(chunk_len=32)  # 32 positions = 28 tokens + 4 landmarks
    a = open_store(tmp_path / "a", m.cfg, "a", config=SMALL)
    ingest(m, a, "doc", toks[:280], source="f", retrieval=rc)  # as if killed after 10 chunks
    a.close()
    a = open_store(tmp_path / "a", m.cfg, "a", config=SMALL)  # another "process": reopen
    r = ingest(m, a, "doc", toks, source="f", retrieval=rc)
    assert r.skipped == 280 and r.tokens == 220
    b = open_store(tmp_path / "b", m.cfg, "a", config=SMALL)
    ingest(m, b, "doc", toks, source="f", retrieval=rc)
    ia, ib = a.stream_blocks("doc"), b.stream_blocks("doc")
    assert len(ia) == len(ib) and a.get_stream_meta("doc")["tail"] == b.get_stream_meta("doc")["tail"]
    for x, y in zip(ia, ib):
        assert max_abs_diff(a.get(int(x)).v, b.get(int(y)).v) <= 1e-5
    again = ingest(m, a, "doc", toks, source="f", retrieval=rc)  # everything already there
    assert again.tokens == 0 and len(a.stream_blocks("doc")) == len(ia)


def test_default_chunk_is_the_window_minus_the_local_blocks():
    cfg = preset("tiny", max_seq_len=512, block_len=64)
    assert RetrievalConfig().chunk_for(cfg) == 512 - 2 * 64
    assert RetrievalConfig(local_blocks=0).chunk_for(cfg) == 512
    assert RetrievalConfig(local_blocks=20).chunk_for(cfg) == 64  # never below one block
    assert RetrievalConfig(chunk_len=100).chunk_for(cfg) == 100
    for bad in (0, -5, 2.0, True):
        with pytest.raises(ValueError, match="chunk_len"):
            RetrievalConfig(chunk_len=bad)


def test_ingest_commits_on_its_schedule(tmp_path, monkeypatch):
    """A commit (generation + 1) every `flush_every` chunks, or when `flush_interval_s` has
    passed, and one at the end; bad schedules are refused before anything is written."""
    m = _model()
    toks = torch.randint(0, 256, (280,), generator=torch.Generator().manual_seed(4))
    rc = RetrievalConfig(chunk_len=32)  # 10 chunks
    store = open_store(tmp_path / "a", m.cfg, "a", config=SMALL)
    g0 = store.generation
    ingest(m, store, "doc", toks, retrieval=rc, flush_every=3)
    assert store.generation - g0 == 4  # after chunks 3, 6, 9 and the last
    g1 = store.generation
    ingest(m, store, "doc2", toks, retrieval=rc)  # 5 s default: the end only
    assert store.generation - g1 == 1
    clock = iter(range(0, 10_000, 10))  # every reading 10 s after the previous one
    monkeypatch.setattr("engine.inference.time.perf_counter", lambda: float(next(clock)))
    g2 = store.generation
    ingest(m, store, "doc3", toks, retrieval=rc, flush_interval_s=5.0)
    assert store.generation - g2 == 10  # every chunk end is past the interval
    for bad in (dict(flush_interval_s=0), dict(flush_interval_s=-1.0), dict(flush_every=0),
                dict(flush_every=2.5)):
        with pytest.raises(ValueError, match="flush"):
            ingest(m, store, "doc4", toks, retrieval=rc, **bad)
    assert "doc4" not in store.streams()
    store.close()


def test_ask_writes_nothing_and_is_deterministic():
    m = _model()
    store = _mem_store(m)
    ingest(m, store, "doc", TOKENIZER.encode("some text " * 40))
    n, gen_before = len(store), store.generation
    a1 = ask(m, store, "question?", streams=["doc"], gen=GenerateConfig(max_new_tokens=12))
    a2 = ask(m, store, "question?", streams=["doc"], gen=GenerateConfig(max_new_tokens=12))
    assert a1 == a2 and len(store) == n and store.generation == gen_before


def test_generate_sampling_stop_and_streaming():
    m = _model()
    store = _mem_store(m)
    ingest(m, store, "doc", TOKENIZER.encode("abc " * 50))
    pieces = []
    ids = list(generate(m, store, TOKENIZER.encode("x"), streams=None,
                        gen=GenerateConfig(max_new_tokens=30, temperature=1.0, top_p=0.9, seed=3),
                        on_text=pieces.append))
    assert 1 <= len(ids) <= 30 and all(0 <= i < 256 for i in ids)
    streamed = "".join(pieces)
    assert streamed and TOKENIZER.decode(ids).startswith(streamed)
    stop = TOKENIZER.decode(ids[:2])
    short = list(generate(m, store, TOKENIZER.encode("x"),
                          gen=GenerateConfig(max_new_tokens=30, temperature=1.0, top_p=0.9, seed=3,
                                             stop=(stop,))))
    assert len(short) <= 2 + 1


def test_bad_retrieval_configs_and_layout_mismatch(tmp_path):
    with pytest.raises(ValueError, match="top_k"):
        RetrievalConfig(top_k=-1)
    with pytest.raises(ValueError, match="positions"):
        RetrievalConfig(positions="near")
    with pytest.raises(ValueError, match="kernel"):
        RetrievalConfig(kernel="fused")
    with pytest.raises(ValueError, match="top_p"):
        GenerateConfig(top_p=0)
    m = _model()
    s = open_store(tmp_path / "s", m.cfg, "a", config=SMALL)
    ingest(m, s, "doc", torch.randint(0, 256, (100,)))
    s.close()
    other = _model(n_layers=3)
    with pytest.raises(LayoutMismatchError):
        open_store(tmp_path / "s", other.cfg, "a", config=SMALL)
    s = open_store(tmp_path / "s", m.cfg, "r", config=SMALL)  # still intact
    assert len(s) == 100 * 8 // 7 // 8
    with pytest.raises(ValueError, match="byte tokens"):
        ingest(m, s, "doc", [300])


def test_passkey_prompt_and_harness(tmp_path):
    doc, q = build_passkey_prompt(2000, 0.5, "12345")
    assert "The pass key is 12345. Remember it. 12345 is the pass key." in doc
    assert q == "What is the pass key? The pass key is" and 1800 < len(doc) + len(q) <= 2000
    assert parse_answer(" 12345. Remember") == "12345" and parse_answer("none") == ""
    m = _model()
    res = run_passkey(m, PasskeyConfig(lengths=[300, 600], depths=[0.0, 1.0], trials=1,
                                       full_max_len=400), log=None)
    assert len(res["rows"]) == 4
    assert all(0.0 <= r["retrieval"] <= 1.0 for r in res["rows"])
    assert [r["full"] is None for r in res["rows"]] == [False, False, True, True]
    files = write_outputs(res, tmp_path)
    assert json.loads(files[0].read_text())["rows"] == res["rows"] and files[1].stat().st_size > 1000


def test_passkey_prompt_with_real_prose_filler():
    import random

    from engine import corpora
    from engine.passkey import FILLER, prose_filler

    text = corpora.load("sample:austen-persuasion")
    fill = prose_filler(text, 3000, random.Random(0))
    doc, q = build_passkey_prompt(3000, 0.5, "4821", filler=fill)
    line = "The pass key is 4821. Remember it. 4821 is the pass key. "
    assert doc.count(line) == 1 and FILLER not in doc and doc.isascii()
    assert 2500 < len(doc) + len(q) <= 3000
    before, after = doc.split(line)
    assert before.endswith(". ") and abs(len(before) - len(after)) < 600  # between sentences, at the middle
    assert doc != build_passkey_prompt(3000, 0.5, "4821", filler=prose_filler(text, 3000, random.Random(1)))[0]
    with pytest.raises(ValueError):
        PasskeyConfig(filler="no-colon-name!")


def test_cli_ingest_ask_inspect_eval(tmp_path, capsys):
    from train.cli import main

    doc = tmp_path / "doc.txt"
    doc.write_text("The pass key is 777. " * 30)
    store = str(tmp_path / "st")
    assert main(["ingest", "--model", "random:tiny", "--store", store, str(doc), "--no-progress"]) == 0
    assert "tokens ingested" in capsys.readouterr().out
    assert main(["ingest", "--model", "random:tiny", "--store", store, str(doc), "--no-progress"]) == 0
    assert "already there" in capsys.readouterr().out
    assert main(["ask", "--model", "random:tiny", "--store", store, "--stream", "doc.txt",
                 "What is the pass key?", "--max-tokens", "4"]) == 0
    assert main(["store", "inspect", store]) == 0
    assert "doc.txt" in capsys.readouterr().out
    assert main(["ask", "--model", "random:tiny", "--store", store, "--stream", "nope", "q"]) == 2
    assert main(["ingest", "--model", "random:tiny", "--store", store, str(tmp_path / "missing.txt")]) == 2
    assert main(["eval", "passkey", "--model", "random:tiny", "--lengths", "300", "--depths", "0.5",
                 "--trials", "1", "--out", str(tmp_path / "pk")]) == 0
    assert (tmp_path / "pk" / "passkey.png").exists()
    assert main(["eval", "passkey", "--model", "random:tiny", "--lengths", "300", "--depths", "0.5",
                 "--trials", "1", "--filler", "sample:austen-persuasion", "--out", str(tmp_path / "pk2")]) == 0
    assert json.loads((tmp_path / "pk2" / "passkey.json").read_text())["config"]["filler"] == "sample:austen-persuasion"
    assert main(["eval", "passkey", "--model", "random:tiny", "--lengths", "3x"]) == 2
    assert np.isfinite(1.0)


@pytest.mark.parametrize("kernel,sinks", [("blockwise", 0), ("vectorized", 0), ("vectorized", 2)])
def test_batch_memory_matches_row_by_row(kernel, sinks):
    """Two streams in one batch (one kernel call) == each stream alone (also with sinks)."""
    from engine.retrieval import BatchMemory

    m = _model()
    g = torch.Generator().manual_seed(9)
    docs = [insert_landmarks(torch.randint(0, 256, (168,), generator=g), 8, TOKENIZER.LANDMARK)
            for _ in range(2)]  # 192 positions each: 3 windows of 64
    rc = RetrievalConfig(top_k=2, local_blocks=0, chunk_len=64, kernel=kernel, sink_blocks=sinks)

    def run(batched):
        store = _mem_store(m)
        mems = [RetrievalMemory(m.cfg, store, stream=f"d{i}", retrieval=rc) for i in range(2)]
        outs = []
        with torch.no_grad():
            for w in range(3):
                x = torch.stack([d[w * 64:(w + 1) * 64] for d in docs])  # (2, 64)
                if batched:
                    assert BatchMemory(mems)._lanes_batchable(0)  # one search, fetch, rotation for both
                    outs.append(m(x, memory=BatchMemory(mems)))
                else:
                    outs.append(torch.cat([m(x[i:i + 1], memory=mems[i]) for i in range(2)]))
                for mem in mems:
                    mem.end_chunk()
        return torch.cat(outs, 1), mems

    a, mems = run(True)
    b, _ = run(False)
    assert max_abs_diff(a, b) <= 1e-5
    assert all(mem.stats.blocks_fetched > 0 for mem in mems)


def test_sink_blocks_are_always_selected_beside_the_top_k():
    """sink_blocks: the stream's first stored blocks are in every selection (every head), the
    top_k others are chosen among the rest; a reading memory (a question's) takes the sinks of
    the stream it reads; none while they are in the local window."""
    m = _model()
    g = torch.Generator().manual_seed(3)
    doc = torch.randint(0, 256, (300,), generator=g)
    store = _mem_store(m)
    rc = RetrievalConfig(top_k=2, sink_blocks=2, local_blocks=1)
    seen = []

    class Spy(RetrievalMemory):
        def select(self, layer, q, q_local_pos):
            sel = super().select(layer, q, q_local_pos)
            seen.append((sel.clone(), [i for i in self.window.stored_ids()]))
            return sel

    with torch.no_grad():
        mem = Spy(m.cfg, store, stream="doc", retrieval=rc)
        x = insert_landmarks(doc, 8, TOKENIZER.LANDMARK)
        for a in range(0, x.numel(), 24):
            m(x[None, a:a + 24], memory=mem)
            mem.end_chunk()
    first = store.stream_blocks("doc")[:2].tolist()
    assert mem.sink_ids() == first
    late = [(sel, local) for sel, local in seen if (sel >= 0).sum(-1).min() == 4]
    assert late, "no selection had both sinks and two retrieved blocks"
    for sel, local in seen:
        assert sel.shape == (m.cfg.n_kv_heads, 4)
        for row in sel.tolist():
            real = [i for i in row if i >= 0]
            assert real == sorted(set(real)) and row == sorted(row)  # distinct, ascending, absent first
            assert not set(real) & set(local)
    # the sinks are there once stored, whatever the scores: every late selection holds both
    for sel, _ in late:
        assert all(set(first) <= set(row) for row in sel.tolist())
    # a question's memory reads the stream's sinks; top_k=0 leaves the sinks alone
    ask_mem = RetrievalMemory(m.cfg, store, stream=None, persist=False, read_streams=["doc"],
                              retrieval=RetrievalConfig(top_k=0, sink_blocks=2))
    q = torch.randn(1, m.cfg.n_heads, 3, m.cfg.head_dim)
    assert ask_mem.select(0, q, torch.arange(3)).tolist() == [first] * m.cfg.n_kv_heads
    assert RetrievalConfig(top_k=3, sink_blocks=2).slots == 5
    with pytest.raises(ValueError, match="sink_blocks"):
        RetrievalConfig(sink_blocks=-1)


def test_decode_reselect_keeps_the_prompts_selection_and_query_keep_drops_queries():
    """decode_reselect=R: a decode step (<= 2 positions) reuses the layer's last chunk selection
    until R steps passed (1, the default: every step selects by its own query); query_keep (the
    training option selection_before_answer) selects with the kept queries alone."""
    m = _model()
    g = torch.Generator().manual_seed(5)
    store = _mem_store(m)
    ingest(m, store, "doc", torch.randint(0, 256, (400,), generator=g).tolist(), progress=False)
    H, D = m.cfg.n_heads, m.cfg.head_dim
    q = 10 * torch.randn(1, H, 9, D, generator=g)  # a 3-query question, then 6 decode steps

    def selections(rc, pieces, keep=None):
        mem = RetrievalMemory(m.cfg, store, stream=None, persist=False, read_streams=["doc"], retrieval=rc)
        mem.query_keep = keep
        out = []
        for a, b in pieces:
            out.append(mem.select(1, q[:, :, a:b], torch.arange(a, b)))
        return out, mem

    steps = [(0, 3)] + [(i, i + 1) for i in range(3, 9)]
    every, mem1 = selections(RetrievalConfig(top_k=2, local_blocks=1), steps)
    for i, (a, b) in enumerate(steps[1:], 1):  # the default: a step's own query alone
        assert torch.equal(every[i], selections(RetrievalConfig(top_k=2, local_blocks=1), [(a, b)])[0][0])
    assert any(not torch.equal(every[0], e) for e in every[1:]), "no decode step chose other blocks"
    kept, mem3 = selections(RetrievalConfig(top_k=2, local_blocks=1, decode_reselect=3), steps)
    # steps 1, 2 reuse the question's; step 3 selects by its own query; 4, 5 reuse it; 6 selects
    assert [torch.equal(kept[i], kept[0]) for i in (1, 2)] == [True, True]
    assert torch.equal(kept[3], every[3]) and torch.equal(kept[4], every[3]) and torch.equal(kept[5], every[3])
    assert torch.equal(kept[6], every[6])
    assert mem3.stats.searches == 3 and mem1.stats.searches == 7
    # query_keep: the same choice as a chunk of the kept queries alone
    keep = torch.tensor([True, True, False, True, False])
    masked, _ = selections(RetrievalConfig(top_k=2, local_blocks=1), [(0, 5)], keep=keep)
    mem = RetrievalMemory(m.cfg, store, stream=None, persist=False, read_streams=["doc"],
                          retrieval=RetrievalConfig(top_k=2, local_blocks=1))
    alone = mem.select(1, q[:, :, [0, 1, 3]], torch.tensor([0, 1, 3]))
    assert torch.equal(masked[0], alone)
    assert not torch.equal(masked[0], selections(RetrievalConfig(top_k=2, local_blocks=1), [(0, 5)])[0][0])
    with pytest.raises(ValueError, match="decode_reselect"):
        RetrievalConfig(decode_reselect=0)


@pytest.mark.parametrize("top_k,restart,mask", [(2, 0, False), (12, 0, False), (2, 1, False), (2, 0, True),
                                                (2, 0, "rows")])
def test_batch_memory_with_lanes_at_different_depths_matches_row_by_row(top_k, restart, mask):
    """Training lanes: one lane starts a new document when the other has earlier windows
    (the lane without blocks stays in the one kernel call, its prefix absent), and with
    top_k=12 some lanes have fewer blocks than top_k (the empty leading slots are dropped).
    Outputs and the model's gradients equal each lane run alone; also when one lane selects
    with its first queries only (query_keep, the training option selection_before_answer),
    and with it some rows by their own queries (token_rows, answer_token_selection)."""
    from engine.retrieval import BatchMemory

    g = torch.Generator().manual_seed(11)
    docs = [insert_landmarks(torch.randint(0, 256, (168,), generator=g), 8, TOKENIZER.LANDMARK)
            for _ in range(2)]  # 192 positions each: 3 windows of 64
    rc = RetrievalConfig(top_k=top_k, local_blocks=0, chunk_len=64, kernel="vectorized")

    calls = []
    orig = BatchMemory._attend_rows

    def spy(self, layer, q, k_loc, v_loc, sel, n_before):
        calls.append((list(range(q.shape[0])), int((sel >= 0).sum(-1).max())))
        return orig(self, layer, q, k_loc, v_loc, sel, n_before)

    def run(batched):
        m = _model().train()
        store = _mem_store(m)
        mems = [RetrievalMemory(m.cfg, store, stream=f"d{i}", retrieval=rc) for i in range(2)]
        outs = []
        for w in range(3):
            if w == 2:  # lane `restart`'s document ends; its next one starts with no stored blocks
                store.delete_stream(f"d{restart}")
                mems[restart] = RetrievalMemory(m.cfg, store, stream="next", retrieval=rc)
            x = torch.stack([docs[0][w * 64:(w + 1) * 64], docs[1][w * 64:(w + 1) * 64]])
            if mask:
                mems[0].query_keep = torch.arange(64) < 20
            if mask == "rows":
                mems[0].token_rows = torch.tensor([20, 21, 40])
            if batched:
                out = m(x, memory=BatchMemory(mems))
            else:
                out = torch.cat([m(x[i:i + 1], memory=mems[i]) for i in range(2)])
            (out.float().pow(2).mean() * (w + 1)).backward()
            outs.append(out.detach())
            for mem in mems:
                mem.end_chunk()
        return torch.cat(outs, 1), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(BatchMemory, "_attend_rows", spy)
        a, ga = run(True)
    b, gb = run(False)
    # per layer: window 0 both lanes without blocks; 1 both with min(top_k, 8); 2 one lane
    # with min(top_k, 16), the restarted one with none (absent slots), in the same call
    kk = min(top_k, 8)
    assert calls == [([0, 1], 0)] * 2 + [([0, 1], kk)] * 2 + [([0, 1], min(top_k, 16))] * 2
    assert max_abs_diff(a, b) <= 1e-5
    assert ga.keys() == gb.keys() and all(max_abs_diff(ga[n], gb[n]) <= 1e-5 for n in ga)


def test_token_rows_attend_over_their_own_selection_like_a_decode_step():
    """token_rows (training's answer_token_selection): those rows of a chunk's output are
    what the row alone gets when it selects its own blocks and sees the chunk up to itself
    (a decode step at that position); every other row is the chunk's output unchanged."""
    m = _model()
    g = torch.Generator().manual_seed(9)
    store = _mem_store(m)
    ingest(m, store, "doc", torch.randint(0, 256, (400,), generator=g).tolist(), progress=False)
    H, Hkv, D = m.cfg.n_heads, m.cfg.n_kv_heads, m.cfg.head_dim
    q = 10 * torch.randn(1, H, 20, D, generator=g)
    k, v = torch.randn(1, Hkv, 20, D, generator=g), torch.randn(1, Hkv, 20, D, generator=g)
    rc = RetrievalConfig(top_k=1, local_blocks=0, kernel="vectorized")

    def attend(rows=None, keep=None, upto=20, selection="chunk"):
        mem = RetrievalMemory(m.cfg, store, stream=None, persist=False, read_streams=["doc"],
                              retrieval=dataclasses.replace(rc, selection=selection))
        mem.token_rows, mem.query_keep = rows, keep
        return mem.attend(1, q[:, :, :upto], k[:, :, :upto], v[:, :, :upto])

    keep = torch.arange(20) < 5
    plain = attend(keep=keep)
    spliced = attend(rows=torch.tensor([7, 13]), keep=keep)
    others = [t for t in range(20) if t not in (7, 13)]
    assert torch.equal(spliced[:, :, others], plain[:, :, others])
    for t in (7, 13):  # the row alone, by its own query, over the chunk up to itself
        alone = attend(upto=t + 1, selection="token")[:, :, t]
        assert max_abs_diff(spliced[:, :, t], alone) <= 1e-5
    assert max_abs_diff(spliced[:, :, [7, 13]], plain[:, :, [7, 13]]) > 1e-3, "no row changed its blocks"


def test_whole_chunk_put_equals_the_general_end_chunk():
    """Training windows (whole blocks, no local window): end_chunk's direct put stores the
    same blocks, ids and landmarks, and gives the same outputs, as the general path
    (`commit_through_window`, which every other chunk takes)."""
    m = _model()
    doc = insert_landmarks(torch.randint(0, 256, (168,), generator=torch.Generator().manual_seed(4)),
                           8, TOKENIZER.LANDMARK)  # 192 positions: 3 windows of 64
    rc = RetrievalConfig(top_k=2, local_blocks=0, chunk_len=64, kernel="vectorized")

    def run(fast):
        store = _mem_store(m)
        mem = RetrievalMemory(m.cfg, store, stream="d", retrieval=rc)
        outs, puts = [], []
        with torch.no_grad():
            for w in range(3):
                outs.append(m(doc[None, w * 64:(w + 1) * 64], memory=mem))
                assert mem.whole_chunk_pending()  # end_chunk would take the direct path
                puts.append(mem.end_chunk() if fast else mem.commit_through_window())
        ids = store.stream_blocks("d")
        blocks = [store.get(int(i)) for i in ids]
        return torch.cat(outs, 1), puts, ids, blocks, (mem.n_pos, mem.window.start, mem.window.ids)

    a, b = run(True), run(False)
    assert max_abs_diff(a[0], b[0]) == 0 and a[1] == b[1] == [8, 8, 8] and a[4] == b[4]
    assert a[2].tolist() == b[2].tolist()
    for x, y in zip(a[3], b[3]):
        assert torch.equal(x.k, y.k) and torch.equal(x.v, y.v) and torch.equal(x.landmarks, y.landmarks)


def test_end_chunks_puts_every_lane_at_once_like_end_chunk_in_order(monkeypatch):
    """Training lanes end their windows with one put_streams: the same ids, blocks,
    landmarks, streams and memory states as each lane's end_chunk in order; memories that
    cannot (a local window) fall back to end_chunk."""
    from engine.retrieval import BatchMemory, end_chunks

    m = _model()
    g = torch.Generator().manual_seed(5)
    docs = [insert_landmarks(torch.randint(0, 256, (112,), generator=g), 8, TOKENIZER.LANDMARK)
            for _ in range(3)]  # 128 positions: 2 windows of 64

    calls = []
    store_cls = type(_mem_store(m))
    monkeypatch.setattr(store_cls, "put_streams",
                        lambda self, parts, *a, _f=store_cls.put_streams, **kw: calls.append(parts) or _f(self, parts, *a, **kw))

    def run(batched, local_blocks=0):
        rc = RetrievalConfig(top_k=2, local_blocks=local_blocks, chunk_len=64, kernel="vectorized")
        store = _mem_store(m)
        calls.clear()
        mems = [RetrievalMemory(m.cfg, store, stream=f"d{i}", retrieval=rc) for i in range(3)]
        puts = []
        with torch.no_grad():
            for w in range(2):
                m(torch.stack([d[w * 64:(w + 1) * 64] for d in docs]), memory=BatchMemory(mems))
                puts.append(end_chunks(mems) if batched else [mem.end_chunk() for mem in mems])
        blocks = {name: [store.get(int(i)) for i in store.stream_blocks(name)] for name in store.streams()}
        state = [(mem.n_pos, mem.window.start, mem.window.ids, mem.stats.blocks_put) for mem in mems]
        return puts, blocks, state, list(calls)

    a, b = run(True), run(False)
    assert a[0] == b[0] == [[8, 8, 8]] * 2 and a[2] == b[2]
    assert a[1].keys() == b[1].keys() == {"d0", "d1", "d2"}
    for name in a[1]:
        for x, y in zip(a[1][name], b[1][name]):
            assert x.id == y.id and x.ordinal == y.ordinal
            assert torch.equal(x.k, y.k) and torch.equal(x.v, y.v) and torch.equal(x.landmarks, y.landmarks)
    assert a[3] == [[("d0", 8), ("d1", 8), ("d2", 8)]] * 2  # one put per step, every lane in it
    assert b[3] == [[("d0", 8)], [("d1", 8)], [("d2", 8)]] * 2  # (put_blocks goes through put_streams)
    c, d = run(True, local_blocks=1), run(False, local_blocks=1)  # not whole-chunk puts: end_chunk each
    assert c[0] == d[0] and c[2] == d[2] and c[3] == d[3]

    def uneven(batched):  # memories that ran alone, on chunks of different lengths: still one put
        rc = RetrievalConfig(top_k=2, local_blocks=0, chunk_len=128, kernel="vectorized")
        store = _mem_store(m)
        mems = [RetrievalMemory(m.cfg, store, stream=f"d{i}", retrieval=rc) for i in range(3)]
        with torch.no_grad():
            for mem, d, n in zip(mems, docs, (64, 128, 32)):
                m(d[None, :n], memory=mem)
        puts = end_chunks(mems) if batched else [mem.end_chunk() for mem in mems]
        return puts, [[store.get(int(i)) for i in store.stream_blocks(f"d{j}")] for j in range(3)]

    # a put that fails ends no chunk: the windows are still pending and can be put again
    monkeypatch.setattr(store_cls, "put_streams", lambda self, *a, **kw: (_ for _ in ()).throw(OSError("disk full")))
    store = _mem_store(m)
    mems = [RetrievalMemory(m.cfg, store, stream=f"d{i}", retrieval=RetrievalConfig(
        top_k=2, local_blocks=0, chunk_len=64, kernel="vectorized")) for i in range(3)]
    with torch.no_grad():
        m(torch.stack([d[:64] for d in docs]), memory=BatchMemory(mems))
    with pytest.raises(OSError, match="disk full"):
        end_chunks(mems)
    assert all(mem.window.pending[0] is not None and mem.n_pos == 0 for mem in mems) and len(store) == 0
    monkeypatch.undo()
    assert end_chunks(mems) == [8, 8, 8] and len(store) == 24

    (pa, ba), (pb, bb) = uneven(True), uneven(False)
    assert pa == pb == [8, 16, 4]
    for xs, ys in zip(ba, bb):
        assert [x.id for x in xs] == [y.id for y in ys]
        assert all(torch.equal(x.k, y.k) and torch.equal(x.v, y.v) for x, y in zip(xs, ys))


@pytest.mark.parametrize("n_tail,n_new,chunk", [(0, 0, 5), (3, 1, 4), (0, 200, 13), (5, 333, 7), (6, 90, 64)])
def test_landmarked_stream_pieces_equal_landmarking_everything(n_tail, n_new, chunk, monkeypatch):
    from engine.landmark_stream import LandmarkedStream as _LandmarkedStream

    monkeypatch.setattr(_LandmarkedStream, "PIECE_BLOCKS", 3)  # many pieces, chunks straddling them
    g = torch.Generator().manual_seed(n_new)
    tail = torch.randint(0, 256, (n_tail,), generator=g)
    new = torch.randint(0, 256, (n_new,), generator=g).to(torch.uint8)  # any integer dtype
    want = insert_landmarks(torch.cat([tail, new.long()]), 8, TOKENIZER.LANDMARK)
    s = _LandmarkedStream(tail, new, 8, TOKENIZER.LANDMARK)
    assert s.numel() == want.numel()
    got = [s.slice(a, min(a + chunk, s.numel())) for a in range(0, s.numel(), chunk)]
    assert torch.equal(torch.cat(got) if got else torch.empty(0, dtype=torch.long), want)
    assert all(g.dtype == torch.long for g in got)
    if s.numel() > 20:  # the unfinished block of the last slice is still readable (ingest's _commit)
        end = s.numel()
        assert torch.equal(s[(end // 8) * 8:end], want[(end // 8) * 8:end])
        with pytest.raises(ValueError, match="already released"):
            s.slice(0, 1)


def test_landmark_probe_finds_the_key_sentences_blocks_when_every_block_is_selected():
    """bench.landmark_probe: with top_k above the stored blocks every forward's selection holds
    the key sentence's blocks (its block arithmetic points at stored blocks), and the shipped
    checkpoint answers a short held-out-prose pass key."""
    from pathlib import Path

    from bench.landmark_probe import probe
    from engine.checkpoint import load_model

    root = Path(__file__).resolve().parents[2]
    model = load_model(root / "models" / "passkey-tiny-prose")
    text = (root / "engine" / "samples" / "austen-persuasion.txt").read_text()
    out = probe(model, text, 1200, 2, RetrievalConfig(top_k=64), log=lambda *_: None)
    assert out["summary"]["trials"] == 2
    for row in out["rows"]:
        assert len(row["hit_fraction"]) >= 2  # the prompt and at least one decode step
        assert all(f == 1.0 for f in row["hit_fraction"])
    # with the default top-4 at this length the shipped model answers (512-2k: 1.00 in BENCHMARKS)
    assert probe(model, text, 1200, 1, RetrievalConfig(), log=lambda *_: None)["summary"]["accuracy"] == 1.0
