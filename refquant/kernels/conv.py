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
def depthwise2d(xp, w, stride, dilation, out):
    """out[n, c, oy, ox] = sum_{i,j} xp[n, c // m, oy*s + i*d, ox*s + j*d] * w[c, 0, i, j]  (m = multiplier).

    xp is the already padded input [N, C_in, Hp, Wp]; w is [C_in*m, 1, KH, KW]; out is zeroed.
    Single-threaded on purpose: a Numba thread pool next to BLAS's spinning threads oversubscribes
    the cores (measured 7x slower on 2 cores). The unit-stride case gets its own inner loop so
    LLVM vectorizes it.
    """
    n_batch, c_out, oh, ow = out.shape
    mult = c_out // xp.shape[1]
    kh, kw = w.shape[2], w.shape[3]
    sy, sx = stride[0], stride[1]
    for n in range(n_batch):
        for c in range(c_out):
            src = xp[n, c // mult]
            for oy in range(oh):
                dst_row = out[n, c, oy]  # one output row stays in L1 while every tap adds into it
                for i in range(kh):
                    src_row = src[oy * sy + i * dilation[0]]
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
def depthwise3x3(xp, w, sy, sx, out):
    """depthwise2d for the common 3x3, undilated, multiplier-1 case: the nine taps are named
    registers and each output element is written once, which lets LLVM vectorize the row loop
    (about 7x the generic loop at stride 1)."""
    n_batch, c_out, oh, ow = out.shape
    for n in range(n_batch):
        for c in range(c_out):
            src = xp[n, c]
            w00, w01, w02 = w[c, 0, 0, 0], w[c, 0, 0, 1], w[c, 0, 0, 2]
            w10, w11, w12 = w[c, 0, 1, 0], w[c, 0, 1, 1], w[c, 0, 1, 2]
            w20, w21, w22 = w[c, 0, 2, 0], w[c, 0, 2, 1], w[c, 0, 2, 2]
            for oy in range(oh):
                r0, r1, r2 = src[oy * sy], src[oy * sy + 1], src[oy * sy + 2]
                dst = out[n, c, oy]
                if sx == 1:
                    for ox in range(ow):
                        dst[ox] = (w00 * r0[ox] + w01 * r0[ox + 1] + w02 * r0[ox + 2]
                                   + w10 * r1[ox] + w11 * r1[ox + 1] + w12 * r1[ox + 2]
                                   + w20 * r2[ox] + w21 * r2[ox + 1] + w22 * r2[ox + 2])
                else:
                    for ox in range(ow):
                        b = ox * sx
                        dst[ox] = (w00 * r0[b] + w01 * r0[b + 1] + w02 * r0[b + 2]
                                   + w10 * r1[b] + w11 * r1[b + 1] + w12 * r1[b + 2]
                                   + w20 * r2[b] + w21 * r2[b + 1] + w22 * r2[b + 2])
