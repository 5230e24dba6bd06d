"""Pretraining: next-token prediction over packed windows of a corpus, as a task of the one loop.

A run directory holds the resolved config, the tokenizer, checkpoints, metrics.jsonl, loss.png
and, at the end, `model/`: a model directory every other command (and stock mlx-lm) loads.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from appleslm.blas import hardware
from appleslm.config import ConfigError, RunConfig
from appleslm.data import PreparedData, prepare_data
from appleslm.data.batches import PackedBatches, eval_batch_count, iter_eval_batches
from appleslm.data.corpus import describe_source
from appleslm.data.tokenizer import save_tokenizer, token_byte_lengths
from appleslm.io.files import DataRecord, Provenance, Quality, TrainingRecord
from appleslm.io.model_dir import save_model_dir
from appleslm.models import Model, build_model, parameter_counts
from appleslm.train.losses import model_batch, token_loss, training_loss
from appleslm.train.trainer import RunSummary, StepBatch, Trainer, TrainResult, safe_exp


class Pretraining:
    kind = "pretraining"
    eval_label = "validation loss"
    evaluate_first = False
    train_loss = staticmethod(training_loss)
    eval_loss = staticmethod(token_loss)
    teacher: str | None = None  # the model a distillation matched (appleslm.train.distill)

    def __init__(self, cfg: RunConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.model: Model | None = None
        self.data: PreparedData | None = None

    def run_record(self) -> dict[str, Any]:
        return self.cfg.to_dict()

    def resume_problem(self, saved: dict[str, Any]) -> str | None:
        wanted = self.run_record()
        for section in ("model", "data"):
            if saved.get(section) != wanted[section]:
                return f"its {section} config differs from the one given"
        return None

    def setup(self, rank: int, world: int, sync: Callable[[], None], log) -> None:
        cfg, tc = self.cfg, self.cfg.train
        if tc.seq_len > cfg.model.max_position_embeddings:
            raise ConfigError(
                f"train.seq_len {tc.seq_len} is longer than the model's context "
                f"(model.max_position_embeddings {cfg.model.max_position_embeddings})"
            )
        self.rank, self.world = rank, world
        # Rank 0 tokenizes first; the others then hit its cache instead of racing it.
        if rank == 0:
            self.data = prepare_data(cfg.data, cfg.model.vocab_size, log=log)
            save_tokenizer(self.data.tokenizer, self.run_dir / "tokenizer")
        sync()
        if rank != 0:
            self.data = prepare_data(cfg.data, cfg.model.vocab_size, log=log)
        self.model = build_model(cfg.model, self.data.tokenizer, log=log)
        if tc.init_from is not None:
            self.start_from(tc.init_from)
        self.micro_batch = tc.batch_size // (world * tc.grad_accum)
        self.batches = PackedBatches(
            self.data.train,
            self.micro_batch * tc.grad_accum,
            tc.seq_len,
            seed=tc.seed,
            shuffle_buffer=cfg.data.shuffle_buffer,
            rank=rank,
            world_size=world,
        )

    def start_from(self, spec: str) -> None:
        """The weights of the model directory `spec` (continued pretraining on new data)."""
        from mlx.utils import tree_flatten

        from appleslm.io.model_dir import load_model

        if self.cfg.data.tokenizer is None:
            raise ConfigError(
                "train.init_from needs the tokenizer its model was trained with: set "
                f"data.tokenizer={spec}"
            )
        start, _ = load_model(spec)
        try:
            self.model.load_weights(tree_flatten(start.parameters()), strict=True)
        except ValueError as e:
            raise ConfigError(
                f"train.init_from {spec}: its weights do not fit the model config ({e})"
            ) from None

    def describe(self) -> str:
        counts = parameter_counts(self.model)
        return (
            f"{self.kind} {counts['params_total'] / 1e6:.2f}M parameters "
            f"({counts['layers_executed']} blocks executed) on {len(self.data.train):,} "
            f"training / {len(self.data.val):,} validation tokens of "
            f"{describe_source(self.cfg.data.source)[0]}"
        )

    def step_batch(self, step: int) -> StepBatch:
        x, y = self.batches.next_batch()
        n = self.micro_batch
        micro = [model_batch(self.model, x[i : i + n], y[i : i + n]) for i in range(0, len(x), n)]
        return StepBatch(micro, self.cfg.train.batch_size * self.cfg.train.seq_len)

    def has_validation(self) -> bool:
        return len(self.data.val) > 0

    def eval_size(self) -> str:
        tc = self.cfg.train
        per_rank, n_batches = eval_batch_count(
            len(self.data.val), self.micro_batch, tc.seq_len, tc.eval_batches or None, self.world
        )
        return f"{per_rank * n_batches * self.world * tc.seq_len:,} held-out tokens"

    def eval_windows(self, rank: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Rank `rank`'s share of the validation windows, as (inputs, targets)."""
        tc = self.cfg.train
        return iter_eval_batches(
            self.data.val, self.micro_batch, tc.seq_len, tc.eval_batches or None, rank, self.world
        )

    def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
        return (model_batch(self.model, x, y) for x, y in self.eval_windows(self.rank))

    def validation_bytes(self) -> tuple[int, int]:
        """(target tokens, their UTF-8 bytes) of the validation batches every rank scores: what
        turns the validation loss into bits per byte."""
        lengths = token_byte_lengths(self.data.tokenizer)
        targets = [y for rank in range(self.world) for _, y in self.eval_windows(rank)]
        return sum(y.size for y in targets), sum(int(lengths[y].sum()) for y in targets)

    def state_dict(self) -> dict[str, Any]:
        return {"data": self.batches.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches.load_state_dict(state["data"])

    def save_model(self, out_dir: Path, summary: RunSummary) -> Path:
        cfg, meta = self.cfg, self.data.meta
        name, licence = describe_source(cfg.data.source)
        trained_here = cfg.data.tokenizer is None
        data = DataRecord(
            source=cfg.data.source,
            name=name,
            licence=licence,
            documents=meta.get("train_docs"),
            train_tokens=meta.get("train_tokens"),
            val_tokens=meta.get("val_tokens"),
            tokenizer=(
                f"byte-level BPE, {cfg.model.vocab_size:,} tokens, trained on this data"
                if trained_here
                else f"from {Path(cfg.data.tokenizer).name}"
            ),
        )
        stage = TrainingRecord(
            task=self.kind,
            data=data,
            steps=summary.steps,
            tokens=summary.tokens_seen,
            batch_size=cfg.train.batch_size,
            lr=cfg.train.lr,
            seq_len=cfg.train.seq_len,
            dtype=cfg.train.dtype,
            processes=summary.processes,
            hardware=hardware(),
            seconds=round(summary.seconds, 1),
            teacher=self.teacher,
            settings=dataclasses.asdict(cfg.train),
        )
        quality = None
        if summary.val_loss is not None:
            tokens, text_bytes = self.validation_bytes()
            bits = summary.val_loss * tokens / math.log(2)
            quality = Quality(
                loss=summary.val_loss,
                ppl=safe_exp(summary.val_loss),
                bpb=bits / text_bytes if text_bytes else None,
                tokens=summary.val_tokens,
                split="held-out documents of the training data",
            )
        data_config = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k != "cache_dir"}
        provenance = Provenance(
            name=self.run_dir.name,
            variant=variant_name(cfg),
            params=parameter_counts(self.model),
            training=[stage],
            quality=quality,
            data_config=data_config,
        )
        with tempfile.TemporaryDirectory() as tokenizer_dir:
            save_tokenizer(self.data.tokenizer, Path(tokenizer_dir))
            return save_model_dir(
                out_dir,
                self.model,
                tokenizer_dir=tokenizer_dir,
                provenance=provenance,
                overwrite=True,
            )


def variant_name(cfg: RunConfig) -> str:
    """A short label for density plots: which of the papers' ideas this run uses ("dense" for
    none of them)."""
    m = cfg.model
    parts = {"table": [], "leviathan": ["leviathan"], "bytes": ["bytes-in"]}[m.embedding]
    if m.head == "bytes":
        parts.append("bytes-out")
    if m.num_experts:
        parts.append(f"moe{m.num_experts}")
    if m.share_ffn:
        parts.append("share-ffn")
    if m.layer_repeat > 1:
        parts.append(f"ls{m.layer_repeat}")
    return "-".join(parts) or "dense"


def train(
    cfg: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    verbose: bool = False,
) -> TrainResult:
    """Pretrain `cfg` in `run_dir` (resuming its last checkpoint with `resume`); `verbose` logs
    library paths too."""
    task = Pretraining(cfg, Path(run_dir))
    trainer = Trainer(task, cfg.train, run_dir, resume=resume, progress=progress, verbose=verbose)
    return trainer.run()
