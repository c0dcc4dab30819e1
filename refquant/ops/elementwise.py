"""Element-wise ops: arithmetic, comparison, logic, unary math, variadic reductions, Where, Clip, Cast.

NumPy broadcasting is ONNX's multidirectional broadcasting. Results keep the first input's element
type (NumPy would promote float32 with a float64 scalar array; ONNX never does).
"""

from __future__ import annotations

import numpy as np
import scipy.special

from .. import dtypes, parallel
from ..kernels import mlas
from .registry import register, register_inplace
from .shapes import TensorInfo, broadcast_rule, comparison_rule, same_as_first


def _typed(result: np.ndarray, like: np.ndarray) -> np.ndarray:
    return result if result.dtype == like.dtype else result.astype(like.dtype)


# ---------------------------------------------------------------- binary arithmetic
def _same_float(a, b) -> bool:
    return (type(a) is np.ndarray and type(b) is np.ndarray and a.dtype == b.dtype and a.dtype.kind == "f")


def _binary(op_type, fn, since=7, ufunc=None):
    """Register ``op_type``; with a ufunc, float tensors of one dtype take the threaded (and in-place) path."""

    @register(op_type, since=since, infer=broadcast_rule)
    def kernel(a, b):
        if ufunc is not None and _same_float(a, b):
            out = np.empty(np.broadcast_shapes(a.shape, b.shape), dtype=a.dtype)
            return parallel.elementwise(ufunc, out, a, b)
        with np.errstate(all="ignore"):
            return _typed(np.asarray(fn(a, b)), a)

    kernel.__name__ = op_type.lower()
    if ufunc is not None:
        @register_inplace(kernel)
        def inplace(a, b):
            if not _same_float(a, b) or np.broadcast_shapes(a.shape, b.shape) != a.shape:
                return None
            return parallel.elementwise(ufunc, a, a, b)

    return kernel


def _int_div(a, b):
    """Integer division truncating toward zero (C semantics), float division otherwise."""
    if np.issubdtype(a.dtype, np.integer):
        q = np.floor_divide(a, b)
        adjust = (np.remainder(a, b) != 0) & ((a < 0) ^ (b < 0))
        return q + adjust.astype(q.dtype)
    return np.divide(a, b)


_binary("Add", np.add, ufunc=np.add)
_binary("Sub", np.subtract, ufunc=np.subtract)
_binary("Mul", np.multiply, ufunc=np.multiply)
_binary("Div", _int_div, ufunc=np.divide)
_binary("Pow", np.power)


@register("Mod", since=10, infer=broadcast_rule)
def mod(a, b, *, fmod=0):
    """fmod=1: sign of the dividend (C fmod); fmod=0: sign of the divisor (Python %)."""
    with np.errstate(all="ignore"):
        return _typed(np.fmod(a, b) if fmod else np.mod(a, b), a)


# ---------------------------------------------------------------- comparison and logic
def _compare(op_type, fn, since=7):
    @register(op_type, since=since, infer=comparison_rule)
    def kernel(a, b):
        return np.asarray(fn(a, b))

    kernel.__name__ = op_type.lower()


for _op, _fn in [("Equal", np.equal), ("Greater", np.greater), ("Less", np.less),
                 ("GreaterOrEqual", np.greater_equal), ("LessOrEqual", np.less_equal),
                 ("And", np.logical_and), ("Or", np.logical_or), ("Xor", np.logical_xor)]:
    _compare(_op, _fn)


@register("Not", infer=same_as_first)
def not_(x):
    return np.logical_not(x)


# ---------------------------------------------------------------- unary math
def _unary(op_type, fn, since=6):
    @register(op_type, since=since, infer=same_as_first)
    def kernel(x):
        with np.errstate(all="ignore"):
            return _typed(np.asarray(fn(x)), x)

    kernel.__name__ = op_type.lower()


def _float32_mlas(mlas_fn, other):
    """onnxruntime computes float32 Tanh, Erf and Exp with MLAS's approximations (bit for bit here); other
    dtypes use ``other``."""
    def fn(x):
        return mlas_fn(x) if type(x) is np.ndarray and x.dtype == np.float32 else other(x)
    return fn


for _op, _fn in [("Abs", np.abs), ("Neg", np.negative), ("Ceil", np.ceil), ("Floor", np.floor),
                 ("Sign", np.sign), ("Sqrt", np.sqrt), ("Reciprocal", np.reciprocal),
                 ("Exp", _float32_mlas(mlas.exp, np.exp)), ("Log", np.log), ("Sin", np.sin), ("Cos", np.cos), ("Tan", np.tan),
                 ("Tanh", _float32_mlas(mlas.tanh, np.tanh)),
                 ("Asin", np.arcsin), ("Acos", np.arccos), ("Atan", np.arctan), ("Sinh", np.sinh),
                 ("Cosh", np.cosh), ("Asinh", np.arcsinh), ("Acosh", np.arccosh), ("Atanh", np.arctanh),
                 ("Erf", _float32_mlas(mlas.erf, scipy.special.erf)),
                 ("Round", np.round)]:  # np.round is round-half-to-even, as ONNX's Round
    _unary(_op, _fn)


@register("IsNaN", since=9, infer=lambda x: TensorInfo(np.dtype(bool), x.shape))
def isnan(x):
    return np.isnan(x)


@register("IsInf", since=10, infer=lambda x, **a: TensorInfo(np.dtype(bool), x.shape))
def isinf(x, *, detect_negative=1, detect_positive=1):
    return (np.isneginf(x) & bool(detect_negative)) | (np.isposinf(x) & bool(detect_positive))


@register("Identity", infer=same_as_first)
def identity(x):
    return x


# ---------------------------------------------------------------- variadic
def _variadic(op_type, fn, since=6):
    """Register ``op_type`` = fn folded left over the inputs; float inputs of one dtype take the threaded
    (and in-place) path, in the same order: ((x0 fn x1) fn x2) ... (Opsets 6-7 want equal shapes, a case
    of opset 8's broadcasting: one kernel serves both.)"""

    def fast(xs) -> bool:
        return len(xs) > 1 and all(_same_float(xs[0], x) for x in xs[1:])

    def fold_into(out, xs):
        parallel.elementwise(fn, out, xs[0], xs[1])
        for x in xs[2:]:
            parallel.elementwise(fn, out, out, x)
        return out

    @register(op_type, since=since, infer=broadcast_rule)
    def kernel(*xs):
        if fast(xs):
            return fold_into(np.empty(np.broadcast_shapes(*[x.shape for x in xs]), dtype=xs[0].dtype), xs)
        result = xs[0]
        with np.errstate(all="ignore"):
            for x in xs[1:]:
                result = fn(result, x)
        return _typed(np.array(result) if len(xs) == 1 else np.asarray(result), xs[0])

    kernel.__name__ = op_type.lower()

    @register_inplace(kernel)
    def inplace(*xs):
        if not fast(xs) or np.broadcast_shapes(*[x.shape for x in xs]) != xs[0].shape:
            return None
        return fold_into(xs[0], xs)


_variadic("Sum", np.add)
_variadic("Max", np.maximum)
_variadic("Min", np.minimum)


@register("Mean", since=6, infer=broadcast_rule)  # opsets 6-7: equal shapes, a case of broadcasting
def mean(*xs):
    """y = (x0 + x1 + ...) * (1 / n), the reciprocal in the inputs' type: onnxruntime multiplies (a division
    differs from it by an ulp)."""
    total = xs[0]
    for x in xs[1:]:
        total = total + x
    return _typed(np.asarray(total * np.asarray(1 / len(xs), dtype=xs[0].dtype)), xs[0])


# ---------------------------------------------------------------- selection and conversion
@register("Where", since=9, infer=lambda c, x, y: TensorInfo(x.dtype, broadcast_rule(c, x, y).shape))
def where(condition, x, y):
    return np.where(condition, x, y)


@register("Clip", since=11, infer=same_as_first)
def clip(x, min=None, max=None):
    """y = min(max(x, min), max); an omitted bound is no bound."""
    if min is None and max is None:
        return x.copy()
    return _clip_into(np.empty_like(x) if type(x) is np.ndarray else None, x, min, max)


def _clip_into(out, x, min, max):
    if out is None:  # a NumPy scalar
        out = np.empty(np.shape(x), dtype=x.dtype)
    if min is not None and max is not None:
        return parallel.elementwise(np.clip, out, x, min.astype(x.dtype), max.astype(x.dtype))  # one pass
    if min is not None:
        return parallel.elementwise(np.maximum, out, x, min.astype(x.dtype))
    return parallel.elementwise(np.minimum, out, x, max.astype(x.dtype))


@register_inplace(clip)
def clip_inplace(x, min=None, max=None):
    if min is None and max is None:
        return x
    return _clip_into(x, x, min, max)


def _cast_rule(x, *, to, saturate=1, round_mode="up"):
    return TensorInfo(dtypes.to_numpy(to), x.shape)


@register("Cast", since=6, infer=_cast_rule)
def cast(x, *, to, saturate=1, round_mode="up"):
    """Element type conversion; float -> int truncates toward zero, as C and ONNX do."""
    target = dtypes.to_numpy(to)
    with np.errstate(all="ignore"):
        return x.astype(target)


@register("CastLike", since=15, infer=lambda x, like, **a: TensorInfo(like.dtype, x.shape))
def cast_like(x, target_type, *, saturate=1, round_mode="up"):
    with np.errstate(all="ignore"):
        return x.astype(target_type.dtype)
