"""T5 and UMT5 text encoders (transformers ``T5EncoderModel`` / ``UMT5EncoderModel``); Wan2.1 reads UMT5-XXL.

Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer"; UMT5:
Chung et al. 2023, "UniMax: Fairer and More Effective Language Sampling for Large-Scale Multilingual
Pretraining". A pre-norm transformer over token embeddings without position embeddings: each attention adds a
learnt bias per head and per *relative position bucket* to its scores, which it does not scale by 1/sqrt(d).
Buckets are exact for small distances and logarithmic up to ``relative_attention_max_distance``, with separate
buckets for keys before and after the query (an encoder is bidirectional). T5 learns the bias table in its first
layer and shares it with every other; UMT5 learns one per layer. The norms are T5's: a scale over the root mean
square, no mean subtracted, no shift. The feed-forward is ReLU (T5 v1.0) or gated tanh-GELU (T5 v1.1, UMT5:
``gelu(wi_0 x) * wi_1 x``).

UMT5-XXL (Wan2.1's text encoder): width 4096, 24 layers of 64 heads of 64, feed-forward 10240, a vocabulary of
256384; 5.7 B parameters, 11 GB in bf16. It is meant to be loaded with ``load_network(..., stream=True)``
(each weight's file pages leave resident memory after its use: about one layer's weights stay resident) and its
embedding table only ever reads the rows of the tokens used.

Tensor names are transformers': ``shared.weight``, ``encoder.block.N.layer.0.SelfAttention.{q,k,v,o}.weight``
(with ``relative_attention_bias.weight``), ``encoder.block.N.layer.1.DenseReluDense.{wi_0,wi_1,wo}.weight``
(``wi`` for ReLU), the ``layer_norm`` scales, ``encoder.final_layer_norm.weight``. transformers ties ``shared.weight`` and
``encoder.embed_tokens.weight`` (one tensor under two names) and files store either or both:
:func:`tied_embedding` says which to read and which to ignore.

:func:`encode_prompts` gives what diffusers' ``WanPipeline`` gives the transformer: each prompt encoded on its
own tokens, then zeros up to 512 positions.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import _pick
from ..errors import CheckpointError, SdcliError
from .layers import Embedding, Linear, ParameterSource
from .tokenizer import T5Tokenizer, clean_prompt

SHARED = "shared.weight"
EMBED_TOKENS = "encoder.embed_tokens.weight"
FEED_FORWARDS = ("gated-gelu", "relu")
# Prompts encoded together: at most this many token positions per pass (the batch padded to its longest prompt).
# Each pass streams the weights once; the attention scores of a pass are heads x positions x longest floats.
TOKENS_PER_PASS = 2048


@dataclass(frozen=True)
class T5Config:
    """A T5 / UMT5 encoder (transformers ``T5Config`` / ``UMT5Config``, ``text_encoder/config.json``).

    Defaults are transformers' for ``model_type`` "umt5" (the T5 class defaults differ: see ``from_dict``); Wan2.1
    spells every size in its file: d_model 4096, d_kv 64, d_ff 10240, 24 layers, 64 heads, vocabulary 256384.
    """

    model_type: str = "umt5"
    vocab_size: int = 250112
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 1024
    num_layers: int = 8
    num_heads: int = 6
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "text_encoder/config.json") -> "T5Config":
        """Parse a transformers config.json; anything sdcli does not implement is a one-line CheckpointError."""
        model_type = data.get("model_type")
        if model_type not in ("t5", "umt5"):
            raise CheckpointError(f"{source}: model_type {model_type!r} is not a T5 encoder sdcli runs "
                                  "(expected 't5' or 'umt5')")
        if model_type == "t5":  # transformers' T5Config defaults (t5-small)
            data = {"vocab_size": 32128, "d_ff": 2048, "num_layers": 6, "num_heads": 8, "feed_forward_proj": "relu",
                    **{key: value for key, value in data.items() if value is not None}}
        config = _pick(cls, data, source)
        if config.feed_forward_proj not in FEED_FORWARDS:
            raise CheckpointError(f"{source}: feed_forward_proj {config.feed_forward_proj!r} is not supported "
                                  f"(sdcli implements {' and '.join(repr(f) for f in FEED_FORWARDS)})")
        sizes = {name: getattr(config, name) for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers",
                                                          "num_heads", "relative_attention_num_buckets",
                                                          "relative_attention_max_distance")}
        bad = [name for name, value in sizes.items() if isinstance(value, bool) or not isinstance(value, int)
               or value < 1]
        if bad:
            raise CheckpointError(f"{source}: {', '.join(bad)} must be positive integers")
        if config.relative_attention_num_buckets < 4 or \
                config.relative_attention_max_distance <= config.relative_attention_num_buckets // 4:
            raise CheckpointError(f"{source}: relative_attention_num_buckets must be at least 4 and "
                                  "relative_attention_max_distance more than a quarter of it")
        if not isinstance(config.layer_norm_epsilon, (int, float)) or not config.layer_norm_epsilon >= 0:
            raise CheckpointError(f"{source}: layer_norm_epsilon must be a non-negative number")
        return config

    @property
    def inner_dim(self) -> int:
        """The attention's width: heads times head size (4096 for UMT5-XXL; it need not equal d_model)."""
        return self.num_heads * self.d_kv

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj == "gated-gelu"

    def has_relative_bias(self, layer: int) -> bool:
        """Whether layer ``layer`` learns its own relative-position bias table (UMT5: every layer; T5: the first,
        shared with the others)."""
        return self.model_type == "umt5" or layer == 0


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """(length, length) int64 host array: the bias bucket of key j seen from query i, bidirectional.

    Half the buckets are for keys after the query (j > i), half for the others. Within a half, distances below
    a quarter of ``num_buckets`` have a bucket each; larger ones share logarithmically wider buckets up to
    ``max_distance``, and farther ones the last (Mesh TensorFlow's ``_relative_position_bucket``). The logarithm
    is taken in float32 and truncated, as transformers computes it.
    """
    relative = np.arange(length)[None, :] - np.arange(length)[:, None]  # (Tq, Tk): key - query
    half = num_buckets // 2
    max_exact = half // 2
    distance = np.abs(relative)
    scale = np.float32(math.log(max_distance / max_exact))
    ratio = np.log(np.maximum(distance, max_exact).astype(np.float32) / np.float32(max_exact)) / scale
    far = np.minimum(max_exact + (ratio * np.float32(half - max_exact)).astype(np.int64), half - 1)
    return (relative > 0).astype(np.int64) * half + np.where(distance < max_exact, distance, far)


class T5LayerNorm:
    """T5's norm: ``x / sqrt(mean(x^2) + eps) * weight`` over the last axis, no mean subtracted, no shift."""

    def __init__(self, params: ParameterSource, channels: int, eps: float):
        self.ops, self.eps = params.ops, eps
        self.weight = params.take("weight", (channels,))

    def __call__(self, x):
        return self.ops.rms_norm(x, self.weight, self.eps)  # (B, T, C)


class T5Attention:
    """Multi-head self-attention without biases or score scaling; the relative-position bias (and the key
    padding) arrive as the additive mask. With ``relative_bias`` it holds a bias table (buckets, heads)."""

    def __init__(self, params: ParameterSource, config: T5Config, relative_bias: bool):
        self.ops, self.heads = params.ops, config.num_heads
        self.q, self.k, self.v = (Linear(params.scope(name), config.d_model, config.inner_dim, bias=False)
                                  for name in ("q", "k", "v"))
        self.o = Linear(params.scope("o"), config.inner_dim, config.d_model, bias=False)
        self.relative_attention_bias = (Embedding(params.scope("relative_attention_bias"),
                                                  config.relative_attention_num_buckets, config.num_heads)
                                        if relative_bias else None)

    def position_bias(self, buckets: np.ndarray):
        """The bias (1, nh, T, T) of host ``buckets`` (T, T) from this layer's table."""
        ops, length = self.ops, buckets.shape[0]
        values = self.relative_attention_bias(buckets)  # (T, T, nh)
        return ops.reshape(ops.permute(values, (2, 0, 1)), (1, self.heads, length, length))  # (1, nh, T, T)

    def __call__(self, x, mask):
        """x (B, T, C), mask (1 or B, nh, T, T) added to the scores -> (B, T, C)."""
        ops, precision = self.ops, self.q.weight.precision
        q, k, v = (ops.split_heads(projection(x), self.heads, precision=precision)  # (B, nh, T, hs)
                   for projection in (self.q, self.k, self.v))
        y = ops.attention(q, k, v, scale=1.0, mask=mask, precision=precision)  # (B, nh, T, hs)
        return self.o(ops.merge_heads(y))  # (B, T, C)


class T5FeedForward:
    """``wo(gelu_tanh(wi_0 x) * wi_1 x)`` (gated-gelu) or ``wo(relu(wi x))`` (relu), no biases."""

    def __init__(self, params: ParameterSource, config: T5Config):
        self.ops, self.gated = params.ops, config.gated
        width, inner = config.d_model, config.d_ff
        if self.gated:
            self.wi_0 = Linear(params.scope("wi_0"), width, inner, bias=False)
            self.wi_1 = Linear(params.scope("wi_1"), width, inner, bias=False)
        else:
            self.wi = Linear(params.scope("wi"), width, inner, bias=False)
        self.wo = Linear(params.scope("wo"), inner, width, bias=False)

    def __call__(self, x):
        ops = self.ops
        if self.gated:
            hidden = ops.mul(ops.gelu_tanh(self.wi_0(x)), self.wi_1(x))  # (B, T, d_ff)
        else:
            hidden = ops.relu(self.wi(x))  # (B, T, d_ff)
        return self.wo(hidden)  # (B, T, C)


class T5Block:
    """x + attention(norm(x)), then + feed_forward(norm(x)) (``layer.0`` and ``layer.1`` of transformers)."""

    def __init__(self, params: ParameterSource, config: T5Config, relative_bias: bool):
        self.ops = params.ops
        width, eps = config.d_model, config.layer_norm_epsilon
        attention, feed_forward = params.scope("layer", 0), params.scope("layer", 1)
        self.attention_norm = T5LayerNorm(attention.scope("layer_norm"), width, eps)
        self.attention = T5Attention(attention.scope("SelfAttention"), config, relative_bias)
        self.feed_forward_norm = T5LayerNorm(feed_forward.scope("layer_norm"), width, eps)
        self.feed_forward = T5FeedForward(feed_forward.scope("DenseReluDense"), config)

    def __call__(self, x, mask):
        x = self.ops.add(x, self.attention(self.attention_norm(x), mask))  # (B, T, C)
        return self.ops.add(x, self.feed_forward(self.feed_forward_norm(x)))  # (B, T, C)


def tied_embedding(stored: Iterable[str]) -> tuple[str, list[str]]:
    """For a file storing the tensors ``stored``: the name to read the token embedding under (``shared.weight``
    when stored, else ``encoder.embed_tokens.weight``) and the stored names to leave unread (the tied copy, when
    both are stored). With neither, ``shared.weight``, which the strict check then names as missing."""
    names = set(stored)
    if SHARED in names:
        return SHARED, [EMBED_TOKENS] if EMBED_TOKENS in names else []
    return (EMBED_TOKENS if EMBED_TOKENS in names else SHARED), []


class T5Encoder:
    """Token ids (B, T) -> the last hidden state (B, T, d_model), after the final norm. ``embedding`` is the name
    the token embedding is read under (see :func:`tied_embedding`)."""

    def __init__(self, params: ParameterSource, config: T5Config, embedding: str = SHARED):
        self.ops, self.config = params.ops, config
        if embedding not in (SHARED, EMBED_TOKENS):
            raise ValueError(f"the token embedding is {SHARED!r} or {EMBED_TOKENS!r}, not {embedding!r}")
        self.shared = Embedding(params.scope(*embedding.removesuffix(".weight").split(".")), config.vocab_size,
                                config.d_model)
        encoder = params.scope("encoder")
        self.block = [T5Block(encoder.scope("block", i), config, config.has_relative_bias(i))
                      for i in range(config.num_layers)]
        self.final_layer_norm = T5LayerNorm(encoder.scope("final_layer_norm"), config.d_model,
                                            config.layer_norm_epsilon)

    def __call__(self, ids: np.ndarray, attention_mask: np.ndarray | None = None):
        """Encode host token ``ids`` (B, T). ``attention_mask`` (B, T), 1 for a token and 0 for padding, keeps
        the padded keys out of every attention (transformers' ``attention_mask``); each row needs a token. The
        positions of padding get values too, as in transformers: their queries see the real keys."""
        ids = np.asarray(ids)
        config = self.config
        if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1 or ids.dtype.kind not in "iu":
            raise SdcliError(f"token ids must be a (batch, tokens) integer array, got {ids.dtype} {ids.shape}")
        if ids.min() < 0 or ids.max() >= config.vocab_size:
            raise SdcliError(f"token ids must lie in 0 .. {config.vocab_size - 1}")
        batch, length = ids.shape
        key_padding = self._key_padding(attention_mask, ids.shape)  # (B, 1, 1, T) host, or None
        buckets = relative_position_buckets(length, config.relative_attention_num_buckets,
                                            config.relative_attention_max_distance)  # (T, T)
        if key_padding is not None:
            key_padding = self.ops.from_host(key_padding)  # (B, 1, 1, T)
        x = self.shared(ids)  # (B, T, C)
        mask = None
        for block in self.block:
            if block.attention.relative_attention_bias is not None:
                mask = block.attention.position_bias(buckets)  # (1, nh, T, T)
                if key_padding is not None:
                    mask = self.ops.add(self.ops.concat([mask] * batch, axis=0), key_padding)  # (B, nh, T, T)
            x = block(x, mask)
        return self.final_layer_norm(x)  # (B, T, C)

    @staticmethod
    def _key_padding(attention_mask: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray | None:
        """-inf at the padded keys (B, 1, 1, T), 0 elsewhere; None when nothing is padded."""
        if attention_mask is None:
            return None
        keep = np.asarray(attention_mask)
        if keep.shape != shape:
            raise SdcliError(f"the attention mask must have the ids' shape {shape}, got {keep.shape}")
        keep = keep != 0
        if not keep.any(axis=1).all():
            raise SdcliError("every row of the attention mask needs at least one token")
        if keep.all():
            return None
        return np.where(keep, np.float32(0), np.float32(-np.inf))[:, None, None, :]  # (B, 1, 1, T)


def encode_prompts(text_encoder: T5Encoder, tokenizer: T5Tokenizer, prompts: list[str]) -> np.ndarray:
    """diffusers' ``WanPipeline._get_t5_prompt_embeds``: (B, max_length, d_model) host float32 for ``prompts``.

    Each prompt is cleaned (:func:`~sdcli.nn.tokenizer.clean_prompt`; diffusers also runs ``ftfy.fix_text`` when
    that package is installed, sdcli never does), tokenized to at most ``tokenizer.max_length`` tokens (512 for
    Wan) with its end token, encoded, and every position past its tokens set to zero. diffusers encodes the
    padded 512 positions with the padding masked out of the keys, so the real positions depend on the real
    tokens alone: here each prompt is encoded on its own tokens (the batch padded to its longest prompt, the
    padding masked), a fraction of the cost for short prompts. Prompts are taken in passes of at most
    ``TOKENS_PER_PASS`` positions, longest first; each pass reads the weights once.
    """
    ops, max_length = text_encoder.ops, tokenizer.max_length
    tokens = [tokenizer.tokenize(clean_prompt(prompt)) for prompt in prompts]
    order = sorted(range(len(tokens)), key=lambda index: -tokens[index].length)
    pieces: dict[int, Any] = {}
    start = 0
    while start < len(order):
        longest = tokens[order[start]].length
        count = max(1, min(len(order) - start, TOKENS_PER_PASS // longest))
        group = order[start:start + count]
        ids = np.stack([tokens[index].ids[:longest] for index in group])  # (b, n)
        lengths = np.array([tokens[index].length for index in group])
        keep = np.arange(longest)[None, :] < lengths[:, None]  # (b, n)
        hidden = text_encoder(ids, keep)  # (b, n, C)
        if not keep.all():
            hidden = ops.mul(hidden, ops.from_host(keep[:, :, None].astype(np.float32)))  # zero past each prompt
        hidden = ops.pad(hidden, ((0, 0), (0, max_length - longest), (0, 0)))  # (b, max_length, C)
        for row, index in enumerate(group):
            pieces[index] = ops.narrow(hidden, 0, row, row + 1)  # (1, max_length, C)
        start += count
    if not pieces:
        return np.zeros((0, max_length, text_encoder.config.d_model), dtype=np.float32)
    return ops.to_host(ops.concat([pieces[index] for index in range(len(prompts))], axis=0))  # (B, L, C)


@dataclass
class T5PromptEncoder:
    """Tokenizer and T5 encoder of one model: prompts -> conditioning (B, 512, d_model), as Wan's pipeline."""

    tokenizer: T5Tokenizer
    text_encoder: T5Encoder
    config: T5Config
    precision: str
    source: Any = None  # the tensor source the weights are mapped from, for release()
    timings: dict[str, float] = field(default_factory=dict)

    def release(self) -> None:
        """Drop the encoder's mapped pages from resident memory (encoding still works: they map again)."""
        if self.source is not None:
            self.source.release()

    def encode(self, prompts: list[str]) -> np.ndarray:
        """(B, 512, d_model) float32 embeddings of ``prompts`` (see :func:`encode_prompts`)."""
        start = time.perf_counter()
        embeddings = encode_prompts(self.text_encoder, self.tokenizer, prompts)
        self.timings["encode_s"] = time.perf_counter() - start
        return embeddings
