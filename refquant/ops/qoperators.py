"""Quantized operators, bit-exact with onnxruntime 1.32 CPU (x86-64).

Default domain: QLinearConv, QLinearMatMul, ConvInteger, MatMulInteger, DynamicQuantizeLinear.
com.microsoft: QGemm, QLinearAdd, QLinearMul, QLinearSigmoid, QLinearLeakyRelu, QLinearAveragePool,
QLinearGlobalAveragePool, QLinearConcat.

Integer products are summed exactly: the operands (zero points subtracted) are converted to float64 and
multiplied in BLAS (``ops.nn.conv`` / ``np.matmul``). Every product and partial sum is an integer, so the
float64 result is exact while ``K * max|a| * max|b| < 2^53`` (K = reduction length; for 8-bit operands
K < 1.3e11, i.e. always); past that bound an int64 path runs instead. The exact sum (+ int32 bias) must fit
int32, as onnxruntime accumulates in int32: when it cannot be ruled out from the shapes, the range is
checked and an OverflowError raised (the runtime names the node).

Requantization is :mod:`refquant.intsim.requant`'s ``ort`` scheme (float32 multiplier, round half to
even). The element-wise contrib ops follow the float32 formulas of the MLAS x86 kernels (see each
kernel's docstring); the FMA of the AVX2 QLinearAdd kernel is reproduced exactly by :func:`fma32`.
QLinearAdd and QLinearSigmoid are the AVX2/FMA3 kernels onnxruntime picks on any x86-64 CPU with AVX2;
SSE2-only CPUs and ARM (where QLinearAdd is a 22-bit fixed-point kernel) compute differently.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from ..intsim.requant import INT32_MAX, int32_or_wrap, ort_multiplier, requantize
from ..kernels import mlas
from . import nn as _nn
from .linalg import _matmul_rule
from .registry import register
from .shapes import TensorInfo, broadcast_shapes

MS = "com.microsoft"
F32 = np.float32
EXACT_LIMIT = 1 << 53  # integers summed in float64 stay exact below this magnitude

# How the compiler that built onnxruntime's MLAS evaluates the scalar float expressions of the AVX2
# QLinearAdd kernel (qladd_avx2.cpp). GCC contracts a*b + c into an FMA (-ffp-contract=fast); both were
# decided by running onnxruntime 1.32 on inputs where the variants disagree (tests/test_qoperators.py).
QLADD_FIXED_PART_FMA = True   # ZeroPointC - (rAC*ZeroPointA + rBC*ZeroPointB): fma(rAC, zA, rBC*zB)
QLADD_SCALAR_FMA = True       # FixedPart + b*rBC for a broadcast (scalar) operand: fma(b, rBC, FixedPart)


# ----------------------------------------------------------------------------------------- helpers
def fma32(a, b, c) -> np.ndarray:
    """float32 fused multiply-add ``round_f32(a*b + c)`` with one rounding, for float32 a, b, c.

    a*b is exact in float64 (24 + 24 bits); TwoSum gives the exact error of the float64 addition; the
    float64 sum is then rounded to odd (its last bit made sticky when the addition was inexact), and
    rounding a round-to-odd value with 29 spare bits to float32 equals rounding the exact value once.
    """
    a64 = np.asarray(a, dtype=F32).astype(np.float64)
    b64 = np.asarray(b, dtype=F32).astype(np.float64)
    c64 = np.asarray(c, dtype=F32).astype(np.float64)
    p = a64 * b64
    s = p + c64
    bb = s - p
    err = (p - (s - bb)) + (c64 - bb)
    fix = (err != 0) & ((np.asarray(s).view(np.int64) & 1) == 0)
    if np.any(fix):
        s = np.where(fix, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
    return np.asarray(s).astype(F32)


def _qrange(dtype) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def _scalar(value, name: str, default=None):
    """The single value of a scalar or 1-element tensor (``default`` when the input is omitted)."""
    if value is None:
        return default
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"{name} must be a scalar or a 1-element tensor, got shape {list(arr.shape)}")
    return arr.reshape(())


def _zp_int(value, name: str) -> int:
    v = _scalar(value, name)
    return 0 if v is None else int(v)


def _absmax(dtype, zp) -> int:
    """max |q - zp| over the integer range of ``dtype`` (a static bound on an operand)."""
    low, high = _qrange(dtype)
    zp = np.asarray(zp, dtype=np.int64)
    return int(max(high - zp.min(), zp.max() - low)) if zp.size else max(high, -low)


def _to_int32(acc, bound: int, op: str) -> np.ndarray:
    """Exact accumulators -> int32; OverflowError if they leave int32 (checked only when ``bound`` allows it),
    or wrapped modulo 2^32 as onnxruntime's int32 adds wrap, inside ``requant.int32_wraparound``."""
    if bound > INT32_MAX:
        return int32_or_wrap(acc, op, f"{op}: the int32 accumulator overflows (exact range [{{low}}, {{high}}]); "
                                      "onnxruntime would wrap around (IntSim(..., overflow='wrap') does too)")
    return acc.astype(np.int32)


def _f32(value) -> np.ndarray:
    return np.asarray(value, dtype=F32)


# ----------------------------------------------------------------------------------------- integer conv / matmul
def _conv_attrs(auto_pad, dilations, group, kernel_shape, pads, strides) -> dict:
    return dict(auto_pad=auto_pad, dilations=dilations, group=group, kernel_shape=kernel_shape, pads=pads,
                strides=strides)


def _channel_zp(zp, m: int, name: str) -> np.ndarray:
    """A weight zero point: scalar, or 1-D per output channel -> int64 array (M or 1 entries)."""
    if zp is None:
        return np.zeros(1, dtype=np.int64)
    arr = np.asarray(zp).astype(np.int64).reshape(-1)
    if arr.size not in (1, m):
        raise ValueError(f"{name} must be a scalar or have one entry per output channel ({m}), got {arr.size}")
    return arr


def _conv_accumulate(x, x_zp: int, w, w_zp: np.ndarray, attrs: dict, force_int64: bool = False):
    """sum_{c,k} (x - x_zp)(w - w_zp[m]): exact, float64 (BLAS) or int64 beyond the 2^53 bound.
    Returns (acc, bound) with bound a static upper bound of |acc|."""
    m = w.shape[0]
    k = int(np.prod(w.shape[1:]))
    bound = k * _absmax(x.dtype, x_zp) * _absmax(w.dtype, w_zp)
    wzp = w_zp.reshape((-1,) + (1,) * (w.ndim - 1)) if w_zp.size == m and m > 1 else w_zp.reshape(())
    if bound < EXACT_LIMIT and not force_int64:
        xd = x.astype(np.float64) - x_zp
        wd = w.astype(np.float64) - wzp
        return _nn.conv(xd, wd, None, **attrs), bound
    return _conv_int64(x.astype(np.int64) - x_zp, w.astype(np.int64) - wzp, **attrs), bound


def _conv_int64(x, w, *, auto_pad="NOTSET", dilations=None, group=1, kernel_shape=None, pads=None, strides=None):
    """Integer convolution in int64 (im2col + integer GEMM): the fallback past the float64 bound."""
    n_spatial = x.ndim - 2
    kernel = list(kernel_shape or w.shape[2:])
    begin, end, out_size = _nn.conv_geometry(list(x.shape[2:]), kernel, strides, dilations, pads, auto_pad)
    x3, w3 = _nn._as3d(x), _nn._as3d(w)
    stride3 = _nn._i64(_nn._to3(strides or [1] * n_spatial, 1))
    dilation3 = _nn._i64(_nn._to3(dilations or [1] * n_spatial, 1))
    begin3, end3, out3 = _nn._to3(begin, 0), _nn._to3(end, 0), tuple(int(o) for o in _nn._to3(out_size, 1))
    kernel3 = tuple(int(k) for k in w3.shape[2:])
    xp = np.pad(x3, [(0, 0), (0, 0)] + [(int(b), max(int(e), 0)) for b, e in zip(begin3, end3)])
    n, c_in = x3.shape[:2]
    m = w3.shape[0]
    cg, mg = c_in // group, m // group
    y = np.empty((n, m, int(np.prod(out3))), dtype=np.int64)
    for i in range(n):
        for g in range(group):
            view = _nn._windows(xp[i, g * cg:(g + 1) * cg], kernel3, stride3, dilation3, out3)
            cols = np.ascontiguousarray(view).reshape(cg * int(np.prod(kernel3)), -1)
            y[i, g * mg:(g + 1) * mg] = np.matmul(w3[g * mg:(g + 1) * mg].reshape(mg, -1), cols)
    return y.reshape((n, m) + tuple(out_size))


def _matmul_accumulate(a, a_zp, b, b_zp, force_int64: bool = False):
    """(a - a_zp) @ (b - b_zp) exactly (MatMul broadcasting); returns (acc, bound)."""
    k = a.shape[-1]
    bound = k * _absmax(a.dtype, a_zp) * _absmax(b.dtype, b_zp)
    if bound < EXACT_LIMIT and not force_int64:
        return np.matmul(a.astype(np.float64) - a_zp, b.astype(np.float64) - b_zp), bound
    return np.matmul(a.astype(np.int64) - a_zp, b.astype(np.int64) - b_zp), bound


def _row_param(value, a, name):
    """A per-row parameter of A [.., M, K]: scalar -> (), 1-D [M] -> [M, 1], N-D as given."""
    arr = np.asarray(value)
    if arr.size == 1:
        return arr.reshape(())
    if arr.ndim == 1:
        if a.ndim < 2 or arr.shape[0] != a.shape[-2]:
            raise ValueError(f"{name} of shape {list(arr.shape)} does not match the rows of A {list(a.shape)}")
        return arr.reshape(-1, 1)
    return arr


def _col_param(value, b, name):
    """A per-column parameter of B [.., K, N]: scalar -> (), 1-D [N] -> [N], N-D as given."""
    arr = np.asarray(value)
    if arr.size == 1:
        return arr.reshape(())
    if arr.ndim == 1 and (b.ndim < 2 or arr.shape[0] != b.shape[-1]):
        raise ValueError(f"{name} of shape {list(arr.shape)} does not match the columns of B {list(b.shape)}")
    return arr


def _output_multiplier(x_scale, w_scale, y_scale) -> np.ndarray:
    """onnxruntime's float32 ``f32(f32(x_scale * w_scale) / y_scale)``. float16 scales (QLinearMatMul-21) are
    widened to float32 first, as onnxruntime does (measured: combining them in float16, as onnx.reference
    does, differs from onnxruntime)."""
    return ort_multiplier(x_scale, w_scale, y_scale)


# ----------------------------------------------------------------------------------------- shape rules
def _with_dtype(info, dtype):
    return TensorInfo(np.dtype(dtype) if dtype is not None else None, None if info is None else info.shape)


def _qlinear_conv_rule(x, xs, xz, w, ws, wz, ys, yz=None, b=None, **attrs):
    dtype = yz.dtype if yz is not None and yz.dtype is not None else x.dtype
    return _with_dtype(_nn._conv_rule(x, w, **attrs), dtype)


def _conv_integer_rule(x, w, xz=None, wz=None, **attrs):
    return _with_dtype(_nn._conv_rule(x, w, **attrs), np.int32)


def _qlinear_matmul_rule(a, as_, az, b, bs, bz, ys, yz=None):
    dtype = yz.dtype if yz is not None and yz.dtype is not None else a.dtype
    return _with_dtype(_matmul_rule(a, b), dtype)


def _matmul_integer_rule(a, b, az=None, bz=None):
    return _with_dtype(_matmul_rule(a, b), np.int32)


def _dynamic_quantize_rule(x):
    return (TensorInfo(np.dtype(np.uint8), x.shape), TensorInfo(np.dtype(np.float32), ()),
            TensorInfo(np.dtype(np.uint8), ()))


def _qgemm_rule(a, as_, az, b, bs, bz, c=None, ys=None, yz=None, *, alpha=1.0, transA=0, transB=0):
    dtype = yz.dtype if yz is not None else np.float32
    if a.shape is None or b.shape is None:
        return TensorInfo(np.dtype(dtype), None)
    m = a.shape[1] if transA else a.shape[0]
    n = b.shape[0] if transB else b.shape[1]
    return TensorInfo(np.dtype(dtype), (m, n))


def _qlinear_binary_rule(a, as_, az, b, bs, bz, cs, cz=None):
    return TensorInfo(a.dtype, broadcast_shapes(a.shape, b.shape))


def _qlinear_unary_rule(x, *rest, **attrs):
    return TensorInfo(x.dtype, x.shape)


def _qlinear_avgpool_rule(x, xs, xz, ys, yz=None, *, auto_pad="NOTSET", ceil_mode=0, channels_last=0,
                          count_include_pad=0, kernel_shape=None, pads=None, strides=None):
    if x.shape is None:
        return TensorInfo(x.dtype, None)
    shape = tuple(x.shape)
    if channels_last:
        shape = (shape[0], shape[-1]) + shape[1:-1]
    spatial = list(shape[2:])
    if all(isinstance(d, int) for d in spatial):
        _, _, out = _nn.conv_geometry(spatial, kernel_shape, strides, None, pads, auto_pad, bool(ceil_mode), True)
    else:
        out = [None] * len(spatial)
    result = (shape[0], shape[1], *out)
    if channels_last:
        result = (result[0],) + tuple(result[2:]) + (result[1],)
    return TensorInfo(x.dtype, result)


def _qlinear_global_rule(x, *rest, channels_last=0):
    if x.shape is None:
        return TensorInfo(x.dtype, None)
    shape = tuple(x.shape)
    if channels_last:
        return TensorInfo(x.dtype, (shape[0],) + (1,) * (len(shape) - 2) + (shape[-1],))
    return TensorInfo(x.dtype, shape[:2] + (1,) * (len(shape) - 2))


def _qlinear_concat_rule(ys, yz, *inputs, axis):
    xs = inputs[0::3]
    dtype = yz.dtype if yz is not None else xs[0].dtype
    if any(x is None or x.shape is None for x in xs):
        return TensorInfo(dtype, None)
    rank = len(xs[0].shape)
    ax = axis % rank
    total = 0
    for x in xs:
        d = x.shape[ax]
        if not isinstance(d, int):
            total = None
            break
        total += d
    shape = list(xs[0].shape)
    shape[ax] = total
    return TensorInfo(dtype, tuple(shape))


# ----------------------------------------------------------------------------------------- default domain
@register("QLinearConv", since=10, infer=_qlinear_conv_rule)
def qlinear_conv(x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point=None, B=None, *,
                 auto_pad="NOTSET", dilations=None, group=1, kernel_shape=None, pads=None, strides=None):
    """y = clamp(rne(f32(acc) * f32(f32(x_scale * w_scale[m]) / y_scale)) + y_zp), acc = int32
    sum (x - x_zp)(w - w_zp[m]) + B[m]  (onnxruntime MlasRequantizeOutput; per-channel w_scale/w_zp)."""
    out_dtype = np.asarray(y_zero_point).dtype if y_zero_point is not None else x.dtype
    m = w.shape[0]
    x_zp = _zp_int(x_zero_point, "x_zero_point")
    w_zp = _channel_zp(w_zero_point, m, "w_zero_point")
    w_scale = np.asarray(w_scale).reshape(-1)
    if w_scale.size not in (1, m):
        raise ValueError(f"w_scale must be a scalar or have one entry per output channel ({m}), got {w_scale.size}")
    attrs = _conv_attrs(auto_pad, dilations, group, kernel_shape, pads, strides)
    acc, bound = _conv_accumulate(x, x_zp, w, w_zp, attrs)
    if B is not None:
        bias = np.asarray(B).reshape(-1)
        acc = acc + bias.astype(acc.dtype).reshape((-1,) + (1,) * (x.ndim - 2))
        bound += int(np.abs(bias.astype(np.int64)).max(initial=0))
    acc32 = _to_int32(acc, bound, "QLinearConv")
    mult = _output_multiplier(_scalar(x_scale, "x_scale"), w_scale, _scalar(y_scale, "y_scale"))
    qmin, qmax = _qrange(out_dtype)
    return requantize(acc32, mult.reshape(-1) if mult.size > 1 else mult.reshape(()),
                      _zp_int(y_zero_point, "y_zero_point"), qmin, qmax, scheme="ort", axis=1, dtype=out_dtype)


@register("ConvInteger", since=10, infer=_conv_integer_rule)
def conv_integer(x, w, x_zero_point=None, w_zero_point=None, *, auto_pad="NOTSET", dilations=None, group=1,
                 kernel_shape=None, pads=None, strides=None):
    """y = int32 sum (x - x_zp)(w - w_zp[m]) over each window (w_zp scalar or per output channel)."""
    m = w.shape[0]
    attrs = _conv_attrs(auto_pad, dilations, group, kernel_shape, pads, strides)
    acc, bound = _conv_accumulate(x, _zp_int(x_zero_point, "x_zero_point"), w,
                                  _channel_zp(w_zero_point, m, "w_zero_point"), attrs)
    return _to_int32(acc, bound, "ConvInteger")


def _qlinear_matmul(a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point=None):
    out_dtype = np.asarray(y_zero_point).dtype if y_zero_point is not None else a.dtype
    a_zp = _row_param(a_zero_point if a_zero_point is not None else 0, a, "a_zero_point").astype(np.int64)
    b_zp = _col_param(b_zero_point if b_zero_point is not None else 0, b, "b_zero_point").astype(np.int64)
    acc, bound = _matmul_accumulate(a, a_zp, b, b_zp)
    acc32 = _to_int32(acc, bound, "QLinearMatMul")
    mult = _output_multiplier(_row_param(a_scale, a, "a_scale"), _col_param(b_scale, b, "b_scale"),
                              _scalar(y_scale, "y_scale"))
    if b.ndim == 1 and mult.ndim >= 1 and mult.shape[-1] == 1:
        mult = mult[..., 0]  # [.., M, 1] rows of a 1-D product
    qmin, qmax = _qrange(out_dtype)
    return requantize(acc32, mult, _zp_int(y_zero_point, "y_zero_point"), qmin, qmax, scheme="ort",
                      dtype=out_dtype)


@register("QLinearMatMul", since=10, infer=_qlinear_matmul_rule)
def qlinear_matmul(a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point=None):
    """y = clamp(rne(f32(acc) * f32(f32(a_scale * b_scale) / y_scale)) + y_zp), acc = (a - a_zp) @ (b - b_zp)
    in int32; per-row a and per-column b scales / zero points broadcast ([M] or [.., M, 1]; [N] or [.., 1, N])."""
    return _qlinear_matmul(a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point)


@register("QLinearMatMul", since=21, infer=_qlinear_matmul_rule)
def qlinear_matmul_21(a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point=None):
    """QLinearMatMul-21: as opset 10; the scales may also be float16 (widened to float32)."""
    return _qlinear_matmul(a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point)


@register("MatMulInteger", since=10, infer=_matmul_integer_rule)
def matmul_integer(A, B, a_zero_point=None, b_zero_point=None):
    """y = int32 (A - a_zp) @ (B - b_zp); a_zp per row ([M] or [.., M, 1]), b_zp per column ([N] or [.., 1, N])."""
    a_zp = _row_param(a_zero_point if a_zero_point is not None else 0, A, "a_zero_point").astype(np.int64)
    b_zp = _col_param(b_zero_point if b_zero_point is not None else 0, B, "b_zero_point").astype(np.int64)
    acc, bound = _matmul_accumulate(A, a_zp, B, b_zp)
    return _to_int32(acc, bound, "MatMulInteger")


def _mlas_quantize(x, scale, zero_point: int, dtype) -> np.ndarray:
    """MlasQuantizeLinear: clamp(f32(x) / f32(scale), qmin - zp, qmax - zp), round half even, + zp."""
    qmin, qmax = _qrange(dtype)
    with np.errstate(all="ignore"):
        f = (np.asarray(x, dtype=F32) / F32(scale)).astype(F32)
    f = np.minimum(np.maximum(f, F32(qmin - zero_point)), F32(qmax - zero_point))
    f = np.where(np.isnan(f), F32(qmin - zero_point), f)
    return (np.rint(f).astype(np.int64) + zero_point).astype(dtype)


@register("DynamicQuantizeLinear", since=11, infer=_dynamic_quantize_rule)
def dynamic_quantize_linear(x):
    """uint8 with min = min(0, min x), max = max(0, max x) (float32):
    scale = max == min ? 1 : (max - min) / 255; zp = rne(clamp(0 - min / scale, 0, 255));
    y = clamp(rne(x / scale) + zp) (onnxruntime GetQuantizationParameter + MlasQuantizeLinear)."""
    xf = np.asarray(x, dtype=F32)
    low = min(F32(xf.min()) if xf.size else F32(0), F32(0))
    high = max(F32(xf.max()) if xf.size else F32(0), F32(0))
    scale = F32(1.0) if high == low else F32(F32(high - low) / F32(255))
    initial = F32(F32(0) - F32(low / scale))
    zp = int(np.rint(min(max(initial, F32(0)), F32(255))))
    y = _mlas_quantize(xf, scale, zp, np.uint8)
    return y, np.array(scale, dtype=F32), np.array(zp, dtype=np.uint8)


# ----------------------------------------------------------------------------------------- com.microsoft: QGemm
@register("QGemm", since=1, domain=MS, infer=_qgemm_rule)
def qgemm(A, a_scale, a_zero_point, B, b_scale, b_zero_point, C=None, y_scale=None, y_zero_point=None, *,
          alpha=1.0, transA=0, transB=0):
    """acc = (A' - a_zp) @ (B' - b_zp[n]) + C (int32, C broadcast to [M, N]); scale[n] = f32(f32(f32(alpha *
    a_scale) * b_scale[n]) / y_scale). With y_zero_point: y = clamp(rne(f32(acc) * scale) + y_zp) (MLAS requant);
    without: float32 y = f32(acc) * scale (y_scale omitted: no division)."""
    a = A.T if transA else A
    b = B.T if transB else B
    n = b.shape[1]
    a_zp = _zp_int(a_zero_point, "a_zero_point")
    b_zp = np.asarray(b_zero_point if b_zero_point is not None else 0).astype(np.int64).reshape(-1)
    if b_zp.size not in (1, n):
        raise ValueError(f"QGemm: b_zero_point must be a scalar or have N={n} entries, got {b_zp.size}")
    b_zp = b_zp.reshape(()) if b_zp.size == 1 else b_zp
    acc, bound = _matmul_accumulate(a, np.int64(a_zp), b, b_zp)
    if C is not None:
        acc = acc + np.asarray(C).astype(acc.dtype)
        bound += int(np.abs(np.asarray(C, dtype=np.int64)).max(initial=0))
    acc32 = _to_int32(acc, bound, "QGemm")
    bs = np.asarray(b_scale, dtype=F32).reshape(-1)
    scale = ((F32(alpha) * _f32(_scalar(a_scale, "a_scale"))).astype(F32) * bs).astype(F32)
    if y_scale is not None:
        scale = (scale / _f32(_scalar(y_scale, "y_scale"))).astype(F32)
    scale = scale.reshape(()) if scale.size == 1 else scale
    if y_zero_point is None:
        return (acc32.astype(F32) * scale).astype(F32)
    out_dtype = np.asarray(y_zero_point).dtype
    qmin, qmax = _qrange(out_dtype)
    return requantize(acc32, scale, _zp_int(y_zero_point, "y_zero_point"), qmin, qmax, scheme="ort",
                      dtype=out_dtype)


# ----------------------------------------------------------------------------------------- QLinearAdd / Mul
def ort_broadcast_mode(shape_a, shape_b) -> str:
    """Which span functor onnxruntime's BroadcastLooper runs for two input shapes: "a_scalar" (input 0 is
    constant along the innermost span), "b_scalar", or "general" (both are spans). Mirrors the
    constructor of onnxruntime's Broadcaster (element_wise_ops.h): the innermost dimension where either
    shape exceeds 1 decides; the other spans are the same per element."""
    sa, sb = [int(d) for d in shape_a], [int(d) for d in shape_b]
    if not sa or not sb:
        a_vec = bool(sa) and sa[-1] > 1
        b_vec = bool(sb) and sb[-1] > 1
    else:
        n = min(len(sa), len(sb))
        a_vec = b_vec = False
        for index in range(n):
            d1, d2 = sa[-1 - index], sb[-1 - index]
            dim = max(d1, d2) if min(d1, d2) != 0 else 0
            if dim <= 1 and index + 1 < n:
                continue
            a_vec, b_vec = d1 > 1, d2 > 1
            break
    if not a_vec:
        return "a_scalar"
    if not b_vec:
        return "b_scalar"
    return "general"


def _qladd_avx2(va, sa, za, vb, sb, zb, sc, zc, b_is_scalar, dtype):
    """MlasQLinearAddKernelAvx2Helper (per element; ``va`` the vector operand, ``vb`` the other one):

        rAC = f32(sa / sc); rBC = f32(sb / sc)
        Fixed = f32(zc) - (rAC*za + rBC*zb)                     (float32; FMA-contracted, see module flags)
        vector b:  t = fma(va, rAC, fma(vb, rBC, Fixed))
        scalar b:  t = fma(va, rAC, Fixed + vb*rBC)
        q = saturate(cvtps2dq(t))                               (round half even, packs/packus)
    """
    r_ac = F32(F32(sa) / F32(sc))
    r_bc = F32(F32(sb) / F32(sc))
    if QLADD_FIXED_PART_FMA:
        s = fma32(r_ac, F32(za), F32(r_bc * F32(zb)))
    else:
        s = F32(F32(r_ac * F32(za)) + F32(r_bc * F32(zb)))
    fixed = F32(F32(zc) - F32(s))
    va = np.asarray(va).astype(F32)
    vb = np.asarray(vb).astype(F32)
    if b_is_scalar:
        fixed = fma32(vb, r_bc, fixed) if QLADD_SCALAR_FMA else (fixed + (vb * r_bc).astype(F32)).astype(F32)
        t = fma32(va, r_ac, fixed)
    else:
        t = fma32(va, r_ac, fma32(vb, r_bc, fixed))
    qmin, qmax = _qrange(dtype)
    r = np.rint(t.astype(np.float64))
    r = np.where(np.abs(t) < 2.0 ** 31, r, -2.0 ** 31)  # cvtps2dq: out of range -> 0x80000000
    return np.clip(r, qmin, qmax).astype(dtype)


def _check_8bit(op, *arrays):
    for a in arrays:
        if a.dtype not in (np.int8, np.uint8):
            raise TypeError(f"{op}: int8/uint8 tensors only (onnxruntime 1.32's schema), got {a.dtype}")


def _binary_params(A, A_scale, A_zero_point, B, B_scale, B_zero_point, C_scale, C_zero_point):
    return (F32(_scalar(A_scale, "A_scale")), _zp_int(A_zero_point, "A_zero_point"),
            F32(_scalar(B_scale, "B_scale")), _zp_int(B_zero_point, "B_zero_point"),
            F32(_scalar(C_scale, "C_scale")), _zp_int(C_zero_point, "C_zero_point"))


@register("QLinearAdd", since=1, domain=MS, infer=_qlinear_binary_rule)
def qlinear_add(A, A_scale, A_zero_point, B, B_scale, B_zero_point, C_scale, C_zero_point=None):
    """C = saturate(rne(sa/sc (a - za) + sb/sc (b - zb)) + zc) as onnxruntime's x86 AVX2 kernel computes it
    (:func:`_qladd_avx2`), onnxruntime's broadcast structure deciding which operand is the kernel's
    vector and which its scalar (:func:`ort_broadcast_mode`). int8/uint8, as onnxruntime 1.32's schema."""
    _check_8bit("QLinearAdd", A, B)
    sa, za, sb, zb, sc, zc = _binary_params(A, A_scale, A_zero_point, B, B_scale, B_zero_point, C_scale,
                                            C_zero_point)
    shape = np.broadcast_shapes(A.shape, B.shape)
    a, b = np.broadcast_to(A, shape), np.broadcast_to(B, shape)
    mode = ort_broadcast_mode(A.shape, B.shape)
    if mode == "a_scalar":  # the kernel runs with B's span as its vector and A as its scalar
        return _qladd_avx2(b, sb, zb, a, sa, za, sc, zc, True, A.dtype)
    return _qladd_avx2(a, sa, za, b, sb, zb, sc, zc, mode == "b_scalar", A.dtype)


@register("QLinearMul", since=1, domain=MS, infer=_qlinear_binary_rule)
def qlinear_mul(A, A_scale, A_zero_point, B, B_scale, B_zero_point, C_scale, C_zero_point=None):
    """C = saturate(rne(f32(f32((a - za)(b - zb)) * f32(f32(sa * sb) / sc)) + f32(zc)))  (MLAS SSE2 kernel:
    exact int32 product, float32 multiply then add, cvtps2dq, packs)."""
    _check_8bit("QLinearMul", A, B)
    sa, za, sb, zb, sc, zc = _binary_params(A, A_scale, A_zero_point, B, B_scale, B_zero_point, C_scale,
                                            C_zero_point)
    ratio = F32(F32(sa * sb) / sc)
    prod = (A.astype(np.int64) - za) * (B.astype(np.int64) - zb)
    t = ((prod.astype(F32) * ratio).astype(F32) + F32(zc)).astype(F32)
    qmin, qmax = _qrange(A.dtype)
    r = np.rint(t.astype(np.float64))
    r = np.where(np.abs(t) < 2.0 ** 31, r, -2.0 ** 31)
    return np.clip(r, qmin, qmax).astype(A.dtype)


# ----------------------------------------------------------------------------------------- lookup-table ops
def mlas_logistic(x) -> np.ndarray:
    """MlasComputeLogistic as onnxruntime computes it (Eigen's rational approximation, float32):
    v = clamp(x, -18, 18); p = v*(((a9 v^2 + a7) v^2 + a5) v^2 + a3) v^2 + a1); q = ((((b10 v^2 + b8) v^2
    + b6) v^2 + b4) v^2 + b2) v^2 + b0, every step one FMA; y = max(p / q + 0.5, 0).
    See :func:`refquant.kernels.mlas.logistic`."""
    return mlas.logistic(np.asarray(x, dtype=F32))


def lookup_table(x_scale, x_zero_point, y_scale, y_zero_point, dtype, fn) -> np.ndarray:
    """onnxruntime's QlinearBuildLookupTable: for each of the 256 codes, f32(x_scale * (code - x_zp)),
    then ``fn`` (float32 -> float32), then MlasQuantizeLinear with (y_scale, y_zp). Indexed by the code's
    byte (uint8 view)."""
    codes = np.arange(256, dtype=np.uint8).view(dtype).astype(np.int64)
    deq = (F32(x_scale) * (codes - int(x_zero_point)).astype(F32)).astype(F32)
    return _mlas_quantize(np.asarray(fn(deq), dtype=F32), F32(y_scale), int(y_zero_point), dtype)


def _apply_table(x, table):
    return table[np.ascontiguousarray(x).view(np.uint8)]


def _lut_params(X_scale, X_zero_point, Y_scale, Y_zero_point):
    return (F32(_scalar(X_scale, "X_scale")), _zp_int(X_zero_point, "X_zero_point"),
            F32(_scalar(Y_scale, "Y_scale")), _zp_int(Y_zero_point, "Y_zero_point"))


@register("QLinearSigmoid", since=1, domain=MS, infer=_qlinear_unary_rule)
def qlinear_sigmoid(X, X_scale, X_zero_point, Y_scale, Y_zero_point=None):
    """Y = table[X], table = quantize(mlas_logistic(dequantize(code))) over the 256 codes."""
    xs, xz, ys, yz = _lut_params(X_scale, X_zero_point, Y_scale, Y_zero_point)
    return _apply_table(X, lookup_table(xs, xz, ys, yz, X.dtype, mlas_logistic))


@register("QLinearLeakyRelu", since=1, domain=MS, infer=_qlinear_unary_rule)
def qlinear_leaky_relu(X, X_scale, X_zero_point, Y_scale, Y_zero_point=None, *, alpha=0.01):
    """Y = table[X], table = quantize(v >= 0 ? v : f32(alpha * v)) of v = dequantize(code)."""
    xs, xz, ys, yz = _lut_params(X_scale, X_zero_point, Y_scale, Y_zero_point)
    a = F32(alpha)
    return _apply_table(X, lookup_table(xs, xz, ys, yz, X.dtype,
                                        lambda v: np.where(v >= 0, v, (a * v).astype(F32)).astype(F32)))


@register("QLinearConcat", since=1, domain=MS, infer=_qlinear_concat_rule)
def qlinear_concat(Y_scale, Y_zero_point, *inputs, axis):
    """Concatenate (X, X_scale, X_zero_point) triples along ``axis`` after requantizing each to (Y_scale, Y_zp):
    a copy when scale and zero point equal Y's, else an identity lookup table (dequantize, MlasQuantizeLinear)."""
    if len(inputs) < 3 or len(inputs) % 3:
        raise ValueError("QLinearConcat: inputs after Y_scale and Y_zero_point must be (X, X_scale, X_zero_point) "
                         "triples")
    ys = F32(_scalar(Y_scale, "Y_scale"))
    yz = _zp_int(Y_zero_point, "Y_zero_point")
    parts = []
    for x, xs, xz in zip(inputs[0::3], inputs[1::3], inputs[2::3]):
        xs_v = F32(_scalar(xs, "X_scale"))
        xz_v = _zp_int(xz, "X_zero_point")
        if xs_v == ys and xz_v == yz:
            parts.append(x)
        else:
            parts.append(_apply_table(x, lookup_table(xs_v, xz_v, ys, yz, x.dtype, lambda v: v)))
    return np.concatenate(parts, axis=axis)


# ----------------------------------------------------------------------------------------- pooling
def _global_average_pool_int(x, xs, xz, ys, yz, n_spatial_axes):
    """MlasQLinearGlobalAveragePool (x86): acc = int32 sum(x) - xz * N; scale = f32(xs / f32(ys * f32(N)));
    y = clamp(rne(f32(acc) * scale), qmin - yz, qmax - yz) + yz. N < 2^24 and 2^-32 <= scale < 256 are
    required, as in onnxruntime."""
    image = int(np.prod([x.shape[a] for a in n_spatial_axes])) if n_spatial_axes else 1
    if image >= 1 << 24:
        raise ValueError("QLinearGlobalAveragePool: image size >= 2^24 (onnxruntime refuses it)")
    scale = F32(F32(xs) / F32(F32(ys) * F32(image)))
    if not (F32(2.0 ** -32) <= scale < F32(256.0)):
        raise ValueError(f"QLinearGlobalAveragePool: scale {float(scale)} out of onnxruntime's range [2^-32, 256)")
    acc = x.astype(np.int64).sum(axis=tuple(n_spatial_axes), keepdims=True) - xz * image
    qmin, qmax = _qrange(x.dtype)
    return requantize(acc, scale, yz, qmin, qmax, scheme="ort", dtype=x.dtype)


@register("QLinearGlobalAveragePool", since=1, domain=MS, infer=_qlinear_global_rule)
def qlinear_global_average_pool(X, x_scale, x_zero_point, y_scale, y_zero_point, *, channels_last=0):
    """Integer mean over the spatial dims, requantized in float32 (:func:`_global_average_pool_int`)."""
    axes = tuple(range(1, X.ndim - 1)) if channels_last else tuple(range(2, X.ndim))
    return _global_average_pool_int(X, F32(_scalar(x_scale, "x_scale")), _zp_int(x_zero_point, "x_zero_point"),
                                    F32(_scalar(y_scale, "y_scale")), _zp_int(y_zero_point, "y_zero_point"), axes)


@register("QLinearAveragePool", since=1, domain=MS, infer=_qlinear_avgpool_rule)
def qlinear_average_pool(X, x_scale, x_zero_point, y_scale, y_zero_point=None, *, auto_pad="NOTSET", ceil_mode=0,
                         channels_last=0, count_include_pad=0, kernel_shape, pads=None, strides=None):
    """onnxruntime QLinearAveragePool: x' = f32(x_scale * (x - x_zp)); per window a float32 sum in row-major
    order over the taps inside x, divided by the tap count (kernel size with count_include_pad, else the
    taps inside x); y = clamp(nearbyintf(f32(f32(sum / count) / y_scale) + y_zp)). A kernel covering the
    whole unpadded image runs the integer global-average path instead, as in onnxruntime."""
    x = np.moveaxis(X, -1, 1) if channels_last else X
    xs, xz = F32(_scalar(x_scale, "x_scale")), _zp_int(x_zero_point, "x_zero_point")
    ys, yz = F32(_scalar(y_scale, "y_scale")), _zp_int(y_zero_point, "y_zero_point")
    spatial = list(x.shape[2:])
    n_sp = len(spatial)
    kernel = [int(k) for k in kernel_shape]
    strides = list(strides or [1] * n_sp)
    begin, end, out = _nn.conv_geometry(spatial, kernel, strides, None, pads, auto_pad, bool(ceil_mode), True)
    if spatial == kernel and not any(begin) and not any(end):
        y = _global_average_pool_int(x, xs, xz, ys, yz, tuple(range(2, x.ndim)))
    else:
        xf = (xs * (x.astype(np.int64) - xz).astype(F32)).astype(F32)
        reach = [(o - 1) * s + k for o, s, k in zip(out, strides, kernel)]
        widths = [(0, 0), (0, 0)] + [(b, max(0, r - b - n)) for b, r, n in zip(begin, reach, spatial)]
        xp = np.pad(xf, widths)  # zero taps add nothing to a float sum: the valid taps keep their order
        total = np.zeros(x.shape[:2] + tuple(out), dtype=F32)
        for tap in itertools.product(*[range(k) for k in kernel]):
            index = (slice(None), slice(None)) + tuple(
                slice(t, t + (o - 1) * s + 1, s) for t, o, s in zip(tap, out, strides))
            total += xp[index]
        if count_include_pad:
            count = np.full(tuple(out), F32(math.prod(kernel)), dtype=F32)
        else:
            count = np.ones(tuple(out), dtype=np.int64)
            for axis, (o, s, k, b, n) in enumerate(zip(out, strides, kernel, begin, spatial)):
                start = np.arange(o) * s - b
                extent = np.minimum(start + k, n) - np.maximum(start, 0)  # taps inside x along this axis
                count = count * extent.reshape([-1 if i == axis else 1 for i in range(n_sp)])
            count = count.astype(F32)
        mean = (total / count).astype(F32)
        t = ((mean / ys).astype(F32) + F32(yz)).astype(F32)
        qmin, qmax = _qrange(x.dtype)
        r = np.rint(t.astype(np.float64))
        r = np.where(np.abs(t) < 2.0 ** 31, r, -2.0 ** 31)
        y = np.clip(r, qmin, qmax).astype(x.dtype)
    return np.moveaxis(y, 1, -1) if channels_last else y
