"""Text to video with Wan2.1, as diffusers' ``WanPipeline``: UMT5 prompts, a flow-matching DiT, the causal Wan VAE.

The stages, each letting its weights go when the next starts:

- every prompt and negative prompt of a run is encoded up front by the UMT5 encoder, its weights streamed from
  the mapped files (:meth:`WanTextToVideo.encode_prompts`), and the encoder is released before denoising: the
  conditioning (512, 4096) per distinct text is all that stays;
- the flow sampler (UniPC with a shifted flow schedule by default, Wan's own settings) runs on latents
  (B, 16, 1 + (F - 1) / 4, H / 8, W / 8) through the transformer, the unconditional and the conditional pass in one
  batch with guidance, ``uncond + scale * (cond - uncond)`` on the velocities as diffusers guides them;
- the VAE decodes one latent frame at a time through its causal cache (:mod:`sdcli.nn.vae_wan`), 1 + 4 (T - 1)
  frames for T latent frames.

Starting noise is one unit Gaussian draw of (16, T, h, w) per clip from its seed; diffusers draws from torch's
generator, so parity with it goes through ``initial_noise`` (diffusers' ``latents=``). What the caller leaves unset
comes from :data:`WAN_DEFAULTS` (the model's: 480x832, 81 frames at 16 fps, 50 UniPC steps with flow shift 3.0,
guidance 5.0, Wan's negative prompt).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from ..errors import SdcliError
from ..families import wan
from ..io.checkpoint import Checkpoint
from ..memory import return_freed_memory, reuse_large_arrays
from ..models import open_checkpoint
from ..ops import get_ops
from ..ops.parameter import unload_prepared
from ..rng import BatchNoise, image_seeds, random_seed
from ..sampling.denoisers import Network, guided_network
from ..sampling.flow import FLOW_SAMPLERS, FlowDenoiser, flow_plan
from .image import StepRecord
from .video import DecodeRecord, GeneratedVideo, VideoParams

log = logging.getLogger("sdcli")

# The negative prompt of diffusers' Wan examples (the English form of the Wan release's own).
WAN_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, overall "
    "gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly drawn "
    "hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy "
    "background, three legs, many people in the background, walking backwards")


@dataclass(frozen=True)
class WanDefaults:
    """What a Wan clip is made with where its parameters do not say (diffusers' ``WanPipeline`` defaults and the
    settings of its examples)."""

    width: int = 832
    height: int = 480
    frames: int = 81
    fps: int = 16
    steps: int = 50
    sampler: str = "unipc"
    guidance_scale: float = 5.0
    flow_shift: float = 3.0  # 480p; Wan's card and diffusers' examples use 5.0 at 720p
    negative_prompt: str = WAN_NEGATIVE_PROMPT


WAN_DEFAULTS = WanDefaults()
# What each video option of AnimateDiff means nothing for here, and the one-line refusal it gets.
ANIMATEDIFF_ONLY = ("context_length", "timestep_spacing", "unet_frames")


def nearest_frame_count(frames: int) -> int:
    """The valid frame count (1 + 4k) nearest ``frames`` (the larger on a tie)."""
    below = max(1, 1 + (frames - 1) // wan.FRAMES_PER_LATENT * wan.FRAMES_PER_LATENT)
    return below if frames - below < below + wan.FRAMES_PER_LATENT - frames else below + wan.FRAMES_PER_LATENT


def nearest_side(side: int) -> int:
    """The multiple of 16 nearest ``side`` (at least 16)."""
    return max(wan.SIDE_MULTIPLE, int(math.floor(side / wan.SIDE_MULTIPLE + 0.5)) * wan.SIDE_MULTIPLE)


def check_wan_params(params: VideoParams) -> VideoParams:
    """``params`` when Wan can make them; a one-line error naming the option and the nearest valid value."""
    if (params.frames - 1) % wan.FRAMES_PER_LATENT:
        raise SdcliError(f"Wan makes 4k+1 frames (1, 5, ..., 81); {params.frames} frames cannot be made: use "
                         f"--frames {nearest_frame_count(params.frames)}")
    for name in ("width", "height"):
        value = getattr(params, name)
        if value % wan.SIDE_MULTIPLE:
            raise SdcliError(f"Wan's {name} must be a multiple of {wan.SIDE_MULTIPLE}, got {value}: use "
                             f"{nearest_side(value)}")
    for name in ANIMATEDIFF_ONLY:
        if getattr(params, name) is not None:
            option = "--" + name.replace("_", "-")
            raise SdcliError(f"{option} applies to AnimateDiff (SD 1.x with a motion adapter), not to Wan")
    if params.clip_skip != 1:
        raise SdcliError("--clip-skip applies to CLIP text encoders (SD 1.x with a motion adapter), not to Wan's UMT5")
    if params.eta:
        raise SdcliError("--eta applies to DDIM (AnimateDiff), not to Wan's flow samplers")
    return params


class WanTextToVideo:
    """A loaded Wan2.1 model: the UMT5 prompt encoder (until released), the transformer, the VAE and the scheduler
    config; ``prepare`` resolves a clip's parameters against the model, ``run`` makes it."""

    def __init__(self, checkpoint: Checkpoint, prompt_encoder, transformer, vae, scheduler_config: dict[str, Any],
                 backend: str, precision: str, defaults: WanDefaults = WAN_DEFAULTS, reuse_memory: bool = True):
        self.checkpoint, self.prompt_encoder, self.transformer, self.vae = checkpoint, prompt_encoder, transformer, vae
        self.scheduler_config = scheduler_config
        self.backend, self.precision, self.defaults = backend, precision, defaults
        self.reuse_memory = reuse_memory
        self.motion_adapter = None  # a Wan model takes none
        self.timings: dict[str, float] = {}
        self._encoded: dict[str, np.ndarray] = {}  # text -> (1, 512, 4096)
        self._unreported_text_s = 0.0  # encoding time not yet in a clip's timings (prompts encoded ahead)

    @property
    def family(self):
        return self.checkpoint.model_family

    def prepare(self, params: VideoParams) -> tuple[VideoParams, Any]:
        """``params`` with the model's defaults filled in and checked, and its flow sampler plan."""
        defaults = self.defaults
        sampler = params.sampler or defaults.sampler
        if sampler not in FLOW_SAMPLERS:
            raise SdcliError(f"the {sampler!r} sampler does not run flow-matching models like Wan; choose one of: "
                             f"{', '.join(FLOW_SAMPLERS)}")
        params = params.with_(
            sampler=sampler, steps=defaults.steps if params.steps is None else params.steps,
            guidance_scale=defaults.guidance_scale if params.guidance_scale is None else params.guidance_scale,
            flow_shift=self.default_flow_shift() if params.flow_shift is None else params.flow_shift,
            negative_prompt=defaults.negative_prompt if params.negative_prompt is None else params.negative_prompt,
            frames=defaults.frames if params.frames is None else params.frames,
            fps=defaults.fps if params.fps is None else params.fps,
            width=defaults.width if params.width is None else params.width,
            height=defaults.height if params.height is None else params.height,
            seed=random_seed() if params.seed is None else params.seed).validate()
        check_wan_params(params)
        return params, flow_plan(sampler, self.scheduler_config, params.steps, shift=params.flow_shift)

    def default_flow_shift(self) -> float:
        """The scheduler config's flow shift (Wan-AI's: 3.0), else Wan's 480p default."""
        shift = self.scheduler_config.get("flow_shift", self.scheduler_config.get("shift"))
        return float(shift) if shift is not None else self.defaults.flow_shift

    def latent_shape(self, params: VideoParams) -> tuple[int, int, int, int]:
        """(16, T, h, w) of one clip: T = 1 + (F - 1) / 4 latent frames, h and w 1/8 of the frame's."""
        channels, height, width = self.family.latents.shape(params.width, params.height)
        return channels, 1 + (params.frames - 1) // wan.FRAMES_PER_LATENT, height, width

    @classmethod
    def load(cls, checkpoint: Checkpoint, precision: str, backend: str, text_precision: str | None,
             low_memory: bool):
        """The pipeline over ``checkpoint``'s three networks, as :func:`load_wan_pipeline` says."""
        start = time.perf_counter()
        ops = get_ops(backend)
        prompt_encoder = wan.load_prompt_encoder(checkpoint, ops, text_precision)
        transformer = wan.load_transformer(checkpoint, ops, precision, stream=low_memory)
        vae = wan.load_vae(checkpoint, ops, precision, stream=low_memory)
        pipeline = cls(checkpoint, prompt_encoder, transformer, vae, wan.scheduler_config(checkpoint), backend,
                       precision, reuse_memory=not low_memory)
        pipeline.timings["load_s"] = time.perf_counter() - start
        log.info("loaded %s (%s) in %.2f s", checkpoint.path, checkpoint.family, pipeline.timings["load_s"])
        return pipeline

    # -- the text encoder ------------------------------------------------------------------------------------
    def encode_prompts(self, clips: list[VideoParams]) -> None:
        """Encode every prompt and negative prompt of ``clips`` (prepared) that is not encoded yet."""
        texts = []
        for params in clips:
            texts.append(params.prompt)
            if params.guidance_scale > 1:
                texts.append(params.negative_prompt)
        missing = [text for text in dict.fromkeys(texts) if text not in self._encoded]
        if not missing:
            return
        if self.prompt_encoder is None:
            raise SdcliError("the text encoder was released: encode every prompt before releasing it")
        start = time.perf_counter()
        embeddings = self.prompt_encoder.encode(missing)  # (n, 512, 4096)
        for text, embedding in zip(missing, embeddings):
            self._encoded[text] = embedding[None]
        elapsed = time.perf_counter() - start
        self.timings["text_encoding_s"] = self.timings.get("text_encoding_s", 0.0) + elapsed
        self._unreported_text_s += elapsed

    def leave_stage(self, component: str, network=None) -> None:
        """Let ``component``'s weights leave resident memory: what ``network`` prepared from the mapped file, the
        file's pages (they map again when needed), and the freed memory goes back to the system."""
        if network is not None:
            unload_prepared(network)
        self.checkpoint.release(component)
        return_freed_memory()

    def release_text_encoder(self) -> None:
        """Let the text encoder go for good (about 11 GB of bf16 weights, streamed: its mapped pages and what it
        prepared); prompts encoded before stay usable."""
        if self.prompt_encoder is not None:
            self.leave_stage("text_encoder", self.prompt_encoder.text_encoder)
            self.prompt_encoder = None

    def conditioning(self, text: str, batch: int) -> np.ndarray:
        """(B, 512, 4096): the encoding of ``text`` repeated over the batch (encoded now if it was not)."""
        if text not in self._encoded:
            self.encode_prompts([VideoParams(prompt=text, guidance_scale=0.0)])
        return np.repeat(self._encoded[text], batch, axis=0)

    # -- a clip ----------------------------------------------------------------------------------------------
    def run(self, params: VideoParams,
            initial_noise: np.ndarray | None = None) -> Iterator[StepRecord | DecodeRecord | GeneratedVideo]:
        """Make ``params.batch_size`` clips: a StepRecord per step, a DecodeRecord per latent frame decoded, then
        the GeneratedVideo. ``initial_noise`` (B, 16, T, h, w) replaces the seeded starting noise (diffusers'
        ``latents=``)."""
        params, plan = self.prepare(params)
        batch = params.batch_size
        seeds = image_seeds(params.seed, batch)
        shape = (batch, *self.latent_shape(params))
        if initial_noise is not None:
            if tuple(initial_noise.shape) != shape:
                raise SdcliError(f"initial video latents must have shape {shape}, got {tuple(initial_noise.shape)}")
            if not np.all(np.isfinite(initial_noise)):
                raise SdcliError("initial video latents hold values that are not finite")
            x = np.asarray(initial_noise, dtype=np.float32)
        else:
            x = BatchNoise(seeds, shape[1:]).draw()  # (B, 16, T, h, w)
        timings: dict[str, float] = {}
        velocity = self.guided_velocity(params, timings)
        denoiser = FlowDenoiser(velocity, plan)
        start = time.perf_counter()
        total = plan.steps
        with reuse_large_arrays(self.reuse_memory):
            for step in plan.sample(denoiser, x):  # x: (B, 16, T, h, w)
                x = step.x
                yield StepRecord(step.index, total, float(step.sigma), x, None, time.perf_counter() - start)
        timings["denoising_s"] = time.perf_counter() - start
        timings["steps"] = total
        latents = x.astype(np.float32)
        del velocity, denoiser  # and with them the text's keys and values
        self.leave_stage("transformer", self.transformer)

        start = time.perf_counter()
        pieces = []
        for pieces in self.decode_frames(latents):
            yield DecodeRecord(len(pieces), latents.shape[2], time.perf_counter() - start)
        frames = np.concatenate(pieces, axis=2).transpose(0, 2, 1, 3, 4)  # (B, F, 3, H, W)
        timings["decode_s"] = time.perf_counter() - start
        self.leave_stage("vae", self.vae)
        yield GeneratedVideo(frames, latents, seeds, params, timings)

    def guided_velocity(self, params: VideoParams, timings: dict[str, float], **options) -> Network:
        """The transformer as a guided host network (x (B, 16, T, h, w), timesteps (B,) or (B, T)) -> velocity, for
        a clip of ``params`` (prepared): its prompts encoded (the time it took, here or ahead, into ``timings``),
        the encoder's pages let go, the text's keys and values computed once. ``options`` go to every transformer
        call."""
        batch, guided = params.batch_size, params.guidance_scale > 1
        texts = [params.negative_prompt, params.prompt] if guided else [params.prompt]
        self.encode_prompts([params])
        text = np.concatenate([self.conditioning(each, batch) for each in texts])  # (gB, 512, 4096)
        # the encoding this clip's prompts took, here or ahead (the first clip's timings carry a run's ahead)
        timings["text_encoding_s"], self._unreported_text_s = self._unreported_text_s, 0.0

        self.leave_stage("text_encoder")  # its streamed pages; the encoder stays usable

        ops = self.transformer.ops
        context = self.transformer.text_context(ops.from_host(text))  # the cross-attention keys and values, once

        def transformer(x_in: np.ndarray, timesteps: np.ndarray, _text) -> np.ndarray:  # host arrays in and out
            # the text is ``context``, prepared for the batch guided_network hands over ([uncond, cond] with
            # guidance, cond alone without)
            return ops.to_host(self.transformer(ops.from_host(x_in), timesteps, context, **options))

        return guided_network(transformer, text[-batch:], text[:batch] if guided else None, params.guidance_scale)

    def decode_frames(self, latents: np.ndarray) -> Iterator[list[np.ndarray]]:
        """Latents (B, 16, T, h, w) decoded one latent frame at a time through the autoencoder's cache: after each,
        the host frames so far, (B, 3, n, H, W) pieces (1 frame for the first latent frame, 4 for each later)."""
        vae = self.vae
        ops = vae.ops
        z = vae.denormalize(ops.from_host(latents))
        cache, pieces = vae.decoder_cache(), []
        for t in range(latents.shape[2]):
            pieces.append(ops.to_host(vae.decode_chunk(ops.narrow(z, 2, t, t + 1), cache)))
            yield pieces


def load_wan_pipeline(model: str | Checkpoint, precision: str = "fp32", backend: str = "cpu",
                      text_precision: str | None = None, low_memory: bool = False) -> WanTextToVideo:
    """Open a Wan2.1 model (a diffusers folder, preset or repo id; never downloading) and load what text to video
    needs: the UMT5 encoder at ``text_precision`` (None: its files', bf16 where they are bf16; its weights always
    streamed from the mapped files), the transformer and the VAE at ``precision``. ``low_memory`` streams the
    transformer's and the VAE's weights too and lets the sampling loop hand large freed arrays back at once."""
    checkpoint = model if isinstance(model, Checkpoint) else open_checkpoint(model)
    if checkpoint.family != "wan21":
        raise SdcliError(f"{checkpoint.path} is not a Wan2.1 model"
                         + (" (a SkyReels-V2 one: load_video_pipeline or load_skyreels_pipeline)"
                            if checkpoint.family in wan.ARCHITECTURES else ""))
    return WanTextToVideo.load(checkpoint, precision, backend, text_precision, low_memory)


__all__ = ["WAN_DEFAULTS", "WAN_NEGATIVE_PROMPT", "WanDefaults", "WanTextToVideo", "check_wan_params",
           "load_wan_pipeline", "nearest_frame_count", "nearest_side"]
