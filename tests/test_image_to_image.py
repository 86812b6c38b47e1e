"""Image to image and inpainting against diffusers' StableDiffusionImg2ImgPipeline and
StableDiffusionInpaintPipeline, on tiny random SD1 and SD2 models (64x64 pixels), with the same noise on both sides
(see init_image_reference.py for how diffusers is fed sdcli's noise)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch", reason="torch/diffusers are the reference")
pytest.importorskip("diffusers")

import tiny_pipeline as tiny  # noqa: E402
from data_paths import CONFIGS  # noqa: E402

import sdcli  # noqa: E402
from init_image_reference import (NEGATIVE, PROMPT, RANDN_USERS, SEED, feed_randn, ours,  # noqa: E402
                                  reference_img2img, reference_inpaint, scheduler_from_file, seeded_draws,
                                  write_inputs)
from sdcli.io import media  # noqa: E402
from sdcli.sampling.plans import SAMPLERS  # noqa: E402

TOL = {
    # The bound for parity on pixels in [0, 1]: the same maths from the same noise, float32 summation
    # order differing in every network call (the VAE encoder's now too), compounded over the steps.
    "pixels": 2 / 255,
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def model(request, tmp_path_factory):
    family = request.param
    reference, folder = tiny.make_tiny_model(family, tmp_path_factory.mktemp(family) / "model")
    reference.set_progress_bar_config(disable=True)
    return dict(family=family, reference=reference, folder=folder, configs=CONFIGS / tiny.SCHEDULER_CONFIGS[family],
                pipeline=sdcli.load_pipeline(str(folder)))


IMG2IMG_CASES = [(sampler, strength) for sampler in ("ddim", "euler_a", "dpmpp_2m") for strength in (0.3, 0.8)]


@pytest.mark.parametrize("sampler,strength", IMG2IMG_CASES)
def test_img2img_matches_diffusers(model, files, monkeypatch, torch, sampler, strength):
    steps = 10
    draws = seeded_draws()
    expected = reference_img2img(model, monkeypatch, files, sampler, steps, strength, draws)
    got = ours(model, sdcli.load_init_image(files["image"]), sampler, steps, strength=strength)
    assert got.shape == expected.shape == (1, 64, 64, 3)
    assert expected.std() > 0.02  # a picture, not a flat field: differences would show
    difference = float(np.abs(got - expected).max())
    print(f"img2img {model['family']} {sampler} strength {strength}: max |diff| {difference * 255:.3f}/255")
    assert difference <= TOL["pixels"], (sampler, strength, difference)


# -- inpainting ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inpainting_model(model, tmp_path_factory):
    """The tiny model of the same family with an inpainting UNet (9 input channels) of random weights."""
    import diffusers
    import torch

    from reference_models import randomise_norms

    torch.manual_seed(7)
    unet = diffusers.UNet2DConditionModel(**{**tiny.UNET_CONFIGS[model["family"]], "in_channels": 9}).eval()
    randomise_norms(unet, torch.Generator().manual_seed(8))
    parts = {**model["reference"].components, "unet": unet}
    reference = diffusers.StableDiffusionInpaintPipeline(**parts)
    reference.set_progress_bar_config(disable=True)
    folder = tiny.save_folder(reference, tmp_path_factory.mktemp("inpainting") / "model", model["configs"])
    return dict(model, reference=reference, folder=folder, pipeline=sdcli.load_pipeline(str(folder)))


def assert_inpainting_matches(got, expected, files, label):
    assert got.shape == expected.shape == (1, 64, 64, 3)
    assert expected.std() > 0.02  # a picture, not a flat field: differences would show
    difference = float(np.abs(got - expected).max())
    print(f"{label}: max |diff| {difference * 255:.3f}/255")
    assert difference <= TOL["pixels"], (label, difference)


@pytest.mark.parametrize("sampler,strength", [("ddim", 1.0), ("euler_a", 0.75), ("dpmpp_2m", 0.8)])
def test_inpainting_with_an_ordinary_unet_matches_diffusers(model, files, monkeypatch, torch, sampler, strength):
    """A 4-channel UNet: the known region is blended back after every step."""
    steps = 8
    draws = seeded_draws()
    # diffusers: the image's posterior sample, the start noise, the masked image's (unused here), the scheduler's
    expected = reference_inpaint(model, monkeypatch, files, sampler, steps, strength,
                                 [draws[1], draws[0], np.zeros_like(draws[0]), *draws[2:]])
    init = sdcli.load_init_image(files["image"], files["mask"])
    got = ours(model, init, sampler, steps, strength=strength)
    assert_inpainting_matches(got, expected, files, f"inpaint 4-channel {model['family']} {sampler} {strength}")


@pytest.mark.parametrize("sampler,strength", [("ddim", 1.0), ("euler_a", 0.6)])
def test_inpainting_unet_matches_diffusers(inpainting_model, files, monkeypatch, torch, sampler, strength):
    """A 9-channel UNet reads the mask and the masked image's latents beside the latents."""
    steps = 8
    draws = seeded_draws()
    if strength == 1.0:  # pure noise: no image latents; the start noise, the masked image's sample, the scheduler's
        order = draws
    else:  # the image's sample, the start noise, the masked image's, the scheduler's
        order = [draws[1], draws[0], *draws[2:]]
    expected = reference_inpaint(inpainting_model, monkeypatch, files, sampler, steps, strength, order)
    init = sdcli.load_init_image(files["image"], files["mask"])
    got = ours(inpainting_model, init, sampler, steps, strength=strength)
    assert_inpainting_matches(got, expected, files,
                              f"inpaint 9-channel {inpainting_model['family']} {sampler} {strength}")


OTHER_SAMPLERS = [name for name in SAMPLERS if name not in ("ddim", "euler_a", "dpmpp_2m", "pndm")]


@pytest.mark.parametrize("model", ["sd1"], indirect=True)  # one family is enough for the samplers the issue
@pytest.mark.parametrize("sampler", OTHER_SAMPLERS)       # does not name
def test_img2img_with_the_other_samplers_matches_diffusers(model, files, monkeypatch, torch, sampler):
    """Every sampler starts at the strength's step as its diffusers scheduler does after ``set_begin_index``
    (Heun's interleaved timesteps cut at twice the step, DPM-Solver++ and UniPC with a fresh history). PNDM is
    left out: see test_pndm_img2img_runs_the_steps_the_strength_picks."""
    steps = 6
    draws = seeded_draws()
    expected = reference_img2img(model, monkeypatch, files, sampler, steps, 0.6, draws)
    got = ours(model, sdcli.load_init_image(files["image"]), sampler, steps, strength=0.6)
    difference = float(np.abs(got - expected).max())
    print(f"img2img {model['family']} {sampler} strength 0.6: max |diff| {difference * 255:.3f}/255")
    assert difference <= TOL["pixels"], (sampler, difference)


@pytest.mark.parametrize("model", ["sd1"], indirect=True)
def test_img2img_with_ddim_eta_matches_diffusers(model, files, monkeypatch, torch):
    """DDIM with eta > 0 draws fresh noise at every step from the strength's step on, as DDIMScheduler does."""
    draws = seeded_draws()
    expected = reference_img2img(model, monkeypatch, files, "ddim", 8, 0.6, draws, eta=0.7)
    got = ours(model, sdcli.load_init_image(files["image"]), "ddim", 8, strength=0.6, eta=0.7)
    difference = float(np.abs(got - expected).max())
    print(f"img2img {model['family']} ddim eta 0.7 strength 0.6: max |diff| {difference * 255:.3f}/255")
    assert difference <= TOL["pixels"], difference


@pytest.mark.parametrize("model", ["sd1"], indirect=True)  # the mask processing is no family's own
def test_mask_blur_and_padding_mask_crop_match_diffusers(model, files, monkeypatch, torch):
    """--mask-blur: diffusers' ``mask_processor.blur`` on the mask handed to the pipeline; --padding-mask-crop: the
    box around the mask inpainted at the run's size and put back into the original by ``apply_overlay``. Compared
    as the 8-bit images both write (diffusers' overlay works on PIL images)."""
    import diffusers
    from PIL import Image

    steps, blur, pad = 6, 3, 4
    draws = seeded_draws()
    spec = SAMPLERS["ddim"]
    pipe = diffusers.StableDiffusionInpaintPipeline(**model["reference"].components)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = scheduler_from_file(spec.diffusers_class, model["configs"], **spec.diffusers_options)
    feed_randn(monkeypatch, RANDN_USERS + ["diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint"],
               [draws[1], draws[0], np.zeros_like(draws[0]), *draws[2:]])
    mask = pipe.mask_processor.blur(Image.open(files["mask"]), blur_factor=blur)
    with torch.no_grad():
        expected = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, image=Image.open(files["image"]).convert("RGB"),
                        mask_image=mask, strength=1.0, num_inference_steps=steps, guidance_scale=7.5, height=64,
                        width=64, padding_mask_crop=pad, output_type="pil").images[0]
    init = sdcli.load_init_image(files["image"], files["mask"], mask_blur=blur, padding_mask_crop=pad)
    assert init.crop == pipe.mask_processor.get_crop_region(mask, 64, 64, pad=pad)
    params = sdcli.GenerateParams(prompt=PROMPT, negative_prompt=NEGATIVE, steps=steps, sampler="ddim", seed=SEED)
    got = sdcli.images_to_uint8(sdcli.generate_image(model["pipeline"], params, init_image=init).images)[0]
    expected = np.asarray(expected)
    assert got.shape == expected.shape == (64, 64, 3)
    difference = int(np.abs(got.astype(int) - expected).max())
    print(f"inpaint blur {blur} crop {pad} {model['family']}: max |diff| {difference}/255")
    assert difference <= round(TOL["pixels"] * 255), difference


def test_image_and_mask_preprocessing_match_diffusers(tmp_path, torch):
    """An init image of a size that is no multiple of 8 (resized with Lanczos to the multiple below, as
    VaeImageProcessor.preprocess does), a mask of another size, blurred then binarised (the inpainting
    mask_processor), and a crop box fitted with "fill": the arrays both hand to the VAE and the UNet, bit for bit."""
    import diffusers
    from PIL import Image

    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (66, 70, 3), dtype=np.uint8)).save(tmp_path / "image.png")
    mask = np.zeros((50, 45), np.uint8)
    mask[10:30, 12:40] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    image_processor = diffusers.image_processor.VaeImageProcessor(vae_scale_factor=8)
    mask_processor = diffusers.image_processor.VaeImageProcessor(vae_scale_factor=8, do_normalize=False,
                                                                 do_binarize=True, do_convert_grayscale=True)
    init = sdcli.load_init_image(tmp_path / "image.png", tmp_path / "mask.png", mask_blur=2)
    assert (init.width, init.height) == (64, 64)
    expected_image = image_processor.preprocess(Image.open(tmp_path / "image.png").convert("RGB")).numpy()[0]
    np.testing.assert_array_equal(init.pixels, expected_image)
    blurred = mask_processor.blur(Image.open(tmp_path / "mask.png"), blur_factor=2)
    expected_mask = mask_processor.preprocess(blurred, height=64, width=64).numpy()[0]
    np.testing.assert_array_equal(init.mask, expected_mask)
    box = (4, 2, 40, 46)
    fitted = image_processor.preprocess(Image.open(tmp_path / "image.png").convert("RGB"), height=64, width=48,
                                        crops_coords=box, resize_mode="fill").numpy()[0]
    np.testing.assert_array_equal(media.read_init_image(tmp_path / "image.png", 48, 64, crop=box), fitted)
