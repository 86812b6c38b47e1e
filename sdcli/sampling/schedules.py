"""Noise schedules: betas, alphas_cumprod, sigmas, and the inference timestep spacings.

Follows the DDPM training schedule (Ho et al. 2020) in the variants Stable Diffusion uses, with diffusers'
float32 arithmetic so that the tables agree with its schedulers to float32 precision:

- ``linear``: betas evenly spaced from ``beta_start`` to ``beta_end``;
- ``scaled_linear``: the square roots evenly spaced, then squared (SD1.x and SD2.x);
- ``squaredcos_cap_v2``: the cosine schedule of Nichol & Dhariwal 2021, each beta capped at 0.999.

Inference timesteps follow "Common Diffusion Noise Schedules and Sample Steps are Flawed" (Lin et al. 2023,
Table 2): ``leading`` (with ``steps_offset``), ``trailing`` and ``linspace``. Karras et al. 2022 (eq. 5) space the
sigmas themselves; ``fractional_timesteps`` maps such sigmas back onto the training timesteps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..config import SchedulerConfig, TIMESTEP_SPACINGS
from ..errors import SdcliError

MAX_BETA = 0.999


def make_betas(config: SchedulerConfig) -> np.ndarray:
    """(T,) float32 betas of the training schedule."""
    steps = config.num_train_timesteps
    if config.beta_schedule == "linear":
        return _linspace_float32(config.beta_start, config.beta_end, steps)
    if config.beta_schedule == "scaled_linear":
        roots = _linspace_float32(config.beta_start ** 0.5, config.beta_end ** 0.5, steps)
        return roots * roots
    return _cosine_betas(steps)


def _linspace_float32(start: float, end: float, steps: int) -> np.ndarray:
    """(steps,) float32 evenly spaced values rounded as torch.linspace(dtype=float32) rounds them (diffusers
    builds its betas with it): a float32 step, the first half counted up from ``start``, the second down from
    ``end``, each value rounded once (a fused multiply-add)."""
    start, end = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([start], dtype=np.float32)
    step = (end - start) / np.float32(steps - 1)
    i = np.arange(steps)
    up = np.float64(start) + np.float64(step) * i  # exact product, one rounding to float32 below
    down = np.float64(end) - np.float64(step) * (steps - 1 - i)
    return np.where(i < steps // 2, up, down).astype(np.float32)


def _cosine_betas(steps: int) -> np.ndarray:
    """Betas whose alpha_bar(t) follows cos^2 of (t + s) / (1 + s) * pi/2 with s = 0.008, capped at MAX_BETA."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), MAX_BETA) for i in range(steps)]
    return np.array(betas, dtype=np.float32)


@dataclass(frozen=True)
class NoiseSchedule:
    """The training schedule's tables, all (T,) float32, indexed by integer timestep t = 0 .. T-1."""

    betas: np.ndarray
    alphas: np.ndarray
    alphas_cumprod: np.ndarray
    final_alpha_cumprod: float  # alpha_bar "before" t = 0, used by DDIM's last step (1.0 with set_alpha_to_one)

    @classmethod
    def from_config(cls, config: SchedulerConfig) -> "NoiseSchedule":
        betas = make_betas(config)
        alphas = np.float32(1.0) - betas
        alphas_cumprod = np.cumprod(alphas, dtype=np.float64).astype(np.float32)  # torch accumulates in double
        final = 1.0 if config.set_alpha_to_one else float(alphas_cumprod[0])
        return cls(betas=betas, alphas=alphas, alphas_cumprod=alphas_cumprod, final_alpha_cumprod=final)

    @property
    def num_train_timesteps(self) -> int:
        return len(self.betas)

    @property
    def sigmas(self) -> np.ndarray:
        """(T,) noise-to-signal ratios sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) (the k-diffusion sigmas)."""
        return np.sqrt((1 - self.alphas_cumprod) / self.alphas_cumprod)

    def sigma_at(self, timesteps: np.ndarray) -> np.ndarray:
        """Sigmas at (possibly fractional) timesteps, linearly interpolated in t as diffusers' Euler does."""
        return np.interp(timesteps, np.arange(self.num_train_timesteps), self.sigmas).astype(np.float32)


def inference_timesteps(config: SchedulerConfig, steps: int, spacing: str | None = None) -> np.ndarray:
    """(steps,) int64 timesteps, from noisiest to cleanest, as diffusers' DDIM scheduler spaces them.

    ``spacing`` overrides ``config.timestep_spacing``. ``steps_offset`` applies to "leading" only.
    """
    spacing = spacing or config.timestep_spacing
    train_steps = config.num_train_timesteps
    if spacing not in TIMESTEP_SPACINGS:
        raise SdcliError(f"unknown timestep spacing {spacing!r}; choose one of: {', '.join(TIMESTEP_SPACINGS)}")
    if not 1 <= steps <= train_steps:
        raise SdcliError(f"steps must be between 1 and the {train_steps} training timesteps, got {steps}")
    if spacing == "linspace":
        return np.linspace(0, train_steps - 1, steps).round()[::-1].astype(np.int64)
    if spacing == "leading":
        step_ratio = train_steps // steps
        return (np.arange(steps) * step_ratio)[::-1].astype(np.int64) + config.steps_offset
    step_ratio = train_steps / steps  # trailing
    return np.round(np.arange(train_steps, 0, -step_ratio)).astype(np.int64) - 1


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """(steps,) float64 sigmas from ``sigma_max`` down to ``sigma_min``, evenly spaced in sigma^(1/rho).

    Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models", eq. 5 (rho = 7), in
    float64 as diffusers' ``use_karras_sigmas`` computes them; the caller appends the final sigma.
    """
    ramp = np.linspace(0, 1, steps)
    max_inv_rho = sigma_max ** (1 / rho)
    min_inv_rho = sigma_min ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def fractional_timesteps(sigmas: np.ndarray, training_sigmas: np.ndarray) -> np.ndarray:
    """Float64 timesteps t with sigma(t) = ``sigmas``, interpolating log sigma linearly between neighbouring
    training timesteps (k-diffusion's ``sigma_to_t``, diffusers' ``_sigma_to_t``); clamped to [0, T - 1].

    ``training_sigmas`` is the (T,) float32 table ``NoiseSchedule.sigmas``; its log is taken in float32 as
    diffusers does, so that the timesteps it hands the network agree to the last bit.
    """
    log_table = np.log(training_sigmas.astype(np.float32))  # (T,) ascending
    log_sigma = np.log(np.maximum(np.asarray(sigmas, dtype=np.float64), 1e-10))
    low_idx = np.clip(np.searchsorted(log_table, log_sigma, side="right") - 1, 0, len(log_table) - 2)
    high_idx = low_idx + 1
    low, high = log_table[low_idx], log_table[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return (1 - w) * low_idx + w * high_idx
