"""The Wan2.1 transformer against diffusers' WanTransformer3DModel on random weights: the tiny config of diffusers'
own Wan tests at odd frame counts and latent sizes, a config at the real width (12 heads of 128, the real
feed-forward and text widths) with two blocks, the full 1.3B config on a tiny latent, bf16 weights, and the
original Wan layout through its name map."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch/diffusers are the Wan transformer reference")
pytest.importorskip("diffusers")

import reference_models as ref  # noqa: E402
from opaque_backend import opaque_ops  # noqa: E402

from sdcli.config import WanTransformerConfig  # noqa: E402
from sdcli.errors import CheckpointError, SdcliError  # noqa: E402
from sdcli.families.wan_names import COMFY_PREFIX, is_original_layout, wan_transformer_names  # noqa: E402
from sdcli.io.weights import ArraySource, load_network, tensor_shapes  # noqa: E402
from sdcli.nn.dit_wan import WanTransformer3DModel, rope_tables  # noqa: E402
from sdcli.ops import get_ops  # noqa: E402

TOL = {
    # max |ours - diffusers| / max |diffusers|, float32 on both sides; the bound is 1e-3. Measured 6e-7 on
    # the tiny config: the bound is tight enough that a norm without its epsilon, a rotary table off by one
    # position or a modulation vector taken in the wrong order shows.
    "tiny": 2e-5,
    "full": 1e-3,
    # bf16 products (activations rounded to bf16, float32 sums) against the reference run in float32 on the same
    # rounded weights: a few bf16 ulps (2^-8) of the output's scale, as for the UNet.
    "bf16": 4 * 2**-8,
    # the rotary tables: cos and sin of the same float64 angles, rounded once on both sides.
    "rope": 0.0,
}
# diffusers' tests/models/transformers/test_models_transformer_wan.py, with a longer rotary table
TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
# Wan2.1-T2V-1.3B (Wan-AI/Wan2.1-T2V-1.3B-Diffusers, transformer/config.json)
FULL = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
            text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
TIMESTEPS = np.array([999.0, 417.25], dtype=np.float32)


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    assert ours.shape == reference.shape and ours.dtype == np.float32
    return float(np.max(np.abs(ours.astype(np.float64) - reference)) / np.max(np.abs(reference)))


def random_transformer(config: dict, seed: int = 0):
    """diffusers' WanTransformer3DModel with random weights; the norms' scales and shifts and every bias random
    too, so that one read from the wrong tensor shows."""
    from diffusers import WanTransformer3DModel as Reference

    torch.manual_seed(seed)
    model = Reference(**config).eval()
    ref.randomise_norms(model, torch.Generator().manual_seed(seed + 1), bias_scale=0.05)
    return model


def state_of(model) -> dict[str, np.ndarray]:
    return {name: tensor.detach().numpy() for name, tensor in model.state_dict().items()}


def inputs(config: dict, frames: int, size: tuple[int, int], batch: int = 2, text_tokens: int = 7, seed: int = 0):
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((batch, config["in_channels"], frames, *size)).astype(np.float32)
    text = rng.standard_normal((batch, text_tokens, config["text_dim"])).astype(np.float32)
    return sample, text


def reference_output(model, sample, timesteps, text) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(sample), torch.from_numpy(timesteps), torch.from_numpy(text),
                     return_dict=False)[0].numpy()


def build(config: dict, state, backend: str = "cpu", precision: str = "fp32", **options) -> WanTransformer3DModel:
    ops = opaque_ops if backend == "opaque" else get_ops(backend)
    wan_config = WanTransformerConfig.from_diffusers(config)
    return load_network(lambda params: WanTransformer3DModel(params, wan_config), ArraySource(state), ops,
                        precision, **options)


def run(model: WanTransformer3DModel, sample, timesteps, text) -> np.ndarray:
    ops = model.ops
    return ops.to_host(model(ops.from_host(sample), timesteps, ops.from_host(text)))


@pytest.fixture(scope="module")
def tiny():
    model = random_transformer(TINY)
    return model, state_of(model)


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("frames, size", [(1, (2, 2)), (3, (6, 10)), (5, (14, 4))])
def test_tiny_parity(tiny, backend, frames, size):
    model, state = tiny
    sample, text = inputs(TINY, frames, size)
    expected = reference_output(model, sample, TIMESTEPS, text)
    assert relative_error(run(build(TINY, state, backend), sample, TIMESTEPS, text), expected) <= TOL["tiny"]


def test_text_context_is_the_text(tiny):
    """The cross-attention keys and values computed once per prompt batch give the same velocities, to the bit."""
    model = build(TINY, tiny[1])
    sample, text = inputs(TINY, 3, (4, 6))
    ops = model.ops
    context = model.text_context(ops.from_host(text))
    once = ops.to_host(model(ops.from_host(sample), TIMESTEPS, context))
    assert np.array_equal(once, run(model, sample, TIMESTEPS, text))


class MaskedProcessor:
    """diffusers' own Wan attention processor with a mask on the self-attention (it passes none itself)."""

    def __init__(self, processor, mask):
        self.processor, self.mask = processor, mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return self.processor(attn, hidden_states, encoder_hidden_states, self.mask, rotary_emb)


@pytest.mark.parametrize("backend", ["numpy", "cpu", "opaque"])
def test_block_causal_per_frame_timesteps_parity(tiny, backend):
    """A timestep per latent frame and the block-causal mask (the causal Wan of Self-Forcing, SkyReels-V2's
    diffusion forcing) against WanTransformer3DModel with per-token timesteps and its attention masked."""
    from sdcli.nn.wan_causal import BlockCausalAttention

    model, state = tiny
    frames, size, per_block = 6, (4, 6), 2
    sample, text = inputs(TINY, frames, size)
    per_frame = np.array([[0, 0, 300, 300, 999, 999], [5, 5, 5, 5, 640.5, 640.5]], dtype=np.float32)
    tokens = (size[0] // 2) * (size[1] // 2)
    block = np.arange(frames).repeat(tokens) // per_block
    mask = torch.from_numpy(block[None, :] <= block[:, None])  # (T, T): key block <= query block
    processors = [each.attn1.processor for each in model.blocks]
    try:
        for each in model.blocks:
            each.attn1.set_processor(MaskedProcessor(each.attn1.processor, mask))
        expected = reference_output(model, sample, per_frame.repeat(tokens, axis=1), text)
    finally:
        for each, processor in zip(model.blocks, processors):
            each.attn1.set_processor(processor)
    ours = build(TINY, state, backend)
    ops = ours.ops
    result = ops.to_host(ours(ops.from_host(sample), per_frame, ops.from_host(text),
                              self_attention=BlockCausalAttention(ops, per_block, tokens)))
    assert relative_error(result, expected) <= TOL["tiny"]


def test_opaque_backend_gives_the_numpy_results(tiny):
    """The transformer keeps its activations in the backend (see tests/opaque_backend.py)."""
    sample, text = inputs(TINY, 3, (4, 6))
    numpy_result = run(build(TINY, tiny[1], "numpy"), sample, TIMESTEPS, text)
    assert np.array_equal(numpy_result, run(build(TINY, tiny[1], "opaque"), sample, TIMESTEPS, text))


def test_bf16_weights(tiny):
    """bf16 products against the reference run in float32 on the same bf16-rounded weights."""
    model, state = tiny
    original = {name: value.copy() for name, value in state.items()}  # the state shares the model's memory
    ref.load_rounded(model, state, "BF16")
    try:
        sample, text = inputs(TINY, 3, (6, 4))
        expected = reference_output(model, sample, TIMESTEPS, text)
        bits = {name: ref.bf16_bits(value) for name, value in original.items()}
        ours = run(build(TINY, bits, "cpu", "bf16"), sample, TIMESTEPS, text)
        assert relative_error(ours, expected) <= TOL["bf16"]
    finally:
        with torch.no_grad():
            model.load_state_dict({name: torch.from_numpy(value) for name, value in original.items()})


def test_real_width_two_blocks():
    """The real widths (12 heads of 128, feed-forward 8960, text 4096, 16 channels) with two blocks, on the cpu
    backend's kernels, at an odd latent size and a longer text."""
    config = {**FULL, "num_layers": 2}
    model = random_transformer(config, seed=3)
    sample, text = inputs(config, 3, (6, 10), text_tokens=37, seed=3)
    expected = reference_output(model, sample, TIMESTEPS, text)
    assert relative_error(run(build(config, state_of(model)), sample, TIMESTEPS, text), expected) <= TOL["tiny"]


def test_full_config_on_a_tiny_latent():
    """All 30 blocks of Wan2.1-T2V-1.3B (1.42 billion random weights), 2 latent frames of 2x4 patches. The
    weights are streamed (never kept packed) so that the test holds one copy of them."""
    model = random_transformer(FULL, seed=5)
    sample, text = inputs(FULL, 2, (4, 8), batch=1, text_tokens=9, seed=5)
    expected = reference_output(model, sample, TIMESTEPS[:1], text)
    ours = run(build(FULL, state_of(model), stream=True), sample, TIMESTEPS[:1], text)
    assert relative_error(ours, expected) <= TOL["full"]


def test_rope_tables_are_diffusers():
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    rope = WanRotaryPosEmbed(128, (1, 2, 2), 1024)
    cos, sin = rope(torch.zeros(1, 16, 5, 6, 10))  # (1, T, 1, 128), each pair's value repeated
    ours_cos, ours_sin = rope_tables(128, 5, 3, 5)  # (T, 64)
    assert np.max(np.abs(ours_cos - cos[0, :, 0, 0::2].numpy())) <= TOL["rope"]
    assert np.max(np.abs(ours_sin - sin[0, :, 0, 1::2].numpy())) <= TOL["rope"]


# -- the original Wan layout ------------------------------------------------------------------------------------

def test_original_names_against_diffusers_converter():
    """sdcli's map, inverted, then diffusers' converter: every canonical name back, nothing else, each from the
    tensor it should come from; the map is a bijection (checked when it is built)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    config = WanTransformerConfig.from_diffusers(TINY)
    shapes = tensor_shapes(lambda params: WanTransformer3DModel(params, config))
    names = wan_transformer_names(config)
    assert set(names) == set(shapes)
    original = {key.name: torch.full((1,), float(i)) for i, key in enumerate(names.values())}
    converted = convert_wan_transformer_to_diffusers(dict(original))
    assert set(converted) == set(shapes)
    assert all(float(converted[canonical][0]) == float(original[names[canonical].name][0]) for canonical in names)


@pytest.mark.parametrize("prefix", ["", COMFY_PREFIX])
def test_original_layout_file_loads_to_the_same_network(tiny, tmp_path, prefix):
    from safetensors.numpy import save_file

    from sdcli.families.wan import open_wan_transformer

    model, state = tiny
    config = WanTransformerConfig.from_diffusers(TINY)
    names = wan_transformer_names(config, prefix)
    path = tmp_path / "wan_original.safetensors"
    save_file({names[name].name: np.ascontiguousarray(value) for name, value in state.items()}, str(path))
    assert is_original_layout(set(names[name].name for name in state)) == prefix
    loaded = load_network(lambda params: WanTransformer3DModel(params, config), open_wan_transformer(path, config),
                          get_ops("cpu"))
    sample, text = inputs(TINY, 3, (4, 6))
    assert np.array_equal(run(loaded, sample, TIMESTEPS, text), run(build(TINY, state), sample, TIMESTEPS, text))


# -- bad input ----------------------------------------------------------------------------------------------------

def test_latents_the_patch_does_not_divide_are_refused(tiny):
    model = build(TINY, tiny[1])
    sample, text = inputs(TINY, 3, (5, 6))
    with pytest.raises(SdcliError, match="multiples of the patch 1x2x2"):
        run(model, sample, TIMESTEPS, text)


@pytest.mark.parametrize("option, value", [("image_dim", 1280), ("added_kv_proj_dim", 5120),
                                           ("qk_norm", "rms_norm")])
def test_config_refuses_what_sdcli_does_not_build(option, value):
    with pytest.raises(CheckpointError, match=option):
        WanTransformerConfig.from_diffusers({**TINY, option: value})
