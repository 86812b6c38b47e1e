"""The few-step flow schedule of distilled causal video models (Self-Forcing, Huang et al. 2025; CausVid).

Each step predicts the clean latents x0 = x_t - sigma_t v from the model's velocity v, then noises x0 afresh to
the next level, x_next = (1 - sigma_next) x0 + sigma_next noise, with new seeded noise at every step (no ODE
solve: the student was trained to jump from any of its levels to x0). The last step's x0 is the chunk's result.

The levels come from the training schedule's table: ``train_steps`` sigmas from 1 down to 0 (the last left off),
shifted as ``shift s / (1 + (shift - 1) s)``, and their timesteps ``1000 sigma``. The denoising list names
timesteps on the unshifted scale (1000, 750, 500, 250); with ``warp`` each is looked up in the shifted table
(t -> table[1000 - t], so 1000, 937.5, 833.3, 625 at shift 5), as Self-Forcing's ``warp_denoising_step``. A
timestep handed to the model keeps its fraction; its sigma is the table's entry nearest it. Arithmetic in
float32, the sigma lookup and x0 in float64 rounded once, as the reference code.

After a chunk is finished, its keys and values go into the cache from one more call on x0 noised to
``context_noise`` (0: the clean latents).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import SdcliError

SELF_FORCING_STEPS = (1000, 750, 500, 250)
SELF_FORCING_SHIFT = 5.0


def flow_table(shift: float, train_steps: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, sigmas), each (train_steps,) float32: sigmas linspace(1, 0, train_steps + 1) without the last,
    shifted, and timesteps = sigmas * train_steps (a ``FlowMatchScheduler(shift, sigma_min=0,
    extra_one_step=True)`` at ``train_steps`` steps)."""
    sigmas = np.linspace(1.0, 0.0, train_steps + 1, dtype=np.float32)[:-1]
    shift32 = np.float32(shift)
    sigmas = shift32 * sigmas / (np.float32(1) + (shift32 - np.float32(1)) * sigmas)
    return (sigmas * np.float32(train_steps)).astype(np.float32), sigmas.astype(np.float32)


@dataclass(frozen=True)
class FewStepSchedule:
    """The timesteps a chunk is denoised at and the table their sigmas are looked up in."""

    timesteps: tuple[float, ...]  # what the model sees, one per step
    table_timesteps: np.ndarray  # (train_steps,)
    table_sigmas: np.ndarray
    context_noise: float = 0.0  # the timestep of the call that writes a finished chunk's cache

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def sigma(self, timestep: float) -> float:
        """The table's sigma at the timestep nearest ``timestep`` (the first on a tie), as float64."""
        index = int(np.argmin(np.abs(self.table_timesteps.astype(np.float64) - np.float64(timestep))))
        return float(self.table_sigmas[index])

    def to_x0(self, x: np.ndarray, velocity: np.ndarray, timestep: float) -> np.ndarray:
        """x0 = x_t - sigma_t v, in float64, rounded to float32 once."""
        return (x.astype(np.float64) - self.sigma(timestep) * velocity.astype(np.float64)).astype(np.float32)

    def noised(self, x0: np.ndarray, noise: np.ndarray, timestep: float) -> np.ndarray:
        """(1 - sigma) x0 + sigma noise at ``timestep`` (float32)."""
        sigma = np.float32(self.sigma(timestep))
        return ((np.float32(1) - sigma) * x0 + sigma * noise).astype(np.float32)


def few_step_schedule(steps: tuple[float, ...] = SELF_FORCING_STEPS, shift: float = SELF_FORCING_SHIFT, *,
                      warp: bool = True, train_steps: int = 1000, context_noise: float = 0.0) -> FewStepSchedule:
    """The schedule of ``steps`` (timesteps on the 0..train_steps scale, decreasing), one-line errors for lists
    it cannot take."""
    if not steps:
        raise SdcliError("the denoising list is empty")
    if shift <= 0 or not np.isfinite(shift):
        raise SdcliError(f"the flow shift must be a positive number, got {shift}")
    if any(not 0 < t <= train_steps for t in steps) or any(a <= b for a, b in zip(steps, steps[1:])):
        raise SdcliError(f"denoising timesteps must decrease within (0, {train_steps}], got {list(steps)}")
    if not 0 <= context_noise < train_steps:
        raise SdcliError(f"the context noise must be a timestep in [0, {train_steps}), got {context_noise}")
    timesteps, sigmas = flow_table(shift, train_steps)
    if warp:
        table = np.concatenate([timesteps, np.zeros(1, dtype=np.float32)])
        for t in steps:
            if t != int(t):
                raise SdcliError(f"a warped denoising list takes whole timesteps, got {t}")
        chosen = tuple(float(table[train_steps - int(t)]) for t in steps)
    else:
        chosen = tuple(float(np.float32(t)) for t in steps)
    return FewStepSchedule(chosen, timesteps, sigmas, float(context_noise))


__all__ = ["FewStepSchedule", "SELF_FORCING_SHIFT", "SELF_FORCING_STEPS", "few_step_schedule", "flow_table"]
