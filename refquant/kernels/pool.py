"""Numba loops for MaxPool and AveragePool on [N*C, D, H, W] planes (1-D/2-D pools use singleton dims):
``pool2d_planes`` is the fast path for 1-D/2-D pools, ``max_pool`` the exact one (Indices, NaN, 3-D),
``sum_pool_padded`` the window sums of 3-D average pools and of the divisor counts.

Each call is single-threaded and releases the GIL: refquant.parallel spreads blocks of planes over threads.
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
def pool2d_planes(x, kh, kw, sy, sx, dy, dx, pad_top, pad_left, plane, counts, take_max, out):
    """2-D pooling, plane by plane: out[p, r, q] = max, or sum / counts[r, q], over the window taps
    x_pad[p, r*sy + i*dy, q*sx + j*dx] in row-major tap order (sum = tap 0, then + each next tap).

    ``plane`` is the scratch padded plane (its border already holds the pad value: -inf for max, 0 for
    sum; its size is the last window's reach); each x[p] is copied into its interior, then every tap is
    accumulated over the whole output plane. Tap-outer loops over local 2-D buffers vectorize; the former
    per-window loops over 4-D caller arrays were 3-5x slower. Returns True (and stops) at the first NaN
    when ``take_max``, so the caller can use the exact NaN-propagating kernel.
    """
    n_planes, h, w = x.shape
    oh, ow = out.shape[1], out.shape[2]
    copy_h = min(h, plane.shape[0] - pad_top)
    copy_w = min(w, plane.shape[1] - pad_left)
    acc = np.empty((oh, ow), dtype=x.dtype)
    unit = sy == 1 and sx == 1 and dy == 1 and dx == 1
    for p in range(n_planes):
        saw_nan = False
        for r in range(copy_h):
            for q in range(copy_w):
                v = x[p, r, q]
                saw_nan |= v != v
                plane[pad_top + r, pad_left + q] = v
        if take_max and saw_nan:
            return True
        for r in range(oh):
            for q in range(ow):
                acc[r, q] = plane[r * sy, q * sx]
        for i in range(kh):
            for j in range(kw):
                if i == 0 and j == 0:
                    continue
                if unit and take_max:
                    for r in range(oh):
                        for q in range(ow):
                            v = plane[r + i, q + j]
                            acc[r, q] = v if v > acc[r, q] else acc[r, q]
                elif unit:
                    for r in range(oh):
                        for q in range(ow):
                            acc[r, q] += plane[r + i, q + j]
                elif take_max:
                    for r in range(oh):
                        for q in range(ow):
                            v = plane[r * sy + i * dy, q * sx + j * dx]
                            acc[r, q] = v if v > acc[r, q] else acc[r, q]
                else:
                    for r in range(oh):
                        for q in range(ow):
                            acc[r, q] += plane[r * sy + i * dy, q * sx + j * dx]
        if take_max:
            for r in range(oh):
                for q in range(ow):
                    out[p, r, q] = acc[r, q]
        else:
            for r in range(oh):
                for q in range(ow):
                    out[p, r, q] = acc[r, q] / counts[r, q]
    return False
