# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""float32 convolution through the BLAS of blas.h: OpenBLAS (the scipy-openblas32 wheel) on Linux and Windows,
Accelerate on macOS.

conv2d() takes the weight in its stored layout (Cout, Cin, kh, kw): it is the convolution of every layer whose
weight is not packed for the AVX-512 kernels (CPUs without AVX-512, fp16 and streamed weights). blas_conv.h builds
the im2col columns a bounded block of output pixels at a time and multiplies each block with one sgemm; the GIL is
released throughout. setup.py builds this module only where a BLAS is found at build time; where it is missing,
importing it raises ImportError and the op layer keeps numpy's GEMM.
"""

import numpy as np

from .arguments import conv_output_size
from .arguments import checked_bias as _bias

cdef extern from "blas_conv.h" nogil:
    const char* sdcli_blas_name()
    long long sdcli_blas_int_max()
    int sdcli_blas_conv2d(const float* x, Py_ssize_t batch, Py_ssize_t cin, Py_ssize_t h, Py_ssize_t w,
                          const float* weight, Py_ssize_t cout, Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t stride,
                          Py_ssize_t pad, const float* bias, float* out, Py_ssize_t ho, Py_ssize_t wo,
                          size_t column_floats)
    void sdcli_blas_conv_release()

# Bytes of one block of im2col columns: big enough for the sgemm to run near its peak, small enough to stay cache-
# and memory-friendly (a whole 512x512 VAE layer's columns would be over 1 GB).
COLUMN_BLOCK_BYTES = 32 << 20


def blas_name():
    """The BLAS this module was built with: "openblas" or "accelerate"."""
    return sdcli_blas_name().decode()


def release():
    """Free the calling thread's im2col buffer (kept between calls; it is at most COLUMN_BLOCK_BYTES, or one
    output pixel's column where that is larger)."""
    sdcli_blas_conv_release()


def conv2d(const float[:, :, :, ::1] x, const float[:, :, :, ::1] weight, int stride, int padding, bias,
           float[:, :, :, ::1] out, Py_ssize_t column_bytes=COLUMN_BLOCK_BYTES):
    """out = conv2d(x, weight) + bias with PyTorch Conv2d semantics (cross-correlation, zero padding, NCHW), float32.

    x: float32 C-contiguous (B, Cin, H, W). weight: float32 C-contiguous (Cout, Cin, kh, kw), as stored. bias:
    float32 (Cout,) or None. out: float32 C-contiguous (B, Cout, Ho, Wo), Ho = (H + 2 padding - kh) // stride + 1
    (Wo alike), overwritten, not overlapping the inputs. column_bytes bounds the im2col block (tests set it small
    to cut images into several blocks).
    """
    cdef Py_ssize_t batch = x.shape[0], cin = x.shape[1], h = x.shape[2], w = x.shape[3]
    cdef Py_ssize_t cout = weight.shape[0], kh = weight.shape[2], kw = weight.shape[3]
    if weight.shape[1] != cin:
        raise ValueError(f"conv2d: x has {cin} channels, the weight takes {weight.shape[1]}")
    cdef Py_ssize_t ho, wo
    ho, wo = conv_output_size((batch, cin, h, w), kh, kw, stride, padding,
                              (out.shape[0], out.shape[1], out.shape[2], out.shape[3]), cout)
    bias = _bias("conv2d", bias, cout)
    if column_bytes < 1:
        raise ValueError(f"conv2d: column_bytes must be positive, got {column_bytes}")
    if max(cout, cin * kh * kw, ho * wo) > sdcli_blas_int_max():
        raise ValueError(f"conv2d: Cout {cout}, K {cin * kh * kw} or {ho}x{wo} output pixels exceed the BLAS's "
                         f"integers ({sdcli_blas_int_max()})")
    if batch == 0 or cout == 0:
        return
    cdef const float* x_ptr = NULL  # an empty x (no channels, or only padding rows or columns) is never read
    cdef const float* weight_ptr = NULL  # nor an empty weight (no input channels)
    if cin * h * w > 0:
        x_ptr = &x[0, 0, 0, 0]
    if cin > 0:
        weight_ptr = &weight[0, 0, 0, 0]
    cdef const float[::1] bias_view
    cdef const float* bias_ptr = NULL
    if bias is not None:
        bias_view = bias
        bias_ptr = &bias_view[0]
    cdef float* out_ptr = &out[0, 0, 0, 0]
    cdef size_t column_floats = <size_t>column_bytes // sizeof(float)
    cdef int status
    with nogil:
        status = sdcli_blas_conv2d(x_ptr, batch, cin, h, w, weight_ptr, cout, kh, kw, stride, padding, bias_ptr,
                                   out_ptr, ho, wo, column_floats)
    if status != 0:
        raise MemoryError("conv2d: out of memory for the im2col block")
