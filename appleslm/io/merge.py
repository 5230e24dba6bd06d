"""Weight averaging: linear merges (uniform or weighted soups), greedy soups and the average of a
run's last checkpoints, written as an ordinary model directory.

A linear merge is mergekit's `linear` method: every tensor becomes sum(w_i * theta_i) / sum(w_i)
(the weights normalised, unless a config says `normalize: false`), computed in float32 and cast
to the output dtype. A greedy soup (Wortsman et al. 2022) ranks the ingredients by their held-out
loss and adds them best first, keeping each only if the held-out loss of the average does not
rise, so it is never worse on that data than its best ingredient. Averaging only makes sense
for models fine-tuned from one starting point, so the ingredients must agree in architecture,
tokenizer, weight names and shapes; the first disagreement is an error that names it.
Quantized ingredients are dequantized (the merge and its output are float) and the log says so.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import yaml
from mlx.utils import tree_flatten

from appleslm.errors import AppleslmError
from appleslm.io.files import (
    PROVENANCE_FILE,
    Provenance,
    Quality,
    read_config,
    read_provenance,
)
from appleslm.io.model_dir import (
    check_output_dir,
    display_name,
    load_model,
    model_reference,
    resolve_model,
    save_model_dir,
)

METHODS = ("linear", "greedy_soup")
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
# config.json keys that say how a model stops or is stored, not what it computes: a chat model
# (which stops at <|im_end|> too) merges with its base.
QUANTIZATION_KEYS = ("quantization", "quantization_config")  # mlx-lm writes both
NOT_ARCHITECTURE = ("eos_token_id", "bos_token_id", "pad_token_id", *QUANTIZATION_KEYS)
CONFIG_KEYS = ("models", "merge_method", "dtype", "out_dtype", "base_model", "parameters")


class MergeError(AppleslmError, ValueError):
    """Models that cannot be averaged, or a merge asked for in a way that cannot work."""


@dataclass
class Ingredient:
    """One model of a merge: a model directory, or one of a run's checkpoints (its weights, with
    the architecture and tokenizer of the run's final model directory)."""

    name: str  # how the card and the report call it
    model_dir: Path
    weight: float = 1.0
    checkpoint: Path | None = None
    step: int | None = None


@dataclass
class MergeResult:
    out_dir: Path
    method: str
    ingredients: list[Ingredient]
    chosen: list[str]  # the names of the ingredients in the merge
    losses: dict[str, float] = field(default_factory=dict)  # each ingredient's held-out loss
    loss: float | None = None  # the merged model's
    eval_label: str | None = None
    eval_tokens: int = 0  # tokens the held-out loss is a mean over
    dequantized: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "method": self.method,
            "ingredients": [
                {"model": i.name, "weight": i.weight, "loss": self.losses.get(i.name)}
                for i in self.ingredients
            ],
            "chosen": self.chosen,
            "loss": self.loss,
            "eval": self.eval_label,
            "dequantized": self.dequantized,
        }


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- what to merge


def model_ingredients(specs: list[str], weights: list[float] | None = None) -> list[Ingredient]:
    """Model directories (or Hub repo ids) with their weights (1 each by default)."""
    if weights is not None and len(weights) != len(specs):
        raise MergeError(f"{len(weights)} --weights given for {len(specs)} models: give one each")
    found = []
    for i, spec in enumerate(specs):
        model_dir = resolve_model(spec)
        weight = 1.0 if weights is None else weights[i]
        found.append(Ingredient(model_reference(spec, model_dir), model_dir, weight))
    return found


def checkpoint_ingredients(run_dir: str | Path, last: int) -> list[Ingredient]:
    """The last `last` checkpoints of a finished run, equally weighted (checkpoint averaging)."""
    from appleslm.train.checkpoint import list_checkpoints
    from appleslm.train.trainer import MODEL_DIR

    if last < 1:
        raise MergeError(f"--last must be at least 1, not {last}")
    run_dir = Path(run_dir)
    model_dir = run_dir / MODEL_DIR
    if not (model_dir / PROVENANCE_FILE).exists():
        raise MergeError(
            f"{run_dir} is not a finished training run (it has no {MODEL_DIR}/); finish it "
            "(--resume) first: its model directory gives the merge its architecture and tokenizer"
        )
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    if len(checkpoints) < last:
        raise MergeError(
            f"{run_dir} keeps {len(checkpoints)} checkpoint(s), fewer than --last {last}; train "
            f"with train.keep_checkpoints={last} (sft.keep_checkpoints for fine-tuning)"
        )
    name = display_name(model_dir)
    return [
        Ingredient(f"{name} step {c.step}", model_dir, checkpoint=c.path, step=c.step)
        for c in checkpoints[-last:]
    ]


@dataclass
class MergeConfig:
    """A mergekit-style YAML file: `models: [{model, parameters: {weight}}]`, `merge_method`,
    `dtype` (or `out_dtype`), `base_model`, `parameters: {normalize}`."""

    ingredients: list[Ingredient]
    method: str = "linear"
    dtype: str | None = None
    base_model: str | None = None
    normalize: bool = True


def read_merge_config(path: str | Path) -> MergeConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise MergeError(f"cannot read the merge config {path}: {e}") from e
    except yaml.YAMLError as e:
        raise MergeError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise MergeError(f"{path}: expected a mapping with keys {', '.join(CONFIG_KEYS)}")
    unknown = sorted(set(raw) - set(CONFIG_KEYS))
    if unknown:
        raise MergeError(
            f"{path}: {', '.join(unknown)} not supported (appleslm merges whole models "
            f"linearly); known keys: {', '.join(CONFIG_KEYS)}"
        )
    models = raw.get("models")
    if not isinstance(models, list) or not models:
        raise MergeError(f"{path}: 'models' must be a list of {{model: ..., parameters: ...}}")
    specs, weights = [], []
    for i, entry in enumerate(models, 1):
        where = f"{path}: models[{i}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
            raise MergeError(f"{where} needs a 'model' (a model directory or Hub repo id)")
        extra = sorted(set(entry) - {"model", "parameters"})
        parameters = entry.get("parameters") or {}
        if extra or not isinstance(parameters, dict) or set(parameters) - {"weight"}:
            raise MergeError(f"{where}: only 'model' and 'parameters: {{weight}}' are supported")
        weight = parameters.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise MergeError(f"{where}: weight must be a number, got {weight!r}")
        specs.append(entry["model"])
        weights.append(float(weight))
    method = raw.get("merge_method", "linear")
    if method not in METHODS:
        raise MergeError(
            f"{path}: merge_method must be one of {', '.join(METHODS)}, not {method!r}"
        )
    dtype = raw.get("out_dtype", raw.get("dtype"))
    parameters = raw.get("parameters") or {}
    if not isinstance(parameters, dict) or set(parameters) - {"normalize"}:
        raise MergeError(f"{path}: top-level parameters may only set 'normalize'")
    normalize = parameters.get("normalize", True)
    if not isinstance(normalize, bool):
        raise MergeError(f"{path}: normalize must be true or false, not {normalize!r}")
    base = raw.get("base_model")
    return MergeConfig(
        model_ingredients(specs, weights),
        method,
        check_dtype(dtype),
        None if base is None else str(base),
        normalize,
    )


def check_dtype(dtype: str | None) -> str | None:
    if dtype is not None and dtype not in DTYPES:
        raise MergeError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    return dtype


def check_weights(ingredients: list[Ingredient], normalize: bool) -> None:
    for ingredient in ingredients:
        if not math.isfinite(ingredient.weight):
            raise MergeError(
                f"the weight of {ingredient.name} is {ingredient.weight}: not a number"
            )
    total = sum(i.weight for i in ingredients)
    if normalize and not total > 0:
        raise MergeError(f"the weights sum to {total:g}; normalised weights need a positive sum")


# ---------------------------------------------------------------- checks and loading


def architecture(model_dir: Path) -> dict[str, Any]:
    return {k: v for k, v in read_config(model_dir).items() if k not in NOT_ARCHITECTURE}


def first_difference(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    for key in [*a, *(k for k in b if k not in a)]:  # in the config's own order
        if a.get(key) != b.get(key):
            return f"{key}: {a.get(key, '(absent)')!r} vs {b.get(key, '(absent)')!r}"
    return None


def check_same_tokens(reference: Ingredient, other: Ingredient, mine: Any, theirs: Any) -> None:
    from appleslm.generate import vocabulary_difference

    difference = vocabulary_difference(mine, theirs)
    if difference:
        raise MergeError(
            f"the tokenizers of {reference.name} and {other.name} differ ({difference}): only "
            "models with one tokenizer can be averaged"
        )


def float_parameters(model: nn.Module) -> tuple[nn.Module, bool]:
    """The model with its quantized layers dequantized, and whether there were any."""
    from mlx_lm.utils import dequantize_model

    quantized = any(
        isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding) for _, m in model.named_modules()
    )
    return (dequantize_model(model) if quantized else model), quantized


class Skeleton:
    """The first ingredient's model (the skeleton every average is loaded into and written from)
    and each ingredient's float weights, checked against it."""

    def __init__(self, ingredients: list[Ingredient], log: Callable[[str], None]):
        self.reference = ingredients[0]
        self.config = architecture(self.reference.model_dir)
        model, self.tokenizer = load_model(self.reference.model_dir, lazy=True)
        self.model, _ = float_parameters(model)
        self.shapes = {k: v.shape for k, v in tree_flatten(self.model.parameters())}
        self.log = log
        self.dequantized: list[str] = []
        for ingredient in ingredients:
            self.check(ingredient)

    def check(self, ingredient: Ingredient) -> None:
        """Architecture and tokenizer, before any weight is read."""
        if ingredient.model_dir == self.reference.model_dir:
            return
        difference = first_difference(self.config, architecture(ingredient.model_dir))
        if difference:
            raise MergeError(
                f"{ingredient.name} has another architecture than {self.reference.name} "
                f"(config.json {difference}): only models of one architecture can be averaged"
            )
        _, tokenizer = load_model(ingredient.model_dir, lazy=True)
        check_same_tokens(self.reference, ingredient, self.tokenizer, tokenizer)

    def weights(self, ingredient: Ingredient) -> dict[str, mx.array]:
        """The ingredient's weights as float arrays, with the reference's names and shapes."""
        if ingredient.checkpoint is not None:
            weights = mx.load(str(ingredient.checkpoint / "model.safetensors"))
            if any(".lora_a" in name for name in weights):
                raise MergeError(
                    f"{ingredient.name} is a checkpoint of a LoRA run (adapters, not weights): "
                    "average the fused models of several runs instead"
                )
        else:
            model, _ = load_model(ingredient.model_dir, lazy=True)
            model, quantized = float_parameters(model)
            if quantized:
                self.dequantized.append(ingredient.name)
                self.log(
                    f"{ingredient.name} is quantized: dequantized for the merge (the merged "
                    "model is float; quantize it again with appleslm quantize)"
                )
            weights = dict(tree_flatten(model.parameters()))
        for name in sorted(set(self.shapes) | set(weights)):
            if name not in weights or name not in self.shapes:
                holder = self.reference.name if name in self.shapes else ingredient.name
                raise MergeError(
                    f"weight {name} is in {holder} only: {ingredient.name} and "
                    f"{self.reference.name} do not have the same weights"
                )
            if weights[name].shape != self.shapes[name]:
                raise MergeError(
                    f"weight {name} has shape {tuple(weights[name].shape)} in {ingredient.name} "
                    f"but {tuple(self.shapes[name])} in {self.reference.name}"
                )
        return weights

    def load(self, weights: dict[str, mx.array]) -> nn.Module:
        self.model.load_weights(list(weights.items()))
        mx.eval(self.model.parameters())
        return self.model


# ---------------------------------------------------------------- averaging


class WeightedSum:
    """sum(w_i * theta_i) in float32, tensor by tensor, and sum(w_i): what a linear merge
    divides. Adding in the ingredients' order makes a uniform merge of float32 models equal
    (a + b + c) / 3 bit for bit."""

    def __init__(self):
        self.total: dict[str, mx.array] = {}
        self.weight = 0.0

    def plus(self, weights: dict[str, mx.array], w: float) -> WeightedSum:
        added = WeightedSum()
        added.weight = self.weight + w
        for name, value in weights.items():
            term = value.astype(mx.float32) * w
            added.total[name] = self.total[name] + term if self.total else term
        mx.eval(added.total)
        return added

    def average(self, dtype: mx.Dtype | None, normalize: bool = True) -> dict[str, mx.array]:
        divisor = self.weight if normalize else 1.0
        return {
            name: (total / divisor).astype(dtype or mx.float32)
            for name, total in self.total.items()
        }


# ---------------------------------------------------------------- held-out loss


def is_chat_data(path: Path) -> bool:
    """A folder with valid.jsonl, or a JSONL file whose first record is a conversation."""
    if path.is_dir():
        return (path / "valid.jsonl").is_file()
    if path.suffix != ".jsonl":
        return False
    with path.open(encoding="utf-8", errors="replace") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(record, dict) and ("messages" in record or "prompt" in record)


class HeldOut:
    """The loss the merge is judged by on `data`: the assistant-token loss of held-out
    conversations (`appleslm.train.sft.assistant_loss`) for chat data, the loss per token
    (`appleslm.evaluate.perplexity`) for text."""

    def __init__(self, data: str | Path, model: nn.Module, tokenizer: Any, max_tokens: int | None):
        from appleslm.models import context_length

        path = Path(data)
        if not path.exists():
            raise MergeError(f"--eval-data {path}: no such file or folder")
        self.chat = is_chat_data(path)
        if self.chat:
            from appleslm.data.chat import ChatRenderer, read_conversations, tokenize_conversations

            file = path / "valid.jsonl" if path.is_dir() else path
            conversations, _ = read_conversations(file)
            longest = min(context_length(model) or 512, 2048)
            self.conversations, _ = tokenize_conversations(
                conversations, ChatRenderer(tokenizer), longest
            )
            if not self.conversations:
                raise MergeError(f"--eval-data {file}: no usable conversation")
            self.count = sum(sum(c.mask) for c in self.conversations)
            self.label = (
                f"held-out assistant-token loss on {len(self.conversations)} conversations "
                f"of {file.name}"
            )
        else:
            from appleslm.evaluate.perplexity import tokenize_text

            self.tokens = tokenize_text(tokenizer, path, max_tokens)
            self.count = len(self.tokens) - 1
            self.label = f"loss per token on {len(self.tokens):,} tokens of {path.name}"

    def loss(self, model: nn.Module) -> float:
        if self.chat:
            from appleslm.train.sft import assistant_loss

            return assistant_loss(model, self.conversations)
        from appleslm.evaluate.perplexity import eval_window, evaluate_tokens

        return evaluate_tokens(model, self.tokens, eval_window(model))["loss"]


# ---------------------------------------------------------------- the merge


def merge_models(
    ingredients: list[Ingredient],
    out_dir: str | Path,
    *,
    method: str = "linear",
    eval_data: str | Path | None = None,
    max_eval_tokens: int | None = None,
    dtype: str | None = None,
    base_model: str | None = None,
    normalize: bool = True,
    overwrite: bool = False,
    log: Callable[[str], None] = _stderr,
) -> MergeResult:
    """Average `ingredients` into the model directory `out_dir` (see the module docstring).

    `method` "linear" averages them all with their weights; "greedy_soup" needs `eval_data`
    (chat JSONL or a folder with valid.jsonl, or text) and keeps only the ingredients that do
    not raise its held-out loss. With `eval_data`, every ingredient and the result are measured.
    """
    out_dir = Path(out_dir)
    if not ingredients:
        raise MergeError("nothing to merge: give model directories, a run with --last, or --config")
    if method not in METHODS:
        raise MergeError(f"merge method must be one of {', '.join(METHODS)}, not {method!r}")
    if method == "greedy_soup" and eval_data is None:
        raise MergeError("a greedy soup needs --eval-data: the held-out data it is chosen on")
    check_weights(ingredients, normalize)
    out_dtype = DTYPES[check_dtype(dtype)] if dtype else None
    if any(out_dir.resolve() == i.model_dir.resolve() for i in ingredients):
        raise MergeError(f"--out {out_dir} is one of the ingredients; choose another --out")
    check_output_dir(out_dir, overwrite)

    skeleton = Skeleton(ingredients, log)
    out_dtype = out_dtype or next(iter(tree_flatten(skeleton.model.parameters())))[1].dtype
    held_out = (
        HeldOut(eval_data, skeleton.model, skeleton.tokenizer, max_eval_tokens)
        if (eval_data is not None)
        else None
    )
    result = MergeResult(out_dir, method, ingredients, [])

    def measure(weights: dict[str, mx.array]) -> float:
        return held_out.loss(skeleton.load(weights))

    if method == "greedy_soup":
        for ingredient in ingredients:
            result.losses[ingredient.name] = measure(skeleton.weights(ingredient))
            log(f"{ingredient.name}: {held_out.label} {result.losses[ingredient.name]:.4f}")
        ranked = sorted(ingredients, key=lambda i: result.losses[i.name])
        if not math.isfinite(result.losses[ranked[0].name]):
            raise MergeError("no ingredient has a finite held-out loss: nothing to make a soup of")
        soup, soup_loss = WeightedSum(), math.inf
        for ingredient in ranked:
            candidate = soup.plus(skeleton.weights(ingredient), ingredient.weight)
            loss = measure(candidate.average(out_dtype, normalize))
            kept = loss <= soup_loss  # the best ingredient always: nothing is worse than inf
            if kept:
                soup, soup_loss = candidate, loss
                result.chosen.append(ingredient.name)
            log(f"soup + {ingredient.name}: {loss:.4f} ({'kept' if kept else 'left out'})")
    else:
        soup = WeightedSum()
        for ingredient in ingredients:
            weights = skeleton.weights(ingredient)
            if held_out is not None:
                result.losses[ingredient.name] = measure(weights)
                log(f"{ingredient.name}: {held_out.label} {result.losses[ingredient.name]:.4f}")
            soup = soup.plus(weights, ingredient.weight)
            result.chosen.append(ingredient.name)
    model = skeleton.load(soup.average(out_dtype, normalize))
    if held_out is not None:
        result.loss = held_out.loss(model)
        result.eval_label, result.eval_tokens = held_out.label, held_out.count
        log(f"merged ({len(result.chosen)} of {len(ingredients)}): {result.loss:.4f}")
    result.dequantized = skeleton.dequantized
    write_merged(skeleton, result, base_model, normalize)
    return result


def common_prefix(lists: Iterable[list]) -> list:
    lists = list(lists)
    shared = []
    for items in zip(*lists):
        if any(item != items[0] for item in items):
            break
        shared.append(items[0])
    return shared


def write_merged(
    skeleton: Skeleton, result: MergeResult, base_model: str | None, normalize: bool
) -> Path:
    """The merged model as a model directory: the reference's config (float), tokenizer and
    history shared by every ingredient, and the recipe in `merged_from`."""
    ingredients = result.ingredients
    provenances = [read_provenance(i.model_dir) for i in ingredients]
    reference = provenances[0]
    bases = {p.base_model for p in provenances}
    chosen_weight = sum(i.weight for i in ingredients if i.name in result.chosen)
    provenance = Provenance(
        name=display_name(result.out_dir),
        variant=reference.variant,
        params=reference.params,
        base_model=base_model or (bases.pop() if len(bases) == 1 else None),
        training=common_prefix(p.training for p in provenances),
        data_config=reference.data_config
        if all(p.data_config == reference.data_config for p in provenances)
        else None,
        merge_method=result.method,
        merged_from=[
            {
                "model": i.name,
                "weight": i.weight,
                "share": (i.weight / chosen_weight if normalize else i.weight)
                if i.name in result.chosen
                else 0.0,
                **({"step": i.step} if i.step is not None else {}),
                **({"held_out_loss": result.losses[i.name]} if i.name in result.losses else {}),
                **({"dequantized": True} if i.name in result.dequantized else {}),
            }
            for i in ingredients
        ],
    )
    if result.loss is not None:
        provenance.quality = Quality(
            loss=result.loss,
            ppl=math.exp(result.loss),
            tokens=result.eval_tokens,
            split=result.eval_label,
        )
    config = {
        k: v
        for k, v in read_config(skeleton.reference.model_dir).items()
        if k not in QUANTIZATION_KEYS
    }
    return save_model_dir(
        result.out_dir,
        skeleton.model,
        tokenizer_dir=skeleton.reference.model_dir,
        provenance=provenance,
        config=config,
        overwrite=True,  # checked before the work began
    )


def merge(
    models: list[str],
    out_dir: str | Path,
    *,
    config: str | Path | None = None,
    weights: list[float] | None = None,
    last: int | None = None,
    greedy: bool = False,
    eval_data: str | Path | None = None,
    max_eval_tokens: int | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = _stderr,
) -> MergeResult:
    """`appleslm merge`: models (with optional weights), one run's last checkpoints, or a
    mergekit-style config; `greedy` makes a greedy soup on `eval_data`."""
    if max_eval_tokens is not None and max_eval_tokens < 2:
        raise MergeError(f"--max-tokens must be at least 2, not {max_eval_tokens}")
    base_model, normalize = None, True
    method = "greedy_soup" if greedy else "linear"
    if config is not None:
        if models or weights or last is not None:
            raise MergeError("--config names the models itself: give either models or --config")
        plan = read_merge_config(config)
        ingredients, base_model, normalize = plan.ingredients, plan.base_model, plan.normalize
        method = "greedy_soup" if greedy else plan.method
        dtype = dtype or plan.dtype
    elif last is not None:
        if len(models) != 1 or weights:
            raise MergeError("--last K averages the checkpoints of one run: give one run directory")
        ingredients = checkpoint_ingredients(models[0], last)
    else:
        ingredients = model_ingredients(models, weights)
    return merge_models(
        ingredients,
        out_dir,
        method=method,
        eval_data=eval_data,
        max_eval_tokens=max_eval_tokens,
        dtype=dtype,
        base_model=base_model,
        normalize=normalize,
        overwrite=overwrite,
        log=log,
    )
