"""sdcli: Stable Diffusion from the command line, on numpy, without PyTorch.

The public API, usable from Python without the CLI::

    import sdcli
    encoder = sdcli.load_prompt_encoder("weights/sd15")
    conditioning = encoder.encode(["a photograph of an astronaut riding a horse"])  # (1, 77, 768)
"""

from .config import ClipConfig, SchedulerConfig
from .errors import SdcliError
from .io.checkpoint import Checkpoint, describe, open_checkpoint
from .io.files import check_output, save_array
from .pipeline import PromptEncoder, load_prompt_encoder
from .sampling.schedules import NoiseSchedule, inference_timesteps

__version__ = "0.1.0"

__all__ = ["Checkpoint", "ClipConfig", "NoiseSchedule", "PromptEncoder", "SchedulerConfig", "SdcliError", "check_output",
           "describe", "inference_timesteps", "load_prompt_encoder", "open_checkpoint", "save_array", "__version__"]
