"""Checkpoints that survive crashes: each is a directory written atomically, the last k kept.

A checkpoint holds everything an exact resume needs: weights, optimizer moments and step, and
the data iterator's position. (MLX's RNG is re-seeded from (seed, step) before every step, so its
state is a function of the step and needs no saving.)
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from appleslm.io.model_dir import atomic_directory

PREFIX = "ckpt-"


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
        (staging / "state.json").write_text(json.dumps({**state, "step": step}))
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old.path)
    return path


def list_checkpoints(directory: Path) -> list[Checkpoint]:
    """Complete checkpoints, oldest first (staging leftovers of a crash are dot-prefixed)."""
    found = []
    for path in sorted(directory.glob(f"{PREFIX}*")):
        state_file = path / "state.json"
        if state_file.exists():
            state = json.loads(state_file.read_text())
            found.append(Checkpoint(path, state["step"], state))
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
