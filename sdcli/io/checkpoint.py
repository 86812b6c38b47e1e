"""Open a model on disk as tensor sources in canonical (diffusers) names.

Two layouts are read:

- a **diffusers folder**: ``model_index.json`` and one subfolder per component (``text_encoder/``, ``unet/``,
  ``vae/``, ``scheduler/``, ``tokenizer/``), weights in ``*.safetensors`` (or the ``*.fp16.safetensors``
  variant, or shards listed in ``*.safetensors.index.json``); names are canonical already;
- a **single-file checkpoint** in the original (CompVis/LDM) layout: ``model.diffusion_model.*``,
  ``first_stage_model.*`` and ``cond_stage_model.transformer.*`` (SD1) or ``cond_stage_model.model.*``
  (SD2's OpenCLIP); names go through the exact maps of :mod:`sdcli.io.names`, and the component configs are
  the shipped ones of the family the file is sniffed to be.

Pickle files (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) are refused: unpickling runs code from the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol

import numpy as np

from ..config import ClipConfig, SchedulerConfig, UNetConfig, VAEConfig, preset_config_dir, read_json
from ..errors import CheckpointError, ModelNotFoundError
from . import names
from .safetensors import SafetensorsFile

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
FAMILY_PRESET = {"sd1": "sd15", "sd2": "sd21"}
COMPONENT_WEIGHT_STEMS = {"text_encoder": "model", "unet": "diffusion_pytorch_model",
                          "vae": "diffusion_pytorch_model"}
SINGLE_FILE_PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
                        "text_encoder": "cond_stage_model."}
# Single-file tensors that mark a newer family sdcli does not read yet.
UNSUPPORTED_MARKERS = {"conditioner.embedders.": "SDXL", "model.diffusion_model.joint_blocks.": "SD3",
                       "double_blocks.": "FLUX"}
# ComfyUI's heuristic for SD2 single files that carry no prediction-type marker: the v-prediction 768 models
# have visibly spread-out biases in this layer norm, the epsilon 512 "base" models do not.
V_PREDICTION_SENTINEL = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
V_PREDICTION_STD = 0.09
MISSING_MODEL_HINT = ("expected a diffusers folder (with model_index.json) or a single-file .safetensors "
                      "checkpoint; WEIGHTS.md says where to get the weights")


def pickle_refusal(path: Path) -> CheckpointError:
    """The error for a pickle checkpoint: why it is refused and how to convert it."""
    return CheckpointError(
        f"{path} is a pickle checkpoint ({path.suffix}); sdcli reads only .safetensors because loading a pickle "
        "can run arbitrary code from the file. Download the .safetensors version of the model, or convert it "
        "once where you trust it: python -c \"import torch, safetensors.torch as s; "
        f"d = torch.load('{path.name}', map_location='cpu', weights_only=True); "
        f"s.save_file({{k: v.contiguous() for k, v in d.get('state_dict', d).items()}}, "
        f"'{path.with_suffix('.safetensors').name}')\"")


class TensorSource(Protocol):
    """Tensors of one component by canonical name, as stored (BF16 as uint16 bits)."""

    description: str

    def keys(self) -> list[str]: ...

    def dtype(self, name: str) -> str: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str) -> np.ndarray: ...

    def unexpected(self) -> list[str]: ...

    def release(self, name: str | None = None) -> None:
        """Drop the pages of tensor ``name`` (of every tensor when None) from resident memory; reads still work."""


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

    def __init__(self, file: SafetensorsFile, mapping: dict[str, names.SourceKey], prefix: str,
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


def check_tensors(source: TensorSource, expected: dict[str, tuple[int, ...]]) -> None:
    """Strict check: every expected tensor present with its shape, nothing else. Raises naming each tensor."""
    present = set(source.keys())
    missing = [name for name in expected if name not in present]
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


@dataclass
class Checkpoint:
    """An opened model: where it is, what it is, and how to reach each component's config and tensors."""

    path: Path
    layout: str  # "diffusers" or "single-file"
    family: str  # "sd1" or "sd2"
    prediction_type: str  # "epsilon" or "v_prediction"
    variant: str | None = None
    _file: SafetensorsFile | None = field(default=None, repr=False)
    _sources: dict[str, TensorSource] = field(default_factory=dict, repr=False, compare=False)

    # -- configs ---------------------------------------------------------------------------------------------
    def config_dir(self, component: str) -> Path:
        base = self.path if self.layout == "diffusers" else preset_config_dir(FAMILY_PRESET[self.family])
        return base / component

    def component_config(self, component: str) -> dict[str, Any]:
        filename = "scheduler_config.json" if component == "scheduler" else "config.json"
        return read_json(self.config_dir(component) / filename)

    def text_encoder_config(self) -> ClipConfig:
        path = self.config_dir("text_encoder") / "config.json"
        return ClipConfig.from_diffusers(read_json(path), source=str(path))

    def unet_config(self) -> UNetConfig:
        path = self.config_dir("unet") / "config.json"
        return UNetConfig.from_diffusers(read_json(path), source=str(path))

    def scheduler_config(self) -> SchedulerConfig:
        path = self.config_dir("scheduler") / "scheduler_config.json"
        data = dict(read_json(path))
        if self.layout == "single-file":
            data["prediction_type"] = self.prediction_type
        return SchedulerConfig.from_diffusers(data, source=str(path))

    def vae_config(self) -> VAEConfig:
        path = self.config_dir("vae") / "config.json"
        return VAEConfig.from_diffusers(read_json(path), source=str(path))

    def tokenizer_dir(self) -> Path:
        return self.config_dir("tokenizer")

    # -- tensors ---------------------------------------------------------------------------------------------
    def source(self, component: str) -> TensorSource:
        """The tensors of ``component`` ("text_encoder", "unet" or "vae") in canonical names. Opened once and
        kept, so that every caller reads (and releases) the same mapping."""
        if component not in COMPONENT_WEIGHT_STEMS:
            raise CheckpointError(f"unknown component {component!r}")
        if component not in self._sources:
            self._sources[component] = (self._folder_source(component) if self.layout == "diffusers"
                                         else self._mapped_source(component))
        return self._sources[component]

    def release(self, component: str) -> None:
        """Drop the mapped pages of ``component``'s tensors from resident memory, if it was opened."""
        if component in self._sources:
            self._sources[component].release()

    def _folder_source(self, component: str) -> FolderSource:
        folder = self.path / component
        files = component_weight_files(folder, COMPONENT_WEIGHT_STEMS[component], self.variant)
        opened = [SafetensorsFile(path) for path in files]
        description = str(folder)
        if component == "text_encoder":
            return FolderSource(opened, description, add_prefix="text_model.",
                                ignored=["text_model.embeddings.position_ids"])
        return FolderSource(opened, description)

    def _mapped_source(self, component: str) -> MappedSource:
        assert self._file is not None
        config = self.component_config(component)
        layers = None
        if component == "text_encoder":
            layers = int(config["num_hidden_layers"])
            build = names.text_encoder_openclip_names if self.family == "sd2" else names.text_encoder_sd1_names
            mapping = build(config)
        elif component == "unet":
            mapping = names.unet_names(config)
        else:
            mapping = names.vae_names(config)
        return MappedSource(self._file, mapping, SINGLE_FILE_PREFIXES[component],
                            lambda stored: names.is_known_extra(stored, layers),
                            f"{self.path} ({component})")


def component_weight_files(folder: Path, stem: str, variant: str | None) -> list[Path]:
    """The safetensors file(s) of one diffusers component, honouring ``variant`` ("fp16", ...).

    Without a variant the plain file wins, then the fp16 variant. Shards come from ``*.safetensors.index.json``.
    """
    if not folder.is_dir():
        raise ModelNotFoundError(f"{folder}: component folder missing from the diffusers model")
    variants = [variant] if variant else [None, "fp16"]
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


WEIGHTS_ENV = "SDCLI_WEIGHTS"


def weights_dir() -> Path:
    """Where named models live: ``$SDCLI_WEIGHTS``, else ``./weights``."""
    return Path(os.environ.get(WEIGHTS_ENV) or "weights").expanduser()


def find_model(model: str | Path) -> Path:
    """The path ``model`` names, never downloading: an existing file or folder as given, else a preset, a Hub
    repo id or a folder name looked up in :func:`weights_dir` and the Hugging Face cache
    (:func:`sdcli.models.resolve_model`, the one place that order is written). A model found nowhere raises
    ModelNotFoundError; for a preset or repo id the message names the ``sdcli download`` command."""
    from ..models import resolve_model

    return resolve_model(model)


def open_checkpoint(path: str | Path, variant: str | None = None) -> Checkpoint:
    """Open a diffusers folder or a single-file checkpoint, sniffing its family and prediction type."""
    path = find_model(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise pickle_refusal(path)
    if not path.exists():
        where = f" (nor at {weights_dir() / path})" if len(path.parts) == 1 and not path.is_absolute() else ""
        raise ModelNotFoundError(f"no model at {path}{where}: {MISSING_MODEL_HINT}")
    if path.is_dir():
        return _open_folder(path, variant)
    if path.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{path}: not a .safetensors file; {MISSING_MODEL_HINT}")
    return _open_single_file(path)


def _open_folder(path: Path, variant: str | None) -> Checkpoint:
    if not (path / "model_index.json").is_file():
        if (path / "config.json").is_file():
            raise CheckpointError(f"{path} looks like one component of a model, not a whole diffusers model "
                                  f"(no model_index.json); point --model at the folder above it")
        raise ModelNotFoundError(f"no model at {path} (no model_index.json): {MISSING_MODEL_HINT}")
    read_json(path / "model_index.json")
    text = read_json(path / "text_encoder" / "config.json")
    family = "sd2" if int(text.get("hidden_size", 768)) == 1024 else "sd1"
    scheduler_path = path / "scheduler" / "scheduler_config.json"
    prediction = read_json(scheduler_path).get("prediction_type", "epsilon") if scheduler_path.is_file() \
        else "epsilon"
    return Checkpoint(path=path, layout="diffusers", family=family, prediction_type=prediction, variant=variant)


def _open_single_file(path: Path) -> Checkpoint:
    file = SafetensorsFile(path)
    keys = file.keys()
    for marker, family in UNSUPPORTED_MARKERS.items():
        if any(key.startswith(marker) for key in keys):
            raise CheckpointError(f"{path}: this is a {family} checkpoint; sdcli reads SD 1.x and 2.x so far")
    if any(key.startswith("cond_stage_model.model.") for key in keys):
        family = "sd2"
    elif any(key.startswith("cond_stage_model.transformer.") for key in keys):
        family = "sd1"
    else:
        family = _family_from_unet(file, path)
    return Checkpoint(path=path, layout="single-file", family=family,
                      prediction_type=_sniff_prediction_type(file, family), _file=file)


def _family_from_unet(file: SafetensorsFile, path: Path) -> str:
    """SD1 or SD2 from the cross-attention width when the file has no text encoder."""
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    if key not in file:
        raise CheckpointError(f"{path}: not a Stable Diffusion 1.x/2.x checkpoint (no cond_stage_model.* "
                              "or model.diffusion_model.* tensors)")
    width = file.info(key).shape[-1]
    if width not in (768, 1024):
        raise CheckpointError(f"{path}: unknown cross-attention width {width} (SD1 uses 768, SD2 1024)")
    return "sd1" if width == 768 else "sd2"


def _sniff_prediction_type(file: SafetensorsFile, family: str) -> str:
    """epsilon for SD1; for SD2 a ``v_pred`` marker tensor, else the layer-norm spread heuristic."""
    if family == "sd1":
        return "epsilon"
    if "v_pred" in file:
        return "v_prediction"
    conv_in = "model.diffusion_model.input_blocks.0.0.weight"
    if conv_in in file and file.info(conv_in).shape[1] != 4:
        return "epsilon"  # inpainting/depth models take extra input channels and predict noise
    if V_PREDICTION_SENTINEL not in file:
        return "v_prediction"  # no UNet to judge by: SD2.x's flagship 768 models are v-prediction
    bias = file.float32(V_PREDICTION_SENTINEL)
    return "v_prediction" if float(np.std(bias)) > V_PREDICTION_STD else "epsilon"


def describe(checkpoint: Checkpoint) -> dict[str, Any]:
    """A JSON-friendly summary of what was opened."""
    return {"path": str(checkpoint.path), "layout": checkpoint.layout, "family": checkpoint.family,
            "prediction_type": checkpoint.prediction_type}


__all__ = ["Checkpoint", "FolderSource", "MappedSource", "TensorSource", "check_tensors", "component_weight_files",
           "describe", "open_checkpoint", "pickle_refusal"]
