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

from .layers import Conv2d, ParameterSource, check_images

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


class TaesdBlock:
    """relu(x + conv(relu(conv(relu(conv(x)))))), all 3x3 convs 64 -> 64 (the skip is the identity in TAESD)."""

    def __init__(self, params: ParameterSource):
        self.ops = params.ops
        self.convs = [Conv2d(params.scope("conv", j), WIDTH, WIDTH, 3) for j in BLOCK_CONVS]

    def __call__(self, x):
        ops = self.ops
        first, second, third = self.convs
        h = third(ops.relu(second(ops.relu(first(x)))))  # (B, 64, H, W)
        return ops.relu(ops.add_(h, x))


def _build(params: ParameterSource, layers: tuple[str, ...], in_channels: int, out_channels: int) -> list:
    """The layers as callables, in order; the first conv reads ``in_channels``, the last writes ``out_channels``."""
    ops = params.ops
    built = []
    for index, kind in enumerate(layers):
        scope = params.scope(index)
        if kind == "conv_in":
            built.append(Conv2d(scope, in_channels, WIDTH, 3))
        elif kind == "conv_out":
            built.append(Conv2d(scope, WIDTH, out_channels, 3))
        elif kind == "stride2_conv":
            built.append(Conv2d(scope, WIDTH, WIDTH, 3, stride=2, padding=1, bias=False))
        elif kind == "conv_no_bias":
            built.append(Conv2d(scope, WIDTH, WIDTH, 3, bias=False))
        elif kind == "block":
            built.append(TaesdBlock(scope))
        elif kind == "relu":
            built.append(ops.relu)
        elif kind == "upsample":
            built.append(lambda x: ops.upsample_nearest(x, 2))
        elif kind == "clamp":  # 3 tanh(x / 3): near the identity for |x| < 1, smoothly limited to (-3, 3)
            built.append(lambda x: ops.mul(ops.tanh(ops.div(x, LATENT_LIMIT)), LATENT_LIMIT))
        else:
            raise ValueError(f"unknown TAESD layer kind {kind!r}")
    return built


class TaesdEncoder:
    """Images (B, 3, H, W) in [-1, 1], H and W multiples of 8 -> UNet-space latents (B, 4, H/8, W/8).

    Deterministic: TAESD predicts the latents directly, so ``rng`` (accepted for the VaeEncoder interface) is
    not used.
    """

    def __init__(self, params: ParameterSource):
        self.ops = params.ops
        self.layers = _build(params, ENCODER_LAYERS, RGB, LATENT_CHANNELS)

    def encode_01(self, images):
        """TAESD's own convention: images in [0, 1] -> latents."""
        x = check_images(images, RGB, "images", DOWNSCALE)
        for layer in self.layers:
            x = layer(x)
        return x  # (B, 4, H/8, W/8)

    def __call__(self, images, rng: np.random.Generator | None = None):
        return self.encode_01(self.ops.mul(self.ops.add(images, 1), 0.5))


class TaesdDecoder:
    """UNet-space latents (B, 4, h, w) -> images (B, 3, 8h, 8w), float32 in about [-1, 1] (not clamped)."""

    def __init__(self, params: ParameterSource):
        self.ops = params.ops
        self.layers = _build(params, DECODER_LAYERS, LATENT_CHANNELS, RGB)

    def decode_01(self, latents):
        """TAESD's own convention: latents -> images in about [0, 1] (it overshoots a little; not clamped)."""
        x = check_images(latents, LATENT_CHANNELS, "latents", 1)
        for layer in self.layers:
            x = layer(x)
        return x  # (B, 3, 8h, 8w)

    def __call__(self, latents):
        return self.ops.add(self.ops.mul(self.decode_01(latents), 2), -1)


def shipped_taesd_dir() -> Path:
    """The folder of the weights shipped with sdcli (SD 1.x/2.x TAESD, BF16, MIT license)."""
    return Path(str(resources.files("sdcli") / "data" / "taesd"))
