"""Self-Forcing (Huang et al. 2025): Wan2.1-T2V-1.3B made causal and distilled to 4 steps per chunk, streamed.

The release ships only the generator, as a PyTorch pickle (``checkpoints/self_forcing_dmd.pt`` in
``gdhe17/Self-Forcing``: ``generator`` and ``generator_ema`` state dicts in the original Wan layout under a
``model.`` prefix). sdcli reads it after a one-time conversion to safetensors (:mod:`sdcli.io.torch_pickle`,
which needs no torch and runs no code from the file). Everything else comes from the Wan2.1-T2V-1.3B diffusers
preset, whose files are safetensors: the UMT5 encoder, its tokenizer, the VAE, and the transformer's config (the
generator has Wan 1.3B's shapes).

Settings are the release's ``configs/self_forcing_dmd.yaml``: chunks of 3 latent frames (9 frames first, then 12),
timesteps 1000/750/500/250 warped through the shift-5 table, clean context (context noise 0), no guidance, 16 fps.
It was trained on 21 latent frames (81 frames); longer streams attend over a sliding window of that many frames.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from ..config import WanTransformerConfig
from ..errors import CheckpointError, SdcliError
from ..io.checkpoint import Checkpoint, MappedSource
from ..io.safetensors import SafetensorsFile
from ..io.weights import load_network
from ..nn.dit_wan import WanTransformer3DModel
from ..nn.wan_causal import WanKVCache
from . import HUB_PAGES, wan
from .wan_names import is_original_layout, wan_transformer_names

log = logging.getLogger("sdcli")


@dataclass(frozen=True)
class StreamingPreset:
    """A streaming model: a generator checkpoint (a pickle, converted once) on top of a diffusers base model that
    provides the text encoder, the tokenizer and the VAE."""

    name: str
    repo_id: str
    revision: str
    file: str  # the pickle in the repository
    key: str  # the state dict in it
    base_model: str  # the preset that provides the rest
    size_bytes: int | None
    license: str
    page: str
    description: str
    fps: int = 16

    @property
    def converted_name(self) -> str:
        return Path(self.file).with_suffix(".safetensors").name


SELF_FORCING = StreamingPreset(
    name="self-forcing-1.3b", repo_id="gdhe17/Self-Forcing", revision="main",
    file="checkpoints/self_forcing_dmd.pt", key="generator_ema", base_model="wan21-t2v-1.3b",
    size_bytes=None, license="Apache-2.0 (the code's; the weights carry Wan2.1's Apache-2.0)",
    page=f"{HUB_PAGES}/gdhe17/Self-Forcing",
    description="Self-Forcing: Wan2.1-T2V-1.3B made causal, 4 steps per chunk of 3 latent frames, streamed; "
                "text encoder and VAE from wan21-t2v-1.3b")
STREAMING_PRESETS = {SELF_FORCING.name: SELF_FORCING}


def streaming_preset(name: str) -> StreamingPreset | None:
    return STREAMING_PRESETS.get(str(name))


def converted_generator(preset: StreamingPreset, weights: Path) -> Path:
    """Where the converted generator of ``preset`` lives under the weights folder."""
    return weights / preset.name / preset.converted_name


def prepare_generator(preset: StreamingPreset, weights: Path, *, allow_download: bool,
                      confirm: Callable[[str], bool] | None, download: Callable[[], Path],
                      convert: Callable[[Path, Path, str], None]) -> Path:
    """The converted generator file of ``preset``: there already, or downloaded (``download()`` -> the pickle's
    path) and converted (``convert(pickle, target, key)``) once, after asking (or with ``allow_download``). A
    one-line error naming the command otherwise."""
    target = converted_generator(preset, weights)
    if target.is_file():
        return target
    pickle = weights / preset.name / preset.file
    question = (f"{preset.name}: convert its pickle {pickle} to {target} (read without running code from it)?"
                if pickle.is_file() else
                f"{preset.name} is not here: download {preset.repo_id}/{preset.file} (about 5.7 GB, not checked "
                f"from here) into {weights / preset.name} and convert it to safetensors?")
    if not allow_download and (confirm is None or not confirm(question)):
        raise SdcliError(f"{preset.name} is not converted yet: run it with --yes to download and convert it, or "
                         f"sdcli convert {pickle} {target} --key {preset.key}")
    if not pickle.is_file():
        pickle = download()
    convert(pickle, target, preset.key)
    return target


def open_generator(path: str | Path, config: WanTransformerConfig) -> MappedSource:
    """A causal Wan generator file (original layout, with or without the wrapper's ``model.`` prefix) under the
    diffusers names."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{path}: a generator must be a .safetensors file (convert a pickle with sdcli convert)")
    file = SafetensorsFile(path)
    prefix = is_original_layout(set(file.keys()))
    if prefix is None:
        raise CheckpointError(f"{path}: not a Wan transformer in the original layout (no head.modulation or "
                              "blocks.0.self_attn.q.weight)")
    return MappedSource(file, wan_transformer_names(config, prefix), prefix, lambda stored: False, str(path))


def load_generator(path: str | Path, checkpoint: Checkpoint, ops, precision: str, stream: bool = False):
    """The causal transformer of a generator file, with the transformer config of the Wan base ``checkpoint``.
    Its timestep features are formed in float64, as the original Wan code it was trained with forms them
    (``sinusoidal_embedding_1d``; diffusers' Wan forms them in float32, up to 6e-5 away)."""
    config = replace(checkpoint.config("transformer"), float64_timestep_features=True)
    return load_network(lambda params: WanTransformer3DModel(params, config), open_generator(path, config), ops,
                        precision, stream=stream)


def transformer_cache(transformer: WanTransformer3DModel, height: int, width: int, max_frames: int | None,
                      sink_frames: int) -> WanKVCache:
    """An empty key/value cache of ``transformer`` for frames of ``height`` x ``width`` pixels."""
    (_, ph, pw), latent = transformer.config.patch_size, wan.LATENTS.downscale
    tokens = (height // latent // ph) * (width // latent // pw)
    return WanKVCache(transformer.ops, len(transformer.blocks), tokens, max_frames, sink_frames)


__all__ = ["SELF_FORCING", "STREAMING_PRESETS", "StreamingPreset", "converted_generator", "load_generator",
           "open_generator", "prepare_generator", "streaming_preset", "transformer_cache"]
