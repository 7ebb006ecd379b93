"""LoRA adapters on disk: read one and merge it into its base model (`train.finetune` writes them).

An adapter directory holds `adapter.safetensors` (LoRA A/B per adapted projection, the
landmark token's embedding row) and `adapter_config.json` (format, LoRA settings, the base
model directory, the adapted ModelConfig), and usually the tokenizer files. `load_adapted`
returns the merged model's config and weights, so every command that takes a model
directory takes an adapter directory too. Nothing here unpickles.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FORMAT = "folio-lora-v1"


def is_adapter_dir(directory: str | os.PathLike) -> bool:
    return (Path(directory) / ADAPTER_CONFIG).is_file()


def read_adapter(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config.json, tensors) of an adapter directory, checked; never unpickles."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(directory)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d}: no {name} (an adapter directory holds {ADAPTER_WEIGHTS} + {ADAPTER_CONFIG})")
    try:
        meta = json.loads((d / ADAPTER_CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{d / ADAPTER_CONFIG}: malformed JSON: {e.msg}") from None
    if meta.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{d / ADAPTER_CONFIG}: format {meta.get('format')!r} is not {ADAPTER_FORMAT!r}")
    try:
        tensors = load_file(str(d / ADAPTER_WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{d / ADAPTER_WEIGHTS}: cannot be read: {e}") from None
    return meta, tensors


def resolve_base(directory: str | os.PathLike, base: str) -> Path:
    """The base model directory of an adapter: `base` as recorded, else relative to the
    adapter's directory, else its last component beside the adapter (models/NAME)."""
    d = Path(directory)
    for cand in (Path(base), d / base, d.parent / Path(base).name):
        if (cand / "config.json").is_file():
            return cand
    raise FileNotFoundError(f"{d}: the adapter's base model {base!r} was not found (looked at {base!r}, "
                            f"{str(d / base)!r} and {str(d.parent / Path(base).name)!r}); `make model` "
                            f"imports SmolLM2, `folio import` any other checkpoint")


def merge_adapter(base_state: dict[str, torch.Tensor], meta: dict[str, Any],
                  tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapted model's plain state dict: base weights with the adapter merged in."""
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
                raise ValueError(f"adapter tensor {k}: the base model has no {mod}.weight")
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
        raise ValueError(f"adapter tensors not understood: {left[:5]}")
    return out


def load_adapted(directory: str | os.PathLike):
    """(ModelConfig, merged state dict) of an adapter directory: its base model's weights
    (found by `resolve_base`) with the adapter merged in. Raises FileNotFoundError /
    ValueError naming what is missing or wrong."""
    from safetensors.torch import load_file

    from engine.config import ModelConfig

    meta, tensors = read_adapter(directory)
    base = resolve_base(directory, meta["base"])
    cfg = ModelConfig.from_dict(meta["model"])
    base_meta = json.loads((base / "config.json").read_text())
    base_cfg = ModelConfig.from_dict(base_meta["model"] if "model" in base_meta else base_meta)
    if meta.get("base_fingerprint") and base_cfg.fingerprint() != meta["base_fingerprint"]:
        raise ValueError(f"{directory}: the adapter was trained on base model {meta['base_fingerprint']}, "
                         f"{base} is {base_cfg.fingerprint()}")
    weights = base / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{base}: no model.safetensors (the adapter's base model)")
    return cfg, merge_adapter(load_file(str(weights)), meta, tensors)
