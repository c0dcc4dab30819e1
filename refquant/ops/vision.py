"""Region and sampling ops: RoiAlign, MaxRoiPool, GridSample, AffineGrid, DeformConv.

Sampling is vectorized over every output position at once: a bilinear (or cubic) sample is a sum over
corner taps, each tap one fancy-indexing gather of a whole [C, positions] block times its weight.
Python loops run over boxes, batch items, groups and taps only.
"""

from __future__ import annotations

import itertools

import numpy as np
from numba import njit

from .registry import register
from .shapes import TensorInfo


def _compute_dtype(x):
    return x.dtype if x.dtype in (np.float32, np.float64) else np.dtype(np.float32)


# ------------------------------------------------------------------------------------------ RoiAlign
def _roi_rule(x, rois, batch_indices=None, **attrs):
    num = rois.shape[0] if rois.shape is not None else None
    c = x.shape[1] if x.shape is not None else None
    return TensorInfo(x.dtype, (num, c, attrs.get("output_height", 1), attrs.get("output_width", 1)))


def _roi_axis_samples(start, bin_size, pooled, grid, size, dtype):
    """Bilinear taps along one axis for every sample of every bin, as ORT's pre-calculation:
    p = start + bin*b + (i + 0.5) * b / grid; outside [-1, size]: weight 0; p clamped at 0; the low tap
    floor(p), the high tap low + 1 (both size - 1 at the far edge). Returns (low, high, w_low, w_high),
    each [pooled * grid]."""
    t = dtype.type
    bins = np.arange(pooled, dtype=dtype)[:, None]
    steps = (np.arange(grid, dtype=dtype)[None, :] + t(0.5)) * t(bin_size / grid)
    p = (t(start) + bins * t(bin_size) + steps).reshape(-1)
    valid = ~((p < -1) | (p > size))
    p = np.maximum(p, t(0))
    low = p.astype(np.int64)
    edge = low >= size - 1
    low = np.where(edge, size - 1, low)
    high = np.where(edge, size - 1, low + 1)
    p = np.where(edge, low.astype(dtype), p)
    frac = p - low
    return low, high, np.where(valid, 1 - frac, 0).astype(dtype), np.where(valid, frac, 0).astype(dtype)


def _roi_align(x, rois, batch_indices, mode, output_height, output_width, sampling_ratio, spatial_scale,
               half_pixel):
    if x.ndim != 4 or rois.ndim != 2 or rois.shape[1] != 4:
        raise ValueError(f"X {x.shape} must be [N, C, H, W] and rois {rois.shape} [num_rois, 4]")
    if mode not in ("avg", "max"):
        raise ValueError(f"mode must be 'avg' or 'max', got {mode!r}")
    dtype = _compute_dtype(x)
    xs = x.astype(dtype, copy=False)
    h, w = x.shape[2:]
    batch_indices = np.asarray(batch_indices).reshape(-1).astype(np.int64)
    if batch_indices.size != rois.shape[0] or np.any((batch_indices < 0) | (batch_indices >= x.shape[0])):
        raise ValueError(f"batch_indices {batch_indices.tolist()} must give one index in [0, {x.shape[0]}) "
                         f"per roi")
    out = np.zeros((rois.shape[0], x.shape[1], output_height, output_width), dtype=dtype)
    offset = 0.5 if half_pixel else 0.0
    for r, roi in enumerate(rois.astype(dtype)):
        x1, y1, x2, y2 = (float(v) * spatial_scale - offset for v in roi)
        roi_w, roi_h = x2 - x1, y2 - y1
        if not half_pixel:  # output_half_pixel: rois at least one pixel
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        bin_h, bin_w = roi_h / output_height, roi_w / output_width
        grid_h = sampling_ratio if sampling_ratio > 0 else int(np.ceil(roi_h / output_height))
        grid_w = sampling_ratio if sampling_ratio > 0 else int(np.ceil(roi_w / output_width))
        if grid_h <= 0 or grid_w <= 0:
            continue
        yl, yh, wyl, wyh = _roi_axis_samples(y1, bin_h, output_height, grid_h, h, dtype)
        xl, xh, wxl, wxh = _roi_axis_samples(x1, bin_w, output_width, grid_w, w, dtype)
        image = xs[batch_indices[r]]
        if mode == "avg":  # separable: out = Ay @ image @ Ax^T / count
            ay = np.zeros((output_height, h), dtype)
            rows = np.repeat(np.arange(output_height), grid_h)
            np.add.at(ay, (rows, yl), wyl)
            np.add.at(ay, (rows, yh), wyh)
            ax = np.zeros((output_width, w), dtype)
            cols = np.repeat(np.arange(output_width), grid_w)
            np.add.at(ax, (cols, xl), wxl)
            np.add.at(ax, (cols, xh), wxh)
            out[r] = (ay @ image @ ax.T) / dtype.type(max(grid_h * grid_w, 1))
        else:  # ORT: per sample the max of the four weighted corners, then the max over the bin's samples
            taps = [image[:, ys[:, None], xs_[None, :]] * (wy[:, None] * wx[None, :])
                    for ys, wy in ((yl, wyl), (yh, wyh)) for xs_, wx in ((xl, wxl), (xh, wxh))]
            best = np.maximum(np.maximum(taps[0], taps[1]), np.maximum(taps[2], taps[3]))
            out[r] = best.reshape(x.shape[1], output_height, grid_h, output_width, grid_w).max(axis=(2, 4))
    return out.astype(x.dtype, copy=False)


@register("RoiAlign", since=10, infer=_roi_rule)
def roi_align_10(x, rois, batch_indices, *, mode="avg", output_height=1, output_width=1, sampling_ratio=0,
                 spatial_scale=1.0):
    """Opset 10: RoiAlign with the output_half_pixel coordinates (no -0.5 shift, rois at least 1x1)."""
    return _roi_align(x, rois, batch_indices, mode, output_height, output_width, sampling_ratio, spatial_scale,
                      half_pixel=False)


@register("RoiAlign", since=16, infer=_roi_rule)
def roi_align(x, rois, batch_indices, *, coordinate_transformation_mode="half_pixel", mode="avg",
              output_height=1, output_width=1, sampling_ratio=0, spatial_scale=1.0):
    """y[r, c, i, j] = avg (or max) over a grid of bilinear samples in bin (i, j) of roi r (x1, y1, x2, y2)
    scaled by spatial_scale; half_pixel shifts the roi by -0.5, output_half_pixel does not and makes it
    at least one pixel. Grid: sampling_ratio per bin side, or ceil(roi side / output side)."""
    if coordinate_transformation_mode not in ("half_pixel", "output_half_pixel"):
        raise ValueError(f"unknown coordinate_transformation_mode {coordinate_transformation_mode!r}")
    return _roi_align(x, rois, batch_indices, mode, output_height, output_width, sampling_ratio, spatial_scale,
                      half_pixel=coordinate_transformation_mode == "half_pixel")


# ----------------------------------------------------------------------------------------- MaxRoiPool
@njit(cache=True, nogil=True)
def _max_roi_pool_loop(x, corners, pooled_h, pooled_w, out):
    """corners [R, 5] int64 (batch, x1, y1, x2, y2) in pixels; bin edges in float32, as onnxruntime."""
    channels, height, width = x.shape[1:]
    for r in range(corners.shape[0]):
        b, x1, y1, x2, y2 = corners[r, 0], corners[r, 1], corners[r, 2], corners[r, 3], corners[r, 4]
        bin_h = np.float32(max(y2 - y1 + 1, 1)) / np.float32(pooled_h)
        bin_w = np.float32(max(x2 - x1 + 1, 1)) / np.float32(pooled_w)
        for ph in range(pooled_h):
            hs = min(max(int(np.floor(np.float32(ph) * bin_h)) + y1, 0), height)
            he = min(max(int(np.ceil(np.float32(ph + 1) * bin_h)) + y1, 0), height)
            for pw in range(pooled_w):
                ws = min(max(int(np.floor(np.float32(pw) * bin_w)) + x1, 0), width)
                we = min(max(int(np.ceil(np.float32(pw + 1) * bin_w)) + x1, 0), width)
                for c in range(channels):
                    best = x.dtype.type(0) if he <= hs or we <= ws else x[b, c, hs, ws]
                    for yy in range(hs, he):
                        for xx in range(ws, we):
                            v = x[b, c, yy, xx]
                            if v > best:
                                best = v
                    out[r, c, ph, pw] = best


@register("MaxRoiPool", since=1, infer=lambda x, rois, *, pooled_shape, spatial_scale=1.0: TensorInfo(
    x.dtype, (rois.shape[0] if rois.shape else None, x.shape[1] if x.shape else None, *pooled_shape)))
def max_roi_pool(x, rois, *, pooled_shape, spatial_scale=1.0):
    """Fast R-CNN RoI max pooling: roi (batch, x1, y1, x2, y2) scaled and rounded half away from zero to
    pixels (size = x2 - x1 + 1), split into pooled_shape bins [floor(i * size / n), ceil((i + 1) * size / n))
    offset by the roi corner and clipped to the image; y = the max over each bin, 0 for an empty bin."""
    if x.ndim != 4 or rois.ndim != 2 or rois.shape[1] != 5:
        raise ValueError(f"X {x.shape} must be [N, C, H, W] and rois {rois.shape} [num_rois, 5]")
    batch = rois[:, 0].astype(np.int64)
    if np.any((batch < 0) | (batch >= x.shape[0])):
        raise ValueError(f"roi batch indices {batch.tolist()} outside [0, {x.shape[0]})")
    dtype = _compute_dtype(x)
    scaled = rois[:, 1:].astype(np.float32) * np.float32(spatial_scale)
    rounded = np.sign(scaled) * np.floor(np.abs(scaled) + np.float32(0.5))  # std::round: half away from zero
    corners = np.concatenate([batch[:, None], rounded.astype(np.int64)], axis=1)
    out = np.empty((rois.shape[0], x.shape[1], *pooled_shape), dtype=dtype)
    _max_roi_pool_loop(np.ascontiguousarray(x, dtype=dtype), corners, int(pooled_shape[0]), int(pooled_shape[1]),
                       out)
    return out.astype(x.dtype, copy=False)


# ----------------------------------------------------------------------------------------- GridSample
def _reflect(v, lo, hi):
    """Reflect coordinates outside [lo, hi] back in by bouncing off the borders (PyTorch's reflect)."""
    span = hi - lo
    if span <= 0:
        return np.full_like(v, lo)
    below = v < lo
    dist = np.where(below, lo - v, v - hi)
    flips = np.trunc(dist / span)
    rest = dist - flips * span
    even = np.fmod(flips, 2) == 0
    return np.where(below, np.where(even, lo + rest, hi - rest), np.where(even, hi - rest, lo + rest))


def _cubic_weights(t, a=-0.75):
    """Keys cubic convolution weights for taps at -1, 0, 1, 2 around floor(x), t = x - floor(x)."""
    w0 = ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a
    w1 = ((a + 2) * t - (a + 3)) * t * t + 1
    w2 = ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1
    w3 = ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a
    return [w0, w1, w2, w3]


def _grid_sample(x, grid, mode, padding_mode, align_corners):
    if x.ndim < 3 or grid.ndim != x.ndim or grid.shape[-1] != x.ndim - 2 or grid.shape[0] != x.shape[0]:
        raise ValueError(f"X {x.shape} must be [N, C, *spatial] and grid {grid.shape} [N, *out, {x.ndim - 2}]")
    if mode not in ("linear", "nearest", "cubic"):
        raise ValueError(f"unknown mode {mode!r}")
    if padding_mode not in ("zeros", "border", "reflection"):
        raise ValueError(f"unknown padding_mode {padding_mode!r}")
    dtype = _compute_dtype(x)
    n, c = x.shape[:2]
    dims = x.shape[2:]
    nd = len(dims)
    out_spatial = grid.shape[1:-1]
    g = grid.reshape(n, -1, nd).astype(dtype, copy=False)
    taps_per_dim = []  # per spatial dim: list of (index [N, P], weight [N, P] or None)
    for i, size in enumerate(dims):
        v = g[..., nd - 1 - i]  # the grid lists coordinates innermost dim first (x, y, ...)
        v = (v + 1) / 2 * (size - 1) if align_corners else ((v + 1) * size - 1) / 2
        if mode == "nearest":
            v = np.rint(v)  # half to even, as PyTorch
        lo, hi = (0.0, size - 1.0) if align_corners else (-0.5, size - 0.5)
        outside = (v < lo) | (v > hi)
        # cubic: PyTorch and onnxruntime bound each tap, not the coordinate (ONNX's reference clamps the
        # coordinate first, which differs for border padding; no backend node case covers that combination)
        if padding_mode == "border" and mode != "cubic":
            v = np.where(outside, np.clip(v, 0, size - 1), v)
        elif padding_mode == "reflection" and mode != "cubic":
            v = np.where(outside, _reflect(v, lo, hi), v)
        if mode == "nearest":
            taps = [(np.trunc(v), None)]
        else:
            base = np.floor(v)
            t = v - base
            if mode == "linear":
                taps = [(base, 1 - t), (base + 1, t)]
            else:
                taps = [(base + k - 1, w) for k, w in enumerate(_cubic_weights(t))]
        resolved = []
        for index, weight in taps:  # pixel fetch with the padding rule for taps outside the image
            valid = None
            if padding_mode == "zeros":
                valid = (index >= 0) & (index <= size - 1)
            elif padding_mode == "border":
                index = np.clip(index, 0, size - 1)
            else:
                index = np.trunc(np.where((index < 0) | (index > size - 1), _reflect(index, lo, hi), index))
            index = np.clip(index, 0, size - 1).astype(np.int64)
            if valid is not None:
                weight = valid.astype(dtype) if weight is None else np.where(valid, weight, 0)
            resolved.append((index, weight))
        taps_per_dim.append(resolved)
    strides = np.cumprod((1,) + dims[::-1])[::-1][1:]
    planes = np.ascontiguousarray(x, dtype=dtype).reshape(n, c, -1)
    out = np.zeros((n, c, g.shape[1]), dtype=dtype)
    for combo in itertools.product(*taps_per_dim):
        flat = sum(index * int(s) for (index, _), s in zip(combo, strides))
        weight = None
        for _, w in combo:
            if w is not None:
                weight = w if weight is None else weight * w
        for b in range(n):
            values = planes[b][:, flat[b]]
            out[b] += values if weight is None else values * weight[b].astype(dtype, copy=False)
    return out.reshape(n, c, *out_spatial).astype(x.dtype, copy=False)


def _grid_sample_rule(x, grid, **attrs):
    if x.shape is None or grid.shape is None:
        return TensorInfo(x.dtype, None)
    return TensorInfo(x.dtype, (x.shape[0], x.shape[1], *grid.shape[1:-1]))


@register("GridSample", since=16, infer=_grid_sample_rule)
def grid_sample_16(x, grid, *, align_corners=0, mode="bilinear", padding_mode="zeros"):
    """Opset 16: 4-D GridSample, modes named bilinear / nearest / bicubic."""
    if x.ndim != 4:
        raise ValueError(f"GridSample-16 takes a 4-D X, got {x.shape}")
    renamed = {"bilinear": "linear", "bicubic": "cubic", "nearest": "nearest"}
    if mode not in renamed:
        raise ValueError(f"unknown mode {mode!r} (opset 16: bilinear, nearest, bicubic)")
    return _grid_sample(x, grid, renamed[mode], padding_mode, align_corners)


@register("GridSample", since=20, infer=_grid_sample_rule)
def grid_sample(x, grid, *, align_corners=0, mode="linear", padding_mode="zeros"):
    """y[n, c, p] = X[n, c] interpolated at grid[n, p] (normalized to [-1, 1], innermost dim first):
    coordinate u = (g + 1) / 2 * (size - 1) with align_corners, else ((g + 1) * size - 1) / 2; outside
    the image it is clamped (border) or reflected (reflection), and taps outside read 0 (zeros), the
    nearest border pixel (border) or the reflected pixel (reflection); cubic bounds only the taps.
    linear: (multi)linear over 2^D corners; nearest: round half to even; cubic: Keys a = -0.75 over 4^D taps.
    Any number of spatial dims."""
    return _grid_sample(x, grid, mode, padding_mode, align_corners)


# ----------------------------------------------------------------------------------------- AffineGrid
def _base_coordinates(size, align_corners):
    if align_corners:
        return np.linspace(-1.0, 1.0, size) if size > 1 else np.full(1, -1.0)
    return (2 * np.arange(size) + 1) / size - 1


@register("AffineGrid", since=20, shape_inputs=(1,))
def affine_grid(theta, size, *, align_corners=0):
    """grid[n, *p] = theta[n] @ (x_p, y_p, [z_p,] 1): the normalized base coordinates of an output of
    size [N, C, (D,) H, W] mapped by the affine matrices theta [N, 2, 3] (2-D) or [N, 3, 4] (3-D)."""
    size = [int(s) for s in np.asarray(size).reshape(-1)]
    spatial = size[2:]
    nd = len(spatial)
    if nd not in (2, 3) or theta.shape[1:] != (nd, nd + 1) or theta.shape[0] != size[0]:
        raise ValueError(f"theta {theta.shape} and size {size} must be [N, 2, 3] with [N, C, H, W] "
                         "or [N, 3, 4] with [N, C, D, H, W]")
    axes = [_base_coordinates(s, align_corners) for s in spatial]
    mesh = np.meshgrid(*axes, indexing="ij")  # (d,) h, w order
    homogeneous = np.stack(list(mesh[::-1]) + [np.ones(spatial)], axis=-1).reshape(-1, nd + 1)  # x, y, (z), 1
    grid = np.einsum("pk,njk->npj", homogeneous, theta.astype(np.float64))
    return grid.reshape(size[0], *spatial, nd).astype(theta.dtype)


# ----------------------------------------------------------------------------------------- DeformConv
@register("DeformConv", since=19)
def deform_conv(x, w, offset, b=None, mask=None, *, dilations=None, group=1, kernel_shape=None,
                offset_group=1, pads=None, strides=None):
    """2-D deformable convolution: y[n, o, p] = b[o] + sum_{c, k} w[o, c, k] * m[n, g, k, p] *
    X[n, c](pos(p, k) + offset[n, g, k, p]), X read bilinearly with zeros outside the image, g the
    channel's offset group, pos(p, k) = p * stride - pad_begin + k * dilation; mask m defaults to 1."""
    if x.ndim != 4:
        raise ValueError(f"DeformConv supports 2-D images [N, C, H, W] only, got X {x.shape}")
    dtype = _compute_dtype(x)
    n, c, h, wd = x.shape
    oc = w.shape[0]
    kh, kw = kernel_shape or w.shape[2:]
    sh, sw = strides or (1, 1)
    dh, dw = dilations or (1, 1)
    pt, pl, pb, pr = pads or (0, 0, 0, 0)
    oh = (h + pt + pb - ((kh - 1) * dh + 1)) // sh + 1
    ow = (wd + pl + pr - ((kw - 1) * dw + 1)) // sw + 1
    if c != w.shape[1] * group or oc % group or c % offset_group:
        raise ValueError(f"X {x.shape}, W {w.shape}, group {group}, offset_group {offset_group} do not agree")
    if offset.shape != (n, offset_group * kh * kw * 2, oh, ow):
        raise ValueError(f"offset {offset.shape} must be {(n, offset_group * kh * kw * 2, oh, ow)}")
    if mask is not None and mask.shape != (n, offset_group * kh * kw, oh, ow):
        raise ValueError(f"mask {mask.shape} must be {(n, offset_group * kh * kw, oh, ow)}")
    k, p = kh * kw, oh * ow
    off = offset.astype(dtype).reshape(n, offset_group, kh, kw, 2, oh, ow)
    base_y = (np.arange(oh) * sh - pt)[None, :] + (np.arange(kh) * dh)[:, None]  # [kh, oh]
    base_x = (np.arange(ow) * sw - pl)[None, :] + (np.arange(kw) * dw)[:, None]  # [kw, ow]
    py = (base_y[:, None, :, None] + off[:, :, :, :, 0]).reshape(n, offset_group, k, p)
    px = (base_x[None, :, None, :] + off[:, :, :, :, 1]).reshape(n, offset_group, k, p)
    m = np.ones((n, offset_group, k, p), dtype) if mask is None else mask.astype(dtype).reshape(
        n, offset_group, k, p)
    y0, x0 = np.floor(py), np.floor(px)
    ty, tx = py - y0, px - x0
    y0, x0 = y0.astype(np.int64), x0.astype(np.int64)
    cg = c // offset_group
    planes = np.ascontiguousarray(x, dtype=dtype).reshape(n, offset_group, cg, h * wd)
    cols = np.zeros((n, offset_group, cg, k, p), dtype)
    for dy, wy in ((0, 1 - ty), (1, ty)):
        for dx, wx in ((0, 1 - tx), (1, tx)):
            yy, xx = y0 + dy, x0 + dx
            inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < wd)
            flat = np.where(inside, yy * wd + xx, 0)
            weight = np.where(inside, wy * wx * m, 0).astype(dtype)
            for b_ in range(n):
                for g in range(offset_group):
                    cols[b_, g] += planes[b_, g][:, flat[b_, g]] * weight[b_, g][None]
    cols = cols.reshape(n, group, (c // group) * k, p)
    wg = w.astype(dtype).reshape(group, oc // group, -1)
    y = np.matmul(wg[None], cols).reshape(n, oc, oh, ow)
    if b is not None:
        y += b.astype(dtype).reshape(1, -1, 1, 1)
    return y.astype(x.dtype, copy=False)
