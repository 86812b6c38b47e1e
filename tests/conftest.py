"""Shared test fixtures and paths.

The real data the tests use (CLIP tokenizer tables, TAESD weights, diffusers configs) lives in the
``shared/data`` folder beside the repository checkout.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        raise RuntimeError(f"the shared data folder is missing: expected it at {SHARED_DATA}")
    return SHARED_DATA
