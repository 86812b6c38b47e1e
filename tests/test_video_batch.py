"""`sdcli video` over several clips and with less memory, on a tiny random SD 1.x model and motion adapter: prompts
files (one clip per line, with their own options), the outputs of a batch (numbered files, templates, checked before
anything loads), --low-memory giving the same clip, long clips through --context-length, and Ctrl-C keeping the
finished clips."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import numpy as np
import pytest

pytest.importorskip("torch", reason="the tiny model is made with diffusers")
pytest.importorskip("diffusers")

import tiny_pipeline  # noqa: E402
from click.testing import CliRunner  # noqa: E402

import sdcli  # noqa: E402
from sdcli.cli import main  # noqa: E402


def run(args):
    return CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def tiny_video(tmp_path_factory):
    _, model, adapter = tiny_pipeline.make_tiny_video_model(tmp_path_factory.mktemp("animatediff"))
    return model, adapter


def video_args(tiny_video, *more):
    model, adapter = tiny_video
    return ["video", "--model", model, "--motion-adapter", adapter, "--frames", "3", "--steps", "2", "-W", "64",
            "-H", "64", "--quiet", *more]


def read_frames(path):
    import imageio.v3 as iio

    return iio.imread(path, index=None)


def test_prompts_file_makes_one_clip_per_line(tiny_video, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# clips\na corgi on a beach\na cat in the snow --seed 40 --frames 4 --fps 5\n\n"
                       "a red fox --steps 1\n")
    result = run(video_args(tiny_video, "--prompts-file", prompts, "--seed", 7, "-o", tmp_path / "clip.gif",
                            "--json"))
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.output.strip().splitlines()]
    assert [record["seed"] for record in records] == [7, 40, 9]  # the run's seed + index unless a line sets one
    assert [record["parameters"]["prompt"] for record in records] == ["a corgi on a beach", "a cat in the snow",
                                                                      "a red fox"]
    assert [record["parameters"]["steps"] for record in records] == [2, 2, 1]
    assert [record["path"] for record in records] == [str(tmp_path / f"clip-{i}.gif") for i in (1, 2, 3)]
    assert [len(read_frames(tmp_path / f"clip-{i}.gif")) for i in (1, 2, 3)] == [3, 4, 3]
    assert sorted(path.name for path in tmp_path.glob("clip-*")) == [
        "clip-1.gif", "clip-1.gif.json", "clip-2.gif", "clip-2.gif.json", "clip-3.gif", "clip-3.gif.json"]
    # a clip of a batch is the clip made alone with its settings
    alone = tmp_path / "alone.gif"
    result = run(video_args(tiny_video, "-p", "a cat in the snow", "--seed", 40, "--frames", 4, "--fps", 5,
                            "-o", alone))
    assert result.exit_code == 0, result.output
    assert np.array_equal(read_frames(alone), read_frames(tmp_path / "clip-2.gif"))


def test_batch_outputs_are_checked_before_loading(tiny_video, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a corgi\na cat\n")
    (tmp_path / "clip-2.mp4").write_bytes(b"")
    result = run(video_args(tiny_video, "--prompts-file", prompts, "-o", tmp_path / "clip.mp4"))
    assert result.exit_code == 2 and "clip-2.mp4 exists" in result.output
    assert not (tmp_path / "clip-1.mp4").exists()
    result = run(video_args(tiny_video, "--prompts-file", prompts, "-o", str(tmp_path / "frames") + "/"))
    assert result.exit_code == 2 and "{index}" in result.output
    result = run(video_args(tiny_video, "--prompts-file", prompts, "--seed", 3, "-o",
                            tmp_path / "{prompt}-{seed}_{frame}.png"))
    assert result.exit_code == 0, result.output
    assert sorted(path.name for path in tmp_path.glob("*_*.png")) == [
        f"{name}_{frame:04d}.png" for name in ("a-cat-4", "a-corgi-3") for frame in range(3)]


@pytest.mark.parametrize("line, message", [("a cat --frames 0", "frames must be a positive integer"),
                                           ("a cat --bogus 1", "unknown option --bogus"),
                                           ("a cat --width 60", "multiple of 8")])
def test_prompts_file_errors_name_the_line(tiny_video, tmp_path, line, message):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a corgi\n{line}\n")
    result = run(video_args(tiny_video, "--prompts-file", prompts, "-o", tmp_path / "clip.mp4"))
    assert result.exit_code == 2, result.output
    assert f"prompts.txt:2: " in result.output and message in result.output
    assert not list(tmp_path.glob("clip*"))


def test_low_memory_gives_the_same_clip(tiny_video, tmp_path):
    outputs = {}
    for name, more in (("plain", []), ("low", ["--low-memory"])):
        outputs[name] = tmp_path / name
        result = run(video_args(tiny_video, "-p", "a corgi", "--seed", 5, "--frames", 6, "--guidance", 7.5, *more,
                                "-o", str(outputs[name]) + "/"))
        assert result.exit_code == 0, result.output
    plain = np.stack([read_frames(path) for path in sorted(outputs["plain"].iterdir())])
    low = np.stack([read_frames(path) for path in sorted(outputs["low"].iterdir())])
    assert plain.shape == low.shape == (6, 64, 64, 3)
    assert np.max(np.abs(plain.astype(np.int16) - low)) <= 1  # the same to float32 rounding, usually bit for bit


def test_low_memory_sampling_loop_keeps_no_freed_arrays(tiny_video):
    model, adapter = tiny_video
    assert sdcli.load_video_pipeline(str(model), str(adapter)).reuse_memory
    assert not sdcli.load_video_pipeline(str(model), str(adapter), low_memory=True).reuse_memory


def test_unet_frames_at_once_give_the_same_network_output(tiny_video):
    model, adapter = tiny_video
    pipeline = sdcli.load_video_pipeline(str(model), str(adapter))
    network = pipeline.network
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 4, 5, 8, 8)).astype(np.float32)
    context = rng.standard_normal((2, 77, network.config.cross_attention_dim)).astype(np.float32)
    whole = network(sample, np.array([600.0, 600.0]), context)
    for frames in (1, 3, 4):
        pieces = network.with_frames_at_once(frames)(sample, np.array([600.0, 600.0]), context)
        np.testing.assert_allclose(pieces, whole, rtol=1e-5, atol=1e-5 * np.abs(whole).max())


def test_long_clip_through_context_windows(tiny_video, tmp_path):
    out = tmp_path / "long.mp4"
    result = run(video_args(tiny_video, "-p", "a corgi", "--seed", 1, "--frames", 36, "--steps", 1,
                            "--context-length", 8, "--context-stride", 4, "-W", 32, "-H", 32, "-o", out))
    assert result.exit_code == 0, result.output
    assert read_frames(out).shape == (36, 32, 32, 3)
    result = run(video_args(tiny_video, "-p", "a corgi", "--frames", 40, "-o", tmp_path / "too-long.mp4"))
    assert result.exit_code == 2 and "--context-length" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_ctrl_c_keeps_finished_clips_and_leaves_no_partial_file(tiny_video, tmp_path):
    model, adapter = tiny_video
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a corgi --steps 1\na cat --steps 400\na fox --steps 400\n")
    out = tmp_path / "run.gif"
    process = subprocess.Popen(["sdcli", "video", "-m", str(model), "--motion-adapter", str(adapter),
                                "--prompts-file", str(prompts), "--frames", "3", "--scheduler", "euler",
                                "-W", "64", "-H", "64", "-o", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while not (tmp_path / "run-1.gif.json").exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "error: interrupted"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["prompts.txt", "run-1.gif", "run-1.gif.json"]
    assert read_frames(tmp_path / "run-1.gif").shape == (3, 64, 64, 3)
