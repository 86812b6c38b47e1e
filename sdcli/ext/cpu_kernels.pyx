# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""Float32 CPU kernels behind :mod:`sdcli.ops.cpu_ops`.

Every kernel reads C-contiguous float32 arrays and writes into an ``out`` array of the caller's (cpu_ops converts,
flattens leading axes and allocates). The GIL is released; rows (attention: blocks of queries) run in parallel
when the module was built with OpenMP, one after another otherwise. No fast-math: inf and nan propagate as they do
in numpy. Reductions (means, variances, softmax sums) accumulate in double.
"""

from cython.parallel cimport parallel, prange
from libc.stddef cimport ptrdiff_t
from libc.stdint cimport uint16_t
from libc.math cimport INFINITY, expf, sqrt, sqrtf
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

cdef extern from "cpu_level.h":
    void sdcli_cpu_level_set(int level)

cdef extern from *:
    """
    #ifdef _OPENMP
    #define SDCLI_OPENMP 1
    #else
    #define SDCLI_OPENMP 0
    #endif
    """
    const int SDCLI_OPENMP

cdef extern from "vec.h" nogil:
    # c[0:8, 0:8] += a[0:8, 0:n] @ b[0:n, 0:8], the 8 x 8 tile in vector registers: the hot kernel of attention
    void sdcli_tile_8x8(const float* a, ptrdiff_t lda, const float* b, ptrdiff_t ldb, ptrdiff_t n, float* c,
                        ptrdiff_t ldc)
    # the largest of x[0:n], nan entries ignored
    float sdcli_max(const float* x, ptrdiff_t n)
    # y[j] = exp(x[j] - shift) for j < n (x and y may be the same array); returns the sum, accumulated in double
    double sdcli_exp_shifted(const float* x, float shift, ptrdiff_t n, float* y)
    # y[j] = x[j] / (1 + exp(-1.702 x[j])) for j < n
    void sdcli_quick_gelu(const float* x, ptrdiff_t n, float* y)
    # y[j] = x[j] sigmoid(2 sqrt(2/pi) (x[j] + 0.044715 x[j]^3)), GELU's tanh approximation, for j < n
    void sdcli_gelu_tanh(const float* x, ptrdiff_t n, float* y)
    # y[j] = x[j] Phi(x[j]), exact GELU, for j < n
    void sdcli_gelu(const float* x, ptrdiff_t n, float* y)
    # y[j] = value[j] gelu(gate[j]) for j < n
    void sdcli_geglu(const float* value, const float* gate, ptrdiff_t n, float* y)
    # the sum of x[j] - shift, or of its squares, for j < n, accumulated in double
    double sdcli_sum_shifted(const float* x, ptrdiff_t n, float shift, bint square)
    # the sum of (x[j] - mean)^2 for j < n, in double
    double sdcli_sum_centred_squares(const float* x, ptrdiff_t n, double mean)
    # y[j] = (x[j] - mean) scale + shift in double, rounded to float, then SiLU of that when silu, for j < n (x and y
    # may be the same array)
    void sdcli_normalize_shift(const float* x, ptrdiff_t n, double mean, double scale, double shift, bint silu,
                               float* y)
    # y[j] = (x[j] - mean) inverse_std weight[j] + bias[j] for j < n
    void sdcli_normalize_affine(const float* x, ptrdiff_t n, float mean, float inverse_std, const float* weight,
                                const float* bias, float* y)

from .arguments import attention_row_strides
from .levels import number as _cpu_level_number  # BackendError for an unknown SDCLI_CPU_LEVEL

sdcli_cpu_level_set(_cpu_level_number())  # this module's copy of the level, before anything asks for it

openmp = bool(SDCLI_OPENMP)  # True when this build runs rows in parallel

cdef enum:
    CHUNK = 4096  # elements per parallel task of the element-wise ops


cdef int _check_out(str name, tuple got, tuple expected) except -1:
    if got != expected:
        raise ValueError(f"{name}: out has shape {got}, expected {expected}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Row-wise and element-wise ops
# ---------------------------------------------------------------------------------------------------------------

cdef void _layer_norm_row(const float* x, const float* weight, const float* bias, float eps, float* y,
                          Py_ssize_t n) noexcept nogil:
    # two passes in double: the mean, then the biased variance of the centred values; then the affine step
    cdef float mean
    if n == 0:
        return
    mean = <float>(sdcli_sum_shifted(x, n, 0, False) / n)
    sdcli_normalize_affine(x, n, mean, <float>(1.0 / sqrt(sdcli_sum_shifted(x, n, mean, True) / n + eps)), weight,
                           bias, y)


def layer_norm(const float[:, ::1] x, const float[::1] weight, const float[::1] bias, float eps, float[:, ::1] out):
    """Normalise each row of x (rows, C) over C, then scale by weight (C,) and shift by bias (C,), into out."""
    cdef Py_ssize_t rows = x.shape[0], width = x.shape[1], r
    _check_out("layer_norm", (out.shape[0], out.shape[1]), (rows, width))
    if weight.shape[0] != width or bias.shape[0] != width:
        raise ValueError(f"layer_norm: weight {weight.shape[0]} and bias {bias.shape[0]} must match the width {width}")
    if width == 0:
        return
    with nogil:
        for r in prange(rows, schedule="static"):
            _layer_norm_row(&x[r, 0], &weight[0], &bias[0], eps, &out[r, 0], width)


def gelu(const float[::1] x, float[::1] out):
    """Exact GELU, x Phi(x) with Phi(x) = erfc(-x / sqrt 2) / 2, element-wise (vec.h: Numerical Recipes' erfc,
    relative error below 1.2e-7, as numpy_ops.erf; erfc rather than 1 + erf keeps the negative tail accurate)."""
    cdef Py_ssize_t n = x.shape[0], chunk
    _check_out("gelu", (out.shape[0],), (n,))
    with nogil:
        for chunk in prange((n + CHUNK - 1) // CHUNK, schedule="static"):
            sdcli_gelu(&x[chunk * CHUNK], min(<Py_ssize_t>CHUNK, n - chunk * CHUNK), &out[chunk * CHUNK])


def geglu(const float[:, ::1] x, float[:, ::1] out):
    """GEGLU of each row of x (rows, 2 C): its first C values times the GELU of its last C, into out (rows, C)."""
    cdef Py_ssize_t rows = x.shape[0], width = out.shape[1], r
    _check_out("geglu", (out.shape[0], 2 * out.shape[1]), (rows, x.shape[1]))
    if width == 0:
        return
    with nogil:
        for r in prange(rows, schedule="static"):
            sdcli_geglu(&x[r, 0], &x[r, width], width, &out[r, 0])


cdef enum:
    TRANSPOSE_TILE = 32  # rows and columns of a block: 4 KB from each side, in L1


def transpose(const float[:, :, ::1] x, float[:, :, ::1] out):
    """out[b] = x[b].T for x (B, R, C) -> out (B, C, R): channels-first images to tokens and back. In blocks of
    32 x 32 (both sides' lines stay in L1; numpy's strided copy of a transposed view runs at a fifth of this),
    blocks of all batch entries in parallel."""
    cdef Py_ssize_t batch = x.shape[0], rows = x.shape[1], cols = x.shape[2], task, b, r0, c0, r, c, r1, c1
    cdef Py_ssize_t row_blocks = (rows + TRANSPOSE_TILE - 1) // TRANSPOSE_TILE
    cdef Py_ssize_t col_blocks = (cols + TRANSPOSE_TILE - 1) // TRANSPOSE_TILE
    _check_out("transpose", (out.shape[0], out.shape[1], out.shape[2]), (batch, cols, rows))
    with nogil:
        for task in prange(batch * row_blocks * col_blocks, schedule="static"):
            b = task // (row_blocks * col_blocks)
            r0 = task // col_blocks % row_blocks * TRANSPOSE_TILE
            c0 = task % col_blocks * TRANSPOSE_TILE
            r1 = min(rows, r0 + TRANSPOSE_TILE)
            c1 = min(cols, c0 + TRANSPOSE_TILE)
            for c in range(c0, c1):
                for r in range(r0, r1):
                    out[b, c, r] = x[b, r, c]


def upsample_nearest(const float[:, :, ::1] x, Py_ssize_t factor, float[:, :, ::1] out):
    """out[p, i, j] = x[p, i // factor, j // factor]: nearest-neighbour upsampling of planes (P, H, W) into out
    (P, factor H, factor W). Input rows of all planes in parallel: each writes its first output row value by value,
    then copies it factor - 1 times."""
    cdef Py_ssize_t planes = x.shape[0], height = x.shape[1], width = x.shape[2], task, p, i, j, k, r
    cdef float* row
    if factor < 1:
        raise ValueError(f"upsample_nearest: the factor must be at least 1, got {factor}")
    _check_out("upsample_nearest", (out.shape[0], out.shape[1], out.shape[2]),
               (planes, height * factor, width * factor))
    if planes == 0 or height == 0 or width == 0:
        return
    with nogil:
        for task in prange(planes * height, schedule="static"):
            p = task // height
            i = task % height
            row = &out[p, i * factor, 0]
            for j in range(width):
                for k in range(factor):
                    row[j * factor + k] = x[p, i, j]
            for r in range(1, factor):
                memcpy(&out[p, i * factor + r, 0], row, width * factor * sizeof(float))


def quick_gelu(const float[::1] x, float[::1] out):
    """x * sigmoid(1.702 x) = x / (1 + exp(-1.702 x)), element-wise."""
    cdef Py_ssize_t n = x.shape[0], chunk
    _check_out("quick_gelu", (out.shape[0],), (n,))
    with nogil:
        for chunk in prange((n + CHUNK - 1) // CHUNK, schedule="static"):
            sdcli_quick_gelu(&x[chunk * CHUNK], min(<Py_ssize_t>CHUNK, n - chunk * CHUNK), &out[chunk * CHUNK])


def gelu_tanh(const float[::1] x, float[::1] out):
    """GELU's tanh approximation, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), element-wise."""
    cdef Py_ssize_t n = x.shape[0], chunk
    _check_out("gelu_tanh", (out.shape[0],), (n,))
    with nogil:
        for chunk in prange((n + CHUNK - 1) // CHUNK, schedule="static"):
            sdcli_gelu_tanh(&x[chunk * CHUNK], min(<Py_ssize_t>CHUNK, n - chunk * CHUNK), &out[chunk * CHUNK])


cdef void _softmax_row(const float* x, float* y, Py_ssize_t n) noexcept nogil:
    # shifted by the row maximum, or by 0 when that is not finite (all -inf -> zeros), as numpy_ops.softmax
    cdef Py_ssize_t i
    cdef float row_max = sdcli_max(x, n), total_f
    cdef double total
    if row_max == INFINITY or row_max == -INFINITY:
        row_max = 0
    total = sdcli_exp_shifted(x, row_max, n, y)
    if total > 0:
        total_f = <float>total
        for i in range(n):
            y[i] = y[i] / total_f


def softmax(const float[:, ::1] x, float[:, ::1] out):
    """Softmax over the last axis of x (rows, C), into out."""
    cdef Py_ssize_t rows = x.shape[0], width = x.shape[1], r
    _check_out("softmax", (out.shape[0], out.shape[1]), (rows, width))
    if width == 0:
        return
    with nogil:
        for r in prange(rows, schedule="static"):
            _softmax_row(&x[r, 0], &out[r, 0], width)


cdef inline double _run_sum(const float* x, Py_ssize_t n, bint centred, double mean) noexcept nogil:
    # x[0:n] summed in double, or its squares centred on mean
    return sdcli_sum_centred_squares(x, n, mean) if centred else sdcli_sum_shifted(x, n, 0, False)


cdef double _group_sum(const float* x, Py_ssize_t channels, Py_ssize_t frames, Py_ssize_t positions,
                       Py_ssize_t channel_stride, Py_ssize_t frame_stride, bint centred, double mean) noexcept nogil:
    # The sum in double of one group's values (channels, frames, positions), or of their squares centred on mean:
    # over one run where the group is contiguous (images: the same order as always), else over the longest runs
    # its layout has (a video's frames lie apart: the channels of one frame, or one channel's positions).
    cdef Py_ssize_t c, f
    cdef double total = 0
    if (frames == 1 and channel_stride == positions
            or channel_stride == frames * positions and frame_stride == positions):
        return _run_sum(x, channels * frames * positions, centred, mean)
    if channel_stride == positions:
        for f in range(frames):
            total += _run_sum(x + f * frame_stride, channels * positions, centred, mean)
        return total
    for c in range(channels):
        for f in range(frames):
            total += _run_sum(x + c * channel_stride + f * frame_stride, positions, centred, mean)
    return total


def group_norm(const float[:, :, :, :] x, Py_ssize_t groups, const float[::1] weight, const float[::1] bias,
               double eps, bint silu, float[:, :, :, :] out):
    """GroupNorm of x (B, C, F, positions) with ``groups`` groups of C / groups channels, each normalised over its
    channels, the F frames and the positions, scaled by weight (C,) and shifted by bias (C,), then SiLU when
    ``silu``, into out (the same shape). x and out may be views whose rows of positions lie apart: a (B, C, F, P)
    view of video frames (B, F, C, P) is read and written in place. Groups of all entries run in parallel.

    In double as numpy_ops.group_norm: the mean, the biased variance of the values centred on it, and per channel
    y = (x - mean) weight / std + bias, rounded to float once; then SiLU (in float) when asked. A float mean, or
    y = x scale + (bias - mean scale) in float, would lose ulps of the mean divided by the standard deviation in
    groups whose spread is small against their mean."""
    cdef Py_ssize_t batch = x.shape[0], channels = x.shape[1], frames = x.shape[2], positions = x.shape[3]
    cdef Py_ssize_t per_group, task, b, g, c, f, size
    cdef Py_ssize_t x_channel = x.strides[1] // sizeof(float), x_frame = x.strides[2] // sizeof(float)
    cdef double mean, inverse_std
    _check_out("group_norm", (out.shape[0], out.shape[1], out.shape[2], out.shape[3]),
               (batch, channels, frames, positions))
    if groups <= 0 or channels % groups:
        raise ValueError(f"group_norm: {channels} channels do not split into {groups} groups")
    if weight.shape[0] != channels or bias.shape[0] != channels:
        raise ValueError(f"group_norm: weight {weight.shape[0]} and bias {bias.shape[0]} must match the {channels} "
                         "channels")
    if positions > 1 and (x.strides[3] != sizeof(float) or out.strides[3] != sizeof(float)):
        raise ValueError("group_norm: the positions of x and out must be contiguous")
    if x.strides[1] % sizeof(float) or x.strides[2] % sizeof(float):
        raise ValueError("group_norm: x must be laid out in whole floats")
    per_group = channels // groups
    size = per_group * frames * positions
    if batch == 0 or size == 0:
        return
    with nogil:
        for task in prange(batch * groups, schedule="static"):
            b = task // groups
            g = task % groups
            mean = _group_sum(&x[b, g * per_group, 0, 0], per_group, frames, positions, x_channel, x_frame, False,
                              0) / size
            inverse_std = 1.0 / sqrt(_group_sum(&x[b, g * per_group, 0, 0], per_group, frames, positions, x_channel,
                                                x_frame, True, mean) / size + eps)
            for c in range(g * per_group, (g + 1) * per_group):
                for f in range(frames):
                    sdcli_normalize_shift(&x[b, c, f, 0], positions, mean, weight[c] * inverse_std, bias[c], silu,
                                          &out[b, c, f, 0])


# ---------------------------------------------------------------------------------------------------------------
# Widening fp16 and bf16 weights to float32, for layers that hold them at reduced precision and compute in float32
# ---------------------------------------------------------------------------------------------------------------

cdef extern from * nogil:
    """
    #include <stdint.h>
    #include <string.h>

    /* IEEE binary16 bits -> float, exactly: normals rebias the exponent, subnormals are m 2^-24, inf/nan keep
     * their payload */
    static inline float sdcli_half_bits_to_float(uint16_t h) {
        const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
        uint32_t bits;
        if (exponent == 0x1fu) {
            bits = sign | 0x7f800000u | (mantissa << 13);
        } else if (exponent != 0) {
            bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
        } else {
            const float magnitude = (float)mantissa * 5.9604644775390625e-8f; /* 2^-24, exact */
            return sign ? -magnitude : magnitude;
        }
        float value;
        memcpy(&value, &bits, sizeof value);
        return value;
    }

    static void sdcli_half_to_float_portable(const uint16_t *x, ptrdiff_t n, float *y) {
        for (ptrdiff_t i = 0; i < n; i++) y[i] = sdcli_half_bits_to_float(x[i]);
    }

    #if defined(SDCLI_X86_DISPATCH)
    #include <immintrin.h>
    /* 8 at a time with the F16C instruction, which converts exactly */
    __attribute__((target("avx,f16c"))) static void sdcli_half_to_float_f16c(const uint16_t *x, ptrdiff_t n,
                                                                              float *y) {
        ptrdiff_t i = 0;
        for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + i))));
        sdcli_half_to_float_portable(x + i, n - i, y + i);
    }
    /* F16C is part of the avx2 level of cpu_level.h (every CPU with AVX2 has it) */
    static int sdcli_has_f16c(void) { return sdcli_has_avx2(); }
    /* float -> half bits with F16C, rounding to nearest even (as numpy's astype(float16)) */
    __attribute__((target("avx,f16c"))) static void sdcli_float_to_half_f16c(const float *x, ptrdiff_t n,
                                                                              uint16_t *y) {
        ptrdiff_t i = 0;
        for (; i + 8 <= n; i += 8)
            _mm_storeu_si128((__m128i *)(y + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
        if (i < n) {
            float rest[8] = {0};
            uint16_t bits[8];
            memcpy(rest, x + i, (size_t)(n - i) * sizeof(float));
            _mm_storeu_si128((__m128i *)bits, _mm256_cvtps_ph(_mm256_loadu_ps(rest), _MM_FROUND_TO_NEAREST_INT));
            memcpy(y + i, bits, (size_t)(n - i) * sizeof(uint16_t));
        }
    }
    #else
    static void sdcli_float_to_half_f16c(const float *x, ptrdiff_t n, uint16_t *y) {}
    static void sdcli_half_to_float_f16c(const uint16_t *x, ptrdiff_t n, float *y) { sdcli_half_to_float_portable(x, n, y); }
    static int sdcli_has_f16c(void) { return 0; }
    #endif

    /* float -> bf16 bits, rounding to nearest even; a nan stays a quiet nan of its sign (as float32_to_bf16) */
    static void sdcli_float_to_bf16(const float *x, ptrdiff_t n, uint16_t *y) {
        const uint32_t *in = (const uint32_t *)x;
        for (ptrdiff_t i = 0; i < n; i++) {
            const uint32_t u = in[i];
            const int nan = (u & 0x7fffffffu) > 0x7f800000u;
            y[i] = nan ? (uint16_t)((u >> 16) | 0x40u) : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
        }
    }

    /* bf16 bits -> float: the bits become the top half of the float (exact) */
    static void sdcli_bf16_to_float(const uint16_t *x, ptrdiff_t n, float *y) {
        uint32_t *out = (uint32_t *)y;
        for (ptrdiff_t i = 0; i < n; i++) out[i] = (uint32_t)x[i] << 16;
    }
    """
    void sdcli_half_to_float_f16c(const uint16_t* x, ptrdiff_t n, float* y)
    void sdcli_half_to_float_portable(const uint16_t* x, ptrdiff_t n, float* y)
    bint sdcli_has_f16c()
    void sdcli_bf16_to_float(const uint16_t* x, ptrdiff_t n, float* y)
    void sdcli_float_to_bf16(const float* x, ptrdiff_t n, uint16_t* y)
    void sdcli_float_to_half_f16c(const float* x, ptrdiff_t n, uint16_t* y)


def narrow_to_bf16(const float[::1] x, uint16_t[::1] out):
    """bf16 bits of float32 values, rounding to nearest even (nan: a quiet nan of its sign), into out."""
    cdef Py_ssize_t n = x.shape[0], chunk, start
    _check_out("narrow_to_bf16", (out.shape[0],), (n,))
    with nogil:
        for chunk in prange((n + 16 * CHUNK - 1) // (16 * CHUNK), schedule="static"):
            start = chunk * 16 * CHUNK
            sdcli_float_to_bf16(&x[start], min(<Py_ssize_t>(16 * CHUNK), n - start), &out[start])


def narrow_to_half(const float[::1] x, uint16_t[::1] out):
    """IEEE half bits of float32 values, rounding to nearest even, into out; returns False (and writes nothing)
    where the CPU level has no F16C (below "avx2"), for the caller to convert another way."""
    cdef Py_ssize_t n = x.shape[0], chunk, start
    _check_out("narrow_to_half", (out.shape[0],), (n,))
    if not sdcli_has_f16c():
        return False
    with nogil:
        for chunk in prange((n + 16 * CHUNK - 1) // (16 * CHUNK), schedule="static"):
            start = chunk * 16 * CHUNK
            sdcli_float_to_half_f16c(&x[start], min(<Py_ssize_t>(16 * CHUNK), n - start), &out[start])
    return True


def widen(const uint16_t[::1] bits, bint bf16, float[::1] out):
    """float32 values of 16-bit floats, exactly: IEEE half bits (``bf16`` false) or bfloat16 bits, into out.
    Parallel over chunks; half uses the F16C instructions from the CPU level "avx2" up."""
    cdef Py_ssize_t n = bits.shape[0], chunk, start
    cdef bint f16c = sdcli_has_f16c()
    _check_out("widen", (out.shape[0],), (n,))
    with nogil:
        for chunk in prange((n + 16 * CHUNK - 1) // (16 * CHUNK), schedule="static"):
            start = chunk * 16 * CHUNK
            if bf16:
                sdcli_bf16_to_float(&bits[start], min(<Py_ssize_t>(16 * CHUNK), n - start), &out[start])
            elif f16c:
                sdcli_half_to_float_f16c(&bits[start], min(<Py_ssize_t>(16 * CHUNK), n - start), &out[start])
            else:
                sdcli_half_to_float_portable(&bits[start], min(<Py_ssize_t>(16 * CHUNK), n - start), &out[start])


# ---------------------------------------------------------------------------------------------------------------
# Fused attention with a streaming softmax (Milakov & Gimelshein 2018, "Online normalizer calculation for
# softmax"; the FlashAttention recurrence, Dao et al. 2022), so no (Tq, Tk) score matrix exists.
#
# Tiling. The unit of work is a block of 32 queries of one head; blocks of all heads run in parallel. A block
# keeps two 16-lane vectors per quantity, one lane per query: its queries transposed, qt (d, 32); the running max
# and sum (32); the output transposed, ot (dv, 32); and the scores of one block of 128 keys, p (128, 32). For each
# key block:
#   scores   p[j] = sum_c k[j, c] qt[c]: a register tile of 8 keys by the 32 queries, each k[j, c] broadcast
#            against the two vectors of qt[c], so K is read in place (no transpose), each value loaded once for
#            two FMAs (blocks of 16 queries, one FMA per load, measured 10-12% slower at 1024-4096 tokens)
#   softmax  lane-wise: new max, exp(old max - new max) to rescale ot and the sum, p = exp(p - max), all with
#            vertical vector ops and vec.h's vectorised exp (no horizontal reductions)
#   values   ot[c] += sum_j v[j, c] p[j]: a register tile of 8 output columns by the 32 queries, v[j, c] broadcast
# A key block's K and V rows (2 x 128 x d floats) stay in L1 or L2 across the steps, the whole head's K and V in
# L2 across the query blocks that reuse them; 128 keys rather than 64 measured a few % faster at d = 40 and 80.
# Scratch: 2 (d + dv + 128) vectors per thread. The vector code uses
# GCC/Clang vector types of 16 floats, one AVX-512 register each, and is compiled for AVX-512 alone; CPUs without
# it (and other compilers, other architectures) run _attention_head: per head, 8 query rows at a time against
# 64-key blocks of a transposed K, with vec.h's 8 x 8 register tile.
# ---------------------------------------------------------------------------------------------------------------

cdef extern from * nogil:
    """
    /* Fused attention, one block of 32 queries of one head at a time (the tiling is described above).
     * The block's state lives in vectors of 16 lanes, one lane per query, so the streaming softmax is lane-wise
     * (no horizontal reductions) and only the 16 x d query block is ever transposed. Written with GCC/Clang
     * vector types for AVX-512 (one register per vector), compiled for that target alone and used from the CPU
     * level avx512 up (cpu_level.h); elsewhere attention() runs _attention_head. */
    #ifdef SDCLI_X86_DISPATCH
    #define SDCLI_AVX512 __attribute__((target("avx512f,avx512dq,avx2,fma")))

    /* vec.h's 16-lane AVX-512 vector types and element-wise kernels (load, select, exp, ...) */
    #pragma GCC diagnostic push
    #ifndef __clang__
    #pragma GCC diagnostic ignored "-Wpsabi"  /* 64-byte vector arguments: static functions, no ABI to keep */
    #endif

    #define SDCLI_QUERY_VECTORS 2 /* vectors of 16 queries per block */
    #define SDCLI_QUERY_BLOCK 32  /* queries per block: SDCLI_QUERY_VECTORS x the 16 lanes of sdcli_f16 */
    #define SDCLI_KEY_BLOCK 128   /* keys per step of the streaming softmax */
    #define SDCLI_TILE 8          /* keys, or output columns, per register tile: 16 of the 32 vector registers */
    #define SDCLI_INLINE SDCLI_AVX512 static inline __attribute__((always_inline))

    /* s[j] = k[j] . qt for j < keys (1 to SDCLI_TILE): scores of `keys` keys against the 32 queries of qt (d, 2
     * vectors), the keys' rows ldk floats apart; s[j] is two vectors. Always a whole tile, so that the
     * accumulators stay in registers and a short tile costs no more than a whole one: rows past `keys` repeat the
     * last key and s has room for SDCLI_TILE. Each k[j, c] loaded is used for both vectors of queries. */
    SDCLI_INLINE void sdcli_attention_scores(const sdcli_f16 *qt, const float *k, ptrdiff_t d, ptrdiff_t ldk,
                                             sdcli_f16 *s, int keys) {
        const float *row[SDCLI_TILE];
        sdcli_f16 acc[SDCLI_TILE][SDCLI_QUERY_VECTORS];
        #pragma GCC unroll 8
        for (int j = 0; j < SDCLI_TILE; j++) {
            row[j] = k + (j < keys ? j : keys - 1) * ldk;
            acc[j][0] = acc[j][1] = (sdcli_f16){0};
        }
        for (ptrdiff_t c = 0; c < d; c++) {
            const sdcli_f16 low = qt[2 * c], high = qt[2 * c + 1];
            #pragma GCC unroll 8
            for (int j = 0; j < SDCLI_TILE; j++) {
                const float key = row[j][c];
                acc[j][0] += key * low;
                acc[j][1] += key * high;
            }
        }
        #pragma GCC unroll 8
        for (int j = 0; j < SDCLI_TILE; j++) {
            s[2 * j] = acc[j][0];
            s[2 * j + 1] = acc[j][1];
        }
    }

    /* ot[c] += sum over j < keys of v[j, c] p[j] for c < columns (1 to SDCLI_TILE): `columns` columns of the
     * output (transposed, two vectors per column) of 32 queries, the value rows dv floats apart. Always a whole
     * tile, as above: columns past `columns` repeat the last one and are not stored. */
    SDCLI_INLINE void sdcli_attention_values(const sdcli_f16 *p, const float *v, ptrdiff_t dv, ptrdiff_t keys,
                                             sdcli_f16 *ot, int columns) {
        ptrdiff_t column[SDCLI_TILE];
        sdcli_f16 acc[SDCLI_TILE][SDCLI_QUERY_VECTORS];
        #pragma GCC unroll 8
        for (int c = 0; c < SDCLI_TILE; c++) {
            column[c] = c < columns ? c : columns - 1;
            acc[c][0] = ot[2 * column[c]];
            acc[c][1] = ot[2 * column[c] + 1];
        }
        for (ptrdiff_t j = 0; j < keys; j++) {
            const sdcli_f16 low = p[2 * j], high = p[2 * j + 1];
            #pragma GCC unroll 8
            for (int c = 0; c < SDCLI_TILE; c++) {
                const float value = v[j * dv + column[c]];
                acc[c][0] += value * low;
                acc[c][1] += value * high;
            }
        }
        #pragma GCC unroll 8
        for (int c = 0; c < SDCLI_TILE; c++)
            if (c < columns) {
                ot[2 * c] = acc[c][0];
                ot[2 * c + 1] = acc[c][1];
            }
    }

    /* exp(x) for the shifted scores, x <= 0, -inf or nan: vec.h's exp (the same polynomial, the same results)
     * without the branches that only x > 0 needs: n <= 0, so one scaling by 2^n suffices. */
    SDCLI_INLINE sdcli_f16 sdcli_attention_exp(sdcli_f16 x) {
        const sdcli_i16 underflow = x < -87.33654475f;  /* exp gives 0 (and -inf gives no valid n) */
        const sdcli_f16 fx = x * 1.44269504088896341f + 0.5f;
        sdcli_i16 n = __builtin_convertvector(fx, sdcli_i16);
        n += __builtin_convertvector(n, sdcli_f16) > fx; /* floor: true is -1 */
        const sdcli_f16 nf = __builtin_convertvector(n, sdcli_f16);
        const sdcli_f16 r = x - nf * 0.693359375f - nf * -2.12194440e-4f;
        sdcli_f16 y = 1.9875691500e-4f * r + 1.3981999507e-3f;
        y = y * r + 8.3334519073e-3f;
        y = y * r + 4.1665795894e-2f;
        y = y * r + 1.6666665459e-1f;
        y = y * r + 5.0000001201e-1f;
        y = y * (r * r) + r + 1.0f;
        y *= (sdcli_f16)((n + 127) << 23);
        return sdcli_select_w16(underflow, (sdcli_f16){0}, y);
    }

    /* The queries i0 .. i0 + 31 (fewer at the end) of one head: q (Tq, d), k (Tk, d), v (Tk, dv) -> out (Tq, dv),
     * each a matrix whose rows are `strides` floats apart (q, k, v, out): heads may be interleaved, as a (B, T, nh,
     * hs) projection holds them. Query r of the block is lane r % 16 of vector r / 16 of each quantity.
     * scratch_bytes: sdcli_attention_scratch_bytes(d, dv) bytes, of this thread's own. */
    SDCLI_AVX512 static void sdcli_attention_block(const float *q, const float *k, const float *v, float *out,
                                                   const ptrdiff_t *strides, ptrdiff_t tq, ptrdiff_t tk,
                                                   ptrdiff_t d, ptrdiff_t dv, int causal, float scale,
                                                   ptrdiff_t i0, void *scratch_bytes) {
        enum { QV = SDCLI_QUERY_VECTORS };
        const ptrdiff_t ldq = strides[0], ldk = strides[1], ldv = strides[2], ldo = strides[3];
        /* (d, 2 vectors) scaled queries, transposed; zero lanes pad a short block */
        sdcli_f16 *qt = (sdcli_f16 *)(((size_t)scratch_bytes + 63) & ~(size_t)63);
        sdcli_f16 *ot = qt + QV * d;        /* (dv, 2) running sum of exp(score - max) v, transposed */
        sdcli_f16 *p = ot + QV * dv;        /* (SDCLI_KEY_BLOCK, 2) scores of one key block, then their exp */
        const ptrdiff_t rows = tq - i0 < SDCLI_QUERY_BLOCK ? tq - i0 : SDCLI_QUERY_BLOCK;
        const ptrdiff_t key_end = causal ? (tk < i0 + rows ? tk : i0 + rows) : tk;
        const sdcli_f16 zero = {0}, lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
        sdcli_f16 row_max[QV];
        sdcli_d16 row_sum[QV];
        for (int h = 0; h < QV; h++) {
            row_max[h] = zero - INFINITY;
            row_sum[h] = (sdcli_d16){0};
        }
        for (ptrdiff_t c = 0; c < QV * d; c++) qt[c] = zero;
        for (ptrdiff_t c = 0; c < QV * dv; c++) ot[c] = zero;
        for (ptrdiff_t r = 0; r < rows; r++)
            for (ptrdiff_t c = 0; c < d; c++) qt[QV * c + r / 16][r % 16] = q[(i0 + r) * ldq + c] * scale;
        for (ptrdiff_t j0 = 0; j0 < key_end; j0 += SDCLI_KEY_BLOCK) {
            const ptrdiff_t keys = key_end - j0 < SDCLI_KEY_BLOCK ? key_end - j0 : SDCLI_KEY_BLOCK;
            ptrdiff_t j;
            for (j = 0; j < keys; j += SDCLI_TILE)
                sdcli_attention_scores(qt, k + (j0 + j) * ldk, d, ldk, p + QV * j,
                                       keys - j < SDCLI_TILE ? keys - j : SDCLI_TILE);
            sdcli_f16 correction[QV];
            for (int h = 0; h < QV; h++) {
                /* causal: query i0 + 16 h + lane sees key j0 + j only when j0 + j <= i0 + 16 h + lane */
                const ptrdiff_t first = i0 + 16 * h;
                for (j = causal && first + 1 - j0 > 0 ? first + 1 - j0 : 0; causal && j < keys; j++)
                    p[QV * j + h] = sdcli_select_w16(lane < (float)(j0 + j - first), zero - INFINITY, p[QV * j + h]);
                /* the streaming softmax: a new running max, what rescales the sums so far, this block's exp */
                sdcli_f16 block_max = row_max[h];
                for (j = 0; j < keys; j++)
                    block_max = sdcli_select_w16(p[QV * j + h] > block_max, p[QV * j + h], block_max);
                /* shift by 0 while a query has seen nothing finite, so that exp(-inf - shift) gives 0, not nan */
                const sdcli_f16 shift = sdcli_select_w16(block_max == -INFINITY, zero, block_max);
                correction[h] = sdcli_exp_w16(row_max[h] - shift);
                sdcli_f16 block_sum = zero;
                for (j = 0; j < keys; j++) {
                    p[QV * j + h] = sdcli_attention_exp(p[QV * j + h] - shift);
                    block_sum += p[QV * j + h];
                }
                row_sum[h] = row_sum[h] * __builtin_convertvector(correction[h], sdcli_d16)
                             + __builtin_convertvector(block_sum, sdcli_d16);
                row_max[h] = block_max;
            }
            for (ptrdiff_t c = 0; c < dv; c++)
                for (int h = 0; h < QV; h++) ot[QV * c + h] *= correction[h];
            for (ptrdiff_t c = 0; c < dv; c += SDCLI_TILE)
                sdcli_attention_values(p, v + j0 * ldv + c, ldv, keys, ot + QV * c,
                                       dv - c < SDCLI_TILE ? dv - c : SDCLI_TILE);
        }
        for (ptrdiff_t r = 0; r < rows; r++) {
            const float total = (float)row_sum[r / 16][r % 16];
            for (ptrdiff_t c = 0; c < dv; c++)
                out[(i0 + r) * ldo + c] = total > 0 ? ot[QV * c + r / 16][r % 16] / total : 0;
        }
    }

    /* bytes of scratch for one block, with room to align it to 64 */
    static size_t sdcli_attention_scratch_bytes(ptrdiff_t d, ptrdiff_t dv) {
        return (size_t)(SDCLI_QUERY_VECTORS * (d + dv + SDCLI_KEY_BLOCK) + 1) * sizeof(sdcli_f16);
    }

    #pragma GCC diagnostic pop

    static int sdcli_attention_wide(void) { return sdcli_has_avx512(); }

    #else /* not GCC or Clang on x86-64 */
    #define SDCLI_QUERY_BLOCK 32
    static int sdcli_attention_wide(void) { return 0; }
    static size_t sdcli_attention_scratch_bytes(ptrdiff_t d, ptrdiff_t dv) { return 1; }
    static void sdcli_attention_block(const float *q, const float *k, const float *v, float *out,
                                      const ptrdiff_t *strides, ptrdiff_t tq, ptrdiff_t tk, ptrdiff_t d,
                                      ptrdiff_t dv, int causal, float scale, ptrdiff_t i0, void *scratch_bytes) {}
    #endif
    """
    enum:
        SDCLI_QUERY_BLOCK
    # whether this build and CPU have the AVX-512 kernel
    bint sdcli_attention_wide()
    size_t sdcli_attention_scratch_bytes(ptrdiff_t d, ptrdiff_t dv)
    void sdcli_attention_block(const float* q, const float* k, const float* v, float* out,
                               const ptrdiff_t* strides, ptrdiff_t tq, ptrdiff_t tk, ptrdiff_t d, ptrdiff_t dv,
                               bint causal, float scale, ptrdiff_t i0, void* scratch)


cdef enum:
    TILE_ROWS = 8     # query rows computed together (the register tile of vec.h is 8 x 8)
    TILE_COLS = 8     # keys, or value columns, per register tile
    KEY_BLOCK = 64    # keys per step of the streaming softmax


cdef inline void _tile_product_narrow(const float* a, Py_ssize_t lda, const float* b, Py_ssize_t ldb, Py_ssize_t n,
                                      float* c, Py_ssize_t ldc, Py_ssize_t cols) noexcept nogil:
    # sdcli_tile_8x8 for the last cols < TILE_COLS columns
    cdef Py_ssize_t t, r, j
    cdef float total
    for r in range(TILE_ROWS):
        for j in range(cols):
            total = c[r * ldc + j]
            for t in range(n):
                total += a[r * lda + t] * b[t * ldb + j]
            c[r * ldc + j] = total


cdef inline void _product(const float* a, Py_ssize_t lda, const float* b, Py_ssize_t ldb, Py_ssize_t n,
                          float* c, Py_ssize_t ldc, Py_ssize_t cols) noexcept nogil:
    # c[:TILE_ROWS, :cols] += a[:TILE_ROWS, :n] @ b[:n, :cols]
    cdef Py_ssize_t j = 0
    while j + TILE_COLS <= cols:
        sdcli_tile_8x8(a, lda, b + j, ldb, n, c + j, ldc)
        j += TILE_COLS
    if j < cols:
        _tile_product_narrow(a, lda, b + j, ldb, n, c + j, ldc, cols - j)


cdef int _attention_head(const float* q, const float* k, const float* v, float* out, const ptrdiff_t* strides,
                         Py_ssize_t tq, Py_ssize_t tk, Py_ssize_t d, Py_ssize_t dv, bint causal,
                         float scale) noexcept nogil:
    # One head: q (Tq, d), k (Tk, d), v (Tk, dv) -> out (Tq, dv), rows `strides` floats apart (q, k, v, out).
    # Returns -1 when out of memory.
    cdef Py_ssize_t tk_padded = (tk + TILE_COLS - 1) // TILE_COLS * TILE_COLS
    cdef float* scratch = <float*>malloc((d * tk_padded + TILE_ROWS * (d + dv) + 1) * sizeof(float))
    cdef float* kt = scratch                         # (d, Tk rounded up to TILE_COLS)
    cdef float* qs = kt + d * tk_padded              # (TILE_ROWS, d) scaled queries; zero rows pad a short tile
    cdef float* acc = qs + TILE_ROWS * d             # (TILE_ROWS, dv) running sum of exp(score - row_max) * v
    cdef float p[TILE_ROWS * KEY_BLOCK]              # (TILE_ROWS, KEY_BLOCK) scores of one key block, then exp
    cdef float row_max[TILE_ROWS]
    cdef double row_sum[TILE_ROWS]
    cdef double block_sum
    cdef float new_max, correction, value
    cdef float* p_row
    cdef Py_ssize_t tile, i0, rows, key_end, block, j0, keys, columns, visible, r, j, c
    if scratch == NULL:
        return -1
    # K transposed, so that a block of keys is contiguous; zero columns pad it to whole register tiles
    memset(kt, 0, d * tk_padded * sizeof(float))
    for j in range(tk):
        for c in range(d):
            kt[c * tk_padded + j] = k[j * strides[1] + c]
    for tile in range((tq + TILE_ROWS - 1) // TILE_ROWS):
        i0 = tile * TILE_ROWS
        rows = min(<Py_ssize_t>TILE_ROWS, tq - i0)
        memset(qs, 0, TILE_ROWS * d * sizeof(float))
        memset(acc, 0, TILE_ROWS * dv * sizeof(float))
        for r in range(rows):
            for c in range(d):
                qs[r * d + c] = q[(i0 + r) * strides[0] + c] * scale
            row_max[r] = -INFINITY
            row_sum[r] = 0.0
        key_end = min(tk, i0 + rows) if causal else tk
        for block in range((key_end + KEY_BLOCK - 1) // KEY_BLOCK):
            j0 = block * KEY_BLOCK
            keys = min(<Py_ssize_t>KEY_BLOCK, key_end - j0)
            columns = (keys + TILE_COLS - 1) // TILE_COLS * TILE_COLS  # keys and the padding up to a whole tile
            memset(p, 0, sizeof(p))
            _product(qs, d, kt + j0, tk_padded, d, p, KEY_BLOCK, columns)  # (TILE_ROWS, columns) scores
            for r in range(rows):
                p_row = p + r * KEY_BLOCK
                visible = max(<Py_ssize_t>0, min(keys, i0 + r + 1 - j0)) if causal else keys
                new_max = max(row_max[r], sdcli_max(p_row, visible))
                if new_max == -INFINITY:  # nothing visible yet: this block adds nothing
                    memset(p_row, 0, columns * sizeof(float))
                    continue
                correction = expf(row_max[r] - new_max)  # rescales what earlier blocks summed; 0 for the first
                for j in range(visible, columns):
                    p_row[j] = -INFINITY  # masked or padding: exp gives 0
                block_sum = sdcli_exp_shifted(p_row, new_max, columns, p_row)
                if correction != 1:
                    for c in range(dv):
                        acc[r * dv + c] *= correction
                row_sum[r] = row_sum[r] * correction + block_sum
                row_max[r] = new_max
            _product(p, KEY_BLOCK, v + j0 * strides[2], strides[2], keys, acc, dv, dv)  # (TILE_ROWS, dv) += p @ v[j0:]
        for r in range(rows):
            value = <float>row_sum[r]
            for c in range(dv):
                out[(i0 + r) * strides[3] + c] = acc[r * dv + c] / value if value > 0 else 0
    free(scratch)
    return 0


def attention(const float[:, :, :, :] q, const float[:, :, :, :] k, const float[:, :, :, :] v,
              float[:, :, :, :] out, bint causal, float scale, bint wide=True):
    """softmax(scale q k^T) v per head: q (B, H, Tq, d), k (B, H, Tk, d), v (B, H, Tk, dv) -> out (B, H, Tq, dv).

    Only the last axis need be contiguous: a (B, H, T, hs) view of a (B, T, H, hs) projection is read in place, and
    out may be such a view too. With ``causal``, query i sees keys 0..i. Rows that see no finite score give zeros.
    Blocks of 32 queries of all heads run in parallel from the CPU level "avx512" up, heads otherwise;
    ``wide=False`` takes the second path anyway (for tests).
    """
    cdef Py_ssize_t batch = q.shape[0], nh = q.shape[1], tq = q.shape[2], d = q.shape[3]
    cdef Py_ssize_t tk = k.shape[2], dv = v.shape[3], heads = batch * nh, h, b
    cdef Py_ssize_t blocks = (tq + SDCLI_QUERY_BLOCK - 1) // SDCLI_QUERY_BLOCK, task
    cdef ptrdiff_t strides[4]
    cdef int failed = 0
    cdef void* scratch = NULL
    strides[0], strides[1], strides[2], strides[3] = attention_row_strides(q, k, v, out)  # rows, in floats
    if heads == 0 or tq == 0 or dv == 0:
        return
    if not (wide and sdcli_attention_wide()):
        with nogil:
            for h in prange(heads, schedule="dynamic"):
                b = h // nh
                failed += _attention_head(&q[b, h % nh, 0, 0], &k[b, h % nh, 0, 0], &v[b, h % nh, 0, 0],
                                          &out[b, h % nh, 0, 0], strides, tq, tk, d, dv, causal, scale) != 0
    else:
        with nogil, parallel():
            scratch = malloc(sdcli_attention_scratch_bytes(d, dv))  # one per thread
            for task in prange(heads * blocks, schedule="dynamic"):  # (head, block of queries)
                h = task // blocks
                b = h // nh
                if scratch == NULL:
                    failed += 1
                else:
                    sdcli_attention_block(&q[b, h % nh, 0, 0], &k[b, h % nh, 0, 0], &v[b, h % nh, 0, 0],
                                          &out[b, h % nh, 0, 0], strides, tq, tk, d, dv, causal, scale,
                                          task % blocks * SDCLI_QUERY_BLOCK, scratch)
            free(scratch)
    if failed:
        raise MemoryError("attention: out of memory for the per-thread or per-head buffers")
