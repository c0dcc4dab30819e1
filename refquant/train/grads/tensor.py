"""Backward of the shape, layout and data-movement ops. Shape, index and axis inputs get None.

Each of these ops moves or copies elements without arithmetic, so its backward is the adjoint data
movement: a reshape back, the inverse permutation, a split for a concat, a scatter-add for a gather or a
padding (every padded element adds its gradient to the element it was copied from).
"""

from __future__ import annotations

import numpy as np

from ...ops.resize import _output_geometry, resize_axis
from ...ops.resize import axis_roi as resize_axis_roi
from ...ops.tensor import _slice_bounds, depth_to_space, space_to_depth
from ..backward_registry import register_backward
from .common import input_grad, like, output_grads


def _reshaped(grads_out, inputs):
    """[gy reshaped to x's shape, None for every other input]"""
    x = inputs[0]
    return [like(np.reshape(grads_out[0], x.shape), x)] + [None] * (len(inputs) - 1)


@register_backward("Reshape")
def reshape_backward(grads_out, inputs, outputs, *, allowzero=0):
    return _reshaped(grads_out, inputs)


@register_backward("Flatten")
def flatten_backward(grads_out, inputs, outputs, *, axis=1):
    return _reshaped(grads_out, inputs)


@register_backward("Squeeze")
def squeeze_backward(grads_out, inputs, outputs):
    return _reshaped(grads_out, inputs)


@register_backward("Unsqueeze")
def unsqueeze_backward(grads_out, inputs, outputs):
    return _reshaped(grads_out, inputs)


@register_backward("Transpose")
def transpose_backward(grads_out, inputs, outputs, *, perm=None):
    """The inverse permutation."""
    x = inputs[0]
    perm = list(perm) if perm is not None else list(reversed(range(x.ndim)))
    return [like(np.transpose(grads_out[0], np.argsort(perm)), x)]


@register_backward("Concat")
def concat_backward(grads_out, inputs, outputs, *, axis):
    """Each input gets its own slab of gy along ``axis``."""
    gy = grads_out[0]
    axis %= gy.ndim
    bounds = np.cumsum([x.shape[axis] for x in inputs])[:-1]
    return [like(g, x) for g, x in zip(np.split(gy, bounds, axis=axis), inputs)]


@register_backward("Split")
def split_backward(grads_out, inputs, outputs, *, axis=0, num_outputs=None, noutputs=1):
    """The output gradients joined along ``axis`` (zeros for an output that does not reach the loss)."""
    x = inputs[0]
    gx = np.concatenate(output_grads(grads_out, outputs), axis=axis % x.ndim)
    return [like(gx, x)] + [None] * (len(inputs) - 1)


@register_backward("Slice")
def slice_backward(grads_out, inputs, outputs):
    """dx = zeros with gy written where the slice read (a slice reads each element at most once)."""
    x, starts, ends = inputs[:3]
    axes = inputs[3] if len(inputs) > 3 else None
    steps = inputs[4] if len(inputs) > 4 else None
    gx = np.zeros(x.shape, dtype=grads_out[0].dtype)
    gx[_slice_bounds(x.shape, starts, ends, axes, steps)] = grads_out[0]
    return [like(gx, x)] + [None] * (len(inputs) - 1)


# ----------------------------------------------------------------------------- Pad
def _pad_sources(length, before, after, mode):
    """For each padded position j (from -before to length + after - 1), the source index in x, -1 if none."""
    j = np.arange(-before, length + after)
    if mode == "constant":
        return np.where((j >= 0) & (j < length), j, -1)
    if mode == "edge":
        return np.clip(j, 0, length - 1)
    if mode == "wrap":
        return j % length
    if mode == "reflect":
        if length == 1:
            return np.zeros_like(j)
        period = 2 * (length - 1)
        m = np.abs(j) % period
        return np.where(m >= length, period - m, m)
    raise ValueError(f"unknown Pad mode {mode!r}")


@register_backward("Pad")
def pad_backward(grads_out, inputs, outputs, *, mode="constant"):
    """Pad is separable: along each axis, every padded position copies one source element (or the constant),
    so dx accumulates gy along each axis through the 0/1 matrix S[source, position]. Negative pads crop:
    the cropped elements get 0. The constant value's gradient is the sum of gy over padded positions."""
    x, pads = inputs[0], inputs[1]
    constant_value = inputs[2] if len(inputs) > 2 else None
    axes_in = inputs[3] if len(inputs) > 3 else None
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    axes = [int(a) % x.ndim for a in np.asarray(axes_in).reshape(-1)] if axes_in is not None else list(range(x.ndim))
    widths = [(0, 0)] * x.ndim
    for i, axis in enumerate(axes):
        widths[axis] = (pads[i], pads[i + len(axes)])
    g = grads_out[0]
    inside = g
    for axis, (b, e) in enumerate(widths):
        if b == 0 and e == 0:
            continue
        crop_begin, crop_end = max(-b, 0), max(-e, 0)
        kept = x.shape[axis] - crop_begin - crop_end
        sources = _pad_sources(kept, max(b, 0), max(e, 0), mode)
        matrix = np.zeros((x.shape[axis], len(sources)), dtype=g.dtype)  # S[x index, padded index]
        valid = sources >= 0
        matrix[sources[valid] + crop_begin, np.nonzero(valid)[0]] = 1
        g = np.moveaxis(np.moveaxis(g, axis, -1) @ matrix.T, -1, axis)
        if mode == "constant":
            inside = np.take(inside, np.nonzero(valid)[0], axis=axis)
    grads = [like(g, x), None]
    if len(inputs) > 2:
        grads.append(None)
        if constant_value is not None and np.asarray(constant_value).size and mode == "constant" and \
                np.asarray(constant_value).dtype.kind == "f":
            total = grads_out[0].sum() - inside.sum()
            grads[2] = like(np.full(np.shape(constant_value), total), np.asarray(constant_value))
    grads += [None] * (len(inputs) - len(grads))
    return grads


# ----------------------------------------------------------------------------- repeating
@register_backward("Expand")
def expand_backward(grads_out, inputs, outputs):
    return [input_grad(grads_out[0], inputs[0]), None]


@register_backward("Tile")
def tile_backward(grads_out, inputs, outputs):
    """y = tile(x, r): view gy as [r0, d0, r1, d1, ...] and sum the repeat axes."""
    x, repeats = inputs
    reps = [int(r) for r in np.asarray(repeats).reshape(-1)]
    split = []
    for r, d in zip(reps, x.shape):
        split += [r, d]
    gx = grads_out[0].reshape(split).sum(axis=tuple(range(0, 2 * x.ndim, 2)))
    return [like(gx, x), None]


# ----------------------------------------------------------------------------- space <-> depth
@register_backward("DepthToSpace")
def depth_to_space_backward(grads_out, inputs, outputs, *, blocksize, mode="DCR"):
    """A permutation of elements; SpaceToDepth with the same mode is its inverse, hence its adjoint."""
    return [like(space_to_depth(grads_out[0], blocksize=blocksize, mode=mode), inputs[0])]


@register_backward("SpaceToDepth")
def space_to_depth_backward(grads_out, inputs, outputs, *, blocksize, mode="DCR"):
    return [like(depth_to_space(grads_out[0], blocksize=blocksize, mode=mode), inputs[0])]


# ----------------------------------------------------------------------------- no gradient
@register_backward("Shape")
def shape_backward(grads_out, inputs, outputs, *, start=0, end=None):
    """The output depends on x's shape only."""
    return [None]


@register_backward("Size")
def size_backward(grads_out, inputs, outputs):
    return [None]


# ----------------------------------------------------------------------------- Resize
def _resize_adjoint(gy, x_shape, steps):
    """Resize runs one linear map per axis (resize_axis); its adjoint applies each map's transpose in
    reverse order. Each map's [out, in] matrix is resize_axis applied to the identity (extrapolated
    positions of tf_crop_and_resize hold a constant, whose gradient with respect to x is 0)."""
    shapes = [tuple(x_shape)]
    for axis, out_int, _ in steps:
        shape = list(shapes[-1])
        shape[axis] = out_int
        shapes.append(tuple(shape))
    g = gy
    for (axis, out_int, kwargs), in_shape in zip(reversed(steps), reversed(shapes[:-1])):
        n_in = in_shape[axis]
        matrix = resize_axis(np.eye(n_in, dtype=np.float64), 0, out_int, extrapolation_value=0.0, **kwargs)
        g = np.moveaxis(np.moveaxis(g, axis, -1) @ matrix.astype(g.dtype), -1, axis)
    return g


def _resize_steps(x_shape, scales, sizes, roi, axes, keep_aspect_ratio_policy, coord_mode, mode, nearest_mode,
                  cubic_coeff_a, exclude_outside, antialias):
    """The per-axis calls resize_nd makes: [(axis, out size, resize_axis keyword arguments)]."""
    axes, out, full_scales = _output_geometry(x_shape, scales, sizes, axes, keep_aspect_ratio_policy)
    rank = len(x_shape)
    roi = None if roi is None or np.asarray(roi).size == 0 else np.asarray(roi, dtype=np.float64).reshape(-1)
    steps = []
    for a in axes:
        if out[a] == x_shape[a] and full_scales[a] == 1.0 and coord_mode != "tf_crop_and_resize":
            continue
        axis_roi = resize_axis_roi(roi, axes, a, rank)
        steps.append((a, out[a], dict(scale=full_scales[a], mode=mode, coord_mode=coord_mode,
                                      nearest_mode=nearest_mode, cubic_coeff_a=cubic_coeff_a,
                                      exclude_outside=exclude_outside, antialias=bool(antialias), roi=axis_roi)))
    return steps


@register_backward("Resize")
def resize_backward(grads_out, inputs, outputs, *, antialias=0, axes=None,
                    coordinate_transformation_mode="half_pixel", cubic_coeff_a=-0.75, exclude_outside=0,
                    extrapolation_value=0.0, keep_aspect_ratio_policy="stretch", mode="nearest",
                    nearest_mode="round_prefer_floor"):
    """dx = the adjoint of the per-axis interpolations (any mode the forward supports). Resize-10 (inputs x,
    scales) uses asymmetric coordinates and 'simple' nearest rounding, as its forward does."""
    x = inputs[0]
    if len(inputs) == 2:  # Resize-10: (x, scales)
        steps = _resize_steps(x.shape, inputs[1], None, None, None, "stretch", "asymmetric", mode, "simple",
                              -0.75, 0, 0)
        return [like(_resize_adjoint(grads_out[0], x.shape, steps), x), None]
    roi = inputs[1]
    scales = inputs[2] if len(inputs) > 2 else None
    sizes = inputs[3] if len(inputs) > 3 else None
    steps = _resize_steps(x.shape, scales, sizes, roi, axes, keep_aspect_ratio_policy, coordinate_transformation_mode,
                          mode, nearest_mode, cubic_coeff_a, exclude_outside, antialias)
    return [like(_resize_adjoint(grads_out[0], x.shape, steps), x)] + [None] * (len(inputs) - 1)


@register_backward("Upsample")
def upsample_backward(grads_out, inputs, outputs, *, mode="nearest"):
    x = inputs[0]
    steps = _resize_steps(x.shape, inputs[1], None, None, None, "stretch", "asymmetric", mode, "simple", -0.75, 0, 0)
    return [like(_resize_adjoint(grads_out[0], x.shape, steps), x), None]
