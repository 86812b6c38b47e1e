"""Diffusion forcing as SkyReels-V2 samples with it: every latent frame at its own noise level, blocks of frames
denoised in a staggered wave, long videos window by window.

Chen et al. 2024, "Diffusion Forcing: Next-token Prediction Meets Full-Sequence Diffusion"; SkyReels Team 2025,
"SkyReels-V2: Infinite-length Film Generative Model". The arithmetic is diffusers'
``SkyReelsV2DiffusionForcingPipeline`` (0.42):

- :func:`plan_windows`: a video longer than the model's window is made in windows of ``base`` latent frames, each
  after the first starting from the last ``overlap`` frames of the video so far (rounded down to whole causal
  blocks), clean; of each later window the frames from ``overlap`` on join the video.
- :func:`forcing_schedule`: the rows of a window's denoising. Each block of ``causal_block_size`` frames runs the
  N steps of the sampler's schedule; block b starts ``ar_step`` rows after block b - 1 (0: all at once, the
  synchronous mode) and, once the block before it is finished, goes on a step per row. A frame not started is told
  timestep 999, a finished or given one 0.
- :class:`SteppedSampler`: diffusers keeps a copy of the scheduler per latent frame and steps each with the model
  output of its frame whenever its block moves. The frames of a block always move together, so one sampler
  generator per group of frames that move together is the same arithmetic (every update is element-wise), each
  advanced from outside with the velocity the one transformer call of the row gave.

One quirk is kept, because it is the model's sampler as released: diffusers (and the SkyReels-V2 code before it)
hands each frame's scheduler a view into the video's latents, ``latents[:, :, i]``, and writes the step's result
into that same view. UniPC keeps the latents a step started from for its corrector; after the first step those
are the view, now holding the first step's result, so the corrector of the second step starts from the first
prediction instead of the noise. Later steps keep arrays of their own. :class:`SteppedSampler` does the same with
``overwrite_start``; on the tests' tiny model the latents differ from a plain UniPC run's by 2% of their scale.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import SdcliError
from .flow import FlowDenoiser, FlowPlan
from .samplers import Step

NOT_STARTED_TIMESTEP = 999.0  # what diffusers tells the network for a frame still pure noise
FINISHED_TIMESTEP = 0.0


@dataclass(frozen=True)
class Window:
    """One forward window of a video: ``frames`` latent frames of which the first ``prefix`` are the video's
    frames ``history_start`` .. ``history_start + prefix`` (clean, from earlier windows); the frames from
    ``kept_from`` on are added to the video when it is done."""

    index: int
    frames: int
    prefix: int
    kept_from: int
    history_start: int  # the video's frame the prefix starts at

    @property
    def new_frames(self) -> int:
        return self.frames - self.kept_from


def plan_windows(latent_frames: int, base_frames: int | None, overlap: int | None,
                 block: int) -> list[Window]:
    """The windows of a video of ``latent_frames``: one when ``overlap`` is None or the video fits ``base_frames``;
    else windows of ``base_frames``, each later one reusing the last ``overlap`` frames (its prefix rounded down to
    whole blocks of ``block``). Window k covers the video's frames from k (base - overlap) on, as diffusers counts:
    the last window may be shorter."""
    if overlap is None or base_frames is None or latent_frames <= base_frames:
        return [Window(0, latent_frames, 0, 0, 0)]
    if not 0 < overlap < base_frames:
        raise SdcliError(f"the overlap of {overlap} latent frames must be fewer than the window's {base_frames}")
    stride = base_frames - overlap
    count = 1 + (latent_frames - base_frames - 1) // stride + 1
    windows, made = [Window(0, base_frames, 0, 0, 0)], base_frames
    for index in range(1, count):
        finished = index * stride + overlap
        frames = min(latent_frames - finished + overlap, base_frames)
        window = Window(index, frames, overlap - overlap % block, overlap, made - overlap)
        windows.append(window)
        made += window.new_frames
    assert made == latent_frames, (made, latent_frames)
    return windows


@dataclass(frozen=True)
class ForcingSchedule:
    """A window's denoising, one row per transformer call: ``progress`` (rows, blocks) is each block's position in
    the sampler's N steps (0: not started, k: at step k - 1 of 0 .. N - 1, N + 1: finished or given clean) and
    ``moves`` (rows, blocks) whether the block takes its step at that row."""

    progress: np.ndarray
    moves: np.ndarray
    steps: int

    @property
    def rows(self) -> int:
        return len(self.progress)

    def timesteps(self, row: int, step_timesteps: np.ndarray, block: int) -> np.ndarray:
        """(blocks * block,) float32: the timestep each frame is told at ``row``: its step's, 999 before its first,
        0 after its last."""
        table = np.concatenate([[NOT_STARTED_TIMESTEP], step_timesteps, [FINISHED_TIMESTEP]]).astype(np.float32)
        return np.repeat(table[self.progress[row]], block)


def forcing_schedule(blocks: int, steps: int, ar_step: int, ready_blocks: int = 0) -> ForcingSchedule:
    """The rows of diffusion forcing over ``blocks`` blocks, ``steps`` sampler steps each, block b lagging
    ``ar_step`` steps behind block b - 1 until that one is finished; the first ``ready_blocks`` are given clean
    (the prefix of a later window) and never move. Rows go on until every block has taken all its steps."""
    if ar_step < 0 or steps < 1 or blocks < 1 or not 0 <= ready_blocks <= blocks:
        raise SdcliError(f"no diffusion forcing schedule for {blocks} blocks, {steps} steps, ar_step {ar_step} and "
                         f"{ready_blocks} ready blocks")
    done = steps + 1
    previous = np.zeros(blocks, dtype=np.int64)
    previous[:ready_blocks] = done
    progress, moves = [], []
    while not np.all(previous >= steps):
        row = np.zeros(blocks, dtype=np.int64)
        for b in range(blocks):
            # a block moves on by itself when it is the first or the one before it has taken its last step
            row[b] = previous[b] + 1 if b == 0 or previous[b - 1] >= steps else row[b - 1] - ar_step
        row = np.clip(row, 0, done)
        moves.append((row != previous) & (row != done))
        progress.append(row)
        previous = row
    return ForcingSchedule(np.array(progress), np.array(moves), steps)


def frame_groups(schedule: ForcingSchedule, block: int) -> list[tuple[int, int]]:
    """[(first, stop)] latent-frame ranges of the blocks that move at the same rows (one sampler each): the
    runs of neighbouring blocks with the same progress in every row; given blocks, which never move, in none."""
    groups: list[tuple[int, int]] = []
    for b in range(schedule.progress.shape[1]):
        if not schedule.moves[:, b].any():
            continue
        if groups and groups[-1][1] == b * block and np.array_equal(schedule.progress[:, b],
                                                                  schedule.progress[:, b - 1]):
            groups[-1] = (groups[-1][0], (b + 1) * block)
        else:
            groups.append((b * block, (b + 1) * block))
    return groups


class SteppedSampler:
    """A flow sampler of ``plan`` (one model call per step) over latents ``x``, advanced a step at a time by a
    caller that computes the velocity itself.

    The plan's sampler is a generator over a denoiser D(x, sigma). At step i it asks D for the latents it yielded
    at step i - 1 (the starting ``x`` at step 0); here D answers with the velocity the caller hands to
    :meth:`step`, turned into x0 = x - sigma v by :class:`~sdcli.sampling.flow.FlowDenoiser` as on any other run.
    So each group of frames is sampled by the very code that samples a whole clip, history included.

    ``overwrite_start``: the first step's result is written into the starting array ``x`` (which the sampler must
    own), as diffusers' pipeline writes it into the view its schedulers keep (see the module docstring)."""

    def __init__(self, plan: FlowPlan, x: np.ndarray, overwrite_start: bool = True):
        self.x = x
        self._start = x if overwrite_start else None
        self._velocity: np.ndarray | None = None
        self._steps: Iterator[Step] = plan.sample(FlowDenoiser(self._network, plan), x)

    def _network(self, x: np.ndarray, _timesteps: np.ndarray) -> np.ndarray:
        velocity, self._velocity = self._velocity, None
        if velocity is None or velocity.shape != x.shape:
            raise AssertionError("the sampler asked for a velocity it was not given")
        return velocity

    def step(self, velocity: np.ndarray) -> Step:
        """Take the next step with ``velocity`` (like ``x``), the network's output at the current latents."""
        self._velocity = velocity
        try:
            step = next(self._steps)
        except StopIteration:
            raise SdcliError("the sampler has taken all its steps") from None
        self.x = step.x
        if self._start is not None:
            self._start[...] = step.x
            self._start = None
        return step


__all__ = ["FINISHED_TIMESTEP", "ForcingSchedule", "NOT_STARTED_TIMESTEP", "SteppedSampler", "Window",
           "forcing_schedule", "frame_groups", "plan_windows"]
