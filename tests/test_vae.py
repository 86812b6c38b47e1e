"""The KL autoencoder against diffusers' AutoencoderKL on random weights: tiny configs on both backends, the FULL
SD VAE config, the posterior sample, and the same weights loaded from a diffusers folder and a single file."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch/diffusers are the VAE reference")
pytest.importorskip("diffusers")

import reference_models as ref  # noqa: E402

from sdcli.config import VAEConfig  # noqa: E402
from sdcli.errors import CheckpointError, SdcliError  # noqa: E402
from sdcli.io.checkpoint import open_checkpoint  # noqa: E402
from sdcli.io.safetensors import float32_to_bf16  # noqa: E402
from sdcli.families.sd_networks import load_vae, load_vae_decoder, load_vae_encoder  # noqa: E402
from sdcli.io.weights import ArraySource, load_network, tensor_shapes  # noqa: E402
from sdcli.nn.vae import Autoencoder  # noqa: E402
from sdcli.ops import get_ops  # noqa: E402
from data_paths import CONFIGS  # noqa: E402

# Errors are relative: max |ours - reference| / max |reference|. Random weights set the output scale (about 1 to
# 3 here), so an absolute bound would mean something else for every config.
TOL = {
    # float32 end to end through a few convs and group norms; only the summation order differs (measured ~1e-6).
    "tiny": 1e-4,
    # The full SD VAE: ~30 3x3 convs with up to 4608-term sums, 4096-token attention (measured ~2e-6).
    "full": 1e-3,
    # mean + std * noise on the same noise: one multiply-add after the encoder (per latent channel).
    "sample": 1e-4,
}
TINY_CONFIGS = {
    # Two levels of distinct widths (a 1x1 conv_shortcut where they change), 8 groups, the mid attention on.
    "two-levels": {"block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8,
                   "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
                   "latent_channels": 4, "sample_size": 16},
    # Three levels, 32 groups, no mid attention, no quant convs, another scaling factor.
    "options-off": {"block_out_channels": [32, 64, 64], "layers_per_block": 2, "norm_num_groups": 32,
                    "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
                    "latent_channels": 4, "sample_size": 32, "mid_block_add_attention": False,
                    "use_quant_conv": False, "use_post_quant_conv": False, "scaling_factor": 0.5},
}
LATENT_SIZE = 8


def relative_error(ours: np.ndarray, expected: np.ndarray) -> float:
    assert ours.shape == expected.shape
    return float(np.max(np.abs(ours - expected)) / np.max(np.abs(expected)))


def autoencoder(ops, config: VAEConfig, state: dict[str, np.ndarray], precision: str = "fp32") -> Autoencoder:
    """Both halves over arrays in memory, held at ``precision``."""
    return load_network(lambda params: Autoencoder(params, config), ArraySource(state), ops, precision)


def vae_shapes(config: VAEConfig) -> dict[str, tuple[int, ...]]:
    return tensor_shapes(lambda params: Autoencoder(params, config))


def reference_decode(model, latents: np.ndarray, scaling_factor: float) -> np.ndarray:
    with torch.no_grad():
        return model.decode(torch.from_numpy(latents / np.float32(scaling_factor))).sample.numpy()


def reference_mean(model, images: np.ndarray, scaling_factor: float) -> np.ndarray:
    with torch.no_grad():
        return model.encode(torch.from_numpy(images)).latent_dist.mean.numpy() * np.float32(scaling_factor)


# -- config --------------------------------------------------------------------------------------------------

def test_config_from_the_shipped_files():
    for family in ("sd15", "sd21"):
        data = json.loads((CONFIGS / family / "vae" / "config.json").read_text())
        config = VAEConfig.from_diffusers(data)
        assert config.block_out_channels == (128, 256, 512, 512)
        assert (config.layers_per_block, config.latent_channels, config.norm_num_groups) == (2, 4, 32)
        assert config.scaling_factor == 0.18215  # SD1.x/2.x configs have no scaling_factor: diffusers' default
        assert config.mid_block_add_attention and config.downscale == 8
    sdxl_like = VAEConfig.from_diffusers({**data, "scaling_factor": 0.13025, "force_upcast": False,
                                          "shift_factor": None})
    assert sdxl_like.scaling_factor == 0.13025


@pytest.mark.parametrize("change, words", [
    ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]}, "AttnDownEncoderBlock2D"),
    ({"up_block_types": ["UpDecoderBlock2D"]}, "1 entries for 2 levels"),
    ({"shift_factor": 0.0609}, "shift_factor"),
    ({"latents_mean": [0.0] * 4}, "latents_mean"),
    ({"act_fn": "gelu"}, "act_fn"),
    ({"norm_num_groups": 24}, "does not divide"),
    ({"layers_per_block": None}, "incomplete"),
])
def test_config_refusals(change, words):
    with pytest.raises(CheckpointError, match=words) as error:
        VAEConfig.from_diffusers({**TINY_CONFIGS["two-levels"], **change}, source="vae/config.json")
    assert "\n" not in str(error.value) and str(error.value).startswith("vae/config.json: ")


@pytest.mark.parametrize("name", [*TINY_CONFIGS, "sd15"])
def test_shapes_are_diffusers_state_dict(name):
    from diffusers import AutoencoderKL

    data = TINY_CONFIGS.get(name) or json.loads((CONFIGS / name / "vae" / "config.json").read_text())
    with torch.device("meta"):
        model = AutoencoderKL.from_config(data)
    expected = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    assert vae_shapes(VAEConfig.from_diffusers(data)) == expected


# -- tiny configs against diffusers ----------------------------------------------------------------------------

@pytest.fixture(scope="module", params=list(TINY_CONFIGS))
def tiny(request):
    data = TINY_CONFIGS[request.param]
    model = ref.random_vae(data, seed=3)
    config = VAEConfig.from_diffusers(dict(model.config))
    rng = np.random.default_rng(4)
    latents = rng.standard_normal((2, 4, LATENT_SIZE, LATENT_SIZE), dtype=np.float32)
    size = LATENT_SIZE * config.downscale
    images = rng.uniform(-1, 1, (2, 3, size, size)).astype(np.float32)
    return dict(model=model, config=config, state=ref.vae_state(model), latents=latents, images=images,
                decoded=reference_decode(model, latents, config.scaling_factor),
                encoded=reference_mean(model, images, config.scaling_factor))


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_tiny_decode_and_encode(tiny, backend):
    ops, weights = get_ops(backend), tiny["state"]
    decoded = autoencoder(ops, tiny["config"], weights).decoder(tiny["latents"])
    encoded = autoencoder(ops, tiny["config"], weights).encoder(tiny["images"])
    assert decoded.dtype == encoded.dtype == np.float32
    assert relative_error(decoded, tiny["decoded"]) <= TOL["tiny"]
    assert relative_error(encoded, tiny["encoded"]) <= TOL["tiny"]


def test_posterior_sample_with_clamped_log_variance():
    """With an rng the encoder returns (mean + exp(logvar / 2) * noise) * scaling_factor on noise drawn from that
    rng, the log-variance clamped to [-30, 20] as diffusers clamps it. quant_conv's log-variance biases are pushed
    past both ends so that the clamp matters."""
    model = ref.random_vae(TINY_CONFIGS["two-levels"], seed=5)
    with torch.no_grad():
        model.quant_conv.bias[4:] += torch.tensor([40.0, -50.0, 0.0, 3.0])  # channels 4..7 are the log-variance
    config = VAEConfig.from_diffusers(dict(model.config))
    images = np.random.default_rng(6).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        moments = model.quant_conv(model.encoder(torch.from_numpy(images))).numpy()  # (B, 8, h, w)
        posterior = model.encode(torch.from_numpy(images)).latent_dist
    raw_mean, raw_logvar = moments[:, :4], moments[:, 4:]
    assert raw_logvar[:, 0].min() > 20 and raw_logvar[:, 1].max() < -30  # the clamp is active on both ends
    noise = np.random.default_rng(7).standard_normal(raw_mean.shape, dtype=np.float32)
    by_formula = (raw_mean + np.exp(0.5 * np.clip(raw_logvar, -30, 20)) * noise) * np.float32(config.scaling_factor)
    by_reference = (posterior.mean + posterior.std * torch.from_numpy(noise)).numpy() * np.float32(
        config.scaling_factor)

    encoder = autoencoder(get_ops("cpu"), config, ref.vae_state(model)).encoder
    ours = encoder(images, rng=np.random.default_rng(7))
    for channel in range(4):  # per channel: their scales differ by e^25
        assert relative_error(ours[:, channel], by_formula[:, channel]) <= TOL["sample"], channel
        assert relative_error(ours[:, channel], by_reference[:, channel]) <= TOL["sample"], channel
    mean = encoder(images)
    assert relative_error(mean, raw_mean * np.float32(config.scaling_factor)) <= TOL["sample"]


@pytest.mark.parametrize("change, loader, words", [
    ("drop", load_vae_decoder, r"1 missing: encoder\.conv_in\.bias"),
    ("extra", load_vae_encoder, r"1 unexpected: decoder\.mid_block\.attentions\.0\.to_k\.scale"),
    ("drop", load_vae, r"1 missing: encoder\.conv_in\.bias"),
])
def test_strict_loading_covers_the_whole_vae(tmp_path, tiny, change, loader, words):
    """Loading one half still checks every tensor of the file, so a broken file never half-loads."""
    state = dict(tiny["state"])
    if change == "drop":
        del state["encoder.conv_in.bias"]
    else:
        state["decoder.mid_block.attentions.0.to_k.scale"] = np.ones(1, dtype=np.float32)
    folder = ref.write_vae_folder(tmp_path / "model", CONFIGS / "sd15",
                                  dict(tiny["model"].config), state)
    with pytest.raises(CheckpointError, match=words) as error:
        loader(folder)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("precision, dtype", [("fp16", "F16"), ("bf16", "BF16")])
def test_reduced_precision_is_the_rounded_weights(tmp_path, tiny, precision, dtype):
    """An F32 folder held as fp16 / bf16 computes exactly what the same weights given as fp16 values / bf16 bits
    give (fp16: widened to float32 at each call; bf16: bf16 products)."""
    folder = ref.write_vae_folder(tmp_path / "model", CONFIGS / "sd15",
                                  dict(tiny["model"].config), tiny["state"])
    if precision == "fp16":
        rounded = {name: value.astype(np.float16) for name, value in tiny["state"].items()}
    else:
        rounded = {name: float32_to_bf16(value) for name, value in tiny["state"].items()}
    ops = get_ops("cpu")
    np.testing.assert_array_equal(load_vae_decoder(folder, precision=precision)(tiny["latents"]),
                                  autoencoder(ops, tiny["config"], rounded, precision).decoder(tiny["latents"]))
    np.testing.assert_array_equal(load_vae_encoder(folder, precision=precision)(tiny["images"]),
                                  autoencoder(ops, tiny["config"], rounded, precision).encoder(tiny["images"]))


# -- the full SD VAE -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def full():
    """Random weights of the full SD1.5 VAE and diffusers' outputs: a 32x32 latent decoded, a 256x256 image
    encoded (batch 1: the cost is the arithmetic, and batches run image by image)."""
    data = json.loads((CONFIGS / "sd15" / "vae" / "config.json").read_text())
    model = ref.random_vae(data, seed=11)
    config = VAEConfig.from_diffusers(data)
    rng = np.random.default_rng(12)
    latents = rng.standard_normal((1, 4, 32, 32), dtype=np.float32)
    images = rng.uniform(-1, 1, (1, 3, 256, 256)).astype(np.float32)
    return dict(data=data, model=model, config=config, state=ref.vae_state(model), latents=latents,
                images=images, decoded=reference_decode(model, latents, config.scaling_factor),
                encoded=reference_mean(model, images, config.scaling_factor))


def test_full_decoder(full):
    decoded = autoencoder(get_ops("cpu"), full["config"], full["state"]).decoder(full["latents"])
    assert decoded.shape == (1, 3, 256, 256)
    assert relative_error(decoded, full["decoded"]) <= TOL["full"]


def test_full_encoder(full):
    encoded = autoencoder(get_ops("cpu"), full["config"], full["state"]).encoder(full["images"])
    assert encoded.shape == (1, 4, 32, 32)
    assert relative_error(encoded, full["encoded"]) <= TOL["full"]


def test_folder_and_single_file_are_bit_identical(full, tmp_path):
    """The same weights as a diffusers folder and as an LDM single file (attention as 1x1 conv kernels, decoder
    levels in LDM's order); the single file takes the shipped SD1.5 VAE config."""
    folder = ref.write_vae_folder(tmp_path / "folder", CONFIGS / "sd15", full["data"],
                                  full["state"])
    single = tmp_path / "single.safetensors"
    ref.save_tensors(single, ref.vae_single_file_state(full["state"], full["data"]), "F32")
    assert open_checkpoint(single).vae_config() == open_checkpoint(folder).vae_config() == full["config"]
    latents = full["latents"][:, :, :8, :8]  # (1, 4, 8, 8)
    images = full["images"][:, :, :64, :64]  # (1, 3, 64, 64)
    encoder, decoder = load_vae(folder)
    outputs = {"folder": (decoder(latents), encoder(images)),
               "single": (load_vae_decoder(single)(latents), load_vae_encoder(single)(images))}
    for ours_folder, ours_single in zip(outputs["folder"], outputs["single"]):
        np.testing.assert_array_equal(ours_folder, ours_single)
    decoded, encoded = outputs["folder"]
    assert relative_error(decoded, reference_decode(full["model"], latents, 0.18215)) <= TOL["full"]
    assert relative_error(encoded, reference_mean(full["model"], images, 0.18215)) <= TOL["full"]


@pytest.mark.parametrize("which, shape, words", [
    ("encoder", (1, 3, 60, 64), "multiples of 8, got 60x64"),
    ("encoder", (1, 3, 4, 4), "multiples of 8, got 4x4"),
    ("encoder", (1, 4, 64, 64), r"\(batch, 3, height, width\)"),
    ("encoder", (3, 64, 64), r"\(batch, 3, height, width\)"),
    ("decoder", (1, 3, 8, 8), r"\(batch, 4, height, width\)"),
    ("decoder", (1, 4, 0, 8), "at least 1, got 0x8"),
])
def test_bad_sizes_are_clear_errors(full, which, shape, words):
    ops, weights = get_ops("cpu"), full["state"]
    network = autoencoder(ops, full["config"], weights).encoder if which == "encoder" else \
        autoencoder(ops, full["config"], weights).decoder
    with pytest.raises(SdcliError, match=words) as error:
        network(np.zeros(shape, dtype=np.float32))
    assert "\n" not in str(error.value)
