"""`sdcli video` end to end on a tiny random SD 1.x model and motion adapter: the files it writes (MP4 read back
with its frame count, size and fps; PNG frames equal to the library's frames) and its one-line errors."""

from __future__ import annotations

import json

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
    result = run(video_args(tiny_video, "--frames", "40", "-o", str(tmp_path / "long.mp4")))
    assert result.exit_code == 2 and "at most 32 at once" in result.output
    assert len(result.output.strip().splitlines()) == 1
    (tmp_path / "taken.gif").write_bytes(b"")
    result = run(video_args(tiny_video, "-o", str(tmp_path / "taken.gif")))
    assert result.exit_code == 2 and "exists; pass --overwrite" in result.output
