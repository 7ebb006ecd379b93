"""What `folio plan` writes runs as it is: train a few steps with folio_train.json and
ds_config.json, ingest with folio_ingest.json, and the printed commands parse to the same."""

from __future__ import annotations

import dataclasses
import json
import math
import shlex

import pytest

from engine.config import ModelConfig, preset
from plan.planner import PlanRequest, make_plan

# the smoke preset's model: one layer, seconds per step
SMALL = dict(n_layers=1, d_model=64, ffn_hidden=128, max_seq_len=128, block_len=32)


def _plan(tmp_path, mode: str, **kw):
    model = tmp_path / "model.json"
    model.write_text(json.dumps(preset("tiny", **SMALL).to_dict()))
    out = tmp_path / "plan"
    rep = make_plan(PlanRequest(model=str(model), mode=mode, context=4096, precision="fp32", global_batch=2,
                                out_dir=str(out), plot=False, **kw))
    return rep, out


def _run_fields(tcfg, out):
    """Only where and how long: everything the plan chose stays as written."""
    from train.config import TrainConfig

    return TrainConfig.from_dict({**tcfg.to_dict(), "max_steps": 2, "warmup_steps": 1, "save_every": 0,
                                  "synthetic_chars": [150, 400], "out_dir": str(out)})


@pytest.fixture(scope="module")
def train_plan(tmp_path_factory):
    return _plan(tmp_path_factory.mktemp("train_plan"), "train")


def test_written_train_config_holds_every_choice(train_plan):
    from train.cli import build_parser
    from train.commands import train_config_from_args
    from train.config import TrainConfig

    rep, out = train_plan
    s = rep.result.chosen.settings
    tc = TrainConfig.load_json(out / "folio_train.json")
    assert (tc.micro_batch, tc.grad_accum, tc.window, tc.precision) == (s.micro_batch, s.grad_accum, s.window, "fp32")
    assert (tc.attention_impl, tc.activation_checkpointing) == (s.attention_impl, s.activation_checkpointing)
    assert tc.retrieval == (s.top_k > 0) and tc.retrieval_top_k == s.top_k
    assert (tc.store_device_budget_bytes, tc.store_host_budget_bytes) == (s.device_tier_bytes, s.host_tier_bytes)
    assert not (out / "folio_ingest.json").exists()
    # the printed command sets the same TrainConfig
    cmd = json.loads((out / "folio_plan.json").read_text())["train_command"]
    tc2 = train_config_from_args(build_parser().parse_args(shlex.split(cmd)[1:]))
    for f in ("model", "model_overrides", "micro_batch", "grad_accum", "window", "precision", "retrieval",
              "retrieval_top_k", "attention_impl", "activation_checkpointing", "store_device_budget_bytes",
              "store_host_budget_bytes"):
        assert getattr(tc2, f) == getattr(tc, f), f


def test_train_runs_the_written_config(train_plan, tmp_path):
    from train.config import TrainConfig
    from train.loop import DSOptions, train

    rep, out = train_plan
    tc = _run_fields(TrainConfig.load_json(out / "folio_train.json"), tmp_path / "a")
    ds = DSOptions(config=str(out / "ds_config.json"))
    res = train(tc, ds=ds, progress=False)
    assert res.step == 2 and all(math.isfinite(x) for x in res.losses)
    # recomputing the layers in backward gives the same steps; the blockwise kernel runs too
    ck = train(dataclasses.replace(tc, activation_checkpointing=True, out_dir=str(tmp_path / "b")), ds=ds,
               progress=False)
    assert ck.losses == pytest.approx(res.losses, rel=1e-5)
    bw = train(dataclasses.replace(tc, attention_impl="blockwise", out_dir=str(tmp_path / "c")), ds=ds,
               progress=False)
    assert bw.losses == pytest.approx(res.losses, rel=1e-3)


def test_ingest_runs_the_written_config(tmp_path):
    import torch

    from engine.inference import ingest, open_store
    from engine.model import LandmarkTransformer
    from engine.retrieval import RetrievalConfig
    from engine.units import parse_bytes
    from memory_store import StoreConfig
    from train.cli import build_parser

    rep, out = _plan(tmp_path, "infer")
    s = rep.result.chosen.settings
    d = json.loads((out / "folio_ingest.json").read_text())
    rc = RetrievalConfig(**d["retrieval"])
    sc = StoreConfig(**d["store"], device="cpu", sync_mode="none")
    assert (rc.top_k, rc.chunk_len, sc.device_budget_bytes, sc.host_budget_bytes) == \
        (s.top_k, s.chunk, s.device_tier_bytes, s.host_tier_bytes)
    assert rc.local_blocks * 32 + rc.chunk_len == s.window
    cfg = ModelConfig.load_json(tmp_path / "model.json")
    torch.manual_seed(0)
    with open_store(str(tmp_path / "store"), cfg, "a", config=sc) as store:
        res = ingest(LandmarkTransformer(cfg).eval(), store, "doc", torch.randint(32, 127, (2000,)), retrieval=rc)
        assert res.blocks_put == len(store) > 0
        assert res.stats.peak_retrieved_bytes > 0 and res.stats.peak_window_bytes > 0
    # the printed options parse with `folio ingest`'s own parser into the same settings
    cmd = json.loads((out / "folio_plan.json").read_text())["ingest_command"]
    args = build_parser().parse_args(shlex.split(cmd)[1:] + ["--model", "m", "--store", "st", "f.txt"])
    assert (args.top_k, args.local_blocks, args.chunk) == (rc.top_k, rc.local_blocks, rc.chunk_len)
    assert parse_bytes(args.device_budget) == sc.device_budget_bytes
    assert parse_bytes(args.host_budget) == sc.host_budget_bytes


def test_train_config_validates_the_plan_fields():
    from train.config import TrainConfig

    with pytest.raises(ValueError, match="TrainConfig.attention_impl='sdpa'"):
        TrainConfig(attention_impl="sdpa")
    with pytest.raises(ValueError, match="TrainConfig.store_host_budget_bytes=-1"):
        TrainConfig(store_host_budget_bytes=-1)
    with pytest.raises(ValueError, match="TrainConfig.activation_checkpointing=1"):
        TrainConfig(activation_checkpointing=1)
    d = TrainConfig(attention_impl="blockwise", activation_checkpointing=True).to_dict()
    assert TrainConfig.from_dict(d).attention_impl == "blockwise"
