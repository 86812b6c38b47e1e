"""Compiled kernels. ``cpu_kernels`` (Cython, float32, OpenMP when the compiler has it) backs :mod:`sdcli.ops.cpu_ops`,
with ``f32_kernels`` and ``bf16_kernels`` (packed weights) and ``blas_kernels`` (convolutions through BLAS).

Importing a kernel module raises ImportError when the extension was not built; see setup.py.

Every kernel module dispatches on one CPU level (``levels``, cpu_level.h): the best this CPU has, capped by the
environment variable SDCLI_CPU_LEVEL ("baseline", "avx2", "avx512", "avx512_bf16" or "amx"), read once per
process; ``cpu_level()`` says which. An unknown value makes the import of the kernel modules raise BackendError.

OpenMP threads that wait actively (busy-spinning after every parallel region, the default) take the cores away
from numpy's BLAS threads, which run the GEMMs between two kernels: a CLIP layer ran twice as slowly as with
sleeping threads. So the wait policy defaults to passive here, before the OpenMP runtime loads with the first
kernel module; a value already in the environment is kept.

``blas_kernels`` is linked against the scipy-openblas32 wheel's libscipy_openblas.so by name, without a search
path (see setup.py's blas_options): importing scipy_openblas32 here loads that library, and the loader then
resolves the extension's dependency to it. Without the wheel (or on macOS, where the extension uses Accelerate)
nothing is loaded here; blas_kernels then fails to import (or was never built) and cpu_ops keeps numpy's GEMM.
"""

import os
import sys
from typing import NamedTuple

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

if sys.platform != "darwin":
    try:
        import scipy_openblas32  # noqa: F401  (loads libscipy_openblas.so for blas_kernels)
    except ImportError:
        pass


class CpuLevel(NamedTuple):
    level: str  # the level the kernels run at: the detected one, capped by SDCLI_CPU_LEVEL
    detected: str  # the best level this build, CPU and OS have


def cpu_level() -> CpuLevel:
    """The CPU level the compiled kernels run at and the best one this machine has, by name ("baseline", "avx2",
    "avx512", "avx512_bf16", "amx"). Raises ImportError when the extension is not built, BackendError when
    SDCLI_CPU_LEVEL names no level."""
    from . import levels

    return CpuLevel(levels.level(), levels.detected())
