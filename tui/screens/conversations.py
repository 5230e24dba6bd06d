"""The conversation list: open, start, rename, delete and export conversations."""

from __future__ import annotations

import time
from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, OptionList
from textual.widgets.option_list import Option

from appleslm_tui.model_list import label
from appleslm_tui.screens.dialogs import ConfirmDialog, TextDialog
from appleslm_tui.store import Conversation, Store, slug

Result = tuple[str, int | None]
"""("open", id) or ("new", None)."""


class ConversationsScreen(ModalScreen[Result | None]):
    BINDINGS = [
        Binding("escape", "cancel", "Close"),
        Binding("n", "new", "New"),
        Binding("r", "rename", "Rename"),
        Binding("d,delete", "delete", "Delete"),
        Binding("e", "export", "Export"),
    ]

    def __init__(self, store: Store, current: int | None = None) -> None:
        super().__init__()
        self.store, self.current = store, current
        self.conversations: list[Conversation] = []

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="conversations-dialog"):
            yield Label("Conversations", classes="dialog-title")
            yield OptionList(id="conversation-list")
            yield Label(
                "[b]enter[/b] open · [b]n[/b] new · [b]r[/b] rename · [b]d[/b] delete · "
                "[b]e[/b] export · [b]esc[/b] close",
                classes="hint",
            )

    def on_mount(self) -> None:
        self.reload()

    def reload(self) -> None:
        """Refill the list, keeping the highlight on the same conversation when it still exists."""
        options = self.query_one("#conversation-list", OptionList)
        selected = self.selected()
        keep = selected.id if selected is not None else self.current
        index = options.highlighted or 0
        self.conversations = self.store.list_conversations()
        options.clear_options()
        options.add_options([Option(self._row(c), id=str(c.id)) for c in self.conversations])
        if self.conversations:
            ids = [c.id for c in self.conversations]
            options.highlighted = ids.index(keep) if keep in ids else min(index, len(ids) - 1)
        options.focus()

    def _row(self, conversation: Conversation) -> Text:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(conversation.updated))
        mark = "● " if conversation.id == self.current else "  "
        model = label(conversation.model) if conversation.model else "no model"
        n = conversation.message_count
        count = f"{n} message" if n == 1 else f"{n} messages"
        return Text.assemble(
            mark, (conversation.title, "bold"), "\n    ", (f"{model} · {count} · {when}", "dim")
        )

    def selected(self) -> Conversation | None:
        index = self.query_one("#conversation-list", OptionList).highlighted
        return self.conversations[index] if index is not None and self.conversations else None

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.dismiss(("open", int(event.option.id)))

    def action_new(self) -> None:
        self.dismiss(("new", None))

    def action_cancel(self) -> None:
        self.dismiss(None)

    def action_rename(self) -> None:
        conversation = self.selected()
        if conversation is None:
            return

        def rename(title: str | None) -> None:
            if title:
                self.store.update_conversation(conversation.id, title=title)
                self.reload()

        self.app.push_screen(
            TextDialog("Rename conversation", conversation.title, action="Rename"), rename
        )

    def action_delete(self) -> None:
        conversation = self.selected()
        if conversation is None:
            return

        def delete(yes: bool | None) -> None:
            if yes:
                self.store.delete_conversation(conversation.id)
                self.reload()

        self.app.push_screen(ConfirmDialog(f"Delete “{conversation.title}”?"), delete)

    def action_export(self) -> None:
        conversation = self.selected()
        if conversation is None:
            return

        def export(path: str | None) -> None:
            if not path:
                return
            target = Path(path).expanduser()
            try:
                target.write_text(self.store.export_markdown(conversation.id))
            except OSError as e:
                self.app.notify(f"Export failed: {e}", severity="error")
                return
            self.app.notify(f"Exported to {target}")

        self.app.push_screen(
            TextDialog(
                "Export to Markdown file", f"{slug(conversation.title)}.md", action="Export"
            ),
            export,
        )
