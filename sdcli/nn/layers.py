"""Weight holders: small layers that keep their tensors in the precision asked for and call the op backend.

A :class:`Weight` holds one tensor as it is kept in memory: float32 (a zero-copy view of the memory-mapped file
when the file stores F32), float16, or bfloat16 bits in a uint16 array (numpy has no bfloat16). fp32 and fp16 layers
compute in float32 (the backend widens an fp16 weight as it multiplies); bf16 Linear and Conv2d layers multiply in
bf16 with float32 sums where the backend can (see :class:`Linear`), and norms widen their small weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial

import numpy as np

from ..errors import SdcliError
from ..io.checkpoint import TensorSource, check_tensors
from ..io.safetensors import bf16_to_float32, stored_float32
from ..ops import Ops

PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class Weight:
    """One tensor held as ``precision`` ("fp32", "fp16" or "bf16"; bf16 data are uint16 bits).

    ``release``, set when ``data`` is a view of a memory-mapped file, drops its pages from resident memory: layers
    call ``release_pages`` once they have made their own copy of the tensor, and after every use when ``stream``
    (``load_weights(stream=True)``).
    """

    data: np.ndarray
    precision: str
    release: Callable[[], None] | None = field(default=None, compare=False, repr=False)
    stream: bool = False  # release after every use: layers then never keep a prepared copy

    def release_pages(self) -> None:
        if self.release is not None:
            self.release()

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def float32(self) -> np.ndarray:
        """The values as float32: the held array itself for fp32, a converted copy otherwise."""
        if self.precision == "bf16":
            return bf16_to_float32(self.data)
        return self.data.astype(np.float32, copy=False)

    @classmethod
    def from_stored(cls, data: np.ndarray, dtype: str, precision: str, ops: Ops | None = None) -> "Weight":
        """Hold ``data`` (stored as safetensors ``dtype``: "F32", "F16", "BF16", ...) at ``precision``.

        No copy is made when the stored type is already the held type. Conversions run on ``ops`` (a backend's
        parallel kernels) when given, in numpy otherwise; both round to nearest even.
        """
        if precision not in PRECISIONS:
            raise SdcliError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
        if (dtype, precision) in (("F32", "fp32"), ("F16", "fp16"), ("BF16", "bf16")):
            return cls(data, precision)
        if ops is None:
            from ..ops import numpy_ops as ops
        if dtype in ("BF16", "F16"):
            values = ops.weight_float32(data, "bf16" if dtype == "BF16" else "fp16")
        else:
            values = stored_float32(data, dtype)
        return cls(ops.weight_from_float32(values, precision), precision)


def load_weights(source: TensorSource, expected: dict[str, tuple[int, ...]], precision: str,
                 only: dict[str, tuple[int, ...]] | None = None, stream: bool = False,
                 ops: Ops | None = None) -> dict[str, Weight]:
    """The tensors of ``expected`` from ``source``, held at ``precision``. Strict: ``check_tensors`` requires every
    expected tensor with its shape and nothing else. ``only`` reads a subset (one half of an autoencoder) after
    checking the whole, so the other half is never converted.

    A tensor converted to another type leaves the file's pages at once (only the converted copy stays resident).
    A tensor held as a view of the file stays mapped; with ``stream`` its pages are dropped again after each use
    (``Weight.release_pages``), so that resident memory holds about one layer's weights instead of the model's, for
    the cost of mapping them again from the page cache on the next call. Conversions run on ``ops`` when given.
    """
    check_tensors(source, expected)
    weights = {}
    for name in expected if only is None else only:
        stored = source.read(name)
        weight = Weight.from_stored(stored, source.dtype(name), precision, ops)
        if weight.data is not stored:
            source.release(name)
        else:
            weight = replace(weight, release=partial(source.release, name), stream=stream)
        weights[name] = weight
    return weights


class Linear:
    """y = x W^T + b. weight (out, in), bias (out,).

    On the first call an fp32 or fp16 weight is prepared for the backend's float32 products (``ops.pack_linear``,
    which keeps fp16 at half the size) and a bf16 one for its bf16 products (``ops.pack_linear_bf16``); only the
    prepared form is kept after. Streamed weights are widened to float32 at each call instead (the file's pages
    then leave resident memory after each call; a prepared copy would stay).
    """

    def __init__(self, ops: Ops, weight: Weight, bias: Weight | None):
        self.ops, self.weight, self.bias = ops, weight, bias
        self.prepared = None  # the weight as the backend multiplies it, once made (see prepare)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        bias = self.bias.float32() if self.bias is not None else None
        if self.weight.precision == "bf16":
            return self.ops.linear_bf16(x, self.prepare(self.ops.pack_linear_bf16), bias)
        if not self.weight.stream:  # fp32 or fp16
            return self.ops.linear(x, self.prepare(self.ops.pack_linear), bias)
        y = self.ops.linear(x, self.ops.weight_float32(self.weight.data, self.weight.precision), bias)
        if self.weight.stream:
            self.weight.release_pages()
        return y

    def prepare(self, pack):
        """``pack(weight)`` on the first call, kept. The held array's file pages are released; a view of the file
        stays (it costs no resident memory), so that ``unload`` can drop the prepared form and a later call make
        it again, while a converted copy is dropped for good."""
        if self.prepared is None:
            self.prepared = pack(self.weight.data)
            self.weight.release_pages()
            if self.weight.release is None:
                self.weight = replace(self.weight, data=np.empty(0, self.weight.data.dtype))
        return self.prepared

    def unload(self) -> bool:
        """Drop the prepared weight when the next call can make it again from the mapped file; True if dropped."""
        if self.prepared is None or self.weight.release is None:
            return False
        self.prepared = None
        self.weight.release_pages()
        return True


class LayerNorm:
    """Normalisation over the last axis with a learnt scale and shift, both (C,)."""

    def __init__(self, ops: Ops, weight: Weight, bias: Weight, eps: float):
        self.ops, self.weight, self.bias, self.eps = ops, weight, bias, eps

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.ops.layer_norm(x, self.weight.float32(), self.bias.float32(), self.eps)


class Conv2d:
    """2-D convolution with zero padding. weight (Cout, Cin, kh, kw), bias (Cout,) or None. Precisions as Linear."""

    def __init__(self, ops: Ops, weight: Weight, bias: Weight | None, stride: int = 1, padding: int = 0):
        self.ops, self.weight, self.bias, self.stride, self.padding = ops, weight, bias, stride, padding
        self.prepared = None  # the weight as the backend multiplies it, once made (see Linear.prepare)

    prepare = Linear.prepare
    unload = Linear.unload

    def __call__(self, x: np.ndarray) -> np.ndarray:
        bias = self.bias.float32() if self.bias is not None else None
        if self.weight.precision == "bf16":
            return self.ops.conv2d_bf16(x, self.prepare(self.ops.pack_conv_bf16), bias, stride=self.stride,
                                        padding=self.padding)
        if not self.weight.stream:  # fp32 or fp16
            return self.ops.conv2d(x, self.prepare(self.ops.pack_conv), bias, stride=self.stride,
                                   padding=self.padding)
        weight = self.ops.weight_float32(self.weight.data, self.weight.precision)
        y = self.ops.conv2d(x, weight, bias, stride=self.stride, padding=self.padding)
        if self.weight.stream:
            self.weight.release_pages()
        return y


class GroupNorm:
    """Normalisation over channel groups and positions, with a learnt per-channel scale and shift, both (C,)."""

    def __init__(self, ops: Ops, weight: Weight, bias: Weight, num_groups: int, eps: float):
        self.ops, self.weight, self.bias, self.num_groups, self.eps = ops, weight, bias, num_groups, eps

    def __call__(self, x: np.ndarray, silu: bool = False) -> np.ndarray:
        """The normalised x, then SiLU of it when ``silu`` (fused by the backend)."""
        return self.ops.group_norm(x, self.num_groups, self.weight.float32(), self.bias.float32(), self.eps,
                                   silu=silu)


class Embedding:
    """Rows of a (V, C) table picked by integer ids."""

    def __init__(self, weight: Weight):
        self.weight = weight

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        rows = np.take(self.weight.data, ids, axis=0)  # (..., C), gathered before conversion: only these rows
        return Weight(rows, self.weight.precision).float32()


def matrix_layers(model) -> Iterator[Linear | Conv2d]:
    """Every Linear and Conv2d of ``model``, once each: walks the attributes of sdcli.nn objects, lists, tuples
    and dicts."""
    seen, pending = set(), [model]
    while pending:
        item = pending.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, (Linear, Conv2d)):
            yield item
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif type(item).__module__.startswith("sdcli.nn."):
            pending.extend(vars(item).values())


def unload_prepared(model) -> int:
    """Drop the prepared weights of every Linear and Conv2d of ``model`` that can make them again from the mapped
    file (``Linear.unload``): the network keeps working, and prepares each layer again on its next call. Returns
    the number of layers unloaded."""
    return sum(layer.unload() for layer in matrix_layers(model))


def unprepared_bytes(model) -> int:
    """The resident memory the next call of ``model`` adds for its weights: the prepared copy of every Linear and
    Conv2d held as a view of the mapped file and not prepared yet (a converted copy is resident already, and its
    prepared form replaces it), and for streamed weights the largest one widened to float32 (one at a time)."""
    total, widest = 0, 0
    for layer in matrix_layers(model):
        weight = layer.weight
        if weight.stream:
            widest = max(widest, weight.data.size * 4)
        elif layer.prepared is None and weight.release is not None:
            total += weight.nbytes
    return total + widest


def linear_from(ops: Ops, weights: dict[str, Weight], prefix: str, bias: bool = True) -> Linear:
    """The Linear layer whose tensors are ``{prefix}weight`` and ``{prefix}bias``."""
    return Linear(ops, weights[prefix + "weight"], weights[prefix + "bias"] if bias else None)


def layer_norm_from(ops: Ops, weights: dict[str, Weight], prefix: str, eps: float) -> LayerNorm:
    return LayerNorm(ops, weights[prefix + "weight"], weights[prefix + "bias"], eps)


def conv2d_from(ops: Ops, weights: dict[str, Weight], prefix: str, stride: int = 1, padding: int | None = None,
                bias: bool = True) -> Conv2d:
    """The Conv2d whose tensors are ``{prefix}weight`` and ``{prefix}bias``; padding defaults to "same" (k // 2)."""
    weight = weights[prefix + "weight"]
    if padding is None:
        padding = weight.shape[-1] // 2
    return Conv2d(ops, weight, weights[prefix + "bias"] if bias else None, stride=stride, padding=padding)


def group_norm_from(ops: Ops, weights: dict[str, Weight], prefix: str, num_groups: int, eps: float) -> GroupNorm:
    return GroupNorm(ops, weights[prefix + "weight"], weights[prefix + "bias"], num_groups, eps)


def checked_images(x: np.ndarray, channels: int, what: str, multiple: int = 1) -> np.ndarray:
    """x as float32 (B, channels, H, W) with H and W positive multiples of ``multiple``, or a one-line error."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4 or x.shape[1] != channels or x.shape[0] < 1:
        raise SdcliError(f"{what} must be (batch, {channels}, height, width), got shape {x.shape}")
    height, width = x.shape[2:]
    if height < multiple or width < multiple or height % multiple or width % multiple:
        size = f"multiples of {multiple}" if multiple > 1 else "at least 1"
        raise SdcliError(f"{what} height and width must be {size}, got {height}x{width}")
    return x
