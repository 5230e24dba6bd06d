"""Every model directory a command writes carries a model card that names, for a person, what
the model came from: its base, its data, its size and its quality, and nothing private."""

from __future__ import annotations

from pathlib import Path

import pytest

from appleslm.config import SFTConfig
from appleslm.io.export import export_stock
from appleslm.io.files import read_provenance
from appleslm.quant import quantize
from appleslm.train.sft import sft

SMALL_CHAT = [
    '{"messages": [{"role": "user", "content": "What is the Congress?"}, '
    '{"role": "assistant", "content": "The legislature."}]}',
    '{"messages": [{"role": "user", "content": "Who collects taxes?"}, '
    '{"role": "assistant", "content": "The Congress may."}]}',
] * 8


def card(model_dir: Path) -> str:
    return (model_dir / "README.md").read_text()


def assert_no_private_paths(text: str, *paths: Path) -> None:
    for path in paths:
        assert str(path) not in text and str(Path.home()) not in text


@pytest.fixture(scope="module")
def derived(tmp_path_factory, trained_model_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("derived")
    chat = root / "chat.jsonl"
    chat.write_text("\n".join(SMALL_CHAT) + "\n")
    cfg = SFTConfig(steps=2, batch_size=4, eval_every=2, save_every=2, max_seq_len=64)
    tuned = sft(trained_model_dir, chat, root / "micro-chat", cfg, progress=False).model_dir
    quantized = quantize(trained_model_dir, root / "micro-4bit", bits=4, group_size=32).out_dir
    exported = export_stock(trained_model_dir, root / "micro-llama")
    return {"tuned": tuned, "quantized": quantized, "exported": exported}


def test_the_pretrained_model_card_names_its_data_recipe_and_quality(trained_model_dir):
    text = card(trained_model_dir)
    provenance = read_provenance(trained_model_dir)
    assert "# micro" in text  # named after its run, not after the folder "model"
    assert "the folder corpus" in text and "- training split: " in text
    assert f"{provenance.pretraining.steps:,} steps of 8 x 32 tokens" in text
    assert "peak learning rate 0.01" in text and "hardware: " in text
    assert f"| validation loss (nats/token) | {provenance.quality.loss:.4g} |" in text
    assert "held-out documents of the training data" in text
    assert_no_private_paths(text, trained_model_dir)


def test_a_fine_tuned_model_card_names_its_base_and_both_stages(derived, trained_model_dir):
    text = card(derived["tuned"])
    assert "# micro-chat" in text and "Made from `micro`." in text
    assert "base_model: micro" in text  # in the front matter the Hub links
    assert "**Pretraining**" in text and "**Fine-tuning (full)**" in text
    assert "the file chat.jsonl" in text and "held-out loss before:" in text
    assert "assistant tokens of held-out conversations" in text
    assert_no_private_paths(text, trained_model_dir)


def test_a_quantized_model_card_names_its_base_and_its_own_quality(derived):
    text = card(derived["quantized"])
    provenance = read_provenance(derived["quantized"])
    assert "Made from `micro`." in text and "| bits | 4 |" in text
    assert "4-bit" in text and "**Pretraining**" in text and "the folder corpus" in text
    assert provenance.quality.ppl == pytest.approx(provenance.quantization.ppl_quantized)
    assert f"| validation perplexity | {provenance.quality.ppl:.4g} |" in text
    assert "| params_total |" not in text and "| total |" in text


def test_an_exported_model_card_names_its_base_data_and_quality(derived, trained_model_dir):
    text = card(derived["exported"])
    float_quality = read_provenance(trained_model_dir).quality
    assert "Made from `micro`." in text and "Exported from an appleslm model" in text
    assert "**Pretraining**" in text and "| total |" in text
    assert f"| validation loss (nats/token) | {float_quality.loss:.4g} |" in text  # same logits
    assert 'load("micro-llama")' in text and "--trust-remote-code" not in text
