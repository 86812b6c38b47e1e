"""The single source of the names the CLI offers as choices."""

from .config import BETA_SCHEDULES, PREDICTION_TYPES, TIMESTEP_SPACINGS
from .families import FAMILIES
from .models import MODEL_PRESETS, VARIANTS
from .ops import BACKENDS
from .params import VAE_CHOICES
from .sampling.plans import SAMPLERS as SAMPLER_SPECS

SAMPLERS = tuple(SAMPLER_SPECS)  # sampler names, in the table's order
# What weights can be held as, over every family's networks, in the first family's order.
PRECISIONS = tuple(dict.fromkeys(precision for family in FAMILIES.values() for precision in family.precisions))

__all__ = ["BACKENDS", "BETA_SCHEDULES", "MODEL_PRESETS", "PRECISIONS", "PREDICTION_TYPES", "SAMPLERS",
           "TIMESTEP_SPACINGS", "VAE_CHOICES", "VARIANTS"]
