"""sdcli: Stable Diffusion from the command line, on numpy, without PyTorch.

The public API, usable from Python without the CLI::

    import sdcli
    pipeline = sdcli.load_pipeline("weights/sd15")
    params = sdcli.GenerateParams(prompt="a photograph of an astronaut riding a horse", steps=30, seed=1)
    batch = sdcli.generate_image(pipeline, params)           # batch.images: (1, 3, 512, 512) in [-1, 1]
    sdcli.save_png("astronaut.png", sdcli.images_to_uint8(batch.images)[0], {})

    encoder = sdcli.load_prompt_encoder("weights/sd15")
    conditioning = encoder.encode(["a photograph of an astronaut riding a horse"])  # (1, 77, 768)
"""

from .config import ClipConfig, SchedulerConfig
from .errors import SdcliError
from .families.sd import PromptEncoder
from .io.checkpoint import Checkpoint, describe
from .io.files import check_output, save_array
from .io.media import a1111_parameters, images_to_uint8, plan_output_paths, read_png_text, save_png
from .io.prompts_file import PromptLine, read_prompts_file
from .models import PRESETS, download_model, find_model, open_checkpoint, resolve_model
from .params import DEFAULT_GUIDANCE, DEFAULT_STEPS, MAX_SEED, VAE_CHOICES, GenerateParams
from .pipelines.image import (GeneratedBatch, StepRecord, TextToImage, default_steps, generate_image, load_pipeline,
                              load_prompt_encoder)
from .rng import BatchNoise, image_seeds, random_seed
from .sampling.schedules import NoiseSchedule, inference_timesteps

__version__ = "0.1.0"

__all__ = ["BatchNoise", "Checkpoint", "ClipConfig", "DEFAULT_GUIDANCE", "DEFAULT_STEPS", "GenerateParams",
           "GeneratedBatch", "MAX_SEED", "NoiseSchedule", "PRESETS", "PromptEncoder", "PromptLine", "SchedulerConfig",
           "SdcliError", "StepRecord", "TextToImage", "VAE_CHOICES", "a1111_parameters", "check_output",
           "default_steps", "describe", "download_model", "find_model", "generate_image", "image_seeds",
           "images_to_uint8", "inference_timesteps", "load_pipeline", "load_prompt_encoder", "open_checkpoint",
           "plan_output_paths", "random_seed", "read_png_text", "read_prompts_file", "resolve_model", "save_array",
           "save_png", "__version__"]
