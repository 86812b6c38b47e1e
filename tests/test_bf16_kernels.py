"""The bfloat16 kernels (sdcli.ext.bf16_kernels) against float64 numpy references, at every level the CPU has.

The references round x and the weight to bf16 with sdcli.io.safetensors.float32_to_bf16, widen them back to
float32 and compute the product (or the convolution) in float64. The kernels multiply the same bf16 values exactly
(a product of two bf16 fits in float32) and accumulate in float32, so the only difference is float32 summation in
another order. Shapes are awkward on purpose: M, N, K off the 16 / 32 tile sizes, one row, batch 2, the last block
of rows or pixels partial, several column slices or channel slices per block, K past one chunk or panel.
"""

from __future__ import annotations

import numpy as np
import pytest

from sdcli.ext import bf16_kernels
from sdcli.io.safetensors import bf16_to_float32, float32_to_bf16

LEVELS = ("portable", "avx512_bf16", "amx")

# |result - reference| <= rtol * (the same sum over |a| |b|, plus |bias|), per element. Float32 accumulation of K
# exact products differs from the float64 sum by about sqrt(K) float32 ulps of the sum of magnitudes in practice
# (at K = 2200: ~3e-6 at worst, ~2e-7 measured); a wrong index or a lost tile gives errors of order 1.
TOL = {
    "linear": 1e-5,
    "conv2d": 1e-5,
}


@pytest.fixture(params=LEVELS)
def level(request) -> str:
    if request.param not in bf16_kernels.levels():
        pytest.skip(f"this CPU has no {request.param}")
    return request.param


def as_bf16(x: np.ndarray) -> np.ndarray:
    """x rounded to bf16 (nearest even), as float32."""
    return bf16_to_float32(float32_to_bf16(x))


def assert_close(name: str, out: np.ndarray, expected: np.ndarray, magnitude: np.ndarray) -> None:
    assert out.dtype == np.float32 and out.shape == expected.shape
    error = np.abs(out.astype(np.float64) - expected)
    bound = TOL[name] * magnitude
    worst = np.unravel_index(np.argmax(error - bound), error.shape) if error.size else None
    assert np.all(error <= bound), f"{name}: error {error[worst]:.3g} > bound {bound[worst]:.3g} at {worst}"


def random_linear(rng, m: int, k: int, n: int, with_bias: bool):
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = float32_to_bf16(rng.standard_normal((n, k)).astype(np.float32) / np.sqrt(max(k, 1)))
    bias = rng.standard_normal(n).astype(np.float32) if with_bias else None
    return x, w, bias


def linear_reference(x, w, bias):
    """(expected, magnitude): bf16(x) @ w.T + bias and |bf16(x)| @ |w|.T + |bias|, in float64."""
    xr, wr = as_bf16(x).astype(np.float64), bf16_to_float32(w).astype(np.float64)
    expected, magnitude = xr @ wr.T, np.abs(xr) @ np.abs(wr).T
    if bias is not None:
        expected, magnitude = expected + bias, magnitude + np.abs(bias)
    return expected, magnitude


def conv_reference(x, w, bias, stride: int, padding: int):
    """(expected, magnitude) of conv2d(bf16(x), w) + bias (PyTorch semantics) and of the same over |.|, in float64."""
    xr, wr = as_bf16(x).astype(np.float64), bf16_to_float32(w).astype(np.float64)
    batch, _, h, width = x.shape
    cout, _, kh, kw = w.shape
    ho, wo = (h + 2 * padding - kh) // stride + 1, (width + 2 * padding - kw) // stride + 1
    results = []
    for xs, ws in ((xr, wr), (np.abs(xr), np.abs(wr))):
        padded = np.pad(xs, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
        total = np.zeros((batch, cout, ho, wo))
        for dy in range(kh):
            for dx in range(kw):
                patch = padded[:, :, dy : dy + stride * (ho - 1) + 1 : stride, dx : dx + stride * (wo - 1) + 1 : stride]
                total += np.einsum("oc,bchw->bohw", ws[:, :, dy, dx], patch)  # (B, Cout, Ho, Wo)
        results.append(total)
    if bias is not None:
        results = [results[0] + bias[None, :, None, None], results[1] + np.abs(bias)[None, :, None, None]]
    return results


# ------------------------------------------------------------------------------------------------- layouts


def test_pack_linear_weight_layout():
    rng = np.random.default_rng(0)
    w = rng.integers(0, 2**16, size=(45, 37), dtype=np.uint16)
    packed = bf16_kernels.pack_linear_weight(w)
    assert packed.dtype == np.uint16 and packed.shape == (2, 32, 32, 2)  # Np = 64, Kp = 64
    s, p, j, t = np.meshgrid(*(np.arange(size) for size in packed.shape), indexing="ij")
    n, k = 32 * s + j, 2 * p + t  # [s, p, j, t] = w[32s + j, 2p + t], zero in the padding
    inside = (n < 45) & (k < 37)
    assert np.array_equal(packed[inside], w[n[inside], k[inside]])
    assert not packed[~inside].any()


def test_pack_conv_weight_layout():
    rng = np.random.default_rng(1)
    w = rng.integers(0, 2**16, size=(5, 3, 3, 2), dtype=np.uint16)  # odd Cin: a zero channel in every tap
    packed = bf16_kernels.pack_conv_weight(w)
    assert packed.dtype == np.uint16 and packed.shape == (5, 32)  # K = 3 * 2 taps * Cin2 4 = 24 -> Kp = 32
    taps = packed[:, :24].reshape(5, 3, 2, 4)  # [o, dy, dx, ci] = w[o, ci, dy, dx]
    assert np.array_equal(taps[..., :3], w.transpose(0, 2, 3, 1))
    assert not taps[..., 3].any() and not packed[:, 24:].any()


# -------------------------------------------------------------------------------------------------- linear

LINEAR_SHAPES = [  # (M, K, N)
    (1, 1, 1),
    (3, 17, 33),  # one block of rows, N split into column slices
    (17, 33, 77),
    (77, 64, 17),
    (130, 40, 3),  # two blocks of rows (128 + 2)
    (33, 320, 48),
    (5, 2100, 40),  # K in two chunks
]


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("m,k,n", LINEAR_SHAPES)
def test_linear(level, m, k, n, with_bias):
    rng = np.random.default_rng(m * 10007 + k * 101 + n)
    x, w, bias = random_linear(rng, m, k, n, with_bias)
    out = np.full((m, n), np.nan, dtype=np.float32)
    bf16_kernels.linear(x, bf16_kernels.pack_linear_weight(w), bias, out, level=level)
    assert_close("linear", out, *linear_reference(x, w, bias))


def aligned_empty(shape, alignment: int = 64) -> np.ndarray:
    """An uninitialised float32 array whose data starts on an `alignment`-byte boundary."""
    size = int(np.prod(shape))
    raw = np.empty(size + alignment // 4, dtype=np.float32)
    start = (-raw.ctypes.data % alignment) // 4
    return raw[start : start + size].reshape(shape)


@pytest.mark.parametrize("m,k,n", [(130, 40, 48), (64, 2100, 32)])  # streaming in the last of two chunks of k
def test_linear_streaming_stores(level, m, k, n):
    rng = np.random.default_rng(4)
    x, w, bias = random_linear(rng, m, k, n, True)
    out = aligned_empty((m, n))
    out[:] = np.nan
    bf16_kernels.linear(x, bf16_kernels.pack_linear_weight(w), bias, out, level=level, stream=True)
    assert_close("linear", out, *linear_reference(x, w, bias))
    with pytest.raises(ValueError, match="aligned"):
        misaligned = aligned_empty((m * n + 1,))[1:].reshape(m, n)  # 4 bytes past a 64-byte boundary
        bf16_kernels.linear(x, bf16_kernels.pack_linear_weight(w), bias, misaligned, stream=True)


def test_linear_rounds_x_to_nearest_even(level):
    """With an identity weight each output is one rounded input: bit-exact bf16 rounding, ties to even."""
    rng = np.random.default_rng(2)
    k = 40
    x = (rng.standard_normal((9, k)) * 10).astype(np.float32)
    one = np.float32(1.0).view(np.uint32)
    x[0, :4] = np.array([one + 0x8000, one + 0x18000, one + 0x7FFF, one + 0x8001], dtype=np.uint32).view(np.float32)
    x[1, :2] = -x[0, :2]  # ties: 1 + 2^-8 rounds down to 1, 1 + 3 * 2^-8 up to 1 + 2^-6; and their negatives
    eye = float32_to_bf16(np.eye(k, dtype=np.float32))
    out = np.empty_like(x)
    bf16_kernels.linear(x, bf16_kernels.pack_linear_weight(eye), None, out, level=level)
    assert np.array_equal(out, as_bf16(x))
    assert out[0, 0] == 1.0 and out[0, 1] == 1.0 + 2.0**-6 and out[1, 0] == -1.0


def test_nan_and_inf_propagate(level):
    """A NaN or an inf in x reaches exactly the outputs that read it, as in float arithmetic."""
    x = np.ones((3, 40), np.float32)
    x[0, 5], x[1, 7] = np.nan, np.inf
    w = float32_to_bf16(np.random.default_rng(5).uniform(0.1, 1.0, (5, 40)).astype(np.float32))  # all positive
    out = np.empty((3, 5), np.float32)
    bf16_kernels.linear(x, bf16_kernels.pack_linear_weight(w), None, out, level=level)
    assert np.isnan(out[0]).all() and np.isposinf(out[1]).all() and np.isfinite(out[2]).all()
    xc = np.ones((1, 4, 6, 7), np.float32)
    xc[0, 1, 2, 3] = np.nan
    wc = float32_to_bf16(np.ones((2, 4, 3, 3), np.float32))
    outc = np.empty((1, 2, 6, 7), np.float32)
    bf16_kernels.conv2d(xc, bf16_kernels.pack_conv_weight(wc), 3, 3, 1, 1, None, outc, level=level)
    expected = np.zeros((6, 7), bool)
    expected[1:4, 2:5] = True  # the 3 x 3 outputs whose window holds (2, 3)
    assert np.array_equal(np.isnan(outc[0, 0]), expected) and np.array_equal(np.isnan(outc[0, 1]), expected)


def test_linear_empty_k_gives_the_bias(level):
    bias = np.arange(3, dtype=np.float32)
    w = np.zeros((3, 0), dtype=np.uint16)
    out = np.full((2, 3), np.nan, dtype=np.float32)
    bf16_kernels.linear(np.zeros((2, 0), np.float32), bf16_kernels.pack_linear_weight(w), bias, out, level=level)
    assert np.array_equal(out, np.broadcast_to(bias, (2, 3)))


def test_linear_levels_agree_on_large_values():
    """Large magnitudes and cancellation: every level within TOL of the reference."""
    rng = np.random.default_rng(3)
    x, w, bias = random_linear(rng, 40, 96, 64, True)
    x[::3] *= 1e20
    expected, magnitude = linear_reference(x, w, bias)
    for name in bf16_kernels.levels():
        out = np.empty((40, 64), dtype=np.float32)
        bf16_kernels.linear(x, bf16_kernels.pack_linear_weight(w), bias, out, level=name)
        assert_close("linear", out, expected, magnitude)


# -------------------------------------------------------------------------------------------------- conv2d

CONV_CASES = [  # (B, Cin, Cout, H, W, kh, kw, stride, padding)
    (2, 4, 5, 9, 7, 3, 3, 1, 1),  # K = 36: one k-group of 32 and a padded one
    (2, 4, 33, 17, 13, 3, 3, 2, 1),  # stride 2, padding 1; Cout off 32, two channel slices
    (2, 40, 70, 20, 19, 1, 1, 1, 0),  # 1 x 1, stride 1: no im2col; 380 pixels = a block of 256 and a partial one
    (1, 3, 3, 5, 6, 1, 1, 2, 0),  # 1 x 1, stride 2
    (1, 2, 3, 4, 4, 3, 3, 2, 0),
    (1, 3, 6, 6, 7, 1, 3, 1, 1),  # kh != kw
    (1, 5, 4, 3, 3, 3, 3, 1, 2),  # padding larger than the kernel's reach: zero rows and columns of output
    (1, 240, 8, 16, 16, 3, 3, 1, 1),  # K = 2160: the im2col panel in two blocks of k
    (1, 3, 4, 33, 35, 3, 3, 2, 1),  # stride 2 over output rows of 18: chunks of 16 in one row and across rows
    (1, 3, 5, 40, 40, 1, 1, 2, 0),  # 1 x 1, stride 2, output rows of 20
    (2, 2, 3, 20, 40, 3, 3, 3, 1),  # stride 3
    (5, 3, 4, 3, 3, 3, 3, 1, 1),  # one block of columns across five images
    (1, 2, 3, 2, 600, 3, 3, 1, 1),  # output rows of 600: blocks of columns within and across rows
]


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda case: "x".join(map(str, case)))
def test_conv2d(level, case, with_bias):
    batch, cin, cout, h, w, kh, kw, stride, padding = case
    rng = np.random.default_rng(sum(case))
    x = rng.standard_normal((batch, cin, h, w)).astype(np.float32)
    weight = float32_to_bf16(rng.standard_normal((cout, cin, kh, kw)).astype(np.float32))
    bias = rng.standard_normal(cout).astype(np.float32) if with_bias else None
    expected, magnitude = conv_reference(x, weight, bias, stride, padding)
    out = np.full(expected.shape, np.nan, dtype=np.float32)
    bf16_kernels.conv2d(x, bf16_kernels.pack_conv_weight(weight), kh, kw, stride, padding, bias, out, level=level)
    assert_close("conv2d", out, expected, magnitude)


# -------------------------------------------------------------------------------------- levels and errors


def test_capability_and_environment(monkeypatch):
    monkeypatch.delenv("SDCLI_BF16_KERNEL", raising=False)
    best = bf16_kernels.capability()
    assert best == bf16_kernels.levels()[-1] and best in LEVELS
    monkeypatch.setenv("SDCLI_BF16_KERNEL", "portable")
    assert bf16_kernels.capability() == "portable"
    monkeypatch.setenv("SDCLI_BF16_KERNEL", "amx")  # never above what the CPU has
    assert bf16_kernels.capability() == best
    monkeypatch.setenv("SDCLI_BF16_KERNEL", "fast")
    with pytest.raises(ValueError, match="SDCLI_BF16_KERNEL"):
        bf16_kernels.capability()


def test_unsupported_or_unknown_level():
    x, w = np.zeros((2, 4), np.float32), bf16_kernels.pack_linear_weight(np.zeros((3, 4), np.uint16))
    out = np.empty((2, 3), np.float32)
    with pytest.raises(ValueError, match="not one of"):
        bf16_kernels.linear(x, w, None, out, level="sse")
    missing = [name for name in LEVELS if name not in bf16_kernels.levels()]
    for name in missing:
        with pytest.raises(ValueError, match="lacks"):
            bf16_kernels.linear(x, w, None, out, level=name)


def test_shape_and_dtype_errors():
    x = np.zeros((2, 40), np.float32)
    w = bf16_kernels.pack_linear_weight(np.zeros((3, 40), np.uint16))
    with pytest.raises(ValueError, match="uint16"):
        bf16_kernels.pack_linear_weight(np.zeros((3, 40), np.float32))
    with pytest.raises(ValueError, match="uint16"):
        bf16_kernels.pack_conv_weight(np.zeros((3, 40), np.uint16))
    with pytest.raises(ValueError, match="does not fit"):
        bf16_kernels.linear(np.zeros((2, 80), np.float32), w, None, np.empty((2, 3), np.float32))
    with pytest.raises(ValueError, match="does not fit"):
        bf16_kernels.linear(x, w, None, np.empty((2, 40), np.float32))
    with pytest.raises(ValueError, match="rows"):
        bf16_kernels.linear(x, w, None, np.empty((3, 3), np.float32))
    with pytest.raises(ValueError, match="bias"):
        bf16_kernels.linear(x, w, np.zeros(4, np.float32), np.empty((2, 3), np.float32))
    with pytest.raises(ValueError, match="bias"):
        bf16_kernels.linear(x, w, np.zeros(3, np.float64), np.empty((2, 3), np.float32))
    cw = bf16_kernels.pack_conv_weight(np.zeros((5, 4, 3, 3), np.uint16))
    xc = np.zeros((1, 4, 8, 8), np.float32)
    with pytest.raises(ValueError, match="out has shape"):
        bf16_kernels.conv2d(xc, cw, 3, 3, 1, 1, None, np.empty((1, 5, 6, 6), np.float32))
    with pytest.raises(ValueError, match="columns"):
        bf16_kernels.conv2d(xc, cw, 1, 1, 1, 0, None, np.empty((1, 5, 8, 8), np.float32))
    with pytest.raises(ValueError, match="smaller than the kernel"):
        tiny = np.zeros((1, 4, 1, 1), np.float32)
        bf16_kernels.conv2d(tiny, cw, 3, 3, 1, 0, None, np.empty((1, 5, 1, 1), np.float32))
    with pytest.raises(ValueError, match="stride"):
        bf16_kernels.conv2d(xc, cw, 3, 3, 0, 1, None, np.empty((1, 5, 8, 8), np.float32))


# ----------------------------------------------------------------------------------------------- attention

# attention: |out - reference| <= ATTENTION_TOL * (softmax(scores) @ |v|), per element. The reference is the float32
# numpy attention of the bf16-rounded q, k, v, so what differs is the rounding of the probabilities p to bf16 for
# p @ v (each off by at most 2^-9 relative, while the float32 sum of the unrounded p normalises: the error is at
# most 2^-9 of softmax @ |v|), the float32 scores summed in another order and the exp polynomial (2.7e-6): 2^-8
# leaves a factor 2 for the last two. A wrong mask, index or rescaling gives errors of order 1.
# attention_torch: against torch's bf16 scaled_dot_product_attention, whose output is rounded to bf16 as well
# (another 2^-9 relative of |out| <= softmax @ |v|) and whose p rounds at other maxima: 2^-7.
ATTENTION_TOL = {
    "attention": 2.0**-8,
    "attention_torch": 2.0**-7,
}

ATTENTION_SHAPES = [  # (B, H, Tq, Tk, d, dv, causal)
    (1, 1, 1, 1, 8, 8, False),
    (2, 3, 5, 7, 8, 8, False),  # one partial block of queries and of keys
    (2, 2, 70, 100, 40, 40, False),  # Tq, Tk off the 32-query and 64-key blocks
    (1, 2, 33, 77, 40, 40, False),  # cross-attention's 77 keys
    (1, 2, 64, 64, 64, 64, False),  # exact blocks, d = 64 (two k-groups, no padding)
    (1, 1, 40, 130, 80, 80, False),  # three key blocks, the last of 2
    (1, 1, 17, 77, 160, 160, False),  # d = 160: five k-groups
    (1, 1, 20, 90, 40, 8, False),  # dv != d
    (1, 1, 20, 90, 8, 160, False),
    (2, 2, 77, 77, 40, 40, True),  # causal: the text encoder's shape
    (1, 1, 130, 130, 64, 64, True),  # causal over three key blocks and five query blocks
]


def attention_reference(q, k, v, causal: bool, scale: float):
    """(expected, magnitude): the float32 attention of the bf16-rounded q, k, v, and the same with |v|."""
    qr, kr, vr = as_bf16(q), as_bf16(k), as_bf16(v)
    if k.shape[2] == 0:
        zeros = np.zeros(q.shape[:3] + v.shape[3:], np.float32)
        return zeros, zeros
    from sdcli.ops import numpy_ops

    return (numpy_ops.attention(qr, kr, vr, causal=causal, scale=scale),
            numpy_ops.attention(qr, kr, np.abs(vr), causal=causal, scale=scale))


def random_attention(rng, b, h, tq, tk, d, dv, spread: float = 1.0):
    q = (rng.standard_normal((b, h, tq, d)) * spread).astype(np.float32)
    k = (rng.standard_normal((b, h, tk, d)) * spread).astype(np.float32)
    v = rng.standard_normal((b, h, tk, dv)).astype(np.float32)
    return q, k, v


def check_attention(q, k, v, causal, scale, level, name="attention"):
    out = np.full(q.shape[:3] + v.shape[3:], np.nan, np.float32)
    bf16_kernels.attention(q, k, v, out, causal, scale, level=level)
    expected, magnitude = attention_reference(q, k, v, causal, scale)
    error = np.abs(out.astype(np.float64) - expected)
    bound = ATTENTION_TOL[name] * magnitude
    worst = np.unravel_index(np.argmax(error - bound), error.shape) if error.size else None
    assert np.all(error <= bound), f"{name}: error {error[worst]:.3g} > bound {bound[worst]:.3g} at {worst}"
    return out


@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=lambda shape: "x".join(map(str, shape)))
def test_attention(level, shape):
    b, h, tq, tk, d, dv, causal = shape
    rng = np.random.default_rng(sum(shape))
    q, k, v = random_attention(rng, b, h, tq, tk, d, dv)
    check_attention(q, k, v, causal, 1.0 / np.sqrt(d), level)


def test_attention_large_scores(level):
    """scale 1 and |q|, |k| ~ 4: scores of several hundred, one key dominating: no overflow, no lost rows."""
    rng = np.random.default_rng(6)
    q, k, v = random_attention(rng, 1, 2, 40, 150, 40, 40, spread=4.0)
    out = check_attention(q, k, v, False, 1.0, level)
    assert np.isfinite(out).all()


def test_attention_negative_scale(level):
    rng = np.random.default_rng(7)
    q, k, v = random_attention(rng, 1, 1, 35, 70, 40, 40)
    check_attention(q, k, v, False, -0.3, level)


def test_attention_causal_hides_future_keys(level):
    """Huge future keys would dominate every row they reach: the mask must act before the running max."""
    rng = np.random.default_rng(8)
    q, k, v = random_attention(rng, 1, 1, 100, 100, 40, 40)
    q[:] = np.abs(q)
    k[0, 0, 50:] = 100.0  # scores ~ 100 * sum |q| for the queries before 50, if they saw these keys
    out = check_attention(q, k, v, True, 1.0 / np.sqrt(40), level)
    # query 0 sees key 0 alone: its output is bf16(v[0]) up to the float32 normalisation
    assert np.allclose(out[0, 0, 0], as_bf16(v[0, 0, 0]), rtol=1e-5, atol=0)


def test_attention_interleaved_heads(level):
    """(B, H, T, hs) views of (B, T, H, hs) projections, out too: bit for bit the result of contiguous copies."""
    rng = np.random.default_rng(9)
    b, h, tq, tk, d, dv = 2, 3, 45, 80, 40, 24
    qp = rng.standard_normal((b, tq, h, d)).astype(np.float32)  # (B, T, nh, hs)
    kp = rng.standard_normal((b, tk, h, d)).astype(np.float32)
    vp = rng.standard_normal((b, tk, h, dv)).astype(np.float32)
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (qp, kp, vp))  # (B, nh, T, hs) views
    out_proj = np.full((b, tq, h, dv), np.nan, np.float32)
    bf16_kernels.attention(q, k, v, out_proj.transpose(0, 2, 1, 3), False, 0.2, level=level)
    contiguous = np.full((b, h, tq, dv), np.nan, np.float32)
    bf16_kernels.attention(*(np.ascontiguousarray(x) for x in (q, k, v)), contiguous, False, 0.2, level=level)
    assert np.array_equal(out_proj.transpose(0, 2, 1, 3), contiguous)
    check_attention(q, k, v, False, 0.2, level)


def test_attention_no_keys_gives_zeros(level):
    q = np.ones((1, 2, 5, 8), np.float32)
    k, v = np.zeros((1, 2, 0, 8), np.float32), np.zeros((1, 2, 0, 16), np.float32)
    out = np.full((1, 2, 5, 16), np.nan, np.float32)
    bf16_kernels.attention(q, k, v, out, False, 1.0, level=level)
    assert not out.any()
    bf16_kernels.attention(q, k, v, out, True, 1.0, level=level)
    assert not out.any()


def test_attention_against_torch(level, torch):
    rng = np.random.default_rng(11)
    q, k, v = random_attention(rng, 2, 2, 70, 77, 40, 40)
    out = np.empty((2, 2, 70, 40), np.float32)
    bf16_kernels.attention(q, k, v, out, False, 1.0 / np.sqrt(40), level=level)
    expected = torch.nn.functional.scaled_dot_product_attention(
        *(torch.from_numpy(x).bfloat16() for x in (q, k, v))).float().numpy()
    _, magnitude = attention_reference(q, k, v, False, 1.0 / np.sqrt(40))
    assert np.all(np.abs(out - expected) <= ATTENTION_TOL["attention_torch"] * magnitude)


def test_attention_errors():
    q, k, v = np.zeros((1, 2, 3, 8), np.float32), np.zeros((1, 2, 4, 8), np.float32), np.zeros((1, 2, 4, 5), np.float32)
    out = np.empty((1, 2, 3, 5), np.float32)
    with pytest.raises(ValueError, match="mismatched"):
        bf16_kernels.attention(q, k[:, :, :, :4], v, out, False, 1.0)
    with pytest.raises(ValueError, match="mismatched"):
        bf16_kernels.attention(q, k, v[:, :, :3], out, False, 1.0)
    with pytest.raises(ValueError, match="out has shape"):
        bf16_kernels.attention(q, k, v, np.empty((1, 2, 3, 6), np.float32), False, 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        bf16_kernels.attention(q, np.zeros((1, 2, 4, 16), np.float32)[..., ::2], v, out, False, 1.0)
    with pytest.raises(ValueError, match="not one of"):
        bf16_kernels.attention(q, k, v, out, False, 1.0, level="sse")
