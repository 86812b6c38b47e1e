"""The same random weights of the FULL SD1.5 architecture, written as a diffusers folder and as a single-file
(CompVis/LDM) checkpoint, give bit-identical images: the single-file name maps lose nothing and change nothing.

The weights are drawn with numpy at the scale of a trained model (unit-variance activations), stored as F16 as most
published checkpoints are, and the image is small (64x64, 2 steps) so the test stays fast.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file

import sdcli
from sdcli.config import ClipConfig, UNetConfig, VAEConfig, preset_config_dir
from sdcli.families import sd_names as names
from sdcli.io.weights import tensor_shapes
from sdcli.nn.clip import ClipTextEncoder
from sdcli.nn.tokenizer import shipped_tokenizer_dir
from sdcli.nn.unet import UNet2DConditionModel
from sdcli.nn.vae import Autoencoder

COMPONENTS = ("text_encoder", "unet", "vae")
WEIGHT_FILES = {"text_encoder": "model.safetensors", "unet": "diffusion_pytorch_model.safetensors",
                "vae": "diffusion_pytorch_model.safetensors"}


def random_tensor(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Values of a trained model's scale: norm scales near 1, small biases, weights of variance 1/fan-in."""
    if "norm" in name and name.endswith("weight"):
        values = 1.0 + 0.1 * rng.standard_normal(shape)
    elif name.endswith("bias") or len(shape) == 1:
        values = 0.02 * rng.standard_normal(shape)
    elif "embedding" in name:
        values = 0.02 * rng.standard_normal(shape)
    else:
        values = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
    return values.astype(np.float16)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    configs = preset_config_dir("sd15")
    read = lambda component: json.loads((configs / component / "config.json").read_text())  # noqa: E731
    networks = {"text_encoder": (ClipTextEncoder, ClipConfig), "unet": (UNet2DConditionModel, UNetConfig),
                "vae": (Autoencoder, VAEConfig)}
    shapes = {component: tensor_shapes(lambda params: network(params, config.from_diffusers(read(component))))
              for component, (network, config) in networks.items()}
    maps = {"text_encoder": names.text_encoder_sd1_names(read("text_encoder")), "unet": names.unet_names(read("unet")),
            "vae": names.vae_names(read("vae"))}
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("sd15-random")
    folder = root / "folder"
    shutil.copytree(configs, folder)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(shipped_tokenizer_dir() / name, folder / "tokenizer" / name)
    single: dict[str, np.ndarray] = {}
    for component in COMPONENTS:
        state = {name: random_tensor(rng, name, shape) for name, shape in shapes[component].items()}
        save_file(state, str(folder / component / WEIGHT_FILES[component]))
        for name, value in state.items():
            key = maps[component][name]
            assert key.part is None  # SD1 has no fused tensors
            # the LDM VAE stores its attention projections as 1x1 convolutions
            single[key.name] = value.reshape(*value.shape, 1, 1) if key.shape is not None else value
        del state
    path = root / "v1-5-random.safetensors"
    save_file(single, str(path))
    del single
    return folder, path


def test_folder_and_single_file_give_identical_images(layouts):
    folder, single = layouts
    params = sdcli.GenerateParams(prompt="a photograph of an astronaut riding a horse", negative_prompt="blurry",
                                  steps=2, sampler="euler", width=64, height=64, seed=3)
    images = []
    for path in (folder, single):
        pipeline = sdcli.load_pipeline(str(path))
        assert pipeline.checkpoint.layout == ("diffusers" if path == folder else "single-file")
        images.append(sdcli.generate_image(pipeline, params).images)
        del pipeline
    assert np.isfinite(images[0]).all() and images[0].std() > 1e-3
    np.testing.assert_array_equal(images[0], images[1])
