"""The UNet against diffusers' UNet2DConditionModel on random weights: tiny configs of SD1's and SD2's structure
(odd latent sizes, batch 2, fractional timesteps, every precision and layout) and the FULL SD1.5 / SD2.1 configs."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch/diffusers are the UNet reference")
pytest.importorskip("diffusers")

import reference_models as ref  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from sdcli.config import UNetConfig  # noqa: E402
from sdcli.errors import CheckpointError, SdcliError  # noqa: E402
from sdcli.ext import f32_kernels  # noqa: E402
from sdcli.families import sd as sd_family  # noqa: E402
from sdcli.families import sd_names as names  # noqa: E402
from sdcli.io.checkpoint import open_checkpoint  # noqa: E402
from sdcli.nn import unet as unet_module  # noqa: E402
from sdcli.io.weights import ArraySource, load_network, tensor_shapes  # noqa: E402
from sdcli.ops.parameter import parameters, unload_prepared  # noqa: E402
from sdcli.nn.unet import UNet2DConditionModel  # noqa: E402
from sdcli.ops.numpy_ops import nearest_indices  # noqa: E402
from sdcli.ops import get_ops  # noqa: E402
from data_paths import CONFIGS  # noqa: E402

TOL = {
    # max |ours - diffusers| / max |diffusers|, float32 on both sides. What differs is summation order (GEMM
    # blocking, conv algorithm, streaming softmax, group-norm reductions). Measured: about 1e-6 on the tiny
    # configs, 1.4e-6 (SD1.5) and 3e-6 (SD2.1) on the full ones. The tiny bound is tight enough that a norm
    # epsilon off by 10x or a mis-rounded timestep shows; the full bound is the one the 860M-parameter
    # network with its 16 resnets and 16 transformers is held to.
    "tiny": 2e-5,
    "full": 1e-3,
    # bf16 compute (--precision bf16): every matrix product rounds its activations to bf16 (2^-8 = 3.9e-3
    # relative per rounding) and these errors accumulate over the network's layers. Measured on the tiny configs:
    # 3.9e-3 against diffusers in float32 with the same bf16-rounded weights, where diffusers itself in bf16 is
    # further off (it also stores every activation in bf16). Bound: 4 bf16 ulps. Two bf16 runs that differ only in
    # summation order (the cpu and numpy backends) are as far apart as either is from float32: a 1e-7 difference
    # flips the rounding of an activation near a rounding midpoint by a whole bf16 ulp, and flips multiply layer
    # by layer, so the per-op contract is tested in test_ops and the network against float32 here.
    "bf16": 4 * 2**-8,
}
TINY_BASE = {
    # Three levels with SD's block types (no attention at the deepest level) and distinct widths, so a wrong
    # level or skip connection is a shape error; 16 groups over 32/64 channels so groups hold several channels.
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 48,
    "attention_head_dim": 4,
    "norm_num_groups": 16,
    "in_channels": 4,
    "out_channels": 4,
    "sample_size": 8,
}
TINY = {
    "sd1": TINY_BASE,
    # SD2: linear projections, per-level head counts (diffusers' attention_head_dim), upcast attention; and two
    # transformer layers per block at the deeper levels.
    "sd2": {**TINY_BASE, "use_linear_projection": True, "attention_head_dim": [2, 4, 4], "upcast_attention": True,
            "cross_attention_dim": 40, "norm_num_groups": 8, "transformer_layers_per_block": [1, 2, 2]},
    # The other knobs the config reader accepts, set away from SD's values.
    "options": {**TINY_BASE, "flip_sin_to_cos": False, "freq_shift": 1, "mid_block_scale_factor": 1.414,
                "downsample_padding": 0, "center_input_sample": True, "layers_per_block": 1, "in_channels": 3,
                "out_channels": 5, "norm_eps": 1e-3},
}
# 9x9 and 10x6 do not halve evenly: diffusers then upsamples to each skip connection's size.
LATENT_SIZES = [(8, 8), (9, 9), (10, 6)]
TIMESTEPS = np.array([980.5, 1.0])  # one fractional (as Karras-spaced samplers ask for), one integer
INTEGER_TIMESTEPS = np.array([999, 0])  # an integer array, as DDIM-style schedules hand over


def max_abs(a, b) -> float:
    return float(np.max(np.abs(a - b)))


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    assert ours.shape == reference.shape and ours.dtype == np.float32
    return max_abs(ours, reference) / float(np.max(np.abs(reference)))


def inputs(config: dict, size: tuple[int, int], batch: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((batch, config["in_channels"], *size)).astype(np.float32)
    context = rng.standard_normal((batch, 77, config["cross_attention_dim"])).astype(np.float32)
    return sample, context


def reference_output(model, sample, timesteps, context) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(sample), torch.from_numpy(timesteps),
                     torch.from_numpy(context)).sample.numpy()


def build(config: UNetConfig, state: dict[str, np.ndarray], backend: str = "cpu") -> UNet2DConditionModel:
    """The UNet over arrays in memory (float32 held as fp32)."""
    return load_network(lambda params: UNet2DConditionModel(params, config), ArraySource(state), get_ops(backend))


def load_unet(source, config: UNetConfig, precision: str, stream: bool = False) -> UNet2DConditionModel:
    return load_network(lambda params: UNet2DConditionModel(params, config), source, get_ops("cpu"), precision,
                        stream=stream)


def unet_shapes(config: UNetConfig) -> dict[str, tuple[int, ...]]:
    return tensor_shapes(lambda params: UNet2DConditionModel(params, config))


def matrices(network) -> list:
    return [parameter for parameter in parameters(network) if parameter.data.ndim >= 2]


# -- config --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family, heads, context, linear", [
    ("sd15", (8, 8, 8, 8), 768, False), ("sd21", (5, 10, 20, 20), 1024, True)])
def test_shipped_configs(family, heads, context, linear):
    """The real config files; unet_shapes is exactly diffusers' state dict (meta device: no memory) and the
    single-file map's canonical names."""
    from diffusers import UNet2DConditionModel as Reference

    data = json.loads((CONFIGS / family / "unet" / "config.json").read_text())
    config = UNetConfig.from_diffusers(data)
    assert (config.num_attention_heads, config.cross_attention_dim, config.use_linear_projection) == \
        (heads, context, linear)
    assert config.block_out_channels == (320, 640, 1280, 1280) and config.time_embed_dim == 1280
    with torch.device("meta"):
        model = Reference.from_config(data)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    assert unet_shapes(config) == expected
    assert set(names.unet_names(data)) == set(expected)


@pytest.mark.parametrize("option, value", [
    ("class_embed_type", "timestep"), ("addition_embed_type", "text_time"), ("time_cond_proj_dim", 256),
    ("num_attention_heads", 8), ("only_cross_attention", [True, False, False]), ("act_fn", "gelu"),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"), ("norm_num_groups", None),
    ("down_block_types", ["SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]),
    ("cross_attention_dim", [48, 48, 48]), ("attention_head_dim", [4, 4]), ("layers_per_block", [1, 2, 2]),
    ("transformer_layers_per_block", [[1], [1], [1]]), ("attention_head_dim", 3),
])
def test_unsupported_configs_are_refused(option, value):
    with pytest.raises(CheckpointError, match=option) as error:
        UNetConfig.from_diffusers({**TINY_BASE, option: value})
    assert "\n" not in str(error.value)


def test_off_options_are_accepted_however_spelled():
    """None and False both mean "off" for these; explicit SD values are accepted, not only missing keys."""
    config = UNetConfig.from_diffusers({**TINY_BASE, "mid_block_only_cross_attention": False,
                                        "only_cross_attention": [False, False, False], "num_attention_heads": None,
                                        "class_embed_type": None, "resnet_out_scale_factor": 1, "act_fn": "silu"})
    assert config == UNetConfig.from_diffusers(TINY_BASE)


def test_defaults_are_diffusers_defaults():
    """Keys a config.json leaves out take diffusers' constructor defaults."""
    from diffusers import UNet2DConditionModel as Reference

    with torch.device("meta"):
        defaults = dict(Reference.from_config({}).config)
    config = UNetConfig.from_diffusers({})
    assert config == UNetConfig.from_diffusers(defaults)
    assert (config.cross_attention_dim, config.num_attention_heads) == (1280, (8, 8, 8, 8))


def test_nearest_indices_match_torch():
    for in_size, out_size in ((2, 3), (3, 5), (5, 9), (4, 8), (3, 7), (7, 13)):
        grid = torch.arange(in_size, dtype=torch.float32).reshape(1, 1, in_size, 1)
        expected = torch.nn.functional.interpolate(grid, size=(out_size, 1), mode="nearest").flatten()
        np.testing.assert_array_equal(nearest_indices(in_size, out_size), expected.numpy().astype(np.int64))


# -- tiny configs ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=sorted(TINY))
def tiny(request):
    """A random tiny UNet, its config as diffusers completes it, and its weights in canonical names."""
    model = ref.random_unet(TINY[request.param], seed=7)
    data = dict(model.config)
    config = UNetConfig.from_diffusers(data)
    state = ref.unet_state(model)
    assert unet_shapes(config) == {name: value.shape for name, value in state.items()}
    return dict(name=request.param, model=model, data=data, config=config, state=state)


@pytest.mark.parametrize("size", LATENT_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_tiny_parity(tiny, size):
    sample, context = inputs(tiny["data"], size)
    expected = reference_output(tiny["model"], sample, TIMESTEPS, context)
    ours = build(tiny["config"], tiny["state"])(sample, TIMESTEPS, context)
    assert relative_error(ours, expected) <= TOL["tiny"]


def test_numpy_backend_parity(tiny):
    sample, context = inputs(tiny["data"], (9, 9))
    timesteps = INTEGER_TIMESTEPS
    expected = reference_output(tiny["model"], sample, timesteps, context)
    ours = build(tiny["config"], tiny["state"], backend="numpy")(sample, timesteps, context)
    assert relative_error(ours, expected) <= TOL["tiny"]


def test_batch_entries_are_independent(tiny):
    """CFG runs [uncond, cond] as one batch: each entry must equal its own batch-of-one run; a scalar timestep
    applies to every entry."""
    sample, context = inputs(tiny["data"], (8, 8))
    unet = build(tiny["config"], tiny["state"])
    both = unet(sample, 500.0, context)
    for i in range(2):
        alone = unet(sample[i:i + 1], np.array([500.0]), context[i:i + 1])
        assert relative_error(both[i:i + 1], alone) <= TOL["tiny"]


def test_feed_forward_in_pieces_gives_the_same_bits(tiny, monkeypatch):
    """The transformer blocks' feed-forward runs its tokens in pieces of at most FEED_FORWARD_VALUES values of
    its projection (tokens are independent): pieces that do not divide the tokens give the same bits as one where
    the linear layers run sdcli's float32 kernels (the CPU level avx512 and up). Below it they run numpy's matmul,
    whose BLAS may sum a short piece in another order than the whole: float32 rounding, measured up to 1.2e-6 of
    the output's scale at the baseline and avx2 levels."""
    sample, context = inputs(tiny["data"], (9, 9))  # 2 x 81 tokens at the first level
    unet = build(tiny["config"], tiny["state"])
    whole = unet(sample, TIMESTEPS, context)
    width = 2 * unet_module.FEED_FORWARD_MULT * tiny["config"].block_out_channels[0]  # of the first projection
    monkeypatch.setattr(unet_module, "FEED_FORWARD_VALUES", 7 * width)  # 7 tokens a piece there
    pieces = unet(sample, TIMESTEPS, context)
    if f32_kernels.available():
        np.testing.assert_array_equal(pieces, whole)
    else:
        assert max_abs(pieces, whole) <= 1e-5 * float(np.abs(whole).max())


def test_unloaded_layers_prepare_again(tiny, tmp_path):
    """unload_prepared drops what the layers prepared from the mapped file (fp32 and fp16 stored as such), and
    the next call prepares it again, to the bit; weights converted at load (fp32 file held as fp16) have no file
    to prepare from and stay prepared."""
    family_configs = CONFIGS / ("sd21" if tiny["name"] == "sd2" else "sd15")
    folder = ref.write_unet_folder(tmp_path / "folder", family_configs, tiny["data"], tiny["state"])
    half = ref.write_unet_folder(tmp_path / "half", family_configs, tiny["data"], tiny["state"], dtype="F16",
                                 variant="fp16")
    sample, context = inputs(tiny["data"], (9, 9))
    for checkpoint, precision, file_backed in ((open_checkpoint(folder), "fp32", True),
                                               (open_checkpoint(half, variant="fp16"), "fp16", True),
                                               (open_checkpoint(folder), "fp16", False)):
        unet = load_unet(checkpoint.source("unet"), tiny["config"], precision)
        first = unet(sample, TIMESTEPS, context)
        layers = matrices(unet)
        assert unload_prepared(unet) == (len(layers) if file_backed else 0)
        assert all(layer.is_prepared != file_backed for layer in layers)
        np.testing.assert_array_equal(unet(sample, TIMESTEPS, context), first)


def single_file_state(tiny) -> dict[str, np.ndarray]:
    """The tiny UNet in LDM names, plus one text-encoder tensor so that opening the file sniffs its family (the
    tiny cross-attention width is neither SD1's nor SD2's)."""
    marker = {"sd2": "cond_stage_model.model.ln_final.weight"}.get(
        tiny["name"], "cond_stage_model.transformer.text_model.final_layer_norm.weight")
    return {**ref.unet_ldm_state(tiny["state"], tiny["data"]), marker: np.ones(4, np.float32)}


def open_single_file(path, tiny, tmp_path, monkeypatch):
    """Open a single-file checkpoint whose family's shipped UNet config is replaced by the tiny one."""
    configs = tmp_path / "configs"
    for preset in ("sd15", "sd21"):
        (configs / preset / "unet").mkdir(parents=True)
        (configs / preset / "unet" / "config.json").write_text(json.dumps(tiny["data"]))
    monkeypatch.setattr(sd_family, "preset_config_dir", lambda preset: configs / preset)
    checkpoint = open_checkpoint(path)
    assert checkpoint.layout == "single-file"
    return checkpoint


def run_checkpoint(checkpoint, tiny, precision: str, size=(9, 9), stream: bool = False) -> np.ndarray:
    config = checkpoint.unet_config()
    assert config == tiny["config"]
    sample, context = inputs(tiny["data"], size)
    return load_unet(checkpoint.source("unet"), config, precision, stream)(sample, TIMESTEPS, context)


def test_layouts_are_bit_identical(tiny, tmp_path, monkeypatch):
    """The same weights from a diffusers folder, a single-file checkpoint and memory give the same bits."""
    family_configs = CONFIGS / ("sd21" if tiny["name"] == "sd2" else "sd15")
    folder = ref.write_unet_folder(tmp_path / "folder", family_configs, tiny["data"], tiny["state"])
    single = tmp_path / "single.safetensors"
    save_file(single_file_state(tiny), str(single))
    from_folder = run_checkpoint(open_checkpoint(folder), tiny, "fp32")
    from_single = run_checkpoint(open_single_file(single, tiny, tmp_path, monkeypatch), tiny, "fp32")
    sample, context = inputs(tiny["data"], (9, 9))
    in_memory = build(tiny["config"], tiny["state"])(sample, TIMESTEPS, context)
    np.testing.assert_array_equal(from_folder, in_memory)
    np.testing.assert_array_equal(from_single, in_memory)


def test_streamed_weights_give_the_same_bits(tiny, tmp_path, monkeypatch):
    """stream=True drops each layer's mapped pages after every use (without it, once the layer has its own copy);
    the outputs do not change beyond float32 summation order, from a folder or a single file."""
    from sdcli.io.safetensors import SafetensorsFile

    released = []
    original = SafetensorsFile.release
    monkeypatch.setattr(SafetensorsFile, "release", lambda self, name=None: (released.append(name),
                                                                             original(self, name)))
    family_configs = CONFIGS / ("sd21" if tiny["name"] == "sd2" else "sd15")
    folder = ref.write_unet_folder(tmp_path / "folder", family_configs, tiny["data"], tiny["state"])
    single = tmp_path / "single.safetensors"
    save_file(single_file_state(tiny), str(single))
    for checkpoint in (open_checkpoint(folder), open_single_file(single, tiny, tmp_path, monkeypatch)):
        for precision in ("fp32", "fp16"):
            released.clear()
            kept = run_checkpoint(checkpoint, tiny, precision)
            assert released  # the file's pages are let go once converted (fp16) or prepared (fp32)
            released.clear()
            streamed = run_checkpoint(checkpoint, tiny, precision, stream=True)
            # a kept layer runs the packed kernels, a streamed one widens and calls numpy's GEMM: summation order
            assert relative_error(streamed, kept) <= TOL["tiny"]
            assert released


@pytest.mark.parametrize("precision, dtype", [("fp16", "F16"), ("bf16", "BF16")])
def test_reduced_precision(tiny, tmp_path, monkeypatch, precision, dtype):
    """Weights held as fp16/bf16, from an fp32 folder (rounded at load) and from files stored that way (a
    diffusers fp16 variant, a bf16 single file): bit-identical to each other; fp16 (float32 compute) against
    diffusers running the same rounded weights in float32, bf16 (bf16 products) within bf16's error of that."""
    family_configs = CONFIGS / ("sd21" if tiny["name"] == "sd2" else "sd15")
    fp32_folder = ref.write_unet_folder(tmp_path / "fp32", family_configs, tiny["data"], tiny["state"])
    rounded_at_load = run_checkpoint(open_checkpoint(fp32_folder), tiny, precision)
    if dtype == "F16":
        stored = ref.write_unet_folder(tmp_path / "fp16", family_configs, tiny["data"], tiny["state"],
                                       dtype="F16", variant="fp16")
        checkpoint = open_checkpoint(stored, variant="fp16")
    else:
        stored = tmp_path / "single_bf16.safetensors"
        ref.save_tensors(stored, single_file_state(tiny), "BF16")
        checkpoint = open_single_file(stored, tiny, tmp_path, monkeypatch)
    assert {checkpoint.source("unet").dtype(name) for name in tiny["state"]} == {dtype}
    np.testing.assert_array_equal(run_checkpoint(checkpoint, tiny, precision), rounded_at_load)

    model = copy.deepcopy(tiny["model"])
    ref.load_rounded(model, tiny["state"], dtype)
    sample, context = inputs(tiny["data"], (9, 9))
    expected = reference_output(model, sample, TIMESTEPS, context)
    if precision == "fp16":  # fp16 storage, float32 compute: diffusers' float32 on the same rounded weights
        assert relative_error(rounded_at_load, expected) <= TOL["tiny"]
        return
    # bf16 compute: within bf16's error of float32 on the same weights, and no further than diffusers in bf16
    assert relative_error(rounded_at_load, expected) <= TOL["bf16"]
    with torch.no_grad():
        in_bf16 = model.to(torch.bfloat16)(*(torch.from_numpy(a).bfloat16() for a in (sample, TIMESTEPS, context)))
    assert relative_error(rounded_at_load, expected) <= relative_error(in_bf16.sample.float().numpy(), expected)


def test_strict_loading_names_a_missing_tensor(tmp_path):
    model = ref.random_unet(TINY_BASE, seed=1)
    state = dict(ref.unet_state(model))
    del state["up_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k.weight"]
    folder = ref.write_unet_folder(tmp_path / "folder", CONFIGS / "sd15", dict(model.config), state)
    checkpoint = open_checkpoint(folder)
    with pytest.raises(CheckpointError, match="1 missing: up_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k"):
        load_unet(checkpoint.source("unet"), checkpoint.unet_config(), "fp32")


@pytest.mark.parametrize("sample_shape, timesteps, context_shape, message", [
    ((2, 4, 8, 8), [1.0, 2.0], (2, 77, 768), r"encoder_hidden_states must be \(2, tokens, 48\)"),
    ((2, 4, 8, 8), [1.0, 2.0], (1, 77, 48), r"encoder_hidden_states must be \(2, tokens, 48\)"),
    ((2, 4, 8, 8), [1.0, 2.0], (2, 48), "encoder_hidden_states"),
    ((2, 3, 8, 8), [1.0, 2.0], (2, 77, 48), r"sample must be \(batch, 4, height, width\)"),
    ((4, 8, 8), [1.0, 2.0], (2, 77, 48), "sample must be"),
    ((2, 4, 8, 8), [1.0, 2.0, 3.0], (2, 77, 48), r"timesteps must be one value or one per batch entry \(2,\)"),
    ((2, 4, 8, 8), [1.0, float("nan")], (2, 77, 48), "timesteps must be finite"),
])
def test_bad_inputs_are_named(sample_shape, timesteps, context_shape, message):
    config = UNetConfig.from_diffusers(TINY_BASE)
    unet = build(config, {name: np.zeros(shape, np.float32) for name, shape in unet_shapes(config).items()})
    with pytest.raises(SdcliError, match=message) as error:
        unet(np.zeros(sample_shape, np.float32), np.array(timesteps), np.zeros(context_shape, np.float32))
    assert "\n" not in str(error.value)


# -- full configs --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd15", "sd21"])
def test_full_parity(family):
    """The full UNet (860M / 865M parameters) with random weights at 16x16 latents, batch 2, one fractional and
    one integer timestep, against diffusers in float32. sdcli reads the torch tensors' memory through numpy
    views, so only one copy of the 3.4 GB of weights exists."""
    data = json.loads((CONFIGS / family / "unet" / "config.json").read_text())
    model = ref.random_unet(data, seed=11)
    sample, context = inputs(data, (16, 16), seed=3)
    timesteps = np.array([999.0, 500.25])
    expected = reference_output(model, sample, timesteps, context)
    ours = build(UNetConfig.from_diffusers(data), ref.unet_state(model))(sample, timesteps, context)
    assert relative_error(ours, expected) <= TOL["full"]
