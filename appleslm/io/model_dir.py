"""The one model-directory format every command reads and writes, loadable by stock mlx-lm.

config.json         ModelArgs fields + "model_file" (+ mlx-lm's "quantization" when quantized)
model.safetensors   weights (mlx-lm's sharding and index for big models)
appleslm_arch.py    the architecture, for `mlx_lm.load(..., trust_remote_code=True)`
tokenizer.json, tokenizer_config.json (+ chat_template.jinja)
README.md           the model card
appleslm.json       provenance (`appleslm.io.files.Provenance`)

`resolve_model` is the one place a MODEL argument becomes a directory, `load_model` the one
loader and `save_model_dir` the one writer: training, fine-tuning, quantization, export, GGUF
import and merging all end in it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import mlx.nn as nn
from mlx.utils import tree_flatten

from appleslm.atomic import atomic_directory
from appleslm.errors import ExistingFileError
from appleslm.io.files import (
    ARCH_FILE,
    CARD_FILE,
    CONFIG_FILE,
    TOKENIZER_FILES,
    ModelDirError,
    Provenance,
    read_config,
    weight_files,
    write_provenance,
)
from appleslm.io.hub import MODEL_PATTERNS, HubError, download, is_repo_id
from appleslm.models import appleslm as architecture


def register_with_mlx_lm() -> None:
    """Make `model_type: appleslm` resolve to our installed module inside this process.

    mlx-lm imports `mlx_lm.models.<model_type>`; a sys.modules entry answers that import, so our
    own commands run the package's code, never the copy shipped in a checkpoint.
    """
    sys.modules.setdefault("mlx_lm.models.appleslm", architecture)


def resolve_model(spec: str | Path) -> Path:
    """A local model directory as it is; a Hub repo id, downloaded once and cached.

    A name whose folder part exists here (`runs/tiny` when `runs/` exists) is a local path that
    is missing, and is reported so: it is never sent to the Hub.
    """
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelDirError(f"{path} is a file, not a model directory")
        return path
    text = str(spec)
    parent = path.parent
    if not is_repo_id(text) or (str(parent) not in ("", ".") and parent.is_dir()):
        raise ModelDirError(
            f"{text!r}: no such model directory"
            + ("" if is_repo_id(text) else ", and not a Hub repo id (namespace/name)")
            + nearby_models(parent)
        )
    try:
        return download(text, allow_patterns=MODEL_PATTERNS)
    except HubError as e:
        raise ModelDirError(str(e)) from e


def nearby_models(folder: Path) -> str:
    """ "; model directories in runs/: a, b" for an error message, or "" when there are none."""
    try:
        found = sorted(p.name for p in folder.iterdir() if (p / CONFIG_FILE).is_file())
    except OSError:
        return ""
    return f"; model directories in {folder}/: {', '.join(found)}" if found else ""


def load_model(spec: str | Path, *, trust_remote_code: bool = False, lazy: bool = False):
    """Load (model, tokenizer) from a model directory or Hub repo id: ours, any mlx-lm model,
    or an imported GGUF. Our architecture runs from the installed package; another model's
    custom `model_file` runs only with `trust_remote_code`.
    """
    import mlx_lm
    import transformers

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
    if not weight_files(model_dir):
        raise ModelDirError(f"{model_dir} has no model*.safetensors weights")
    try:
        return mlx_lm.load(
            str(model_dir), model_config=overrides, lazy=lazy, trust_remote_code=trust_remote_code
        )
    except (ValueError, RuntimeError, KeyError, OSError, TypeError) as e:
        raise ModelDirError(f"cannot load the model in {model_dir}: {e}") from e


def model_config(model: nn.Module) -> dict[str, Any]:
    config = dataclasses.asdict(model.args)
    config["model_file"] = ARCH_FILE
    return config


def save_model_dir(
    out_dir: str | Path,
    model: nn.Module,
    *,
    tokenizer_dir: str | Path,
    provenance: Provenance | None = None,
    config: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `model` as a complete model directory, atomically, with its model card.

    Tokenizer files are copied from `tokenizer_dir` (a model dir or a folder the tokenizer was
    saved to). `config` defaults to the model's ModelArgs plus `model_file`; pass mlx-lm's
    config (with "quantization") for a quantized model, or another architecture's config.
    An existing model directory is replaced only with `overwrite`; anything else at `out_dir`
    (a file, a folder of other things) is never touched.
    """
    from mlx_lm.utils import save_config, save_model

    from appleslm.io.card import render_model_card

    out_dir, tokenizer_dir = Path(out_dir), Path(tokenizer_dir)
    check_output_dir(out_dir, overwrite)
    if not (tokenizer_dir / "tokenizer.json").exists():
        raise ModelDirError(f"no tokenizer.json in {tokenizer_dir}")
    config = dict(config) if config is not None else model_config(model)
    eos = eos_token_id(tokenizer_dir)
    if eos is not None:
        config.setdefault("eos_token_id", eos)
    provenance = provenance or Provenance(name=display_name(out_dir))
    if not provenance.params:
        provenance.params = {"params_total": parameter_total(model)}
    with atomic_directory(out_dir) as staging:
        save_model(staging, model)
        save_config(config, staging / CONFIG_FILE)
        if config.get("model_file") == ARCH_FILE:
            shutil.copyfile(architecture.__file__, staging / ARCH_FILE)
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).exists():
                shutil.copyfile(tokenizer_dir / name, staging / name)
        write_provenance(staging, provenance)
        card = render_model_card(staging, provenance.name or display_name(out_dir))
        (staging / CARD_FILE).write_text(str(card))
    return out_dir


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse an output that would replace something the user did not ask to replace: a file
    always, a non-empty folder unless `overwrite` (then it is replaced as a whole)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExistingFileError(f"{out_dir} exists and is not a directory; choose another --out")
    if overwrite or not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    what = "already holds a model" if (out_dir / CONFIG_FILE).is_file() else "is not empty"
    raise ExistingFileError(
        f"{out_dir} {what}; choose another --out, or pass --overwrite to replace it as a whole"
    )


def parameter_total(model: nn.Module) -> int:
    """Parameters as trained (a quantized weight counts its unpacked elements)."""
    from mlx_lm.utils import get_total_parameters

    return int(get_total_parameters(model)) if tree_flatten(model.parameters()) else 0


def eos_token_id(tokenizer_dir: Path) -> int | None:
    """The id of tokenizer_config.json's eos_token, looked up in tokenizer.json."""
    config_file = tokenizer_dir / "tokenizer_config.json"
    if not config_file.exists():
        return None
    eos = json.loads(config_file.read_text()).get("eos_token")
    if isinstance(eos, dict):  # transformers' AddedToken form
        eos = eos.get("content")
    if not eos:
        return None
    vocab = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    for added in vocab.get("added_tokens", []):
        if added["content"] == eos:
            return added["id"]
    return vocab.get("model", {}).get("vocab", {}).get(eos)


def model_reference(spec: str | Path, model_dir: Path) -> str:
    """How provenance names the model `spec` resolved to: its Hub repo id, or its display name."""
    return (
        str(spec)
        if model_dir != Path(spec).expanduser() and is_repo_id(str(spec))
        else (display_name(model_dir))
    )


def display_name(model_dir: str | Path) -> str:
    """What to call a model: a Hub cache snapshot by its repo id, a run's `runs/tiny/model`
    after its run (`tiny`), anything else after its folder."""
    path = Path(model_dir).expanduser().absolute()
    parts = path.parts
    for i, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            return part.removeprefix("models--").replace("--", "/")
    return path.parent.name if path.name == "model" and path.parent.name else path.name
