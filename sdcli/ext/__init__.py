"""Compiled kernels. ``cpu_kernels`` (Cython, float32, OpenMP when the compiler has it) backs :mod:`sdcli.ops.cpu_ops`.

Importing a kernel module raises ImportError when the extension was not built; see setup.py.

OpenMP threads that wait actively (busy-spinning after every parallel region, the default) take the cores away
from numpy's BLAS threads, which run the GEMMs between two kernels: a CLIP layer ran twice as slowly as with
sleeping threads. So the wait policy defaults to passive here, before the OpenMP runtime loads with the first
kernel module; a value already in the environment is kept.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
