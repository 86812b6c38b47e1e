"""The op seam: every piece of arithmetic the networks do goes through one of these functions.

``get_ops(name)`` returns a backend, a namespace with the functions of :class:`Ops`:

- ``"numpy"``: :mod:`sdcli.ops.numpy_ops`, readable reference code; the contract every backend is tested against.
- ``"cpu"``: :mod:`sdcli.ops.cpu_ops`, the same signatures backed by the Cython kernels in ``sdcli/ext``.

Selecting a backend is explicit. Asking for one whose extension is not built raises :class:`BackendError`;
nothing falls back silently.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ..errors import BackendError

BACKENDS = ("numpy", "cpu")


class Ops(Protocol):
    """The functions a backend provides. Arrays are float32, layout NCHW for images, (B, T, C) for sequences."""

    name: str

    def linear(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray: ...

    def layer_norm(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray: ...

    def gelu(self, x: np.ndarray) -> np.ndarray: ...

    def geglu(self, x: np.ndarray) -> np.ndarray: ...

    def quick_gelu(self, x: np.ndarray) -> np.ndarray: ...

    def softmax(self, x: np.ndarray) -> np.ndarray: ...

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, *, causal: bool = False,
                  scale: float | None = None, bf16: bool = False) -> np.ndarray: ...

    # images to tokens and back, as new C-contiguous arrays: (B, C, H, W) -> (B, H*W, C) and (B, H*W, C) -> (B, C,
    # H, W)
    def channels_last(self, x: np.ndarray) -> np.ndarray: ...

    def channels_first(self, x: np.ndarray, height: int, width: int) -> np.ndarray: ...

    # (B, T, heads * hs) -> (B, heads, T, hs) in the layout ``attention`` reads best: a view, or a copy by heads
    def split_heads(self, x: np.ndarray, heads: int, *, bf16: bool = False) -> np.ndarray: ...

    def silu(self, x: np.ndarray) -> np.ndarray: ...

    def relu(self, x: np.ndarray) -> np.ndarray: ...

    def group_norm(self, x: np.ndarray, num_groups: int, weight: np.ndarray, bias: np.ndarray, eps: float, *,
                   silu: bool = False) -> np.ndarray: ...

    def conv2d(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None, *, stride: int = 1,
               padding: int = 0) -> np.ndarray: ...

    def upsample_nearest(self, x: np.ndarray, factor: int = 2) -> np.ndarray: ...

    # Weights held at reduced precision. fp16 (and fp32) weights go through linear and conv2d, packed once when the
    # layer keeps them, widened per call when streamed; bf16 weights are prepared once by pack_* into whatever
    # layout the backend multiplies fastest, and
    # linear_bf16 / conv2d_bf16 round the activations to bf16 and sum the products in float32 (a backend without
    # bf16 arithmetic may keep float32 activations instead).
    def weight_float32(self, data: np.ndarray, precision: str) -> np.ndarray: ...

    def weight_from_float32(self, values: np.ndarray, precision: str) -> np.ndarray: ...

    # float32 and float16 weights a layer keeps (not streamed): prepared once, then passed to linear / conv2d in
    # place of the array; the products are float32 either way.
    def pack_linear(self, weight: np.ndarray): ...

    def pack_conv(self, weight: np.ndarray): ...

    def pack_linear_bf16(self, bits: np.ndarray): ...

    def linear_bf16(self, x: np.ndarray, packed, bias: np.ndarray | None = None) -> np.ndarray: ...

    def pack_conv_bf16(self, bits: np.ndarray): ...

    def conv2d_bf16(self, x: np.ndarray, packed, bias: np.ndarray | None = None, *, stride: int = 1,
                    padding: int = 0) -> np.ndarray: ...


def get_ops(name: str = "cpu") -> Ops:
    """Return the backend called ``name`` ("numpy" or "cpu")."""
    if name == "numpy":
        from . import numpy_ops

        return numpy_ops
    if name == "cpu":
        try:
            from . import cpu_ops
        except ImportError as error:
            raise BackendError(
                f"the 'cpu' backend needs sdcli's compiled extension, which is not built ({error}); "
                "reinstall with 'pip install .' or choose --backend numpy"
            ) from None
        return cpu_ops
    raise BackendError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
