"""Training checkpoints: step folders, their meta file, and exports from them.

A training checkpoint is a directory `<out_dir>/checkpoints/step00000100/` holding
DeepSpeed's own files (model + optimizer partitions, for `--resume`), a model directory's
files (`engine.checkpoint`'s format: model.safetensors + config.json, + tokenizer and LoRA
adapter files when the run has them), and

    folio_meta.json     step, data position, TrainConfig, model fingerprint; written
                        last (atomically), so a directory without it is incomplete

An export is a copy of a step folder's model files (`export_from_checkpoint`).
Errors are engine.errors' checkpoint errors (re-exported by `train.errors`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from engine.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter
from engine.checkpoint import CONFIG, WEIGHTS, read_json, read_model, write_json
from engine.config import ModelConfig
from engine.errors import CheckpointError, CheckpointMismatchError, CheckpointNotFoundError
from engine.tokenizer import TOKENIZER_CONFIG, TOKENIZER_FILE

META = "folio_meta.json"
CHECKPOINTS = "checkpoints"
TOKENIZER_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG)
ADAPTER_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG)


def is_model_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a model or adapter directory rather than a run, checkpoints/ or step
    folder (a step folder without its meta is an incomplete checkpoint, not a model)."""
    p = Path(path)
    return ((p / CONFIG).is_file() or (p / ADAPTER_CONFIG).is_file()) and not (p / META).is_file() \
        and not p.name.startswith("step")


def export_from_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, *,
                           adapter_only: bool = False) -> Path:
    """Copy a training checkpoint's weights + config (+ tokenizer and adapter files when it
    has them) into an export directory.

    `checkpoint` is a run's out_dir, its checkpoints/ folder, one step folder, or a model
    directory; the newest complete checkpoint is taken. adapter_only: the LoRA adapter and
    the tokenizer files alone (`engine.adapter` loads them on top of the base model). The
    copy is re-read to check it. Returns `out`. Raises CheckpointNotFoundError when there is
    no complete checkpoint, or what `read_model` / `read_adapter` raise for a broken one.
    """
    src = Path(checkpoint)
    step_dir = src if is_model_dir(src) else find_checkpoint(src)
    if adapter_only:
        if not all((step_dir / n).is_file() for n in ADAPTER_FILES):
            raise CheckpointError(f"{step_dir}: no LoRA adapter ({' + '.join(ADAPTER_FILES)}); it comes from a "
                                  f"run with lora_rank > 0")
        names = [*ADAPTER_FILES, *(n for n in TOKENIZER_FILES if (step_dir / n).is_file())]
    else:
        read_model(step_dir)  # refuse to export something unreadable
        names = [WEIGHTS, CONFIG, *(n for n in (*TOKENIZER_FILES, *ADAPTER_FILES) if (step_dir / n).is_file())]
    o = Path(out)
    o.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(step_dir / name, o / (name + ".tmp"))
        os.replace(o / (name + ".tmp"), o / name)
    if adapter_only:
        read_adapter(o)
    else:
        read_model(o)
    return o


# ---------------------------------------------------------------------------- training checkpoints


def step_tag(step: int) -> str:
    return f"step{step:08d}"


def write_meta(step_dir: str | os.PathLike, meta: dict[str, Any]) -> None:
    """Write folio_meta.json last and atomically: it marks the checkpoint complete."""
    write_json(Path(step_dir) / META, meta)


def read_meta(step_dir: str | os.PathLike) -> dict[str, Any]:
    """The meta of a step folder. Raises CheckpointError when it is missing (an incomplete
    checkpoint) or malformed."""
    p = Path(step_dir) / META
    if not p.is_file():
        raise CheckpointError(f"{step_dir}: incomplete checkpoint (no {META})")
    return read_json(p)


def list_checkpoints(checkpoints_dir: str | os.PathLike) -> list[Path]:
    """Complete step checkpoints under a checkpoints/ folder, oldest first."""
    d = Path(checkpoints_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith("step") and (p / META).is_file())


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The step folder to resume or export from.

    `path` may be a step folder, a checkpoints/ folder or a run's out_dir (the newest
    complete checkpoint is taken). Raises CheckpointNotFoundError when there is none.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointNotFoundError(f"checkpoint path {str(p)!r} does not exist")
    if (p / META).is_file():
        return p
    for d in (p / CHECKPOINTS, p):
        found = list_checkpoints(d)
        if found:
            return found[-1]
    raise CheckpointNotFoundError(f"{p}: no complete checkpoint found (looked for */{META})")


def check_model_matches(step_dir: str | os.PathLike, cfg: ModelConfig) -> dict[str, Any]:
    """Read a checkpoint's meta and refuse it if its model differs from `cfg`.

    Returns the meta. Raises CheckpointMismatchError naming the differing fields.
    """
    meta = read_meta(step_dir)
    diff = config_diff(meta.get("model_config", {}), cfg.to_dict())
    if diff:
        raise CheckpointMismatchError(f"{step_dir}: checkpoint was written by a model with {diff[0]}; "
                                      f"this run builds {diff[1]}")
    return meta


def config_diff(theirs: dict[str, Any], mine: dict[str, Any]) -> tuple[str, str] | None:
    """None if the two model config dicts are equal, else each side's differing fields as
    'k=v, ...' (for an error naming them)."""
    diff = sorted(k for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k))
    if not diff:
        return None
    return (", ".join(f"{k}={theirs.get(k)!r}" for k in diff), ", ".join(f"{k}={mine.get(k)!r}" for k in diff))


def prune_checkpoints(checkpoints_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (keep=0: keep all)."""
    if keep <= 0:
        return
    for old in list_checkpoints(checkpoints_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
