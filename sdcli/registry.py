"""The single source of the names the CLI offers as choices."""

from .config import BETA_SCHEDULES, PREDICTION_TYPES, TIMESTEP_SPACINGS
from .nn.layers import PRECISIONS
from .ops import BACKENDS

__all__ = ["BACKENDS", "BETA_SCHEDULES", "PRECISIONS", "PREDICTION_TYPES", "TIMESTEP_SPACINGS"]
