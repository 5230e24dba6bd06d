"""Shared fixtures: tiny real models (random weights, real tokenizer) that load everywhere."""

from __future__ import annotations

import json
import lzma
from pathlib import Path

import mlx.core as mx
import pytest
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from appleslm.config import DataConfig, RunConfig, TrainConfig
from appleslm.data.corpus import BUNDLED_CORPUS
from appleslm.io import save_model_dir
from appleslm.models import Model, ModelArgs

MICRO_MODEL = dict(
    vocab_size=512,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    intermediate_size=64,
    max_position_embeddings=64,
)
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SAMPLE_TEXT = (
    "The Congress shall have power to lay and collect taxes, duties, imposts and excises, "
    "to pay the debts and provide for the common defence and general welfare of the United States. "
) * 20


def write_tokenizer(directory: Path, vocab_size: int = 300) -> Path:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([SAMPLE_TEXT], trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "chat_template": CHATML,
            }
        )
    )
    return directory


def tiny_args(**overrides) -> ModelArgs:
    values = dict(
        vocab_size=300,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
    )
    values.update(overrides)
    return ModelArgs(**values)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return write_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A random-weight 2-block appleslm model with a real BPE tokenizer, saved as a model dir."""
    mx.random.seed(0)
    model = Model(tiny_args())
    mx.eval(model.parameters())
    return save_model_dir(
        tmp_path_factory.mktemp("models") / "tiny",
        model,
        tokenizer_dir=tokenizer_dir,
        provenance={"note": "random weights"},
    )


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """Forty State of the Union addresses from the bundled corpus, one file each."""
    root = tmp_path_factory.mktemp("corpus")
    with lzma.open(BUNDLED_CORPUS, "rt") as f:
        for i, line in zip(range(40), f):
            (root / f"{i:03d}.txt").write_text(json.loads(line)["text"])
    return root


@pytest.fixture(scope="session")
def token_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("token-cache")


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory, corpus_dir, token_cache) -> Path:
    """A micro model really trained for a few seconds on real text (in process)."""
    from appleslm.train.loop import train

    cfg = RunConfig(
        model=ModelArgs(**MICRO_MODEL),
        data=DataConfig(source=str(corpus_dir), cache_dir=str(token_cache)),
        train=TrainConfig(
            steps=80,
            batch_size=8,
            seq_len=32,
            lr=1e-2,
            warmup_steps=5,
            eval_every=80,
            eval_batches=4,
            save_every=80,
            log_every=80,
        ),
    )
    run = train(cfg, tmp_path_factory.mktemp("runs") / "micro", progress=False)
    return run.model_dir


@pytest.fixture
def write_config(tmp_path, corpus_dir, token_cache):
    def write(model=None, **train) -> Path:
        config = {
            "model": {**MICRO_MODEL, **(model or {})},
            "data": {"source": str(corpus_dir), "cache_dir": str(token_cache)},
            "train": {
                "steps": 40,
                "batch_size": 4,
                "seq_len": 32,
                "lr": 1e-2,
                "warmup_steps": 2,
                "eval_every": 20,
                "eval_batches": 2,
                "save_every": 5,
                "log_every": 1,
                "keep_checkpoints": 2,
                **train,
            },
        }
        path = tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    return write
