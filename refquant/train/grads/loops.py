"""Numba loops of the backward passes where vectorized NumPy would need a temporary per kernel tap or a
scatter: the depthwise convolution's weight gradient and max pooling's argmax scatter. ``nogil`` so
refquant.parallel can spread items."""

from __future__ import annotations

import numpy as np
from numba import njit

from ...kernels.pool import max_pool


# reassociating the weight-gradient sums lets LLVM keep them in vector registers (they are sums of
# products, rounded differently but no less accurately); no other fast-math assumption is made
_SUMS = {"reassoc", "contract", "nsz"}


@njit(cache=True, nogil=True, fastmath=_SUMS)
def depthwise_weight_grad(xp, gy, stride, dilation, c0, c1, gw):
    """gw[c, i, j] += sum_{n, oy, ox} gy[n, c, oy, ox] * xp[n, c // mult, oy*sy + i*dy, ox*sx + j*dx]
    for the output channels c0..c1-1; xp is the padded input [N, C_in, Hp, Wp], gw [C_out, KH, KW]."""
    n_img, c_out, oh, ow = gy.shape
    mult = c_out // xp.shape[1]
    kh, kw = gw.shape[1], gw.shape[2]
    sy, sx = stride[0], stride[1]
    dy, dx = dilation[0], dilation[1]
    for n in range(n_img):
        for c in range(c0, c1):
            src = xp[n, c // mult]
            for oy in range(oh):
                g = gy[n, c, oy]
                for i in range(kh):
                    r = src[oy * sy + i * dy]
                    for j in range(kw):
                        base = j * dx
                        acc = 0.0
                        for ox in range(ow):
                            acc += g[ox] * r[base + ox * sx]
                        gw[c, i, j] += acc


@njit(cache=True, nogil=True, fastmath=_SUMS)
def depthwise_weight_grad_3x3(xp, gy, sy, sx, c0, c1, gw):
    """depthwise_weight_grad for 3x3, undilated, multiplier 1: nine accumulators per channel in one loop
    over each output row (as the forward's depthwise3x3), ~7x the generic loop."""
    n_img = gy.shape[0]
    oh, ow = gy.shape[2], gy.shape[3]
    for n in range(n_img):
        for c in range(c0, c1):
            a00 = a01 = a02 = a10 = a11 = a12 = a20 = a21 = a22 = gy.dtype.type(0)
            for oy in range(oh):
                g = gy[n, c, oy]
                r0, r1, r2 = xp[n, c, oy * sy], xp[n, c, oy * sy + 1], xp[n, c, oy * sy + 2]
                if sx == 1:
                    for ox in range(ow):
                        v = g[ox]
                        a00 += v * r0[ox]
                        a01 += v * r0[ox + 1]
                        a02 += v * r0[ox + 2]
                        a10 += v * r1[ox]
                        a11 += v * r1[ox + 1]
                        a12 += v * r1[ox + 2]
                        a20 += v * r2[ox]
                        a21 += v * r2[ox + 1]
                        a22 += v * r2[ox + 2]
                else:
                    for ox in range(ow):
                        v = g[ox]
                        b = ox * sx
                        a00 += v * r0[b]
                        a01 += v * r0[b + 1]
                        a02 += v * r0[b + 2]
                        a10 += v * r1[b]
                        a11 += v * r1[b + 1]
                        a12 += v * r1[b + 2]
                        a20 += v * r2[b]
                        a21 += v * r2[b + 1]
                        a22 += v * r2[b + 2]
            gw[c, 0, 0] += a00
            gw[c, 0, 1] += a01
            gw[c, 0, 2] += a02
            gw[c, 1, 0] += a10
            gw[c, 1, 1] += a11
            gw[c, 1, 2] += a12
            gw[c, 2, 0] += a20
            gw[c, 2, 1] += a21
            gw[c, 2, 2] += a22


@njit(cache=True, nogil=True)
def max_pool_backward(x, gy, kernel, stride, dilation, pad_begin, gx):
    """gx[p, argmax of window o] += gy[p, o] on planes [P, D, H, W]; the argmax is the forward's own
    (refquant.kernels.pool.max_pool's Indices: padding never wins, the first maximum on ties)."""
    planes = x.shape[0]
    values = np.empty(gy.shape, dtype=x.dtype)
    indices = np.empty(gy.shape, dtype=np.int64)
    max_pool(x, kernel, stride, dilation, pad_begin, values, indices, True)
    for p in range(planes):
        flat_gx = gx[p].reshape(-1)
        flat_gy = gy[p].reshape(-1)
        flat_index = indices[p].reshape(-1)
        for o in range(flat_gy.size):
            if flat_index[o] >= 0:
                flat_gx[flat_index[o]] += flat_gy[o]


@njit(cache=True, nogil=True)
def max_pool_backward_padded(xp, gy, kernel, stride, gxp):
    """max_pool_backward for undilated windows over an input padded with -inf up to every window's reach
    (the forward's fast path). As the forward, each output row is swept tap by tap so the compare loop
    vectorizes: it keeps the best value and the tap that first reached it (strict >: the first maximum),
    then one short loop scatters the row's gradients."""
    planes = xp.shape[0]
    od, oh, ow = gy.shape[1], gy.shape[2], gy.shape[3]
    kd, kh, kw = kernel[0], kernel[1], kernel[2]
    sx = stride[2]
    best = np.empty(ow, dtype=xp.dtype)
    tap = np.empty(ow, dtype=np.int32)
    tap_i = np.empty(kd * kh * kw, dtype=np.int64)  # tap number -> (i, j, k): no divisions in the scatter
    tap_j = np.empty(kd * kh * kw, dtype=np.int64)
    tap_k = np.empty(kd * kh * kw, dtype=np.int64)
    t = 0
    for i in range(kd):
        for j in range(kh):
            for k in range(kw):
                tap_i[t], tap_j[t], tap_k[t] = i, j, k
                t += 1
    for p in range(planes):
        for a in range(od):
            for b in range(oh):
                for e in range(ow):
                    best[e] = -np.inf
                    tap[e] = 0
                t = 0
                for i in range(kd):
                    for j in range(kh):
                        src = xp[p, a * stride[0] + i, b * stride[1] + j]
                        for k in range(kw):
                            if sx == 1:
                                for e in range(ow):
                                    v = src[e + k]
                                    take = v > best[e]
                                    best[e] = v if take else best[e]
                                    tap[e] = t if take else tap[e]
                            else:
                                for e in range(ow):
                                    v = src[e * sx + k]
                                    take = v > best[e]
                                    best[e] = v if take else best[e]
                                    tap[e] = t if take else tap[e]
                            t += 1
                g = gy[p, a, b]
                for e in range(ow):
                    t = tap[e]
                    gxp[p, a * stride[0] + tap_i[t], b * stride[1] + tap_j[t], e * sx + tap_k[t]] += g[e]


@njit(cache=True, nogil=True, fastmath=_SUMS)
def clip_backward(x, gy, lo, hi, gx):
    """One pass over flat arrays: gx = gy inside [lo, hi], 0 outside; returns (sum of gy where x < lo,
    sum of gy where x > hi), the gradients of the scalar bounds."""
    below = 0.0
    above = 0.0
    zero = gx.dtype.type(0)
    for i in range(x.size):
        v = x[i]
        g = gy[i]
        if v < lo:
            below += g
            gx[i] = zero
        elif v > hi:
            above += g
            gx[i] = zero
        else:
            gx[i] = g
    return below, above
