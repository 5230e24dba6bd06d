"""A loopback stand-in for the Hugging Face Hub: the endpoints `huggingface_hub` uses to create a
repo, upload a folder and download a snapshot (stdlib only, in memory, one branch, no LFS/Xet).

Every file is answered `uploadMode: regular`, so the client sends contents inline (base64 in the
commit's NDJSON) and never reaches for LFS or Xet storage. Errors carry the `X-Error-Code` /
`X-Error-Message` headers the real Hub sends, which is how the client picks its exception class
(RepositoryNotFoundError, RemoteEntryNotFoundError, GatedRepoError, ...).

    with HubServer(token="hf_secret") as hub:   # token: reject any other credentials (optional)
        HfApi(endpoint=hub.url, token="hf_secret").create_repo("me/tiny")
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

MAX_BODY = 512 * 1024 * 1024  # refuse anything bigger than a test could mean to send
BAD_CREDENTIALS = "Invalid credentials in Authorization header"

REPO = r"(?P<repo>[^/]+/[^/]+)"
ROUTES = [  # (method, pattern, handler name); checked in order
    ("POST", r"/api/repos/create", "create_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("POST", rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
    ("POST", rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", "commit"),
    ("GET", rf"/api/models/{REPO}/revision/(?P<rev>[^/]+)", "revision"),
    ("GET", rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree"),
    ("GET", rf"/api/models/{REPO}", "revision"),
    ("HEAD", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ("GET", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
]


def git_blob_sha1(data: bytes) -> str:
    """The id git gives a file's content; the Hub's ETag and `oid` for regular (non-LFS) files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    private: bool = False
    gated: bool = False
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)  # commit shas, oldest first

    @property
    def sha(self) -> str:
        return self.commits[-1]


class HttpError(Exception):
    """An HTTP error answer, raised inside a handler."""

    def __init__(
        self, status: int, message: str, code: str | None = None, body: dict[str, Any] | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.body = body or {}  # extra JSON fields (a 409 carries the existing repo's url)


class HubServer:
    """A threaded HTTP server on 127.0.0.1 (a free port) holding repos in memory.

    `requests` logs (method, path) of every request, so a test can assert that none was made.
    With `token` set, requests must carry `Authorization: Bearer <token>`; others get 401.
    """

    def __init__(self, token: str | None = None):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread: threading.Thread | None = None

    def __enter__(self) -> HubServer:
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # ----------------------------------------------------------------- state helpers

    def repo(self, repo_id: str, *, authorized: bool) -> Repo:
        repo = self.repos.get(repo_id)
        # The Hub answers "not found" for a private repo a caller may not see: no existence leak.
        if repo is None or (repo.private and not authorized):
            raise HttpError(404, "Repository not found", "RepoNotFound")
        if repo.gated and not authorized:
            raise HttpError(403, f"Access to model {repo_id} is restricted", "GatedRepo")
        return repo

    def revision_of(self, repo: Repo, rev: str) -> str:
        rev = unquote(rev)
        if rev == "main" or rev in repo.commits:
            return repo.sha
        raise HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def new_commit(self, repo: Repo, summary: str) -> str:
        seed = f"{len(repo.commits)}:{summary}:{time.time_ns()}".encode()
        sha = hashlib.sha1(seed + "\0".join(sorted(repo.files)).encode()).hexdigest()
        repo.commits.append(sha)
        return sha

    # ----------------------------------------------------------------- endpoints

    def create_repo(self, req: Request) -> Any:
        body = req.json()
        name, org = body.get("name"), body.get("organization")
        if not name or not org:  # a real Hub would default org to the caller; we have no users
            raise HttpError(400, "name and organization are required")
        repo_id = f"{org}/{name}"
        url = f"{self.url}/{repo_id}"
        if repo_id in self.repos:
            raise HttpError(409, "You already created this model repo", body={"url": url})
        repo = Repo(private=body.get("visibility") == "private" or bool(body.get("private")))
        self.repos[repo_id] = repo
        self.new_commit(repo, "initial commit")
        return {"url": url, "name": repo_id, "id": repo_id}

    def validate_yaml(self, req: Request) -> Any:
        return {"errors": [], "warnings": []}

    def preupload(self, req: Request, repo: str, rev: str) -> Any:
        hub_repo = self.repo(repo, authorized=req.authorized)
        self.revision_of(hub_repo, rev)
        files = []
        for item in req.json().get("files", []):
            entry = {"path": item["path"], "uploadMode": "regular", "shouldIgnore": False}
            if item["path"] in hub_repo.files:  # lets the client skip files that did not change
                entry["oid"] = git_blob_sha1(hub_repo.files[item["path"]])
            files.append(entry)
        return {"files": files}

    def commit(self, req: Request, repo: str, rev: str) -> Any:
        hub_repo = self.repo(repo, authorized=req.authorized)
        self.revision_of(hub_repo, rev)
        files = dict(hub_repo.files)
        summary = ""
        for line in req.body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get("key"), item.get("value", {})
            if key == "header":
                summary = value.get("summary", "")
                parent = value.get("parentCommit")
                if parent and parent != hub_repo.sha:
                    raise HttpError(412, "A commit has happened since; refresh and try again")
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise HttpError(400, f"unsupported encoding {value.get('encoding')!r}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: c for p, c in files.items() if not p.startswith(prefix)}
            else:  # lfsFile, copies: this server only speaks inline uploads
                raise HttpError(400, f"unsupported commit operation {key!r}")
        hub_repo.files = files
        sha = self.new_commit(hub_repo, summary)
        return {
            "commitUrl": f"{self.url}/{repo}/commit/{sha}",
            "commitOid": sha,
            "pullRequestUrl": None,
        }

    def revision(self, req: Request, repo: str, rev: str = "main") -> Any:
        hub_repo = self.repo(repo, authorized=req.authorized)
        sha = self.revision_of(hub_repo, rev)
        return {
            "id": repo,
            "modelId": repo,
            "sha": sha,
            "private": hub_repo.private,
            "gated": hub_repo.gated,
            "disabled": False,
            "tags": [],
            "downloads": 0,
            "likes": 0,
            "siblings": [{"rfilename": path} for path in sorted(hub_repo.files)],
        }

    def tree(self, req: Request, repo: str, rev: str, path: str | None = None) -> Any:
        hub_repo = self.repo(repo, authorized=req.authorized)
        self.revision_of(hub_repo, rev)
        prefix = unquote(path).rstrip("/") + "/" if path else ""
        recursive = req.query.get("recursive", ["false"])[0].lower() == "true"
        entries, folders = [], set()
        for name in sorted(hub_repo.files):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix) :]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            data = hub_repo.files[name]
            entries.append(
                {"type": "file", "path": name, "size": len(data), "oid": git_blob_sha1(data)}
            )
        if prefix and not entries and not folders:
            raise HttpError(404, f"{path} does not exist", "EntryNotFound")
        dirs = [{"type": "directory", "path": f, "oid": "0" * 40} for f in sorted(folders)]
        return dirs + entries

    def resolve(self, req: Request, repo: str, rev: str, path: str) -> Any:
        hub_repo = self.repo(repo, authorized=req.authorized)
        sha = self.revision_of(hub_repo, rev)
        name = unquote(path)
        if name not in hub_repo.files:
            raise HttpError(404, "Entry not found", "EntryNotFound")
        data = hub_repo.files[name]
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{git_blob_sha1(data)}"',
            "Content-Type": "application/octet-stream",
        }
        return Raw(data, headers)


@dataclass
class Raw:
    """A non-JSON answer: bytes plus headers."""

    data: bytes
    headers: dict[str, str]


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    body: bytes
    authorized: bool

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except json.JSONDecodeError as e:
            raise HttpError(400, f"invalid JSON body: {e}") from e


def _handler_for(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the client expects; every answer is sized
        timeout = 10  # an idle connection does not hold a thread forever

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep tests quiet
            pass

        def do_GET(self) -> None:
            self._dispatch("GET")

        def do_HEAD(self) -> None:
            self._dispatch("HEAD")

        def do_POST(self) -> None:
            self._dispatch("POST")

        def do_PUT(self) -> None:
            self._dispatch("PUT")

        def do_DELETE(self) -> None:
            self._dispatch("DELETE")

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks, total = [], 0
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        return b"".join(chunks)
                    total += size
                    if total > MAX_BODY:
                        raise HttpError(413, "request body too large")
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                raise HttpError(413, "request body too large")
            return self.rfile.read(length) if length else b""

        def _dispatch(self, method: str) -> None:
            parts = urlsplit(self.path)
            with hub.lock:
                hub.requests.append((method, parts.path))
            try:
                body = self._read_body()
                auth = self.headers.get("Authorization")
                authorized = hub.token is None or auth == f"Bearer {hub.token}"
                if hub.token is not None and auth is not None and not authorized:
                    raise HttpError(401, BAD_CREDENTIALS)
                if method == "POST" and not authorized:
                    raise HttpError(401, "You must be authenticated to do this")
                for route_method, pattern, name in ROUTES:
                    match = re.fullmatch(pattern, parts.path)
                    if route_method == method and match:
                        request = Request(
                            method, parts.path, parse_qs(parts.query), body, authorized
                        )
                        with hub.lock:  # one request at a time touches the repos
                            result = getattr(hub, name)(
                                request,
                                **{k: v for k, v in match.groupdict().items() if v is not None},
                            )
                        break
                else:
                    raise HttpError(404, f"no route for {method} {parts.path}")
            except Exception as e:  # a bug in this stub: 501 is not retried, so it fails fast
                if not isinstance(e, HttpError):
                    e = HttpError(501, f"hub_server bug: {e!r}")
                payload = json.dumps({"error": e.message, **e.body}).encode()
                headers = {"Content-Type": "application/json", "X-Error-Message": e.message}
                if e.code:
                    headers["X-Error-Code"] = e.code
                self._send(e.status, payload, headers, head=method == "HEAD")
                return
            if isinstance(result, Raw):
                self._send(200, result.data, result.headers, head=method == "HEAD")
            else:
                self._send(
                    200,
                    json.dumps(result).encode(),
                    {"Content-Type": "application/json"},
                    head=method == "HEAD",
                )

        def _send(self, status: int, data: bytes, headers: dict[str, str], *, head: bool) -> None:
            self.send_response(status, HTTPStatus(status).phrase)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if not head:
                self.wfile.write(data)

    return Handler


def free_port() -> int:
    """A loopback port nothing listens on (bound, read, released): a Hub that is down."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def isolate_hub_client(monkeypatch: Any, root: Path, endpoint: str | None = None) -> None:
    """Point huggingface_hub at `root` for cache and token, drop any real credentials and mirror
    settings, and refuse connections that leave the machine, so no test can reach the real Hub.

    `monkeypatch` is pytest's fixture. huggingface_hub reads its environment once, at import, so
    its constants are patched as well as the variables.
    """
    from huggingface_hub import constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    if endpoint is not None:
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
    for name, value in (
        ("HF_HOME", root),
        ("HF_HUB_CACHE", root / "hub"),
        ("HF_XET_CACHE", root / "xet"),
        ("HF_TOKEN_PATH", root / "token"),
        ("HF_STORED_TOKENS_PATH", root / "stored_tokens"),
        ("HF_HUB_OFFLINE", False),
    ):
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value if isinstance(value, bool) else str(value))

    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def loopback_only(host: Any) -> None:
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise ConnectionRefusedError(f"tests stay on loopback; refused a connection to {host}")

    def connect(self: socket.socket, address: Any) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            loopback_only(address[0])
        return real_connect(self, address)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        loopback_only(host.decode() if isinstance(host, bytes) else host)
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
