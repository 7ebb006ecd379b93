"""The DeepSpeed training loop: exact resume, signals, checkpoints, export, errors before training."""

from __future__ import annotations

import json
import math
import signal

import pytest
import torch

from engine.checkpoint import load_model, read_model
from train.checkpoint import export_from_checkpoint, find_checkpoint, read_meta
from train.config import train_preset
from train.errors import CheckpointError, CheckpointMismatchError, DataError, DSConfigError
from train.loop import DSOptions, train
from train.metrics import read_metrics

NO_OFFLOAD = DSOptions(offload="none")


def _cfg(out, **kw):
    # the smoke preset: 1 layer, d_model 64, windows of 128 positions, 2 lanes
    return train_preset("smoke", out_dir=str(out), save_every=0, **kw)


def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(tmp_path):
    steps = 8
    full = train(_cfg(tmp_path / "a", max_steps=steps), ds=NO_OFFLOAD, progress=False)
    assert len(full.losses) == steps and full.losses[-1] < full.losses[0]

    def interrupt(step, record):
        if step == steps // 2:
            signal.raise_signal(signal.SIGINT)  # through the real handler

    first = train(_cfg(tmp_path / "b", max_steps=steps), ds=NO_OFFLOAD, progress=False, on_step=interrupt)
    assert first.stopped_by == "SIGINT" and first.step == steps // 2
    assert first.checkpoint == find_checkpoint(tmp_path / "b") and first.checkpoint.name == "step00000004"
    second = train(_cfg(tmp_path / "b", max_steps=steps), ds=NO_OFFLOAD, progress=False, resume=True)
    assert second.step == steps and second.stopped_by is None
    resumed = first.losses + second.losses
    diff = max(abs(a - b) for a, b in zip(full.losses, resumed))
    assert resumed == pytest.approx(full.losses, abs=1e-6), f"max diff {diff}"
    # metrics.jsonl of the resumed run reads as one run; the loss curve is drawn
    assert [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")] == list(range(1, steps + 1))
    rec = read_metrics(tmp_path / "b" / "metrics.jsonl")[-1]
    assert rec["pulled_bytes"] == {"device": 0, "host": 0, "disk": 0} and rec["tokens_per_s"] > 0
    assert (tmp_path / "b" / "loss.png").stat().st_size > 1000
    # the weights written with the checkpoint are the final ones of the uninterrupted run
    _, wa = read_model(find_checkpoint(tmp_path / "a"))
    _, wb = read_model(find_checkpoint(tmp_path / "b"))
    assert wa.keys() == wb.keys()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_export_round_trip_and_checkpoint_contents(tmp_path):
    res = train(_cfg(tmp_path / "r", max_steps=2, eval_windows=3), ds=NO_OFFLOAD, progress=False)
    assert res.eval_loss is not None and 0 < res.eval_loss < 2 * math.log(260)
    meta = read_meta(res.checkpoint)
    assert meta["step"] == 2 and meta["world_size"] == 1 and meta["precision"] == "fp32"
    assert meta["ranks"][0]["data"]["lanes"]  # the data position travels with the checkpoint
    out = export_from_checkpoint(tmp_path / "r", tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    cfg, state = read_model(out)
    assert cfg == _cfg(tmp_path).model_config()
    model = load_model(out)  # the engine's loader reads the same files
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    tokens = torch.randint(0, 256, (1, 32))
    assert model(tokens).shape == (1, 32, cfg.vocab_size)


def test_cpu_optimizer_offload_trains_and_resumes(tmp_path):
    """The default ds_config path: ZeRO-2 with DeepSpeed's CPU Adam (builds cpu_adam on first use)."""
    ds = DSOptions()  # the shipped ds_config.json
    a = train(_cfg(tmp_path / "o", max_steps=3), ds=ds, progress=False, stop_after=2)
    assert a.stopped_by == "stop_after" and a.step == 2
    b = train(_cfg(tmp_path / "o", max_steps=3), ds=ds, progress=False, resume=tmp_path / "o")
    assert b.step == 3
    assert "torch_adam" not in read_meta(b.checkpoint)["ds_config"]["optimizer"]["params"]


def test_resume_from_another_model_shape_fails_before_training(tmp_path):
    train(_cfg(tmp_path / "s", max_steps=1), ds=NO_OFFLOAD, progress=False)
    other = _cfg(tmp_path / "s", max_steps=2, model_overrides={"n_layers": 2, "d_model": 64, "ffn_hidden": 128,
                                                               "max_seq_len": 128, "block_len": 32})
    with pytest.raises(CheckpointMismatchError, match=r"n_layers=1.*this run builds n_layers=2"):
        train(other, ds=NO_OFFLOAD, progress=False, resume=True,
              model_factory=lambda cfg: pytest.fail("a model was built"))


def test_resume_without_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        train(_cfg(tmp_path / "x"), ds=NO_OFFLOAD, resume=tmp_path / "nothing")


def _never(cfg):
    pytest.fail("training started")


def test_errors_before_any_training_starts(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text("{not json")
    with pytest.raises(DSConfigError, match="malformed JSON"):
        train(_cfg(tmp_path / "e"), ds=DSOptions(config=bad), model_factory=_never)
    with pytest.raises(DSConfigError, match="does not exist"):
        train(_cfg(tmp_path / "e"), ds=DSOptions(config=tmp_path / "missing.json"), model_factory=_never)
    with pytest.raises(DataError, match="does not exist"):
        train(_cfg(tmp_path / "e", data=(str(tmp_path / "nope"),)), ds=NO_OFFLOAD, model_factory=_never)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no text"):
        train(_cfg(tmp_path / "e", data=(str(tmp_path / "empty"),)), ds=NO_OFFLOAD, model_factory=_never)
    contra = tmp_path / "ds2.json"
    contra.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16}))
    with pytest.raises(DSConfigError, match="16 contradicts TrainConfig.micro_batch=2"):
        train(_cfg(tmp_path / "e"), ds=DSOptions(config=contra), model_factory=_never)
    assert not (tmp_path / "e").exists()


def test_zero3_with_parameter_offload_writes_full_weights(tmp_path):
    res = train(_cfg(tmp_path / "z3", max_steps=1), ds=DSOptions(offload="param,optimizer"), progress=False)
    assert read_meta(res.checkpoint)["ds_config"]["zero_optimization"]["stage"] == 3
    model = load_model(export_from_checkpoint(res.checkpoint, tmp_path / "exp"))  # strict: full shapes
    assert model.tok_emb.weight.shape == (260, 64)


def test_retrieval_training_resumes_exactly_and_pulls_blocks(tmp_path):
    """With retrieval from the store, a stopped-and-resumed run's losses equal one run's."""
    steps = 10
    kw = dict(max_steps=steps, retrieval=True, retrieval_top_k=2, synthetic_chars=(400, 1200))
    full = train(_cfg(tmp_path / "a", **kw), ds=NO_OFFLOAD, progress=False)
    recs = read_metrics(tmp_path / "a" / "metrics.jsonl")
    pulled = sum(sum(r["pulled_bytes"].values()) for r in recs)
    assert pulled > 0  # later windows retrieved earlier windows' blocks
    # at most top_k blocks per KV head, layer and lane per step; a block of the smoke model is
    # 2 layers x (2 (K, V) x 2 kv heads x 32 positions x 32 dims + landmark keys) x 4 bytes
    block = 2 * (2 * 2 * 32 * 32 + 2 * 32) * 4
    assert all(sum(r["pulled_bytes"].values()) <= 2 * 2 * 2 * block for r in recs)  # lanes x Hkv x top_k

    def interrupt(step, record):
        if step == 5:
            signal.raise_signal(signal.SIGINT)

    first = train(_cfg(tmp_path / "b", **kw), ds=NO_OFFLOAD, progress=False, on_step=interrupt)
    assert first.stopped_by == "SIGINT" and first.step == 5
    second = train(_cfg(tmp_path / "b", **kw), ds=NO_OFFLOAD, progress=False, resume=True)
    resumed = first.losses + second.losses
    assert resumed == pytest.approx(full.losses, abs=1e-5), \
        f"max diff {max(abs(a - b) for a, b in zip(full.losses, resumed))}"


def test_training_sinks_change_later_windows_only(tmp_path):
    """retrieval_sink_blocks: the document's first blocks join later windows' attention: the
    same first step as without (nothing stored), different later ones."""
    kw = dict(max_steps=4, synthetic_chars=(900, 1400), retrieval=True, retrieval_top_k=1)
    plain = train(_cfg(tmp_path / "p", **kw), ds=NO_OFFLOAD, progress=False)
    sinks = train(_cfg(tmp_path / "s", retrieval_sink_blocks=1, **kw), ds=NO_OFFLOAD, progress=False)
    assert sinks.losses[0] == pytest.approx(plain.losses[0], abs=1e-6)
    assert any(abs(a - b) > 1e-5 for a, b in zip(sinks.losses[1:], plain.losses[1:]))


def test_selection_before_answer_masks_the_answers_queries(tmp_path, monkeypatch):
    """selection_before_answer: the lanes' retrieval memories get every step's query mask (the
    queries reading answer tokens dropped; what the mask does to a selection is tested in
    tests/engine/test_retrieval.py). Refused without retrieval."""
    import train.loop as loop

    kw = dict(max_steps=6, synthetic_chars=(300, 500), retrieval=True, retrieval_top_k=1,
              data=("passkey:answer_weight=30",))
    masks, rows = [], []
    real, real_rows = loop.set_query_keep, loop.set_token_rows

    def spy(mem, targets):
        real(mem, targets)
        masks.extend(m.query_keep for m in mem.memories)

    def spy_rows(mem, targets):
        real_rows(mem, targets)
        rows.extend(m.token_rows for m in mem.memories)

    monkeypatch.setattr(loop, "set_query_keep", spy)
    monkeypatch.setattr(loop, "set_token_rows", spy_rows)
    causal = train(_cfg(tmp_path / "c", selection_before_answer=True, answer_token_selection=True, **kw),
                   ds=NO_OFFLOAD, progress=False)
    assert len(masks) == 6 * 2 and len(rows) == 6 * 2  # every step, both lanes
    assert any(m is not None and not bool(m.all()) for m in masks)  # some window held an answer
    for m, r in zip(masks, rows):  # a prefix of the window: the queries up to the one predicting the answer
        if m is not None:
            n = int(m.sum())
            assert m[:n].all() and not m[n:].any()
        if r is not None:  # the answer's readers: after that prefix
            assert m is not None and int(r.min()) >= int(m.sum())
    assert any(r is not None for r in rows)
    assert len(causal.losses) == 6 and all(x == x for x in causal.losses)  # finite
    with pytest.raises(ValueError, match="selection_before_answer"):
        _cfg(tmp_path / "x", selection_before_answer=True)
    with pytest.raises(ValueError, match="answer_token_selection"):
        _cfg(tmp_path / "x", answer_token_selection=True)


def test_retrieval_changes_the_loss_of_later_windows(tmp_path):
    """The same data with and without retrieval: identical first step (nothing stored yet),
    different later steps (later windows attend to retrieved blocks)."""
    kw = dict(max_steps=4, synthetic_chars=(600, 1200))
    plain = train(_cfg(tmp_path / "p", **kw), ds=NO_OFFLOAD, progress=False)
    retr = train(_cfg(tmp_path / "r", retrieval=True, **kw), ds=NO_OFFLOAD, progress=False)
    assert retr.losses[0] == pytest.approx(plain.losses[0], abs=1e-6)
    assert any(abs(a - b) > 1e-4 for a, b in zip(retr.losses[1:], plain.losses[1:]))


def test_init_from_starts_at_the_exported_weights_and_refuses_another_model(tmp_path):
    from train.checkpoint import export_from_checkpoint
    from train.errors import CheckpointMismatchError

    first = train(_cfg(tmp_path / "a", max_steps=6), ds=NO_OFFLOAD, progress=False)
    exported = export_from_checkpoint(first.checkpoint, tmp_path / "export")
    fresh = train(_cfg(tmp_path / "b", max_steps=1), ds=NO_OFFLOAD, progress=False)
    tuned = train(_cfg(tmp_path / "c", max_steps=1, init_from=str(exported)), ds=NO_OFFLOAD, progress=False)
    # the first step of the tuned run starts where the 6-step run ended, not at a random init
    assert tuned.losses[0] < fresh.losses[0] - 0.05, (tuned.losses, fresh.losses)
    other = train_preset("smoke", out_dir=str(tmp_path / "d"), save_every=0, init_from=str(exported),
                         model_overrides={"n_layers": 2, "d_model": 64, "ffn_hidden": 128,
                                          "max_seq_len": 128, "block_len": 32})
    with pytest.raises(CheckpointMismatchError, match="n_layers"):
        train(other, ds=NO_OFFLOAD, progress=False)
    assert not (tmp_path / "d" / "checkpoints").exists()  # refused before any training
