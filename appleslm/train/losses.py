"""What the training loop minimises, as (sum over the predicted tokens, how many there are).

A loss as a sum and a count, not a mean, is what lets the loop weight every token equally across
micro-batches of different padding (fine-tuning) and across data-parallel ranks: the loop adds
sums and counts up and divides once.

For a linear head the head and the cross-entropy run fused and chunked (`token_loss_sums`),
never materializing the B x L x V logits: the rows go through in chunks, and each chunk's
gradient with respect to its logits, (softmax - one-hot) x mask, is formed while its logits are
live and pushed straight through the head's two gradient matmuls. The forward returns the loss
with the (unscaled) gradients and the custom VJP only scales them: three head matmuls per step,
as the plain path, and one exponential per logit instead of two. Chunks are chained with
`mx.depends`, so peak memory holds about one chunk of logits. `grad=False` is the evaluation
path: the loss alone, one head matmul per chunk.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from appleslm.models import kernels

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


def linear_head(model: nn.Module) -> nn.Module | None:
    """The plain (V, D) output layer of one of our models (the tied table or the untied head),
    which `token_loss_sums` can run fused; None for a byte head, a quantized or an adapted one."""
    args = getattr(model, "args", None)
    if not hasattr(model, "hidden_states") or getattr(args, "head", "linear") != "linear":
        return None
    module = model.embed_tokens if args.tie_word_embeddings else model.lm_head
    if type(module) is nn.Embedding or (type(module) is nn.Linear and "bias" not in module):
        return module
    return None


def trains(module: nn.Module, name: str = "weight") -> bool:
    return name in dict(tree_flatten(module.trainable_parameters()))


def token_loss(model: nn.Module, batch: Batch) -> tuple[mx.array, mx.array]:
    """(summed next-token cross-entropy, number of predicted tokens) of any mlx-lm model, over
    `mask` if given: what validation measures, whatever the model trains on."""
    embeddings = input_embeddings(model, batch)
    head = linear_head(model)
    if head is not None:
        h, _ = model.hidden_states(batch["inputs"], input_embeddings=embeddings)
        return token_loss_sums(h, head.weight, batch["targets"], batch.get("mask"), grad=False)
    logits = model(batch["inputs"], input_embeddings=embeddings)
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), batch["targets"], reduction="none")
    return masked_sums(ce, batch)


def training_loss(model: nn.Module, batch: Batch) -> tuple[mx.array, mx.array, dict[str, mx.array]]:
    """(summed training loss, number of predicted tokens, raw auxiliary terms) of our family.

    The per-token loss is the model's own: cross-entropy, fused with a linear head
    (`token_loss_sums`), or `token_losses` for a byte head (STLM's per-slot loss when trained
    `faithful`), plus each MoE auxiliary term times its
    coefficient, counted once per predicted token so that sums over micro-batches and ranks
    weigh it as the loop weighs the cross-entropy.
    """
    from appleslm.models import token_losses

    h, aux = model.features(batch["inputs"], input_embeddings=input_embeddings(model, batch))
    head = linear_head(model)
    if head is not None:
        total, count = token_loss_sums(
            h, head.weight, batch["targets"], batch.get("mask"), head_grad=trains(head)
        )
    else:
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


CHUNK_LOGITS = 1 << 22  # logits per chunk (16 MiB in float32) when `chunk` is not given


def default_chunk(vocab_size: int) -> int:
    """Rows per chunk: about CHUNK_LOGITS logits, at least one row."""
    return max(1, CHUNK_LOGITS // vocab_size)


def _exp(x: mx.array) -> mx.array:
    return kernels.exp(x) if kernels.enabled() else mx.exp(x)


def _chunk_softmax(logits: mx.array) -> tuple[mx.array, mx.array]:
    """Probabilities and log-sum-exp of float32 logits, one exponential per logit."""
    top = logits.max(axis=-1, keepdims=True)
    e = _exp(kernels.boundary(logits - top))  # materialized: exp runs as a contiguous kernel
    total = e.sum(axis=-1, keepdims=True)
    return e * (1.0 / total), top + mx.log(total)


def _forward(h, weight, targets, mask, chunk: int, grad: bool, head_grad: bool):
    n = h.shape[0]
    loss = mx.array(0.0, mx.float32)
    d_h, d_weight, after = [], None, []
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        x, y = h[rows], targets[rows][:, None]
        if after:  # start this chunk only once the previous one is done: one chunk live at a time
            x = mx.depends(x, after)
        logits = (x @ weight.T).astype(mx.float32)
        p, lse = _chunk_softmax(logits)
        token_loss = (lse - mx.take_along_axis(logits, y, axis=-1))[:, 0]
        m = None if mask is None else mask[rows]
        loss = loss + (token_loss if m is None else token_loss * m).sum()
        if not grad:
            after = [loss]
            continue
        if m is not None:
            p = p * m[:, None]
        at_target = mx.take_along_axis(p, y, axis=-1) - (1.0 if m is None else m[:, None])
        d_logits = mx.put_along_axis(p, y, at_target, axis=-1)  # (softmax - one-hot) x mask
        d_x = d_logits.astype(weight.dtype) @ weight
        d_h.append(d_x)
        after = [loss, d_x]
        if head_grad:
            d_w = d_logits.T @ x.astype(mx.float32)  # accumulated in float32 across chunks
            d_weight = d_w if d_weight is None else d_weight + d_w
            after.append(d_weight)
    if not grad:
        return loss
    d_h = mx.concatenate(d_h).astype(h.dtype) if len(d_h) > 1 else d_h[0].astype(h.dtype)
    if not head_grad:
        return loss, d_h
    return loss, d_h, d_weight.astype(weight.dtype)


_FUSED: dict[tuple[int, bool, bool], mx.custom_function] = {}


def _fused(chunk: int, masked: bool, head_grad: bool) -> mx.custom_function:
    """The custom function for one chunk size, with or without a mask and the head's gradient
    (cached: one function per combination)."""
    key = (chunk, masked, head_grad)
    if key in _FUSED:
        return _FUSED[key]

    if masked:

        def loss_and_grads(h, weight, targets, mask):
            return _forward(h, weight, targets, mask, chunk, True, head_grad)

    else:

        def loss_and_grads(h, weight, targets):
            return _forward(h, weight, targets, None, chunk, True, head_grad)

    fn = mx.custom_function(loss_and_grads)

    @fn.vjp
    def vjp(primals, cotangents, outputs):
        g = cotangents[0]
        h, weight = primals[0], primals[1]
        d_weight = outputs[2] * g if head_grad else mx.zeros_like(weight)
        grads = [(outputs[1] * g).astype(h.dtype), d_weight.astype(weight.dtype)]
        return tuple(grads + [mx.zeros_like(p) for p in primals[2:]])

    _FUSED[key] = fn
    return fn


def token_loss_sums(
    h: mx.array,
    head_weight: mx.array,
    targets: mx.array,
    mask: mx.array | None = None,
    chunk: int | None = None,
    grad: bool = True,
    head_grad: bool = True,
) -> tuple[mx.array, mx.array]:
    """(sum of token cross-entropies, number of tokens) of the logits `h @ head_weight.T`.

    h: (..., D) final-norm hidden states; head_weight: (V, D), the tied table or untied head;
    targets: (...) token ids; mask: optional (...) float weights (SFT: 1 on trained tokens), in
    which case the sum is weighted and the count is the mask's sum. Differentiable with respect
    to `h` and `head_weight` (custom VJP, values and gradients equal to
    `nn.losses.cross_entropy(h @ W.T, targets)` summed under the mask). `chunk` is the number of
    tokens per chunk (default: about 4M logits per chunk). `head_grad=False` skips the head's
    gradient (a frozen head: it comes back as zeros, one matmul fewer). `grad=False` computes the
    loss alone (evaluation); it must not be differentiated.
    """
    dim = h.shape[-1]
    flat_h = h.reshape(-1, dim)
    flat_targets = targets.reshape(-1)
    chunk = chunk or default_chunk(head_weight.shape[0])
    if mask is None:
        flat_mask, count = None, mx.array(float(flat_targets.size), mx.float32)
    else:
        flat_mask = mask.reshape(-1).astype(mx.float32)
        count = flat_mask.sum()
    if not grad:
        total = _forward(flat_h, head_weight, flat_targets, flat_mask, chunk, False, False)
        return mx.stop_gradient(total), count
    args = (flat_h, head_weight, flat_targets) + (() if flat_mask is None else (flat_mask,))
    return _fused(chunk, flat_mask is not None, head_grad)(*args)[0], count


def distillation_loss(teacher: nn.Module, vocab: int, temperature: float, ce_weight: float):
    """The training loss of a student distilled from `teacher` over the first `vocab` logits
    (the shared tokenizer's ids; either model may pad its head beyond them): per predicted
    token, (1 - ce_weight) * T^2 * KL(softmax(teacher / T) || softmax(student / T)) plus
    ce_weight * the student's cross-entropy on the data, summed over `mask` if given. The KL is
    mlx-lm's (`mlx_lm.tuner.losses.kl_div_loss`, as its DWQ distillation uses it); the teacher
    is a constant of the step."""
    from mlx_lm.tuner.losses import kl_div_loss

    def loss(model: nn.Module, batch: Batch) -> tuple[mx.array, mx.array, dict[str, mx.array]]:
        inputs = batch["inputs"]
        student = model(inputs, input_embeddings=input_embeddings(model, batch))
        student = student[..., :vocab].astype(mx.float32)
        target = mx.stop_gradient(teacher(inputs)[..., :vocab].astype(mx.float32))
        per_token = (
            (1 - ce_weight)
            * temperature**2
            * kl_div_loss(student / temperature, target / temperature)
        )
        if ce_weight:
            ce = nn.losses.cross_entropy(student, batch["targets"], reduction="none")
            per_token = per_token + ce_weight * ce
        total, count = masked_sums(per_token, batch)
        return total, count, {}

    return loss
