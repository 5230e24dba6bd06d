"""Tokenizers: train a byte-level BPE on the corpus, or load an existing tokenizer.json.

Byte-level BPE never meets an unknown character and decodes back to the exact input text, which
is what a toolkit that trains on whatever text a user has needs. The saved form is the Hugging Face
pair tokenizer.json + tokenizer_config.json, because that is what mlx-lm (through transformers'
AutoTokenizer) loads from a model directory.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from appleslm.data.corpus import DataError

EOT = "<|endoftext|>"  # end of document, document separator in packed sequences, and eos
IM_START = "<|im_start|>"  # ChatML turn markers, reserved now so chat fine-tuning needs no resize
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOT, IM_START, IM_END]  # ids 0, 1, 2 in trained tokenizers
# eos spellings of common pretrained tokenizers, tried in order when a loaded one lacks EOT.
EOS_CANDIDATES = [EOT, "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", IM_END]

# ChatML. Plain string concatenation only, so that every Jinja renderer (transformers, mlx-lm,
# llama.cpp's minja) agrees on it.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
BYTE_PAD = 256  # the models' byte symbols: the 256 byte values, then the pad (models.appleslm)
_NO_MAX_LENGTH = int(1e30)  # transformers' own "no limit" value (VERY_LARGE_INTEGER)
METASPACE = "\u2581"  # SentencePiece's stand-in for a space ("▁")
BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece's one-byte pieces


def train_tokenizer(docs: Iterable[str], vocab_size: int, show_progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE with `vocab_size` entries (fewer if the corpus runs out of merges)."""
    floor = len(SPECIAL_TOKENS) + 256
    if vocab_size < floor:
        raise DataError(f"vocab_size {vocab_size} is too small for byte-level BPE (min {floor})")
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False keeps encode/decode an exact round trip (no invented leading space).
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        # All 256 byte symbols up front, so any input (emoji, CJK, stray bytes) stays encodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def eot_id(tokenizer: Tokenizer) -> int:
    """The id that ends a document: `<|endoftext|>`, or a pretrained tokenizer's own eos."""
    for token in EOS_CANDIDATES:
        tid = tokenizer.token_to_id(token)
        if tid is not None:
            return tid
    raise DataError(
        f"tokenizer has no end-of-text token (looked for {', '.join(EOS_CANDIDATES)}); "
        "documents cannot be separated"
    )


def load_tokenizer_file(spec: str) -> Tokenizer:
    """Load a tokenizer from a tokenizer.json path, a directory holding one, or a Hub model repo."""
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
        if not path.is_file():
            raise DataError(f"no tokenizer.json in {path.parent}")
    elif not path.exists():
        path = _hub_tokenizer(spec)
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise DataError(f"{path}: not a valid tokenizer.json: {e}") from e


def save_tokenizer(
    tokenizer: Tokenizer,
    model_dir: Path,
    chat_template: str = DEFAULT_CHAT_TEMPLATE,
    model_max_length: int | None = None,
) -> None:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja into `model_dir`.

    The config names `PreTrainedTokenizerFast`, so transformers needs no tokenizer class of ours,
    and turns off `clean_up_tokenization_spaces`, which would otherwise rewrite " ." as "." on
    decode and break the exact round trip.
    """
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(model_dir / "tokenizer.json"))
    eos = tokenizer.id_to_token(eot_id(tokenizer))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": eos,
        "pad_token": eos,  # padding is masked out; reusing eos avoids growing the vocabulary
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length or _NO_MAX_LENGTH,
        "chat_template": chat_template,
    }
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    # transformers >= 4.43 saves the template beside the config; write both so either reader agrees.
    (model_dir / "chat_template.jinja").write_text(chat_template)


@cache
def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level alphabet reversed: the printable character that stands for each byte
    in a ByteLevel BPE vocabulary -> that byte (printable ASCII stands for itself)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    shifted = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(shifted)}
    return {char: byte for byte, char in chars.items()}


def token_byte_strings(tokenizer: Any) -> list[bytes]:
    """The exact UTF-8 bytes of every id of a byte-level BPE, in id order.

    A vocabulary entry is decoded through the byte-level alphabet, so an id holding part of a
    multi-byte character gets exactly those bytes (decoding ids one at a time would turn them
    into U+FFFD); added and special tokens are their literal text. Takes a
    `tokenizers.Tokenizer` or anything wrapping one (transformers' fast tokenizers, mlx-lm's
    TokenizerWrapper).
    """
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else tokenizer.backend_tokenizer
    if not isinstance(tok.decoder, decoders.ByteLevel):
        raise DataError(
            f"byte-level models need a byte-level BPE tokenizer (GPT-2 style) to know each id's "
            f"exact bytes; this one decodes with {type(tok.decoder).__name__}"
        )
    added = {i: t.content for i, t in tok.get_added_tokens_decoder().items()}
    byte_of = _byte_of_char()
    strings = []
    for i in range(tok.get_vocab_size(with_added_tokens=True)):
        if i in added:
            strings.append(added[i].encode("utf-8"))
        else:
            token = tok.id_to_token(i) or ""
            strings.append(bytes(byte_of[c] for c in token))
    return strings


def token_byte_table(tokenizer: Any, slots: int) -> np.ndarray:
    """(V, slots) int32: each id's bytes, cut to `slots` or right-padded with BYTE_PAD."""
    strings = token_byte_strings(tokenizer)
    table = np.full((len(strings), slots), BYTE_PAD, dtype=np.int32)
    for i, data in enumerate(strings):
        kept = data[:slots]
        table[i, : len(kept)] = np.frombuffer(kept, dtype=np.uint8)
    return table


def tokens_longer_than(tokenizer: Any, slots: int) -> int:
    """How many vocabulary entries have more than `slots` bytes, and lose the rest in the table."""
    return sum(len(data) > slots for data in token_byte_strings(tokenizer))


def token_byte_lengths(tokenizer: Any) -> np.ndarray:
    """How many UTF-8 bytes of text each token id stands for, in id order (int64).

    Byte-level BPE (GPT-2 style: ours, SmolLM2 and other GGUF "gpt2" vocabularies, Llama 3):
    every character of a vocabulary entry stands for one byte, so the count is exact, also for an
    id that holds only part of a multi-byte character. SentencePiece (GGUF "llama": "▁" for a
    space, "<0xNN>" byte fallback): "▁" counts as the space it stands for, so the space such a
    tokenizer prepends to each text counts too (one byte per encoded text more than it has).

    Special tokens count 0: they are markup that the data pipeline or chat template inserts
    (document ends, turn markers), not text, and their spellings differ between tokenizers
    ("<|endoftext|>", "</s>"), which would make bits per byte depend on the tokenizer, the one
    thing it must not. Added tokens that are not special stand for their literal text.
    Takes a `tokenizers.Tokenizer` or anything wrapping one (transformers' fast tokenizers,
    mlx-lm's TokenizerWrapper).
    """
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else tokenizer.backend_tokenizer
    byte_level = isinstance(tok.decoder, decoders.ByteLevel)
    added = tok.get_added_tokens_decoder()
    lengths = np.zeros(tok.get_vocab_size(with_added_tokens=True), dtype=np.int64)
    for i in range(len(lengths)):
        if i in added:
            lengths[i] = 0 if added[i].special else len(added[i].content.encode("utf-8"))
            continue
        piece = tok.id_to_token(i) or ""
        if byte_level:
            lengths[i] = len(piece)
        elif BYTE_FALLBACK.fullmatch(piece):
            lengths[i] = 1
        else:
            lengths[i] = len(piece.replace(METASPACE, " ").encode("utf-8"))
    return lengths


def _hub_tokenizer(spec: str) -> Path:
    from appleslm.io.hub import HubError, download, is_repo_id

    if not is_repo_id(spec):
        raise DataError(f"tokenizer not found: {spec} (want a tokenizer.json, dir or Hub repo)")
    try:
        return download(spec, filename="tokenizer.json")
    except HubError as e:
        raise DataError(f"could not get tokenizer.json from Hugging Face repo {spec!r}: {e}") from e
