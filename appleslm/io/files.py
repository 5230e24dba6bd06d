"""The model directory's file names, its readers, and the typed provenance every command shares.

A leaf module: it imports nothing else of appleslm's but the error root and the atomic writer, so
the card, the Hub code and the model-directory writer can all use it without importing each other.

Provenance (`appleslm.json`) says where a model came from, for the model card and for later
commands: what it is and its base, the training stages it went through (data, recipe, hardware,
time), its quality on held-out data and how it was quantized, exported, imported or merged.
`Provenance.from_dict` also reads the flat format appleslm 0.1 wrote.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appleslm.atomic import atomic_write
from appleslm.errors import AppleslmError

CONFIG_FILE = "config.json"
ARCH_FILE = "appleslm_arch.py"
PROVENANCE_FILE = "appleslm.json"
CARD_FILE = "README.md"
WEIGHTS_GLOB = "model*.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
)
PROVENANCE_VERSION = 2


class ModelDirError(AppleslmError, ValueError):
    """A model directory that is missing, incomplete or corrupt."""


def read_config(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / CONFIG_FILE
    if not path.exists():
        raise ModelDirError(f"{model_dir} is not a model directory: it has no {CONFIG_FILE}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelDirError(f"{path} is not valid JSON ({e}); the directory is damaged") from e
    if not isinstance(config, dict):
        raise ModelDirError(f"{path} is not a JSON object; the directory is damaged")
    return config


def weight_files(model_dir: Path) -> list[Path]:
    return sorted(Path(model_dir).glob(WEIGHTS_GLOB))


# ------------------------------------------------------------------------------ provenance


@dataclass
class DataRecord:
    """What a model was trained on, for people: named, sized, licensed."""

    source: str  # as configured: "default", a path, "hf:owner/name", a chat corpus name
    name: str  # e.g. "State of the Union addresses, 1790-2021 (bundled with appleslm)"
    licence: str | None = None
    documents: int | None = None  # documents or conversations
    train_tokens: int | None = None
    val_tokens: int | None = None
    tokenizer: str | None = None  # e.g. "byte-level BPE, 2,048 tokens, trained on this data"


@dataclass
class TrainingRecord:
    """One training stage (pretraining, fine-tuning, distillation) and its recipe."""

    task: str  # "pretraining", "fine-tuning" or "distillation"
    data: DataRecord
    steps: int
    tokens: int  # tokens seen (fine-tuning: tokens of the conversations)
    batch_size: int
    lr: float
    seq_len: int | None = None
    method: str | None = None  # fine-tuning: "full" or "lora"
    dtype: str = "float32"
    processes: int = 1
    hardware: str = ""
    seconds: float | None = None
    val_loss_before: float | None = None  # fine-tuning: held-out loss of the base model
    teacher: str | None = None  # distillation: the model whose distribution was matched
    settings: dict[str, Any] = field(default_factory=dict)  # the whole loop config


@dataclass
class Quality:
    """The model's latest measurement on held-out data (the split is named in `split`)."""

    loss: float  # nats per predicted token
    ppl: float
    tokens: int
    split: str  # e.g. "held-out documents of the training data"
    bpb: float | None = None  # bits per UTF-8 byte: comparable across tokenizers


@dataclass
class QuantRecord:
    bits: int | None = None
    group_size: int | None = None
    recipe: str | None = None
    mode: str = "affine"
    bits_per_weight: float | None = None
    kept_float: list[str] = field(default_factory=list)
    ppl_float: float | None = None
    ppl_quantized: float | None = None
    eval_tokens: int = 0


@dataclass
class Provenance:
    name: str = ""
    variant: str = "unknown"  # which of the papers' ideas the architecture uses (density)
    params: dict[str, int] = field(default_factory=dict)
    base_model: str | None = None  # the model this one was made from, if any
    training: list[TrainingRecord] = field(default_factory=list)  # stages, oldest first
    quality: Quality | None = None
    data_config: dict[str, Any] | None = None  # rebuilds the held-out split (quantize, eval)
    quantization: QuantRecord | None = None
    exported_from: dict[str, Any] | None = None
    imported_from: dict[str, Any] | None = None  # e.g. {"format": "GGUF", "file": ..., "sha256"}
    # the ingredients: [{"model", "weight", "share" (of the average; 0: left out of a greedy
    # soup), "step" (a checkpoint), "held_out_loss", "dequantized"}], the last three if known
    merged_from: list[dict[str, Any]] | None = None
    merge_method: str | None = None  # "linear" or "greedy_soup" (appleslm.io.merge)
    version: int = PROVENANCE_VERSION

    @property
    def pretraining(self) -> TrainingRecord | None:
        return next((t for t in self.training if t.task == "pretraining"), None)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Provenance:
        if raw.get("version", 1) < PROVENANCE_VERSION:
            raw = _upgrade_v1(raw)
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        values["training"] = [_record(TrainingRecord, t) for t in values.get("training") or []]
        for name, kind in (("quality", Quality), ("quantization", QuantRecord)):
            if values.get(name) is not None:
                values[name] = _record(kind, values[name])
        return cls(**values)


def _record(kind: type, raw: dict[str, Any]) -> Any:
    known = {f.name for f in dataclasses.fields(kind)}
    values = {k: v for k, v in raw.items() if k in known}
    if kind is TrainingRecord:
        values["data"] = _record(DataRecord, values.get("data") or {"source": "", "name": ""})
    return kind(**values)


def _upgrade_v1(raw: dict[str, Any]) -> dict[str, Any]:
    """appleslm 0.1's flat appleslm.json (val_loss, tokens_seen, data, train, sft...) as v2."""
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    source = str(data.get("source", ""))
    record = {
        "source": source,
        "name": source,
        "train_tokens": data.get("train_tokens"),
        "val_tokens": data.get("val_tokens"),
        "documents": data.get("train_docs"),
    }
    train = raw.get("train") if isinstance(raw.get("train"), dict) else {}
    out: dict[str, Any] = {k: raw[k] for k in ("name", "variant", "data_config") if k in raw}
    out["params"] = (
        raw["params"]
        if isinstance(raw.get("params"), dict)
        else ({"params_total": int(raw["params"])} if isinstance(raw.get("params"), int) else {})
    )
    if raw.get("tokens_seen") is not None:
        out["training"] = [
            {
                "task": "pretraining",
                "data": record,
                "steps": raw.get("steps", 0),
                "tokens": raw["tokens_seen"],
                "batch_size": train.get("batch_size", 0),
                "lr": train.get("lr", 0.0),
                "seq_len": train.get("seq_len"),
                "settings": train,
            }
        ]
    if isinstance(raw.get("val_loss"), int | float):
        out["quality"] = {
            "loss": raw["val_loss"],
            "ppl": raw.get("val_ppl", 0.0),
            "tokens": data.get("val_tokens") or 0,
            "split": "held-out documents of the training data",
        }
    if isinstance(raw.get("quantization"), dict):
        q = raw["quantization"]
        out["quantization"] = {
            **q,
            "kept_float": q.get("skipped", []),
            "ppl_float": q.get("val_ppl_float"),
            "ppl_quantized": q.get("val_ppl_quantized"),
        }
    if isinstance(raw.get("source"), dict):  # a GGUF import
        out["imported_from"] = {
            "format": "GGUF",
            "file": raw["source"].get("gguf"),
            "sha256": raw["source"].get("sha256"),
        }
    return out


def read_provenance(model_dir: Path) -> Provenance:
    """The directory's provenance; an empty one when it has none (any mlx-lm model)."""
    path = Path(model_dir) / PROVENANCE_FILE
    if not path.exists():
        return Provenance(name=Path(model_dir).name)
    try:
        raw = json.loads(path.read_text())
        return Provenance.from_dict(raw)
    except (ValueError, TypeError, AttributeError) as e:
        raise ModelDirError(
            f"{path} is damaged ({e}); delete it to use the model without it"
        ) from e


def write_provenance(model_dir: Path, provenance: Provenance) -> None:
    atomic_write(
        Path(model_dir) / PROVENANCE_FILE, json.dumps(provenance.to_dict(), indent=2) + "\n"
    )
