"""The scoped parameter builder: networks take their weights from a checkpoint by building themselves.

A network's constructor takes a :class:`~sdcli.nn.layers.ParameterSource` and spells each tensor's name once,
where the layer is made (``params.scope("down_blocks", 0, "resnets", 1).take("weight", shape)``, through the
layers of :mod:`sdcli.nn.layers`). The builder here is that source, in two modes:

- **shape-only** (:func:`tensor_shapes`): every tensor the network takes, with its shape, and nothing read. It
  replaces hand-written shape tables: the strict check, the single-file name maps and the tests' random weights
  all start from it.
- **loading** (:func:`load_network`): first the shape-only pass and the strict check of the source against it
  (every missing, unexpected and mis-shaped tensor named in one error, before anything is read); then the build,
  in which each tensor is read once from the mapped file, held at the precision asked for (converted by the
  backend's parallel kernels where the stored type differs) and handed once to the backend's ``prepare``.

Precision is the prepared parameter's: the same network class runs fp32, fp16 and bf16 weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Protocol, TypeVar

import numpy as np

from ..ops import Ops
from ..ops import numpy_ops
from ..ops.parameter import Parameter, Weight
from ..errors import CheckpointError

Network = TypeVar("Network")
Shapes = dict[str, tuple[int, ...]]


class TensorSource(Protocol):
    """Tensors of one component by canonical name, as stored (BF16 as uint16 bits)."""

    description: str

    def keys(self) -> list[str]: ...

    def dtype(self, name: str) -> str: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str) -> np.ndarray:
        """The tensor as stored: a read-only view of the mapped file, or a new writeable array the source made for
        this read (a LoRA-merged layer), which the network then holds as its own copy."""

    def unexpected(self) -> list[str]: ...

    def release(self, name: str | None = None) -> None:
        """Drop the pages of tensor ``name`` (of every tensor when None) from resident memory; reads still work."""


def check_tensors(source: TensorSource, expected: dict[str, tuple[int, ...]],
                  optional: frozenset[str] | set[str] = frozenset()) -> None:
    """Strict check: every expected tensor present with its shape (those in ``optional`` may be absent), nothing
    else. Raises naming each tensor."""
    present = set(source.keys())
    missing = [name for name in expected if name not in present and name not in optional]
    unexpected = sorted(present - set(expected)) + source.unexpected()
    found = {name: tuple(source.shape(name)) for name in expected if name in present}
    misshaped = [f"{name} {found[name]} (expected {tuple(shape)})"
                 for name, shape in expected.items() if name in found and found[name] != tuple(shape)]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            shown = ", ".join(items[:6]) + (f", ... ({len(items) - 6} more)" if len(items) > 6 else "")
            problems.append(f"{len(items)} {label}: {shown}")
    if problems:
        raise CheckpointError(f"{source.description}: does not match the architecture; " + "; ".join(problems))




class _Taken:
    """What a build has taken so far, shared by every scope of one builder."""

    def __init__(self, source: TensorSource | None, ops: Ops, precision: str, stream: bool):
        self.source, self.ops, self.precision, self.stream = source, ops, precision, stream
        self.shapes: Shapes = {}
        self.optional: set[str] = set()  # taken with a default: a source may leave them out
        self.parameters: dict[str, Parameter] = {}  # read from the source, by full name
        self._stored: set[str] | None = None

    def stored(self, name: str) -> bool:
        if self._stored is None:
            self._stored = set(self.source.keys())
        return name in self._stored


class WeightBuilder:
    """A :class:`~sdcli.nn.layers.ParameterSource` over a tensor source (loading) or none (shape-only)."""

    def __init__(self, source: TensorSource | None, ops: Ops, precision: str = "fp32", *, stream: bool = False,
                 _taken: _Taken | None = None, _prefix: str = "", _load: bool = True):
        self._taken = _taken if _taken is not None else _Taken(source, ops, precision, stream)
        self._prefix, self._load = _prefix, _load and self._taken.source is not None
        self.ops = ops

    def scope(self, *names: str | int) -> "WeightBuilder":
        prefix = self._prefix + "".join(f"{name}." for name in names)
        return WeightBuilder(None, self.ops, _taken=self._taken, _prefix=prefix, _load=self._load)

    def shapes_only(self) -> "WeightBuilder":
        """This scope without reading: the tensors taken through it are recorded (and checked), not loaded."""
        return WeightBuilder(None, self.ops, _taken=self._taken, _prefix=self._prefix, _load=False)

    @property
    def shapes(self) -> Shapes:
        """Every tensor taken so far, by full name, with its shape."""
        return dict(self._taken.shapes)

    @property
    def optional(self) -> frozenset[str]:
        """The tensors taken so far with a default, which a source may leave out."""
        return frozenset(self._taken.optional)

    def take(self, name: str, shape: tuple[int, ...], default: Callable[[], np.ndarray] | None = None) -> Parameter:
        taken = self._taken
        full = self._prefix + name
        shape = tuple(int(size) for size in shape)
        if full in taken.shapes:
            raise ValueError(f"tensor {full!r} is taken twice while building the network")
        taken.shapes[full] = shape
        if default is not None:
            taken.optional.add(full)
        if not self._load:
            return Parameter(Weight(np.broadcast_to(np.float32(0), shape), "fp32"))  # a shape, no memory
        source = taken.source
        if default is not None and not taken.stored(full):
            values = np.ascontiguousarray(default(), dtype=np.float32)
            if values.shape != shape:
                raise ValueError(f"the default of {full!r} has shape {values.shape}, not {shape}")
            return taken.ops.prepare(Weight.from_stored(values, "F32", taken.precision, taken.ops))
        parameter = held_parameter(source, full, taken.ops, taken.precision, taken.stream)
        taken.parameters[full] = parameter
        return parameter


def held_parameter(source: TensorSource, name: str, ops: Ops, precision: str, stream: bool = False) -> Parameter:
    """Tensor ``name`` of ``source`` read, held at ``precision`` and prepared by ``ops``: a view of the mapped file
    kept as it is (its pages released after preparing, or after every use with ``stream``), or a copy (converted,
    or made by the source for this read: a LoRA-merged layer) that alone stays resident."""
    stored = source.read(name)
    weight = Weight.from_stored(stored, source.dtype(name), precision, ops)
    if weight.data is not stored or stored.flags.writeable:
        source.release(name)
    else:
        weight = replace(weight, release=partial(source.release, name), stream=stream)
    return ops.prepare(weight)


def tensor_shapes(build: Callable[[WeightBuilder], object], ops: Ops = numpy_ops) -> Shapes:
    """Every tensor ``build(params)`` takes, by full name, with its shape (nothing is read).
    ``build`` is e.g. ``lambda params: UNet2DConditionModel(params, config)``."""
    builder = WeightBuilder(None, ops)
    build(builder)
    return builder.shapes


def load_network(build: Callable[[WeightBuilder], Network], source: TensorSource, ops: Ops,
                 precision: str = "fp32", *, stream: bool = False,
                 also_checks: Callable[[WeightBuilder], object] | None = None,
                 named: dict[str, Parameter] | None = None) -> Network:
    """``build(params)`` over the tensors of ``source``, held at ``precision`` and prepared by ``ops``.

    Strict: the source must hold every tensor the network takes, with its shape, and nothing else; one error
    names each missing, unexpected and mis-shaped tensor, before anything is read. ``also_checks`` builds, shape
    only, the rest of a component whose one part is loaded (an autoencoder's encoder when only its decoder is
    wanted): its tensors are checked too, and never read or converted.

    A tensor converted to another type leaves the file's pages at once. A tensor held as a view of the file
    stays mapped; with ``stream`` its pages are dropped again after each use, so that resident memory holds
    about one layer's weights instead of the model's, for the cost of mapping them again from the page cache.
    A tensor the source computed for the read (a writeable array: a LoRA-merged layer) is held as a converted one.

    ``named``, when given, receives every parameter read from the source by its full name (what a LoRA switch
    needs to change some of a built network's weights in place).
    """
    listing = WeightBuilder(None, ops)
    build(listing)
    expected, optional = listing.shapes, set(listing.optional)
    if also_checks is not None:
        also = WeightBuilder(None, ops)
        also_checks(also)
        expected.update(also.shapes)
        optional |= also.optional
    check_tensors(source, expected, optional)
    builder = WeightBuilder(source, ops, precision, stream=stream)
    network = build(builder)
    if builder.shapes.keys() - expected.keys():
        raise ValueError("the network took other tensors when loading than when its shapes were listed")
    if named is not None:
        named.update(builder._taken.parameters)
    return network


ARRAY_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.uint16): "BF16",
                np.dtype(np.float64): "F64"}


def _read_only(array) -> np.ndarray:
    view = np.asarray(array).view()  # the caller's array stays as it was
    view.flags.writeable = False
    return view


class ArraySource:
    """A tensor source over arrays in memory (a state dict): float32, float16, float64, or bf16 bits in uint16.
    For networks built from tensors that no file holds (tests, conversions). Held as read-only views, as a file's
    tensors are: a network keeps them as they are and prepares them again after an unload."""

    def __init__(self, arrays: dict[str, np.ndarray], description: str = "arrays in memory"):
        self.description = description
        self._arrays = {name: _read_only(array) for name, array in arrays.items()}
        for name, array in self._arrays.items():
            if array.dtype not in ARRAY_DTYPES:
                raise ValueError(f"{name}: arrays of {array.dtype} cannot be held as weights")

    def keys(self) -> list[str]:
        return list(self._arrays)

    def dtype(self, name: str) -> str:
        return ARRAY_DTYPES[self._arrays[name].dtype]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._arrays[name].shape

    def read(self, name: str) -> np.ndarray:
        return self._arrays[name]

    def release(self, name: str | None = None) -> None:
        pass

    def unexpected(self) -> list[str]:
        return []
