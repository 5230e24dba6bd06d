"""Bits per byte: exact byte counts per token id, a hand computation, batching, `appleslm eval`
on the held-out split, and `appleslm density --metric bpb`."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from appleslm.cli import main
from appleslm.data.tokenizer import token_byte_lengths
from appleslm.density import DensityError, density_report
from appleslm.evaluate.perplexity import evaluate_text, evaluate_tokens, held_out_tokens
from appleslm.io.files import Provenance, Quality, write_provenance
from appleslm.io.model_dir import load_model

TEXTS = ["The Congress shall have power", "café ☕ naïve 東京 🤖\n\tend", "  two  spaces ", "x"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir)


def test_byte_level_bpe_lengths_add_up_to_the_utf8_bytes(tiny):
    _, tokenizer = tiny
    lengths = token_byte_lengths(tokenizer)
    assert lengths.shape == (tokenizer.backend_tokenizer.get_vocab_size(),)
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert len(ids) > 1 or text == "x"
        assert lengths[ids].sum() == len(text.encode("utf-8")), text
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert lengths[tokenizer.convert_tokens_to_ids(special)] == 0


def test_sentencepiece_counts_its_prepended_space():
    """ "▁" counts as the space it stands for, "<0xNN>" as one byte: a text gets one byte more
    than it has, the space Metaspace puts in front of it (the documented approximation)."""
    pieces = ["<unk>", "▁", "a", "b", "▁a", "ab", *(f"<0x{b:02X}>" for b in range(256))]
    tok = Tokenizer(models.BPE({p: i for i, p in enumerate(pieces)}, [], byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    lengths = token_byte_lengths(tok)
    for text in ["ab a", "a ☕b"]:
        ids = tok.encode(text).ids
        assert tok.decode(ids) == text
        assert lengths[ids].sum() == len(text.encode("utf-8")) + 1


def test_bits_per_byte_is_the_hand_computation(tiny, tiny_model_dir, tmp_path):
    model, tokenizer = tiny
    text = "Total: 12 € for 3 crêpes ☕☕, merci!"
    (tmp_path / "t.txt").write_text(text)
    result = evaluate_text(tiny_model_dir, tmp_path / "t.txt", log=lambda message: None)

    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    logits = model(mx.array([ids[:-1]]))[0].astype(mx.float32)
    logprobs = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    nll = -sum(float(logprobs[j - 1, ids[j]]) for j in range(1, len(ids)))
    # Predicted text: all of it but the first token ("T", one byte); the end-of-text id is no text.
    assert tokenizer.decode(ids[:1]) == "T"
    predicted_bytes = len(text.encode("utf-8")) - 1
    assert result["tokens"] == len(ids) - 1 and result["bytes"] == predicted_bytes
    assert result["loss"] == pytest.approx(nll / (len(ids) - 1), rel=1e-5)
    assert result["bpb"] == pytest.approx(nll / math.log(2) / predicted_bytes, rel=1e-5)


def test_batched_windows_give_the_one_window_at_a_time_loss(tiny):
    model, _ = tiny
    tokens = np.random.default_rng(0).integers(3, 300, size=203).astype(np.int32)
    one = evaluate_tokens(model, tokens, 16, batch_size=1)
    batched = evaluate_tokens(model, tokens, 16, batch_size=8)
    total = 0.0
    for start in range(0, len(tokens) - 1, 16):  # the old loop, window by window
        window = tokens[start : start + 17]
        logits = model(mx.array(window[None, :-1])).astype(mx.float32)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        total -= mx.take_along_axis(logprobs[0], mx.array(window[1:, None]), axis=-1).sum().item()
    assert one["tokens"] == batched["tokens"] == 202
    assert batched["loss"] == pytest.approx(total / 202, rel=1e-5)
    assert one["loss"] == pytest.approx(total / 202, rel=1e-5)


def test_eval_without_data_uses_the_held_out_split(trained_model_dir, capsys):
    model, tokenizer = load_model(trained_model_dir)
    held_out = held_out_tokens(trained_model_dir, tokenizer, None)
    assert main(["eval", str(trained_model_dir), "--json", "--no-progress"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["tokens"] == len(held_out) - 1 and result["data"].startswith("held-out")
    assert 0 < result["bpb"] < result["loss"] / math.log(2)  # tokens hold more than a byte
    assert f"evaluating on {len(held_out):,} tokens of held-out documents" in captured.err

    assert main(["eval", str(trained_model_dir), "--max-tokens", "100", "--no-progress"]) == 0
    assert "over 99 tokens" in capsys.readouterr().out


def test_eval_refuses_bad_settings_and_a_model_without_training_data(
    tiny_model_dir, trained_model_dir, capsys
):
    cases = [
        (trained_model_dir, ["--max-tokens", "0"], "--max-tokens must be at least 2, not 0"),
        (trained_model_dir, ["--seq-len", "0"], "--seq-len must be at least 1, not 0"),
        (trained_model_dir, ["--batch-size", "0"], "--batch-size must be at least 1, not 0"),
        (tiny_model_dir, [], "records no training data"),
        (tiny_model_dir, ["--data", "/nowhere.txt"], "/nowhere.txt"),
    ]
    for model, extra, message in cases:
        assert main(["eval", str(model), *extra, "--no-progress"]) == 2
        last = capsys.readouterr().err.splitlines()[-1]  # after any notice
        assert last.startswith("appleslm eval: error: ") and message in last, last


def write_run(root, name, variant, params, loss, bpb):
    model_dir = root / name / "model"
    model_dir.mkdir(parents=True)
    quality = Quality(loss=loss, ppl=math.exp(loss), tokens=1000, split="held-out", bpb=bpb)
    write_provenance(
        model_dir, Provenance(name, variant, {"params_total": int(params)}, quality=quality)
    )
    return root / name


def test_density_fits_bits_per_byte_with_metric_bpb(tmp_path, capsys):
    def loss_curve(n):
        return 30.0 * n**-0.2 + 2.0

    def bpb_curve(n):
        return 9.0 * n**-0.25 + 0.5

    sizes = [1e5, 3e5, 1e6, 3e6]
    runs = [
        write_run(tmp_path, f"d{i}", "dense", n, loss_curve(n), bpb_curve(n))
        for i, n in enumerate(sizes)
    ]
    # The variant's loss is a dense model's of half its size, its bits per byte one of twice.
    runs.append(write_run(tmp_path, "v", "bytes", 1e6, loss_curve(5e5), bpb_curve(2e6)))
    by_loss = {r["name"]: r for r in density_report(runs)["runs"]}
    report = density_report(runs, metric="bpb")
    by_bpb = {r["name"]: r for r in report["runs"]}
    assert by_loss["v"]["density"] == pytest.approx(0.5, rel=1e-4)
    assert by_bpb["v"]["density"] == pytest.approx(2.0, rel=1e-4)
    assert report["metric"] == "bpb" and by_bpb["v"]["bpb"] == pytest.approx(bpb_curve(2e6))

    args = ["density", *map(str, runs), "--metric", "bpb", "--no-plot"]
    assert main(args) == 0
    assert "bpb" in capsys.readouterr().out.splitlines()[3]

    runs.append(write_run(tmp_path, "old", "dense", 2e6, loss_curve(2e6), None))
    with pytest.raises(DensityError, match="no bits per byte"):
        density_report(runs, metric="bpb")
