"""The Wan2.1 family: UMT5 text encoder, the Wan diffusion transformer, the causal 3-D Wan VAE; text to video.

Wan Team 2025, "Wan: Open and Advanced Large-Scale Video Generative Models". One architecture, ``wan21``: the
UMT5-XXL encoder (512 text tokens, 4096 wide), a flow-matching DiT over (1, 2, 2) patches of 16-channel latents
(:mod:`sdcli.nn.dit_wan`), and an autoencoder that compresses 4x in time (the first frame alone) and 8x in space
(:mod:`sdcli.nn.vae_wan`). diffusers runs it as ``WanPipeline``; sdcli reads its diffusers folders
(``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``). A transformer file in the original Wan layout (as the streaming models
ship) is read through the exact map of :mod:`sdcli.families.wan_names`; alone it is not a whole model.

SkyReels-V2's diffusion-forcing models (SkyReels Team 2025; diffusers ``SkyReelsV2DiffusionForcingPipeline``,
``Skywork/SkyReels-V2-DF-1.3B-540P-Diffusers``) are architecture ``skyreels-v2-df`` of this family: the same three
networks, the transformer with a timestep per latent frame, block-causal attention and a frame-rate embedding
(``SkyReelsV2Transformer3DModel``, read into :class:`~sdcli.nn.dit_wan.WanTransformer3DModel` with those options),
sampled window by window by :mod:`sdcli.pipelines.skyreels`.

Wan makes videos, not images: the family has no image stages, and ``sdcli generate`` refuses its models by name.
The loaders below are the one place each of its networks is built from ``sdcli.nn``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..config import SKYREELS_TRANSFORMER, WanTransformerConfig, read_json
from ..errors import CheckpointError
from ..io.checkpoint import Checkpoint, FolderSource, MappedSource, TensorSource
from ..io.safetensors import SafetensorsFile
from ..io.weights import load_network
from ..nn.dit_wan import WanTransformer3DModel
from ..nn.t5 import T5Config, T5Encoder, T5PromptEncoder, tied_embedding
from ..nn.tokenizer import T5Tokenizer
from ..nn.vae_wan import WanAutoencoder, WanVAEConfig
from ..ops import Ops
from . import HUB_PAGES, Family, LatentGeometry, ModelPreset
from .wan_names import is_original_layout, wan_transformer_names

log = logging.getLogger("sdcli")

ARCHITECTURES = ("wan21", "skyreels-v2-df")
COMPONENTS = {"text_encoder": "model", "transformer": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model"}
LATENTS = LatentGeometry(channels=16, downscale=8)
FRAMES_PER_LATENT = 4  # the VAE's temporal compression: latent frame 0 is pixel frame 0, each later one 4 frames
SIDE_MULTIPLE = 16  # the VAE's 8x times the transformer's 2x patches
PRECISIONS = ("fp32", "fp16", "bf16")  # fp16 weights are multiplied in float32

DIFFUSERS_CONFIGS = ("model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
                     "transformer/config.json", "vae/config.json")
TOKENIZER_FILES = ("tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json")
WEIGHT_PATTERNS = tuple(pattern for component, stem in COMPONENTS.items()
                        for pattern in (f"{component}/{stem}*.safetensors",
                                        f"{component}/{stem}*.safetensors.index*.json"))
DIFFUSERS_FILES = DIFFUSERS_CONFIGS + TOKENIZER_FILES + WEIGHT_PATTERNS  # every file sdcli reads
# The diffusers pipeline classes read, their architectures and the transformer class each holds
PIPELINES = {"WanPipeline": ("wan21", "WanTransformer3DModel"),
             "SkyReelsV2DiffusionForcingPipeline": ("skyreels-v2-df", SKYREELS_TRANSFORMER)}


# -- recognising checkpoints -------------------------------------------------------------------------------------

def recognise_folder(path: Path, variant: str | None) -> Checkpoint | None:
    """A diffusers ``WanPipeline`` or ``SkyReelsV2DiffusionForcingPipeline`` folder, its architecture told by the
    transformer it holds; other Wan and SkyReels-V2 pipelines (image to video, Wan2.2's two experts) by name."""
    index = read_json(path / "model_index.json")
    name = str(index.get("_class_name", ""))
    if not name.startswith(("Wan", "SkyReelsV2")):
        return None
    if name not in PIPELINES:
        raise CheckpointError(f"{path}: a {name} model; sdcli runs Wan2.1 text to video and SkyReels-V2 diffusion "
                              f"forcing text to video ({' and '.join(PIPELINES)}) so far")
    if index.get("transformer_2") not in (None, [None, None]) or index.get("boundary_ratio") is not None:
        raise CheckpointError(f"{path}: a Wan2.2 model with two expert transformers; sdcli runs Wan2.1 so far")
    architecture, transformer_class = PIPELINES[name]
    held = (index.get("transformer") or [None, None])[-1]
    if held not in (None, transformer_class):
        raise CheckpointError(f"{path}: a {name} holding a {held} transformer; it runs a {transformer_class}")
    return Checkpoint(path=path, layout="diffusers", family=architecture, prediction_type="flow_prediction",
                      model_family=FAMILY, variant=variant)


def recognise_file(file: SafetensorsFile, path: Path) -> Checkpoint | None:
    """A Wan transformer in the original layout is recognised and refused: it is not a whole model."""
    if is_original_layout(set(file.keys())) is None:
        return None
    raise CheckpointError(f"{path}: a Wan transformer alone (the original Wan layout); sdcli runs Wan2.1 from a "
                          "diffusers folder, which holds the text encoder and VAE as well (sdcli download "
                          "wan21-t2v-1.3b)")


def shipped_configs(architecture: str) -> Path:
    raise CheckpointError(f"no shipped configs for {architecture!r}: Wan models are read from diffusers folders")


def parse_config(checkpoint: Checkpoint, component: str) -> Any:
    """``component``'s config as its dataclass (the scheduler's as the raw dict the flow plans read)."""
    data, source = checkpoint.component_config(component), str(checkpoint.config_path(component))
    if component == "transformer":
        return WanTransformerConfig.from_diffusers(data, source)
    if component == "text_encoder":
        return T5Config.from_dict(data, source)
    if component == "vae":
        return WanVAEConfig.from_dict(data, source)
    if component == "scheduler":
        return data
    raise CheckpointError(f"unknown component {component!r}")


def open_source(checkpoint: Checkpoint, component: str) -> TensorSource:
    """``component``'s tensors as the diffusers folder names them; of the text encoder's tied token embedding
    (``shared.weight``, ``encoder.embed_tokens.weight``: files hold one or both) only one is read."""
    files, description = checkpoint.folder_files(component), str(checkpoint.path / component)
    if component == "text_encoder":
        _, ignored = tied_embedding(key for file in files for key in file.keys())
        return FolderSource(files, description, ignored=ignored)
    return FolderSource(files, description)


def open_wan_transformer(path: str | Path, config: WanTransformerConfig) -> TensorSource:
    """The tensors of a Wan transformer file in the original layout (or ComfyUI's, with its prefix), under
    diffusers names through the exact map."""
    file = SafetensorsFile(Path(path))
    prefix = is_original_layout(set(file.keys()))
    if prefix is None:
        raise CheckpointError(f"{path}: not a Wan transformer in the original layout (no head.modulation or "
                              "blocks.0.self_attn.q.weight)")
    return MappedSource(file, wan_transformer_names(config, prefix), prefix, lambda stored: False, str(path))


# -- the networks: the one place each is built from sdcli.nn -----------------------------------------------------

def load_transformer(checkpoint: Checkpoint, ops: Ops, precision: str, stream: bool = False) -> WanTransformer3DModel:
    """The Wan transformer: (latents (B, 16, F, h, w), timesteps (B,), text (B, 512, 4096)) -> velocity."""
    config = checkpoint.config("transformer")
    return load_network(lambda params: WanTransformer3DModel(params, config), checkpoint.source("transformer"), ops,
                        precision, stream=stream)


def scheduler_config(checkpoint: Checkpoint) -> dict[str, Any]:
    """The model's scheduler config as written (Wan-AI's: UniPC over flow sigmas, flow_shift 3.0)."""
    return dict(checkpoint.component_config("scheduler"))


def text_encoder_precision(checkpoint: Checkpoint) -> str:
    """The precision the text encoder runs at: that of its files (bf16 where they are bf16; fp32 for the float32
    files the Hub repository holds). Its weights stream from the mapped files a layer at a time; a conversion would
    hold the whole converted encoder instead (11.4 GB in bf16)."""
    source = checkpoint.source("text_encoder")
    dtypes = {source.dtype(name) for name in source.keys() if len(source.shape(name)) >= 2}
    return {"BF16": "bf16", "F16": "fp16"}.get(dtypes.pop(), "fp32") if len(dtypes) == 1 else "fp32"


def load_prompt_encoder(checkpoint: Checkpoint, ops: Ops, precision: str | None = None):
    """The UMT5 encoder and its tokenizer: prompts -> (B, 512, 4096) conditioning, the positions past each prompt
    zero (diffusers' ``WanPipeline._get_t5_prompt_embeds``). Its weights are always streamed; ``precision`` None:
    its files' (:func:`text_encoder_precision`)."""
    precision = precision or text_encoder_precision(checkpoint)
    source, config = checkpoint.source("text_encoder"), checkpoint.config("text_encoder")
    embedding, _ = tied_embedding(source.keys())
    text_encoder = load_network(lambda params: T5Encoder(params, config, embedding), source, ops, precision,
                                stream=True)
    tokenizer = T5Tokenizer.from_folder(checkpoint.config_dir("tokenizer"))
    return T5PromptEncoder(tokenizer, text_encoder, config, precision, source)


def load_vae(checkpoint: Checkpoint, ops: Ops, precision: str, stream: bool = False):
    """The Wan autoencoder, decoder only (the encoder's tensors checked, never read): latents (B, 16, T, h, w) ->
    frames (B, 3, 1 + 4 (T - 1), 8h, 8w) in [-1, 1], a latent frame at a time through its causal cache."""
    config = checkpoint.config("vae")
    return load_network(lambda params: WanAutoencoder(params, config, with_encoder=False), checkpoint.source("vae"),
                        ops, precision, stream=stream,
                        also_checks=lambda params: WanAutoencoder(params, config, with_encoder=True))


# -- presets -----------------------------------------------------------------------------------------------------

PRESETS = (
    # Sizes as the Hub listed the files: transformer 5.68 GB (float32, 2 shards), text encoder 22.7 GB (float32,
    # 5 shards), VAE 508 MB; not checked against the repository from here (see WEIGHTS.md).
    ModelPreset(
        name="wan21-t2v-1.3b", repo_id="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", revision="main", layout="diffusers",
        files=DIFFUSERS_FILES, variant="bf16", family="wan21", size_bytes=28_900_000_000, license="Apache-2.0",
        page=f"{HUB_PAGES}/Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        description="Wan2.1 text to video, 1.3B transformer (480x832, 81 frames at 16 fps by default), UMT5-XXL "
                    "text encoder, diffusers layout; bf16 weights where the repository has them"),
    # The files as wan21-t2v-1.3b selects them (the same three networks; the transformer adds the frame-rate
    # embedding); sizes and the license not checked against the repository from here (see WEIGHTS.md).
    ModelPreset(
        name="skyreels-v2-df-1.3b-540p", repo_id="Skywork/SkyReels-V2-DF-1.3B-540P-Diffusers", revision="main",
        layout="diffusers", files=DIFFUSERS_FILES, variant=None, family="skyreels-v2-df", size_bytes=None,
        license="other (the Skywork community license of the model card)",
        page=f"{HUB_PAGES}/Skywork/SkyReels-V2-DF-1.3B-540P-Diffusers",
        description="SkyReels-V2 diffusion forcing text to video, 1.3B transformer (544x960, 97 frames at 24 fps "
                    "by default; longer videos window by window), UMT5-XXL text encoder, diffusers layout"),
)

FAMILY = Family(
    name="wan", title="Wan", reads="Wan2.1 text to video",
    file_hint="a Wan2.1 transformer file (no head.modulation tensor)",
    architectures=ARCHITECTURES, components=COMPONENTS, diffusers_configs=DIFFUSERS_CONFIGS,
    diffusers_files=DIFFUSERS_FILES, presets=PRESETS, precisions=PRECISIONS, latents=LATENTS, image=None,
    recognise_folder=recognise_folder, recognise_file=recognise_file, shipped_configs=shipped_configs,
    parse_config=parse_config, open_source=open_source,
)
