"""Runs from an init image without a reference: the CLI options, the records, the one-line refusals, reading images
of every kind, the mask's crop box and the sampler hooks. No torch: the model is the golden test's tiny
checkpoint (and a copy of it with an inpainting UNet)."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from safetensors.numpy import load_file, save_file

import sdcli
from data_paths import TEST_DATA
from sdcli.cli import main
from sdcli.errors import SdcliError
from sdcli.io import media
from sdcli.sampling.plans import SAMPLERS
from sdcli.pipelines.image_to_image import KnownRegionBlend, image_latents
from sdcli.sampling.samplers import sample_dpmpp_2m, steps_with

MODEL = TEST_DATA / "golden" / "tiny-sd1"
FAST = ["--steps", "4", "--seed", "5", "--scheduler", "euler"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 72x80 picture, its mask (white square), a mask of another size, and a file that is no image."""
    folder = tmp_path_factory.mktemp("inputs")
    y, x = np.mgrid[0:80, 0:72] / 80.0
    Image.fromarray((np.stack([x, y, 0.5 + 0 * x], -1) * 255).astype(np.uint8)).save(folder / "picture.png")
    mask = np.zeros((80, 72), np.uint8)
    mask[20:50, 20:50] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    Image.fromarray(mask[:64, :64]).save(folder / "small-mask.png")
    (folder / "notes.png").write_text("not an image")
    return dict(image=folder / "picture.png", mask=folder / "mask.png", small_mask=folder / "small-mask.png",
                text=folder / "notes.png")


@pytest.fixture(scope="module")
def inpainting_model(tmp_path_factory):
    """The golden tiny model with an inpainting UNet: its conv_in reads 9 channels (the extra 5 weights random)."""
    folder = tmp_path_factory.mktemp("inpainting") / "tiny-inpainting"
    shutil.copytree(MODEL, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    conv_in = state["conv_in.weight"]  # (C, 4, 3, 3)
    extra = np.random.default_rng(0).standard_normal((conv_in.shape[0], 5, 3, 3)).astype(conv_in.dtype) * 0.05
    state["conv_in.weight"] = np.concatenate([conv_in, extra], axis=1)  # (C, 9, 3, 3)
    save_file(state, str(weights))
    config_path = folder / "unet" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "in_channels": 9}))
    return folder


def generate(*args, model=MODEL, prompt: str | None = "a cat"):
    return CliRunner().invoke(main, ["generate", "-m", str(model), *(["-p", prompt] if prompt else []),
                                     *map(str, args)])


def assert_one_line_error(result, *words):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for word in words:
        assert word in lines[0], lines[0]


# -- the command line --------------------------------------------------------------------------------------------

def test_img2img_runs_at_the_init_images_size_and_records_it(files, tmp_path):
    out = tmp_path / "out.png"
    result = generate("--init-image", files["image"], *FAST, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    image = Image.open(out)
    assert image.size == (72, 80)
    record = json.loads(image.text["sdcli"])
    assert record["init_image"] == "picture.png" and len(record["init_image_sha256"]) == 64
    assert record["parameters"]["strength"] == 0.8  # diffusers' image-to-image default
    assert "Denoising strength: 0.8" in image.text["parameters"] and "Size: 72x80" in image.text["parameters"]
    assert json.loads(result.stdout.splitlines()[0])["init_image"] == "picture.png"


def test_text_to_image_records_no_init_options(tmp_path):
    out = tmp_path / "out.png"
    assert generate(*FAST, "-W", 64, "-H", 64, "-o", out).exit_code == 0
    record = json.loads(Image.open(out).text["sdcli"])
    assert "init_image" not in record and "strength" not in record["parameters"]


def test_inpainting_records_the_mask_and_full_strength(files, tmp_path):
    out = tmp_path / "out.png"
    result = generate("--init-image", files["image"], "--mask", files["mask"], "--mask-blur", 2, *FAST, "-o", out)
    assert result.exit_code == 0, result.output
    image = Image.open(out)
    assert image.size == (72, 80)
    record = json.loads(image.text["sdcli"])
    assert record["mask"] == "mask.png" and record["mask_blur"] == 2 and record["parameters"]["strength"] == 1.0
    assert "Mask blur: 2" in image.text["parameters"]


def test_one_init_image_for_several_images_in_batches(files, tmp_path):
    """-N 3 -b 2: three images of seeds 5, 6, 7; the third made alone is the same."""
    result = generate("--init-image", files["image"], *FAST, "-N", 3, "-b", 2, "-o", tmp_path / "many.png", "--json")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["seed"] for r in records] == [5, 6, 7]
    pixels = [np.asarray(Image.open(r["path"])) for r in records]
    assert not np.array_equal(pixels[0], pixels[1])
    alone = tmp_path / "alone.png"
    assert generate("--init-image", files["image"], "--steps", 4, "--seed", 7, "--scheduler", "euler",
                    "-o", alone).exit_code == 0
    # an image depends on its own seed only; batched matrix products may round differently (see test_pipeline)
    assert np.abs(np.asarray(Image.open(alone)).astype(int) - pixels[2]).max() <= 1


def test_prompts_file_lines_set_their_strength(files, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox --strength 0.5\na blue bird\n")
    result = generate("--prompts-file", prompts, "--init-image", files["image"], *FAST, "-o",
                      str(tmp_path / "{index}.png"), "--json", prompt=None)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["parameters"]["strength"] for r in records] == [0.5, 0.8]
    prompts.write_text("a red fox --strength 0.5\n")
    assert_one_line_error(generate("--prompts-file", prompts, *FAST, "-o", tmp_path / "x.png", prompt=None),
                          "strength", "init image")


def test_padding_mask_crop_gives_back_the_whole_init_image(files, tmp_path):
    out = tmp_path / "out.png"
    result = generate("--init-image", files["image"], "--mask", files["mask"], "--padding-mask-crop", 4,
                      "-W", 64, "-H", 64, *FAST, "-o", out)
    assert result.exit_code == 0, result.output
    assert "Size: 72x80" in Image.open(out).text["parameters"]  # the image written, the init image's size
    image = np.asarray(Image.open(out))
    assert image.shape == (80, 72, 3)
    original = np.asarray(Image.open(files["image"]))
    assert np.array_equal(image[:10], original[:10])  # far from the mask: the original, untouched


@pytest.mark.parametrize("args,words", [
    (["--init-image", "missing.png"], ["--init-image", "no such file"]),
    (["--init-image", "{text}"], ["--init-image", "not an image"]),
    (["--mask", "{mask}"], ["need an --init-image"]),
    (["--strength", "0.5"], ["need an --init-image"]),
    (["--padding-mask-crop", "8"], ["need an --init-image"]),
    (["--init-image", "{image}", "--strength", "0"], ["--strength"]),
    (["--init-image", "{image}", "--strength", "1.5"], ["--strength"]),
    (["--init-image", "{image}", "--mask", "{text}"], ["--mask", "not an image"]),
    (["--init-image", "{image}", "--mask", "{small_mask}", "--no-resize"], ["--mask", "64x64", "72x80"]),
    (["--init-image", "{image}", "-W", "64", "-H", "64", "--no-resize"], ["--init-image", "72x80", "64x64"]),
    (["--init-image", "{image}", "--mask-blur", "3"], ["need a --mask"]),
    (["--init-image", "{image}", "--width", "100000"], ["width 100000", "limit"]),
    (["--init-image", "{image}", "--height", "60"], ["height must be a positive multiple of 8"]),
])
def test_bad_inputs_are_refused_before_the_model_loads(files, tmp_path, monkeypatch, args, words):
    def no_load(*args, **kwargs):
        raise AssertionError("the model must not load for bad inputs")

    monkeypatch.setattr(sdcli, "load_pipeline", no_load)
    out = tmp_path / "out.png"
    result = generate(*[arg.format(**files) for arg in args], "--steps", 2, "-o", out)
    assert_one_line_error(result, *words)
    assert not out.exists()


def test_a_strength_that_leaves_no_step_is_refused(files, tmp_path):
    out = tmp_path / "out.png"
    result = generate("--init-image", files["image"], "--steps", 3, "--strength", 0.3, "-o", out)
    assert_one_line_error(result, "strength 0.3", "no step")  # int(3 x 0.3) = 0, as diffusers refuses it
    result = generate("--init-image", files["image"], "--scheduler", "lcm", "--strength", 0.2, "-o", out)
    assert_one_line_error(result, "strength 0.2", "4 steps")  # LCM's default 4 steps
    assert not out.exists()


def test_an_init_image_of_another_size_is_resized_with_a_notice(files, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="sdcli"):
        init = sdcli.load_init_image(files["image"], width=64, height=48)
    assert init.pixels.shape == (3, 48, 64)
    assert [record.getMessage() for record in caplog.records] == [
        "--init-image picture.png resized from 72x80 to 64x48"]


def test_an_inpainting_model_needs_a_mask(inpainting_model, files, tmp_path):
    out = tmp_path / "out.png"
    assert_one_line_error(generate("-W", 64, "-H", 64, *FAST, "-o", out, model=inpainting_model),
                          "inpainting model", "--mask")
    assert_one_line_error(generate("--init-image", files["image"], *FAST, "-o", out, model=inpainting_model),
                          "inpainting model", "--mask")
    assert not out.exists()
    result = generate("--init-image", files["image"], "--mask", files["mask"], *FAST, "-N", 2, "-b", 2,
                      "-o", out, model=inpainting_model)  # mask channels beside a guided batch of two
    assert result.exit_code == 0, result.output
    assert [Image.open(tmp_path / f"out-{i}.png").size for i in (1, 2)] == [(72, 80)] * 2


def test_pndm_runs_the_steps_the_strength_picks(files):
    """int(10 x 0.55) = 5 steps from the plan's sixth sigma (PLMS with its Heun warm-up from there)."""
    pipeline = sdcli.load_pipeline(str(MODEL))
    params = sdcli.GenerateParams(prompt="a cat", steps=10, sampler="pndm", seed=1, strength=0.55)
    init = sdcli.load_init_image(files["image"])
    records = list(pipeline.run(params, init_image=init))
    plan = SAMPLERS["pndm"].plan(pipeline.scheduler_config, 10)
    assert [record.index for record in records[:-1]] == [0, 1, 2, 3, 4]
    assert records[0].sigma == pytest.approx(float(plan.sigmas[5]))


# -- reading images ----------------------------------------------------------------------------------------------

RGB = (np.mgrid[0:16, 0:24, 0:3].sum(axis=0) * 9 % 256).astype(np.uint8)  # (16, 24, 3)


@pytest.mark.parametrize("kind", ["rgb", "gray", "rgba", "gray16", "jpeg", "webp"])
def test_images_of_every_kind_are_read_as_rgb_in_minus_one_to_one(tmp_path, kind):
    gray = RGB[..., 0]
    path, expected = tmp_path / "image.png", RGB
    if kind == "gray":
        Image.fromarray(gray).save(path)
        expected = np.repeat(gray[..., None], 3, axis=2)
    elif kind == "rgba":
        Image.fromarray(np.dstack([RGB, np.full(gray.shape, 7, np.uint8)])).save(path)  # alpha dropped, as Pillow
    elif kind == "gray16":
        Image.fromarray(gray.astype(np.uint16) * 257).save(path)  # 16-bit PNG: value / 257 gives the 8-bit level
        expected = np.repeat(gray[..., None], 3, axis=2)
    elif kind in ("jpeg", "webp"):
        path = tmp_path / f"image.{kind}"
        Image.fromarray(RGB).save(path, quality=100) if kind == "jpeg" else Image.fromarray(RGB).save(path,
                                                                                                      lossless=True)
        expected = np.asarray(Image.open(path).convert("RGB"))
    else:
        Image.fromarray(RGB).save(path)
    pixels = media.read_init_image(path, 24, 16)
    assert pixels.shape == (3, 16, 24) and pixels.dtype == np.float32
    np.testing.assert_array_equal(pixels, (expected.transpose(2, 0, 1).astype(np.float32) / 255) * 2 - 1)


def test_masks_are_binarised_at_half():
    mask = np.array([[0, 127, 128, 255]], np.uint8)
    np.testing.assert_array_equal(media.prepare_mask(mask, 4, 1), [[[0, 0, 1, 1]]])


@pytest.mark.parametrize("box,size,pad,expected", [
    # hand-worked from diffusers' get_crop_region: the box of the white pixels, padded, then grown about its centre
    # to the run's aspect ratio and moved back inside the image
    ((20, 30, 40, 50), (64, 64), 0, (20, 30, 40, 50)),  # square already
    ((20, 30, 40, 40), (64, 64), 0, (20, 25, 40, 45)),  # 20 wide, 10 tall: 5 rows above and below
    ((20, 30, 40, 40), (64, 64), 4, (16, 21, 44, 49)),  # padded to 28x18: 5 rows above and below
    ((0, 0, 10, 5), (64, 64), 0, (0, 0, 10, 10)),  # at the top edge: moved down
    ((90, 10, 100, 20), (128, 64), 0, (80, 10, 100, 20)),  # 2:1 wanted, at the right edge: moved left
])
def test_the_mask_crop_box(box, size, pad, expected):
    mask = np.zeros((100, 100), np.uint8)
    x1, y1, x2, y2 = box
    mask[y1:y2, x1:x2] = 255
    assert media.mask_crop_region(mask, *size, pad) == expected


# -- models and samplers -----------------------------------------------------------------------------------------

def test_a_single_files_unet_takes_its_input_channels_from_its_weights(tmp_path):
    """An SD1 inpainting checkpoint in one file: the shipped config says 4 channels, its conv_in reads 9."""
    path = tmp_path / "inpainting.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": np.zeros((320, 9, 3, 3), np.float16),
               "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight":
                   np.zeros((320, 768), np.float16)}, str(path))
    checkpoint = sdcli.open_checkpoint(path)
    assert checkpoint.family == "sd1" and checkpoint.config("unet").in_channels == 9


def test_a_plan_from_a_later_step_is_the_plans_tail():
    plan = SAMPLERS["ddim"].plan({"timestep_spacing": "linspace", "clip_sample": False}, 10)
    tail = plan.from_step(4)
    assert np.array_equal(tail.sigmas, plan.sigmas[4:]) and np.array_equal(tail.timesteps, plan.timesteps[4:])
    assert tail.sampler_options["targets"] == plan.sampler_options["targets"][4:]
    with pytest.raises(ValueError):
        plan.from_step(10)


def test_latents_replaced_between_steps_are_where_the_sampler_goes_on():
    """steps_with hands each step's replaced latents back: the sampler's next step starts from them, its history
    (DPM++ 2M's earlier estimate) is its own."""
    sigmas = [10.0, 5.0, 2.0, 1.0, 0.0]
    seen = []

    def model(x, sigma):
        seen.append(x.copy())
        return x * np.float32(0.5)

    x = np.ones((1, 1, 2, 2), np.float32)
    steps = list(steps_with(sample_dpmpp_2m(model, x, sigmas), lambda index, x: x + np.float32(index + 1)))
    assert len(steps) == 4
    for step, following in zip(steps[:-1], seen[1:]):
        np.testing.assert_array_equal(following, step.x)  # the model saw the replaced latents
    plain = list(steps_with(sample_dpmpp_2m(model, x, sigmas), None))
    assert not np.array_equal(plain[-1].x, steps[-1].x)


def test_the_library_refuses_a_strength_out_of_range():
    with pytest.raises(SdcliError, match="strength"):
        sdcli.GenerateParams(prompt="a cat", strength=0.0).validate()


def test_image_latents_are_the_posterior_mean_or_a_sample_times_the_scaling():
    mean = np.full((1, 4, 2, 2), 0.5, np.float32)
    logvar = np.full((1, 4, 2, 2), np.log(4.0), np.float32)  # std 2
    noise = np.stack([np.ones((4, 2, 2), np.float32), -np.ones((4, 2, 2), np.float32)])  # two images
    np.testing.assert_allclose(image_latents((mean, logvar), 0.18215, None), mean * np.float32(0.18215))
    np.testing.assert_allclose(image_latents((mean, logvar), 0.18215, noise)[:, 0, 0, 0],
                               [2.5 * 0.18215, -1.5 * 0.18215], rtol=1e-6)


def test_the_known_region_is_noised_to_each_steps_end_and_clean_after_the_last():
    plan = SAMPLERS["ddim"].plan({"clip_sample": False, "set_alpha_to_one": False}, 4).from_step(1)  # 3 steps
    x0, noise = np.full((1, 4, 2, 2), 2.0, np.float32), np.ones((1, 4, 2, 2), np.float32)
    mask = np.array([[[[1, 0], [0, 0]]]], np.float32)  # repaint the top-left latent pixel
    blend = KnownRegionBlend(plan, x0, noise, mask)
    x = np.full((1, 4, 2, 2), 9.0, np.float32)
    after_first = blend(0, x)
    assert after_first[0, 0, 0, 0] == 9 and after_first[0, 0, 1, 1] == pytest.approx(2 + plan.sigmas[1])
    after_last = blend(2, x)  # times the plan's final scale: diffusers' clean x0 in VP latents
    assert after_last[0, 0, 1, 1] * plan.final_scale == pytest.approx(2.0)
