/* bfloat16 matrix products with float32 accumulation, for bf16_kernels.pyx.
 *
 * One product at three levels, chosen at run time:
 *   SDCLI_BF16_AMX       Intel AMX (amx_tile + amx_bf16): TDPBF16PS on 16 x 16 float32 tiles
 *   SDCLI_BF16_AVX512    AVX512_BF16: VDPBF16PS, 16 float32 lanes, each adding a pair of bf16 products
 *   SDCLI_BF16_PORTABLE  plain C loops over the same layouts (correctness only)
 * Each level needs the one below it: AMX is used only where AVX512_BF16 is present too (true of every CPU with
 * AMX), since its helpers (bf16 conversion, im2col) are the AVX-512 ones.
 *
 * Layouts (bf16 values are their uint16 bit patterns):
 *   A  rows of kp values in groups of 32 (one AMX tile row: 32 bf16 = 64 bytes), kp a multiple of 32, the values
 *      past the true K zero: element (i, k) at a[i * lda + (k / 32) * a_ks + k % 32]. Two cases:
 *        row-major (m, kp):         lda = kp, a_ks = 32       (the convolution weight)
 *        blocked (kp/32, m, 32):    lda = 32, a_ks = m * 32   (linear's rows of x: the two A tiles of a step of 32
 *                                                              in k are then 2 KB in one piece)
 *      A 16 x 32 A tile loads straight from either with a stride of lda * 2 bytes.
 *   B  VNNI pairs in strips of 32 columns: (n/32, kp/2, 32, 2), B[s, p, j, t] = the (2p + t, 32s + j) element of
 *      the k x n operand. A strip row (32 pairs) is 128 bytes: two 16 (pairs) x 16 (columns) B tiles load from it
 *      with a stride of 128 bytes, two AVX-512 registers hold it, and a strip is contiguous, so walking down k
 *      reads memory in order (with (kp/2, n, 2) rows a power of two apart map onto a few cache sets: half the speed
 *      at n = 1024).
 *   C  (m, n) float32, ldc floats apart.
 * The product (sdcli_bf16_gemm) is  C = init + A @ B  with m and n multiples of 32 (the callers pad): its A rows
 * and B columns are read up to those sizes. init is a float32 array read as
 * init[i * init_rs + (j - j % 16) * init_cs + j % 16] for C element (i, j), which covers the three uses:
 *   bias of a linear layer, bias[j]:   init = bias, init_rs = 0, init_cs = 1
 *   bias of a convolution, bias[i]:    init = (m, 16) rows of bias[i] repeated, init_rs = 16, init_cs = 0
 *   accumulation into C itself:        init = C, init_rs = ldc, init_cs = 1
 *
 * Blocking (all levels). The unit of work is a 32 x 32 block of C over all of k (or a chunk of at most
 * SDCLI_BF16_KC):
 *   AMX     four C tiles (tmm0-3: rows 0-15 / 16-31 x columns 0-15 / 16-31), two A tiles (tmm4, tmm5: the two
 *           16-row halves x 32 of k) and two B tiles (tmm6, tmm7: 16 pairs x the two 16-column halves); per step
 *           of 32 in k, four tile loads and four TDPBF16PS. The C tiles start from init and are stored to C.
 *   AVX512  four register tiles of 8 rows x 32 columns (16 zmm accumulators): per pair of k, the two registers
 *           of the strip row and, per row, the pair of A broadcast to the 16 lanes.
 * Around it: the rows of A in blocks of SDCLI_BF16_A_BYTES (kept in L2), each block against every strip of B, a
 * strip against every row pair of the block, so a strip is read from memory once per block. Splitting k into
 * chunks would keep a strip's chunk in L1, but every chunk after the first reloads C, which measured slower: k is
 * split only past SDCLI_BF16_KC (chunks after the first add to C, init = C).
 * Each OpenMP thread that runs the AMX level calls sdcli_bf16_thread_begin (tile configuration: eight 16 x 64-byte
 * tiles) before its first product and sdcli_bf16_thread_end (tile release) after its last.
 *
 * Conversion float32 -> bf16 rounds to nearest even and keeps NaN a quiet NaN: the portable level bit for bit as
 * sdcli.io.safetensors.float32_to_bf16, the others with VCVTNE2PS2BF16, the same except that float32 denormals
 * become zero (the bf16 products treat bf16 denormals as zero anyway).
 *
 * The task functions at the end are the work of one parallel task of linear() and conv2d() in bf16_kernels.pyx:
 *   linear  a block of SDCLI_BF16_LINEAR_ROWS rows of x converted to the blocked A layout (once per block, kept
 *           by the thread for all its slices of columns), times the packed weight as B.
 *   conv2d  out[image] (cout, pixels) = weight (cout, K) @ im2col(x[image]) (K, pixels): the weight is A, a block
 *           of up to SDCLI_BF16_CONV_PIXELS columns (output pixels, across the images of the batch) of the im2col
 *           matrix is built as B strips, SDCLI_BF16_PANEL_K rows of k at a time, and C is the output itself.
 *
 * x86-64 with GCC or Clang gets all three levels (AMX on Linux only, where the kernel must grant the tile data
 * permission); anything else builds the portable level alone, as does SDCLI_BASELINE_ONLY (cpu_level.h). No -march
 * flags: the AVX-512 code is compiled for its target alone (function attributes), AMX goes through inline
 * assembly, and both are chosen at run time from the CPU level of cpu_level.h (the CPU's best, capped by
 * SDCLI_CPU_LEVEL): avx512_bf16 runs SDCLI_BF16_AVX512, amx SDCLI_BF16_AMX, anything lower the portable level.
 */
#ifndef SDCLI_BF16_GEMM_H
#define SDCLI_BF16_GEMM_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu_level.h"

enum { SDCLI_BF16_PORTABLE = 0, SDCLI_BF16_AVX512 = 1, SDCLI_BF16_AMX = 2 };

/* block sizes (each may be set with -D when measuring others) */
#ifndef SDCLI_BF16_KC
#define SDCLI_BF16_KC 2048                  /* k per chunk at most: each chunk after the first reloads C */
#endif
#ifndef SDCLI_BF16_A_BYTES
#define SDCLI_BF16_A_BYTES (512 * 1024)     /* rows of A per block: their chunk fits this (L2) */
#endif
#ifndef SDCLI_BF16_LINEAR_ROWS
#define SDCLI_BF16_LINEAR_ROWS 128          /* rows of x per task of linear(): converted once, reused by all of N */
#endif
#ifndef SDCLI_BF16_STREAM_BYTES
#define SDCLI_BF16_STREAM_BYTES (32 << 20) /* linear(): outputs at least this big go out with streaming stores */
#endif
#ifndef SDCLI_BF16_CONV_PIXELS
#define SDCLI_BF16_CONV_PIXELS 512          /* output pixels per task of conv2d() at most: the im2col panel's columns */
#endif
#ifndef SDCLI_BF16_PANEL_K
#define SDCLI_BF16_PANEL_K 2048             /* rows of k of the im2col panel at most (2 MB at 512 columns) */
#endif

#if defined(__GNUC__) || defined(__clang__)
#define SDCLI_BF16_INLINE static inline __attribute__((always_inline))
#else
#define SDCLI_BF16_INLINE static inline
#endif

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && !defined(SDCLI_BASELINE_ONLY)
#define SDCLI_BF16_X86 1
#include <immintrin.h>
#define SDCLI_BF16_AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))
#if defined(__linux__)
#define SDCLI_BF16_AMX_BUILD 1 /* cpu_level.h detects AMX on Linux only */
#endif
#endif

static inline ptrdiff_t sdcli_bf16_min(ptrdiff_t a, ptrdiff_t b) { return a < b ? a : b; }
static inline ptrdiff_t sdcli_bf16_round_up(ptrdiff_t a, ptrdiff_t to) { return (a + to - 1) / to * to; }

/* ------------------------------------------------------------------------------------------ CPU level */

/* The highest bf16 level this build has at the CPU level of cpu_level.h (the CPU's best, capped by
 * SDCLI_CPU_LEVEL; detecting AMX also obtains the kernel's permission for the tile data state). */
static int sdcli_bf16_cpu_level(void) {
#ifdef SDCLI_BF16_X86
    const int level = sdcli_cpu_level();
#ifdef SDCLI_BF16_AMX_BUILD
    if (level >= SDCLI_LEVEL_AMX) return SDCLI_BF16_AMX;
#endif
    if (level >= SDCLI_LEVEL_AVX512_BF16) return SDCLI_BF16_AVX512;
#endif
    return SDCLI_BF16_PORTABLE;
}

static int sdcli_bf16_max_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

/* -------------------------------------------------------------------------------------- bf16 conversion */

/* float32 -> bf16 bits, round to nearest even, NaN -> quiet NaN of its sign (float32_to_bf16 in safetensors.py) */
SDCLI_BF16_INLINE uint32_t sdcli_bf16_from_float(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const uint32_t quiet_nan = (u >> 16) | 0x40u;
    return (u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded;
}

SDCLI_BF16_INLINE float sdcli_bf16_to_float(uint16_t bits) {
    const uint32_t u = (uint32_t)bits << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* The A operand of linear(): x (rows, k), rows ldx floats apart, in bf16 as (kp/32, rows_pad, 32): the k-group g
 * of row r (32 values, 64 bytes) at a[g * rows_pad * 32 + r * 32], so that the two A tiles of one step of 32 in k
 * are 2 KB in one piece. Zeros past k and past rows. */
static void sdcli_bf16_pack_rows_portable(const float *x, ptrdiff_t ldx, ptrdiff_t rows, ptrdiff_t k, uint16_t *a,
                                          ptrdiff_t kp, ptrdiff_t rows_pad) {
    for (ptrdiff_t r = 0; r < rows_pad; r++)
        for (ptrdiff_t g = 0; g < kp / 32; g++) {
            uint16_t *dst = a + g * rows_pad * 32 + r * 32;
            for (ptrdiff_t j = 0; j < 32; j++) {
                const ptrdiff_t col = g * 32 + j;
                dst[j] = r < rows && col < k ? (uint16_t)sdcli_bf16_from_float(x[r * ldx + col]) : 0;
            }
        }
}

/* One pair row of B strips from two rows of k: out[(j / 32) * strip + j % 32] = (bf16(r1[j]) << 16) | bf16(r0[j])
 * for j < n, 0 for n <= j < n_pad (a multiple of 32); strip: uint32 elements from one strip to the next. r1 NULL
 * stands for a row of zeros (the padding past K). */
static void sdcli_bf16_pack_pairs_portable(const float *r0, const float *r1, ptrdiff_t n, uint32_t *out,
                                           ptrdiff_t n_pad, ptrdiff_t strip) {
    for (ptrdiff_t j = 0; j < n_pad; j++) {
        const uint32_t lo = j < n ? sdcli_bf16_from_float(r0[j]) : 0;
        const uint32_t hi = j < n && r1 != NULL ? sdcli_bf16_from_float(r1[j]) : 0;
        out[j / 32 * strip + j % 32] = hi << 16 | lo;
    }
}

#ifdef SDCLI_BF16_X86
/* The same with VCVTNE2PS2BF16 (AVX512_BF16): round to nearest even as above, except that float32 denormals become
 * zero (the bf16 products treat bf16 denormals as zero anyway, so only |x| just under 2^-126, which the software
 * rounding would carry up to 2^-126, gives a different product). */

/* 32 floats at x, the first `count` of them (0 to 32; the others zero), as 32 bf16 in order */
SDCLI_BF16_AVX512_TARGET SDCLI_BF16_INLINE __m512i sdcli_bf16_cvt32(const float *x, ptrdiff_t count) {
    if (count >= 32) return (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + 16), _mm512_loadu_ps(x));
    const __mmask16 lo = count <= 0 ? 0 : count >= 16 ? 0xffff : (__mmask16)((1u << count) - 1);
    const __mmask16 hi = count <= 16 ? 0 : (__mmask16)((1u << (count - 16)) - 1);
    return (__m512i)_mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi, x + 16), _mm512_maskz_loadu_ps(lo, x));
}

SDCLI_BF16_AVX512_TARGET static void sdcli_bf16_pack_rows_avx512(const float *x, ptrdiff_t ldx, ptrdiff_t rows,
                                                                 ptrdiff_t k, uint16_t *a, ptrdiff_t kp,
                                                                 ptrdiff_t rows_pad) {
    for (ptrdiff_t g = 0; g < kp / 32; g++)
        for (ptrdiff_t r = 0; r < rows_pad; r++)
            _mm512_storeu_si512(a + g * rows_pad * 32 + r * 32,
                                r < rows ? sdcli_bf16_cvt32(x + r * ldx + g * 32, k - g * 32) : _mm512_setzero_si512());
}

SDCLI_BF16_AVX512_TARGET static void sdcli_bf16_pack_pairs_avx512(const float *r0, const float *r1, ptrdiff_t n,
                                                                  uint32_t *out, ptrdiff_t n_pad,
                                                                  ptrdiff_t strip) {
    /* [r0[0..15] | r1[0..15]] (16-bit lanes) -> r0[0] r1[0] r0[1] r1[1] ...: the pairs */
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                                22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (ptrdiff_t j = 0; j < n_pad; j += 16) {
        const ptrdiff_t count = n - j >= 16 ? 16 : n - j > 0 ? n - j : 0;
        const __mmask16 mask = count == 16 ? 0xffff : (__mmask16)((1u << count) - 1);
        const __m512 v0 = _mm512_maskz_loadu_ps(mask, r0 + j);
        const __m512 v1 = r1 != NULL ? _mm512_maskz_loadu_ps(mask, r1 + j) : _mm512_setzero_ps();
        const __m512i halves = (__m512i)_mm512_cvtne2ps_pbh(v1, v0);
        _mm512_storeu_si512(out + j / 32 * strip + j % 32, _mm512_permutexvar_epi16(interleave, halves));
    }
}
#endif

static void sdcli_bf16_pack_rows(int level, const float *x, ptrdiff_t ldx, ptrdiff_t rows, ptrdiff_t k,
                                 uint16_t *a, ptrdiff_t kp, ptrdiff_t rows_pad) {
#ifdef SDCLI_BF16_X86
    if (level >= SDCLI_BF16_AVX512) {
        sdcli_bf16_pack_rows_avx512(x, ldx, rows, k, a, kp, rows_pad);
        return;
    }
#endif
    (void)level;
    sdcli_bf16_pack_rows_portable(x, ldx, rows, k, a, kp, rows_pad);
}

static void sdcli_bf16_pack_pairs(int level, const float *r0, const float *r1, ptrdiff_t n, uint32_t *out,
                                  ptrdiff_t n_pad, ptrdiff_t strip) {
#ifdef SDCLI_BF16_X86
    if (level >= SDCLI_BF16_AVX512) {
        sdcli_bf16_pack_pairs_avx512(r0, r1, n, out, n_pad, strip);
        return;
    }
#endif
    (void)level;
    sdcli_bf16_pack_pairs_portable(r0, r1, n, out, n_pad, strip);
}

/* ------------------------------------------------------------------------------- the 32 x 32 unit of work */

/* Every unit: C[0:32, 0:32] = init + A[0:32, 0:kc] @ B[0:kc/2, 0:32, 0:2], where a points at the first row
 * (rows lda elements apart), b at the first pair row of one strip (rows 64 elements apart), init and c at the
 * block's first element (init read as in the header comment, c rows ldc floats apart). kc: a multiple of 32. */

static void sdcli_bf16_unit_portable(const uint16_t *a, ptrdiff_t lda, ptrdiff_t a_ks, const uint16_t *b,
                                     ptrdiff_t kc, const float *init, ptrdiff_t init_rs, ptrdiff_t init_cs, float *c,
                                     ptrdiff_t ldc) {
    for (ptrdiff_t i = 0; i < 32; i++) {
        float row[32];
        for (ptrdiff_t j = 0; j < 32; j++) row[j] = init[i * init_rs + (j - j % 16) * init_cs + j % 16];
        for (ptrdiff_t p = 0; p < kc / 2; p++) {
            const uint16_t *ap = a + i * lda + 2 * p / 32 * a_ks + 2 * p % 32;
            const float a0 = sdcli_bf16_to_float(ap[0]), a1 = sdcli_bf16_to_float(ap[1]);
            const uint16_t *pairs = b + p * 64;
            for (ptrdiff_t j = 0; j < 32; j++)
                row[j] += a0 * sdcli_bf16_to_float(pairs[2 * j]) + a1 * sdcli_bf16_to_float(pairs[2 * j + 1]);
        }
        memcpy(c + i * ldc, row, sizeof row);
    }
}

#ifdef SDCLI_BF16_X86

/* AVX512_BF16: the unit as four register tiles of 8 rows x 32 columns, each in 16 zmm accumulators. Per pair p
 * of k: the strip row (two registers of 16 column pairs) and, per row r, the pair A[r, 2p:2p+2] broadcast to all
 * lanes; VDPBF16PS adds A[r, 2p] B[2p, j] + A[r, 2p+1] B[2p+1, j] to lane j. */
SDCLI_BF16_AVX512_TARGET static void sdcli_bf16_unit_avx512(const uint16_t *a, ptrdiff_t lda, ptrdiff_t a_ks,
                                                            const uint16_t *b, ptrdiff_t kc, const float *init,
                                                            ptrdiff_t init_rs, ptrdiff_t init_cs, float *c,
                                                            ptrdiff_t ldc) {
    for (int i = 0; i < 32; i += 8) {
        __m512 acc[8][2];
#pragma GCC unroll 8
        for (int r = 0; r < 8; r++)
#pragma GCC unroll 2
            for (int v = 0; v < 2; v++) acc[r][v] = _mm512_loadu_ps(init + (i + r) * init_rs + 16 * v * init_cs);
        for (ptrdiff_t p = 0; p < kc / 2; p++) {
            const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + p * 64);
            const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + p * 64 + 32);
#pragma GCC unroll 8
            for (int r = 0; r < 8; r++) {
                int32_t pair;
                memcpy(&pair, a + (i + r) * lda + 2 * p / 32 * a_ks + 2 * p % 32, sizeof pair);
                const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
                acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
                acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
            }
        }
#pragma GCC unroll 8
        for (int r = 0; r < 8; r++)
#pragma GCC unroll 2
            for (int v = 0; v < 2; v++) _mm512_storeu_ps(c + (i + r) * ldc + 16 * v, acc[r][v]);
    }
}
#endif /* SDCLI_BF16_X86 */

#ifdef SDCLI_BF16_AMX_BUILD

/* AMX through inline assembly (AT&T | Intel syntax), with a memory clobber on the loads and stores so that the
 * compiler keeps ordinary reads and writes of the same buffers on the right side of them. t: tile number. */
#define SDCLI_TILE_LOAD(t, base, stride)                                                                         \
    __asm__ volatile("{tileloadd (%0,%1,1), %%tmm" #t "|tileloadd tmm" #t ", [%0+%1*1]}"                         \
                     :                                                                                           \
                     : "r"(base), "r"((ptrdiff_t)(stride))                                                       \
                     : "memory")
#define SDCLI_TILE_STORE(t, base, stride)                                                                        \
    __asm__ volatile("{tilestored %%tmm" #t ", (%0,%1,1)|tilestored [%0+%1*1], tmm" #t "}"                       \
                     :                                                                                           \
                     : "r"(base), "r"((ptrdiff_t)(stride))                                                       \
                     : "memory")
/* tmm c += tmm a (16 rows x 32 bf16) @ tmm b (16 pairs x 16 columns, VNNI) */
#define SDCLI_TILE_DP(c, a, b)                                                                                   \
    __asm__ volatile("{tdpbf16ps %%tmm" #b ", %%tmm" #a ", %%tmm" #c "|tdpbf16ps tmm" #c ", tmm" #a ", tmm" #b "}" ::)

/* the 64-byte tile configuration: palette 1, eight tiles of 16 rows x 64 bytes */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} sdcli_bf16_tile_config;

/* AMX: the unit as C (32 x 32) = [tmm0 tmm1; tmm2 tmm3] += [tmm4; tmm5] (32 x 32 of k) @ [tmm6 tmm7] (32 of k x 32),
 * one step of 32 in k at a time. The lines of C are requested for writing first, so that fetching them overlaps
 * the products. With `stream` (c 64-byte aligned, ldc a multiple of 16) C goes out through an L1 buffer with
 * streaming stores instead, which skip that fetch and leave the caches to the operands: for outputs much larger
 * than the caches, where the fetch costs more than the products (the caller issues the store fence). */
SDCLI_BF16_AVX512_TARGET static void sdcli_bf16_unit_amx(const uint16_t *a, ptrdiff_t lda, ptrdiff_t a_ks,
                                                         const uint16_t *b, ptrdiff_t kc, const float *init,
                                                         ptrdiff_t init_rs, ptrdiff_t init_cs, float *c,
                                                         ptrdiff_t ldc, int stream) {
    const ptrdiff_t a_stride = lda * 2, c_stride = ldc * 4, init_stride = init_rs * 4;
    const uint16_t *a1 = a + 16 * lda;
    const float *init1 = init + 16 * init_rs;
    if (!stream)
        for (int r = 0; r < 32; r++) {
            _mm_prefetch((const char *)(c + r * ldc), _MM_HINT_ET0);
            _mm_prefetch((const char *)(c + r * ldc + 16), _MM_HINT_ET0);
        }
    SDCLI_TILE_LOAD(0, init, init_stride);
    SDCLI_TILE_LOAD(1, init + 16 * init_cs, init_stride);
    SDCLI_TILE_LOAD(2, init1, init_stride);
    SDCLI_TILE_LOAD(3, init1 + 16 * init_cs, init_stride);
    for (ptrdiff_t k = 0; k < kc; k += 32, a += a_ks, a1 += a_ks, b += 16 * 64) { /* 32 of k further on */
        SDCLI_TILE_LOAD(4, a, a_stride);
        SDCLI_TILE_LOAD(6, b, 128);
        SDCLI_TILE_DP(0, 4, 6);
        SDCLI_TILE_LOAD(5, a1, a_stride);
        SDCLI_TILE_DP(2, 5, 6);
        SDCLI_TILE_LOAD(7, b + 32, 128);
        SDCLI_TILE_DP(1, 4, 7);
        SDCLI_TILE_DP(3, 5, 7);
    }
    if (stream) {
        float block[32 * 32] __attribute__((aligned(64)));
        SDCLI_TILE_STORE(0, block, 128);
        SDCLI_TILE_STORE(1, block + 16, 128);
        SDCLI_TILE_STORE(2, block + 16 * 32, 128);
        SDCLI_TILE_STORE(3, block + 16 * 32 + 16, 128);
        for (int r = 0; r < 32; r++) {
            _mm512_stream_ps(c + r * ldc, _mm512_load_ps(block + r * 32));
            _mm512_stream_ps(c + r * ldc + 16, _mm512_load_ps(block + r * 32 + 16));
        }
        return;
    }
    SDCLI_TILE_STORE(0, c, c_stride);
    SDCLI_TILE_STORE(1, c + 16, c_stride);
    SDCLI_TILE_STORE(2, c + 16 * ldc, c_stride);
    SDCLI_TILE_STORE(3, c + 16 * ldc + 16, c_stride);
}
#endif /* SDCLI_BF16_AMX_BUILD */

/* Before the first product of this thread at `level`: loads the AMX tile configuration. */
static void sdcli_bf16_thread_begin(int level) {
#ifdef SDCLI_BF16_AMX_BUILD
    if (level == SDCLI_BF16_AMX) {
        sdcli_bf16_tile_config config __attribute__((aligned(64)));
        memset(&config, 0, sizeof config);
        config.palette = 1;
        for (int t = 0; t < 8; t++) {
            config.colsb[t] = 64;
            config.rows[t] = 16;
        }
        __asm__ volatile("ldtilecfg %0" : : "m"(config) : "memory");
    }
#endif
    (void)level;
}

/* After the last product of this thread: releases the tiles (the OS then need not save them). */
static void sdcli_bf16_thread_end(int level) {
#ifdef SDCLI_BF16_AMX_BUILD
    if (level == SDCLI_BF16_AMX) __asm__ volatile("tilerelease" ::: "memory");
#endif
    (void)level;
}

/* ------------------------------------------------------------------------------------------ the product */

/* C (m, n) = init + A (m, kp) @ B (n/32 strips, kp/2, 32, 2) at `level`; m, n, kp multiples of 32 (blocking in
 * the header comment). stream: write C with streaming stores (AMX only, see sdcli_bf16_unit_amx; in the last
 * chunk of k only, since the others are read back). */
static void sdcli_bf16_gemm(int level, const uint16_t *a, ptrdiff_t lda, ptrdiff_t a_ks, const uint16_t *b,
                            ptrdiff_t kp, ptrdiff_t m, ptrdiff_t n, const float *init, ptrdiff_t init_rs,
                            ptrdiff_t init_cs, float *c, ptrdiff_t ldc, int stream) {
    const ptrdiff_t strip = kp * 32;                                 /* elements of B per strip */
    const ptrdiff_t chunks = (kp + SDCLI_BF16_KC - 1) / SDCLI_BF16_KC; /* k in chunks of about equal size */
    const ptrdiff_t kc_max = sdcli_bf16_round_up((kp + chunks - 1) / (chunks > 0 ? chunks : 1), 32);
    ptrdiff_t k0 = 0;
    do { /* at least once: with kp = 0, C = init */
        const ptrdiff_t kc = sdcli_bf16_min(kc_max, kp - k0);
        const float *init_k = k0 == 0 ? init : c; /* later chunks add to C */
        const ptrdiff_t rs = k0 == 0 ? init_rs : ldc, cs = k0 == 0 ? init_cs : 1;
        const ptrdiff_t block = sdcli_bf16_round_up(SDCLI_BF16_A_BYTES / (2 * (kc > 32 ? kc : 32)), 32);
        for (ptrdiff_t i0 = 0; i0 < m; i0 += block) {
            const ptrdiff_t i_end = sdcli_bf16_min(i0 + block, m);
            for (ptrdiff_t j = 0; j < n; j += 32) {
                const uint16_t *bj = b + j / 32 * strip + k0 * 32; /* strip j / 32 at pair row k0 / 2 */
                for (ptrdiff_t i = i0; i < i_end; i += 32) {
                    const uint16_t *ai = a + i * lda + k0 / 32 * a_ks;
                    const float *init_ij = init_k + i * rs + j * cs;
                    float *cij = c + i * ldc + j;
#ifdef SDCLI_BF16_AMX_BUILD
                    if (level == SDCLI_BF16_AMX) {
                        sdcli_bf16_unit_amx(ai, lda, a_ks, bj, kc, init_ij, rs, cs, cij, ldc, stream && k0 + kc == kp);
                        continue;
                    }
#endif
#ifdef SDCLI_BF16_X86
                    if (level == SDCLI_BF16_AVX512) {
                        sdcli_bf16_unit_avx512(ai, lda, a_ks, bj, kc, init_ij, rs, cs, cij, ldc);
                        continue;
                    }
#endif
                    sdcli_bf16_unit_portable(ai, lda, a_ks, bj, kc, init_ij, rs, cs, cij, ldc);
                }
            }
        }
        k0 += kc;
    } while (k0 < kp);
#ifdef SDCLI_BF16_AMX_BUILD
    if (stream && level == SDCLI_BF16_AMX) _mm_sfence(); /* the streaming stores before anything that follows */
#endif
    (void)level;
    (void)stream;
}

/* ----------------------------------------------------------------------------------------- parallel tasks */

/* one run: the columns of a chunk within one output row (conv2d, AVX-512: see sdcli_bf16_im2col_avx512) */
typedef struct sdcli_bf16_run {
    ptrdiff_t base;     /* the region pair of the run's first column at tap (0, 0) of channel pair 0 */
    uint16_t lanes;     /* the lanes of the chunk the run fills */
    uint16_t lo, hi;    /* the pairs of the 32-pair window at base + (offset of the pair row) the run reads */
    int whole;          /* 1: all 16 lanes at stride 1, one load; 2: all 16 lanes at stride 2, two loads */
    uint32_t index[16]; /* lane l takes window pair index[l] */
} sdcli_bf16_run;

/* What one thread keeps between its tasks (allocated by sdcli_bf16_scratch_new, NULL when out of memory). */
typedef struct {
    uint16_t *a;      /* linear: (kp/32, SDCLI_BF16_LINEAR_ROWS, 32) the thread's block of x in bf16, blocked;
                         conv2d, AVX-512: the region of x a block of columns reads, in bf16 pairs */
    float *c;         /* an output block that does not cover whole tiles: computed here, then copied */
    uint32_t *panel;  /* conv2d: (pixels/32, kb/2, 32) a block of the im2col matrix as B strips of pairs */
    float *rows;      /* conv2d, portable: (2, pixels) two rows of the im2col matrix */
    sdcli_bf16_run *runs;       /* conv2d, AVX-512: (pixels) the runs of a block of columns */
    ptrdiff_t *chunk_runs;       /* conv2d, AVX-512: (pixels/16 + 1) the first run of each chunk of 16 columns */
    ptrdiff_t cached; /* the block of x in a (linear), or the block of columns in panel (conv2d); -1: none */
    ptrdiff_t cached_region; /* conv2d: the block of columns whose region is in a; -1: none */
} sdcli_bf16_scratch;

static void *sdcli_bf16_alloc(size_t bytes) {
    void *p = NULL;
    return posix_memalign(&p, 64, bytes > 0 ? bytes : 64) == 0 ? p : NULL;
}

static void sdcli_bf16_scratch_free(sdcli_bf16_scratch *s) {
    if (s == NULL) return;
    free(s->a);
    free(s->c);
    free(s->panel);
    free(s->rows);
    free(s->runs);
    free(s->chunk_runs);
    free(s);
}

/* a scratch with room for a_elems bf16, c_elems floats, panel_elems pairs and the im2col of blocks of `pixels`
 * columns */
static sdcli_bf16_scratch *sdcli_bf16_scratch_new(size_t a_elems, size_t c_elems, size_t panel_elems,
                                                  size_t pixels) {
    sdcli_bf16_scratch *s = (sdcli_bf16_scratch *)calloc(1, sizeof *s);
    if (s == NULL) return NULL;
    s->a = (uint16_t *)sdcli_bf16_alloc(a_elems * sizeof(uint16_t));
    s->c = (float *)sdcli_bf16_alloc(c_elems * sizeof(float));
    s->panel = (uint32_t *)sdcli_bf16_alloc(panel_elems * sizeof(uint32_t));
    s->rows = (float *)sdcli_bf16_alloc(2 * pixels * sizeof(float));
    s->runs = (sdcli_bf16_run *)sdcli_bf16_alloc(pixels * sizeof(sdcli_bf16_run));
    s->chunk_runs = (ptrdiff_t *)sdcli_bf16_alloc((pixels / 16 + 1) * sizeof(ptrdiff_t));
    s->cached = s->cached_region = -1;
    if (s->a == NULL || s->c == NULL || s->panel == NULL || s->rows == NULL || s->runs == NULL ||
        s->chunk_runs == NULL) {
        sdcli_bf16_scratch_free(s);
        return NULL;
    }
    return s;
}

/* out[0:rows, 0:cols] = c[0:rows, 0:cols], rows ldo and ldc floats apart */
static void sdcli_bf16_copy_block(const float *c, ptrdiff_t ldc, ptrdiff_t rows, ptrdiff_t cols, float *out,
                                  ptrdiff_t ldo) {
    for (ptrdiff_t r = 0; r < rows; r++) memcpy(out + r * ldo, c + r * ldc, (size_t)cols * sizeof(float));
}

/* Task `task` of linear: out (m, n) = bf16(x (m, k)) @ w.T + bias, w packed as B strips (np/32, kp/2, 32, 2), np =
 * n rounded up to 32; bias_pad (np) floats, zeros past n (and all zeros without a bias). Tasks are (block of
 * SDCLI_BF16_LINEAR_ROWS rows, slice of `slice` columns), `slices` slices per block, blocks outer: a thread's
 * consecutive tasks share the block of x it converted. */
static void sdcli_bf16_linear_task(int level, const float *x, ptrdiff_t m, ptrdiff_t k, const uint16_t *w,
                                   ptrdiff_t kp, ptrdiff_t np, const float *bias_pad, float *out, ptrdiff_t n,
                                   ptrdiff_t slice, ptrdiff_t slices, int stream, ptrdiff_t task,
                                   sdcli_bf16_scratch *s) {
    const ptrdiff_t block = task / slices, i0 = block * SDCLI_BF16_LINEAR_ROWS;
    const ptrdiff_t rows = sdcli_bf16_min(SDCLI_BF16_LINEAR_ROWS, m - i0), rows_pad = sdcli_bf16_round_up(rows, 32);
    const ptrdiff_t j0 = task % slices * slice, cols = sdcli_bf16_min(slice, np - j0); /* cols: a multiple of 32 */
    const uint16_t *wj = w + j0 * kp;                                                 /* strip j0 / 32 */
    if (s->cached != block) {
        sdcli_bf16_pack_rows(level, x + i0 * k, k, rows, k, s->a, kp, rows_pad); /* (kp/32, rows_pad, 32) */
        s->cached = block;
    }
    if (rows == rows_pad && j0 + cols <= n) { /* whole tiles inside out: straight there */
        sdcli_bf16_gemm(level, s->a, 32, rows_pad * 32, wj, kp, rows_pad, cols, bias_pad + j0, 0, 1,
                        out + i0 * n + j0, n, stream);
    } else {
        sdcli_bf16_gemm(level, s->a, 32, rows_pad * 32, wj, kp, rows_pad, cols, bias_pad + j0, 0, 1, s->c, cols,
                        0);
        sdcli_bf16_copy_block(s->c, cols, rows, sdcli_bf16_min(cols, n - j0), out + i0 * n + j0, n);
    }
}

/* The im2col matrix of conv2d orders k by tap, then channel: k = (dy * kw + dx) * cin2 + ci, cin2 = cin rounded up
 * to even (channel ci = cin of an odd cin is a row of zeros). The pair of rows (2p, 2p + 1) of a VNNI pair is then
 * one tap of two neighbouring channels, which the AVX-512 im2col copies from channel pairs stored side by side. */

/* row[0:n] = row k of the im2col matrix of one image x (cin, h, w) at output pixels pix0 .. pix0 + n - 1 (row-major
 * over (ho, wo)): row[q] = x[ci, oy * stride - pad + dy, ox * stride - pad + dx], 0 outside the image */
static void sdcli_bf16_im2col_row(const float *x, ptrdiff_t cin, ptrdiff_t h, ptrdiff_t w, ptrdiff_t kw,
                                  ptrdiff_t stride, ptrdiff_t pad, ptrdiff_t wo, ptrdiff_t k, ptrdiff_t pix0,
                                  ptrdiff_t n, float *row) {
    const ptrdiff_t cin2 = cin + cin % 2, ci = k % cin2, dy = k / cin2 / kw, dx = k / cin2 % kw;
    const float *plane = x + ci * h * w;
    /* ox in [ox_lo, ox_hi) reads inside the row: 0 <= ox * stride + shift < w, shift = dx - pad */
    const ptrdiff_t shift = dx - pad;
    const ptrdiff_t ox_lo = shift >= 0 ? 0 : (-shift + stride - 1) / stride;
    const ptrdiff_t ox_hi = w - shift <= 0 ? 0 : (w - shift + stride - 1) / stride;
    for (ptrdiff_t q = 0; q < n;) {
        const ptrdiff_t oy = (pix0 + q) / wo, ox0 = (pix0 + q) % wo;
        const ptrdiff_t count = sdcli_bf16_min(wo - ox0, n - q); /* this output row's part of the block */
        const ptrdiff_t iy = oy * stride - pad + dy;
        float *dst = row + q;
        if (ci >= cin || iy < 0 || iy >= h) {
            memset(dst, 0, (size_t)count * sizeof(float));
        } else {
            const float *src = plane + iy * w;
            ptrdiff_t lo = ox_lo - ox0, hi = ox_hi - ox0; /* the part of dst[0:count] inside the row */
            lo = lo < 0 ? 0 : lo > count ? count : lo;
            hi = hi < lo ? lo : hi > count ? count : hi;
            if (lo > 0) memset(dst, 0, (size_t)lo * sizeof(float));
            if (stride == 1)
                memcpy(dst + lo, src + ox0 + lo + shift, (size_t)(hi - lo) * sizeof(float));
            else
                for (ptrdiff_t t = lo; t < hi; t++) dst[t] = src[(ox0 + t) * stride + shift];
            if (hi < count) memset(dst + hi, 0, (size_t)(count - hi) * sizeof(float));
        }
        q += count;
    }
}

/* Rows k0 .. k0 + kb - 1 of the im2col matrix of x (batch, cin, h, w) at columns col0 .. col0 + n - 1, as B strips:
 * panel (pixels/32, kb/2, 32) pairs, columns n .. pixels-1 and rows past the last tap zero. Column q is output
 * pixel q % hw_out of image q / hw_out, so a block of columns may run across images. rows: room for 2 x pixels
 * floats. (The portable level; the others use the region and sdcli_bf16_im2col_avx512.) */
static void sdcli_bf16_im2col(int level, const float *x, ptrdiff_t cin, ptrdiff_t h, ptrdiff_t w, ptrdiff_t kh,
                              ptrdiff_t kw, ptrdiff_t stride, ptrdiff_t pad, ptrdiff_t ho, ptrdiff_t wo,
                              ptrdiff_t col0, ptrdiff_t n, ptrdiff_t k0, ptrdiff_t kb, uint32_t *panel,
                              ptrdiff_t pixels, float *rows) {
    const ptrdiff_t hw_out = ho * wo, k_total = kh * kw * (cin + cin % 2), image_size = cin * h * w;
    const ptrdiff_t strip = kb / 2 * 32; /* pairs per strip */
    for (ptrdiff_t p = 0; p < kb / 2; p++) {
        if (k0 + 2 * p >= k_total) { /* the padding of k */
            sdcli_bf16_pack_pairs(level, rows, NULL, 0, panel + p * 32, pixels, strip);
            continue;
        }
        for (int t = 0; t < 2; t++) {
            float *row = rows + t * pixels;
            for (ptrdiff_t q = 0; q < n;) { /* the part of the block in one image */
                const ptrdiff_t image = (col0 + q) / hw_out, pix = (col0 + q) % hw_out;
                const ptrdiff_t count = sdcli_bf16_min(hw_out - pix, n - q);
                sdcli_bf16_im2col_row(x + image * image_size, cin, h, w, kw, stride, pad, wo, k0 + 2 * p + t, pix,
                                      count, row + q);
                q += count;
            }
        }
        sdcli_bf16_pack_pairs(level, rows, rows + pixels, n, panel + p * 32, pixels, strip);
    }
}

/* The im2col of a 1 x 1, stride 1, unpadded convolution for columns within one image: pair row p is channels
 * (k0 + 2p, k0 + 2p + 1) at the block's pixels, converted straight from x. */
static void sdcli_bf16_im2col_1x1(int level, const float *x, ptrdiff_t cin, ptrdiff_t hw, ptrdiff_t col0,
                                  ptrdiff_t n, ptrdiff_t k0, ptrdiff_t kb, uint32_t *panel, ptrdiff_t pixels) {
    const float *pixels0 = x + col0 / hw * cin * hw + col0 % hw; /* channel 0 at the first column */
    const ptrdiff_t strip = kb / 2 * 32;
    for (ptrdiff_t p = 0; p < kb / 2; p++) {
        const ptrdiff_t ci = k0 + 2 * p;
        if (ci < cin)
            sdcli_bf16_pack_pairs(level, pixels0 + ci * hw, ci + 1 < cin ? pixels0 + (ci + 1) * hw : NULL, n,
                                  panel + p * 32, pixels, strip);
        else /* the padding of k */
            sdcli_bf16_pack_pairs(level, pixels0, NULL, 0, panel + p * 32, pixels, strip);
    }
}

#ifdef SDCLI_BF16_X86
/* conv2d at the AVX-512 levels: the im2col in two steps, so that each value of x is converted to bf16 once, not
 * kh x kw times, and the im2col itself only copies pairs.
 * 1. sdcli_bf16_region_avx512: the input rows a block of columns reads, all channels, in bf16 VNNI pairs of
 *    channels with the zero padding written out: region (slots, cin2/2, rh, rw) pairs, pair [s, c, r, col] =
 *    (x[image, 2c, iy, ix], x[image, 2c + 1, iy, ix]) with image = the block's first image + s, iy = oy_first *
 *    stride - pad + r (oy_first: the image's first output row in the block), ix = col - pad, rw = w + 2 pad.
 *    Built once per block of columns, reused by every block of k and every slice of output channels.
 * 2. sdcli_bf16_im2col_avx512: the panel from the region, 16 columns (a chunk, half a strip row) at a time. Pair
 *    row p of tap (dy, dx) and channel pair c, for a run of columns within one output row, lies at stride
 *    `stride` from region pair run.base + (c * rh + dy) * rw + dx: a whole chunk at stride 1 is one load, at
 *    stride 2 two loads and a permutation, any other run two masked loads of a 32-pair window and a permutation. */

/* the first output row of `image` among the columns col0 .. */
static inline ptrdiff_t sdcli_bf16_first_row(ptrdiff_t image, ptrdiff_t col0, ptrdiff_t hw_out, ptrdiff_t wo) {
    return image == col0 / hw_out ? col0 % hw_out / wo : 0;
}

SDCLI_BF16_AVX512_TARGET static void sdcli_bf16_region_avx512(const float *x, ptrdiff_t cin, ptrdiff_t h,
                                                              ptrdiff_t w, ptrdiff_t kh, ptrdiff_t stride,
                                                              ptrdiff_t pad, ptrdiff_t ho, ptrdiff_t wo,
                                                              ptrdiff_t col0, ptrdiff_t n, uint32_t *region,
                                                              ptrdiff_t rh) {
    const ptrdiff_t hw_out = ho * wo, rw = w + 2 * pad, pairs = (cin + 1) / 2;
    const ptrdiff_t first = col0 / hw_out, last = (col0 + n - 1) / hw_out;
    /* [a[0..15] | b[0..15]] (16-bit lanes) -> a[0] b[0] a[1] b[1] ...: the pairs */
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                                22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (ptrdiff_t image = first; image <= last; image++) {
        const ptrdiff_t end = sdcli_bf16_min(col0 + n, (image + 1) * hw_out) - image * hw_out; /* past its last */
        const ptrdiff_t oy0 = sdcli_bf16_first_row(image, col0, hw_out, wo), oy1 = (end - 1) / wo;
        const ptrdiff_t rows = (oy1 - oy0) * stride + kh; /* at most rh */
        for (ptrdiff_t c = 0; c < pairs; c++)
            for (ptrdiff_t r = 0; r < rows; r++) {
                uint32_t *dst = region + (((image - first) * pairs + c) * rh + r) * rw;
                const ptrdiff_t iy = oy0 * stride - pad + r;
                if (iy < 0 || iy >= h) {
                    memset(dst, 0, (size_t)rw * sizeof(uint32_t));
                    continue;
                }
                const float *src0 = x + ((image * cin + 2 * c) * h + iy) * w, *src1 = src0 + h * w;
                for (ptrdiff_t i = 0; i < pad; i++) dst[i] = dst[pad + w + i] = 0;
                for (ptrdiff_t j = 0; j < w; j += 16) {
                    const ptrdiff_t count = w - j >= 16 ? 16 : w - j;
                    const __mmask16 mask = (__mmask16)((1u << count) - 1);
                    const __m512 v0 = _mm512_maskz_loadu_ps(mask, src0 + j);
                    const __m512 v1 = 2 * c + 1 < cin ? _mm512_maskz_loadu_ps(mask, src1 + j) : _mm512_setzero_ps();
                    const __m512i halves = (__m512i)_mm512_cvtne2ps_pbh(v1, v0); /* [channel 2c | 2c + 1] */
                    _mm512_mask_storeu_epi32(dst + pad + j, mask, _mm512_permutexvar_epi16(interleave, halves));
                }
            }
    }
}

/* the 16 pairs of one chunk in one pair row of the im2col matrix: its runs read from `at`, the region at the pair
 * row's offset (NULL: a row of zeros) */
SDCLI_BF16_AVX512_TARGET SDCLI_BF16_INLINE __m512i sdcli_bf16_chunk_row(const uint32_t *at, const sdcli_bf16_run *run,
                                                                       const sdcli_bf16_run *end, __m512i even) {
    if (at == NULL) return _mm512_setzero_si512();
    if (run->whole == 1) return _mm512_loadu_si512(at + run->base);
    if (run->whole == 2) /* the even ones of 32 pairs */
        return _mm512_permutex2var_epi32(_mm512_loadu_si512(at + run->base), even,
                                         _mm512_loadu_si512(at + run->base + 16));
    __m512i v = _mm512_setzero_si512();
    for (; run < end; run++) {
        const uint32_t *window = at + run->base;
        const __m512i lo = _mm512_maskz_loadu_epi32(run->lo, window);
        const __m512i hi = _mm512_maskz_loadu_epi32(run->hi, window + 16);
        v = _mm512_mask_mov_epi32(v, run->lanes, _mm512_permutex2var_epi32(lo, _mm512_loadu_si512(run->index), hi));
    }
    return v;
}

SDCLI_BF16_AVX512_TARGET static void sdcli_bf16_im2col_avx512(ptrdiff_t cin, ptrdiff_t w, ptrdiff_t kh,
                                                              ptrdiff_t kw, ptrdiff_t stride, ptrdiff_t pad,
                                                              ptrdiff_t ho, ptrdiff_t wo, ptrdiff_t col0,
                                                              ptrdiff_t n, ptrdiff_t k0, ptrdiff_t kb,
                                                              const uint32_t *region, ptrdiff_t rh,
                                                              uint32_t *panel, ptrdiff_t pixels,
                                                              sdcli_bf16_run *runs, ptrdiff_t *chunk_runs) {
    const ptrdiff_t hw_out = ho * wo, rw = w + 2 * pad, pairs = (cin + 1) / 2, first = col0 / hw_out;
    const ptrdiff_t strip = kb / 2 * 32, max_run = 31 / stride + 1; /* a run's pairs fit a window of 32 */
    /* the runs of each chunk of 16 columns */
    ptrdiff_t count = 0;
    for (ptrdiff_t c = 0; c < pixels / 16; c++) {
        chunk_runs[c] = count;
        const ptrdiff_t chunk_end = sdcli_bf16_min(16 * c + 16, n);
        for (ptrdiff_t j = 16 * c; j < chunk_end;) {
            const ptrdiff_t q = col0 + j, image = q / hw_out, oy = q % hw_out / wo, ox = q % wo;
            const ptrdiff_t length = sdcli_bf16_min(sdcli_bf16_min(wo - ox, chunk_end - j), max_run);
            const ptrdiff_t lane = j - 16 * c, span = (length - 1) * stride + 1;
            sdcli_bf16_run *run = runs + count++;
            const ptrdiff_t r = (oy - sdcli_bf16_first_row(image, col0, hw_out, wo)) * stride; /* its region row */
            run->base = ((image - first) * pairs * rh + r) * rw + ox * stride;
            run->lanes = (uint16_t)(((1u << length) - 1) << lane);
            run->lo = (uint16_t)(span >= 16 ? 0xffffu : (1u << span) - 1);
            run->hi = (uint16_t)(span > 16 ? (1u << (span - 16)) - 1 : 0);
            run->whole = length == 16 && stride <= 2 ? (int)stride : 0;
            for (ptrdiff_t l = 0; l < 16; l++)
                run->index[l] = (uint32_t)(l >= lane && l < lane + length ? (l - lane) * stride : 0);
            j += length;
        }
    }
    chunk_runs[pixels / 16] = count;
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    /* pair row p = k0 / 2 + p: tap t = (dy, dx), channel pair c, counted up */
    const ptrdiff_t p0 = k0 / 2, taps = kh * kw;
    ptrdiff_t c = p0 % pairs, t = p0 / pairs;
    for (ptrdiff_t p = 0; p < kb / 2; p++) {
        const uint32_t *at = t < taps ? region + (c * rh + t / kw) * rw + t % kw : NULL;
        if (++c == pairs) {
            c = 0;
            t++;
        }
        for (ptrdiff_t chunk = 0; chunk < pixels / 16; chunk++)
            _mm512_storeu_si512(panel + chunk / 2 * strip + p * 32 + chunk % 2 * 16,
                                sdcli_bf16_chunk_row(at, runs + chunk_runs[chunk], runs + chunk_runs[chunk + 1], even));
    }
}
#endif

/* Task `task` of conv2d on x (batch, cin, h, w) -> out (batch, cout, ho, wo) as the product
 * out[:, b, pixels] = weight (cout, K) @ im2col(x[b]) (K, pixels) + bias, over columns = (image, output pixel).
 * The weight is A (cout_pad, kp), cout_pad = cout rounded up to 32 (zero rows); bias_tiles (cout_pad, 16) floats:
 * bias[i] repeated in row i. Tasks are (block of `pixels` columns, slice of `cslice` output channels), the slices
 * innermost; the columns of both images of a small batch share a block, so the weight is read once for both. The
 * im2col panel covers kb_max rows of k at a time (all of kp up to SDCLI_BF16_PANEL_K);
 * the first block starts from the bias, the others add to what the earlier ones left in C. C is the output itself
 * when the block covers whole tiles of one image, else s->c, copied out at the end. */
static void sdcli_bf16_conv_task(int level, const float *x, ptrdiff_t batch, ptrdiff_t cin, ptrdiff_t h,
                                 ptrdiff_t w, const uint16_t *weight, ptrdiff_t cout, ptrdiff_t cout_pad,
                                 ptrdiff_t kp, ptrdiff_t kh, ptrdiff_t kw, ptrdiff_t stride, ptrdiff_t pad,
                                 const float *bias_tiles, float *out, ptrdiff_t ho, ptrdiff_t wo, ptrdiff_t pixels,
                                 ptrdiff_t cslice, ptrdiff_t cslices, ptrdiff_t kb_max, ptrdiff_t rh, ptrdiff_t task,
                                 sdcli_bf16_scratch *s) {
    const ptrdiff_t hw_out = ho * wo, block = task / cslices;
    const ptrdiff_t col0 = block * pixels, ncols = sdcli_bf16_min(pixels, batch * hw_out - col0);
    const ptrdiff_t c0 = task % cslices * cslice, crows = sdcli_bf16_min(cslice, cout_pad - c0);
    const ptrdiff_t image0 = col0 / hw_out, pix0 = col0 % hw_out;
    const int direct = ncols == pixels && pix0 + pixels <= hw_out && c0 + crows <= cout; /* whole tiles in out */
    float *c = direct ? out + (image0 * cout + c0) * hw_out + pix0 : s->c;
    const ptrdiff_t ldc = direct ? hw_out : pixels;
    ptrdiff_t k0 = 0;
    (void)rh; /* the AVX-512 levels only */
    do { /* at least once: with kp = 0, C = bias */
        const ptrdiff_t kb = sdcli_bf16_min(kb_max, kp - k0);
        if (!(kb == kp && s->cached == block)) { /* one panel for all of k: reused by the next slice of channels */
            if (kh == 1 && kw == 1 && stride == 1 && pad == 0 && pix0 + ncols <= hw_out)
                sdcli_bf16_im2col_1x1(level, x, cin, hw_out, col0, ncols, k0, kb, s->panel, pixels);
            else
#ifdef SDCLI_BF16_X86
            if (level >= SDCLI_BF16_AVX512) {
                if (s->cached_region != block) {
                    sdcli_bf16_region_avx512(x, cin, h, w, kh, stride, pad, ho, wo, col0, ncols, (uint32_t *)s->a, rh);
                    s->cached_region = block;
                }
                sdcli_bf16_im2col_avx512(cin, w, kh, kw, stride, pad, ho, wo, col0, ncols, k0, kb,
                                         (const uint32_t *)s->a, rh, s->panel, pixels, s->runs, s->chunk_runs);
            } else
#endif
                sdcli_bf16_im2col(level, x, cin, h, w, kh, kw, stride, pad, ho, wo, col0, ncols, k0, kb, s->panel,
                                  pixels, s->rows);
        }
        s->cached = kb == kp ? block : -1;
        if (k0 == 0)
            sdcli_bf16_gemm(level, weight + c0 * kp, kp, 32, (const uint16_t *)s->panel, kb, crows, pixels,
                            bias_tiles + c0 * 16, 16, 0, c, ldc, 0);
        else
            sdcli_bf16_gemm(level, weight + c0 * kp + k0, kp, 32, (const uint16_t *)s->panel, kb, crows, pixels, c, ldc,
                            1, c, ldc, 0);
        k0 += kb;
    } while (k0 < kp);
    if (!direct)
        for (ptrdiff_t q = 0; q < ncols;) { /* the part of the block in one image */
            const ptrdiff_t image = (col0 + q) / hw_out, pix = (col0 + q) % hw_out;
            const ptrdiff_t count = sdcli_bf16_min(hw_out - pix, ncols - q);
            sdcli_bf16_copy_block(s->c + q, pixels, sdcli_bf16_min(crows, cout - c0), count,
                                  out + (image * cout + c0) * hw_out + pix, hw_out);
            q += count;
        }
}

#endif /* SDCLI_BF16_GEMM_H */
