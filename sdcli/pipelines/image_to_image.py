"""Image to image and inpainting: where the denoising loop starts from an image instead of pure noise.

As diffusers' ``StableDiffusionImg2ImgPipeline`` and ``StableDiffusionInpaintPipeline`` (0.42) do it, in the VE
form the samplers use (x = x0 + sigma eps):

    init image (3, H, W) --VAE encoder--> posterior mean, log-variance --mean or seeded sample, x scaling--> x0
    strength --> the plan's last int(N * strength) steps (``get_timesteps``) --> x = x0 + sigma_start * noise

diffusers' ``scheduler.add_noise(x0, noise, t)`` at the first remaining timestep is sqrt(alpha_bar) x0 +
sqrt(1 - alpha_bar) noise for the VP schedulers and x0 + sigma noise for the VE ones (Euler, Heun): in VE form both
are x0 + sigma_start * noise. The remaining steps are the sampler's own from there (``SamplerPlan.from_step``).

Inpainting (a mask, white = repaint) adds, per kind of network:

- an inpainting UNet (9 input channels) reads, beside the latents, the mask at latent size and the latents of the
  image with the masked region blacked out (``masked image = image * (mask < 0.5)``): its input is cat([x_in, mask,
  masked-image latents]) (``with_mask_channels``); at strength 1 the start is pure noise times the plan's
  ``init_noise_sigma``, as diffusers' ``is_strength_max`` start;
- any other UNet (4 channels) gets, after every step, the known region put back: the image latents noised to the
  step's end, x0 + sigma_next * noise (clean x0 after the last step), where the mask is 0 (``KnownRegionBlend``).

Noise: one unit-variance draw per image from the image's seed for the start (the same draw text to image starts
from), then one for the image's posterior sample and one for the masked image's, where they are sampled.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import SdcliError
from ..io import media
from ..params import SIZE_MULTIPLE, GenerateParams
from ..sampling.plans import SamplerPlan

log = logging.getLogger("sdcli")

# diffusers' defaults of ``strength``: StableDiffusionImg2ImgPipeline 0.8, StableDiffusionInpaintPipeline 1.0.
IMG2IMG_STRENGTH = 0.8
INPAINT_STRENGTH = 1.0
# How an image becomes latents, as diffusers' ``retrieve_latents``' sample_mode: "sample" (its default) draws from
# the posterior with the image's seeded noise; "mean" takes the posterior mean (diffusers' "argmax").
ENCODE_MODES = ("sample", "mean")
INPAINTING_CHANNELS = 9  # latents 4 + mask 1 + masked-image latents 4


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: the pipeline keeps its encodings per image
class InitImage:
    """The image a run starts from, and for inpainting its mask, read and resized to the run's size.

    - ``pixels`` (3, H, W) float32 in [-1, 1], what the VAE encoder reads;
    - ``mask`` (1, H, W) float32 of 0 and 1 (1: repaint), or None for image to image;
    - ``name``, ``sha256``, ``mask_name``, ``mask_sha256``: the files it came from, for the images' records;
    - ``mask_blur``, ``crop``: the blur radius the mask got and, with ``padding_mask_crop``, the box (x1, y1, x2,
      y2) of the original image that was inpainted, which ``overlay`` puts back into ``original`` (H0, W0, 3)
      uint8 through ``overlay_mask`` (H0, W0) uint8.
    """

    pixels: np.ndarray
    name: str
    sha256: str
    mask: np.ndarray | None = None
    mask_name: str | None = None
    mask_sha256: str | None = None
    mask_blur: float = 0
    padding_mask_crop: int | None = None
    crop: tuple[int, int, int, int] | None = None
    original: np.ndarray | None = None
    overlay_mask: np.ndarray | None = None

    @property
    def width(self) -> int:
        return int(self.pixels.shape[2])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def inpainting(self) -> bool:
        return self.mask is not None

    @property
    def default_strength(self) -> float:
        return INPAINT_STRENGTH if self.inpainting else IMG2IMG_STRENGTH

    def sized(self, params: GenerateParams) -> GenerateParams:
        """``params`` at this image's size; a one-line error where they ask for another width or height."""
        for name, given, size in (("width", params.width, self.width), ("height", params.height, self.height)):
            if given is not None and given != size:
                raise SdcliError(f"--{name} {given} does not match the init image, read at {size}")
        return params.with_(width=self.width, height=self.height)

    def latent_mask(self, downscale: int) -> np.ndarray:
        """(1, 1, H/f, W/f): the mask at latent size, every f-th pixel from the first, as diffusers' nearest
        ``interpolate`` to the latent size picks them."""
        return self.mask[None, :, ::downscale, ::downscale]

    def masked_pixels(self) -> np.ndarray:
        """(3, H, W): the image with the region to repaint black (0 in [-1, 1]), diffusers' ``image * (mask <
        0.5)``."""
        return self.pixels * (self.mask < 0.5)

    def record(self) -> dict:
        """What an image's metadata says of its inputs: file names and content hashes."""
        record = {"init_image": self.name, "init_image_sha256": self.sha256}
        if self.inpainting:
            record.update(mask=self.mask_name, mask_sha256=self.mask_sha256)
            if self.mask_blur:
                record["mask_blur"] = self.mask_blur
            if self.padding_mask_crop is not None:
                record["padding_mask_crop"] = self.padding_mask_crop
        return record

    def overlay(self, images: np.ndarray) -> np.ndarray:
        """Decoded images (B, 3, h, w) in [-1, 1] as the images of the run: with ``padding_mask_crop``, each put
        back into the original image as 8-bit pixels (``media.overlay_inpainted``), (B, 3, H0, W0) at exact
        8-bit levels; otherwise as they are."""
        if self.crop is None:
            return images
        pixels = media.images_to_uint8(images)  # (B, h, w, 3)
        composed = np.stack([media.overlay_inpainted(self.original, self.overlay_mask, image, self.crop)
                             for image in pixels])  # (B, H0, W0, 3)
        unit = composed.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)
        return np.float32(2) * unit - np.float32(1)  # images_to_uint8 gives these levels back


def _sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(Path(path).expanduser(), "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_init_image(image: str | Path, mask: str | Path | None = None, *, width: int | None = None,
                    height: int | None = None, resize: bool = True, mask_blur: float = 0,
                    padding_mask_crop: int | None = None) -> InitImage:
    """Read an init image (and a mask: white repaints, black keeps) for a run of ``width`` x ``height``.

    The size defaults to the image's own, rounded down to a multiple of 8, as diffusers' ``VaeImageProcessor``
    sizes it. An image of another size is resized (Lanczos, with a notice), or refused with ``resize=False``; so
    is a mask of another size than the image. ``mask_blur``: a Gaussian blur of that radius on the mask first
    (diffusers' ``mask_processor.blur``). ``padding_mask_crop``: only the box around the mask's white pixels, grown
    by that many pixels and to the run's aspect ratio, is inpainted at the run's size and put back into the
    original image, which keeps its size (diffusers' ``padding_mask_crop``). Bad files are one-line errors.
    """
    if mask is None and (mask_blur or padding_mask_crop is not None):
        raise SdcliError("--mask-blur and --padding-mask-crop need a --mask")
    if mask_blur < 0:
        raise SdcliError(f"--mask-blur must not be negative, got {mask_blur}")
    if padding_mask_crop is not None and padding_mask_crop < 0:
        raise SdcliError(f"--padding-mask-crop must not be negative, got {padding_mask_crop}")
    GenerateParams(prompt="", width=width, height=height).validate()  # a size given: checked before any resize
    image_width, image_height = media.image_size(image, "--init-image")
    mask_pixels = None
    if mask is not None:
        mask_pixels = media.read_mask_image(mask, mask_blur)  # (H, W) uint8
        if mask_pixels.shape != (image_height, image_width) and not resize:
            raise SdcliError(f"--mask {mask} is {mask_pixels.shape[1]}x{mask_pixels.shape[0]}, not the "
                             f"{image_width}x{image_height} of the init image (leave out --no-resize to resize it)")
    width = image_width - image_width % SIZE_MULTIPLE if width is None else width
    height = image_height - image_height % SIZE_MULTIPLE if height is None else height
    if width < SIZE_MULTIPLE or height < SIZE_MULTIPLE:
        raise SdcliError(f"--init-image {image} is {image_width}x{image_height}: too small for a run of at least "
                         f"{SIZE_MULTIPLE}x{SIZE_MULTIPLE}")
    crop = original = overlay_mask = None
    if padding_mask_crop is not None:
        if mask_pixels.shape != (image_height, image_width):  # the box is found on the mask, cut from the image
            mask_pixels = media.resized_mask(mask_pixels, image_width, image_height)
        crop = media.mask_crop_region(mask_pixels, width, height, padding_mask_crop)
        original = media.read_original_image(image)
        overlay_mask = mask_pixels
    pixels = media.read_init_image(image, width, height, resize=resize, crop=crop)
    return InitImage(pixels=pixels, name=Path(image).name, sha256=_sha256(image),
                     mask=media.prepare_mask(mask_pixels, width, height, crop) if mask is not None else None,
                     mask_name=Path(mask).name if mask is not None else None,
                     mask_sha256=_sha256(mask) if mask is not None else None, mask_blur=mask_blur,
                     padding_mask_crop=padding_mask_crop, crop=crop, original=original, overlay_mask=overlay_mask)


def first_step(steps: int, strength: float) -> int:
    """The index of the first of ``steps`` steps an image-to-image run makes: it makes the last int(steps *
    strength) of them, as diffusers' ``get_timesteps`` counts them; a one-line error when that is none (diffusers
    raises too)."""
    if not 0 < strength <= 1:
        raise SdcliError(f"strength must lie in (0, 1], got {strength}")
    kept = min(int(steps * strength), steps)
    if kept < 1:
        raise SdcliError(f"strength {strength:g} of {steps} steps leaves no step to run (int(steps x strength) = 0): "
                         "raise --strength or --steps")
    return steps - kept


@dataclass(frozen=True)
class ImageStart:
    """Where a run from an init image starts: the steps left (``plan``), the VE latents at their first sigma
    (``x``, (B, 4, h, w)), the extra input channels of an inpainting UNet (``mask_channels`` (B, 5, h, w): mask and
    masked-image latents) and the known-region blend of an ordinary UNet (``blend``)."""

    plan: SamplerPlan
    x: np.ndarray
    mask_channels: np.ndarray | None = None
    blend: KnownRegionBlend | None = None


class KnownRegionBlend:
    """The per-step blend of an inpainting run on an ordinary (4-channel) UNet, diffusers'
    ``latents = (1 - mask) * add_noise(image_latents, noise, next timestep) + mask * latents`` after every
    scheduler step, with the clean image latents after the last.

    In VE form, after step i the known region is x0 + sigma_next * noise; after the last step the sampler's x is
    handed on times ``plan.final_scale`` (VP latents), so there it is x0 / final_scale, which gives diffusers' clean
    x0 once scaled.
    """

    def __init__(self, plan: SamplerPlan, image_latents: np.ndarray, noise: np.ndarray, mask: np.ndarray):
        self.sigmas = plan.sigmas
        self.final_scale = np.float32(plan.final_scale)
        self.image_latents, self.noise = image_latents, noise  # (B, 4, h, w) each
        self.mask = mask  # (1, 1, h, w): 1 repaints
        self.keep = np.float32(1) - mask

    def __call__(self, index: int, x: np.ndarray) -> np.ndarray:
        """x (B, 4, h, w) after step ``index``, with the known region put back."""
        if index + 1 < len(self.sigmas) - 1:
            known = self.image_latents + np.float32(self.sigmas[index + 1]) * self.noise
        else:
            known = self.image_latents / self.final_scale
        return self.keep * known + self.mask * x


def with_mask_channels(network: Callable, mask_channels: np.ndarray) -> Callable:
    """An inpainting UNet ``network(x_in (N, 9, h, w), timesteps, context)`` as a network of the latents alone:
    cat([x_in, mask, masked-image latents]) along the channels, the mask channels (B, 5, h, w) repeated over the
    N = B (or 2B, guidance's [uncond, cond]) rows, as diffusers concatenates them after ``scale_model_input``."""
    batch = mask_channels.shape[0]

    def call(x_in, timesteps, context):
        extra = np.concatenate([mask_channels] * (x_in.shape[0] // batch))  # (N, 5, h, w)
        return network(np.concatenate([x_in, extra], axis=1), timesteps, context)  # (N, 9, h, w) in

    return call


def image_latents(distribution: tuple[np.ndarray, np.ndarray], scaling_factor: float,
                  noise: np.ndarray | None) -> np.ndarray:
    """UNet-space latents (B, 4, h, w) from one image's posterior (mean, logvar), each (1, 4, h, w): the mean, or
    with unit ``noise`` (B, 4, h, w) the samples mean + exp(logvar / 2) * noise (diffusers'
    ``DiagonalGaussianDistribution.sample``), times the VAE's ``scaling_factor``."""
    mean, logvar = distribution
    if noise is None:
        latents = mean  # (1, 4, h, w)
    else:
        latents = mean + np.exp(np.float32(0.5) * logvar) * noise  # (B, 4, h, w)
    return (latents * np.float32(scaling_factor)).astype(np.float32)


def start_from_image(init: InitImage, plan: SamplerPlan, strength: float, noise: np.ndarray,
                     encode: Callable[[InitImage, bool], tuple[np.ndarray, np.ndarray]],
                     draw: Callable[[], np.ndarray], *, encode_mode: str, scaling_factor: float, downscale: int,
                     in_channels: int) -> ImageStart:
    """The start of a run of ``plan`` from ``init`` at ``strength``, with the unit start ``noise`` (B, 4, h, w).

    ``encode(init, masked)`` gives the posterior (mean, logvar) of the image (or of the masked image); ``draw()``
    the next unit-variance noise of every image (B, 4, h, w), drawn for each posterior sampled
    (``encode_mode`` "sample"). ``in_channels``: the UNet's (4, or 9 for an inpainting UNet).
    """
    if encode_mode not in ENCODE_MODES:
        raise SdcliError(f"unknown encode mode {encode_mode!r}; choose one of: {', '.join(ENCODE_MODES)}")
    batch = noise.shape[0]

    def latents_of(masked: bool) -> np.ndarray:
        latents = image_latents(encode(init, masked), scaling_factor, draw() if encode_mode == "sample" else None)
        return np.broadcast_to(latents, noise.shape).astype(np.float32)  # the mean: one row for every image

    plan = plan.from_step(first_step(plan.steps, strength))
    inpainting_unet = in_channels == INPAINTING_CHANNELS
    pure_noise = init.inpainting and strength == 1.0  # diffusers' is_strength_max start of inpainting
    x0 = None if pure_noise and inpainting_unet else latents_of(masked=False)
    if pure_noise:
        x = noise * np.float32(plan.init_noise_sigma)
    else:
        x = x0 + np.float32(plan.sigmas[0]) * noise
    if not init.inpainting:
        return ImageStart(plan, x.astype(np.float32))
    mask = init.latent_mask(downscale)  # (1, 1, h, w)
    if inpainting_unet:
        channels = np.concatenate([np.repeat(mask, batch, axis=0), latents_of(masked=True)], axis=1)  # (B, 5, h, w)
        return ImageStart(plan, x.astype(np.float32), mask_channels=channels)
    return ImageStart(plan, x.astype(np.float32), blend=KnownRegionBlend(plan, x0, noise, mask))


__all__ = ["ENCODE_MODES", "IMG2IMG_STRENGTH", "INPAINT_STRENGTH", "ImageStart", "InitImage", "KnownRegionBlend",
           "first_step", "image_latents", "load_init_image", "start_from_image", "with_mask_channels"]
