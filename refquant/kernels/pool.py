"""Numba loops for MaxPool and AveragePool on [N*C, D, H, W] (1-D/2-D pools use singleton dims).

Single-threaded: a Numba thread pool beside BLAS's spinning threads oversubscribes the cores.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def max_pool(x, kernel, stride, dilation, pad_begin, out, indices, want_indices):
    """out[p, o] = max over the window of x[p]; indices = flat index (d, h, w) of the max in x[p].

    Windows clipped to the input; padding never wins (it is -inf).
    """
    planes, d_in, h_in, w_in = x.shape
    od, oh, ow = out.shape[1], out.shape[2], out.shape[3]
    for p in range(planes):
        for a in range(od):
            for b in range(oh):
                for e in range(ow):
                    best = -np.inf
                    best_index = -1
                    for i in range(kernel[0]):
                        z = a * stride[0] + i * dilation[0] - pad_begin[0]
                        if z < 0 or z >= d_in:
                            continue
                        for j in range(kernel[1]):
                            y = b * stride[1] + j * dilation[1] - pad_begin[1]
                            if y < 0 or y >= h_in:
                                continue
                            for k in range(kernel[2]):
                                xx = e * stride[2] + k * dilation[2] - pad_begin[2]
                                if xx < 0 or xx >= w_in:
                                    continue
                                v = x[p, z, y, xx]
                                if v > best or best_index < 0:
                                    best = v
                                    best_index = (z * h_in + y) * w_in + xx
                    out[p, a, b, e] = best
                    if want_indices:
                        indices[p, a, b, e] = best_index


@njit(cache=True, nogil=True)
def avg_pool(x, kernel, stride, dilation, pad_begin, pad_end, count_include_pad, out):
    """out[p, o] = sum over the window / count; count = taps inside x, or inside x plus explicit pads.

    Taps beyond the explicit padding (ceil_mode's extra windows) never count.
    """
    planes, d_in, h_in, w_in = x.shape
    od, oh, ow = out.shape[1], out.shape[2], out.shape[3]
    for p in range(planes):
        for a in range(od):
            for b in range(oh):
                for e in range(ow):
                    total = 0.0
                    count = 0
                    for i in range(kernel[0]):
                        z = a * stride[0] + i * dilation[0] - pad_begin[0]
                        if z < -pad_begin[0] or z >= d_in + pad_end[0]:
                            continue
                        for j in range(kernel[1]):
                            y = b * stride[1] + j * dilation[1] - pad_begin[1]
                            if y < -pad_begin[1] or y >= h_in + pad_end[1]:
                                continue
                            for k in range(kernel[2]):
                                xx = e * stride[2] + k * dilation[2] - pad_begin[2]
                                if xx < -pad_begin[2] or xx >= w_in + pad_end[2]:
                                    continue
                                inside = 0 <= z < d_in and 0 <= y < h_in and 0 <= xx < w_in
                                if inside:
                                    total += x[p, z, y, xx]
                                    count += 1
                                elif count_include_pad:
                                    count += 1
                    out[p, a, b, e] = total / count if count > 0 else 0.0


@njit(cache=True, nogil=True)
def max_pool_padded(xp, kernel, stride, out):
    """out[p, a, b, e] = max over the window of an input already padded with -inf: no bounds checks,
    and each output row is updated tap by tap so the row loop vectorizes."""
    planes = xp.shape[0]
    od, oh, ow = out.shape[1], out.shape[2], out.shape[3]
    sx = stride[2]
    for p in range(planes):
        for a in range(od):
            for b in range(oh):
                dst = out[p, a, b]
                for e in range(ow):
                    dst[e] = -np.inf
                for i in range(kernel[0]):
                    for j in range(kernel[1]):
                        src = xp[p, a * stride[0] + i, b * stride[1] + j]
                        for k in range(kernel[2]):
                            if sx == 1:
                                for e in range(ow):
                                    v = src[e + k]
                                    dst[e] = v if v > dst[e] else dst[e]
                            else:
                                for e in range(ow):
                                    v = src[e * sx + k]
                                    dst[e] = v if v > dst[e] else dst[e]


@njit(cache=True, nogil=True)
def sum_pool_padded(xp, kernel, stride, dilation, out):
    """out[p, a, b, e] = sum over the window of an input already padded (with zeros); no bounds checks."""
    planes = xp.shape[0]
    od, oh, ow = out.shape[1], out.shape[2], out.shape[3]
    sx = stride[2]
    for p in range(planes):
        for a in range(od):
            for b in range(oh):
                dst = out[p, a, b]
                for e in range(ow):
                    dst[e] = 0.0
                for i in range(kernel[0]):
                    for j in range(kernel[1]):
                        src = xp[p, a * stride[0] + i * dilation[0], b * stride[1] + j * dilation[1]]
                        for k in range(kernel[2]):
                            first = k * dilation[2]
                            if sx == 1:
                                for e in range(ow):
                                    dst[e] += src[e + first]
                            else:
                                for e in range(ow):
                                    dst[e] += src[e * sx + first]


@njit(cache=True, nogil=True)
def _fill_plane(src, pad_begin, value, plane):
    """plane[a, b, q] = src[a - p0, b - p1, q - p2] inside src, ``value`` outside; True if src had a NaN."""
    d, h, w = src.shape
    saw_nan = False
    for a in range(plane.shape[0]):
        z = a - pad_begin[0]
        for b in range(plane.shape[1]):
            y = b - pad_begin[1]
            row = plane[a, b]
            if 0 <= z < d and 0 <= y < h:
                src_row = src[z, y]
                for q in range(plane.shape[2]):
                    xx = q - pad_begin[2]
                    if 0 <= xx < w:
                        v = src_row[xx]
                        saw_nan |= v != v
                        row[q] = v
                    else:
                        row[q] = value
            else:
                for q in range(plane.shape[2]):
                    row[q] = value
    return saw_nan


@njit(cache=True, nogil=True)
def max_pool_planes(x, kernel, stride, pad_begin, extent, out):
    """max_pool_padded without a padded copy of the tensor: each plane is padded with -inf into a scratch
    plane of size ``extent`` (the last window's reach) that stays in cache. Returns True (and stops) at the
    first NaN, so the caller can use the exact NaN-propagating kernel instead."""
    plane = np.empty((1, extent[0], extent[1], extent[2]), dtype=x.dtype)
    for p in range(x.shape[0]):
        if _fill_plane(x[p], pad_begin, -np.inf, plane[0]):
            return True
        max_pool_padded(plane, kernel, stride, out[p:p + 1])
    return False


@njit(cache=True, nogil=True)
def avg_pool_planes(x, kernel, stride, dilation, pad_begin, extent, counts, out):
    """out[p] = (sum over each window of x[p] zero-padded) / counts, one scratch plane in cache per plane;
    ``counts`` [OD, OH, OW] is how many taps each window counts (at least 1)."""
    plane = np.empty((1, extent[0], extent[1], extent[2]), dtype=x.dtype)
    od, oh, ow = out.shape[1], out.shape[2], out.shape[3]
    for p in range(x.shape[0]):
        _fill_plane(x[p], pad_begin, 0.0, plane[0])
        sum_pool_padded(plane, kernel, stride, dilation, out[p:p + 1])
        for a in range(od):
            for b in range(oh):
                row = out[p, a, b]
                count_row = counts[a, b]
                for e in range(ow):
                    row[e] = row[e] / count_row[e]
