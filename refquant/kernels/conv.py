"""Numba loops behind ConvTranspose (col2im) and depthwise Conv. Dense convs need none: their im2col
is a strided NumPy view (refquant.ops.nn._windows) and their multiply-accumulate runs in BLAS.

Every spatial kernel works on 3 spatial dims; 1-D and 2-D convolutions are the same loops with
singleton dims, so there is one compiled function per job instead of three.
Padding is handled by bounds checks (col2im) or by one padded copy (depthwise).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def col2im(cols, kernel, stride, dilation, pad_begin, in_size, out):
    """The adjoint of im2col: out[c, iz*s + kd*d - p, ...] += cols[(c, kd, kh, kw), (iz, iy, ix)].

    cols: [C*KD*KH*KW, D*H*W] for an input of size in_size; out: [C, OD, OH, OW] (already cropped size).
    """
    c_out, d_out, h_out, w_out = out.shape
    kd, kh, kw = kernel
    di, hi, wi = in_size
    for c in range(c_out):
        for i in range(kd):
            for j in range(kh):
                for k in range(kw):
                    row = ((c * kd + i) * kh + j) * kw + k
                    for a in range(di):
                        z = a * stride[0] + i * dilation[0] - pad_begin[0]
                        if z < 0 or z >= d_out:
                            continue
                        for b in range(hi):
                            y = b * stride[1] + j * dilation[1] - pad_begin[1]
                            if y < 0 or y >= h_out:
                                continue
                            base = (a * hi + b) * wi
                            for e in range(wi):
                                xx = e * stride[2] + k * dilation[2] - pad_begin[2]
                                if 0 <= xx < w_out:
                                    out[c, z, y, xx] += cols[row, base + e]


@njit(cache=True, nogil=True)
def _pad_plane(src, pad_top, pad_left, plane):
    """plane[r, q] = src[r - pad_top, q - pad_left] inside src, 0 outside (plane already sized)."""
    h, w = src.shape
    for r in range(plane.shape[0]):
        y = r - pad_top
        for q in range(plane.shape[1]):
            x = q - pad_left
            plane[r, q] = src[y, x] if 0 <= y < h and 0 <= x < w else 0.0


@njit(cache=True, nogil=True)
def depthwise2d(x, w, pad_top, pad_left, stride, dilation, out):
    """out[n, c, oy, ox] = sum_{i,j} xpad[n, c // m, oy*s + i*d, ox*s + j*d] * w[c, 0, i, j]  (m = multiplier).

    x is the unpadded input [N, C_in, H, W]; each channel is zero-padded into a small scratch plane that
    stays in cache (no padded copy of the whole tensor). w is [C_in*m, 1, KH, KW]; out is zeroed.
    The unit-stride case gets its own inner loop so LLVM vectorizes it.
    """
    n_batch, c_out, oh, ow = out.shape
    mult = c_out // x.shape[1]
    kh, kw = w.shape[2], w.shape[3]
    sy, sx = stride[0], stride[1]
    plane = np.empty(((oh - 1) * sy + (kh - 1) * dilation[0] + 1, (ow - 1) * sx + (kw - 1) * dilation[1] + 1),
                     dtype=x.dtype)
    for n in range(n_batch):
        for c in range(c_out):
            if c % mult == 0:
                _pad_plane(x[n, c // mult], pad_top, pad_left, plane)
            for oy in range(oh):
                dst_row = out[n, c, oy]  # one output row stays in L1 while every tap adds into it
                for i in range(kh):
                    src_row = plane[oy * sy + i * dilation[0]]
                    for j in range(kw):
                        weight = w[c, 0, i, j]
                        col0 = j * dilation[1]
                        if sx == 1:
                            for ox in range(ow):
                                dst_row[ox] += weight * src_row[col0 + ox]
                        else:
                            for ox in range(ow):
                                dst_row[ox] += weight * src_row[col0 + ox * sx]


@njit(cache=True, nogil=True)
def depthwise3x3(x, w, pad_top, pad_left, sy, sx, out):
    """depthwise2d for the common 3x3, undilated, multiplier-1 case: the nine taps are named registers and
    each output element is written once, which lets LLVM vectorize the row loop (about 7x the generic loop).

    Each channel is zero-padded into a scratch plane. Stride 2 reads it with literal stride-2 offsets,
    which LLVM vectorizes as interleaved loads (splitting the plane into even and odd columns first cost
    a pass over the input and ran 1.4x slower). The sum's order is the same at every stride.
    """
    n_batch, c_out, oh, ow = out.shape
    hp = (oh - 1) * sy + 3
    wp = (ow - 1) * sx + 3
    plane = np.empty((hp, wp), dtype=x.dtype)
    for n in range(n_batch):
        for c in range(c_out):
            _pad_plane(x[n, c], pad_top, pad_left, plane)
            w00, w01, w02 = w[c, 0, 0, 0], w[c, 0, 0, 1], w[c, 0, 0, 2]
            w10, w11, w12 = w[c, 0, 1, 0], w[c, 0, 1, 1], w[c, 0, 1, 2]
            w20, w21, w22 = w[c, 0, 2, 0], w[c, 0, 2, 1], w[c, 0, 2, 2]
            for oy in range(oh):
                dst = out[n, c, oy]
                if sx == 1:
                    r0, r1, r2 = plane[oy * sy], plane[oy * sy + 1], plane[oy * sy + 2]
                    for ox in range(ow):
                        dst[ox] = (w00 * r0[ox] + w01 * r0[ox + 1] + w02 * r0[ox + 2]
                                   + w10 * r1[ox] + w11 * r1[ox + 1] + w12 * r1[ox + 2]
                                   + w20 * r2[ox] + w21 * r2[ox + 1] + w22 * r2[ox + 2])
                elif sx == 2:
                    r0, r1, r2 = plane[oy * sy], plane[oy * sy + 1], plane[oy * sy + 2]
                    for ox in range(ow):
                        dst[ox] = (w00 * r0[2 * ox] + w01 * r0[2 * ox + 1] + w02 * r0[2 * ox + 2]
                                   + w10 * r1[2 * ox] + w11 * r1[2 * ox + 1] + w12 * r1[2 * ox + 2]
                                   + w20 * r2[2 * ox] + w21 * r2[2 * ox + 1] + w22 * r2[2 * ox + 2])
                else:
                    r0, r1, r2 = plane[oy * sy], plane[oy * sy + 1], plane[oy * sy + 2]
                    for ox in range(ow):
                        b = ox * sx
                        dst[ox] = (w00 * r0[b] + w01 * r0[b + 1] + w02 * r0[b + 2]
                                   + w10 * r1[b] + w11 * r1[b + 1] + w12 * r1[b + 2]
                                   + w20 * r2[b] + w21 * r2[b + 1] + w22 * r2[b + 2])
