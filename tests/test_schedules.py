"""Noise schedules against diffusers' schedulers and the stored reference numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sdcli.config import SchedulerConfig
from sdcli.sampling.schedules import NoiseSchedule, inference_timesteps
from data_paths import CONFIGS, TEST_DATA


TOL = {
    # float32 tables: diffusers computes linspace/cumprod in torch float32, we in numpy float32; the order of
    # rounding differs by an ulp or so, far below this.
    "tables": 1e-6,
}

SCHEDULES = [
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=False),
    dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    dict(beta_schedule="squaredcos_cap_v2", set_alpha_to_one=True),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=500),
]


@pytest.mark.parametrize("overrides", SCHEDULES)
def test_tables_equal_diffusers(overrides, diffusers):
    reference = diffusers.DDIMScheduler(**{"set_alpha_to_one": False, **overrides})
    schedule = NoiseSchedule.from_config(SchedulerConfig(**overrides))
    np.testing.assert_allclose(schedule.betas, reference.betas.numpy(), rtol=0, atol=TOL["tables"])
    np.testing.assert_allclose(schedule.alphas, reference.alphas.numpy(), rtol=0, atol=TOL["tables"])
    np.testing.assert_allclose(schedule.alphas_cumprod, reference.alphas_cumprod.numpy(), rtol=0, atol=TOL["tables"])
    assert schedule.final_alpha_cumprod == pytest.approx(float(reference.final_alpha_cumprod), abs=TOL["tables"])


@pytest.mark.parametrize("overrides", SCHEDULES[:2])
def test_sigmas_equal_euler(overrides, diffusers):
    reference = diffusers.EulerDiscreteScheduler(
        **{k: v for k, v in overrides.items() if k != "set_alpha_to_one"})
    reference.set_timesteps(1000)  # every training timestep
    schedule = NoiseSchedule.from_config(SchedulerConfig(**overrides))
    expected = reference.sigmas.numpy()[:-1][::-1]
    np.testing.assert_allclose(schedule.sigmas, expected, rtol=TOL["tables"] * 10, atol=TOL["tables"])


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 4, 20, 25, 50, 999, 1000])
@pytest.mark.parametrize("offset", [0, 1])
def test_timesteps_equal_ddim(spacing, steps, offset, diffusers):
    reference = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
    reference.set_timesteps(steps)
    config = SchedulerConfig(timestep_spacing=spacing, steps_offset=offset)
    np.testing.assert_array_equal(inference_timesteps(config, steps), reference.timesteps.numpy())


@pytest.mark.parametrize("model", ["sd15", "sd21"])
def test_stored_reference(model):
    reference = json.loads((TEST_DATA / "schedulers" / "scheduler_reference.json").read_text())[model]
    config = SchedulerConfig.from_diffusers(
        json.loads((CONFIGS / model / "scheduler" / "scheduler_config.json").read_text()))
    schedule = NoiseSchedule.from_config(config)
    np.testing.assert_allclose(schedule.betas, reference["betas_float32"], rtol=0, atol=TOL["tables"])
    np.testing.assert_allclose(schedule.alphas_cumprod, reference["alphas_cumprod_float32"], rtol=0,
                               atol=TOL["tables"])
    assert schedule.final_alpha_cumprod == pytest.approx(reference["final_alpha_cumprod"], abs=TOL["tables"])
    assert config.prediction_type == reference["prediction_type"]
    ddim = reference["DDIMScheduler"]
    for steps in (50, 20):
        np.testing.assert_array_equal(inference_timesteps(config, steps), ddim[f"timesteps_{steps}"])


def test_bad_steps_are_clear_errors():
    from sdcli.errors import SdcliError

    with pytest.raises(SdcliError, match="between 1 and"):
        inference_timesteps(SchedulerConfig(), 0)
    with pytest.raises(SdcliError, match="between 1 and"):
        inference_timesteps(SchedulerConfig(), 1001)
    with pytest.raises(SdcliError, match="beta_schedule"):
        SchedulerConfig(beta_schedule="cubic")
