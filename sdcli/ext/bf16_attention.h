/* Fused attention in bfloat16 with float32 softmax and accumulation, for bf16_kernels.pyx (attention()).
 *
 * out = softmax(scale q k^T) v per head, never holding more than one block of the score matrix: the streaming
 * softmax of FlashAttention (Milakov & Gimelshein 2018; Dao et al. 2022) over blocks of SDCLI_BF16_ATTN_KEYS keys.
 * The bf16 contract (that of PyTorch's bf16 flash attention on CPU): q and k rounded to bf16 (nearest even) for
 * the scores, the scores and the softmax in float32, the probabilities p and v rounded to bf16 for p @ v, the
 * output summed in float32. Levels as in bf16_gemm.h (whose level detection, tile configuration and bf16
 * conversion this reuses): AMX (TDPBF16PS), AVX512_BF16 (VDPBF16PS), portable (plain C, correctness only).
 *
 * Orientation: everything is computed transposed, keys (or output columns) by queries, so that one AVX-512
 * vector holds one key's scores for 16 queries and the running max, sum and rescaling are lane-wise (no
 * horizontal reductions), as in cpu_kernels.pyx's float32 attention:
 *   S^T (keys x queries)   = K (keys x d) @ Q^T (d x queries)      K the A operand, Q^T the B operand (VNNI pairs)
 *   O^T (dv x queries)    += V^T (dv x keys) @ P^T (keys x queries)  V^T the A operand, P^T the B operand
 * A task is a block of SDCLI_BF16_ATTN_QUERIES = 32 queries of one head, in two halves of 16 (the lanes of a
 * vector, the columns of a tile).
 *
 * Layouts (bf16 as uint16 bits; dp = d rounded up to 32, dv_pad = dv rounded up to 16, tk_pad = Tk rounded up to
 * the key block; zeros in all padding):
 *   k   (tk_pad, dp)              the head's keys, row-major: a 16-key x 32 A tile loads with a stride of 2 dp bytes
 *   vt  (tk_pad/32, dv_pad, 32)   the head's values transposed in groups of 32 keys: [g, c, t] = v[32 g + t, c];
 *                                 a 16-column x 32-key A tile is 1 KB in one piece
 *   qt  (2, dp/32, 16, 16) pairs  the task's queries as B tiles: [h, g, p, i] = (q[16h + i, 32g + 2p],
 *                                 q[16h + i, 32g + 2p + 1])
 *   s   (2, KEYS, 16) float32     the scores of one key block: [h, j, i] = score of key j for query 16h + i
 *   p   (2, KEYS/2, 16) pairs     the probabilities as B tiles: [h, r, i] = (p[2r, 16h + i], p[2r + 1, 16h + i])
 *   o   (dv_pad/16, 2, 16, 16)    the running output transposed: [cg, h, c, i] = O[16h + i, 16 cg + c]
 * The K and V of a head are converted once per thread and kept (scratch->head) for all the query blocks of that
 * head the thread runs: the tasks are ordered head by head and handed out in contiguous runs.
 *
 * Softmax in base 2: with c = |scale| log2(e), p = 2^(c s - m) for the running max m (in the same units). The
 * max is raised lazily (as in FlashAttention-4): only when a block's max exceeds m by more than
 * SDCLI_BF16_ATTN_TAU, so p <= 2^TAU and the running output and sum are rescaled a few times per query, not at
 * every block. The result is the same softmax (p is rounded to bf16 with the same relative error at any scale).
 * A negative scale negates q (exact in bf16) and uses |scale|, so that the max of the scaled scores is the
 * scaled max. */
#ifndef SDCLI_BF16_ATTENTION_H
#define SDCLI_BF16_ATTENTION_H

#include <math.h>

#include "bf16_gemm.h"

#define SDCLI_BF16_ATTN_QUERIES 32 /* queries per task: two halves of 16 */
#ifndef SDCLI_BF16_ATTN_KEYS
#define SDCLI_BF16_ATTN_KEYS 64    /* keys per step of the streaming softmax (a multiple of 32; -D to measure others) */
#endif
#define SDCLI_BF16_ATTN_TAU 8.0f   /* the running max lags the true one by at most this (log2 units): p <= 256 */

typedef struct {
    uint16_t *k, *vt, *qrows; /* qrows: (32, dp) the task's queries in bf16, row-major */
    uint32_t *qt, *p;
    float *s, *o;
    float *m, *l;   /* (32) running max (scaled, log2 units) and running sum of p per query */
    ptrdiff_t head; /* the head whose k and vt are converted; -1: none */
} sdcli_bf16_attn_scratch;

static void sdcli_bf16_attn_scratch_free(sdcli_bf16_attn_scratch *s) {
    if (s == NULL) return;
    free(s->k);
    free(s->vt);
    free(s->qrows);
    free(s->qt);
    free(s->p);
    free(s->s);
    free(s->o);
    free(s->m);
    free(s);
}

/* per-thread buffers for heads of tk keys, d query/key columns, dv value columns (NULL when out of memory) */
static sdcli_bf16_attn_scratch *sdcli_bf16_attn_scratch_new(ptrdiff_t tk, ptrdiff_t d, ptrdiff_t dv) {
    const ptrdiff_t dp = sdcli_bf16_round_up(d, 32), dv_pad = sdcli_bf16_round_up(dv, 16);
    const ptrdiff_t tk_pad = sdcli_bf16_round_up(tk, SDCLI_BF16_ATTN_KEYS);
    sdcli_bf16_attn_scratch *s = (sdcli_bf16_attn_scratch *)calloc(1, sizeof *s);
    if (s == NULL) return NULL;
    s->k = (uint16_t *)sdcli_bf16_alloc((size_t)(tk_pad * dp) * sizeof(uint16_t));
    s->vt = (uint16_t *)sdcli_bf16_alloc((size_t)(tk_pad * dv_pad) * sizeof(uint16_t));
    s->qrows = (uint16_t *)sdcli_bf16_alloc((size_t)(32 * dp) * sizeof(uint16_t));
    s->qt = (uint32_t *)sdcli_bf16_alloc((size_t)(16 * dp) * sizeof(uint32_t));
    s->p = (uint32_t *)sdcli_bf16_alloc(SDCLI_BF16_ATTN_KEYS * 16 * sizeof(uint32_t));
    s->s = (float *)sdcli_bf16_alloc(2 * SDCLI_BF16_ATTN_KEYS * 16 * sizeof(float));
    s->o = (float *)sdcli_bf16_alloc((size_t)(32 * dv_pad) * sizeof(float));
    s->m = (float *)sdcli_bf16_alloc(64 * sizeof(float));
    s->l = s->m == NULL ? NULL : s->m + 32;
    s->head = -1;
    if (s->k == NULL || s->vt == NULL || s->qrows == NULL || s->qt == NULL || s->p == NULL || s->s == NULL ||
        s->o == NULL || s->m == NULL) {
        sdcli_bf16_attn_scratch_free(s);
        return NULL;
    }
    return s;
}

#ifdef SDCLI_BF16_X86
/* r[0:16] (16 x 16 uint32, row i in r[i]) transposed in place: afterwards r[c] holds column c. Three stages of
 * 16 shuffles: 32-bit, then 64-bit interleaves within 128-bit lanes, then two rounds of 128-bit lane shuffles. */
SDCLI_BF16_AVX512_TARGET SDCLI_BF16_INLINE void sdcli_bf16_attn_transpose16(__m512i r[16]) {
    __m512i t[16];
#pragma GCC unroll 8
    for (int i = 0; i < 8; i++) { /* t[2i] lane L: r2i[4L], r2i+1[4L], r2i[4L+1], r2i+1[4L+1]; t[2i+1]: 4L+2, 4L+3 */
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++) { /* r[4i + j] lane L: rows 4i .. 4i+3 of column 4L + j */
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
#pragma GCC unroll 4
    for (int j = 0; j < 4; j++) { /* lanes (0, 2) and (1, 3) of r[j] and r[4 + j], of r[8 + j] and r[12 + j] */
        t[j] = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x88);
        t[4 + j] = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xdd);
        t[8 + j] = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x88);
        t[12 + j] = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xdd);
    }
#pragma GCC unroll 4
    for (int j = 0; j < 4; j++) { /* column 4L + j: lane L of r[j], r[4 + j], r[8 + j], r[12 + j] */
        r[j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0x88);
        r[8 + j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0xdd);
        r[4 + j] = _mm512_shuffle_i32x4(t[4 + j], t[12 + j], 0x88);
        r[12 + j] = _mm512_shuffle_i32x4(t[4 + j], t[12 + j], 0xdd);
    }
}

/* s->vt from v (tk, dv), rows ldv floats apart: per 32 keys and 16 columns, the 16 pair rows (two keys, 16
 * columns) converted with VCVTNE2PS2BF16, then transposed to 16 columns of 16 pairs */
SDCLI_BF16_AVX512_TARGET static void sdcli_bf16_attn_pack_values_avx512(const float *v, ptrdiff_t ldv,
                                                                        ptrdiff_t tk, ptrdiff_t dv,
                                                                        sdcli_bf16_attn_scratch *s) {
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                                22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const ptrdiff_t dv_pad = sdcli_bf16_round_up(dv, 16), tk_pad = sdcli_bf16_round_up(tk, SDCLI_BF16_ATTN_KEYS);
    uint32_t *vt = (uint32_t *)s->vt; /* (tk_pad/32, dv_pad, 16) pairs */
    for (ptrdiff_t j0 = 0; j0 < tk_pad; j0 += 32)
        for (ptrdiff_t c0 = 0; c0 < dv_pad; c0 += 16) {
            const ptrdiff_t count = dv - c0 < 16 ? dv - c0 : 16;
            const __mmask16 mask = (__mmask16)((1u << count) - 1);
            __m512i r[16];
#pragma GCC unroll 16
            for (int k = 0; k < 16; k++) {
                const ptrdiff_t j = j0 + 2 * k;
                const __m512 v0 = j < tk ? _mm512_maskz_loadu_ps(mask, v + j * ldv + c0) : _mm512_setzero_ps();
                const __m512 v1 =
                    j + 1 < tk ? _mm512_maskz_loadu_ps(mask, v + (j + 1) * ldv + c0) : _mm512_setzero_ps();
                r[k] = _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(v1, v0));
            }
            sdcli_bf16_attn_transpose16(r);
            uint32_t *dst = vt + (j0 / 32 * dv_pad + c0) * 16;
#pragma GCC unroll 16
            for (int c = 0; c < 16; c++) _mm512_store_si512(dst + 16 * c, r[c]);
        }
}

/* s->qt from s->qrows: per half and 32 of d, 16 query rows of 16 pairs transposed */
SDCLI_BF16_AVX512_TARGET static void sdcli_bf16_attn_qt_avx512(sdcli_bf16_attn_scratch *s, ptrdiff_t dp) {
    const ptrdiff_t groups = dp / 32;
    const uint32_t *pairs = (const uint32_t *)s->qrows; /* (32, dp/2) */
    for (ptrdiff_t h = 0; h < 2; h++)
        for (ptrdiff_t g = 0; g < groups; g++) {
            __m512i r[16];
#pragma GCC unroll 16
            for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_si512(pairs + (16 * h + i) * (dp / 2) + 16 * g);
            sdcli_bf16_attn_transpose16(r);
            uint32_t *dst = s->qt + (h * groups + g) * 256;
#pragma GCC unroll 16
            for (int p = 0; p < 16; p++) _mm512_store_si512(dst + 16 * p, r[p]);
        }
}

/* out rows 0 .. rows-1 (ldo floats apart, dv columns) = o / l, 0 where l = 0: per 16 columns and half, o's 16
 * rows scaled lane-wise by 1 / l, then transposed to 16 query rows */
SDCLI_BF16_AVX512_TARGET static void sdcli_bf16_attn_output_avx512(const sdcli_bf16_attn_scratch *s, float *out,
                                                                   ptrdiff_t ldo, ptrdiff_t rows, ptrdiff_t dv) {
    for (ptrdiff_t h = 0; h < 2 && 16 * h < rows; h++) {
        const __m512 l = _mm512_load_ps(s->l + 16 * h);
        const __mmask16 seen = _mm512_cmp_ps_mask(l, _mm512_setzero_ps(), _CMP_GT_OQ);
        const __m512 inverse = _mm512_maskz_div_ps(seen, _mm512_set1_ps(1.0f), l);
        for (ptrdiff_t c0 = 0; c0 < dv; c0 += 16) {
            const float *o = s->o + (c0 / 16 * 2 + h) * 256;
            const ptrdiff_t count = dv - c0 < 16 ? dv - c0 : 16;
            const __mmask16 mask = (__mmask16)((1u << count) - 1);
            __m512i r[16];
#pragma GCC unroll 16
            for (int c = 0; c < 16; c++) r[c] = (__m512i)_mm512_mul_ps(_mm512_load_ps(o + 16 * c), inverse);
            sdcli_bf16_attn_transpose16(r);
            for (ptrdiff_t i = 0; i < 16 && 16 * h + i < rows; i++)
                _mm512_mask_storeu_ps(out + (16 * h + i) * ldo + c0, mask, (__m512)r[i]);
        }
    }
}
#endif

/* ------------------------------------------------------------------------------------------- conversions */

#ifdef SDCLI_BF16_X86
SDCLI_BF16_AVX512_TARGET static void sdcli_bf16_attn_row_avx512(const float *x, ptrdiff_t count, uint16_t *dst,
                                                                ptrdiff_t n) {
    for (ptrdiff_t g = 0; g < n; g += 32) _mm512_storeu_si512(dst + g, sdcli_bf16_cvt32(x + g, count - g));
}
#endif

/* bf16 of the `count` floats at x into dst[0:n] (n >= count, a multiple of 32), zeros past count */
static void sdcli_bf16_attn_row(int level, const float *x, ptrdiff_t count, uint16_t *dst, ptrdiff_t n) {
#ifdef SDCLI_BF16_X86
    if (level >= SDCLI_BF16_AVX512) {
        sdcli_bf16_attn_row_avx512(x, count, dst, n);
        return;
    }
#endif
    (void)level;
    for (ptrdiff_t j = 0; j < n; j++) dst[j] = j < count ? (uint16_t)sdcli_bf16_from_float(x[j]) : 0;
}

/* the head's k (tk, d) and v (tk, dv), rows ldk and ldv floats apart, into s->k and s->vt (layouts above) */
static void sdcli_bf16_attn_pack_head(int level, const float *k, ptrdiff_t ldk, const float *v, ptrdiff_t ldv,
                                      ptrdiff_t tk, ptrdiff_t d, ptrdiff_t dv, sdcli_bf16_attn_scratch *s) {
    const ptrdiff_t dp = sdcli_bf16_round_up(d, 32), dv_pad = sdcli_bf16_round_up(dv, 16);
    const ptrdiff_t tk_pad = sdcli_bf16_round_up(tk, SDCLI_BF16_ATTN_KEYS), dv32 = sdcli_bf16_round_up(dv, 32);
    for (ptrdiff_t j = 0; j < tk; j++) sdcli_bf16_attn_row(level, k + j * ldk, d, s->k + j * dp, dp);
    memset(s->k + tk * dp, 0, (size_t)((tk_pad - tk) * dp) * sizeof(uint16_t));
#ifdef SDCLI_BF16_X86
    if (level >= SDCLI_BF16_AVX512) {
        sdcli_bf16_attn_pack_values_avx512(v, ldv, tk, dv, s);
        return;
    }
#endif
    uint16_t row[dv32 > 0 ? dv32 : 1];
    for (ptrdiff_t j = 0; j < tk_pad; j++) {
        if (j < tk)
            sdcli_bf16_attn_row(level, v + j * ldv, dv, row, dv32);
        else
            memset(row, 0, (size_t)dv32 * sizeof(uint16_t));
        uint16_t *column = s->vt + j / 32 * dv_pad * 32 + j % 32; /* [j / 32, 0, j % 32] */
        for (ptrdiff_t c = 0; c < dv_pad; c++) column[c * 32] = row[c];
    }
}

/* the task's queries i0 .. i0 + rows - 1 (rows <= 32; zeros for the others) into s->qrows and s->qt, negated when
 * `negate` (sign flips are exact in bf16) */
static void sdcli_bf16_attn_pack_queries(int level, const float *q, ptrdiff_t ldq, ptrdiff_t rows, ptrdiff_t d,
                                         int negate, sdcli_bf16_attn_scratch *s) {
    const ptrdiff_t dp = sdcli_bf16_round_up(d, 32), groups = dp / 32;
    for (ptrdiff_t r = 0; r < 32; r++) {
        uint16_t *dst = s->qrows + r * dp;
        if (r < rows)
            sdcli_bf16_attn_row(level, q + r * ldq, d, dst, dp);
        else
            memset(dst, 0, (size_t)dp * sizeof(uint16_t));
        if (negate)
            for (ptrdiff_t c = 0; c < dp; c++) dst[c] ^= 0x8000u;
    }
#ifdef SDCLI_BF16_X86
    if (level >= SDCLI_BF16_AVX512) {
        sdcli_bf16_attn_qt_avx512(s, dp);
        return;
    }
#endif
    const uint32_t *pairs = (const uint32_t *)s->qrows; /* (32, dp/2) */
    for (ptrdiff_t h = 0; h < 2; h++)
        for (ptrdiff_t g = 0; g < groups; g++)
            for (ptrdiff_t p = 0; p < 16; p++)
                for (ptrdiff_t i = 0; i < 16; i++)
                    s->qt[((h * groups + g) * 16 + p) * 16 + i] = pairs[(16 * h + i) * (dp / 2) + 16 * g + p];
}

/* ----------------------------------------------------------------------------------------- portable level */

static void sdcli_bf16_attn_scores_portable(const sdcli_bf16_attn_scratch *s, ptrdiff_t j0, ptrdiff_t keys,
                                            ptrdiff_t dp) {
    const ptrdiff_t groups = dp / 32;
    for (ptrdiff_t h = 0; h < 2; h++)
        for (ptrdiff_t j = 0; j < keys; j++)
            for (ptrdiff_t i = 0; i < 16; i++) {
                float total = 0;
                for (ptrdiff_t p = 0; p < dp / 2; p++) {
                    const uint32_t pair = s->qt[((h * groups + p / 16) * 16 + p % 16) * 16 + i];
                    const uint16_t *key = s->k + (j0 + j) * dp + 2 * p;
                    total += sdcli_bf16_to_float(key[0]) * sdcli_bf16_to_float((uint16_t)pair) +
                             sdcli_bf16_to_float(key[1]) * sdcli_bf16_to_float((uint16_t)(pair >> 16));
                }
                s->s[(h * SDCLI_BF16_ATTN_KEYS + j) * 16 + i] = total;
            }
}

static void sdcli_bf16_attn_softmax_portable(sdcli_bf16_attn_scratch *s, ptrdiff_t keys, ptrdiff_t dv_pad,
                                             float c) {
    for (ptrdiff_t h = 0; h < 2; h++)
        for (ptrdiff_t i = 0; i < 16; i++) {
            const ptrdiff_t lane = 16 * h + i;
            const float *scores = s->s + h * SDCLI_BF16_ATTN_KEYS * 16 + i;
            float block_max = -INFINITY;
            for (ptrdiff_t j = 0; j < keys; j++) block_max = scores[16 * j] > block_max ? scores[16 * j] : block_max;
            const float bm = block_max * c, m = s->m[lane];
            if (bm > m + SDCLI_BF16_ATTN_TAU) { /* raise the running max: rescale what was summed */
                const float correction = exp2f(m - bm); /* 0 for the first block (m = -inf) */
                s->l[lane] *= correction;
                for (ptrdiff_t col = 0; col < dv_pad; col++)
                    s->o[((col / 16 * 2 + h) * 16 + col % 16) * 16 + i] *= correction;
                s->m[lane] = bm;
            }
            const float shift = s->m[lane] == -INFINITY ? 0 : s->m[lane];
            float sum = 0;
            uint32_t *pairs = s->p + h * SDCLI_BF16_ATTN_KEYS / 2 * 16 + i;
            for (ptrdiff_t r = 0; r < sdcli_bf16_round_up(keys, 32) / 2; r++) {
                float e[2] = {0, 0};
                for (int t = 0; t < 2; t++)
                    if (2 * r + t < keys) e[t] = exp2f(scores[16 * (2 * r + t)] * c - shift);
                sum += e[0] + e[1];
                pairs[16 * r] = sdcli_bf16_from_float(e[1]) << 16 | sdcli_bf16_from_float(e[0]);
            }
            s->l[lane] += sum;
        }
}

static void sdcli_bf16_attn_values_portable(sdcli_bf16_attn_scratch *s, ptrdiff_t j0, ptrdiff_t keys,
                                            ptrdiff_t dv_pad) {
    for (ptrdiff_t h = 0; h < 2; h++)
        for (ptrdiff_t col = 0; col < dv_pad; col++)
            for (ptrdiff_t i = 0; i < 16; i++) {
                float *acc = s->o + ((col / 16 * 2 + h) * 16 + col % 16) * 16 + i;
                float total = *acc;
                for (ptrdiff_t r = 0; r < sdcli_bf16_round_up(keys, 32) / 2; r++) {
                    const uint32_t pair = s->p[(h * SDCLI_BF16_ATTN_KEYS / 2 + r) * 16 + i];
                    const uint16_t *vs = s->vt + ((j0 + 2 * r) / 32 * dv_pad + col) * 32 + 2 * r % 32;
                    total += sdcli_bf16_to_float(vs[0]) * sdcli_bf16_to_float((uint16_t)pair) +
                             sdcli_bf16_to_float(vs[1]) * sdcli_bf16_to_float((uint16_t)(pair >> 16));
                }
                *acc = total;
            }
}

/* --------------------------------------------------------------------------------------- AVX-512 levels */

#ifdef SDCLI_BF16_X86

/* 2^x for x <= TAU, -inf or very negative (0): x = n + f, |f| <= 1/2, 2^f by a degree-4 polynomial (relative
 * error 2.7e-6, far below the 2^-9 of the bf16 rounding of p), scaled by 2^n with VSCALEFPS */
SDCLI_BF16_AVX512_TARGET SDCLI_BF16_INLINE __m512 sdcli_bf16_attn_exp2(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-200.0f)); /* -inf -> 2^-200 = 0, without an inf - inf */
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, n);
    __m512 y = _mm512_fmadd_ps(_mm512_set1_ps(9.560510206e-3f), f, _mm512_set1_ps(5.591703917e-2f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(2.402498111e-1f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(6.931219677e-1f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(9.999991909e-1f));
    return _mm512_scalef_ps(y, n);
}

/* The streaming softmax of one key block (`keys` scores per query in s->s, causal masking already applied):
 * raise the running max where needed (rescaling o and l), then p = 2^(c s - m) into s->p as bf16 pairs (zero
 * pairs up to the next 32 keys), l += the float32 sum of p. */
SDCLI_BF16_AVX512_TARGET static void sdcli_bf16_attn_softmax_avx512(sdcli_bf16_attn_scratch *s, ptrdiff_t keys,
                                                                    ptrdiff_t dv_pad, float scale_log2) {
    /* [a[0..15] | b[0..15]] (16-bit lanes) -> a[0] b[0] a[1] b[1] ...: the pairs */
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                                22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512 c = _mm512_set1_ps(scale_log2), minus_inf = _mm512_set1_ps(-INFINITY);
    const ptrdiff_t pairs = (keys + 1) / 2, pairs_end = sdcli_bf16_round_up(keys, 32) / 2;
    for (ptrdiff_t h = 0; h < 2; h++) {
        const float *scores = s->s + h * SDCLI_BF16_ATTN_KEYS * 16;
        __m512 block_max = minus_inf;
        for (ptrdiff_t j = 0; j < keys; j++) block_max = _mm512_max_ps(block_max, _mm512_load_ps(scores + 16 * j));
        const __m512 bm = _mm512_mul_ps(block_max, c);
        __m512 m = _mm512_load_ps(s->m + 16 * h);
        if (_mm512_cmp_ps_mask(bm, _mm512_add_ps(m, _mm512_set1_ps(SDCLI_BF16_ATTN_TAU)), _CMP_GT_OQ)) {
            const __m512 raised = _mm512_max_ps(m, bm);
            /* 0 where m was -inf (nothing summed yet), 1 where nothing has been seen at all */
            const __mmask16 unseen = _mm512_cmp_ps_mask(raised, minus_inf, _CMP_EQ_OQ);
            const __m512 correction = _mm512_mask_blend_ps(unseen, sdcli_bf16_attn_exp2(_mm512_sub_ps(m, raised)),
                                                           _mm512_set1_ps(1.0f));
            _mm512_store_ps(s->l + 16 * h, _mm512_mul_ps(_mm512_load_ps(s->l + 16 * h), correction));
            for (ptrdiff_t cg = 0; cg < dv_pad / 16; cg++) {
                float *o = s->o + (cg * 2 + h) * 256;
                for (int r = 0; r < 16; r++)
                    _mm512_store_ps(o + 16 * r, _mm512_mul_ps(_mm512_load_ps(o + 16 * r), correction));
            }
            m = raised;
            _mm512_store_ps(s->m + 16 * h, m);
        }
        /* lanes that have seen nothing (all -inf so far) shift by 0: 2^(-inf) = 0, not nan */
        const __m512 shift = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(m, minus_inf, _CMP_EQ_OQ), m, _mm512_setzero_ps());
        __m512 sum0 = _mm512_setzero_ps(), sum1 = _mm512_setzero_ps();
        uint32_t *p = s->p + h * SDCLI_BF16_ATTN_KEYS / 2 * 16;
        ptrdiff_t r = 0;
        for (; r < keys / 2; r++) {
            const __m512 e0 = sdcli_bf16_attn_exp2(_mm512_fmsub_ps(_mm512_load_ps(scores + 32 * r), c, shift));
            const __m512 e1 = sdcli_bf16_attn_exp2(_mm512_fmsub_ps(_mm512_load_ps(scores + 32 * r + 16), c, shift));
            sum0 = _mm512_add_ps(sum0, e0);
            sum1 = _mm512_add_ps(sum1, e1);
            _mm512_store_si512(p + 16 * r, _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(e1, e0)));
        }
        if (r < pairs) { /* an odd last key */
            const __m512 e0 = sdcli_bf16_attn_exp2(_mm512_fmsub_ps(_mm512_load_ps(scores + 32 * r), c, shift));
            sum0 = _mm512_add_ps(sum0, e0);
            const __m512i halves = (__m512i)_mm512_cvtne2ps_pbh(_mm512_setzero_ps(), e0);
            _mm512_store_si512(p + 16 * r, _mm512_permutexvar_epi16(interleave, halves));
            r++;
        }
        for (; r < pairs_end; r++) _mm512_store_si512(p + 16 * r, _mm512_setzero_si512());
        _mm512_store_ps(s->l + 16 * h, _mm512_add_ps(_mm512_load_ps(s->l + 16 * h), _mm512_add_ps(sum0, sum1)));
    }
}

/* AVX512_BF16 scores: S^T for 8 keys at a time, both halves of queries (16 accumulators); per pair of d, the
 * two rows of qt and each key's pair broadcast */
SDCLI_BF16_AVX512_TARGET static void sdcli_bf16_attn_scores_avx512(sdcli_bf16_attn_scratch *s, ptrdiff_t j0,
                                                                   ptrdiff_t keys, ptrdiff_t dp) {
    const ptrdiff_t groups = dp / 32;
    for (ptrdiff_t j = 0; j < keys; j += 8) { /* rows past keys are zero keys (tk_pad) or next ones: harmless */
        __m512 acc[8][2];
        const uint32_t *key[8];
#pragma GCC unroll 8
        for (int t = 0; t < 8; t++) {
            acc[t][0] = acc[t][1] = _mm512_setzero_ps();
            key[t] = (const uint32_t *)(s->k + (j0 + j + t) * dp);
        }
        for (ptrdiff_t p = 0; p < dp / 2; p++) {
            const uint32_t *row = s->qt + ((p / 16) * 16 + p % 16) * 16;
            const __m512bh q0 = (__m512bh)_mm512_load_si512(row), q1 = (__m512bh)_mm512_load_si512(row + groups * 256);
#pragma GCC unroll 8
            for (int t = 0; t < 8; t++) {
                const __m512bh kp = (__m512bh)_mm512_set1_epi32((int)key[t][p]);
                acc[t][0] = _mm512_dpbf16_ps(acc[t][0], kp, q0);
                acc[t][1] = _mm512_dpbf16_ps(acc[t][1], kp, q1);
            }
        }
#pragma GCC unroll 8
        for (int t = 0; t < 8; t++) {
            _mm512_store_ps(s->s + (j + t) * 16, acc[t][0]);
            _mm512_store_ps(s->s + (SDCLI_BF16_ATTN_KEYS + j + t) * 16, acc[t][1]);
        }
    }
}

/* AVX512_BF16 values: O^T += V^T P^T for 8 output columns at a time, both halves (16 accumulators); per pair of
 * keys, the two rows of p and each column's pair of values broadcast */
SDCLI_BF16_AVX512_TARGET static void sdcli_bf16_attn_values_avx512(sdcli_bf16_attn_scratch *s, ptrdiff_t j0,
                                                                   ptrdiff_t keys, ptrdiff_t dv_pad) {
    const ptrdiff_t pairs = (keys + 1) / 2;
    for (ptrdiff_t col = 0; col < dv_pad; col += 8) {
        __m512 acc[8][2];
        float *o0 = s->o + ((col / 16 * 2) * 16 + col % 16) * 16, *o1 = o0 + 256;
#pragma GCC unroll 8
        for (int t = 0; t < 8; t++) {
            acc[t][0] = _mm512_load_ps(o0 + 16 * t);
            acc[t][1] = _mm512_load_ps(o1 + 16 * t);
        }
        for (ptrdiff_t r = 0; r < pairs; r++) {
            const __m512bh p0 = (__m512bh)_mm512_load_si512(s->p + 16 * r);
            const __m512bh p1 = (__m512bh)_mm512_load_si512(s->p + (SDCLI_BF16_ATTN_KEYS / 2 + r) * 16);
            const uint32_t *vs = (const uint32_t *)(s->vt + ((j0 + 2 * r) / 32 * dv_pad + col) * 32) + r % 16;
#pragma GCC unroll 8
            for (int t = 0; t < 8; t++) {
                const __m512bh vp = (__m512bh)_mm512_set1_epi32((int)vs[16 * t]);
                acc[t][0] = _mm512_dpbf16_ps(acc[t][0], vp, p0);
                acc[t][1] = _mm512_dpbf16_ps(acc[t][1], vp, p1);
            }
        }
#pragma GCC unroll 8
        for (int t = 0; t < 8; t++) {
            _mm512_store_ps(o0 + 16 * t, acc[t][0]);
            _mm512_store_ps(o1 + 16 * t, acc[t][1]);
        }
    }
}

/* the causal mask of a key block: query i0 + 16h + i sees key j0 + j only when j0 + j <= i0 + 16h + i */
SDCLI_BF16_AVX512_TARGET static void sdcli_bf16_attn_mask_avx512(float *scores, ptrdiff_t i0, ptrdiff_t j0,
                                                                  ptrdiff_t keys) {
    const __m512 lane = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (ptrdiff_t h = 0; h < 2; h++) {
        const ptrdiff_t first = i0 + 16 * h + 1 - j0; /* keys before this one are seen by every lane */
        for (ptrdiff_t j = first > 0 ? first : 0; j < keys; j++) {
            float *row = scores + (h * SDCLI_BF16_ATTN_KEYS + j) * 16;
            const __m512 key = _mm512_set1_ps((float)(j0 + j - i0 - 16 * h)); /* relative to the half's query 0 */
            const __mmask16 hidden = _mm512_cmp_ps_mask(lane, key, _CMP_LT_OQ);
            _mm512_store_ps(row, _mm512_mask_blend_ps(hidden, _mm512_load_ps(row), _mm512_set1_ps(-INFINITY)));
        }
    }
}
#endif /* SDCLI_BF16_X86 */

/* ------------------------------------------------------------------------------------------------- AMX */

#ifdef SDCLI_BF16_AMX_BUILD
#define SDCLI_TILE_ZERO(t) __asm__ volatile("{tilezero %%tmm" #t "|tilezero tmm" #t "}" ::: "memory")

/* S^T of a key block, 32 keys (two 16-key A tiles) by both halves of queries (two B tiles of qt) at a time: four
 * C tiles, each reused A or B tile loaded once per 32 of d */
SDCLI_BF16_AVX512_TARGET static void sdcli_bf16_attn_scores_amx(sdcli_bf16_attn_scratch *s, ptrdiff_t j0,
                                                                ptrdiff_t keys, ptrdiff_t dp) {
    const ptrdiff_t groups = dp / 32, k_stride = dp * 2;
    for (ptrdiff_t kk = 0; kk < keys; kk += 32) {
        const uint16_t *k0 = s->k + (j0 + kk) * dp, *k1 = k0 + 16 * dp;
        SDCLI_TILE_ZERO(0);
        SDCLI_TILE_ZERO(1);
        SDCLI_TILE_ZERO(2);
        SDCLI_TILE_ZERO(3);
        for (ptrdiff_t g = 0; g < groups; g++) {
            SDCLI_TILE_LOAD(4, k0 + 32 * g, k_stride);
            SDCLI_TILE_LOAD(6, s->qt + g * 256, 64);
            SDCLI_TILE_DP(0, 4, 6);
            SDCLI_TILE_LOAD(7, s->qt + (groups + g) * 256, 64);
            SDCLI_TILE_DP(1, 4, 7);
            SDCLI_TILE_LOAD(5, k1 + 32 * g, k_stride);
            SDCLI_TILE_DP(2, 5, 6);
            SDCLI_TILE_DP(3, 5, 7);
        }
        SDCLI_TILE_STORE(0, s->s + kk * 16, 64);
        SDCLI_TILE_STORE(1, s->s + (SDCLI_BF16_ATTN_KEYS + kk) * 16, 64);
        SDCLI_TILE_STORE(2, s->s + (kk + 16) * 16, 64);
        SDCLI_TILE_STORE(3, s->s + (SDCLI_BF16_ATTN_KEYS + kk + 16) * 16, 64);
    }
}

/* O^T += V^T P^T: per 16 output columns, the two C tiles of o (both halves) and, per 32 keys, one A tile of vt
 * against the two B tiles of p (kept in tmm2, tmm3 and tmm6, tmm7 for a second 32 keys) */
SDCLI_BF16_AVX512_TARGET static void sdcli_bf16_attn_values_amx(sdcli_bf16_attn_scratch *s, ptrdiff_t j0,
                                                                ptrdiff_t keys, ptrdiff_t dv_pad) {
    const uint32_t *p = s->p;
    const ptrdiff_t half = SDCLI_BF16_ATTN_KEYS / 2 * 16; /* uint32 from one half's p to the other's */
    for (ptrdiff_t kk = 0; kk < keys; kk += 64) {
        const int two = keys - kk > 32;
        SDCLI_TILE_LOAD(2, p + kk / 2 * 16, 64);
        SDCLI_TILE_LOAD(3, p + half + kk / 2 * 16, 64);
        if (two) {
            SDCLI_TILE_LOAD(6, p + (kk / 2 + 16) * 16, 64);
            SDCLI_TILE_LOAD(7, p + half + (kk / 2 + 16) * 16, 64);
        }
        const uint16_t *v0 = s->vt + (j0 + kk) / 32 * dv_pad * 32, *v1 = v0 + dv_pad * 32;
        for (ptrdiff_t cg = 0; cg < dv_pad / 16; cg++) {
            float *o = s->o + cg * 2 * 256;
            SDCLI_TILE_LOAD(0, o, 64);
            SDCLI_TILE_LOAD(1, o + 256, 64);
            SDCLI_TILE_LOAD(4, v0 + cg * 16 * 32, 64);
            SDCLI_TILE_DP(0, 4, 2);
            SDCLI_TILE_DP(1, 4, 3);
            if (two) {
                SDCLI_TILE_LOAD(5, v1 + cg * 16 * 32, 64);
                SDCLI_TILE_DP(0, 5, 6);
                SDCLI_TILE_DP(1, 5, 7);
            }
            SDCLI_TILE_STORE(0, o, 64);
            SDCLI_TILE_STORE(1, o + 256, 64);
        }
    }
}
#endif /* SDCLI_BF16_AMX_BUILD */

/* --------------------------------------------------------------------------------------------- the task */

/* One task: queries i0 .. i0 + 31 (fewer at the end) of one head, `head` its number (for the cache of converted
 * keys and values): q (tq, d), k (tk, d), v (tk, dv) -> out (tq, dv), rows strides[0..3] floats apart (q, k, v,
 * out). The AMX level needs sdcli_bf16_thread_begin on this thread first. */
static void sdcli_bf16_attention_task(int level, const float *q, const float *k, const float *v, float *out,
                                      const ptrdiff_t *strides, ptrdiff_t tq, ptrdiff_t tk, ptrdiff_t d,
                                      ptrdiff_t dv, int causal, float scale, ptrdiff_t head, ptrdiff_t i0,
                                      sdcli_bf16_attn_scratch *s) {
    const ptrdiff_t dp = sdcli_bf16_round_up(d, 32), dv_pad = sdcli_bf16_round_up(dv, 16);
    const ptrdiff_t rows = sdcli_bf16_min(SDCLI_BF16_ATTN_QUERIES, tq - i0);
    const ptrdiff_t key_end = causal ? sdcli_bf16_min(tk, i0 + rows) : tk;
    const float scale_log2 = fabsf(scale) * 1.44269504088896341f;
    if (s->head != head) {
        sdcli_bf16_attn_pack_head(level, k, strides[1], v, strides[2], tk, d, dv, s);
        s->head = head;
    }
    sdcli_bf16_attn_pack_queries(level, q + i0 * strides[0], strides[0], rows, d, scale < 0, s);
    for (int i = 0; i < 32; i++) {
        s->m[i] = -INFINITY;
        s->l[i] = 0;
    }
    memset(s->o, 0, (size_t)(32 * dv_pad) * sizeof(float));
    for (ptrdiff_t j0 = 0; j0 < key_end; j0 += SDCLI_BF16_ATTN_KEYS) {
        const ptrdiff_t keys = sdcli_bf16_min(SDCLI_BF16_ATTN_KEYS, key_end - j0);
#ifdef SDCLI_BF16_X86
        if (level >= SDCLI_BF16_AVX512) {
#ifdef SDCLI_BF16_AMX_BUILD
            if (level == SDCLI_BF16_AMX)
                sdcli_bf16_attn_scores_amx(s, j0, keys, dp);
            else
#endif
                sdcli_bf16_attn_scores_avx512(s, j0, keys, dp);
            if (causal && j0 + keys > i0 + 1) sdcli_bf16_attn_mask_avx512(s->s, i0, j0, keys);
            sdcli_bf16_attn_softmax_avx512(s, keys, dv_pad, scale_log2);
#ifdef SDCLI_BF16_AMX_BUILD
            if (level == SDCLI_BF16_AMX)
                sdcli_bf16_attn_values_amx(s, j0, keys, dv_pad);
            else
#endif
                sdcli_bf16_attn_values_avx512(s, j0, keys, dv_pad);
            continue;
        }
#endif
        sdcli_bf16_attn_scores_portable(s, j0, keys, dp);
        if (causal)
            for (ptrdiff_t h = 0; h < 2; h++)
                for (ptrdiff_t j = 0; j < keys; j++)
                    for (ptrdiff_t i = 0; i < 16; i++)
                        if (j0 + j > i0 + 16 * h + i) s->s[(h * SDCLI_BF16_ATTN_KEYS + j) * 16 + i] = -INFINITY;
        sdcli_bf16_attn_softmax_portable(s, keys, dv_pad, scale_log2);
        sdcli_bf16_attn_values_portable(s, j0, keys, dv_pad);
    }
#ifdef SDCLI_BF16_X86
    if (level >= SDCLI_BF16_AVX512) {
        sdcli_bf16_attn_output_avx512(s, out + i0 * strides[3], strides[3], rows, dv);
        return;
    }
#endif
    for (ptrdiff_t r = 0; r < rows; r++) {
        const float total = s->l[r];
        const float *o = s->o + r / 16 * 256 + r % 16; /* [0, r / 16, 0, r % 16] */
        float *dst = out + (i0 + r) * strides[3];
        for (ptrdiff_t col = 0; col < dv; col++)
            dst[col] = total > 0 ? o[(col / 16 * 2 * 16 + col % 16) * 16] / total : 0;
    }
}

#endif /* SDCLI_BF16_ATTENTION_H */
