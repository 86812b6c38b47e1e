"""A test backend whose arrays cannot be read: the proof that the networks keep their activations in the backend.

Its arrays wrap numpy arrays in :class:`OpaqueArray`, which refuses every conversion to numpy (``__array__`` and
numpy's ufuncs raise), has no arithmetic operators, no indexing and no iteration: only ``shape``, ``ndim`` and
``dtype`` can be read, as of a device array. Its ops unwrap their arguments, compute through
:mod:`sdcli.ops.numpy_ops` and wrap the results, so a network built on it gives the numpy reference's results bit
for bit, unless it touches an array outside the ops, which raises. It also refuses host numpy arrays where a
backend array belongs: only ``from_host``, the ids of ``embedding`` and the timesteps of ``timestep_embedding``
take host arrays (and the weight conversions at load time, which run before a network exists).

A device backend (CUDA) needs exactly this of the networks; this one needs no device.
"""

from __future__ import annotations

import numpy as np

from sdcli.ops import numpy_ops
from sdcli.ops.parameter import Parameter, Weight

name = "opaque"
HOST_ARGUMENTS = {"from_host": (0,), "embedding": (1,), "timestep_embedding": (0,)}


class OpaqueArray:
    """A backend array: its shape and dtype can be read, its values only through ``to_host``."""

    __slots__ = ("_value",)
    __array_ufunc__ = None  # numpy's ufuncs (np.add(x, ...), x + array, ...) raise TypeError
    __array_function__ = None

    def __init__(self, value: np.ndarray):
        self._value = value

    @property
    def shape(self) -> tuple[int, ...]:
        return self._value.shape

    @property
    def ndim(self) -> int:
        return self._value.ndim

    @property
    def dtype(self) -> np.dtype:
        return self._value.dtype

    def __array__(self, *args, **kwargs):
        raise TypeError("an opaque backend array cannot become a numpy array (use ops.to_host)")

    def __iter__(self):
        raise TypeError("an opaque backend array cannot be iterated")

    def __bool__(self):
        raise TypeError("an opaque backend array has no truth value")

    def __repr__(self) -> str:
        return f"OpaqueArray(shape={self.shape}, dtype={self.dtype})"


class OpaqueParameter:
    """A prepared weight: precision and shape readable, values not."""

    __slots__ = ("inner",)

    def __init__(self, inner: Parameter):
        self.inner = inner

    @property
    def precision(self) -> str:
        return self.inner.precision

    @property
    def shape(self) -> tuple[int, ...]:
        return self.inner.shape


def _unwrap(value, op: str, position: int | None = None):
    if isinstance(value, OpaqueArray):
        return value._value
    if isinstance(value, OpaqueParameter):
        return value.inner
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], (OpaqueArray, OpaqueParameter)):
        return type(value)(_unwrap(item, op) for item in value)
    if isinstance(value, np.ndarray) and value.ndim > 0 and position not in HOST_ARGUMENTS.get(op, ()):
        raise TypeError(f"ops.{op} got a host numpy array {value.shape} where a backend array belongs")
    return value


def _wrap(value):
    if isinstance(value, np.ndarray):
        return OpaqueArray(value)
    if isinstance(value, tuple):
        return tuple(_wrap(item) for item in value)
    return value


class OpaqueOps:
    """The backend: every function of numpy_ops, over opaque arrays."""

    name = name

    def from_host(self, x: np.ndarray) -> OpaqueArray:
        return OpaqueArray(numpy_ops.from_host(x))

    def to_host(self, x: OpaqueArray) -> np.ndarray:
        if not isinstance(x, OpaqueArray):
            raise TypeError(f"ops.to_host expects a backend array, got {type(x).__name__}")
        return np.array(x._value)

    def prepare(self, weight: Weight) -> OpaqueParameter:
        return OpaqueParameter(numpy_ops.prepare(weight))

    # conversions of host weights at load time, before the backend holds them
    weight_float32 = staticmethod(numpy_ops.weight_float32)
    weight_from_float32 = staticmethod(numpy_ops.weight_from_float32)

    def map_rows(self, function, x: OpaqueArray, rows: int) -> OpaqueArray:
        return OpaqueArray(numpy_ops.map_rows(lambda piece: _unwrap(function(OpaqueArray(piece)), "map_rows"),
                                              _unwrap(x, "map_rows"), rows))

    def __getattr__(self, op: str):
        function = getattr(numpy_ops, op)

        def call(*args, **kwargs):
            args = [_unwrap(arg, op, position) for position, arg in enumerate(args)]
            kwargs = {key: _unwrap(value, op) for key, value in kwargs.items()}
            return _wrap(function(*args, **kwargs))

        call.__name__ = op
        return call


opaque_ops = OpaqueOps()
