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
    """Whether the model's input vectors come from a network (Leviathan's generator, STLM's byte
    encoder), which training then runs once per distinct id of a batch, not once per position."""
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


# ModelArgs' coefficient for each raw auxiliary term `Model.features` returns.
AUX_COEFFICIENTS = {"router_balance": "router_aux_loss_coef", "router_z": "router_z_loss_coef"}


def input_embeddings(model: nn.Module, batch: Batch) -> mx.array | None:
    if "unique_ids" not in batch:
        return None
    return model.embed_unique(batch["unique_ids"], batch["inverse"])


def masked_sums(losses: mx.array, batch: Batch) -> tuple[mx.array, mx.array]:
    """(sum, count) of per-position losses over the batch's mask (every position without one)."""
    if "mask" in batch:
        return (losses * batch["mask"]).sum(), batch["mask"].sum()
    return losses.sum(), mx.array(losses.size, dtype=mx.float32)


def token_loss(model: nn.Module, batch: Batch) -> tuple[mx.array, mx.array]:
    """(summed next-token cross-entropy, number of predicted tokens) of any mlx-lm model, over
    `mask` if given: what validation measures, whatever the model trains on."""
    logits = model(batch["inputs"], input_embeddings=input_embeddings(model, batch))
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), batch["targets"], reduction="none")
    return masked_sums(ce, batch)


def training_loss(model: nn.Module, batch: Batch) -> tuple[mx.array, mx.array, dict[str, mx.array]]:
    """(summed training loss, number of predicted tokens, raw auxiliary terms) of our family.

    The per-token loss is the model's own (`token_losses`: cross-entropy, or STLM's per-slot
    loss for a byte head trained `faithful`), plus each MoE auxiliary term times its
    coefficient, counted once per predicted token so that sums over micro-batches and ranks
    weigh it as the loop weighs the cross-entropy.
    """
    from appleslm.models import token_losses

    h, aux = model.features(batch["inputs"], input_embeddings=input_embeddings(model, batch))
    total, count = masked_sums(token_losses(model, h, batch["targets"]), batch)
    for name, value in aux.items():
        total = total + count * getattr(model.args, AUX_COEFFICIENTS[name]) * value
    return total, count, aux


def loss_for(model: nn.Module):
    """The training loss for `model`: ours has features and aux terms, any other mlx-lm model
    (a GGUF import being fine-tuned) the plain cross-entropy."""
    if hasattr(model, "features"):
        return training_loss
    return lambda model, batch: (*token_loss(model, batch), {})
