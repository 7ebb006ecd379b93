"""LoRA adapters on disk: write one, read one, merge it into its base model.

An adapter directory holds `adapter.safetensors` (LoRA A/B per adapted projection, the
landmark token's embedding row, float32) and `adapter_config.json` (format, LoRA settings,
the base model directory, the adapted ModelConfig), and usually the tokenizer files.
`train.finetune` computes the tensors; `load_adapted` returns the merged model's config and
weights, so every command that takes a model directory takes an adapter directory too.
Files go through `engine.checkpoint`'s primitives; errors are engine.errors'.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from engine.checkpoint import (CONFIG, config_from_json, load_config, read_json, read_model, read_tensors, write_json,
                               write_tensors)
from engine.config import ModelConfig
from engine.errors import CheckpointError, CheckpointMismatchError, CheckpointNotFoundError

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FORMAT = "folio-lora-v1"


def is_adapter_dir(directory: str | os.PathLike) -> bool:
    return (Path(directory) / ADAPTER_CONFIG).is_file()


def save_adapter(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], *, lora: dict[str, Any],
                 base: str, model_config: dict[str, Any], base_fingerprint: str | None = None) -> Path:
    """Write `adapter.safetensors` (tensors as float32) + `adapter_config.json` into `directory`
    (created). `lora`: the LoraSpec fields; `base`: the model directory the adapter applies to
    (recorded as given); model_config: the adapted model's ModelConfig fields. Returns it."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    write_tensors(d / ADAPTER_WEIGHTS, {k: v.detach().to("cpu", torch.float32).contiguous().clone()
                                        for k, v in tensors.items()}, {"format": ADAPTER_FORMAT})
    write_json(d / ADAPTER_CONFIG, {"format": ADAPTER_FORMAT, "lora": lora, "base": base,
                                    "base_fingerprint": base_fingerprint, "model": model_config})
    return d


def read_adapter(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config.json, tensors) of an adapter directory, checked. Raises
    CheckpointNotFoundError when a file is missing, CheckpointError when one is broken."""
    d = Path(directory)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (d / name).is_file():
            raise CheckpointNotFoundError(f"{d}: no {name} (an adapter directory holds {ADAPTER_WEIGHTS} + "
                                          f"{ADAPTER_CONFIG})")
    meta = read_json(d / ADAPTER_CONFIG)
    if not isinstance(meta, dict) or meta.get("format") != ADAPTER_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{d / ADAPTER_CONFIG}: format {got!r} is not {ADAPTER_FORMAT!r}")
    tensors, _ = read_tensors(d / ADAPTER_WEIGHTS)
    return meta, tensors


def resolve_base(directory: str | os.PathLike, base: str) -> Path:
    """The base model directory of an adapter: `base` as recorded, else relative to the
    adapter's directory, else its last component beside the adapter (models/NAME)."""
    d = Path(directory)
    for cand in (Path(base), d / base, d.parent / Path(base).name):
        if (cand / CONFIG).is_file():
            return cand
    raise CheckpointNotFoundError(f"{d}: the adapter's base model {base!r} was not found (looked at {base!r}, "
                                  f"{str(d / base)!r} and {str(d.parent / Path(base).name)!r}); `make model` "
                                  f"imports SmolLM2, `folio import` any other checkpoint")


def merge_adapter(base_state: dict[str, torch.Tensor], meta: dict[str, Any],
                  tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapted model's plain state dict: base weights with the adapter merged in.
    Raises CheckpointMismatchError for an adapter tensor the base has no weight for,
    CheckpointError for tensors that are not LoRA A/B or a landmark row."""
    lora = meta["lora"]
    scaling = float(lora["alpha"]) / int(lora["rank"])
    landmark_id = lora.get("landmark_id")
    out = dict(base_state)
    used = set()
    for k, a in tensors.items():
        if k.endswith(".lora_A"):
            mod = k[: -len(".lora_A")]
            b = tensors[f"{mod}.lora_B"]
            w = out.get(f"{mod}.weight")
            if w is None:
                raise CheckpointMismatchError(f"adapter tensor {k}: the base model has no {mod}.weight")
            out[f"{mod}.weight"] = (w.float() + scaling * (b.float() @ a.float())).to(w.dtype)
            used.update((k, f"{mod}.lora_B"))
        elif k.endswith(".landmark_row"):
            mod = k[: -len(".landmark_row")]
            w = out[f"{mod}.weight"].clone()
            w[landmark_id] = a.to(w.dtype)[0]
            out[f"{mod}.weight"] = w
            used.add(k)
    left = sorted(set(tensors) - used)
    if left:
        raise CheckpointError(f"adapter tensors not understood: {left[:5]}")
    return out


def load_adapted(directory: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, merged state dict) of an adapter directory: its base model's weights
    (found by `resolve_base`) with the adapter merged in. Raises CheckpointNotFoundError,
    CheckpointError, or CheckpointMismatchError when the base is another model than the
    adapter was trained on."""
    meta, tensors = read_adapter(directory)
    base = resolve_base(directory, meta["base"])
    cfg = config_from_json(meta, Path(directory) / ADAPTER_CONFIG)
    base_cfg = load_config(base)
    if meta.get("base_fingerprint") and base_cfg.fingerprint() != meta["base_fingerprint"]:
        raise CheckpointMismatchError(f"{directory}: the adapter was trained on base model "
                                      f"{meta['base_fingerprint']}, {base} is {base_cfg.fingerprint()}")
    _, base_state = read_model(base)
    return cfg, merge_adapter(base_state, meta, tensors)
