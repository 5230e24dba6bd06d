"""Snapshots of the main screens at 80×24 (`pytest --snapshot-update` rewrites them)."""

from __future__ import annotations

import time

import pytest

from appleslm_tui.store import Store
from tests.tui.tui_helpers import ready, send, wait_until

SIZE = (80, 24)
REPLY = """An **impost** is a tax on imports.

- duties
- excises

```python
def impost(value: float, rate: float = 0.05) -> float:
    return value * rate
```"""
STATS = {
    "ttft": 0.12,
    "prompt_tokens": 31,
    "cached_tokens": 0,
    "prompt_tps": 250.0,
    "generation_tokens": 42,
    "generation_tps": 24.5,
    "peak_memory": 0.31,
    "finish_reason": "stop",
}


@pytest.fixture(autouse=True)
def utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.fixture
def seeded(tmp_path, tiny_model_dir) -> int:
    store = Store.open(tmp_path / "home")
    old = store.create_conversation(
        "Letters of marque", model=str(tiny_model_dir), now=1_700_000_000.0
    )
    store.add_message(old.id, "user", "What is a letter of marque?", now=1_700_000_001.0)
    conversation = store.create_conversation(
        "Imposts", model=str(tiny_model_dir), system_prompt="Answer briefly.", now=1_700_100_000.0
    )
    store.add_message(conversation.id, "user", "What is an impost?", now=1_700_100_001.0)
    store.add_message(conversation.id, "assistant", REPLY, stats=STATS, now=1_700_100_002.0)
    store.close()
    return conversation.id


async def loaded(pilot) -> None:
    pilot.app.prompt.cursor_blink = False  # a blinking cursor is drawn or not by the clock
    await ready(pilot)
    await pilot.pause()


def test_empty_chat(snap_compare, make_app, tiny_model_dir):
    assert snap_compare(make_app(tiny_model_dir), terminal_size=SIZE, run_before=loaded)


def test_conversation(snap_compare, make_app, tiny_model_dir, seeded):
    app = make_app(tiny_model_dir, conversation_id=seeded)
    assert snap_compare(app, terminal_size=SIZE, run_before=loaded)


def test_settings_dialog(snap_compare, make_app, tiny_model_dir, seeded):
    app = make_app(tiny_model_dir, conversation_id=seeded)
    assert snap_compare(app, terminal_size=SIZE, run_before=loaded, press=["ctrl+s"])


def test_model_picker(snap_compare, make_app, tiny_model_dir, short_context_model_dir):
    app = make_app(
        tiny_model_dir, model_roots=[short_context_model_dir.parent, tiny_model_dir.parent]
    )
    assert snap_compare(app, terminal_size=SIZE, run_before=loaded, press=["ctrl+l"])


def test_conversation_list(snap_compare, make_app, tiny_model_dir, seeded):
    app = make_app(tiny_model_dir, conversation_id=seeded)
    assert snap_compare(app, terminal_size=SIZE, run_before=loaded, press=["ctrl+o"])


def test_prompt_too_long_error(snap_compare, make_app, short_context_model_dir):
    async def overflow(pilot) -> None:
        await loaded(pilot)
        await send(pilot, "the general welfare " * 40)
        await wait_until(pilot, lambda: pilot.app.chat_log.query(".error"))
        await wait_until(pilot, lambda: not pilot.app.generating)  # the reply is wound up
        await pilot.pause(0.3)  # and the log has settled at its end

    assert snap_compare(make_app(short_context_model_dir), terminal_size=SIZE, run_before=overflow)
