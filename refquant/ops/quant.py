"""QuantizeLinear and DequantizeLinear, per tensor, per axis and per block.

    q = saturate(round_half_to_even(x / scale) + zero_point)      (x / scale is a division, as onnxruntime)
    x' = (q - zero_point) * scale

Integer ranges are in one table; 4-bit types are ml_dtypes' int4/uint4.
"""

from __future__ import annotations

import numpy as np

from .. import dtypes
from .registry import register
from .shapes import TensorInfo

RANGES = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127), np.dtype(np.uint16): (0, 65535),
          np.dtype(np.int16): (-32768, 32767), np.dtype(np.int32): (-2**31, 2**31 - 1)}
if dtypes.INT4 is not None:
    RANGES[dtypes.INT4] = (-8, 7)
    RANGES[dtypes.UINT4] = (0, 15)


def _broadcast_param(param, x, axis, block_size):
    """Shape a scale or zero point to broadcast against x: scalar, 1-D along ``axis``, or per block."""
    param = np.asarray(param)
    if param.ndim == 0 or param.size == 1 and block_size == 0:
        return param.reshape(())
    axis %= x.ndim
    if block_size:
        return np.repeat(param, block_size, axis=axis).take(np.arange(x.shape[axis]), axis=axis)
    return param.reshape((1,) * axis + (-1,) + (1,) * (x.ndim - axis - 1))


def _output_type(zero_point, output_dtype, default=np.uint8):
    if zero_point is not None:
        return np.asarray(zero_point).dtype
    if output_dtype:
        return dtypes.to_numpy(output_dtype)
    return np.dtype(default)


def _quantize_rule(x, scale, zero_point=None, *, axis=1, block_size=0, output_dtype=0, saturate=1, precision=0):
    return TensorInfo(_output_type(None if zero_point is None else np.zeros(0, zero_point.dtype), output_dtype),
                      x.shape)


@register("QuantizeLinear", since=10, infer=_quantize_rule)
def quantize_linear(x, y_scale, y_zero_point=None, *, axis=1, block_size=0, output_dtype=0, saturate=1,
                    precision=0):
    """q = clamp(rint(x / y_scale) + y_zero_point, qmin, qmax) with the output type's range."""
    target = _output_type(y_zero_point, output_dtype)
    if target not in RANGES:
        raise TypeError(f"QuantizeLinear to {target} is not supported")
    scale = _broadcast_param(y_scale, x, axis, block_size)
    compute = np.result_type(x.dtype, scale.dtype)
    with np.errstate(all="ignore"):
        q = np.rint(x.astype(compute, copy=False) / scale.astype(compute, copy=False))
    if y_zero_point is not None:
        q = q + _broadcast_param(y_zero_point, x, axis, block_size).astype(np.int64).astype(compute)
    low, high = RANGES[target]
    q = np.clip(np.where(np.isnan(q), low, q), low, high)  # NaN -> qmin, as onnxruntime (measured)
    return q.astype(np.int64).astype(target)


def _dequantize_rule(x, scale, zero_point=None, *, axis=1, block_size=0, output_dtype=0):
    out = dtypes.to_numpy(output_dtype) if output_dtype else scale.dtype
    return TensorInfo(out, x.shape)


@register("DequantizeLinear", since=10, infer=_dequantize_rule)
def dequantize_linear(x, x_scale, x_zero_point=None, *, axis=1, block_size=0, output_dtype=0):
    """x' = (q - zero_point) * scale, the difference taken exactly in integers."""
    scale = _broadcast_param(x_scale, x, axis, block_size)
    q = x.astype(np.int64)
    if x_zero_point is not None:
        q = q - _broadcast_param(x_zero_point, x, axis, block_size).astype(np.int64)
    out = dtypes.to_numpy(output_dtype) if output_dtype else scale.dtype
    return (q.astype(scale.dtype) * scale).astype(out, copy=False)
