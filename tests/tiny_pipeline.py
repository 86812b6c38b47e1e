"""Tiny random-weight Stable Diffusion models, built with diffusers/transformers and saved as diffusers folders,
for the end-to-end tests of the pipeline and the CLI. Test-only: imports torch.

Two families, each with the structure of the real one at a fraction of the width:
- "sd1": CLIP with quick-GELU, UNet with 1x1-conv projections, PNDM scheduler config, epsilon prediction;
- "sd2": CLIP with GELU, UNet with linear projections, per-block head counts, upcast attention, DDIM scheduler
  config, v-prediction.
The scheduler configs are the real SD1.5 / SD2.1 files, as the Hub holds them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from reference_models import randomise_norms
from sdcli.nn.tokenizer import shipped_tokenizer_dir
from data_paths import CONFIGS

PIXELS = 64  # image side: an 8x8 latent

TEXT_CONFIGS = {
    "sd1": dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=32),
    "sd2": dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=32),
}
UNET_CONFIGS = {
    "sd1": dict(sample_size=PIXELS // 8, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
                norm_num_groups=16),
    "sd2": dict(sample_size=PIXELS // 8, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                attention_head_dim=[2, 4], use_linear_projection=True, upcast_attention=True, norm_num_groups=16),
}
VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                  block_out_channels=(16, 16, 32, 32), norm_num_groups=8, sample_size=PIXELS,
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SCHEDULER_CONFIGS = {"sd1": "sd15", "sd2": "sd21"}


def build_reference(family: str, configs_dir: Path, seed: int = 0):
    """A diffusers StableDiffusionPipeline of the tiny ``family`` with random weights (float32, eval mode)."""
    import diffusers
    import transformers

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT_CONFIGS[family])).eval()
    unet = diffusers.UNet2DConditionModel(**UNET_CONFIGS[family]).eval()
    vae = diffusers.AutoencoderKL(**VAE_CONFIG).eval()
    for model in (text_encoder, unet, vae):
        randomise_norms(model, generator)
    tokenizer_dir = shipped_tokenizer_dir()
    pad = json.loads((configs_dir / "tokenizer" / "special_tokens_map.json").read_text())["pad_token"]
    tokenizer = transformers.CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"),
                                           pad_token=pad if isinstance(pad, str) else pad["content"],
                                           model_max_length=77)
    scheduler = scheduler_from_file("PNDMScheduler", configs_dir)
    return diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)


def scheduler_config(configs_dir: Path) -> dict:
    return json.loads((configs_dir / "scheduler" / "scheduler_config.json").read_text())


def scheduler_from_file(class_name: str, configs_dir: Path, **options):
    """``Class.from_config(the real scheduler_config.json)``, as a diffusers user swaps schedulers."""
    import diffusers

    return getattr(diffusers, class_name).from_config(scheduler_config(configs_dir), **options)


def save_folder(pipeline, folder: Path, configs_dir: Path) -> Path:
    """The pipeline as a diffusers folder (safetensors), with the model's real scheduler and tokenizer files."""
    pipeline.save_pretrained(str(folder), safe_serialization=True)
    shutil.copy(configs_dir / "scheduler" / "scheduler_config.json", folder / "scheduler" / "scheduler_config.json")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(configs_dir / "tokenizer" / name, folder / "tokenizer" / name)
    return folder


def make_tiny_model(family: str, folder: Path, seed: int = 0):
    """Build the tiny ``family`` model, save it to ``folder``, and return (reference pipeline, folder)."""
    configs_dir = CONFIGS / SCHEDULER_CONFIGS[family]
    pipeline = build_reference(family, configs_dir, seed)
    save_folder(pipeline, folder, configs_dir)
    return pipeline, folder


def reference_images(pipeline, scheduler, prompt: str | None, negative_prompt: str | None, steps: int,
                     guidance: float, latents: np.ndarray, **options) -> np.ndarray:
    """diffusers' images (B, H, W, 3) in [0, 1] from unit-variance ``latents`` (B, 4, h, w); ``options`` go to
    the pipeline call (guidance_rescale, prompt_embeds, ...). A prompt of None is left to the embeddings."""
    pipeline.scheduler = scheduler
    batch = latents.shape[0]
    texts = {}
    if prompt is not None:
        texts = {"prompt": [prompt] * batch, "negative_prompt": [negative_prompt] * batch}
    with torch.no_grad():
        result = pipeline(**texts,
                          num_inference_steps=steps, guidance_scale=guidance, **options,
                          latents=torch.from_numpy(latents), height=latents.shape[2] * 8,
                          width=latents.shape[3] * 8, output_type="np")
    return result.images


# A motion adapter for the tiny sd1 UNet (one layer per level, as the UNet), with the motion mid block.
TINY_ADAPTER_CONFIG = {"block_out_channels": [32, 64], "motion_layers_per_block": 1, "motion_norm_num_groups": 16,
                       "motion_num_attention_heads": 2, "motion_max_seq_length": 32, "use_motion_mid_block": True}


def make_tiny_video_model(folder: Path, seed: int = 0):
    """The tiny sd1 model and a random motion adapter for it, saved as diffusers folders under ``folder``:
    (diffusers AnimateDiffPipeline, model folder, adapter folder)."""
    from diffusers import AnimateDiffPipeline

    from reference_models import random_motion_adapter

    image_pipeline, model_folder = make_tiny_model("sd1", folder / "model", seed)
    adapter = random_motion_adapter(TINY_ADAPTER_CONFIG, seed=seed + 3)
    adapter.save_pretrained(str(folder / "adapter"), safe_serialization=True)
    reference = AnimateDiffPipeline(vae=image_pipeline.vae, text_encoder=image_pipeline.text_encoder,
                                    tokenizer=image_pipeline.tokenizer, unet=image_pipeline.unet,
                                    motion_adapter=adapter, scheduler=image_pipeline.scheduler)
    reference.set_progress_bar_config(disable=True)
    return reference, model_folder, folder / "adapter"


def install_adapter_preset(adapter_folder: Path, weights: Path, name: str, lora: dict | None = None) -> Path:
    """The tiny adapter (a diffusers folder) laid out in ``weights`` as ``sdcli download NAME`` leaves the
    motion-adapter preset NAME: its one file, or its folder (config and weights, and the preset's LoRA file with
    the tensors ``lora``, a LoRA for the tiny UNet). Returns what the preset resolves to."""
    from safetensors.numpy import save_file

    from sdcli.models import MOTION_ADAPTER_PRESETS

    preset = MOTION_ADAPTER_PRESETS[name]
    folder = weights / preset.name
    folder.mkdir(parents=True, exist_ok=True)
    if preset.layout == "single-file":
        shutil.copy(adapter_folder / "diffusion_pytorch_model.safetensors", folder / preset.filename)
        return folder / preset.filename
    shutil.copy(adapter_folder / "config.json", folder / "config.json")
    weights_name = "diffusion_pytorch_model.fp16.safetensors" if preset.variant == "fp16" else \
        "diffusion_pytorch_model.safetensors"
    shutil.copy(adapter_folder / "diffusion_pytorch_model.safetensors", folder / weights_name)
    if preset.lora is not None:
        if lora is None:
            raise ValueError(f"the {name} preset ships a LoRA: give its tensors")
        save_file(lora, str(folder / preset.lora))
    return folder


def as_sd2_folder(model_folder: Path, folder: Path) -> Path:
    """A copy of a tiny model folder that sdcli opens as SD 2.x: its text encoder config says 1024 wide (what the
    family is read from). Its weights no longer fit it: only for what is refused before anything loads."""
    shutil.copytree(model_folder, folder)
    config_path = folder / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "hidden_size": 1024}))
    return folder
