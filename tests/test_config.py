"""Presets, strict config keys and overrides, and `appleslm info`."""

import json

import pytest

from appleslm.cli import main
from appleslm.config import ConfigError, list_presets, load_config
from appleslm.models import Model, parameter_counts


def info(preset: str) -> dict:
    return parameter_counts(Model(load_config(preset).model))


@pytest.mark.parametrize(
    "preset, millions",
    [
        ("mobilellm-125m", 124.6),
        ("mobilellm-125m-ls", 124.6),
        ("mobilellm-350m", 345.3),
        ("mobilellm-350m-ls", 345.3),
    ],
)
def test_mobilellm_presets_reproduce_the_papers_counts(preset, millions):
    counts = info(preset)
    assert abs(counts["params_total"] / 1e6 - millions) <= 0.1
    repeat = 2 if preset.endswith("-ls") else 1
    assert counts["layers_executed"] == repeat * counts["layers_unique"]


def test_leviathan_presets_keep_the_body_and_swap_the_input_table():
    dense, lev = info("mobilellm-125m"), info("leviathan-125m")
    assert lev["params_non_embedding"] == dense["params_non_embedding"]
    # Untied V x D head plus a generator far smaller than a second table.
    assert dense["params_embedding"] < lev["params_embedding"] < 1.2 * dense["params_embedding"]
    assert lev["params_generator"] < 0.15 * dense["params_embedding"]


def test_tinyllama_preset_is_1_1b():
    assert abs(info("tinyllama-1.1b")["params_total"] / 1e9 - 1.1) < 0.01


def test_tiny_presets_are_at_most_two_million_parameters():
    tiny = [p for p in list_presets() if p.startswith("tiny-") or p == "tiny"]
    assert len(tiny) >= 3
    for preset in tiny:
        assert info(preset)["params_total"] <= 2_000_000, preset


def test_info_json_has_the_documented_keys(capsys):
    assert main(["info", "tiny-ls", "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    for key in (
        "params_total",
        "params_embedding",
        "params_non_embedding",
        "layers_unique",
        "layers_executed",
    ):
        assert isinstance(counts[key], int)
    assert counts["layers_executed"] == 2 * counts["layers_unique"]


def test_overrides_are_typed_and_applied():
    cfg = load_config("tiny", ["train.lr=1e-3", "model.layer_repeat=2", "data.tokenizer=null"])
    assert cfg.train.lr == 1e-3 and cfg.model.layer_repeat == 2 and cfg.data.tokenizer is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.lerning_rate=1"], r"unknown key\(s\) \['lerning_rate'\]"),
        (["optimizer.lr=1"], "unknown section"),
        (["train.steps=many"], "expected int"),
        (["train.steps"], "section.key=value"),
        (["model.hidden_size=130"], "not divisible by num_attention_heads"),
    ],
)
def test_bad_configs_fail_with_a_clear_message(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides)


def test_unknown_keys_in_a_yaml_file_are_errors(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  hidden_size: 64\n  num_attention_heads: 4\n  dropout: 0.1\n")
    with pytest.raises(ConfigError, match="dropout"):
        load_config(path)
    with pytest.raises(ConfigError, match="no config file or preset"):
        load_config(tmp_path / "missing.yaml")


def test_cli_reports_config_errors_without_a_traceback(capsys):
    assert main(["info", "tiny", "model.num_key_value_heads=3"]) == 2
    assert "must divide" in capsys.readouterr().err
