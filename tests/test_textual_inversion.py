"""Textual inversion against diffusers' ``load_textual_inversion``: images of the tiny random SD1 and SD2 models
and of the full SD1.5 architecture at 64x64 from the same initial latents, and the conditioning of the full-size
SD2.1 text encoder (random weights), with a single-vector AUTOMATIC1111 embedding and a three-vector diffusers
one, used in the prompt and in the negative prompt.

Like for like: diffusers tokenizes the whole prompt, the webui (and sdcli) each weighted fragment; the prompts
here have no weighting syntax, where the two agree. diffusers finds an embedding's token anywhere in the text and
spells a multi-vector one ``name name_1 name_2``; sdcli finds the name's tokens as the webui does. The names are
whole words here, found the same either way.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch/diffusers are the textual-inversion reference")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import tiny_pipeline as tiny  # noqa: E402
import reference_models as ref  # noqa: E402

import sdcli  # noqa: E402
from data_paths import CONFIGS  # noqa: E402
from sdcli.io.safetensors import save_file  # noqa: E402
from sdcli.nn.tokenizer import shipped_tokenizer_dir  # noqa: E402
from sdcli.sampling.plans import SAMPLERS  # noqa: E402

TOL = {
    # The bound for float32 parity on pixels in [0, 1] (as test_pipeline: the same latents through the
    # same maths, float32 summation orders differing in every network call).
    "pixels": 2 / 255,
    # The conditioning of the full-size text encoders in float32 (as test_clip: summation orders over 12-23
    # layers).
    "conditioning": 1e-4,
}
PROMPT = "a photo of mystyle riding a horse next to <toy> , highly detailed"
NEGATIVE = "blurry <toy> painting"
STEPS, SAMPLER = 4, "euler"


def embedding_files(folder, width: int, seed: int):
    """A single-vector AUTOMATIC1111 file (named by its stem, "mystyle") and a three-vector diffusers file (named
    by its token, "<toy>"), random, of scale like CLIP's token table; and the (token, vectors) diffusers loads."""
    rng = np.random.default_rng(seed)
    style = (rng.standard_normal((1, width)) * 0.02).astype(np.float32)
    toy = (rng.standard_normal((3, width)) * 0.02).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(folder / "mystyle.safetensors", {"emb_params": style})
    save_file(folder / "learned_embeds.safetensors", {"<toy>": toy})
    return [folder / "mystyle.safetensors", folder / "learned_embeds.safetensors"], [("mystyle", style),
                                                                                      ("<toy>", toy)]


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def tiny_model(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(f"ti-{family}")
    reference, folder = tiny.make_tiny_model(family, root / "model")
    files, loaded = embedding_files(root / "embeddings", tiny.TEXT_CONFIGS[family]["hidden_size"], seed=3)
    for token, vectors in loaded:
        reference.load_textual_inversion(torch.from_numpy(vectors), token=token)
    return dict(family=family, reference=reference, folder=folder, files=files,
                configs=CONFIGS / tiny.SCHEDULER_CONFIGS[family])


def test_images_match_diffusers_load_textual_inversion(tiny_model):
    latents = np.random.default_rng(4).standard_normal((1, 4, 8, 8)).astype(np.float32)
    pipeline = sdcli.load_pipeline(str(tiny_model["folder"]), embeddings=tiny_model["files"])
    params = sdcli.GenerateParams(prompt=PROMPT, negative_prompt=NEGATIVE, steps=STEPS, sampler=SAMPLER, width=64,
                                  height=64, seed=0)
    ours = (sdcli.generate_image(pipeline, params, initial_noise=latents).images.transpose(0, 2, 3, 1) + 1) / 2
    spec = SAMPLERS[SAMPLER]
    scheduler = tiny.scheduler_from_file(spec.diffusers_class, tiny_model["configs"], **spec.diffusers_options)
    expected = tiny.reference_images(tiny_model["reference"], scheduler, PROMPT, NEGATIVE, STEPS, 7.5, latents)
    plain = sdcli.generate_image(sdcli.load_pipeline(str(tiny_model["folder"])), params, initial_noise=latents)
    plain = (plain.images.transpose(0, 2, 3, 1) + 1) / 2  # (1, 64, 64, 3) in [0, 1]
    difference = float(np.abs(np.clip(ours, 0, 1) - expected).max())
    print(f"textual inversion, tiny {tiny_model['family']}: max |diff| {difference * 255:.3f} / 255")
    assert difference <= TOL["pixels"]
    assert np.abs(plain - ours).max() > 10 * TOL["pixels"]  # the embeddings changed the picture: a real test


@pytest.mark.parametrize("name", ["sd21"])
def test_full_size_conditioning_matches_diffusers(name, tmp_path):
    """The full OpenCLIP ViT-H/14 text encoder of SD2.1 (1024 wide) with random weights: sdcli's conditioning of
    the prompt and the negative prompt against the ids diffusers makes after ``load_textual_inversion``, through
    the extended token table. (SD1.5 is checked whole, images included, below; the SD2.1 UNet, unchanged by an
    embedding, at full size in test_unet.)"""
    configs = CONFIGS / name
    text_config = json.loads((configs / "text_encoder" / "config.json").read_text())
    model = ref.random_clip_text_model(text_config, seed=5)
    folder = ref.write_diffusers_folder(tmp_path / "model", configs, text_config, ref.canonical_state(model))
    files, loaded = embedding_files(tmp_path / "embeddings", text_config["hidden_size"], seed=6)
    encoder = sdcli.load_prompt_encoder(str(folder), embeddings=files)
    ours = encoder.encode([PROMPT, NEGATIVE])  # (2, 77, D)

    tokenizer_dir = shipped_tokenizer_dir()
    pad = json.loads((configs / "tokenizer" / "special_tokens_map.json").read_text())["pad_token"]
    tokenizer = transformers.CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"),
                                           pad_token=pad if isinstance(pad, str) else pad["content"],
                                           model_max_length=77)
    holder = diffusers.loaders.TextualInversionLoaderMixin()
    holder.hf_device_map, holder.components = None, {}
    for token, vectors in loaded:
        holder.load_textual_inversion(torch.from_numpy(vectors), token=token, tokenizer=tokenizer,
                                      text_encoder=model)
    texts = holder.maybe_convert_prompt([PROMPT, NEGATIVE], tokenizer)
    ids = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    # the same ids: the embeddings' vectors numbered after the vocabulary in the order they were loaded
    np.testing.assert_array_equal(ids.numpy(), np.stack([encoder.chunks(text)[0].ids for text in (PROMPT, NEGATIVE)]))
    with torch.no_grad():
        expected = model(ids).last_hidden_state.numpy()
    difference = float(np.abs(ours - expected).max())
    print(f"textual inversion, full-size {name} text encoder: max |diff| {difference:.2e}")
    assert difference <= TOL["conditioning"]


def test_full_sd15_images_match_diffusers(tmp_path):
    """The full SD1.5 architecture (CLIP ViT-L/14, the 860M-parameter UNet, the KL VAE) with random weights at
    64x64, three Euler steps: sdcli's image with both embeddings against diffusers' after load_textual_inversion,
    from the same latents. About 40 s, most of it building and writing the 3.4 GB UNet."""
    configs = CONFIGS / "sd15"
    config = {name: json.loads((configs / name / "config.json").read_text())
              for name in ("text_encoder", "unet", "vae")}
    text_encoder = ref.random_clip_text_model(config["text_encoder"], seed=5)
    unet = ref.random_unet(config["unet"], seed=6)
    vae = ref.random_vae(config["vae"], seed=7)
    folder = tmp_path / "sd15"
    ref.write_diffusers_folder(folder, configs, config["text_encoder"], ref.canonical_state(text_encoder))
    ref.write_unet_folder(folder, configs, config["unet"], ref.unet_state(unet))
    ref.write_vae_folder(folder, configs, config["vae"], ref.vae_state(vae))
    tokenizer_dir = shipped_tokenizer_dir()
    tokenizer = transformers.CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"),
                                           pad_token="<|endoftext|>", model_max_length=77)
    spec = SAMPLERS[SAMPLER]
    reference = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=tiny.scheduler_from_file(spec.diffusers_class, configs), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    files, loaded = embedding_files(tmp_path / "embeddings", 768, seed=6)
    for token, vectors in loaded:
        reference.load_textual_inversion(torch.from_numpy(vectors), token=token)
    latents = np.random.default_rng(4).standard_normal((1, 4, 8, 8)).astype(np.float32)
    scheduler = tiny.scheduler_from_file(spec.diffusers_class, configs, **spec.diffusers_options)
    expected = tiny.reference_images(reference, scheduler, PROMPT, NEGATIVE, 3, 7.5, latents)
    pipeline = sdcli.load_pipeline(str(folder), embeddings=files)
    params = sdcli.GenerateParams(prompt=PROMPT, negative_prompt=NEGATIVE, steps=3, sampler=SAMPLER, width=64,
                                  height=64, seed=0)
    ours = (sdcli.generate_image(pipeline, params, initial_noise=latents).images.transpose(0, 2, 3, 1) + 1) / 2
    difference = float(np.abs(np.clip(ours, 0, 1) - expected).max())
    print(f"textual inversion, full SD1.5 at 64x64: max |diff| {difference * 255:.4f} / 255")
    assert 0.02 < expected.std()  # a picture, not a flat field
    assert difference <= TOL["pixels"]
