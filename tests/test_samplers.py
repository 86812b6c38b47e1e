"""Every sampler of the table against its diffusers scheduler, step for step, on an analytic network.

The reference loop is StableDiffusionPipeline's: ``from_config(model's scheduler config, **options)``,
``set_timesteps``, ``latents = noise * init_noise_sigma``, ``scale_model_input``, ``step(...).prev_sample``. Ours
runs the table's plan and sampler through ``Denoiser`` from the same unit noise. Stochastic schedulers draw
their noise through the ``randn_tensor`` of their module, which the test replaces by a recorder; the recorded
draws are replayed to our sampler through ``noise_sampler``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from sdcli.errors import SdcliError
from sdcli.sampling.denoisers import Denoiser, TimestepMap
from sdcli.sampling.plans import SAMPLERS, SamplerPlan, resolve_config
from sdcli.sampling.samplers import Step, sample_ddim
from sdcli.sampling.schedules import fractional_timesteps, karras_sigmas

torch = pytest.importorskip("torch", reason="diffusers' schedulers are the sampler reference")
diffusers = pytest.importorskip("diffusers", reason="diffusers' schedulers are the sampler reference")

CONFIG_DIR = Path(__file__).resolve().parents[1] / "sdcli" / "data" / "configs"
MODELS = ("sd15", "sd21")  # PNDM config, epsilon; DDIM config, v-prediction
STEPS = (1, 2, 4, 7, 10)  # 1 and 2 reach the special first and last steps of the multistep samplers
MULTISTEP_STEPS = (25, 50)  # samplers with history are checked further, where their higher orders run longest
MULTISTEP = {"pndm", "dpmpp_2m", "dpmpp_2m_karras", "unipc"}
SHAPE = (2, 4, 8, 8)

TOL = {
    # Latents after every step, max |ours - diffusers| / max |diffusers|. Both sides compute in float32 but
    # along different formulas (VE Euler/exponential-integrator form against diffusers' VP alpha/beta form,
    # float64 step coefficients against torch float32 ones): a few ulps (1e-7) per step, growing over up to 25
    # steps. 1e-5 is two orders above what that explains and far below a real slip (a wrong sigma, order or
    # coefficient moves the latents by 1e-3 or more).
    "latents": 1e-5,
    # The x0 estimate of diffusers' DDIM/DDPM/Euler step (pred_original_sample), against Step.denoised.
    "denoised": 1e-5,
    # A sigma of a plan against diffusers' (in float32 ulps): one vectorised pow(x, 0.5) in diffusers' training
    # table (see test_dpmpp_karras_timesteps_are_rounded_sigmas_are_not). Measured 1 (AMD Zen 4).
    "table_ulps": 2,
    # init_noise_sigma (and the initial latents it scales) where diffusers takes (sigma_max^2 + 1)^0.5 with
    # torch's pow: exact on the machines measured, an ulp allowed for the pow's rounding on other CPUs.
    "init_ulps": 1,
}
# The space the diffusers scheduler keeps its latents in: "ve" schedulers (x0 + sigma eps) are compared as they
# are, "vp" ones after x_vp = x / sqrt(1 + sigma^2).
LATENT_SPACE = {"DDIMScheduler": "vp", "PNDMScheduler": "vp", "DDPMScheduler": "vp", "LCMScheduler": "vp",
                "DPMSolverMultistepScheduler": "vp", "UniPCMultistepScheduler": "vp",
                "EulerDiscreteScheduler": "ve", "EulerAncestralDiscreteScheduler": "ve", "HeunDiscreteScheduler": "ve"}


def raw_config(model: str) -> dict:
    return json.loads((CONFIG_DIR / model / "scheduler" / "scheduler_config.json").read_text())


def network(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Analytic "UNet": diffusers' ``sample * t / (t + 1)`` plus a bounded non-linear term, float32."""
    t = np.asarray(t, dtype=np.float32).reshape(-1, 1, 1, 1)
    return (np.float32(0.9) * x * t / (t + 1) + np.float32(0.1) * np.tanh(x)).astype(np.float32)


def torch_network(x, t):
    t = torch.as_tensor(t).to(torch.float32).reshape(-1, 1, 1, 1).expand(x.shape[0], 1, 1, 1)
    return 0.9 * x * t / (t + 1) + 0.1 * torch.tanh(x)


def unit_noise(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(SHAPE, dtype=np.float32)


class RecordedNoise:
    """Stands in for a scheduler module's ``randn_tensor``: draws seeded numpy noise and records it."""

    def __init__(self, seed: int = 1):
        self.rng = np.random.default_rng(seed)
        self.draws: list[np.ndarray] = []

    def __call__(self, shape, generator=None, device=None, dtype=None, **_):
        draw = self.rng.standard_normal(tuple(shape), dtype=np.float32)
        self.draws.append(draw)
        return torch.from_numpy(draw.copy())

    def replay(self):
        draws = iter(self.draws)
        return lambda sigma, sigma_next: next(draws)


def run_diffusers(spec, raw: dict, steps: int, noise: np.ndarray, monkeypatch, **step_options):
    """(scheduler, timesteps the UNet got, latents after every step(), x0 estimates, recorded noise)."""
    scheduler_class = getattr(diffusers, spec.diffusers_class)
    scheduler = scheduler_class.from_config(raw, **spec.diffusers_options)
    recorder = RecordedNoise()
    monkeypatch.setattr(sys.modules[scheduler_class.__module__], "randn_tensor", recorder, raising=False)
    scheduler.set_timesteps(steps)
    latents = torch.from_numpy(noise) * scheduler.init_noise_sigma
    calls, states, estimates = [], [], []
    for t in scheduler.timesteps:
        output = torch_network(scheduler.scale_model_input(latents, t), t)
        calls.append(float(t))
        result = scheduler.step(output, t, latents, **step_options)
        latents = result.prev_sample
        states.append(latents.numpy().copy())
        x0 = getattr(result, "pred_original_sample", None)
        estimates.append(None if x0 is None else x0.numpy().copy())
    return scheduler, np.array(calls, dtype=np.float32), states, estimates, recorder


def run_ours(spec, plan: SamplerPlan, noise: np.ndarray, noise_sampler=None, **options):
    """(timesteps the network got, steps, model calls after each step)."""
    calls: list[float] = []

    def recording_network(x_in, timesteps):
        calls.append(float(timesteps[0]))
        return network(x_in, timesteps)

    model = Denoiser(recording_network, plan.alphas_cumprod, plan.prediction_type, plan.timestep_map())
    if spec.wraps_denoiser is not None:
        model = spec.wraps_denoiser(model, plan)
    x = noise * np.float32(plan.init_noise_sigma)
    steps, calls_after = [], []
    for step in spec.sample(model, x, plan.sigmas, noise_sampler=noise_sampler, **plan.sampler_options, **options):
        steps.append(step)
        calls_after.append(len(calls))
    return np.array(calls, dtype=np.float32), steps, calls_after


def relative_error(ours: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(ours.astype(np.float64) - expected)) / np.max(np.abs(expected)))


def as_diffusers_latents(spec, step: Step) -> np.ndarray:
    if LATENT_SPACE[spec.diffusers_class] == "ve":
        return step.x
    return step.x.astype(np.float64) / math.sqrt(1 + step.sigma_next ** 2)


def compare(spec, raw, steps, monkeypatch, step_options=None, sampler_options=None):
    """Run both; assert timesteps, call counts and every step's latents agree; return the worst error."""
    noise = unit_noise()
    scheduler, their_calls, states, estimates, recorder = run_diffusers(spec, raw, steps, noise, monkeypatch,
                                                                         **(step_options or {}))
    plan = spec.plan(raw, steps)
    our_calls, our_steps, calls_after = run_ours(spec, plan, noise, recorder.replay(), **(sampler_options or {}))

    # same timesteps, same number of network calls: exact on any CPU, since both sides make the timesteps with
    # the same numpy functions (linspace, arange, interpolation in float64) or round them to integers
    np.testing.assert_array_equal(our_calls, their_calls)
    assert len(our_steps) == steps and calls_after[-1] == len(states)
    worst = 0.0
    for step, calls in zip(our_steps, calls_after):
        expected = states[calls - 1]  # diffusers' latents after the same number of network calls
        error = relative_error(as_diffusers_latents(spec, step), expected)
        assert error <= TOL["latents"], f"step {step.index}: relative error {error:.2e}"
        worst = max(worst, error)
        x0 = estimates[calls - 1] if calls == step.index + 1 else None
        if x0 is not None and spec.name != "lcm":  # LCM's pred_original_sample precedes the boundary condition
            assert relative_error(step.denoised, x0) <= TOL["denoised"]
    final = our_steps[-1].x * np.float32(plan.final_scale)  # what goes to the VAE
    assert relative_error(final, states[-1]) <= TOL["latents"]
    return worst


def cases():
    for name in SAMPLERS:
        for model in MODELS:
            for steps in STEPS + (MULTISTEP_STEPS if name in MULTISTEP else ()):
                yield pytest.param(name, model, steps, id=f"{name}-{model}-{steps}")


@pytest.mark.parametrize("name, model, steps", list(cases()))
def test_matches_diffusers_step_for_step(name, model, steps, monkeypatch):
    compare(SAMPLERS[name], raw_config(model), steps, monkeypatch)


@pytest.mark.parametrize("eta", [0.5, 1.0])
@pytest.mark.parametrize("model", MODELS)
def test_ddim_eta_matches_diffusers(model, eta, monkeypatch):
    compare(SAMPLERS["ddim"], raw_config(model), 10, monkeypatch, step_options={"eta": eta},
            sampler_options={"eta": eta})


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("model", MODELS)
def test_plan_matches_set_timesteps(name, model):
    """init_noise_sigma reproduces diffusers' ``latents=`` scaling exactly; the final sigma and scale."""
    spec, raw = SAMPLERS[name], raw_config(model)
    scheduler = getattr(diffusers, spec.diffusers_class).from_config(raw, **spec.diffusers_options)
    scheduler.set_timesteps(10)
    plan = spec.plan(raw, 10)
    assert plan.sigmas.dtype == np.float32 and plan.sigmas.shape == (11,) and np.all(np.diff(plan.sigmas) < 0)
    assert plan.prediction_type == raw.get("prediction_type", "epsilon")
    first = float(plan.sigmas[0])
    noise = unit_noise()
    theirs = (torch.from_numpy(noise) * scheduler.init_noise_sigma).numpy()
    if LATENT_SPACE[spec.diffusers_class] == "ve":
        # sigma_max itself, or with "leading" spacing (sigma_max^2 + 1)^0.5, which diffusers takes with torch's
        # pow (rounding by instruction set) and sdcli with the correctly rounded sqrt: an ulp apart at most
        np.testing.assert_array_max_ulp(np.float32(plan.init_noise_sigma), np.float32(scheduler.init_noise_sigma),
                                        maxulp=TOL["init_ulps"])
        np.testing.assert_array_max_ulp(noise * np.float32(plan.init_noise_sigma), theirs,
                                        maxulp=2 * TOL["init_ulps"])
        assert plan.final_scale == 1.0
    else:
        assert float(scheduler.init_noise_sigma) == 1.0
        assert plan.init_noise_sigma == pytest.approx(math.sqrt(1 + first ** 2), rel=1e-7)
        last = float(plan.sigmas[-1])
        assert plan.final_scale == pytest.approx(1 / math.sqrt(1 + last ** 2), rel=1e-7)


def test_init_noise_sigma_of_leading_spacing():
    """Euler with "leading" spacing starts from sqrt(sigma_max^2 + 1), as diffusers does, and agrees step for step
    (with steps_offset 1 from the SD1.5 file)."""
    raw = {**raw_config("sd15"), "timestep_spacing": "leading"}
    spec = SAMPLERS["euler"]
    plan = spec.plan(raw, 10)
    scheduler = diffusers.EulerDiscreteScheduler.from_config(raw)
    scheduler.set_timesteps(10)
    # torch's pow against the correctly rounded sqrt (see test_plan_matches_set_timesteps)
    np.testing.assert_array_max_ulp(np.float32(plan.init_noise_sigma), np.float32(scheduler.init_noise_sigma),
                                    maxulp=TOL["init_ulps"])
    assert plan.init_noise_sigma == pytest.approx(math.sqrt(float(plan.sigmas[0]) ** 2 + 1), rel=1e-7)


@pytest.mark.parametrize("name, spacing, steps", [("ddpm", "trailing", 7), ("euler", "trailing", 7),
                                                  ("euler_a", "leading", 7), ("heun", "trailing", 7),
                                                  ("dpmpp_2m", "leading", 7), ("dpmpp_2m", "trailing", 7),
                                                  ("ddim", "trailing", 10), ("pndm", "trailing", 10)])
def test_other_spacings_match_diffusers(name, spacing, steps, monkeypatch):
    """Spacings SD's files do not use (DDIM/PNDM with N dividing T, where diffusers' t - T // N rule is the next
    timestep)."""
    compare(SAMPLERS[name], {**raw_config("sd15"), "timestep_spacing": spacing}, steps, monkeypatch)


@pytest.mark.parametrize("spacing, steps", [("linspace", 4), ("linspace", 7), ("trailing", 7), ("trailing", 3)])
def test_ddim_steps_to_t_minus_t_over_n_as_diffusers(spacing, steps, monkeypatch):
    """DDIM where diffusers' t - T // N is not the next timestep (AnimateDiff's linspace DDIM; N not dividing T):
    each step ends at the noise level of t - T // N and goes on from the next timestep as it is."""
    raw = {**raw_config("sd15"), "timestep_spacing": spacing, "beta_schedule": "linear"}
    assert "targets" in SAMPLERS["ddim"].plan({**raw, "prediction_type": "epsilon"}, steps).sampler_options
    compare(SAMPLERS["ddim"], raw, steps, monkeypatch)


def test_dpmpp_karras_timesteps_are_rounded_sigmas_are_not():
    """diffusers gives the UNet round(t(sigma)) but steps with the Karras sigma itself."""
    raw = raw_config("sd15")
    plan = SAMPLERS["dpmpp_2m_karras"].plan(raw, 10)
    scheduler = diffusers.DPMSolverMultistepScheduler.from_config(raw, use_karras_sigmas=True)
    scheduler.set_timesteps(10)
    # diffusers' training sigmas come from torch's vectorised pow(x, 0.5), sdcli's from the correctly rounded
    # sqrt: on some instruction sets (AMD Zen 4) a table entry differs by an ulp, and the float64 Karras sigmas
    # built on it then round to float32 an ulp apart (9.5e-7 at 9.10). The integer timesteps are exact.
    np.testing.assert_array_max_ulp(plan.sigmas, scheduler.sigmas.numpy(), maxulp=TOL["table_ulps"])
    np.testing.assert_array_equal(plan.timesteps, scheduler.timesteps.numpy().astype(np.float32))
    assert np.all(plan.timesteps == np.round(plan.timesteps))
    training = np.sqrt((1 - plan.alphas_cumprod) / plan.alphas_cumprod)
    expected = karras_sigmas(10, float(training[0]), float(training[-1]))
    np.testing.assert_array_equal(plan.sigmas[:-1], expected.astype(np.float32))


def test_timestep_map_of_a_plan():
    plan = SAMPLERS["dpmpp_2m_karras"].plan(raw_config("sd15"), 10)
    timestep_of = plan.timestep_map()
    for sigma, t in zip(plan.sigmas[:-1], plan.timesteps):
        assert timestep_of(float(sigma)) == float(t)  # integer, not the fractional interpolation
    training = np.sqrt((1 - plan.alphas_cumprod) / plan.alphas_cumprod)
    assert timestep_of(2.5) == pytest.approx(float(fractional_timesteps(np.array([2.5]), training)[0]), abs=0)
    assert isinstance(timestep_of, TimestepMap)


def test_config_options_follow_from_config():
    """Keys the file leaves out take the class defaults; keys the class does not take are ignored."""
    raw = raw_config("sd15")  # a PNDM config: no timestep_spacing, set_alpha_to_one false, skip_prk_steps true
    assert resolve_config("EulerDiscreteScheduler", raw)["timestep_spacing"] == "linspace"
    assert resolve_config("DDIMScheduler", raw)["timestep_spacing"] == "leading"
    assert resolve_config("DDIMScheduler", raw)["steps_offset"] == 1
    assert "set_alpha_to_one" not in resolve_config("DDPMScheduler", raw)
    assert resolve_config("LCMScheduler", raw)["set_alpha_to_one"] is False
    ddim = SAMPLERS["ddim"].plan({**raw, "set_alpha_to_one": True}, 10)
    assert ddim.sigmas[-1] == 0 and ddim.final_scale == 1.0


@pytest.mark.parametrize("override, message", [
    ({"clip_sample": True}, "clip_sample=True"),
    ({"thresholding": True}, "thresholding=True"),
    ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
    ({"trained_betas": [0.1, 0.2]}, "trained_betas"),
])
def test_unsupported_options_are_refused(override, message):
    with pytest.raises(SdcliError, match=message):
        SAMPLERS["ddim"].plan({**raw_config("sd15"), **override}, 10)


def test_ddim_without_clip_sample_in_the_file_is_refused():
    """DDIMScheduler's class default clips x0 to [-1, 1]; sdcli refuses rather than silently not clipping."""
    raw = {k: v for k, v in raw_config("sd15").items() if k != "clip_sample"}
    with pytest.raises(SdcliError, match="clip_sample"):
        SAMPLERS["ddim"].plan(raw, 10)


def test_bad_step_counts_are_clear_errors():
    with pytest.raises(SdcliError, match="at least 1"):
        SAMPLERS["euler"].plan(raw_config("sd15"), 0)
    with pytest.raises(SdcliError, match="original_inference_steps"):
        SAMPLERS["lcm"].plan(raw_config("sd15"), 51)
    with pytest.raises(SdcliError, match="between 1 and"):
        SAMPLERS["euler"].plan(raw_config("sd15"), 1001)


def test_stochastic_samplers_need_noise():
    plan = SAMPLERS["ddim"].plan(raw_config("sd15"), 4)
    model = Denoiser(network, plan.alphas_cumprod, plan.prediction_type, plan.timestep_map())
    with pytest.raises(ValueError, match="noise_sampler"):
        list(sample_ddim(model, unit_noise(), plan.sigmas, eta=1.0))


def test_table_is_complete():
    for name, spec in SAMPLERS.items():
        assert spec.name == name and spec.label and spec.diffusers_class in LATENT_SPACE
    labels = {spec.label for spec in SAMPLERS.values()}
    assert {"Euler a", "DPM++ 2M Karras", "PLMS", "DDIM", "UniPC"} <= labels
    assert [name for name, spec in SAMPLERS.items() if spec.stochastic] == ["ddpm", "euler_a", "lcm"]
