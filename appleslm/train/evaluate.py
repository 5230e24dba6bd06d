"""Validation loss and perplexity of any model on any text."""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from appleslm.data.corpus import iter_documents
from appleslm.io import load_model


def token_windows(ids: np.ndarray, seq_len: int) -> list[np.ndarray]:
    """Non-overlapping windows of seq_len + 1 tokens covering every token once as a target;
    the last one may be shorter."""
    step = seq_len
    return [ids[start : start + seq_len + 1] for start in range(0, len(ids) - 1, step)]


def sequence_loss_sum(model: nn.Module, window: np.ndarray) -> float:
    x, y = mx.array(window[None, :-1]), mx.array(window[None, 1:])
    logits = model(x).astype(mx.float32)
    return nn.losses.cross_entropy(logits, y, reduction="sum").item()


def evaluate_text(
    model_spec: str | Path,
    text_path: str | Path,
    seq_len: int | None = None,
    trust_remote_code: bool = False,
) -> dict[str, float | int]:
    """Mean next-token cross-entropy over every token of the text (documents joined by EOS)."""
    model, tokenizer = load_model(model_spec, trust_remote_code=trust_remote_code)
    seq_len = seq_len or getattr(getattr(model, "args", None), "max_position_embeddings", 512)
    seq_len = min(seq_len, 2048)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for document in iter_documents(str(text_path)):
        ids.extend(tokenizer.encode(document, add_special_tokens=False))
        if eos is not None:
            ids.append(eos)
    tokens = np.array(ids, dtype=np.int32)
    if len(tokens) < 2:
        raise ValueError(f"{text_path}: too little text to evaluate (need at least 2 tokens)")
    total = sum(sequence_loss_sum(model, w) for w in token_windows(tokens, seq_len))
    count = len(tokens) - 1
    loss = total / count
    return {"loss": loss, "ppl": math.exp(loss), "tokens": count}
