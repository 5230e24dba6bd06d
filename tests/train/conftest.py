"""A small real corpus and a micro config, so training tests take seconds."""

import json
import lzma
from pathlib import Path

import pytest
import yaml

from appleslm.data.corpus import BUNDLED_CORPUS

MICRO_MODEL = dict(
    vocab_size=512,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    intermediate_size=64,
    max_position_embeddings=64,
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
