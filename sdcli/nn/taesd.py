"""TAESD, the tiny autoencoder for Stable Diffusion: a 1.2 M-parameter stand-in for the SD VAE.

Ollin Boer Bohan, madebyollin/taesd (MIT): an encoder and a decoder distilled to share the SD 1.x/2.x latent
space, made of plain 64-channel conv blocks with ReLU and no normalisation, so that decoding is cheap enough to
preview latents at every sampling step. Its latents are already in the UNet's space (the SD VAE's latents times
0.18215), and its images are in [0, 1]; :class:`TaesdEncoder` / :class:`TaesdDecoder` wrap that into the
interface of :class:`~sdcli.nn.vae.VaeEncoder` / :class:`~sdcli.nn.vae.VaeDecoder` ([-1, 1] images).

Tensor names are the original flat sequential ones: layer ``i`` of the encoder or decoder list below owns
``{i}.weight`` / ``{i}.bias`` (a conv) or ``{i}.conv.{0,2,4}.*`` (a block). The trained weights ship in
``sdcli/data/taesd`` as the BF16 files they were published as, with their license.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from ..errors import ModelNotFoundError
from ..io.checkpoint import FolderSource
from ..io.safetensors import SafetensorsFile
from ..ops import Ops, get_ops
from .layers import Weight, checked_images, conv2d_from, load_weights

WIDTH = 64  # channels of every hidden layer
LATENT_CHANNELS = 4
RGB = 3
DOWNSCALE = 8  # three stride-2 convs
LATENT_LIMIT = 3.0  # the decoder first squashes latents into (-3, 3) with 3 tanh(x / 3)

# Layer kinds in file order: entry i owns the tensors prefixed "{i}.". "conv_in"/"conv_out" are 3x3 convs with
# a bias that change the channel count, "stride2_conv" a 3x3 stride-2 conv without bias, "conv_no_bias" a 3x3
# conv without bias, "block" a residual block; "relu", "upsample" (nearest 2x) and "clamp" have no weights.
ENCODER_LAYERS = ("conv_in", "block", *("stride2_conv", "block", "block", "block") * 3, "conv_out")
DECODER_LAYERS = ("clamp", "conv_in", "relu", "block", "block", "block",
                  *("upsample", "conv_no_bias", "block", "block", "block") * 2,
                  "upsample", "conv_no_bias", "block", "conv_out")
BLOCK_CONVS = (0, 2, 4)  # indices of the convs in a block's (conv, ReLU, conv, ReLU, conv) sequence
SHIPPED_FILES = {"encoder": "taesd_encoder.bf16.safetensors", "decoder": "taesd_decoder.bf16.safetensors"}


def _shapes(layers: tuple[str, ...], in_channels: int, out_channels: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of a TAESD network whose first conv reads ``in_channels`` and last writes ``out_channels``."""
    conv = (WIDTH, WIDTH, 3, 3)
    shapes: dict[str, tuple[int, ...]] = {}
    for index, kind in enumerate(layers):
        if kind == "conv_in":
            shapes[f"{index}.weight"] = (WIDTH, in_channels, 3, 3)
            shapes[f"{index}.bias"] = (WIDTH,)
        elif kind == "conv_out":
            shapes[f"{index}.weight"] = (out_channels, WIDTH, 3, 3)
            shapes[f"{index}.bias"] = (out_channels,)
        elif kind in ("stride2_conv", "conv_no_bias"):
            shapes[f"{index}.weight"] = conv
        elif kind == "block":
            for j in BLOCK_CONVS:
                shapes[f"{index}.conv.{j}.weight"] = conv
                shapes[f"{index}.conv.{j}.bias"] = (WIDTH,)
    return shapes


def taesd_encoder_shapes() -> dict[str, tuple[int, ...]]:
    """The encoder's 67 tensors by name, with their shapes."""
    return _shapes(ENCODER_LAYERS, RGB, LATENT_CHANNELS)


def taesd_decoder_shapes() -> dict[str, tuple[int, ...]]:
    """The decoder's 67 tensors by name, with their shapes."""
    return _shapes(DECODER_LAYERS, LATENT_CHANNELS, RGB)


class TaesdBlock:
    """relu(x + conv(relu(conv(relu(conv(x)))))), all 3x3 convs 64 -> 64 (the skip is the identity in TAESD)."""

    def __init__(self, ops: Ops, weights: dict[str, Weight], prefix: str):
        self.ops = ops
        self.convs = [conv2d_from(ops, weights, f"{prefix}conv.{j}.") for j in BLOCK_CONVS]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        first, second, third = self.convs
        h = third(self.ops.relu(second(self.ops.relu(first(x)))))  # (B, 64, H, W)
        h += x
        return self.ops.relu(h)


def soft_clamp(latents: np.ndarray) -> np.ndarray:
    """3 tanh(x / 3): near the identity for |x| < 1, smoothly limited to (-3, 3)."""
    limit = np.float32(LATENT_LIMIT)
    return np.tanh(latents / limit) * limit


def _build(ops: Ops, weights: dict[str, Weight], layers: tuple[str, ...]) -> list:
    """The layers as callables, in order."""
    built = []
    for index, kind in enumerate(layers):
        prefix = f"{index}."
        if kind in ("conv_in", "conv_out"):
            built.append(conv2d_from(ops, weights, prefix))
        elif kind == "stride2_conv":
            built.append(conv2d_from(ops, weights, prefix, stride=2, padding=1, bias=False))
        elif kind == "conv_no_bias":
            built.append(conv2d_from(ops, weights, prefix, bias=False))
        elif kind == "block":
            built.append(TaesdBlock(ops, weights, prefix))
        elif kind == "relu":
            built.append(ops.relu)
        elif kind == "upsample":
            built.append(lambda x: ops.upsample_nearest(x, 2))
        elif kind == "clamp":
            built.append(soft_clamp)
        else:
            raise ValueError(f"unknown TAESD layer kind {kind!r}")
    return built


class TaesdEncoder:
    """Images (B, 3, H, W) in [-1, 1], H and W multiples of 8 -> UNet-space latents (B, 4, H/8, W/8).

    Deterministic: TAESD predicts the latents directly, so ``rng`` (accepted for the VaeEncoder interface) is
    not used.
    """

    def __init__(self, ops: Ops, weights: dict[str, Weight]):
        self.layers = _build(ops, weights, ENCODER_LAYERS)

    def encode_01(self, images: np.ndarray) -> np.ndarray:
        """TAESD's own convention: images in [0, 1] -> latents."""
        x = checked_images(images, RGB, "images", DOWNSCALE)
        for layer in self.layers:
            x = layer(x)
        return x  # (B, 4, H/8, W/8)

    def __call__(self, images: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        images = np.asarray(images, dtype=np.float32)
        return self.encode_01((images + np.float32(1)) * np.float32(0.5))


class TaesdDecoder:
    """UNet-space latents (B, 4, h, w) -> images (B, 3, 8h, 8w), float32 in about [-1, 1] (not clamped)."""

    def __init__(self, ops: Ops, weights: dict[str, Weight]):
        self.layers = _build(ops, weights, DECODER_LAYERS)

    def decode_01(self, latents: np.ndarray) -> np.ndarray:
        """TAESD's own convention: latents -> images in about [0, 1] (it overshoots a little; not clamped)."""
        x = checked_images(latents, LATENT_CHANNELS, "latents", 1)
        for layer in self.layers:
            x = layer(x)
        return x  # (B, 3, 8h, 8w)

    def __call__(self, latents: np.ndarray) -> np.ndarray:
        return self.decode_01(latents) * np.float32(2) - np.float32(1)


def shipped_taesd_dir() -> Path:
    """The folder of the weights shipped with sdcli (SD 1.x/2.x TAESD, BF16, MIT license)."""
    return Path(str(resources.files("sdcli") / "data" / "taesd"))


def _load(path: str | Path, shapes: dict[str, tuple[int, ...]], precision: str) -> dict[str, Weight]:
    """The tensors of one TAESD file, strictly: each of ``shapes`` present with its shape, nothing else."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"no TAESD weights at {path}")
    return load_weights(FolderSource([SafetensorsFile(path)], str(path)), shapes, precision)


def load_taesd_encoder(path: str | Path | None = None, backend: str = "cpu",
                       precision: str = "fp32") -> TaesdEncoder:
    """The encoder from one safetensors file (default: the shipped one)."""
    path = path if path is not None else shipped_taesd_dir() / SHIPPED_FILES["encoder"]
    return TaesdEncoder(get_ops(backend), _load(path, taesd_encoder_shapes(), precision))


def load_taesd_decoder(path: str | Path | None = None, backend: str = "cpu",
                       precision: str = "fp32") -> TaesdDecoder:
    """The decoder from one safetensors file (default: the shipped one)."""
    path = path if path is not None else shipped_taesd_dir() / SHIPPED_FILES["decoder"]
    return TaesdDecoder(get_ops(backend), _load(path, taesd_decoder_shapes(), precision))


def _find(folder: Path, part: str) -> Path:
    """``taesd_{part}.safetensors`` in ``folder``, else its ``.bf16`` twin."""
    for name in (f"taesd_{part}.safetensors", f"taesd_{part}.bf16.safetensors"):
        if (folder / name).is_file():
            return folder / name
    raise ModelNotFoundError(f"{folder}: no taesd_{part}.safetensors (nor taesd_{part}.bf16.safetensors)")


def load_taesd(backend: str = "cpu", path: str | Path | None = None,
               precision: str = "fp32") -> tuple[TaesdEncoder, TaesdDecoder]:
    """Encoder and decoder from the folder ``path`` holding ``taesd_{encoder,decoder}[.bf16].safetensors``
    (default: the shipped weights). The weights are held as float32 by default: 5 MB each, converted once."""
    folder = Path(path) if path is not None else shipped_taesd_dir()
    if not folder.is_dir():
        raise ModelNotFoundError(f"no TAESD folder at {folder}")
    return (load_taesd_encoder(_find(folder, "encoder"), backend, precision),
            load_taesd_decoder(_find(folder, "decoder"), backend, precision))
