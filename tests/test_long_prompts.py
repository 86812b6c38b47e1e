"""Long and weighted prompts through the whole pipeline against diffusers, on the tiny random SD1 and SD2 models.

diffusers has no weighting syntax and cuts prompts at 77 tokens, but its pipeline takes ``prompt_embeds`` of any
length. The reference conditioning is built here with transformers' text encoder from the webui's chunks (the
ids sdcli's chunker makes, checked by hand in test_prompt_weighting): each chunk encoded, the weights applied
and the chunk's mean restored in float64, the chunks concatenated, the negative prompt extended with the empty
prompt's encoding. The images then check the UNet's cross-attention over 154 tokens against diffusers'.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch/diffusers are the pipeline reference")
pytest.importorskip("diffusers")

import tiny_pipeline as tiny  # noqa: E402

import sdcli  # noqa: E402
from data_paths import CONFIGS  # noqa: E402
from sdcli.sampling.plans import SAMPLERS  # noqa: E402

TOL = {
    # float32 text encoders (sdcli's and transformers') against each other, then the weighting in float32 against
    # float64: summation orders over 2 tiny layers and the two means.
    "conditioning": 1e-5,
    # The bound for float32 parity on pixels in [0, 1], as in test_pipeline.
    "pixels": 2 / 255,
}
PROMPT = ("a (red fox:1.3) in ((deep)) snow, [blurry], " + "pine trees, mountains, dusk light, " * 10
          + "BREAK photograph")  # 3 chunks: 75 tokens, a comma break, then BREAK
NEGATIVE = "low quality, (watermark:1.2)"


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def model(request, tmp_path_factory):
    family = request.param
    reference, folder = tiny.make_tiny_model(family, tmp_path_factory.mktemp(f"long-{family}") / "model")
    return dict(family=family, reference=reference, pipeline=sdcli.load_pipeline(str(folder)),
                configs=CONFIGS / tiny.SCHEDULER_CONFIGS[family])


def reference_conditioning(model, text: str) -> np.ndarray:
    """(1, 77 k, D): transformers' encoding of each of the webui's chunks, weighted and mean-restored."""
    chunks = model["pipeline"].prompt_encoder.chunks(text)
    encoded = []
    for chunk in chunks:
        with torch.no_grad():
            z = model["reference"].text_encoder(torch.from_numpy(chunk.ids[None])).last_hidden_state
        z = z.numpy()[0].astype(np.float64)  # (77, D)
        weighted = z * chunk.weights[:, None]
        encoded.append(weighted * (z.mean() / weighted.mean()))
    return np.concatenate(encoded)[None].astype(np.float32)  # (1, 77 k, D)


def test_weighted_long_prompts_match_a_reference_built_from_the_chunks(model):
    pipeline = model["pipeline"]
    assert len(pipeline.prompt_encoder.chunks(PROMPT)) == 3
    cond = reference_conditioning(model, PROMPT)
    uncond = np.concatenate([reference_conditioning(model, NEGATIVE)] + [reference_conditioning(model, "")] * 2,
                            axis=1)  # (1, 231, D): the empty prompt's encoding twice more, as the webui pads
    ours_cond = pipeline.conditioning(PROMPT)
    ours_uncond = pipeline.conditioning(NEGATIVE)
    assert ours_cond.shape == cond.shape == uncond.shape == (1, 231, 32) and ours_uncond.shape == (1, 77, 32)
    assert np.abs(ours_cond - cond).max() <= TOL["conditioning"]
    assert np.abs(ours_uncond - uncond[:, :77]).max() <= TOL["conditioning"]

    latents = np.random.default_rng(2).standard_normal((1, 4, 8, 8)).astype(np.float32)
    params = sdcli.GenerateParams(prompt=PROMPT, negative_prompt=NEGATIVE, steps=4, sampler="dpmpp_2m", width=64,
                                  height=64, seed=0)
    ours = (sdcli.generate_image(pipeline, params, initial_noise=latents).images.transpose(0, 2, 3, 1) + 1) / 2
    spec = SAMPLERS["dpmpp_2m"]
    scheduler = tiny.scheduler_from_file(spec.diffusers_class, model["configs"], **spec.diffusers_options)
    expected = tiny.reference_images(model["reference"], scheduler, None, None, 4, 7.5, latents,
                                     prompt_embeds=torch.from_numpy(cond),
                                     negative_prompt_embeds=torch.from_numpy(uncond))
    difference = float(np.abs(np.clip(ours, 0, 1) - expected).max())
    print(f"weighted 3-chunk prompt, tiny {model['family']}: max |diff| {difference * 255:.3f} / 255")
    assert difference <= TOL["pixels"]
