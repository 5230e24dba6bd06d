"""Mixtral's sparse mixture-of-experts FFN, its auxiliary losses, and its parameter counts."""

from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import quantize_model

from appleslm.config import load_config
from appleslm.io.model_dir import model_config
from appleslm.models import Model, parameter_counts, token_losses
from appleslm.models.appleslm import SparseMoE, router_losses
from tests.helpers import build_tiny, tiny_args

MOE = dict(num_experts=4, num_experts_per_tok=2)


def tokens(length: int, batch: int = 2, seed: int = 1) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, 300, size=(batch, length)))


def test_moe_ffn_equals_a_per_token_loop_over_its_chosen_experts():
    mx.random.seed(0)
    moe = SparseMoE(tiny_args(**MOE))
    assert isinstance(moe.experts, SwitchGLU)
    x = mx.random.normal((3, 40, 64))  # 120 tokens: SwitchGLU's sorted path (>= 64 indices)
    out, router_logits = moe(x)
    w_gate, w_up, w_down = (
        np.array(getattr(moe.experts, name).weight)
        for name in ("gate_proj", "up_proj", "down_proj")
    )
    xs, logits = np.array(x).reshape(-1, 64), np.array(router_logits).reshape(-1, 4)
    expected = np.zeros_like(xs)
    for t, (token, row) in enumerate(zip(xs, logits)):
        chosen = np.argsort(-row)[:2]
        weights = np.exp(row[chosen] - row[chosen].max())
        for e, w in zip(chosen, weights / weights.sum()):
            gate = token @ w_gate[e].T
            expected[t] += w * ((gate / (1 + np.exp(-gate)) * (token @ w_up[e].T)) @ w_down[e].T)
    np.testing.assert_allclose(np.array(out).reshape(-1, 64), expected, rtol=1e-4, atol=1e-5)


def test_balance_term_follows_the_switch_formula_with_the_full_softmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 50, 4)).astype(np.float32)
    terms = router_losses([mx.array(logits)], k=2)
    flat = logits.reshape(-1, 4)
    top2 = np.argsort(-flat, axis=1)[:, :2]
    share = np.bincount(top2.ravel(), minlength=4) / top2.size
    probs = np.exp(flat) / np.exp(flat).sum(axis=1, keepdims=True)
    assert abs(terms["router_balance"].item() - 4 * (share * probs.mean(axis=0)).sum()) < 1e-5
    z = (np.log(np.exp(flat).sum(axis=1)) ** 2).mean()
    assert abs(terms["router_z"].item() - z) < 1e-4


def test_balance_term_is_one_when_balanced_and_e_when_collapsed():
    balanced = mx.zeros((8, 4)) + mx.array([[9.0, 9.0, 0, 0], [0, 0, 9.0, 9.0]] * 4)
    collapsed = mx.zeros((8, 4)) + mx.array([30.0, 20.0, 0, 0])
    assert abs(router_losses([balanced], k=2)["router_balance"].item() - 1.0) < 1e-4
    # All assignments on experts 0 and 1, all probability on expert 0: E * (0.5 * 1) = 2.
    assert abs(router_losses([collapsed], k=2)["router_balance"].item() - 2.0) < 1e-4
    assert router_losses([], k=2) == {}


def test_aux_terms_average_over_every_moe_execution_and_train_the_router():
    model = build_tiny(**MOE, layer_repeat=2)
    x = tokens(16)
    _, router_logits = model.hidden_states(x)
    assert len(router_logits) == 4  # 2 blocks x 2 executions
    per_execution = [router_losses([logits], 2)["router_balance"] for logits in router_logits]
    _, aux = model.features(x)
    assert abs(aux["router_balance"].item() - mx.stack(per_execution).mean().item()) < 1e-6

    def balance(m):
        return m.features(x)[1]["router_balance"]

    grads = dict(tree_flatten(nn.value_and_grad(model, balance)(model)[1]))
    assert mx.abs(grads["layers.0.mlp.router.weight"]).sum().item() > 0


def test_router_load_counts_each_executions_assignments():
    model = build_tiny(**MOE, layer_repeat=3, share_ffn=True)
    load = model.router_load(tokens(20))
    assert load.shape == (6, 4)  # 2 blocks x 3 executions, all through the one shared MoE
    np.testing.assert_allclose(np.array(load.sum(axis=1)), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="mixture-of-experts"):
        build_tiny().router_load(tokens(4))


def test_compiled_training_step_with_aux_losses_equals_the_eager_one():
    def run(compiled: bool) -> tuple[float, mx.array]:
        model = build_tiny(**MOE, router_z_loss_coef=1e-3)
        optimizer = optim.AdamW(1e-3)
        x = tokens(33, batch=4)

        def loss(m, inputs, targets):
            h, aux = m.features(inputs)
            a = m.args
            ce = token_losses(m, h, targets).mean()
            return (
                ce
                + a.router_aux_loss_coef * aux["router_balance"]
                + a.router_z_loss_coef * aux["router_z"]
            )

        loss_and_grad = nn.value_and_grad(model, loss)
        state = [model.state, optimizer.state]

        def step(inputs, targets):
            value, grads = loss_and_grad(model, inputs, targets)
            optimizer.update(model, grads)
            return value

        if compiled:
            step = partial(mx.compile, inputs=state, outputs=state)(step)
        values = [step(x[:, :-1], x[:, 1:]) for _ in range(3)]
        mx.eval(values, model.parameters())
        return [v.item() for v in values], model.layers[0].mlp.router.weight

    (eager, router_eager), (compiled, router_compiled) = run(False), run(True)
    np.testing.assert_allclose(compiled, eager, rtol=1e-5)
    assert eager[-1] < eager[0]
    assert mx.allclose(router_compiled, router_eager, atol=1e-6).item()


def test_mixtral_preset_has_mixtrals_total_and_active_counts():
    counts = parameter_counts(Model(load_config("mixtral-8x7b").model))  # shapes only
    assert abs(counts["params_total"] / 1e9 - 46.7) <= 0.1
    assert abs(counts["params_active"] / 1e9 - 12.9) <= 0.1


def test_active_parameters_drop_only_the_unchosen_experts():
    dense = parameter_counts(build_tiny())
    assert dense["params_active"] == dense["params_total"]
    moe = parameter_counts(build_tiny(num_experts=4, num_experts_per_tok=1))
    expert = 3 * 64 * 128  # one SwiGLU expert of width 128 on d_model 64
    assert moe["params_total"] - moe["params_active"] == 2 * 3 * expert  # 2 blocks, 3 idle each
    tiny_moe = parameter_counts(Model(load_config("tiny-moe").model))
    assert tiny_moe["params_active"] < tiny_moe["params_total"] <= 2_000_000


def test_quantization_keeps_the_router_float_and_packs_the_experts():
    model = build_tiny(**MOE)
    quantized, config = quantize_model(
        model, model_config(model), 32, 4, quant_predicate=model.quant_predicate
    )
    moe = quantized.layers[0].mlp
    assert type(moe.router) is nn.Linear and moe.router.weight.dtype == mx.float32
    assert isinstance(moe.experts.gate_proj, QuantizedSwitchLinear)
    assert "layers.0.mlp.router" not in config["quantization"]


def test_mlx_lm_lora_wraps_the_experts():
    model = build_tiny(**MOE)
    model.freeze()
    keys = {"self_attn.q_proj", "mlp.experts.gate_proj", "mlp.experts.up_proj"}
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 10.0, "dropout": 0.0, "keys": keys})
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert "layers.0.mlp.experts.gate_proj.lora_a" in trainable
    assert not any("router" in name for name in trainable)
    assert model(tokens(8)).shape == (2, 8, 300)
