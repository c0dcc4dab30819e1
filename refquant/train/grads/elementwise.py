"""Backward of the element-wise ops. A broadcast input's gradient is summed back to its own shape.

Where a function has a kink or a tie (Abs at 0, Min/Max between equal inputs, Clip at a bound), the
subgradient chosen is stated in the backward's docstring.
"""

from __future__ import annotations

import numpy as np

from ... import parallel
from ..backward_registry import register_backward
from . import loops
from .common import input_grad, is_float, like


def _binary_grads(gy, a, b, da, db):
    """[dL/da, dL/db] from the element-wise partials da = dy/da and db = dy/db (None: no gradient)."""
    return [None if da is None else input_grad(gy * da, a), None if db is None else input_grad(gy * db, b)]


@register_backward("Add")
def add_backward(grads_out, inputs, outputs):
    gy = grads_out[0]
    return [input_grad(gy, inputs[0]), input_grad(gy, inputs[1])]


@register_backward("Sub")
def sub_backward(grads_out, inputs, outputs):
    gy = grads_out[0]
    return [input_grad(gy, inputs[0]), input_grad(-gy, inputs[1])]


@register_backward("Mul")
def mul_backward(grads_out, inputs, outputs):
    a, b = inputs
    gy = grads_out[0]
    return [input_grad(gy * b, a), input_grad(gy * a, b)]


@register_backward("Div")
def div_backward(grads_out, inputs, outputs):
    """y = a / b: da = gy / b, db = -gy * a / b^2"""
    a, b = inputs
    gy = grads_out[0]
    ga = gy / b
    return [input_grad(ga, a), input_grad(-ga * outputs[0], b)]


@register_backward("Pow")
def pow_backward(grads_out, inputs, outputs):
    """y = a^b: da = b a^(b-1), db = a^b log(a) (taken as 0 where a <= 0, where it is undefined or b is
    an integer exponent held constant)."""
    a, b = inputs
    gy = grads_out[0]
    with np.errstate(all="ignore"):
        da = b * np.power(a, b - 1)
        db = np.where(a > 0, outputs[0] * np.log(np.where(a > 0, a, 1)), 0) if is_float(b) else None
    return _binary_grads(gy, a, b, da, db)


# ----------------------------------------------------------------------------- unary
def _unary(op_type, derivative):
    """Register the backward of y = f(x) with dy/dx = derivative(x, y)."""

    @register_backward(op_type)
    def backward(grads_out, inputs, outputs):
        x = inputs[0]
        with np.errstate(all="ignore"):
            return [like(grads_out[0] * derivative(x, outputs[0]), x)]

    backward.__name__ = f"{op_type.lower()}_backward"
    return backward


_unary("Neg", lambda x, y: -1)
_unary("Abs", lambda x, y: np.sign(x))  # subgradient 0 at x = 0
_unary("Sqrt", lambda x, y: 0.5 / y)
_unary("Exp", lambda x, y: y)
_unary("Log", lambda x, y: 1 / x)
_unary("Reciprocal", lambda x, y: -y * y)
_unary("Tanh", lambda x, y: 1 - y * y)
_unary("Sin", lambda x, y: np.cos(x))
_unary("Cos", lambda x, y: -np.sin(x))
_unary("Tan", lambda x, y: 1 + y * y)
_unary("Sinh", lambda x, y: np.cosh(x))
_unary("Cosh", lambda x, y: np.sinh(x))
_unary("Asin", lambda x, y: 1 / np.sqrt(1 - x * x))
_unary("Acos", lambda x, y: -1 / np.sqrt(1 - x * x))
_unary("Atan", lambda x, y: 1 / (1 + x * x))
_unary("Asinh", lambda x, y: 1 / np.sqrt(x * x + 1))
_unary("Acosh", lambda x, y: 1 / np.sqrt(x * x - 1))
_unary("Atanh", lambda x, y: 1 / (1 - x * x))
_unary("Erf", lambda x, y: (2 / np.sqrt(np.pi)) * np.exp(-x * x))
# piecewise-constant ops: zero almost everywhere (quantizer-style STE is the quantizers' business, not theirs)
for _op in ("Ceil", "Floor", "Round", "Sign"):
    _unary(_op, lambda x, y: np.zeros_like(x))


@register_backward("Identity")
def identity_backward(grads_out, inputs, outputs):
    return [like(grads_out[0], inputs[0])]


# ----------------------------------------------------------------------------- variadic
@register_backward("Sum")
def sum_backward(grads_out, inputs, outputs):
    return [input_grad(grads_out[0], x) for x in inputs]


@register_backward("Mean")
def mean_backward(grads_out, inputs, outputs):
    gy = grads_out[0] / np.asarray(len(inputs), dtype=grads_out[0].dtype)
    return [input_grad(gy, x) for x in inputs]


def _select_backward(grads_out, inputs, outputs):
    """Max/Min: the gradient goes to the first input that holds the result (ties: the earliest input)."""
    y = outputs[0]
    gy = grads_out[0]
    taken = np.zeros(np.broadcast_shapes(*(x.shape for x in inputs)), dtype=bool)
    grads = []
    for x in inputs:
        chosen = (x == y) & ~taken
        taken |= chosen
        grads.append(input_grad(np.where(chosen, gy, 0).astype(gy.dtype, copy=False), x))
    return grads


register_backward("Max")(_select_backward)
register_backward("Min")(_select_backward)


# ----------------------------------------------------------------------------- selection and conversion
@register_backward("Where")
def where_backward(grads_out, inputs, outputs):
    """y = where(c, a, b): da = gy where c, db = gy where not c; the condition has no gradient."""
    condition, a, b = inputs
    gy = grads_out[0]
    zero = np.zeros((), dtype=gy.dtype)
    return [None, input_grad(np.where(condition, gy, zero), a), input_grad(np.where(condition, zero, gy), b)]


@register_backward("Clip")
def clip_backward(grads_out, inputs, outputs):
    """y = min(max(x, lo), hi): dx = gy where y == x (inside the bounds; a value on a bound passes to x),
    d lo = sum of gy where x < lo, d hi = sum of gy where x > hi (lo and hi are scalars).
    With lo > hi, np.clip gives hi everywhere: then only hi gets gradient."""
    x, y = inputs[0], outputs[0]
    lo = inputs[1] if len(inputs) > 1 else None
    hi = inputs[2] if len(inputs) > 2 else None
    gy = grads_out[0]
    if lo is not None and hi is not None and lo.size == 1 and hi.size == 1 and lo <= hi and \
            x.dtype in (np.float32, np.float64) and gy.dtype == x.dtype:
        return _clip_fast(x, gy, lo, hi)
    zero = np.zeros((), dtype=gy.dtype)
    grads = [like(np.where(y == x, gy, zero), x)]
    crossed = lo is not None and hi is not None and lo.astype(x.dtype) > hi.astype(x.dtype)
    if len(inputs) > 1:
        grads.append(None if lo is None else
                     like(np.full(lo.shape, 0 if crossed else np.sum(gy, where=x < lo.astype(x.dtype))), lo))
    if len(inputs) > 2 and hi is None:
        grads.append(None)
    elif len(inputs) > 2:
        above = np.ones(x.shape, dtype=bool) if crossed else x > hi.astype(x.dtype)
        grads.append(like(np.full(hi.shape, np.sum(gy, where=above)), hi))
    return grads


def _clip_fast(x, gy, lo, hi):
    """Scalar bounds lo <= hi: one Numba pass per block of the flattened arrays, blocks in parallel."""
    xf = np.ascontiguousarray(x).reshape(-1)
    gf = np.ascontiguousarray(gy).reshape(-1)
    gx = np.empty(xf.shape, dtype=x.dtype)
    lo_v, hi_v = x.dtype.type(lo.reshape(())), x.dtype.type(hi.reshape(()))
    blocks = parallel.split(xf.size, 4 * parallel.budget()) if xf.size >= parallel.MIN_PARALLEL_ELEMENTS else \
        [(0, xf.size)]
    sums = np.zeros((len(blocks), 2))

    def block(b):
        a, e = blocks[b]
        sums[b] = loops.clip_backward(xf[a:e], gf[a:e], lo_v, hi_v, gx[a:e])

    parallel.parallel_for(len(blocks), block)
    below, above = sums.sum(axis=0)
    return [gx.reshape(x.shape), like(np.full(lo.shape, below), lo), like(np.full(hi.shape, above), hi)]


@register_backward("Cast")
def cast_backward(grads_out, inputs, outputs, *, to, saturate=1, round_mode="up"):
    """A float -> float cast passes the gradient (cast back); casts to or from other types cut it."""
    x = inputs[0]
    if not (is_float(x) and is_float(outputs[0])):
        return [None]
    return [like(grads_out[0], x)]


@register_backward("CastLike")
def cast_like_backward(grads_out, inputs, outputs, *, saturate=1, round_mode="up"):
    x = inputs[0]
    if not (is_float(x) and is_float(outputs[0])):
        return [None, None]
    return [like(grads_out[0], x), None]

