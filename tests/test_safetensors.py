"""The safetensors reader and writer against the reference ``safetensors`` library and torch.

Every comparison here is exact (bit for bit): reading is a view of the stored bytes, and the BF16/F8 upcasts
and the float32 -> BF16 rounding are exact operations, so no tolerance would guard anything.
"""

from __future__ import annotations

import itertools
import json
import math
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdcli.errors import SafetensorsError
from sdcli.nn.taesd import SHIPPED_FILES, shipped_taesd_dir
from sdcli.io.safetensors import (
    DTYPES,
    SafetensorsFile,
    TensorInfo,
    bf16_to_float32,
    float32_to_bf16,
    fp8_e4m3_to_float32,
    fp8_e5m2_to_float32,
    save_file,
)

NUMPY_CODES = ["F64", "F32", "F16", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL"]
# dtypes numpy lacks, by the names of torch's types for them and for their bits
TORCH_CODES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
TORCH_BITS = {"BF16": "int16", "F8_E4M3": "uint8", "F8_E5M2": "uint8"}
SHAPES = [(), (0,), (3, 0, 2), (7,), (2, 3, 4)]


def random_array(code: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random values of every bit pattern kind the dtype has (negative, huge, fractional)."""
    dtype = DTYPES[code]
    if code == "BOOL":
        values = rng.integers(0, 2, size=shape).astype(bool)
    elif dtype.kind == "f":
        values = rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 4, size=shape)
    else:
        info = np.iinfo(dtype)
        values = rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return np.asarray(values, dtype=dtype)  # 0-d arrays, never numpy scalars


def write_raw(path: Path, header: bytes | Any, data: bytes = b"") -> Path:
    """A file with ``header`` (bytes, or a JSON value to serialise) behind a correct length, then ``data``."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8")
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def entry(dtype: str = "F32", shape: Any = (2,), offsets: Any = (0, 8)) -> dict[str, Any]:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


# ------------------------------------------------------------------------------------------ reading dtypes


@pytest.mark.parametrize("code", NUMPY_CODES)
def test_reads_reference_numpy_files(tmp_path: Path, code: str) -> None:
    rng = np.random.default_rng(0)
    arrays = {f"t{i}.{code}": random_array(code, shape, rng) for i, shape in enumerate(SHAPES)}
    path = tmp_path / "ref.safetensors"
    safetensors.numpy.save_file(arrays, str(path), metadata={"format": "np", "note": "ünïcode"})
    with SafetensorsFile(path) as file:
        assert file.metadata == {"format": "np", "note": "ünïcode"}
        assert file.keys() == sorted(arrays) and len(file) == len(arrays) and list(file) == sorted(arrays)
        for name, array in arrays.items():
            view = file.view(name)
            assert view.dtype == DTYPES[code] and view.shape == array.shape
            np.testing.assert_array_equal(view, array, strict=True)
            as_float = file.float32(name)
            assert as_float.dtype == np.float32 and as_float.shape == array.shape
            np.testing.assert_array_equal(as_float, array.astype(np.float32))


@pytest.mark.parametrize("code", sorted(TORCH_CODES))
def test_reads_reference_torch_files(tmp_path: Path, code: str, torch) -> None:
    generator = torch.Generator().manual_seed(0)
    tensors = {
        f"t{i}": (torch.randn(shape, generator=generator) * 30).to(getattr(torch, TORCH_CODES[code]))
        for i, shape in enumerate(SHAPES)
    }
    path = tmp_path / "ref.safetensors"
    import safetensors.torch

    safetensors.torch.save_file(tensors, str(path))
    with SafetensorsFile(path) as file:
        for name, tensor in tensors.items():
            assert file.info(name).dtype == code
            bits = tensor.view(getattr(torch, TORCH_BITS[code])).numpy().view(DTYPES[code])
            np.testing.assert_array_equal(file.view(name), bits, strict=True)
            np.testing.assert_array_equal(file.float32(name), tensor.float().numpy(), strict=True)


def test_save_file_is_read_by_the_reference(tmp_path: Path, torch) -> None:
    rng = np.random.default_rng(1)
    plain = {f"{code}/{i}": random_array(code, shape, rng) for code in NUMPY_CODES for i, shape in enumerate(SHAPES)}
    coded = {
        "bf16": (rng.integers(0, 2**16, size=(3, 5), dtype=np.uint16), "BF16"),
        "e4m3": (rng.integers(0, 2**8, size=(4,), dtype=np.uint8), "F8_E4M3"),
        "e5m2": (rng.integers(0, 2**8, size=(2, 2), dtype=np.uint8), "F8_E5M2"),
        "bf16_scalar": (np.array(0x3F80, dtype=np.uint16), "BF16"),
    }
    path = tmp_path / "ours.safetensors"
    save_file(path, {**plain, **coded}, metadata={"format": "pt", "k": "v"})

    with safetensors.safe_open(str(path), framework="pt") as reference:  # torch: numpy has no BF16/F8 dtypes
        assert reference.metadata() == {"format": "pt", "k": "v"}
        assert sorted(reference.keys()) == sorted({**plain, **coded})
        for name, array in plain.items():
            np.testing.assert_array_equal(reference.get_tensor(name).numpy(), array, strict=True)
        for name, (bits, code) in coded.items():
            tensor = reference.get_tensor(name)
            assert tensor.dtype == getattr(torch, TORCH_CODES[code])
            stored_bits = tensor.view(getattr(torch, TORCH_BITS[code])).numpy().view(bits.dtype)
            np.testing.assert_array_equal(stored_bits, bits, strict=True)
    with SafetensorsFile(path) as file:
        for name, array in plain.items():
            np.testing.assert_array_equal(file.view(name), array, strict=True)
        for name, (bits, _) in coded.items():
            np.testing.assert_array_equal(file.view(name), bits, strict=True)


def test_save_file_numpy_only_round_trip_through_reference(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    arrays = {code: random_array(code, (3, 2), rng) for code in NUMPY_CODES}
    arrays["big_endian"] = np.arange(5, dtype=">f4")
    path = tmp_path / "ours.safetensors"
    save_file(path, arrays)
    loaded = safetensors.numpy.load_file(str(path))
    assert loaded.keys() == arrays.keys()
    for name, array in arrays.items():
        np.testing.assert_array_equal(loaded[name], array.astype(array.dtype.newbyteorder("<")), strict=True)


def test_save_file_layout(tmp_path: Path) -> None:
    path = tmp_path / "layout.safetensors"
    save_file(path, {"b": np.zeros(3, np.float32), "a": np.ones(1, np.int8), "c": np.zeros((0, 4), np.float64)})
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    assert header_len % 8 == 0 and raw[8 : 8 + header_len].rstrip(b" ").endswith(b"}")
    with SafetensorsFile(path) as file:
        infos = [file.info(name) for name in file.keys()]
        assert infos == [
            TensorInfo("a", "I8", (1,), 0, 1),
            TensorInfo("b", "F32", (3,), 1, 13),
            TensorInfo("c", "F64", (0, 4), 13, 13),
        ]
        assert len(raw) == 8 + header_len + 13
        np.testing.assert_array_equal(file.view("b"), np.zeros(3, np.float32))  # an unaligned view reads correctly


def test_save_file_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "model.safetensors"
    save_file(path, {"a": np.arange(4, dtype=np.float32)})
    before = path.read_bytes()

    def fail(_: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        save_file(path, {"a": np.zeros(1000, dtype=np.float32)})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


@pytest.mark.parametrize(
    "tensors",
    [
        {"c": np.zeros(2, dtype=np.complex64)},
        {"o": np.array(["x"], dtype=object)},
        {"bf": (np.zeros(2, dtype=np.float32), "BF16")},
        {"x": (np.zeros(2, dtype=np.uint8), "F4")},
        {"__metadata__": np.zeros(2, dtype=np.float32)},
    ],
)
def test_save_file_refuses_what_it_cannot_write(tmp_path: Path, tensors: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        save_file(tmp_path / "x.safetensors", tensors)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------- conversions


def bf16_bits_torch(values: np.ndarray, torch) -> np.ndarray:
    return torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def bf16_tricky_float32() -> np.ndarray:
    """float32 values at and around every kind of BF16 rounding decision, as bit patterns become floats."""
    rng = np.random.default_rng(3)
    random_bits = rng.integers(0, 2**32, size=200_000, dtype=np.uint32)
    tops = rng.integers(0, 2**16, size=20_000, dtype=np.uint32) << 16
    near_ties = np.concatenate([tops | low for low in (0x7FFF, 0x8000, 0x8001, 0x0001, 0xFFFF)])
    specials = np.array(
        [0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF812345,
         0x00000001, 0x80000001, 0x007FFFFF, 0x00008000, 0x00018000, 0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF,
         0x3F808000, 0x3F818000, 0xBF808000, 0x33800000],
        dtype=np.uint32,
    )
    return np.concatenate([random_bits, near_ties, specials]).view(np.float32)


def assert_same_bf16(ours: np.ndarray, theirs: np.ndarray) -> None:
    """Bit equality except NaN payloads, which only have to stay NaN (torch canonicalises them)."""
    ours_nan = bf16_to_float32(ours)
    theirs_nan = bf16_to_float32(theirs)
    np.testing.assert_array_equal(np.isnan(ours_nan), np.isnan(theirs_nan))
    finite = ~np.isnan(theirs_nan)
    np.testing.assert_array_equal(ours[finite], theirs[finite])


def test_float32_to_bf16_matches_torch(torch) -> None:
    values = bf16_tricky_float32()
    with np.errstate(all="ignore"):
        ours = float32_to_bf16(values)
    assert ours.dtype == np.uint16 and ours.shape == values.shape
    assert_same_bf16(ours, bf16_bits_torch(values, torch))


def test_float32_to_bf16_keeps_nan_sign_and_quiets() -> None:
    nans = np.array([0x7F800001, 0xFF800001, 0x7FC00000, 0xFFFFFFFF], dtype=np.uint32).view(np.float32)
    bits = float32_to_bf16(nans)
    np.testing.assert_array_equal(bits & 0x7FC0, 0x7FC0)  # exponent all ones and the quiet bit set
    np.testing.assert_array_equal(bits >> 15, [0, 1, 0, 1])
    assert float32_to_bf16(np.float32(1.0)).shape == ()


def test_bf16_to_float32_matches_torch_on_every_pattern(torch) -> None:
    bits = np.arange(2**16, dtype=np.uint16)
    theirs = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()
    ours = bf16_to_float32(bits)
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))  # NaN payloads too
    np.testing.assert_array_equal(float32_to_bf16(ours[~np.isnan(ours)]), bits[~np.isnan(ours)])


@pytest.mark.parametrize(
    ("convert", "torch_dtype"),
    [(fp8_e4m3_to_float32, "float8_e4m3fn"), (fp8_e5m2_to_float32, "float8_e5m2")],
)
def test_fp8_matches_torch_on_every_pattern(convert: Any, torch_dtype: str, torch) -> None:
    bits = np.arange(256, dtype=np.uint8)
    theirs = torch.from_numpy(bits).view(getattr(torch, torch_dtype)).float().numpy()
    ours = convert(bits)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
    finite = ~np.isnan(theirs)
    np.testing.assert_array_equal(ours[finite].view(np.uint32), theirs[finite].view(np.uint32))
    np.testing.assert_array_equal(convert(bits.reshape(16, 16)), ours.reshape(16, 16))


def test_fp8_specials() -> None:
    e4m3 = fp8_e4m3_to_float32(np.array([0x7E, 0x7F, 0xFF, 0x01, 0x80], dtype=np.uint8))
    assert e4m3[0] == 448 and np.isnan(e4m3[1:3]).all() and e4m3[3] == 2.0**-9 and np.signbit(e4m3[4])
    e5m2 = fp8_e5m2_to_float32(np.array([0x7C, 0xFC, 0x7D, 0x7B, 0x01], dtype=np.uint8))
    assert e5m2[0] == np.inf and e5m2[1] == -np.inf and np.isnan(e5m2[2]) and e5m2[3] == 57344 and e5m2[4] == 2.0**-16


# ----------------------------------------------------------------------------------------------- real data


@pytest.mark.parametrize("part", ["decoder", "encoder"])
def test_shipped_taesd_bf16_upcast_equals_torch(part: str, torch) -> None:
    """The real BF16 files sdcli ships, read by the reference library and widened by torch."""
    import safetensors.torch

    path = shipped_taesd_dir() / SHIPPED_FILES[part]
    reference = safetensors.torch.load_file(str(path))
    with SafetensorsFile(path) as file:
        assert file.keys() == sorted(reference)
        for name, tensor in reference.items():
            np.testing.assert_array_equal(file.float32(name), tensor.float().numpy(), strict=True)


# ------------------------------------------------------------------------------------- views and lifetime


def test_f32_view_is_zero_copy_and_read_only(tmp_path: Path) -> None:
    path = tmp_path / "v.safetensors"
    save_file(path, {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(4, dtype=np.float32)})
    file = SafetensorsFile(path)
    view = file.view("w")
    assert not view.flags.owndata and not view.flags.writeable
    assert np.shares_memory(view, file.view("w")) and np.shares_memory(view, file.float32("w"))
    assert file.float32("w") is not view and file.float32("w").base is not None
    base = view
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base.obj if isinstance(base, memoryview) else base, mmap.mmap)
    with pytest.raises(ValueError):
        view[0, 0] = 1.0
    file.close()
    np.testing.assert_array_equal(view, np.arange(12, dtype=np.float32).reshape(3, 4))  # still mapped
    with pytest.raises(SafetensorsError, match="closed"):
        file.view("b")


def test_mapping_interface(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file(path, {"z.b": np.zeros(2, np.float16), "a": np.zeros((1, 2), np.int32)})
    with SafetensorsFile(path) as file:
        assert file.keys() == ["a", "z.b"] and list(file) == ["a", "z.b"] and len(file) == 2
        assert "a" in file and "missing" not in file and file.metadata == {}
        assert file.info("z.b") == TensorInfo("z.b", "F16", (2,), 8, 12)
        assert file.path == path
        with pytest.raises(KeyError, match="missing"):
            file.view("missing")


def test_empty_and_gapped_files_are_valid(tmp_path: Path) -> None:
    with SafetensorsFile(write_raw(tmp_path / "empty.safetensors", {})) as file:
        assert len(file) == 0 and file.metadata == {}
    padded = write_raw(tmp_path / "padded.safetensors", b'{"__metadata__":{}}     ')
    assert len(SafetensorsFile(padded)) == 0
    zero = {"z": entry("F32", (0, 3), (0, 0))}
    with SafetensorsFile(write_raw(tmp_path / "zero.safetensors", zero)) as file:
        assert file.view("z").shape == (0, 3) and file.float32("z").shape == (0, 3)
    data = np.arange(4, dtype=np.float32).tobytes()
    gapped = {"a": entry("F32", (1,), (0, 4)), "b": entry("F32", (1,), (12, 16)), "e": entry("U8", (0,), (2, 2))}
    with SafetensorsFile(write_raw(tmp_path / "gapped.safetensors", gapped, data)) as file:
        assert file.view("a")[0] == 0 and file.view("b")[0] == 3 and file.view("e").shape == (0,)
    assert len(SafetensorsFile(write_raw(tmp_path / "empty_path.safetensors", {}, b""))) == 0


# ----------------------------------------------------------------------------------------- malformed files


BAD_HEADERS: list[tuple[str, bytes | Any, bytes, str, str | None]] = [
    # (case, header, data, words in the message, tensor named)
    ("not utf-8", b'{"a\xff": 1}', b"", "UTF-8", None),
    ("not json", b'{"a": ', b"", "not valid JSON", None),
    ("nan constant", b'{"a": NaN}', b"", "not valid JSON", None),
    ("huge int literal", b'{"a": ' + b"9" * 5000 + b"}", b"", "JSON", None),
    ("deep nesting", b"[" * 100_000, b"", "JSON", None),
    ("duplicate key", b'{"a": {}, "a": {}}', b"", "twice", None),
    ("not an object", [1, 2], b"", "not a JSON object", None),
    ("metadata list", {"__metadata__": ["x"]}, b"", "__metadata__", None),
    ("metadata value", {"__metadata__": {"k": 1}}, b"", "__metadata__", None),
    ("entry not object", {"a.weight": 5}, b"", "not an object", "a.weight"),
    ("entry lacks", {"a.weight": {"dtype": "F32", "shape": [1]}}, b"", "lacks data_offsets", "a.weight"),
    ("entry extra", {"a.weight": {**entry(), "x": 1}}, bytes(8), "extra", "a.weight"),
    ("unknown dtype", {"a.weight": entry("F128")}, bytes(8), "unknown dtype", "a.weight"),
    ("dtype not str", {"a.weight": entry(3)}, bytes(8), "unknown dtype", "a.weight"),
    ("shape not list", {"a.weight": {**entry(), "shape": 2}}, bytes(8), "shape", "a.weight"),
    ("shape negative", {"a.weight": entry(shape=(-2,))}, bytes(8), "shape", "a.weight"),
    ("shape float", {"a.weight": entry(shape=(2.0,))}, bytes(8), "shape", "a.weight"),
    ("shape bool", {"a.weight": entry(shape=(True, True))}, bytes(8), "shape", "a.weight"),
    ("shape huge", {"a.weight": entry(shape=(10**30, 10**30))}, bytes(8), "too large", "a.weight"),
    ("shape huge zero", {"a.weight": entry(shape=(0, 10**30), offsets=(0, 0))}, b"", "too large", "a.weight"),
    ("shape too many dims", {"a.weight": entry(shape=(1,) * 65, offsets=(0, 4))}, bytes(4), "dimensions", "a.weight"),
    ("offsets not list", {"a.weight": {**entry(), "data_offsets": 0}}, bytes(8), "data_offsets", "a.weight"),
    ("offsets length", {"a.weight": entry(offsets=(0, 8, 8))}, bytes(8), "data_offsets", "a.weight"),
    ("offsets negative", {"a.weight": entry(offsets=(-8, 0))}, bytes(8), "data_offsets", "a.weight"),
    ("offsets float", {"a.weight": entry(offsets=(0, 8.0))}, bytes(8), "data_offsets", "a.weight"),
    ("offsets huge", {"a.weight": entry(offsets=(0, 10**40))}, bytes(8), "past the data", "a.weight"),
    ("offsets reversed", {"a.weight": entry(offsets=(8, 0))}, bytes(8), "begin after", "a.weight"),
    ("span past data", {"a.weight": entry(offsets=(4, 12))}, bytes(8), "past the data section of 8", "a.weight"),
    ("span size", {"a.weight": entry(shape=(2, 3), offsets=(0, 12))}, bytes(24),
     "data_offsets [0, 12] span 12 bytes but shape [2, 3] of F32 needs 24", "a.weight"),
    ("overlap", {"a.weight": entry(), "b.bias": entry(offsets=(4, 12))}, bytes(12), "overlap", "b.bias"),
    ("newline in name", {"bad\nname": entry("F32", (3,))}, bytes(8), "bad\\nname", None),
]


@pytest.mark.parametrize(("case", "header", "data", "words", "tensor"), BAD_HEADERS, ids=[c[0] for c in BAD_HEADERS])
def test_bad_header_is_refused(
    tmp_path: Path, case: str, header: Any, data: bytes, words: str, tensor: str | None
) -> None:
    path = write_raw(tmp_path / "model.safetensors", header, data)
    with pytest.raises(SafetensorsError) as caught:
        SafetensorsFile(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and words in message
    if tensor is not None:
        assert f"tensor '{tensor}'" in message
    if case == "overlap":
        assert "tensor 'a.weight'" in message


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"", "too short"),
        (b"\x01\x02\x03", "too short"),
        (struct.pack("<Q", 100) + b"{}", "past the end"),
        (struct.pack("<Q", 200_000_000) + b"{}", "limit"),
        (struct.pack("<Q", 2**64 - 1), "limit"),
    ],
)
def test_bad_length_is_refused(tmp_path: Path, content: bytes, words: str) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(SafetensorsError, match=words) as caught:
        SafetensorsFile(path)
    assert "model.safetensors" in str(caught.value) and "\n" not in str(caught.value)


def test_unopenable_files_are_refused(tmp_path: Path) -> None:
    for path in (tmp_path / "missing.safetensors", tmp_path, tmp_path / "nul\0.safetensors"):
        with pytest.raises(SafetensorsError, match="cannot open") as caught:
            SafetensorsFile(path)
        label = str(path) if str(path).isprintable() else repr(str(path))  # control characters escaped
        assert str(caught.value).startswith(label) and "\n" not in str(caught.value)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_is_refused(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "locked.safetensors", {})
    path.chmod(0)
    with pytest.raises(SafetensorsError, match="cannot open"):
        SafetensorsFile(path)


# ------------------------------------------------------------------------------------------------- fuzzing


_names = itertools.count()
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.integers(min_value=-8, max_value=64)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | st.sampled_from(sorted(DTYPES) + ["F4", "bf16", ""])
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20,
)
small_ints = st.integers(min_value=-2, max_value=40) | st.integers(min_value=-(2**80), max_value=2**80)
entry_fields = {
    "dtype": st.sampled_from(sorted(DTYPES)) | json_values,
    "shape": st.lists(small_ints, max_size=4) | st.lists(st.integers(0, 4), max_size=3) | json_values,
    "data_offsets": st.lists(small_ints, min_size=2, max_size=2) | st.lists(st.integers(0, 40), min_size=2, max_size=2),
}
entry_values = (
    st.fixed_dictionaries(entry_fields)  # complete entries, most of the time
    | st.fixed_dictionaries(entry_fields, optional={"extra": json_values})
    | st.fixed_dictionaries({}, optional={**entry_fields, "extra": json_values})
)
metadata_values = st.dictionaries(st.text(max_size=3), st.text(max_size=3) | json_values, max_size=3)
header_values = st.dictionaries(
    st.sampled_from(["a", "b", "c.weight"]) | st.text(max_size=4),
    entry_values | json_values,
    max_size=4,
) | st.builds(
    lambda header, metadata: {"__metadata__": metadata, **header},
    st.dictionaries(st.text(max_size=4), entry_values, max_size=3),
    metadata_values | json_values,
) | json_values


def open_or_refuse(path: Path) -> None:
    """The property: the constructor succeeds or raises SafetensorsError; a file it accepts reads in full."""
    try:
        file = SafetensorsFile(path)
    except SafetensorsError as error:
        assert "\n" not in str(error)
        return
    with file:
        for name in file:
            info = file.info(name)
            view = file.view(name)
            assert view.shape == info.shape and view.dtype == DTYPES[info.dtype]
            assert file.float32(name).shape == info.shape
            assert view.nbytes == info.end - info.begin


def fuzz_path(folder: Path) -> Path:
    return folder / f"fuzz{next(_names)}.safetensors"


@FUZZ
@given(content=st.binary(max_size=200))
def test_fuzz_arbitrary_bytes(tmp_path: Path, content: bytes) -> None:
    path = fuzz_path(tmp_path)
    path.write_bytes(content)
    open_or_refuse(path)


@FUZZ
@given(header=st.binary(max_size=120), data=st.binary(max_size=32))
def test_fuzz_arbitrary_header_bytes(tmp_path: Path, header: bytes, data: bytes) -> None:
    open_or_refuse(write_raw(fuzz_path(tmp_path), header, data))


@FUZZ
@given(header=header_values, data=st.binary(max_size=64) | st.just(b""), pad=st.integers(0, 9))
def test_fuzz_json_headers(tmp_path: Path, header: Any, data: bytes, pad: int) -> None:
    raw = json.dumps(header).encode("utf-8") + b" " * pad
    open_or_refuse(write_raw(fuzz_path(tmp_path), raw, data))


@FUZZ
@given(
    shapes=st.lists(st.lists(st.integers(0, 3), max_size=3), min_size=1, max_size=4),
    code=st.sampled_from(sorted(DTYPES)),
    gap=st.integers(0, 3),
)
def test_fuzz_valid_layouts(tmp_path: Path, shapes: list[list[int]], code: str, gap: int) -> None:
    """Plausible headers with consistent spans (and gaps) are accepted and read back."""
    itemsize = DTYPES[code].itemsize
    header, offset = {}, 0
    for i, shape in enumerate(shapes):
        size = math.prod(shape) * itemsize
        header[f"t{i}"] = entry(code, shape, (offset, offset + size))
        offset += size + gap
    path = write_raw(fuzz_path(tmp_path), header, bytes(range(256)) * (offset // 256 + 1))
    with SafetensorsFile(path) as file:
        assert file.keys() == sorted(header)
    open_or_refuse(path)


def test_release_drops_pages_but_not_the_data(tmp_path):
    """release() (madvise DONTNEED on the mapping) keeps every view valid and unchanged, per tensor or whole."""
    tensors = {"a": np.arange(5000, dtype=np.float32), "b": np.linspace(0, 1, 3000).astype(np.float16)}
    save_file(tmp_path / "t.safetensors", tensors)
    with SafetensorsFile(tmp_path / "t.safetensors") as file:
        views = {name: file.view(name) for name in tensors}
        file.release("a")
        np.testing.assert_array_equal(views["a"], tensors["a"])
        file.release()
        for name, view in views.items():
            np.testing.assert_array_equal(view, tensors[name])
    file.release()  # closed: nothing to drop
