"""Byte-level BPE training, loading, and saving in a form transformers and mlx-lm load."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models

from appleslm.data.corpus import DataError
from appleslm.data.tokenizer import (
    EOT,
    IM_END,
    IM_START,
    eot_id,
    load_tokenizer_file,
    save_tokenizer,
    train_tokenizer,
)

DOCS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Fellow-Citizens of the Senate and House of Representatives: the state of the union.",
    "Numbers 1234 and 56, tabs\tand\nnewlines\n\n, spaces   before , punctuation !",
] * 5
# Characters never seen in training: byte-level BPE must still round-trip them.
TRICKY = " leading space, trailing space  \n\tcafé ✓ 🍎 日本語 , ! it 's <|endoftext|> done"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(DOCS, 300)


def test_trained_tokenizer_layout_and_round_trip(tok):
    assert [tok.token_to_id(t) for t in (EOT, IM_START, IM_END)] == [0, 1, 2]
    assert tok.get_vocab_size() == 300
    assert eot_id(tok) == 0
    ids = tok.encode(TRICKY).ids
    assert tok.decode(ids, skip_special_tokens=False) == TRICKY
    assert ids.count(0) == 1  # the literal marker becomes the single special token
    assert len(tok.encode("the state of the union").ids) < len("the state of the union")


def test_vocab_too_small():
    with pytest.raises(DataError, match="too small"):
        train_tokenizer(DOCS, 100)


def test_save_loads_in_transformers_with_exact_round_trip(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoTokenizer

    save_tokenizer(tok, tmp_path)
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= {
        p.name for p in tmp_path.iterdir()
    }
    hf = AutoTokenizer.from_pretrained(tmp_path)
    ids = hf.encode(TRICKY)
    assert ids == tok.encode(TRICKY).ids  # no bos/eos added, same ids as tokenizers
    assert hf.decode(ids) == TRICKY  # no clean-up of spaces before punctuation
    assert (hf.eos_token, hf.eos_token_id, hf.pad_token_id, hf.bos_token) == (EOT, 0, 0, None)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    text = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert hf.apply_chat_template(chat[:1], tokenize=False) == "<|im_start|>user\nhi<|im_end|>\n"
    assert hf.encode(text).count(1) == 3  # <|im_start|> is one special token, not text


def test_save_loads_in_mlx_lm(tok, tmp_path):
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, load

    save_tokenizer(tok, tmp_path, model_max_length=512)
    wrapper = load(tmp_path)
    assert wrapper.model_max_length == 512
    assert wrapper.eos_token_ids == {0}
    assert wrapper.decode(wrapper.encode(TRICKY)) == TRICKY
    assert isinstance(wrapper.detokenizer, BPEStreamingDetokenizer)
    # Streamed decoding is exact too, except that mlx-lm's BPE detokenizer (for every GPT-2
    # style tokenizer) drops one leading space of a generation, so start without one.
    text = TRICKY.lstrip()
    detok = wrapper.detokenizer
    detok.reset()
    for i in wrapper.encode(text):
        detok.add_token(i)
    detok.finalize()
    assert detok.text == text


def test_load_tokenizer_file_from_path_and_dir(tok, tmp_path):
    save_tokenizer(tok, tmp_path / "model")
    by_file = load_tokenizer_file(str(tmp_path / "model" / "tokenizer.json"))
    by_dir = load_tokenizer_file(str(tmp_path / "model"))
    assert by_file.encode(TRICKY).ids == by_dir.encode(TRICKY).ids == tok.encode(TRICKY).ids


def test_load_tokenizer_file_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no tokenizer.json in .*empty"):
        load_tokenizer_file(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="tokenizer not found: .*missing.json"):
        load_tokenizer_file(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a tokenizer"}')
    with pytest.raises(DataError, match="bad.json: not a valid tokenizer.json"):
        load_tokenizer_file(str(bad))


def test_load_tokenizer_from_hub(tok, tmp_path, monkeypatch):
    import huggingface_hub

    tok.save(str(tmp_path / "tokenizer.json"))

    def fake_download(repo_id, filename, **kwargs):  # endpoint, repo_type
        if repo_id == "someone/gone":
            raise OSError("404 not found")
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert load_tokenizer_file("someone/model").get_vocab() == tok.get_vocab()
    with pytest.raises(DataError, match="could not get tokenizer.json from .*someone/gone.*404"):
        load_tokenizer_file("someone/gone")


def test_eot_falls_back_to_a_pretrained_eos():
    other = Tokenizer(models.WordLevel({"</s>": 0, "a": 1}, unk_token="a"))
    assert eot_id(other) == 0
    none = Tokenizer(models.WordLevel({"a": 0}, unk_token="a"))
    with pytest.raises(DataError, match="no end-of-text token"):
        eot_id(none)
