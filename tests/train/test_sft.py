"""Chat fine-tuning: exact assistant-only loss masks, the template round trip, bad records, the
default data, and full / LoRA fine-tuning of a micro model that really lowers held-out loss."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from appleslm.config import SFTConfig
from appleslm.data.chat import (
    ChatDataError,
    ChatRenderer,
    Conversation,
    TokenizedConversation,
    chitchat_conversations,
    convert_default_data,
    load_chat_data,
    pad_batch,
    read_conversations,
    resolve_chat_data,
    tokenize_conversations,
)
from appleslm.io.files import read_provenance
from appleslm.io.model_dir import load_model
from appleslm.train.sft import assistant_loss, sft_trainer
from appleslm.train.trainer import TrainingError
from tests.helpers import assert_same_run, final_weights, run_on_two_ranks, train_losses

CONVERSATION = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "What is the Congress?"},
    {"role": "assistant", "content": "The legislature of the United States."},
    {"role": "user", "content": "And taxes?"},
    {"role": "assistant", "content": " It may lay and collect them.\n"},
]
CHATML_TEXT = (
    "<|im_start|>system\nYou are brief.<|im_end|>\n"
    "<|im_start|>user\nWhat is the Congress?<|im_end|>\n"
    "<|im_start|>assistant\nThe legislature of the United States.<|im_end|>\n"
    "<|im_start|>user\nAnd taxes?<|im_end|>\n"
    "<|im_start|>assistant\n It may lay and collect them.\n<|im_end|>\n"
)


@pytest.fixture(scope="module")
def loaded(trained_model_dir):
    return load_model(trained_model_dir)


@pytest.fixture(scope="module")
def renderer(loaded) -> ChatRenderer:
    return ChatRenderer(loaded[1])


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> Path:
    """chatterbot-corpus converted, then cut to its short conversations (fast steps)."""
    root = tmp_path_factory.mktemp("chat")
    convert_default_data(root / "full")
    small = root / "small"
    small.mkdir()
    for name, keep in (("train", 240), ("valid", 40)):
        lines = (root / "full" / f"{name}.jsonl").read_text().splitlines()
        short = [line for line in lines if len(line) < 200][:keep]
        (small / f"{name}.jsonl").write_text("\n".join(short) + "\n")
    return root


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_mask_covers_exactly_the_assistant_contents_and_end_of_turn(renderer, loaded):
    tokenizer = loaded[1]
    ids, mask = renderer.tokenize(CONVERSATION)
    assert renderer.stop_ids == [0, 2]  # <|endoftext|>, <|im_end|>
    # Group the masked tokens into runs: each run must decode to one reply + <|im_end|>.
    runs, current = [], []
    for token, m in zip(ids, mask):
        if m:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    assert current == []
    assert [tokenizer.decode(run) for run in runs] == [
        "The legislature of the United States.<|im_end|>",
        " It may lay and collect them.\n<|im_end|>",
    ]
    # Everything else (system and user turns, role headers, newlines) carries no loss.
    unmasked = tokenizer.decode([t for t, m in zip(ids, mask) if not m])
    assert unmasked == CHATML_TEXT.replace(
        "The legislature of the United States.<|im_end|>", ""
    ).replace(" It may lay and collect them.\n<|im_end|>", "")

    # The batch's targets are shifted by one: position t predicts token t+1 with mask[t+1].
    x, y, m = pad_batch([TokenizedConversation(ids, mask)])
    n = len(ids) - 1
    assert x.shape[1] % 32 == 0 and m[0, n:].sum() == 0
    assert list(y[0, :n]) == ids[1:] and list(m[0, :n]) == mask[1:]


def test_chat_template_round_trips(renderer, loaded):
    tokenizer = loaded[1]
    text = renderer.text(CONVERSATION)
    assert text == CHATML_TEXT
    ids, _ = renderer.tokenize(CONVERSATION)
    assert tokenizer.decode(ids) == text
    # The prompt the chat app renders is a token prefix of the trained-on conversation.
    prompt = tokenizer.apply_chat_template(CONVERSATION[:4], add_generation_prompt=True)
    prompt_ids = prompt["input_ids"] if isinstance(prompt, dict) else list(prompt)
    assert ids[: len(prompt_ids)] == prompt_ids


def test_default_template_when_the_tokenizer_has_none(loaded):
    class NoTemplate:  # the tokenizer of a model saved without a chat template
        def __init__(self, inner):
            self.inner = inner
            self.chat_template = None
            self.eos_token_id = inner.eos_token_id

        def __getattr__(self, name):
            return getattr(self.inner, name)

    renderer = ChatRenderer(NoTemplate(loaded[1]))
    assert not renderer.uses_own_template
    assert renderer.text(CONVERSATION) == CHATML_TEXT


def test_prompt_completion_records_become_conversations(tmp_path, renderer):
    path = write_jsonl(
        tmp_path / "pc.jsonl",
        [
            {"prompt": "What is the Congress?", "completion": "The legislature."},
            {"prompt": "Hi", "completion": "Hello.", "system": "You are brief."},
        ],
    )
    conversations, errors = read_conversations(path, "refuse")
    assert errors == []
    assert conversations[0].messages == [
        {"role": "user", "content": "What is the Congress?"},
        {"role": "assistant", "content": "The legislature."},
    ]
    assert conversations[1].messages[0] == {"role": "system", "content": "You are brief."}
    tokenized, _ = tokenize_conversations(conversations, renderer, 256, "refuse")
    first = tokenized[0]
    masked = [t for t, m in zip(first.ids, first.mask) if m]
    assert renderer.tokenizer.decode(masked) == "The legislature.<|im_end|>"


BAD_RECORDS = [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
    "{not json",
    {"messages": [{"content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello."}]},
    {"messages": [{"role": "user", "content": "Only a question?"}]},
    {"prompt": "Hi"},
    {
        "messages": [
            {"role": "user", "content": "Tell me a long story."},
            {"role": "assistant", "content": "Once upon a time " * 40},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": "a<|im_end|>"},
        ]
    },
]
BAD_LINES = {
    2: "not valid JSON",
    3: "message 1 has no 'role'",
    4: "message 2 (assistant) has empty content",
    5: "unknown role 'bot'",
    6: "no assistant message",
    7: "no 'completion'",
    8: "longer than max_seq_len 64",
    9: "contains the special token <|im_end|>",
}


def test_bad_records_are_reported_with_line_numbers_and_skipped(tmp_path, renderer):
    path = write_jsonl(tmp_path / "bad.jsonl", BAD_RECORDS)
    data = load_chat_data(path, renderer, 64, on_error="skip", val_fraction=0)
    assert len(data.train) == 1 and data.train[0].line == 1
    assert {e.line: e.message for e in data.skipped}.keys() == BAD_LINES.keys()
    for error in data.skipped:
        assert BAD_LINES[error.line] in error.message
        assert str(error).startswith(f"{path}:{error.line}: ")
    assert "skipped 8 bad record(s)" in data.summary()


def test_bad_records_refused_names_every_line(tmp_path, renderer):
    path = write_jsonl(tmp_path / "bad.jsonl", BAD_RECORDS)
    with pytest.raises(ChatDataError) as caught:
        load_chat_data(path, renderer, 64, on_error="refuse", val_fraction=0)
    message = str(caught.value)
    assert message.startswith("8 bad record(s)")
    for line, why in BAD_LINES.items():  # one report names every bad line
        assert f"{path}:{line}: " in message and why in message


def test_default_data_conversion_gives_valid_disjoint_splits(chat_data, renderer):
    full = chat_data / "full"
    train, train_errors = read_conversations(full / "train.jsonl", "refuse")
    valid, valid_errors = read_conversations(full / "valid.jsonl", "refuse")
    assert train_errors == valid_errors == []
    assert 700 < len(train) < 900 and 50 < len(valid) < 150  # 898 distinct exchanges
    for c in train + valid:
        roles = [m["role"] for m in c.messages]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
    # Grouped by question: no validation question was asked in training.
    asked = {c.messages[0]["content"] for c in train}
    assert not asked & {c.messages[0]["content"] for c in valid}
    # Seeded: converting again gives the same files.
    again = convert_default_data(chat_data / "again")
    assert again["train"] == len(train)
    assert (chat_data / "again" / "valid.jsonl").read_text() == (full / "valid.jsonl").read_text()
    # `--data default` converts once into the cache and reads from there.
    cached = resolve_chat_data("default", cache_dir=chat_data / "cache")
    assert (cached / "train.jsonl").read_text() == (full / "train.jsonl").read_text()
    data = load_chat_data(full, renderer, 256, on_error="skip")
    assert len(data.train) > 600 and all(sum(c.mask) > 0 for c in data.train)


def test_chitchat_runs_become_alternating_turns():
    dataset = {
        "b": {
            "messages": [
                [{"text": "hey", "sender": "u1"}, {"text": "how are you", "sender": "u1"}],
                [{"text": "good", "sender": "u2"}],
                [{"text": "cool", "sender": "u1"}],
            ]
        },
        "a": {"messages": [[{"text": "hi", "sender": "x"}]]},
    }
    assert chitchat_conversations(dataset) == [
        [{"role": "user", "content": "hey\nhow are you"}, {"role": "assistant", "content": "good"}]
    ]


def sft_config(**overrides) -> SFTConfig:
    values = dict(
        steps=40,
        batch_size=8,
        max_seq_len=96,
        warmup_steps=2,
        eval_every=40,
        save_every=40,
        log_every=5,
    )
    values.update(overrides)
    return SFTConfig(**values)


def test_full_finetune_lowers_held_out_assistant_loss(trained_model_dir, chat_data, tmp_path):
    trainer = sft_trainer(
        trained_model_dir,
        chat_data / "small",
        tmp_path / "run",
        sft_config(lr=3e-3),
        progress=False,
        log=(messages := []).append,
    )
    result = trainer.run()
    valid = trainer.task.data.valid
    assistant = sum(sum(c.mask) for c in valid)
    # The evaluation before the first step is announced, once, with what it covers.
    assert [m for m in messages if m.startswith("evaluating on")] == [
        f"evaluating on {len(valid):,} held-out conversations ({assistant:,} assistant tokens)..."
    ]
    # Measured: 5.68 -> 5.11 nats per assistant token.
    drop = result.val_loss_before - result.val_loss
    assert drop > 0.4, (result.val_loss_before, result.val_loss)
    model, tokenizer = load_model(result.model_dir)
    config = json.loads((result.model_dir / "config.json").read_text())
    assert config["eos_token_id"] == [0, 2]  # stops at <|endoftext|> and at <|im_end|>
    assert tokenizer.eos_token_ids == {0, 2} and tokenizer.has_chat_template
    assert (result.model_dir / "chat_template.jinja").exists()
    provenance = read_provenance(result.model_dir)
    assert provenance.training[-1].method == "full"
    assert provenance.quality.loss == pytest.approx(result.val_loss)
    assert provenance.pretraining.data  # the pretraining record is kept
    # The saved model scores the held-out conversations as the trainer last measured.
    assert assistant_loss(model, trainer.task.data.valid) == pytest.approx(result.val_loss, 1e-4)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 40]
    assert (tmp_path / "run" / "loss.png").exists()


def test_lora_trains_adapters_only_and_fuses_to_the_same_model(
    trained_model_dir, chat_data, tmp_path
):
    base = dict(tree_flatten(load_model(trained_model_dir)[0].parameters()))
    trainer = sft_trainer(
        trained_model_dir,
        chat_data / "small",
        tmp_path / "run",
        sft_config(lora=True, lr=3e-3),
        progress=False,
        log=lambda message: None,
    )
    trainable = dict(tree_flatten(trainer.model.trainable_parameters()))
    assert trainable and all(k.endswith(("lora_a", "lora_b")) for k in trainable)
    # A and B for 7 projections in each of 2 blocks, and for the (tied) embedding table.
    assert len(trainable) == 2 * (7 * 2 + 1)
    val_loss, _ = trainer.fit()
    # Measured: 5.68 -> 4.99 nats per assistant token.
    assert trainer.val_loss_before - val_loss > 0.4, (trainer.val_loss_before, val_loss)
    weights = dict(tree_flatten(trainer.model.parameters()))
    wrapped = {
        k.replace(".linear.", ".").replace(".embedding.", "."): v
        for k, v in weights.items()
        if "lora_" not in k
    }
    assert wrapped.keys() == base.keys()
    for name, value in base.items():  # the base weights are untouched before fusing
        assert mx.array_equal(wrapped[name], value), name
    assert mx.abs(weights["layers.1.mlp.down_proj.lora_b"]).max().item() > 0

    x, _, _ = pad_batch(trainer.task.data.valid[:4])
    with_adapters = trainer.model(mx.array(x))
    model_dir = trainer.save_final_model(val_loss)
    fused, _ = load_model(model_dir)
    assert all("lora" not in k for k, _ in tree_flatten(fused.parameters()))
    np.testing.assert_allclose(np.array(fused(mx.array(x))), np.array(with_adapters), atol=1e-4)
    assert read_provenance(model_dir).training[-1].method == "lora"


def test_ctrl_c_then_resume_equals_an_uninterrupted_run(trained_model_dir, chat_data, tmp_path):
    cfg = dict(steps=4, eval_every=2, save_every=2, lora=True, lr=3e-3)
    quiet = dict(progress=False, log=lambda message: None)
    whole = sft_trainer(
        trained_model_dir, chat_data / "small", tmp_path / "a", sft_config(**cfg), **quiet
    ).run()

    def ctrl_c_at_step_2(message: str) -> None:
        if message.startswith("step 2:"):
            signal.raise_signal(signal.SIGINT)

    run = tmp_path / "b"
    first = sft_trainer(
        trained_model_dir,
        chat_data / "small",
        run,
        sft_config(**cfg),
        progress=False,
        log=ctrl_c_at_step_2,
    ).run()
    assert first.interrupted and first.step == 2 and first.model_dir is None
    with pytest.raises(TrainingError, match="--resume"):
        sft_trainer(trained_model_dir, chat_data / "small", run, sft_config(**cfg), **quiet)
    resumed = sft_trainer(
        trained_model_dir, chat_data / "small", run, sft_config(**cfg), resume=True, **quiet
    ).run()
    assert resumed.step == 4 and resumed.val_loss_before == whole.val_loss_before
    assert resumed.val_loss == whole.val_loss
    a = mx.load(str(whole.model_dir / "model.safetensors"))
    b = mx.load(str(resumed.model_dir / "model.safetensors"))
    assert all(mx.array_equal(a[k], b[k]) for k in a)
    records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 2, 4]


def test_conversation_order_is_seeded_and_epochs_cover_everything():
    from appleslm.data.chat import batch_indices

    first = [i for step in range(5) for i in batch_indices(10, 4, step, seed=3)]
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:20]) == list(range(10))
    assert first == [i for step in range(5) for i in batch_indices(10, 4, step, seed=3)]
    assert first != [i for step in range(5) for i in batch_indices(10, 4, step, seed=4)]


def test_on_error_must_be_skip_or_refuse(renderer):
    with pytest.raises(ValueError, match="on_error"):
        tokenize_conversations([Conversation([])], renderer, 64, "ignore")


APPLESLM = [sys.executable, "-m", "appleslm"]


def sft_command(model: Path, data: Path, out: Path, *overrides: str) -> list[str]:
    quick = ["sft.max_seq_len=96", "sft.warmup_steps=2", "sft.log_every=1", "sft.save_every=2"]
    return [
        *APPLESLM,
        "sft",
        str(model),
        "--data",
        str(data),
        "--out",
        str(out),
        "--no-progress",
        "--steps",
        "12",
        "--lr",
        "3e-3",
        *quick,
        *overrides,
    ]


def test_sft_resume_after_sigkill_equals_an_uninterrupted_run(
    trained_model_dir, chat_data, tmp_path
):
    data = chat_data / "small"
    whole = subprocess.run(
        sft_command(trained_model_dir, data, tmp_path / "whole"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert whole.returncode == 0, whole.stderr
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        sft_command(trained_model_dir, data, killed),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not ((killed / "metrics.jsonl").exists() and max(train_losses(killed), default=0) >= 7):
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    resumed = subprocess.run(
        sft_command(trained_model_dir, data, killed, "--resume"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr + resumed.stdout
    assert train_losses(killed) == train_losses(tmp_path / "whole")
    a, b = final_weights(tmp_path / "whole"), final_weights(killed)
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]).item() for k in a)


def test_sft_data_parallel_ranks_match_a_single_process_run(trained_model_dir, chat_data, tmp_path):
    data = chat_data / "small"
    command = sft_command(trained_model_dir, data, tmp_path / "single", "--steps", "4")
    assert subprocess.run(command, capture_output=True, timeout=300).returncode == 0
    run_on_two_ranks(sft_command(trained_model_dir, data, tmp_path / "dp", "--steps", "4"))
    assert_same_run(tmp_path / "single", tmp_path / "dp")


def quiet_sft(trained_model_dir, data, run, **overrides):
    cfg = sft_config(steps=3, eval_every=3, save_every=3, lr=3e-3, **overrides)
    trainer = sft_trainer(
        trained_model_dir, data, run, cfg, progress=False, log=lambda message: None
    )
    trainer.run()
    return train_losses(run), final_weights(run)


def test_sft_gradient_accumulation_equals_the_unaccumulated_step(
    trained_model_dir, chat_data, tmp_path
):
    # Micro-batches are padded separately (different lengths): the loss as (sum, count) still
    # weights every assistant token once, so two halves make the same step as the whole.
    data = chat_data / "small"
    plain, plain_weights = quiet_sft(trained_model_dir, data, tmp_path / "plain", log_every=1)
    halves, halves_weights = quiet_sft(
        trained_model_dir, data, tmp_path / "accum", log_every=1, grad_accum=2
    )
    for step in plain:
        assert math.isclose(plain[step], halves[step], rel_tol=1e-5), step
    for name in plain_weights:
        assert mx.allclose(plain_weights[name], halves_weights[name], atol=1e-5).item(), name


def test_sft_in_bfloat16_follows_the_float32_run(trained_model_dir, chat_data, tmp_path):
    data = chat_data / "small"
    full, _ = quiet_sft(trained_model_dir, data, tmp_path / "fp32", log_every=1)
    half, weights = quiet_sft(
        trained_model_dir, data, tmp_path / "bf16", log_every=1, dtype="bfloat16"
    )
    assert all(w.dtype == mx.bfloat16 for w in weights.values())
    for step in full:  # bfloat16 keeps 8 bits of mantissa: the losses agree to ~1%
        assert math.isclose(full[step], half[step], rel_tol=0.02), (step, full, half)
