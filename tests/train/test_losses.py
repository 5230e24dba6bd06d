"""The fused, chunked head + cross-entropy equals the plain logits path, values and gradients."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from appleslm.models import kernels
from appleslm.train.losses import default_chunk, token_loss_sums

TOL = 1e-5
B, L, D, V = 3, 17, 16, 101


def close(a, b, tol=TOL):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.max(np.abs(a - b)) <= tol * max(1.0, np.max(np.abs(b)))


def plain_sums(h, weight, targets, mask=None):
    losses = nn.losses.cross_entropy(h @ weight.T, targets, reduction="none")
    return (losses if mask is None else losses * mask).sum()


@pytest.fixture
def batch():
    mx.random.seed(0)
    h = mx.random.normal((B, L, D))
    weight = mx.random.normal((V, D)) * 0.5
    targets = mx.random.randint(0, V, (B, L))
    mask = (mx.random.uniform(shape=(B, L)) > 0.3).astype(mx.float32)
    return h, weight, targets, mask


@pytest.mark.parametrize("kernels_on", [True, False])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("chunk", [None, 1, 7, 16, 51, 1000])
def test_values_and_gradients_equal_plain_cross_entropy(batch, chunk, masked, kernels_on):
    h, weight, targets, mask = batch
    mask = mask if masked else None
    with kernels.forced(kernels_on):
        (total, grads) = mx.value_and_grad(
            lambda h, w: token_loss_sums(h, w, targets, mask, chunk=chunk)[0], argnums=(0, 1)
        )(h, weight)
    (want, want_grads) = mx.value_and_grad(
        lambda h, w: plain_sums(h, w, targets, mask), argnums=(0, 1)
    )(h, weight)
    assert close(total, want)
    for got, expected in zip(grads, want_grads):
        assert close(got, expected)
    _, count = token_loss_sums(h, weight, targets, mask, chunk=chunk)
    assert count.item() == (B * L if mask is None else mask.sum().item())


def test_tied_table_gets_both_gradients(batch):
    """A tied table is the input embedding and the head: its gradient sums both paths."""
    _, table, targets, mask = batch
    inputs = mx.random.randint(0, V, (B, L))
    proj = mx.random.normal((D, D)) * 0.3

    def mine(table):
        h = mx.tanh(table[inputs] @ proj)
        return token_loss_sums(h, table, targets, mask, chunk=10)[0]

    def plain(table):
        h = mx.tanh(table[inputs] @ proj)
        return plain_sums(h, table, targets, mask)

    assert close(mx.grad(mine)(table), mx.grad(plain)(table))


def test_untied_head_and_upstream_cotangent(batch):
    """Mean loss (sum / count) scaled by 3: the VJP scales by the incoming cotangent."""
    h, head, targets, mask = batch

    def mine(h, head):
        total, count = token_loss_sums(h, head, targets, mask, chunk=8)
        return 3.0 * total / count

    def plain(h, head):
        return 3.0 * plain_sums(h, head, targets, mask) / mask.sum()

    got = mx.grad(mine, argnums=(0, 1))(h, head)
    want = mx.grad(plain, argnums=(0, 1))(h, head)
    for a, b in zip(got, want):
        assert close(a, b)


def test_inside_compile_and_value_only(batch):
    h, weight, targets, mask = batch
    step = mx.compile(
        mx.value_and_grad(lambda h, w: token_loss_sums(h, w, targets, mask, chunk=9)[0], (0, 1))
    )
    total, _ = step(h, weight)
    evaluation, _ = token_loss_sums(h, weight, targets, mask, chunk=9, grad=False)
    assert close(total, plain_sums(h, weight, targets, mask))
    assert close(evaluation, total)


def test_bfloat16_close_to_plain(batch):
    h, weight, targets, _ = batch
    h, weight = h.astype(mx.bfloat16), weight.astype(mx.bfloat16)
    grads = mx.grad(lambda h, w: token_loss_sums(h, w, targets, chunk=5)[0], (0, 1))(h, weight)
    want = mx.grad(lambda h, w: plain_sums(h, w, targets.reshape(-1, L)), (0, 1))(h, weight)
    assert [g.dtype for g in grads] == [mx.bfloat16, mx.bfloat16]
    for a, b in zip(grads, want):
        assert close(a.astype(mx.float32), b.astype(mx.float32), tol=3e-2)


def test_two_dimensional_inputs_and_default_chunk():
    h = mx.random.normal((40, D))
    weight = mx.random.normal((V, D))
    targets = mx.random.randint(0, V, (40,))
    total, count = token_loss_sums(h, weight, targets)
    assert close(total, plain_sums(h, weight, targets)) and count.item() == 40
    assert default_chunk(49152) == 85 and default_chunk(10) == 419430


def plain_training_loss(model, batch):
    """training_loss as it was before the fused head: cross-entropy over the full logits."""
    from appleslm.models import token_losses
    from appleslm.train.losses import AUX_COEFFICIENTS, input_embeddings, masked_sums

    h, aux = model.features(batch["inputs"], input_embeddings=input_embeddings(model, batch))
    total, count = masked_sums(token_losses(model, h, batch["targets"]), batch)
    for name, value in aux.items():
        total = total + count * getattr(model.args, AUX_COEFFICIENTS[name]) * value
    return total, count


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(
    "options",
    [dict(), dict(embedding="leviathan"), dict(ffn="moe")],
    ids=["tied-table", "untied-leviathan", "tied-moe"],
)
def test_the_trainers_losses_take_the_fused_path_and_equal_the_logits_path(options, masked):
    from mlx.utils import tree_flatten

    from appleslm.train.losses import linear_head, model_batch, to_mx, token_loss, training_loss
    from tests.helpers import build_tiny, option_overrides

    model = build_tiny(**option_overrides(**options))
    assert linear_head(model) is not None
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model.args.vocab_size, (2, 13))
    mask = (rng.random((2, 12)) > 0.3).astype(np.float32) if masked else None
    batch = to_mx(model_batch(model, tokens[:, :-1], tokens[:, 1:], mask))

    def fused(model):
        total, count, _ = training_loss(model, batch)
        return total / count

    def plain(model):
        total, count = plain_training_loss(model, batch)
        return total / count

    value, grads = nn.value_and_grad(model, fused)(model)
    want, want_grads = nn.value_and_grad(model, plain)(model)
    assert close(value, want)
    want_grads = dict(tree_flatten(want_grads))
    for name, grad in tree_flatten(grads):
        assert close(grad, want_grads[name]), name
    evaluation, count = token_loss(model, batch)
    logits = model(batch["inputs"])
    ce = nn.losses.cross_entropy(logits, batch["targets"], reduction="none")
    weights = batch.get("mask", mx.ones(ce.shape))
    assert close(evaluation, (ce * weights).sum()) and count.item() == weights.sum().item()


def test_a_frozen_head_gets_no_head_gradient_and_the_same_input_gradient(batch):
    h, weight, targets, mask = batch
    both = mx.grad(lambda h, w: token_loss_sums(h, w, targets, mask)[0], (0, 1))(h, weight)
    frozen = mx.grad(lambda h, w: token_loss_sums(h, w, targets, mask, head_grad=False)[0], (0, 1))(
        h, weight
    )
    assert close(frozen[0], both[0])
    assert not frozen[1].any().item()


def test_byte_heads_quantized_and_adapted_heads_keep_the_logits_path():
    from mlx_lm.tuner.lora import LoRALinear

    from appleslm.train.losses import linear_head
    from tests.helpers import build_tiny, option_overrides

    assert linear_head(build_tiny(**option_overrides(head="bytes"))) is None
    model = build_tiny(**option_overrides())
    nn.quantize(model, group_size=32, bits=4)
    assert linear_head(model) is None
    untied = build_tiny(**option_overrides(embedding="leviathan"))
    untied.lm_head = LoRALinear.from_base(untied.lm_head, r=4)
    assert linear_head(untied) is None
