"""Model families: everything sdcli knows about one kind of model, behind a small registry.

A family says how its checkpoints are recognised (a diffusers folder or a single ``.safetensors`` file), parses
their configs, maps their single-file tensor names to canonical ones, lists its presets, and names the stages its
pipelines run (text encoder, denoising network, image decoder) with its latent geometry. The rest of sdcli asks
the registry: opening a checkpoint (:func:`recognise`), model lookup and downloads (``sdcli.models``), the
pipelines (``sdcli.pipelines``) and the CLI's latents checks.

Adding a model family
---------------------
1. Write ``sdcli/families/<name>.py`` (``sd.py`` is the example) ending in ``FAMILY = Family(...)`` with:

   - ``recognise_folder(path, variant)`` and ``recognise_file(file, path)``: a :class:`~sdcli.io.checkpoint.Checkpoint`
     for a diffusers folder or an opened single file that is the family's, None for one that is not (raise a
     ``CheckpointError`` for one that is but cannot be read);
   - ``components`` (each weight component and its diffusers file stem), ``shipped_configs(architecture)``,
     ``parse_config(checkpoint, component)`` and ``open_source(checkpoint, component)``: configs and canonical
     tensor names (a single file through an exact map, as :mod:`sdcli.families.sd_names` writes them);
   - its presets, the files a diffusers download fetches, ``latents`` (a :class:`LatentGeometry`), and ``image``
     (an :class:`ImageStages`): one loader per network, the only code that calls that network's constructor in
     ``sdcli.nn``, and what the pipeline asks around them (``sdcli.pipelines.image`` lists it).

2. Register it at the bottom of this file with one line, above sd's:
   ``register(import_module("sdcli.families.<name>").FAMILY)``. Families are asked in registration order, and sd
   reads any diffusers folder the ones before it leave.

Nothing else changes: a single file that carries one of :data:`NOT_YET_READ`'s markers is refused by name only
while no family of that name is registered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any, Callable, Mapping

from ..config import read_json
from ..errors import CheckpointError, ModelNotFoundError
from ..io import checkpoint as checkpoint_io
from ..io.checkpoint import MISSING_MODEL_HINT, PICKLE_SUFFIXES, Checkpoint, TensorSource, pickle_refusal
from ..io.safetensors import SafetensorsFile

HUB_PAGES = "https://huggingface.co"  # where a repository's page (model card, license, files) is

# Single-file tensors that mark a family sdcli does not read yet, and its name.
NOT_YET_READ = {"conditioner.embedders.": "SDXL", "model.diffusion_model.joint_blocks.": "SD3",
                "double_blocks.": "FLUX"}


@dataclass(frozen=True)
class ModelPreset:
    """A named model: the Hub repository and the files of it that sdcli reads.

    ``size_bytes`` is approximate: the sum of the sizes the Hub lists for the selected files (with the preset's
    variant), rounded; None when not known. ``files`` are fnmatch patterns on repository paths; for a diffusers
    preset the weight globs match the plain and the variant files and ``variant`` says which the download keeps.
    ``also_cached_as`` names other repositories holding the same files, whose Hugging Face cache snapshots count
    as this preset (the repository a model was first published in, before it moved).
    """

    name: str
    repo_id: str
    revision: str
    layout: str  # "diffusers" or "single-file"
    files: tuple[str, ...]
    variant: str | None  # "fp16" or None (the plain weights)
    family: str  # the architecture, as its family names it ("sd1", "sd2")
    size_bytes: int | None
    license: str
    description: str
    page: str
    also_cached_as: tuple[str, ...] = field(default=())

    @property
    def filename(self) -> str:
        """The checkpoint file of a single-file preset."""
        if self.layout != "single-file" or len(self.files) != 1:
            raise ValueError(f"{self.name} is not a single-file preset")
        return self.files[0]


@dataclass(frozen=True)
class LatentGeometry:
    """The latents a family's denoiser works on: ``channels`` per pixel, ``downscale`` image pixels per latent
    pixel along each side (SD: 4 channels, 8x smaller than the image)."""

    channels: int
    downscale: int

    def shape(self, width: int, height: int) -> tuple[int, int, int]:
        """(C, h, w) of one image of ``width`` x ``height`` pixels."""
        return (self.channels, height // self.downscale, width // self.downscale)

    def image_size(self, latents_shape: tuple[int, ...]) -> tuple[int, int]:
        """(width, height) in pixels of latents of shape (..., h, w)."""
        return latents_shape[-1] * self.downscale, latents_shape[-2] * self.downscale

    def describe(self) -> str:
        """``(images, 4, height/8, width/8)``: the shape of a latents file, for messages."""
        return f"(images, {self.channels}, height/{self.downscale}, width/{self.downscale})"


@dataclass(frozen=True)
class ImageStages:
    """What text to image runs for a family: a loader per stage and what the pipeline asks around them (see
    :mod:`sdcli.pipelines.image`). ``*_component`` names the checkpoint component each stage reads, whose mapped
    pages the pipeline releases when the next stage starts."""

    # (checkpoint, ops, precision[, embeddings]) -> prompt encoder; embeddings: textual inversions, passed only when
    # some are asked for
    load_prompt_encoder: Callable[..., Any]
    # (checkpoint, ops, precision, stream[, loras]) -> network(x_in, timesteps, context); loras: (LoRA, scale) pairs
    # merged into its weights, passed only when some are asked for
    load_denoiser: Callable[..., Any]
    load_decoder: Callable[..., Any]  # (checkpoint, ops, precision, vae, tiling, stream) -> decoder(latents)
    load_preview_decoder: Callable[..., Any]  # (ops) -> decoder(latents), cheap enough for previews
    scheduler_config: Callable[[Checkpoint], dict[str, Any]]  # the raw diffusers config, prediction type set
    native_size: Callable[[Any], int]  # (network) -> the image side it was trained at
    check_memory: Callable[..., None]  # (network, decoder, resolved params, backend) -> raises when it won't fit
    unload: Callable[[Any], None]  # (network) -> drop what its layers prepared
    text_component: str
    denoiser_component: str
    decoder_component: str
    # Runs from an init image: (checkpoint, ops, precision) -> encoder with ``distribution(images (B, 3, H, W))`` ->
    # (mean, logvar) (B, C, h, w) and ``scaling_factor``; and (network) -> its input channels (9: an inpainting
    # UNet). None: the family starts from noise only.
    load_image_encoder: Callable[..., Any] | None = None
    input_channels: Callable[[Any], int] | None = None


@dataclass(frozen=True)
class Family:
    """One model family (see the module docstring for what each part is for)."""

    name: str  # the registry key ("sd")
    title: str  # in messages: "is not a diffusers Stable Diffusion model"
    reads: str  # in messages: "sdcli reads SD 1.x and 2.x so far"
    file_hint: str  # in messages: "not <file_hint>" for a single file no family recognises
    architectures: tuple[str, ...]  # what Checkpoint.family and ModelPreset.family name ("sd1", "sd2")
    components: Mapping[str, str]  # weight component -> diffusers weight-file stem
    diffusers_configs: tuple[str, ...]  # the config files a whole diffusers model holds
    diffusers_files: tuple[str, ...]  # fnmatch patterns of every file sdcli reads from a diffusers repository
    presets: tuple[ModelPreset, ...]
    precisions: tuple[str, ...]  # what its networks can hold weights as
    latents: LatentGeometry
    image: ImageStages | None  # None: a family that makes no images (Wan makes videos)
    recognise_folder: Callable[[Path, str | None], Checkpoint | None]
    recognise_file: Callable[[SafetensorsFile, Path], Checkpoint | None]
    shipped_configs: Callable[[str], Path]  # architecture -> the config folders a single file borrows
    parse_config: Callable[[Checkpoint, str], Any]
    open_source: Callable[[Checkpoint, str], TensorSource]


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> None:
    """Add ``family`` to the registry (asked after the ones registered before it)."""
    if family.name in FAMILIES:
        raise ValueError(f"model family {family.name!r} is registered twice")
    FAMILIES[family.name] = family


def family_of(architecture: str) -> Family:
    """The family that reads ``architecture`` (a ``Checkpoint.family`` or ``ModelPreset.family`` value)."""
    for family in FAMILIES.values():
        if architecture in family.architectures:
            return family
    raise CheckpointError(f"no model family reads {architecture!r}")


def recognise(path: str | Path, variant: str | None = None) -> Checkpoint:
    """Open the diffusers folder or single ``.safetensors`` file at ``path`` as the family that recognises it.

    ``path`` is a path (``sdcli.open_checkpoint`` also takes preset names and repo ids). Pickles are refused, and a
    single file of a family sdcli does not read yet is named.
    """
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise pickle_refusal(path)
    if not path.exists():
        raise ModelNotFoundError(f"no model at {path}: {MISSING_MODEL_HINT}")
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            if (path / "config.json").is_file():
                raise CheckpointError(f"{path} looks like one component of a model, not a whole diffusers model "
                                      f"(no model_index.json); point --model at the folder above it")
            raise ModelNotFoundError(f"no model at {path} (no model_index.json): {MISSING_MODEL_HINT}")
        read_json(path / "model_index.json")
        for family in FAMILIES.values():
            checkpoint = family.recognise_folder(path, variant)
            if checkpoint is not None:
                return checkpoint
        raise CheckpointError(f"{path}: no model family of sdcli reads this diffusers model")
    if path.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{path}: not a .safetensors file; {MISSING_MODEL_HINT}")
    file = SafetensorsFile(path)
    keys = file.keys()
    for marker, name in NOT_YET_READ.items():
        if name.lower() not in FAMILIES and any(key.startswith(marker) for key in keys):
            reads = " and ".join(family.reads for family in FAMILIES.values())
            raise CheckpointError(f"{path}: this is a {name} checkpoint; sdcli reads {reads} so far")
    for family in FAMILIES.values():
        checkpoint = family.recognise_file(file, path)
        if checkpoint is not None:
            return checkpoint
    raise CheckpointError(f"{path}: not {' nor '.join(family.file_hint for family in FAMILIES.values())}")


# -- the registry: one line per family ---------------------------------------------------------------------------

register(import_module("sdcli.families.wan").FAMILY)  # Wan2.1: WanPipeline folders only
register(import_module("sdcli.families.sd").FAMILY)  # SD 1.x and 2.x: reads any diffusers folder, so last

checkpoint_io.set_recogniser(recognise)  # sdcli.io.checkpoint.open_checkpoint opens paths through the families

__all__ = ["FAMILIES", "Family", "HUB_PAGES", "ImageStages", "LatentGeometry", "ModelPreset", "NOT_YET_READ",
           "family_of", "recognise", "register"]
