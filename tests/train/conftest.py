"""A micro config, so training tests take seconds."""

from pathlib import Path

import pytest
import yaml
from conftest import MICRO_MODEL


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
