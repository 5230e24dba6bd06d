"""The token cache: a corpus tokenized once into flat binary files, memory-mapped on later runs.

Layout of one cache entry, `<cache_root>/<key[:24]>/`:
  train.bin, val.bin   every document's ids followed by the end-of-text id, concatenated
                       (uint16 when the vocabulary fits, else uint32)
  meta.json            key, dtype, token and document counts, how the split was made

The key hashes everything the bytes depend on (corpus fingerprint, the tokenizer's full JSON,
val_fraction, seed, text_field), so a changed corpus or tokenizer can never reuse stale tokens.
Entries are written into a temporary directory and renamed into place, so a crash or SIGKILL
mid-tokenization leaves no half-written entry that a later run could mistake for a finished one.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from appleslm.atomic import atomic_directory
from appleslm.data.corpus import DataError, corpus_fingerprint, describe_source, iter_documents
from appleslm.data.tokenizer import eot_id

CACHE_VERSION = 1
DEFAULT_CACHE_DIR = Path("~/.cache/appleslm/tokens")
CHUNK_CHARS = 4_000_000  # characters per encode_batch call: big enough to keep all cores busy


def notice(message: str) -> None:
    """The default `log` of the slow data steps: stderr, so `--json` output stays clean."""
    tqdm.write(message, file=sys.stderr)


@dataclass
class TokenCache:
    path: Path
    train: np.ndarray  # read-only memmaps (plain empty arrays when a split has no tokens)
    val: np.ndarray
    meta: dict[str, Any]


def cache_root(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()


def stable_hash(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def split_mask(n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """Which documents (by index in corpus order) are held out for validation: a seeded choice.

    At least one document goes each way whenever there are two or more and val_fraction > 0, so
    a small corpus still gets a validation set.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(n_docs * val_fraction))
    if val_fraction > 0 and n_docs >= 2:
        n_val = min(max(n_val, 1), n_docs - 1)
    else:
        n_val = 0
    mask = np.zeros(n_docs, dtype=bool)
    order = np.random.default_rng([seed, 0x5EED]).permutation(n_docs)
    mask[order[:n_val]] = True
    return mask


def count_documents(source: str, text_field: str) -> tuple[int, int]:
    """(documents, characters) of a corpus: one cheap pass, needed to split before tokenizing."""
    n_docs = n_chars = 0
    for doc in iter_documents(source, text_field):
        n_docs += 1
        n_chars += len(doc)
    return n_docs, n_chars


def cached_tokens(
    source: str,
    text_field: str,
    tokenizer: Tokenizer,
    val_fraction: float,
    seed: int,
    cache_dir: str | Path | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] = notice,
) -> TokenCache:
    """Tokenize `source` into the cache unless an entry for the same inputs exists; memory-map it.

    `progress=None` shows the bar only on a terminal; `log` gets a notice before tokenizing.
    """
    fingerprint = corpus_fingerprint(source, text_field)
    key = stable_hash(
        {
            "version": CACHE_VERSION,
            "corpus": fingerprint,
            "tokenizer": tokenizer.to_str(),
            "val_fraction": val_fraction,
            "seed": seed,
            "text_field": text_field,
        }
    )
    root = cache_root(cache_dir)
    entry = root / key[:24]
    cache = _load(entry, key)
    if cache is not None:
        return cache
    n_docs, n_chars = count_documents(source, text_field)
    log(
        f"tokenizing {describe_source(source)[0]} ({n_docs:,} documents, {n_chars:,} characters) "
        "into the token cache; later runs reuse it..."
    )
    is_val = split_mask(n_docs, val_fraction, seed)
    with atomic_directory(entry) as tmp:  # a broken entry, or a concurrent run's, is replaced
        meta = _tokenize(
            iter_documents(source, text_field), is_val, n_chars, tokenizer, tmp, progress
        )
        if meta["val_tokens"] == 0 and val_fraction > 0:
            _hold_out_tail(tmp, meta, val_fraction)
        meta.update(
            key=key,
            source=source,
            fingerprint=fingerprint,
            text_field=text_field,
            val_fraction=val_fraction,
            seed=seed,
            version=CACHE_VERSION,
        )
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    cache = _load(entry, key)
    if cache is None:
        raise DataError(f"token cache {entry} could not be read back after writing")
    return cache


def _tokenize(
    docs: Iterable[str],
    is_val: np.ndarray,
    n_chars: int,
    tokenizer: Tokenizer,
    out: Path,
    progress: bool | None,
) -> dict[str, Any]:
    dtype = token_dtype(tokenizer.get_vocab_size(with_added_tokens=True))
    eot = eot_id(tokenizer)
    counts = {"train": 0, "val": 0}
    doc_counts = {"train": 0, "val": 0}
    start = time.perf_counter()
    disable = (not sys.stderr.isatty()) if progress is None else not progress
    bar = tqdm(total=n_chars, unit="char", unit_scale=True, desc="tokenizing", disable=disable)
    with open(out / "train.bin", "wb") as ftrain, open(out / "val.bin", "wb") as fval, bar:
        files = {"train": ftrain, "val": fval}
        index = 0
        for chunk in _chunks(docs):
            encodings = tokenizer.encode_batch_fast(chunk, add_special_tokens=False)
            for doc, enc in zip(chunk, encodings, strict=True):
                if index >= len(is_val):
                    raise DataError("the corpus changed while it was being tokenized; run again")
                split = "val" if is_val[index] else "train"
                ids = np.array([*enc.ids, eot], dtype=dtype)
                files[split].write(ids.tobytes())
                counts[split] += len(ids)
                doc_counts[split] += 1
                index += 1
                bar.update(len(doc))
    if index != len(is_val):
        raise DataError("the corpus changed while it was being tokenized; run again")
    return {
        "dtype": dtype.name,
        "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
        "eot_id": eot,
        "train_tokens": counts["train"],
        "val_tokens": counts["val"],
        "train_docs": doc_counts["train"],
        "val_docs": doc_counts["val"],
        "chars": n_chars,
        "val_split": "documents",
        "seconds": round(time.perf_counter() - start, 3),
    }


def _chunks(docs: Iterable[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    size = 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc)
        if size >= CHUNK_CHARS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _hold_out_tail(entry: Path, meta: dict[str, Any], val_fraction: float) -> None:
    """A one-document corpus cannot be split by document: hold out the tail of its tokens instead.

    (The common case is a single big .txt file, such as tiny-shakespeare.)
    """
    dtype = np.dtype(meta["dtype"])
    n = meta["train_tokens"]
    n_val = int(n * val_fraction)
    if n_val < 2 or n - n_val < 2:
        return  # too small to split at all; the run trains without validation
    train = np.fromfile(entry / "train.bin", dtype=dtype)
    train[n - n_val :].tofile(entry / "val.bin")
    os.truncate(entry / "train.bin", (n - n_val) * dtype.itemsize)
    meta.update(train_tokens=n - n_val, val_tokens=n_val, val_split="tail")


def _load(entry: Path, key: str) -> TokenCache | None:
    """The entry if it is complete and belongs to `key`, else None (and it will be rebuilt)."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("key") != key:
        return None
    dtype = np.dtype(meta["dtype"])
    arrays = {}
    for split in ("train", "val"):
        path = entry / f"{split}.bin"
        n = meta[f"{split}_tokens"]
        if not path.is_file() or path.stat().st_size != n * dtype.itemsize:
            return None
        # np.memmap refuses empty files, and an empty split is legitimate (val_fraction=0).
        arrays[split] = (
            np.memmap(path, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype=dtype)
        )
    meta["cache_path"] = str(entry)
    return TokenCache(path=entry, train=arrays["train"], val=arrays["val"], meta=meta)
