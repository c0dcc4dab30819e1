"""Bit-level ops on integer tensors: BitShift, BitwiseAnd, BitwiseOr, BitwiseXor, BitwiseNot, BitCast.

Integers only (ONNX's type constraints); the result has the first input's dtype. Shifts follow the ONNX
reference: a shift by a negative amount or by at least the bit width gives 0 (for a right shift of a
negative signed value: -1, every bit a copy of the sign), never C's undefined behaviour; a left shift of a
signed value shifts its two's-complement bits (it wraps).
"""

from __future__ import annotations

import numpy as np

from .. import dtypes
from .registry import register
from .shapes import TensorInfo, broadcast_rule, same_as_first


def _require_integers(op_type, *xs):
    for x in xs:
        if x.dtype.kind not in "iu":
            raise TypeError(f"{op_type} takes integer tensors (ONNX type constraint), got {x.dtype}")


@register("BitShift", since=11, infer=broadcast_rule)
def bit_shift(x, y, *, direction):
    """z = x << y (direction LEFT) or x >> y (RIGHT), element-wise with broadcasting; y outside
    [0, bits) gives 0 (right shift of a negative value: -1). Opset 28 adds signed types: right shift is
    arithmetic, left shift works on the two's-complement bits."""
    _require_integers("BitShift", x, y)
    if direction not in ("LEFT", "RIGHT"):
        raise ValueError(f"BitShift direction must be LEFT or RIGHT, got {direction!r}")
    bits = np.iinfo(x.dtype).bits
    amount = np.asarray(y)
    valid = (amount >= 0) & (amount < bits)
    # shift by a clipped amount so no lane is undefined, then overwrite the out-of-range lanes
    clipped = np.clip(amount, 0, bits - 1).astype(np.uint8)
    if direction == "LEFT":
        unsigned = np.asarray(x).view(np.dtype(f"u{x.dtype.itemsize}"))
        shifted = np.left_shift(unsigned, clipped.astype(unsigned.dtype)).astype(x.dtype, copy=False)
        return np.where(valid, shifted, np.zeros((), x.dtype)).astype(x.dtype, copy=False)
    if x.dtype.kind == "i":  # an arithmetic shift by bits-1 gives the sign fill (0 or -1) of the invalid lanes
        return np.right_shift(x, np.where(valid, clipped, bits - 1).astype(x.dtype)).astype(x.dtype, copy=False)
    shifted = np.right_shift(x, clipped.astype(x.dtype))
    return np.where(valid, shifted, np.zeros((), x.dtype)).astype(x.dtype, copy=False)


def _binary(op_type, fn):
    def kernel(x, y):
        _require_integers(op_type, x, y)
        if x.dtype != y.dtype:
            raise TypeError(f"{op_type} inputs must have one dtype, got {x.dtype} and {y.dtype}")
        return np.asarray(fn(x, y), dtype=x.dtype)

    kernel.__name__ = op_type.lower()
    kernel.__doc__ = f"z = {fn.__name__}(x, y), element-wise with NumPy broadcasting."
    register(op_type, since=18, infer=broadcast_rule)(kernel)


_binary("BitwiseAnd", np.bitwise_and)
_binary("BitwiseOr", np.bitwise_or)
_binary("BitwiseXor", np.bitwise_xor)


@register("BitwiseNot", since=18, infer=same_as_first)
def bitwise_not(x):
    """y = ~x (every bit flipped)."""
    _require_integers("BitwiseNot", x)
    return np.asarray(np.invert(x), dtype=x.dtype)


def _bit_width(dtype: np.dtype) -> int:
    return 4 if dtype in (dtypes.INT4, dtypes.UINT4) else 1 if dtype == np.bool_ else dtype.itemsize * 8


def _bitcast_rule(x, *, to):
    return TensorInfo(dtypes.to_numpy(to, "BitCast"), x.shape)


@register("BitCast", since=26, infer=_bitcast_rule)
def bit_cast(x, *, to):
    """The bits of x reinterpreted as element type ``to`` (same bit width; the shape is unchanged)."""
    target = dtypes.to_numpy(to, "BitCast")
    # a bool is stored in a byte, but ONNX gives it 8 bits too (the reference views it as uint8)
    width_in = 8 if x.dtype == np.bool_ else _bit_width(x.dtype)
    width_out = 8 if target == np.bool_ else _bit_width(target)
    if width_in != width_out:
        raise ValueError(f"BitCast needs equal bit widths: {x.dtype} has {width_in} bits, {target} has {width_out}")
    if target == np.bool_:  # a byte other than 0/1 is no valid NumPy bool: normalize to its truth value
        return np.asarray(x).view(np.uint8) != 0
    if width_in == 4:  # one 4-bit value per byte: reinterpret the low nibble arithmetically
        nibble = x.astype(np.int16) & 0xF
        return (nibble - 16 * (nibble >= 8) if target == dtypes.INT4 else nibble).astype(target)
    return np.asarray(x).view(target)  # equal item sizes: a view works for any strides and for 0-d
