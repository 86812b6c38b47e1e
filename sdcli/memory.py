"""How the process holds its memory: freed memory handed back to the operating system, and ordinary pages rather
than huge ones for numpy's arrays."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

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


def prefer_small_pages() -> None:
    """Stop numpy from asking Linux for transparent huge pages for its arrays, for the rest of the process, unless
    the user chose with numpy's own ``NUMPY_MADVISE_HUGEPAGE`` variable (then that choice stands). sdcli calls this
    when it is imported.

    numpy advises huge pages (``madvise(MADV_HUGEPAGE)``) for every array of 4 MB or more. Where physical memory
    is fragmented, which a machine that has run for a while usually is, the first touch of each new 2 MB page may
    wait for the kernel to compact memory. sdcli allocates many arrays of sizes not seen before: each layer's
    packed or converted weight when a network is prepared, and a decoder's activations, which grow from block to
    block. Measured on 2 cores (Zen 4), SD1.5 random weights, alternating fresh processes:

    - the first fp32 UNet call (64x64 latents, batch 2), which packs the weights, took 12.4 s rather than 32 s;
    - loading the UNet in bf16 (a conversion per layer) took 0.8 s rather than 6 s;
    - a 512x512 VAE decode took 16.2 s rather than 18.2 s;
    - UNet and motion-UNet calls after the first ran the same either way (within 1-2%, both directions).

    The results are the same to the bit: only the page size of the memory changes.
    """
    if "NUMPY_MADVISE_HUGEPAGE" in os.environ:
        return
    switch = _huge_page_switch()
    if switch is not None:
        switch(False)
