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
from ..ops import Ops
from .layers import Embedding, Weight, layer_norm_from, linear_from

PREFIX = "text_model."


def clip_text_shapes(config: ClipConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the encoder reads, by canonical name, with its shape."""
    width, inner = config.hidden_size, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        f"{PREFIX}embeddings.token_embedding.weight": (config.vocab_size, width),
        f"{PREFIX}embeddings.position_embedding.weight": (config.max_position_embeddings, width),
        f"{PREFIX}final_layer_norm.weight": (width,),
        f"{PREFIX}final_layer_norm.bias": (width,),
    }
    for i in range(config.num_hidden_layers):
        layer = f"{PREFIX}encoder.layers.{i}."
        for projection in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{layer}self_attn.{projection}.weight"] = (width, width)
            shapes[f"{layer}self_attn.{projection}.bias"] = (width,)
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[f"{layer}{norm}.weight"] = (width,)
            shapes[f"{layer}{norm}.bias"] = (width,)
        shapes[f"{layer}mlp.fc1.weight"] = (inner, width)
        shapes[f"{layer}mlp.fc1.bias"] = (inner,)
        shapes[f"{layer}mlp.fc2.weight"] = (width, inner)
        shapes[f"{layer}mlp.fc2.bias"] = (width,)
    return shapes


class ClipAttention:
    """Causal multi-head self-attention."""

    def __init__(self, ops: Ops, config: ClipConfig, weights: dict[str, Weight], prefix: str):
        self.ops = ops
        self.heads = config.num_attention_heads
        self.q_proj = linear_from(ops, weights, prefix + "q_proj.")
        self.k_proj = linear_from(ops, weights, prefix + "k_proj.")
        self.v_proj = linear_from(ops, weights, prefix + "v_proj.")
        self.out_proj = linear_from(ops, weights, prefix + "out_proj.")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        batch, tokens, width = x.shape  # (B, T, C)
        bf16 = self.q_proj.weight.precision == "bf16"
        q, k, v = (self.ops.split_heads(projection(x), self.heads, bf16=bf16)  # (B, nh, T, hs)
                   for projection in (self.q_proj, self.k_proj, self.v_proj))
        y = self.ops.attention(q, k, v, causal=True, bf16=bf16)  # (B, nh, T, hs)
        y = y.transpose(0, 2, 1, 3).reshape(batch, tokens, width)  # (B, T, C)
        return self.out_proj(y)


class ClipEncoderLayer:
    """x + attn(ln1(x)), then + mlp(ln2(x)); the MLP is fc1 -> (quick-)GELU -> fc2."""

    def __init__(self, ops: Ops, config: ClipConfig, weights: dict[str, Weight], prefix: str):
        eps = config.layer_norm_eps
        self.layer_norm1 = layer_norm_from(ops, weights, prefix + "layer_norm1.", eps)
        self.self_attn = ClipAttention(ops, config, weights, prefix + "self_attn.")
        self.layer_norm2 = layer_norm_from(ops, weights, prefix + "layer_norm2.", eps)
        self.fc1 = linear_from(ops, weights, prefix + "mlp.fc1.")
        self.fc2 = linear_from(ops, weights, prefix + "mlp.fc2.")
        self.activation = ops.quick_gelu if config.hidden_act == "quick_gelu" else ops.gelu

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = x + self.self_attn(self.layer_norm1(x))  # (B, T, C)
        return x + self.fc2(self.activation(self.fc1(self.layer_norm2(x))))  # (B, T, C)


class ClipTextEncoder:
    """Token ids (B, 77) -> hidden states (B, 77, C) after the final layer norm."""

    def __init__(self, ops: Ops, config: ClipConfig, weights: dict[str, Weight]):
        self.config = config
        self.token_embedding = Embedding(weights[f"{PREFIX}embeddings.token_embedding.weight"])
        self.position_embedding = Embedding(weights[f"{PREFIX}embeddings.position_embedding.weight"])
        self.layers = [ClipEncoderLayer(ops, config, weights, f"{PREFIX}encoder.layers.{i}.")
                       for i in range(config.num_hidden_layers)]
        self.final_layer_norm = layer_norm_from(ops, weights, f"{PREFIX}final_layer_norm.", config.layer_norm_eps)

    def __call__(self, ids: np.ndarray, clip_skip: int = 1) -> np.ndarray:
        """Encode ``ids`` (B, T) with T <= 77.

        ``clip_skip`` counts as in AUTOMATIC1111 and stable-diffusion.cpp: 1 uses every layer, 2 stops after the
        penultimate one (diffusers' ``clip_skip=1``), and so on; the final layer norm is applied either way.
        """
        layers_used = self.config.num_hidden_layers - (clip_skip - 1)
        if not 1 <= clip_skip or layers_used < 1:
            raise SdcliError(f"clip_skip must be between 1 and {self.config.num_hidden_layers}, got {clip_skip}")
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] > self.config.max_position_embeddings:
            raise SdcliError(f"token ids must be (batch, <= {self.config.max_position_embeddings}), got {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise SdcliError(f"token ids must lie in 0 .. {self.config.vocab_size - 1}")
        positions = np.arange(ids.shape[1])
        x = self.token_embedding(ids) + self.position_embedding(positions)[None]  # (B, T, C)
        for layer in self.layers[:layers_used]:
            x = layer(x)
        return self.final_layer_norm(x)  # (B, T, C)
