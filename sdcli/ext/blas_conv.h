/* float32 convolution as im2col + BLAS sgemm (blas.h), for blas_kernels.pyx: the path of convolution weights in
 * their stored layout (Cout, Cin, kh, kw), i.e. everywhere the AVX-512 kernels with packed weights do not run.
 *
 * Per image b, the output (Cout, Ho*Wo) is W (Cout, K) @ columns (K, Ho*Wo), K = Cin kh kw, with k ordered as
 * PyTorch's weight is, k = (ci * kh + dy) * kw + dx, so W is the weight itself (no copy, no packing). The columns
 * are built a block of output pixels at a time, at most `column_floats` floats per block (blocks of equal size), and
 * each block is one sgemm writing its columns of the output in place (ldc = Ho*Wo): memory stays bounded as images
 * grow. Zero padding is written into the columns, never into a padded copy of x. A 1x1 stride-1 unpadded
 * convolution needs no columns: x[b] (Cin, H*W) is the B operand itself, one sgemm per image. Images of fewer than
 * SDCLI_BLAS_GROUP_PIXELS output pixels share one sgemm, several side by side in the columns, into a scratch that is
 * then copied out with the bias: the weight is read once per group, and the sgemm is wider (2 x 1280 channels of
 * 8 x 8: 48 -> 39 ms on 2 cores).
 * A bias is written into the output first and the sgemm adds to it (beta = 1), which saves a pass over the output;
 * without one the sgemm overwrites it (beta = 0).
 *
 * Threads: the BLAS threads each sgemm; im2col and the bias run on the calling thread alone, between the sgemm
 * calls. im2col is a copy bound by memory bandwidth, about a tenth of the sgemm's time for a 3x3 convolution: on
 * 2 cores, 2 OpenMP threads built the columns of a (2, 320, 64, 64) 3x3 layer in 11-12 ms against 12-15 ms on one,
 * and threads started right after an sgemm share the cores with the BLAS's threads, which spin for a while after
 * each call before they sleep. One thread keeps the two pools from ever running at once.
 * The column buffer is kept between calls, one per calling thread, so a model's convolutions do not fault in
 * fresh pages at every call; sdcli_blas_conv_release() frees the calling thread's.
 */
#ifndef SDCLI_BLAS_CONV_H
#define SDCLI_BLAS_CONV_H

#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "blas.h"

/* images of fewer output pixels share one sgemm (may be set with -D when measuring others) */
#ifndef SDCLI_BLAS_GROUP_PIXELS
#define SDCLI_BLAS_GROUP_PIXELS 1024
#endif

#if defined(_MSC_VER)
#define SDCLI_THREAD_LOCAL __declspec(thread)
#else
#define SDCLI_THREAD_LOCAL _Thread_local
#endif

static SDCLI_THREAD_LOCAL float *sdcli_blas_columns = NULL;
static SDCLI_THREAD_LOCAL size_t sdcli_blas_column_capacity = 0; /* floats */

/* The calling thread's column buffer of at least `floats` floats, or NULL when out of memory. */
static float *sdcli_blas_columns_get(size_t floats) {
    if (floats > sdcli_blas_column_capacity) {
        free(sdcli_blas_columns);
        sdcli_blas_columns = (float *)malloc(floats * sizeof(float));
        sdcli_blas_column_capacity = sdcli_blas_columns == NULL ? 0 : floats;
    }
    return sdcli_blas_columns;
}

static void sdcli_blas_conv_release(void) {
    free(sdcli_blas_columns);
    sdcli_blas_columns = NULL;
    sdcli_blas_column_capacity = 0;
}

/* Output columns [c_lo, c_hi) of one output row read input columns c * stride - pad + dx; those inside [0, w) are
 * the c in [first, end) computed here (first <= end, both clamped to [c_lo, c_hi]). */
static inline void sdcli_valid_columns(ptrdiff_t w, ptrdiff_t stride, ptrdiff_t pad, ptrdiff_t dx, ptrdiff_t c_lo,
                                       ptrdiff_t c_hi, ptrdiff_t *first, ptrdiff_t *end) {
    ptrdiff_t lo = pad - dx <= 0 ? 0 : (pad - dx + stride - 1) / stride; /* first c with c*stride - pad + dx >= 0 */
    ptrdiff_t hi = w - 1 + pad - dx < 0 ? 0 : (w - 1 + pad - dx) / stride + 1; /* one past the last c < w */
    lo = lo < c_lo ? c_lo : lo > c_hi ? c_hi : lo;
    hi = hi < lo ? lo : hi > c_hi ? c_hi : hi;
    *first = lo;
    *end = hi;
}

/* columns (K, count), rows ld floats apart = the im2col rows of output pixels [p0, p0 + count) of one image
 * x (Cin, H, W). */
static void sdcli_im2col(const float *x, ptrdiff_t cin, ptrdiff_t h, ptrdiff_t w, ptrdiff_t kh, ptrdiff_t kw,
                         ptrdiff_t stride, ptrdiff_t pad, ptrdiff_t wo, ptrdiff_t p0, ptrdiff_t count,
                         float *columns, ptrdiff_t ld) {
    ptrdiff_t rows = cin * kh * kw, row;
    for (row = 0; row < rows; row++) {
        ptrdiff_t ci = row / (kh * kw), dy = row / kw % kh, dx = row % kw;
        const float *plane = x + ci * h * w;
        float *dst = columns + row * ld;
        ptrdiff_t p = p0, p_end = p0 + count;
        while (p < p_end) { /* one output row (or the part of it in this block) at a time */
            ptrdiff_t r = p / wo, c_lo = p % wo;
            ptrdiff_t c_hi = c_lo + (p_end - p) < wo ? c_lo + (p_end - p) : wo;
            ptrdiff_t iy = r * stride - pad + dy, first, end, c;
            float *out = dst + (p - p0) - c_lo; /* out[c]: output column c of this row */
            if (iy < 0 || iy >= h) {
                memset(out + c_lo, 0, (size_t)(c_hi - c_lo) * sizeof(float));
            } else {
                const float *in = plane + iy * w - pad + dx; /* in[c * stride]: input of output column c */
                sdcli_valid_columns(w, stride, pad, dx, c_lo, c_hi, &first, &end);
                memset(out + c_lo, 0, (size_t)(first - c_lo) * sizeof(float));
                if (stride == 1)
                    memcpy(out + first, in + first, (size_t)(end - first) * sizeof(float));
                else
                    for (c = first; c < end; c++) out[c] = in[c * stride];
                memset(out + end, 0, (size_t)(c_hi - end) * sizeof(float));
            }
            p += c_hi - c_lo;
        }
    }
}

/* out (B, Cout, Ho, Wo) = conv2d(x (B, Cin, H, W), weight (Cout, Cin, kh, kw)) + bias (Cout,) or no bias (NULL),
 * all float32 C-contiguous, PyTorch Conv2d semantics (cross-correlation, zero padding). The caller has checked the
 * shapes and that Cout, K, Ho*Wo fit the BLAS integer. Returns 0, or -1 when the column buffer cannot be had. */
static int sdcli_blas_conv2d(const float *x, ptrdiff_t batch, ptrdiff_t cin, ptrdiff_t h, ptrdiff_t w,
                             const float *weight, ptrdiff_t cout, ptrdiff_t kh, ptrdiff_t kw, ptrdiff_t stride,
                             ptrdiff_t pad, const float *bias, float *out, ptrdiff_t ho, ptrdiff_t wo,
                             size_t column_floats) {
    ptrdiff_t k = cin * kh * kw, pixels = ho * wo, b, co;
    int direct = kh == 1 && kw == 1 && stride == 1 && pad == 0;
    float beta = bias == NULL ? 0.0f : 1.0f; /* 0: the sgemm overwrites the output */
    ptrdiff_t blocks = 1, block = pixels, images = 1;
    float *columns = NULL;
    if (batch == 0 || cout == 0)
        return 0;
    if (!direct && k > 0) { /* equal blocks of at most column_floats floats (at least one pixel) */
        ptrdiff_t most = (ptrdiff_t)(column_floats / (size_t)k);
        most = most < 1 ? 1 : most;
        blocks = (pixels + most - 1) / most;
        block = (pixels + blocks - 1) / blocks;
        if (blocks == 1 && batch > 1 && pixels < SDCLI_BLAS_GROUP_PIXELS) {
            /* small images: several per sgemm, so the weight is read once for all of them and the sgemm is wider;
             * their products go to a scratch (Cout, images * pixels) of at most column_floats floats too */
            ptrdiff_t fit = most / pixels, fit_out = (ptrdiff_t)(column_floats / (size_t)(cout * pixels));
            images = fit < fit_out ? fit : fit_out;
            images = images > batch ? batch : images < 1 ? 1 : images;
        }
        columns = sdcli_blas_columns_get((size_t)(k + (images > 1 ? cout : 0)) * (size_t)(block * images));
        if (columns == NULL)
            return -1;
    }
    if (images > 1) {
        float *products = columns + k * pixels * images; /* (Cout, images * pixels) */
        ptrdiff_t b0, i, p;
        for (b0 = 0; b0 < batch; b0 += images) {
            ptrdiff_t group = batch - b0 < images ? batch - b0 : images, width = group * pixels;
            for (i = 0; i < group; i++) /* image i's pixels are columns [i * pixels, (i + 1) * pixels) */
                sdcli_im2col(x + (b0 + i) * cin * h * w, cin, h, w, kh, kw, stride, pad, wo, 0, pixels,
                             columns + i * pixels, width);
            /* products (Cout, width) = weight (Cout, K) @ columns (K, width) */
            sdcli_sgemm(0, 0, cout, width, k, 1.0f, weight, k, columns, width, 0.0f, products, width);
            for (i = 0; i < group; i++)
                for (co = 0; co < cout; co++) {
                    const float *from = products + co * width + i * pixels;
                    float value = bias == NULL ? 0.0f : bias[co], *row = out + ((b0 + i) * cout + co) * pixels;
                    for (p = 0; p < pixels; p++) row[p] = from[p] + value;
                }
        }
        return 0;
    }
    for (b = 0; b < batch; b++) {
        const float *image = x + b * cin * h * w;
        float *y = out + b * cout * pixels; /* (Cout, Ho*Wo) */
        if (bias != NULL || k == 0) { /* the sgemm adds to the bias (beta 1); no input channels: the bias alone */
            for (co = 0; co < cout; co++) {
                float value = bias == NULL ? 0.0f : bias[co], *row = y + co * pixels;
                ptrdiff_t p;
                for (p = 0; p < pixels; p++) row[p] = value;
            }
        }
        if (k == 0)
            continue;
        if (direct) { /* y (Cout, H*W) = weight (Cout, Cin) @ x[b] (Cin, H*W) (+ bias) */
            sdcli_sgemm(0, 0, cout, pixels, k, 1.0f, weight, k, image, pixels, beta, y, pixels);
            continue;
        }
        {
            ptrdiff_t p0;
            for (p0 = 0; p0 < pixels; p0 += block) {
                ptrdiff_t count = pixels - p0 < block ? pixels - p0 : block;
                sdcli_im2col(image, cin, h, w, kh, kw, stride, pad, wo, p0, count, columns, count);
                /* y[:, p0:p0+count] (Cout, count) = weight (Cout, K) @ columns (K, count) (+ bias) */
                sdcli_sgemm(0, 0, cout, count, k, 1.0f, weight, k, columns, count, beta, y + p0, pixels);
            }
        }
    }
    return 0;
}

#endif /* SDCLI_BLAS_CONV_H */
