"""The "cpu" backend: the functions and signatures of :mod:`sdcli.ops.numpy_ops` on the kernels of ``sdcli/ext``.

``linear`` is numpy's matmul (the BLAS numpy links: the CPU GEMM) with the bias added in place. layer_norm, gelu,
quick_gelu, softmax and attention run in :mod:`sdcli.ext.cpu_kernels`: float32, parallel over rows (attention:
heads) when the extension was built with OpenMP; attention is fused, never forming the (Tq, Tk) score matrix.
Inputs of other dtypes or layouts are converted to C-contiguous float32 first; results are new float32 arrays.

Importing this module raises ImportError when the extension is not built; ``get_ops("cpu")`` reports that.
"""

from __future__ import annotations

import math

import numpy as np

from ..ext import cpu_kernels as kernels

name = "cpu"


def _float32(x: np.ndarray) -> np.ndarray:
    """x as a C-contiguous float32 array, without a copy when it is one already (0-d stays 0-d)."""
    return np.asarray(x, dtype=np.float32, order="C")


def _rows(x: np.ndarray) -> np.ndarray:
    """(..., C) -> (rows, C), a view of a C-contiguous array."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def _elementwise(kernel, x: np.ndarray) -> np.ndarray:
    """Apply an element-wise kernel to x (any shape) into a new float32 array."""
    x = _float32(x)
    out = np.empty_like(x)
    kernel(x.reshape(-1), out.reshape(-1))
    return out


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """``x @ weight.T + bias``. x (..., in), weight (out, in), bias (out,) -> (..., out)."""
    x = _float32(x)
    weight = np.asarray(weight, dtype=np.float32)
    y = np.matmul(_rows(x), weight.T)  # (rows, out): one GEMM over all leading axes; weight.T is a view
    if bias is not None:
        y += _float32(bias)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """Normalise over the last axis (biased variance), then scale and shift. x (..., C), weight/bias (C,)."""
    x = _float32(x)
    out = np.empty_like(x)
    kernels.layer_norm(_rows(x), _float32(weight), _float32(bias), eps, _rows(out))
    return out


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact GELU, ``x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))`` (PyTorch's default, approximate='none')."""
    return _elementwise(kernels.gelu, x)


def quick_gelu(x: np.ndarray) -> np.ndarray:
    """OpenAI CLIP's GELU approximation, ``x * sigmoid(1.702 x)``."""
    return _elementwise(kernels.quick_gelu, x)


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, shifted by the row maximum. Rows that are all -inf give zeros."""
    x = _float32(x)
    out = np.empty_like(x)
    kernels.softmax(_rows(x), _rows(out))
    return out


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, *, causal: bool = False,
              scale: float | None = None) -> np.ndarray:
    """Scaled dot-product attention.

    q (B, H, Tq, d), k (B, H, Tk, d), v (B, H, Tk, dv) -> (B, H, Tq, dv). ``scale`` defaults to ``1/sqrt(d)``.
    With ``causal``, query i sees keys 0..i (aligned at the start, as in a text encoder; needs Tq == Tk).
    """
    q, k, v = _float32(q), _float32(k), _float32(v)
    *lead, tq, d = q.shape
    tk, dv = v.shape[-2:]
    if k.shape != (*lead, tk, d) or v.shape[:-2] != tuple(lead):
        raise ValueError(f"attention: q {q.shape}, k {k.shape} and v {v.shape} do not match")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    heads = math.prod(lead)
    out = np.empty((*lead, tq, dv), dtype=np.float32)
    kernels.attention(q.reshape(heads, tq, d), k.reshape(heads, tk, d), v.reshape(heads, tk, dv),
                      out.reshape(heads, tq, dv), causal, scale)  # (B*H, Tq, dv)
    return out
