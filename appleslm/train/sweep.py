"""Sweeps: a ladder of runs on identical data, tokens and schedule, resumable run by run.

A sweep file names a base config and, per run, the overrides that make it different:

    base: tiny                     # a preset or YAML file: data and train sections shared by all
    out: runs/density              # one run directory per run below
    seeds: [0, 1, 2]               # optional: each run once per train.seed, as NAME-seedK
    runs:
      dense-64x4: {model: {hidden_size: 64, num_hidden_layers: 4}}
      leviathan:  {model: {embedding: leviathan, tie_word_embeddings: false}, seeds: [0]}

A run's own `seeds` replace the file's for that run (a check at one seed beside runs at three).

Runs train in the file's order (with seeds, a run's seeds one after another), each with `appleslm
train`'s data-parallel ranks (one per core on a CPU). Finished runs (with a saved model) are
skipped, interrupted ones resume from their last checkpoint, and a lock file per run lets several
invocations, on one machine or several sharing a folder, work through the same sweep without
training a run twice.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from appleslm.config import ConfigError, RunConfig, config_from_dict, find_config
from appleslm.density import seeded_name
from appleslm.errors import AppleslmError
from appleslm.train.launch import data_parallel_procs, run_local_ranks
from appleslm.train.pretrain import train
from appleslm.train.trainer import run_state

SWEEP_KEYS = {"base", "out", "seeds", "runs"}


class SweepError(AppleslmError):
    pass


@dataclass
class SweepRun:
    name: str
    config: RunConfig
    run_dir: Path
    base_name: str  # the name in the sweep file, the same for each of a run's seeds

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


def checked_seeds(seeds: Any, where: str) -> list[int] | None:
    if seeds is not None and (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise ConfigError(f"{where}: seeds must be a list of distinct integers >= 0, got {seeds!r}")
    return seeds


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
    seeds = checked_seeds(spec.get("seeds"), str(path))
    base_path = find_config(spec.get("base", "tiny"))
    base = yaml.safe_load(base_path.read_text()) or {}
    out_dir = Path(out or spec.get("out") or Path("runs") / path.stem)
    runs = []
    for name, overrides in spec["runs"].items():
        overrides = overrides or {}
        if not isinstance(overrides, dict):
            raise ConfigError(
                f"{path}: run {name!r} must be sections of key: value, got {overrides!r}"
            )
        overrides = dict(overrides)
        run_seeds = seeds
        if "seeds" in overrides:
            run_seeds = checked_seeds(overrides.pop("seeds"), f"{path}: {name}")
        for seed in run_seeds or [None]:
            full_name, merged = name, merge(base, overrides)
            if seed is not None:
                full_name = seeded_name(name, seed)
                merged.setdefault("train", {})["seed"] = seed
            config = config_from_dict(merged, f"{path}: {full_name}")
            runs.append(SweepRun(full_name, config, out_dir / full_name, name))
    return runs


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
    procs: int | None = None,
    progress: bool = True,
    verbose: bool = False,
    log: Callable[[str], None] = print,
) -> list[SweepRun]:
    """Train every unfinished run of the sweep, in order; returns all runs.

    `only` names runs, or with seeds also a run's base name for all its seeds."""
    runs = load_sweep(path, out)
    if only:
        missing = set(only) - {r.name for r in runs} - {r.base_name for r in runs}
        if missing:
            raise ConfigError(f"no run(s) named {sorted(missing)} in {path}")
        runs = [r for r in runs if r.name in only or r.base_name in only]
    # resolved for every run first: a --procs that cannot split some run's batch is refused
    # before any run starts
    ranks = [
        data_parallel_procs(procs, r.config.train.batch_size, r.config.train.grad_accum)
        for r in runs
    ]
    for run, n in zip(runs, ranks, strict=True):
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
            train_run(run, n, progress, verbose)
        finally:
            release(run)
        if not run.finished:
            log("[sweep] interrupted; run the same command again to continue")
            break
    return runs


def train_run(run: SweepRun, n: int, progress: bool, verbose: bool) -> None:
    """Train (or resume) one run, in this process or as `n` of `appleslm train`'s local ranks."""
    resume = run_state(run.run_dir) == "started"
    if n == 1:
        train(run.config, run.run_dir, resume=resume, progress=progress, verbose=verbose)
        return
    with tempfile.TemporaryDirectory(prefix="appleslm-sweep-") as scratch:
        config = Path(scratch) / f"{run.name}.yaml"
        config.write_text(yaml.safe_dump(run.config.to_dict(), sort_keys=False))
        argv = ["train", str(config), "--out", str(run.run_dir)]
        argv += ["--resume"] * resume + ["--no-progress"] * (not progress)
        argv += ["--verbose"] * verbose
        status = run_local_ranks(n, argv)
    if status:
        raise SweepError(f"run {run.name} failed (its ranks' message is above; exit {status})")
