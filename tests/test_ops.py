"""The op backends against the numpy reference, and the reference against PyTorch and math.erf.

Every op of every backend in ``sdcli.ops.BACKENDS`` (the ``backend`` fixture: a backend added to the list is
tested as it is listed; numpy against itself is exact) is compared with numpy_ops on awkward shapes (odd sizes,
batch 2, a single row, width 1), large magnitudes and -inf entries; numpy_ops itself is compared with torch
(test-only) and the standard library. The cpu backend's own kernels and conversions (``sdcli.ext.cpu_kernels``
called directly, its bf16 fallback, float64 and strided inputs) are tested on the ``cpu`` fixture alone.
The ops without a test here (element-wise, layout, embeddings, conv1d/conv3d, ...) are in test_glue_ops.py.
"""

from __future__ import annotations

import inspect
import math
import sys

import numpy as np
import pytest

import sdcli.ext
import sdcli.ops
from sdcli.errors import BackendError
from sdcli.ops import BACKENDS, Ops, get_ops, numpy_ops
from sdcli.ops.parameter import Parameter, Weight

EPS = float(np.finfo(np.float32).eps)  # 1.19e-7, one float32 ulp at 1

# (rtol, atol as a fraction of max |expected|). Float32 results of the same formula agree to a few ulp (~1e-7
# relative); what differs between implementations is summation order and libm, so the bounds sit a few times above
# the differences those cause and far below what a wrong formula gives.
TOL = {
    # numpy's BLAS either way; one GEMM over all rows vs numpy's batched matmul sums length-K dot products in a
    # different order: ~sqrt(K) ulp of the output scale.
    "linear": (1e-5, 1e-6),
    # mean and variance accumulate in double in both (numpy normalises in float64 and rounds once, the kernel rounds
    # the mean to float32 first): a few ulp in mean and std.
    "layer_norm": (1e-5, 1e-6),
    # libm erfcf (about 1 ulp) vs the reference's erf, accurate to 1.2e-7 absolute, evaluated in float64.
    "gelu": (1e-6, 1e-7),
    # the same float32 formula; the kernel's exp polynomial and numpy's exp are each within an ulp or two.
    "quick_gelu": (2e-6, 0.0),
    # tanh (numpy) against the kernel's exp in the sigmoid form of the same function: a few ulp, plus the float32
    # rounding of x^3 near the origin's cancellation.
    "gelu_tanh": (4e-6, 1e-7),
    # exp within 1 ulp (the kernel's polynomial, numpy's SIMD exp), the row sum in double vs float32.
    "softmax": (2e-6, 1e-7),
    # a convolution is a sum of Cin*kh*kw products: tap-by-tap GEMMs (cpu), im2col (strided cpu), einsum (numpy)
    # and torch's kernels sum in different orders, ~sqrt(K) ulp of the output scale.
    "conv2d": (1e-5, 2e-6),
    # mean, variance and normalisation in double, rounded once (cpu, numpy) vs float32 (torch): a few ulp of the
    # normalised values; the SiLU after it takes exp from the kernel's polynomial (cpu) or numpy.
    "group_norm": (1e-5, 1e-6),
    # exp within an ulp or two, one division.
    "silu": (2e-6, 1e-7),
    # bf16 products against torch's: the same bf16 operands and float32 sums, but torch rounds its output to bf16
    # as well (one more rounding): bf16's own precision, relative and of the output scale.
    "bf16_products": (2**-8, 2**-8),
}
# Attention is as well conditioned as its scores are small: a float32 score s carries an error of ~|s| ulp, which
# exp turns into that relative error of the weights. Bound: ATTENTION_ULPS * EPS * max(1, max |s|) * max |v|.
ATTENTION_ULPS = 4
# numpy_ops.erf's documented accuracy (Numerical Recipes' erfcc).
ERF_ATOL = 1.2e-7


@pytest.fixture(scope="module", params=BACKENDS, ids=str)
def backend(request) -> Ops:
    """Each backend of ``sdcli.ops.BACKENDS`` in turn."""
    return get_ops(request.param)


@pytest.fixture(scope="module")
def cpu() -> Ops:
    """The cpu backend alone: for the tests of its own kernels and conversions, which other backends do not have."""
    return get_ops("cpu")


def assert_close(actual: np.ndarray, expected: np.ndarray, op: str) -> None:
    rtol, atol = TOL[op]
    finite = np.isfinite(expected)
    scale = float(np.abs(expected[finite]).max()) if finite.any() else 0.0
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * scale, equal_nan=True, err_msg=op)


def held(array: np.ndarray, precision: str | None = None, stream: bool = False, ops: Ops = numpy_ops) -> Parameter:
    """A weight as a layer holds it, made by ``ops.prepare``: prepared (packed) on its first use, or with ``stream``
    widened at every call (the path of streamed weights and of CPUs below the avx512 level)."""
    weight = Weight.of(array, precision)
    return ops.prepare(Weight(weight.data, weight.precision, stream=stream))


def random(shape: tuple[int, ...], seed: int = 0, magnitude: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * magnitude).astype(np.float32)


SHAPES = [(3, 5, 7), (2, 77, 33), (1, 7), (4, 1), (2, 3, 1, 64)]  # odd sizes, batch 2, one row, width 1


def protocol_names() -> list[str]:
    return [name for name, _ in inspect.getmembers(Ops, inspect.isfunction) if not name.startswith("_")]


def test_every_backend_has_the_reference_signatures(backend):
    """Every function of the Ops protocol exists in each backend with numpy_ops' signature."""
    assert backend.name in BACKENDS and get_ops(backend.name) is backend
    protocol = protocol_names()
    assert "attention" in protocol and "timestep_embedding" in protocol
    for name in protocol:
        assert inspect.signature(getattr(backend, name)) == inspect.signature(getattr(numpy_ops, name)), name


def test_reference_signatures_are_the_protocol():
    """numpy_ops takes the parameters of the Ops protocol: the same names, kinds and defaults (annotations aside)."""
    def parameters(function, skip=0):
        listed = list(inspect.signature(function).parameters.values())[skip:]
        return [(parameter.name, parameter.kind, parameter.default) for parameter in listed]

    for name in protocol_names():
        assert parameters(getattr(numpy_ops, name)) == parameters(getattr(Ops, name), skip=1), name  # less self


def test_missing_extension_is_a_clear_error(monkeypatch):
    # as if never built: importing the kernel module fails, and cpu_ops is imported afresh
    monkeypatch.setitem(sys.modules, "sdcli.ext.cpu_kernels", None)
    monkeypatch.delattr(sdcli.ext, "cpu_kernels", raising=False)
    monkeypatch.delitem(sys.modules, "sdcli.ops.cpu_ops", raising=False)
    monkeypatch.delattr(sdcli.ops, "cpu_ops", raising=False)
    with pytest.raises(BackendError, match="not built"):
        get_ops("cpu")


# ---------------------------------------------------------------------------------------------------------------
# every backend against numpy_ops
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("packed", [False, True])  # widened at each call (streamed), or prepared once
@pytest.mark.parametrize("dtype", [np.float32, np.float16])  # fp16 weights are multiplied in float32 too
def test_linear(backend, shape, with_bias, packed, dtype):
    x = random(shape)
    weight = random((5, shape[-1]), seed=1).astype(dtype)
    bias = random((5,), seed=2) if with_bias else None
    given = held(weight, stream=not packed, ops=backend)
    expected = numpy_ops.linear(x, weight.astype(np.float32), bias)
    assert_close(backend.linear(x, given, bias), expected, "linear")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("magnitude", [1.0, 1e4, 1e-3])  # 1e-3: variance 1e-6, so eps (1e-5) dominates
def test_layer_norm(backend, shape, magnitude):
    x = random(shape, magnitude=magnitude)
    weight, bias = random(shape[-1:], seed=1), random(shape[-1:], seed=2)
    assert_close(backend.layer_norm(x, weight, bias, 1e-5), numpy_ops.layer_norm(x, weight, bias, 1e-5), "layer_norm")


def test_layer_norm_constant_rows_give_the_bias(backend):
    x = np.full((2, 3, 9), 7.5, dtype=np.float32)
    weight, bias = random((9,), seed=1), random((9,), seed=2)
    np.testing.assert_array_equal(backend.layer_norm(x, weight, bias, 1e-5), np.broadcast_to(bias, x.shape))
    assert_close(backend.layer_norm(x, weight, bias, 1e-5), numpy_ops.layer_norm(x, weight, bias, 1e-5), "layer_norm")


ACTIVATION_INPUTS = [
    random((3, 5, 7), magnitude=3.0),
    np.linspace(-12.0, 12.0, 4001, dtype=np.float32).reshape(1, -1),  # both tails and the knee
    random((2, 50), magnitude=1e4),
    np.float32(0.5) * np.ones((4, 1), dtype=np.float32),
]


@pytest.mark.parametrize("op", ["gelu", "gelu_tanh", "quick_gelu"])
@pytest.mark.parametrize("case", range(len(ACTIVATION_INPUTS)))
def test_activations(backend, op, case):
    x = ACTIVATION_INPUTS[case]
    with np.errstate(over="ignore"):  # exp(-1.702 x) overflows to inf in quick_gelu's tail: the result is 0
        expected, got = getattr(numpy_ops, op)(x), getattr(backend, op)(x)
    assert_close(got, expected, op)


@pytest.mark.parametrize("op", ["gelu", "gelu_tanh", "quick_gelu"])
def test_activations_special_values(backend, op):
    """Element by element (no shared scale): zeros, tiny and huge values, infinities and nan as in numpy_ops."""
    x = np.array([0.0, -0.0, 1e-30, -1e-30, 1e4, -1e4, 3e38, -3e38, np.inf, -np.inf, np.nan], dtype=np.float32)
    with np.errstate(all="ignore"):
        expected, got = getattr(numpy_ops, op)(x), getattr(backend, op)(x)
    np.testing.assert_allclose(got, expected, rtol=TOL[op][0], atol=0, equal_nan=True, err_msg=op)
    assert got[8] == np.inf and np.isnan(got[10])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("magnitude", [1.0, 1e3, 1e30])
def test_softmax(backend, shape, magnitude):
    x = random(shape, magnitude=magnitude)
    assert_close(backend.softmax(x), numpy_ops.softmax(x), "softmax")


def test_softmax_minus_infinity(backend):
    x = random((4, 6), magnitude=5.0)
    x[0, :3] = -np.inf  # some entries masked
    x[1, :] = -np.inf  # a fully masked row: zeros, not nan
    x[2, 1:] = -np.inf  # one entry left: weight 1
    got = backend.softmax(x)
    assert_close(got, numpy_ops.softmax(x), "softmax")
    np.testing.assert_array_equal(got[1], 0.0)
    np.testing.assert_array_equal(got[2], [1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(got[0, :3], 0.0)


def assert_attention_close(actual, expected, q, k, v, scale=None):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = np.abs(np.matmul(q, np.swapaxes(k, -1, -2)) * scale).max()
    atol = ATTENTION_ULPS * EPS * max(1.0, float(scores)) * float(np.abs(v).max())
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=0, atol=atol)


# (B, H, Tq, Tk, d, dv, causal): the CLIP shape, odd sizes, a single token, more keys than one key block
# (64, or 128 for AVX-512) with a partial last block, Tq != Tk, dv != d and widths that are not multiples of the
# 8-wide tile; the UNet's self-attention at d = 40 with many blocks of 16 queries and 128 keys, ragged at both ends
# (1000 = 62 x 16 + 8 = 7 x 128 + 104), and its cross-attention (77 keys: one short block, a short 8-key tile).
ATTENTION_CASES = [
    (2, 12, 77, 77, 64, 64, True),
    (2, 12, 77, 77, 64, 64, False),
    (2, 3, 5, 5, 7, 7, True),
    (1, 1, 1, 1, 1, 1, True),
    (2, 2, 130, 130, 40, 40, True),
    (1, 2, 9, 130, 16, 24, False),
    (2, 3, 5, 7, 3, 5, False),
    (1, 2, 70, 3, 8, 9, False),
    (1, 2, 1000, 1000, 40, 40, False),
    (1, 2, 1000, 1000, 40, 40, True),
    (1, 2, 300, 77, 40, 40, False),
]


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=str)
def test_attention(backend, case):
    batch, heads, tq, tk, d, dv, causal = case
    q, k, v = random((batch, heads, tq, d), 1), random((batch, heads, tk, d), 2), random((batch, heads, tk, dv), 3)
    expected = numpy_ops.attention(q, k, v, causal=causal)
    assert_attention_close(backend.attention(q, k, v, causal=causal), expected, q, k, v)


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=str)
def test_attention_kernel_without_avx512(cpu, case):
    """The per-head kernel that CPUs without AVX-512 run (wide=False forces it where the CPU has AVX-512); cpu
    only: it calls sdcli.ext.cpu_kernels directly."""
    from sdcli.ext import cpu_kernels

    batch, heads, tq, tk, d, dv, causal = case
    q, k, v = random((batch, heads, tq, d), 1), random((batch, heads, tk, d), 2), random((batch, heads, tk, dv), 3)
    out = np.empty((batch, heads, tq, dv), dtype=np.float32)
    cpu_kernels.attention(q, k, v, out, causal, 1.0 / math.sqrt(d), wide=False)
    assert_attention_close(out, numpy_ops.attention(q, k, v, causal=causal), q, k, v)


@pytest.mark.parametrize("wide", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_reads_and_writes_interleaved_heads(cpu, wide, causal):
    """Heads split off (B, T, nh, hs) projections are read in place, and the output may be such a view too: the
    results equal those of contiguous copies (cpu only: it calls sdcli.ext.cpu_kernels directly)."""
    from sdcli.ext import cpu_kernels

    q, k, v = (random((2, 37, 3, 24), seed).transpose(0, 2, 1, 3) for seed in (1, 2, 3))  # (B, nh, T, hs) views
    out = np.empty((2, 37, 3, 24), dtype=np.float32).transpose(0, 2, 1, 3)
    cpu_kernels.attention(q, k, v, out, causal, 0.3, wide=wide)
    expected = np.empty((2, 3, 37, 24), dtype=np.float32)
    cpu_kernels.attention(*map(np.ascontiguousarray, (q, k, v)), expected, causal, 0.3, wide=wide)
    np.testing.assert_array_equal(out, expected)
    assert_attention_close(out, numpy_ops.attention(q, k, v, causal=causal, scale=0.3), q, k, v, 0.3)
    merged = cpu.attention(q, k, v, causal=causal, scale=0.3).transpose(0, 2, 1, 3)  # (B, T, nh, hs)
    assert merged.flags.c_contiguous  # merging the heads back is a free reshape


@pytest.mark.parametrize("causal", [True, False])
def test_attention_large_scores_and_explicit_scale(backend, causal):
    """Scores of 50 and more (exp's range) and a scale other than 1/sqrt(d) as in the reference."""
    q, k, v = random((2, 2, 100, 16), 1, 4.0), random((2, 2, 100, 16), 2, 4.0), random((2, 2, 100, 16), 3)
    for scale in (None, 0.7):
        expected = numpy_ops.attention(q, k, v, causal=causal, scale=scale)
        assert_attention_close(backend.attention(q, k, v, causal=causal, scale=scale), expected, q, k, v, scale)


def test_inputs_of_any_layout_and_dtype(cpu):
    """Non-contiguous and float64 inputs give what their contiguous float32 copies give, and are not modified
    (cpu only: the conversion to C-contiguous float32 is the cpu kernels' input contract; numpy_ops computes in
    the dtype it is given)."""
    base = random((2, 9, 3, 16), seed=4)
    x = base.transpose(0, 2, 1, 3).astype(np.float64)[..., ::2]  # (2, 3, 9, 8), strided, float64
    x_copy = x.copy()
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    weight, bias = random((8,), seed=1), random((8,), seed=2)
    for op, args in [("gelu", ()), ("quick_gelu", ()), ("softmax", ()), ("layer_norm", (weight, bias, 1e-5)),
                     ("linear", (random((4, 8), seed=3),))]:
        got = getattr(cpu, op)(x, *args)
        np.testing.assert_array_equal(got, getattr(cpu, op)(x32, *args), err_msg=op)
        assert got.dtype == np.float32 and got.flags.c_contiguous
    q = base.transpose(0, 2, 1, 3)  # (B, nh, T, hs) view, as the text encoder passes it
    np.testing.assert_array_equal(cpu.attention(q, q, q, causal=True),
                                  cpu.attention(*(np.ascontiguousarray(q),) * 3, causal=True))
    np.testing.assert_array_equal(x, x_copy)
    assert cpu.gelu(np.float32(1.0)).shape == ()


def test_attention_rejects_mismatched_shapes(backend):
    """q, k and v whose d or Tk disagree raise ValueError, not a result of the wrong shape."""
    q = random((1, 2, 5, 8))
    with pytest.raises(ValueError):
        backend.attention(q, random((1, 2, 5, 4)), random((1, 2, 5, 8)))
    with pytest.raises(ValueError):
        backend.attention(q, random((1, 2, 5, 8)), random((1, 2, 6, 8)))


@pytest.mark.parametrize("bf16", [False, True])
def test_split_heads(backend, bf16):
    """(B, T, heads * hs) -> (B, heads, T, hs), the same values as the reference's view, at either precision."""
    x = random((2, 7, 12))
    got = backend.split_heads(x, 3, precision="bf16" if bf16 else "fp32")
    np.testing.assert_array_equal(got, numpy_ops.split_heads(x, 3))
    assert got.shape == (2, 3, 7, 4)


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("tokens", [7, 4096])
def test_split_heads_layout(cpu, bf16, tokens):
    """The cpu backend lays the heads out for its attention kernels: a view of the projection, read in place, but
    for the float32 kernel over many tokens a contiguous copy (cpu only: the layout is its kernels', the values
    are every backend's)."""
    x = random((1, tokens, 12))
    got = cpu.split_heads(x, 3, precision="bf16" if bf16 else "fp32")
    np.testing.assert_array_equal(got, numpy_ops.split_heads(x, 3))
    assert np.shares_memory(got, x) == (bf16 or tokens < cpu.CONTIGUOUS_HEADS_TOKENS)


@pytest.mark.parametrize("shape", [(2, 5, 3, 7), (1, 64, 33, 31), (3, 40, 1, 1), (0, 4, 2, 2)], ids=str)
def test_channels_last_and_first(backend, shape):
    """Images to tokens and back: the same values as the reference's transposed copies, C-contiguous (blocks of
    the kernel cut off at awkward sizes)."""
    x = random(shape)
    tokens = backend.channels_last(x)
    np.testing.assert_array_equal(tokens, numpy_ops.channels_last(x))
    assert tokens.flags.c_contiguous and tokens.shape == (shape[0], shape[2] * shape[3], shape[1])
    back = backend.channels_first(tokens, *shape[2:])
    np.testing.assert_array_equal(back, x)
    np.testing.assert_array_equal(back, numpy_ops.channels_first(tokens, *shape[2:]))


@pytest.mark.parametrize("shape", [(2, 5, 3, 7), (0, 4, 2, 2)], ids=str)
def test_channels_first_rejects_a_wrong_image_size(cpu, shape):
    """Tokens that are not height x width raise, in an empty batch too (cpu only: its own check; numpy_ops'
    reshape raises only where the sizes do not multiply out, which in an empty batch they always do)."""
    tokens = cpu.channels_last(random(shape))
    with pytest.raises(ValueError, match="tokens"):
        cpu.channels_first(tokens, shape[2] + 1, shape[3])


# Convolutions as the networks use them: 3x3 "same", 3x3 stride 2 with padding 1 (UNet downsampler) and with
# padding 0 (the VAE encoder pads asymmetrically first), 1x1, and odd sizes, width 1, batch 2.
CONV_CASES = [  # (batch, in, out, height, width, kernel, stride, padding)
    (2, 3, 5, 7, 9, 3, 1, 1), (1, 4, 6, 8, 8, 3, 2, 1), (2, 5, 3, 6, 5, 1, 1, 0), (1, 2, 2, 5, 5, 3, 1, 0),
    (2, 4, 4, 9, 7, 3, 2, 0), (1, 3, 4, 1, 6, 3, 1, 1), (2, 8, 16, 16, 16, 3, 1, 1),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("packed", [False, True])  # widened at each call (streamed), or prepared once
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_conv2d(backend, case, with_bias, packed, dtype):
    batch, cin, cout, height, width, kernel, stride, padding = case
    x, weight = random((batch, cin, height, width)), random((cout, cin, kernel, kernel), seed=1).astype(dtype)
    bias = random((cout,), seed=2) if with_bias else None
    expected = numpy_ops.conv2d(x, weight.astype(np.float32), bias, stride=stride, padding=padding)
    given = held(weight, stream=not packed, ops=backend)
    assert_close(backend.conv2d(x, given, bias, stride=stride, padding=padding), expected, "conv2d")


@pytest.mark.parametrize("shape,groups", [((2, 64, 5, 7), 32), ((1, 6, 1, 1), 3), ((2, 32, 16, 16), 32),
                                          ((2, 8, 33), 2)], ids=str)
@pytest.mark.parametrize("magnitude", [1.0, 1e3])
@pytest.mark.parametrize("silu", [False, True])
def test_group_norm(backend, shape, groups, magnitude, silu):
    x = random(shape, magnitude=magnitude) + np.float32(magnitude)  # an offset mean, as activations have
    weight, bias = random(shape[1:2], seed=1), random(shape[1:2], seed=2)
    assert_close(backend.group_norm(x, groups, weight, bias, 1e-6, silu=silu),
                 numpy_ops.group_norm(x, groups, weight, bias, 1e-6, silu=silu), "group_norm")


@pytest.mark.parametrize("shape", [(2, 5, 8, 3, 4), (1, 3, 6, 1, 1), (2, 1, 4, 2, 3)], ids=str)  # (B, F, C, H, W)
@pytest.mark.parametrize("silu", [False, True])
def test_group_norm_of_video_frames(backend, shape, silu):
    """A (B, C, F, H, W) view of frames laid out (B, F, C, H, W) (AnimateDiff's temporal norm): each group over
    its channels, all frames and positions; the values the reference gives on a copy of the view."""
    x = random(shape, magnitude=10.0) + np.float32(10.0)
    channels, groups = shape[2], 2 if shape[2] % 2 == 0 else 1
    weight, bias = random((channels,), seed=1), random((channels,), seed=2)
    view = backend.permute(backend.from_host(x), (0, 2, 1, 3, 4))  # (B, C, F, H, W)
    got = backend.to_host(backend.group_norm(view, groups, weight, bias, 1e-6, silu=silu))
    want = numpy_ops.group_norm(np.ascontiguousarray(x.transpose(0, 2, 1, 3, 4)), groups, weight, bias, 1e-6,
                                silu=silu)
    assert_close(got, want, "group_norm")


def test_group_norm_keeps_the_layout_of_a_view_of_frames(cpu):
    """The cpu backend reads a (B, C, F, H, W) view of (B, F, C, H, W) frames in place and writes its result in
    that layout, so that permuting it back is free (cpu only: the layout is its kernels')."""
    x = random((2, 3, 4, 5, 6))  # (B, F, C, H, W)
    weight, bias = np.ones(4, np.float32), np.zeros(4, np.float32)
    out = cpu.group_norm(x.transpose(0, 2, 1, 3, 4), 2, weight, bias, 1e-6)  # (B, C, F, H, W)
    assert out.transpose(0, 2, 1, 3, 4).flags.c_contiguous


def test_group_norm_rejects_groups_that_do_not_divide_the_channels(cpu):
    """The cpu backend checks that the groups divide the channels (cpu only: numpy_ops states it as a precondition
    and does not check it)."""
    with pytest.raises(ValueError, match="do not split"):
        cpu.group_norm(random((1, 6, 2, 2)), 4, np.ones(6, np.float32), np.zeros(6, np.float32), 1e-6)


@pytest.mark.parametrize("shape", [(2, 77, 66), (3, 2), (1, 5, 2 * 1280), (4, 0)])
def test_geglu(backend, shape):
    x = random(shape, magnitude=3.0)
    assert_close(backend.geglu(x), numpy_ops.geglu(x), "gelu")


@pytest.mark.parametrize("case", range(len(ACTIVATION_INPUTS)))
def test_silu_and_relu(backend, case):
    x = ACTIVATION_INPUTS[case]
    with np.errstate(over="ignore"):
        assert_close(backend.silu(x), numpy_ops.silu(x), "silu")
    np.testing.assert_array_equal(backend.relu(x), numpy_ops.relu(x))


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 1, 1, 1), (2, 4, 8, 1), (0, 3, 2, 2), (3, 6, 6)])
@pytest.mark.parametrize("factor", [1, 2, 3])
def test_upsample_nearest(backend, shape, factor):
    x = random(shape)
    np.testing.assert_array_equal(backend.upsample_nearest(x, factor), numpy_ops.upsample_nearest(x, factor))


# ---------------------------------------------------------------------------------------------------------------
# numpy_ops against the standard library and PyTorch
# ---------------------------------------------------------------------------------------------------------------

def test_reference_erf_accuracy():
    x = np.concatenate([np.linspace(-6.0, 6.0, 24001), [-30.0, -1e-8, 0.0, 1e-8, 30.0]])
    expected = np.array([math.erf(value) for value in x])
    assert np.abs(numpy_ops.erf(x) - expected).max() <= ERF_ATOL


def test_reference_gelu_against_torch(torch):
    F = torch.nn.functional
    x = np.concatenate([np.linspace(-12.0, 12.0, 4001, dtype=np.float32), random((1000,), magnitude=4.0)])
    expected = F.gelu(torch.from_numpy(x)).numpy()  # approximate="none": x * Phi(x) with libm-class erf
    assert_close(numpy_ops.gelu(x), expected, "gelu")


def test_reference_geglu_against_torch(torch):
    F = torch.nn.functional
    x = random((2, 7, 64), magnitude=3.0)
    value, gate = torch.from_numpy(x).chunk(2, dim=-1)  # diffusers' GEGLU: hidden, gate = proj(x).chunk(2)
    assert_close(numpy_ops.geglu(x), (value * F.gelu(gate)).numpy(), "gelu")


def test_reference_gelu_tanh_against_torch(torch):
    F = torch.nn.functional
    x = np.concatenate([np.linspace(-12.0, 12.0, 4001, dtype=np.float32), random((1000,), magnitude=4.0)])
    expected = F.gelu(torch.from_numpy(x), approximate="tanh").numpy()
    assert_close(numpy_ops.gelu_tanh(x), expected, "gelu_tanh")


def test_reference_quick_gelu_against_torch(torch):
    x = np.concatenate([np.linspace(-12.0, 12.0, 4001, dtype=np.float32), random((1000,), magnitude=4.0)])
    t = torch.from_numpy(x)
    assert_close(numpy_ops.quick_gelu(x), (t * torch.sigmoid(1.702 * t)).numpy(), "quick_gelu")


@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 77, 768), (4, 1)])
def test_reference_layer_norm_against_torch(shape, torch):
    F = torch.nn.functional
    x, weight, bias = random(shape, magnitude=3.0), random(shape[-1:], seed=1), random(shape[-1:], seed=2)
    expected = F.layer_norm(torch.from_numpy(x), shape[-1:], torch.from_numpy(weight), torch.from_numpy(bias), 1e-5)
    assert_close(numpy_ops.layer_norm(x, weight, bias, 1e-5), expected.numpy(), "layer_norm")


@pytest.mark.parametrize("case", [(2, 12, 77, 77, 64, True), (2, 3, 5, 5, 7, True), (1, 2, 9, 130, 16, False)],
                         ids=str)
def test_reference_attention_against_torch(case, torch):
    F = torch.nn.functional
    batch, heads, tq, tk, d, causal = case
    q, k, v = random((batch, heads, tq, d), 1), random((batch, heads, tk, d), 2), random((batch, heads, tk, d), 3)
    expected = F.scaled_dot_product_attention(*map(torch.from_numpy, (q, k, v)), is_causal=causal).numpy()
    assert_attention_close(numpy_ops.attention(q, k, v, causal=causal), expected, q, k, v)


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_reference_conv2d_against_torch(case, torch):
    F = torch.nn.functional
    batch, cin, cout, height, width, kernel, stride, padding = case
    x, weight, bias = random((batch, cin, height, width)), random((cout, cin, kernel, kernel), 1), random((cout,), 2)
    expected = F.conv2d(*map(torch.from_numpy, (x, weight, bias)), stride=stride, padding=padding).numpy()
    assert_close(numpy_ops.conv2d(x, weight, bias, stride=stride, padding=padding), expected, "conv2d")


def test_reference_group_norm_silu_upsample_against_torch(torch):
    F = torch.nn.functional
    x, weight, bias = random((2, 64, 5, 7), magnitude=3.0) + 1, random((64,), 1), random((64,), 2)
    expected = F.group_norm(*map(torch.from_numpy, (x,)), 32, torch.from_numpy(weight), torch.from_numpy(bias), 1e-6)
    assert_close(numpy_ops.group_norm(x, 32, weight, bias, 1e-6), expected.numpy(), "group_norm")
    assert_close(numpy_ops.group_norm(x, 32, weight, bias, 1e-6, silu=True), F.silu(expected).numpy(), "group_norm")
    assert_close(numpy_ops.silu(x), F.silu(torch.from_numpy(x)).numpy(), "silu")
    np.testing.assert_array_equal(numpy_ops.upsample_nearest(x),
                                  F.interpolate(torch.from_numpy(x), scale_factor=2.0, mode="nearest").numpy())


# ---------------------------------------------------------------------------------------------------------------
# weights held at reduced precision
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_weight_float32_is_exact(backend, precision):
    """Every 16-bit pattern widens to the float32 numpy_ops gives (nan payloads aside: any nan stays nan)."""
    bits = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    data = bits.view(np.float16) if precision == "fp16" else bits
    got, expected = backend.weight_float32(data, precision), numpy_ops.weight_float32(data, precision)
    nan = np.isnan(expected)
    assert got.shape == (256, 256) and got.dtype == np.float32 and np.array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), expected[~nan].view(np.uint32))
    assert backend.weight_float32(random((3, 4)), "fp32").dtype == np.float32


def bf16_bits(shape: tuple[int, ...], seed: int) -> np.ndarray:
    from sdcli.io.safetensors import float32_to_bf16

    return float32_to_bf16(random(shape, seed))


@pytest.fixture
def bf16_backend(backend) -> Ops:
    """Each backend, where it runs bf16 products as numpy_ops states them: the cpu backend is skipped where the CPU
    has no bf16 instructions (it then runs the float32 fallback, tested by the *_bf16_fallback tests everywhere)."""
    if backend.name == "cpu" and backend.bf16_level() == "portable":
        pytest.skip("this CPU has no bf16 instructions")
    return backend


@pytest.fixture
def fallback_cpu(cpu, monkeypatch) -> Ops:
    """The cpu backend forced to the float32 fallback that CPUs without bf16 instructions run (cpu only: it patches
    cpu_ops.bf16_level)."""
    from sdcli.ops import cpu_ops

    monkeypatch.setattr(cpu_ops, "bf16_level", lambda: "portable")
    return cpu


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_bf16(bf16_backend, shape, with_bias):
    """bf16 weights: x rounded to bf16 times the weight, float32 sums, as numpy_ops (summed in another order)."""
    x, bits = random(shape), bf16_bits((37, shape[-1]), 1)
    bias = random((37,), seed=2) if with_bias else None
    expected = numpy_ops.linear(x, held(bits, "bf16"), bias)
    assert_close(bf16_backend.linear(x, held(bits, "bf16", ops=bf16_backend), bias), expected, "linear")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_bf16_fallback(fallback_cpu, shape, with_bias):
    """Without bf16 instructions: float32 activations times the widened weight (cpu only, see fallback_cpu)."""
    x, bits = random(shape), bf16_bits((37, shape[-1]), 1)
    bias = random((37,), seed=2) if with_bias else None
    expected = numpy_ops.linear(x, numpy_ops.weight_float32(bits, "bf16"), bias)
    assert_close(fallback_cpu.linear(x, held(bits, "bf16", ops=fallback_cpu), bias), expected, "linear")


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv2d_bf16(bf16_backend, case):
    """bf16 convolution weights: x rounded to bf16, float32 sums, as numpy_ops (summed in another order)."""
    batch, cin, cout, height, width, kernel, stride, padding = case
    x, bits, bias = random((batch, cin, height, width)), bf16_bits((cout, cin, kernel, kernel), 1), random((cout,), 2)
    got = bf16_backend.conv2d(x, held(bits, "bf16", ops=bf16_backend), bias, stride=stride, padding=padding)
    expected = numpy_ops.conv2d(x, held(bits, "bf16"), bias, stride=stride, padding=padding)
    assert_close(got, expected, "conv2d")


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv2d_bf16_fallback(fallback_cpu, case):
    """Without bf16 instructions: the float32 convolution with the widened weight (cpu only, see fallback_cpu)."""
    batch, cin, cout, height, width, kernel, stride, padding = case
    x, bits, bias = random((batch, cin, height, width)), bf16_bits((cout, cin, kernel, kernel), 1), random((cout,), 2)
    got = fallback_cpu.conv2d(x, held(bits, "bf16", ops=fallback_cpu), bias, stride=stride, padding=padding)
    expected = numpy_ops.conv2d(x, numpy_ops.weight_float32(bits, "bf16"), bias, stride=stride, padding=padding)
    assert_close(got, expected, "conv2d")


def test_reference_bf16_products_against_torch(torch):
    """numpy_ops' bf16 contract is torch's bf16 linear and conv2d: operands rounded to bf16, float32 sums (torch
    rounds its bf16 output too, one more rounding: compared at bf16's own precision)."""
    F = torch.nn.functional
    x, bits, bias = random((2, 7, 64)), bf16_bits((24, 64), 1), random((24,), 2)
    weight = torch.from_numpy(numpy_ops.weight_float32(bits, "bf16")).bfloat16()
    expected = F.linear(torch.from_numpy(x).bfloat16(), weight, torch.from_numpy(bias).bfloat16()).float().numpy()
    got = numpy_ops.linear(x, held(bits, "bf16"), numpy_ops.round_to_bf16(bias))
    assert_close(got, expected, "bf16_products")
    x, bits = random((2, 5, 9, 9)), bf16_bits((6, 5, 3, 3), 1)
    weight = torch.from_numpy(numpy_ops.weight_float32(bits, "bf16")).bfloat16()
    expected = F.conv2d(torch.from_numpy(x).bfloat16(), weight, padding=1).float().numpy()
    got = numpy_ops.conv2d(x, held(bits, "bf16"), padding=1)
    assert_close(got, expected, "bf16_products")


# bf16 attention (the layers of a bf16 model): the kernel rounds the probabilities to bf16 against its running
# maximum, the reference against the final one, so a probability may round differently on each side: at most
# 2^-9 of it, hence 2^-9 max |v| per output, doubled for summation order and the kernel's exp polynomial.
BF16_ATTENTION_ULPS = 2**-8


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=str)
def test_attention_bf16(bf16_backend, case):
    """bf16 attention: q, k, v and the probabilities rounded to bf16, float32 scores and sums, as numpy_ops."""
    batch, heads, tq, tk, d, dv, causal = case
    q, k, v = random((batch, heads, tq, d), 1), random((batch, heads, tk, d), 2), random((batch, heads, tk, dv), 3)
    got = bf16_backend.attention(q, k, v, causal=causal, precision="bf16")
    expected = numpy_ops.attention(q, k, v, causal=causal, precision="bf16")
    assert got.shape == expected.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=BF16_ATTENTION_ULPS * float(np.abs(v).max()))


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=str)
def test_attention_bf16_fallback(fallback_cpu, case):
    """Without bf16 instructions: float32 attention (cpu only, see fallback_cpu)."""
    batch, heads, tq, tk, d, dv, causal = case
    q, k, v = random((batch, heads, tq, d), 1), random((batch, heads, tk, d), 2), random((batch, heads, tk, dv), 3)
    got = fallback_cpu.attention(q, k, v, causal=causal, precision="bf16")
    assert_attention_close(got, numpy_ops.attention(q, k, v, causal=causal), q, k, v)


def test_reference_bf16_attention_against_torch(torch):
    F = torch.nn.functional
    q, k, v = random((2, 3, 50, 40), 1), random((2, 3, 77, 40), 2), random((2, 3, 77, 40), 3)
    expected = F.scaled_dot_product_attention(*(torch.from_numpy(a).bfloat16() for a in (q, k, v))).float().numpy()
    got = numpy_ops.attention(q, k, v, precision="bf16")
    np.testing.assert_allclose(got, expected, rtol=0, atol=2 * BF16_ATTENTION_ULPS * float(np.abs(v).max()))


def test_streamed_bf16_weight_is_never_kept_prepared(backend):
    """A streamed bf16 weight (a text encoder too large to hold packed) is packed for each call and its file
    pages released after it; the products are the kept weight's, to the bit."""
    x, bits = random((5, 48)), bf16_bits((19, 48), 3)
    released = []
    streamed = backend.prepare(Weight(bits, "bf16", release=lambda: released.append(1), stream=True))
    kept = backend.prepare(Weight(bits, "bf16"))
    for call in (1, 2):
        np.testing.assert_array_equal(backend.linear(x, streamed), backend.linear(x, kept))
        assert not streamed.is_prepared and len(released) == call
