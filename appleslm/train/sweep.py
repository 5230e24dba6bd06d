"""Sweeps: a ladder of runs on identical data, tokens and schedule, resumable run by run.

A sweep file names a base config and, per run, the overrides that make it different:

    base: tiny                     # a preset or YAML file: data and train sections shared by all
    out: runs/density              # one run directory per run below
    runs:
      dense-64x4: {model: {hidden_size: 64, num_hidden_layers: 4}}
      leviathan:  {model: {embedding: leviathan, tie_word_embeddings: false}}

Finished runs (with a saved model) are skipped, interrupted ones resume from their last checkpoint,
and a lock file per run lets several invocations, on one machine or several sharing a folder,
work through the same sweep without training a run twice.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from appleslm.config import ConfigError, RunConfig, config_from_dict, find_config
from appleslm.train.pretrain import train
from appleslm.train.trainer import run_state

SWEEP_KEYS = {"base", "out", "runs"}


@dataclass
class SweepRun:
    name: str
    config: RunConfig
    run_dir: Path

    @property
    def finished(self) -> bool:
        return run_state(self.run_dir) == "finished"


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for section, values in overrides.items():
        if not isinstance(values, dict):
            raise ConfigError(f"run overrides must be sections of key: value, got {section!r}")
        merged.setdefault(section, {}).update(values)
    return merged


def load_sweep(path: str | Path, out: str | Path | None = None) -> list[SweepRun]:
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the sweep file: {e}") from e
    unknown = set(spec) - SWEEP_KEYS
    if unknown or "runs" not in spec or not spec["runs"]:
        raise ConfigError(
            f"{path}: a sweep file has keys {sorted(SWEEP_KEYS)} with at least one "
            f"run{f'; unknown: {sorted(unknown)}' if unknown else ''}"
        )
    base_path = find_config(spec.get("base", "tiny"))
    base = yaml.safe_load(base_path.read_text()) or {}
    out_dir = Path(out or spec.get("out") or Path("runs") / path.stem)
    return [
        SweepRun(
            name, config_from_dict(merge(base, overrides or {}), f"{path}: {name}"), out_dir / name
        )
        for name, overrides in spec["runs"].items()
    ]


def claim(run: SweepRun) -> bool:
    """Take the run's lock; False if another live invocation holds it.

    A lock left by a process of this machine that no longer exists (a killed sweep) is stale and
    taken over; a lock from another machine is respected.
    """
    run.run_dir.mkdir(parents=True, exist_ok=True)
    lock_path = run.run_dir / ".sweep.lock"
    host = os.uname().nodename
    for _ in range(2):
        try:
            fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            owner_host, _, owner_pid = lock_path.read_text().strip().partition(" ")
            if owner_host != host or process_alive(int(owner_pid or 0)):
                return False
            lock_path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as lock:
            lock.write(f"{host} {os.getpid()}\n")
        return True
    return False


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0


def release(run: SweepRun) -> None:
    (run.run_dir / ".sweep.lock").unlink(missing_ok=True)


def run_sweep(
    path: str | Path,
    *,
    out: str | Path | None = None,
    only: list[str] | None = None,
    progress: bool = True,
    verbose: bool = False,
    log: Callable[[str], None] = print,
) -> list[SweepRun]:
    """Train every unfinished run of the sweep, in order; returns all runs."""
    runs = load_sweep(path, out)
    if only:
        missing = set(only) - {r.name for r in runs}
        if missing:
            raise ConfigError(f"no run(s) named {sorted(missing)} in {path}")
        runs = [r for r in runs if r.name in only]
    for run in runs:
        if run.finished:
            log(f"[sweep] {run.name}: finished, skipping")
            continue
        if not claim(run):
            log(
                f"[sweep] {run.name}: locked by another invocation ({run.run_dir / '.sweep.lock'})"
                ", skipping"
            )
            continue
        try:
            log(f"[sweep] {run.name}: training in {run.run_dir}")
            resume = run_state(run.run_dir) == "started"
            result = train(
                run.config, run.run_dir, resume=resume, progress=progress, verbose=verbose
            )
        finally:
            release(run)
        if result.interrupted:
            log("[sweep] interrupted; run the same command again to continue")
            break
    return runs
