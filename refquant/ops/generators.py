"""Ops that make tensors from shapes and scalars: ConstantOfShape, Range, EyeLike."""

from __future__ import annotations

import numpy as np

from .. import dtypes
from .registry import register
from .shapes import TensorInfo


def _constant_of_shape_rule(shape, *, value=None):
    dtype = np.dtype(np.float32) if value is None else value.dtype
    if shape.const is None:
        return TensorInfo(dtype, None)
    return TensorInfo(dtype, tuple(int(d) for d in shape.const.reshape(-1)))


@register("ConstantOfShape", since=9, infer=_constant_of_shape_rule, shape_inputs=(0,))
def constant_of_shape(shape, *, value=None):
    """A tensor of ``shape`` filled with ``value`` (a one-element tensor; default float32 0)."""
    fill = np.zeros(1, np.float32) if value is None else np.asarray(value).reshape(-1)
    return np.full(tuple(int(d) for d in np.asarray(shape).reshape(-1)), fill[0], dtype=fill.dtype)


@register("Range", since=11, shape_inputs=(0, 1, 2))
def range_(start, limit, delta):
    """start, start + delta, ... while < limit (> limit for negative delta): max(ceil((limit-start)/delta), 0) items."""
    start, limit, delta = (np.asarray(v).reshape(()) for v in (start, limit, delta))
    count = max(int(np.ceil((limit - start) / delta)), 0)
    return (start + np.arange(count, dtype=np.result_type(start)) * delta).astype(start.dtype)


@register("EyeLike", since=9)
def eye_like(x, *, dtype=None, k=0):
    target = dtypes.to_numpy(dtype) if dtype is not None else x.dtype
    return np.eye(x.shape[0], x.shape[1], k=k, dtype=target)
