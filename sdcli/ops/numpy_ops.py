"""Reference implementations of the op interface, in plain numpy.

This module states the contract every backend follows and is the ground truth the faster backends are tested
against. Inputs and outputs are float32; reductions accumulate in float32 unless a docstring says otherwise.
Clarity beats speed here.
"""

from __future__ import annotations

import math

import numpy as np

from ..io.safetensors import bf16_to_float32, float32_to_bf16

name = "numpy"


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """``x @ weight.T + bias``. x (..., in), weight (out, in), bias (out,) -> (..., out)."""
    y = np.matmul(x, weight.T)
    if bias is not None:
        y += bias
    return y


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """Normalise over the last axis (biased variance), then scale and shift. x (..., C), weight/bias (C,)."""
    mean = x.mean(axis=-1, keepdims=True)
    centered = x - mean
    variance = np.mean(centered * centered, axis=-1, keepdims=True)
    return centered / np.sqrt(variance + np.float32(eps)) * weight + bias


def erf(x: np.ndarray) -> np.ndarray:
    """The error function, to about 1.2e-7 absolute (Numerical Recipes' Chebyshev ``erfcc``, in float64)."""
    z = np.abs(x.astype(np.float64))
    t = 1.0 / (1.0 + 0.5 * z)
    poly = -z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (
            -0.82215223 + t * 0.17087277))))))))
    erfc = t * np.exp(poly)
    return np.where(x >= 0, 1.0 - erfc, erfc - 1.0)


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact GELU, ``x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))`` (PyTorch's default, approximate='none')."""
    return (0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))).astype(np.float32)


def geglu(x: np.ndarray) -> np.ndarray:
    """GEGLU (Shazeer 2020): the first half of the last axis gated by the GELU of the second.
    (..., 2 C) -> (..., C)."""
    inner = x.shape[-1] // 2
    return x[..., :inner] * gelu(x[..., inner:])


def quick_gelu(x: np.ndarray) -> np.ndarray:
    """OpenAI CLIP's GELU approximation, ``x * sigmoid(1.702 x)``."""
    return x / (1.0 + np.exp(np.float32(-1.702) * x))


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, shifted by the row maximum. Rows that are all -inf give zeros."""
    row_max = np.max(x, axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, np.float32(0))
    e = np.exp(x - row_max)
    total = e.sum(axis=-1, keepdims=True)
    return e / np.where(total > 0, total, np.float32(1))


def channels_last(x: np.ndarray) -> np.ndarray:
    """(B, C, H, W) -> (B, H*W, C), a new C-contiguous array (images to tokens)."""
    batch, channels = x.shape[:2]
    return np.ascontiguousarray(x.reshape(batch, channels, math.prod(x.shape[2:])).transpose(0, 2, 1))


def channels_first(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """(B, H*W, C) -> (B, C, H, W), a new C-contiguous array (tokens to images)."""
    batch, _, channels = x.shape
    return np.ascontiguousarray(x.transpose(0, 2, 1)).reshape(batch, channels, height, width)


def split_heads(x: np.ndarray, heads: int, *, bf16: bool = False) -> np.ndarray:
    """(B, T, heads * hs) -> (B, heads, T, hs), a view (``attention`` takes any layout here)."""
    batch, tokens, width = x.shape
    return x.reshape(batch, tokens, heads, width // heads).transpose(0, 2, 1, 3)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, *, causal: bool = False,
              scale: float | None = None, bf16: bool = False) -> np.ndarray:
    """Scaled dot-product attention.

    q (B, H, Tq, d), k (B, H, Tk, d), v (B, H, Tk, dv) -> (B, H, Tq, dv). ``scale`` defaults to ``1/sqrt(d)``.
    With ``causal``, query i sees keys 0..i (aligned at the start, as in a text encoder; needs Tq == Tk).
    With ``bf16`` (the layers of a bf16 model): q, k and v rounded to bf16, scores and softmax in float32, the
    probabilities rounded to bf16 for the product with v, float32 sums (PyTorch's bf16 attention on the CPU).
    """
    if scale is None:
        scale = 1.0 / np.sqrt(q.shape[-1])
    if bf16:
        q, k, v = round_to_bf16(q), round_to_bf16(k), round_to_bf16(v)
    scores = np.matmul(q, np.swapaxes(k, -1, -2)) * np.float32(scale)  # (B, H, Tq, Tk)
    if causal:
        tq, tk = scores.shape[-2:]
        future = np.triu(np.ones((tq, tk), dtype=bool), k=1)
        scores = np.where(future, np.float32(-np.inf), scores)
    weights = softmax(scores)
    return np.matmul(round_to_bf16(weights) if bf16 else weights, v)  # (B, H, Tq, dv)


def silu(x: np.ndarray) -> np.ndarray:
    """``x * sigmoid(x)`` (swish)."""
    return x / (np.float32(1) + np.exp(-x))


def relu(x: np.ndarray) -> np.ndarray:
    """``max(x, 0)``."""
    return np.maximum(x, np.float32(0))


def group_norm(x: np.ndarray, num_groups: int, weight: np.ndarray, bias: np.ndarray, eps: float, *,
               silu: bool = False) -> np.ndarray:
    """Normalise each of ``num_groups`` channel groups over its channels and all spatial positions (biased
    variance), then scale and shift per channel; then SiLU when ``silu`` (the GroupNorm-SiLU pair of every ResNet
    block, one op so that a backend can fuse it). x (B, C, ...) with C divisible by num_groups; weight/bias (C,)."""
    batch, channels = x.shape[:2]
    groups = x.reshape(batch, num_groups, -1)  # (B, G, C/G * spatial)
    mean = groups.mean(axis=-1, keepdims=True)
    centered = groups - mean
    variance = np.mean(centered * centered, axis=-1, keepdims=True)
    y = (centered / np.sqrt(variance + np.float32(eps))).reshape(x.shape)
    per_channel = (1, channels) + (1,) * (x.ndim - 2)
    y = y * weight.reshape(per_channel) + bias.reshape(per_channel)
    return y / (np.float32(1) + np.exp(-y)) if silu else y  # the formula of silu() above


def conv2d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None, *, stride: int = 1,
           padding: int = 0) -> np.ndarray:
    """2-D cross-correlation with zero padding (PyTorch's Conv2d).

    x (B, Cin, H, W), weight (Cout, Cin, kh, kw), bias (Cout,) -> (B, Cout, Ho, Wo) with
    ``Ho = (H + 2 padding - kh) // stride + 1`` (and the same for W).
    """
    batch, _, height, width = x.shape
    out_channels, in_channels, kh, kw = weight.shape
    padded = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    out_h = (height + 2 * padding - kh) // stride + 1
    out_w = (width + 2 * padding - kw) // stride + 1
    y = np.zeros((batch, out_channels, out_h, out_w), dtype=np.float32)
    for i in range(kh):
        for j in range(kw):
            window = padded[:, :, i:i + stride * out_h:stride, j:j + stride * out_w:stride]  # (B, Cin, Ho, Wo)
            y += np.einsum("oc,bchw->bohw", weight[:, :, i, j], window)
    if bias is not None:
        y += bias.reshape(1, out_channels, 1, 1)
    return y


def upsample_nearest(x: np.ndarray, factor: int = 2) -> np.ndarray:
    """Nearest-neighbour upsampling of the last two axes by an integer ``factor``. (B, C, H, W) -> (B, C, fH, fW)."""
    return np.repeat(np.repeat(x, factor, axis=-2), factor, axis=-1)


# -- weights held at reduced precision ----------------------------------------------------------------------------

def weight_float32(data: np.ndarray, precision: str) -> np.ndarray:
    """The values of a weight held as ``precision`` ("fp32", "fp16", or "bf16" bits in uint16) as float32."""
    if precision == "bf16":
        return bf16_to_float32(data)
    return np.asarray(data, dtype=np.float32)


def weight_from_float32(values: np.ndarray, precision: str) -> np.ndarray:
    """float32 values as a weight is held at ``precision``: themselves (fp32), float16, or bf16 bits in uint16,
    rounding to nearest even."""
    values = np.asarray(values, dtype=np.float32)
    if precision == "bf16":
        return float32_to_bf16(values)
    if precision == "fp16":
        with np.errstate(over="ignore"):  # beyond fp16's range: inf, as a cast should
            return values.astype(np.float16)
    return values


def pack_linear(weight: np.ndarray):
    """A float32 or float16 linear weight prepared for ``linear`` (a backend may reorder it once, keeping its dtype;
    here it is itself, and a float16 one is widened by numpy's type promotion at each product)."""
    return weight


def pack_conv(weight: np.ndarray):
    """A float32 or float16 convolution weight prepared for ``conv2d`` (here: itself)."""
    return weight


def round_to_bf16(x: np.ndarray) -> np.ndarray:
    """x rounded to the nearest bfloat16 (ties to even), as float32."""
    return bf16_to_float32(float32_to_bf16(x))


def pack_linear_bf16(bits: np.ndarray):
    """A linear weight (out, in) of bf16 bits prepared for ``linear_bf16`` (here: the bits themselves)."""
    return np.asarray(bits, dtype=np.uint16)


def linear_bf16(x: np.ndarray, packed, bias: np.ndarray | None = None) -> np.ndarray:
    """``linear`` in bfloat16: x rounded to bf16, times the bf16 weight, products summed in float32.
    x (..., in), ``packed`` from ``pack_linear_bf16``, bias (out,) float32 -> (..., out)."""
    return linear(round_to_bf16(x), bf16_to_float32(packed), bias)


def pack_conv_bf16(bits: np.ndarray):
    """A convolution weight (Cout, Cin, kh, kw) of bf16 bits prepared for ``conv2d_bf16`` (here: the bits)."""
    return np.asarray(bits, dtype=np.uint16)


def conv2d_bf16(x: np.ndarray, packed, bias: np.ndarray | None = None, *, stride: int = 1,
                padding: int = 0) -> np.ndarray:
    """``conv2d`` in bfloat16: x rounded to bf16, the bf16 weight, products summed in float32."""
    return conv2d(round_to_bf16(x), bf16_to_float32(packed), bias, stride=stride, padding=padding)
