"""The one model-directory format every command reads and writes, loadable by stock mlx-lm.

config.json         ModelArgs fields + "model_file" (+ mlx-lm's "quantization" when quantized)
model.safetensors   weights
appleslm_arch.py    the architecture, for `mlx_lm.load(..., trust_remote_code=True)`
tokenizer.json, tokenizer_config.json (+ chat_template.jinja)
appleslm.json       provenance: data, tokens seen, validation loss, parameter counts
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from appleslm.models import appleslm as architecture

ARCH_FILE = "appleslm_arch.py"
PROVENANCE_FILE = "appleslm.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
)


class ModelDirError(ValueError):
    """A model directory that is missing, incomplete or corrupt."""


def register_with_mlx_lm() -> None:
    """Make `model_type: appleslm` resolve to our installed module inside this process.

    mlx-lm imports `mlx_lm.models.<model_type>`; a sys.modules entry answers that import, so our
    own commands run the package's code, never the copy shipped in a checkpoint.
    """
    sys.modules.setdefault("mlx_lm.models.appleslm", architecture)


@contextmanager
def atomic_directory(out_dir: Path) -> Iterator[Path]:
    """Yield a staging directory that replaces `out_dir` only once everything was written.

    A crash mid-write leaves the previous `out_dir` (if any) intact and a stray staging folder.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield staging
        if out_dir.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            os.replace(out_dir, retired / out_dir.name)
            os.replace(staging, out_dir)
            shutil.rmtree(retired)
        else:
            os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def model_config(model: nn.Module) -> dict[str, Any]:
    config = dataclasses.asdict(model.args)
    config["model_file"] = ARCH_FILE
    return config


def save_model_dir(
    out_dir: str | Path,
    model: nn.Module,
    *,
    tokenizer_dir: str | Path,
    provenance: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
) -> Path:
    """Write `model` as a complete model directory, atomically.

    Tokenizer files are copied from `tokenizer_dir` (a model dir or a folder the tokenizer was
    saved to). `config` defaults to the model's ModelArgs plus `model_file`; pass mlx-lm's
    config (with "quantization") for a quantized model.
    """
    out_dir = Path(out_dir)
    config = dict(config) if config is not None else model_config(model)
    tokenizer_config = Path(tokenizer_dir) / "tokenizer_config.json"
    if tokenizer_config.exists():
        eos = json.loads(tokenizer_config.read_text()).get("eos_token")
        tokenizer_json = Path(tokenizer_dir) / "tokenizer.json"
        if eos and tokenizer_json.exists():
            config.setdefault("eos_token_id", token_id(tokenizer_json, eos))
    with atomic_directory(out_dir) as staging:
        weights = dict(tree_flatten(model.parameters()))
        mx.save_safetensors(str(staging / "model.safetensors"), weights, metadata={"format": "mlx"})
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if config.get("model_file") == ARCH_FILE:
            shutil.copyfile(architecture.__file__, staging / ARCH_FILE)
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).exists():
                shutil.copyfile(Path(tokenizer_dir) / name, staging / name)
        if not (staging / "tokenizer.json").exists():
            raise ModelDirError(f"no tokenizer.json in {tokenizer_dir}")
        if provenance is not None:
            (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2))
        from appleslm.io.card import render_model_card  # card reads config and provenance

        (staging / "README.md").write_text(str(render_model_card(staging, out_dir.name)))
    return out_dir


def token_id(tokenizer_json: Path, token: str) -> int | None:
    vocab = json.loads(tokenizer_json.read_text())
    for added in vocab.get("added_tokens", []):
        if added["content"] == token:
            return added["id"]
    return vocab.get("model", {}).get("vocab", {}).get(token)


def read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.exists():
        raise ModelDirError(f"{model_dir} is not a model directory: it has no config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelDirError(f"{path} is not valid JSON ({e})") from e


def read_provenance(model_dir: Path) -> dict[str, Any]:
    path = model_dir / PROVENANCE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def load_model(spec: str | Path, *, trust_remote_code: bool = False, lazy: bool = False):
    """Load (model, tokenizer) from a model directory or Hub repo id: ours, any mlx-lm model,
    or an imported GGUF. Our architecture runs from the installed package; another model's
    custom `model_file` runs only with `trust_remote_code`.
    """
    import mlx_lm
    import transformers

    from appleslm.io.hub import resolve_model

    # transformers warns that "appleslm" is not one of its model types on every load; it is right
    # and it does not matter (only its tokenizer is used).
    transformers.logging.set_verbosity_error()

    model_dir = resolve_model(spec)
    config = read_config(model_dir)
    overrides: dict[str, Any] = {}
    if config.get("model_type") == "appleslm":
        register_with_mlx_lm()
        overrides["model_file"] = None
    elif config.get("model_file") and not trust_remote_code:
        raise ModelDirError(
            f"{model_dir} ships its own architecture code ({config['model_file']}); "
            "pass --trust-remote-code if you trust it"
        )
    if not list(model_dir.glob("model*.safetensors")):
        raise ModelDirError(f"{model_dir} has no model*.safetensors weights")
    try:
        return mlx_lm.load(
            str(model_dir), model_config=overrides, lazy=lazy, trust_remote_code=trust_remote_code
        )
    except (ValueError, RuntimeError, KeyError, OSError) as e:
        raise ModelDirError(f"cannot load the model in {model_dir}: {e}") from e
