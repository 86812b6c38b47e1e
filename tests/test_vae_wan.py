"""The Wan2.1 autoencoder against diffusers' AutoencoderKLWan on random weights: the tiny config of diffusers' Wan
pipeline tests and a wider one with mid-block attention at odd frame counts and sizes, the full Wan2.1 config on a
small input, decode and encode; decoding through the cache chunk by chunk equals one call to the bit; bf16 weights;
strict loading from a diffusers folder, the decoder alone."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch/diffusers are the Wan autoencoder reference")
pytest.importorskip("diffusers")

import reference_models as ref  # noqa: E402
from opaque_backend import opaque_ops  # noqa: E402

from sdcli.errors import CheckpointError, SdcliError  # noqa: E402
from sdcli.io.checkpoint import FolderSource  # noqa: E402
from sdcli.io.safetensors import SafetensorsFile  # noqa: E402
from sdcli.io.weights import ArraySource, load_network  # noqa: E402
from sdcli.nn.vae_wan import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD, WanAutoencoder, WanVAEConfig  # noqa: E402
from sdcli.ops import get_ops  # noqa: E402

TOL = {
    # max |ours - diffusers| / max |diffusers|, float32 on both sides; the bound is 1e-3. Measured about
    # 2e-6 (the channel RMS norms' float32 sums over up to 384 channels, in another order than torch's).
    "tiny": 2e-5,
    "full": 1e-3,
    # bf16 products against the reference run in float32 on the same rounded weights (a few bf16 ulps of scale).
    "bf16": 4 * 2**-8,
}
# diffusers' tests/pipelines/wan/test_wan.py
TINY = dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
# wider, with two resnets per level and channel changes between levels
WIDER = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 4], num_res_blocks=2, temperal_downsample=[False, True, True])
# Wan-AI/Wan2.1-T2V-1.3B-Diffusers, vae/config.json
FULL = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
            temperal_downsample=[False, True, True], latents_mean=list(WAN21_LATENTS_MEAN),
            latents_std=list(WAN21_LATENTS_STD))


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    assert ours.shape == reference.shape and ours.dtype == np.float32
    return float(np.max(np.abs(ours.astype(np.float64) - reference)) / np.max(np.abs(reference)))


def random_autoencoder(config: dict, seed: int = 0):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    model = AutoencoderKLWan(**config).eval()
    ref.randomise_norms(model, torch.Generator().manual_seed(seed + 1), is_norm=lambda name: "gamma" in name,
                        bias_scale=0.05)
    return model


def state_of(model) -> dict[str, np.ndarray]:
    return {name: tensor.detach().numpy() for name, tensor in model.state_dict().items()}


def build(config: dict, state, backend: str = "cpu", precision: str = "fp32") -> WanAutoencoder:
    ops = opaque_ops if backend == "opaque" else get_ops(backend)
    vae_config = WanVAEConfig.from_dict(config)
    return load_network(lambda params: WanAutoencoder(params, vae_config), ArraySource(state), ops, precision)


def decode(vae: WanAutoencoder, z: np.ndarray) -> np.ndarray:
    return vae.ops.to_host(vae.decode(vae.ops.from_host(z)))


def encode(vae: WanAutoencoder, video: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, logvar = vae.encode(vae.ops.from_host(video))
    return vae.ops.to_host(mean), vae.ops.to_host(logvar)


def reference_decode(model, z: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.decode(torch.from_numpy(z)).sample.numpy()


def reference_encode(model, video: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        posterior = model.encode(torch.from_numpy(video)).latent_dist
    return posterior.mean.numpy(), posterior.logvar.numpy()


def latents(frames: int, size: tuple[int, int], batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 16, frames, *size)).astype(np.float32)


def video(frames: int, size: tuple[int, int], batch: int = 1, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (batch, 3, frames, *size)).astype(np.float32)


@pytest.fixture(scope="module", params=["tiny", "wider"])
def model(request):
    config = TINY if request.param == "tiny" else WIDER
    reference = random_autoencoder(config, seed=0 if request.param == "tiny" else 7)
    return config, reference, state_of(reference)


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("frames, size", [(1, (2, 3)), (2, (3, 5)), (3, (4, 4))])
def test_decode_parity(model, backend, frames, size):
    config, reference, state = model
    z = latents(frames, size)
    ours = decode(build(config, state, backend), z)
    assert ours.shape == (2, 3, 1 + 4 * (frames - 1), 8 * size[0], 8 * size[1])
    assert relative_error(ours, reference_decode(reference, z)) <= TOL["tiny"]


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("frames, size", [(1, (16, 24)), (5, (24, 8)), (9, (16, 16))])
def test_encode_parity(model, backend, frames, size):
    config, reference, state = model
    x = video(frames, size)
    mean, logvar = encode(build(config, state, backend), x)
    expected_mean, expected_logvar = reference_encode(reference, x)
    assert relative_error(mean, expected_mean) <= TOL["tiny"]
    assert relative_error(logvar, expected_logvar) <= TOL["tiny"]


def test_chunks_through_the_cache_are_one_call_to_the_bit(model):
    """Latent frames handed over one at a time, or two then one, through one cache: the frames of one decode,
    every bit (each causal convolution continues from the frames it kept)."""
    config, _, state = model
    vae = build(config, state)
    ops, z = vae.ops, latents(3, (3, 4))
    whole = decode(vae, z)
    for splits in ([(0, 1), (1, 2), (2, 3)], [(0, 2), (2, 3)], [(0, 1), (1, 3)]):
        cache = vae.decoder_cache()
        pieces = [ops.to_host(vae.decode_chunk(ops.from_host(z[:, :, start:stop]), cache)) for start, stop in splits]
        assert [piece.shape[2] for piece in pieces] == [1 + 4 * (stop - start - 1) if start == 0 else 4 * (stop - start)
                                                        for start, stop in splits]
        np.testing.assert_array_equal(np.concatenate(pieces, axis=2), whole)


def test_opaque_backend_gives_the_numpy_results(model):
    config, _, state = model
    z, x = latents(2, (2, 3)), video(5, (16, 8))
    assert np.array_equal(decode(build(config, state, "numpy"), z), decode(build(config, state, "opaque"), z))
    numpy_moments, opaque_moments = encode(build(config, state, "numpy"), x), encode(build(config, state, "opaque"), x)
    assert all(np.array_equal(a, b) for a, b in zip(numpy_moments, opaque_moments))


def test_bf16_weights():
    """bf16 products against the reference run in float32 on the same rounded weights, and no further from it than
    diffusers' own bf16 run. (Only the wider config: the tiny one normalises vectors of 3 channels, where the
    cancellation in a sum of bf16-rounded terms becomes an error of order 1 after the norm, for torch as for sdcli:
    11% of the scale on both sides.)"""
    config, reference = WIDER, random_autoencoder(WIDER, seed=7)
    state = state_of(reference)
    bits = {name: ref.bf16_bits(value) for name, value in state.items()}
    ref.load_rounded(reference, state, "BF16")  # the reference now holds the bf16-rounded values, in float32
    z = latents(2, (3, 3))
    expected = reference_decode(reference, z)
    ours = relative_error(decode(build(config, bits, "cpu", "bf16"), z), expected)
    with torch.no_grad():
        theirs = reference.to(torch.bfloat16).decode(torch.from_numpy(z).to(torch.bfloat16)).sample.float()
    assert ours <= TOL["bf16"] and ours <= relative_error(theirs.numpy(), expected)


def test_full_wan21_config_on_a_small_input():
    """The real widths (96 to 384 channels), two latent frames of 4x4 (5 frames of 32x32) decoded, and 5 frames
    of 32x32 encoded."""
    reference = random_autoencoder(FULL, seed=3)
    state = state_of(reference)
    vae = build(FULL, state)
    z = latents(2, (4, 4), batch=1, seed=3)
    assert relative_error(decode(vae, z), reference_decode(reference, z)) <= TOL["full"]
    x = video(5, (32, 32), seed=4)
    mean, logvar = encode(vae, x)
    expected_mean, expected_logvar = reference_encode(reference, x)
    assert relative_error(mean, expected_mean) <= TOL["full"]
    assert relative_error(logvar, expected_logvar) <= TOL["full"]


def test_latent_statistics_are_diffusers_pipeline_s(model):
    """denormalize is WanPipeline's ``latents / (1 / std) + mean``; normalize its inverse."""
    config, _, state = model
    vae = build(config, state)
    z = latents(2, (3, 4))
    mean = torch.tensor(WAN21_LATENTS_MEAN).view(1, 16, 1, 1, 1)
    std = 1.0 / torch.tensor(WAN21_LATENTS_STD).view(1, 16, 1, 1, 1)
    expected = (torch.from_numpy(z) / std + mean).numpy()
    ours = vae.ops.to_host(vae.denormalize(vae.ops.from_host(z)))
    np.testing.assert_array_equal(ours, expected)
    back = vae.ops.to_host(vae.normalize(vae.ops.from_host(ours)))
    np.testing.assert_allclose(back, z, rtol=1e-5, atol=1e-5)


def test_folder_loads_the_decoder_alone_and_strictly(model, tmp_path):
    from safetensors.numpy import save_file

    from sdcli.families.wan import load_vae

    config, reference, state = model
    folder = tmp_path / "vae"
    folder.mkdir()
    save_file({name: np.ascontiguousarray(value) for name, value in state.items()},
              str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(dict(reference.config)))

    class Checkpoint:  # what load_vae asks of a checkpoint
        def config(self, component):
            return WanVAEConfig.from_dict(json.loads((folder / "config.json").read_text()))

        def source(self, component):
            return FolderSource([SafetensorsFile(folder / "diffusion_pytorch_model.safetensors")], str(folder))

    vae = load_vae(Checkpoint(), get_ops("cpu"), "fp32")
    assert vae.encoder is None
    z = latents(2, (2, 3))
    np.testing.assert_array_equal(decode(vae, z), decode(build(config, state), z))
    save_file({name: np.ascontiguousarray(value) for name, value in state.items() if "encoder.conv_in" not in name},
              str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match="missing: encoder.conv_in"):
        load_vae(Checkpoint(), get_ops("cpu"), "fp32")


@pytest.mark.parametrize("change, words", [({"is_residual": True}, ["is_residual", "Wan2.2"]),
                                           ({"patch_size": 2}, ["patch_size"]),
                                           ({"attn_scales": [0.5]}, ["attn_scales"]),
                                           ({"temperal_downsample": [False, False, True]}, ["2 time"])])
def test_config_refuses_other_autoencoders(change, words):
    with pytest.raises(CheckpointError) as error:
        WanVAEConfig.from_dict({**TINY, **change})
    assert all(word in str(error.value) for word in words)


def test_bad_chunks_are_one_line(model):
    config, _, state = model
    vae = build(config, state)
    with pytest.raises(SdcliError, match="1 \\+ 4k frames"):
        vae.encode(video(4, (16, 16)))
    with pytest.raises(SdcliError, match="batch, 16, frames"):
        vae.decode(np.zeros((1, 4, 2, 3, 3), np.float32))
