"""Held-out evaluation: exact loss of a known model, token counting, the memory seam."""

from __future__ import annotations

import math

import pytest
import torch

from engine.landmarks import IGNORE_INDEX
from train.data import DocumentMixer, SyntheticSource
from train.evaluate import evaluate_loss
from train.windows import LaneBatcher, WindowMemory


class Uniform(torch.nn.Module):
    """Equal logits for every token: the loss is exactly ln(V)."""

    def __init__(self, vocab: int = 260):
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.memories: list = []

    def forward(self, tokens, memory=None):
        self.memories.append(memory)
        return torch.zeros(*tokens.shape, self.vocab) + self.dummy  # (B, T, V)


def test_uniform_model_scores_ln_vocab_over_exactly_the_predicted_tokens():
    src = SyntheticSource("passkey", seed=3, chars=(150, 400))
    res = evaluate_loss(Uniform(), src, block_len=16, window=64, max_windows=7)
    assert res.loss == pytest.approx(math.log(260), abs=1e-5)
    assert res.perplexity == pytest.approx(260, rel=1e-4)
    # count the targets the same windows hold, independently
    b = LaneBatcher(DocumentMixer([src], seed=0), lanes=1, window=64, block_len=16)
    expected = 0
    for _ in range(7):
        batch = b.next_batch()
        expected += int((batch.targets != IGNORE_INDEX).sum())
        b.advance(batch)
    assert res.tokens == expected and res.windows == 7 and res.documents >= 2


def test_memory_reaches_the_model():
    class Sentinel(WindowMemory):
        def for_step(self, states):
            return ("mem", states[0].stream, states[0].window)

    m = Uniform()
    evaluate_loss(m, SyntheticSource("recall", seed=0, chars=(150, 300)), block_len=16, window=64,
                  max_windows=3, memory=Sentinel())
    assert m.memories[0] == ("mem", "doc0", 0) and m.memories[1][0] == "mem"
