# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""bfloat16 matrix products with float32 accumulation: linear layers and convolutions with bf16 weights.

Weights are bfloat16 bit patterns in numpy uint16 arrays (numpy has no bf16 dtype; see
sdcli.io.safetensors.float32_to_bf16), activations float32. Each product rounds the activations to bf16 (round to
nearest even, inside the kernel, a block at a time), multiplies with the CPU's bf16 instructions and accumulates in
float32. The kernels are in bf16_gemm.h; this module checks shapes, prepares the weight layouts, picks the level
and runs the tasks in parallel (OpenMP, GIL released). attention() is fused attention with bf16 products and a
float32 streaming softmax (bf16_attention.h).

Levels, chosen at run time (``capability()``): "amx" (AMX tiles, TDPBF16PS), "avx512_bf16" (VDPBF16PS),
"portable" (plain C loops, correctness only). The CPU level of all the kernels (sdcli.ext.cpu_level(), capped by
SDCLI_CPU_LEVEL) bounds them: "amx" and "avx512_bf16" give the level of that name, anything lower the portable
one. The environment variable SDCLI_BF16_KERNEL (one of the names here) caps the level further, for tests and
benchmarks; the ``level=`` argument of linear() and conv2d() picks one directly and raises ValueError above the
CPU level.

Weight layouts, built once at load time (Kp = K rounded up to 32, zeros in all padding):
    pack_linear_weight(w (N, K))            -> (Np/32, Kp/2, 32, 2) uint16: VNNI pairs in strips of 32 columns,
                                               [s, p, j, t] = w[32s + j, 2p + t], Np = N rounded up to 32
    pack_conv_weight(w (Cout, Cin, kh, kw)) -> (Cout, Kp) uint16, row-major, [o, (dy*kw + dx)*Cin2 + ci] =
                                               w[o, ci, dy, dx], Cin2 = Cin rounded up to even, K = kh*kw*Cin2
The linear weight is the B operand of x @ w.T, whose pair rows a tile load or a vector load takes in one piece;
strips keep each 32-column slice contiguous down k (see bf16_gemm.h). The convolution weight is the A operand of
w @ im2col(x), whose rows the tile loads take straight; the im2col panels are built as B strips.
The products write into ``out`` arrays of the caller's (float32, C-contiguous, the exact output shape, not
overlapping the inputs).
"""

import os

import numpy as np

from .arguments import attention_row_strides, conv_output_size
from .arguments import checked_bias as _bias
from .levels import number as _cpu_level_number  # BackendError for an unknown SDCLI_CPU_LEVEL

from cython.parallel cimport parallel, prange
from libc.stddef cimport ptrdiff_t
from libc.stdint cimport uint16_t, uint32_t

cdef extern from "cpu_level.h":
    void sdcli_cpu_level_set(int level)

cdef extern from "bf16_gemm.h" nogil:
    enum:
        SDCLI_BF16_PORTABLE
        SDCLI_BF16_AVX512
        SDCLI_BF16_AMX
        SDCLI_BF16_LINEAR_ROWS
        SDCLI_BF16_STREAM_BYTES
        SDCLI_BF16_CONV_PIXELS
        SDCLI_BF16_PANEL_K
    ctypedef struct sdcli_bf16_scratch:
        pass
    int sdcli_bf16_cpu_level()
    int sdcli_bf16_max_threads()
    sdcli_bf16_scratch* sdcli_bf16_scratch_new(size_t a_elems, size_t c_elems, size_t panel_elems, size_t pixels)
    void sdcli_bf16_scratch_free(sdcli_bf16_scratch* s)
    # AMX: per thread, the tile configuration before the first product and the tile release after the last
    void sdcli_bf16_thread_begin(int level)
    void sdcli_bf16_thread_end(int level)
    void sdcli_bf16_linear_task(int level, const float* x, ptrdiff_t m, ptrdiff_t k, const uint16_t* w,
                                ptrdiff_t kp, ptrdiff_t n_pad, const float* bias_pad, float* out, ptrdiff_t n,
                                ptrdiff_t slice, ptrdiff_t slices, bint stream, ptrdiff_t task, sdcli_bf16_scratch* s)
    void sdcli_bf16_conv_task(int level, const float* x, ptrdiff_t batch, ptrdiff_t cin, ptrdiff_t h, ptrdiff_t w,
                              const uint16_t* weight, ptrdiff_t cout, ptrdiff_t cout_pad, ptrdiff_t kp,
                              ptrdiff_t kh, ptrdiff_t kw, ptrdiff_t stride, ptrdiff_t pad, const float* bias_tiles,
                              float* out, ptrdiff_t ho, ptrdiff_t wo, ptrdiff_t pixels, ptrdiff_t cslice,
                              ptrdiff_t cslices, ptrdiff_t kb_max, ptrdiff_t rh, ptrdiff_t task, sdcli_bf16_scratch* s)

cdef extern from "bf16_attention.h" nogil:
    enum:
        SDCLI_BF16_ATTN_QUERIES
    ctypedef struct sdcli_bf16_attn_scratch:
        pass
    sdcli_bf16_attn_scratch* sdcli_bf16_attn_scratch_new(ptrdiff_t tk, ptrdiff_t d, ptrdiff_t dv)
    void sdcli_bf16_attn_scratch_free(sdcli_bf16_attn_scratch* s)
    void sdcli_bf16_attention_task(int level, const float* q, const float* k, const float* v, float* out,
                                   const ptrdiff_t* strides, ptrdiff_t tq, ptrdiff_t tk, ptrdiff_t d, ptrdiff_t dv,
                                   bint causal, float scale, ptrdiff_t head, ptrdiff_t i0,
                                   sdcli_bf16_attn_scratch* s)

sdcli_cpu_level_set(_cpu_level_number())  # this module's copy of the level, before anything asks for it

LEVELS = ("portable", "avx512_bf16", "amx")  # index = the level number of bf16_gemm.h
ENV_VAR = "SDCLI_BF16_KERNEL"

cdef int _cpu_level = sdcli_bf16_cpu_level()


def levels():
    """The levels this build can run at the CPU level in use, lowest first."""
    return LEVELS[:_cpu_level + 1]


cdef int _env_level() except -1:
    name = os.environ.get(ENV_VAR, "")
    if not name:
        return _cpu_level
    if name not in LEVELS:
        raise ValueError(f"{ENV_VAR}={name!r}: expected one of {', '.join(LEVELS)}")
    return min(LEVELS.index(name), _cpu_level)


def capability():
    """The level in use: "amx", "avx512_bf16" or "portable" (the best at the CPU level, capped by
    SDCLI_BF16_KERNEL)."""
    return LEVELS[_env_level()]


cdef int _level(str op, object level) except -1:
    if level is None:
        return _env_level()
    if level not in LEVELS:
        raise ValueError(f"{op}: level {level!r} is not one of {', '.join(LEVELS)}")
    if LEVELS.index(level) > _cpu_level:
        raise ValueError(f"{op}: level {level!r} needs CPU support this machine lacks or SDCLI_CPU_LEVEL caps "
                         f"(best: {LEVELS[_cpu_level]})")
    return LEVELS.index(level)


cdef inline Py_ssize_t _round_up(Py_ssize_t a, Py_ssize_t to):
    return (a + to - 1) // to * to


cdef inline Py_ssize_t _clamp(Py_ssize_t a, Py_ssize_t lo, Py_ssize_t hi):
    return lo if a < lo else hi if a > hi else a


def _check_bits(str op, str name, array, int ndim):
    if not isinstance(array, np.ndarray) or array.dtype != np.uint16 or array.ndim != ndim:
        got = f"{array.dtype} {array.shape}" if isinstance(array, np.ndarray) else type(array).__name__
        raise ValueError(f"{op}: {name} must be a {ndim}-d uint16 array of bf16 bits, got {got}")


def pack_linear_weight(w):
    """The weight w (N, K) of a linear layer (bf16 bits) as the B operand of y = x @ w.T, in strips of 32 columns.

    Returns a new uint16 array (Np/32, Kp/2, 32, 2) with [s, p, j, t] = w[32s + j, 2p + t]: Kp = K rounded up to
    32, Np = N rounded up to 32, zeros in the padding. linear() takes it with the true N given by its ``out``.
    """
    _check_bits("pack_linear_weight", "w", w, 2)
    n, k = w.shape
    kp, np_ = _round_up(k, 32), _round_up(n, 32)
    padded = np.zeros((np_, kp), dtype=np.uint16)
    padded[:n, :k] = w
    return np.ascontiguousarray(padded.reshape(np_ // 32, 32, kp // 2, 2).transpose(0, 2, 1, 3))


def pack_conv_weight(w):
    """The weight w (Cout, Cin, kh, kw) of a convolution (bf16 bits) as the row-major A operand (Cout, Kp).

    Returns a new uint16 array whose row o is w[o] in the order of conv2d's im2col matrix, tap by tap and channel
    by channel within a tap: [o, (dy * kw + dx) * Cin2 + ci] = w[o, ci, dy, dx], Cin2 = Cin rounded up to even,
    K = kh * kw * Cin2, then zeros up to Kp, a multiple of 32 (and where ci = Cin of an odd Cin).
    """
    _check_bits("pack_conv_weight", "w", w, 4)
    cout, cin, kh, kw = w.shape
    cin2 = cin + cin % 2
    taps = np.zeros((cout, kh, kw, cin2), dtype=np.uint16)
    taps[..., :cin] = w.transpose(0, 2, 3, 1)  # (Cout, kh, kw, Cin)
    packed = np.zeros((cout, _round_up(kh * kw * cin2, 32)), dtype=np.uint16)
    packed[:, : kh * kw * cin2] = taps.reshape(cout, -1)
    return packed


def linear(const float[:, ::1] x, const uint16_t[:, :, :, ::1] packed, bias, float[:, ::1] out, level=None,
           stream=None):
    """out (M, N) = bf16(x) (M, K) @ w.T + bias, float32 accumulation; ``packed`` = pack_linear_weight(w).

    x: float32 (M, K), rounded to bf16 a block of rows at a time. bias: float32 (N,) or None. out: float32 (M, N),
    overwritten. level: "amx", "avx512_bf16", "portable" or None (capability()). stream: at the AMX level, write
    out with streaming stores, which do not first fetch the lines they fill: None (the default) does so for an
    out of SDCLI_BF16_STREAM_BYTES or more (far larger than the caches, where that fetch costs about as much as
    the products) whose rows are 64-byte aligned (out 64-byte aligned, N a multiple of 16); True requires the
    alignment; False never streams.
    """
    cdef int lvl = _level("linear", level)
    cdef Py_ssize_t m = x.shape[0], k = x.shape[1], n = out.shape[1]
    cdef Py_ssize_t kp = packed.shape[1] * 2, np_ = packed.shape[0] * 32
    got = (packed.shape[0], packed.shape[1], packed.shape[2], packed.shape[3])
    if got != (np_ // 32, kp // 2, 32, 2) or kp != _round_up(k, 32) or np_ != _round_up(n, 32):
        raise ValueError(f"linear: packed weight {got} does not fit x (M, K) = ({m}, {k}) and out (M, N) = "
                         f"({out.shape[0]}, {n}): expected {(_round_up(n, 32) // 32, _round_up(k, 32) // 2, 32, 2)} "
                         f"from pack_linear_weight")
    if out.shape[0] != m:
        raise ValueError(f"linear: out has {out.shape[0]} rows, x has {m}")
    bias = _bias("linear", bias, n)
    if m == 0 or n == 0:
        return
    bias_padded = np.zeros(np_, dtype=np.float32)  # (Np) the bias, zeros past N
    if bias is not None:
        bias_padded[:n] = bias
    cdef const float[::1] bias_pad = bias_padded
    # tasks: (block of LINEAR_ROWS rows, slice of columns); the columns split only as far as needed to give each
    # thread about two tasks, since each thread converts the blocks of x of its tasks itself
    cdef Py_ssize_t blocks = (m + SDCLI_BF16_LINEAR_ROWS - 1) // SDCLI_BF16_LINEAR_ROWS
    cdef Py_ssize_t slices = _clamp((2 * sdcli_bf16_max_threads() + blocks - 1) // blocks, 1, (np_ + 31) // 32)
    cdef Py_ssize_t slice = min(_round_up((np_ + slices - 1) // slices, 32), np_)
    slices = (np_ + slice - 1) // slice
    cdef Py_ssize_t tasks = blocks * slices, task
    cdef int failed = 0
    cdef bint aligned = n % 16 == 0 and <size_t>&out[0, 0] % 64 == 0
    if stream and not aligned:
        raise ValueError("linear: stream=True needs out 64-byte aligned and N a multiple of 16")
    cdef bint streaming = aligned and m * n * 4 >= SDCLI_BF16_STREAM_BYTES if stream is None else stream
    cdef sdcli_bf16_scratch* scratch = NULL
    cdef const uint16_t* w = &packed[0, 0, 0, 0]
    with nogil, parallel():
        scratch = sdcli_bf16_scratch_new(SDCLI_BF16_LINEAR_ROWS * kp, SDCLI_BF16_LINEAR_ROWS * slice, 1, 0)
        sdcli_bf16_thread_begin(lvl)
        for task in prange(tasks, schedule="static"):
            if scratch == NULL:
                failed += 1
            else:
                sdcli_bf16_linear_task(lvl, &x[0, 0], m, k, w, kp, np_, &bias_pad[0], &out[0, 0], n, slice, slices,
                                       streaming, task, scratch)
        sdcli_bf16_thread_end(lvl)
        sdcli_bf16_scratch_free(scratch)
    if failed:
        raise MemoryError("linear: out of memory for the per-thread buffers")


def conv2d(const float[:, :, :, ::1] x, const uint16_t[:, ::1] weight, int kh, int kw, int stride, int padding,
           bias, float[:, :, :, ::1] out, level=None):
    """out = conv2d(bf16(x), w) + bias with PyTorch Conv2d semantics (cross-correlation, zero padding, NCHW).

    x: float32 (B, Cin, H, W). weight: pack_conv_weight(w) of w (Cout, Cin, kh, kw). bias: float32 (Cout,) or None.
    out: float32 (B, Cout, Ho, Wo), Ho = (H + 2 padding - kh) // stride + 1 (Wo alike), overwritten. The im2col
    matrix is built in bf16 VNNI panels of at most SDCLI_BF16_CONV_PIXELS output pixels by SDCLI_BF16_PANEL_K rows
    (2 MB) per thread, so memory stays flat as images grow. level as in linear().
    """
    cdef int lvl = _level("conv2d", level)
    cdef Py_ssize_t batch = x.shape[0], cin = x.shape[1], h = x.shape[2], w = x.shape[3]
    cdef Py_ssize_t cout = weight.shape[0], kp = weight.shape[1], k_total = kh * kw * (cin + cin % 2)
    cdef Py_ssize_t ho, wo
    ho, wo = conv_output_size((batch, cin, h, w), kh, kw, stride, padding,
                              (out.shape[0], out.shape[1], out.shape[2], out.shape[3]), cout)
    if kp != _round_up(k_total, 32):
        raise ValueError(f"conv2d: packed weight has {kp} columns; Cin {cin} with a {kh}x{kw} kernel needs "
                         f"{_round_up(k_total, 32)} (pack_conv_weight)")
    bias = _bias("conv2d", bias, cout)
    if batch == 0 or cout == 0:
        return
    # the weight as A needs whole 32-row blocks: zero rows up to cout_pad (a copy only when cout is not a multiple)
    cdef Py_ssize_t cout_pad = _round_up(cout, 32)
    cdef const uint16_t[:, ::1] a = weight
    if cout_pad != cout:
        a_pad = np.zeros((cout_pad, kp), dtype=np.uint16)
        a_pad[:cout] = weight
        a = a_pad
    tiles = np.zeros((cout_pad, 16), dtype=np.float32)  # row i: bias[i] 16 times
    if bias is not None:
        tiles[:cout] = bias[:, None]
    cdef const float[:, ::1] bias_tiles = tiles
    # tasks: (block of columns = (image, output pixel), slice of output channels); the channels split only as far as
    # needed to give each thread a task, since every slice builds the im2col panel again (and with k in blocks, a
    # thread's second slice of the same columns builds it again too)
    # Blocks of SDCLI_BF16_CONV_PIXELS columns read the weight fewer times than half as many, but fewer blocks than
    # threads would make threads build the same panel: then half as many columns, down to 256.
    cdef Py_ssize_t columns = batch * ho * wo, threads = sdcli_bf16_max_threads()
    cdef Py_ssize_t pixels = SDCLI_BF16_CONV_PIXELS
    while pixels > 256 and (columns + pixels - 1) // pixels < threads:
        pixels //= 2
    pixels = min(pixels, _round_up(columns, 32))
    cdef Py_ssize_t pblocks = (columns + pixels - 1) // pixels
    cdef Py_ssize_t cslices = _clamp((threads + pblocks - 1) // pblocks, 1, cout_pad // 32)
    cdef Py_ssize_t cslice = _round_up((cout_pad + cslices - 1) // cslices, 32)
    cslices = (cout_pad + cslice - 1) // cslice
    cdef Py_ssize_t kb_max = min(kp, <Py_ssize_t>SDCLI_BF16_PANEL_K)  # rows of k per panel
    # AVX-512 levels: the region of x one block of columns reads (bf16_gemm.h), at most `slots` images of `rh` rows
    cdef Py_ssize_t spanned = min(ho, (pixels + wo - 2) // wo + 1)  # output rows of one image in a block
    cdef Py_ssize_t rh = (spanned - 1) * stride + kh
    cdef Py_ssize_t slots = min(batch, (pixels + ho * wo - 2) // (ho * wo) + 1)
    cdef Py_ssize_t region = 2 * slots * ((cin + 1) // 2) * rh * (w + 2 * padding) if lvl >= SDCLI_BF16_AVX512 else 1
    cdef Py_ssize_t tasks = pblocks * cslices, task
    cdef int failed = 0
    cdef sdcli_bf16_scratch* scratch = NULL
    with nogil, parallel():
        scratch = sdcli_bf16_scratch_new(region, cslice * pixels, kb_max // 2 * pixels, pixels)
        sdcli_bf16_thread_begin(lvl)
        for task in prange(tasks, schedule="static"):
            if scratch == NULL:
                failed += 1
            else:
                sdcli_bf16_conv_task(lvl, &x[0, 0, 0, 0], batch, cin, h, w, &a[0, 0], cout, cout_pad, kp, kh, kw,
                                     stride, padding, &bias_tiles[0, 0], &out[0, 0, 0, 0], ho, wo, pixels, cslice,
                                     cslices, kb_max, rh, task, scratch)
        sdcli_bf16_thread_end(lvl)
        sdcli_bf16_scratch_free(scratch)
    if failed:
        raise MemoryError("conv2d: out of memory for the per-thread buffers")


def attention(const float[:, :, :, :] q, const float[:, :, :, :] k, const float[:, :, :, :] v,
              float[:, :, :, :] out, bint causal, float scale, level=None):
    """softmax(scale q k^T) v per head in bf16: q (B, H, Tq, d), k (B, H, Tk, d), v (B, H, Tk, dv) -> out (B, H,
    Tq, dv), the semantics of cpu_kernels.attention.

    q and k are rounded to bf16 for the scores, the scores and the softmax are float32, the probabilities and v
    are rounded to bf16 for their product, the output is summed in float32 (bf16_attention.h). Only the last axis
    need be contiguous: a (B, H, T, hs) view of a (B, T, H, hs) projection is read in place, and out may be such a
    view too. With ``causal``, query i sees keys 0..i. Rows that see no key (Tk = 0) give zeros. Tasks of
    SDCLI_BF16_ATTN_QUERIES queries of one head run in parallel, each thread converting the keys and values of a
    head once for all its tasks of that head. level as in linear().
    """
    cdef int lvl = _level("attention", level)
    cdef Py_ssize_t batch = q.shape[0], nh = q.shape[1], tq = q.shape[2], d = q.shape[3]
    cdef Py_ssize_t tk = k.shape[2], dv = v.shape[3], heads = batch * nh, h, b
    cdef Py_ssize_t blocks = (tq + SDCLI_BF16_ATTN_QUERIES - 1) // SDCLI_BF16_ATTN_QUERIES, task
    cdef ptrdiff_t strides[4]
    cdef int failed = 0
    cdef sdcli_bf16_attn_scratch* scratch = NULL
    strides[0], strides[1], strides[2], strides[3] = attention_row_strides(q, k, v, out)  # rows, in floats
    if heads == 0 or tq == 0 or dv == 0:
        return
    # tasks (head, block of queries), head by head in contiguous runs per thread (static schedule), so that a
    # thread converts the keys and values of a head once
    with nogil, parallel():
        scratch = sdcli_bf16_attn_scratch_new(tk, d, dv)
        sdcli_bf16_thread_begin(lvl)
        for task in prange(heads * blocks, schedule="static"):
            h = task // blocks
            b = h // nh
            if scratch == NULL:
                failed += 1
            else:
                sdcli_bf16_attention_task(lvl, &q[b, h % nh, 0, 0], &k[b, h % nh, 0, 0], &v[b, h % nh, 0, 0],
                                          &out[b, h % nh, 0, 0], strides, tq, tk, d, dv, causal, scale, h,
                                          task % blocks * SDCLI_BF16_ATTN_QUERIES, scratch)
        sdcli_bf16_thread_end(lvl)
        sdcli_bf16_attn_scratch_free(scratch)
    if failed:
        raise MemoryError("attention: out of memory for the per-thread buffers")
