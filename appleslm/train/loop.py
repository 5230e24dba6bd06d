"""Pretraining: a compiled AdamW step over packed token batches, with exact resume.

A run directory holds the resolved config, the tokenizer, checkpoints, metrics.jsonl, loss.png
and, at the end, `model/`: a model directory every other command (and stock mlx-lm) loads.
Data parallel across processes or Macs comes from `mx.distributed`: launch the same command with
`mlx.launch`; gradients are averaged and rank 0 writes everything.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import yaml
from mlx.utils import tree_flatten, tree_map
from tqdm import tqdm

from appleslm.blas import blas_in_use
from appleslm.config import RunConfig
from appleslm.data import prepare_data
from appleslm.data.batches import PackedBatches, iter_eval_batches
from appleslm.data.tokenizer import save_tokenizer
from appleslm.io.model_dir import save_model_dir
from appleslm.models import Model, parameter_counts
from appleslm.train.checkpoint import latest_checkpoint, restore_checkpoint, save_checkpoint
from appleslm.train.metrics import MetricsLog, plot_losses, train_record
from appleslm.train.optim import build_optimizer

GENERATOR_BUCKET = 64  # pad a batch's distinct ids to a multiple of this: few compiled shapes


class TrainingError(RuntimeError):
    """Training cannot go on (diverged, bad run directory); the last good checkpoint is kept."""


@dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path | None
    step: int
    tokens_seen: int
    val_loss: float | None
    interrupted: bool = False

    @property
    def val_ppl(self) -> float | None:
        return math.exp(self.val_loss) if self.val_loss is not None else None


def cross_entropy(model: nn.Module, x: mx.array, y: mx.array, embeddings: Any = None) -> mx.array:
    logits = model(x, input_embeddings=embeddings)
    return nn.losses.cross_entropy(logits.astype(mx.float32), y, reduction="mean")


def generator_loss(
    model: nn.Module, x: mx.array, y: mx.array, unique_ids: mx.array, inverse: mx.array
) -> mx.array:
    return cross_entropy(model, x, y, model.embed_unique(unique_ids, inverse))


def model_inputs(model: nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[mx.array, ...]:
    """Arrays for the loss; a generator model also gets the batch's distinct ids."""
    if model.args.embedding != "leviathan":
        return mx.array(x), mx.array(y)
    unique_ids, inverse = np.unique(x, return_inverse=True)
    padding = np.full((-len(unique_ids)) % GENERATOR_BUCKET, unique_ids[0])
    unique_ids = np.concatenate([unique_ids, padding])
    return mx.array(x), mx.array(y), mx.array(unique_ids), mx.array(inverse.reshape(x.shape))


def check_finite(loss: float, grad_norm: float, step: int, checkpoints: Path, hint: str) -> None:
    """Stop a diverged run before anything is saved, so the last checkpoint stays good."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise TrainingError(
            f"loss became {loss} (gradient norm {grad_norm}) at step {step}; stopping without "
            f"saving. The last good checkpoint is in {checkpoints}; {hint}."
        )


class StopRequest:
    """First Ctrl-C (or SIGTERM) asks the loop to checkpoint and stop at the next step boundary;
    a second one interrupts at once."""

    def __init__(self):
        self.requested = False
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path,
        *,
        resume: bool = False,
        progress: bool = True,
        log: Callable[[str], None] = tqdm.write,
    ):
        self.cfg, self.run_dir, self.progress = cfg, Path(run_dir), progress
        self.group = mx.distributed.init()
        self.rank, self.world = self.group.rank(), self.group.size()
        self.log = log if self.rank == 0 else (lambda message: None)
        tc = cfg.train
        per_step = self.world * tc.grad_accum
        if tc.batch_size % per_step:
            raise TrainingError(
                f"train.batch_size {tc.batch_size} must be a multiple of "
                f"ranks x grad_accum = {per_step}"
            )
        self.micro_batch = tc.batch_size // per_step
        self.checkpoints = self.run_dir / "checkpoints"
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self.prepare_run_dir(resume)
        self.data = self.load_data()

        mx.random.seed(tc.seed)
        self.model = Model(cfg.model)
        if tc.dtype == "bfloat16":
            self.model.set_dtype(mx.bfloat16)
        elif tc.dtype != "float32":
            raise TrainingError(f"train.dtype must be float32 or bfloat16, got {tc.dtype!r}")
        self.optimizer = build_optimizer(tc)
        self.optimizer.init(self.model.trainable_parameters())
        mx.eval(self.model.parameters(), self.optimizer.state)
        self.batches = PackedBatches(
            self.data.train,
            self.micro_batch * tc.grad_accum,
            tc.seq_len,
            seed=tc.seed,
            shuffle_buffer=cfg.data.shuffle_buffer,
            rank=self.rank,
            world_size=self.world,
        )
        self.step, self.tokens_seen = 0, 0
        checkpoint = latest_checkpoint(self.checkpoints) if resume else None
        if checkpoint is not None:
            restore_checkpoint(checkpoint, self.model, self.optimizer)
            self.batches.load_state_dict(checkpoint.state["data"])
            self.step, self.tokens_seen = checkpoint.step, checkpoint.state["tokens_seen"]
            self.log(f"resumed from {checkpoint.path} at step {self.step}")
        if self.rank == 0:
            self.metrics.truncate_after(self.step)
        self.compute_grads, self.apply_update, self.eval_loss = self.build_steps()

    def prepare_run_dir(self, resume: bool) -> None:
        if self.rank != 0:
            return  # rank 0 owns the run directory
        config_file = self.run_dir / "config.yaml"
        wanted = self.cfg.to_dict()
        if config_file.exists():
            saved = yaml.safe_load(config_file.read_text())
            if not resume:
                raise TrainingError(
                    f"{self.run_dir} already holds a run: pass --resume to continue "
                    "it, or choose another --out"
                )
            for section in ("model", "data"):
                if saved.get(section) != wanted[section]:
                    raise TrainingError(
                        f"cannot resume {self.run_dir}: its {section} config "
                        "differs from the one given"
                    )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config_file.write_text(yaml.safe_dump(wanted, sort_keys=False))

    def load_data(self):
        # Rank 0 tokenizes first; the others then hit its cache instead of racing it.
        if self.rank == 0:
            data = prepare_data(self.cfg.data, self.cfg.model.vocab_size)
            save_tokenizer(data.tokenizer, self.run_dir / "tokenizer")
        self.barrier()
        if self.rank != 0:
            data = prepare_data(self.cfg.data, self.cfg.model.vocab_size)
        return data

    def barrier(self) -> None:
        if self.world > 1:
            mx.eval(mx.distributed.all_sum(mx.array(1.0), group=self.group))

    def build_steps(self):
        model, optimizer, tc = self.model, self.optimizer, self.cfg.train
        loss = generator_loss if model.args.embedding == "leviathan" else cross_entropy
        loss_and_grad = nn.value_and_grad(model, loss)
        state = [model.state, optimizer.state]

        def compute_grads(*batch):
            return loss_and_grad(model, *batch)

        def apply_update(grads):
            grads = nn.average_gradients(grads, group=self.group)
            grads, norm = optim.clip_grad_norm(grads, tc.grad_clip)
            optimizer.update(model, grads)
            return norm

        def eval_loss(*batch):
            return cross_entropy(model, *batch)

        if not tc.compile:
            return compute_grads, apply_update, eval_loss
        compiled = partial(mx.compile, inputs=state, outputs=state)
        return compiled(compute_grads), compiled(apply_update), mx.compile(eval_loss, inputs=state)

    def train_step(self) -> tuple[mx.array, mx.array]:
        # Any randomness inside a step then depends only on (seed, step): resume stays exact.
        mx.random.seed(self.cfg.train.seed * 1_000_003 + self.step)
        x, y = self.batches.next_batch()
        accum = self.cfg.train.grad_accum
        losses, grads = [], None
        for part in range(accum):
            rows = slice(part * self.micro_batch, (part + 1) * self.micro_batch)
            loss, g = self.compute_grads(*model_inputs(self.model, x[rows], y[rows]))
            grads = g if grads is None else tree_map(mx.add, grads, g)
            losses.append(loss)
        if accum > 1:
            grads = tree_map(lambda g: g / accum, grads)
        norm = self.apply_update(grads)
        loss = sum(losses) / accum
        if self.world > 1:
            loss = mx.distributed.all_sum(loss, group=self.group) / self.world
        mx.eval(loss, norm, self.model.state, self.optimizer.state)
        return loss, norm

    def validate(self) -> float:
        tc = self.cfg.train
        losses = [
            self.eval_loss(mx.array(x), mx.array(y))
            for x, y in iter_eval_batches(
                self.data.val, self.micro_batch, tc.seq_len, tc.eval_batches
            )
        ]
        return mx.stack(losses).mean().item()

    def checkpoint(self) -> None:
        if self.rank == 0:
            state = {"data": self.batches.state_dict(), "tokens_seen": self.tokens_seen}
            save_checkpoint(
                self.checkpoints,
                self.step,
                self.model,
                self.optimizer,
                state,
                keep=self.cfg.train.keep_checkpoints,
            )

    def run(self) -> TrainResult:
        tc = self.cfg.train
        counts = parameter_counts(self.model)
        self.log(
            f"model: {counts['params_total'] / 1e6:.2f}M parameters "
            f"({counts['layers_executed']} blocks executed); BLAS: {blas_in_use()}; "
            f"{self.world} process(es)"
        )
        self.log(
            f"data: {len(self.data.train):,} training / {len(self.data.val):,} validation "
            f"tokens from {self.data.meta.get('source', self.cfg.data.source)}"
        )
        tokens_per_step = tc.batch_size * tc.seq_len
        val_loss = None
        bar = tqdm(
            total=tc.steps,
            initial=self.step,
            disable=not self.progress or self.rank != 0,
            unit="step",
            dynamic_ncols=True,
        )
        window_start, window_tokens = time.perf_counter(), 0
        with StopRequest() as stop:
            while self.step < tc.steps and not stop.requested:
                loss, norm = self.train_step()
                loss_value, norm_value = loss.item(), norm.item()
                check_finite(
                    loss_value,
                    norm_value,
                    self.step + 1,
                    self.checkpoints,
                    "lower train.lr or raise train.warmup_steps",
                )
                self.step += 1
                self.tokens_seen += tokens_per_step
                window_tokens += tokens_per_step
                last = self.step == tc.steps
                if self.step % tc.log_every == 0 or last:
                    elapsed = time.perf_counter() - window_start
                    record = train_record(
                        self.step,
                        loss_value,
                        norm_value,
                        self.optimizer.optimizers[0].learning_rate.item(),
                        self.tokens_seen,
                        window_tokens,
                        elapsed,
                    )
                    self.record(record)
                    bar.set_postfix(
                        loss=f"{loss_value:.3f}",
                        tok_s=f"{record['tok_per_s']:.0f}",
                        mem=f"{record['peak_memory_gb']:.2f}GB",
                    )
                    window_start, window_tokens = time.perf_counter(), 0
                if self.step % tc.eval_every == 0 or last:
                    val_loss = self.validate()
                    self.record(
                        {
                            "kind": "eval",
                            "step": self.step,
                            "val_loss": val_loss,
                            "val_ppl": math.exp(val_loss),
                        }
                    )
                    self.log(
                        f"step {self.step}: validation loss {val_loss:.4f}, "
                        f"perplexity {math.exp(val_loss):.2f}"
                    )
                if self.step % tc.save_every == 0 or last:
                    self.checkpoint()
                bar.update(1)
            bar.close()
            if stop.requested:
                self.checkpoint()
                self.log(f"stopped at step {self.step}; checkpoint saved. Continue with --resume.")
                return TrainResult(self.run_dir, None, self.step, self.tokens_seen, val_loss, True)
        self.check_ranks_in_sync()
        model_dir = self.save_final_model(val_loss, counts) if self.rank == 0 else None
        return TrainResult(self.run_dir, model_dir, self.step, self.tokens_seen, val_loss)

    def check_ranks_in_sync(self) -> None:
        """Data-parallel ranks must hold identical weights: a silent divergence wastes a run."""
        if self.world == 1:
            return
        leaves = [p.astype(mx.float32).sum() for _, p in tree_flatten(self.model.parameters())]
        checksum = mx.stack(leaves).sum()
        low = mx.distributed.all_min(checksum, group=self.group)
        high = mx.distributed.all_max(checksum, group=self.group)
        if low.item() != high.item():
            raise TrainingError(f"data-parallel ranks diverged: weight checksums {low} != {high}")
        self.log(f"{self.world} ranks in sync (weight checksum {checksum.item():.6f})")

    def record(self, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        self.metrics.append(record)
        if record["kind"] == "eval":  # plotting costs ~0.1 s: once per evaluation is enough
            plot_losses(self.metrics.records(), self.run_dir / "loss.png", self.run_dir.name)

    def save_final_model(self, val_loss: float | None, counts: dict[str, int]) -> Path:
        if val_loss is None:
            val_loss = self.validate()
        provenance = {
            "name": self.run_dir.name,
            "variant": variant_name(self.cfg),
            "params": counts,
            "val_loss": val_loss,
            "val_ppl": math.exp(val_loss),
            "tokens_seen": self.tokens_seen,
            "steps": self.step,
            "data": self.data.meta,
            "data_config": dataclasses.asdict(self.cfg.data),
            "train": dataclasses.asdict(self.cfg.train),
        }
        with tempfile.TemporaryDirectory() as tokenizer_dir:
            save_tokenizer(self.data.tokenizer, Path(tokenizer_dir))
            model_dir = save_model_dir(
                self.run_dir / "model",
                self.model,
                tokenizer_dir=tokenizer_dir,
                provenance=provenance,
            )
        self.log(f"model saved to {model_dir} (validation perplexity {math.exp(val_loss):.2f})")
        return model_dir


def variant_name(cfg: RunConfig) -> str:
    """A short label for density plots: which of the papers' ideas this run uses."""
    m = cfg.model
    parts = ["leviathan" if m.embedding == "leviathan" else "dense"]
    if m.layer_repeat > 1:
        parts.append(f"ls{m.layer_repeat}")
    return "-".join(parts)


def train(
    cfg: RunConfig, run_dir: str | Path, *, resume: bool = False, progress: bool = True
) -> TrainResult:
    return Trainer(cfg, Path(run_dir), resume=resume, progress=progress).run()
