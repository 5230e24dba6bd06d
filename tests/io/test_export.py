"""Export to stock mlx-lm llama or mixtral: no custom code, same logits, quantizable."""

import mlx.core as mx
import mlx_lm
import pytest

from appleslm.io.export import export_stock
from appleslm.io.files import ModelDirError, read_config
from appleslm.io.model_dir import load_model, save_model_dir
from appleslm.models import Model
from appleslm.quant import quantize
from tests.helpers import build_tiny, option_overrides, tiny_args

PROMPT = mx.array([[5, 17, 42, 99, 3, 250, 7, 8, 9]])


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"layer_repeat": 2, "tie_word_embeddings": False},
        {
            "embedding": "leviathan",
            "tie_word_embeddings": False,
            "layer_repeat": 2,
            "generator_d_seed": 16,
            "generator_heads": 2,
            "generator_rank": 4,
        },
    ],
)
def test_export_loads_in_stock_mlx_lm_with_identical_logits(variant, tmp_path, tokenizer_dir):
    mx.random.seed(3)
    model = Model(tiny_args(**variant))
    source = save_model_dir(tmp_path / "ours", model, tokenizer_dir=tokenizer_dir)
    out = export_stock(source, tmp_path / "llama")
    config = read_config(out)
    assert config["model_type"] == "llama" and "model_file" not in config
    assert not (out / "appleslm_arch.py").exists()
    assert config["num_hidden_layers"] == 2 * variant.get("layer_repeat", 1)
    stock, tokenizer = mlx_lm.load(str(out))  # no trust_remote_code
    assert type(stock).__module__ == "mlx_lm.models.llama"
    assert mx.allclose(stock(PROMPT), model(PROMPT), atol=1e-5).item()
    assert tokenizer.decode(tokenizer.encode("general welfare")) == "general welfare"


def test_quantize_after_export(trained_model_dir, tmp_path):
    out = export_stock(trained_model_dir, tmp_path / "llama")
    report = quantize(out, tmp_path / "llama-q8", bits=8, group_size=32)
    assert abs(report.ppl_change) < 0.005
    model, _ = load_model(report.out_dir)
    ours, _ = load_model(trained_model_dir)
    assert mx.allclose(model(PROMPT), ours(PROMPT), atol=0.1).item()


def test_export_refuses_what_it_cannot_export(trained_model_dir, tmp_path):
    q = quantize(trained_model_dir, tmp_path / "q", bits=8, group_size=32).out_dir
    with pytest.raises(ModelDirError, match="export the float model"):
        export_stock(q, tmp_path / "x")
    llama_dir = export_stock(trained_model_dir, tmp_path / "llama")
    with pytest.raises(ModelDirError, match="not an appleslm model"):
        export_stock(llama_dir, tmp_path / "y")


@pytest.mark.parametrize(
    "options, family",
    [
        (dict(share_ffn=True, layer_repeat=2), "llama"),
        (dict(embedding="bytes"), "llama"),
        (dict(ffn="moe"), "mixtral"),
        (dict(ffn="moe", share_ffn=True, layer_repeat=2, embedding="leviathan"), "mixtral"),
        (dict(ffn="moe", embedding="bytes", layer_repeat=2), "mixtral"),
    ],
)
def test_new_options_export_to_stock_llama_or_mixtral(options, family, tmp_path, tokenizer_dir):
    model = build_tiny(3, **option_overrides(**options))
    source = save_model_dir(tmp_path / "ours", model, tokenizer_dir=tokenizer_dir)
    out = export_stock(source, tmp_path / family)
    config = read_config(out)
    assert config["model_type"] == family and not (out / "appleslm_arch.py").exists()
    assert config["num_hidden_layers"] == 2 * options.get("layer_repeat", 1)
    stock, _ = mlx_lm.load(str(out))  # no trust_remote_code
    assert type(stock).__module__ == f"mlx_lm.models.{family}"
    assert mx.allclose(stock(PROMPT), model(PROMPT), atol=1e-5).item()
    if family == "mixtral":
        assert config["num_local_experts"] == 4 and config["num_experts_per_tok"] == 2
        # HF's balance term sums its shares to k, ours to 1: the same weight is ours / k.
        assert config["router_aux_loss_coef"] == model.args.router_aux_loss_coef / 2


def test_a_byte_head_is_refused_with_the_way_to_share_it(tmp_path, tokenizer_dir):
    model = build_tiny(**option_overrides(head="bytes"))
    source = save_model_dir(tmp_path / "ours", model, tokenizer_dir=tokenizer_dir)
    with pytest.raises(ModelDirError, match="cannot become a linear head.*trust_remote_code=True"):
        export_stock(source, tmp_path / "x")
    assert not (tmp_path / "x").exists()
