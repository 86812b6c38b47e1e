"""UniPC against diffusers' UniPCMultistepScheduler, step for step, on an analytic network.

The scheduler is built as StableDiffusionPipeline users build it, ``UniPCMultistepScheduler.from_config(...)`` on
the SD1.5 (epsilon) and SD2.1 (v-prediction) scheduler configs, and driven by the pipeline's loop. Ours runs
through the same plan and denoiser a generation uses, from the same unit noise, and its VE latents are converted
to VP after every step.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from sdcli.errors import SdcliError
from sdcli.sampling.denoisers import Denoiser, TimestepMap, training_sigmas
from sdcli.sampling.plans import SAMPLERS
from sdcli.sampling.unipc import sample_unipc
from data_paths import CONFIGS

torch = pytest.importorskip("torch", reason="diffusers' scheduler is the UniPC reference")
diffusers = pytest.importorskip("diffusers", reason="diffusers' scheduler is the UniPC reference")


TOL = {
    # Latents and denoised estimates after every step, as max |ours - diffusers| / max |diffusers|. diffusers
    # computes every coefficient and update in float32 (its lambda from float32 log(alpha) - log(sigma_vp)), we
    # the coefficients in float64 and the updates in float32 on VE latents: a few float32 ulps (1.2e-7) per step,
    # carried through up to 25 multistep updates. Measured: <= 4e-6 on the SD1.5/SD2.1 runs; 5.7e-6 for UniP-3
    # into sigma_min without lower_order_final, where both float32 runs stand 4-5e-6 from a float64 one. A
    # wrong coefficient, order, history slot or skipped corrector shows up at 3e-3 or more.
    "latents": 1e-5,
    # The plan's sigmas against the scheduler's, relative: float32 alphas_cumprod computed in another order (an
    # ulp or so, 6e-8) enter sigma = sqrt((1 - alpha_bar) / alpha_bar) amplified by 1 / (2 (1 - alpha_bar)),
    # 13x at t = 40, the smallest timestep here. Measured 2.5e-6.
    "sigmas": 1e-5,
}
STEPS = [1, 2, 3, 4, 7, 10, 25]
SHAPE = (2, 4, 8, 8)


def network(sample: np.ndarray, timestep: int) -> np.ndarray:
    """An analytic stand-in for the UNet (diffusers' scheduler tests use sample * t / (t + 1)), with a
    nonlinear term so that the output depends on the history of the latents, not only on a linear recurrence."""
    t = np.float32(timestep)
    return (sample * (t / (t + 1)) + np.float32(0.3) * np.sin(3 * sample) * (t / 1000)).astype(np.float32)


def raw_config(model: str) -> dict:
    return json.loads((CONFIGS / model / "scheduler" / "scheduler_config.json").read_text())


def make_scheduler(model: str, **overrides):
    return diffusers.UniPCMultistepScheduler.from_config(raw_config(model), **overrides)


def run_diffusers(scheduler, steps: int, noise: np.ndarray):
    """StableDiffusionPipeline's loop: (timesteps called, latents after each step, x0 estimate of each step)."""
    scheduler.set_timesteps(steps)
    latents = torch.from_numpy(noise) * scheduler.init_noise_sigma
    calls, trajectory, estimates = [], [], []
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        calls.append(int(t))
        output = torch.from_numpy(network(model_input.numpy(), int(t)))
        latents = scheduler.step(output, t, latents).prev_sample
        trajectory.append(latents.numpy().copy())
        estimates.append(scheduler.model_outputs[-1].numpy().copy())  # predict_x0: the converted output is x0
    return calls, trajectory, estimates


def run_ours(denoiser_of, sigmas, init_noise_sigma: float, noise: np.ndarray, **options):
    """(timesteps the network was called at, steps): ``denoiser_of(network)`` makes the denoiser."""
    calls: list[int] = []

    def recording_network(x_in: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
        assert timesteps.shape == (x_in.shape[0],) and (timesteps == timesteps[0]).all()
        calls.append(int(timesteps[0]))
        return network(x_in, int(timesteps[0]))

    x = noise * np.float32(init_noise_sigma)
    return calls, list(sample_unipc(denoiser_of(recording_network), x, sigmas, **options))


def run_ours_on_scheduler(scheduler, noise: np.ndarray, **options):
    """Ours on the scheduler's own sigmas and (sigma, timestep) pairs (for settings the plans refuse)."""
    sigmas = scheduler.sigmas.numpy()
    timestep_map = TimestepMap(training_sigmas(scheduler.alphas_cumprod.numpy()), sigmas[:-1],
                               scheduler.timesteps.numpy())

    def denoiser_of(net):
        return Denoiser(net, scheduler.alphas_cumprod.numpy(), scheduler.config.prediction_type, timestep_map)

    init_noise_sigma = math.sqrt(1 + float(sigmas[0]) ** 2)  # VP init_noise_sigma 1 in VE
    return run_ours(denoiser_of, sigmas, init_noise_sigma, noise, **options)


def relative_error(ours: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(ours - expected)) / np.max(np.abs(expected)))


def assert_trajectories_match(steps, trajectory, estimates, sigmas, count=None):
    count = len(trajectory) if count is None else count
    for i in range(count):
        step = steps[i]
        assert step.index == i and step.sigma == float(sigmas[i]) and step.sigma_next == float(sigmas[i + 1])
        assert step.x.dtype == np.float32 and step.x.shape == SHAPE
        x_vp = step.x / math.sqrt(1 + step.sigma_next ** 2)
        assert relative_error(x_vp, trajectory[i]) <= TOL["latents"], f"latents after step {i}"
        assert relative_error(step.denoised, estimates[i]) <= TOL["latents"], f"denoised at step {i}"


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("model, prediction_type", [("sd15", "epsilon"), ("sd21", "v_prediction")])
def test_matches_diffusers(model, prediction_type, steps):
    scheduler = make_scheduler(model)
    assert scheduler.config.prediction_type == prediction_type
    noise = np.random.default_rng(steps).standard_normal(SHAPE).astype(np.float32)
    expected_calls, trajectory, estimates = run_diffusers(scheduler, steps, noise)

    plan = SAMPLERS["unipc"].plan(raw_config(model), steps)
    assert plan.prediction_type == prediction_type
    np.testing.assert_allclose(plan.sigmas, scheduler.sigmas.numpy(), rtol=TOL["sigmas"], atol=0)
    calls, ours = run_ours(lambda net: Denoiser(net, plan.alphas_cumprod, plan.prediction_type, plan.timestep_map()),
                           plan.sigmas, plan.init_noise_sigma, noise, **plan.sampler_options)
    assert calls == expected_calls  # one model call per step, at the same timesteps
    assert len(ours) == steps
    assert_trajectories_match(ours, trajectory, estimates, plan.sigmas)
    assert plan.final_scale == 1.0  # the latents handed to the VAE are the last x as it is
    # The last step lands on the final estimate exactly (sigma_next = 0).
    np.testing.assert_array_equal(ours[-1].x, ours[-1].denoised)


OPTIONS = [
    # UniP-3 and UniP-4 with both B(h); the corrector then solves 3 x 3 and 4 x 4 systems. B1(h) = -h is
    # infinite at a zero final sigma (see the last test), so "bh1" runs end at sigma_min as the pipelines'
    # final_sigmas_type="sigma_min" has them.
    dict(order=3, solver_type="bh1", final_sigmas_type="sigma_min"),
    dict(order=3, solver_type="bh2"),
    dict(order=4, solver_type="bh2"),
    dict(order=1, solver_type="bh2"),
    dict(order=2, solver_type="bh1", final_sigmas_type="sigma_min"),
    dict(order=2, solver_type="bh2", disable_corrector=(0, 1, 5)),
    # Without lower_order_final (a zero final sigma: see the last test).
    dict(order=2, lower_order_final=False, final_sigmas_type="sigma_min"),
    dict(order=3, lower_order_final=False, final_sigmas_type="sigma_min"),
]


def scheduler_with(options: dict, final_sigmas_type: str = "zero"):
    return make_scheduler("sd15", solver_order=options.get("order", 2),
                          solver_type=options.get("solver_type", "bh2"),
                          lower_order_final=options.get("lower_order_final", True),
                          disable_corrector=list(options.get("disable_corrector", [])),
                          final_sigmas_type=final_sigmas_type)


@pytest.mark.parametrize("steps", [3, 8])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_options_match_diffusers(options, steps):
    options = dict(options)
    scheduler = scheduler_with(options, options.pop("final_sigmas_type", "zero"))
    noise = np.random.default_rng(100 + steps).standard_normal(SHAPE).astype(np.float32)
    expected_calls, trajectory, estimates = run_diffusers(scheduler, steps, noise)
    calls, ours = run_ours_on_scheduler(scheduler, noise, **options)
    assert calls == expected_calls
    assert_trajectories_match(ours, trajectory, estimates, scheduler.sigmas.numpy())


# (UniP-3 without lower_order_final is left out: diffusers raises there, its 2 x 2 system being singular.)
@pytest.mark.parametrize("options", [dict(lower_order_final=False), dict(solver_type="bh1"),
                                     dict(order=3, solver_type="bh1")],
                         ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_step_to_zero_lands_on_the_estimate(options):
    """The step to sigma_next = 0 has h = +inf. diffusers then multiplies B1(h) = -inf by a zero residual
    ("bh1"), or without lower_order_final divides by r_k = 0: its last latents are not finite. We take the
    first-order step there, which lands on the estimate; every step before it matches."""
    steps = 6
    scheduler = scheduler_with(options)
    noise = np.random.default_rng(7).standard_normal(SHAPE).astype(np.float32)
    _, trajectory, estimates = run_diffusers(scheduler, steps, noise)
    assert not np.isfinite(trajectory[-1]).all()
    _, ours = run_ours_on_scheduler(scheduler, noise, **options)
    assert_trajectories_match(ours, trajectory, estimates, scheduler.sigmas.numpy(), count=steps - 1)
    assert ours[-1].sigma_next == 0
    np.testing.assert_array_equal(ours[-1].x, ours[-1].denoised)


@pytest.mark.parametrize("options, message", [
    (dict(order=0), "order must be a positive integer"),
    (dict(solver_type="bh3"), "unknown UniPC solver type"),
])
def test_bad_options_are_clear_errors(options, message):
    with pytest.raises(SdcliError, match=message):
        next(sample_unipc(lambda x, sigma: x, np.zeros(SHAPE, np.float32), [1.0, 0.0], **options))
