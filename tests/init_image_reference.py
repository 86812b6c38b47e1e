"""The reference side of the image-to-image and inpainting tests: diffusers' StableDiffusionImg2ImgPipeline and
StableDiffusionInpaintPipeline fed the noise sdcli draws, and sdcli's side of the same run. Test-only; torch and
diffusers are imported by the functions that use them.

sdcli draws each image's noise from its seed (``rng.BatchNoise``): first the start noise, then the VAE posterior's
sample, then the sampler's. diffusers draws through ``randn_tensor``, in its own order (the posterior's sample while
preparing the latents, then the start noise, then the masked image's posterior, then the scheduler's per-step
noise); ``feed_randn`` replaces that function in the modules that call it so that it hands out sdcli's draws in
diffusers' order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import sdcli
from sdcli.rng import BatchNoise
from sdcli.sampling.plans import SAMPLERS

PROMPT, NEGATIVE = "a photograph of an astronaut riding a horse", "blurry, low quality"
SEED = 21
LATENT = (4, 8, 8)  # one image's latents at 64x64


def seeded_draws(count: int = 40) -> list[np.ndarray]:
    """The unit noise sdcli draws for one image of seed SEED, in its order."""
    noise = BatchNoise([SEED], LATENT)
    return [noise.draw() for _ in range(count)]


def feed_randn(monkeypatch, module_names: list[str], arrays: list[np.ndarray]) -> None:
    """Make diffusers' ``randn_tensor`` hand out ``arrays`` in turn, in every module named."""
    import importlib

    import torch

    queue = list(arrays)

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        array = queue.pop(0)
        assert tuple(shape) == array.shape, (shape, array.shape)
        return torch.from_numpy(array.copy()).to(dtype or torch.float32)

    for name in module_names:
        monkeypatch.setattr(importlib.import_module(name), "randn_tensor", randn_tensor)


RANDN_USERS = ["diffusers.models.autoencoders.vae", "diffusers.schedulers.scheduling_euler_ancestral_discrete",
               "diffusers.schedulers.scheduling_ddpm", "diffusers.schedulers.scheduling_lcm",
               "diffusers.schedulers.scheduling_ddim"]


def reference_img2img(model, monkeypatch, files, sampler: str, steps: int, strength: float, draws,
                      **options) -> np.ndarray:
    """diffusers' image to image of ``files["image"]``, fed ``draws`` (sdcli's, in sdcli's order); ``options`` go to
    the pipeline call (``eta``)."""
    import diffusers
    import torch
    from PIL import Image

    spec = SAMPLERS[sampler]
    pipe = diffusers.StableDiffusionImg2ImgPipeline(**model["reference"].components)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = scheduler_from_file(spec.diffusers_class, model["configs"], **spec.diffusers_options)
    # diffusers: the posterior's sample, then the start noise, then the scheduler's
    feed_randn(monkeypatch, RANDN_USERS + ["diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img"],
               [draws[1], draws[0], *draws[2:]])
    with torch.no_grad():
        return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, image=Image.open(files["image"]).convert("RGB"),
                    strength=strength, num_inference_steps=steps, guidance_scale=7.5, output_type="np",
                    **options).images


def ours(model, init, sampler: str, steps: int, **changes) -> np.ndarray:
    params = sdcli.GenerateParams(prompt=PROMPT, negative_prompt=NEGATIVE, steps=steps, sampler=sampler, seed=SEED,
                                  **changes)
    batch = sdcli.generate_image(model["pipeline"], params, init_image=init)
    return np.clip(batch.images.transpose(0, 2, 3, 1) / 2 + 0.5, 0, 1)




def write_inputs(folder: Path) -> dict[str, Path]:
    """A smooth colour picture and a mask (white rectangle: repaint) at 64x64, as PNG files in ``folder``."""
    from PIL import Image

    y, x = np.mgrid[0:64, 0:64] / 63.0
    picture = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x * y)], axis=-1)  # (64, 64, 3) in [0, 1]
    Image.fromarray((picture * 255).round().astype(np.uint8)).save(folder / "picture.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 24:56] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    return dict(image=folder / "picture.png", mask=folder / "mask.png")


def reference_inpaint(model, monkeypatch, files, sampler: str, steps: int, strength: float, order) -> np.ndarray:
    """diffusers' inpainting, its randn_tensor handing out ``order`` (sdcli's draws in diffusers' order)."""
    import diffusers
    import torch
    from PIL import Image

    spec = SAMPLERS[sampler]
    pipe = diffusers.StableDiffusionInpaintPipeline(**model["reference"].components)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = scheduler_from_file(spec.diffusers_class, model["configs"], **spec.diffusers_options)
    feed_randn(monkeypatch, RANDN_USERS + ["diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint"],
               order)
    with torch.no_grad():
        return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, image=Image.open(files["image"]).convert("RGB"),
                    mask_image=Image.open(files["mask"]), strength=strength, num_inference_steps=steps,
                    guidance_scale=7.5, height=64, width=64, output_type="np").images




def scheduler_from_file(class_name: str, configs_dir: Path, **options):
    import tiny_pipeline

    return tiny_pipeline.scheduler_from_file(class_name, configs_dir, **options)
