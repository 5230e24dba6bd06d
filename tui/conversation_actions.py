"""The chat app's conversation commands: new, open, list, rename, export, delete, settings.

A mixin of `ChatApp` (tui/app.py), kept apart so each file holds one role; it uses the app's
store, history, chat log and prompt.
"""

from __future__ import annotations

from pathlib import Path

from appleslm.generate import SamplingSettings, Stats
from appleslm_tui.model_list import label
from appleslm_tui.screens import ConfirmDialog, ConversationsScreen, SettingsScreen, TextDialog
from appleslm_tui.store import slug
from appleslm_tui.widgets import MessageItem


class ConversationActions:
    async def open_conversation(self, conversation_id: int) -> None:
        conversation = self.store.get_conversation(conversation_id)
        if conversation is None:
            self.notify(f"No conversation {conversation_id}", severity="error")
            return
        self.conversation = conversation
        try:
            self.settings = SamplingSettings.from_dict(conversation.settings, self.default_settings)
        except ValueError:
            self.settings = self.default_settings
        stored = self.store.messages(conversation_id)
        # The turns are the history; a system message is a system prompt set mid-conversation.
        self.history = [m for m in stored if m.role != "system"]
        changes = [m.content for m in stored if m.role == "system"]
        self.system_prompt = changes[-1] if changes else conversation.system_prompt
        self.editing = None
        await self.chat_log.clear()
        for message in stored:
            stats = Stats.from_dict(message.stats) if message.stats else None
            await self.chat_log.add(
                MessageItem(
                    message.role,
                    message.content,
                    status=message.status,
                    stats=stats,
                    message_id=message.id,
                )
            )
        self.store.set_pref("last_conversation", conversation_id)
        if conversation.model and self.model_spec and conversation.model != self.model_spec:
            self.notify(
                f"This conversation was with {label(conversation.model)}; ctrl+l switches models",
                timeout=6,
            )
        self.update_titles()
        self.refresh_bindings()

    async def action_new_chat(self) -> None:
        if self.generating:
            self.notify("Stop the reply first (esc)", severity="warning")
            return
        self.conversation, self.history, self.editing = None, [], None
        self.system_prompt, self.settings = self.default_system_prompt, self.default_settings
        await self.chat_log.clear()
        self.prompt.clear()
        self.prompt.focus()
        self.update_titles()
        self.refresh_bindings()

    def action_conversations(self) -> None:
        async def chosen(result: tuple[str, int | None] | None) -> None:
            current = self.conversation
            if result and result[0] == "open" and result[1] is not None:
                if self.generating and current is not None and result[1] == current.id:
                    return  # already open, and its reply is still being written
                if self.generating:
                    self.notify("Stop the reply first (esc)", severity="warning")
                else:
                    await self.open_conversation(result[1])
                return
            if result and result[0] == "new":
                await self.action_new_chat()
                return
            if current is not None:  # renamed or deleted meanwhile?
                fresh = self.store.get_conversation(current.id)
                if fresh is None and not self.generating:
                    await self.action_new_chat()
                elif fresh is not None:
                    self.conversation = fresh
                    self.update_titles()

        self.push_screen(
            ConversationsScreen(self.store, self.conversation and self.conversation.id), chosen
        )

    def action_rename(self) -> None:

        if self.conversation is None:
            self.notify("Nothing to rename yet", severity="warning")
            return

        def renamed(title: str | None) -> None:
            if title and self.conversation is not None:
                self.store.update_conversation(self.conversation.id, title=title)
                self.conversation.title = title
                self.update_titles()

        self.push_screen(
            TextDialog("Rename conversation", self.conversation.title, action="Rename"), renamed
        )

    def action_export(self) -> None:

        if self.conversation is None:
            self.notify("Nothing to export yet", severity="warning")
            return
        conversation_id = self.conversation.id

        def export(path: str | None) -> None:
            if not path:
                return
            target = Path(path).expanduser()
            try:
                target.write_text(self.store.export_markdown(conversation_id))
            except OSError as e:
                self.notify(f"Export failed: {e}", severity="error")
                return
            self.notify(f"Exported to {target}")

        self.push_screen(
            TextDialog(
                "Export to Markdown file", f"{slug(self.conversation.title)}.md", action="Export"
            ),
            export,
        )

    def action_delete(self) -> None:

        if self.conversation is None or self.generating:
            return
        conversation_id = self.conversation.id

        async def delete(yes: bool | None) -> None:
            if yes:
                self.store.delete_conversation(conversation_id)
                await self.action_new_chat()

        self.push_screen(ConfirmDialog(f"Delete “{self.conversation.title}”?"), delete)

    def action_settings(self) -> None:
        async def saved(result: tuple[str, SamplingSettings] | None) -> None:
            if result is None:
                return
            system_prompt, self.settings = result
            if self.conversation is None:  # a fresh chat: the defaults it will be saved with
                self.default_system_prompt, self.default_settings = result
            else:
                self.store.update_conversation(
                    self.conversation.id, settings=self.settings.to_dict()
                )
                if system_prompt != self.system_prompt:  # recorded where it was changed
                    message = self.save_message("system", system_prompt)
                    await self.chat_log.add(
                        MessageItem("system", system_prompt, message_id=message.id)
                    )
            self.system_prompt = system_prompt
            self.notify("Settings saved", timeout=2)

        chat_mode = self.session.chat_mode if self.session else True
        self.push_screen(
            SettingsScreen(self.system_prompt, self.settings, chat_mode=chat_mode), saved
        )
