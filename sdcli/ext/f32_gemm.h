/* float32 matrix products with AVX-512 FMA, for f32_kernels.pyx: linear layers and convolutions (im2col).
 *
 * One level only: AVX-512F FMA, compiled per function (target attributes, no -march) and chosen at run time by
 * sdcli_f32_available() (the CPU level of cpu_level.h is avx512 or above). Where the CPU, the OS or the build lacks
 * it, or SDCLI_CPU_LEVEL caps it, f32_kernels.pyx raises RuntimeError and the op layer keeps its OpenBLAS path; in
 * a build without it the task functions here are empty stubs that are never called.
 *
 * The product is C (m, n) = init + A (m, k) @ B (k, n), C row-major, in the classic blocked form:
 *   A  micro-panels of MR rows, k cut into chunks of KC: panel p, chunk c is (MR, KC) row-major (rows KC floats
 *      apart, a compile-time constant, so the microkernel addresses its MR rows with fixed displacements); zeros
 *      in rows past m and in k past the true K.
 *        linear:  a block of rows of x, one chunk at a time (sdcli_f32_pack_rows): panel p at a[p * MR * KC]
 *        conv2d:  the weight (Cout, K), packed once at load time (pack_conv_weight in f32_kernels.pyx), all the
 *                 chunks: panel p, chunk c at a[(p * chunks + c) * MR * KC]
 *   B  strips of NR columns: strip s is (k, NR) row-major, so walking down k reads memory in order.
 *        linear:  the weight w.T (K, N), packed once at load time as (Np/NR, K, NR), Np = N rounded up to NR
 *        conv2d:  a block of up to SDCLI_F32_PIXELS columns (output pixels of one image) of the im2col matrix,
 *                 one chunk of k at a time, written straight into strips (KC, NR) by sdcli_f32_im2col
 *   C  the caller's output: rows ldc floats apart; partial tiles at the edges are written with masked stores.
 *
 * Microkernel (sdcli_f32_tile): an MR x NR = 14 x 32 tile of C in 28 zmm accumulators; per step of k, the two
 * vectors of the strip row and, per row, A[r, k] broadcast: 28 FMAs for 2 vector loads and 14 broadcasts. Around
 * it (sdcli_f32_block): one chunk of k, the panels of A outermost, so a panel (MR x KC floats, 14 KB) stays in L1
 * while the strips of B (a block of at most SDCLI_F32_COLS or SDCLI_F32_PIXELS columns, in L2) stream past it.
 * The sum over k runs in parts of SDCLI_F32_KSUM steps in the accumulators, each added to the sum of the parts
 * before it (kept on the stack); each chunk's sum is added to C, and the bias goes last:
 * C = ((chunk_0 + chunk_1) + ...) + bias with chunk = ((part_0 + part_1) + ...), float32 throughout (no
 * -ffast-math), so results differ from BLAS only by summation order. Parts of 64 steps rather than a running sum
 * over a whole chunk (256) cut the rounding error of long sums by a third or more (a float32 running sum's error
 * grows with its length), and a bias added last does not raise the partial sums to its magnitude: as accurate as
 * PyTorch's products, where whole chunks after the bias were up to 1.5 times less accurate (convolutions of
 * K = 288), which a UNet that amplifies float32 rounding showed (tests/test_float32_fidelity.py). A part costs
 * 28 additions and an L1 load and store of the tile's sum per 1,792 FMAs; parts of 32 were more accurate still
 * (the ill-conditioned UNet's mean error 0.99 of torch's rather than 1.16) but cost about 5% of a UNet call.
 * Prefetch: the rows of an A panel are short streams (1 KB each) that the hardware prefetchers barely catch, and
 * conv2d's weight comes from memory, so each block prefetches the next panel into L2 while it works on one; linear
 * also prefetches its next piece of x, and im2col the next channel's rows of x.
 *
 * Weights held as fp16 (--precision fp16) are packed in the same layouts with half the bytes and widened (exactly,
 * vcvtph2ps) into the thread's scratch just before use: conv2d's A panel chunk (MR x KC) before the strips pass
 * it, linear's block of B strips (KC x COLS) before the block's panels pass it. Each widening is used for a
 * whole block of products (well under 1% of the time) and the arithmetic is float32 as for float32 weights.
 *
 * The im2col matrix orders k as PyTorch's weight does: k = (ci * kh + dy) * kw + dx, so pack_conv_weight is
 * w.reshape(Cout, K) cut into panels.
 */
#ifndef SDCLI_F32_GEMM_H
#define SDCLI_F32_GEMM_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu_level.h"

/* tile and block sizes (each may be set with -D when measuring others) */
#ifndef SDCLI_F32_MR
#define SDCLI_F32_MR 14 /* rows of a C tile: broadcast values of A */
#endif
#define SDCLI_F32_NR 32 /* columns of a C tile: two zmm registers of B */
#ifndef SDCLI_F32_KC
#define SDCLI_F32_KC 256 /* k per chunk: an A panel is MR x KC floats (14 KB, L1) */
#endif
#ifndef SDCLI_F32_KSUM
#define SDCLI_F32_KSUM 64 /* steps of k summed in the accumulators before they join the tile's sum (accuracy) */
#endif
#ifndef SDCLI_F32_COLS
#define SDCLI_F32_COLS 512 /* linear: columns of w.T per block: KC x COLS floats (512 KB, L2) */
#endif
#ifndef SDCLI_F32_ROWS
#define SDCLI_F32_ROWS 280 /* linear: rows of x per block (20 panels), packed once */
#endif
#ifndef SDCLI_F32_PIXELS
#define SDCLI_F32_PIXELS 512 /* conv2d: output pixels per task at most: KC x PIXELS floats of im2col (L2) */
#endif

static inline ptrdiff_t sdcli_f32_min(ptrdiff_t a, ptrdiff_t b) { return a < b ? a : b; }
static inline ptrdiff_t sdcli_f32_max(ptrdiff_t a, ptrdiff_t b) { return a > b ? a : b; }

static int sdcli_f32_max_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

/* What one thread keeps between its tasks. The buffers stay with the thread between calls (OpenMP reuses its
 * threads), growing to the largest size asked for: a fresh allocation of a few MB per call costs page faults
 * comparable to a small convolution. At most SDCLI_F32_ROWS x KC floats for linear (300 KB) and KC x
 * SDCLI_F32_PIXELS for conv2d (512 KB). */
typedef struct {
    float *a;               /* linear: one chunk of the thread's block of rows of x as A panels;
                               conv2d with fp16 weights: one widened chunk of a weight panel (MR x KC) */
    float *panel;           /* conv2d: one chunk of the im2col matrix of a block of pixels as B strips;
                               linear with fp16 weights: one widened block of strips of w.T (KC x COLS) */
    ptrdiff_t *segments;    /* conv2d: (pixels, 4) the block's runs of pixels within one output row */
    size_t a_bytes, panel_bytes, segment_bytes;
} sdcli_f32_scratch;

#if defined(__GNUC__) || defined(__clang__)
#define SDCLI_F32_THREAD_LOCAL __thread
#else
#define SDCLI_F32_THREAD_LOCAL _Thread_local
#endif

static SDCLI_F32_THREAD_LOCAL sdcli_f32_scratch sdcli_f32_thread_scratch;

/* buffer *p of *have bytes grown to at least `want` bytes (contents not kept); 0 when out of memory */
static int sdcli_f32_reserve(void **p, size_t *have, size_t want) {
    if (*have >= want && *p != NULL) return 1;
    free(*p);
    *have = 0;
    if (posix_memalign(p, 64, want > 64 ? want : 64) != 0) {
        *p = NULL;
        return 0;
    }
    *have = want;
    return 1;
}

/* this thread's scratch with room for a_floats, panel_floats and the runs of `pixels` pixels; NULL when out of
 * memory */
static sdcli_f32_scratch *sdcli_f32_scratch_get(size_t a_floats, size_t panel_floats, size_t pixels) {
    sdcli_f32_scratch *s = &sdcli_f32_thread_scratch;
    if (!sdcli_f32_reserve((void **)&s->a, &s->a_bytes, a_floats * sizeof(float)) ||
        !sdcli_f32_reserve((void **)&s->panel, &s->panel_bytes, panel_floats * sizeof(float)) ||
        !sdcli_f32_reserve((void **)&s->segments, &s->segment_bytes, pixels * 4 * sizeof(ptrdiff_t)))
        return NULL;
    return s;
}

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && !defined(SDCLI_BASELINE_ONLY)
#define SDCLI_F32_X86 1
#include <immintrin.h>
#define SDCLI_F32_TARGET __attribute__((target("avx512f,avx512dq,avx2,fma")))
#define SDCLI_F32_INLINE static inline __attribute__((always_inline))
#endif

#ifdef SDCLI_F32_X86

/* 1 when the CPU level (the CPU's best, capped by SDCLI_CPU_LEVEL) has AVX-512F and AVX-512DQ, else 0 */
static int sdcli_f32_available(void) { return sdcli_cpu_level() >= SDCLI_LEVEL_AVX512; }

static inline __mmask16 sdcli_f32_mask(ptrdiff_t count) {
    return count >= 16 ? (__mmask16)0xffff : count <= 0 ? (__mmask16)0 : (__mmask16)((1u << count) - 1);
}

/* dst[0:count] = the fp16 values src[0:count] as float32 (exact) */
SDCLI_F32_TARGET static void sdcli_f32_widen(const uint16_t *src, float *dst, ptrdiff_t count) {
    ptrdiff_t i = 0;
    for (; i + 16 <= count; i += 16)
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + i))));
    if (i < count) { /* the tail through a zeroed copy (a masked 16-bit load needs AVX512BW) */
        uint16_t tail[16] = {0};
        memcpy(tail, src + i, (size_t)(count - i) * sizeof(uint16_t));
        const __m512 values = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)tail));
        _mm512_mask_storeu_ps(dst + i, sdcli_f32_mask(count - i), values);
    }
}

/* ------------------------------------------------------------------------------------------ the microkernel */

/* One part of a tile's sum: A (`rows` rows KC apart, kc of k) @ B (kc rows of NR), kc <= KSUM, plus the sum of
 * the parts before it held in `parts` (when `earlier`). Unless `last`, the sum goes back to `parts` (on the stack,
 * in L1). The last part writes C[0:mr, 0:nr] = (C if accumulate, else 0) + the sum, then plus bias_row[r] (per
 * row) and bias_col[j] (per column) when add_bias, either NULL for none; mr <= rows <= MR, nr <= NR. Its C lines
 * are asked for at its start and added after its sum. `rows` is a constant where this is inlined: MR for whole
 * panels, mr for the last panel of a matrix, whose rows past m are then not computed at all (a Cout of 128 is 9
 * panels and 2 rows: the 10th panel cost as much as the others, 8% of the product). Each row's sum is the same
 * whatever the rows computed beside it. */
SDCLI_F32_TARGET SDCLI_F32_INLINE void sdcli_f32_tile_part(const float *a, const float *b, ptrdiff_t kc,
                                                           __m512 parts[][2], int earlier, int last, float *c,
                                                           ptrdiff_t ldc, int mr, int nr, int accumulate, int add_bias,
                                                           const float *bias_row, const float *bias_col,
                                                           const int rows) {
    enum { MR = SDCLI_F32_MR, KC = SDCLI_F32_KC };
    __m512 acc[MR][2];
    if (last) {
        for (int r = 0; r < mr; r++) {
            _mm_prefetch((const char *)(c + r * ldc), _MM_HINT_T0);
            _mm_prefetch((const char *)(c + r * ldc + 16), _MM_HINT_T0);
        }
    }
#pragma GCC unroll 14
    for (int r = 0; r < rows; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (ptrdiff_t k = 0; k < kc; k++, a++, b += SDCLI_F32_NR) {
        const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
#pragma GCC unroll 14
        for (int r = 0; r < rows; r++) {
            const __m512 av = _mm512_set1_ps(a[r * KC]);
            acc[r][0] = _mm512_fmadd_ps(av, b0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(av, b1, acc[r][1]);
        }
    }
    if (earlier) {
#pragma GCC unroll 14
        for (int r = 0; r < rows; r++) {
            acc[r][0] = _mm512_add_ps(parts[r][0], acc[r][0]);
            acc[r][1] = _mm512_add_ps(parts[r][1], acc[r][1]);
        }
    }
    if (!last) {
#pragma GCC unroll 14
        for (int r = 0; r < rows; r++) parts[r][0] = acc[r][0], parts[r][1] = acc[r][1];
        return;
    }
    const __mmask16 m0 = sdcli_f32_mask(nr), m1 = sdcli_f32_mask(nr - 16);
    __m512 col0 = _mm512_setzero_ps(), col1 = _mm512_setzero_ps();
    if (add_bias && bias_col != NULL) {
        col0 = _mm512_maskz_loadu_ps(m0, bias_col);
        col1 = _mm512_maskz_loadu_ps(m1, bias_col + 16);
    }
#pragma GCC unroll 14
    for (int r = 0; r < rows; r++) {
        if (r >= mr) break;
        float *row = c + r * ldc;
        __m512 sum0 = acc[r][0], sum1 = acc[r][1];
        if (accumulate) {
            sum0 = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, row), sum0);
            sum1 = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, row + 16), sum1);
        }
        if (add_bias) {
            __m512 bias0 = col0, bias1 = col1;
            if (bias_row != NULL) {
                bias0 = _mm512_add_ps(col0, _mm512_set1_ps(bias_row[r]));
                bias1 = _mm512_add_ps(col1, _mm512_set1_ps(bias_row[r]));
            }
            sum0 = _mm512_add_ps(sum0, bias0);
            sum1 = _mm512_add_ps(sum1, bias1);
        }
        _mm512_mask_storeu_ps(row, m0, sum0);
        _mm512_mask_storeu_ps(row + 16, m1, sum1);
    }
}

/* C[0:mr, 0:nr] = (C if accumulate, else 0) + A (`rows` rows KC apart, kc of k) @ B (kc rows of NR), then plus
 * the bias (see sdcli_f32_tile_part) when add_bias; mr <= rows <= MR, nr <= NR. The sum over k runs in parts of at
 * most KSUM steps, each added to the sum of those before it. */
SDCLI_F32_TARGET SDCLI_F32_INLINE void sdcli_f32_tile_rows(const float *a, const float *b, ptrdiff_t kc, float *c,
                                                           ptrdiff_t ldc, int mr, int nr, int accumulate, int add_bias,
                                                           const float *bias_row, const float *bias_col,
                                                           const int rows) {
    __m512 parts[SDCLI_F32_MR][2];
    ptrdiff_t k = 0;
    do {
        const ptrdiff_t steps = sdcli_f32_min(SDCLI_F32_KSUM, kc - k);
        sdcli_f32_tile_part(a + k, b + k * SDCLI_F32_NR, steps, parts, k > 0, k + steps >= kc, c, ldc, mr, nr,
                            accumulate, add_bias, bias_row, bias_col, rows);
        k += steps;
    } while (k < kc);
}

/* sdcli_f32_tile_rows for all MR rows of a panel, or for only the mr rows of a matrix's last panel (a constant in
 * each case, for which the loops over the rows unroll). */
SDCLI_F32_TARGET static void sdcli_f32_tile(const float *a, const float *b, ptrdiff_t kc, float *c, ptrdiff_t ldc,
                                            int mr, int nr, int accumulate, int add_bias, const float *bias_row,
                                            const float *bias_col) {
    add_bias = add_bias && (bias_row != NULL || bias_col != NULL);
    switch (mr) {
#define SDCLI_F32_ROWS_CASE(n)                                                                                     \
    case n:                                                                                                        \
        sdcli_f32_tile_rows(a, b, kc, c, ldc, mr, nr, accumulate, add_bias, bias_row, bias_col,                    \
                            (n) < SDCLI_F32_MR ? (n) : SDCLI_F32_MR);                                              \
        break;
        SDCLI_F32_ROWS_CASE(1) SDCLI_F32_ROWS_CASE(2) SDCLI_F32_ROWS_CASE(3) SDCLI_F32_ROWS_CASE(4)
        SDCLI_F32_ROWS_CASE(5) SDCLI_F32_ROWS_CASE(6) SDCLI_F32_ROWS_CASE(7) SDCLI_F32_ROWS_CASE(8)
        SDCLI_F32_ROWS_CASE(9) SDCLI_F32_ROWS_CASE(10) SDCLI_F32_ROWS_CASE(11) SDCLI_F32_ROWS_CASE(12)
        SDCLI_F32_ROWS_CASE(13)
#undef SDCLI_F32_ROWS_CASE
    default:
        sdcli_f32_tile_rows(a, b, kc, c, ldc, mr, nr, accumulate, add_bias, bias_row, bias_col, SDCLI_F32_MR);
    }
}

/* One chunk of k: C[0:m, 0:n] = (C if accumulate, else 0) + A @ B, plus the bias when add_bias (the last chunk). a: the chunk of the first panel, panels a_stride values apart,
 * float32, or fp16 (uint16) when a_widened is not NULL: each panel's chunk is then widened into a_widened (MR x KC
 * floats) before its strips pass; b:
 * the chunk of the first strip, strips b_stride floats apart. Column j of C is at c + (j / hw) * image_stride +
 * j % hw (conv2d: a block of whole images, hw a multiple of NR; otherwise hw >= n). The panels outermost: one
 * stays in L1 while the strips (in L2) pass. Along the way, the next panel and the pf_rows x pf_cols floats at
 * pf (rows pf_stride apart: what the caller reads next, linear's next piece of x) are prefetched into L2, a share
 * before each tile. */
SDCLI_F32_TARGET static void sdcli_f32_block(const void *a, ptrdiff_t a_stride, float *a_widened, ptrdiff_t m,
                                             const float *b, ptrdiff_t b_stride, ptrdiff_t n, ptrdiff_t kc, float *c,
                                             ptrdiff_t ldc, ptrdiff_t hw, ptrdiff_t image_stride, int accumulate,
                                             int add_bias, const float *bias_row, const float *bias_col,
                                             const float *pf, ptrdiff_t pf_rows, ptrdiff_t pf_cols,
                                             ptrdiff_t pf_stride) {
    const ptrdiff_t value_bytes = a_widened != NULL ? 2 : 4, row_bytes = SDCLI_F32_KC * value_bytes;
    const ptrdiff_t strips = (n + SDCLI_F32_NR - 1) / SDCLI_F32_NR, row_lines = (kc * value_bytes + 63) / 64;
    const ptrdiff_t lines = SDCLI_F32_MR * row_lines; /* 64-byte lines of a panel's chunk */
    const ptrdiff_t tiles = (m + SDCLI_F32_MR - 1) / SDCLI_F32_MR * strips;
    const ptrdiff_t pf_row_lines = (pf_cols + 15) / 16, pf_lines = pf_rows * pf_row_lines;
    ptrdiff_t tile = 0, pf_line = 0, pf_row = 0, pf_column = 0; /* the next line of pf to prefetch */
    for (ptrdiff_t i = 0; i < m; i += SDCLI_F32_MR) {
        const char *panel = (const char *)a + i / SDCLI_F32_MR * a_stride * value_bytes;
        const char *next = i + SDCLI_F32_MR < m ? panel + a_stride * value_bytes : NULL;
        const int mr = (int)sdcli_f32_min(SDCLI_F32_MR, m - i);
        const float *ai = (const float *)panel;
        if (a_widened != NULL) { /* the rows of the chunk, KC apart in both layouts */
            for (int r = 0; r < mr; r++)
                sdcli_f32_widen((const uint16_t *)panel + r * SDCLI_F32_KC, a_widened + r * SDCLI_F32_KC, kc);
            ai = a_widened;
        }
        ptrdiff_t line = 0, row = 0, column = 0; /* the next line of the next panel to prefetch: (row, byte) */
        for (ptrdiff_t j = 0; j < n; j += SDCLI_F32_NR) {
            /* the next panel into L2, a share with each strip: its rows are short streams that the hardware
               prefetchers barely catch (the weight of conv2d comes from memory) */
            for (const ptrdiff_t end = next != NULL ? (j / SDCLI_F32_NR + 1) * lines / strips : 0; line < end; line++) {
                _mm_prefetch(next + row * row_bytes + column, _MM_HINT_T1);
                if ((column += 64) == 64 * row_lines) column = 0, row++;
            }
            for (const ptrdiff_t end = (tile + 1) * pf_lines / tiles; pf_line < end; pf_line++) { /* pf: a share */
                _mm_prefetch((const char *)(pf + pf_row * pf_stride + pf_column), _MM_HINT_T1);
                if ((pf_column += 16) == 16 * pf_row_lines) pf_column = 0, pf_row++;
            }
            tile++;
            sdcli_f32_tile(ai, b + j / SDCLI_F32_NR * b_stride, kc, c + j / hw * image_stride + j % hw + i * ldc, ldc,
                           mr, (int)sdcli_f32_min(SDCLI_F32_NR, n - j), accumulate, add_bias,
                           bias_row != NULL ? bias_row + i : NULL, bias_col != NULL ? bias_col + j : NULL);
        }
    }
}

/* --------------------------------------------------------------------------------------------------- linear */

/* Rows 0 .. rows - 1, columns k0 .. k0 + kc - 1 of x (rows k floats apart) as the A panels of one chunk: (panels,
 * MR, KC), zeros past kc and past the rows. */
SDCLI_F32_TARGET static void sdcli_f32_pack_rows(const float *x, ptrdiff_t k, ptrdiff_t rows, ptrdiff_t k0,
                                                 ptrdiff_t kc, float *a) {
    const ptrdiff_t padded = (rows + SDCLI_F32_MR - 1) / SDCLI_F32_MR * SDCLI_F32_MR;
    for (ptrdiff_t r = 0; r < padded; r++) {
        float *dst = a + r * SDCLI_F32_KC; /* panel r / MR, row r % MR */
        const float *src = x + r * k + k0;
        const ptrdiff_t count = r < rows ? kc : 0;
        for (ptrdiff_t j = 0; j < SDCLI_F32_KC; j += 16)
            _mm512_storeu_ps(dst + j, _mm512_maskz_loadu_ps(sdcli_f32_mask(count - j), src + j));
    }
}

/* Task of linear: out[r0:r1, j0:j1] of out (m, n) = x (m, k) @ w.T + bias, w packed as strips (np/NR, k, NR) of
 * float32, or of fp16 when w_half (each block of strips is then widened into s->panel before use);
 * r0 a multiple of MR, j0 of NR. The rows go in blocks of about equal size, at most SDCLI_F32_ROWS; per block, k
 * chunk by chunk: the chunk of x packed as A panels (in L2), times w in blocks of SDCLI_F32_COLS columns, while
 * the next chunk of x is prefetched. bias: (n) or NULL. */
SDCLI_F32_TARGET static void sdcli_f32_linear_task(const float *x, ptrdiff_t k, const void *w, int w_half,
                                                   const float *bias, float *out, ptrdiff_t n, ptrdiff_t r0,
                                                   ptrdiff_t r1, ptrdiff_t j0, ptrdiff_t j1, sdcli_f32_scratch *s) {
    const ptrdiff_t chunks = (k + SDCLI_F32_KC - 1) / SDCLI_F32_KC;
    const ptrdiff_t blocks = (r1 - r0 + SDCLI_F32_ROWS - 1) / SDCLI_F32_ROWS;
    const ptrdiff_t block_rows = ((r1 - r0 + blocks - 1) / blocks + SDCLI_F32_MR - 1) / SDCLI_F32_MR * SDCLI_F32_MR;
    const ptrdiff_t calls = (j1 - j0 + SDCLI_F32_COLS - 1) / SDCLI_F32_COLS; /* per chunk */
    for (ptrdiff_t i0 = r0; i0 < r1; i0 += block_rows) {
        const ptrdiff_t rows = sdcli_f32_min(block_rows, r1 - i0);
        ptrdiff_t ch = 0;
        do { /* at least once: with k = 0, out = bias */
            const ptrdiff_t k0 = ch * SDCLI_F32_KC, kc = sdcli_f32_min(SDCLI_F32_KC, k - k0);
            /* the piece of x after this one: the next chunk, or the first of the next block */
            const int last = ch + 1 >= chunks;
            const ptrdiff_t pf_rows = last ? sdcli_f32_max(0, sdcli_f32_min(block_rows, r1 - i0 - rows)) : rows;
            const ptrdiff_t pf_k0 = last ? 0 : k0 + kc, pf_cols = sdcli_f32_min(SDCLI_F32_KC, k - pf_k0);
            const float *pf = x + (last ? i0 + rows : i0) * k + pf_k0;
            sdcli_f32_pack_rows(x + i0 * k, k, rows, k0, kc, s->a);
            for (ptrdiff_t jc = j0, call = 0; jc < j1; jc += SDCLI_F32_COLS, call++) {
                const ptrdiff_t cols = sdcli_f32_min(SDCLI_F32_COLS, j1 - jc);
                const ptrdiff_t p0 = call * pf_rows / calls, p1 = (call + 1) * pf_rows / calls; /* its share */
                const float *b = (const float *)w + jc * k + k0 * SDCLI_F32_NR;
                ptrdiff_t b_stride = k * SDCLI_F32_NR;
                if (w_half) { /* the block's strips, rows k0 .. k0 + kc - 1, widened: (strips, KC, NR) */
                    for (ptrdiff_t t = 0; t < (cols + SDCLI_F32_NR - 1) / SDCLI_F32_NR; t++)
                        sdcli_f32_widen((const uint16_t *)w + (jc + t * SDCLI_F32_NR) * k + k0 * SDCLI_F32_NR,
                                        s->panel + t * SDCLI_F32_KC * SDCLI_F32_NR, kc * SDCLI_F32_NR);
                    b = s->panel;
                    b_stride = SDCLI_F32_KC * SDCLI_F32_NR;
                }
                sdcli_f32_block(s->a, SDCLI_F32_MR * SDCLI_F32_KC, NULL, rows, b, b_stride, cols, kc,
                                out + i0 * n + jc, n, cols, 0, ch > 0, ch + 1 >= chunks, NULL,
                                bias != NULL ? bias + jc : NULL, pf + p0 * k, p1 - p0, pf_cols, k);
            }
        } while (++ch < chunks);
    }
}

/* --------------------------------------------------------------------------------------------------- conv2d */

/* dst[0:count] = src[0], src[stride], ... (count <= 16) */
SDCLI_F32_TARGET SDCLI_F32_INLINE void sdcli_f32_copy16(float *dst, const float *src, ptrdiff_t count,
                                                         ptrdiff_t stride) {
    const __mmask16 mask = sdcli_f32_mask(count);
    if (stride == 1) {
        _mm512_mask_storeu_ps(dst, mask, _mm512_maskz_loadu_ps(mask, src));
    } else if (stride == 2) {
        const ptrdiff_t span = 2 * count - 1;
        const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
        const __m512 lo = _mm512_maskz_loadu_ps(sdcli_f32_mask(span), src);
        const __m512 hi = _mm512_maskz_loadu_ps(sdcli_f32_mask(span - 16), src + 16);
        _mm512_mask_storeu_ps(dst, mask, _mm512_permutex2var_ps(lo, even, hi));
    } else {
        for (ptrdiff_t t = 0; t < count; t++) dst[t] = src[t * stride];
    }
}

/* columns q .. q + count - 1 of row kk of the panel (strips of NR columns, KC rows) = src[0], src[stride], ...
 * (src NULL: zeros) */
SDCLI_F32_TARGET SDCLI_F32_INLINE void sdcli_f32_put(float *panel, ptrdiff_t kk, ptrdiff_t q, const float *src,
                                                      ptrdiff_t count, ptrdiff_t stride) {
    while (count > 0) {
        const ptrdiff_t piece = sdcli_f32_min(16 - q % 16, count); /* within one half of a strip row */
        float *dst = panel + q / SDCLI_F32_NR * (SDCLI_F32_KC * SDCLI_F32_NR) + kk * SDCLI_F32_NR + q % SDCLI_F32_NR;
        if (src == NULL) {
            _mm512_mask_storeu_ps(dst, sdcli_f32_mask(piece), _mm512_setzero_ps());
        } else {
            sdcli_f32_copy16(dst, src, piece, stride);
            src += piece * stride;
        }
        q += piece;
        count -= piece;
    }
}

/* The runs of output pixels pix0 .. pix0 + n - 1 (row-major over (ho, wo)) within one output row: segments[4 i ..]
 * = (first column q, length, oy, first ox). Returns the number of runs. */
static ptrdiff_t sdcli_f32_segments(ptrdiff_t wo, ptrdiff_t pix0, ptrdiff_t n, ptrdiff_t *segments) {
    ptrdiff_t count = 0, oy = pix0 / wo, ox = pix0 % wo;
    for (ptrdiff_t q = 0; q < n; count++, oy++, ox = 0) {
        const ptrdiff_t length = sdcli_f32_min(wo - ox, n - q);
        ptrdiff_t *seg = segments + 4 * count;
        seg[0] = q, seg[1] = length, seg[2] = oy, seg[3] = ox;
        q += length;
    }
    return count;
}

/* Rows k0 .. k0 + kc - 1 of the im2col matrix of one image x (cin, h, w) at the block's output pixels (the runs
 * of sdcli_f32_segments, n pixels in all) as B strips (KC rows of NR columns) in `panel`: panel row kk, column
 * q = x[ci, oy * stride - pad + dy, ox * stride - pad + dx] (zero outside the image) with k0 + kk = (ci * kh + dy)
 * * kw + dx and (oy, ox) the pixel of column q. The columns of the last strip past n are zero. */
SDCLI_F32_TARGET static void sdcli_f32_im2col(const float *x, ptrdiff_t cin, ptrdiff_t h, ptrdiff_t w,
                                              ptrdiff_t kh, ptrdiff_t kw, ptrdiff_t stride, ptrdiff_t pad,
                                              const ptrdiff_t *segments, ptrdiff_t runs, ptrdiff_t n, ptrdiff_t k0,
                                              ptrdiff_t kc, float *panel) {
    const ptrdiff_t n_pad = (n + SDCLI_F32_NR - 1) / SDCLI_F32_NR * SDCLI_F32_NR;
    /* the rows of a channel the block reads, prefetched a channel ahead (the first read of x is from memory) */
    const ptrdiff_t iy_lo = sdcli_f32_max(0, segments[2] * stride - pad);
    const ptrdiff_t iy_hi = sdcli_f32_min(h, segments[4 * (runs - 1) + 2] * stride - pad + kh);
    const ptrdiff_t span_lines = iy_hi > iy_lo ? ((iy_hi - iy_lo) * w * (ptrdiff_t)sizeof(float) + 63) / 64 : 0;
    ptrdiff_t dx = k0 % kw, dy = k0 / kw % kh, ci = k0 / (kw * kh); /* of row kk, counted up */
    for (ptrdiff_t kk = 0; kk < kc; kk++) {
        const float *plane = x + ci * h * w;
        if ((kk == 0 || (dx == 0 && dy == 0)) && ci + 1 < cin)
            for (ptrdiff_t l = 0; l < span_lines; l++)
                _mm_prefetch((const char *)(plane + h * w + iy_lo * w) + 64 * l, _MM_HINT_T0);
        /* ox in [ox_lo, ox_hi) reads inside the row: 0 <= ox * stride + shift < w */
        const ptrdiff_t shift = dx - pad;
        const ptrdiff_t ox_lo = shift >= 0 ? 0 : (-shift + stride - 1) / stride;
        const ptrdiff_t ox_hi = w - shift <= 0 ? 0 : (w - shift + stride - 1) / stride;
        for (ptrdiff_t r = 0; r < runs; r++) {
            const ptrdiff_t *seg = segments + 4 * r;
            const ptrdiff_t q = seg[0], count = seg[1], ox0 = seg[3], iy = seg[2] * stride - pad + dy;
            if (iy < 0 || iy >= h) {
                sdcli_f32_put(panel, kk, q, NULL, count, 1);
            } else {
                /* dst[t], t in [0, count): ox = ox0 + t; inside for t in [lo, hi) */
                const ptrdiff_t lo = sdcli_f32_min(count, sdcli_f32_max(0, ox_lo - ox0));
                const ptrdiff_t hi = sdcli_f32_max(lo, sdcli_f32_min(count, ox_hi - ox0));
                if (lo > 0) sdcli_f32_put(panel, kk, q, NULL, lo, 1);
                sdcli_f32_put(panel, kk, q + lo, plane + iy * w + (ox0 + lo) * stride + shift, hi - lo, stride);
                if (hi < count) sdcli_f32_put(panel, kk, q + hi, NULL, count - hi, 1);
            }
        }
        if (n < n_pad) sdcli_f32_put(panel, kk, n, NULL, n_pad - n, 1);
        if (++dx == kw) {
            dx = 0;
            if (++dy == kh) {
                dy = 0;
                ci++;
            }
        }
    }
}

/* Task `task` of conv2d on x (batch, cin, h, w) -> out (batch, cout, ho, wo): out[b][:, pixels] = weight (cout, K)
 * @ im2col(x[b]) (K, pixels) + bias. weight: A panels (cout_pad/MR, chunks, MR, KC), float32 or, when
 * weight_half, fp16 (widened a panel chunk at a time into s->a). Tasks are (block of output
 * pixels, slice of `cslice` output channels, a multiple of MR), the slices innermost. A block is either at most
 * `pixels` pixels of one image (`blocks` blocks per image, images = 1) or `images` whole images (blocks = 1;
 * ho wo a multiple of NR, so that no strip of NR columns straddles two images), for small images: then the
 * weight is read once for all of them. bias: (cout) or NULL. */
SDCLI_F32_TARGET static void sdcli_f32_conv_task(const float *x, ptrdiff_t batch, ptrdiff_t cin, ptrdiff_t h,
                                                 ptrdiff_t w, const void *weight, int weight_half,
                                                 ptrdiff_t cout, ptrdiff_t kh,
                                                 ptrdiff_t kw, ptrdiff_t stride, ptrdiff_t pad, const float *bias,
                                                 float *out, ptrdiff_t ho, ptrdiff_t wo, ptrdiff_t pixels,
                                                 ptrdiff_t blocks, ptrdiff_t images, ptrdiff_t cslice,
                                                 ptrdiff_t cslices, ptrdiff_t task, sdcli_f32_scratch *s) {
    const ptrdiff_t hw_out = ho * wo, k = cin * kh * kw, chunks = (k + SDCLI_F32_KC - 1) / SDCLI_F32_KC;
    const ptrdiff_t block = task / cslices, image = block / blocks * images, pix0 = block % blocks * pixels;
    const ptrdiff_t count = sdcli_f32_min(images, batch - image); /* images in the block */
    const ptrdiff_t n = count > 1 ? count * hw_out : sdcli_f32_min(pixels, hw_out - pix0);
    const ptrdiff_t c0 = task % cslices * cslice, crows = sdcli_f32_min(cslice, cout - c0);
    const ptrdiff_t a_stride = chunks * SDCLI_F32_MR * SDCLI_F32_KC, strip = SDCLI_F32_KC * SDCLI_F32_NR;
    float *c = out + (image * cout + c0) * hw_out + pix0;
    const ptrdiff_t runs = sdcli_f32_segments(wo, count > 1 ? 0 : pix0, count > 1 ? hw_out : n, s->segments);
    ptrdiff_t ch = 0;
    do { /* at least once: with k = 0, out = bias */
        const ptrdiff_t k0 = ch * SDCLI_F32_KC, kc = sdcli_f32_min(SDCLI_F32_KC, k - k0);
        if (count > 1)
            for (ptrdiff_t i = 0; i < count; i++)
                sdcli_f32_im2col(x + (image + i) * cin * h * w, cin, h, w, kh, kw, stride, pad, s->segments, runs,
                                 hw_out, k0, kc, s->panel + i * hw_out / SDCLI_F32_NR * strip);
        else
            sdcli_f32_im2col(x + image * cin * h * w, cin, h, w, kh, kw, stride, pad, s->segments, runs, n, k0, kc,
                             s->panel);
        const ptrdiff_t first = c0 / SDCLI_F32_MR * a_stride + ch * SDCLI_F32_MR * SDCLI_F32_KC; /* values */
        sdcli_f32_block(weight_half ? (const void *)((const uint16_t *)weight + first)
                                    : (const void *)((const float *)weight + first),
                        a_stride, weight_half ? s->a : NULL, crows, s->panel, strip, n, kc, c, hw_out,
                        count > 1 ? hw_out : n, cout * hw_out, ch > 0, ch + 1 >= chunks,
                        bias != NULL ? bias + c0 : NULL, NULL, NULL, 0, 0, 0);
    } while (++ch < chunks);
}

#else /* no AVX-512 build: f32_kernels.pyx checks sdcli_f32_available() and never calls the tasks */

static int sdcli_f32_available(void) { return 0; }

static void sdcli_f32_linear_task(const float *x, ptrdiff_t k, const void *w, int w_half, const float *bias,
                                  float *out, ptrdiff_t n, ptrdiff_t r0, ptrdiff_t r1, ptrdiff_t j0, ptrdiff_t j1,
                                  sdcli_f32_scratch *s) {
    (void)x, (void)k, (void)w, (void)w_half, (void)bias, (void)out, (void)n, (void)r0, (void)r1, (void)j0, (void)j1,
        (void)s;
}

static void sdcli_f32_conv_task(const float *x, ptrdiff_t batch, ptrdiff_t cin, ptrdiff_t h, ptrdiff_t w,
                                const void *weight, int weight_half, ptrdiff_t cout, ptrdiff_t kh, ptrdiff_t kw,
                                ptrdiff_t stride, ptrdiff_t pad, const float *bias, float *out, ptrdiff_t ho,
                                ptrdiff_t wo, ptrdiff_t pixels, ptrdiff_t blocks, ptrdiff_t images, ptrdiff_t cslice,
                                ptrdiff_t cslices, ptrdiff_t task, sdcli_f32_scratch *s) {
    (void)x, (void)batch, (void)images, (void)cin, (void)h, (void)w, (void)weight, (void)weight_half, (void)cout,
        (void)kh, (void)kw, (void)stride, (void)pad, (void)bias, (void)out, (void)ho, (void)wo, (void)pixels,
        (void)blocks, (void)cslice, (void)cslices, (void)task, (void)s;
}

#endif /* SDCLI_F32_X86 */

#endif /* SDCLI_F32_GEMM_H */
