"""The model format (engine/checkpoint.py): round trips, and the error each broken directory raises."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from engine.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter, save_adapter
from engine.checkpoint import (CONFIG, WEIGHTS, load_config, load_model, read_model, read_tensors, save_model,
                               write_model)
from engine.config import ModelConfig
from engine.errors import (CheckpointError, CheckpointMismatchError, CheckpointNotFoundError, EngineError,
                           ModelMismatchError)
from engine.model import LandmarkTransformer

ROOT = Path(__file__).resolve().parents[2]


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden=64, max_seq_len=64,
                                 block_len=16), **kw})


def _model(**kw) -> LandmarkTransformer:
    torch.manual_seed(0)
    return LandmarkTransformer(_cfg(**kw)).eval()


def _same_logits(a: torch.nn.Module, b: torch.nn.Module) -> None:
    x = torch.arange(32).view(1, 32) % 250
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip(tmp_path, tied):
    m = _model(tie_embeddings=tied)
    write_model(tmp_path / "m", m.state_dict(), m.cfg)
    cfg, state = read_model(tmp_path / "m")
    assert cfg == m.cfg and ("lm_head.weight" in state) == (not tied)
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items() if k in state)
    loaded = load_model(tmp_path / "m")
    assert (loaded.lm_head.weight is loaded.tok_emb.weight) == tied
    _same_logits(m, loaded)
    assert load_config(tmp_path / "m") == m.cfg


def test_save_model_header_has_no_fingerprint(tmp_path):
    m = _model()
    save_model(m, tmp_path / "saved")
    write_model(tmp_path / "written", m.state_dict(), m.cfg)
    assert read_tensors(tmp_path / "saved" / WEIGHTS)[1] == {"format": "folio-model-v1"}
    assert read_tensors(tmp_path / "written" / WEIGHTS)[1] == {"format": "folio-model-v1",
                                                                "fingerprint": m.cfg.fingerprint()}
    assert (tmp_path / "saved" / CONFIG).read_bytes() == (tmp_path / "written" / CONFIG).read_bytes()
    _same_logits(load_model(tmp_path / "saved"), load_model(tmp_path / "written"))


def test_the_shipped_checkpoint_loads():
    d = ROOT / "models" / "passkey-tiny"
    cfg, state = read_model(d)
    assert cfg.n_layers == 4 and len(state) > 0
    assert load_model(d).cfg == cfg


def test_missing_files(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="no config.json") as e:
        load_model(tmp_path / "nothing")
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, EngineError)
    m = _model()
    save_model(m, tmp_path / "m")
    (tmp_path / "m" / WEIGHTS).unlink()
    with pytest.raises(CheckpointNotFoundError, match="no model.safetensors"):
        read_model(tmp_path / "m")


def test_truncated_weights(tmp_path):
    save_model(_model(), tmp_path / "m")
    w = tmp_path / "m" / WEIGHTS
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_model(tmp_path / "m")


def test_broken_config(tmp_path):
    save_model(_model(), tmp_path / "m")
    c = tmp_path / "m" / CONFIG
    c.write_text("{not json")
    with pytest.raises(CheckpointError, match="malformed JSON"):
        load_config(tmp_path / "m")
    c.write_text(json.dumps({"model": {"d_model": 32, "nope": 1}}))
    with pytest.raises(CheckpointError, match="not a valid ModelConfig.*unknown fields"):
        read_model(tmp_path / "m")


def test_edited_config_is_refused(tmp_path):
    save_model(_model(), tmp_path / "m")
    c = tmp_path / "m" / CONFIG
    meta = json.loads(c.read_text())
    meta["model"]["rope_theta"] = 500000.0
    c.write_text(json.dumps(meta))
    with pytest.raises(CheckpointMismatchError, match="the file was edited"):
        load_config(tmp_path / "m")


def test_weights_of_another_model(tmp_path):
    a, b = _model(), _model(n_layers=2)
    write_model(tmp_path / "a", a.state_dict(), a.cfg)
    write_model(tmp_path / "b", b.state_dict(), b.cfg)
    shutil.copyfile(tmp_path / "b" / WEIGHTS, tmp_path / "a" / WEIGHTS)
    with pytest.raises(CheckpointMismatchError, match="was written for model fingerprint") as e:
        read_model(tmp_path / "a")
    assert isinstance(e.value, ModelMismatchError) and isinstance(e.value, ValueError)
    save_model(b, tmp_path / "c")  # no fingerprint in the header: the shapes tell
    shutil.copyfile(tmp_path / "c" / WEIGHTS, tmp_path / "a" / WEIGHTS)
    with pytest.raises(CheckpointMismatchError, match="does not match the config: missing .*unexpected"):
        load_model(tmp_path / "a")


def test_train_checkpoint_errors_are_the_engines():
    import train.errors as te

    assert te.CheckpointError is CheckpointError and te.CheckpointMismatchError is CheckpointMismatchError


def test_adapter_files(tmp_path):
    m = _model()
    save_model(m, tmp_path / "base")
    lora = {"rank": 2, "alpha": 4.0, "landmark_id": None}
    a, b = torch.randn(2, 32), torch.randn(32, 2)
    save_adapter(tmp_path / "ad", {"layers.0.attn.wq.lora_A": a, "layers.0.attn.wq.lora_B": b}, lora=lora,
                 base=str(tmp_path / "base"), model_config=m.cfg.to_dict(), base_fingerprint=m.cfg.fingerprint())
    meta, tensors = read_adapter(tmp_path / "ad")
    assert meta["lora"] == lora and torch.equal(tensors["layers.0.attn.wq.lora_A"], a)
    merged = load_model(tmp_path / "ad")
    want = m.layers[0].attn.wq.weight + 2.0 * (b @ a)
    assert torch.allclose(merged.layers[0].attn.wq.weight, want)
    (tmp_path / "ad" / ADAPTER_CONFIG).write_text(json.dumps({**meta, "format": "other"}))
    with pytest.raises(CheckpointError, match="is not 'folio-lora-v1'"):
        read_adapter(tmp_path / "ad")
    (tmp_path / "ad" / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(CheckpointNotFoundError, match="no adapter.safetensors"):
        load_model(tmp_path / "ad")
