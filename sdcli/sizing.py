"""Whether an image size fits in memory: an estimate of a run's peak, checked before denoising starts.

Each stage holds its own weights only (the pipeline lets a stage's prepared weights go when the next starts), so
the peak is the larger of the UNet's and the image decoder's weights plus activations. The weights count what
preparing them will add to resident memory (``nn.layers.unprepared_bytes``: a prepared copy of every weight
mapped from the file, nothing for weights converted at load, which are resident and out of the memory available
already, one layer widened to float32 when streamed). The activations are the float32 tensors alive at the
peak of each stage, from the model's configs:

- UNet, per latent pixel of every image it sees at once (the batch, twice with classifier-free guidance): the
  skip connections kept for the up path (``layers_per_block + 1`` tensors per level, a quarter of the pixels
  per level down) and about six working tensors of the first level's width. The numpy backend's attention also
  holds the (tokens x tokens) scores of every head at the first level, three times over (scores, exponentials,
  weights).
- Image decoder, per output pixel of one image (images decode one at a time): the last two levels run at full
  resolution, the widest tensor there being the upsampled second level plus three of the first level's width
  (SD 1.5: 256 + 3 x 128 channels, 2.5 kB per pixel). With tiling, the pixels of one tile; the decoded images of
  the batch (3 channels) are held in either case. TAESD: three tensors of 64 channels.

Measured on SD 1.5's configs with random weights (cpu backend, peak resident memory above the prepared weights,
against the estimate): UNet at batch 2 (guided, one image) 446 MiB at 128x128 latents against 458, 341 at
96x96 against 257, 152 at 64x64 against 114 (at small sizes freed tensors below glibc's mmap threshold stay
in the heap: a few tens of MiB the estimate leaves to ``USABLE_SHARE``); VAE decoder 1459 MiB at 768x768
against 1454, 673 at 512x512 against 646, 186 at 256x256 against 162, tiled at 1024x1024 694 against 664. A whole
run (``generate_image``, 512x512, two steps) from a random fp16 checkpoint: 1820 MiB above the loaded pipeline
against 1753 estimated, 1639 of them the UNet's weights (fp16, prepared from the mapped file); in fp32, the
weights converted at load, 705 against 646.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import UNetConfig, VAEConfig
from .errors import SdcliError

FLOAT = 4  # bytes: activations are float32 whatever the weights' precision
UNET_WORKING_TENSORS = 6
TAESD_CHANNELS = 64
NATIVE_LATENT_SCALE = 8
USABLE_SHARE = 0.9  # of the memory available: leave room for the allocator's slack and the rest of the system


@dataclass(frozen=True)
class ImageDecoderShape:
    """What the estimate needs of the image decoder: its widths (None: TAESD), its tile side and whether it
    decodes in tiles."""

    block_out_channels: tuple[int, ...] | None
    tile_pixels: int = 0
    tiling: bool = False

    @classmethod
    def of_vae(cls, config: VAEConfig, tiling: bool) -> "ImageDecoderShape":
        return cls(tuple(config.block_out_channels), config.sample_size, tiling)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of each stage: its activations (``unet_bytes``, ``decoder_bytes``) and the weights it will add."""

    unet_bytes: int
    decoder_bytes: int
    unet_weight_bytes: int = 0
    decoder_weight_bytes: int = 0

    @property
    def unet_peak_bytes(self) -> int:
        return self.unet_weight_bytes + self.unet_bytes

    @property
    def decoder_peak_bytes(self) -> int:
        return self.decoder_weight_bytes + self.decoder_bytes

    @property
    def peak_bytes(self) -> int:
        return max(self.unet_peak_bytes, self.decoder_peak_bytes)


def estimate_memory(unet: UNetConfig, decoder: ImageDecoderShape, width: int, height: int, batch: int,
                         guided: bool, backend: str, weights: tuple[int, int] = (0, 0)) -> MemoryEstimate:
    """The memory of one batch of ``batch`` images of ``width`` x ``height`` pixels: each stage's activations,
    and the bytes its weights add (``weights``: the UNet's and the decoder's, see the module docstring)."""
    h, w = height // NATIVE_LATENT_SCALE, width // NATIVE_LATENT_SCALE
    images = batch * (2 if guided else 1)
    channels = unet.block_out_channels
    skip_floats = sum((unet.layers_per_block + 1) * width_ / 4 ** level for level, width_ in enumerate(channels))
    per_latent_pixel = (skip_floats + UNET_WORKING_TENSORS * channels[0]) * FLOAT
    unet_bytes = images * h * w * per_latent_pixel
    if backend == "numpy":
        tokens = h * w
        unet_bytes += 3 * images * unet.num_attention_heads[0] * tokens * tokens * FLOAT
    if decoder.block_out_channels is None:
        per_pixel = 3 * TAESD_CHANNELS * FLOAT
    else:
        widths = decoder.block_out_channels
        per_pixel = (widths[min(1, len(widths) - 1)] + 3 * widths[0]) * FLOAT
    decoded_pixels = width * height if not decoder.tiling else min(width * height, decoder.tile_pixels ** 2)
    decoder_bytes = decoded_pixels * per_pixel + batch * 3 * width * height * FLOAT * 2  # + images, blend weights
    if backend == "numpy" and decoder.block_out_channels is not None:
        tokens = math.ceil(decoded_pixels / NATIVE_LATENT_SCALE ** 2)  # the mid block's single-head attention
        decoder_bytes += 3 * tokens * tokens * FLOAT
    return MemoryEstimate(int(unet_bytes), int(decoder_bytes), *weights)


def available_memory() -> int | None:
    """Bytes the system can still give this process without swapping (Linux's MemAvailable), or None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def gigabytes(nbytes: float) -> str:
    """A size for a message: GB with one decimal, or MB below 1 GB."""
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.0f} MB"


def largest_square(fits, limit: int) -> int | None:
    """The largest side (a multiple of 64, at most ``limit``) for which ``fits(side)`` holds, or None."""
    low, high = 0, limit // 64
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle * 64):
            low = middle
        else:
            high = middle - 1
    return low * 64 or None


def check_fits(unet: UNetConfig, decoder: ImageDecoderShape, width: int, height: int, batch: int, guided: bool,
               backend: str, limit: int, available: int | None = None,
               weights: tuple[int, int] = (0, 0)) -> MemoryEstimate:
    """The estimate for this size, after checking it fits the memory available; else a one-line SdcliError
    that gives the estimate, the largest square size that fits, and what --vae-tiling would make of it.
    ``weights``: the bytes the UNet's and the decoder's weights will add (``nn.layers.unprepared_bytes``)."""
    estimate = estimate_memory(unet, decoder, width, height, batch, guided, backend, weights)
    available = available_memory() if available is None else available
    if available is None:
        return estimate
    budget = available * USABLE_SHARE
    if estimate.peak_bytes <= budget:
        return estimate

    def fits(side: int, shape: ImageDecoderShape = decoder) -> bool:
        return estimate_memory(unet, shape, side, side, batch, guided, backend, weights).peak_bytes <= budget

    if estimate.unet_peak_bytes >= estimate.decoder_peak_bytes:
        stage, stage_weights, activations = "the UNet", estimate.unet_weight_bytes, estimate.unet_bytes
    else:
        stage, stage_weights, activations = "decoding the image", estimate.decoder_weight_bytes, estimate.decoder_bytes
    parts = (f" ({gigabytes(stage_weights)} weights, {gigabytes(activations)} activations)"
             if stage_weights >= 1e6 else "")
    message = (f"a batch of {batch} image(s) of {width}x{height} needs about {gigabytes(estimate.peak_bytes)} "
               f"for {stage}{parts}, and {gigabytes(available)} of memory is available")
    side = largest_square(fits, limit)
    if side:
        message += f"; the largest square size that fits is {side}x{side}"
    else:
        message += "; no size fits" + (" (--precision fp16 or bf16 halves the weights, --low-memory streams them)"
                                       if max(weights) >= 0.1 * budget else "")
    if decoder.block_out_channels is not None and not decoder.tiling:
        tiled = ImageDecoderShape(decoder.block_out_channels, decoder.tile_pixels, tiling=True)
        tiled_estimate = estimate_memory(unet, tiled, width, height, batch, guided, backend, weights)
        if tiled_estimate.peak_bytes <= budget:
            message += f" (with --vae-tiling this size needs {gigabytes(tiled_estimate.peak_bytes)} and fits)"
        else:
            tiled_side = largest_square(lambda s: fits(s, tiled), limit)
            if tiled_side and tiled_side > (side or 0):
                message += f", {tiled_side}x{tiled_side} with --vae-tiling"
    if batch > 1:
        message += "; a smaller --batch-size needs less"
    raise SdcliError(message)
