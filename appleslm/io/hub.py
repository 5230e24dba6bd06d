"""The Hugging Face Hub: resolve a MODEL argument to a local directory, and push one.

Both go through stock `huggingface_hub` (`snapshot_download`, `HfApi.create_repo` +
`upload_folder`; mlx-lm's own upload helper calls an API that hub 2.x removed), so the same code
talks to huggingface.co, a mirror (HF_ENDPOINT / --endpoint) or the loopback stub the tests run.
The token comes from the argument, HF_TOKEN or `hf auth login`; it is never printed, logged or
put into an error message.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from appleslm.io.card import CARD_FILE, is_generated_card, render_model_card
from appleslm.io.model_dir import ModelDirError, read_config

log = logging.getLogger(__name__)

# mlx-lm's download patterns (mlx_lm.utils.DEFAULT_ALLOW_PATTERNS) plus the model card
MODEL_PATTERNS = [
    "*.json",
    "model*.safetensors",
    "*.py",
    "tokenizer.model",
    "*.tiktoken",
    "tiktoken.model",
    "*.txt",
    "*.jsonl",
    "*.jinja",
    "README.md",
]
LOGIN_HINT = "run `hf auth login` or set HF_TOKEN"


class HubError(RuntimeError):
    """Talking to the Hub failed: network, credentials, permissions or the server itself."""


@dataclass
class PushResult:
    url: str  # the repo's page
    files: list[str]  # paths in the repo, README.md included
    dry_run: bool = False
    card: str = ""  # the README.md that was (or would be) uploaded
    commit: str | None = None  # commit id; None on a dry run
    sizes: dict[str, int] = field(default_factory=dict)  # bytes per file


def hub_endpoint(endpoint: str | None = None) -> str:
    """The Hub to talk to: the argument, else HF_ENDPOINT, else huggingface.co.

    HF_ENDPOINT is read now rather than trusted to huggingface_hub's import-time constant, and the
    endpoint is always passed explicitly, so one setting moves API calls and file downloads alike.
    """
    from huggingface_hub import constants

    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def resolve_model(spec: str | Path) -> Path:
    """A local model directory as is; anything else is a Hub repo id, downloaded once and cached."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    text = str(spec)
    if text.startswith((".", "/", "~")) or text.count("/") != 1 or not _valid_repo_id(text):
        raise ModelDirError(
            f"{text!r}: no such model directory, and not a Hub repo id (namespace/name)"
        )
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    endpoint = hub_endpoint()
    try:
        return Path(snapshot_download(text, allow_patterns=MODEL_PATTERNS, endpoint=endpoint))
    except GatedRepoError as e:
        raise ModelDirError(
            f"{text} is gated on {endpoint}: accept its terms on the model page, then {LOGIN_HINT}"
        ) from e
    except RepositoryNotFoundError as e:
        raise ModelDirError(
            f"no model directory {text} here and no model {text} on {endpoint} "
            f"(if it is private, {LOGIN_HINT})"
        ) from e
    except HfHubHTTPError as e:
        raise ModelDirError(
            f"cannot download {text} from {endpoint}: {_http_problem(e, text)}"
        ) from e
    except LocalEntryNotFoundError as e:
        # snapshot_download falls back to the cache when the Hub is unreachable; this is "not there"
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"cannot reach {endpoint}"
        raise ModelDirError(f"{text} is not in the local Hub cache and {why}") from e
    except _transport_errors() as e:
        raise ModelDirError(
            f"cannot download {text}: lost the connection to {endpoint} ({type(e).__name__})"
        ) from e
    except OSError as e:
        raise ModelDirError(f"cannot download {text} from {endpoint}: {e}") from e


def push_model(
    model_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    endpoint: str | None = None,
    dry_run: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
) -> PushResult:
    """Publish a model directory as Hub repo `repo_id`, creating the repo if needed.

    The directory is checked before anything goes over the network and is never modified: the
    upload is made from a staging copy (hard links, so no weight bytes are copied) that carries a
    freshly generated model card, unless the directory holds a README.md written by hand.
    A dry run returns the same file list and card and touches no network.
    """
    model_dir = Path(model_dir).expanduser().resolve()  # "." has no name and no parent to stage in
    check_pushable(model_dir)
    if repo_id.count("/") != 1 or not _valid_repo_id(repo_id):
        raise HubError(f"{repo_id!r} is not a Hub repo id: use namespace/name (e.g. you/my-model)")
    endpoint = hub_endpoint(endpoint)
    url = f"{endpoint}/{repo_id}"
    existing = model_dir / CARD_FILE
    keep_card = existing.exists() and not is_generated_card(existing)
    card = (
        existing.read_text(encoding="utf-8")
        if keep_card
        else str(render_model_card(model_dir, repo_id))
    )
    sizes = {path: (model_dir / path).stat().st_size for path in upload_files(model_dir)}
    sizes[CARD_FILE] = len(card.encode())
    files = sorted(sizes)
    if dry_run:
        return PushResult(url, files, dry_run=True, card=card, sizes=sizes)

    from huggingface_hub import HfApi, get_token

    token = token or get_token()
    api = HfApi(endpoint=endpoint, token=token)
    message = commit_message or f"Upload {model_dir.name} with appleslm"
    log.info("pushing %d files from %s to %s", len(files), model_dir, url)
    try:
        with staged_copy(model_dir, card) as folder:
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=message)
    except Exception as e:  # translated below when it is a Hub or network failure
        error = _push_error(e, repo_id, endpoint, has_token=bool(token))
        if error is None:
            raise
        raise HubError(_redact(str(error), token)) from e
    return PushResult(url, files, card=card, commit=getattr(info, "oid", None), sizes=sizes)


def check_pushable(model_dir: Path) -> None:
    """Fail early, before any request, on a directory that would upload as a broken model."""
    if not model_dir.is_dir():
        raise ModelDirError(f"{model_dir} is not a directory")
    read_config(model_dir)  # present and valid JSON
    if not list(model_dir.glob("model*.safetensors")):
        raise ModelDirError(f"{model_dir} has no model*.safetensors weights")
    if not (model_dir / "tokenizer.json").exists() and not (model_dir / "tokenizer.model").exists():
        raise ModelDirError(f"{model_dir} has no tokenizer (tokenizer.json)")


def upload_files(model_dir: Path) -> list[str]:
    """The files a push sends (the card aside): everything but hidden files and README.md."""
    files = []
    for path in sorted(model_dir.rglob("*")):
        rel = path.relative_to(model_dir)
        if (
            path.is_file()
            and not any(p.startswith(".") for p in rel.parts)
            and rel.as_posix() != CARD_FILE
        ):
            files.append(rel.as_posix())
    return files


@contextmanager
def staged_copy(model_dir: Path, card: str) -> Iterator[Path]:
    """A throwaway folder with the model's files (hard-linked where possible) and the card.

    It sits beside the model (same filesystem, so links work), or in the temp dir when that
    folder is read-only; it is removed whatever happens.
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


def _push_error(e: Exception, repo_id: str, endpoint: str, *, has_token: bool) -> str | None:
    """A sentence for a failed push, or None when `e` is not a Hub/network failure."""
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    if isinstance(e, ConnectionError) and "offline" in type(e).__name__.lower():
        return "cannot push while HF_HUB_OFFLINE is set"
    if isinstance(e, RepositoryNotFoundError):  # what the Hub says to a write it will not allow
        return (
            f"cannot push to {repo_id} on {endpoint}: the repo is not visible to "
            f"{'this token' if has_token else 'an anonymous user'}; {LOGIN_HINT} "
            "with a token that has write access"
        )
    if isinstance(e, HfHubHTTPError):
        return f"pushing to {repo_id} on {endpoint} failed: {_http_problem(e, repo_id, has_token)}"
    if isinstance(e, _transport_errors()):
        return (
            f"cannot reach the Hub at {endpoint} ({type(e).__name__}: {e}); "
            "check the network or --endpoint. Nothing was changed locally."
        )
    return None


def _http_problem(e: Exception, repo_id: str, has_token: bool = True) -> str:
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status == 401:
        return (
            f"the Hub rejected the credentials (401); {LOGIN_HINT}"
            if has_token
            else f"not logged in (401); {LOGIN_HINT}"
        )
    if status == 403:
        return f"not allowed (403): this token cannot write to {repo_id}; {LOGIN_HINT}"
    server = getattr(e, "server_message", None) or str(e).splitlines()[0]
    return f"HTTP {status}: {server}" if status else server


def _redact(text: str, token: str | None) -> str:
    """Belt and braces: the client does not echo tokens, and a message of ours never will."""
    return text.replace(token, "***") if token else text


def _valid_repo_id(text: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's could-not-talk-to-the-server errors: httpx2 under hub 2.x, httpx under
    1.x (neither subclasses OSError), plus the builtin ConnectionError/TimeoutError."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)
