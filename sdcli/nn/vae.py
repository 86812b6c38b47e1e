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

import logging

import numpy as np

from ..config import VAEConfig
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..ops import Ops, get_ops
from .layers import Weight, checked_images, load_weights, conv2d_from, group_norm_from, linear_from

log = logging.getLogger("sdcli")

NORM_EPS = 1e-6  # every group norm of the autoencoder, resnets and attention alike
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps the log-variance to this


def _put_conv(shapes: dict, name: str, out_channels: int, in_channels: int, kernel: int) -> None:
    shapes[f"{name}.weight"] = (out_channels, in_channels, kernel, kernel)
    shapes[f"{name}.bias"] = (out_channels,)


def _put_norm(shapes: dict, name: str, channels: int) -> None:
    shapes[f"{name}.weight"] = (channels,)
    shapes[f"{name}.bias"] = (channels,)


def _put_resnet(shapes: dict, name: str, in_channels: int, out_channels: int) -> None:
    _put_norm(shapes, f"{name}.norm1", in_channels)
    _put_conv(shapes, f"{name}.conv1", out_channels, in_channels, 3)
    _put_norm(shapes, f"{name}.norm2", out_channels)
    _put_conv(shapes, f"{name}.conv2", out_channels, out_channels, 3)
    if in_channels != out_channels:
        _put_conv(shapes, f"{name}.conv_shortcut", out_channels, in_channels, 1)


def _put_mid_block(shapes: dict, name: str, channels: int, attention: bool) -> None:
    _put_resnet(shapes, f"{name}.resnets.0", channels, channels)
    if attention:
        attention_name = f"{name}.attentions.0"
        _put_norm(shapes, f"{attention_name}.group_norm", channels)
        for projection in ("to_q", "to_k", "to_v", "to_out.0"):
            shapes[f"{attention_name}.{projection}.weight"] = (channels, channels)
            shapes[f"{attention_name}.{projection}.bias"] = (channels,)
    _put_resnet(shapes, f"{name}.resnets.1", channels, channels)


def vae_encoder_shapes(config: VAEConfig) -> dict[str, tuple[int, ...]]:
    """The encoder's tensors (``encoder.*`` and ``quant_conv``) by canonical name, with their shapes."""
    channels = config.block_out_channels
    shapes: dict[str, tuple[int, ...]] = {}
    _put_conv(shapes, "encoder.conv_in", channels[0], config.in_channels, 3)
    for level, out_channels in enumerate(channels):
        in_channels = channels[max(level - 1, 0)]
        for j in range(config.layers_per_block):
            _put_resnet(shapes, f"encoder.down_blocks.{level}.resnets.{j}", in_channels if j == 0 else out_channels,
                        out_channels)
        if level < len(channels) - 1:
            _put_conv(shapes, f"encoder.down_blocks.{level}.downsamplers.0.conv", out_channels, out_channels, 3)
    _put_mid_block(shapes, "encoder.mid_block", channels[-1], config.mid_block_add_attention)
    _put_norm(shapes, "encoder.conv_norm_out", channels[-1])
    _put_conv(shapes, "encoder.conv_out", 2 * config.latent_channels, channels[-1], 3)  # mean and log-variance
    if config.use_quant_conv:
        _put_conv(shapes, "quant_conv", 2 * config.latent_channels, 2 * config.latent_channels, 1)
    return shapes


def vae_decoder_shapes(config: VAEConfig) -> dict[str, tuple[int, ...]]:
    """The decoder's tensors (``decoder.*`` and ``post_quant_conv``) by canonical name, with their shapes."""
    channels = list(reversed(config.block_out_channels))  # deepest level first, as diffusers' up_blocks
    shapes: dict[str, tuple[int, ...]] = {}
    if config.use_post_quant_conv:
        _put_conv(shapes, "post_quant_conv", config.latent_channels, config.latent_channels, 1)
    _put_conv(shapes, "decoder.conv_in", channels[0], config.latent_channels, 3)
    _put_mid_block(shapes, "decoder.mid_block", channels[0], config.mid_block_add_attention)
    for level, out_channels in enumerate(channels):
        in_channels = channels[max(level - 1, 0)]
        for j in range(config.layers_per_block + 1):
            _put_resnet(shapes, f"decoder.up_blocks.{level}.resnets.{j}", in_channels if j == 0 else out_channels,
                        out_channels)
        if level < len(channels) - 1:
            _put_conv(shapes, f"decoder.up_blocks.{level}.upsamplers.0.conv", out_channels, out_channels, 3)
    _put_norm(shapes, "decoder.conv_norm_out", channels[-1])
    _put_conv(shapes, "decoder.conv_out", config.out_channels, channels[-1], 3)
    return shapes


def vae_shapes(config: VAEConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the autoencoder (encoder and decoder) by canonical name, with its shape."""
    return {**vae_encoder_shapes(config), **vae_decoder_shapes(config)}


class ResnetBlock:
    """diffusers ``ResnetBlock2D`` without a time embedding: x + conv2(silu(norm2(conv1(silu(norm1(x)))))), the
    residual through a 1x1 ``conv_shortcut`` where the channel count changes."""

    def __init__(self, ops: Ops, config: VAEConfig, weights: dict[str, Weight], prefix: str):
        groups = config.norm_num_groups
        self.ops = ops
        self.norm1 = group_norm_from(ops, weights, prefix + "norm1.", groups, NORM_EPS)
        self.conv1 = conv2d_from(ops, weights, prefix + "conv1.")
        self.norm2 = group_norm_from(ops, weights, prefix + "norm2.", groups, NORM_EPS)
        self.conv2 = conv2d_from(ops, weights, prefix + "conv2.")
        shortcut = prefix + "conv_shortcut."
        self.conv_shortcut = conv2d_from(ops, weights, shortcut) if shortcut + "weight" in weights else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        h = self.conv1(self.norm1(x, silu=True))  # (B, Cout, H, W)
        h = self.conv2(self.norm2(h, silu=True))
        residual = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        h += residual
        return h


class MidBlockAttention:
    """Single-head self-attention over the H*W positions with a residual: diffusers ``Attention`` as
    ``UNetMidBlock2D`` builds it (``heads = C // attention_head_dim`` with ``attention_head_dim = C``), q/k/v/out
    Linear over the channels, scale 1/sqrt(C)."""

    def __init__(self, ops: Ops, config: VAEConfig, weights: dict[str, Weight], prefix: str):
        self.ops = ops
        self.group_norm = group_norm_from(ops, weights, prefix + "group_norm.", config.norm_num_groups, NORM_EPS)
        self.to_q = linear_from(ops, weights, prefix + "to_q.")
        self.to_k = linear_from(ops, weights, prefix + "to_k.")
        self.to_v = linear_from(ops, weights, prefix + "to_v.")
        self.to_out = linear_from(ops, weights, prefix + "to_out.0.")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        height, width = x.shape[2:]
        tokens = self.ops.channels_last(self.group_norm(x))  # (B, T, C)
        # One head of width C: (B, 1, T, C). The backend's attention streams over keys (cpu) or forms the
        # (T, T) scores per image (numpy: 64 MB at T = 64*64).
        q, k, v = (projection(tokens)[:, None] for projection in (self.to_q, self.to_k, self.to_v))
        y = self.ops.attention(q, k, v, bf16=self.to_q.weight.precision == "bf16")[:, 0]  # (B, T, C)
        y = self.ops.channels_first(self.to_out(y), height, width)  # (B, C, H, W)
        y += x
        return y


class MidBlock:
    """diffusers ``UNetMidBlock2D`` of the autoencoder: resnet, attention (unless configured off), resnet."""

    def __init__(self, ops: Ops, config: VAEConfig, weights: dict[str, Weight], prefix: str):
        self.first = ResnetBlock(ops, config, weights, prefix + "resnets.0.")
        self.attention = (MidBlockAttention(ops, config, weights, prefix + "attentions.0.")
                          if config.mid_block_add_attention else None)
        self.second = ResnetBlock(ops, config, weights, prefix + "resnets.1.")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = self.first(x)
        if self.attention is not None:
            x = self.attention(x)
        return self.second(x)


class Downsample:
    """Stride-2 3x3 conv after zero padding one row at the bottom and one column at the right only: diffusers
    ``Downsample2D`` with ``padding=0`` (LDM's asymmetric pad), so (H, W) -> (H/2, W/2) for even sizes."""

    def __init__(self, ops: Ops, weights: dict[str, Weight], prefix: str):
        self.conv = conv2d_from(ops, weights, prefix + "conv.", stride=2, padding=0)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        padded = np.pad(x, ((0, 0), (0, 0), (0, 1), (0, 1)))  # (B, C, H + 1, W + 1)
        return self.conv(padded)  # (B, C, H/2, W/2)


class Upsample:
    """Nearest-neighbour 2x upsampling, then a 3x3 conv (diffusers ``Upsample2D`` with use_conv)."""

    def __init__(self, ops: Ops, weights: dict[str, Weight], prefix: str):
        self.ops = ops
        self.conv = conv2d_from(ops, weights, prefix + "conv.")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.conv(self.ops.upsample_nearest(x, 2))  # (B, C, 2H, 2W)


class Encoder:
    """diffusers ``vae.Encoder``: conv_in, one level per block_out_channels entry (resnets, then a downsample on
    all but the last), mid block, group norm, SiLU, conv_out to 2 * latent_channels (mean, log-variance)."""

    def __init__(self, ops: Ops, config: VAEConfig, weights: dict[str, Weight]):
        self.ops = ops
        self.conv_in = conv2d_from(ops, weights, "encoder.conv_in.")
        self.layers: list = []
        levels = len(config.block_out_channels)
        for level in range(levels):
            prefix = f"encoder.down_blocks.{level}."
            self.layers += [ResnetBlock(ops, config, weights, f"{prefix}resnets.{j}.")
                            for j in range(config.layers_per_block)]
            if level < levels - 1:
                self.layers.append(Downsample(ops, weights, f"{prefix}downsamplers.0."))
        self.mid_block = MidBlock(ops, config, weights, "encoder.mid_block.")
        self.conv_norm_out = group_norm_from(ops, weights, "encoder.conv_norm_out.", config.norm_num_groups,
                                             NORM_EPS)
        self.conv_out = conv2d_from(ops, weights, "encoder.conv_out.")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = self.conv_in(x)  # (B, C0, H, W)
        for layer in self.layers:
            x = layer(x)
        x = self.mid_block(x)  # (B, C_last, H/f, W/f)
        return self.conv_out(self.conv_norm_out(x, silu=True))  # (B, 2 * latent, H/f, W/f)


class Decoder:
    """diffusers ``vae.Decoder``: conv_in, mid block, levels deepest first (layers_per_block + 1 resnets, then an
    upsample on all but the last), group norm, SiLU, conv_out to RGB."""

    def __init__(self, ops: Ops, config: VAEConfig, weights: dict[str, Weight]):
        self.ops = ops
        self.conv_in = conv2d_from(ops, weights, "decoder.conv_in.")
        self.mid_block = MidBlock(ops, config, weights, "decoder.mid_block.")
        self.layers: list = []
        levels = len(config.block_out_channels)
        for level in range(levels):
            prefix = f"decoder.up_blocks.{level}."
            self.layers += [ResnetBlock(ops, config, weights, f"{prefix}resnets.{j}.")
                            for j in range(config.layers_per_block + 1)]
            if level < levels - 1:
                self.layers.append(Upsample(ops, weights, f"{prefix}upsamplers.0."))
        self.conv_norm_out = group_norm_from(ops, weights, "decoder.conv_norm_out.", config.norm_num_groups,
                                             NORM_EPS)
        self.conv_out = conv2d_from(ops, weights, "decoder.conv_out.")

    def __call__(self, z: np.ndarray) -> np.ndarray:
        x = self.mid_block(self.conv_in(z))  # (B, C_last, h, w)
        for layer in self.layers:
            x = layer(x)
        return self.conv_out(self.conv_norm_out(x, silu=True))  # (B, 3, f h, f w)


TILE_OVERLAP = 0.25  # diffusers' AutoencoderKL.tile_overlap_factor: neighbouring tiles share a quarter


def blend_rows(above: np.ndarray, below: np.ndarray, extent: int) -> None:
    """Fade the top ``extent`` rows of ``below`` in from the bottom rows of ``above``, in place: row y of the
    overlap is ``above * (1 - y / extent) + below * (y / extent)`` (diffusers ``AutoencoderKL.blend_v``)."""
    extent = min(above.shape[2], below.shape[2], extent)
    if extent <= 0:
        return
    weight = (np.arange(extent) / extent).astype(np.float32)[:, None]  # (extent, 1): 0 at the seam's top
    below[:, :, :extent, :] = (above[:, :, -extent:, :] * (np.float32(1) - weight)
                               + below[:, :, :extent, :] * weight)


def blend_columns(left: np.ndarray, right: np.ndarray, extent: int) -> None:
    """Fade the left ``extent`` columns of ``right`` in from the right columns of ``left``, in place
    (diffusers ``AutoencoderKL.blend_h``)."""
    extent = min(left.shape[3], right.shape[3], extent)
    if extent <= 0:
        return
    weight = (np.arange(extent) / extent).astype(np.float32)  # (extent,): 0 at the seam's left
    right[:, :, :, :extent] = left[:, :, :, -extent:] * (np.float32(1) - weight) + right[:, :, :, :extent] * weight


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
    """

    def __init__(self, ops: Ops, config: VAEConfig, weights: dict[str, Weight], tiling: bool = False):
        self.config = config
        self.tiling = tiling
        self.post_quant_conv = conv2d_from(ops, weights, "post_quant_conv.") if config.use_post_quant_conv \
            else None
        self.decoder = Decoder(ops, config, weights)
        # diffusers' tile_sample_min_size, tile_latent_min_size and the derived sizes of tiled_decode.
        self.tile_sample_size = config.sample_size  # pixels per tile side (512 for SD1.5)
        self.tile_latent_size = int(config.sample_size / config.downscale)  # latents per tile side (64)
        self.tile_stride = int(self.tile_latent_size * (1 - TILE_OVERLAP))  # latents between tile starts (48)
        self.blend_pixels = int(self.tile_sample_size * TILE_OVERLAP)  # pixels faded across a seam (128)
        self.kept_pixels = self.tile_sample_size - self.blend_pixels  # pixels each tile contributes (384)

    def __call__(self, latents: np.ndarray) -> np.ndarray:
        latents = checked_images(latents, self.config.latent_channels, "latents")
        z = latents / np.float32(self.config.scaling_factor)  # (B, 4, h, w) in the autoencoder's own scale
        images = []
        for one in np.split(z, z.shape[0]):  # (1, 4, h, w)
            if self.tiling and max(one.shape[2:]) > self.tile_latent_size:
                images.append(self._decode_tiled(one))
            else:
                images.append(self._decode_whole(one))  # (1, 3, 8h, 8w)
        return np.concatenate(images)  # (B, 3, 8h, 8w)

    def _decode_whole(self, z: np.ndarray) -> np.ndarray:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)  # (1, 3, 8h, 8w)

    def _decode_tiled(self, z: np.ndarray) -> np.ndarray:
        """diffusers ``AutoencoderKL.tiled_decode`` for one image (1, 4, h, w) -> (1, 3, 8h, 8w).

        Tiles start every ``tile_stride`` latents and span up to ``tile_latent_size`` (those at the bottom and
        right edges are cut short). Each decoded tile is blended in place with the (already blended) tile above
        and the one to its left, then contributes its top-left ``kept_pixels`` square; the next tile's blended
        band covers the rest. Only the previous row of tiles is kept, not the whole grid.
        """
        _, _, height, width = z.shape
        tile = self.tile_latent_size
        above: list[np.ndarray] | None = None  # the previous row's blended tiles, uncropped
        bands = []
        for top in range(0, height, self.tile_stride):
            row: list[np.ndarray] = []
            for column, left in enumerate(range(0, width, self.tile_stride)):
                pixels = self._decode_whole(z[:, :, top:top + tile, left:left + tile])  # (1, 3, <= 8t, <= 8t)
                if above is not None:
                    blend_rows(above[column], pixels, self.blend_pixels)
                if row:
                    blend_columns(row[-1], pixels, self.blend_pixels)
                row.append(pixels)
            keep = self.kept_pixels
            bands.append(np.concatenate([pixels[:, :, :keep, :keep] for pixels in row], axis=3))  # (1, 3, <=k, 8w)
            above = row
        return np.concatenate(bands, axis=2)  # (1, 3, 8h, 8w)


class VaeEncoder:
    """Images (B, 3, H, W) in [-1, 1], H and W multiples of 8 -> UNet-space latents (B, 4, H/8, W/8).

    The encoder and quant_conv give the mean and log-variance of a diagonal Gaussian (the log-variance clamped to
    [-30, 20] as diffusers does); the latents are its mean, or with a numpy Generator ``rng`` a sample
    ``mean + exp(logvar / 2) * noise`` with standard normal float32 noise drawn from ``rng``; times
    ``scaling_factor``.
    """

    def __init__(self, ops: Ops, config: VAEConfig, weights: dict[str, Weight]):
        self.config = config
        self.encoder = Encoder(ops, config, weights)
        self.quant_conv = conv2d_from(ops, weights, "quant_conv.") if config.use_quant_conv else None

    def distribution(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean, logvar), each (B, 4, H/8, W/8), of the posterior in the autoencoder's own (unscaled) space."""
        images = checked_images(images, self.config.in_channels, "images", self.config.downscale)
        moments = []
        for one in np.split(images, images.shape[0]):  # (1, 3, H, W), one at a time as in VaeDecoder
            one = self.encoder(one)  # (1, 8, H/8, W/8)
            moments.append(self.quant_conv(one) if self.quant_conv is not None else one)
        mean, logvar = np.split(np.concatenate(moments), 2, axis=1)  # (B, 4, H/8, W/8) each
        return mean, np.clip(logvar, *LOGVAR_RANGE)

    def __call__(self, images: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        mean, logvar = self.distribution(images)
        latents = mean
        if rng is not None:
            noise = rng.standard_normal(mean.shape, dtype=np.float32)  # (B, 4, H/8, W/8)
            latents = mean + np.exp(np.float32(0.5) * logvar) * noise
        return latents * np.float32(self.config.scaling_factor)


def _load_weights(checkpoint: str | Checkpoint, part: str, precision: str, backend: str,
                  stream: bool = False) -> tuple[VAEConfig, dict[str, Weight]]:
    """The config and the tensors of ``part`` ("encoder", "decoder" or "both") at ``precision``.

    The check is strict over the whole autoencoder (every tensor present with its shape, nothing unknown) even
    when one half is loaded, and only that half is converted: an fp32 file held as fp16 does not pay for the
    other. fp32 weights stored as F32 stay zero-copy views of the mapped file (``stream``: see ``load_weights``).
    """
    checkpoint = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint)
    config = checkpoint.vae_config()
    source = checkpoint.source("vae")
    wanted = {"encoder": vae_encoder_shapes, "decoder": vae_decoder_shapes, "both": vae_shapes}[part](config)
    weights = load_weights(source, vae_shapes(config), precision, only=wanted, stream=stream, ops=get_ops(backend))
    log.info("loaded the VAE %s from %s", part if part != "both" else "encoder and decoder", checkpoint.path)
    return config, weights


def load_vae_decoder(checkpoint: str | Checkpoint, precision: str = "fp32", backend: str = "cpu",
                     tiling: bool = False, stream: bool = False) -> VaeDecoder:
    """The decoder of ``checkpoint`` (a path or an opened checkpoint); ``tiling``: see :class:`VaeDecoder`;
    ``stream``: see :func:`~sdcli.nn.layers.load_weights`."""
    config, weights = _load_weights(checkpoint, "decoder", precision, backend, stream)
    return VaeDecoder(get_ops(backend), config, weights, tiling=tiling)


def load_vae_encoder(checkpoint: str | Checkpoint, precision: str = "fp32", backend: str = "cpu") -> VaeEncoder:
    """The encoder of ``checkpoint`` (a path or an opened checkpoint)."""
    config, weights = _load_weights(checkpoint, "encoder", precision, backend)
    return VaeEncoder(get_ops(backend), config, weights)


def load_vae(checkpoint: str | Checkpoint, precision: str = "fp32",
             backend: str = "cpu") -> tuple[VaeEncoder, VaeDecoder]:
    """The encoder and decoder of ``checkpoint`` (a path or an opened checkpoint)."""
    config, weights = _load_weights(checkpoint, "both", precision, backend)
    ops = get_ops(backend)
    return VaeEncoder(ops, config, weights), VaeDecoder(ops, config, weights)
