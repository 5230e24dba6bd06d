"""The one training loop. Pretraining and chat fine-tuning are tasks handed to it.

A task says what differs: how its model is built, its batches and validation batches, its loss
(as a sum and a count), what its checkpoints carry beyond the loop's own state, what its run record
is, and how its final model directory is written. The loop owns everything else, once: the run
directory and its resume rules, the compiled step with gradient accumulation, data parallelism over
`mx.distributed` (`appleslm.train.launch` starts local ranks, `mlx.launch` remote ones; rank 0
writes everything), float32 or bfloat16, per-step seeding, the stop request, divergence checks,
validation, checkpoints that survive `kill -9` and resume exactly, metrics, the progress bar and
the loss plot.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import yaml
from mlx.utils import tree_flatten, tree_map
from tqdm import tqdm

from appleslm.atomic import atomic_write
from appleslm.blas import blas_in_use
from appleslm.config import LoopConfig
from appleslm.errors import AppleslmError
from appleslm.train.checkpoint import (
    list_checkpoints,
    remove_interrupted,
    restore_latest,
    save_checkpoint,
    state_is_finite,
)
from appleslm.train.losses import to_mx
from appleslm.train.metrics import MetricsLog, paused, plot_losses, train_record
from appleslm.train.optim import build_optimizer

RUN_RECORD = "config.yaml"
MODEL_DIR = "model"
DIVERGED_LOSS = 100.0  # nats per token (a probability of e^-100): no model, whatever the vocab
# One step that moves the weights by more than twice their own norm has blown them up (even to
# finite values). Healthy AdamW steps move them by a few percent; Adam's first steps, of about
# lr per weight, reach 0.5 only at lr 1e-2 on the usual 0.02-scale initialisation.
MAX_UPDATE_RATIO = 2.0


class TrainingError(AppleslmError, RuntimeError):
    """Training cannot go on (diverged, bad run directory); the last good checkpoint is kept."""


def is_sound(loss: float, grad_norm: float) -> bool:
    """A step whose loss and gradient are finite and whose loss is not absurd."""
    return math.isfinite(loss) and math.isfinite(grad_norm) and loss < DIVERGED_LOSS


def update_ratio(before: Any, after: Any) -> mx.array:
    """||after - before|| / ||before|| over every trainable weight."""
    pairs = zip(tree_flatten(before), tree_flatten(after))
    moved = [((b2 - b1).astype(mx.float32) ** 2).sum() for (_, b1), (_, b2) in pairs]
    size = [(w.astype(mx.float32) ** 2).sum() for _, w in tree_flatten(before)]
    return mx.sqrt(mx.stack(moved).sum() / (mx.stack(size).sum() + 1e-30))


def safe_exp(x: float) -> float:
    """exp(x), or inf where it overflows: the perplexity of a diverged model is not an error."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


@dataclass
class StepBatch:
    micro: list[dict[str, np.ndarray]]  # this rank's micro-batches, `grad_accum` of them
    tokens: int  # tokens the whole step trains on, over every rank


@dataclass
class RunSummary:
    """What the loop knows when it hands the finished model to the task to save."""

    steps: int
    tokens_seen: int
    val_loss: float | None
    val_tokens: int
    val_loss_before: float | None
    seconds: float
    processes: int


@dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path | None
    step: int
    tokens_seen: int
    val_loss: float | None
    val_loss_before: float | None = None
    interrupted: bool = False
    already_done: bool = False  # the run had finished before; nothing was trained
    notes: list[str] = field(default_factory=list)  # e.g. skipped bad records

    @property
    def val_ppl(self) -> float | None:
        return safe_exp(self.val_loss) if self.val_loss is not None else None


class Task(Protocol):
    """What a kind of training (pretraining, fine-tuning) tells the loop."""

    kind: str  # "pretraining", "fine-tuning": logs and provenance
    eval_label: str  # what the validation loss is, e.g. "held-out assistant-token loss"
    evaluate_first: bool  # measure the starting model before the first step (fine-tuning)
    model: nn.Module

    def run_record(self) -> dict[str, Any]:
        """The run's settings, written to config.yaml."""

    def resume_problem(self, saved: dict[str, Any]) -> str | None:
        """Why the run recorded as `saved` cannot be resumed with this task, or None."""

    def setup(
        self, rank: int, world: int, sync: Callable[[], None], log: Callable[[str], None]
    ) -> None:
        """Read the data and build the model (after the run directory checks passed); `sync`
        waits for every rank (rank 0 may prepare a cache the others then read)."""

    def describe(self) -> str:
        """One line for the log: the model and the data."""

    def step_batch(self, step: int) -> StepBatch:
        """This rank's micro-batches for optimizer step `step` (0-based), in order."""

    def eval_batches(self) -> Iterable[dict[str, np.ndarray]]:
        """This rank's share of the validation batches (may be empty)."""

    def has_validation(self) -> bool: ...

    def eval_size(self) -> str:
        """What validation runs over, for the notice before the first one ("61,440 held-out
        tokens")."""

    def train_loss(
        self, model: nn.Module, batch: dict[str, mx.array]
    ) -> tuple[mx.array, mx.array, dict[str, mx.array]]:
        """(summed loss, number of predicted tokens, raw auxiliary terms to log): what the loop
        differentiates (compiled)."""

    def eval_loss(self, model: nn.Module, batch: dict[str, mx.array]) -> tuple[mx.array, mx.array]:
        """(summed loss, number of predicted tokens) that validation reports."""

    def state_dict(self) -> dict[str, Any]:
        """What an exact resume needs beyond the weights (e.g. the data stream's position)."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def save_model(self, out_dir: Path, summary: RunSummary) -> Path:
        """Write the final model directory."""


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


def run_state(run_dir: Path) -> str:
    """ "finished" (a final model), "started" (a checkpoint) or "new". A folder with a record but
    no checkpoint is new: a start that failed before its first checkpoint trained nothing."""
    if (run_dir / MODEL_DIR / "appleslm.json").exists() and (run_dir / RUN_RECORD).exists():
        return "finished"
    if list_checkpoints(run_dir / "checkpoints"):
        return "started"
    return "new"


def read_run_record(run_dir: Path) -> dict[str, Any]:
    try:
        saved = yaml.safe_load((run_dir / RUN_RECORD).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise TrainingError(f"{run_dir / RUN_RECORD} cannot be read ({e})") from e
    if not isinstance(saved, dict):
        raise TrainingError(f"{run_dir / RUN_RECORD} is not a run record")
    return saved


class Trainer:
    def __init__(
        self,
        task: Task,
        cfg: LoopConfig,
        run_dir: str | Path,
        *,
        resume: bool = False,
        progress: bool = True,
        verbose: bool = False,
        log: Callable[[str], None] = tqdm.write,
    ):
        self.task, self.cfg, self.run_dir, self.progress = task, cfg, Path(run_dir), progress
        self.verbose = verbose
        self.group = mx.distributed.init()
        self.rank, self.world = self.group.rank(), self.group.size()
        self.log = log if self.rank == 0 else (lambda message: None)
        if cfg.batch_size % (self.world * cfg.grad_accum):
            raise TrainingError(
                f"batch_size {cfg.batch_size} must be a multiple of "
                f"processes x grad_accum = {self.world} x {cfg.grad_accum}"
            )
        self.checkpoints = self.run_dir / "checkpoints"
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self.step, self.tokens_seen, self.seconds = 0, 0, 0.0
        self.val_loss_before: float | None = None
        self.evaluated = False  # in this process: the first evaluation gets a notice
        self.aux: dict[str, float] = {}  # the last step's auxiliary terms (MoE), for the metrics
        self.already_done = self.check_run_dir(resume)
        if self.already_done:
            return
        mx.random.seed(cfg.seed)  # model initialisation and LoRA adapters
        task.setup(self.rank, self.world, self.barrier, self.log)
        if cfg.dtype == "bfloat16":
            if getattr(self.model.args, "num_experts", 0) and not mx.metal.is_available():
                raise TrainingError(
                    "dtype bfloat16 with a mixture of experts needs a Mac's GPU: MLX's CPU "
                    "gather_mm, which the experts use, multiplies float32 only; train it in "
                    "float32 here"
                )
            self.model.set_dtype(mx.bfloat16)
        self.optimizer = build_optimizer(cfg)
        self.optimizer.init(self.model.trainable_parameters())
        mx.eval(self.model.parameters(), self.optimizer.state)
        if self.rank == 0:
            self.check_before_training()
        if resume:
            self.restore()
        if self.rank == 0:
            self.metrics.truncate_after(self.step)
            atomic_write(
                self.run_dir / RUN_RECORD, yaml.safe_dump(task.run_record(), sort_keys=False)
            )
        self.compute_grads, self.clip, self.update, self.eval_sums = self.build_steps()

    @property
    def model(self) -> nn.Module:
        return self.task.model

    # the run directory

    def check_run_dir(self, resume: bool) -> bool:
        """Apply the resume rules before anything is read or written; True if already done."""
        state = run_state(self.run_dir)
        record = self.task.run_record()
        if state == "new":
            if resume:
                self.log(f"{self.run_dir} holds no checkpoint yet: starting from step 0")
            return False
        saved = read_run_record(self.run_dir) if (self.run_dir / RUN_RECORD).exists() else {}
        problem = self.task.resume_problem(saved)
        if state == "finished" and (
            saved == record or (resume and not problem and self.finished_steps() >= self.cfg.steps)
        ):
            self.log(
                f"{self.run_dir} already holds this finished run: its model is "
                f"{self.run_dir / MODEL_DIR}"
            )
            return True
        if problem:
            verb = "resume" if resume else "start a new run in"
            raise TrainingError(f"cannot {verb} {self.run_dir}: {problem}; choose another --out")
        if not resume:
            what = (
                "a finished run with other settings"
                if state == "finished"
                else (f"an unfinished run (step {self.finished_steps()})")
            )
            raise TrainingError(
                f"{self.run_dir} already holds {what}: pass --resume to continue it, or choose "
                "another --out"
            )
        return False

    def finished_steps(self) -> int:
        found = list_checkpoints(self.checkpoints)
        return found[-1].step if found else 0

    def check_before_training(self) -> None:
        """What can fail later is checked now, before any step is spent."""
        if self.task.has_validation():
            next(iter(self.task.eval_batches()), None)  # raises if the split is too small

    def restore(self) -> None:
        if self.rank == 0:  # another rank removing them first would do it unheard
            remove_interrupted(self.checkpoints, self.log)
        checkpoint = restore_latest(self.checkpoints, self.model, self.optimizer, self.log)
        if checkpoint is None:
            self.log(f"{self.run_dir} holds no checkpoint yet: starting from step 0")
            return
        self.task.load_state_dict(checkpoint.state)
        self.step, self.tokens_seen = checkpoint.step, checkpoint.state["tokens_seen"]
        self.seconds = checkpoint.state.get("seconds", 0.0)
        self.val_loss_before = checkpoint.state.get("val_loss_before")
        self.log(f"resumed from {checkpoint.path} at step {self.step}")

    # the compiled step

    def build_steps(self):
        model, optimizer, cfg, group = self.model, self.optimizer, self.cfg, self.group
        loss_and_grad = nn.value_and_grad(model, self.task.train_loss)
        state = [model.state, optimizer.state]

        def compute_grads(batch):
            (total, count, aux), grads = loss_and_grad(model, batch)
            return total, count, aux, grads

        def clip(grads, scale):
            # The gradient of the summed loss, over every rank, times world / tokens: the
            # gradient of the mean over all the step's tokens, however they were split.
            grads = nn.average_gradients(grads, group=group)
            grads = tree_map(lambda g: g * scale.astype(g.dtype), grads)
            return optim.clip_grad_norm(grads, cfg.grad_clip)

        def update(grads):
            optimizer.update(model, grads)

        def eval_sums(batch):
            return self.task.eval_loss(model, batch)

        if not cfg.compile:
            return compute_grads, clip, update, eval_sums
        compiled = partial(mx.compile, inputs=state, outputs=state)
        return (
            compiled(compute_grads),
            mx.compile(clip),
            compiled(update),
            mx.compile(eval_sums, inputs=state),
        )

    def barrier(self) -> None:
        if self.world > 1:
            mx.eval(mx.distributed.all_sum(mx.array(1.0), group=self.group))

    def all_sum(self, *values: mx.array) -> list[mx.array]:
        if self.world == 1:
            return list(values)
        summed = mx.distributed.all_sum(mx.stack(values), group=self.group)
        return [summed[i] for i in range(len(values))]

    def gradients(self, batch: StepBatch) -> tuple[float, float, Any]:
        """(mean loss, gradient norm, clipped gradients) of a batch at the current weights; the
        auxiliary terms' means over the step land in `self.aux` for the metrics."""
        # Any randomness inside a step then depends only on (seed, step): resume stays exact.
        mx.random.seed(self.cfg.seed * 1_000_003 + self.step)
        total = count = grads = aux = None
        for micro in batch.micro:
            t, c, a, g = self.compute_grads(to_mx(micro))
            total = t if total is None else total + t
            count = c if count is None else count + c
            aux = a if aux is None else tree_map(mx.add, aux, a)
            grads = g if grads is None else tree_map(mx.add, grads, g)
        total, count, *terms = self.all_sum(total, count, *aux.values())
        grads, norm = self.clip(grads, self.world / count)
        loss = total / count
        mx.eval(loss, norm, grads, terms)
        parts = len(batch.micro) * self.world
        self.aux = {name: value.item() / parts for name, value in zip(aux, terms)}
        return loss.item(), norm.item(), grads

    def train_step(self, batch: StepBatch) -> tuple[float, float]:
        """One optimizer step (for benchmarks; the loop interleaves checkpoints with it)."""
        loss, norm, grads = self.gradients(batch)
        self.apply(grads)
        return loss, norm

    def apply(self, grads: Any) -> float:
        """Update the weights; returns the update's size relative to the weights' norm."""
        before = self.model.trainable_parameters()
        self.update(grads)
        ratio = update_ratio(before, self.model.trainable_parameters())
        mx.eval(self.model.state, self.optimizer.state, ratio)
        return ratio.item()

    def check_step(self, loss: float, grad_norm: float, ratio: float = 0.0) -> None:
        """Stop a diverged run before anything is saved, so the last checkpoint stays good."""
        if is_sound(loss, grad_norm) and ratio <= MAX_UPDATE_RATIO:
            return
        found = list_checkpoints(self.checkpoints)
        if self.rank == 0:  # what is logged past the last good state belongs to no run
            self.metrics.truncate_after(found[-1].step if found else 0)
        kept = (
            f"The last good checkpoint is {found[-1].path} (step {found[-1].step}): lower the "
            "learning rate (lr) or raise warmup_steps, then continue it with --resume"
            if found
            else "No checkpoint was written: lower the learning rate (lr) or raise warmup_steps "
            "and start again"
        )
        what = (
            f"the update moved the weights by {ratio:.3g}x their norm"
            if ratio > MAX_UPDATE_RATIO
            else f"loss became {loss:.4g} (gradient norm {grad_norm:.4g})"
        )
        raise TrainingError(
            f"the run diverged: {what} at step {self.step + 1}; stopping without saving. {kept}."
        )

    # validation

    def validate(self) -> tuple[float | None, int]:
        """Mean loss per predicted token over the held-out batches, and how many tokens."""
        if not self.task.has_validation():
            return None, 0
        total, count = mx.array(0.0), mx.array(0.0)
        for batch in self.task.eval_batches():
            t, c = self.eval_sums(to_mx(batch))
            total, count = total + t, count + c
        total, count = self.all_sum(total, count)
        n = int(count.item())
        return (total.item() / n if n else None), n

    def evaluate(self) -> float | None:
        if not self.evaluated and self.task.has_validation():
            self.log(f"evaluating on {self.task.eval_size()}...")
        self.evaluated = True
        val_loss, n = self.validate()
        if val_loss is not None:
            self.record(
                {
                    "kind": "eval",
                    "step": self.step,
                    "val_loss": val_loss,
                    "val_ppl": safe_exp(val_loss),
                    "val_tokens": n,
                }
            )
            self.log(
                f"step {self.step}: {self.task.eval_label} {val_loss:.4f}, "
                f"perplexity {safe_exp(val_loss):.2f} ({n:,} held-out tokens)"
            )
        return val_loss

    # checkpoints and records

    def snapshot(self) -> dict[str, Any]:
        """What a checkpoint of the current step records beyond the weights (taken now, written
        once a gradient at these weights has shown they are sound)."""
        return {
            **self.task.state_dict(),
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "seconds": self.seconds,
            "val_loss_before": self.val_loss_before,
        }

    def checkpoint(self, snapshot: dict[str, Any]) -> bool:
        """Write the current weights as the checkpoint of `snapshot`'s step, if they are
        finite (moments included); the loop calls this only after a finite gradient at them."""
        if not state_is_finite(self.model, self.optimizer):
            self.log(f"step {snapshot['step']}: the weights are not finite; not saved")
            return False
        if self.rank == 0:
            state = {k: v for k, v in snapshot.items() if k != "step"}
            save_checkpoint(
                self.checkpoints,
                snapshot["step"],
                self.model,
                self.optimizer,
                state,
                keep=self.cfg.keep_checkpoints,
            )
        return True

    def record(self, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        self.metrics.append(record)
        if record["kind"] == "eval":  # plotting costs ~0.1 s: once per evaluation is enough
            plot_losses(self.metrics.records(), self.run_dir / "loss.png", self.run_dir.name)

    # the loop

    def fit(self) -> tuple[float | None, bool]:
        """Train to `cfg.steps`; returns (last validation loss, whether a stop was requested).

        A checkpoint of step N is written during step N + 1, once the gradient at the weights
        of step N has come out finite and before they are updated: an update that blows the
        weights up (even to finite values) is thus never saved.
        """
        cfg = self.cfg
        blas = blas_in_use(self.verbose)
        self.log(f"{self.task.describe()}; BLAS: {blas}; {self.world} process(es)")
        if self.step == 0 and self.task.evaluate_first:
            self.val_loss_before = self.evaluate()
        evals = [r["val_loss"] for r in self.metrics.records() if r["kind"] == "eval"]
        val_loss = evals[-1] if evals and self.step > 0 else None
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            unit="step",
            dynamic_ncols=True,
            disable=not self.progress or self.rank != 0,
        )
        window_start, window_tokens = time.perf_counter(), 0
        pending, batch = None, None
        with StopRequest() as stop:
            while self.step < cfg.steps and not stop.requested:
                started = time.perf_counter()
                batch = self.task.step_batch(self.step)
                loss, norm, grads = self.gradients(batch)
                if pending is not None and is_sound(loss, norm):
                    self.checkpoint(pending)
                pending = None
                self.check_step(loss, norm)
                self.check_step(loss, norm, self.apply(grads))
                self.step += 1
                self.tokens_seen += batch.tokens
                window_tokens += batch.tokens
                self.seconds += time.perf_counter() - started
                last = self.step == cfg.steps
                if self.step % cfg.log_every == 0 or last:
                    elapsed = time.perf_counter() - window_start
                    lr = self.optimizer.optimizers[0].learning_rate.item()
                    record = train_record(
                        self.step, loss, norm, lr, self.tokens_seen, window_tokens, elapsed
                    )
                    self.record(record | self.aux)
                    bar.set_postfix(
                        loss=f"{loss:.3f}",
                        tok_s=f"{record['tok_per_s']:.0f}",
                        mem=f"{record['peak_memory_gb']:.2f}GB",
                    )
                    window_start, window_tokens = time.perf_counter(), 0
                if self.step % cfg.eval_every == 0 or last:
                    with paused(bar):  # the time spent validating is no part of the step rate
                        val_loss = self.evaluate()
                    window_start = time.perf_counter()
                if self.world > 1:  # all ranks stop at one step, whichever saw the signal
                    stop.requested = self.all_sum(mx.array(float(stop.requested)))[0].item() > 0
                if self.step % cfg.save_every == 0 or last or stop.requested:
                    pending = self.snapshot()
                bar.update(1)
            bar.close()
            saved = False
            if pending is not None:  # the last step's weights: one more gradient to vouch for them
                loss, norm, _ = self.gradients(batch)
                self.check_step(loss, norm)
                saved = self.checkpoint(pending)
            if stop.requested:
                where = "checkpoint saved" if saved else "nothing new to save"
                self.log(f"stopped at step {self.step}; {where}. Continue with --resume.")
        return val_loss, stop.requested

    def run(self) -> TrainResult:
        if self.already_done:
            return TrainResult(
                self.run_dir,
                self.run_dir / MODEL_DIR,
                self.finished_steps(),
                0,
                None,
                already_done=True,
            )
        val_loss, interrupted = self.fit()
        if interrupted:
            return TrainResult(
                self.run_dir,
                None,
                self.step,
                self.tokens_seen,
                val_loss,
                self.val_loss_before,
                interrupted=True,
            )
        self.check_ranks_in_sync()
        val_tokens = None
        if val_loss is None:  # on every rank: validation all-reduces, rank 0 cannot do it alone
            val_loss, val_tokens = self.validate()
        model_dir = self.save_final_model(val_loss, val_tokens) if self.rank == 0 else None
        return TrainResult(
            self.run_dir, model_dir, self.step, self.tokens_seen, val_loss, self.val_loss_before
        )

    def save_final_model(self, val_loss: float | None, n: int | None = None) -> Path:
        """Write the final model; `n` is how many tokens `val_loss` was measured on (None: those
        of the run's last recorded evaluation)."""
        if n is None:
            evals = [r for r in self.metrics.records() if r["kind"] == "eval"]
            n = evals[-1].get("val_tokens", 0) if evals else 0
        if val_loss is not None and not val_loss < DIVERGED_LOSS:
            raise TrainingError(
                f"the final model's validation loss is {val_loss:.4g}: it "
                "diverged, so it is not saved"
            )
        summary = RunSummary(
            self.step, self.tokens_seen, val_loss, n, self.val_loss_before, self.seconds, self.world
        )
        model_dir = self.task.save_model(self.run_dir / MODEL_DIR, summary)
        ppl = f" (validation perplexity {safe_exp(val_loss):.2f})" if val_loss is not None else ""
        self.log(f"model saved to {model_dir}{ppl}")
        return model_dir

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
