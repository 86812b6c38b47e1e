"""The networks of the SD 1.x/2.x family, loaded from a checkpoint: CLIP, the UNet, the KL autoencoder and the
shipped TAESD.

Each loader opens the component's tensor source, builds the network over it with the scoped parameter builder
(:func:`sdcli.io.weights.load_network`: strict, each tensor read once and handed to the backend's ``prepare``) and
returns it; the network classes in :mod:`sdcli.nn` never see a file.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from ..errors import ModelNotFoundError
from ..io.checkpoint import Checkpoint, FolderSource, open_checkpoint
from ..io.lora import LoraMergedSource, LoraSpec, read_loras
from ..io.lora_switch import LoraSwitch
from ..io.safetensors import SafetensorsFile
from ..io.weights import load_network
from ..nn.clip import ClipTextEncoder
from ..nn.taesd import SHIPPED_FILES, TaesdDecoder, TaesdEncoder, shipped_taesd_dir
from ..nn.unet import UNet2DConditionModel
from ..nn.vae import Autoencoder, VaeDecoder, VaeEncoder
from ..ops import Ops, get_ops
from . import sd_names

log = logging.getLogger("sdcli")


def _opened(checkpoint: str | Path | Checkpoint) -> Checkpoint:
    return checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint)


def _backend(backend: str | Ops) -> Ops:
    """A backend by name ("cpu", "numpy"), or the backend object itself."""
    return get_ops(backend) if isinstance(backend, str) else backend


def load_text_encoder(checkpoint: str | Path | Checkpoint, precision: str = "fp32", backend: str | Ops = "cpu",
                      loras: Sequence[LoraSpec] = ()) -> ClipTextEncoder:
    """The CLIP text encoder of ``checkpoint`` (a path or an opened checkpoint), with the text-encoder layers of
    ``loras`` merged (see :func:`load_unet`); ``encoder.lora_switch`` changes them later."""
    checkpoint = _opened(checkpoint)
    config = checkpoint.config("text_encoder")
    return _load_switchable(lambda params: ClipTextEncoder(params, config), checkpoint, "text_encoder",
                            _backend(backend), precision, loras)


def load_unet(checkpoint: str | Path | Checkpoint, precision: str = "fp32", backend: str | Ops = "cpu",
              stream: bool = False, loras: Sequence[LoraSpec] = ()) -> UNet2DConditionModel:
    """The UNet of ``checkpoint``; ``stream``: see :func:`~sdcli.io.weights.load_network`.

    ``loras``: ``(LoRA, scale)`` pairs (a :class:`~sdcli.io.lora.Lora` or the path of its file), whose UNet
    layers are merged into copies of the weights they touch (:class:`~sdcli.io.lora.LoraMergedSource`), as
    diffusers' ``load_lora_weights(file)`` and ``fuse_lora(lora_scale=scale)`` do; their text-encoder layers are
    the text encoder's (:func:`load_text_encoder`). ``unet.lora_switch`` (a :class:`~sdcli.io.lora_switch.
    LoraSwitch`) changes the merged set later.
    """
    checkpoint = _opened(checkpoint)
    config = checkpoint.config("unet")
    return _load_switchable(lambda params: UNet2DConditionModel(params, config), checkpoint, "unet",
                            _backend(backend), precision, loras, stream=stream,
                            aliases=_original_unet_names(checkpoint))


def _load_switchable(build, checkpoint: Checkpoint, component: str, ops: Ops, precision: str,
                     loras: Sequence[LoraSpec], *, stream: bool = False, aliases: dict[str, str] | None = None):
    """``build`` over ``component``'s tensors with the ``component`` layers of ``loras`` merged, and its
    ``lora_switch`` over the parameters it holds."""
    base = checkpoint.source(component)
    pairs = read_loras(loras)
    source = base
    if pairs:
        source = LoraMergedSource(base, pairs, component, aliases=aliases)
        log.info("merged %d %s weights from %s", len(source.merged), component,
                 ", ".join(f"{lora.path.name} x{scale:g}" for lora, scale in pairs))
    named: dict = {}
    network = load_network(build, source, ops, precision, stream=stream, named=named)
    network.lora_switch = LoraSwitch(component, base, named, ops, precision, aliases=aliases, active=pairs,
                                     stream=stream)
    return network


def _original_unet_names(checkpoint: Checkpoint) -> dict[str, str]:
    """The original (LDM) name of each UNet tensor without ``model.diffusion_model.`` -> its canonical name: LoRA
    files trained on the original code name their layers so (LyCORIS's ``lora_unet_input_blocks_4_1_proj_in``).
    Empty for a UNet the single-file map does not cover."""
    try:
        mapping = sd_names.unet_names(checkpoint.component_config("unet"))
    except (ValueError, KeyError):
        return {}
    return {key.name.removeprefix(sd_names.UNET_PREFIX): canonical for canonical, key in mapping.items()}


def load_vae_decoder(checkpoint: str | Path | Checkpoint, precision: str = "fp32", backend: str | Ops = "cpu",
                     tiling: bool = False, stream: bool = False) -> VaeDecoder:
    """The decoder of ``checkpoint``; ``tiling``: see :class:`~sdcli.nn.vae.VaeDecoder`.

    The check is strict over the whole autoencoder (every tensor present with its shape, nothing unknown) while
    only the decoder is read: an fp32 file held as fp16 does not pay for the encoder.
    """
    checkpoint = _opened(checkpoint)
    config = checkpoint.config("vae")
    decoder = load_network(lambda params: VaeDecoder(params, config, tiling=tiling), checkpoint.source("vae"),
                           _backend(backend), precision, stream=stream,
                           also_checks=lambda params: VaeEncoder(params, config))
    log.info("loaded the VAE decoder from %s", checkpoint.path)
    return decoder


def load_vae_encoder(checkpoint: str | Path | Checkpoint, precision: str = "fp32",
                     backend: str | Ops = "cpu") -> VaeEncoder:
    """The encoder of ``checkpoint`` (the decoder's tensors checked, not read)."""
    checkpoint = _opened(checkpoint)
    config = checkpoint.config("vae")
    return load_network(lambda params: VaeEncoder(params, config), checkpoint.source("vae"), _backend(backend),
                        precision, also_checks=lambda params: VaeDecoder(params, config))


def load_vae(checkpoint: str | Path | Checkpoint, precision: str = "fp32",
             backend: str | Ops = "cpu") -> tuple[VaeEncoder, VaeDecoder]:
    """The encoder and decoder of ``checkpoint``."""
    checkpoint = _opened(checkpoint)
    config = checkpoint.config("vae")
    both = load_network(lambda params: Autoencoder(params, config), checkpoint.source("vae"), _backend(backend),
                        precision)
    return both.encoder, both.decoder


def _taesd_source(path: str | Path) -> FolderSource:
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"no TAESD weights at {path}")
    return FolderSource([SafetensorsFile(path)], str(path))


def load_taesd_encoder(path: str | Path | None = None, backend: str | Ops = "cpu",
                       precision: str = "fp32") -> TaesdEncoder:
    """The TAESD encoder from one safetensors file (default: the shipped one)."""
    path = path if path is not None else shipped_taesd_dir() / SHIPPED_FILES["encoder"]
    return load_network(TaesdEncoder, _taesd_source(path), _backend(backend), precision)


def load_taesd_decoder(path: str | Path | None = None, backend: str | Ops = "cpu",
                       precision: str = "fp32") -> TaesdDecoder:
    """The TAESD decoder from one safetensors file (default: the shipped one)."""
    path = path if path is not None else shipped_taesd_dir() / SHIPPED_FILES["decoder"]
    return load_network(TaesdDecoder, _taesd_source(path), _backend(backend), precision)


def _find_taesd(folder: Path, part: str) -> Path:
    """``taesd_{part}.safetensors`` in ``folder``, else its ``.bf16`` twin."""
    for name in (f"taesd_{part}.safetensors", f"taesd_{part}.bf16.safetensors"):
        if (folder / name).is_file():
            return folder / name
    raise ModelNotFoundError(f"{folder}: no taesd_{part}.safetensors (nor taesd_{part}.bf16.safetensors)")


def load_taesd(backend: str | Ops = "cpu", path: str | Path | None = None,
               precision: str = "fp32") -> tuple[TaesdEncoder, TaesdDecoder]:
    """Encoder and decoder from the folder ``path`` holding ``taesd_{encoder,decoder}[.bf16].safetensors``
    (default: the shipped weights). The weights are held as float32 by default: 5 MB each, converted once."""
    folder = Path(path) if path is not None else shipped_taesd_dir()
    if not folder.is_dir():
        raise ModelNotFoundError(f"no TAESD folder at {folder}")
    return (load_taesd_encoder(_find_taesd(folder, "encoder"), backend, precision),
            load_taesd_decoder(_find_taesd(folder, "decoder"), backend, precision))
