"""The parameters of a generation run, with the defaults the CLI, the library and the tests share."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .errors import SdcliError

DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 7.5
DEFAULT_SAMPLER = "pndm"  # what SD1.5 ships with (PNDM/PLMS with skipped Runge-Kutta steps)
MAX_SEED = 2**32 - 1
SIZE_MULTIPLE = 8  # the VAE downsamples by 8
# The largest image side accepted before anything is loaded: twice the largest native size of any family, and
# well above what fits in memory at once (the memory check refuses most sizes far below it).
MAX_IMAGE_SIDE = 16384
VAE_CHOICES = ("full", "taesd")


@dataclass(frozen=True)
class GenerateParams:
    """One text-to-image request. None means "the model's default": ``sampler`` its own scheduler (PNDM for
    SD 1.5, DDIM for SD 2.1), ``steps`` 50 (LCM: 4), ``width``/``height`` its native size, ``seed`` a random one
    (drawn and recorded when the run starts)."""

    prompt: str
    negative_prompt: str = ""
    steps: int | None = None
    guidance_scale: float = DEFAULT_GUIDANCE
    guidance_rescale: float = 0.0
    sampler: str | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    clip_skip: int = 1
    batch_size: int = 1
    eta: float = 0.0  # DDIM's stochasticity; 0 is deterministic
    # Runs from an init image: the share of the steps run, in (0, 1] (None: diffusers' default, 0.8 for image to
    # image, 1.0 for inpainting), and how the image becomes latents ("sample": a seeded posterior sample, "mean").
    strength: float | None = None
    encode_mode: str = "sample"
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> "GenerateParams":
        """Raise a one-line SdcliError for a value no model can use; return self."""
        for name, label in (("guidance_scale", "guidance scale"), ("guidance_rescale", "guidance rescale"),
                            ("eta", "eta")):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or not math.isfinite(value):  # numpy's floats too
                raise SdcliError(f"{label} must be a finite number, got {value}")
        if self.steps is not None and self.steps < 1:
            raise SdcliError(f"steps must be at least 1, got {self.steps}")
        if self.guidance_scale < 0:
            raise SdcliError(f"guidance scale must not be negative, got {self.guidance_scale}")
        if not 0 <= self.guidance_rescale <= 1:
            raise SdcliError(f"guidance rescale must lie in [0, 1], got {self.guidance_rescale}")
        if self.eta < 0:
            raise SdcliError(f"eta must not be negative, got {self.eta}")
        if self.strength is not None and (not isinstance(self.strength, numbers.Real)
                                          or not 0 < self.strength <= 1):
            raise SdcliError(f"strength must lie in (0, 1], got {self.strength}")
        if self.encode_mode not in ("sample", "mean"):
            raise SdcliError(f"encode mode must be 'sample' or 'mean', got {self.encode_mode!r}")
        if self.clip_skip < 1:
            raise SdcliError(f"clip skip must be at least 1, got {self.clip_skip}")
        if self.batch_size < 1:
            raise SdcliError(f"batch size must be at least 1, got {self.batch_size}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise SdcliError(f"seed must lie in 0 .. {MAX_SEED}, got {self.seed}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (value < SIZE_MULTIPLE or value % SIZE_MULTIPLE):
                raise SdcliError(f"{name} must be a positive multiple of {SIZE_MULTIPLE}, got {value} "
                                 f"(try {max(SIZE_MULTIPLE, round(value / SIZE_MULTIPLE) * SIZE_MULTIPLE)})")
            if value is not None and value > MAX_IMAGE_SIDE:
                raise SdcliError(f"{name} {value} is larger than sdcli's limit of {MAX_IMAGE_SIDE} pixels")
        return self

    def with_(self, **changes: Any) -> "GenerateParams":
        return replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
