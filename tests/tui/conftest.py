"""Fixtures for the chat app: a private home per test and real tiny models."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models.cache import KVCache

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
        return ChatApp(str(model) if isinstance(model, Path) else model, **kwargs)

    return make


MARKDOWN_REPLY = """Here is a plan.

```python
def tax(amount):
    rate = 0.1
    return amount * rate
```

1. First the duties
2. Then the imposts
3. Last the excises

| duty | rate |
| --- | --- |
| imposts | 5% |
| excises | 7% |

The end of the reply."""


class ScriptedModel(nn.Module):
    """A model with mlx-lm's interface and a real KV cache that writes `script` (token ids),
    one token per step, whatever it is asked, then its end-of-sequence token: fed the token at
    position p it predicts script[p - prompt_length + 1]. Set `prompt_length` to the prompt's.

    It lets the chat app's tests stream a known reply (code blocks, lists, tables) through the
    very path a trained model's reply takes: mlx-lm's stream_generate and the session's cache.
    """

    def __init__(self, script: list[int], vocab_size: int, eos: int, delay: float = 0.01):
        super().__init__()
        self.delay = delay  # seconds per step: a reply streams over several UI refreshes
        self.args = SimpleNamespace(max_position_embeddings=4096)
        self.script, self.vocab_size, self.eos = mx.array(script + [eos]), vocab_size, eos
        self.prompt_length = 1
        self.layers = [nn.Identity()]

    def make_cache(self) -> list[KVCache]:
        return [KVCache()]

    def __call__(self, inputs, cache=None, input_embeddings=None):
        time.sleep(self.delay)
        batch, length = inputs.shape
        offset = cache[0].offset if cache else 0
        if cache:
            nothing = mx.zeros((batch, 1, length, 1))
            cache[0].update_and_fetch(nothing, nothing)
        index = offset + mx.arange(length) - (self.prompt_length - 1)
        index = mx.clip(index, 0, self.script.size - 1)
        targets = mx.where(index >= 0, self.script[index], self.eos)
        logits = mx.where(mx.arange(self.vocab_size) == targets[:, None], 0.0, -1e9)
        return mx.broadcast_to(logits[None], (batch, length, self.vocab_size))


@pytest.fixture
def scripted(tiny_model_dir):
    """(a ChatSession over a ScriptedModel that writes MARKDOWN_REPLY, its tokenizer)."""
    from appleslm.generate import ChatSession
    from appleslm.io.model_dir import load_model

    _, tokenizer = load_model(tiny_model_dir)
    script = tokenizer.encode(MARKDOWN_REPLY, add_special_tokens=False)
    model = ScriptedModel(script, tokenizer.vocab_size, tokenizer.eos_token_id)
    return ChatSession(model, tokenizer), tokenizer
