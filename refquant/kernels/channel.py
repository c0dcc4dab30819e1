"""Numba loop for a chain of per-channel float ops (the conv epilogue's steps, see refquant.ops.nn._epilogue)
on an [N, C, P] tensor: one call per block of images instead of one NumPy call per op and block.

Each op is the same float operation as the NumPy ufunc it replaces, with the same rounding (a multiply
then an add, never a fused multiply-add: Numba does not contract without fastmath), the same NaN
propagation and the same signed zeros, so the results are bit-identical to the ops one after the other.
"""

from __future__ import annotations

import numpy as np
from numba import njit

ADD, MUL, AFFINE, CLIP = 0, 1, 2, 3


def encode_steps(steps, channels: int, dtype):
    """The epilogue ``steps`` as arrays for :func:`channel_steps`: (kinds, first, second, lo, hi).

    ("add", v) -> ADD with first = v; ("mul", v) -> MUL with first = v; ("bn", a, b) -> AFFINE with
    first = a, second = b (x * a, then + b); ("relu",) -> CLIP with lo = 0, hi = +inf; ("clip", lo, hi) ->
    CLIP with an absent bound as -inf / +inf. Per-channel vectors of size 1 are broadcast to ``channels``.
    """
    count = len(steps)
    kinds = np.zeros(count, dtype=np.int64)
    first = np.zeros((count, channels), dtype=dtype)
    second = np.zeros((count, channels), dtype=dtype)
    lo = np.full(count, -np.inf, dtype=dtype)
    hi = np.full(count, np.inf, dtype=dtype)
    for index, (kind, *values) in enumerate(steps):
        if kind == "relu":
            kinds[index], lo[index] = CLIP, 0
        elif kind == "clip":
            kinds[index] = CLIP
            if values[0] is not None:
                lo[index] = values[0]
            if values[1] is not None:
                hi[index] = values[1]
        elif kind in ("add", "mul"):
            kinds[index] = ADD if kind == "add" else MUL
            first[index] = np.reshape(values[0], -1)  # a 1-vector broadcasts to every channel
        elif kind == "bn":
            kinds[index] = AFFINE
            first[index] = np.reshape(values[0], -1)
            second[index] = np.reshape(values[1], -1)
        else:
            raise ValueError(f"unknown epilogue step {kind!r}")
    return kinds, first, second, lo, hi


@njit(cache=True, nogil=True)
def _steps_on_row(dst, channel, kinds, first, second, lo, hi):
    """The encoded steps, in order, on one channel's row ``dst`` in place (see channel_steps)."""
    positions = dst.shape[0]
    for s in range(kinds.shape[0]):
        kind = kinds[s]
        if kind == 0:
            a = first[s, channel]
            for p in range(positions):
                dst[p] = dst[p] + a
        elif kind == 1:
            a = first[s, channel]
            for p in range(positions):
                dst[p] = dst[p] * a
        elif kind == 2:
            a = first[s, channel]
            b = second[s, channel]
            for p in range(positions):
                dst[p] = dst[p] * a + b
        else:
            low = lo[s]
            high = hi[s]
            for p in range(positions):
                v = dst[p]
                if v < low:
                    v = low
                if v > high:
                    v = high
                dst[p] = v


def apply_steps(x, out, c0, encoded) -> None:
    """out = the encoded steps on x (both [N, C, P] with unit stride along P; out may be x), channel c of the
    blocks being channel c0 + c of the encoded vectors. Strided blocks (a GEMM's output block inside a
    larger tensor) are passed to the loop as flat contiguous spans plus row offsets: a Numba array
    with strides it cannot assume unit does not vectorize, and ran 5x slower."""
    src, src_rows = _flat(x)
    dst, dst_rows = _flat(out)
    channel_steps(src, dst, x.shape[0], x.shape[1], x.shape[2], src_rows[0], src_rows[1], dst_rows[0],
                  dst_rows[1], out is x, c0, *encoded)


def _flat(block):
    """(span, (image stride, channel stride)): a 1-D contiguous view of the memory from the first to the last
    element of ``block`` [N, C, P] (unit stride along P, non-negative strides), and its strides in elements."""
    n, c, p = block.shape
    if block.flags.c_contiguous:
        return block.reshape(-1), (c * p, p)
    item = block.itemsize
    rows = (block.strides[0] // item if n > 1 else 0, block.strides[1] // item if c > 1 else 0)
    length = (n - 1) * rows[0] + (c - 1) * rows[1] + p
    return np.lib.stride_tricks.as_strided(block, shape=(length,), strides=(item,)), rows


@njit(cache=True, nogil=True)
def channel_steps(src, dst, n_images, n_channels, positions, src_image, src_channel, dst_image, dst_channel,
                  in_place, c0, kinds, first, second, lo, hi):
    """For each image n and channel c of a block: the row of ``positions`` elements at n*dst_image +
    c*dst_channel of the flat span ``dst`` = the steps applied in order to the same row of ``src`` (or to
    itself when ``in_place``), for channel c0 + c of the encoded vectors: ADD v + first[s, c]; MUL
    v * first[s, c]; AFFINE (v * first[s, c]) + second[s, c]; CLIP v = lo[s] if v < lo[s], then v = hi[s]
    if v > hi[s] (NumPy's maximum and minimum: NaN and the sign of an equal zero are kept). Each step is one
    pass over a row, which stays in L1 and vectorizes.
    """
    for n in range(n_images):
        for c in range(n_channels):
            start = n * dst_image + c * dst_channel
            row = dst[start:start + positions]
            if not in_place:
                origin = n * src_image + c * src_channel
                source = src[origin:origin + positions]
                for p in range(positions):
                    row[p] = source[p]
            _steps_on_row(row, c0 + c, kinds, first, second, lo, hi)


@njit(cache=True, nogil=True)
def add_channel_steps(a, b, out, c0, kinds, first, second, lo, hi):
    """out[n, c, p] = the steps (see channel_steps) applied to a[n, c, p] + b[n, c, p]: a residual Add and the
    Relu after it in one pass. a, b, out are [N, C, P] of one shape; out may be a or b."""
    n_images, n_channels, positions = a.shape
    for n in range(n_images):
        for c in range(n_channels):
            dst, left, right = out[n, c], a[n, c], b[n, c]
            for p in range(positions):
                dst[p] = left[p] + right[p]
            _steps_on_row(dst, c0 + c, kinds, first, second, lo, hi)
