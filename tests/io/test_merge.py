"""appleslm.io.merge: linear merges, greedy soups, checkpoint averaging, mergekit configs."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
import yaml

from appleslm.cli import main
from appleslm.io.files import read_config, read_provenance
from appleslm.io.merge import MergeError, merge, merge_models, model_ingredients, read_merge_config
from appleslm.io.model_dir import load_model, save_model_dir
from appleslm.train.checkpoint import list_checkpoints
from tests.helpers import build_tiny, write_tokenizer

QUIET = dict(log=lambda message: None)


def weights_of(model_dir) -> dict[str, mx.array]:
    return mx.load(str(model_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def soup_models(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("ingredients")
    return [
        save_model_dir(root / f"m{seed}", build_tiny(seed), tokenizer_dir=tokenizer_dir)
        for seed in range(3)
    ]


def test_merging_one_model_is_the_identity(soup_models, tmp_path):
    out = merge([str(soup_models[0])], tmp_path / "one", **QUIET).out_dir
    original, merged = weights_of(soup_models[0]), weights_of(out)
    assert original.keys() == merged.keys()
    for name in original:
        assert merged[name].dtype == original[name].dtype
        assert mx.array_equal(merged[name], original[name]).item(), name
    assert read_config(out) == read_config(soup_models[0])
    load_model(out)  # an ordinary model directory


def test_a_uniform_merge_is_the_mean_bit_for_bit(soup_models, tmp_path):
    result = merge([str(d) for d in soup_models], tmp_path / "soup", **QUIET)
    a, b, c = (weights_of(d) for d in soup_models)
    merged = weights_of(result.out_dir)
    for name in a:
        assert mx.array_equal(merged[name], (a[name] + b[name] + c[name]) / 3).item(), name
    provenance = read_provenance(result.out_dir)
    assert provenance.merge_method == "linear"
    assert [(i["model"], i["weight"], i["share"]) for i in provenance.merged_from] == [
        ("m0", 1.0, 1 / 3),
        ("m1", 1.0, 1 / 3),
        ("m2", 1.0, 1 / 3),
    ]
    card = (result.out_dir / "README.md").read_text()
    assert "## Merge" in card and "| m2 | 1 | 0.333 |" in card and "merge_method: linear" in card


def test_weights_are_normalised_as_mergekit_does(soup_models, tmp_path):
    config = tmp_path / "merge.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "models": [
                    {"model": str(soup_models[0]), "parameters": {"weight": 1}},
                    {"model": str(soup_models[1]), "parameters": {"weight": 3}},
                ],
                "merge_method": "linear",
                "dtype": "float16",
            }
        )
    )
    out = merge([], tmp_path / "weighted", config=config, **QUIET).out_dir
    a, b, merged = weights_of(soup_models[0]), weights_of(soup_models[1]), weights_of(out)
    for name in a:
        expected = ((a[name] * 1.0 + b[name] * 3.0) / 4.0).astype(mx.float16)
        assert mx.array_equal(merged[name], expected).item(), name


def test_a_greedy_soup_is_never_worse_than_its_best_ingredient(
    trained_model_dir, tmp_path, corpus_dir
):
    # Ingredients of one start: the trained model, a noisy copy and a random model.
    model, _ = load_model(trained_model_dir)
    noisy = {
        k: v + 0.02 * mx.random.normal(v.shape, key=mx.random.key(1))
        for k, v in weights_of(trained_model_dir).items()
    }
    model.load_weights(list(noisy.items()))
    noisy_dir = save_model_dir(
        tmp_path / "noisy",
        model,
        tokenizer_dir=trained_model_dir,
        config=read_config(trained_model_dir),
    )
    model.load_weights(list(weights_of(trained_model_dir).items()))
    mx.random.seed(5)
    model.update(build_tiny(5, **read_config_args(trained_model_dir)).parameters())
    random_dir = save_model_dir(
        tmp_path / "random",
        model,
        tokenizer_dir=trained_model_dir,
        config=read_config(trained_model_dir),
    )
    result = merge(
        [str(random_dir), str(noisy_dir), str(trained_model_dir)],
        tmp_path / "greedy",
        greedy=True,
        eval_data=corpus_dir / "001.txt",
        max_eval_tokens=3000,
        **QUIET,
    )
    assert result.loss <= min(result.losses.values()) + 1e-6
    assert "random" not in result.chosen and result.chosen[0] == "micro"
    shares = {i["model"]: i["share"] for i in read_provenance(result.out_dir).merged_from}
    assert shares["random"] == 0.0
    assert "left out" in (result.out_dir / "README.md").read_text()


def read_config_args(model_dir) -> dict:
    config = read_config(model_dir)
    return {
        k: config[k]
        for k in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "max_position_embeddings",
        )
    }


def test_chat_eval_data_is_scored_on_assistant_tokens(soup_models, tmp_path):
    from appleslm.data.chat import ChatRenderer, read_conversations, tokenize_conversations
    from appleslm.train.sft import assistant_loss

    data = tmp_path / "valid.jsonl"
    records = [
        {
            "messages": [
                {"role": "user", "content": "taxes?"},
                {"role": "assistant", "content": "Duties and imposts."},
            ]
        }
    ] * 3
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = merge(
        [str(d) for d in soup_models[:2]], tmp_path / "chat-soup", eval_data=data, **QUIET
    )
    assert "assistant-token loss" in result.eval_label
    model, tokenizer = load_model(result.out_dir)
    conversations, _ = tokenize_conversations(
        read_conversations(data)[0], ChatRenderer(tokenizer), 64
    )
    assert result.loss == pytest.approx(assistant_loss(model, conversations), rel=1e-5)


def test_differences_are_named(soup_models, tmp_path, tokenizer_dir):
    wide = save_model_dir(
        tmp_path / "wide", build_tiny(0, intermediate_size=96), tokenizer_dir=tokenizer_dir
    )
    with pytest.raises(MergeError, match="intermediate_size: 128 vs 96"):
        merge([str(soup_models[0]), str(wide)], tmp_path / "x", **QUIET)
    other_tokens = write_tokenizer(tmp_path / "tok", vocab_size=280)
    other = save_model_dir(tmp_path / "other", build_tiny(0), tokenizer_dir=other_tokens)
    with pytest.raises(MergeError, match="tokenizers of m0 and other differ"):
        merge([str(soup_models[0]), str(other)], tmp_path / "x", **QUIET)
    assert not (tmp_path / "x").exists()


def test_quantized_ingredients_are_dequantized_and_said_so(soup_models, tmp_path):
    from mlx_lm.utils import quantize_model

    model, _ = load_model(soup_models[1])
    model, config = quantize_model(model, read_config(soup_models[1]), 32, 8)
    quantized = save_model_dir(tmp_path / "q8", model, tokenizer_dir=soup_models[1], config=config)
    said = []
    result = merge([str(soup_models[0]), str(quantized)], tmp_path / "mixed", log=said.append)
    assert result.dequantized == ["q8"] and any("dequantized" in line for line in said)
    assert "quantization" not in read_config(result.out_dir)
    a, merged = weights_of(soup_models[1]), weights_of(result.out_dir)
    assert all(merged[k].dtype == mx.float32 for k in merged)
    close = merged["embed_tokens.weight"] * 2 - weights_of(soup_models[0])["embed_tokens.weight"]
    assert mx.allclose(close, a["embed_tokens.weight"], atol=0.02).item()  # 8-bit error only


def test_checkpoint_averaging_is_the_mean_of_the_last_k(tmp_path, write_config):
    config = write_config(steps=6, save_every=2, keep_checkpoints=3, eval_every=6)
    assert (
        main(
            ["train", str(config), "--out", str(tmp_path / "run"), "--no-progress", "--procs", "1"]
        )
        == 0
    )
    checkpoints = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [c.step for c in checkpoints] == [2, 4, 6]
    out = merge([str(tmp_path / "run")], tmp_path / "avg", last=3, **QUIET).out_dir
    parts = [mx.load(str(c.path / "model.safetensors")) for c in checkpoints]
    merged = weights_of(out)
    for name in merged:
        assert mx.array_equal(
            merged[name], (parts[0][name] + parts[1][name] + parts[2][name]) / 3
        ).item()
    assert [i["step"] for i in read_provenance(out).merged_from] == [2, 4, 6]
    with pytest.raises(MergeError, match="keeps 3 checkpoint"):
        merge([str(tmp_path / "run")], tmp_path / "avg4", last=4, **QUIET)


def test_a_bad_checkpoint_shape_is_named(soup_models, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "ckpt-00000001").mkdir(parents=True)
    (run / "checkpoints" / "ckpt-00000001" / "state.json").write_text('{"step": 1}')
    weights = weights_of(soup_models[0])
    weights["norm.weight"] = mx.zeros((3,))
    mx.save_safetensors(str(run / "checkpoints" / "ckpt-00000001" / "model.safetensors"), weights)
    import shutil

    shutil.copytree(soup_models[0], run / "model")
    with pytest.raises(MergeError, match=r"norm.weight has shape \(3,\)"):
        merge([str(run)], tmp_path / "x", last=1, **QUIET)


def test_mergekit_configs_are_read_strictly(soup_models, tmp_path):
    good = tmp_path / "good.yml"
    good.write_text(
        f"models:\n  - model: {soup_models[0]}\n    parameters:\n      weight: 0.3\n"
        f"  - model: {soup_models[1]}\nmerge_method: linear\ndtype: bfloat16\n"
    )
    plan = read_merge_config(good)
    assert [i.weight for i in plan.ingredients] == [0.3, 1.0] and plan.dtype == "bfloat16"
    for text, names in [
        ("models: [", "not valid YAML"),
        (f"models: [{soup_models[0]}]\nslices: []\n", "slices"),
        (f"models: [{soup_models[0]}]\nmerge_method: ties\n", "merge_method"),
        (f"models:\n  - model: {soup_models[0]}\n    parameters: {{density: 0.5}}\n", "weight"),
    ]:
        bad = tmp_path / "bad.yml"
        bad.write_text(text)
        with pytest.raises(MergeError, match=names):
            read_merge_config(bad)
    with pytest.raises(MergeError, match="sum to 0"):
        merge_models(model_ingredients([str(soup_models[0])], [0.0]), tmp_path / "z", **QUIET)


def test_the_merge_command_writes_a_weighted_soup(soup_models, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["merge", str(soup_models[0]), str(soup_models[1]), "--weights", "3", "1"]
    assert main([*argv, "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["chosen"] == ["m0", "m1"] and report["method"] == "linear"
    a, b, merged = weights_of(soup_models[0]), weights_of(soup_models[1]), weights_of(out)
    for name in a:
        assert mx.array_equal(merged[name], (a[name] * 3.0 + b[name] * 1.0) / 4.0).item(), name
