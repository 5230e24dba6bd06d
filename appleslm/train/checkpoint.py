"""Checkpoints that survive crashes: each is a directory written atomically, the last k kept.

A checkpoint holds everything an exact resume needs: weights, optimizer moments and step, and the
task's own state (the data iterator's position). MLX's RNG is re-seeded from (seed, step) before
every step, so its state is a function of the step and needs no saving. Only weights known to be
finite are saved (the loop checks), so every kept checkpoint is a good one; a damaged one (a
truncated file, a garbage state.json) is reported and passed over for the previous intact one.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from appleslm.atomic import atomic_directory, remove_staging
from appleslm.errors import AppleslmError

PREFIX = "ckpt-"
STATE_FILE = "state.json"


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict[str, Any]


def save_checkpoint(
    directory: Path,
    step: int,
    model: nn.Module,
    optimizer: optim.Optimizer,
    state: dict[str, Any],
    keep: int,
) -> Path:
    path = directory / f"{PREFIX}{step:08d}"
    with atomic_directory(path) as staging:
        mx.save_safetensors(
            str(staging / "model.safetensors"), dict(tree_flatten(model.parameters()))
        )
        mx.save_safetensors(
            str(staging / "optimizer.safetensors"), dict(tree_flatten(optimizer.state))
        )
        (staging / STATE_FILE).write_text(json.dumps({**state, "step": step}))
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old.path)
    return path


def list_checkpoints(directory: Path) -> list[Checkpoint]:
    """Checkpoints whose state.json reads, oldest first (staging leftovers are dot-prefixed)."""
    found = []
    for path in sorted(Path(directory).glob(f"{PREFIX}*")):
        try:
            state = json.loads((path / STATE_FILE).read_text())
            found.append(Checkpoint(path, int(state["step"]), state))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # damaged: restore_latest says so; rotation leaves it to be looked at
    return found


def latest_checkpoint(directory: Path) -> Checkpoint | None:
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1] if checkpoints else None


def restore_checkpoint(
    checkpoint: Checkpoint, model: nn.Module, optimizer: optim.Optimizer
) -> None:
    model.load_weights(str(checkpoint.path / "model.safetensors"))
    saved = mx.load(str(checkpoint.path / "optimizer.safetensors"))
    optimizer.state = tree_unflatten(list(saved.items()))
    mx.eval(model.parameters(), optimizer.state)


def remove_interrupted(directory: Path, log: Callable[[str], None]) -> None:
    """Delete the staging folders of checkpoint writes a crash interrupted, saying so."""
    for leftover in remove_staging(directory, PREFIX):
        log(f"removed {leftover.name}, a checkpoint whose writing was interrupted")


def restore_latest(
    directory: Path, model: nn.Module, optimizer: optim.Optimizer, log: Callable[[str], None]
) -> Checkpoint | None:
    """Restore the newest intact checkpoint, saying which damaged ones were passed over.

    None when there is no checkpoint; an error when checkpoints exist but none of them can be
    read.
    """
    directory = Path(directory)
    candidates = sorted(directory.glob(f"{PREFIX}*"), reverse=True)
    for path in candidates:
        try:
            state = json.loads((path / STATE_FILE).read_text())
            checkpoint = Checkpoint(path, int(state["step"]), state)
            restore_checkpoint(checkpoint, model, optimizer)
            return checkpoint
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            log(f"checkpoint {path} is damaged ({type(e).__name__}: {e}); trying an older one")
    if candidates:
        raise AppleslmError(
            f"none of the {len(candidates)} checkpoints in {directory} can be read; the run "
            "cannot be resumed (start it again in another --out)"
        )
    return None


def state_is_finite(model: nn.Module, optimizer: optim.Optimizer) -> bool:
    """Whether every weight and optimizer moment is finite (one reduction over all of them)."""
    leaves = [v for _, v in tree_flatten((model.parameters(), optimizer.state))]
    checks = [mx.isfinite(v).all() for v in leaves if mx.issubdtype(v.dtype, mx.inexact)]
    return bool(mx.stack(checks).all().item()) if checks else True
