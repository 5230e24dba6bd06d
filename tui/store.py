"""Conversations on disk: one SQLite file in WAL mode, private to the user.

Every message is committed the moment it exists and a streaming reply is re-saved as it
grows, so killing the app mid-reply loses no earlier message (WAL + synchronous=FULL makes
each commit durable). The directory is created 0700 and the database 0600: chats are private.
SQLite gives the -wal and -shm files the database file's mode.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appleslm.errors import AppleslmError

HOME_ENV = "APPLESLM_HOME"
DB_NAME = "history.sqlite3"
SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    title TEXT NOT NULL,
    model TEXT,
    system_prompt TEXT NOT NULL DEFAULT '',
    settings TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'done',
    stats TEXT,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id);
CREATE TABLE IF NOT EXISTS prefs (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def data_home(home: str | Path | None = None) -> Path:
    """Where appleslm keeps its data: `home`, else $APPLESLM_HOME, else the XDG data dir."""
    if home is not None:
        return Path(home).expanduser()
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg).expanduser() / "appleslm"


@dataclass
class Conversation:
    id: int
    title: str
    model: str | None
    system_prompt: str
    settings: dict[str, Any]
    created: float
    updated: float
    message_count: int = 0


@dataclass
class StoredMessage:
    id: int
    conversation_id: int
    role: str
    content: str
    status: str = "done"  # done | streaming | stopped | interrupted | error
    stats: dict[str, Any] | None = None
    created: float = field(default_factory=time.time)


class StoreError(AppleslmError, RuntimeError):
    """The history file cannot be opened (unreadable, corrupt, not a database)."""


class ConversationGone(StoreError):
    """The conversation was deleted (by another window on the same history) while open here."""


class Store:
    """The conversation history. All calls come from the UI thread (one connection)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._open()
        except (sqlite3.DatabaseError, OSError) as e:
            raise StoreError(
                f"cannot open the chat history {self.path}: {e}. Move the file aside, or "
                f"point ${HOME_ENV} at another directory."
            ) from e

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.path.parent, 0o700)
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
        os.close(fd)
        os.chmod(self.path, 0o600)
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(SCHEMA)
        with self._transaction():
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            # A reply that was streaming when the app died is kept, marked as cut short.
            self._db.execute("UPDATE messages SET status='interrupted' WHERE status='streaming'")

    @classmethod
    def open(cls, home: str | Path | None = None) -> Store:
        """The store under `data_home(home)`."""
        return cls(data_home(home) / DB_NAME)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # conversations

    def create_conversation(
        self,
        title: str = "New chat",
        *,
        model: str | None = None,
        system_prompt: str = "",
        settings: dict[str, Any] | None = None,
        now: float | None = None,
    ) -> Conversation:
        now = time.time() if now is None else now
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO conversations (title, model, system_prompt, settings, created, "
                "updated) VALUES (?, ?, ?, ?, ?, ?)",
                (title, model, system_prompt, json.dumps(settings or {}), now, now),
            )
        conversation = self.get_conversation(cursor.lastrowid)
        assert conversation is not None
        return conversation

    def _conversation(self, row: sqlite3.Row) -> Conversation:
        return Conversation(
            id=row["id"],
            title=row["title"],
            model=row["model"],
            system_prompt=row["system_prompt"],
            settings=json.loads(row["settings"] or "{}"),
            created=row["created"],
            updated=row["updated"],
            message_count=row["message_count"],
        )

    _SELECT = (
        "SELECT c.*, (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id) "
        "AS message_count FROM conversations c"
    )

    def get_conversation(self, conversation_id: int) -> Conversation | None:
        row = self._db.execute(f"{self._SELECT} WHERE c.id = ?", (conversation_id,)).fetchone()
        return self._conversation(row) if row else None

    def list_conversations(self) -> list[Conversation]:
        """Most recently active first."""
        rows = self._db.execute(f"{self._SELECT} ORDER BY c.updated DESC, c.id DESC")
        return [self._conversation(row) for row in rows]

    def update_conversation(
        self,
        conversation_id: int,
        *,
        title: str | None = None,
        model: str | None = None,
        system_prompt: str | None = None,
        settings: dict[str, Any] | None = None,
        now: float | None = None,
    ) -> None:
        fields: dict[str, Any] = {
            "title": title,
            "model": model,
            "system_prompt": system_prompt,
            "settings": json.dumps(settings) if settings is not None else None,
        }
        fields = {k: v for k, v in fields.items() if v is not None}
        if now is not None:  # only new messages count as activity, not renames or settings
            fields["updated"] = now
        if not fields:
            return
        assignments = ", ".join(f"{name} = ?" for name in fields)
        with self._transaction() as db:
            db.execute(
                f"UPDATE conversations SET {assignments} WHERE id = ?",
                (*fields.values(), conversation_id),
            )

    def delete_conversation(self, conversation_id: int) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    # messages

    def messages(self, conversation_id: int) -> list[StoredMessage]:
        rows = self._db.execute(
            "SELECT * FROM messages WHERE conversation_id = ? ORDER BY id", (conversation_id,)
        )
        return [
            StoredMessage(
                id=row["id"],
                conversation_id=row["conversation_id"],
                role=row["role"],
                content=row["content"],
                status=row["status"],
                stats=json.loads(row["stats"]) if row["stats"] else None,
                created=row["created"],
            )
            for row in rows
        ]

    def add_message(
        self,
        conversation_id: int,
        role: str,
        content: str,
        *,
        status: str = "done",
        stats: dict[str, Any] | None = None,
        now: float | None = None,
    ) -> StoredMessage:
        now = time.time() if now is None else now
        with self._transaction() as db:
            found = db.execute("SELECT 1 FROM conversations WHERE id = ?", (conversation_id,))
            if found.fetchone() is None:
                raise ConversationGone(f"conversation {conversation_id} no longer exists")
            cursor = db.execute(
                "INSERT INTO messages (conversation_id, role, content, status, stats, created) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (conversation_id, role, content, status, json.dumps(stats) if stats else None, now),
            )
            db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (now, conversation_id))
        return StoredMessage(
            id=cursor.lastrowid,
            conversation_id=conversation_id,
            role=role,
            content=content,
            status=status,
            stats=stats,
            created=now,
        )

    def update_message(
        self,
        message_id: int,
        *,
        content: str | None = None,
        status: str | None = None,
        stats: dict[str, Any] | None = None,
    ) -> bool:
        """Update a message; False when it no longer exists (its conversation was deleted)."""
        fields: dict[str, Any] = {
            "content": content,
            "status": status,
            "stats": json.dumps(stats) if stats is not None else None,
        }
        fields = {k: v for k, v in fields.items() if v is not None}
        if not fields:
            return True
        assignments = ", ".join(f"{name} = ?" for name in fields)
        with self._transaction() as db:
            cursor = db.execute(
                f"UPDATE messages SET {assignments} WHERE id = ?", (*fields.values(), message_id)
            )
        return cursor.rowcount > 0

    def delete_messages_from(self, message_id: int) -> None:
        """Delete a message and every later one of its conversation (edit, regenerate)."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT conversation_id FROM messages WHERE id = ?", (message_id,)
            ).fetchone()
            if row is not None:
                db.execute(
                    "DELETE FROM messages WHERE conversation_id = ? AND id >= ?",
                    (row["conversation_id"], message_id),
                )

    # preferences (the last model, the last conversation)

    def get_pref(self, key: str, default: Any = None) -> Any:
        row = self._db.execute("SELECT value FROM prefs WHERE key = ?", (key,)).fetchone()
        return json.loads(row["value"]) if row else default

    def set_pref(self, key: str, value: Any) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO prefs (key, value) VALUES (?, ?) ON CONFLICT(key) "
                "DO UPDATE SET value = excluded.value",
                (key, json.dumps(value)),
            )

    # export

    def export_markdown(self, conversation_id: int) -> str:
        """The conversation as a Markdown document (title, model, system prompt, turns)."""
        conversation = self.get_conversation(conversation_id)
        if conversation is None:
            raise KeyError(conversation_id)
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(conversation.created))
        lines = [
            f"# {conversation.title}",
            "",
            f"*{conversation.model or 'no model'} · {when}*",
            "",
        ]
        if conversation.system_prompt:
            lines += ["## System", "", conversation.system_prompt, ""]
        for message in self.messages(conversation_id):
            # A system message in the history is a system prompt set there, mid-conversation.
            heading = (
                "System prompt, from here on"
                if message.role == "system"
                else (message.role.capitalize())
            )
            lines += [f"## {heading}", "", message.content, ""]
        return "\n".join(lines).rstrip() + "\n"


def slug(title: str) -> str:
    """A file-name-safe version of a title, for exports."""
    text = re.sub(r"[^A-Za-z0-9]+", "-", title).strip("-").lower()
    return text[:60] or "conversation"
