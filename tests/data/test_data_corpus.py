"""Corpus sources and bad-input errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from appleslm.data import corpus
from appleslm.data.corpus import DataError, corpus_fingerprint, iter_documents


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_missing_path_names_the_path(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError, match="not found: .*nope.txt"):
        iter_documents(str(missing))  # raised eagerly, before iteration
    with pytest.raises(DataError, match="data source is empty"):
        iter_documents("")  # not silently the current directory


def test_empty_file_and_blank_folder_are_empty_corpus(tmp_path):
    empty = write(tmp_path / "empty.txt", "")
    with pytest.raises(DataError, match="empty corpus.*empty.txt"):
        list(iter_documents(str(empty)))
    write(tmp_path / "blank" / "a.txt", "  \n\n")
    write(tmp_path / "blank" / "b.jsonl", '{"text": "   "}\n\n')
    with pytest.raises(DataError, match="empty corpus.*blank"):
        list(iter_documents(str(tmp_path / "blank")))


def test_folder_without_text_files(tmp_path):
    write(tmp_path / "d" / "image.png", b"\x89PNG")
    with pytest.raises(DataError, match=r"no \.txt, \.md or \.jsonl files in folder .*d"):
        iter_documents(str(tmp_path / "d"))


def test_binary_file_is_rejected_with_its_name(tmp_path):
    f = write(tmp_path / "weights.txt", b"hello\x00\x01\x02world")
    with pytest.raises(DataError, match=r"weights.txt:1: binary file"):
        list(iter_documents(str(f)))


def test_non_utf8_is_rejected_with_file_and_line(tmp_path):
    f = write(tmp_path / "latin.txt", "first line\ncaf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.txt:2: not UTF-8 .*column 4"):
        list(iter_documents(str(f)))


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    f = write(tmp_path / "d.jsonl", '{"text": "ok"}\n\n{"text": broken\n')
    with pytest.raises(DataError, match=r"d.jsonl:3: not valid JSON"):
        list(iter_documents(str(f)))


def test_jsonl_missing_field_and_wrong_type(tmp_path):
    f = write(tmp_path / "d.jsonl", '{"body": "x"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:1: record has no 'text' field.*body"):
        list(iter_documents(str(f)))
    g = write(tmp_path / "e.jsonl", '{"text": 3}\n')
    with pytest.raises(DataError, match=r"e.jsonl:1: field 'text' is int"):
        list(iter_documents(str(g)))
    h = write(tmp_path / "f.jsonl", "[1, 2]\n")
    with pytest.raises(DataError, match=r"f.jsonl:1: expected a JSON object"):
        list(iter_documents(str(h)))


def test_jsonl_custom_field_and_blank_records_skipped(tmp_path):
    lines = [{"body": "one"}, {"body": ""}, {"body": "two\nlines"}]
    f = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in lines) + "\n")
    assert list(iter_documents(str(f), text_field="body")) == ["one", "two\nlines"]


def test_text_file_is_one_document_or_split_on_endoftext(tmp_path):
    one = write(tmp_path / "one.md", "\ufeff# Title\n\nBody text.\n")
    assert list(iter_documents(str(one))) == ["# Title\n\nBody text.\n"]  # BOM dropped
    text = "A story.\n<|endoftext|>\nB<|endoftext|>C\n<|endoftext|>"
    many = write(tmp_path / "stories.txt", text)
    assert list(iter_documents(str(many))) == ["A story.\n", "\nB", "C\n"]


def test_folder_is_recursive_sorted_and_skips_hidden_and_other_files(tmp_path):
    root = tmp_path / "corpus"
    write(root / "b.txt", "bee")
    write(root / "a" / "z.md", "zed")
    write(root / "a" / "y.jsonl", '{"text": "why"}\n{"text": "wye"}\n')
    write(root / ".hidden" / "x.txt", "hidden")
    write(root / "notes.csv", "csv,stuff")
    assert list(iter_documents(str(root))) == ["why", "wye", "zed", "bee"]


def test_json_record_list(tmp_path):
    f = write(tmp_path / "d.json", json.dumps([{"text": "a"}, {"text": "b"}]))
    assert list(iter_documents(str(f))) == ["a", "b"]


def test_fingerprint_tracks_changes(tmp_path):
    f = write(tmp_path / "d.txt", "hello")
    fp = corpus_fingerprint(str(f))
    assert corpus_fingerprint(str(f)) == fp
    assert corpus_fingerprint(str(f), text_field="body") != fp
    write(f, "hello, changed")
    os.utime(f, ns=(1, 1))
    assert corpus_fingerprint(str(f)) != fp


def test_bundled_corpus_is_233_addresses():
    docs = list(iter_documents("default"))
    assert len(docs) == 233
    assert sum(len(d) for d in docs) >= 5_000_000
    assert docs[0].startswith("Fellow-Citizens of the Senate")
    assert len(corpus_fingerprint("default")) == 64


def test_hf_source_reads_snapshot_files(tmp_path, monkeypatch):
    import huggingface_hub

    snap = tmp_path / "snap"
    write(snap / "data" / "train.jsonl", '{"text": "from the hub"}\n')
    write(snap / "README.md", "card, not data")
    write(snap / "dataset_infos.json", '{\n  "default": {"features": {}}\n}\n')
    calls = []

    def fake_download(**kwargs):
        calls.append(kwargs)
        return str(snap)

    corpus._hf_snapshot.cache_clear()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert list(iter_documents("hf:someone/stories")) == ["from the hub"]
    assert calls[0]["repo_id"] == "someone/stories" and calls[0]["repo_type"] == "dataset"
    assert "*.jsonl" in calls[0]["allow_patterns"]
    corpus._hf_snapshot.cache_clear()


def test_hf_network_error_is_a_clear_data_error(monkeypatch):
    import huggingface_hub

    def offline(**kwargs):
        raise OSError("connection refused")

    corpus._hf_snapshot.cache_clear()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(DataError, match="could not download dataset 'someone/gone'.*refused"):
        iter_documents("hf:someone/gone")
    with pytest.raises(DataError, match="not a Hugging Face dataset id"):
        iter_documents("hf:no-slash")
    corpus._hf_snapshot.cache_clear()
