"""The errors sdcli raises on purpose.

Every error a user can cause (a bad file, a missing model, a bad option) is an ``SdcliError`` whose message is
one readable line. The CLI prints that line and exits with ``exit_code``; anything else is a bug.
"""


class SdcliError(Exception):
    """A user-facing error with a one-line message."""

    exit_code = 2


class SafetensorsError(SdcliError):
    """A .safetensors file that is malformed, truncated or inconsistent."""


class CheckpointError(SdcliError):
    """A checkpoint that cannot be opened, is of an unknown kind, or does not match its architecture."""


class ModelNotFoundError(SdcliError):
    """``--model`` names nothing sdcli can load."""


class BackendError(SdcliError):
    """An op backend that was asked for but is not available (extension not built, no GPU)."""


class LoraError(SdcliError):
    """A LoRA file that cannot be read, or that does not fit the network it is merged into."""


class EmbeddingError(SdcliError):
    """A textual-inversion embedding that cannot be read, or that does not fit the model's text encoder."""
