"""Every architecture option with every other: input (table, Leviathan, bytes) x head (linear,
bytes) x FFN (dense, MoE) x layer_repeat x share_ffn, against the references that matter."""

import copy
import itertools

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import quantize_model

from appleslm.io.model_dir import load_model, model_config, save_model_dir
from appleslm.models import kernels
from tests.helpers import (
    EMBEDDING_OPTIONS,
    FFN_OPTIONS,
    HEAD_OPTIONS,
    build_tiny,
    option_overrides,
)

ALL = [
    pytest.param(combo, id="-".join(map(str, combo)))
    for combo in itertools.product(
        EMBEDDING_OPTIONS, HEAD_OPTIONS, FFN_OPTIONS, (1, 2), (False, True)
    )
]
# Six combinations that hold every pair of option values at least once, for the slower checks
# that write files.
PAIRWISE = [
    pytest.param(combo, id="-".join(map(str, combo)))
    for combo in [
        ("table", "linear", "dense", 1, False),
        ("table", "bytes", "moe", 2, True),
        ("leviathan", "linear", "moe", 2, False),
        ("leviathan", "bytes", "dense", 1, True),
        ("bytes", "linear", "dense", 2, True),
        ("bytes", "bytes", "moe", 1, False),
    ]
]


def build(combo, seed: int = 0):
    return build_tiny(seed, **option_overrides(*combo))


def tokens(length: int, batch: int = 2, seed: int = 1) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, 300, size=(batch, length)))


@pytest.mark.parametrize("combo", ALL)
def test_cached_decoding_equals_full_forward(combo):
    model = build(combo)
    x = tokens(12)
    cache = model.make_cache()
    steps = [model(x[:, :5], cache=cache)]
    steps += [model(x[:, i : i + 1], cache=cache) for i in range(5, 12)]
    assert mx.allclose(mx.concatenate(steps, axis=1), model(x), atol=1e-5).item()


@pytest.mark.parametrize("combo", ALL)
def test_training_path_on_distinct_ids_equals_the_forward(combo):
    model = build(combo)
    x = tokens(16)
    unique, inverse = np.unique(np.array(x), return_inverse=True)
    embeddings = model.embed_unique(mx.array(unique), mx.array(inverse.reshape(x.shape)))
    h, aux = model.features(x, input_embeddings=embeddings)
    assert h.shape == (2, 16, 64)
    assert mx.allclose(model.head_logits(h), model(x), atol=1e-5).item()
    assert sorted(aux) == (["router_balance", "router_z"] if combo[2] == "moe" else [])


@pytest.mark.parametrize("combo", [c for c in ALL if c.values[0][0] != "table"])
def test_materialize_gives_a_table_model_with_identical_logits(combo):
    model = build(combo)
    table = model.materialize(chunk=128)
    assert table.args.embedding == "table"
    assert "embed_generator" not in table and "embed_bytes" not in table
    assert ("token_bytes" in table) == (combo[1] == "bytes")
    x = tokens(10)
    assert mx.allclose(table(x), model(x), atol=1e-5).item()


@pytest.mark.parametrize("combo", PAIRWISE)
def test_save_then_load_is_bit_identical_ours_and_stock(combo, tmp_path, tokenizer_dir):
    model = build(combo)
    out = save_model_dir(tmp_path / "m", model, tokenizer_dir=tokenizer_dir)
    x = tokens(9)
    ours, _ = load_model(out)
    assert mx.array_equal(ours(x), model(x)).item()
    theirs, _ = mlx_lm.load(str(out), trust_remote_code=True)
    assert type(theirs).__module__ == "custom_model"
    with kernels.forced(False):  # the shipped copy runs the plain ops: bit-identical to ours
        assert mx.array_equal(theirs(x), model(x)).item()


@pytest.mark.parametrize("combo", PAIRWISE)
def test_quantize_then_reload_gives_the_in_memory_logits(combo, tmp_path, tokenizer_dir):
    model = build(combo)
    quantized, config = quantize_model(
        model, model_config(model), 32, 4, quant_predicate=model.quant_predicate
    )
    out = save_model_dir(tmp_path / "q", quantized, tokenizer_dir=tokenizer_dir, config=config)
    x = tokens(9)
    reloaded, _ = load_model(out)
    assert mx.array_equal(reloaded(x), quantized(x)).item()
    stock, _ = mlx_lm.load(str(out), trust_remote_code=True)
    with kernels.forced(False):  # the shipped copy runs the plain ops: bit-identical to ours
        assert mx.array_equal(stock(x), quantized(x)).item()
    weights = mx.load(str(out / "model.safetensors"))
    assert weights["layers.0.self_attn.q_proj.weight"].dtype == mx.uint32
    for name, value in weights.items():  # what the model's predicate keeps float
        if name.startswith(("embed_bytes.", "byte_head.")) or ".router." in name:
            assert value.dtype == mx.float32, name
    if "token_bytes" in weights:
        assert mx.array_equal(weights["token_bytes"], model.token_bytes).item()


@pytest.mark.parametrize("combo", PAIRWISE)
def test_mlx_lm_model_contract_in_half_precision(combo):
    model = build(combo)
    # MLX's CPU gather_mm (the experts' matmul) is float32-only; a Mac's GPU runs MoE in bf16.
    cpu_moe = combo[2] == "moe" and mx.default_device() == mx.cpu
    dtype = mx.float32 if cpu_moe else mx.bfloat16
    model.set_dtype(dtype)
    x = tokens(6)
    cache = make_prompt_cache(model)
    out = model(x, cache=cache)
    assert out.shape == (2, 6, 300) and out.dtype == dtype
    assert model(x[:, -1:], cache=cache).shape == (2, 1, 300)
    assert len(cache) == len(model.layers) * model.args.layer_repeat
    clone = copy.deepcopy(model)
    assert mx.array_equal(clone(x), model(x)).item()
    if "token_bytes" in model:
        assert model.token_bytes.dtype == mx.int32  # set_dtype casts floats only
