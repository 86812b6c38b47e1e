"""sdcli.memory: the page-size switch around decodes puts numpy's setting back, and changes no result."""

import numpy as np
import pytest

from sdcli.memory import _huge_page_switch, return_freed_memory, small_pages

switch = _huge_page_switch()


@pytest.mark.skipif(switch is None, reason="this numpy has no huge-page switch")
@pytest.mark.parametrize("before", [True, False])
def test_small_pages_puts_the_setting_back(before):
    previous = switch(before)
    try:
        with small_pages():
            assert switch(False) is False  # off inside the block
        assert switch(before) is before
        with pytest.raises(RuntimeError), small_pages():
            raise RuntimeError("a decode that fails")
        assert switch(before) is before  # back after an error too
    finally:
        switch(previous)


def test_small_pages_keeps_results():
    x = np.arange(2 << 20, dtype=np.float32)  # 8 MB: numpy would advise huge pages for it
    with small_pages():
        y = x * 2
    np.testing.assert_array_equal(y, x * 2)
    return_freed_memory()  # a no-op or glibc's malloc_trim: never raises
