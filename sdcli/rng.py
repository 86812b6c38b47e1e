"""Seeded noise on the host: every backend sees the same numbers, whatever runs the networks.

Each image of a run has its own seed (the run's seed + its index, as AUTOMATIC1111 counts), and all of its noise,
the initial latents and the fresh noise that stochastic samplers add at every step, comes from a numpy Generator
seeded with it. So an image depends only on its own seed, never on the batch it was made in. Seeds do not reproduce
images made with torch's random generator; pass the initial noise explicitly (``--latents``) for that.
"""

from __future__ import annotations

import secrets
from typing import Callable

import numpy as np

from .params import MAX_SEED


def random_seed() -> int:
    """A fresh seed in 0 .. 2**32 - 1, for a run that did not ask for one."""
    return secrets.randbelow(MAX_SEED + 1)


def image_seeds(seed: int, count: int) -> list[int]:
    """The seeds of ``count`` images of a run started at ``seed``: seed, seed + 1, ... (wrapping at 2**32)."""
    return [(seed + i) % (MAX_SEED + 1) for i in range(count)]


class BatchNoise:
    """Unit Gaussian noise for a batch of images, one Generator per image.

    ``initial(shape)`` draws each image's starting latents first; ``__call__`` then serves the samplers'
    ``noise_sampler(sigma, sigma_next)`` from the same per-image streams.
    """

    def __init__(self, seeds: list[int], latent_shape: tuple[int, ...]):
        self.generators = [np.random.default_rng(seed) for seed in seeds]
        self.latent_shape = tuple(latent_shape)  # (C, h, w) of one image

    def draw(self, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """(B, C, h, w) float32: the next unit-variance draw of every image, of ``shape`` per image where given (a
        window of a video whose windows differ in length) instead of the latent shape."""
        shape = self.latent_shape if shape is None else tuple(shape)
        return np.stack([g.standard_normal(shape, dtype=np.float32) for g in self.generators])

    def __call__(self, sigma: float | None = None, sigma_next: float | None = None) -> np.ndarray:
        return self.draw()

    def permutation(self, index: int, count: int) -> np.ndarray:
        """A random order of 0 .. count - 1 from image ``index``'s stream."""
        return self.generators[index].permutation(count)


def shuffle_context_frames(latents: np.ndarray, length: int, stride: int,
                           permutation: Callable[[int], np.ndarray]) -> np.ndarray:
    """FreeNoise's noise rescheduling (Qiu et al. 2023; diffusers' ``noise_type="shuffle_context"``): video noise
    (B, C, F, h, w) whose frames from ``length`` on repeat earlier ones, ``stride`` frames at a time, each group a
    shuffle (``permutation(n)``, an order of 0 .. n - 1) of the group ``length`` frames before it, so that every
    context window starts from noise of the same frames. A new array."""
    latents = latents.copy()
    frames = latents.shape[2]
    for first in range(length, frames, stride):
        start = first - length
        count = min(frames, start + stride) - start
        order = np.arange(start, start + count)[permutation(count)]
        stop = min(frames, first + count)
        latents[:, :, first:stop] = latents[:, :, order[:stop - first]]
    return latents
