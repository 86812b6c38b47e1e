"""sdcli.memory: numpy's huge-page advice is off once sdcli is imported, unless the user set numpy's variable."""

import os
import subprocess
import sys

import pytest

from sdcli.memory import _huge_page_switch


def huge_pages_after_import(environment: dict) -> str:
    """numpy's huge-page setting in a fresh process after ``import sdcli``, as "True" or "False"."""
    code = "import sdcli, sdcli.memory as m; print(m._huge_page_switch()(True))"
    env = {key: value for key, value in os.environ.items() if key != "NUMPY_MADVISE_HUGEPAGE"}
    result = subprocess.run([sys.executable, "-c", code], env={**env, **environment}, capture_output=True,
                            text=True, check=True)
    return result.stdout.strip()


@pytest.mark.skipif(_huge_page_switch() is None, reason="this numpy has no huge-page switch")
def test_import_turns_huge_pages_off_unless_the_user_chose():
    assert huge_pages_after_import({}) == "False"
    assert huge_pages_after_import({"NUMPY_MADVISE_HUGEPAGE": "1"}) == "True"  # the user's choice stands
