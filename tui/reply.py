"""The hand-over between the generation thread and the UI thread for one reply.

The generation thread only appends to a list under a lock: it never waits for the UI, so the
model writes at the speed it would without a UI. The UI drains the buffer on a timer (a few
times a second, however fast the model is) and renders what arrived since the last drain.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from appleslm.generate import Stats


@dataclass
class ReplyBuffer:
    message_id: int
    text: str = ""
    stats: Stats | None = None
    error: str | None = None
    _pending: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    # generation thread

    def push(self, fragment: str, stats: Stats | None) -> None:
        with self._lock:
            self._pending.append(fragment)
            self.stats = stats

    def finish(self, stats: Stats | None, error: str | None = None) -> None:
        with self._lock:
            self.stats = stats if stats is not None else self.stats
            self.error = error
        self.done.set()

    def stop_requested(self) -> bool:
        return self._stop.is_set()

    # UI thread

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def take(self) -> tuple[str, Stats | None]:
        """Text that arrived since the last call, and the latest figures."""
        with self._lock:
            fragment = "".join(self._pending)
            self._pending.clear()
            stats = self.stats
        self.text += fragment
        return fragment, stats
