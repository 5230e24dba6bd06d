"""Validation loss and perplexity of any model on any text."""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from appleslm.data.corpus import iter_documents
from appleslm.io.files import read_provenance
from appleslm.io.model_dir import load_model
from appleslm.models import context_length

DEFAULT_WINDOW = 512  # for a model whose config declares no context
MAX_WINDOW = 2048


def evaluate_tokens(model: nn.Module, tokens: np.ndarray, seq_len: int = 512) -> dict[str, float]:
    """Mean next-token cross-entropy over every token after the first, in non-overlapping windows
    of `seq_len` targets (the last window may be shorter)."""
    if len(tokens) < 2:
        raise ValueError("too little text to evaluate (need at least 2 tokens)")
    total = 0.0
    for start in range(0, len(tokens) - 1, seq_len):
        window = np.asarray(tokens[start : start + seq_len + 1], dtype=np.int32)
        logits = model(mx.array(window[None, :-1])).astype(mx.float32)
        loss = nn.losses.cross_entropy(logits, mx.array(window[None, 1:]), reduction="sum")
        total += loss.item()
    count = len(tokens) - 1
    return {"loss": total / count, "ppl": math.exp(total / count), "tokens": count}


def eval_window(model: nn.Module) -> int:
    """Tokens per evaluation window: the model's context, capped so one window stays cheap."""
    return min(context_length(model) or DEFAULT_WINDOW, MAX_WINDOW)


def tokenize_text(tokenizer, text_path: str | Path) -> np.ndarray:
    """Every document of a text source, tokenized and joined by EOS as in training."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for document in iter_documents(str(text_path)):
        ids.extend(tokenizer.encode(document, add_special_tokens=False))
        if eos is not None:
            ids.append(eos)
    return np.array(ids, dtype=np.int32)


def evaluate_text(
    model_spec: str | Path,
    text_path: str | Path,
    seq_len: int | None = None,
    trust_remote_code: bool = False,
) -> dict[str, float]:
    model, tokenizer = load_model(model_spec, trust_remote_code=trust_remote_code)
    tokens = tokenize_text(tokenizer, text_path)
    return evaluate_tokens(model, tokens, seq_len or eval_window(model))


def held_out_tokens(
    model_dir: Path, tokenizer, text: str | Path | None, max_tokens: int | None = None
) -> np.ndarray | None:
    """`text` tokenized, else the held-out split of the data the model was trained on (rebuilt
    from its provenance), cut to `max_tokens`; None when there is neither."""
    if text is not None:
        return tokenize_text(tokenizer, text)[:max_tokens]
    data_config = read_provenance(model_dir).data_config
    if data_config is None:
        return None
    from appleslm.config import DataConfig
    from appleslm.data import prepare_data

    cfg = DataConfig(**{**data_config, "tokenizer": str(model_dir)})
    return np.asarray(prepare_data(cfg, vocab_size=tokenizer.vocab_size).val[:max_tokens])
