"""Images and videos out: decoder output to 8-bit pixels, PNG files and video files that carry the parameters that
made them.

The only module that imports Pillow and imageio. A PNG written here holds its generation parameters twice, as
text chunks:
``parameters`` in the AUTOMATIC1111 web UI's format (read back by the web UI's "PNG Info" tab, ComfyUI and
most image browsers) and ``sdcli`` with the full request as JSON. Latin-1 text goes into tEXt chunks, anything
else into iTXt (UTF-8), so a prompt in any script survives the round trip.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageFilter, ImageOps, PngImagePlugin, UnidentifiedImageError

from ..errors import SdcliError
from ..params import GenerateParams
from ..sampling.plans import SAMPLERS
from .files import OutputExistsError, atomic_output
from .outputs import plan_output_paths, prompt_slug, template_fields

__all__ = ["FFMPEG_CODECS", "FRAME_FIELD", "MIN_FRAME_DIGITS", "VIDEO_FORMATS", "a1111_parameters", "a1111_quote",
           "check_video_output", "frame_path", "image_size", "images_to_uint8", "imageio_ffmpeg_for",
           "is_frames_output",
           "mask_crop_region", "open_image", "overlay_inpainted", "prepare_mask", "read_init_image", "read_mask_image",
           "read_original_image", "resized_mask",
           "plan_output_paths", "plan_video_outputs", "prompt_slug", "read_png_text", "save_png", "save_video",
           "start_ffmpeg_writer", "video_output_paths"]

log = logging.getLogger("sdcli")

# PNG keywords are 1-79 Latin-1 characters without leading, trailing or doubled spaces (PNG spec 11.3.4.3).
MAX_KEYWORD_LENGTH = 79


def images_to_uint8(images: np.ndarray) -> np.ndarray:
    """Decoder output (B, 3, H, W), about [-1, 1] -> RGB pixels (B, H, W, 3) uint8.

    The arithmetic of diffusers' ``VaeImageProcessor.postprocess(output_type="pil")`` (diffusers 0.42,
    ``image_processor.py``: ``denormalize`` then ``pt_to_numpy`` then ``numpy_to_pil``), step for step in
    float32 so that every pixel is the one diffusers writes: ``x * 0.5 + 0.5``, clamped to [0, 1], times 255,
    rounded half to even (numpy's ``round``), cast to uint8. The input is taken as float32 first, as diffusers
    receives it from a float32 decoder. NaN (a decoder that overflowed, usually in float16) has no defined
    cast; it becomes 0 (black) and is logged.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected decoder output of shape (B, 3, H, W), got {images.shape}")
    images = images.astype(np.float32, copy=False)
    unit = np.clip(images * np.float32(0.5) + np.float32(0.5), np.float32(0.0), np.float32(1.0))
    not_a_number = np.isnan(unit)
    if not_a_number.any():
        log.warning("%d of %d decoded values are NaN; they are written as 0 (black)", int(not_a_number.sum()),
                    unit.size)
        unit = np.where(not_a_number, np.float32(0.0), unit)
    pixels = np.round(unit * np.float32(255.0)).astype(np.uint8)  # (B, 3, H, W)
    return np.ascontiguousarray(pixels.transpose(0, 2, 3, 1))  # (B, H, W, 3)


def a1111_quote(value: Any) -> str:
    """``value`` as the web UI writes it after "Key: ": JSON-quoted when it holds a comma, a colon or a newline
    (the web UI's ``infotext_utils.quote``), and also when it starts with a double quote, which its parser would
    otherwise strip as if it were quoting."""
    text = str(value)
    if any(mark in text for mark in (",", ":", "\n")) or text.startswith('"'):
        return json.dumps(text, ensure_ascii=False)
    return text


def sampler_label_of(sampler: str) -> str:
    """The label the AUTOMATIC1111 web UI writes after "Sampler:" (its PLMS is our pndm; the web UI since 1.9
    writes the schedule apart, "Schedule type: Karras", but still reads "DPM++ 2M Karras"); unknown names as given."""
    spec = SAMPLERS.get(sampler)
    return spec.label if spec is not None else sampler


def a1111_parameters(params: GenerateParams, *, seed: int, width: int, height: int, model: str,
                     model_hash: str | None = None, sampler_label: str | None = None,
                     extra: Mapping[str, Any] | None = None) -> str:
    """The AUTOMATIC1111 "parameters" text of one image::

        a red fox in snow
        Negative prompt: blurry, low quality
        Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 512x768, Model hash: 6ce0161689, Model: v1-5

    Fields in the order ``create_infotext`` of the web UI's ``modules/processing.py`` writes them; a field whose
    value is None is left out, as the web UI does: the negative-prompt line when empty, "Model hash" when not
    known, "Clip skip" when 1 (no skip), "Eta DDIM" unless DDIM runs with eta > 0, "CFG Rescale" (the name the
    popular CFG-rescale extension writes) when guidance rescale is 0. ``extra`` fields follow in their order, as
    the web UI's ``extra_generation_params`` do; one whose value equals its key is written bare.
    """
    fields: dict[str, Any] = {
        "Steps": params.steps,
        "Sampler": sampler_label or sampler_label_of(params.sampler),
        "CFG scale": float(params.guidance_scale),
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model hash": model_hash or None,
        "Model": model or None,
        "Clip skip": params.clip_skip if params.clip_skip > 1 else None,
        "Eta DDIM": params.eta if params.sampler == "ddim" and params.eta != 0 else None,
        "CFG Rescale": params.guidance_rescale if params.guidance_rescale != 0 else None,
        **(extra or {}),
    }
    settings = ", ".join(key if key == value else f"{key}: {a1111_quote(value)}"
                         for key, value in fields.items() if value is not None)
    negative = f"\nNegative prompt: {params.negative_prompt}" if params.negative_prompt else ""
    return f"{params.prompt}{negative}\n{settings}".strip()


def check_keyword(key: str) -> None:
    """Raise ValueError for a text-chunk keyword the PNG format does not allow."""
    if not 1 <= len(key) <= MAX_KEYWORD_LENGTH or key != key.strip() or "  " in key:
        raise ValueError(f"PNG text keyword {key!r} must be 1-{MAX_KEYWORD_LENGTH} characters without leading, "
                         "trailing or doubled spaces")
    try:
        key.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"PNG text keyword {key!r} must be Latin-1") from None


def save_png(path: str | Path, pixels: np.ndarray, text: Mapping[str, str], overwrite: bool = False) -> Path:
    """Write RGB ``pixels`` (H, W, 3) uint8 as a PNG with ``text`` as text chunks; return the path.

    Written to a temporary name beside ``path`` and renamed when complete (``files.atomic_output``): an existing
    file is refused unless ``overwrite``, and a failure leaves neither the file nor the temporary.
    """
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected RGB pixels of shape (H, W, 3) and dtype uint8, got {pixels.shape} {pixels.dtype}")
    chunks = PngImagePlugin.PngInfo()
    for key, value in text.items():
        check_keyword(key)
        try:
            value.encode("latin-1")
        except UnicodeEncodeError:
            chunks.add_itxt(key, value)
        else:
            chunks.add_text(key, value)
    image = Image.fromarray(np.ascontiguousarray(pixels))
    with atomic_output(path, overwrite) as temporary:
        image.save(temporary, format="PNG", pnginfo=chunks)
    return Path(path).expanduser()


def read_png_text(path: str | Path) -> dict[str, str]:
    """The text chunks (tEXt, zTXt, iTXt) of the PNG at ``path``, by keyword."""
    path = Path(path).expanduser()
    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                raise SdcliError(f"{path} is not a PNG image (it is {image.format})")
            image.load()  # text chunks may follow the image data
            return {str(key): str(value) for key, value in image.text.items()}
    except FileNotFoundError:
        raise SdcliError(f"{path}: no such file") from None
    except UnidentifiedImageError:
        raise SdcliError(f"{path} is not an image file") from None
    except OSError as error:
        raise SdcliError(f"cannot read {path}: {error}") from None


# -- init images and masks ---------------------------------------------------------------------------------------

# Pillow's filter for every resize of an init image or mask: diffusers' VaeImageProcessor default
# (``resample="lanczos"``).
RESIZE_FILTER = Image.Resampling.LANCZOS


def open_image(path: str | Path, label: str) -> Image.Image:
    """The image at ``path`` as Pillow reads it (PNG, JPEG, WebP, ... in any mode), turned upright by its EXIF
    orientation as diffusers' ``load_image`` does; a one-line SdcliError starting with ``label`` when it cannot be
    read. A 16-bit grayscale image (Pillow's modes I;16 and I) becomes 8-bit grayscale by value / 257, rounded,
    where Pillow's own conversion would clip it to white."""
    path = Path(path).expanduser()
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
    except FileNotFoundError:
        raise SdcliError(f"{label} {path}: no such file") from None
    except IsADirectoryError:
        raise SdcliError(f"{label} {path}: a folder, not an image file") from None
    except UnidentifiedImageError:
        raise SdcliError(f"{label} {path}: not an image file Pillow can read") from None
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise SdcliError(f"{label} {path}: cannot read it as an image: {error}") from None
    if image.mode.startswith("I;16") or (image.mode == "I" and np.asarray(image).max(initial=0) > 255):
        values = np.asarray(image, dtype=np.float64)  # (H, W) 0 .. 65535
        image = Image.fromarray(np.clip(np.round(values / 257), 0, 255).astype(np.uint8), mode="L")
    return image


def image_size(path: str | Path, label: str) -> tuple[int, int]:
    """(width, height) of the image at ``path``, upright."""
    return open_image(path, label).size


def _resized(image: Image.Image, width: int, height: int, mode: str) -> Image.Image:
    """``image`` at ``width`` x ``height`` as diffusers' ``VaeImageProcessor.resize`` makes it: "default" stretches
    it; "fill" fits it inside keeping its aspect ratio, centred, and fills the two margins by stretching its edge
    rows or columns; "crop" covers the frame keeping its aspect ratio, centred, cut at the edges."""
    if mode == "default":
        return image if image.size == (width, height) else image.resize((width, height), RESIZE_FILTER)
    target, source = width / height, image.width / image.height
    if mode == "fill":
        fitted = (width, image.height * width // image.width) if target < source else \
            (image.width * height // image.height, height)
    else:  # crop
        fitted = (width, image.height * width // image.width) if target > source else \
            (image.width * height // image.height, height)
    resized = image.resize(fitted, RESIZE_FILTER)
    frame = Image.new(image.mode, (width, height))
    left, top = width // 2 - fitted[0] // 2, height // 2 - fitted[1] // 2
    frame.paste(resized, box=(left, top))
    if mode == "fill" and target < source and top > 0:  # bands above and below: the edge rows, stretched
        frame.paste(resized.resize((width, top), box=(0, 0, width, 0)), box=(0, 0))
        frame.paste(resized.resize((width, top), box=(0, resized.height, width, resized.height)),
                    box=(0, top + fitted[1]))
    elif mode == "fill" and target > source and left > 0:  # bands left and right: the edge columns
        frame.paste(resized.resize((left, height), box=(0, 0, 0, height)), box=(0, 0))
        frame.paste(resized.resize((left, height), box=(resized.width, 0, resized.width, height)),
                    box=(left + fitted[0], 0))
    return frame


def read_init_image(path: str | Path, width: int, height: int, *, resize: bool = True,
                    crop: tuple[int, int, int, int] | None = None, label: str = "--init-image") -> np.ndarray:
    """The image at ``path`` as diffusers' ``VaeImageProcessor.preprocess`` hands it to the VAE encoder: RGB
    (``load_image``'s ``convert("RGB")``: grayscale spread to three channels, alpha dropped), cut to ``crop``
    (x1, y1, x2, y2) and fitted into ``width`` x ``height`` (see ``_resized``'s "fill") when given, else resized
    to it with Lanczos when its size differs (a notice is logged; ``resize=False`` refuses it), then scaled to
    [-1, 1]: (3, H, W) float32."""
    image = open_image(path, label).convert("RGB")
    if crop is not None:
        image = _resized(image.crop(crop), width, height, "fill")
    elif image.size != (width, height):
        if not resize:
            raise SdcliError(f"{label} {path} is {image.width}x{image.height}, not the {width}x{height} of the run "
                             "(leave out --no-resize to resize it)")
        log.warning("%s %s resized from %dx%d to %dx%d", label, Path(path).name, image.width, image.height, width,
                    height)
        image = _resized(image, width, height, "default")
    unit = np.asarray(image).astype(np.float32) / np.float32(255.0)  # (H, W, 3) in [0, 1]
    return np.ascontiguousarray((np.float32(2.0) * unit - np.float32(1.0)).transpose(2, 0, 1))  # (3, H, W)


def read_original_image(path: str | Path) -> np.ndarray:
    """The init image at ``path`` in RGB at its own size: (H, W, 3) uint8."""
    return np.asarray(open_image(path, "--init-image").convert("RGB"))


def resized_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """A grayscale mask (H, W) uint8 resized to ``width`` x ``height`` (Lanczos), not binarised."""
    return np.asarray(_resized(Image.fromarray(mask, mode="L"), width, height, "default"))


def read_mask_image(path: str | Path, blur: float = 0) -> np.ndarray:
    """The mask at ``path`` as 8-bit grayscale (H, W) uint8 (white: repaint), blurred by a Gaussian of radius
    ``blur`` as diffusers' ``VaeImageProcessor.blur`` does (Pillow's ``GaussianBlur``)."""
    image = open_image(path, "--mask").convert("L")
    if blur:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    return np.asarray(image)


def prepare_mask(mask: np.ndarray, width: int, height: int,
                 crop: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """A grayscale mask (H, W) uint8 as diffusers' inpainting ``mask_processor`` makes it: cut to ``crop`` and
    fitted ("fill"), or resized with Lanczos, to ``width`` x ``height``, scaled to [0, 1] and binarised (>= 0.5:
    1, repaint): (1, H, W) float32 of 0 and 1."""
    image = Image.fromarray(mask, mode="L")
    image = _resized(image.crop(crop), width, height, "fill") if crop is not None else \
        _resized(image, width, height, "default")
    unit = np.asarray(image).astype(np.float32) / np.float32(255.0)
    return (unit >= 0.5).astype(np.float32)[None]  # (1, H, W)


def mask_crop_region(mask: np.ndarray, width: int, height: int, pad: int) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2): the smallest box holding every nonzero pixel of ``mask`` (H, W), grown by ``pad`` on
    each side within the image, then widened or heightened about its centre (shifted back inside the image where
    it would leave it) to the aspect ratio ``width`` / ``height``, as diffusers' ``get_crop_region`` computes it
    for ``padding_mask_crop``. An empty mask gives the whole image."""
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    image_height, image_width = mask.shape
    if len(rows) == 0:
        return 0, 0, image_width, image_height
    x1, y1 = max(int(columns[0]) - pad, 0), max(int(rows[0]) - pad, 0)
    x2, y2 = min(int(columns[-1]) + 1 + pad, image_width), min(int(rows[-1]) + 1 + pad, image_height)
    target = width / height
    if (x2 - x1) / (y2 - y1) > target:  # too wide: add rows
        y1, y2 = _widened(y1, y2, int((x2 - x1) / target - (y2 - y1)), image_height)
    else:  # too tall: add columns
        x1, x2 = _widened(x1, x2, int((y2 - y1) * target - (x2 - x1)), image_width)
    return x1, y1, x2, y2


def _widened(start: int, stop: int, extra: int, limit: int) -> tuple[int, int]:
    """[start, stop) grown by ``extra`` (half before, the rest after), moved back inside [0, limit)."""
    start, stop = start - extra // 2, stop + extra - extra // 2
    if stop >= limit:
        start, stop = start - (stop - limit), limit
    if start < 0:
        start, stop = 0, stop - start
    return start, min(stop, limit)


def overlay_inpainted(original: np.ndarray, mask: np.ndarray, inpainted: np.ndarray,
                      crop: tuple[int, int, int, int]) -> np.ndarray:
    """The inpainted crop (h, w, 3) uint8 put back into the original image (H, W, 3) uint8: resized to the crop
    box ("crop" mode), with the original kept where the mask (H, W) uint8 is black, blended by its gray levels, as
    diffusers' ``VaeImageProcessor.apply_overlay`` does after a ``padding_mask_crop`` run. (H, W, 3) uint8."""
    height, width = mask.shape
    keep = Image.new("RGBa", (width, height))
    keep.paste(Image.fromarray(original).convert("RGBA").convert("RGBa"),
               mask=ImageOps.invert(Image.fromarray(mask, mode="L")))
    x1, y1, x2, y2 = crop
    base = Image.new("RGBA", (width, height))
    base.paste(_resized(Image.fromarray(inpainted), x2 - x1, y2 - y1, "crop"), (x1, y1))
    result = base.convert("RGB").convert("RGBA")
    result.alpha_composite(keep.convert("RGBA"))
    return np.asarray(result.convert("RGB"))


# -- videos ---------------------------------------------------------------------------------------------------------

# -o suffix -> what is written: H.264 and VP9 through imageio-ffmpeg's own ffmpeg, looping GIF and animated WebP
# through Pillow; anything else is a folder (or a name with {frame}) of numbered PNG frames.
VIDEO_FORMATS = {".mp4": "H.264 MP4", ".webm": "VP9 WebM", ".gif": "looping GIF", ".webp": "animated WebP"}
FFMPEG_CODECS = {".mp4": ("libx264", "mp4"), ".webm": ("libvpx-vp9", "webm")}
FRAME_FIELD = "{frame}"
# Frame numbers have at least this many digits (frame_0000.png), more only when a clip needs them: a clip's frames
# sort by name, and a stream of unknown length numbers its frames as a clip of up to 10000 frames would.
MIN_FRAME_DIGITS = 4


def is_frames_output(path: str | Path) -> bool:
    """Whether ``path`` names numbered PNG frames (a folder, existing or ending in a slash, or a name with
    ``{frame}``) rather than one video file."""
    text = str(path)
    return FRAME_FIELD in text or text.endswith(("/", "\\")) or Path(text).expanduser().is_dir()


def frame_path(path: str | Path, number: int, digits: int = MIN_FRAME_DIGITS) -> Path:
    """The PNG file of frame ``number`` (from 0) of a frames output: ``clip/frame_0007.png`` in a folder, the
    ``{frame}`` of a template (``clip_{frame}.png``) filled in; zero-padded to ``digits``, wider when the number
    needs it."""
    text = str(path)
    if FRAME_FIELD in text:
        if Path(text).suffix.lower() != ".png":
            raise SdcliError(f"{text}: a frame template must end in .png")
        return Path(text.replace(FRAME_FIELD, f"{number:0{digits}d}")).expanduser()
    return Path(text).expanduser() / f"frame_{number:0{digits}d}.png"


def video_output_paths(path: str | Path, frames: int) -> list[Path]:
    """Every file ``save_video`` writes for ``frames`` frames at ``path``: the video (and its ``.json`` sidecar
    where the format holds no text), or the numbered PNG frames of a folder (``clip/`` or an existing folder:
    ``clip/frame_0000.png``, ...) or of a ``{frame}`` template (``clip_{frame}.png``), numbered with
    ``MIN_FRAME_DIGITS`` digits or as many as the last frame needs. A one-line error for an output that is none of
    these."""
    if is_frames_output(path):
        digits = max(MIN_FRAME_DIGITS, len(str(frames - 1)))
        return [frame_path(path, number, digits) for number in range(frames)]
    text = str(path)
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix not in VIDEO_FORMATS:
        raise SdcliError(f"{text}: a video is written as {', '.join(VIDEO_FORMATS)}, a folder of PNG frames or a "
                         f"name with {FRAME_FIELD} (clip_{FRAME_FIELD}.png)")
    return [path] + ([path.with_name(path.name + ".json")] if suffix in (".gif", ".webp") else [])


def check_video_output(path: str | Path, frames: int, overwrite: bool = False) -> list[Path]:
    """The files ``save_video`` would write (``video_output_paths``), after checking that they may be: none exists
    unless ``overwrite``, and each one's folder exists (a folder of frames may be made, inside one that does)."""
    paths = video_output_paths(path, frames)
    for target in paths:
        if target.is_dir():
            raise SdcliError(f"{target} is a folder; give a file name")
        if target.exists() and not overwrite:
            raise OutputExistsError(f"{target} exists; pass --overwrite to replace it")
        folder = target.parent
        if not folder.is_dir() and not (target.suffix == ".png" and folder.parent.is_dir()):
            raise SdcliError(f"cannot write {target}: the folder {folder} does not exist")
    return paths


def plan_video_outputs(output: str | Path, seeds: Sequence[int], prompts: Sequence[str], frames: Sequence[int],
                       overwrite: bool = False) -> list[str]:
    """The output of each clip of a run (what ``save_video`` takes), every file it will write checked as
    ``check_video_output`` checks it, and no file shared by two clips. ``output`` is one clip's form (a video
    file, a folder of frames, a ``{frame}`` template) and may also hold ``{index}`` (1-based), ``{seed}`` and
    ``{prompt}`` as image outputs do; without them, several clips go to numbered files beside a file name
    (``clip-1.mp4``, ``clip-2.mp4``), and a folder or frame template needs one of the fields."""
    text, count = str(output), len(seeds)
    if not text:
        raise SdcliError("the output path is empty")
    fields = template_fields(text.replace(FRAME_FIELD, ""))
    if fields:
        escaped = text.replace(FRAME_FIELD, "{" + FRAME_FIELD + "}")  # formatted back to {frame}
        try:
            outputs = [escaped.format(index=index, seed=seed, prompt=prompt_slug(prompt))
                       for index, (seed, prompt) in enumerate(zip(seeds, prompts), start=1)]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as error:
            raise SdcliError(f"output template {text!r}: {error}") from None
    elif count == 1:
        outputs = [text]
    elif is_frames_output(text):
        raise SdcliError(f"output {text!r}: {count} clips need {{index}}, {{seed}} or {{prompt}} in a folder or "
                         "frame template (clips/{index}/ or clip{index}_{frame}.png)")
    else:
        path, width = Path(text), len(str(count))
        outputs = [str(path.with_name(f"{path.stem}-{number:0{width}d}{path.suffix}"))
                   for number in range(1, count + 1)]
    owners: dict[str, int] = {}
    for index, (clip_output, clip_frames) in enumerate(zip(outputs, frames), start=1):
        for target in check_video_output(clip_output, clip_frames, overwrite):
            key = os.path.normcase(os.path.abspath(target))
            if key in owners:
                raise SdcliError(f"output {text!r} gives clips {owners[key]} and {index} the same file {target}; "
                                 "add {index} or {seed}")
            owners[key] = index
    return outputs


def save_video(path: str | Path, frames: np.ndarray, fps: int, text: Mapping[str, str],
               overwrite: bool = False) -> list[Path]:
    """Write RGB ``frames`` (F, H, W, 3) uint8 at ``fps`` as ``path`` names it (see ``video_output_paths``), with
    ``text`` (keyword -> value, ``sdcli`` the JSON of the request): an MP4/WebM comment tag holds the ``sdcli``
    text, PNG frames hold all of it as text chunks, GIF and WebP get a ``.json`` sidecar. Each file is written
    under a temporary name and renamed when complete; existing files are refused unless ``overwrite``."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3 or len(frames) == 0:
        raise ValueError(f"expected RGB frames of shape (F, H, W, 3) and dtype uint8, got {frames.shape} "
                         f"{frames.dtype}")
    if fps < 1:
        raise SdcliError(f"fps must be a positive integer, got {fps}")
    paths = check_video_output(path, len(frames), overwrite)
    suffix = paths[0].suffix.lower()
    if suffix == ".png":  # numbered frames
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        return [save_png(target, frame, text, overwrite) for target, frame in zip(paths, frames)]
    description = text.get("sdcli", "")
    with atomic_output(paths[0], overwrite) as temporary:
        if suffix in FFMPEG_CODECS:
            _write_ffmpeg(temporary, frames, fps, suffix, description)
        else:
            images = [Image.fromarray(np.ascontiguousarray(frame)) for frame in frames]
            options = dict(save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
            if suffix == ".gif":
                images[0].save(temporary, format="GIF", comment=description.encode("utf-8"), **options)
            else:
                images[0].save(temporary, format="WEBP", lossless=False, quality=90, **options)
    if len(paths) > 1:  # the sidecar
        with atomic_output(paths[1], overwrite) as temporary:
            temporary.write_text(description + "\n", encoding="utf-8")
    return paths


def _write_ffmpeg(path: Path, frames: np.ndarray, fps: int, suffix: str, comment: str) -> None:
    """Frames through imageio-ffmpeg's own ffmpeg binary, the container named (the path is a temporary name)."""
    height, width = frames.shape[1:3]
    writer = start_ffmpeg_writer(path, width, height, fps, suffix, comment)
    try:
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
    finally:
        writer.close()


# What a progressive file adds, so that the frames sent so far are in the file and playable at any moment:
# x264 without lookahead or B-frames (-tune zerolatency) and VP9 without its 25-frame lag encode each frame as it
# arrives instead of holding back dozens; a fragmented MP4 (an empty moov up front, then a moof + mdat fragment from
# each keyframe on) needs no index written at the end; and -flush_packets 1 puts each packet in the file at once
# rather than in ffmpeg's 32 KB write buffer. A keyframe each second (-g fps) bounds what a killed run can lose.
PROGRESSIVE_OPTIONS = {".mp4": ["-tune", "zerolatency", "-movflags", "+frag_keyframe+empty_moov+default_base_moof"],
                       ".webm": ["-lag-in-frames", "0"]}


def imageio_ffmpeg_for(suffix: str):
    """The imageio_ffmpeg module, or a one-line error saying how to get it (``suffix`` is what needs it)."""
    try:
        import imageio_ffmpeg
    except ImportError:
        raise SdcliError(f"writing {suffix} video needs the imageio-ffmpeg package: pip install imageio-ffmpeg "
                         "(or write .gif, .webp or PNG frames)") from None
    return imageio_ffmpeg


def start_ffmpeg_writer(path: Path, width: int, height: int, fps: int, suffix: str, comment: str,
                        progressive: bool = False):
    """imageio-ffmpeg's frame writer (a generator) with its ffmpeg running, writing ``path`` in the container and
    codec of ``suffix`` with ``comment`` as its comment tag: ``send`` RGB uint8 frames ((H, W, 3), or a chunk
    (F, H, W, 3) at once), ``close`` to finish the file and wait for ffmpeg. ``progressive``: a file playable at
    any moment while it is written, with the frames ffmpeg has had; if ffmpeg is killed, all but those of the last
    unfinished fragment, at most a second (``PROGRESSIVE_OPTIONS``). ffmpeg runs in its own process group
    (imageio-ffmpeg's default), so a Ctrl-C at the terminal reaches only Python."""
    imageio_ffmpeg = imageio_ffmpeg_for(suffix)
    codec, container = FFMPEG_CODECS[suffix]
    streaming = PROGRESSIVE_OPTIONS[suffix] + ["-g", str(fps), "-flush_packets", "1"] if progressive else []
    writer = imageio_ffmpeg.write_frames(str(path), (width, height), fps=fps, codec=codec, pix_fmt_in="rgb24",
                                         pix_fmt_out="yuv420p", macro_block_size=2, ffmpeg_log_level="error",
                                         output_params=["-f", container, "-metadata", f"comment={comment}",
                                                        *streaming])
    writer.send(None)  # starts ffmpeg
    return writer
