"""Folded context, variant A (engine/folded.py): the spec's tests P1-P5 (../shared/seeds/FOLDED.md),
on tiny random models, causal and landmark, plus persistence through a store."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.attention import landmark_attention_reference
from engine.config import ModelConfig
from engine.errors import ModelMismatchError
from engine.folded import FoldedConfig, FoldedMemory, reach, state_numbers
from engine.landmarks import insert_landmarks
from engine.model import LandmarkTransformer, apply_rope, rope_cos_sin


def _model(attention: str = "causal", *, n_layers: int = 3, N: int = 8, L: int = 4, seed: int = 0,
           dtype=torch.float32) -> LandmarkTransformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=40, d_model=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, ffn_hidden=48,
                      max_seq_len=256, block_len=L, attention=attention, folded_window=N)
    m = LandmarkTransformer(cfg).to(dtype)
    for p in m.parameters():  # larger weights than the 0.02 init: the effects of far tokens are not tiny
        torch.nn.init.normal_(p, std=0.3)
    return m.eval()


def _tokens(m: LandmarkTransformer, n: int, seed: int = 1, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cfg = m.cfg
    if not cfg.landmarks:
        return torch.randint(0, cfg.vocab_size, (batch, n), generator=g)
    rows = [insert_landmarks(torch.randint(0, cfg.vocab_size - 1, (n - n // cfg.block_len,), generator=g),
                             cfg.block_len, cfg.vocab_size - 1)[:n] for _ in range(batch)]
    return torch.stack(rows)


def _stream(m: LandmarkTransformer, tokens: torch.Tensor, step: int, mem: FoldedMemory | None = None):
    """Logits of `tokens` fed `step` positions per forward through one folded memory."""
    mem = mem or FoldedMemory(m.cfg, lanes=[None] * tokens.shape[0])
    out = []
    for a in range(0, tokens.shape[1], step):
        out.append(m(tokens[:, a:a + step], memory=mem))
        mem.end_chunk()
    return torch.cat(out, dim=1), mem


def _banded(m: LandmarkTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """The one-shot reference: every layer with the block-banded mask written out (window w sees
    window w-1 and itself, causal), absolute positions; landmark models through the paper's
    reference grouped softmax on each window's [previous, own] keys."""
    cfg = m.cfg
    N, T = cfg.folded_window, tokens.shape[1]
    cos, sin = rope_cos_sin(torch.arange(T), cfg.head_dim, cfg.rope, m.tok_emb.weight.dtype)
    x = m.tok_emb(tokens)
    pos = torch.arange(T)
    allowed = (pos[None, :] <= pos[:, None]) & (pos[None, :] // N >= pos[:, None] // N - 1)  # (T, S)
    for layer in m.layers:
        a = layer.attn
        h = layer.attn_norm(x)
        B = h.shape[0]
        q = apply_rope(a.wq(h).view(B, T, a.n_heads, a.hd).transpose(1, 2), cos, sin)
        k = apply_rope(a.wk(h).view(B, T, a.n_kv, a.hd).transpose(1, 2), cos, sin)
        v = a.wv(h).view(B, T, a.n_kv, a.hd).transpose(1, 2)
        if cfg.landmarks:
            ys = []
            for w in range(0, -(-T // N)):
                k0 = max(0, (w - 1) * N)
                q1 = min(T, (w + 1) * N)
                ys.append(landmark_attention_reference(q[:, :, w * N:q1], k[:, :, k0:q1], v[:, :, k0:q1],
                                                       cfg.block_len, q_offset=w * N - k0))
            y = torch.cat(ys, dim=2)
        else:
            G = a.n_heads // a.n_kv
            kk, vv = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
            s = (q @ kk.transpose(-1, -2)) * a.hd ** -0.5
            y = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ vv
        x = x + a.wo(y.transpose(1, 2).reshape(B, T, -1))
        x = x + layer.ffn(layer.ffn_norm(x))
    return m.lm_head(m.norm(x))


# -- P1: streaming equals the banded one-shot model ------------------------------------------

@pytest.mark.parametrize("attention", ["causal", "landmark"])
@pytest.mark.parametrize("step", [8, 3, 16, 32])
def test_p1_streaming_equals_banded_one_shot(attention, step):
    m = _model(attention)
    tokens = _tokens(m, 32, batch=2)  # 4 windows of N = 8
    with torch.no_grad():
        ref = _banded(m, tokens)
        got, _ = _stream(m, tokens, step)
    tol = 1e-5 if attention == "landmark" else 1e-6  # the landmark reference computes in float64
    assert (got - ref).abs().max().item() < tol


def test_p1_uneven_chunks_and_single_tokens():
    m = _model("causal")
    tokens = _tokens(m, 29)
    with torch.no_grad():
        ref = _banded(m, tokens)
        mem = FoldedMemory(m.cfg)
        out = []
        for a, b in [(0, 5), (5, 6), (6, 17), (17, 18), (18, 19), (19, 29)]:
            out.append(m(tokens[:, a:b], memory=mem))
            mem.end_chunk()
    assert (torch.cat(out, 1) - ref).abs().max().item() < 1e-6


# -- P2: reach -----------------------------------------------------------------------------

@pytest.mark.parametrize("attention", ["causal", "landmark"])
def test_p2_reach_is_n_layers_windows(attention):
    n_layers, N = 3, 8
    m = _model(attention, n_layers=n_layers, N=N)
    W = n_layers + 3
    tokens = _tokens(m, W * N)
    with torch.no_grad():
        base, _ = _stream(m, tokens, N)
        for k in range(1, W):
            t2 = tokens.clone()
            pos = (W - 1 - k) * N + 1  # an ordinary token k windows before the last
            t2[0, pos] = (t2[0, pos] + 1) % (m.cfg.vocab_size - 1)
            got, _ = _stream(m, t2, N)
            last = slice((W - 1) * N, W * N)
            changed = not torch.equal(got[:, last], base[:, last])
            assert changed == (k <= n_layers), (k, changed)
    assert reach(12, 12) == 155


# -- P3: gradients --------------------------------------------------------------------------

def test_p3_stop_gradient_between_forwards():
    m = _model("causal").train()
    tokens = _tokens(m, 16)
    embs = []

    def keep(mod, inp, out):
        out.retain_grad()
        embs.append(out)

    hook = m.tok_emb.register_forward_hook(keep)
    mem = FoldedMemory(m.cfg)
    m(tokens[:, :8], memory=mem)
    mem.end_chunk()
    out = m(tokens[:, 8:], memory=mem)
    hook.remove()
    out.square().sum().backward()
    assert embs[0].grad is None  # nothing flows back into window w-1
    assert embs[1].grad is not None and embs[1].grad.abs().sum() > 0
    assert all(c is None or not c.requires_grad for c in mem.carry_k + mem.carry_v)


@pytest.mark.parametrize("attention", ["causal", "landmark"])
def test_p3_bptt_gradients_equal_the_banded_model(attention):
    m = _model(attention, dtype=torch.float64)
    tokens = _tokens(m, 32)
    tgt = _tokens(m, 32, seed=5) % (m.cfg.vocab_size - 1)
    grads = []
    for fn in (lambda: _banded(m, tokens), lambda: _stream(m, tokens, 32)[0]):  # one forward of 4 windows
        m.zero_grad()
        F.cross_entropy(fn().flatten(0, 1), tgt.flatten()).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-7, atol=1e-9, msg=n)


def test_p3_bptt_across_forwards_with_detach_off():
    """detach=False keeps the graph between forwards: window by window equals one forward."""
    m = _model("causal", dtype=torch.float64)
    tokens = _tokens(m, 24)
    res = []
    for step, detach in ((24, True), (8, False)):
        m.zero_grad()
        out, _ = _stream(m, tokens, step, FoldedMemory(m.cfg, detach=detach))
        out.square().mean().backward()
        res.append(m.layers[0].attn.wk.weight.grad.clone())
    torch.testing.assert_close(res[1], res[0], rtol=1e-9, atol=1e-12)


# -- P4: reset; P5: constant state ----------------------------------------------------------

@pytest.mark.parametrize("attention", ["causal", "landmark"])
def test_p4_first_window_after_reset_equals_the_model_without_memory(attention):
    m = _model(attention)
    tokens = _tokens(m, 24)
    with torch.no_grad():
        _, mem = _stream(m, tokens, 8)
        mem.reset()
        got = m(tokens[:, :8], memory=mem)
        plain = m(tokens[:, :8])
    assert torch.equal(got, plain)


def test_p5_state_is_constant_over_windows():
    m = _model("causal")
    tokens = _tokens(m, 8 * 12)
    mem = FoldedMemory(m.cfg)
    sizes = []
    with torch.no_grad():
        for a in range(0, tokens.shape[1], 8):
            m(tokens[:, a:a + 8], memory=mem)
            mem.end_chunk()
            sizes.append(mem.state_bytes())
    assert set(sizes) == {state_numbers(m.cfg) * 4}


# -- lanes, persistence, errors --------------------------------------------------------------

def test_lanes_with_and_without_a_carry_equal_their_own_runs():
    """A batch where one lane starts a document and the other continues one (training)."""
    m = _model("causal")
    a, b = _tokens(m, 16, seed=2), _tokens(m, 8, seed=3)
    with torch.no_grad():
        ref_a, mem_a = _stream(m, a, 8)
        ref_b, _ = _stream(m, b, 8)
        # lane 0 continues a's first window, lane 1 starts b
        mem0 = FoldedMemory(m.cfg)
        m(a[:, :8], memory=mem0)
        mem0.end_chunk()
        both = FoldedMemory(m.cfg, lanes=[mem0.lane_carry(0), None])
        got = m(torch.cat([a[:, 8:], b]), memory=both)
        both.end_chunk()
    torch.testing.assert_close(got[0], ref_a[0, 8:], rtol=0, atol=1e-6)
    torch.testing.assert_close(got[1], ref_b[0], rtol=0, atol=1e-6)
    assert both.lane_carry(1) is not None


@pytest.mark.parametrize("attention", ["causal", "landmark"])
def test_store_resume_continues_the_stream(tmp_path, attention):
    from engine.inference import open_store

    m = _model(attention)
    tokens = _tokens(m, 30)  # ends inside a window and inside a block
    with torch.no_grad():
        ref, _ = _stream(m, tokens, 8)
        store = open_store(str(tmp_path / "s"), m.cfg, "w")
        mem = FoldedMemory(m.cfg, store, stream="doc", persist=True)
        for a in range(0, 18, 6):  # 18 positions: 4 blocks of 4 stored, 2 positions unfinished
            m(tokens[:, a:a + 6], memory=mem)
            mem.end_chunk()
        store.flush()
        store.close()
        store = open_store(str(tmp_path / "s"), m.cfg, "r")
        mem2 = FoldedMemory(m.cfg, store, stream="doc")
        mem2.resume_from_store()
        assert mem2.n_pos == 16 and mem2.cur_len == 0 and bool(mem2.carry_valid[0])
        got = m(tokens[:, 16:], memory=mem2)  # the unfinished block's tokens are re-run
        store.close()
    assert (got - ref[:, 16:]).abs().max().item() < 1e-5


def test_errors():
    plain = ModelConfig(vocab_size=40, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden=48, block_len=4)
    with pytest.raises(ModelMismatchError, match="without folded context"):
        FoldedMemory(plain)
    with pytest.raises(ValueError, match="folded_window"):
        ModelConfig(block_len=4, folded_window=6)
    with pytest.raises(ValueError, match="multiple"):
        FoldedConfig(chunk_len=10).chunk_for(ModelConfig(block_len=4, folded_window=8))
    assert FoldedConfig().chunk_for(ModelConfig(block_len=4, folded_window=12)) == 504
    m = _model("causal")
    mem = FoldedMemory(m.cfg, lanes=[None, None])
    with pytest.raises(ValueError, match="2 lanes"):
        m(_tokens(m, 8), memory=mem)
    # a model trained without folded context keeps its fingerprint
    assert ModelConfig().fingerprint() == ModelConfig(folded_window=0).fingerprint()
    assert ModelConfig().fingerprint() != ModelConfig(folded_window=64).fingerprint()


def test_ingest_then_generate_continues_the_stream(tmp_path):
    """`ingest` writes the stream; `generate` in a fresh memory rebuilds the state from the store and
    decodes exactly what one uninterrupted folded stream over document + prompt decodes."""
    from engine.inference import GenerateConfig, generate, ingest, open_store

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=260, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48,
                      block_len=4, attention="causal", folded_window=8)
    m = LandmarkTransformer(cfg).eval()
    g = torch.Generator().manual_seed(3)
    doc, prompt = torch.randint(0, 256, (45,), generator=g), torch.randint(0, 256, (7,), generator=g)
    store = open_store(str(tmp_path / "s"), cfg, "w")
    ingest(m, store, "doc", doc, retrieval=FoldedConfig(chunk_len=16))
    got = list(generate(m, store, prompt, streams=None, gen=GenerateConfig(max_new_tokens=10)))
    with pytest.raises(ValueError, match="one stream"):
        ingest(m, store, "other", doc[:8])
        list(generate(m, store, prompt, streams=None, gen=GenerateConfig(max_new_tokens=1)))
    store.close()
    with torch.no_grad():
        mem = FoldedMemory(cfg)
        seq = torch.cat([doc, prompt])[None]
        logits = None
        for a in range(0, seq.shape[1], 8):
            logits = m(seq[:, a:a + 8], memory=mem)
            mem.end_chunk()
        want = []
        for _ in range(10):
            t = int(logits[0, -1, :256].argmax())
            want.append(t)
            logits = m(torch.tensor([[t]]), memory=mem)
            mem.end_chunk()
    assert got == want


def test_landmark_retrieval_with_a_one_window_local_part_is_folded_context_plus_retrieval(tmp_path):
    """For a landmark model, retrieval's local window sized to one folded window and chunks of one
    window IS variant A during prefill (top_k=0: equal logits); top_k > 0 adds older blocks, never
    the local (previous-window) ones again."""
    from engine.inference import open_store
    from engine.retrieval import RetrievalConfig, RetrievalMemory

    m = _model("landmark")
    tokens = _tokens(m, 48)
    N, L = m.cfg.folded_window, m.cfg.block_len
    with torch.no_grad():
        ref, _ = _stream(m, tokens, N)
        store = open_store(str(tmp_path / "s"), m.cfg, "w")
        mem = RetrievalMemory(m.cfg, store, stream="d", persist=True,
                              retrieval=RetrievalConfig(top_k=0, local_blocks=N // L, chunk_len=N))
        got = []
        for a in range(0, 48, N):
            got.append(m(tokens[:, a:a + N], memory=mem))
            mem.end_chunk()
        assert (torch.cat(got, 1) - ref).abs().max().item() < 1e-5
        mem2 = RetrievalMemory(m.cfg, store, stream="e", persist=True, read_streams=["e"],
                               retrieval=RetrievalConfig(top_k=1, local_blocks=N // L, chunk_len=N))
        for a in range(0, 48, N):
            m(tokens[:, a:a + N], memory=mem2)
            mem2.end_chunk()
        sel = mem2.select(0, torch.randn(1, 4, 1, m.cfg.head_dim), torch.tensor([0]))
        assert not (set(sel.flatten().tolist()) & set(mem2.window.stored_ids()))
        store.close()


# -- variant B: folded recurrence -------------------------------------------------------------

def test_variant_b_reach_is_unbounded_reset_and_constant_state():
    from engine.folded import FoldedRecurrence

    n_layers, N = 2, 8
    m = _model("causal", n_layers=n_layers, N=N)
    W = n_layers + 4
    tokens = _tokens(m, W * N)

    def run(t):
        mem = FoldedRecurrence(m.cfg)
        outs, sizes = [], []
        for a in range(0, W * N, N):
            outs.append(m(t[:, a:a + N], memory=mem))
            sizes.append(mem.state_bytes())
        return torch.cat(outs, 1), sizes, mem

    with torch.no_grad():
        base, sizes, mem = run(tokens)
        assert len(set(sizes)) == 1  # P5: constant state
        last = slice((W - 1) * N, W * N)
        for k in range(1, W):  # P2 (B): every earlier window changes the last window's logits
            t2 = tokens.clone()
            t2[0, (W - 1 - k) * N + 1] = (t2[0, (W - 1 - k) * N + 1] + 1) % 39
            assert not torch.equal(run(t2)[0][:, last], base[:, last]), k
        mem.reset()  # P4
        assert torch.equal(m(tokens[:, :N], memory=mem), m(tokens[:, :N]))
        with pytest.raises(ValueError, match="one window of 8"):
            m(tokens[:, :5], memory=FoldedRecurrence(m.cfg))


def test_variant_b_stop_gradient_and_bptt():
    from engine.folded import FoldedRecurrence

    m = _model("causal", dtype=torch.float64).train()
    tokens = _tokens(m, 16)
    for detach, flows in ((True, False), (False, True)):
        embs = []
        hook = m.tok_emb.register_forward_hook(lambda mod, inp, out: embs.append(out) or None)
        mem = FoldedRecurrence(m.cfg, detach=detach)
        m(tokens[:, :8], memory=mem)
        out = m(tokens[:, 8:], memory=mem)
        hook.remove()
        g = torch.autograd.grad(out.sum(), embs[0], allow_unused=True)[0]
        assert (g is not None and g.abs().sum() > 0) == flows


def test_every_memory_source_has_the_seams_methods(tmp_path):
    from engine.folded import FoldedRecurrence
    from engine.inference import open_store
    from engine.memory import MemorySource
    from engine.retrieval import RetrievalMemory
    from engine.training_free import TrainingFreeMemory
    from engine.uio import UIOConfig, UIOMemory, attach

    lm, causal = _model("landmark"), _model("causal")
    s1 = open_store(str(tmp_path / "a"), lm.cfg, "w")
    s2 = open_store(str(tmp_path / "b"), causal.cfg, "w")
    attach(causal, UIOConfig(ratio=4))
    mems = [FoldedMemory(causal.cfg), FoldedRecurrence(causal.cfg), UIOMemory(causal, []),
            RetrievalMemory(lm.cfg, s1, stream="x"), TrainingFreeMemory(causal.cfg, s2, stream="y")]
    assert all(isinstance(m, MemorySource) for m in mems)
    s1.close()
    s2.close()


def test_passkey_harness_runs_a_folded_model_through_its_memory(tmp_path):
    from engine.passkey import PasskeyConfig, run_passkey

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=260, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48,
                      block_len=8, attention="causal", folded_window=16)
    res = run_passkey(LandmarkTransformer(cfg).eval(), PasskeyConfig(lengths=[128], depths=[0.5], trials=1),
                      progress=False, log=None)
    row = res["rows"][0]
    assert res["config"]["memory"] == "folded" and row["full"] is None and 0 <= row["retrieval"] <= 1
