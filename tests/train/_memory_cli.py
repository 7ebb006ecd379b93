"""The command-line round trip the memory tests share: train a preset briefly, export it,
ingest a document, and ask in another process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from train.cli import main

ROOT = Path(__file__).resolve().parents[2]
QUESTION = "What is the pass key?"


def train_export_ingest(tmp_path: Path, preset: str, *, micro_batch: int, doc_text: str) -> tuple[Path, Path]:
    """`folio train --preset P --steps 2` -> export -> ingest doc.txt; returns (model dir, store)."""
    out, model, store = tmp_path / "run", tmp_path / "m", tmp_path / "store"
    assert main(["train", "--preset", preset, "--steps", "2", "--micro-batch", str(micro_batch), "--offload", "none",
                 "--no-progress", "--out", str(out)]) == 0
    assert main(["export", str(out), "--out", str(model)]) == 0
    doc = tmp_path / "doc.txt"
    doc.write_text(doc_text)
    assert main(["ingest", "--model", str(model), "--store", str(store), str(doc), "--no-progress"]) == 0
    return model, store


def ask_in_another_process(model: Path, store: Path) -> None:
    """`folio ask` in a fresh interpreter succeeds against the store."""
    proc = subprocess.run([sys.executable, "-m", "train.cli", "ask", "--model", str(model), "--store", str(store),
                           QUESTION, "--max-tokens", "5"],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
