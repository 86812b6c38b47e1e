"""PyTorch checkpoints read without torch and without running code from them, and converted to safetensors.

The format is the zip ``torch.save`` writes since torch 1.6 (``.pt``, ``.pth``, ``.ckpt``, ``.bin``). Its entries,
all stored uncompressed, sit in one folder (the archive name):

- ``ARCHIVE/data.pkl``: a pickle (protocol 2) of the saved object. A tensor in it is a call of
  ``torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks)``
  (``_rebuild_tensor_v3(..., dtype)`` for the dtypes newer than torch's typed storages: uint16/32/64, float8),
  whose storage is the persistent id ``("storage", torch.FloatStorage, key, location, numel)``;
- ``ARCHIVE/data/KEY``: each storage's bytes, ``numel`` elements of its type (bytes for an untyped storage);
- ``ARCHIVE/byteorder`` (``little`` or ``big``; older torch wrote none, and such files are read as little-endian,
  as torch reads them), and ``ARCHIVE/version`` and the like, which are not needed.

Unpickling calls the globals a pickle names, so a pickle can run any code. The unpickler here knows only a
whitelist, :data:`ALLOWED_GLOBALS` (the idea of ``torch.load(weights_only=True)``): the tensor rebuilders,
``collections.OrderedDict``, torch's storage types and dtypes, ``torch.Tensor`` and ``Parameter`` as type tags.
Each maps to a stand-in of this module, never to torch or to anything from the file, and nothing on a stand-in
can be changed from the pickle; any other global is refused by its full name when the pickle names it, before
anything is called. A stand-in only records what it is given: a tensor becomes a :class:`TensorRecord` (storage,
offset, shape, stride, dtype), and its bytes are read later through a memory map of the file, one tensor at a
time, so a 5.7 GB checkpoint is never loaded whole.

Everything the file declares is checked before it is used: a compressed or encrypted entry (which is how a zip
bomb works: torch never compresses) is refused, so nothing is ever inflated; a storage's entry must hold exactly
``numel * itemsize`` bytes inside the file; a tensor's shape, offset and strides must stay inside its storage;
sizes are Python integers, so no product overflows unnoticed. Every problem is a one-line ``CheckpointError``.

Files from torch < 1.6 (a sequence of pickles, not a zip) and TorchScript archives are refused.
"""

from __future__ import annotations

import _compat_pickle
import io
import math
import mmap
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import CheckpointError, SdcliError
from .files import atomic_output, check_output
from .safetensors import DTYPES as SAFETENSORS_DTYPES
from .safetensors import file_header

SOURCE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
MAX_PICKLE_BYTES = 256 * 2**20  # data.pkl of a model with tens of thousands of tensors is a few MB
MAX_DEPTH = 64  # nesting of dicts walked when selecting tensors
MAX_VISITS = 10_000_000  # values walked when selecting tensors (shared sub-dicts are walked once per reference)
GROWTH_LIMIT = 4  # output bytes at most this many times the input's, plus GROWTH_ALLOWANCE (views of one storage)
GROWTH_ALLOWANCE = 2**30
WRITE_CHUNK = 64 * 2**20  # bytes written (and reported to the progress callback) at a time

# torch's legacy format (torch < 1.6) starts with a pickled magic number: protocol 2, LONG1 of 10 bytes
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # a zip entry's local header, 30 bytes
_LOCAL_SIGNATURE = b"PK\x03\x04"


# ------------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class TorchDtype:
    """A tensor element type: torch's name for it and the safetensors code it is written as."""

    name: str
    code: str

    @property
    def numpy(self) -> np.dtype:
        """The numpy storage dtype (bfloat16: uint16 bits, float8: uint8 bits), little-endian."""
        return SAFETENSORS_DTYPES[self.code]


DTYPES: dict[str, TorchDtype] = {dtype.name: dtype for dtype in (
    TorchDtype("float64", "F64"), TorchDtype("float32", "F32"), TorchDtype("float16", "F16"),
    TorchDtype("bfloat16", "BF16"), TorchDtype("int64", "I64"), TorchDtype("int32", "I32"),
    TorchDtype("int16", "I16"), TorchDtype("int8", "I8"), TorchDtype("uint8", "U8"), TorchDtype("bool", "BOOL"),
    TorchDtype("uint16", "U16"), TorchDtype("uint32", "U32"), TorchDtype("uint64", "U64"),
    TorchDtype("float8_e4m3fn", "F8_E4M3"), TorchDtype("float8_e5m2", "F8_E5M2"),
)}

# torch's typed storage classes, in which _rebuild_tensor_v2's storages come -> their element type
STORAGE_TYPES: dict[str, str] = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool",
}


@dataclass(frozen=True, eq=False)
class StorageRef:
    """One storage of the archive: where its bytes lie in the file. ``dtype`` None: an untyped storage (bytes)."""

    key: str
    dtype: TorchDtype | None
    nbytes: int
    offset: int  # of its first byte in the file

    def __setstate__(self, state: Any) -> None:
        raise _Refusal("the pickle sets the state of a storage")


@dataclass(frozen=True, eq=False)
class TensorRecord:
    """A tensor as the pickle describes it, its data not read: ``shape`` elements of ``dtype`` at ``offset`` (in
    elements) of ``storage``, ``stride`` elements apart along each dimension (a view: transposed, sliced, or one of
    several tensors sharing the storage). The bounds were checked when it was made."""

    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: TorchDtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor written contiguously (not of its storage)."""
        return self.numel * self.dtype.numpy.itemsize

    def __setstate__(self, state: Any) -> None:
        raise _Refusal("the pickle sets the state of a tensor")


class _Refusal(Exception):
    """A problem found while unpickling; the archive turns it into a CheckpointError naming the file."""


def _number(value: int) -> str:
    """An integer from the file for a message (str() of a huge one raises; it is named by its size instead)."""
    return str(value) if value.bit_length() <= 128 else f"an integer of {value.bit_length()} bits"


def _quote(text: str) -> str:
    """A string from the file quoted on one line (controls escaped), cut to a readable length."""
    return repr(text if len(text) <= 120 else text[:120] + "...")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    """What a value from the pickle is, for a message (never its repr: that could be huge or recursive)."""
    if isinstance(value, TensorRecord):
        return "a tensor"
    if isinstance(value, dict):
        return "a dict"
    if isinstance(value, _StandIn):
        return value.name
    return {bool: "a bool", int: "an int", float: "a float", str: "a string", bytes: "bytes", tuple: "a tuple",
            list: "a list", type(None): "None"}.get(type(value), type(value).__name__)


# ------------------------------------------------------------------------------------------------- stand-ins


class _StandIn:
    """What a whitelisted global stands for. It has no attribute dictionary and refuses a BUILD, so the pickle can
    change nothing on it; calling one that is not a function is refused."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __setstate__(self, state: Any) -> None:
        raise _Refusal(f"the pickle sets the state of {self.name}")

    def __call__(self, *args: Any) -> Any:
        raise _Refusal(f"the pickle calls {self.name}, which is not a function")

    def __repr__(self) -> str:
        return f"<{self.name}>"


class _StorageType(_StandIn):
    """``torch.FloatStorage`` and the like (``dtype`` set), or ``torch.storage.UntypedStorage`` (None)."""

    __slots__ = ("dtype",)

    def __init__(self, name: str, dtype: TorchDtype | None) -> None:
        super().__init__(name)
        self.dtype = dtype


class _DtypeGlobal(_StandIn):
    """``torch.float32`` and the like: the dtype argument of ``_rebuild_tensor_v3`` (skipped anywhere else)."""

    __slots__ = ("dtype",)

    def __init__(self, name: str, dtype: TorchDtype) -> None:
        super().__init__(name)
        self.dtype = dtype


class _Function(_StandIn):
    """A whitelisted function: checks how many arguments it gets, then runs this module's ``impl`` on them."""

    __slots__ = ("impl", "least", "most")

    def __init__(self, name: str, impl: Callable[..., Any], least: int, most: int) -> None:
        super().__init__(name)
        self.impl, self.least, self.most = impl, least, most

    def __call__(self, *args: Any) -> Any:
        if not self.least <= len(args) <= self.most:
            raise _Refusal(f"the pickle calls {self.name} with {len(args)} arguments")
        return self.impl(*args)


class _StateDict(dict):
    """``collections.OrderedDict`` as the pickle builds it (a dict keeps its order). A BUILD with a dict, as a
    module's ``state_dict()`` carries its ``_metadata``, is accepted and dropped."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        if state is not None and not isinstance(state, dict):
            raise _Refusal(f"the pickle sets the state of an OrderedDict to {_kind(state)}")


def _ordered_dict(items: Any = ()) -> _StateDict:
    """``OrderedDict()`` (what torch writes, its items set afterwards) or ``OrderedDict([(key, value), ...])``."""
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, (list, tuple)) and len(i) == 2 for i in items):
        raise _Refusal(f"the pickle makes an OrderedDict of {_kind(items)}, not of (key, value) pairs")
    return _StateDict(items)


def _dims(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(_is_int(v) and v >= 0 for v in value):
        raise _Refusal(f"a tensor's {what} is {_kind(value)}, not a tuple of non-negative integers")
    if len(value) > 64:
        raise _Refusal(f"a tensor's {what} has {len(value)} dimensions, more than numpy's 64")
    return tuple(value)


def _tensor(storage: Any, offset: Any, size: Any, stride: Any, dtype: TorchDtype | None) -> TensorRecord:
    """A checked TensorRecord: its elements, at ``offset + sum(i_d * stride_d)``, all inside ``storage``."""
    if not isinstance(storage, StorageRef):
        raise _Refusal(f"a tensor's storage is {_kind(storage)}, not a storage of the archive")
    if dtype is None:
        dtype = storage.dtype
    elif storage.dtype is not None and storage.dtype is not dtype:
        raise _Refusal(f"a tensor of {dtype.name} lies in a storage of {storage.dtype.name}")
    if dtype is None:
        raise _Refusal("a tensor lies in an untyped storage without a dtype")
    if not _is_int(offset) or offset < 0:
        raise _Refusal(f"a tensor's storage offset is {_kind(offset)}, not a non-negative integer")
    shape, strides = _dims(size, "size"), _dims(stride, "stride")
    if len(shape) != len(strides):
        raise _Refusal(f"a tensor has {len(shape)} dimensions but {len(strides)} strides")
    itemsize = dtype.numpy.itemsize
    if storage.nbytes % itemsize:
        raise _Refusal(f"storage {_quote(storage.key)} of {storage.nbytes} bytes is not a whole number of "
                       f"{dtype.name} elements")
    elements = storage.nbytes // itemsize
    nonzero_bytes = itemsize  # numpy's rule: the size without the zero dimensions must fit in an ssize_t
    for dim in shape:
        nonzero_bytes *= max(dim, 1)
        if nonzero_bytes > 2**63 - 1:
            raise _Refusal(f"a tensor's size {_dims_text(shape)} has more elements than any array can hold")
    if max(strides, default=0) > 2**63 - 1 or offset > 2**63 - 1:
        raise _Refusal("a tensor's offset or strides are larger than any array")
    if 0 in shape:
        return TensorRecord(storage, offset, shape, strides, dtype)
    last = offset + sum((dim - 1) * step for dim, step in zip(shape, strides))
    if last >= elements:
        raise _Refusal(f"a tensor of size {_dims_text(shape)} at offset {_number(offset)} with stride "
                       f"{_dims_text(strides)} reaches element {_number(last)} of storage {_quote(storage.key)}, "
                       f"which holds {elements}")
    return TensorRecord(storage, offset, shape, strides, dtype)


def _dims_text(dims: tuple[int, ...]) -> str:
    text = ", ".join(_number(dim) for dim in dims[:8]) + (", ..." if len(dims) > 8 else "")
    return f"({text})"


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None) -> TensorRecord:
    return _tensor(storage, storage_offset, size, stride, None)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       metadata=None) -> TensorRecord:
    if not isinstance(dtype, _DtypeGlobal):
        raise _Refusal(f"_rebuild_tensor_v3 is given {_kind(dtype)} as its dtype")
    return _tensor(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None) -> TensorRecord:
    if not isinstance(data, TensorRecord):
        raise _Refusal(f"a parameter holds {_kind(data)}, not a tensor")
    return data


def _rebuild_from_type_v2(function, new_type, args, state) -> TensorRecord:
    """A tensor with Python attributes (``state``, dropped): ``function(*args)``, only a rebuilder of this module."""
    if not (isinstance(function, _Function) and function.impl in _REBUILDERS and isinstance(new_type, _TypeTag)
            and isinstance(args, tuple)):
        raise _Refusal("_rebuild_from_type_v2 is given something other than a tensor rebuilder, a tensor type and "
                       "its arguments")
    return function(*args)


class _TypeTag(_StandIn):
    """``torch.Tensor`` or ``torch.nn.parameter.Parameter``: only an argument of ``_rebuild_from_type_v2``."""

    __slots__ = ()


_REBUILDERS = (_rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter)


def _allowed_globals() -> dict[tuple[str, str], _StandIn]:
    allowed: dict[tuple[str, str], _StandIn] = {
        ("collections", "OrderedDict"): _Function("collections.OrderedDict", _ordered_dict, 0, 1),
        ("torch._utils", "_rebuild_tensor_v2"): _Function("torch._utils._rebuild_tensor_v2", _rebuild_tensor_v2, 4, 7),
        ("torch._utils", "_rebuild_tensor_v3"): _Function("torch._utils._rebuild_tensor_v3", _rebuild_tensor_v3, 7, 8),
        ("torch._utils", "_rebuild_parameter"): _Function("torch._utils._rebuild_parameter", _rebuild_parameter, 1, 3),
        ("torch._utils", "_rebuild_parameter_with_state"): _Function(
            "torch._utils._rebuild_parameter_with_state", _rebuild_parameter, 4, 4),
        ("torch._tensor", "_rebuild_from_type_v2"): _Function(
            "torch._tensor._rebuild_from_type_v2", _rebuild_from_type_v2, 4, 4),
        ("torch", "Tensor"): _TypeTag("torch.Tensor"),
        ("torch.nn.parameter", "Parameter"): _TypeTag("torch.nn.parameter.Parameter"),
        ("torch.storage", "UntypedStorage"): _StorageType("torch.storage.UntypedStorage", None),
        ("torch", "UntypedStorage"): _StorageType("torch.UntypedStorage", None),
    }
    for name, dtype in STORAGE_TYPES.items():
        allowed["torch", name] = _StorageType(f"torch.{name}", DTYPES[dtype])
    for name, dtype in DTYPES.items():
        allowed["torch", name] = _DtypeGlobal(f"torch.{name}", dtype)
    return allowed


ALLOWED_GLOBALS = _allowed_globals()
"""(module, name) -> the stand-in the unpickler hands out for it; every other global is refused."""


# ------------------------------------------------------------------------------------------------- unpickling


class _Unpickler(pickle._Unpickler):
    """The restricted unpickler. It is the pure-Python one on purpose: its memo is a dict, where the C unpickler
    grows an array to the largest memo index a pickle names (five bytes could ask for tens of gigabytes)."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes, archive: "TorchArchive") -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self._archive = archive

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3:  # protocols 0-2 carry Python 2's names (__builtin__): read as Python 3's, as pickle does
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        stand_in = ALLOWED_GLOBALS.get((module, name))
        if stand_in is None:
            raise _Refusal(_global_refusal(module, name))
        return stand_in

    def persistent_load(self, pid: Any) -> StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and isinstance(pid[0], str) and pid[0] == "storage"):
            raise _Refusal(f"a persistent id is {_kind(pid)}, not a storage reference")
        _, kind, key, location, numel = pid
        if not isinstance(kind, _StorageType) or not isinstance(key, str) or not isinstance(location, str):
            raise _Refusal("a storage reference is not (storage type, key, location, size)")
        if not _is_int(numel) or numel < 0:
            raise _Refusal(f"storage {_quote(key)} declares a size of {_kind(numel)}, not a non-negative integer")
        return self._archive.storage(key, kind.dtype, numel)

    def _refuse_extension(self) -> None:
        # EXT1/2/4 look a global up in copyreg's registry and pickle's process-wide cache of it, where a cached
        # object would be handed out without find_class: torch never writes them
        raise _Refusal("the pickle names a global by an extension code, which checkpoints never do")

    for _opcode in (pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_opcode[0]] = _refuse_extension
    del _opcode


_UNCONVERTED_DTYPES = frozenset((
    "complex32", "complex64", "complex128", "chalf", "cfloat", "cdouble", "qint8", "quint8", "qint32", "quint4x2",
    "quint2x4", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu", "float4_e2m1fn_x2", "bits1x8", "bits2x4",
    "bits4x2", "bits8", "bits16", *(f"int{n}" for n in range(1, 8)), *(f"uint{n}" for n in range(1, 8)),
))


def _global_refusal(module: str, name: str) -> str:
    full = f"{module}.{name}"
    if module == "torch" and (name.endswith("Storage") or name in _UNCONVERTED_DTYPES):
        supported = ", ".join(DTYPES)
        return (f"refuses the global {_quote(full)}: tensors of that type are not converted (sdcli converts "
                f"{supported})")
    return (f"refuses the global {_quote(full)}: a checkpoint may hold only tensors and plain containers, and "
            "loading anything else could run code from the file")


# ------------------------------------------------------------------------------------------------- the archive


def _label(path: Path) -> str:
    text = str(path)
    return text if text.isprintable() else repr(text)


def _error_text(error: BaseException) -> str:
    """A one-line, bounded rendering of an unexpected exception raised while reading hostile data."""
    try:
        text = " ".join(str(error).split())
    except Exception:  # noqa: BLE001 - str() of an exception holding a huge integer raises
        text = ""
    text = text if len(text) <= 160 else text[:160] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _sniff(head: bytes) -> str:
    """Why a file that is not a zip is not read: what it looks like."""
    if head.startswith(_LEGACY_MAGIC):
        return ("is a checkpoint in torch's legacy format (saved by torch < 1.6, or with "
                "_use_new_zipfile_serialization=False), which sdcli does not read; load and save it once with a "
                "current torch, or use the model's .safetensors file")
    if len(head) >= 9 and head[8:9] == b"{":
        return "looks like a safetensors file already: rename it to .safetensors and use it as it is"
    if head.startswith(b"\x80"):
        return "is a plain pickle, not the zip torch.save writes (since torch 1.6); sdcli reads only the zip"
    return "is not a PyTorch checkpoint (the zip torch.save writes since torch 1.6)"


class TorchArchive:
    """A ``torch.save`` zip opened for reading: its directory checked, its bytes memory-mapped.

    ``load()`` unpickles ``data.pkl`` with the restricted unpickler (tensors come back as :class:`TensorRecord`,
    OrderedDicts as dicts), ``array(record)`` gives a tensor's elements as a read-only numpy view of the file.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.label = _label(self.path)
        self._mmap: mmap.mmap | None = None
        self._storages: dict[str, StorageRef] = {}
        try:
            with open(self.path, "rb") as handle:
                self.size = os.fstat(handle.fileno()).st_size
                head = handle.read(64)
                if not self._is_zip(handle):
                    raise CheckpointError(f"{self.label} {_sniff(head)}")
                handle.seek(0)
                self._entries = self._directory(handle)
                self._mmap = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except CheckpointError:
            raise
        except OSError as error:
            raise CheckpointError(f"{self.label}: cannot open: {error.strerror or error}") from None
        except ValueError as error:  # a NUL in the path
            raise CheckpointError(f"{self.label}: cannot open: {error}") from None
        try:
            self._prefix = self._archive_prefix()
            self._check_byteorder()
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _is_zip(handle: Any) -> bool:
        handle.seek(0)
        try:
            return zipfile.is_zipfile(handle)
        except Exception:  # noqa: BLE001 - a damaged end record can make it raise (BadZipFile) instead of saying no
            return True  # a zip, damaged: reading its directory says how

    def _directory(self, handle: Any) -> dict[str, zipfile.ZipInfo]:
        try:
            with zipfile.ZipFile(handle) as archive:
                infos = archive.infolist()
        except Exception as error:  # noqa: BLE001 - zipfile raises many kinds on a damaged directory
            raise CheckpointError(f"{self.label}: not a readable zip ({_error_text(error)})") from None
        entries: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            if info.filename in entries:
                raise CheckpointError(f"{self.label}: the zip holds the entry {_quote(info.filename)} twice")
            entries[info.filename] = info
        return entries

    def _archive_prefix(self) -> str:
        if any(name.endswith("/constants.pkl") or "/code/" in name for name in self._entries):
            raise CheckpointError(f"{self.label} is a TorchScript archive (torch.jit.save), not a checkpoint of "
                                  "tensors; save its state_dict() with torch.save instead")
        pickles = [name for name in self._entries if name.endswith("/data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            what = "no" if not pickles else f"{len(pickles)}"
            raise CheckpointError(f"{self.label}: a zip with {what} ARCHIVE/data.pkl entries, not a torch.save "
                                  "checkpoint")
        return pickles[0][: -len("data.pkl")]

    def _check_byteorder(self) -> None:
        info = self._entries.get(self._prefix + "byteorder")
        if info is None:
            return  # older torch wrote no byteorder record; torch reads such files as little-endian too
        start, size = self._span(info)
        order = bytes(self._mmap[start:start + min(size, 16)])
        if order == b"big":
            raise CheckpointError(f"{self.label} was saved on a big-endian machine; sdcli reads little-endian "
                                  "checkpoints only")
        if order != b"little":
            raise CheckpointError(f"{self.label}: its byteorder record says {order[:16]!r}, not little or big")

    def _span(self, info: zipfile.ZipInfo) -> tuple[int, int]:
        """(offset of the first data byte in the file, size) of a stored entry, from its local header, checked."""
        name = _quote(info.filename)
        if info.flag_bits & 0x1:
            raise CheckpointError(f"{self.label}: entry {name} is encrypted")
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{self.label}: entry {name} is compressed (zip method {info.compress_type}); torch "
                                  "stores every entry uncompressed, and sdcli never inflates a checkpoint")
        if info.compress_size != info.file_size:
            raise CheckpointError(f"{self.label}: entry {name} is stored but declares {_number(info.file_size)} "
                                  f"bytes of data in {_number(info.compress_size)}")
        where = info.header_offset
        if where < 0 or where + _LOCAL_HEADER.size > self.size:
            raise CheckpointError(f"{self.label}: entry {name} has its header outside the file")
        fields = _LOCAL_HEADER.unpack_from(self._mmap, where)
        signature, name_length, extra_length = fields[0], fields[-2], fields[-1]
        if signature != _LOCAL_SIGNATURE:
            raise CheckpointError(f"{self.label}: entry {name} has no local header where the directory says")
        stored_name = bytes(self._mmap[where + _LOCAL_HEADER.size:where + _LOCAL_HEADER.size + name_length])
        encoding = "utf-8" if info.flag_bits & 0x800 else "cp437"
        if stored_name.decode(encoding, "replace") != info.orig_filename:
            raise CheckpointError(f"{self.label}: entry {name} has another name in its local header")
        start = where + _LOCAL_HEADER.size + name_length + extra_length
        if start + info.file_size > self.size:
            raise CheckpointError(f"{self.label}: entry {name} of {_number(info.file_size)} bytes reaches past the "
                                  f"end of the {self.size}-byte file")
        return start, info.file_size

    def storage(self, key: str, dtype: TorchDtype | None, numel: int) -> StorageRef:
        """The storage ``key`` of ``numel`` elements of ``dtype`` (bytes when None), once its entry is checked."""
        itemsize = dtype.numpy.itemsize if dtype is not None else 1
        type_name = dtype.name if dtype is not None else "bytes"
        known = self._storages.get(key)
        if known is not None:
            if known.dtype is not dtype or known.nbytes != numel * itemsize:
                raise _Refusal(f"storage {_quote(key)} is declared twice with different types or sizes")
            return known
        nbytes = numel * itemsize
        if nbytes > self.size:
            raise _Refusal(f"storage {_quote(key)} declares {_number(numel)} elements of {type_name} "
                           f"({_number(nbytes)} bytes), more than the whole {self.size}-byte file")
        info = self._entries.get(f"{self._prefix}data/{key}")
        if info is None:
            raise _Refusal(f"storage {_quote(key)} has no entry in the archive")
        try:
            start, size = self._span(info)
        except CheckpointError as error:
            raise _Refusal(str(error).removeprefix(f"{self.label}: ")) from None
        if size != nbytes:
            raise _Refusal(f"storage {_quote(key)} declares {_number(numel)} elements of {type_name} "
                           f"({_number(nbytes)} bytes) but its entry holds {size} bytes")
        self._storages[key] = StorageRef(key, dtype, nbytes, start)
        return self._storages[key]

    def load(self) -> Any:
        """The saved object, unpickled with only the whitelisted globals; tensors as TensorRecords."""
        info = self._entries[self._prefix + "data.pkl"]
        start, size = self._span(info)
        if size > MAX_PICKLE_BYTES:
            raise CheckpointError(f"{self.label}: data.pkl of {size} bytes is over the {MAX_PICKLE_BYTES}-byte limit")
        data = bytes(self._mmap[start:start + size])
        try:
            return _Unpickler(data, self).load()
        except _Refusal as error:
            raise CheckpointError(f"{self.label}: {error}") from None
        except CheckpointError:
            raise
        except Exception as error:  # noqa: BLE001 - hostile bytes make the unpickler raise anything
            raise CheckpointError(f"{self.label}: data.pkl is not a pickle sdcli can read "
                                  f"({_error_text(error)})") from None

    def array(self, record: TensorRecord) -> np.ndarray:
        """``record``'s elements as a read-only numpy array in its storage dtype (bfloat16: uint16 bits): a view of
        the mapped file, strided as the tensor is; ``np.ascontiguousarray`` of it copies that one tensor."""
        if self._mmap is None:
            raise CheckpointError(f"{self.label}: archive is closed")
        dtype = record.dtype.numpy
        if record.numel == 0:
            empty = np.empty(record.shape, dtype=dtype)
            empty.flags.writeable = False
            return empty
        count = record.storage.nbytes // dtype.itemsize
        elements = np.frombuffer(self._mmap, dtype=dtype, count=count, offset=record.storage.offset)
        strides = tuple(step * dtype.itemsize for step in record.stride)
        return np.lib.stride_tricks.as_strided(elements[record.offset:], shape=record.shape, strides=strides,
                                               writeable=False)

    def release(self, record: TensorRecord) -> None:
        """Let the operating system drop the pages of ``record``'s storage from this process's resident memory
        (read again from the page cache or the file if needed). Does nothing where ``madvise`` is missing."""
        if self._mmap is None or not hasattr(self._mmap, "madvise"):
            return
        start = record.storage.offset - record.storage.offset % mmap.PAGESIZE
        end = record.storage.offset + record.storage.nbytes
        if end > start:
            self._mmap.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        mapping, self._mmap = self._mmap, None
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:  # arrays still view it: they unmap it when they go
                pass

    def __enter__(self) -> TorchArchive:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------- selecting


@dataclass(frozen=True)
class Selection:
    """The tensors picked from a checkpoint: flattened names (nested dicts joined with dots) -> records."""

    key: str | None  # the sub-dictionary they came from; None: the top level
    tensors: dict[str, TensorRecord]
    skipped: tuple[tuple[str, str], ...] = field(default=())  # (name, what it is) of values that are not tensors


class _Walk:
    """A bounded walk over the unpickled object: nesting depth, values visited and cycles are checked."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.visits = 0

    def visit(self, depth: int) -> None:
        self.visits += 1
        if self.visits > MAX_VISITS:
            raise CheckpointError(f"{self.label}: holds more than {MAX_VISITS} values (counting shared ones again)")
        if depth > MAX_DEPTH:
            raise CheckpointError(f"{self.label}: dicts nested more than {MAX_DEPTH} deep")

    def count(self, mapping: dict, depth: int = 0, path: frozenset[int] = frozenset()) -> int:
        """Tensors in ``mapping`` and its nested dicts."""
        if id(mapping) in path:
            raise CheckpointError(f"{self.label}: a dict contains itself")
        path = path | {id(mapping)}
        total = 0
        for value in mapping.values():
            self.visit(depth)
            if isinstance(value, TensorRecord):
                total += 1
            elif isinstance(value, dict):
                total += self.count(value, depth + 1, path)
        return total

    def flatten(self, mapping: dict, prefix: str, tensors: dict[str, TensorRecord], skipped: list[tuple[str, str]],
                depth: int = 0, path: frozenset[int] = frozenset()) -> None:
        if id(mapping) in path:
            raise CheckpointError(f"{self.label}: a dict contains itself")
        path = path | {id(mapping)}
        for key, value in mapping.items():
            self.visit(depth)
            if not _nameable(key):
                skipped.append((f"{prefix}<{_kind(key)} key>", _kind(value)))
                continue
            name = f"{prefix}{key}"
            if isinstance(value, TensorRecord):
                if name in tensors:
                    raise CheckpointError(f"{self.label}: two tensors are named {_quote(name)} once nested dicts "
                                          "are joined with dots")
                tensors[name] = value
            elif isinstance(value, dict):
                self.flatten(value, name + ".", tensors, skipped, depth + 1, path)
            else:
                skipped.append((name, _kind(value)))


_MISSING = object()


def _get(tree: dict, key: str) -> Any:
    """``tree[key]``, or ``tree[int(key)]`` for a key of digits (optimizer states are keyed by integers)."""
    if key in tree:
        return tree[key]
    if key.isdecimal() and len(key) <= 19 and int(key) in tree:
        return tree[int(key)]
    return _MISSING


def _lookup(tree: Any, key: str) -> Any:
    """``tree[key]``, where ``key`` may be a dotted path ``a.b`` through nested dicts (a key holding dots itself
    is matched first)."""
    if not isinstance(tree, dict):
        return _MISSING
    found = _get(tree, key)
    if found is not _MISSING:
        return found
    parts = key.split(".")
    for cut in range(1, len(parts)):
        head = _get(tree, ".".join(parts[:cut]))
        if isinstance(head, dict):
            found = _lookup(head, ".".join(parts[cut:]))
            if found is not _MISSING:
                return found
    return _MISSING


def _nameable(key: Any) -> bool:
    """A dict key that can be part of a tensor name or a --key path: a string, or an integer (optimizer states)."""
    return isinstance(key, str) or (_is_int(key) and key.bit_length() <= 64)


def _candidates(tree: dict, walk: _Walk) -> list[tuple[str | int, int]]:
    """(key, tensors under it) of the top-level keys holding dicts of tensors."""
    return [(key, count) for key, value in tree.items() if _nameable(key) and isinstance(value, dict)
            for count in [walk.count(value)] if count]


def _key_text(key: Any) -> str:
    """A dict key from the file for a message."""
    if isinstance(key, str):
        return _quote(key)
    return _number(key) if _is_int(key) else f"<{_kind(key)}>"


def _listing(candidates: list[tuple[str | int, int]]) -> str:
    shown = ", ".join(f"{_key_text(key)} ({count} tensor{'s' if count != 1 else ''})"
                      for key, count in candidates[:10])
    return shown + (f" and {len(candidates) - 10} more" if len(candidates) > 10 else "")


def select_tensors(tree: Any, key: str | None, label: str) -> Selection:
    """The tensors of the unpickled ``tree`` to convert.

    With ``key`` (a dotted path ``a.b`` allowed), the dict it names. Without, the top level if tensors are among
    its values, else the one top-level key holding dicts of tensors (``state_dict`` of a Stable Diffusion
    ``.ckpt``), else a one-line error listing those keys with their tensor counts. Nested dicts in the chosen one
    are flattened with dots (``{"a": {"b": t}}`` -> ``a.b``, as AUTOMATIC1111-style tools name them); values that
    are not tensors (a ``global_step``, strings) are skipped and listed.
    """
    walk = _Walk(label)
    if not isinstance(tree, dict):
        raise CheckpointError(f"{label} holds {_kind(tree)}, not a dict of tensors")
    if key is not None:
        chosen = _lookup(tree, key)
        if chosen is _MISSING or not isinstance(chosen, dict):
            what = "has no key" if chosen is _MISSING else f"holds {_kind(chosen)} under the key"
            candidates = _candidates(tree, walk)
            hint = f"; keys holding tensors: {_listing(candidates)}" if candidates else ""
            raise CheckpointError(f"{label} {what} {_quote(key)}{hint}")
    elif any(isinstance(value, TensorRecord) for value in tree.values()):
        chosen = tree
    else:
        candidates = _candidates(tree, walk)
        if not candidates:
            raise CheckpointError(f"{label} holds no tensors")
        if len(candidates) > 1:
            first = str(candidates[0][0])
            example = f" (for example --key {first})" if first.isprintable() and len(first) <= 120 else ""
            raise CheckpointError(f"{label} holds several dicts of tensors: {_listing(candidates)}; pick one with "
                                  f"--key{example}")
        key = str(candidates[0][0])
        chosen = tree[candidates[0][0]]
    tensors: dict[str, TensorRecord] = {}
    skipped: list[tuple[str, str]] = []
    walk.flatten(chosen, "", tensors, skipped)
    if not tensors:
        raise CheckpointError(f"{label}: {_quote(key) if key is not None else 'the top level'} holds no tensors")
    return Selection(key, tensors, tuple(skipped))


# ------------------------------------------------------------------------------------------------- converting


@dataclass(frozen=True)
class Conversion:
    """What :func:`convert_checkpoint` wrote."""

    source: Path
    target: Path
    key: str | None
    tensors: int
    nbytes: int  # of tensor data
    dtypes: dict[str, int]  # safetensors code -> how many tensors
    skipped: tuple[str, ...]  # names of the values that were not tensors


def _check_names(names: list[str], label: str) -> None:
    for name in names:
        if name == "__metadata__":
            raise CheckpointError(f"{label}: a tensor is named __metadata__, which safetensors reserves")
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise CheckpointError(f"{label}: the tensor name {_quote(name)} is not valid UTF-8") from None


def _write_tensor(handle: Any, archive: TorchArchive, record: TensorRecord,
                  advance: Callable[[int], None]) -> None:
    """One tensor's bytes, C-contiguous: straight from the map when the tensor is contiguous in its storage,
    else through one copy of it."""
    if record.numel == 0:
        return
    view = archive.array(record)
    data = view if view.flags.c_contiguous else np.ascontiguousarray(view)
    raw = data.reshape(-1).view(np.uint8)
    for start in range(0, raw.size, WRITE_CHUNK):
        handle.write(raw[start:start + WRITE_CHUNK].data)
        advance(min(WRITE_CHUNK, raw.size - start))
    archive.release(record)


def convert_checkpoint(source: str | os.PathLike, target: str | os.PathLike, *, key: str | None = None,
                       overwrite: bool = False,
                       progress: Callable[[int, int], None] | None = None) -> Conversion:
    """Convert the PyTorch checkpoint ``source`` to the safetensors file ``target``, running no code from it.

    ``key`` picks a sub-dictionary (``generator_ema``, ``state_dict``, a dotted ``a.b``); see
    :func:`select_tensors` for what is picked without it. Tensors keep their dtypes, are written in sorted name
    order one at a time (memory: about one tensor), to a temporary file beside ``target`` renamed into place at the
    end; ``target`` is not replaced unless ``overwrite``. The file's metadata records the source file's name and
    the key. ``progress(done_bytes, total_bytes)`` is called as data is written.
    """
    source, target = Path(source).expanduser(), Path(target).expanduser()
    if source.suffix.lower() not in SOURCE_SUFFIXES:
        raise SdcliError(f"{_label(source)}: expected a PyTorch checkpoint ({' '.join(SOURCE_SUFFIXES)}), "
                         f"not {source.suffix or 'a file without a suffix'}")
    if target.suffix.lower() != ".safetensors":
        raise SdcliError(f"{_label(target)}: the output must be a .safetensors file")
    if not source.exists():
        raise CheckpointError(f"{_label(source)}: no such file")
    if not source.is_file():
        raise CheckpointError(f"{_label(source)} is not a file")
    check_output(target, overwrite)
    with TorchArchive(source) as archive:
        selection = select_tensors(archive.load(), key, archive.label)
        names = sorted(selection.tensors)
        _check_names(names, archive.label)
        records = [selection.tensors[name] for name in names]
        total = sum(record.nbytes for record in records)
        if total > GROWTH_LIMIT * archive.size + GROWTH_ALLOWANCE:
            raise CheckpointError(f"{archive.label}: its tensors would make {total} bytes from a {archive.size}-byte "
                                  "file; they view the same storages far more than a checkpoint does")
        metadata = {"format": "pt", "source": source.name.encode("utf-8", "replace").decode("utf-8")}
        if selection.key is not None:
            metadata["key"] = selection.key.encode("utf-8", "replace").decode("utf-8")
        header = file_header(((name, record.dtype.code, record.shape) for name, record in zip(names, records)),
                             metadata)
        done = 0

        def advance(nbytes: int) -> None:
            nonlocal done
            done += nbytes
            if progress is not None:
                progress(done, total)

        try:
            with atomic_output(target, overwrite) as temporary:
                with open(temporary, "wb") as handle:
                    handle.write(header)
                    for record in records:
                        _write_tensor(handle, archive, record, advance)
                    handle.flush()
                    os.fsync(handle.fileno())
        except OSError as error:
            raise SdcliError(f"{_label(target)}: cannot write: {error.strerror or error}") from None
    dtypes: dict[str, int] = {}
    for record in records:
        dtypes[record.dtype.code] = dtypes.get(record.dtype.code, 0) + 1
    return Conversion(source, target, selection.key, len(records), total, dtypes,
                      tuple(name for name, _ in selection.skipped))


__all__ = ["ALLOWED_GLOBALS", "Conversion", "DTYPES", "SOURCE_SUFFIXES", "Selection", "StorageRef", "TensorRecord",
           "TorchArchive", "TorchDtype", "convert_checkpoint", "select_tensors"]
