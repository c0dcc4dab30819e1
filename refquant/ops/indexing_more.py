"""More indexing and rearranging ops: Scatter (the opset-9 alias of ScatterElements), TensorScatter, CumProd,
Unique, CenterCropPad, Col2Im, MaxUnpool.

Indices are checked against their axis ([-n, n) where ONNX allows negative indices): NumPy would wrap a
too-negative index silently; here it raises, and the runtime names the node.
"""

from __future__ import annotations

import numpy as np

from .indexing import scatter_elements
from .registry import register
from .shapes import TensorInfo, int_values


def _checked_indices(indices, size: int, what: str) -> np.ndarray:
    """``indices`` with negative entries counted from the end; IndexError for any outside [-size, size)."""
    index = np.asarray(indices).astype(np.int64, copy=False)
    bad = (index < -size) | (index >= size)
    if bad.any():
        raise IndexError(f"{what}: index {int(index[bad].reshape(-1)[0])} is out of range for size {size}")
    return np.where(index < 0, index + size, index)


def _scalar_int(value, what: str) -> int:
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(f"{what} must hold one value, got shape {array.shape}")
    return int(array.reshape(-1)[0])


# ---------------------------------------------------------------- Scatter, TensorScatter
@register("Scatter", since=9, infer=lambda x, i, u, **a: TensorInfo(x.dtype, x.shape))
def scatter(x, indices, updates, *, axis=0):
    """Deprecated name of ScatterElements without reduction: out = copy of x,
    out[..., indices[i, j, k], ...] (on ``axis``) = updates[i, j, k]."""
    axis %= x.ndim
    index = _checked_indices(indices, x.shape[axis], f"Scatter indices on axis {axis}")
    return scatter_elements(x, index, updates, axis=axis)


def _tensor_scatter_rule(past, update, write_indices=None, *, mode="linear", axis=-2):
    return TensorInfo(past.dtype, past.shape)


@register("TensorScatter", since=24, infer=_tensor_scatter_rule)
def tensor_scatter(past_cache, update, write_indices=None, *, mode="linear", axis=-2):
    """A KV-cache write: present = copy of past_cache; for batch b (axis 0) and step s of ``update``,
    present[b, ..., w[b] + s, ...] = update[b, ..., s, ...] on ``axis``, where w = write_indices (0s when
    omitted); mode "circular" wraps w[b] + s modulo the cache length, "linear" requires it to fit."""
    if mode not in ("linear", "circular"):
        raise ValueError(f"TensorScatter mode must be 'linear' or 'circular', got {mode!r}")
    rank = past_cache.ndim
    axis %= rank
    if axis == 0:
        raise ValueError("TensorScatter axis cannot be the batch axis 0")
    if update.ndim != rank or any(u != p for i, (u, p) in enumerate(zip(update.shape, past_cache.shape))
                                  if i != axis) or update.shape[axis] > past_cache.shape[axis]:
        raise ValueError(f"update shape {update.shape} does not fit past_cache shape {past_cache.shape} "
                         f"(equal except axis {axis}, where it may not be longer)")
    length, steps = past_cache.shape[axis], update.shape[axis]
    batch = past_cache.shape[0]
    start = np.zeros(batch, np.int64) if write_indices is None else np.asarray(write_indices, np.int64).reshape(-1)
    if start.size != batch:
        raise ValueError(f"write_indices has {start.size} entries for batch size {batch}")
    shape = [1] * rank
    shape[0], shape[axis] = batch, steps
    position = (start.reshape([batch] + [1] * (rank - 1)) + np.arange(steps).reshape([1] * axis + [steps] +
                                                                                        [1] * (rank - axis - 1)))
    if mode == "circular":
        position = position % length
    elif (start < 0).any() or (start + steps > length).any():
        raise IndexError(f"TensorScatter linear write_indices {start.tolist()} + {steps} steps exceed cache "
                         f"length {length}")
    present = past_cache.copy()
    np.put_along_axis(present, np.broadcast_to(position, update.shape), update, axis=axis)
    return present


# ---------------------------------------------------------------- CumProd
@register("CumProd", since=26, infer=lambda x, a, **k: TensorInfo(x.dtype, x.shape))
def cumprod(x, axis, *, exclusive=0, reverse=0):
    """Running product along ``axis`` in x's type; exclusive leaves out the current element (the first is
    1); reverse runs from the end."""
    axis = _scalar_int(axis, "CumProd axis")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"CumProd axis {axis} is out of range for rank {x.ndim}")
    axis %= x.ndim
    y = np.flip(x, axis) if reverse else x
    if exclusive:
        ones = np.ones_like(np.take(y, [0], axis=axis)) if y.shape[axis] else np.take(y, [], axis=axis)
        y = np.concatenate([ones, np.take(y, np.arange(y.shape[axis] - 1), axis=axis)], axis=axis)
    total = np.cumprod(y, axis=axis, dtype=x.dtype)
    return np.flip(total, axis) if reverse else total


# ---------------------------------------------------------------- Unique
def _unique_rule(x, *, axis=None, sorted=1):
    long = np.dtype(np.int64)
    if axis is None or x.shape is None:
        static = x.shape is not None and all(isinstance(d, int) for d in x.shape)
        inverse = (int(np.prod(x.shape)) if static else None,)
        return (TensorInfo(x.dtype, (None,)), TensorInfo(long, (None,)), TensorInfo(long, inverse),
                TensorInfo(long, (None,)))
    axis %= len(x.shape)
    shape = tuple(None if i == axis else d for i, d in enumerate(x.shape))
    return (TensorInfo(x.dtype, shape), TensorInfo(long, (None,)), TensorInfo(long, (x.shape[axis],)),
            TensorInfo(long, (None,)))


@register("Unique", since=11, infer=_unique_rule)
def unique(x, *, axis=None, sorted=1):
    """The distinct elements of x (or distinct slices along ``axis``): Y, their first-occurrence indices,
    the index into Y of every input element (slice), and how often each occurs. sorted=1 orders Y
    ascending (slices lexicographically); sorted=0 in order of first occurrence."""
    if axis is not None:
        axis %= x.ndim
    y, first, inverse, counts = np.unique(x, return_index=True, return_inverse=True, return_counts=True,
                                          axis=axis)
    inverse = np.asarray(inverse).reshape(-1)
    if not sorted:  # reorder by first occurrence; renumber inverse through the permutation's inverse
        order = np.argsort(first, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        y = np.take(y, order, axis=0 if axis is None else axis)
        first, counts, inverse = first[order], counts[order], rank[inverse]
    return (np.asarray(y, dtype=x.dtype), first.astype(np.int64), inverse.astype(np.int64),
            counts.astype(np.int64))


# ---------------------------------------------------------------- CenterCropPad
def _center_crop_pad_rule(x, shape, *, axes=None):
    target = int_values(shape)
    if x.shape is None:
        return TensorInfo(x.dtype, None)
    rank = len(x.shape)
    axes = list(range(rank)) if axes is None else [a % rank for a in axes]
    out = list(x.shape)
    for i, a in enumerate(axes):
        out[a] = target[i] if target is not None and isinstance(target[i], int) else None
    return TensorInfo(x.dtype, tuple(out))


@register("CenterCropPad", since=18, infer=_center_crop_pad_rule, shape_inputs=(1,))
def center_crop_pad(x, shape, *, axes=None):
    """x cropped or zero-padded to ``shape`` on ``axes`` (all by default), centred; an odd difference puts
    the extra element at the end (crop: one more removed at the end; pad: one more zero at the end)."""
    rank = x.ndim
    axes = list(range(rank)) if axes is None else [a % rank for a in axes]
    target = np.asarray(shape).reshape(-1).astype(np.int64)
    if target.size != len(axes):
        raise ValueError(f"CenterCropPad shape has {target.size} entries for {len(axes)} axes")
    out_shape = list(x.shape)
    source = [slice(None)] * rank
    dest = [slice(None)] * rank
    for a, want in zip(axes, target.tolist()):
        have = x.shape[a]
        out_shape[a] = want
        if want < have:
            start = (have - want) // 2
            source[a] = slice(start, start + want)
        elif want > have:
            start = (want - have) // 2
            dest[a] = slice(start, start + have)
    out = np.zeros(out_shape, dtype=x.dtype)
    out[tuple(dest)] = x[tuple(source)]
    return out


# ---------------------------------------------------------------- Col2Im
def _col2im_rule(x, image_shape, block_shape, *, dilations=None, pads=None, strides=None):
    image = int_values(image_shape)
    block = int_values(block_shape)
    if x.shape is None or image is None or block is None or not all(isinstance(b, int) for b in block):
        return TensorInfo(x.dtype, None)
    channels = x.shape[1] // int(np.prod(block)) if isinstance(x.shape[1], int) else None
    return TensorInfo(x.dtype, (x.shape[0], channels) + tuple(d if isinstance(d, int) else None for d in image))


@register("Col2Im", since=18, infer=_col2im_rule, shape_inputs=(1, 2))
def col2im(x, image_shape, block_shape, *, dilations=None, pads=None, strides=None):
    """The inverse of im2col: x [N, C*prod(block), L] holds one column per sliding block position; each
    column's entries are added into the image [N, C, *image_shape] at the positions that block covers
    (overlaps sum). Position of block b, kernel offset k on spatial axis d:
    b_d * strides[d] - pads_begin[d] + k_d * dilations[d]; positions in the padding are dropped."""
    image = [int(v) for v in np.asarray(image_shape).reshape(-1)]
    block = [int(v) for v in np.asarray(block_shape).reshape(-1)]
    dims = len(image)
    dilations = list(dilations) if dilations is not None else [1] * dims
    strides = list(strides) if strides is not None else [1] * dims
    pads = list(pads) if pads is not None else [0] * (2 * dims)
    n, rows, length = x.shape
    kernel = int(np.prod(block))
    if rows % kernel:
        raise ValueError(f"Col2Im input dimension 1 ({rows}) is not a multiple of prod(block_shape)={kernel}")
    blocks = [(image[d] + pads[d] + pads[d + dims] - dilations[d] * (block[d] - 1) - 1) // strides[d] + 1
              for d in range(dims)]
    if any(b < 1 for b in blocks) or int(np.prod(blocks)) != length:
        raise ValueError(f"Col2Im input dimension 2 ({length}) must equal the number of sliding blocks "
                         f"{blocks} for image {image}, block {block}, pads {pads}, strides {strides}, "
                         f"dilations {dilations}")
    channels = rows // kernel
    columns = x.reshape([n, channels] + block + blocks)
    padded = np.zeros([n, channels] + [image[d] + pads[d] + pads[d + dims] for d in range(dims)], dtype=x.dtype)
    # one strided add per kernel offset (prod(block) slices, each vectorized over every block position)
    for offset in np.ndindex(*block):
        window = tuple(slice(offset[d] * dilations[d], offset[d] * dilations[d] + (blocks[d] - 1) * strides[d] + 1,
                             strides[d]) for d in range(dims))
        padded[(slice(None), slice(None)) + window] += columns[(slice(None), slice(None)) + offset]
    crop = tuple(slice(pads[d], pads[d] + image[d]) for d in range(dims))
    return np.ascontiguousarray(padded[(slice(None), slice(None)) + crop])


# ---------------------------------------------------------------- MaxUnpool
def _unpooled_shape(x_shape, kernel_shape, pads, strides):
    dims = len(kernel_shape)
    pads = list(pads) if pads is not None else [0] * (2 * dims)
    strides = list(strides) if strides is not None else [1] * dims
    return tuple(x_shape[:2]) + tuple(
        (x_shape[2 + d] - 1) * strides[d] - pads[d] - pads[d + dims] + kernel_shape[d] for d in range(dims))


def _max_unpool_rule(x, indices, output_shape=None, *, kernel_shape, pads=None, strides=None):
    if output_shape is not None:
        shape = int_values(output_shape)
        return TensorInfo(x.dtype, None if shape is None else tuple(d if isinstance(d, int) else None
                                                                    for d in shape))
    if x.shape is None or not all(isinstance(d, int) for d in x.shape[2:]):
        return TensorInfo(x.dtype, None if x.shape is None else (x.shape[0], x.shape[1]) + (None,) * len(kernel_shape))
    return TensorInfo(x.dtype, _unpooled_shape(x.shape, kernel_shape, pads, strides))


@register("MaxUnpool", since=9, infer=_max_unpool_rule, shape_inputs=(2,))
def max_unpool(x, indices, output_shape=None, *, kernel_shape, pads=None, strides=None):
    """The partial inverse of MaxPool: zeros of the unpooled shape ((in - 1) * stride - pads + kernel per
    spatial axis, or ``output_shape`` when given), with y.flat[indices[i]] = x.flat[i]; the indices are
    MaxPool's, flat over the whole [N, C, *spatial] tensor it pooled."""
    if output_shape is not None:
        shape = tuple(int(v) for v in np.asarray(output_shape).reshape(-1))
    else:
        shape = _unpooled_shape(x.shape, kernel_shape, pads, strides)
    if indices.shape != x.shape:
        raise ValueError(f"MaxUnpool indices shape {indices.shape} differs from X shape {x.shape}")
    size = int(np.prod(shape))
    flat = np.asarray(indices, np.int64).reshape(-1)
    bad = (flat < 0) | (flat >= size)
    if bad.any():
        raise IndexError(f"MaxUnpool index {int(flat[bad][0])} is outside the output of shape {shape}")
    out = np.zeros(size, dtype=x.dtype)
    out[flat] = x.reshape(-1)
    return out.reshape(shape)
