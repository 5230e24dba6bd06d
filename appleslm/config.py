"""Typed run configuration: YAML presets in `configs/`, strict keys, `section.key=value` overrides.

A run config has three sections. `model` is the architecture's own `ModelArgs` (the dataclass that
also lives in every saved `config.json`), `data` says where text comes from and `train` how to
optimise. Unknown keys are errors everywhere, because a misspelt key silently ignored wastes a
training run.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import types
import typing
from dataclasses import dataclass, field
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import yaml

from appleslm.models.appleslm import ModelArgs


class ConfigError(ValueError):
    """A configuration that cannot be used, with a message that says what to fix."""


@dataclass
class DataConfig:
    source: str = "default"  # "default" (bundled corpus), a file, a folder, or "hf:owner/dataset"
    text_field: str = "text"  # the field holding text in JSONL records
    tokenizer: str | None = None  # a tokenizer.json path or a model dir/Hub repo; None trains one
    val_fraction: float = 0.05  # share of documents held out for validation
    shuffle_buffer: int = 10000  # sequences in the seeded shuffle buffer (Leviathan's recipe)
    seed: int = 0
    cache_dir: str | None = None  # token cache; default ~/.cache/appleslm/tokens


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16  # sequences per optimizer step, across all ranks and accumulation
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of the peak (MobileLLM: 0.1)
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    dtype: str = "float32"  # "float32" or "bfloat16"
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 20
    save_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    compile: bool = True


@dataclass
class RunConfig:
    model: ModelArgs
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {"model": ModelArgs, "data": DataConfig, "train": TrainConfig}


def preset_dir() -> Traversable:
    """The presets: the repository's `configs/`, installed as the package data `appleslm.configs`."""
    return importlib.resources.files("appleslm.configs")


def find_config(name_or_path: str | Path) -> Path:
    """A YAML file given by path, or a preset name from `configs/` (`tiny`, `mobilellm-125m`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    preset = preset_dir() / f"{name_or_path}.yaml"
    if preset.is_file():
        return Path(str(preset))
    known = ", ".join(list_presets())
    raise ConfigError(f"no config file or preset named {str(name_or_path)!r} (presets: {known})")


def list_presets() -> list[str]:
    return sorted(
        p.name.removesuffix(".yaml") for p in preset_dir().iterdir() if p.name.endswith(".yaml")
    )


def load_config(name_or_path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    path = find_config(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with sections {sorted(SECTIONS)}")
    for item in overrides or []:
        apply_override(raw, item)
    return config_from_dict(raw, source=str(path))


def config_from_dict(raw: dict[str, Any], source: str = "config") -> RunConfig:
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise ConfigError(
            f"{source}: unknown section(s) {sorted(unknown)}; known: {sorted(SECTIONS)}"
        )
    if "model" not in raw:
        raise ConfigError(f"{source}: a 'model' section is required")
    sections = {
        name: build_dataclass(cls, raw.get(name) or {}, f"{source}: {name}")
        for name, cls in SECTIONS.items()
    }
    return RunConfig(**sections)


def build_dataclass(cls: type, values: dict[str, Any], where: str) -> Any:
    """Instantiate `cls` from `values`, refusing unknown keys and values of the wrong type."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    checked = {k: check_type(v, hints[k], f"{where}.{k}") for k, v in values.items()}
    try:
        return cls(**checked)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e


def check_type(value: Any, hint: Any, where: str) -> Any:
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    for t in allowed:
        if t is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if t is float and isinstance(value, str):
            try:  # YAML 1.1 reads `1e-3` (no dot) as a string
                return float(value)
            except ValueError:
                pass
        if t is type(None) or not isinstance(t, type):
            continue
        if isinstance(value, t) and not (t is int and isinstance(value, bool)):
            return value
    names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise ConfigError(f"{where}: expected {names}, got {value!r}")


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one `section.key=value` override; the value is parsed as YAML (`1e-3`, `true`, ...)."""
    key, sep, text = item.partition("=")
    section, dot, name = key.partition(".")
    if not sep or not dot or not name:
        raise ConfigError(
            f"override {item!r} must look like section.key=value, e.g. train.steps=100"
        )
    if section not in SECTIONS:
        raise ConfigError(
            f"override {item!r}: unknown section {section!r}; known: {sorted(SECTIONS)}"
        )
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: cannot parse value: {e}") from e
    raw.setdefault(section, {})
    raw[section][name] = value
