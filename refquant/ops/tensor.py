"""Shape and layout ops: Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Concat, Split, Slice, Pad, Tile,
Expand, Shape, Size, DepthToSpace, SpaceToDepth, Trilu, ReverseSequence.

Kernels return views where NumPy gives one: no kernel writes into its inputs, so sharing is safe.
"""

from __future__ import annotations

import numpy as np

from .registry import register
from .shapes import TensorInfo, broadcast_shapes, int_values

def _ints(array) -> list[int]:
    return [int(v) for v in np.asarray(array).reshape(-1)]


# ----------------------------------------------------------------------------- Reshape
def _reshape_target(in_shape, shape, allowzero):
    """ONNX Reshape's target: 0 copies the input dim (unless allowzero), -1 is inferred."""
    out = [in_shape[i] if (d == 0 and not allowzero) else d for i, d in enumerate(shape)]
    return out


def _reshape_rule(x, shape, *, allowzero=0):
    values = int_values(shape)
    if values is None or x.shape is None:
        return TensorInfo(x.dtype, None)
    target = _reshape_target(x.shape, list(values), allowzero)
    if -1 in target:
        known = [d for d in target if d != -1]
        if all(isinstance(d, int) for d in list(x.shape) + known):
            target[target.index(-1)] = int(np.prod(x.shape)) // max(1, int(np.prod(known)))
        else:
            rest, cancelled = list(x.shape), True
            for d in known:  # cancel dims that pass through unchanged
                if d in rest:
                    rest.remove(d)
                else:
                    cancelled = False
            if cancelled and all(isinstance(d, int) for d in rest):
                target[target.index(-1)] = int(np.prod(rest))
            else:
                target[target.index(-1)] = rest[0] if cancelled and len(rest) == 1 else None
    return TensorInfo(x.dtype, tuple(target))


@register("Reshape", since=5, infer=_reshape_rule, shape_inputs=(1,))
def reshape(x, shape, *, allowzero=0):
    return x.reshape(_reshape_target(x.shape, _ints(shape), allowzero))


def _flatten_rule(x, *, axis=1):
    if x.shape is None:
        return TensorInfo(x.dtype, None)
    axis = axis % len(x.shape) if len(x.shape) else 0

    def prod(dims):
        if all(isinstance(d, int) for d in dims):
            return int(np.prod(dims))
        return dims[0] if len(dims) == 1 else None

    return TensorInfo(x.dtype, (prod(x.shape[:axis]), prod(x.shape[axis:])))


@register("Flatten", since=1, infer=_flatten_rule)
def flatten(x, *, axis=1):
    """[d0..dn] -> [d0*..*d(axis-1), d(axis)*..*dn]"""
    axis = axis % x.ndim if x.ndim else 0
    return x.reshape(int(np.prod(x.shape[:axis])), -1) if x.size else \
        x.reshape(int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis:])))


def _transpose_rule(x, *, perm=None):
    if x.shape is None:
        return TensorInfo(x.dtype, None)
    perm = perm if perm is not None else list(reversed(range(len(x.shape))))
    return TensorInfo(x.dtype, tuple(x.shape[p] for p in perm))


@register("Transpose", since=1, infer=_transpose_rule)
def transpose(x, *, perm=None):
    return np.transpose(x, perm)


def _squeeze_rule(x, axes=None):
    if x.shape is None or (axes is not None and axes.const is None):
        return TensorInfo(x.dtype, None)
    if axes is None:
        return TensorInfo(x.dtype, tuple(d for d in x.shape if d != 1) if all(
            isinstance(d, int) for d in x.shape) else None)
    drop = {a % len(x.shape) for a in _ints(axes.const)}
    return TensorInfo(x.dtype, tuple(d for i, d in enumerate(x.shape) if i not in drop))


@register("Squeeze", since=13, infer=_squeeze_rule, shape_inputs=(1,))
def squeeze(x, axes=None):
    if axes is None:
        return np.squeeze(x)
    return np.squeeze(x, axis=tuple(a % x.ndim for a in _ints(axes)))


def _unsqueeze_rule(x, axes):
    if x.shape is None or axes.const is None:
        return TensorInfo(x.dtype, None)
    rank = len(x.shape) + len(_ints(axes.const))
    inserted = sorted(a % rank for a in _ints(axes.const))
    dims = iter(x.shape)
    return TensorInfo(x.dtype, tuple(1 if i in inserted else next(dims) for i in range(rank)), sym=x.sym)


@register("Unsqueeze", since=13, infer=_unsqueeze_rule, shape_inputs=(1,))
def unsqueeze(x, axes):
    rank = x.ndim + len(_ints(axes))
    return np.expand_dims(x, tuple(sorted(a % rank for a in _ints(axes))))


# ----------------------------------------------------------------------------- joining and splitting
def _concat_rule(*xs, axis):
    xs = [x for x in xs if x is not None]
    if any(x.shape is None for x in xs):
        return TensorInfo(xs[0].dtype, None)
    rank = len(xs[0].shape)
    axis %= rank
    shape = list(xs[0].shape)
    sizes = [x.shape[axis] for x in xs]
    shape[axis] = sum(sizes) if all(isinstance(s, int) for s in sizes) else None
    for i in range(rank):
        if i != axis and not isinstance(shape[i], int):
            fixed = [x.shape[i] for x in xs if isinstance(x.shape[i], int)]
            shape[i] = fixed[0] if fixed else shape[i]
    values = [int_values(x) for x in xs]
    sym = sum(values, ()) if rank == 1 and all(v is not None for v in values) else None
    return TensorInfo(xs[0].dtype, tuple(shape), sym=sym)


@register("Concat", since=4, infer=_concat_rule)
def concat(*xs, axis):
    return np.concatenate(xs, axis=axis)


def _split_sizes(length, split, num_outputs, noutputs):
    if split is not None:
        return _ints(split)
    parts = num_outputs or noutputs
    chunk = -(-length // parts)  # ceil: the last chunk is the smaller one (opset 18)
    sizes = [chunk] * (length // chunk) + ([length % chunk] if length % chunk else [])
    return sizes + [0] * (parts - len(sizes))


def _split_rule(x, split=None, *, axis=0, num_outputs=None, noutputs=1):
    if x.shape is None or (split is not None and split.const is None):
        return None
    axis %= len(x.shape)
    length = x.shape[axis]
    if not isinstance(length, int) and split is None:
        return None
    sizes = _split_sizes(length, None if split is None else split.const, num_outputs, noutputs)
    return tuple(TensorInfo(x.dtype, tuple(s if i == axis else d for i, d in enumerate(x.shape))) for s in sizes)


@register("Split", since=13, infer=_split_rule, shape_inputs=(1,))
def split(x, split=None, *, axis=0, num_outputs=None, noutputs=1):
    axis %= x.ndim
    sizes = _split_sizes(x.shape[axis], split, num_outputs, noutputs)
    return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=axis))


# ----------------------------------------------------------------------------- slicing and padding
def _slice_bounds(shape, starts, ends, axes, steps):
    """Per-axis Python slices from ONNX's starts/ends/axes/steps.

    Negative indices count from the end; then start is clamped to [0, dim] (step > 0) or
    [0, dim - 1] (step < 0) and end to [0, dim] or [-1, dim - 1]; end -1 with a negative step
    means "through index 0", which Python spells None.
    """
    rank = len(shape)
    starts = _ints(starts)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(axes)
    index = [slice(None)] * rank
    for axis, start, end, step in zip(axes, starts, _ints(ends), steps):
        axis %= rank
        dim = shape[axis]
        start = start + dim if start < 0 else start
        end = end + dim if end < 0 else end
        if step > 0:
            start, end = min(max(start, 0), dim), min(max(end, 0), dim)
        else:
            start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
        index[axis] = slice(start, None if end < 0 else end, step)
    return tuple(index)


def _slice_rule(x, starts, ends, axes=None, steps=None):
    consts = [starts, ends, axes, steps]
    if x.shape is None or any(c is not None and c.const is None for c in consts):
        return TensorInfo(x.dtype, None)
    index = _slice_bounds(x.shape, starts.const, ends.const, None if axes is None else axes.const,
                          None if steps is None else steps.const)
    shape = []
    for d, s in zip(x.shape, index):
        if s == slice(None):
            shape.append(d)
        elif isinstance(d, int):
            shape.append(len(range(d)[s]))
        else:
            shape.append(None)
    return TensorInfo(x.dtype, tuple(shape))


@register("Slice", since=10, infer=_slice_rule, shape_inputs=(1, 2, 3, 4))
def slice_(x, starts, ends, axes=None, steps=None):
    return x[_slice_bounds(x.shape, starts, ends, axes, steps)]


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "edge", "wrap": "wrap"}


@register("Pad", since=11, shape_inputs=(1, 3))
def pad(x, pads, constant_value=None, axes=None, *, mode="constant"):
    """pads = [x1_begin, x2_begin, ..., x1_end, x2_end, ...] over ``axes`` (all when omitted); negative crops."""
    pads = _ints(pads)
    axes = [a % x.ndim for a in _ints(axes)] if axes is not None else list(range(x.ndim))
    n = len(axes)
    widths = [(0, 0)] * x.ndim
    for i, axis in enumerate(axes):
        widths[axis] = (pads[i], pads[i + n])
    crop = tuple(slice(-b if b < 0 else 0, e if e < 0 else None) for b, e in widths)
    x = x[crop]
    widths = [(max(b, 0), max(e, 0)) for b, e in widths]
    if mode == "constant":
        value = 0 if constant_value is None or np.asarray(constant_value).size == 0 else \
            np.asarray(constant_value).reshape(-1)[0]
        return np.pad(x, widths, mode="constant", constant_values=np.asarray(value).astype(x.dtype))
    return np.pad(x, widths, mode=_PAD_MODES[mode])


# ----------------------------------------------------------------------------- repeating
@register("Tile", since=6, shape_inputs=(1,))
def tile(x, repeats):
    return np.tile(x, _ints(repeats))


def _expand_rule(x, shape):
    if shape.const is None or x.shape is None:
        return TensorInfo(x.dtype, None)
    target = tuple(_ints(shape.const))
    return TensorInfo(x.dtype, broadcast_shapes(x.shape, target))


@register("Expand", since=8, infer=_expand_rule, shape_inputs=(1,))
def expand(x, shape):
    """Broadcast x against ``shape`` (bidirectionally: a dim of 1 in ``shape`` keeps x's dim)."""
    target = np.broadcast_shapes(x.shape, tuple(_ints(shape)))
    return np.broadcast_to(x, target)


# ----------------------------------------------------------------------------- shape queries
def _shape_rule(x, *, start=0, end=None):
    if x.shape is None:
        return TensorInfo(np.dtype(np.int64), None)
    dims = x.shape[slice(start, end)]
    const = np.array(dims, dtype=np.int64) if all(isinstance(d, int) for d in dims) else None
    sym = tuple(dims) if const is None and all(d is not None for d in dims) else None
    return TensorInfo(np.dtype(np.int64), (len(dims),), const, sym)


@register("Shape", since=1, infer=_shape_rule)
def shape(x, *, start=0, end=None):
    return np.array(x.shape[slice(start, end)], dtype=np.int64)


@register("Size", since=1, infer=lambda x: TensorInfo(np.dtype(np.int64), ()))
def size(x):
    return np.array(x.size, dtype=np.int64)


# ----------------------------------------------------------------------------- space <-> depth
@register("DepthToSpace", since=1)
def depth_to_space(x, *, blocksize, mode="DCR"):
    """[N, C*b*b, H, W] -> [N, C, H*b, W*b]; DCR takes depth as (b, b, C), CRD as (C, b, b)."""
    n, c, h, w = x.shape
    b = blocksize
    if mode == "DCR":
        y = x.reshape(n, b, b, c // (b * b), h, w).transpose(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(n, c // (b * b), b, b, h, w).transpose(0, 1, 4, 2, 5, 3)
    return y.reshape(n, c // (b * b), h * b, w * b)


@register("SpaceToDepth", since=1)
def space_to_depth(x, *, blocksize, mode="DCR"):
    """[N, C, H, W] -> [N, C*b*b, H/b, W/b], depth ordered (b, b, C) in DCR mode, (C, b, b) in CRD."""
    n, c, h, w = x.shape
    b = blocksize
    y = x.reshape(n, c, h // b, b, w // b, b)
    y = y.transpose(0, 3, 5, 1, 2, 4) if mode == "DCR" else y.transpose(0, 1, 3, 5, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)


@register("Trilu", since=14, infer=lambda x, k=None, **a: TensorInfo(x.dtype, x.shape))
def trilu(x, k=None, *, upper=1):
    """The upper (j - i >= k) or lower (j - i <= k) triangle of the last two axes; the rest 0."""
    k = 0 if k is None else int(np.asarray(k).reshape(-1)[0])
    return np.triu(x, k) if upper else np.tril(x, k)


@register("ReverseSequence", since=10, infer=lambda x, lens, **a: TensorInfo(x.dtype, x.shape))
def reverse_sequence(x, sequence_lens, *, batch_axis=1, time_axis=0):
    """For each batch entry b, the first sequence_lens[b] steps along ``time_axis`` reversed, the rest kept."""
    out = x.copy()
    steps = x.shape[time_axis]
    for b, length in enumerate(np.asarray(sequence_lens).reshape(-1)):
        length = int(min(max(length, 0), steps))
        index = [slice(None)] * x.ndim
        index[batch_axis] = b
        index[time_axis] = slice(0, length)
        source = list(index)
        source[time_axis] = slice(length - 1, None, -1) if length > 0 else slice(0, 0)
        out[tuple(index)] = x[tuple(source)]
    return out
