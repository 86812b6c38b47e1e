"""The Wan2.1 video autoencoder (diffusers ``AutoencoderKLWan``): causal 3-D convolutions, 4x in time, 8x in space.

Wan Team 2025, "Wan: Open and Advanced Large-Scale Video Generative Models", sec. 3.1. Every convolution over time
is causal (frame t sees frames t - 2 .. t), so video runs through in chunks that carry a cache: each causal
convolution keeps the last two frames it was given, and continues from them on the next chunk as if the whole
video went through at once. The first frame is compressed alone: latent frame 0 is pixel frame 0, each later latent
frame 4 pixel frames, so T latent frames decode to 1 + 4 (T - 1) frames.

- The decoder takes one latent frame per call, as diffusers' ``_decode`` loop does; its time upsampling lets the
  first frame through as it is and doubles every later one (twice: x4). Memory stays that of one latent frame's
  activations, whatever the length of the clip.
- The encoder takes the first frame alone, then four frames at a time (diffusers' ``_encode``); its time
  downsampling halves every chunk after the first (twice: /4).

Norms are RMS norms over the channels (``gamma`` per channel); the middle blocks hold one single-head attention over
each frame's positions. Tensor names are diffusers'. The networks' parts are built from a parameter scope and call
only ops; the cache (:class:`CausalCache`) holds backend arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable

import numpy as np

from ..errors import CheckpointError, SdcliError
from .layers import Conv2d, ParameterSource

CACHED_FRAMES = 2  # input frames a causal convolution of kernel 3 keeps for the next chunk
TEMPORAL_COMPRESSION = 4
SPATIAL_COMPRESSION = 8
# Wan2.1's per-channel latent statistics (diffusers' AutoencoderKLWan defaults, the values of its config.json)
WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
                      -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
                     1.6382, 1.1253, 2.8251, 1.9160)


@dataclass(frozen=True)
class WanVAEConfig:
    """``AutoencoderKLWan`` hyper-parameters (``vae/config.json``); the defaults are Wan2.1's."""

    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    in_channels: int = 3
    out_channels: int = 3

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "vae/config.json") -> "WanVAEConfig":
        """Read a diffusers config; the settings of later Wan autoencoders (Wan2.2's residual blocks and patches,
        other compression ratios) are refused by name."""
        if data.get("is_residual"):
            raise CheckpointError(f"{source}: is_residual=True (the Wan2.2 autoencoder) is not supported; sdcli reads "
                                  "Wan2.1's")
        for key, supported in (("patch_size", None), ("scale_factor_temporal", TEMPORAL_COMPRESSION),
                               ("scale_factor_spatial", SPATIAL_COMPRESSION), ("dropout", 0.0)):
            if data.get(key, supported) not in (supported, None) and not (key == "dropout" and data[key] == 0):
                raise CheckpointError(f"{source}: {key}={data[key]!r} is not supported (sdcli reads {supported!r})")
        known = {item.name for item in fields(cls)}
        values = {key: tuple(value) if isinstance(value, list) else value
                  for key, value in data.items() if key in known and value is not None}
        try:
            config = cls(**values)
        except TypeError as error:
            raise CheckpointError(f"{source}: bad autoencoder config ({error})") from None
        levels = len(config.dim_mult)
        if levels < 1 or len(config.temperal_downsample) != levels - 1 or config.num_res_blocks < 1:
            raise CheckpointError(f"{source}: dim_mult needs one more entry than temperal_downsample, and "
                                  "num_res_blocks must be at least 1")
        if sum(config.temperal_downsample) != 2 or levels != 4:
            raise CheckpointError(f"{source}: sdcli reads autoencoders of 4 levels with 2 time downsamplings (4x in "
                                  "time, 8x in space)")
        if config.attn_scales:  # diffusers' encoder cannot run them either (it calls its attention with a cache)
            raise CheckpointError(f"{source}: attn_scales={list(config.attn_scales)!r} is not supported (Wan2.1 has "
                                  "none)")
        if len(config.latents_mean) != config.z_dim or len(config.latents_std) != config.z_dim:
            raise CheckpointError(f"{source}: latents_mean and latents_std need z_dim ({config.z_dim}) values")
        return config


# -- the cache ------------------------------------------------------------------------------------------------------

@dataclass
class CausalCache:
    """What the causal layers of one network keep between the chunks of one video: per layer, the last input frames
    (a backend array) or, for a time resampling, whether the first frame has gone through. Made empty for each
    video (``decoder_cache()``/``encoder_cache()``) and handed to every chunk's call in order."""

    frames: dict[int, Any] = field(default_factory=dict)
    chunks: int = 0  # what went through: latent frames (decoder), chunks of 1 or 4 frames (encoder)

    def take(self, layer) -> Any:
        return self.frames.get(id(layer))

    def keep(self, layer, value) -> None:
        self.frames[id(layer)] = value


def last_frames(ops, x, count: int):
    """The last ``count`` frames of x (B, C, T, H, W) (all of them when there are fewer)."""
    frames = x.shape[2]
    return ops.narrow(x, 2, max(0, frames - count), frames)


# -- layers ---------------------------------------------------------------------------------------------------------

class ChannelRmsNorm:
    """RMS norm over the channels of (B, C, T, H, W) or (B, C, H, W), times ``gamma`` (C, 1, 1[, 1])."""

    def __init__(self, params: ParameterSource, channels: int, video: bool = True):
        self.ops, self.channels = params.ops, channels
        self.gamma = params.take("gamma", (channels, 1, 1, 1) if video else (channels, 1, 1))

    def __call__(self, x, silu: bool = False):
        ops = self.ops
        rows = ops.embedding(self.gamma, np.arange(self.channels))  # the whole (C, 1, 1[, 1]) table, in the backend
        y = ops.channel_rms_norm(x, ops.reshape(rows, (self.channels,)))
        return ops.silu(y) if silu else y


class CausalConv3d:
    """A 3-D convolution padded in front only along time (2 p_t frames), spatially on both sides: over a chunk of
    a longer video, the frames before it come from the cache (the last two the layer saw) instead of zeros."""

    def __init__(self, params: ParameterSource, in_channels: int, out_channels: int,
                 kernel: tuple[int, int, int] = (3, 3, 3), padding: tuple[int, int, int] = (1, 1, 1)):
        self.ops, self.padding = params.ops, padding
        self.weight = params.take("weight", (out_channels, in_channels, *kernel))
        self.bias = params.take("bias", (out_channels,))

    def __call__(self, x, cache: CausalCache | None = None):
        ops, (pt, ph, pw) = self.ops, self.padding
        history = 2 * pt
        if history and cache is not None:
            before = cache.take(self)
            if before is not None:
                x = ops.concat([before, x], 2)  # (B, C, c + T, H, W)
                history -= before.shape[2]
            cache.keep(self, last_frames(ops, x, CACHED_FRAMES))
        if history:
            x = ops.pad(x, ((0, 0), (0, 0), (history, 0), (0, 0), (0, 0)))
        return ops.conv3d(x, self.weight, self.bias, padding=(0, ph, pw))  # (B, Cout, T, H, W)


def per_frame(ops, x, function: Callable):
    """``function`` over the frames of x (B, C, T, H, W) as one batch of images (B T, C, H, W) -> (B, C', T, H', W')."""
    batch, channels, frames, height, width = x.shape
    images = ops.reshape(ops.permute(x, (0, 2, 1, 3, 4)), (batch * frames, channels, height, width))
    y = function(images)  # (B T, C', H', W')
    y = ops.reshape(y, (batch, frames, *y.shape[1:]))
    return ops.permute(y, (0, 2, 1, 3, 4))


class ResidualBlock:
    """x + conv2(silu(norm2(conv1(silu(norm1(x)))))), the shortcut a 1x1x1 convolution where the width changes."""

    def __init__(self, params: ParameterSource, in_channels: int, out_channels: int):
        self.ops = params.ops
        self.norm1 = ChannelRmsNorm(params.scope("norm1"), in_channels)
        self.conv1 = CausalConv3d(params.scope("conv1"), in_channels, out_channels)
        self.norm2 = ChannelRmsNorm(params.scope("norm2"), out_channels)
        self.conv2 = CausalConv3d(params.scope("conv2"), out_channels, out_channels)
        self.conv_shortcut = None
        if in_channels != out_channels:
            self.conv_shortcut = CausalConv3d(params.scope("conv_shortcut"), in_channels, out_channels, (1, 1, 1),
                                              (0, 0, 0))

    def __call__(self, x, cache: CausalCache):
        shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        h = self.conv1(self.norm1(x, silu=True), cache)
        h = self.conv2(self.norm2(h, silu=True), cache)
        return self.ops.add(h, shortcut)  # (B, Cout, T, H, W)


class AttentionBlock:
    """Single-head self-attention over each frame's positions, added to its input."""

    def __init__(self, params: ParameterSource, channels: int):
        self.ops, self.channels = params.ops, channels
        self.norm = ChannelRmsNorm(params.scope("norm"), channels, video=False)
        self.to_qkv = Conv2d(params.scope("to_qkv"), channels, 3 * channels, 1)
        self.proj = Conv2d(params.scope("proj"), channels, channels, 1)

    def frame_attention(self, images):
        ops, channels = self.ops, self.channels
        batch, _, height, width = images.shape
        qkv = ops.channels_last(self.to_qkv(self.norm(images)))  # (n, H W, 3 C)
        q, k, v = (ops.reshape(ops.narrow(qkv, 2, i * channels, (i + 1) * channels), (batch, 1, height * width,
                                                                                       channels))
                   for i in range(3))  # (n, 1, H W, C) each
        y = ops.reshape(ops.attention(q, k, v), (batch, height * width, channels))  # (n, H W, C)
        return self.proj(ops.channels_first(y, height, width))  # (n, C, H, W)

    def __call__(self, x, cache: CausalCache | None = None):
        return self.ops.add(x, per_frame(self.ops, x, self.frame_attention))


class MidBlock:
    """resnet, attention, resnet."""

    def __init__(self, params: ParameterSource, channels: int):
        self.resnets = [ResidualBlock(params.scope("resnets", i), channels, channels) for i in range(2)]
        self.attention = AttentionBlock(params.scope("attentions", 0), channels)

    def __call__(self, x, cache: CausalCache):
        x = self.resnets[0](x, cache)
        return self.resnets[1](self.attention(x), cache)


class Resample:
    """Spatial x2 up (nearest, then a 3x3 convolution to half the channels) or /2 down (a stride-2 3x3 convolution
    padded right and below), each frame alone; with ``temporal``, also in time through a causal (3, 1, 1)
    convolution: up, every frame after the first becomes two (2 C channels split into two frames); down, every chunk
    after the first is halved (stride 2 over the chunk after the last frame of the one before)."""

    def __init__(self, params: ParameterSource, channels: int, up: bool, temporal: bool):
        self.ops, self.up, self.temporal = params.ops, up, temporal
        out_channels = channels // 2 if up else channels
        self.conv = Conv2d(params.scope("resample", 1), channels, out_channels, 3, stride=1 if up else 2,
                           padding=1 if up else 0)
        self.time_conv = None
        if temporal:
            self.time_conv = CausalConv3d(params.scope("time_conv"), channels, 2 * channels if up else channels,
                                          (3, 1, 1), (0, 0, 0))

    def __call__(self, x, cache: CausalCache):
        ops = self.ops
        if self.temporal and self.up:
            x = self.double_frames(x, cache)
        if self.up:
            x = per_frame(ops, x, lambda images: self.conv(ops.upsample_nearest(images, 2)))
        else:
            x = per_frame(ops, x, lambda images: self.conv(ops.pad(images, ((0, 0), (0, 0), (0, 1), (0, 1)))))
        if self.temporal and not self.up:
            x = self.halve_frames(x, cache)
        return x

    def double_frames(self, x, cache: CausalCache):
        """(B, C, T, H, W) -> (B, C, 2 T, H, W), the video's first frame left single: its causal convolution
        starts after it, from zeros (diffusers' "Rep" state)."""
        ops = self.ops
        history = cache.take(self)
        first = None
        if history is None:  # the video's first chunk: its first frame goes through as it is
            first, x = ops.narrow(x, 2, 0, 1), ops.narrow(x, 2, 1, x.shape[2])
            history = x if x.shape[2] == 0 else ops.narrow(x, 2, 0, 0)
        if x.shape[2]:
            batch, channels, frames, height, width = x.shape
            padded = ops.pad(ops.concat([history, x], 2),
                             ((0, 0), (0, 0), (CACHED_FRAMES - history.shape[2], 0), (0, 0), (0, 0)))
            cache.keep(self, last_frames(ops, ops.concat([history, x], 2), CACHED_FRAMES))
            y = ops.conv3d(padded, self.time_conv.weight, self.time_conv.bias)  # (B, 2 C, T, H, W)
            y = ops.permute(ops.reshape(y, (batch, 2, channels, frames, height, width)), (0, 2, 3, 1, 4, 5))
            x = ops.reshape(y, (batch, channels, 2 * frames, height, width))  # frame t -> 2 t, 2 t + 1
        else:
            cache.keep(self, history)
        return x if first is None else ops.concat([first, x], 2)

    def halve_frames(self, x, cache: CausalCache):
        """A chunk after the first: the stride-2 causal convolution over the last frame of the chunk before and this
        one; the first chunk goes through as it is."""
        ops = self.ops
        before = cache.take(self)
        cache.keep(self, last_frames(ops, x, 1))
        if before is None:
            return x
        return ops.conv3d(ops.concat([before, x], 2), self.time_conv.weight, self.time_conv.bias, stride=(2, 1, 1))


# -- the networks -----------------------------------------------------------------------------------------------

class WanDecoder:
    """Latents (B, z, T, h, w) of one chunk, through the cache -> frames (B, 3, T', 8h, 8w), unclamped."""

    def __init__(self, params: ParameterSource, config: WanVAEConfig):
        self.ops = params.ops
        base = config.decoder_base_dim or config.base_dim
        dims = [base * mult for mult in (config.dim_mult[-1], *config.dim_mult[::-1])]
        self.conv_in = CausalConv3d(params.scope("conv_in"), config.z_dim, dims[0])
        self.mid_block = MidBlock(params.scope("mid_block"), dims[0])
        temporal = config.temperal_downsample[::-1]
        self.layers: list = []
        levels = len(config.dim_mult)
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            block = params.scope("up_blocks", i)
            in_dim = in_dim // 2 if i > 0 else in_dim  # the resampling before halved the channels
            for j in range(config.num_res_blocks + 1):
                self.layers.append(ResidualBlock(block.scope("resnets", j), in_dim if j == 0 else out_dim, out_dim))
            if i != levels - 1:
                self.layers.append(Resample(block.scope("upsamplers", 0), out_dim, up=True, temporal=temporal[i]))
        self.norm_out = ChannelRmsNorm(params.scope("norm_out"), dims[-1])
        self.conv_out = CausalConv3d(params.scope("conv_out"), dims[-1], config.out_channels)
        # the layers after the last time upsampling: run a frame at a time (see __call__)
        temporal_layers = [i for i, layer in enumerate(self.layers) if isinstance(layer, Resample) and layer.temporal]
        self.frame_by_frame = temporal_layers[-1] + 1 if temporal_layers else 0

    def __call__(self, z, cache: CausalCache):
        """The layers up to the last time upsampling take the chunk whole; the ones after it, at the two largest
        sizes, take its frames one at a time through the same cache (a causal convolution continues from the
        frames it kept, so the frames are the same), which bounds the largest activations to one frame's."""
        ops = self.ops
        x = self.mid_block(self.conv_in(z, cache), cache)
        for layer in self.layers[:self.frame_by_frame]:
            x = layer(x, cache)
        frames = []
        for t in range(x.shape[2]):
            y = ops.narrow(x, 2, t, t + 1)  # (B, C, 1, H, W)
            for layer in self.layers[self.frame_by_frame:]:
                y = layer(y, cache)
            frames.append(self.conv_out(self.norm_out(y, silu=True), cache))
        return frames[0] if len(frames) == 1 else ops.concat(frames, 2)  # (B, 3, T, 8h, 8w)


class WanEncoder:
    """Frames (B, 3, T, H, W) of one chunk, through the cache -> (B, 2 z, T', H/8, W/8): mean and log-variance."""

    def __init__(self, params: ParameterSource, config: WanVAEConfig):
        self.ops = params.ops
        dims = [config.base_dim * mult for mult in (1, *config.dim_mult)]
        self.conv_in = CausalConv3d(params.scope("conv_in"), config.in_channels, dims[0])
        self.layers: list = []
        index, levels = 0, len(config.dim_mult)
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(config.num_res_blocks):
                self.layers.append(ResidualBlock(params.scope("down_blocks", index), in_dim, out_dim))
                index += 1
                in_dim = out_dim
            if i != levels - 1:
                self.layers.append(Resample(params.scope("down_blocks", index), out_dim, up=False,
                                            temporal=config.temperal_downsample[i]))
                index += 1
        self.mid_block = MidBlock(params.scope("mid_block"), dims[-1])
        self.norm_out = ChannelRmsNorm(params.scope("norm_out"), dims[-1])
        self.conv_out = CausalConv3d(params.scope("conv_out"), dims[-1], 2 * config.z_dim)

    def __call__(self, x, cache: CausalCache):
        x = self.conv_in(x, cache)
        for layer in self.layers:
            x = layer(x, cache)
        x = self.mid_block(x, cache)
        return self.conv_out(self.norm_out(x, silu=True), cache)


class WanAutoencoder:
    """The Wan2.1 autoencoder: ``decode`` latents to frames and ``encode`` frames to latents, chunk by chunk through
    the causal caches; ``normalize`` / ``denormalize`` between the autoencoder's latents and the transformer's.
    Built without the encoder (``with_encoder=False``) it reads only the decoder's tensors."""

    def __init__(self, params: ParameterSource, config: WanVAEConfig, with_encoder: bool = True):
        self.ops, self.config = params.ops, config
        z = config.z_dim
        self.post_quant_conv = CausalConv3d(params.scope("post_quant_conv"), z, z, (1, 1, 1), (0, 0, 0))
        self.decoder = WanDecoder(params.scope("decoder"), config)
        self.encoder = self.quant_conv = None
        if with_encoder:
            self.encoder = WanEncoder(params.scope("encoder"), config)
            self.quant_conv = CausalConv3d(params.scope("quant_conv"), 2 * z, 2 * z, (1, 1, 1), (0, 0, 0))

    # -- latents scale ---------------------------------------------------------------------------------------
    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) of the latents per channel, (1, z, 1, 1, 1) host arrays."""
        shape = (1, self.config.z_dim, 1, 1, 1)
        return (np.asarray(self.config.latents_mean, dtype=np.float32).reshape(shape),
                np.asarray(self.config.latents_std, dtype=np.float32).reshape(shape))

    def denormalize(self, latents):
        """The transformer's latents -> the autoencoder's: ``latents / (1 / std) + mean``, in the order diffusers'
        WanPipeline computes it."""
        ops, (mean, std) = self.ops, self.statistics()
        return ops.add(ops.div(latents, ops.from_host(np.float32(1) / std)), ops.from_host(mean))

    def normalize(self, latents):
        """The autoencoder's latents -> the transformer's: ``(latents - mean) * (1 / std)``, as diffusers' Wan
        image-to-video pipeline scales the encoded image."""
        ops, (mean, std) = self.ops, self.statistics()
        return ops.mul(ops.add(latents, ops.from_host(-mean)), ops.from_host(np.float32(1) / std))

    # -- decoding --------------------------------------------------------------------------------------------
    def decoder_cache(self) -> CausalCache:
        """An empty cache for decoding one video chunk by chunk."""
        return CausalCache()

    def decode_chunk(self, z, cache: CausalCache):
        """Latents (B, z, T, h, w), the next T latent frames of a video, -> their frames (B, 3, F, 8h, 8w) in
        [-1, 1]: F = 1 + 4 (T - 1) for the video's first chunk, 4 T for the others. The latent frames go through
        one at a time, as diffusers' ``_decode`` takes them, so every convolution sees the same shapes however the
        video is cut into chunks, and the frames are those of one call over the whole video to the bit on any
        backend (a BLAS may round a product differently when more images share it)."""
        ops = self.ops
        self.check_latents(z)
        pieces = []
        for t in range(z.shape[2]):
            pieces.append(ops.clip(self.decoder(self.post_quant_conv(ops.narrow(z, 2, t, t + 1)), cache), -1.0, 1.0))
            cache.chunks += 1
        return pieces[0] if len(pieces) == 1 else ops.concat(pieces, 2)

    def decode(self, z):
        """Latents (B, z, T, h, w) -> frames (B, 3, 1 + 4 (T - 1), 8h, 8w) in [-1, 1], one latent frame at a time
        through the cache (diffusers' ``_decode``)."""
        return self.decode_chunk(z, self.decoder_cache())

    def check_latents(self, z) -> None:
        if len(z.shape) != 5 or z.shape[1] != self.config.z_dim or min(z.shape[2:]) < 1:
            raise SdcliError(f"Wan latents must be (batch, {self.config.z_dim}, frames, height, width), "
                             f"got {tuple(z.shape)}")

    # -- encoding --------------------------------------------------------------------------------------------
    def encoder_cache(self) -> CausalCache:
        """An empty cache for encoding one video chunk by chunk."""
        return CausalCache()

    def encode_chunk(self, video, cache: CausalCache):
        """The next frames of a video (B, 3, F, H, W) in [-1, 1] -> (mean, log-variance) of their latents, each
        (B, z, T, H/8, W/8): the video's first chunk must be its first frame alone (T = 1), each later one 4 frames
        (T = 1)."""
        if self.encoder is None:
            raise SdcliError("this autoencoder was loaded without its encoder")
        expected = 1 if cache.chunks == 0 else TEMPORAL_COMPRESSION
        if len(video.shape) != 5 or video.shape[1] != self.config.in_channels or video.shape[2] != expected:
            raise SdcliError(f"a Wan video chunk must be (batch, {self.config.in_channels}, {expected}, height, "
                             f"width) here, got {tuple(video.shape)}")
        moments = self.quant_conv(self.encoder(video, cache))  # (B, 2 z, 1, h, w)
        cache.chunks += 1
        z = self.config.z_dim
        return self.ops.narrow(moments, 1, 0, z), self.ops.narrow(moments, 1, z, 2 * z)

    def encode(self, video):
        """Frames (B, 3, 1 + 4 k, H, W) in [-1, 1] -> (mean, log-variance) of the latents, each
        (B, z, 1 + k, H/8, W/8): the first frame alone, then 4 frames at a time (diffusers' ``_encode``). The mean
        is what diffusers' ``retrieve_latents(..., sample_mode="argmax")`` takes."""
        ops = self.ops
        frames = video.shape[2] if len(video.shape) == 5 else 0
        if frames < 1 or (frames - 1) % TEMPORAL_COMPRESSION:
            raise SdcliError(f"the Wan autoencoder encodes 1 + 4k frames, got {frames}")
        height, width = video.shape[3:]
        if height % SPATIAL_COMPRESSION or width % SPATIAL_COMPRESSION:
            raise SdcliError(f"the Wan autoencoder encodes frames whose sides are multiples of 8, got "
                             f"{height}x{width}")
        cache, means, logvars = self.encoder_cache(), [], []
        starts = [0] + list(range(1, frames, TEMPORAL_COMPRESSION))
        for start in starts:
            stop = 1 if start == 0 else start + TEMPORAL_COMPRESSION
            mean, logvar = self.encode_chunk(ops.narrow(video, 2, start, stop), cache)
            means.append(mean)
            logvars.append(logvar)
        if len(means) == 1:
            return means[0], logvars[0]
        return ops.concat(means, 2), ops.concat(logvars, 2)

