"""Reference implementations of the op interface, in plain numpy.

This module states the contract every backend follows and is the ground truth the faster backends are tested
against. Inputs and outputs are float32; reductions accumulate in float32 unless a docstring says otherwise.
Clarity beats speed here.
"""

from __future__ import annotations

import math

import numpy as np

from ..dtypes import bf16_to_float32, float32_to_bf16, held_float32, held_from_float32
from .parameter import Parameter, Weight, as_parameter, run_matrix

name = "numpy"


# -- the host boundary and parameters -----------------------------------------------------------------------------

def from_host(x: np.ndarray) -> np.ndarray:
    """A host array as this backend's array: float32 (here a numpy array, without a copy when it is one)."""
    return np.asarray(x, dtype=np.float32)


def to_host(x: np.ndarray) -> np.ndarray:
    """This backend's array as a host numpy array (here: itself)."""
    return np.asarray(x)


def prepare(weight: Weight) -> Parameter:
    """A weight as the layers hold it for this backend (prepared lazily: see :class:`Parameter`)."""
    return Parameter(weight)


def _vector(value) -> np.ndarray | None:
    """A norm scale or bias (Parameter or array) as float32 values; None stays None."""
    if value is None:
        return None
    return value.float32() if isinstance(value, Parameter) else value


# -- matrix products ----------------------------------------------------------------------------------------------

def _linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    y = np.matmul(x, weight.T)
    if bias is not None:
        y += bias
    return y


def linear(x: np.ndarray, weight, bias=None) -> np.ndarray:
    """``x @ weight.T + bias``. x (..., in), weight (out, in) as a Parameter (or a plain array), bias (out,) ->
    (..., out).

    The weight's precision decides the arithmetic: fp32 and fp16 weights multiply in float32 (an fp16 weight is
    widened by numpy's type promotion); a bf16 weight multiplies x rounded to bf16, with float32 sums (PyTorch's
    bf16 linear on the CPU).
    """
    bias = _vector(bias)
    return run_matrix(as_parameter(weight),
                      lambda w: _linear(x, w, bias),
                      lambda bits: _linear(round_to_bf16(x), bf16_to_float32(bits), bias),
                      _itself, _bits, weight_float32)


def _itself(weight: np.ndarray) -> np.ndarray:
    return weight


def _bits(bits: np.ndarray) -> np.ndarray:
    return np.asarray(bits, dtype=np.uint16)


def layer_norm(x: np.ndarray, weight, bias, eps: float) -> np.ndarray:
    """Normalise over the last axis (biased variance), then scale and shift. x (..., C), weight/bias (C,) or
    None (no affine part).

    The mean, the variance of the centred values, the normalisation, scale and shift run in float64 (``eps`` as
    given), rounded to float32 once, as in group_norm: numpy's float32 mean rounds the row's sum at the scale of
    width times the mean, and a row whose mean is large against its spread carries that error divided by its
    standard deviation (1.4 times torch's error at a mean of 1000, spread 1, width 320).
    """
    mean = x.mean(axis=-1, keepdims=True, dtype=np.float64)
    centered = x - mean  # float64
    variance = np.mean(centered * centered, axis=-1, keepdims=True)
    y = centered / np.sqrt(variance + float(eps))
    if weight is not None:
        y = y * _vector(weight)
    if bias is not None:
        y = y + _vector(bias)
    return y.astype(np.float32)


def rms_norm(x: np.ndarray, weight, eps: float) -> np.ndarray:
    """Root-mean-square norm over the last axis (Zhang & Sennrich 2019; T5's LayerNorm, the Wan DiT's q/k norm):
    ``x / sqrt(mean(x^2) + eps) * weight``, the mean of squares accumulated in float32. x (..., C), weight (C,) or
    None."""
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps))
    return y * _vector(weight) if weight is not None else y


def channel_rms_norm(x: np.ndarray, weight, eps: float = 1e-12) -> np.ndarray:
    """RMS norm over the channel axis of channels-first data (B, C, ...) with a per-channel scale (C,): in
    F.normalize's form, ``x / max(||x||_C, eps) * sqrt(C) * weight`` (the Wan VAE's norm), the sum of squares in
    float32 as torch sums it."""
    channels = x.shape[1]
    norm = np.sqrt(np.sum(x * x, axis=1, keepdims=True, dtype=np.float32))  # (B, 1, ...)
    scale = _vector(weight).reshape(1, channels, *([1] * (x.ndim - 2))) * np.float32(math.sqrt(channels))
    return (x / np.maximum(norm, np.float32(eps)) * scale).astype(np.float32)


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


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU's tanh approximation (Hendrycks & Gimpel 2016), PyTorch's approximate='tanh', T5's "gelu_new", the
    Wan DiT's feed-forward: ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``, in float32."""
    inner = np.float32(math.sqrt(2.0 / math.pi)) * (x + np.float32(0.044715) * x * x * x)
    return (np.float32(0.5) * x * (np.float32(1) + np.tanh(inner))).astype(np.float32)


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


def split_heads(x: np.ndarray, heads: int, *, precision: str = "fp32") -> np.ndarray:
    """(B, T, heads * hs) -> (B, heads, T, hs), a view (``attention`` takes any layout here). ``precision`` is
    the attention's (see ``attention``): a backend may lay the heads out for it."""
    batch, tokens, width = x.shape
    return x.reshape(batch, tokens, heads, width // heads).transpose(0, 2, 1, 3)


def merge_heads(x: np.ndarray) -> np.ndarray:
    """(B, heads, T, hs) -> (B, T, heads * hs), the inverse of ``split_heads``."""
    batch, heads, tokens, width = x.shape
    return x.transpose(0, 2, 1, 3).reshape(batch, tokens, heads * width)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, *, causal: bool = False,
              scale: float | None = None, mask: np.ndarray | None = None, precision: str = "fp32") -> np.ndarray:
    """Scaled dot-product attention.

    q (B, H, Tq, d), k (B, H, Tk, d), v (B, H, Tk, dv) -> (B, H, Tq, dv). ``scale`` defaults to ``1/sqrt(d)``.
    With ``causal``, query i sees keys 0..i (aligned at the start, as in a text encoder; needs Tq == Tk).
    ``mask`` is added to the scores before the softmax, broadcast to (B, H, Tq, Tk): a bias (T5's relative
    positions) or -inf where a query must not look (key padding, block-causal chunks).
    ``precision`` "bf16" (the layers of a bf16 model): q, k and v rounded to bf16, scores and softmax in float32,
    the probabilities rounded to bf16 for the product with v, float32 sums (PyTorch's bf16 attention on the CPU).
    """
    bf16 = precision == "bf16"
    if scale is None:
        scale = 1.0 / np.sqrt(q.shape[-1])
    if bf16:
        q, k, v = round_to_bf16(q), round_to_bf16(k), round_to_bf16(v)
    scores = np.matmul(q, np.swapaxes(k, -1, -2)) * np.float32(scale)  # (B, H, Tq, Tk)
    if mask is not None:
        scores = scores + mask
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


def group_norm(x: np.ndarray, num_groups: int, weight, bias, eps: float, *, silu: bool = False) -> np.ndarray:
    """Normalise each of ``num_groups`` channel groups over its channels and all spatial positions (biased
    variance), then scale and shift per channel; then SiLU when ``silu`` (the GroupNorm-SiLU pair of every ResNet
    block, one op so that a backend can fuse it). x (B, C, ...) with C divisible by num_groups; weight/bias (C,).

    The mean, the variance of the centred values, the normalisation, scale and shift run in float64 (``eps`` as
    given, not rounded to float32), rounded to float32 once; the SiLU after it in float32. In float32 a group whose
    spread is small against its mean loses its precision: the rounding of the mean (half an ulp of the mean) is
    divided by the standard deviation. Groups of few values are often nearly constant (two channels at 1x1 at the
    deepest level of a narrow UNet), and a UNet's ResNet blocks amplify every such error.
    """
    batch, channels = x.shape[:2]
    groups = x.reshape(batch, num_groups, -1)  # (B, G, C/G * spatial)
    mean = groups.mean(axis=-1, keepdims=True, dtype=np.float64)
    centered = groups - mean  # float64
    variance = np.mean(centered * centered, axis=-1, keepdims=True)
    y = (centered / np.sqrt(variance + float(eps))).reshape(x.shape)
    per_channel = (1, channels) + (1,) * (x.ndim - 2)
    y = (y * _vector(weight).reshape(per_channel) + _vector(bias).reshape(per_channel)).astype(np.float32)
    return y / (np.float32(1) + np.exp(-y)) if silu else y  # the formula of silu() above


def conv2d(x: np.ndarray, weight, bias=None, *, stride: int = 1, padding: int = 0) -> np.ndarray:
    """2-D cross-correlation with zero padding (PyTorch's Conv2d).

    x (B, Cin, H, W), weight (Cout, Cin, kh, kw) as a Parameter (or a plain array), bias (Cout,) ->
    (B, Cout, Ho, Wo) with ``Ho = (H + 2 padding - kh) // stride + 1`` (and the same for W). Precisions as in
    ``linear``: a bf16 weight convolves x rounded to bf16, with float32 sums.
    """
    bias = _vector(bias)
    return run_matrix(as_parameter(weight),
                      lambda w: _conv2d(x, w, bias, stride, padding),
                      lambda bits: _conv2d(round_to_bf16(x), bf16_to_float32(bits), bias, stride, padding),
                      _itself, _bits, weight_float32)


def _conv2d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, stride: int, padding: int) -> np.ndarray:
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




def resize_nearest(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of the last two axes to ``size`` as PyTorch's ``interpolate(size=...)`` picks the
    source rows: ``floor(i * in / out)`` in float32 (so 2 -> 3 rows reads 0, 0, 1). (B, C, H, W) -> (B, C, *size)."""
    rows = nearest_indices(x.shape[-2], size[0])
    columns = nearest_indices(x.shape[-1], size[1])
    return x[..., rows, :][..., columns]


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source indices of a nearest-neighbour resize from ``in_size`` to ``out_size`` entries (see resize_nearest)."""
    scale = np.float32(in_size) / np.float32(out_size)
    indices = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(indices, in_size - 1)


def _conv_nd(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, stride: tuple[int, ...],
             pads: tuple[tuple[int, int], ...]) -> np.ndarray:
    """N-d cross-correlation over the axes after (B, Cin), one einsum per kernel tap: the reference of conv1d and
    conv3d. ``pads`` holds (before, after) zero padding per spatial axis."""
    padded = np.pad(x, ((0, 0), (0, 0), *pads))
    kernel = weight.shape[2:]
    out_sizes = [(padded.shape[2 + axis] - kernel[axis]) // stride[axis] + 1 for axis in range(len(kernel))]
    y = np.zeros((x.shape[0], weight.shape[0], *out_sizes), dtype=np.float32)
    for tap in np.ndindex(*kernel):
        window = padded[(slice(None), slice(None)) + tuple(
            slice(tap[axis], tap[axis] + stride[axis] * out_sizes[axis], stride[axis]) for axis in range(len(kernel)))]
        y += np.einsum("oc,bc...->bo...", weight[(slice(None), slice(None)) + tap], window)
    if bias is not None:
        y += bias.reshape(1, -1, *([1] * len(kernel)))
    return y


def conv1d(x: np.ndarray, weight, bias=None, *, stride: int = 1, padding: int = 0) -> np.ndarray:
    """1-D cross-correlation with zero padding (PyTorch's Conv1d). x (B, Cin, L), weight (Cout, Cin, k), bias
    (Cout,) -> (B, Cout, (L + 2 padding - k) // stride + 1). Precisions as in ``linear``."""
    bias = _vector(bias)
    run = (lambda w, x: _conv_nd(x, w, bias, (stride,), ((padding, padding),)))
    return run_matrix(as_parameter(weight), lambda w: run(w, x),
                      lambda bits: run(bf16_to_float32(bits), round_to_bf16(x)), _itself, _bits, weight_float32)


def conv3d(x: np.ndarray, weight, bias=None, *, stride: int | tuple[int, int, int] = 1,
           padding: int | tuple[int, int, int] = 0, causal: bool = False) -> np.ndarray:
    """3-D cross-correlation with zero padding (PyTorch's Conv3d). x (B, Cin, T, H, W), weight
    (Cout, Cin, kt, kh, kw), bias (Cout,) -> (B, Cout, To, Ho, Wo); ``stride`` and ``padding`` one int or one per
    axis (t, h, w). With ``causal`` the time axis is padded by 2 * padding at the front and not at the back (the
    causal convolution of video autoencoders: frame t sees frames t - k + 1 .. t only). Precisions as in
    ``linear``."""
    strides = (stride,) * 3 if isinstance(stride, int) else tuple(stride)
    pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
    pads = ((2 * pt, 0) if causal else (pt, pt), (ph, ph), (pw, pw))
    bias = _vector(bias)
    run = (lambda w, x: _conv_nd(x, w, bias, strides, pads))
    return run_matrix(as_parameter(weight), lambda w: run(w, x),
                      lambda bits: run(bf16_to_float32(bits), round_to_bf16(x)), _itself, _bits, weight_float32)


# -- element-wise -------------------------------------------------------------------------------------------------

def _operand(y):
    """A scalar as float32 (so that it never widens the arithmetic); arrays as they are."""
    return np.float32(y) if isinstance(y, (int, float)) else y


def add(x: np.ndarray, y) -> np.ndarray:
    """x + y, y an array broadcast to x's shape or a scalar; a new array."""
    return x + _operand(y)


def add_(x: np.ndarray, y) -> np.ndarray:
    """x += y in x's own storage (x must be an array the caller owns: the result of an op); returns x."""
    x += _operand(y)
    return x


def mul(x: np.ndarray, y) -> np.ndarray:
    """x * y (broadcast, or a scalar); a new array."""
    return x * _operand(y)


def div(x: np.ndarray, y) -> np.ndarray:
    """x / y (broadcast, or a scalar); a new array. Not the same as ``mul`` by 1 / y: one rounding, not two."""
    return x / _operand(y)


def modulate(x: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """``x * (1 + scale) + shift`` (adaptive norm modulation, as in DiT blocks); scale and shift broadcast."""
    return x * (np.float32(1) + scale) + shift


def exp(x: np.ndarray) -> np.ndarray:
    return np.exp(x)


def tanh(x: np.ndarray) -> np.ndarray:
    return np.tanh(x)


def clip(x: np.ndarray, low: float, high: float) -> np.ndarray:
    """x limited to [low, high]."""
    return np.clip(x, np.float32(low), np.float32(high))


# -- layout -------------------------------------------------------------------------------------------------------

def reshape(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The same values in ``shape`` (row-major order); a view where the layout allows."""
    return x.reshape(shape)


def permute(x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """The axes of x reordered (numpy's transpose); a view here, a new array in other backends."""
    return x.transpose(axes)


def concat(arrays: list[np.ndarray], axis: int) -> np.ndarray:
    """Arrays joined along ``axis``; a new array."""
    return np.concatenate(arrays, axis=axis)


def pad(x: np.ndarray, widths: tuple[tuple[int, int], ...]) -> np.ndarray:
    """Zero padding: ``widths`` holds (before, after) for every axis of x."""
    return np.pad(x, widths)


def narrow(x: np.ndarray, axis: int, start: int, stop: int) -> np.ndarray:
    """The slice ``start:stop`` of ``axis``; a view where the backend allows (never written through)."""
    index = [np.s_[:]] * x.ndim
    index[axis] = np.s_[start:stop]
    return x[tuple(index)]


def add_into_(x: np.ndarray, y: np.ndarray, axis: int, start: int) -> np.ndarray:
    """x[start:start + len(y)] += y along ``axis``, in x's own storage (x an array the caller owns); returns x."""
    narrow(x, axis, start, start + y.shape[axis])[...] += y
    return x


def write_into_(x: np.ndarray, y: np.ndarray, axis: int, start: int) -> np.ndarray:
    """x[start:start + len(y)] = y along ``axis``, in x's own storage (x an array the caller owns; y may be a view
    of x, overlapping the place it goes to); returns x."""
    narrow(x, axis, start, start + y.shape[axis])[...] = y
    return x


def zeros(shape: tuple[int, ...]) -> np.ndarray:
    """A new float32 array of zeros (a buffer the caller fills with ``write_into_``)."""
    return np.zeros(shape, dtype=np.float32)


def blend_(before: np.ndarray, after: np.ndarray, extent: int, axis: int) -> None:
    """Fade the first ``extent`` entries of ``after`` along ``axis`` in from the last entries of ``before``, in
    place: entry y of the overlap is ``before * (1 - y / extent) + after * (y / extent)`` (the seams of a tiled
    decode: diffusers ``AutoencoderKL.blend_v`` on axis 2, ``blend_h`` on axis 3). ``extent`` is cut to both
    sizes."""
    extent = min(before.shape[axis], after.shape[axis], extent)
    if extent <= 0:
        return
    weight = (np.arange(extent) / extent).astype(np.float32)  # (extent,): 0 at the seam
    weight = weight.reshape((extent,) + (1,) * (after.ndim - 1 - axis % after.ndim))
    overlap = narrow(after, axis, 0, extent)
    overlap[...] = narrow(before, axis, before.shape[axis] - extent, before.shape[axis]) * (np.float32(1) - weight) \
        + overlap * weight


def map_rows(function, x: np.ndarray, rows: int) -> np.ndarray:
    """``function`` (an op chain over the last axis, rows independent) applied to x (..., C) in pieces of at most
    ``rows`` rows, written into one result (..., C'): the widest activations then stay one piece's."""
    flat = x.reshape(-1, x.shape[-1])  # (N, C)
    if len(flat) <= rows:
        return function(x)
    out = None
    for start in range(0, len(flat), rows):
        piece = function(flat[start:start + rows])  # (n, C')
        if out is None:
            out = np.empty((len(flat), piece.shape[-1]), dtype=np.float32)
        out[start:start + len(piece)] = piece
    return out.reshape(*x.shape[:-1], out.shape[-1])


# -- embeddings ---------------------------------------------------------------------------------------------------

def embedding(table, ids: np.ndarray) -> np.ndarray:
    """Rows of a (V, C) table picked by host integer ids (...,) -> (..., C) float32; only those rows are
    converted from the table's precision. A streamed table (``Weight.stream``) drops its file pages as the
    matrix ops do, after every ``STREAMED_ROWS`` ids: each row read can map a whole 2 MB page of the file, and
    512 ids spread over UMT5's 2 GB table would otherwise hold about 1 GB at once."""
    table = as_parameter(table)
    if not table.streamed:
        return Weight(np.take(table.data, ids, axis=0), table.precision).float32()  # (..., C)
    flat = np.asarray(ids).reshape(-1)
    rows = np.empty((flat.size, *table.shape[1:]), dtype=table.data.dtype)  # (N, C)
    for start in range(0, flat.size, STREAMED_ROWS):
        rows[start:start + STREAMED_ROWS] = np.take(table.data, flat[start:start + STREAMED_ROWS], axis=0)
        table.weight.release_pages()
    return Weight(rows.reshape(*np.shape(ids), *table.shape[1:]), table.precision).float32()  # (..., C)


STREAMED_ROWS = 64  # of a streamed embedding table read between two releases of its pages


MAX_PERIOD = 10000  # of the sinusoidal timestep embedding


def timestep_embedding(timesteps: np.ndarray, dim: int, *, flip_sin_to_cos: bool, freq_shift: float) -> np.ndarray:
    """Sinusoidal embedding of host timesteps (B,) (possibly fractional) -> (B, dim), in float32 as diffusers.

    Frequencies ``exp(-ln(10000) k / (dim/2 - freq_shift))`` for k < dim/2 (Vaswani et al. 2017, as DDPM uses it);
    ``[sin, cos]`` of ``t * frequency``, swapped to ``[cos, sin]`` with ``flip_sin_to_cos`` (SD's setting).

    diffusers forms the exponents, frequencies and angles in float32 whatever the model's dtype (its float64 UNet
    too), so the angles here are the same float32 products. exp, sin and cos are evaluated in float64 and rounded
    to float32 once: the correctly rounded float32 values, which torch's float32 exp, sin and cos give nearly
    always. numpy's float32 exp is an ulp off for some of the exponents, and at t ~ 900 an ulp of a frequency moves
    the angle, and the sine, by up to 1e-5 (about a hundred float32 ulps of the result), which a UNet can amplify
    into its output. Portable: float32 products round exactly on any CPU, and float64 exp, sin and cos are within
    an ulp or two of float64 on any CPU, vectorised or not, which the rounding to float32 removes unless the value
    lies within those float64 ulps of a float32 rounding boundary (about one value in 10^8).
    """
    half = dim // 2
    exponent = np.float32(-math.log(MAX_PERIOD)) * np.arange(half, dtype=np.float32)
    exponent = exponent / np.float32(half - freq_shift)
    frequencies = np.exp(exponent.astype(np.float64)).astype(np.float32)  # (dim/2,)
    angles = np.asarray(timesteps).astype(np.float32)[:, None] * frequencies[None, :]  # (B, dim/2), float32 products
    angles = angles.astype(np.float64)  # exactly
    parts = [np.cos(angles), np.sin(angles)] if flip_sin_to_cos else [np.sin(angles), np.cos(angles)]
    if dim % 2:
        parts.append(np.zeros((len(timesteps), 1)))
    return np.concatenate(parts, axis=1).astype(np.float32)  # (B, dim)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotary position embedding (Su et al. 2021) on interleaved pairs: channels (2i, 2i + 1) of x (..., T, d)
    rotated by the angle whose cosine and sine are ``cos``/``sin`` (T, d/2) (broadcast over the leading axes), as
    a complex product ``(x_2i + j x_2i+1) * e^(j angle)``."""
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


# -- weights held at reduced precision ----------------------------------------------------------------------------

def weight_float32(data: np.ndarray, precision: str) -> np.ndarray:
    """The values of a weight held as ``precision`` ("fp32", "fp16", or "bf16" bits in uint16) as float32."""
    return held_float32(data, precision)


def weight_from_float32(values: np.ndarray, precision: str) -> np.ndarray:
    """float32 values as a weight is held at ``precision``: themselves (fp32), float16, or bf16 bits in uint16,
    rounding to nearest even."""
    return held_from_float32(values, precision)


def round_to_bf16(x: np.ndarray) -> np.ndarray:
    """x rounded to the nearest bfloat16 (ties to even), as float32."""
    return bf16_to_float32(float32_to_bf16(x))
