"""Element types: ONNX TensorProto codes <-> NumPy dtypes, and the types refquant refuses."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from .errors import UnsupportedTypeError

try:  # ml_dtypes ships with onnx; it gives NumPy the 4-bit integer types
    import ml_dtypes

    INT4 = np.dtype(ml_dtypes.int4)
    UINT4 = np.dtype(ml_dtypes.uint4)
except ImportError:  # pragma: no cover - onnx requires ml_dtypes
    INT4 = UINT4 = None

_TO_NUMPY = {
    TensorProto.FLOAT: np.dtype(np.float32),
    TensorProto.DOUBLE: np.dtype(np.float64),
    TensorProto.FLOAT16: np.dtype(np.float16),
    TensorProto.INT8: np.dtype(np.int8),
    TensorProto.UINT8: np.dtype(np.uint8),
    TensorProto.INT16: np.dtype(np.int16),
    TensorProto.UINT16: np.dtype(np.uint16),
    TensorProto.INT32: np.dtype(np.int32),
    TensorProto.UINT32: np.dtype(np.uint32),
    TensorProto.INT64: np.dtype(np.int64),
    TensorProto.UINT64: np.dtype(np.uint64),
    TensorProto.BOOL: np.dtype(np.bool_),
}
if INT4 is not None:
    _TO_NUMPY[TensorProto.INT4] = INT4
    _TO_NUMPY[TensorProto.UINT4] = UINT4

_FROM_NUMPY = {v: k for k, v in _TO_NUMPY.items()}


def unsupported_type_name(elem_type: int) -> str | None:
    """The ONNX name of ``elem_type`` if refquant does not compute with it, else None."""
    if elem_type in _TO_NUMPY or elem_type == TensorProto.UNDEFINED:
        return None
    return TensorProto.DataType.Name(elem_type)


def to_numpy(elem_type: int, where: str = "") -> np.dtype:
    """NumPy dtype for an ONNX element type; UnsupportedTypeError for string, bfloat16, float8, ..."""
    if elem_type in _TO_NUMPY:
        return _TO_NUMPY[elem_type]
    name = TensorProto.DataType.Name(elem_type) if elem_type in TensorProto.DataType.values() else str(elem_type)
    raise UnsupportedTypeError(
        f"{where}: element type {name} is not supported by refquant "
        "(supported: float32/64/16, int4..int64, uint4..uint64, bool)"
    )


def to_onnx(dtype) -> int:
    """ONNX TensorProto code for a NumPy dtype."""
    dtype = np.dtype(dtype)
    if dtype in _FROM_NUMPY:
        return _FROM_NUMPY[dtype]
    return helper.np_dtype_to_tensor_dtype(dtype)
