"""The decoder family: shapes, caches, sharing, the Leviathan generator, and mlx-lm loading."""

import copy
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache

from appleslm.io.model_dir import load_model, save_model_dir
from appleslm.models import Model, digit_base, kernels, parameter_counts
from appleslm.models.appleslm import quadratic_bspline
from tests.helpers import SMALL_GENERATOR, tiny_args

GENERATOR = dict(SMALL_GENERATOR, tie_word_embeddings=False)
VARIANTS = {
    "dense": {},
    "gqa-untied": dict(num_key_value_heads=1, tie_word_embeddings=False),
    "ls": dict(layer_repeat=2),
    "leviathan": GENERATOR,
    "leviathan-ls": dict(GENERATOR, layer_repeat=3),
}


def build(seed: int = 0, **overrides) -> Model:
    mx.random.seed(seed)
    model = Model(tiny_args(**overrides))
    mx.eval(model.parameters())
    return model


def tokens(length: int, batch: int = 1, seed: int = 1) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, 300, size=(batch, length)))


@pytest.mark.parametrize("variant", VARIANTS)
def test_incremental_decoding_equals_full_forward(variant):
    model = build(**VARIANTS[variant])
    x = tokens(12, batch=2)
    full = model(x)
    cache = model.make_cache()
    steps = [model(x[:, :5], cache=cache)] + [
        model(x[:, i : i + 1], cache=cache) for i in range(5, 12)
    ]
    assert mx.allclose(mx.concatenate(steps, axis=1), full, atol=1e-5).item()


def test_each_execution_of_a_shared_block_has_its_own_cache():
    model = build(layer_repeat=2)
    assert len(model.layers) == 2 and len(model.make_cache()) == 4
    assert len(make_prompt_cache(model)) == 4
    cache = model.make_cache()
    model(tokens(6), cache=cache)
    first, second = cache[0].state[0], cache[1].state[0]
    # The second pass sees the first pass's output, so its keys differ: one shared slot is wrong.
    assert not mx.allclose(first, second).item()


def test_layer_sharing_adds_depth_not_parameters():
    dense, shared = parameter_counts(build()), parameter_counts(build(layer_repeat=2))
    assert dense["params_total"] == shared["params_total"]
    assert shared["layers_executed"] == 2 * dense["layers_executed"]
    assert not mx.allclose(build()(tokens(4)), build(layer_repeat=2)(tokens(4))).item()


def test_tied_head_reuses_the_input_table():
    model = build()
    assert "lm_head" not in model
    h = mx.random.normal((1, 3, 64))
    assert mx.allclose(model.embed_tokens.as_linear(h), h @ model.embed_tokens.weight.T).item()


def test_digit_base_is_the_smallest_that_covers_the_vocabulary():
    assert digit_base(200_376, 3) == 59 and digit_base(8192, 3) == 21 and digit_base(300, 2) == 18
    for vocab, k in [(300, 3), (4096, 3), (32000, 4)]:
        b = digit_base(vocab, k)
        assert b**k >= vocab > (b - 1) ** k


def test_generator_digits_select_one_codebook_row_per_position():
    model = build(**GENERATOR)
    gen = model.embed_generator
    ids = mx.arange(300)
    digits = (ids[:, None] // gen._place) % gen.base
    np.testing.assert_array_equal(np.array((digits * gen._place).sum(axis=1)), np.arange(300))
    rows = np.array(digits + gen._row_offset)
    assert rows.min() >= 0 and rows.max() < gen.codebooks.shape[0]


def test_generator_parameter_count_matches_the_formula():
    a = tiny_args(**GENERATOR)
    k, b, d, h = (
        a.generator_digits,
        digit_base(a.vocab_size, 3),
        a.generator_d_seed,
        a.generator_heads,
    )
    kn, r, dim = a.generator_knots, a.generator_rank, a.hidden_size
    expected = k * b * d + h * d * d + 2 * h * d + h * d * kn * r + h * r * dim
    assert parameter_counts(Model(a))["params_generator"] == expected


def test_bspline_basis_is_a_partition_of_unity_with_three_knot_support():
    x = np.random.default_rng(0).uniform(size=(1000, 1)).astype(np.float32)
    basis = np.array(quadratic_bspline((mx.array(x) - mx.arange(8) / 7) * 7))
    interior = (x[:, 0] > 1.5 / 7) & (x[:, 0] < 5.5 / 7)
    np.testing.assert_allclose(basis.sum(axis=1)[interior], 1.0, atol=1e-6)
    assert ((basis > 0).sum(axis=1) <= 3).all()


def test_generator_on_unique_ids_equals_per_position_evaluation():
    model = build(**GENERATOR)
    x = tokens(16, batch=2)
    unique, inverse = np.unique(np.array(x), return_inverse=True)
    via_unique = model.embed_unique(mx.array(unique), mx.array(inverse.reshape(x.shape)))
    assert via_unique.shape == (2, 16, 64)
    assert mx.allclose(via_unique, model.embed(x), atol=1e-6).item()
    assert mx.allclose(model(x, input_embeddings=via_unique), model(x), atol=1e-5).item()


def test_materialize_gives_a_table_model_with_identical_logits():
    model = build(**GENERATOR)
    table = model.materialize(chunk=128)
    assert table.args.embedding == "table" and "embed_generator" not in table
    x = tokens(10, batch=2)
    assert mx.allclose(table(x), model(x), atol=1e-5).item()


def test_generator_gradients_reach_every_generator_parameter():
    model = build(**GENERATOR)
    x = tokens(8)

    def loss(m):
        return nn.losses.cross_entropy(m(x[:, :-1]), x[:, 1:], reduction="mean")

    _, grads = nn.value_and_grad(model, loss)(model)
    for name, g in tree_flatten(grads["embed_generator"]):
        assert mx.abs(g).sum().item() > 0, name


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_mlx_lm_model_contract(dtype):
    model = build(layer_repeat=2, **GENERATOR)
    model.set_dtype(dtype)
    x = tokens(6, batch=2)
    cache = make_prompt_cache(model)
    out = model(x, cache=cache)
    assert out.shape == (2, 6, 300) and out.dtype == dtype
    assert model(x[:, -1:], cache=cache).shape == (2, 1, 300)
    clone = copy.deepcopy(model)
    assert mx.array_equal(clone(x), model(x)).item()


@pytest.mark.parametrize("variant", ["ls", "leviathan"])
def test_save_then_load_gives_identical_logits(variant, tmp_path, tokenizer_dir):
    model = build(**VARIANTS[variant])
    out = save_model_dir(tmp_path / "m", model, tokenizer_dir=tokenizer_dir)
    assert (out / "appleslm_arch.py").exists()
    x = tokens(9, batch=2)
    ours, tokenizer = load_model(out)
    assert mx.array_equal(ours(x), model(x)).item()
    with pytest.raises(ValueError, match="trust_remote_code"):
        mlx_lm.load(str(out))
    theirs, _ = mlx_lm.load(str(out), trust_remote_code=True)
    assert type(theirs).__module__ == "custom_model"
    with kernels.forced(False):  # the shipped copy runs the plain ops: bit-identical to ours
        assert mx.array_equal(theirs(x), model(x)).item()
    assert mx.allclose(theirs(x), model(x), atol=1e-5).item()  # our CPU kernels: to 1e-5
    assert tokenizer.decode(tokenizer.encode("the common defence")) == "the common defence"


def test_stock_mlx_lm_generate_cli_runs_our_checkpoint(tiny_model_dir):
    cmd = [
        sys.executable,
        "-m",
        "mlx_lm",
        "generate",
        "--model",
        str(tiny_model_dir),
        "--trust-remote-code",
        "--prompt",
        "The Congress",
        "--max-tokens",
        "5",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Generation:" in done.stdout and "tokens-per-sec" in done.stdout


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(hidden_size=66), "not divisible by num_attention_heads"),
        (dict(num_key_value_heads=3), "must divide"),
        (dict(embedding="leviathan"), "tie_word_embeddings to false"),
        (dict(embedding="pixels"), "embedding must be one of"),
        (dict(generator_knots=1), "generator_knots"),
        (dict(head="pixels"), "head must be one of"),
        (dict(embedding="bytes"), "embedding 'bytes' .* set tie_word_embeddings to false"),
        (dict(head="bytes"), "head 'bytes' .* set tie_word_embeddings to false"),
        (dict(num_experts=1), "num_experts must be 0 .* or at least 2"),
        (dict(num_experts=4, num_experts_per_tok=5), "num_experts_per_tok 5 must be at most"),
        (dict(router_aux_loss_coef=-0.1), "router_aux_loss_coef must be at least 0"),
        (dict(byte_slots=0), "byte_slots must be at least 1"),
        (dict(byte_encoder_widths=[0]), "byte_encoder_widths must be a list of positive"),
        (dict(byte_encoder_ffn=[512]), "byte_encoder_ffn needs one FFN width per byte encoder"),
        (dict(byte_encoder_heads=3), "byte_encoder_heads 3 must divide"),
        (dict(byte_head_heads=3), "byte_head_heads 3 must divide byte_head_width 128"),
        (dict(byte_embedding_mode="exact"), "byte_embedding_mode must be one of"),
        (dict(byte_head_loss="bits"), "byte_head_loss must be one of"),
    ],
)
def test_inconsistent_shapes_fail_clearly(bad, message):
    with pytest.raises(ValueError, match=message):
        tiny_args(**bad)
