"""`sdcli video` end to end on a tiny random SD 1.x model and motion adapter: the files it writes (MP4 read back
with its frame count, size and fps; PNG frames equal to the library's frames), its one-line errors (outputs, frame
window, wrong base model), and motion-adapter presets: a preset's settings reaching the sampler, explicit options
winning over them, and a preset not downloaded naming its download command."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("torch", reason="the tiny model is made with diffusers")
pytest.importorskip("diffusers")

import tiny_pipeline  # noqa: E402
from click.testing import CliRunner  # noqa: E402

import sdcli  # noqa: E402
from sdcli.cli import main  # noqa: E402


def run(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


@pytest.fixture(scope="module")
def tiny_video(tmp_path_factory):
    _, model, adapter = tiny_pipeline.make_tiny_video_model(tmp_path_factory.mktemp("animatediff"))
    return model, adapter


def video_args(tiny_video, *more):
    model, adapter = tiny_video
    return ["video", "--model", str(model), "--motion-adapter", str(adapter), "-p", "a corgi running on a beach",
            "--frames", "5", "--steps", "2", "-W", "64", "-H", "64", "--seed", "11", "--quiet", *more]


def test_mp4_round_trip(tiny_video, tmp_path):
    import imageio.v3 as iio

    out = tmp_path / "corgi.mp4"
    result = run(video_args(tiny_video, "--fps", "6", "-o", str(out)))
    assert result.exit_code == 0, result.output
    frames = iio.imread(out, index=None)
    assert frames.shape == (5, 64, 64, 3)
    assert iio.immeta(out)["fps"] == 6


def test_png_frames_are_the_library_frames(tiny_video, tmp_path):
    import imageio.v3 as iio

    model, adapter = tiny_video
    result = run(video_args(tiny_video, "-o", str(tmp_path / "frames") + "/", "--json"))
    assert result.exit_code == 0, result.output
    record = json.loads(result.output.strip().splitlines()[-1])
    assert record["seed"] == 11
    written = np.stack([iio.imread(tmp_path / "frames" / f"frame_{i:04d}.png") for i in range(5)])
    pipeline = sdcli.load_video_pipeline(str(model), str(adapter))
    clip = sdcli.generate_video(pipeline, sdcli.VideoParams("a corgi running on a beach", frames=5, steps=2,
                                                            width=64, height=64, seed=11))
    expected = sdcli.images_to_uint8(clip.frames[0])
    assert np.array_equal(written, expected)


def test_one_line_errors(tiny_video, tmp_path):
    result = run(video_args(tiny_video, "-o", str(tmp_path / "clip.avi")))
    assert result.exit_code == 2 and "a video is written as .mp4" in result.output
    for name in ("clip.png", "clip.jpg"):  # a still image is no video: a folder or a {frame} template is
        result = run(video_args(tiny_video, "-o", str(tmp_path / name)))
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
        assert f"{tmp_path / name}: a video is written as .mp4, .webm, .gif, .webp, a folder of PNG frames or a " \
               "name with {frame} (clip_{frame}.png)" in result.output
    assert not list(tmp_path.iterdir())
    assert len(sdcli.check_video_output(str(tmp_path / "clip_{frame}.png"), 3)) == 3
    result = run(video_args(tiny_video, "--frames", "40", "-o", str(tmp_path / "long.mp4")))
    assert result.exit_code == 2
    assert "40 frames: the motion adapter makes at most 32 frames at once; use --context-length for longer clips" \
        in result.output
    assert len(result.output.strip().splitlines()) == 1
    (tmp_path / "taken.gif").write_bytes(b"")
    result = run(video_args(tiny_video, "-o", str(tmp_path / "taken.gif")))
    assert result.exit_code == 2 and "exists; pass --overwrite" in result.output


def test_an_sd2_model_or_an_adapter_for_another_unet_is_one_line(tiny_video, tmp_path):
    model, adapter = tiny_video
    sd2 = tiny_pipeline.as_sd2_folder(model, tmp_path / "sd2")
    result = run(["video", "--model", str(sd2), "--motion-adapter", str(adapter), "-p", "a cat", "-o",
                  str(tmp_path / "a.mp4"), "-q"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert f"{sd2} is an SD 2.x model; AnimateDiff's motion adapters animate SD 1.x models" in result.output
    sdxl = tmp_path / "sdxl-beta"  # the SDXL adapter's config (three levels), with any weights file
    sdxl.mkdir()
    config = {"_class_name": "MotionAdapter", "block_out_channels": [320, 640, 1280], "motion_layers_per_block": 2,
              "use_motion_mid_block": False}
    (sdxl / "config.json").write_text(json.dumps(config))
    shutil.copy(adapter / "diffusion_pytorch_model.safetensors", sdxl / "diffusion_pytorch_model.safetensors")
    result = run(["video", "--model", str(model), "--motion-adapter", str(sdxl), "-p", "a cat", "-o",
                  str(tmp_path / "b.mp4"), "-q"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "(3 levels, an SDXL motion adapter), this model's UNet has [32, 64] channels" in result.output
    assert not list(tmp_path.glob("*.mp4"))


# -- motion-adapter presets ----------------------------------------------------------------------------------------

@pytest.fixture
def lightning(tiny_video, tmp_path, monkeypatch):
    """$SDCLI_WEIGHTS holding the tiny adapter as 'sdcli download animatediff-lightning' lays out its file."""
    _, adapter = tiny_video
    monkeypatch.setenv("SDCLI_WEIGHTS", str(tmp_path / "weights"))
    return tiny_pipeline.install_adapter_preset(adapter, tmp_path / "weights", "animatediff-lightning")


def preset_args(model, *more):
    return ["video", "--model", str(model), "--motion-adapter", "animatediff-lightning", "-p", "a corgi",
            "--frames", "3", "-W", "64", "-H", "64", "--seed", "4", "--json", "-q", *more]


def test_a_presets_settings_reach_the_sampler(tiny_video, lightning, tmp_path):
    """animatediff-lightning by name: Euler, trailing timesteps, linear betas, 4 steps, guidance 1 (its model
    card's settings), in the record and in the frames, which are the library's for the same name."""
    import imageio.v3 as iio

    model, _ = tiny_video
    result = run(preset_args(model, "-o", str(tmp_path / "frames") + "/"))
    assert result.exit_code == 0, result.output
    record = json.loads(result.output.strip().splitlines()[-1])
    parameters = record["parameters"]
    assert (parameters["sampler"], parameters["steps"], parameters["guidance_scale"],
            parameters["timestep_spacing"]) == ("euler", 4, 1.0, "trailing")
    assert record["motion_adapter"] == "animatediff-lightning" and record["motion_adapter_path"] == str(lightning)
    written = np.stack([iio.imread(tmp_path / "frames" / f"frame_{i:04d}.png") for i in range(3)])
    pipeline = sdcli.load_video_pipeline(str(model), "animatediff-lightning")
    assert pipeline.scheduler_config["beta_schedule"] == "linear"
    clip = sdcli.generate_video(pipeline, sdcli.VideoParams("a corgi", frames=3, width=64, height=64, seed=4))
    assert np.array_equal(written, sdcli.images_to_uint8(clip.frames[0]))


def test_explicit_options_override_a_presets_settings(tiny_video, lightning, tmp_path):
    model, _ = tiny_video
    result = run(preset_args(model, "--steps", "2", "--guidance", "1.5", "--timestep-spacing", "leading", "-o",
                             str(tmp_path / "a.gif")))
    assert result.exit_code == 0, result.output
    parameters = json.loads(result.output.strip().splitlines()[-1])["parameters"]
    assert (parameters["sampler"], parameters["steps"], parameters["guidance_scale"],
            parameters["timestep_spacing"]) == ("euler", 2, 1.5, "leading")
    result = run(preset_args(model, "--scheduler", "ddim", "-o", str(tmp_path / "b.gif")))
    assert result.exit_code == 0, result.output
    parameters = json.loads(result.output.strip().splitlines()[-1])["parameters"]
    assert (parameters["sampler"], parameters["steps"], parameters["guidance_scale"]) == ("ddim", 4, 1.0)


def test_a_missing_preset_names_the_download_command(tiny_video, tmp_path, monkeypatch):
    model, _ = tiny_video
    monkeypatch.setenv("SDCLI_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    for name in ("animatediff-lightning", "animatelcm"):
        result = run(["video", "--model", str(model), "--motion-adapter", name, "-p", "a cat", "-o",
                      str(tmp_path / "a.mp4"), "-q"])
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
        assert result.output.strip().endswith(f"; run: sdcli download {name}")  # $SDCLI_WEIGHTS: no --dir
        assert f"error: {name} is not downloaded ({tmp_path / 'weights' / name}" in result.output
    result = run(["video", "--model", str(model), "--motion-adapter", "sd15", "-p", "a cat", "-o",
                  str(tmp_path / "a.mp4"), "-q"])
    assert result.exit_code == 2 and "sd15 is a model preset, not a motion adapter" in result.output
    result = run(["video", "--model", str(model), "--motion-adapter", "animatelcm", "--yes", "--offline", "-p",
                  "a cat", "-o", str(tmp_path / "a.mp4"), "-q"])
    assert result.exit_code == 2 and "downloads are off" in result.output
    assert not (tmp_path / "weights").exists()


def test_embeddings_and_long_prompts_reach_animatediff(tiny_video, tmp_path):
    """--embedding works for AnimateDiff as for images (the same prompt encoder), and a prompt of two chunks runs
    with a one-chunk negative prompt (matched with the empty prompt's encoding): the library's frames."""
    import imageio.v3 as iio

    from sdcli.io.safetensors import save_file

    model, adapter = tiny_video
    style = np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32) * 0.02
    save_file(tmp_path / "corgistyle.safetensors", {"emb_params": style})
    prompt = "a corgistyle corgi running on a beach, " * 12  # 96 tokens: two chunks
    result = run(video_args(tiny_video, "-p", prompt, "--embedding", str(tmp_path / "corgistyle.safetensors"),
                            "-o", str(tmp_path / "frames") + "/"))
    assert result.exit_code == 0, result.output
    written = np.stack([iio.imread(tmp_path / "frames" / f"frame_{i:04d}.png") for i in range(5)])
    params = sdcli.VideoParams(prompt, frames=5, steps=2, width=64, height=64, seed=11)
    with_style = sdcli.generate_video(sdcli.load_video_pipeline(str(model), str(adapter),
                                                                embeddings=[tmp_path / "corgistyle.safetensors"]),
                                      params)
    assert np.array_equal(written, sdcli.images_to_uint8(with_style.frames[0]))
    plain = sdcli.generate_video(sdcli.load_video_pipeline(str(model), str(adapter)), params)
    assert not np.array_equal(plain.frames, with_style.frames)
