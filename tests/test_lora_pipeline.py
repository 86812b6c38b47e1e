"""LoRAs in whole text-to-image runs against diffusers' ``load_lora_weights`` + ``fuse_lora`` (which fuses the
text encoder's layers as well as the UNet's), on the tiny random SD1 and SD2 (OpenCLIP-shaped, v-prediction)
models of tiny_pipeline: kohya files (UNet and text encoder), peft files (UNet and text encoder), LyCORIS LoCon
files (3x3 convolution layers), a text-encoder-only kohya file, each at weights 0.5 and 1.0, and two LoRAs at once.

sdcli's side runs one pipeline per model for every case, the LoRAs given by A1111 tags in the prompt
(``<lora:name:weight>``): each case switches the networks to its set, and the last one back to none, which must
give the plain run's bits."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import reference_models as ref
import sdcli

tiny = pytest.importorskip("tiny_pipeline")

TOL = {
    # The bound on pixels in [0, 1] for the same initial noise: float32 on both sides, the LoRA merged
    # into the weights on both (diffusers' fuse_lora, sdcli's LoraMergedSource), so what differs is float32
    # summation order, compounded over the steps.
    "pixels": 2 / 255,
    # how far a LoRA must move the image for the comparison to mean something (pixels in [0, 1])
    "moved": 0.02,
}
PROMPT, NEGATIVE = "a photograph of an astronaut riding a horse", "blurry, low quality"
STEPS, SAMPLER = 3, "ddim"
# the LoCon layers: every resnet convolution, and the UNet's first and last convolutions
LOCON_LAYERS = ("conv1", "conv2", "conv_shortcut", "conv_in", "conv_out")
TEXT_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def random_pair(rng, shape, rank):
    """A LoRA's down (rank, in[, kh, kw]) and up (out, rank[, 1, 1]) for a weight of ``shape``, scaled so that a
    layer's update is about a tenth of a unit-variance weight's."""
    fan_in = int(np.prod(shape[1:]))
    down = (rng.standard_normal((rank, *shape[1:])) / np.sqrt(fan_in)).astype(np.float32)
    up = (0.3 * rng.standard_normal((shape[0], rank, *(1,) * (len(shape) - 2))) / np.sqrt(rank)).astype(np.float32)
    return down, up


def text_targets(shapes):
    return [name for name in shapes if name.endswith(".weight") and name.split(".")[-2] in TEXT_LAYERS]


def kohya_file(model, path, seed):
    """kohya names over every UNet Linear and convolution and every text-encoder projection, alpha 2 on every
    layer (ranks 2 and 4): diffusers' kohya converter gives the attention projections the file's most common
    alpha rather than their own (its alpha_pattern misses them), so alphas that differ by layer are tested
    against hand-computed merges in test_lora.py instead."""
    tensors = ref.kohya_lora(model["unet_shapes"], ref.lora_targets(model["unet_shapes"]), seed=seed, alphas="same")
    rng = np.random.default_rng(seed + 100)
    for i, name in enumerate(text_targets(model["text_shapes"])):
        module = "lora_te_" + name.removesuffix(".weight").replace(".", "_")
        rank = (2, 4)[i % 2]
        tensors[f"{module}.lora_down.weight"], tensors[f"{module}.lora_up.weight"] = random_pair(
            rng, model["text_shapes"][name], rank)
        tensors[f"{module}.alpha"] = np.array(2.0, np.float32)
    save_file(tensors, str(path))


def peft_file(model, path, seed):
    """peft names (``unet.<module>.lora_A.weight``, ``text_encoder.<module>.lora_B.weight``) as diffusers'
    save_lora_weights writes them, without metadata (alpha = rank)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for component, names, shapes in (("unet", ref.lora_targets(model["unet_shapes"]), model["unet_shapes"]),
                                      ("text_encoder", text_targets(model["text_shapes"]), model["text_shapes"])):
        for name in names:
            module = f"{component}.{name.removesuffix('.weight')}"
            tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"] = random_pair(
                rng, shapes[name], 4)
    save_file(tensors, str(path))


def locon_file(model, path, seed):
    """LoCon (kohya sd-scripts' conv_dim, LyCORIS's LoCon): kohya names on the convolutions, down (rank, in, 3,
    3), up (out, rank, 1, 1). LyCORIS may spell them in the original LDM layout
    (``lora_unet_input_blocks_1_0_in_layers_2``): those are the same layers to the bit
    (test_lora.py::test_original_layout_names_are_the_same_layers), but diffusers' converter maps that layout as
    SDXL's (two resnets per level) and drops the tiny UNet's layers as unexpected keys, so diffusers' own naming is
    the one compared here."""
    names = [name for name in ref.lora_targets(model["unet_shapes"])
             if name.split(".")[-2] in LOCON_LAYERS and len(model["unet_shapes"][name]) == 4]
    tensors = ref.kohya_lora(model["unet_shapes"], names, seed=seed, alphas="same")
    assert any(".lora_down" in key and value.ndim == 4 and value.shape[2:] == (3, 3) for key, value in tensors.items())
    save_file(tensors, str(path))


def text_file(model, path, seed):
    """kohya's text-encoder layers alone (``lora_te_text_model_encoder_layers_0_self_attn_q_proj``): the
    images move by the conditioning only."""
    kohya_file(model, path, seed)
    tensors = {key: value for key, value in load_file(str(path)).items() if key.startswith("lora_te_")}
    save_file(tensors, str(path))


FORMATS = {"kohya": kohya_file, "peft": peft_file, "locon": locon_file, "text": text_file}


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def model(request, tmp_path_factory, diffusers, peft):
    family = request.param
    root = tmp_path_factory.mktemp(f"lora-{family}")
    reference, folder = tiny.make_tiny_model(family, root / "model")
    unet_state = ref.unet_state(reference.unet)
    text_state = {name if name.startswith("text_model.") else f"text_model.{name}": value
                  for name, value in reference.text_encoder.state_dict().items()}
    model = dict(family=family, reference=reference, configs=tiny.CONFIGS / tiny.SCHEDULER_CONFIGS[family],
                 unet_shapes={name: tuple(value.shape) for name, value in unet_state.items()},
                 text_shapes={name: tuple(value.shape) for name, value in text_state.items()},
                 loras=root / "loras")
    model["loras"].mkdir()
    for seed, (name, write) in enumerate(FORMATS.items()):
        write(model, model["loras"] / f"{name}.safetensors", seed)
    model["pipeline"] = sdcli.load_pipeline(str(folder), lora_dir=model["loras"])
    return model


def latents() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)  # (B, C, h, w)


def ours(model, loras) -> np.ndarray:
    """sdcli's image (1, H, W, 3) in [0, 1] with ``loras`` ((name, weight) pairs) as tags in the prompt."""
    tags = "".join(f"<lora:{name}:{weight}>" for name, weight in loras)
    params = sdcli.GenerateParams(prompt=PROMPT + tags, negative_prompt=NEGATIVE, steps=STEPS, sampler=SAMPLER,
                                  width=64, height=64, seed=0)
    batch = sdcli.generate_image(model["pipeline"], params, initial_noise=latents())
    return np.clip(batch.images.transpose(0, 2, 3, 1) / 2 + 0.5, 0, 1)


def reference(model, loras) -> np.ndarray:
    """diffusers' image after load_lora_weights of each file and fuse_lora: at ``lora_scale`` for one LoRA, at
    the weights set_adapters gives for several."""
    from sdcli.sampling.plans import SAMPLERS

    pipeline = copy.deepcopy(model["reference"])
    names = [f"lora{i}" for i in range(len(loras))]
    for adapter, (name, _) in zip(names, loras):
        pipeline.load_lora_weights(str(model["loras"]), weight_name=f"{name}.safetensors", adapter_name=adapter)
    if len(loras) == 1:
        pipeline.fuse_lora(lora_scale=loras[0][1], adapter_names=names)
    elif loras:
        pipeline.set_adapters(names, [weight for _, weight in loras])
        pipeline.fuse_lora(adapter_names=names)
    spec = SAMPLERS[SAMPLER]
    scheduler = tiny.scheduler_from_file(spec.diffusers_class, model["configs"], **spec.diffusers_options)
    return tiny.reference_images(pipeline, scheduler, PROMPT, NEGATIVE, STEPS, 7.5, latents())


CASES = [[(name, weight)] for name in FORMATS for weight in (0.5, 1.0)] + [[("kohya", 0.5), ("peft", 1.0)]]


def test_images_match_diffusers(model):
    """Every case on one pipeline, switched from set to set; the last run, without a LoRA, gives the first's
    bits."""
    plain = ours(model, [])
    np.testing.assert_allclose(plain, reference(model, []), rtol=0, atol=TOL["pixels"])
    differences = {}
    for loras in CASES:
        got, expected = ours(model, loras), reference(model, loras)
        differences[str(loras)] = round(float(np.abs(got - expected).max()) * 255, 3)  # in 8-bit levels
        assert np.abs(expected - plain).max() > TOL["moved"], loras  # the LoRA shows
        assert np.abs(got - expected).max() <= TOL["pixels"], (loras, differences)
    print(model["family"], "max |sdcli - diffusers| in 8-bit levels:", differences)
    np.testing.assert_array_equal(ours(model, []), plain)


# -- the full SD1.5 architecture -------------------------------------------------------------------------------

from test_single_file import layouts  # noqa: E402,F401  (the random full SD1.5 folder, fp16 files)


def full_kohya_file(folder, path, seed: int = 0) -> None:
    """A rank-4 kohya LoRA over the full UNet's attention projections and resnet convolutions and the text
    encoder's projections, alpha 2, in float16 as published LoRAs are."""
    checkpoint = sdcli.open_checkpoint(folder)
    rng = np.random.default_rng(seed)
    tensors = {}
    for component, prefix, layers in (("unet", "lora_unet_", ("to_q", "to_k", "to_v", "conv1", "conv2")),
                                      ("text_encoder", "lora_te_", TEXT_LAYERS)):
        source = checkpoint.source(component)
        for name in source.keys():
            if name.endswith(".weight") and name.split(".")[-2] in layers:
                module = prefix + name.removesuffix(".weight").replace(".", "_")
                down, up = random_pair(rng, tuple(source.shape(name)), 4)
                tensors[f"{module}.lora_down.weight"] = down.astype(np.float16)
                tensors[f"{module}.lora_up.weight"] = up.astype(np.float16)
                tensors[f"{module}.alpha"] = np.array(2.0, np.float16)
    save_file(tensors, str(path))


def test_full_sd15_images_match_diffusers(layouts, tmp_path, diffusers, peft):  # noqa: F811
    """The full SD1.5 architecture (random weights) at 64x64, 2 DDIM steps, with a kohya LoRA on the UNet and the
    text encoder at 0.7, against diffusers' load_lora_weights + fuse_lora."""
    import torch

    folder, _ = layouts
    lora = tmp_path / "full.safetensors"
    full_kohya_file(folder, lora)
    noise = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)  # (B, C, h, w)
    params = sdcli.GenerateParams(prompt=PROMPT, negative_prompt=NEGATIVE, steps=2, sampler="ddim", width=64,
                                  height=64, seed=0)
    pipeline = sdcli.load_pipeline(str(folder), lora_dir=tmp_path)
    got, plain = (np.clip(sdcli.generate_image(pipeline, params.with_(prompt=prompt), initial_noise=noise)
                          .images.transpose(0, 2, 3, 1) / 2 + 0.5, 0, 1)
                  for prompt in (PROMPT + "<lora:full:0.7>", PROMPT))
    del pipeline
    reference_pipeline = diffusers.StableDiffusionPipeline.from_pretrained(
        str(folder), dtype=torch.float32, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    reference_pipeline.load_lora_weights(str(tmp_path), weight_name=lora.name, adapter_name="full")
    reference_pipeline.fuse_lora(lora_scale=0.7, adapter_names=["full"])
    scheduler = diffusers.DDIMScheduler.from_config(reference_pipeline.scheduler.config)
    expected = tiny.reference_images(reference_pipeline, scheduler, PROMPT, NEGATIVE, 2, 7.5, noise)
    difference = float(np.abs(got - expected).max())
    print("full SD1.5 max |sdcli - diffusers| in 8-bit levels:", round(difference * 255, 3))
    assert expected.std() > TOL["moved"]  # a picture, not a flat field
    assert np.abs(expected - plain).max() > TOL["moved"]  # the LoRA shows
    assert difference <= TOL["pixels"]
