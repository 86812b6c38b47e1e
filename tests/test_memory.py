"""sdcli.memory: numpy's huge-page advice is off once sdcli is imported, unless the user chose; results keep."""

import os
import subprocess
import sys

import numpy as np
import pytest

from sdcli.memory import _huge_page_switch, prefer_small_pages, return_freed_memory

switch = _huge_page_switch()


def huge_pages_after_import(environment: dict) -> str:
    """numpy's huge-page setting in a fresh process after ``import sdcli``, as "True" or "False"."""
    code = ("import sdcli, sdcli.memory as m\n"
            "switch = m._huge_page_switch()\n"
            "print(switch(True))")
    env = {key: value for key, value in os.environ.items() if key != "NUMPY_MADVISE_HUGEPAGE"}
    result = subprocess.run([sys.executable, "-c", code], env={**env, **environment}, capture_output=True,
                            text=True, check=True)
    return result.stdout.strip()


@pytest.mark.skipif(switch is None or not sys.platform.startswith("linux"), reason="numpy advises huge pages on Linux")
def test_import_turns_huge_pages_off_unless_the_user_chose():
    assert huge_pages_after_import({}) == "False"
    assert huge_pages_after_import({"NUMPY_MADVISE_HUGEPAGE": "1"}) == "True"  # the user's choice stands


@pytest.mark.skipif(switch is None, reason="this numpy has no huge-page switch")
def test_prefer_small_pages_respects_the_variable(monkeypatch):
    previous = switch(True)
    try:
        monkeypatch.setenv("NUMPY_MADVISE_HUGEPAGE", "1")
        prefer_small_pages()
        assert switch(True) is True
        monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE")
        prefer_small_pages()
        assert switch(True) is False
    finally:
        switch(previous)


def test_results_keep():
    x = np.arange(2 << 20, dtype=np.float32)  # 8 MB: numpy would advise huge pages for it
    previous = None if switch is None else switch(False)
    try:
        y = x * 2
    finally:
        if switch is not None:
            switch(previous)
    np.testing.assert_array_equal(y, x * 2)
    return_freed_memory()  # a no-op or glibc's malloc_trim: never raises
