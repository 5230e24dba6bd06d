"""The token cache and prepare_data: split by document, reuse, invalidation, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import appleslm.data as data_pkg
from appleslm.config import DataConfig
from appleslm.data import DataError, PreparedData, prepare_data, train_tokenizer
from appleslm.data import tokens as tokens_mod
from appleslm.data.tokens import split_mask

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def make_corpus(root: Path, n_docs: int = 20) -> list[str]:
    """n_docs small distinct documents as JSONL; returns them in corpus order."""
    docs = [
        f"doc {i}: " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(8 + i % 5))
        for i in range(n_docs)
    ]
    root.mkdir(parents=True, exist_ok=True)
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return docs


def config(tmp_path: Path, **kw) -> DataConfig:
    kw.setdefault("source", str(tmp_path / "corpus"))
    return DataConfig(cache_dir=str(tmp_path / "cache"), val_fraction=0.25, **kw)


def split_docs(prepared: PreparedData, array: np.ndarray) -> list[str]:
    """Decode a token array back into its documents (each ends with the eot id)."""
    eot = prepared.meta["eot_id"]
    ids = np.asarray(array).tolist()
    assert ids[-1] == eot
    out, cur = [], []
    for i in ids:
        if i == eot:
            out.append(prepared.tokenizer.decode(cur))
            cur = []
        else:
            cur.append(i)
    return out


def test_split_mask_is_seeded_and_keeps_both_sides():
    a = split_mask(40, 0.25, seed=0)
    assert a.sum() == 10 and np.array_equal(a, split_mask(40, 0.25, seed=0))
    assert not np.array_equal(a, split_mask(40, 0.25, seed=1))
    assert split_mask(3, 0.01, 0).sum() == 1  # a tiny corpus still gets one validation doc
    assert split_mask(2, 0.99, 0).sum() == 1  # ...and keeps one for training
    assert split_mask(5, 0.0, 0).sum() == 0
    with pytest.raises(DataError, match="val_fraction"):
        split_mask(5, 1.0, 0)


def test_prepare_splits_by_document_disjoint_and_seeded(tmp_path, monkeypatch):
    docs = make_corpus(tmp_path / "corpus")
    seen_by_trainer: list[str] = []

    def recording_train(docs_iter, vocab_size, show_progress=False):
        got = list(docs_iter)
        seen_by_trainer.extend(got)
        return train_tokenizer(got, vocab_size)

    monkeypatch.setattr(data_pkg, "train_tokenizer", recording_train)
    p = prepare_data(config(tmp_path), vocab_size=300)
    train, val = split_docs(p, p.train), split_docs(p, p.val)
    assert (len(train), len(val)) == (15, 5)
    assert set(train).isdisjoint(val) and sorted(train + val) == sorted(docs)
    assert sorted(seen_by_trainer) == sorted(train)  # the tokenizer never saw validation text
    assert p.train.dtype == np.uint16 and isinstance(p.train, np.memmap)
    assert p.meta["train_tokens"] == len(p.train) and p.meta["val_docs"] == 5
    assert p.meta["source"] == str(tmp_path / "corpus")
    assert Path(p.meta["cache_path"]).is_dir()

    again = prepare_data(config(tmp_path), vocab_size=300)
    assert split_docs(again, again.val) == val
    other = prepare_data(config(tmp_path, seed=1), vocab_size=300)
    assert sorted(split_docs(other, other.val)) != sorted(val)


def test_cache_is_reused_and_invalidated_when_corpus_changes(tmp_path, monkeypatch):
    make_corpus(tmp_path / "corpus")
    calls = []
    real = tokens_mod._tokenize
    monkeypatch.setattr(tokens_mod, "_tokenize", lambda *a: calls.append(1) or real(*a))
    trained = []
    monkeypatch.setattr(
        data_pkg, "train_tokenizer", lambda *a, **k: trained.append(1) or train_tokenizer(*a, **k)
    )

    notices: list[str] = []
    first = prepare_data(config(tmp_path), vocab_size=300, log=notices.append)
    # The slow first time says what it is doing; the cached second time is silent.
    assert [n.split(" ", 1)[0] for n in notices] == ["training", "tokenizing"]
    assert "300-token BPE tokenizer on 15 training documents of the folder corpus/" in notices[0]
    assert "the folder corpus/ (20 documents, " in notices[1]
    bin_path = Path(first.meta["cache_path"]) / "train.bin"
    mtime = bin_path.stat().st_mtime_ns
    second = prepare_data(config(tmp_path), vocab_size=300, log=notices.append)
    assert len(notices) == 2
    assert len(calls) == 1 and len(trained) == 1  # neither tokenized nor trained again
    assert second.meta["tokenizer"] == first.meta["tokenizer"]
    assert second.tokenizer.to_str() == first.tokenizer.to_str()
    assert second.meta["cache_path"] == first.meta["cache_path"]
    assert bin_path.stat().st_mtime_ns == mtime
    assert np.array_equal(second.train, first.train)

    new_docs = make_corpus(tmp_path / "corpus", n_docs=24)
    third = prepare_data(config(tmp_path), vocab_size=300)
    assert len(calls) == 2 and len(trained) == 2
    assert third.meta["cache_path"] != first.meta["cache_path"]
    assert third.meta["train_docs"] + third.meta["val_docs"] == len(new_docs)


def test_crash_while_tokenizing_leaves_no_cache_entry(tmp_path, monkeypatch):
    make_corpus(tmp_path / "corpus")
    tok = train_tokenizer(make_corpus(tmp_path / "other"), 300)
    tok_file = tmp_path / "tok.json"
    tok.save(str(tok_file))

    def crash(*args):
        (args[4] / "train.bin").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(tokens_mod, "_tokenize", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(config(tmp_path, tokenizer=str(tok_file)), vocab_size=300)
    assert list((tmp_path / "cache").iterdir()) == []  # no entry, no temp leftovers
    monkeypatch.undo()
    p = prepare_data(config(tmp_path, tokenizer=str(tok_file)), vocab_size=300)
    assert p.meta["train_docs"] + p.meta["val_docs"] == 20


def test_loaded_tokenizer_must_fit_model_vocab(tmp_path):
    make_corpus(tmp_path / "corpus")
    tok = train_tokenizer(make_corpus(tmp_path / "other"), 300)
    tok.save(str(tmp_path / "tok.json"))
    cfg = config(tmp_path, tokenizer=str(tmp_path / "tok.json"))
    with pytest.raises(DataError, match=r"has 300 tokens .*set model.vocab_size=300"):
        prepare_data(cfg, vocab_size=290)
    p = prepare_data(cfg, vocab_size=512)
    assert p.tokenizer.get_vocab() == tok.get_vocab()
    assert p.meta["tokenizer"] == str(tmp_path / "tok.json")


def test_single_document_holds_out_its_tail(tmp_path):
    (tmp_path / "corpus").mkdir()
    text = " ".join(WORDS * 30)
    (tmp_path / "corpus" / "one.txt").write_text(text)
    p = prepare_data(config(tmp_path), vocab_size=300)
    assert p.meta["val_split"] == "tail" and len(p.val) > 0
    whole = np.concatenate([p.train, p.val]).tolist()
    assert whole[-1] == p.meta["eot_id"]
    assert p.tokenizer.decode(whole[:-1]) == text
    assert len(p.val) == int(len(whole) * 0.25)


def test_empty_corpus_error_reaches_prepare(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "blank.txt").write_text("\n\n")
    with pytest.raises(DataError, match="empty corpus"):
        prepare_data(config(tmp_path), vocab_size=300)
