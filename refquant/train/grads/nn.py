"""Backward of convolution and pooling: Conv, ConvTranspose, MaxPool, AveragePool, GlobalAveragePool,
GlobalMaxPool, LRN.

Conv, for y[n, m, o] = b[m] + sum_{c, k} w[m, c, k] * xp[n, c, s*o + d*k] (xp: x padded):
  dL/dw[m, c, k] = sum_{n, o} gy[n, m, o] * xp[n, c, s*o + d*k]   (gy @ im2col(x)^T, one GEMM per group)
  dL/dx          = col2im(w^T @ gy)                                 (the transposed convolution of gy)
  dL/db[m]       = sum_{n, o} gy[n, m, o]
1x1 convolutions skip im2col; depthwise convolutions and max pooling run Numba loops (grads/loops.py).
ConvTranspose is the adjoint of Conv, so its input gradient is a Conv of gy and its weight gradient is
Conv's weight gradient with the roles of x and gy swapped.
"""

from __future__ import annotations

import numpy as np

from ... import parallel
from ...kernels import conv as conv_kernels
from ...ops.nn import _conv_transpose_geometry, _pool_setup, average_pool_counts, conv as conv_forward, conv_geometry
from ..backward_registry import register_backward
from . import loops
from .common import compute_dtype, like


def _i64(values):
    return np.asarray([int(v) for v in values], dtype=np.int64)


def _to3(values, fill):
    """A per-spatial-dim list padded to 3 entries by prepending ``fill`` (1-D/2-D -> 3-D)."""
    values = list(values)
    return [fill] * (3 - len(values)) + values


def _as3d(x):
    """[N, C, *spatial] -> [N, C, D, H, W] view."""
    return x.reshape(x.shape[:2] + (1,) * (5 - x.ndim) + x.shape[2:])


def _windows(xp, kernel3, stride3, dilation3, out3):
    """im2col as a strided view [C, KD, KH, KW, OD, OH, OW] of a padded image [C, Dp, Hp, Wp]:
    window[c, i, j, k, a, b, e] = xp[c, a*s0 + i*d0, b*s1 + j*d1, e*s2 + k*d2] (the forward's layout)."""
    sc, sd, sh, sw = xp.strides
    shape = (xp.shape[0], *kernel3, *out3)
    strides = (sc, sd * dilation3[0], sh * dilation3[1], sw * dilation3[2],
               sd * stride3[0], sh * stride3[1], sw * stride3[2])
    return np.lib.stride_tricks.as_strided(xp, shape, strides, writeable=False)


def tap_slices(tap, dilation, out, stride):
    """Slices of a padded input that kernel tap ``tap`` (3 indices) reads for every output position."""
    return tuple(slice(t * d, t * d + (o - 1) * s + 1, s) for t, d, o, s in zip(tap, dilation, out, stride))


class _Geometry:
    """The 3-D (singleton-padded) geometry of a convolution x -> y."""

    def __init__(self, x_shape, kernel, strides, dilations, begin, end, out_size):
        n_spatial = len(x_shape) - 2
        self.stride = _i64(_to3(strides or [1] * n_spatial, 1))
        self.dilation = _i64(_to3(dilations or [1] * n_spatial, 1))
        self.begin = _i64(_to3(begin, 0))
        self.end = _i64(_to3(end, 0))
        self.kernel = _i64(_to3(kernel, 1))
        self.out = tuple(int(o) for o in _to3(out_size, 1))
        self.x3 = tuple(int(d) for d in _to3(x_shape[2:], 1))

    def is_pointwise(self):
        return all(k == 1 for k in self.kernel) and not self.begin.any() and not self.end.any()

    def padded(self, x3):
        if not (self.begin.any() or self.end.any()):
            return x3
        return np.pad(x3, [(0, 0), (0, 0)] + [(int(b), int(e)) for b, e in zip(self.begin, self.end)])

    def subsampled(self, x3):
        """A 1x1 conv's input pixels: every stride-th, up to the output size."""
        s = self.stride
        return x3[:, :, ::s[0], ::s[1], ::s[2]][:, :, :self.out[0], :self.out[1], :self.out[2]]


def _sample_blocks(n):
    """Blocks of images for refquant.parallel: a few per thread, so a descheduled thread holds back little."""
    threads = parallel.budget()
    return parallel.split(n, 2 * threads if threads > 1 else 1)


def dense_conv_backward(x3, w3, gy3, group, geo: _Geometry, need_x=True):
    """(dL/dx, dL/dw) of a dense or grouped conv, image by image and group by group:
      dw_g^T [C/g*K, M/g] += im2col(x_i,g) [C/g*K, P] @ gy_i,g^T [P, M/g]
      dx_i,g = col2im(w_g^T [C/g*K, M/g] @ gy_i,g [M/g, P])
    Both GEMMs take C-contiguous operands (OpenBLAS is ~100x slower on [4, P] @ [P, 32]^T than on the
    same product with contiguous operands). Blocks of images run in parallel; each block sums its own
    weight gradient, and the blocks' sums are added at the end.
    """
    n, c_in = x3.shape[:2]
    m = w3.shape[0]
    cg, mg = c_in // group, m // group
    kernel3 = tuple(int(k) for k in geo.kernel)
    k_rows = cg * int(np.prod(kernel3))
    positions = int(np.prod(geo.out))
    pointwise = geo.is_pointwise()
    source = np.ascontiguousarray(geo.subsampled(x3)) if pointwise else geo.padded(x3)
    gy_flat = gy3.reshape(n, m, positions)
    w_t = [np.ascontiguousarray(w3[g * mg:(g + 1) * mg].reshape(mg, k_rows).T) for g in range(group)]
    gx = np.zeros(x3.shape, dtype=x3.dtype) if need_x else None
    gx_sub = None
    if need_x and pointwise:
        gx_sub = gx if source.shape == x3.shape else np.zeros(source.shape, dtype=x3.dtype)
    blocks = _sample_blocks(n)
    partial = np.zeros((len(blocks), group, k_rows, mg), dtype=x3.dtype)

    def block(b):
        for i in range(*blocks[b]):
            for g in range(group):
                gyg = gy_flat[i, g * mg:(g + 1) * mg]
                if pointwise:
                    cols = source[i, g * cg:(g + 1) * cg].reshape(cg, positions)
                else:
                    cols = np.ascontiguousarray(
                        _windows(source[i, g * cg:(g + 1) * cg], kernel3, geo.stride, geo.dilation, geo.out)
                    ).reshape(k_rows, positions)
                partial[b, g] += cols @ np.ascontiguousarray(gyg.T)
                if not need_x:
                    continue
                if pointwise:
                    np.matmul(w_t[g], gyg, out=gx_sub[i, g * cg:(g + 1) * cg].reshape(cg, positions))
                else:
                    conv_kernels.col2im(w_t[g] @ gyg, geo.kernel, geo.stride, geo.dilation, geo.begin,
                                        _i64(geo.out), gx[i, g * cg:(g + 1) * cg])

    parallel.parallel_for(len(blocks), block)
    if gx_sub is not None and gx_sub is not gx:
        s = geo.stride
        gx[:, :, ::s[0], ::s[1], ::s[2]][:, :, :geo.out[0], :geo.out[1], :geo.out[2]] = gx_sub
    gw = partial.sum(axis=0).transpose(0, 2, 1).reshape((m, cg) + kernel3)
    return gx, gw


def depthwise_conv_backward(x3, w3, gy3, geo: _Geometry):
    """(dL/dx, dL/dw) of a depthwise conv (one input channel per group, any multiplier) on 1-D/2-D inputs.

    dL/dw: the Numba loops, blocks of (images, channels) in parallel, each with its own partial sum.
    dL/dx[r] = sum_i w[i] gy_s[r + p - i*d], with gy_s = gy spread onto the stride grid (zeros between):
    a stride-1 convolution of gy_s with the flipped kernel, padded (K-1)*d - p in front, which the
    forward's own (depthwise) kernel computes.
    """
    n, c_in = x3.shape[:2]
    m = w3.shape[0]
    mult = m // c_in
    xp = np.ascontiguousarray(geo.padded(x3)[:, :, 0])
    gy = np.ascontiguousarray(gy3[:, :, 0])
    kh, kw = int(geo.kernel[1]), int(geo.kernel[2])
    stride, dilation = geo.stride[1:], geo.dilation[1:]
    threads = parallel.budget()
    image_blocks = _sample_blocks(n)
    channel_blocks = parallel.split(m, 1 if len(image_blocks) >= 2 * threads or threads == 1 else 2 * threads)
    items = [(ib, cb) for ib in image_blocks for cb in channel_blocks]
    partial = np.zeros((len(items), m, kh, kw), dtype=np.float64)
    three = (kh, kw) == (3, 3) and mult == 1 and not np.any(dilation != 1)

    def item(k):
        (i0, i1), (c0, c1) = items[k]
        if three:
            loops.depthwise_weight_grad_3x3(xp[i0:i1], gy[i0:i1], int(stride[0]), int(stride[1]), c0, c1, partial[k])
        else:
            loops.depthwise_weight_grad(xp[i0:i1], gy[i0:i1], stride, dilation, c0, c1, partial[k])

    parallel.parallel_for(len(items), item)
    gw = partial.sum(axis=0).astype(x3.dtype).reshape(w3.shape)

    extent = (geo.kernel[1:] - 1) * dilation
    spread = [(o - 1) * s + 1 for o, s in zip(geo.out[1:], stride)]
    front = [int(e - b) for e, b in zip(extent, geo.begin[1:])]
    back = [int(h - L - f + e) for h, L, f, e in zip(geo.x3[1:], spread, front, extent)]
    if min(front + back) < 0:  # padding wider than the kernel: the general transposed convolution
        gx, _ = dense_conv_backward(x3, w3, gy3, c_in, geo)
        return gx, gw
    if any(s != 1 for s in stride):
        gy_s = np.zeros(gy.shape[:2] + tuple(spread), dtype=gy.dtype)
        gy_s[:, :, ::stride[0], ::stride[1]] = gy
    else:
        gy_s = gy
    flipped = np.ascontiguousarray(w3[:, 0, 0, ::-1, ::-1].reshape(c_in, mult, kh, kw))
    gx = conv_forward(gy_s, flipped, group=c_in, dilations=[int(d) for d in dilation], pads=front + back)
    return gx[:, :, None], gw


@register_backward("Conv")
def conv_backward(grads_out, inputs, outputs, *, auto_pad="NOTSET", dilations=None, group=1, kernel_shape=None,
                  pads=None, strides=None):
    """Gradients of x, w and b (see the module docstring); float32 in, float32 out."""
    x, w = inputs[0], inputs[1]
    b = inputs[2] if len(inputs) > 2 else None
    gy = grads_out[0]
    dtype = compute_dtype(x)
    kernel = list(kernel_shape or w.shape[2:])
    begin, end, out_size = conv_geometry(list(x.shape[2:]), kernel, strides, dilations, pads, auto_pad)
    geo = _Geometry(x.shape, kernel, strides, dilations, begin, end, out_size)
    x3 = _as3d(x.astype(dtype, copy=False))
    w3 = _as3d(w.astype(dtype, copy=False))
    gy3 = _as3d(np.ascontiguousarray(gy, dtype=dtype))
    if group == x3.shape[1] and w.shape[1] == 1 and group > 1 and x3.shape[2] == 1:
        gx3, gw3 = depthwise_conv_backward(x3, w3, gy3, geo)
    else:
        gx3, gw3 = dense_conv_backward(x3, w3, gy3, group, geo)
    gb = None
    if b is not None:
        gb = like(gy3.sum(axis=(0, 2, 3, 4)), b)
    return [like(gx3.reshape(x.shape), x), like(gw3.reshape(w.shape), w), gb][:len(inputs)]


@register_backward("ConvTranspose")
def conv_transpose_backward(grads_out, inputs, outputs, *, auto_pad="NOTSET", dilations=None, group=1,
                            kernel_shape=None, output_padding=None, output_shape=None, pads=None, strides=None):
    """y = ConvTranspose(x, w) is the adjoint of the conv gy -> x with the same strides, dilations and begin
    pads, so dL/dx = Conv(gy, w) and dL/dw is that conv's weight gradient with x as the output gradient."""
    x, w = inputs[0], inputs[1]
    b = inputs[2] if len(inputs) > 2 else None
    gy = grads_out[0]
    dtype = compute_dtype(x)
    n_spatial = x.ndim - 2
    kernel = list(kernel_shape or w.shape[2:])
    begin, _ = _conv_transpose_geometry(list(x.shape[2:]), kernel, strides, dilations, pads, auto_pad,
                                        output_padding, output_shape)
    # the conv gy -> x: end pad chosen so it yields exactly x's size (a negative one only drops unread rows)
    strides_l = list(strides or [1] * n_spatial)
    dil_l = list(dilations or [1] * n_spatial)
    end = [max(0, s * (i - 1) + (k - 1) * d + 1 - o - bb)
           for s, i, k, d, o, bb in zip(strides_l, x.shape[2:], kernel, dil_l, gy.shape[2:], begin)]
    gyc = np.ascontiguousarray(gy, dtype=dtype)
    wc = w.astype(dtype, copy=False)
    gx = conv_forward(gyc, wc, group=group, strides=strides_l, dilations=dil_l, pads=list(begin) + end)
    gx = gx[(slice(None), slice(None)) + tuple(slice(0, s) for s in x.shape[2:])]
    geo = _Geometry(gy.shape, kernel, strides_l, dil_l, begin, end, list(x.shape[2:]))
    _, gw3 = dense_conv_backward(_as3d(gyc), _as3d(wc), _as3d(np.ascontiguousarray(x, dtype=dtype)), group, geo,
                                 need_x=False)
    gb = None
    if b is not None:
        gb = like(gyc.sum(axis=(0,) + tuple(range(2, gy.ndim))), b)
    return [like(np.ascontiguousarray(gx), x), like(gw3.reshape(w.shape), w), gb][:len(inputs)]


# ----------------------------------------------------------------------------- pooling
@register_backward("MaxPool")
def max_pool_backward(grads_out, inputs, outputs, *, auto_pad="NOTSET", ceil_mode=0, dilations=None,
                      kernel_shape, pads=None, storage_order=0, strides=None, noutputs=1):
    """dL/dx[argmax of each window] += gy (the first maximum on ties, as the forward's Indices): one Numba
    pass over the windows, blocks of (n, c) planes in parallel (planes never share an element).
    Undilated pools pad with -inf once (as the forward's fast path) so the window loops need no bounds checks."""
    x = inputs[0]
    dtype = compute_dtype(x)
    x3, params, _, out_size = _pool_setup(np.ascontiguousarray(x, dtype=dtype), kernel_shape, strides, dilations,
                                          pads, auto_pad, ceil_mode)
    out3 = tuple(_to3(out_size, 1))
    gy = np.ascontiguousarray(grads_out[0], dtype=dtype).reshape((x3.shape[0],) + out3)
    blocks = _sample_blocks(x3.shape[0])
    if all(d == 1 for d in params["dilation"]) and not np.isnan(x3).any():
        begin3 = params["pad_begin"]
        reach = [(o - 1) * s + k for o, s, k in zip(out3, params["stride"], params["kernel"])]
        widths = [(0, 0)] + [(int(b), max(0, int(r - b - n))) for b, r, n in zip(begin3, reach, x3.shape[1:])]
        xp = np.pad(x3, widths, constant_values=-np.inf) if any(w != (0, 0) for w in widths) else x3
        gxp = np.zeros(xp.shape, dtype=dtype)

        def padded_block(b):
            p0, p1 = blocks[b]
            loops.max_pool_backward_padded(xp[p0:p1], gy[p0:p1], params["kernel"], params["stride"], gxp[p0:p1])

        parallel.parallel_for(len(blocks), padded_block)
        gx = gxp[tuple(slice(w0, w0 + n) for (w0, _), n in zip(widths, xp.shape[:1] + x3.shape[1:]))]
        return [like(np.ascontiguousarray(gx).reshape(x.shape), x)]
    gx = np.zeros(x3.shape, dtype=dtype)

    def block(b):
        p0, p1 = blocks[b]
        loops.max_pool_backward(x3[p0:p1], gy[p0:p1], params["kernel"], params["stride"], params["dilation"],
                                params["pad_begin"], gx[p0:p1])

    parallel.parallel_for(len(blocks), block)
    return [like(gx.reshape(x.shape), x)]


@register_backward("AveragePool")
def average_pool_backward(grads_out, inputs, outputs, *, auto_pad="NOTSET", ceil_mode=0, count_include_pad=0,
                          dilations=None, kernel_shape, pads=None, strides=None):
    """y = window sum / count, so each tap of a window receives gy / count (counts as in the forward)."""
    x = inputs[0]
    dtype = compute_dtype(x)
    gy = grads_out[0].astype(dtype, copy=False)
    x3, params, end, out_size = _pool_setup(np.ascontiguousarray(x.astype(dtype, copy=False)), kernel_shape,
                                            strides, dilations, pads, auto_pad, ceil_mode)
    out3 = _to3(out_size, 1)
    counts, widths = average_pool_counts(x3.shape[1:], params, end, out3, count_include_pad, dtype)
    padded = tuple(n + w0 + w1 for n, (w0, w1) in zip(x3.shape[1:], widths))
    taps = [(slice(None),) + tap_slices((i, j, k), params["dilation"], out3, params["stride"])
            for i in range(int(params["kernel"][0])) for j in range(int(params["kernel"][1]))
            for k in range(int(params["kernel"][2]))]
    share = gy.reshape((x3.shape[0], *out3)) / counts  # the forward's divisors
    gxp = np.zeros((x3.shape[0],) + padded, dtype=dtype)
    for window in taps:  # each tap of each window receives gy / count
        gxp[window] += share
    gx = gxp[(slice(None),) + tuple(slice(w0, w0 + n) for n, (w0, _) in zip(x3.shape[1:], widths))]
    return [like(np.ascontiguousarray(gx).reshape(x.shape), x)]


@register_backward("GlobalAveragePool")
def global_average_pool_backward(grads_out, inputs, outputs):
    """dL/dx[n, c, p] = gy[n, c] / (number of spatial positions)"""
    x = inputs[0]
    positions = int(np.prod(x.shape[2:]))
    gy = grads_out[0]
    return [like(np.broadcast_to(gy / np.asarray(positions, dtype=gy.dtype), x.shape).copy(), x)]


@register_backward("GlobalMaxPool")
def global_max_pool_backward(grads_out, inputs, outputs):
    """dL/dx = gy at the first maximum of each (n, c) plane, 0 elsewhere."""
    x = inputs[0]
    flat = x.reshape(x.shape[0] * x.shape[1], -1)
    gx = np.zeros(flat.shape, dtype=grads_out[0].dtype)
    gx[np.arange(flat.shape[0]), np.argmax(flat, axis=1)] = grads_out[0].reshape(-1)
    return [like(gx.reshape(x.shape), x)]


def _channel_window_sum(v, before, after, size):
    """s[:, c] = sum of v[:, c - before .. c + after] over channels (zero outside), by a cumulative sum."""
    padded = np.pad(v, [(0, 0), (before, after)] + [(0, 0)] * (v.ndim - 2))
    total = np.cumsum(padded, axis=1)
    return np.concatenate([total[:, size - 1:size], total[:, size:] - total[:, :-size]], axis=1)


@register_backward("LRN")
def lrn_backward(grads_out, inputs, outputs, *, size, alpha=0.0001, beta=0.75, bias=1.0):
    """y = x * D^-beta, D = bias + alpha/size * S, S[c] = sum of x^2 over channels c - lo .. c + hi
    (lo = (size-1)//2, hi = ceil((size-1)/2)). Channel c' is in the window of c for c in c' - hi .. c' + lo, so
    dx = gy * D^-beta - 2 alpha beta / size * x * (sum over c' - hi .. c' + lo of gy * x * D^(-beta-1))."""
    x = inputs[0]
    xd = x.astype(np.float64)
    gy = grads_out[0].astype(np.float64)
    lo, hi = (size - 1) // 2, -(-(size - 1) // 2)
    d = bias + alpha / size * _channel_window_sum(xd * xd, lo, hi, size)
    q = gy * xd * d ** (-beta - 1)
    gx = gy * d ** -beta - (2 * alpha * beta / size) * xd * _channel_window_sum(q, hi, lo, size)
    return [like(gx, x)]
