"""Denoisers, classifier-free guidance and the sigma -> timestep map against diffusers' formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sdcli.config import SchedulerConfig
from sdcli.errors import SdcliError
from sdcli.sampling.denoisers import Denoiser, LCMDenoiser, TimestepMap, guided_network, training_sigmas
from sdcli.sampling.schedules import NoiseSchedule, fractional_timesteps, karras_sigmas

torch = pytest.importorskip("torch", reason="diffusers is the denoiser reference")
diffusers = pytest.importorskip("diffusers", reason="diffusers is the denoiser reference")
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg  # noqa: E402

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SHAPE = (2, 4, 6, 5)

TOL = {
    # x0 of one network call: our VE formula (x - sigma eps, or the v form) against diffusers' VP
    # alpha/beta form evaluated in float32 on the same output; the two differ by a few float32 roundings.
    "x0": 2e-6,
    # Guided network output: same float32 operations; the rescale's std is a float32 reduction whose
    # summation order differs between numpy and torch.
    "cfg": 1e-6,
    # float32 roundings of the boundary-condition scalings (LCM).
    "scalings": 1e-7,
    # x0 at a sigma where torch's (sigma^2 + 1)^0.5 and numpy's sqrt round apart (torch's pow): ulps of
    # float32 at the scale of the sample. Measured 0.88 (AMD Zen 4, AVX-512).
    "x0_ulps": 2,
    # fractional timestep of a sigma between training timesteps: the map rounds sigma to float32 first.
    "timestep": 1e-3,
}
ULP = float(np.finfo(np.float32).eps)  # one float32 ulp at 1.0


def schedule() -> NoiseSchedule:
    return NoiseSchedule.from_config(SchedulerConfig(**SD))


def analytic(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    t = np.asarray(t, dtype=np.float32).reshape(-1, 1, 1, 1)
    return (np.float32(0.9) * x * t / (t + 1) + np.float32(0.1) * np.tanh(x)).astype(np.float32)


def relative_error(ours, expected) -> float:
    expected = np.asarray(expected, dtype=np.float64)
    return float(np.max(np.abs(np.asarray(ours, dtype=np.float64) - expected)) / np.max(np.abs(expected)))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("timestep", [999, 500, 21, 1])
def test_x0_matches_ddim_pred_original_sample(prediction_type, timestep):
    """Denoiser(x_ve, sigma_t) = DDIMScheduler's pred_original_sample for x_vp = x_ve / sqrt(1 + sigma^2), and
    the network sees x_vp and t."""
    table = schedule()
    sigma = float(table.sigmas[timestep])
    x_vp = np.random.default_rng(timestep).standard_normal(SHAPE, dtype=np.float32)
    x_ve = (x_vp * np.sqrt(np.float32(1) + np.float32(sigma) ** 2)).astype(np.float32)
    seen = {}

    def network(x_in, timesteps):
        seen["x_in"], seen["t"] = x_in, timesteps
        return analytic(x_in, timesteps)

    timestep_map = TimestepMap(table.sigmas, [sigma], [timestep])
    x0 = Denoiser(network, table.alphas_cumprod, prediction_type, timestep_map)(x_ve, sigma)
    assert seen["t"].dtype == np.float32 and np.all(seen["t"] == timestep) and seen["t"].shape == (SHAPE[0],)
    assert relative_error(seen["x_in"], x_vp) <= 2e-7

    reference = diffusers.DDIMScheduler(**SD, prediction_type=prediction_type, clip_sample=False,
                                        set_alpha_to_one=False)
    reference.set_timesteps(1000)
    output = torch.from_numpy(analytic(x_vp, [timestep]))
    expected = reference.step(output, timestep, torch.from_numpy(x_vp)).pred_original_sample.numpy()
    assert relative_error(x0, expected) <= TOL["x0"]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_x0_matches_euler_bit_for_bit(prediction_type):
    """At Euler's fractional timesteps the denoiser follows EulerDiscreteScheduler's own float32 operations.

    Bit for bit wherever both sides hand the network the same x_in: from there on every operation is a float32
    multiply, add or divide, which IEEE 754 rounds exactly on any CPU. x_in = x / (sigma^2 + 1)^0.5 itself may
    differ by an ulp: diffusers computes the denominator with torch's pow, sdcli with a product and the correctly
    rounded sqrt, and torch's pow kernels round differently by instruction set (on AMD Zen 4 the two differ at two
    of these seven sigmas, on Intel Sapphire Rapids at none). There the result may move by an ulp of the
    network's input scale, times sigma: TOL["x0_ulps"].
    """
    reference = diffusers.EulerDiscreteScheduler(**SD, prediction_type=prediction_type)
    reference.set_timesteps(7)
    table = schedule()
    sigmas, timesteps = reference.sigmas.numpy(), reference.timesteps.numpy()
    timestep_map = TimestepMap(table.sigmas, sigmas[:-1], timesteps)
    x = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32) * np.float32(sigmas[0])
    exact_steps = 0
    for i, t in enumerate(reference.timesteps):
        seen = {}

        def network(x_in, timesteps):
            seen["x_in"] = x_in
            return analytic(x_in, timesteps)

        denoiser = Denoiser(network, table.alphas_cumprod, prediction_type, timestep_map)
        x0 = denoiser(x, float(sigmas[i]))
        x_in = reference.scale_model_input(torch.from_numpy(x), t)
        result = reference.step(torch.from_numpy(analytic(x_in.numpy(), [float(t)])), t, torch.from_numpy(x))
        expected = result.pred_original_sample.numpy()
        if np.array_equal(seen["x_in"], x_in.numpy()):
            np.testing.assert_array_equal(x0, expected)
            exact_steps += 1
        else:
            assert np.abs(seen["x_in"] - x_in.numpy()).max() <= ULP * np.abs(x_in.numpy()).max()
            bound = TOL["x0_ulps"] * ULP * np.abs(x).max()
            assert np.abs(x0 - expected).max() <= bound
        x = result.prev_sample.numpy()
    assert exact_steps >= 5


def test_unknown_prediction_type_is_a_clear_error():
    with pytest.raises(SdcliError, match="prediction type"):
        Denoiser(analytic, schedule().alphas_cumprod, "flow")


# -- classifier-free guidance -------------------------------------------------------------------------------------

def conditioned_network(calls):
    """A network whose output depends on the context, recording each call's batch."""

    def network(x_in, timesteps, context):
        calls.append((x_in.copy(), timesteps.copy(), context.copy()))
        shift = context.mean(axis=(1, 2)).reshape(-1, 1, 1, 1).astype(np.float32)  # (B, 1, 1, 1)
        return (analytic(x_in, timesteps) * (1 + shift) + shift).astype(np.float32)

    return network


def contexts(batch: int = 2):
    rng = np.random.default_rng(5)
    cond = rng.standard_normal((batch, 77, 8), dtype=np.float32)
    uncond = rng.standard_normal((batch, 77, 8), dtype=np.float32)
    return cond, uncond


@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_guidance_batches_uncond_then_cond_and_combines_like_diffusers(rescale):
    calls = []
    cond, uncond = contexts()
    network = conditioned_network(calls)
    guided = guided_network(network, cond, uncond, 7.5, rescale)
    x = np.random.default_rng(1).standard_normal(SHAPE, dtype=np.float32)
    t = np.full((SHAPE[0],), 500, dtype=np.float32)
    out = guided(x, t)

    assert len(calls) == 1  # one network call with the doubled batch
    x_in, t_in, context_in = calls[0]
    np.testing.assert_array_equal(x_in, np.concatenate([x, x]))
    np.testing.assert_array_equal(t_in, np.concatenate([t, t]))
    np.testing.assert_array_equal(context_in, np.concatenate([uncond, cond]))  # [uncond, cond], as diffusers

    both = torch.from_numpy(network(x_in, t_in, context_in))
    uncond_out, cond_out = both.chunk(2)
    expected = uncond_out + 7.5 * (cond_out - uncond_out)
    if rescale > 0:
        expected = rescale_noise_cfg(expected, cond_out, guidance_rescale=rescale)
    assert relative_error(out, expected.numpy()) <= TOL["cfg"]
    assert out.dtype == np.float32


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_guidance_scale_up_to_one_runs_cond_only(scale):
    calls = []
    cond, _ = contexts()
    guided = guided_network(conditioned_network(calls), cond, None, scale, guidance_rescale=0.7)
    x = np.random.default_rng(1).standard_normal(SHAPE, dtype=np.float32)
    t = np.full((SHAPE[0],), 10, dtype=np.float32)
    out = guided(x, t)
    assert len(calls) == 1 and calls[0][0].shape == SHAPE
    np.testing.assert_array_equal(calls[0][2], cond)
    np.testing.assert_array_equal(out, conditioned_network([])(x, t, cond))


def test_guidance_without_uncond_context_is_a_clear_error():
    cond, _ = contexts()
    with pytest.raises(SdcliError, match="unconditional"):
        guided_network(conditioned_network([]), cond, None, 7.5)


# -- sigma -> timestep --------------------------------------------------------------------------------------------

def test_timestep_map_looks_up_plan_pairs_exactly():
    table = schedule()
    sigmas = np.array([10.0, 3.0, 0.5], dtype=np.float32)
    timestep_map = TimestepMap(table.sigmas, sigmas, [900, 600, 200])
    assert [timestep_map(float(s)) for s in sigmas] == [900.0, 600.0, 200.0]  # not the interpolated values
    assert timestep_map(np.float32(3.0)) == 600.0  # float32 or python float keys alike


def test_timestep_map_interpolates_log_sigma_like_diffusers():
    table = schedule()
    reference = diffusers.EulerDiscreteScheduler(**SD)
    log_sigmas = np.log(training_sigmas(table.alphas_cumprod))
    timestep_map = TimestepMap(table.sigmas)
    for sigma in [14.6, 7.0, 1.0, 0.2, 0.03]:
        expected = reference._sigma_to_t(np.array(sigma), log_sigmas)
        assert timestep_map(sigma) == pytest.approx(float(expected), abs=TOL["timestep"])
        # bit for bit on any CPU: both sides take the same numpy log of the same float32 table (the reference is
        # handed ours), then float64 arithmetic
        assert fractional_timesteps(np.array([sigma]), table.sigmas)[0] == float(expected)
    # Every training sigma maps back onto its own timestep (up to the float32 rounding of diffusers' log table,
    # a few 1e-6 of a timestep); outside the table the timestep clamps.
    np.testing.assert_allclose(fractional_timesteps(table.sigmas, table.sigmas), np.arange(1000), atol=1e-5)
    assert timestep_map(100.0) == 999.0 and timestep_map(1e-4) == 0.0


def test_karras_sigmas_match_diffusers():
    table = schedule()
    reference = diffusers.DPMSolverMultistepScheduler(**SD)
    expected = reference._convert_to_karras(np.flip(table.sigmas).copy(), 13)
    # bit for bit on any CPU: diffusers computes these with numpy in float64 too, the same power on the same inputs
    np.testing.assert_array_equal(karras_sigmas(13, float(table.sigmas[0]), float(table.sigmas[-1])), expected)


# -- LCM boundary condition -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("timestep", [999, 499, 259, 19])
def test_lcm_boundary_condition_matches_diffusers(timestep):
    table = schedule()
    sigma = float(table.sigmas[timestep])
    timestep_map = TimestepMap(table.sigmas, [sigma], [timestep])
    reference = diffusers.LCMScheduler(**SD)
    c_skip, c_out = reference.get_scalings_for_boundary_condition_discrete(torch.tensor(timestep))
    x0 = np.random.default_rng(2).standard_normal(SHAPE, dtype=np.float32)
    x = np.random.default_rng(3).standard_normal(SHAPE, dtype=np.float32)
    lcm = LCMDenoiser(lambda x_, sigma_: x0, timestep_map)
    ours_skip, ours_out = lcm.scalings(sigma)
    assert float(ours_skip) == pytest.approx(float(c_skip), rel=TOL["scalings"])
    assert float(ours_out) == pytest.approx(float(c_out), rel=TOL["scalings"])
    x_vp = x / math.sqrt(1 + sigma ** 2)
    expected = float(c_out) * x0 + float(c_skip) * x_vp  # diffusers: c_out * x0 + c_skip * sample (VP)
    assert relative_error(lcm(x, sigma), expected) <= TOL["x0"]
