"""Number formats numpy lacks: bfloat16 and float8 held as their bit patterns, and conversions to float32.

The safetensors reader and every op backend use these; they depend on numpy alone.
"""

from __future__ import annotations

import math

import numpy as np

def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """BF16 bit patterns (uint16) -> float32, exactly: the bits become the top half of the float32."""
    bits = np.asarray(bits)
    if bits.dtype.kind not in "ui" or bits.dtype.itemsize != 2:
        raise TypeError(f"bf16_to_float32 expects 16-bit integer bits, got {bits.dtype}")
    wide = bits.view(np.uint16).astype(np.uint32) << 16  # a new C-contiguous array
    return wide.view(np.float32)


def float32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> BF16 bit patterns (uint16), rounding to nearest even; a NaN stays a (quiet) NaN of its sign."""
    x = np.asarray(x, dtype=np.float32, order="C")
    u = x.view(np.uint32)
    rounding = np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
    rounded = ((u + rounding) >> np.uint32(16)).astype(np.uint16)  # overflow past the max float gives inf, as RNE must
    quiet_nan = ((u >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return np.where(np.isnan(x), quiet_nan, rounded)


def _fp8_table(exponent_bits: int, mantissa_bits: int, ieee_specials: bool) -> np.ndarray:
    """The float32 value of every 8-bit pattern of a 1-sign, ``exponent_bits``, ``mantissa_bits`` format.

    ``ieee_specials``: the top exponent holds inf (mantissa 0) and NaN (e5m2). Otherwise only the all-ones
    pattern of exponent and mantissa is NaN and there is no inf (e4m3fn, the "fn" = finite variant).
    """
    bias = 2 ** (exponent_bits - 1) - 1
    top_exponent = 2**exponent_bits - 1
    table = np.empty(256, dtype=np.float32)
    for bits in range(256):
        sign = -1.0 if bits & 0x80 else 1.0
        exponent = (bits >> mantissa_bits) & top_exponent
        mantissa = bits & (2**mantissa_bits - 1)
        if ieee_specials and exponent == top_exponent:
            value = math.inf if mantissa == 0 else math.nan
        elif not ieee_specials and exponent == top_exponent and mantissa == 2**mantissa_bits - 1:
            value = math.nan
        elif exponent == 0:  # subnormal
            value = mantissa / 2**mantissa_bits * 2.0 ** (1 - bias)
        else:
            value = (1 + mantissa / 2**mantissa_bits) * 2.0 ** (exponent - bias)
        table[bits] = sign * value
    table.flags.writeable = False
    return table


_FP8_E4M3_TABLE = _fp8_table(4, 3, ieee_specials=False)
_FP8_E5M2_TABLE = _fp8_table(5, 2, ieee_specials=True)


def _check_u8(bits: np.ndarray, what: str) -> np.ndarray:
    bits = np.asarray(bits)
    if bits.dtype.kind not in "ui" or bits.dtype.itemsize != 1:
        raise TypeError(f"{what} expects 8-bit integer bits, got {bits.dtype}")
    return bits.view(np.uint8)


def fp8_e4m3_to_float32(bits: np.ndarray) -> np.ndarray:
    """float8 e4m3fn bit patterns (uint8) -> float32: bias 7, max 448, no inf, 0x7f/0xff are NaN."""
    return _FP8_E4M3_TABLE[_check_u8(bits, "fp8_e4m3_to_float32")]


def fp8_e5m2_to_float32(bits: np.ndarray) -> np.ndarray:
    """float8 e5m2 bit patterns (uint8) -> float32: bias 15, IEEE-like inf and NaN."""
    return _FP8_E5M2_TABLE[_check_u8(bits, "fp8_e5m2_to_float32")]


_TO_FLOAT32 = {
    "BF16": bf16_to_float32,
    "F8_E4M3": fp8_e4m3_to_float32,
    "F8_E5M2": fp8_e5m2_to_float32,
}


def stored_float32(stored: np.ndarray, code: str) -> np.ndarray:
    """A tensor in its storage dtype (safetensors ``code``) as float32: itself for F32, otherwise a new array."""
    if code == "F32":
        return stored
    if code in _TO_FLOAT32:
        return _TO_FLOAT32[code](stored)
    with np.errstate(over="ignore"):  # F64 beyond the float32 range becomes inf, as a cast should
        return stored.astype(np.float32)


def held_float32(data: np.ndarray, precision: str) -> np.ndarray:
    """The values of a weight held as ``precision`` ("fp32", "fp16", or "bf16" bits in uint16) as float32."""
    if precision == "bf16":
        return bf16_to_float32(data)
    return np.asarray(data, dtype=np.float32)


def held_from_float32(values: np.ndarray, precision: str) -> np.ndarray:
    """float32 values as a weight is held at ``precision``: themselves (fp32), float16, or bf16 bits in uint16,
    rounding to nearest even."""
    values = np.asarray(values, dtype=np.float32)
    if precision == "bf16":
        return float32_to_bf16(values)
    if precision == "fp16":
        with np.errstate(over="ignore"):  # beyond fp16's range: inf, as a cast should
            return values.astype(np.float16)
    return values
