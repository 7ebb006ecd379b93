"""Parameter-efficient fine-tuning: LoRA adapters (the `peft` library) on Folio's own modules.

`apply_lora(model, spec, landmark_id)` freezes the model, injects LoRA adapters into the
named projections (`peft.inject_adapter_in_model`: Folio's model is a plain nn.Module, not
a transformers one) and, unless told otherwise, makes the landmark token's embedding row
trainable (peft's trainable tokens: one row, not the 28M-entry embedding). DeepSpeed then
trains only what requires a gradient.

The trained state (peft's parameter names) is turned into two things at every checkpoint:
- `merge_state(state, spec)`: the plain model's weights, W + (alpha/r) B A and the landmark
  row written in, under Folio's own names: every `folio` command loads it as any model;
- `adapter_state(state)`: the adapter alone (LoRA A/B and the landmark row), a few MB,
  written as an adapter directory (`write_adapter`, the format of `engine.adapter`), which
  `engine.adapter.load_adapted` applies to its base model directory.

`load_adapter_tensors(model, tensors, spec)` is the inverse of `adapter_state`: a run started
from an adapter directory (`folio train --init-from ADAPTER_DIR`) continues its LoRA weights.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from engine.adapter import save_adapter

_NAME = "default"  # peft's adapter name
_TOKENS_DELTA = f".token_adapter.trainable_tokens_delta.{_NAME}"
_TOKENS_BASE = ".token_adapter.base_layer.weight"
LINEAR_NAMES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


@dataclass(frozen=True, slots=True)
class LoraSpec:
    """Which adapters, of what rank. `targets` are Folio's module names (LINEAR_NAMES)."""

    rank: int
    alpha: float = 16.0
    targets: tuple[str, ...] = ("wq", "wk", "wv", "wo")
    dropout: float = 0.0
    train_landmark: bool = True
    landmark_id: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora rank={self.rank!r} is invalid: an int >= 1")
        bad = [t for t in self.targets if t not in LINEAR_NAMES]
        if not self.targets or bad:
            raise ValueError(f"lora targets {list(self.targets)} are invalid: a non-empty subset of {LINEAR_NAMES}")
        if not self.alpha > 0:
            raise ValueError(f"lora alpha={self.alpha!r} is invalid: must be > 0")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora dropout={self.dropout!r} is invalid: in [0, 1)")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d


def apply_lora(model: torch.nn.Module, spec: LoraSpec) -> torch.nn.Module:
    """Freeze `model` and inject the adapters of `spec` (in place); returns the model."""
    from peft import LoraConfig, inject_adapter_in_model

    for p in model.parameters():
        p.requires_grad_(False)
    tokens = ({"tok_emb": [spec.landmark_id]} if spec.train_landmark and spec.landmark_id is not None else None)
    cfg = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                     target_modules=list(spec.targets), trainable_token_indices=tokens)
    return inject_adapter_in_model(cfg, model, adapter_name=_NAME)


def is_adapted(state: dict[str, torch.Tensor]) -> bool:
    return any(".lora_A." in k or _TOKENS_DELTA in k for k in state)


def merge_state(state: dict[str, torch.Tensor], spec: LoraSpec) -> dict[str, torch.Tensor]:
    """The plain model's state dict (Folio's names) from an adapted one: every LoRA target's
    weight becomes W + scaling * B @ A (in float32, cast back), the landmark row is written
    into the embedding (and the tied output projection)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if ".lora_A." in k or ".lora_B." in k or _TOKENS_DELTA in k:
            continue
        if k.endswith(".base_layer.weight") and _TOKENS_BASE not in k:
            mod = k[: -len(".base_layer.weight")]
            a = state[f"{mod}.lora_A.{_NAME}.weight"].float()  # (r, in)
            b = state[f"{mod}.lora_B.{_NAME}.weight"].float()  # (out, r)
            out[f"{mod}.weight"] = (v.float() + spec.scaling * (b @ a)).to(v.dtype)
        elif k.endswith(".base_layer.bias"):
            out[k.replace(".base_layer.bias", ".bias")] = v
        elif k.endswith(_TOKENS_BASE):
            mod = k[: -len(_TOKENS_BASE)]
            w = v.clone()
            delta = state.get(f"{mod}{_TOKENS_DELTA}")
            if delta is not None:
                idx = torch.tensor([spec.landmark_id])
                w.index_copy_(0, idx, delta.to(w.dtype))
            out[f"{mod}.weight"] = w
        else:
            out[k] = v
    if "lm_head.weight" in out and "tok_emb.weight" in out and spec.train_landmark and spec.landmark_id is not None:
        lm = out["lm_head.weight"]
        if lm.shape == out["tok_emb.weight"].shape and torch.equal(
                _without_row(lm, spec.landmark_id), _without_row(out["tok_emb.weight"], spec.landmark_id)):
            out["lm_head.weight"] = out["tok_emb.weight"]  # tied: one tensor
    return out


def _without_row(w: torch.Tensor, row: int) -> torch.Tensor:
    return torch.cat([w[:row], w[row + 1:]])


def adapter_state(state: dict[str, torch.Tensor], spec: LoraSpec) -> dict[str, torch.Tensor]:
    """Only what training changed: LoRA A/B per target and the landmark row, under stable names
    (`layers.0.attn.wq.lora_A`, ..., `tok_emb.landmark_row`)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if f".lora_A.{_NAME}." in k or f".lora_B.{_NAME}." in k:
            out[k.replace(f".{_NAME}.weight", "")] = v
        elif k.endswith(_TOKENS_DELTA):
            out[k[: -len(_TOKENS_DELTA)] + ".landmark_row"] = v
    return out


def load_adapter_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor], spec: LoraSpec) -> None:
    """Copy an adapter's tensors (`adapter_state`'s names) into a model `apply_lora(spec)` made.
    Raises CheckpointMismatchError for a tensor the model has no place for, a place the
    adapter leaves empty, or a shape that differs."""
    from engine.errors import CheckpointMismatchError

    params = dict(model.named_parameters())
    wanted = {k for k in params if f".lora_A.{_NAME}." in k or f".lora_B.{_NAME}." in k or k.endswith(_TOKENS_DELTA)}
    placed = set()
    for name, t in tensors.items():
        if name.endswith(".landmark_row"):
            key = name[: -len(".landmark_row")] + _TOKENS_DELTA
        else:
            key = f"{name}.{_NAME}.weight"
        if key not in params:
            raise CheckpointMismatchError(f"adapter tensor {name}: this run's LoRA (rank {spec.rank}, targets "
                                          f"{list(spec.targets)}) has no {key}")
        if tuple(params[key].shape) != tuple(t.shape):
            raise CheckpointMismatchError(f"adapter tensor {name}: shape {tuple(t.shape)}, this run's LoRA has "
                                          f"{tuple(params[key].shape)} (rank {spec.rank})")
        with torch.no_grad():
            params[key].copy_(t.to(params[key].dtype))
        placed.add(key)
    if wanted - placed:
        raise CheckpointMismatchError(f"the adapter has no tensor for {sorted(wanted - placed)[:3]} "
                                      f"({len(wanted - placed)} in all) of this run's LoRA")


def write_adapter(directory: str | os.PathLike, state: dict[str, torch.Tensor], spec: LoraSpec, *,
                  base: str, model_config: dict[str, Any], base_fingerprint: str | None = None) -> Path:
    """The adapter of an adapted `state` as an adapter directory (`engine.adapter.save_adapter`).
    `base` is the model directory the adapter applies to (recorded as given); model_config the
    adapted model's ModelConfig."""
    return save_adapter(directory, adapter_state(state, spec), lora=spec.to_dict(), base=base,
                        model_config=model_config, base_fingerprint=base_fingerprint)
