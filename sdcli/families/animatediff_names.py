"""The exact name map from original-format AnimateDiff motion-module files to diffusers ``MotionAdapter`` names.

The original code (guoyww/AnimateDiff, ``animatediff/models/motion_module.py``) stores each motion module as
``{down_blocks|up_blocks}.{i}.motion_modules.{j}.temporal_transformer.*`` (the mid block's as
``mid_block.motion_modules.0.temporal_transformer.*``), with the module and block names of its own code:

- ``norm``, ``proj_in``, ``proj_out`` as diffusers;
- per transformer block ``transformer_blocks.{k}``: ``attention_blocks.0`` / ``.1`` for diffusers' ``attn1`` /
  ``attn2`` (``to_q``, ``to_k``, ``to_v``, ``to_out.0`` alike), ``norms.0`` / ``.1`` for ``norm1`` / ``norm2``,
  ``ff_norm`` for ``norm3`` and ``ff.net.0.proj`` / ``ff.net.2`` as diffusers;
- a ``pos_encoder.pe`` sinusoid table in each attention block, which diffusers' converter drops
  (``convert_animatediff_checkpoint_to_diffusers``) and the network computes again (it is read by nothing here,
  see ``is_position_table``).

The canonical names come from the network (:class:`sdcli.nn.motion.MotionAdapter`, shape only) through anchored
rules (:mod:`sdcli.io.name_rules`), tested as a bijection and against diffusers' converter.
"""

from __future__ import annotations

import re

from ..config import MotionAdapterConfig
from ..io.checkpoint import NameMap
from ..io.name_rules import INDEX, PARAM, Rule, network_shapes, one_of, translate
from ..nn.motion import MotionAdapter

# diffusers BasicTransformerBlock module -> the original TemporalTransformerBlock's (weight and bias each)
BLOCK_MODULES = {
    "norm1": "norms.0", "norm2": "norms.1", "norm3": "ff_norm",
    "attn1.to_q": "attention_blocks.0.to_q", "attn1.to_k": "attention_blocks.0.to_k",
    "attn1.to_v": "attention_blocks.0.to_v", "attn1.to_out.0": "attention_blocks.0.to_out.0",
    "attn2.to_q": "attention_blocks.1.to_q", "attn2.to_k": "attention_blocks.1.to_k",
    "attn2.to_v": "attention_blocks.1.to_v", "attn2.to_out.0": "attention_blocks.1.to_out.0",
    "ff.net.0.proj": "ff.net.0.proj", "ff.net.2": "ff.net.2",
}
MODULE_LAYERS = ("norm", "proj_in", "proj_out")
POSITION_TABLE = re.compile(r".*\.pos_encoder\.pe")


def is_position_table(name: str) -> bool:
    """An original file's stored frame position table (``...attention_blocks.{0,1}.pos_encoder.pe``)."""
    return POSITION_TABLE.fullmatch(name) is not None


def motion_adapter_names(config: MotionAdapterConfig) -> NameMap:
    """MotionAdapter (diffusers names) <- the original motion-module file, for an adapter of ``config``.
    diffusers' position tables (``...pos_embed.pe``) are left out: the original stores its own twice per block
    (one per attention), which the network does not read."""
    shapes = {name: shape for name, shape in network_shapes(lambda params: MotionAdapter(params, config)).items()
              if not name.endswith(".pos_embed.pe")}
    module = (rf"(?P<module>(?:down_blocks|up_blocks)\.{INDEX}\.motion_modules\.{INDEX}"
              rf"|mid_block\.motion_modules\.{INDEX})")
    rules = [
        Rule(rf"{module}\.(?P<layer>{one_of(MODULE_LAYERS)})\.{PARAM}",
             lambda m: f"{m['module']}.temporal_transformer.{m['layer']}.{m['param']}"),
        Rule(rf"{module}\.transformer_blocks\.(?P<k>{INDEX})\.(?P<block>{one_of(BLOCK_MODULES)})\.{PARAM}",
             lambda m: f"{m['module']}.temporal_transformer.transformer_blocks.{m['k']}."
                       f"{BLOCK_MODULES[m['block']]}.{m['param']}"),
    ]
    return translate(shapes, rules, "", "motion adapter")
