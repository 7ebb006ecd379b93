"""The demo's passkey table: every depth up to a length, the middle depth beyond it."""

from __future__ import annotations

import json

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
