"""Memory-mapped reader (and a small writer) for the safetensors format.

A safetensors file is an 8-byte little-endian u64 ``N``, then ``N`` bytes of UTF-8 JSON (the header), then the
data section. The header maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}``, with the
offsets relative to the start of the data section, plus an optional ``"__metadata__"`` object of str -> str.

``SafetensorsFile`` validates the whole header before it trusts any of it: whatever the bytes, the constructor
either succeeds or raises a one-line ``SafetensorsError`` naming the file (and the tensor). After that every
tensor is a zero-copy, read-only numpy view on the memory map, in its storage dtype (BF16 as uint16 bits, F8 as
uint8 bits); ``float32()`` converts where a backend needs real numbers.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

from ..errors import SafetensorsError
from ..dtypes import (bf16_to_float32, float32_to_bf16, fp8_e4m3_to_float32,  # noqa: F401
                      fp8_e5m2_to_float32, stored_float32)
from .files import open_temporary_beside

# safetensors dtype code -> numpy storage dtype (little-endian). BF16 and the F8 types have no numpy dtype:
# they are stored as their raw bits and converted by the functions below.
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
    "F8_E4M3": np.dtype("u1"),
    "F8_E5M2": np.dtype("u1"),
}

# Codes whose storage dtype is their own numpy dtype: what a plain array is saved as.
_CODE_OF_DTYPE: dict[np.dtype, str] = {
    dtype: code for code, dtype in DTYPES.items() if code not in ("BF16", "F8_E4M3", "F8_E5M2")
}

MAX_HEADER_BYTES = 100_000_000  # the reference library's limit
_MAX_NDIM = 64  # numpy's limit on dimensions
_MAX_BYTES = 2**63 - 1  # numpy's limit on an array's size in bytes (ssize_t), zero dimensions left out
_HEADER_FIELDS = frozenset(("dtype", "shape", "data_offsets"))

ArrayOrCoded = Union[np.ndarray, tuple[np.ndarray, str]]


@dataclass(frozen=True)
class TensorInfo:
    """One header entry. ``begin``/``end`` are byte offsets relative to the data section, as in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


# ------------------------------------------------------------------------------------------- header checks


class _HeaderError(Exception):
    """A header problem, turned into a SafetensorsError with the file name by the caller."""


def _describe(value: Any) -> str:
    """A short one-line rendering of a JSON value for error messages (never raises, never huge)."""
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return json.dumps(value)
    if isinstance(value, int):
        return str(value) if value.bit_length() < 100 else f"an integer of {value.bit_length()} bits"
    if isinstance(value, str):
        text = value if len(value) <= 40 else value[:40] + "..."
        return json.dumps(text)
    if isinstance(value, list):
        if len(value) <= 8 and all(isinstance(item, (int, float, bool, type(None))) for item in value):
            return "[" + ", ".join(_describe(item) for item in value) + "]"
        return f"a list of {len(value)} items"
    if isinstance(value, dict):
        return f"an object of {len(value)} keys"
    return type(value).__name__


def _quote(name: str) -> str:
    """A tensor name quoted for a one-line message (newlines and other controls escaped)."""
    return repr(name if len(name) <= 200 else name[:200] + "...")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _HeaderError(f"header has the key {_quote(key)} twice in one object")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise _HeaderError(f"header is not valid JSON ({name} is not a JSON value)")


def _parse_header(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _HeaderError(f"header is not valid UTF-8 (byte {error.start})") from None
    try:
        header = json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except json.JSONDecodeError as error:
        where = f"line {error.lineno} column {error.colno}"
        raise _HeaderError(f"header is not valid JSON ({error.msg} at {where})") from None
    except (ValueError, RecursionError, MemoryError) as error:
        raise _HeaderError(f"header is not usable JSON ({type(error).__name__})") from None
    if not isinstance(header, dict):
        raise _HeaderError(f"header is {_describe(header)}, not a JSON object")
    return header


def _check_metadata(metadata: Any) -> dict[str, str]:
    if not isinstance(metadata, dict):
        raise _HeaderError(f"__metadata__ is {_describe(metadata)}, not an object of strings")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise _HeaderError(f"__metadata__ entry {_quote(key)} is {_describe(value)}, not a string")
    return dict(metadata)


def _check_shape(dtype: str, shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(_is_int(dim) and dim >= 0 for dim in shape):
        raise _HeaderError(f"shape {_describe(shape)} is not a list of non-negative integers")
    if len(shape) > _MAX_NDIM:
        raise _HeaderError(f"shape has {len(shape)} dimensions, more than the {_MAX_NDIM} numpy supports")
    nonzero_bytes = DTYPES[dtype].itemsize
    for dim in shape:
        nonzero_bytes *= max(dim, 1)
        if nonzero_bytes > _MAX_BYTES:
            raise _HeaderError(f"shape {_describe(shape)} of {dtype} is too large for any array")
    return tuple(shape)


def _check_offsets(offsets: Any, data_len: int) -> tuple[int, int]:
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(v) and v >= 0 for v in offsets)):
        raise _HeaderError(f"data_offsets {_describe(offsets)} is not two non-negative integers")
    begin, end = offsets
    if begin > end:
        raise _HeaderError(f"data_offsets [{begin}, {end}] begin after they end")
    if end > data_len:
        raise _HeaderError(f"data_offsets [{begin}, {end}] reach past the data section of {data_len} bytes")
    return begin, end


def _check_entry(name: str, entry: Any, data_len: int) -> TensorInfo:
    """One tensor's header entry -> TensorInfo, or a _HeaderError naming the problem (not yet the tensor)."""
    if not isinstance(entry, dict):
        raise _HeaderError(f"entry is {_describe(entry)}, not an object")
    if entry.keys() != _HEADER_FIELDS:
        missing = ", ".join(sorted(_HEADER_FIELDS - entry.keys()))
        extra = ", ".join(map(_quote, sorted(entry.keys() - _HEADER_FIELDS)))
        parts = [f"lacks {missing}" if missing else "", f"has extra {extra}" if extra else ""]
        raise _HeaderError("entry " + " and ".join(part for part in parts if part))
    dtype = entry["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _HeaderError(f"unknown dtype {_describe(dtype)}")
    shape = _check_shape(dtype, entry["shape"])
    begin, end = _check_offsets(entry["data_offsets"], data_len)
    needed = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != needed:
        raise _HeaderError(
            f"data_offsets [{begin}, {end}] span {end - begin} bytes but shape {list(shape)} of {dtype} needs {needed}"
        )
    return TensorInfo(name, dtype, shape, begin, end)


def _check_overlaps(infos: list[TensorInfo]) -> None:
    spans = sorted((info for info in infos if info.end > info.begin), key=lambda info: (info.begin, info.end))
    for before, after in zip(spans, spans[1:]):
        if after.begin < before.end:
            raise _HeaderError(
                f"tensor {_quote(after.name)}: data_offsets [{after.begin}, {after.end}] overlap those of "
                f"tensor {_quote(before.name)} [{before.begin}, {before.end}]"
            )


def _check_header(header: dict[str, Any], data_len: int) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    metadata = _check_metadata(header["__metadata__"]) if "__metadata__" in header else {}
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            tensors[name] = _check_entry(name, entry, data_len)
        except _HeaderError as error:
            raise _HeaderError(f"tensor {_quote(name)}: {error}") from None
    _check_overlaps(list(tensors.values()))
    return metadata, tensors


# ------------------------------------------------------------------------------------------------- reading


def _file_label(path: Path) -> str:
    text = str(path)
    return text if text.isprintable() else repr(text)


class SafetensorsFile:
    """A read-only, memory-mapped safetensors file whose tensors are numpy views.

    The header is validated in full when the file is opened. Views returned by ``view`` (and ``float32`` for F32
    tensors) keep the mapping alive on their own, so they stay valid even after ``close``.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._label = _file_label(self.path)
        self._mmap: mmap.mmap | None = None
        try:
            with open(self.path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                header_len = self._read_header_len(handle, size)
                raw = handle.read(header_len)
                if len(raw) != header_len:
                    raise _HeaderError(f"file ended inside the {header_len}-byte header")
                self._data_start = 8 + header_len
                self.metadata, self._tensors = _check_header(_parse_header(raw), size - self._data_start)
                self._mmap = mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_READ)  # size >= 8: never empty
        except _HeaderError as error:
            raise SafetensorsError(f"{self._label}: {error}") from None
        except (OSError, ValueError) as error:  # ValueError: a NUL in the path
            raise SafetensorsError(f"{self._label}: cannot open: {getattr(error, 'strerror', None) or error}") from None

    @staticmethod
    def _read_header_len(handle: Any, size: int) -> int:
        if size < 8:
            raise _HeaderError(f"file of {size} bytes is too short for a safetensors header length")
        raw = handle.read(8)
        if len(raw) != 8:
            raise _HeaderError("file ended inside the header length")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > MAX_HEADER_BYTES:
            raise _HeaderError(f"not a safetensors file: its first 8 bytes declare a header of {header_len} bytes, over "
                                f"the {MAX_HEADER_BYTES}-byte limit")
        if 8 + header_len > size:
            raise _HeaderError(f"declared header length {header_len} is past the end of the {size}-byte file")
        return header_len

    def keys(self) -> list[str]:
        """Tensor names, sorted."""
        return sorted(self._tensors)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __getitem__(self, name: str) -> np.ndarray:
        return self.view(name)

    def __repr__(self) -> str:
        return f"SafetensorsFile({self._label!r}, {len(self)} tensors)"

    def info(self, name: str) -> TensorInfo:
        """The header entry of tensor ``name`` (KeyError naming file and tensor if absent)."""
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"{self._label}: no tensor {_quote(name)}") from None

    def view(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a zero-copy, read-only view in its storage dtype (BF16: uint16 bits, F8: uint8 bits)."""
        info = self.info(name)
        if self._mmap is None:
            raise SafetensorsError(f"{self._label}: file is closed")
        dtype = DTYPES[info.dtype]
        count = math.prod(info.shape)
        if count == 0:
            empty = np.empty(info.shape, dtype=dtype)
            empty.flags.writeable = False
            return empty
        flat = np.frombuffer(self._mmap, dtype=dtype, count=count, offset=self._data_start + info.begin)
        return flat.reshape(info.shape)

    def float32(self, name: str) -> np.ndarray:
        """Tensor ``name`` as float32: the view itself for F32, otherwise a new converted array."""
        return stored_float32(self.view(name), self.info(name).dtype)

    def release(self, name: str | None = None) -> None:
        """Let the operating system drop the pages of tensor ``name`` (of the whole file when None) from this
        process's resident memory. Nothing changes for the views: the next read of a dropped page maps it again from
        the page cache or the file. Does nothing where ``madvise`` is missing, or once the file is closed."""
        if self._mmap is None or not hasattr(self._mmap, "madvise"):
            return
        if name is None:
            start, end = 0, len(self._mmap)
        else:
            info = self.info(name)
            start, end = self._data_start + info.begin, self._data_start + info.end
        start -= start % mmap.PAGESIZE  # madvise wants a page-aligned start; the neighbours' pages come back alike
        if end > start:
            self._mmap.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        """Drop the mapping. Views still alive keep it mapped until they go; the file object is then unusable."""
        mapping, self._mmap = self._mmap, None
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:  # views exist: they own the mapping now and unmap it when collected
                pass

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------- writing


def _storage(name: str, value: ArrayOrCoded) -> tuple[np.ndarray, str]:
    """(little-endian C-contiguous array, dtype code) for one tensor given to ``save_file``."""
    if isinstance(value, tuple):
        array, code = value
        array = np.asarray(array)
        if code not in DTYPES:
            raise ValueError(f"tensor {_quote(name)}: unknown dtype code {code!r}")
        if array.dtype.newbyteorder("<") != DTYPES[code].newbyteorder("<"):
            raise ValueError(f"tensor {_quote(name)}: {code} is stored as {DTYPES[code]}, not {array.dtype}")
    else:
        array = np.asarray(value)
        code = _CODE_OF_DTYPE.get(array.dtype.newbyteorder("<"))
        if code is None:
            raise ValueError(f"tensor {_quote(name)}: numpy dtype {array.dtype} has no safetensors code")
    return np.asarray(array, dtype=DTYPES[code], order="C"), code  # (asarray keeps 0-d arrays 0-d)


def _header_bytes(entries: dict[str, Any], metadata: dict[str, str] | None) -> bytes:
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    header.update(entries)
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)  # pad so the data section starts 8-byte aligned, like the reference


def _check_save_args(tensors: dict[str, ArrayOrCoded], metadata: dict[str, str] | None) -> None:
    for name in tensors:
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"tensor name {name!r} is not allowed")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("metadata must map str to str")


def file_header(tensors: Iterable[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None) -> bytes:
    """The start of a safetensors file holding ``tensors`` ((name, dtype code, shape) each) back to back in the
    given order: the 8-byte header length, then the JSON header padded so the data section starts 8-byte aligned.
    The data follows it, each tensor's bytes C-contiguous and little-endian. Writers that stream their tensors one at
    a time (sdcli.io.torch_pickle) build the header here, as ``save_file`` does."""
    entries: dict[str, Any] = {}
    offset = 0
    for name, code, shape in tensors:
        if not isinstance(name, str) or name == "__metadata__" or name in entries:
            raise ValueError(f"tensor name {name!r} is not allowed (or is given twice)")
        nbytes = math.prod(shape) * DTYPES[code].itemsize
        entries[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header = _header_bytes(entries, metadata)
    return struct.pack("<Q", len(header)) + header


def save_file(
    path: str | os.PathLike,
    tensors: dict[str, ArrayOrCoded],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write ``tensors`` to ``path`` as safetensors, atomically (a temporary file renamed into place).

    A plain array is saved with the code of its numpy dtype; ``(uint16 array, "BF16")`` or ``(uint8 array,
    "F8_E4M3")`` names the code explicitly. Tensors are laid out back to back in sorted-name order.
    """
    _check_save_args(tensors, metadata)
    stored = {name: _storage(name, tensors[name]) for name in sorted(tensors)}
    header = file_header(((name, code, array.shape) for name, (array, code) in stored.items()), metadata)
    path = Path(path)
    descriptor, temporary = open_temporary_beside(path)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(header)
            for array, _ in stored.values():
                if array.size:
                    handle.write(array.reshape(-1).view(np.uint8).data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
