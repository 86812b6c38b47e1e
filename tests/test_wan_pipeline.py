"""Whole Wan2.1 videos against diffusers' WanPipeline on a tiny random model saved as a diffusers folder: the same
initial latents give frames within 2/255 with UniPC over flow sigmas (Wan's scheduler) and with flow Euler, with
and without guidance, at odd frame counts and sizes; the model's defaults (Wan's negative prompt, flow shift); and
the command line end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch/diffusers are the Wan pipeline reference")
pytest.importorskip("diffusers")

import wan_models  # noqa: E402
from click.testing import CliRunner  # noqa: E402

import sdcli  # noqa: E402
from sdcli.cli import main  # noqa: E402
from sdcli.pipelines.wan import WAN_NEGATIVE_PROMPT  # noqa: E402

TOL = {
    # 8-bit levels, the bound for whole videos: frames in [0, 1] times 255. (Measured: 6e-8 of [0, 1].)
    "levels": 2.0,
    # The final latents, max |diff| / max |diffusers|: the tiny autoencoder's frames span little of [0, 1], so the
    # latents it decodes are compared too. Float32 through every step; measured about 1e-6.
    "latents": 1e-4,
}
PROMPT = "a red fox trotting through fresh snow at dawn"


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wan") / "tiny-wan"
    return wan_models.make_tiny_wan(folder), folder


@pytest.fixture(scope="module")
def pipeline(tiny_wan):
    return sdcli.load_video_pipeline(str(tiny_wan[1]))


def initial_latents(frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    shape = (1, 16, 1 + (frames - 1) // 4, height // 8, width // 8)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def reference_frames(reference, latents: np.ndarray, **options) -> np.ndarray:
    """diffusers' frames (B, F, H, W, 3) in [0, 1]."""
    return reference(latents=torch.from_numpy(latents), output_type="np", **options).frames


def our_frames(video) -> np.ndarray:
    """sdcli's frames (B, F, 3, H, W) in [-1, 1] as diffusers' video processor hands them: (B, F, H, W, 3) in
    [0, 1]."""
    return np.clip(video.frames.transpose(0, 1, 3, 4, 2) / 2 + 0.5, 0, 1)


def level_difference(ours: np.ndarray, expected: np.ndarray) -> float:
    assert ours.shape == expected.shape
    return float(np.abs(ours.astype(np.float64) - expected).max() * 255)


@pytest.mark.parametrize("sampler, frames, size, steps, guidance", [
    ("unipc", 9, (32, 48), 3, 5.0), ("unipc", 5, (48, 16), 2, 1.0), ("euler", 9, (16, 32), 3, 6.0),
    ("euler", 1, (32, 32), 2, 1.0),
])
def test_videos_match_wan_pipeline(tiny_wan, pipeline, sampler, frames, size, steps, guidance):
    reference, _ = tiny_wan
    height, width = size
    latents = initial_latents(frames, height, width)
    if sampler == "euler":  # diffusers' Euler reads "shift", not Wan's "flow_shift": given to both sides
        from diffusers import FlowMatchEulerDiscreteScheduler

        original = reference.scheduler
        reference.scheduler = FlowMatchEulerDiscreteScheduler.from_config(original.config, shift=3.0)
    options = dict(prompt=PROMPT, negative_prompt="blurry, static", height=height, width=width, num_frames=frames,
                   num_inference_steps=steps, guidance_scale=guidance)
    try:
        expected = reference_frames(reference, latents, **options)
        expected_latents = reference(latents=torch.from_numpy(latents), output_type="latent", **options).frames
    finally:
        if sampler == "euler":
            reference.scheduler = original
    params = sdcli.VideoParams(PROMPT, negative_prompt="blurry, static", frames=frames, width=width, height=height,
                               steps=steps, guidance_scale=guidance, sampler=sampler, flow_shift=3.0, seed=1)
    video = sdcli.generate_video(pipeline, params, initial_noise=latents)
    assert video.frames.shape == (1, frames, 3, height, width)
    assert video.latents.shape == latents.shape
    assert level_difference(our_frames(video), expected) <= TOL["levels"]
    expected_latents = expected_latents.numpy()
    relative = np.abs(video.latents - expected_latents).max() / np.abs(expected_latents).max()
    assert relative <= TOL["latents"]


def test_defaults_are_the_model_s(tiny_wan, pipeline):
    """Without a negative prompt, Wan's own applies (diffusers' examples pass it); the flow shift is the scheduler
    config's; 50 UniPC steps and guidance 5 unless given."""
    reference, _ = tiny_wan
    params, plan = pipeline.prepare(sdcli.VideoParams(PROMPT, frames=5, width=32, height=32, steps=2))
    assert params.negative_prompt == WAN_NEGATIVE_PROMPT and params.flow_shift == 3.0
    assert (params.sampler, params.guidance_scale, params.fps) == ("unipc", 5.0, 16)
    assert pipeline.prepare(sdcli.VideoParams(PROMPT))[0].steps == 50
    latents = initial_latents(5, 32, 32, seed=2)
    expected = reference_frames(reference, latents, prompt=PROMPT, negative_prompt=WAN_NEGATIVE_PROMPT, height=32,
                                width=32, num_frames=5, num_inference_steps=2, guidance_scale=5.0)
    video = sdcli.generate_video(pipeline, params, initial_noise=latents)
    assert level_difference(our_frames(video), expected) <= TOL["levels"]


def test_seeded_runs_repeat_and_differ(pipeline):
    params = sdcli.VideoParams(PROMPT, frames=5, width=16, height=16, steps=1, seed=7)
    first, again = (sdcli.generate_video(pipeline, params).frames for _ in range(2))
    other = sdcli.generate_video(pipeline, params.with_(seed=8)).frames
    assert np.array_equal(first, again) and not np.array_equal(first, other)


def test_prompts_are_encoded_up_front_then_the_encoder_goes(tiny_wan):
    pipeline = sdcli.load_video_pipeline(str(tiny_wan[1]))
    clips = [pipeline.prepare(sdcli.VideoParams(text, frames=5, width=16, height=16, steps=1, seed=3))[0]
             for text in (PROMPT, "waves at dusk")]
    pipeline.encode_prompts(clips)
    pipeline.release_text_encoder()
    assert pipeline.prompt_encoder is None
    for params in clips:
        assert np.isfinite(sdcli.generate_video(pipeline, params).frames).all()
    with pytest.raises(sdcli.SdcliError, match="text encoder was released"):
        sdcli.generate_video(pipeline, clips[0].with_(prompt="a prompt not encoded before"))


def test_command_line_end_to_end(tiny_wan, tmp_path):
    import imageio.v3 as iio

    _, folder = tiny_wan
    output = tmp_path / "fox.mp4"
    result = CliRunner().invoke(main, ["video", "--model", str(folder), "-p", PROMPT, "--frames", "9", "-W", "32",
                                       "-H", "32", "--steps", "2", "--seed", "5", "-o", str(output), "--json", "--quiet"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    record = json.loads(result.output.strip().splitlines()[-1])
    assert record["parameters"]["negative_prompt"] == WAN_NEGATIVE_PROMPT and record["motion_adapter"] is None
    assert record["parameters"]["fps"] == 16 and record["parameters"]["sampler"] == "unipc"
    frames = iio.imread(output, index=None)
    assert frames.shape == (9, 32, 32, 3)
    assert iio.immeta(output)["fps"] == 16


def test_a_truncated_text_encoder_shard_is_one_line(tiny_wan, tmp_path):
    """The text encoder in shards (as the Hub's five), one of them cut short: a one-line error naming it, before
    anything is generated."""
    import shutil

    reference, folder = tiny_wan
    copy = tmp_path / "wan"
    shutil.copytree(folder, copy)
    shutil.rmtree(copy / "text_encoder")
    reference.text_encoder.save_pretrained(copy / "text_encoder", max_shard_size="40KB")
    shards = sorted((copy / "text_encoder").glob("model-*.safetensors"))
    assert len(shards) > 1 and (copy / "text_encoder" / "model.safetensors.index.json").is_file()
    sdcli.load_video_pipeline(str(copy))  # whole, the shards load
    data = shards[-1].read_bytes()
    shards[-1].write_bytes(data[: len(data) // 2])
    output = tmp_path / "fox.mp4"
    result = CliRunner().invoke(main, ["video", "--model", str(copy), "-p", PROMPT, "--frames", "5", "-W", "16",
                                       "-H", "16", "--steps", "1", "--seed", "1", "-o", str(output)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and shards[-1].name in lines[0], result.output
    assert not output.exists()
