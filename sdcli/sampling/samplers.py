"""Samplers over a denoiser D(x, sigma) -> x0, in the VE form of Karras et al. 2022 (x = x0 + sigma * eps).

Each sampler is a generator ``sample_NAME(model, x, sigmas, *, noise_sampler=None, **options)`` that yields one
``Step`` per step; the last ``Step.x`` is the result. ``sigmas`` (N + 1,) descend to the final sigma (0, or the
sigma of ``final_alpha_cumprod`` for DDIM and PNDM). Stochastic samplers draw unit Gaussian noise from
``noise_sampler(sigma, sigma_next)``. Vocabulary as in k-diffusion's sampling.py: ``d`` = (x - denoised) / sigma
is the eps estimate (dx/dsigma of the probability-flow ODE), ``dt`` a sigma difference.

A caller may replace the latents between steps: ``sampler.send(x)`` after a ``Step`` (instead of ``next``) makes
the next step start from ``x``, as a diffusers pipeline hands ``scheduler.step`` latents it has changed (the
inpainting blend of the known region). A sampler's history (earlier denoised estimates) stays its own.

Every sampler equals its diffusers scheduler step for step once VP latents are written x_vp = x / sqrt(1 +
sigma^2); the docstrings say which and why, and tests/test_samplers.py checks it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np

from ..errors import SdcliError

Model = Callable[[np.ndarray, float], np.ndarray]
NoiseSampler = Callable[[float, float], np.ndarray]


@dataclass(frozen=True)
class Step:
    """One finished step: ``x`` (VE latents at ``sigma_next``) and the model's x0 estimate at ``sigma``."""

    index: int
    sigma: float
    sigma_next: float
    x: np.ndarray
    denoised: np.ndarray


def steps_with(sampler: Iterator[Step], after_step: Callable[[int, np.ndarray], np.ndarray] | None) -> Iterator[Step]:
    """``sampler``'s steps, each step's latents replaced by ``after_step(index, x)`` and handed back to the sampler
    (``send``), which continues from them; the steps as they are when ``after_step`` is None."""
    if after_step is None:
        yield from sampler
        return
    try:
        step = next(sampler)
        while True:
            step = replace(step, x=after_step(step.index, step.x))
            yield step
            step = sampler.send(step.x)
    except StopIteration:
        return


def _float32_sigmas(sigmas: Sequence[float]) -> np.ndarray:
    return np.asarray(sigmas, dtype=np.float32)


def _require_noise(noise_sampler: NoiseSampler | None, name: str) -> NoiseSampler:
    if noise_sampler is None:
        raise ValueError(f"{name} is stochastic: pass a noise_sampler(sigma, sigma_next)")
    return noise_sampler


def ancestral_step(sigma: np.float32, sigma_next: np.float32, eta: float = 1.0) -> tuple[np.float32, np.float32]:
    """(sigma_down, sigma_up): a step to sigma_next split into a deterministic step to sigma_down and fresh noise
    of std sigma_up, sigma_down^2 + sigma_up^2 = sigma_next^2 (k-diffusion's ``get_ancestral_step``); float32 in
    the order diffusers' Euler ancestral scheduler computes it."""
    if eta == 0 or sigma_next == 0:
        return sigma_next, np.float32(0)
    sigma_up = np.float32(eta) * np.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2)
    sigma_up = min(sigma_up, sigma_next)
    return np.sqrt(sigma_next ** 2 - sigma_up ** 2), sigma_up


def sample_euler(model: Model, x: np.ndarray, sigmas: Sequence[float], *,
                 noise_sampler: NoiseSampler | None = None) -> Iterator[Step]:
    """Euler's method on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022,
    Alg. 2 without churn); diffusers' ``EulerDiscreteScheduler``."""
    sigmas = _float32_sigmas(sigmas)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        d = (x - denoised) / sigma
        x = x + d * (sigma_next - sigma)
        replaced = yield Step(i, float(sigma), float(sigma_next), x, denoised)
        if replaced is not None:
            x = replaced


def sample_euler_ancestral(model: Model, x: np.ndarray, sigmas: Sequence[float], *, eta: float = 1.0,
                           noise_sampler: NoiseSampler | None = None) -> Iterator[Step]:
    """Ancestral sampling with Euler steps: an Euler step down to sigma_down, then noise up to sigma_next
    (k-diffusion's ``sample_euler_ancestral``); diffusers' ``EulerAncestralDiscreteScheduler`` at eta = 1.

    It is also DDIM with ``eta`` (Song et al. 2021, eq. 12: the noise std eta * sigma_t of the paper, divided by
    sqrt(alpha_bar_prev), is sigma_up here) and DDPM's ancestral step (eta = 1); see ``sample_ddim`` and
    ``sample_ddpm``. Noise is drawn only where sigma_up > 0.
    """
    sigmas = _float32_sigmas(sigmas)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        d = (x - denoised) / sigma
        x = x + d * (sigma_down - sigma)
        if sigma_up > 0:
            noise = _require_noise(noise_sampler, "ancestral sampling")(float(sigma), float(sigma_next))
            x = x + noise * sigma_up
        replaced = yield Step(i, float(sigma), float(sigma_next), x, denoised)
        if replaced is not None:
            x = replaced


def sample_ddim(model: Model, x: np.ndarray, sigmas: Sequence[float], *, eta: float = 0.0,
                noise_sampler: NoiseSampler | None = None, targets: Sequence[float] | None = None) -> Iterator[Step]:
    """DDIM (Song, Meng & Ermon 2021, eq. 12); diffusers' ``DDIMScheduler``.

    Divided by sqrt(alpha_bar_prev), the update sqrt(alpha_bar_prev) x0 + sqrt(1 - alpha_bar_prev -
    std^2) eps + std noise reads x0 + sigma_down * eps + sigma_up * noise: with eta = 0 an Euler step of the
    probability-flow ODE (Karras et al. 2022, sec. 3), with eta > 0 the ancestral step. ``sigmas`` end at the
    sigma of ``final_alpha_cumprod``.

    ``targets`` (see ``plan_ddim``): step i ends at the noise level ``targets[i]`` instead of ``sigmas[i + 1]``,
    and its VP latents x / sqrt(1 + target^2) are taken as they are at the next sigma, as diffusers does.
    """
    if targets is None:
        inner = sample_euler(model, x, sigmas) if eta == 0 else \
            sample_euler_ancestral(model, x, sigmas, eta=eta, noise_sampler=noise_sampler)
        yield from inner
        return
    sigmas = _float32_sigmas(sigmas)
    for i in range(len(sigmas) - 1):
        sigma, target, sigma_next = sigmas[i], np.float32(targets[i]), sigmas[i + 1]
        step = next(sample_euler_ancestral(model, x, [sigma, target], eta=eta, noise_sampler=noise_sampler)) \
            if eta else next(sample_euler(model, x, [sigma, target]))
        x = step.x
        if target != sigma_next:  # the same VP latents, at the next sigma
            x = x * (np.sqrt(np.float32(1) + sigma_next * sigma_next) / np.sqrt(np.float32(1) + target * target))
        replaced = yield Step(i, float(sigma), float(sigma_next), x, step.denoised)
        if replaced is not None:
            x = replaced


def sample_ddpm(model: Model, x: np.ndarray, sigmas: Sequence[float], *,
                noise_sampler: NoiseSampler | None = None) -> Iterator[Step]:
    """DDPM ancestral sampling (Ho et al. 2020, eq. 6-7) with the "fixed_small" posterior variance
    (1 - alpha_bar_prev) / (1 - alpha_bar_t) beta_t; diffusers' ``DDPMScheduler``.

    In VE form the posterior mean is x0 + (sigma_next / sigma)^2 (x - x0) = x0 + sigma_down * d and its std
    sigma_next * sqrt(1 - sigma_next^2 / sigma^2) = sigma_up at eta = 1: the ancestral Euler step. The last step
    goes to sigma 0 (diffusers' alpha_bar = 1) without noise.
    """
    yield from sample_euler_ancestral(model, x, sigmas, eta=1.0, noise_sampler=noise_sampler)


def sample_heun(model: Model, x: np.ndarray, sigmas: Sequence[float], *,
                noise_sampler: NoiseSampler | None = None) -> Iterator[Step]:
    """Heun's second-order method (Karras et al. 2022, Alg. 2 without churn): an Euler step, then the average of
    the slopes at both ends; the step to sigma 0 stays Euler. 2N - 1 model calls; diffusers'
    ``HeunDiscreteScheduler``."""
    sigmas = _float32_sigmas(sigmas)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        d = (x - denoised) / sigma
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigma_next)
            d_2 = (x_2 - denoised_2) / sigma_next
            x = x + (d + d_2) / 2 * dt
        replaced = yield Step(i, float(sigma), float(sigma_next), x, denoised)
        if replaced is not None:
            x = replaced


def sample_dpmpp_2m(model: Model, x: np.ndarray, sigmas: Sequence[float], *,
                    noise_sampler: NoiseSampler | None = None,
                    alphas: Sequence[float] | None = None) -> Iterator[Step]:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2): the multistep second-order exponential
    integrator in data prediction, with t = -log(sigma) (the half log-SNR lambda) and h = t_next - t.

    The first step and the step to sigma 0 are first order (DDIM). diffusers' ``DPMSolverMultistepScheduler``
    (dpmsolver++, solver_order 2, midpoint, final_sigmas_type "zero"): dividing its update by alpha_t leaves
    x_next = sigma_next / sigma x - expm1(-h) ((1 + 1/(2r)) denoised - 1/(2r) old_denoised), r = h_last / h.
    The scalar coefficients are computed in float64.

    ``alphas`` (N + 1,) are the signal scales of latents written x = alpha x0 + sigma eps, for another
    parametrisation than VE (None: alpha = 1). Then lambda = log(alpha / sigma) and the update is the paper's,
    x_next = sigma_next / sigma x - alpha_next expm1(-h) (...); flow matching passes alpha = 1 - sigma
    (``flow.sample_flow_dpmpp_2m``).
    """
    sigmas = _float32_sigmas(sigmas)
    alphas = np.ones(len(sigmas)) if alphas is None else np.asarray(alphas, dtype=np.float64)
    old_denoised = None
    h_last = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            t, t_next = half_log_snr(alphas[i], sigma), half_log_snr(alphas[i + 1], sigma_next)
            h = t_next - t
            if old_denoised is None:
                denoised_d = denoised
            else:
                r = h_last / h
                denoised_d = np.float32(1 + 1 / (2 * r)) * denoised - np.float32(1 / (2 * r)) * old_denoised
            x = np.float32(sigma_next / np.float64(sigma)) * x - np.float32(alphas[i + 1] * np.expm1(-h)) * denoised_d
            h_last = h
        old_denoised = denoised
        replaced = yield Step(i, float(sigma), float(sigma_next), x, denoised)
        if replaced is not None:
            x = replaced


def half_log_snr(alpha: float, sigma: float) -> float:
    """lambda = log(alpha / sigma) in float64, as log(alpha) - log(sigma) (exactly -log(sigma) at alpha = 1);
    -inf at alpha = 0 (pure noise), +inf at sigma = 0."""
    alpha, sigma = float(alpha), float(sigma)
    if sigma == 0:
        return math.inf
    if alpha == 0:
        return -math.inf
    return math.log(alpha) - math.log(sigma)


# Adams-Bashforth weights on the eps history, newest first, as (numerators, denominator) (Liu et al. 2022,
# eq. 12 and its lower orders).
ADAMS_BASHFORTH = {1: ((1,), 1), 2: ((3, -1), 2), 3: ((23, -16, 5), 12), 4: ((55, -59, 37, -9), 24)}


def sample_plms(model: Model, x: np.ndarray, sigmas: Sequence[float], *, noise_sampler: NoiseSampler | None = None,
                combine: str = "eps") -> Iterator[Step]:
    """PLMS, the pseudo linear multistep method of PNDM (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion
    Models on Manifolds", eq. 12), with the Runge-Kutta warm-up skipped as Stable Diffusion ships it.

    The pseudo step x_next = x + eps * (sigma_next - sigma) is PNDM's transfer function phi (the DDIM step) in
    VE form. Like diffusers' ``PNDMScheduler`` with ``skip_prk_steps``: the first step takes an Euler step, calls
    the model there and redoes the step with the mean of both outputs (a Heun step; the second output is then
    dropped); the next steps combine the outputs of the last 2, 3, then 4 steps with Adams-Bashforth weights.
    N + 1 model calls.

    ``combine`` says which output is averaged and extrapolated: "eps" (the paper), or "v", which reproduces
    diffusers for v-prediction models: it combines the network's raw v outputs and converts the result to eps
    with the current step's x and sigma (eps = c v + sigma c^2 x, c = 1 / sqrt(1 + sigma^2)).
    """
    if combine not in ("eps", "v"):
        raise SdcliError(f"PLMS combines eps or v outputs, not {combine!r}")
    sigmas = _float32_sigmas(sigmas)
    steps = len(sigmas) - 1
    history: list[np.ndarray] = []  # newest first
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        dt = sigma_next - sigma
        denoised = model(x, sigma)
        history = [_plms_output(x, denoised, sigma, combine), *history[:3]]
        if i == 0 and steps > 1:
            x_2 = x + _plms_eps(x, history[0], sigma, combine) * dt
            output_2 = _plms_output(x_2, model(x_2, sigma_next), sigma_next, combine)
            output = (history[0] + output_2) / 2
        else:
            numerators, denominator = ADAMS_BASHFORTH[len(history)]
            output = sum(np.float32(n) * h for n, h in zip(numerators, history)) / np.float32(denominator)
        x = x + _plms_eps(x, output, sigma, combine) * dt
        replaced = yield Step(i, float(sigma), float(sigma_next), x, denoised)
        if replaced is not None:
            x = replaced


def _plms_output(x: np.ndarray, denoised: np.ndarray, sigma: np.float32, combine: str) -> np.ndarray:
    """eps = (x - x0) / sigma, or v = c (eps - sigma x0) (Salimans & Ho 2022) in VE terms."""
    eps = (x - denoised) / sigma
    if combine == "eps":
        return eps
    c = np.float32(1) / np.sqrt(sigma * sigma + np.float32(1))
    return c * (eps - sigma * denoised)


def _plms_eps(x: np.ndarray, output: np.ndarray, sigma: np.float32, combine: str) -> np.ndarray:
    if combine == "eps":
        return output
    c = np.float32(1) / np.sqrt(sigma * sigma + np.float32(1))
    return c * output + (sigma * c * c) * x


def sample_lcm(model: Model, x: np.ndarray, sigmas: Sequence[float], *,
               noise_sampler: NoiseSampler | None = None) -> Iterator[Step]:
    """Latent Consistency Model multistep sampling (Luo et al. 2023, Alg. 1): jump to the consistency function's
    x0 estimate, then noise it afresh to sigma_next; the last step returns the estimate. ``model`` must carry the
    LCM boundary condition (``denoisers.LCMDenoiser``). diffusers' ``LCMScheduler``."""
    sigmas = _float32_sigmas(sigmas)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        x = denoised
        if sigma_next > 0:
            x = denoised + _require_noise(noise_sampler, "LCM")(float(sigma), float(sigma_next)) * sigma_next
        replaced = yield Step(i, float(sigma), float(sigma_next), x, denoised)
        if replaced is not None:
            x = replaced
