"""Argument checks shared by the compiled kernel modules (cpu_kernels, f32_kernels, bf16_kernels): the shapes and
layouts their attention and convolution entry points accept, each raising one ValueError that names the op."""

from __future__ import annotations

import numpy as np

FLOAT_BYTES = 4


def attention_row_strides(q, k, v, out) -> tuple[int, int, int, int]:
    """Row strides, in floats, of the (B, H, T, c) float32 buffers q, k, v and out of an attention call, after
    checking that their shapes agree and that the last axis of each is contiguous."""
    batch, heads, tq, d = q.shape[:4]
    tk, dv = k.shape[2], v.shape[3]
    if tuple(k.shape[:4]) != (batch, heads, tk, d) or tuple(v.shape[:3]) != (batch, heads, tk):
        raise ValueError(f"attention: mismatched q {tuple(q.shape[:4])}, k {tuple(k.shape[:4])}, "
                         f"v {tuple(v.shape[:4])}")
    if tuple(out.shape[:4]) != (batch, heads, tq, dv):
        raise ValueError(f"attention: out has shape {tuple(out.shape[:4])}, expected {(batch, heads, tq, dv)}")
    if any(array.strides[3] != FLOAT_BYTES for array in (q, k, v, out)):
        raise ValueError("attention: the last axis of q, k, v and out must be contiguous")
    return tuple(array.strides[2] // FLOAT_BYTES for array in (q, k, v, out))


def conv_output_size(x_shape, kh: int, kw: int, stride: int, padding: int, out_shape, out_channels: int) -> tuple[int, int]:
    """(Ho, Wo) of a convolution of x (B, Cin, H, W) with a kh x kw kernel (PyTorch Conv2d), after checking the
    kernel parameters, that the padded input holds the kernel and that out is (B, Cout, Ho, Wo)."""
    batch, _, height, width = x_shape[:4]
    if kh < 1 or kw < 1 or stride < 1 or padding < 0:
        raise ValueError(f"conv2d: kernel {kh}x{kw}, stride {stride}, padding {padding}: need kh, kw, stride >= 1 "
                         f"and padding >= 0")
    if height + 2 * padding < kh or width + 2 * padding < kw:
        raise ValueError(f"conv2d: input {height}x{width} with padding {padding} is smaller than the kernel "
                         f"{kh}x{kw}")
    out_h, out_w = (height + 2 * padding - kh) // stride + 1, (width + 2 * padding - kw) // stride + 1
    if tuple(out_shape[:4]) != (batch, out_channels, out_h, out_w):
        raise ValueError(f"conv2d: out has shape {tuple(out_shape[:4])}, expected {(batch, out_channels, out_h, out_w)}")
    return out_h, out_w


def checked_bias(op: str, bias, n: int):
    """``bias`` as a C-contiguous float32 (n,) array, or None; anything else is a ValueError naming ``op``."""
    if bias is None:
        return None
    if not isinstance(bias, np.ndarray) or bias.dtype != np.float32 or bias.shape != (n,):
        got = f"{bias.dtype} {bias.shape}" if isinstance(bias, np.ndarray) else type(bias).__name__
        raise ValueError(f"{op}: bias must be float32 of shape ({n},), got {got}")
    return np.ascontiguousarray(bias)
