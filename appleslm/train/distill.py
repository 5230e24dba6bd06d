"""Distillation: a small student learns a teacher's next-token distribution, as a task of the
one loop (the same checkpoints, resume, metrics and plots as pretraining).

The student is a model config (a preset or YAML, with overrides) trained on packed windows of
any `data.source` with the teacher's tokenizer, so that it can draft for the teacher
(speculative decoding) or stand in for it. The loss is `losses.distillation_loss`: KL at a
temperature, optionally mixed with plain cross-entropy; validation reports the student's
plain cross-entropy, comparable with any model's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appleslm.config import ConfigError, DistillConfig, RunConfig, load_config
from appleslm.evaluate.perplexity import load_for_evaluation
from appleslm.io.files import read_config
from appleslm.io.model_dir import model_reference, resolve_model
from appleslm.train.losses import distillation_loss
from appleslm.train.pretrain import Pretraining
from appleslm.train.trainer import Trainer, TrainResult


class Distillation(Pretraining):
    kind = "distillation"

    def __init__(self, cfg: RunConfig, run_dir: Path, teacher: str, distill: DistillConfig):
        super().__init__(cfg, run_dir)
        self.teacher_dir = resolve_model(teacher)
        self.teacher = model_reference(teacher, self.teacher_dir)  # as provenance names it
        self.distill = distill

    def run_record(self) -> dict[str, Any]:
        return super().run_record() | {
            "distill": {"teacher": str(self.teacher_dir), **dataclasses.asdict(self.distill)}
        }

    def resume_problem(self, saved: dict[str, Any]) -> str | None:
        if saved.get("distill") != self.run_record()["distill"]:
            return "its teacher or distillation settings differ from the ones given"
        return super().resume_problem(saved)

    def setup(self, rank: int, world: int, sync: Callable[[], None], log) -> None:
        super().setup(rank, world, sync, log)
        if getattr(self.model.args, "head", "linear") != "linear":
            raise ConfigError(
                "distillation matches the teacher's logits over its vocabulary: the student "
                "needs a linear head (model.head=linear)"
            )
        # The teacher as this device runs it fastest (on the CPU: dequantized float32).
        teacher, tokenizer = load_for_evaluation(self.teacher_dir)
        teacher.freeze()
        vocab = len(tokenizer.get_vocab())
        self.train_loss = distillation_loss(
            teacher, vocab, self.distill.temperature, self.distill.ce_weight
        )

    def describe(self) -> str:
        return f"{super().describe()}; teacher {self.teacher}"


def student_config(teacher: str, config: str, overrides: list[str]) -> RunConfig:
    """The student's run config: `config` with the teacher's tokenizer and vocabulary size
    (set first, so an explicit override still wins, and is then checked)."""
    teacher_dir = resolve_model(teacher)
    vocab_size = read_config(teacher_dir).get("vocab_size")
    if not isinstance(vocab_size, int):
        raise ConfigError(f"{teacher_dir}/config.json has no vocab_size: not a language model")
    forced = [f"data.tokenizer={teacher_dir}", f"model.vocab_size={vocab_size}"]
    for item in overrides:
        if item.partition("=")[0] == "data.tokenizer":
            raise ConfigError(
                "a distilled student uses its teacher's tokenizer: drop data.tokenizer"
            )
    return load_config(config, forced + list(overrides))


def distill(
    teacher: str,
    cfg: RunConfig,
    run_dir: str | Path,
    *,
    settings: DistillConfig | None = None,
    resume: bool = False,
    progress: bool = True,
    verbose: bool = False,
) -> TrainResult:
    """`appleslm distill`: train the student `cfg` (see `student_config`) in `run_dir` to match
    `teacher`."""
    task = Distillation(cfg, Path(run_dir), teacher, settings or DistillConfig())
    trainer = Trainer(task, cfg.train, run_dir, resume=resume, progress=progress, verbose=verbose)
    return trainer.run()
