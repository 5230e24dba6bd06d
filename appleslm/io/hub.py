"""Every call appleslm makes to the Hugging Face Hub: downloads (models, datasets, single files) and
uploads, with one repo-id check, bounded timeouts and errors that say what to do.

All of it goes through stock `huggingface_hub` (`snapshot_download`, `hf_hub_download`,
`HfApi.create_repo` + `upload_folder`; mlx-lm's own upload helper calls an API that hub 2.x
removed), so the same code talks to huggingface.co, a mirror (HF_ENDPOINT / --endpoint) or the
loopback stub the tests run. The endpoint is read at call time and always passed explicitly.
The token comes from the argument, HF_TOKEN or `hf auth login`; it is never printed, logged or put
into an error message.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

from appleslm.errors import AppleslmError

LOGIN_HINT = "run `hf auth login` or set HF_TOKEN"
TIMEOUT_ENV = "APPLESLM_HUB_TIMEOUT"
CONNECT_TIMEOUT = 10.0  # seconds to open a connection
DEFAULT_TIMEOUT = 60.0  # seconds of silence from a connected server before giving up
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


class HubError(AppleslmError, RuntimeError):
    """Talking to the Hub failed: network, credentials, permissions or the server itself."""


def hub_endpoint(endpoint: str | None = None) -> str:
    """The Hub to talk to: the argument, else HF_ENDPOINT, else huggingface.co.

    HF_ENDPOINT is read now rather than trusted to huggingface_hub's import-time constant, so one
    setting moves API calls and file downloads alike.
    """
    from huggingface_hub import constants

    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def is_repo_id(text: str) -> bool:
    """Whether `text` is a Hub repo id (`namespace/name`); the one check every command uses."""
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        return False
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def hub_timeout() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT
    except ValueError:
        raise HubError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise HubError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {raw}")
    return value


def _client_with_timeouts():
    """huggingface_hub's own HTTP client with every timeout bounded.

    Its default client has no timeout, and some of its calls pass `timeout=None` explicitly,
    which overrides a client default; so the bound is applied in the transport, to whatever
    timeout a request arrives with.
    """
    from huggingface_hub.utils import _http

    default = _http.default_client_factory()
    httpx = importlib.import_module(type(default).__module__.split(".")[0])  # httpx2 or httpx
    seconds = hub_timeout()

    class BoundedTransport(httpx.HTTPTransport):
        def handle_request(self, request):
            given = request.extensions.get("timeout") or {}
            bounds = {
                "connect": CONNECT_TIMEOUT,
                "read": seconds,
                "write": seconds,
                "pool": CONNECT_TIMEOUT,
            }
            request.extensions["timeout"] = {
                name: given.get(name) if given.get(name) is not None else bound
                for name, bound in bounds.items()
            }
            return super().handle_request(request)

    return type(default)(
        event_hooks=default.event_hooks,
        follow_redirects=default.follow_redirects,
        timeout=httpx.Timeout(seconds, connect=CONNECT_TIMEOUT),
        transport=BoundedTransport(),
    )


def _use_bounded_client() -> None:
    """Install the bounded client (huggingface_hub shares one), again if the bound changed."""
    from huggingface_hub import set_client_factory

    seconds = hub_timeout()
    if getattr(_use_bounded_client, "seconds", None) != seconds:
        set_client_factory(_client_with_timeouts)  # closes the old client
        _use_bounded_client.seconds = seconds


def download(
    repo_id: str,
    *,
    repo_type: str = "model",
    allow_patterns: list[str] | None = None,
    filename: str | None = None,
) -> Path:
    """A repo snapshot (or one `filename` of it) in the local Hub cache, downloaded if needed.

    Falls back to the cache when the Hub is unreachable (huggingface_hub's own behaviour) and
    raises `HubError` with a sentence that says what went wrong otherwise.
    """
    what = f"{repo_type} {repo_id}"
    if not is_repo_id(repo_id):
        raise HubError(f"{repo_id!r} is not a Hub repo id (namespace/name)")
    from huggingface_hub import constants, hf_hub_download, snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    _use_bounded_client()
    endpoint = hub_endpoint()
    try:
        if filename is not None:
            path = hf_hub_download(
                repo_id=repo_id, filename=filename, repo_type=repo_type, endpoint=endpoint
            )
            return Path(path)
        path = snapshot_download(
            repo_id=repo_id, repo_type=repo_type, allow_patterns=allow_patterns, endpoint=endpoint
        )
        return Path(path)
    except GatedRepoError as e:
        raise HubError(
            f"{what} is gated on {endpoint}: accept its terms on its page, then {LOGIN_HINT}"
        ) from e
    except RepositoryNotFoundError as e:
        raise HubError(f"no {what} on {endpoint} (if it is private, {LOGIN_HINT})") from e
    except HfHubHTTPError as e:
        raise HubError(
            f"cannot download {what} from {endpoint}: {_http_problem(e, repo_id)}"
        ) from e
    except LocalEntryNotFoundError as e:
        # The Hub was unreachable and the cache has nothing: "not there", said plainly.
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"cannot reach {endpoint}"
        raise HubError(f"{what} is not in the local Hub cache and {why}") from e
    except EntryNotFoundError as e:
        raise HubError(f"{what} on {endpoint} has no file {filename}") from e
    except transport_errors() as e:
        raise HubError(
            f"cannot download {what}: lost the connection to {endpoint} ({type(e).__name__}); "
            f"check the network, or raise {TIMEOUT_ENV} (now {hub_timeout():g} s)"
        ) from e
    except json.JSONDecodeError as e:
        raise HubError(f"cannot download {what}: {not_a_hub(endpoint, e)}") from e
    except OSError as e:
        raise HubError(f"cannot download {what} from {endpoint}: {e}") from e


def not_a_hub(endpoint: str, error: Exception) -> str:
    return (
        f"{endpoint} answered with something that is not the Hub's JSON ({error}); "
        "check --endpoint / HF_ENDPOINT."
    )


def upload_folder(
    folder: Path,
    repo_id: str,
    *,
    endpoint: str,
    token: str | None,
    private: bool,
    commit_message: str,
) -> str | None:
    """Create `repo_id` if needed and upload `folder` to it in one commit; returns the commit id."""
    from huggingface_hub import HfApi

    _use_bounded_client()
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
    except Exception as e:  # translated below when it is a Hub or network failure
        error = _push_error(e, repo_id, endpoint, has_token=bool(token))
        if error is None:
            raise
        raise HubError(_redact(error, token)) from e
    return getattr(info, "oid", None)


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
    if isinstance(e, transport_errors()):
        return (
            f"cannot reach the Hub at {endpoint} ({type(e).__name__}: {e}); "
            f"check the network or --endpoint, or raise {TIMEOUT_ENV} (now {hub_timeout():g} s). "
            "Nothing was changed locally."
        )
    if isinstance(e, json.JSONDecodeError):
        return f"{not_a_hub(endpoint, e)} Nothing was changed locally."
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


def transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's could-not-talk-to-the-server errors: httpx2 under hub 2.x, httpx under
    1.x (neither subclasses OSError), plus the builtin ConnectionError/TimeoutError."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)
