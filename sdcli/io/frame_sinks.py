"""Frame sinks: a video's frames written as they are made, chunk by chunk, for a generator that may run until
Ctrl-C.

``open_frame_sink`` picks the sink from the output, read as ``media.video_output_paths`` reads it:

- ``clip.mp4``, ``clip.webm``: one ffmpeg, started at the first chunk, writes the final name directly, so the
  file grows as frames come and plays at any moment (a fragmented MP4; ``media.PROGRESSIVE_OPTIONS``). An
  existing file is refused unless ``overwrite``, and the name is claimed when the sink opens. ``close`` lets
  ffmpeg finish the file with every frame written, after an exception or Ctrl-C too; a run killed outright
  (ffmpeg with it) leaves the fragments finished so far playable, losing at most the last second.
- a folder (``frames/``) or a template (``clip_{frame}.png``): each frame a PNG (``save_png``, atomic) as soon
  as it arrives, numbered on across chunks with ``MIN_FRAME_DIGITS`` digits, widening only past 9999: the names
  ``save_video`` gives the frames of a clip of up to 10000 frames.
- ``clip.gif``, ``clip.webp``: neither format can be written a piece at a time; the frames are kept and the
  file written by ``save_video`` on ``close``.
- ``-``: raw RGB24 to standard output, flushed after each chunk, for a player reading a pipe.

Every sink takes chunks of RGB frames (F, H, W, 3) uint8 of the size it was opened with.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator, Mapping, TextIO

import numpy as np

from ..errors import SdcliError
from .files import OutputExistsError
from .media import (FFMPEG_CODECS, FRAME_FIELD, check_video_output, frame_path, imageio_ffmpeg_for,
                    is_frames_output, save_png, save_video, start_ffmpeg_writer, video_output_paths)

__all__ = ["FrameSink", "OutputClosedError", "open_frame_sink", "raw_player_command"]


class OutputClosedError(SdcliError):
    """The reader of a stream went away (a player quit): stop generating, quietly."""


def checked_frames(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    """``frames`` as a C-contiguous array, after checking it is a chunk of RGB frames (F, H, W, 3) uint8 of the
    sink's size."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (height, width, 3) or len(frames) == 0:
        raise ValueError(f"expected a chunk of RGB frames of shape (F, {height}, {width}, 3) with F >= 1 and dtype "
                         f"uint8, got {frames.shape} {frames.dtype}")
    return np.ascontiguousarray(frames)


class FrameSink:
    """Where a video's frames go as they are made: ``write`` each chunk in order, then ``close`` (or leave a
    ``with`` block, which closes on an exception too). ``frames_written`` counts the frames taken so far, ``paths``
    the files written or being written."""

    def __init__(self, width: int, height: int, fps: int):
        self.width, self.height, self.fps = width, height, fps
        self.frames_written = 0
        self.paths: list[Path] = []
        self.opened = self.closed = False

    def open(self) -> FrameSink:
        """Start: claim the output (a video's name, a frames folder) or announce the stream."""
        self._open()
        self.opened = True
        return self

    def write(self, frames: np.ndarray) -> None:
        """Write a chunk of RGB frames (F, H, W, 3) uint8, F >= 1, after the frames written before."""
        if not self.opened or self.closed:
            raise ValueError("this frame sink is not open")
        self._write(checked_frames(frames, self.width, self.height))

    def close(self) -> None:
        """Finish the output with every frame written so far; closing again does nothing."""
        if self.opened and not self.closed:
            self.closed = True
            self._close()

    def describe(self) -> str:
        """Where the frames go, for a message."""
        raise NotImplementedError

    def __enter__(self) -> FrameSink:
        return self

    def __exit__(self, *exception) -> None:
        self.close()

    def _open(self) -> None:
        pass

    def _write(self, frames: np.ndarray) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        pass


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold a Ctrl-C back until the block ends; a second one goes through at once.

    imageio-ffmpeg's writer kills ffmpeg when an interrupt lands inside it, which would cut the file short of the
    frames already sent; held back, the interrupt is raised once the chunk is handed over, and ``close`` then
    lets ffmpeg finish. Only the main thread can set a signal handler; elsewhere, or where the handler is not
    Python's, this does nothing.
    """
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield
        return
    held = []

    def hold(signum, frame):
        if held:
            previous(signum, frame)
        held.append(frame)

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        previous(signal.SIGINT, held[0])


class VideoFileSink(FrameSink):
    """An MP4 or WebM file written by one ffmpeg as the chunks arrive, under its final name: the file is
    visible, and playable, while it grows. Its name is claimed (created empty) when the sink opens, unless
    ``overwrite``; ffmpeg starts at the first chunk, so a run that writes no frame leaves no file and an existing
    one it was to replace untouched."""

    def __init__(self, output: str | Path, width: int, height: int, fps: int, comment: str, overwrite: bool):
        super().__init__(width, height, fps)
        self.path = check_video_output(output, 1, overwrite)[0]
        self.suffix = self.path.suffix.lower()
        imageio_ffmpeg_for(self.suffix)  # missing: said before any frame is made
        self.comment, self.overwrite = comment, overwrite
        self.writer = None  # imageio-ffmpeg's generator, from the first chunk
        self.made_file = False

    def _open(self) -> None:
        if not self.overwrite:
            try:
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            except FileExistsError:
                raise OutputExistsError(f"{self.path} exists; pass --overwrite to replace it") from None
            self.made_file = True
        self.paths = [self.path]

    def _write(self, frames: np.ndarray) -> None:
        with interrupts_held():
            try:
                if self.writer is None:
                    self.made_file = True
                    self.writer = start_ffmpeg_writer(self.path, self.width, self.height, self.fps, self.suffix,
                                                      self.comment, progressive=True)
                self.writer.send(frames)  # (F, H, W, 3) rgb24 bytes down ffmpeg's stdin
            except OSError as error:
                raise SdcliError(f"ffmpeg failed writing {self.path}: {str(error).splitlines()[0]}") from None
            self.frames_written += len(frames)  # before a held interrupt is raised

    def _close(self) -> None:
        if self.writer is not None:
            self.writer.close()  # ffmpeg reads its input to the end, finishes the file and exits
        if self.frames_written == 0 and self.made_file:
            self.path.unlink(missing_ok=True)
            self.paths = []

    def describe(self) -> str:
        return str(self.path)


def existing_frames(output: str | Path) -> list[Path]:
    """The files already where a frames output puts its frames, numbered as it numbers them (four or more
    digits), sorted; none looked for when ``{frame}`` is in a folder's name."""
    text = str(output)
    if FRAME_FIELD in text:
        template = Path(text).expanduser()
        if FRAME_FIELD in str(template.parent):
            return []
        folder = template.parent
        pattern = r"\d{4,}".join(re.escape(part) for part in template.name.split(FRAME_FIELD))
    else:
        folder, pattern = Path(text).expanduser(), r"frame_\d{4,}\.png"
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir() if re.fullmatch(pattern, path.name))


class PngFramesSink(FrameSink):
    """Numbered PNG frames, each written (atomically, with the text chunks) as soon as it arrives."""

    def __init__(self, output: str | Path, width: int, height: int, fps: int, text: Mapping[str, str],
                 overwrite: bool):
        super().__init__(width, height, fps)
        self.folder = check_video_output(output, 1, overwrite)[0].parent  # it exists or can be made
        if not overwrite:
            taken = existing_frames(output)
            if taken:
                more = f" (and {len(taken) - 1} more frames)" if len(taken) > 1 else ""
                raise OutputExistsError(f"{taken[0]} exists{more}; pass --overwrite to replace them")
        self.output, self.text, self.overwrite = output, dict(text), overwrite

    def _open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)

    def _write(self, frames: np.ndarray) -> None:
        targets = [frame_path(self.output, self.frames_written + offset) for offset in range(len(frames))]
        for target in targets:
            if target.exists() and not self.overwrite:
                raise OutputExistsError(f"{target} exists; pass --overwrite to replace it")
        for target, frame in zip(targets, frames):
            self.paths.append(save_png(target, frame, self.text, self.overwrite))
            self.frames_written += 1

    def describe(self) -> str:
        if not self.paths:
            return str(self.output)
        return str(self.paths[0]) + (f" to {self.paths[-1].name}" if len(self.paths) > 1 else "")


class WholeFileSink(FrameSink):
    """A looping GIF or an animated WebP. Neither can be written a piece at a time: the frames are kept in
    memory (which grows with the stream) and the file, with its ``.json`` sidecar, is written by ``save_video``
    on ``close``, after an exception or Ctrl-C too; until then there is no file."""

    def __init__(self, output: str | Path, width: int, height: int, fps: int, text: Mapping[str, str],
                 overwrite: bool):
        super().__init__(width, height, fps)
        self.planned = check_video_output(output, 1, overwrite)
        self.output, self.text, self.overwrite = output, dict(text), overwrite
        self.chunks: list[np.ndarray] = []

    def _write(self, frames: np.ndarray) -> None:
        self.chunks.append(frames.copy())
        self.frames_written += len(frames)

    def _close(self) -> None:
        if self.chunks:
            frames, self.chunks = np.concatenate(self.chunks), []  # (F, H, W, 3)
            self.paths = save_video(self.output, frames, self.fps, self.text, self.overwrite)

    def describe(self) -> str:
        return str(self.planned[0])


def raw_player_command(width: int, height: int, fps: int) -> str:
    """An ffplay command line that plays raw RGB24 frames of this size from its standard input."""
    return f"ffplay -f rawvideo -pixel_format rgb24 -video_size {width}x{height} -framerate {fps} -"


class RawVideoSink(FrameSink):
    """Raw RGB24 frames, row by row and frame by frame, to a binary stream (standard output), flushed after each
    chunk so that a player shows them at once. Opening says on ``messages`` (standard error) what the stream is
    and how to play it. A reader that goes away (a closed pipe) ends the stream with ``OutputClosedError``; the
    stream is then pointed at the null device, so that nothing fails later on flushing it."""

    def __init__(self, width: int, height: int, fps: int, stream: BinaryIO, messages: TextIO):
        super().__init__(width, height, fps)
        self.stream, self.messages = stream, messages
        if stream.isatty():
            raise SdcliError("-o - writes raw video to standard output, which is a terminal; pipe it into a "
                             f"player: | {raw_player_command(width, height, fps)}")

    def _open(self) -> None:
        self.messages.write(f"sdcli: raw RGB24 {self.width}x{self.height} at {self.fps} fps: "
                            f"{raw_player_command(self.width, self.height, self.fps)}\n")
        self.messages.flush()

    def _write(self, frames: np.ndarray) -> None:
        try:
            self.stream.write(memoryview(frames).cast("B"))  # (F, H, W, 3) as bytes
            self.stream.flush()
        except BrokenPipeError:
            self._reader_gone()
            raise OutputClosedError(f"the reader of standard output closed it after {self.frames_written} "
                                    "frames") from None
        self.frames_written += len(frames)

    def _close(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            self._reader_gone()

    def _reader_gone(self) -> None:
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(null, self.stream.fileno())
            finally:
                os.close(null)
        except (OSError, ValueError):
            pass  # a stream without a descriptor has nothing left to fail

    def describe(self) -> str:
        return "standard output"


def open_frame_sink(output: str | Path, *, width: int, height: int, fps: int, text: Mapping[str, str],
                    overwrite: bool = False, stdout: BinaryIO | None = None, stderr: TextIO | None = None,
                    check_only: bool = False) -> FrameSink:
    """The open sink for ``output`` (see the module notes): a video file, a folder or template of PNG frames, a
    GIF or WebP written at the end, or ``-`` for raw RGB24 on ``stdout``.

    ``text`` is what ``save_video`` takes (``sdcli``: the request as JSON). ``stdout`` (binary) and ``stderr``
    (text) are the streams of ``-`` and of its one-line notice, the process's own by default. ``check_only``:
    every check that opening makes, and nothing claimed, started or said; the sink returned is not open (so that
    a bad output is refused before a long model load).
    """
    for name, value in (("width", width), ("height", height), ("fps", fps)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise SdcliError(f"{name} must be a positive integer, got {value}")
    if str(output) == "-":
        sink: FrameSink = RawVideoSink(width, height, fps, stdout if stdout is not None else sys.stdout.buffer,
                                       stderr if stderr is not None else sys.stderr)
    elif is_frames_output(output):
        sink = PngFramesSink(output, width, height, fps, text, overwrite)
    elif Path(output).suffix.lower() in FFMPEG_CODECS:
        sink = VideoFileSink(output, width, height, fps, text.get("sdcli", ""), overwrite)
    else:
        video_output_paths(output, 1)  # a one-line error for an output that is not a video
        sink = WholeFileSink(output, width, height, fps, text, overwrite)
    return sink if check_only else sink.open()
