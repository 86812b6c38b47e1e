"""Where the tests find their data: the repository's ``tests/data`` and the config files the package ships.

Nothing a test reads lies outside the repository.
"""

from __future__ import annotations

from pathlib import Path

import sdcli

TEST_DATA = Path(__file__).resolve().parent / "data"
"""Reference values and files only the tests need (see its README for origin, license and checksums)."""

CONFIGS = Path(sdcli.__file__).resolve().parent / "data" / "configs"
"""The real diffusers config files of SD 1.5 (``sd15``) and SD 2.1 (``sd21``) that the package ships."""
