"""Conversation data for chat fine-tuning: read, validate, render, tokenize with a loss mask.

Input is JSONL, one conversation per line, in either common format:
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    {"prompt": "...", "completion": "..."}              (optional "system": "...")
A bad record is reported as `file:line: what is wrong` and, as the user chooses, skipped or the
whole file refused. Conversations are rendered with the tokenizer's chat template (ChatML by
default) and tokenized with a mask that is 1 exactly on the assistant's content tokens and the
end-of-turn token that follows them, so the model learns to answer and to stop, never to imitate
the user.

The default data is chatterbot-corpus 1.3.3 (PyPI, BSD): 899 distinct short English exchanges,
assistant-like and clean; `convert_default_data` turns it into train.jsonl/valid.jsonl.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from appleslm.atomic import atomic_write
from appleslm.data.corpus import DataError
from appleslm.data.tokenizer import DEFAULT_CHAT_TEMPLATE, EOT, IM_END, IM_START

ROLES = ("system", "user", "assistant")
ON_ERROR = ("skip", "refuse")
DEFAULT_SOURCES = ("chatterbot", "chitchat")
CHAT_CACHE = Path("~/.cache/appleslm/chat")
CONVERSION = 1  # bump when a converter changes, so cached conversions are redone
PAD_MULTIPLE = 32  # inputs are padded to a multiple of this: few distinct compiled shapes
SHOWN_ERRORS = 20  # a refusal lists this many bad records, then counts the rest

Message = dict[str, str]


class ChatDataError(DataError):
    """Conversation data that cannot be used; the message names every bad record."""


class ChatTemplateError(ChatDataError):
    """The chat template cannot give an exact assistant-token mask for a conversation."""


class ChatRecordError(ChatDataError):
    """One bad record, reported as `path:line: message`."""

    def __init__(self, path: str | Path, line: int, message: str):
        self.path, self.line, self.message = str(path), line, message
        super().__init__(f"{path}:{line}: {message}")


@dataclass
class Conversation:
    messages: list[Message]
    path: str = ""
    line: int = 0


@dataclass
class TokenizedConversation:
    ids: list[int]
    mask: list[int]  # 1 on tokens the loss counts (assistant content + end of turn), else 0
    path: str = ""
    line: int = 0


@dataclass
class ChatData:
    train: list[TokenizedConversation]
    valid: list[TokenizedConversation]
    skipped: list[ChatRecordError] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        assistant = sum(sum(c.mask) for c in self.train)
        text = (
            f"{len(self.train):,} training / {len(self.valid):,} validation conversations "
            f"({assistant:,} assistant tokens to learn) from {self.meta.get('source')}"
        )
        if self.skipped:
            text += f"; skipped {len(self.skipped)} bad record(s):\n" + format_errors(self.skipped)
        return text


def format_errors(errors: Sequence[ChatRecordError]) -> str:
    lines = [f"  {e}" for e in errors[:SHOWN_ERRORS]]
    if len(errors) > SHOWN_ERRORS:
        lines.append(f"  ... and {len(errors) - SHOWN_ERRORS} more")
    return "\n".join(lines)


def check_policy(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")


def refuse_or_report(errors: list[ChatRecordError], on_error: str, what: str) -> None:
    # All bad records at once: fixing a file one error per run is miserable.
    if errors and on_error == "refuse":
        raise ChatDataError(
            f"{len(errors)} bad record(s) in {what} (pass on_error='skip' / --on-error skip "
            f"to leave them out):\n{format_errors(errors)}"
        )


# ---------------------------------------------------------------- reading and validating


def parse_record(record: Any) -> list[Message]:
    """The messages of one JSON record, or ValueError saying what is wrong with it."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        raw = record["messages"]
        if not isinstance(raw, list) or not raw:
            raise ValueError("'messages' must be a non-empty list")
    elif "prompt" in record or "completion" in record:
        for key in ("prompt", "completion"):
            if key not in record:
                raise ValueError(f"a prompt/completion record has no {key!r}")
        raw = [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["completion"]},
        ]
        if record.get("system") is not None:
            raw.insert(0, {"role": "system", "content": record["system"]})
    else:
        raise ValueError("needs 'messages', or 'prompt' and 'completion'")
    messages = []
    for n, message in enumerate(raw, 1):
        if not isinstance(message, dict):
            raise ValueError(f"message {n} is not an object")
        role, content = message.get("role"), message.get("content")
        if role is None:
            raise ValueError(f"message {n} has no 'role'")
        if role not in ROLES:
            raise ValueError(f"message {n} has unknown role {role!r} (expected {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise ValueError(f"message {n} ({role}) has no text 'content'")
        if not content.strip():
            raise ValueError(f"message {n} ({role}) has empty content")
        for marker in (IM_START, IM_END, EOT):
            # A literal end-of-turn marker inside a message would tokenize as the real one.
            if marker in content:
                raise ValueError(f"message {n} ({role}) contains the special token {marker}")
        if role == "system" and n != 1:
            raise ValueError(f"message {n}: a system message may only come first")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant message: nothing to learn from")
    return messages


def read_conversations(
    path: str | Path, on_error: str = "skip"
) -> tuple[list[Conversation], list[ChatRecordError]]:
    """Conversations of a JSONL file and the bad records left out (refused: ChatDataError)."""
    check_policy(on_error)
    path = Path(path)
    conversations, errors = [], []
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise ChatDataError(f"cannot read {path}: {e}") from e
    for line_no, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8").removeprefix("\ufeff")  # a BOM is not part of the text
        except UnicodeDecodeError as e:
            errors.append(
                ChatRecordError(
                    path,
                    line_no,
                    f"not UTF-8 text (bad byte at column {e.start + 1}); re-encode the file",
                )
            )
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            errors.append(ChatRecordError(path, line_no, f"not valid JSON ({e.msg})"))
            continue
        try:
            conversations.append(Conversation(parse_record(record), str(path), line_no))
        except ValueError as e:
            errors.append(ChatRecordError(path, line_no, str(e)))
    refuse_or_report(errors, on_error, str(path))
    return conversations, errors


# ---------------------------------------------------------------- rendering and masking


class ChatRenderer:
    """Renders conversations with a chat template and tokenizes them with an exact loss mask.

    `tokenizer` is a transformers tokenizer or mlx-lm's TokenizerWrapper. Its own chat template
    is used when it has one, else ChatML (DEFAULT_CHAT_TEMPLATE), which needs `<|im_start|>` and
    `<|im_end|>` in the vocabulary (our trained tokenizers reserve them).
    """

    def __init__(self, tokenizer: Any, chat_template: str | None = None):
        self.tokenizer = tokenizer
        own = getattr(tokenizer, "chat_template", None)
        self.template = chat_template or (own if isinstance(own, str) else None)
        self.template = self.template or DEFAULT_CHAT_TEMPLATE
        self.uses_own_template = self.template == own
        if self.template == DEFAULT_CHAT_TEMPLATE:
            for marker in (IM_START, IM_END):
                if self.token_id(marker) is None:
                    raise ChatTemplateError(
                        f"the tokenizer has no chat template and no {marker} token for the "
                        "default ChatML one; give the model a chat template first"
                    )
        self.stop_ids = self.end_of_turn_ids()

    def token_id(self, token: str) -> int | None:
        ids = self.encode(token)
        return ids[0] if len(ids) == 1 else None

    def end_of_turn_ids(self) -> list[int]:
        """Tokens that end an assistant turn: the eos id(s), then `<|im_end|>` if it exists."""
        ids = list(getattr(self.tokenizer, "eos_token_ids", None) or [])
        eos = getattr(self.tokenizer, "eos_token_id", None)
        ids = sorted(set(ids) | ({eos} if eos is not None else set()))
        im_end = self.token_id(IM_END)
        if im_end is not None and im_end not in ids:
            ids.append(im_end)
        return ids

    def text(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            list(messages),
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            chat_template=self.template,
        )

    def encode(self, text: str) -> list[int]:
        # The rendered text carries every special token itself (a template's bos included).
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def tokenize(self, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
        """Token ids of the rendered conversation and the assistant-token mask.

        For each assistant message the text up to it (rendered with the generation prompt, as the
        chat app will) must be a prefix of the whole text, the content must follow verbatim, and
        both boundaries must be token boundaries; then the mask covers the content tokens and the
        end-of-turn token right after them. Anything else is a ChatTemplateError, never a guess.
        """
        full = self.text(messages)
        ids = self.encode(full)
        mask = [0] * len(ids)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.text(messages[:i], add_generation_prompt=True)
            if not full.startswith(prompt):
                raise ChatTemplateError(
                    f"the chat template renders the conversation before message {i + 1} "
                    "differently from the start of the whole conversation"
                )
            end = len(prompt) + len(message["content"])
            if full[len(prompt) : end] != message["content"]:
                raise ChatTemplateError(
                    f"the chat template does not render assistant message {i + 1} verbatim "
                    "right after the generation prompt"
                )
            start, stop = self.boundary(ids, full[: len(prompt)]), self.boundary(ids, full[:end])
            if stop >= len(ids) or ids[stop] not in self.stop_ids:
                raise ChatTemplateError(
                    f"the chat template puts no end-of-turn token (one of {self.stop_ids}) "
                    f"right after assistant message {i + 1}: the model could not learn to stop"
                )
            mask[start : stop + 1] = [1] * (stop + 1 - start)
        return ids, mask

    def boundary(self, ids: list[int], prefix_text: str) -> int:
        prefix = self.encode(prefix_text)
        if ids[: len(prefix)] != prefix:
            raise ChatTemplateError(
                "a message boundary falls inside a token (the tokenizer merges across it)"
            )
        return len(prefix)


def tokenize_conversations(
    conversations: Iterable[Conversation],
    renderer: ChatRenderer,
    max_seq_len: int,
    on_error: str = "skip",
) -> tuple[list[TokenizedConversation], list[ChatRecordError]]:
    """Tokenize and mask; over-long conversations (more than `max_seq_len` tokens) and ones the
    template cannot mask are errors, skipped or refused. Over-long ones are never truncated:
    a cut reply would teach the model to stop mid-sentence or never to stop."""
    check_policy(on_error)
    kept, errors = [], []
    for conversation in conversations:
        where = (conversation.path, conversation.line)
        try:
            ids, mask = renderer.tokenize(conversation.messages)
        except ChatTemplateError as e:
            errors.append(ChatRecordError(*where, str(e)))
            continue
        if len(ids) > max_seq_len:
            errors.append(
                ChatRecordError(*where, f"{len(ids)} tokens, longer than max_seq_len {max_seq_len}")
            )
            continue
        kept.append(TokenizedConversation(ids, mask, *where))
    refuse_or_report(errors, on_error, "the conversations")
    return kept, errors


# ---------------------------------------------------------------- data sets


def resolve_chat_data(spec: str | Path, cache_dir: str | Path | None = None) -> Path:
    """A JSONL file or a folder with train.jsonl (+ valid.jsonl); `default`, `chatterbot` or
    `chitchat` name the pip-installed corpora, converted once into the cache."""
    name = str(spec)
    if name == "default":
        name = "chatterbot"
    if name in DEFAULT_SOURCES and not Path(name).exists():
        out = Path(cache_dir or CHAT_CACHE).expanduser() / f"{name}-{corpus_version(name)}"
        if not (out / "train.jsonl").exists():
            convert_default_data(out, source=name)
        return out
    path = Path(spec).expanduser()
    if not path.exists():
        raise ChatDataError(
            f"no conversation data at {path} (want a .jsonl file, a folder with train.jsonl, "
            f"or one of: default, {', '.join(DEFAULT_SOURCES)})"
        )
    if path.is_dir() and not (path / "train.jsonl").exists():
        raise ChatDataError(f"{path} has no train.jsonl")
    return path


CHAT_SOURCES = {  # the pip-installed corpora: what a model card says they are
    "chatterbot": ("chatterbot-corpus English conversations (898 exchanges)", "BSD-3-Clause"),
    "chitchat": ("chitchat-dataset casual conversations (BYU PCC)", "MIT"),
}


def describe_chat_source(spec: str, path: Path) -> tuple[str, str | None]:
    """(a name for people, its licence if known) of conversation data."""
    source = "chatterbot" if spec == "default" else spec
    if source in CHAT_SOURCES:
        return CHAT_SOURCES[source]
    return (f"the folder {path.name}/" if path.is_dir() else f"the file {path.name}"), None


def corpus_version(source: str) -> str:
    """Names the cached conversion: the installed corpus's version and the converter's."""
    from importlib.metadata import PackageNotFoundError, version

    package = {"chatterbot": "chatterbot-corpus", "chitchat": "chitchat-dataset"}[source]
    try:
        return f"{version(package)}-v{CONVERSION}"
    except PackageNotFoundError as e:
        raise ChatDataError(f"the {source} chat data needs: pip install {package}") from e


def load_chat_data(
    spec: str | Path,
    renderer: ChatRenderer,
    max_seq_len: int,
    *,
    on_error: str = "skip",
    val_fraction: float = 0.1,
    seed: int = 0,
    cache_dir: str | Path | None = None,
) -> ChatData:
    """Training and validation conversations, tokenized and masked.

    A folder's valid.jsonl is the validation set; without one (or for a single file) a seeded
    `val_fraction` of the conversations is held out.
    """
    check_policy(on_error)
    path = resolve_chat_data(spec, cache_dir)
    train_file = path / "train.jsonl" if path.is_dir() else path
    valid_file = path / "valid.jsonl" if path.is_dir() else None
    # Read and tokenize everything before refusing, so one report names every bad line.
    train, errors = read_conversations(train_file, "skip")
    valid: list[Conversation] = []
    if valid_file is not None and valid_file.exists():
        valid, more = read_conversations(valid_file, "skip")
        errors += more
    else:
        train, valid = split_conversations(train, val_fraction, seed)
    train_tok, more = tokenize_conversations(train, renderer, max_seq_len, "skip")
    valid_tok, more_valid = tokenize_conversations(valid, renderer, max_seq_len, "skip")
    errors = sorted(errors + more + more_valid, key=lambda e: (e.path, e.line))
    refuse_or_report(errors, on_error, str(path))
    if not train_tok:
        shown = f":\n{format_errors(errors)}" if errors else ""
        raise ChatDataError(f"no usable training conversations in {path}{shown}")
    name, licence = describe_chat_source(str(spec), path)
    meta = {
        "source": str(spec),
        "name": name,
        "licence": licence,
        "train_conversations": len(train_tok),
        "valid_conversations": len(valid_tok),
        "skipped": len(errors),
        "max_seq_len": max_seq_len,
        "chat_template": "model's own" if renderer.uses_own_template else "default ChatML",
    }
    return ChatData(train_tok, valid_tok, errors, meta)


def split_conversations(
    conversations: list[Conversation], val_fraction: float, seed: int
) -> tuple[list[Conversation], list[Conversation]]:
    if len(conversations) < 2 or val_fraction <= 0:
        return conversations, []
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    n_valid = min(len(order) - 1, max(1, round(len(order) * val_fraction)))
    held = set(order[:n_valid])
    train = [c for i, c in enumerate(conversations) if i not in held]
    return train, [c for i, c in enumerate(conversations) if i in held]


# ---------------------------------------------------------------- batches


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The conversations of optimizer step `step` (0-based): consecutive slices of seeded
    per-epoch permutations, so the order depends only on (seed, step) and resume is exact."""
    perms: dict[int, np.ndarray] = {}
    out = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, n)
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        out.append(int(perms[epoch][offset]))
    return out


def pad_batch(
    conversations: Sequence[TokenizedConversation], pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-padded (inputs, targets, loss mask) for next-token prediction; padding counts 0."""
    length = max(len(c.ids) for c in conversations) - 1
    length = -(-length // PAD_MULTIPLE) * PAD_MULTIPLE
    x = np.full((len(conversations), length), pad_id, dtype=np.int32)
    y = np.full((len(conversations), length), pad_id, dtype=np.int32)
    mask = np.zeros((len(conversations), length), dtype=np.float32)
    for row, c in enumerate(conversations):
        n = len(c.ids) - 1
        x[row, :n] = c.ids[:-1]
        y[row, :n] = c.ids[1:]
        mask[row, :n] = c.mask[1:]  # target t+1 is predicted at position t
    return x, y, mask


# ---------------------------------------------------------------- the default corpora


def chatterbot_conversations() -> list[list[Message]]:
    """chatterbot-corpus's English conversations, alternating user/assistant, duplicates out."""
    import importlib.resources

    import yaml

    try:
        root = importlib.resources.files("chatterbot_corpus") / "data" / "english"
    except ModuleNotFoundError as e:
        raise ChatDataError(
            "the default chat data comes from chatterbot-corpus: pip install chatterbot-corpus"
        ) from e
    seen, out = set(), []
    for item in sorted(root.iterdir(), key=lambda p: p.name):
        if not item.name.endswith(".yml"):
            continue
        for turns in yaml.safe_load(item.read_text(encoding="utf-8"))["conversations"]:
            texts = [str(t).strip() for t in turns]
            texts = texts[: len(texts) // 2 * 2]  # a trailing question has no answer to learn
            if len(texts) < 2 or not all(texts) or tuple(texts) in seen:
                continue
            seen.add(tuple(texts))
            out.append([{"role": ROLES[1 + i % 2], "content": t} for i, t in enumerate(texts)])
    return out


def chitchat_conversations(dataset: dict[str, Any] | None = None) -> list[list[Message]]:
    """chitchat-dataset's casual chats: the first speaker is the user, each run of messages by
    one speaker is a turn (its messages joined by newlines)."""
    if dataset is None:
        import importlib.resources

        try:
            path = importlib.resources.files("chitchat_dataset") / "dataset.json"
        except ModuleNotFoundError as e:
            raise ChatDataError("chitchat data needs: pip install chitchat-dataset") from e
        dataset = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for key in sorted(dataset):
        runs = dataset[key].get("messages") or []
        first = runs[0][0].get("sender") if runs and runs[0] else None
        turns = []
        for run in runs:
            text = "\n".join(m["text"].strip() for m in run if m.get("text", "").strip())
            if not text:
                continue
            role = "user" if run[0].get("sender") == first else "assistant"
            if turns and turns[-1]["role"] == role:
                turns[-1]["content"] += "\n" + text
            else:
                turns.append({"role": role, "content": text})
        if turns and turns[-1]["role"] == "user":
            turns.pop()
        if len(turns) >= 2 and turns[0]["role"] == "user":
            out.append(turns)
    return out


def convert_default_data(
    out_dir: str | Path, source: str = "chatterbot", val_fraction: float = 0.1, seed: int = 0
) -> dict[str, Any]:
    """Write the pip-installed corpus as train.jsonl / valid.jsonl in the messages format.

    The split is seeded and groups conversations by their first user message: chatterbot often
    answers one question several ways, and validation should not ask questions training saw.
    """
    if source not in DEFAULT_SOURCES:
        raise ChatDataError(f"unknown chat corpus {source!r}; known: {', '.join(DEFAULT_SOURCES)}")
    if not 0 < val_fraction < 1:
        raise ChatDataError(f"val_fraction (--val-fraction) must be in (0, 1), got {val_fraction}")
    convert = chatterbot_conversations if source == "chatterbot" else chitchat_conversations
    conversations = convert()
    questions = sorted({c[0]["content"] for c in conversations})
    random.Random(seed).shuffle(questions)
    held = set(questions[: max(1, round(len(questions) * val_fraction))])
    splits: dict[str, list[list[Message]]] = {"train": [], "valid": []}
    for c in conversations:
        splits["valid" if c[0]["content"] in held else "train"].append(c)
    out_dir = Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, items in splits.items():
        atomic_write(
            out_dir / f"{name}.jsonl", "".join(json.dumps({"messages": c}) + "\n" for c in items)
        )
    return {
        "source": source,
        "out_dir": str(out_dir),
        "train": len(splits["train"]),
        "valid": len(splits["valid"]),
    }
