"""The demo's passkey table: every depth up to a length, the middle depth beyond it."""

from __future__ import annotations

import json

import pytest

import torch

from engine.checkpoint import save_model
from engine.config import preset
from engine.model import LandmarkTransformer


def test_demo_passkey_grid_and_outputs(tmp_path, monkeypatch, capsys):
    import train.demo as demo

    torch.manual_seed(0)
    model = LandmarkTransformer(preset("tiny", n_layers=1, max_seq_len=128, block_len=32))
    save_model(model, tmp_path / "m")
    monkeypatch.setattr(demo, "SHIPPED", tmp_path / "no-shipped-model")
    monkeypatch.setattr(demo, "ALL_DEPTHS_UP_TO", 250)
    res = demo.evaluate_passkey(tmp_path / "m", tmp_path / "out", lengths=(200, 300), depths=(0.0, 0.5, 1.0),
                                trials=1)
    cells = [(r["length"], r["depth"]) for r in res["rows"]]
    assert cells == [(200, 0.0), (200, 0.5), (200, 1.0), (300, 0.5)]
    assert all(0.0 <= r["retrieval"] <= 1.0 and 0.0 <= r["local"] <= 1.0 for r in res["rows"])
    saved = json.loads((tmp_path / "out" / "passkey.json").read_text())
    assert saved["rows"] == res["rows"] and saved["config"]["lengths"] == [200, 300]
    assert (tmp_path / "out" / "passkey.png").stat().st_size > 1000
    assert "the model just trained" in capsys.readouterr().out


def test_demo_real_model_part_runs_on_a_small_imported_checkpoint(tmp_path, capsys):
    """The demo's real-model part end to end (ingest a real document, two questions, the needle
    table) on a random checkpoint the test writes; SmolLM2 itself runs in `make demo`."""
    pytest.importorskip("transformers")
    import json

    import train.demo as demo
    from engine.convert import import_checkpoint, save_imported
    from tests.engine.test_convert import _make

    hf_dir, _ = _make(tmp_path, "llama")
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": "{% for m in messages %}<s>{{ m.role }}: {{ m.content }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant: {% endif %}"}))
    model_dir = save_imported(*import_checkpoint(hf_dir, block_len=8), tmp_path / "model")
    # a landmark fine-tune of it: an adapter directory beside it (as models/smollm2-135m-landmark)
    import dataclasses

    from engine.checkpoint import load_model
    from engine.tokenizer import load_tokenizer
    from train.finetune import LoraSpec, apply_lora, write_adapter

    base = load_model(model_dir)
    cfg = dataclasses.replace(base.cfg, attention="landmark", max_seq_len=64)
    spec = LoraSpec(rank=2, landmark_id=cfg.vocab_size - 1)
    tuned = apply_lora(base, spec)
    tuned_dir = write_adapter(tmp_path / "tuned", tuned.state_dict(), spec, base=str(model_dir),
                              model_config=cfg.to_dict())
    load_tokenizer(model_dir).save(tuned_dir)
    res = demo.demo_real_model(tmp_path / "out", model_dir=model_dir, document="sample:sotu-1862-lincoln",
                               questions=("Who wrote this?",), needle_lengths=(160,), tuned_dir=tuned_dir)
    out = capsys.readouterr().out
    assert res["document"] == "sample:sotu-1862-lincoln" and "Who wrote this?" in res["answers"]
    assert "demo: A:" in out and (tmp_path / "out" / "needle" / "needle.json").is_file()
    assert {r["mode"] for r in res["tuned_needle"]["rows"]} == {"retrieval"}
    assert (tmp_path / "out" / "needle-tuned" / "needle.json").is_file()
    assert demo.demo_real_model(tmp_path / "o2", model_dir=tmp_path / "missing") == {}
    assert "make model" in capsys.readouterr().out
