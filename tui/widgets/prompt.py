"""The prompt: a growing text area where Enter sends and ctrl+j (or shift+enter) breaks a line.

Shift+Enter never reaches the app in several terminals (oterm #234), so ctrl+j, which every
terminal sends as a line feed, is the newline key that always works.
"""

from __future__ import annotations

import dataclasses

from textual import events
from textual.binding import Binding
from textual.message import Message
from textual.widgets import TextArea


def _without(bindings, keys: set[str]) -> list[Binding]:
    """TextArea's bindings minus `keys`, so the app's ctrl+e (edit) and ctrl+y (copy) reach it."""
    kept = []
    for binding in bindings:
        names = [k for k in binding.key.split(",") if k.strip() not in keys]
        if names:
            kept.append(dataclasses.replace(binding, key=",".join(names)))
    return kept


class PromptArea(TextArea, inherit_bindings=False):
    BINDINGS = _without(TextArea.BINDINGS, {"ctrl+e", "ctrl+y"})

    class Submitted(Message):
        def __init__(self, prompt: PromptArea, text: str) -> None:
            super().__init__()
            self.prompt = prompt
            self.text = text

    def __init__(self, **kwargs) -> None:
        super().__init__(
            soft_wrap=True, show_line_numbers=False, tab_behavior="focus", compact=True, **kwargs
        )

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            if self.text.strip():
                self.post_message(self.Submitted(self, self.text))
            return
        if event.key in ("ctrl+j", "shift+enter"):
            event.stop()
            event.prevent_default()
            self.insert("\n")
            return
        await super()._on_key(event)
