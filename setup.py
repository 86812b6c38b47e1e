"""Build of the compiled kernels in sdcli/ext; the package metadata lives in setup.cfg.

Every ``sdcli/ext/*.pyx`` becomes the extension module ``sdcli.ext.<name>``. Flags: -O3 and -fno-math-errno (libm
then sets no errno, which nothing reads), nothing tied to the build machine's CPU (no -march: a wheel must run on
any x86-64; sdcli/ext/vec.h picks its AVX2 versions at run time) and no -ffast-math (it breaks inf/nan handling).
OpenMP where a probe program compiles and links with it, otherwise the kernels build single-threaded. Cython writes
its C under build/, never beside the sources.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from glob import glob

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

EXT_DIR = os.path.join("sdcli", "ext")
CYTHON_BUILD_DIR = os.path.join("build", "cython")

log = logging.getLogger("sdcli.setup")

OPENMP_PROBE = r"""
#include <omp.h>
int main(void) {
    int threads = 0;
    #pragma omp parallel reduction(+ : threads)
    threads += 1;
    return threads > 0 && omp_get_max_threads() > 0 ? 0 : 1;
}
"""


def openmp_flags(compiler) -> tuple[list[str], list[str]] | None:
    """(compile args, link args) with which ``compiler`` builds and links an OpenMP program, or None.

    Tries -fopenmp (gcc, clang with libomp), then on macOS Apple clang's -Xpreprocessor -fopenmp -lomp, which
    works only where libomp is installed; MSVC's /openmp.
    """
    if compiler.compiler_type == "msvc":
        candidates = [(["/openmp"], [])]
    else:
        candidates = [(["-fopenmp"], ["-fopenmp"])]
        if sys.platform == "darwin":
            candidates.append((["-Xpreprocessor", "-fopenmp"], ["-lomp"]))
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "openmp_probe.c")
        with open(source, "w") as file:
            file.write(OPENMP_PROBE)
        for compile_args, link_args in candidates:
            try:
                objects = compiler.compile([source], output_dir=tmp, extra_postargs=compile_args)
                compiler.link_executable(objects, "openmp_probe", output_dir=tmp, extra_postargs=link_args)
            except Exception:  # CompileError, LinkError: this flag set does not work here
                continue
            return compile_args, link_args
    return None


def report_accelerator_sources() -> None:
    """Log what this build does with GPU / vendor-library sources. Today there are none, so it only says so.

    CUDA sources (``sdcli/ext/*.cu``) will need nvcc and macOS Accelerate sources an SDK; when such sources are
    added, their build goes here, guarded so that a missing nvcc or SDK skips them with one log line. A missing
    tool must never fail the build of the CPU kernels.
    """
    cuda_sources = sorted(glob(os.path.join(EXT_DIR, "*.cu")))
    if not cuda_sources:
        log.info("sdcli: no CUDA sources in %s; building the CPU kernels only", EXT_DIR)
    elif shutil.which("nvcc") is None:
        log.warning("sdcli: nvcc not found; skipping %d CUDA source(s)", len(cuda_sources))
    else:
        log.warning("sdcli: %d CUDA source(s) found, but this setup.py has no CUDA build yet; skipping them",
                    len(cuda_sources))


class BuildExt(build_ext):
    """build_ext with -O3 and OpenMP when the compiler supports it."""

    def build_extensions(self) -> None:
        report_accelerator_sources()
        msvc = self.compiler.compiler_type == "msvc"
        compile_args = ["/O2"] if msvc else ["-O3", "-fno-math-errno"]
        link_args: list[str] = []
        openmp = openmp_flags(self.compiler)
        if openmp is None:
            log.warning("sdcli: the compiler has no usable OpenMP; the CPU kernels will run single-threaded")
        else:
            log.info("sdcli: building with OpenMP (%s)", " ".join(openmp[0]))
            compile_args += openmp[0]
            link_args += openmp[1]
        for extension in self.extensions:
            extension.extra_compile_args = compile_args + list(extension.extra_compile_args)
            extension.extra_link_args = link_args + list(extension.extra_link_args)
        super().build_extensions()


def cython_extensions() -> list[Extension]:
    extensions = [
        Extension(
            f"sdcli.ext.{os.path.splitext(os.path.basename(path))[0]}",
            [path],
            include_dirs=[EXT_DIR, np.get_include()],
            depends=sorted(glob(os.path.join(EXT_DIR, "*.h"))),
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        )
        for path in sorted(glob(os.path.join(EXT_DIR, "*.pyx")))
    ]
    return cythonize(extensions, build_dir=CYTHON_BUILD_DIR, compiler_directives={"language_level": 3})


setup(ext_modules=cython_extensions(), cmdclass={"build_ext": BuildExt})
