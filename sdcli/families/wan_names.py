"""The exact name map from the original Wan layout to diffusers ``WanTransformer3DModel`` names.

The original code (Wan-Video/Wan2.1, ``wan/modules/model.py``), which the streaming models (Self-Forcing,
CausVid) ship in, names the transformer's tensors after its own modules:

- ``patch_embedding``, ``text_embedding.{0,2}``, ``time_embedding.{0,2}``, ``time_projection.1``;
- per block ``blocks.{i}``: ``self_attn`` / ``cross_attn`` for diffusers' ``attn1`` / ``attn2``, with ``q``, ``k``,
  ``v``, ``o`` for ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` and ``norm_q`` / ``norm_k`` alike; ``norm3`` for the
  cross-attention norm (diffusers' ``norm2``: the original's ``norm1`` and ``norm2`` hold no weights);
  ``ffn.0`` / ``ffn.2`` for ``ffn.net.0.proj`` / ``ffn.net.2``; ``modulation`` for ``scale_shift_table``;
- ``head.head`` for ``proj_out`` and ``head.modulation`` for the output ``scale_shift_table``.

ComfyUI's repackaged files add ``model.diffusion_model.`` in front of every name. The canonical names come from
the network (shape only) through anchored rules (:mod:`sdcli.io.name_rules`), tested as a bijection and against
diffusers' own converter.
"""

from __future__ import annotations

from ..config import WanTransformerConfig
from ..io.checkpoint import NameMap
from ..io.name_rules import INDEX, PARAM, Rule, network_shapes, one_of, translate
from ..nn.dit_wan import WanTransformer3DModel

# diffusers module -> the original's, for the modules outside the blocks (weight and bias each)
TOP_MODULES = {
    "patch_embedding": "patch_embedding",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "proj_out": "head.head",
}
ATTENTIONS = {"attn1": "self_attn", "attn2": "cross_attn"}
ATTENTION_MODULES = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o", "norm_q": "norm_q", "norm_k": "norm_k"}
BLOCK_MODULES = {"norm2": "norm3", "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2"}
COMFY_PREFIX = "model.diffusion_model."
WRAPPER_PREFIX = "model."  # Self-Forcing's and CausVid's WanDiffusionWrapper


def wan_transformer_names(config: WanTransformerConfig, prefix: str = "") -> NameMap:
    """WanTransformer3DModel (diffusers names) <- the original Wan layout, every stored name after ``prefix``."""
    shapes = network_shapes(lambda params: WanTransformer3DModel(params, config))
    block = rf"blocks\.(?P<i>{INDEX})"
    rules = [
        Rule(rf"(?P<module>{one_of(TOP_MODULES)})\.{PARAM}", lambda m: f"{TOP_MODULES[m['module']]}.{m['param']}"),
        Rule("scale_shift_table", lambda m: "head.modulation"),
        Rule(rf"{block}\.(?P<attn>{one_of(ATTENTIONS)})\.(?P<module>{one_of(ATTENTION_MODULES)})\.{PARAM}",
             lambda m: f"blocks.{m['i']}.{ATTENTIONS[m['attn']]}.{ATTENTION_MODULES[m['module']]}.{m['param']}"),
        Rule(rf"{block}\.(?P<module>{one_of(BLOCK_MODULES)})\.{PARAM}",
             lambda m: f"blocks.{m['i']}.{BLOCK_MODULES[m['module']]}.{m['param']}"),
        Rule(rf"{block}\.scale_shift_table", lambda m: f"blocks.{m['i']}.modulation"),
    ]
    return translate(shapes, rules, prefix, "Wan transformer")


def is_original_layout(names: list[str] | set[str]) -> str | None:
    """The prefix of an original-layout Wan transformer file ("", ComfyUI's, or the ``model.`` of a training
    wrapper's state, as Self-Forcing's generator ships), or None for any other layout."""
    for prefix in ("", COMFY_PREFIX, WRAPPER_PREFIX):
        if f"{prefix}head.modulation" in names and f"{prefix}blocks.0.self_attn.q.weight" in names:
            return prefix
    return None
