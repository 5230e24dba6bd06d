"""Fixtures for the chat app: a private home per test and real tiny models."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import pytest

from appleslm.generate import SamplingSettings
from appleslm.io.model_dir import save_model_dir
from appleslm.models import Model, ModelArgs
from appleslm_tui.app import ChatApp

GREEDY = SamplingSettings(max_tokens=24)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """Run `async def` tests in a fresh event loop (no pytest-asyncio needed)."""
    if inspect.iscoroutinefunction(pyfuncitem.obj):
        names = pyfuncitem._fixtureinfo.argnames
        asyncio.run(pyfuncitem.obj(**{name: pyfuncitem.funcargs[name] for name in names}))
        return True
    return None


@pytest.fixture(scope="session")
def short_context_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny random model whose context is only 64 tokens, to overflow on purpose."""
    mx.random.seed(1)
    model = Model(
        ModelArgs(
            vocab_size=300,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            max_position_embeddings=64,
        )
    )
    mx.eval(model.parameters())
    return save_model_dir(
        tmp_path_factory.mktemp("models") / "short", model, tokenizer_dir=tokenizer_dir
    )


@pytest.fixture
def make_app(tmp_path) -> Callable[..., ChatApp]:
    def make(model: Path | str | None = None, **kwargs) -> ChatApp:
        kwargs.setdefault("home", tmp_path / "home")
        kwargs.setdefault("settings", GREEDY)
        kwargs.setdefault("model_roots", [])
        kwargs.setdefault("hub_cache", False)
        kwargs.setdefault("pick_model_on_start", False)
        return ChatApp(str(model) if model is not None else None, **kwargs)

    return make
