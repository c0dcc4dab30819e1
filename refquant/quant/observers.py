"""Calibration observers (range estimators) for activation quantizers: streaming and mergeable.

An observer sees a tensor batch by batch (``update``), keeps a fixed-size summary (a running min/max or
a histogram, never the activations), and turns it into a range ``(min, max)`` for a quantizer
(``range``). Two observers of the same kind that saw different data combine with ``a.merge(b)``, so a
calibration split across processes or machines adds up. ``axis=None`` keeps one summary per tensor;
``axis=k`` keeps one per channel along dimension ``k`` (ranges of shape ``(C,)``).

Schemes (``make_observer(scheme, axis, **options)``):

========================  =========================================================================
``min_max`` (``tf``)      running min and max (AIMET ``TfEncodingAnalyzer``)
``tf_enhanced``           AIMET's TF-enhanced grid search, bit-exact with aimet-onnx 2.42.0
``percentile``            ``min``/``max`` = the ``(100-p)``-th / ``p``-th percentile of a histogram
``mse``                   the clipping range whose grid minimizes the expected quantization MSE
``entropy``               onnxruntime's KL-divergence threshold (``HistogramCollector``, "entropy")
========================  =========================================================================

``range`` returns float64 arrays. ``min_max``, ``percentile`` and ``entropy`` return a statistic of the
data, which the encoding code turns into a grid (``encoding.from_min_max``). ``tf_enhanced`` and ``mse``
search over grids, and return the chosen grid's range ``(scale*offset, scale*(offset+num_steps))``, so
``from_min_max`` of it gives back the chosen scale and offset.

Callers check batches with :func:`check_finite` first; ``update`` assumes finite data.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from numba import njit

from ..errors import RefquantError
from ..kernels.histogram import (channel_min_max, edge_histogram, entropy_window, lattice_histogram,
                                 tfe_histogram)
from .encoding import from_min_max

SCHEMES = ("min_max", "tf", "tf_enhanced", "percentile", "mse", "entropy")


class ObserverError(RefquantError, ValueError):
    """An observer used wrongly: no data yet, a merge of different kinds, a channel count that changed."""


def check_finite(x) -> int | None:
    """Flat (C-order) index of the first NaN or Inf in ``x``, or None if every element is finite."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.inexact):
        return None
    finite = np.isfinite(x)
    if finite.all():
        return None
    return int(np.argmin(finite.ravel()))  # argmin of a bool array = first False


def make_observer(scheme: str, axis: int | None = None, **options) -> "Observer":
    """An observer for ``scheme`` (one of SCHEMES). Options: ``percentile`` (default 99.99) and
    ``bins`` for "percentile"; ``bins``, ``num_candidates`` for "mse"; ``bins``, ``quantized_bins``
    for "entropy"; none for "min_max"/"tf"/"tf_enhanced"."""
    classes = {"min_max": MinMaxObserver, "tf": MinMaxObserver, "tf_enhanced": TfEnhancedObserver,
               "percentile": PercentileObserver, "mse": MseObserver, "entropy": EntropyObserver}
    if scheme not in classes:
        raise ObserverError(f"unknown calibration scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    try:
        return classes[scheme](axis=axis, **options)
    except TypeError as e:  # an option this scheme does not have
        raise ObserverError(f"calibration scheme {scheme!r}: {e}") from None


class Observer:
    """Base class: channel bookkeeping, update/merge/range plumbing. Subclasses keep the statistics."""

    scheme = ""

    def __init__(self, axis: int | None = None):
        self.axis = axis
        self.channels: int | None = None  # fixed by the first batch
        self.batches = 0

    @property
    def empty(self) -> bool:
        """True until a batch with at least one element has been seen."""
        return self.batches == 0

    def update(self, x: np.ndarray) -> None:
        """Add one batch (any float array; computed on as float32, as AIMET does)."""
        x = np.asarray(x)
        if x.size == 0:
            return
        self._update(self._channel_view(x))
        self.batches += 1

    def merge(self, other: "Observer") -> None:
        """Fold ``other``'s statistics (same scheme, axis and options, different data) into this one."""
        if type(other) is not type(self) or other.axis != self.axis or other._options() != self._options():
            raise ObserverError(f"cannot merge a {other.scheme} observer (axis={other.axis}, "
                                f"{other._options()}) into a {self.scheme} observer (axis={self.axis}, "
                                f"{self._options()})")
        if other.empty:
            return
        if self.empty:
            self.channels = other.channels
        elif other.channels != self.channels:
            raise ObserverError(f"cannot merge observers of {other.channels} and {self.channels} channels")
        self._merge(other)
        self.batches += other.batches

    def range(self, bitwidth: int, symmetric: bool, strict_symmetric: bool = False,
              unsigned_symmetric: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(min, max) float64 arrays: shape () per tensor, (C,) per channel."""
        if self.empty:
            raise ObserverError(f"{self.scheme} observer has seen no data; run calibration batches first")
        lo, hi = self._range(int(bitwidth), bool(symmetric), bool(strict_symmetric), bool(unsigned_symmetric))
        lo = np.asarray(lo, dtype=np.float64)
        hi = np.asarray(hi, dtype=np.float64)
        if self.axis is None:
            return lo.reshape(()), hi.reshape(())
        return lo, hi

    def spawn(self) -> "Observer":
        """An empty observer of the same scheme, axis and options that bins data as this one does: the
        part of a split calibration. Schemes whose binning is fixed by the first batch (tf_enhanced's
        buckets, entropy's T0) copy this observer's anchors, so every part bins on the same edges and
        ``merge`` of the parts is exact; min_max, percentile and mse need no anchor (a fresh observer)."""
        twin = type(self)(axis=self.axis, **self._options())
        twin.channels = self.channels
        twin._adopt_anchor(self)
        return twin

    # ---- helpers for subclasses ----
    def _options(self) -> dict:
        return {}

    def _adopt_anchor(self, other) -> None:
        pass

    def _channel_view(self, x: np.ndarray) -> np.ndarray:
        """``x`` as a C-contiguous float32 array of shape (outer, C, inner): channel c is ``[:, c, :]``."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.axis is None:
            x3 = x.reshape(1, 1, x.size)
        else:
            if x.ndim == 0 or not -x.ndim <= self.axis < x.ndim:
                raise ObserverError(f"per-channel axis {self.axis} is out of range for a tensor of shape {x.shape}")
            axis = self.axis % x.ndim
            x3 = x.reshape(int(np.prod(x.shape[:axis])), x.shape[axis], -1)
        if self.channels is None:
            self.channels = x3.shape[1]
        elif x3.shape[1] != self.channels:
            raise ObserverError(f"batch has {x3.shape[1]} channels along axis {self.axis}, earlier batches "
                                f"had {self.channels}")
        return x3

    def _update(self, x3):
        raise NotImplementedError

    def _merge(self, other):
        raise NotImplementedError

    def _range(self, bitwidth, symmetric, strict_symmetric, unsigned_symmetric):
        raise NotImplementedError


_channel_min_max = channel_min_max  # per-channel float32 (min, max) of an (outer, C, inner) array


# ============================================================================ min_max
class MinMaxObserver(Observer):
    """``min = min over all batches of x``, ``max = max over all batches of x`` (AIMET TF scheme).
    Merging takes the min of the mins and the max of the maxes: exact."""

    scheme = "min_max"

    def __init__(self, axis: int | None = None):
        super().__init__(axis)
        self.min = None
        self.max = None

    def _update(self, x3):
        lo, hi = _channel_min_max(x3)
        if self.min is None:
            self.min, self.max = lo, hi
        else:
            self.min = np.minimum(self.min, lo)
            self.max = np.maximum(self.max, hi)

    def _merge(self, other):
        if self.min is None:
            self.min, self.max = other.min.copy(), other.max.copy()
        else:
            self.min = np.minimum(self.min, other.min)
            self.max = np.maximum(self.max, other.max)

    def _range(self, bitwidth, symmetric, strict_symmetric, unsigned_symmetric):
        return self.min.astype(np.float64), self.max.astype(np.float64)


# ============================================================================ tf_enhanced
# AIMET's TF-enhanced analyzer as aimet-onnx 2.42.0 runs it (DTYPE = float; read from the shipped
# _libpymo binary and checked bit for bit against it; the public C++ in quic/aimet
# TfEnhancedEncodingAnalyzer.cpp / math_functions.cpp is an older revision with 512 bins, round()
# binning and a float cost). Every float32 step below is a float in the C++; the rest is double.
_TFE_BINS = 1536  # PDF_SIZE (512 in the public source)
_F32 = np.float32
_F32_MAX = _F32(np.finfo(np.float32).max)
_F32_099MAX = _F32(0.99 * float(np.finfo(np.float32).max))  # the histogram range is capped at 0.99*FLT_MAX


@njit(cache=True)
def _c_int(v):
    """C's float -> int conversion on x86-64 (cvttss2si): truncation; NaN or out of int32 -> INT_MIN."""
    if not (-2147483648.0 <= v < 2147483648.0):
        return -2147483648
    return int(v)


@njit(cache=True)
def _roundf(v):
    """C roundf on a float32: ties away from zero."""
    a = abs(v)
    t = np.floor(a)
    if a - t >= np.float32(0.5):
        t = t + np.float32(1.0)
    return t if v >= 0 else -t


@njit(cache=True)
def _round(v):
    """C round on a double: ties away from zero."""
    a = abs(v)
    t = np.floor(a)
    if a - t >= 0.5:
        t += 1.0
    return t if v >= 0 else -t


@njit(cache=True)
def _maxss(dst, src):
    """SSE maxss as the compiler emitted it: dst if dst > src else src (NaN picks src)."""
    return dst if dst > src else src


@njit(cache=True)
def _minss(dst, src):
    """SSE minss: dst if dst < src else src."""
    return dst if dst < src else src


def _tfe_bucket_edges(lo: np.float32, hi: np.float32) -> np.ndarray:
    """Left edges of the 1536 buckets for a first batch with min ``lo``, max ``hi``: the range is widened
    3x around its centre, and the edges are whole multiples of the bucket size, so 0 is an edge."""
    lo, hi = _F32(lo), _F32(hi)
    if lo == hi:  # a constant first batch: make the range 0.01 wide
        wider = _F32(lo + _F32(0.01))
        hi = wider if wider > hi else hi
    centre = _F32(_F32(hi + lo) * _F32(0.5))
    lo3 = _F32(_F32(_F32(centre - lo) * _F32(-3.0)) + centre)
    hi3 = _F32(_F32(_F32(hi - centre) * _F32(3.0)) + centre)
    lo3 = lo3 if lo3 > -_F32_099MAX else -_F32_099MAX
    hi3 = hi3 if hi3 < _F32_099MAX else _F32_099MAX
    with np.errstate(all="ignore"):  # a range below float resolution gives step 0, as in AIMET
        step = (np.float64(hi3) - np.float64(lo3)) / _TFE_BINS
        return np.floor(np.arange(_TFE_BINS, dtype=np.float64) + np.float64(lo3) / step) * step


def _tfe_counts(x3, first_edge, step, ready):
    """Bucket counts per channel: bucket = floorf(x * (1/step)) - round(first_edge/step), in float32;
    values outside the 1536 buckets are dropped (AIMET never grows this histogram). The loop is
    ``refquant.kernels.histogram.tfe_histogram``."""
    n_ch = len(ready)
    inv = np.zeros(n_ch, dtype=np.float32)
    shift = np.zeros(n_ch, dtype=np.float32)
    with np.errstate(all="ignore"):  # step 0 (see _range): inf/NaN bucket positions, counted nowhere
        for c in np.flatnonzero(ready):
            inv[c] = np.float32(1.0 / step[c])
            shift[c] = np.float32(_c_int(_round(first_edge[c] / step[c])))
    return tfe_histogram(x3, inv, shift, ready, _TFE_BINS)


@njit(cache=True, error_model="numpy")
def _tfe_cost(pdf, mids, used, first_edge, step, bw, delta, offset):
    """AIMET's _quantAndSatCost: 3 * (clipping MSE below + above the grid) + rounding MSE inside,
    each bucket represented by its midpoint and weighted by its probability. ``used``: the ascending
    indices of the buckets with pdf > 0; the others add d*d*0 = +0 to a sum, which leaves it unchanged,
    so skipping them gives AIMET's sums bit for bit (d is finite: mids and the grid are)."""
    n = 1536
    off = np.float32(offset)
    full_steps = np.float32(2.0 ** bw - 1.0)  # the full 2^bw - 1, also for strict symmetric grids
    vmax = (full_steps + off) * delta
    vmin = off * delta
    x0 = np.float32(first_edge)
    max_raw = _c_int(np.floor(np.float64(vmax - x0) / step))
    min_raw = _c_int(np.floor(np.float64(vmin - x0) / step))
    lo = min(min_raw, n - 1) if min_raw > 0 else 0
    hi = min(max_raw, n - 1) if max_raw > 0 else 0
    a = np.searchsorted(used, lo)  # used[:a] < lo <= used[a:]
    b = np.searchsorted(used, hi)
    below = 0.0
    for j in range(a):
        i = used[j]
        d = np.float64(mids[i]) - np.float64(mids[lo])
        below = d * d * pdf[i] + below
    above = 0.0
    for j in range(b, used.size):
        i = used[j]
        d = np.float64(mids[i]) - np.float64(mids[hi])
        above = d * d * pdf[i] + above
    inside = 0.0
    if lo < hi:  # rounded on the grid through 0: the integer offset does not move the grid points
        inv = np.float32(1.0) / delta
        for j in range(a, b):
            i = used[j]
            x = mids[i]
            e = np.float64(x - np.floor(x * inv + np.float32(0.5)) * delta)
            inside = e * e * pdf[i] + inside
    total = (below + above) * 3.0 + inside
    return 1.7976931348623157e308 if 1.7976931348623157e308 < total else total


@njit(cache=True, error_model="numpy")
def _tfe_asym_candidates(vmin, vmax, steps):
    """17 deltas (k/16 of the observed delta, k = 1..17) x 21 offsets (-steps + i*steps/20), each clamped
    into the observed range and re-gridded; then the observed range itself."""
    deltas = []
    offsets = []
    obs_delta = np.float32((np.float64(vmax) - np.float64(vmin)) / np.float64(steps))
    obs_offset = _c_int(_roundf(vmin / obs_delta))
    obs_off_f = np.float32(obs_offset)
    obs_min = _maxss(-_F32_MAX, obs_delta * obs_off_f)
    obs_max = _minss(_F32_MAX, (obs_off_f + steps) * obs_delta)
    f = np.float32(0.0625)
    while True:
        test_delta = f * obs_delta
        for i in range(21):
            off = np.float32(_c_int(np.float64(steps) / 20.0 * i + (-np.float64(steps))))
            t_min = _maxss(-_F32_MAX, test_delta * off)
            t_max = _minss(_F32_MAX, (off + steps) * test_delta)
            if obs_min > t_min and t_max > obs_max:  # wider than the data on both sides: skip
                continue
            t_min = _maxss(t_min, obs_min)
            t_max = _minss(t_max, obs_max)
            if t_min == t_max:
                continue
            d = np.float32((np.float64(t_max) - np.float64(t_min)) / np.float64(steps))
            deltas.append(d)
            offsets.append(_c_int(_roundf(t_min / d)))
        f = f + np.float32(0.0625)
        if not (np.float32(1.0625) >= f):
            break
    deltas.append(obs_delta)
    offsets.append(obs_offset)
    return deltas, offsets


@njit(cache=True, error_model="numpy")
def _tfe_search(xleft, pdf, bw, symmetric, strict, unsigned):
    """AIMET's TF-enhanced encoding of one histogram: (delta float32, offset int, steps float32)."""
    n = 1536
    vmin = np.float32(xleft[0])  # left edges of the first and last non-empty buckets
    for i in range(n):
        if pdf[i] > 0:
            vmin = np.float32(xleft[i])
            break
    vmax = np.float32(xleft[n - 1])
    for i in range(n - 1, 0, -1):
        if pdf[i] > 0:
            vmax = np.float32(xleft[i])
            break
    vmin = _minss(np.float32(0.0), vmin)  # include zero, and keep at least 0.01 of range
    vmax = _maxss(np.float32(0.0), vmax)
    vmax = _maxss(vmin + np.float32(0.01), vmax)
    steps = np.float32(2.0 ** bw - 1.0)
    if symmetric:
        if strict:
            steps = steps + np.float32(-1.0)
        if vmin == 0 and unsigned:
            delta_max = vmax / steps
            offset = 0
        else:
            amax = _maxss(abs(vmin), abs(vmax))
            delta_max = np.float32(np.float64(amax) / (np.float64(steps) * 0.5))
            offset = _c_int(np.floor(steps * np.float32(-0.5)))
        deltas = []  # 101 deltas k/100 * delta_max, counted in float as AIMET does
        offsets = []
        f = np.float32(0.01)
        while True:
            deltas.append(f * delta_max)
            offsets.append(offset)
            f = np.float32(np.float64(f) + 0.01)
            if not (1.01 >= np.float64(f)):
                break
    else:
        deltas, offsets = _tfe_asym_candidates(vmin, vmax, steps)
    step = xleft[1] - xleft[0]
    mids = np.empty(n, dtype=np.float32)
    for i in range(n):
        mids[i] = np.float32(np.float64(np.float32(xleft[i])) + step * 0.5)
    used = np.flatnonzero(pdf > 0)
    best_cost = 1.7976931348623157e308
    best_delta = np.float32(-1.0)
    best_offset = -1
    for k in range(len(deltas)):
        cost = _tfe_cost(pdf, mids, used, xleft[0], step, bw, deltas[k], offsets[k])
        if best_cost > cost:  # strictly lower: the first of equal costs wins
            best_cost = cost
            best_delta = deltas[k]
            best_offset = offsets[k]
    return best_delta, best_offset, steps


class TfEnhancedObserver(Observer):
    """AIMET's TF-enhanced scheme: search the grid that minimizes ``3 * clipping MSE + rounding MSE``
    over a histogram. Bit-exact with aimet-onnx 2.42.0 (``QuantScheme.post_training_tf_enhanced``).

    Histogram: 1536 buckets, fixed by the first non-zero batch: its [min, max] widened 3x around the
    centre, bucket edges at whole multiples of the bucket size. Later values outside are dropped, all-zero
    batches before the first non-zero one are ignored. The PDF is the mean of per-batch PDFs
    (counts / batch size; see PDF below). Search: asymmetric = 17 deltas x 21 offsets clamped to the observed range plus
    the observed range; symmetric = 101 deltas ``k/100 * max|x| / (steps/2)`` with ``offset = floor(-steps/2)``
    (0 for unsigned symmetric on data >= 0). Cost per candidate on bucket midpoints (see ``_tfe_cost``).

    ``range`` returns ``(delta*offset, delta*(offset+steps))`` computed in float64 from AIMET's float32
    delta: ``from_min_max`` of it gives AIMET's scale and offset exactly (AIMET's own min/max fields are
    those products rounded to float32). A tensor that was all zeros gets AIMET's fallback grid
    ``delta = 2/(2^bw-1)``, ``offset = floor(-1/delta)`` (about [-1, 1]). One deliberate difference: where
    AIMET's search finds no grid (bucket size 0, see ``_range``) this returns the observed [min, max].

    PDF: AIMET keeps the running mean of the per-batch PDFs (counts / batch size). This observer keeps
    the integer bucket counts summed per batch size instead, and forms the same mean when asked:
    ``pdf = (sum over batch sizes n, ascending, of counts_n / n) / batches``. Mathematically AIMET's
    mean; in float64 the two differ by rounding only (a few ulps of each bucket), which changes a
    chosen grid only if two candidate costs tie to within that rounding (the AIMET goldens below are
    reproduced exactly). What it buys: the counts do not depend on the order of the batches.

    Merge: exact for channels whose buckets are the same in both parts (integer counts and batch counts
    add): parts made by ``spawn()`` from an observer that has seen the stream's first batch bin on its
    buckets, so calibrating parts of the data separately and merging them gives exactly what one
    observer of all the data in stream order gives (count the first batch in one part only). A channel
    that was all zeros in that first batch has no buckets yet, and takes them from the first nonzero batch
    of whichever part sees one; parts whose buckets differ merge by moving each of the other's buckets
    (by its midpoint) into this one's, dropping mass outside them as AIMET drops out-of-range values.
    """

    scheme = "tf_enhanced"

    def __init__(self, axis: int | None = None):
        super().__init__(axis)
        self.xleft = None    # (C, 1536) float64 bucket left edges, valid where ready
        self.counts = {}     # batch size (elements per channel) -> (C, 1536) int64 summed bucket counts
        self.iterations = None
        self.ready = None    # (C,) bool: histogram initialised
        self.min = None      # (C,) exact extremes, for the fallback below
        self.max = None

    def _allocate(self, n_ch):
        self.xleft = np.zeros((n_ch, _TFE_BINS))
        self.counts = {}
        self.iterations = np.zeros(n_ch, dtype=np.int64)
        self.ready = np.zeros(n_ch, dtype=bool)
        self.min = np.full(n_ch, np.inf, dtype=np.float32)
        self.max = np.full(n_ch, -np.inf, dtype=np.float32)

    @property
    def pdf(self) -> np.ndarray:
        """(C, 1536) float64: the mean over batches of the per-batch PDFs (0 where not ready)."""
        pdf = np.zeros((len(self.ready), _TFE_BINS))
        for n in sorted(self.counts):
            pdf += self.counts[n] / float(n)
        with np.errstate(invalid="ignore", divide="ignore"):
            pdf = pdf / self.iterations[:, None].astype(np.float64)
        pdf[self.iterations == 0] = 0
        return pdf

    def _adopt_anchor(self, other):
        if other.xleft is not None:
            self._allocate(len(other.ready))
            self.xleft[:] = other.xleft
            self.ready[:] = other.ready

    def _update(self, x3):
        if self.xleft is None:
            self._allocate(x3.shape[1])
        lo, hi = _channel_min_max(x3)
        self.min = np.minimum(self.min, lo)
        self.max = np.maximum(self.max, hi)
        if not self.ready.all():
            for c in np.flatnonzero(~self.ready):
                if lo[c] == 0 and hi[c] == 0:
                    continue  # AIMET cannot size a histogram from zeros: the batch is not counted
                self.xleft[c] = _tfe_bucket_edges(lo[c], hi[c])
                self.ready[c] = True
        step = self.xleft[:, 1] - self.xleft[:, 0]
        counts = _tfe_counts(x3, self.xleft[:, 0], step, self.ready)
        n = x3.shape[0] * x3.shape[2]
        if n not in self.counts:
            self.counts[n] = np.zeros((len(self.ready), _TFE_BINS), dtype=np.int64)
        self.counts[n] += counts  # zero rows where not ready
        self.iterations[self.ready] += 1

    def _merge(self, other):
        if self.xleft is None:
            self._allocate(other.channels)
        self.min = np.minimum(self.min, other.min)
        self.max = np.maximum(self.max, other.max)
        for n in other.counts:
            if n not in self.counts:
                self.counts[n] = np.zeros((len(self.ready), _TFE_BINS), dtype=np.int64)
        for c in np.flatnonzero(other.ready):
            if not self.ready[c]:
                self.xleft[c] = other.xleft[c]
                self.ready[c] = True
            same = np.array_equal(other.xleft[c], self.xleft[c])
            for n, theirs in other.counts.items():
                self.counts[n][c] += theirs[c] if same else self._rebin(other.xleft[c], theirs[c], self.xleft[c])
            self.iterations[c] += other.iterations[c]

    @staticmethod
    def _rebin(src_left, src_counts, dst_left):
        """Move each source bucket's count to the destination bucket holding its midpoint."""
        src_step, dst_step = src_left[1] - src_left[0], dst_left[1] - dst_left[0]
        k = np.floor((src_left + src_step / 2 - dst_left[0]) / dst_step).astype(np.int64)
        inside = (k >= 0) & (k < _TFE_BINS)
        moved = np.zeros(_TFE_BINS, dtype=np.int64)
        np.add.at(moved, k[inside], src_counts[inside])
        return moved

    def _range(self, bitwidth, symmetric, strict_symmetric, unsigned_symmetric):
        n_ch = self.channels
        lo, hi = np.empty(n_ch), np.empty(n_ch)
        pdf = self.pdf if self.xleft is not None else None
        for c in range(n_ch):
            if self.xleft is None or not self.ready[c]:
                # only zeros seen: AIMET's fallback grid, computed in double
                steps = float(int(np.float32(2.0 ** bitwidth - 1)))
                delta = 2.0 / steps
                offset = math.floor(-1.0 / delta)
                lo[c], hi[c] = offset * delta, delta * steps + offset * delta
                continue
            delta, offset, steps = _tfe_search(self.xleft[c], pdf[c], bitwidth, symmetric,
                                               strict_symmetric, unsigned_symmetric)
            if not delta > 0:
                # no candidate had a finite cost: the bucket size underflowed (a constant first batch
                # far from 0, e.g. all 1e6, where 1e6 + 0.01 == 1e6 in float). AIMET then returns
                # delta = -1 and min > max; use the observed range instead.
                lo[c], hi[c] = min(float(self.min[c]), 0.0), max(float(self.max[c]), 0.0)
                continue
            # float32 delta times integers below 2^17 is exact in float64: (hi - lo)/steps == delta
            lo[c] = float(delta) * offset
            hi[c] = float(delta) * (offset + float(steps))
        return lo, hi


# ============================================================================ histograms
def _pairs_merged(counts: np.ndarray) -> np.ndarray:
    """Adjacent bins summed: (B,) -> (B/2,). The move that doubles a histogram's range exactly."""
    return counts.reshape(-1, 2).sum(axis=1)


def _lattice_layout(lo: float, hi: float, bins: int) -> tuple[int, int]:
    """The (level, start) of the lattice window for data in [lo, hi] (float32 values, lo <= hi):
    the finest level L (bin width 2^L) at which floor(lo/2^L) .. floor(hi/2^L) spans at most ``bins``
    bins, but no finer than float32's spacing at max(|lo|, |hi|) (2^(e-23), e = floor(log2 max|x|), and
    2^-149 for zeros); start = floor(lo/2^L). A function of (lo, hi) alone, non-decreasing in L as the
    range widens: the property that makes the histogram independent of the order of the data."""
    amax = max(abs(lo), abs(hi))
    floor_level = -149 if amax == 0 else max(-149, math.frexp(amax)[1] - 1 - 23)
    level = floor_level
    if hi > lo:
        level = max(level, math.ceil(math.log2((hi - lo) / bins)) - 1)
    while math.floor(hi * 2.0 ** -level) - math.floor(lo * 2.0 ** -level) > bins - 1:
        level += 1
    return level, math.floor(lo * 2.0 ** -level)


class _LatticeHistogram:
    """Histograms (one per channel) on a fixed lattice of power-of-two bins: bin widths 2^L, bin j of
    the lattice = [j*2^L, (j+1)*2^L), and a window of B bins from ``start``. (L, start) is a function
    of the channel's running [min, max] alone (``_lattice_layout``), so after any sequence of batches,
    and after any merge of observers of parts of the data, a channel holds the same counts: the number
    of its values in each window bin. No value is ever dropped or moved by rounding.

    Widening the range re-lays the counts exactly: at level L+d, lattice bin j becomes j >> d (floor
    division: the coarse bin is the union of 2^d fine ones, since x * 2^-L is exact in floating point),
    and the window moves by whole bins. Cost: the data spans between B/2 and B bins (a resolution of at
    least half of a histogram fitted to [min, max]); 2048 bins give at least 1024 across the data.
    Also keeps the exact running min and max. Attributes per channel: ``lo``, ``hi`` (window ends,
    float64), ``counts`` (C, B) int64, ``level``, ``start``, ``min``, ``max``, ``ready``.
    """

    def __init__(self, bins: int):
        if bins < 4 or bins % 4:
            raise ObserverError(f"histogram bins must be a positive multiple of 4, got {bins}")
        self.bins = bins
        self.counts = None

    def _allocate(self, n_ch):
        self.counts = np.zeros((n_ch, self.bins), dtype=np.int64)
        self.level = np.zeros(n_ch, dtype=np.int64)
        self.start = np.zeros(n_ch, dtype=np.int64)
        self.ready = np.zeros(n_ch, dtype=bool)
        self.min = np.full(n_ch, np.inf, dtype=np.float32)
        self.max = np.full(n_ch, -np.inf, dtype=np.float32)

    @property
    def lo(self) -> np.ndarray:
        return self.start * np.exp2(self.level.astype(np.float64))

    @property
    def hi(self) -> np.ndarray:
        return (self.start + self.bins) * np.exp2(self.level.astype(np.float64))

    def edges(self, c: int) -> np.ndarray:
        """float64 bin edges of channel c (exact: integers times a power of two)."""
        return (self.start[c] + np.arange(self.bins + 1)) * 2.0 ** int(self.level[c])

    def _relayout(self, c: int, lo: float, hi: float) -> None:
        """Move channel c's counts to the layout of the range [lo, hi] (which contains the old one)."""
        level, start = _lattice_layout(lo, hi, self.bins)
        if not self.ready[c]:
            self.level[c], self.start[c], self.ready[c] = level, start, True
            return
        if level == self.level[c] and start == self.start[c]:
            return
        shift = level - int(self.level[c])  # >= 0: the layout only coarsens as the range widens
        used = np.flatnonzero(self.counts[c])
        j = (int(self.start[c]) + used) >> shift  # floor division of lattice indices by 2^shift
        moved = np.zeros(self.bins, dtype=np.int64)
        np.add.at(moved, j - start, self.counts[c, used])
        self.counts[c] = moved
        self.level[c], self.start[c] = level, start

    def add(self, x3):
        if self.counts is None:
            self._allocate(x3.shape[1])
        lo, hi = channel_min_max(x3)
        self.min = np.minimum(self.min, lo)
        self.max = np.maximum(self.max, hi)
        for c in range(x3.shape[1]):
            self._relayout(c, float(self.min[c]), float(self.max[c]))
        inv = np.exp2(-self.level.astype(np.float64))
        lattice_histogram(x3, inv, self.start, self.counts)

    def merge(self, other: "_LatticeHistogram"):
        """Exact: both parts are re-laid on the layout of the union of their ranges and added."""
        if self.counts is None:
            self._allocate(len(other.ready))
        self.min = np.minimum(self.min, other.min)
        self.max = np.maximum(self.max, other.max)
        theirs = _LatticeHistogram(self.bins)
        theirs._allocate(len(other.ready))
        for name in ("counts", "level", "start", "ready"):
            setattr(theirs, name, getattr(other, name).copy())
        for c in np.flatnonzero(other.ready | self.ready):
            lo, hi = float(self.min[c]), float(self.max[c])
            self._relayout(c, lo, hi)
            if other.ready[c]:
                theirs._relayout(c, lo, hi)
                self.counts[c] += theirs.counts[c]


@lru_cache(maxsize=4096)
def _symmetric_edges(t0: float, level: int, bins: int) -> np.ndarray:
    """float32 edges of the symmetric histogram anchored at T0 = ``t0`` after ``level`` doublings.

    Level 0: numpy.linspace(-T0, T0, B+1, dtype=float32), the edges numpy.histogram(range=(-T0, T0))
    makes, i.e. onnxruntime's (T0 = 0: numpy's (-0.5, 0.5)). Level l: the even edges of level l-1 in the
    middle (so each new middle bin is exactly two old ones), and linspace(+-T_{l-1}, +-T_l, B/4+1) float32
    outside, T_l = T0 * 2^l. Nested edges make a doubling an exact regrouping of counts."""
    t0 = np.float32(t0)
    if t0 == 0:
        return np.linspace(np.float32(-0.5), np.float32(0.5), bins + 1, dtype=np.float32)
    if level == 0:
        edges = np.linspace(-t0, t0, bins + 1, dtype=np.float32)
    else:
        inner = _symmetric_edges(float(t0), level - 1, bins)
        t_old = np.float32(float(t0) * 2.0 ** (level - 1))  # exact: a float32 times a power of two
        t_new = np.float32(float(t0) * 2.0 ** level)
        below = np.linspace(-t_new, -t_old, bins // 4 + 1, dtype=np.float32)[:-1]
        above = np.linspace(t_old, t_new, bins // 4 + 1, dtype=np.float32)[1:]
        edges = np.concatenate([below, inner[::2], above])
    edges.flags.writeable = False
    return edges


class _SymmetricHistogram:
    """onnxruntime's entropy histogram, streaming: B bins over [-T, T] per channel, numpy.histogram's
    binning rule (bin k = [e_k, e_k+1), the last bin closed) on float32 edges.

    Anchor: T0 = max|x| of the channel's first batch with a nonzero value (before it, zeros are counted in
    the bin that starts at 0, bin B/2, which holds 0 under any anchor). Level 0 has onnxruntime's edges
    for T = T0. A batch beyond T doubles T (level + 1): the new edges nest the old ones
    (``_symmetric_edges``), old bin pairs become the middle half of the new bins, and the values equal to
    the old T (counted apart, ``top``: they were in the closed last bin) move to the bin that now starts at
    that edge. So at any time the counts are the histogram of all the channel's data on the current edges,
    whatever the order of the batches: for a given T0 the result depends on the data only, and merges of
    parts that share T0 are exact (``spawn`` gives a part T0). onnxruntime itself appends bins of the old
    width instead of doubling, so after growth the histograms differ (see EntropyObserver).
    """

    def __init__(self, bins: int):
        if bins < 4 or bins % 4:
            raise ObserverError(f"histogram bins must be a positive multiple of 4, got {bins}")
        self.bins = bins
        self.counts = None

    def _allocate(self, n_ch):
        self.counts = np.zeros((n_ch, self.bins), dtype=np.int64)
        self.t0 = np.zeros(n_ch, dtype=np.float32)  # 0: no anchor yet
        self.level = np.zeros(n_ch, dtype=np.int64)
        self.top = np.zeros(n_ch, dtype=np.int64)   # values equal to T (in the closed last bin)
        self.ready = np.zeros(n_ch, dtype=bool)      # has seen data
        self.min = np.full(n_ch, np.inf, dtype=np.float32)
        self.max = np.full(n_ch, -np.inf, dtype=np.float32)

    def threshold(self, c: int) -> np.float32:
        """T of channel c: T0 * 2^level in float32 (0.5 while only zeros were seen, as numpy's range)."""
        if self.t0[c] == 0:
            return np.float32(0.5)
        return np.float32(float(self.t0[c]) * 2.0 ** int(self.level[c]))  # = T0 doubled level times

    @property
    def hi(self) -> np.ndarray:
        return np.array([float(self.threshold(c)) for c in range(len(self.t0))])

    @property
    def lo(self) -> np.ndarray:
        return -self.hi

    def edges(self, c: int) -> np.ndarray:
        return _symmetric_edges(float(self.t0[c]), int(self.level[c]), self.bins)

    def _grow_to(self, c: int, amax) -> None:
        """Anchor channel c at ``amax`` if it has no anchor, else double T until it covers ``amax``."""
        if self.t0[c] == 0:
            if amax > 0:
                self.t0[c] = amax  # the zeros seen so far stay in bin B/2, which starts at 0 for any T
            return
        b = self.bins
        while self.threshold(c) < amax:
            merged = _pairs_merged(self.counts[c])
            self.counts[c] = 0
            self.counts[c, b // 4: b // 4 + b // 2] = merged
            # values equal to the old T were in its closed last bin; the new bin starting at T holds them
            self.counts[c, 3 * b // 4 - 1] -= self.top[c]
            self.counts[c, 3 * b // 4] += self.top[c]
            self.top[c] = 0
            self.level[c] += 1

    def add(self, x3):
        if self.counts is None:
            self._allocate(x3.shape[1])
        lo, hi = channel_min_max(x3)
        self.min = np.minimum(self.min, lo)
        self.max = np.maximum(self.max, hi)
        self.ready[:] = True
        amax = np.maximum(np.abs(lo), np.abs(hi))
        for c in range(x3.shape[1]):
            self._grow_to(c, amax[c])
        edges = np.stack([self.edges(c) for c in range(x3.shape[1])])
        self.top += edge_histogram(x3, edges, self.counts)

    def adopt_anchor(self, other: "_SymmetricHistogram") -> None:
        """Take ``other``'s anchors T0 (this histogram must be empty)."""
        self._allocate(len(other.t0))
        self.t0[:] = other.t0

    def merge(self, other: "_SymmetricHistogram"):
        """Channels with the same T0 (or with only zeros on one side): exact, the lower level is doubled up
        to the higher and the counts added. Different anchors: this histogram grows to cover the other's
        range and each of the other's bins goes whole into the bin holding its centre (counts preserved;
        a value moves by at most one bin): not exact, see ``EntropyObserver``."""
        if self.counts is None:
            self._allocate(len(other.t0))
        b = self.bins
        for c in np.flatnonzero(other.ready):
            theirs, their_top = other.counts[c].copy(), int(other.top[c])
            if other.t0[c] == 0 or self.t0[c] == 0 or self.t0[c] == other.t0[c]:
                if self.t0[c] == 0:
                    self.t0[c] = other.t0[c]  # only zeros here (bin B/2): adopt the other's anchor
                level = int(other.level[c])
                if other.t0[c] != 0:
                    self._grow_to(c, other.threshold(c))
                    while level < self.level[c]:  # the other part doubled up to this level, exactly
                        merged = _pairs_merged(theirs)
                        theirs[:] = 0
                        theirs[b // 4: b // 4 + b // 2] = merged
                        theirs[3 * b // 4 - 1] -= their_top
                        theirs[3 * b // 4] += their_top
                        their_top = 0
                        level += 1
                self.counts[c] += theirs
                self.top[c] += their_top
            else:
                self._grow_to(c, other.threshold(c))
                mine = self.edges(c).astype(np.float64)
                edges = other.edges(c).astype(np.float64)
                k = np.searchsorted(mine, (edges[:-1] + edges[1:]) / 2, side="right") - 1
                np.add.at(self.counts[c], np.clip(k, 0, b - 1), theirs)
        self.ready |= other.ready
        self.min = np.minimum(self.min, other.min)
        self.max = np.maximum(self.max, other.max)


class _HistogramObserver(Observer):
    """Shared plumbing of the histogram-based observers."""

    _histogram = _LatticeHistogram

    def __init__(self, axis: int | None = None, bins: int = 2048):
        super().__init__(axis)
        self.hist = self._histogram(int(bins))

    def _options(self):
        return {"bins": self.hist.bins}

    def _update(self, x3):
        self.hist.add(x3)

    def _merge(self, other):
        self.hist.merge(other.hist)

    def _range(self, bitwidth, symmetric, strict_symmetric, unsigned_symmetric):
        pairs = [self._channel_range(c, bitwidth, symmetric, strict_symmetric, unsigned_symmetric)
                 for c in range(self.channels)]
        return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


# ============================================================================ percentile
class PercentileObserver(_HistogramObserver):
    """``min`` = value below which (100-p)% of the data lie, ``max`` = value below which p% lie, read
    from the histogram with linear interpolation inside a bin (error below one bin width), and clipped
    to the observed min and max. ``p = 100`` gives the exact min and max (AIMET's default percentile
    analyzer reduces to that). Histogram: 2048 bins of a power-of-two lattice (``_LatticeHistogram``): the
    data span between 1024 and 2048 of them, and the counts depend on the data only (not their order), so
    merges are exact."""

    scheme = "percentile"

    def __init__(self, axis: int | None = None, percentile: float = 99.99, bins: int = 2048):
        super().__init__(axis, bins)
        if not 50 < percentile <= 100:
            raise ObserverError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = float(percentile)

    def _options(self):
        return {"bins": self.hist.bins, "percentile": self.percentile}

    def _channel_range(self, c, bitwidth, symmetric, strict_symmetric, unsigned_symmetric):
        h = self.hist
        vmin, vmax = float(h.min[c]), float(h.max[c])
        if self.percentile >= 100:
            return vmin, vmax
        counts = h.counts[c]
        cum = np.cumsum(counts)
        total = cum[-1]
        lo_edge, width = h.lo[c], (h.hi[c] - h.lo[c]) / h.bins

        def value_at(rank):  # the bin where the cumulative count reaches rank, interpolated
            k = int(np.searchsorted(cum, rank, side="left"))
            before = cum[k - 1] if k else 0
            return lo_edge + width * (k + (rank - before) / counts[k])

        q = self.percentile / 100.0
        low = value_at((1.0 - q) * total)
        high = value_at(q * total)
        return min(max(low, vmin), vmax), min(max(high, vmin), vmax)


# ============================================================================ mse
def _sawtooth_integral(y, n):
    """E(y) = integral from 0 to y of e(t)^2 dt, in grid units, where e(t) = t - clamp(round(t), 0, n)
    is the error of a grid with points 0..n (rounding inside, clipping outside):
    E = (m - 1/2)/12 + (r^3 + 1/8)/3 with m = clamp(round(y), 0, n), r = y - m."""
    m = np.clip(np.floor(y + 0.5), 0, n)
    r = y - m
    return (m - 0.5) / 12.0 + (r ** 3 + 0.125) / 3.0


def expected_mse(counts, lo_edges, hi_edges, scale, offset, steps):
    """Expected squared error of quantize-dequantize on a histogram, values uniform inside each bin:
    sum_k count_k * scale^2 * (E(b_k) - E(a_k)) / (b_k - a_k), with a, b the bin's ends in grid units
    ``x/scale - offset``. ``scale``, ``offset``: arrays of candidates (n,); returns (n,) sums."""
    s = np.asarray(scale, dtype=np.float64)[:, None]
    o = np.asarray(offset, dtype=np.float64)[:, None]
    ya = lo_edges[None, :] / s - o
    yb = hi_edges[None, :] / s - o
    width = yb - ya
    wide = width > 1e-9
    mean = np.where(wide, (_sawtooth_integral(yb, steps) - _sawtooth_integral(ya, steps))
                    / np.where(wide, width, 1.0), 0.0)
    point = ya - np.clip(np.floor(ya + 0.5), 0, steps)  # a bin squeezed to a point: e(y)^2
    mean = np.where(wide, mean, point ** 2)
    return (s[:, 0] ** 2) * (mean * counts[None, :]).sum(axis=1)


class MseObserver(_HistogramObserver):
    """The grid that minimizes the expected quantization MSE (clipping + rounding) of the data.

    Candidates: ranges ``(k/n * min, k/n * max)``, k = 1..n (n = ``num_candidates``, default 100) of
    the observed [min, max], each turned into a grid by ``encoding.from_min_max`` with the requested
    bitwidth and symmetry; the cost of a grid is ``expected_mse`` on the histogram (2048 bins of a
    power-of-two lattice as for "percentile", each bin cut to the observed [min, max] and assumed
    uniform). The first lowest cost wins. Merges are exact (the histogram does not depend on data order).
    Returns that grid's range ``(scale*offset, scale*(offset+steps))``.
    """

    scheme = "mse"

    def __init__(self, axis: int | None = None, bins: int = 2048, num_candidates: int = 100):
        super().__init__(axis, bins)
        if num_candidates < 1:
            raise ObserverError(f"num_candidates must be >= 1, got {num_candidates}")
        self.num_candidates = int(num_candidates)

    def _options(self):
        return {"bins": self.hist.bins, "num_candidates": self.num_candidates}

    def _channel_range(self, c, bitwidth, symmetric, strict_symmetric, unsigned_symmetric):
        h = self.hist
        vmin, vmax = float(h.min[c]), float(h.max[c])
        edges = h.edges(c)
        used = h.counts[c] > 0
        a = np.clip(edges[:-1][used], vmin, vmax)  # no mass beyond the observed extremes
        b = np.clip(edges[1:][used], vmin, vmax)
        f = np.arange(1, self.num_candidates + 1) / self.num_candidates
        enc = from_min_max(f * vmin, f * vmax, bitwidth, symmetric, strict_symmetric, unsigned_symmetric)
        cost = expected_mse(h.counts[c][used].astype(np.float64), a, b, enc.scale, enc.offset, enc.steps)
        k = int(np.argmin(cost))
        scale, offset = float(enc.scale[k]), float(enc.offset[k])
        return scale * offset, scale * (offset + enc.steps)


# ============================================================================ entropy
def _smooth(p: np.ndarray):
    """onnxruntime's smooth_distribution (eps = 1e-4), in float32: zeros become eps, and the nonzero
    entries give up the same total. None when every entry is zero."""
    is_zero = (p == 0).astype(np.float32)
    is_nonzero = (p != 0).astype(np.float32)
    n_zero = is_zero.sum()
    n_nonzero = p.size - n_zero
    if not n_nonzero:
        return None
    eps1 = 0.0001 * float(n_zero) / float(n_nonzero)
    out = p.astype(np.float32)
    out += 0.0001 * is_zero + (-eps1) * is_nonzero
    return out


def _kl_divergence(p: np.ndarray, q: np.ndarray) -> np.float32:
    """sum p*log(p/q) of the normalised float32 distributions (onnxruntime's ``entropy``)."""
    p = p / np.sum(p, axis=0, keepdims=True)
    q = q / np.sum(q, axis=0, keepdims=True)
    terms = p * np.log(p / q)
    terms[~((p > 0) & (q > 0))] = np.inf
    terms[(p == 0) & (q >= 0)] = 0
    return np.float32(np.sum(terms, axis=0))


def entropy_threshold(hist: np.ndarray, edges: np.ndarray, quantized_bins: int = 128) -> tuple[int, int]:
    """onnxruntime's KL threshold search (calibrate.py HistogramCollector.get_entropy_threshold) on a
    symmetric histogram. For i = quantized_bins/2 .. B/2 the window is bins [B/2 - i, B/2 + i]:
    p = the window with the outliers on each side added to its end bins; q = the window merged into
    ``quantized_bins`` groups of ``len // quantized_bins`` bins (the remainder joins the last group),
    each group's sum spread evenly (truncated to an integer) over all its positions when any of p's is
    nonzero, remainder positions 0. Both are smoothed; the window with the least KL(p || q) wins.
    Returns the window's edge indices (start, end): the range is (edges[start], edges[end])."""
    n_bins = hist.size
    zero = n_bins // 2
    half = quantized_bins // 2
    best, best_kl = None, None
    for i in range(half, zero + 1):
        start, end = zero - i, min(zero + i + 1, n_bins)
        window = hist[start:end]
        p = window.copy()
        p[0] += hist[:start].sum()
        p[-1] += hist[end:].sum()
        group = window.size // quantized_bins
        used = group * quantized_bins
        sums = window[:used].reshape(quantized_bins, group).sum(axis=1)
        sums[-1] += window[used:].sum()
        nonzero = (p[:used] != 0).reshape(quantized_bins, group).sum(axis=1)
        spread = np.zeros(quantized_bins, dtype=np.int64)
        spread[nonzero > 0] = (sums[nonzero > 0] / nonzero[nonzero > 0]).astype(np.int64)
        q = np.zeros(p.size, dtype=np.int64)
        q[:used] = np.repeat(spread, group)
        ps, qs = _smooth(p), _smooth(q)
        kl = np.float32(np.inf) if ps is None or qs is None else _kl_divergence(ps, qs)
        if best_kl is None or kl < best_kl:  # argmin: the first of equal values
            best, best_kl = (start, end), kl
    return best


class EntropyObserver(_HistogramObserver):
    """KL-divergence calibration exactly as onnxruntime's EntropyCalibrater computes it
    (``HistogramCollector`` "entropy"): a signed histogram over [-T, T] (T = max|x| of the first batch,
    B = 2048 bins here, float32 edges), the threshold window of least KL divergence between the clipped
    distribution and its ``quantized_bins`` (128)-level version (see ``entropy_threshold``), then
    ``min = max(edges[start], observed min)``, ``max = min(edges[end], observed max)``. The window is
    bins [B/2 - i, B/2 + i], so the range is (-i*w, (i+1)*w): one bin wider on the positive side, as in
    onnxruntime; non-negative data gives (observed min, t).

    Identical to onnxruntime on the same histogram, i.e. while no batch exceeds the first batch's max|x|
    (onnxruntime's calibrator bins all batches at once, with T = max|x| of all of them). When the range
    grows this observer doubles T (fixed memory) where onnxruntime appends bins of the old width.

    Streaming and merging (``_SymmetricHistogram``): with the anchor T0 (the first batch's max|x|) fixed,
    the histogram is that of all the data on edges that depend only on T0 and the overall max|x|, not
    on the order of the batches. So parts of the data calibrated separately merge exactly into what one
    observer of all of it holds, provided every part has the same T0: give the parts observers made by
    ``spawn()`` from an observer that has seen the stream's first batch (and count that batch in one
    part only). Parts anchored on their own first batches merge by re-binning, which keeps every count
    but can move a value by one bin.

    The threshold search is ``entropy_threshold`` done by Numba kernels
    (``refquant.kernels.histogram.entropy_window``), equal to it bit for bit.
    """

    scheme = "entropy"
    _histogram = _SymmetricHistogram

    def __init__(self, axis: int | None = None, bins: int = 2048, quantized_bins: int = 128):
        super().__init__(axis, bins)
        if quantized_bins < 2 or quantized_bins > bins:
            raise ObserverError(f"quantized_bins must be in 2..bins ({bins}), got {quantized_bins}")
        self.quantized_bins = int(quantized_bins)

    def _options(self):
        return {"bins": self.hist.bins, "quantized_bins": self.quantized_bins}

    def _adopt_anchor(self, other):
        if other.hist.counts is not None:
            self.hist.adopt_anchor(other.hist)

    def _channel_range(self, c, bitwidth, symmetric, strict_symmetric, unsigned_symmetric):
        h = self.hist
        edges = h.edges(c)
        start, end = entropy_window(h.counts[c], self.quantized_bins)
        lo, hi = edges[start], edges[end]
        lo = h.min[c] if lo < h.min[c] else lo
        hi = h.max[c] if hi > h.max[c] else hi
        return float(lo), float(hi)
