"""Chat fine-tuning: supervised training on conversations, loss on the assistant's tokens only.

Full fine-tuning trains every weight; LoRA (mlx-lm's LoRA layers on the attention and MLP
projections of the last `lora_layers` unique blocks, and on the embedding table / output head)
trains small adapters on a frozen base and fuses them into the weights at the end. Either way
the result is an ordinary model directory (run_dir/model) that carries its chat template and
stops at `<|im_end|>`, so chat, quantize, export and stock mlx-lm load it like any other.

It reuses pretraining's pieces: the AdamW + warmup/cosine optimizer, the compiled-step pattern,
atomic checkpoints with exact resume, metrics.jsonl + loss.png, the progress bar and Ctrl-C
handling. Single process only (no data parallel).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import yaml
from mlx.utils import tree_flatten, tree_unflatten
from tqdm import tqdm

from appleslm.blas import blas_in_use
from appleslm.config import TrainConfig
from appleslm.data.chat import (
    ChatData,
    ChatRenderer,
    TokenizedConversation,
    batch_indices,
    load_chat_data,
    pad_batch,
)
from appleslm.io.hub import resolve_model
from appleslm.io.model_dir import (
    TOKENIZER_FILES,
    load_model,
    read_config,
    read_provenance,
    save_model_dir,
)
from appleslm.train.checkpoint import latest_checkpoint, restore_checkpoint, save_checkpoint
from appleslm.train.evaluate import context_length
from appleslm.train.loop import StopRequest, TrainingError, check_finite, model_inputs
from appleslm.train.metrics import MetricsLog, plot_losses, train_record
from appleslm.train.optim import build_optimizer


@dataclass
class SFTConfig:
    lora: bool = False
    lora_rank: int = 8
    lora_scale: float = 20.0  # mlx-lm's default: the update is scale * (x @ A) @ B
    lora_layers: int | None = None  # adapt the last N unique blocks; None: all of them
    lora_embeddings: bool = True  # also adapt the embedding table / output head
    steps: int = 200
    batch_size: int = 8
    # Peak learning rate. Measured on the `tiny` preset (200 steps, chatterbot): full 1e-4 took
    # held-out assistant loss 7.58 -> 5.49, full 1e-3 -> 4.09, LoRA 1e-3 -> 4.29.
    lr: float = 1e-3
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_seq_len: int | None = None  # longest conversation in tokens; None: the model's context
    val_fraction: float = 0.1  # held out when the data has no valid.jsonl
    seed: int = 0
    on_error: str = "skip"  # bad records: "skip" (reported) or "refuse" (nothing trains)
    eval_every: int = 50
    save_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 10
    compile: bool = True

    def train_config(self) -> TrainConfig:
        """The pretraining config the shared optimizer builder reads."""
        return TrainConfig(
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            min_lr_ratio=self.min_lr_ratio,
            warmup_steps=min(self.warmup_steps, max(0, self.steps - 1)),
            weight_decay=self.weight_decay,
            grad_clip=self.grad_clip,
            seed=self.seed,
            compile=self.compile,
        )


@dataclass
class SFTResult:
    run_dir: Path
    model_dir: Path | None
    step: int
    val_loss_before: float | None  # mean assistant-token loss on held-out conversations
    val_loss_after: float | None
    data: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # "path:line: why" of each bad record
    interrupted: bool = False


def masked_loss_sums(
    model: nn.Module, x: mx.array, y: mx.array, mask: mx.array, *unique: mx.array
) -> tuple[mx.array, mx.array]:
    """(sum of cross-entropy over masked targets, number of masked targets)."""
    embeddings = model.embed_unique(*unique) if unique else None
    logits = model(x) if embeddings is None else model(x, input_embeddings=embeddings)
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), y, reduction="none")
    return (ce * mask).sum(), mask.sum()


def masked_loss(
    model: nn.Module, x: mx.array, y: mx.array, mask: mx.array, *unique: mx.array
) -> mx.array:
    """Mean cross-entropy over the batch's assistant tokens: sum(ce * mask) / sum(mask)."""
    total, count = masked_loss_sums(model, x, y, mask, *unique)
    return total / count


def batch_arrays(model: nn.Module, batch: list[TokenizedConversation]) -> tuple[mx.array, ...]:
    """(x, y, mask[, unique ids, inverse]) for the loss: a Leviathan model also gets the batch's
    distinct ids, as in pretraining."""
    x, y, mask = pad_batch(batch)
    if getattr(getattr(model, "args", None), "embedding", None) == "leviathan":
        _, _, unique, inverse = model_inputs(model, x, y)
        return mx.array(x), mx.array(y), mx.array(mask), unique, inverse
    return mx.array(x), mx.array(y), mx.array(mask)


def lora_keys(model: nn.Module, embeddings: bool) -> set[str]:
    """What to adapt: every linear layer inside a block (by its path within the block) and,
    with `embeddings`, the top-level input embedding and output head.

    The embeddings matter for a model pretrained here: `<|im_start|>` and `<|im_end|>` never
    occurred in its pretraining text, so their rows are still at initialisation, and without an
    adapter on the (tied) table the model can hardly learn to emit `<|im_end|>`.
    """
    keys = {
        path
        for block in model.layers
        for path, module in block.named_modules()
        if isinstance(module, (nn.Linear, nn.QuantizedLinear))
    }
    if embeddings:
        top = dict(model.children())
        keys |= {
            name
            for name in ("embed_tokens", "lm_head")
            if isinstance(top.get(name), (nn.Embedding, nn.QuantizedEmbedding, nn.Linear))
        }
    return keys


def add_lora(model: nn.Module, cfg: SFTConfig) -> None:
    """Freeze the model and wrap the chosen layers (`lora_keys`) of the last `lora_layers`
    unique blocks with mlx-lm's LoRA adapters.

    `model.layers` lists unique blocks, so a shared block gets one adapter that every execution
    of it uses (wrapping the executed view would wrap the same block twice).
    """
    from mlx_lm.tuner.utils import linear_to_lora_layers

    blocks = len(model.layers)
    n = blocks if cfg.lora_layers is None else min(cfg.lora_layers, blocks)
    if n < 1:
        raise TrainingError(f"lora_layers must be at least 1, got {cfg.lora_layers}")
    model.freeze()
    config = {
        "rank": cfg.lora_rank,
        "scale": cfg.lora_scale,
        "dropout": 0.0,
        "keys": lora_keys(model, cfg.lora_embeddings),
    }
    linear_to_lora_layers(model, n, config)


def fuse_lora(model: nn.Module) -> None:
    """Merge every adapter into its base weight (W + scale * B^T A^T), as mlx-lm's fuse does."""
    fused = [
        (name, module.fuse()) for name, module in model.named_modules() if hasattr(module, "fuse")
    ]
    if fused:
        model.update_modules(tree_unflatten(fused))


def trainable_count(model: nn.Module) -> int:
    return sum(p.size for _, p in tree_flatten(model.trainable_parameters()))


class SFTTrainer:
    def __init__(
        self,
        model_spec: str | Path,
        data: str | Path,
        run_dir: str | Path,
        cfg: SFTConfig | None = None,
        *,
        resume: bool = False,
        progress: bool = True,
        trust_remote_code: bool = False,
        log: Callable[[str], None] = tqdm.write,
    ):
        self.cfg = cfg = cfg or SFTConfig()
        self.model_spec, self.run_dir = model_spec, Path(run_dir)
        self.progress, self.log = progress, log
        self.source_dir = resolve_model(model_spec)
        if "quantization" in read_config(self.source_dir) and not cfg.lora:
            raise TrainingError(
                f"{self.source_dir} is quantized: full fine-tuning needs the float model "
                "(or fine-tune this one with --lora)"
            )
        self.model, tokenizer = load_model(self.source_dir, trust_remote_code=trust_remote_code)
        self.renderer = ChatRenderer(tokenizer)
        self.max_seq_len = cfg.max_seq_len or context_length(self.model)
        self.data: ChatData = load_chat_data(
            data,
            self.renderer,
            self.max_seq_len,
            on_error=cfg.on_error,
            val_fraction=cfg.val_fraction,
            seed=cfg.seed,
        )
        self.prepare_run_dir(str(data), resume)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self.checkpoints = self.run_dir / "checkpoints"

        mx.random.seed(cfg.seed)  # LoRA's A matrices are random
        if cfg.lora:
            add_lora(self.model, cfg)
        self.optimizer = build_optimizer(cfg.train_config())
        self.optimizer.init(self.model.trainable_parameters())
        mx.eval(self.model.parameters(), self.optimizer.state)
        self.step, self.tokens_seen = 0, 0
        self.val_loss_before: float | None = None
        checkpoint = latest_checkpoint(self.checkpoints) if resume else None
        if checkpoint is not None:
            restore_checkpoint(checkpoint, self.model, self.optimizer)
            self.step = checkpoint.step
            self.tokens_seen = checkpoint.state["tokens_seen"]
            self.val_loss_before = checkpoint.state.get("val_loss_before")
            self.log(f"resumed from {checkpoint.path} at step {self.step}")
        if self.metrics.path.exists():
            self.metrics.truncate_after(self.step)  # a resumed run re-logs what follows
        self.train_step, self.eval_sums = self.build_steps()

    def prepare_run_dir(self, data: str, resume: bool) -> None:
        wanted = {
            "model": str(self.model_spec),
            "data": data,
            "sft": dataclasses.asdict(self.cfg),
        }
        config_file = self.run_dir / "sft.yaml"
        if config_file.exists():
            saved = yaml.safe_load(config_file.read_text()) or {}
            if not resume:
                raise TrainingError(
                    f"{self.run_dir} already holds a fine-tuning run: pass --resume to continue "
                    "it, or choose another --out"
                )
            unchanged = {k: v for k, v in saved.get("sft", {}).items() if k != "steps"}
            for key, value in (("model", saved.get("model")), ("data", saved.get("data"))):
                if value != wanted[key]:
                    raise TrainingError(f"cannot resume {self.run_dir}: its {key} differs")
            if unchanged != {k: v for k, v in wanted["sft"].items() if k != "steps"}:
                raise TrainingError(
                    f"cannot resume {self.run_dir}: its settings differ (only steps may change)"
                )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config_file.write_text(yaml.safe_dump(wanted, sort_keys=False))

    def build_steps(self):
        # The pretraining loop's compiled-step pattern, with the masked loss.
        model, optimizer, cfg = self.model, self.optimizer, self.cfg
        loss_and_grad = nn.value_and_grad(model, masked_loss)
        state = [model.state, optimizer.state]

        def train_step(*batch):
            loss, grads = loss_and_grad(model, *batch)
            grads, norm = optim.clip_grad_norm(grads, cfg.grad_clip)
            optimizer.update(model, grads)
            return loss, norm

        def eval_sums(*batch):
            return masked_loss_sums(model, *batch)

        if not cfg.compile:
            return train_step, eval_sums
        return (
            partial(mx.compile, inputs=state, outputs=state)(train_step),
            mx.compile(eval_sums, inputs=state),
        )

    def validate(self, batch_size: int | None = None) -> float | None:
        """Mean loss per assistant token over every held-out conversation."""
        valid = sorted(self.data.valid, key=lambda c: len(c.ids))  # similar lengths pad less
        if not valid:
            return None
        size = batch_size or self.cfg.batch_size
        total, count = 0.0, 0.0
        for start in range(0, len(valid), size):
            s, n = self.eval_sums(*batch_arrays(self.model, valid[start : start + size]))
            total, count = total + s.item(), count + n.item()
        return total / count

    def batch(self) -> list[TokenizedConversation]:
        indices = batch_indices(len(self.data.train), self.cfg.batch_size, self.step, self.cfg.seed)
        return [self.data.train[i] for i in indices]

    def checkpoint(self) -> None:
        state = {"tokens_seen": self.tokens_seen, "val_loss_before": self.val_loss_before}
        save_checkpoint(
            self.checkpoints,
            self.step,
            self.model,
            self.optimizer,
            state,
            keep=self.cfg.keep_checkpoints,
        )

    def record(self, record: dict[str, Any]) -> None:
        self.metrics.append(record)
        if record["kind"] == "eval":
            plot_losses(self.metrics.records(), self.run_dir / "loss.png", self.run_dir.name)

    def evaluate(self) -> float | None:
        val_loss = self.validate()
        if val_loss is not None:
            self.record(
                {
                    "kind": "eval",
                    "step": self.step,
                    "val_loss": val_loss,
                    "val_ppl": math.exp(val_loss),
                }
            )
            self.log(f"step {self.step}: held-out assistant-token loss {val_loss:.4f}")
        return val_loss

    def fit(self) -> tuple[float | None, bool]:
        """Train to `cfg.steps`; returns (last held-out loss, whether a stop was requested)."""
        cfg = self.cfg
        self.log(
            f"fine-tuning {self.source_dir} ({'LoRA' if cfg.lora else 'full'}: "
            f"{trainable_count(self.model) / 1e6:.3f}M trainable parameters, peak lr "
            f"{cfg.lr:g}; BLAS: {blas_in_use()}) on {self.data.summary()}"
        )
        if self.step == 0:
            self.val_loss_before = self.evaluate()
        evals = [r["val_loss"] for r in self.metrics.records() if r["kind"] == "eval"]
        val_loss = evals[-1] if evals else None  # a resumed run's last measurement
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            disable=not self.progress,
            unit="step",
            dynamic_ncols=True,
        )
        window_start, window_tokens = time.perf_counter(), 0
        with StopRequest() as stop:
            while self.step < cfg.steps and not stop.requested:
                batch = self.batch()
                loss, norm = self.train_step(*batch_arrays(self.model, batch))
                mx.eval(loss, norm, self.model.state, self.optimizer.state)
                loss_value, norm_value = loss.item(), norm.item()
                check_finite(loss_value, norm_value, self.step + 1, self.checkpoints, "lower --lr")
                self.step += 1
                tokens = sum(len(c.ids) for c in batch)
                self.tokens_seen += tokens
                window_tokens += tokens
                last = self.step == cfg.steps
                if self.step % cfg.log_every == 0 or last:
                    elapsed = time.perf_counter() - window_start
                    self.record(
                        train_record(
                            self.step,
                            loss_value,
                            norm_value,
                            self.optimizer.optimizers[0].learning_rate.item(),
                            self.tokens_seen,
                            window_tokens,
                            elapsed,
                        )
                    )
                    bar.set_postfix(
                        loss=f"{loss_value:.3f}", tok_s=f"{window_tokens / elapsed:.0f}"
                    )
                    window_start, window_tokens = time.perf_counter(), 0
                if self.step % cfg.eval_every == 0 or last:
                    val_loss = self.evaluate()
                if self.step % cfg.save_every == 0 or last:
                    self.checkpoint()
                bar.update(1)
            bar.close()
            if stop.requested:
                self.checkpoint()
                self.log(f"stopped at step {self.step}; checkpoint saved. Continue with --resume.")
        return val_loss, stop.requested

    def save_final_model(self, val_loss: float | None) -> Path:
        """Fuse adapters, then write run_dir/model with the chat template and stop tokens."""
        if self.cfg.lora:
            fuse_lora(self.model)
        config = read_config(self.source_dir)
        # Generation must stop at the end of a turn as well as at the end of text.
        config["eos_token_id"] = self.renderer.stop_ids
        provenance = read_provenance(self.source_dir)
        provenance["name"] = self.run_dir.name
        provenance["sft"] = {
            "base_model": str(self.model_spec),
            "method": "lora" if self.cfg.lora else "full",
            "data": self.data.meta,
            "config": dataclasses.asdict(self.cfg),
            "steps": self.step,
            "tokens_seen": self.tokens_seen,
            "val_loss_before": self.val_loss_before,
            "val_loss_after": val_loss,
        }
        with tempfile.TemporaryDirectory() as tokenizer_dir:
            self.write_tokenizer(Path(tokenizer_dir))
            model_dir = save_model_dir(
                self.run_dir / "model",
                self.model,
                tokenizer_dir=tokenizer_dir,
                provenance=provenance,
                config=config,
            )
        self.log(f"model saved to {model_dir}")
        return model_dir

    def write_tokenizer(self, out: Path) -> None:
        """The base model's tokenizer files, with the template the data was rendered with."""
        for name in TOKENIZER_FILES:
            if (self.source_dir / name).exists():
                shutil.copyfile(self.source_dir / name, out / name)
        config_file = out / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        config["chat_template"] = self.renderer.template
        config_file.write_text(json.dumps(config, indent=2) + "\n")
        (out / "chat_template.jinja").write_text(self.renderer.template)
        generation = out / "generation_config.json"
        if generation.exists():  # mlx-lm lets its eos_token_id override config.json's
            values = json.loads(generation.read_text())
            values["eos_token_id"] = self.renderer.stop_ids
            generation.write_text(json.dumps(values, indent=2) + "\n")

    def run(self) -> SFTResult:
        val_loss, interrupted = self.fit()
        skipped = [str(e) for e in self.data.skipped]
        model_dir = None if interrupted else self.save_final_model(val_loss)
        return SFTResult(
            self.run_dir,
            model_dir,
            self.step,
            self.val_loss_before,
            val_loss,
            self.data.meta,
            skipped,
            interrupted,
        )


def default_run_dir(model_spec: str | Path) -> Path:
    """runs/<model name>-chat; a run's `.../tiny/model` is named after its run, `tiny`."""
    path = Path(str(model_spec).rstrip("/"))
    name = path.parent.name if path.name == "model" and path.parent.name else path.name
    return Path("runs") / f"{name}-chat"


def sft(
    model_spec: str | Path,
    data: str | Path,
    out_dir: str | Path,
    cfg: SFTConfig | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    trust_remote_code: bool = False,
) -> SFTResult:
    """Fine-tune `model_spec` on conversations `data` (a JSONL file, a folder with train.jsonl
    and valid.jsonl, or `default`); the chat model lands in out_dir/model."""
    trainer = SFTTrainer(
        model_spec,
        data,
        out_dir,
        cfg,
        resume=resume,
        progress=progress,
        trust_remote_code=trust_remote_code,
    )
    return trainer.run()


def assistant_loss(
    model: nn.Module, conversations: list[TokenizedConversation], batch_size: int = 8
) -> float:
    """Mean loss per assistant token of any model on tokenized conversations (uncompiled)."""
    total, count = 0.0, 0.0
    for start in range(0, len(conversations), batch_size):
        s, n = masked_loss_sums(
            model, *batch_arrays(model, conversations[start : start + batch_size])
        )
        total, count = total + s.item(), count + n.item()
    return total / count
