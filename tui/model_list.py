"""What the model picker offers: model directories found locally and in the Hugging Face cache.

Only a directory scan (config.json beside safetensors weights): nothing is loaded or
downloaded, so the picker opens at once. Hub cache entries point at their snapshot folder,
which `appleslm.io.load_model` loads without touching the network.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from appleslm.io.hub import is_repo_id
from appleslm.io.model_dir import display_name

SCAN_DEPTH = 3  # ./runs/<run>/model


@dataclass(frozen=True)
class ModelEntry:
    name: str
    spec: str  # what `load_model` receives: a directory
    source: str  # "local", "hub cache" or "recent"
    detail: str = ""


def is_model_dir(path: Path) -> bool:
    try:
        return (path / "config.json").is_file() and (
            any(path.glob("model*.safetensors"))
            or (path / "model.safetensors.index.json").is_file()
        )
    except OSError:
        return False


def describe(path: Path) -> str:
    """model_type, quantization and weight size, for the picker's detail column."""
    parts = []
    try:
        config = json.loads((path / "config.json").read_text())
        parts.append(str(config.get("model_type", "?")))
        quantization = config.get("quantization") or {}
        if isinstance(quantization, dict) and quantization.get("bits"):
            parts.append(f"{quantization['bits']}-bit")
        size = sum(f.stat().st_size for f in path.glob("model*.safetensors"))
        parts.append(f"{size / 1e6:,.0f} MB" if size >= 1e6 else f"{size / 1e3:,.0f} kB")
    except (OSError, ValueError):
        parts.append("unreadable config")
    return " · ".join(parts)


def label(spec: str) -> str:
    """A short name for a model spec: a Hub repo id as it is, a run's `runs/tiny/model` as
    `tiny`, a Hub cache snapshot by its repo id, else the folder's name."""
    return spec if is_repo_id(spec) and not Path(spec).exists() else display_name(spec)


def _walk(root: Path, depth: int) -> Iterable[Path]:
    if is_model_dir(root):
        yield root
        return
    if depth == 0:
        return
    try:
        children = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return
    for child in children:
        yield from _walk(child, depth - 1)


def local_models(roots: Sequence[Path]) -> list[ModelEntry]:
    seen: set[Path] = set()
    entries = []
    for root in roots:
        for path in _walk(Path(root).expanduser(), SCAN_DEPTH):
            resolved = path.resolve()
            if resolved not in seen:
                seen.add(resolved)
                entries.append(ModelEntry(label(str(path)), str(resolved), "local", describe(path)))
    return entries


def hub_cache_models(cache_dir: Path | None = None) -> list[ModelEntry]:
    """Models in the Hugging Face cache, one entry per repo (the snapshot of refs/main)."""
    if cache_dir is None:
        from huggingface_hub import constants

        cache_dir = Path(constants.HF_HUB_CACHE)
    entries = []
    try:
        repos = sorted(p for p in Path(cache_dir).iterdir() if p.name.startswith("models--"))
    except OSError:
        return []
    for repo in repos:
        snapshots = repo / "snapshots"
        ref = repo / "refs" / "main"
        candidates = [snapshots / ref.read_text().strip()] if ref.is_file() else []
        if snapshots.is_dir():
            candidates += sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
        for snapshot in candidates:
            if is_model_dir(snapshot):
                entries.append(
                    ModelEntry(label(str(snapshot)), str(snapshot), "hub cache", describe(snapshot))
                )
                break
    return entries


def default_roots(home: Path) -> list[Path]:
    """Where local models usually are: the working directory and appleslm's own models folder."""
    roots = [Path.cwd(), home / "models"]
    extra = os.environ.get("APPLESLM_MODELS")
    if extra:
        roots += [Path(p) for p in extra.split(os.pathsep) if p]
    return roots


def list_models(
    roots: Sequence[Path], *, recent: Sequence[str] = (), hub_cache: Path | None | bool = None
) -> list[ModelEntry]:
    """Recent models first, then local directories, then the Hub cache; no duplicates.

    `hub_cache` False skips the Hub cache; None uses huggingface_hub's default location.
    """
    entries: list[ModelEntry] = []
    for spec in recent:
        path = Path(spec)
        if path.exists() and is_model_dir(path):
            entries.append(ModelEntry(label(spec), str(path.resolve()), "recent", describe(path)))
        elif not path.exists() and is_repo_id(spec):
            entries.append(ModelEntry(spec, spec, "recent", "Hub repo id"))
    entries += local_models(roots)
    if hub_cache is not False:
        entries += hub_cache_models(None if hub_cache is None or hub_cache is True else hub_cache)
    unique: dict[str, ModelEntry] = {}
    for entry in entries:
        unique.setdefault(entry.spec, entry)
    return list(unique.values())
