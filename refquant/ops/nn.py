"""Convolution and pooling: Conv, ConvTranspose, MaxPool, AveragePool, GlobalAveragePool, GlobalMaxPool, LRN.

Conv is im2col + one BLAS GEMM per group (1x1 stride-1 convs skip im2col; depthwise convs run a
direct Numba loop). Every spatial computation is written for 3 spatial dims; 1-D and 2-D inputs get
singleton dims, so the same compiled loops serve all ranks.
"""

from __future__ import annotations

import math

import numpy as np

from .. import parallel
from ..kernels import conv as conv_kernels
from ..kernels import pool as pool_kernels
from .registry import register
from .shapes import TensorInfo

COLS_BUDGET = 1 << 23  # floats in one im2col buffer (32 MB): large images are done in row bands


# ----------------------------------------------------------------------------- geometry
def _to3(values, fill):
    """Pad a per-spatial-dim list to 3 entries by prepending ``fill`` (1-D/2-D -> 3-D)."""
    values = list(values)
    return [fill] * (3 - len(values)) + values


def _as3d(x):
    """[N, C, *spatial] -> [N, C, D, H, W] view."""
    return x.reshape(x.shape[:2] + (1,) * (5 - x.ndim) + x.shape[2:])


def conv_geometry(in_size, kernel, strides, dilations, pads, auto_pad, ceil_mode=False, pool=False):
    """(pad_begin, pad_end, out_size) per spatial dim, following ONNX's Conv and pooling formulas."""
    n = len(in_size)
    strides = list(strides or [1] * n)
    dilations = list(dilations or [1] * n)
    extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        out = [-(-i // s) for i, s in zip(in_size, strides)]
        total = [max(0, (o - 1) * s + e - i) for o, s, e, i in zip(out, strides, extent, in_size)]
        small = [t // 2 for t in total]
        big = [t - t // 2 for t in total]
        begin, end = (small, big) if auto_pad == "SAME_UPPER" else (big, small)
        return begin, end, out
    if auto_pad == "VALID":
        pads = [0] * (2 * n)
    pads = list(pads or [0] * (2 * n))
    begin, end = pads[:n], pads[n:]
    out = []
    for i, s, e, b, p_end in zip(in_size, strides, extent, begin, end):
        span = i + b + p_end - e
        o = (-(-span // s) if ceil_mode else span // s) + 1
        if ceil_mode and pool and (o - 1) * s >= i + b:  # a window may not start in the end padding
            o -= 1
        out.append(o)
    return begin, end, out


def _i64(values):
    return np.asarray(values, dtype=np.int64)


def _compute_dtype(x):
    return np.float64 if x.dtype == np.float64 else np.float32


# ----------------------------------------------------------------------------- Conv
def _conv_rule(x, w, b=None, *, auto_pad="NOTSET", dilations=None, group=1, kernel_shape=None, pads=None,
               strides=None):
    if x.shape is None or w.shape is None or any(not isinstance(d, int) for d in w.shape):
        return TensorInfo(x.dtype, None)
    kernel = kernel_shape or list(w.shape[2:])
    spatial = list(x.shape[2:])
    if all(isinstance(d, int) for d in spatial):
        _, _, out = conv_geometry(spatial, kernel, strides, dilations, pads, auto_pad)
    else:
        out = [None] * len(spatial)
    return TensorInfo(x.dtype, (x.shape[0], w.shape[0], *out))


@register("Conv", since=1, infer=_conv_rule)
def conv(x, w, b=None, *, auto_pad="NOTSET", dilations=None, group=1, kernel_shape=None, pads=None, strides=None):
    """y[n, m] = b[m] + sum_{c in group(m), k} w[m, c, k] * x[n, c, s*o + d*k - pad]"""
    return conv_epilogue(x, w, b, epilogue=(), auto_pad=auto_pad, dilations=dilations, group=group,
                         kernel_shape=kernel_shape, pads=pads, strides=strides)


def conv_epilogue(x, w, b=None, *, epilogue, auto_pad="NOTSET", dilations=None, group=1, kernel_shape=None,
                  pads=None, strides=None):
    """Conv followed by the ``epilogue`` steps (see :func:`_epilogue`), applied with the bias to each output
    block right after its GEMM, while the block is still in cache. The runtime fuses Conv with the
    BatchNormalization / per-channel Mul, Add / Relu / Clip ops that follow it this way when no hook needs
    the intermediate tensors; each step is the same float32 operation as the op it replaces, in the same
    order, so the values are identical to running the ops one after the other."""
    dtype = _compute_dtype(x)
    kernel = list(kernel_shape or w.shape[2:])
    begin, end, out_size = conv_geometry(list(x.shape[2:]), kernel, strides, dilations, pads, auto_pad)
    n_spatial = x.ndim - 2
    x3 = _as3d(x.astype(dtype, copy=False))
    w3 = _as3d(w.astype(dtype, copy=False))
    n, c_in = x3.shape[:2]
    m = w.shape[0]
    stride3 = _i64(_to3(strides or [1] * n_spatial, 1))
    dilation3 = _i64(_to3(dilations or [1] * n_spatial, 1))
    begin3 = _i64(_to3(begin, 0))
    out3 = _i64(_to3(out_size, 1))
    finish = _epilogue(None if b is None else b.astype(dtype, copy=False), epilogue, dtype)
    if group == c_in and w.shape[1] == 1 and x3.shape[2] == 1 and group > 1:
        y = _depthwise(x3, w3, stride3, dilation3, begin, end, out3, finish)
    elif all(k == 1 for k in kernel) and not any(begin) and not any(end):
        # a 1x1 conv is a GEMM per group over the (subsampled) pixels: no im2col needed
        if any(s != 1 for s in stride3):
            x3 = np.ascontiguousarray(x3[:, :, ::stride3[0], ::stride3[1], ::stride3[2]])
            x3 = x3[:, :, :out3[0], :out3[1], :out3[2]]
        cg, mg = c_in // group, m // group
        y = np.empty((n, group, mg, x3[0, 0].size), dtype=x3.dtype)
        xg = x3.reshape(n, group, cg, -1)
        wg = w3.reshape(group, mg, cg)

        def pointwise(i):
            image, g = divmod(i, group)
            np.matmul(wg[g], xg[image, g], out=y[image, g])
            finish(y[image, g], slice(g * mg, (g + 1) * mg))

        if n * group >= 2 * parallel.budget():
            parallel.parallel_for(n * group, pointwise)
        else:  # few GEMMs: split each one's columns instead
            for i in range(n * group):
                image, g = divmod(i, group)
                parallel.matmul(wg[g], xg[image, g], out=y[image, g],
                                epilogue=lambda block, rows, g=g: finish(block, _shift(rows, g * mg, mg)))
        y = y.reshape(n, m, -1)
    else:
        y = _im2col_conv(x3, w3, group, stride3, dilation3, begin3, _i64(_to3(end, 0)), out3, finish)
    y = y.reshape((n, m) + tuple(out_size))
    return y.astype(x.dtype, copy=False)


def channel_chain(x, *, epilogue):
    """The conv epilogue's per-channel steps (see :func:`_epilogue`) on any [N, C, *spatial] float tensor, in
    one pass over cache-sized (image, channel block) pieces instead of one pass per op."""
    x3 = np.ascontiguousarray(x).reshape(x.shape[0], x.shape[1], -1)
    return _channel_chain_into(np.empty_like(x3), x3, epilogue).reshape(x.shape)


def channel_chain_inplace(x, *, epilogue):
    """channel_chain written into x (the runtime calls it when x dies here and nothing else sees it)."""
    if x.dtype.kind != "f" or not x.flags.c_contiguous:
        return None
    x3 = x.reshape(x.shape[0], x.shape[1], -1)
    return _channel_chain_into(x3, x3, epilogue).reshape(x.shape)


def _channel_chain_into(out, x3, epilogue):
    n, c, positions = x3.shape
    finish = _epilogue(None, epilogue, x3.dtype)
    per_block = max(1, (1 << 16) // max(1, positions))  # channels per piece: ~64K elements stay in L2
    pieces = [(i, c0, min(c, c0 + per_block)) for i in range(n) for c0 in range(0, c, per_block)]

    def piece(k):
        i, c0, c1 = pieces[k]
        block = out[i, c0:c1]
        if out is not x3:
            np.copyto(block, x3[i, c0:c1])
        finish(block, slice(c0, c1))

    parallel.parallel_for(len(pieces), piece)
    return out


def _shift(rows: slice, offset: int, size: int) -> slice:
    start = 0 if rows.start is None else rows.start
    stop = size if rows.stop is None else rows.stop
    return slice(offset + start, offset + stop)


def _epilogue(bias, steps, dtype):
    """finish(block, channels): on a block [..., C_block, P] of the conv output, in place: += bias[channels],
    then each step: ("mul", v) / ("add", v) with a per-channel vector v (or a 1-vector), ("bn", a, b) as
    x * a + b, ("relu",), ("clip", lo, hi) with None for an absent bound."""
    steps = [(kind, *[None if v is None else np.asarray(v, dtype=dtype) for v in values])
             for kind, *values in steps]

    def per_channel(v, channels):
        return v.reshape(-1, 1) if v.size == 1 else v[channels].reshape(-1, 1)

    def finish(block, channels):
        if bias is not None:
            block += bias[channels].reshape(-1, 1)
        for kind, *values in steps:
            if kind == "relu":
                np.maximum(block, np.zeros((), dtype), out=block)
            elif kind == "clip":
                lo, hi = values
                if lo is not None and hi is not None:
                    np.clip(block, lo, hi, out=block)
                elif lo is not None:
                    np.maximum(block, lo, out=block)
                elif hi is not None:
                    np.minimum(block, hi, out=block)
            elif kind == "mul":
                block *= per_channel(values[0], channels)
            elif kind == "add":
                block += per_channel(values[0], channels)
            else:  # "bn"
                block *= per_channel(values[0], channels)
                block += per_channel(values[1], channels)

    return finish


def _windows(xp, kernel3, stride3, dilation3, out3):
    """A strided view [C, KD, KH, KW, OD, OH, OW] of a padded image [C, Dp, Hp, Wp]: im2col without a loop.

    window[c, i, j, k, a, b, e] = xp[c, a*s0 + i*d0, b*s1 + j*d1, e*s2 + k*d2]
    """
    sc, sd, sh, sw = xp.strides
    shape = (xp.shape[0], *kernel3, *out3)
    strides = (sc, sd * dilation3[0], sh * dilation3[1], sw * dilation3[2],
               sd * stride3[0], sh * stride3[1], sw * stride3[2])
    return np.lib.stride_tricks.as_strided(xp, shape, strides, writeable=False)


def _im2col_conv(x3, w3, group, stride3, dilation3, begin3, end3, out3, finish):
    """Grouped conv as GEMMs: y_g = W_g [M/g, C/g*K] @ cols_g [C/g*K, pixels]."""
    n, c_in = x3.shape[:2]
    m = w3.shape[0]
    cg, mg = c_in // group, m // group
    kernel3 = tuple(int(k) for k in w3.shape[2:])
    k_rows = cg * int(np.prod(kernel3))
    out3 = tuple(int(o) for o in out3)
    positions = int(np.prod(out3))
    xp = np.pad(x3, [(0, 0), (0, 0)] + [(int(b), int(e)) for b, e in zip(begin3, end3)])
    y = np.empty((n, m, positions), dtype=x3.dtype)
    weights = [w3[g * mg:(g + 1) * mg].reshape(mg, k_rows) for g in range(group)]
    if n > 1 and n * positions * k_rows <= COLS_BUDGET and positions < 4096:
        # small images: one GEMM over the whole batch keeps BLAS busy
        cols = np.empty((k_rows, n, positions), dtype=x3.dtype)
        for g in range(group):
            def fill(i, g=g):
                cols[:, i] = _windows(xp[i, g * cg:(g + 1) * cg], kernel3, stride3, dilation3, out3).reshape(
                    k_rows, positions)

            parallel.parallel_for(n, fill)
            y[:, g * mg:(g + 1) * mg] = parallel.matmul(weights[g], cols.reshape(k_rows, -1)).reshape(
                mg, n, positions).transpose(1, 0, 2)
            finish(y[:, g * mg:(g + 1) * mg], slice(g * mg, (g + 1) * mg))
        return y
    ow = out3[2]
    threads = parallel.budget()
    band = max(1, min(out3[1], COLS_BUDGET // max(1, k_rows * ow * threads)))  # output rows per GEMM
    if threads > 1 and n * group * out3[0] * -(-out3[1] // band) < 2 * threads:
        band = max(1, -(-out3[1] // (2 * threads)))  # one large image: enough bands for every thread
    items = [(i, g, a, r0) for i in range(n) for g in range(group) for a in range(out3[0])
             for r0 in range(0, out3[1], band)]

    def band_gemm(item_index):
        i, g, a, r0 = items[item_index]
        view = _windows(xp[i, g * cg:(g + 1) * cg], kernel3, stride3, dilation3, out3)
        r1 = min(out3[1], r0 + band)
        cols = np.ascontiguousarray(view[:, :, :, :, a, r0:r1]).reshape(k_rows, -1)
        start = (a * out3[1] + r0) * ow
        # out= writes the GEMM result in place: a temporary plus a copy costs ~10x the GEMM
        block = y[i, g * mg:(g + 1) * mg, start:start + cols.shape[1]]
        np.matmul(weights[g], cols, out=block)
        finish(block, slice(g * mg, (g + 1) * mg))

    parallel.parallel_for(len(items), band_gemm)
    return y


def _depthwise(x3, w3, stride3, dilation3, begin, end, out3, finish):
    """Depthwise (group == C_in) conv on 1-D/2-D inputs: a direct loop per channel, padded plane by plane
    inside the kernel; (image, channel block) items spread over the thread budget."""
    begin2 = _to3(begin, 0)[1:]
    x4 = np.ascontiguousarray(x3[:, :, 0])
    w4 = np.ascontiguousarray(w3[:, :, 0])
    n, c_out = x3.shape[0], w3.shape[0]
    y = np.zeros((n, c_out, int(out3[1]), int(out3[2])), dtype=x3.dtype)
    threads = parallel.budget()
    if w4.shape[0] == x4.shape[1]:  # multiplier 1: items are (image, channel block)
        c_blocks = parallel.split(c_out, max(1, -(-4 * threads // n)) if threads > 1 else 1)
    else:  # output channel c reads input channel c // multiplier: split images only
        c_blocks = [(0, c_out)]
    three = w4.shape[2:] == (3, 3) and w4.shape[0] == x4.shape[1] and not np.any(dilation3 != 1)
    top, left = int(begin2[0]), int(begin2[1])

    def channels(item):
        i, (c0, c1) = item // len(c_blocks), c_blocks[item % len(c_blocks)]
        x_part = x4[i:i + 1, c0:c1] if len(c_blocks) > 1 else x4[i:i + 1]
        if three:
            conv_kernels.depthwise3x3(x_part, w4[c0:c1], top, left, int(stride3[1]), int(stride3[2]),
                                      y[i:i + 1, c0:c1])
        else:
            conv_kernels.depthwise2d(x_part, w4[c0:c1], top, left, stride3[1:], dilation3[1:],
                                     y[i:i + 1, c0:c1])
        finish(y[i, c0:c1].reshape(c1 - c0, -1), slice(c0, c1))

    parallel.parallel_for(n * len(c_blocks), channels)
    return y


# ----------------------------------------------------------------------------- ConvTranspose
def _conv_transpose_geometry(in_size, kernel, strides, dilations, pads, auto_pad, output_padding, output_shape):
    n = len(in_size)
    strides = list(strides or [1] * n)
    dilations = list(dilations or [1] * n)
    output_padding = list(output_padding or [0] * n)
    full = [s * (i - 1) + op + (k - 1) * d + 1
            for s, i, op, k, d in zip(strides, in_size, output_padding, kernel, dilations)]
    if output_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        target = list(output_shape)[-n:] if output_shape is not None else [i * s for i, s in zip(in_size, strides)]
        total = [f - t for f, t in zip(full, target)]
        if auto_pad == "SAME_UPPER":
            begin, end = [t // 2 for t in total], [t - t // 2 for t in total]
        else:
            begin, end = [t - t // 2 for t in total], [t // 2 for t in total]
        return begin, target
    pads = list(pads or [0] * (2 * n)) if auto_pad != "VALID" else [0] * (2 * n)
    begin, end = pads[:n], pads[n:]
    return begin, [f - b - e for f, b, e in zip(full, begin, end)]


def _conv_transpose_rule(x, w, b=None, *, auto_pad="NOTSET", dilations=None, group=1, kernel_shape=None,
                         output_padding=None, output_shape=None, pads=None, strides=None):
    """Output channels = w.shape[1] * group; spatial sizes from the transposed-conv geometry when known."""
    if x.shape is None or w.shape is None or any(not isinstance(d, int) for d in w.shape):
        return TensorInfo(x.dtype, None)
    spatial = list(x.shape[2:])
    if all(isinstance(d, int) for d in spatial):
        _, out = _conv_transpose_geometry(spatial, list(kernel_shape or w.shape[2:]), strides, dilations, pads,
                                          auto_pad, output_padding, output_shape)
    else:
        out = [None] * len(spatial)
    return TensorInfo(x.dtype, (x.shape[0], w.shape[1] * group, *out))


@register("ConvTranspose", since=1, infer=_conv_transpose_rule)
def conv_transpose(x, w, b=None, *, auto_pad="NOTSET", dilations=None, group=1, kernel_shape=None,
                   output_padding=None, output_shape=None, pads=None, strides=None):
    """The adjoint of Conv: y[n, m, s*i + d*k - pad] += w[c, m, k] * x[n, c, i]  (GEMM + col2im)."""
    dtype = _compute_dtype(x)
    n_spatial = x.ndim - 2
    kernel = list(kernel_shape or w.shape[2:])
    begin, out_size = _conv_transpose_geometry(list(x.shape[2:]), kernel, strides, dilations, pads, auto_pad,
                                               output_padding, output_shape)
    x3 = _as3d(x.astype(dtype, copy=False))
    w3 = _as3d(w.astype(dtype, copy=False))
    n, c_in = x3.shape[:2]
    cg, mg = c_in // group, w.shape[1]
    kernel3 = _i64(w3.shape[2:])
    in3 = _i64(x3.shape[2:])
    y = np.zeros((n, mg * group) + tuple(_to3(out_size, 1)), dtype=dtype)
    stride3 = _i64(_to3(strides or [1] * n_spatial, 1))
    dilation3 = _i64(_to3(dilations or [1] * n_spatial, 1))
    begin3 = _i64(_to3(begin, 0))
    for g in range(group):
        wg = w3[g * cg:(g + 1) * cg].reshape(cg, -1).T  # [(m, kd, kh, kw), c]
        for i in range(n):
            cols = np.ascontiguousarray(np.matmul(wg, x3[i, g * cg:(g + 1) * cg].reshape(cg, -1)))
            conv_kernels.col2im(cols, kernel3, stride3, dilation3, begin3, in3, y[i, g * mg:(g + 1) * mg])
    y = y.reshape((n, mg * group) + tuple(out_size))
    if b is not None:
        y += b.astype(dtype).reshape((-1,) + (1,) * n_spatial)
    return y.astype(x.dtype, copy=False)


# ----------------------------------------------------------------------------- pooling
def _pool_rule(x, *, auto_pad="NOTSET", ceil_mode=0, dilations=None, kernel_shape=None, pads=None, strides=None,
               storage_order=0, count_include_pad=0):
    if x.shape is None:
        return None
    spatial = list(x.shape[2:])
    if all(isinstance(d, int) for d in spatial):
        _, _, out = conv_geometry(spatial, kernel_shape, strides, dilations, pads, auto_pad, bool(ceil_mode), True)
    else:
        out = [None] * len(spatial)
    shape = (x.shape[0], x.shape[1], *out)
    return TensorInfo(x.dtype, shape), TensorInfo(np.dtype(np.int64), shape)


def _pool_setup(x, kernel_shape, strides, dilations, pads, auto_pad, ceil_mode):
    n_spatial = x.ndim - 2
    begin, end, out_size = conv_geometry(list(x.shape[2:]), kernel_shape, strides, dilations, pads, auto_pad,
                                         bool(ceil_mode), pool=True)
    planes = x.shape[0] * x.shape[1]
    x3 = _as3d(x).reshape((planes,) + _as3d(x).shape[2:])
    params = dict(kernel=_i64(_to3(kernel_shape, 1)), stride=_i64(_to3(strides or [1] * n_spatial, 1)),
                  dilation=_i64(_to3(dilations or [1] * n_spatial, 1)), pad_begin=_i64(_to3(begin, 0)))
    return x3, params, end, out_size


@register("MaxPool", since=1, infer=_pool_rule)
def max_pool(x, *, auto_pad="NOTSET", ceil_mode=0, dilations=None, kernel_shape, pads=None, storage_order=0,
             strides=None, noutputs=1):
    """y = max over each window (padding excluded); Indices = flat position of the max in x (row-major,
    or column-major over the spatial dims with storage_order=1)."""
    source = x if x.dtype in (np.float32, np.float64) else x.astype(np.float64)
    x3, params, _, out_size = _pool_setup(np.ascontiguousarray(source), kernel_shape, strides, dilations, pads,
                                          auto_pad, ceil_mode)
    out3 = _to3(out_size, 1)
    y = np.empty((x3.shape[0], *out3), dtype=x3.dtype)
    want = noutputs > 1
    if not want and x3.shape[1] == 1 and params["kernel"][0] == 1:
        # 1-D/2-D windows over a -inf padded scratch plane up to the last window's reach (ceil_mode windows
        # may pass the explicit padding); a NaN anywhere sends the op to the exact NaN-propagating loop
        if not _pool2d(x3, params, out3, y, -np.inf, None):
            return y.reshape(x.shape[:2] + tuple(out_size)).astype(x.dtype, copy=False)
    indices = np.empty(y.shape if want else (1, 1, 1, 1), dtype=np.int64)
    pool_kernels.max_pool(x3, params["kernel"], params["stride"], params["dilation"], params["pad_begin"], y,
                          indices, want)
    shape = x.shape[:2] + tuple(out_size)
    y = y.reshape(shape).astype(x.dtype, copy=False)
    if not want:
        return y
    spatial = x3.shape[1:]
    if storage_order:  # column-major over (H, W): index = w * H + h
        h, w = spatial[1], spatial[2]
        indices = (indices % w) * h + (indices // w) % h + (indices // (h * w)) * (h * w)
    plane_offset = np.arange(x3.shape[0], dtype=np.int64).reshape(-1, 1, 1, 1) * int(np.prod(spatial))
    return y, (indices + plane_offset).reshape(shape)


@register("AveragePool", since=1, infer=lambda *a, **k: _pool_rule(*a, **k)[0])
def average_pool(x, *, auto_pad="NOTSET", ceil_mode=0, count_include_pad=0, dilations=None, kernel_shape,
                 pads=None, strides=None):
    """y = mean over each window; the count includes explicit padding only with count_include_pad."""
    dtype = _compute_dtype(x)
    x3, params, end, out_size = _pool_setup(np.ascontiguousarray(x.astype(dtype, copy=False)), kernel_shape,
                                            strides, dilations, pads, auto_pad, ceil_mode)
    out3 = _to3(out_size, 1)
    counts, widths = average_pool_counts(x3.shape[1:], params, end, out3, count_include_pad, dtype)
    y = np.empty((x3.shape[0], *out3), dtype=dtype)
    if x3.shape[1] == 1 and params["kernel"][0] == 1:
        _pool2d(x3, params, out3, y, 0.0, counts[0])
    else:  # 3-D pools: the zero-padded tensor, then the window sums
        xp = np.pad(x3, [(0, 0)] + widths)
        _over_planes(lambda a, b: pool_kernels.sum_pool_padded(xp[a:b], params["kernel"], params["stride"],
                                                               params["dilation"], y[a:b]), y.shape[0])
        y /= counts
    return y.reshape(x.shape[:2] + tuple(out_size)).astype(x.dtype, copy=False)


def average_pool_counts(spatial, params, end, out3, count_include_pad, dtype):
    """(counts [OD, OH, OW], widths): how many taps each window divides by (at least 1): those inside x, plus
    the explicit padding with count_include_pad, never the overhang that ceil_mode adds; ``widths`` are the
    (before, after) zero pads that make every window fit (up to the last window's reach)."""
    begin3, end3 = params["pad_begin"], _i64(_to3(end, 0))
    extent = [(k - 1) * d + 1 for k, d in zip(params["kernel"], params["dilation"])]
    reach = [(o - 1) * s + e for o, s, e in zip(out3, params["stride"], extent)]
    widths = [(int(b), max(0, int(r - b - n))) for b, r, n in zip(begin3, reach, spatial)]
    counted = np.zeros((1,) + tuple(int(n + w0 + w1) for n, (w0, w1) in zip(spatial, widths)), dtype=dtype)
    if count_include_pad:
        inner = tuple(slice(0, min(n + b + e, n + w0 + w1)) for n, b, e, (w0, w1) in
                      zip(spatial, begin3, end3, widths))
    else:
        inner = tuple(slice(w0, w0 + n) for n, (w0, _) in zip(spatial, widths))
    counted[(slice(None),) + inner] = 1
    counts = np.empty((1, *out3), dtype=dtype)
    pool_kernels.sum_pool_padded(counted, params["kernel"], params["stride"], params["dilation"], counts)
    return np.maximum(counts[0], 1), widths


def _pool2d(x3, params, out3, y, pad_value, counts) -> bool:
    """Max (counts None) or average pooling of [planes, 1, H, W] into y [planes, 1, OH, OW], blocks of planes
    over the thread budget; True if a NaN stopped a max pool (y is then incomplete)."""
    kernel, stride, dilation, begin = params["kernel"], params["stride"], params["dilation"], params["pad_begin"]
    reach = [(o - 1) * s + (k - 1) * d + 1 for o, s, k, d in zip(out3[1:], stride[1:], kernel[1:], dilation[1:])]
    stopped = []  # list.append is atomic; `flag |= kernel(...)` across threads would lose updates
    empty = np.ones((1, 1), dtype=x3.dtype)

    def block(a, b):
        plane = np.full(reach, pad_value, dtype=x3.dtype)
        if pool_kernels.pool2d_planes(x3[a:b, 0], int(kernel[1]), int(kernel[2]), int(stride[1]), int(stride[2]),
                                      int(dilation[1]), int(dilation[2]), int(begin[1]), int(begin[2]), plane,
                                      empty if counts is None else counts, counts is None, y[a:b, 0]):
            stopped.append((a, b))

    _over_planes(block, y.shape[0])
    return bool(stopped)


def _over_planes(body, planes: int) -> None:
    """body(start, stop) over blocks of the [N*C] planes, spread over the thread budget."""
    threads = parallel.budget()
    blocks = parallel.split(planes, 4 * threads if threads > 1 else 1)
    parallel.parallel_for(len(blocks), lambda i: body(*blocks[i]))


def _global_rule(x):
    return TensorInfo(x.dtype, None if x.shape is None else tuple(x.shape[:2]) + (1,) * (len(x.shape) - 2))


@register("GlobalAveragePool", since=1, infer=_global_rule)
def global_average_pool(x):
    """y[n, c] = mean over all spatial positions of x[n, c]"""
    return np.mean(x, axis=tuple(range(2, x.ndim)), keepdims=True, dtype=_compute_dtype(x)).astype(x.dtype)


@register("GlobalMaxPool", since=1, infer=_global_rule)
def global_max_pool(x):
    return np.max(x, axis=tuple(range(2, x.ndim)), keepdims=True)


@register("LRN", since=1, infer=lambda x, **a: TensorInfo(x.dtype, x.shape))
def lrn(x, *, size, alpha=0.0001, beta=0.75, bias=1.0):
    """y = x / (bias + alpha/size * sum of x^2 over channels c - (size-1)//2 .. c + ceil((size-1)/2))^beta"""
    square = np.square(x.astype(np.float64))
    lo, hi = (size - 1) // 2, math.ceil((size - 1) / 2)
    padded = np.pad(square, [(0, 0), (lo, hi)] + [(0, 0)] * (x.ndim - 2))
    window = np.cumsum(padded, axis=1)
    window = np.concatenate([window[:, size - 1:size], window[:, size:] - window[:, :-size]], axis=1)
    return (x / (bias + alpha / size * window) ** beta).astype(x.dtype)
