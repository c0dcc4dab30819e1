"""Numba loops behind Conv and ConvTranspose. The multiply-accumulate itself runs in BLAS.

Every spatial kernel works on 3 spatial dims; 1-D and 2-D convolutions are the same loops with
singleton dims, so there is one compiled function per job instead of three.
Padding is handled by bounds checks while copying (no padded copy of the input is made).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True)
def im2col(x, kernel, stride, dilation, pad_begin, out_size, row_start, row_stop, cols, col_offset):
    """cols[(c, kd, kh, kw), col_offset + (r - row_start)*OW + ow] = x[c, od*s + kd*d - p, oh*s + kh*d - p, ...]

    for output rows r = od*OH + oh in [row_start, row_stop); 0 where the tap falls in the padding.
    x: [C, D, H, W]. Working on a range of rows keeps the column buffer small for large images.
    """
    c_in, d_in, h_in, w_in = x.shape
    kd, kh, kw = kernel[0], kernel[1], kernel[2]
    oh, ow = out_size[1], out_size[2]
    for c in range(c_in):
        for i in range(kd):
            for j in range(kh):
                for k in range(kw):
                    row = ((c * kd + i) * kh + j) * kw + k
                    for r in range(row_start, row_stop):
                        a = r // oh
                        b = r - a * oh
                        z = a * stride[0] + i * dilation[0] - pad_begin[0]
                        y = b * stride[1] + j * dilation[1] - pad_begin[1]
                        base = col_offset + (r - row_start) * ow
                        if z < 0 or z >= d_in or y < 0 or y >= h_in:
                            for e in range(ow):
                                cols[row, base + e] = 0.0
                            continue
                        for e in range(ow):
                            xx = e * stride[2] + k * dilation[2] - pad_begin[2]
                            if 0 <= xx < w_in:
                                cols[row, base + e] = x[c, z, y, xx]
                            else:
                                cols[row, base + e] = 0.0


@njit(cache=True)
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


@njit(cache=True, parallel=True)
def depthwise2d(xp, w, stride, dilation, out):
    """out[n, c, oy, ox] = sum_{i,j} xp[n, c // m, oy*s + i*d, ox*s + j*d] * w[c, 0, i, j]  (m = multiplier).

    xp is the already padded input [N, C_in, Hp, Wp]; w is [C_in*m, 1, KH, KW]; out is zeroed.
    """
    n_batch, c_out, oh, ow = out.shape
    mult = c_out // xp.shape[1]
    kh, kw = w.shape[2], w.shape[3]
    for nc in prange(n_batch * c_out):
        n = nc // c_out
        c = nc % c_out
        src = c // mult
        for i in range(kh):
            for j in range(kw):
                weight = w[c, 0, i, j]
                for oy in range(oh):
                    row = oy * stride[0] + i * dilation[0]
                    col0 = j * dilation[1]
                    for ox in range(ow):
                        out[n, c, oy, ox] += weight * xp[n, src, row, col0 + ox * stride[1]]
