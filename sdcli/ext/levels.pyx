# cython: language_level=3
"""The CPU level the compiled kernels run at (sdcli/ext/cpu_level.h), worked out once per process.

LEVELS names the levels, lowest first: "baseline" (the portable code: 4-lane vectors and plain C loops, what an
x86-64 without AVX2 or an arm64 runs), "avx2" (AVX2, FMA, F16C), "avx512" (AVX-512F and DQ, no bf16 instructions),
"avx512_bf16" (AVX512_BF16), "amx" (AMX tiles). ``level()`` is the one in use: the best this build, CPU and OS
have (``detected()``), capped by the environment variable SDCLI_CPU_LEVEL, read when this module loads. A cap above
what the CPU has gives the CPU's best; an unknown value makes the import of this module, and so of every kernel
module, raise BackendError. The other kernel modules import this one first and hand its ``number()`` to their own
copy of cpu_level.h, so that all of them dispatch on the same level. ``sdcli.ext.cpu_level()`` reports both.
"""

import os

from ..errors import BackendError

cdef extern from "cpu_level.h":
    enum:
        SDCLI_LEVEL_COUNT
    const char* SDCLI_CPU_LEVEL_ENV
    const char* sdcli_level_names[]
    int sdcli_cpu_detected()
    int sdcli_cpu_cap()
    int sdcli_cpu_level_capped(int cap, int detected)

LEVELS = tuple(sdcli_level_names[i].decode() for i in range(SDCLI_LEVEL_COUNT))
ENV_VAR = SDCLI_CPU_LEVEL_ENV.decode()

cdef int _detected = sdcli_cpu_detected()
cdef int _level = sdcli_cpu_level_capped(sdcli_cpu_cap(), _detected)
if _level < 0:
    raise BackendError(f"{ENV_VAR}={os.environ.get(ENV_VAR)!r} is not a CPU level: use one of {', '.join(LEVELS)}, "
                       f"or leave it unset for the CPU's best")


def level():
    """The level the kernels run at: the CPU's best, capped by SDCLI_CPU_LEVEL."""
    return LEVELS[_level]


def detected():
    """The best level this build, CPU and OS have."""
    return LEVELS[_detected]


def number():
    """``level()`` as its index in LEVELS: what the kernel modules hand to cpu_level.h."""
    return _level
