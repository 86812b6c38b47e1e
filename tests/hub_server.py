"""A fake Hugging Face Hub on 127.0.0.1 for the download tests: the subset of the protocol sdcli speaks.

Two ``ThreadingHTTPServer`` s on 127.0.0.1, each on its own free port, each serving from a background thread:

- the **hub** (``hub.endpoint``, what ``HF_ENDPOINT`` points at):

  - ``GET /api/models/{repo_id}/revision/{revision}?blobs=true``: the repo listing as the Hub's API gives it,
    ``{"id", "sha": commit, "siblings": [{"rfilename", "blobId", "size", "lfs": {"sha256", "size",
    "pointerSize"}}]}`` (no ``lfs`` for a plain git file);
  - ``HEAD`` / ``GET /{repo_id}/resolve/{revision}/{path}``: an LFS file answers ``302`` to the CDN with
    ``X-Repo-Commit``, ``X-Linked-Etag: "<sha256>"``, ``X-Linked-Size`` (and ``ETag``); a plain git file answers
    ``200`` with the bytes, ``ETag: "<git blob sha1>"`` and ``X-Repo-Commit``. ``revision`` is a branch name
    given to ``add_repo`` or a commit sha, percent-encoded as the Hub's clients send it;
  - errors as the Hub sends them: ``404`` with ``X-Error-Code: RepoNotFound | RevisionNotFound | EntryNotFound``;
    ``401`` for a gated or private repo without a token (``X-Error-Code: GatedRepo``, or ``RepoNotFound`` for a
    private one, as the Hub hides those) and for any unknown token; ``403`` for a known token without access;

- the **CDN** (``hub.cdn_endpoint``, another host:port, so that "the token goes to the endpoint only" is
  testable): ``HEAD`` / ``GET /lfs/{sha256}?file=PATH`` with ``Range: bytes=N-`` / ``bytes=N-M`` support
  (``206`` + ``Content-Range``; ``416`` past the end).

Use::

    with FakeHub() as hub:                      # or hub = FakeHub().start(); ...; hub.stop()
        commit = hub.add_repo("org/model", {"unet/w.safetensors": data, "model_index.json": b"{}"})
        client = HubClient(hub.endpoint, retries=2, backoff=0.001)

``add_repo(repo_id, files, revision="main", commit=None, gated=False, private=False, lfs=True) -> commit``:
``files`` maps repo paths to bytes (any string, hostile ones like ``"../escape"`` or ``"/abs"`` included: they are
listed and served as given); ``lfs`` is True (every file is an LFS file), False (none) or a collection of the
paths that are; calling it again for the same repo adds another revision. ``hub.tokens = {"good": {"org/repo"}}``
grants tokens access to gated / private repos.

Fault injection (each applies to requests arriving after it is set):

- ``hub.drop_after[path] = N``: the next body of ``path`` (from the hub or the CDN) stops after N bytes and the
  connection is closed; fires once;
- ``hub.ignore_range = True``: Range headers are ignored (the whole file, ``200``);
- ``hub.corrupt.add(path)``: the body of ``path`` has one byte flipped (headers still announce the true file);
- ``hub.fail_next(status, count=1, retry_after="0", server="any")``: the next ``count`` requests (to ``"hub"``,
  ``"cdn"`` or ``"any"``) answer ``status`` (429 carries ``Retry-After``);
- ``hub.stall_next(seconds, count=1, server="any")``: the next ``count`` requests wait ``seconds`` before any
  answer (a client with a shorter timeout sees a read timeout);
- ``hub.renames["old/name"] = "org/name"``: the API and resolve answer ``307`` with a relative ``Location`` to
  the new name, as the Hub does for a renamed repo.

Records (read them after the client returns):

- ``hub.requests``: a list of ``RequestRecord(server, method, path, netloc, headers, authorization)`` in arrival
  order, ``server`` being ``"hub"`` or ``"cdn"``, ``netloc`` the receiving server's ``127.0.0.1:PORT``,
  ``authorization`` whether an Authorization header came with it;
- ``hub.bytes_sent``: body bytes of repo files sent per repo path (``Counter``), from either server;
  ``hub.total_bytes_sent()`` their sum; ``hub.clear_records()`` forgets both.

Sockets time out after a few seconds and the servers stop at ``stop()`` / the end of the ``with`` block, so a test
never hangs on them. Only 127.0.0.1 is ever bound or named.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Collection
from urllib.parse import parse_qs, quote, unquote, urlsplit

SOCKET_TIMEOUT_S = 5.0
LOOPBACK = "127.0.0.1"
# The Hub's answer in front of a redirect: its body is text whose Content-Length is not the file's size.
REDIRECT_BODY = b"Found. Redirecting to the CDN"


@dataclass(frozen=True)
class RequestRecord:
    server: str                 # "hub" or "cdn"
    method: str                 # "GET", "HEAD"
    path: str                   # the request target as sent, query included
    netloc: str                 # "127.0.0.1:PORT" of the server that received it
    headers: dict[str, str] = field(repr=False)
    authorization: bool = False


@dataclass
class _RepoFile:
    data: bytes
    lfs: bool
    sha256: str
    git_sha1: str


@dataclass
class _Repo:
    gated: bool
    private: bool
    branches: dict[str, str] = field(default_factory=dict)             # revision name -> commit
    commits: dict[str, dict[str, _RepoFile]] = field(default_factory=dict)


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a file's bytes: what the Hub sends as the ETag of a plain (non-LFS) file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """(first, last) byte of a ``bytes=N-`` / ``bytes=N-M`` header; None when absent or not understood; the
    string ``"unsatisfiable"`` when it starts past the end."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first_text, _, last_text = header[len("bytes="):].partition("-")
    if not first_text.isdigit() or (last_text and not last_text.isdigit()):
        return None
    first = int(first_text)
    last = min(int(last_text), size - 1) if last_text else size - 1
    if first >= size or last < first:
        return "unsatisfiable"
    return first, last


class FakeHub:
    """The hub and CDN servers, their repos, fault knobs and request records (see the module docstring)."""

    def __init__(self) -> None:
        self.repos: dict[str, _Repo] = {}
        self.blobs: dict[str, bytes] = {}           # sha256 -> bytes, served by the CDN
        self.tokens: dict[str, Collection[str]] = {}
        self.renames: dict[str, str] = {}
        self.drop_after: dict[str, int] = {}
        self.corrupt: set[str] = set()
        self.ignore_range = False
        self.requests: list[RequestRecord] = []
        self.bytes_sent: Counter[str] = Counter()
        self._failures: list[tuple[int, str, str]] = []   # (status, retry_after, server) per pending failure
        self._stalls: list[tuple[float, str]] = []          # (seconds, server) per pending stall
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._servers: dict[str, ThreadingHTTPServer] = {}
        self._threads: list[threading.Thread] = []
        self._urls: dict[str, str] = {}     # kept after stop(): a stopped hub is an unreachable endpoint

    # ----- lifetime -----

    def start(self) -> "FakeHub":
        for name in ("hub", "cdn"):
            server = ThreadingHTTPServer((LOOPBACK, 0), _Handler)
            server.daemon_threads = True
            server.fake_hub = self          # type: ignore[attr-defined]
            server.role = name              # type: ignore[attr-defined]
            self._servers[name] = server
            self._urls[name] = "http://%s:%d" % server.server_address[:2]
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                      name=f"fake-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stopping.set()                  # wakes stalled handlers
        for server in self._servers.values():
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=SOCKET_TIMEOUT_S)
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        """The hub's base URL, ``http://127.0.0.1:PORT``: what HF_ENDPOINT is set to (still known after stop())."""
        return self._urls["hub"]

    @property
    def cdn_endpoint(self) -> str:
        """The CDN's base URL: another port, so another origin."""
        return self._urls["cdn"]

    # ----- content -----

    def add_repo(self, repo_id: str, files: dict[str, bytes], revision: str = "main", commit: str | None = None,
                 gated: bool = False, private: bool = False, lfs: bool | Collection[str] = True) -> str:
        """Serve ``files`` as ``repo_id`` at ``revision`` (a branch name); returns the commit sha."""
        if commit is None:
            commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
        stored = {}
        for path, data in files.items():
            is_lfs = lfs if isinstance(lfs, bool) else path in lfs
            sha256 = hashlib.sha256(data).hexdigest()
            stored[path] = _RepoFile(bytes(data), is_lfs, sha256, git_blob_sha1(data))
            if is_lfs:
                self.blobs[sha256] = bytes(data)
        with self._lock:
            repo = self.repos.setdefault(repo_id, _Repo(gated=gated, private=private))
            repo.gated, repo.private = gated, private
            repo.branches[revision] = commit
            repo.commits[commit] = stored
        return commit

    def fail_next(self, status: int, count: int = 1, retry_after: str = "0", server: str = "any") -> None:
        """Answer ``status`` to the next ``count`` requests reaching ``server`` ("hub", "cdn" or "any")."""
        with self._lock:
            self._failures.extend([(status, retry_after, server)] * count)

    def stall_next(self, seconds: float, count: int = 1, server: str = "any") -> None:
        """Hold the next ``count`` requests reaching ``server`` for ``seconds`` before answering them."""
        with self._lock:
            self._stalls.extend([(seconds, server)] * count)

    def pending_failures(self) -> int:
        with self._lock:
            return len(self._failures)

    # ----- records -----

    def clear_records(self) -> None:
        with self._lock:
            self.requests.clear()
            self.bytes_sent.clear()

    def total_bytes_sent(self) -> int:
        with self._lock:
            return sum(self.bytes_sent.values())

    def requests_to(self, server: str) -> list[RequestRecord]:
        with self._lock:
            return [record for record in self.requests if record.server == server]

    # ----- used by the handler -----

    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self.requests.append(record)

    def _take_failure(self, server: str) -> tuple[int, str] | None:
        with self._lock:
            for index, (status, retry_after, where) in enumerate(self._failures):
                if where in ("any", server):
                    del self._failures[index]
                    return status, retry_after
        return None

    def _take_stall(self, server: str) -> float | None:
        with self._lock:
            for index, (seconds, where) in enumerate(self._stalls):
                if where in ("any", server):
                    del self._stalls[index]
                    return seconds
        return None

    def _take_drop(self, path: str) -> int | None:
        with self._lock:
            return self.drop_after.pop(path, None)

    def _count_sent(self, path: str, nbytes: int) -> None:
        with self._lock:
            self.bytes_sent[path] += nbytes


class _Handler(BaseHTTPRequestHandler):
    """One request to the hub or the CDN. HTTP/1.0: one request per connection."""

    protocol_version = "HTTP/1.0"
    timeout = SOCKET_TIMEOUT_S
    server_version = "FakeHub/1.0"

    @property
    def hub(self) -> FakeHub:
        return self.server.fake_hub  # type: ignore[attr-defined]

    @property
    def role(self) -> str:
        return self.server.role  # type: ignore[attr-defined]

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        pass  # quiet: the records say what happened

    def handle(self) -> None:
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the client gave up on this request (a timeout test, a dropped transfer): nothing to answer

    def do_HEAD(self) -> None:
        self._dispatch(body=False)

    def do_GET(self) -> None:
        self._dispatch(body=True)

    # ----- routing -----

    def _dispatch(self, body: bool) -> None:
        host, port = self.server.server_address[:2]
        headers = {key: value for key, value in self.headers.items()}
        self.hub._record(RequestRecord(self.role, self.command, self.path, f"{host}:{port}", headers,
                                       "Authorization" in self.headers))
        stall = self.hub._take_stall(self.role)
        if stall is not None:
            self.hub._stopping.wait(stall)
        failure = self.hub._take_failure(self.role)
        if failure is not None:
            status, retry_after = failure
            extra = {"Retry-After": retry_after} if status == 429 else {}
            self._send_error(status, None, f"injected {status}", body, extra)
            return
        url = urlsplit(self.path)
        if self.role == "cdn":
            self._serve_cdn(url.path, parse_qs(url.query), body)
            return
        segments = url.path.split("/")   # ["", ...]
        if url.path.startswith("/api/models/") and "/revision/" in url.path:
            repo_part, _, revision = url.path[len("/api/models/"):].partition("/revision/")
            self._serve_listing(unquote(repo_part), unquote(revision), body)
        elif len(segments) >= 6 and segments[3] == "resolve":
            repo_id = f"{unquote(segments[1])}/{unquote(segments[2])}"
            revision = unquote(segments[4])
            path = "/".join(unquote(segment) for segment in segments[5:])
            self._serve_resolve(repo_id, revision, path, body)
        else:
            self._send_error(404, None, "no such route", body)

    # ----- answers -----

    def _send_error(self, status: int, error_code: str | None, message: str, body: bool,
                    extra: dict[str, str] | None = None) -> None:
        payload = json.dumps({"error": message}).encode()
        self.send_response(status)
        if error_code:
            self.send_header("X-Error-Code", error_code)
        self.send_header("X-Error-Message", message)
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def _check_access(self, repo_id: str, repo: _Repo, body: bool) -> bool:
        """False (and the error sent) when the request may not see ``repo``."""
        authorization = self.headers.get("Authorization")
        token = None
        if authorization is not None:
            scheme, _, token = authorization.partition(" ")
            if scheme != "Bearer" or token not in self.hub.tokens:
                self._send_error(401, None, "Invalid credentials in Authorization header", body)
                return False
        if not (repo.gated or repo.private):
            return True
        if token is None:
            code = "GatedRepo" if repo.gated else "RepoNotFound"
            self._send_error(401, code, f"Access to model {repo_id} is restricted.", body)
            return False
        if repo_id not in self.hub.tokens[token]:
            self._send_error(403, "GatedRepo", f"Access to model {repo_id} is restricted.", body)
            return False
        return True

    def _find(self, repo_id: str, revision: str, body: bool, kind: str, rest: str) -> tuple[str, dict] | None:
        """(commit, files) of ``repo_id`` at ``revision``, or None with the error (or rename redirect) sent."""
        if repo_id in self.hub.renames:
            new_id = self.hub.renames[repo_id]
            location = (f"/api/models/{new_id}/revision/{quote(revision, safe='')}" if kind == "api"
                        else f"/{new_id}/resolve/{quote(revision, safe='')}/{rest}")
            self.send_response(307)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._send_error(404, "RepoNotFound", "Repository not found", body)
            return None
        if not self._check_access(repo_id, repo, body):
            return None
        commit = repo.branches.get(revision, revision)
        if commit not in repo.commits:
            self._send_error(404, "RevisionNotFound", f"Invalid rev id: {revision}", body)
            return None
        return commit, repo.commits[commit]

    def _serve_listing(self, repo_id: str, revision: str, body: bool) -> None:
        found = self._find(repo_id, revision, body, "api", "")
        if found is None:
            return
        commit, files = found
        siblings = []
        for path, item in files.items():
            sibling = {"rfilename": path, "blobId": item.git_sha1, "size": len(item.data)}
            if item.lfs:
                sibling["lfs"] = {"sha256": item.sha256, "size": len(item.data), "pointerSize": 134}
            siblings.append(sibling)
        payload = json.dumps({"_id": commit[:24], "id": repo_id, "modelId": repo_id, "sha": commit,
                              "private": self.hub.repos[repo_id].private,
                              "gated": "auto" if self.hub.repos[repo_id].gated else False,
                              "siblings": siblings}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def _serve_resolve(self, repo_id: str, revision: str, path: str, body: bool) -> None:
        found = self._find(repo_id, revision, body, "resolve", quote(path))
        if found is None:
            return
        commit, files = found
        item = files.get(path)
        if item is None:
            self._send_error(404, "EntryNotFound", f"{path} does not exist on {revision}", body,
                             {"X-Repo-Commit": commit})
            return
        if not item.lfs:
            self._send_bytes(path, item.data, body, {"X-Repo-Commit": commit, "ETag": f'"{item.git_sha1}"'})
            return
        location = f"{self.hub.cdn_endpoint}/lfs/{item.sha256}?file={quote(path, safe='')}"
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("X-Repo-Commit", commit)
        self.send_header("X-Linked-Etag", f'"{item.sha256}"')
        self.send_header("X-Linked-Size", str(len(item.data)))
        self.send_header("ETag", f'"{item.sha256}"')
        self.send_header("Content-Length", str(len(REDIRECT_BODY)))
        self.end_headers()
        if body:
            self.wfile.write(REDIRECT_BODY)

    def _serve_cdn(self, url_path: str, query: dict[str, list[str]], body: bool) -> None:
        sha256 = url_path[len("/lfs/"):] if url_path.startswith("/lfs/") else ""
        data = self.hub.blobs.get(sha256)
        if data is None:
            self._send_error(404, None, "NoSuchKey", body)
            return
        path = query.get("file", [sha256])[0]
        self._send_bytes(path, data, body, {"ETag": f'"{hashlib.md5(data).hexdigest()}"'})

    def _send_bytes(self, path: str, data: bytes, body: bool, headers: dict[str, str]) -> None:
        """The file (or the asked range of it), with the fault knobs applied."""
        wanted = None if self.hub.ignore_range else parse_range(self.headers.get("Range"), len(data))
        if wanted == "unsatisfiable":
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if path in self.hub.corrupt and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        first, last = wanted if isinstance(wanted, tuple) else (0, len(data) - 1)
        part = data[first:last + 1]
        self.send_response(206 if isinstance(wanted, tuple) else 200)
        for key, value in headers.items():
            self.send_header(key, value)
        if isinstance(wanted, tuple):
            self.send_header("Content-Range", f"bytes {first}-{last}/{len(data)}")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(part)))
        self.end_headers()
        if not body:
            return
        drop = self.hub._take_drop(path)
        if drop is not None:
            part = part[:drop]
        self.hub._count_sent(path, len(part))   # before writing: the client cannot see bytes not yet counted
        self.wfile.write(part)
        self.wfile.flush()
        if drop is not None:
            self.close_connection = True
