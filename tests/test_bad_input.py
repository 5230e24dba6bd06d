"""Bad input, by class: every user-facing command given an invalid value for any config key or flag
ends with exit 2 and a message naming what is wrong, never a traceback, and changes nothing on
disk. The invalid values are derived from each config class's own rule table, so a new key is
covered the moment it gets a rule."""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from pathlib import Path

import pytest

from appleslm.cli import main
from appleslm.config import AT_LEAST_1, DataConfig, Range, SFTConfig, TrainConfig
from tests.helpers import tree_hashes


def invalid_values(allowed: Range) -> list:
    """Values just outside `allowed`, plus the non-numbers a YAML file or shell can carry."""
    values: list = [".nan", ".inf", "abc"]
    if allowed.low is not None:
        values.append(allowed.low if allowed.low_open else allowed.low - 1)
    if allowed.high is not None:
        values.append(allowed.high if allowed.high_open else allowed.high + 1)
    return values


def cases(section: str, cls: type) -> list[tuple[str, object]]:
    ranges, choices = cls.rules()
    found = [
        (f"{section}.{key}", value) for key, r in ranges.items() for value in invalid_values(r)
    ]
    found += [(f"{section}.{key}", "bogus") for key in choices]
    return found


def refused(argv: list[str], capsys, *, names: str, untouched: list[Path]) -> str:
    before = [tree_hashes(path) for path in untouched]
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") <= 3, err  # one message, not a dump
    assert names.lower() in err.lower(), (names, err)
    assert [tree_hashes(path) for path in untouched] == before, argv
    return err


# The architecture file checks its own fields (it imports nothing of appleslm's): by hand.
MODEL_CASES = [
    (f"model.{key}", value)
    for key, values in {
        "vocab_size": [0, -1, "abc"],
        "hidden_size": [0, 1.5],
        "num_hidden_layers": [0],
        "layer_repeat": [0],
        "num_attention_heads": [0, -1, 3],  # 3 does not divide hidden_size 128
        "num_key_value_heads": [0, 3],
        "head_dim": [0],
        "intermediate_size": [0],
        "rms_norm_eps": [0, -1e-5, ".nan"],
        "rope_theta": [0, ".inf"],
        "max_position_embeddings": [0],
        "embedding": ["pixels"],
        "head": ["pixels"],
        "num_experts": [1, -2],
        "num_experts_per_tok": [0],
        "router_aux_loss_coef": [-1, ".nan"],
        "router_z_loss_coef": [-1],
        "generator_d_seed": [0],
        "generator_digits": [0],
        "generator_heads": [0],
        "generator_knots": [1],
        "generator_rank": [0],
        "byte_slots": [0],
        "byte_embedding_dim": [0],
        "byte_encoder_heads": [0, 3],
        "byte_encoder_widths": ["[0]"],
        "byte_encoder_ffn": ["[512]"],
        "byte_embedding_mode": ["bogus"],
        "byte_head_width": [0],
        "byte_head_layers": [0],
        "byte_head_ffn": [0],
        "byte_head_heads": [0, 3],
        "byte_head_loss": ["bogus"],
        "init_std": [0, -0.02],
        "tie_word_embeddings": ["maybe"],
        "share_ffn": ["maybe"],
    }.items()
    for value in values
]
PRETRAINING_CASES = cases("train", TrainConfig) + cases("data", DataConfig) + MODEL_CASES
PRETRAINING_CASES += [  # types and names the rule tables do not cover
    ("train.compile", "maybe"),
    ("train.dtype", 16),
    ("data.source", ""),
    ("train.unknown_key", 1),
    ("nosection.key", 1),
]


@pytest.mark.parametrize("override,value", PRETRAINING_CASES)
def test_train_refuses_every_invalid_setting(override, value, tmp_path, capsys):
    out = tmp_path / "run"
    refused(
        ["train", "tiny", f"{override}={value}", "--out", str(out), "--no-progress"],
        capsys,
        names=override.split(".")[-1],
        untouched=[tmp_path],
    )
    assert not out.exists()


@pytest.mark.parametrize("flag,value", [("--steps", "0"), ("--steps", "-3")])
def test_train_refuses_invalid_flags(flag, value, tmp_path, capsys):
    refused(
        ["train", "tiny", flag, value, "--out", str(tmp_path / "run")],
        capsys,
        names="steps",
        untouched=[tmp_path],
    )


@pytest.mark.parametrize("override,value", [("train.steps", 0), ("model.vocab_size", 0)])
def test_info_and_sweep_refuse_invalid_settings(override, value, tmp_path, capsys):
    refused(
        ["info", "tiny", f"{override}={value}"],
        capsys,
        names=override.split(".")[-1],
        untouched=[tmp_path],
    )
    sweep = tmp_path / "sweep.yaml"
    section, key = override.split(".")
    sweep.write_text(
        json.dumps(
            {"base": "tiny", "out": str(tmp_path / "runs"), "runs": {"a": {section: {key: value}}}}
        )
    )
    refused(["sweep", str(sweep)], capsys, names=key, untouched=[tmp_path])


SFT_CASES = cases("sft", SFTConfig) + [("sft.lora", "maybe"), ("train.lr", 1)]


@pytest.mark.parametrize("override,value", SFT_CASES)
def test_sft_refuses_every_invalid_setting(override, value, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "chat"
    argv = ["sft", str(tiny_model_dir), "--out", str(out), "--no-progress", f"{override}={value}"]
    refused(argv, capsys, names=override.split(".")[-1], untouched=[tmp_path, tiny_model_dir])
    assert not out.exists()


@pytest.mark.parametrize(
    "flag,value,names",
    [
        ("--steps", "0", "steps"),
        ("--lr", "-1", "lr"),
        ("--batch-size", "0", "batch_size"),
        ("--lora-rank", "0", "lora_rank"),
        ("--lora-layers", "0", "lora_layers"),
        ("--max-seq-len", "1", "max_seq_len"),
        ("--seed", "-1", "seed"),
        ("--data", "missing.jsonl", "missing.jsonl"),
    ],
)
def test_sft_refuses_invalid_flags(flag, value, names, tiny_model_dir, tmp_path, capsys):
    argv = ["sft", str(tiny_model_dir), "--out", str(tmp_path / "chat"), flag, value]
    refused(argv, capsys, names=names, untouched=[tmp_path, tiny_model_dir])


SAMPLING_CASES = [
    ("--temp", "-1", "temperature"),
    ("--temp", "nan", "temperature"),
    ("--top-p", "1.5", "top-p"),
    ("--top-k", "-1", "top-k"),
    ("--min-p", "1", "min-p"),
    ("--repetition-penalty", "0", "repetition penalty"),
    ("--max-tokens", "0", "max tokens"),
    ("--seed", "-1", "seed"),
]


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("flag,value,names", SAMPLING_CASES)
def test_generate_and_chat_refuse_invalid_sampling(
    command, flag, value, names, tiny_model_dir, tmp_path, capsys
):
    argv = [command, str(tiny_model_dir), flag, value]
    argv += ["--prompt", "The Congress"] if command == "generate" else []
    refused(argv, capsys, names=names, untouched=[tiny_model_dir])


def test_generate_refuses_an_empty_prompt(tiny_model_dir, capsys):
    refused(
        ["generate", str(tiny_model_dir), "--prompt", "  "],
        capsys,
        names="--prompt",
        untouched=[tiny_model_dir],
    )


def broken_models(root: Path, good: Path) -> dict[str, Path]:
    """One model directory per way a model directory can be wrong."""
    import shutil

    made = {}
    for name in ("truncated", "badconfig", "noweights"):
        made[name] = shutil.copytree(good, root / name)
    weights = made["truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    (made["badconfig"] / "config.json").write_text("{not json")
    (made["noweights"] / "model.safetensors").unlink()
    (root / "runs").mkdir()
    made["missing"] = root / "runs" / "missing"  # its folder exists: a local path, not a Hub id
    made["file"] = root / "a-file"
    made["file"].write_text("not a model")
    return made


MODEL_COMMANDS = {
    "generate": ["--prompt", "The Congress"],
    "sft": ["--out", "{tmp}/chat", "--steps", "1"],
    "quantize": ["--out", "{tmp}/q"],
    "export": ["--out", "{tmp}/e"],
    "push": ["me/model", "--dry-run"],
    "eval": ["--data", "{tmp}/text.txt"],
    "merge": ["--out", "{tmp}/merged"],
}


@pytest.mark.parametrize("command", list(MODEL_COMMANDS))
@pytest.mark.parametrize("kind", ["truncated", "badconfig", "noweights", "missing", "file"])
def test_every_model_command_refuses_a_broken_model(
    command, kind, tiny_model_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a Hub lookup would be a bug here
    (tmp_path / "text.txt").write_text("The Congress shall have power. " * 20)
    model = broken_models(tmp_path, tiny_model_dir)[kind]
    extra = [a.format(tmp=tmp_path) for a in MODEL_COMMANDS[command]]
    err = refused([command, str(model), *extra], capsys, names=model.name, untouched=[tmp_path])
    if kind == "missing":
        assert "no such model directory" in err


@pytest.mark.parametrize(
    "argv,names",
    [
        (["density", "{tmp}", "--sigma", "0"], "--sigma"),
        (["chat-data", "--out", "{tmp}/chat", "--val-fraction", "1.5"], "--val-fraction"),
        (["import-gguf", "{tmp}/missing.gguf", "--out", "{tmp}/m"], "missing.gguf"),
        (["import-gguf", "{tmp}/missing.gguf", "--out", "{tmp}/m", "--dtype", "int8"], "--dtype"),
        (["sweep", "{tmp}/missing.yaml"], "missing.yaml"),
        (["sweep", "{tmp}/sweep.yaml", "--procs", "0"], "--procs"),
        (["sweep", "{tmp}/sweep.yaml", "--procs", "3"], "--procs 3 does not divide"),
        (["sweep", "{tmp}/seeds.yaml"], "seeds must be"),
        (["info", "no-such-preset"], "no-such-preset"),
        (["push", "{model}", "not a repo id", "--dry-run"], "repo id"),
        (["quantize", "{model}", "--out", "{model}"], "--overwrite"),
        (["export", "{model}", "--out", "{tmp}/a-file"], "not a directory"),
        (["merge", "--out", "{tmp}/m"], "nothing to merge"),
        (["merge", "{model}", "--out", "{model}"], "ingredients"),
        (["merge", "{model}", "{model}", "--out", "{tmp}/m", "--weights", "1"], "--weights"),
        (["merge", "{model}", "--out", "{tmp}/m", "--weights", "-1"], "positive sum"),
        (["merge", "{model}", "--out", "{tmp}/m", "--greedy"], "--eval-data"),
        (["merge", "{model}", "--out", "{tmp}/m", "--last", "2"], "not a finished training run"),
        (["merge", "{model}", "--out", "{tmp}/m", "--config", "{tmp}/a-file"], "--config"),
        (["merge", "--out", "{tmp}/m", "--config", "{tmp}/a-file"], "a-file"),
        (["merge", "{model}", "--out", "{tmp}/m", "--eval-data", "{tmp}/none"], "none"),
        (
            ["generate", "{model}", "--prompt", "x", "--draft", "{model}", "--draft-tokens", "0"],
            "--draft-tokens",
        ),
        (["generate", "{model}", "--prompt", "x", "--alpha", "2"], "--proxy"),
        (["generate", "{model}", "--prompt", "x", "--proxy", "{model}", "{tmp}/none"], "none"),
        (
            [
                "generate",
                "{model}",
                "--prompt",
                "x",
                "--proxy",
                "{model}",
                "{model}",
                "--alpha",
                "nan",
            ],
            "--alpha",
        ),
        (["chat", "--draft", "{model}"], "MODEL"),
        (["chat", "{model}", "{model}", "{model}"], "two for a side-by-side arena"),
        (["chat", "{model}", "--one-at-a-time"], "two models"),
    ],
)
def test_other_commands_refuse_bad_arguments(argv, names, tiny_model_dir, tmp_path, capsys):
    (tmp_path / "a-file").write_text("mine")
    runs = f"out: {tmp_path / 'runs'}\nruns: {{a: {{train: {{steps: 1}}}}}}\n"
    (tmp_path / "sweep.yaml").write_text(runs)
    (tmp_path / "seeds.yaml").write_text(runs + "seeds: [1, 1]\n")
    argv = [a.format(tmp=tmp_path, model=tiny_model_dir) for a in argv]
    refused(argv, capsys, names=names, untouched=[tmp_path, tiny_model_dir])


def test_the_rule_tables_cover_every_numeric_setting():
    """A numeric setting without a rule (or, for the model, a row) would escape the tests."""
    from appleslm.models import ModelArgs

    model_keys = {key.split(".")[1] for key, _ in MODEL_CASES}
    fields = {f.name for f in dataclasses.fields(ModelArgs) if f.name != "model_type"}
    assert fields == model_keys, fields ^ model_keys
    for cls in (DataConfig, TrainConfig, SFTConfig):
        ranges, _ = cls.rules()
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            numeric = hints[f.name] in (int, float, int | None, float | None)
            if numeric:
                assert f.name in ranges, f"{cls.__name__}.{f.name} has no range rule"
    assert not AT_LEAST_1.holds(math.inf) and not AT_LEAST_1.holds(math.nan)
