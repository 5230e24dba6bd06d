"""Data: corpus sources -> tokenizer (trained or loaded) -> token cache (memmap) -> packed batches.

`prepare_data` is the one entry point training needs; it knows nothing of models beyond the
vocabulary size it must fit.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from tokenizers import Tokenizer

from appleslm.atomic import atomic_file
from appleslm.data.batches import PackedBatches, iter_eval_batches, num_windows
from appleslm.data.corpus import DataError, corpus_fingerprint, describe_source, iter_documents
from appleslm.data.tokenizer import (
    DEFAULT_CHAT_TEMPLATE,
    EOT,
    SPECIAL_TOKENS,
    eot_id,
    load_tokenizer_file,
    save_tokenizer,
    train_tokenizer,
)
from appleslm.data.tokens import (
    cache_root,
    cached_tokens,
    count_documents,
    notice,
    split_mask,
    stable_hash,
)

if TYPE_CHECKING:  # appleslm.config imports the model (and mlx); data must not depend on either
    from appleslm.config import DataConfig

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "EOT",
    "SPECIAL_TOKENS",
    "DataError",
    "PackedBatches",
    "PreparedData",
    "corpus_fingerprint",
    "eot_id",
    "iter_documents",
    "iter_eval_batches",
    "load_tokenizer_file",
    "num_windows",
    "prepare_data",
    "save_tokenizer",
    "train_tokenizer",
]

TOKENIZER_RECIPE = 1  # bump when train_tokenizer changes, so cached tokenizers are retrained


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    train: np.ndarray  # 1-D token ids (read-only memmap), documents separated by the eot id
    val: np.ndarray
    meta: dict[str, Any]  # source, fingerprint, token/doc counts, eot_id, cache_path, tokenizer


def prepare_data(
    cfg: DataConfig,
    vocab_size: int,
    progress: bool | None = None,
    log: Callable[[str], None] = notice,
) -> PreparedData:
    """Tokenizer and token arrays for `cfg`, from the cache when nothing changed.

    With `cfg.tokenizer` unset a byte-level BPE of `vocab_size` is trained on the training split
    only (so validation text stays unseen) and cached; otherwise the given tokenizer is loaded and
    must fit in `vocab_size`. `log` gets a notice before each slow step (training the tokenizer,
    tokenizing the corpus), which happens once per corpus and tokenizer.
    """
    if cfg.tokenizer is None:
        tokenizer, tok_source = _trained_tokenizer(cfg, vocab_size, progress, log)
    else:
        tokenizer, tok_source = load_tokenizer_file(cfg.tokenizer), cfg.tokenizer
        n = tokenizer.get_vocab_size(with_added_tokens=True)
        if n > vocab_size:
            raise DataError(
                f"tokenizer {cfg.tokenizer} has {n} tokens but the model's vocab_size is "
                f"{vocab_size}; set model.vocab_size={n} (or larger)"
            )
    cache = cached_tokens(
        cfg.source,
        cfg.text_field,
        tokenizer,
        cfg.val_fraction,
        cfg.seed,
        cfg.cache_dir,
        progress,
        log,
    )
    meta = {**cache.meta, "tokenizer": tok_source}
    return PreparedData(tokenizer=tokenizer, train=cache.train, val=cache.val, meta=meta)


def _trained_tokenizer(
    cfg: DataConfig,
    vocab_size: int,
    progress: bool | None = None,
    log: Callable[[str], None] = notice,
) -> tuple[Tokenizer, str]:
    """Train on the training documents, or reuse the tokenizer trained for the same inputs."""
    key = stable_hash(
        {
            "recipe": TOKENIZER_RECIPE,
            "corpus": corpus_fingerprint(cfg.source, cfg.text_field),
            "vocab_size": vocab_size,
            "val_fraction": cfg.val_fraction,
            "seed": cfg.seed,
        }
    )
    path = cache_root(cfg.cache_dir) / "tokenizers" / key[:24] / "tokenizer.json"
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path)), str(path)
        except Exception:  # a damaged file: fall through and train again
            pass
    n_docs, _ = count_documents(cfg.source, cfg.text_field)
    is_val = split_mask(n_docs, cfg.val_fraction, cfg.seed)
    log(
        f"training a {vocab_size:,}-token BPE tokenizer on {int((~is_val).sum()):,} training "
        f"documents of {describe_source(cfg.source)[0]}; later runs reuse it..."
    )
    docs = (
        d
        for i, d in enumerate(iter_documents(cfg.source, cfg.text_field))
        if i >= n_docs or not is_val[i]
    )
    show = sys.stderr.isatty() if progress is None else progress
    tokenizer = train_tokenizer(docs, vocab_size, show_progress=show)
    with atomic_file(path) as tmp:  # a killed run must not leave half a tokenizer
        tokenizer.save(str(tmp))
        json.loads(tmp.read_text())  # refuse to publish something unreadable
    return tokenizer, str(path)
