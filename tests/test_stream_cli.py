"""``sdcli video --stream`` end to end on a tiny random streaming model written without any reference library: the
progressive MP4, the PNG folder and raw frames on stdout, the JSON record, the preset found in the weights folder,
and the one-line refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from wan_models import make_tiny_streaming

from sdcli.cli import main

SIZE = ["-W", "48", "-H", "32"]
FRAMES_OF_CHUNKS = {1: 9, 2: 21, 3: 33}


def run(*args):
    return CliRunner().invoke(main, ["video", *args], catch_exceptions=False)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    base, generator = make_tiny_streaming(tmp_path_factory.mktemp("stream-cli") / "base")
    return ["--model", str(generator), "--base-model", str(base)]


def test_progressive_mp4(model, tmp_path):
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    out = tmp_path / "clip.mp4"
    result = run(*model, "--stream", "-p", "a fox", *SIZE, "--chunks", "3", "--seed", "5", "-o", str(out))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("chunk")] == ["chunk 1/3", "chunk 2/3",
                                                                                  "chunk 3/3"]
    assert "first frame after" in lines[-1] and "frames/s" in lines[-1]
    reader = imageio_ffmpeg.read_frames(str(out))
    meta = next(reader)
    assert meta["size"] == (48, 32)
    assert sum(1 for _ in reader) == FRAMES_OF_CHUNKS[3]


def test_png_frames_and_raw_stdout_hold_the_same_frames(model, tmp_path):
    folder = tmp_path / "frames"
    result = run(*model, "-p", "a fox", *SIZE, "--chunks", "2", "--seed", "5", "-o", str(folder) + "/", "--quiet")
    assert result.exit_code == 0, result.output
    pngs = sorted(folder.glob("frame_*.png"))
    assert [p.name for p in pngs[:2]] == ["frame_0000.png", "frame_0001.png"] and len(pngs) == FRAMES_OF_CHUNKS[2]
    from PIL import Image

    pixels = np.stack([np.asarray(Image.open(p)) for p in pngs])  # (F, H, W, 3)
    raw = CliRunner().invoke(main, ["video", *model, "-p", "a fox", *SIZE, "--chunks", "2", "--seed", "5", "-o",
                                    "-", "--quiet"], catch_exceptions=False)
    assert raw.exit_code == 0
    frames = np.frombuffer(raw.stdout_bytes, dtype=np.uint8).reshape(-1, 32, 48, 3)
    np.testing.assert_array_equal(frames, pixels)
    assert "ffplay -f rawvideo -pixel_format rgb24 -video_size 48x32 -framerate 16 -" in raw.stderr


def test_json_record_and_seconds(model, tmp_path):
    out = tmp_path / "clip.gif"
    result = run(*model, "-p", "a fox", *SIZE, "--seconds", "1.25", "--seed", "9", "-o", str(out), "--json",
                 "--attention-sink", "--max-attention-frames", "6")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["frames"] == FRAMES_OF_CHUNKS[2] and record["chunks"] == 2 and record["seed"] == 9  # 20 frames: 2 chunks
    assert record["timings"]["first_frame_s"] > 0 and out.is_file()


def test_the_preset_runs_from_the_weights_folder(model, tmp_path, monkeypatch):
    """self-forcing-1.3b finds its converted generator and the wan21-t2v-1.3b folder where the download puts
    them; nothing converted and no --yes is a one-line error naming the conversion."""
    weights = tmp_path / "weights"
    monkeypatch.setenv("SDCLI_WEIGHTS", str(weights))
    base, generator = model[3], model[1]
    (weights / "self-forcing-1.3b").mkdir(parents=True)
    result = run("--model", "self-forcing-1.3b", "-p", "a fox", *SIZE, "--chunks", "1", "-o",
                 str(tmp_path / "a.mp4"), "--offline")
    assert result.exit_code == 2 and "not converted yet" in result.output and "sdcli convert" in result.output
    shutil.copy(generator, weights / "self-forcing-1.3b" / "self_forcing_dmd.safetensors")
    shutil.copytree(base, weights / "wan21-t2v-1.3b")
    result = run("--model", "self-forcing-1.3b", "--stream", "-p", "a fox", *SIZE, "--chunks", "1", "-o",
                 str(tmp_path / "b.gif"), "--offline")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "b.gif").is_file()


@pytest.mark.parametrize("args, message", [
    (["--steps", "4"], "--steps does not apply to a streaming run"),
    (["--guidance", "3"], "--guidance does not apply"),
    (["--frames", "17"], "--frames does not apply"),
    (["--chunks", "2", "--seconds", "3"], "--chunks or --seconds, not both"),
    (["--max-attention-frames", "2"], "--max-attention-frames must hold a chunk of 3"),
    (["--max-attention-frames", "5", "--attention-sink"], "and the sink chunk"),
    (["-W", "50"], "multiple of 16"),
    (["-o", "clip.txt"], "a video is written as"),
    (["-o", "-", "--json"], "--json cannot share it"),
])
def test_bad_streaming_options_are_one_line_errors(model, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = run(*model, "-p", "a fox", "--chunks", "1", *args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_streaming_options_need_a_streaming_model(tmp_path):
    result = run("--model", "sd15", "--motion-adapter", "x", "-p", "a", "--chunks", "3")
    assert result.exit_code == 2 and "--chunks applies to streaming models" in result.output
    result = run("--model", "sd15", "--stream", "-p", "a")
    assert result.exit_code == 2


def test_an_interrupt_leaves_the_finished_chunks_playable(model, tmp_path, monkeypatch):
    """Ctrl-C during the second chunk: exit 130, and the MP4 holds the first chunk's 9 frames."""
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    from sdcli.pipelines.streaming import StreamingVideo

    generate = StreamingVideo.generate

    def interrupted(self, index, cache):
        if index == 1:
            raise KeyboardInterrupt
        yield from generate(self, index, cache)

    monkeypatch.setattr(StreamingVideo, "generate", interrupted)
    out = tmp_path / "clip.mp4"
    result = run(*model, "-p", "a fox", *SIZE, "--chunks", "3", "--seed", "1", "-o", str(out))
    assert result.exit_code == 130
    assert "interrupted: 9 frames written" in result.output
    reader = imageio_ffmpeg.read_frames(str(out))
    next(reader)
    assert sum(1 for _ in reader) == FRAMES_OF_CHUNKS[1]


def test_the_preset_downloads_and_converts_its_pickle_once(model, tmp_path, monkeypatch):
    """With --yes, self-forcing-1.3b fetches checkpoints/self_forcing_dmd.pt from the (fake) Hub, converts its
    generator_ema to safetensors without torch, and streams; the next run uses the converted file alone."""
    from hub_server import FakeHub
    from test_torch_pickle import tensor_of, write_checkpoint

    from sdcli.io.safetensors import SafetensorsFile

    base, generator = model[3], model[1]
    with SafetensorsFile(generator) as file:
        ema = {name: tensor_of(file[name], f"e{i}") for i, name in enumerate(file.keys())}
    pickle = write_checkpoint(tmp_path / "self_forcing_dmd.pt", {"generator": {}, "generator_ema": ema})
    weights = tmp_path / "weights"
    shutil.copytree(base, weights / "wan21-t2v-1.3b")
    for name in ("SDCLI_AUTO_DOWNLOAD", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SDCLI_WEIGHTS", str(weights))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with FakeHub() as hub:
        hub.add_repo("gdhe17/Self-Forcing", {"checkpoints/self_forcing_dmd.pt": pickle.read_bytes(),
                                             "checkpoints/ode_init.pt": b"not fetched", "README.md": b"# x"})
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        result = run("--model", "self-forcing-1.3b", "--stream", "-p", "a fox", *SIZE, "--chunks", "1", "--yes",
                     "-o", str(tmp_path / "a.gif"), "--quiet")
        assert result.exit_code == 0, result.output
        converted = weights / "self-forcing-1.3b" / "self_forcing_dmd.safetensors"
        with SafetensorsFile(converted) as file, SafetensorsFile(generator) as original:
            assert sorted(file.keys()) == sorted(original.keys())
            assert all(np.array_equal(file[name], original[name]) for name in original.keys())
        assert not (weights / "self-forcing-1.3b" / "checkpoints" / "ode_init.pt").exists()
        hub.clear_records()
        result = run("--model", "self-forcing-1.3b", "-p", "a fox", *SIZE, "--chunks", "1", "-o",
                     str(tmp_path / "b.gif"), "--quiet", "--offline")
        assert result.exit_code == 0, result.output
        assert not hub.requests
