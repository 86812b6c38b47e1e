"""The denoising UNet of Stable Diffusion 1.x / 2.x: diffusers' ``UNet2DConditionModel``.

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models" (the LDM UNet), after Ho et
al. 2020 (DDPM) and Dhariwal & Nichol 2021: a UNet of ResNet blocks conditioned on the timestep through an
embedding added inside every block, with spatial transformers (self-attention, cross-attention to the text
encoder's hidden states, GEGLU feed-forward; Vaswani et al. 2017, Shazeer 2020) at the shallower levels.

Layout, with ``L = layers_per_block`` (SD: 4 levels of 320/640/1280/1280 channels, L = 2):

- ``conv_in``; down level ``i``: L x (resnet [+ transformer]), then a stride-2 conv except at the deepest level;
  every resnet/transformer output and every downsampler output is kept as a skip connection;
- ``mid_block``: resnet, transformer, resnet;
- up level ``i`` (deepest first): L + 1 x (concatenate the last skip, resnet [+ transformer]), then a nearest x2
  upsample and a conv except at the last level; ``conv_norm_out``, SiLU, ``conv_out``.

Tensor names are the diffusers state-dict names; the module attributes follow them. All arithmetic is float32.
"""

from __future__ import annotations

import math

import numpy as np

from ..config import UNetConfig
from ..errors import SdcliError
from ..ops import Ops
from .layers import LayerNorm, Weight, conv2d_from, group_norm_from, layer_norm_from, linear_from

# Fixed by diffusers' building blocks rather than by the config: Transformer2DModel's GroupNorm uses eps 1e-6 and
# BasicTransformerBlock's LayerNorms 1e-5 (CrossAttnDownBlock2D & co. pass neither), as LDM's SpatialTransformer.
TRANSFORMER_GROUP_NORM_EPS = 1e-6
TRANSFORMER_LAYER_NORM_EPS = 1e-5
FEED_FORWARD_MULT = 4  # GEGLU inner width = 4 x channels
FEED_FORWARD_VALUES = 2048 * 2560  # of the projection per pass through the feed-forward (see feed_forward)
MAX_PERIOD = 10000  # of the sinusoidal timestep embedding

Shapes = dict[str, tuple[int, ...]]


# -- shapes --------------------------------------------------------------------------------------------------------

def _module(shapes: Shapes, prefix: str, weight: tuple[int, ...], bias: bool = True) -> None:
    shapes[prefix + "weight"] = weight
    if bias:
        shapes[prefix + "bias"] = (weight[0],)


def _resnet_shapes(shapes: Shapes, prefix: str, in_channels: int, out_channels: int, temb: int) -> None:
    _module(shapes, prefix + "norm1.", (in_channels,))
    _module(shapes, prefix + "conv1.", (out_channels, in_channels, 3, 3))
    _module(shapes, prefix + "time_emb_proj.", (out_channels, temb))
    _module(shapes, prefix + "norm2.", (out_channels,))
    _module(shapes, prefix + "conv2.", (out_channels, out_channels, 3, 3))
    if in_channels != out_channels:
        _module(shapes, prefix + "conv_shortcut.", (out_channels, in_channels, 1, 1))


def _transformer_shapes(shapes: Shapes, prefix: str, channels: int, depth: int, config: UNetConfig) -> None:
    projection = (channels, channels) if config.use_linear_projection else (channels, channels, 1, 1)
    _module(shapes, prefix + "norm.", (channels,))
    _module(shapes, prefix + "proj_in.", projection)
    _module(shapes, prefix + "proj_out.", projection)
    inner = FEED_FORWARD_MULT * channels
    for layer in range(depth):
        block = f"{prefix}transformer_blocks.{layer}."
        for norm in ("norm1", "norm2", "norm3"):
            _module(shapes, f"{block}{norm}.", (channels,))
        for attention, context in (("attn1", channels), ("attn2", config.cross_attention_dim)):
            _module(shapes, f"{block}{attention}.to_q.", (channels, channels), bias=False)
            _module(shapes, f"{block}{attention}.to_k.", (channels, context), bias=False)
            _module(shapes, f"{block}{attention}.to_v.", (channels, context), bias=False)
            _module(shapes, f"{block}{attention}.to_out.0.", (channels, channels))
        _module(shapes, block + "ff.net.0.proj.", (2 * inner, channels))
        _module(shapes, block + "ff.net.2.", (channels, inner))


def unet_shapes(config: UNetConfig) -> Shapes:
    """Every tensor the UNet reads, by canonical (diffusers) name, with its shape."""
    channels, levels, layers = config.block_out_channels, config.levels, config.layers_per_block
    temb = config.time_embed_dim
    shapes: Shapes = {}
    _module(shapes, "conv_in.", (channels[0], config.in_channels, 3, 3))
    _module(shapes, "time_embedding.linear_1.", (temb, channels[0]))
    _module(shapes, "time_embedding.linear_2.", (temb, temb))
    for level in range(levels):
        for j in range(layers):
            in_channels = channels[max(level - 1, 0)] if j == 0 else channels[level]
            _resnet_shapes(shapes, f"down_blocks.{level}.resnets.{j}.", in_channels, channels[level], temb)
            if config.down_has_attention(level):
                _transformer_shapes(shapes, f"down_blocks.{level}.attentions.{j}.", channels[level],
                                    config.transformer_layers_per_block[level], config)
        if level < levels - 1:
            _module(shapes, f"down_blocks.{level}.downsamplers.0.conv.", (channels[level], channels[level], 3, 3))
    _resnet_shapes(shapes, "mid_block.resnets.0.", channels[-1], channels[-1], temb)
    _transformer_shapes(shapes, "mid_block.attentions.0.", channels[-1], config.transformer_layers_per_block[-1],
                        config)
    _resnet_shapes(shapes, "mid_block.resnets.1.", channels[-1], channels[-1], temb)
    for level, (in_channels, skips) in enumerate(_up_channels(config)):
        out_channels = config.block_out_channels[levels - 1 - level]
        for j, skip in enumerate(skips):
            _resnet_shapes(shapes, f"up_blocks.{level}.resnets.{j}.", in_channels[j] + skip, out_channels, temb)
            if config.up_has_attention(level):
                _transformer_shapes(shapes, f"up_blocks.{level}.attentions.{j}.", out_channels,
                                    config.transformer_layers_per_block[levels - 1 - level], config)
        if level < levels - 1:
            _module(shapes, f"up_blocks.{level}.upsamplers.0.conv.", (out_channels, out_channels, 3, 3))
    _module(shapes, "conv_norm_out.", (channels[0],))
    _module(shapes, "conv_out.", (config.out_channels, channels[0], 3, 3))
    return shapes


def _up_channels(config: UNetConfig) -> list[tuple[list[int], list[int]]]:
    """Per up level (deepest first): the channels each resnet receives from below, and of the skip it concatenates.

    Resnet 0 takes the previous up level's output, the others their own level's; the skips are consumed last
    first, so the level's final resnet takes the skip of the level below (the downsampler's input width).
    """
    reversed_channels = list(reversed(config.block_out_channels))
    levels, per_level = config.levels, config.layers_per_block + 1
    result = []
    for level in range(levels):
        out_channels = reversed_channels[level]
        previous = reversed_channels[max(level - 1, 0)]
        skip_last = reversed_channels[min(level + 1, levels - 1)]
        inputs = [previous] + [out_channels] * (per_level - 1)
        skips = [out_channels] * (per_level - 1) + [skip_last]
        result.append((inputs, skips))
    return result


# -- building blocks -------------------------------------------------------------------------------------------

def timestep_embedding(timesteps: np.ndarray, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> np.ndarray:
    """Sinusoidal embedding of (possibly fractional) timesteps, (B,) -> (B, dim), in float32 as diffusers.

    Frequencies ``exp(-ln(10000) k / (dim/2 - freq_shift))`` for k < dim/2 (Vaswani et al. 2017, as DDPM uses it);
    ``[sin, cos]`` of ``t * frequency``, swapped to ``[cos, sin]`` with ``flip_sin_to_cos`` (SD's setting).
    """
    half = dim // 2
    exponent = np.float32(-math.log(MAX_PERIOD)) * np.arange(half, dtype=np.float32)
    exponent = exponent / np.float32(half - freq_shift)
    frequencies = np.exp(exponent)  # (dim/2,)
    angles = timesteps.astype(np.float32)[:, None] * frequencies[None, :]  # (B, dim/2)
    parts = [np.cos(angles), np.sin(angles)] if flip_sin_to_cos else [np.sin(angles), np.cos(angles)]
    if dim % 2:
        parts.append(np.zeros((len(timesteps), 1), dtype=np.float32))
    return np.concatenate(parts, axis=1)  # (B, dim)


class ResnetBlock2D:
    """GroupNorm-SiLU-conv, plus the projected timestep embedding, GroupNorm-SiLU-conv, plus the (1x1-conv'd when
    the width changes) input; divided by ``output_scale_factor`` (1 except in the mid block's config)."""

    def __init__(self, ops: Ops, config: UNetConfig, weights: dict[str, Weight], prefix: str,
                 output_scale_factor: float = 1.0):
        groups, eps = config.norm_num_groups, config.norm_eps
        self.ops, self.output_scale_factor = ops, output_scale_factor
        self.norm1 = group_norm_from(ops, weights, prefix + "norm1.", groups, eps)
        self.conv1 = conv2d_from(ops, weights, prefix + "conv1.")
        self.time_emb_proj = linear_from(ops, weights, prefix + "time_emb_proj.")
        self.norm2 = group_norm_from(ops, weights, prefix + "norm2.", groups, eps)
        self.conv2 = conv2d_from(ops, weights, prefix + "conv2.")
        self.conv_shortcut = (conv2d_from(ops, weights, prefix + "conv_shortcut.")
                              if prefix + "conv_shortcut.weight" in weights else None)

    def __call__(self, x: np.ndarray, time_features: np.ndarray) -> np.ndarray:
        """x (B, Cin, H, W); ``time_features`` = SiLU(timestep embedding) (B, T) -> (B, Cout, H, W)."""
        h = self.conv1(self.norm1(x, silu=True))  # (B, Cout, H, W)
        h += self.time_emb_proj(time_features)[:, :, None, None]  # (B, Cout, 1, 1) broadcast over positions
        h = self.conv2(self.norm2(h, silu=True))
        h += self.conv_shortcut(x) if self.conv_shortcut is not None else x
        if self.output_scale_factor != 1:
            h /= np.float32(self.output_scale_factor)
        return h


class Attention:
    """Multi-head attention of x (B, T, C) over a context (B, S, Cc): itself (self-attention) or the text."""

    def __init__(self, ops: Ops, weights: dict[str, Weight], prefix: str, heads: int):
        self.ops, self.heads = ops, heads
        self.to_q = linear_from(ops, weights, prefix + "to_q.", bias=False)
        self.to_k = linear_from(ops, weights, prefix + "to_k.", bias=False)
        self.to_v = linear_from(ops, weights, prefix + "to_v.", bias=False)
        self.to_out = linear_from(ops, weights, prefix + "to_out.0.")

    def __call__(self, x: np.ndarray, context: np.ndarray | None = None,
                 norm: LayerNorm | None = None) -> np.ndarray:
        """Attention of ``norm(x)`` (x itself without a norm) over ``context`` (or itself). The normalised x is
        made here so that it goes once projected, before the attention allocates its output."""
        if norm is not None:
            x = norm(x)
        batch, tokens, width = x.shape
        bf16 = self.to_q.weight.precision == "bf16"
        q = self.ops.split_heads(self.to_q(x), self.heads, bf16=bf16)  # (B, nh, T, hs)
        source = x if context is None else context
        k = self.ops.split_heads(self.to_k(source), self.heads, bf16=bf16)  # (B, nh, S, hs)
        v = self.ops.split_heads(self.to_v(source), self.heads, bf16=bf16)
        del x, source
        y = self.ops.attention(q, k, v, bf16=bf16)  # (B, nh, T, hs), scale 1/sqrt(hs)
        del q, k, v  # before the output projection allocates: the peak of the UNet's memory is around here
        return self.to_out(y.transpose(0, 2, 1, 3).reshape(batch, tokens, width))  # (B, T, C)


class BasicTransformerBlock:
    """Pre-norm: x + attn1(norm1 x); x + attn2(norm2 x, text); x + GEGLU feed-forward(norm3 x)."""

    def __init__(self, ops: Ops, weights: dict[str, Weight], prefix: str, heads: int):
        self.ops = ops
        self.norm1 = layer_norm_from(ops, weights, prefix + "norm1.", TRANSFORMER_LAYER_NORM_EPS)
        self.attn1 = Attention(ops, weights, prefix + "attn1.", heads)
        self.norm2 = layer_norm_from(ops, weights, prefix + "norm2.", TRANSFORMER_LAYER_NORM_EPS)
        self.attn2 = Attention(ops, weights, prefix + "attn2.", heads)
        self.norm3 = layer_norm_from(ops, weights, prefix + "norm3.", TRANSFORMER_LAYER_NORM_EPS)
        self.ff_proj = linear_from(ops, weights, prefix + "ff.net.0.proj.")
        self.ff_out = linear_from(ops, weights, prefix + "ff.net.2.")

    def feed_forward(self, x: np.ndarray) -> np.ndarray:
        """GEGLU (Shazeer 2020): the projection's first half gated by GELU of its second half.

        Tokens are independent here, so they go through in pieces of at most FEED_FORWARD_VALUES values of the
        projection: the widest activation of the UNet, the (tokens, 2 inner) projection (84 MB at 64x64 latents,
        batch 2, and 42 MB at the next level), then stays at 21 MB, reused from one piece to the next instead of
        freshly mapped memory. The results are the same to the bit where the linear layers run sdcli's float32
        kernels (packed weights, from the avx512 CPU level up), which compute each row alike whatever the rows
        around it; numpy's matmul (below that level) may sum a piece in another order than the whole: float32
        rounding.
        """
        rows = x.reshape(-1, x.shape[-1])  # (B*T, C)
        piece_rows = max(1, FEED_FORWARD_VALUES // (2 * FEED_FORWARD_MULT * x.shape[-1]))
        if len(rows) <= piece_rows:
            return self.ff_out(self.ops.geglu(self.ff_proj(x)))  # (B, T, 2 inner) -> (B, T, inner) -> (B, T, C)
        out = np.empty(rows.shape, dtype=np.float32)  # (B*T, C): the feed-forward maps C to C
        for start in range(0, len(rows), piece_rows):
            piece = rows[start:start + piece_rows]
            out[start:start + len(piece)] = self.ff_out(self.ops.geglu(self.ff_proj(piece)))  # (n, C)
        return out.reshape(x.shape)

    def __call__(self, x: np.ndarray, context: np.ndarray) -> np.ndarray:
        """x (B, T, C), updated in place (the transformer's own array) and returned."""
        x += self.attn1(x, norm=self.norm1)
        x += self.attn2(x, context, norm=self.norm2)
        x += self.feed_forward(self.norm3(x))
        return x


class Transformer2DModel:
    """Spatial transformer: GroupNorm, proj_in, blocks over the H*W positions as tokens, proj_out, plus the input.

    proj_in/proj_out are 1x1 convs (SD1) or Linear layers on the token axis (SD2's ``use_linear_projection``).
    """

    def __init__(self, ops: Ops, config: UNetConfig, weights: dict[str, Weight], prefix: str, heads: int,
                 depth: int):
        self.ops, self.linear = ops, config.use_linear_projection
        self.norm = group_norm_from(ops, weights, prefix + "norm.", config.norm_num_groups,
                                    TRANSFORMER_GROUP_NORM_EPS)
        make = linear_from if self.linear else conv2d_from
        self.proj_in = make(ops, weights, prefix + "proj_in.")
        self.proj_out = make(ops, weights, prefix + "proj_out.")
        self.transformer_blocks = [BasicTransformerBlock(ops, weights, f"{prefix}transformer_blocks.{i}.", heads)
                                   for i in range(depth)]

    def __call__(self, x: np.ndarray, context: np.ndarray) -> np.ndarray:
        height, width = x.shape[2:]
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)  # (B, C, H, W)
        # (B, H*W, C) as a contiguous copy (a transposed view would be copied again by every op that reads it and
        # added into with strides); the blocks update it in place
        h = self.ops.channels_last(h)
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear:
            h = self.proj_out(h)
        h = self.ops.channels_first(h, height, width)  # (B, C, H, W)
        if not self.linear:
            h = self.proj_out(h)
        h += x  # h is a new array (the projection's, or channels_first's)
        return h


class Downsample2D:
    """3x3 conv with stride 2. ``downsample_padding`` 0 pads only bottom and right by one (diffusers, LDM)."""

    def __init__(self, ops: Ops, weights: dict[str, Weight], prefix: str, padding: int):
        self.asymmetric = padding == 0
        self.conv = conv2d_from(ops, weights, prefix + "conv.", stride=2, padding=padding)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.asymmetric:
            x = np.pad(x, ((0, 0), (0, 0), (0, 1), (0, 1)))  # (B, C, H + 1, W + 1)
        return self.conv(x)  # (B, C, ceil(H / 2), ceil(W / 2)) with padding 1


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source rows of a nearest-neighbour resize, as PyTorch's ``interpolate(size=...)`` picks them:
    ``floor(i * in/out)`` in float32 (so 2 -> 3 rows reads 0, 0, 1)."""
    scale = np.float32(in_size) / np.float32(out_size)
    indices = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(indices, in_size - 1)


class Upsample2D:
    """Nearest-neighbour upsampling to the skip connection's size (x2 unless the down path rounded an odd size
    up; diffusers then passes ``upsample_size``), then a 3x3 conv."""

    def __init__(self, ops: Ops, weights: dict[str, Weight], prefix: str):
        self.ops = ops
        self.conv = conv2d_from(ops, weights, prefix + "conv.")

    def __call__(self, x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        height, width = x.shape[-2:]
        if size == (2 * height, 2 * width):
            x = self.ops.upsample_nearest(x, 2)  # (B, C, 2H, 2W)
        else:
            x = x[:, :, nearest_indices(height, size[0])][:, :, :, nearest_indices(width, size[1])]  # (B, C, *size)
        return self.conv(x)


# -- levels and the network --------------------------------------------------------------------------------------

class UNetLevel:
    """One down or up block: resnets, each followed by a transformer where the block type has them, then the
    resampler (None at the deepest down / last up level)."""

    def __init__(self, ops: Ops, config: UNetConfig, weights: dict[str, Weight], prefix: str, count: int,
                 attention: bool, heads: int, depth: int, resample: str | None):
        self.resnets = [ResnetBlock2D(ops, config, weights, f"{prefix}resnets.{j}.") for j in range(count)]
        self.attentions = [Transformer2DModel(ops, config, weights, f"{prefix}attentions.{j}.", heads, depth)
                           for j in range(count)] if attention else []
        self.downsampler = (Downsample2D(ops, weights, prefix + "downsamplers.0.", config.downsample_padding)
                            if resample == "down" else None)
        self.upsampler = Upsample2D(ops, weights, prefix + "upsamplers.0.") if resample == "up" else None

    def layer(self, j: int, x: np.ndarray, time_features: np.ndarray, context: np.ndarray) -> np.ndarray:
        x = self.resnets[j](x, time_features)
        return self.attentions[j](x, context) if self.attentions else x


class UNetMidBlock2DCrossAttn:
    """Resnet, transformer, resnet at the deepest level."""

    def __init__(self, ops: Ops, config: UNetConfig, weights: dict[str, Weight]):
        scale = config.mid_block_scale_factor
        self.resnets = [ResnetBlock2D(ops, config, weights, f"mid_block.resnets.{j}.", scale) for j in range(2)]
        self.attention = Transformer2DModel(ops, config, weights, "mid_block.attentions.0.",
                                            config.num_attention_heads[-1], config.transformer_layers_per_block[-1])

    def __call__(self, x: np.ndarray, time_features: np.ndarray, context: np.ndarray) -> np.ndarray:
        x = self.resnets[0](x, time_features)
        return self.resnets[1](self.attention(x, context), time_features)


class UNet2DConditionModel:
    """(noisy latents, timesteps, text hidden states) -> the network's prediction (noise for epsilon models,
    velocity for v-prediction ones), shaped like the latents."""

    def __init__(self, ops: Ops, config: UNetConfig, weights: dict[str, Weight]):
        self.ops, self.config = ops, config
        levels, layers = config.levels, config.layers_per_block
        self.conv_in = conv2d_from(ops, weights, "conv_in.")
        self.time_linear_1 = linear_from(ops, weights, "time_embedding.linear_1.")
        self.time_linear_2 = linear_from(ops, weights, "time_embedding.linear_2.")
        self.down_blocks = [
            UNetLevel(ops, config, weights, f"down_blocks.{i}.", layers, config.down_has_attention(i),
                      config.num_attention_heads[i], config.transformer_layers_per_block[i],
                      "down" if i < levels - 1 else None)
            for i in range(levels)]
        self.mid_block = UNetMidBlock2DCrossAttn(ops, config, weights)
        self.up_blocks = [
            UNetLevel(ops, config, weights, f"up_blocks.{i}.", layers + 1, config.up_has_attention(i),
                      config.num_attention_heads[levels - 1 - i], config.transformer_layers_per_block[levels - 1 - i],
                      "up" if i < levels - 1 else None)
            for i in range(levels)]
        self.conv_norm_out = group_norm_from(ops, weights, "conv_norm_out.", config.norm_num_groups, config.norm_eps)
        self.conv_out = conv2d_from(ops, weights, "conv_out.")

    def check_inputs(self, sample: np.ndarray, timesteps: np.ndarray, context: np.ndarray) -> np.ndarray:
        """Shape checks with readable errors; returns the timesteps as one per batch entry (B,)."""
        config = self.config
        if sample.ndim != 4 or sample.shape[1] != config.in_channels or min(sample.shape) < 1:
            raise SdcliError(f"UNet sample must be (batch, {config.in_channels}, height, width) latents, "
                             f"got shape {sample.shape}")
        batch = sample.shape[0]
        if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != config.cross_attention_dim:
            raise SdcliError(f"UNet encoder_hidden_states must be ({batch}, tokens, {config.cross_attention_dim}) "
                             f"for latents of batch {batch}, got shape {context.shape}; does the text encoder "
                             "belong to this model?")
        if timesteps.ndim == 0:
            timesteps = np.full(batch, timesteps)
        if timesteps.shape != (batch,):
            raise SdcliError(f"UNet timesteps must be one value or one per batch entry ({batch},), "
                             f"got shape {timesteps.shape}")
        if not np.all(np.isfinite(timesteps)):
            raise SdcliError("UNet timesteps must be finite")
        return timesteps

    def __call__(self, sample: np.ndarray, timesteps: np.ndarray | float,
                 encoder_hidden_states: np.ndarray) -> np.ndarray:
        """sample (B, in_channels, h, w), timesteps (B,) or a scalar, encoder_hidden_states (B, S, D)
        -> (B, out_channels, h, w) float32. CFG batches [uncond, cond] as one batch of 2B."""
        sample = np.asarray(sample, dtype=np.float32)
        context = np.asarray(encoder_hidden_states, dtype=np.float32)
        timesteps = self.check_inputs(sample, np.asarray(timesteps, dtype=np.float64), context)
        config = self.config
        if config.center_input_sample:
            sample = 2 * sample - np.float32(1)

        embedding = timestep_embedding(timesteps, config.block_out_channels[0], config.flip_sin_to_cos,
                                       config.freq_shift)  # (B, C0)
        embedding = self.time_linear_2(self.ops.silu(self.time_linear_1(embedding)))  # (B, 4 C0)
        # Every resnet applies SiLU to the embedding before its own projection: done once here.
        time_features = self.ops.silu(embedding)  # (B, 4 C0)

        x = self.conv_in(sample)  # (B, C0, h, w)
        skips = [x]
        for block in self.down_blocks:
            for j in range(len(block.resnets)):
                x = block.layer(j, x, time_features, context)
                skips.append(x)
            if block.downsampler is not None:
                x = block.downsampler(x)  # (B, C, ceil(H/2), ceil(W/2))
                skips.append(x)

        x = self.mid_block(x, time_features, context)

        for block in self.up_blocks:
            for j in range(len(block.resnets)):
                x = np.concatenate([x, skips.pop()], axis=1)  # (B, C + C_skip, H, W)
                # the two calls of block.layer, written out so that the concatenation (21 MB at 64x64 latents)
                # goes before the transformer runs: an argument of block.layer would live through both
                x = block.resnets[j](x, time_features)
                if block.attentions:
                    x = block.attentions[j](x, context)
            if block.upsampler is not None:
                x = block.upsampler(x, skips[-1].shape[-2:])  # to the next skip's size

        x = self.conv_norm_out(x, silu=True)
        return self.conv_out(x)  # (B, out_channels, h, w)
