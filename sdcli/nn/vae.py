"""The KL autoencoder of Stable Diffusion 1.x/2.x: pixels <-> latents (diffusers ``AutoencoderKL``).

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", Sec. 3.1 and App. G: a
convolutional encoder maps an image to a diagonal Gaussian over latents at 1/8 resolution, a decoder maps latents
back. Both are stacks of pre-norm residual blocks (group norm, SiLU, 3x3 conv, twice) with one single-head
self-attention in the middle, at the lowest resolution. Tensor names are diffusers' ``AutoencoderKL`` state-dict
names (``encoder.*``, ``decoder.*``, ``quant_conv``, ``post_quant_conv``); every constant below is the one
diffusers' ``Encoder`` / ``Decoder`` pass to their blocks (group-norm eps 1e-6, attention heads = C / C = 1).

Images are float32 (B, 3, H, W) in [-1, 1]; latents are (B, 4, H/8, W/8) in the UNet's space, i.e. the
autoencoder's latents times ``scaling_factor``.
"""

from __future__ import annotations

import numpy as np

from ..config import VAEConfig
from .layers import Conv2d, GroupNorm, Linear, ParameterSource, check_images

NORM_EPS = 1e-6  # every group norm of the autoencoder, resnets and attention alike
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps the log-variance to this


class ResnetBlock:
    """diffusers ``ResnetBlock2D`` without a time embedding: x + conv2(silu(norm2(conv1(silu(norm1(x)))))), the
    residual through a 1x1 ``conv_shortcut`` where the channel count changes."""

    def __init__(self, params: ParameterSource, config: VAEConfig, in_channels: int, out_channels: int):
        groups = config.norm_num_groups
        self.ops = params.ops
        self.norm1 = GroupNorm(params.scope("norm1"), in_channels, groups, NORM_EPS)
        self.conv1 = Conv2d(params.scope("conv1"), in_channels, out_channels, 3)
        self.norm2 = GroupNorm(params.scope("norm2"), out_channels, groups, NORM_EPS)
        self.conv2 = Conv2d(params.scope("conv2"), out_channels, out_channels, 3)
        self.conv_shortcut = (Conv2d(params.scope("conv_shortcut"), in_channels, out_channels, 1)
                              if in_channels != out_channels else None)

    def __call__(self, x):
        h = self.conv1(self.norm1(x, silu=True))  # (B, Cout, H, W)
        h = self.conv2(self.norm2(h, silu=True))
        return self.ops.add_(h, self.conv_shortcut(x) if self.conv_shortcut is not None else x)


class MidBlockAttention:
    """Single-head self-attention over the H*W positions with a residual: diffusers ``Attention`` as
    ``UNetMidBlock2D`` builds it (``heads = C // attention_head_dim`` with ``attention_head_dim = C``), q/k/v/out
    Linear over the channels, scale 1/sqrt(C)."""

    def __init__(self, params: ParameterSource, config: VAEConfig, channels: int):
        self.ops = params.ops
        self.group_norm = GroupNorm(params.scope("group_norm"), channels, config.norm_num_groups, NORM_EPS)
        self.to_q, self.to_k, self.to_v = (Linear(params.scope(name), channels, channels)
                                           for name in ("to_q", "to_k", "to_v"))
        self.to_out = Linear(params.scope("to_out", 0), channels, channels)

    def __call__(self, x):
        ops = self.ops
        batch, channels, height, width = x.shape
        tokens = ops.channels_last(self.group_norm(x))  # (B, T, C)
        # One head of width C: (B, 1, T, C). The backend's attention streams over keys (cpu) or forms the
        # (T, T) scores per image (numpy: 64 MB at T = 64*64).
        q, k, v = (ops.reshape(projection(tokens), (batch, 1, height * width, channels))
                   for projection in (self.to_q, self.to_k, self.to_v))
        y = ops.attention(q, k, v, precision=self.to_q.weight.precision)  # (B, 1, T, C)
        y = ops.channels_first(self.to_out(ops.reshape(y, (batch, height * width, channels))), height, width)
        return ops.add_(y, x)  # (B, C, H, W)


class MidBlock:
    """diffusers ``UNetMidBlock2D`` of the autoencoder: resnet, attention (unless configured off), resnet."""

    def __init__(self, params: ParameterSource, config: VAEConfig, channels: int):
        self.first = ResnetBlock(params.scope("resnets", 0), config, channels, channels)
        self.attention = (MidBlockAttention(params.scope("attentions", 0), config, channels)
                          if config.mid_block_add_attention else None)
        self.second = ResnetBlock(params.scope("resnets", 1), config, channels, channels)

    def __call__(self, x):
        x = self.first(x)
        if self.attention is not None:
            x = self.attention(x)
        return self.second(x)


class Downsample:
    """Stride-2 3x3 conv after zero padding one row at the bottom and one column at the right only: diffusers
    ``Downsample2D`` with ``padding=0`` (LDM's asymmetric pad), so (H, W) -> (H/2, W/2) for even sizes."""

    def __init__(self, params: ParameterSource, channels: int):
        self.ops = params.ops
        self.conv = Conv2d(params.scope("conv"), channels, channels, 3, stride=2, padding=0)

    def __call__(self, x):
        return self.conv(self.ops.pad(x, ((0, 0), (0, 0), (0, 1), (0, 1))))  # (B, C, H + 1, W + 1) -> (B, C, H/2, W/2)


class Upsample:
    """Nearest-neighbour 2x upsampling, then a 3x3 conv (diffusers ``Upsample2D`` with use_conv)."""

    def __init__(self, params: ParameterSource, channels: int):
        self.ops = params.ops
        self.conv = Conv2d(params.scope("conv"), channels, channels, 3)

    def __call__(self, x):
        return self.conv(self.ops.upsample_nearest(x, 2))  # (B, C, 2H, 2W)


class Encoder:
    """diffusers ``vae.Encoder``: conv_in, one level per block_out_channels entry (resnets, then a downsample on
    all but the last), mid block, group norm, SiLU, conv_out to 2 * latent_channels (mean, log-variance)."""

    def __init__(self, params: ParameterSource, config: VAEConfig):
        channels = config.block_out_channels
        self.conv_in = Conv2d(params.scope("conv_in"), config.in_channels, channels[0], 3)
        self.layers: list = []
        for level, out_channels in enumerate(channels):
            block = params.scope("down_blocks", level)
            in_channels = channels[max(level - 1, 0)]
            self.layers += [ResnetBlock(block.scope("resnets", j), config, in_channels if j == 0 else out_channels,
                                        out_channels) for j in range(config.layers_per_block)]
            if level < len(channels) - 1:
                self.layers.append(Downsample(block.scope("downsamplers", 0), out_channels))
        self.mid_block = MidBlock(params.scope("mid_block"), config, channels[-1])
        self.conv_norm_out = GroupNorm(params.scope("conv_norm_out"), channels[-1], config.norm_num_groups,
                                       NORM_EPS)
        self.conv_out = Conv2d(params.scope("conv_out"), channels[-1], 2 * config.latent_channels, 3)  # mean, logvar

    def __call__(self, x):
        x = self.conv_in(x)  # (B, C0, H, W)
        for layer in self.layers:
            x = layer(x)
        x = self.mid_block(x)  # (B, C_last, H/f, W/f)
        return self.conv_out(self.conv_norm_out(x, silu=True))  # (B, 2 * latent, H/f, W/f)


class Decoder:
    """diffusers ``vae.Decoder``: conv_in, mid block, levels deepest first (layers_per_block + 1 resnets, then an
    upsample on all but the last), group norm, SiLU, conv_out to RGB."""

    def __init__(self, params: ParameterSource, config: VAEConfig):
        channels = list(reversed(config.block_out_channels))  # deepest level first, as diffusers' up_blocks
        self.conv_in = Conv2d(params.scope("conv_in"), config.latent_channels, channels[0], 3)
        self.mid_block = MidBlock(params.scope("mid_block"), config, channels[0])
        self.layers: list = []
        for level, out_channels in enumerate(channels):
            block = params.scope("up_blocks", level)
            in_channels = channels[max(level - 1, 0)]
            self.layers += [ResnetBlock(block.scope("resnets", j), config, in_channels if j == 0 else out_channels,
                                        out_channels) for j in range(config.layers_per_block + 1)]
            if level < len(channels) - 1:
                self.layers.append(Upsample(block.scope("upsamplers", 0), out_channels))
        self.conv_norm_out = GroupNorm(params.scope("conv_norm_out"), channels[-1], config.norm_num_groups,
                                       NORM_EPS)
        self.conv_out = Conv2d(params.scope("conv_out"), channels[-1], config.out_channels, 3)

    def __call__(self, z):
        x = self.mid_block(self.conv_in(z))  # (B, C_last, h, w)
        for layer in self.layers:
            x = layer(x)
        return self.conv_out(self.conv_norm_out(x, silu=True))  # (B, 3, f h, f w)


TILE_OVERLAP = 0.25  # diffusers' AutoencoderKL.tile_overlap_factor: neighbouring tiles share a quarter


class VaeDecoder:
    """UNet-space latents (B, 4, h, w) -> images (B, 3, 8h, 8w), float32 in about [-1, 1] (not clamped).

    Divides by ``scaling_factor``, applies post_quant_conv and the decoder. Images are decoded one at a time
    (the results do not depend on it; a 512x512 decode peaks near 0.7 GB of activations whatever the batch).

    ``tiling=True`` is diffusers' ``AutoencoderKL.enable_tiling()`` (the reference behaviour is its
    ``tiled_decode``): a latent wider or taller than ``tile_latent_size`` (the config's ``sample_size`` in latents,
    64 for SD1.5) is decoded in overlapping square tiles, ``tile_stride`` latents apart, and each tile's first
    ``blend_pixels`` rows and columns fade in from its neighbours above and to the left to hide the seams. The
    activations are then those of one tile (about 0.7 GB for SD1.5's 512-pixel tile) whatever the image size; the
    price is an image that differs slightly from the untiled decode (every tile normalises and attends over its
    own pixels only), and the same amount of work plus the overlaps. A latent within one tile decodes whole,
    exactly as without tiling.

    Built from the autoencoder's scope (its tensors are ``decoder.*`` and ``post_quant_conv.*``).
    """

    def __init__(self, params: ParameterSource, config: VAEConfig, tiling: bool = False):
        self.ops, self.config, self.tiling = params.ops, config, tiling
        latent = config.latent_channels
        self.post_quant_conv = (Conv2d(params.scope("post_quant_conv"), latent, latent, 1)
                                if config.use_post_quant_conv else None)
        self.decoder = Decoder(params.scope("decoder"), config)
        # diffusers' tile_sample_min_size, tile_latent_min_size and the derived sizes of tiled_decode.
        self.tile_sample_size = config.sample_size  # pixels per tile side (512 for SD1.5)
        self.tile_latent_size = int(config.sample_size / config.downscale)  # latents per tile side (64)
        self.tile_stride = int(self.tile_latent_size * (1 - TILE_OVERLAP))  # latents between tile starts (48)
        self.blend_pixels = int(self.tile_sample_size * TILE_OVERLAP)  # pixels faded across a seam (128)
        self.kept_pixels = self.tile_sample_size - self.blend_pixels  # pixels each tile contributes (384)

    def __call__(self, latents):
        ops = self.ops
        latents = check_images(latents, self.config.latent_channels, "latents")
        z = ops.div(latents, self.config.scaling_factor)  # (B, 4, h, w) in the autoencoder's own scale
        images = []
        for index in range(z.shape[0]):
            one = ops.narrow(z, 0, index, index + 1)  # (1, 4, h, w)
            if self.tiling and max(one.shape[2:]) > self.tile_latent_size:
                images.append(self._decode_tiled(one))
            else:
                images.append(self._decode_whole(one))  # (1, 3, 8h, 8w)
        return ops.concat(images, axis=0)  # (B, 3, 8h, 8w)

    def _decode_whole(self, z):
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)  # (1, 3, 8h, 8w)

    def _decode_tiled(self, z):
        """diffusers ``AutoencoderKL.tiled_decode`` for one image (1, 4, h, w) -> (1, 3, 8h, 8w).

        Tiles start every ``tile_stride`` latents and span up to ``tile_latent_size`` (those at the bottom and
        right edges are cut short). Each decoded tile is blended in place with the (already blended) tile above
        and the one to its left, then contributes its top-left ``kept_pixels`` square; the next tile's blended
        band covers the rest. Only the previous row of tiles is kept, not the whole grid.
        """
        ops = self.ops
        _, _, height, width = z.shape
        tile, keep = self.tile_latent_size, self.kept_pixels
        above: list | None = None  # the previous row's blended tiles, uncropped
        bands = []
        for top in range(0, height, self.tile_stride):
            row: list = []
            for column, left in enumerate(range(0, width, self.tile_stride)):
                piece = ops.narrow(ops.narrow(z, 2, top, min(top + tile, height)), 3, left, min(left + tile, width))
                pixels = self._decode_whole(piece)  # (1, 3, <= 8t, <= 8t)
                if above is not None:
                    ops.blend_(above[column], pixels, self.blend_pixels, axis=2)
                if row:
                    ops.blend_(row[-1], pixels, self.blend_pixels, axis=3)
                row.append(pixels)
            crops = [ops.narrow(ops.narrow(pixels, 2, 0, min(keep, pixels.shape[2])), 3, 0,
                                min(keep, pixels.shape[3])) for pixels in row]
            bands.append(ops.concat(crops, axis=3))  # (1, 3, <= keep, 8w)
            above = row
        return ops.concat(bands, axis=2)  # (1, 3, 8h, 8w)


class VaeEncoder:
    """Images (B, 3, H, W) in [-1, 1], H and W multiples of 8 -> UNet-space latents (B, 4, H/8, W/8).

    The encoder and quant_conv give the mean and log-variance of a diagonal Gaussian (the log-variance clamped to
    [-30, 20] as diffusers does); the latents are its mean, or with a numpy Generator ``rng`` a sample
    ``mean + exp(logvar / 2) * noise`` with standard normal float32 noise drawn on the host from ``rng``; times
    ``scaling_factor``. Built from the autoencoder's scope (``encoder.*``, ``quant_conv.*``).
    """

    def __init__(self, params: ParameterSource, config: VAEConfig):
        self.ops, self.config = params.ops, config
        self.encoder = Encoder(params.scope("encoder"), config)
        moments = 2 * config.latent_channels
        self.quant_conv = (Conv2d(params.scope("quant_conv"), moments, moments, 1) if config.use_quant_conv
                           else None)

    @property
    def scaling_factor(self) -> float:
        """The factor from the autoencoder's latents to the UNet's."""
        return self.config.scaling_factor

    def distribution(self, images):
        """(mean, logvar), each (B, 4, H/8, W/8), of the posterior in the autoencoder's own (unscaled) space."""
        ops = self.ops
        images = check_images(images, self.config.in_channels, "images", self.config.downscale)
        moments = []
        for index in range(images.shape[0]):  # one at a time, as in VaeDecoder
            one = self.encoder(ops.narrow(images, 0, index, index + 1))  # (1, 8, H/8, W/8)
            moments.append(self.quant_conv(one) if self.quant_conv is not None else one)
        moments = ops.concat(moments, axis=0)  # (B, 8, H/8, W/8)
        latent = self.config.latent_channels
        mean, logvar = ops.narrow(moments, 1, 0, latent), ops.narrow(moments, 1, latent, 2 * latent)
        return mean, ops.clip(logvar, *LOGVAR_RANGE)

    def __call__(self, images, rng: np.random.Generator | None = None):
        ops = self.ops
        mean, logvar = self.distribution(images)
        latents = mean
        if rng is not None:
            noise = ops.from_host(rng.standard_normal(mean.shape, dtype=np.float32))  # (B, 4, H/8, W/8), host RNG
            latents = ops.add(mean, ops.mul(ops.exp(ops.mul(logvar, 0.5)), noise))
        return ops.mul(latents, self.config.scaling_factor)


class Autoencoder:
    """Both halves of ``AutoencoderKL``, built from one scope (the tensors of ``vae/``)."""

    def __init__(self, params: ParameterSource, config: VAEConfig, tiling: bool = False):
        self.encoder = VaeEncoder(params, config)
        self.decoder = VaeDecoder(params, config, tiling=tiling)
