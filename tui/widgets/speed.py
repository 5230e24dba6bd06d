"""The speed panel: live figures for the reply being written, straight from mlx-lm's
`GenerationResponse` (via `appleslm.generate.Stats`), or a status line between replies."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from appleslm.generate import Stats


def memory(gigabytes: float) -> str:
    return f"{gigabytes:.2f} GB" if gigabytes >= 1 else f"{gigabytes * 1e3:,.1f} MB"


def prompt_figure(stats: Stats) -> tuple[str, str]:
    """The prompt's speed, or, on a turn that reused the conversation's cache, what it read:
    a rate over the few new tokens of such a turn would say nothing about the model."""
    if stats.cached_tokens:
        return "prompt", f"{stats.cached_tokens:,} reused + {stats.prompt_tokens:,} read"
    return "prompt", f"{stats.prompt_tps:,.0f} tok/s"


def format_stats(stats: Stats) -> Text:
    text = Text()
    figures = [
        ("TTFT", f"{stats.ttft:.2f}s"),
        prompt_figure(stats),
        ("gen", f"{stats.generation_tps:,.1f} tok/s"),
        *([("draft", f"{stats.acceptance:.0%} accepted")] if stats.acceptance is not None else []),
        ("", f"{stats.generation_tokens:,} tok"),
        ("peak", memory(stats.peak_memory)),
    ]
    for i, (name, value) in enumerate(figures):
        if i:
            text.append(" · ", style="dim")
        if name:
            text.append(f"{name} ", style="dim")
        text.append(value, style="bold")
    return text


class SpeedPanel(Static):
    """One line: the reply's figures while it streams and after, or what the app is doing."""

    def __init__(self, **kwargs) -> None:
        super().__init__("", **kwargs)
        self.stats: Stats | None = None

    def show_stats(self, stats: Stats, state: str = "") -> None:
        self.stats = stats
        text = format_stats(stats)
        if state:
            text = Text.assemble((f"{state} ", "bold"), text)
        self.update(text)

    def show_status(self, message: str) -> None:
        self.update(Text(message, style="dim"))
