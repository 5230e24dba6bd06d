"""Modal screens: settings, the model picker, the conversation list and small dialogs."""

from tui.screens.conversations import ConversationsScreen
from tui.screens.dialogs import ConfirmDialog, TextDialog
from tui.screens.models import ModelPickerScreen
from tui.screens.settings import SettingsScreen

__all__ = [
    "ConfirmDialog",
    "ConversationsScreen",
    "ModelPickerScreen",
    "SettingsScreen",
    "TextDialog",
]
