"""How the process holds its memory: freed memory handed back to the operating system, and the page size of the
arrays of a decode."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import sys
from collections.abc import Iterator

import numpy as np


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


def _huge_page_switch():
    """numpy's ``_set_madvise_hugepage(enabled) -> previous``, or None where this numpy has none."""
    for module in ("_core", "core"):
        switch = getattr(getattr(np, module, None), "multiarray", None)
        switch = getattr(switch, "_set_madvise_hugepage", None)
        if switch is not None:
            return switch
    return None


@contextlib.contextmanager
def small_pages() -> Iterator[None]:
    """Within the block, numpy does not ask Linux for transparent huge pages for its arrays.

    numpy advises huge pages (``madvise(MADV_HUGEPAGE)``) for every array of 4 MB or more. Where physical memory is
    fragmented, which a machine that has run for a while usually is, the first touch of each new 2 MB page may wait
    for the kernel to compact memory. A network that reuses the same few sizes call after call (the UNet) pays this
    once; a VAE decoder does not: its activations grow from block to block, up to 256 MB at 512x512 for SD, nearly
    each allocation of a size not seen before. A 512x512 SD1.5 decode measured 16.2 s with ordinary pages and
    18.2 s with huge pages (2 cores, Zen 4), its first 256-channel convolution at full size 1.8 s rather than 2.8 s,
    while the UNet ran the same either way. The setting is numpy's, for the whole process; it is put back on exit.
    Nothing changes where numpy has no such switch.
    """
    switch = _huge_page_switch()
    if switch is None:
        yield
        return
    previous = switch(False)
    try:
        yield
    finally:
        switch(previous)
