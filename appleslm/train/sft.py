"""Chat fine-tuning: supervised training on conversations, loss on the assistant's tokens only,
as a task of the one training loop (so it has data parallelism, gradient accumulation, bfloat16,
exact resume and everything else pretraining has).

Full fine-tuning trains every weight; LoRA (mlx-lm's LoRA layers on the attention and MLP
projections of the last `lora_layers` unique blocks, and on the embedding table / output head)
trains small adapters on a frozen base and fuses them into the weights at the end. Either way the
result is an ordinary model directory (run_dir/model) that carries its chat template and stops at
`<|im_end|>`, so chat, quantize, export and stock mlx-lm load it like any other.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from appleslm.blas import hardware
from appleslm.config import LoopConfig, SFTConfig
from appleslm.data.chat import (
    ChatData,
    ChatRenderer,
    TokenizedConversation,
    batch_indices,
    load_chat_data,
    pad_batch,
)
from appleslm.io.files import (
    TOKENIZER_FILES,
    DataRecord,
    Quality,
    TrainingRecord,
    read_config,
    read_provenance,
)
from appleslm.io.model_dir import (
    display_name,
    load_model,
    model_reference,
    resolve_model,
    save_model_dir,
)
from appleslm.models import context_length
from appleslm.train.losses import loss_for, model_batch, to_mx, token_loss
from appleslm.train.trainer import (
    RunSummary,
    StepBatch,
    Trainer,
    TrainingError,
    TrainResult,
    safe_exp,
)

LOOP_FIELDS = {f.name for f in dataclasses.fields(LoopConfig)}


def adaptable(module: nn.Module) -> list[str]:
    """Paths of the linear layers (MoE experts included) inside `module`, the router left out:
    it only chooses experts, and adapting it would reshuffle what the experts learned."""
    kinds = (nn.Linear, nn.QuantizedLinear, SwitchLinear, QuantizedSwitchLinear)
    return [
        path
        for path, sub in module.named_modules()
        if isinstance(sub, kinds) and not path.endswith("router")
    ]


def lora_keys(model: nn.Module, embeddings: bool) -> set[str]:
    """What to adapt: every linear layer inside a block (by its path within the block), a FFN
    shared by all blocks (by its path from the model) and, with `embeddings`, the top-level input
    embedding and output head.

    The embeddings matter for a model pretrained here: `<|im_start|>` and `<|im_end|>` never
    occurred in its pretraining text, so their rows are still at initialisation, and without an
    adapter on the (tied) table the model can hardly learn to emit `<|im_end|>`.
    """
    keys = {path for block in model.layers for path in adaptable(block)}
    shared = getattr(model, "shared_mlp", None)
    if shared is not None:
        keys |= {f"shared_mlp.{path}" for path in adaptable(shared)}
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


def conversation_batch(model: nn.Module, batch: Sequence[TokenizedConversation]) -> dict:
    x, y, mask = pad_batch(batch)
    return model_batch(model, x, y, mask)


class ChatTuning:
    """Fine-tune `model_spec` on the conversations of `data` (see `load_chat_data`)."""

    kind = "fine-tuning"
    eval_label = "held-out assistant-token loss"
    evaluate_first = True
    eval_loss = staticmethod(token_loss)

    def __init__(
        self,
        model_spec: str | Path,
        data: str | Path,
        cfg: SFTConfig,
        run_dir: Path,
        *,
        trust_remote_code: bool = False,
    ):
        self.model_spec, self.data_spec, self.cfg = model_spec, data, cfg
        self.run_dir, self.trust_remote_code = Path(run_dir), trust_remote_code
        self.model: nn.Module | None = None
        self.data: ChatData | None = None

    def run_record(self) -> dict[str, Any]:
        return {
            "model": str(self.model_spec),
            "data": str(self.data_spec),
            "sft": dataclasses.asdict(self.cfg),
        }

    def resume_problem(self, saved: dict[str, Any]) -> str | None:
        wanted = self.run_record()
        for key in ("model", "data"):
            if saved.get(key) != wanted[key]:
                return f"its {key} differs"
        fixed = {k: v for k, v in (saved.get("sft") or {}).items() if k not in LOOP_FIELDS}
        if fixed != {k: v for k, v in wanted["sft"].items() if k not in LOOP_FIELDS}:
            return "its data or LoRA settings differ (only the loop's settings may change)"
        return None

    def setup(self, rank: int, world: int, sync: Callable[[], None], log) -> None:
        cfg = self.cfg
        self.rank, self.world = rank, world
        self.source_dir = resolve_model(self.model_spec)
        if "quantization" in read_config(self.source_dir) and not cfg.lora:
            raise TrainingError(
                f"{self.source_dir} is quantized: full fine-tuning needs the float model "
                "(or fine-tune this one with --lora)"
            )
        self.model, tokenizer = load_model(
            self.source_dir, trust_remote_code=self.trust_remote_code
        )
        self.renderer = ChatRenderer(tokenizer)
        self.max_seq_len = cfg.max_seq_len or min(context_length(self.model) or 512, 2048)
        self.data = load_chat_data(
            self.data_spec,
            self.renderer,
            self.max_seq_len,
            on_error=cfg.on_error,
            val_fraction=cfg.val_fraction,
            seed=cfg.seed,
        )
        if cfg.lora:
            add_lora(self.model, cfg)
        self.train_loss = loss_for(self.model)
        self.per_rank = cfg.batch_size // world

    def describe(self) -> str:
        method = "LoRA" if self.cfg.lora else "full"
        return (
            f"fine-tuning {display_name(self.source_dir)} ({method}: "
            f"{trainable_count(self.model) / 1e6:.3f}M trainable parameters, peak lr "
            f"{self.cfg.lr:g}) on {self.data.summary()}"
        )

    def step_batch(self, step: int) -> StepBatch:
        train = self.data.train
        conversations = [
            train[i] for i in batch_indices(len(train), self.cfg.batch_size, step, self.cfg.seed)
        ]
        mine = conversations[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]
        n = self.per_rank // self.cfg.grad_accum
        micro = [conversation_batch(self.model, mine[i : i + n]) for i in range(0, len(mine), n)]
        return StepBatch(micro, sum(len(c.ids) for c in conversations))

    def has_validation(self) -> bool:
        return bool(self.data.valid)

    def eval_size(self) -> str:
        valid = self.data.valid
        assistant = sum(sum(c.mask) for c in valid)
        return f"{len(valid):,} held-out conversations ({assistant:,} assistant tokens)"

    def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """This rank's share of every held-out conversation, sorted by length (less padding)."""
        valid = sorted(self.data.valid, key=lambda c: len(c.ids))[self.rank :: self.world]
        size = self.per_rank
        return (
            conversation_batch(self.model, valid[i : i + size]) for i in range(0, len(valid), size)
        )

    def state_dict(self) -> dict[str, Any]:
        return {}  # the batches are a function of (seed, step)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def save_model(self, out_dir: Path, summary: RunSummary) -> Path:
        """Fuse adapters, then write the model with the chat template and stop tokens."""
        cfg = self.cfg
        if cfg.lora:
            fuse_lora(self.model)
        config = read_config(self.source_dir)
        # Generation must stop at the end of a turn as well as at the end of text.
        config["eos_token_id"] = self.renderer.stop_ids
        meta = self.data.meta
        stage = TrainingRecord(
            task=self.kind,
            method="lora" if cfg.lora else "full",
            data=DataRecord(
                source=str(self.data_spec),
                name=meta.get("name", str(self.data_spec)),
                licence=meta.get("licence"),
                documents=meta.get("train_conversations"),
                tokenizer=f"the base model's, {meta.get('chat_template')} chat template",
            ),
            steps=summary.steps,
            tokens=summary.tokens_seen,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            dtype=cfg.dtype,
            processes=summary.processes,
            hardware=hardware(),
            seconds=round(summary.seconds, 1),
            val_loss_before=summary.val_loss_before,
            settings=dataclasses.asdict(cfg),
        )
        provenance = read_provenance(self.source_dir)
        provenance.name = self.run_dir.name
        provenance.base_model = model_reference(self.model_spec, self.source_dir)
        provenance.training.append(stage)
        if summary.val_loss is not None:
            provenance.quality = Quality(
                loss=summary.val_loss,
                ppl=safe_exp(summary.val_loss),
                tokens=summary.val_tokens,
                split="assistant tokens of held-out conversations",
            )
        with tempfile.TemporaryDirectory() as tokenizer_dir:
            self.write_tokenizer(Path(tokenizer_dir))
            return save_model_dir(
                out_dir,
                self.model,
                tokenizer_dir=tokenizer_dir,
                provenance=provenance,
                config=config,
                overwrite=True,  # the run's own model, re-made when a finished run continues
            )

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


def sft_trainer(
    model_spec: str | Path,
    data: str | Path,
    run_dir: str | Path,
    cfg: SFTConfig | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    verbose: bool = False,
    trust_remote_code: bool = False,
    log: Callable[[str], None] | None = None,
) -> Trainer:
    """The loop, set up to fine-tune `model_spec` on `data` in `run_dir`."""
    cfg = cfg or SFTConfig()
    task = ChatTuning(model_spec, data, cfg, Path(run_dir), trust_remote_code=trust_remote_code)
    extra = {} if log is None else {"log": log}
    return Trainer(task, cfg, run_dir, resume=resume, progress=progress, verbose=verbose, **extra)


def sft(
    model_spec: str | Path,
    data: str | Path,
    out_dir: str | Path,
    cfg: SFTConfig | None = None,
    **options: Any,
) -> TrainResult:
    """Fine-tune `model_spec` on conversations `data` (a JSONL file, a folder with train.jsonl
    and valid.jsonl, or `default`); the chat model lands in out_dir/model. `options` are
    `sft_trainer`'s (resume, progress, verbose, trust_remote_code)."""
    trainer = sft_trainer(model_spec, data, out_dir, cfg, **options)
    result = trainer.run()
    if not result.already_done:
        result.notes = [str(e) for e in trainer.task.data.skipped]
    return result


def default_run_dir(model_spec: str | Path) -> Path:
    """runs/<model name>-chat; a run's `.../tiny/model` is named after its run, `tiny`."""
    return Path("runs") / f"{display_name(model_spec)}-chat"


def assistant_loss(
    model: nn.Module, conversations: list[TokenizedConversation], batch_size: int = 8
) -> float:
    """Mean loss per assistant token of any model on tokenized conversations (uncompiled)."""
    total, count = 0.0, 0.0
    for start in range(0, len(conversations), batch_size):
        batch = to_mx(conversation_batch(model, conversations[start : start + batch_size]))
        s, n = token_loss(model, batch)
        total, count = total + s.item(), count + n.item()
    return total / count
