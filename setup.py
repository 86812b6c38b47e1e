"""Build of the compiled kernels in sdcli/ext; the package metadata lives in setup.cfg.

Every ``sdcli/ext/*.pyx`` becomes the extension module ``sdcli.ext.<name>``. Flags: -O3 and -fno-math-errno (libm
then sets no errno, which nothing reads), nothing tied to the build machine's CPU (no -march: a wheel must run on
any x86-64; sdcli/ext/vec.h picks its AVX2 versions at run time) and no -ffast-math (it breaks inf/nan handling).
OpenMP where a probe program compiles and links with it, otherwise the kernels build single-threaded. Cython writes
its C under build/, never beside the sources.

``sdcli/ext/blas_kernels.pyx`` calls BLAS through sdcli/ext/blas.h: on macOS Accelerate (``-framework Accelerate``),
elsewhere OpenBLAS from the scipy-openblas32 wheel (a build requirement). Where neither is there, that one module is
skipped with a log line and the op layer keeps numpy's GEMM; the build does not fail.
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

    CUDA sources (``sdcli/ext/*.cu``) will need nvcc; when such sources are added, their build goes here, guarded
    so that a missing nvcc skips them with one log line. A missing tool must never fail the build of the CPU
    kernels. (BLAS, Accelerate on macOS included, is configured by blas_options.)
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


def blas_options() -> dict[str, list] | None:
    """Extension options that make sdcli/ext/blas.h call a BLAS, or None where there is none to build with.

    macOS: Accelerate, part of the system. Elsewhere: the scipy-openblas32 wheel, whose library exports its
    functions with the prefix scipy_ (so it never clashes with numpy's own bundled OpenBLAS), declared so in its
    cblas.h.

    How the extension finds libscipy_openblas.so at run time: it is linked by name (-lscipy_openblas, the library's
    soname) without an rpath, and sdcli/ext/__init__.py imports scipy_openblas32 first, which loads that library;
    the dynamic loader then matches the extension's dependency by soname to the library already loaded. This works
    wherever scipy_openblas32 is importable, whatever the layout: ``pip install .``, ``pip install -e .`` (the
    extension stays in the source tree) and an in-place build alike. An rpath would not: an isolated build (the
    default of pip) links against the copy of the wheel in a temporary build environment that is deleted afterwards,
    and a path relative to the extension ($ORIGIN/../../scipy_openblas32/lib) holds only for a site-packages install.
    """
    if sys.platform == "darwin":
        return {"define_macros": [("SDCLI_BLAS_ACCELERATE", None)], "extra_link_args": ["-framework", "Accelerate"]}
    try:
        import scipy_openblas32
    except ImportError:
        return None
    return {
        "include_dirs": [scipy_openblas32.get_include_dir()],
        "library_dirs": [scipy_openblas32.get_lib_dir()],
        "libraries": [scipy_openblas32.get_library()],
        "define_macros": [("SDCLI_BLAS_OPENBLAS", None), ("BLAS_SYMBOL_PREFIX", "scipy_")],
    }


def cython_extensions() -> list[Extension]:
    blas = blas_options()
    extensions = []
    for path in sorted(glob(os.path.join(EXT_DIR, "*.pyx"))):
        name = os.path.splitext(os.path.basename(path))[0]
        options = {}
        if name == "blas_kernels":
            if blas is None:
                log.warning("sdcli: no BLAS to build with (scipy-openblas32 is not installed); skipping "
                            "sdcli.ext.blas_kernels: plain-weight convolutions keep numpy's GEMM")
                continue
            options = blas
        extensions.append(Extension(
            f"sdcli.ext.{name}",
            [path],
            include_dirs=[*options.get("include_dirs", []), EXT_DIR, np.get_include()],
            library_dirs=options.get("library_dirs", []),
            libraries=options.get("libraries", []),
            depends=sorted(glob(os.path.join(EXT_DIR, "*.h"))),
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"), *options.get("define_macros", [])],
            extra_link_args=options.get("extra_link_args", []),
        ))
    return cythonize(extensions, build_dir=CYTHON_BUILD_DIR, compiler_directives={"language_level": 3})


setup(ext_modules=cython_extensions(), cmdclass={"build_ext": BuildExt})
