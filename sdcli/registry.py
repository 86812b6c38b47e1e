"""The single source of the names the CLI offers as choices."""

from .config import BETA_SCHEDULES, PREDICTION_TYPES, TIMESTEP_SPACINGS
from .models import MODEL_PRESETS
from .ops.parameter import PRECISIONS
from .ops import BACKENDS
from .params import VAE_CHOICES
from .sampling.plans import SAMPLERS as SAMPLER_SPECS

SAMPLERS = tuple(SAMPLER_SPECS)  # sampler names, in the table's order

__all__ = ["BACKENDS", "BETA_SCHEDULES", "MODEL_PRESETS", "PRECISIONS", "PREDICTION_TYPES", "SAMPLERS",
           "TIMESTEP_SPACINGS", "VAE_CHOICES"]
