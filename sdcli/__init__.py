"""sdcli: Stable Diffusion from the command line, on numpy, without PyTorch.

The public API, usable from Python without the CLI (the CLI uses nothing else)::

    import sdcli
    pipeline = sdcli.load_pipeline("weights/sd15")
    params = sdcli.GenerateParams(prompt="a photograph of an astronaut riding a horse", steps=30, seed=1)
    batch = sdcli.generate_image(pipeline, params)           # batch.images: (1, 3, 512, 512) in [-1, 1]
    sdcli.save_png("astronaut.png", sdcli.images_to_uint8(batch.images)[0], {})

    plan = sdcli.plan_run(params, num_images=4, batch_size=2)   # seeds 1, 2 | 3, 4
    batches = [sdcli.generate_image(pipeline, job) for job in plan.jobs]

    encoder = sdcli.load_prompt_encoder("weights/sd15")
    conditioning = encoder.encode(["a photograph of an astronaut riding a horse"])  # (1, 77, 768)

    video = sdcli.load_video_pipeline("sd15", "animatediff-lightning")   # the preset's Euler, 4 steps, guidance 1
    clip = sdcli.generate_video(video, sdcli.VideoParams("a corgi running on a beach", seed=1))  # clip.frames

Importing sdcli turns off numpy's huge-page advice for the process (:func:`sdcli.memory.prefer_small_pages`:
loading and decoding run faster, results are the same), unless ``NUMPY_MADVISE_HUGEPAGE`` is set.
"""

from .config import SchedulerConfig
from .errors import SdcliError
from .io.checkpoint import Checkpoint, describe
from .io.embeddings import TextualInversion, read_embedding, read_embeddings
from .io.files import check_output, save_array
from .io.outputs import template_fields
from .io.frame_sinks import OutputClosedError, open_frame_sink
from .io.media import (a1111_parameters, check_video_output, images_to_uint8, plan_output_paths, plan_video_outputs,
                       save_png, save_video)
from .io.lora import Lora, read_lora
from .io.lora_tags import parse_lora_option, prompt_loras, resolve_lora, split_lora_tags
from .io.prompts_file import IMAGE_OPTIONS, VIDEO_OPTIONS, PromptLine, read_prompts_file
from .io.torch_pickle import convert_checkpoint
from .memory import prefer_small_pages as _prefer_small_pages
from .models import (MOTION_ADAPTER_PRESETS, PRESETS, auto_download, download_model, embedding_folders, format_size,
                     model_family,
                     model_architecture, open_checkpoint, resolve_model, resolve_motion_adapter,
                     resolve_streaming_generator)
from .params import DEFAULT_GUIDANCE, MAX_SEED, GenerateParams
from .pipelines.image import (GeneratedBatch, Job, RunPlan, StepRecord, TextToImage, default_lora_dir, generate_image,
                              load_pipeline, load_prompt_encoder, plan_run)
from .pipelines.image_to_image import ENCODE_MODES, InitImage, load_init_image
from .registry import (BACKENDS, BETA_SCHEDULES, MODEL_PRESETS, PRECISIONS, SAMPLERS, TIMESTEP_SPACINGS,
                       VAE_CHOICES, VARIANTS)
from .pipelines.text_to_video import generate_video, load_video_pipeline
from .pipelines.video import (ANIMATEDIFF_SCHEDULER, CONTEXT_WEIGHTINGS, DEFAULT_DECODE_CHUNK, DEFAULT_FRAMES,
                              DecodeRecord, GeneratedVideo, TextToVideo, VideoDefaults, VideoParams)
from .pipelines.wan import WAN_DEFAULTS, WanTextToVideo, check_wan_params
from .pipelines.skyreels import (SKYREELS_DEFAULTS, SKYREELS_FORCING, DiffusionForcing, SkyReelsTextToVideo,
                                 load_skyreels_pipeline)
from .pipelines.streaming import (SELF_FORCING_ATTENTION_FRAMES, SELF_FORCING_FRAMES_PER_CHUNK, ChunkFrames,
                                  StreamingModel, StreamingVideo, chunk_frame_count, load_streaming_model)
from .families.self_forcing import SELF_FORCING, streaming_preset
from .families.wan_names import is_original_layout
from .io.safetensors import SafetensorsFile
from .sampling.schedules import NoiseSchedule, inference_timesteps

__version__ = "0.1.0"

__all__ = [
    # generating
    "GenerateParams", "GeneratedBatch", "Job", "RunPlan", "StepRecord", "TextToImage", "generate_image",
    "load_pipeline", "load_prompt_encoder", "plan_run", "ENCODE_MODES", "InitImage", "load_init_image",
    # textual inversion
    "TextualInversion", "embedding_folders", "read_embedding", "read_embeddings",
    # LoRAs
    "Lora", "default_lora_dir", "parse_lora_option", "prompt_loras", "read_lora", "resolve_lora", "split_lora_tags",
    "ANIMATEDIFF_SCHEDULER", "CONTEXT_WEIGHTINGS", "DEFAULT_DECODE_CHUNK", "GeneratedVideo", "TextToVideo",
    "VideoDefaults", "VideoParams", "generate_video", "load_video_pipeline", "DEFAULT_FRAMES", "DecodeRecord", "WAN_DEFAULTS",
    "WanTextToVideo", "check_wan_params", "DiffusionForcing", "SKYREELS_DEFAULTS", "SKYREELS_FORCING",
    "SkyReelsTextToVideo", "load_skyreels_pipeline",
    # models and motion adapters
    "Checkpoint", "MOTION_ADAPTER_PRESETS", "PRESETS", "auto_download", "describe", "download_model", "format_size",
    "model_family", "open_checkpoint", "resolve_model", "resolve_motion_adapter",
    # streaming
    "ChunkFrames", "SELF_FORCING", "SELF_FORCING_ATTENTION_FRAMES", "SELF_FORCING_FRAMES_PER_CHUNK",
    "StreamingModel", "StreamingVideo", "chunk_frame_count", "is_original_layout", "load_streaming_model", "resolve_streaming_generator",
    "streaming_preset", "SafetensorsFile", "model_architecture", "template_fields", "OutputClosedError", "open_frame_sink",
    # noise schedules
    "NoiseSchedule", "SchedulerConfig", "inference_timesteps",
    # files
    "a1111_parameters", "check_output", "images_to_uint8", "plan_output_paths", "read_prompts_file", "PromptLine",
    "IMAGE_OPTIONS", "VIDEO_OPTIONS", "plan_video_outputs", "save_array", "save_png", "save_video",
    "check_video_output",
    "convert_checkpoint",
    # errors, defaults and the choices the CLI offers
    "SdcliError", "BACKENDS", "BETA_SCHEDULES", "DEFAULT_GUIDANCE", "MAX_SEED", "MODEL_PRESETS", "PRECISIONS",
    "SAMPLERS", "TIMESTEP_SPACINGS", "VAE_CHOICES", "VARIANTS", "__version__",
]

_prefer_small_pages()
