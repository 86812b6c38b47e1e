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

Clips longer than the frame tables run with FreeNoise's context windows (Qiu et al. 2023, "FreeNoise: Tuning-Free
Longer Video Diffusion via Noise Rescheduling"; diffusers' ``FreeNoiseTransformerBlock``): inside each block, the
two attentions run over overlapping windows of frames, each window from frame position 0, and their outputs are
averaged with per-frame weights before the feed-forward (:class:`ContextWindows`).

Tensor names are the diffusers ``MotionAdapter`` names (``down_blocks.{i}.motion_modules.{j}...``); the UNet's
weights come from its own checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import MotionAdapterConfig
from ..errors import SdcliError
from .layers import GroupNorm, Linear, ParameterSource
from .unet import BasicTransformerBlock, UNet2DConditionModel

# Fixed by diffusers' AnimateDiffTransformer3D rather than by the config.
MOTION_GROUP_NORM_EPS = 1e-6


CONTEXT_WEIGHTINGS = ("pyramid", "flat", "delayed_reverse_sawtooth")


@dataclass(frozen=True)
class ContextWindows:
    """FreeNoise's windows over the frames: ``length`` frames each, starting every ``stride`` frames, plus one
    window flush with the last frame when the stride does not reach it; a frame's outputs from the windows that
    hold it are averaged with ``weighting``'s weights (diffusers' ``enable_free_noise(context_length,
    context_stride, weighting_scheme)``)."""

    length: int
    stride: int = 4
    weighting: str = "pyramid"

    def __post_init__(self):
        for name in ("length", "stride"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SdcliError(f"context {name} must be a positive integer, got {value!r}")
        if self.weighting not in CONTEXT_WEIGHTINGS:
            raise SdcliError(f"unknown context weighting {self.weighting!r}; choose one of: "
                             f"{', '.join(CONTEXT_WEIGHTINGS)}")
        if self.weighting == "delayed_reverse_sawtooth" and self.length % 2:
            raise SdcliError(f"the delayed_reverse_sawtooth weighting needs an even context length, got {self.length}")

    def spans(self, frames: int) -> list[tuple[int, int, int]]:
        """(start, stop, first kept frame) of each window over ``frames`` frames. The windows start at 0, stride
        apart; when the last of them stops short of the end, one more ends at the last frame, and only its frames
        past the previous window's are kept."""
        if frames < self.length:
            raise SdcliError(f"{frames} frames are fewer than the context length {self.length}")
        spans = [(start, start + self.length, start) for start in range(0, frames - self.length + 1, self.stride)]
        if spans[-1][1] != frames:
            spans.append((frames - self.length, frames, spans[-1][1]))
        return spans

    def weights(self) -> np.ndarray:
        """(length,) float32: the weight of each position of a window (pyramid: 1, 2, ..., 2, 1)."""
        length, middle = self.length, (self.length + 1) // 2
        if self.weighting == "flat":
            weights = [1.0] * length
        elif self.weighting == "pyramid":
            rising = list(range(1, middle + 1)) if length % 2 == 0 else list(range(1, middle))
            weights = rising + ([] if length % 2 == 0 else [middle]) + rising[::-1]
        else:  # delayed_reverse_sawtooth: low weights, then falling from the middle
            low = [0.01] * (middle - 1 if length % 2 == 0 else middle)
            weights = low + ([middle] if length % 2 == 0 else []) + list(range(middle, 0, -1))
        return np.asarray(weights, dtype=np.float32)

    def totals(self, frames: int) -> np.ndarray:
        """(frames,) float32: the sum of the weights each frame's average divides by, accumulated in float32 window
        by window. As diffusers does, the kept frames of a last, flush window each add that window's weight at the
        first kept position (not their own); a frame no window holds would keep its value (its total is 0)."""
        weights, totals = self.weights(), np.zeros(frames, dtype=np.float32)
        for start, stop, kept in self.spans(frames):
            if kept == start:
                totals[start:stop] += weights[:stop - start]
            else:
                totals[kept:stop] += weights[kept - start]
        return totals


def attend_in_windows(block: BasicTransformerBlock, x, windows: ContextWindows):
    """A temporal transformer block over (N, F, C) with its two attentions run window by window: each window's
    frames see positions 0 .. length-1, its outputs are weighted, summed into the frames they came from and divided
    by each frame's total weight; then the feed-forward over all frames (diffusers' FreeNoiseTransformerBlock)."""
    ops = block.ops
    frames = x.shape[1]
    norm1, norm2 = block.attention_norms(windows.length)  # each window's frames at positions 0 .. L-1
    weights = ops.from_host(windows.weights().reshape(1, -1, 1))  # (1, L, 1)
    total = None
    for start, stop, kept in windows.spans(frames):
        window = ops.narrow(x, 1, start, stop)  # (N, L, C), a view of x
        window = ops.add(block.attn1(window, norm=norm1), window)
        window = ops.add_(window, block.attn2(window, None, norm=norm2))
        weighted = ops.mul(window, weights)
        if kept != start:
            weighted = ops.narrow(weighted, 1, kept - start, stop - start)
        if total is None:
            total = ops.pad(weighted, ((0, 0), (kept, frames - stop), (0, 0)))  # (N, F, C)
        else:
            ops.add_into_(total, weighted, 1, kept)
    totals = windows.totals(frames)
    x = ops.div(total, ops.from_host(np.where(totals > 0, totals, np.float32(1)).reshape(1, frames, 1)))
    return ops.add_(x, block.feed_forward(block.norm3(x)))


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

    def __call__(self, x, frames: int, windows: ContextWindows | None = None):
        ops = self.ops
        batch_frames, channels, height, width = x.shape
        batch = batch_frames // frames
        h = ops.permute(ops.reshape(x, (batch, frames, channels, height, width)), (0, 2, 1, 3, 4))  # (B, C, F, h, w)
        h = self.norm(h)  # groups of channels over all frames and positions of a video
        h = ops.reshape(ops.permute(h, (0, 2, 1, 3, 4)), (batch, frames * channels, height, width))  # (B, F C, h, w)
        h = ops.reshape(ops.channels_last(h), (batch * height * width, frames, channels))  # (B h w, F, C)
        h = self.proj_in(h)
        for block in self.transformer_blocks:  # self-attention over the frames (or over windows of them)
            h = block(h, None) if windows is None else attend_in_windows(block, h, windows)
        h = self.proj_out(h)
        h = ops.reshape(h, (batch, height * width, frames * channels))  # (B, h w, F C)
        h = ops.channels_first(h, height, width)  # (B, F C, h, w)
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

    def __init__(self, adapter: MotionAdapter, frames: int, windows: ContextWindows | None):
        self.adapter, self.frames, self.windows = adapter, frames, windows

    def down(self, level: int, layer: int, x):
        return self.adapter.down_blocks[level][layer](x, self.frames, self.windows)

    def mid(self, x):
        return x if self.adapter.mid_block is None else self.adapter.mid_block[0](x, self.frames, self.windows)

    def up(self, level: int, layer: int, x):
        return self.adapter.up_blocks[level][layer](x, self.frames, self.windows)


class UNetMotionModel:
    """An SD 1.x UNet with a motion adapter: (noisy video latents (B, C, F, h, w), timesteps, text hidden states
    (B, S, D)) -> the prediction for every frame, (B, C, F, h, w). With ``context_windows``, clips of any length
    from one window up, through FreeNoise's windows (:meth:`with_context_windows`)."""

    def __init__(self, unet: UNet2DConditionModel, adapter: MotionAdapter,
                 context_windows: ContextWindows | None = None, frames_at_once: int | None = None):
        if adapter.config != adapter.config.for_unet(unet.config):
            raise SdcliError("the motion adapter was not built for this UNet (MotionAdapterConfig.for_unet)")
        if adapter.config.use_mid_block and adapter.config.mid_block_layers != 1:
            raise SdcliError(f"the motion adapter has {adapter.config.mid_block_layers} mid-block motion modules; "
                             "an SD 1.x mid block takes one")
        self.ops, self.unet, self.adapter = unet.ops, unet, adapter
        self.config = unet.config
        self.context_windows = context_windows
        self.frames_at_once = frames_at_once  # through the UNet's own layers (None: the whole batch)
        if context_windows is not None and context_windows.length > self.max_frames:
            raise SdcliError(f"a context length of {context_windows.length} frames is longer than the motion "
                             f"adapter's {self.max_frames}-frame window")

    def with_context_windows(self, length: int | None, stride: int = 4,
                             weighting: str = "pyramid") -> "UNetMotionModel":
        """This network (the same weights) running its motion modules over FreeNoise's windows of ``length``
        frames (None: the whole clip at once)."""
        windows = None if length is None else ContextWindows(length, stride, weighting)
        return UNetMotionModel(self.unet, self.adapter, windows, self.frames_at_once)

    def with_frames_at_once(self, frames: int | None) -> "UNetMotionModel":
        """This network (the same weights) running the UNet's own layers over at most ``frames`` frames at a time
        (memory: their working arrays are a few frames'; the same results), the motion modules over all."""
        if frames is not None and (not isinstance(frames, int) or frames < 1):
            raise SdcliError(f"frames at once must be a positive integer, got {frames!r}")
        return UNetMotionModel(self.unet, self.adapter, self.context_windows, frames)

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
        windows = self.context_windows
        if windows is None and not 1 <= frames <= self.max_frames:
            raise SdcliError(f"{frames} frames: the motion adapter covers 1 to {self.max_frames} frames at once")
        if windows is not None and frames < windows.length:
            raise SdcliError(f"{frames} frames are fewer than the context length {windows.length}")
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
        temporal = _FramesOf(self.adapter, frames, windows)
        y = self.unet(x, np.repeat(timesteps, frames), context, temporal, self.frames_at_once)  # (B F, C', h, w)
        y = ops.reshape(y, (batch, frames, y.shape[1], height, width))
        return ops.permute(y, (0, 2, 1, 3, 4))  # (B, C', F, h, w)
