"""The `appleslm chat` terminal app (Textual). It talks to the library only: `appleslm.generate`
for replies and `appleslm.io` for models; `tui.store` keeps the conversations."""

from appleslm_tui.app import ChatApp, run_chat

__all__ = ["ChatApp", "run_chat"]
