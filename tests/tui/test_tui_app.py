"""The chat app end to end, with Pilot and a real (random-weight) MLX model."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import mlx.core as mx
from textual.widgets import Input, OptionList

import appleslm.generate as generate
from appleslm.generate import ModelChoice, SamplingSettings
from appleslm_tui.app import ModelLoaded
from appleslm_tui.model_list import ModelEntry
from appleslm_tui.reply import ReplyBuffer
from appleslm_tui.screens import ConversationsScreen, ModelPickerScreen, SettingsScreen
from appleslm_tui.store import Store
from appleslm_tui.widgets import MessageItem
from tests.tui.tui_helpers import (
    notifications,
    press_now,
    ready,
    send,
    until_closed,
    wait_until,
)

SIZE = (80, 24)


async def test_a_prompt_streams_a_reply_with_live_figures(make_app, tiny_model_dir, monkeypatch):
    live: list[tuple[bool, int]] = []  # (still generating, tokens on the panel) per refresh
    append = MessageItem.append

    async def watch(item: MessageItem, fragment: str) -> None:
        await append(item, fragment)
        if fragment:
            stats = item.app.speed.stats
            live.append((item.app.generating, stats.generation_tokens if stats else 0))

    monkeypatch.setattr(MessageItem, "append", watch)
    push = ReplyBuffer.push

    def write_slowly(buffer: ReplyBuffer, fragment: str, stats) -> None:
        # the tiny model can write its 1000 tokens between two of the UI's drains (the first
        # render of a cold process is slow): at 3 ms a token the reply spans several
        time.sleep(0.003)
        push(buffer, fragment, stats)

    monkeypatch.setattr(ReplyBuffer, "push", write_slowly)
    app = make_app(tiny_model_dir, settings=SamplingSettings(max_tokens=1000))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "The Congress shall have power")
        await wait_until(pilot, lambda: not app.generating)
        user, reply = app.history
        assert (user.role, user.content) == ("user", "The Congress shall have power")
        assert reply.role == "assistant" and reply.status == "done" and reply.content
        item = app.chat_log.items[-1]
        assert item.content == reply.content and item.status == "done"
        # the panel shows the figures of mlx-lm's last GenerationResponse for this reply
        assert app.speed.stats == app.session.stats
        assert reply.stats == app.session.stats.to_dict()
        assert app.session.stats.generation_tokens in range(1, 1001)
        # the text and the figures arrived in pieces while the model was still writing
        assert len(live) >= 2 and all(generating for generating, _ in live)
        assert 0 < live[1][1] < live[-1][1]
        stored = Store.open(app.home)
        assert [m.content for m in stored.messages(app.conversation.id)] == [
            user.content,
            reply.content,
        ]
        stored.close()


async def test_escape_stops_the_reply_and_keeps_it(make_app, tiny_model_dir):
    app = make_app(tiny_model_dir, settings=SamplingSettings(max_tokens=100_000))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "to lay and collect taxes")
        await wait_until(
            pilot, lambda: app.speed.stats is not None and app.speed.stats.generation_tokens >= 20
        )
        asked = time.monotonic()
        press_now(app, "ctrl+o")  # the UI answers while the model writes
        while not isinstance(app.screen, ConversationsScreen):
            await asyncio.sleep(0.005)
        assert app.generating and time.monotonic() - asked < 1.0
        app.screen.dismiss(None)
        await until_closed(app, ConversationsScreen)
        await pilot.press("escape")  # stops the reply
        await wait_until(pilot, lambda: not app.generating, timeout=5)
        reply = app.history[-1]
        assert reply.status == "stopped" and reply.content
        limit = app.session.context_length - len(
            app.session.render([{"role": "user", "content": "to lay and collect taxes"}])
        )
        assert app.session.stats.generation_tokens < limit
        assert app.chat_log.items[-1].status == "stopped"
        assert "stopped" in app.chat_log.items[-1].header_text()
        store = Store.open(app.home)
        assert store.messages(app.conversation.id)[-1].content == reply.content
        store.close()
        app.settings = SamplingSettings(max_tokens=8)
        await send(pilot, "more")  # the conversation goes on after a stop
        await wait_until(pilot, lambda: len(app.history) == 4 and not app.generating)
        assert app.session.stats.cached_tokens > 0


async def test_history_survives_a_restart(make_app, tiny_model_dir):
    app = make_app(tiny_model_dir)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "first question")
        await wait_until(pilot, lambda: len(app.history) == 2 and not app.generating)
        expected = [(m.role, m.content) for m in app.history]
        title = app.conversation.title
    again = make_app(tiny_model_dir)
    async with again.run_test(size=SIZE) as pilot:
        await ready(pilot)
        assert again.chat_log.items == []
        await pilot.press("ctrl+o")
        await wait_until(pilot, lambda: isinstance(again.screen, ConversationsScreen))
        await pilot.press("enter")
        await wait_until(pilot, lambda: len(again.chat_log.items) == 2)
        assert [(i.role, i.content) for i in again.chat_log.items] == expected
        assert again.conversation.title == title == "first question"
        await send(pilot, "second question")  # and it continues where it was
        await wait_until(pilot, lambda: len(again.history) == 4 and not again.generating)


async def test_settings_change_the_sampler_and_are_remembered(
    make_app, tiny_model_dir, monkeypatch
):
    seen: list[dict] = []
    greedy = generate.make_sampler()

    def spy(**kwargs):
        seen.append(kwargs)
        return greedy  # the real one would compile a sampling kernel: slow and not the point

    monkeypatch.setattr(generate, "make_sampler", spy)
    seeds: list[int] = []
    monkeypatch.setattr(generate.mx.random, "seed", lambda s: seeds.append(s) or mx.random.key(s))
    app = make_app(tiny_model_dir)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "hello")
        await wait_until(pilot, lambda: len(app.history) == 2 and not app.generating)
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: isinstance(app.screen, SettingsScreen))
        values = {
            "temperature": "0.5",
            "top_p": "0.8",
            "top_k": "7",
            "min_p": "0.1",
            "repetition_penalty": "1.2",
            "max_tokens": "5",
            "seed": "42",
        }
        for name, value in values.items():
            app.screen.query_one(f"#{name}", Input).value = value
        app.screen.query_one("#system-prompt").load_text("You are terse.")
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: not isinstance(app.screen, SettingsScreen))
        await send(pilot, "again")
        await wait_until(pilot, lambda: len(app.history) == 4 and not app.generating)
        assert seen[-1] == {"temp": 0.5, "top_p": 0.8, "min_p": 0.1, "top_k": 7}
        assert seeds[-1] == 42
        assert app.session.stats.generation_tokens <= 5
        conversation_id = app.conversation.id
    reopened = make_app(tiny_model_dir, conversation_id=conversation_id)
    async with reopened.run_test(size=SIZE) as pilot:
        await ready(pilot)
        assert reopened.settings == SamplingSettings(0.5, 0.8, 7, 0.1, 1.2, 5, 42)
        assert reopened.system_prompt == "You are terse."
        assert reopened.messages_for_model()[0] == {"role": "system", "content": "You are terse."}


async def test_bad_settings_are_refused_in_the_dialog(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: isinstance(app.screen, SettingsScreen))
        app.screen.query_one("#top_p", Input).value = "2"
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert isinstance(app.screen, SettingsScreen)
        assert "top-p" in str(app.screen.query_one("#settings-error").render())
        await pilot.press("escape")
        assert app.settings.top_p == app.default_settings.top_p


async def test_a_missing_model_is_an_error_in_the_app(make_app, tmp_path):
    app = make_app(tmp_path / "no-such-model")
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await wait_until(pilot, lambda: app.loading is None)
        assert app.session is None
        assert any("no-such-model" in n for n in notifications(app))
        assert "No model" in str(app.speed.render())
        await send(pilot, "hello?")
        assert app.history == [] and app.is_running
        assert any("No model loaded" in n for n in notifications(app))


async def test_a_corrupt_model_is_an_error_in_the_app(make_app, tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    app = make_app(broken)
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await wait_until(pilot, lambda: app.loading is None)
        assert app.session is None and app.is_running
        assert any("not valid JSON" in n for n in notifications(app))


async def test_a_prompt_longer_than_the_context_is_an_error(make_app, short_context_model_dir):
    app = make_app(short_context_model_dir)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "the general welfare " * 40)
        await wait_until(pilot, lambda: not app.generating and app.chat_log.query(".error"))
        error = app.chat_log.query_one(".error", MessageItem)
        assert "context is 64 tokens" in error.content
        assert [m.role for m in app.history] == ["user"]  # the message stays, no empty reply
        await pilot.press("ctrl+e")  # it can be shortened and resent
        app.prompt.load_text("taxes")
        await pilot.press("enter")
        await wait_until(pilot, lambda: len(app.history) == 2 and not app.generating)
        assert [m.content for m in app.history][0] == "taxes"
        assert not app.chat_log.query(".error")


async def test_running_out_of_memory_is_an_error(make_app, tiny_model_dir, monkeypatch):
    def exhausted(*args, **kwargs):
        raise RuntimeError("[malloc] Unable to allocate 9876543210 bytes")
        yield

    monkeypatch.setattr(generate, "stream_generate", exhausted)
    app = make_app(tiny_model_dir)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "hello")
        await wait_until(pilot, lambda: not app.generating and app.chat_log.query(".error"))
        assert "Out of memory" in app.chat_log.query_one(".error", MessageItem).content
        assert app.is_running
        monkeypatch.undo()
        await pilot.press("ctrl+r")  # retry once memory is back
        await wait_until(pilot, lambda: len(app.history) == 2 and not app.generating)
        assert app.history[-1].status == "done"


async def test_regenerate_and_edit_the_last_message(make_app, tiny_model_dir):
    app = make_app(tiny_model_dir)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "hello")
        await wait_until(pilot, lambda: len(app.history) == 2 and not app.generating)
        first, first_id = app.history[-1].content, app.history[-1].id
        prompt_tokens = len(app.session.render([{"role": "user", "content": "hello"}]))
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: app.history[-1].id != first_id and not app.generating)
        assert [m.role for m in app.history] == ["user", "assistant"]
        assert app.history[-1].content == first  # greedy: the same reply again
        assert app.session.stats.cached_tokens == prompt_tokens - 1  # trimmed, not re-read
        await pilot.press("ctrl+e")
        assert app.prompt.text == "hello"
        assert all(item.has_class("editing") for item in app.chat_log.items)
        await pilot.press("end", *" world", "enter")
        await wait_until(
            pilot,
            lambda: (
                len(app.history) == 2
                and not app.generating
                and app.history[0].content == "hello world"
            ),
        )
        assert [i.content for i in app.chat_log.items][0] == "hello world"
        store = Store.open(app.home)
        assert [m.content for m in store.messages(app.conversation.id)] == [
            "hello world",
            app.history[-1].content,
        ]
        store.close()
        await pilot.press("ctrl+e")  # Esc abandons an edit
        await pilot.press("escape")
        assert app.editing is None and app.prompt.text == ""
        assert not any(item.has_class("editing") for item in app.chat_log.items)


async def test_copy_a_message_and_a_code_block(make_app, tmp_path):
    store = Store.open(tmp_path / "home")
    conversation = store.create_conversation("code")
    store.add_message(conversation.id, "user", "show code")
    reply = "Here:\n\n```python\nprint('hi')\n```\n\nand\n\n```\nls -l\n```"
    store.add_message(conversation.id, "assistant", reply)
    store.close()
    app = make_app(conversation_id=conversation.id)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: len(app.chat_log.items) == 2)
        await pilot.press("ctrl+y")
        assert app.clipboard == reply
        item = app.chat_log.items[-1]
        item.focus()
        await pilot.press("y")
        assert app.clipboard == "ls -l"
        await pilot.press("c")
        assert app.clipboard == reply
        app.action_copy_code()
        assert app.clipboard == "ls -l"
        fence = item.body.query("MarkdownFence").first()
        await pilot.click(fence)
        assert app.clipboard == "print('hi')"


async def test_conversations_rename_export_delete(make_app, tmp_path):
    store = Store.open(tmp_path / "home")
    older = store.create_conversation("older", now=1.0)
    store.add_message(older.id, "user", "hi", now=2.0)
    newer = store.create_conversation("newer", now=3.0)
    store.close()
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+o")
        await wait_until(pilot, lambda: isinstance(app.screen, ConversationsScreen))
        screen = app.screen
        assert [c.title for c in screen.conversations] == ["newer", "older"]
        await pilot.press("down", "r")
        await wait_until(pilot, lambda: app.screen is not screen)
        app.screen.query_one(Input).value = "renamed"
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.screen is screen)
        assert app.store.get_conversation(older.id).title == "renamed"
        await pilot.press("e")
        await wait_until(pilot, lambda: app.screen is not screen)
        assert app.screen.query_one(Input).value == "renamed.md"
        target = tmp_path / "out.md"
        app.screen.query_one(Input).value = str(target)
        await pilot.press("enter")
        await wait_until(pilot, lambda: target.exists())
        assert (
            target.read_text().startswith("# renamed\n") and "## User\n\nhi" in target.read_text()
        )
        await pilot.press("up", "d")
        await wait_until(pilot, lambda: app.screen is not screen)
        await pilot.press("y")
        await wait_until(pilot, lambda: app.screen is screen)
        assert app.store.get_conversation(newer.id) is None
        assert [c.title for c in screen.conversations] == ["renamed"]
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.conversation is not None)
        assert app.conversation.id == older.id and app.sub_title == "renamed"


async def test_pick_and_switch_models_mid_conversation(
    make_app, tiny_model_dir, short_context_model_dir
):
    app = make_app(
        tiny_model_dir,
        model_roots=[short_context_model_dir.parent, tiny_model_dir.parent],
        settings=SamplingSettings(max_tokens=8),
    )  # all fits in the short context
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "hi")
        await wait_until(pilot, lambda: len(app.history) == 2 and not app.generating)
        await pilot.press("ctrl+l")
        await wait_until(pilot, lambda: isinstance(app.screen, ModelPickerScreen))
        entries: list[ModelEntry] = app.screen.entries
        assert [e.name for e in entries] == ["tiny", "short"]  # recent first, then local
        assert entries[0].source == "recent" and "appleslm" in entries[1].detail
        options = app.screen.query_one(OptionList)
        options.highlighted = 1
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.model_spec == str(short_context_model_dir))
        assert app.session.context_length == 64 and app.title.endswith("short")
        await send(pilot, "yo")  # the conversation continues on the new model
        await wait_until(pilot, lambda: len(app.history) == 4 and not app.generating)
        assert app.store.get_conversation(app.conversation.id).model == app.model_spec
        assert app.store.get_pref("last_model") == app.model_spec


async def test_footer_and_palette(make_app, tiny_model_dir):
    app = make_app(tiny_model_dir)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        footer = {
            b.action
            for _, b, enabled, _ in app.screen.active_bindings.values()
            if b.show and enabled
        }
        assert {"new_chat", "conversations", "pick_model", "settings"} <= footer
        titles = [c.title for c in app.get_system_commands(app.screen)]
        for title in (
            "New conversation",
            "Switch model",
            "Regenerate last reply",
            "Edit last message",
            "Copy last code block",
            "Export conversation",
        ):
            assert title in titles
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"switch model", "enter")
        await wait_until(pilot, lambda: isinstance(app.screen, ModelPickerScreen))


async def test_a_conversation_deleted_in_another_window_loses_nothing(make_app, tiny_model_dir):
    app = make_app(tiny_model_dir, settings=SamplingSettings(max_tokens=8))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "first question")
        await wait_until(pilot, lambda: len(app.history) == 2 and not app.generating)
        other = Store.open(app.home)  # a second window on the same history
        first = app.conversation.id
        other.update_conversation(first, title="renamed elsewhere")
        other.delete_conversation(first)
        await send(pilot, "second question")  # the typed message must survive
        await wait_until(pilot, lambda: len(app.history) == 4 and not app.generating)
        assert any("deleted in another window" in n for n in notifications(app))
        assert app.conversation.id != first
        saved = other.messages(app.conversation.id)
        assert [m.content for m in saved] == [m.content for m in app.history]
        assert saved[2].content == "second question" and saved[3].status == "done"

        app.settings = SamplingSettings(max_tokens=100_000)  # deleted while a reply streams
        await send(pilot, "third question")
        # the panel still shows the last reply's figures: wait for this one's first text
        await wait_until(pilot, lambda: app.generating and bool(app.reply and app.reply.text))
        other.delete_conversation(app.conversation.id)
        press_now(app, "escape")  # pilot.press would wait for an idle CPU, which a model never is
        await wait_until(pilot, lambda: not app.generating, timeout=10)
        saved = other.messages(app.conversation.id)
        assert saved[-2].content == "third question" and saved[-1].status == "stopped"
        assert saved[-1].content == app.history[-1].content and saved[-1].content
        other.close()


def end_in_view(log) -> bool:
    """Whether the bottom of the log's last message is on screen."""
    return log.items[-1].region.bottom <= log.region.bottom


async def stream_scripted(app, pilot, session, prompt: str) -> None:
    messages = app.messages_for_model() + [{"role": "user", "content": prompt}]
    session.model.prompt_length = len(session.render(messages))
    before = len(app.history)
    await send(pilot, prompt)
    await wait_until(pilot, lambda: len(app.history) == before + 2 and not app.generating)


async def test_the_log_follows_a_markdown_reply_and_shows_its_end(make_app, scripted, monkeypatch):
    session, _ = scripted
    at_end: list[bool] = []  # before each fragment: is the end of the log in view?
    append = MessageItem.append

    async def watch(item: MessageItem, fragment: str) -> None:
        at_end.append(end_in_view(item.app.chat_log))
        await append(item, fragment)

    monkeypatch.setattr(MessageItem, "append", watch)
    app = make_app(settings=SamplingSettings(max_tokens=1000))
    async with app.run_test(size=SIZE) as pilot:
        app.post_message(ModelLoaded("scripted", session, None))
        await wait_until(pilot, lambda: app.session is session)
        await stream_scripted(app, pilot, session, "Plan the taxes")
        reply = app.history[-1].content
        assert "```python" in reply and "| imposts | 5% |" in reply and "2. Then" in reply
        assert len(at_end) > 5 and all(at_end), [i for i, x in enumerate(at_end) if not x]
        log = app.chat_log
        await wait_until(pilot, lambda: end_in_view(log))  # the end of the finished reply shows
        assert log.virtual_size.height > log.size.height  # and the reply is taller than the log

        # Scrolled up on purpose while a reply streams, the log stays where the user put it...
        fragments = 0

        async def scroll_up_midway(item: MessageItem, fragment: str) -> None:
            nonlocal fragments
            fragments += 1
            if fragments == 3:
                item.app.chat_log.scroll_home(animate=False)  # what the mouse wheel or Home does
            await append(item, fragment)

        monkeypatch.setattr(MessageItem, "append", scroll_up_midway)
        session.reset()
        app.history.clear()
        await stream_scripted(app, pilot, session, "Again")
        await pilot.pause(0.2)
        assert fragments > 5 and not end_in_view(log) and log.scroll_y < 3
        # ...and the next message sent follows the end again.
        monkeypatch.setattr(MessageItem, "append", append)
        session.reset()
        app.history.clear()
        await stream_scripted(app, pilot, session, "Once more")
        await wait_until(pilot, lambda: end_in_view(log))


async def test_the_picker_finds_runs_types_at_once_and_marks_the_current_model(
    make_app, tiny_model_dir, tmp_path, monkeypatch
):
    import shutil

    for run in ("tiny", "tiny-chat"):
        shutil.copytree(tiny_model_dir, tmp_path / "work" / "runs" / run / "model")
    monkeypatch.chdir(tmp_path / "work")
    current = "runs/tiny/model"
    app = make_app(current, model_roots=[Path.cwd()])
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        assert app.title == "appleslm · tiny"  # named after its run, not "model"
        press_now(app, "ctrl+l")
        await wait_until(pilot, lambda: isinstance(app.screen, ModelPickerScreen))
        picker = app.screen
        assert [e.name for e in picker.entries] == ["tiny", "tiny-chat"]
        marked = [str(o.prompt) for o in picker.query_one(OptionList).options]
        assert marked[0].startswith("● tiny") and not marked[1].startswith("●")
        assert isinstance(app.focused, Input)  # typing a path works at once
        await pilot.press(*"runs/tiny-chat/model", "enter")
        await wait_until(pilot, lambda: app.model_spec == "runs/tiny-chat/model" and app.session)
        assert app.title == "appleslm · tiny-chat"


async def test_a_reused_cache_shows_what_was_reused_and_read(make_app, tiny_model_dir):
    from appleslm_tui.widgets.speed import format_stats

    app = make_app(tiny_model_dir, settings=SamplingSettings(max_tokens=4))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "The Congress")
        await wait_until(pilot, lambda: len(app.history) == 2 and not app.generating)
        assert "tok/s" in str(format_stats(app.session.stats)).split("·")[1]
        await send(pilot, "shall")
        await wait_until(pilot, lambda: len(app.history) == 4 and not app.generating)
        stats = app.session.stats
        assert stats.cached_tokens > 0
        assert f"{stats.cached_tokens} reused + {stats.prompt_tokens} read" in str(
            format_stats(stats)
        )


async def test_a_system_prompt_set_mid_conversation_is_exported_where_it_was_set(
    make_app, tiny_model_dir
):
    app = make_app(tiny_model_dir, settings=SamplingSettings(max_tokens=4))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "The Congress")
        await wait_until(pilot, lambda: len(app.history) == 2 and not app.generating)
        press_now(app, "ctrl+s")
        await wait_until(pilot, lambda: isinstance(app.screen, SettingsScreen))
        app.screen.query_one("#system-prompt").load_text("Answer in verse.")
        app.screen.action_save()
        await until_closed(app, SettingsScreen)
        await wait_until(pilot, lambda: app.system_prompt == "Answer in verse.")
        await send(pilot, "shall")
        await wait_until(pilot, lambda: len(app.history) == 4 and not app.generating)
        exported = app.store.export_markdown(app.conversation.id)
        headings = [line for line in exported.splitlines() if line.startswith("## ")]
        assert headings == [
            "## User",
            "## Assistant",
            "## System prompt, from here on",
            "## User",
            "## Assistant",
        ]
        assert app.messages_for_model()[0] == {"role": "system", "content": "Answer in verse."}
        await app.open_conversation(app.conversation.id)  # reopened, the prompt is the latest
        assert app.system_prompt == "Answer in verse."


async def test_a_proxy_tuned_model_with_a_draft_shows_its_acceptance(make_app, tiny_model_dir):
    spec = str(tiny_model_dir)
    choice = ModelChoice(spec, proxy=(spec, spec), alpha=0.5, draft=spec, draft_tokens=2)
    app = make_app(choice)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        assert app.session is not None, notifications(app)
        assert "proxy" in app.title and "draft" in app.title
        await send(pilot, "The Congress shall have power")
        await wait_until(pilot, lambda: not app.generating)
        stats = app.session.stats
        assert app.history[-1].status == "done" and stats.acceptance is not None
        # base + 0.5 (m - m) is the model itself: its own draft is accepted
        assert stats.acceptance > 0.5
        assert f"draft {stats.acceptance:.0%} accepted" in str(app.speed.render())
