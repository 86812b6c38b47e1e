"""The model-family seam: the registry, what the rest of sdcli asks of it, and a family written only of stubs that
is recognised and runs through the generic text-to-image pipeline with its own latent geometry, each batch
resolved (defaults, sampler plan, memory check) once."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import sdcli
from sdcli import models
from sdcli.errors import CheckpointError
from sdcli.families import FAMILIES, NOT_YET_READ, Family, ImageStages, LatentGeometry, family_of, recognise
from sdcli.io.checkpoint import Checkpoint
from sdcli.io.safetensors import save_file
from sdcli.pipelines import image as image_pipeline
from sdcli.sampling.plans import SamplerSpec
from sdcli.ops import numpy_ops

SD = FAMILIES["sd"]
TOY_MARKER = "toy_model.weight"
TOY_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                 "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon"}


def test_the_registry_holds_wan_and_sd_and_what_they_declare():
    assert list(FAMILIES) == ["wan", "sd"]  # sd reads any diffusers folder, so it is asked last
    assert family_of("sd1") is family_of("sd2") is SD
    assert SD.latents == LatentGeometry(channels=4, downscale=8)
    assert set(SD.components) == {"text_encoder", "unet", "vae"}
    wan = FAMILIES["wan"]
    assert family_of("wan21") is wan and wan.image is None  # a video family: no image stages
    assert wan.latents == LatentGeometry(channels=16, downscale=8)
    assert set(wan.components) == {"text_encoder", "transformer", "vae"}
    assert [preset.name for family in (wan, SD) for preset in family.presets] == list(models.PRESETS) \
        == list(sdcli.MODEL_PRESETS)
    assert set(models.DIFFUSERS_FILES) == set(SD.diffusers_files) | set(wan.diffusers_files)  # for a repo id
    assert sdcli.PRECISIONS == SD.precisions == ("fp32", "fp16", "bf16")
    with pytest.raises(CheckpointError, match="no model family reads 'sdxl'"):
        family_of("sdxl")


# -- a family of stubs ---------------------------------------------------------------------------------------------

class StubEncoder:
    text_encoder = None
    timings: dict = {}

    def encode(self, prompts, clip_skip=1):
        return np.full((len(prompts), 3, 2), float(len(prompts[0])), np.float32)  # (B, S, D)

    def release(self):
        pass


def stub_family(calls: list[str]) -> Family:
    """Latents of 2 channels at 1/16 of the image; the network predicts zero noise, the decoder upsamples."""
    geometry = LatentGeometry(channels=2, downscale=16)

    def network(x_in, timesteps, context):  # (B, 2, h, w), (B,), (B, 3, 2)
        calls.append("network")
        return np.zeros_like(x_in)

    def decoder(latents):  # (B, 2, h, w) -> (B, 3, 16h, 16w)
        upsampled = latents.repeat(16, axis=2).repeat(16, axis=3)
        return np.concatenate([upsampled, upsampled[:, :1]], axis=1)

    network.ops = decoder.ops = numpy_ops  # the backend each computes on (host numpy here)

    def check_memory(network, decoder, params, backend):
        calls.append("memory")

    def recognise_file(file, path):
        if TOY_MARKER not in file:
            return None
        return Checkpoint(path=path, layout="single-file", family="toy1", prediction_type="epsilon",
                          model_family=family, file=file)

    stages = ImageStages(load_prompt_encoder=lambda checkpoint, ops, precision: StubEncoder(),
                         load_denoiser=lambda checkpoint, ops, precision, stream: network,
                         load_decoder=lambda checkpoint, ops, precision, vae, tiling, stream: decoder,
                         load_preview_decoder=lambda ops: decoder, scheduler_config=lambda checkpoint: TOY_SCHEDULER,
                         native_size=lambda network: 32, check_memory=check_memory, unload=lambda network: None,
                         text_component="text", denoiser_component="denoiser", decoder_component="decoder")
    family = Family(name="toy", title="Toy", reads="toys", file_hint="a toy checkpoint", architectures=("toy1",),
                    components={"denoiser": "model"}, diffusers_configs=(), diffusers_files=(), presets=(),
                    precisions=("fp32",), latents=geometry, image=stages,
                    recognise_folder=lambda path, variant: None, recognise_file=recognise_file,
                    shipped_configs=lambda architecture: Path("."), parse_config=lambda checkpoint, component: {},
                    open_source=lambda checkpoint, component: None)
    return family


@pytest.fixture
def toy(monkeypatch, tmp_path):
    """The stub family registered (first) for the test, and a single file only it recognises."""
    calls: list[str] = []
    family = stub_family(calls)
    monkeypatch.setattr("sdcli.families.FAMILIES", {"toy": family, **FAMILIES})
    path = tmp_path / "toy.safetensors"
    save_file(path, {TOY_MARKER: np.zeros(2, np.float32)})
    return family, path, calls


def test_a_registered_family_recognises_its_files(toy):
    family, path, _ = toy
    checkpoint = sdcli.open_checkpoint(path)
    assert checkpoint.model_family is family and sdcli.describe(checkpoint)["family"] == "toy1"
    assert sdcli.model_family(str(path)) is family


def test_an_unrecognised_file_names_every_family(toy, tmp_path):
    path = tmp_path / "other.safetensors"
    save_file(path, {"weight": np.zeros(2, np.float32)})
    with pytest.raises(CheckpointError, match="not a toy checkpoint nor a Wan2.1 transformer file .* nor a Stable Diffusion 1.x/2.x checkpoint"):
        recognise(path)


def test_not_yet_read_markers_give_way_to_a_family_of_that_name(monkeypatch, tmp_path):
    marker, name = next(iter(NOT_YET_READ.items()))
    path = tmp_path / "new.safetensors"
    save_file(path, {marker + "x": np.zeros(2, np.float32)})
    with pytest.raises(CheckpointError, match=f"this is a {name} checkpoint; sdcli reads Wan2.1 text to video and SD 1.x and 2.x so far"):
        recognise(path)
    family = replace(stub_family([]), name=name.lower(), recognise_file=lambda file, path: "claimed")
    monkeypatch.setattr("sdcli.families.FAMILIES", {family.name: family, **FAMILIES})
    assert recognise(path) == "claimed"


def test_the_pipeline_runs_a_family_of_stubs_resolving_each_batch_once(toy, monkeypatch):
    family, path, calls = toy
    plans = []
    original = SamplerSpec.plan
    monkeypatch.setattr(SamplerSpec, "plan", lambda spec, *args: plans.append(spec.name) or original(spec, *args))
    seeds = []
    monkeypatch.setattr(image_pipeline, "random_seed", lambda: seeds.append(1) or 7)

    pipeline = sdcli.load_pipeline(path)
    assert pipeline.family is family and pipeline.native_size == 32
    plan = sdcli.plan_run(sdcli.GenerateParams(prompt="a toy", steps=3), num_images=3, batch_size=2)
    jobs = [pipeline.prepare(job) for job in plan.jobs]
    assert plans == ["euler", "euler"] and calls == ["memory", "memory"]  # the model's own sampler, per batch
    batches = [sdcli.generate_image(pipeline, job) for job in jobs]
    assert plans == ["euler", "euler"] and calls.count("memory") == 2  # nothing resolved again
    assert seeds == [1] and [batch.seeds for batch in batches] == [[7, 8], [9]]
    assert batches[0].latents.shape == (2, 2, 2, 2) and batches[0].images.shape == (2, 3, 32, 32)
    assert batches[0].params.width == batches[0].params.height == 32 and batches[0].params.sampler == "euler"
    assert calls.count("network") == 2 * 3  # three steps of each batch, guided in one call

    # Seeded noise: the same seed gives the same latents alone or in a batch (here x0 = x: the noise, scaled).
    alone = sdcli.generate_image(pipeline, sdcli.GenerateParams(prompt="a toy", steps=3, seed=8))
    np.testing.assert_array_equal(alone.latents[0], batches[0].latents[1])
    assert seeds == [1]

    noise = np.ones((1, 2, 2, 2), np.float32)
    injected = sdcli.plan_run(sdcli.GenerateParams(prompt="a toy", steps=3, seed=1), latents=noise, family=family)
    assert injected.jobs[0].params.width == 32
    with pytest.raises(sdcli.SdcliError, match="expected float latents of shape "
                                               r"\(images, 2, height/16, width/16\)"):
        sdcli.plan_run(sdcli.GenerateParams(prompt="a toy", seed=1), latents=np.ones((1, 4, 2, 2)), family=family)
