"""Text to video with SkyReels-V2's diffusion forcing, as diffusers' ``SkyReelsV2DiffusionForcingPipeline`` makes it.

SkyReels Team 2025, "SkyReels-V2: Infinite-length Film Generative Model". The networks are Wan2.1's (the UMT5
prompt encoder, the Wan VAE, a Wan transformer with a timestep per latent frame and a frame-rate embedding); what
differs is how a video is denoised (:mod:`sdcli.sampling.diffusion_forcing`):

- a video longer than ``base_num_frames`` is made window by window, each window after the first starting from the
  last ``overlap_history`` frames made, clean (re-noised a little to ``addnoise_condition`` at every step, which
  keeps long videos consistent);
- inside a window every latent frame has its own noise level: in blocks of ``causal_block_size`` latent frames
  that attend to themselves and the blocks before them, each block ``ar_step`` steps behind the one before
  (``ar_step`` 0: all frames together, the synchronous mode);
- the flow sampler (UniPC) runs per group of frames that move together, with guidance ``uncond + scale (cond -
  uncond)`` on the velocities and the frame rate as the model was trained on it (16 or 24 fps).

Each window's new frames are decoded as soon as the window is finished, through one causal decoder cache over the
whole video, and handed out as a :class:`~sdcli.pipelines.streaming.ChunkFrames`: a caller can write them as they
come, and the chunks put together are the frames of one decode of the whole video, which is how diffusers decodes
it at the end.

Noise: one unit Gaussian draw per window (B, 16, T, h, w), the window's prefix frames included, then, at each step
of a window with a prefix and ``addnoise_condition``, a draw for the prefix; each clip from its own seed. diffusers
draws the same shapes in the same order from torch's generators, so parity goes through ``noise`` (a callable
shape -> array, replaying diffusers' draws). What the caller leaves unset comes from :data:`SKYREELS_DEFAULTS` and
:data:`SKYREELS_FORCING` (the settings of diffusers' examples for the text-to-video DF models).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from ..errors import SdcliError
from ..families import wan
from ..io.checkpoint import Checkpoint
from ..memory import reuse_large_arrays
from ..models import open_checkpoint
from ..rng import BatchNoise, image_seeds
from ..sampling.diffusion_forcing import (ForcingSchedule, SteppedSampler, Window, forcing_schedule, frame_groups,
                                          plan_windows)
from .image import StepRecord
from .streaming import ChunkFrames
from .video import GeneratedVideo, VideoParams
from .wan import WanDefaults, WanTextToVideo

ARCHITECTURE = "skyreels-v2-df"
# diffusers' example for the DF text-to-video models: 544x960, 97 frames, 30 steps, guidance 6, flow shift 8 (set
# over the scheduler config: "8.0 for T2V, 5.0 for I2V"), saved at 24 fps; no negative prompt (diffusers: "")
SKYREELS_DEFAULTS = WanDefaults(width=960, height=544, frames=97, fps=24, steps=30, sampler="unipc",
                                guidance_scale=6.0, flow_shift=8.0, negative_prompt="")
ASYNC_CAUSAL_BLOCK = 5  # the causal block the examples use with ar_step > 0


@dataclass(frozen=True)
class DiffusionForcing:
    """How a SkyReels-V2 video is laid out for denoising; None: :data:`SKYREELS_FORCING`'s.

    - ``base_num_frames``: the frames of one forward window (97 at 540p: 25 latent frames, what the model was
      trained on); a longer video is made window by window;
    - ``overlap_history``: the frames each later window takes over from the video so far (17 or 37);
    - ``ar_step``: the steps each causal block lags behind the one before (0: every frame together);
    - ``causal_block_size``: latent frames per causal block (None: the transformer's ``num_frame_per_block`` when
      synchronous, 5 with ``ar_step`` > 0);
    - ``addnoise_condition``: the timestep the frames taken over are re-noised to at every step (0: none).
    """

    base_num_frames: int | None = None
    overlap_history: int | None = None
    ar_step: int | None = None
    causal_block_size: int | None = None
    addnoise_condition: float | None = None


SKYREELS_FORCING = DiffusionForcing(base_num_frames=97, overlap_history=17, ar_step=0, causal_block_size=None,
                                    addnoise_condition=20)


@dataclass(frozen=True)
class ForcingLayout:
    """A video's windows and each one's schedule, for ``block`` latent frames per causal block."""

    forcing: DiffusionForcing  # resolved: every field set
    block: int
    windows: tuple[Window, ...]
    schedules: tuple[ForcingSchedule, ...]

    @property
    def rows(self) -> int:
        """Transformer calls (steps) over the whole video."""
        return sum(schedule.rows for schedule in self.schedules)


def seeded_noise(seeds: list[int]) -> Callable[[tuple[int, ...]], np.ndarray]:
    """Unit Gaussian noise of any shape (B, ...), each clip's from its own Generator, drawn in order."""
    noise = BatchNoise(seeds, ())
    return lambda shape: noise.draw(shape[1:])


def latent_count(frames: int) -> int:
    """Latent frames of ``frames`` video frames, as diffusers counts them (1 + (F - 1) // 4)."""
    return 1 + (frames - 1) // wan.FRAMES_PER_LATENT


class SkyReelsTextToVideo(WanTextToVideo):
    """A loaded SkyReels-V2 diffusion-forcing model: Wan's stages (prompts, transformer, VAE), run window by window.
    ``run`` yields StepRecords and each window's :class:`ChunkFrames`; ``generate`` the whole video at once."""

    def __init__(self, *args, defaults: WanDefaults = SKYREELS_DEFAULTS, **kwargs):
        super().__init__(*args, defaults=defaults, **kwargs)
        self.run_timings: dict[str, float] = {}  # the last run's: text encoding, denoising, decoding, steps

    def default_flow_shift(self) -> float:
        """8.0, what diffusers' examples set over the scheduler config for text to video."""
        return self.defaults.flow_shift

    def prepare(self, params: VideoParams) -> tuple[VideoParams, Any]:
        params, plan = super().prepare(params)
        if params.sampler != "unipc":
            raise SdcliError(f"SkyReels-V2's diffusion forcing runs UniPC, a scheduler per frame as diffusers steps "
                             f"them; the {params.sampler!r} sampler is not supported")
        return params, plan

    def layout(self, params: VideoParams, forcing: DiffusionForcing | None = None) -> ForcingLayout:
        """The windows and schedules of a video of ``params`` (prepared), ``forcing``'s unset fields from
        :data:`SKYREELS_FORCING`; a one-line error for settings diffusion forcing cannot run."""
        forcing = forcing or DiffusionForcing()
        filled = {name: getattr(SKYREELS_FORCING, name) if getattr(forcing, name) is None else getattr(forcing, name)
                  for name in ("base_num_frames", "overlap_history", "ar_step", "addnoise_condition")}
        for name in ("base_num_frames", "overlap_history"):
            if not _is_count(filled[name], 1):
                raise SdcliError(f"{name} must be a positive integer, got {filled[name]!r}")
        if not _is_count(filled["ar_step"], 0):
            raise SdcliError(f"ar_step must be an integer >= 0, got {filled['ar_step']!r}")
        noise = filled["addnoise_condition"]
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise < 0:
            raise SdcliError(f"addnoise_condition must be a finite number >= 0, got {noise!r}")
        block = forcing.causal_block_size
        if block is None:
            block = ASYNC_CAUSAL_BLOCK if filled["ar_step"] else self.transformer.config.num_frame_per_block
        if not _is_count(block, 1):
            raise SdcliError(f"causal_block_size must be a positive integer, got {block!r}")
        forcing = DiffusionForcing(causal_block_size=block, **filled)
        base, overlap = latent_count(forcing.base_num_frames), latent_count(forcing.overlap_history)
        if overlap >= base:
            raise SdcliError(f"overlap_history {forcing.overlap_history} leaves nothing new to a window of "
                             f"base_num_frames {forcing.base_num_frames}: give fewer overlapping frames")
        windows = plan_windows(latent_count(params.frames), base, overlap, block)
        broken = [window for window in windows if window.frames % block]
        if broken:
            raise SdcliError(f"{params.frames} frames make a window of {broken[0].frames} latent frames, not whole "
                             f"causal blocks of {block}: {self.nearest_whole_blocks(params, forcing)}")
        schedules = tuple(forcing_schedule(window.frames // block, params.steps, forcing.ar_step,
                                           window.prefix // block) for window in windows)
        return ForcingLayout(forcing, block, tuple(windows), schedules)

    def nearest_whole_blocks(self, params: VideoParams, forcing: DiffusionForcing) -> str:
        """What to give instead: the frame count nearest ``params.frames`` whose windows are all whole causal
        blocks, or a window of whole blocks when none is."""
        base, overlap = latent_count(forcing.base_num_frames), latent_count(forcing.overlap_history)
        block, latent = forcing.causal_block_size, latent_count(params.frames)
        if latent > base and base % block:
            return (f"base_num_frames {forcing.base_num_frames} is {base} latent frames: give one of whole blocks "
                    f"(4k + 1 frames, k + 1 a multiple of {block})")
        for distance in range(1, 2 * base * block + 2):
            for candidate in (latent - distance, latent + distance):
                if candidate >= 1 and all(window.frames % block == 0
                                          for window in plan_windows(candidate, base, overlap, block)):
                    return f"use --frames {1 + wan.FRAMES_PER_LATENT * (candidate - 1)}"
        return f"give a frame count of whole blocks of {block} latent frames"

    # -- a video ---------------------------------------------------------------------------------------------
    def run(self, params: VideoParams, forcing: DiffusionForcing | None = None,
            noise: Callable[[tuple[int, ...]], np.ndarray] | None = None,
            initial_noise: np.ndarray | None = None) -> Iterator[StepRecord | ChunkFrames]:
        """Make ``params.batch_size`` videos window by window: a StepRecord per transformer call, and each window's
        new frames as a ChunkFrames as soon as they are decoded. ``noise(shape)`` replaces the seeded noise (see
        the module docstring for the order of the draws); ``initial_noise`` (B, 16, T, h, w) replaces its first
        draw, the first window's starting latents (the whole noise of a video of one window without
        ``addnoise_condition``). The run's times go to :attr:`run_timings`."""
        params, plan = self.prepare(params)
        layout = self.layout(params, forcing)
        batch, block = params.batch_size, layout.block
        channels, _, height, width = self.latent_shape(params)
        draw = noise if noise is not None else seeded_noise(image_seeds(params.seed, batch))
        if initial_noise is not None:
            draw = _starting_with(initial_noise, draw)
        timings: dict[str, float] = {"denoising_s": 0.0, "decode_s": 0.0, "steps": layout.rows}
        self.run_timings = timings
        velocity = self.guided_velocity(params, timings, frames_per_block=block, fps=params.fps)
        addnoise = float(layout.forcing.addnoise_condition)
        ops, vae = self.vae.ops, self.vae
        decoder = vae.decoder_cache()
        overlap = latent_count(layout.forcing.overlap_history)
        tail = None  # (B, 16, <= overlap, h, w): the last latent frames of the video so far
        started, row_index, first_frame = time.perf_counter(), 0, 0
        for window, schedule in zip(layout.windows, layout.schedules):
            x = _checked(draw((batch, channels, window.frames, height, width)),
                         (batch, channels, window.frames, height, width))
            if window.prefix:
                x[:, :, :window.prefix] = tail[:, :, :window.prefix]
            groups = frame_groups(schedule, block)
            samplers = [SteppedSampler(plan, x[:, :, first:stop].copy()) for first, stop in groups]
            window_started = time.perf_counter()
            with reuse_large_arrays(self.reuse_memory):
                for row in range(schedule.rows):
                    timesteps = np.tile(schedule.timesteps(row, plan.timesteps, block), (batch, 1))  # (B, T)
                    x_in = x
                    if addnoise > 0 and window.prefix:  # the frames taken over, a little noisy again
                        factor = 0.001 * addnoise
                        shape = (batch, channels, window.prefix, height, width)
                        x_in = x.copy()
                        x_in[:, :, :window.prefix] = (x[:, :, :window.prefix] * np.float32(1.0 - factor)
                                                      + _checked(draw(shape), shape) * np.float32(factor))
                        timesteps[:, :window.prefix] = math.trunc(addnoise)
                    v = velocity(x_in, timesteps)  # (B, 16, T, h, w)
                    if not np.all(np.isfinite(v)):
                        raise SdcliError(f"window {window.index} step {row + 1}: the model gave values that are "
                                         "not finite")
                    x, sigma = x.copy(), None  # a fresh array: the records handed out keep theirs
                    for (first, stop), sampler in zip(groups, samplers):
                        if schedule.moves[row, first // block]:
                            step = sampler.step(np.ascontiguousarray(v[:, :, first:stop]))
                            x[:, :, first:stop], sigma = step.x, step.sigma  # sigma: the noisiest block's
                    yield StepRecord(row_index, layout.rows, float(sigma), x, None, time.perf_counter() - started)
                    row_index += 1
            decode_started = time.perf_counter()
            timings["denoising_s"] += decode_started - window_started
            new = np.ascontiguousarray(x[:, :, window.kept_from:])  # (B, 16, n, h, w)
            tail = new if tail is None else np.concatenate([tail, new], axis=2)
            tail = tail[:, :, -overlap:]
            frames = ops.to_host(vae.decode_chunk(vae.denormalize(ops.from_host(new)), decoder))
            frames = frames.transpose(0, 2, 1, 3, 4)  # (B, F, 3, H, W)
            timings["decode_s"] += time.perf_counter() - decode_started
            yield ChunkFrames(window.index, frames, first_frame, new, time.perf_counter() - started)
            first_frame += frames.shape[1]
        del velocity  # and with it the text's keys and values
        self.leave_stage("transformer", self.transformer)
        self.leave_stage("vae", self.vae)

    def generate(self, params: VideoParams, forcing: DiffusionForcing | None = None,
                 noise: Callable[[tuple[int, ...]], np.ndarray] | None = None,
                 initial_noise: np.ndarray | None = None) -> GeneratedVideo:
        """:meth:`run` to the end, its chunks put together: the videos (B, F, 3, H, W) and all their latents."""
        params = self.prepare(params)[0]
        chunks = [record for record in self.run(params, forcing, noise, initial_noise)
                  if isinstance(record, ChunkFrames)]
        frames = np.concatenate([chunk.frames for chunk in chunks], axis=1)
        latents = np.concatenate([chunk.latents for chunk in chunks], axis=2)
        return GeneratedVideo(frames, latents, image_seeds(params.seed, params.batch_size), params,
                              dict(self.run_timings))


def _starting_with(first: np.ndarray, draw: Callable[[tuple[int, ...]], np.ndarray]):
    """A noise source giving ``first`` in place of ``draw``'s first draw (drawn all the same, so that the later
    draws are the ones they would have been)."""
    pending = [first]

    def source(shape: tuple[int, ...]) -> np.ndarray:
        given = draw(shape)
        return pending.pop() if pending else given

    return source


def _is_count(value, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _checked(noise: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``noise`` as float32 when it has ``shape`` and is finite; else a one-line error."""
    if tuple(noise.shape) != shape:
        raise SdcliError(f"the noise drawn must have shape {shape}, got {tuple(noise.shape)}")
    if not np.all(np.isfinite(noise)):
        raise SdcliError("the noise drawn holds values that are not finite")
    return np.array(noise, dtype=np.float32)


def load_skyreels_pipeline(model: str | Checkpoint, precision: str = "fp32", backend: str = "cpu",
                           text_precision: str | None = None, low_memory: bool = False) -> SkyReelsTextToVideo:
    """Open a SkyReels-V2 diffusion-forcing model (a diffusers folder, preset or repo id; never downloading) and load
    its UMT5 encoder, transformer and VAE as :func:`~sdcli.pipelines.wan.load_wan_pipeline` loads Wan's."""
    checkpoint = model if isinstance(model, Checkpoint) else open_checkpoint(model)
    if checkpoint.family != ARCHITECTURE:
        raise SdcliError(f"{checkpoint.path} is not a SkyReels-V2 diffusion forcing model")
    return SkyReelsTextToVideo.load(checkpoint, precision, backend, text_precision, low_memory)


__all__ = ["ARCHITECTURE", "DiffusionForcing", "ForcingLayout", "SKYREELS_DEFAULTS", "SKYREELS_FORCING",
           "SkyReelsTextToVideo", "load_skyreels_pipeline"]
