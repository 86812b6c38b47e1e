"""The single-file (LDM) -> canonical (diffusers) name maps.

The maps take their canonical names from sdcli's own networks (built shape only) and translate them by rules;
three checks, each against something the maps do not share code with:

- completeness on the FULL SD1.5 / SD2.1 configs: the map's canonical names are exactly the state-dict names of
  the diffusers / transformers model built on the meta device (no memory), each stored tensor feeds one entry,
  and the shapes the map implies agree with the model's;
- diffusers' own single-file converters as the reference: an LDM-layout state dict made by inverting the map is
  converted by diffusers and must come back as exactly the canonical names with bit-identical values. Small
  configs of the same structure (these, and the tiny ones the UNet and VAE tests load through the single-file
  layout) carry random values; the full configs carry per-tensor ids in zero-memory expanded tensors (the
  converters only move and slice tensors, so ids show every placement);
- the ignore list of known extras.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="diffusers/transformers are the name-map reference")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from diffusers.loaders import single_file_utils as reference  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from sdcli.families import sd_names as names  # noqa: E402
from sdcli.families.sd_names import SourceKey  # noqa: E402
from data_paths import CONFIGS  # noqa: E402
from test_unet import TINY as UNET_TEST_CONFIGS  # noqa: E402
from test_vae import TINY_CONFIGS as VAE_TEST_CONFIGS  # noqa: E402

TEXT_MAPS = {"sd15": names.text_encoder_sd1_names, "sd21": names.text_encoder_openclip_names}
COMPONENTS = ("unet", "vae", "text_encoder")

SMALL_UNET = {
    # Three levels with distinct widths so a wrong level or skip connection shows as a shape error, and so an
    # up level has both attentions and an upsampler (LDM's output_blocks.N.2.conv).
    "block_out_channels": [32, 64, 96],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "in_channels": 4,
    "out_channels": 4,
    "sample_size": 8,
}
SMALL_UNETS = {
    "sd1-like": {**SMALL_UNET, "use_linear_projection": False},
    "sd2-like": {**SMALL_UNET, "use_linear_projection": True},
    "two-transformer-layers": {**SMALL_UNET, "use_linear_projection": True, "transformer_layers_per_block": 2},
}
SMALL_VAE = {
    "block_out_channels": [32, 64, 96],
    "layers_per_block": 2,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "in_channels": 3,
    "out_channels": 3,
    "sample_size": 32,
}
SMALL_CLIP = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 5,
    "max_position_embeddings": 77,
    "vocab_size": 100,
    "projection_dim": 16,
    "hidden_act": "gelu",
}

# The tiny configs of the UNet and VAE tests, which load their weights through the single-file maps too: other
# layers_per_block, downsample padding and channel counts; a VAE without mid attention and quant convs.
SMALL_UNETS.update({f"test_unet-{name}": config for name, config in UNET_TEST_CONFIGS.items()})
SMALL_VAES = {"small": SMALL_VAE, **{f"test_vae-{name}": config for name, config in VAE_TEST_CONFIGS.items()}}


# -- building models and layouts ---------------------------------------------------------------------------------

def read_config(family: str, component: str) -> dict:
    return json.loads((CONFIGS / family / component / "config.json").read_text())


def build_model(component: str, config: dict):
    if component == "unet":
        return UNet2DConditionModel.from_config(config)
    if component == "vae":
        return AutoencoderKL.from_config(config)
    return CLIPTextModel(CLIPTextConfig(**config))


def meta_model(component: str, config: dict):
    with torch.device("meta"):
        return build_model(component, config)


def name_map(family: str, component: str, config: dict) -> dict[str, SourceKey]:
    if component == "unet":
        return names.unet_names(config)
    if component == "vae":
        return names.vae_names(config)
    return TEXT_MAPS[family](config)


def canonical_state(model) -> dict:
    """The model's state dict in canonical names (transformers 5 drops CLIPTextModel's ``text_model.``)."""
    state = model.state_dict()
    if isinstance(model, CLIPTextModel) and not hasattr(model, "text_model"):
        state = {f"text_model.{name}": tensor for name, tensor in state.items()}
    return state


def stored_shape(key: SourceKey, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape the single file stores for a canonical tensor of ``shape`` (one part of it when fused).

    A reshaped entry is LDM's VAE attention: a 1x1 conv kernel (C, C, 1, 1) where diffusers has Linear (C, C).
    """
    if key.shape is None:
        return shape
    assert len(shape) == 2, key
    return (*shape, 1, 1)


def sources(mapping: dict[str, SourceKey]) -> dict[str, list[tuple[int, str]]]:
    """stored name -> [(part index, canonical name)], parts in order."""
    grouped: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for canonical, key in mapping.items():
        grouped[key.name].append((key.part[0] if key.part else 0, canonical))
    return {stored: sorted(entries) for stored, entries in grouped.items()}


def ldm_layout(mapping: dict[str, SourceKey], state: dict) -> dict:
    """Invert the map: place each canonical tensor at its stored name, re-fusing parts and reshaping back."""
    layout = {}
    for stored, entries in sources(mapping).items():
        pieces = [state[canonical].reshape(stored_shape(mapping[canonical], tuple(state[canonical].shape)))
                  for _, canonical in entries]
        layout[stored] = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    return layout


def id_layout(mapping: dict[str, SourceKey], shapes: dict[str, tuple[int, ...]]) -> tuple[dict, dict]:
    """(LDM-layout state, expected canonical state) where every canonical tensor is filled with its own id.

    The tensors are expanded scalars (no memory for the full configs); a fused tensor's rows carry its parts' ids.
    int16 keeps the copies the OpenCLIP converter makes of each part small.
    """
    layout, expected = {}, {}
    next_id = 0
    for stored, entries in sources(mapping).items():
        ids = list(range(next_id, next_id + len(entries)))
        next_id += len(entries)
        for value, (_, canonical) in zip(ids, entries):
            expected[canonical] = torch.tensor(value, dtype=torch.int16).expand(shapes[canonical])
        first = mapping[entries[0][1]]
        shape = stored_shape(first, shapes[entries[0][1]])
        if len(entries) == 1:
            layout[stored] = torch.tensor(ids[0], dtype=torch.int16).expand(shape)
        else:  # fused: rows [p*n, (p+1)*n) hold part p's id
            rows = torch.tensor(ids, dtype=torch.int16).repeat_interleave(shape[0])  # (count*n,)
            layout[stored] = rows.view(-1, *([1] * (len(shape) - 1))).expand(len(ids) * shape[0], *shape[1:])
    return layout, expected


def randomize(model, seed: int) -> dict:
    """Distinct random values in every tensor; returns the canonical state."""
    generator = torch.Generator().manual_seed(seed)
    state = canonical_state(model)
    with torch.no_grad():
        for tensor in state.values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator))
    return state


def run_reference(component: str, family: str, config: dict, layout: dict, model) -> dict:
    """diffusers' converter for the component on an LDM-layout state dict."""
    if component == "unet":
        return reference.convert_ldm_unet_checkpoint(layout, config)
    if component == "vae":
        return reference.convert_ldm_vae_checkpoint(layout, config)
    if family == "sd15":
        return reference.convert_ldm_clip_checkpoint(layout)
    return reference.convert_open_clip_checkpoint(model, layout, prefix=names.OPENCLIP_PREFIX)


def add_openclip_extras(layout: dict, config: dict, make) -> None:
    """What a real SD2 file holds beyond the map: one more resblock, the projection, the temperature."""
    width, layers = config["hidden_size"], config["num_hidden_layers"]
    prefix = f"{names.OPENCLIP_RESBLOCKS}{layers}"
    for name, shape in (("attn.in_proj_weight", (3 * width, width)), ("attn.in_proj_bias", (3 * width,)),
                        ("attn.out_proj.weight", (width, width)), ("attn.out_proj.bias", (width,)),
                        ("ln_1.weight", (width,)), ("ln_1.bias", (width,)),
                        ("ln_2.weight", (width,)), ("ln_2.bias", (width,)),
                        ("mlp.c_fc.weight", (4 * width, width)), ("mlp.c_fc.bias", (4 * width,)),
                        ("mlp.c_proj.weight", (width, 4 * width)), ("mlp.c_proj.bias", (width,))):
        layout[f"{prefix}.{name}"] = make(shape)
    # OpenCLIP's text_projection is (width, embed_dim); diffusers reads the q/k/v split size off its first axis.
    layout[f"{names.OPENCLIP_PREFIX}text_projection"] = make((width, config.get("projection_dim", width)))
    layout[f"{names.OPENCLIP_PREFIX}logit_scale"] = make(())


def drop_ignored_resblock(converted: dict, layers: int) -> dict:
    """diffusers skips only resblock 23 (a hard-coded SD2 list); drop the extra resblock of smaller configs."""
    extra = f"text_model.encoder.layers.{layers}."
    dropped = {name for name in converted if name.startswith(extra)}
    assert len(dropped) in (0, 16), sorted(dropped)
    return {name: value for name, value in converted.items() if name not in dropped}


# -- 1. completeness and shapes on the full configs --------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd15", "sd21"])
@pytest.mark.parametrize("component", COMPONENTS)
def test_full_config_map_is_complete_bijection(family, component):
    config = read_config(family, component)
    mapping = name_map(family, component, config)
    shapes = {name: tuple(t.shape) for name, t in canonical_state(meta_model(component, config)).items()}

    assert set(mapping) == set(shapes)
    names.check_bijection(mapping)
    stored = [key.name for key in mapping.values()]
    assert not [name for name in stored if names.is_known_extra(name, config.get("num_hidden_layers"))]

    for stored_name, entries in sources(mapping).items():
        keys = [mapping[canonical] for _, canonical in entries]
        part_shapes = {shapes[canonical] for _, canonical in entries}
        assert len(part_shapes) == 1, (stored_name, part_shapes)  # fused parts are equal slices
        for key, (_, canonical) in zip(keys, entries):
            if key.shape is not None:
                assert key.shape == shapes[canonical], canonical


@pytest.mark.parametrize("family, stored, shape", [
    # Facts of the real single files, independent of diffusers.
    ("sd21", "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight", (3072, 1024)),
    ("sd21", "cond_stage_model.model.positional_embedding", (77, 1024)),
    ("sd15", "first_stage_model.decoder.mid.attn_1.q.weight", (512, 512, 1, 1)),
    ("sd15", "model.diffusion_model.input_blocks.1.1.proj_in.weight", (320, 320, 1, 1)),
    ("sd21", "model.diffusion_model.input_blocks.1.1.proj_in.weight", (320, 320)),
    ("sd15", "model.diffusion_model.output_blocks.2.1.conv.weight", (1280, 1280, 3, 3)),
    ("sd15", "model.diffusion_model.output_blocks.5.2.conv.weight", (1280, 1280, 3, 3)),
    ("sd15", "model.diffusion_model.input_blocks.4.0.skip_connection.weight", (640, 320, 1, 1)),
    ("sd15", "first_stage_model.decoder.up.3.block.0.conv1.weight", (512, 512, 3, 3)),
    ("sd15", "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight", (128, 256, 1, 1)),
])
def test_stored_shapes_of_known_tensors(family, stored, shape):
    component = {"cond_stage_model": "text_encoder", "first_stage_model": "vae"}.get(stored.split(".")[0], "unet")
    config = read_config(family, component)
    mapping = name_map(family, component, config)
    shapes = {name: tuple(t.shape) for name, t in canonical_state(meta_model(component, config)).items()}
    entries = sources(mapping)[stored]
    first = entries[0][1]
    one = stored_shape(mapping[first], shapes[first])
    assert (len(entries) * one[0], *one[1:]) == shape


def test_block_arithmetic_spot_checks():
    unet = names.unet_names(read_config("sd15", "unet"))
    vae = names.vae_names(read_config("sd15", "vae"))
    clip = names.text_encoder_openclip_names(read_config("sd21", "text_encoder"))
    prefix = names.UNET_PREFIX
    assert unet["down_blocks.1.attentions.1.proj_out.bias"].name == f"{prefix}input_blocks.5.1.proj_out.bias"
    assert unet["down_blocks.2.downsamplers.0.conv.weight"].name == f"{prefix}input_blocks.9.0.op.weight"
    assert unet["down_blocks.3.resnets.1.conv2.weight"].name == f"{prefix}input_blocks.11.0.out_layers.3.weight"
    assert unet["mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"].name == \
        f"{prefix}middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    assert unet["up_blocks.3.attentions.2.norm.weight"].name == f"{prefix}output_blocks.11.1.norm.weight"
    assert unet["up_blocks.1.upsamplers.0.conv.bias"].name == f"{prefix}output_blocks.5.2.conv.bias"
    assert unet["time_embedding.linear_2.weight"].name == f"{prefix}time_embed.2.weight"
    assert vae["decoder.up_blocks.0.upsamplers.0.conv.weight"].name == \
        "first_stage_model.decoder.up.3.upsample.conv.weight"
    assert vae["encoder.mid_block.attentions.0.to_out.0.weight"] == SourceKey(
        "first_stage_model.encoder.mid.attn_1.proj_out.weight", shape=(512, 512))
    assert clip["text_model.encoder.layers.22.self_attn.v_proj.bias"] == SourceKey(
        "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_bias", part=(2, 3))


# -- 2. diffusers' converters as the reference -------------------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(SMALL_UNETS))
def test_small_unet_matches_diffusers_converter(variant):
    config = dict(UNet2DConditionModel.from_config(SMALL_UNETS[variant]).config)
    check_small_component("unet", "sd15", config, seed=1)


@pytest.mark.parametrize("variant", list(SMALL_VAES))
def test_small_vae_matches_diffusers_converter(variant):
    config = dict(AutoencoderKL.from_config(SMALL_VAES[variant]).config)
    check_small_component("vae", "sd15", config, seed=2)


@pytest.mark.parametrize("family", ["sd15", "sd21"])
def test_small_text_encoder_matches_diffusers_converter(family):
    check_small_component("text_encoder", family, dict(SMALL_CLIP), seed=3)


def check_small_component(component: str, family: str, config: dict, seed: int) -> None:
    model = build_model(component, config)
    state = randomize(model, seed)
    mapping = name_map(family, component, config)
    names.check_bijection(mapping)
    layout = ldm_layout(mapping, state)
    if component == "text_encoder" and family == "sd21":
        generator = torch.Generator().manual_seed(seed + 100)
        add_openclip_extras(layout, config, lambda shape: torch.randn(shape, generator=generator))
    converted = run_reference(component, family, config, layout, model)
    if component == "text_encoder" and family == "sd21":
        converted = drop_ignored_resblock(converted, config["num_hidden_layers"])
    assert set(converted) == set(state)
    for name, tensor in state.items():
        assert converted[name].dtype == tensor.dtype and torch.equal(converted[name], tensor), name


@pytest.mark.parametrize("family", ["sd15", "sd21"])
@pytest.mark.parametrize("component", COMPONENTS)
def test_full_config_matches_diffusers_converter(family, component):
    config = read_config(family, component)
    model = meta_model(component, config)
    shapes = {name: tuple(t.shape) for name, t in canonical_state(model).items()}
    mapping = name_map(family, component, config)
    layout, expected = id_layout(mapping, shapes)
    if component == "text_encoder" and family == "sd21":
        add_openclip_extras(layout, config, lambda shape: torch.tensor(-1, dtype=torch.int16).expand(shape))
    converted = run_reference(component, family, config, layout, model)
    assert set(converted) == set(expected)
    for name, tensor in expected.items():
        assert tuple(converted[name].shape) == tensor.shape, name
        assert torch.equal(converted[name], tensor), name


# -- 3. known extras and the bijection check ---------------------------------------------------------------------

@pytest.mark.parametrize("name", [
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "scale_factor", "cond_ids",
    "model_ema.decay", "model_ema.num_updates", "model_ema.diffusion_modelinput_blocks00weight",
    "cond_stage_model.transformer.text_model.embeddings.position_ids",
    "cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale",
    "cond_stage_model.model.attn_mask",
    "first_stage_model.loss.logvar", "first_stage_model.loss.discriminator.main.0.weight",
    "first_stage_model.loss.perceptual_loss.net.slice1.0.weight",
])
def test_known_extras(name):
    assert names.is_known_extra(name)
    assert names.is_known_extra(name, 23)


@pytest.mark.parametrize("name", [
    "model.diffusion_model.input_blocks.0.0.weight",
    "model.diffusion_model.time_embed.0.weight",
    "first_stage_model.decoder.mid.attn_1.q.weight",
    "first_stage_model.quant_conv.weight",
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
    "cond_stage_model.model.positional_embedding",
    "cond_stage_model.model.ln_final.weight",
    "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight",
    "logvar.weight",
    "betas_extra",
])
def test_real_weights_are_not_extras(name):
    assert not names.is_known_extra(name)
    assert not names.is_known_extra(name, 23)


def test_openclip_resblocks_past_the_encoder_are_extras():
    stored = "cond_stage_model.model.transformer.resblocks.23.mlp.c_fc.weight"
    assert names.is_known_extra(stored, 23)
    assert not names.is_known_extra(stored, 24)
    assert not names.is_known_extra(stored)  # the layer count unknown: nothing is assumed extra
    assert names.is_known_extra("cond_stage_model.model.transformer.resblocks.5.ln_1.bias", 5)


@pytest.mark.parametrize("mapping, culprit", [
    ({"a.weight": SourceKey("x"), "b.weight": SourceKey("x")}, "x feeds a.weight, b.weight"),
    ({"q": SourceKey("f", part=(0, 3)), "k": SourceKey("f", part=(0, 3)), "v": SourceKey("f", part=(2, 3))},
     "f parts"),
    ({"q": SourceKey("f", part=(0, 3)), "k": SourceKey("f", part=(1, 3))}, "f parts"),
    ({"q": SourceKey("f", part=(0, 2)), "k": SourceKey("f", part=(1, 3)), "v": SourceKey("f", part=(2, 3))},
     "f parts"),
    ({"q": SourceKey("f", part=(0, 2)), "k": SourceKey("f", part=(1, 2)), "all": SourceKey("f")}, "f feeds"),
])
def test_check_bijection_names_the_duplicate(mapping, culprit):
    with pytest.raises(ValueError, match=culprit):
        names.check_bijection(mapping)


def test_check_bijection_accepts_a_split_tensor():
    names.check_bijection({"q": SourceKey("f", part=(0, 3)), "k": SourceKey("f", part=(1, 3)),
                           "v": SourceKey("f", part=(2, 3)), "o": SourceKey("g", shape=(2, 2))})


@pytest.mark.parametrize("option, value", [
    ("class_embed_type", "timestep"), ("addition_embed_type", "text_time"), ("num_class_embeds", 10),
    ("mid_block_type", None), ("only_cross_attention", True), ("layers_per_block", [2, 2, 2]),
    ("down_block_types", ["SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]),
])
def test_unsupported_unet_configs_are_refused(option, value):
    with pytest.raises(ValueError, match=option):
        names.unet_names({**SMALL_UNET, option: value})


def test_unsupported_vae_blocks_are_refused():
    with pytest.raises(ValueError, match="up_block_types"):
        names.vae_names({**SMALL_VAE, "up_block_types": ["UpDecoderBlock2D"] * 2 + ["AttnUpDecoderBlock2D"]})
