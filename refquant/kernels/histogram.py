"""Numba kernels of the calibration observers: extremes, histograms and onnxruntime's KL threshold search.

A batch arrives as a C-contiguous float32 array ``x3`` of shape (outer, C, inner): channel ``c`` is
``x3[:, c, :]`` (per-tensor observers pass C = 1). The work is cut into items for
:func:`refquant.parallel.parallel_for` (the shared pool that tolerates a descheduled thread; the kernels
release the GIL): ranges of channels, or for one channel ranges of the flattened data, each with its
own counts, added up at the end. Counts and extremes do not depend on the cut, so results are the same
for any number of threads.

Binning rules (exact, no tolerance):

* ``edge_histogram``: bin k holds ``edges[k] <= x < edges[k+1]``, the last bin also ``x == edges[-1]``:
  numpy.histogram's rule on the same float32 edges (float32 compared with float32, as numpy compares
  float32 data with the float32 edges it makes). A guess ``(x - e0) * B / (eB - e0)`` is corrected
  against the edges, so the guess's rounding does not matter.
* ``lattice_histogram``: bin k holds ``floor(x * 2^-level) == start + k``. A float32 scaled by a power of
  two in float64 is exact, so a value's bin depends on the value and the level only.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..parallel import budget, parallel_for, split

_MIN_CHUNK = 1 << 15  # elements: below this a hand-off to another thread costs more than it saves


def _flat_items(n: int) -> list[tuple[int, int]]:
    threads = budget()
    if threads <= 1 or n < 2 * _MIN_CHUNK:
        return [(0, n)]
    return split(n, min(4 * threads, n // _MIN_CHUNK))


def _channel_items(x3) -> list[tuple[int, int]]:
    threads = budget()
    n_ch = x3.shape[1]
    if threads <= 1 or x3.size < 2 * _MIN_CHUNK:
        return [(0, n_ch)]
    return split(n_ch, 4 * threads)


# min/max kernels: fastmath lets LLVM vectorize the reductions; safe because observers only see finite
# data (callers check with observers.check_finite first), where min and max have one answer.
@njit(cache=True, nogil=True, fastmath=True)
def _flat_min_max(flat, a, b):
    lo = np.float32(np.inf)
    hi = np.float32(-np.inf)
    for i in range(a, b):
        v = flat[i]
        lo = min(lo, v)
        hi = max(hi, v)
    return lo, hi


@njit(cache=True, nogil=True, fastmath=True)
def _channels_min_max(x3, c0, c1, lo, hi):
    n_out, _, n_in = x3.shape
    for c in range(c0, c1):
        a = np.float32(np.inf)
        b = np.float32(-np.inf)
        for o in range(n_out):
            for i in range(n_in):
                v = x3[o, c, i]
                a = min(a, v)
                b = max(b, v)
        lo[c] = a
        hi[c] = b


def channel_min_max(x3: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (min, max) float32 arrays of a (outer, C, inner) float32 array (finite values)."""
    n_ch = x3.shape[1]
    if n_ch == 1:
        flat = x3.reshape(-1)
        items = _flat_items(flat.size)
        parts = np.empty((len(items), 2), dtype=np.float32)

        def body(i):
            parts[i] = _flat_min_max(flat, *items[i])

        parallel_for(len(items), body)
        return parts[:, 0].min(keepdims=True), parts[:, 1].max(keepdims=True)
    lo = np.empty(n_ch, dtype=np.float32)
    hi = np.empty(n_ch, dtype=np.float32)
    items = _channel_items(x3)
    parallel_for(len(items), lambda i: _channels_min_max(x3, items[i][0], items[i][1], lo, hi))
    return lo, hi


@njit(cache=True, nogil=True, inline="always")
def _edge_bin(v, edges, e0, scale, nb):
    """numpy.histogram's bin of ``v`` on float32 ``edges`` (nb+1 of them); ``v`` within [e0, edges[nb]]."""
    k = int((v - e0) * scale)  # a guess within a bin or two of the answer...
    k = min(max(k, 0), nb - 1)
    while k > 0 and v < edges[k]:  # ...made exact against the edges
        k -= 1
    while k < nb - 1 and v >= edges[k + 1]:
        k += 1
    return k


# Histogram loops keep 4 sub-histograms (element i counts into sub-histogram i % 4) and add them at the
# end: runs of equal values (the zeros after a ReLU) would otherwise make every increment wait for the
# previous one to the same counter.
@njit(cache=True, nogil=True)
def _flat_edge_hist(flat, a, b, edges, counts):
    nb = counts.size
    e0 = edges[0]
    scale = np.float32(nb) / (edges[nb] - e0)
    sub = np.zeros((4, nb), dtype=np.int64)
    top = 0
    last = edges[nb]
    i = a
    while i + 4 <= b:
        for u in range(4):
            v = flat[i + u]
            sub[u, _edge_bin(v, edges, e0, scale, nb)] += 1
            if v == last:
                top += 1
        i += 4
    while i < b:
        v = flat[i]
        sub[0, _edge_bin(v, edges, e0, scale, nb)] += 1
        if v == last:
            top += 1
        i += 1
    for k in range(nb):
        counts[k] += (sub[0, k] + sub[1, k]) + (sub[2, k] + sub[3, k])
    return top


@njit(cache=True, nogil=True)
def _channels_edge_hist(x3, c0, c1, edges, counts, top):
    n_out, _, n_in = x3.shape
    for c in range(c0, c1):
        for o in range(n_out):
            top[c] += _flat_edge_hist(x3[o, c], 0, n_in, edges[c], counts[c])


def edge_histogram(x3: np.ndarray, edges: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``counts[c, k] +=`` the number of x in channel c with ``edges[c, k] <= x < edges[c, k+1]`` (the
    last bin closed): numpy.histogram's rule. ``edges`` (C, B+1) float32 increasing, ``counts`` (C, B)
    int64; every x must lie within [edges[c, 0], edges[c, B]]. Returns, per channel, how many of the
    values equal ``edges[c, B]`` (int64 (C,))."""
    n_ch, nb = counts.shape
    edges = np.ascontiguousarray(edges, dtype=np.float32)
    top = np.zeros(n_ch, dtype=np.int64)
    if n_ch == 1:
        flat = x3.reshape(-1)
        items = _flat_items(flat.size)
        local = np.zeros((len(items), nb), dtype=np.int64)
        tops = np.zeros(len(items), dtype=np.int64)

        def body(i):
            tops[i] = _flat_edge_hist(flat, items[i][0], items[i][1], edges[0], local[i])

        parallel_for(len(items), body)
        counts[0] += local.sum(axis=0)
        top[0] = tops.sum()
        return top
    items = _channel_items(x3)
    parallel_for(len(items), lambda i: _channels_edge_hist(x3, items[i][0], items[i][1], edges, counts, top))
    return top


@njit(cache=True, nogil=True)
def _flat_lattice_hist(flat, a, b, inv_width, start, counts):
    """Lattice bins in float64: float32 x times a power of two is exact there for every level."""
    nb = counts.size
    sub = np.zeros((4, nb), dtype=np.int64)
    i = a
    while i + 4 <= b:
        for u in range(4):
            sub[u, np.int64(np.floor(np.float64(flat[i + u]) * inv_width)) - start] += 1
        i += 4
    while i < b:
        sub[0, np.int64(np.floor(np.float64(flat[i]) * inv_width)) - start] += 1
        i += 1
    for k in range(nb):
        counts[k] += (sub[0, k] + sub[1, k]) + (sub[2, k] + sub[3, k])


@njit(cache=True, nogil=True)
def _channels_lattice_hist(x3, c0, c1, inv_width, start, counts):
    n_out, _, n_in = x3.shape
    for c in range(c0, c1):
        for o in range(n_out):
            _flat_lattice_hist(x3[o, c], 0, n_in, inv_width[c], start[c], counts[c])


def lattice_histogram(x3: np.ndarray, inv_width: np.ndarray, start: np.ndarray, counts: np.ndarray) -> None:
    """``counts[c, floor(x * inv_width[c]) - start[c]] += 1`` for every x of channel c. ``inv_width``:
    float64 powers of two (the product is exact), ``start``: int64; every index must be in [0, B)."""
    n_ch, nb = counts.shape
    inv_width = np.ascontiguousarray(inv_width, dtype=np.float64)
    start = np.ascontiguousarray(start, dtype=np.int64)
    if n_ch == 1:
        flat = x3.reshape(-1)
        items = _flat_items(flat.size)
        local = np.zeros((len(items), nb), dtype=np.int64)
        parallel_for(len(items), lambda i: _flat_lattice_hist(flat, items[i][0], items[i][1], inv_width[0],
                                                              start[0], local[i]))
        counts[0] += local.sum(axis=0)
        return
    items = _channel_items(x3)
    parallel_for(len(items), lambda i: _channels_lattice_hist(x3, items[i][0], items[i][1], inv_width, start,
                                                              counts))


# ------------------------------------------------------------------ onnxruntime's KL threshold search
@njit(cache=True, nogil=True)
def pairwise_sum_f32(a, lo, n):
    """numpy's float32 ``add.reduce`` of the contiguous ``a[lo:lo+n]`` (numpy/_core/src/umath/
    loops_utils.h.src ``pairwise_sum``): below 8 elements a plain loop; up to 128, eight interleaved
    accumulators combined as ((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7)) plus the tail in order; above, the two
    halves (the first a multiple of 8 long) summed recursively. All in float32, so the result is numpy's bit
    for bit."""
    if n < 8:
        res = np.float32(0.0)
        for i in range(lo, lo + n):
            res += a[i]
        return res
    if n <= 128:
        r0 = a[lo]
        r1 = a[lo + 1]
        r2 = a[lo + 2]
        r3 = a[lo + 3]
        r4 = a[lo + 4]
        r5 = a[lo + 5]
        r6 = a[lo + 6]
        r7 = a[lo + 7]
        i = 8
        stop = n - n % 8
        while i < stop:
            r0 += a[lo + i]
            r1 += a[lo + i + 1]
            r2 += a[lo + i + 2]
            r3 += a[lo + i + 3]
            r4 += a[lo + i + 4]
            r5 += a[lo + i + 5]
            r6 += a[lo + i + 6]
            r7 += a[lo + i + 7]
            i += 8
        res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
        while i < n:
            res += a[lo + i]
            i += 1
        return res
    n2 = n // 2
    n2 -= n2 % 8
    return pairwise_sum_f32(a, lo, n2) + pairwise_sum_f32(a, lo + n2, n - n2)


@njit(cache=True, nogil=True)
def _smooth_into(counts, out, lo):
    """onnxruntime's smooth_distribution (eps = 1e-4) of the int64 ``counts`` into ``out[lo:]`` as float32:
    zeros become float32(1e-4), nonzero entries get float32(-1e-4 * zeros / nonzeros) added. False when
    every count is zero (onnxruntime returns None)."""
    n = counts.size
    zeros = 0
    for i in range(n):
        if counts[i] == 0:
            zeros += 1
    if zeros == n:
        return False
    # numpy: eps1 = 0.0001 * float(n_zero) / float(n_nonzero) in double, then cast to float32 by the
    # multiplication with the float32 mask; the mask products are exact (x1 or x0)
    eps1 = np.float32(0.0001 * np.float64(zeros) / np.float64(n - zeros))
    eps = np.float32(0.0001)
    for i in range(n):
        v = np.float32(counts[i])
        if counts[i] == 0:
            out[lo + i] = v + (eps + np.float32(-0.0))  # eps*1 + (-eps1)*0 = eps + -0.0
        else:
            out[lo + i] = v + (np.float32(0.0) + (-eps1))
    return True


@njit(cache=True, nogil=True)
def kl_windows(hist, quantized_bins):
    """First half of onnxruntime's threshold search (``refquant.quant.observers.entropy_threshold`` is the
    formula and the reference): for every window i = quantized_bins/2 .. B/2, p and q smoothed and
    normalized, laid end to end as float32. Returns (offsets (W+1,), p_norm, q_norm, ratio = p_norm /
    q_norm, valid (W,)): window w occupies [offsets[w], offsets[w+1]); ``valid[w]`` is False where p or q
    was all zeros (onnxruntime's KL is then inf). The caller takes numpy's float32 log of ``ratio`` (the
    function onnxruntime's code calls; Numba's logf may differ from it by an ulp) and ends with
    ``kl_argmin``."""
    n_bins = hist.size
    zero = n_bins // 2
    half = quantized_bins // 2
    n_windows = zero - half + 1
    offsets = np.zeros(n_windows + 1, dtype=np.int64)
    for w in range(n_windows):
        i = half + w
        offsets[w + 1] = offsets[w] + (min(zero + i + 1, n_bins) - (zero - i))
    total = offsets[n_windows]
    pn = np.ones(total, dtype=np.float32)
    qn = np.ones(total, dtype=np.float32)
    ratio = np.ones(total, dtype=np.float32)
    valid = np.zeros(n_windows, dtype=np.bool_)
    cum = np.zeros(n_bins + 1, dtype=np.int64)
    for k in range(n_bins):
        cum[k + 1] = cum[k] + hist[k]
    for w in range(n_windows):
        i = half + w
        start = zero - i
        end = min(zero + i + 1, n_bins)
        size = end - start
        lo = offsets[w]
        p = hist[start:end].copy()
        p[0] += cum[start]                     # outliers below the window join its first bin
        p[size - 1] += cum[n_bins] - cum[end]  # and those above its last
        group = size // quantized_bins
        used = group * quantized_bins
        q = np.zeros(size, dtype=np.int64)
        for g in range(quantized_bins):
            a = g * group
            b = a + group
            s = cum[start + b] - cum[start + a]  # the window's own counts, not p's
            if g == quantized_bins - 1:
                s += cum[end] - cum[start + used]  # the remainder joins the last group
            nonzero = 0
            for k in range(a, b):
                if p[k] != 0:
                    nonzero += 1
            if nonzero > 0:
                spread = np.int64(np.float64(s) / np.float64(nonzero))  # numpy: (sums / nonzero).astype(int64)
                for k in range(a, b):
                    q[k] = spread
        if not (_smooth_into(p, pn, lo) and _smooth_into(q, qn, lo)):
            continue
        valid[w] = True
        sp = pairwise_sum_f32(pn, lo, size)
        sq = pairwise_sum_f32(qn, lo, size)
        for k in range(lo, lo + size):
            pn[k] = pn[k] / sp
            qn[k] = qn[k] / sq
            ratio[k] = pn[k] / qn[k]
    return offsets, pn, qn, ratio, valid


@njit(cache=True, nogil=True)
def kl_argmin(offsets, pn, qn, log_ratio, valid):
    """Second half: the KL of every window, the pairwise float32 sum of ``p * log(p / q)`` with
    onnxruntime's masks (inf where not p > 0 and q > 0, then 0 where p == 0 and q >= 0), and the first
    window of least KL (numpy argmin). Returns the window index."""
    n_windows = offsets.size - 1
    terms = np.empty(pn.size, dtype=np.float32)
    kls = np.full(n_windows, np.float32(np.inf), dtype=np.float32)
    for w in range(n_windows):
        lo = offsets[w]
        size = offsets[w + 1] - lo
        if valid[w]:
            for k in range(lo, lo + size):
                p = pn[k]
                q = qn[k]
                if p == 0 and q >= 0:
                    terms[k] = np.float32(0.0)
                elif not (p > 0 and q > 0):
                    terms[k] = np.float32(np.inf)
                else:
                    terms[k] = p * log_ratio[k]
            kls[w] = pairwise_sum_f32(terms, lo, size)
    best = 0
    for w in range(1, n_windows):
        if kls[w] < kls[best]:  # argmin: the first of equal values
            best = w
    return best


def entropy_window(hist: np.ndarray, quantized_bins: int) -> tuple[int, int]:
    """onnxruntime's KL threshold window (start, end) of a histogram: ``kl_windows``, numpy's float32 log,
    ``kl_argmin``. Equal to ``refquant.quant.observers.entropy_threshold`` (tested bit for bit)."""
    hist = np.ascontiguousarray(hist, dtype=np.int64)
    offsets, pn, qn, ratio, valid = kl_windows(hist, int(quantized_bins))
    with np.errstate(all="ignore"):
        log_ratio = np.log(ratio)
    w = kl_argmin(offsets, pn, qn, log_ratio, valid)
    n_bins = hist.size
    i = quantized_bins // 2 + w
    return n_bins // 2 - i, min(n_bins // 2 + i + 1, n_bins)


# ------------------------------------------------------------------ AIMET's TF-enhanced buckets
@njit(cache=True, nogil=True, error_model="numpy")
def _flat_tfe_hist(flat, a, b, inv, shift, counts):
    n = counts.size
    last = np.float32(n - 1)
    for i in range(a, b):
        k = np.floor(flat[i] * inv) - shift  # float32, as AIMET computes it
        if np.float32(0.0) <= k <= last:
            counts[int(k)] += 1


@njit(cache=True, nogil=True, error_model="numpy")
def _channels_tfe_hist(x3, c0, c1, inv, shift, ready, counts):
    n_out, _, n_in = x3.shape
    for c in range(c0, c1):
        if ready[c]:
            for o in range(n_out):
                _flat_tfe_hist(x3[o, c], 0, n_in, inv[c], shift[c], counts[c])


def tfe_histogram(x3: np.ndarray, inv: np.ndarray, shift: np.ndarray, ready: np.ndarray, n_buckets: int) -> np.ndarray:
    """AIMET's TF-enhanced bucket counts of one batch, (C, n_buckets) int64: bucket
    ``floor(x * inv[c]) - shift[c]`` computed in float32 (``inv`` = float32(1/step), ``shift`` = the
    first bucket's index on the lattice of steps); values outside the buckets are dropped, channels not
    ``ready`` are left at zero."""
    n_ch = x3.shape[1]
    inv = np.ascontiguousarray(inv, dtype=np.float32)
    shift = np.ascontiguousarray(shift, dtype=np.float32)
    ready = np.ascontiguousarray(ready, dtype=np.bool_)
    counts = np.zeros((n_ch, n_buckets), dtype=np.int64)
    if n_ch == 1:
        if not ready[0]:
            return counts
        flat = x3.reshape(-1)
        items = _flat_items(flat.size)
        local = np.zeros((len(items), n_buckets), dtype=np.int64)
        parallel_for(len(items), lambda i: _flat_tfe_hist(flat, items[i][0], items[i][1], inv[0], shift[0],
                                                          local[i]))
        counts[0] = local.sum(axis=0)
        return counts
    items = _channel_items(x3)
    parallel_for(len(items), lambda i: _channels_tfe_hist(x3, items[i][0], items[i][1], inv, shift, ready, counts))
    return counts
