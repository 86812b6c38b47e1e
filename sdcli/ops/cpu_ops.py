"""The "cpu" backend: the functions and signatures of :mod:`sdcli.ops.numpy_ops` on the kernels of ``sdcli/ext``.

Matrix products: ``linear`` and ``conv2d`` with a weight prepared by ``pack_linear`` / ``pack_conv`` (float32, or
float16 widened a panel at a time) run the AVX-512 kernels of :mod:`sdcli.ext.f32_kernels`; with a plain weight,
``linear`` is numpy's matmul and ``conv2d`` blocked im2col with one sgemm per block in C through
:mod:`sdcli.ext.blas_kernels` (OpenBLAS or Accelerate), or in numpy where that module is not built. bf16 weights
run :mod:`sdcli.ext.bf16_kernels` (AMX or AVX512_BF16). layer_norm, group_norm (with the SiLU after it fused in),
gelu, gelu_tanh, geglu, quick_gelu, softmax, the fused attention (never forming the (Tq, Tk) score matrix), the
channels-first/last transposes and nearest upsampling run in :mod:`sdcli.ext.cpu_kernels`, parallel when the
extension was built with OpenMP; silu and relu are vectorised numpy.
What runs where follows the CPU level (``sdcli.ext.cpu_level()``: the CPU's best, capped by SDCLI_CPU_LEVEL): below
"avx512" the float32 weights stay unpacked (numpy's matmul, blas_kernels' convolutions) and attention runs the
per-head kernel; below "avx512_bf16" bf16 weights take the float32 fallback; the element-wise and norm kernels run
their 16-, 8- or 4-lane versions.
Inputs of other dtypes or layouts are converted to C-contiguous float32 first; results are new float32 arrays.

Importing this module raises ImportError when the extension is not built; ``get_ops("cpu")`` reports that.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from ..ext import bf16_kernels
from ..ext import cpu_kernels as kernels
from ..ext import f32_kernels
from .numpy_ops import (add, add_, add_into_, blend_, channel_rms_norm, clip, concat, conv1d, embedding, exp,  # noqa: F401
                        map_rows, merge_heads, modulate, mul, div, narrow, pad, permute, reshape, resize_nearest,
                        rms_norm, rope, tanh, timestep_embedding, write_into_, zeros)
from .parameter import Parameter, Weight, as_parameter, run_matrix

try:
    from ..ext import blas_kernels
except ImportError as error:  # built without a BLAS (setup.py logged it): plain-weight convolutions keep numpy's GEMM
    blas_kernels = None
    logging.getLogger("sdcli").warning("sdcli.ext.blas_kernels is not available (%s): convolutions with unpacked "
                                       "weights run im2col in numpy", error)

name = "cpu"


def from_host(x: np.ndarray) -> np.ndarray:
    """A host array as this backend's array: float32 numpy (without a copy when it is one)."""
    return np.asarray(x, dtype=np.float32)


def to_host(x: np.ndarray) -> np.ndarray:
    """This backend's array as a host numpy array (itself)."""
    return np.asarray(x)


def prepare(weight: Weight) -> Parameter:
    """A weight as the layers hold it: packed for the kernels on its first use (see :class:`Parameter`)."""
    return Parameter(weight)


def _vector(value) -> np.ndarray | None:
    """A norm scale or bias (Parameter or array) as C-contiguous float32; None stays None."""
    if value is None:
        return None
    return _float32(value.float32() if isinstance(value, Parameter) else value)


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


@dataclass(frozen=True)
class PackedF32:
    """A float32 or float16 weight in the layout of :mod:`sdcli.ext.f32_kernels` (``pack_linear`` / ``pack_conv``),
    multiplied in float32 either way."""

    data: np.ndarray  # float32, or float16 (the kernels widen it a panel at a time)
    shape: tuple[int, ...]  # the weight's own: (out, in) or (Cout, Cin, kh, kw)


def _kept_weight(weight: np.ndarray) -> np.ndarray:
    """A weight to pack: C-contiguous float16 when it is float16 (kept at half the size), float32 otherwise."""
    if np.asarray(weight).dtype == np.float16:
        return np.ascontiguousarray(weight)
    return _float32(weight)


def _weight_values(weight: np.ndarray) -> np.ndarray:
    """An unpacked weight's values as C-contiguous float32 for the BLAS: float16 widened by the parallel kernel."""
    if weight.dtype == np.float16:
        return weight_float32(weight, "fp16")
    return _float32(weight)


def _packed_linear(name: str, kernel, x: np.ndarray, packed, bias: np.ndarray | None) -> np.ndarray:
    """x (..., in) @ weight.T + bias with a kernel taking (rows, in), the packed data, bias and out (rows, out)."""
    x = _float32(x)
    out_features, in_features = packed.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"{name}: x has {x.shape[-1]} features, the weight takes {in_features}")
    out = np.empty((*x.shape[:-1], out_features), dtype=np.float32)
    kernel(_rows(x), packed.data, None if bias is None else _float32(bias), _rows(out))
    return out


def pack_linear(weight: np.ndarray):
    """A float32 or float16 linear weight (out, in) prepared for ``linear``: the AVX-512 kernels' layout where the
    CPU level has them (a copy of the same dtype, made once per layer), the array itself otherwise."""
    if not f32_kernels.available():
        return weight
    weight = _kept_weight(weight)
    return PackedF32(f32_kernels.pack_linear_weight(weight), weight.shape)


def pack_conv(weight: np.ndarray):
    """A float32 or float16 convolution weight (Cout, Cin, kh, kw) prepared for ``conv2d``, as ``pack_linear``."""
    if not f32_kernels.available():
        return weight
    weight = _kept_weight(weight)
    return PackedF32(f32_kernels.pack_conv_weight(weight), weight.shape)


def linear(x: np.ndarray, weight, bias=None) -> np.ndarray:
    """``x @ weight.T + bias``. x (..., in), weight (out, in) as a Parameter (or a plain array), bias (out,) ->
    (..., out). fp32 and fp16 weights: packed, the AVX-512 kernel; unpacked (below the avx512 level, or streamed),
    numpy's matmul. bf16 weights: bf16 products summed in float32 (AMX or AVX512_BF16), the float32 fallback
    where the CPU has neither."""
    bias = _vector(bias)
    return run_matrix(as_parameter(weight), lambda w: _linear(x, w, bias), lambda w: _linear_bf16(x, w, bias),
                      pack_linear, pack_linear_bf16, weight_float32)


def _linear(x: np.ndarray, weight, bias: np.ndarray | None) -> np.ndarray:
    if isinstance(weight, PackedF32):
        return _packed_linear("linear", f32_kernels.linear, x, weight, bias)
    x = _float32(x)
    weight = _weight_values(np.asarray(weight))
    y = np.matmul(_rows(x), weight.T)  # (rows, out): one GEMM over all leading axes; weight.T is a view
    if bias is not None:
        y += _float32(bias)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def layer_norm(x: np.ndarray, weight, bias, eps: float) -> np.ndarray:
    """Normalise over the last axis (biased variance), then scale and shift. x (..., C), weight/bias (C,) or
    None (no affine part: the numpy reference's arithmetic)."""
    if weight is None or bias is None:
        from .numpy_ops import layer_norm as reference

        return reference(_float32(x), weight, bias, eps)
    x = _float32(x)
    out = np.empty_like(x)
    kernels.layer_norm(_rows(x), _vector(weight), _vector(bias), eps, _rows(out))
    return out


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact GELU, ``x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))`` (PyTorch's default, approximate='none')."""
    return _elementwise(kernels.gelu, x)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU's tanh approximation, ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``, computed as the same
    function ``x / (1 + exp(-2 sqrt(2/pi) (x + 0.044715 x^3)))``."""
    return _elementwise(kernels.gelu_tanh, x)


def geglu(x: np.ndarray) -> np.ndarray:
    """GEGLU (Shazeer 2020): the first half of the last axis gated by the GELU of the second, in one pass.
    (..., 2 C) -> (..., C)."""
    x = _float32(x)
    if x.shape[-1] % 2:
        raise ValueError(f"geglu: the last axis ({x.shape[-1]}) must have an even length")
    out = np.empty((*x.shape[:-1], x.shape[-1] // 2), dtype=np.float32)
    kernels.geglu(_rows(x), _rows(out))
    return out


def quick_gelu(x: np.ndarray) -> np.ndarray:
    """OpenAI CLIP's GELU approximation, ``x * sigmoid(1.702 x)``."""
    return _elementwise(kernels.quick_gelu, x)


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, shifted by the row maximum. Rows that are all -inf give zeros."""
    x = _float32(x)
    out = np.empty_like(x)
    kernels.softmax(_rows(x), _rows(out))
    return out


def _float32_rows(x: np.ndarray) -> np.ndarray:
    """x as float32 whose last axis is contiguous, without a copy when it is (a head-split view of a projection)."""
    if x.dtype == np.float32 and x.ndim and x.strides[-1] == 4 and all(s % 4 == 0 for s in x.strides):
        return x
    return _float32(x)


def channels_last(x: np.ndarray) -> np.ndarray:
    """(B, C, H, W) -> (B, H*W, C), a new C-contiguous array (images to tokens): a blocked parallel transpose."""
    x = _float32(x)
    batch, channels = x.shape[:2]
    positions = math.prod(x.shape[2:])
    out = np.empty((batch, positions, channels), dtype=np.float32)
    kernels.transpose(x.reshape(batch, channels, positions), out)
    return out


def channels_first(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """(B, H*W, C) -> (B, C, H, W), a new C-contiguous array (tokens to images)."""
    x = _float32(x)
    batch, tokens, channels = x.shape
    if tokens != height * width:
        raise ValueError(f"channels_first: {tokens} tokens are not {height}x{width}")
    out = np.empty((batch, channels, height, width), dtype=np.float32)
    kernels.transpose(x, out.reshape(batch, channels, tokens))
    return out


CONTIGUOUS_HEADS_TOKENS = 4096  # from this many tokens split_heads copies the heads apart (see there)


def split_heads(x: np.ndarray, heads: int, *, precision: str = "fp32") -> np.ndarray:
    """(B, T, heads * hs) -> (B, heads, T, hs) as ``attention`` reads it best. Both kernels read a view of the
    interleaved heads in place; the float32 kernel reads the keys and values once per block of 32 queries, and from
    CONTIGUOUS_HEADS_TOKENS tokens on (128 reads) a contiguous copy by heads pays for itself (3% at 4096 tokens).
    Below that the copy only costs: 7% of an AnimateDiff UNet call, whose temporal attention runs over 16 frames,
    and 10% of an attention over 1024 tokens. ``precision`` is the attention's (see ``attention``)."""
    batch, tokens, width = x.shape
    view = _float32_rows(x).reshape(batch, tokens, heads, width // heads).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(view) if precision != "bf16" and tokens >= CONTIGUOUS_HEADS_TOKENS else view


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, *, causal: bool = False,
              scale: float | None = None, mask: np.ndarray | None = None, precision: str = "fp32") -> np.ndarray:
    """Scaled dot-product attention.

    q (B, H, Tq, d), k (B, H, Tk, d), v (B, H, Tk, dv) -> (B, H, Tq, dv). ``scale`` defaults to ``1/sqrt(d)``.
    With ``causal``, query i sees keys 0..i (aligned at the start, as in a text encoder; needs Tq == Tk).
    ``mask`` (an additive bias, broadcast to (B, H, Tq, Tk)) runs the numpy reference for now: the fused kernels
    take none yet.
    With ``precision`` "bf16", the products run in bf16 (AMX or AVX512_BF16, :mod:`sdcli.ext.bf16_kernels`) where
    the CPU level has them, as numpy_ops states; in float32 elsewhere.
    The result is a (B, H, Tq, dv) view of a (B, Tq, H, dv) array, so that merging the heads back is a free
    reshape.
    """
    if mask is not None:
        from .numpy_ops import attention as reference

        return reference(_float32(q), _float32(k), _float32(v), causal=causal, scale=scale, mask=_float32(mask),
                         precision=precision)
    bf16 = precision == "bf16"
    q, k, v = _float32_rows(q), _float32_rows(k), _float32_rows(v)  # both kernels read head-split views in place
    *lead, tq, d = q.shape
    tk, dv = v.shape[-2:]
    if k.shape != (*lead, tk, d) or v.shape[:-2] != tuple(lead):
        raise ValueError(f"attention: q {q.shape}, k {k.shape} and v {v.shape} do not match")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    batch = math.prod(lead[:-1]) if len(lead) > 1 else 1
    heads = lead[-1] if lead else 1

    def four_axes(x: np.ndarray) -> np.ndarray:  # (..., H, T, c) -> (B, H, T, c), a view where the strides allow
        return x.reshape(batch, heads, *x.shape[-2:])

    out = np.empty((batch, tq, heads, dv), dtype=np.float32).transpose(0, 2, 1, 3)  # (B, H, Tq, dv) view
    kernel = bf16_kernels.attention if bf16 and bf16_level() != "portable" else kernels.attention
    kernel(four_axes(q), four_axes(k), four_axes(v), out, causal, scale)
    return out.reshape(*lead, tq, dv)


def silu(x: np.ndarray) -> np.ndarray:
    """``x * sigmoid(x)`` (swish)."""
    x = _float32(x)
    out = np.negative(x)
    np.exp(out, out=out)
    out += np.float32(1)
    return np.divide(x, out, out=out)


def relu(x: np.ndarray) -> np.ndarray:
    """``max(x, 0)``."""
    return np.maximum(_float32(x), np.float32(0))


def group_norm(x: np.ndarray, num_groups: int, weight, bias, eps: float, *, silu: bool = False) -> np.ndarray:
    """Normalise each of ``num_groups`` channel groups over its channels and all spatial positions (biased
    variance), then scale and shift per channel; then SiLU when ``silu``, in the same pass. Statistics,
    normalisation, scale and shift in double, rounded to float32 once, as numpy_ops.group_norm.
    x (B, C, ...) with C divisible by num_groups; weight/bias (C,). A video's (B, C, F, H, W) view of frames laid
    out (B, F, C, H, W) is read in place, and the result has x's layout (so permuting it back is free)."""
    x = np.asarray(x, dtype=np.float32)
    batch, channels = x.shape[:2]
    if num_groups <= 0 or channels % num_groups:
        raise ValueError(f"group_norm: {channels} channels do not split into {num_groups} groups")
    frames = math.prod(x.shape[2:-2])  # the axes between the channels and the last two (1 for images)
    shape = (batch, channels, frames, math.prod(x.shape[max(2, x.ndim - 2):]))  # (B, C, F, positions)
    if _view_as(x, shape) is None:
        x = _float32(x)
    out = np.empty_like(x)  # x's layout
    kernels.group_norm(_view_as(x, shape), num_groups, _vector(weight), _vector(bias), eps, silu, _view_as(out, shape))
    return out


def _view_as(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """x reshaped to ``shape`` as a view whose last axis is contiguous, or None where that needs a copy."""
    try:
        view = np.reshape(x, shape, copy=False)
    except ValueError:
        return None
    return view if view.shape[-1] <= 1 or view.strides[-1] == view.itemsize else None


def conv2d(x: np.ndarray, weight, bias=None, *, stride: int = 1, padding: int = 0) -> np.ndarray:
    """2-D cross-correlation with zero padding (PyTorch's Conv2d).

    x (B, Cin, H, W), weight (Cout, Cin, kh, kw) as a Parameter (or a plain array), bias (Cout,) ->
    (B, Cout, Ho, Wo) with ``Ho = (H + 2 padding - kh) // stride + 1`` (and the same for W). A packed fp32/fp16
    weight runs the AVX-512 kernel (im2col into bounded packed panels); an unpacked one blocked im2col and one
    sgemm per block in :mod:`sdcli.ext.blas_kernels` (OpenBLAS or Accelerate), or, where that module was not
    built, the same in numpy. A bf16 weight: bf16 products summed in float32, im2col panels built in bf16 by the
    kernel; the float32 fallback where the CPU has no bf16 instructions.
    """
    bias = _vector(bias)
    return run_matrix(as_parameter(weight), lambda w: _conv2d(x, w, bias, stride, padding),
                      lambda w: _conv2d_bf16(x, w, bias, stride, padding), pack_conv, pack_conv_bf16, weight_float32)


def _conv2d(x: np.ndarray, weight, bias: np.ndarray | None, stride: int, padding: int) -> np.ndarray:
    if isinstance(weight, PackedF32):
        x = _float32(x)
        out_channels, in_channels, kh, kw = weight.shape
        batch, channels, height, width = x.shape
        if channels != in_channels:
            raise ValueError(f"conv2d: x has {channels} channels, the weight takes {in_channels}")
        out = np.empty((batch, out_channels, (height + 2 * padding - kh) // stride + 1,
                        (width + 2 * padding - kw) // stride + 1), dtype=np.float32)
        f32_kernels.conv2d(x, weight.data, kh, kw, stride, padding, None if bias is None else _float32(bias), out)
        return out
    x = _float32(x)
    weight = _weight_values(np.asarray(weight))
    batch, in_channels, height, width = x.shape
    out_channels, _, kh, kw = weight.shape
    out_h = (height + 2 * padding - kh) // stride + 1
    out_w = (width + 2 * padding - kw) // stride + 1
    if blas_kernels is not None:
        # a kernel larger than the padded input gives out_h or out_w < 1: the kernel module names that error
        out = np.empty((batch, out_channels, max(out_h, 0), max(out_w, 0)), dtype=np.float32)
        blas_kernels.conv2d(x, weight, stride, padding, None if bias is None else _float32(bias), out)
        return out
    if kh == kw == 1 and stride == 1 and padding == 0:
        y = np.matmul(weight.reshape(out_channels, in_channels), x.reshape(batch, in_channels, height * width))
    elif stride == 1:
        y = _conv_taps(x, weight, padding, out_h, out_w)
    else:
        y = _conv_strided(x, weight, stride, padding, out_h, out_w)
    y = y.reshape(batch, out_channels, out_h, out_w)
    if bias is not None:
        y += _float32(bias).reshape(1, out_channels, 1, 1)
    return y


# Bytes of the stacked frames one conv3d call hands to conv2d at a time (see conv3d): the output frames go through
# in groups that keep their stacked inputs below this.
CONV3D_GROUP_BYTES = 256 << 20


@dataclass(frozen=True)
class Conv3dWeight:
    """A conv3d weight prepared for the conv2d kernels: ``weight`` (Cout, kt * Cin, kh, kw), the time taps as input
    channels, tap-major (packed as conv2d packs, or plain), and ``shape`` the weight's own (Cout, Cin, kt, kh, kw)."""

    weight: object
    shape: tuple[int, ...]


def _as_conv2d_weight(weight: np.ndarray) -> np.ndarray:
    out_channels, in_channels, kt, kh, kw = weight.shape
    return np.ascontiguousarray(np.swapaxes(weight, 1, 2)).reshape(out_channels, kt * in_channels, kh, kw)


def _conv3d_frames(x: np.ndarray, prepared: Conv3dWeight, strides: tuple[int, ...], conv) -> np.ndarray:
    """Every output frame of a padded x (B, Cin, T, H, W) as ``conv(stacked, prepared.weight)`` over its kt input
    frames stacked along the channels, in groups of output frames whose stacked inputs stay below
    CONV3D_GROUP_BYTES. -> (B, Cout, To, Ho, Wo)."""
    batch, in_channels, frames, height, width = x.shape
    out_channels, weight_channels, kt, kh, kw = prepared.shape
    if in_channels != weight_channels:
        raise ValueError(f"conv3d: x has {in_channels} channels, the weight takes {weight_channels}")
    out_frames = (frames - kt) // strides[0] + 1
    if out_frames < 1:
        raise ValueError(f"conv3d: {frames} frames (padded) are fewer than the kernel's {kt}")
    group = max(1, min(out_frames, CONV3D_GROUP_BYTES // (batch * kt * in_channels * height * width * 4 or 1)))
    pieces = []
    for first in range(0, out_frames, group):
        count = min(group, out_frames - first)
        stacked = np.empty((batch, count, kt, in_channels, height, width), dtype=np.float32)
        for tap in range(kt):
            start = first * strides[0] + tap
            taken = x[:, :, start:start + strides[0] * (count - 1) + 1:strides[0]]  # (B, Cin, count, H, W)
            stacked[:, :, tap] = taken.transpose(0, 2, 1, 3, 4)
        y = conv(stacked.reshape(batch * count, kt * in_channels, height, width), prepared.weight)
        pieces.append(y.reshape(batch, count, *y.shape[1:]))  # (B, count, Cout, Ho, Wo)
    y = pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=1)
    return np.ascontiguousarray(y.transpose(0, 2, 1, 3, 4))  # (B, Cout, To, Ho, Wo)


def conv3d(x: np.ndarray, weight, bias=None, *, stride: int | tuple[int, int, int] = 1,
           padding: int | tuple[int, int, int] = 0, causal: bool = False) -> np.ndarray:
    """3-D cross-correlation as ``numpy_ops.conv3d`` states it, on the conv2d kernels: each output frame is a 2-D
    convolution of its kt input frames stacked along the channels, with the weight laid out (Cout, kt * Cin, kh, kw)
    and prepared once like conv2d's (:class:`Conv3dWeight`). Each output frame is computed alike whatever the frames
    around it. A spatial stride or padding that differs between height and width runs the reference."""
    strides = (stride,) * 3 if isinstance(stride, int) else tuple(stride)
    pads = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
    if strides[1] != strides[2] or pads[1] != pads[2]:
        from .numpy_ops import conv3d as reference

        return reference(_float32(x), weight, bias, stride=stride, padding=padding, causal=causal)
    x = _float32(x)
    time_pads = (2 * pads[0], 0) if causal else (pads[0], pads[0])
    if any(time_pads):
        x = np.pad(x, ((0, 0), (0, 0), time_pads, (0, 0), (0, 0)))
    bias = _vector(bias)
    return run_matrix(
        as_parameter(weight),
        lambda w: _conv3d_frames(x, w, strides, lambda s, w2: _conv2d(s, w2, bias, strides[1], pads[1])),
        lambda w: _conv3d_frames(x, w, strides, lambda s, w2: _conv2d_bf16(s, w2, bias, strides[1], pads[1])),
        lambda w: Conv3dWeight(pack_conv(_as_conv2d_weight(w)), w.shape),
        lambda bits: Conv3dWeight(pack_conv_bf16(_as_conv2d_weight(bits)), bits.shape),
        lambda w, precision: Conv3dWeight(_as_conv2d_weight(weight_float32(w, precision)), w.shape))


# Bytes of one block of im2col columns: big enough for BLAS to run near its peak, small enough to stay cache- and
# memory-friendly (a whole 512x512 VAE layer's columns would be over 1 GB).
COLUMN_BLOCK_BYTES = 32 << 20


def _conv_taps(x: np.ndarray, weight: np.ndarray, padding: int, out_h: int, out_w: int) -> np.ndarray:
    """Stride-1 convolution as blocked im2col on the flat padded image: one GEMM per block,
    (Cout, Cin*kh*kw) @ (Cin*kh*kw, block), with the weight in its stored layout (no copy of it).

    In the padded image flattened row-major, tap (i, j) of output pixel (r, c) reads flat index
    ``(r + i) * Wp + (c + j)``: output row r, computed over all Wp columns, is the contiguous slice starting at
    ``i * Wp + j``, so the column rows of a block of outputs are plain slice copies. The columns past out_w are
    garbage and dropped at the end.
    """
    batch, in_channels = x.shape[:2]
    out_channels, _, kh, kw = weight.shape
    padded_w = x.shape[3] + 2 * padding
    padded = np.zeros((batch, in_channels, x.shape[2] + 2 * padding + 1, padded_w), dtype=np.float32)  # +1 row:
    padded[:, :, padding:padding + x.shape[2], padding:padding + x.shape[3]] = x  # the last tap's slice overruns
    flat = padded.reshape(batch, in_channels, -1)  # (B, Cin, (Hp + 1) * Wp)
    span = out_h * padded_w
    depth = in_channels * kh * kw
    block = min(span, max(padded_w, COLUMN_BLOCK_BYTES // (4 * depth) // padded_w * padded_w))
    matrix = weight.reshape(out_channels, depth)  # (Cout, Cin*kh*kw), a view
    columns = np.empty((in_channels, kh * kw, block), dtype=np.float32)
    y = np.empty((batch, out_channels, span), dtype=np.float32)
    for b in range(batch):
        for start in range(0, span, block):
            count = min(block, span - start)
            for i in range(kh):
                for j in range(kw):
                    offset = start + i * padded_w + j
                    columns[:, i * kw + j, :count] = flat[b, :, offset:offset + count]
            np.matmul(matrix, columns.reshape(depth, block)[:, :count], out=y[b, :, start:start + count])
    return y.reshape(batch, out_channels, out_h, padded_w)[..., :out_w]


def _conv_strided(x: np.ndarray, weight: np.ndarray, stride: int, padding: int, out_h: int,
                  out_w: int) -> np.ndarray:
    """Strided convolution by blocked im2col over output rows: (Cout, Cin*kh*kw) @ (Cin*kh*kw, rows * Wo)."""
    batch, in_channels = x.shape[:2]
    out_channels, _, kh, kw = weight.shape
    padded = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    depth = in_channels * kh * kw
    rows = min(out_h, max(1, COLUMN_BLOCK_BYTES // (4 * depth * out_w)))
    matrix = weight.reshape(out_channels, depth)  # (Cout, Cin*kh*kw), a view
    columns = np.empty((in_channels, kh, kw, rows, out_w), dtype=np.float32)
    y = np.empty((batch, out_channels, out_h * out_w), dtype=np.float32)
    for b in range(batch):
        for first in range(0, out_h, rows):
            count = min(rows, out_h - first)
            top = first * stride
            for i in range(kh):
                for j in range(kw):
                    columns[:, i, j, :count] = padded[b, :, top + i:top + i + stride * count:stride,
                                                      j:j + stride * out_w:stride]
            np.matmul(matrix, columns.reshape(depth, rows * out_w)[:, :count * out_w],
                      out=y[b, :, first * out_w:(first + count) * out_w])
    return y


def upsample_nearest(x: np.ndarray, factor: int = 2) -> np.ndarray:
    """Nearest-neighbour upsampling of the last two axes by an integer ``factor``. (B, C, H, W) -> (B, C, fH, fW)."""
    x = _float32(x)
    *lead, height, width = x.shape
    planes = math.prod(lead)
    out = np.empty((*lead, height * factor, width * factor), dtype=np.float32)
    kernels.upsample_nearest(x.reshape(planes, height, width), factor,
                             out.reshape(planes, height * factor, width * factor))
    return out


# -- weights held at reduced precision ----------------------------------------------------------------------------

def weight_float32(data: np.ndarray, precision: str) -> np.ndarray:
    """The values of a weight held as ``precision`` ("fp32", "fp16", or "bf16" bits in uint16) as float32: fp32 as
    it is, fp16 and bf16 widened exactly by a parallel kernel (F16C for fp16 where the CPU has it)."""
    if precision == "fp32":
        return _float32(data)
    if precision not in ("fp16", "bf16"):
        raise ValueError(f"weight_float32: unknown precision {precision!r}")
    bits = np.ascontiguousarray(data).view(np.uint16)
    out = np.empty(bits.shape, dtype=np.float32)
    kernels.widen(bits.reshape(-1), precision == "bf16", out.reshape(-1))
    return out


def weight_from_float32(values: np.ndarray, precision: str) -> np.ndarray:
    """float32 values as a weight is held at ``precision``: themselves (fp32), float16 (F16C where the CPU has
    it), or bf16 bits in uint16; rounding to nearest even, in parallel."""
    values = _float32(values)
    if precision == "fp32":
        return values
    if precision not in ("fp16", "bf16"):
        raise ValueError(f"weight_from_float32: unknown precision {precision!r}")
    bits = np.empty(values.shape, dtype=np.uint16)
    if precision == "bf16":
        kernels.narrow_to_bf16(values.reshape(-1), bits.reshape(-1))
        return bits
    if not kernels.narrow_to_half(values.reshape(-1), bits.reshape(-1)):
        with np.errstate(over="ignore"):
            return values.astype(np.float16)
    return bits.view(np.float16)


@dataclass(frozen=True)
class Bf16Weight:
    """A bf16 weight prepared by ``pack_linear_bf16`` / ``pack_conv_bf16``: in the layout of the kernels in
    :mod:`sdcli.ext.bf16_kernels` (``packed``) where the CPU has bf16 instructions, otherwise the bits themselves,
    widened to float32 at each call (the float32 fallback)."""

    data: np.ndarray
    shape: tuple[int, ...]  # the weight's own: (out, in) or (Cout, Cin, kh, kw)
    packed: bool


def bf16_level() -> str:
    """How bf16 is multiplied at the CPU level in use: "amx", "avx512_bf16", or "portable" (then the float32
    fallback runs)."""
    return bf16_kernels.capability()


def _pack_bf16(bits: np.ndarray, ndim: int, pack) -> Bf16Weight:
    bits = np.ascontiguousarray(bits, dtype=np.uint16)
    if bits.ndim != ndim:
        raise ValueError(f"expected a {ndim}-d weight of bf16 bits, got shape {bits.shape}")
    if bf16_level() == "portable":
        return Bf16Weight(bits, bits.shape, False)
    return Bf16Weight(pack(bits), bits.shape, True)


def pack_linear_bf16(bits: np.ndarray):  # -> Bf16Weight
    """A linear weight (out, in) of bf16 bits prepared for the bf16 product of ``linear``."""
    return _pack_bf16(bits, 2, bf16_kernels.pack_linear_weight)


def _linear_bf16(x: np.ndarray, packed: Bf16Weight, bias: np.ndarray | None) -> np.ndarray:
    """``x @ weight.T + bias`` with bf16 products summed in float32 (AMX or AVX512_BF16); the float32 fallback
    where the CPU has neither. x (..., in), bias (out,) -> (..., out)."""
    if not packed.packed:
        return _linear(x, weight_float32(packed.data, "bf16"), bias)
    return _packed_linear("linear_bf16", bf16_kernels.linear, x, packed, bias)


def pack_conv_bf16(bits: np.ndarray):  # -> Bf16Weight
    """A convolution weight (Cout, Cin, kh, kw) of bf16 bits prepared for the bf16 product of ``conv2d``."""
    return _pack_bf16(bits, 4, bf16_kernels.pack_conv_weight)


def _conv2d_bf16(x: np.ndarray, packed: Bf16Weight, bias: np.ndarray | None, stride: int,
                 padding: int) -> np.ndarray:
    """``conv2d`` with bf16 products summed in float32, im2col panels built in bf16 by the kernel; the float32
    fallback where the CPU has no bf16 instructions. x (B, Cin, H, W) -> (B, Cout, Ho, Wo)."""
    if not packed.packed:
        return _conv2d(x, weight_float32(packed.data, "bf16"), bias, stride, padding)
    x = _float32(x)
    out_channels, in_channels, kh, kw = packed.shape
    batch, channels, height, width = x.shape
    if channels != in_channels:
        raise ValueError(f"conv2d_bf16: x has {channels} channels, the weight takes {in_channels}")
    out_h = (height + 2 * padding - kh) // stride + 1
    out_w = (width + 2 * padding - kw) // stride + 1
    out = np.empty((batch, out_channels, out_h, out_w), dtype=np.float32)
    bf16_kernels.conv2d(x, packed.data, kh, kw, stride, padding, None if bias is None else _float32(bias), out)
    return out
