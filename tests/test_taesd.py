"""TAESD with its real trained weights against the reference tensors of tests/data/taesd (computed with diffusers'
AutoencoderTiny and checked against an independent implementation), from the shipped BF16 files and from an F32
upcast of them; strict loading and the VaeEncoder/VaeDecoder-style interface."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from data_paths import TEST_DATA
from sdcli.errors import CheckpointError, ModelNotFoundError, SdcliError
from sdcli.io.safetensors import SafetensorsFile, save_file
from sdcli.families.sd_networks import load_taesd, load_taesd_decoder, load_taesd_encoder
from sdcli.io.weights import tensor_shapes
from sdcli.nn.taesd import SHIPPED_FILES, TaesdDecoder, TaesdEncoder, shipped_taesd_dir

TOL = {
    # float32 arithmetic on the same weights; the reference's README suggests 1e-4 (its two implementations
    # agree to 3e-6). Guards every layer, the soft clamp and the [0, 1] convention.
    "reference": 1e-4,
    # The astronaut's round-trip PSNR (README: 21.87 dB for the reference's own round trip).
    "psnr_db": 0.02,
}
ROUND_TRIP_PSNR = 21.87


# sha256 of the BF16 files as published (sdcli/data/taesd/README.md)
PUBLISHED_SHA256 = {
    "taesd_encoder.bf16.safetensors": "a6b8c0fda4aad50784e543389e0239c72c5e31e9775c9e612ea8333bf3a77dcb",
    "taesd_decoder.bf16.safetensors": "d903e7cc3ae58f21d985a3498a841fa8b230edccff7ac5d27607b0c557945c6f",
}


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """The exact float32 of each bfloat16 bit pattern: its 16 bits become the high half of a float32."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def write_f32_upcast(folder):
    """The shipped BF16 weights as F32 files (``taesd_{part}.safetensors``) in ``folder``, upcast by bit shifting
    the raw BF16 payload, independently of the reader's own conversion."""
    for part, name in SHIPPED_FILES.items():
        with SafetensorsFile(shipped_taesd_dir() / name) as file:
            tensors = {key: bf16_bits_to_float32(np.array(file.view(key))) for key in file.keys()}
        save_file(folder / f"taesd_{part}.safetensors", tensors)
    return folder


@pytest.fixture(scope="module")
def reference():
    file = SafetensorsFile(TEST_DATA / "taesd" / "taesd_reference_astronaut256.safetensors")
    return {name: np.array(file.view(name)) for name in file.keys()}


@pytest.fixture(scope="module", params=["shipped-bf16", "f32-upcast"])
def taesd(request, tmp_path_factory):
    if request.param == "shipped-bf16":
        return load_taesd()
    return load_taesd(path=write_f32_upcast(tmp_path_factory.mktemp("taesd-f32")))


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.max(np.abs(a - b)))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a.astype(np.float64) - b) ** 2)))


def test_shipped_files_are_the_published_bf16_weights(tmp_path):
    """Byte-identical to the files as published, and the reader's float32 is their exact upcast (so shipping the
    BF16 halves the size at no cost)."""
    write_f32_upcast(tmp_path)
    for part, name in SHIPPED_FILES.items():
        shipped = shipped_taesd_dir() / name
        assert hashlib.sha256(shipped.read_bytes()).hexdigest() == PUBLISHED_SHA256[name]
        bf16, f32 = SafetensorsFile(shipped), SafetensorsFile(tmp_path / f"taesd_{part}.safetensors")
        assert bf16.keys() == f32.keys() and len(bf16.keys()) == 67
        for key in bf16.keys():
            assert bf16.info(key).dtype == "BF16" and f32.info(key).dtype == "F32"
            np.testing.assert_array_equal(bf16.float32(key).view(np.uint32), f32.view(key).view(np.uint32))
    assert (shipped_taesd_dir() / "LICENSE").read_text().startswith("MIT License")


def taesd_encoder_shapes() -> dict[str, tuple[int, ...]]:
    return tensor_shapes(TaesdEncoder)


def taesd_decoder_shapes() -> dict[str, tuple[int, ...]]:
    return tensor_shapes(TaesdDecoder)


def test_shapes_are_the_files_keys():
    for part, shapes in (("encoder", taesd_encoder_shapes()), ("decoder", taesd_decoder_shapes())):
        file = SafetensorsFile(shipped_taesd_dir() / SHIPPED_FILES[part])
        assert {key: file.info(key).shape for key in file.keys()} == shapes
    assert sum(np.prod(shape) for shape in taesd_encoder_shapes().values()) == 1_222_532
    assert sum(np.prod(shape) for shape in taesd_decoder_shapes().values()) == 1_222_531


def test_encoder_matches_reference(taesd, reference):
    encoder, _ = taesd
    latents = encoder.encode_01(reference["image_uint8"].astype(np.float32) / 255)
    assert latents.dtype == np.float32
    assert max_abs(latents, reference["latents"]) <= TOL["reference"]


def test_decoder_matches_reference(taesd, reference):
    _, decoder = taesd
    assert max_abs(decoder.decode_01(reference["latents"]), reference["decoded_01"]) <= TOL["reference"]
    assert max_abs(decoder.decode_01(reference["random_latents_4x8x8"]),
                   reference["random_decoded_01"]) <= TOL["reference"]


def test_numpy_backend(reference):
    decoder = load_taesd_decoder(backend="numpy")
    assert max_abs(decoder.decode_01(reference["random_latents_4x8x8"]),
                   reference["random_decoded_01"]) <= TOL["reference"]


def test_vae_interface_and_round_trip(reference):
    """[-1, 1] images in, UNet-space latents out, and back: (x + 1) / 2 before the encoder, 2 y - 1 after the
    decoder. A batch of two gives each image's own result."""
    encoder, decoder = load_taesd()
    image_01 = reference["image_uint8"].astype(np.float32) / 255  # (1, 3, 256, 256)
    batch = np.concatenate([image_01 * 2 - 1, np.flip(image_01, axis=3) * 2 - 1])  # (2, 3, 256, 256)
    latents = encoder(batch, rng=np.random.default_rng(0))  # rng accepted, not used
    assert latents.shape == (2, 4, 32, 32)
    assert max_abs(latents[:1], reference["latents"]) <= TOL["reference"]
    images = decoder(latents)
    assert images.shape == (2, 3, 256, 256)
    assert max_abs(images[:1], reference["decoded_01"] * 2 - 1) <= 2 * TOL["reference"]  # the [-1, 1] scale doubles it
    round_trip = np.clip((images[:1] + 1) / 2, 0, 1)
    assert abs(psnr(round_trip, image_01) - ROUND_TRIP_PSNR) <= TOL["psnr_db"]


@pytest.mark.parametrize("change, words", [
    ("drop", r"1 missing: 3\.conv\.2\.weight"),
    ("extra", r"1 unexpected: 20\.weight"),
    ("misshape", r"1 mis-shaped: 19\.bias \(4,\) \(expected \(3,\)\)"),
])
def test_wrong_tensors_are_one_line_errors(tmp_path, change, words):
    source = SafetensorsFile(shipped_taesd_dir() / SHIPPED_FILES["decoder"])
    tensors = {key: source.float32(key) for key in source.keys()}
    if change == "drop":
        del tensors["3.conv.2.weight"]
    elif change == "extra":
        tensors["20.weight"] = np.zeros((3, 3, 3, 3), dtype=np.float32)
    else:
        tensors["19.bias"] = np.zeros(4, dtype=np.float32)
    path = tmp_path / "taesd_decoder.safetensors"
    save_file(path, tensors)
    with pytest.raises(CheckpointError, match=words) as error:
        load_taesd_decoder(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_missing_files_and_bad_sizes(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no taesd_encoder.safetensors"):
        load_taesd(path=tmp_path)
    with pytest.raises(ModelNotFoundError, match="no TAESD weights"):
        load_taesd_encoder(tmp_path / "absent.safetensors")
    encoder, decoder = load_taesd()
    for shape, words in (((1, 3, 250, 256), "multiples of 8, got 250x256"),
                         ((1, 4, 64, 64), r"\(batch, 3, height, width\)")):
        with pytest.raises(SdcliError, match=words):
            encoder(np.zeros(shape, dtype=np.float32))
    with pytest.raises(SdcliError, match=r"\(batch, 4, height, width\)"):
        decoder(np.zeros((1, 3, 8, 8), dtype=np.float32))
