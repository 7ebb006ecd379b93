"""Exported model format: a directory with `model.safetensors` and `config.json`.

Never unpickles: weights are safetensors, the config is JSON validated by ModelConfig.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engine.config import ModelConfig
from engine.model import LandmarkTransformer

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save_model(model: LandmarkTransformer, directory: str | os.PathLike, *,
               extra: dict | None = None) -> Path:
    """Write the model's weights and config to `directory` (created). Returns it."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    tmp = d / (WEIGHTS + ".tmp")
    save_file(state, str(tmp), metadata={"format": "folio-model-v1"})
    os.replace(tmp, d / WEIGHTS)
    meta = {"model": model.cfg.to_dict(), "fingerprint": model.cfg.fingerprint(), **(extra or {})}
    (d / CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return d


def load_config(directory: str | os.PathLike) -> ModelConfig:
    path = Path(directory) / CONFIG
    if not path.is_file() and (Path(directory) / "adapter_config.json").is_file():
        path = Path(directory) / "adapter_config.json"  # an adapter directory: the adapted model's config
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG} in {directory!s}: not an exported Folio model "
                                f"(expected {WEIGHTS} + {CONFIG}, written by `folio export`)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    return ModelConfig.from_dict(meta["model"] if "model" in meta else meta)


def load_model(directory: str | os.PathLike, *, device: str | torch.device = "cpu"
               ) -> LandmarkTransformer:
    """Load an exported model (config + safetensors weights) onto `device`; an adapter
    directory (`engine.adapter`) loads as its base model with the adapter merged in."""
    from engine.adapter import is_adapter_dir, load_adapted

    if is_adapter_dir(directory) and not (Path(directory) / WEIGHTS).is_file():
        cfg, state = load_adapted(directory)
        return _built(cfg, state, f"{directory}: the adapter and its base do not fit the config").to(device).eval()
    cfg = load_config(directory)
    wpath = Path(directory) / WEIGHTS
    if not wpath.is_file():
        raise FileNotFoundError(f"no {WEIGHTS} in {directory!s}")
    state = load_file(str(wpath), device="cpu")
    return _built(cfg, state, f"{wpath} does not match the config").to(device).eval()


def _built(cfg: ModelConfig, state: dict[str, torch.Tensor], what: str) -> LandmarkTransformer:
    """A model of `cfg` holding `state` (a tied output projection may be left out); ValueError
    starting with `what` naming missing and unexpected tensors."""
    model = LandmarkTransformer(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (cfg.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{what}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model
