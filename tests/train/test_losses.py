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
