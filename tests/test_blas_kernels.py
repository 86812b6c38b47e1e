"""The convolution through BLAS (sdcli.ext.blas_kernels) against numpy_ops.conv2d, and cpu_ops' use of it.

cpu_ops.conv2d runs blas_kernels for every weight not packed for the AVX-512 kernels; its numpy fallback (kept for
builds without a BLAS) is tested here on the same cases. Shapes are awkward on purpose: stride 2 and 3, padding 0,
1 and 2, 1x1 kernels (the direct GEMM and, strided or padded, through im2col), kernels wider than the image, a
1-pixel image, a 1x3 kernel, batch 3, blocks of columns cut small so that a block ends inside an output row, and
small images sharing one sgemm in groups (the last one partial).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from sdcli.ext import blas_kernels
from sdcli.ops import cpu_ops, numpy_ops
from sdcli.ops.parameter import Parameter, Weight


def plain(weight: np.ndarray) -> Parameter:
    """A weight the layers widen at each call (a streamed one): cpu_ops runs it on blas_kernels, unpacked."""
    held = Weight.of(weight)
    return Parameter(Weight(held.data, held.precision, stream=True))

# (rtol, atol as a fraction of max |expected|), as test_ops' "conv2d": the sgemm and numpy's einsum sum the
# Cin*kh*kw products in different orders, ~sqrt(K) float32 ulp of the output scale; a wrong tap, a lost block or a
# misplaced zero of the padding gives errors of order 1.
TOL = (1e-5, 2e-6)

CASES = [  # (batch, in, out, height, width, kh, kw, stride, padding)
    (2, 3, 5, 7, 9, 3, 3, 1, 1),  # 3x3 "same", batch 2, odd sizes
    (1, 4, 6, 8, 8, 3, 3, 2, 1),  # stride 2, padding 1 (the UNet's downsamplers)
    (2, 4, 4, 9, 7, 3, 3, 2, 0),  # stride 2, padding 0 (the VAE encoder pads asymmetrically first)
    (1, 2, 2, 5, 5, 3, 3, 1, 0),  # no padding
    (2, 5, 3, 6, 5, 1, 1, 1, 0),  # 1x1: one GEMM on x itself
    (1, 5, 3, 6, 5, 1, 1, 2, 0),  # 1x1 strided: through im2col
    (1, 5, 3, 4, 3, 1, 1, 1, 1),  # 1x1 padded: a border of bias
    (1, 3, 4, 1, 6, 3, 3, 1, 1),  # one row
    (2, 3, 4, 1, 1, 3, 3, 1, 1),  # a 1x1 image: every tap but the centre in the padding
    (1, 2, 3, 3, 3, 5, 5, 1, 2),  # a kernel larger than the image, padded to fit
    (1, 2, 3, 2, 4, 5, 5, 2, 2),  # the same, strided
    (1, 5, 7, 8, 11, 3, 3, 3, 2),  # stride 3, padding 2
    (2, 6, 9, 7, 10, 1, 3, 1, 1),  # a rectangular kernel
    (3, 8, 16, 16, 16, 3, 3, 1, 1),  # batch 3
]


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    rtol, atol = TOL
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * scale)


def arrays(case, with_bias: bool, seed: int = 0):
    batch, cin, cout, height, width, kh, kw = case[:7]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, cin, height, width)).astype(np.float32)
    weight = rng.standard_normal((cout, cin, kh, kw)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32) if with_bias else None
    return x, weight, bias


def output(x, weight, stride: int, padding: int) -> np.ndarray:
    """An output array of the right shape, filled with NaN: the kernel must write every element."""
    ho = (x.shape[2] + 2 * padding - weight.shape[2]) // stride + 1
    wo = (x.shape[3] + 2 * padding - weight.shape[3]) // stride + 1
    return np.full((x.shape[0], weight.shape[0], ho, wo), np.nan, dtype=np.float32)


def test_blas_name():
    assert blas_kernels.blas_name() == ("accelerate" if sys.platform == "darwin" else "openblas")


def test_cpu_ops_plain_weights_run_the_blas_kernel(monkeypatch):
    calls = []

    class Recording:
        @staticmethod
        def conv2d(*args):
            calls.append(args[2:4])  # (stride, padding)
            return blas_kernels.conv2d(*args)

    monkeypatch.setattr(cpu_ops, "blas_kernels", Recording)
    x, weight, bias = arrays(CASES[1], True)
    cpu_ops.conv2d(x, plain(weight), bias, stride=2, padding=1)
    assert calls == [(2, 1)]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("with_bias", [True, False])
def test_cpu_conv2d(case, with_bias):
    stride, padding = case[7:]
    x, weight, bias = arrays(case, with_bias)
    assert_close(cpu_ops.conv2d(x, plain(weight), bias, stride=stride, padding=padding),
                 numpy_ops.conv2d(x, weight, bias, stride=stride, padding=padding))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_numpy_fallback(monkeypatch, case):
    """The path of builds without a BLAS: blocked im2col and numpy's matmul."""
    monkeypatch.setattr(cpu_ops, "blas_kernels", None)
    stride, padding = case[7:]
    x, weight, bias = arrays(case, True)
    assert_close(cpu_ops.conv2d(x, plain(weight), bias, stride=stride, padding=padding),
                 numpy_ops.conv2d(x, weight, bias, stride=stride, padding=padding))


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("column_bytes", [4, 4 * 9 * 8 * 7])  # one pixel per block; blocks ending inside a row
def test_small_column_blocks(case, column_bytes):
    stride, padding = case[7:]
    x, weight, bias = arrays(case, True)
    out = output(x, weight, stride, padding)
    blas_kernels.conv2d(x, weight, stride, padding, bias, out, column_bytes)
    assert_close(out, numpy_ops.conv2d(x, weight, bias, stride=stride, padding=padding))


@pytest.mark.parametrize("with_bias", [True, False])
def test_small_images_share_an_sgemm(with_bias):
    """Images of fewer than 1024 output pixels go through one sgemm a group at a time: batch 5 of 8x8 images with
    room for 2 per group (K = 72, 2 * 64 * 72 <= 10000 floats of columns) leaves a last group of one."""
    x, weight, bias = arrays((5, 8, 6, 8, 8, 3, 3), with_bias)
    out = output(x, weight, 1, 1)
    blas_kernels.conv2d(x, weight, 1, 1, bias, out, 4 * 10000)
    assert_close(out, numpy_ops.conv2d(x, weight, bias, padding=1))


def test_non_contiguous_inputs():
    x, weight, bias = arrays((2, 6, 4, 9, 7, 3, 3), True)
    expected = numpy_ops.conv2d(x, weight, bias, padding=1)
    x_view = np.ascontiguousarray(x.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)  # the same values, W-major
    padded = np.zeros((2, 6, 9, 14), dtype=np.float32)
    padded[..., ::2] = x  # every other column of a wider array
    for given in (x_view, padded[..., ::2], x.astype(np.float64)):
        assert_close(cpu_ops.conv2d(given, plain(weight), bias, padding=1), expected)
    weight_view = np.ascontiguousarray(weight.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)
    assert_close(cpu_ops.conv2d(x, plain(weight_view), bias, padding=1), expected)
    with pytest.raises(ValueError, match="contiguous"):  # the kernel itself takes C-contiguous arrays only
        blas_kernels.conv2d(x_view, weight, 1, 1, bias, output(x, weight, 1, 1))


def test_float16_weight():
    x, weight, bias = arrays((2, 5, 7, 6, 6, 3, 3), True)
    half = weight.astype(np.float16)
    assert_close(cpu_ops.conv2d(x, plain(half), bias, padding=1), numpy_ops.conv2d(x, half.astype(np.float32), bias,
                                                                             padding=1))


@pytest.mark.parametrize("stride, padding", [(1, 1), (2, 0)])
def test_empty_batch(stride, padding):
    x, weight, bias = arrays((0, 3, 4, 8, 8, 3, 3), True)
    got = cpu_ops.conv2d(x, plain(weight), bias, stride=stride, padding=padding)
    expected = numpy_ops.conv2d(x, weight, bias, stride=stride, padding=padding)
    assert got.shape == expected.shape and got.shape[0] == 0


def test_no_input_channels():
    """K = 0: no products, the output is the bias (zeros without one)."""
    x, weight, bias = arrays((2, 0, 3, 5, 4, 3, 3), True)
    for b in (bias, None):
        assert_close(cpu_ops.conv2d(x, plain(weight), b, padding=1), numpy_ops.conv2d(x, weight, b, padding=1))


def test_kernel_larger_than_padded_input():
    """PyTorch's Conv2d rejects an input smaller than the kernel after padding; so do the kernel and cpu_ops."""
    x, weight, _ = arrays((1, 2, 3, 3, 3, 5, 5), False)
    with pytest.raises(ValueError, match="smaller than the kernel"):
        cpu_ops.conv2d(x, plain(weight), padding=0)
    with pytest.raises(ValueError, match="smaller than the kernel"):
        cpu_ops.conv2d(x[:, :, :2, :2], plain(weight), padding=1)  # 4x4 padded, a 5x5 kernel: "Ho" would be 0


def test_argument_errors():
    x, weight, bias = arrays((1, 4, 5, 6, 6, 3, 3), True)
    out = output(x, weight, 1, 1)
    with pytest.raises(ValueError, match="channels"):
        blas_kernels.conv2d(x[:, :3].copy(), weight, 1, 1, bias, out)
    with pytest.raises(ValueError, match="out has shape"):
        blas_kernels.conv2d(x, weight, 1, 1, bias, out[:, :, 1:].copy())
    with pytest.raises(ValueError, match="bias"):
        blas_kernels.conv2d(x, weight, 1, 1, bias[:4].copy(), out)
    with pytest.raises(ValueError, match="stride"):
        blas_kernels.conv2d(x, weight, 0, 1, bias, out)
    with pytest.raises(ValueError, match="column_bytes"):
        blas_kernels.conv2d(x, weight, 1, 1, bias, out, 0)


def test_release_keeps_results():
    """The column buffer kept between calls is freed and grown again without changing results."""
    x, weight, bias = arrays((1, 6, 5, 12, 12, 3, 3), True)
    first = cpu_ops.conv2d(x, plain(weight), bias, padding=1)
    blas_kernels.release()
    np.testing.assert_array_equal(cpu_ops.conv2d(x, plain(weight), bias, padding=1), first)
