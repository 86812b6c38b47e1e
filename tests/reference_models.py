"""Random-weight models of the real architectures, built with the reference libraries and written to disk in the
layouts sdcli reads (diffusers folder, single-file LDM checkpoint). Test-only. torch, transformers and diffusers
are imported by the functions that use them, so writing folders of given tensors (F32, F16) needs none of them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from sdcli.nn.tokenizer import shipped_tokenizer_dir


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16) by torch's rounding."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(values)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def randomise_norms(model, generator: "torch.Generator", is_norm=lambda name: "norm" in name,
                    bias_scale: float | None = 0.02) -> None:
    """Norm scales near 1 and shifts near 0 (default inits leave them at exactly 1 and 0), and other biases of
    ``bias_scale`` (None: left as initialised), so that a norm or bias read from the wrong tensor shows."""
    import torch

    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if is_norm(name):
                base = 1.0 if name.endswith("weight") else 0.0
                parameter.copy_(base + 0.1 * torch.randn(parameter.shape, generator=generator))
            elif bias_scale is not None and name.endswith("bias"):
                parameter.copy_(bias_scale * torch.randn(parameter.shape, generator=generator))


def random_clip_text_model(config: dict, seed: int = 0):
    """transformers CLIPTextModel with random weights; layer norms randomised too so their bugs show."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config)).eval()
    randomise_norms(model, torch.Generator().manual_seed(seed + 1), is_norm=lambda name: "layer_norm" in name)
    return model


def canonical_state(model) -> dict[str, np.ndarray]:
    """The model's tensors as float32 numpy arrays under canonical names (``text_model.`` prefix)."""
    state = {}
    for name, tensor in model.state_dict().items():
        name = name if name.startswith("text_model.") else "text_model." + name
        if name.endswith("position_ids"):
            continue
        state[name] = tensor.detach().float().numpy().copy()
    return state


def stored(state: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """The tensors as the reference safetensors library stores ``dtype`` ("F32", "F16"; BF16 needs torch)."""
    if dtype == "F32":
        return state
    if dtype == "F16":
        return {name: value.astype(np.float16) for name, value in state.items()}
    raise ValueError(dtype)


def rounded(state: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """The float32 values a tensor has after being stored as ``dtype``."""
    if dtype == "F32":
        return state
    if dtype == "F16":
        return {name: value.astype(np.float16).astype(np.float32) for name, value in state.items()}
    return {name: (bf16_bits(value).astype(np.uint32) << 16).view(np.float32) for name, value in state.items()}


def save_tensors(path: Path, state: dict[str, np.ndarray], dtype: str) -> None:
    """Write with the reference library; BF16 through safetensors.torch."""
    if dtype == "BF16":
        import torch
        from safetensors.torch import save_file as save_torch

        save_torch({name: torch.from_numpy(np.ascontiguousarray(value)).to(torch.bfloat16)
                    for name, value in state.items()}, str(path))
    else:
        save_file({name: np.ascontiguousarray(value) for name, value in stored(state, dtype).items()}, str(path))


def write_diffusers_folder(folder: Path, family_configs: Path, text_config: dict, state: dict[str, np.ndarray],
                           dtype: str = "F32", variant: str | None = None, strip_prefix: bool = False) -> Path:
    """A diffusers model folder with a text encoder, tokenizer and scheduler (no UNet/VAE yet)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(family_configs / "model_index.json", folder / "model_index.json")
    (folder / "text_encoder").mkdir(exist_ok=True)
    (folder / "text_encoder" / "config.json").write_text(json.dumps(text_config))
    if strip_prefix:  # transformers 5 saves without the text_model. prefix
        state = {name.removeprefix("text_model."): value for name, value in state.items()}
    filename = f"model.{variant}.safetensors" if variant else "model.safetensors"
    save_tensors(folder / "text_encoder" / filename, state, dtype)
    (folder / "tokenizer").mkdir(exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(shipped_tokenizer_dir() / name, folder / "tokenizer" / name)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(family_configs / "tokenizer" / name, folder / "tokenizer" / name)
    (folder / "scheduler").mkdir(exist_ok=True)
    shutil.copy(family_configs / "scheduler" / "scheduler_config.json", folder / "scheduler")
    return folder


def sd1_single_file_state(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """SD1 LDM layout: the transformers names under ``cond_stage_model.transformer.``, plus position_ids."""
    out = {"cond_stage_model.transformer." + name: value for name, value in state.items()}
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    return out


def openclip_single_file_state(state: dict[str, np.ndarray], layers: int, seed: int = 0) -> dict[str, np.ndarray]:
    """SD2's OpenCLIP layout, written out by hand: fused in_proj q/k/v, ln_1/ln_2, c_fc/c_proj, ln_final; plus
    the 24th resblock, text_projection and logit_scale that a real SD2 checkpoint carries and diffusers drops."""
    rng = np.random.default_rng(seed)
    prefix = "cond_stage_model.model."
    text = "text_model."
    out = {
        prefix + "token_embedding.weight": state[text + "embeddings.token_embedding.weight"],
        prefix + "positional_embedding": state[text + "embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": state[text + "final_layer_norm.weight"],
        prefix + "ln_final.bias": state[text + "final_layer_norm.bias"],
    }
    width = out[prefix + "ln_final.weight"].shape[0]
    for i in range(layers + 1):
        block = f"{prefix}transformer.resblocks.{i}."
        if i == layers:  # the dropped last layer of OpenCLIP ViT-H: random values that must not be read
            source = {f"{text}encoder.layers.{layers - 1}." + key[len(f"{text}encoder.layers.{layers - 1}."):]:
                      rng.standard_normal(value.shape).astype(np.float32)
                      for key, value in state.items() if key.startswith(f"{text}encoder.layers.{layers - 1}.")}
            layer = f"{text}encoder.layers.{layers - 1}."
        else:
            source, layer = state, f"{text}encoder.layers.{i}."
        attn = layer + "self_attn."
        out[block + "attn.in_proj_weight"] = np.concatenate(
            [source[attn + f"{p}_proj.weight"] for p in "qkv"], axis=0)  # (3C, C)
        out[block + "attn.in_proj_bias"] = np.concatenate([source[attn + f"{p}_proj.bias"] for p in "qkv"])
        out[block + "attn.out_proj.weight"] = source[attn + "out_proj.weight"]
        out[block + "attn.out_proj.bias"] = source[attn + "out_proj.bias"]
        for ours, theirs in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2")):
            out[block + f"{ours}.weight"] = source[layer + f"{theirs}.weight"]
            out[block + f"{ours}.bias"] = source[layer + f"{theirs}.bias"]
        for ours, theirs in (("c_fc", "fc1"), ("c_proj", "fc2")):
            out[block + f"mlp.{ours}.weight"] = source[layer + f"mlp.{theirs}.weight"]
            out[block + f"mlp.{ours}.bias"] = source[layer + f"mlp.{theirs}.bias"]
    out[prefix + "text_projection"] = rng.standard_normal((width, width)).astype(np.float32)
    out[prefix + "logit_scale"] = np.array(4.6052, dtype=np.float32)
    return out


# -- UNet ----------------------------------------------------------------------------------------------------------

def random_unet(config: dict, seed: int = 0):
    """diffusers UNet2DConditionModel with random weights. Its default init leaves group/layer norms at 1 and 0;
    they are randomised here (scale around 1, shift around 0) so a norm read from the wrong tensor shows."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    model = UNet2DConditionModel.from_config(config).eval()
    randomise_norms(model, torch.Generator().manual_seed(seed + 1),
                    is_norm=lambda name: "norm" in name.rsplit(".", 2)[-2], bias_scale=None)
    return model


def random_motion_adapter(config: dict, seed: int = 0):
    """diffusers MotionAdapter with random weights. Its init zeroes each module's output projection (a fresh
    adapter leaves the UNet's output unchanged, which would test nothing); every linear weight is drawn again
    (scale 1/sqrt(fan-in)), biases small, norms around 1 and 0. The frame position tables stay diffusers'."""
    import torch
    from diffusers import MotionAdapter

    torch.manual_seed(seed)
    model = MotionAdapter.from_config(config).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("weight") and parameter.ndim == 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / parameter.shape[1] ** 0.5)
    randomise_norms(model, generator, is_norm=lambda name: "norm" in name.rsplit(".", 2)[-2])
    return model


def unet_state(model) -> dict[str, np.ndarray]:
    """The UNet's tensors under canonical names as float32 numpy arrays that share the model's memory (no copy)."""
    return {name: tensor.detach().numpy() for name, tensor in model.state_dict().items()}


def load_rounded(model, state: dict[str, np.ndarray], dtype: str) -> None:
    """Overwrite the model's tensors with their values after being stored as ``dtype`` ("F16", "BF16")."""
    import torch

    with torch.no_grad():
        model.load_state_dict({name: torch.from_numpy(value) for name, value in rounded(state, dtype).items()})


def unet_ldm_state(state: dict[str, np.ndarray], unet_config: dict) -> dict[str, np.ndarray]:
    """The UNet tensors under their single-file (LDM) names: the canonical -> stored map inverted (the UNet map
    has neither fused parts nor reshapes)."""
    from sdcli.families.sd_names import unet_names

    out = {}
    for canonical, key in unet_names(unet_config).items():
        assert key.part is None and key.shape is None, canonical
        out[key.name] = state[canonical]
    return out


def write_unet_folder(folder: Path, family_configs: Path, unet_config: dict, state: dict[str, np.ndarray],
                      dtype: str = "F32", variant: str | None = None) -> Path:
    """A diffusers model folder holding a UNet, plus the family's model_index.json, text encoder config and
    scheduler config that opening a folder reads (no text-encoder weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(family_configs / "model_index.json", folder / "model_index.json")
    for component, filename in (("text_encoder", "config.json"), ("scheduler", "scheduler_config.json")):
        (folder / component).mkdir(exist_ok=True)
        shutil.copy(family_configs / component / filename, folder / component / filename)
    (folder / "unet").mkdir(exist_ok=True)
    (folder / "unet" / "config.json").write_text(json.dumps(unet_config))
    filename = f"diffusion_pytorch_model.{variant}.safetensors" if variant else "diffusion_pytorch_model.safetensors"
    save_tensors(folder / "unet" / filename, state, dtype)
    return folder


# -- VAE ---------------------------------------------------------------------------------------------------------

def random_vae(config: dict, seed: int = 0):
    """diffusers AutoencoderKL with random weights; group norms (scale and shift) and biases randomised too so
    that a swapped or ignored one shows."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    model = AutoencoderKL.from_config(config).eval()
    randomise_norms(model, torch.Generator().manual_seed(seed + 1), bias_scale=0.05)
    return model


def vae_state(model) -> dict[str, np.ndarray]:
    """The AutoencoderKL's tensors as float32 numpy arrays under their (canonical) state-dict names."""
    return {name: tensor.detach().float().numpy().copy() for name, tensor in model.state_dict().items()}


def write_vae_folder(folder: Path, family_configs: Path, vae_config: dict, state: dict[str, np.ndarray],
                     dtype: str = "F32") -> Path:
    """A diffusers model folder holding a VAE (plus the text-encoder config a folder is opened by)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(family_configs / "model_index.json", folder / "model_index.json")
    (folder / "text_encoder").mkdir(exist_ok=True)
    shutil.copy(family_configs / "text_encoder" / "config.json", folder / "text_encoder" / "config.json")
    (folder / "vae").mkdir(exist_ok=True)
    (folder / "vae" / "config.json").write_text(json.dumps(vae_config))
    save_tensors(folder / "vae" / "diffusion_pytorch_model.safetensors", state, dtype)
    return folder


def vae_single_file_state(state: dict[str, np.ndarray], config: dict) -> dict[str, np.ndarray]:
    """The VAE in the LDM single-file layout (``first_stage_model.*``), by inverting sdcli's name map; the
    mid-block attention's q/k/v/proj_out go back to 1x1 conv kernels (C, C, 1, 1). A VAE alone is not a
    checkpoint sdcli can sniff, so SD1's text-encoder position_ids buffer (an ignored extra) marks the family."""
    from sdcli.families import sd_names as names

    out = {}
    for canonical, key in names.vae_names(config).items():
        value = state[canonical]
        out[key.name] = value.reshape(*value.shape, 1, 1) if key.shape is not None else value
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    return out


# -- LoRA ----------------------------------------------------------------------------------------------------------

def lora_targets(shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Every Linear and convolution weight of a network (its tensor shapes by canonical name): what a LoRA can
    update."""
    return [name for name, shape in shapes.items() if name.endswith(".weight") and len(shape) >= 2]


def kohya_lora(shapes: dict[str, tuple[int, ...]], names: list[str], seed: int = 0,
               spelled: dict[str, str] | None = None, alphas: str = "varied") -> dict[str, np.ndarray]:
    """A random LoRA over the UNet weights ``names`` in kohya's (A1111's) naming, written out by hand:
    ``lora_unet_<module, dots as underscores>`` with ``lora_down`` (rank, in[, kh, kw]), ``lora_up`` (out, rank[,
    1, 1]) and ``alpha``, ranks 2 and 4 in turn. ``alphas``: "varied" gives factors alpha / rank of 0.5, 1 and 1.5
    in turn, so that a layer read with another's rank or alpha shows; "same" alpha 2 for every layer (diffusers
    gives the attention projections of a kohya file the most common alpha, not their own); "none" no alphas.
    ``spelled`` gives other names for some weights (their LDM names)."""
    rng = np.random.default_rng(seed)
    lora = {}
    for i, name in enumerate(names):
        shape = shapes[name]
        rank = (2, 4)[i % 2]
        module = (spelled or {}).get(name, name).removesuffix(".weight").replace(".", "_")
        fan_in = int(np.prod(shape[1:]))
        lora[f"lora_unet_{module}.lora_down.weight"] = (
            rng.standard_normal((rank, *shape[1:])) / np.sqrt(fan_in)).astype(np.float32)
        lora[f"lora_unet_{module}.lora_up.weight"] = (
            0.1 * rng.standard_normal((shape[0], rank, *(1,) * (len(shape) - 2)))).astype(np.float32)
        if alphas != "none":
            alpha = rank * (1 + i % 3) / 2 if alphas == "varied" else 2.0
            lora[f"lora_unet_{module}.alpha"] = np.array(alpha, np.float32)
    return lora
