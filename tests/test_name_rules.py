"""How the single-file maps derive from the networks, without the reference libraries.

The maps translate the canonical names sdcli's own networks take (built shape only) by anchored rules. Here: each
map holds exactly the network's tensors and is a bijection; a name the rules do not know, or whose index the
LDM layout has no place for, is refused by name (a network change the maps do not follow fails, it does not load
wrong); and a name two rules claim is refused. test_names.py checks the maps against diffusers' converters.
"""

from __future__ import annotations

import json

import pytest

from sdcli.config import ClipConfig, UNetConfig, VAEConfig
from sdcli.families import sd_names as names
from sdcli.io import weights
from sdcli.families.sd_names import Rule, SourceKey
from sdcli.nn.clip import ClipTextEncoder
from sdcli.nn.unet import UNet2DConditionModel
from sdcli.nn.vae import Autoencoder
from data_paths import CONFIGS

MAPS = {
    ("sd15", "unet"): names.unet_names, ("sd21", "unet"): names.unet_names,
    ("sd15", "vae"): names.vae_names, ("sd21", "vae"): names.vae_names,
    ("sd15", "text_encoder"): names.text_encoder_sd1_names, ("sd21", "text_encoder"): names.text_encoder_openclip_names,
}
NETWORKS = {"unet": (UNet2DConditionModel, UNetConfig), "vae": (Autoencoder, VAEConfig),
            "text_encoder": (ClipTextEncoder, ClipConfig)}


def read_config(family: str, component: str) -> dict:
    return json.loads((CONFIGS / family / component / "config.json").read_text())


@pytest.mark.parametrize("family, component", sorted(MAPS))
def test_map_holds_exactly_the_networks_tensors(family, component):
    config = read_config(family, component)
    network, config_class = NETWORKS[component]
    shapes = weights.tensor_shapes(lambda params: network(params, config_class.from_diffusers(config)))
    mapping = MAPS[family, component](config)
    assert list(mapping) == list(shapes)  # one entry per tensor, in the order the network takes them
    names.check_bijection(mapping)
    reshaped = {name: key.shape for name, key in mapping.items() if key.shape is not None}
    assert reshaped == {name: shapes[name] for name in reshaped}
    assert bool(reshaped) == (component == "vae")  # only the VAE's attention 1x1 convs are reshaped


@pytest.mark.parametrize("family, component, extra, problem", [
    # module names the rules do not know
    ("sd15", "unet", "down_blocks.0.resnets.0.norm3.weight", "matches no rule"),
    ("sd15", "unet", "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora.weight", "matches no rule"),
    ("sd15", "unet", "time_embedding.linear_3.weight", "matches no rule"),
    ("sd21", "vae", "decoder.up_blocks.0.attentions.0.to_q.weight", "matches no rule"),
    ("sd15", "text_encoder", "text_model.embeddings.patch_embedding.weight", "matches no rule"),
    ("sd21", "text_encoder", "text_model.encoder.layers.0.self_attn.qkv_proj.weight", "matches no rule"),
    # patterns are anchored at both ends: a known name inside a longer one is not matched
    ("sd15", "unet", "base.conv_in.weight", "matches no rule"),
    ("sd15", "unet", "conv_in.weight_scale", "matches no rule"),
    ("sd15", "vae", "encoder.conv_in.weight.0", "matches no rule"),
    # parsed, but the LDM layout has no place for the index (it would land on another block's tensor)
    ("sd15", "unet", "down_blocks.0.resnets.2.conv1.weight", "has no place"),
    ("sd15", "unet", "down_blocks.3.downsamplers.0.conv.weight", "has no place"),
    ("sd15", "unet", "up_blocks.3.upsamplers.0.conv.weight", "has no place"),
    ("sd15", "unet", "up_blocks.4.resnets.0.conv1.weight", "has no place"),
    ("sd15", "unet", "mid_block.attentions.1.norm.weight", "has no place"),
    ("sd15", "vae", "encoder.mid_block.resnets.2.norm1.weight", "has no place"),
    ("sd15", "vae", "decoder.up_blocks.3.upsamplers.0.conv.weight", "has no place"),
])
def test_a_tensor_the_map_does_not_know_is_refused_by_name(family, component, extra, problem, monkeypatch):
    tensor_shapes = weights.tensor_shapes
    monkeypatch.setattr(weights, "tensor_shapes", lambda build: {**tensor_shapes(build), extra: (8,)})
    with pytest.raises(ValueError, match=f"tensor '{extra}' {problem}"):
        MAPS[family, component](read_config(family, component))


def test_a_name_two_rules_claim_is_refused():
    rules = (Rule(r"conv\.(?P<param>weight|bias)", lambda m: f"a.{m['param']}"),
             Rule(r"conv\.weight", lambda m: "b.weight"))
    assert names._translate({"conv.bias": (4,)}, rules, "x.", "test") == {"conv.bias": SourceKey("x.a.bias")}
    with pytest.raises(ValueError, match=r"tensor 'conv.weight' matches 2 rules"):
        names._translate({"conv.weight": (4, 4)}, rules, "x.", "test")


def test_rules_that_send_two_tensors_to_one_are_refused():
    rules = (Rule(r"conv_(?:in|out)\.weight", lambda m: "conv.weight"),)
    with pytest.raises(ValueError, match="conv.weight feeds conv_in.weight, conv_out.weight"):
        names._translate({"conv_in.weight": (4,), "conv_out.weight": (4,)}, rules, "", "test")
