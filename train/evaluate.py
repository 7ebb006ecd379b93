"""Held-out loss and perplexity, document by document, window by window.

The evaluation walks held-out documents the way training does (each document's windows
in order, through the same `LaneBatcher` and `WindowMemory` hooks), so the same call
measures plain-window perplexity (memory=None) and perplexity with retrieval from the store
(pass the retrieval memory, e.g. `train.store_memory.StoreWindowMemory`): compare the two.
No DeepSpeed: a plain model on one device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.landmarks import IGNORE_INDEX
from train.data import DocumentMixer, DocumentSource
from train.windows import LaneBatcher, WindowMemory, unpack_targets


@dataclass(frozen=True, slots=True)
class EvalResult:
    """Mean next-token loss over the evaluated positions."""

    loss: float
    """Mean negative log-likelihood per predicted token (nats)."""
    tokens: int
    """Predicted positions counted."""
    windows: int
    documents: int
    """Documents started (the last may be partial)."""

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, source: DocumentSource, *, block_len: int, window: int,
                  max_windows: int, memory: WindowMemory | None = None,
                  device: torch.device | str | None = None, from_window: int = 0,
                  tokenizer=None) -> EvalResult:
    """Loss of `model` ((B, T) tokens -> (B, T, V) logits) on the first windows of `source`.

    Documents are taken in the source's order (seeded), each from its first window on,
    until `max_windows` windows are done. `memory` is handed to the model as `memory=`
    exactly as in training (None: plain windows). Only windows with index >= from_window
    within their document are scored (earlier ones still run, filling the memory), so
    `from_window=1` compares exactly the windows retrieval can help. Returns an EvalResult.
    """
    if max_windows < 1:
        raise ValueError(f"max_windows={max_windows} is invalid: must be >= 1")
    was_training = model.training
    model.eval()
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    batcher = LaneBatcher(DocumentMixer([source], seed=0), lanes=1, window=window, block_len=block_len,
                          memory=memory, tokenizer=tokenizer)
    nll, count, docs = 0.0, 0, set()
    try:
        for _ in range(max_windows):
            batch = batcher.next_batch()
            docs.add(batch.lanes[0].draw)
            mem = batcher.memory.for_step(batch.lanes)
            tokens = batch.tokens.to(dev)  # (1, T)
            logits = model(tokens) if mem is None else model(tokens, memory=mem)  # (1, T, V)
            targets, _ = unpack_targets(batch.targets.to(dev))  # (1, T); perplexity is unweighted
            if batch.windows[0] >= from_window:
                nll += float(F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                             ignore_index=IGNORE_INDEX, reduction="sum"))
                count += int((targets != IGNORE_INDEX).sum())
            batcher.advance(batch)
    finally:
        model.train(was_training)
    return EvalResult(loss=nll / max(count, 1), tokens=count, windows=max_windows, documents=len(docs))
