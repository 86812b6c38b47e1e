"""The glue ops (element-wise, layout, embeddings, conv1d/conv3d, rms_norm, rope, masked attention, layer_norm
without affine parts) of every backend in ``sdcli.ops.BACKENDS`` against numpy_ops (inputs through ``from_host``,
weights through ``prepare``, results through ``to_host``), and numpy_ops against torch, diffusers (test-only, through
their fixtures) or an independent numpy formula."""

from __future__ import annotations

import numpy as np
import pytest

from sdcli.ops import BACKENDS, Ops, get_ops, numpy_ops
from sdcli.ops.parameter import Parameter, Weight

EPS = float(np.finfo(np.float32).eps)  # 1.19e-7, one float32 ulp at 1

# (rtol, atol as a fraction of max |expected|).
TOL = {
    # data movement (layout, resize, embedding rows, clip), IEEE-rounded +, *, /, and any op where the backend runs
    # numpy_ops' own function (the cpu backend imports the glue ops from it): the same bits.
    "exact": (0.0, 0.0),
    # x * (1 + scale) + shift: three float32 roundings against the float64 formula (a fused multiply-add has two).
    "modulate": (2 * EPS, 4 * EPS),
    # exp and tanh of two libms (numpy's SIMD ones, torch's Sleef): each within an ulp or two, element by element.
    "libm": (4 * EPS, 0.0),
    # as test_ops: the mean and variance accumulate in another order (double in a kernel, pairwise float32 in numpy).
    "layer_norm": (1e-5, 1e-6),
    # mean of squares pairwise in float32 (numpy) or another order (torch), divide by sqrt vs multiply by rsqrt.
    "rms_norm": (1e-5, 1e-6),
    # as test_ops' conv2d: a sum of Cin * kernel products in another order, ~sqrt(K) ulp of the output scale.
    "conv": (1e-5, 2e-6),
    # as test_ops: torch rounds its bf16 output to bf16 as well (one more rounding): bf16's own precision.
    "bf16_products": (2**-8, 2**-8),
    # even * cos - odd * sin in float32 against the float64 complex product: a few ulp of the pair's magnitude.
    "rope": (2 * EPS, 4 * EPS),
    # before * (1 - w) + after * w: numpy rounds w, then 1 - w, in float32; diffusers 1 - y / extent in double.
    "blend": (2 * EPS, 2 * EPS),
    # a GEMM over a piece of rows against one over all rows: the BLAS may pick other kernels (as test_ops' linear).
    "map_rows": (1e-5, 1e-6),
    # numpy's and torch's exp of the frequencies differ by an ulp: so do the angles t * f, 2^-14 for t in [512, 1024)
    # (measured: 6.1e-5 at t = 999), and their sines and cosines; twice that, of the output scale (1).
    "timestep_embedding": (0.0, 2**-13),
}
# attention (test_ops' bound): ATTENTION_ULPS * EPS * max(1, max |score + mask|) * max |v|.
ATTENTION_ULPS = 4


@pytest.fixture(scope="module", params=BACKENDS, ids=str)
def backend(request) -> Ops:
    """Each backend of ``sdcli.ops.BACKENDS`` in turn."""
    return get_ops(request.param)


def random(shape: tuple[int, ...], seed: int = 0, magnitude: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * magnitude).astype(np.float32)


def assert_close(actual, expected, kind: str) -> None:
    rtol, atol = TOL[kind]
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == np.float32 and actual.shape == expected.shape, (actual.dtype, actual.shape, expected.shape)
    if rtol == atol == 0.0:
        np.testing.assert_array_equal(actual, expected, err_msg=kind)
        return
    finite = np.isfinite(expected)
    scale = float(np.abs(expected[finite]).max()) if finite.any() else 0.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * scale, equal_nan=True, err_msg=kind)


def tolerance(backend: Ops, op: str, kind: str) -> str:
    """``kind``, or "exact" where the backend's op is numpy_ops' own function."""
    return "exact" if getattr(backend, op) is getattr(numpy_ops, op) else kind


def on(backend: Ops, op: str, *args, **options):
    """``op`` of ``backend``, float32 arrays (in lists too) uploaded by from_host; the result back on the host."""
    def upload(value):
        if isinstance(value, list):
            return [upload(item) for item in value]
        return backend.from_host(value) if isinstance(value, np.ndarray) and value.dtype == np.float32 else value

    result = getattr(backend, op)(*map(upload, args), **{key: upload(value) for key, value in options.items()})
    return backend.to_host(result)


def check(backend: Ops, op: str, kind: str, *args, **options) -> np.ndarray:
    """The backend's ``op`` equals numpy_ops' to ``kind`` (exactly where it is numpy_ops' own function)."""
    expected = getattr(numpy_ops, op)(*args, **options)
    assert_close(on(backend, op, *args, **options), expected, tolerance(backend, op, kind))
    return expected


def held(backend: Ops, array: np.ndarray, precision: str) -> Parameter:
    """A float32 array held at ``precision`` (fp32, fp16, bf16 bits) and prepared by ``backend``."""
    return backend.prepare(Weight.of(numpy_ops.weight_from_float32(array, precision), precision))


# -- the host boundary and element-wise ops -----------------------------------------------------------------------

@pytest.mark.parametrize("x", [random((2, 3, 5)), np.float32(2.5), np.zeros((0, 3), np.float32),
                               np.linspace(-3, 3, 7)], ids=["float32", "0-d", "empty", "float64"])
def test_host_round_trip(backend, x):
    """to_host(from_host(x)) gives x's values as float32, its shape kept."""
    back = backend.to_host(backend.from_host(x))
    assert isinstance(back, np.ndarray) and back.dtype == np.float32 and back.shape == np.shape(x)
    np.testing.assert_array_equal(back, np.asarray(x, dtype=np.float32))


NARROWED = np.concatenate([random((999,), magnitude=3), np.array(
    [0.0, -0.0, 1e-40, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-11, 1 + 3 * 2**-11, 65504, 65520, 7e4, 3.4e38, np.inf,
     -np.inf, np.nan], np.float32)])  # ties to even at both precisions, subnormal, fp16's largest and overflow


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_weight_from_float32(backend, precision, torch):
    """Holding float32 values at a precision rounds to nearest even as torch's casts (inf beyond range, nan kept)."""
    got, expected = backend.weight_from_float32(NARROWED, precision), numpy_ops.weight_from_float32(NARROWED, precision)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    reference = torch.from_numpy(NARROWED).to(dtype).view(torch.int32 if precision == "fp32" else torch.int16).numpy()
    nan = np.isnan(NARROWED)
    for bits in (got, expected):
        assert bits.dtype == {"fp32": np.float32, "fp16": np.float16, "bf16": np.uint16}[precision]
        assert np.isnan(numpy_ops.weight_float32(bits, precision)[nan]).all()
        np.testing.assert_array_equal(bits[~nan].view(reference.dtype), reference[~nan])


Y_OPERANDS = [random((2, 7, 9), 1) + 3, random((9,), 1) + 3, random((2, 1, 9), 1) + 3, 3, 0.1, -7.25]
Y_IDS = ["same shape", "row", "per batch", "int", "0.1", "-7.25"]


@pytest.mark.parametrize("op,formula", [("add", np.add), ("mul", np.multiply), ("div", np.divide)])
@pytest.mark.parametrize("y", Y_OPERANDS, ids=Y_IDS)
def test_arithmetic(backend, op, formula, y):
    """add, mul and div round once: the float64 result (a scalar taken as float32) rounded to float32."""
    x = random((2, 7, 9))
    y64 = np.float64(np.float32(y)) if np.isscalar(y) else y.astype(np.float64)
    expected = formula(x.astype(np.float64), y64).astype(np.float32)
    assert_close(getattr(numpy_ops, op)(x, y), expected, "exact")
    assert_close(on(backend, op, x, y), expected, "exact")


@pytest.mark.parametrize("y", Y_OPERANDS, ids=Y_IDS)
def test_add_in_place(backend, y):
    """add_ writes x + y into x's own storage and returns that array."""
    x = backend.from_host(random((2, 7, 9)))
    expected = numpy_ops.add(backend.to_host(x).copy(), y)
    result = backend.add_(x, backend.from_host(y) if isinstance(y, np.ndarray) else y)
    assert result is x
    assert_close(backend.to_host(x), expected, "exact")


@pytest.mark.parametrize("axis,start,length", [(1, 0, 3), (1, 2, 5), (-2, 4, 3), (2, 0, 9), (0, 1, 1)], ids=str)
def test_add_into(backend, axis, start, length):
    """add_into_ adds y into the slice start:start + len(y) of one axis of x, in x's own storage; the rest of x
    unchanged."""
    x_host = random((2, 7, 9))
    shape = list(x_host.shape)
    shape[axis] = length
    y = random(tuple(shape), 1)
    expected = x_host.copy()
    index = [slice(None)] * 3
    index[axis] = slice(start, start + length)
    expected[tuple(index)] = expected[tuple(index)] + y
    x = backend.from_host(x_host)
    assert backend.add_into_(x, backend.from_host(y), axis, start) is x
    assert_close(backend.to_host(x), expected, "exact")


def test_div_is_not_mul_by_the_reciprocal(backend):
    """div rounds once: on some inputs x / y differs from x * (1 / y), which rounds twice."""
    x, y = random((1000,), 1), random((1000,), 2) + np.float32(0.1)
    divided, multiplied = on(backend, "div", x, y), on(backend, "mul", x, np.float32(1) / y)
    assert (divided != multiplied).any()


def test_modulate(backend):
    """modulate is x * (1 + scale) + shift, scale and shift broadcast per batch as DiT blocks pass them."""
    x, scale, shift = random((2, 7, 9)), random((2, 1, 9), 1), random((2, 1, 9), 2)
    expected = check(backend, "modulate", "modulate", x, scale, shift)
    x64, scale64, shift64 = (a.astype(np.float64) for a in (x, scale, shift))
    assert_close(expected, (x64 * (1 + scale64) + shift64).astype(np.float32), "modulate")


UNARY_INPUT = np.concatenate([np.linspace(-87, 88, 3501, dtype=np.float32), random((500,), magnitude=3),
                              np.array([0.0, -0.0, 1e-30, 89.0, np.inf, -np.inf, np.nan], np.float32)])


@pytest.mark.parametrize("op", ["exp", "tanh"])
def test_exp_tanh(backend, op, torch):
    """exp and tanh as torch's, element by element (overflow to inf, -inf to 0 and -1, nan kept)."""
    with np.errstate(over="ignore"):
        expected = check(backend, op, "libm", UNARY_INPUT)
    reference = getattr(torch, op)(torch.from_numpy(UNARY_INPUT)).numpy()
    np.testing.assert_allclose(expected, reference, rtol=TOL["libm"][0], atol=0, equal_nan=True)


@pytest.mark.parametrize("low,high", [(-1.0, 1.0), (0.5, 0.5), (-np.inf, 0.0)])
def test_clip(backend, low, high, torch):
    """clip limits x to [low, high] as torch.clamp does (nan stays nan, low == high gives a constant)."""
    x = np.concatenate([random((50,), magnitude=2), np.array([np.inf, -np.inf, np.nan], np.float32)])
    expected = check(backend, "clip", "exact", x, low, high)
    assert_close(expected, torch.clamp(torch.from_numpy(x), low, high).numpy(), "exact")


# -- layout -------------------------------------------------------------------------------------------------------

def test_layout_ops(backend, torch):
    """reshape, permute, concat and pad give the values of torch's reshape, permute, cat and F.pad."""
    x, t = random((2, 3, 5, 7)), torch.from_numpy(random((2, 3, 5, 7)))
    for shape in [(6, 35), (2, 3, 35, 1), (210,)]:
        assert_close(check(backend, "reshape", "exact", x, shape), t.reshape(shape).numpy(), "exact")
    for axes in [(0, 2, 3, 1), (3, 2, 1, 0), (0, 1, 2, 3)]:
        assert_close(check(backend, "permute", "exact", x, axes), t.permute(axes).numpy(), "exact")
    pieces = [random((2, 3, n, 7), n) for n in (1, 0, 4)]  # an empty piece among them
    for axis in (2, -2):
        expected = check(backend, "concat", "exact", pieces, axis)
        assert_close(expected, torch.cat([torch.from_numpy(p) for p in pieces], dim=axis).numpy(), "exact")
    widths = ((0, 0), (1, 0), (0, 2), (3, 1))  # torch's F.pad takes the last axis first
    expected = check(backend, "pad", "exact", x, widths)
    torch_widths = [w for pair in reversed(widths) for w in pair]
    assert_close(expected, torch.nn.functional.pad(t, torch_widths).numpy(), "exact")


@pytest.mark.parametrize("axis,start,stop", [(1, 0, 3), (1, 1, 2), (-1, 2, 7), (3, -3, 7), (2, -4, -1), (2, 2, 2),
                                             (-1, 0, 0), (1, 3, 3), (0, 0, 2)], ids=str)
def test_narrow(backend, axis, start, stop):
    """narrow is the Python slice start:stop of one axis (negatives count from the end; start == stop: empty)."""
    x = random((2, 3, 5, 7))
    index = [slice(None)] * 4
    index[axis] = slice(start, stop)
    assert_close(check(backend, "narrow", "exact", x, axis, start, stop), x[tuple(index)], "exact")


@pytest.mark.parametrize("heads", [1, 3, 5])
def test_merge_heads(backend, heads):
    """merge_heads inverts split_heads: (B, H, T, hs) -> (B, T, H * hs), head h in channels h*hs .. (h+1)*hs."""
    x = random((2, 7, 15))
    split = numpy_ops.split_heads(x, heads)
    merged = check(backend, "merge_heads", "exact", np.ascontiguousarray(split))
    assert_close(merged, x, "exact")
    assert_close(backend.to_host(backend.merge_heads(backend.split_heads(backend.from_host(x), heads))), x, "exact")


@pytest.mark.parametrize("size_in,size_out", [((2, 9), (3, 18)), ((5, 5), (3, 7)), ((9, 2), (18, 3)),
                                              ((1, 4), (4, 1)), ((13, 7), (5, 13)), ((37, 64), (111, 80))], ids=str)
def test_resize_nearest(backend, size_in, size_out, torch):
    """resize_nearest picks torch's rows and columns: interpolate(size=..., mode="nearest")."""
    x = random((2, 3, *size_in))
    expected = check(backend, "resize_nearest", "exact", x, size_out)
    reference = torch.nn.functional.interpolate(torch.from_numpy(x), size=size_out, mode="nearest").numpy()
    assert_close(expected, reference, "exact")


@pytest.mark.parametrize("axis", [2, 3, -1])
@pytest.mark.parametrize("sizes,extent", [((6, 5), 3), ((4, 9), 4), ((3, 8), 6), ((8, 2), 5), ((5, 5), 0)], ids=str)
def test_blend(backend, axis, sizes, extent, diffusers, torch):
    """blend_ is diffusers' AutoencoderKL.blend_v (axis 2) / blend_h (axis 3) in place in after, before unchanged."""
    before, after = (random((2, 3, n, 7) if axis == 2 else (2, 3, 7, n), seed) for seed, n in enumerate(sizes))
    blend = diffusers.AutoencoderKL.blend_v if axis == 2 else diffusers.AutoencoderKL.blend_h
    reference = blend(None, torch.from_numpy(before.copy()), torch.from_numpy(after.copy()), extent).numpy()
    expected = after.copy()
    assert numpy_ops.blend_(before.copy(), expected, extent, axis) is None
    assert_close(expected, reference, "blend")
    got_before, got_after = backend.from_host(before.copy()), backend.from_host(after.copy())
    assert backend.blend_(got_before, got_after, extent, axis) is None
    assert_close(backend.to_host(got_after), expected, tolerance(backend, "blend_", "blend"))
    np.testing.assert_array_equal(backend.to_host(got_before), before)


@pytest.mark.parametrize("rows", [1, 4, 14, 100])  # one row, uneven pieces (4 + 4 + 4 + 2), all rows, more
def test_map_rows(backend, rows):
    """map_rows gives the whole call's result for row-independent chains, in pieces of at most ``rows`` rows."""
    x, weight, pieces = random((2, 7, 9)), random((12, 9), 1), []

    def chain(ops, parameter, t):  # (..., 9) -> (..., 6), the rows recorded
        pieces.append(int(np.prod(ops.to_host(t).shape[:-1])))
        return ops.geglu(ops.linear(t, parameter))

    parameter = held(backend, weight, "fp32")
    got = on(backend, "map_rows", lambda t: chain(backend, parameter, t), x, rows)
    assert max(pieces) <= rows and sum(pieces) == 14
    assert_close(got, backend.to_host(chain(backend, parameter, backend.from_host(x))), "map_rows")
    reference = held(numpy_ops, weight, "fp32")
    assert_close(got, numpy_ops.map_rows(lambda t: chain(numpy_ops, reference, t), x, rows), "map_rows")


# -- embeddings ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("ids", [[4], [0, 10, 10, 3], [[1, 2, 3], [10, 0, 5]], [[[7]], [[7]]], []], ids=str)
def test_embedding(backend, precision, ids):
    """embedding picks rows of the table at its precision as float32: ids (...) -> (..., C)."""
    table = random((11, 6), magnitude=3)
    data = numpy_ops.weight_from_float32(table, precision)
    ids = np.array(ids, dtype=np.int64)
    expected = numpy_ops.weight_float32(data, precision)[ids]
    got = backend.to_host(backend.embedding(backend.prepare(Weight(data, precision)), ids))
    assert_close(numpy_ops.embedding(Parameter(Weight(data, precision)), ids), expected, "exact")
    assert_close(got, expected, "exact")


@pytest.mark.parametrize("dim", [7, 8, 33, 320])
@pytest.mark.parametrize("flip", [True, False])
@pytest.mark.parametrize("shift", [0, 1])
def test_timestep_embedding(backend, dim, flip, shift, diffusers, torch):
    """timestep_embedding is diffusers' get_timestep_embedding, fractional timesteps and odd dims included."""
    from diffusers.models.embeddings import get_timestep_embedding

    timesteps = np.array([0.0, 0.5, 1.0, 37.7, 981.25, 999.0], dtype=np.float32)
    got = backend.to_host(backend.timestep_embedding(timesteps, dim, flip_sin_to_cos=flip, freq_shift=shift))
    expected = numpy_ops.timestep_embedding(timesteps, dim, flip_sin_to_cos=flip, freq_shift=shift)
    assert_close(got, expected, tolerance(backend, "timestep_embedding", "timestep_embedding"))
    reference = get_timestep_embedding(torch.from_numpy(timesteps), dim,
                                       flip_sin_to_cos=flip, downscale_freq_shift=shift).numpy()
    assert_close(expected, reference, "timestep_embedding")


# -- convolutions -------------------------------------------------------------------------------------------------

CONV1D_CASES = [  # (batch, in, out, length, kernel, stride, padding)
    (2, 3, 5, 17, 3, 1, 1), (1, 4, 6, 16, 4, 2, 1), (2, 5, 3, 9, 1, 1, 0), (1, 2, 2, 5, 5, 1, 2),
    (2, 3, 4, 11, 3, 3, 0),
]


@pytest.mark.parametrize("case", CONV1D_CASES, ids=str)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_conv1d(backend, case, with_bias, precision, torch):
    """conv1d is torch's F.conv1d: fp32 and fp16 weights in float32, bf16 with x rounded to bf16 and float32 sums."""
    batch, cin, cout, length, kernel, stride, padding = case
    x, weight = random((batch, cin, length)), random((cout, cin, kernel), 1)
    bias = random((cout,), 2) if with_bias else None
    if precision == "bf16" and bias is not None:
        bias = numpy_ops.round_to_bf16(bias)  # torch's bf16 bias is rounded
    options = dict(stride=stride, padding=padding)
    got = on(backend, "conv1d", x, held(backend, weight, precision), bias, **options)
    expected = numpy_ops.conv1d(x, held(numpy_ops, weight, precision), bias, **options)
    assert_close(got, expected, tolerance(backend, "conv1d", "conv"))
    values = numpy_ops.weight_float32(numpy_ops.weight_from_float32(weight, precision), precision)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    tensors = [None if a is None else torch.from_numpy(a).to(dtype) for a in (x, values, bias)]
    reference = torch.nn.functional.conv1d(*tensors, **options).float().numpy()
    assert_close(expected, reference, "bf16_products" if precision == "bf16" else "conv")


CONV3D_CASES = [  # (batch, in, out, (T, H, W), kernel, stride, padding)
    (2, 3, 4, (5, 7, 6), (3, 3, 3), 1, 1), (1, 4, 3, (6, 9, 8), (3, 3, 3), (1, 2, 2), (1, 1, 1)),
    (2, 2, 5, (7, 4, 5), (3, 1, 1), (2, 1, 1), (1, 0, 0)), (1, 3, 2, (4, 6, 7), (1, 3, 3), 1, (0, 1, 1)),
    (2, 3, 3, (5, 5, 5), (2, 2, 3), (1, 2, 1), (0, 1, 2)), (2, 5, 3, (3, 5, 7), (1, 1, 1), 1, 0),
]


@pytest.mark.parametrize("case", CONV3D_CASES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_conv3d(backend, case, causal, precision, torch):
    """conv3d is torch's F.conv3d with per-axis stride and padding; causal pads time by 2 * pt in front only."""
    F = torch.nn.functional
    if precision == "bf16" and backend.name == "cpu" and backend.bf16_level() == "portable":
        pytest.skip("this CPU has no bf16 instructions: conv3d runs conv2d's float32 fallback (tested with conv2d's)")
    batch, cin, cout, size, kernel, stride, padding = case
    x, weight, bias = random((batch, cin, *size)), random((cout, cin, *kernel), 1), random((cout,), 2)
    options = dict(stride=stride, padding=padding, causal=causal)
    got = on(backend, "conv3d", x, held(backend, weight, precision), bias, **options)
    expected = numpy_ops.conv3d(x, held(numpy_ops, weight, precision), bias, **options)
    assert_close(got, expected, tolerance(backend, "conv3d", "conv"))
    if precision != "fp32":
        return  # the precisions' arithmetic is conv1d's and linear's, checked against torch there
    pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
    tensors = [torch.from_numpy(a) for a in (x, weight, bias)]
    if causal:
        tensors[0] = F.pad(tensors[0], (pw, pw, ph, ph, 2 * pt, 0))
    reference = F.conv3d(*tensors, stride=stride, padding=0 if causal else padding).numpy()
    assert_close(expected, reference, "conv")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_conv3d_frames_in_groups_are_the_same_bits(monkeypatch, precision):
    """The cpu backend's conv3d computes each output frame alike whatever the group of frames it goes through in
    (a causal video decoder run frame by frame must equal the same run over all frames), where its products run
    sdcli's own kernels (from the avx512 level up; below it the BLAS blocks a product by its size)."""
    from sdcli.ext import cpu_level
    from sdcli.ops import cpu_ops

    if cpu_level()[0] not in ("avx512", "avx512_bf16", "amx"):
        pytest.skip("below the avx512 level conv2d runs the BLAS, whose sums depend on the product's size")
    cpu = get_ops("cpu")
    x, weight = random((2, 5, 7, 9, 8)), random((6, 5, 3, 3, 3), 1)
    whole = cpu.conv3d(x, held(cpu, weight, precision), padding=1, causal=True)
    monkeypatch.setattr(cpu_ops, "CONV3D_GROUP_BYTES", 1)  # one output frame at a time
    np.testing.assert_array_equal(cpu.conv3d(x, held(cpu, weight, precision), padding=1, causal=True), whole)


@pytest.mark.parametrize("frame", [1, 3, 4])
def test_conv3d_causal_sees_no_later_frame(backend, frame):
    """With causal, output frame t depends on input frames up to t only: changing frame f leaves t < f as it was."""
    x, weight = random((2, 3, 5, 6, 7)), random((4, 3, 3, 3, 3), 1)
    parameter = held(backend, weight, "fp32")
    before = on(backend, "conv3d", x, parameter, padding=1, causal=True)
    x[:, :, frame] += np.float32(5)
    after = on(backend, "conv3d", x, parameter, padding=1, causal=True)
    assert before.shape == (2, 4, 5, 6, 7)
    np.testing.assert_array_equal(after[:, :, :frame], before[:, :, :frame])
    assert (after[:, :, frame] != before[:, :, frame]).any()


# -- norms, rope, masked attention --------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 7, 33), (3, 1), (1, 5, 128)], ids=str)
@pytest.mark.parametrize("weight", ["none", "fp32", "fp16"])
def test_rms_norm(backend, shape, weight, torch):
    """rms_norm is x * rsqrt(mean(x^2) + eps) * weight (torch), with and without weight."""
    x, scale = random(shape, magnitude=3), random(shape[-1:], 1)
    given = {"none": lambda ops: None, "fp32": lambda ops: scale, "fp16": lambda ops: held(ops, scale, weight)}[weight]
    expected = numpy_ops.rms_norm(x, given(numpy_ops), 1e-6)
    assert_close(on(backend, "rms_norm", x, given(backend), 1e-6), expected, tolerance(backend, "rms_norm", "rms_norm"))
    t = torch.from_numpy(x)
    reference = t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6)
    if weight != "none":  # the weight's values at its precision
        reference = reference * torch.from_numpy(scale).to(torch.float16 if weight == "fp16" else torch.float32).float()
    assert_close(expected, reference.numpy(), "rms_norm")


@pytest.mark.parametrize("shape", [(2, 7, 3, 5, 4), (1, 96, 2, 3), (2, 1, 4)], ids=str)
def test_channel_rms_norm(backend, shape, torch):
    """channel_rms_norm is F.normalize over the channels times sqrt(C) times the per-channel scale (the Wan VAE's
    norm); an all-zero position stays zero."""
    x, scale = random(shape, magnitude=3), random(shape[1:2], 1)
    x[0, :, 0] = 0  # a position whose channels are all zero
    expected = numpy_ops.channel_rms_norm(x, scale)
    assert_close(on(backend, "channel_rms_norm", x, scale), expected, tolerance(backend, "rms_norm", "rms_norm"))
    reference = torch.nn.functional.normalize(torch.from_numpy(x), dim=1) * shape[1] ** 0.5
    reference = reference * torch.from_numpy(scale).reshape(1, -1, *([1] * (len(shape) - 2)))
    assert_close(expected, reference.numpy(), "rms_norm")
    assert not expected[0, :, 0].any()


@pytest.mark.parametrize("shape", [(2, 3, 5, 8), (1, 7, 6), (2, 1, 1, 2)], ids=str)
def test_rope(backend, shape):
    """rope multiplies pairs (2i, 2i+1) as complex numbers by exp(j angle), cos and sin (T, d/2) broadcast."""
    x, tokens, half = random(shape), shape[-2], shape[-1] // 2
    angles = np.arange(tokens)[:, None] * 10000.0 ** (-np.arange(half) / half) + 0.3
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    expected = check(backend, "rope", "rope", x, cos, sin)
    rotated = (x[..., 0::2] + 1j * x[..., 1::2].astype(np.float64)) * (cos.astype(np.float64) + 1j * sin)
    reference = np.stack([rotated.real, rotated.imag], axis=-1).reshape(shape).astype(np.float32)
    assert_close(expected, reference, "rope")


def assert_attention_close(actual, expected, q, k, v, mask, scale=None):
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    scores = np.matmul(q, np.swapaxes(k, -1, -2)) * scale + mask
    bound = float(np.abs(scores[np.isfinite(scores)]).max())
    atol = ATTENTION_ULPS * EPS * max(1.0, bound) * float(np.abs(v).max())
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=0, atol=atol)


def attention_mask(kind: str) -> np.ndarray:
    """Masks of (Tq, Tk) = (5, 7): T5's bias per head, -inf key padding per prompt, a row left with one key."""
    mask = np.zeros((2, 1, 1, 7), np.float32) if kind == "padding" else random((1, 3, 5, 7), 4, magnitude=3.0)
    if kind == "padding":
        mask[1, ..., 4:] = -np.inf  # the second prompt has 4 tokens
    if kind == "one key":
        mask[..., 2, :] = -np.inf
        mask[..., 2, 5] = 0.0  # query 2 sees key 5 alone
    return mask


@pytest.mark.parametrize("kind", ["bias", "padding", "one key"])
def test_attention_mask(backend, kind, torch):
    """mask is added to the scores (torch's float attn_mask): a bias, -inf key padding, a row with one key left."""
    F = torch.nn.functional
    q, k, v, mask = random((2, 3, 5, 8), 1), random((2, 3, 7, 8), 2), random((2, 3, 7, 6), 3), attention_mask(kind)
    expected = numpy_ops.attention(q, k, v, mask=mask)
    assert_attention_close(on(backend, "attention", q, k, v, mask=mask), expected, q, k, v, mask)
    reference = F.scaled_dot_product_attention(*map(torch.from_numpy, (q, k, v)), attn_mask=torch.from_numpy(mask))
    assert_attention_close(expected, reference.numpy(), q, k, v, mask)
    if kind == "one key":  # the single weight is 1 exactly: that key's value
        np.testing.assert_array_equal(expected[:, :, 2], v[:, :, 5])
    if kind == "padding":  # padded keys carry no weight: the same as attending to the first 4 keys alone
        alone = numpy_ops.attention(q[1:], k[1:, :, :4], v[1:, :, :4])
        assert_attention_close(expected[1:], alone, q[1:], k[1:, :, :4], v[1:, :, :4], 0.0)


def test_attention_mask_with_causal_and_scale(backend):
    """A mask together with causal and an explicit scale: as numpy_ops."""
    q, k, v, mask = random((2, 3, 7, 8), 1), random((2, 3, 7, 8), 2), random((2, 3, 7, 6), 3), random((1, 3, 7, 7), 4)
    expected = numpy_ops.attention(q, k, v, causal=True, scale=0.4, mask=mask)
    got = on(backend, "attention", q, k, v, causal=True, scale=0.4, mask=mask)
    assert_attention_close(got, expected, q, k, v, mask, 0.4)


@pytest.mark.parametrize("affine", ["none", "weight", "bias"])
def test_layer_norm_without_affine_parts(backend, affine, torch):
    """layer_norm with weight=None and/or bias=None is torch's F.layer_norm without them."""
    x = random((2, 7, 33), magnitude=3)
    weight = random((33,), 1) if affine == "weight" else None
    bias = random((33,), 2) if affine == "bias" else None
    expected = numpy_ops.layer_norm(x, weight, bias, 1e-6)
    assert_close(on(backend, "layer_norm", x, weight, bias, 1e-6), expected, "layer_norm")
    tensors = [None if a is None else torch.from_numpy(a) for a in (x, weight, bias)]
    reference = torch.nn.functional.layer_norm(tensors[0], (33,), tensors[1], tensors[2], 1e-6).numpy()
    assert_close(expected, reference, "layer_norm")
