"""The `folio` command line: train/export through main(), one-line errors with exit code 2."""

from __future__ import annotations

import json

import pytest

from train.cli import build_parser, main
from train.commands import train_config_from_args
from train.config import TrainConfig


def test_root_parser_has_engine_and_train_commands():
    names = set(build_parser()._subparsers._group_actions[0].choices)
    assert {"store", "train", "export", "demo"} <= names


def test_train_options_build_the_train_config(tmp_path):
    args = build_parser().parse_args([
        "train", "--preset", "smoke", "--steps", "5", "--data", "recall", "--data", str(tmp_path),
        "--model-set", "n_layers=2", "--set", "lr=0.01", "--set", "synthetic_chars=[200, 300]",
        "--out", str(tmp_path / "o"), "--local_rank=0"])
    c = train_config_from_args(args)
    assert isinstance(c, TrainConfig)
    assert c.max_steps == 5 and c.lr == 0.01 and c.synthetic_chars == (200, 300)
    assert c.data == ("recall", str(tmp_path)) and c.data_weights is None
    assert c.model_config().n_layers == 2 and c.model_config().d_model == 64  # the preset's other overrides stay


@pytest.mark.parametrize("argv,needle", [
    (["train", "--preset", "nope"], "train preset='nope' does not exist"),
    (["train", "--model", "huge"], "TrainConfig.model='huge' is invalid"),
    (["train", "--preset", "smoke", "--data", "/no/such/dir"], "data path '/no/such/dir' does not exist"),
    (["train", "--preset", "smoke", "--ds-config", "/no/ds.json"], "/no/ds.json: DeepSpeed config file does not exist"),
    (["train", "--preset", "smoke", "--set", "steps"], "expected KEY=VALUE"),
    (["export", "/no/run", "--out", "/tmp/x"], "checkpoint path '/no/run' does not exist"),
])
def test_user_errors_are_one_line_with_exit_code_2(argv, needle, capsys, tmp_path):
    assert main(argv + (["--out", str(tmp_path / "o")] if argv[0] == "train" else [])) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_train_then_export_from_the_cli(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--preset", "smoke", "--steps", "2", "--offload", "none", "--no-progress",
                 "--out", str(out)]) == 0
    assert "step 2: loss" in capsys.readouterr().out
    assert main(["export", str(out), "--out", str(tmp_path / "exp")]) == 0
    cfg = json.loads((tmp_path / "exp" / "config.json").read_text())
    assert cfg["model"]["n_layers"] == 1


def test_sigterm_checkpoints_and_exits_143(tmp_path):
    """A real signal to a real `folio train` process: it finishes the step, saves, exits 143."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from train.checkpoint import find_checkpoint, read_meta

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.Popen([sys.executable, "-m", "train.cli", "train", "--preset", "smoke", "--steps", "100000",
                             "--save-every", "0", "--offload", "none", "--no-progress", "--out", str(out)],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    try:
        stdout, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 143, stderr[-2000:]
    assert "stopped by SIGTERM" in stdout and "--resume" in stdout
    meta = read_meta(find_checkpoint(out))
    assert meta["step"] >= 2 and meta["step"] == metrics.read_text().count("\n")


def test_the_shipped_checkpoints_documented_commands_still_train(tmp_path):
    """The commands of models/passkey-tiny/README.md and models/passkey-tiny-prose/README.md,
    shortened: stage 1 (stopped early, as the documented run stops at step 1250), export, stage 2
    from that export with retrieval, then stages 3 and 3b on real prose, each from the previous
    stage's export."""
    from train.metrics import read_metrics

    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    common = ["--no-progress", "--offload", "none"]
    assert main(["train", "--preset", "passkey-tiny", "--steps", "40", "--stop-after", "6", "--out", str(s1),
                 *common]) == 0
    losses = [r["loss"] for r in read_metrics(s1 / "metrics.jsonl")]
    assert len(losses) == 6 and all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.2, losses
    assert main(["export", str(s1), "--out", str(s1 / "export")]) == 0
    assert main(["train", "--preset", "passkey-tiny-long", "--init-from", str(s1 / "export"), "--steps", "3",
                 "--micro-batch", "4", "--out", str(s2), *common]) == 0
    recs = read_metrics(s2 / "metrics.jsonl")
    assert len(recs) == 3 and all(r["loss"] == r["loss"] for r in recs)  # finite
    assert sum(sum(r["pulled_bytes"].values()) for r in recs) > 0  # stage 2 retrieves from the store
    # stages 3 and 3b (real prose filler, then the mix with number distractors), each from the last export
    prev = s2
    for preset in ("passkey-tiny-prose", "passkey-tiny-prose-mix"):
        assert main(["export", str(prev), "--out", str(prev / "export")]) == 0
        out = tmp_path / preset
        assert main(["train", "--preset", preset, "--init-from", str(prev / "export"), "--steps", "2",
                     "--micro-batch", "2", "--out", str(out), *common]) == 0
        recs = read_metrics(out / "metrics.jsonl")
        assert len(recs) == 2 and all(r["loss"] == r["loss"] for r in recs)
        prev = out


@pytest.mark.parametrize("argv,conf", [
    (["folio", "train", "--steps", "1"], True),
    (["folio", "--local_rank=0", "train"], True),  # the deepspeed launcher's option first
    (["folio", "--local_rank", "1", "demo"], True),
    (["folio", "ask", "--model", "m"], False),
    (["folio"], False),
])
def test_training_commands_reexecute_with_the_training_allocator_setting(argv, conf, monkeypatch, tmp_path):
    """`folio train` / `folio demo` re-execute with jemalloc keeping freed pages
    (engine.runtime.TRAINING_CONF); other commands with jemalloc's defaults."""
    import engine.runtime as allocator

    lib = tmp_path / "libjemalloc.so.2"
    lib.write_bytes(b"")
    for name in ("FOLIO_MALLOC_ACTIVE", "LD_PRELOAD", "MALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FOLIO_MALLOC", str(lib))
    monkeypatch.setattr("sys.argv", argv)

    class Reexec(Exception):
        pass

    def fake_execve(path, args, env):
        raise Reexec(env)

    monkeypatch.setattr(allocator.os, "execve", fake_execve)
    if not allocator.sys.platform.startswith("linux"):
        pytest.skip("the allocator switch is Linux only")
    with pytest.raises(Reexec) as got:
        main()
    env = got.value.args[0]
    assert env["LD_PRELOAD"] == str(lib)
    assert env.get("MALLOC_CONF") == (allocator.TRAINING_CONF if conf else None)
