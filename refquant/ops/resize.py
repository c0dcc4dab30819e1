"""Resize and Upsample: separable interpolation, one axis at a time.

For each output index x along an axis, the coordinate transformation gives the source coordinate
x_src (half_pixel: (x + 0.5) / scale - 0.5, asymmetric: x / scale, align_corners, ...). The mode gives
taps around x_src and their weights: nearest (one tap), linear (2), cubic (4), or, with antialias
when downsampling, a filter stretched by 1 / scale. Taps beyond the edge read the edge pixel
(or get weight 0 and renormalize with exclude_outside). Each axis is then one gather plus a
weighted sum over the taps.
"""

from __future__ import annotations

import math

import numpy as np

from .registry import register
from .shapes import TensorInfo


# ----------------------------------------------------------------------------- coordinates
def source_coordinates(mode, out_int, scale, in_size, roi_start=0.0, roi_end=1.0):
    """x_src for x = 0..out_int-1 (float64), and a mask of positions outside the input (crop mode only)."""
    x = np.arange(out_int, dtype=np.float64)
    out_float = scale * in_size
    outside = None
    if mode == "align_corners":
        src = np.zeros_like(x) if out_float == 1 else x * (in_size - 1) / (out_float - 1)
    elif mode == "asymmetric":
        src = _f32_source(x, scale, 0.0)
    elif mode == "tf_crop_and_resize":
        if out_float == 1:
            src = np.full_like(x, (roi_end - roi_start) * (in_size - 1) / 2)
        else:
            src = x * (roi_end - roi_start) * (in_size - 1) / (out_float - 1)
        src = src + roi_start * (in_size - 1)
        outside = (src < 0) | (src > in_size - 1)
    elif mode == "pytorch_half_pixel":
        src = np.full_like(x, -0.5) if out_float == 1 else _f32_source(x, scale, 0.5)
    elif mode == "half_pixel":
        src = _f32_source(x, scale, 0.5)
    elif mode == "half_pixel_symmetric":
        adjustment = out_int / out_float
        offset = in_size / 2 * (1 - adjustment)
        src = offset + (x + 0.5) / scale - 0.5
    else:
        raise ValueError(f"unknown coordinate_transformation_mode {mode!r}")
    return src, outside


def _f32_source(x, scale, half):
    """(x + half) / scale - half. A scale given as a float32 ``scales`` input is applied in float32, in
    onnxruntime's order (GetOriginalCoordinate): float64 rounds differently at exact pixel boundaries
    (3 / 0.6f is 5 in float32, 4.9999998 in float64), which moves a floor/ceil nearest pick by one pixel.
    A scale derived from ``sizes`` (out / in, not a float32 value) stays float64, which is what matches
    onnxruntime there (8 / (16/7) = 3.5 for round_prefer_ceil)."""
    if float(np.float32(scale)) != float(scale):  # float(): NumPy 2 would compare in float32
        return (x + half) / scale - half
    x32, s32, h32 = x.astype(np.float32), np.float32(scale), np.float32(half)
    return (((x32 + h32) / s32) - h32).astype(np.float64)


# ----------------------------------------------------------------------------- taps
def _cubic(t, a):
    """Keys' cubic convolution kernel with parameter a, for |t| < 2."""
    t = np.abs(t)
    return np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                    np.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0))


def taps(src, mode, scale, nearest_mode="round_prefer_floor", cubic_coeff_a=-0.75, antialias=False):
    """(first tap index [out], weights [out, n]) for source coordinates ``src``.

    The convention is ONNX's: ratio = src - floor(src), taken as 1 when src is an integer, so the
    taps of an exact pixel end on it.
    """
    floor = np.floor(src)
    exact = src == floor
    ratio = np.where(exact, 1.0, src - floor)
    base = floor.astype(np.int64)
    if mode == "nearest":
        if nearest_mode == "round_prefer_floor":
            pick_high = ratio > 0.5
        elif nearest_mode == "round_prefer_ceil":
            pick_high = ratio >= 0.5
        elif nearest_mode == "floor":
            pick_high = exact
        elif nearest_mode == "ceil":
            pick_high = np.ones_like(exact)
        elif nearest_mode == "simple":  # onnxruntime's Resize-10/Upsample: truncate up-, ceil downsampling
            pick_high = np.full_like(exact, scale < 1)
        else:
            raise ValueError(f"unknown nearest_mode {nearest_mode!r}")
        index = np.where(exact, base, np.where(pick_high, base + 1, base))
        return index, np.ones((len(src), 1))
    if mode == "linear":
        if antialias and scale < 1:
            start = int(math.floor(-1 / scale) + 1)
            offsets = np.arange(start, 2 - start)
            weights = np.clip(1 - np.abs((offsets[None, :] - ratio[:, None]) * scale), 0, 1)
        else:
            offsets = np.array([0, 1])
            weights = np.stack([1 - ratio, ratio], axis=1)
    elif mode == "cubic":
        a = cubic_coeff_a
        if antialias and scale < 1:
            start = int(math.floor(-2 / scale) + 1)
            offsets = np.arange(start, 2 - start)
            weights = _cubic((offsets[None, :] - ratio[:, None]) * scale, a)
        else:
            offsets = np.arange(-1, 3)
            weights = _cubic(offsets[None, :] - ratio[:, None], a)
    else:
        raise ValueError(f"unknown Resize mode {mode!r}")
    weights = weights / weights.sum(axis=1, keepdims=True)
    # the taps sit at floor + offsets; an exact source with ratio 1 is one tap to the left
    first = np.where(exact, base - 1, base) + offsets[0]
    return first, weights


def resize_axis(x, axis, out_int, scale, *, mode, coord_mode, nearest_mode, cubic_coeff_a, exclude_outside,
                antialias, roi=(0.0, 1.0), extrapolation_value=0.0):
    """Interpolate ``x`` along one axis to ``out_int`` samples."""
    in_size = x.shape[axis]
    src, outside = source_coordinates(coord_mode, out_int, scale, in_size, *roi)
    first, weights = taps(src, mode, scale, nearest_mode, cubic_coeff_a, antialias)
    n = weights.shape[1]
    index = first[:, None] + np.arange(n)[None, :]
    if exclude_outside and mode != "nearest":
        weights = np.where((index < 0) | (index >= in_size), 0.0, weights)
        weights = weights / np.where(weights.sum(axis=1, keepdims=True) == 0, 1, weights.sum(axis=1, keepdims=True))
    index = np.clip(index, 0, in_size - 1)
    if n == 1:
        y = np.take(x, index[:, 0], axis=axis)
    else:
        y = None
        shape = (1,) * axis + (out_int,) + (1,) * (x.ndim - axis - 1)
        for k in range(n):
            term = np.take(x, index[:, k], axis=axis) * weights[:, k].astype(x.dtype).reshape(shape)
            y = term if y is None else y + term
    if outside is not None and outside.any():
        mask = outside.reshape((1,) * axis + (out_int,) + (1,) * (x.ndim - axis - 1))
        y = np.where(mask, np.asarray(extrapolation_value, dtype=x.dtype), y)
    return y


# ----------------------------------------------------------------------------- the ops
def _output_geometry(shape, scales, sizes, axes, keep_aspect_ratio_policy):
    """(output sizes, scales) for every axis, from scales or sizes given for ``axes``."""
    rank = len(shape)
    axes = list(range(rank)) if axes is None else [a % rank for a in axes]
    full_scales = [1.0] * rank
    out = list(shape)
    if sizes is not None and np.asarray(sizes).size:
        sizes = [int(s) for s in np.asarray(sizes).reshape(-1)]
        for a, s in zip(axes, sizes):
            full_scales[a] = s / shape[a]
            out[a] = s
        if keep_aspect_ratio_policy in ("not_larger", "not_smaller"):
            pick = min if keep_aspect_ratio_policy == "not_larger" else max
            scale = pick(full_scales[a] for a in axes)
            for a in axes:
                full_scales[a] = scale
                out[a] = int(scale * shape[a] + 0.5)
    else:
        values = [float(s) for s in np.asarray(scales).reshape(-1)]
        for a, s in zip(axes, values):
            full_scales[a] = s
            out[a] = int(math.floor(shape[a] * s))
    return axes, out, full_scales


def _resize_rule(x, roi=None, scales=None, sizes=None, **attrs):
    if x.shape is None:
        return TensorInfo(x.dtype, None)
    known_sizes = sizes is not None and sizes.const is not None and sizes.const.size
    known_scales = scales is not None and scales.const is not None and scales.const.size
    if not (known_sizes or known_scales):
        return TensorInfo(x.dtype, None)
    axes = attrs.get("axes")
    rank = len(x.shape)
    axes = list(range(rank)) if axes is None else [a % rank for a in axes]
    shape = list(x.shape)
    values = (sizes if known_sizes else scales).const.reshape(-1)
    for a, v in zip(axes, values):
        if known_sizes:
            shape[a] = int(v)
        elif float(v) != 1.0:
            shape[a] = int(math.floor(shape[a] * float(v))) if isinstance(shape[a], int) else None
    return TensorInfo(x.dtype, tuple(shape))


def axis_roi(roi, axes: list[int], a: int, rank: int) -> tuple[float, float]:
    """(start, end) of axis ``a`` in Resize's roi: given for the ``axes`` only ([starts..., ends...]) or for every
    axis of a rank-``rank`` tensor; (0, 1) without one."""
    if roi is None:
        return (0.0, 1.0)
    if len(roi) == 2 * len(axes):
        k = axes.index(a)
        return (roi[k], roi[k + len(axes)])
    return (roi[a], roi[a + rank])


def resize_nd(x, scales=None, sizes=None, roi=None, *, axes=None, mode="nearest",
              coordinate_transformation_mode="half_pixel", nearest_mode="round_prefer_floor", cubic_coeff_a=-0.75,
              exclude_outside=0, extrapolation_value=0.0, antialias=0, keep_aspect_ratio_policy="stretch"):
    axes, out, full_scales = _output_geometry(x.shape, scales, sizes, axes, keep_aspect_ratio_policy)
    rank = x.ndim
    roi = None if roi is None or np.asarray(roi).size == 0 else np.asarray(roi, dtype=np.float64).reshape(-1)
    y = x if x.dtype.kind == "f" else x.astype(np.float32)
    for a in axes:
        if out[a] == x.shape[a] and full_scales[a] == 1.0 and coordinate_transformation_mode != "tf_crop_and_resize":
            continue
        y = resize_axis(y, a, out[a], full_scales[a], mode=mode, coord_mode=coordinate_transformation_mode,
                        nearest_mode=nearest_mode, cubic_coeff_a=cubic_coeff_a,
                        exclude_outside=exclude_outside, antialias=bool(antialias), roi=axis_roi(roi, axes, a, rank),
                        extrapolation_value=extrapolation_value)
    if y.dtype != x.dtype:
        y = np.clip(np.rint(y), np.iinfo(x.dtype).min, np.iinfo(x.dtype).max) if x.dtype.kind in "iu" else y
        y = y.astype(x.dtype)
    return y


@register("Resize", since=11, infer=_resize_rule, shape_inputs=(1, 2, 3))
def resize(x, roi=None, scales=None, sizes=None, *, antialias=0, axes=None,
           coordinate_transformation_mode="half_pixel", cubic_coeff_a=-0.75, exclude_outside=0,
           extrapolation_value=0.0, keep_aspect_ratio_policy="stretch", mode="nearest",
           nearest_mode="round_prefer_floor"):
    """Resize to ``sizes`` (or floor(shape * scales)) with the given coordinate mapping and interpolation."""
    return resize_nd(x, scales, sizes, roi, axes=axes, mode=mode,
                     coordinate_transformation_mode=coordinate_transformation_mode, nearest_mode=nearest_mode,
                     cubic_coeff_a=cubic_coeff_a, exclude_outside=exclude_outside,
                     extrapolation_value=extrapolation_value, antialias=antialias,
                     keep_aspect_ratio_policy=keep_aspect_ratio_policy)


def _legacy_rule(x, scales, **attrs):
    return _resize_rule(x, None, scales, None)


@register("Resize", since=10, infer=_legacy_rule, shape_inputs=(1,))
def resize_10(x, scales, *, mode="nearest"):
    """Resize-10 = Upsample-9: asymmetric coordinates x / scale; nearest takes floor when upsampling an
    axis and ceil when downsampling it (onnxruntime's 'simple' mode; the spec leaves it open)."""
    return resize_nd(x, scales, mode=mode, coordinate_transformation_mode="asymmetric", nearest_mode="simple")


@register("Upsample", since=9, infer=_legacy_rule, shape_inputs=(1,))
def upsample(x, scales, *, mode="nearest"):
    """Upsample (scales as input since opset 9; the attribute form is normalized at import)."""
    return resize_nd(x, scales, mode=mode, coordinate_transformation_mode="asymmetric", nearest_mode="simple")
