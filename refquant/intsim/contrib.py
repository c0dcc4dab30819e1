"""com.microsoft QLinearSoftmax as onnxruntime 1.32's CPU kernel computes it (uint8, int8), for the integer program.

onnxruntime (``contrib_ops/cpu/quantization/qlinear_softmax.cc``) builds a 256-entry float32 table once,

    shift = max(0, ln(FLT_MAX / D) - 5) / x_scale                         (double; D = reduced length)
    table[i] = f32(exp((i - 255 + shift) * x_scale))                     (double exp, i = 0..255)

and per row of D codes (x_max its largest code, so the row's maximum lands on entry 255; x_zero_point plays no
part):

    e_j  = table[255 - x_max + x_j]
    sum  = e_0 + e_1 + ... (float32, left to right)
    y_j  = min(nearbyint(f32(e_j * floor(1 / y_scale)) / sum) + y_zero_point, 255)   (inf -> 255)

(the output scale enters only as ``floor(1 / y_scale)``). Opset 13 semantics reduce over ``axis``; opset < 13
over the flattened dims from ``axis`` on. Verified bit-exact against onnxruntime in tests/test_intsim.py.

int8: the kernel builds the same table stored at ``uint8(i - 128)`` and reads it at ``uint8(127 - x_max + x_j)``,
which is entry ``255 - x_max + x_j`` of the table above, so ``e_j`` and ``sum`` are the same formula on the signed
codes; the result ``nearbyint(f32(e_j * floor(1 / y_scale)) / sum) + y_zero_point`` saturates to [-128, 127]
(inf -> 127). The source at hand narrows with ``int8(q > 255 ? 255 : q)``, which would wrap 128..255 to negative
codes; onnxruntime 1.32's binary saturates instead (measured: a probability of 1 on the [0, 1] grid with zero
point -128 comes out as 127, not -128), and that is what is reproduced.
Verified bit-exact against onnxruntime in tests/test_intsim_models.py.
"""

from __future__ import annotations

import math

import numpy as np

from ..ops import register
from ..ops.shapes import TensorInfo

MS = "com.microsoft"
F32 = np.float32


def softmax_table(x_scale, reduce_len: int) -> np.ndarray:
    """onnxruntime's QlinearBuildLookupTableUint32 with a float32 table (EXP_OUT_DTYPE = float)."""
    xs = float(F32(x_scale))
    shift = math.log(float(np.finfo(np.float32).max) / reduce_len)
    shift = max(0.0, shift - 5.0) / xs
    return np.array([math.exp((float(i) - 255.0 + shift) * xs) for i in range(256)], dtype=np.float64).astype(F32)


def _rows(x2: np.ndarray, table: np.ndarray, y_scale, y_zero_point: int) -> np.ndarray:
    codes = x2.astype(np.int64)
    e = table[255 - codes.max(axis=1, keepdims=True) + codes]
    total = np.cumsum(e, axis=1, dtype=F32)[:, -1:]  # sequential float32 sum, as the kernel's loop
    scale = F32(np.floor(F32(1.0) / F32(y_scale)))
    with np.errstate(all="ignore"):
        r = np.rint(((e * scale).astype(F32) / total).astype(F32)).astype(np.float64)
    if x2.dtype == np.int8:  # saturated to [-128, 127]; inf -> 127 (measured against onnxruntime 1.32)
        return np.clip(r + int(y_zero_point), -128, 127).astype(np.int8)
    t = r + int(y_zero_point)
    # e * floor(1 / y_scale) may overflow to inf: the kernel's uint32 conversion then lands above 255 too
    return np.where(t > 255, 255, t).astype(np.uint8)


def _rule(x, *rest, **attrs):
    return TensorInfo(x.dtype, x.shape)


@register("QLinearSoftmax", since=1, domain=MS, infer=_rule)
def qlinear_softmax(X, X_scale, x_zero_point=None, y_scale=None, y_zero_point=None, *, axis=None, opset):
    """QLinearSoftmax (uint8 or int8) exactly as onnxruntime's CPU kernel (see the module docstring)."""
    if X.dtype not in (np.uint8, np.int8):
        raise TypeError(f"QLinearSoftmax: uint8 or int8 input (as onnxruntime), got {X.dtype}")
    if axis is None:
        axis = 1 if opset < 13 else -1
    axis %= X.ndim
    yz = 0 if y_zero_point is None else int(np.asarray(y_zero_point).reshape(()))
    if X.size == 0:
        return X.copy()
    if opset < 13:
        d = int(np.prod(X.shape[axis:]))
        return _rows(X.reshape(-1, d), softmax_table(np.asarray(X_scale).reshape(()), d), y_scale, yz).reshape(X.shape)
    moved = np.moveaxis(X, axis, -1)
    d = moved.shape[-1]
    y = _rows(moved.reshape(-1, d), softmax_table(np.asarray(X_scale).reshape(()), d), y_scale, yz)
    return np.moveaxis(y.reshape(moved.shape), -1, axis)
