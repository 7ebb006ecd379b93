"""Training killed with SIGKILL (no handler runs) and resumed: the losses equal an uninterrupted run's.

Two kills in one run, at points the child chooses itself (tests/train/_kill_child.py), so the
test never races a sleep: during step 5's backward (the checkpoint of step 4 is the newest
complete one), then, after resuming, while step 6's checkpoint is being written (DeepSpeed's
files and the weights are there, folio_meta.json is not: a half-written step folder that
resume must skip). A last `--resume` finishes the run; metrics.jsonl then holds the losses of
steps 1..8 and they equal those of a run never interrupted, exactly, as in
tests/train/test_loop.py's clean-interruption test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from train.checkpoint import META, find_checkpoint, list_checkpoints
from train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("_kill_child.py")
STEPS = 8


def _folio_train(out: Path, *extra: str, kill: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    args = ["train", "--preset", "smoke", "--steps", str(STEPS), "--save-every", "2", "--offload", "none",
            "--no-progress", "--out", str(out), *extra]
    cmd = [sys.executable, str(CHILD), *map(str, kill), *args] if kill else [sys.executable, "-m", "train.cli", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_sigkill_during_a_step_and_during_a_checkpoint_then_resume_matches_one_run(tmp_path):
    p = _folio_train(tmp_path / "full")  # the reference, run the same way (same threads, same process set-up)
    assert p.returncode == 0, p.stderr[-3000:]
    full = [r["loss"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl")]
    assert len(full) == STEPS
    out = tmp_path / "killed"

    # 1. killed inside step 5 (its 5th backward): step 4's checkpoint is the newest complete one
    p = _folio_train(out, kill=("backward", 5))
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert find_checkpoint(out).name == "step00000004"

    # 2. resumed, then killed while writing step 6's checkpoint (the first checkpoint this process writes)
    p = _folio_train(out, "--resume", kill=("write_model", 1))
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    half = out / "checkpoints" / "step00000006"
    assert half.is_dir() and (half / "model.safetensors").is_file() and not (half / META).exists()
    assert find_checkpoint(out).name == "step00000004", "resume would pick the half-written step folder"

    # 3. resumed again: from step 4 (the half-written step 6 is skipped, then rewritten), to the end
    p = _folio_train(out, "--resume")
    assert p.returncode == 0, p.stderr[-3000:]
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    resumed = [r["loss"] for r in records]
    diff = max(abs(a - b) for a, b in zip(full, resumed))
    assert resumed == full, f"losses differ from the uninterrupted run's: max diff {diff}"
    assert [c.name for c in list_checkpoints(out / "checkpoints")][-1] == f"step{STEPS:08d}"
    assert (half / META).is_file()  # step 6 was written again, completely
