"""Text to image end to end against diffusers' StableDiffusionPipeline, on tiny random models of the SD1 and SD2
structures (64x64 pixels), from the same initial latents (diffusers' ``latents=``), with classifier-free guidance.

Every deterministic sampler must give the same picture; every registered sampler runs, deterministically per seed.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch/diffusers are the pipeline reference")
pytest.importorskip("diffusers")

import tiny_pipeline as tiny  # noqa: E402

import sdcli  # noqa: E402
from sdcli.errors import SdcliError  # noqa: E402
from sdcli.ops.parameter import parameters  # noqa: E402
from sdcli.rng import BatchNoise  # noqa: E402
from sdcli.sampling.plans import SAMPLERS  # noqa: E402
from data_paths import CONFIGS  # noqa: E402

TOL = {
    # The bound for float32 parity on pixels in [0, 1]. The images are made from the same latents by the
    # same maths; what differs is float32 summation order in every network call, compounded over the steps.
    "pixels": 2 / 255,
    # An image made alone against the same image made in a batch of two (pixels in [-1, 1]): sdcli against itself,
    # but a matrix product of 2 rows and one of 4 sum in different orders where numpy's OpenBLAS picks its kernel
    # by shape and CPU, compounded over the steps. Measured: below 1e-5 with OpenBLAS's AVX-512 kernels, up to
    # 1.75e-5 with its Haswell (AVX2) kernels (OPENBLAS_CORETYPE=Haswell); a hundredth of an 8-bit level.
    "batched": 4e-5,
}
PROMPT, NEGATIVE = "a photograph of an astronaut riding a horse", "blurry, low quality"
# Step counts per sampler, between 4 and 10, so that first steps, multistep warm-up and final-order rules all run.
STEPS = {"ddim": 4, "pndm": 7, "euler": 5, "heun": 4, "dpmpp_2m": 10, "dpmpp_2m_karras": 6, "unipc": 8,
         "ddpm": 5, "euler_a": 5, "lcm": 4}
DETERMINISTIC = [name for name, spec in SAMPLERS.items() if not spec.stochastic]


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def model(request, tmp_path_factory):
    family = request.param
    reference, folder = tiny.make_tiny_model(family, tmp_path_factory.mktemp(family) / "model")
    configs = CONFIGS / tiny.SCHEDULER_CONFIGS[family]
    return dict(family=family, reference=reference, folder=folder, configs=configs,
                pipeline=sdcli.load_pipeline(str(folder)))


def unit_latents(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 4, 8, 8)).astype(np.float32)


def ours(model, sampler: str, steps: int, latents: np.ndarray, **changes) -> np.ndarray:
    """sdcli's images (B, H, W, 3) in [0, 1], as diffusers' output_type="np" gives them."""
    params = sdcli.GenerateParams(prompt=PROMPT, negative_prompt=NEGATIVE, steps=steps, sampler=sampler,
                                  width=64, height=64, seed=0, batch_size=latents.shape[0], **changes)
    batch = sdcli.generate_image(model["pipeline"], params, initial_noise=latents)
    return np.clip(batch.images.transpose(0, 2, 3, 1) / 2 + 0.5, 0, 1)


def reference(model, sampler: str, steps: int, latents: np.ndarray, guidance: float = 7.5, **options) -> np.ndarray:
    spec = SAMPLERS[sampler]
    scheduler = tiny.scheduler_from_file(spec.diffusers_class, model["configs"], **spec.diffusers_options)
    return tiny.reference_images(model["reference"], scheduler, PROMPT, NEGATIVE, steps, guidance, latents,
                                 **options)


@pytest.mark.parametrize("sampler", DETERMINISTIC)
def test_images_match_diffusers(model, sampler):
    latents = unit_latents(2)
    got = ours(model, sampler, STEPS[sampler], latents)
    expected = reference(model, sampler, STEPS[sampler], latents)
    assert got.shape == expected.shape == (2, 64, 64, 3)
    assert 0.02 < expected.std()  # a picture, not a flat field: differences would show
    assert np.abs(got - expected).max() <= TOL["pixels"], (sampler, float(np.abs(got - expected).max()))


def penultimate_embeddings(model, prompt: str) -> "torch.Tensor":
    """The text encoder's penultimate layer through the final layer norm: what clip skip 2 conditions on. (Built
    here because diffusers 0.42's own clip_skip reaches for ``text_encoder.text_model``, which transformers 5's
    CLIPTextModel no longer has.)"""
    pipeline = model["reference"]
    ids = pipeline.tokenizer([prompt], padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
    encoder = pipeline.text_encoder
    final_norm = encoder.text_model.final_layer_norm if hasattr(encoder, "text_model") else encoder.final_layer_norm
    with torch.no_grad():
        return final_norm(encoder(ids, output_hidden_states=True).hidden_states[-2])


def test_guidance_rescale_and_clip_skip_match_diffusers(model):
    latents = unit_latents(1, seed=5)
    got = ours(model, "euler", 5, latents, guidance_rescale=0.7, clip_skip=2, guidance_scale=5.0)
    embeddings = {"prompt_embeds": penultimate_embeddings(model, PROMPT),
                  "negative_prompt_embeds": penultimate_embeddings(model, NEGATIVE)}
    spec = SAMPLERS["euler"]
    scheduler = tiny.scheduler_from_file(spec.diffusers_class, model["configs"], **spec.diffusers_options)
    expected = tiny.reference_images(model["reference"], scheduler, None, None, 5, 5.0, latents,
                                     guidance_rescale=0.7, **embeddings)
    assert np.abs(got - expected).max() <= TOL["pixels"]


def test_no_guidance_matches_diffusers(model):
    """guidance scale 1: one network call per step on the prompt alone, in both implementations."""
    latents = unit_latents(1, seed=6)
    got = ours(model, "ddim", 4, latents, guidance_scale=1.0)
    expected = reference(model, "ddim", 4, latents, guidance=1.0)
    assert np.abs(got - expected).max() <= TOL["pixels"]


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_is_deterministic_per_seed(model, sampler):
    """Same seed, same images, bit for bit; each image depends only on its own seed, not on its batch."""
    pipeline = model["pipeline"]
    params = sdcli.GenerateParams(prompt=PROMPT, steps=STEPS[sampler], sampler=sampler, width=64, height=64,
                                  seed=41, batch_size=2)
    first = sdcli.generate_image(pipeline, params)
    again = sdcli.generate_image(pipeline, params)
    np.testing.assert_array_equal(first.images, again.images)
    assert first.seeds == [41, 42]
    alone = sdcli.generate_image(pipeline, params.with_(seed=42, batch_size=1))
    np.testing.assert_allclose(alone.images[0], first.images[1], rtol=0, atol=TOL["batched"])
    assert np.isfinite(first.images).all() and first.images.std() > 0.01


def test_each_stage_lets_its_prepared_weights_go(model):
    """After a run, no layer of the text encoder, the UNet or the VAE holds a weight it prepared (packed) from the
    mapped files: each stage drops them when the next starts, and the next run makes them again, to the bit."""
    pipeline = model["pipeline"]
    params = sdcli.GenerateParams(prompt=PROMPT, steps=2, sampler="euler", width=64, height=64, seed=3)
    first = sdcli.generate_image(pipeline, params)
    for network in (pipeline.prompt_encoder.text_encoder, pipeline.network, pipeline.decoder):
        matrices = [parameter for parameter in parameters(network) if parameter.data.ndim >= 2]
        assert matrices and not any(matrix.is_prepared for matrix in matrices)
    np.testing.assert_array_equal(sdcli.generate_image(pipeline, params).images, first.images)


def test_steps_are_reported_in_order(model):
    params = sdcli.GenerateParams(prompt=PROMPT, steps=4, sampler="euler", width=64, height=64, seed=1)
    records = list(model["pipeline"].run(params, preview_every=2))
    steps, result = records[:-1], records[-1]
    assert [r.index for r in steps] == [0, 1, 2, 3] and all(r.total == 4 for r in steps)
    assert [r.preview is not None for r in steps] == [False, True, False, True]
    assert steps[1].preview.shape == (1, 3, 64, 64)
    sigmas = [r.sigma for r in steps]
    assert sigmas == sorted(sigmas, reverse=True)
    assert isinstance(result, sdcli.GeneratedBatch) and result.params.seed == 1


@pytest.mark.parametrize("changes,message", [
    (dict(width=60), "multiple of 8"), (dict(height=0), "multiple of 8"), (dict(steps=0), "steps"),
    (dict(sampler="nonsense"), "unknown sampler"), (dict(guidance_rescale=2.0), "rescale"),
])
def test_bad_parameters_are_clear_errors(model, changes, message):
    params = sdcli.GenerateParams(prompt=PROMPT, steps=2, width=64, height=64, seed=1).with_(**changes)
    with pytest.raises(SdcliError, match=message):
        sdcli.generate_image(model["pipeline"], params)


def test_initial_latents_of_the_wrong_shape_are_refused(model):
    params = sdcli.GenerateParams(prompt=PROMPT, steps=2, width=64, height=64, seed=1)
    with pytest.raises(SdcliError, match="shape"):
        sdcli.generate_image(model["pipeline"], params, initial_noise=np.zeros((1, 4, 4, 4), np.float32))


def test_injected_seed_noise_reproduces_the_seeded_run_for_a_stochastic_sampler(model):
    """Initial latents given explicitly leave the sampler's later noise draws as the seed makes them."""
    params = sdcli.GenerateParams(prompt=PROMPT, steps=4, sampler="euler_a", width=64, height=64, seed=9)
    seeded = sdcli.generate_image(model["pipeline"], params)
    injected = sdcli.generate_image(model["pipeline"], params,
                                    initial_noise=BatchNoise([9], (4, 8, 8)).draw())
    np.testing.assert_array_equal(seeded.images, injected.images)
