"""Quantization: real quantized weights that reload to the same logits and keep perplexity."""

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.utils import quantize_model

from appleslm.io.files import ModelDirError, read_config, read_provenance
from appleslm.io.model_dir import load_model, save_model_dir
from appleslm.models import kernels
from appleslm.quant import quant_predicate, quantize
from tests.helpers import build_tiny, option_overrides

PROMPT = mx.array([[5, 17, 42, 99, 3, 250, 7]])


@pytest.fixture(scope="module")
def quantized_8bit(trained_model_dir, tmp_path_factory):
    return quantize(trained_model_dir, tmp_path_factory.mktemp("q") / "q8", bits=8, group_size=32)


def test_reloaded_quantized_model_gives_the_in_memory_logits(trained_model_dir, quantized_8bit):
    model, _ = load_model(trained_model_dir)
    config = read_config(trained_model_dir)
    in_memory, _ = quantize_model(model, config, 32, 8, quant_predicate=model.quant_predicate)
    reloaded, _ = load_model(quantized_8bit.out_dir)
    assert mx.array_equal(reloaded(PROMPT), in_memory(PROMPT)).item()
    # Stock mlx-lm loads the quantized directory too, with the architecture file it carries.
    stock, _ = mlx_lm.load(str(quantized_8bit.out_dir), trust_remote_code=True)
    with kernels.forced(False):  # the shipped copy runs the plain ops: bit-identical to ours
        assert mx.array_equal(stock(PROMPT), in_memory(PROMPT)).item()
    assert mx.allclose(stock(PROMPT), in_memory(PROMPT), atol=1e-5).item()


def test_weights_are_really_quantized(quantized_8bit):
    weights = mx.load(str(quantized_8bit.out_dir / "model.safetensors"))
    assert weights["layers.0.mlp.up_proj.weight"].dtype == mx.uint32
    assert "layers.0.mlp.up_proj.scales" in weights
    config = read_config(quantized_8bit.out_dir)
    assert config["quantization"]["bits"] == 8 and config["quantization"]["group_size"] == 32
    assert quantized_8bit.size_bytes < 0.5 * quantized_8bit.float_size_bytes
    assert 8 < quantized_8bit.bits_per_weight < 11


def test_perplexity_is_reported_on_the_training_validation_split(quantized_8bit):
    assert quantized_8bit.eval_tokens > 1000
    assert abs(quantized_8bit.ppl_change) < 0.005  # 8-bit: within 0.5% of float
    provenance = read_provenance(quantized_8bit.out_dir)
    assert provenance.quantization.ppl_quantized == quantized_8bit.ppl_after


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
def test_every_bit_width_reloads(bits, trained_model_dir, tmp_path):
    report = quantize(trained_model_dir, tmp_path / "q", bits=bits, group_size=32)
    model, _ = load_model(report.out_dir)
    logits = model(PROMPT)
    assert logits.shape == (1, 7, 512) and mx.isfinite(logits).all().item()
    if bits >= 4:
        assert report.ppl_change < 0.05  # 4-bit group 32: within 5%


def test_layers_that_cannot_be_grouped_stay_float_and_are_reported(trained_model_dir, tmp_path):
    report = quantize(trained_model_dir, tmp_path / "q", bits=4, group_size=64)
    assert report.skipped and all("input dim 32" in s for s in report.skipped)
    weights = mx.load(str(report.out_dir / "model.safetensors"))
    assert weights["layers.0.self_attn.q_proj.weight"].dtype == mx.float32
    assert weights["layers.0.mlp.down_proj.weight"].dtype == mx.uint32  # input dim 64


def test_mixed_recipe_keeps_embedding_at_eight_bits(trained_model_dir, tmp_path):
    report = quantize(trained_model_dir, tmp_path / "q", bits=3, group_size=32, recipe="mixed")
    config = read_config(report.out_dir)
    assert config["quantization"]["embed_tokens"]["bits"] == 8
    assert config["quantization"]["bits"] == 3
    model, _ = load_model(report.out_dir)
    assert model.embed_tokens.bits == 8 and model.layers[0].mlp.up_proj.bits == 3


def test_user_text_and_bad_requests(trained_model_dir, quantized_8bit, corpus_dir, tmp_path):
    report = quantize(
        trained_model_dir,
        tmp_path / "q",
        bits=8,
        group_size=32,
        eval_text=str(corpus_dir / "001.txt"),
    )
    assert report.eval_tokens > 500 and report.ppl_before > 1
    with pytest.raises(ModelDirError, match="already quantized"):
        quantize(quantized_8bit.out_dir, tmp_path / "again")
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize(trained_model_dir, tmp_path / "bad", bits=5)
    assert not np.any([p.name == "bad" for p in tmp_path.iterdir()])


@pytest.mark.parametrize("recipe", ["uniform", "mixed"])
def test_moe_and_byte_models_quantize_with_router_and_byte_modules_float(
    recipe, tmp_path, tokenizer_dir
):
    model = build_tiny(**option_overrides("bytes", "bytes", "moe", layer_repeat=2))
    source = save_model_dir(tmp_path / "m", model, tokenizer_dir=tokenizer_dir)
    report = quantize(source, tmp_path / "q", bits=4, group_size=32, recipe=recipe)
    weights = mx.load(str(report.out_dir / "model.safetensors"))
    assert weights["layers.0.mlp.experts.gate_proj.weight"].dtype == mx.uint32
    assert weights["layers.0.mlp.router.weight"].dtype == mx.float32
    assert weights["embed_bytes.byte_embed.weight"].dtype == mx.float32
    assert weights["byte_head.out.weight"].dtype == mx.float32
    assert weights["token_bytes"].dtype == mx.int32
    predicate = quant_predicate(model, 4, 32, recipe)
    in_memory, _ = quantize_model(model, read_config(source), 32, 4, quant_predicate=predicate)
    reloaded, _ = load_model(report.out_dir)
    x = mx.array([[5, 17, 42, 99, 3, 250, 7]])
    assert mx.array_equal(reloaded(x), in_memory(x)).item()
