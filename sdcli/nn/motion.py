"""AnimateDiff's motion modules and the UNet that runs them: diffusers' ``MotionAdapter`` and ``UNetMotionModel``.

Guo et al. 2023, "AnimateDiff: Animate Your Personalized Text-to-Image Diffusion Models without Specific Tuning":
an SD 1.x UNet denoises each frame of a clip as an image, and a temporal transformer inserted after each of its
layers lets every latent position attend over the frames.

- The UNet's own layers see the frames as a batch, (B*F, C, h, w), frames of one video consecutive.
- A motion module (diffusers' ``AnimateDiffTransformer3D``) normalises each video's (C, F, h, w) by channel groups,
  turns it into one sequence of F tokens per latent position, (B*h*w, F, C), runs transformer blocks (two
  self-attentions over the frames, each after a stored sinusoidal table of frame positions, and a GEGLU
  feed-forward), turns the tokens back into frames and adds its input.
- The adapter holds one module per layer of each down level, one per layer of each up level (one more than down),
  and optionally one in the mid block, after its transformer.

Tensor names are the diffusers ``MotionAdapter`` names (``down_blocks.{i}.motion_modules.{j}...``); the UNet's
weights come from its own checkpoint.
"""

from __future__ import annotations

import numpy as np

from ..config import MotionAdapterConfig
from ..errors import SdcliError
from .layers import GroupNorm, Linear, ParameterSource
from .unet import BasicTransformerBlock, UNet2DConditionModel

# Fixed by diffusers' AnimateDiffTransformer3D rather than by the config.
MOTION_GROUP_NORM_EPS = 1e-6


class TemporalTransformer:
    """One motion module: (B*F, C, h, w) -> the same, attention over the F frames at each position, plus x."""

    def __init__(self, params: ParameterSource, channels: int, heads: int, depth: int, groups: int,
                 max_frames: int):
        self.ops = params.ops
        self.norm = GroupNorm(params.scope("norm"), channels, groups, MOTION_GROUP_NORM_EPS)
        self.proj_in = Linear(params.scope("proj_in"), channels, channels)
        self.transformer_blocks = [
            BasicTransformerBlock(params.scope("transformer_blocks", i), channels, channels, heads,
                                  positions=max_frames)
            for i in range(depth)]
        self.proj_out = Linear(params.scope("proj_out"), channels, channels)

    def __call__(self, x, frames: int):
        ops = self.ops
        batch_frames, channels, height, width = x.shape
        batch = batch_frames // frames
        h = ops.permute(ops.reshape(x, (batch, frames, channels, height, width)), (0, 2, 1, 3, 4))  # (B, C, F, h, w)
        h = self.norm(h)  # groups of channels over all frames and positions of a video
        h = ops.reshape(ops.permute(h, (0, 3, 4, 2, 1)), (batch * height * width, frames, channels))  # (B h w, F, C)
        h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, None)  # self-attention over the frames
        h = self.proj_out(h)
        h = ops.permute(ops.reshape(h, (batch, height, width, frames, channels)), (0, 3, 4, 1, 2))  # (B, F, C, h, w)
        return ops.add(ops.reshape(h, (batch_frames, channels, height, width)), x)


class MotionAdapter:
    """The motion modules of an adapter, by level and layer, as the UNet calls them (``down_blocks[i][j]``, ...)."""

    def __init__(self, params: ParameterSource, config: MotionAdapterConfig):
        self.ops, self.config = params.ops, config
        groups, max_frames = config.norm_num_groups, config.max_seq_length

        def modules(scope: str, level: int, level_in_config: int, count: int) -> list[TemporalTransformer]:
            channels = config.block_out_channels[level_in_config]
            heads = config.num_attention_heads[level_in_config]
            depth = config.transformer_layers_per_block[level_in_config]
            return [TemporalTransformer(params.scope(scope, level, "motion_modules", j), channels, heads, depth,
                                        groups, max_frames)
                    for j in range(count)]

        levels = config.levels
        self.down_blocks = [modules("down_blocks", i, i, config.layers_per_block[i]) for i in range(levels)]
        self.up_blocks = [modules("up_blocks", i, levels - 1 - i, config.layers_per_block[levels - 1 - i] + 1)
                          for i in range(levels)]
        self.mid_block = None
        if config.use_mid_block:
            self.mid_block = [
                TemporalTransformer(params.scope("mid_block", "motion_modules", j), config.block_out_channels[-1],
                                    config.num_attention_heads[-1], config.transformer_layers_per_mid_block,
                                    groups, max_frames)
                for j in range(config.mid_block_layers)]


class _FramesOf:
    """An adapter's modules applied to batches of ``frames`` frames: the UNet's TemporalLayers."""

    def __init__(self, adapter: MotionAdapter, frames: int):
        self.adapter, self.frames = adapter, frames

    def down(self, level: int, layer: int, x):
        return self.adapter.down_blocks[level][layer](x, self.frames)

    def mid(self, x):
        return x if self.adapter.mid_block is None else self.adapter.mid_block[0](x, self.frames)

    def up(self, level: int, layer: int, x):
        return self.adapter.up_blocks[level][layer](x, self.frames)


class UNetMotionModel:
    """An SD 1.x UNet with a motion adapter: (noisy video latents (B, C, F, h, w), timesteps, text hidden states
    (B, S, D)) -> the prediction for every frame, (B, C, F, h, w)."""

    def __init__(self, unet: UNet2DConditionModel, adapter: MotionAdapter):
        if adapter.config != adapter.config.for_unet(unet.config):
            raise SdcliError("the motion adapter was not built for this UNet (MotionAdapterConfig.for_unet)")
        if adapter.config.use_mid_block and adapter.config.mid_block_layers != 1:
            raise SdcliError(f"the motion adapter has {adapter.config.mid_block_layers} mid-block motion modules; "
                             "an SD 1.x mid block takes one")
        self.ops, self.unet, self.adapter = unet.ops, unet, adapter
        self.config = unet.config

    @property
    def max_frames(self) -> int:
        """The longest clip the adapter's frame position tables cover."""
        return self.adapter.config.max_seq_length

    def __call__(self, sample, timesteps: np.ndarray | float, encoder_hidden_states):
        ops = self.ops
        if len(sample.shape) != 5:
            raise SdcliError(f"video latents must be (batch, channels, frames, height, width), got shape "
                             f"{tuple(sample.shape)}")
        batch, channels, frames, height, width = sample.shape
        if not 1 <= frames <= self.max_frames:
            raise SdcliError(f"{frames} frames: the motion adapter covers 1 to {self.max_frames} frames at once")
        if len(encoder_hidden_states.shape) != 3 or encoder_hidden_states.shape[0] != batch:
            raise SdcliError(f"text hidden states must be ({batch}, tokens, width) for {batch} videos, got shape "
                             f"{tuple(encoder_hidden_states.shape)}")
        timesteps = np.asarray(timesteps, dtype=np.float64)
        if timesteps.ndim == 0:
            timesteps = np.full(batch, timesteps)
        if timesteps.shape != (batch,):
            raise SdcliError(f"timesteps must be one value or one per video ({batch},), got shape {timesteps.shape}")
        x = ops.reshape(ops.permute(sample, (0, 2, 1, 3, 4)), (batch * frames, channels, height, width))
        tokens, width_text = encoder_hidden_states.shape[1:]
        context = ops.reshape(encoder_hidden_states, (batch, 1, tokens, width_text))
        context = ops.reshape(ops.concat([context] * frames, axis=1), (batch * frames, tokens, width_text))
        y = self.unet(x, np.repeat(timesteps, frames), context, _FramesOf(self.adapter, frames))  # (B F, C', h, w)
        y = ops.reshape(y, (batch, frames, y.shape[1], height, width))
        return ops.permute(y, (0, 2, 1, 3, 4))  # (B, C', F, h, w)
