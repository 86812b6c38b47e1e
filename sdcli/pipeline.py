"""From a checkpoint to results: loading the networks and running the stages of the data path.

    prompt --tokenizer--> ids (B, 77) --text_encoder--> context (B, 77, D)
    seed --rng--> unit noise (B, 4, h, w) --plan.init_noise_sigma--> x
    (x, context) --sampler(denoiser(guided UNet), sigmas)--> latents --decoder--> images (B, 3, H, W) in [-1, 1]

Text to image is a generator (``TextToImage.run``) that yields a record per denoising step, so the caller owns
progress bars and previews; ``generate_image`` runs it to the end.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from .config import ClipConfig
from .errors import SdcliError
from .io.checkpoint import Checkpoint, TensorSource, open_checkpoint
from .families.sd_networks import load_taesd, load_text_encoder, load_unet, load_vae_decoder
from .nn.clip import ClipTextEncoder
from .memory import return_freed_memory
from .nn.tokenizer import EOS_TOKEN, ClipTokenizer, Tokenized
from .nn.unet import UNet2DConditionModel
from .nn.vae import VaeDecoder
from .ops.parameter import unload_prepared, unprepared_bytes
from .params import DEFAULT_SAMPLER, DEFAULT_STEPS, MAX_IMAGE_SIDE, VAE_CHOICES, GenerateParams
from .rng import BatchNoise, image_seeds, random_seed
from .sampling.denoisers import Denoiser, guided_network
from .sampling.plans import SAMPLERS
from .sizing import ImageDecoderShape, check_fits

log = logging.getLogger("sdcli")


@dataclass
class PromptEncoder:
    """Tokenizer and text encoder of one model: prompts -> conditioning (B, 77, D)."""

    tokenizer: ClipTokenizer
    text_encoder: ClipTextEncoder
    config: ClipConfig
    precision: str
    source: TensorSource | None = None  # where the weights are mapped from, for release()
    timings: dict[str, float] = field(default_factory=dict)

    def release(self) -> None:
        """Drop the text encoder's mapped pages from resident memory (encoding still works: they map again)."""
        if self.source is not None:
            self.source.release()

    def tokenize(self, prompts: list[str]) -> list[Tokenized]:
        return [self.tokenizer.tokenize(prompt) for prompt in prompts]

    def encode(self, prompts: list[str], clip_skip: int = 1) -> np.ndarray:
        """(B, 77, D) float32 hidden states for ``prompts``."""
        ids = np.stack([t.ids for t in self.tokenize(prompts)])  # (B, 77)
        start = time.perf_counter()
        embeddings = self.text_encoder.ops.to_host(self.text_encoder(ids, clip_skip=clip_skip))  # (B, 77, D)
        self.timings["encode_s"] = time.perf_counter() - start
        return embeddings


def load_prompt_encoder(model: str | Checkpoint, precision: str = "fp32", backend: str = "cpu") -> PromptEncoder:
    """Open ``model`` (a path or an opened checkpoint) and load its tokenizer and text encoder."""
    start = time.perf_counter()
    checkpoint = model if isinstance(model, Checkpoint) else open_checkpoint(model)
    config = checkpoint.text_encoder_config()
    source = checkpoint.source("text_encoder")
    text_encoder = load_text_encoder(checkpoint, precision, backend)
    tokenizer = ClipTokenizer.from_folder(checkpoint.tokenizer_dir(),
                                          default_pad_token="!" if checkpoint.family == "sd2" else EOS_TOKEN)
    encoder = PromptEncoder(tokenizer, text_encoder, config, precision, source)
    encoder.timings["load_s"] = time.perf_counter() - start
    log.info("loaded the %s text encoder from %s in %.2f s", checkpoint.family, checkpoint.path,
             encoder.timings["load_s"])
    return encoder


def on_host(network, arrays: tuple[int, ...] = (0,)):
    """``network`` as a function of host arrays: the positional arguments at ``arrays`` go to its backend
    (``ops.from_host``) and its result comes back (``ops.to_host``): the host boundary of every network call.
    Other arguments (timesteps) pass as they are."""
    ops = network.ops

    def call(*args):
        return ops.to_host(network(*(ops.from_host(arg) if i in arrays else arg for i, arg in enumerate(args))))

    return call


# -- text to image -----------------------------------------------------------------------------------------------

LATENT_CHANNELS = 4
VAE_SCALE = 8  # pixels per latent
# The sampler a model's own scheduler config names (diffusers class -> sdcli sampler); anything else gets PNDM.
SCHEDULER_CLASS_SAMPLERS = {"PNDMScheduler": "pndm", "DDIMScheduler": "ddim", "DDPMScheduler": "ddpm",
                            "EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler_a",
                            "HeunDiscreteScheduler": "heun", "DPMSolverMultistepScheduler": "dpmpp_2m",
                            "LCMScheduler": "lcm", "UniPCMultistepScheduler": "unipc"}


@dataclass(frozen=True)
class StepRecord:
    """One finished denoising step: ``index`` counts from 0 to ``total`` - 1."""

    index: int
    total: int
    sigma: float
    latents: np.ndarray  # (B, 4, h, w), the sampler's current state
    preview: np.ndarray | None  # (B, 3, H, W) in [-1, 1]: the current x0 estimate through TAESD, when asked
    elapsed_s: float


@dataclass(frozen=True)
class GeneratedBatch:
    """The result of one batch: images in [-1, 1] and the latents the VAE decoded."""

    images: np.ndarray  # (B, 3, H, W) float32
    latents: np.ndarray  # (B, 4, H/8, W/8) float32
    seeds: list[int]
    params: GenerateParams  # with width, height, seed and sampler filled in
    timings: dict[str, float]  # seconds (text_encoding_s, denoising_s, s_per_step, decode_s) and steps


class TextToImage:
    """A loaded model: prompt encoder, UNet, image decoder and scheduler config. ``run`` generates.

    Low memory: ``encode_prompts`` encodes every prompt a run will need ahead of time and keeps its conditioning,
    after which ``release_text_encoder`` drops the text encoder's weights (about 0.5 GB for SD1.5 in fp32,
    1.4 GB for SD2.1) for the rest of the pipeline's life. The trade-off: each distinct prompt and negative
    prompt then holds its (1, 77, D) conditioning (0.24 MB for SD1, 0.32 MB for SD2) until the pipeline is
    dropped, and a prompt that was not encoded ahead can no longer be generated. The images are the same bit for
    bit either way, since ``run`` encodes one row per prompt and repeats it over the batch in both cases.
    """

    def __init__(self, checkpoint: Checkpoint, prompt_encoder: PromptEncoder, unet: UNet2DConditionModel,
                 decoder, scheduler_config: dict, backend: str, precision: str, vae: str):
        self.checkpoint, self.prompt_encoder, self.unet, self.decoder = checkpoint, prompt_encoder, unet, decoder
        self.scheduler_config = scheduler_config
        self.backend, self.precision, self.vae = backend, precision, vae
        self.timings: dict[str, float] = {}
        self._preview_decoder = decoder if vae == "taesd" else None
        self._encoded: dict[tuple[str, int], np.ndarray] = {}  # (text, clip_skip) -> (1, 77, D), see encode_prompts

    @property
    def native_size(self) -> int:
        """The image side the model was trained at: the UNet's sample size times 8 (512 for SD1.5, 768 for SD2.1)."""
        return self.unet.config.sample_size * VAE_SCALE

    @property
    def default_sampler(self) -> str:
        return SCHEDULER_CLASS_SAMPLERS.get(self.scheduler_config.get("_class_name", ""), DEFAULT_SAMPLER)

    def resolve(self, params: GenerateParams) -> GenerateParams:
        """``params`` with the model's defaults filled in (sampler, steps, size, a random seed) and validated."""
        sampler = self.default_sampler if params.sampler is None else params.sampler
        if sampler not in SAMPLERS:
            raise SdcliError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
        params = params.with_(sampler=sampler, steps=default_steps(sampler) if params.steps is None else params.steps,
                              width=self.native_size if params.width is None else params.width,
                              height=self.native_size if params.height is None else params.height,
                              seed=random_seed() if params.seed is None else params.seed).validate()
        SAMPLERS[sampler].plan(self.scheduler_config, params.steps)  # a step count the schedule cannot give
        check_fits(self.unet.config, self.decoder_shape(), params.width, params.height, params.batch_size,
                   guided=params.guidance_scale > 1, backend=self.backend, limit=MAX_IMAGE_SIDE,
                   weights=(unprepared_bytes(self.unet), unprepared_bytes(self.decoder)))
        return params

    def decoder_shape(self) -> ImageDecoderShape:
        """What the memory estimate needs of the image decoder (TAESD or the model's VAE, tiled or not)."""
        if isinstance(self.decoder, VaeDecoder):
            return ImageDecoderShape.of_vae(self.decoder.config, self.decoder.tiling)
        return ImageDecoderShape(None)

    def conditioning(self, text: str, clip_skip: int = 1) -> np.ndarray:
        """(1, 77, D) conditioning of one prompt: encoded ahead by ``encode_prompts``, else encoded now."""
        encoded = self._encoded.get((text, clip_skip))
        if encoded is not None:
            return encoded
        if self.prompt_encoder is None:
            raise SdcliError(f"the text encoder was released to save memory and the prompt {text!r} was not "
                             "encoded ahead")
        return self.prompt_encoder.encode([text], clip_skip=clip_skip)  # (1, 77, D)

    def encode_prompts(self, jobs: Iterable[GenerateParams]) -> None:
        """Encode and keep the prompt of every job (and its negative prompt where guidance uses one), each
        distinct (text, clip_skip) once, so that ``release_text_encoder`` can follow."""
        for params in jobs:
            texts = [params.prompt] + ([params.negative_prompt] if params.guidance_scale > 1 else [])
            for text in texts:
                if (text, params.clip_skip) not in self._encoded:
                    self._encoded[text, params.clip_skip] = self.conditioning(text, params.clip_skip)

    def release_text_encoder(self) -> None:
        """Drop the tokenizer and text encoder; only prompts kept by ``encode_prompts`` can be generated after."""
        if self.prompt_encoder is not None:
            log.info("released the text encoder (%d prompts encoded ahead)", len(self._encoded))
            self.prompt_encoder.release()  # the file stays mapped (the checkpoint keeps it): drop its pages
        self.prompt_encoder = None
        return_freed_memory()  # what its layers had prepared

    def leave_stage(self, component: str, network) -> None:
        """Let the weights of ``component`` ("text_encoder", "unet", "vae") and its ``network`` leave resident
        memory: the layers drop the weights they prepared from the mapped file (``unload_prepared``: about 1.7 GB
        for the SD1.5 UNet in fp16, remade in about a second when it runs again), the file's pages are released
        (they map again from the page cache when needed) and the freed memory goes back to the system."""
        if network is not None:
            unload_prepared(network)
        self.checkpoint.release(component)
        return_freed_memory()

    def preview_decoder(self):
        if self._preview_decoder is None:
            self._preview_decoder = load_taesd(backend=self.backend)[1]
        return self._preview_decoder

    def run(self, params: GenerateParams, initial_noise: np.ndarray | None = None,
            preview_every: int = 0) -> Iterator[StepRecord | GeneratedBatch]:
        """Generate ``params.batch_size`` images: yield a StepRecord per step, then the GeneratedBatch.

        ``initial_noise`` (B, 4, H/8, W/8) replaces the seeded unit-variance starting noise; it is scaled by the
        sampler exactly as diffusers scales its ``latents=`` argument. ``preview_every`` > 0 decodes the current
        x0 estimate with TAESD every that many steps (and at the last).
        """
        params = self.resolve(params)
        batch = params.batch_size
        latent_shape = (LATENT_CHANNELS, params.height // VAE_SCALE, params.width // VAE_SCALE)
        seeds = image_seeds(params.seed, batch)
        noise = BatchNoise(seeds, latent_shape)
        seeded_noise = noise.draw()  # drawn either way, so a stochastic sampler's later draws follow the seed alone
        if initial_noise is None:
            initial_noise = seeded_noise
        elif initial_noise.shape != (batch, *latent_shape):
            raise SdcliError(f"initial latents must have shape {(batch, *latent_shape)} for {batch} image(s) of "
                             f"{params.width}x{params.height}, got {tuple(initial_noise.shape)}")
        timings: dict[str, float] = {}

        start = time.perf_counter()
        # One row per prompt repeated over the batch, as diffusers' num_images_per_prompt does.
        context = np.repeat(self.conditioning(params.prompt, params.clip_skip), batch, axis=0)  # (B, 77, D)
        uncond_context = None
        if params.guidance_scale > 1:
            uncond_context = np.repeat(self.conditioning(params.negative_prompt, params.clip_skip), batch,
                                       axis=0)  # (B, 77, D)
        timings["text_encoding_s"] = time.perf_counter() - start
        # Each stage's weights leave resident memory when the next stage starts, so that the peak is the largest
        # stage's, not the sum of all three (see leave_stage).
        self.leave_stage("text_encoder", self.prompt_encoder.text_encoder if self.prompt_encoder else None)

        spec = SAMPLERS[params.sampler]
        plan = spec.plan(self.scheduler_config, params.steps)
        network = guided_network(on_host(self.unet, (0, 2)), context, uncond_context, params.guidance_scale,
                                 params.guidance_rescale)
        denoiser = Denoiser(network, plan.alphas_cumprod, plan.prediction_type, plan.timestep_map())
        if spec.wraps_denoiser is not None:
            denoiser = spec.wraps_denoiser(denoiser, plan)
        x = np.asarray(initial_noise, dtype=np.float32) * np.float32(plan.init_noise_sigma)
        options = dict(plan.sampler_options)
        if params.eta and "eta" in spec.options:
            options["eta"] = params.eta

        start = time.perf_counter()
        total = len(plan.sigmas) - 1
        for step in spec.sample(denoiser, x, plan.sigmas, noise_sampler=noise, **options):  # x: (B, 4, h, w)
            x = step.x
            preview = None
            if preview_every and ((step.index + 1) % preview_every == 0 or step.index + 1 == total):
                preview = on_host(self.preview_decoder())(step.denoised)
            yield StepRecord(step.index, total, float(step.sigma), x, preview, time.perf_counter() - start)
        timings["denoising_s"] = time.perf_counter() - start
        timings["steps"] = total
        timings["s_per_step"] = timings["denoising_s"] / max(total, 1)

        latents = (x * np.float32(plan.final_scale)).astype(np.float32)  # (B, 4, h, w) what diffusers decodes
        self.leave_stage("unet", self.unet)
        start = time.perf_counter()
        images = on_host(self.decoder)(latents)  # (B, 3, H, W)
        timings["decode_s"] = time.perf_counter() - start
        self.leave_stage("vae", self.decoder)
        yield GeneratedBatch(images, latents, seeds, params, timings)


def load_pipeline(model: str | Checkpoint, precision: str = "fp32", backend: str = "cpu",
                  vae: str = "full", vae_tiling: bool = False, low_memory: bool = False) -> TextToImage:
    """Open ``model`` and load everything text-to-image needs: tokenizer, text encoder, UNet, VAE decoder
    (``vae="taesd"``: the shipped tiny autoencoder instead) and the scheduler config.

    ``vae_tiling``: the full VAE decodes large images in overlapping tiles, as diffusers' ``enable_tiling()``
    (see :class:`~sdcli.nn.vae.VaeDecoder`; TAESD always decodes whole). ``low_memory`` turns tiling on and streams
    the UNet's and VAE's weights (their mapped pages leave resident memory after each layer's use, see
    :func:`~sdcli.nn.layers.load_weights`); the caller then encodes its prompts ahead and releases the text encoder
    (see :class:`TextToImage`).
    """
    if vae not in VAE_CHOICES:
        raise SdcliError(f"unknown VAE {vae!r}; choose one of: {', '.join(VAE_CHOICES)}")
    start = time.perf_counter()
    checkpoint = model if isinstance(model, Checkpoint) else open_checkpoint(model)
    prompt_encoder = load_prompt_encoder(checkpoint, precision=precision, backend=backend)
    unet = load_unet(checkpoint, precision, backend, stream=low_memory)
    if vae == "taesd":
        decoder = load_taesd(backend=backend)[1]
    else:
        decoder = load_vae_decoder(checkpoint, precision=precision, backend=backend,
                                   tiling=vae_tiling or low_memory, stream=low_memory)
    scheduler_config = dict(checkpoint.component_config("scheduler"))
    scheduler_config["prediction_type"] = checkpoint.prediction_type
    pipeline = TextToImage(checkpoint, prompt_encoder, unet, decoder, scheduler_config, backend, precision, vae)
    pipeline.timings["load_s"] = time.perf_counter() - start
    log.info("loaded %s (%s, %s) in %.2f s", checkpoint.path, checkpoint.family, checkpoint.prediction_type,
             pipeline.timings["load_s"])
    return pipeline


def default_steps(sampler: str) -> int:
    """The step count a sampler runs when none is asked for: 50, or its own (LCM: 4)."""
    return SAMPLERS[sampler].default_steps or DEFAULT_STEPS


def generate_image(pipeline: TextToImage, params: GenerateParams,
                   initial_noise: np.ndarray | None = None) -> GeneratedBatch:
    """Run ``pipeline`` to the end and return the batch (the library call without progress reporting)."""
    for record in pipeline.run(params, initial_noise=initial_noise):
        if isinstance(record, GeneratedBatch):
            return record
    raise AssertionError("the pipeline ended without a result")
