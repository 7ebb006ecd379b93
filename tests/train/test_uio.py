"""UIO-LLMs' memory and its estimator: the spec's tests U1-U8 (../shared/seeds/UIO.md) on a tiny
float64 model, T = 6 windows, m = 2 slots, every LoRA's B non-zero."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from engine.config import ModelConfig
from engine.errors import ModelMismatchError
from engine.model import LandmarkTransformer
from engine.uio import UIOConfig, UIOMemory, attach, encode, encoder_mask
from train.uio_tbptt import IncrementalTBPTT, LiveGraphsError, Reservoir, full_bptt

T_WIN, N_WIN = 8, 6


def _model(attention="causal", *, train_base=True, seed=0, S=2, factor=True, n_layers=2):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=40, d_model=16, n_layers=n_layers, n_heads=2, n_kv_heads=1, ffn_hidden=32,
                      max_seq_len=64, block_len=4, attention=attention)
    m = LandmarkTransformer(cfg).double()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    mods = attach(m, UIOConfig(ratio=4, enc_rank=2, head_rank=2, S=S, factor=factor, train_base=train_base),
                  slot_token=3)
    for lora in [*mods.enc_q, *mods.enc_v, *mods.head_k, *mods.head_v]:
        torch.nn.init.normal_(lora.B, std=0.3)  # B != 0: the LoRAs matter from the start
    return m


def _windows(seed=1, n=N_WIN, B=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 39, (B, T_WIN), generator=g), torch.randint(0, 39, (B, T_WIN), generator=g))
            for _ in range(n)]


def _loss(logits, y):
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def _params(m):
    return [(n, p) for n, p in m.named_parameters() if p.requires_grad]


def _grad(m, fn) -> dict[str, torch.Tensor]:
    m.zero_grad(set_to_none=True)
    fn()
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in _params(m)}


def _pieces(m, windows):
    """D_t and a_ts built pair by pair with torch.autograd.grad: D[t], A[(t, s)], dicts of grads."""
    names, params = zip(*_params(m))
    mems = [encode(m, x) for x, _ in windows[:-1]]  # with graphs
    D, A = {}, {}
    for t, (x, y) in enumerate(windows):
        const = [[h.detach() for h in mem] for mem in mems[:t]]
        J = _loss(m(x, memory=UIOMemory(m, const)), y)
        D[t] = (dict(zip(names, torch.autograd.grad(J, params, allow_unused=True))) if J.requires_grad
                else dict.fromkeys(names))
        for s in range(t):
            leaf = [h.detach().requires_grad_(True) for h in mems[s]]
            mm = const[:s] + [leaf] + const[s + 1:]
            J = _loss(m(x, memory=UIOMemory(m, mm)), y)
            dm = torch.autograd.grad(J, leaf)
            A[(t, s)] = dict(zip(names, torch.autograd.grad(mems[s], params, grad_outputs=dm, retain_graph=True,
                                                            allow_unused=True)))
    return D, A


def _combine(m, D, A, weight) -> dict[str, torch.Tensor]:
    """sum_t D_t + sum_t sum_s weight(t, s) a_ts."""
    out = {}
    for n, p in _params(m):
        tot = torch.zeros_like(p) + sum(d[n] for d in D.values() if d[n] is not None)
        for (t, s), a in A.items():
            w = weight(t, s)
            if w and a[n] is not None:
                tot = tot + w * a[n]
        out[n] = tot
    return out


def _close(a, b, tol=1e-9):
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=tol, atol=tol, msg=n)


# -- U1 ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("attention", ["causal", "landmark"])
def test_u1_a_reservoir_of_all_windows_is_full_bptt(attention):
    m = _model(attention)
    w = _windows()
    exact = _grad(m, lambda: full_bptt(m, w, _loss))
    for S in (N_WIN - 1, N_WIN + 3):
        est = _grad(m, lambda: IncrementalTBPTT(m, S=S).run_document(w, _loss))
        _close(est, exact)
    assert any(v.abs().sum() > 0 for k, v in exact.items() if k.startswith("uio.enc_q"))  # memories matter


# -- U2 ----------------------------------------------------------------------------------------

def test_u2_deterministic_window_drops_older_terms():
    m = _model()
    w = _windows()
    D, A = _pieces(m, w)
    _close(_combine(m, D, A, lambda t, s: 1.0), _grad(m, lambda: full_bptt(m, w, _loss)))  # the pieces are right
    for S in (1, 2):
        want = _combine(m, D, A, lambda t, s: 1.0 if s >= t - S else 0.0)
        got = _grad(m, lambda: IncrementalTBPTT(m, S=S, policy="window", factor=False).run_document(w, _loss))
        _close(got, want)


# -- U3 ----------------------------------------------------------------------------------------

def _enumerate(m, w, S, factor):
    """Mean gradient over every reservoir draw sequence, weighted by its probability."""
    ts = list(range(S, N_WIN - 1))  # windows whose memory needs a draw (the last one has no reader)
    mean, total_p = None, 0.0
    for seq in itertools.product(*[range(t + 1) for t in ts]):
        script = dict(zip(ts, seq))
        p = math.prod(1 / (t + 1) for t in ts)
        g = _grad(m, lambda: IncrementalTBPTT(m, S=S, factor=factor, draw=lambda t: script[t]).run_document(w, _loss))
        mean = {n: p * v for n, v in g.items()} if mean is None else {n: mean[n] + p * g[n] for n in g}
        total_p += p
    assert abs(total_p - 1) < 1e-12
    return mean


@pytest.mark.parametrize("S", [1, 2])
def test_u3_expectation_over_every_draw(S):
    m = _model(train_base=False)  # the paper's setting: LoRAs + slot train; fewer parameters, faster
    w = _windows()
    exact = _grad(m, lambda: full_bptt(m, w, _loss))
    _close(_enumerate(m, w, S, factor=True), exact)
    D, A = _pieces(m, w)
    names = [n for n, _ in _params(m)]
    biased = _combine(m, D, A, lambda t, s: min(1.0, S / t))
    without = _enumerate(m, w, S, factor=False)
    _close(without, biased)
    assert max((without[n] - exact[n]).abs().max().item() for n in names) > 1e-6  # and it differs from g


# -- U4 ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("S", [1, 3])
def test_u4_reservoir_marginals(S):
    n_items, trials = 10, 20000
    counts = torch.zeros(n_items, n_items)  # counts[t, s]: s in R after items 0..t-1
    for k in range(trials):
        r = Reservoir(S, seed=k)
        for t in range(n_items):
            for s in r.items:
                counts[t, s] += 1
            r.offer(t)
    for t in range(1, n_items):
        p = min(1.0, S / t)
        sigma = math.sqrt(p * (1 - p) / trials) + 1e-12
        for s in range(t):
            assert abs(counts[t, s] / trials - p) <= 4 * sigma + 1e-9, (t, s)


# -- U5 ----------------------------------------------------------------------------------------

def test_u5_a_memory_depends_on_its_own_window_only():
    m = _model()
    w = _windows(B=2)
    x = w[3][0]
    ref = encode(m, x)
    # another row of the batch, another window before it, another memory: nothing changes it
    x2 = x.clone()
    x2[1] = (x2[1] + 1) % 39
    other = encode(m, x2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(ref, other))
    _ = UIOMemory(m, [encode(m, w[0][0])]).per_layer
    again = encode(m, x)
    assert all(torch.equal(a, b) for a, b in zip(ref, again))
    # slot i sees tokens [0, (i+1) T/m) only: changing a later token leaves slot 0 alone
    x3 = x.clone()
    x3[:, -1] = (x3[:, -1] + 1) % 39
    later = encode(m, x3)
    assert all(torch.equal(a[:, 0], b[:, 0]) for a, b in zip(ref, later))
    assert not all(torch.equal(a[:, 1], b[:, 1]) for a, b in zip(ref[1:], later[1:]))
    mask = encoder_mask(8, 2)
    assert mask[8].tolist() == [True] * 4 + [False] * 4 + [True, False]
    assert not mask[:8, 8:].any()


# -- U6 ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("attention", ["causal", "landmark"])
def test_u6_no_memory_is_the_base_model(attention):
    m = _model(attention)
    x = _windows()[0][0]
    with torch.no_grad():
        assert torch.equal(m(x, memory=UIOMemory(m, [])), m(x))
        with_mem = m(x, memory=UIOMemory(m, [encode(m, x)]))
    assert not torch.equal(with_mem, m(x))


# -- U7 ----------------------------------------------------------------------------------------

def test_u7_an_optimizer_step_with_live_graphs_raises():
    m = _model()
    opt = torch.optim.SGD([p for _, p in _params(m)], lr=0.1)
    tb = IncrementalTBPTT(m, S=2)
    step = tb.guard(opt.step)
    calls = []

    def loss_stepping(logits, y):
        calls.append(tb.live_graphs)
        if tb.live_graphs:
            step()
        return _loss(logits, y)

    with pytest.raises(LiveGraphsError, match="live encoder graphs"):
        tb.run_document(_windows(), loss_stepping)
    assert tb.live_graphs == 0  # the failed document left nothing alive
    tb.run_document(_windows(), _loss)
    step()  # after the document: allowed
    assert calls[:2] == [0, 1]


# -- U8 ----------------------------------------------------------------------------------------

def test_u8_gradient_norm_ratio_without_and_with_the_factor():
    """The paper's Table 4 analogue: mean ||g_hat|| / ||g|| over draws for S in {1, 4}: below 1 and
    rising with S without the factor, about 1 with it (paper: 0.676/0.818 vs 0.994/0.980)."""
    from bench.uio import norm_ratios

    r = norm_ratios(S_values=(1, 4), seeds=8, n_windows=12, model_seeds=2)
    wo, wi = r["without_factor"], r["with_factor"]
    assert wo["1"] < wo["4"] < 1.0
    assert wo["1"] < 0.95
    assert abs(wi["1"] - 1) < 0.15 and abs(wi["4"] - 1) < 0.1


def test_errors_and_refusals():
    with pytest.raises(ValueError, match="ratio"):
        UIOConfig(ratio=0)
    with pytest.raises(ValueError, match="multiple"):
        UIOConfig(ratio=3).slots(8)
    with pytest.raises(ValueError, match="policy"):
        Reservoir(1, policy="lru")
    torch.manual_seed(0)
    plain = LandmarkTransformer(ModelConfig(vocab_size=40, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                                            ffn_hidden=32, block_len=4))
    with pytest.raises(ModelMismatchError, match="without UIO"):
        encode(plain, torch.zeros(1, 8, dtype=torch.long))


@pytest.mark.parametrize("attention", ["causal", "landmark"])
def test_ingest_then_generate_reads_the_stored_memories(tmp_path, attention):
    """`ingest` stores each complete window's memory (through the transfer head); `generate` attends
    to them from the store and decodes what the in-memory model with the same memories decodes
    (the window's own keys cached between steps; checked against recomputing the window)."""
    from engine.inference import GenerateConfig, generate, ingest, open_store
    from engine.landmarks import insert_landmarks

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=260, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64,
                      max_seq_len=32, block_len=8, attention=attention,
                      uio={"ratio": 4, "enc_rank": 2, "head_rank": 2})
    m = LandmarkTransformer(cfg).eval()
    for lora in [*m.uio.enc_q, *m.uio.enc_v, *m.uio.head_k, *m.uio.head_v]:
        torch.nn.init.normal_(lora.B, std=0.2)
    g = torch.Generator().manual_seed(3)
    doc, prompt = torch.randint(0, 256, (100,), generator=g), torch.randint(0, 256, (5,), generator=g)
    store = open_store(str(tmp_path / "s"), cfg, "w")
    r = ingest(m, store, "doc", doc)
    per = 28 if attention == "landmark" else 32  # ordinary tokens per window of 32 positions
    # 8 slots per window: one block of 8; a landmark model also stores the window's 4 token blocks
    assert r.blocks_put == (100 // per) * (1 + (4 if attention == "landmark" else 0))
    from engine.retrieval import RetrievalConfig

    alone = RetrievalConfig(top_k=0) if attention == "landmark" else None  # the memories alone
    got = list(generate(m, store, prompt, gen=GenerateConfig(max_new_tokens=6), retrieval=alone))
    store.close()
    lm = (lambda t: insert_landmarks(t, 8, 259)) if attention == "landmark" else (lambda t: t)
    with torch.no_grad():
        mems = [encode(m, lm(doc[a:a + per])[None]) for a in range(0, 100 - per + 1, per)]
        tail = doc[len(mems) * per:]
        seq = torch.cat([tail, prompt])
        want = []
        for _ in range(6):
            x = lm(seq)[None]
            logits = m(x, memory=UIOMemory(m, mems))  # the whole window again: no cache
            t = int(logits[0, -1, :256].argmax())
            want.append(t)
            seq = torch.cat([seq, torch.tensor([t])])
    assert got == want
