"""`appleslm chat`: a Textual chat app over `appleslm.generate.ChatSession`.

Model loading and generation run in thread workers; the UI thread only renders and writes the
SQLite history. Layout after oterm: header, conversation, speed panel, prompt, footer.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.message import Message
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import Footer, Header

from appleslm.generate import ChatSession, GenerationError, ModelChoice, SamplingSettings
from appleslm_tui.conversation_actions import ConversationActions
from appleslm_tui.model_list import ModelEntry, default_roots, label, list_models
from appleslm_tui.reply import ReplyBuffer
from appleslm_tui.screens import ModelPickerScreen
from appleslm_tui.store import Conversation, ConversationGone, Store, StoredMessage, data_home
from appleslm_tui.widgets import ChatLog, MessageItem, PromptArea, SpeedPanel, code_blocks

CHAT_DEFAULTS = SamplingSettings(temperature=0.7, top_p=0.95, max_tokens=1024)
"""A new conversation's sampling: lightly random, as chat front-ends usually start."""
DRAIN_INTERVAL = 1 / 15
"""Seconds between UI refreshes of a streaming reply (the model never waits for them)."""
SAVE_INTERVAL = 1.0
"""Seconds between saves of a streaming reply, so a crash loses at most this much of it."""
RECENT_MODELS = 8


class ReplyDone(Message):
    """Posted by the generation thread when a reply ended (finished, stopped or failed)."""

    def __init__(self, buffer: ReplyBuffer) -> None:
        super().__init__()
        self.buffer = buffer


class ModelLoaded(Message):
    def __init__(
        self, choice: str | ModelChoice, session: ChatSession | None, error: str | None
    ) -> None:
        super().__init__()
        if not isinstance(choice, ModelChoice):
            choice = ModelChoice(str(choice))
        self.choice, self.spec, self.session, self.error = choice, choice.model, session, error


class ChatApp(ConversationActions, App):
    """Chat with a local MLX model; conversations persist in SQLite."""

    CSS_PATH = "chat.tcss"
    TITLE = "appleslm"
    BINDINGS = [
        Binding("escape", "stop", "Stop", id="stop"),
        Binding("ctrl+n", "new_chat", "New", id="new_chat"),
        Binding("ctrl+o", "conversations", "Chats", id="conversations"),
        Binding("ctrl+l", "pick_model", "Model", id="pick_model"),
        Binding("ctrl+s", "settings", "Settings", id="settings"),
        Binding("ctrl+r", "regenerate", "Regen", id="regenerate"),
        Binding("ctrl+e", "edit_last", "Edit", id="edit_last"),
        Binding("ctrl+y", "copy_reply", "Copy", id="copy_reply"),
    ]

    def __init__(
        self,
        model: str | ModelChoice | None = None,
        *,
        home: str | Path | None = None,
        system_prompt: str = "",
        settings: SamplingSettings | None = None,
        conversation_id: int | None = None,
        trust_remote_code: bool = False,
        model_roots: Sequence[Path] | None = None,
        hub_cache: Path | None | bool = None,
        pick_model_on_start: bool = True,
    ) -> None:
        super().__init__()
        self.home = data_home(home)
        self.store = Store.open(self.home)
        self.model_spec: str | None = None
        self.model_name = ""  # the model's label, with its proxy-tuning and draft if any
        self.session: ChatSession | None = None
        self.loading: str | None = None
        self.trust_remote_code = trust_remote_code
        self.model_roots = (
            list(model_roots) if model_roots is not None else default_roots(self.home)
        )
        self.hub_cache = hub_cache
        self.default_system_prompt = system_prompt
        self.default_settings = settings or CHAT_DEFAULTS
        self.system_prompt = system_prompt
        self.settings = self.default_settings
        self.conversation: Conversation | None = None
        self.history: list[StoredMessage] = []
        self.reply: ReplyBuffer | None = None
        self.reply_item: MessageItem | None = None
        self.editing: StoredMessage | None = None
        self._initial_model = model
        self._initial_conversation = conversation_id
        self._pick_model_on_start = pick_model_on_start
        self._drain_timer: Timer | None = None
        self._last_save = 0.0

    # layout

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False, icon="◆")
        yield ChatLog(id="chat-log")
        yield SpeedPanel(id="speed")
        yield PromptArea(id="prompt", placeholder="Message (Enter sends, ctrl+j new line)")
        yield Footer(compact=True)

    @property
    def chat_log(self) -> ChatLog:
        return self.query_one("#chat-log", ChatLog)

    @property
    def speed(self) -> SpeedPanel:
        return self.query_one("#speed", SpeedPanel)

    @property
    def prompt(self) -> PromptArea:
        return self.query_one("#prompt", PromptArea)

    @property
    def generating(self) -> bool:
        return self.reply is not None

    async def on_mount(self) -> None:
        self.prompt.focus()
        if self._initial_conversation is not None:
            await self.open_conversation(self._initial_conversation)
        spec = self._initial_model or self.store.get_pref("last_model")
        if spec:
            self.load(spec)
            if self._initial_model is None:
                self.notify(
                    f"Reopened {label(spec)}, the model you used last; ctrl+l picks another",
                    timeout=6,
                )
        else:
            self.show_idle()
            if self._pick_model_on_start:
                self.action_pick_model()
        self.update_titles()

    def update_titles(self) -> None:
        self.title = f"appleslm · {self.model_name}" if self.model_spec else "appleslm"
        self.sub_title = self.conversation.title if self.conversation else "new conversation"

    def show_idle(self) -> None:
        """Between replies the speed panel says what is loaded (or the last reply's figures)."""
        if self.loading:
            self.speed.show_status(f"Loading {label(self.loading)}…")
        elif self.session is None:
            self.speed.show_status("No model loaded: ctrl+l picks one")
        elif self.speed.stats is None:
            session = self.session
            mode = "chat template" if session.chat_mode else "plain completion (no chat template)"
            context = f"context {session.context_length:,}" if session.context_length else ""
            self.speed.show_status(" · ".join(filter(None, [self.model_name, mode, context])))

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # The footer must fit 80 columns: Stop shows only while it can act, Regen/Edit hide
        # while a reply is being written.
        if action == "stop":
            return self.generating or self.editing is not None
        if action in ("regenerate", "edit_last"):
            return False if self.generating else None if not self.history else True
        return True

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        commands = [
            ("New conversation", "Start an empty conversation (ctrl+n)", self.action_new_chat),
            (
                "Conversations",
                "Open, rename, delete or export conversations (ctrl+o)",
                self.action_conversations,
            ),
            (
                "Switch model",
                "Pick a local model or one from the Hugging Face cache (ctrl+l)",
                self.action_pick_model,
            ),
            (
                "Settings",
                "System prompt and sampling for this conversation (ctrl+s)",
                self.action_settings,
            ),
            (
                "Regenerate last reply",
                "Write the last reply again (ctrl+r)",
                self.action_regenerate,
            ),
            (
                "Edit last message",
                "Edit and resend your last message (ctrl+e)",
                self.action_edit_last,
            ),
            ("Stop reply", "Stop the reply being written (esc)", self.action_stop),
            (
                "Copy last reply",
                "Copy the last reply to the clipboard (ctrl+y)",
                self.action_copy_reply,
            ),
            (
                "Copy last code block",
                "Copy the last code block of the conversation",
                self.action_copy_code,
            ),
            ("Rename conversation", "Give this conversation a title", self.action_rename),
            ("Export conversation", "Save this conversation as Markdown", self.action_export),
            ("Delete conversation", "Delete this conversation", self.action_delete),
        ]
        for title, help_text, callback in commands:
            yield SystemCommand(title, help_text, callback)

    # model loading

    def load(self, spec: str | ModelChoice) -> None:
        """Load a model (a `ModelChoice` also proxy-tunes it or gives it a draft)."""
        if self.generating:
            self.notify("Stop the reply before switching models", severity="warning")
            return
        choice = spec if isinstance(spec, ModelChoice) else ModelChoice(str(spec))
        self.loading = choice.model
        self.show_idle()
        self._load_worker(choice)

    @work(thread=True, exclusive=True, group="load", exit_on_error=False)
    def _load_worker(self, choice: ModelChoice) -> None:
        from appleslm.errors import AppleslmError
        from appleslm.generate import load_choice

        spec = choice.model
        try:
            model, tokenizer, draft = load_choice(choice, trust_remote_code=self.trust_remote_code)
            session, error = ChatSession(model, tokenizer, draft=draft), None
        except AppleslmError as e:
            session, error = None, str(e)
        except MemoryError:
            session, error = None, f"Out of memory while loading {label(spec)}"
        except Exception as e:  # a model we cannot run must not take the app down
            session, error = None, f"Cannot load {label(spec)}: {type(e).__name__}: {e}"
        self.post_message(ModelLoaded(choice, session, error))

    def on_model_loaded(self, message: ModelLoaded) -> None:
        self.loading = None
        if message.error is not None:
            self.notify(message.error, title="Model not loaded", severity="error", timeout=10)
            if self.session is None:
                self.speed.show_status(f"No model: {message.error}")
            else:
                self.show_idle()
            return
        self.session, self.model_spec = message.session, message.spec
        self.model_name = message.choice.describe(label)
        self.speed.stats = None
        recent = [message.spec] + [
            s for s in self.store.get_pref("recent_models", []) if s != message.spec
        ]
        self.store.set_pref("recent_models", recent[:RECENT_MODELS])
        self.store.set_pref("last_model", message.spec)
        if self.conversation is not None:
            self.store.update_conversation(self.conversation.id, model=message.spec)
        self.update_titles()
        self.show_idle()
        self.refresh_bindings()

    def model_entries(self) -> list[ModelEntry]:
        return list_models(
            self.model_roots,
            recent=self.store.get_pref("recent_models", []),
            hub_cache=self.hub_cache,
        )

    def action_pick_model(self) -> None:
        def picked(spec: str | None) -> None:
            if spec:
                self.load(spec)

        self.push_screen(ModelPickerScreen(self.model_entries(), current=self.model_spec), picked)

    # the conversation's messages

    def messages_for_model(self) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages += [
            {"role": m.role, "content": m.content}
            for m in self.history
            if m.role in ("user", "assistant")
        ]
        return messages

    # sending and replies

    @on(PromptArea.Submitted)
    async def on_prompt_submitted(self, event: PromptArea.Submitted) -> None:
        await self.send(event.text)

    async def send(self, text: str) -> None:
        """Add the user's message and start the reply to it."""
        text = text.strip()
        if not text:
            return
        if self.generating:
            self.notify("A reply is being written: wait, or stop it with esc", severity="warning")
            return
        if self.session is None:
            self.notify(
                "Loading the model, one moment"
                if self.loading
                else "No model loaded: press ctrl+l to pick one",
                severity="warning",
            )
            return
        if self.editing is not None:
            await self._drop_from(self.editing)
            self.editing = None
        if self.conversation is None:
            title = text.splitlines()[0][:48]
            self.conversation = self.store.create_conversation(
                title,
                model=self.model_spec,
                system_prompt=self.system_prompt,
                settings=self.settings.to_dict(),
            )
            self.store.set_pref("last_conversation", self.conversation.id)
            self.update_titles()
        message = self.save_message("user", text)
        self.history.append(message)
        await self.chat_log.add(MessageItem("user", text, message_id=message.id))
        self.prompt.clear()
        await self.start_reply()

    def save_message(self, role: str, text: str, status: str = "done") -> StoredMessage:
        """Store a new message of the open conversation. If another window on the same history
        deleted the conversation meanwhile, it is first saved again as a new one, so nothing
        shown here is lost."""
        try:
            return self.store.add_message(self.conversation.id, role, text, status=status)
        except ConversationGone:
            self.restore_conversation()
            return self.store.add_message(self.conversation.id, role, text, status=status)

    def restore_conversation(self) -> None:
        """Save the open conversation, as shown, under a new id (its stored copy is gone)."""
        old = self.conversation
        self.conversation = self.store.create_conversation(
            old.title,
            model=self.model_spec,
            system_prompt=old.system_prompt,
            settings=self.settings.to_dict(),
        )
        ids = {}
        for message in self.history:
            copy = self.store.add_message(
                self.conversation.id,
                message.role,
                message.content,
                status=message.status,
                stats=message.stats,
            )
            ids[message.id], message.id = copy.id, copy.id
            message.conversation_id = copy.conversation_id
        for item in self.chat_log.items:
            item.message_id = ids.get(item.message_id, item.message_id)
        if self.reply is not None:
            self.reply.message_id = ids.get(self.reply.message_id, self.reply.message_id)
        self.store.set_pref("last_conversation", self.conversation.id)
        self.notify(
            "This conversation was deleted in another window; it is saved again as a new one",
            severity="warning",
            timeout=8,
        )

    async def start_reply(self) -> None:
        assert self.session is not None and self.conversation is not None
        messages = self.messages_for_model()
        stored = self.save_message("assistant", "", status="streaming")
        self.history.append(stored)
        self.reply = ReplyBuffer(stored.id)
        self.reply_item = await self.chat_log.add(
            MessageItem("assistant", "", status="streaming", message_id=stored.id)
        )
        self.speed.show_status("Reading the prompt…")
        self._last_save = time.monotonic()
        self._drain_timer = self.set_interval(DRAIN_INTERVAL, self._drain)
        self.refresh_bindings()
        self._generate(self.session, messages, self.settings, self.reply)

    @work(thread=True, group="reply", exit_on_error=False)
    def _generate(
        self,
        session: ChatSession,
        messages: list[dict[str, str]],
        settings: SamplingSettings,
        buffer: ReplyBuffer,
    ) -> None:
        """The generation thread: stream tokens into `buffer`, then tell the UI."""
        error = None
        try:
            for response in session.stream(messages, settings, should_stop=buffer.stop_requested):
                buffer.push(response.text, session.stats)
        except GenerationError as e:
            error = str(e)
        except Exception as e:  # the app must survive whatever the model raises
            error = f"Generation failed: {type(e).__name__}: {e}"
        buffer.finish(session.stats, error)
        self.post_message(ReplyDone(buffer))

    async def _drain(self) -> None:
        buffer, item = self.reply, self.reply_item
        if buffer is None or item is None:
            return
        fragment, stats = buffer.take()
        if not fragment and stats is self.speed.stats:
            return  # nothing new: leave the CPU (and the GIL) to the model
        await item.append(fragment)
        if stats is not None and stats.generation_tokens:
            self.speed.show_stats(stats, "■ stopping…" if buffer.stopped else "●")
        if time.monotonic() - self._last_save > SAVE_INTERVAL:
            self._last_save = time.monotonic()
            if not self.store.update_message(buffer.message_id, content=buffer.text):
                self.restore_conversation()

    async def on_reply_done(self, message: ReplyDone) -> None:
        buffer, item = message.buffer, self.reply_item
        if buffer is not self.reply or item is None:
            return
        if self._drain_timer is not None:
            self._drain_timer.stop()
        await self._drain()
        status = "error" if buffer.error else "stopped" if buffer.stopped else "done"
        stats = buffer.stats if buffer.stats and buffer.stats.generation_tokens else None
        stored = self.history[-1]
        if buffer.error and not buffer.text:
            self.store.delete_messages_from(stored.id)
            self.history.pop()
            await self.chat_log.remove_from(item)
        else:
            stored.content, stored.status = buffer.text, status
            stored.stats = stats.to_dict() if stats else None
            update = dict(content=buffer.text, status=status, stats=stored.stats)
            if not self.store.update_message(stored.id, **update):
                self.restore_conversation()  # it brings this reply along, as it is now
            await item.finish(buffer.text, status, stats)
        if buffer.error:
            await self.chat_log.add(MessageItem("error", buffer.error))
        if stats is not None:
            state = {"done": "✓", "stopped": "■ stopped", "error": "✗"}[status]
            self.speed.show_stats(stats, state)
        else:
            self.speed.stats = None
            self.show_idle()
        self.reply, self.reply_item = None, None  # only now is the app idle again
        self.refresh_bindings()

    async def _drop_from(self, message: StoredMessage) -> None:
        """Delete `message` and everything after it, from the store and the screen."""
        index = next(i for i, m in enumerate(self.history) if m.id == message.id)
        self.store.delete_messages_from(message.id)
        self.history = self.history[:index]
        items = [i for i in self.chat_log.items if i.message_id == message.id]
        if items:
            await self.chat_log.remove_from(items[0])
        for error in self.chat_log.query(".error"):
            await error.remove()

    def action_stop(self) -> None:
        if self.reply is not None:
            self.reply.request_stop()
            if self.speed.stats is None:
                self.speed.show_status("■ stopping…")
        elif self.editing is not None:
            self.editing = None
            for item in self.chat_log.items:
                item.remove_class("editing")
            self.prompt.clear()
            self.refresh_bindings()

    async def action_regenerate(self) -> None:
        if self.generating or self.session is None or not self.history:
            return
        last = self.history[-1]
        if last.role == "assistant":
            await self._drop_from(last)
        elif last.role != "user":
            return
        for error in self.chat_log.query(".error"):
            await error.remove()
        await self.start_reply()

    def action_edit_last(self) -> None:
        if self.generating:
            return
        users = [m for m in self.history if m.role == "user"]
        if not users:
            return
        self.editing = users[-1]
        editing = False
        for item in self.chat_log.items:
            editing = editing or item.message_id == self.editing.id
            item.set_class(editing, "editing")
        self.prompt.load_text(self.editing.content)
        self.prompt.move_cursor(self.prompt.document.end)
        self.prompt.focus()
        self.notify("Editing your last message: Enter resends, esc cancels", timeout=4)
        self.refresh_bindings()

    def last_reply(self) -> StoredMessage | None:
        return next((m for m in reversed(self.history) if m.role == "assistant"), None)

    def action_copy_reply(self) -> None:
        reply = self.last_reply()
        if reply is None:
            self.notify("No reply to copy yet", severity="warning")
            return
        self.copy_to_clipboard(reply.content)
        self.notify("Reply copied", timeout=2)

    def action_copy_code(self) -> None:
        blocks = [b for m in self.history for b in code_blocks(m.content)]
        if not blocks:
            self.notify("No code block in this conversation", severity="warning")
            return
        self.copy_to_clipboard(blocks[-1])
        self.notify("Code block copied", timeout=2)

    # shutdown

    def stop_generation(self, timeout: float = 5.0) -> None:
        """Stop a running reply and wait (briefly) for its thread, keeping what it wrote."""
        buffer = self.reply
        if buffer is None:
            return
        buffer.request_stop()
        buffer.done.wait(timeout)
        buffer.take()
        stats = buffer.stats.to_dict() if buffer.stats else None
        update = dict(content=buffer.text, status="stopped", stats=stats)
        if not self.store.update_message(buffer.message_id, **update):
            self.history[-1].content, self.history[-1].status = buffer.text, "stopped"
            self.restore_conversation()

    async def action_quit(self) -> None:
        self.stop_generation()
        self.exit()

    def on_unmount(self) -> None:
        self.stop_generation()
        self.store.close()


def run_chat(
    model: str | ModelChoice | None = None,
    *,
    system_prompt: str = "",
    settings: SamplingSettings | None = None,
    home: str | Path | None = None,
    trust_remote_code: bool = False,
) -> None:
    """Open the chat app (what `appleslm chat [MODEL]` runs)."""
    ChatApp(
        model,
        system_prompt=system_prompt,
        settings=settings or CHAT_DEFAULTS,
        home=home,
        trust_remote_code=trust_remote_code,
    ).run()


__all__ = ["CHAT_DEFAULTS", "ChatApp", "run_chat"]
