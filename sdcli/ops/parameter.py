"""Weights as the networks hold them: a tensor at a precision (:class:`Weight`), prepared for a backend
(:class:`Parameter`).

A network never reads a weight's array. Its layers hold :class:`Parameter` objects, made once per tensor by the
backend's ``prepare`` when the network is built (``sdcli.io.weights``), and pass them to ops such as ``linear``
and ``conv2d``, which run whatever precision the parameter holds: there is no op per precision.

The CPU backends prepare lazily. A matrix (a Linear or convolution weight) is packed into the backend's layout on
its first use and the packed form kept; ``unload`` drops it again when the held array is a view of the mapped file,
so that a stage's weights leave resident memory between runs (the next call packs again). A streamed weight
(``Weight.stream``) is never kept prepared: each call widens it to float32 and releases the file's pages after.
A device backend would upload in ``prepare`` instead; the layers do not change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np

from ..dtypes import bf16_to_float32, held_float32, held_from_float32, stored_float32
from ..errors import SdcliError

PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class Weight:
    """One tensor held as ``precision`` ("fp32", "fp16" or "bf16"; bf16 data are uint16 bits).

    ``release``, set when ``data`` is a view of a memory-mapped file, drops its pages from resident memory: a
    parameter calls it once it has made its own prepared copy of the tensor, and after every use when ``stream``.
    """

    data: np.ndarray
    precision: str
    release: Callable[[], None] | None = field(default=None, compare=False, repr=False)
    stream: bool = False  # release after every use: never kept prepared

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
    def of(cls, array: np.ndarray, precision: str | None = None) -> "Weight":
        """An array as a weight: float16 held as fp16, other floats as fp32, uint16 bits as bf16 (or as given)."""
        array = np.asarray(array)
        if precision is None:
            precision = {np.dtype(np.float16): "fp16", np.dtype(np.uint16): "bf16"}.get(array.dtype, "fp32")
        if precision == "fp32" and array.dtype != np.float32:
            array = array.astype(np.float32)
        return cls(array, precision)

    @classmethod
    def from_stored(cls, data: np.ndarray, dtype: str, precision: str, convert=None) -> "Weight":
        """Hold ``data`` (stored as safetensors ``dtype``: "F32", "F16", "BF16", ...) at ``precision``.

        No copy is made when the stored type is already the held type. Conversions run on ``convert`` (a backend,
        for its parallel ``weight_float32`` / ``weight_from_float32``) when given, in numpy otherwise; both round
        to nearest even.
        """
        if precision not in PRECISIONS:
            raise SdcliError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
        if (dtype, precision) in (("F32", "fp32"), ("F16", "fp16"), ("BF16", "bf16")):
            return cls(data, precision)
        widen = convert.weight_float32 if convert is not None else held_float32
        narrow = convert.weight_from_float32 if convert is not None else held_from_float32
        if dtype in ("BF16", "F16"):
            values = widen(data, "bf16" if dtype == "BF16" else "fp16")
        else:
            values = stored_float32(data, dtype)
        return cls(narrow(values, precision), precision)


class Parameter:
    """A weight prepared for a CPU backend: what a layer holds and hands to the ops.

    ``prepared(pack)`` is the matrix as the backend multiplies it, made by ``pack(held array)`` on the first call
    and kept; ``float32()`` the values as float32 (norm scales, biases). ``precision`` and ``shape`` are the
    weight's.
    """

    __slots__ = ("weight", "_prepared")

    def __init__(self, weight: Weight):
        self.weight = weight
        self._prepared = None

    @property
    def precision(self) -> str:
        return self.weight.precision

    @property
    def shape(self) -> tuple[int, ...]:
        return self.weight.shape

    @property
    def streamed(self) -> bool:
        return self.weight.stream

    @property
    def data(self) -> np.ndarray:
        """The held array (fp32, fp16, or bf16 bits)."""
        return self.weight.data

    def float32(self) -> np.ndarray:
        return self.weight.float32()

    def prepared(self, pack: Callable[[np.ndarray], object]):
        """``pack(held array)`` on the first call, kept. The held array's file pages are released; a view of the
        file stays (it costs no resident memory), so that ``unload`` can drop the prepared form and a later call
        make it again, while a converted copy is dropped for good."""
        if self._prepared is None:
            weight = self.weight
            self._prepared = pack(weight.data)
            weight.release_pages()
            if weight.release is None:
                self.weight = replace(weight, data=np.empty((0,) * weight.data.ndim, weight.data.dtype))
        return self._prepared

    @property
    def is_prepared(self) -> bool:
        return self._prepared is not None

    def exchange(self, other: "Parameter") -> None:
        """Exchange what this parameter and ``other`` hold (the weight and its prepared form): how a LoRA switch
        puts another version of a layer's weight into a built network, and parks the one it held, both kept as
        they are (a merged copy exists only as its prepared form once used)."""
        self.weight, other.weight = other.weight, self.weight
        self._prepared, other._prepared = other._prepared, self._prepared

    def unload(self) -> bool:
        """Drop the prepared form when the next call can make it again from the mapped file; True if dropped."""
        if self._prepared is None or self.weight.release is None:
            return False
        self._prepared = None
        self.weight.release_pages()
        return True


def as_parameter(weight) -> Parameter:
    """``weight`` itself when it is a Parameter; a plain array held as it is (see ``Weight.of``) otherwise."""
    return weight if isinstance(weight, Parameter) else Parameter(Weight.of(weight))


def parameters(model) -> Iterator[Parameter]:
    """Every Parameter of ``model``, once each: walks the attributes of sdcli.nn objects, lists, tuples and dicts."""
    seen, pending = set(), [model]
    while pending:
        item = pending.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, Parameter):
            yield item
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif type(item).__module__.startswith("sdcli.nn."):
            pending.extend(vars(item).values())


def unload_prepared(model) -> int:
    """Drop the prepared weights of ``model`` that can be made again from the mapped file (``Parameter.unload``):
    the network keeps working and prepares each again on its next call. Returns the number unloaded."""
    return sum(parameter.unload() for parameter in parameters(model))


def unprepared_bytes(model) -> int:
    """The resident memory the next call of ``model`` adds for its weights: the prepared copy of every matrix held
    as a view of the mapped file and not prepared yet (a converted copy is resident already, and its prepared form
    replaces it), and for streamed weights the largest one widened to float32 (one at a time). Vectors (norm
    scales, biases) are left out: they are used as they are held."""
    total, widest = 0, 0
    for parameter in parameters(model):
        weight = parameter.weight
        if weight.data.ndim < 2:
            continue
        if weight.stream:
            widest = max(widest, weight.data.size * 4)
        elif not parameter.is_prepared and weight.release is not None:
            total += weight.nbytes
    return total + widest


def run_matrix(weight: Parameter, float32_product, bf16_product, pack, pack_bf16, widen):
    """The one precision dispatch of the CPU backends' matrix ops (linear, convolutions).

    A bf16 weight runs ``bf16_product(pack_bf16(bits))`` (prepared once, kept; when streamed, packed for this
    call only). An fp32 or fp16 weight runs ``float32_product(pack(held array))`` (prepared once, kept), or when
    streamed ``float32_product(widen(held array, precision))``. A streamed weight's file pages are released after
    the call: the prepared copy a kept weight would make would stay resident.
    """
    if weight.precision == "bf16":
        if not weight.streamed:
            return bf16_product(weight.prepared(pack_bf16))
        y = bf16_product(pack_bf16(weight.data))
        weight.weight.release_pages()
        return y
    if not weight.streamed:
        return float32_product(weight.prepared(pack))
    y = float32_product(widen(weight.data, weight.precision))
    weight.weight.release_pages()
    return y
