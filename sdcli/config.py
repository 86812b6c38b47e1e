"""Architecture and scheduler hyper-parameters as frozen dataclasses, read from diffusers/transformers config files.

The presets are the real config files of the models (``sdcli/data/configs/<preset>/``, copied from the
``runwayml/stable-diffusion-v1-5`` and ``stabilityai/stable-diffusion-2-1`` repositories); a single-file
checkpoint borrows the preset of the family it is sniffed to be.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import CheckpointError

PRESET_CONFIGS = ("sd15", "sd21")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or a one-line CheckpointError."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise CheckpointError(f"cannot read {path}: {error.strerror or error}") from None
    except ValueError as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def preset_config_dir(preset: str) -> Path:
    """The shipped config folder of a preset family ("sd15", "sd21")."""
    if preset not in PRESET_CONFIGS:
        raise CheckpointError(f"no shipped configs for {preset!r}; known: {', '.join(PRESET_CONFIGS)}")
    return Path(str(resources.files("sdcli") / "data" / "configs" / preset))


def _pick(cls, data: dict[str, Any], source: str, renames: dict[str, str] | None = None):
    """Build dataclass ``cls`` from the keys of ``data`` it knows; missing required keys name ``source``."""
    renames = renames or {}
    values = {}
    for field in fields(cls):
        key = renames.get(field.name, field.name)
        if key in data and data[key] is not None:
            values[field.name] = data[key]
    try:
        return cls(**values)
    except TypeError as error:
        raise CheckpointError(f"{source}: incomplete config ({error})") from None


@dataclass(frozen=True)
class ClipConfig:
    """CLIP text tower (transformers ``CLIPTextConfig``). SD1: ViT-L/14, 768 wide, 12 layers, quick-GELU.
    SD2: OpenCLIP ViT-H/14 without its last layer, 1024 wide, 23 layers, GELU."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int = 49408
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_diffusers(cls, data: dict[str, Any], source: str = "text_encoder/config.json") -> "ClipConfig":
        config = _pick(cls, data, source)
        if config.hidden_act not in ("quick_gelu", "gelu"):
            raise CheckpointError(f"{source}: unsupported hidden_act {config.hidden_act!r}")
        if config.hidden_size % config.num_attention_heads:
            raise CheckpointError(f"{source}: hidden_size is not a multiple of num_attention_heads")
        return config

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass(frozen=True)
class SchedulerConfig:
    """The training noise schedule and inference spacing (diffusers ``scheduler_config.json``).

    ``timestep_spacing`` defaults to "leading", what DDIM/PNDM (the schedulers SD1.5 and SD2.1 ship with) use
    when their config does not say; ``set_alpha_to_one`` defaults to False as both models' configs set it
    (diffusers' DDIM class default is True).
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    steps_offset: int = 0
    timestep_spacing: str = "leading"
    set_alpha_to_one: bool = False

    def __post_init__(self) -> None:
        if self.beta_schedule not in BETA_SCHEDULES:
            raise CheckpointError(f"unsupported beta_schedule {self.beta_schedule!r}; "
                                  f"known: {', '.join(BETA_SCHEDULES)}")
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise CheckpointError(f"unsupported timestep_spacing {self.timestep_spacing!r}; "
                                  f"known: {', '.join(TIMESTEP_SPACINGS)}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise CheckpointError(f"unsupported prediction_type {self.prediction_type!r}")
        if self.num_train_timesteps < 1:
            raise CheckpointError("num_train_timesteps must be at least 1")

    @classmethod
    def from_diffusers(cls, data: dict[str, Any],
                       source: str = "scheduler/scheduler_config.json") -> "SchedulerConfig":
        if data.get("trained_betas") is not None:
            raise CheckpointError(f"{source}: explicit trained_betas are not supported")
        return _pick(cls, data, source)


VAE_DOWN_BLOCK_TYPES = ("DownEncoderBlock2D",)
VAE_UP_BLOCK_TYPES = ("UpDecoderBlock2D",)
SD_VAE_SCALING_FACTOR = 0.18215


@dataclass(frozen=True)
class VAEConfig:
    """The KL autoencoder of latent diffusion (diffusers ``AutoencoderKL``, ``vae/config.json``).

    Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models": SD1.x/2.x use four
    levels of 128, 256, 512, 512 channels, two resnets per encoder level (three per decoder level), a
    single-head attention in each mid block, and 4 latent channels at 1/8 resolution. ``scaling_factor`` maps
    the autoencoder's latents to the unit-variance space the UNet works in; SD1.x/2.x configs predate the key
    and diffusers then uses 0.18215. ``force_upcast`` (a half-precision workaround) does not apply to float32
    arithmetic and is ignored.
    """

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    latent_channels: int = 4
    in_channels: int = 3
    out_channels: int = 3
    norm_num_groups: int = 32
    scaling_factor: float = SD_VAE_SCALING_FACTOR
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    sample_size: int = 32

    @classmethod
    def from_diffusers(cls, data: dict[str, Any], source: str = "vae/config.json") -> "VAEConfig":
        levels = len(data.get("block_out_channels") or ())
        for option, known in (("down_block_types", VAE_DOWN_BLOCK_TYPES), ("up_block_types", VAE_UP_BLOCK_TYPES)):
            block_types = data.get(option) or [known[0]] * levels
            unknown = [block_type for block_type in block_types if block_type not in known]
            if unknown:
                raise CheckpointError(f"{source}: unsupported {option} entry {unknown[0]!r}; "
                                      f"known: {', '.join(known)}")
            if len(block_types) != levels:
                raise CheckpointError(f"{source}: {option} has {len(block_types)} entries for {levels} levels")
        for option in ("shift_factor", "latents_mean", "latents_std"):
            if data.get(option) is not None:
                raise CheckpointError(f"{source}: {option} is not supported (only SD 1.x/2.x-style VAEs are)")
        if data.get("act_fn", "silu") != "silu":
            raise CheckpointError(f"{source}: unsupported act_fn {data['act_fn']!r}")
        data = dict(data)
        if data.get("block_out_channels") is not None:
            data["block_out_channels"] = tuple(int(c) for c in data["block_out_channels"])
        if isinstance(data.get("sample_size"), (list, tuple)):
            data["sample_size"] = int(data["sample_size"][0])
        config = _pick(cls, data, source)
        if not config.block_out_channels or not isinstance(config.layers_per_block, int) \
                or config.layers_per_block < 1:
            raise CheckpointError(f"{source}: block_out_channels must be non-empty and layers_per_block an int >= 1")
        if any(channels % config.norm_num_groups for channels in config.block_out_channels):
            raise CheckpointError(f"{source}: norm_num_groups {config.norm_num_groups} does not divide "
                                  f"block_out_channels {list(config.block_out_channels)}")
        return config

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side: 2 per level after the first (8 for SD)."""
        return 2 ** (len(self.block_out_channels) - 1)
