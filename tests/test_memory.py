"""sdcli.memory: numpy's huge-page advice is off once sdcli is imported, unless the user set numpy's variable; inside
reuse_large_arrays, a large array's memory is reused by the next one rather than mapped anew."""

import os
import subprocess
import sys

import pytest

from sdcli.memory import _huge_page_switch, _mallopt


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


REUSE_CHECK = """
import ctypes, resource, numpy as np
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: ordinary pages whatever the system's huge-page mode
from sdcli.memory import reuse_large_arrays

def faults_of_second_array(megabytes=64):
    np.ones(megabytes << 18, dtype=np.float32)  # allocated, written, freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    np.ones(megabytes << 18, dtype=np.float32)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

outside = faults_of_second_array()
with reuse_large_arrays():
    with reuse_large_arrays():  # re-entrant: the inner exit leaves the outer setting
        pass
    inside = faults_of_second_array()
after = faults_of_second_array()
with reuse_large_arrays(enabled=False):  # what a pipeline loaded with low_memory runs its sampling loop in
    disabled = faults_of_second_array()
import sdcli.memory
print(outside, inside, after, disabled, sdcli.memory._reuse_depth)
"""


@pytest.mark.skipif(_mallopt() is None, reason="glibc's mallopt is not available")
def test_large_arrays_reuse_memory_inside_the_scope_only():
    """A 64 MB array (16,384 pages) written after another was freed: outside the scope glibc maps it anew and
    every page faults; inside, it takes the freed one's memory. Counted in a fresh process."""
    result = subprocess.run([sys.executable, "-c", REUSE_CHECK], capture_output=True, text=True, check=True,
                            env={key: value for key, value in os.environ.items() if key != "NUMPY_MADVISE_HUGEPAGE"})
    outside, inside, after, disabled, depth = map(int, result.stdout.split())
    assert min(outside, after, disabled) > 10_000, (outside, after, disabled)
    assert inside < 1_000, inside
    assert depth == 0
