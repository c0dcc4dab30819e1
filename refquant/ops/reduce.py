"""Reductions over axes given as an input (normalized at import): Sum, Mean, Max, Min, Prod, L1, L2, LogSum..."""

from __future__ import annotations

import numpy as np

from .registry import register
from .shapes import TensorInfo


def _axes(x, axes, noop_with_empty_axes):
    """The axes tuple, or None for 'all axes'; 'no axes' means identity when noop_with_empty_axes."""
    if axes is None or np.asarray(axes).size == 0:
        return () if noop_with_empty_axes else None
    return tuple(int(a) % max(x.ndim, 1) for a in np.asarray(axes).reshape(-1))


def _reduce_rule(x, axes=None, *, keepdims=1, noop_with_empty_axes=0):
    if x.shape is None:
        return TensorInfo(x.dtype, None)
    if axes is not None and axes.const is None:
        return TensorInfo(x.dtype, None)
    chosen = _axes(np.empty((0,) * len(x.shape)), None if axes is None else axes.const, noop_with_empty_axes)
    chosen = range(len(x.shape)) if chosen is None else chosen
    shape = [1 if i in chosen else d for i, d in enumerate(x.shape)] if keepdims else \
        [d for i, d in enumerate(x.shape) if i not in chosen]
    return TensorInfo(x.dtype, tuple(shape))


def _reduction(op_type, since, fn, empty_value=None):
    @register(op_type, since=since, infer=_reduce_rule, shape_inputs=(1,))
    def kernel(x, axes=None, *, keepdims=1, noop_with_empty_axes=0):
        chosen = _axes(x, axes, noop_with_empty_axes)
        if chosen == ():
            return x
        if x.size == 0 and empty_value is not None:  # reductions over nothing: ONNX's identities
            shape = np.sum(np.zeros(x.shape, np.float32), axis=chosen, keepdims=bool(keepdims)).shape
            value = empty_value
            if x.dtype == np.bool_:
                value = bool(value > 0)
            elif x.dtype.kind in "iu" and np.isinf(value):
                value = np.iinfo(x.dtype).min if value < 0 else np.iinfo(x.dtype).max
            return np.full(shape, value, dtype=x.dtype)
        with np.errstate(divide="ignore", invalid="ignore"):
            result = fn(x, chosen, bool(keepdims))
        return np.asarray(result).astype(x.dtype, copy=False)

    kernel.__name__ = op_type.lower()


def _log_sum_exp(x, axes, keepdims):
    peak = np.max(x, axis=axes, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0)
    result = np.log(np.sum(np.exp(x - peak), axis=axes, keepdims=True)) + peak
    return result if keepdims else np.squeeze(result, axis=axes if axes is not None else None)


_reduction("ReduceSum", 13, lambda x, a, k: np.sum(x, axis=a, keepdims=k), 0)
_REDUCTIONS = {
    # the mean of nothing: onnxruntime returns 0 (its sum, 0, times 1 / count as 0); ONNX leaves it undefined
    "ReduceMean": (lambda x, a, k: np.mean(x, axis=a, keepdims=k, dtype=np.float64 if x.dtype == np.float16 else None),
                   0),
    "ReduceMax": (lambda x, a, k: np.max(x, axis=a, keepdims=k), -np.inf),
    "ReduceMin": (lambda x, a, k: np.min(x, axis=a, keepdims=k), np.inf),
    "ReduceProd": (lambda x, a, k: np.prod(x, axis=a, keepdims=k), 1),
    "ReduceL1": (lambda x, a, k: np.sum(np.abs(x), axis=a, keepdims=k), 0),
    "ReduceL2": (lambda x, a, k: np.sqrt(np.sum(np.square(x, dtype=np.float64 if x.dtype.kind == "f" else None),
                                                axis=a, keepdims=k)), 0),
    "ReduceSumSquare": (lambda x, a, k: np.sum(np.square(x), axis=a, keepdims=k), 0),
    "ReduceLogSum": (lambda x, a, k: np.log(np.sum(x, axis=a, keepdims=k)), -np.inf),
    "ReduceLogSumExp": (_log_sum_exp, -np.inf),
}
for _op, (_fn, _empty) in _REDUCTIONS.items():
    _reduction(_op, 18, _fn, _empty)
