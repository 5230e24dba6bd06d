"""Writes that are all or nothing: a reader (or a crash) sees the old file or the new one, never
half of either.

Every file appleslm writes for keeps (checkpoints, model directories, caches, metrics, chat data,
model cards, plots) goes through one of these: the data is written to a hidden temporary name
beside the target, flushed to disk, and renamed over it (a rename within one folder is atomic).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STAGING_PREFIX = "."  # staging names start with a dot: folder scans skip them


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; whatever is written there replaces `path` on success.

    For writers that want a file name (`tokenizer.save`, `figure.savefig`); on an exception the
    temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(
        prefix=f"{STAGING_PREFIX}{path.name}.", suffix=path.suffix, dir=path.parent
    )
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, data: str | bytes, encoding: str = "utf-8") -> Path:
    """Write `data` to `path` atomically; returns `path`."""
    with atomic_file(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding=encoding)
        else:
            tmp.write_bytes(data)
    return Path(path)


@contextmanager
def atomic_directory(out_dir: str | Path) -> Iterator[Path]:
    """Yield a staging directory that replaces `out_dir` only once everything was written.

    A crash mid-write leaves the previous `out_dir` (if any) intact; the stray staging folder is
    dot-prefixed and removed by `remove_staging` the next time its parent is used.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{out_dir.name}.", dir=out_dir.parent))
    try:
        yield staging
        if out_dir.exists():
            retired = Path(
                tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{out_dir.name}.old.", dir=out_dir.parent)
            )
            os.replace(out_dir, retired / out_dir.name)
            os.replace(staging, out_dir)
            shutil.rmtree(retired)
        else:
            os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def remove_staging(folder: str | Path, name: str) -> list[Path]:
    """Delete the staging leftovers of interrupted `atomic_directory(folder / name*)` writes."""
    removed = []
    for leftover in Path(folder).glob(f"{STAGING_PREFIX}{name}*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
            removed.append(leftover)
    return removed
