"""Sampler plans: the sigmas, timesteps and scalings of one run, and the table of samplers sdcli offers.

A plan is what a diffusers scheduler's ``set_timesteps`` and ``init_noise_sigma`` decide, written in the VE
parametrisation the samplers use (x = x0 + sigma eps, x_vp = x / sqrt(1 + sigma^2)). It is built from a model's
raw ``scheduler_config.json`` the way ``SchedulerClass.from_config(config, **options)`` builds the scheduler: the
class's constructor defaults, overlaid by the keys of the file that the class takes (others are ignored, as
diffusers ignores them), overlaid by the sampler's own options. A file that asks for behaviour sdcli does not
implement (thresholding, zero-terminal-SNR rescaling, ...) is refused by name rather than run differently.

DDIM and PNDM step from timestep t to t - T // N, diffusers' rule; with "leading" spacing (what SD1.x and SD2.x
use) that is the next timestep of the run. With "linspace", or "trailing" and N not dividing T, diffusers steps
to another timestep than the one it evaluates next (huggingface/diffusers issues 11347 and 12633, open); the
plan steps to the next evaluated timestep instead, as DDPMScheduler does, and keeps diffusers' rule for the
last step. Only there do sdcli's DDIM and PNDM differ from diffusers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..config import SchedulerConfig
from ..errors import SdcliError
from .denoisers import LCMDenoiser, Model, TimestepMap, training_sigmas
from .samplers import (sample_ddim, sample_ddpm, sample_dpmpp_2m, sample_euler, sample_euler_ancestral, sample_heun,
                       sample_lcm, sample_plms)
from .schedules import NoiseSchedule, fractional_timesteps, inference_timesteps, karras_sigmas
from .unipc import sample_unipc


@dataclass(frozen=True)
class SamplerPlan:
    """One run's schedule in VE form.

    - ``sigmas`` (N + 1,) float32, descending: the sampler's grid; the model is evaluated only at ``sigmas[:N]``.
    - ``timesteps`` (N,) float32: the timestep the network is told at ``sigmas[i]`` (see ``timestep_map``).
    - ``init_noise_sigma``: the initial VE x is unit_noise * init_noise_sigma, which reproduces diffusers'
      ``latents = noise * scheduler.init_noise_sigma``: sqrt(1 + sigma_0^2) for the VP schedulers (their
      init_noise_sigma is 1), diffusers' own value for Euler/Heun (sigma_max, or sqrt(sigma_max^2 + 1) with
      "leading" spacing, where diffusers starts off the VE scale).
    - ``final_scale``: last x times it is what diffusers hands the VAE (1 / sqrt(1 + sigma_last^2)).
    - ``prediction_type`` and ``alphas_cumprod`` (T,) of the training schedule, from the same config.
    - ``timestep_scaling``: the LCM boundary condition's, None for other samplers.
    - ``sampler_options``: keyword options of the sampler that come from the config.
    """

    sigmas: np.ndarray
    timesteps: np.ndarray
    init_noise_sigma: float
    final_scale: float
    prediction_type: str
    alphas_cumprod: np.ndarray
    timestep_scaling: float | None = None
    sampler_options: dict[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def timestep_map(self) -> TimestepMap:
        """sigma -> network timestep: this plan's pairs, log-sigma interpolation elsewhere."""
        return TimestepMap(training_sigmas(self.alphas_cumprod), self.sigmas[:len(self.timesteps)], self.timesteps)

    def from_step(self, start: int) -> SamplerPlan:
        """The plan's last N - ``start`` steps: the grid from ``sigmas[start]`` on (with DDIM's step ``targets``),
        what diffusers' image-to-image pipelines run after ``get_timesteps`` cuts ``scheduler.timesteps`` and
        ``set_begin_index`` starts the scheduler there. A fresh sampler starts its history there too, as the
        scheduler does (DPM++ 2M and UniPC begin with a first-order step, PLMS with its Heun step)."""
        if not 0 <= start < self.steps:
            raise ValueError(f"a plan of {self.steps} steps has no step {start}")
        options = dict(self.sampler_options)
        if "targets" in options:
            options["targets"] = tuple(options["targets"][start:])
        return replace(self, sigmas=self.sigmas[start:], timesteps=self.timesteps[start:], sampler_options=options)


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler sdcli offers: its generator, how to plan a run, and the diffusers scheduler it matches.

    ``label`` is AUTOMATIC1111's name for it. ``diffusers_options`` are the keyword arguments of
    ``diffusers_class.from_config(config, **options)`` that make the reference scheduler (and that the plan
    applies over the file). ``options`` names the sampler's user options (``eta``). ``wraps_denoiser(denoiser,
    plan)``, when set, puts the sampler's model wrapper around the denoiser (LCM's boundary condition).
    """

    name: str
    label: str
    sample: Callable
    planner: Callable[[dict[str, Any], NoiseSchedule, int], SamplerPlan]
    stochastic: bool
    diffusers_class: str
    diffusers_options: dict[str, Any] = field(default_factory=dict)
    options: tuple[str, ...] = ()
    wraps_denoiser: Callable | None = None
    default_steps: int | None = None

    def plan(self, scheduler_config: dict[str, Any], steps: int) -> SamplerPlan:
        """The plan for ``steps`` steps with a model's raw scheduler config (``scheduler_config.json``)."""
        config = resolve_config(self.diffusers_class, scheduler_config, self.diffusers_options)
        if steps < 1:
            raise SdcliError(f"steps must be at least 1, got {steps}")
        return self.planner(config, schedule_of(config), steps)


# -- diffusers' scheduler classes --------------------------------------------------------------------------------

# diffusers 0.42 constructor defaults of each class, for the keys sdcli reads or checks. The training schedule
# keys come first; Heun and LCM default to SD's betas, the others to DDPM's linear 1e-4 .. 2e-2.
_TRAINING = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
             "trained_betas": None, "prediction_type": "epsilon", "steps_offset": 0}
_SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012}
CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "DDIMScheduler": {**_TRAINING, "timestep_spacing": "leading", "set_alpha_to_one": True, "clip_sample": True,
                      "thresholding": False, "rescale_betas_zero_snr": False},
    "PNDMScheduler": {**_TRAINING, "timestep_spacing": "leading", "set_alpha_to_one": False,
                      "skip_prk_steps": False},
    "DDPMScheduler": {**_TRAINING, "timestep_spacing": "leading", "clip_sample": True, "thresholding": False,
                      "variance_type": "fixed_small", "rescale_betas_zero_snr": False},
    "EulerDiscreteScheduler": {**_TRAINING, "timestep_spacing": "linspace", "use_karras_sigmas": False,
                               "use_exponential_sigmas": False, "use_beta_sigmas": False,
                               "interpolation_type": "linear", "timestep_type": "discrete",
                               "final_sigmas_type": "zero", "rescale_betas_zero_snr": False},
    "EulerAncestralDiscreteScheduler": {**_TRAINING, "timestep_spacing": "linspace",
                                        "rescale_betas_zero_snr": False},
    "HeunDiscreteScheduler": {**_TRAINING, **_SD_BETAS, "timestep_spacing": "linspace", "clip_sample": False,
                              "use_karras_sigmas": False, "use_exponential_sigmas": False,
                              "use_beta_sigmas": False},
    "DPMSolverMultistepScheduler": {**_TRAINING, "timestep_spacing": "linspace", "solver_order": 2,
                                    "algorithm_type": "dpmsolver++", "solver_type": "midpoint",
                                    "thresholding": False, "use_karras_sigmas": False,
                                    "use_exponential_sigmas": False, "use_beta_sigmas": False,
                                    "use_lu_lambdas": False, "use_flow_sigmas": False, "final_sigmas_type": "zero",
                                    "lambda_min_clipped": -math.inf, "variance_type": None,
                                    "use_dynamic_shifting": False, "rescale_betas_zero_snr": False},
    "LCMScheduler": {**_TRAINING, **_SD_BETAS, "beta_schedule": "scaled_linear", "timestep_spacing": "leading",
                     "set_alpha_to_one": True, "original_inference_steps": 50, "timestep_scaling": 10.0,
                     "clip_sample": False, "thresholding": False, "rescale_betas_zero_snr": False},
    "UniPCMultistepScheduler": {**_TRAINING, "timestep_spacing": "linspace", "solver_order": 2,
                                "solver_type": "bh2", "predict_x0": True, "lower_order_final": True,
                                "disable_corrector": [], "solver_p": None, "thresholding": False,
                                "use_karras_sigmas": False, "use_exponential_sigmas": False,
                                "use_beta_sigmas": False, "use_flow_sigmas": False, "final_sigmas_type": "zero",
                                "use_dynamic_shifting": False, "rescale_betas_zero_snr": False},
}
# Options whose other values change the maths into something sdcli does not implement (checked where the
# class takes the key). DDIM and DDPM default to clip_sample=True (pixel-space models); latent models set False.
REQUIRED = {"trained_betas": None, "clip_sample": False, "thresholding": False, "rescale_betas_zero_snr": False,
            "skip_prk_steps": True, "use_karras_sigmas": False, "use_exponential_sigmas": False,
            "use_beta_sigmas": False, "use_lu_lambdas": False, "use_flow_sigmas": False,
            "use_dynamic_shifting": False, "interpolation_type": "linear", "timestep_type": "discrete",
            "final_sigmas_type": "zero", "lambda_min_clipped": -math.inf, "algorithm_type": "dpmsolver++",
            "predict_x0": True, "solver_p": None}
REQUIRED_BY_CLASS = {
    "DDPMScheduler": {"variance_type": "fixed_small"},
    "DPMSolverMultistepScheduler": {"solver_order": 2, "solver_type": "midpoint", "variance_type": None},
}
# Options a class's planner implements beyond its defaults (the Karras sigmas of DPM-Solver++).
IMPLEMENTED = {"DPMSolverMultistepScheduler": {"use_karras_sigmas"}}


def resolve_config(class_name: str, raw: dict[str, Any], options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The settings ``class_name.from_config(raw, **options)`` runs with, for the keys sdcli knows; refuses the
    ones it does not implement."""
    defaults = CLASS_DEFAULTS[class_name]
    config = {**defaults, **{k: v for k, v in raw.items() if k in defaults}, **(options or {})}
    required = {**REQUIRED, **REQUIRED_BY_CLASS.get(class_name, {})}
    for key, value in required.items():
        if key in config and key not in IMPLEMENTED.get(class_name, ()) and config[key] != value:
            raise SdcliError(f"scheduler config: {key}={config[key]!r} is not supported with "
                             f"{class_name} (sdcli implements {key}={value!r})")
    return config


def schedule_of(config: dict[str, Any]) -> NoiseSchedule:
    """The training noise schedule of a resolved config."""
    return NoiseSchedule.from_config(_scheduler_config(config))


def _scheduler_config(config: dict[str, Any]) -> SchedulerConfig:
    return SchedulerConfig(num_train_timesteps=config["num_train_timesteps"], beta_start=config["beta_start"],
                           beta_end=config["beta_end"], beta_schedule=config["beta_schedule"],
                           prediction_type=config["prediction_type"], steps_offset=config["steps_offset"],
                           timestep_spacing=config["timestep_spacing"],
                           set_alpha_to_one=config.get("set_alpha_to_one", False))


def _sigma_of_alpha(alpha_cumprod: float) -> float:
    return float(np.sqrt((np.float32(1) - np.float32(alpha_cumprod)) / np.float32(alpha_cumprod)))


def _vp_plan(config, schedule, sigmas, timesteps, **extra) -> SamplerPlan:
    """A plan for a scheduler in VP space: initial noise scaled by 1, latents handed over at the last sigma."""
    sigmas = np.asarray(sigmas, dtype=np.float32)
    first, last = np.float32(sigmas[0]), np.float32(sigmas[-1])
    return SamplerPlan(sigmas=sigmas, timesteps=np.asarray(timesteps, dtype=np.float32),
                       init_noise_sigma=float(np.sqrt(np.float32(1) + first * first)),
                       final_scale=float(np.float32(1) / np.sqrt(np.float32(1) + last * last)),
                       prediction_type=config["prediction_type"], alphas_cumprod=schedule.alphas_cumprod, **extra)


# -- planners: (resolved config, training schedule, steps) -> plan ------------------------------------------------

def plan_ddim(config, schedule: NoiseSchedule, steps: int) -> SamplerPlan:
    """DDIM and PNDM: integer timesteps of the config's spacing; after the last, t - T // N or, below 0,
    ``final_alpha_cumprod`` (``set_alpha_to_one``).

    diffusers' DDIMScheduler steps from t to the noise level of t - T // N whatever the spacing, and hands the
    result to the next timestep as it is. With "leading" spacing that is the next timestep; with "linspace" or
    "trailing" (AnimateDiff's DDIM settings) it is not, and the plan's ``targets`` then give each step's own end
    (see ``sample_ddim``)."""
    timesteps = inference_timesteps(_scheduler_config(config), steps)
    previous = timesteps - config["num_train_timesteps"] // steps
    final_sigma = _sigma_of_alpha(schedule.final_alpha_cumprod)
    targets = [float(schedule.sigmas[t]) if t >= 0 else final_sigma for t in previous]
    sigmas = [*schedule.sigmas[timesteps], targets[-1]]
    plan = _vp_plan(config, schedule, sigmas, timesteps)
    if any(np.float32(target) != next_sigma for target, next_sigma in zip(targets[:-1], plan.sigmas[1:-1])):
        plan = replace(plan, sampler_options={"targets": tuple(targets)})
    return plan


def plan_pndm(config, schedule: NoiseSchedule, steps: int) -> SamplerPlan:
    """PNDM: DDIM's grid; for v-prediction models PLMS combines v outputs, as diffusers' PNDMScheduler does."""
    plan = replace(plan_ddim(config, schedule, steps), sampler_options={})  # PLMS steps on DDIM's grid
    if config["prediction_type"] == "v_prediction":
        plan = replace(plan, sampler_options={"combine": "v"})
    return plan


def plan_ddpm(config, schedule: NoiseSchedule, steps: int) -> SamplerPlan:
    """DDPM: integer timesteps of the config's spacing, the last step to alpha_bar = 1 (sigma 0)."""
    timesteps = inference_timesteps(_scheduler_config(config), steps)
    return _vp_plan(config, schedule, [*schedule.sigmas[timesteps], 0.0], timesteps)


def plan_multistep(config, schedule: NoiseSchedule, steps: int) -> SamplerPlan:
    """DPM-Solver and UniPC: N of N + 1 evenly spaced integer timesteps ("linspace", "leading"; "trailing" spaces
    N), or Karras sigmas (rho 7 between the training sigma_min and sigma_max) with the timesteps of log-sigma
    interpolation rounded (except for the cosine schedule); the last step goes to sigma 0."""
    if config.get("use_karras_sigmas"):
        sigmas = karras_sigmas(steps, float(schedule.sigmas[0]), float(schedule.sigmas[-1]))
        timesteps = fractional_timesteps(sigmas, schedule.sigmas)
        if config["beta_schedule"] != "squaredcos_cap_v2":
            timesteps = timesteps.round()
    else:
        scheduler_config = _scheduler_config(config)
        if scheduler_config.timestep_spacing == "trailing":
            timesteps = inference_timesteps(scheduler_config, steps)
        else:
            timesteps = inference_timesteps(scheduler_config, steps + 1)[:-1]
        sigmas = schedule.sigmas[timesteps]
    options = {}
    if "predict_x0" in config:  # UniPC's own options
        options = {"order": config["solver_order"], "solver_type": config["solver_type"],
                   "lower_order_final": config["lower_order_final"],
                   "disable_corrector": tuple(config["disable_corrector"])}
    return _vp_plan(config, schedule, [*sigmas, 0.0], timesteps, sampler_options=options)


def plan_lcm(config, schedule: NoiseSchedule, steps: int) -> SamplerPlan:
    """LCM: N timesteps picked evenly from the ``original_inference_steps`` of distillation (every T // 50th:
    999, 979, ...), the last step to the x0 estimate (sigma 0)."""
    original = config["original_inference_steps"]
    if not 1 <= steps <= original:
        raise SdcliError(f"LCM takes between 1 and {original} steps (its original_inference_steps), got {steps}")
    skip = config["num_train_timesteps"] // original
    distilled = (np.arange(1, original + 1) * skip - 1)[::-1]  # (original,) 999, 979, ...
    timesteps = distilled[np.floor(np.linspace(0, original, num=steps, endpoint=False)).astype(np.int64)]
    return _vp_plan(config, schedule, [*schedule.sigmas[timesteps], 0.0], timesteps,
                    timestep_scaling=float(config["timestep_scaling"]))


def plan_euler(config, schedule: NoiseSchedule, steps: int) -> SamplerPlan:
    """Euler, Euler ancestral and Heun (diffusers' VE schedulers): float32 timesteps ("linspace" unrounded),
    sigmas interpolated linearly in t, then 0. diffusers starts from init_noise_sigma = sigma_max, or
    sqrt(sigma_max^2 + 1) with "leading" spacing, and decodes its latents as they are."""
    scheduler_config = _scheduler_config(config)
    if scheduler_config.timestep_spacing == "linspace":
        train = scheduler_config.num_train_timesteps
        if steps > train:
            raise SdcliError(f"steps must be between 1 and the {train} training timesteps, got {steps}")
        timesteps = np.linspace(0, train - 1, steps, dtype=np.float32)[::-1].copy()
    else:
        timesteps = inference_timesteps(scheduler_config, steps).astype(np.float32)
    sigmas = np.append(schedule.sigma_at(timesteps), np.float32(0))
    sigma_max = np.float32(sigmas.max())
    init = sigma_max if scheduler_config.timestep_spacing != "leading" else np.sqrt(sigma_max ** 2 + np.float32(1))
    return SamplerPlan(sigmas=sigmas, timesteps=timesteps, init_noise_sigma=float(init), final_scale=1.0,
                       prediction_type=config["prediction_type"], alphas_cumprod=schedule.alphas_cumprod)


def lcm_denoiser(denoiser: Model, plan: SamplerPlan) -> LCMDenoiser:
    """``denoiser`` under the LCM boundary condition with the plan's timestep map and scaling."""
    return LCMDenoiser(denoiser, plan.timestep_map(), plan.timestep_scaling)


# -- the table ------------------------------------------------------------------------------------------------

_NO_KARRAS = {"use_karras_sigmas": False}
_DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}

SAMPLERS: dict[str, SamplerSpec] = {spec.name: spec for spec in [
    SamplerSpec("ddim", "DDIM", sample_ddim, plan_ddim, False, "DDIMScheduler", options=("eta",)),
    SamplerSpec("pndm", "PLMS", sample_plms, plan_pndm, False, "PNDMScheduler", {"skip_prk_steps": True}),
    SamplerSpec("ddpm", "DDPM", sample_ddpm, plan_ddpm, True, "DDPMScheduler"),
    SamplerSpec("euler", "Euler", sample_euler, plan_euler, False, "EulerDiscreteScheduler", _NO_KARRAS),
    SamplerSpec("euler_a", "Euler a", sample_euler_ancestral, plan_euler, True, "EulerAncestralDiscreteScheduler"),
    SamplerSpec("heun", "Heun", sample_heun, plan_euler, False, "HeunDiscreteScheduler", _NO_KARRAS),
    SamplerSpec("dpmpp_2m", "DPM++ 2M", sample_dpmpp_2m, plan_multistep, False, "DPMSolverMultistepScheduler",
                {**_DPMPP_2M, **_NO_KARRAS}),
    SamplerSpec("dpmpp_2m_karras", "DPM++ 2M Karras", sample_dpmpp_2m, plan_multistep, False,
                "DPMSolverMultistepScheduler", {**_DPMPP_2M, "use_karras_sigmas": True}),
    SamplerSpec("lcm", "LCM", sample_lcm, plan_lcm, True, "LCMScheduler", wraps_denoiser=lcm_denoiser,
                default_steps=4),
    SamplerSpec("unipc", "UniPC", sample_unipc, plan_multistep, False, "UniPCMultistepScheduler", _NO_KARRAS),
]}
