# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""float32 matrix products with AVX-512 FMA: linear layers and convolutions with float32 weights.

The kernels are in f32_gemm.h (a register-blocked 14 x 32 microkernel over weights packed once at load time and
activations packed per block, k in chunks of KC); this module checks shapes, packs the weights and runs the tasks
in parallel (OpenMP, GIL released). ``available()`` says whether the CPU level (sdcli.ext.cpu_level(): AVX-512F and
AVX-512DQ with the zmm state enabled by the OS, not capped below "avx512" by SDCLI_CPU_LEVEL) and the build
(x86-64, GCC or Clang) have the kernels; where they do not, linear() and conv2d() raise RuntimeError and the op
layer keeps numpy's BLAS.

Weight layouts, built once at load time (MR = 14 rows, NR = 32 columns, KC = 256 of k per chunk; zeros in all
padding):
    pack_linear_weight(w (N, K))            -> (Np/32, K, 32) float32: w.T in strips of 32 columns,
                                               [s, k, j] = w[32s + j, k], Np = N rounded up to 32
    pack_conv_weight(w (Cout, Cin, kh, kw)) -> (Cp/14, chunks, 14, KC) float32: panels of 14 output channels,
                                               [p, c, r, kk] = w2[14p + r, KC c + kk], w2 = w.reshape(Cout, K),
                                               K = Cin kh kw, chunks = ceil(K / KC), Cp = Cout rounded up to 14
The packed weights keep the dtype they were given, float32 or float16 (--precision fp16: half the memory); the
kernels widen fp16 panels into their scratch just before use, so the arithmetic is float32 either way.
The linear weight is the B operand of x @ w.T (strips the microkernel reads down k, two vectors per row); the
convolution weight is the A operand of w2 @ im2col(x) (rows the microkernel broadcasts), whose im2col panels the
kernel writes as B strips a block of pixels and a chunk of k at a time, so memory stays flat as images grow.
The products write into ``out`` arrays of the caller's (float32, C-contiguous, the exact output shape, not
overlapping the inputs).
"""

import numpy as np

from .arguments import conv_output_size
from .arguments import checked_bias as _bias
from .levels import number as _cpu_level_number  # BackendError for an unknown SDCLI_CPU_LEVEL

from cython.parallel cimport parallel, prange
from libc.stddef cimport ptrdiff_t

cdef extern from "cpu_level.h":
    void sdcli_cpu_level_set(int level)

cdef extern from "f32_gemm.h" nogil:
    enum:
        SDCLI_F32_MR
        SDCLI_F32_NR
        SDCLI_F32_KC
        SDCLI_F32_ROWS
        SDCLI_F32_COLS
        SDCLI_F32_PIXELS
    ctypedef struct sdcli_f32_scratch:
        pass
    int sdcli_f32_available()
    int sdcli_f32_max_threads()
    sdcli_f32_scratch* sdcli_f32_scratch_get(size_t a_floats, size_t panel_floats, size_t pixels)
    void sdcli_f32_linear_task(const float* x, ptrdiff_t k, const void* w, int w_half, const float* bias,
                               float* out, ptrdiff_t n, ptrdiff_t r0, ptrdiff_t r1, ptrdiff_t j0, ptrdiff_t j1,
                               sdcli_f32_scratch* s)
    void sdcli_f32_conv_task(const float* x, ptrdiff_t batch, ptrdiff_t cin, ptrdiff_t h, ptrdiff_t w,
                             const void* weight, int weight_half, ptrdiff_t cout, ptrdiff_t kh, ptrdiff_t kw,
                             ptrdiff_t stride,
                             ptrdiff_t pad, const float* bias, float* out, ptrdiff_t ho, ptrdiff_t wo,
                             ptrdiff_t pixels, ptrdiff_t blocks, ptrdiff_t images, ptrdiff_t cslice, ptrdiff_t cslices,
                             ptrdiff_t task, sdcli_f32_scratch* s)

sdcli_cpu_level_set(_cpu_level_number())  # this module's copy of the level, before anything asks for it

MR, NR, KC = SDCLI_F32_MR, SDCLI_F32_NR, SDCLI_F32_KC

cdef bint _available = sdcli_f32_available()


def available():
    """True when this build runs the AVX-512 kernels at the CPU level in use; otherwise linear() and conv2d() raise
    RuntimeError."""
    return bool(_available)


cdef inline Py_ssize_t _round_up(Py_ssize_t a, Py_ssize_t to) noexcept nogil:
    return (a + to - 1) // to * to


cdef inline Py_ssize_t _clamp(Py_ssize_t a, Py_ssize_t lo, Py_ssize_t hi):
    return lo if a < lo else hi if a > hi else a


cdef _require(str op):
    if not _available:
        raise RuntimeError(f"{op}: the float32 AVX-512 kernels need a CPU with AVX-512F and AVX-512DQ and an x86-64 "
                           f"GCC or Clang build (f32_kernels.available() is False here)")


def _check_weight(str op, str name, array, int ndim):
    if not isinstance(array, np.ndarray) or array.dtype not in (np.float32, np.float16) or array.ndim != ndim:
        got = f"{array.dtype} {array.shape}" if isinstance(array, np.ndarray) else type(array).__name__
        raise ValueError(f"{op}: {name} must be a {ndim}-d float32 or float16 array, got {got}")


cdef const void* _packed_data(str op, packed, tuple expected, str mismatch, int* half) except NULL:
    """The address of a packed weight (float32 or float16, C-contiguous, of the shape ``expected``; otherwise
    ValueError with ``mismatch``), and in ``half`` whether it is float16."""
    cdef const float[:, :, ::1] float_view3
    cdef const unsigned short[:, :, ::1] half_view3
    cdef const float[:, :, :, ::1] float_view4
    cdef const unsigned short[:, :, :, ::1] half_view4
    if not isinstance(packed, np.ndarray) or packed.dtype not in (np.float32, np.float16):
        raise ValueError(f"{op}: the packed weight must be a float32 or float16 array from pack_*_weight")
    if packed.shape != expected:
        raise ValueError(mismatch)
    half[0] = packed.dtype == np.float16
    if packed.ndim == 3:
        if half[0]:
            half_view3 = packed.view(np.uint16)
            return &half_view3[0, 0, 0]
        float_view3 = packed
        return &float_view3[0, 0, 0]
    if half[0]:
        half_view4 = packed.view(np.uint16)
        return &half_view4[0, 0, 0, 0]
    float_view4 = packed
    return &float_view4[0, 0, 0, 0]


def pack_linear_weight(w):
    """The weight w (N, K) of a linear layer as the B operand of y = x @ w.T, in strips of 32 columns.

    Returns a new array of w's dtype (float32 or float16), (Np/32, K, 32) with [s, k, j] = w[32s + j, k]: Np = N
    rounded up to 32, zeros in the padding. linear() takes it with the true N given by its ``out``.
    """
    _check_weight("pack_linear_weight", "w", w, 2)
    n, k = w.shape
    np_ = _round_up(n, NR)
    padded = np.zeros((np_, k), dtype=w.dtype)
    padded[:n] = w
    return np.ascontiguousarray(padded.reshape(np_ // NR, NR, k).transpose(0, 2, 1))  # (Np/32, K, 32)


def pack_conv_weight(w):
    """The weight w (Cout, Cin, kh, kw) of a convolution as the A operand of w2 @ im2col(x), w2 = w (Cout, K).

    Returns a new array of w's dtype (float32 or float16), (Cp/14, chunks, 14, KC) with [p, c, r, kk] =
    w2[14p + r, KC c + kk]: K = Cin kh kw in PyTorch's order (ci, dy, dx), chunks = ceil(K / KC), Cp = Cout rounded
    up to 14, zeros in the padding.
    """
    _check_weight("pack_conv_weight", "w", w, 4)
    cout, cin, kh, kw = w.shape
    k = cin * kh * kw
    chunks, cp = max(1, (k + KC - 1) // KC), _round_up(cout, MR)
    padded = np.zeros((cp, chunks * KC), dtype=w.dtype)
    padded[:cout, :k] = w.reshape(cout, k)
    return np.ascontiguousarray(padded.reshape(cp // MR, MR, chunks, KC).transpose(0, 2, 1, 3))


def linear(const float[:, ::1] x, packed, bias, float[:, ::1] out):
    """out (M, N) = x (M, K) @ w.T + bias in float32; ``packed`` = pack_linear_weight(w) (float32 or float16).

    x: float32 (M, K). bias: float32 (N,) or None. out: float32 (M, N), overwritten.
    """
    _require("linear")
    cdef Py_ssize_t m = x.shape[0], k = x.shape[1], n = out.shape[1]
    cdef Py_ssize_t np_ = _round_up(n, NR)
    cdef int half = 0
    expected = (np_ // NR, k, NR)
    cdef const void* w = _packed_data(
        "linear", packed, expected, f"linear: packed weight {getattr(packed, 'shape', None)} does not fit x (M, K) = "
        f"({m}, {k}) and out (M, N) = ({out.shape[0]}, {n}): expected {expected} from pack_linear_weight", &half)
    if out.shape[0] != m:
        raise ValueError(f"linear: out has {out.shape[0]} rows, x has {m}")
    bias = _bias("linear", bias, n)
    if m == 0 or n == 0:
        return
    cdef const float[::1] bias_view
    cdef const float* bias_ptr = NULL
    if bias is not None:
        bias_view = bias
        bias_ptr = &bias_view[0]
    # one task per thread: an equal share of the rows (multiples of MR), or where there are too few rows for that
    # (under 8 panels a thread), of the columns (multiples of NR)
    cdef Py_ssize_t threads = sdcli_f32_max_threads()
    cdef Py_ssize_t row_parts = _clamp(m // (8 * MR), 1, threads)
    cdef Py_ssize_t col_parts = _clamp(threads // row_parts, 1, np_ // NR)
    cdef Py_ssize_t tasks = row_parts * col_parts, task, r0, r1, j0, j1
    cdef Py_ssize_t a_floats = _round_up(SDCLI_F32_ROWS, MR) * KC
    cdef Py_ssize_t b_floats = KC * _round_up(SDCLI_F32_COLS, NR) if half else 1
    cdef int failed = 0
    cdef sdcli_f32_scratch* scratch = NULL
    with nogil, parallel():
        scratch = sdcli_f32_scratch_get(a_floats, b_floats, 1)
        for task in prange(tasks, schedule="static", chunksize=1):
            r0 = _round_up(task // col_parts * m // row_parts, SDCLI_F32_MR)
            r1 = min(m, _round_up((task // col_parts + 1) * m // row_parts, SDCLI_F32_MR))
            j0 = _round_up(task % col_parts * np_ // col_parts, SDCLI_F32_NR)
            j1 = min(n, _round_up((task % col_parts + 1) * np_ // col_parts, SDCLI_F32_NR))
            if scratch == NULL:
                failed += 1
            elif r0 < r1 and j0 < j1:
                sdcli_f32_linear_task(&x[0, 0], k, w, half, bias_ptr, &out[0, 0], n, r0, r1, j0, j1, scratch)
    if failed:
        raise MemoryError("linear: out of memory for the per-thread buffers")


def conv2d(const float[:, :, :, ::1] x, weight, int kh, int kw, int stride, int padding, bias,
           float[:, :, :, ::1] out):
    """out = conv2d(x, w) + bias with PyTorch Conv2d semantics (cross-correlation, zero padding, NCHW), float32.

    x: float32 (B, Cin, H, W). weight: pack_conv_weight(w) of w (Cout, Cin, kh, kw), float32 or float16. bias: float32 (Cout,) or None.
    out: float32 (B, Cout, Ho, Wo), Ho = (H + 2 padding - kh) // stride + 1 (Wo alike), overwritten. The im2col
    matrix is built in panels of at most SDCLI_F32_PIXELS output pixels by KC rows of k per thread. The packed
    shape fixes Cout (up to a panel) and the number of chunks of K only: the caller keeps w's shape for the rest.
    """
    _require("conv2d")
    cdef Py_ssize_t batch = x.shape[0], cin = x.shape[1], h = x.shape[2], w = x.shape[3]
    cdef Py_ssize_t cout = out.shape[1], k = cin * kh * kw
    cdef Py_ssize_t ho, wo
    ho, wo = conv_output_size((batch, cin, h, w), kh, kw, stride, padding,
                              (out.shape[0], out.shape[1], out.shape[2], out.shape[3]), cout)
    expected = (_round_up(cout, MR) // MR, max(1, (k + KC - 1) // KC), MR, KC)
    cdef int half = 0
    cdef const void* weight_data = _packed_data(
        "conv2d", weight, expected, f"conv2d: packed weight {getattr(weight, 'shape', None)} does not fit Cin {cin}, "
        f"a {kh}x{kw} kernel and Cout {cout} (of out): expected {expected} from pack_conv_weight", &half)
    bias = _bias("conv2d", bias, cout)
    if batch == 0 or cout == 0:
        return
    cdef const float[::1] bias_view
    cdef const float* bias_ptr = NULL
    if bias is not None:
        bias_view = bias
        bias_ptr = &bias_view[0]
    # tasks: (block of output pixels, slice of output channels). A block is part of one image, blocks of about
    # equal size of at most PIXELS, or, for images of fewer pixels (a multiple of NR), as many whole images as fit:
    # each block reads the whole weight (of its slice). The channels split only as far as needed to give each
    # thread a task, since every slice builds the im2col panels of its block again.
    cdef Py_ssize_t hw_out = ho * wo, threads = sdcli_f32_max_threads()
    cdef Py_ssize_t blocks = (hw_out + SDCLI_F32_PIXELS - 1) // SDCLI_F32_PIXELS
    cdef Py_ssize_t pixels = _round_up((hw_out + blocks - 1) // blocks, NR)
    blocks = (hw_out + pixels - 1) // pixels
    cdef Py_ssize_t images = 1
    if blocks == 1 and hw_out % NR == 0:
        images = max(1, min(batch, SDCLI_F32_PIXELS // hw_out))
        pixels = images * hw_out
    cdef Py_ssize_t block_count = blocks * ((batch + images - 1) // images)
    cdef Py_ssize_t panels = _round_up(cout, MR) // MR
    cdef Py_ssize_t cslices = _clamp((threads + block_count - 1) // block_count, 1, panels)
    cdef Py_ssize_t cslice = (panels + cslices - 1) // cslices * MR
    cslices = (_round_up(cout, MR) + cslice - 1) // cslice
    cdef Py_ssize_t tasks = block_count * cslices, task
    cdef Py_ssize_t widened_floats = SDCLI_F32_MR * SDCLI_F32_KC if half else 1  # a weight panel's chunk
    cdef int failed = 0
    cdef sdcli_f32_scratch* scratch = NULL
    with nogil, parallel():
        scratch = sdcli_f32_scratch_get(widened_floats, SDCLI_F32_KC * pixels, pixels)
        for task in prange(tasks, schedule="dynamic"):
            if scratch == NULL:
                failed += 1
            else:
                sdcli_f32_conv_task(&x[0, 0, 0, 0], batch, cin, h, w, weight_data, half, cout, kh, kw, stride,
                                    padding, bias_ptr, &out[0, 0, 0, 0], ho, wo, pixels, blocks, images, cslice,
                                    cslices, task, scratch)
    if failed:
        raise MemoryError("conv2d: out of memory for the per-thread buffers")
