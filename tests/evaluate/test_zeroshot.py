"""Zero-shot scoring: the KV-cached scorer against plain forward passes, planted answers, acc vs
acc_norm, quantized against float, every model kind, and the `appleslm evaluate` command."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import numpy as np
import pytest

from appleslm.cli import main
from appleslm.evaluate import zeroshot
from appleslm.evaluate.perplexity import load_for_evaluation
from appleslm.evaluate.tasks import TASKS, load_task
from appleslm.evaluate.zeroshot import Scorer, evaluate_tasks, score_task
from appleslm.io.export import export_stock
from appleslm.io.model_dir import load_model
from appleslm.models import Model
from appleslm.quant import quantize
from tests.helpers import tiny_args

CONTEXT = "Question: What shall Congress have the power to do?\nAnswer:"
CONTINUATIONS = [" to lay and collect taxes", " to pay the debts", " zq", " the common defence"]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def arc_record(question, choices, gold):
    labels = "ABCDE"[: len(choices)]
    return {
        "question": question,
        "choices": {"text": choices, "label": list(labels)},
        "answerKey": labels[gold],
    }


def scratch_scores(model, tokenizer, context, continuation):
    """(log-likelihood, greedy) of `continuation` from one forward pass over the whole string,
    with lm-eval's split: the tokens of encode(context + continuation) after encode(context)."""
    n = len(tokenizer.encode(context))
    ids = tokenizer.encode(context + continuation)
    logits = model(mx.array([ids]))[0].astype(mx.float32)
    logprobs = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    targets = range(n, len(ids))
    ll = sum(float(logprobs[j - 1, ids[j]]) for j in targets)
    greedy = all(int(np.argmax(logprobs[j - 1])) == ids[j] for j in targets)
    return ll, greedy


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir)


VARIANTS = {
    "table, tied": {},
    "untied head": {"tie_word_embeddings": False},
    "leviathan generator": {"embedding": "leviathan", "tie_word_embeddings": False},
    "layer sharing": {"layer_repeat": 2},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_reuse_equals_scoring_each_string_from_scratch(tiny, variant):
    _, tokenizer = tiny
    mx.random.seed(1)
    model = Model(tiny_args(**VARIANTS[variant]))
    mx.eval(model.parameters())
    scores = Scorer(model, tokenizer).score(CONTEXT, CONTINUATIONS)
    for score, continuation in zip(scores, CONTINUATIONS, strict=True):
        ll, greedy = scratch_scores(model, tokenizer, CONTEXT, continuation)
        assert score.loglikelihood == pytest.approx(ll, abs=1e-4)
        assert score.greedy == greedy
        assert score.tokens == len(tokenizer.encode(CONTEXT + continuation)) - len(
            tokenizer.encode(CONTEXT)
        )


def test_copying_the_cache_gives_what_trimming_it_gives(tiny, monkeypatch):
    model, tokenizer = tiny
    trimmed = Scorer(model, tokenizer).score(CONTEXT, CONTINUATIONS)
    monkeypatch.setattr(zeroshot, "can_trim_prompt_cache", lambda cache: False)
    copied = Scorer(model, tokenizer).score(CONTEXT, CONTINUATIONS)
    assert [s.loglikelihood for s in copied] == pytest.approx(
        [s.loglikelihood for s in trimmed], abs=1e-5
    )


def test_a_context_longer_than_the_window_keeps_its_newest_tokens(tiny):
    model, tokenizer = tiny
    context = CONTEXT * 6
    scorer = Scorer(model, tokenizer, window=24)
    [score] = scorer.score(context, [" to pay the debts"])
    ids = tokenizer.encode(context + " to pay the debts")
    kept = ids[-25:]  # mlx_lm.evaluate's rule: the window plus the one token nobody predicts
    n_target = len(ids) - len(tokenizer.encode(context))
    logits = model(mx.array([kept]))[0].astype(mx.float32)
    logprobs = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    expected = sum(float(logprobs[j - 1, kept[j]]) for j in range(25 - n_target, 25))
    assert score.loglikelihood == pytest.approx(expected, abs=1e-4)
    assert scorer.truncated == 1


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """ARC-schema questions whose right answer is corpus English and whose wrong ones are
    letter salad, with the right answer in every position."""
    salad = ["qzx vkj wqp", "jjx zzq kvv", "xqz wvk pjj"]
    answers = [
        "the people of the United States",
        "the Government of the United States",
        "the Congress and the people",
        "the public debt of the country",
    ]
    records = []
    for i, answer in enumerate(answers):
        choices = salad[:i] + [answer] + salad[i:]
        records.append(arc_record("What is the duty of the President?", choices, i))
    return write_jsonl(tmp_path_factory.mktemp("planted") / "arc_easy.jsonl", records)


def test_the_scorer_picks_a_planted_answer(trained_model_dir, planted):
    report = evaluate_tasks(trained_model_dir, "arc_easy", data=planted)
    [result] = report.results
    assert result.items == 4 and result.source == str(planted)
    assert result.metrics == {"acc": 1.0, "acc_norm": 1.0}
    assert [p["acc"] for p in result.predictions] == [0, 1, 2, 3]


def test_acc_and_acc_norm_part_where_choice_lengths_differ(trained_model_dir, tmp_path):
    # A two-letter scrap has the higher total log-likelihood (few tokens), the long corpus
    # phrase the higher log-likelihood per character: acc takes the first, acc_norm the second.
    long = "the people of the United States and the Congress of the United States"
    records = [arc_record("Who governs?", ["zq", long], 1), arc_record("Who?", [long, "qz"], 0)]
    data = load_task("arc_easy", write_jsonl(tmp_path / "arc_easy.jsonl", records))
    model, tokenizer = load_for_evaluation(trained_model_dir)
    result = score_task(Scorer(model, tokenizer), data)
    assert result.metrics == {"acc": 0.0, "acc_norm": 1.0}
    for item, scores, picks in zip(data.items, result.scores, result.predictions, strict=True):
        lls = [s.loglikelihood for s in scores]
        per_char = [ll / len(choice) for ll, choice in zip(lls, item.continuations, strict=True)]
        assert picks == {"acc": int(np.argmax(lls)), "acc_norm": int(np.argmax(per_char))}
    assert result.stderr == {"acc": 0.0, "acc_norm": 0.0}


def test_lambada_is_greedy_last_word_accuracy_and_its_perplexity(tiny):
    model, tokenizer = tiny
    data = load_task("lambada_openai", "sanity", limit=5)
    result = score_task(Scorer(model, tokenizer), data)
    lls, greedy = [], []
    for item in data.items:
        ll, is_greedy = scratch_scores(model, tokenizer, item.contexts[0], item.continuations[0])
        lls.append(ll)
        greedy.append(is_greedy)
    assert item.continuations[0].startswith(" ") and not item.contexts[0].endswith(" ")
    assert result.metrics["ppl"] == pytest.approx(math.exp(-np.mean(lls)), rel=1e-4)
    assert result.metrics["acc"] == np.mean(greedy)


def test_winogrande_scores_the_rest_of_the_sentence_after_each_option(tiny):
    model, tokenizer = tiny
    data = load_task("winogrande", "sanity", limit=3)
    result = score_task(Scorer(model, tokenizer), data)
    for item, scores in zip(data.items, result.scores, strict=True):
        expected = [
            scratch_scores(model, tokenizer, ctx, " " + item.continuations[0])[0]
            for ctx in item.contexts
        ]
        assert [s.loglikelihood for s in scores] == pytest.approx(expected, abs=1e-4)
    assert set(result.metrics) == {"acc"}


@pytest.fixture(scope="module")
def q8(trained_model_dir, tmp_path_factory):
    return quantize(
        trained_model_dir, tmp_path_factory.mktemp("q") / "q8", bits=8, group_size=32
    ).out_dir


def test_an_8bit_model_scores_within_tolerance_of_its_float_original(trained_model_dir, q8):
    tasks = ["arc_easy", "piqa", "winogrande", "lambada_openai"]
    float_report = evaluate_tasks(trained_model_dir, tasks, data="sanity")
    quant_report = evaluate_tasks(q8, tasks, data="sanity")
    for f, q in zip(float_report.results, quant_report.results, strict=True):
        f_ll = np.array([s.loglikelihood for item in f.scores for s in item])
        q_ll = np.array([s.loglikelihood for item in q.scores for s in item])
        assert not np.allclose(f_ll, q_ll, rtol=0, atol=1e-6)  # really another model
        assert np.all(np.abs(q_ll - f_ll) <= 0.002 * np.abs(f_ll) + 0.01), f.task
        for name, value in f.metrics.items():
            tolerance = 0.02 * value if name == "ppl" else 1.5 / f.items  # one flipped answer
            assert abs(q.metrics[name] - value) <= tolerance, (f.task, name)


def test_dequantized_scoring_equals_the_quantized_kernels(q8):
    kernels, tokenizer = load_model(q8)
    dequantized, _ = load_for_evaluation(q8)
    assert (
        "scales" in kernels.layers[0].mlp.up_proj
        and "scales" not in dequantized.layers[0].mlp.up_proj
    )
    a = Scorer(kernels, tokenizer).score(CONTEXT, CONTINUATIONS)
    b = Scorer(dequantized, tokenizer).score(CONTEXT, CONTINUATIONS)
    assert [s.loglikelihood for s in a] == pytest.approx([s.loglikelihood for s in b], abs=1e-3)


def test_a_stock_mlx_lm_llama_scores_like_the_model_it_was_exported_from(tiny_model_dir, tmp_path):
    llama = export_stock(tiny_model_dir, tmp_path / "llama")
    ours = evaluate_tasks(tiny_model_dir, "arc_easy,winogrande", data="sanity", limit=4)
    stock = evaluate_tasks(llama, "arc_easy,winogrande", data="sanity", limit=4)
    for a, b in zip(ours.results, stock.results, strict=True):
        la = [s.loglikelihood for item in a.scores for s in item]
        lb = [s.loglikelihood for item in b.scores for s in item]
        assert la == pytest.approx(lb, abs=1e-4)


def test_the_chat_template_wraps_the_question_in_a_user_turn(tiny):
    model, tokenizer = tiny
    scorer = Scorer(model, tokenizer, chat_template=True)
    prompt = scorer.prompt("Is it?")
    assert prompt == "<|im_start|>user\nIs it?<|im_end|>\n<|im_start|>assistant\n"
    item = load_task("piqa", "sanity", limit=1).items[0]
    scores = scorer.score_item(item)
    # lm-eval drops the " " delimiter under a chat template: the assistant turn is already open.
    chat = scorer.prompt(item.contexts[0])
    expected = [scratch_scores(model, tokenizer, chat, c)[0] for c in item.continuations]
    assert [s.loglikelihood for s in scores] == pytest.approx(expected, abs=1e-4)


def test_every_shipped_task_runs_and_reports_json(tiny_model_dir, capsys):
    assert main(["evaluate", str(tiny_model_dir), "--limit", "2", "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["chat_template"] is False and set(report["tasks"]) == set(TASKS)
    for name, row in report["tasks"].items():
        assert row["items"] == 2 and "sanity set" in row["source"]
        for metric in TASKS[name].metrics:
            assert 0 <= row[metric] <= 1 or metric == "ppl"
            if metric != "ppl":
                assert f"{metric}_stderr" in row


def test_the_table_names_each_task_its_source_and_cut_contexts(trained_model_dir, capsys):
    args = ["evaluate", str(trained_model_dir), "--tasks", "boolq,obqa", "--limit", "3"]
    assert main([*args, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "no chat template" in out and "boolq" in out and "openbookqa" in out
    assert "±" in out and "sanity set" in out
    # The micro model's window is 64 tokens: BoolQ's passages do not fit.
    assert "contexts lost their oldest tokens to the model's window" in out
