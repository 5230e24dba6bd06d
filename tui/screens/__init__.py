"""Modal screens: settings, the model picker, the conversation list and small dialogs."""

from appleslm_tui.screens.conversations import ConversationsScreen
from appleslm_tui.screens.dialogs import ConfirmDialog, TextDialog
from appleslm_tui.screens.models import ModelPickerScreen
from appleslm_tui.screens.settings import SettingsScreen

__all__ = [
    "ConfirmDialog",
    "ConversationsScreen",
    "ModelPickerScreen",
    "SettingsScreen",
    "TextDialog",
]
