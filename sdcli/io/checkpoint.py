"""A model on disk as tensor sources in canonical (diffusers) names, one per component.

Two layouts are read:

- a **diffusers folder**: ``model_index.json`` and one subfolder per component (SD: ``text_encoder/``, ``unet/``,
  ``vae/``, ``scheduler/``, ``tokenizer/``), weights in ``*.safetensors`` (or the ``*.fp16.safetensors``
  variant, or shards listed in ``*.safetensors.index.json``); names are canonical already
  (:class:`FolderSource`);
- a **single-file checkpoint** in a family's original layout (SD: CompVis/LDM): names go through an exact
  canonical -> stored map (:class:`MappedSource`), and the component configs are the shipped ones of the
  architecture the file is recognised as.

Which components a model has, how its configs are parsed and how it is recognised belong to its family
(:mod:`sdcli.families`); a :class:`Checkpoint` holds its family and asks it. The families build on the sources
here, so this module never imports them: :func:`open_checkpoint` opens a path through the recogniser
``sdcli.families`` sets when it is imported (as importing any part of sdcli does).

Pickle files (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) are refused: unpickling runs code from the file. The error
names ``sdcli convert`` (:mod:`sdcli.io.torch_pickle`), which turns one into safetensors without running any.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol

import numpy as np

from ..config import read_json
from ..errors import CheckpointError, ModelNotFoundError
from .weights import TensorSource, check_tensors  # noqa: F401 (re-exported)
from .safetensors import SafetensorsFile
from .torch_pickle import SOURCE_SUFFIXES

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
MISSING_MODEL_HINT = ("expected a diffusers folder (with model_index.json) or a single-file .safetensors "
                      "checkpoint; WEIGHTS.md says where to get the weights")


def pickle_refusal(path: Path) -> CheckpointError:
    """The error for a pickle checkpoint: why it is refused and how to convert it."""
    reason = (f"{path} is a pickle checkpoint ({path.suffix}); sdcli reads only .safetensors because loading a pickle "
              "can run arbitrary code from the file")
    if path.suffix.lower() not in SOURCE_SUFFIXES:
        return CheckpointError(f"{reason}. Download the .safetensors version of the model")
    # transformers names its pickle pytorch_model.bin and its safetensors file model.safetensors
    target = path.with_name("model.safetensors" if path.name == "pytorch_model.bin" else path.stem + ".safetensors")
    return CheckpointError(
        f"{reason}. Download the .safetensors version of the model, or convert this one once with: sdcli convert "
        f"{shlex.quote(str(path))} {shlex.quote(str(target))} (which reads only tensors, as "
        "torch.load(weights_only=True) does, runs nothing from the file and needs no torch)")


@dataclass(frozen=True)
class SourceKey:
    """Where a canonical tensor comes from in a single-file checkpoint."""

    name: str  # key in the file
    # (index, count): rows [index*n/count, (index+1)*n/count) of axis 0 (one of a fused in_proj's q, k, v)
    part: tuple[int, int] | None = None
    # reshape to this after taking the part (a (C, C, 1, 1) conv kernel -> a (C, C) linear weight); None: keep
    shape: tuple[int, ...] | None = None


NameMap = dict[str, SourceKey]


class FolderSource:
    """A diffusers component: one safetensors file or a set of shards, names used as they are.

    ``add_prefix`` accepts files written without a leading prefix (transformers 5 saves a CLIPTextModel without
    ``text_model.``); ``ignored`` names stored tensors that are deliberately not read (``position_ids``).
    """

    def __init__(self, files: list[SafetensorsFile], description: str, add_prefix: str = "",
                 ignored: Iterable[str] = ()):
        self.description = description
        self._where: dict[str, tuple[SafetensorsFile, str]] = {}
        ignored = set(ignored)
        for file in files:
            for stored in file.keys():
                name = stored if not add_prefix or stored.startswith(add_prefix) else add_prefix + stored
                if name in ignored:
                    continue
                if name in self._where:
                    raise CheckpointError(f"{description}: tensor {name!r} is stored twice")
                self._where[name] = (file, stored)

    def keys(self) -> list[str]:
        return list(self._where)

    def dtype(self, name: str) -> str:
        file, stored = self._where[name]
        return file.info(stored).dtype

    def shape(self, name: str) -> tuple[int, ...]:
        file, stored = self._where[name]
        return file.info(stored).shape

    def read(self, name: str) -> np.ndarray:
        file, stored = self._where[name]
        return file.view(stored)

    def release(self, name: str | None = None) -> None:
        if name is not None:
            file, stored = self._where[name]
            file.release(stored)
            return
        for file in {id(file): file for file, _ in self._where.values()}.values():
            file.release()

    def unexpected(self) -> list[str]:
        return []


class MappedSource:
    """A component of a single-file checkpoint, seen through an exact canonical -> stored name map."""

    def __init__(self, file: SafetensorsFile, mapping: dict[str, SourceKey], prefix: str,
                 is_extra, description: str):
        self.description = description
        self._file = file
        self._mapping = {name: key for name, key in mapping.items() if key.name in file}
        used = {key.name for key in mapping.values()}
        self._unexpected = [stored for stored in file.keys()
                            if stored.startswith(prefix) and stored not in used and not is_extra(stored)]

    def keys(self) -> list[str]:
        return list(self._mapping)

    def dtype(self, name: str) -> str:
        return self._file.info(self._mapping[name].name).dtype

    def shape(self, name: str) -> tuple[int, ...]:
        key = self._mapping[name]
        stored = self._file.info(key.name).shape
        if key.part is not None:
            index, count = key.part
            if not stored or stored[0] % count:
                return stored  # cannot be split as declared: reported as mis-shaped by the loader
            stored = (stored[0] // count, *stored[1:])
        if key.shape is not None and int(np.prod(stored)) == int(np.prod(key.shape)):
            return tuple(key.shape)
        return stored

    def read(self, name: str) -> np.ndarray:
        key = self._mapping[name]
        array = self._file.view(key.name)
        if key.part is not None:
            index, count = key.part
            rows = array.shape[0] // count
            array = array[index * rows:(index + 1) * rows]  # (rows, ...) view of the fused tensor
        if key.shape is not None:
            array = array.reshape(key.shape)
        return array

    def release(self, name: str | None = None) -> None:
        for stored in [self._mapping[name].name] if name is not None else {key.name for key in self._mapping.values()}:
            self._file.release(stored)

    def unexpected(self) -> list[str]:
        return list(self._unexpected)


class CheckpointFamily(Protocol):
    """What a checkpoint asks of its family (``sdcli.families.Family`` is one)."""

    name: str
    components: Mapping[str, str]  # weight component -> diffusers weight-file stem

    def shipped_configs(self, architecture: str) -> Path: ...

    def parse_config(self, checkpoint: "Checkpoint", component: str) -> Any: ...

    def open_source(self, checkpoint: "Checkpoint", component: str) -> TensorSource: ...


@dataclass
class Checkpoint:
    """An opened model: where it is, what it is, and how to reach each component's config and tensors.

    Made by its family's recogniser; ``model_family`` says which components it has and how to read them.
    """

    path: Path
    layout: str  # "diffusers" or "single-file"
    family: str  # the architecture, as its family names it: "sd1" or "sd2"
    prediction_type: str  # "epsilon" or "v_prediction"
    model_family: CheckpointFamily = field(repr=False, compare=False)
    variant: str | None = None
    file: SafetensorsFile | None = field(default=None, repr=False)  # the file of a single-file checkpoint
    _sources: dict[str, TensorSource] = field(default_factory=dict, repr=False, compare=False)

    @property
    def components(self) -> list[str]:
        """The weight components of the model, as its family names them."""
        return list(self.model_family.components)

    # -- configs ---------------------------------------------------------------------------------------------
    def config_dir(self, component: str) -> Path:
        """The folder of ``component``'s config: in the model, or the shipped one a single file borrows."""
        base = self.path if self.layout == "diffusers" else self.model_family.shipped_configs(self.family)
        return base / component

    def config_path(self, component: str) -> Path:
        filename = "scheduler_config.json" if component == "scheduler" else "config.json"
        return self.config_dir(component) / filename

    def component_config(self, component: str) -> dict[str, Any]:
        """``component``'s config file as it is written."""
        return read_json(self.config_path(component))

    def config(self, component: str) -> Any:
        """``component``'s config parsed by the family (SD: ClipConfig, UNetConfig, VAEConfig, SchedulerConfig)."""
        return self.model_family.parse_config(self, component)

    def unet_config(self) -> Any:
        """``config("unet")``, for the callers outside the families (scripts/bench.py)."""
        return self.config("unet")

    def vae_config(self) -> Any:
        """``config("vae")``, for the callers outside the families (the VAE loaders of sdcli.nn.vae)."""
        return self.config("vae")

    # -- tensors ---------------------------------------------------------------------------------------------
    def source(self, component: str) -> TensorSource:
        """The tensors of ``component`` (one of :attr:`components`) in canonical names. Opened once and kept, so
        that every caller reads (and releases) the same mapping."""
        if component not in self.model_family.components:
            raise CheckpointError(f"unknown component {component!r}")
        if component not in self._sources:
            self._sources[component] = self.model_family.open_source(self, component)
        return self._sources[component]

    def release(self, component: str) -> None:
        """Drop the mapped pages of ``component``'s tensors from resident memory, if it was opened."""
        if component in self._sources:
            self._sources[component].release()

    def folder_files(self, component: str) -> list[SafetensorsFile]:
        """The opened safetensors file(s) of a diffusers component (its variant honoured)."""
        folder = self.path / component
        return [SafetensorsFile(path) for path in
                component_weight_files(folder, self.model_family.components[component], self.variant)]


def component_weight_files(folder: Path, stem: str, variant: str | None) -> list[Path]:
    """The safetensors file(s) of one diffusers component, honouring ``variant`` ("fp16", ...).

    Without a variant the plain file wins, then the fp16 variant, then the bf16 one. Shards come from
    ``*.safetensors.index.json``.
    """
    if not folder.is_dir():
        raise ModelNotFoundError(f"{folder}: component folder missing from the diffusers model")
    variants = [variant] if variant else [None, "fp16", "bf16"]
    for candidate in variants:
        name = f"{stem}.{candidate}.safetensors" if candidate else f"{stem}.safetensors"
        if (folder / name).is_file():
            return [folder / name]
        index = folder / f"{name}.index.json"
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no weight_map")
            shards = sorted(set(weight_map.values()))
            for shard in shards:
                if not isinstance(shard, str) or Path(shard).name != shard:
                    raise CheckpointError(f"{index}: bad shard name {shard!r}")
            return [folder / shard for shard in shards]
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise pickle_refusal(pickles[0])
    wanted = f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors"
    raise ModelNotFoundError(f"{folder}: no weights ({wanted} is missing); {MISSING_MODEL_HINT}")


# Opens a path as the family that recognises it; set by sdcli.families (see the module docstring).
_recogniser: Callable[[Path, str | None], Checkpoint] | None = None


def set_recogniser(recognise: Callable[[Path, str | None], Checkpoint]) -> None:
    """Called once by :mod:`sdcli.families` with its ``recognise``."""
    global _recogniser
    _recogniser = recognise


def open_checkpoint(path: str | Path, variant: str | None = None) -> Checkpoint:
    """Open the diffusers folder or single-file checkpoint at ``path`` (a path: ``sdcli.open_checkpoint`` also
    resolves preset names and repo ids) as the model family that recognises it."""
    if _recogniser is None:
        raise CheckpointError("no model family is registered (import sdcli.families)")
    return _recogniser(Path(path), variant)


def describe(checkpoint: Checkpoint) -> dict[str, Any]:
    """A JSON-friendly summary of what was opened."""
    return {"path": str(checkpoint.path), "layout": checkpoint.layout, "family": checkpoint.family,
            "prediction_type": checkpoint.prediction_type}


__all__ = ["Checkpoint", "CheckpointFamily", "FolderSource", "MappedSource", "TensorSource", "check_tensors",
           "component_weight_files", "describe", "open_checkpoint", "pickle_refusal"]
