"""Frame sinks: chunks of frames written as they come to a progressive MP4/WebM, numbered PNG frames, a GIF at the
end, or raw RGB24 on standard output; what each leaves after an interrupt, a kill or a reader that went away.

The video files are decoded back with imageio-ffmpeg's own ffmpeg; their frames are lossy, so they are compared
by mean difference, while PNG frames and raw bytes must equal the input exactly.
"""

from __future__ import annotations

import importlib.util
import inspect
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdcli.errors import SdcliError
from sdcli.io.files import OutputExistsError
from sdcli.io.frame_sinks import OutputClosedError, interrupts_held, open_frame_sink
from sdcli.io.media import read_png_text, video_output_paths

WIDTH, HEIGHT, FPS = 64, 48, 16
CHUNKS = (9, 12)  # a streaming generator's first chunk, then the others
TEXT = {"sdcli": json.dumps({"prompt": "a fox in snow", "seed": 7}), "parameters": "a fox in snow\nSeed: 7"}


def smooth_frames(count: int, seed: int = 0) -> np.ndarray:
    """(count, H, W, 3) uint8 frames of drifting colour waves with random frequencies and phases: content a video
    codec keeps close, unlike noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float64)  # (H, W)
    frequency, phase, speed = rng.uniform(0.2, 0.8, (2, 3)), rng.uniform(0, 2 * np.pi, 3), rng.uniform(0.3, 0.6, 3)
    frames = np.empty((count, HEIGHT, WIDTH, 3), np.uint8)
    for t in range(count):
        for channel in range(3):
            wave = (frequency[0, channel] * x / WIDTH + frequency[1, channel] * y / HEIGHT) * 2 * np.pi
            frames[t, :, :, channel] = np.round(127.5 + 100 * np.sin(wave + phase[channel] + speed[channel] * t))
    return frames


def chunks_of(frames: np.ndarray) -> list[np.ndarray]:
    starts = np.cumsum((0,) + CHUNKS)
    return [frames[start:stop] for start, stop in zip(starts[:-1], starts[1:])]


def decode(path: Path) -> np.ndarray:
    """Every frame ffmpeg reads from ``path``, (F, H, W, 3) uint8."""
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    reader = imageio_ffmpeg.read_frames(str(path))
    width, height = next(reader)["size"]
    return np.stack([np.frombuffer(frame, np.uint8).reshape(height, width, 3) for frame in reader])


def assert_close(decoded: np.ndarray, frames: np.ndarray) -> None:
    """Lossy frames near their originals, each one (within 4 levels on average here; neighbouring frames differ by
    about 28, so a frame out of place fails)."""
    assert decoded.shape == frames.shape
    for index, (got, want) in enumerate(zip(decoded, frames)):
        difference = np.abs(got.astype(np.int16) - want.astype(np.int16)).mean()
        assert difference < 8, f"frame {index} differs by {difference:.1f} on average"


def comment_of(path: Path) -> str:
    """The comment tag of a video file, as ffmpeg reads it."""
    import imageio_ffmpeg

    result = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "ffmetadata",
                             "-"], capture_output=True, check=True, text=True, encoding="utf-8")
    tags = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    return tags.get("comment", tags.get("COMMENT"))  # Matroska's tags are upper case


needs_ffmpeg = pytest.mark.skipif(importlib.util.find_spec("imageio_ffmpeg") is None,
                                  reason="MP4 and WebM are written through imageio-ffmpeg, which is not installed")


# -- progressive MP4 / WebM ------------------------------------------------------------------------------------------

@needs_ffmpeg
@pytest.mark.parametrize("suffix", [".mp4", ".webm"])
def test_video_file_gets_every_chunk(tmp_path, suffix):
    frames = smooth_frames(sum(CHUNKS))
    path = tmp_path / f"clip{suffix}"
    with open_frame_sink(path, width=WIDTH, height=HEIGHT, fps=FPS, text=TEXT) as sink:
        assert path.exists()  # written under its final name from the start
        for chunk in chunks_of(frames):
            sink.write(chunk)
    assert sink.frames_written == 21 and sink.paths == [path]
    assert_close(decode(path), frames)
    assert comment_of(path) == TEXT["sdcli"]
    assert not (tmp_path / f"clip{suffix}.json").exists()


@needs_ffmpeg
def test_mp4_interrupted_between_chunks_is_finished_with_every_frame(tmp_path):
    frames = smooth_frames(sum(CHUNKS))
    path = tmp_path / "clip.mp4"
    with pytest.raises(KeyboardInterrupt):
        with open_frame_sink(path, width=WIDTH, height=HEIGHT, fps=FPS, text=TEXT) as sink:
            for chunk in chunks_of(frames):
                sink.write(chunk)
            raise KeyboardInterrupt
    assert inspect.getgeneratorstate(sink.writer) == inspect.GEN_CLOSED  # its ffmpeg has exited
    assert_close(decode(path), frames)


KILLED_WRITER = """
import sys, time
import numpy as np
from sdcli.io.frame_sinks import open_frame_sink
frames = np.load(sys.argv[2])
sink = open_frame_sink(sys.argv[1], width=frames.shape[2], height=frames.shape[1], fps=int(sys.argv[3]), text={})
sink.write(frames[:9])
sink.write(frames[9:])
print("written", flush=True)
time.sleep(60)
"""


@needs_ffmpeg
@pytest.mark.skipif(not hasattr(os, "killpg"), reason="kills a process group")
def test_mp4_of_a_killed_run_plays_the_finished_fragments(tmp_path):
    """The run and its ffmpeg killed together after two chunks, neither closing anything: the file still plays,
    with at least the first second (the first finished fragment) of frames."""
    frames = smooth_frames(sum(CHUNKS))
    np.save(tmp_path / "frames.npy", frames)
    path = tmp_path / "clip.mp4"
    environment = dict(os.environ, IMAGEIO_FFMPEG_NO_PREVENT_SIGINT="1")  # ffmpeg stays in the run's group
    environment["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                 environment.get("PYTHONPATH", "")])
    run = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path), str(tmp_path / "frames.npy"), str(FPS)],
                           stdout=subprocess.PIPE, env=environment, start_new_session=True, text=True)
    try:
        assert run.stdout.readline().strip() == "written"
        size, steady_since, deadline = -1, time.monotonic(), time.monotonic() + 20
        while time.monotonic() - steady_since < 0.5 and time.monotonic() < deadline:  # ffmpeg has caught up
            time.sleep(0.05)
            if path.stat().st_size != size:
                size, steady_since = path.stat().st_size, time.monotonic()
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
        run.stdout.close()
    decoded = decode(path)
    assert FPS <= len(decoded) <= len(frames)
    assert_close(decoded, frames[:len(decoded)])


@needs_ffmpeg
def test_video_file_refuses_an_existing_file_unless_overwrite(tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"an earlier clip")
    with pytest.raises(OutputExistsError, match="clip.mp4 exists; pass --overwrite"):
        open_frame_sink(path, width=WIDTH, height=HEIGHT, fps=FPS, text=TEXT)
    assert path.read_bytes() == b"an earlier clip"
    with open_frame_sink(path, width=WIDTH, height=HEIGHT, fps=FPS, text=TEXT, overwrite=True) as sink:
        assert path.read_bytes() == b"an earlier clip"  # replaced only when frames come
        sink.write(smooth_frames(3))
    assert len(decode(path)) == 3


@needs_ffmpeg
def test_video_file_name_is_claimed_on_open_and_freed_without_frames(tmp_path):
    path = tmp_path / "clip.mp4"
    open_frame_sink(path, width=WIDTH, height=HEIGHT, fps=FPS, text=TEXT, check_only=True)
    assert not path.exists()
    sink = open_frame_sink(path, width=WIDTH, height=HEIGHT, fps=FPS, text=TEXT)
    assert path.exists()
    with pytest.raises(OutputExistsError):
        open_frame_sink(path, width=WIDTH, height=HEIGHT, fps=FPS, text=TEXT)
    sink.close()
    assert not path.exists() and sink.paths == []


@pytest.fixture
def python_sigint():
    """Python's own Ctrl-C handler for the test: a run started in the background inherits SIGINT ignored, and
    holding an ignored signal is rightly nothing."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_interrupts_are_held_until_the_block_ends(python_sigint):
    reached_end = False
    with pytest.raises(KeyboardInterrupt):
        with interrupts_held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler has run by now
            reached_end = True
    assert reached_end
    with pytest.raises(KeyboardInterrupt):  # a second one is not held
        with interrupts_held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            reached_end = False
    assert reached_end
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# -- PNG frames -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["frames/", "clip_{frame}.png"])
def test_png_frames_are_written_as_each_chunk_comes(tmp_path, form):
    frames = smooth_frames(sum(CHUNKS))
    output = str(tmp_path / form) if form.endswith(".png") else str(tmp_path / form.rstrip("/")) + "/"
    expected = video_output_paths(output, 21)  # the names save_video gives the same clip
    first, second = chunks_of(frames)
    with open_frame_sink(output, width=WIDTH, height=HEIGHT, fps=FPS, text=TEXT) as sink:
        sink.write(first)
        assert [path.exists() for path in expected] == [True] * 9 + [False] * 12
        sink.write(second)
    assert sink.paths == expected and sink.frames_written == 21
    assert expected[0].name in ("frame_0000.png", "clip_0000.png") and expected[-1].name.endswith("0020.png")
    for path, frame in zip(expected, frames):
        assert np.array_equal(np.asarray(Image.open(path)), frame)
    assert read_png_text(expected[-1]) == TEXT
    assert sink.describe() == f"{expected[0]} to {expected[-1].name}"


def test_png_frames_refuse_existing_frames_up_front_unless_overwrite(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    (folder / "frame_0015.png").write_bytes(b"an earlier frame")
    (folder / "notes.png").write_bytes(b"not a frame")
    with pytest.raises(OutputExistsError, match="frame_0015.png exists; pass --overwrite"):
        open_frame_sink(folder, width=WIDTH, height=HEIGHT, fps=FPS, text=TEXT)
    with open_frame_sink(folder, width=WIDTH, height=HEIGHT, fps=FPS, text=TEXT, overwrite=True) as sink:
        for chunk in chunks_of(smooth_frames(21)):
            sink.write(chunk)
    assert (folder / "frame_0015.png").read_bytes() != b"an earlier frame"


def test_png_frames_check_each_chunk_before_writing_it(tmp_path):
    output = str(tmp_path / "clip_{frame}.png")
    first, second = chunks_of(smooth_frames(21))
    with open_frame_sink(output, width=WIDTH, height=HEIGHT, fps=FPS, text=TEXT) as sink:
        sink.write(first)
        (tmp_path / "clip_0015.png").write_bytes(b"appeared meanwhile")
        with pytest.raises(OutputExistsError, match="clip_0015.png exists"):
            sink.write(second)
    assert sink.frames_written == 9 and not (tmp_path / "clip_0009.png").exists()


def test_png_frames_need_a_folder_that_can_be_made(tmp_path):
    with pytest.raises(SdcliError, match="does not exist"):
        open_frame_sink(str(tmp_path / "missing" / "frames") + "/", width=WIDTH, height=HEIGHT, fps=FPS, text=TEXT)
    with pytest.raises(SdcliError, match="must end in .png"):
        open_frame_sink(str(tmp_path / "clip_{frame}.jpg"), width=WIDTH, height=HEIGHT, fps=FPS, text=TEXT)


# -- GIF / WebP -------------------------------------------------------------------------------------------------------

def test_gif_is_written_on_close_even_after_an_interrupt(tmp_path):
    frames = smooth_frames(21)
    path = tmp_path / "clip.gif"
    with pytest.raises(KeyboardInterrupt):
        with open_frame_sink(path, width=WIDTH, height=HEIGHT, fps=FPS, text=TEXT) as sink:
            for chunk in chunks_of(frames):
                sink.write(chunk)
                assert not path.exists()  # a GIF cannot be written a piece at a time
            raise KeyboardInterrupt
    assert sink.paths == [path, tmp_path / "clip.gif.json"]
    with Image.open(path) as gif:
        assert gif.n_frames == 21 and gif.size == (WIDTH, HEIGHT)
    assert (tmp_path / "clip.gif.json").read_text(encoding="utf-8") == TEXT["sdcli"] + "\n"


def test_gif_refuses_an_existing_file_up_front(tmp_path):
    (tmp_path / "clip.gif.json").write_text("{}")
    with pytest.raises(OutputExistsError, match="clip.gif.json exists"):
        open_frame_sink(tmp_path / "clip.gif", width=WIDTH, height=HEIGHT, fps=FPS, text=TEXT)


# -- raw RGB24 on standard output ------------------------------------------------------------------------------------

def test_raw_stream_is_the_frames_bytes_and_says_how_to_play_it():
    frames = smooth_frames(21)
    stdout, stderr = io.BytesIO(), io.StringIO()
    with open_frame_sink("-", width=WIDTH, height=HEIGHT, fps=FPS, text=TEXT, stdout=stdout, stderr=stderr) as sink:
        assert stderr.getvalue() == ("sdcli: raw RGB24 64x48 at 16 fps: ffplay -f rawvideo -pixel_format rgb24 "
                                     "-video_size 64x48 -framerate 16 -\n")
        for chunk in chunks_of(frames):
            sink.write(chunk)
            assert len(stdout.getvalue()) == sink.frames_written * HEIGHT * WIDTH * 3  # flushed per chunk
    assert stdout.getvalue() == frames.tobytes()
    assert sink.paths == [] and sink.describe() == "standard output"


def test_raw_stream_ends_with_output_closed_when_the_reader_goes():
    reader, writer = os.pipe()
    os.close(reader)  # the player quit
    stream = os.fdopen(writer, "wb")
    sink = open_frame_sink("-", width=WIDTH, height=HEIGHT, fps=FPS, text=TEXT, stdout=stream,
                           stderr=io.StringIO())
    with pytest.raises(OutputClosedError, match="closed it after 0 frames"):
        with sink:
            sink.write(smooth_frames(9))
    assert isinstance(OutputClosedError("x"), SdcliError)
    stream.close()  # nothing left to fail: the descriptor now points at the null device


def test_raw_stream_refuses_a_terminal():
    class Terminal(io.BytesIO):
        def isatty(self):
            return True

    with pytest.raises(SdcliError, match="terminal; pipe it into a player"):
        open_frame_sink("-", width=WIDTH, height=HEIGHT, fps=FPS, text=TEXT, stdout=Terminal(),
                        stderr=io.StringIO())


# -- every sink -------------------------------------------------------------------------------------------------------

def test_chunks_of_another_size_or_type_are_refused(tmp_path):
    with open_frame_sink(str(tmp_path / "frames") + "/", width=WIDTH, height=HEIGHT, fps=FPS, text=TEXT) as sink:
        sink.write(smooth_frames(2))
        for bad in (np.zeros((2, HEIGHT, WIDTH + 2, 3), np.uint8), smooth_frames(2).astype(np.float32),
                    np.zeros((0, HEIGHT, WIDTH, 3), np.uint8), smooth_frames(1)[0]):
            with pytest.raises(ValueError, match=r"expected a chunk of RGB frames of shape \(F, 48, 64, 3\)"):
                sink.write(bad)
    with pytest.raises(ValueError, match="not open"):
        sink.write(smooth_frames(2))
    assert sink.frames_written == 2


def test_outputs_and_sizes_that_are_not_videos_are_refused(tmp_path):
    with pytest.raises(SdcliError, match="a video is written as .mp4"):
        open_frame_sink(tmp_path / "clip.avi", width=WIDTH, height=HEIGHT, fps=FPS, text=TEXT)
    with pytest.raises(SdcliError, match="fps must be a positive integer"):
        open_frame_sink(tmp_path / "clip.gif", width=WIDTH, height=HEIGHT, fps=0, text=TEXT)
