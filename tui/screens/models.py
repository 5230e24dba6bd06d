"""The model picker: local model directories and the Hugging Face cache, or a typed path/id."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label, OptionList
from textual.widgets.option_list import Option

from appleslm_tui.model_list import ModelEntry


class ModelPickerScreen(ModalScreen[str | None]):
    """Enter loads the highlighted model; typing a path or Hub repo id and Enter loads that."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, entries: Sequence[ModelEntry], current: str | None = None) -> None:
        super().__init__()
        self.entries, self.current = list(entries), current

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="model-dialog"):
            yield Label("Choose a model", classes="dialog-title")
            yield Input(
                placeholder="a model directory or a Hub repo id (org/name)",
                id="model-spec",
                compact=True,
            )
            options = [Option(self._row(entry), id=str(i)) for i, entry in enumerate(self.entries)]
            yield OptionList(*options, id="model-list")
            if not self.entries:
                yield Label(
                    "No model directories found here or in the Hugging Face cache; "
                    "type a path or a repo id above.",
                    classes="hint",
                )

    def is_current(self, entry: ModelEntry) -> bool:
        if self.current is None:
            return False
        here = Path(self.current).expanduser()
        return entry.spec == self.current or (here.exists() and here.resolve() == Path(entry.spec))

    def _row(self, entry: ModelEntry) -> Text:
        mark = "● " if self.is_current(entry) else "  "
        return Text.assemble(
            mark,
            (entry.name, "bold"),
            "  ",
            (entry.detail, "dim"),
            "  ",
            (entry.source, "italic dim"),
        )

    def on_mount(self) -> None:
        # Typing a path or repo id works at once; Down (or Tab) moves to the list.
        self.query_one("#model-spec", Input).focus()
        current = next((i for i, e in enumerate(self.entries) if self.is_current(e)), None)
        if current is not None:
            self.query_one("#model-list", OptionList).highlighted = current

    def on_key(self, event) -> None:
        # While typing, Up and Down move through the list (Enter on an empty line loads the
        # highlighted model), as in a fuzzy finder.
        options = self.query_one("#model-list", OptionList)
        if event.key in ("up", "down") and self.focused is self.query_one("#model-spec", Input):
            event.stop()
            if event.key == "down":
                options.action_cursor_down()
            else:
                options.action_cursor_up()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.dismiss(self.entries[int(event.option.id)].spec)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        highlighted = self.query_one("#model-list", OptionList).highlighted
        if event.value.strip():
            self.dismiss(event.value.strip())
        elif highlighted is not None and self.entries:
            self.dismiss(self.entries[highlighted].spec)

    def action_cancel(self) -> None:
        self.dismiss(None)
