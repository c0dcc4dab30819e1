"""Backward of the reductions. The output gradient is broadcast back over the reduced axes (re-inserted
when keepdims=0) and multiplied by the partial derivative of the reduction."""

from __future__ import annotations

import numpy as np

from ...ops.reduce import _axes
from ..backward_registry import register_backward
from .common import like


def _expand(g, x, axes_input, keepdims, noop_with_empty_axes):
    """(gy shaped to broadcast against x, the reduced axes as a tuple, or None when the op was an identity)."""
    chosen = _axes(x, axes_input, noop_with_empty_axes)
    if chosen == ():
        return None, ()
    chosen = tuple(range(x.ndim)) if chosen is None else chosen
    if not keepdims:
        g = np.expand_dims(g, tuple(sorted(chosen)))
    return g, chosen


def _reduction(op_type, partial):
    """Register the backward of y = reduce(x) with dy/dx = partial(x, y_kept, axes) (y_kept: keepdims)."""

    @register_backward(op_type)
    def backward(grads_out, inputs, outputs, *, keepdims=1, noop_with_empty_axes=0):
        x = inputs[0]
        axes_input = inputs[1] if len(inputs) > 1 else None
        g, axes = _expand(grads_out[0], x, axes_input, keepdims, noop_with_empty_axes)
        extra = [None] * (len(inputs) - 1)
        if g is None:  # no axes and noop_with_empty_axes: the identity
            return [like(grads_out[0], x)] + extra
        y, _ = _expand(outputs[0], x, axes_input, keepdims, noop_with_empty_axes)
        with np.errstate(divide="ignore", invalid="ignore"):
            return [like(np.broadcast_to(g * partial(x, y, axes), x.shape).copy(), x)] + extra

    backward.__name__ = f"{op_type.lower()}_backward"


def _count(x, axes):
    return int(np.prod([x.shape[a] for a in axes]))


def _arg_extreme(x, y, axes):
    """Max/Min: the gradient is shared equally by the elements equal to the result (one, without ties)."""
    hit = (x == y).astype(x.dtype)
    return hit / hit.sum(axis=axes, keepdims=True)


_reduction("ReduceSum", lambda x, y, axes: np.ones((), dtype=x.dtype))
_reduction("ReduceMean", lambda x, y, axes: np.asarray(1 / _count(x, axes), dtype=x.dtype))
_reduction("ReduceMax", _arg_extreme)
_reduction("ReduceMin", _arg_extreme)
_reduction("ReduceSumSquare", lambda x, y, axes: 2 * x)
_reduction("ReduceL1", lambda x, y, axes: np.sign(x))
_reduction("ReduceL2", lambda x, y, axes: x / y)
_reduction("ReduceLogSum", lambda x, y, axes: 1 / np.exp(y))
_reduction("ReduceLogSumExp", lambda x, y, axes: np.exp(x - y))
_reduction("ReduceProd", lambda x, y, axes: y / x)  # x != 0 (the product rule divided through)
