"""Flow-matching sampling: the denoiser, the samplers and the plans of models trained on straight paths (Wan2.1).

Flow matching (Lipman et al. 2023, "Flow Matching for Generative Modeling"; the rectified flow of Liu et al. 2023)
trains on x_sigma = (1 - sigma) x0 + sigma noise, sigma in [0, 1], the network predicting the velocity
v = dx/dsigma = noise - x0 at the timestep sigma * 1000. Written over a denoiser D(x, sigma) -> x0 = x - sigma v
(``FlowDenoiser``), the samplers keep the vocabulary of ``samplers.py``:

- ``d = (x - denoised) / sigma`` is the velocity itself, and the probability-flow ODE dx/dsigma = d is the very
  equation the VE samplers integrate (there d is the eps estimate). Euler and Heun therefore are
  ``samplers.sample_euler`` and ``samplers.sample_heun`` run on flow sigmas: each Euler step lands on
  (1 - sigma_next) x0 + sigma_next noise for an exact x0, whatever the parametrisation. Their first step may start
  at sigma = 1 (pure noise): d = x - denoised is finite there, unlike the VE sigma / (1 - sigma).
- The exponential integrators (DPM-Solver++, UniPC) depend on the parametrisation through the signal scale:
  with x = alpha x0 + sigma eps, lambda = log(alpha / sigma) and x0 enters each update times alpha_next. Flow
  matching has alpha = 1 - sigma; ``sample_flow_dpmpp_2m`` and ``sample_flow_unipc`` run the VE implementations
  with those alphas (one implementation of each method, written in (alpha, sigma)).

The shift (Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis", sec.
5.3.2) moves the grid towards noise: sigma' = s sigma / (1 + (s - 1) sigma); Wan uses s = 3 at 480p, 5 at 720p.

A plan reproduces one diffusers scheduler's ``set_timesteps`` (diffusers 0.42; see each planner for its grid and
timesteps) from a model's raw ``scheduler_config.json``. The initial latents are the unit noise itself (diffusers'
``init_noise_sigma`` is 1 for every flow scheduler, even where the first sigma is 0.999...), and the last x is the
x0 estimate at sigma 0, handed to the VAE as it is. A pipeline runs a plan so::

    plan = flow_plan("unipc", scheduler_config, steps=50, shift=3.0)     # or None: the model's shift
    velocity = guided_network(transformer, text, negative_text, 5.0)     # v = uncond + 5 (cond - uncond)
    model = FlowDenoiser(velocity, plan)                                  # D(x, sigma) = x - sigma v
    x = unit_noise                                                        # (B, 16, T, h, w); init sigma 1
    for step in plan.sample(model, x):     # == plan.sampler(model, x, plan.sigmas, **plan.sampler_options)
        x = step.x                         # latents at step.sigma_next; the last are the final latents

Unlike ``plans.SamplerPlan`` there is no VP scaling anywhere: the network sees x as it is and the sampler's x
is diffusers' latents after every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import SdcliError
from .denoisers import Network
from .samplers import Model, NoiseSampler, Step, sample_dpmpp_2m, sample_euler, sample_heun
from .unipc import sample_unipc


# -- the denoiser -----------------------------------------------------------------------------------------------

class FlowTimestepMap:
    """sigma -> the timestep a flow network is told.

    diffusers' flow schedulers hand the network their own timesteps: float32 sigma * T for the FlowMatch
    schedulers, int(sigma * T) (truncated, from the float64 sigma) for UniPC and DPM-Solver on flow sigmas. The
    plan's exact (sigma, timestep) pairs are looked up first; any other sigma gets float32 sigma * T.
    """

    def __init__(self, num_train_timesteps: int = 1000, sigmas: Sequence[float] = (),
                 timesteps: Sequence[float] = ()):
        self.num_train_timesteps = num_train_timesteps
        self.pairs = {float(np.float32(s)): float(t) for s, t in zip(sigmas, timesteps)}

    def __call__(self, sigma: float) -> float:
        key = float(np.float32(sigma))
        if key in self.pairs:
            return self.pairs[key]
        return float(np.float32(key) * np.float32(self.num_train_timesteps))


class FlowDenoiser:
    """D(x, sigma) -> x0 = x - sigma v for a network predicting the flow velocity v = noise - x0.

    ``network(x, timesteps)`` gets the latents as they are (B, C, ...) and timesteps (B,) float32 (see
    ``FlowTimestepMap``), and returns v; classifier-free guidance wraps the network (``denoisers.guided_network``:
    uncond + scale (cond - uncond) on v, as WanPipeline guides). ``timesteps`` is a ``FlowPlan`` (its map), a
    ``FlowTimestepMap``, or None (float32 sigma * 1000). x0 is computed in float32 as diffusers' flow_prediction
    conversion does: sample - sigma * model_output.
    """

    def __init__(self, network: Network, timesteps: FlowPlan | FlowTimestepMap | None = None):
        self.network = network
        if isinstance(timesteps, FlowPlan):
            timesteps = timesteps.timestep_map()
        self.timestep_map = timesteps if timesteps is not None else FlowTimestepMap()

    def __call__(self, x: np.ndarray, sigma: float) -> np.ndarray:
        sigma = np.float32(sigma)
        timesteps = np.full((x.shape[0],), self.timestep_map(sigma), dtype=np.float32)  # (B,)
        velocity = self.network(x, timesteps)  # (B, C, ...) like x
        return x - sigma * velocity


# -- the samplers -----------------------------------------------------------------------------------------------

def flow_alphas(sigmas: Sequence[float]) -> np.ndarray:
    """(N + 1,) float64 signal scales alpha = 1 - sigma of the float32 ``sigmas`` (exact in float64)."""
    return 1 - np.asarray(sigmas, dtype=np.float32).astype(np.float64)


def sample_flow_dpmpp_2m(model: Model, x: np.ndarray, sigmas: Sequence[float], *,
                         noise_sampler: NoiseSampler | None = None) -> Iterator[Step]:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2) on flow latents: ``samplers.sample_dpmpp_2m``
    with alpha = 1 - sigma, lambda = log((1 - sigma) / sigma). The first step and the step to sigma 0 are first
    order; diffusers' ``DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")``
    (dpmsolver++, order 2, midpoint, final_sigmas_type "zero")."""
    yield from sample_dpmpp_2m(model, x, sigmas, noise_sampler=noise_sampler, alphas=flow_alphas(sigmas))


def sample_flow_unipc(model: Model, x: np.ndarray, sigmas: Sequence[float], *,
                      noise_sampler: NoiseSampler | None = None, **options) -> Iterator[Step]:
    """UniPC (Zhao et al. 2023) on flow latents: ``unipc.sample_unipc`` (same options: order, solver_type,
    lower_order_final, disable_corrector) with alpha = 1 - sigma. diffusers' ``UniPCMultistepScheduler(
    use_flow_sigmas=True, prediction_type="flow_prediction")``, Wan's scheduler."""
    yield from sample_unipc(model, x, sigmas, noise_sampler=noise_sampler, alphas=flow_alphas(sigmas), **options)


# -- plans --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FlowPlan:
    """One run's flow schedule.

    - ``sigmas`` (N + 1,) float32, descending to 0; the model is evaluated at ``sigmas[:N]`` (Heun also at the
      next sigma of each step).
    - ``timesteps`` (N,) float32: what the network is told at ``sigmas[i]``, as diffusers hands it.
    - ``sampler`` and ``sampler_options``: run ``sampler(model, x, sigmas, **sampler_options)`` (``sample``).
    - ``shift`` and ``num_train_timesteps`` the plan was made with; ``init_noise_sigma`` is 1: x starts as the
      unit noise itself.
    """

    name: str
    sigmas: np.ndarray
    timesteps: np.ndarray
    sampler: Callable[..., Iterator[Step]]
    shift: float
    num_train_timesteps: int
    sampler_options: dict[str, Any] = field(default_factory=dict)
    init_noise_sigma: float = 1.0

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def timestep_map(self) -> FlowTimestepMap:
        return FlowTimestepMap(self.num_train_timesteps, self.sigmas[:len(self.timesteps)], self.timesteps)

    def sample(self, model: Model, x: np.ndarray, noise_sampler: NoiseSampler | None = None) -> Iterator[Step]:
        """The plan's sampler from the initial latents ``x`` (the unit noise); one ``Step`` per step."""
        return self.sampler(model, x, self.sigmas, noise_sampler=noise_sampler, **self.sampler_options)


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """The shifted grid s sigma / (1 + (s - 1) sigma) (Esser et al. 2024), in the dtype of ``sigmas`` and in
    diffusers' order of operations (float32 ``sigmas``: float32 scalars, as torch multiplies a float32 tensor)."""
    if sigmas.dtype == np.float32:
        return np.float32(shift) * sigmas / (np.float32(1) + np.float32(shift - 1) * sigmas)
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def plan_flow_match(config: dict[str, Any], steps: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """FlowMatchEuler/HeunDiscreteScheduler: (sigmas (N,), timesteps (N,)).

    The class first shifts its training table t / T, t = T .. 1, in float32; ``set_timesteps`` spaces N
    timesteps evenly between sigma_max * T and sigma_min * T of that shifted table and shifts them again
    (float64), so the smallest sigma is the shift applied twice to 1 / T (diffusers does this). Sigmas are
    rounded to float32 and the timesteps are float32 sigma * T, fractional (1000 at sigma 1)."""
    train = config["num_train_timesteps"]
    table = shift_sigmas(np.linspace(1, train, train, dtype=np.float32)[::-1] / np.float32(train), shift)
    sigma_max, sigma_min = float(table[0]), float(table[-1])
    timesteps = np.linspace(sigma_max * train, sigma_min * train, steps)
    sigmas = shift_sigmas(timesteps / train, shift).astype(np.float32)
    return sigmas, sigmas * np.float32(train)


def plan_unipc_flow(config: dict[str, Any], steps: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """UniPCMultistepScheduler with ``use_flow_sigmas``: N of N + 1 points evenly spaced from 1 to 1 / T (the
    last left out), shifted in float64, the first (1) lowered by 1e-6 so that alpha = 1 - sigma is not 0; the
    timesteps are int(sigma * T) truncated (999 at the start)."""
    train = config["num_train_timesteps"]
    sigmas = shift_sigmas(np.linspace(1, 1 / train, steps + 1)[:-1], shift)
    if abs(sigmas[0] - 1) < 1e-6:
        sigmas[0] -= 1e-6
    return sigmas.astype(np.float32), (sigmas * train).astype(np.int64).astype(np.float32)


def plan_dpm_flow(config: dict[str, Any], steps: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """DPMSolverMultistepScheduler with ``use_flow_sigmas``: 1 - alpha for alpha evenly spaced from 1 / T to 1
    (N + 1 points), shifted in float64, the 0 left out; so the grid starts at shift(1 - 1 / T) < 1 (0.999 at
    shift 1) and ends at shift((1 - 1 / T) / N). Timesteps int(sigma * T), truncated."""
    train = config["num_train_timesteps"]
    sigmas = 1.0 - np.linspace(1, 1 / train, steps + 1)
    sigmas = np.flip(shift_sigmas(sigmas, shift))[:-1].copy()
    return sigmas.astype(np.float32), (sigmas * train).astype(np.int64).astype(np.float32)


# diffusers 0.42 constructor defaults of the keys each class's flow path reads or that change its maths.
CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "FlowMatchEulerDiscreteScheduler": {
        "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False, "invert_sigmas": False,
        "shift_terminal": None, "use_karras_sigmas": False, "use_exponential_sigmas": False,
        "use_beta_sigmas": False, "stochastic_sampling": False},
    "FlowMatchHeunDiscreteScheduler": {"num_train_timesteps": 1000, "shift": 1.0},
    "UniPCMultistepScheduler": {
        "num_train_timesteps": 1000, "solver_order": 2, "prediction_type": "epsilon", "thresholding": False,
        "predict_x0": True, "solver_type": "bh2", "lower_order_final": True, "disable_corrector": [],
        "solver_p": None, "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
        "use_flow_sigmas": False, "flow_shift": 1.0, "final_sigmas_type": "zero", "use_dynamic_shifting": False,
        "shift_terminal": None},
    "DPMSolverMultistepScheduler": {
        "num_train_timesteps": 1000, "solver_order": 2, "prediction_type": "epsilon", "thresholding": False,
        "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "use_karras_sigmas": False,
        "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_lu_lambdas": False,
        "use_flow_sigmas": False, "flow_shift": 1.0, "final_sigmas_type": "zero", "variance_type": None,
        "use_dynamic_shifting": False},
}
# Values other than these change the maths into something sdcli does not implement (checked where the class
# takes the key); shift_terminal is off when falsy, as diffusers tests it.
REQUIRED = {"use_dynamic_shifting": False, "invert_sigmas": False, "use_karras_sigmas": False,
            "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_lu_lambdas": False,
            "stochastic_sampling": False, "thresholding": False, "predict_x0": True, "solver_p": None,
            "final_sigmas_type": "zero", "variance_type": None, "use_flow_sigmas": True,
            "prediction_type": "flow_prediction", "algorithm_type": "dpmsolver++"}
REQUIRED_BY_CLASS = {"DPMSolverMultistepScheduler": {"solver_order": 2, "solver_type": "midpoint"}}
# Names a class's constructor registers as another (the other solver's solver types, DEIS).
ALIASES = {"UniPCMultistepScheduler": {"solver_type": {"midpoint": "bh2", "heun": "bh2", "logrho": "bh2"}},
           "DPMSolverMultistepScheduler": {"solver_type": {"logrho": "midpoint", "bh1": "midpoint",
                                                           "bh2": "midpoint"},
                                           "algorithm_type": {"deis": "dpmsolver++"}}}
SHIFT_KEYS = ("shift", "flow_shift")  # FlowMatch* classes read "shift", UniPC and DPM-Solver "flow_shift"


def resolve_flow_config(class_name: str, raw: dict[str, Any], options: dict[str, Any] | None = None,
                        shift: float | None = None) -> dict[str, Any]:
    """The settings ``class_name.from_config(raw, **options)`` (with its shift key set to ``shift``) runs with,
    for the keys sdcli reads; refuses the ones it does not implement, by name.

    With ``shift`` None the class's own shift key of the file is taken, else the other spelling (a Wan config
    names ``flow_shift``; FlowMatchEuler would silently fall back to shift 1 there), else the class default."""
    defaults = CLASS_DEFAULTS[class_name]
    config = {**defaults, **{k: v for k, v in raw.items() if k in defaults}, **(options or {})}
    key = "shift" if "shift" in defaults else "flow_shift"
    if shift is None:
        other = SHIFT_KEYS[1 - SHIFT_KEYS.index(key)]
        shift = raw.get(key, raw.get(other, defaults[key]))
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift) or shift <= 0:
        raise SdcliError(f"the flow shift must be a finite number > 0, got {shift!r}")
    config[key] = shift
    for name, aliases in ALIASES.get(class_name, {}).items():
        config[name] = aliases.get(config[name], config[name])
    required = {**REQUIRED, **REQUIRED_BY_CLASS.get(class_name, {})}
    for name, value in required.items():
        if name in config and config[name] != value:
            raise SdcliError(f"scheduler config: {name}={config[name]!r} is not supported with {class_name} on flow "
                             f"sigmas (sdcli implements {name}={value!r})")
    if config.get("shift_terminal"):
        raise SdcliError(f"scheduler config: shift_terminal={config['shift_terminal']!r} is not supported with "
                         f"{class_name} (sdcli implements shift_terminal=None)")
    return config


@dataclass(frozen=True)
class FlowSamplerSpec:
    """A sampler sdcli offers for flow-matching models: its generator, its planner and the diffusers scheduler
    it matches, ``diffusers_class.from_config(config, **diffusers_options)`` with the shift set."""

    name: str
    label: str
    sample: Callable[..., Iterator[Step]]
    planner: Callable[[dict[str, Any], int, float], tuple[np.ndarray, np.ndarray]]
    diffusers_class: str
    diffusers_options: dict[str, Any] = field(default_factory=dict)

    @property
    def shift_key(self) -> str:
        """The config key the diffusers class reads its shift from."""
        return "shift" if "shift" in CLASS_DEFAULTS[self.diffusers_class] else "flow_shift"

    def plan(self, scheduler_config: dict[str, Any], steps: int, shift: float | None = None) -> FlowPlan:
        """The plan for ``steps`` steps with a model's raw scheduler config and the ``shift`` (None: the
        model's)."""
        config = resolve_flow_config(self.diffusers_class, scheduler_config, self.diffusers_options, shift)
        train = config["num_train_timesteps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= train:
            raise SdcliError(f"steps must be between 1 and the {train} training timesteps, got {steps!r}")
        shift = config[self.shift_key]
        sigmas, timesteps = self.planner(config, steps, shift)
        options = {}
        if self.diffusers_class == "UniPCMultistepScheduler":
            options = {"order": config["solver_order"], "solver_type": config["solver_type"],
                       "lower_order_final": config["lower_order_final"],
                       "disable_corrector": tuple(config["disable_corrector"])}
        return FlowPlan(name=self.name, sigmas=np.append(sigmas, np.float32(0)),
                        timesteps=np.asarray(timesteps, dtype=np.float32), sampler=self.sample, shift=float(shift),
                        num_train_timesteps=train, sampler_options=options)


_FLOW_OUTPUT = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}

FLOW_SAMPLERS: dict[str, FlowSamplerSpec] = {spec.name: spec for spec in [
    FlowSamplerSpec("unipc", "UniPC", sample_flow_unipc, plan_unipc_flow, "UniPCMultistepScheduler", _FLOW_OUTPUT),
    FlowSamplerSpec("euler", "Euler", sample_euler, plan_flow_match, "FlowMatchEulerDiscreteScheduler"),
    FlowSamplerSpec("heun", "Heun", sample_heun, plan_flow_match, "FlowMatchHeunDiscreteScheduler"),
    FlowSamplerSpec("dpmpp_2m", "DPM++ 2M", sample_flow_dpmpp_2m, plan_dpm_flow, "DPMSolverMultistepScheduler",
                    {**_FLOW_OUTPUT, "algorithm_type": "dpmsolver++", "solver_order": 2}),
]}


def flow_plan(name: str, scheduler_config: dict[str, Any], steps: int, shift: float | None = None) -> FlowPlan:
    """The plan of sampler ``name`` (a key of ``FLOW_SAMPLERS``) for a flow-matching model's raw
    ``scheduler_config.json``, ``steps`` steps and ``shift`` (None: the config's)."""
    if name not in FLOW_SAMPLERS:
        raise SdcliError(f"the {name!r} sampler does not run flow-matching models; choose one of: "
                         f"{', '.join(FLOW_SAMPLERS)}")
    return FLOW_SAMPLERS[name].plan(scheduler_config, steps, shift)


__all__ = ["FLOW_SAMPLERS", "FlowDenoiser", "FlowPlan", "FlowSamplerSpec", "FlowTimestepMap", "flow_alphas",
           "flow_plan", "plan_dpm_flow", "plan_flow_match", "plan_unipc_flow", "resolve_flow_config",
           "sample_flow_dpmpp_2m", "sample_flow_unipc", "shift_sigmas"]
