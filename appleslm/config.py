"""Typed run configuration: YAML presets in `configs/`, strict keys, `section.key=value` overrides.

A run config has three sections. `model` is the architecture's own `ModelArgs` (the dataclass that
also lives in every saved `config.json`), `data` says where text comes from and `train` how to
optimise. Unknown keys are errors everywhere, because a misspelt key silently ignored wastes a
training run.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import types
import typing
from dataclasses import dataclass, field
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, ClassVar

import yaml

from appleslm.errors import AppleslmError
from appleslm.models.appleslm import ModelArgs


class ConfigError(AppleslmError, ValueError):
    """A configuration that cannot be used, with a message that says what to fix."""


@dataclass(frozen=True)
class Range:
    """The values a numeric setting may take: [low, high], either end open or absent."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:
        if not math.isfinite(value):  # NaN and infinities mean nothing as settings
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '≥'} {self.low:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{self.low:g}, {self.high:g}{right}"


POSITIVE = Range(0, low_open=True)
AT_LEAST_0 = Range(0)
AT_LEAST_1 = Range(1)
FRACTION = Range(0, 1)
OPEN_FRACTION = Range(0, 1, high_open=True)


class Checked:
    """A config dataclass whose fields are checked on creation against the class's `RANGES`
    (numbers) and `CHOICES` (one of a few values), merged over its base classes; any other
    rule goes in `check`. A bad value is a ValueError that names the field."""

    RANGES: ClassVar[dict[str, Range]] = {}
    CHOICES: ClassVar[dict[str, tuple]] = {}

    @classmethod
    def rules(cls) -> tuple[dict[str, Range], dict[str, tuple]]:
        ranges: dict[str, Range] = {}
        choices: dict[str, tuple] = {}
        for klass in reversed(cls.__mro__):
            ranges.update(vars(klass).get("RANGES", {}))
            choices.update(vars(klass).get("CHOICES", {}))
        return ranges, choices

    def __post_init__(self) -> None:
        ranges, choices = self.rules()
        for name, allowed in ranges.items():
            value = getattr(self, name)
            if value is not None and not allowed.holds(value):
                raise ValueError(f"{name} must be {allowed}, got {value!r}")
        for name, options in choices.items():
            if getattr(self, name) not in options:
                raise ValueError(
                    f"{name} must be one of {', '.join(map(str, options))}, "
                    f"got {getattr(self, name)!r}"
                )
        self.check()

    def check(self) -> None:
        """Rules that tie fields together."""


@dataclass
class DataConfig(Checked):
    source: str = "default"  # "default" (bundled corpus), a file, a folder, or "hf:owner/dataset"
    text_field: str = "text"  # the field holding text in JSONL records
    tokenizer: str | None = None  # a tokenizer.json path or a model dir/Hub repo; None trains one
    val_fraction: float = 0.05  # share of documents held out for validation
    shuffle_buffer: int = 10000  # sequences in the seeded shuffle buffer (Leviathan's recipe)
    seed: int = 0
    cache_dir: str | None = None  # token cache; default ~/.cache/appleslm/tokens

    RANGES = {"val_fraction": OPEN_FRACTION, "shuffle_buffer": AT_LEAST_1, "seed": AT_LEAST_0}

    def check(self) -> None:
        for name in ("source", "text_field", "tokenizer", "cache_dir"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise ValueError(f"{name} is empty")


@dataclass
class LoopConfig(Checked):
    """The training loop's settings, shared by pretraining and chat fine-tuning."""

    steps: int = 1000
    batch_size: int = 16  # sequences per optimizer step, across all ranks and accumulation
    grad_accum: int = 1  # micro-batches per optimizer step
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
    eval_batches: int = 20  # validation batches per evaluation; 0: the whole held-out set
    save_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    compile: bool = True

    RANGES = {
        "steps": AT_LEAST_1,
        "batch_size": AT_LEAST_1,
        "grad_accum": AT_LEAST_1,
        "lr": POSITIVE,
        "min_lr_ratio": FRACTION,
        "warmup_steps": AT_LEAST_0,
        "weight_decay": AT_LEAST_0,
        "beta1": OPEN_FRACTION,
        "beta2": OPEN_FRACTION,
        "eps": POSITIVE,
        "grad_clip": POSITIVE,
        "seed": AT_LEAST_0,
        "eval_every": AT_LEAST_1,
        "eval_batches": AT_LEAST_0,
        "save_every": AT_LEAST_1,
        "keep_checkpoints": AT_LEAST_1,
        "log_every": AT_LEAST_1,
    }
    CHOICES = {"dtype": ("float32", "bfloat16")}

    def check(self) -> None:
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch_size {self.batch_size} must be a multiple of grad_accum {self.grad_accum}"
            )


@dataclass
class TrainConfig(LoopConfig):
    """Pretraining: the loop's settings and the length of the packed training windows."""

    seq_len: int = 256
    init_from: str | None = None  # start from this model directory's weights (same architecture)

    RANGES = {"seq_len": AT_LEAST_1}

    def check(self) -> None:
        super().check()
        if self.init_from is not None and not self.init_from.strip():
            raise ValueError("init_from is empty")


@dataclass
class SFTConfig(LoopConfig):
    """Chat fine-tuning: the loop's settings (with fine-tuning's defaults) and the chat data's."""

    steps: int = 200
    batch_size: int = 8  # conversations per optimizer step
    # Peak learning rate. Measured on the `tiny` preset (200 steps, chatterbot): full 1e-4 took
    # held-out assistant loss 7.58 -> 5.49, full 1e-3 -> 4.09, LoRA 1e-3 -> 4.29.
    lr: float = 1e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    eval_every: int = 50
    eval_batches: int = 0  # every held-out conversation
    save_every: int = 50
    lora: bool = False
    lora_rank: int = 8
    lora_scale: float = 20.0  # mlx-lm's default: the update is scale * (x @ A) @ B
    lora_layers: int | None = None  # adapt the last N unique blocks; None: all of them
    lora_embeddings: bool = True  # also adapt the embedding table / output head
    max_seq_len: int | None = None  # longest conversation in tokens; None: the model's context
    val_fraction: float = 0.1  # held out when the data has no valid.jsonl
    on_error: str = "skip"  # bad records: "skip" (reported) or "refuse" (nothing trains)

    RANGES = {
        "lora_rank": AT_LEAST_1,
        "lora_scale": POSITIVE,
        "lora_layers": AT_LEAST_1,
        "max_seq_len": Range(2),
        "val_fraction": OPEN_FRACTION,
    }
    CHOICES = {"on_error": ("skip", "refuse")}


@dataclass
class DistillConfig(Checked):
    """Distillation: the per-token loss is (1 - ce_weight) * T^2 * KL(teacher_T || student_T)
    + ce_weight * cross-entropy, where _T are the softmaxes of the logits divided by the
    temperature T (Hinton et al. 2015; the T^2 keeps the gradient's scale as T grows)."""

    temperature: float = 2.0
    ce_weight: float = 0.0

    RANGES = {"temperature": POSITIVE, "ce_weight": FRACTION}


@dataclass
class RunConfig:
    model: ModelArgs
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {"model": ModelArgs, "data": DataConfig, "train": TrainConfig}


def preset_dir() -> Traversable:
    """The presets: the repository's `configs/`, installed as package data (`appleslm.configs`)."""
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


def section_overrides(items: list[str], section: str) -> dict[str, Any]:
    """The values of `section.key=value` overrides for a command with one section."""
    raw: dict[str, Any] = {}
    for item in items:
        key, _, _ = item.partition("=")
        if not key.startswith(f"{section}."):
            raise ConfigError(
                f"override {item!r}: this command takes {section}.key=value overrides"
            )
        apply_override(raw, item, sections=(section,))
    return raw.get(section, {})


def apply_override(raw: dict[str, Any], item: str, sections: tuple[str, ...] | None = None) -> None:
    """Apply one `section.key=value` override; the value is parsed as YAML (`1e-3`, `true`, ...)."""
    key, sep, text = item.partition("=")
    section, dot, name = key.partition(".")
    if not sep or not dot or not name:
        raise ConfigError(
            f"override {item!r} must look like section.key=value, e.g. train.steps=100"
        )
    known = sections or tuple(SECTIONS)
    if section not in known:
        raise ConfigError(f"override {item!r}: unknown section {section!r}; known: {sorted(known)}")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: cannot parse value: {e}") from e
    raw.setdefault(section, {})
    raw[section][name] = value
