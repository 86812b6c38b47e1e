"""Turning a noise-prediction network into a denoiser D(x, sigma) -> x0, the one thing samplers call.

Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models" (Table 1, "VP" column):
a network trained on VP inputs x_vp = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps sees the VE state
x = x0 + sigma eps scaled by c_in = 1 / sqrt(sigma^2 + 1), and its output becomes an x0 estimate according to what
it was trained to predict: the noise eps (DDPM), the velocity v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0
(Salimans & Ho 2022, SD2's 768-v models) or x0 itself. The network is told the training timestep of sigma through
a ``TimestepMap``. Classifier-free guidance (Ho & Salimans 2022) wraps the network, not the denoiser, because
guidance rescaling (Lin et al. 2023) works on the network's output.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..config import PREDICTION_TYPES
from ..errors import SdcliError
from .schedules import fractional_timesteps

Network = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (x_in (B, C, h, w), timesteps (B,)) -> output
ConditionedNetwork = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]  # ... plus context (B, 77, D)
Model = Callable[[np.ndarray, float], np.ndarray]  # D(x, sigma) -> x0


def training_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """(T,) float32 sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), as ``NoiseSchedule.sigmas``."""
    alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float32)
    return np.sqrt((1 - alphas_cumprod) / alphas_cumprod)


class TimestepMap:
    """sigma -> the timestep the network is told.

    diffusers hands the UNet each scheduler's own timesteps: integers for DDIM, PNDM, DDPM, LCM and DPM-Solver
    (rounded from the log-sigma interpolation when the sigmas are Karras'), fractional linspace values for Euler
    and Heun. So the exact (sigma, timestep) pairs of the run's plan are looked up first; any other sigma gets
    the fractional timestep of log-sigma interpolation over the training sigmas (k-diffusion's ``sigma_to_t``).
    """

    def __init__(self, training_sigmas: np.ndarray, sigmas: np.ndarray = (), timesteps: np.ndarray = ()):
        self.training_sigmas = np.asarray(training_sigmas, dtype=np.float32)
        self.pairs = {float(np.float32(s)): float(t) for s, t in zip(sigmas, timesteps)}

    def __call__(self, sigma: float) -> float:
        key = float(np.float32(sigma))
        if key in self.pairs:
            return self.pairs[key]
        return float(fractional_timesteps(np.array([key]), self.training_sigmas)[0])


class Denoiser:
    """D(x, sigma) -> x0 for a network trained in the VP parametrisation.

    ``network(x_in, timesteps)`` gets x_in = x / sqrt(sigma^2 + 1) (B, C, h, w) and timesteps (B,) float32.
    Its output becomes x0 in float32 in the order diffusers' Euler scheduler computes it:
    epsilon: x - sigma * out; v_prediction: out * (-sigma / sqrt(sigma^2 + 1)) + x / (sigma^2 + 1);
    sample: out.
    """

    def __init__(self, network: Network, alphas_cumprod: np.ndarray, prediction_type: str = "epsilon",
                 timestep_map: TimestepMap | None = None):
        if prediction_type not in PREDICTION_TYPES:
            raise SdcliError(f"unknown prediction type {prediction_type!r}; "
                             f"choose one of: {', '.join(PREDICTION_TYPES)}")
        self.network = network
        self.prediction_type = prediction_type
        self.timestep_map = timestep_map or TimestepMap(training_sigmas(alphas_cumprod))

    def __call__(self, x: np.ndarray, sigma: float) -> np.ndarray:
        sigma = np.float32(sigma)
        scale = np.sqrt(sigma * sigma + np.float32(1))  # 1 / c_in
        timesteps = np.full((x.shape[0],), self.timestep_map(sigma), dtype=np.float32)  # (B,)
        out = self.network(x / scale, timesteps)
        if self.prediction_type == "epsilon":
            return x - sigma * out
        if self.prediction_type == "v_prediction":
            return out * (-sigma / scale) + x / (sigma * sigma + np.float32(1))
        return out


class LCMDenoiser:
    """The consistency-model boundary condition of Latent Consistency Models around a denoiser.

    Luo et al. 2023, "Latent Consistency Models" (eq. 4, after Song et al. 2023): f(x, t) = c_skip(t) x_vp +
    c_out(t) x0(x, t) with c_skip = sigma_data^2 / ((s t)^2 + sigma_data^2), c_out = s t / sqrt((s t)^2 +
    sigma_data^2), sigma_data = 0.5 and s the ``timestep_scaling`` (10), t the integer timestep: diffusers'
    ``LCMScheduler.get_scalings_for_boundary_condition_discrete``. x_vp = x / sqrt(1 + sigma^2), so the result is
    an x0 estimate like any denoiser's.
    """

    sigma_data = 0.5

    def __init__(self, denoiser: Model, timestep_map: TimestepMap, timestep_scaling: float = 10.0):
        self.denoiser = denoiser
        self.timestep_map = timestep_map
        self.timestep_scaling = timestep_scaling

    def scalings(self, sigma: float) -> tuple[np.float32, np.float32]:
        """(c_skip, c_out) at ``sigma``'s timestep, in float32 as diffusers computes them."""
        scaled = np.float32(self.timestep_map(sigma)) * np.float32(self.timestep_scaling)
        data2 = np.float32(self.sigma_data ** 2)
        return data2 / (scaled * scaled + data2), scaled / np.sqrt(scaled * scaled + data2)

    def __call__(self, x: np.ndarray, sigma: float) -> np.ndarray:
        c_skip, c_out = self.scalings(sigma)
        denoised = self.denoiser(x, sigma)
        x_vp = x / np.sqrt(np.float32(sigma) ** 2 + np.float32(1))
        return c_out * denoised + c_skip * x_vp


def guided_network(network: ConditionedNetwork, context: np.ndarray, uncond_context: np.ndarray | None,
                   guidance_scale: float, guidance_rescale: float = 0.0) -> Network:
    """Classifier-free guidance (Ho & Salimans 2022) as a network: (x_in, timesteps) -> guided output.

    ``network(x_in, timesteps, context)``. With ``guidance_scale`` > 1 the network runs once on the batch
    [uncond, cond] (2B) and the result is uncond + scale * (cond - uncond), as diffusers'
    StableDiffusionPipeline does; ``guidance_rescale`` > 0 then mixes in the guided output rescaled to the
    conditional output's standard deviation (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps
    are Flawed", eq. 15-16; diffusers' ``rescale_noise_cfg``: per-item unbiased std over all other axes).
    A scale <= 1 is no guidance in diffusers: the conditional batch alone.
    """
    if guidance_scale <= 1:
        return lambda x_in, timesteps: network(x_in, timesteps, context)
    if uncond_context is None:
        raise SdcliError("classifier-free guidance needs the unconditional (negative prompt) context")
    both_contexts = np.concatenate([uncond_context, context])  # (2B, 77, D)
    scale = np.float32(guidance_scale)
    rescale = np.float32(guidance_rescale)

    def guided(x_in: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
        out = network(np.concatenate([x_in, x_in]), np.concatenate([timesteps, timesteps]), both_contexts)
        uncond, cond = np.split(out, 2)  # (B, C, h, w) each
        guided_out = uncond + scale * (cond - uncond)
        if guidance_rescale > 0:
            axes = tuple(range(1, out.ndim))
            std_cond = cond.std(axis=axes, keepdims=True, ddof=1)  # (B, 1, 1, 1)
            std_guided = guided_out.std(axis=axes, keepdims=True, ddof=1)
            guided_out = rescale * (guided_out * (std_cond / std_guided)) + (1 - rescale) * guided_out
        return guided_out

    return guided
