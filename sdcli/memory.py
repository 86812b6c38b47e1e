"""How the process holds its memory: freed memory handed back to the operating system, ordinary pages rather than
huge ones for numpy's arrays, and large freed arrays kept for reuse while a network runs."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import sys

import numpy as np


@functools.cache
def _glibc_function(name: str, argtypes: tuple):
    """A function of glibc's allocator (returning int), or None (other C libraries, other systems)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = list(argtypes), ctypes.c_int
    return function


def _malloc_trim():
    """glibc's ``malloc_trim(pad)``, or None."""
    return _glibc_function("malloc_trim", (ctypes.c_size_t,))


def _mallopt():
    """glibc's ``mallopt(parameter, value)``, or None."""
    return _glibc_function("mallopt", (ctypes.c_int, ctypes.c_int))


# glibc's mallopt parameters, and the values its own adaptive thresholds settle at on 64-bit systems once blocks of
# 32 MB have been freed (DEFAULT_MMAP_THRESHOLD_MAX, and twice that for trimming)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
SETTLED_MMAP_THRESHOLD = 32 << 20
SETTLED_TRIM_THRESHOLD = 2 * SETTLED_MMAP_THRESHOLD
# inside reuse_large_arrays: every block up to this size comes from the heap, and up to this much free memory at
# its top stays mapped
REUSE_THRESHOLD = 1 << 30
_reuse_depth = 0


@contextlib.contextmanager
def reuse_large_arrays(enabled: bool = True):
    """Inside (when ``enabled``): arrays of any size up to 1 GiB are carved from the C heap, and memory freed
    there is kept mapped for the next array rather than handed back to the system (glibc; elsewhere nothing
    changes). On leaving, glibc's settled thresholds (32 MB, trimming past 64 MB) apply. Re-entrant.

    glibc maps every block above its threshold (at most 32 MB) afresh and unmaps it when freed, so each new array
    of that size costs a page fault and a page of zeros from the kernel per 4 KB on its first write, every time. A
    network call allocates the same large activations over and over, and so does every step of a sampling loop:
    the image and video pipelines run their loops inside, unless loaded with ``low_memory``. The motion UNet at
    16 frames x 32x32 latents (level-0 activations of 42 MB) spent about a tenth of its time in those faults.
    Measured on 2 cores (Zen 4), fresh processes: its call took 46.6 s rather than 53.0 s, with a peak 3% higher
    (5.84 GB rather than 5.66 GB: the heap's free gaps stay resident). Decoders, whose activations grow from block
    to block and are not reused, stay outside: a 512x512 VAE decode inside would be 10% faster but peak 21% higher.
    """
    global _reuse_depth
    if not enabled:
        yield
        return
    mallopt = _mallopt()
    if mallopt is not None and _reuse_depth == 0:
        mallopt(M_MMAP_THRESHOLD, REUSE_THRESHOLD)
        mallopt(M_TRIM_THRESHOLD, REUSE_THRESHOLD)
    _reuse_depth += 1
    try:
        yield
    finally:
        _reuse_depth -= 1
        if mallopt is not None and _reuse_depth == 0:
            mallopt(M_MMAP_THRESHOLD, SETTLED_MMAP_THRESHOLD)
            mallopt(M_TRIM_THRESHOLD, SETTLED_TRIM_THRESHOLD)


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
