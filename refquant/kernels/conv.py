"""Numba loops behind ConvTranspose (col2im) and depthwise Conv. Dense convs need none: their im2col
is a strided NumPy view (refquant.ops.nn._windows) and their multiply-accumulate runs in BLAS.

Every spatial kernel works on 3 spatial dims; 1-D and 2-D convolutions are the same loops with
singleton dims, so there is one compiled function per job instead of three.
Padding is handled by bounds checks (col2im) or by one padded copy (depthwise).
"""

from __future__ import annotations

import numpy as np
from numba import njit


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


@njit(cache=True)
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
