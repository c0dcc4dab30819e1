"""Indexing ops: Gather, GatherElements, GatherND, ScatterND, ScatterElements, OneHot, NonZero, Compress,
TopK, ArgMax, ArgMin, CumSum."""

from __future__ import annotations

import numpy as np

from .registry import register
from .shapes import TensorInfo, int_values


def _gather_rule(x, indices, *, axis=0):
    if x.shape is None or indices.shape is None:
        return TensorInfo(x.dtype, None)
    axis %= len(x.shape)
    shape = tuple(x.shape[:axis]) + tuple(indices.shape) + tuple(x.shape[axis + 1:])
    sym = None
    if x.sym is not None and indices.const is not None and len(x.shape) == 1:  # picking from a shape
        sym = tuple(x.sym[int(i)] for i in np.asarray(indices.const).reshape(-1))
    return TensorInfo(x.dtype, shape, sym=sym)


@register("Gather", since=1, infer=_gather_rule)
def gather(x, indices, *, axis=0):
    """y = x indexed along ``axis`` by ``indices`` (negative indices count from the end)."""
    axis %= x.ndim
    return np.take(x, np.where(indices < 0, indices + x.shape[axis], indices), axis=axis)


@register("GatherElements", since=11, infer=lambda x, i, **a: TensorInfo(x.dtype, i.shape))
def gather_elements(x, indices, *, axis=0):
    """y[i][j][k] = x[indices[i][j][k]][j][k] for axis 0 (likewise for other axes)."""
    axis %= x.ndim
    return np.take_along_axis(x, np.where(indices < 0, indices + x.shape[axis], indices), axis=axis)


@register("GatherND", since=11)
def gather_nd(x, indices, *, batch_dims=0):
    """Gathers slices of x addressed by the last axis of ``indices``, after ``batch_dims`` shared leading axes."""
    batch_shape = x.shape[:batch_dims]
    depth = indices.shape[-1]
    flat_x = x.reshape((-1,) + x.shape[batch_dims:])
    flat_i = indices.reshape((-1,) + indices.shape[batch_dims:])
    out = []
    for b in range(flat_x.shape[0]):
        idx = flat_i[b].reshape(-1, depth)
        dims = np.array(flat_x.shape[1:1 + depth])
        idx = np.where(idx < 0, idx + dims, idx)
        out.append(flat_x[b][tuple(idx.T)])
    result = np.stack(out) if out else np.empty((0,), x.dtype)
    return result.reshape(batch_shape + indices.shape[batch_dims:-1] + x.shape[batch_dims + depth:])


@register("ScatterND", since=11)
def scatter_nd(x, indices, updates, *, reduction="none"):
    out = x.copy()
    idx = indices.reshape(-1, indices.shape[-1])
    upd = updates.reshape((idx.shape[0],) + x.shape[indices.shape[-1]:])
    for i, u in zip(idx, upd):
        key = tuple(i)
        if reduction == "add":
            out[key] += u
        elif reduction == "mul":
            out[key] *= u
        elif reduction == "max":
            out[key] = np.maximum(out[key], u)
        elif reduction == "min":
            out[key] = np.minimum(out[key], u)
        else:
            out[key] = u
    return out


def _one_hot_rule(indices, depth, values, *, axis=-1):
    if indices.shape is None:
        return TensorInfo(values.dtype, None)
    rank = len(indices.shape) + 1
    depth_value = int_values(depth)
    classes = int(depth_value[0]) if depth_value and isinstance(depth_value[0], (int, np.integer)) else None
    shape = list(indices.shape)
    shape.insert(axis % rank, classes)
    return TensorInfo(values.dtype, tuple(shape))


@register("OneHot", since=9, infer=_one_hot_rule, shape_inputs=(1,))
def one_hot(indices, depth, values, *, axis=-1):
    """y[..., j, ...] = values[1] where indices[...] == j (j on ``axis``, 0 <= j < depth), else values[0].

    A negative index counts from the end (index + depth); one outside [-depth, depth) gives a row of
    values[0]. A non-integer depth is cast to int64 (the ONNX spec; onnxruntime truncates it too).
    """
    classes = int(np.asarray(depth).reshape(-1)[0])
    rank = indices.ndim + 1
    axis %= rank
    index = np.asarray(indices).astype(np.int64)
    index = np.where(index < 0, index + classes, index)
    shape = [1] * rank
    shape[axis] = classes
    hot = np.expand_dims(index, axis) == np.arange(classes).reshape(shape)
    values = np.asarray(values).reshape(-1)
    return np.where(hot, values[1], values[0]).astype(values.dtype)


_SCATTER_REDUCE = {"add": np.add, "mul": np.multiply, "max": np.maximum, "min": np.minimum}


@register("ScatterElements", since=11, infer=lambda x, i, u, **a: TensorInfo(x.dtype, x.shape))
def scatter_elements(x, indices, updates, *, axis=0, reduction="none"):
    """out = copy of x; out[..., indices[i, j, k], ...] (on ``axis``) = updates[i, j, k] for every element,
    in order (a repeated index: the last update wins), or combined with reduction add/mul/max/min."""
    axis %= x.ndim
    index = np.where(indices < 0, indices + x.shape[axis], indices)
    if ((index < 0) | (index >= x.shape[axis])).any():  # NumPy would wrap a too-negative index silently
        raise IndexError(f"ScatterElements index outside [-{x.shape[axis]}, {x.shape[axis]}) on axis {axis}")
    grid = list(np.indices(index.shape, sparse=True))
    grid[axis] = index
    out = x.copy()
    if reduction == "none":
        out[tuple(grid)] = updates
    else:
        _SCATTER_REDUCE[reduction].at(out, tuple(grid), updates)
    return out


@register("NonZero", since=9, infer=lambda x: TensorInfo(np.dtype(np.int64), (x.rank, None) if x.rank is not None
                                                        else None))
def nonzero(x):
    """The indices of the non-zero elements, [rank, count], in row-major order (a scalar counts as [1])."""
    return np.array(np.nonzero(np.atleast_1d(x) if x.ndim == 0 else x), dtype=np.int64).reshape(max(x.ndim, 1), -1)


def _compress_rule(x, condition, *, axis=None):
    if x.shape is None:
        return TensorInfo(x.dtype, None)
    if axis is None:
        return TensorInfo(x.dtype, (None,))
    shape = list(x.shape)
    shape[axis % len(shape)] = None
    return TensorInfo(x.dtype, tuple(shape))


@register("Compress", since=9, infer=_compress_rule)
def compress(x, condition, *, axis=None):
    """The slices of x (along ``axis``, or of the flattened x) where ``condition`` is true; a condition
    shorter than the axis leaves the rest out."""
    keep = np.asarray(condition, dtype=bool).reshape(-1)
    if axis is None:
        return x.reshape(-1)[:keep.size][keep[: x.size]]
    axis %= x.ndim
    keep = keep[: x.shape[axis]]
    return np.compress(keep, x, axis=axis)


@register("TopK", since=10, shape_inputs=(1,))
def topk(x, k, *, axis=-1, largest=1, sorted=1):
    """The k largest (or smallest) values along ``axis`` and their indices; ties keep the lower index first."""
    k = int(np.asarray(k).reshape(-1)[0])
    axis %= x.ndim
    keys = -x if largest else x
    if x.dtype.kind == "u" and largest:  # negating unsigned values wraps; order by descending via a stable trick
        order = np.argsort(x.astype(np.int64) * -1, axis=axis, kind="stable")
    else:
        order = np.argsort(keys, axis=axis, kind="stable")
    indices = np.take(order, np.arange(k), axis=axis).astype(np.int64)
    return np.take_along_axis(x, indices, axis=axis), indices


def _arg_reduce(fn, x, axis, keepdims, select_last_index):
    axis %= x.ndim
    if select_last_index:
        flipped = np.flip(x, axis=axis)
        result = x.shape[axis] - 1 - fn(flipped, axis=axis)
    else:
        result = fn(x, axis=axis)
    result = result.astype(np.int64)
    return np.expand_dims(result, axis) if keepdims else result


def _arg_rule(x, *, axis=0, keepdims=1, select_last_index=0):
    if x.shape is None:
        return TensorInfo(np.dtype(np.int64), None)
    axis %= len(x.shape)
    shape = [1 if i == axis else d for i, d in enumerate(x.shape)] if keepdims else \
        [d for i, d in enumerate(x.shape) if i != axis]
    return TensorInfo(np.dtype(np.int64), tuple(shape))


@register("ArgMax", since=1, infer=_arg_rule)
def argmax(x, *, axis=0, keepdims=1, select_last_index=0):
    return _arg_reduce(np.argmax, x, axis, keepdims, select_last_index)


@register("ArgMin", since=1, infer=_arg_rule)
def argmin(x, *, axis=0, keepdims=1, select_last_index=0):
    return _arg_reduce(np.argmin, x, axis, keepdims, select_last_index)


@register("CumSum", since=11, infer=lambda x, a, **k: TensorInfo(x.dtype, x.shape))
def cumsum(x, axis, *, exclusive=0, reverse=0):
    """Running sum along ``axis``; exclusive leaves out the current element; reverse runs from the end."""
    axis = int(np.asarray(axis).reshape(-1)[0]) % x.ndim
    y = np.flip(x, axis) if reverse else x
    total = np.cumsum(y, axis=axis, dtype=x.dtype)
    if exclusive:
        total = np.concatenate([np.zeros_like(np.take(total, [0], axis=axis)),
                                np.take(total, np.arange(total.shape[axis] - 1), axis=axis)], axis=axis)
    return np.flip(total, axis) if reverse else total
