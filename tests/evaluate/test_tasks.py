"""Task readers: lm-eval's prompts to the character, the shipped sanity sets, and bad data as
errors that name the file, the line and the field."""

from __future__ import annotations

import json
import sys
import types

import pytest

from appleslm.cli import main
from appleslm.evaluate.tasks import SANITY_DIR, TASKS, TaskDataError, load_task, task_names


def one_line(tmp_path, name, record):
    path = tmp_path / f"{name}.jsonl"
    path.write_text(json.dumps(record) + "\n")
    return path


def only_item(tmp_path, name, record):
    return load_task(name, one_line(tmp_path, name, record)).items[0]


ARC = {
    "id": "x",
    "question": "Which is a metal?",
    "choices": {"text": ["wood", "iron", "glass"], "label": ["A", "B", "C"]},
    "answerKey": "B",
}


def test_prompts_are_lm_eval_s(tmp_path):
    item = only_item(tmp_path, "arc_easy", ARC)
    assert item.contexts == ("Question: Which is a metal?\nAnswer:",)
    assert item.continuations == ("wood", "iron", "glass") and item.gold == 1
    assert item.choice_lengths == (4, 4, 5) and item.delimited

    record = {"passage": "Cats purr.", "question": "do cats purr", "label": 1, "idx": 0}
    item = only_item(tmp_path, "boolq", record)
    assert item.contexts == ("Cats purr.\nQuestion: do cats purr?\nAnswer:",)
    assert item.continuations == ("no", "yes") and item.gold == 1

    record = {"goal": "Dry a cup", "sol1": "use a towel", "sol2": "use soup", "label": 0}
    item = only_item(tmp_path, "piqa", record)
    assert item.contexts == ("Question: Dry a cup\nAnswer:",) and item.gold == 0

    record = {
        "context": "Al fell.",
        "question": "How does Al feel?",
        "answerA": "hurt",
        "answerB": "rich",
        "answerC": "tall",
        "label": "1",
    }
    item = only_item(tmp_path, "social_iqa", record)
    assert item.contexts == ("Q: Al fell. How does Al feel?\nA:",) and item.gold == 0

    record = {
        "activity_label": "Home",
        "ctx_a": "[header] How to nap [title] Lie down.",
        "ctx_b": "[step] Close Your EYES.",
        "endings": ["[substeps] Sleep  well.", "Run."],
        "label": "0",
    }
    item = only_item(tmp_path, "hellaswag", record)
    # lm-eval's preprocess: " [title]" -> ". ", brackets dropped, double spaces single;
    # str.capitalize lowercases the rest of ctx_b.
    assert item.contexts == ("Home: How to nap. Lie down. close your eyes.",)
    assert item.continuations == (" Sleep well.", "Run.")

    item = only_item(tmp_path, "openbookqa", {**_obqa(), "answerKey": " B"})
    assert item.contexts == ("Iron is",) and item.gold == 1  # answerKey.lstrip()

    record = {
        "sentence": "Ann paid Bo because _ owed him.",
        "option1": "Ann",
        "option2": "Bo",
        "answer": "1",
    }
    item = only_item(tmp_path, "winogrande", record)
    assert item.contexts == ("Ann paid Bo because Ann", "Ann paid Bo because Bo")
    assert item.continuations == ("owed him.",) and item.gold == 0 and item.delimited

    item = only_item(tmp_path, "lambada_openai", {"text": "He said hello to Sam and Sam"})
    assert item.contexts == ("He said hello to Sam and",) and item.continuations == (" Sam",)
    assert not item.delimited  # the target carries its own space, as in lm-eval


def _obqa():
    return {
        "id": "o",
        "question_stem": "Iron is",
        "choices": {"text": ["a gas", "a metal"], "label": ["A", "B"]},
        "answerKey": "B",
    }


def test_every_shipped_sanity_set_reads_and_spreads_its_answers():
    for name, task in TASKS.items():
        data = load_task(name, "sanity")
        assert 14 <= len(data.items) <= 20, name
        assert "not a benchmark" in data.source
        if "ppl" not in task.metrics:
            golds = {item.gold for item in data.items}
            assert len(golds) >= 2, f"{name}: every answer in the same position"
    assert sorted(p.stem for p in SANITY_DIR.glob("*.jsonl")) == sorted(TASKS)


def test_task_names_aliases_and_limit():
    assert task_names("all") == list(TASKS)
    assert task_names("siqa, obqa,lambada,siqa") == ["social_iqa", "openbookqa", "lambada_openai"]
    assert len(load_task("piqa", "sanity", limit=3).items) == 3
    with pytest.raises(TaskDataError, match="unknown task 'mmlu'.*known: arc_easy"):
        task_names("arc_easy,mmlu")


@pytest.mark.parametrize(
    "name, record, message",
    [
        ("arc_easy", {**ARC, "answerKey": "E"}, "answerKey 'E' is not one of the labels"),
        ("arc_easy", {**ARC, "hint": "x"}, "unknown field 'hint'"),
        ("arc_easy", {"question": "q", "answerKey": "A"}, "missing field 'choices'"),
        ("arc_easy", {**ARC, "question": 3}, "field 'question' must be a JSON string"),
        (
            "boolq",
            {"passage": "p", "question": "q", "label": 2},
            "'label' must be an index from 0 to 1",
        ),
        ("piqa", {"goal": "g", "sol1": "a", "sol2": "b", "label": True}, "field 'label' must be"),
        (
            "social_iqa",
            {
                "context": "c",
                "question": "q",
                "answerA": "a",
                "answerB": "b",
                "answerC": "c",
                "label": "4",
            },
            "'label' must be an index from 1 to 3",
        ),
        (
            "hellaswag",
            {
                "activity_label": "a",
                "ctx_a": "b",
                "ctx_b": "c",
                "endings": ["x", "y"],
                "label": "2",
            },
            "'label' must be an index from 0 to 1",
        ),
        (
            "winogrande",
            {"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"},
            "exactly one '_'",
        ),
        (
            "winogrande",
            {"sentence": "a _ b", "option1": "a", "option2": "b", "answer": 1},
            "must be a JSON string",
        ),
        ("lambada_openai", {"text": "word"}, "last space-separated word"),
        ("lambada_openai", {"text": ""}, "'text' is empty"),
    ],
)
def test_a_bad_record_names_its_file_line_and_field(tmp_path, name, record, message):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("\n" + json.dumps(_good(name)) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(TaskDataError, match=message) as caught:
        load_task(name, path)
    assert f"{path} line 3:" in str(caught.value)


def _good(name):
    return json.loads((SANITY_DIR / f"{name}.jsonl").read_text().splitlines()[0])


def test_missing_tasks_files_and_broken_json(tmp_path):
    one_line(tmp_path, "piqa", _good("piqa"))
    with pytest.raises(TaskDataError, match=r"no boolq.jsonl in .* \(it has piqa.jsonl\)"):
        load_task("boolq", tmp_path)
    with pytest.raises(TaskDataError, match="task data 'nowhere' not found"):
        load_task("boolq", "nowhere")
    (tmp_path / "boolq.jsonl").write_text('{"passage": "p",\n')
    with pytest.raises(TaskDataError, match="boolq.jsonl line 1: not valid JSON"):
        load_task("boolq", tmp_path)
    (tmp_path / "boolq.jsonl").write_text("\n\n")
    with pytest.raises(TaskDataError, match="no boolq records"):
        load_task("boolq", tmp_path)


def test_the_datasets_cache_comes_first_when_it_holds_the_task(monkeypatch):
    """The real tasks come from `datasets.load_dataset` (a fake here: the cache is the edge of
    this program, and tests never touch it); without them, the shipped set."""
    rows = [json.loads(line) for line in (SANITY_DIR / "piqa.jsonl").read_text().splitlines()]
    calls = []

    def cached(path, name, split):
        calls.append((path, name, split))
        return [{**rows[0], "a_column_we_do_not_use": 1}, *rows[1:3]]  # read, and ignored

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=cached))
    data = load_task("piqa")
    assert calls == [("baber/piqa", None, "validation")] and len(data.items) == 3
    assert data.source == "baber/piqa (validation split) from the Hugging Face datasets cache"
    rows[1] = {**rows[1], "label": 7}
    with pytest.raises(TaskDataError, match=r"cache, row 1: 'label' must be an index from 0"):
        load_task("piqa", "hf")

    def not_cached(path, name, split):
        raise FileNotFoundError(f"{path} is not cached and HF_DATASETS_OFFLINE is set")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=not_cached))
    assert load_task("piqa").source.startswith("sanity set")
    with pytest.raises(TaskDataError, match="baber/piqa .* is not in the Hugging Face datasets"):
        load_task("piqa", "hf")


def test_the_command_refuses_bad_input_with_exit_2(tiny_model_dir, tmp_path, capsys):
    model = str(tiny_model_dir)
    bad = one_line(tmp_path, "arc_easy", {**ARC, "answerKey": "Z"})
    cases = [
        (["--limit", "0"], "--limit must be at least 1, not 0"),
        (["--tasks", "nope"], "unknown task 'nope'"),
        (["--tasks", "arc_easy", "--data", str(bad)], f"{bad} line 1: answerKey 'Z'"),
        (["--tasks", "arc_easy", "--data", str(tmp_path / "none")], "not found"),
    ]
    for extra, message in cases:
        assert main(["evaluate", model, *extra, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("appleslm evaluate: error: ") and message in err, err
