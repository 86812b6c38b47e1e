"""The Hub download engine (sdcli.hub) against the fake Hub of tests/hub_server.py on 127.0.0.1.

No real Hub is contacted: every endpoint is a FakeHub started by the test (or a closed local port). Files are a
few MB of seeded random bytes so that transfers span several 1 MiB chunks.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import re
import socket
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest

import sdcli.hub as hub_module
from sdcli.errors import SdcliError
from sdcli.hub import (DEFAULT_ENDPOINT, DownloadResult, HubAuthError, HubClient, HubError, RepoFile, hub_endpoint,
                       hub_token, offline, select_files)

from hub_server import FakeHub

TOKEN = "hf_test_SECRET_token_value_0123456789"
REPO = "org/model"
GATED = "org/gated"
BIG = "unet/diffusion_pytorch_model.safetensors"      # LFS, served through the CDN
SMALL = "model_index.json"                              # plain git file, served by the hub itself
FAST = dict(retries=2, backoff=0.001, timeout=5.0)      # tiny backoff: retries cost no wall time


def random_bytes(size: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


FILES = {
    BIG: random_bytes(3_000_000, 0),
    "text_encoder/model.safetensors": random_bytes(1_200_000, 1),
    "unet/config.json": b'{"sample_size": 64}',
    SMALL: b'{"_class_name": "StableDiffusionPipeline"}',
}
LFS = {BIG, "text_encoder/model.safetensors"}


Usage = namedtuple("Usage", "total used free")                 # what shutil.disk_usage returns


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(autouse=True)
def hub_environment(monkeypatch, tmp_path):
    """No Hugging Face settings leak in from the machine; the token file lookup stays inside tmp_path; a proxy
    configured on the machine is never asked for 127.0.0.1."""
    for name in ("HF_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_TOKEN_PATH", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")


@pytest.fixture
def hub():
    with FakeHub() as server:
        server.add_repo(REPO, FILES, lfs=LFS)
        server.add_repo(GATED, {BIG: FILES[BIG], SMALL: FILES[SMALL]}, gated=True, lfs=LFS)
        server.tokens = {TOKEN: {GATED}}
        yield server


@pytest.fixture
def target(tmp_path) -> Path:
    return tmp_path / "weights" / "model"


def tree(folder: Path) -> list[str]:
    """Every path under ``folder``, relative, sorted."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*")) if folder.exists() else []


def leftovers(folder: Path) -> list[str]:
    return [path for path in tree(folder) if path.endswith(".incomplete")]


class RecordingProgress:
    def __init__(self):
        self.events = []
        self.advanced = {}

    def start_file(self, path, total, already):
        self.events.append(("start", path, total, already))

    def advance(self, path, nbytes):
        self.advanced[path] = self.advanced.get(path, 0) + nbytes

    def finish_file(self, path, skipped):
        self.events.append(("finish", path, skipped))


# ----- listing and a full download -----

def test_list_files_reads_the_hub_listing(hub):
    commit, files = HubClient(hub.endpoint, **FAST).list_files(REPO)
    assert commit == hub.repos[REPO].branches["main"]
    by_path = {item.path: item for item in files}
    assert set(by_path) == set(FILES)
    assert by_path[BIG] == RepoFile(BIG, len(FILES[BIG]), sha256(FILES[BIG]))
    assert by_path[SMALL] == RepoFile(SMALL, len(FILES[SMALL]), None)          # not LFS: no sha256
    assert [(record.method, record.path) for record in hub.requests] == [
        ("GET", f"/api/models/{REPO}/revision/main?blobs=true")]


def test_full_download_with_checksums(hub, target):
    client = HubClient(hub.endpoint, **FAST)
    commit, files = client.list_files(REPO)
    progress = RecordingProgress()
    result = client.download(REPO, [item.path for item in files], target, progress=progress)

    assert result == DownloadResult(commit, list(FILES), [], sum(len(data) for data in FILES.values()))
    for path, data in FILES.items():
        assert sha256((target / path).read_bytes()) == sha256(data), path
    assert leftovers(target) == []
    assert progress.advanced == {path: len(data) for path, data in FILES.items()}
    assert [event for event in progress.events if event[0] == "finish"] == [
        ("finish", path, False) for path in FILES]
    # The first file's commit pins the others: a moving branch cannot mix two versions.
    resolves = [record.path for record in hub.requests_to("hub") if "/resolve/" in record.path]
    assert resolves[0] == f"/{REPO}/resolve/main/{BIG}"
    assert all(f"/resolve/{commit}/" in path for path in resolves[1:])
    # LFS bytes come from the CDN, the plain files from the hub.
    assert {record.path.split("?")[0] for record in hub.requests_to("cdn")} == {
        f"/lfs/{sha256(FILES[path])}" for path in LFS}


def test_download_at_an_older_commit(hub, target):
    old = hub.repos[REPO].branches["main"]
    hub.add_repo(REPO, {SMALL: b'{"new": true}'}, revision="main", commit="a" * 40)
    client = HubClient(hub.endpoint, **FAST)
    result = client.download(REPO, [SMALL], target, revision=old)
    assert result.commit == old
    assert (target / SMALL).read_bytes() == FILES[SMALL]


# ----- resume -----

def test_interrupted_download_resumes_with_a_range_request(hub, target):
    size = len(FILES[BIG])
    hub.drop_after[BIG] = 2_200_000
    with pytest.raises(HubError, match="broke while downloading .*run the command again to resume") as caught:
        HubClient(hub.endpoint, retries=0, backoff=0.001).download(REPO, [BIG], target)
    assert caught.value.exit_code == 2
    assert not (target / BIG).exists()
    # What arrived is kept, less the read the broken connection cut short (at most one chunk).
    kept = (target / (BIG + ".incomplete")).stat().st_size
    assert 2_200_000 - hub_module.CHUNK_SIZE < kept <= 2_200_000

    hub.clear_records()
    result = HubClient(hub.endpoint, **FAST).download(REPO, [BIG], target)
    assert result.downloaded == [BIG]
    assert result.bytes_transferred == hub.bytes_sent[BIG] == size - kept < size
    assert (target / BIG).read_bytes() == FILES[BIG]
    assert leftovers(target) == []
    ranges = [record.headers.get("Range") for record in hub.requests if record.method == "GET"]
    assert ranges == [f"bytes={kept}-"] * 2                         # to the hub, then the CDN it redirects to


def test_dropped_connection_is_resumed_within_one_run(hub, target):
    hub.drop_after[BIG] = 2_200_000
    result = HubClient(hub.endpoint, **FAST).download(REPO, [BIG], target)
    assert (target / BIG).read_bytes() == FILES[BIG]
    # Resumed, not restarted: at most the one cut-short read is sent twice.
    assert len(FILES[BIG]) <= hub.bytes_sent[BIG] < len(FILES[BIG]) + hub_module.CHUNK_SIZE
    assert result.bytes_transferred == len(FILES[BIG])
    assert [record.headers.get("Range") for record in hub.requests_to("cdn")][0] is None
    assert [record.headers.get("Range") for record in hub.requests_to("cdn")][1].startswith("bytes=")
    assert leftovers(target) == []


def test_server_ignoring_range_starts_over_cleanly(hub, target):
    hub.drop_after[BIG] = 1_000_000
    with pytest.raises(HubError):
        HubClient(hub.endpoint, retries=0).download(REPO, [BIG], target)
    hub.ignore_range = True
    hub.clear_records()
    progress = RecordingProgress()
    result = HubClient(hub.endpoint, **FAST).download(REPO, [BIG], target, progress=progress)
    assert (target / BIG).read_bytes() == FILES[BIG]
    assert result.bytes_transferred == len(FILES[BIG])
    assert ("start", BIG, len(FILES[BIG]), 0) in progress.events      # the bar restarts from zero
    assert leftovers(target) == []


def test_corrupted_partial_file_is_caught_and_removed(hub, target):
    incomplete = target / (BIG + ".incomplete")
    incomplete.parent.mkdir(parents=True)
    incomplete.write_bytes(b"\0" * 1000)                             # not the file's first 1000 bytes
    with pytest.raises(HubError, match="sha256 mismatch.*partial file was removed, run the command again"):
        HubClient(hub.endpoint, **FAST).download(REPO, [BIG], target)
    assert not incomplete.exists() and not (target / BIG).exists()
    HubClient(hub.endpoint, **FAST).download(REPO, [BIG], target)
    assert (target / BIG).read_bytes() == FILES[BIG]


def test_complete_partial_file_is_verified_without_a_body_request(hub, target):
    incomplete = target / (BIG + ".incomplete")
    incomplete.parent.mkdir(parents=True)
    incomplete.write_bytes(FILES[BIG])
    result = HubClient(hub.endpoint, **FAST).download(REPO, [BIG], target)
    assert result.downloaded == [BIG] and result.bytes_transferred == 0
    assert (target / BIG).read_bytes() == FILES[BIG]
    assert [record.method for record in hub.requests] == ["HEAD"]


def test_partial_file_of_another_version_is_not_resumed(hub, target):
    hub.drop_after[BIG] = 1_000_000
    with pytest.raises(HubError):
        HubClient(hub.endpoint, retries=0).download(REPO, [BIG], target)
    new_weights = random_bytes(2_500_000, 7)
    hub.add_repo(REPO, {**FILES, BIG: new_weights}, commit="b" * 40, lfs=LFS)
    HubClient(hub.endpoint, **FAST).download(REPO, [BIG], target)
    assert (target / BIG).read_bytes() == new_weights


# ----- verification -----

def test_corrupted_body_is_an_error_and_leaves_no_file(hub, target):
    hub.corrupt.add(BIG)
    with pytest.raises(HubError, match=r"sha256 mismatch .*the partial file was removed, run the command again"):
        HubClient(hub.endpoint, **FAST).download(REPO, [SMALL, BIG], target)
    assert not (target / BIG).exists()
    assert leftovers(target) == []
    assert (target / SMALL).exists()                               # the good file before it is kept


# ----- rerun and skip -----

def test_rerun_transfers_nothing(hub, target):
    client = HubClient(hub.endpoint, **FAST)
    client.download(REPO, list(FILES), target)
    hub.clear_records()
    progress = RecordingProgress()
    result = client.download(REPO, list(FILES), target, progress=progress)
    assert result.downloaded == [] and result.skipped == list(FILES) and result.bytes_transferred == 0
    assert hub.total_bytes_sent() == 0
    assert {record.method for record in hub.requests} == {"HEAD"}
    assert hub.requests_to("cdn") == []
    assert [event for event in progress.events if event[0] == "finish"] == [
        ("finish", path, True) for path in FILES]


def test_changed_file_is_fetched_again_and_the_rest_skipped(hub, target):
    client = HubClient(hub.endpoint, **FAST)
    client.download(REPO, list(FILES), target)
    new_config = b'{"sample_size": 96}'
    hub.add_repo(REPO, {**FILES, "unet/config.json": new_config}, commit="c" * 40, lfs=LFS)
    hub.clear_records()
    result = client.download(REPO, list(FILES), target)
    assert result.downloaded == ["unet/config.json"]
    assert result.commit == "c" * 40
    assert (target / "unet/config.json").read_bytes() == new_config
    assert dict(hub.bytes_sent) == {"unet/config.json": len(new_config)}


def test_existing_file_without_a_record_is_verified_not_downloaded(hub, target):
    (target / "unet").mkdir(parents=True)
    (target / BIG).write_bytes(FILES[BIG])                         # e.g. copied in by hand
    result = HubClient(hub.endpoint, **FAST).download(REPO, [BIG], target)
    assert result.skipped == [BIG] and hub.total_bytes_sent() == 0


def test_wrong_existing_file_is_replaced(hub, target):
    (target / "unet").mkdir(parents=True)
    (target / BIG).write_bytes(b"x" * len(FILES[BIG]))
    result = HubClient(hub.endpoint, **FAST).download(REPO, [BIG], target)
    assert result.downloaded == [BIG]
    assert (target / BIG).read_bytes() == FILES[BIG]


# ----- retries -----

@pytest.mark.parametrize("status", [429, 500, 503])
@pytest.mark.parametrize("server", ["hub", "cdn"])
def test_transient_answers_are_retried(hub, target, status, server):
    hub.fail_next(status, count=2, server=server)
    client = HubClient(hub.endpoint, retries=2, backoff=0.001)
    result = client.download(REPO, [BIG], target)
    assert (target / BIG).read_bytes() == FILES[BIG] and result.downloaded == [BIG]
    assert hub.pending_failures() == 0


@pytest.mark.parametrize("server", ["hub", "cdn"])
def test_timeouts_are_retried(hub, target, server):
    hub.stall_next(2.0, count=1, server=server)
    client = HubClient(hub.endpoint, retries=1, backoff=0.001, timeout=0.3)
    client.download(REPO, [BIG], target)
    assert (target / BIG).read_bytes() == FILES[BIG]


def test_listing_is_retried(hub):
    hub.fail_next(503, count=1)
    commit, files = HubClient(hub.endpoint, **FAST).list_files(REPO)
    assert len(files) == len(FILES)
    assert [record.path for record in hub.requests].count(f"/api/models/{REPO}/revision/main?blobs=true") == 2


@pytest.mark.parametrize("status, reason", [(429, "rate limiting requests"), (503, "answered 503")])
def test_gives_up_after_the_retries(hub, target, status, reason):
    hub.fail_next(status, count=10)
    with pytest.raises(HubError, match=f"{reason}.*\\(3 tries\\)") as caught:
        HubClient(hub.endpoint, retries=2, backoff=0.001).download(REPO, [BIG], target)
    assert type(caught.value) is HubError and caught.value.exit_code == 2
    assert hub.pending_failures() == 7                               # 1 try + 2 retries
    assert tree(target) == []                                        # the HEAD failed: nothing was written


def test_retry_after_is_honoured_up_to_a_cap(hub, target, monkeypatch):
    hub.fail_next(429, count=1, retry_after="3600")
    client = HubClient(hub.endpoint, **FAST)
    slept = []
    client._sleep = slept.append
    client.download(REPO, [SMALL], target)
    assert slept == [hub_module.MAX_RETRY_AFTER_S]


def test_unreachable_endpoint(target):
    with socket.socket() as probe:                                    # a local port nothing listens on
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with pytest.raises(HubError, match=f"cannot reach {endpoint}: .*\\(2 tries\\); check the network or set "
                                       "HF_ENDPOINT") as caught:
        HubClient(endpoint, retries=1, backoff=0.001).list_files(REPO)
    assert "\n" not in str(caught.value)


# ----- errors from the Hub -----

def test_gated_repo_without_a_token(hub, target):
    with pytest.raises(HubAuthError) as caught:
        HubClient(hub.endpoint, **FAST).download(GATED, [BIG], target)
    assert str(caught.value) == (f"{GATED} is gated or private: accept its license at {hub.endpoint}/{GATED} and "
                                 "set HF_TOKEN (or pass --token)")
    assert caught.value.exit_code == 3
    assert tree(target) == []


def test_refused_token(hub):
    with pytest.raises(HubAuthError, match="the token was refused") as caught:
        HubClient(hub.endpoint, token="hf_unknown_token", **FAST).list_files(REPO)
    assert caught.value.exit_code == 3 and "hf_unknown_token" not in str(caught.value)


def test_token_without_access(hub):
    hub.add_repo("org/private", {SMALL: b"{}"}, private=True)
    with pytest.raises(HubAuthError, match=f"your token has no access to org/private: accept its license at "
                                           f"{hub.endpoint}/org/private") as caught:
        HubClient(hub.endpoint, token=TOKEN, **FAST).list_files("org/private")
    assert caught.value.exit_code == 3 and TOKEN not in str(caught.value)


def test_private_repo_without_a_token(hub):
    hub.add_repo("org/private", {SMALL: b"{}"}, private=True)
    with pytest.raises(HubAuthError, match="org/private was not found .*, or it is private.*HF_TOKEN"):
        HubClient(hub.endpoint, **FAST).list_files("org/private")


@pytest.mark.parametrize("repo, revision, path, message", [
    ("org/missing", "main", SMALL, "repository org/missing not found on "),
    (REPO, "v9", SMALL, f"revision 'v9' not found in {REPO} on "),
    (REPO, "main", "unet/missing.safetensors", f"unet/missing.safetensors not found in {REPO} at revision 'main'"),
])
def test_not_found(hub, target, repo, revision, path, message):
    with pytest.raises(HubError) as caught:
        HubClient(hub.endpoint, **FAST).download(repo, [path], target, revision=revision)
    assert str(caught.value).startswith(message)
    assert type(caught.value) is HubError and caught.value.exit_code == 2
    assert tree(target) == []


@pytest.mark.parametrize("repo, revision, message", [
    ("org/missing", "main", "repository org/missing not found"),
    (REPO, "v9", f"revision 'v9' not found in {REPO}"),
])
def test_listing_not_found(hub, repo, revision, message):
    with pytest.raises(HubError, match=message):
        HubClient(hub.endpoint, **FAST).list_files(repo, revision)


def test_renamed_repo_redirect_is_followed(hub, target):
    hub.renames["old-org/model"] = REPO
    client = HubClient(hub.endpoint, **FAST)
    commit, files = client.list_files("old-org/model")
    assert len(files) == len(FILES)
    result = client.download("old-org/model", [BIG], target)
    assert result.commit == commit and (target / BIG).read_bytes() == FILES[BIG]


def test_redirect_loop_is_bounded(hub):
    hub.renames.update({"org/a": "org/b", "org/b": "org/a"})
    with pytest.raises(HubError, match="too many redirects"):
        HubClient(hub.endpoint, **FAST).list_files("org/a")
    assert len(hub.requests) == hub_module.MAX_REDIRECTS + 1


@pytest.mark.parametrize("repo_id", ["", "org/", "/org", "org/../x", "a/b/c", "org/na me", "org/-x", "org/x--y"])
def test_invalid_repo_id(hub, target, repo_id):
    with pytest.raises(HubError, match="is not a Hub repo id"):
        HubClient(hub.endpoint, **FAST).download(repo_id, [SMALL], target)
    assert hub.requests == []


# ----- safety -----

HOSTILE = ["../escape", "/abs", "unet/../../escape", "a\\b", "C:/x", "a//b", "./a", ".sdcli-download/x.json"]


def test_hostile_listing_is_refused(hub):
    hub.add_repo("evil/repo", {"../escape": b"owned", "/abs": b"owned", "ok.json": b"{}"})
    with pytest.raises(HubError, match=r"refused the file name '\.\./escape' in the file list of evil/repo"):
        HubClient(hub.endpoint, **FAST).list_files("evil/repo")


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_are_refused_before_anything_is_written(hub, tmp_path, name):
    hub.add_repo("evil/repo", {name: b"owned", "ok.json": b"{}"})
    target = tmp_path / "weights" / "evil"
    before = tree(tmp_path)
    with pytest.raises(HubError, match=re.escape(f"refused the file name {name!r}")):
        HubClient(hub.endpoint, **FAST).download("evil/repo", ["ok.json", name], target)
    assert tree(tmp_path) == before                                  # nothing inside or beside the target
    assert hub.requests == []                                        # refused before any request


def test_symlinked_folder_cannot_lead_outside(hub, tmp_path):
    hub.add_repo("evil/repo", {"sub/file.json": b"{}"})
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "weights"
    target.mkdir()
    (target / "sub").symlink_to(outside, target_is_directory=True)
    with pytest.raises(HubError, match="outside"):
        HubClient(hub.endpoint, **FAST).download("evil/repo", ["sub/file.json"], target)
    assert list(outside.iterdir()) == []


# ----- the token -----

def test_token_goes_to_the_endpoint_only_and_is_never_logged(hub, target, caplog):
    caplog.set_level(logging.DEBUG)
    client = HubClient(hub.endpoint, token=TOKEN, **FAST)
    hub.drop_after[BIG] = 500_000                                    # a retry is logged too
    client.list_files(GATED)
    client.download(GATED, [BIG, SMALL], target)
    assert hub.requests_to("cdn") and all(not record.authorization for record in hub.requests_to("cdn"))
    assert all(record.authorization for record in hub.requests_to("hub"))
    assert all(record.headers.get("Authorization") == f"Bearer {TOKEN}" for record in hub.requests_to("hub"))
    assert (target / BIG).read_bytes() == FILES[BIG]
    assert caplog.records and not any(TOKEN in record.getMessage() for record in caplog.records)
    assert TOKEN not in repr(client) and TOKEN not in repr(client.__dict__)


def test_token_absent_from_every_error(hub, target, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    hub.add_repo("org/private", {SMALL: b"{}"}, private=True)
    messages = []
    bad = HubClient(hub.endpoint, token=TOKEN + "x", **FAST)
    good = HubClient(hub.endpoint, token=TOKEN, **FAST)
    for action in (lambda: bad.list_files(REPO), lambda: good.list_files("org/private"),
                   lambda: good.download(GATED, ["missing.json"], target)):
        with pytest.raises(SdcliError) as caught:
            action()
        messages.append(str(caught.value))
    hub.fail_next(500, count=10)
    with pytest.raises(HubError) as caught:
        good.download(GATED, [BIG], target)
    messages.append(str(caught.value))
    hub.stop()
    with pytest.raises(HubError) as caught:
        HubClient(hub.endpoint, token=TOKEN, retries=0).list_files(GATED)
    messages.append(str(caught.value))
    assert len(messages) == 5
    assert not any(TOKEN in message for message in messages)
    assert not any(TOKEN in record.getMessage() for record in caplog.records)


def test_token_that_cannot_be_a_header_is_refused_without_echoing_it():
    with pytest.raises(HubAuthError) as caught:
        HubClient("http://127.0.0.1:9", token="hf_abc\ndef")
    assert "hf_abc" not in str(caught.value)


@pytest.mark.parametrize("endpoint, url, same", [
    ("https://huggingface.co", "https://huggingface.co:443/x", True),
    ("https://huggingface.co", "https://HuggingFace.co/org/m/resolve/main/f", True),
    ("https://huggingface.co", "http://huggingface.co/x", False),
    ("https://huggingface.co", "https://cdn-lfs.huggingface.co/x", False),
    ("http://127.0.0.1:8080", "http://127.0.0.1:8081/x", False),
])
def test_token_scope_is_scheme_host_and_port(endpoint, url, same):
    assert (hub_module._origin(endpoint) == hub_module._origin(url)) is same


# ----- offline -----

def test_offline_mode_touches_no_server(hub, target, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert offline()
    client = HubClient(hub.endpoint, **FAST)
    with pytest.raises(HubError, match=r"offline mode \(HF_HUB_OFFLINE\): the file list of org/model not downloaded"):
        client.list_files(REPO)
    with pytest.raises(HubError, match=r"offline mode \(HF_HUB_OFFLINE\): org/model not downloaded"):
        client.download(REPO, [BIG], target)
    assert hub.requests == [] and tree(target) == []


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("YES", True), ("on", True),
                                             ("0", False), ("", False), ("no", False)])
def test_offline_values(monkeypatch, value, expected):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert offline() is expected


# ----- disk -----

def test_disk_full_keeps_the_partial_file_for_resuming(hub, target, monkeypatch):
    real_write = hub_module._write_chunk
    writes = []

    def write_then_fill_up(file, data):
        if writes:
            raise OSError(errno.ENOSPC, "No space left on device")
        writes.append(len(data))
        real_write(file, data)

    monkeypatch.setattr(hub_module, "_write_chunk", write_then_fill_up)
    with pytest.raises(HubError, match=r"disk full while writing .*\.incomplete: free \d+ MB in ") as caught:
        HubClient(hub.endpoint, **FAST).download(REPO, [BIG], target)
    assert caught.value.exit_code == 2
    assert not (target / BIG).exists()
    kept = (target / (BIG + ".incomplete")).stat().st_size
    assert kept == writes[0] > 0
    monkeypatch.setattr(hub_module, "_write_chunk", real_write)
    hub.clear_records()
    result = HubClient(hub.endpoint, **FAST).download(REPO, [BIG], target)
    assert result.bytes_transferred == len(FILES[BIG]) - kept
    assert (target / BIG).read_bytes() == FILES[BIG]


def test_not_enough_space_is_said_before_downloading(hub, target, monkeypatch):
    monkeypatch.setattr(hub_module.shutil, "disk_usage", lambda path: Usage(total=10**9, used=10**9, free=10**6))
    with pytest.raises(HubError, match=r"not enough disk space for diffusion_pytorch_model.safetensors: it needs 3 "
                                       r"MB more and .* has 1 MB free"):
        HubClient(hub.endpoint, **FAST).download(REPO, [BIG], target)
    assert hub.total_bytes_sent() == 0


# ----- choosing files -----

def repo_files(*paths: str) -> list[RepoFile]:
    return [RepoFile(path, 1, None) for path in paths]


SD_REPO = repo_files(
    "model_index.json", "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin", "text_encoder/flax_model.msgpack", "text_encoder/tf_model.h5",
    "tokenizer/vocab.json", "tokenizer/merges.txt",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.safetensors", "unet/diffusion_pytorch_model.ema.safetensors",
    "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.fp16.bin",
    "unet/diffusion_flax_model.msgpack",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",              # no fp16 copy in this folder
    "safety_checker/model.fp16.safetensors",
    "onnx/unet/model.onnx", "onnx/unet/weights.pb",
    "v1-5-pruned-emaonly.safetensors", "v1-5-pruned-emaonly.ckpt", "v1-5-pruned.ckpt")
SD_COMPONENTS = ["model_index.json", "scheduler/*", "text_encoder/*", "tokenizer/*", "unet/*", "vae/*"]


def selected(files, include, variant):
    return [item.path for item in select_files(files, include, variant)]


def test_select_files_picks_the_fp16_variant_per_component():
    assert selected(SD_REPO, SD_COMPONENTS, "fp16") == [
        "model_index.json", "scheduler/scheduler_config.json",
        "text_encoder/config.json", "text_encoder/model.fp16.safetensors",
        "tokenizer/vocab.json", "tokenizer/merges.txt",
        "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]


@pytest.mark.parametrize("variant", [None, "fp32"])
def test_select_files_without_a_variant_takes_the_plain_weights(variant):
    assert selected(SD_REPO, SD_COMPONENTS, variant) == [
        "model_index.json", "scheduler/scheduler_config.json",
        "text_encoder/config.json", "text_encoder/model.safetensors",
        "tokenizer/vocab.json", "tokenizer/merges.txt",
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]


def test_select_files_never_takes_pickles_onnx_flax_or_ema_unless_named_exactly():
    everything = selected(SD_REPO, [], "fp16")
    assert not any(path.endswith((".bin", ".ckpt", ".msgpack", ".h5", ".onnx")) or ".ema." in path
                   or "non_ema" in path for path in everything)
    assert "v1-5-pruned-emaonly.safetensors" in everything
    assert selected(SD_REPO, ["v1-5-pruned-emaonly.safetensors"], "fp16") == ["v1-5-pruned-emaonly.safetensors"]
    assert selected(SD_REPO, ["unet/diffusion_pytorch_model.non_ema.safetensors", "v1-5-pruned.ckpt"], None) == [
        "unet/diffusion_pytorch_model.non_ema.safetensors", "v1-5-pruned.ckpt"]
    assert selected(SD_REPO, ["unet/diffusion_pytorch_model.safetensors"], "fp16") == [
        "unet/diffusion_pytorch_model.safetensors"]                  # an exact name wins over the variant


def test_select_files_keeps_shards_and_their_index_together():
    files = repo_files("unet/diffusion_pytorch_model.safetensors.index.json",
                       "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
                       "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
                       "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
                       "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
                       "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
                       "unet/diffusion_pytorch_model.bin.index.json")
    assert selected(files, ["unet/*"], "fp16") == [path.path for path in files[3:6]]
    assert selected(files, ["unet/*"], None) == [path.path for path in files[:3]]


# ----- settings -----

def test_token_discovery_order(monkeypatch, tmp_path):
    home = tmp_path / "hf_home"
    assert hub_token() is None
    home.mkdir(parents=True)
    (home / "token").write_text("hf_from_home_file\n")
    assert hub_token() == "hf_from_home_file"
    token_path = tmp_path / "elsewhere" / "my_token"
    token_path.parent.mkdir()
    token_path.write_text("  hf_from_token_path  ")
    monkeypatch.setenv("HF_TOKEN_PATH", str(token_path))
    assert hub_token() == "hf_from_token_path"
    monkeypatch.setenv("HF_TOKEN", " hf_from_env ")
    assert hub_token() == "hf_from_env"
    assert hub_token("hf_from_argument") == "hf_from_argument"
    monkeypatch.setenv("HF_TOKEN", "")
    assert hub_token() == "hf_from_token_path"


def test_token_file_under_the_default_home(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "cache" / "huggingface").mkdir(parents=True)
    (tmp_path / "cache" / "huggingface" / "token").write_text("hf_xdg")
    assert hub_token() == "hf_xdg"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hub_token() is None                                      # ~/.cache/huggingface/token: absent here


def test_client_uses_the_discovered_token(hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    HubClient(hub.endpoint, **FAST).list_files(GATED)
    assert hub.requests[-1].headers["Authorization"] == f"Bearer {TOKEN}"


def test_endpoint_from_the_environment(hub, monkeypatch):
    assert hub_endpoint() == DEFAULT_ENDPOINT
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint + "/")
    assert hub_endpoint() == hub.endpoint
    assert hub_endpoint("http://127.0.0.1:1") == "http://127.0.0.1:1"
    assert HubClient(**FAST).list_files(REPO)[0] == hub.repos[REPO].branches["main"]
    monkeypatch.setenv("HF_ENDPOINT", "ftp://mirror")
    with pytest.raises(HubError, match="must be an http"):
        hub_endpoint()
