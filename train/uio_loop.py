"""UIO memories in the DeepSpeed trainer: a step trains whole TBPTT sequences of documents.

A model whose `ModelConfig.uio` is set trains this way (`folio train --preset uio-tiny`, or
`--model-set uio='{"ratio": 8}'`): per lane, the next up to `UIOConfig.max_windows` windows of
its document run in order through `train.uio_tbptt.IncrementalTBPTT` (each window's decoder
attends to the earlier windows' memories; a reservoir of S encoder graphs; the factor
c_t = max(1, t/S)); a longer document continues in the lane's next step as a new sequence,
from no memory. The estimate (mean over the step's windows) reaches the DeepSpeed engine as
ONE backward of the surrogate sum_p <p, g_p> (its gradient is exactly g), so ZeRO-2 and
offload see an ordinary micro-step, and the optimizer steps only after the sequences are done
(`IncrementalTBPTT.guard`: never with live graphs). Gradient clipping (ds_config) applies to
the estimate and re-biases it slightly.
"""

from __future__ import annotations

import torch

from engine.config import ModelConfig
from engine.uio import UIOConfig
from train.uio_tbptt import IncrementalTBPTT, surrogate_loss


def prepare_uio_model(net: torch.nn.Module, mcfg: ModelConfig, tok, *, fresh: bool) -> None:
    """Freeze the base unless UIOConfig.train_base; a fresh run starts the slot from the
    end-of-sequence token's embedding (the released code's choice)."""
    uio = UIOConfig(**mcfg.uio)
    if not uio.train_base:
        for name, p in net.named_parameters():
            if not name.startswith("uio."):
                p.requires_grad_(False)
    if fresh and tok.eos_id is not None:
        with torch.no_grad():
            net.uio.slot.copy_(net.tok_emb.weight[tok.eos_id])


def uio_step(engine, batcher, mcfg: ModelConfig, *, seed: tuple[int, int, int]) -> tuple[float, int]:
    """One micro-step: every lane's next TBPTT sequence, one surrogate backward, engine.step().
    Returns (mean window loss, tokens)."""
    from train.loop import lm_loss

    uio = UIOConfig(**mcfg.uio)
    model = engine.module.model  # LanguageModelLoss -> the transformer
    dev = engine.device
    s0, step, rank = seed
    tb = IncrementalTBPTT(model, seed=(s0 * 1_000_003 + step) * 1009 + rank)
    seqs = batcher.next_sequences(uio.max_windows)
    total, n_win, losses, n_tok = None, 0, [], 0
    for st, windows in seqs:
        res = tb.run_document([(x[None].to(dev), y[None].to(dev)) for x, y in windows], lm_loss, into_grad=False)
        total = res.grads if total is None else [a if b is None else (b if a is None else a + b)
                                                 for a, b in zip(total, res.grads)]
        n_win += len(windows)
        losses += res.losses
        n_tok += sum(int((y >= 0).sum()) for _, y in windows)
    grads = [None if g is None else g / n_win for g in total]
    engine.backward(surrogate_loss(tb.params, grads))
    tb.guard(engine.step)()
    batcher.advance_sequences(seqs)
    return sum(losses) / max(1, len(losses)), n_tok
