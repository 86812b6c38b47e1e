"""Streaming video: a clip made chunk by chunk, each chunk's frames out as soon as it is finished.

A causal Wan transformer (Self-Forcing and its kind) denoises a chunk of ``frames_per_chunk`` latent frames in a
few steps while attending to the chunks before it through a key/value cache; the VAE decodes the chunk through its
own causal cache; the frames go out before the next chunk starts. Three parts carry a per-rollout cache through
every chunk, all held by :class:`StreamCache`:

- an optional input encoder (the Wan VAE encoder, for video to video: each chunk starts from its input's
  latents noised to a step of the schedule);
- the transformer's key/value cache (:class:`sdcli.nn.wan_causal.WanKVCache`, with its window and sink);
- the streaming VAE decoder's causal cache.

The calls, as a caller drives them::

    cache = pipeline.initialize_cache(text, height=..., width=..., seeds=[...])
    for index in itertools.count():
        for record in pipeline.generate(index, cache):   # StepRecords, then a ChunkFrames
            ...
        pipeline.finalize(index, cache)                  # the chunk's keys and values into the cache

``generate`` must be given the chunk after the last finalized one, and ``finalize`` the chunk just generated: any
other index is an error. Frame bookkeeping: latent frame 0 decodes to 1 frame, every later one to 4, so the first
chunk of 3 latent frames gives 9 frames and each later one 12.

Noise is one numpy Generator per clip, seeded with the clip's seed and drawn in order (a chunk's start, then its
re-noising at each step, then its context noise if any), so the first k chunks of a run are the same whatever
the run's length.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..errors import SdcliError
from ..families import self_forcing, wan
from ..io.checkpoint import Checkpoint
from ..ops import get_ops
from ..rng import BatchNoise
from ..sampling.few_step import SELF_FORCING_SHIFT, SELF_FORCING_STEPS, FewStepSchedule, few_step_schedule
from .image import StepRecord
from .wan import WanTextToVideo

log = logging.getLogger("sdcli")
SPATIAL_COMPRESSION = wan.LATENTS.downscale

SELF_FORCING_FRAMES_PER_CHUNK = 3
SELF_FORCING_ATTENTION_FRAMES = 21  # the clip length the model was trained on (81 frames)


def chunk_frame_count(index: int, latent_frames: int = SELF_FORCING_FRAMES_PER_CHUNK) -> int:
    """Frames chunk ``index`` of ``latent_frames`` latent frames decodes to: 1 + 4 (T - 1) for the first (latent
    frame 0 is one frame), 4 T for the others."""
    per_latent = wan.FRAMES_PER_LATENT
    return 1 + per_latent * (latent_frames - 1) if index == 0 else per_latent * latent_frames


@dataclass(frozen=True)
class ChunkFrames:
    """A finished chunk: its frames (B, F, 3, H, W) in [-1, 1], the index of its first frame in the video, its
    clean latents (B, 16, T, h, w), and the seconds since the rollout started."""

    index: int
    frames: np.ndarray
    first_frame: int
    latents: np.ndarray
    elapsed_s: float


@dataclass
class StreamCache:
    """What one rollout carries from chunk to chunk."""

    transformer: object  # the transformer's key/value cache (sdcli.nn.wan_causal.WanKVCache)
    decoder: object  # the VAE decoder's causal cache
    text_context: object  # the cross-attention keys and values of the prompt, computed once
    noise: BatchNoise
    latent_shape: tuple[int, ...]  # (B, 16, T, h, w) of one chunk
    encoder: object | None = None  # the VAE encoder's causal cache, for video to video
    input_frames: Callable[[int], np.ndarray] | None = None
    next_chunk: int = 0  # the index generate expects
    pending: np.ndarray | None = None  # the generated chunk's clean latents until finalize
    frames_out: int = 0  # frames emitted so far
    started: float = field(default_factory=time.perf_counter)


class StreamingVideo:
    """A causal Wan transformer, its few-step schedule and the Wan VAE, run a chunk at a time."""

    def __init__(self, transformer, vae, schedule: FewStepSchedule, *,
                 frames_per_chunk: int = SELF_FORCING_FRAMES_PER_CHUNK,
                 max_attention_frames: int | None = SELF_FORCING_ATTENTION_FRAMES, attention_sink: bool = False,
                 input_start_step: int = 0):
        if frames_per_chunk < 1:
            raise SdcliError(f"a chunk needs at least one latent frame, got {frames_per_chunk}")
        if not 0 <= input_start_step < schedule.steps:
            raise SdcliError(f"the input's start step must be in 0..{schedule.steps - 1}, got {input_start_step}")
        self.transformer, self.vae, self.schedule = transformer, vae, schedule
        self.frames_per_chunk = frames_per_chunk
        self.max_attention_frames = max_attention_frames
        self.sink_frames = frames_per_chunk if attention_sink else 0
        self.input_start_step = input_start_step

    @property
    def ops(self):
        return self.transformer.ops

    def chunk_frame_count(self, index: int) -> int:
        """Frames chunk ``index`` decodes to (:func:`chunk_frame_count`)."""
        return chunk_frame_count(index, self.frames_per_chunk)

    def frames_for_chunks(self, chunks: int) -> int:
        """Frames a run of ``chunks`` chunks makes."""
        return sum(self.chunk_frame_count(index) for index in range(chunks))

    def initialize_cache(self, text: np.ndarray, *, height: int, width: int, seeds: list[int],
                         input_frames: Callable[[int], np.ndarray] | None = None) -> StreamCache:
        """A fresh rollout for ``text`` (B, S, text_dim) host embeddings (one prompt per clip), frames of
        ``height`` x ``width``, one seed per clip. ``input_frames(index)`` (video to video) gives chunk
        ``index``'s input frames (B, 3, F, height, width) in [-1, 1], F as :meth:`chunk_frame_count`."""
        if text.shape[0] != len(seeds):
            raise SdcliError(f"{text.shape[0]} prompt encodings for {len(seeds)} seeds")
        if height % wan.SIDE_MULTIPLE or width % wan.SIDE_MULTIPLE or height < 1 or width < 1:
            raise SdcliError(f"the frame size must be a multiple of {wan.SIDE_MULTIPLE}, got {width}x{height}")
        ops = self.ops
        h, w = height // SPATIAL_COMPRESSION, width // SPATIAL_COMPRESSION
        channels = self.transformer.config.in_channels
        cache = self_forcing.transformer_cache(self.transformer, height, width, self.max_attention_frames,
                                               self.sink_frames)
        cache.check_chunk(self.frames_per_chunk)
        shape = (len(seeds), channels, self.frames_per_chunk, h, w)
        if input_frames is not None and self.vae.encoder is None:
            raise SdcliError("video to video needs the autoencoder's encoder")
        return StreamCache(cache, self.vae.decoder_cache(), self.transformer.text_context(ops.from_host(text)),
                           BatchNoise(seeds, shape[1:]), shape,
                           self.vae.encoder_cache() if input_frames is not None else None, input_frames)

    def velocity(self, x: np.ndarray, timestep: float, cache: StreamCache) -> np.ndarray:
        """The transformer's velocity for chunk latents x (B, 16, T, h, w) at ``timestep``, reading the cache."""
        ops = self.ops
        timesteps = np.full(x.shape[0], timestep, dtype=np.float32)
        return ops.to_host(self.transformer(ops.from_host(x), timesteps, cache.text_context,
                                            frame_offset=cache.transformer.frames,
                                            self_attention=cache.transformer))

    def generate(self, index: int, cache: StreamCache) -> Iterator[StepRecord | ChunkFrames]:
        """Denoise chunk ``index`` (a StepRecord per step), decode it, and yield its ChunkFrames."""
        if cache.pending is not None:
            raise SdcliError(f"chunk {cache.next_chunk - 1} was generated but not finalized")
        if index != cache.next_chunk:
            raise SdcliError(f"the next chunk is {cache.next_chunk}, not {index}")
        schedule, start_time = self.schedule, time.perf_counter()
        x = cache.noise.draw()  # (B, 16, T, h, w)
        first_step = 0
        if cache.input_frames is not None:
            x0 = self.encode_input(index, cache)
            first_step = self.input_start_step
            x = schedule.noised(x0, x, schedule.timesteps[first_step])
        total = schedule.steps
        for step in range(first_step, total):
            timestep = schedule.timesteps[step]
            x0 = schedule.to_x0(x, self.velocity(x, timestep, cache), timestep)
            if not np.all(np.isfinite(x0)):
                raise SdcliError(f"chunk {index} step {step + 1}: the model gave values that are not finite")
            if step + 1 < total:
                x = schedule.noised(x0, cache.noise.draw(), schedule.timesteps[step + 1])
            yield StepRecord(step, total, schedule.sigma(timestep), x0, None, time.perf_counter() - start_time)
        cache.pending, cache.next_chunk = x0, index + 1
        frames = self.decode(x0, cache)  # (B, F, 3, H, W)
        chunk = ChunkFrames(index, frames, cache.frames_out, x0, time.perf_counter() - cache.started)
        cache.frames_out += frames.shape[1]
        yield chunk

    def finalize(self, index: int, cache: StreamCache) -> None:
        """Write chunk ``index``'s keys and values into the cache: one call on its clean latents, noised to the
        schedule's context noise first if that is not 0."""
        if cache.pending is None or index != cache.next_chunk - 1:
            raise SdcliError(f"chunk {index} cannot be finalized: the last chunk generated is {cache.next_chunk - 1}"
                             + ("" if cache.pending is not None else " and it was finalized already"))
        x, context = cache.pending, self.schedule.context_noise
        if context > 0:
            x = self.schedule.noised(x, cache.noise.draw(), context)
        with cache.transformer.writing(x.shape[2]):
            self.velocity(x, context, cache)
        cache.pending = None

    def decode(self, latents: np.ndarray, cache: StreamCache) -> np.ndarray:
        """Chunk latents (B, 16, T, h, w) -> its frames (B, F, 3, H, W) in [-1, 1], through the decoder's cache."""
        vae, ops = self.vae, self.vae.ops
        frames = ops.to_host(vae.decode_chunk(vae.denormalize(ops.from_host(latents)), cache.decoder))
        return frames.transpose(0, 2, 1, 3, 4)

    def encode_input(self, index: int, cache: StreamCache) -> np.ndarray:
        """Chunk ``index``'s input frames -> their normalised latents (B, 16, T, h, w), the mean of the
        autoencoder's posterior, through the encoder's cache (the first frame alone, then 4 at a time)."""
        vae, ops = self.vae, self.vae.ops
        frames = np.asarray(cache.input_frames(index), dtype=np.float32)
        expected = (cache.latent_shape[0], 3, self.chunk_frame_count(index),
                    cache.latent_shape[3] * SPATIAL_COMPRESSION, cache.latent_shape[4] * SPATIAL_COMPRESSION)
        if frames.shape != expected:
            raise SdcliError(f"chunk {index}'s input frames must be {expected}, got {frames.shape}")
        starts = ([0] if index == 0 else []) + list(range(1 if index == 0 else 0, frames.shape[2],
                                                          wan.FRAMES_PER_LATENT))
        means = []
        for start in starts:
            stop = 1 if index == 0 and start == 0 else start + wan.FRAMES_PER_LATENT
            mean, _ = vae.encode_chunk(ops.from_host(np.ascontiguousarray(frames[:, :, start:stop])), cache.encoder)
            means.append(ops.to_host(vae.normalize(mean)))
        return np.concatenate(means, axis=2)

    def stream(self, text: np.ndarray, *, height: int, width: int, seeds: list[int], chunks: int | None = None,
               input_frames: Callable[[int], np.ndarray] | None = None) -> Iterator[StepRecord | ChunkFrames]:
        """Every chunk in turn (``chunks`` of them, or without end), generate then finalize."""
        cache = self.initialize_cache(text, height=height, width=width, seeds=seeds, input_frames=input_frames)
        index = 0
        while chunks is None or index < chunks:
            yield from self.generate(index, cache)
            if chunks is None or index + 1 < chunks:
                self.finalize(index, cache)
            index += 1


class StreamingModel:
    """A loaded streaming model: the Wan text side (prompt encoding, released before the stream) and the
    :class:`StreamingVideo` that makes the chunks."""

    def __init__(self, text: WanTextToVideo, video: StreamingVideo, preset, generator: Path):
        self.text, self.video, self.preset, self.generator = text, video, preset, generator
        self.timings = text.timings

    @property
    def fps(self) -> int:
        return (self.preset or self_forcing.SELF_FORCING).fps


def load_streaming_model(generator: str | Path, base: str | Checkpoint, *, precision: str = "fp32",
                         backend: str = "cpu", max_attention_frames: int | None = SELF_FORCING_ATTENTION_FRAMES,
                         attention_sink: bool = False, steps: tuple[float, ...] = SELF_FORCING_STEPS,
                         shift: float = SELF_FORCING_SHIFT, context_noise: float = 0.0,
                         preset=self_forcing.SELF_FORCING, low_memory: bool = False) -> StreamingModel:
    """The generator file (converted to safetensors) with the text encoder, tokenizer and VAE of the Wan diffusers
    model ``base``: a causal transformer of the base's transformer config, Self-Forcing's schedule and chunks."""
    from ..models import open_checkpoint

    start = time.perf_counter()
    checkpoint = base if isinstance(base, Checkpoint) else open_checkpoint(base)
    if checkpoint.family != "wan21":
        raise SdcliError(f"{checkpoint.path} is not a Wan2.1 model: a streaming generator takes its text encoder "
                         "and VAE from one (wan21-t2v-1.3b)")
    ops = get_ops(backend)
    transformer = self_forcing.load_generator(generator, checkpoint, ops, precision, stream=low_memory)
    vae = wan.load_vae(checkpoint, ops, precision, stream=low_memory)
    text = WanTextToVideo(checkpoint, wan.load_prompt_encoder(checkpoint, ops), None, vae, {}, backend, precision,
                          reuse_memory=not low_memory)
    video = StreamingVideo(transformer, vae, few_step_schedule(steps, shift, context_noise=context_noise),
                           frames_per_chunk=SELF_FORCING_FRAMES_PER_CHUNK, max_attention_frames=max_attention_frames,
                           attention_sink=attention_sink)
    text.timings["load_s"] = time.perf_counter() - start
    log.info("loaded %s on %s in %.2f s", generator, checkpoint.path, text.timings["load_s"])
    return StreamingModel(text, video, preset, Path(generator))


__all__ = ["ChunkFrames", "chunk_frame_count", "StreamingModel", "load_streaming_model", "SELF_FORCING_ATTENTION_FRAMES", "SELF_FORCING_FRAMES_PER_CHUNK", "StreamCache",
           "StreamingVideo"]
