"""The networks keep their activations inside the backend: on the opaque test backend (arrays that refuse every
conversion to numpy, see opaque_backend.py) CLIP, the UNet, the VAE (whole and tiled) and TAESD run, and give the
numpy reference's results bit for bit. A network that did numpy work between ops would raise here."""

from __future__ import annotations

import numpy as np
import pytest

from opaque_backend import OpaqueArray, opaque_ops

from sdcli.config import ClipConfig, UNetConfig, VAEConfig
from sdcli.io.weights import ArraySource, load_network, tensor_shapes
from sdcli.nn.clip import ClipTextEncoder
from sdcli.nn.taesd import TaesdDecoder, TaesdEncoder
from sdcli.nn.unet import UNet2DConditionModel
from sdcli.nn.vae import Autoencoder
from sdcli.ops import numpy_ops

CLIP = {"vocab_size": 1000, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
        "num_attention_heads": 4, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
UNET = {"block_out_channels": [32, 64], "layers_per_block": 1, "cross_attention_dim": 24, "attention_head_dim": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "norm_num_groups": 8, "sample_size": 8,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}
UNETS = {"sd1": UNET,
         # SD2's linear projections, the centred input and the asymmetric downsampling pad
         "sd2-options": {**UNET, "use_linear_projection": True, "center_input_sample": True, "downsample_padding": 0}}
VAE = {"block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8, "latent_channels": 4,
       "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2, "sample_size": 8}


def random_state(build, seed: int) -> dict[str, np.ndarray]:
    """Random float32 weights for every tensor ``build`` takes, at a trained model's scale."""
    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in tensor_shapes(build).items():
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        scale = 1 / np.sqrt(fan_in) if len(shape) > 1 else 0.1
        values = rng.standard_normal(shape) * scale
        if "norm" in name and name.endswith("weight"):
            values += 1  # norm scales near 1
        state[name] = values.astype(np.float32)
    return state


def both(build, seed: int, precision: str = "fp32"):
    """The network on the numpy backend and on the opaque one, from the same weights."""
    state = random_state(build, seed)
    return (load_network(build, ArraySource(state), numpy_ops, precision),
            load_network(build, ArraySource(state), opaque_ops, precision))


def on_opaque(network, *arrays, **options) -> np.ndarray:
    """Run ``network`` with the float arrays moved to the opaque backend; the result back on the host."""
    moved = [opaque_ops.from_host(a) if isinstance(a, np.ndarray) and a.dtype.kind == "f" and a.ndim > 1 else a
             for a in arrays]
    out = network(*moved, **options)
    assert isinstance(out, OpaqueArray)
    return opaque_ops.to_host(out)


def test_the_arrays_refuse_numpy():
    x = opaque_ops.from_host(np.ones((2, 3), np.float32))
    for attempt in (lambda: np.asarray(x), lambda: x + 1, lambda: np.exp(x), lambda: x[0], lambda: list(x),
                    lambda: float(x)):
        with pytest.raises(TypeError):
            attempt()
    with pytest.raises(TypeError, match="host numpy array"):
        opaque_ops.add(x, np.ones((2, 3), np.float32))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_clip(precision):
    config = ClipConfig.from_diffusers(CLIP)
    reference, opaque = both(lambda params: ClipTextEncoder(params, config), 1, precision)
    ids = np.random.default_rng(2).integers(0, 1000, (2, 77))
    for clip_skip in (1, 2):
        np.testing.assert_array_equal(on_opaque(opaque, ids, clip_skip=clip_skip), reference(ids, clip_skip=clip_skip))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_clip_with_added_tokens(precision):
    """Textual-inversion vectors (ids after the vocabulary) join the token rows through ops alone."""
    config = ClipConfig.from_diffusers(CLIP)
    reference, opaque = both(lambda params: ClipTextEncoder(params, config), 1, precision)
    ids = np.random.default_rng(2).integers(0, 1002, (2, 77))
    added = np.random.default_rng(3).standard_normal((2, 32)).astype(np.float32) * 0.02
    np.testing.assert_array_equal(on_opaque(opaque, ids, added_tokens=added), reference(ids, added_tokens=added))


@pytest.mark.parametrize("variant", sorted(UNETS))
@pytest.mark.parametrize("size", [(8, 8), (9, 7)])  # odd sizes: the upsampler resizes to the skip's size
def test_unet(variant, size):
    config = UNetConfig.from_diffusers(UNETS[variant])
    reference, opaque = both(lambda params: UNet2DConditionModel(params, config), 3)
    rng = np.random.default_rng(4)
    sample = rng.standard_normal((2, 4, *size), dtype=np.float32)
    context = rng.standard_normal((2, 77, 24), dtype=np.float32)
    timesteps = np.array([980.5, 3.0])
    np.testing.assert_array_equal(on_opaque(opaque, sample, timesteps, context), reference(sample, timesteps, context))


@pytest.mark.parametrize("tiling", [False, True])
def test_vae(tiling):
    config = VAEConfig.from_diffusers(VAE)
    reference, opaque = both(lambda params: Autoencoder(params, config, tiling=tiling), 5)
    rng = np.random.default_rng(6)
    latents = rng.standard_normal((2, 4, 9, 7) if tiling else (2, 4, 4, 4), dtype=np.float32)
    if tiling:
        assert max(latents.shape[2:]) > reference.decoder.tile_latent_size  # really tiled
    np.testing.assert_array_equal(on_opaque(opaque.decoder, latents), reference.decoder(latents))
    images = rng.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    np.testing.assert_array_equal(on_opaque(opaque.encoder, images), reference.encoder(images))
    np.testing.assert_array_equal(on_opaque(opaque.encoder, images, rng=np.random.default_rng(8)),
                                  reference.encoder(images, rng=np.random.default_rng(8)))


def test_taesd():
    encoder, opaque_encoder = both(TaesdEncoder, 9)
    decoder, opaque_decoder = both(TaesdDecoder, 10)
    rng = np.random.default_rng(11)
    latents = rng.standard_normal((1, 4, 4, 5), dtype=np.float32)
    np.testing.assert_array_equal(on_opaque(opaque_decoder, latents), decoder(latents))
    images = rng.uniform(-1, 1, (1, 3, 16, 8)).astype(np.float32)
    np.testing.assert_array_equal(on_opaque(opaque_encoder, images), encoder(images))
