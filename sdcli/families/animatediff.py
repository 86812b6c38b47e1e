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
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..config import MotionAdapterConfig, UNetConfig, read_json
from ..errors import CheckpointError, ModelNotFoundError
from ..io.checkpoint import PICKLE_SUFFIXES, FolderSource, MappedSource, component_weight_files, pickle_refusal
from ..io.safetensors import SafetensorsFile
from ..io.weights import TensorSource, load_network
from ..nn.motion import CONTEXT_WEIGHTINGS, MotionAdapter, UNetMotionModel  # noqa: F401 (the weightings: public)
from ..ops import Ops
from .animatediff_names import is_position_table, motion_adapter_names

ADAPTER_STEM = "diffusion_pytorch_model"
DEFAULT_HEADS = 8  # diffusers' MotionAdapter default and every published SD 1.x adapter's
DEFAULT_MAX_FRAMES = 32  # diffusers' motion_max_seq_length default, for files that store no position table

# a module's input projection, in either layout: (scope, level, layer) -> (C, C)
_PROJ_IN = re.compile(r"(?P<scope>down_blocks|up_blocks|mid_block)\.(?:(?P<level>\d+)\.)?motion_modules\."
                      r"(?P<layer>\d+)\.(?:temporal_transformer\.)?proj_in\.weight")
_BLOCK = re.compile(r"(?P<module>.+\.motion_modules\.\d+)\.(?:temporal_transformer\.)?transformer_blocks\."
                    r"(?P<block>\d+)\.")
_TABLE = re.compile(r".+\.(?:pos_embed|pos_encoder)\.pe")


@dataclass(frozen=True)
class OpenedAdapter:
    """A motion adapter opened for loading: where it is, its layout and config, its tensors in canonical names."""

    path: Path
    layout: str  # "diffusers" (a folder), "diffusers-file" or "original-file"
    config: MotionAdapterConfig
    source: TensorSource


def open_motion_adapter(path: str | Path, variant: str | None = None) -> OpenedAdapter:
    """The adapter at ``path`` (a diffusers folder or a ``.safetensors`` file), or a one-line error."""
    path = Path(path)
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise ModelNotFoundError(f"{path}: not a diffusers motion adapter (no config.json)")
        config = MotionAdapterConfig.from_diffusers(read_json(config_path), source=str(config_path))
        files = [SafetensorsFile(file) for file in component_weight_files(path, ADAPTER_STEM, variant)]
        return OpenedAdapter(path, "diffusers", config, FolderSource(files, str(path)))
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
        return OpenedAdapter(path, "original-file", config, source)
    return OpenedAdapter(path, "diffusers-file", config, FolderSource([file], str(path)))


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


def load_motion_adapter(adapter: OpenedAdapter, unet: UNetConfig, ops: Ops, precision: str = "fp32") -> MotionAdapter:
    """The adapter's network for a UNet of config ``unet`` (a one-line error for an adapter of another layout),
    its weights held at ``precision``."""
    config = adapter.config.for_unet(unet, source=str(adapter.path))
    return load_network(lambda params: MotionAdapter(params, config), adapter.source, ops, precision)


def load_motion_unet(unet, adapter: OpenedAdapter, ops: Ops, precision: str = "fp32") -> UNetMotionModel:
    """An SD 1.x UNet network (loaded by the sd family) with the adapter's motion modules."""
    return UNetMotionModel(unet, load_motion_adapter(adapter, unet.config, ops, precision))
