"""Quantize-dequantize of a tensor with an :class:`~refquant.quant.encoding.Encoding`.

``"half_even"`` (default) is bit-exact with onnxruntime's QuantizeLinear -> DequantizeLinear:
``x' = clamp(rint(x / s), offset, offset + steps) * s`` in float32. ``"half_up"`` is AIMET's
simulation, which clamps in the float domain and rounds ties up on the shifted grid
(refs/aimet.md §5.3). The two differ only on exact ties.
"""

from __future__ import annotations

import numpy as np

from ..kernels import qdq as qdq_kernels
from .encoding import Encoding, EncodingError

ROUNDING = ("half_even", "half_up")


def quantize_dequantize(x: np.ndarray, encoding: Encoding, rounding: str = "half_even") -> np.ndarray:
    """The float32 tensor ``x`` snapped to the encoding's grid (a new array)."""
    if rounding not in ROUNDING:
        raise EncodingError(f"rounding {rounding!r} is not one of {', '.join(ROUNDING)}")
    if encoding.kind == "float":
        return x.astype(np.float16).astype(x.dtype)
    shape = np.shape(x)  # ascontiguousarray makes a 0-d array 1-d: a scalar must stay a scalar
    x = np.ascontiguousarray(x, dtype=np.float32)
    view, scale, offset = _channel_view(x, encoding)
    out = np.empty_like(view)
    steps = np.full(scale.shape, encoding.steps, dtype=np.float32)
    if rounding == "half_even":
        qdq_kernels.qdq_half_even(view, scale, offset, offset + steps, out)
    else:
        qdq_kernels.qdq_half_up(view, scale, offset, steps, out)
    return out.reshape(shape)


def quantize(x: np.ndarray, encoding: Encoding) -> np.ndarray:
    """Integer codes on the unsigned grid, ``clamp(rint(x / s) - offset, 0, steps)`` (int64), as
    onnxruntime's QuantizeLinear computes them (before the signed shift)."""
    shape = np.shape(x)
    x = np.ascontiguousarray(x, dtype=np.float32)
    view, scale, offset = _channel_view(x, encoding)
    codes = np.rint(view / scale[None, :, None])
    codes = np.clip(codes - offset[None, :, None], 0, encoding.steps)
    return codes.astype(np.int64).reshape(shape)


def _channel_view(x: np.ndarray, encoding: Encoding):
    """x as (outer, channels, inner) with one float32 scale and offset per channel."""
    scale = np.asarray(encoding.scale, dtype=np.float32)
    offset = np.asarray(encoding.offset, dtype=np.float32)
    if encoding.axis is None:
        return x.reshape(1, 1, -1), scale.reshape(1), offset.reshape(1)
    axis = encoding.axis % x.ndim
    if encoding.block_size is None:
        if scale.shape != (x.shape[axis],):
            raise EncodingError(f"per-channel encoding has {scale.size} scales for axis {axis} "
                                f"of a tensor of shape {x.shape}")
        return x.reshape(int(np.prod(x.shape[:axis])), x.shape[axis], -1), scale, offset
    # per block: every element gets its block's scale, so the whole tensor is one "channel" list
    block = encoding.block_size
    expected = list(x.shape)
    expected[axis] = -(-x.shape[axis] // block)
    if list(scale.shape) != expected:
        raise EncodingError(f"block encoding scale shape {scale.shape} does not fit tensor {x.shape} with "
                            f"block_size {block} on axis {axis} (expected {tuple(expected)})")
    full_scale = np.repeat(scale, block, axis=axis).take(range(x.shape[axis]), axis=axis)
    full_offset = np.repeat(np.broadcast_to(offset, scale.shape), block, axis=axis).take(range(x.shape[axis]),
                                                                                     axis=axis)
    return (x.reshape(1, -1, 1), np.ascontiguousarray(full_scale).ravel(),
            np.ascontiguousarray(full_offset, dtype=np.float32).ravel())
