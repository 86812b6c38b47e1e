"""AnimateDiff motion adapters: opening them in each of their layouts and loading their network.

An adapter comes as
- a diffusers ``MotionAdapter`` folder: ``config.json`` and ``diffusion_pytorch_model[.fp16].safetensors``
  (guoyww/animatediff-motion-adapter-v1-5-2, -v1-5-3, wangfuyun/AnimateLCM);
- one ``.safetensors`` file in diffusers names (AnimateDiff-Lightning's ``*_diffusers.safetensors``);
- one ``.safetensors`` file in the original code's names (``mm_sd_v15_v2.safetensors``, ``v3_sd15_mm``
  conversions), read through the exact map of :mod:`sdcli.families.animatediff_names`.

A single file carries no config: its layout is read from its tensors (channels and layers per level, transformer
layers per module, the mid block, the frame table's length). The head count is not stored anywhere in the
tensors; every published SD 1.x adapter uses 8, diffusers' default, which a file is assumed to use too. Pickled
``.ckpt`` / ``.pt`` files are refused with the conversion command.

The adapters published for SD 1.5 are named here as presets (:data:`PRESETS`), which ``sdcli download`` fetches
like model presets and ``--motion-adapter`` resolves like ``--model`` (``sdcli.models``). Each preset carries the
settings its authors generate with (:class:`VideoDefaults`): sampler, scheduler overrides, steps and guidance.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..config import MotionAdapterConfig, UNetConfig, read_json
from ..errors import CheckpointError, ModelNotFoundError
from ..io.checkpoint import PICKLE_SUFFIXES, FolderSource, MappedSource, component_weight_files, pickle_refusal
from ..io.safetensors import SafetensorsFile
from ..io.weights import TensorSource, load_network
from ..nn.motion import CONTEXT_WEIGHTINGS, MotionAdapter, UNetMotionModel  # noqa: F401 (the weightings: public)
from ..ops import Ops
from . import HUB_PAGES, ModelPreset
from .animatediff_names import is_position_table, motion_adapter_names

ADAPTER_STEM = "diffusion_pytorch_model"
# What sdcli reads from a diffusers MotionAdapter repository (its files sit at the repository root): the config and
# one safetensors file (plain or fp16 variant, or shards and their index; the Hub's file selection keeps the
# variant asked for where the repository has it, as for a model's networks).
ADAPTER_FILES = ("config.json", f"{ADAPTER_STEM}*.safetensors", f"{ADAPTER_STEM}*.safetensors.index*.json")
DEFAULT_HEADS = 8  # diffusers' MotionAdapter default and every published SD 1.x adapter's
DEFAULT_MAX_FRAMES = 32  # diffusers' motion_max_seq_length default, for files that store no position table

# a module's input projection, in either layout: (scope, level, layer) -> (C, C)
_PROJ_IN = re.compile(r"(?P<scope>down_blocks|up_blocks|mid_block)\.(?:(?P<level>\d+)\.)?motion_modules\."
                      r"(?P<layer>\d+)\.(?:temporal_transformer\.)?proj_in\.weight")
_BLOCK = re.compile(r"(?P<module>.+\.motion_modules\.\d+)\.(?:temporal_transformer\.)?transformer_blocks\."
                    r"(?P<block>\d+)\.")
_TABLE = re.compile(r".+\.(?:pos_embed|pos_encoder)\.pe")


# -- presets ------------------------------------------------------------------------------------------------------

# The scheduler settings of diffusers' AnimateDiff examples (DDIMScheduler.from_pretrained(model, subfolder=
# "scheduler", clip_sample=False, timestep_spacing="linspace", beta_schedule="linear", steps_offset=1)), laid over
# the model's own scheduler config.
ANIMATEDIFF_SCHEDULER = {"beta_schedule": "linear", "clip_sample": False, "timestep_spacing": "linspace",
                         "steps_offset": 1}


@dataclass(frozen=True)
class VideoDefaults:
    """What a clip is made with where the caller does not say: the sampler, the settings laid over the model's
    scheduler config (``scheduler``), the steps (None: the sampler's own default, 50; LCM 4) and the guidance
    scale."""

    sampler: str
    scheduler: Mapping[str, Any] = field(default_factory=dict, hash=False)
    steps: int | None = None
    guidance_scale: float = 7.5


# AnimateDiff as diffusers' examples run it: DDIM over linear betas, guidance 7.5. An adapter that is no preset (a
# path, a repo id) gets these.
ANIMATEDIFF_DEFAULTS = VideoDefaults("ddim", ANIMATEDIFF_SCHEDULER, steps=None, guidance_scale=7.5)


@dataclass(frozen=True)
class MotionAdapterPreset(ModelPreset):
    """A named motion adapter: the Hub repository and the files of it that sdcli reads (as a model preset), what
    to generate with (``defaults``) and, for an adapter trained with a LoRA of the image model, which of its files
    that LoRA is and the scale its authors merge it at.

    ``layout`` is "motion-adapter" (a diffusers MotionAdapter: ``config.json`` and ``diffusion_pytorch_model``
    weights at the repository root) or "single-file" (one ``.safetensors`` file, its layout read from its
    tensors); ``family`` is the architecture of the UNet the adapter animates.
    """

    defaults: VideoDefaults = ANIMATEDIFF_DEFAULTS
    lora: str | None = None  # a file of the preset: a LoRA for the image model's UNet, fetched with the adapter
    lora_scale: float | None = None


AD_LICENSE = "Apache-2.0 (AnimateDiff)"  # the AnimateDiff code's; the adapter repositories on the Hub state none
LIGHTNING_FILE = "animatediff_lightning_4step_diffusers.safetensors"
ANIMATELCM_LORA = "AnimateLCM_sd15_t2v_lora.safetensors"

# Sizes as the Hub lists the files fetched. guoyww's ".fp16" files are as large as the plain ones (float32 despite
# the name), so those presets fetch the plain file.
PRESETS = (
    MotionAdapterPreset(
        name="animatediff-v1-5-2", repo_id="guoyww/animatediff-motion-adapter-v1-5-2", revision="main",
        layout="motion-adapter", files=ADAPTER_FILES, variant=None, family="sd1", size_bytes=1_820_000_000,
        license=AD_LICENSE, page=f"{HUB_PAGES}/guoyww/animatediff-motion-adapter-v1-5-2",
        description="AnimateDiff v2 motion modules for SD 1.5 (mm_sd_v15_v2): up to 32 frames, with a mid-block "
                    "module"),
    MotionAdapterPreset(
        name="animatediff-v1-5-3", repo_id="guoyww/animatediff-motion-adapter-v1-5-3", revision="main",
        layout="motion-adapter", files=ADAPTER_FILES, variant=None, family="sd1", size_bytes=1_670_000_000,
        license=AD_LICENSE, page=f"{HUB_PAGES}/guoyww/animatediff-motion-adapter-v1-5-3",
        description="AnimateDiff v3 motion modules for SD 1.5 (v3_sd15_mm): up to 32 frames, no mid-block module"),
    # The model card: EulerDiscreteScheduler.from_config(..., timestep_spacing="trailing", beta_schedule="linear"),
    # guidance_scale=1.0 and as many steps as the file was distilled for.
    MotionAdapterPreset(
        name="animatediff-lightning", repo_id="ByteDance/AnimateDiff-Lightning", revision="main",
        layout="single-file", files=(LIGHTNING_FILE,), variant=None, family="sd1", size_bytes=908_000_000,
        license="CreativeML OpenRAIL-M", page=f"{HUB_PAGES}/ByteDance/AnimateDiff-Lightning",
        description="AnimateDiff-Lightning (Lin and Yang 2024), the v2 motion modules distilled for 4 steps, "
                    "diffusers names, fp16",
        defaults=VideoDefaults("euler", {"timestep_spacing": "trailing", "beta_schedule": "linear"}, steps=4,
                               guidance_scale=1.0)),
    # diffusers' AnimateLCM example: LCMScheduler.from_config(..., beta_schedule="linear"), guidance_scale=1.5,
    # num_inference_steps=6; the model card merges the LoRA with set_adapters(["lcm-lora"], [0.8]).
    MotionAdapterPreset(
        name="animatelcm", repo_id="wangfuyun/AnimateLCM", revision="main", layout="motion-adapter",
        files=ADAPTER_FILES + (ANIMATELCM_LORA,), variant="fp16", family="sd1", size_bytes=1_043_000_000,
        license="not stated", page=f"{HUB_PAGES}/wangfuyun/AnimateLCM",
        description="AnimateLCM (Wang et al. 2024): motion modules and an SD 1.5 LoRA distilled by consistency "
                    "learning for 4 to 8 LCM steps",
        defaults=VideoDefaults("lcm", {"beta_schedule": "linear"}, steps=6, guidance_scale=1.5),
        lora=ANIMATELCM_LORA, lora_scale=0.8),
)


# -- opening an adapter -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OpenedAdapter:
    """A motion adapter opened for loading: where it is, its layout and config, its tensors in canonical names, and
    the preset it is (None for an adapter that is none)."""

    path: Path
    layout: str  # "diffusers" (a folder), "diffusers-file" or "original-file"
    config: MotionAdapterConfig
    source: TensorSource
    preset: MotionAdapterPreset | None = None

    @property
    def defaults(self) -> VideoDefaults:
        """The preset's settings, or AnimateDiff's for an adapter that is no preset."""
        return self.preset.defaults if self.preset is not None else ANIMATEDIFF_DEFAULTS

    @property
    def lora_path(self) -> Path | None:
        """Where the preset's LoRA file lies: beside the adapter's weights (None when the preset has none)."""
        if self.preset is None or self.preset.lora is None:
            return None
        return (self.path if self.path.is_dir() else self.path.parent) / self.preset.lora


def open_motion_adapter(path: str | Path, variant: str | None = None,
                        preset: MotionAdapterPreset | None = None) -> OpenedAdapter:
    """The adapter at ``path`` (a diffusers folder or a ``.safetensors`` file), or a one-line error. ``preset``:
    the preset it is, when known (``sdcli.models.open_motion_adapter`` resolves names and knows)."""
    path = Path(path)
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise ModelNotFoundError(f"{path}: not a diffusers motion adapter (no config.json)")
        data = read_json(config_path)
        kind = data.get("_class_name")
        if kind is not None and kind != "MotionAdapter":
            raise CheckpointError(f"{path}: a diffusers {kind}, not a motion adapter (MotionAdapter)")
        config = MotionAdapterConfig.from_diffusers(data, source=str(config_path))
        files = [SafetensorsFile(file) for file in component_weight_files(path, ADAPTER_STEM, variant)]
        return OpenedAdapter(path, "diffusers", config, FolderSource(files, str(path)), preset)
    if path.suffix in PICKLE_SUFFIXES:
        raise pickle_refusal(path)
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: no such motion adapter (a diffusers folder or a .safetensors file)")
    file = SafetensorsFile(path)
    keys = file.keys()
    if not any(_PROJ_IN.fullmatch(key) for key in keys):
        raise CheckpointError(f"{path}: not a motion adapter (no motion-module tensors)")
    original = any(".temporal_transformer." in key for key in keys)
    config = _config_from_tensors(file, str(path))
    if original:
        source: TensorSource = MappedSource(file, motion_adapter_names(config), "", is_position_table, str(path))
        return OpenedAdapter(path, "original-file", config, source, preset)
    return OpenedAdapter(path, "diffusers-file", config, FolderSource([file], str(path)), preset)


def _config_from_tensors(file: SafetensorsFile, description: str) -> MotionAdapterConfig:
    """An adapter's layout from the names and shapes of its tensors (either naming)."""
    modules: dict[tuple[str, int], dict[int, int]] = {}  # (scope, level) -> {layer: channels}
    for key in file.keys():
        if match := _PROJ_IN.fullmatch(key):
            level = int(match["level"]) if match["level"] is not None else 0
            modules.setdefault((match["scope"], level), {})[int(match["layer"])] = file.info(key).shape[0]
    blocks: dict[str, set[int]] = {}  # module -> its transformer blocks
    for key in file.keys():
        if match := _BLOCK.match(key):
            blocks.setdefault(match["module"], set()).add(int(match["block"]))
    tables = [file.info(key).shape for key in file.keys() if _TABLE.fullmatch(key)]
    levels = sum(1 for scope, _ in modules if scope == "down_blocks")
    try:
        down = [modules[("down_blocks", level)] for level in range(levels)]
        channels = [layers[0] for layers in down]
        depth = [len(blocks[f"down_blocks.{level}.motion_modules.0"]) for level in range(levels)]
        data = {
            "block_out_channels": channels,
            "motion_layers_per_block": [len(layers) for layers in down],
            "motion_transformer_layers_per_block": depth,
            "use_motion_mid_block": ("mid_block", 0) in modules,
            "motion_num_attention_heads": DEFAULT_HEADS,
            "motion_max_seq_length": tables[0][1] if tables else DEFAULT_MAX_FRAMES,
        }
        if ("mid_block", 0) in modules:
            data["motion_mid_block_layers_per_block"] = len(modules[("mid_block", 0)])
            data["motion_transformer_layers_per_mid_block"] = len(blocks["mid_block.motion_modules.0"])
    except (KeyError, IndexError):
        raise CheckpointError(f"{description}: the motion modules are incomplete (a level or layer is missing)") \
            from None
    return MotionAdapterConfig.from_diffusers(data, source=description)


def load_motion_adapter(adapter: OpenedAdapter, unet: UNetConfig, ops: Ops, precision: str = "fp32",
                        stream: bool = False) -> MotionAdapter:
    """The adapter's network for a UNet of config ``unet`` (a one-line error for an adapter of another layout),
    its weights held at ``precision``; ``stream``: see :func:`~sdcli.io.weights.load_network`."""
    config = adapter.config.for_unet(unet, source=str(adapter.path))
    return load_network(lambda params: MotionAdapter(params, config), adapter.source, ops, precision, stream=stream)


def load_motion_unet(unet, adapter: OpenedAdapter, ops: Ops, precision: str = "fp32",
                     stream: bool = False) -> UNetMotionModel:
    """An SD 1.x UNet network (loaded by the sd family) with the adapter's motion modules."""
    return UNetMotionModel(unet, load_motion_adapter(adapter, unet.config, ops, precision, stream))
