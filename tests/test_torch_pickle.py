"""sdcli convert: PyTorch zip checkpoints read without torch and without running code from them.

Most tests craft checkpoints by hand, without torch: :class:`CraftingPickler` writes torch's globals (and hostile
ones) as they appear in a real ``data.pkl``, and :func:`write_checkpoint` lays the entries out as ``torch.save``
does. The tests asking for the ``torch`` fixture compare against files ``torch.save`` itself wrote, bit for bit.
Every hostile pickle would create a marker file if any of it ran; the tests assert that the marker never appears.
"""

from __future__ import annotations

import builtins
import copyreg
import io
import os
import pickle
import pickletools
import random
import shlex
import struct
import subprocess
import time
import tracemalloc
import zipfile
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from sdcli.cli import main
from sdcli.errors import CheckpointError, SdcliError
from sdcli.io import torch_pickle
from sdcli.io.files import OutputExistsError
from sdcli.io.safetensors import SafetensorsFile
from sdcli.io.torch_pickle import ALLOWED_GLOBALS, TorchArchive, convert_checkpoint

# numpy dtype of the test arrays -> torch's typed storage class
STORAGE_KIND = {
    np.dtype("<f8"): "DoubleStorage", np.dtype("<f4"): "FloatStorage", np.dtype("<f2"): "HalfStorage",
    np.dtype("<i8"): "LongStorage", np.dtype("<i4"): "IntStorage", np.dtype("<i2"): "ShortStorage",
    np.dtype("i1"): "CharStorage", np.dtype("u1"): "ByteStorage", np.dtype("?"): "BoolStorage",
}
CODE_OF_KIND = {"DoubleStorage": "F64", "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16",
                "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8",
                "ByteStorage": "U8", "BoolStorage": "BOOL"}


# ------------------------------------------------------------------------------------------- crafting checkpoints


class Global:
    """A module-level name written into a pickle as it is, never imported: torch's names without torch, hostile
    names without their modules."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, *args):  # save_reduce wants a callable; it is only ever written, never called
        raise AssertionError("a Global is never called")


@dataclass(eq=False)
class Storage:
    key: str
    kind: str  # "FloatStorage", ... or "UntypedStorage"
    data: bytes
    numel: int


@dataclass(eq=False)
class Tensor:
    storage: Storage
    offset: int
    shape: tuple
    stride: tuple
    rebuild: str = "_rebuild_tensor_v2"
    parameter: bool = False


class Call:
    """An object that unpickles as ``func(*args)``: the shape of every pickle gadget."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args

    def __call__(self, *args):  # so that a Call can itself be the function of another Call
        raise AssertionError("a Call is never called here")


class CraftingPickler(pickle._Pickler):
    """Pickles the way torch.save does (protocol 2, tensors as _rebuild_tensor_v2 calls on persistent storages),
    with :class:`Global` names written as they are."""

    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, file, protocol: int = 2) -> None:
        super().__init__(file, protocol)
        self.storages: dict[str, Storage] = {}

    def save_global_as_written(self, obj: Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("utf-8"))
        self.memoize(obj)

    dispatch[Global] = save_global_as_written

    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            self.storages[obj.key] = obj
            module = "torch.storage" if obj.kind == "UntypedStorage" else "torch"
            return ("storage", Global(module, obj.kind), obj.key, "cpu", obj.numel)
        return None

    def reducer_override(self, obj):
        if isinstance(obj, Tensor):
            args = (obj.storage, obj.offset, obj.shape, obj.stride, False, OrderedDict())
            rebuild = Global("torch._utils", obj.rebuild)
            if obj.parameter:
                return Global("torch._utils", "_rebuild_parameter"), (Call(rebuild, *args), True, OrderedDict())
            return rebuild, args
        return NotImplemented


def craft_pickle(obj, protocol: int = 2) -> tuple[bytes, dict[str, Storage]]:
    stream = io.BytesIO()
    pickler = CraftingPickler(stream, protocol)
    pickler.dump(obj)
    return stream.getvalue(), pickler.storages


def write_archive(path: Path, pkl: bytes, storages: dict[str, Storage], *, archive: str = "archive",
                  byteorder: bytes | None = b"little", compress: tuple[str, ...] = ()) -> Path:
    """A zip laid out as torch.save lays it out; entries named in ``compress`` are deflated instead of stored."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        def put(name: str, data: bytes) -> None:
            method = zipfile.ZIP_DEFLATED if name in compress else zipfile.ZIP_STORED
            zf.writestr(zipfile.ZipInfo(f"{archive}/{name}"), data, compress_type=method)

        put("data.pkl", pkl)
        if byteorder is not None:
            put("byteorder", byteorder)
        for key, storage in storages.items():
            put(f"data/{key}", storage.data)
        put("version", b"3\n")
    return path


def write_checkpoint(path: Path, obj, **options) -> Path:
    pkl, storages = craft_pickle(obj)
    return write_archive(path, pkl, storages, **options)


def storage_of(array: np.ndarray, key: str, kind: str | None = None) -> Storage:
    array = np.ascontiguousarray(array)
    return Storage(key, kind or STORAGE_KIND[array.dtype], array.tobytes(), array.size)


def tensor_of(array: np.ndarray, key: str, kind: str | None = None) -> Tensor:
    """A contiguous tensor holding ``array`` in a storage of its own."""
    strides = tuple(step // array.itemsize for step in np.ascontiguousarray(array).strides)
    return Tensor(storage_of(array, key, kind), 0, array.shape, strides)


def read_back(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    with SafetensorsFile(path) as file:
        return {name: (file.info(name).dtype, np.array(file.view(name))) for name in file.keys()}


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert isinstance(error.value, SdcliError) and "\n" not in message
    return message


@pytest.fixture
def marker(tmp_path):
    """A file every hostile pickle here would create if any of its code ran."""
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "code from a pickle ran"


# ------------------------------------------------------------------------------------------- reading (torch-free)


def every_dtype_state(rng: np.random.Generator) -> tuple[dict, dict[str, tuple[str, np.ndarray]]]:
    """A state dict with a tensor of every dtype, and what each must read back as (code, array)."""
    state, expected = OrderedDict(), {}
    for i, dtype in enumerate(STORAGE_KIND):
        if dtype == np.dtype("?"):
            array = rng.integers(0, 2, (3, 5)).astype("?")
        elif dtype.kind == "f":
            array = rng.standard_normal((3, 5)).astype(dtype)
        else:
            info = np.iinfo(dtype)
            array = rng.integers(info.min, info.max, (3, 5), dtype=dtype, endpoint=True)
        state[f"t.{dtype.name}"] = tensor_of(array, str(i))
        expected[f"t.{dtype.name}"] = (CODE_OF_KIND[STORAGE_KIND[dtype]], array)
    bits = rng.integers(0, 2**16, (4, 2), dtype=np.uint16)  # bfloat16 as its bits
    state["t.bfloat16"] = tensor_of(bits, "bf", kind="BFloat16Storage")
    expected["t.bfloat16"] = ("BF16", bits)
    return state, expected


def test_every_dtype_reads_back_bit_for_bit(tmp_path):
    state, expected = every_dtype_state(np.random.default_rng(0))
    source = write_checkpoint(tmp_path / "model.pt", state)
    result = convert_checkpoint(source, tmp_path / "model.safetensors")
    written = read_back(result.target)
    assert written.keys() == expected.keys()
    for name, (code, array) in expected.items():
        assert written[name][0] == code and written[name][1].shape == array.shape
        assert written[name][1].tobytes() == array.tobytes(), name
    assert result.tensors == len(expected) and result.key is None and result.skipped == ()
    assert result.nbytes == sum(array.nbytes for _, array in expected.values())
    assert SafetensorsFile(result.target).metadata == {"format": "pt", "source": "model.pt"}


def test_views_offsets_strides_and_shared_storages(tmp_path):
    base = np.arange(48, dtype=np.float32)
    shared = storage_of(base, "0")
    state = {
        "whole": Tensor(shared, 0, (6, 8), (8, 1)),
        "rows": Tensor(shared, 16, (2, 8), (8, 1)),  # a slice with a storage offset
        "transposed": Tensor(shared, 0, (8, 6), (1, 8)),
        "every_other": Tensor(shared, 1, (3, 4), (16, 2)),
        "expanded": Tensor(shared, 5, (3, 4), (0, 1)),  # stride 0, as tensor.expand makes
        "scalar": Tensor(shared, 47, (), ()),
        "empty": Tensor(shared, 48, (0, 3), (3, 1)),
    }
    source = write_checkpoint(tmp_path / "views.pth", state)
    written = read_back(convert_checkpoint(source, tmp_path / "views.safetensors").target)
    grid = base.reshape(6, 8)
    expected = {"whole": grid, "rows": grid[2:4], "transposed": grid.T, "every_other": grid[::2, 1::2],
                "expanded": np.broadcast_to(base[5:9], (3, 4)), "scalar": np.float32(47), "empty": np.zeros((0, 3))}
    for name, array in expected.items():
        code, ours = written[name]
        assert code == "F32" and ours.shape == np.shape(array)
        assert np.array_equal(ours, array), name


def test_nested_dicts_are_flattened_with_dots_and_other_values_skipped(tmp_path):
    one = tensor_of(np.ones(2, np.float32), "0")
    state = {"model": OrderedDict([("encoder", {"w": one, "b": tensor_of(np.zeros(3, np.int64), "1")}),
                                   ("head", tensor_of(np.full(1, 7, np.int8), "2")), ("epoch", 3), ("name", "x"),
                                   (5, {"exp_avg": tensor_of(np.ones(1, np.float16), "3")})])}
    source = write_checkpoint(tmp_path / "nested.ckpt", state)
    result = convert_checkpoint(source, tmp_path / "nested.safetensors")
    assert result.key == "model"
    assert set(read_back(result.target)) == {"encoder.w", "encoder.b", "head", "5.exp_avg"}
    assert result.skipped == ("epoch", "name")


def test_module_state_dict_metadata_and_parameters(tmp_path):
    """A module's state_dict() carries ``_metadata`` (a BUILD on the OrderedDict) and nn.Parameters."""
    state = OrderedDict()
    state._metadata = OrderedDict([("", {"version": 1})])
    weight = tensor_of(np.arange(6, dtype=np.float32).reshape(2, 3), "0")
    weight.parameter = True
    state["weight"] = weight
    pkl, storages = craft_pickle(state)
    assert {"BUILD", "BINPERSID"} <= {op.name for op, _, _ in pickletools.genops(pkl)} and b"_rebuild_parameter" in pkl
    source = write_archive(tmp_path / "module.bin", pkl, storages)
    written = read_back(convert_checkpoint(source, tmp_path / "module.safetensors").target)
    assert np.array_equal(written["weight"][1], np.arange(6, dtype=np.float32).reshape(2, 3))


def test_untyped_storage_with_a_dtype_global(tmp_path):
    """Newer dtypes (uint16, float8) come as _rebuild_tensor_v3 on an untyped storage, with the dtype a global."""
    values = np.array([1, 2, 65535], dtype="<u2")
    storage = Storage("0", "UntypedStorage", values.tobytes(), values.nbytes)
    pkl = (b"\x80\x02}X\x01\x00\x00\x00u" + b"ctorch._utils\n_rebuild_tensor_v3\n"
           + b"((X\x07\x00\x00\x00storagectorch.storage\nUntypedStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x06tQ"
           + b"K\x00K\x03\x85K\x01\x85\x89ccollections\nOrderedDict\n)Rctorch\nuint16\ntRs.")
    source = write_archive(tmp_path / "u16.pt", pkl, {"0": storage})
    written = read_back(convert_checkpoint(source, tmp_path / "u16.safetensors").target)
    assert written["u"][0] == "U16" and np.array_equal(written["u"][1], values)


def test_key_selects_and_the_only_candidate_is_picked(tmp_path):
    t = tensor_of(np.ones(2, np.float32), "0")
    ckpt = write_checkpoint(tmp_path / "sd.ckpt", {"state_dict": {"w": t}, "global_step": 7})
    assert convert_checkpoint(ckpt, tmp_path / "a.safetensors").key == "state_dict"  # the only dict of tensors
    pair = {"generator": {"model.x": t}, "generator_ema": {"model.x": t, "model.y": t}, "step": 1}
    both = write_checkpoint(tmp_path / "sf.pt", pair)
    result = convert_checkpoint(both, tmp_path / "b.safetensors", key="generator_ema")
    assert result.key == "generator_ema" and set(read_back(result.target)) == {"model.x", "model.y"}
    assert SafetensorsFile(result.target).metadata == {"format": "pt", "source": "sf.pt", "key": "generator_ema"}
    with pytest.raises(CheckpointError) as error:
        convert_checkpoint(both, tmp_path / "c.safetensors")
    assert "'generator' (1 tensor), 'generator_ema' (2 tensors)" in one_line(error) and "--key" in str(error.value)
    deep = write_checkpoint(tmp_path / "deep.pt", {"a": {"b.c": {"d": {"w": t}}}, "x": {"y": t}})
    result = convert_checkpoint(deep, tmp_path / "d.safetensors", key="a.b.c.d")
    assert set(read_back(result.target)) == {"w"}
    assert not (tmp_path / "c.safetensors").exists()


@pytest.mark.parametrize("key, expected", [
    ("missing", "has no key 'missing'; keys holding tensors: 'generator' (1 tensor), 'generator_ema' (1 tensor)"),
    ("step", "holds an int under the key 'step'"),
    ("generator.model.x", "holds a tensor under the key 'generator.model.x'"),
])
def test_a_wrong_key_lists_the_keys_holding_tensors(tmp_path, key, expected):
    t = tensor_of(np.ones(2, np.float32), "0")
    source = write_checkpoint(tmp_path / "sf.pt", {"generator": {"model.x": t}, "generator_ema": {"model.x": t},
                                                   "step": 1})
    with pytest.raises(CheckpointError) as error:
        convert_checkpoint(source, tmp_path / "out.safetensors", key=key)
    assert expected in one_line(error)


@pytest.mark.parametrize("obj, expected", [
    ({"step": 1, "name": "x"}, "holds no tensors"),
    ([1, 2], "holds a list, not a dict of tensors"),
    ({"a": {"w": None}}, "holds no tensors"),
])
def test_checkpoints_without_tensors(tmp_path, obj, expected):
    source = write_checkpoint(tmp_path / "x.pt", obj)
    with pytest.raises(CheckpointError, match=expected):
        convert_checkpoint(source, tmp_path / "x.safetensors")


def test_names_that_collide_once_flattened_and_dicts_that_contain_themselves(tmp_path):
    t = tensor_of(np.ones(1, np.float32), "0")
    source = write_checkpoint(tmp_path / "twice.pt", {"a.b": t, "a": {"b": t}})
    with pytest.raises(CheckpointError, match="two tensors are named 'a.b'"):
        convert_checkpoint(source, tmp_path / "x.safetensors")
    loop = {"w": t}
    loop["again"] = loop
    source = write_checkpoint(tmp_path / "loop.pt", loop)
    with pytest.raises(CheckpointError, match="contains itself"):
        convert_checkpoint(source, tmp_path / "x.safetensors")
    deep = inner = {}
    for _ in range(100):
        inner["n"] = {}
        inner = inner["n"]
    inner["w"] = t
    source = write_checkpoint(tmp_path / "deep.pt", {"w": t, "deep": deep})
    with pytest.raises(CheckpointError, match="nested more than 64 deep"):
        convert_checkpoint(source, tmp_path / "x.safetensors")


def test_shared_sub_dicts_are_bounded(tmp_path, monkeypatch):
    """A pickle can reference one dict many times at every level: 2**40 paths from a few hundred bytes."""
    t = tensor_of(np.ones(1, np.float32), "0")
    level = {"w": t}
    for _ in range(40):
        level = {"a": level, "b": level}
    source = write_checkpoint(tmp_path / "dag.pt", {"x": level})
    monkeypatch.setattr(torch_pickle, "MAX_VISITS", 100_000)
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match="more than 100000 values"):
        convert_checkpoint(source, tmp_path / "x.safetensors")
    assert time.perf_counter() - started < 5


# ------------------------------------------------------------------------------------------- refused files


def test_wrong_suffixes_and_existing_output(tmp_path):
    source = write_checkpoint(tmp_path / "m.pt", {"w": tensor_of(np.ones(1, np.float32), "0")})
    with pytest.raises(SdcliError, match=r"expected a PyTorch checkpoint \(.pt .pth .ckpt .bin\), not .zip"):
        convert_checkpoint(source.rename(tmp_path / "m.zip"), tmp_path / "m.safetensors")
    source = (tmp_path / "m.zip").rename(tmp_path / "m.pt")
    with pytest.raises(SdcliError, match="must be a .safetensors file"):
        convert_checkpoint(source, tmp_path / "m.st")
    (tmp_path / "m.safetensors").write_bytes(b"keep")
    with pytest.raises(OutputExistsError, match="pass --overwrite"):
        convert_checkpoint(source, tmp_path / "m.safetensors")
    assert (tmp_path / "m.safetensors").read_bytes() == b"keep"
    convert_checkpoint(source, tmp_path / "m.safetensors", overwrite=True)
    assert set(read_back(tmp_path / "m.safetensors")) == {"w"}
    with pytest.raises(CheckpointError, match="no such file"):
        convert_checkpoint(tmp_path / "absent.pt", tmp_path / "n.safetensors")


def legacy_bytes() -> bytes:
    """The start of a file torch < 1.6 wrote: the pickled magic number 0x1950a86a20f9469cfc6c, then more pickles."""
    return pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2)


@pytest.mark.parametrize("content, expected", [
    (legacy_bytes(), "legacy format"),
    (pickle.dumps({"w": 1}, protocol=2), "plain pickle"),
    (struct.pack("<Q", 2) + b"{}", "safetensors file already"),
    (b"", "not a PyTorch checkpoint"),
    (b"PK\x03\x04garbage", "not a PyTorch checkpoint"),
])
def test_files_that_are_not_torch_zips(tmp_path, content, expected):
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as error:
        convert_checkpoint(path, tmp_path / "x.safetensors")
    assert expected in one_line(error)


def test_zips_that_are_not_checkpoints(tmp_path):
    script = tmp_path / "script.pt"
    with zipfile.ZipFile(script, "w") as zf:  # torch.jit.save: data.pkl names the module's classes, code/ has them
        zf.writestr("script/data.pkl", b"\x80\x02c__torch__\nNet\n)\x81.")
        zf.writestr("script/code/__torch__.py", b"class Net(Module): ...")
        zf.writestr("script/constants.pkl", b"\x80\x02).")
    with pytest.raises(CheckpointError, match="is a TorchScript archive"):
        TorchArchive(script)
    for name, entries, expected in [("plain", ["readme.txt"], "a zip with no ARCHIVE/data.pkl entries"),
                                    ("two", ["a/data.pkl", "b/data.pkl"], "a zip with 2 ARCHIVE/data.pkl entries"),
                                    ("twice", ["a/data.pkl", "a/data.pkl"], "holds the entry 'a/data.pkl' twice")]:
        path = tmp_path / f"{name}.pt"
        with zipfile.ZipFile(path, "w") as zf, pytest.warns(UserWarning) if name == "twice" else nullcontext():
            for entry in entries:
                zf.writestr(entry, b"\x80\x02}.")
        with pytest.raises(CheckpointError) as error:
            TorchArchive(path)
        assert expected in one_line(error)


def test_big_endian_and_unknown_byteorder(tmp_path):
    t = tensor_of(np.ones(1, np.float32), "0")
    with pytest.raises(CheckpointError, match="big-endian"):
        TorchArchive(write_checkpoint(tmp_path / "big.pt", {"w": t}, byteorder=b"big"))
    with pytest.raises(CheckpointError, match="byteorder record says"):
        TorchArchive(write_checkpoint(tmp_path / "odd.pt", {"w": t}, byteorder=b"middle"))
    old = write_checkpoint(tmp_path / "old.pt", {"w": t}, byteorder=None)  # torch < 1.10: little-endian, unsaid
    assert set(read_back(convert_checkpoint(old, tmp_path / "old.safetensors").target)) == {"w"}


def test_storages_that_do_not_match_their_entries(tmp_path):
    array = np.ones(4, np.float32)
    storage = storage_of(array, "0")
    pkl, _ = craft_pickle({"w": Tensor(storage, 0, (4,), (1,))})
    cases = {
        "missing": ({}, "storage '0' has no entry in the archive"),
        "short": ({"0": Storage("0", "FloatStorage", array.tobytes()[:12], 4)}, "but its entry holds 12 bytes"),
        "long": ({"0": Storage("0", "FloatStorage", array.tobytes() + b"\0" * 4, 4)}, "its entry holds 20 bytes"),
    }
    for name, (storages, expected) in cases.items():
        source = write_archive(tmp_path / f"{name}.pt", pkl, storages)
        with pytest.raises(CheckpointError) as error:
            convert_checkpoint(source, tmp_path / f"{name}.safetensors")
        assert expected in one_line(error), name
        assert not (tmp_path / f"{name}.safetensors").exists()


def test_a_storage_declared_twice_differently(tmp_path):
    one = Storage("0", "FloatStorage", b"\0" * 8, 2)
    other = Storage("0", "IntStorage", b"\0" * 8, 2)
    pkl, _ = craft_pickle({"a": Tensor(one, 0, (2,), (1,)), "b": Tensor(other, 0, (2,), (1,))})
    with pytest.raises(CheckpointError, match="declared twice with different types"):
        TorchArchive(write_archive(tmp_path / "x.pt", pkl, {"0": one})).load()


@pytest.mark.parametrize("offset, shape, stride, expected", [
    (0, (5,), (1,), "reaches element 4 of storage '0', which holds 4"),
    (3, (2,), (1,), "reaches element 4"),
    (0, (2, 2), (3, 1), "reaches element 4"),
    (-1, (1,), (1,), "storage offset is an int, not a non-negative integer"),
    (0, (-1,), (1,), "size is a tuple, not a tuple of non-negative integers"),
    (0, (2,), (1, 1), "has 1 dimensions but 2 strides"),
    (0, (2**40, 2**40, 2**40), (0, 0, 0), "has more elements than any array can hold"),
    (0, (0, 2**62, 2**62), (0, 0, 0), "has more elements than any array can hold"),
    (0, (1,) * 65, (1,) * 65, "more than numpy's 64"),
    (0, (2,), (2**64,), "larger than any array"),
    ("0", (1,), (1,), "storage offset is a string"),
    (0, "ab", (1,), "size is a string"),
])
def test_tensors_outside_their_storage_are_refused(tmp_path, offset, shape, stride, expected):
    storage = storage_of(np.ones(4, np.float32), "0")
    pkl, storages = craft_pickle({"w": Tensor(storage, offset, shape, stride)})
    source = write_archive(tmp_path / "x.pt", pkl, storages)
    with pytest.raises(CheckpointError) as error:
        TorchArchive(source).load()
    assert expected in one_line(error)


def test_absurd_sizes_are_refused_before_anything_is_allocated(tmp_path):
    tracemalloc.start()
    try:
        started = time.perf_counter()
        for numel in (2**40, 2**60, 2**4000):
            storage = Storage("0", "FloatStorage", b"\0" * 16, numel)
            pkl, _ = craft_pickle({"w": Tensor(storage, 0, (4,), (1,))})
            source = write_archive(tmp_path / "x.pt", pkl, {"0": storage})
            with pytest.raises(CheckpointError) as error:
                convert_checkpoint(source, tmp_path / "x.safetensors")
            assert "more than the whole" in one_line(error)
        # a tensor expanded from one element to 2**40 (stride 0): inside its storage, but no file to write
        storage = Storage("0", "FloatStorage", b"\0" * 4, 1)
        source = write_checkpoint(tmp_path / "y.pt", {"w": Tensor(storage, 0, (2**20, 2**20), (0, 0))})
        with pytest.raises(CheckpointError, match="would make 4398046511104 bytes from a"):
            convert_checkpoint(source, tmp_path / "y.safetensors")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 * 2**20 and time.perf_counter() - started < 5
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()


def patch_central_sizes(data: bytes, name: bytes, size: int) -> bytes:
    """The zip ``data`` with the central directory's sizes of entry ``name`` both set to ``size``."""
    where = 0
    while True:
        where = data.index(b"PK\x01\x02", where)
        name_length = struct.unpack_from("<H", data, where + 28)[0]
        if data[where + 46:where + 46 + name_length] == name:
            return data[:where + 20] + struct.pack("<LL", size, size) + data[where + 28:]
        where += 4


def test_zip_bombs_and_sizes_outside_the_file(tmp_path):
    t = tensor_of(np.ones(4, np.float32), "0")
    pkl, storages = craft_pickle({"w": t})
    bomb = write_archive(tmp_path / "bomb.pt", pkl + b"\0" * (64 * 2**20), storages, compress=("data.pkl",))
    assert bomb.stat().st_size < 2**20  # 64 MB of zeros, deflated
    claimed = tmp_path / "claimed.pt"  # the same, its directory claiming 4 GB
    claimed.write_bytes(patch_central_sizes(bomb.read_bytes(), b"archive/data.pkl", 0xFFFFFFF0))
    deflated = write_archive(tmp_path / "deflated.pt", pkl, storages, compress=("data/0",))
    past_end = tmp_path / "past_end.pt"
    past_end.write_bytes(patch_central_sizes(write_archive(tmp_path / "stored.pt", pkl, storages).read_bytes(),
                                             b"archive/data/0", 0xFFFFFFF0))
    cases = [(bomb, "entry 'archive/data.pkl' is compressed (zip method 8)"),
             (claimed, "entry 'archive/data.pkl' is compressed"),
             (deflated, "entry 'archive/data/0' is compressed"),
             (past_end, "entry 'archive/data/0' of 4294967280 bytes reaches past the end")]
    tracemalloc.start()
    try:
        started = time.perf_counter()
        for path, expected in cases:
            with pytest.raises(CheckpointError) as error:
                convert_checkpoint(path, tmp_path / "out.safetensors")
            assert expected in one_line(error), path.name
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20 and time.perf_counter() - started < 2
    assert not (tmp_path / "out.safetensors").exists()


# ------------------------------------------------------------------------------------------- hostile pickles


def gadgets(marker: Path) -> dict[str, tuple[object, str]]:
    """Objects that run code when unpickled (each would create ``marker``), with the global that must be named."""
    touch = f"touch {shlex.quote(str(marker))}"
    python_touch = f"open({str(marker)!r}, 'w').close()"
    return {
        "os.system": (Call(os.system, touch), "refuses the global 'posix.system'"),
        "eval": (Call(builtins.eval, python_touch), "refuses the global 'builtins.eval'"),
        "exec": (Call(builtins.exec, python_touch), "refuses the global 'builtins.exec'"),
        "getattr chain": (Call(Call(builtins.getattr, Call(builtins.__import__, "os"), "system"), touch),
                          "refuses the global 'builtins.getattr'"),
        "subprocess.Popen": (Call(subprocess.Popen, ["touch", str(marker)]),
                             "refuses the global 'subprocess.Popen'"),
        "nested __reduce__": ({"state_dict": {"w": Call(OrderedDict), "x": [Call(os.system, touch)]}},
                              "refuses the global 'posix.system'"),
        "copyreg reconstructor": (Call(copyreg._reconstructor, Call(os.system, touch), object, None),
                                  "refuses the global 'copyreg._reconstructor'"),
    }


@pytest.mark.parametrize("name", list(gadgets(Path("x"))))
@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_gadgets_are_refused_by_name_and_never_run(tmp_path, marker, name, protocol):
    gadget, expected = gadgets(marker)[name]
    pkl = pickle.dumps(gadget, protocol=protocol)  # below protocol 3 with Python 2's names (__builtin__.eval)
    source = write_archive(tmp_path / "evil.pt", pkl, {})
    with pytest.raises(CheckpointError) as error:
        convert_checkpoint(source, tmp_path / "evil.safetensors")
    assert expected in one_line(error) and "could run code" in str(error.value)
    assert not (tmp_path / "evil.safetensors").exists()


def test_a_gadget_after_real_tensors_is_refused(tmp_path, marker):
    touch = f"touch {shlex.quote(str(marker))}"
    state = OrderedDict([("w", tensor_of(np.ones(3, np.float32), "0")), ("evil", Call(os.system, touch))])
    source = write_checkpoint(tmp_path / "model.ckpt", {"state_dict": state, "global_step": 1})
    with pytest.raises(CheckpointError, match="refuses the global 'posix.system'"):
        convert_checkpoint(source, tmp_path / "model.safetensors")


def run_pickle(tmp_path: Path, pkl: bytes) -> object:
    return TorchArchive(write_archive(tmp_path / "raw.pt", pkl, {})).load()


# Raw pickles for the opcodes that construct objects other than by REDUCE; each names a global or a stand-in.
RAW_PICKLES = {
    "INST": (b"(S'touch PWNED'\nios\nsystem\n.", "refuses the global 'os.system'"),
    "OBJ": (b"(cos\nsystem\nS'touch PWNED'\no.", "refuses the global 'os.system'"),
    "STACK_GLOBAL": (b"\x80\x04\x8c\x02os\x8c\x06system\x93\x8c\x0btouch PWNED\x85R.",
                     "refuses the global 'os.system'"),
    "INST of a stand-in": (b"(S'x'\nitorch._utils\n_rebuild_tensor_v2\n.", "_rebuild_tensor_v2 with 1 arguments"),
    "OBJ of a stand-in": (b"(ctorch._utils\n_rebuild_parameter\nS'x'\no.", "a parameter holds a string"),
    "NEWOBJ of a stand-in": (b"\x80\x02ccollections\nOrderedDict\n)\x81.", "not a pickle sdcli can read"),
    "REDUCE of a storage type": (b"\x80\x02ctorch\nFloatStorage\n)R.", "calls torch.FloatStorage, which is not"),
    "REDUCE of a dtype": (b"\x80\x02ctorch\nfloat32\n)R.", "calls torch.float32, which is not a function"),
    "text PERSID": (b"Pos.system\n.", "a persistent id is a string, not a storage reference"),
    "persistent id of another shape": (b"\x80\x02(X\x07\x00\x00\x00storageK\x01tQ.", "a tuple, not a storage"),
    "persistent id with a global": (b"\x80\x02(X\x07\x00\x00\x00storagecos\nsystem\nX\x01\x00\x00\x000X\x03\x00\x00"
                                    b"\x00cpuK\x01tQ.", "refuses the global 'os.system'"),
    # BUILD: the state of a whitelisted object set from the pickle
    "BUILD slots on OrderedDict": (b"\x80\x02ccollections\nOrderedDict\n)RN}X\t\x00\x00\x00__class__ctorch\nTensor\n"
                                   b"s\x86b.", "sets the state of an OrderedDict to a tuple"),
    "BUILD on a rebuilder": (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}X\x04\x00\x00\x00implccollections\n"
                             b"OrderedDict\nsb.", "sets the state of torch._utils._rebuild_tensor_v2"),
    "BUILD slots on a rebuilder": (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x04\x00\x00\x00implK\x01s\x86b.",
                                   "sets the state of torch._utils._rebuild_tensor_v2"),
    "BUILD on a storage type": (b"\x80\x02ctorch\nFloatStorage\n}X\x05\x00\x00\x00dtypeK\x01sb.",
                                "sets the state of torch.FloatStorage"),
    "BUILD on a dict": (b"\x80\x02}}X\x05\x00\x00\x00clearK\x01sb.", "AttributeError"),
    "_rebuild_from_type_v2 with another function": (
        b"\x80\x02ctorch._tensor\n_rebuild_from_type_v2\n(ccollections\nOrderedDict\nctorch\nTensor\n)NtR.",
        "given something other than a tensor rebuilder"),
    "OrderedDict of junk": (b"\x80\x02ccollections\nOrderedDict\nK\x05\x85R.", "makes an OrderedDict of an int"),
    "memo index of 4 GB": (b"\x80\x02K\x01r\xff\xff\xff\xffh\x00.", "Memo value not found at index 0"),
}


@pytest.mark.parametrize("name", list(RAW_PICKLES))
def test_raw_opcodes_go_through_the_whitelist(tmp_path, marker, name, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where "touch PWNED" would create the marker
    pkl, expected = RAW_PICKLES[name]
    with pytest.raises(CheckpointError) as error:
        run_pickle(tmp_path, pkl)
    assert expected in one_line(error)
    rebuild = ALLOWED_GLOBALS["torch._utils", "_rebuild_tensor_v2"]
    assert rebuild.impl is torch_pickle._rebuild_tensor_v2 and rebuild.name == "torch._utils._rebuild_tensor_v2"
    assert ALLOWED_GLOBALS["torch", "FloatStorage"].dtype is torch_pickle.DTYPES["float32"]


def test_extension_codes_are_refused(tmp_path, marker):
    copyreg.add_extension("posix", "system", 240)
    try:
        pkl = pickle.dumps(os.system, protocol=2)
    finally:
        copyreg.remove_extension("posix", "system", 240)
    assert pkl[2:3] == pickle.EXT1
    with pytest.raises(CheckpointError, match="extension code"):
        run_pickle(tmp_path, pkl)


def test_only_stand_ins_are_handed_out():
    """No whitelisted name maps to anything but this module's stand-ins (never torch, never a class or function
    the pickle could change)."""
    for (module, name), stand_in in ALLOWED_GLOBALS.items():
        assert isinstance(stand_in, torch_pickle._StandIn), (module, name)
        assert not hasattr(stand_in, "__dict__")
    assert "torch" not in {type(value).__module__.split(".")[0] for value in ALLOWED_GLOBALS.values()}


# ------------------------------------------------------------------------------------------- fuzzing


def mutate(data: bytes, rng: random.Random, region: tuple[int, int] | None = None) -> bytes:
    """``data`` with 1-4 bytes flipped, inserted or deleted (inside ``region`` when given)."""
    data = bytearray(data)
    low, high = region or (0, len(data))
    for _ in range(rng.randint(1, 4)):
        where = rng.randrange(low, max(low + 1, min(high, len(data))))
        action = rng.random()
        if action < 0.6 and where < len(data):
            data[where] ^= 1 << rng.randrange(8) if rng.random() < 0.7 else rng.randrange(1, 256)
        elif action < 0.8:
            data[where:where] = bytes([rng.randrange(256)])
        elif where < len(data):
            del data[where]
    return bytes(data)


def test_fuzzed_checkpoints_fail_only_with_one_line_errors(tmp_path, monkeypatch):
    """Mutated pickles and mutated zips: either a conversion or an SdcliError, never another exception, never a
    hang (the whole loop is timed)."""
    monkeypatch.setattr(torch_pickle, "GROWTH_ALLOWANCE", 2**20)  # no mutant writes more than a megabyte or so
    rng = np.random.default_rng(1)
    shared = storage_of(rng.standard_normal(24).astype(np.float32), "0")
    state = OrderedDict([
        ("a", Tensor(shared, 0, (4, 6), (6, 1))), ("a_t", Tensor(shared, 0, (6, 4), (1, 6))),
        ("slice", Tensor(shared, 6, (2, 3), (6, 2))), ("h", tensor_of(rng.standard_normal(5).astype(np.float16), "1")),
        ("nested", {"i": tensor_of(np.arange(3, dtype=np.int64), "2"), "n": 4}),
    ])
    state._metadata = {"": {"version": 1}}
    pkl, storages = craft_pickle({"state_dict": state, "global_step": 10})
    valid = write_archive(tmp_path / "valid.pt", pkl, storages).read_bytes()
    directory = valid.rindex(b"PK\x01\x02")  # the last central directory entry, then the end record
    mutants = random.Random(7)
    outcomes = {"converted": 0, "refused": 0}
    started = time.perf_counter()
    for iteration in range(1000):
        path = tmp_path / f"m{iteration % 2}.pt"
        choice = iteration % 4
        if choice < 2:
            write_archive(path, mutate(pkl, mutants), storages)
        elif choice == 2:
            path.write_bytes(mutate(valid, mutants))
        else:
            path.write_bytes(mutate(valid, mutants, (directory - 200, len(valid))))
        try:
            convert_checkpoint(path, tmp_path / "out.safetensors", overwrite=True)
            outcomes["converted"] += 1
        except SdcliError as error:
            assert "\n" not in str(error), str(error)
            outcomes["refused"] += 1
    assert time.perf_counter() - started < 20
    assert outcomes["converted"] > 10 and outcomes["refused"] > 100, outcomes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m0.pt", "m1.pt", "out.safetensors", "valid.pt"]


GLOBAL_NAMES = [f"{module}\n{name}\n".encode() for module, name in ALLOWED_GLOBALS] + [b"os\nsystem\n"]
STORAGE_NAMES = [name for name in GLOBAL_NAMES if name.endswith(b"Storage\n")]
RANDOM_STORAGES = {"0": 64, "1": 16, "2": 4}  # key -> bytes of the storages random_pickle's archives hold


def random_value(rng: random.Random, depth: int = 0) -> bytes:
    """Opcodes that push one value: what torch's calls take (storages, offsets, shapes, rebuilder calls), in random
    places and of random kinds, nested, so that the stand-ins get arguments of every wrong kind."""
    def text(value: bytes) -> bytes:
        return b"X" + struct.pack("<I", len(value)) + value

    def values(count: int) -> bytes:
        return b"".join(random_value(rng, depth + 1) for _ in range(count))

    def storage() -> bytes:  # one of RANDOM_STORAGES, mostly with the right size
        name = rng.choice(STORAGE_NAMES)
        kind = b"c" + name if rng.random() < 0.9 else random_value(rng, depth + 1)
        key = rng.choice(list(RANDOM_STORAGES))
        itemsize = ALLOWED_GLOBALS[tuple(name.decode().split())].dtype
        right = RANDOM_STORAGES[key] // (itemsize.numpy.itemsize if itemsize is not None else 1)
        numel = b"K" + bytes([right if rng.random() < 0.7 else rng.randrange(256)]) if rng.random() < 0.9 \
            else random_value(rng, depth + 1)
        return b"(" + text(b"storage") + kind + text(key.encode()) + text(b"cpu") + numel + b"tQ"

    roll = rng.random() if depth < 4 else rng.random() * 0.45
    if roll < 0.1:
        return b"K" + bytes([rng.randrange(6)])
    if roll < 0.15:
        return b"\x8a\x08" + struct.pack("<q", rng.choice([2**40, 2**60, -1, 2**63 - 1, 0, 3]))
    if roll < 0.22:
        return text(rng.choice([b"storage", b"0", b"1", b"cpu", b"w", b"impl"]))
    if roll < 0.3:
        return rng.choice([b"N", b"\x88", b"\x89", b")", b"}", b"]"])
    if roll < 0.4:
        return b"c" + rng.choice(GLOBAL_NAMES)
    if roll < 0.5:
        return b"(" + values(rng.randrange(5)) + b"t"
    if roll < 0.6:
        return b"}(" + b"".join(text(b"k%d" % i) + random_value(rng, depth + 1) for i in range(rng.randrange(3))) + b"u"
    if roll < 0.7:
        return storage()
    if roll < 0.85:  # a rebuilder call shaped like torch's, some of its arguments replaced
        size = rng.randrange(4)
        arguments = [storage(), b"K" + bytes([rng.randrange(3)]),
                     b"(" + b"".join(b"K" + bytes([rng.randrange(5)]) for _ in range(size)) + b"t",
                     b"(" + b"".join(b"K" + bytes([rng.randrange(5)]) for _ in range(size)) + b"t", b"\x89",
                     b"ccollections\nOrderedDict\n)R", b"ctorch\n" + rng.choice([b"uint16", b"float32"]) + b"\n"]
        arguments = [random_value(rng, depth + 1) if rng.random() < 0.15 else argument for argument in arguments]
        rebuild = rng.choice([b"_rebuild_tensor_v2", b"_rebuild_tensor_v3"])
        count = 7 if rebuild.endswith(b"3") else rng.choice([4, 6])
        return b"ctorch._utils\n" + rebuild + b"\n(" + b"".join(arguments[:count]) + b"tR"
    if roll < 0.95:
        return b"c" + rng.choice(GLOBAL_NAMES) + b"(" + values(rng.randrange(9)) + b"tR"
    return random_value(rng, depth + 1) + random_value(rng, depth + 1) + b"b"


def random_pickle(rng: random.Random) -> bytes:
    entries = b"".join(b"X\x01\x00\x00\x00" + bytes([97 + i]) + random_value(rng) for i in range(rng.randrange(1, 6)))
    return b"\x80\x02}(" + entries + b"u."


def test_random_pickles_fail_only_with_one_line_errors(tmp_path, marker):
    storages = {key: Storage(key, "ByteStorage", bytes(range(size)), size) for key, size in RANDOM_STORAGES.items()}
    rng = random.Random(11)
    started = time.perf_counter()
    for _ in range(1000):
        source = write_archive(tmp_path / "r.pt", random_pickle(rng), storages)
        try:
            convert_checkpoint(source, tmp_path / "r.safetensors", overwrite=True)
        except SdcliError as error:
            assert "\n" not in str(error), str(error)
    assert time.perf_counter() - started < 20


# ------------------------------------------------------------------------------------------- the command


def invoke(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_convert_command_writes_and_summarises(tmp_path):
    assert "convert" in invoke(["--help"]).output
    t = tensor_of(np.ones((2, 3), np.float32), "0")
    h = tensor_of(np.ones(4, np.float16), "1")
    source = write_checkpoint(tmp_path / "sf.pt", {"generator": {"a": t}, "generator_ema": {"a": t, "b": h,
                                                                                            "steps": 3}})
    target = tmp_path / "out.safetensors"
    result = invoke(["convert", str(source), str(target), "--key", "generator_ema"])
    assert result.exit_code == 0, result.output
    assert f"wrote {target}: 2 tensors, 32 B (F16 1, F32 1) from sf.pt (key generator_ema)" in result.output
    assert "skipped 1 value(s) that are not tensors: steps" in result.output
    assert set(read_back(target)) == {"a", "b"}
    quiet = invoke(["convert", str(source), str(tmp_path / "q.safetensors"), "-k", "generator", "--quiet"])
    assert quiet.exit_code == 0 and quiet.output == ""


def test_convert_command_errors_are_one_line_and_leave_nothing(tmp_path, marker):
    t = tensor_of(np.ones(2, np.float32), "0")
    source = write_checkpoint(tmp_path / "sf.pt", {"generator": {"a": t}, "generator_ema": {"a": t}})
    damaged = tmp_path / "damaged.pt"
    pkl, _ = craft_pickle({"w": t})
    write_archive(damaged, pkl, {"0": Storage("0", "FloatStorage", b"\0" * 4, 2)})
    evil = write_archive(tmp_path / "evil.ckpt", pickle.dumps(Call(os.system, f"touch {marker}"), protocol=2), {})
    (tmp_path / "exists.safetensors").write_bytes(b"keep")
    before = sorted(p.name for p in tmp_path.iterdir())
    cases = [
        (["convert", str(source), str(tmp_path / "o.safetensors")], "holds several dicts of tensors: 'generator' "
         "(1 tensor), 'generator_ema' (1 tensor); pick one with --key (for example --key generator)"),
        (["convert", str(source), str(tmp_path / "o.safetensors"), "--key", "gen"], "has no key 'gen'; keys holding"),
        (["convert", str(source), str(tmp_path / "exists.safetensors"), "--key", "generator"], "pass --overwrite"),
        (["convert", str(source), str(tmp_path / "o.npy"), "--key", "generator"], "must be a .safetensors file"),
        (["convert", str(tmp_path / "x.onnx"), str(tmp_path / "o.safetensors")], "expected a PyTorch checkpoint"),
        (["convert", str(damaged), str(tmp_path / "o.safetensors")], "its entry holds 4 bytes"),
        (["convert", str(evil), str(tmp_path / "o.safetensors")], "refuses the global 'posix.system'"),
        (["convert", str(tmp_path / "missing.pt"), str(tmp_path / "o.safetensors")], "no such file"),
        (["convert", str(source)], "Missing argument 'OUT.safetensors'"),
    ]
    for args, expected in cases:
        result = invoke(args)
        assert result.exit_code == 2, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], (args, result.output)
        assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "exists.safetensors").read_bytes() == b"keep"


def test_a_failure_while_writing_leaves_no_temporary_file(tmp_path, monkeypatch):
    source = write_checkpoint(tmp_path / "m.pt", {"a": tensor_of(np.ones(2, np.float32), "0"),
                                                  "b": tensor_of(np.ones(2, np.float32), "1")})
    calls = []

    def failing(handle, archive, record, advance):
        calls.append(record)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        handle.write(archive.array(record).tobytes())

    monkeypatch.setattr(torch_pickle, "_write_tensor", failing)
    result = invoke(["convert", str(source), str(tmp_path / "m.safetensors")])
    assert result.exit_code == 2 and "cannot write: No space left on device" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_pickle_refusal_points_at_convert(tmp_path):
    from sdcli.io.checkpoint import pickle_refusal

    message = str(pickle_refusal(tmp_path / "text_encoder" / "pytorch_model.bin"))
    assert f"sdcli convert {tmp_path}/text_encoder/pytorch_model.bin {tmp_path}/text_encoder/model.safetensors" \
        in message
    assert "sdcli convert" not in str(pickle_refusal(tmp_path / "x.pkl"))


# ------------------------------------------------------------------------------------------- against torch


def torch_bytes(torch, tensor) -> bytes:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


TORCH_CODES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
               "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "uint16": "U16",
               "uint32": "U32", "uint64": "U64", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}


def assert_same(torch, path: Path, expected: dict) -> None:
    written = read_back(path)
    assert written.keys() == expected.keys()
    for name, tensor in expected.items():
        code, array = written[name]
        assert code == TORCH_CODES[str(tensor.dtype).removeprefix("torch.")], name
        assert array.shape == tuple(tensor.shape), name
        assert array.tobytes() == torch_bytes(torch, tensor), name


def random_tensor(torch, dtype, shape, generator):
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=generator) * 3).to(dtype)
    info = torch.iinfo(dtype)
    low, high = max(info.min, -(2**62)), min(info.max, 2**62)
    return torch.randint(low, high, shape, generator=generator, dtype=torch.int64).to(dtype)


def test_every_dtype_and_view_against_torch_save(torch, tmp_path):
    generator = torch.Generator().manual_seed(0)
    state = OrderedDict()
    for name in TORCH_CODES:
        dtype = getattr(torch, name, None)
        if dtype is None:
            continue
        state[f"{name}.plain"] = random_tensor(torch, dtype, (3, 5), generator)
        state[f"{name}.scalar"] = random_tensor(torch, dtype, (), generator)
    base = torch.randn(6, 8, generator=generator)
    state["view.rows"] = base[2:4]  # storage offset 16
    state["view.transposed"] = base.t()
    state["view.columns"] = base[:, 1::3]
    state["view.expanded"] = base[0, :4].expand(3, 4)
    state["shared.a"] = base
    state["shared.b"] = base.view(8, 6)
    state["bf16.transposed"] = base.to(torch.bfloat16).t()
    state["empty"] = torch.zeros(0, 4)
    layer = torch.nn.Linear(3, 2)
    state["param"] = layer.weight
    tagged = torch.ones(2)
    tagged.note = "an attribute"  # pickled through _rebuild_from_type_v2
    state["tagged"] = tagged
    source = tmp_path / "every.pt"
    torch.save(state, source)
    result = convert_checkpoint(source, tmp_path / "every.safetensors")
    assert_same(torch, result.target, state)


def test_module_state_dict_sd_ckpt_and_self_forcing_layout_against_torch(torch, tmp_path):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4), torch.nn.Linear(4, 2))
    weights = module.state_dict()
    torch.save({"state_dict": weights, "global_step": 1234, "epoch": 3}, tmp_path / "sd.ckpt")
    result = convert_checkpoint(tmp_path / "sd.ckpt", tmp_path / "sd.safetensors")
    assert result.key == "state_dict"
    assert_same(torch, result.target, weights)
    convert_checkpoint(tmp_path / "sd.ckpt", tmp_path / "sd2.safetensors", key="state_dict")
    assert (tmp_path / "sd2.safetensors").read_bytes() == (tmp_path / "sd.safetensors").read_bytes()

    def generator_state(seed):
        torch.manual_seed(seed)
        return OrderedDict((f"model.blocks.{i}.self_attn.{p}.weight", torch.randn(8, 8).to(torch.bfloat16))
                           for i in range(2) for p in "qkvo")

    checkpoint = {"generator": generator_state(1), "generator_ema": generator_state(2)}
    torch.save(checkpoint, tmp_path / "self_forcing_dmd.pt")
    with pytest.raises(CheckpointError, match="'generator' \\(8 tensors\\), 'generator_ema' \\(8 tensors\\)"):
        convert_checkpoint(tmp_path / "self_forcing_dmd.pt", tmp_path / "sf.safetensors")
    result = convert_checkpoint(tmp_path / "self_forcing_dmd.pt", tmp_path / "sf.safetensors", key="generator_ema")
    assert_same(torch, result.target, checkpoint["generator_ema"])
    assert SafetensorsFile(result.target).metadata["key"] == "generator_ema"

    nested = {"model": {"unet": {"w": torch.ones(2)}, "vae": {"w": torch.zeros(3, dtype=torch.float16)}}}
    torch.save(nested, tmp_path / "nested.pth")
    result = convert_checkpoint(tmp_path / "nested.pth", tmp_path / "nested.safetensors", key="model")
    assert_same(torch, result.target, {"unet.w": nested["model"]["unet"]["w"], "vae.w": nested["model"]["vae"]["w"]})


def test_torch_formats_sdcli_refuses(torch, tmp_path, marker):
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy format"):
        convert_checkpoint(tmp_path / "legacy.pt", tmp_path / "legacy.safetensors")
    torch.save({"w": torch.ones(2, dtype=torch.complex64)}, tmp_path / "complex.pt")
    with pytest.raises(CheckpointError, match="'torch.ComplexFloatStorage': tensors of that type are not converted"):
        convert_checkpoint(tmp_path / "complex.pt", tmp_path / "complex.safetensors")
    torch.save({"w": torch.ones(2), "evil": Call(os.system, f"touch {shlex.quote(str(marker))}")},
               tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refuses the global 'posix.system'"):
        convert_checkpoint(tmp_path / "evil.pt", tmp_path / "evil.safetensors")
    with pytest.raises(pickle.UnpicklingError):  # the policy torch's own weights_only loader has
        torch.load(tmp_path / "evil.pt", weights_only=True)
