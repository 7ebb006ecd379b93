"""UIO memories through the DeepSpeed trainer (train/uio_loop.py): whole TBPTT sequences per step,
one surrogate backward, exact resume, a frozen base stays frozen."""

from __future__ import annotations

import signal

import pytest
import torch

from train.config import train_preset
from train.loop import DSOptions, train
from train.uio_tbptt import surrogate_loss

NO_OFFLOAD = DSOptions(offload="none")
UIO = {"n_layers": 1, "d_model": 64, "ffn_hidden": 128, "max_seq_len": 64, "block_len": 8,
       "uio": {"ratio": 8, "S": 2, "enc_rank": 4, "head_rank": 4, "max_windows": 3}}


def _cfg(out, **kw):
    kw.setdefault("model_overrides", UIO)
    return train_preset("uio-tiny", out_dir=str(out), save_every=0, window_len=64, micro_batch=2,
                        synthetic_chars=(150, 400), warmup_steps=2, **kw)


def test_surrogate_gradient_is_the_estimate():
    p = [torch.randn(3, 2, requires_grad=True), torch.randn(4, requires_grad=True)]
    g = [torch.randn(3, 2), None]
    surrogate_loss(p, g).backward()
    assert torch.equal(p[0].grad, g[0]) and p[1].grad is None


def test_uio_run_trains_the_memory_modules_and_resumes_exactly(tmp_path):
    steps = 6
    full = train(_cfg(tmp_path / "a", max_steps=steps), ds=NO_OFFLOAD, progress=False)
    assert all(torch.isfinite(torch.tensor(full.losses)))

    def interrupt(step, record):
        if step == steps // 2:
            signal.raise_signal(signal.SIGINT)

    first = train(_cfg(tmp_path / "b", max_steps=steps), ds=NO_OFFLOAD, progress=False, on_step=interrupt)
    assert first.step == steps // 2
    second = train(_cfg(tmp_path / "b", max_steps=steps), ds=NO_OFFLOAD, progress=False, resume=True)
    assert first.losses + second.losses == pytest.approx(full.losses, abs=1e-6)
    from engine.checkpoint import load_model

    m = load_model(second.checkpoint)
    assert m.cfg.uio["ratio"] == 8 and hasattr(m, "uio")


def test_frozen_base_only_the_memory_modules_change(tmp_path):
    from engine.checkpoint import load_model
    from engine.config import preset
    from engine.model import LandmarkTransformer

    over = {**UIO, "uio": {**UIO["uio"], "train_base": False}}
    res = train(_cfg(tmp_path / "f", max_steps=3, model_overrides=over), ds=NO_OFFLOAD, progress=False)
    m = load_model(res.checkpoint)
    torch.manual_seed(0)
    init = LandmarkTransformer(preset("tiny", **over)).state_dict()
    changed = {k for k, v in m.state_dict().items() if not torch.equal(v, init[k])}
    assert changed and all(k.startswith("uio.") for k in changed), sorted(changed)[:5]


def test_uio_config_errors():
    with pytest.raises(ValueError, match="off for a UIO model"):
        train_preset("uio-tiny", retrieval=True)
    with pytest.raises(ValueError, match="multiple of UIOConfig.ratio=24"):
        train_preset("uio-tiny", window_len=64, model_overrides={**UIO, "uio": {"ratio": 24}})
    with pytest.raises(ValueError, match="max_seq_len=64 for a UIO model"):
        train_preset("uio-tiny", window_len=32, model_overrides=UIO)


def test_uio_model_trains_ingests_and_answers_from_the_cli(tmp_path, capsys):
    """`folio train --preset uio-tiny` -> export -> ingest (memories into the store) -> ask in another
    process; a model without UIO refuses the store, naming why."""
    from tests.train._memory_cli import QUESTION, ask_in_another_process, train_export_ingest
    from train.cli import main

    model, store = train_export_ingest(tmp_path, "uio-tiny", micro_batch=1,
                                       doc_text="The pass key is 4821. Remember it. " + "The grass is green. " * 30)
    # 635 tokens: 5 whole windows of 120 tokens + 8 landmarks (128 positions): one memory block of 16
    # slots each, and (a landmark model) its 8 token blocks for retrieval in the companion stream
    assert "635 tokens ingested, 45 blocks" in capsys.readouterr().out
    for k in ("3", "0"):  # memories + landmark retrieval; memories alone
        assert main(["ask", "--model", str(model), "--store", str(store), QUESTION, "--top-k", k,
                     "--max-tokens", "3"]) == 0
    assert main(["ask", "--model", "random:tiny", "--store", str(store), QUESTION]) == 2
    assert "trained without UIO" in capsys.readouterr().err
    ask_in_another_process(model, store)


def test_a_causal_uio_model_refuses_retrieval_flags():
    import argparse

    from engine.commands import retrieval_config
    from engine.config import ModelConfig

    cfg = ModelConfig(vocab_size=260, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden=32, max_seq_len=32,
                      block_len=4, attention="causal", uio={"ratio": 4})
    args = argparse.Namespace(top_k=3, local_blocks=None, chunk=None)
    with pytest.raises(ValueError, match="UIO memories.*no landmarks"):
        retrieval_config(args, cfg)


def test_uio_starts_from_a_model_trained_without_it(tmp_path):
    """`--init-from` a model without UIO modules (the paper's setting: a pretrained model plus the
    LoRAs): the base weights load, UIO's modules start fresh (the slot from EOS), the base stays
    frozen with train_base false, and only uio.* parameters change."""
    from engine.checkpoint import load_model
    from train.cli import main

    out = tmp_path / "run"
    assert main(["train", "--init-from", "models/passkey-tiny", "--model-set", "max_seq_len=128",
                 "--model-set", 'uio={"ratio": 8, "S": 1, "train_base": false, "enc_rank": 2, "head_rank": 2, '
                                '"max_windows": 2}',
                 "--window", "128", "--data", "sample", "--set", "retrieval=false", "--micro-batch", "1",
                 "--steps", "2", "--offload", "none", "--no-progress", "--set", "eval_windows=0",
                 "--out", str(out)]) == 0
    assert main(["export", str(out), "--out", str(tmp_path / "m")]) == 0
    base, tuned = load_model("models/passkey-tiny").state_dict(), load_model(tmp_path / "m").state_dict()
    assert all(torch.equal(base[k], tuned[k]) for k in base if k in tuned)
    assert any(k.startswith("uio.") for k in tuned)
