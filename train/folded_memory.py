"""Folded context in training: each lane's document carries its previous window's per-layer
K/V from one step to the next (`engine.folded`, a reconstruction of arXiv 2405.04620).

`FoldedWindowMemory` implements the `train.windows.WindowMemory` hooks:
- a document starts: its lane has no carry (reset at document boundaries);
- before each step: the model gets a `FoldedMemory` over the lanes' carries, so every layer of
  the step's first folded window also attends to the previous step's last window at that layer;
- after the step: each lane keeps the step's last window's K/V (detached: stop-gradient across
  steps). A step of window_len = K x folded_window positions runs K folded windows in one
  forward with the graph kept across them: BPTT over K windows;
- a checkpoint: the live lanes' carries are written beside it (safetensors, one file per rank),
  and a resumed run reads them back, so it continues exactly as an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from engine.checkpoint import read_tensors, write_tensors
from engine.config import ModelConfig
from engine.folded import FoldedMemory
from train.windows import DocumentState, WindowMemory

CARRY_FILE = "folded_carry_rank{rank}.safetensors"


class FoldedWindowMemory(WindowMemory):
    """Per-lane folded carries for the training loop."""

    def __init__(self, cfg: ModelConfig, *, resume_dir: str | Path | None = None, rank: int = 0):
        if not cfg.folded_window:
            raise ValueError("FoldedWindowMemory needs a model with folded_window > 0")
        self.cfg, self.rank = cfg, rank
        self._mem: FoldedMemory | None = None
        self._saved: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        if resume_dir is not None:
            self._saved = _read_carries(Path(resume_dir) / CARRY_FILE.format(rank=rank), cfg.n_layers)

    def begin_document(self, state: DocumentState) -> None:
        # a resumed lane in mid-document continues from its checkpointed carry
        state.memory = self._saved.pop(state.draw, None) if state.window > 0 else None
        if state.window > 0 and state.memory is None:
            raise RuntimeError(f"resuming document {state.name!r} at window {state.window}: its folded carry "
                               f"is not in the checkpoint ({CARRY_FILE.format(rank=self.rank)})")

    def for_step(self, states: list[DocumentState]) -> Any:
        self._mem = FoldedMemory(self.cfg, lanes=[s.memory for s in states])
        return self._mem

    def after_windows(self, states: list[DocumentState], windows: list[int]) -> None:
        mem = self._mem
        if mem is None:
            return
        mem.end_chunk()
        for b, st in enumerate(states):
            st.memory = mem.lane_carry(b)
        self._mem = None

    def end_document(self, state: DocumentState) -> None:
        state.memory = None

    def save_state(self, step_dir: Path, states: list[DocumentState | None]) -> None:
        tensors = {}
        for st in states:
            if st is None or st.done or st.memory is None:
                continue
            ks, vs = st.memory
            for layer, (k, v) in enumerate(zip(ks, vs)):
                tensors[f"{st.draw}.{layer}.k"] = k.detach().cpu().contiguous()
                tensors[f"{st.draw}.{layer}.v"] = v.detach().cpu().contiguous()
        write_tensors(Path(step_dir) / CARRY_FILE.format(rank=self.rank), tensors, {})


def _read_carries(path: Path, n_layers: int) -> dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]]:
    if not path.is_file():
        return {}
    flat, _ = read_tensors(path)
    out: dict[int, tuple[list, list]] = {}
    for draw in sorted({int(name.split(".")[0]) for name in flat}):
        out[draw] = ([flat[f"{draw}.{i}.k"] for i in range(n_layers)], [flat[f"{draw}.{i}.v"] for i in range(n_layers)])
    return out
