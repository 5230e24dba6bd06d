"""STLM's byte-level input embedder and output head, and the id -> bytes table they read."""

import json

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from appleslm.cli import main
from appleslm.config import load_config
from appleslm.data.corpus import DataError
from appleslm.data.tokenizer import (
    BYTE_PAD,
    EOT,
    token_byte_strings,
    token_byte_table,
    tokens_longer_than,
    train_tokenizer,
)
from appleslm.io.model_dir import load_model, save_model_dir
from appleslm.models import Model, build_model, parameter_counts, token_losses
from appleslm.models import appleslm as arch
from tests.helpers import SMALL_BYTES, build_tiny, sample_tokenizer, tiny_args

TEXT = "Naïve café ✓ 🍎 日本語 — the state of the union <|endoftext|>"
BYTES_IN = dict(SMALL_BYTES, embedding="bytes", tie_word_embeddings=False)
BYTES_OUT = dict(SMALL_BYTES, head="bytes", tie_word_embeddings=False)


@pytest.fixture(scope="module")
def unicode_tokenizer() -> Tokenizer:
    return train_tokenizer([TEXT * 30], 300)


def test_byte_table_holds_each_ids_exact_utf8_bytes(unicode_tokenizer):
    strings = token_byte_strings(unicode_tokenizer)
    ids = unicode_tokenizer.encode(TEXT).ids
    # Ids that hold part of a multi-byte character keep exactly those bytes (no U+FFFD).
    assert any(s and s[0] >= 0x80 and len(s.decode("utf-8", "replace")) != len(s) for s in strings)
    assert b"".join(strings[i] for i in ids) == TEXT.encode("utf-8")
    assert strings[unicode_tokenizer.token_to_id(EOT)] == b"<|endoftext|>"  # literal text
    wrapped = PreTrainedTokenizerFast(tokenizer_object=unicode_tokenizer)
    assert token_byte_strings(wrapped) == strings


def test_byte_table_pads_and_cuts_to_the_slot_count(unicode_tokenizer):
    strings = token_byte_strings(unicode_tokenizer)
    table = token_byte_table(unicode_tokenizer, 4)
    assert table.shape == (len(strings), 4) and table.dtype == np.int32
    for row, data in zip(table, strings):
        kept = data[:4]
        assert bytes(row[: len(kept)].astype(np.uint8)) == kept
        assert (row[len(kept) :] == BYTE_PAD).all()
    assert tokens_longer_than(unicode_tokenizer, 4) == sum(len(s) > 4 for s in strings) > 0
    # STLM's quirk: the 13-byte end-of-text marker loses its last byte at 12 slots.
    assert tokens_longer_than(unicode_tokenizer, 12) >= 1
    assert BYTE_PAD == arch.BYTE_PAD


def test_byte_table_refuses_a_tokenizer_without_byte_level_decoding():
    word_level = Tokenizer(models.WordLevel({"the": 0, "[UNK]": 1}, unk_token="[UNK]"))
    with pytest.raises(DataError, match="byte-level BPE"):
        token_byte_table(word_level, 12)


def test_build_model_fills_the_table_and_reports_lost_bytes(unicode_tokenizer):
    lines = []
    args = tiny_args(**{**BYTES_IN, "byte_slots": 4, "vocab_size": 320})
    model = build_model(args, unicode_tokenizer, log=lines.append)
    expected = token_byte_table(unicode_tokenizer, 4)
    table = np.array(model.token_bytes)
    np.testing.assert_array_equal(table[: len(expected)], expected)
    assert (table[len(expected) :] == BYTE_PAD).all()  # ids the tokenizer never produces
    lost = tokens_longer_than(unicode_tokenizer, 4)
    assert lines == [
        f"byte table: {lost} of {len(expected)} vocabulary entries are longer than 4 bytes "
        "and lose the bytes past slot 4"
    ]
    with pytest.raises(ValueError, match="pass the tokenizer"):
        build_model(tiny_args(**BYTES_OUT))
    with pytest.raises(ValueError, match="vocab_size is 200"):
        build_model(tiny_args(**BYTES_IN, vocab_size=200), unicode_tokenizer, log=lines.append)


def test_byte_table_is_frozen_data_even_after_unfreeze():
    model = build_tiny(**BYTES_IN)
    model.unfreeze()
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert "token_bytes" not in trainable and "embed_bytes.byte_embed.weight" in trainable
    assert "token_bytes" not in parameter_counts(model)  # counts hold parameters only
    assert parameter_counts(model)["params_total"] == sum(v.size for v in trainable.values())


def per_slot_encoder_output(model: Model, ids: mx.array) -> tuple[mx.array, mx.array]:
    embedder = model.embed_bytes
    byte_ids = model.token_bytes[ids]
    return embedder.encoder(embedder.byte_embed(byte_ids)), byte_ids


@pytest.mark.parametrize("mode", ["clean", "faithful"])
def test_byte_embedder_pools_the_slots_as_its_mode_says(mode):
    model = build_tiny(**BYTES_IN, byte_embedding_mode=mode)
    ids = mx.arange(300)
    slots, byte_ids = per_slot_encoder_output(model, ids)
    slots, real = np.array(slots), np.array(byte_ids) != BYTE_PAD
    if mode == "faithful":  # STLM's code: a plain mean over every slot, pads included
        expected = slots.mean(axis=1)
    else:
        expected = (slots * real[..., None]).sum(axis=1) / real.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(np.array(model.embed(ids)), expected, rtol=1e-5, atol=1e-6)


def test_the_two_pooling_modes_differ_only_where_a_token_has_pads():
    clean = build_tiny(**BYTES_IN, byte_embedding_mode="clean")
    faithful = build_tiny(**BYTES_IN, byte_embedding_mode="faithful")
    ids = mx.arange(300)
    differs = np.abs(np.array(clean.embed(ids)) - np.array(faithful.embed(ids))).max(axis=1) > 1e-6
    full = (np.array(clean.token_bytes) != BYTE_PAD).all(axis=1)
    assert full.any() and not full.all()
    np.testing.assert_array_equal(differs, ~full)


def test_byte_head_logit_is_the_log_probability_of_the_ids_padded_bytes():
    model = build_tiny(**BYTES_OUT)
    h = mx.random.normal((2, 3, 64))
    byte_logits = np.array(model.byte_logits(h), dtype=np.float64)
    assert byte_logits.shape == (2, 3, 8, 257)
    log_probs = byte_logits - np.log(np.exp(byte_logits).sum(axis=-1, keepdims=True))
    table = np.array(model.token_bytes)
    expected = log_probs[:, :, np.arange(8), table].sum(axis=-1)  # (2, 3, V)
    np.testing.assert_allclose(np.array(model.head_logits(h)), expected, rtol=1e-5, atol=1e-4)
    # Distinct padded strings are disjoint events: their probabilities sum to at most one.
    assert len(np.unique(table, axis=0)) == len(table)
    assert (np.log(np.exp(expected).sum(axis=-1)) <= 1e-5).all()


@pytest.mark.parametrize("loss_mode", ["clean", "faithful"])
def test_byte_head_trains_with_either_loss(loss_mode):
    model = build_tiny(**BYTES_OUT, byte_head_loss=loss_mode)
    x = mx.array(np.random.default_rng(0).integers(3, 300, size=(4, 17)))
    inputs, targets = x[:, :-1], x[:, 1:]

    def loss(m):
        return token_losses(m, m.features(inputs)[0], targets).mean()

    if loss_mode == "faithful":  # STLM: cross-entropy per byte slot, pads included
        logits = model.byte_logits(model.features(inputs)[0])
        reference = nn.losses.cross_entropy(logits, model.token_bytes[targets]).mean()
    else:  # exact token-level cross-entropy over the byte head's logits
        reference = nn.losses.cross_entropy(model(inputs), targets).mean()
    assert abs(loss(model).item() - reference.item()) < 1e-5
    loss_and_grad = nn.value_and_grad(model, loss)
    first, grads = loss_and_grad(model)
    for name, g in tree_flatten(grads["byte_head"]):
        assert mx.abs(g).sum().item() > 0, name
    optimizer = optim.Adam(3e-3)
    for _ in range(30):
        value, grads = loss_and_grad(model)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
    assert value.item() < 0.8 * first.item()


def test_stlm_paper_widths_cost_a_tenth_of_a_tied_table(capsys):
    tied = parameter_counts(Model(load_config("stlm-50m").model))
    assert main(["info", "stlm-50m-bytes", "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert abs(tied["params_embedding"] / 1e6 - 25.7) < 0.05
    assert abs(counts["params_embedding"] / 1e6 - 2.56) < 0.01  # STLM: 1.35M + 1.21M
    assert abs(counts["params_byte_embedder"] / 1e6 - 1.35) < 0.01
    assert abs(counts["params_byte_head"] / 1e6 - 1.21) < 0.01
    assert counts["params_non_embedding"] == tied["params_non_embedding"]
    assert 0.89 < 1 - counts["params_embedding"] / tied["params_embedding"] < 0.91


def test_mlx_lm_generation_and_speculative_decoding_run_on_a_byte_head(tmp_path, tokenizer_dir):
    main_dir = save_model_dir(
        tmp_path / "main", build_tiny(**BYTES_OUT), tokenizer_dir=tokenizer_dir
    )
    draft_dir = save_model_dir(tmp_path / "draft", build_tiny(seed=1), tokenizer_dir=tokenizer_dir)
    model, tokenizer = load_model(main_dir)
    assert token_byte_strings(tokenizer) == token_byte_strings(sample_tokenizer())  # mlx-lm's too
    draft, _ = load_model(draft_dir)
    prompt = "The Congress shall"
    plain = mlx_lm.generate(model, tokenizer, prompt, max_tokens=12)
    speculative = mlx_lm.generate(model, tokenizer, prompt, max_tokens=12, draft_model=draft)
    assert plain and speculative == plain  # greedy: the draft changes speed, never the text
