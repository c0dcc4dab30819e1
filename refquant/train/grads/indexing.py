"""Backward of the indexing ops: Gather, GatherElements, GatherND, ScatterND, TopK, CumSum.

Each gather's adjoint is a scatter-add of gy to the positions it read (repeated indices add up);
index inputs get None.
"""

from __future__ import annotations

import numpy as np

from ..backward_registry import register_backward
from .common import like, output_grads


@register_backward("Gather")
def gather_backward(grads_out, inputs, outputs, *, axis=0):
    """dx[.., i, ..] = sum of gy over every position whose index is i (repeated indices add up)."""
    x, indices = inputs
    axis %= x.ndim
    flat_index = np.where(indices < 0, indices + x.shape[axis], indices).reshape(-1)
    gy = grads_out[0]
    # gy is [x.shape[:axis], indices.shape, x.shape[axis+1:]]: bring the index axes to the front, flattened
    gy = np.moveaxis(gy.reshape(x.shape[:axis] + (flat_index.size,) + x.shape[axis + 1:]), axis, 0)
    gx = np.zeros((x.shape[axis],) + x.shape[:axis] + x.shape[axis + 1:], dtype=gy.dtype)
    np.add.at(gx, flat_index, gy)
    return [like(np.moveaxis(gx, 0, axis), x), None]


@register_backward("GatherElements")
def gather_elements_backward(grads_out, inputs, outputs, *, axis=0):
    x, indices = inputs
    axis %= x.ndim
    index = np.where(indices < 0, indices + x.shape[axis], indices)
    gx = np.zeros(x.shape, dtype=grads_out[0].dtype)
    grid = list(np.indices(index.shape, sparse=True))
    grid[axis] = index
    np.add.at(gx, tuple(grid), grads_out[0])
    return [like(gx, x), None]


@register_backward("GatherND")
def gather_nd_backward(grads_out, inputs, outputs, *, batch_dims=0):
    """dx = zeros with gy's slices added at the addressed positions (per batch index)."""
    x, indices = inputs
    gy = grads_out[0]
    depth = indices.shape[-1]
    flat_x = np.zeros((int(np.prod(x.shape[:batch_dims])),) + x.shape[batch_dims:], dtype=gy.dtype)
    flat_i = indices.reshape((flat_x.shape[0], -1, depth))
    slice_shape = x.shape[batch_dims + depth:]
    flat_g = gy.reshape((flat_x.shape[0], flat_i.shape[1]) + slice_shape)
    dims = np.array(x.shape[batch_dims:batch_dims + depth])
    for b in range(flat_x.shape[0]):
        idx = np.where(flat_i[b] < 0, flat_i[b] + dims, flat_i[b])
        np.add.at(flat_x[b], tuple(idx.T), flat_g[b])
    return [like(flat_x.reshape(x.shape), x), None]


def _key(index, shape):
    """An index tuple with negative entries made positive, so equal positions compare equal."""
    return tuple(int(v) % shape[d] for d, v in enumerate(index))


@register_backward("ScatterND")
def scatter_nd_backward(grads_out, inputs, outputs, *, reduction="none"):
    """reduction none: dx = gy with the overwritten positions zeroed, d updates = gy at those positions
    (the last write wins on duplicates, as the forward's loop); add: both get gy; mul/max/min: the
    forward's element-wise rule per write, replayed in order."""
    x, indices, updates = inputs
    gy = grads_out[0]
    idx = indices.reshape(-1, indices.shape[-1])
    upd = updates.reshape((idx.shape[0],) + x.shape[indices.shape[-1]:])
    gx = gy.copy()
    gu = np.zeros(upd.shape, dtype=gy.dtype)
    if reduction == "add":
        for k, i in enumerate(idx):
            gu[k] = gy[tuple(i)]
        return [like(gx, x), None, like(gu.reshape(updates.shape), updates)]
    if reduction == "none":
        last = {}
        for k, i in enumerate(idx):
            last[_key(i, x.shape)] = k
        for key, k in last.items():
            gu[k] = gy[key]
            gx[key] = 0
        return [like(gx, x), None, like(gu.reshape(updates.shape), updates)]
    # mul / max / min: replay the writes, tracking d(out)/d(x) and d(out)/d(update k) element-wise
    value = x.astype(gy.dtype).copy()
    dx_factor = np.ones(x.shape, dtype=gy.dtype)
    owners = []  # per write: (key, factor of the update in the result so far)
    for k, (i, u) in enumerate(zip(idx, upd)):
        key = _key(i, x.shape)
        current = value[key]
        if reduction == "mul":
            for j, (other_key, factor) in enumerate(owners):
                if other_key == key:
                    owners[j] = (other_key, factor * u)
            owners.append((key, current.copy()))
            dx_factor[key] = dx_factor[key] * u
            value[key] = current * u
        else:
            pick_update = (u > current) if reduction == "max" else (u < current)
            for j, (other_key, factor) in enumerate(owners):
                if other_key == key:
                    owners[j] = (other_key, np.where(pick_update, 0, factor))
            owners.append((key, pick_update.astype(gy.dtype)))
            dx_factor[key] = np.where(pick_update, 0, dx_factor[key])
            value[key] = np.where(pick_update, u, current)
    for k, (key, factor) in enumerate(owners):
        gu[k] = gy[key] * factor
    return [like(gy * dx_factor, x), None, like(gu.reshape(updates.shape), updates)]


@register_backward("TopK")
def topk_backward(grads_out, inputs, outputs, *, axis=-1, largest=1, sorted=1):
    """Values = x at Indices along ``axis``: dx = gy(values) scattered to those positions; Indices and k
    get no gradient."""
    x = inputs[0]
    g_values = output_grads(grads_out[:1], outputs[:1])[0]
    gx = np.zeros(x.shape, dtype=g_values.dtype)
    np.put_along_axis(gx, outputs[1], g_values, axis=axis % x.ndim)  # indices along the axis are distinct
    return [like(gx, x), None]


@register_backward("CumSum")
def cumsum_backward(grads_out, inputs, outputs, *, exclusive=0, reverse=0):
    """The adjoint of a running sum is the running sum in the other direction (exclusive stays exclusive)."""
    x, axis_in = inputs
    axis = int(np.asarray(axis_in).reshape(-1)[0]) % x.ndim
    g = grads_out[0]
    forward_dir = np.flip(g, axis) if not reverse else g  # sum from the far end
    total = np.cumsum(forward_dir, axis=axis, dtype=g.dtype)
    if exclusive:
        total = np.concatenate([np.zeros_like(np.take(total, [0], axis=axis)),
                                np.take(total, np.arange(total.shape[axis] - 1), axis=axis)], axis=axis)
    gx = np.flip(total, axis) if not reverse else total
    return [like(gx, x), None]
