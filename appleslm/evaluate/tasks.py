"""The zero-shot tasks as lm-eval-harness 0.4 asks them, and the readers of their data.

Each task turns one record in lm-eval's field schema (the columns of its Hugging Face dataset) into
an `Item`: the context(s), the continuation(s) to score and the gold index, with the prompt text
of lm-eval's task YAML (`doc_to_text`, `doc_to_choice`, `doc_to_target`) to the character.

Data comes from a JSONL file, a folder of `<task>.jsonl` files, the Hugging Face datasets cache
(the real benchmarks; read offline, never downloaded here), or the small sanity sets that ship
with appleslm (our own sentences in each schema: they check that scoring works, they are not the
benchmarks). A bad record is an error naming the file, the line and the field.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appleslm.evaluate import EvaluationError

SANITY_DIR = Path(__file__).resolve().parent / "sanity"
SANITY_LABEL = "sanity set shipped with appleslm (not a benchmark)"


class TaskDataError(EvaluationError):
    """Task data that cannot be scored: a missing task or file, a malformed record."""


class _BadRecord(Exception):
    """A record that breaks its task's schema; the reader adds the file and line."""


@dataclass(frozen=True)
class Item:
    """One question as lm-eval asks it: each choice is a continuation scored after a context.

    Most tasks share one context and score one continuation per choice; WinoGrande's partial
    scoring puts each choice in its own context and scores the same continuation after each.
    """

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    choice_lengths: tuple[int, ...]  # characters of each choice: what acc_norm divides by
    # Multiple choice puts lm-eval's target_delimiter " " before each continuation (none under a
    # chat template); LAMBADA's target carries its own leading space.
    delimited: bool = True


def multiple_choice(context: str, choices: list[str], gold: int) -> Item:
    return Item((context,), tuple(choices), gold, tuple(len(c) for c in choices))


# ------------------------------------------------------------------------------ the tasks


@dataclass(frozen=True)
class HFDataset:
    path: str
    name: str | None
    split: str

    def __str__(self) -> str:
        return f"{self.path}{'/' + self.name if self.name else ''} ({self.split} split)"


@dataclass(frozen=True)
class Task:
    name: str
    fields: dict[str, type]  # required fields and their JSON types
    optional: dict[str, type]  # further columns of the real dataset, read and ignored
    item: Callable[[dict[str, Any]], Item]
    metrics: tuple[str, ...]  # as lm-eval's task YAML lists them
    hf: HFDataset


def _text(doc: dict[str, Any], key: str) -> str:
    value = doc[key]
    if not value.strip():
        raise _BadRecord(f"{key!r} is empty")
    return value


def _labelled_choices(doc: dict[str, Any], answer: str) -> tuple[list[str], int]:
    """ARC / OpenBookQA: choices {"text": [...], "label": [...]} and the answer's label."""
    choices = doc["choices"]
    if set(choices) != {"text", "label"}:
        raise _BadRecord(f"'choices' must have exactly the keys 'text' and 'label', not {choices}")
    texts, labels = choices["text"], choices["label"]
    if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels):
        raise _BadRecord("'choices.text' and 'choices.label' must be lists of the same length")
    if len(texts) < 2 or not all(isinstance(t, str) and t.strip() for t in texts):
        raise _BadRecord("'choices.text' must hold two or more non-empty strings")
    if answer not in labels:
        raise _BadRecord(f"answerKey {answer!r} is not one of the labels {labels}")
    return texts, labels.index(answer)


def _arc(doc: dict[str, Any]) -> Item:
    texts, gold = _labelled_choices(doc, doc["answerKey"])
    return multiple_choice(f"Question: {_text(doc, 'question')}\nAnswer:", texts, gold)


def _openbookqa(doc: dict[str, Any]) -> Item:
    texts, gold = _labelled_choices(doc, doc["answerKey"].lstrip())
    return multiple_choice(_text(doc, "question_stem"), texts, gold)


def _boolq(doc: dict[str, Any]) -> Item:
    context = f"{_text(doc, 'passage')}\nQuestion: {_text(doc, 'question')}?\nAnswer:"
    return multiple_choice(context, ["no", "yes"], _index(doc, "label", 0, 1))


def _piqa(doc: dict[str, Any]) -> Item:
    context = f"Question: {_text(doc, 'goal')}\nAnswer:"
    return multiple_choice(
        context, [_text(doc, "sol1"), _text(doc, "sol2")], _index(doc, "label", 0, 1)
    )


def _social_iqa(doc: dict[str, Any]) -> Item:
    context = f"Q: {_text(doc, 'context')} {_text(doc, 'question')}\nA:"
    choices = [_text(doc, key) for key in ("answerA", "answerB", "answerC")]
    return multiple_choice(context, choices, _index(doc, "label", 1, 3) - 1)


def _hellaswag_clean(text: str) -> str:
    """lm-eval's `preprocess`: drop WikiHow's bracketed artifacts."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def _hellaswag(doc: dict[str, Any]) -> Item:
    endings = doc["endings"]
    if len(endings) < 2 or not all(isinstance(e, str) and e.strip() for e in endings):
        raise _BadRecord("'endings' must hold two or more non-empty strings")
    # str.capitalize also lowercases the rest of ctx_b: lm-eval does exactly this.
    context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    query = _hellaswag_clean(_text(doc, "activity_label") + ": " + context)
    gold = _index(doc, "label", 0, len(endings) - 1)
    return multiple_choice(query, [_hellaswag_clean(e) for e in endings], gold)


def _winogrande(doc: dict[str, Any]) -> Item:
    sentence = _text(doc, "sentence")
    if sentence.count("_") != 1:
        raise _BadRecord("'sentence' must hold exactly one '_' for the option to fill")
    if doc["answer"] not in ("1", "2"):
        raise _BadRecord(f'\'answer\' must be the string "1" or "2", not {doc["answer"]!r}')
    blank = sentence.index("_")
    contexts = tuple(sentence[:blank] + _text(doc, key) for key in ("option1", "option2"))
    rest = sentence[blank + 1 :].strip()
    if not rest:
        raise _BadRecord("nothing follows the '_' in 'sentence': partial scoring needs a rest")
    return Item(contexts, (rest,), int(doc["answer"]) - 1, tuple(len(c) for c in contexts))


def _lambada(doc: dict[str, Any]) -> Item:
    words = _text(doc, "text").split(" ")
    if len(words) < 2 or not words[-1]:
        raise _BadRecord("'text' must be a passage whose last space-separated word is the target")
    context, target = " ".join(words[:-1]), " " + words[-1]
    if not context.strip():
        raise _BadRecord("'text' must have words before its last one")
    return Item((context,), (target,), 0, (len(target),), delimited=False)


def _index(doc: dict[str, Any], key: str, low: int, high: int) -> int:
    """An answer index given as an int or a digit string (the datasets use both)."""
    value = doc[key]
    number = value if isinstance(value, int) else int(value) if str(value).isdigit() else None
    if number is None or isinstance(value, bool) or not low <= number <= high:
        raise _BadRecord(f"{key!r} must be an index from {low} to {high}, not {value!r}")
    return number


_ARC_FIELDS = {"question": str, "choices": dict, "answerKey": str}
TASKS: dict[str, Task] = {
    task.name: task
    for task in [
        Task(
            "arc_easy",
            _ARC_FIELDS,
            {"id": str},
            _arc,
            ("acc", "acc_norm"),
            HFDataset("allenai/ai2_arc", "ARC-Easy", "test"),
        ),
        Task(
            "arc_challenge",
            _ARC_FIELDS,
            {"id": str},
            _arc,
            ("acc", "acc_norm"),
            HFDataset("allenai/ai2_arc", "ARC-Challenge", "test"),
        ),
        Task(
            "boolq",
            {"passage": str, "question": str, "label": int},
            {"idx": int},
            _boolq,
            ("acc",),
            HFDataset("aps/super_glue", "boolq", "validation"),
        ),
        Task(
            "piqa",
            {"goal": str, "sol1": str, "sol2": str, "label": int},
            {},
            _piqa,
            ("acc", "acc_norm"),
            HFDataset("baber/piqa", None, "validation"),
        ),
        Task(
            "social_iqa",
            {
                "context": str,
                "question": str,
                "answerA": str,
                "answerB": str,
                "answerC": str,
                "label": str,
            },
            {},
            _social_iqa,
            ("acc",),
            HFDataset("lighteval/siqa", None, "validation"),
        ),
        Task(
            "hellaswag",
            {"activity_label": str, "ctx_a": str, "ctx_b": str, "endings": list, "label": str},
            {"ind": int, "ctx": str, "source_id": str, "split": str, "split_type": str},
            _hellaswag,
            ("acc", "acc_norm"),
            HFDataset("Rowan/hellaswag", None, "validation"),
        ),
        Task(
            "openbookqa",
            {"question_stem": str, "choices": dict, "answerKey": str},
            {"id": str},
            _openbookqa,
            ("acc", "acc_norm"),
            HFDataset("allenai/openbookqa", "main", "test"),
        ),
        Task(
            "winogrande",
            {"sentence": str, "option1": str, "option2": str, "answer": str},
            {},
            _winogrande,
            ("acc",),
            HFDataset("allenai/winogrande", "winogrande_xl", "validation"),
        ),
        Task(
            "lambada_openai",
            {"text": str},
            {},
            _lambada,
            ("acc", "ppl"),
            HFDataset("EleutherAI/lambada_openai", "default", "test"),
        ),
    ]
}
ALIASES = {"siqa": "social_iqa", "obqa": "openbookqa", "lambada": "lambada_openai"}


def task_names(spec: str) -> list[str]:
    """`--tasks` as canonical names: comma-separated names or aliases, or "all"."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if names == ["all"]:
        return list(TASKS)
    unknown = [n for n in names if ALIASES.get(n, n) not in TASKS]
    if unknown or not names:
        aliases = ", ".join(f"{alias}={task}" for alias, task in ALIASES.items())
        raise TaskDataError(
            f"unknown task {', '.join(map(repr, unknown)) or repr(spec)}; "
            f"known: {', '.join(TASKS)} (or 'all'; aliases {aliases})"
        )
    return list(dict.fromkeys(ALIASES.get(n, n) for n in names))


# ------------------------------------------------------------------------------ readers


@dataclass
class TaskData:
    task: Task
    items: list[Item]
    source: str  # where the items came from, for the report


def load_task(name: str, data: str | Path | None = None, limit: int | None = None) -> TaskData:
    """The items of task `name`, at most `limit`, from `data`:

    None / "auto"  the Hugging Face datasets cache when it holds the real dataset, else the
                   sanity set that ships with appleslm (the report says which);
    "hf"           the datasets cache only;   "sanity"  the shipped sanity set only;
    a folder       its `<name>.jsonl`;        a .jsonl file  the data of this one task.
    """
    task = TASKS[name]
    if data in (None, "auto", "hf"):
        cached = _hf_records(task)
        if cached is not None:
            return _read(task, cached, limit, strict=False)
        if data == "hf":
            raise TaskDataError(
                f"{task.hf} is not in the Hugging Face datasets cache (or the `datasets` package "
                "is not installed: pip install 'appleslm[eval]'); fill the cache once with: "
                f'python -c "import datasets; datasets.load_dataset({task.hf.path!r}, '
                f'{task.hf.name!r}, split={task.hf.split!r})"'
            )
        data = "sanity"
    if data == "sanity":
        return _read_jsonl(task, SANITY_DIR / f"{name}.jsonl", limit, SANITY_LABEL)
    path = Path(data).expanduser()
    if path.is_dir():
        file = path / f"{name}.jsonl"
        if not file.is_file():
            present = sorted(p.name for p in path.glob("*.jsonl"))
            raise TaskDataError(
                f"no {file.name} in {path} (it has {', '.join(present) or 'no .jsonl files'}); "
                "name each task's file after the task, or leave out --data for the shipped sets"
            )
        return _read_jsonl(task, file, limit, str(file))
    if path.is_file():
        return _read_jsonl(task, path, limit, str(path))
    raise TaskDataError(
        f"task data {str(data)!r} not found: give a .jsonl file, a folder of <task>.jsonl files, "
        "'hf' (the datasets cache), 'sanity' (the shipped sets) or nothing (either)"
    )


def _read(
    task: Task,
    records: tuple[str, Iterator[tuple[str, Any]]],
    limit: int | None,
    strict: bool = True,
) -> TaskData:
    """Items from (source, iterator of (where, record)), each record checked against the schema;
    `strict` refuses fields the schema does not know (a typo in a file, not a dataset's column)."""
    source, rows = records
    items: list[Item] = []
    for where, record in rows:
        if limit is not None and len(items) >= limit:
            break
        try:
            items.append(_item(task, record, strict))
        except _BadRecord as e:
            raise TaskDataError(
                f"{where}: {e} (a {task.name} record needs {_schema(task)})"
            ) from None
    if not items:
        raise TaskDataError(f"{source}: no {task.name} records")
    return TaskData(task, items, source)


def _read_jsonl(task: Task, path: Path, limit: int | None, source: str) -> TaskData:
    return _read(task, (source, _jsonl_records(path)), limit)


def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TaskDataError(f"cannot read {path}: {e}") from e
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield f"{path} line {number}", json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskDataError(f"{path} line {number}: not valid JSON ({e.msg})") from None


def _item(task: Task, record: Any, strict: bool) -> Item:
    if not isinstance(record, dict):
        raise _BadRecord(f"expected a JSON object, got {type(record).__name__}")
    missing = [key for key in task.fields if key not in record]
    known = {**task.fields, **task.optional}
    unknown = [key for key in record if key not in known] if strict else []
    if missing or unknown:
        raise _BadRecord(
            "; ".join(
                ([f"missing field {', '.join(map(repr, missing))}"] if missing else [])
                + ([f"unknown field {', '.join(map(repr, unknown))}"] if unknown else [])
            )
        )
    for key, kind in known.items():
        value = record.get(key)
        if key in record and not _is_json_type(value, kind, lenient_index=key == "label"):
            raise _BadRecord(f"field {key!r} must be a JSON {_json_name(kind)}, not {value!r}")
    return task.item(record)


def _is_json_type(value: Any, kind: type, lenient_index: bool) -> bool:
    """`kind` as JSON has it; an answer index may be an int or a digit string (both occur)."""
    if lenient_index and kind in (int, str):
        return isinstance(value, str | int) and not isinstance(value, bool)
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


def _json_name(kind: type) -> str:
    return {str: "string", int: "integer", list: "array", dict: "object"}[kind]


def _schema(task: Task) -> str:
    return ", ".join(f"{key} ({_json_name(kind)})" for key, kind in task.fields.items())


def _hf_records(task: Task) -> tuple[str, Iterator[tuple[str, Any]]] | None:
    """The real dataset from the Hugging Face datasets cache, read offline; None when the
    `datasets` package is missing or the cache does not hold it."""
    # Offline before `datasets` is imported: this reads the cache and never downloads.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        return None
    try:
        rows = datasets.load_dataset(task.hf.path, task.hf.name, split=task.hf.split)
    except (OSError, ValueError):  # not cached: datasets says so with either
        return None
    source = f"{task.hf} from the Hugging Face datasets cache"
    return source, ((f"{source}, row {i}", dict(row)) for i, row in enumerate(rows))
