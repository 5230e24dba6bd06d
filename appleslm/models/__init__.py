"""The model family: one architecture file (`appleslm.py`) and what every command asks of it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from appleslm.models import appleslm as _architecture
from appleslm.models import kernels as _kernels
from appleslm.models.appleslm import BYTE_PAD, LeviathanGenerator, Model, ModelArgs, digit_base

# Our faster CPU training kernels for the installed architecture module (each switches itself
# on by backend: see kernels.enabled()); a model directory's own copy runs the plain ops.
_kernels.install(_architecture.KERNELS)

__all__ = [
    "LeviathanGenerator",
    "Model",
    "ModelArgs",
    "build_model",
    "context_length",
    "digit_base",
    "parameter_counts",
    "token_losses",
]
CONTEXT_KEYS = ("max_position_embeddings", "max_sequence_length", "n_positions", "n_ctx")
EMBEDDING_PREFIXES = ("embed_tokens.", "embed_generator.", "embed_bytes.", "lm_head.", "byte_head.")
ROLE_COUNTS = {  # extra counts `appleslm info` shows for the computed embedders and the byte head
    "params_generator": "embed_generator.",
    "params_byte_embedder": "embed_bytes.",
    "params_byte_head": "byte_head.",
}


def build_model(args: ModelArgs, tokenizer: Any = None, log: Callable[[str], Any] = print) -> Model:
    """A new model; a byte-level embedder or head gets its id -> bytes table from `tokenizer`
    (a `tokenizers.Tokenizer` or a wrapper of one), and `log` hears how many entries lose bytes."""
    model = Model(args)
    if "token_bytes" not in model:
        return model
    if tokenizer is None:
        raise ValueError(
            f"embedding {args.embedding!r} / head {args.head!r} reads every id's bytes from the "
            "tokenizer: pass the tokenizer to build_model"
        )
    from appleslm.data.tokenizer import token_byte_table, tokens_longer_than

    table = token_byte_table(tokenizer, args.byte_slots)
    if len(table) > args.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(table):,} ids but vocab_size is {args.vocab_size:,}"
        )
    # Ids the tokenizer never produces (a BPE that ran out of merges) stay all-pad.
    full = np.full((args.vocab_size, args.byte_slots), BYTE_PAD, dtype=np.int32)
    full[: len(table)] = table
    model.token_bytes = mx.array(full)
    lost = tokens_longer_than(tokenizer, args.byte_slots)
    log(
        f"byte table: {lost:,} of {len(table):,} vocabulary entries are longer than "
        f"{args.byte_slots} bytes and lose the bytes past slot {args.byte_slots}"
    )
    return model


def context_length(model: nn.Module) -> int | None:
    """The context window any mlx-lm model's config declares (ours: max_position_embeddings)."""
    args = getattr(model, "args", None)
    for name in CONTEXT_KEYS:
        value = getattr(args, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameter counts by role. Shapes only: nothing is evaluated, so a 46B preset costs nothing.

    "Embedding" parameters are the input table (or generator, or byte embedder) plus an untied
    output head (or byte head), the MobileLLM paper's convention; a tied table is counted once.
    The byte table `token_bytes` is data, not a parameter. `params_active` counts only the top-k
    experts of every MoE FFN (what one token uses); it equals the total for a dense model.
    """
    sizes = {
        name: value.size
        for name, value in tree_flatten(model.parameters())
        if name != "token_bytes"
    }
    embedding = sum(n for name, n in sizes.items() if name.startswith(EMBEDDING_PREFIXES))
    total = sum(sizes.values())
    args = model.args
    experts = sum(n for name, n in sizes.items() if ".experts." in name)
    idle = experts * (args.num_experts - args.num_experts_per_tok) // max(args.num_experts, 1)
    counts = {
        "params_total": total,
        "params_active": total - idle,
        "params_embedding": embedding,
        "params_non_embedding": total - embedding,
        "layers_unique": args.num_hidden_layers,
        "layers_executed": args.num_hidden_layers * args.layer_repeat,
    }
    for key, prefix in ROLE_COUNTS.items():
        if any(name.startswith(prefix) for name in sizes):
            counts[key] = sum(n for name, n in sizes.items() if name.startswith(prefix))
    return counts


def token_losses(model: Model, h: mx.array, targets: mx.array) -> mx.array:
    """Per-position training loss (B, L) from hidden states `h` (`Model.features`).

    Token-level cross-entropy over `head_logits`, except for a byte head trained as STLM
    (`byte_head_loss: faithful`): the cross-entropy of each byte slot of the target id, pads
    included, averaged over the slots (nats per byte slot, not comparable to token perplexity;
    evaluate every model on the token-level cross-entropy).
    """
    if model.args.head == "bytes" and model.args.byte_head_loss == "faithful":
        byte_logits = model.byte_logits(h).astype(mx.float32)
        return nn.losses.cross_entropy(byte_logits, model.token_bytes[targets]).mean(axis=-1)
    return nn.losses.cross_entropy(model.head_logits(h).astype(mx.float32), targets)
