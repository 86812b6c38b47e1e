"""Layers: small classes that take their weights from a scoped parameter source and call the op backend.

A network builds itself from a :class:`ParameterSource`: each layer takes its tensors by their last name
(``weight``, ``bias``) from the scope it is handed, and each block hands its layers sub-scopes named as the
tensors are, so that a tensor's full name is spelled once, where the layer is built::

    self.to_q = Linear(params.scope("attn1", "to_q"), channels, channels, bias=False)  # attn1.to_q.weight

The source decides what a taken tensor becomes: a parameter prepared by the backend from a checkpoint
(:func:`sdcli.io.weights.load_network`), or a shape-only placeholder (:func:`sdcli.io.weights.tensor_shapes`).
The layers never read a weight's values: they pass the parameters to the ops, which run whatever precision the
parameter holds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from ..errors import SdcliError
from ..ops import Ops
from ..ops.parameter import Parameter


class ParameterSource(Protocol):
    """Where a network takes its weights from, one scope at a time."""

    ops: Ops

    def scope(self, *names: str | int) -> "ParameterSource":
        """The source of the tensors under ``names`` ("down_blocks", 0 -> ``down_blocks.0.``)."""

    def take(self, name: str, shape: tuple[int, ...], default: Callable[[], np.ndarray] | None = None) -> Parameter:
        """The tensor ``name`` of this scope, which must have ``shape``. With ``default`` (a function giving its
        float32 values) a source may leave it out: a buffer that some files store and others recompute, as
        AnimateDiff's frame position tables."""


class Linear:
    """y = x W^T + b. weight (out, in), bias (out,)."""

    def __init__(self, params: ParameterSource, in_features: int, out_features: int, bias: bool = True):
        self.ops = params.ops
        self.weight = params.take("weight", (out_features, in_features))
        self.bias = params.take("bias", (out_features,)) if bias else None

    def __call__(self, x):
        return self.ops.linear(x, self.weight, self.bias)


class Conv2d:
    """2-D convolution with zero padding ("same", kernel // 2, unless given). weight (Cout, Cin, k, k), bias
    (Cout,) or None."""

    def __init__(self, params: ParameterSource, in_channels: int, out_channels: int, kernel: int, *,
                 stride: int = 1, padding: int | None = None, bias: bool = True):
        self.ops, self.stride = params.ops, stride
        self.padding = kernel // 2 if padding is None else padding
        self.weight = params.take("weight", (out_channels, in_channels, kernel, kernel))
        self.bias = params.take("bias", (out_channels,)) if bias else None

    def __call__(self, x):
        return self.ops.conv2d(x, self.weight, self.bias, stride=self.stride, padding=self.padding)


class LayerNorm:
    """Normalisation over the last axis with a learnt scale and shift, both (C,)."""

    def __init__(self, params: ParameterSource, channels: int, eps: float):
        self.ops, self.eps = params.ops, eps
        self.weight = params.take("weight", (channels,))
        self.bias = params.take("bias", (channels,))

    def __call__(self, x):
        return self.ops.layer_norm(x, self.weight, self.bias, self.eps)


class GroupNorm:
    """Normalisation over channel groups and positions, with a learnt per-channel scale and shift, both (C,)."""

    def __init__(self, params: ParameterSource, channels: int, num_groups: int, eps: float):
        self.ops, self.num_groups, self.eps = params.ops, num_groups, eps
        self.weight = params.take("weight", (channels,))
        self.bias = params.take("bias", (channels,))

    def __call__(self, x, silu: bool = False):
        """The normalised x, then SiLU of it when ``silu`` (fused by the backend)."""
        return self.ops.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, silu=silu)


class Embedding:
    """Rows of a (V, C) table picked by integer ids (host arrays)."""

    def __init__(self, params: ParameterSource, count: int, channels: int):
        self.ops = params.ops
        self.weight = params.take("weight", (count, channels))

    def __call__(self, ids):
        return self.ops.embedding(self.weight, ids)  # (..., C)


def check_images(x, channels: int, what: str, multiple: int = 1):
    """x itself when it is (B, channels, H, W) with H and W positive multiples of ``multiple``; a one-line error
    otherwise. Only the shape is read: x is a backend array."""
    if len(x.shape) != 4 or x.shape[1] != channels or x.shape[0] < 1:
        raise SdcliError(f"{what} must be (batch, {channels}, height, width), got shape {tuple(x.shape)}")
    height, width = x.shape[2:]
    if height < multiple or width < multiple or height % multiple or width % multiple:
        size = f"multiples of {multiple}" if multiple > 1 else "at least 1"
        raise SdcliError(f"{what} height and width must be {size}, got {height}x{width}")
    return x
