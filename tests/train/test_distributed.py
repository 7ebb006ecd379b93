"""Two processes under torchrun and under the deepspeed launcher (gloo on CPU): same model,
disjoint documents, one checkpoint."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from engine.checkpoint import read_model
from train.checkpoint import find_checkpoint, read_meta
from train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    # torchrun's --master_port 0 hangs with the static rendezvous: give it a real one
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_two_process_run(launcher, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    args = ["-m", "train.cli", "train", "--preset", "smoke", "--steps", "3", "--offload", "none",
            "--no-progress", "--out", str(out)]
    port = str(_free_port())
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port, *args]
    else:
        ds = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or shutil.which("deepspeed")
        if ds is None:
            pytest.skip("the deepspeed launcher script is not installed")
        # the launcher appends --local_rank=N before the command; --module runs train.cli
        cmd = [ds, "--num_gpus", "2", "--master_port", port, "--module", *args[1:]]
    # own session: on a timeout the whole group (launcher and workers) is killed, no orphans
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{launcher} run timed out:\n{stdout[-2000:]}\n{stderr[-2000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    records = read_metrics(out / "metrics.jsonl")  # written by rank 0 only
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["tokens"] > 256 for r in records)  # both processes' tokens are counted
    meta = read_meta(find_checkpoint(out))
    assert meta["world_size"] == 2 and len(meta["ranks"]) == 2
    lanes0 = {ln["draw"] for ln in meta["ranks"][0]["data"]["lanes"] if ln}
    lanes1 = {ln["draw"] for ln in meta["ranks"][1]["data"]["lanes"] if ln}
    assert lanes0 and lanes1 and not lanes0 & lanes1  # each process trains its own documents
    cfg, state = read_model(find_checkpoint(out))
    assert cfg.n_layers == 1 and state
