"""Image to image and inpainting on the full SD1.5 architecture (CLIP ViT-L/14, the 860M-parameter UNet, the KL
autoencoder) with random weights at 64x64, against diffusers with the same noise: the tiny models' tests at the
real widths, where float32 sums run over thousands of terms. Built once for the module (about 20 s)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch", reason="torch/diffusers are the reference")
pytest.importorskip("diffusers")

import tiny_pipeline as tiny  # noqa: E402
from data_paths import CONFIGS  # noqa: E402
from init_image_reference import ours, reference_img2img, reference_inpaint, seeded_draws, write_inputs  # noqa: E402
from reference_models import random_unet  # noqa: E402

import sdcli  # noqa: E402

TOL = {
    # The bound for parity on pixels in [0, 1], as for the tiny models (test_image_to_image.py).
    "pixels": 2 / 255,
}
SD15 = CONFIGS / "sd15"


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """diffusers' SD1.5 pipeline with random weights held at fp16 values (so that the saved fp16 folder, half the
    size to write, holds them exactly), and sdcli's pipeline of that folder."""
    import diffusers
    import torch
    import transformers

    def config(component: str) -> dict:
        return json.loads((SD15 / component / "config.json").read_text())

    torch.manual_seed(0)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig.from_dict(config("text_encoder"))).eval()
    vae = diffusers.AutoencoderKL.from_config(config("vae")).eval()
    unet = random_unet(config("unet"), seed=11)
    small = tiny.build_reference("sd1", SD15)  # for its tokenizer: the real SD1 CLIP tables
    reference = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=small.tokenizer,
                                                  unet=unet, scheduler=small.scheduler, safety_checker=None,
                                                  feature_extractor=None, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    reference.to(torch.float16)
    folder = tiny.save_folder(reference, tmp_path_factory.mktemp("sd15") / "model", SD15)
    reference.to(torch.float32)
    return dict(family="sd1", reference=reference, folder=folder, configs=SD15,
                pipeline=sdcli.load_pipeline(str(folder)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.mark.parametrize("kind,sampler,strength", [("img2img", "ddim", 0.3), ("img2img", "euler_a", 0.8),
                                                   ("img2img", "dpmpp_2m", 0.8), ("inpaint", "ddim", 1.0)])
def test_full_sd15_matches_diffusers(full, files, monkeypatch, torch, kind, sampler, strength):
    steps = 6
    draws = seeded_draws()
    if kind == "img2img":
        expected = reference_img2img(full, monkeypatch, files, sampler, steps, strength, draws)
        init = sdcli.load_init_image(files["image"])
    else:  # an ordinary UNet: the image's sample, the start noise, the masked image's (unused), the scheduler's
        expected = reference_inpaint(full, monkeypatch, files, sampler, steps, strength,
                                     [draws[1], draws[0], np.zeros_like(draws[0]), *draws[2:]])
        init = sdcli.load_init_image(files["image"], files["mask"])
    got = ours(full, init, sampler, steps, strength=strength)
    assert got.shape == expected.shape == (1, 64, 64, 3) and expected.std() > 0.02
    difference = float(np.abs(got - expected).max())
    print(f"full SD1.5 {kind} {sampler} strength {strength}: max |diff| {difference * 255:.3f}/255")
    assert difference <= TOL["pixels"], (kind, sampler, strength, difference)
