/* BLAS for the C kernels: the one place that names a BLAS library. Kernels include this header and call
 * sdcli_sgemm(); which library answers is fixed by the build (setup.py), so the source the Linux tests exercise is
 * the source macOS compiles.
 *
 *   SDCLI_BLAS_ACCELERATE  Apple's Accelerate (macOS; linked with -framework Accelerate): cblas_sgemm from
 *                          <Accelerate/Accelerate.h>. Only the classic CBLAS sgemm is used, whose interface both
 *                          of Accelerate's headers share, so nothing here defines ACCELERATE_NEW_LAPACK (that
 *                          would need a macOS 13.3 deployment target for nothing). A build that defines it gets the
 *                          new interface's symbols; one that also defines ACCELERATE_LAPACK_ILP64 gets 64-bit
 *                          integers, which sdcli_blas_int follows.
 *   SDCLI_BLAS_OPENBLAS    OpenBLAS, by default the scipy-openblas32 wheel: its cblas.h (the wheel's include dir
 *                          comes first on the path) declares every function with the prefix its library exports,
 *                          scipy_cblas_sgemm, so numpy's own bundled OpenBLAS (scipy_*64_ symbols) and this one
 *                          never collide. BLAS_SYMBOL_PREFIX is that prefix (the wheel's pkg-config passes
 *                          -DBLAS_SYMBOL_PREFIX=scipy_); empty for a system OpenBLAS. 32-bit integers (LP64).
 *                          The wheel (0.3.34) has no bf16 GEMM: it is built without BUILD_BFLOAT16, so there is no
 *                          scipy_cblas_sbgemm; the bf16 layers keep sdcli's own AMX / AVX512_BF16 kernels.
 *   neither                no BLAS: SDCLI_BLAS_NONE is 1, sdcli_blas_name() is "none" and sdcli_sgemm() must not
 *                          be called (setup.py does not build blas_kernels then; the op layer keeps numpy's GEMM).
 *
 * Threads: the BLAS threads its own GEMMs (OpenBLAS: OPENBLAS_NUM_THREADS or OMP_NUM_THREADS, default all cores;
 * Accelerate decides alone). A kernel calls sdcli_sgemm() from one thread, outside any OpenMP region, so the two
 * thread pools never run at once.
 */
#ifndef SDCLI_BLAS_H
#define SDCLI_BLAS_H

#include <limits.h>
#include <stddef.h>

#if defined(SDCLI_BLAS_ACCELERATE)
#include <Accelerate/Accelerate.h>
#define SDCLI_BLAS_NONE 0
#define SDCLI_BLAS_NAME "accelerate"
#if defined(ACCELERATE_NEW_LAPACK) && defined(ACCELERATE_LAPACK_ILP64)
typedef long sdcli_blas_int;
#define SDCLI_BLAS_INT_MAX LONG_MAX
#else
typedef int sdcli_blas_int;
#define SDCLI_BLAS_INT_MAX INT_MAX
#endif
#define SDCLI_CBLAS(name) cblas_##name

#elif defined(SDCLI_BLAS_OPENBLAS)
#include <cblas.h>
#define SDCLI_BLAS_NONE 0
#define SDCLI_BLAS_NAME "openblas"
typedef blasint sdcli_blas_int; /* int unless the library was built with INTERFACE64 */
#define SDCLI_BLAS_INT_MAX ((sizeof(blasint) == sizeof(int)) ? (long long)INT_MAX : (long long)LLONG_MAX)
#ifndef BLAS_SYMBOL_PREFIX
#define BLAS_SYMBOL_PREFIX
#endif
#define SDCLI_BLAS_PASTE_(prefix, name) prefix##name
#define SDCLI_BLAS_PASTE(prefix, name) SDCLI_BLAS_PASTE_(prefix, name)
#define SDCLI_CBLAS(name) SDCLI_BLAS_PASTE(BLAS_SYMBOL_PREFIX, cblas_##name)

#else
#define SDCLI_BLAS_NONE 1
#define SDCLI_BLAS_NAME "none"
typedef int sdcli_blas_int;
#define SDCLI_BLAS_INT_MAX INT_MAX
#endif

/* Which library this build calls: "accelerate", "openblas" or "none". */
static inline const char *sdcli_blas_name(void) { return SDCLI_BLAS_NAME; }

/* The largest m, n, k or leading dimension sdcli_sgemm() takes (the library's integer type). */
static inline long long sdcli_blas_int_max(void) { return (long long)SDCLI_BLAS_INT_MAX; }

/* C (m, n) = alpha A @ B + beta C, all row-major float32: A (m, k) with rows lda floats apart, or, transposed
 * (trans_a), A stored as (k, m); B (k, n), or stored as (n, k) when trans_b; C rows ldc floats apart. With
 * beta 0, C is only written (its old contents, NaN included, are ignored). Sizes must be at most
 * sdcli_blas_int_max(); the caller checks. */
static inline void sdcli_sgemm(int trans_a, int trans_b, ptrdiff_t m, ptrdiff_t n, ptrdiff_t k, float alpha,
                               const float *a, ptrdiff_t lda, const float *b, ptrdiff_t ldb, float beta, float *c,
                               ptrdiff_t ldc) {
#if SDCLI_BLAS_NONE
    (void)trans_a, (void)trans_b, (void)m, (void)n, (void)k, (void)alpha, (void)a, (void)lda, (void)b, (void)ldb;
    (void)beta, (void)c, (void)ldc;
#else
    SDCLI_CBLAS(sgemm)(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
                       (sdcli_blas_int)m, (sdcli_blas_int)n, (sdcli_blas_int)k, alpha, a, (sdcli_blas_int)lda, b,
                       (sdcli_blas_int)ldb, beta, c, (sdcli_blas_int)ldc);
#endif
}

#endif /* SDCLI_BLAS_H */
