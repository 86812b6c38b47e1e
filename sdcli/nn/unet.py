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
from typing import Protocol

import numpy as np

from ..config import UNetConfig
from ..errors import SdcliError
from .layers import Conv2d, GroupNorm, LayerNorm, Linear, ParameterSource

# Fixed by diffusers' building blocks rather than by the config: Transformer2DModel's GroupNorm uses eps 1e-6 and
# BasicTransformerBlock's LayerNorms 1e-5 (CrossAttnDownBlock2D & co. pass neither), as LDM's SpatialTransformer.
TRANSFORMER_GROUP_NORM_EPS = 1e-6
TRANSFORMER_LAYER_NORM_EPS = 1e-5
FEED_FORWARD_MULT = 4  # GEGLU inner width = 4 x channels
FEED_FORWARD_VALUES = 2048 * 2560  # of the projection per pass through the feed-forward (see feed_forward)


def up_channels(config: UNetConfig) -> list[tuple[list[int], list[int]]]:
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

class ResnetBlock2D:
    """GroupNorm-SiLU-conv, plus the projected timestep embedding, GroupNorm-SiLU-conv, plus the (1x1-conv'd when
    the width changes) input; divided by ``output_scale_factor`` (1 except in the mid block's config)."""

    def __init__(self, params: ParameterSource, config: UNetConfig, in_channels: int, out_channels: int,
                 output_scale_factor: float = 1.0):
        groups, eps = config.norm_num_groups, config.norm_eps
        self.ops, self.output_scale_factor = params.ops, output_scale_factor
        self.norm1 = GroupNorm(params.scope("norm1"), in_channels, groups, eps)
        self.conv1 = Conv2d(params.scope("conv1"), in_channels, out_channels, 3)
        self.time_emb_proj = Linear(params.scope("time_emb_proj"), config.time_embed_dim, out_channels)
        self.norm2 = GroupNorm(params.scope("norm2"), out_channels, groups, eps)
        self.conv2 = Conv2d(params.scope("conv2"), out_channels, out_channels, 3)
        self.conv_shortcut = (Conv2d(params.scope("conv_shortcut"), in_channels, out_channels, 1)
                              if in_channels != out_channels else None)

    def __call__(self, x, time_features):
        """x (B, Cin, H, W); ``time_features`` = SiLU(timestep embedding) (B, T) -> (B, Cout, H, W)."""
        ops = self.ops
        h = self.conv1(self.norm1(x, silu=True))  # (B, Cout, H, W)
        time = self.time_emb_proj(time_features)  # (B, Cout)
        h = ops.add_(h, ops.reshape(time, (*time.shape, 1, 1)))  # (B, Cout, 1, 1) broadcast over positions
        h = self.conv2(self.norm2(h, silu=True))
        h = ops.add_(h, self.conv_shortcut(x) if self.conv_shortcut is not None else x)
        if self.output_scale_factor != 1:
            h = ops.div(h, self.output_scale_factor)
        return h


class Attention:
    """Multi-head attention of x (B, T, C) over a context (B, S, Cc): itself (self-attention) or the text."""

    def __init__(self, params: ParameterSource, channels: int, context_channels: int, heads: int):
        self.ops, self.heads = params.ops, heads
        self.to_q = Linear(params.scope("to_q"), channels, channels, bias=False)
        self.to_k = Linear(params.scope("to_k"), context_channels, channels, bias=False)
        self.to_v = Linear(params.scope("to_v"), context_channels, channels, bias=False)
        self.to_out = Linear(params.scope("to_out", 0), channels, channels)

    def __call__(self, x, context=None, norm: LayerNorm | None = None):
        """Attention of ``norm(x)`` (x itself without a norm) over ``context`` (or itself). The normalised x is
        made here so that it goes once projected, before the attention allocates its output."""
        ops, precision = self.ops, self.to_q.weight.precision
        if norm is not None:
            x = norm(x)
        q = ops.split_heads(self.to_q(x), self.heads, precision=precision)  # (B, nh, T, hs)
        source = x if context is None else context
        k = ops.split_heads(self.to_k(source), self.heads, precision=precision)  # (B, nh, S, hs)
        v = ops.split_heads(self.to_v(source), self.heads, precision=precision)
        del x, source
        y = ops.attention(q, k, v, precision=precision)  # (B, nh, T, hs), scale 1/sqrt(hs)
        del q, k, v  # before the output projection allocates: the peak of the UNet's memory is around here
        return self.to_out(ops.merge_heads(y))  # (B, T, C)


def sinusoidal_positions(count: int, channels: int) -> np.ndarray:
    """The sinusoidal position table of Vaswani et al. 2017 as diffusers' ``SinusoidalPositionalEmbedding``
    builds it in float32: row p holds sin(p f_k) at channel 2k and cos(p f_k) at 2k + 1, with the frequencies
    f_k = exp(2k (-ln 10000 / channels)). The exponents and angles are float32 products as torch forms them; exp,
    sin and cos are evaluated in float64 and rounded once (see ``timestep_embedding``). (count, channels)."""
    exponents = np.arange(0, channels, 2, dtype=np.float32) * np.float32(-math.log(10000.0) / channels)
    frequencies = np.exp(exponents.astype(np.float64)).astype(np.float32)  # (channels/2,)
    angles = (np.arange(count, dtype=np.float32)[:, None] * frequencies).astype(np.float64)  # float32 products
    table = np.zeros((count, channels))
    table[:, 0::2] = np.sin(angles)
    table[:, 1::2] = np.cos(angles)[:, : channels // 2]
    return table.astype(np.float32)


class BasicTransformerBlock:
    """Pre-norm: x + attn1(norm1 x); x + attn2(norm2 x, text); x + GEGLU feed-forward(norm3 x).

    With ``positions`` (AnimateDiff's temporal blocks): a stored table of that many sinusoidal position rows
    (``pos_embed.pe``, (1, positions, C)) is added to the normalised tokens before each attention, and attn2
    attends over the tokens themselves (its context is None)."""

    def __init__(self, params: ParameterSource, channels: int, context_channels: int, heads: int,
                 positions: int | None = None):
        self.ops = params.ops
        inner = FEED_FORWARD_MULT * channels
        self.position_table = None
        if positions is not None:
            self.position_table = params.scope("pos_embed").take(
                "pe", (1, positions, channels), default=lambda: sinusoidal_positions(positions, channels)[None])
        self.norm1 = LayerNorm(params.scope("norm1"), channels, TRANSFORMER_LAYER_NORM_EPS)
        self.attn1 = Attention(params.scope("attn1"), channels, channels, heads)
        self.norm2 = LayerNorm(params.scope("norm2"), channels, TRANSFORMER_LAYER_NORM_EPS)
        self.attn2 = Attention(params.scope("attn2"), channels, context_channels, heads)
        self.norm3 = LayerNorm(params.scope("norm3"), channels, TRANSFORMER_LAYER_NORM_EPS)
        self.ff_proj = Linear(params.scope("ff", "net", 0, "proj"), channels, 2 * inner)
        self.ff_out = Linear(params.scope("ff", "net", 2), inner, channels)

    def feed_forward(self, x):
        """GEGLU (Shazeer 2020): the projection's first half gated by GELU of its second half.

        Tokens are independent here, so they go through in pieces of at most FEED_FORWARD_VALUES values of the
        projection: the widest activation of the UNet, the (tokens, 2 inner) projection (84 MB at 64x64 latents,
        batch 2, and 42 MB at the next level), then stays at 21 MB, reused from one piece to the next instead of
        freshly mapped memory. The results are the same to the bit where the linear layers run sdcli's float32
        kernels (packed weights, from the avx512 CPU level up), which compute each row alike whatever the rows
        around it; numpy's matmul (below that level) may sum a piece in another order than the whole: float32
        rounding.
        """
        piece_rows = max(1, FEED_FORWARD_VALUES // (2 * FEED_FORWARD_MULT * x.shape[-1]))
        return self.ops.map_rows(lambda rows: self.ff_out(self.ops.geglu(self.ff_proj(rows))), x,
                                 piece_rows)  # (n, C) -> (n, 2 inner) -> (n, inner) -> (n, C)

    def __call__(self, x, context):
        """x (B, T, C), updated in place (the transformer's own array) and returned."""
        ops = self.ops
        norm1, norm2 = self.attention_norms(x.shape[1])
        x = ops.add_(x, self.attn1(x, norm=norm1))
        x = ops.add_(x, self.attn2(x, context, norm=norm2))
        return ops.add_(x, self.feed_forward(self.norm3(x)))

    def attention_norms(self, tokens: int):
        """The norms before attn1 and attn2 for sequences of ``tokens``: norm1 and norm2, each followed by adding
        the first ``tokens`` position rows where the block has a table."""
        if self.position_table is None:
            return self.norm1, self.norm2
        ops, positions = self.ops, self.positions(tokens)  # (1, T, C)
        return (lambda x: ops.add_(self.norm1(x), positions),  # (B, T, C)
                lambda x: ops.add_(self.norm2(x), positions))

    def positions(self, tokens: int):
        """The first ``tokens`` rows of the position table, (1, T, C): the table's one entry picked by the
        embedding op (the table stays in the backend), then narrowed."""
        table_rows = self.position_table.shape[1]
        if tokens > table_rows:
            raise SdcliError(f"{tokens} positions, the position table holds {table_rows}")
        table = self.ops.embedding(self.position_table, np.zeros(1, dtype=np.int64))  # (1, rows, C)
        return self.ops.narrow(table, 1, 0, tokens)


class Transformer2DModel:
    """Spatial transformer: GroupNorm, proj_in, blocks over the H*W positions as tokens, proj_out, plus the input.

    proj_in/proj_out are 1x1 convs (SD1) or Linear layers on the token axis (SD2's ``use_linear_projection``).
    """

    def __init__(self, params: ParameterSource, config: UNetConfig, channels: int, heads: int, depth: int):
        self.ops, self.linear = params.ops, config.use_linear_projection
        self.norm = GroupNorm(params.scope("norm"), channels, config.norm_num_groups, TRANSFORMER_GROUP_NORM_EPS)
        if self.linear:
            self.proj_in = Linear(params.scope("proj_in"), channels, channels)
            self.proj_out = Linear(params.scope("proj_out"), channels, channels)
        else:
            self.proj_in = Conv2d(params.scope("proj_in"), channels, channels, 1)
            self.proj_out = Conv2d(params.scope("proj_out"), channels, channels, 1)
        self.transformer_blocks = [
            BasicTransformerBlock(params.scope("transformer_blocks", i), channels, config.cross_attention_dim, heads)
            for i in range(depth)]

    def __call__(self, x, context):
        ops = self.ops
        height, width = x.shape[2:]
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)  # (B, C, H, W)
        # (B, H*W, C) as a contiguous copy (a transposed view would be copied again by every op that reads it and
        # added into with strides); the blocks update it in place
        h = ops.channels_last(h)
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear:
            h = self.proj_out(h)
        h = ops.channels_first(h, height, width)  # (B, C, H, W)
        if not self.linear:
            h = self.proj_out(h)
        return ops.add_(h, x)  # h is a new array (the projection's, or channels_first's)


class Downsample2D:
    """3x3 conv with stride 2. ``downsample_padding`` 0 pads only bottom and right by one (diffusers, LDM)."""

    def __init__(self, params: ParameterSource, channels: int, padding: int):
        self.ops, self.asymmetric = params.ops, padding == 0
        self.conv = Conv2d(params.scope("conv"), channels, channels, 3, stride=2, padding=padding)

    def __call__(self, x):
        if self.asymmetric:
            x = self.ops.pad(x, ((0, 0), (0, 0), (0, 1), (0, 1)))  # (B, C, H + 1, W + 1)
        return self.conv(x)  # (B, C, ceil(H / 2), ceil(W / 2)) with padding 1


class Upsample2D:
    """Nearest-neighbour upsampling to the skip connection's size (x2 unless the down path rounded an odd size
    up; diffusers then passes ``upsample_size``), then a 3x3 conv."""

    def __init__(self, params: ParameterSource, channels: int):
        self.ops = params.ops
        self.conv = Conv2d(params.scope("conv"), channels, channels, 3)

    def __call__(self, x, size: tuple[int, int]):
        height, width = x.shape[-2:]
        if tuple(size) == (2 * height, 2 * width):
            x = self.ops.upsample_nearest(x, 2)  # (B, C, 2H, 2W)
        else:
            x = self.ops.resize_nearest(x, tuple(size))  # (B, C, *size)
        return self.conv(x)


# -- levels and the network --------------------------------------------------------------------------------------

class UNetLevel:
    """One down or up block: resnets, each followed by a transformer where the block type has them, then the
    resampler (None at the deepest down / last up level)."""

    def __init__(self, params: ParameterSource, config: UNetConfig, in_channels: list[int], out_channels: int,
                 attention: bool, heads: int, depth: int, resample: str | None):
        self.resnets = [ResnetBlock2D(params.scope("resnets", j), config, channels, out_channels)
                        for j, channels in enumerate(in_channels)]
        self.attentions = [Transformer2DModel(params.scope("attentions", j), config, out_channels, heads, depth)
                           for j in range(len(in_channels))] if attention else []
        self.downsampler = (Downsample2D(params.scope("downsamplers", 0), out_channels, config.downsample_padding)
                            if resample == "down" else None)
        self.upsampler = Upsample2D(params.scope("upsamplers", 0), out_channels) if resample == "up" else None

    def layer(self, j: int, x, time_features, context):
        x = self.resnets[j](x, time_features)
        return self.attentions[j](x, context) if self.attentions else x


class TemporalLayers(Protocol):
    """Layers over the frame axis that run after the UNet's own (AnimateDiff's motion modules,
    :mod:`sdcli.nn.motion`): after layer ``layer`` of down level ``level``, after the mid block's transformer, and
    after layer ``layer`` of up level ``level``. Each takes and returns x (B*F, C, h, w), the frames of each video
    consecutive."""

    def down(self, level: int, layer: int, x): ...

    def mid(self, x): ...

    def up(self, level: int, layer: int, x): ...


class UNetMidBlock2DCrossAttn:
    """Resnet, transformer, resnet at the deepest level."""

    def __init__(self, params: ParameterSource, config: UNetConfig):
        channels, scale = config.block_out_channels[-1], config.mid_block_scale_factor
        self.resnets = [ResnetBlock2D(params.scope("resnets", j), config, channels, channels, scale)
                        for j in range(2)]
        self.attention = Transformer2DModel(params.scope("attentions", 0), config, channels,
                                            config.num_attention_heads[-1], config.transformer_layers_per_block[-1])

    def __call__(self, x, time_features, context, temporal: TemporalLayers | None = None):
        x = self.attention(self.resnets[0](x, time_features), context)
        if temporal is not None:
            x = temporal.mid(x)
        return self.resnets[1](x, time_features)


class UNet2DConditionModel:
    """(noisy latents, timesteps, text hidden states) -> the network's prediction (noise for epsilon models,
    velocity for v-prediction ones), shaped like the latents."""

    def __init__(self, params: ParameterSource, config: UNetConfig):
        self.ops, self.config = params.ops, config
        channels, levels, layers = config.block_out_channels, config.levels, config.layers_per_block
        self.conv_in = Conv2d(params.scope("conv_in"), config.in_channels, channels[0], 3)
        self.time_linear_1 = Linear(params.scope("time_embedding", "linear_1"), channels[0], config.time_embed_dim)
        self.time_linear_2 = Linear(params.scope("time_embedding", "linear_2"), config.time_embed_dim,
                                    config.time_embed_dim)
        self.down_blocks = [
            UNetLevel(params.scope("down_blocks", i), config,
                      [channels[max(i - 1, 0)]] + [channels[i]] * (layers - 1), channels[i],
                      config.down_has_attention(i), config.num_attention_heads[i],
                      config.transformer_layers_per_block[i], "down" if i < levels - 1 else None)
            for i in range(levels)]
        self.mid_block = UNetMidBlock2DCrossAttn(params.scope("mid_block"), config)
        self.up_blocks = [
            UNetLevel(params.scope("up_blocks", i), config, [c + skip for c, skip in zip(*up_channels(config)[i])],
                      channels[levels - 1 - i], config.up_has_attention(i), config.num_attention_heads[levels - 1 - i],
                      config.transformer_layers_per_block[levels - 1 - i], "up" if i < levels - 1 else None)
            for i in range(levels)]
        self.conv_norm_out = GroupNorm(params.scope("conv_norm_out"), channels[0], config.norm_num_groups,
                                       config.norm_eps)
        self.conv_out = Conv2d(params.scope("conv_out"), channels[0], config.out_channels, 3)

    def check_inputs(self, sample, timesteps: np.ndarray, context) -> np.ndarray:
        """Shape checks with readable errors; returns the timesteps as one per batch entry (B,)."""
        config = self.config
        if len(sample.shape) != 4 or sample.shape[1] != config.in_channels or min(sample.shape) < 1:
            raise SdcliError(f"UNet sample must be (batch, {config.in_channels}, height, width) latents, "
                             f"got shape {tuple(sample.shape)}")
        batch = sample.shape[0]
        if len(context.shape) != 3 or context.shape[0] != batch or context.shape[2] != config.cross_attention_dim:
            raise SdcliError(f"UNet encoder_hidden_states must be ({batch}, tokens, {config.cross_attention_dim}) "
                             f"for latents of batch {batch}, got shape {tuple(context.shape)}; does the text "
                             "encoder belong to this model?")
        if timesteps.ndim == 0:
            timesteps = np.full(batch, timesteps)
        if timesteps.shape != (batch,):
            raise SdcliError(f"UNet timesteps must be one value or one per batch entry ({batch},), "
                             f"got shape {timesteps.shape}")
        if not np.all(np.isfinite(timesteps)):
            raise SdcliError("UNet timesteps must be finite")
        return timesteps

    def in_pieces(self, layer, piece: int | None, x, *per_entry):
        """``layer(x, *per_entry)`` run over at most ``piece`` batch entries at a time (None: all at once) and
        joined: the UNet's own layers treat the entries of a batch independently, and a layer's working arrays
        are then a piece's. The layers never write into their inputs, so the pieces may be views."""
        batch = x.shape[0]
        if piece is None or batch <= piece:
            return layer(x, *per_entry)
        ops = self.ops
        return ops.concat([layer(*(ops.narrow(array, 0, start, min(start + piece, batch)) for array in (x, *per_entry)))
                           for start in range(0, batch, piece)], axis=0)

    def __call__(self, sample, timesteps: np.ndarray | float, encoder_hidden_states,
                 temporal: TemporalLayers | None = None, piece: int | None = None):
        """sample (B, in_channels, h, w), host timesteps (B,) or a scalar, encoder_hidden_states (B, S, D)
        -> (B, out_channels, h, w). CFG batches [uncond, cond] as one batch of 2B. ``temporal``: layers over the
        frame axis run after the UNet's own layers (the batch is then videos' frames, see TemporalLayers).
        ``piece``: the levels' layers run over at most that many batch entries at a time (memory; the same
        results)."""
        ops, config = self.ops, self.config
        context = encoder_hidden_states
        timesteps = self.check_inputs(sample, np.asarray(timesteps, dtype=np.float64), context)
        if config.center_input_sample:
            sample = ops.add(ops.mul(sample, 2), -1)

        embedding = ops.timestep_embedding(timesteps, config.block_out_channels[0],
                                           flip_sin_to_cos=config.flip_sin_to_cos,
                                           freq_shift=config.freq_shift)  # (B, C0)
        embedding = self.time_linear_2(ops.silu(self.time_linear_1(embedding)))  # (B, 4 C0)
        # Every resnet applies SiLU to the embedding before its own projection: done once here.
        time_features = ops.silu(embedding)  # (B, 4 C0)

        x = self.conv_in(sample)  # (B, C0, h, w)
        skips = [x]
        for i, block in enumerate(self.down_blocks):
            for j in range(len(block.resnets)):
                x = self.in_pieces(lambda *arrays: block.layer(j, *arrays), piece, x, time_features, context)
                if temporal is not None:
                    x = temporal.down(i, j, x)
                skips.append(x)
            if block.downsampler is not None:
                x = self.in_pieces(block.downsampler, piece, x)  # (B, C, ceil(H/2), ceil(W/2))
                skips.append(x)

        x = self.mid_block(x, time_features, context, temporal)

        for i, block in enumerate(self.up_blocks):
            for j in range(len(block.resnets)):
                x = ops.concat([x, skips.pop()], axis=1)  # (B, C + C_skip, H, W)
                # the two calls of block.layer, written out so that the concatenation (21 MB at 64x64 latents)
                # goes before the transformer runs: an argument of block.layer would live through both
                x = self.in_pieces(block.resnets[j], piece, x, time_features)
                if block.attentions:
                    x = self.in_pieces(block.attentions[j], piece, x, context)
                if temporal is not None:
                    x = temporal.up(i, j, x)
            if block.upsampler is not None:
                size = skips[-1].shape[-2:]  # to the next skip's size
                x = self.in_pieces(lambda pieces: block.upsampler(pieces, size), piece, x)

        x = self.conv_norm_out(x, silu=True)
        return self.conv_out(x)  # (B, out_channels, h, w)
