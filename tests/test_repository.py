"""The repository is self-contained: the test data is what its README says it is, and nothing the package, the
tests or the build read lies outside the repository."""

from __future__ import annotations

import hashlib
import re
import subprocess

import pytest

from data_paths import CONFIGS, TEST_DATA

REPO_ROOT = TEST_DATA.parents[1]


def recorded_digests() -> dict[str, str]:
    """file -> sha256, from the table in tests/data/README.md."""
    text = (TEST_DATA / "README.md").read_text()
    return {name: digest for digest, name in re.findall(r"^\| ([0-9a-f]{64}) \| (\S+) \|$", text, flags=re.M)}


def test_test_data_matches_its_readme():
    digests = recorded_digests()
    assert len(digests) >= 6
    for name, digest in digests.items():
        assert hashlib.sha256((TEST_DATA / name).read_bytes()).hexdigest() == digest, name


def test_every_data_file_is_described():
    described = set(recorded_digests())
    listed_folders = ("golden/",)  # described by their own README
    for path in TEST_DATA.rglob("*"):
        name = path.relative_to(TEST_DATA).as_posix()
        if path.is_file() and name != "README.md" and not name.startswith(listed_folders):
            assert name in described or name.endswith("README.md"), f"tests/data/{name} is not in tests/data/README.md"


def test_package_configs_are_there():
    for family in ("sd15", "sd21"):
        for component in ("unet", "vae", "text_encoder"):
            assert (CONFIGS / family / component / "config.json").is_file()


def tracked_files() -> list[str]:
    try:
        listing = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return listing.stdout.split()


def test_nothing_reads_outside_the_repository():
    """No source, test or build file names a folder beside the checkout (the repository is cloned alone)."""
    beside = "shared"  # the folder a checkout may have beside it (never in a user's clone)
    pattern = re.compile(rf"\.\./{beside}|{beside}/data|parents\[2\]|parent\.parent\.parent")
    offenders = []
    for name in tracked_files():
        if name.endswith((".py", ".pyx", ".h", ".cfg", ".toml", ".in")) or name in ("Makefile", ".ci/run"):
            for number, line in enumerate((REPO_ROOT / name).read_text(errors="replace").splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{name}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
