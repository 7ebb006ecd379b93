"""Folio's model format on disk: the one place that writes and reads it.

A model directory holds

    model.safetensors   the weights in cfg.dtype (with tied embeddings no `lm_head.weight`),
                        header metadata {"format": "folio-model-v1", "fingerprint": ...}
                        (the fingerprint absent from models `save_model` wrote)
    config.json         {"model": ModelConfig fields, "fingerprint": ...}

plus, for imported models, the tokenizer files (`engine.tokenizer`). An adapter directory
(`engine.adapter`) loads as its base model with the adapter merged in. Training step folders
(`train.checkpoint`) are model directories with DeepSpeed's files and a meta file beside.

Nothing here unpickles. The file primitives (`write_tensors`, `read_tensors`, `write_json`,
`read_json`) serve the adapter format and the training meta too, so every Folio file is
written by tmp-then-rename and every read failure is one of engine.errors':
CheckpointNotFoundError (a file is missing), CheckpointError (unreadable or invalid),
CheckpointMismatchError (weights and config disagree, or another model than expected).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from engine.config import ModelConfig
from engine.errors import CheckpointError, CheckpointMismatchError, CheckpointNotFoundError
from engine.model import LandmarkTransformer

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT = "folio-model-v1"
TIED_KEY = "lm_head.weight"  # left out with tie_embeddings: it is tok_emb.weight


# ---------------------------------------------------------------------------- file primitives


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as sorted, indented JSON, atomically (tmp, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str | os.PathLike) -> Any:
    """The JSON at `path`. Raises CheckpointNotFoundError / CheckpointError."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path}: does not exist") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: malformed JSON: {e.msg}") from None


def write_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write CPU tensors as safetensors with header `metadata`, via a tmp file and a rename."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def read_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(CPU tensors, header metadata) of a safetensors file. Raises CheckpointNotFoundError when
    it is missing, CheckpointError when it is truncated or not safetensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path}: does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot be read: {e}") from None


# ---------------------------------------------------------------------------- the model format


def write_model(directory: str | os.PathLike, state: dict[str, torch.Tensor], cfg: ModelConfig, *,
                stamp_weights: bool = True) -> Path:
    """Write `model.safetensors` + `config.json` of `cfg` holding `state` into `directory`
    (created). Tensors are cast to cfg.dtype; the tied output projection is left out.
    stamp_weights=False leaves the fingerprint out of the weights' header, as `save_model`
    has always written it (re-imports stay byte-identical). Returns the directory."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, cfg.dtype)
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for k, v in state.items():
        if cfg.tie_embeddings and k == TIED_KEY:
            continue
        t = v.detach().to("cpu", dtype).contiguous()
        ptr = t.untyped_storage().data_ptr()
        tensors[k] = t.clone() if ptr in storages else t  # safetensors refuses two names for one tensor
        storages.add(ptr)
    metadata = {"format": FORMAT, **({"fingerprint": cfg.fingerprint()} if stamp_weights else {})}
    write_tensors(d / WEIGHTS, tensors, metadata)
    write_json(d / CONFIG, {"model": cfg.to_dict(), "fingerprint": cfg.fingerprint()})
    return d


def save_model(model: LandmarkTransformer, directory: str | os.PathLike) -> Path:
    """Write a live model's weights and config to `directory` (created). Returns it."""
    return write_model(directory, model.state_dict(), model.cfg, stamp_weights=False)


def _missing(d: Path, name: str) -> CheckpointNotFoundError:
    return CheckpointNotFoundError(f"{d}: no {name}: not an exported Folio model (a model directory holds "
                                   f"{WEIGHTS} + {CONFIG}, written by `folio import` or `folio export`)")


def config_from_json(raw: Any, path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig in `raw`, the JSON read from `path` (a config.json's "model" field or the
    whole object, an adapter_config.json's "model"); refuses one whose recorded fingerprint is
    not its own. Raises CheckpointError / CheckpointMismatchError naming `path`."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: not a valid ModelConfig: a JSON object is expected")
    try:
        cfg = ModelConfig.from_dict(raw["model"] if "model" in raw else raw)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a valid ModelConfig: {e}") from None
    fp = raw.get("fingerprint")
    if fp is not None and fp != cfg.fingerprint():
        raise CheckpointMismatchError(f"{path}: fingerprint {fp} does not match its own model fields "
                                      f"({cfg.fingerprint()}); the file was edited")
    return cfg


def load_config(directory: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a model directory, or of an adapter directory (the adapted model's).
    Raises CheckpointNotFoundError, CheckpointError or CheckpointMismatchError."""
    from engine.adapter import ADAPTER_CONFIG

    d = Path(directory)
    path = d / CONFIG
    if not path.is_file() and (d / ADAPTER_CONFIG).is_file():
        path = d / ADAPTER_CONFIG
    if not path.is_file():
        raise _missing(d, CONFIG)
    return config_from_json(read_json(path), path)


def read_model(directory: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, state dict of CPU tensors) of a model directory; with tied embeddings the
    state has no `lm_head.weight` (`build_model` ties it).

    Raises CheckpointNotFoundError when a file is missing, CheckpointError when one is broken,
    CheckpointMismatchError when the weights were written for another config."""
    d = Path(directory)
    for name in (CONFIG, WEIGHTS):
        if not (d / name).is_file():
            raise _missing(d, name)
    cfg = config_from_json(read_json(d / CONFIG), d / CONFIG)
    state, metadata = read_tensors(d / WEIGHTS)
    fp = metadata.get("fingerprint")
    if fp is not None and fp != cfg.fingerprint():
        raise CheckpointMismatchError(f"{d}: {WEIGHTS} was written for model fingerprint {fp}, "
                                      f"but {CONFIG} describes {cfg.fingerprint()}")
    return cfg, state


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], what: str) -> LandmarkTransformer:
    """A model of `cfg` holding `state` (taken as its parameters, not copied; a tied output
    projection may be left out), in eval mode. Raises CheckpointMismatchError starting with
    `what` and naming the missing and unexpected tensors."""
    with torch.device("meta"):
        model = LandmarkTransformer(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (cfg.tie_embeddings and m == TIED_KEY)]
    if missing or unexpected:
        raise CheckpointMismatchError(f"{what}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    return model.eval()


def load_model(directory: str | os.PathLike, *, device: str | torch.device = "cpu") -> LandmarkTransformer:
    """The model of a model directory on `device`, in eval mode; an adapter directory
    (`engine.adapter`) loads as its base model with the adapter merged in. Raises as
    `read_model` and `engine.adapter.load_adapted` do."""
    from engine.adapter import is_adapter_dir, load_adapted

    d = Path(directory)
    if is_adapter_dir(d) and not (d / WEIGHTS).is_file():
        cfg, state = load_adapted(d)
        what = f"{d}: the adapter and its base do not fit the config"
    else:
        cfg, state = read_model(d)
        what = f"{d / WEIGHTS} does not match the config"
    return build_model(cfg, state, what).to(device).eval()
