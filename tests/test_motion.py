"""AnimateDiff's UNet with motion modules against diffusers' UNetMotionModel (an SD 1.x UNet2DConditionModel plus
a MotionAdapter) on random weights: tiny configs at odd frame counts and latent sizes, adapters with and without
the motion mid block and with more heads and transformer layers, files that leave the frame position tables out,
and the full v1-5-2 adapter on the full SD 1.5 UNet at a small latent."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch/diffusers are the motion-module reference")
pytest.importorskip("diffusers")

import reference_models as ref  # noqa: E402
from data_paths import CONFIGS  # noqa: E402
from opaque_backend import opaque_ops  # noqa: E402

from sdcli.config import MotionAdapterConfig, UNetConfig  # noqa: E402
from sdcli.errors import CheckpointError, ModelNotFoundError, SdcliError  # noqa: E402
from sdcli.families.animatediff import load_motion_adapter, open_motion_adapter  # noqa: E402
from sdcli.families.animatediff_names import is_position_table, motion_adapter_names  # noqa: E402
from sdcli.io.weights import ArraySource, load_network, tensor_shapes  # noqa: E402
from sdcli.nn.motion import MotionAdapter, UNetMotionModel  # noqa: E402
from sdcli.nn.unet import UNet2DConditionModel, sinusoidal_positions  # noqa: E402
from sdcli.ops import get_ops  # noqa: E402

TOL = {
    # max |ours - diffusers| / max |diffusers|, float32 on both sides (the bound is 1e-3). Measured: 6e-7 to
    # 8e-7 on the tiny configs; the tiny bound is tight enough that a norm epsilon off by 10x, a frame position
    # table off by one row or frames taken in the wrong order show.
    "tiny": 2e-5,
    "full": 1e-3,
    # the position table against diffusers' (torch's float32 exp and sin): sdcli's entries are the correctly
    # rounded values of the same float32 angles; torch's exp is an ulp off for a few frequencies, which row 31
    # multiplies into 1.9e-6.
    "position_table": 4e-6,
}
TINY_UNET = {
    "block_out_channels": [32, 64],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 24,
    "attention_head_dim": 4,
    "norm_num_groups": 8,
    "in_channels": 4,
    "out_channels": 4,
    "sample_size": 8,
}
TINY_ADAPTERS = {
    "v2-like": {"block_out_channels": [32, 64], "motion_layers_per_block": 2, "motion_norm_num_groups": 8,
                "motion_num_attention_heads": 2, "motion_max_seq_length": 24, "use_motion_mid_block": True},
    # no mid block (as v1-5-3), per-level heads, two transformer layers per module, and norm groups that differ
    # from the UNet's (diffusers' UNetMotionModel normalises with the UNet's)
    "v3-like": {"block_out_channels": [32, 64], "motion_layers_per_block": 2, "motion_norm_num_groups": 4,
                "motion_num_attention_heads": [4, 8], "motion_transformer_layers_per_block": 2,
                "motion_max_seq_length": 16, "use_motion_mid_block": False},
}
TIMESTEPS = np.array([980.5, 1.0])


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    assert ours.shape == reference.shape and ours.dtype == np.float32
    return float(np.max(np.abs(ours.astype(np.float64) - reference)) / np.max(np.abs(reference)))


def models(unet_config: dict, adapter_config: dict, seed: int = 0):
    """(diffusers UNetMotionModel, the UNet's state, the adapter's state) on random weights."""
    from diffusers import UNetMotionModel as ReferenceMotionModel

    unet = ref.random_unet(unet_config, seed=seed)
    adapter = ref.random_motion_adapter(adapter_config, seed=seed + 10)
    reference = ReferenceMotionModel.from_unet2d(unet, adapter).eval()
    return reference, ref.unet_state(unet), ref.unet_state(adapter)


def video_inputs(unet_config: dict, frames: int, size: tuple[int, int], batch: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((batch, unet_config["in_channels"], frames, *size)).astype(np.float32)
    context = rng.standard_normal((batch, 7, unet_config["cross_attention_dim"])).astype(np.float32)
    return sample, context


def reference_output(model, sample, timesteps, context) -> np.ndarray:
    """diffusers takes the text hidden states once per frame, as AnimateDiffPipeline repeats them."""
    frames = sample.shape[2]
    with torch.no_grad():
        return model(torch.from_numpy(sample), torch.from_numpy(timesteps),
                     torch.from_numpy(context).repeat_interleave(frames, dim=0)).sample.numpy()


def build(unet_config: dict, adapter_config: dict, unet_state, adapter_state, backend="cpu") -> UNetMotionModel:
    ops = opaque_ops if backend == "opaque" else get_ops(backend)
    unet_cfg = UNetConfig.from_diffusers(unet_config)
    adapter_cfg = MotionAdapterConfig.from_diffusers(adapter_config).for_unet(unet_cfg)
    unet = load_network(lambda params: UNet2DConditionModel(params, unet_cfg), ArraySource(unet_state), ops)
    adapter = load_network(lambda params: MotionAdapter(params, adapter_cfg), ArraySource(adapter_state), ops)
    return UNetMotionModel(unet, adapter)


def run(model: UNetMotionModel, sample, timesteps, context) -> np.ndarray:
    ops = model.ops
    return ops.to_host(model(ops.from_host(sample), timesteps, ops.from_host(context)))


@pytest.fixture(scope="module", params=sorted(TINY_ADAPTERS))
def tiny(request):
    adapter_config = TINY_ADAPTERS[request.param]
    return (adapter_config, *models(TINY_UNET, adapter_config))


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("frames, size", [(5, (8, 8)), (1, (8, 8)), (7, (9, 6))])
def test_tiny_parity(tiny, backend, frames, size):
    adapter_config, reference, unet_state, adapter_state = tiny
    sample, context = video_inputs(TINY_UNET, frames, size)
    expected = reference_output(reference, sample, TIMESTEPS, context)
    ours = run(build(TINY_UNET, adapter_config, unet_state, adapter_state, backend), sample, TIMESTEPS, context)
    assert relative_error(ours, expected) <= TOL["tiny"]


def test_files_without_position_tables(tiny):
    """The Hub's diffusers adapter files leave the frame position tables out (diffusers recomputes them): sdcli
    computes them too."""
    adapter_config, reference, unet_state, adapter_state = tiny
    stored = {name: array for name, array in adapter_state.items() if not name.endswith("pos_embed.pe")}
    assert len(stored) < len(adapter_state)
    sample, context = video_inputs(TINY_UNET, 6, (8, 8), seed=1)
    expected = reference_output(reference, sample, TIMESTEPS, context)
    ours = run(build(TINY_UNET, adapter_config, unet_state, stored), sample, TIMESTEPS, context)
    assert relative_error(ours, expected) <= TOL["tiny"]


@pytest.mark.parametrize("channels", [8, 320, 1280])
def test_position_table_is_diffusers(channels):
    from diffusers.models.embeddings import SinusoidalPositionalEmbedding

    theirs = SinusoidalPositionalEmbedding(channels, 32).pe[0].numpy()
    ours = sinusoidal_positions(32, channels)
    assert ours.dtype == np.float32 and ours.shape == theirs.shape
    assert np.max(np.abs(ours - theirs)) <= TOL["position_table"]


def test_opaque_backend_gives_the_numpy_results(tiny):
    """The motion modules keep their activations in the backend (see tests/opaque_backend.py)."""
    adapter_config, _, unet_state, adapter_state = tiny
    sample, context = video_inputs(TINY_UNET, 3, (8, 8), batch=1)
    numpy_result = run(build(TINY_UNET, adapter_config, unet_state, adapter_state, "numpy"), sample, TIMESTEPS[:1],
                       context)
    opaque_result = run(build(TINY_UNET, adapter_config, unet_state, adapter_state, "opaque"), sample,
                        TIMESTEPS[:1], context)
    assert np.array_equal(numpy_result, opaque_result)


def test_frames_beyond_the_position_table_are_refused(tiny):
    adapter_config, _, unet_state, adapter_state = tiny
    model = build(TINY_UNET, adapter_config, unet_state, adapter_state)
    sample, context = video_inputs(TINY_UNET, adapter_config["motion_max_seq_length"] + 1, (8, 8), batch=1)
    with pytest.raises(SdcliError, match="motion adapter covers 1 to"):
        run(model, sample, TIMESTEPS[:1], context)
    with pytest.raises(SdcliError, match="video latents must be"):
        run(model, sample[:, :, 0], TIMESTEPS[:1], context)


def test_an_adapter_for_another_base_model_is_refused(tiny):
    adapter_config, _, unet_state, adapter_state = tiny
    other = {**adapter_config, "block_out_channels": [32, 32]}
    with pytest.raises(CheckpointError, match="made for a UNet with"):
        MotionAdapterConfig.from_diffusers(other).check_fits(UNetConfig.from_diffusers(TINY_UNET))


def test_config_refuses_what_sdcli_does_not_build():
    with pytest.raises(CheckpointError, match="conv_in_channels"):
        MotionAdapterConfig.from_diffusers({"conv_in_channels": 8})
    with pytest.raises(CheckpointError, match="one entry per level"):
        MotionAdapterConfig.from_diffusers({"block_out_channels": [32, 64], "motion_num_attention_heads": [2]})
    with pytest.raises(CheckpointError, match="multiple of motion_norm_num_groups"):
        MotionAdapterConfig.from_diffusers({"block_out_channels": [32, 48], "motion_norm_num_groups": 32})


def test_full_v1_5_2_adapter_on_the_full_sd15_unet():
    """The v1-5-2 adapter config (diffusers' MotionAdapter defaults: 453M parameters, the motion mid block) on the
    full SD 1.5 UNet, 8 frames at 8x8 latents, one video."""
    unet_config = json.loads((CONFIGS / "sd15" / "unet" / "config.json").read_text())
    adapter_config = {"block_out_channels": [320, 640, 1280, 1280], "motion_layers_per_block": 2,
                      "motion_mid_block_layers_per_block": 1, "motion_num_attention_heads": 8,
                      "motion_norm_num_groups": 32, "motion_max_seq_length": 32, "use_motion_mid_block": True}
    reference, unet_state, adapter_state = models(unet_config, adapter_config, seed=5)
    sample, context = video_inputs({**unet_config, "cross_attention_dim": 768}, 8, (8, 8), batch=1, seed=2)
    timesteps = np.array([500.25])
    expected = reference_output(reference, sample, timesteps, context)
    ours = run(build(unet_config, adapter_config, unet_state, adapter_state), sample, timesteps, context)
    assert relative_error(ours, expected) <= TOL["full"]


# -- the original-format motion-module files ----------------------------------------------------------------------

def original_format(adapter_state: dict[str, np.ndarray], config: MotionAdapterConfig) -> dict[str, np.ndarray]:
    """An adapter's tensors under the original AnimateDiff names (through sdcli's map), with the position tables
    the original code stores in each attention block."""
    mapping = motion_adapter_names(config)
    state = {mapping[name].name: array for name, array in adapter_state.items() if name in mapping}
    for name, array in adapter_state.items():
        if name.endswith(".pos_embed.pe"):
            block = name[: -len("pos_embed.pe")].replace(".transformer_blocks.",
                                                         ".temporal_transformer.transformer_blocks.")
            for attention in (0, 1):
                state[f"{block}attention_blocks.{attention}.pos_encoder.pe"] = array
    return state


@pytest.mark.parametrize("adapter", sorted(TINY_ADAPTERS))
def test_original_names_against_diffusers_converter(adapter):
    """sdcli's map, inverted, then diffusers' converter: every canonical name back, nothing else; the map is a
    bijection (checked when it is built)."""
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

    config = MotionAdapterConfig.from_diffusers(TINY_ADAPTERS[adapter])
    shapes = tensor_shapes(lambda params: MotionAdapter(params, config))
    state = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
    converted = convert_animatediff_checkpoint_to_diffusers(original_format(state, config))
    assert set(converted) == {name for name in shapes if not name.endswith(".pos_embed.pe")}
    assert all(is_position_table(name) for name in set(original_format(state, config)) - {
        key.name for key in motion_adapter_names(config).values()})


# -- opening adapters in each layout --------------------------------------------------------------------------------

def diffusers_to_original(name: str) -> str:
    """The inverse of diffusers' converter (``convert_animatediff_checkpoint_to_diffusers``), as plain renames:
    written here independently of sdcli's map."""
    head, _, tail = name.partition(".motion_modules.")
    layer, _, rest = tail.partition(".")
    for ours, theirs in ((".norm1.", ".norms.0."), (".norm2.", ".norms.1."), (".norm3.", ".ff_norm."),
                         (".attn1.", ".attention_blocks.0."), (".attn2.", ".attention_blocks.1.")):
        rest = ("." + rest).replace(ours, theirs)[1:]
    return f"{head}.motion_modules.{layer}.temporal_transformer.{rest}"


@pytest.mark.parametrize("layout", ["diffusers", "diffusers-file", "original-file"])
def test_open_each_layout(tiny, tmp_path, layout):
    from safetensors.numpy import save_file

    adapter_config, reference, unet_state, adapter_state = tiny
    if layout == "diffusers":
        path = tmp_path / "adapter"
        path.mkdir()
        (path / "config.json").write_text(json.dumps(adapter_config))
        save_file({name: np.ascontiguousarray(a) for name, a in adapter_state.items()},
                  str(path / "diffusion_pytorch_model.safetensors"))
    elif layout == "diffusers-file":
        path = tmp_path / "adapter_diffusers.safetensors"
        save_file({name: np.ascontiguousarray(a) for name, a in adapter_state.items()}, str(path))
    else:
        path = tmp_path / "mm_adapter.safetensors"
        state = {}
        for name, array in adapter_state.items():
            if name.endswith(".pos_embed.pe"):  # the original stores a table in each of the two attentions
                for attention in (0, 1):
                    state[diffusers_to_original(name.replace("pos_embed.pe", f"attn{attention + 1}.pe"))
                          .replace(".pe", ".pos_encoder.pe")] = np.ascontiguousarray(array)
            else:
                state[diffusers_to_original(name)] = np.ascontiguousarray(array)
        save_file(state, str(path))
    opened = open_motion_adapter(path)
    assert opened.layout == layout
    expected_config = MotionAdapterConfig.from_diffusers({**adapter_config, "motion_num_attention_heads": (
        adapter_config["motion_num_attention_heads"] if layout == "diffusers" else 8)})
    unet_cfg = UNetConfig.from_diffusers(TINY_UNET)
    # a single file stores neither its norm groups (the UNet's are used, as by diffusers) nor its head count
    assert opened.config.for_unet(unet_cfg) == expected_config.for_unet(unet_cfg)
    if layout != "diffusers" and adapter_config["motion_num_attention_heads"] != 8:
        return  # parity needs the config's head count
    ops = get_ops("cpu")
    unet = load_network(lambda params: UNet2DConditionModel(params, unet_cfg), ArraySource(unet_state), ops)
    model = UNetMotionModel(unet, load_motion_adapter(opened, unet_cfg, ops))
    sample, context = video_inputs(TINY_UNET, 4, (8, 8), batch=1)
    expected = reference_output(reference, sample, TIMESTEPS[:1], context)
    assert relative_error(run(model, sample, TIMESTEPS[:1], context), expected) <= TOL["tiny"]


def test_open_refuses_what_is_not_an_adapter(tmp_path):
    from safetensors.numpy import save_file

    pickle = tmp_path / "mm_sd_v15_v2.ckpt"
    pickle.write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="pickle checkpoint.*weights_only=True"):
        open_motion_adapter(pickle)
    other = tmp_path / "unet.safetensors"
    save_file({"conv_in.weight": np.zeros((4, 4, 3, 3), np.float32)}, str(other))
    with pytest.raises(CheckpointError, match="not a motion adapter"):
        open_motion_adapter(other)
    with pytest.raises(ModelNotFoundError, match="no such motion adapter"):
        open_motion_adapter(tmp_path / "missing.safetensors")
