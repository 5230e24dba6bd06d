"""`appleslm chat MODEL_A MODEL_B`: the same prompt to two models, side by side.

Each pane has its own `ChatSession` (its own KV cache, reused from turn to turn) and its own speed
panel; each model sees the conversation with its own earlier replies. The conversation is stored
as one conversation: the user's message once, then both replies, each with the figures of its
model and the model's name (`stats["model"]`).

Both replies are written by one generation thread. By default it takes a token from each model
in turn, so the two panes stream at once (and each model's tokens/s then counts the time the
other model takes too, as on a shared machine); `one_at_a_time` writes model A's reply and then
B's, so each figure is the model's alone. MLX evaluates one graph at a time either way.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.timer import Timer
from textual.widgets import Footer, Header

from appleslm.generate import ChatSession, GenerationError, ModelChoice, SamplingSettings
from appleslm_tui.model_list import label
from appleslm_tui.reply import ReplyBuffer
from appleslm_tui.store import Conversation, Store, data_home
from appleslm_tui.widgets import ChatLog, MessageItem, PromptArea, SpeedPanel

SIDES = ("a", "b")
DRAIN_INTERVAL = 1 / 15


class ArenaLoaded(Message):
    def __init__(self, sessions: list[ChatSession] | None, error: str | None) -> None:
        super().__init__()
        self.sessions, self.error = sessions, error


class RepliesDone(Message):
    pass


def interleave(streams: list[Iterator]) -> Iterator[tuple[int, object]]:
    """(index, item) of several iterators, one item of each in turn until all are exhausted."""
    live = list(enumerate(streams))
    while live:
        for entry in list(live):
            index, stream = entry
            try:
                yield index, next(stream)
            except StopIteration:
                live.remove(entry)


class ArenaApp(App):
    """Two models answer every prompt side by side."""

    CSS_PATH = "chat.tcss"
    TITLE = "appleslm arena"
    BINDINGS = [
        Binding("escape", "stop", "Stop", id="stop"),
        Binding("ctrl+n", "new_chat", "New", id="new_chat"),
    ]

    def __init__(
        self,
        model_a: str | ModelChoice,
        model_b: str | ModelChoice,
        *,
        home: str | Path | None = None,
        system_prompt: str = "",
        settings: SamplingSettings | None = None,
        trust_remote_code: bool = False,
        one_at_a_time: bool = False,
    ) -> None:
        super().__init__()
        self.choices = [
            m if isinstance(m, ModelChoice) else ModelChoice(str(m))
            for m in (
                model_a,
                model_b,
            )
        ]
        self.names = [c.describe(label) for c in self.choices]
        self.store = Store.open(data_home(home))
        self.system_prompt = system_prompt
        self.settings = settings or SamplingSettings()
        self.trust_remote_code = trust_remote_code
        self.one_at_a_time = one_at_a_time
        self.sessions: list[ChatSession] | None = None
        self.conversation: Conversation | None = None
        self.histories: list[list[dict[str, str]]] = [[], []]  # each model's own view
        self.buffers: list[ReplyBuffer] | None = None
        self.items: list[MessageItem] = []
        self._drain_timer: Timer | None = None

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False, icon="◆")
        with Horizontal(id="arena"):
            for side in SIDES:
                with Vertical(classes="arena-pane"):
                    yield ChatLog(id=f"log-{side}", classes="arena-log")
                    yield SpeedPanel(id=f"speed-{side}", classes="arena-speed")
        yield PromptArea(id="prompt", placeholder="Message to both (Enter sends)")
        yield Footer(compact=True)

    def log_of(self, i: int) -> ChatLog:
        return self.query_one(f"#log-{SIDES[i]}", ChatLog)

    def speed_of(self, i: int) -> SpeedPanel:
        return self.query_one(f"#speed-{SIDES[i]}", SpeedPanel)

    @property
    def generating(self) -> bool:
        return self.buffers is not None

    @property
    def mode(self) -> str:
        return "one after the other" if self.one_at_a_time else "both at once, token by token"

    def on_mount(self) -> None:
        self.sub_title = f"{self.names[0]}  vs  {self.names[1]} · {self.mode}"
        for i, name in enumerate(self.names):
            self.speed_of(i).show_status(f"Loading {name}…")
        self.prompt.focus()
        self._load()

    @property
    def prompt(self) -> PromptArea:
        return self.query_one("#prompt", PromptArea)

    @work(thread=True, exclusive=True, group="load", exit_on_error=False)
    def _load(self) -> None:
        from appleslm.errors import AppleslmError
        from appleslm.generate import load_choice

        sessions, error = [], None
        for choice, name in zip(self.choices, self.names):
            try:
                model, tokenizer, draft = load_choice(
                    choice, trust_remote_code=self.trust_remote_code
                )
                sessions.append(ChatSession(model, tokenizer, draft=draft))
            except AppleslmError as e:
                error = str(e)
            except Exception as e:  # a model we cannot run must not take the app down
                error = f"Cannot load {name}: {type(e).__name__}: {e}"
            if error:
                break
        self.post_message(ArenaLoaded(None if error else sessions, error))

    def on_arena_loaded(self, message: ArenaLoaded) -> None:
        if message.error is not None:
            self.notify(message.error, title="Model not loaded", severity="error", timeout=10)
            for i in range(2):
                self.speed_of(i).show_status(f"Not loaded: {message.error}")
            return
        self.sessions = message.sessions
        for i, session in enumerate(self.sessions):
            mode = "chat template" if session.chat_mode else "plain completion"
            self.speed_of(i).show_status(f"{self.names[i]} · {mode} · {self.mode}")

    async def on_prompt_area_submitted(self, event: PromptArea.Submitted) -> None:
        await self.send(event.text)

    async def send(self, text: str) -> None:
        text = text.strip()
        if not text:
            return
        if self.generating:
            self.notify("The replies are being written: wait, or stop them with esc")
            return
        if self.sessions is None:
            self.notify("The models are still loading", severity="warning")
            return
        if self.conversation is None:
            self.conversation = self.store.create_conversation(
                text.splitlines()[0][:48],
                model=" | ".join(c.model for c in self.choices),
                system_prompt=self.system_prompt,
                settings=self.settings.to_dict(),
            )
        user = self.store.add_message(self.conversation.id, "user", text)
        self.prompt.clear()
        self.buffers, self.items = [], []
        for i in range(2):
            self.histories[i].append({"role": "user", "content": text})
            await self.log_of(i).add(MessageItem("user", text, message_id=user.id))
            stored = self.store.add_message(
                self.conversation.id, "assistant", "", status="streaming"
            )
            self.buffers.append(ReplyBuffer(stored.id))
            self.items.append(
                await self.log_of(i).add(
                    MessageItem("assistant", "", status="streaming", message_id=stored.id)
                )
            )
            self.speed_of(i).show_status("Reading the prompt…")
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages = [system + history for history in self.histories]
        self._drain_timer = self.set_interval(DRAIN_INTERVAL, self._drain)
        self._generate(self.sessions, messages, self.buffers)

    @work(thread=True, group="reply", exit_on_error=False)
    def _generate(
        self, sessions: list[ChatSession], messages: list[list[dict]], buffers: list[ReplyBuffer]
    ) -> None:
        streams = [
            s.stream(m, self.settings, should_stop=b.stop_requested)
            for s, m, b in zip(sessions, messages, buffers)
        ]
        order = (
            ((i, r) for i, stream in enumerate(streams) for r in stream)
            if self.one_at_a_time
            else interleave(streams)
        )
        errors: list[str | None] = [None, None]
        try:
            for i, response in order:
                buffers[i].push(response.text, sessions[i].stats)
        except GenerationError as e:
            errors = [str(e)] * 2
        except Exception as e:  # the app must survive whatever a model raises
            errors = [f"Generation failed: {type(e).__name__}: {e}"] * 2
        for stream in streams:
            stream.close()
        for session, buffer, error in zip(sessions, buffers, errors):
            buffer.finish(session.stats, error)
        self.post_message(RepliesDone())

    async def _drain(self) -> None:
        if self.buffers is None:
            return
        for i, (buffer, item) in enumerate(zip(self.buffers, self.items)):
            fragment, stats = buffer.take()
            await item.append(fragment)
            if stats is not None and stats.generation_tokens:
                self.speed_of(i).show_stats(stats, "●" if not buffer.done.is_set() else "✓")

    async def on_replies_done(self, message: RepliesDone) -> None:
        if self._drain_timer is not None:
            self._drain_timer.stop()
        await self._drain()
        for i, (buffer, item) in enumerate(zip(self.buffers, self.items)):
            status = "error" if buffer.error else "stopped" if buffer.stopped else "done"
            stats = buffer.stats if buffer.stats and buffer.stats.generation_tokens else None
            record = {**(stats.to_dict() if stats else {}), "model": self.names[i]}
            self.store.update_message(
                buffer.message_id, content=buffer.text, status=status, stats=record
            )
            self.histories[i].append({"role": "assistant", "content": buffer.text})
            await item.finish(buffer.text, status, stats)
            if buffer.error:
                await self.log_of(i).add(MessageItem("error", buffer.error))
            if stats is not None:
                self.speed_of(i).show_stats(
                    stats, {"done": "✓", "stopped": "■", "error": "✗"}[status]
                )
        self.buffers = None

    def action_stop(self) -> None:
        for buffer in self.buffers or []:
            buffer.request_stop()

    async def action_new_chat(self) -> None:
        if self.generating:
            self.notify("Stop the replies first (esc)", severity="warning")
            return
        self.conversation, self.histories = None, [[], []]
        for i in range(2):
            await self.log_of(i).clear()


def run_arena(
    model_a: str | ModelChoice,
    model_b: str | ModelChoice,
    *,
    system_prompt: str = "",
    settings: SamplingSettings | None = None,
    home: str | Path | None = None,
    trust_remote_code: bool = False,
    one_at_a_time: bool = False,
) -> None:
    """Open the arena (what `appleslm chat MODEL_A MODEL_B` runs)."""
    ArenaApp(
        model_a,
        model_b,
        system_prompt=system_prompt,
        settings=settings,
        home=home,
        trust_remote_code=trust_remote_code,
        one_at_a_time=one_at_a_time,
    ).run()


__all__ = ["ArenaApp", "interleave", "run_arena"]
