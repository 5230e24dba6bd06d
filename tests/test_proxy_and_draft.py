"""Proxy-tuning's composite and speculative decoding with a draft, on random tiny models."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.models.cache import make_prompt_cache

from appleslm.generate import (
    ChatSession,
    Draft,
    GenerationError,
    ModelChoice,
    SamplingSettings,
    VocabularyError,
    load_choice,
    proxy_tuned,
)
from appleslm.io.model_dir import load_model, save_model_dir
from tests.helpers import build_tiny, write_tokenizer

GREEDY = SamplingSettings(max_tokens=16)


@pytest.fixture(scope="module")
def three(tmp_path_factory, tokenizer_dir):
    """Three random tiny models of one tokenizer, saved and loaded as the CLI loads them."""
    root = tmp_path_factory.mktemp("three")
    dirs = [
        save_model_dir(root / name, build_tiny(seed), tokenizer_dir=tokenizer_dir)
        for seed, name in enumerate(["base", "expert", "anti"])
    ]
    return [load_model(d) for d in dirs], dirs


def test_composite_logits_are_the_formula_incrementally_with_caches(three):
    (base, tokenizer), expert, anti = three[0]
    alpha = 0.7
    composite = proxy_tuned((base, tokenizer), expert, anti, alpha)
    ids = mx.array([[5, 17, 42, 99, 7, 250, 3, 11, 64]])
    whole = [m(ids).astype(mx.float32) for m in (base, expert[0], anti[0])]
    expected = whole[0] + alpha * (whole[1] - whole[2])

    cache = make_prompt_cache(composite)
    assert len(cache) == 3 * len(base.layers)  # one cache per model and layer
    pieces = [composite(ids[:, :5], cache=cache)]  # a prefill, then token by token
    pieces += [composite(ids[:, i : i + 1], cache=cache) for i in range(5, ids.shape[1])]
    incremental = mx.concatenate(pieces, axis=1)
    assert incremental.shape == expected.shape
    assert mx.allclose(incremental, expected, atol=1e-4).item()
    assert all(c.offset == ids.shape[1] for c in cache)  # each model saw every token once
    # alpha 0 is the base alone; the expert term really moves the logits
    plain = proxy_tuned((base, tokenizer), expert, anti, 0.0)
    assert mx.allclose(plain(ids), whole[0], atol=1e-5).item()
    assert not mx.allclose(incremental, whole[0], atol=1e-2).item()


def test_a_proxy_tuned_chat_reuses_its_caches_like_a_plain_model(three):
    (base, tokenizer), expert, anti = three[0]
    composite = proxy_tuned((base, tokenizer), expert, anti)
    session = ChatSession(composite, tokenizer)
    messages = [{"role": "user", "content": "The Congress shall have power"}]
    first = [r.token for r in session.stream(messages, GREEDY)]
    messages += [
        {"role": "assistant", "content": tokenizer.decode(first)},
        {"role": "user", "content": "to lay and collect taxes"},
    ]
    second = [r.token for r in session.stream(messages, GREEDY)]
    assert session.stats.cached_tokens > 10
    assert second == [r.token for r in ChatSession(composite, tokenizer).stream(messages, GREEDY)]


def test_proxy_tuning_refuses_another_vocabulary(three, tmp_path):
    (base, tokenizer), expert, _ = three[0]
    other_tokens = write_tokenizer(tmp_path / "tok", vocab_size=280)
    other = load_model(
        save_model_dir(tmp_path / "other", build_tiny(3), tokenizer_dir=other_tokens)
    )
    with pytest.raises(VocabularyError, match="anti-expert has another vocabulary"):
        proxy_tuned((base, tokenizer), expert, other)
    with pytest.raises(GenerationError, match="--alpha"):
        proxy_tuned((base, tokenizer), expert, expert, float("nan"))


def test_speculative_decoding_with_a_draft_gives_the_greedy_reply(three):
    (target, tokenizer), (draft_model, _), _ = three[0]
    messages = [{"role": "user", "content": "provide for the common defence"}]
    plain = [r.token for r in ChatSession(target, tokenizer).stream(messages, GREEDY)]
    for draft in (Draft(target, 3), Draft(draft_model, 2)):  # a perfect draft and a random one
        session = ChatSession(target, tokenizer, draft=draft)
        assert [r.token for r in session.stream(messages, GREEDY)] == plain
        assert session.stats.draft_tokens is not None
    perfect = ChatSession(target, tokenizer, draft=Draft(target, 3))
    list(perfect.stream(messages, GREEDY))
    # every step accepts its 3 draft tokens and adds the model's own: 3 of every 4
    assert perfect.stats.acceptance >= 0.6
    assert "draft" in perfect.stats.summary()


def test_a_drafted_chat_keeps_both_caches_in_step_across_turns(three):
    (target, tokenizer), (draft_model, _), _ = three[0]
    session = ChatSession(target, tokenizer, draft=Draft(draft_model, 3))
    messages = [{"role": "user", "content": "to pay the debts"}]
    for question in ["and provide", "for the general welfare"]:
        reply = [r.token for r in session.stream(messages, GREEDY)]
        assert reply == [r.token for r in ChatSession(target, tokenizer).stream(messages, GREEDY)]
        target_cache, draft_cache = session._cache[:2], session._cache[2:]
        assert target_cache[0].offset == draft_cache[0].offset == session.cached_tokens
        messages += [
            {"role": "assistant", "content": tokenizer.decode(reply)},
            {"role": "user", "content": question},
        ]
    assert session.stats.cached_tokens > 10


def test_load_choice_checks_the_draft_and_the_flags(three, tmp_path):
    dirs = three[1]
    model, _, draft = load_choice(ModelChoice(str(dirs[0]), draft=str(dirs[1]), draft_tokens=4))
    assert draft.tokens == 4
    other_tokens = write_tokenizer(tmp_path / "tok", vocab_size=280)
    other = save_model_dir(tmp_path / "other", build_tiny(3), tokenizer_dir=other_tokens)
    with pytest.raises(VocabularyError, match="the draft .* another vocabulary"):
        load_choice(ModelChoice(str(dirs[0]), draft=str(other)))
    for bad in (dict(draft_tokens=0), dict(alpha=float("inf"), proxy=("a", "b")), dict(alpha=2)):
        with pytest.raises(GenerationError):
            ModelChoice(str(dirs[0]), **bad)
    shared = build_tiny(4, layer_repeat=2)
    with pytest.raises(GenerationError, match="layer_repeat"):
        ChatSession(shared, three[0][0][1], draft=Draft(model))


def test_generate_with_a_proxy_and_a_draft_reports_the_acceptance(three, capsys):
    from appleslm.cli import main

    base, expert, anti = (str(d) for d in three[1])
    argv = ["generate", base, "--prompt", "We the People", "--max-tokens", "12"]
    assert main([*argv, "--proxy", expert, anti, "--alpha", "0.5", "--draft", base]) == 0
    out = capsys.readouterr().out
    assert "Generation: " in out and "tokens accepted" in out and "3 drafted a step" in out
