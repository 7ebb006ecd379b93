"""TrainConfig validation, presets and round trips."""

from __future__ import annotations

import pytest

from train.config import TRAIN_PRESETS, TrainConfig, train_preset


def test_precision_is_a_literal_checked_at_run_time():
    import typing

    from train import config

    hint = typing.get_type_hints(TrainConfig, vars(config))["precision"]
    assert typing.get_args(hint) == config.PRECISIONS == ("auto", "fp32", "bf16", "fp16")


def test_defaults_and_window():
    c = TrainConfig()
    assert c.window == c.model_config().max_seq_len == 512
    assert TrainConfig(window_len=256).window == 256


@pytest.mark.parametrize("field,value,needle", [
    ("model", "huge", "TrainConfig.model='huge'"),
    ("micro_batch", 0, "TrainConfig.micro_batch=0"),
    ("lr", 0.0, "TrainConfig.lr=0.0"),
    ("precision", "fp8", "TrainConfig.precision='fp8'"),
    ("window_len", 100, "multiple of block_len=64"),
    ("window_len", 1024, "max_seq_len=512"),
    ("data", (), "TrainConfig.data"),
    ("data_weights", (1.0,), "one weight per source"),
    ("synthetic_chars", (500, 100), "min <= max"),
    ("min_lr_ratio", 2.0, "[0, 1]"),
    ("retrieval_sink_blocks", -1, "TrainConfig.retrieval_sink_blocks=-1"),
])
def test_invalid_fields_name_field_and_value(field, value, needle):
    with pytest.raises(ValueError, match="is invalid") as e:
        TrainConfig(**{field: value})
    assert needle in str(e.value)


def test_bad_model_override_is_a_value_error():
    with pytest.raises(ValueError, match="ModelConfig.d_model=128 is invalid"):
        TrainConfig(model_overrides={"n_heads": 3})


def test_unknown_preset():
    with pytest.raises(ValueError, match="train preset='nope' does not exist; allowed"):
        train_preset("nope")


@pytest.mark.parametrize("name", sorted(TRAIN_PRESETS))
def test_presets_build_and_round_trip(name, tmp_path):
    c = train_preset(name)
    c.save_json(tmp_path / "c.json")
    assert TrainConfig.load_json(tmp_path / "c.json") == c


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown fields"):
        TrainConfig.from_dict({"steps": 3})
