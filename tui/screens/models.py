"""The model picker: local model directories and the Hugging Face cache, or a typed path/id."""

from __future__ import annotations

from collections.abc import Sequence

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

    def _row(self, entry: ModelEntry) -> Text:
        mark = "● " if entry.spec == self.current else "  "
        return Text.assemble(
            mark,
            (entry.name, "bold"),
            "  ",
            (entry.detail, "dim"),
            "  ",
            (entry.source, "italic dim"),
        )

    def on_mount(self) -> None:
        if self.entries:
            self.query_one("#model-list", OptionList).focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.dismiss(self.entries[int(event.option.id)].spec)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        if event.value.strip():
            self.dismiss(event.value.strip())

    def action_cancel(self) -> None:
        self.dismiss(None)
