"""Checkpoint directories and exported models: safetensors for weights, JSON for configs.

A training checkpoint is a directory `<out_dir>/checkpoints/step00000100/` holding
DeepSpeed's own files (model + optimizer partitions, for `--resume`), plus Folio's:

    model.safetensors   full model weights (float32 unless the model's dtype says otherwise)
    config.json         the ModelConfig
    folio_meta.json     step, data position, TrainConfig, model fingerprint; written
                        last (atomically), so a directory without it is incomplete

An export is a directory with `model.safetensors` + `config.json` only (the format of
`engine/checkpoint.py`, which loads it into a model); `load_exported`
reads it without unpickling anything. Engine code that loads a model mirrors it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from engine.config import ModelConfig
from train.errors import CheckpointError, CheckpointMismatchError

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
META = "folio_meta.json"
CHECKPOINTS = "checkpoints"
FORMAT = "folio-model-v1"  # the format engine/checkpoint.py writes and reads
TIED_KEY = "lm_head.weight"  # dropped when tie_embeddings: it is tok_emb.weight
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_weights(directory: str | os.PathLike, state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> Path:
    """Write `model.safetensors` + `config.json` into `directory` (created if missing).

    The format is engine/checkpoint.py's: config.json = {"model": ModelConfig fields,
    "fingerprint": ...}; tensors cast to cfg.dtype; with tied embeddings the output
    projection (`lm_head.weight`, the embedding itself) is left out. Returns the directory.
    """
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    dtype = _DTYPES[cfg.dtype]
    tensors = {k: v.detach().to("cpu", dtype).contiguous().clone() for k, v in state_dict.items()
               if not (cfg.tie_embeddings and k == TIED_KEY)}
    tmp = d / (WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "fingerprint": cfg.fingerprint()})
    os.replace(tmp, d / WEIGHTS)
    meta = {"model": cfg.to_dict(), "fingerprint": cfg.fingerprint()}
    _atomic_write(d / CONFIG, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return d


def load_exported(directory: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read an exported model: (ModelConfig, state_dict of CPU tensors).

    With tied embeddings the state_dict has no `lm_head.weight` (load with strict=False
    and tie, as engine.checkpoint.load_model does).

    Raises CheckpointError when the directory, a file or a field is missing or broken,
    and CheckpointMismatchError when the weights were written for another config.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    d = Path(directory)
    for name in (CONFIG, WEIGHTS):
        if not (d / name).is_file():
            raise CheckpointError(f"{d}: no {name} (an exported model directory holds {WEIGHTS} + {CONFIG})")
    try:
        raw = json.loads((d / CONFIG).read_text())
        cfg = ModelConfig.from_dict(raw["model"] if "model" in raw else raw)
    except (json.JSONDecodeError, ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{d / CONFIG}: not a valid ModelConfig: {e}") from None
    if raw.get("fingerprint", cfg.fingerprint()) != cfg.fingerprint():
        raise CheckpointMismatchError(f"{d / CONFIG}: fingerprint {raw['fingerprint']} does not match "
                                      f"its own model fields ({cfg.fingerprint()}); the file was edited")
    try:
        with safe_open(str(d / WEIGHTS), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(d / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{d / WEIGHTS}: cannot be read: {e}") from None
    fp = meta.get("fingerprint")
    if fp is not None and fp != cfg.fingerprint():
        raise CheckpointMismatchError(f"{d}: {WEIGHTS} was written for model fingerprint {fp}, "
                                      f"but {CONFIG} describes {cfg.fingerprint()}")
    return cfg, state


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
ADAPTER_FILES = ("adapter.safetensors", "adapter_config.json")


def export_from_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, *,
                           adapter_only: bool = False) -> Path:
    """Copy a training checkpoint's weights + config (+ tokenizer and adapter files when it
    has them) into an export directory.

    `checkpoint` is a run's out_dir, its checkpoints/ folder, one step folder, or a model
    directory; the newest complete checkpoint is taken. adapter_only: the LoRA adapter and
    the tokenizer files alone (`engine.adapter` loads them on top of the base model). The
    copy is re-read to check it. Returns `out`.
    """
    src = Path(checkpoint)
    model_dir = ((src / CONFIG).is_file() or (src / ADAPTER_FILES[1]).is_file()) and not (src / META).is_file() \
        and not src.name.startswith("step")  # a step folder without its meta is incomplete
    step_dir = src if model_dir else find_checkpoint(src)
    if adapter_only:
        if not all((step_dir / n).is_file() for n in ADAPTER_FILES):
            raise CheckpointError(f"{step_dir}: no LoRA adapter ({' + '.join(ADAPTER_FILES)}); it comes from a "
                                  f"run with lora_rank > 0")
        names = [*ADAPTER_FILES, *(n for n in TOKENIZER_FILES if (step_dir / n).is_file())]
    else:
        load_exported(step_dir)  # refuse to export something unreadable
        names = [WEIGHTS, CONFIG, *(n for n in (*TOKENIZER_FILES, *ADAPTER_FILES) if (step_dir / n).is_file())]
    o = Path(out)
    o.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(step_dir / name, o / (name + ".tmp"))
        os.replace(o / (name + ".tmp"), o / name)
    if adapter_only:
        from engine.adapter import read_adapter

        read_adapter(o)
    else:
        load_exported(o)
    return o


# ---------------------------------------------------------------------------- training checkpoints


def step_tag(step: int) -> str:
    return f"step{step:08d}"


def write_meta(step_dir: str | os.PathLike, meta: dict[str, Any]) -> None:
    """Write folio_meta.json last and atomically: it marks the checkpoint complete."""
    _atomic_write(Path(step_dir) / META, json.dumps(meta, indent=2, sort_keys=True) + "\n")


def read_meta(step_dir: str | os.PathLike) -> dict[str, Any]:
    p = Path(step_dir) / META
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{step_dir}: incomplete checkpoint (no {META})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p}: malformed JSON: {e.msg}") from None


def list_checkpoints(checkpoints_dir: str | os.PathLike) -> list[Path]:
    """Complete step checkpoints under a checkpoints/ folder, oldest first."""
    d = Path(checkpoints_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith("step") and (p / META).is_file())


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The step folder to resume or export from.

    `path` may be a step folder, a checkpoints/ folder or a run's out_dir (the newest
    complete checkpoint is taken). Raises CheckpointError when there is none.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path {str(p)!r} does not exist")
    if (p / META).is_file():
        return p
    for d in (p / CHECKPOINTS, p):
        found = list_checkpoints(d)
        if found:
            return found[-1]
    raise CheckpointError(f"{p}: no complete checkpoint found (looked for */{META})")


def check_model_matches(step_dir: str | os.PathLike, cfg: ModelConfig) -> dict[str, Any]:
    """Read a checkpoint's meta and refuse it if its model differs from `cfg`.

    Returns the meta. Raises CheckpointMismatchError naming the differing fields.
    """
    meta = read_meta(step_dir)
    theirs = meta.get("model_config", {})
    mine = cfg.to_dict()
    diff = sorted(k for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k))
    if diff:
        a = ", ".join(f"{k}={theirs.get(k)!r}" for k in diff)
        b = ", ".join(f"{k}={mine.get(k)!r}" for k in diff)
        raise CheckpointMismatchError(f"{step_dir}: checkpoint was written by a model with {a}; "
                                      f"this run builds {b}")
    return meta


def prune_checkpoints(checkpoints_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (keep=0: keep all)."""
    if keep <= 0:
        return
    for old in list_checkpoints(checkpoints_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
