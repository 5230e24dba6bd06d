"""The conversation as a scrolling column of messages, each rendered as Markdown.

A streaming reply writes through Textual's `MarkdownStream`, which batches fragments when they
arrive faster than they can be parsed; when the reply ends the stream is stopped and the whole
text is set once more, because an incremental parse can leave an unclosed code fence drawn
wrongly (oterm #308).
"""

from __future__ import annotations

import re

from textual import events
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Markdown, Static
from textual.widgets._markdown import MarkdownFence, MarkdownStream

from appleslm.generate import Stats

FENCE = re.compile(
    r"^(?P<fence>```+|~~~+)[^\n]*\n(?P<code>.*?)(?:^(?P=fence)[ \t]*$|\Z)", re.DOTALL | re.MULTILINE
)
ROLE_NAMES = {"user": "You", "assistant": "Assistant", "system": "System", "error": "Error"}
STATUS_NOTES = {
    "stopped": "stopped",
    "interrupted": "interrupted",
    "error": "failed",
    "streaming": "…",
}
EMPTY_HINT = (
    "Type a message and press [b]Enter[/b] to send, [b]ctrl+j[/b] for a new line.\n"
    "[b]ctrl+p[/b] lists every command."
)


def code_blocks(markdown: str) -> list[str]:
    """The fenced code blocks of a message, without their fences."""
    return [m.group("code").rstrip("\n") for m in FENCE.finditer(markdown)]


class MessageItem(Vertical):
    """One message. Click it to copy it; click a code block to copy only the code.

    Focused (tab), `c` copies the message and `y` its last code block.
    """

    can_focus = True
    BINDINGS = [
        Binding("c", "copy", "Copy", show=False),
        Binding("y", "copy_code", "Copy code", show=False),
    ]

    def __init__(
        self,
        role: str,
        content: str = "",
        *,
        status: str = "done",
        stats: Stats | None = None,
        message_id: int | None = None,
    ) -> None:
        super().__init__(classes=f"message {role}")
        self.role = role
        self.content = content
        self.status = status
        self.stats = stats
        self.message_id = message_id
        self._stream: MarkdownStream | None = None

    def compose(self):
        yield Static(self.header_text(), classes="message-header", markup=False)
        yield Markdown(self.content, classes="message-body")

    def header_text(self) -> str:
        parts = [ROLE_NAMES.get(self.role, self.role)]
        if self.status in STATUS_NOTES:
            parts.append(STATUS_NOTES[self.status])
        if self.stats is not None and self.role == "assistant" and self.status != "streaming":
            parts.append(
                f"{self.stats.generation_tokens} tok · {self.stats.generation_tps:.1f} tok/s"
            )
        return " · ".join(parts)

    @property
    def body(self) -> Markdown:
        return self.query_one(".message-body", Markdown)

    def refresh_header(self) -> None:
        self.query_one(".message-header", Static).update(self.header_text())

    async def append(self, fragment: str) -> None:
        """Add streamed text to the reply."""
        if not fragment:
            return
        self.content += fragment
        if self._stream is None:
            self._stream = Markdown.get_stream(self.body)
        await self._stream.write(fragment)

    async def finish(self, content: str, status: str, stats: Stats | None) -> None:
        """End streaming: the final text, its status and the reply's figures."""
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        self.content, self.status, self.stats = content, status, stats
        await self.body.update(content)
        self.refresh_header()

    def set_status(self, status: str) -> None:
        self.status = status
        self.refresh_header()

    def action_copy(self) -> None:
        self.app.copy_to_clipboard(self.content)
        self.app.notify("Message copied", timeout=2)

    def action_copy_code(self) -> None:
        blocks = code_blocks(self.content)
        if not blocks:
            self.app.notify("This message has no code block", severity="warning", timeout=2)
            return
        self.app.copy_to_clipboard(blocks[-1])
        self.app.notify("Code block copied", timeout=2)

    def on_click(self, event: events.Click) -> None:
        widget = event.widget
        while widget is not None and widget is not self:
            if isinstance(widget, MarkdownFence):
                self.app.copy_to_clipboard(widget.code)
                self.app.notify("Code block copied", timeout=2)
                return
            widget = widget.parent
        self.action_copy()


class ChatLog(VerticalScroll):
    """The messages of the open conversation, oldest first.

    The log is anchored to its end (Textual's anchor): however a streaming reply grows, a code
    block or a table at a time, the end stays in view, until the user scrolls up on purpose;
    scrolling back down, or sending a message, anchors it again. Like a terminal, a short
    conversation sits at the bottom of the log, next to the prompt.
    """

    def compose(self):
        yield Static(EMPTY_HINT, id="empty-hint")

    def on_mount(self) -> None:
        self.anchor()

    @property
    def items(self) -> list[MessageItem]:
        return list(self.query(MessageItem))

    async def add(self, item: MessageItem) -> MessageItem:
        self.query_one("#empty-hint").display = False
        await self.mount(item)
        self.scroll_end(animate=False)
        return item

    async def clear(self) -> None:
        await self.query(MessageItem).remove()
        self.query_one("#empty-hint").display = True

    async def remove_from(self, item: MessageItem) -> None:
        """Remove `item` and everything after it."""
        items = self.items
        if item in items:
            await self.remove_children(items[items.index(item) :])
        if not self.items:
            self.query_one("#empty-hint").display = True
