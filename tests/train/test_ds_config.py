"""ds_config.json: loading, validation, CLI overrides, and filling from the TrainConfig."""

from __future__ import annotations

import json

import pytest

from train.config import TrainConfig
from train.ds_engine import (apply_overrides, default_ds_config_path, load_ds_config, precision_of,
                             resolve_ds_config)
from train.errors import DSConfigError


def test_shipped_config_defaults_to_zero2_with_cpu_optimizer_offload():
    ds = load_ds_config(default_ds_config_path())
    zero = ds["zero_optimization"]
    assert zero["stage"] == 2
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert zero.get("offload_param", {}).get("device", "none") == "none"


def test_missing_file_names_it(tmp_path):
    p = tmp_path / "nope.json"
    with pytest.raises(DSConfigError, match=f"{p}: DeepSpeed config file does not exist"):
        load_ds_config(p)


def test_malformed_json_names_file_and_line(tmp_path):
    p = tmp_path / "ds.json"
    p.write_text('{\n  "zero_optimization": {"stage": 2,}\n}\n')
    with pytest.raises(DSConfigError, match=rf"{p}: malformed JSON: .* line 2"):
        load_ds_config(p)


@pytest.mark.parametrize("ds,needle", [
    ([1, 2], "must hold a JSON object"),
    ({"zero_optimization": {"stage": 5}}, "zero_optimization.stage=5"),
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, "needs zero_optimization.stage=3"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}, "needs zero_optimization.offload_param.nvme_path"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "gpu"}}}, "device='gpu' is invalid"),
    ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "both true"),
    ({"bf16": {"enabled": "yes"}}, "bf16.enabled must be"),
])
def test_invalid_contents_are_named(tmp_path, ds, needle):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(ds))
    with pytest.raises(DSConfigError, match=str(p)) as e:
        load_ds_config(p)
    assert needle in str(e.value)


BASE = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}


def test_overrides_select_stage3_param_offload_and_nvme():
    ds = apply_overrides(BASE, offload="param,optimizer")
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["offload_param"]["device"] == "cpu" and z["offload_optimizer"]["device"] == "cpu"
    ds = apply_overrides(BASE, zero_stage=3, offload="param", nvme_path="/nvme/x")
    z = ds["zero_optimization"]
    assert z["offload_param"] == {"device": "nvme", "nvme_path": "/nvme/x"}
    assert z["offload_optimizer"]["device"] == "none"
    ds = apply_overrides(BASE, nvme_path="/nvme/y")  # NVMe for what the config offloads
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "nvme", "nvme_path": "/nvme/y"}
    ds = apply_overrides(BASE, offload="none", zero_stage=0)
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "none"
    assert BASE["zero_optimization"]["offload_optimizer"]["device"] == "cpu"  # input untouched


@pytest.mark.parametrize("kw,needle", [
    ({"offload": "gpu"}, "--offload='gpu' is invalid"),
    ({"zero_stage": 2, "offload": "param"}, "needs zero_optimization.stage=3"),
    ({"zero_stage": 7}, "--zero-stage=7"),
])
def test_bad_overrides(kw, needle):
    with pytest.raises(DSConfigError) as e:
        apply_overrides(BASE, **kw)
    assert needle in str(e.value)


def test_resolve_fills_auto_fields_from_train_config():
    t = TrainConfig(micro_batch=3, grad_accum=2, lr=1e-3, weight_decay=0.1, grad_clip=0.5, precision="auto")
    ds = resolve_ds_config(load_ds_config(default_ds_config_path()), t, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 12
    assert ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["params"]["lr"] == 1e-3 and ds["optimizer"]["params"]["weight_decay"] == 0.1
    assert "torch_adam" not in ds["optimizer"]["params"]  # offloaded: DeepSpeed's CPU Adam
    assert precision_of(ds) == "fp32"  # no GPU here: precision follows the machine
    assert ds["zero_optimization"]["offload_optimizer"]["pin_memory"] is False


def test_resolve_uses_torch_adam_without_offload():
    ds = resolve_ds_config(apply_overrides(BASE, offload="none"), TrainConfig())
    assert ds["optimizer"]["params"]["torch_adam"] is True
    assert "offload_optimizer" not in ds["zero_optimization"]


@pytest.mark.parametrize("ds,tkw,needle", [
    ({"train_micro_batch_size_per_gpu": 8}, {"micro_batch": 4},
     "train_micro_batch_size_per_gpu=8 contradicts TrainConfig.micro_batch=4"),
    ({"gradient_accumulation_steps": 2}, {}, "gradient_accumulation_steps=2 contradicts TrainConfig.grad_accum=1"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}}, {"lr": 0.001}, "lr=0.1 contradicts TrainConfig.lr=0.001"),
    ({"bf16": {"enabled": True}}, {"precision": "fp32"}, "bf16.enabled=True contradicts TrainConfig.precision='fp32'"),
    ({"train_batch_size": 64}, {"micro_batch": 4}, "train_batch_size=64 contradicts"),
])
def test_contradictions_name_both_values(ds, tkw, needle):
    with pytest.raises(DSConfigError) as e:
        resolve_ds_config(ds, TrainConfig(**tkw), source="my_ds.json")
    assert needle in str(e.value) and "my_ds.json" in str(e.value)


def test_explicit_precision_wins_when_train_config_says_auto():
    assert precision_of(resolve_ds_config({"bf16": {"enabled": True}}, TrainConfig())) == "bf16"
    assert precision_of(resolve_ds_config({}, TrainConfig(precision="bf16"))) == "bf16"
    ds = resolve_ds_config({"train_micro_batch_size_per_gpu": 4}, TrainConfig(micro_batch=4))
    assert ds["train_micro_batch_size_per_gpu"] == 4  # agreeing values are fine
