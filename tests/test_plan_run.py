"""Planning a run (sdcli.plan_run): batches, the seed of every image (drawn once when none is given), prompts-file
lines with their own settings, and initial latents checked against the model family's latent shape. No model
needed."""

from __future__ import annotations

import numpy as np
import pytest

import sdcli
from sdcli.errors import SdcliError
from sdcli.families import FAMILIES
from sdcli.io.prompts_file import PromptLine
from sdcli.pipelines import image as image_pipeline

SD = FAMILIES["sd"]


def params(**changes) -> sdcli.GenerateParams:
    return sdcli.GenerateParams(prompt="a cat", **changes)


def test_batches_and_seeds():
    plan = sdcli.plan_run(params(seed=5), num_images=3, batch_size=2)
    assert [job.seeds for job in plan.jobs] == [[5, 6], [7]]
    assert [job.params.batch_size for job in plan.jobs] == [2, 1]
    assert [job.params.seed for job in plan.jobs] == [5, 7]
    assert plan.seeds == [5, 6, 7] and plan.prompts == ["a cat"] * 3
    assert plan.seed == 5 and not plan.seed_drawn
    assert all(job.plan is None and job.initial_noise is None for job in plan.jobs)


def test_a_batch_larger_than_the_run_is_the_run():
    plan = sdcli.plan_run(params(seed=1), num_images=2, batch_size=8)
    assert [job.seeds for job in plan.jobs] == [[1, 2]]


def test_seeds_wrap_at_two_to_the_32():
    plan = sdcli.plan_run(params(seed=sdcli.MAX_SEED), num_images=2)
    assert plan.seeds == [sdcli.MAX_SEED, 0]


def test_a_missing_seed_is_drawn_once_for_the_run(monkeypatch):
    drawn = []
    monkeypatch.setattr(image_pipeline, "random_seed", lambda: drawn.append(1) or 40)
    plan = sdcli.plan_run(params(), prompts=[PromptLine("a", {}, 1), PromptLine("b", {}, 2)], num_images=2)
    assert drawn == [1] and plan.seed_drawn and plan.seed == 40
    assert plan.seeds == [40, 41, 42, 43]


def test_prompts_file_lines_keep_their_own_settings():
    lines = [PromptLine("a red fox", {}, 1), PromptLine("a blue bird", {"seed": 100, "steps": 2}, 3),
             PromptLine("a green frog", {"sampler": "ddim"}, 4)]
    plan = sdcli.plan_run(params(seed=1, steps=3), prompts=lines)
    assert plan.prompts == ["a red fox", "a blue bird", "a green frog"]
    assert plan.seeds == [1, 100, 2]  # a line's own seed does not move the count
    assert [job.params.steps for job in plan.jobs] == [3, 2, 3]
    assert [job.params.sampler for job in plan.jobs] == [None, None, "ddim"]


@pytest.mark.parametrize("changes, lines, message", [
    (dict(width=60), None, "multiple of 8"),
    (dict(), [PromptLine("x", {"sampler": "eulr"}, 1)], "unknown scheduler 'eulr'"),
    (dict(), [PromptLine("x", {"steps": 0}, 1)], "steps must be at least 1"),
])
def test_every_batch_is_validated_before_anything_runs(changes, lines, message):
    with pytest.raises(SdcliError, match=message):
        sdcli.plan_run(params(seed=1, **changes), prompts=lines)


def test_latents_give_the_size_and_each_batch_its_noise():
    latents = np.random.default_rng(0).standard_normal((3, 4, 6, 10)).astype(np.float64)
    plan = sdcli.plan_run(params(seed=1), num_images=3, batch_size=2, latents=latents, family=SD)
    assert {(job.params.width, job.params.height) for job in plan.jobs} == {(80, 48)}
    np.testing.assert_array_equal(np.concatenate([job.initial_noise for job in plan.jobs]),
                                  latents.astype(np.float32))
    assert all(job.initial_noise.dtype == np.float32 for job in plan.jobs)


def test_a_latents_file_is_read_and_checked_against_the_family(tmp_path):
    path = tmp_path / "noise.npy"
    np.save(path, np.zeros((4, 8, 8), np.float32))  # one image, (C, h, w)
    plan = sdcli.plan_run(params(seed=1), latents=path, family=SD)
    assert plan.jobs[0].initial_noise.shape == (1, 4, 8, 8) and plan.jobs[0].params.width == 64
    np.save(path, np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(SdcliError, match=r"--latents .*noise.npy: expected float latents of shape "
                                         r"\(images, 4, height/8, width/8\), got float32 \(1, 3, 8, 8\)"):
        sdcli.plan_run(params(seed=1), latents=path, family=SD)


@pytest.mark.parametrize("changes, count, message", [
    (dict(), 2, r"--latents holds 1 image\(s\) but the run makes 2"),
    (dict(width=128), 1, "--width 128 does not match the latents, which make 64"),
])
def test_latents_must_match_the_run(changes, count, message):
    with pytest.raises(SdcliError, match=message):
        sdcli.plan_run(params(seed=1, **changes), num_images=count, latents=np.zeros((1, 4, 8, 8), np.float32),
                       family=SD)


def test_latents_need_the_family():
    with pytest.raises(ValueError, match="family"):
        sdcli.plan_run(params(seed=1), latents=np.zeros((1, 4, 8, 8), np.float32))
