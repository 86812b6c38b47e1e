"""From a checkpoint to results: loading the networks and running the stages of the data path.

So far: prompt -> tokenizer -> text encoder -> conditioning (B, 77, D). The denoising loop joins it with the
text-to-image work.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from .config import ClipConfig
from .io.checkpoint import Checkpoint, TensorSource, check_tensors, open_checkpoint
from .nn.clip import ClipTextEncoder, clip_text_shapes
from .nn.layers import Weight
from .nn.tokenizer import EOS_TOKEN, ClipTokenizer, Tokenized
from .ops import get_ops

log = logging.getLogger("sdcli")


def load_weights(source: TensorSource, expected: dict[str, tuple[int, ...]], precision: str) -> dict[str, Weight]:
    """Every tensor of ``expected`` from ``source``, held at ``precision``; strict (see ``check_tensors``)."""
    check_tensors(source, expected)
    return {name: Weight.from_stored(source.read(name), source.dtype(name), precision) for name in expected}


@dataclass
class PromptEncoder:
    """Tokenizer and text encoder of one model: prompts -> conditioning (B, 77, D)."""

    tokenizer: ClipTokenizer
    text_encoder: ClipTextEncoder
    config: ClipConfig
    precision: str
    timings: dict[str, float] = field(default_factory=dict)

    def tokenize(self, prompts: list[str]) -> list[Tokenized]:
        return [self.tokenizer.tokenize(prompt) for prompt in prompts]

    def encode(self, prompts: list[str], clip_skip: int = 1) -> np.ndarray:
        """(B, 77, D) float32 hidden states for ``prompts``."""
        ids = np.stack([t.ids for t in self.tokenize(prompts)])  # (B, 77)
        start = time.perf_counter()
        embeddings = self.text_encoder(ids, clip_skip=clip_skip)  # (B, 77, D)
        self.timings["encode_s"] = time.perf_counter() - start
        return embeddings


def load_prompt_encoder(model: str | Checkpoint, precision: str = "fp32", backend: str = "cpu") -> PromptEncoder:
    """Open ``model`` (a path or an opened checkpoint) and load its tokenizer and text encoder."""
    start = time.perf_counter()
    checkpoint = model if isinstance(model, Checkpoint) else open_checkpoint(model)
    ops = get_ops(backend)
    config = checkpoint.text_encoder_config()
    weights = load_weights(checkpoint.source("text_encoder"), clip_text_shapes(config), precision)
    tokenizer = ClipTokenizer.from_folder(checkpoint.tokenizer_dir(),
                                          default_pad_token="!" if checkpoint.family == "sd2" else EOS_TOKEN)
    encoder = PromptEncoder(tokenizer, ClipTextEncoder(ops, config, weights), config, precision)
    encoder.timings["load_s"] = time.perf_counter() - start
    log.info("loaded the %s text encoder from %s in %.2f s", checkpoint.family, checkpoint.path,
             encoder.timings["load_s"])
    return encoder
