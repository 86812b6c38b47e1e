"""Text to video against diffusers' AnimateDiffPipeline on a tiny random-weight SD 1.x model and motion adapter:
the same initial latents give frames within 2/255 of diffusers' (output_type="np"), with DDIM as AnimateDiff's
examples configure it (linspace spacing, where diffusers steps each timestep t to the noise level of t - T // N),
Euler with trailing spacing and no guidance (AnimateDiff-Lightning's settings) and LCM; and with a UNet LoRA merged, as
AnimateLCM uses its own."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch/diffusers are the video reference")
pytest.importorskip("diffusers")

import reference_models  # noqa: E402
import tiny_pipeline  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from sdcli.errors import SdcliError  # noqa: E402
from sdcli.io.checkpoint import open_checkpoint  # noqa: E402
from sdcli.io.media import images_to_uint8  # noqa: E402
from sdcli.pipelines.video import VideoParams, generate_video, load_video_pipeline  # noqa: E402

TOL = {
    # |ours - diffusers| per channel, in 8-bit steps (the bound): both decode float32 frames and round
    "frame_levels": 2,
}
# the scheduler settings of diffusers' AnimateDiff examples, and of AnimateDiff-Lightning's model card
ANIMATEDIFF_DDIM = {"beta_schedule": "linear", "clip_sample": False, "timestep_spacing": "linspace",
                    "steps_offset": 1}
LIGHTNING_EULER = {"timestep_spacing": "trailing", "beta_schedule": "linear"}
CASES = {
    # name: (sdcli sampler, diffusers scheduler class, scheduler options, steps, guidance, frames)
    "ddim": ("ddim", "DDIMScheduler", ANIMATEDIFF_DDIM, 4, 7.5, 5),
    "euler": ("euler", "EulerDiscreteScheduler", LIGHTNING_EULER, 4, 1.0, 6),
    # one step: LCM's later steps add noise that diffusers draws from torch's generator
    "lcm": ("lcm", "LCMScheduler", {"beta_schedule": "linear"}, 1, 1.0, 3),
}


@pytest.fixture(scope="module")
def tiny_video(tmp_path_factory):
    """(diffusers AnimateDiffPipeline, model folder, adapter folder) on random weights."""
    return tiny_pipeline.make_tiny_video_model(tmp_path_factory.mktemp("animatediff"))


def reference_frames(reference, scheduler_class: str, options: dict, prompt: str, negative: str, steps: int,
                     guidance: float, latents: np.ndarray) -> np.ndarray:
    """diffusers' frames (B, F, H, W, 3) in [0, 1] from unit-variance ``latents`` (B, 4, F, h, w)."""
    reference.scheduler = tiny_pipeline.scheduler_from_file(scheduler_class, tiny_pipeline.CONFIGS / "sd15",
                                                            **options)
    with torch.no_grad():
        result = reference(prompt=[prompt] * len(latents), negative_prompt=[negative] * len(latents),
                           num_frames=latents.shape[2], num_inference_steps=steps, guidance_scale=guidance,
                           latents=torch.from_numpy(latents), height=latents.shape[3] * 8,
                           width=latents.shape[4] * 8, output_type="np")
    return np.asarray(result.frames)


@pytest.mark.parametrize("case", sorted(CASES))
def test_frames_match_diffusers(tiny_video, case):
    reference, model_folder, adapter_folder = tiny_video
    sampler, scheduler_class, options, steps, guidance, frames = CASES[case]
    latents = np.random.default_rng(7).standard_normal((2, 4, frames, 8, 8)).astype(np.float32)
    prompt, negative = "a corgi running on a beach", "blurry"
    expected = reference_frames(reference, scheduler_class, options, prompt, negative, steps, guidance, latents)
    pipeline = load_video_pipeline(model_folder, adapter_folder, scheduler_options=options)
    params = VideoParams(prompt, negative, frames=frames, steps=steps, sampler=sampler, guidance_scale=guidance,
                         seed=0, width=64, height=64, batch_size=2, decode_chunk=4)
    video = generate_video(pipeline, params, initial_noise=latents)
    assert video.frames.shape == (2, frames, 3, 64, 64)
    ours = np.stack([images_to_uint8(clip) for clip in video.frames])  # (B, F, H, W, 3)
    theirs = np.round(expected * 255).astype(np.int16)
    assert ours.shape == theirs.shape
    assert np.max(np.abs(ours.astype(np.int16) - theirs)) <= TOL["frame_levels"]


def test_decode_chunk_does_not_change_the_frames(tiny_video):
    _, model_folder, adapter_folder = tiny_video
    pipeline = load_video_pipeline(model_folder, adapter_folder, scheduler_options=ANIMATEDIFF_DDIM)
    params = VideoParams("a cat", frames=5, steps=2, sampler="ddim", seed=3, width=64, height=64)
    whole = generate_video(pipeline, params.with_(decode_chunk=16))
    chunked = generate_video(pipeline, params.with_(decode_chunk=2))
    assert np.array_equal(whole.frames, chunked.frames)


def test_bad_video_parameters_are_refused(tiny_video):
    _, model_folder, adapter_folder = tiny_video
    pipeline = load_video_pipeline(model_folder, adapter_folder)
    with pytest.raises(SdcliError, match="at most 32 at once"):
        pipeline.prepare(VideoParams("a cat", frames=33))
    with pytest.raises(SdcliError, match="frames must be a positive integer"):
        pipeline.prepare(VideoParams("a cat", frames=0))
    with pytest.raises(SdcliError, match="width must be a positive multiple of 8"):
        pipeline.prepare(VideoParams("a cat", width=60))


def test_a_unet_lora_merges_as_diffusers_applies_it(tiny_video, tmp_path):
    """AnimateLCM's use of its UNet LoRA: ``load_lora_weights(file)``, ``set_adapters(["lcm-lora"], [0.8])`` and
    LCM sampling in diffusers; sdcli merges the same file (kohya names, as AnimateLCM's) into the UNet's weights."""
    pytest.importorskip("peft", reason="diffusers loads LoRA files with peft")
    reference, model_folder, adapter_folder = tiny_video
    source = open_checkpoint(model_folder).source("unet")
    shapes = {name: tuple(source.shape(name)) for name in source.keys()}
    path = tmp_path / "lcm_lora.safetensors"
    save_file(reference_models.kohya_lora(shapes, reference_models.lora_targets(shapes), alphas="same"), str(path))
    sampler, scheduler_class, options, steps, guidance, frames = CASES["lcm"]
    latents = np.random.default_rng(8).standard_normal((1, 4, frames, 8, 8)).astype(np.float32)
    reference.load_lora_weights(str(tmp_path), weight_name=path.name, adapter_name="lcm-lora")
    try:
        reference.set_adapters(["lcm-lora"], [0.8])
        expected = reference_frames(reference, scheduler_class, options, "a corgi", "", steps, guidance, latents)
    finally:
        reference.unload_lora_weights()
    params = VideoParams("a corgi", frames=frames, steps=steps, sampler=sampler, guidance_scale=guidance, seed=0,
                         width=64, height=64)
    frames_of = {}
    for loras in ([(path, 0.8)], []):
        pipeline = load_video_pipeline(model_folder, adapter_folder, scheduler_options=options, loras=loras)
        video = generate_video(pipeline, params, initial_noise=latents)
        frames_of[bool(loras)] = np.stack([images_to_uint8(clip) for clip in video.frames]).astype(np.int16)
    theirs = np.round(expected * 255).astype(np.int16)
    assert np.max(np.abs(frames_of[True] - theirs)) <= TOL["frame_levels"]
    assert np.max(np.abs(frames_of[False] - theirs)) > 10 * TOL["frame_levels"]  # the LoRA changed the frames
