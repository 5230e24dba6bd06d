"""The output head and token cross-entropy, fused and chunked: never the full B x L x V logits.

`token_loss_sums(h, head_weight, targets, mask)` returns (sum of per-token losses, token count)
for the logits `h @ head_weight.T` without materializing them: the rows are processed in chunks
of `chunk` tokens, and each chunk's gradient with respect to its logits, (softmax - one-hot) x
mask, is formed while its logits are live and immediately pushed through the head's two
gradient matmuls. The forward therefore returns the loss together with the (unscaled)
gradients, and the custom VJP only scales them by the incoming cotangent: three head matmuls per
step, as the plain path, and one exponential per logit instead of two. Chunks are chained with
`mx.depends`, so MLX finishes one chunk before it starts the next and peak memory holds about
one chunk of logits. It serves any head given as a (V, D) matrix: a tied table, an untied head,
a byte head's output matrix; masked (SFT) and unmasked losses.

For evaluation pass `grad=False`: the loss alone, one head matmul per chunk.
"""

from __future__ import annotations

import mlx.core as mx

from appleslm.models import kernels

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


def _forward(h, weight, targets, mask, chunk: int, grad: bool):
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
        d_w = d_logits.T @ x.astype(mx.float32)  # accumulated in float32 across chunks
        d_weight = d_w if d_weight is None else d_weight + d_w
        d_h.append(d_x)
        after = [loss, d_x, d_weight]
    if not grad:
        return loss
    d_h = mx.concatenate(d_h).astype(h.dtype) if len(d_h) > 1 else d_h[0].astype(h.dtype)
    return loss, d_h, d_weight.astype(weight.dtype)


_FUSED: dict[tuple[int, bool], mx.custom_function] = {}


def _fused(chunk: int, masked: bool) -> mx.custom_function:
    """The custom function for one chunk size, with or without a mask (cached)."""
    key = (chunk, masked)
    if key in _FUSED:
        return _FUSED[key]

    if masked:

        def loss_and_grads(h, weight, targets, mask):
            return _forward(h, weight, targets, mask, chunk, grad=True)

    else:

        def loss_and_grads(h, weight, targets):
            return _forward(h, weight, targets, None, chunk, grad=True)

    fn = mx.custom_function(loss_and_grads)

    @fn.vjp
    def vjp(primals, cotangents, outputs):
        g = cotangents[0]
        h, weight = primals[0], primals[1]
        grads = [(outputs[1] * g).astype(h.dtype), (outputs[2] * g).astype(weight.dtype)]
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
) -> tuple[mx.array, mx.array]:
    """(sum of token cross-entropies, number of tokens) of the logits `h @ head_weight.T`.

    h: (..., D) final-norm hidden states; head_weight: (V, D), the tied table or untied head;
    targets: (...) token ids; mask: optional (...) float weights (SFT: 1 on trained tokens), in
    which case the sum is weighted and the count is the mask's sum. Differentiable with respect
    to `h` and `head_weight` (custom VJP, values and gradients equal to
    `nn.losses.cross_entropy(h @ W.T, targets)` summed under the mask). `chunk` is the number of
    tokens per chunk (default: about 4M logits per chunk). `grad=False` computes the loss alone
    (evaluation); it must not be differentiated.
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
        total = _forward(flat_h, head_weight, flat_targets, flat_mask, chunk, grad=False)
        return mx.stop_gradient(total), count
    args = (flat_h, head_weight, flat_targets) + (() if flat_mask is None else (flat_mask,))
    return _fused(chunk, flat_mask is not None)(*args)[0], count
