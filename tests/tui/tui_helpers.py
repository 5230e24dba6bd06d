"""Helpers for the chat app's Pilot and snapshot tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from textual import events
from textual.pilot import WaitForScreenTimeout

from appleslm_tui.app import ChatApp


async def wait_until(pilot, predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    """Poll instead of one pause: workers run in threads and finish when they finish."""
    await _poll(predicate, timeout, f"timed out waiting for {predicate}")
    await settle(pilot)  # let a screen that just opened finish mounting its widgets


async def settle(pilot, attempts: int = 6) -> None:
    """`pilot.pause()`, robust to widgets removed meanwhile: Pilot waits until every widget of the
    screen has drained its messages, and one removed in between (a finished reply's streaming
    view, a closing screen's) never answers, so look again at the widgets there are then."""
    for _ in range(attempts):
        try:
            await pilot._wait_for_screen(timeout=5.0)
            return
        except WaitForScreenTimeout:
            continue
    raise AssertionError(f"the screen did not settle in {attempts} x 5 s")


async def until_closed(app: ChatApp, screen_type: type, timeout: float = 20.0) -> None:
    """Wait until a dismissed screen is off the top and the screen beneath has its focus back
    (a key sent before that is lost), without Pilot: its pause waits for every widget of the
    current screen to drain its messages, and a closing screen's widgets may be removed first
    and never answer (a 30 s WaitForScreenTimeout on a loaded machine)."""
    await _poll(
        lambda: not isinstance(app.screen, screen_type) and app.focused is not None,
        timeout,
        f"{screen_type.__name__} did not close and give focus back",
    )


async def ready(pilot) -> ChatApp:
    """Wait until the app's model is loaded."""
    app = pilot.app
    await wait_until(pilot, lambda: app.session is not None or app.loading is None)
    return app


async def send(pilot, text: str, timeout: float = 30.0) -> None:
    """Put `text` in the prompt and press Enter, as a key event, without `pilot.press`:
    that waits for the CPU to go idle, which it does not while a model writes.

    The prompt is focused first (a key goes to whatever has the focus, and a screen that just
    closed may hand it elsewhere), and the call returns once the app took the message (it clears
    the prompt) or said why not: on a loaded machine the key can take longer than any fixed
    pause to arrive, and a key that was lost must fail here, not as a reply that never came."""
    app = pilot.app
    app.prompt.focus()
    await _poll(lambda: app.focused is app.prompt, timeout, "the prompt did not take the focus")
    app.prompt.load_text(text)
    shown = len(app._notifications)
    press_now(app, "enter")
    await _poll(
        lambda: not app.prompt.text or len(app._notifications) > shown,
        timeout,
        lambda: f"Enter was not taken (focus on {app.focused!r}, screen {app.screen!r})",
    )


async def _poll(
    predicate: Callable[[], bool], timeout: float, failure: str | Callable[[], str]
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(failure if isinstance(failure, str) else failure())
        await asyncio.sleep(0.02)


def press_now(app: ChatApp, key: str) -> None:
    """Deliver a key the way the terminal driver does, and return at once."""
    app.post_message(events.Key(key, None))


def notifications(app: ChatApp) -> list[str]:
    return [n.message for n in app._notifications]
