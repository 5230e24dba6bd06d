"""The chat screen's parts: the message log, the prompt and the speed panel."""

from appleslm_tui.widgets.chat_log import ChatLog, MessageItem, code_blocks
from appleslm_tui.widgets.prompt import PromptArea
from appleslm_tui.widgets.speed import SpeedPanel

__all__ = ["ChatLog", "MessageItem", "PromptArea", "SpeedPanel", "code_blocks"]
