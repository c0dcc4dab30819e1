"""Fast QLinearConv for the integer program: int32 accumulation and onnxruntime's requantization fused in one
Numba loop, bit-identical to :func:`refquant.ops.qoperators.qlinear_conv` (the reference kernel, which
``tests/test_intsim.py`` compares it with, and which the exported model's onnxruntime run matches).

Why a second kernel: the reference accumulates in float64 BLAS and requantizes in several NumPy passes over
the accumulator; on MobileNetV2's memory-bound 1x1 and depthwise convs most of the time goes to those passes.
Here each output row is accumulated in an int32 scratch row ((x - x_zp) as int16 times (w - w_zp) as int16,
exact) and requantized while it is in cache:

    f = f32(acc + bias) * f32(f32(x_scale * w_scale[m]) / y_scale)      (float32, as MLAS)
    q = rint_half_even(min(max(f, qmin - zp), qmax - zp)) + zp

Registered as ``com.refquant.fast::QLinearConv`` (same inputs and attributes as the ONNX op); shapes or types
it does not cover (3-D convs, 16-bit tensors, no output zero point) go to the reference kernel.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..ops import qoperators as _reference
from ..ops import register
from ..ops.nn import conv_geometry
from .requant import INT32_MAX, ort_multiplier

FAST_DOMAIN = "com.refquant.fast"
F32 = np.float32
_BLOCK = 512  # output positions per block: the int32 row and the int16 columns stay in L1/L2


@njit(cache=True)
def _requant_row(acc, n, mult, lo, hi, zp, out):
    for p in range(n):
        f = np.float32(acc[p]) * mult
        f = min(max(f, lo), hi)
        out[p] = np.int32(np.rint(f)) + zp


@njit(cache=True)
def _gemm_requant(cols, w, bias, mult, lo, hi, zp, out):
    """out[m, p] = requant(bias[m] + sum_k w[m, k] * cols[k, p]); cols, w int16; out [M, P] int8/uint8."""
    m_count, k_count = w.shape
    p_count = cols.shape[1]
    acc = np.empty(_BLOCK, dtype=np.int32)
    for p0 in range(0, p_count, _BLOCK):
        n = min(_BLOCK, p_count - p0)
        for m in range(m_count):
            b = bias[m]
            for p in range(n):
                acc[p] = b
            for k in range(k_count):
                wv = np.int32(w[m, k])
                if wv == 0:
                    continue
                row = cols[k, p0:p0 + n]
                for p in range(n):
                    acc[p] += wv * np.int32(row[p])
            _requant_row(acc, n, mult[m], lo, hi, zp, out[m, p0:p0 + n])


@njit(cache=True)
def _im2col(x, xz, c0, cg, kh, kw, sy, sx, dy, dx, py, px, oh, ow, cols):
    """cols[(c, i, j), (oy, ox)] = x[c0 + c, oy*sy + i*dy - py, ox*sx + j*dx - px] - xz (0 in the padding)."""
    h, w = x.shape[1], x.shape[2]
    for c in range(cg):
        for i in range(kh):
            for j in range(kw):
                row = (c * kh + i) * kw + j
                for oy in range(oh):
                    iy = oy * sy + i * dy - py
                    base = oy * ow
                    if iy < 0 or iy >= h:
                        for ox in range(ow):
                            cols[row, base + ox] = 0
                        continue
                    src = x[c0 + c, iy]
                    for ox in range(ow):
                        ix = ox * sx + j * dx - px
                        if 0 <= ix < w:
                            cols[row, base + ox] = np.int16(src[ix]) - xz
                        else:
                            cols[row, base + ox] = 0


@njit(cache=True)
def _pointwise(x, xz, w, bias, mult, lo, hi, zp, out):
    """1x1 stride-1 unpadded conv of one image: x [C, P] -> out [M, P], groups of C/g inputs."""
    c_in, p_count = x.shape
    m_count = w.shape[0]
    group = c_in // w.shape[1]
    cg, mg = c_in // group, m_count // group
    cols = np.empty((cg, p_count), dtype=np.int16)
    for g in range(group):
        for c in range(cg):
            src = x[g * cg + c]
            for p in range(p_count):
                cols[c, p] = np.int16(src[p]) - xz
        _gemm_requant(cols, w[g * mg:(g + 1) * mg], bias[g * mg:(g + 1) * mg], mult[g * mg:(g + 1) * mg],
                      lo, hi, zp, out[g * mg:(g + 1) * mg])


@njit(cache=True)
def _grouped(x, xz, w, bias, mult, lo, hi, zp, group, kh, kw, sy, sx, dy, dx, py, px, oh, ow, out):
    """General 2-D conv of one image through im2col: x [C, H, W], w [M, C/g * KH * KW], out [M, OH*OW]."""
    c_in = x.shape[0]
    m_count = w.shape[0]
    cg, mg = c_in // group, m_count // group
    cols = np.empty((cg * kh * kw, oh * ow), dtype=np.int16)
    for g in range(group):
        _im2col(x, xz, g * cg, cg, kh, kw, sy, sx, dy, dx, py, px, oh, ow, cols)
        _gemm_requant(cols, w[g * mg:(g + 1) * mg], bias[g * mg:(g + 1) * mg], mult[g * mg:(g + 1) * mg],
                      lo, hi, zp, out[g * mg:(g + 1) * mg])


@njit(cache=True)
def _depthwise(x, xz, w, bias, mult, lo, hi, zp, kh, kw, sy, sx, dy, dx, py, px, oh, ow, out):
    """Depthwise conv (one input channel per output channel) of one image: x [C, H, W], w [C, KH, KW] int32,
    out [C, OH, OW]. The input plane is copied once into a zero-padded int32 plane of (x - xz)."""
    c_count, h, wd = x.shape
    hp = max(h + py, (oh - 1) * sy + (kh - 1) * dy + 1)
    wp = max(wd + px, (ow - 1) * sx + (kw - 1) * dx + 1)
    plane = np.zeros((hp, wp), dtype=np.int32)
    flat = plane.reshape(-1)
    acc = np.empty(ow, dtype=np.int32)
    span = (oh - 1) * wp + ow  # unit stride: output (oy, ox) sits at oy * wp + ox of a plane-wide row
    acc_flat = np.empty(span, dtype=np.int32)
    for c in range(c_count):
        for iy in range(h):
            for ix in range(wd):
                plane[iy + py, ix + px] = np.int32(x[c, iy, ix]) - xz
        b = bias[c]
        m = mult[c]
        if sy == 1 and sx == 1:  # one long vectorizable loop per tap instead of one short loop per row
            for q in range(span):
                acc_flat[q] = b
            for i in range(kh):
                for j in range(kw):
                    wv = w[c, i, j]
                    if wv == 0:
                        continue
                    off = i * dy * wp + j * dx
                    for q in range(span):
                        acc_flat[q] += wv * flat[off + q]
            for oy in range(oh):
                _requant_row(acc_flat[oy * wp:oy * wp + ow], ow, m, lo, hi, zp, out[c, oy])
            continue
        for oy in range(oh):
            for ox in range(ow):
                acc[ox] = b
            for i in range(kh):
                src = plane[oy * sy + i * dy]
                for j in range(kw):
                    wv = w[c, i, j]
                    if wv == 0:
                        continue
                    off = j * dx
                    if sx == 1:
                        for ox in range(ow):
                            acc[ox] += wv * src[off + ox]
                    else:
                        for ox in range(ow):
                            acc[ox] += wv * src[off + ox * sx]
            _requant_row(acc, ow, m, lo, hi, zp, out[c, oy])


def _covered(x, w, y_zero_point) -> bool:
    return (x.ndim in (3, 4) and y_zero_point is not None and x.dtype in (np.uint8, np.int8)
            and w.dtype in (np.uint8, np.int8) and np.asarray(y_zero_point).dtype in (np.uint8, np.int8))


@register("QLinearConv", since=1, domain=FAST_DOMAIN)
def qlinear_conv(x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point=None, B=None, *,
                 auto_pad="NOTSET", dilations=None, group=1, kernel_shape=None, pads=None, strides=None):
    """QLinearConv exactly as :func:`refquant.ops.qoperators.qlinear_conv`, with fused Numba loops."""
    if not _covered(x, w, y_zero_point):
        return _reference.qlinear_conv(x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point,
                                       B, auto_pad=auto_pad, dilations=dilations, group=group,
                                       kernel_shape=kernel_shape, pads=pads, strides=strides)
    squeeze = x.ndim == 3
    if squeeze:  # 1-D conv as 2-D with H = 1
        x, w = x[:, :, None, :], w[:, :, None, :]
        kernel_shape = [1] + list(kernel_shape) if kernel_shape else None
        pads = [0, pads[0], 0, pads[1]] if pads else None
        strides = [1] + list(strides) if strides else None
        dilations = [1] + list(dilations) if dilations else None
    m = w.shape[0]
    kernel = list(kernel_shape or w.shape[2:])
    begin, end, out_size = conv_geometry(list(x.shape[2:]), kernel, strides, dilations, pads, auto_pad)
    sy, sx = (strides or [1, 1])
    dy, dx = (dilations or [1, 1])
    oh, ow = int(out_size[0]), int(out_size[1])
    xz = int(np.asarray(x_zero_point).reshape(())) if x_zero_point is not None else 0
    wz = np.zeros(1, np.int64) if w_zero_point is None else np.asarray(w_zero_point).astype(np.int64).reshape(-1)
    w_scale = np.asarray(w_scale, dtype=F32).reshape(-1)
    if wz.size not in (1, m) or w_scale.size not in (1, m):
        raise ValueError(f"w_scale / w_zero_point must be scalars or have one entry per output channel ({m})")
    wd = w.astype(np.int32) - wz.reshape((-1, 1, 1, 1))
    out_dtype = np.asarray(y_zero_point).dtype
    info = np.iinfo(out_dtype)
    zp = int(np.asarray(y_zero_point).reshape(()))
    k_rows = int(np.prod(w.shape[1:]))
    x_abs = max(int(np.iinfo(x.dtype).max) - xz, xz - int(np.iinfo(x.dtype).min))
    bias = np.zeros(m, np.int64) if B is None else np.asarray(B).astype(np.int64).reshape(-1)
    bound = x_abs * int(np.abs(wd.reshape(m, -1)).sum(axis=1).max(initial=0)) + int(np.abs(bias).max(initial=0))
    if bound > INT32_MAX:  # the int32 row could wrap: the reference checks the exact range
        return _reference.qlinear_conv(x[:, :, 0] if squeeze else x, x_scale, x_zero_point,
                                       w[:, :, 0] if squeeze else w, w_scale, w_zero_point, y_scale,
                                       y_zero_point, B, auto_pad=auto_pad, dilations=dilations, group=group,
                                       kernel_shape=kernel_shape, pads=pads, strides=strides)
    mult = ort_multiplier(np.asarray(x_scale).reshape(()), w_scale, np.asarray(y_scale).reshape(()))
    mult = np.ascontiguousarray(np.broadcast_to(mult.reshape(-1), (m,)), dtype=F32)
    bias32 = bias.astype(np.int32)
    lo, hi = F32(info.min - zp), F32(info.max - zp)
    n = x.shape[0]
    y = np.empty((n, m, oh, ow), dtype=out_dtype)
    x = np.ascontiguousarray(x)
    py, px = int(begin[0]), int(begin[1])
    c_in = x.shape[1]
    pointwise = kernel == [1, 1] and not any(begin) and not any(end) and (sy, sx) == (1, 1)
    depthwise = group == c_in and group == m and w.shape[1] == 1 and group > 1
    if depthwise:
        w3 = np.ascontiguousarray(wd[:, 0])
        for i in range(n):
            _depthwise(x[i], xz, w3, bias32, mult, lo, hi, zp, int(kernel[0]), int(kernel[1]), int(sy), int(sx),
                       int(dy), int(dx), py, px, oh, ow, y[i])
    elif pointwise:
        w2 = np.ascontiguousarray(wd.reshape(m, -1), dtype=np.int16)
        for i in range(n):
            _pointwise(x[i].reshape(c_in, -1), xz, w2, bias32, mult, lo, hi, zp, y[i].reshape(m, -1))
    else:
        w2 = np.ascontiguousarray(wd.reshape(m, k_rows), dtype=np.int16)
        for i in range(n):
            _grouped(x[i], xz, w2, bias32, mult, lo, hi, zp, int(group), int(kernel[0]), int(kernel[1]), int(sy),
                     int(sx), int(dy), int(dx), py, px, oh, ow, y[i].reshape(m, -1))
    return y[:, :, 0] if squeeze else y
