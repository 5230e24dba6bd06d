"""What the training loop minimises, as (sum over the predicted tokens, how many there are).

A loss as a sum and a count, not a mean, is what lets the loop weight every token equally across
micro-batches of different padding (fine-tuning) and across data-parallel ranks: the loop adds
sums and counts up and divides once.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

GENERATOR_BUCKET = 64  # pad a batch's distinct ids to a multiple of this: few compiled shapes

Batch = dict[str, mx.array]


def computes_embeddings(model: nn.Module) -> bool:
    """Whether the model's input vectors come from a network (Leviathan's generator), which
    training then runs once per distinct id of a batch instead of once per position."""
    return getattr(getattr(model, "args", None), "embedding", "table") != "table"


def model_batch(
    model: nn.Module, x: np.ndarray, y: np.ndarray, mask: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """The arrays `token_loss` reads: inputs, targets, an optional loss mask, and for a model
    with a computed embedding the batch's distinct ids and the map back to positions."""
    batch = {"inputs": x, "targets": y}
    if mask is not None:
        batch["mask"] = mask
    if computes_embeddings(model):
        unique_ids, inverse = np.unique(x, return_inverse=True)
        padding = np.full((-len(unique_ids)) % GENERATOR_BUCKET, unique_ids[0])
        batch["unique_ids"] = np.concatenate([unique_ids, padding])
        batch["inverse"] = inverse.reshape(x.shape)
    return batch


def to_mx(batch: dict[str, np.ndarray]) -> Batch:
    return {name: mx.array(value) for name, value in batch.items()}


def token_loss(model: nn.Module, batch: Batch) -> tuple[mx.array, mx.array]:
    """(summed next-token cross-entropy, number of predicted tokens), over `mask` if given."""
    embeddings = None
    if "unique_ids" in batch:
        embeddings = model.embed_unique(batch["unique_ids"], batch["inverse"])
    logits = model(batch["inputs"], input_embeddings=embeddings)
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), batch["targets"], reduction="none")
    if "mask" in batch:
        return (ce * batch["mask"]).sum(), batch["mask"].sum()
    return ce.sum(), mx.array(ce.size, dtype=mx.float32)
