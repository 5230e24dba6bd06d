"""Zero-shot accuracy by log-likelihood, scored as lm-eval-harness (and `mlx_lm.evaluate`) score it.

For every choice the continuation is tokenized as `encode(context + continuation)` minus the
tokens of `encode(context)`, and its log-likelihood summed given the context's tokens. `acc`
takes the choice with the highest sum, `acc_norm` the highest sum per character of the choice;
LAMBADA's `acc` asks whether greedy decoding produces the last word, its `ppl` is
exp(-mean log-likelihood of that word). Contexts longer than the model's window lose their
oldest tokens, as in `mlx_lm.evaluate`.

The context runs through the model once per question; each choice then continues from its KV
cache, which is trimmed back afterwards (or copied first, for caches that cannot trim).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from tqdm import tqdm

from appleslm.evaluate import EvaluationError
from appleslm.evaluate.perplexity import load_for_evaluation
from appleslm.evaluate.tasks import Item, TaskData, TaskDataError, load_task, task_names
from appleslm.models import context_length

DEFAULT_WINDOW = 8192  # mlx_lm.evaluate's limit for a model whose config declares no context
PREFILL_STEP = 2048  # context tokens per forward pass, so a long context needs bounded memory


@dataclass(frozen=True)
class ContinuationScore:
    loglikelihood: float  # summed over the continuation's tokens, in nats
    greedy: bool  # whether greedy decoding from the context produces exactly these tokens
    tokens: int


class Scorer:
    """Log-likelihoods of continuations after a context, for any mlx-lm model."""

    def __init__(
        self, model: nn.Module, tokenizer: Any, *, chat_template: bool = False, window: int = 0
    ):
        if chat_template and not tokenizer.has_chat_template:
            raise EvaluationError(
                "this model's tokenizer has no chat template; drop --chat-template"
            )
        self.model, self.tokenizer, self.chat_template = model, tokenizer, chat_template
        self.window = window or context_length(model) or DEFAULT_WINDOW
        self.truncated = (
            0  # contexts that lost tokens to the window (WinoGrande has two a question)
        )

    def prompt(self, context: str) -> str:
        """The context as the model sees it: as it is, or as one user turn of the chat template."""
        if not self.chat_template:
            return context
        messages = [{"role": "user", "content": context}]
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )

    def encode(self, text: str) -> list[int]:
        # A chat template writes its own special tokens; plain text gets the tokenizer's (a BOS).
        return list(self.tokenizer.encode(text, add_special_tokens=not self.chat_template))

    def score_item(self, item: Item) -> list[ContinuationScore]:
        """One score per choice, in choice order."""
        # lm-eval drops the target delimiter under a chat template (its assistant turn is open).
        delimiter = " " if item.delimited and not self.chat_template else ""
        continuations = [delimiter + c for c in item.continuations]
        return [s for ctx in item.contexts for s in self.score(self.prompt(ctx), continuations)]

    def score(self, context: str, continuations: Sequence[str]) -> list[ContinuationScore]:
        context_ids = self.encode(context)
        targets = [self.encode(context + c)[len(context_ids) :] for c in continuations]
        if not context_ids or not all(targets):
            raise TaskDataError(
                f"cannot score {context!r} -> {list(continuations)!r}: the context or a "
                "continuation has no tokens of its own"
            )
        longest = len(context_ids) + max(map(len, targets))
        cut = min(max(0, longest - self.window - 1), len(context_ids) - 1)
        self.truncated += cut > 0
        context_ids = context_ids[cut:]

        # The cache holds all but the last context token; each choice feeds that token and its
        # own tokens but the last, and its logits predict exactly the choice's tokens.
        cache = make_prompt_cache(self.model)
        self._prefill(context_ids[:-1], cache)
        trimmable = can_trim_prompt_cache(cache)
        scores = []
        for target in targets:
            inputs = [context_ids[-1], *target[:-1]]
            scores.append(
                self._continue(inputs, target, cache if trimmable else copy.deepcopy(cache))
            )
            if trimmable:
                trim_prompt_cache(cache, len(inputs))
        return scores

    def _prefill(self, ids: list[int], cache: list[Any]) -> None:
        for start in range(0, len(ids), PREFILL_STEP):
            self.model(mx.array([ids[start : start + PREFILL_STEP]]), cache=cache)
            mx.eval([c.state for c in cache])  # only the cache: the head never runs on the context

    def _continue(
        self, inputs: list[int], target: list[int], cache: list[Any]
    ) -> ContinuationScore:
        logits = self.model(mx.array([inputs]), cache=cache)[0].astype(mx.float32)
        ids = mx.array(target)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        loglikelihood = mx.take_along_axis(logprobs, ids[:, None], axis=-1).sum()
        greedy = mx.all(mx.argmax(logits, axis=-1) == ids)
        mx.eval(loglikelihood, greedy)
        return ContinuationScore(loglikelihood.item(), greedy.item(), len(target))


# ------------------------------------------------------------------------------ metrics


@dataclass
class TaskResult:
    task: str
    source: str
    metrics: dict[str, float]  # acc, acc_norm, ppl: those lm-eval's task YAML lists
    stderr: dict[str, float | None]  # standard error of each accuracy (lm-eval's mean_stderr)
    items: int
    truncated: int  # contexts cut to the model's window
    seconds: float
    scores: list[list[ContinuationScore]] = field(default_factory=list, repr=False)
    predictions: list[dict[str, int]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.source, "items": self.items}
        for name, value in self.metrics.items():
            out[name] = value
            if name in self.stderr:
                out[f"{name}_stderr"] = self.stderr[name]
        out.update(truncated=self.truncated, seconds=round(self.seconds, 2))
        return out


def predictions(item: Item, scores: list[ContinuationScore]) -> dict[str, int]:
    """The choice `acc` picks (highest log-likelihood) and the one `acc_norm` picks (highest
    log-likelihood per character of the choice); ties go to the first, as np.argmax does."""
    lls = np.array([s.loglikelihood for s in scores])
    return {
        "acc": int(np.argmax(lls)),
        "acc_norm": int(np.argmax(lls / np.array(item.choice_lengths, dtype=np.float64))),
    }


def mean_stderr(values: Sequence[float]) -> float | None:
    """Sample standard deviation over sqrt(n), lm-eval's standard error of a mean."""
    if len(values) < 2:
        return None
    return float(np.std(values, ddof=1) / math.sqrt(len(values)))


def score_task(scorer: Scorer, data: TaskData, progress: bool = False) -> TaskResult:
    start, truncated_before = time.perf_counter(), scorer.truncated
    bar = tqdm(data.items, desc=data.task.name, unit="q", leave=False, disable=not progress)
    scores = [scorer.score_item(item) for item in bar]
    picks = [predictions(item, s) for item, s in zip(data.items, scores)]
    per_item: dict[str, list[float]] = {}
    if "ppl" in data.task.metrics:  # LAMBADA: one continuation, the gold word
        per_item["acc"] = [float(s[0].greedy) for s in scores]
    else:
        for metric in ("acc", "acc_norm"):
            if metric in data.task.metrics:
                per_item[metric] = [float(p[metric] == i.gold) for p, i in zip(picks, data.items)]
    metrics = {name: float(np.mean(values)) for name, values in per_item.items()}
    if "ppl" in data.task.metrics:
        metrics["ppl"] = math.exp(-float(np.mean([s[0].loglikelihood for s in scores])))
    return TaskResult(
        task=data.task.name,
        source=data.source,
        metrics=metrics,
        stderr={name: mean_stderr(values) for name, values in per_item.items()},
        items=len(data.items),
        truncated=scorer.truncated - truncated_before,
        seconds=time.perf_counter() - start,
        scores=scores,
        predictions=picks,
    )


# ------------------------------------------------------------------------------ the command


@dataclass
class ZeroShotReport:
    model: str
    chat_template: bool
    results: list[TaskResult]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "chat_template": self.chat_template,
            "tasks": {r.task: r.to_dict() for r in self.results},
        }


def evaluate_tasks(
    model_spec: str | Path,
    tasks: str | Sequence[str] = "all",
    *,
    data: str | Path | None = None,
    limit: int | None = None,
    chat_template: bool = False,
    trust_remote_code: bool = False,
    progress: bool = False,
) -> ZeroShotReport:
    """Zero-shot scores of a model on `tasks` (names, or a comma-separated string, or "all").

    Every task's data is read and checked before the model loads, so a bad file fails at once.
    `data` and `limit` are as `appleslm.evaluate.tasks.load_task` takes them.
    """
    if limit is not None and limit < 1:
        raise EvaluationError(f"--limit must be at least 1, not {limit}")
    names = task_names(tasks) if isinstance(tasks, str) else task_names(",".join(tasks))
    loaded = [load_task(name, data, limit) for name in names]
    model, tokenizer = load_for_evaluation(model_spec, trust_remote_code)
    scorer = Scorer(model, tokenizer, chat_template=chat_template)
    bar = tqdm(loaded, desc="tasks", unit="task", disable=not progress or len(loaded) < 2)
    results = [score_task(scorer, task_data, progress) for task_data in bar]
    return ZeroShotReport(str(model_spec), chat_template, results)


def format_table(report: ZeroShotReport) -> str:
    """One row per task: items, each metric with its standard error, and the data's source."""
    rows = [["task", "items", "acc", "acc_norm", "ppl", "source"]]
    for r in report.results:
        rows.append(
            [
                r.task,
                str(r.items),
                *(_with_stderr(r, name) for name in ("acc", "acc_norm")),
                f"{r.metrics['ppl']:.2f}" if "ppl" in r.metrics else "",
                r.source,
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows
    ]
    truncated = sum(r.truncated for r in report.results)
    if truncated:
        lines.append(f"{truncated} contexts lost their oldest tokens to the model's window")
    template = "with the chat template" if report.chat_template else "no chat template"
    return f"{report.model}: zero-shot, {template}\n" + "\n".join(lines)


def _with_stderr(result: TaskResult, name: str) -> str:
    if name not in result.metrics:
        return ""
    stderr = result.stderr.get(name)
    return f"{result.metrics[name]:.3f}" + (f" ± {stderr:.3f}" if stderr is not None else "")
