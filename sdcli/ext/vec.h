/* Small vector kernels for cpu_kernels.pyx, in portable C.
 *
 *   sdcli_tile_8x8     c[0:8, 0:8] += a[0:8, 0:n] @ b[0:n, 0:8]: the register tile of the attention kernel
 *   sdcli_max          the largest of x[0:n] (nan entries ignored; -inf when n is 0)
 *   sdcli_exp_shifted  y[j] = exp(x[j] - shift) for j < n, returning the sum (in double): the softmax numerator
 *   sdcli_quick_gelu   y[j] = x[j] / (1 + exp(-1.702 x[j])) for j < n
 *   sdcli_gelu_tanh    y[j] = x[j] / (1 + exp(-2 sqrt(2/pi) (x[j] + 0.044715 x[j]^3))), GELU's tanh form, j < n
 *   sdcli_gelu         y[j] = x[j] Phi(x[j]) (exact GELU, Numerical Recipes' erfc) for j < n
 *   sdcli_geglu        y[j] = value[j] gelu(gate[j]) for j < n
 *   sdcli_sum_shifted  the sum of (x[j] - shift), or of its squares, for j < n, accumulated in double
 *   sdcli_sum_centred_squares  the sum of (x[j] - mean)^2 for j < n, in double (mean a double)
 *   sdcli_normalize_shift  y[j] = (x[j] - mean) scale + shift in double, rounded to float, then SiLU of that when
 *                      asked, for j < n
 *   sdcli_normalize_affine  y[j] = (x[j] - mean) inverse_std weight[j] + bias[j] for j < n
 *
 * All arrays are float32 and may be unaligned; a, b, c rows are lda, ldb, ldc floats apart; x and y may be the
 * same array. GCC and Clang build them with generic vector types: 4 lanes for the baseline (SSE2 on any x86-64,
 * NEON on arm64; no -march, no fast-math). On x86-64 each also has an 8-lane AVX2 + FMA version and a 16-lane
 * AVX-512 one, each compiled for its target alone and chosen at run time when the CPU level allows it (cpu_level.h:
 * the CPU's best, capped by SDCLI_CPU_LEVEL; AVX-512 for the element-wise and norm kernels), so the module still
 * runs on any x86-64. SDCLI_BASELINE_ONLY (cpu_level.h) leaves the wider versions out of the build. Other
 * compilers get plain loops with the same results up to rounding.
 */
#ifndef SDCLI_VEC_H
#define SDCLI_VEC_H

#include <math.h>
#include <stddef.h>
#include <string.h>

#include "cpu_level.h"

#if defined(__GNUC__) || defined(__clang__)

typedef float sdcli_f4 __attribute__((vector_size(16)));
typedef int sdcli_i4 __attribute__((vector_size(16)));
typedef double sdcli_d4 __attribute__((vector_size(32)));

#define SDCLI_W 4
#define SDCLI_F sdcli_f4
#define SDCLI_I sdcli_i4
#define SDCLI_D sdcli_d4
#define SDCLI_FN(name) sdcli_##name##_w4
#define SDCLI_TARGET
#include "vec_body.h"
#undef SDCLI_TARGET

/* 4 x 8 in eight 4-wide registers */
static inline void sdcli_tile_4x8_w4(const float *a, ptrdiff_t lda, const float *b, ptrdiff_t ldb, ptrdiff_t n,
                                     float *c, ptrdiff_t ldc) {
    sdcli_f4 c00 = sdcli_load_w4(c), c01 = sdcli_load_w4(c + 4);
    sdcli_f4 c10 = sdcli_load_w4(c + ldc), c11 = sdcli_load_w4(c + ldc + 4);
    sdcli_f4 c20 = sdcli_load_w4(c + 2 * ldc), c21 = sdcli_load_w4(c + 2 * ldc + 4);
    sdcli_f4 c30 = sdcli_load_w4(c + 3 * ldc), c31 = sdcli_load_w4(c + 3 * ldc + 4);
    for (ptrdiff_t t = 0; t < n; t++) {
        const sdcli_f4 b0 = sdcli_load_w4(b + t * ldb), b1 = sdcli_load_w4(b + t * ldb + 4);
        const float a0 = a[t], a1 = a[lda + t], a2 = a[2 * lda + t], a3 = a[3 * lda + t];
        c00 += a0 * b0;
        c01 += a0 * b1;
        c10 += a1 * b0;
        c11 += a1 * b1;
        c20 += a2 * b0;
        c21 += a2 * b1;
        c30 += a3 * b0;
        c31 += a3 * b1;
    }
    sdcli_store_w4(c, c00, 4);
    sdcli_store_w4(c + 4, c01, 4);
    sdcli_store_w4(c + ldc, c10, 4);
    sdcli_store_w4(c + ldc + 4, c11, 4);
    sdcli_store_w4(c + 2 * ldc, c20, 4);
    sdcli_store_w4(c + 2 * ldc + 4, c21, 4);
    sdcli_store_w4(c + 3 * ldc, c30, 4);
    sdcli_store_w4(c + 3 * ldc + 4, c31, 4);
}

#if (defined(__x86_64__) || defined(__i386__)) && !defined(SDCLI_BASELINE_ONLY)
#define SDCLI_X86_DISPATCH 1

typedef float sdcli_f8 __attribute__((vector_size(32)));
typedef int sdcli_i8 __attribute__((vector_size(32)));
typedef double sdcli_d8 __attribute__((vector_size(64)));

#define SDCLI_W 8
#define SDCLI_F sdcli_f8
#define SDCLI_I sdcli_i8
#define SDCLI_D sdcli_d8
#define SDCLI_FN(name) sdcli_##name##_w8
#define SDCLI_TARGET __attribute__((target("avx2,fma")))
#include "vec_body.h"

/* 8 x 8 in eight 8-wide registers; the compiler contracts c += a * b into one FMA */
SDCLI_TARGET static void sdcli_tile_8x8_w8(const float *a, ptrdiff_t lda, const float *b, ptrdiff_t ldb,
                                           ptrdiff_t n, float *c, ptrdiff_t ldc) {
    sdcli_f8 c0 = sdcli_load_w8(c), c1 = sdcli_load_w8(c + ldc), c2 = sdcli_load_w8(c + 2 * ldc),
             c3 = sdcli_load_w8(c + 3 * ldc), c4 = sdcli_load_w8(c + 4 * ldc), c5 = sdcli_load_w8(c + 5 * ldc),
             c6 = sdcli_load_w8(c + 6 * ldc), c7 = sdcli_load_w8(c + 7 * ldc);
    for (ptrdiff_t t = 0; t < n; t++) {
        const sdcli_f8 bt = sdcli_load_w8(b + t * ldb);
        c0 += a[t] * bt;
        c1 += a[lda + t] * bt;
        c2 += a[2 * lda + t] * bt;
        c3 += a[3 * lda + t] * bt;
        c4 += a[4 * lda + t] * bt;
        c5 += a[5 * lda + t] * bt;
        c6 += a[6 * lda + t] * bt;
        c7 += a[7 * lda + t] * bt;
    }
    sdcli_store_w8(c, c0, 8);
    sdcli_store_w8(c + ldc, c1, 8);
    sdcli_store_w8(c + 2 * ldc, c2, 8);
    sdcli_store_w8(c + 3 * ldc, c3, 8);
    sdcli_store_w8(c + 4 * ldc, c4, 8);
    sdcli_store_w8(c + 5 * ldc, c5, 8);
    sdcli_store_w8(c + 6 * ldc, c6, 8);
    sdcli_store_w8(c + 7 * ldc, c7, 8);
}
#undef SDCLI_TARGET

static inline int sdcli_has_avx2(void) { return sdcli_cpu_level() >= SDCLI_LEVEL_AVX2; }

/* 16 lanes, one AVX-512 register each (also the vector types of cpu_kernels.pyx's attention kernel) */
typedef float sdcli_f16 __attribute__((vector_size(64)));
typedef int sdcli_i16 __attribute__((vector_size(64)));
typedef double sdcli_d16 __attribute__((vector_size(128)));

#pragma GCC diagnostic push
#ifndef __clang__
#pragma GCC diagnostic ignored "-Wpsabi" /* 64-byte vector arguments: static functions, no ABI to keep */
#endif
#define SDCLI_W 16
#define SDCLI_F sdcli_f16
#define SDCLI_I sdcli_i16
#define SDCLI_D sdcli_d16
#define SDCLI_FN(name) sdcli_##name##_w16
#define SDCLI_TARGET __attribute__((target("avx512f,avx512dq,avx2,fma"))) __attribute__((unused))
#include "vec_body.h"
#undef SDCLI_TARGET
#pragma GCC diagnostic pop

static inline int sdcli_has_avx512(void) { return sdcli_cpu_level() >= SDCLI_LEVEL_AVX512; }
#endif

static inline void sdcli_tile_8x8(const float *a, ptrdiff_t lda, const float *b, ptrdiff_t ldb, ptrdiff_t n,
                                  float *c, ptrdiff_t ldc) {
#ifdef SDCLI_X86_DISPATCH
    if (sdcli_has_avx2()) {
        sdcli_tile_8x8_w8(a, lda, b, ldb, n, c, ldc);
        return;
    }
#endif
    sdcli_tile_4x8_w4(a, lda, b, ldb, n, c, ldc);
    sdcli_tile_4x8_w4(a + 4 * lda, lda, b, ldb, n, c + 4 * ldc, ldc);
}

static inline float sdcli_max(const float *x, ptrdiff_t n) {
#ifdef SDCLI_X86_DISPATCH
    if (sdcli_has_avx2()) return sdcli_max_w8(x, n);
#endif
    return sdcli_max_w4(x, n);
}

static inline double sdcli_exp_shifted(const float *x, float shift, ptrdiff_t n, float *y) {
#ifdef SDCLI_X86_DISPATCH
    if (sdcli_has_avx2()) return sdcli_exp_shifted_w8(x, shift, n, y);
#endif
    return sdcli_exp_shifted_w4(x, shift, n, y);
}

static inline void sdcli_quick_gelu(const float *x, ptrdiff_t n, float *y) {
#ifdef SDCLI_X86_DISPATCH
    if (sdcli_has_avx2()) {
        sdcli_quick_gelu_w8(x, n, y);
        return;
    }
#endif
    sdcli_quick_gelu_w4(x, n, y);
}

static inline void sdcli_gelu_tanh(const float *x, ptrdiff_t n, float *y) {
#ifdef SDCLI_X86_DISPATCH
    if (sdcli_has_avx512()) {
        sdcli_gelu_tanh_w16(x, n, y);
        return;
    }
    if (sdcli_has_avx2()) {
        sdcli_gelu_tanh_w8(x, n, y);
        return;
    }
#endif
    sdcli_gelu_tanh_w4(x, n, y);
}

static inline void sdcli_gelu(const float *x, ptrdiff_t n, float *y) {
#ifdef SDCLI_X86_DISPATCH
    if (sdcli_has_avx512()) {
        sdcli_gelu_w16(x, n, y);
        return;
    }
    if (sdcli_has_avx2()) {
        sdcli_gelu_w8(x, n, y);
        return;
    }
#endif
    sdcli_gelu_w4(x, n, y);
}

static inline void sdcli_geglu(const float *value, const float *gate, ptrdiff_t n, float *y) {
#ifdef SDCLI_X86_DISPATCH
    if (sdcli_has_avx512()) {
        sdcli_geglu_w16(value, gate, n, y);
        return;
    }
    if (sdcli_has_avx2()) {
        sdcli_geglu_w8(value, gate, n, y);
        return;
    }
#endif
    sdcli_geglu_w4(value, gate, n, y);
}

static inline double sdcli_sum_shifted(const float *x, ptrdiff_t n, float shift, int square) {
#ifdef SDCLI_X86_DISPATCH
    if (sdcli_has_avx512()) return sdcli_sum_shifted_w16(x, n, shift, square);
    if (sdcli_has_avx2()) return sdcli_sum_shifted_w8(x, n, shift, square);
#endif
    return sdcli_sum_shifted_w4(x, n, shift, square);
}

static inline double sdcli_sum_centred_squares(const float *x, ptrdiff_t n, double mean) {
#ifdef SDCLI_X86_DISPATCH
    if (sdcli_has_avx512()) return sdcli_sum_centred_squares_w16(x, n, mean);
    if (sdcli_has_avx2()) return sdcli_sum_centred_squares_w8(x, n, mean);
#endif
    return sdcli_sum_centred_squares_w4(x, n, mean);
}

static inline void sdcli_normalize_shift(const float *x, ptrdiff_t n, double mean, double scale, double shift,
                                         int silu, float *y) {
#ifdef SDCLI_X86_DISPATCH
    if (sdcli_has_avx512()) {
        sdcli_normalize_shift_w16(x, n, mean, scale, shift, silu, y);
        return;
    }
    if (sdcli_has_avx2()) {
        sdcli_normalize_shift_w8(x, n, mean, scale, shift, silu, y);
        return;
    }
#endif
    sdcli_normalize_shift_w4(x, n, mean, scale, shift, silu, y);
}

static inline void sdcli_normalize_affine(const float *x, ptrdiff_t n, float mean, float inverse_std,
                                          const float *weight, const float *bias, float *y) {
#ifdef SDCLI_X86_DISPATCH
    if (sdcli_has_avx512()) {
        sdcli_normalize_affine_w16(x, n, mean, inverse_std, weight, bias, y);
        return;
    }
    if (sdcli_has_avx2()) {
        sdcli_normalize_affine_w8(x, n, mean, inverse_std, weight, bias, y);
        return;
    }
#endif
    sdcli_normalize_affine_w4(x, n, mean, inverse_std, weight, bias, y);
}

#else /* neither GCC nor Clang: plain loops */

static inline void sdcli_tile_8x8(const float *a, ptrdiff_t lda, const float *b, ptrdiff_t ldb, ptrdiff_t n,
                                  float *c, ptrdiff_t ldc) {
    for (ptrdiff_t r = 0; r < 8; r++) {
        for (ptrdiff_t j = 0; j < 8; j++) {
            float total = c[r * ldc + j];
            for (ptrdiff_t t = 0; t < n; t++) total += a[r * lda + t] * b[t * ldb + j];
            c[r * ldc + j] = total;
        }
    }
}

static inline float sdcli_max(const float *x, ptrdiff_t n) {
    float result = -INFINITY;
    for (ptrdiff_t j = 0; j < n; j++) result = x[j] > result ? x[j] : result;
    return result;
}

static inline double sdcli_exp_shifted(const float *x, float shift, ptrdiff_t n, float *y) {
    double sum = 0.0;
    for (ptrdiff_t j = 0; j < n; j++) {
        y[j] = expf(x[j] - shift);
        sum += y[j];
    }
    return sum;
}

static inline void sdcli_quick_gelu(const float *x, ptrdiff_t n, float *y) {
    for (ptrdiff_t j = 0; j < n; j++) y[j] = x[j] / (1.0f + expf(-1.702f * x[j]));
}

static inline float sdcli_gelu_one(float x) {
    const float z = fabsf(x) * 0.70710678118654752f, t = 1.0f / (1.0f + 0.5f * z);
    const float p = -1.26551223f + t * (1.00002368f + t * (0.37409196f + t * (0.09678418f + t * (-0.18628806f
                    + t * (0.27886807f + t * (-1.13520398f + t * (1.48851587f + t * (-0.82215223f
                    + t * 0.17087277f))))))));
    const float half_erfc = 0.5f * t * expf(p - z * z);
    return x * (x < 0 ? half_erfc : 1.0f - half_erfc);
}

static inline void sdcli_gelu(const float *x, ptrdiff_t n, float *y) {
    for (ptrdiff_t j = 0; j < n; j++) y[j] = sdcli_gelu_one(x[j]);
}

static inline void sdcli_geglu(const float *value, const float *gate, ptrdiff_t n, float *y) {
    for (ptrdiff_t j = 0; j < n; j++) y[j] = value[j] * sdcli_gelu_one(gate[j]);
}

static inline double sdcli_sum_shifted(const float *x, ptrdiff_t n, float shift, int square) {
    double sum = 0.0;
    for (ptrdiff_t j = 0; j < n; j++) {
        const float v = x[j] - shift;
        sum += square ? (double)(v * v) : (double)v;
    }
    return sum;
}

static inline double sdcli_sum_centred_squares(const float *x, ptrdiff_t n, double mean) {
    double sum = 0.0;
    for (ptrdiff_t j = 0; j < n; j++) {
        const double v = (double)x[j] - mean;
        sum += v * v;
    }
    return sum;
}

static inline void sdcli_normalize_shift(const float *x, ptrdiff_t n, double mean, double scale, double shift,
                                         int silu, float *y) {
    for (ptrdiff_t j = 0; j < n; j++) {
        const float v = (float)(((double)x[j] - mean) * scale + shift);
        y[j] = silu ? v / (1.0f + expf(-v)) : v;
    }
}

static inline void sdcli_normalize_affine(const float *x, ptrdiff_t n, float mean, float inverse_std,
                                          const float *weight, const float *bias, float *y) {
    for (ptrdiff_t j = 0; j < n; j++) y[j] = (x[j] - mean) * inverse_std * weight[j] + bias[j];
}

#endif

#endif /* SDCLI_VEC_H */
