"""Handing memory the process no longer uses back to the operating system."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None (other C libraries, other systems)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def return_freed_memory() -> None:
    """Ask the C allocator to give its free pages back (glibc's ``malloc_trim(0)``). Arrays under its mmap
    threshold (which glibc raises up to 32 MB as large blocks are freed) live in the heap, and their pages stay
    resident after they are freed until the heap reuses them, or this is called. Nothing happens elsewhere."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
