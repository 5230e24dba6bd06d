"""`appleslm push`: publish a model directory on the Hub, with a generated model card.

The directory is checked (its weights must load) before anything goes over the network, and it is
never modified: the upload is made from a staging copy (hard links, so no weight bytes are copied)
that carries a freshly generated card, unless the directory holds a README.md written by hand.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from appleslm.io.card import is_generated_card, render_model_card
from appleslm.io.files import CARD_FILE, ModelDirError
from appleslm.io.hub import HubError, hub_endpoint, is_repo_id, upload_folder
from appleslm.io.model_dir import load_model

log = logging.getLogger(__name__)


@dataclass
class PushResult:
    url: str  # the repo's page
    files: list[str]  # paths in the repo, README.md included
    dry_run: bool = False
    card: str = ""  # the README.md that was (or would be) uploaded
    commit: str | None = None  # commit id; None on a dry run
    sizes: dict[str, int] = field(default_factory=dict)  # bytes per file


def push_model(
    model_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    endpoint: str | None = None,
    dry_run: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    trust_remote_code: bool = False,
) -> PushResult:
    """Publish a model directory as Hub repo `repo_id`, creating the repo if needed.

    A dry run returns the same file list and card and touches no network.
    """
    model_dir = Path(model_dir).expanduser().resolve()  # "." has no name and no parent to stage in
    if not model_dir.exists():
        raise ModelDirError(f"{model_dir}: no such model directory")
    if not model_dir.is_dir():
        raise ModelDirError(f"{model_dir} is a file, not a model directory")
    if not is_repo_id(repo_id):
        raise HubError(f"{repo_id!r} is not a Hub repo id: use namespace/name (e.g. you/my-model)")
    load_model(model_dir, trust_remote_code=trust_remote_code, lazy=True)  # what others will get
    endpoint = hub_endpoint(endpoint)
    existing = model_dir / CARD_FILE
    keep_card = existing.exists() and not is_generated_card(existing)
    card = (
        existing.read_text(encoding="utf-8")
        if keep_card
        else str(render_model_card(model_dir, repo_id))
    )
    sizes = {path: (model_dir / path).stat().st_size for path in upload_files(model_dir)}
    sizes[CARD_FILE] = len(card.encode())
    url = f"{endpoint}/{repo_id}"
    if dry_run:
        return PushResult(url, sorted(sizes), dry_run=True, card=card, sizes=sizes)

    from huggingface_hub import get_token

    token = token or get_token()
    log.info("pushing %d files from %s to %s", len(sizes), model_dir, url)
    with staged_copy(model_dir, card) as folder:
        commit = upload_folder(
            folder,
            repo_id,
            endpoint=endpoint,
            token=token,
            private=private,
            commit_message=commit_message or f"Upload {model_dir.name} with appleslm",
        )
    return PushResult(url, sorted(sizes), card=card, commit=commit, sizes=sizes)


def upload_files(model_dir: Path) -> list[str]:
    """The files a push sends (the card aside): everything but hidden files and README.md."""
    files = []
    for path in sorted(model_dir.rglob("*")):
        rel = path.relative_to(model_dir)
        hidden = any(p.startswith(".") for p in rel.parts)
        if path.is_file() and not hidden and rel.as_posix() != CARD_FILE:
            files.append(rel.as_posix())
    return files


@contextmanager
def staged_copy(model_dir: Path, card: str) -> Iterator[Path]:
    """A throwaway folder with the model's files (hard-linked where possible) and the card.

    It sits beside the model (same filesystem, so links work), or in the temp dir when that
    folder is read-only; it is removed whatever happens, Ctrl-C included.
    """
    try:
        root = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.push.", dir=model_dir.parent))
    except OSError:
        root = Path(tempfile.mkdtemp(prefix=f"{model_dir.name}.push."))
    try:
        for rel in upload_files(model_dir):
            dst = root / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(model_dir / rel, dst)
            except OSError:
                shutil.copy2(model_dir / rel, dst)
        (root / CARD_FILE).write_text(card, encoding="utf-8")
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)
