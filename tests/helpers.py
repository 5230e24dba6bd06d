"""Shared test helpers: micro model shapes, a real BPE tokenizer, tiny model arguments."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import mlx.core as mx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from appleslm.models import Model, ModelArgs, build_model

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


@cache
def sample_tokenizer(vocab_size: int = 300) -> Tokenizer:
    """A real byte-level BPE trained on SAMPLE_TEXT (what `write_tokenizer` saves)."""
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
    return tokenizer


def write_tokenizer(directory: Path, vocab_size: int = 300) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    sample_tokenizer(vocab_size).save(str(directory / "tokenizer.json"))
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


# Small settings of every architecture option, for tests that compose them.
SMALL_GENERATOR = dict(
    embedding="leviathan",
    generator_d_seed=16,
    generator_heads=2,
    generator_knots=8,
    generator_rank=4,
)
SMALL_BYTES = dict(
    byte_slots=8,
    byte_embedding_dim=16,
    byte_encoder_widths=[32],
    byte_encoder_ffn=[32, 64],
    byte_encoder_heads=2,
    byte_head_width=16,
    byte_head_layers=1,
    byte_head_ffn=32,
    byte_head_heads=2,
)
EMBEDDING_OPTIONS = {
    "table": {},
    "leviathan": SMALL_GENERATOR,
    "bytes": dict(SMALL_BYTES, embedding="bytes"),
}
HEAD_OPTIONS = {"linear": {}, "bytes": dict(SMALL_BYTES, head="bytes")}
FFN_OPTIONS = {"dense": {}, "moe": dict(num_experts=4, num_experts_per_tok=2)}


def option_overrides(
    embedding: str = "table",
    head: str = "linear",
    ffn: str = "dense",
    layer_repeat: int = 1,
    share_ffn: bool = False,
) -> dict:
    """ModelArgs overrides for one combination of the options (tied only where a table can be)."""
    return {
        **EMBEDDING_OPTIONS[embedding],
        **HEAD_OPTIONS[head],
        **FFN_OPTIONS[ffn],
        "layer_repeat": layer_repeat,
        "share_ffn": share_ffn,
        "tie_word_embeddings": embedding == "table" and head == "linear",
    }


def build_tiny(seed: int = 0, **overrides) -> Model:
    """A tiny model with random weights (and, for byte options, the sample tokenizer's table)."""
    mx.random.seed(seed)
    model = build_model(tiny_args(**overrides), sample_tokenizer(), log=lambda line: None)
    mx.eval(model.parameters())
    return model
