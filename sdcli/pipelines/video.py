"""Text to video with AnimateDiff: an SD 1.x model and a motion adapter, as diffusers' ``AnimateDiffPipeline``.

The stages are the image pipeline's, with the frames of each clip folded into the batch:

- the prompt (and the negative prompt, with guidance) is encoded once per clip, (B, S, D);
- the sampler runs on video latents (B, 4, F, h, w) through the UNet with motion modules (``UNetMotionModel``
  of :mod:`sdcli.nn.motion`, loaded by :mod:`sdcli.families.animatediff`), with the same plans, denoisers and
  guidance as images: a step of a clip is a step of its latents as one array;
- the VAE decodes ``decode_chunk`` frames at a time (diffusers' ``decode_chunk_size``), (B, F, 3, H, W).

Memory: besides ``decode_chunk``, ``unet_frames`` runs the UNet's own (spatial) layers over that many frames at a
time, as diffusers' ``enable_free_noise_split_inference`` splits them; the results are the same.

Starting noise is one unit Gaussian draw of (4, F, h, w) per clip, from the clip's seed; diffusers draws from
torch's generator, so parity with it goes through the ``initial_noise`` argument (diffusers' ``latents=``).

Clips longer than the adapter's frame window run with FreeNoise (``context_length``; diffusers'
``enable_free_noise``): the motion modules attend over overlapping windows of frames, and the seeded noise of the
frames past the first window repeats shuffled groups of earlier frames. ``initial_noise`` is used as it is, as
diffusers uses a full-length ``latents=``. The prompt is encoded once for the whole clip; diffusers interpolates a
prompt per frame, which for one prompt gives the same embedding up to float32 rounding.

What the caller leaves unset (sampler, steps, guidance scale, the scheduler settings laid over the model's) comes
from the motion adapter: a preset's settings (``animatediff-lightning``: Euler, trailing timesteps, 4 steps, no
guidance), or AnimateDiff's (DDIM over linear betas, 50 steps, guidance 7.5) for any other adapter. The CLI and a
Python caller get the same clip from the same arguments.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..config import TIMESTEP_SPACINGS
from ..errors import SdcliError
from ..families.animatediff import (ANIMATEDIFF_DEFAULTS, ANIMATEDIFF_SCHEDULER, CONTEXT_WEIGHTINGS, OpenedAdapter,
                                    VideoDefaults, load_motion_unet)
from ..io.checkpoint import Checkpoint
from ..io.embeddings import TextualInversion
from ..io.lora import LoraSpec, read_loras
from ..memory import reuse_large_arrays
from ..models import open_checkpoint, open_motion_adapter
from ..ops import get_ops
from ..prompting import match_lengths
from ..rng import BatchNoise, image_seeds, random_seed, shuffle_context_frames
from ..sampling.denoisers import Denoiser, guided_network
from ..sampling.plans import SAMPLERS, SamplerPlan
from .image import StepRecord, default_steps, leave_stage, load_prompt_encoder, on_host

log = logging.getLogger("sdcli")

DEFAULT_FRAMES = 16
DEFAULT_FPS = 8
DEFAULT_DECODE_CHUNK = 8  # frames the VAE decodes at once
DEFAULT_CONTEXT_STRIDE = 4  # diffusers' enable_free_noise default
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x"}  # Checkpoint.family in messages


@dataclass(frozen=True)
class VideoParams:
    """What one clip (or a batch of clips of one prompt) is made from. None: the model's or adapter's default
    (``sampler``, ``steps``, ``guidance_scale`` and ``timestep_spacing``: the motion adapter preset's, see the
    module docstring; ``width``/``height``: the model's native size; ``frames``/``fps``: 16 at 8 fps for
    AnimateDiff, 81 at 16 fps for Wan; ``negative_prompt``: none for AnimateDiff, Wan's own for Wan; ``seed``: a
    random one). ``flow_shift`` applies to flow-matching models (Wan) only; ``clip_skip``, ``eta``, the context
    windows and ``unet_frames`` to AnimateDiff only."""

    prompt: str
    negative_prompt: str | None = None
    frames: int | None = None
    fps: int | None = None
    steps: int | None = None
    sampler: str | None = None
    guidance_scale: float | None = None
    timestep_spacing: str | None = None  # over the scheduler config's (and the adapter preset's)
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    batch_size: int = 1
    decode_chunk: int = DEFAULT_DECODE_CHUNK
    clip_skip: int = 1
    eta: float = 0.0
    context_length: int | None = None  # FreeNoise's window, in frames (None: the whole clip at once)
    context_stride: int = DEFAULT_CONTEXT_STRIDE
    context_weighting: str = "pyramid"
    unet_frames: int | None = None  # frames through the UNet's own layers at a time (None: all; memory only)
    flow_shift: float | None = None  # the flow schedule's shift (Wan: 3.0 at 480p, 5.0 at 720p)

    def with_(self, **changes: Any) -> "VideoParams":
        return replace(self, **changes)

    def with_seed(self) -> "VideoParams":
        """These parameters with a random seed drawn where none is given (before anything loads, so that an
        output name can hold it)."""
        return self if self.seed is not None else replace(self, seed=random_seed())

    def validate(self) -> "VideoParams":
        """These parameters, or a one-line SdcliError naming the first bad one."""
        for name in ("batch_size", "decode_chunk", "clip_skip", "context_stride"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SdcliError(f"{name} must be a positive integer, got {value!r}")
        for name in ("frames", "fps", "steps", "context_length", "unet_frames"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise SdcliError(f"{name} must be a positive integer, got {value!r}")
        if self.context_weighting not in CONTEXT_WEIGHTINGS:
            raise SdcliError(f"unknown context weighting {self.context_weighting!r}; choose one of: "
                             f"{', '.join(CONTEXT_WEIGHTINGS)}")
        if self.context_length is not None and self.frames is not None and self.frames < self.context_length:
            raise SdcliError(f"{self.frames} frames are fewer than the context length {self.context_length}: "
                             "give at least as many frames, or no context length")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 8 or value % 8):
                raise SdcliError(f"{name} must be a positive multiple of 8, got {value!r}")
        for name in ("guidance_scale", "eta"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise SdcliError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.flow_shift is not None and (not math.isfinite(self.flow_shift) or self.flow_shift <= 0):
            raise SdcliError(f"flow_shift must be a finite number > 0, got {self.flow_shift!r}")
        if self.timestep_spacing is not None and self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise SdcliError(f"unknown timestep spacing {self.timestep_spacing!r}; choose one of: "
                             f"{', '.join(TIMESTEP_SPACINGS)}")
        return self


@dataclass(frozen=True)
class DecodeRecord:
    """Decoding progress after the denoising steps, for decoders that go a piece at a time (Wan's, one latent frame
    at a time): ``done`` of ``total`` pieces decoded."""

    done: int
    total: int
    elapsed_s: float


@dataclass
class GeneratedVideo:
    """A batch of clips: ``frames`` (B, F, 3, H, W) float32 in about [-1, 1], the final latents (B, 4, F, h, w)
    as decoded, the clips' seeds, the resolved parameters and the per-stage times."""

    frames: np.ndarray
    latents: np.ndarray
    seeds: list[int]
    params: VideoParams
    timings: dict[str, float] = field(default_factory=dict)


class TextToVideo:
    """A loaded SD 1.x model with a motion adapter: prompt encoder, UNet with motion modules, VAE decoder, the
    scheduler config (the model's, with the adapter preset's overrides) and what a clip is made with where its
    parameters do not say (``defaults``: the adapter preset's)."""

    def __init__(self, checkpoint: Checkpoint, prompt_encoder, network, decoder,
                 scheduler_config: dict, backend: str, precision: str,
                 defaults: VideoDefaults = ANIMATEDIFF_DEFAULTS, motion_adapter: OpenedAdapter | None = None,
                 reuse_memory: bool = True):
        self.checkpoint, self.prompt_encoder, self.network, self.decoder = checkpoint, prompt_encoder, network, decoder
        self.reuse_memory = reuse_memory  # the sampling loop keeps large freed arrays for the next step
        self.family = checkpoint.model_family
        self.scheduler_config = scheduler_config
        self.backend, self.precision = backend, precision
        self.defaults, self.motion_adapter = defaults, motion_adapter
        self.timings: dict[str, float] = {}

    @property
    def max_frames(self) -> int:
        return self.network.max_frames

    def prepare(self, params: VideoParams) -> tuple[VideoParams, SamplerPlan]:
        """``params`` with the defaults filled in (the adapter's for what a given value does not set, the model's
        size) and validated, and its sampler plan."""
        defaults = self.defaults
        if params.flow_shift is not None:
            raise SdcliError("--flow-shift applies to flow-matching models (Wan); AnimateDiff's samplers have no shift")
        params = params.with_(frames=DEFAULT_FRAMES if params.frames is None else params.frames,
                              fps=DEFAULT_FPS if params.fps is None else params.fps,
                              negative_prompt=params.negative_prompt or "")
        sampler = params.sampler or defaults.sampler
        if sampler not in SAMPLERS:
            raise SdcliError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
        steps = params.steps if params.steps is not None else defaults.steps or default_steps(sampler)
        native = self.family.image.native_size(self.network.unet)
        config = self.scheduler_config_for(params)
        params = params.with_(sampler=sampler, steps=steps,
                              guidance_scale=(defaults.guidance_scale if params.guidance_scale is None
                                              else params.guidance_scale),
                              timestep_spacing=config.get("timestep_spacing"),
                              width=native if params.width is None else params.width,
                              height=native if params.height is None else params.height,
                              seed=random_seed() if params.seed is None else params.seed).validate()
        if params.context_length is None and params.frames > self.max_frames:
            raise SdcliError(f"{params.frames} frames: the motion adapter makes at most {self.max_frames} frames at "
                             "once; use --context-length for longer clips")
        if params.context_length is not None and params.context_length > self.max_frames:
            raise SdcliError(f"a context length of {params.context_length} frames is longer than the motion "
                             f"adapter's {self.max_frames}-frame window")
        return params, SAMPLERS[sampler].plan(config, params.steps)

    def scheduler_config_for(self, params: VideoParams) -> dict[str, Any]:
        """The scheduler config a run of ``params`` plans with: the pipeline's, with its timestep spacing."""
        if params.timestep_spacing is None:
            return self.scheduler_config
        return {**self.scheduler_config, "timestep_spacing": params.timestep_spacing}

    def latent_shape(self, params: VideoParams) -> tuple[int, ...]:
        """(4, F, h, w) of one clip."""
        channels, height, width = self.family.latents.shape(params.width, params.height)
        return channels, params.frames, height, width

    def seeded_noise(self, params: VideoParams, seeds: list[int]) -> tuple[BatchNoise, np.ndarray]:
        """The clips' noise streams and their unit-variance starting noise (B, 4, F, h, w): one draw per clip from
        its seed; with a context length, FreeNoise's (the frames past the first window repeat shuffled groups of
        earlier frames, each clip shuffled from its own stream)."""
        noise = BatchNoise(seeds, self.latent_shape(params))
        start = noise.draw()
        if params.context_length is not None:
            start = np.concatenate([
                shuffle_context_frames(start[i:i + 1], params.context_length, params.context_stride,
                                       lambda count, i=i: noise.permutation(i, count))
                for i in range(len(seeds))])
        return noise, start

    def run(self, params: VideoParams,
            initial_noise: np.ndarray | None = None) -> Iterator[StepRecord | GeneratedVideo]:
        """Generate ``params.batch_size`` clips: a StepRecord per step, then the GeneratedVideo. ``initial_noise``
        (B, 4, F, h, w) replaces the seeded starting noise, scaled by the sampler as diffusers scales its
        ``latents=``."""
        params, plan = self.prepare(params)
        batch = params.batch_size
        seeds = image_seeds(params.seed, batch)
        noise, seeded_noise = self.seeded_noise(params, seeds)
        if initial_noise is not None:
            expected = (batch, *self.latent_shape(params))
            if tuple(initial_noise.shape) != expected:
                raise SdcliError(f"initial video latents must have shape {expected}, got {tuple(initial_noise.shape)}")
            if not np.all(np.isfinite(initial_noise)):
                raise SdcliError("initial video latents hold values that are not finite")
        timings: dict[str, float] = {}

        start = time.perf_counter()
        context = np.repeat(self.prompt_encoder.encode([params.prompt], clip_skip=params.clip_skip), batch, axis=0)
        uncond_context = None
        if params.guidance_scale > 1:
            uncond_context = np.repeat(self.prompt_encoder.encode([params.negative_prompt],
                                                                  clip_skip=params.clip_skip), batch, axis=0)
            if uncond_context.shape[1] != context.shape[1]:  # prompts of different chunk counts: as for images
                context, uncond_context = match_lengths(context, uncond_context,
                                                        self.prompt_encoder.encode([""], clip_skip=params.clip_skip))
        timings["text_encoding_s"] = time.perf_counter() - start
        # each stage's weights leave resident memory when the next starts, as for images (TextToImage.run)
        stages = self.family.image
        leave_stage(self.checkpoint, stages, stages.text_component, self.prompt_encoder.text_encoder)

        spec = SAMPLERS[params.sampler]
        unet = self.network.with_frames_at_once(params.unet_frames)
        if params.context_length is not None:
            unet = unet.with_context_windows(params.context_length, params.context_stride, params.context_weighting)
        network = guided_network(on_host(unet, (0, 2)), context, uncond_context, params.guidance_scale)
        denoiser = Denoiser(network, plan.alphas_cumprod, plan.prediction_type, plan.timestep_map())
        if spec.wraps_denoiser is not None:
            denoiser = spec.wraps_denoiser(denoiser, plan)
        start_noise = seeded_noise if initial_noise is None else initial_noise
        x = np.asarray(start_noise, dtype=np.float32) * np.float32(plan.init_noise_sigma)
        options = dict(plan.sampler_options)
        if params.eta and "eta" in spec.options:
            options["eta"] = params.eta

        start = time.perf_counter()
        total = len(plan.sigmas) - 1
        with reuse_large_arrays(self.reuse_memory):  # the network's activations come back at every step
            for step in spec.sample(denoiser, x, plan.sigmas, noise_sampler=noise, **options):  # x: (B, 4, F, h, w)
                x = step.x
                yield StepRecord(step.index, total, float(step.sigma), x, None, time.perf_counter() - start)
        timings["denoising_s"] = time.perf_counter() - start
        timings["steps"] = total

        latents = (x * np.float32(plan.final_scale)).astype(np.float32)  # (B, 4, F, h, w)
        leave_stage(self.checkpoint, stages, stages.denoiser_component, self.network,
                    *([self.motion_adapter.source] if self.motion_adapter is not None else []))
        start = time.perf_counter()
        frames = self.decode(latents, params.decode_chunk)
        timings["decode_s"] = time.perf_counter() - start
        leave_stage(self.checkpoint, stages, stages.decoder_component, self.decoder)
        yield GeneratedVideo(frames, latents, seeds, params, timings)

    def decode(self, latents: np.ndarray, chunk: int) -> np.ndarray:
        """Video latents (B, 4, F, h, w) -> frames (B, F, 3, H, W), ``chunk`` frames through the VAE at a time."""
        batch, channels, frames, height, width = latents.shape
        flat = np.ascontiguousarray(latents.transpose(0, 2, 1, 3, 4)).reshape(batch * frames, channels, height,
                                                                               width)
        decode = on_host(self.decoder)
        pieces = [decode(flat[i:i + chunk]) for i in range(0, len(flat), chunk)]  # (n, 3, H, W) each
        images = np.concatenate(pieces)
        return images.reshape(batch, frames, *images.shape[1:])


def load_animatediff_pipeline(model: str | Checkpoint, motion_adapter: str | Path | OpenedAdapter,
                              precision: str = "fp32", backend: str = "cpu",
                              scheduler_options: dict[str, Any] | None = None,
                              loras: Sequence[LoraSpec] | None = None, low_memory: bool = False,
                              embeddings: Sequence[TextualInversion | str | Path] = ()) -> TextToVideo:
    """Open ``model`` (an SD 1.x path, preset or repo id) and the motion adapter (a path, a motion-adapter preset
    or a repo id; never downloading: see ``sdcli.resolve_motion_adapter``), check that they fit, and load what
    text to video needs.

    The adapter brings its settings (``pipeline.defaults``): a preset's, or ANIMATEDIFF_SCHEDULER's DDIM (the
    settings of diffusers' AnimateDiff examples: ``beta_schedule="linear"``, ``clip_sample=False``,
    ``timestep_spacing="linspace"``, ``steps_offset=1``). ``scheduler_options``, when given, replace the adapter's
    scheduler settings over the model's scheduler config (AnimateDiff-Lightning's card asks for
    ``timestep_spacing="trailing"`` and ``beta_schedule="linear"``, which its preset sets).

    ``loras``: ``(LoRA, scale)`` pairs (a :class:`~sdcli.io.lora.Lora` or the path of its file) merged into the
    SD UNet's weights (copies of the layers they touch) before the motion modules join it; None: the adapter
    preset's own (AnimateLCM's ``AnimateLCM_sd15_t2v_lora.safetensors`` at 0.8, as its model card's
    ``set_adapters(["lcm-lora"], [0.8])``), () for none.

    ``low_memory``: the UNet's, the motion modules' and the VAE's weights stream from the mapped files (each
    layer's pages dropped after use) instead of being held prepared, as ``load_pipeline(low_memory=True)`` loads
    them for images: the resident weights are about one layer's, for some speed; and, as there, the sampling loop
    does not keep large freed arrays for the next step.

    ``embeddings``: textual-inversion embeddings (or their paths) that prompts call by name, as for images."""
    start = time.perf_counter()
    checkpoint = model if isinstance(model, Checkpoint) else open_checkpoint(model)
    if checkpoint.family != "sd1":
        name = FAMILY_NAMES.get(checkpoint.family, checkpoint.family.upper())
        raise SdcliError(f"{checkpoint.path} is an {name} model; AnimateDiff's motion adapters animate SD 1.x models "
                         "(SD 1.5 and its fine-tunes)")
    adapter = motion_adapter if isinstance(motion_adapter, OpenedAdapter) else open_motion_adapter(motion_adapter)
    adapter.config.check_fits(checkpoint.config("unet"), source=str(adapter.path))  # before anything loads
    defaults = adapter.defaults
    if adapter.preset is not None:
        log.info("motion adapter preset %s: %s, %s steps, guidance %g", adapter.preset.name, defaults.sampler,
                 defaults.steps or "default", defaults.guidance_scale)
    if loras is None:  # the preset's own LoRA (AnimateLCM's), else none
        loras = [] if adapter.preset is None or adapter.preset.lora is None else \
            [(adapter.lora_path, adapter.preset.lora_scale)]
    loras = read_loras(loras)
    for lora, scale in loras:
        log.info("merging the LoRA %s into the UNet at %g", lora.path, scale)
        if "text_encoder" in lora.components():
            log.warning("%s: its text-encoder layers are not applied to videos (only its UNet layers are)",
                        lora.path)
    ops = get_ops(backend)
    stages = checkpoint.model_family.image
    prompt_encoder = load_prompt_encoder(checkpoint, precision=precision, backend=backend, embeddings=embeddings)
    lora_option = {"loras": loras} if loras else {}
    unet = stages.load_denoiser(checkpoint, ops, precision, stream=low_memory, **lora_option)
    network = load_motion_unet(unet, adapter, ops, precision, stream=low_memory)
    decoder = stages.load_decoder(checkpoint, ops, precision, vae="full", tiling=False, stream=low_memory)
    options = defaults.scheduler if scheduler_options is None else scheduler_options
    scheduler_config = {**stages.scheduler_config(checkpoint), **options}
    pipeline = TextToVideo(checkpoint, prompt_encoder, network, decoder, scheduler_config, backend, precision,
                           defaults, adapter, reuse_memory=not low_memory)
    pipeline.timings["load_s"] = time.perf_counter() - start
    log.info("loaded %s with the motion adapter %s in %.2f s", checkpoint.path, adapter.path,
             pipeline.timings["load_s"])
    return pipeline


__all__ = ["ANIMATEDIFF_SCHEDULER", "CONTEXT_WEIGHTINGS", "DEFAULT_DECODE_CHUNK", "DEFAULT_FPS", "DEFAULT_FRAMES",
           "DecodeRecord", "GeneratedVideo", "TextToVideo", "VideoDefaults", "VideoParams", "load_animatediff_pipeline"]
