"""Shared test helpers: micro model shapes, a real BPE tokenizer, tiny model arguments."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from appleslm.models import ModelArgs

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


def train_losses(run: Path) -> dict[int, float]:
    """Step -> training loss, from a run directory's metrics.jsonl."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def final_weights(run: Path) -> dict[str, mx.array]:
    return mx.load(str(run / "model" / "model.safetensors"))


def run_on_two_ranks(command: list[str]) -> str:
    """`command` as two data-parallel processes over mlx.launch (ring backend on loopback)."""
    launch = [str(Path(sys.executable).parent / "mlx.launch"), "--backend", "ring", "-n", "2"]
    done = subprocess.run(
        [*launch, *command],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    output = done.stdout + done.stderr
    # mlx.launch exits 0 even when a rank fails: read what the ranks said.
    assert "exited with code" not in output and "Traceback" not in output, output
    assert "2 ranks in sync" in output, output
    return output


def assert_same_run(single: Path, parallel: Path) -> None:
    """Losses and final weights of two runs agree (to float32 reduction-order noise)."""
    one, two = train_losses(single), train_losses(parallel)
    assert one.keys() == two.keys()
    for step in one:
        assert math.isclose(one[step], two[step], rel_tol=1e-4), step
    a, b = final_weights(single), final_weights(parallel)
    for name in a:
        assert mx.allclose(a[name], b[name], atol=1e-4).item(), name


def tree_hashes(directory: Path) -> dict[str, str]:
    """Every file under `directory` and a hash of its bytes: what "nothing changed" compares."""
    return {
        p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }
