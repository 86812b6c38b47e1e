"""LoRA files merged into the UNet (sdcli.io.lora), against diffusers' ``load_lora_weights`` and ``set_adapters``
(on peft) with a tiny random SD1 UNet: kohya (A1111) names over every Linear and convolution, written here and by
diffusers' own converter; peft names with and without diffusers' adapter metadata; the older diffusers names;
kohya names in the original (LDM) layout. Without the references: the mapped file is never written, untouched
tensors stay the file's views, several LoRAs add up, and every refusal is one line."""

from __future__ import annotations

import copy
import hashlib
import logging
import re

import numpy as np
import pytest
from safetensors.numpy import save_file

import reference_models as ref
from data_paths import CONFIGS
from sdcli.config import UNetConfig
from sdcli.errors import LoraError, SdcliError
from sdcli.families import sd as sd_family
from sdcli.families import sd_names
from sdcli.io.checkpoint import open_checkpoint
from sdcli.io.lora import LoraMergedSource, read_lora, read_loras
from sdcli.io.weights import tensor_shapes
from sdcli.nn.unet import UNet2DConditionModel
from sdcli.ops import get_ops
from sdcli.ops.parameter import parameters

TOL = {
    # max |sdcli - diffusers| / max |diffusers| of the UNet's output, float32 on both sides. sdcli merges each
    # layer into its weight (W + s * B @ A, rounded to float32 once); diffusers' set_adapters runs the LoRA beside
    # the weight (W x + s * B (A x)), so the two differ by float32 rounding and summation order. Measured: 9.5e-7
    # (kohya, every layer of the tiny UNet), as far as diffusers' own fused and unfused outputs are apart (1.0e-6).
    # The LoRA moves the output by 0.6, and leaving out any one of its 83 layers by at least 1.7e-3.
    "output": 2e-5,
    # the merged weights against diffusers' fuse_lora (B @ A * s in float32, added to W): float32 rounding of the
    # product and the sum. Measured: bit-identical (numpy's and torch's GEMMs sum the rank-long products alike
    # here); merging in float64 and rounding once is 1.1e-7 of max |W| away from it, so sdcli merges in float32.
    "weights": 1e-6,
}
UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[32, 64],
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=32, attention_head_dim=4,
            norm_num_groups=16)
SCALE = 0.8  # AnimateLCM's card: set_adapters(["lcm-lora"], [0.8])
TIMESTEPS = np.array([980.5, 1.0])


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    assert ours.shape == reference.shape and ours.dtype == np.float32
    return float(np.max(np.abs(ours - reference))) / float(np.max(np.abs(reference)))


def inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)  # (B, C, h, w)
    context = rng.standard_normal((2, 77, UNET["cross_attention_dim"])).astype(np.float32)  # (B, S, D)
    return sample, context


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- without the references ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A diffusers folder with a random tiny SD1 UNet (numpy only), its weights and shapes."""
    config = UNetConfig.from_diffusers(UNET)
    shapes = tensor_shapes(lambda params: UNet2DConditionModel(params, config))
    rng = np.random.default_rng(1)
    state = {name: (0.1 * rng.standard_normal(shape)).astype(np.float32) for name, shape in shapes.items()}
    folder = ref.write_unet_folder(tmp_path_factory.mktemp("tiny") / "model", CONFIGS / "sd15", UNET, state)
    return dict(folder=folder, state=state, shapes=shapes)


def write_lora(path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None):
    save_file(tensors, str(path), metadata=metadata)
    return path


def merged_source(tiny, *loras, aliases=None):
    base = open_checkpoint(tiny["folder"]).source("unet")
    return base, LoraMergedSource(base, read_loras(loras), "unet", aliases)


def expected_weight(tiny, lora: dict[str, np.ndarray], name: str, scale: float) -> np.ndarray:
    """W + scale * alpha / rank * (up @ down) in float64, from the kohya tensors of ``name``'s module."""
    key = "lora_unet_" + name.removesuffix(".weight").replace(".", "_")
    down, up = lora[key + ".lora_down.weight"].astype(np.float64), lora[key + ".lora_up.weight"].astype(np.float64)
    rank = down.shape[0]
    product = up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)  # (out, in*kh*kw)
    return tiny["state"][name] + scale * float(lora[key + ".alpha"]) / rank * product.reshape(tiny["shapes"][name])


def test_reads_kohya_names_as_the_weights_they_update(tiny, tmp_path):
    names = ref.lora_targets(tiny["shapes"])
    lora = ref.kohya_lora(tiny["shapes"], names)
    path = write_lora(tmp_path / "kohya.safetensors", lora)
    read = read_lora(path)
    assert read.format == "kohya" and read.components() == ["unet"] and len(read.layers) == len(names)
    _, source = merged_source(tiny, (path, SCALE))
    assert sorted(source.merged) == sorted(names)  # every underscored name found its weight, to_out_0 included
    for name in names:
        merged = source.read(name)
        assert merged.dtype == np.float32 and source.dtype(name) == "F32"
        np.testing.assert_allclose(merged, expected_weight(tiny, lora, name, SCALE), rtol=0, atol=1e-6)


def test_the_mapped_file_is_never_written_and_untouched_tensors_stay_its_views(tiny, tmp_path):
    weights = tiny["folder"] / "unet" / "diffusion_pytorch_model.safetensors"
    before = sha256(weights)
    touched = [name for name in ref.lora_targets(tiny["shapes"]) if ".attentions." in name]
    path = write_lora(tmp_path / "attention.safetensors", ref.kohya_lora(tiny["shapes"], touched))
    base, source = merged_source(tiny, (path, SCALE))
    for name in tiny["shapes"]:
        ours, file_view = source.read(name), base.read(name)
        if name in touched:  # a new array of the network's own, the file's view left as it was
            assert ours.flags.writeable and not np.shares_memory(ours, file_view)
            np.testing.assert_array_equal(file_view, tiny["state"][name])
        else:  # the file's own view, no copy
            assert not ours.flags.writeable
            assert ours.__array_interface__["data"][0] == file_view.__array_interface__["data"][0]
    checkpoint = open_checkpoint(tiny["folder"])
    unet = sd_family.load_unet(checkpoint, get_ops("cpu"), "fp32", loras=[(path, SCALE)])
    sample, context = inputs()
    unet(sample, TIMESTEPS, context)
    held = [parameter.weight for parameter in parameters(unet) if parameter.data.ndim >= 2]
    # a merged weight is held as the copy it is (dropped once prepared); every other one as the file's view
    assert sum(weight.release is None for weight in held) == len(touched)
    assert sha256(weights) == before


def test_several_loras_add_up(tiny, tmp_path):
    names = ref.lora_targets(tiny["shapes"])
    first = ref.kohya_lora(tiny["shapes"], names, seed=2)
    second = ref.kohya_lora(tiny["shapes"], names[::3], seed=3)
    a = write_lora(tmp_path / "a.safetensors", first)
    b = write_lora(tmp_path / "b.safetensors", second)
    _, source = merged_source(tiny, (a, 0.5), (b, -1.0))
    for name in names:
        expected = expected_weight(tiny, first, name, 0.5)
        if name in names[::3]:
            expected += expected_weight(tiny, second, name, -1.0) - tiny["state"][name]
        np.testing.assert_allclose(source.read(name), expected, rtol=0, atol=2e-6)


def test_a_missing_alpha_is_the_rank_and_a_linear_shaped_down_fits_a_1x1_convolution(tiny, tmp_path):
    """kohya: no ``.alpha`` means alpha = rank. A LoRA trained on linear projections (SD2's) gives (rank, in)
    where SD1's projection is a 1x1 convolution (out, in, 1, 1): the same numbers."""
    name = "down_blocks.0.attentions.0.proj_in.weight"
    assert len(tiny["shapes"][name]) == 4
    lora = ref.kohya_lora(tiny["shapes"], [name], alphas="none")
    conv = write_lora(tmp_path / "conv.safetensors", lora)
    linear = write_lora(tmp_path / "linear.safetensors", {key: value.reshape(value.shape[:2])
                                                           for key, value in lora.items()})
    lora["lora_unet_down_blocks_0_attentions_0_proj_in.alpha"] = np.array(2.0, np.float32)  # the rank
    expected = expected_weight(tiny, lora, name, SCALE)
    for path in (conv, linear):
        np.testing.assert_allclose(merged_source(tiny, (path, SCALE))[1].read(name), expected, rtol=0, atol=1e-6)


def test_original_layout_names_are_the_same_layers(tiny, tmp_path):
    """kohya names in the original (LDM) layout (LyCORIS: ``lora_unet_input_blocks_1_1_proj_in``) update the same
    weights as the diffusers names, to the bit."""
    names = ref.lora_targets(tiny["shapes"])
    ldm = {canonical: key.name.removeprefix(sd_names.UNET_PREFIX)
           for canonical, key in sd_names.unet_names(UNET).items()}
    diffusers_named = write_lora(tmp_path / "diffusers.safetensors", ref.kohya_lora(tiny["shapes"], names))
    ldm_named = write_lora(tmp_path / "ldm.safetensors", ref.kohya_lora(tiny["shapes"], names, spelled=ldm))
    assert any(key.startswith("lora_unet_input_blocks_1_1_proj_in") for key in read_lora(ldm_named).file.keys())
    checkpoint = open_checkpoint(tiny["folder"])
    sample, context = inputs()
    outputs = [sd_family.load_unet(checkpoint, get_ops("cpu"), "fp32", loras=[(path, SCALE)])(sample, TIMESTEPS,
                                                                                            context)
               for path in (diffusers_named, ldm_named)]
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_the_unet_takes_only_its_own_layers(tiny, tmp_path):
    """A LoRA with text-encoder layers too: the UNet loader merges its UNet layers only (the text encoder's are
    the text encoder loader's)."""
    names = ref.lora_targets(tiny["shapes"])[:4]
    lora = ref.kohya_lora(tiny["shapes"], names)
    unet_only = write_lora(tmp_path / "unet.safetensors", lora)
    rng = np.random.default_rng(0)
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    both = write_lora(tmp_path / "both.safetensors", {
        **lora, f"{te}.lora_down.weight": rng.standard_normal((2, 768)).astype(np.float32),
        f"{te}.lora_up.weight": rng.standard_normal((768, 2)).astype(np.float32),
        f"{te}.alpha": np.array(1.0, np.float32)})
    assert read_lora(both).components() == ["unet", "text_encoder"]
    checkpoint = open_checkpoint(tiny["folder"])
    sample, context = inputs()
    with_text = sd_family.load_unet(checkpoint, get_ops("cpu"), "fp32", loras=[(both, SCALE)])
    without = sd_family.load_unet(checkpoint, get_ops("cpu"), "fp32", loras=[(unet_only, SCALE)])
    np.testing.assert_array_equal(with_text(sample, TIMESTEPS, context), without(sample, TIMESTEPS, context))


def one_line_error(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert isinstance(error.value, SdcliError) and "\n" not in message
    return message


def test_a_lora_for_another_network_is_refused_before_anything_is_read(tiny, tmp_path):
    names = ref.lora_targets(tiny["shapes"])
    unknown = dict(ref.kohya_lora(tiny["shapes"], names[:2]))
    unknown.update({key.replace("lora_unet_conv_in", "lora_unet_down_blocks_7_resnets_0_conv1"): value
                    for key, value in ref.kohya_lora(tiny["shapes"], ["conv_in.weight"]).items()})
    wrong = ref.kohya_lora(tiny["shapes"], ["down_blocks.1.resnets.0.conv1.weight"])
    wrong["lora_unet_down_blocks_1_resnets_0_conv1.lora_down.weight"] = np.ones((2, 33, 3, 3), np.float32)
    cases = [(unknown, r"LoRA layer down_blocks_7_resnets_0_conv1 names no weight of .*another model"),
             (wrong, r"LoRA layer down_blocks_1_resnets_0_conv1 \(down \(2, 33, 3, 3\), up \(64, 2, 1, 1\)\) "
                     r"does not fit down_blocks.1.resnets.0.conv1.weight \(64, 32, 3, 3\)")]
    for i, (tensors, message) in enumerate(cases):
        path = write_lora(tmp_path / f"bad{i}.safetensors", tensors)
        with pytest.raises(LoraError) as error:
            merged_source(tiny, (path, SCALE))
        assert re.search(message, one_line_error(error))


def test_non_finite_values_are_refused_when_merged(tiny, tmp_path):
    name = "down_blocks.0.resnets.0.conv1.weight"
    lora = ref.kohya_lora(tiny["shapes"], [name])
    lora["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"][3, 1] = np.inf
    _, source = merged_source(tiny, (write_lora(tmp_path / "inf.safetensors", lora), SCALE))
    with pytest.raises(LoraError) as error:
        source.read(name)
    assert "LoRA layer down_blocks_0_resnets_0_conv1 has non-finite values" in one_line_error(error)
    huge = ref.kohya_lora(tiny["shapes"], [name])
    for key in huge:
        if key.endswith(".weight"):
            huge[key] *= np.float32(1e20)
    _, source = merged_source(tiny, (write_lora(tmp_path / "huge.safetensors", huge), SCALE))  # B @ A overflows
    with pytest.raises(LoraError, match="non-finite values"):
        source.read(name)


@pytest.mark.parametrize("tensors, metadata, message", [
    ({"lora_unet_conv_in.lora_down.weight": np.ones((2, 4, 3, 3), np.float32)}, None,
     r"layer lora_unet_conv_in has no lora_up\.weight"),
    ({"lora_unet_conv_in.hada_w1_a": np.ones((2, 4), np.float32)}, None, r"a LoHa adapter \(lora_unet_conv_in\.hada"),
    ({"lora_unet_conv_in.lora_down.weight": np.ones((2, 4, 3, 3), np.float32),
      "lora_unet_conv_in.lora_up.weight": np.ones((32, 2, 1, 1), np.float32),
      "lora_unet_conv_in.dora_scale": np.ones((32, 1, 1, 1), np.float32)}, None, r"a DoRA adapter"),
    ({"lora_unet_conv_in.lora_down.weight": np.ones((2, 4, 3, 3), np.float32),
      "lora_unet_conv_in.lora_up.weight": np.ones((32, 3, 1, 1), np.float32)}, None, r"are not a LoRA pair"),
    ({"lora_unet_conv_in.lora_down.weight": np.ones((2, 4, 3, 3), np.float32),
      "lora_unet_conv_in.lora_up.weight": np.ones((32, 2, 1, 1), np.float32),
      "lora_unet_conv_in.alpha": np.array(np.nan, np.float32)}, None, r"alpha is not one finite number"),
    ({"lora_unet_conv_in.lora_down.weight": np.ones((2, 4, 3, 3), np.float32),
      "unet.conv_in.lora_B.weight": np.ones((32, 2, 1, 1), np.float32)}, None, r"mixes kohya names"),
    ({"model.diffusion_model.input_blocks.0.0.weight": np.ones((32, 4, 3, 3), np.float32)}, None,
     r"not a LoRA file, or of an unknown naming"),
    ({"unet.conv_in.lora_A.weight": np.ones((2, 4, 3, 3), np.float32),
      "unet.conv_in.lora_B.weight": np.ones((32, 2, 1, 1), np.float32)}, {"lora_adapter_metadata": "{"},
     r"its lora_adapter_metadata is not JSON"),
])
def test_bad_files_are_refused_in_one_line(tmp_path, tensors, metadata, message):
    path = write_lora(tmp_path / "bad.safetensors", tensors, metadata)
    with pytest.raises(LoraError) as error:
        read_lora(path)
    assert re.search(message, one_line_error(error))


def test_paths_and_scales_are_checked(tmp_path):
    with pytest.raises(SdcliError) as error:
        read_lora(tmp_path / "missing.safetensors")
    assert "no such LoRA file" in one_line_error(error)
    with pytest.raises(SdcliError) as error:
        read_lora(tmp_path / "lora.ckpt")
    assert "pickle checkpoint" in one_line_error(error)
    path = write_lora(tmp_path / "ok.safetensors", {"lora_unet_conv_in.lora_down.weight": np.ones((2, 4, 3, 3),
                                                                                                 np.float32),
                                                     "lora_unet_conv_in.lora_up.weight": np.ones((32, 2, 1, 1),
                                                                                               np.float32)})
    for scale in (float("nan"), "0.8", None):
        with pytest.raises(LoraError) as error:
            read_loras([(path, scale)])
        assert "scale must be a finite number" in one_line_error(error)


# -- against diffusers -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory, diffusers, peft):
    """The tiny SD1 pipeline of tiny_pipeline (random weights), saved as a diffusers folder."""
    import tiny_pipeline

    pipeline, folder = tiny_pipeline.make_tiny_model("sd1", tmp_path_factory.mktemp("reference") / "model")
    state = ref.unet_state(pipeline.unet)
    return dict(pipeline=pipeline, folder=folder, shapes={name: tuple(value.shape) for name, value in state.items()},
                config=dict(pipeline.unet.config))


def diffusers_output(reference, path, scale: float = SCALE, fuse: bool = False):
    """The output of (a copy of) the reference UNet after ``load_lora_weights(path)`` and ``set_adapters([...],
    [scale])``, or ``fuse_lora(lora_scale=scale)``; and its weights, under the UNet's own names."""
    import torch

    pipeline = copy.deepcopy(reference["pipeline"])
    pipeline.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="test")
    if fuse:
        pipeline.fuse_lora(lora_scale=scale, adapter_names=["test"])
    else:
        pipeline.set_adapters(["test"], [scale])
    sample, context = inputs()
    with torch.no_grad():
        output = pipeline.unet(torch.from_numpy(sample), torch.from_numpy(TIMESTEPS),
                               torch.from_numpy(context)).sample.numpy()
    weights = {name.replace(".base_layer.", "."): value.detach().numpy().copy()
               for name, value in pipeline.unet.state_dict().items() if ".lora_" not in name}
    return output, weights


def sdcli_output(reference, path, scale: float = SCALE) -> np.ndarray:
    checkpoint = open_checkpoint(reference["folder"])
    unet = sd_family.load_unet(checkpoint, get_ops("cpu"), "fp32", loras=[(path, scale)])
    sample, context = inputs()
    return unet(sample, TIMESTEPS, context)


def base_output(reference) -> np.ndarray:
    checkpoint = open_checkpoint(reference["folder"])
    sample, context = inputs()
    return sd_family.load_unet(checkpoint, get_ops("cpu"), "fp32")(sample, TIMESTEPS, context)


def check_parity(reference, path, scale: float = SCALE) -> None:
    expected, _ = diffusers_output(reference, path, scale)
    ours = sdcli_output(reference, path, scale)
    assert relative_error(ours, expected) <= TOL["output"]
    assert relative_error(base_output(reference), expected) > 1e-2  # the LoRA changed the output


def test_kohya_parity(reference, tmp_path):
    names = ref.lora_targets(reference["shapes"])
    path = write_lora(tmp_path / "kohya.safetensors", ref.kohya_lora(reference["shapes"], names, alphas="same"))
    check_parity(reference, path)


def test_kohya_parity_at_another_scale(reference, tmp_path):
    names = [name for name in ref.lora_targets(reference["shapes"]) if "resnets" in name]
    # alphas varied layer by layer: diffusers gives each resnet layer its own
    path = write_lora(tmp_path / "resnets.safetensors", ref.kohya_lora(reference["shapes"], names, seed=5))
    check_parity(reference, path, scale=-1.3)


def test_merged_weights_match_diffusers_fused_ones(reference, tmp_path):
    names = ref.lora_targets(reference["shapes"])
    path = write_lora(tmp_path / "kohya.safetensors", ref.kohya_lora(reference["shapes"], names, alphas="same"))
    _, fused = diffusers_output(reference, path, fuse=True)
    base = open_checkpoint(reference["folder"]).source("unet")
    source = LoraMergedSource(base, read_loras([(path, SCALE)]))
    for name in names:
        scale = float(np.abs(fused[name]).max())
        assert float(np.abs(source.read(name) - fused[name]).max()) <= TOL["weights"] * scale, name


# every Linear and convolution of the UNet, as peft's target_modules name them (a module name or its last parts)
PEFT_TARGETS = ["conv_in", "linear_1", "linear_2", "conv1", "conv2", "time_emb_proj", "conv_shortcut", "conv",
                "proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "conv_out"]


def peft_lora(reference, peft, rank: int = 4, alpha: float = 8, **options):
    """A random LoRA made with peft on a copy of the UNet (every Linear and convolution), as its state dict in
    diffusers' names, and its LoraConfig."""
    import torch

    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=PEFT_TARGETS, init_lora_weights=False,
                             **options)
    unet = copy.deepcopy(reference["pipeline"].unet)
    torch.manual_seed(3)
    unet.add_adapter(config)
    state = peft.get_peft_model_state_dict(unet)
    assert len(state) == 2 * len(ref.lora_targets(reference["shapes"]))
    return state, config


@pytest.mark.parametrize("options", [{}, {"alpha_pattern": {"proj_in": 3}, "rank_pattern": {"conv_out": 2}},
                                     {"use_rslora": True}], ids=["plain", "patterns", "rslora"])
def test_peft_parity(reference, peft, tmp_path, options):
    """diffusers' save_lora_weights with the adapter's metadata (alpha 8 over rank 4, patterns, rsLoRA), and
    without it (alpha = rank)."""
    from diffusers import StableDiffusionPipeline

    state, config = peft_lora(reference, peft, **options)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "meta", unet_lora_layers=state,
                                              unet_lora_adapter_metadata=config.to_dict())
    with_metadata = tmp_path / "meta" / "pytorch_lora_weights.safetensors"
    assert read_lora(with_metadata).format == "peft"
    check_parity(reference, with_metadata)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "plain", unet_lora_layers=state)
    check_parity(reference, tmp_path / "plain" / "pytorch_lora_weights.safetensors")


def test_older_diffusers_names_and_diffusers_kohya_converter(reference, peft, tmp_path):
    """The peft layers renamed as older diffusers wrote them (``lora.down``, ``processor.to_q_lora``), and converted
    to kohya names by diffusers' own ``convert_state_dict_to_kohya`` (alpha = rank, stored as an integer)."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    state, _ = peft_lora(reference, peft, alpha=4)
    arrays = {f"unet.{name}": value.numpy() for name, value in state.items()}
    older = {}
    for name, value in arrays.items():
        name = name.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up.")
        for projection in ("to_q", "to_k", "to_v", "to_out.0"):
            short = projection.removesuffix(".0")
            name = name.replace(f".{projection}.lora.", f".processor.{short}_lora.")
        older[name] = value
    older_path = write_lora(tmp_path / "older.safetensors", older)
    assert read_lora(older_path).format == "diffusers"
    check_parity(reference, older_path)
    kohya = {name: value.numpy() for name, value in convert_state_dict_to_kohya(
        {f"unet.{name}": value for name, value in state.items()}).items()}
    assert any(value.dtype == np.int64 for value in kohya.values())
    kohya_path = write_lora(tmp_path / "converted.safetensors", kohya)
    assert read_lora(kohya_path).format == "kohya"
    check_parity(reference, kohya_path)
    peft_path = write_lora(tmp_path / "peft.safetensors", arrays)
    np.testing.assert_array_equal(sdcli_output(reference, older_path), sdcli_output(reference, peft_path))
    np.testing.assert_array_equal(sdcli_output(reference, kohya_path), sdcli_output(reference, peft_path))
