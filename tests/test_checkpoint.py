"""Opening checkpoints: layouts, family and prediction-type sniffing, strict loading, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

import reference_models as ref
from sdcli import load_prompt_encoder, open_checkpoint
from sdcli.errors import CheckpointError, ModelNotFoundError
from sdcli.io.safetensors import save_file
from data_paths import CONFIGS

TINY_TEXT_CONFIG = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5)
SENTINEL = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"


@pytest.fixture
def tiny_state():
    rng = np.random.default_rng(0)
    from sdcli.config import ClipConfig
    from sdcli.io.weights import tensor_shapes
    from sdcli.nn.clip import ClipTextEncoder

    config = ClipConfig.from_diffusers(TINY_TEXT_CONFIG)
    shapes = tensor_shapes(lambda params: ClipTextEncoder(params, config))
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def folder_with(tmp_path, state):
    return ref.write_diffusers_folder(tmp_path / "model", CONFIGS / "sd15", TINY_TEXT_CONFIG, state)


def test_strict_loading_names_every_problem(tmp_path, tiny_state):
    state = dict(tiny_state)
    del state["text_model.encoder.layers.1.mlp.fc2.bias"]
    state["text_model.encoder.layers.0.extra.weight"] = np.zeros(3, np.float32)
    state["text_model.final_layer_norm.weight"] = np.zeros(31, np.float32)
    folder = folder_with(tmp_path, state)
    with pytest.raises(CheckpointError) as error:
        load_prompt_encoder(folder, backend="numpy")
    message = str(error.value)
    assert "\n" not in message
    assert "1 missing: text_model.encoder.layers.1.mlp.fc2.bias" in message
    assert "1 unexpected: text_model.encoder.layers.0.extra.weight" in message
    assert "1 mis-shaped: text_model.final_layer_norm.weight (31,) (expected (32,))" in message


def test_position_ids_are_ignored(tmp_path, tiny_state):
    state = dict(tiny_state, **{"text_model.embeddings.position_ids": np.arange(77, dtype=np.int64)[None]})
    encoder = load_prompt_encoder(folder_with(tmp_path, state), backend="numpy")
    assert encoder.encode(["a cat"]).shape == (1, 77, 32)


def test_sources_are_opened_once_and_released_in_place(tmp_path, tiny_state, monkeypatch):
    """checkpoint.source() returns one object per component, so the pipeline's release() drops the pages of the
    very mapping the weights were read from; encoding still works (and gives the same values) after it."""
    from sdcli.io.safetensors import SafetensorsFile

    checkpoint = open_checkpoint(folder_with(tmp_path, tiny_state))
    assert checkpoint.source("text_encoder") is checkpoint.source("text_encoder")
    released = []
    original = SafetensorsFile.release
    monkeypatch.setattr(SafetensorsFile, "release", lambda self, name=None: (released.append(name),
                                                                             original(self, name)))
    checkpoint.release("unet")  # never opened: nothing to do
    assert released == []
    encoder = load_prompt_encoder(checkpoint, backend="numpy")
    before = encoder.encode(["a cat"])
    released.clear()  # the layers let go of each tensor's pages once they hold their own copy
    checkpoint.release("text_encoder")
    assert released == [None]
    np.testing.assert_array_equal(encoder.encode(["a cat"]), before)


def test_single_file_unexpected_tensor_is_named(tmp_path):
    path = tmp_path / "odd.safetensors"
    save_file(path, {"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight":
                     np.zeros((4, 4), np.float32),
                     "cond_stage_model.transformer.text_model.mystery.weight": np.zeros(2, np.float32)})
    with pytest.raises(CheckpointError) as error:
        load_prompt_encoder(path, backend="numpy")
    message = str(error.value)
    assert "missing" in message and "mis-shaped" in message and "mystery.weight" in message


def sd2_file(path, extra):
    save_file(path, {"cond_stage_model.model.token_embedding.weight": np.zeros((2, 2), np.float32), **extra})
    return path


def test_sd2_prediction_type_sniffing(tmp_path):
    rng = np.random.default_rng(1)
    spread = sd2_file(tmp_path / "v.safetensors", {SENTINEL: (0.3 * rng.standard_normal(320)).astype(np.float32)})
    flat = sd2_file(tmp_path / "eps.safetensors", {SENTINEL: (0.01 * rng.standard_normal(320)).astype(np.float32)})
    marked = sd2_file(tmp_path / "marked.safetensors", {SENTINEL: np.zeros(320, np.float32),
                                                         "v_pred": np.zeros((), np.float32)})
    inpaint = sd2_file(tmp_path / "inpaint.safetensors", {
        SENTINEL: (0.3 * rng.standard_normal(320)).astype(np.float32),
        "model.diffusion_model.input_blocks.0.0.weight": np.zeros((320, 9, 3, 3), np.float32)})
    assert open_checkpoint(spread).prediction_type == "v_prediction"
    assert open_checkpoint(flat).prediction_type == "epsilon"
    assert open_checkpoint(marked).prediction_type == "v_prediction"
    assert open_checkpoint(inpaint).prediction_type == "epsilon"
    assert open_checkpoint(flat).family == "sd2"
    assert open_checkpoint(flat).config("scheduler").prediction_type == "epsilon"


def test_family_from_unet_alone(tmp_path):
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    for width, family in ((768, "sd1"), (1024, "sd2")):
        path = tmp_path / f"unet{width}.safetensors"
        save_file(path, {key: np.zeros((320, width), np.float32)})
        assert open_checkpoint(path).family == family


@pytest.mark.parametrize("key, family", [("conditioner.embedders.0.transformer.x", "SDXL"),
                                         ("double_blocks.0.img_attn.qkv.weight", "FLUX")])
def test_newer_families_are_refused(tmp_path, key, family):
    path = tmp_path / "new.safetensors"
    save_file(path, {key: np.zeros(2, np.float32)})
    with pytest.raises(CheckpointError, match=family):
        open_checkpoint(path)


def test_not_a_stable_diffusion_file(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file(path, {"weight": np.zeros(2, np.float32)})
    with pytest.raises(CheckpointError, match="nor a Stable Diffusion"):
        open_checkpoint(path)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickles_are_refused_with_a_way_out(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError) as error:
        open_checkpoint(path)
    message = str(error.value)
    assert "arbitrary code" in message and f"sdcli convert {path} {tmp_path / 'model.safetensors'}" in message


def test_folder_with_only_pickled_weights(tmp_path, tiny_state):
    folder = folder_with(tmp_path, tiny_state)
    (folder / "text_encoder" / "model.safetensors").rename(folder / "text_encoder" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        load_prompt_encoder(folder, backend="numpy")


def test_component_folder_and_missing_paths(tmp_path, tiny_state):
    folder = folder_with(tmp_path, tiny_state)
    with pytest.raises(CheckpointError, match="folder above it"):
        open_checkpoint(folder / "text_encoder")
    with pytest.raises(ModelNotFoundError, match="no model at"):
        open_checkpoint(tmp_path / "absent")
    with pytest.raises(ModelNotFoundError, match="no model_index.json"):
        open_checkpoint(tmp_path)


def test_fp16_variant_and_shards(tmp_path, tiny_state):
    configs = CONFIGS / "sd15"
    variant = ref.write_diffusers_folder(tmp_path / "v", configs, TINY_TEXT_CONFIG, tiny_state, dtype="F16",
                                         variant="fp16")
    reference = load_prompt_encoder(variant, precision="fp16", backend="numpy").encode(["a cat"])
    sharded = ref.write_diffusers_folder(tmp_path / "s", configs, TINY_TEXT_CONFIG, {}, dtype="F16")
    (sharded / "text_encoder" / "model.safetensors").unlink()
    names = sorted(tiny_state)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in halves.items():
        save_file(sharded / "text_encoder" / shard, {k: tiny_state[k].astype(np.float16) for k in keys})
    index = {"weight_map": {k: shard for shard, keys in halves.items() for k in keys}}
    (sharded / "text_encoder" / "model.safetensors.index.json").write_text(json.dumps(index))
    np.testing.assert_array_equal(load_prompt_encoder(sharded, precision="fp16", backend="numpy").encode(["a cat"]),
                                  reference)
