"""Loss, perplexity and bits per byte of any model, on any text or on its own held-out split.

Loss is nats per predicted token, so it depends on the tokenizer; bits per UTF-8 byte (the total
negative log-likelihood in bits over the bytes of the predicted text) does not, and compares a
BPE model with a byte model or with one of another vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.utils import dequantize_model
from tqdm import tqdm

from appleslm.data.corpus import DataError, iter_documents
from appleslm.data.tokenizer import eot_id, token_byte_lengths
from appleslm.evaluate import EvaluationError
from appleslm.generate import ModelChoice, load_choice
from appleslm.io.files import read_provenance
from appleslm.io.model_dir import load_model, resolve_model
from appleslm.models import context_length

DEFAULT_WINDOW = 512  # for a model whose config declares no context
MAX_WINDOW = 2048
BATCH_WINDOWS = 8  # windows per forward pass, fewer when their logits would not fit the budget
LOGITS_BUDGET = 2**26  # logits per forward pass (window x batch x vocabulary): 256 MB in float32
HELD_OUT = "held-out documents of the training data"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_for_evaluation(spec: str | Path, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """`load_model`, then on MLX's CPU backend the weights as float32 matrices.

    There MLX multiplies quantized and half-precision weights with scalar kernels: a 60-token
    forward pass of 4-bit SmolLM2-135M took 22.8 s quantized and 1.7 s dequantized (OpenBLAS),
    and float16 was slower still. Dequantizing changes no weight (each becomes the value the
    quantized kernel computes with), only the order of float32 rounding; on a GPU the model
    runs as it is.
    """
    model, tokenizer = load_model(spec, trust_remote_code=trust_remote_code)
    return fast_for_evaluation(model), tokenizer


def fast_for_evaluation(model: nn.Module) -> nn.Module:
    """`model` as this device evaluates it fastest with the same values (see
    `load_for_evaluation`): on the CPU dequantized to float32, in place; elsewhere as it is."""
    if mx.default_device() == mx.cpu:
        model = dequantize_model(model)
        model.set_dtype(mx.float32)  # floating-point parameters only
    return model


def evaluate_tokens(
    model: nn.Module,
    tokens: np.ndarray,
    seq_len: int = 512,
    *,
    batch_size: int = BATCH_WINDOWS,
    byte_lengths: np.ndarray | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Mean next-token cross-entropy over every token after the first, in non-overlapping windows
    of `seq_len` targets (the last window may be shorter), `batch_size` windows at a time.

    With `byte_lengths` (`token_byte_lengths` of the tokenizer) also bits per byte: the summed
    loss in bits over the UTF-8 bytes of the predicted tokens.
    """
    if len(tokens) < 2:
        raise EvaluationError("too little text to evaluate (need at least 2 tokens)")
    tokens = np.asarray(tokens, dtype=np.int32)
    count = len(tokens) - 1
    rows = _rows_per_batch(model, seq_len, batch_size)
    total = 0.0
    with tqdm(
        total=count, unit="tok", unit_scale=True, desc="evaluating", disable=not progress
    ) as bar:
        for batch in _window_batches(tokens, seq_len, rows):
            logits = model(mx.array(batch[:, :-1])).astype(mx.float32)
            loss = nn.losses.cross_entropy(logits, mx.array(batch[:, 1:]), reduction="sum")
            total += loss.item()
            bar.update(batch.shape[0] * (batch.shape[1] - 1))
    result: dict[str, Any] = {
        "loss": total / count,
        "ppl": math.exp(total / count),
        "tokens": count,
    }
    if byte_lengths is not None:
        predicted_bytes = int(byte_lengths[tokens[1:]].sum())
        result["bytes"] = predicted_bytes
        result["bpb"] = total / math.log(2) / predicted_bytes if predicted_bytes else None
    return result


def _rows_per_batch(model: nn.Module, seq_len: int, batch_size: int) -> int:
    vocab = getattr(getattr(model, "args", None), "vocab_size", 0) or 1
    return max(1, min(batch_size, LOGITS_BUDGET // (seq_len * vocab)))


def _window_batches(tokens: np.ndarray, seq_len: int, rows: int):
    """(rows, seq_len + 1) arrays of consecutive windows (each shares its last token with the
    next one's first), then the shorter last window alone."""
    starts = range(0, len(tokens) - 1, seq_len)
    full = [s for s in starts if s + seq_len + 1 <= len(tokens)]
    for i in range(0, len(full), rows):
        yield np.stack([tokens[s : s + seq_len + 1] for s in full[i : i + rows]])
    rest = full[-1] + seq_len if full else 0
    if rest < len(tokens) - 1:
        yield tokens[None, rest:]


def eval_window(model: nn.Module) -> int:
    """Tokens per evaluation window: the model's context, capped so one window stays cheap."""
    return min(context_length(model) or DEFAULT_WINDOW, MAX_WINDOW)


def document_end_id(tokenizer: Any) -> int | None:
    """The id that training puts after every document (`eot_id`), else the tokenizer's eos."""
    try:
        return eot_id(tokenizer.backend_tokenizer)
    except (AttributeError, DataError):  # no fast tokenizer, or none of the usual end tokens
        return tokenizer.eos_token_id


def tokenize_text(
    tokenizer: Any, text_path: str | Path, max_tokens: int | None = None
) -> np.ndarray:
    """Every document of a text source, tokenized and joined as in training (each followed by
    the end-of-document id), up to `max_tokens`: reading stops once that many are in hand."""
    end = document_end_id(tokenizer)
    ids: list[int] = []
    for document in iter_documents(str(text_path)):
        ids.extend(tokenizer.encode(document, add_special_tokens=False))
        if end is not None:
            ids.append(end)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return np.array(ids[:max_tokens], dtype=np.int32)


def held_out_tokens(
    model_dir: Path,
    tokenizer,
    text: str | Path | None,
    max_tokens: int | None = None,
    progress: bool | None = None,
) -> np.ndarray | None:
    """`text` tokenized, else the held-out split of the data the model was trained on (rebuilt
    from its provenance), cut to `max_tokens`; None when there is neither."""
    if text is not None:
        return tokenize_text(tokenizer, text, max_tokens)
    data_config = read_provenance(model_dir).data_config
    if data_config is None:
        return None
    from appleslm.config import DataConfig
    from appleslm.data import prepare_data

    cfg = DataConfig(**{**data_config, "tokenizer": str(model_dir)})
    prepared = prepare_data(cfg, vocab_size=tokenizer.vocab_size, progress=progress)
    return np.asarray(prepared.val[:max_tokens])


def evaluate_text(
    model_spec: str | Path | ModelChoice,
    text_path: str | Path | None = None,
    seq_len: int | None = None,
    trust_remote_code: bool = False,
    *,
    max_tokens: int | None = None,
    batch_size: int = BATCH_WINDOWS,
    progress: bool = False,
    log: Callable[[str], Any] = _stderr,
) -> dict[str, Any]:
    """Loss, perplexity and bits per byte of a model on a text source, or with `text_path` None
    on the held-out split of the data it was trained on; at most `max_tokens` tokens. A
    `ModelChoice` with `proxy` measures the proxy-tuned composite (on the base's held-out split
    by default)."""
    for name, value, least in (("--seq-len", seq_len, 1), ("--max-tokens", max_tokens, 2)):
        if value is not None and value < least:
            raise EvaluationError(f"{name} must be at least {least}, not {value}")
    if batch_size < 1:
        raise EvaluationError(f"--batch-size must be at least 1, not {batch_size}")
    choice = model_spec if isinstance(model_spec, ModelChoice) else ModelChoice(str(model_spec))
    model_dir = resolve_model(choice.model)
    if text_path is None and read_provenance(model_dir).data_config is None:
        raise EvaluationError(
            f"{model_dir} records no training data (its appleslm.json has no data_config), so "
            "it has no held-out split: pass --data with a text file, folder or JSONL"
        )
    model, tokenizer, _ = load_choice(
        dataclasses.replace(choice, model=str(model_dir)),
        loader=load_for_evaluation,
        trust_remote_code=trust_remote_code,
    )
    log(
        f"tokenizing {text_path}..."
        if text_path is not None
        else f"rebuilding the held-out split of the data {model_dir} was trained on..."
    )
    tokens = held_out_tokens(model_dir, tokenizer, text_path, max_tokens, progress)
    what = str(text_path) if text_path is not None else HELD_OUT
    window = seq_len or eval_window(model)
    log(f"evaluating on {len(tokens):,} tokens of {what} in windows of {window}...")
    result = evaluate_tokens(
        model,
        tokens,
        window,
        batch_size=batch_size,
        byte_lengths=token_byte_lengths(tokenizer),
        progress=progress,
    )
    return {**result, "data": what}
