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
def _max_rows(plane, rows, kw, sx, dx):
    """rows[y, q] = max over j < kw of plane[y, q*sx + j*dx]: the horizontal half of a 2-D max pool. The
    3-tap windows at stride 1 and 2 are spelled out with literal offsets, which LLVM vectorizes (a loop
    over taps with a runtime stride ran 2-3x slower)."""
    ow = rows.shape[1]
    for y in range(rows.shape[0]):
        src, dst = plane[y], rows[y]
        if dx == 1 and kw == 3 and sx == 2:
            for q in range(ow):
                a, b, c = src[2 * q], src[2 * q + 1], src[2 * q + 2]
                m = a if a > b else b
                dst[q] = m if m > c else c
        elif dx == 1 and kw == 3 and sx == 1:
            for q in range(ow):
                a, b, c = src[q], src[q + 1], src[q + 2]
                m = a if a > b else b
                dst[q] = m if m > c else c
        else:
            for q in range(ow):
                m = src[q * sx]
                for j in range(1, kw):
                    v = src[q * sx + j * dx]
                    m = v if v > m else m
                dst[q] = m


@njit(cache=True, nogil=True)
def _sum_rows(plane, rows, kw, sx, dx):
    """rows[y, q] = sum over j < kw (in order) of plane[y, q*sx + j*dx]; see _max_rows."""
    ow = rows.shape[1]
    for y in range(rows.shape[0]):
        src, dst = plane[y], rows[y]
        if dx == 1 and kw == 3 and sx == 2:
            for q in range(ow):
                dst[q] = src[2 * q] + src[2 * q + 1] + src[2 * q + 2]
        elif dx == 1 and kw == 3 and sx == 1:
            for q in range(ow):
                dst[q] = src[q] + src[q + 1] + src[q + 2]
        else:
            for q in range(ow):
                m = src[q * sx]
                for j in range(1, kw):
                    m += src[q * sx + j * dx]
                dst[q] = m


@njit(cache=True, nogil=True)
def pool2d_planes(x, kh, kw, sy, sx, dy, dx, pad_top, pad_left, pad_value, counts, take_max, out):
    """2-D pooling, plane by plane, as two 1-D passes: rows[y, q] = max, or sum, of x_pad[p, y, q*sx + j*dx]
    over j < kw (tap order), then out[p, r, q] = max, or sum / counts[r, q], of rows[r*sy + i*dy, q] over
    i < kh (tap order). x_pad is x[p] padded with ``pad_value`` (-inf for max, 0 for sum) up to the last
    window's reach. Max is exactly the max over the window; the average's sum is grouped by window rows
    ((a + b + c) + (d + e + f) + ...), a few ulp from a left-to-right sum.

    The separable form does kh + kw instead of kh * kw operations per output, and the inner loops
    vectorize (the per-tap strided loops before were 3-5x slower). Returns True (and stops) at the first
    NaN when ``take_max``, so the caller can use the exact NaN-propagating kernel.
    """
    n_planes, h, w = x.shape
    oh, ow = out.shape[1], out.shape[2]
    hp = (oh - 1) * sy + (kh - 1) * dy + 1  # the last window's reach
    wp = (ow - 1) * sx + (kw - 1) * dx + 1
    plane = np.full((hp, wp), pad_value, dtype=x.dtype)  # the border keeps the pad value for every plane
    rows = np.empty((hp, ow), dtype=x.dtype)
    copy_h = min(h, hp - pad_top)
    copy_w = min(w, wp - pad_left)
    for p in range(n_planes):
        saw_nan = False
        for r in range(copy_h):
            src = x[p, r]
            dst = plane[pad_top + r]
            for q in range(copy_w):
                v = src[q]
                saw_nan |= v != v
                dst[pad_left + q] = v
        if take_max:
            if saw_nan:
                return True
            _max_rows(plane, rows, kw, sx, dx)
        else:
            _sum_rows(plane, rows, kw, sx, dx)
        for r in range(oh):
            dst = out[p, r]
            if kh == 3 and take_max:  # the common 3-row window in one pass (same order as the loop below)
                a, b, c = rows[r * sy], rows[r * sy + dy], rows[r * sy + 2 * dy]
                for q in range(ow):
                    m = b[q] if b[q] > a[q] else a[q]
                    dst[q] = c[q] if c[q] > m else m
                continue
            if kh == 3:
                a, b, c = rows[r * sy], rows[r * sy + dy], rows[r * sy + 2 * dy]
                count = counts[r]
                for q in range(ow):
                    dst[q] = (a[q] + b[q] + c[q]) / count[q]
                continue
            first = rows[r * sy]
            for q in range(ow):
                dst[q] = first[q]
            for i in range(1, kh):
                row = rows[r * sy + i * dy]
                if take_max:
                    for q in range(ow):
                        v = row[q]
                        dst[q] = v if v > dst[q] else dst[q]
                else:
                    for q in range(ow):
                        dst[q] += row[q]
            if not take_max:
                for q in range(ow):
                    dst[q] /= counts[r, q]
    return False
