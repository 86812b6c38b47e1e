"""Architecture and scheduler hyper-parameters as frozen dataclasses, read from diffusers/transformers config files.

The presets are the real config files of the models (``sdcli/data/configs/<preset>/``, copied from the
``runwayml/stable-diffusion-v1-5`` and ``stabilityai/stable-diffusion-2-1`` repositories); a single-file
checkpoint borrows the preset of the family it is sniffed to be.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
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


UNET_DOWN_BLOCK_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}  # type -> has transformers
UNET_UP_BLOCK_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
# diffusers UNet2DConditionModel options sdcli does not implement, with the value that means "off". Each of the
# others changes the network (class or addition embeddings are SDXL / unCLIP / IF, time_cond_proj_dim is LCM's
# guidance embedding, ...), so a config that sets one is refused instead of being run wrong.
UNET_OFF_OPTIONS = {
    "class_embed_type": None,
    "num_class_embeds": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "projection_class_embeddings_input_dim": None,
    "class_embeddings_concat": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "time_cond_proj_dim": None,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "dual_cross_attention": False,
    "only_cross_attention": False,
    "mid_block_only_cross_attention": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
    "num_attention_heads": None,
    "act_fn": "silu",
}


@dataclass(frozen=True)
class UNetConfig:
    """The denoising UNet (diffusers ``UNet2DConditionModel``) as SD 1.x and 2.x use it.

    Defaults are diffusers' constructor defaults, which fill in keys a config.json leaves out (except
    ``sample_size``, None there, SD1's 64 here: it only sets the default image size). SD1.5 and SD2.1
    share the layout (320/640/1280/1280 channels, two layers per level, no attention at the deepest level); SD2
    uses linear proj_in/proj_out, a 1024-wide context and a fixed head width of 64 instead of 8 heads everywhere.
    Per-level tuples follow the down path (shallowest first); the up path reads them reversed.
    """

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    # Heads per level. diffusers reads these from ``attention_head_dim``, which for UNet2DConditionModel has
    # always meant the number of heads (diffusers issue #2011): SD1's 8 is 8 heads of 40/80/160, SD2's
    # [5, 10, 20, 20] is heads of 64.
    num_attention_heads: tuple[int, ...] = (8, 8, 8, 8)
    cross_attention_dim: int = 1280
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    use_linear_projection: bool = False
    # Attention in float32 under fp16 autocast; sdcli computes in float32 throughout, so this changes nothing.
    upcast_attention: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    center_input_sample: bool = False
    sample_size: int = 64

    @classmethod
    def from_diffusers(cls, data: dict[str, Any], source: str = "unet/config.json") -> "UNetConfig":
        """Read diffusers' ``unet/config.json``; options sdcli does not implement are refused by name."""
        for name, off in UNET_OFF_OPTIONS.items():
            value = data.get(name, off)
            if isinstance(value, list) and isinstance(off, bool):
                value = any(value)  # only_cross_attention may be given per level
            if value != off and not ((value is None or value is False) and (off is None or off is False)):
                raise CheckpointError(f"{source}: UNet option {name}={value!r} is not supported "
                                      f"(sdcli reads SD 1.x/2.x UNets, which leave it at {off!r})")
        if "norm_num_groups" in data and data["norm_num_groups"] is None:
            raise CheckpointError(f"{source}: UNet norm_num_groups=None (no output group norm) is not supported")
        defaults = cls()
        channels = data.get("block_out_channels") or defaults.block_out_channels
        levels = len(channels) if isinstance(channels, (list, tuple)) else 1

        def per_level(option: str, default: Any) -> tuple[int, ...]:
            value = data.get(option)
            value = default if value is None else value
            values = [value] * levels if isinstance(value, int) else list(value)
            if len(values) != levels or not all(isinstance(v, int) and v > 0 for v in values):
                raise CheckpointError(f"{source}: UNet {option} must be a positive int or one per level "
                                      f"({levels}), got {value!r}")
            return tuple(values)

        def option(name: str, kind: type) -> Any:
            value = data.get(name)
            if value is None:
                return getattr(defaults, name)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise CheckpointError(f"{source}: UNet {name} must be {kind.__name__}, got {value!r}")
            return value

        sample_size = data.get("sample_size")
        if isinstance(sample_size, list) and sample_size:
            sample_size = sample_size[0]  # [height, width]: the height stands for the default latent size
        layers = data.get("layers_per_block", defaults.layers_per_block)
        if isinstance(layers, list) and len(set(layers)) == 1:
            layers = layers[0]
        try:
            config = cls(
                in_channels=option("in_channels", int),
                out_channels=option("out_channels", int),
                block_out_channels=per_level("block_out_channels", defaults.block_out_channels),
                layers_per_block=layers,
                down_block_types=tuple(data.get("down_block_types", defaults.down_block_types)),
                up_block_types=tuple(data.get("up_block_types", defaults.up_block_types)),
                num_attention_heads=per_level("attention_head_dim", 8),
                cross_attention_dim=option("cross_attention_dim", int),
                transformer_layers_per_block=per_level("transformer_layers_per_block", 1),
                use_linear_projection=option("use_linear_projection", bool),
                upcast_attention=option("upcast_attention", bool),
                norm_num_groups=option("norm_num_groups", int),
                norm_eps=option("norm_eps", float),
                flip_sin_to_cos=option("flip_sin_to_cos", bool),
                freq_shift=option("freq_shift", int),
                downsample_padding=option("downsample_padding", int),
                mid_block_scale_factor=option("mid_block_scale_factor", float),
                center_input_sample=option("center_input_sample", bool),
                sample_size=sample_size if isinstance(sample_size, int) else defaults.sample_size,
            )
        except TypeError as error:
            raise CheckpointError(f"{source}: bad UNet config ({error})") from None
        config.validate(source)
        return config

    def validate(self, source: str = "UNet config") -> None:
        """Refuse a structure the network cannot be built with, naming the option."""
        levels = len(self.block_out_channels)
        if not isinstance(self.layers_per_block, int) or isinstance(self.layers_per_block, bool) \
                or self.layers_per_block < 1:
            raise CheckpointError(f"{source}: UNet layers_per_block must be one positive int, "
                                  f"got {self.layers_per_block!r}")
        for name, known in (("down_block_types", UNET_DOWN_BLOCK_TYPES), ("up_block_types", UNET_UP_BLOCK_TYPES)):
            types = getattr(self, name)
            if len(types) != levels:
                raise CheckpointError(f"{source}: UNet {name} has {len(types)} entries for {levels} levels")
            for block_type in types:
                if block_type not in known:
                    raise CheckpointError(f"{source}: UNet {name} entry {block_type!r} is not supported "
                                          f"(known: {', '.join(known)})")
        for name in ("num_attention_heads", "transformer_layers_per_block"):
            if len(getattr(self, name)) != levels:
                raise CheckpointError(f"{source}: UNet {name} has {len(getattr(self, name))} entries for "
                                      f"{levels} levels")
        for level, (channels, heads) in enumerate(zip(self.block_out_channels, self.num_attention_heads)):
            if channels % self.norm_num_groups:
                raise CheckpointError(f"{source}: UNet block_out_channels[{level}]={channels} is not a multiple "
                                      f"of norm_num_groups={self.norm_num_groups}")
            if channels % heads:
                raise CheckpointError(f"{source}: UNet block_out_channels[{level}]={channels} does not split into "
                                      f"{heads} attention heads (attention_head_dim, the head count in diffusers)")
        if self.downsample_padding < 0:
            raise CheckpointError(f"{source}: UNet downsample_padding must be >= 0")

    @property
    def levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def time_embed_dim(self) -> int:
        """Width of the timestep embedding after its MLP: 4x the first level's channels (1280 for SD)."""
        return 4 * self.block_out_channels[0]

    def down_has_attention(self, level: int) -> bool:
        return UNET_DOWN_BLOCK_TYPES[self.down_block_types[level]]

    def up_has_attention(self, level: int) -> bool:
        """``level`` counts up blocks, deepest first (diffusers' ``up_blocks`` order)."""
        return UNET_UP_BLOCK_TYPES[self.up_block_types[level]]


# The UNet channels per level of the base models AnimateDiff publishes adapters for, to name them in messages.
ADAPTER_BASES = {(320, 640, 1280, 1280): "SD 1.x", (320, 640, 1280): "SDXL"}


@dataclass(frozen=True)
class MotionAdapterConfig:
    """AnimateDiff's motion modules (diffusers ``MotionAdapter``): a temporal transformer after each layer of an
    SD 1.x UNet's levels (and optionally in its mid block), attending over the frames at each latent position.

    Per-level tuples follow the UNet's down path (shallowest first); the up path has one module more per level
    (one per resnet) and reads them reversed. Each module: GroupNorm (eps 1e-6), a linear projection, then
    ``transformer layers`` blocks of two frame self-attentions and a GEGLU feed-forward, each attention after a
    sinusoidal frame position table (``max_seq_length`` rows, stored with the weights), and a linear projection
    back, added to its input.
    """

    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    mid_block_layers: int = 1
    transformer_layers_per_mid_block: int = 1
    num_attention_heads: tuple[int, ...] = (8, 8, 8, 8)
    norm_num_groups: int = 32
    max_seq_length: int = 32
    use_mid_block: bool = True

    @classmethod
    def from_diffusers(cls, data: dict[str, Any], source: str = "motion adapter config.json") -> "MotionAdapterConfig":
        """Read a diffusers ``MotionAdapter`` config.json; options sdcli does not implement are refused by name."""
        if data.get("conv_in_channels"):
            raise CheckpointError(f"{source}: motion adapter conv_in_channels={data['conv_in_channels']!r} (an "
                                  "adapter with its own input convolution, as for image-conditioned variants) is "
                                  "not supported")
        defaults = cls()
        channels = data.get("block_out_channels", defaults.block_out_channels)
        if not isinstance(channels, (list, tuple)) or not channels \
                or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in channels):
            raise CheckpointError(f"{source}: motion adapter block_out_channels must be a list of positive ints, "
                                  f"got {channels!r}")
        levels = len(channels)

        def positive(name: str, value: Any) -> int:
            if isinstance(value, list) and value and all(v == value[0] for v in value):
                value = value[0]  # a per-layer list of one value
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise CheckpointError(f"{source}: motion adapter {name} must be a positive int here, got {value!r}")
            return value

        def per_level(name: str, default: int) -> tuple[int, ...]:
            value = data.get(name)
            value = default if value is None else value
            values = [value] * levels if not isinstance(value, (list, tuple)) else list(value)
            if len(values) != levels:
                raise CheckpointError(f"{source}: motion adapter {name} needs one entry per level ({levels}), "
                                      f"got {value!r}")
            return tuple(positive(name, v) for v in values)

        use_mid_block = data.get("use_motion_mid_block", defaults.use_mid_block)
        if not isinstance(use_mid_block, bool):
            raise CheckpointError(f"{source}: motion adapter use_motion_mid_block must be true or false")
        config = cls(
            block_out_channels=tuple(channels),
            layers_per_block=per_level("motion_layers_per_block", 2),
            transformer_layers_per_block=per_level("motion_transformer_layers_per_block", 1),
            mid_block_layers=positive("motion_mid_block_layers_per_block",
                                      data.get("motion_mid_block_layers_per_block", 1)),
            transformer_layers_per_mid_block=positive("motion_transformer_layers_per_mid_block",
                                                      data.get("motion_transformer_layers_per_mid_block", 1)),
            num_attention_heads=per_level("motion_num_attention_heads", 8),
            norm_num_groups=positive("motion_norm_num_groups", data.get("motion_norm_num_groups", 32)),
            max_seq_length=positive("motion_max_seq_length", data.get("motion_max_seq_length", 32)),
            use_mid_block=use_mid_block,
        )
        config.validate(source)
        return config

    def validate(self, source: str = "motion adapter config") -> None:
        for level, (channels, heads) in enumerate(zip(self.block_out_channels, self.num_attention_heads)):
            if channels % self.norm_num_groups:
                raise CheckpointError(f"{source}: motion adapter block_out_channels[{level}]={channels} is not a "
                                      f"multiple of motion_norm_num_groups={self.norm_num_groups}")
            if channels % heads:
                raise CheckpointError(f"{source}: motion adapter block_out_channels[{level}]={channels} does not "
                                      f"split into {heads} attention heads")

    def check_fits(self, unet: UNetConfig, source: str = "motion adapter") -> None:
        """A one-line error unless the adapter was made for a UNet of this layout (channels per level, layers per
        level): an SDXL adapter on an SD 1.x UNet, say (an SD 1.x adapter fits an SD 2.x UNet's layout; the
        pipeline refuses that pairing by the model's family)."""
        expected = (unet.block_out_channels, (unet.layers_per_block,) * unet.levels)
        if (self.block_out_channels, self.layers_per_block) != expected:
            base = ADAPTER_BASES.get(self.block_out_channels)
            raise CheckpointError(
                f"{source} was made for a UNet with {list(self.block_out_channels)} channels and "
                f"{list(self.layers_per_block)} layers per level ({self.levels} levels"
                f"{f', an {base} motion adapter' if base else ''}), this model's UNet has "
                f"{list(unet.block_out_channels)} channels and {unet.layers_per_block} layers per level "
                f"({unet.levels} levels): use an adapter made for this base model (AnimateDiff's for SD 1.5: "
                "sdcli download --list)")

    def for_unet(self, unet: UNetConfig, source: str = "motion adapter") -> "MotionAdapterConfig":
        """This adapter as it runs on ``unet`` (checked by ``check_fits``): its modules normalise with the UNet's
        ``norm_num_groups``, as diffusers' UNetMotionModel builds them (``from_unet2d`` does not carry the
        adapter's ``motion_norm_num_groups`` over; the published adapters use 32, as SD 1.x does)."""
        self.check_fits(unet, source)
        config = replace(self, norm_num_groups=unet.norm_num_groups)
        config.validate(source)
        return config

    @property
    def levels(self) -> int:
        return len(self.block_out_channels)


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


SKYREELS_TRANSFORMER = "SkyReelsV2Transformer3DModel"  # the diffusers class of SkyReels-V2's transformer


@dataclass(frozen=True)
class WanTransformerConfig:
    """The Wan2.1 diffusion transformer (diffusers ``WanTransformer3DModel``, ``transformer/config.json``).

    The defaults are Wan2.1-T2V-1.3B's: 30 blocks of width 1536 (12 heads of 128), feed-forward 8960, text
    embeddings of 4096 (UMT5-XXL), sinusoidal timestep features of 256, (1, 2, 2) patches of 16 latent channels.
    Image conditioning (``image_dim``, ``added_kv_proj_dim``: the image-to-video models) is refused by name.

    SkyReels-V2 (diffusers ``SkyReelsV2Transformer3DModel``) is this network with three options: the frame-rate
    conditioning (``inject_sample_info``), block-causal self-attention over blocks of ``num_frame_per_block``
    latent frames (diffusion forcing), and sinusoidal timestep features formed in float64
    (``float64_timestep_features``, set from the config's ``_class_name``; Wan forms them in float32).
    """

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 12
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 8960
    num_layers: int = 30
    cross_attn_norm: bool = True
    eps: float = 1e-6
    rope_max_seq_len: int = 1024
    inject_sample_info: bool = False  # SkyReels-V2: a learnt embedding of the frame rate (16 or 24 fps)
    num_frame_per_block: int = 1  # SkyReels-V2: > 1, each block of frames attends to itself and the blocks before
    float64_timestep_features: bool = False  # SkyReels-V2's get_1d_sincos_pos_embed_from_grid

    @classmethod
    def from_diffusers(cls, data: dict[str, Any], source: str = "transformer/config.json") -> "WanTransformerConfig":
        for option in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
            if data.get(option) is not None:
                raise CheckpointError(f"{source}: {option}={data[option]!r} (image conditioning) is not supported; "
                                      "sdcli runs the text-to-video Wan transformer")
        if data.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
            raise CheckpointError(f"{source}: qk_norm={data['qk_norm']!r} is not supported "
                                  "(sdcli implements 'rms_norm_across_heads')")
        data = dict(data)
        if data.get("out_channels") is None:
            data["out_channels"] = data.get("in_channels", cls.in_channels)
        if data.get("patch_size") is not None:
            data["patch_size"] = tuple(data["patch_size"])
        data["float64_timestep_features"] = data.get("_class_name") == SKYREELS_TRANSFORMER
        config = _pick(cls, data, source)
        if not isinstance(config.inject_sample_info, bool):
            raise CheckpointError(f"{source}: inject_sample_info must be true or false")
        sizes = (config.num_attention_heads, config.attention_head_dim, config.in_channels, config.out_channels,
                 config.text_dim, config.freq_dim, config.ffn_dim, config.num_layers, config.num_frame_per_block,
                 *config.patch_size)
        if len(config.patch_size) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                  for v in sizes):
            raise CheckpointError(f"{source}: sizes and the 3-D patch_size must be positive integers")
        if config.attention_head_dim % 2 or config.freq_dim % 2:
            raise CheckpointError(f"{source}: attention_head_dim and freq_dim must be even")
        return config

    @property
    def inner_dim(self) -> int:
        """The transformer's width: heads times head size (1536)."""
        return self.num_attention_heads * self.attention_head_dim
