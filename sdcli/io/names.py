"""Exact name maps from single-file (CompVis/LDM) checkpoints to canonical (diffusers) tensor names.

Canonical names are the ones diffusers and transformers write: ``UNet2DConditionModel`` and ``AutoencoderKL``
state-dict names, and ``CLIPTextModel`` names with the ``text_model.`` prefix. A single-file checkpoint stores the
same tensors in the layout of the original latent-diffusion code (CompVis ``ldm``, Stability-AI
``stablediffusion``):

- ``model.diffusion_model.*``: the UNet as flat ``input_blocks`` / ``middle_block`` / ``output_blocks`` lists;
- ``first_stage_model.*``: the VAE (``encoder.down.N.block.M``, ``mid.attn_1`` with 1x1-conv q/k/v, a decoder whose
  ``up`` list is stored shallowest level first, the reverse of diffusers' ``up_blocks``);
- ``cond_stage_model.transformer.*``: SD1's CLIP ViT-L/14 text model, in transformers names already;
- ``cond_stage_model.model.*``: SD2's OpenCLIP ViT-H/14 text tower, with fused q/k/v ``in_proj`` tensors.

Every map is generated in loops from the component's diffusers config and spells out each entry: there is no
substring renaming, and each map holds exactly one entry per canonical tensor (``check_bijection`` asserts that
no stored tensor, or part of one, feeds two entries). The layout was read from the CompVis/LDM model code and
cross-checked against diffusers' ``loaders/single_file_utils.py`` converters, which the tests run as the
independent reference.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass


@dataclass(frozen=True)
class SourceKey:
    """Where a canonical tensor comes from in a single-file checkpoint."""

    name: str  # key in the file
    # (index, count): rows [index*n/count, (index+1)*n/count) of axis 0 (one of a fused in_proj's q, k, v)
    part: tuple[int, int] | None = None
    # reshape to this after taking the part (a (C, C, 1, 1) conv kernel -> a (C, C) linear weight); None: keep
    shape: tuple[int, ...] | None = None


NameMap = dict[str, SourceKey]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
CANONICAL_TEXT_PREFIX = "text_model."

WEIGHT_BIAS = ("weight", "bias")


def _put(mapping: NameMap, canonical: str, source: SourceKey) -> None:
    """Add one entry; a canonical name generated twice is a bug in the loops."""
    if canonical in mapping:
        raise ValueError(f"canonical tensor {canonical!r} generated twice ({mapping[canonical]} and {source})")
    mapping[canonical] = source


def _put_module(mapping: NameMap, canonical: str, source: str, params: tuple[str, ...] = WEIGHT_BIAS) -> None:
    """Map the ``params`` of one module (``canonical.weight`` <- ``source.weight``, ...), no transform."""
    for param in params:
        _put(mapping, f"{canonical}.{param}", SourceKey(f"{source}.{param}"))


# ---------------------------------------------------------------------------------------------------------------
# Text encoders
# ---------------------------------------------------------------------------------------------------------------

# transformers CLIPEncoderLayer module -> OpenCLIP ResidualAttentionBlock module (weight and bias each).
OPENCLIP_LAYER_MODULES = (
    ("layer_norm1", "ln_1"),
    ("self_attn.out_proj", "attn.out_proj"),
    ("layer_norm2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
)
# q, k, v are rows [0, D), [D, 2D), [2D, 3D) of OpenCLIP's fused in_proj_weight (3D, D) and in_proj_bias (3D,).
OPENCLIP_QKV = ("q_proj", "k_proj", "v_proj")
CLIP_LAYER_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                      "layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2")


def text_encoder_sd1_names(config: dict) -> NameMap:
    """SD1 (CLIP ViT-L/14): ``cond_stage_model.transformer.text_model.*`` holds the canonical names as they are.

    ``config`` is the transformers ``CLIPTextConfig`` dict (``text_encoder/config.json``).
    """
    mapping: NameMap = {}
    for module in ("embeddings.token_embedding", "embeddings.position_embedding"):
        _put_module(mapping, f"{CANONICAL_TEXT_PREFIX}{module}", f"{CLIP_PREFIX}{CANONICAL_TEXT_PREFIX}{module}",
                    ("weight",))
    for layer in range(int(config["num_hidden_layers"])):
        for module in CLIP_LAYER_MODULES:
            name = f"{CANONICAL_TEXT_PREFIX}encoder.layers.{layer}.{module}"
            _put_module(mapping, name, f"{CLIP_PREFIX}{name}")
    name = f"{CANONICAL_TEXT_PREFIX}final_layer_norm"
    _put_module(mapping, name, f"{CLIP_PREFIX}{name}")
    return mapping


def text_encoder_openclip_names(config: dict) -> NameMap:
    """SD2 (OpenCLIP ViT-H/14): ``cond_stage_model.model.*``.

    Only the first ``num_hidden_layers`` resblocks are mapped: SD2 checkpoints hold 24 while the diffusers text
    encoder has 23, because SD2 conditions on the penultimate layer; the last resblock, ``text_projection`` and
    ``logit_scale`` are known extras (see ``is_known_extra``).
    """
    mapping: NameMap = {}
    text = CANONICAL_TEXT_PREFIX
    _put(mapping, f"{text}embeddings.token_embedding.weight", SourceKey(f"{OPENCLIP_PREFIX}token_embedding.weight"))
    # OpenCLIP keeps the position table as a bare (77, D) parameter, the same tensor as nn.Embedding's weight.
    _put(mapping, f"{text}embeddings.position_embedding.weight", SourceKey(f"{OPENCLIP_PREFIX}positional_embedding"))
    for layer in range(int(config["num_hidden_layers"])):
        canonical = f"{text}encoder.layers.{layer}"
        source = f"{OPENCLIP_PREFIX}transformer.resblocks.{layer}"
        for index, projection in enumerate(OPENCLIP_QKV):
            for param in WEIGHT_BIAS:
                fused = f"{source}.attn.in_proj_{param}"  # (3D, D) weight, (3D,) bias
                _put(mapping, f"{canonical}.self_attn.{projection}.{param}",
                     SourceKey(fused, part=(index, len(OPENCLIP_QKV))))
        for canonical_module, source_module in OPENCLIP_LAYER_MODULES:
            _put_module(mapping, f"{canonical}.{canonical_module}", f"{source}.{source_module}")
    _put_module(mapping, f"{text}final_layer_norm", f"{OPENCLIP_PREFIX}ln_final")
    return mapping


# ---------------------------------------------------------------------------------------------------------------
# UNet
# ---------------------------------------------------------------------------------------------------------------

# diffusers ResnetBlock2D module -> LDM ResBlock module. LDM's in_layers are (GroupNorm, SiLU, Conv),
# emb_layers (SiLU, Linear), out_layers (GroupNorm, SiLU, Dropout, Conv).
UNET_RESNET_MODULES = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
)
# BasicTransformerBlock tensors; LDM's SpatialTransformer uses the same names. q/k/v carry no bias.
TRANSFORMER_BLOCK_TENSORS = (
    "norm1.weight", "norm1.bias",
    "attn1.to_q.weight", "attn1.to_k.weight", "attn1.to_v.weight", "attn1.to_out.0.weight", "attn1.to_out.0.bias",
    "norm2.weight", "norm2.bias",
    "attn2.to_q.weight", "attn2.to_k.weight", "attn2.to_v.weight", "attn2.to_out.0.weight", "attn2.to_out.0.bias",
    "norm3.weight", "norm3.bias",
    "ff.net.0.proj.weight", "ff.net.0.proj.bias", "ff.net.2.weight", "ff.net.2.bias",
)
# Config options whose other values change the set of tensors; the maps refuse them rather than guess.
UNET_REQUIRED_OPTIONS = {
    "class_embed_type": None,
    "addition_embed_type": None,
    "num_class_embeds": None,
    "encoder_hid_dim": None,
    "time_cond_proj_dim": None,
    "time_embedding_type": "positional",
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "dual_cross_attention": False,
    "only_cross_attention": False,
}
UNET_DOWN_BLOCKS = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}  # type -> has attentions
UNET_UP_BLOCKS = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}


def _check_unet_config(config: dict) -> None:
    for option, required in UNET_REQUIRED_OPTIONS.items():
        value = config.get(option, required)
        if isinstance(value, (list, tuple)) and required is False:
            value = any(value)
        if value != required:
            raise ValueError(f"UNet config option {option}={value!r} is not supported by the single-file map "
                             f"(expected {required!r})")
    if not isinstance(config["layers_per_block"], int):
        raise ValueError(f"UNet layers_per_block must be one int, got {config['layers_per_block']!r}")
    for option, known in (("down_block_types", UNET_DOWN_BLOCKS), ("up_block_types", UNET_UP_BLOCKS)):
        for block_type in config[option]:
            if block_type not in known:
                raise ValueError(f"UNet {option} entry {block_type!r} is not supported by the single-file map")


def _per_block(value: int | list[int], blocks: int, option: str) -> list[int]:
    """An int-or-list config option as one value per block."""
    values = [int(value)] * blocks if isinstance(value, int) else [int(v) for v in value]
    if len(values) != blocks:
        raise ValueError(f"UNet {option} has {len(values)} entries for {blocks} blocks")
    return values


def _put_unet_resnet(mapping: NameMap, canonical: str, source: str, in_channels: int, out_channels: int) -> None:
    """One ResnetBlock2D; the 1x1 shortcut conv exists only where the channel count changes."""
    for canonical_module, source_module in UNET_RESNET_MODULES:
        _put_module(mapping, f"{canonical}.{canonical_module}", f"{source}.{source_module}")
    if in_channels != out_channels:
        _put_module(mapping, f"{canonical}.conv_shortcut", f"{source}.skip_connection")


def _put_unet_transformer(mapping: NameMap, canonical: str, source: str, layers: int) -> None:
    """One Transformer2DModel (LDM SpatialTransformer): same names on both sides.

    proj_in / proj_out are 1x1 convs (C, C, 1, 1) without use_linear_projection and Linear (C, C) with it
    (SD2); the LDM checkpoint stores them in the same form as diffusers, so no reshape.
    """
    for module in ("norm", "proj_in", "proj_out"):
        _put_module(mapping, f"{canonical}.{module}", f"{source}.{module}")
    for layer in range(layers):
        for tensor in TRANSFORMER_BLOCK_TENSORS:
            name = f"transformer_blocks.{layer}.{tensor}"
            _put(mapping, f"{canonical}.{name}", SourceKey(f"{source}.{name}"))


def unet_names(config: dict) -> NameMap:
    """UNet2DConditionModel <- ``model.diffusion_model.*``; ``config`` is the diffusers ``unet/config.json`` dict.

    LDM's UNet is three flat lists. With ``L = layers_per_block`` and ``per_level = L + 1``:

    - ``input_blocks.0.0`` is conv_in; down level ``b`` layer ``j`` is ``input_blocks.{per_level*b + j + 1}``
      (``3*b + j + 1`` for SD's L = 2) with ``.0`` the resnet and ``.1`` the transformer, and the level's
      downsampler is the next entry, ``input_blocks.{per_level*b + L + 1}.0.op``;
    - ``middle_block.0`` resnet, ``.1`` transformer, ``.2`` resnet;
    - up level ``b`` (deepest first, as diffusers) layer ``j`` in ``0..L`` is ``output_blocks.{per_level*b + j}``
      with ``.0`` the resnet, ``.1`` the transformer if the level has one, and the upsampler after them in the
      level's last entry (``.1.conv`` or ``.2.conv``).
    """
    _check_unet_config(config)
    channels = [int(c) for c in config["block_out_channels"]]
    layers = int(config["layers_per_block"])
    per_level = layers + 1
    levels = len(channels)
    down_attention = [UNET_DOWN_BLOCKS[t] for t in config["down_block_types"]]
    up_attention = [UNET_UP_BLOCKS[t] for t in config["up_block_types"]]
    if len(down_attention) != levels or len(up_attention) != levels:
        raise ValueError("UNet block type lists and block_out_channels differ in length")
    down_depth = _per_block(config.get("transformer_layers_per_block", 1), levels, "transformer_layers_per_block")
    up_depth = config.get("reverse_transformer_layers_per_block") or list(reversed(down_depth))
    up_depth = _per_block(up_depth, levels, "reverse_transformer_layers_per_block")

    mapping: NameMap = {}
    _put_module(mapping, "conv_in", f"{UNET_PREFIX}input_blocks.0.0")
    _put_module(mapping, "time_embedding.linear_1", f"{UNET_PREFIX}time_embed.0")
    _put_module(mapping, "time_embedding.linear_2", f"{UNET_PREFIX}time_embed.2")

    # Down levels: resnet j takes the previous level's channels (j = 0) or its own.
    for level in range(levels):
        previous = channels[max(level - 1, 0)]
        for j in range(layers):
            source = f"{UNET_PREFIX}input_blocks.{per_level * level + j + 1}"
            canonical = f"down_blocks.{level}"
            in_channels = previous if j == 0 else channels[level]
            _put_unet_resnet(mapping, f"{canonical}.resnets.{j}", f"{source}.0", in_channels, channels[level])
            if down_attention[level]:
                _put_unet_transformer(mapping, f"{canonical}.attentions.{j}", f"{source}.1", down_depth[level])
        if level < levels - 1:
            source = f"{UNET_PREFIX}input_blocks.{per_level * level + layers + 1}.0.op"
            _put_module(mapping, f"down_blocks.{level}.downsamplers.0.conv", source)

    middle = f"{UNET_PREFIX}middle_block"
    _put_unet_resnet(mapping, "mid_block.resnets.0", f"{middle}.0", channels[-1], channels[-1])
    _put_unet_transformer(mapping, "mid_block.attentions.0", f"{middle}.1", down_depth[-1])
    _put_unet_resnet(mapping, "mid_block.resnets.1", f"{middle}.2", channels[-1], channels[-1])

    # Up levels, deepest first. Resnet j concatenates a skip connection: from the level below for the last
    # layer, from the same level otherwise; its input is the previous up level's output (j = 0) or its own.
    reversed_channels = list(reversed(channels))
    for level in range(levels):
        out_channels = reversed_channels[level]
        previous_out = reversed_channels[max(level - 1, 0)]
        skip_last = reversed_channels[min(level + 1, levels - 1)]
        for j in range(per_level):
            source = f"{UNET_PREFIX}output_blocks.{per_level * level + j}"
            canonical = f"up_blocks.{level}"
            skip = skip_last if j == per_level - 1 else out_channels
            in_channels = (previous_out if j == 0 else out_channels) + skip
            _put_unet_resnet(mapping, f"{canonical}.resnets.{j}", f"{source}.0", in_channels, out_channels)
            if up_attention[level]:
                _put_unet_transformer(mapping, f"{canonical}.attentions.{j}", f"{source}.1", up_depth[level])
        if level < levels - 1:
            last = f"{UNET_PREFIX}output_blocks.{per_level * level + layers}"
            upsampler = f"{last}.2.conv" if up_attention[level] else f"{last}.1.conv"
            _put_module(mapping, f"up_blocks.{level}.upsamplers.0.conv", upsampler)

    _put_module(mapping, "conv_norm_out", f"{UNET_PREFIX}out.0")
    _put_module(mapping, "conv_out", f"{UNET_PREFIX}out.2")
    return mapping


# ---------------------------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------------------------

VAE_RESNET_MODULES = ("norm1", "conv1", "norm2", "conv2")  # same names on both sides
# diffusers Attention (Linear q/k/v/out) -> LDM AttnBlock (1x1 Conv2d q/k/v/proj_out, GroupNorm norm).
VAE_ATTENTION_LINEARS = (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))
VAE_DOWN_BLOCKS = ("DownEncoderBlock2D",)
VAE_UP_BLOCKS = ("UpDecoderBlock2D",)


def _put_vae_resnet(mapping: NameMap, canonical: str, source: str, in_channels: int, out_channels: int) -> None:
    for module in VAE_RESNET_MODULES:
        _put_module(mapping, f"{canonical}.{module}", f"{source}.{module}")
    if in_channels != out_channels:
        _put_module(mapping, f"{canonical}.conv_shortcut", f"{source}.nin_shortcut")


def _put_vae_attention(mapping: NameMap, canonical: str, source: str, channels: int) -> None:
    """The single-head mid-block attention: LDM's (C, C, 1, 1) conv kernels become (C, C) linear weights."""
    _put_module(mapping, f"{canonical}.group_norm", f"{source}.norm")
    for canonical_module, source_module in VAE_ATTENTION_LINEARS:
        _put(mapping, f"{canonical}.{canonical_module}.weight",
             SourceKey(f"{source}.{source_module}.weight", shape=(channels, channels)))
        _put(mapping, f"{canonical}.{canonical_module}.bias", SourceKey(f"{source}.{source_module}.bias"))


def _put_vae_mid(mapping: NameMap, canonical: str, source: str, channels: int, attention: bool) -> None:
    _put_vae_resnet(mapping, f"{canonical}.resnets.0", f"{source}.block_1", channels, channels)
    if attention:
        _put_vae_attention(mapping, f"{canonical}.attentions.0", f"{source}.attn_1", channels)
    _put_vae_resnet(mapping, f"{canonical}.resnets.1", f"{source}.block_2", channels, channels)


def vae_names(config: dict) -> NameMap:
    """AutoencoderKL <- ``first_stage_model.*``; ``config`` is the diffusers ``vae/config.json`` dict.

    Encoder level ``i`` is ``encoder.down.{i}`` (``block.{j}`` resnets, ``downsample.conv``). The decoder stores
    its levels by resolution, shallowest first, so diffusers' ``decoder.up_blocks.{i}`` (deepest first) is LDM's
    ``decoder.up.{n - 1 - i}``, each with ``layers_per_block + 1`` resnets and an ``upsample.conv``.
    """
    for option, known in (("down_block_types", VAE_DOWN_BLOCKS), ("up_block_types", VAE_UP_BLOCKS)):
        for block_type in config[option]:
            if block_type not in known:
                raise ValueError(f"VAE {option} entry {block_type!r} is not supported by the single-file map")
    channels = [int(c) for c in config["block_out_channels"]]
    layers = int(config["layers_per_block"])
    levels = len(channels)
    mid_attention = bool(config.get("mid_block_add_attention", True))
    encoder, decoder = f"{VAE_PREFIX}encoder", f"{VAE_PREFIX}decoder"

    mapping: NameMap = {}
    _put_module(mapping, "encoder.conv_in", f"{encoder}.conv_in")
    for level in range(levels):
        previous = channels[max(level - 1, 0)]
        for j in range(layers):
            in_channels = previous if j == 0 else channels[level]
            _put_vae_resnet(mapping, f"encoder.down_blocks.{level}.resnets.{j}", f"{encoder}.down.{level}.block.{j}",
                            in_channels, channels[level])
        if level < levels - 1:
            _put_module(mapping, f"encoder.down_blocks.{level}.downsamplers.0.conv",
                        f"{encoder}.down.{level}.downsample.conv")
    _put_vae_mid(mapping, "encoder.mid_block", f"{encoder}.mid", channels[-1], mid_attention)
    _put_module(mapping, "encoder.conv_norm_out", f"{encoder}.norm_out")
    _put_module(mapping, "encoder.conv_out", f"{encoder}.conv_out")

    _put_module(mapping, "decoder.conv_in", f"{decoder}.conv_in")
    _put_vae_mid(mapping, "decoder.mid_block", f"{decoder}.mid", channels[-1], mid_attention)
    reversed_channels = list(reversed(channels))
    for level in range(levels):
        ldm_level = levels - 1 - level
        previous = reversed_channels[max(level - 1, 0)]
        for j in range(layers + 1):
            in_channels = previous if j == 0 else reversed_channels[level]
            _put_vae_resnet(mapping, f"decoder.up_blocks.{level}.resnets.{j}",
                            f"{decoder}.up.{ldm_level}.block.{j}", in_channels, reversed_channels[level])
        if level < levels - 1:
            _put_module(mapping, f"decoder.up_blocks.{level}.upsamplers.0.conv",
                        f"{decoder}.up.{ldm_level}.upsample.conv")
    _put_module(mapping, "decoder.conv_norm_out", f"{decoder}.norm_out")
    _put_module(mapping, "decoder.conv_out", f"{decoder}.conv_out")

    if config.get("use_quant_conv", True):
        _put_module(mapping, "quant_conv", f"{VAE_PREFIX}quant_conv")
    if config.get("use_post_quant_conv", True):
        _put_module(mapping, "post_quant_conv", f"{VAE_PREFIX}post_quant_conv")
    return mapping


# ---------------------------------------------------------------------------------------------------------------
# Known extras and the bijection check
# ---------------------------------------------------------------------------------------------------------------

# Top-level buffers of LDM's DDPM / LatentDiffusion: the training noise schedule (register_schedule), the
# per-timestep loss log-variance, and two buffers registered only in some training setups (scale_factor with
# scale_by_std, cond_ids with a shortened conditioning schedule). sdcli computes its schedules itself.
LDM_SCHEDULE_BUFFERS = frozenset({
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "logvar",
    "scale_factor",
    "cond_ids",
})
# Whole tensors of the text towers that diffusers' text encoder does not have.
EXTRA_NAMES = frozenset({
    f"{OPENCLIP_PREFIX}text_projection",  # (D, P): OpenCLIP's pooled-output projection
    f"{OPENCLIP_PREFIX}logit_scale",  # CLIP's contrastive temperature
    f"{OPENCLIP_PREFIX}attn_mask",  # (77, 77) causal mask buffer, rebuilt at run time
})
EXTRA_PREFIXES = (
    "model_ema.",  # EMA copies of the UNet (flattened names, e.g. model_ema.diffusion_modelinput_blocks00weight)
    f"{VAE_PREFIX}loss.",  # the autoencoder's training loss (LPIPS network, discriminator)
)
EXTRA_SUFFIXES = (
    ".position_ids",  # CLIP's arange(77) buffer
)
OPENCLIP_RESBLOCKS = f"{OPENCLIP_PREFIX}transformer.resblocks."


def is_known_extra(name: str, text_encoder_layers: int | None = None) -> bool:
    """Whether ``name`` is a single-file tensor sdcli deliberately ignores (a stored name, prefix included).

    ``text_encoder_layers`` is the diffusers text encoder's ``num_hidden_layers``: OpenCLIP resblocks at or past
    it (SD2's 24th, unused because SD2 conditions on the penultimate layer) are extras. None: no resblock is.
    """
    if name in LDM_SCHEDULE_BUFFERS or name in EXTRA_NAMES:
        return True
    if name.startswith(EXTRA_PREFIXES) or name.endswith(EXTRA_SUFFIXES):
        return True
    if text_encoder_layers is not None and name.startswith(OPENCLIP_RESBLOCKS):
        index = name[len(OPENCLIP_RESBLOCKS):].split(".", 1)[0]
        return index.isdigit() and int(index) >= text_encoder_layers
    return False


def check_bijection(mapping: NameMap) -> None:
    """Raise ValueError unless every stored tensor (or part of one) feeds exactly one canonical tensor.

    A tensor is used whole at most once, never both whole and in parts, and a fused tensor is split into all of
    its ``count`` parts, each used once, with a single ``count``.
    """
    uses: dict[str, list[tuple[str, tuple[int, int] | None]]] = defaultdict(list)
    for canonical, source in mapping.items():
        uses[source.name].append((canonical, source.part))
    problems = []
    for stored, entries in uses.items():
        parts = [part for _, part in entries]
        users = ", ".join(canonical for canonical, _ in entries)
        if None in parts:
            if len(entries) > 1:
                problems.append(f"{stored} feeds {users}")
            continue
        counts = {count for _, count in parts}
        indices = sorted(index for index, _ in parts)
        if len(counts) != 1 or indices != list(range(next(iter(counts)))):
            problems.append(f"{stored} parts {sorted(parts)} feed {users}")
    if problems:
        raise ValueError("name map is not a bijection: " + "; ".join(problems))
