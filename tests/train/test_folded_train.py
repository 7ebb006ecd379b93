"""Folded context through the DeepSpeed trainer (train/folded_memory.py): carries pass from step
to step within a document, reset between documents, and survive a checkpoint exactly."""

from __future__ import annotations

import signal

import pytest

from engine.folded import FoldedMemory
from train.config import train_preset
from train.folded_memory import CARRY_FILE, FoldedWindowMemory
from train.loop import DSOptions, train

NO_OFFLOAD = DSOptions(offload="none")
FOLDED = {"n_layers": 2, "d_model": 64, "ffn_hidden": 128, "max_seq_len": 128, "block_len": 16,
          "attention": "causal", "folded_window": 32}


def _cfg(out, **kw):
    # documents of 150-400 characters: 2-13 windows of 32 positions; a step is 2 windows (BPTT over 2)
    return train_preset("smoke", out_dir=str(out), save_every=0, model_overrides=FOLDED, window_len=64, **kw)


def test_resumed_folded_run_equals_an_uninterrupted_one(tmp_path):
    steps = 8
    full = train(_cfg(tmp_path / "a", max_steps=steps), ds=NO_OFFLOAD, progress=False)

    def interrupt(step, record):
        if step == steps // 2:
            signal.raise_signal(signal.SIGINT)

    first = train(_cfg(tmp_path / "b", max_steps=steps), ds=NO_OFFLOAD, progress=False, on_step=interrupt)
    assert first.step == steps // 2
    assert (first.checkpoint / CARRY_FILE.format(rank=0)).is_file()
    second = train(_cfg(tmp_path / "b", max_steps=steps), ds=NO_OFFLOAD, progress=False, resume=True)
    assert first.losses + second.losses == pytest.approx(full.losses, abs=1e-6)


def test_carry_is_used_and_reset_between_documents(tmp_path):
    """The same run with the carry dropped every step trains on different losses (the carry is
    in the forward); documents start without a carry."""
    seen = []

    class Spy(FoldedWindowMemory):
        def for_step(self, states):
            seen.append([(s.window, s.memory is not None) for s in states])
            return super().for_step(states)

    from engine.config import preset

    mcfg = preset("tiny", **FOLDED)
    a = train(_cfg(tmp_path / "a", max_steps=6), ds=NO_OFFLOAD, progress=False, memory=Spy(mcfg))
    assert all(has == (w > 0) for row in seen for w, has in row)
    assert any(has for row in seen for _, has in row)

    class Forgetful(FoldedWindowMemory):
        def for_step(self, states):
            self._mem = FoldedMemory(self.cfg, lanes=[None] * len(states))
            return self._mem

    b = train(_cfg(tmp_path / "b", max_steps=6), ds=NO_OFFLOAD, progress=False, memory=Forgetful(mcfg))
    assert a.losses[0] == pytest.approx(b.losses[0], abs=1e-6)  # the first step: no carry anywhere
    assert a.losses != pytest.approx(b.losses, abs=1e-6)


def test_folded_config_errors(tmp_path):
    with pytest.raises(ValueError, match="multiple of the model's folded_window=32"):
        train_preset("smoke", model_overrides=FOLDED, window_len=48)
    with pytest.raises(ValueError, match="retrieval"):
        train_preset("smoke", model_overrides=FOLDED, window_len=64, retrieval=True)


def test_folded_model_trains_ingests_and_answers_from_the_cli(tmp_path, capsys):
    """`folio train --preset folded-tiny` -> export -> ingest -> ask in another process."""
    from tests.train._memory_cli import QUESTION, ask_in_another_process, train_export_ingest
    from train.cli import main

    model, store = train_export_ingest(tmp_path, "folded-tiny", micro_batch=2,
                                       doc_text="The pass key is 4821. Remember it. " + "The grass is green. " * 20)
    assert "tokens ingested" in capsys.readouterr().out
    assert main(["ask", "--model", str(model), "--store", str(store), QUESTION, "--top-k", "3"]) == 2
    assert "folded context" in capsys.readouterr().err
    ask_in_another_process(model, store)
