"""Shared fixtures: tiny real models (random weights, real tokenizer) that load everywhere."""

from __future__ import annotations

import json
import lzma
from pathlib import Path

import mlx.core as mx
import pytest
import yaml

from appleslm.config import DataConfig, RunConfig, TrainConfig
from appleslm.data.corpus import BUNDLED_CORPUS
from appleslm.io.model_dir import save_model_dir
from appleslm.models import Model, ModelArgs
from tests.helpers import MICRO_MODEL, tiny_args, write_tokenizer


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
    from appleslm.train.pretrain import train

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
    def write(model=None, data=None, **train) -> Path:
        config = {
            "model": {**MICRO_MODEL, **(model or {})},
            "data": {"source": str(corpus_dir), "cache_dir": str(token_cache), **(data or {})},
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
