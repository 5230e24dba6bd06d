"""Our scores equal `mlx_lm.evaluate`'s (lm-eval-harness with mlx-lm's model) on the same files.

Runs only where the optional `lm-eval` is installed (`pip install 'appleslm[eval]'`; the `dev`
extra has it). lm-eval's CLI reads tasks from the Hub only; its Python API takes local task
YAMLs through `TaskManager(include_path=...)`: each one here includes lm-eval's own task file
(prompts, choices, metrics) and swaps its dataset for one of our shipped JSONL files.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local JSON only; never the Hub
lm_eval = pytest.importorskip("lm_eval")

from lm_eval.tasks import TaskManager  # noqa: E402
from mlx_lm.evaluate import MLXLM  # noqa: E402

from appleslm.evaluate.tasks import SANITY_DIR, TASKS  # noqa: E402
from appleslm.evaluate.zeroshot import evaluate_tasks  # noqa: E402
from appleslm.io.model_dir import load_model  # noqa: E402
from appleslm.models import context_length  # noqa: E402

LM_EVAL_TASK_FILES = {  # lm-eval 0.4's layout under lm_eval/tasks/
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "piqa": "piqa/piqa.yaml",
    "social_iqa": "siqa/siqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "winogrande": "winogrande/default.yaml",
    "lambada_openai": "lambada/lambada_openai.yaml",
}
LM_EVAL_NAMES = {"ppl": "perplexity"}


def local_task_yaml(name: str) -> str:
    tasks_dir = Path(lm_eval.__file__).parent / "tasks"
    return "\n".join(
        [
            f"include: {tasks_dir / LM_EVAL_TASK_FILES[name]}",
            f"task: appleslm_{name}",
            "dataset_path: json",
            "dataset_name: null",
            f"dataset_kwargs: {{data_files: {{test: {SANITY_DIR / f'{name}.jsonl'}}}}}",
            "training_split: null",
            "validation_split: null",
            "test_split: test",
            "",
        ]
    )


@pytest.fixture(scope="module")
def lm_eval_run(trained_model_dir, tmp_path_factory):
    task_dir = tmp_path_factory.mktemp("lm-eval-tasks")
    for name in TASKS:
        (task_dir / f"appleslm_{name}.yaml").write_text(local_task_yaml(name))
    # The micro model's 64-token context cuts BoolQ's passages: both sides must cut alike.
    window = context_length(load_model(trained_model_dir)[0])
    model = MLXLM(
        str(trained_model_dir), max_tokens=window, use_chat_template=False, trust_remote_code=True
    )
    return lm_eval.simple_evaluate(
        model=model,
        tasks=[f"appleslm_{name}" for name in TASKS],
        task_manager=TaskManager(include_path=str(task_dir)),
        num_fewshot=0,
        log_samples=True,
        bootstrap_iters=10,  # only perplexity is bootstrapped; accuracies use the closed form
    )


def test_scores_equal_mlx_lm_evaluate_on_every_task(trained_model_dir, lm_eval_run):
    ours = evaluate_tasks(trained_model_dir, "all", data="sanity")
    assert sum(r.truncated for r in ours.results) > 0  # the window was really in play
    for result in ours.results:
        theirs = lm_eval_run["results"][f"appleslm_{result.task}"]
        samples = sorted(
            lm_eval_run["samples"][f"appleslm_{result.task}"], key=lambda s: s["doc_id"]
        )
        assert len(samples) == result.items
        for sample, scores in zip(samples, result.scores, strict=True):
            lls = [float(resp[0]) for resp in sample["filtered_resps"]]
            greedy = [bool(resp[1]) for resp in sample["filtered_resps"]]
            assert [s.loglikelihood for s in scores] == pytest.approx(lls, abs=1e-4), result.task
            assert [s.greedy for s in scores] == greedy, result.task
        for name, value in result.metrics.items():
            their_value = theirs[f"{LM_EVAL_NAMES.get(name, name)},none"]
            assert value == pytest.approx(their_value, rel=1e-5), (result.task, name)
            if name in result.stderr:
                their_stderr = theirs[f"{name}_stderr,none"]
                assert result.stderr[name] == pytest.approx(their_stderr, rel=1e-5)
