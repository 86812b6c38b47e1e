"""CLIP text encoder: the text tower of OpenAI CLIP ViT-L/14 (SD1.x) and OpenCLIP ViT-H/14 (SD2.x).

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision": a pre-norm
transformer with a causal mask over 77 token positions. Tensor names are transformers' ``CLIPTextModel`` names
with the ``text_model.`` prefix. SD2's diffusers text encoder already stops one layer short of OpenCLIP's 24
(the penultimate layer SD2 was trained on), so both families end in ``final_layer_norm``.
"""

from __future__ import annotations

import numpy as np

from ..config import ClipConfig
from ..errors import SdcliError
from ..ops.parameter import Weight
from .layers import Embedding, LayerNorm, Linear, ParameterSource

PREFIX = "text_model"


class ClipAttention:
    """Causal multi-head self-attention."""

    def __init__(self, params: ParameterSource, config: ClipConfig):
        self.ops, self.heads = params.ops, config.num_attention_heads
        width = config.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            Linear(params.scope(name), width, width) for name in ("q_proj", "k_proj", "v_proj", "out_proj"))

    def __call__(self, x):
        ops, precision = self.ops, self.q_proj.weight.precision  # (B, T, C)
        q, k, v = (ops.split_heads(projection(x), self.heads, precision=precision)  # (B, nh, T, hs)
                   for projection in (self.q_proj, self.k_proj, self.v_proj))
        y = ops.attention(q, k, v, causal=True, precision=precision)  # (B, nh, T, hs)
        return self.out_proj(ops.merge_heads(y))  # (B, T, C)


class ClipEncoderLayer:
    """x + attn(ln1(x)), then + mlp(ln2(x)); the MLP is fc1 -> (quick-)GELU -> fc2."""

    def __init__(self, params: ParameterSource, config: ClipConfig):
        self.ops = params.ops
        width, inner, eps = config.hidden_size, config.intermediate_size, config.layer_norm_eps
        self.layer_norm1 = LayerNorm(params.scope("layer_norm1"), width, eps)
        self.self_attn = ClipAttention(params.scope("self_attn"), config)
        self.layer_norm2 = LayerNorm(params.scope("layer_norm2"), width, eps)
        self.fc1 = Linear(params.scope("mlp", "fc1"), width, inner)
        self.fc2 = Linear(params.scope("mlp", "fc2"), inner, width)
        self.activation = self.ops.quick_gelu if config.hidden_act == "quick_gelu" else self.ops.gelu

    def __call__(self, x):
        x = self.ops.add(x, self.self_attn(self.layer_norm1(x)))  # (B, T, C)
        return self.ops.add(x, self.fc2(self.activation(self.fc1(self.layer_norm2(x)))))  # (B, T, C)


class ClipTextEncoder:
    """Token ids (B, 77) -> hidden states (B, 77, C) after the final layer norm."""

    def __init__(self, params: ParameterSource, config: ClipConfig):
        self.ops, self.config = params.ops, config
        width = config.hidden_size
        text = params.scope(PREFIX)
        self.token_embedding = Embedding(text.scope("embeddings", "token_embedding"), config.vocab_size, width)
        self.position_embedding = Embedding(text.scope("embeddings", "position_embedding"),
                                            config.max_position_embeddings, width)
        self.layers = [ClipEncoderLayer(text.scope("encoder", "layers", i), config)
                       for i in range(config.num_hidden_layers)]
        self.final_layer_norm = LayerNorm(text.scope("final_layer_norm"), width, config.layer_norm_eps)

    def __call__(self, ids: np.ndarray, clip_skip: int = 1, added_tokens: np.ndarray | None = None):
        """Encode host token ``ids`` (B, T) with T <= 77.

        ``clip_skip`` counts as in AUTOMATIC1111 and stable-diffusion.cpp: 1 uses every layer, 2 stops after the
        penultimate one (diffusers' ``clip_skip=1``), and so on; the final layer norm is applied either way.
        ``added_tokens`` (M, C) float32: the vectors of the ids after the vocabulary (V .. V + M - 1), textual-
        inversion embeddings, as the rows diffusers' ``load_textual_inversion`` appends to the token table.
        """
        layers_used = self.config.num_hidden_layers - (clip_skip - 1)
        if not 1 <= clip_skip or layers_used < 1:
            raise SdcliError(f"clip_skip must be between 1 and {self.config.num_hidden_layers}, got {clip_skip}")
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] > self.config.max_position_embeddings:
            raise SdcliError(f"token ids must be (batch, <= {self.config.max_position_embeddings}), got {ids.shape}")
        vocabulary = self.config.vocab_size + (0 if added_tokens is None else len(added_tokens))
        if ids.size and (ids.min() < 0 or ids.max() >= vocabulary):
            raise SdcliError(f"token ids must lie in 0 .. {vocabulary - 1}")
        positions = np.arange(ids.shape[1])
        x = self.ops.add(self.token_vectors(ids, added_tokens), self.position_embedding(positions))  # (B, T, C)
        for layer in self.layers[:layers_used]:
            x = layer(x)
        return self.final_layer_norm(x)  # (B, T, C)

    def token_vectors(self, ids: np.ndarray, added_tokens: np.ndarray | None):
        """(B, T, C): the token table's rows for ids below the vocabulary size, ``added_tokens``' rows (held in the
        table's precision) for the ids after it."""
        vocab_size = self.config.vocab_size
        added = ids >= vocab_size  # (B, T)
        if not added.any():
            return self.token_embedding(ids)
        ops, precision = self.ops, self.token_embedding.weight.precision
        table = ops.prepare(Weight(ops.weight_from_float32(np.asarray(added_tokens, dtype=np.float32), precision),
                                   precision))
        known = self.token_embedding(np.where(added, 0, ids))  # (B, T, C)
        learned = ops.embedding(table, np.where(added, ids - vocab_size, 0))  # (B, T, C)
        is_added = added[..., None].astype(np.float32)  # (B, T, 1): exactly one of the two terms is kept
        return ops.add(ops.mul(known, ops.from_host(1 - is_added)), ops.mul(learned, ops.from_host(is_added)))
