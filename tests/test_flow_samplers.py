"""Flow-matching samplers against diffusers' flow schedulers, step for step, on an analytic velocity model.

The reference loop is WanPipeline's: ``SchedulerClass.from_config(Wan's scheduler config, **options, shift)``,
``set_timesteps``, ``set_begin_index(0)``, latents = the unit noise, the network called at
``t.expand(batch)``, ``latents = scheduler.step(v, t, latents)[0]``. Ours runs ``flow_plan(...)`` through
``FlowDenoiser`` from the same noise. Both sides call the same numpy network, so every difference comes from the
samplers' own arithmetic.
"""

from __future__ import annotations

import numpy as np
import pytest

from sdcli.errors import SdcliError
from sdcli.sampling.denoisers import guided_network
from sdcli.sampling.flow import (FLOW_SAMPLERS, FlowDenoiser, FlowTimestepMap, flow_plan, sample_flow_dpmpp_2m,
                                 sample_flow_unipc)
from sdcli.sampling.plans import SAMPLERS
from sdcli.sampling.samplers import sample_euler

torch = pytest.importorskip("torch", reason="diffusers' flow schedulers are the reference")
diffusers = pytest.importorskip("diffusers", reason="diffusers' flow schedulers are the reference")

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers scheduler/scheduler_config.json (written by diffusers 0.33.0.dev0), as
# published on the Hub. The keys that matter on flow sigmas: use_flow_sigmas, prediction_type, flow_shift,
# num_train_timesteps, solver_order, solver_type, lower_order_final, disable_corrector, final_sigmas_type "zero",
# predict_x0, thresholding, solver_p; the beta keys and timestep_spacing are not read on flow sigmas.
WAN21_SCHEDULER_CONFIG = {
    "_class_name": "UniPCMultistepScheduler", "_diffusers_version": "0.33.0.dev0", "beta_end": 0.02,
    "beta_schedule": "linear", "beta_start": 0.0001, "disable_corrector": [], "dynamic_thresholding_ratio": 0.995,
    "final_sigmas_type": "zero", "flow_shift": 3.0, "lower_order_final": True, "num_train_timesteps": 1000,
    "predict_x0": True, "prediction_type": "flow_prediction", "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0, "solver_order": 2, "solver_p": None, "solver_type": "bh2", "steps_offset": 0,
    "thresholding": False, "timestep_spacing": "linspace", "trained_betas": None, "use_beta_sigmas": False,
    "use_exponential_sigmas": False, "use_flow_sigmas": True, "use_karras_sigmas": False,
}

TOL = {
    # Latents (and the multistep schedulers' x0 estimates) after every step: max |ours - diffusers|, absolute, on
    # unit-noise latents (|x| < 5), over steps {1, 2, 4, 7, 50} x shifts {1, 3, 5, 7}.
    "latents": {
        # Heun: the same float32 operations in the same order (x0 = x - sigma v, d = (x - x0) / sigma, the mean
        # of the two slopes times dt): bit for bit. Measured 0.
        "heun": 0.0,
        # Euler: diffusers adds dt * v; we recover v as (x - x0) / sigma from the denoiser, an ulp of x over
        # sigma, times |dt| <= sigma: an ulp or two of x per step. Measured 3.6e-7.
        "euler": 2e-6,
        # UniPC and DPM++ 2M: float64 lambdas and coefficients (alpha = 1 - sigma exact) against diffusers'
        # float32 ones (its lambda at sigma_0 = 0.999999 is a float32 log(1.0e-6)): a few ulps per step over up
        # to 50 multistep updates. Measured 1.1e-6 (UniPC), 1.9e-6 (DPM++ 2M). Leaving alpha out (the VE form
        # on flow sigmas) is off by 1e-2 from the second step.
        "unipc": 1e-5,
        "dpmpp_2m": 1e-5,
    },
}
STEPS = (1, 2, 4, 7, 50)
SHIFTS = (1.0, 3.0, 5.0, 7.0)
SHAPE = (2, 4, 3, 6, 5)  # (B, C, T, h, w): video latents, batch 2
SCHEDULER_CLASSES = {"unipc": "UniPCMultistepScheduler", "euler": "FlowMatchEulerDiscreteScheduler",
                     "heun": "FlowMatchHeunDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}


def network(x: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    """An analytic, smooth velocity "transformer": linear in x with a t-dependent slope plus bounded non-linear
    terms, float32 like the latents."""
    s = (np.asarray(timesteps, dtype=np.float32) / np.float32(1000)).reshape(-1, *([1] * (x.ndim - 1)))
    out = x * (np.float32(0.6) + np.float32(0.4) * s) - np.float32(0.5) * (1 - s) * np.tanh(x) \
        + np.float32(0.1) * np.sin(np.float32(2) * x)
    return out.astype(np.float32)


def unit_noise(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(SHAPE, dtype=np.float32)


def make_scheduler(name: str, shift: float | None, raw: dict = WAN21_SCHEDULER_CONFIG):
    spec = FLOW_SAMPLERS[name]
    options = dict(spec.diffusers_options)
    if shift is not None:
        options[spec.shift_key] = shift
    return getattr(diffusers, spec.diffusers_class).from_config(raw, **options)


def run_diffusers(scheduler, steps: int, noise: np.ndarray):
    """WanPipeline's loop: (timesteps the network got, latents after every call, x0 after every call or None)."""
    scheduler.set_timesteps(steps)
    scheduler.set_begin_index(0)
    latents = torch.from_numpy(noise.copy())
    calls, states, estimates = [], [], []
    for t in scheduler.timesteps:
        timestep = t.expand(latents.shape[0])
        calls.append(float(t))
        v = torch.from_numpy(network(latents.numpy(), timestep.numpy().astype(np.float32)))
        latents = scheduler.step(v, t, latents, return_dict=False)[0]
        states.append(latents.numpy().copy())
        outputs = getattr(scheduler, "model_outputs", None)  # the multistep schedulers keep x0 there
        estimates.append(None if outputs is None else outputs[-1].numpy().copy())
    return np.array(calls, dtype=np.float32), states, estimates


def run_ours(plan, noise: np.ndarray):
    """(timesteps the network got, steps, network calls made when each step was yielded)."""
    calls: list[float] = []

    def recording_network(x, timesteps):
        assert timesteps.shape == (x.shape[0],) and timesteps.dtype == np.float32
        calls.append(float(timesteps[0]))
        return network(x, timesteps)

    steps, calls_after = [], []
    for step in plan.sample(FlowDenoiser(recording_network, plan), noise.copy()):
        steps.append(step)
        calls_after.append(len(calls))
    return np.array(calls, dtype=np.float32), steps, calls_after


def scheduler_grid(name: str, scheduler) -> tuple[np.ndarray, np.ndarray]:
    """The scheduler's (sigmas (N + 1,), timesteps (N,)), Heun's repeated entries taken once."""
    sigmas, timesteps = scheduler.sigmas.numpy(), scheduler.timesteps.numpy().astype(np.float32)
    if name == "heun":  # [s0, s1, s1, ..., s_{N-1}, s_{N-1}, 0] and [t0, t1, t1, ...]
        sigmas, timesteps = np.append(sigmas[:-1:2], sigmas[-1]), timesteps[::2]
    return sigmas, timesteps


def compare(name: str, steps: int, shift: float, raw: dict = WAN21_SCHEDULER_CONFIG, last: bool = True) -> float:
    """Assert the plan's grid and every step's latents (``last``: the last step's too) against the scheduler;
    return the worst difference."""
    scheduler = make_scheduler(name, shift, raw)
    noise = unit_noise(steps)
    their_calls, states, estimates = run_diffusers(scheduler, steps, noise)
    plan = flow_plan(name, raw, steps, shift=shift)

    # The grid: float32 sigmas and timesteps made by the same float64/float32 operations: exact.
    sigmas, timesteps = scheduler_grid(name, scheduler)
    np.testing.assert_array_equal(plan.sigmas, sigmas)
    np.testing.assert_array_equal(plan.timesteps, timesteps)
    assert plan.sigmas.dtype == np.float32 and plan.sigmas[-1] == 0 and np.all(np.diff(plan.sigmas) < 0)

    our_calls, steps_done, calls_after = run_ours(plan, noise)
    np.testing.assert_array_equal(our_calls, their_calls)  # same network calls, same timesteps, same order
    assert len(steps_done) == steps and calls_after[-1] == len(states)
    tol = TOL["latents"][name]
    worst = 0.0
    for step, calls in zip(steps_done, calls_after[:None if last else -1]):
        assert step.sigma == float(plan.sigmas[step.index]) and step.sigma_next == float(plan.sigmas[step.index + 1])
        assert step.x.dtype == np.float32 and step.x.shape == SHAPE
        error = float(np.max(np.abs(step.x.astype(np.float64) - states[calls - 1])))
        assert error <= tol, f"{name}, {steps} steps, shift {shift}: step {step.index} off by {error:.2e}"
        worst = max(worst, error)
        if estimates[calls - 1] is not None:
            x0_error = float(np.max(np.abs(step.denoised.astype(np.float64) - estimates[calls - 1])))
            assert x0_error <= tol, f"x0 of step {step.index} off by {x0_error:.2e}"
    np.testing.assert_array_equal(steps_done[-1].x, steps_done[-1].denoised)  # the last step lands on x0
    return worst


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name", list(FLOW_SAMPLERS))
def test_matches_diffusers_step_for_step(name, steps, shift):
    compare(name, steps, shift)


def test_table_names_and_classes():
    assert list(FLOW_SAMPLERS) == ["unipc", "euler", "heun", "dpmpp_2m"]
    for name, spec in FLOW_SAMPLERS.items():
        assert spec.name == name and spec.diffusers_class == SCHEDULER_CLASSES[name]
        assert name in SAMPLERS and spec.label == SAMPLERS[name].label  # the same user-facing names


@pytest.mark.parametrize("steps", [7, 10])
@pytest.mark.parametrize("options", [dict(solver_order=3), dict(solver_order=1), dict(disable_corrector=[0, 2, 5]),
                                     dict(solver_order=3, solver_type="bh1"), dict(solver_type="bh1")],
                         ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_unipc_options_match_diffusers(options, steps):
    """UniPC's other settings on flow sigmas. With "bh1" diffusers' last step is not finite (B(h) = -h is
    infinite at sigma 0, times a zero residual): every step before it matches, and ours lands on x0."""
    bh1 = options.get("solver_type") == "bh1"
    if bh1:
        scheduler = make_scheduler("unipc", 5.0, {**WAN21_SCHEDULER_CONFIG, **options})
        assert not np.isfinite(run_diffusers(scheduler, steps, unit_noise(steps))[1][-1]).all()
    compare("unipc", steps, 5.0, {**WAN21_SCHEDULER_CONFIG, **options}, last=not bh1)


# -- Wan's own scheduler ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [50, 4])
def test_wan_scheduler_config_plan(steps):
    """The plan of Wan's file as it is (shift None: its flow_shift 3.0) equals the pipeline's scheduler, built
    from the file with no option at all."""
    scheduler = diffusers.UniPCMultistepScheduler.from_config(WAN21_SCHEDULER_CONFIG)
    assert scheduler.config.use_flow_sigmas and scheduler.config.prediction_type == "flow_prediction"
    scheduler.set_timesteps(steps)
    plan = flow_plan("unipc", WAN21_SCHEDULER_CONFIG, steps)
    assert plan.shift == 3.0 and plan.steps == steps and plan.init_noise_sigma == 1.0
    assert float(scheduler.init_noise_sigma) == 1.0
    np.testing.assert_array_equal(plan.sigmas, scheduler.sigmas.numpy())
    np.testing.assert_array_equal(plan.timesteps, scheduler.timesteps.numpy().astype(np.float32))
    assert plan.sampler_options == {"order": 2, "solver_type": "bh2", "lower_order_final": True,
                                    "disable_corrector": ()}
    assert plan.sigmas[0] == np.float32(1 - 1e-6)  # diffusers lowers sigma 1 by 1e-6 (alpha = 1 - sigma > 0)
    if steps == 4:
        assert plan.timesteps.tolist() == [999, 900, 750, 500]  # int(sigma * 1000), truncated
    else:
        assert plan.timesteps[0] == 999 and plan.timesteps[-1] == int(plan.sigmas[-2] * 1000) == 60


def test_shift_defaults_to_the_models():
    """shift None: the class's key of the file, else the other spelling (Wan's flow_shift for FlowMatch Euler),
    else the class default 1.0."""
    assert flow_plan("euler", WAN21_SCHEDULER_CONFIG, 10).shift == 3.0
    assert flow_plan("euler", {"shift": 7.0, "flow_shift": 2.0}, 10).shift == 7.0
    assert flow_plan("unipc", {"shift": 7.0}, 10).shift == 7.0
    assert flow_plan("dpmpp_2m", {}, 10).shift == 1.0
    np.testing.assert_array_equal(flow_plan("euler", WAN21_SCHEDULER_CONFIG, 10).sigmas,
                                  flow_plan("euler", {}, 10, shift=3.0).sigmas)


def test_flow_match_euler_shifts_the_smallest_sigma_twice():
    """diffusers' FlowMatch schedulers space the grid between their shifted table's ends and shift it again: the
    last sigma before 0 is shift(shift(1 / T)), not shift(1 / T)."""
    plan = flow_plan("euler", {}, 4, shift=3.0)

    def shift(s):
        return 3 * s / (1 + 2 * s)

    assert plan.sigmas[-2] == pytest.approx(shift(shift(1 / 1000)), rel=1e-6)
    assert plan.timesteps[0] == 1000.0  # sigma 1 exactly, told as timestep 1000


# -- the denoiser and guidance ------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [5.0, 1.0])
def test_guidance_and_x0_like_wan_pipeline(scale):
    """FlowDenoiser over guided_network: v = uncond + scale (cond - uncond) (WanPipeline's order, from two
    calls), x0 = x - sigma v (diffusers' flow_prediction conversion): bit for bit; a scale <= 1 runs cond only."""
    plan = flow_plan("unipc", WAN21_SCHEDULER_CONFIG, 4)
    rng = np.random.default_rng(3)
    cond, uncond = rng.standard_normal((2, 7, 5), dtype=np.float32), rng.standard_normal((2, 7, 5), dtype=np.float32)
    calls = []

    def transformer(x, timesteps, context):  # (B, C, T, h, w), (B,), (B, 7, 5)
        calls.append((x.shape[0], timesteps.copy()))
        return network(x, timesteps) + context.mean(axis=(1, 2)).reshape(-1, 1, 1, 1, 1)

    x = unit_noise(5)
    sigma = plan.sigmas[1]
    ours = FlowDenoiser(guided_network(transformer, cond, uncond, scale), plan)(x, sigma)

    t = torch.tensor(plan.timesteps[1]).to(torch.int64)  # UniPC's timesteps are integers
    x_t = torch.from_numpy(x)
    timestep = t.expand(x_t.shape[0]).numpy().astype(np.float32)
    noise_pred = torch.from_numpy(transformer(x, timestep, cond))
    if scale > 1:
        noise_uncond = torch.from_numpy(transformer(x, timestep, uncond))
        noise_pred = noise_uncond + scale * (noise_pred - noise_uncond)
    theirs = x_t - torch.tensor(sigma) * noise_pred
    np.testing.assert_array_equal(ours, theirs.numpy())
    assert calls[0][1].tolist() == [900.0, 900.0] + ([900.0, 900.0] if scale > 1 else [])


def test_timestep_map():
    plan = flow_plan("unipc", WAN21_SCHEDULER_CONFIG, 4)
    timestep_of = plan.timestep_map()
    for sigma, t in zip(plan.sigmas[:-1], plan.timesteps):
        assert timestep_of(float(sigma)) == float(t)  # the truncated integers, not sigma * 1000
    assert timestep_of(0.25) == 250.0 and FlowTimestepMap()(0.123) == float(np.float32(0.123) * np.float32(1000))


# -- the samplers themselves -----------------------------------------------------------------------------------

def test_a_step_from_pure_noise_is_the_flow_interpolation():
    """From sigma = 1 exactly (alpha = 0, lambda = -inf) the first-order exponential integrators take the DDIM
    step x = sigma_next noise + (1 - sigma_next) x0, which is also Euler's; the UniPC corrector after it stays
    finite."""
    sigmas = np.array([1.0, 0.6, 0.3, 0.0], dtype=np.float32)
    x = unit_noise(9)

    def model(x, sigma):
        return FlowDenoiser(network)(x, sigma)

    first = (1 - np.float32(0.6)) * model(x, 1.0) + np.float32(0.6) * x
    for sampler in (sample_flow_unipc, sample_flow_dpmpp_2m, sample_euler):
        steps = list(sampler(model, x, sigmas))
        np.testing.assert_allclose(steps[0].x, first, rtol=0, atol=1e-6)
        assert all(np.isfinite(step.x).all() for step in steps)


# -- refusals -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ddim", "pndm", "ddpm", "lcm", "euler_a", "dpmpp_2m_karras", "nope"])
def test_ve_samplers_are_refused_in_one_line(name):
    with pytest.raises(SdcliError) as error:
        flow_plan(name, WAN21_SCHEDULER_CONFIG, 10)
    message = str(error.value)
    assert "\n" not in message and "flow-matching" in message and "unipc, euler, heun, dpmpp_2m" in message


@pytest.mark.parametrize("name, override, key", [
    ("euler", {"use_dynamic_shifting": True}, "use_dynamic_shifting"),
    ("euler", {"use_karras_sigmas": True}, "use_karras_sigmas"),
    ("euler", {"use_exponential_sigmas": True}, "use_exponential_sigmas"),
    ("euler", {"use_beta_sigmas": True}, "use_beta_sigmas"),
    ("euler", {"shift_terminal": 0.1}, "shift_terminal"),
    ("euler", {"invert_sigmas": True}, "invert_sigmas"),
    ("euler", {"stochastic_sampling": True}, "stochastic_sampling"),
    ("unipc", {"final_sigmas_type": "sigma_min"}, "final_sigmas_type"),
    ("unipc", {"thresholding": True}, "thresholding"),
    ("unipc", {"predict_x0": False}, "predict_x0"),
    ("unipc", {"use_karras_sigmas": True}, "use_karras_sigmas"),
    ("unipc", {"use_dynamic_shifting": True}, "use_dynamic_shifting"),
    ("unipc", {"shift_terminal": 0.02}, "shift_terminal"),
    ("dpmpp_2m", {"solver_type": "heun"}, "solver_type"),
    ("dpmpp_2m", {"final_sigmas_type": "sigma_min"}, "final_sigmas_type"),
    ("dpmpp_2m", {"use_lu_lambdas": True}, "use_lu_lambdas"),
])
def test_unsupported_options_are_refused_by_name(name, override, key):
    with pytest.raises(SdcliError) as error:
        flow_plan(name, {**WAN21_SCHEDULER_CONFIG, **override}, 10)
    assert key in str(error.value) and "\n" not in str(error.value)


def test_the_sampler_name_sets_its_solver():
    """"dpmpp_2m" is DPM-Solver++ of order 2 whatever the file says (as the VE table's), on flow sigmas with flow
    prediction; "unipc" takes the file's order."""
    raw = {**WAN21_SCHEDULER_CONFIG, "solver_order": 3, "algorithm_type": "sde-dpmsolver++"}
    np.testing.assert_array_equal(flow_plan("dpmpp_2m", raw, 7).sigmas,
                                  flow_plan("dpmpp_2m", WAN21_SCHEDULER_CONFIG, 7).sigmas)
    assert flow_plan("unipc", raw, 7).sampler_options["order"] == 3


def test_options_diffusers_renames_are_accepted():
    """UniPC registers midpoint/heun/logrho as bh2, DPM-Solver registers bh1/bh2/logrho as midpoint (Wan's file,
    written for UniPC, says bh2); shift_terminal None or 0 is off."""
    assert flow_plan("unipc", {**WAN21_SCHEDULER_CONFIG, "solver_type": "midpoint"}, 4).sampler_options[
        "solver_type"] == "bh2"
    assert flow_plan("dpmpp_2m", WAN21_SCHEDULER_CONFIG, 4).steps == 4
    assert flow_plan("euler", {"shift_terminal": None}, 4).steps == 4


@pytest.mark.parametrize("shift", [0, -1.0, float("inf"), float("nan"), "3"])
def test_bad_shift_is_a_clear_error(shift):
    with pytest.raises(SdcliError, match="shift must be a finite number > 0"):
        flow_plan("unipc", WAN21_SCHEDULER_CONFIG, 10, shift=shift)


@pytest.mark.parametrize("steps", [0, 1001, 2.5])
def test_bad_step_counts_are_clear_errors(steps):
    with pytest.raises(SdcliError, match="steps must be between 1 and the 1000 training timesteps"):
        flow_plan("euler", WAN21_SCHEDULER_CONFIG, steps)
