"""Text to image over a model family's stages: planning a run, loading a model, and generating its images.

    prompt --prompt encoder--> conditioning (B, S, D)
    seed --rng--> unit noise (B, C, h, w) --plan.init_noise_sigma--> x
    (x, conditioning) --sampler(denoiser(guided network), sigmas)--> latents --decoder--> images (B, 3, H, W) in [-1, 1]

A run may start from an init image instead (image to image, inpainting: :mod:`sdcli.pipelines.image_to_image`
says where it starts, which steps it runs and what it does after each).

A run is planned first (:func:`plan_run`: its batches, the seed of every image, drawn once when none is given,
and initial latents read from a file), then each batch is prepared against the loaded model once
(:meth:`TextToImage.prepare`: the model's defaults, the sampler plan, the memory check) and run.
:meth:`TextToImage.run` is a generator that yields a record per denoising step, so the caller owns progress bars
and previews; :func:`generate_image` runs it to the end.

What a pipeline asks of a family (``checkpoint.model_family``, an :class:`~sdcli.families.Family`):

- ``latents``: its latent geometry (channels, pixels per latent), for the noise, latents files and image sizes;
- ``image``, its :class:`~sdcli.families.ImageStages`:

  - ``load_prompt_encoder(checkpoint, ops, precision[, embeddings])``: an object with ``tokenize(prompts)``,
    ``encode(prompts, clip_skip) -> (B, S, D)``, ``release()`` (drop its mapped weights' pages), ``timings`` and
    its ``text_encoder`` network; ``embeddings`` (textual inversions, passed only when some are asked for) become
    words of its prompts. The prompt and the negative prompt may encode to different lengths S (long prompts):
    the shorter is then extended with the encoding of the empty prompt (:func:`sdcli.prompting.match_lengths`);
  - ``load_denoiser(checkpoint, ops, precision, stream[, loras])``: ``network(x_in (B, C, h, w), timesteps (B,),
    context (B, S, D)) -> (B, C, h, w)``, the prediction the scheduler config's ``prediction_type`` names, with
    ``loras`` (``(LoRA, scale)`` pairs, passed only when some are asked for) merged into its weights;
  - ``load_decoder(checkpoint, ops, precision, vae, tiling, stream)`` and ``load_preview_decoder(ops)``:
    ``decoder(latents (B, C, h, w)) -> images (B, 3, H, W)`` in [-1, 1];
  - ``scheduler_config(checkpoint)``: the diffusers scheduler config the sampler plans read;
  - ``native_size(network)``, ``check_memory(network, decoder, params, backend)`` and ``unload(network)`` (drop
    what a network prepared from its weights);
  - ``text_component``, ``denoiser_component``, ``decoder_component``: the checkpoint component each stage reads;
  - for runs from an init image, ``load_image_encoder(checkpoint, ops, precision)``: ``encoder.distribution(images
    (B, 3, H, W)) -> (mean, logvar)`` of the latents and its ``scaling_factor``; and ``input_channels(network)``
    (9: an inpainting UNet, which also reads the mask and the masked image's latents).

Nothing here names a network: the family's loaders are the only code that builds one.

Each network carries its backend (``network.ops``) and computes on that backend's arrays; the pipeline crosses
the host boundary around every call (:func:`on_host`: ``ops.from_host`` in, ``ops.to_host`` out), so samplers,
previews and images stay host numpy while a device backend keeps the activations resident.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..errors import SdcliError
from ..families import Family, ImageStages, LatentGeometry
from ..io.checkpoint import Checkpoint
from ..io.embeddings import TextualInversion
from ..io.lora import Lora, LoraSpec, read_loras
from ..io.lora_switch import set_key
from ..io.lora_tags import prompt_loras, split_lora_tags
from ..io.prompts_file import PromptLine
from ..memory import return_freed_memory, reuse_large_arrays
from ..models import open_checkpoint, weights_dir
from ..ops import get_ops
from ..prompting import match_lengths
from ..params import DEFAULT_SAMPLER, DEFAULT_STEPS, MAX_SEED, VAE_CHOICES, GenerateParams
from ..rng import BatchNoise, image_seeds, random_seed
from ..sampling.denoisers import Denoiser, guided_network
from ..sampling.plans import SAMPLERS, SamplerPlan
from ..sampling.samplers import steps_with
from .image_to_image import INPAINTING_CHANNELS, InitImage, first_step, start_from_image, with_mask_channels

log = logging.getLogger("sdcli")

# The sampler a model's own scheduler config names (diffusers class -> sdcli sampler); anything else gets PNDM.
SCHEDULER_CLASS_SAMPLERS = {"PNDMScheduler": "pndm", "DDIMScheduler": "ddim", "DDPMScheduler": "ddpm",
                            "EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler_a",
                            "HeunDiscreteScheduler": "heun", "DPMSolverMultistepScheduler": "dpmpp_2m",
                            "LCMScheduler": "lcm", "UniPCMultistepScheduler": "unipc"}


# -- planning a run ----------------------------------------------------------------------------------------------

def unet_set(loras: Sequence[tuple[Lora, float, float]]) -> list[tuple[Lora, float]]:
    """The denoiser's LoRA set of (LoRA, text-encoder weight, UNet weight) triples: (LoRA, scale) pairs, those at
    weight 0 left out."""
    return [(lora, unet) for lora, _, unet in loras if unet != 0]


def text_encoder_set(loras: Sequence[tuple[Lora, float, float]]) -> list[tuple[Lora, float]]:
    """The text encoder's LoRA set of (LoRA, text-encoder weight, UNet weight) triples: the pairs of the LoRAs
    with text-encoder layers, those at weight 0 left out."""
    return [(lora, te) for lora, te, _ in loras if te != 0 and "text_encoder" in lora.components()]


@dataclass(frozen=True)
class Job:
    """One batch of images: its parameters (``batch_size`` images from ``seed`` on), the initial latents that
    replace the seeded noise (None: drawn from the seeds), and, once prepared against a model, the sampler plan."""

    params: GenerateParams
    initial_noise: np.ndarray | None = None  # (B, C, h, w) unit-variance, as diffusers' latents= argument
    plan: SamplerPlan | None = None  # set by TextToImage.prepare, with the params resolved
    first_image: int = 0  # the index in its run of the job's first image (0-based)
    init_image: InitImage | None = None  # the image (and mask) the run starts from; None: from noise
    # set by TextToImage.prepare: the pipeline's LoRAs and those of the prompt's <lora:...> tags, each with its
    # text-encoder and UNet weight
    loras: tuple[tuple[Lora, float, float], ...] = ()

    @property
    def unet_loras(self) -> list[tuple[Lora, float]]:
        return unet_set(self.loras)

    @property
    def text_encoder_loras(self) -> list[tuple[Lora, float]]:
        return text_encoder_set(self.loras)

    @property
    def seeds(self) -> list[int]:
        """The seed of each image: seed, seed + 1, ... (wrapping at 2**32)."""
        if self.params.seed is None:
            raise SdcliError("a job's seeds are known once its seed is: plan_run or TextToImage.prepare draws one")
        return image_seeds(self.params.seed, self.params.batch_size)


@dataclass(frozen=True)
class RunPlan:
    """Every batch of a run, in order, and the run's first seed (``seed_drawn``: it was drawn, none was given)."""

    jobs: list[Job]
    seed: int
    seed_drawn: bool

    @property
    def seeds(self) -> list[int]:
        """The seed of every image of the run."""
        return [seed for job in self.jobs for seed in job.seeds]

    @property
    def prompts(self) -> list[str]:
        """The prompt of every image of the run."""
        return [job.params.prompt for job in self.jobs for _ in job.seeds]

    def shard(self, number: int, count: int) -> RunPlan:
        """The ``number``-th (1-based) of ``count`` deterministic slices of the run: its batches number, count +
        number, 2 count + number, ... Every image keeps its seed, its noise, its batch and its index in the run
        (``Job.first_image``), so the union of the ``count`` slices makes exactly the images of the whole run."""
        if not 1 <= number <= count:
            raise SdcliError(f"shard {number}/{count}: the shard number must be in 1..{count}")
        return RunPlan([job for position, job in enumerate(self.jobs) if position % count == number - 1],
                       self.seed, self.seed_drawn)


def plan_run(params: GenerateParams, *, prompts: Sequence[PromptLine] | None = None, num_images: int = 1,
             batch_size: int = 1, latents: str | Path | np.ndarray | None = None,
             family: Family | None = None, init_image: InitImage | None = None) -> RunPlan:
    """Every batch of a run, in order: each prompt (``params.prompt``, or each line of a prompts file with its own
    settings), ``num_images`` images of it, in batches of up to ``batch_size``.

    Seeds: the run starts at ``params.seed``, or at one drawn here (once, for the whole run) when it is None; the
    images count on from it (seed, seed + 1, ...), and a line's own ``--seed`` starts its images there without
    moving the count. Every batch's settings are validated before anything runs.

    ``latents``: the initial noise of every image of the run, a ``.npy`` file or an array (images, C, h, w),
    checked against ``family``'s latent geometry (needed with it); the run's width and height follow from it.

    ``init_image``: every image of the run starts from it (image to image, or inpainting with its mask); the run's
    width and height are its size.
    """
    batch_size = min(batch_size, num_images)
    lines: list[PromptLine | None] = list(prompts) if prompts is not None else [None]
    seed_drawn = params.seed is None
    first_seed = random_seed() if seed_drawn else params.seed
    noise = None
    if latents is not None:
        if family is None:
            raise ValueError("plan_run needs the model's family to check latents")
        noise = (read_latents(latents, family.latents) if not isinstance(latents, np.ndarray)
                 else check_latents(latents, family.latents, "latents"))
        params = size_from_latents(params, noise, num_images * len(lines), family.latents)
    if init_image is not None:
        params = init_image.sized(params)
    jobs = []
    next_seed = first_seed
    index = 0  # of the run's first image in the next batch
    for line in lines:
        line_params, line_seed = params, None
        if line is not None:
            changes = dict(line.overrides)  # GenerateParams field names
            line_seed = changes.pop("seed", None)
            line_params = params.with_(prompt=line.prompt, **changes)
        seeds = image_seeds(line_seed if line_seed is not None else next_seed, num_images)
        if line_seed is None:
            next_seed = (seeds[-1] + 1) % (MAX_SEED + 1)
        if line_params.sampler and line_params.sampler not in SAMPLERS:
            raise SdcliError(f"unknown scheduler {line_params.sampler!r}; choose one of: {', '.join(SAMPLERS)}")
        line_params.with_(seed=seeds[0], batch_size=1).validate()
        if init_image is None and line_params.strength is not None:
            raise SdcliError(f"{'a prompts file line' if line else 'the run'} sets a strength, which only a run "
                             "from an init image has")
        if init_image is not None and (line_params.steps or line_params.sampler):  # else known once the model is
            first_step(line_params.steps or default_steps(line_params.sampler),
                       line_params.strength or init_image.default_strength)
        for start in range(0, num_images, batch_size):
            chunk = seeds[start:start + batch_size]
            jobs.append(Job(line_params.with_(seed=chunk[0], batch_size=len(chunk)),
                            noise[index:index + len(chunk)] if noise is not None else None, first_image=index,
                            init_image=init_image))
            index += len(chunk)
    return RunPlan(jobs, first_seed, seed_drawn)


def read_latents(path: str | Path, geometry: LatentGeometry) -> np.ndarray:
    """A (N, C, h, w) float32 array from a .npy file ((C, h, w) is taken as N = 1), checked against
    ``geometry``."""
    try:
        with open(path, "rb") as stream:
            if stream.read(6) != b"\x93NUMPY":
                raise SdcliError(f"--latents {path}: not a .npy file (numpy.save writes them)")
            stream.seek(0)
            array = np.load(stream, allow_pickle=False)
    except OSError as error:
        raise SdcliError(f"--latents {path}: cannot read it: {error.strerror or error}") from None
    except ValueError:  # an object array (which only pickle could read), or a damaged header or payload
        raise SdcliError(f"--latents {path}: not a .npy file of numbers (it is damaged, or holds Python "
                         "objects)") from None
    return check_latents(array, geometry, f"--latents {path}")


def check_latents(array: np.ndarray, geometry: LatentGeometry, label: str) -> np.ndarray:
    """``array`` as (N, C, h, w) float32 latents of ``geometry``; a one-line SdcliError starting with ``label``
    otherwise."""
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[1] != geometry.channels or not np.issubdtype(array.dtype, np.floating):
        raise SdcliError(f"{label}: expected float latents of shape {geometry.describe()}, got {array.dtype} "
                         f"{array.shape}")
    if not np.isfinite(array).all():
        raise SdcliError(f"{label}: the latents contain NaN or infinite values")
    return array.astype(np.float32)


def size_from_latents(params: GenerateParams, latents: np.ndarray, total_images: int,
                      geometry: LatentGeometry) -> GenerateParams:
    """Take width/height from the latents when not given; check the image count and any given size."""
    if latents.shape[0] != total_images:
        raise SdcliError(f"--latents holds {latents.shape[0]} image(s) but the run makes {total_images}")
    width, height = geometry.image_size(latents.shape)
    for name, given, implied in (("width", params.width, width), ("height", params.height, height)):
        if given is not None and given != implied:
            raise SdcliError(f"--{name} {given} does not match the latents, which make {implied}")
    return params.with_(width=width, height=height)


# -- text to image -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StepRecord:
    """One finished denoising step: ``index`` counts from 0 to ``total`` - 1."""

    index: int
    total: int
    sigma: float
    latents: np.ndarray  # (B, C, h, w), the sampler's current state
    preview: np.ndarray | None  # (B, 3, H, W) in [-1, 1]: the current x0 estimate through the preview decoder
    elapsed_s: float


@dataclass(frozen=True)
class GeneratedBatch:
    """The result of one batch: images in [-1, 1] and the latents the decoder decoded."""

    images: np.ndarray  # (B, 3, H, W) float32
    latents: np.ndarray  # (B, C, H/f, W/f) float32
    seeds: list[int]
    params: GenerateParams  # with width, height, seed and sampler filled in
    timings: dict[str, float]  # seconds (text_encoding_s, denoising_s, s_per_step, decode_s) and steps


def leave_stage(checkpoint: Checkpoint, stages, component: str, network, *sources) -> None:
    """Let the weights of the checkpoint's ``component`` and its ``network`` leave resident memory: the layers
    drop the weights they prepared from the mapped file (the family's ``unload``: about 1.7 GB for the SD1.5 UNet in
    fp16, remade in about a second when it runs again), the file's pages are released (they map again from the page
    cache when needed), and those of ``sources`` (other files the network read, a motion adapter's), and the freed
    memory goes back to the system."""
    if network is not None:
        stages.unload(network)
    checkpoint.release(component)
    for source in sources:
        source.release()
    return_freed_memory()


def on_host(network, arrays: tuple[int, ...] = (0,)):
    """``network`` as a function of host arrays: the positional arguments at ``arrays`` go to its backend
    (``ops.from_host``) and its result comes back (``ops.to_host``): the host boundary of every network call.
    Other arguments (timesteps) pass as they are."""
    ops = network.ops

    def call(*args):
        return ops.to_host(network(*(ops.from_host(arg) if i in arrays else arg for i, arg in enumerate(args))))

    return call


class TextToImage:
    """A loaded model: prompt encoder, denoising network, image decoder and scheduler config of its family's
    stages (and the image encoder, loaded for the first run from an init image). ``prepare`` resolves a batch
    against the model, ``run`` generates it, from noise or from the job's init image.

    Low memory: ``encode_prompts`` encodes every prompt a run will need ahead of time and keeps its conditioning,
    after which ``release_text_encoder`` drops the text encoder's weights (about 0.5 GB for SD1.5 in fp32,
    1.4 GB for SD2.1) for the rest of the pipeline's life. The trade-off: each distinct prompt and negative
    prompt then holds its (1, 77, D) conditioning (0.24 MB for SD1, 0.32 MB for SD2) until the pipeline is
    dropped, and a prompt that was not encoded ahead can no longer be generated. The images are the same bit for
    bit either way, since ``run`` encodes one row per prompt and repeats it over the batch in both cases.
    """

    def __init__(self, checkpoint: Checkpoint, prompt_encoder, network, decoder, scheduler_config: dict,
                 backend: str, precision: str, vae: str, reuse_memory: bool = True,
                 loras: Sequence[tuple[Lora, float, float]] = (), lora_dir: str | Path | None = None):
        self.checkpoint, self.prompt_encoder, self.network, self.decoder = checkpoint, prompt_encoder, network, decoder
        self.reuse_memory = reuse_memory  # the sampling loop keeps large freed arrays for the next step
        self.family: Family = checkpoint.model_family
        self.stages = self.family.image
        self.scheduler_config = scheduler_config
        self.backend, self.precision, self.vae = backend, precision, vae
        self.timings: dict[str, float] = {}
        self._preview_decoder = decoder if vae == "taesd" else None
        # (text, clip_skip, the text encoder's LoRA set) -> (1, S, D), see encode_prompts
        self._encoded: dict[tuple, np.ndarray] = {}
        self._image_encoder = None  # the VAE encoder, loaded for the first run from an init image
        self._image_encodings: dict[tuple[InitImage, bool], tuple[np.ndarray, np.ndarray]] = {}  # see encode_image
        self.loras = tuple(loras)  # every job's, before its prompt's <lora:...> tags
        self.lora_dir = Path(lora_dir) if lora_dir is not None else default_lora_dir()

    @property
    def native_size(self) -> int:
        """The image side the model was trained at (512 for SD1.5, 768 for SD2.1)."""
        return self.stages.native_size(self.network)

    @property
    def input_channels(self) -> int:
        """The denoising network's input channels: 4, or 9 for an inpainting UNet."""
        channels = self.stages.input_channels
        return channels(self.network) if channels is not None else self.family.latents.channels

    @property
    def default_sampler(self) -> str:
        return SCHEDULER_CLASS_SAMPLERS.get(self.scheduler_config.get("_class_name", ""), DEFAULT_SAMPLER)

    def prepare(self, job: Job | GenerateParams) -> Job:
        """``job`` resolved against this model, once: the model's defaults filled in (sampler, steps, size, a
        random seed when none is given), validated, its sampler plan made and its memory checked; its initial
        latents, if any, checked against the size. A job prepared already is only checked.

        A job with an init image runs at the image's size, with the strength's default (0.8 for image to image, 1.0
        for inpainting) and the steps it leaves checked; an inpainting UNet (9 input channels) needs a masked one.
        """
        job = job if isinstance(job, Job) else Job(job)
        init = job.init_image
        if self.input_channels == INPAINTING_CHANNELS and (init is None or not init.inpainting):
            raise SdcliError(f"{self.checkpoint.path} is an inpainting model (its UNet reads 9 channels): give it an "
                             "--init-image and a --mask")
        if init is not None and self.stages.load_image_encoder is None:
            raise SdcliError(f"{self.family.title} models cannot start from an init image")
        if job.plan is None:
            params = job.params
            if init is not None:
                params = init.sized(params).with_(strength=init.default_strength if params.strength is None
                                                  else params.strength)
            sampler = self.default_sampler if params.sampler is None else params.sampler
            if sampler not in SAMPLERS:
                raise SdcliError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
            params = params.with_(sampler=sampler,
                                  steps=default_steps(sampler) if params.steps is None else params.steps,
                                  width=self.native_size if params.width is None else params.width,
                                  height=self.native_size if params.height is None else params.height,
                                  seed=random_seed() if params.seed is None else params.seed).validate()
            plan = SAMPLERS[sampler].plan(self.scheduler_config, params.steps)  # refuses a count it cannot give
            if init is not None:
                first_step(plan.steps, params.strength)  # refuses a strength that leaves no step
            self.stages.check_memory(self.network, self.decoder, params, self.backend)
            job = replace(job, params=params, plan=plan, loras=self.job_loras(params.prompt))
        if job.initial_noise is not None:
            params = job.params
            expected = (params.batch_size, *self.family.latents.shape(params.width, params.height))
            if job.initial_noise.shape != expected:
                raise SdcliError(f"initial latents must have shape {expected} for {params.batch_size} image(s) of "
                                 f"{params.width}x{params.height}, got {tuple(job.initial_noise.shape)}")
        return job

    def job_loras(self, prompt: str) -> tuple[tuple[Lora, float, float], ...]:
        """The pipeline's LoRAs and those the ``<lora:name:weight>`` tags of ``prompt`` name (found in
        ``lora_dir``), each with its text-encoder and UNet weight, checked against the networks: a one-line
        LoraError for an unknown name, a bad file or a LoRA for another model."""
        tagged = tuple(prompt_loras(prompt, self.lora_dir))
        loras = self.loras + tagged
        if tagged:  # their layers must name weights of this model (the pipeline's own were checked at load)
            self._switch(self.network).touched(unet_set(loras))
            if self.prompt_encoder is not None:
                self._switch(self.prompt_encoder.text_encoder).touched(text_encoder_set(loras))
        return loras

    def _switch(self, network):
        switch = getattr(network, "lora_switch", None)
        if switch is None:
            raise SdcliError(f"the {self.family.title} networks take no LoRA")
        return switch

    def activate_loras(self, job: Job) -> None:
        """Merge the LoRA set of ``job`` into the networks (see :class:`~sdcli.io.lora_switch.LoraSwitch`: only
        the weights either set touches change; no LoRA gives the base weights back exactly)."""
        for network, loras in ((self.network, job.unet_loras),
                               (self.prompt_encoder.text_encoder if self.prompt_encoder else None,
                                job.text_encoder_loras)):
            if network is not None and (loras or getattr(network, "lora_switch", None) is not None):
                self._switch(network).activate(loras)

    def conditioning(self, text: str, clip_skip: int = 1, loras: Sequence[tuple[Lora, float]] = ()) -> np.ndarray:
        """(1, S, D) conditioning of one text (a prompt without its ``<lora:...>`` tags) by the text encoder with
        the LoRA set ``loras`` (active already): encoded ahead by ``encode_prompts``, else encoded now."""
        encoded = self._encoded.get((text, clip_skip, set_key(loras)))
        if encoded is not None:
            return encoded
        if self.prompt_encoder is None:
            raise SdcliError(f"the text encoder was released to save memory and the prompt {text!r} was not "
                             "encoded ahead")
        return self.prompt_encoder.encode([text], clip_skip=clip_skip)  # (1, S, D)

    def encode_prompts(self, jobs: Iterable[Job | GenerateParams]) -> None:
        """Encode and keep the prompt of every job (and its negative prompt where guidance uses one), each
        distinct (text, clip_skip) once, so that ``release_text_encoder`` can follow."""
        for job in jobs:
            job = self.prepare(job if isinstance(job, Job) else Job(job))
            params, loras = job.params, job.text_encoder_loras
            texts = [split_lora_tags(params.prompt)[0]] + ([params.negative_prompt] if params.guidance_scale > 1
                                                           else [])
            for text in texts:
                key = (text, params.clip_skip, set_key(loras))
                if key not in self._encoded:
                    self.activate_loras(job)
                    self._encoded[key] = self.conditioning(text, params.clip_skip, loras)
            lengths = {self._encoded[text, params.clip_skip, set_key(loras)].shape[1] for text in texts}
            padding = ("", params.clip_skip, set_key(loras))  # what match_lengths pads with
            if len(lengths) > 1 and padding not in self._encoded:
                self.activate_loras(job)
                self._encoded[padding] = self.conditioning("", params.clip_skip, loras)

    def release_text_encoder(self) -> None:
        """Drop the tokenizer and text encoder; only prompts kept by ``encode_prompts`` can be generated after."""
        if self.prompt_encoder is not None:
            log.info("released the text encoder (%d prompts encoded ahead)", len(self._encoded))
            self.prompt_encoder.release()  # the file stays mapped (the checkpoint keeps it): drop its pages
        self.prompt_encoder = None
        return_freed_memory()  # what its layers had prepared

    def leave_stage(self, component: str, network) -> None:
        """Let the weights of the checkpoint's ``component`` and its ``network`` leave resident memory (see
        :func:`leave_stage`)."""
        leave_stage(self.checkpoint, self.stages, component, network)

    def image_encoder(self):
        """The model's VAE encoder (loaded at the first use)."""
        if self._image_encoder is None:
            self._image_encoder = self.stages.load_image_encoder(self.checkpoint, get_ops(self.backend),
                                                                 self.precision)
        return self._image_encoder

    def encode_image(self, init: InitImage, masked: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The VAE posterior (mean, logvar), each (1, C, h, w), of ``init``'s image (``masked``: with the region to
        repaint blacked out), encoded once and kept while runs start from the same init image."""
        key = (init, masked)
        if key not in self._image_encodings:
            if not any(kept is init for kept, _ in self._image_encodings):
                self._image_encodings.clear()  # another init image: the last one's encodings go
            encoder = self.image_encoder()
            pixels = init.masked_pixels() if masked else init.pixels  # (3, H, W)
            ops = encoder.ops
            mean, logvar = encoder.distribution(ops.from_host(pixels[None]))  # (1, C, h, w) each
            self._image_encodings[key] = (ops.to_host(mean), ops.to_host(logvar))
        return self._image_encodings[key]

    def preview_decoder(self):
        if self._preview_decoder is None:
            self._preview_decoder = self.stages.load_preview_decoder(get_ops(self.backend))
        return self._preview_decoder

    def run(self, job: Job | GenerateParams, initial_noise: np.ndarray | None = None,
            preview_every: int = 0, init_image: InitImage | None = None) -> Iterator[StepRecord | GeneratedBatch]:
        """Generate the ``batch_size`` images of ``job``: yield a StepRecord per step, then the GeneratedBatch.

        ``job`` is a Job (prepared by :meth:`prepare` or not) or plain GenerateParams. ``initial_noise``
        (B, C, H/f, W/f), also a Job's own, replaces the seeded unit-variance starting noise; it is scaled by the
        sampler exactly as diffusers scales its ``latents=`` argument. ``preview_every`` > 0 decodes the current
        x0 estimate with the preview decoder every that many steps (and at the last).

        ``init_image`` (also a Job's own): the run starts from it (see :mod:`sdcli.pipelines.image_to_image`);
        ``initial_noise`` is then the unit noise added to the image's latents.
        """
        job = job if isinstance(job, Job) else Job(job)
        if initial_noise is not None:
            job = replace(job, initial_noise=initial_noise)
        if init_image is not None:
            job = replace(job, init_image=init_image)
        job = self.prepare(job)
        params, plan = job.params, job.plan
        batch = params.batch_size
        seeds = job.seeds
        noise = BatchNoise(seeds, self.family.latents.shape(params.width, params.height))
        seeded_noise = noise.draw()  # drawn either way, so a stochastic sampler's later draws follow the seed alone
        initial_noise = seeded_noise if job.initial_noise is None else job.initial_noise
        timings: dict[str, float] = {}

        start = time.perf_counter()
        self.activate_loras(job)
        # One row per prompt repeated over the batch, as diffusers' num_images_per_prompt does.
        loras = job.text_encoder_loras
        text, _ = split_lora_tags(params.prompt)  # the tags are the job's LoRAs, not words
        context = np.repeat(self.conditioning(text, params.clip_skip, loras), batch, axis=0)  # (B, S, D)
        uncond_context = None
        if params.guidance_scale > 1:
            uncond_context = np.repeat(self.conditioning(params.negative_prompt, params.clip_skip, loras), batch,
                                       axis=0)  # (B, S', D)
            if uncond_context.shape[1] != context.shape[1]:  # prompts of different chunk counts: as the webui
                context, uncond_context = match_lengths(
                    context, uncond_context, self.conditioning("", params.clip_skip, loras))  # (B, S, D) both
        timings["text_encoding_s"] = time.perf_counter() - start
        # Each stage's weights leave resident memory when the next stage starts, so that the peak is the largest
        # stage's, not the sum of all three (see leave_stage).
        self.leave_stage(self.stages.text_component,
                         self.prompt_encoder.text_encoder if self.prompt_encoder else None)

        spec = SAMPLERS[params.sampler]
        conditioned = on_host(self.network, (0, 2))
        after_step = None
        if job.init_image is not None:
            began = time.perf_counter()
            image_start = start_from_image(job.init_image, plan, params.strength,
                                           np.asarray(initial_noise, dtype=np.float32), self.encode_image, noise.draw,
                                           encode_mode=params.encode_mode,
                                           scaling_factor=self.image_encoder().scaling_factor,
                                           downscale=self.family.latents.downscale, in_channels=self.input_channels)
            timings["image_encoding_s"] = time.perf_counter() - began
            self.leave_stage(self.stages.decoder_component, self._image_encoder)
            plan, x, after_step = image_start.plan, image_start.x, image_start.blend
            if image_start.mask_channels is not None:
                conditioned = with_mask_channels(conditioned, image_start.mask_channels)
        else:
            x = np.asarray(initial_noise, dtype=np.float32) * np.float32(plan.init_noise_sigma)
        network = guided_network(conditioned, context, uncond_context, params.guidance_scale,
                                 params.guidance_rescale)
        denoiser = Denoiser(network, plan.alphas_cumprod, plan.prediction_type, plan.timestep_map())
        if spec.wraps_denoiser is not None:
            denoiser = spec.wraps_denoiser(denoiser, plan)
        options = dict(plan.sampler_options)
        if params.eta and "eta" in spec.options:
            options["eta"] = params.eta

        start = time.perf_counter()
        total = len(plan.sigmas) - 1
        with reuse_large_arrays(self.reuse_memory):  # the network's activations come back at every step
            steps = spec.sample(denoiser, x, plan.sigmas, noise_sampler=noise, **options)
            for step in steps_with(steps, after_step):  # x: (B, C, h, w)
                x = step.x
                preview = None
                if preview_every and ((step.index + 1) % preview_every == 0 or step.index + 1 == total):
                    preview = on_host(self.preview_decoder())(step.denoised)
                yield StepRecord(step.index, total, float(step.sigma), x, preview, time.perf_counter() - start)
        timings["denoising_s"] = time.perf_counter() - start
        timings["steps"] = total
        timings["s_per_step"] = timings["denoising_s"] / max(total, 1)

        latents = (x * np.float32(plan.final_scale)).astype(np.float32)  # (B, C, h, w) what diffusers decodes
        self.leave_stage(self.stages.denoiser_component, self.network)
        start = time.perf_counter()
        images = on_host(self.decoder)(latents)  # (B, 3, H, W)
        if job.init_image is not None:
            images = job.init_image.overlay(images)  # padding_mask_crop: back into the original image
        timings["decode_s"] = time.perf_counter() - start
        self.leave_stage(self.stages.decoder_component, self.decoder)
        yield GeneratedBatch(images, latents, seeds, params, timings)


def image_stages(checkpoint: Checkpoint) -> ImageStages:
    """What text to image runs for ``checkpoint``'s family; a one-line error for a family that makes videos."""
    stages = checkpoint.model_family.image
    if stages is None:
        raise SdcliError(f"{checkpoint.path} is a {checkpoint.model_family.title} video model, which makes no "
                         f"images: make videos with 'sdcli video --model {checkpoint.path}'")
    return stages


def load_prompt_encoder(model: str | Checkpoint, precision: str = "fp32", backend: str = "cpu",
                        embeddings: Sequence[TextualInversion | str | Path] = (), **loras):
    """Open ``model`` (a path, preset, repo id or an opened checkpoint) and load its tokenizer and text encoder:
    ``encoder.encode(prompts)`` gives the conditioning (B, S, D) the denoiser is guided by. ``embeddings``:
    textual-inversion embeddings (read by :func:`~sdcli.io.embeddings.read_embeddings`, or paths of their files)
    that prompts may call by name, as diffusers' ``load_textual_inversion`` adds them. ``loras=``: (LoRA, scale)
    pairs whose text-encoder layers are merged."""
    start = time.perf_counter()
    checkpoint = model if isinstance(model, Checkpoint) else open_checkpoint(model)
    embedding_option = {"embeddings": embeddings} if embeddings else {}  # only when asked for, as loras below
    encoder = image_stages(checkpoint).load_prompt_encoder(checkpoint, get_ops(backend), precision,
                                                           **embedding_option, **loras)
    encoder.timings["load_s"] = time.perf_counter() - start
    log.info("loaded the %s text encoder from %s in %.2f s", checkpoint.family, checkpoint.path,
             encoder.timings["load_s"])
    return encoder


def load_pipeline(model: str | Checkpoint, precision: str = "fp32", backend: str = "cpu",
                  vae: str = "full", vae_tiling: bool = False, low_memory: bool = False,
                  loras: Sequence[LoraSpec] = (), lora_dir: str | Path | None = None,
                  embeddings: Sequence[TextualInversion | str | Path] = ()) -> TextToImage:
    """Open ``model`` and load everything text-to-image needs, as its family says: tokenizer and text encoder,
    denoising network, image decoder (``vae="taesd"``: the shipped tiny autoencoder instead of the model's VAE)
    and the scheduler config.

    ``vae_tiling``: the full VAE decodes large images in overlapping tiles, as diffusers' ``enable_tiling()``
    (TAESD always decodes whole). ``low_memory`` turns tiling on and streams the denoiser's and decoder's weights
    (their mapped pages leave resident memory after each layer's use), and the sampling loop hands large freed
    arrays back at once rather than keeping them for the next step (:func:`sdcli.memory.reuse_large_arrays`); the
    caller then encodes its prompts ahead and releases the text encoder (see :class:`TextToImage`).

    ``loras``: ``(LoRA, scale)`` pairs (a :class:`~sdcli.io.lora.Lora` or the path of its file) merged into the
    text encoder's and the denoiser's weights for every job, as diffusers' ``load_lora_weights`` and
    ``fuse_lora(lora_scale=scale)`` do. A prompt's ``<lora:name:weight>`` tags add the LoRAs ``lora_dir``
    (default ``<weights>/loras``) holds under those names, for its job only.

    ``embeddings``: textual-inversion embeddings (:class:`~sdcli.io.embeddings.TextualInversion` or the path of
    its file) that prompts and negative prompts call by name; one whose width does not fit the text encoder is
    refused before any network loads.
    """
    if vae not in VAE_CHOICES:
        raise SdcliError(f"unknown VAE {vae!r}; choose one of: {', '.join(VAE_CHOICES)}")
    start = time.perf_counter()
    checkpoint = model if isinstance(model, Checkpoint) else open_checkpoint(model)
    ops = get_ops(backend)
    stages = image_stages(checkpoint)
    embedding_option = {"embeddings": embeddings} if embeddings else {}  # only when asked for, as loras below
    loras = tuple((lora, scale, scale) for lora, scale in read_loras(loras))
    text_encoder_loras, unet_loras = text_encoder_set(loras), unet_set(loras)
    # only when asked for: the stages of every family take them
    te_option = {"loras": text_encoder_loras} if text_encoder_loras else {}
    prompt_encoder = load_prompt_encoder(checkpoint, precision=precision, backend=backend, **embedding_option,
                                         **te_option)
    lora_option = {"loras": unet_loras} if unet_loras else {}
    network = stages.load_denoiser(checkpoint, ops, precision, stream=low_memory, **lora_option)
    decoder = stages.load_decoder(checkpoint, ops, precision, vae=vae, tiling=vae_tiling or low_memory,
                                  stream=low_memory)
    pipeline = TextToImage(checkpoint, prompt_encoder, network, decoder, stages.scheduler_config(checkpoint),
                           backend, precision, vae, reuse_memory=not low_memory, loras=loras,
                           lora_dir=lora_dir)
    pipeline.timings["load_s"] = time.perf_counter() - start
    log.info("loaded %s (%s, %s) in %.2f s", checkpoint.path, checkpoint.family, checkpoint.prediction_type,
             pipeline.timings["load_s"])
    return pipeline


def default_lora_dir() -> Path:
    """Where ``<lora:name>`` tags and ``--lora NAME`` look: ``loras`` in the weights folder (``./weights/loras``
    unless ``$SDCLI_WEIGHTS`` says otherwise)."""
    return weights_dir() / "loras"


def default_steps(sampler: str) -> int:
    """The step count a sampler runs when none is asked for: 50, or its own (LCM: 4)."""
    return SAMPLERS[sampler].default_steps or DEFAULT_STEPS


def generate_image(pipeline: TextToImage, params: Job | GenerateParams,
                   initial_noise: np.ndarray | None = None, init_image: InitImage | None = None) -> GeneratedBatch:
    """Run ``pipeline`` on ``params`` (or a planned Job) to the end and return the batch (the library call without
    progress reporting); ``init_image`` (:func:`sdcli.load_init_image`): image to image or inpainting from it."""
    for record in pipeline.run(params, initial_noise=initial_noise, init_image=init_image):
        if isinstance(record, GeneratedBatch):
            return record
    raise AssertionError("the pipeline ended without a result")


__all__ = ["GeneratedBatch", "Job", "RunPlan", "StepRecord", "TextToImage", "check_latents", "default_lora_dir",
           "default_steps",
           "generate_image", "load_pipeline", "load_prompt_encoder", "plan_run", "read_latents", "size_from_latents"]
