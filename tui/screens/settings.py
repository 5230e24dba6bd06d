"""The conversation's settings: system prompt and sampling, saved with the conversation."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static, TextArea

from appleslm.generate import SamplingSettings

FIELDS = [  # (field, label, input type, hint)
    ("temperature", "Temperature", "number", "0 = greedy"),
    ("top_p", "Top-p", "number", "1 = off"),
    ("top_k", "Top-k", "integer", "0 = off"),
    ("min_p", "Min-p", "number", "0 = off"),
    ("repetition_penalty", "Repeat penalty", "number", "1 = off"),
    ("max_tokens", "Max tokens", "integer", ""),
    ("seed", "Seed", "integer", "blank = random"),
]


class SettingsScreen(ModalScreen[tuple[str, SamplingSettings] | None]):
    """Edit the system prompt and sampling; ctrl+s saves, Esc cancels."""

    BINDINGS = [Binding("escape", "cancel", "Cancel"), Binding("ctrl+s", "save", "Save")]

    def __init__(
        self, system_prompt: str, settings: SamplingSettings, *, chat_mode: bool = True
    ) -> None:
        super().__init__()
        self.system_prompt, self.settings, self.chat_mode = system_prompt, settings, chat_mode

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="settings-dialog"):
            yield Label("Conversation settings", classes="dialog-title")
            label = "System prompt" if self.chat_mode else "Text before the conversation"
            yield Label(label, classes="field-label")
            yield TextArea(self.system_prompt, id="system-prompt", soft_wrap=True, compact=True)
            with Grid(id="sampling-grid"):
                for name, text, kind, hint in FIELDS:
                    value = getattr(self.settings, name)
                    yield Label(text, classes="field-label")
                    yield Input(
                        "" if value is None else str(value),
                        type=kind,
                        id=name,
                        placeholder=hint,
                        compact=True,
                        tooltip=hint or None,
                    )
            yield Static("", id="settings-error")
            with Horizontal(classes="buttons"):
                yield Button("Save", variant="primary", id="save", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "save":
            self.action_save()
        else:
            self.action_cancel()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_save()

    def read(self) -> SamplingSettings:
        """The settings as typed; ValueError names what is wrong."""
        values: dict[str, float | int | None] = {}
        for name, text, kind, _ in FIELDS:
            raw = self.query_one(f"#{name}", Input).value.strip()
            if not raw:
                if name != "seed":
                    raise ValueError(f"{text} is empty")
                values[name] = None
                continue
            try:
                values[name] = int(raw) if kind == "integer" else float(raw)
            except ValueError:
                raise ValueError(f"{text}: {raw!r} is not a number") from None
        return SamplingSettings(**values)

    def action_save(self) -> None:
        try:
            settings = self.read()
        except ValueError as e:
            error = self.query_one("#settings-error", Static)
            error.update(f"[b]{e}[/b]")
            error.add_class("shown")
            return
        self.dismiss((self.query_one("#system-prompt", TextArea).text.strip(), settings))

    def action_cancel(self) -> None:
        self.dismiss(None)
