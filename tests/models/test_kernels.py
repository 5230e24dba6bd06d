"""The CPU training kernels: values and gradients equal the plain MLX ops they replace."""

import importlib.util
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from appleslm.models import Model, kernels
from appleslm.models import appleslm as architecture
from tests.helpers import tiny_args

TOL = 1e-5


def close(a, b, tol=TOL):
    """Equal to `tol`, relative to the larger magnitude (absolute below 1)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.max(np.abs(a - b)) <= tol * max(1.0, np.max(np.abs(b)))


def test_exp_matches_numpy_over_its_range():
    edges = [0.0, -0.0, 1e-30, -0.5, 0.5, 1.0, -87.3, -87.4, -88.0, -103.0, -200.0, -1e9]
    edges += [88.0, 88.7, 88.8, 200.0, 1e9]
    x = np.concatenate([np.random.default_rng(0).normal(size=20000) * 30, edges])
    x = x.astype(np.float32)
    with np.errstate(over="ignore"):
        want = np.exp(x.astype(np.float64))
    got = np.array(mx.compile(kernels.exp)(mx.array(x))).astype(np.float64)
    normal = (want > 2.0**-126) & (x < 88.0)  # mx.exp too returns inf from 88 on
    # relative error: the argument's rounding (|x| * 2^-24) plus a few ulps of polynomial
    rel = np.abs(got[normal] / want[normal] - 1) / (1 + np.abs(x[normal]))
    assert rel.max() < 3e-7
    assert np.all(got[want <= 2.0**-126] <= 2.0**-126)  # underflow: 0 (or the smallest normals)
    assert np.all(np.isinf(got[x > 88.75]))  # overflow: inf
    assert got[-6] == 0.0 and got[-1] == np.inf


def test_exp_uncompiled_equals_compiled():
    x = mx.random.normal((1000,)) * 30
    assert mx.array_equal(kernels.exp(x), mx.compile(kernels.exp)(x))


@pytest.mark.parametrize("shape", [(7, 33), (2, 3, 128)])
def test_softmax_values_and_vjp(shape):
    z = mx.random.normal(shape) * 4
    g = mx.random.normal(shape)
    assert close(kernels.softmax(z), mx.softmax(z, axis=-1))
    mine = mx.vjp(kernels.softmax, [z], [g])[1][0]
    plain = mx.vjp(lambda z: mx.softmax(z, axis=-1), [z], [g])[1][0]
    assert close(mine, plain)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4), (6, 1)])
def test_causal_attention_equals_fast_sdpa(heads, kv_heads):
    B, L, D = 2, 19, 16
    q = mx.random.normal((B, heads, L, D))
    k = mx.random.normal((B, kv_heads, L, D))
    v = mx.random.normal((B, kv_heads, L, D))
    w = mx.random.normal((B, heads, L, D))  # a cotangent that is not all ones

    def plain(q, k, v):
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=D**-0.5, mask="causal")
        return (out * w).sum()

    def mine(q, k, v):
        return (kernels.causal_attention(q, k, v, D**-0.5) * w).sum()

    value, grads = mx.value_and_grad(mine, argnums=(0, 1, 2))(q, k, v)
    value_p, grads_p = mx.value_and_grad(plain, argnums=(0, 1, 2))(q, k, v)
    assert close(value, value_p)
    for a, b in zip(grads, grads_p):
        assert close(a, b)


def test_swiglu_values_and_gradients():
    gate = mx.random.normal((5, 40)) * 6
    up = mx.random.normal((5, 40))
    w = mx.random.normal((5, 40))
    gate[0, :4] = mx.array([0.0, -0.0, 1e-30, -100.0])

    def loss(fn):
        return lambda g, u: (fn(g, u) * w).sum()

    plain = lambda g, u: nn.silu(g) * u  # noqa: E731
    assert close(kernels.swiglu(gate, up), plain(gate, up))
    mine = mx.grad(loss(kernels.swiglu), argnums=(0, 1))(gate, up)
    theirs = mx.grad(loss(plain), argnums=(0, 1))(gate, up)
    for a, b in zip(mine, theirs):
        assert close(a, b)


def test_swiglu_bfloat16_close_to_plain():
    gate = mx.random.normal((8, 64)).astype(mx.bfloat16)
    up = mx.random.normal((8, 64)).astype(mx.bfloat16)
    out = kernels.swiglu(gate, up)
    assert out.dtype == mx.bfloat16
    assert close(out.astype(mx.float32), (nn.silu(gate) * up).astype(mx.float32), tol=2e-2)


def model_loss(model, x, y):
    return nn.losses.cross_entropy(model(x), y, reduction="mean")


@pytest.mark.parametrize("overrides", [{}, dict(num_key_value_heads=1, tie_word_embeddings=False)])
def test_model_with_kernels_equals_plain_model(overrides):
    mx.random.seed(0)
    model = Model(tiny_args(**overrides))
    x = mx.random.randint(0, 300, (2, 24))
    y = mx.random.randint(0, 300, (2, 24))
    results = {}
    for on in (False, True):
        with kernels.forced(on):
            results[on] = nn.value_and_grad(model, model_loss)(model, x, y)
    (loss_plain, grads_plain), (loss_fast, grads_fast) = results[False], results[True]
    assert close(loss_fast, loss_plain)
    flat_plain = dict(nn.utils.tree_flatten(grads_plain))
    for name, grad in nn.utils.tree_flatten(grads_fast):
        assert close(grad, flat_plain[name]), name


def test_kernels_decline_what_they_do_not_cover():
    q = k = v = mx.random.normal((1, 2, 4, 8))
    with kernels.forced(True):
        assert kernels.attention_kernel(q, k, v, cache=object(), scale=1.0, mask="causal") is None
        assert kernels.attention_kernel(q, k, v, cache=None, scale=1.0, mask=None) is None
        mask = mx.ones((4, 4), dtype=mx.bool_)
        assert kernels.attention_kernel(q, k, v, cache=None, scale=1.0, mask=mask) is None
        assert kernels.attention_kernel(q, k, v, cache=None, scale=1.0, mask="causal") is not None
        decoding = mx.ones((1, 1, 64))  # one token: the plain ops' cheaper dispatch wins
        assert kernels.swiglu_kernel(decoding, decoding) is None
        prefill = mx.ones((1, kernels.SMALL_ROWS, 64))
        assert kernels.swiglu_kernel(prefill, prefill) is not None
    with kernels.forced(False):
        assert kernels.attention_kernel(q, k, v, cache=None, scale=1.0, mask="causal") is None
        assert kernels.swiglu_kernel(q, k) is None


def test_enabled_by_backend(monkeypatch):
    monkeypatch.delenv(kernels.SWITCH, raising=False)
    monkeypatch.setattr(sys, "platform", "darwin")
    assert not kernels.enabled()  # a Mac: Metal / Accelerate kernels, never these
    monkeypatch.setattr(sys, "platform", "linux")
    assert kernels.enabled() == (mx.default_device() == mx.cpu)
    monkeypatch.setenv(kernels.SWITCH, "0")
    assert not kernels.enabled()


def test_installed_architecture_has_the_kernels_and_a_standalone_copy_does_not():
    assert architecture.KERNELS["attention"] is kernels.attention_kernel
    spec = importlib.util.spec_from_file_location("standalone_arch", architecture.__file__)
    standalone = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(standalone)  # as stock mlx-lm loads a model directory's copy
    assert standalone.KERNELS == {}
    mx.random.seed(0)
    model = standalone.Model(standalone.ModelArgs(**vars(tiny_args())))
    assert model(mx.array([[1, 2, 3]])).shape == (1, 3, 300)


def test_causal_attention_bfloat16_close_to_fast_sdpa():
    q, k, v = (mx.random.normal((2, h, 16, 8)).astype(mx.bfloat16) for h in (4, 2, 2))
    mine = kernels.causal_attention(q, k, v, 8**-0.5)
    plain = mx.fast.scaled_dot_product_attention(q, k, v, scale=8**-0.5, mask="causal")
    assert mine.dtype == mx.bfloat16
    assert close(mine.astype(mx.float32), plain.astype(mx.float32), tol=2e-2)
