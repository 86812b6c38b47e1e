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

The canonical names are spelled once, by the networks (:mod:`sdcli.nn`) where they build their layers; the maps
do not spell them again. Each map builds its network from the component's diffusers config, shape only
(:func:`sdcli.io.weights.tensor_shapes`: nothing is read), and translates every name the network takes by a
short list of rules. A rule is one anchored pattern over a whole canonical name that parses it into its parts
(``down_blocks.{level}.resnets.{j}.{module}.{param}``), and the function that names the stored tensor from them:
the LDM block index by the same arithmetic as the LDM code (``input_blocks.{3*level + j + 1}`` for two layers per
level), module names through small tables (``norm1`` -> ``in_layers.0``). There is no substring renaming: a name
that no rule matches, or that more than one matches, is an error naming it, so a network change the maps do not
know fails here instead of loading wrong. Each map holds exactly one entry per tensor the network takes, and
``check_bijection`` asserts that no stored tensor, or part of one, feeds two entries. The layout was read from the
CompVis/LDM model code and cross-checked against diffusers' ``loaders/single_file_utils.py`` converters, which the
tests run as the independent reference.
"""

from __future__ import annotations

import re

from ..config import ClipConfig, UNetConfig, VAEConfig
from ..io.checkpoint import NameMap, SourceKey
from ..io.name_rules import INDEX, PARAM, Rule, below as _below, check_bijection, network_shapes as _network_shapes, \
    one_of as _one_of, translate as _translate
from ..nn.clip import ClipTextEncoder
from ..nn.unet import UNet2DConditionModel
from ..nn.vae import Autoencoder


Shapes = dict[str, tuple[int, ...]]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
CANONICAL_TEXT_PREFIX = "text_model."

WEIGHT_BIAS = ("weight", "bias")


# ---------------------------------------------------------------------------------------------------------------
# Text encoders
# ---------------------------------------------------------------------------------------------------------------

CLIP_LAYER_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                      "layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2")
CLIP_EMBEDDINGS = ("embeddings.token_embedding", "embeddings.position_embedding")
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
# transformers embedding -> OpenCLIP tensor. OpenCLIP keeps the position table as a bare (77, D) parameter, the
# same tensor as nn.Embedding's weight.
OPENCLIP_EMBEDDINGS = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
}


def _text_encoder_shapes(config: dict) -> Shapes:
    clip_config = ClipConfig.from_diffusers(config)
    return _network_shapes(lambda params: ClipTextEncoder(params, clip_config))


def text_encoder_sd1_names(config: dict) -> NameMap:
    """SD1 (CLIP ViT-L/14): ``cond_stage_model.transformer.text_model.*`` holds the canonical names as they are.

    ``config`` is the transformers ``CLIPTextConfig`` dict (``text_encoder/config.json``).
    """
    text = re.escape(CANONICAL_TEXT_PREFIX)
    stored_as_is = lambda match: match[0]  # noqa: E731
    rules = (
        Rule(rf"{text}{_one_of(CLIP_EMBEDDINGS)}\.weight", stored_as_is),
        Rule(rf"{text}encoder\.layers\.{INDEX}\.{_one_of(CLIP_LAYER_MODULES)}\.{PARAM}", stored_as_is),
        Rule(rf"{text}final_layer_norm\.{PARAM}", stored_as_is),
    )
    return _translate(_text_encoder_shapes(config), rules, CLIP_PREFIX, "text encoder")


def text_encoder_openclip_names(config: dict) -> NameMap:
    """SD2 (OpenCLIP ViT-H/14): ``cond_stage_model.model.*``.

    Only the first ``num_hidden_layers`` resblocks are mapped: SD2 checkpoints hold 24 while the diffusers text
    encoder has 23, because SD2 conditions on the penultimate layer; the last resblock, ``text_projection`` and
    ``logit_scale`` are known extras (see ``is_known_extra``).
    """
    text = re.escape(CANONICAL_TEXT_PREFIX)
    layer = rf"{text}encoder\.layers\.(?P<layer>{INDEX})"
    modules = dict(OPENCLIP_LAYER_MODULES)
    rules = (
        Rule(rf"{text}{_one_of(OPENCLIP_EMBEDDINGS, 'tensor')}", lambda m: OPENCLIP_EMBEDDINGS[m["tensor"]]),
        Rule(rf"{layer}\.self_attn\.{_one_of(OPENCLIP_QKV, 'projection')}\.{PARAM}",
             lambda m: SourceKey(f"transformer.resblocks.{m['layer']}.attn.in_proj_{m['param']}",  # (3D, D), (3D,)
                                 part=(OPENCLIP_QKV.index(m["projection"]), len(OPENCLIP_QKV)))),
        Rule(rf"{layer}\.{_one_of(modules, 'module')}\.{PARAM}",
             lambda m: f"transformer.resblocks.{m['layer']}.{modules[m['module']]}.{m['param']}"),
        Rule(rf"{text}final_layer_norm\.{PARAM}", lambda m: f"ln_final.{m['param']}"),
    )
    return _translate(_text_encoder_shapes(config), rules, OPENCLIP_PREFIX, "text encoder")


# ---------------------------------------------------------------------------------------------------------------
# UNet
# ---------------------------------------------------------------------------------------------------------------

# diffusers top-level module -> LDM module: time_embed is (Linear, SiLU, Linear), out is (GroupNorm, SiLU, Conv).
UNET_TOP_MODULES = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# diffusers ResnetBlock2D module -> LDM ResBlock module. LDM's in_layers are (GroupNorm, SiLU, Conv),
# emb_layers (SiLU, Linear), out_layers (GroupNorm, SiLU, Dropout, Conv). The 1x1 shortcut conv exists where the
# block changes the channel count (the network decides where).
UNET_RESNET_MODULES = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
)
# Transformer2DModel (LDM SpatialTransformer) modules and BasicTransformerBlock modules: same names on both sides.
# proj_in / proj_out are 1x1 convs (C, C, 1, 1) without use_linear_projection and Linear (C, C) with it (SD2); the
# LDM checkpoint stores them in the same form as diffusers, so no reshape.
TRANSFORMER_MODULES = ("norm", "proj_in", "proj_out")
TRANSFORMER_BLOCK_MODULES = (
    "norm1", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "norm2", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "norm3", "ff.net.0.proj", "ff.net.2",
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
    unet = UNetConfig.from_diffusers(config)
    layers, levels = unet.layers_per_block, unet.levels
    per_level = layers + 1
    resnet_modules = dict(UNET_RESNET_MODULES)
    resnet = rf"resnets\.(?P<j>{INDEX})\.{_one_of(resnet_modules, 'module')}\.{PARAM}"
    transformer = (rf"attentions\.(?P<j>{INDEX})\.(?P<tail>{_one_of(TRANSFORMER_MODULES)}"
                   rf"|transformer_blocks\.{INDEX}\.{_one_of(TRANSFORMER_BLOCK_MODULES)})\.{PARAM}")
    level = rf"(?P<level>{INDEX})"

    def resnet_tail(m: re.Match) -> str:
        return f"0.{resnet_modules[m['module']]}.{m['param']}"

    def transformer_tail(m: re.Match) -> str:
        return f"1.{m['tail']}.{m['param']}"

    def input_block(m: re.Match) -> int:
        return per_level * _below(m, "level", levels) + _below(m, "j", layers) + 1

    def output_block(m: re.Match) -> int:
        return per_level * _below(m, "level", levels) + _below(m, "j", per_level)

    def middle_resnet(m: re.Match) -> str:  # middle_block.0 and .2; the transformer is .1
        return f"middle_block.{2 * _below(m, 'j', 2)}.{resnet_modules[m['module']]}.{m['param']}"

    def middle_transformer(m: re.Match) -> str:  # the one transformer, between the resnets
        _below(m, "j", 1)
        return f"middle_block.1.{m['tail']}.{m['param']}"

    def downsampler(m: re.Match) -> str:
        index = per_level * _below(m, "level", levels - 1) + layers + 1
        return f"input_blocks.{index}.0.op.{m['param']}"

    def upsampler(m: re.Match) -> str:
        up_level = _below(m, "level", levels - 1)
        position = 2 if unet.up_has_attention(up_level) else 1  # after the resnet and the transformer, if any
        return f"output_blocks.{per_level * up_level + layers}.{position}.conv.{m['param']}"

    rules = (
        Rule(rf"{_one_of(UNET_TOP_MODULES, 'module')}\.{PARAM}",
             lambda m: f"{UNET_TOP_MODULES[m['module']]}.{m['param']}"),
        Rule(rf"down_blocks\.{level}\.{resnet}", lambda m: f"input_blocks.{input_block(m)}.{resnet_tail(m)}"),
        Rule(rf"down_blocks\.{level}\.{transformer}",
             lambda m: f"input_blocks.{input_block(m)}.{transformer_tail(m)}"),
        Rule(rf"down_blocks\.{level}\.downsamplers\.0\.conv\.{PARAM}", downsampler),
        Rule(rf"mid_block\.{resnet}", middle_resnet),
        Rule(rf"mid_block\.{transformer}", middle_transformer),
        Rule(rf"up_blocks\.{level}\.{resnet}", lambda m: f"output_blocks.{output_block(m)}.{resnet_tail(m)}"),
        Rule(rf"up_blocks\.{level}\.{transformer}",
             lambda m: f"output_blocks.{output_block(m)}.{transformer_tail(m)}"),
        Rule(rf"up_blocks\.{level}\.upsamplers\.0\.conv\.{PARAM}", upsampler),
    )
    shapes = _network_shapes(lambda params: UNet2DConditionModel(params, unet))
    return _translate(shapes, rules, UNET_PREFIX, "UNet")


# ---------------------------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------------------------

# diffusers module of each half (encoder, decoder) -> LDM module of the same half.
VAE_HALF_MODULES = {"conv_in": "conv_in", "conv_norm_out": "norm_out", "conv_out": "conv_out"}
VAE_QUANT_CONVS = ("quant_conv", "post_quant_conv")  # same names on both sides
# diffusers ResnetBlock2D module -> LDM ResnetBlock module; the shortcut exists where the channel count changes.
VAE_RESNET_MODULES = (
    ("norm1", "norm1"),
    ("conv1", "conv1"),
    ("norm2", "norm2"),
    ("conv2", "conv2"),
    ("conv_shortcut", "nin_shortcut"),
)
# diffusers Attention (Linear q/k/v/out) -> LDM AttnBlock (1x1 Conv2d q/k/v/proj_out, GroupNorm norm).
VAE_ATTENTION_LINEARS = (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))
VAE_ATTENTION_NORM = ("group_norm", "norm")
VAE_DOWN_BLOCKS = ("DownEncoderBlock2D",)
VAE_UP_BLOCKS = ("UpDecoderBlock2D",)


def vae_names(config: dict) -> NameMap:
    """AutoencoderKL <- ``first_stage_model.*``; ``config`` is the diffusers ``vae/config.json`` dict.

    Encoder level ``i`` is ``encoder.down.{i}`` (``block.{j}`` resnets, ``downsample.conv``). The decoder stores
    its levels by resolution, shallowest first, so diffusers' ``decoder.up_blocks.{i}`` (deepest first) is LDM's
    ``decoder.up.{n - 1 - i}``, each with ``layers_per_block + 1`` resnets and an ``upsample.conv``. The mid
    blocks' resnets are ``mid.block_1`` and ``mid.block_2``, their single-head attention ``mid.attn_1``, whose
    (C, C, 1, 1) conv kernels are read as the (C, C) Linear weights diffusers has.
    """
    for option, known in (("down_block_types", VAE_DOWN_BLOCKS), ("up_block_types", VAE_UP_BLOCKS)):
        for block_type in config[option]:
            if block_type not in known:
                raise ValueError(f"VAE {option} entry {block_type!r} is not supported by the single-file map")
    vae = VAEConfig.from_diffusers(config)
    levels = len(vae.block_out_channels)
    resnet_modules, linears = dict(VAE_RESNET_MODULES), dict(VAE_ATTENTION_LINEARS)
    resnet = rf"resnets\.(?P<j>{INDEX})\.{_one_of(resnet_modules, 'module')}\.{PARAM}"
    half = "(?P<half>encoder|decoder)"
    attention = rf"{half}\.mid_block\.attentions\.0"

    def resnet_tail(m: re.Match) -> str:
        return f"{resnet_modules[m['module']]}.{m['param']}"

    def decoder_level(m: re.Match) -> int:  # LDM's decoder.up is stored shallowest level first
        return levels - 1 - _below(m, "level", levels)

    rules = (
        Rule(rf"{half}\.{_one_of(VAE_HALF_MODULES, 'module')}\.{PARAM}",
             lambda m: f"{m['half']}.{VAE_HALF_MODULES[m['module']]}.{m['param']}"),
        Rule(rf"{_one_of(VAE_QUANT_CONVS, 'module')}\.{PARAM}", lambda m: f"{m['module']}.{m['param']}"),
        Rule(rf"encoder\.down_blocks\.(?P<level>{INDEX})\.{resnet}",
             lambda m: f"encoder.down.{_below(m, 'level', levels)}.block.{m['j']}.{resnet_tail(m)}"),
        Rule(rf"encoder\.down_blocks\.(?P<level>{INDEX})\.downsamplers\.0\.conv\.{PARAM}",
             lambda m: f"encoder.down.{_below(m, 'level', levels - 1)}.downsample.conv.{m['param']}"),
        Rule(rf"{half}\.mid_block\.{resnet}",
             lambda m: f"{m['half']}.mid.block_{_below(m, 'j', 2) + 1}.{resnet_tail(m)}"),
        Rule(rf"{attention}\.{re.escape(VAE_ATTENTION_NORM[0])}\.{PARAM}",
             lambda m: f"{m['half']}.mid.attn_1.{VAE_ATTENTION_NORM[1]}.{m['param']}"),
        Rule(rf"{attention}\.{_one_of(linears, 'module')}\.weight",  # stored (C, C, 1, 1), read as (C, C)
             lambda m: f"{m['half']}.mid.attn_1.{linears[m['module']]}.weight", as_canonical_shape=True),
        Rule(rf"{attention}\.{_one_of(linears, 'module')}\.bias",
             lambda m: f"{m['half']}.mid.attn_1.{linears[m['module']]}.bias"),
        Rule(rf"decoder\.up_blocks\.(?P<level>{INDEX})\.{resnet}",
             lambda m: f"decoder.up.{decoder_level(m)}.block.{m['j']}.{resnet_tail(m)}"),
        Rule(rf"decoder\.up_blocks\.(?P<level>{INDEX})\.upsamplers\.0\.conv\.{PARAM}",
             lambda m: f"decoder.up.{levels - 1 - _below(m, 'level', levels - 1)}.upsample.conv.{m['param']}"),
    )
    return _translate(_network_shapes(lambda params: Autoencoder(params, vae)), rules, VAE_PREFIX, "VAE")


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
