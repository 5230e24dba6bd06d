"""The SQLite history: CRUD, privacy, export, and surviving a kill mid-reply."""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from appleslm_tui.store import DB_NAME, Store, StoreError, data_home, slug


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_data_home_order(monkeypatch, tmp_path):
    monkeypatch.delenv("APPLESLM_HOME", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert data_home() == tmp_path / "xdg" / "appleslm"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data_home() == tmp_path / ".local" / "share" / "appleslm"
    monkeypatch.setenv("APPLESLM_HOME", str(tmp_path / "env"))
    assert data_home() == tmp_path / "env"
    assert data_home(tmp_path / "explicit") == tmp_path / "explicit"


def test_history_is_private_and_in_wal_mode(tmp_path):
    store = Store.open(tmp_path / "home")
    conversation = store.create_conversation("hi")
    store.add_message(conversation.id, "user", "secret")
    assert mode(tmp_path / "home") == 0o700
    for name in (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm"):
        assert mode(tmp_path / "home" / name) == 0o600, name
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()


def test_conversations_and_messages(tmp_path):
    store = Store.open(tmp_path)
    first = store.create_conversation("first", model="m", settings={"temperature": 0.5}, now=100.0)
    second = store.create_conversation("second", now=200.0)
    assert [c.title for c in store.list_conversations()] == ["second", "first"]
    store.add_message(first.id, "user", "hello", now=300.0)
    reply = store.add_message(first.id, "assistant", "", status="streaming", now=301.0)
    store.update_message(
        reply.id, content="hi there", status="done", stats={"generation_tokens": 3}
    )
    listed = store.list_conversations()
    assert [c.title for c in listed] == ["first", "second"] and listed[0].message_count == 2
    messages = store.messages(first.id)
    assert [(m.role, m.content, m.status) for m in messages] == [
        ("user", "hello", "done"),
        ("assistant", "hi there", "done"),
    ]
    assert messages[1].stats == {"generation_tokens": 3}
    store.update_conversation(first.id, title="renamed", settings={"top_k": 5})
    got = store.get_conversation(first.id)
    assert got.title == "renamed" and got.settings == {"top_k": 5} and got.model == "m"
    store.delete_messages_from(messages[1].id)
    assert [m.content for m in store.messages(first.id)] == ["hello"]
    store.delete_conversation(first.id)
    assert store.get_conversation(first.id) is None and store.messages(first.id) == []
    assert [c.id for c in store.list_conversations()] == [second.id]
    store.set_pref("recent_models", ["a", "b"])
    assert store.get_pref("recent_models") == ["a", "b"] and store.get_pref("x", 1) == 1
    store.close()


def test_export_markdown(tmp_path):
    store = Store.open(tmp_path)
    conversation = store.create_conversation(
        "Taxes & duties", model="tiny", system_prompt="Be brief."
    )
    store.add_message(conversation.id, "user", "What is an impost?")
    store.add_message(conversation.id, "assistant", "A tax:\n\n```python\nprint(1)\n```")
    text = store.export_markdown(conversation.id)
    assert text.startswith("# Taxes & duties\n")
    for part in (
        "## System\n\nBe brief.",
        "## User\n\nWhat is an impost?",
        "## Assistant\n\nA tax:\n\n```python\nprint(1)\n```",
    ):
        assert part in text
    assert slug("Taxes & duties!") == "taxes-duties"
    store.close()


WRITER = textwrap.dedent("""
    import sys, time
    from appleslm_tui.store import Store
    store = Store.open(sys.argv[1])
    conversation = store.create_conversation("killed")
    for i in range(5):
        store.add_message(conversation.id, "user", f"question {i}")
        store.add_message(conversation.id, "assistant", f"answer {i}")
    reply = store.add_message(conversation.id, "assistant", "", status="streaming")
    print("ready", flush=True)
    n = 0
    while True:  # a reply that keeps streaming until the process is killed
        n += 1
        store.update_message(reply.id, content="word " * n)
""")


def test_a_kill_mid_reply_loses_no_earlier_message(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert process.stdout.readline().strip() == "ready"
    time.sleep(0.3)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    check = sqlite3.connect(tmp_path / DB_NAME)
    assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    check.close()
    store = Store.open(tmp_path)
    (conversation,) = store.list_conversations()
    messages = store.messages(conversation.id)
    assert [m.content for m in messages[:10]] == [
        text for i in range(5) for text in (f"question {i}", f"answer {i}")
    ]
    assert messages[10].status == "interrupted"  # the cut reply is kept, marked
    assert messages[10].content.startswith("word ")
    store.close()


def test_a_corrupt_history_file_is_a_clear_error(tmp_path):
    (tmp_path / DB_NAME).write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="cannot open the chat history"):
        Store.open(tmp_path)
