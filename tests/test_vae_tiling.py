"""Tiled VAE decoding against diffusers' ``AutoencoderKL.enable_tiling()`` on random weights, and the
``--vae-tiling`` / ``--low-memory`` options of ``sdcli generate``."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

torch = pytest.importorskip("torch", reason="torch/diffusers are the VAE reference")
pytest.importorskip("diffusers")

import reference_models as ref  # noqa: E402
import tiny_pipeline as tiny  # noqa: E402

import sdcli  # noqa: E402
from sdcli.cli import main  # noqa: E402
from sdcli.config import VAEConfig  # noqa: E402
from sdcli.errors import SdcliError  # noqa: E402
from sdcli.io.weights import ArraySource, load_network  # noqa: E402
from sdcli.nn.vae import VaeDecoder, VaeEncoder  # noqa: E402
from sdcli.ops import get_ops  # noqa: E402

# Errors are relative: max |ours - reference| / max |reference| (random weights set the output scale, 1 to 3 here).
TOL = {
    # float32 through each tile's convs and group norms, then a convex blend of two tiles per seam pixel, which
    # cannot grow an error; only the summation order differs from torch (measured ~1e-6), as in test_vae's "tiny".
    "tiled": 1e-4,
    # PNG pixels against diffusers' tiled decode of the same saved latents, through images_to_uint8: a decoder
    # difference of ~1e-6 can only flip a value sitting on a rounding boundary, by one level.
    "png_levels": 1,
}
TILED_CONFIGS = {
    # Four levels (8 pixels per latent), 32-pixel tiles: 4-latent tiles, 3 apart, 8 pixels blended across a seam.
    "four-levels": {"block_out_channels": [16, 16, 32, 32], "layers_per_block": 1, "norm_num_groups": 8,
                    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
                    "latent_channels": 4, "sample_size": 32},
    # Three levels (4 pixels per latent), no quant convs, 32-pixel tiles: 8-latent tiles, 6 apart; the last row
    # of tiles is one latent (4 pixels), narrower than the 8-pixel blend, which then shrinks to fit.
    "three-levels": {"block_out_channels": [16, 32, 32], "layers_per_block": 1, "norm_num_groups": 8,
                     "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
                     "latent_channels": 4, "sample_size": 32, "use_post_quant_conv": False,
                     "use_quant_conv": False, "scaling_factor": 0.5},
}
LATENT_SHAPE = (2, 4, 13, 10)  # several tiles each way, a multiple of neither the tile nor the stride


def relative_error(ours: np.ndarray, expected: np.ndarray) -> float:
    assert ours.shape == expected.shape
    return float(np.max(np.abs(ours - expected)) / np.max(np.abs(expected)))


def reference_decode(model, latents: np.ndarray, scaling_factor: float, tiling: bool) -> np.ndarray:
    if tiling:
        model.enable_tiling()
    else:
        model.disable_tiling()
    with torch.no_grad():
        return model.decode(torch.from_numpy(latents / np.float32(scaling_factor))).sample.numpy()


@pytest.fixture(scope="module", params=list(TILED_CONFIGS))
def tiled(request):
    model = ref.random_vae(TILED_CONFIGS[request.param], seed=5)
    config = VAEConfig.from_diffusers(dict(model.config))
    return dict(model=model, config=config, weights=ref.vae_state(model))


def decoder_of(ops, config: VAEConfig, state: dict[str, np.ndarray], tiling: bool = False) -> VaeDecoder:
    """The decoder over arrays in memory (the encoder's tensors checked, not read)."""
    return load_network(lambda params: VaeDecoder(params, config, tiling=tiling), ArraySource(state), ops,
                        also_checks=lambda params: VaeEncoder(params, config))


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_tiled_decode_equals_diffusers_tiled_decode(tiled, backend):
    config = tiled["config"]
    latents = np.random.default_rng(6).standard_normal(LATENT_SHAPE, dtype=np.float32)
    expected = reference_decode(tiled["model"], latents, config.scaling_factor, tiling=True)
    decoder = decoder_of(get_ops(backend), config, tiled["weights"], tiling=True)
    assert max(LATENT_SHAPE[2:]) > decoder.tile_latent_size  # diffusers really tiles
    decoded = decoder(latents)
    assert decoded.shape == (2, 3, 13 * config.downscale, 10 * config.downscale)
    assert relative_error(decoded, expected) <= TOL["tiled"]
    # The tiles are not the whole image: the untiled decode differs far beyond the tolerance, so the
    # comparison above could not pass by decoding whole.
    whole = decoder_of(get_ops(backend), config, tiled["weights"])(latents)
    assert relative_error(whole, expected) > 100 * TOL["tiled"]


def test_within_one_tile_decodes_whole(tiled):
    """A latent no larger than a tile is decoded exactly as without tiling (diffusers' condition: tile only when
    a side exceeds tile_latent_min_size)."""
    config, ops = tiled["config"], get_ops("cpu")
    side = decoder_of(ops, config, tiled["weights"]).tile_latent_size
    latents = np.random.default_rng(7).standard_normal((1, 4, side, side - 1), dtype=np.float32)
    tiled_result = decoder_of(ops, config, tiled["weights"], tiling=True)(latents)
    np.testing.assert_array_equal(tiled_result, decoder_of(ops, config, tiled["weights"])(latents))
    expected = reference_decode(tiled["model"], latents, config.scaling_factor, tiling=True)
    assert relative_error(tiled_result, expected) <= TOL["tiled"]


# -- the pipeline and the CLI on the tiny model ---------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny.make_tiny_model("sd1", tmp_path_factory.mktemp("tiling") / "tiny-sd1")


def test_low_memory_pipeline_same_images_without_text_encoder(model):
    """Prompts encoded ahead, text encoder released: the same images; an unencoded prompt is refused."""
    _, folder = model
    params = sdcli.GenerateParams(prompt="a red barn", negative_prompt="fog", steps=2, width=64, height=64, seed=3,
                                  batch_size=2)
    expected = sdcli.generate_image(sdcli.load_pipeline(folder), params).images
    pipeline = sdcli.load_pipeline(folder, low_memory=True)
    assert pipeline.decoder.tiling  # low memory implies a tiled VAE
    pipeline.encode_prompts([params])
    pipeline.release_text_encoder()
    assert pipeline.prompt_encoder is None
    # low memory streams the weights, whose layers then run numpy's GEMM instead of the packed float32 kernels:
    # the same images up to float32 summation order
    np.testing.assert_allclose(sdcli.generate_image(pipeline, params).images, expected, rtol=0, atol=TOL["tiled"])
    with pytest.raises(SdcliError, match="not encoded ahead"):
        sdcli.generate_image(pipeline, params.with_(prompt="a blue barn"))


def test_cli_vae_tiling_and_low_memory(model, tmp_path):
    """``generate --vae-tiling --low-memory`` at 128x80 (a 16x10 latent, tiles of 8): the PNG is diffusers'
    tiled decode of the latents the run saved."""
    reference, folder = model
    out, latents_file = tmp_path / "barn.png", tmp_path / "latents.npy"
    result = CliRunner().invoke(main, ["generate", "-m", str(folder), "-p", "a red barn", "--steps", "2",
                                       "--width", "128", "--height", "80", "--seed", "5", "--vae-tiling",
                                       "--low-memory", "--save-latents", str(latents_file), "-o", str(out), "-q"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    pixels = np.asarray(Image.open(out).convert("RGB")).astype(np.int16)  # (80, 128, 3)
    assert pixels.shape == (80, 128, 3)
    latents = np.load(latents_file)  # (1, 4, 10, 16)
    decoded = reference_decode(reference.vae, latents, reference.vae.config.scaling_factor, tiling=True)
    expected = sdcli.images_to_uint8(decoded)[0].astype(np.int16)
    assert np.abs(pixels - expected).max() <= TOL["png_levels"]
    help_text = CliRunner().invoke(main, ["generate", "--help"]).output
    assert "--vae-tiling" in help_text and "--low-memory" in help_text
