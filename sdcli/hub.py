"""Download model files from the Hugging Face Hub (or a mirror) over plain HTTP, resuming and verifying.

The Hub's protocol, as its own clients speak it:

- **listing**: ``GET {endpoint}/api/models/{repo_id}/revision/{revision}?blobs=true`` answers JSON with the commit
  (``"sha"``) and one entry per file, ``"siblings": [{"rfilename", "size", "lfs": {"sha256", "size"}}]``
  (``lfs`` only for files stored in Git LFS, i.e. the weights);
- **metadata**: ``HEAD {endpoint}/{repo_id}/resolve/{revision}/{path}`` answers, before any redirect, with
  ``X-Repo-Commit`` (the commit the revision points at), ``X-Linked-Etag`` (an LFS file's sha256; else ``ETag``)
  and ``X-Linked-Size`` (else ``Content-Length``);
- **bytes**: ``GET`` on the same URL, which for an LFS file redirects to a CDN on another host. Redirects are
  followed here by hand so that the token (``Authorization: Bearer``) goes only to the endpoint's own
  scheme://host:port, never to the CDN;
- **errors**: ``401`` (gated or private repo, or a refused token), ``403`` (a token without access) and ``404``
  with ``X-Error-Code: RepoNotFound | RevisionNotFound | EntryNotFound``.

A file streams into ``TARGET/PATH.incomplete`` (a rerun continues it with ``Range: bytes=N-``; a server that
answers ``200`` instead starts it over), is checked against the announced size and, for LFS files, the sha256 of
the etag, and only then renamed to ``TARGET/PATH``: an interrupted or corrupted download never leaves a file under
its final name. What was verified is recorded in ``TARGET/.sdcli-download/PATH.json``; a rerun whose HEAD answer
still has the recorded etag and size skips the file without reading or transferring it.

Timeouts, dropped connections, ``429`` and ``5xx`` are retried with exponential backoff; every failure a user can
act on is a one-line :class:`HubError` (exit code 2) or :class:`HubAuthError` (exit code 3). The token is kept out
of every message, log record and repr.
"""

from __future__ import annotations

import email.utils
import errno
import fnmatch
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, TypeVar
from urllib.parse import quote, urljoin, urlsplit

import requests

from .errors import SdcliError

log = logging.getLogger("sdcli")

DEFAULT_ENDPOINT = "https://huggingface.co"
CHUNK_SIZE = 1 << 20                 # bytes read, written, hashed and reported per step
MAX_REDIRECTS = 5
MAX_BACKOFF_S = 30.0                 # cap of the exponential backoff between retries
MAX_RETRY_AFTER_S = 60.0             # cap of a 429's Retry-After that is honoured
INCOMPLETE_SUFFIX = ".incomplete"
METADATA_DIR = ".sdcli-download"     # TARGET/.sdcli-download/PATH.json: what was verified
TRUE_VALUES = ("1", "true", "yes", "on")
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
# Files never fetched unless a pattern names them exactly: pickles (loading one runs code from the file), ONNX,
# Flax and Keras weights. sdcli reads .safetensors only.
EXCLUDED_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".onnx", ".onnx_data", ".msgpack", ".h5")
EXCLUDED_INDEX = re.compile(r"\.(bin|ckpt|pt|pth|pkl|msgpack|h5)\.index(\.[a-z0-9_-]+)?\.json$")  # their shard maps
# diffusers' variant tags in weight file names ("diffusion_pytorch_model.fp16.safetensors"); the EMA ones mark
# training extras (EMA and non-EMA copies of the UNet) that inference never needs.
DTYPE_VARIANTS = ("fp16", "bf16", "fp32", "fp8")
EMA_VARIANTS = ("ema", "non_ema", "non-ema")
SHARD_SUFFIX = re.compile(r"-\d+-of-\d+$")                 # "fp16-00001-of-00002"
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
COMMIT_HEX = re.compile(r"^[0-9a-f]{40}$")
# The Hub's rule for a repo id: "name" or "namespace/name", each of letters, digits, "-", "_", ".", not starting
# or ending with "-" or ".", no "--" or "..", at most 96 characters.
REPO_PART = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?$")
HEADER_SAFE_TOKEN = re.compile(r"^[\x21-\x7e]+$")           # printable ASCII without spaces

T = TypeVar("T")


class HubError(SdcliError):
    """A download that failed: network, not found, disk full, verification, a refused file name."""

    exit_code = 2


class HubAuthError(HubError):
    """A repo the request may not see: gated or private without a token (401), a token without access (403)."""

    exit_code = 3


# ----- settings shared with the Hugging Face tools -----

def hub_endpoint(endpoint: str | None = None) -> str:
    """The Hub's base URL: ``endpoint``, else ``$HF_ENDPOINT`` (a mirror, or the tests' local server), else
    https://huggingface.co; without a trailing slash."""
    value = endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    value = value.strip().rstrip("/")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HubError(f"the Hub endpoint must be an http(s) URL such as {DEFAULT_ENDPOINT}, got {value!r} "
                       "(from --endpoint or HF_ENDPOINT)")
    return value


def hf_home() -> Path:
    """The Hugging Face tools' folder: ``$HF_HOME``, else ``$XDG_CACHE_HOME/huggingface``, else
    ``~/.cache/huggingface`` (as huggingface_hub computes it)."""
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(cache).expanduser() / "huggingface"


def hub_token(token: str | None = None) -> str | None:
    """The access token: ``token``, else ``$HF_TOKEN``, else the token file the Hugging Face tools store at login
    (``$HF_TOKEN_PATH``, else ``hf_home()/token``); stripped; None when there is none. Never logged."""
    for candidate in (token, os.environ.get("HF_TOKEN")):
        if candidate and candidate.strip():
            return candidate.strip()
    token_path = Path(os.environ["HF_TOKEN_PATH"]).expanduser() if os.environ.get("HF_TOKEN_PATH") \
        else hf_home() / "token"
    try:
        stored = token_path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return stored or None


def offline() -> bool:
    """True when ``$HF_HUB_OFFLINE`` is set to 1/true/yes/on: nothing may touch the network."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in TRUE_VALUES


# ----- names -----

def check_repo_id(repo_id: str) -> str:
    """``repo_id`` when it is a valid Hub repo id ("org/name", or a legacy "name"); else a HubError."""
    parts = repo_id.split("/") if isinstance(repo_id, str) else []
    if not 1 <= len(parts) <= 2 or not all(REPO_PART.match(part) and ".." not in part and "--" not in part
                                           for part in parts):
        raise HubError(f"{repo_id!r} is not a Hub repo id: expected ORG/NAME of letters, digits, '-', '_' and '.'")
    return repo_id


def check_repo_path(path: str, origin: str = "") -> str:
    """``path`` when it is a safe relative repo path; else a HubError naming it (and where it came from).

    Refused: absolute paths, drive letters, backslashes, control characters, empty / "." / ".." segments, and
    names inside sdcli's own metadata folder; what is left stays inside any folder it is joined to.
    """
    segments = path.split("/") if isinstance(path, str) else [""]
    unsafe = (not isinstance(path, str) or not path or path.startswith("/") or "\\" in path
              or re.match(r"^[A-Za-z]:", path) is not None or any(ord(char) < 32 for char in path)
              or any(segment in ("", ".", "..") for segment in segments) or segments[0] == METADATA_DIR)
    if unsafe:
        source = f" in {origin}" if origin else ""
        raise HubError(f"refused the file name {path!r}{source}: a repo file must be a relative path without "
                       "'..', empty segments, backslashes or drive letters; nothing was written")
    return path


def inside(target: Path, relative: str) -> Path:
    """``target/relative`` after checking that it lands inside ``target`` (symlinked folders resolved)."""
    root = Path(target).resolve()
    joined = root / relative
    parent = joined.parent.resolve()
    if parent != root and root not in parent.parents:
        raise HubError(f"refused the file name {relative!r}: it would be written outside {target}")
    return parent / joined.name


# ----- what the caller sees -----

@dataclass(frozen=True)
class RepoFile:
    """One file of a repo listing."""

    path: str              # relative path in the repo, "unet/diffusion_pytorch_model.fp16.safetensors"
    size: int | None
    sha256: str | None     # the LFS sha256 when the Hub gives one (64 hex chars), else None


class DownloadProgress(Protocol):
    """What a progress display may implement; the client calls each method only if it is present.

    Every file gets ``start_file`` then ``finish_file``; a skipped file starts with ``already == total``. When a
    server restarts a transfer from zero (it ignored a Range), ``start_file`` is called again with ``already=0``.
    """

    def start_file(self, path: str, total: int | None, already: int) -> None: ...

    def advance(self, path: str, nbytes: int) -> None: ...

    def finish_file(self, path: str, skipped: bool) -> None: ...


@dataclass(frozen=True)
class DownloadResult:
    commit: str                  # the commit the files came from (X-Repo-Commit), else the revision asked for
    downloaded: list[str]        # files transferred (fully or resumed)
    skipped: list[str]           # already present and verified: no transfer
    bytes_transferred: int


def _notify(progress: DownloadProgress | None, method: str, *args) -> None:
    callback = getattr(progress, method, None)
    if callable(callback):
        callback(*args)


# ----- choosing files -----

def _is_weight_file(name: str) -> bool:
    return name.endswith(".safetensors") or (".safetensors.index" in name and name.endswith(".json"))


def _variant_of(name: str, wanted: str | None) -> str | None:
    """The variant tag of a weight file name: "fp16" for ``x.fp16.safetensors``,
    ``x.fp16-00001-of-00002.safetensors`` and ``x.safetensors.index.fp16.json``; None for the plain file."""
    known = DTYPE_VARIANTS + EMA_VARIANTS + ((wanted,) if wanted else ())
    for part in name.split(".")[1:]:
        tag = SHARD_SUFFIX.sub("", part)
        if tag in known:
            return tag
    return None


def _file_name(path: str) -> str:
    return path.rpartition("/")[2]


def _folder(path: str) -> str:
    return path.rpartition("/")[0]


def _has_glob(pattern: str) -> bool:
    return any(char in pattern for char in "*?[")


def select_files(files: list[RepoFile], include: list[str], variant: str | None) -> list[RepoFile]:
    """The files to fetch: those matching a glob of ``include`` (all when it is empty), in listing order.

    Never pickles (.bin .ckpt .pt .pth .pkl), ONNX, Flax (.msgpack) or .h5 weights, nor EMA / non-EMA training
    copies, unless a pattern names the file exactly. Per folder (diffusers component), with ``variant`` "fp16"
    ``NAME.fp16.safetensors`` (and its shard index) is taken instead of ``NAME.safetensors`` when the folder has
    it, else the plain files; without a variant (or "fp32" where no such file exists) the plain files.
    """
    wanted = variant or None
    exact = {pattern for pattern in include if not _has_glob(pattern)}
    matched = [item for item in files
               if not include or any(fnmatch.fnmatchcase(item.path, pattern) for pattern in include)]

    def excluded(name: str) -> bool:
        lowered = name.lower()
        return (lowered.endswith(EXCLUDED_SUFFIXES) or EXCLUDED_INDEX.search(lowered) is not None
                or (_variant_of(name, wanted) in EMA_VARIANTS and wanted not in EMA_VARIANTS))

    candidates = [item for item in matched if item.path in exact or not excluded(_file_name(item.path))]
    # The folders (diffusers components) that hold weights of the wanted variant.
    folders_with_variant = {_folder(item.path) for item in candidates
                            if wanted and _is_weight_file(item.path)
                            and _variant_of(_file_name(item.path), wanted) == wanted}
    chosen = []
    for item in candidates:
        if item.path in exact or not _is_weight_file(item.path):
            chosen.append(item)
            continue
        folder_variant = wanted if _folder(item.path) in folders_with_variant else None
        if _variant_of(_file_name(item.path), wanted) == folder_variant:
            chosen.append(item)
    return chosen


# ----- the client -----

@dataclass(frozen=True)
class _Context:
    """What a request is about, for messages: the repo, the revision asked for, the file."""

    repo_id: str
    revision: str
    path: str | None = None

    @property
    def what(self) -> str:
        return f"{self.path} of {self.repo_id}" if self.path else f"the file list of {self.repo_id}"


@dataclass(frozen=True)
class _FileMeta:
    """A resolve answer's metadata: the commit, the etag (an LFS file's sha256) and the size."""

    commit: str | None
    etag: str | None
    size: int | None

    @property
    def sha256(self) -> str | None:
        return self.etag if self.etag and SHA256_HEX.match(self.etag) else None


class _Transient(Exception):
    """A failure worth retrying. ``head (N tries)tail`` is the HubError message when the retries run out."""

    def __init__(self, head: str, tail: str, retry_after: float | None = None):
        super().__init__(head)
        self.head, self.tail, self.retry_after = head, tail, retry_after


class _BearerAuth(requests.auth.AuthBase):
    """The token as an Authorization header; its repr does not show it."""

    def __init__(self, token: str):
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self) -> str:
        return "_BearerAuth(<token>)"


class _NoAuth(requests.auth.AuthBase):
    """No credentials at all: an explicit auth keeps requests from adding ~/.netrc ones to a host."""

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers.pop("Authorization", None)
        return request


def _origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) with the default port filled in: what "the same server" means for the token."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    return scheme, (parts.hostname or "").lower(), port


def _origin_text(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _clean_etag(value: str | None) -> str | None:
    """An ETag without its weak prefix and quotes: ``W/"abc"`` -> ``abc``."""
    if not value:
        return None
    value = value.strip()
    if value.startswith("W/"):
        value = value[2:]
    return value.strip('"') or None


def _int_header(value: str | None) -> int | None:
    return int(value) if value and value.strip().isdigit() else None


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (a number of seconds or an HTTP date), None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _network_reason(exc: Exception) -> str:
    """A short reason for a requests failure ("Connection refused", "timed out"), from its long message."""
    if isinstance(exc, requests.ConnectTimeout):
        return "the connection timed out"
    if isinstance(exc, requests.Timeout):
        return "the server stopped answering (read timeout)"
    text = str(exc)
    found = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if found:
        return found.group(1).strip()
    if "IncompleteRead" in text:
        return "the connection closed before the end of the file"
    for known in ("Connection refused", "Connection reset by peer", "Remote end closed connection without response",
                  "Name or service not known", "Temporary failure in name resolution", "Connection aborted"):
        if known in text:
            return known
    return type(exc).__name__


def _write_chunk(file, data: bytes) -> None:
    """The one place downloaded bytes reach the disk (flushed, so a full disk shows up here)."""
    file.write(data)
    file.flush()


def _megabytes(nbytes: int) -> int:
    return max(1, math.ceil(nbytes / 1e6))


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


class _PartialFile:
    """``TARGET/PATH.incomplete``: the bytes so far, appended chunk by chunk, with their running sha256."""

    def __init__(self, path: Path, hashing: bool):
        self.path = path
        self.hashing = hashing
        self.size = 0
        self._hash = hashlib.sha256() if hashing else None
        self._file = None

    def open(self, expected_size: int | None, keep: bool) -> None:
        """Open for appending; the bytes already there are kept (and hashed) when ``keep`` and not too many."""
        self._file = open(self.path, "ab")
        self.size = self._file.tell()
        if not keep or (expected_size is not None and self.size > expected_size):
            self.restart()
        elif self.size and self.hashing:
            with open(self.path, "rb") as existing:
                for block in iter(lambda: existing.read(CHUNK_SIZE), b""):
                    self._hash.update(block)

    def restart(self) -> None:
        self._file.seek(0)
        self._file.truncate(0)
        self.size = 0
        self._hash = hashlib.sha256() if self.hashing else None

    def write(self, data: bytes) -> None:
        _write_chunk(self._file, data)
        self.size += len(data)
        if self._hash is not None:
            self._hash.update(data)

    def sha256(self) -> str | None:
        return self._hash.hexdigest() if self._hash is not None else None

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:  # a full disk refusing the last buffered bytes: the file is resumed from its size
                pass
            self._file = None


class HubClient:
    """Lists and downloads files of Hub repos. ``retries`` failures are retried per request (``backoff`` seconds,
    doubling, capped at 30 s); ``timeout`` bounds each connect and each read."""

    def __init__(self, endpoint: str | None = None, token: str | None = None, *, timeout: float = 30.0,
                 retries: int = 5, backoff: float = 1.0, session: requests.Session | None = None):
        self.endpoint = hub_endpoint(endpoint)
        token = hub_token(token)
        if token is not None and not HEADER_SAFE_TOKEN.match(token):
            raise HubAuthError("the Hugging Face token (from --token, HF_TOKEN or the token file) contains spaces "
                               "or characters an HTTP header cannot carry; copy it again from the Hub's settings")
        self.timeout = timeout
        self.retries = max(0, int(retries))
        self.backoff = max(0.0, float(backoff))
        self._session = session if session is not None else requests.Session()
        self._endpoint_origin = _origin(self.endpoint)
        self._auth = _BearerAuth(token) if token else _NoAuth()      # the only place the token is kept
        self._sleep = time.sleep
        from . import __version__
        self._user_agent = f"sdcli/{__version__}"

    def __repr__(self) -> str:
        return f"HubClient(endpoint={self.endpoint!r}, token={'<set>' if self.has_token else None})"

    @property
    def has_token(self) -> bool:
        return isinstance(self._auth, _BearerAuth)

    # ----- public -----

    def list_files(self, repo_id: str, revision: str = "main") -> tuple[str, list[RepoFile]]:
        """(commit sha, files) from the Hub API. A file name that is not a safe relative path is a HubError."""
        context = _Context(check_repo_id(repo_id), self._check_revision(revision))
        self._refuse_offline(context.what)
        url = f"{self.endpoint}/api/models/{repo_id}/revision/{quote(revision, safe='')}?blobs=true"
        response = self._retry(lambda: self._exchange(
            "GET", url, context, {"Accept": "application/json"}, follow=self._same_origin_location))
        with response:
            if response.status_code != 200:
                raise HubError(f"{_origin_text(response.url)} answered {response.status_code} for {context.what}")
            try:
                listing = response.json()
            except ValueError:
                raise HubError(f"{self.endpoint} did not answer with JSON for {context.what}: is HF_ENDPOINT a "
                               "Hugging Face Hub?") from None
        return self._parse_listing(listing, context)

    def download(self, repo_id: str, files: list[str], target: Path, revision: str = "main",
                 progress: DownloadProgress | None = None) -> DownloadResult:
        """Fetch ``files`` (repo-relative paths, already selected by the caller) into ``target``, resuming,
        verifying, skipping what is already there and verified. Returns what happened.

        Every name is checked before anything is requested or written. The first file's ``X-Repo-Commit`` pins
        the others to the same commit, so a branch that moves meanwhile cannot mix two versions.
        """
        check_repo_id(repo_id)
        self._check_revision(revision)
        target = Path(target)
        paths = list(dict.fromkeys(check_repo_path(path) for path in files))
        for path in paths:
            inside(target, path)
        if paths:
            self._refuse_offline(repo_id)
        commit: str | None = None
        url_revision = revision
        downloaded, skipped, transferred = [], [], 0
        for path in paths:
            context = _Context(repo_id, revision, path)
            meta = self._file_meta(context, url_revision)
            if commit is None and meta.commit:
                commit = meta.commit
                if COMMIT_HEX.match(commit):
                    url_revision = commit
            nbytes = self._download_file(context, url_revision, meta, target, progress)
            if nbytes is None:
                skipped.append(path)
            else:
                downloaded.append(path)
                transferred += nbytes
        return DownloadResult(commit or revision, downloaded, skipped, transferred)

    # ----- one file -----

    def _download_file(self, context: _Context, url_revision: str, meta: _FileMeta, target: Path,
                       progress: DownloadProgress | None) -> int | None:
        """Bytes transferred for one file, or None when it was already there and verified."""
        path = context.path
        final = inside(target, path)
        record = inside(target, f"{METADATA_DIR}/{path}.json")
        partial_record = inside(target, f"{METADATA_DIR}/{path}{INCOMPLETE_SUFFIX}.json")
        incomplete = final.with_name(final.name + INCOMPLETE_SUFFIX)
        if self._already_verified(final, record, meta):
            log.debug("%s is up to date (etag %s)", path, meta.etag)
            _notify(progress, "start_file", path, meta.size, meta.size or 0)
            _notify(progress, "finish_file", path, True)
            return None
        self._make_folders(final.parent, record.parent)
        same_partial = _read_json(partial_record).get("etag") in (None, meta.etag)
        _write_json(partial_record, {"etag": meta.etag, "size": meta.size})
        partial = _PartialFile(incomplete, hashing=meta.sha256 is not None)
        try:
            try:
                partial.open(meta.size, keep=same_partial)
            except OSError as exc:
                raise HubError(f"cannot write {incomplete}: {exc.strerror or exc}") from None
            if partial.size:
                log.info("resuming %s from byte %d", path, partial.size)
            self._check_space(final, meta, partial.size)
            transferred = self._fetch(context, url_revision, meta, partial, progress)
        finally:
            partial.close()
        self._verify(context, meta, partial)
        try:
            os.replace(incomplete, final)
        except OSError as exc:
            raise HubError(f"cannot move the download into place at {final}: {exc.strerror or exc}") from None
        _write_json(record, {"commit": meta.commit, "etag": meta.etag, "size": partial.size,
                             "sha256": meta.sha256})
        _remove(partial_record)
        _notify(progress, "finish_file", path, False)
        log.info("downloaded %s (%d bytes)", path, partial.size)
        return transferred

    def _already_verified(self, final: Path, record: Path, meta: _FileMeta) -> bool:
        """Whether ``final`` is the file the Hub announces: its record matches (no reading), or, without one, an
        LFS file hashes to the announced sha256 (then the record is written)."""
        try:
            size = final.stat().st_size
        except OSError:
            return False
        recorded = _read_json(record)
        if recorded and meta.etag is not None and recorded.get("etag") == meta.etag \
                and recorded.get("size") == size and meta.size in (None, size):
            return True
        if meta.sha256 is None or meta.size != size:
            return False
        if _sha256_of(final) != meta.sha256:
            return False
        _write_json(record, {"commit": meta.commit, "etag": meta.etag, "size": size, "sha256": meta.sha256})
        return True

    def _fetch(self, context: _Context, url_revision: str, meta: _FileMeta, partial: _PartialFile,
               progress: DownloadProgress | None) -> int:
        """Stream the file into ``partial`` from where it stands, resuming after a dropped connection."""
        url = self._resolve_url(context.repo_id, url_revision, context.path)
        transferred = 0
        announced = False

        def attempt() -> None:
            nonlocal transferred, announced
            offset = partial.size
            if meta.size is not None and offset == meta.size:
                return                                      # complete already: verify it
            headers = {"Accept-Encoding": "identity"}
            if offset:
                headers["Range"] = f"bytes={offset}-"
            response = self._exchange("GET", url, context, headers, stream=True, follow=lambda _: True)
            with response:
                status = response.status_code
                if status == 416 and offset:
                    return                                  # nothing past our end: complete or corrupt, verify
                if status == 206:
                    content_range = response.headers.get("Content-Range", "")
                    if not content_range.startswith(f"bytes {offset}-"):
                        partial.restart()
                        raise _Transient(f"{_origin_text(response.url)} answered a range that was not asked for "
                                         f"while downloading {context.path}", "; run the command again")
                elif status == 200:
                    if offset:
                        log.info("%s ignored the range request for %s: starting over",
                                 _origin_text(response.url), context.path)
                        partial.restart()
                        announced = False
                else:
                    raise HubError(f"{_origin_text(response.url)} answered {status} for {context.what}")
                if not announced:
                    _notify(progress, "start_file", context.path, meta.size, partial.size)
                    announced = True
                try:
                    for chunk in response.iter_content(CHUNK_SIZE):
                        self._write(partial, chunk, meta, context)
                        transferred += len(chunk)
                        _notify(progress, "advance", context.path, len(chunk))
                except (requests.ConnectionError, requests.Timeout,
                        requests.exceptions.ChunkedEncodingError) as exc:
                    raise _Transient(f"the connection to {_origin_text(response.url)} broke while downloading "
                                     f"{context.path} ({_network_reason(exc)})",
                                     "; run the command again to resume (the partial file is kept)") from exc
            if meta.size is not None and partial.size < meta.size:
                raise _Transient(f"the connection to {_origin_text(url)} closed at byte {partial.size} of "
                                 f"{meta.size} of {context.path}",
                                 "; run the command again to resume (the partial file is kept)")

        self._retry(attempt)
        return transferred

    def _write(self, partial: _PartialFile, chunk: bytes, meta: _FileMeta, context: _Context) -> None:
        try:
            partial.write(chunk)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
                missing = (meta.size - partial.size) if meta.size is not None else len(chunk)
                folder = _existing_ancestor(partial.path.parent)
                raise HubError(f"disk full while writing {partial.path}: free {_megabytes(missing)} MB in "
                               f"{folder} and run the command again (the partial download is kept and resumes)"
                               ) from None
            raise HubError(f"cannot write {partial.path}: {exc.strerror or exc}") from None

    def _verify(self, context: _Context, meta: _FileMeta, partial: _PartialFile) -> None:
        """Size and sha256 against the Hub's announcement; a mismatch removes the partial file."""
        problem = None
        if meta.size is not None and partial.size != meta.size:
            problem = f"size mismatch ({partial.size} bytes received, {meta.size} announced)"
        elif meta.sha256 is not None and partial.sha256() != meta.sha256:
            problem = f"sha256 mismatch (expected {meta.sha256}, got {partial.sha256()})"
        if problem:
            _remove(partial.path)
            raise HubError(f"{context.what}: {problem}; the partial file was removed, run the command again")

    def _check_space(self, final: Path, meta: _FileMeta, already: int) -> None:
        if meta.size is None:
            return
        needed = meta.size - already
        folder = _existing_ancestor(final.parent)
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            return
        if needed > free:
            raise HubError(f"not enough disk space for {final.name}: it needs {_megabytes(needed)} MB more and "
                           f"{folder} has {free // 1_000_000} MB free; free some space or download elsewhere")

    @staticmethod
    def _make_folders(*folders: Path) -> None:
        for folder in folders:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise HubError(f"cannot create the folder {folder}: {exc.strerror or exc}") from None

    # ----- metadata -----

    def _file_meta(self, context: _Context, url_revision: str) -> _FileMeta:
        """HEAD on the resolve URL. The Hub's own answer carries the metadata; only an answer without it (a
        renamed repo's redirect, a mirror) is followed."""
        url = self._resolve_url(context.repo_id, url_revision, context.path)
        response = self._retry(lambda: self._exchange(
            "HEAD", url, context, {"Accept-Encoding": "identity"},
            follow=lambda answer: _clean_etag(answer.headers.get("X-Linked-Etag")
                                              or answer.headers.get("ETag")) is None))
        response.close()
        headers = response.headers
        size = _int_header(headers.get("X-Linked-Size"))
        if size is None and response.status_code == 200:
            size = _int_header(headers.get("Content-Length"))
        return _FileMeta(commit=headers.get("X-Repo-Commit"),
                         etag=_clean_etag(headers.get("X-Linked-Etag") or headers.get("ETag")), size=size)

    def _parse_listing(self, listing, context: _Context) -> tuple[str, list[RepoFile]]:
        if not isinstance(listing, dict) or not isinstance(listing.get("sha"), str) \
                or not isinstance(listing.get("siblings"), list):
            raise HubError(f"{self.endpoint} answered for {context.what} without a commit and a file list: is "
                           "HF_ENDPOINT a Hugging Face Hub?")
        files = []
        for sibling in listing["siblings"]:
            if not isinstance(sibling, dict):
                raise HubError(f"{self.endpoint} sent a malformed entry in {context.what}")
            path = check_repo_path(sibling.get("rfilename"), f"the file list of {context.repo_id}")
            lfs = sibling.get("lfs") if isinstance(sibling.get("lfs"), dict) else {}
            size = lfs.get("size", sibling.get("size"))
            sha256 = lfs.get("sha256")
            files.append(RepoFile(path=path, size=size if isinstance(size, int) else None,
                                  sha256=sha256 if isinstance(sha256, str) and SHA256_HEX.match(sha256) else None))
        return listing["sha"], files

    # ----- HTTP -----

    def _resolve_url(self, repo_id: str, revision: str, path: str) -> str:
        return f"{self.endpoint}/{repo_id}/resolve/{quote(revision, safe='')}/{quote(path)}"

    @staticmethod
    def _check_revision(revision: str) -> str:
        if not isinstance(revision, str) or not revision.strip() or any(ord(char) < 32 for char in revision):
            raise HubError(f"{revision!r} is not a revision: give a branch, tag or commit sha")
        return revision

    def _refuse_offline(self, what: str) -> None:
        if offline():
            raise HubError(f"offline mode (HF_HUB_OFFLINE): {what} not downloaded; unset HF_HUB_OFFLINE to allow "
                           "network access")

    def _same_origin_location(self, response: requests.Response) -> bool:
        location = response.headers.get("Location", "")
        return _origin(urljoin(response.url, location)) == self._endpoint_origin

    def _retry(self, attempt: Callable[[], T]) -> T:
        """``attempt()``, retried after a transient failure up to ``retries`` times with exponential backoff."""
        failures = 0
        while True:
            try:
                return attempt()
            except _Transient as exc:
                failures += 1
                if failures > self.retries:
                    raise HubError(f"{exc.head} ({failures} tries){exc.tail}") from None
                if exc.retry_after is not None:
                    delay = min(exc.retry_after, MAX_RETRY_AFTER_S)
                else:
                    delay = min(self.backoff * 2 ** (failures - 1), MAX_BACKOFF_S)
                log.info("%s; retrying in %.1f s (%d of %d)", exc.head, delay, failures, self.retries)
                self._sleep(delay)

    def _exchange(self, method: str, url: str, context: _Context, headers: dict[str, str], *,
                  stream: bool = False, follow: Callable[[requests.Response], bool]) -> requests.Response:
        """One request and the redirects ``follow`` accepts (at most MAX_REDIRECTS), each hop sent with the token
        only if it goes to the endpoint's own scheme://host:port. Error statuses become HubError / _Transient."""
        for _ in range(MAX_REDIRECTS + 1):
            response = self._send(method, url, headers, stream)
            if response.status_code in REDIRECT_STATUSES and follow(response):
                location = response.headers.get("Location")
                response.close()
                if not location:
                    raise HubError(f"{_origin_text(url)} redirected {context.what} nowhere")
                url = urljoin(url, location)
                if urlsplit(url).scheme not in ("http", "https"):
                    raise HubError(f"{_origin_text(response.url)} redirected {context.what} to a non-HTTP address")
                continue
            try:
                self._raise_for_status(response, context)
            except Exception:
                response.close()
                raise
            return response
        raise HubError(f"too many redirects while fetching {context.what} from {self.endpoint}")

    def _send(self, method: str, url: str, headers: dict[str, str], stream: bool) -> requests.Response:
        """One HTTP exchange, no redirect followed; network failures become _Transient."""
        if offline():
            raise HubError(f"offline mode (HF_HUB_OFFLINE): {url} not downloaded")
        origin = _origin_text(url)
        own = _origin(url) == self._endpoint_origin
        log.debug("%s %s", method, url)
        try:
            return self._session.request(method, url, headers={"User-Agent": self._user_agent, **headers},
                                         auth=self._auth if own else _NoAuth(), timeout=self.timeout,
                                         allow_redirects=False, stream=stream)
        except requests.exceptions.SSLError as exc:
            raise HubError(f"the secure connection to {origin} failed ({_network_reason(exc)}); check the system's "
                           "certificates (REQUESTS_CA_BUNDLE) or HF_ENDPOINT") from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            hint = "; check the network or set HF_ENDPOINT" if own else "; check the network and run the command again"
            raise _Transient(f"cannot reach {origin}: {_network_reason(exc)}", hint) from exc
        except requests.RequestException as exc:
            raise HubError(f"the request to {origin} failed ({type(exc).__name__})") from None

    def _raise_for_status(self, response: requests.Response, context: _Context) -> None:
        """The Hub's error answers as one-line errors; 2xx, 3xx (not followed) and 416 pass."""
        status = response.status_code
        if status < 400 or status == 416:
            return
        repo, endpoint = context.repo_id, self.endpoint
        code = response.headers.get("X-Error-Code", "")
        origin = _origin_text(response.url)
        if status == 401:
            if self.has_token:
                raise HubAuthError(f"the token was refused by {endpoint} for {repo}: check HF_TOKEN (or --token); "
                                   f"for a gated repo, accept its license at {endpoint}/{repo} first")
            if code == "RepoNotFound":
                raise HubAuthError(f"repository {repo} was not found on {endpoint}, or it is private: check the "
                                   "name, or set HF_TOKEN (or pass --token) for a private repo")
            raise HubAuthError(f"{repo} is gated or private: accept its license at {endpoint}/{repo} and set "
                               "HF_TOKEN (or pass --token)")
        if status == 403:
            raise HubAuthError(f"your token has no access to {repo}: accept its license at {endpoint}/{repo} with "
                               "the account the token belongs to, or use a token with read access")
        if status == 404:
            if code == "RepoNotFound":
                raise HubError(f"repository {repo} not found on {endpoint}: check the name (a private repo also "
                               "needs HF_TOKEN)")
            if code == "RevisionNotFound":
                raise HubError(f"revision {context.revision!r} not found in {repo} on {endpoint}")
            if code == "EntryNotFound":
                raise HubError(f"{context.path} not found in {repo} at revision {context.revision!r}")
            raise HubError(f"{origin} answered 404 (not found) for {context.what} at revision {context.revision!r}")
        if status == 429:
            raise _Transient(f"{origin} is rate limiting requests (429) for {context.what}",
                             "; wait a few minutes and run the command again",
                             _retry_after(response.headers.get("Retry-After")))
        if status >= 500:
            raise _Transient(f"{origin} answered {status} {response.reason or ''}".rstrip()
                             + f" for {context.what}", "; the server is having trouble, try again later")
        raise HubError(f"{origin} answered {status} {response.reason or ''}".rstrip() + f" for {context.what}")


# ----- small file helpers -----

def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _write_json(path: Path, value: dict) -> None:
    """Write a metadata record atomically; a record that cannot be written only costs a re-check next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(value, indent=1), encoding="utf-8")
        os.replace(temporary, path)
    except OSError as exc:
        log.warning("could not write %s: %s", path, exc.strerror or exc)


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove %s: %s", path, exc.strerror or exc)


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(CHUNK_SIZE), b""):
            digest.update(block)
    return digest.hexdigest()


__all__ = ["DEFAULT_ENDPOINT", "DownloadProgress", "DownloadResult", "HubAuthError", "HubClient", "HubError",
           "RepoFile", "check_repo_id", "check_repo_path", "hf_home", "hub_endpoint", "hub_token", "inside",
           "offline", "select_files"]
