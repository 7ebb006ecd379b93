"""Documents -> windows -> lane batches, their resume state and the retrieval hooks."""

from __future__ import annotations

import torch

from engine.landmarks import IGNORE_INDEX, next_token_targets
from engine.tokenizer import ByteTokenizer
from train.data import DocumentMixer, SyntheticSource
from train.windows import LaneBatcher, WindowMemory, document_windows, n_windows, tokenize_document

TOK = ByteTokenizer()


def test_windows_cover_every_prediction_exactly_once():
    text = "hello world, " * 40
    tokens = tokenize_document(text, 8)  # (n,)
    assert tokens[0] == TOK.BOS and tokens[7] == TOK.LANDMARK and tokens[15] == TOK.LANDMARK
    full = next_token_targets(tokens[None], TOK.LANDMARK, TOK.PAD)[0]  # (n,)
    wins = list(document_windows(tokens, 32))
    assert [i for i, _, _ in wins] == list(range(n_windows(tokens.numel(), 32)))
    xs = torch.cat([x for _, x, _ in wins])
    ys = torch.cat([y for _, _, y in wins])
    n = tokens.numel()
    assert torch.equal(xs[:n], tokens)
    assert (xs[n:] == TOK.PAD).all()
    # the last position of a window predicts the first of the next: nothing is lost
    assert torch.equal(ys[:n], full)
    assert (ys[n:] == IGNORE_INDEX).all()


def _batcher(lanes=3, memory=None):
    src = SyntheticSource("passkey", seed=1, chars=(150, 500))
    return LaneBatcher(DocumentMixer([src], seed=1), lanes=lanes, window=64, block_len=16, memory=memory)


def test_lanes_train_each_document_in_order_and_resume_exactly():
    a = _batcher()
    seen: list[list[tuple[int, int]]] = []
    for step in range(12):
        b = a.next_batch()
        assert b.tokens.shape == b.targets.shape == (3, 64)
        seen.append([(st.draw, w) for st, w in zip(b.lanes, b.windows)])
        a.advance(b)
        if step == 5:
            state = a.state_dict()
    # each lane walks its document's windows 0, 1, 2, ... then starts a new document at 0
    for lane in range(3):
        prev = None
        for row in seen:
            d, w = row[lane]
            assert w == (prev[1] + 1 if prev and prev[0] == d else 0)
            prev = (d, w)
    b2 = _batcher()
    b2.load_state_dict(state)
    for step in range(6, 12):
        b = b2.next_batch()
        assert [(st.draw, w) for st, w in zip(b.lanes, b.windows)] == seen[step]
        b2.advance(b)


class RecordingMemory(WindowMemory):
    def __init__(self):
        self.events: list[tuple] = []

    def begin_document(self, state):
        self.events.append(("begin", state.stream, state.window))

    def for_step(self, states):
        self.events.append(("step", tuple(s.stream for s in states)))
        return None

    def after_window(self, state, window_index):
        self.events.append(("after", state.stream, window_index))

    def end_document(self, state):
        self.events.append(("end", state.stream))


def test_memory_hooks_follow_each_document():
    mem = RecordingMemory()
    bt = _batcher(lanes=1, memory=mem)
    for _ in range(8):
        b = bt.next_batch()
        mem.for_step(b.lanes)
        bt.advance(b)
    ev = mem.events
    first = ev[0][1]
    afters = [e[2] for e in ev if e[0] == "after" and e[1] == first]
    assert ev[0] == ("begin", first, 0)
    assert afters == list(range(len(afters)))
    assert ("end", first) in ev
    end_at = ev.index(("end", first))
    assert ev[end_at - 1] == ("after", first, afters[-1])
    assert ev[end_at + 1][0] == "begin" and ev[end_at + 1][1] != first


def test_with_several_lanes_every_window_is_put_before_a_finished_document_ends():
    """advance(): one after_windows call with every lane's window (the default hook runs
    after_window per lane in lane order), then end_document for the lanes that finished."""
    mem = RecordingMemory()
    bt = _batcher(lanes=2, memory=mem)
    ended = 0
    for _ in range(12):
        b = bt.next_batch()
        n0 = len(mem.events)
        bt.advance(b)
        step = mem.events[n0:]
        afters = [e for e in step if e[0] == "after"]
        assert [e[1] for e in afters] == [st.stream for st in b.lanes] and afters == step[:len(b.lanes)]
        ends = step[len(b.lanes):]
        assert all(e[0] == "end" for e in ends)
        ended += len(ends)
    assert ended >= 1


def test_answer_weights_are_packed_into_targets_and_unpacked_by_the_loss():
    from train.data import Document
    from train.loop import LanguageModelLoss
    from train.windows import pack_targets, token_weights, unpack_targets, window_at

    text = "abc " * 30 + "answer: 4242."
    lo = text.index("4242")
    doc = Document("d", text, ((lo, lo + 5),), 8)
    tokens = tokenize_document(text, 16)  # (n,)
    w = token_weights(doc, 16)  # (n,)
    assert w.shape == tokens.shape
    assert TOK.decode(tokens[w == 8].tolist()) == "4242."
    plain = [window_at(tokens, i, 64)[1] for i in range(n_windows(tokens.numel(), 64))]
    packed = [window_at(tokens, i, 64, weights=w)[1] for i in range(n_windows(tokens.numel(), 64))]
    for p, y in zip(packed, plain):
        t, ww = unpack_targets(p[None])
        assert torch.equal(t[0], y)  # the token ids survive packing
        if ww is not None:
            assert set(ww[0][y != IGNORE_INDEX].tolist()) <= {1, 8}
    t, ww = unpack_targets(torch.cat(packed)[None])
    assert TOK.decode(t[0][ww[0] == 8].tolist()) == "4242."
    assert unpack_targets(torch.cat(plain)[None])[1] is None  # unweighted: plain ids, untouched
    assert torch.equal(pack_targets(plain[0], torch.ones_like(plain[0])), plain[0])

    # the loss is the weighted mean, rebuilt by hand; all-ones weights give the plain mean
    torch.manual_seed(0)
    V, T = 300, 64
    logits = torch.randn(1, T, V)
    model = LanguageModelLoss(lambda x: logits)
    y = plain[-1][None]  # (1, T)
    weights = torch.randint(1, 5, (1, T))
    ce = torch.nn.functional.cross_entropy(logits[0], y[0], ignore_index=IGNORE_INDEX, reduction="none")
    m = y[0] != IGNORE_INDEX
    expected = (ce[m] * weights[0][m]).sum() / weights[0][m].sum()
    torch.testing.assert_close(model(torch.zeros(1, T, dtype=torch.long), pack_targets(y, weights)), expected)
    torch.testing.assert_close(model(torch.zeros(1, T, dtype=torch.long), y), ce[m].mean())


def test_weighted_passkey_lanes_carry_weights_only_on_the_answer():
    src = SyntheticSource("passkey", seed=3, chars=(150, 400), answer_weight=20)
    b = LaneBatcher(DocumentMixer([src], seed=3), lanes=2, window=512, block_len=64)
    batch = b.next_batch()
    t, w = unpack_targets_of(batch.targets)
    for row in range(2):
        heavy = TOK.decode(t[row][w[row] == 20].tolist())
        assert heavy.startswith(" ") and heavy.endswith(".") and heavy[1:-1].isdigit()


def unpack_targets_of(targets):
    from train.windows import unpack_targets

    t, w = unpack_targets(targets)
    assert w is not None
    return t, w
