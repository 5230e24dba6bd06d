"""Run metrics: an append-only JSONL log and a loss-curve PNG beside it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm import tqdm

from appleslm.atomic import atomic_file, atomic_write
from appleslm.errors import AppleslmError


class MetricsError(AppleslmError):
    """A metrics file that is damaged beyond its last line."""


@contextmanager
def paused(bar: tqdm) -> Iterator[None]:
    """Clear `bar` and leave the time spent inside (an evaluation) out of its rate and ETA.

    tqdm's own `unpause` restarts the clock at the last print, which also drops the steps run
    since then while still counting them: the next rate reads too high and the ETA jumps.
    Shifting both clocks by exactly the time spent keeps every step's own time.
    """
    bar.clear()
    started = time.perf_counter()
    try:
        yield
    finally:
        if not bar.disable:
            spent = time.perf_counter() - started
            bar.start_t += spent
            bar.last_print_t += spent
            bar.refresh()


def train_record(
    step: int,
    loss: float,
    grad_norm: float,
    learning_rate: float,
    tokens: int,
    window_tokens: int,
    elapsed: float,
) -> dict[str, Any]:
    """The "train" line both pretraining and fine-tuning log every `log_every` steps."""
    import mlx.core as mx

    return {
        "kind": "train",
        "step": step,
        "loss": loss,
        "grad_norm": grad_norm,
        "lr": learning_rate,
        "tokens": tokens,
        "tok_per_s": window_tokens / elapsed,
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
    }


class MetricsLog:
    def __init__(self, path: Path):
        self.path = path

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        """Every record; a torn last line (power loss, a full disk mid-append) is left out."""
        if not self.path.exists():
            return []
        lines = [line for line in self.path.read_text(errors="replace").splitlines() if line]
        records = []
        for i, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if i != len(lines) - 1:
                    raise MetricsError(
                        f"{self.path}:{i + 1} is not a metrics record; move the file aside"
                    ) from None
        return records

    def truncate_after(self, step: int) -> None:
        """Drop records past `step`: a resumed run re-logs them exactly as an uninterrupted one."""
        kept = [r for r in self.records() if r["step"] <= step]
        atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in kept))


def plot_losses(records: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
