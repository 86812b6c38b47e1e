"""The float32 AVX-512 kernels (sdcli.ext.f32_kernels) against float64 numpy references and against torch.

The references take the same float32 x and weight and compute the product (or the convolution) in float64; the
kernels sum in float32 in their own order (k in parts of KSUM within chunks of KC, the bias last), so the only
difference is float32 rounding. Shapes are awkward on purpose: M, N, K off the 14 x 32 tile and the KC chunk, one row, batch 2, Cin 4
(the UNet's conv_in), Cout 3 and 4 (conv_out), stride 2, 1 x 1 kernels, images smaller than the kernel's reach.
"""

from __future__ import annotations

import numpy as np
import pytest

from sdcli.ext import f32_kernels

# |result - reference| <= rtol * (the same sum over |a| |b|, plus |bias|), per element. Float32 summation of K
# products differs from the float64 sum by about sqrt(K) float32 ulps of the sum of magnitudes in practice (at
# K = 2300: ~3e-6 at worst); a wrong index, a lost chunk or a misplaced tile gives errors of order 1.
TOL = {
    "linear": 1e-5,
    "conv2d": 1e-5,
    # against torch's float32 (oneDNN), relative to max |expected|: both sides carry float32 rounding
    "torch": 1e-5,
}

needs_avx512 = pytest.mark.skipif(not f32_kernels.available(), reason="this CPU or build has no AVX-512 kernels")

MR, NR, KC = f32_kernels.MR, f32_kernels.NR, f32_kernels.KC


def assert_close(name: str, out: np.ndarray, expected: np.ndarray, magnitude: np.ndarray) -> None:
    assert out.dtype == np.float32 and out.shape == expected.shape
    error = np.abs(out.astype(np.float64) - expected)
    bound = TOL[name] * magnitude
    worst = np.unravel_index(np.argmax(error - bound), error.shape) if error.size else None
    assert np.all(error <= bound), f"{name}: error {error[worst]:.3g} > bound {bound[worst]:.3g} at {worst}"


def linear_reference(x, w, bias):
    """(expected, magnitude): x @ w.T + bias and |x| @ |w|.T + |bias|, in float64."""
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    expected, magnitude = x64 @ w64.T, np.abs(x64) @ np.abs(w64).T
    if bias is not None:
        expected, magnitude = expected + bias, magnitude + np.abs(bias)
    return expected, magnitude


def conv_reference(x, w, bias, stride: int, padding: int):
    """(expected, magnitude) of conv2d(x, w) + bias (PyTorch semantics) and of the same over |.|, in float64."""
    batch, _, h, width = x.shape
    cout, _, kh, kw = w.shape
    ho, wo = (h + 2 * padding - kh) // stride + 1, (width + 2 * padding - kw) // stride + 1
    results = []
    for xs, ws in ((x.astype(np.float64), w.astype(np.float64)), (np.abs(x.astype(np.float64)), np.abs(w))):
        padded = np.pad(xs, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
        total = np.zeros((batch, cout, ho, wo))
        for dy in range(kh):
            for dx in range(kw):
                patch = padded[:, :, dy : dy + stride * (ho - 1) + 1 : stride, dx : dx + stride * (wo - 1) + 1 : stride]
                total += np.einsum("oc,bchw->bohw", ws[:, :, dy, dx], patch)  # (B, Cout, Ho, Wo)
        results.append(total)
    if bias is not None:
        results[0] += bias.reshape(1, cout, 1, 1)
        results[1] += np.abs(bias).reshape(1, cout, 1, 1)
    return results[0], results[1]


def run_linear(x, w, bias):
    out = np.full((x.shape[0], w.shape[0]), np.nan, dtype=np.float32)
    f32_kernels.linear(x, f32_kernels.pack_linear_weight(w), bias, out)
    return out


def run_conv(x, w, bias, stride, padding):
    batch, _, h, width = x.shape
    cout, _, kh, kw = w.shape
    ho, wo = (h + 2 * padding - kh) // stride + 1, (width + 2 * padding - kw) // stride + 1
    out = np.full((batch, cout, ho, wo), np.nan, dtype=np.float32)
    f32_kernels.conv2d(x, f32_kernels.pack_conv_weight(w), kh, kw, stride, padding, bias, out)
    return out


def random_arrays(rng, x_shape, w_shape, with_bias):
    x = rng.standard_normal(x_shape).astype(np.float32)
    fan_in = int(np.prod(w_shape[1:]))
    w = (rng.standard_normal(w_shape) / np.sqrt(max(fan_in, 1))).astype(np.float32)
    bias = rng.standard_normal(w_shape[0]).astype(np.float32) if with_bias else None
    return x, w, bias


def test_pack_linear_weight_layout():
    w = np.arange(33 * 5, dtype=np.float32).reshape(33, 5)  # (N, K)
    packed = f32_kernels.pack_linear_weight(w)
    assert packed.shape == (2, 5, 32) and packed.dtype == np.float32
    assert packed[1, 3, 0] == w[32, 3] and packed[0, 4, 7] == w[7, 4]
    assert np.all(packed[1, :, 1:] == 0)  # columns past N


def test_pack_conv_weight_layout():
    w = np.arange(15 * 4 * 3 * 3, dtype=np.float32).reshape(15, 4, 3, 3) + 1  # (Cout, Cin, kh, kw), K = 36
    packed = f32_kernels.pack_conv_weight(w)
    assert packed.shape == (2, 1, MR, KC) and packed.dtype == np.float32
    assert packed[1, 0, 0, 2 * 9 + 1 * 3 + 2] == w[MR, 2, 1, 2]
    assert np.all(packed[1, 0, 1:] == 0) and np.all(packed[:, :, :, 36:] == 0)  # rows past Cout, k past K


@needs_avx512
@pytest.mark.parametrize("m, k, n", [(1, 1, 1), (3, 17, 33), (17, 33, 77), (77, 3, 17), (33, 77, 3),
                                     (230, KC + 17, 65), (15, 3 * KC, 1), (500, 40, 300)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear(m, k, n, with_bias):
    rng = np.random.default_rng(m * 1000 + k * 10 + n)
    x, w, bias = random_arrays(rng, (m, k), (n, k), with_bias)
    expected, magnitude = linear_reference(x, w, bias)
    assert_close("linear", run_linear(x, w, bias), expected, magnitude)


@needs_avx512
def test_linear_many_tasks_and_wide_rows():
    """more row blocks than threads and an N wider than one block of columns"""
    rng = np.random.default_rng(7)
    x, w, bias = random_arrays(rng, (700, 50), (1100, 50), True)
    expected, magnitude = linear_reference(x, w, bias)
    assert_close("linear", run_linear(x, w, bias), expected, magnitude)


@needs_avx512
def test_linear_empty_k_gives_bias():
    x = np.zeros((3, 0), dtype=np.float32)
    w = np.zeros((5, 0), dtype=np.float32)
    bias = np.arange(5, dtype=np.float32)
    assert np.array_equal(run_linear(x, w, bias), np.broadcast_to(bias, (3, 5)))


CONV_CASES = [
    # (batch, cin, cout, h, w, k, stride, padding)
    (2, 4, 17, 9, 9, 3, 1, 1),  # conv_in: Cin 4
    (2, 17, 4, 10, 6, 3, 1, 1),  # conv_out: Cout 4
    (1, 33, 3, 9, 9, 3, 1, 1),  # Cout 3
    (2, 3, 33, 1, 1, 3, 1, 1),  # 1 x 1 image, all taps but the centre in the padding
    (2, 17, 33, 10, 6, 3, 2, 1),  # stride 2 (the UNet's downsamplers)
    (1, 8, 15, 9, 9, 3, 2, 1),
    (2, 33, 17, 10, 6, 1, 1, 0),  # 1 x 1 kernel
    (1, 40, 30, 7, 9, 3, 1, 0),  # no padding
    (1, 5, 7, 8, 11, 3, 3, 2),  # stride 3, padding 2: the generic strided copy
    (2, 77, 29, 24, 27, 3, 1, 1),  # K = 693: several chunks; blocks of pixels across several output rows
    (1, 6, 5, 40, 40, 3, 1, 1),  # several blocks of pixels in one image, the last one partial
    (3, 10, 20, 8, 8, 3, 1, 1),  # 64 pixels per image: one block of three whole images
    (5, 6, 17, 8, 16, 3, 1, 1),  # 128 pixels per image: blocks of four images, the last of one
    (3, 7, 9, 16, 16, 3, 2, 1),  # stride 2 to 8 x 8: whole images per block
]


@needs_avx512
@pytest.mark.parametrize("batch, cin, cout, h, w, k, stride, padding", CONV_CASES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_conv2d(batch, cin, cout, h, w, k, stride, padding, with_bias):
    rng = np.random.default_rng(batch + 10 * cin + 100 * cout + 1000 * h + 10000 * w)
    x, weight, bias = random_arrays(rng, (batch, cin, h, w), (cout, cin, k, k), with_bias)
    expected, magnitude = conv_reference(x, weight, bias, stride, padding)
    assert_close("conv2d", run_conv(x, weight, bias, stride, padding), expected, magnitude)


@needs_avx512
def test_conv2d_rectangular_kernel():
    rng = np.random.default_rng(3)
    x, weight, bias = random_arrays(rng, (2, 6, 7, 10), (9, 6, 1, 3), True)
    expected, magnitude = conv_reference(x, weight, bias, 1, 1)
    out = np.empty(expected.shape, dtype=np.float32)
    f32_kernels.conv2d(x, f32_kernels.pack_conv_weight(weight), 1, 3, 1, 1, bias, out)
    assert_close("conv2d", out, expected, magnitude)


def test_pack_keeps_float16():
    w = (np.arange(33 * 5).reshape(33, 5) / 8).astype(np.float16)
    packed = f32_kernels.pack_linear_weight(w)
    assert packed.dtype == np.float16 and np.array_equal(packed, f32_kernels.pack_linear_weight(w.astype(np.float32)))
    w4 = (np.arange(15 * 4 * 3 * 3).reshape(15, 4, 3, 3) / 8).astype(np.float16)
    packed = f32_kernels.pack_conv_weight(w4)
    assert packed.dtype == np.float16 and np.array_equal(packed, f32_kernels.pack_conv_weight(w4.astype(np.float32)))


# fp16 weights: the kernels widen the packed panels exactly and then run the float32 code, so the result is the
# float32 kernel's on the widened weight, to the bit (shapes: several chunks of k, blocks of rows and of columns,
# partial tiles, the widening's 16-value tail).
@needs_avx512
@pytest.mark.parametrize("m, k, n", [(3, 17, 33), (230, KC + 17, 65), (700, 50, 1100), (300, 320, 1280)])
def test_linear_float16_weight_is_the_widened_product(m, k, n):
    rng = np.random.default_rng(m + k + n)
    x, w, bias = random_arrays(rng, (m, k), (n, k), True)
    half = w.astype(np.float16)
    assert np.array_equal(run_linear(x, half, bias), run_linear(x, half.astype(np.float32), bias))


@needs_avx512
@pytest.mark.parametrize("batch, cin, cout, h, w, k, stride, padding", CONV_CASES[::2] + [CONV_CASES[9]])
def test_conv2d_float16_weight_is_the_widened_product(batch, cin, cout, h, w, k, stride, padding):
    rng = np.random.default_rng(batch + cin + cout + h + w)
    x, weight, bias = random_arrays(rng, (batch, cin, h, w), (cout, cin, k, k), True)
    half = weight.astype(np.float16)
    assert np.array_equal(run_conv(x, half, bias, stride, padding),
                          run_conv(x, half.astype(np.float32), bias, stride, padding))


@needs_avx512
def test_against_torch(torch):
    rng = np.random.default_rng(11)
    x, w, bias = random_arrays(rng, (37, 300), (70, 300), True)
    expected = torch.nn.functional.linear(*map(torch.from_numpy, (x, w, bias))).numpy()
    assert np.max(np.abs(run_linear(x, w, bias) - expected)) <= TOL["torch"] * np.max(np.abs(expected))
    for stride in (1, 2):
        x, w, bias = random_arrays(rng, (2, 24, 13, 12), (20, 24, 3, 3), True)
        expected = torch.nn.functional.conv2d(*map(torch.from_numpy, (x, w, bias)), stride=stride, padding=1).numpy()
        out = run_conv(x, w, bias, stride, 1)
        assert np.max(np.abs(out - expected)) <= TOL["torch"] * np.max(np.abs(expected))


@needs_avx512
@pytest.mark.parametrize("product", ["linear", "linear_two_rows", "conv2d"])
def test_long_sums_are_as_accurate_as_torch(product, torch):
    """Sums of thousands of products (the UNet's K = 1280 linears and 2880 to 11520 convolutions): the kernels sum
    in parts of KSUM steps with the bias last, and land closer to the float64 result than torch's float32 (measured
    0.39 to 0.57 times its error; running sums over whole chunks after the bias were 0.84 to 1.2 times). The
    geometric mean of the max error over several inputs: one input's is a random draw."""
    ours, theirs = [], []
    for seed in range(6):
        rng = np.random.default_rng(seed)
        if product == "conv2d":
            x, w, bias = random_arrays(rng, (1, 320, 16, 16), (320, 320, 3, 3), True)
            expected, _ = conv_reference(x, w, bias, 1, 1)
            result = run_conv(x, w, bias, 1, 1)
            reference = torch.nn.functional.conv2d(*map(torch.from_numpy, (x, w, bias)), padding=1).numpy()
        else:
            x, w, bias = random_arrays(rng, (2 if product == "linear_two_rows" else 256, 1280), (320, 1280), True)
            expected, _ = linear_reference(x, w, bias)
            result = run_linear(x, w, bias)
            reference = torch.nn.functional.linear(*map(torch.from_numpy, (x, w, bias))).numpy()
        ours.append(np.max(np.abs(result - expected)))
        theirs.append(np.max(np.abs(reference - expected)))
    assert np.exp(np.mean(np.log(ours))) <= np.exp(np.mean(np.log(theirs)))


@needs_avx512
def test_shape_errors():
    w = np.zeros((5, 4), dtype=np.float32)
    packed = f32_kernels.pack_linear_weight(w)
    with pytest.raises(ValueError, match="packed weight"):
        f32_kernels.linear(np.zeros((2, 3), np.float32), packed, None, np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="rows"):
        f32_kernels.linear(np.zeros((2, 4), np.float32), packed, None, np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match="bias"):
        f32_kernels.linear(np.zeros((2, 4), np.float32), packed, np.zeros(4, np.float32), np.zeros((2, 5), np.float32))
    conv = f32_kernels.pack_conv_weight(np.zeros((5, 4, 3, 3), dtype=np.float32))
    out = np.zeros((1, 5, 6, 6), np.float32)
    with pytest.raises(ValueError, match="out has shape"):
        f32_kernels.conv2d(np.zeros((1, 4, 6, 6), np.float32), conv, 3, 3, 1, 1, None, out[:, :, 1:, 1:].copy())
    with pytest.raises(ValueError, match="packed weight"):  # K = 360: two chunks, the weight has one
        f32_kernels.conv2d(np.zeros((1, 40, 6, 6), np.float32), conv, 3, 3, 1, 1, None, out)
    with pytest.raises(ValueError, match="float32 or float16"):
        f32_kernels.pack_linear_weight(np.zeros((5, 4), np.float64))
    with pytest.raises(ValueError, match="float32 or float16"):
        f32_kernels.linear(np.zeros((2, 4), np.float32), packed.astype(np.float64), None, np.zeros((2, 5), np.float32))


@pytest.mark.skipif(f32_kernels.available(), reason="this CPU has the AVX-512 kernels")
def test_unavailable_raises():
    packed = f32_kernels.pack_linear_weight(np.zeros((5, 4), np.float32))
    with pytest.raises(RuntimeError):
        f32_kernels.linear(np.zeros((2, 4), np.float32), packed, None, np.zeros((2, 5), np.float32))
