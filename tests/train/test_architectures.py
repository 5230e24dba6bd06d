"""The architecture options through the training loop: the byte table comes from the run's own
tokenizer, the MoE auxiliary terms are trained and logged and keep the experts in use, the byte
head's two losses train, LoRA leaves the router alone, and what the CPU cannot do is refused."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from appleslm.config import DataConfig, RunConfig, TrainConfig
from appleslm.data import prepare_data
from appleslm.io.model_dir import load_model
from appleslm.models import ModelArgs
from appleslm.train.pretrain import train
from appleslm.train.sft import lora_keys
from appleslm.train.trainer import TrainingError
from tests.helpers import MICRO_MODEL, SMALL_BYTES

MICRO_MOE = dict(MICRO_MODEL, hidden_size=64, intermediate_size=64, num_experts=4)


def micro_run(root: Path, corpus_dir, token_cache, model: dict, **train_settings) -> Path:
    settings = dict(
        steps=6,
        batch_size=8,
        seq_len=32,
        lr=3e-3,
        warmup_steps=5,
        eval_every=6,
        eval_batches=4,
        save_every=6,
        log_every=1,
    )
    settings.update(train_settings)
    cfg = RunConfig(
        model=ModelArgs(**model),
        data=DataConfig(source=str(corpus_dir), cache_dir=str(token_cache)),
        train=TrainConfig(**settings),
    )
    return train(cfg, root, progress=False).model_dir


def expert_shares(model_dir: Path, corpus_dir, token_cache) -> np.ndarray:
    """(MoE layers, E) share of held-out token assignments per expert."""
    model, _ = load_model(model_dir)
    data = prepare_data(
        DataConfig(source=str(corpus_dir), cache_dir=str(token_cache), tokenizer=str(model_dir)),
        model.args.vocab_size,
    )
    held_out = np.asarray(data.val[: 32 * 256]).reshape(-1, 32)
    return np.array(model.router_load(mx.array(held_out)))


def test_the_auxiliary_loss_keeps_every_expert_in_use(tmp_path, corpus_dir, token_cache):
    experts = MICRO_MOE["num_experts"]
    low, high = 0.5 / experts, 2 / experts
    long_run = dict(steps=200, eval_every=200, save_every=200, log_every=10)
    balanced = micro_run(
        tmp_path / "aux",
        corpus_dir,
        token_cache,
        dict(MICRO_MOE, router_aux_loss_coef=0.1),
        **long_run,
    )
    shares = expert_shares(balanced, corpus_dir, token_cache)
    assert shares.min() >= low and shares.max() <= high, shares  # measured: 0.23-0.28
    # Without it, the same run lets an expert all but die: the loss is what keeps them in use.
    free = micro_run(
        tmp_path / "free",
        corpus_dir,
        token_cache,
        dict(MICRO_MOE, router_aux_loss_coef=0.0),
        **long_run,
    )
    assert expert_shares(free, corpus_dir, token_cache).min() < low  # measured: 0.009
    records = [json.loads(line) for line in (tmp_path / "aux" / "metrics.jsonl").open()]
    logged = [r for r in records if r["kind"] == "train"]
    assert all("router_balance" in r and "router_z" in r for r in logged)
    assert abs(logged[-1]["router_balance"] - 1.0) < 0.1  # E * sum f_i P_i is 1 when balanced


def test_a_byte_model_reads_its_byte_table_from_the_runs_tokenizer(
    tmp_path, corpus_dir, token_cache
):
    byte_model = dict(
        MICRO_MODEL, **SMALL_BYTES, embedding="bytes", head="bytes", tie_word_embeddings=False
    )
    model_dir = micro_run(tmp_path / "bytes", corpus_dir, token_cache, byte_model)
    model, tokenizer = load_model(model_dir)
    ids = tokenizer.encode(" Congress", add_special_tokens=False)
    for token in ids:  # each id's row is its UTF-8 bytes, padded
        text = tokenizer.decode([token]).encode()
        row = np.array(model.token_bytes[token]).tolist()
        assert row[: len(text)] == list(text[: len(row)]) and set(row[len(text) :]) <= {256}
    assert model.token_bytes.dtype == mx.int32


@pytest.mark.parametrize("mode", ["clean", "faithful"])
def test_both_byte_head_losses_train_and_validate_in_nats_per_token(
    mode, tmp_path, corpus_dir, token_cache
):
    head = dict(
        MICRO_MODEL, **SMALL_BYTES, head="bytes", byte_head_loss=mode, tie_word_embeddings=False
    )
    run = tmp_path / mode
    micro_run(run, corpus_dir, token_cache, head, steps=30, eval_every=30, save_every=30)
    records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert losses[-1] < losses[0] - 0.2  # it learns
    (val,) = [r["val_loss"] for r in records if r["kind"] == "eval"]
    # Validation is token-level cross-entropy in both modes; the faithful training loss is per
    # byte slot, a different (smaller) number.
    assert 0 < val < np.log(512) + 3
    if mode == "faithful":
        assert losses[-1] < val


def test_lora_adapts_the_experts_and_a_shared_ffn_but_not_the_router(tiny_args_factory):
    moe = tiny_args_factory(num_experts=4)
    keys = lora_keys(moe, embeddings=True)
    assert {"mlp.experts.gate_proj", "mlp.experts.up_proj", "mlp.experts.down_proj"} <= keys
    assert not any(key.endswith("router") for key in keys)
    shared = lora_keys(tiny_args_factory(share_ffn=True), embeddings=False)
    assert {"shared_mlp.gate_proj", "shared_mlp.up_proj", "shared_mlp.down_proj"} <= shared


def test_moe_in_bfloat16_on_the_cpu_is_refused_before_any_step(tmp_path, corpus_dir, token_cache):
    if mx.metal.is_available():
        pytest.skip("the GPU multiplies experts in bfloat16")
    with pytest.raises(TrainingError, match="bfloat16 with a mixture of experts"):
        micro_run(tmp_path / "bf16", corpus_dir, token_cache, MICRO_MOE, dtype="bfloat16")
    assert not (tmp_path / "bf16" / "checkpoints").exists()


@pytest.fixture
def tiny_args_factory():
    from appleslm.models import Model
    from tests.helpers import tiny_args

    return lambda **overrides: Model(tiny_args(**overrides))
