"""Requantization: integer accumulators -> quantized integers, with the target's arithmetic as a parameter.

One entry point, :func:`requantize`, and one scheme per arithmetic a target is known to use. Every
scheme maps an exact integer accumulator ``acc`` (sum of products plus bias) and a real multiplier
``M ~ s_in * s_w / s_out`` to ``q = clamp(R(acc * M) + zp, qmin, qmax)``; they differ in how ``M`` is
represented and in the rounding ``R``:

``ort``            onnxruntime MLAS (QLinearConv, QLinearMatMul, QGemm, fused QDQ; x86 and ARM alike)::

                       M  = f32(f32(s_in * s_w[c]) / s_out)          (:func:`ort_multiplier`)
                       f  = f32(i32(acc)) * M                        (float32 multiply; int32 -> float32 is
                                                                      itself rounded when |acc| > 2^24)
                       f  = min(max(f, f32(qmin - zp)), f32(qmax - zp))
                       q  = round_half_even(f) + zp                  (cvtps2dq under the default MXCSR)

``onnx_reference`` ``onnx.reference`` QLinearConv/QLinearMatMul::

                       M  = s_in * s_w / s_out in the scales' own dtype (float32, or float16)
                       r  = f64(acc) * f64(M) + zp                   (NumPy promotes int32 * float32 to float64)
                       q  = round_half_even(clip(r, qmin, qmax))      (the zero point is added *before* rounding)

``tflite_double``  TFLite's default build (gemmlowp, ARM ``vqrdmulh`` + ``vrshl``)::

                       (M0, shift) = quantize_multiplier(f64(s_in) * f64(s_w) / f64(s_out))
                       x  = wrap_i32(acc * 2^max(shift, 0))
                       y  = RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(x, M0), max(-shift, 0))
                       q  = clamp(y + zp, qmin, qmax)
                     SRDHM(a, b) = trunc_div(a*b + (a*b >= 0 ? 2^30 : 1 - 2^30), 2^31)
                                   (INT32_MAX if a == b == INT32_MIN; negative ties go toward zero);
                     RDBPOT(x, e) = (x >> e) + ((x & (2^e - 1)) > ((2^e - 1) >> 1) + (x < 0)): round half away
                     from zero. Two roundings: a result can differ from round(acc * M) on non-ties too.

``tflite_single``  ``TFLITE_SINGLE_ROUNDING`` (TFLM, CMSIS-NN, Cadence HiFi)::

                       (M0, shift) = quantize_multiplier(real, single_rounding=True)   (shift <= 30)
                       y  = (acc * M0 + 2^(30 - shift)) >> (31 - shift)  (int64, arithmetic shift: half up)
                       q  = clamp(y + zp, qmin, qmax)

``exact``          rational arithmetic, for diagnosis (:func:`exact`)::

                       y  = R(acc * M) with M an exact Fraction and R in {half_even, half_up, half_away}
                       q  = clamp(y + zp, qmin, qmax)
                     LiteRT's reference int8 FULLY_CONNECTED (BUILTIN_REF) is ``exact(half_away)`` up to float64
                     rounding: ``q = clamp(i32(round(f64(acc) * (f64(s_in) * f64(s_w[c]) / f64(s_out)))) + zp)``
                     with C ``round`` (half away from zero); the two differ only where ``acc * M`` is within
                     float64 rounding of a tie without being one (tests/test_litert_fully_connected.py). Its
                     reference CONV_2D is ``tflite_double``; its default (XNNPACK) kernels are ``ort``.

``quantize_multiplier(real)`` is tflite::QuantizeMultiplier: ``q, shift = frexp(real)`` (q in [0.5, 1)),
``M0 = round_half_away(q * 2^31)``; ``M0 == 2^31`` -> ``M0 /= 2, shift += 1``; ``shift < -31`` -> (0, 0);
with single rounding ``shift > 30`` saturates to ``(2^31 - 1, 30)``.

Everything is vectorized NumPy on int64 (fixed point) or float32/float64 (ort, onnx_reference); the exact
scheme is vectorized int64 arithmetic on numerators and denominators while they fit, and falls back to
Python integers only for the elements whose float64 estimate lies within rounding error of a tie.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

F32 = np.float32
SCHEMES = ("ort", "onnx_reference", "tflite_double", "tflite_single", "exact")
ROUNDINGS = ("half_even", "half_up", "half_away")
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1

_RANGE_DTYPES = {(0, 255): np.uint8, (-128, 127): np.int8, (0, 65535): np.uint16, (-32768, 32767): np.int16}


@dataclass(frozen=True)
class Scheme:
    """A requantization scheme: ``name`` in SCHEMES; ``rounding`` matters for ``exact`` only."""

    name: str
    rounding: str = "half_even"

    def __post_init__(self):
        if self.name not in SCHEMES:
            raise ValueError(f"unknown requantization scheme {self.name!r}; choose one of {SCHEMES}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"unknown rounding {self.rounding!r}; choose one of {ROUNDINGS}")

    def __str__(self):
        return f"exact({self.rounding})" if self.name == "exact" else self.name


def exact(rounding: str = "half_even") -> Scheme:
    """The rational scheme: ``q = clamp(R(acc * M) + zp)``, R = half_even | half_up (toward +inf) | half_away."""
    return Scheme("exact", rounding)


def as_scheme(scheme, rounding: str | None = None) -> Scheme:
    """A Scheme from a Scheme, a name ("ort", ..., "exact") or "exact(half_up)"-style text."""
    if isinstance(scheme, Scheme):
        return scheme if rounding is None else Scheme(scheme.name, rounding)
    text = str(scheme).strip()
    if text.startswith("exact(") and text.endswith(")"):
        return Scheme("exact", text[6:-1].strip().strip("'\"") or "half_even")
    return Scheme(text, rounding or "half_even")


# ----------------------------------------------------------------------------------------- multipliers
def ort_multiplier(x_scale, w_scale, y_scale) -> np.ndarray:
    """onnxruntime's output scale: ``f32(f32(x_scale * w_scale[i]) / y_scale)``, left to right in float32
    (QLinearConv ComputeOutputScale, QLinearMatMul). Shapes broadcast; the result is float32."""
    xs = np.asarray(x_scale, dtype=F32)
    ws = np.asarray(w_scale, dtype=F32)
    ys = np.asarray(y_scale, dtype=F32)
    return ((xs * ws).astype(F32) / ys).astype(F32)


def tflite_multiplier(x_scale, w_scale, y_scale) -> np.ndarray:
    """TFLite's effective scale: ``f64(x_scale) * f64(w_scale) / f64(y_scale)`` (kernel_util.cc)."""
    return (np.asarray(x_scale, np.float64) * np.asarray(w_scale, np.float64)) / np.asarray(y_scale, np.float64)


def exact_multiplier(x_scale, w_scale, y_scale):
    """The exact rational ``x_scale * w_scale / y_scale`` of the given (float) scale values: a Fraction,
    or an object array of Fractions when a scale is an array."""
    xs, ws, ys = (np.asarray(v) for v in (x_scale, w_scale, y_scale))
    shape = np.broadcast_shapes(xs.shape, ws.shape, ys.shape)
    xb, wb, yb = (np.broadcast_to(v, shape).reshape(-1) for v in (xs, ws, ys))
    out = [Fraction(float(a)) * Fraction(float(b)) / Fraction(float(c)) for a, b, c in zip(xb, wb, yb)]
    if not shape:
        return out[0]
    arr = np.empty(len(out), dtype=object)
    arr[:] = out
    return arr.reshape(shape)


def quantize_multiplier(real, single_rounding: bool = False):
    """tflite::QuantizeMultiplier: ``real ~ M0 * 2^(shift - 31)`` with M0 an int32 in [2^30, 2^31).

    ``q, shift = frexp(real)``; ``M0 = round_half_away(q * 2^31)``; ``M0 == 2^31`` -> ``(2^30, shift + 1)``;
    ``shift < -31`` -> ``(0, 0)``; with ``single_rounding`` a shift above 30 saturates to ``(2^31 - 1, 30)``.
    A scalar gives ``(int, int)``; an array gives two int32 arrays of its shape.
    """
    arr = np.asarray(real, dtype=np.float64)
    q, shift = np.frexp(arr)
    shift = shift.astype(np.int64)
    scaled = q * float(1 << 31)  # exact: a power-of-two scaling
    fixed = (np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)).astype(np.int64)  # std::round
    top = fixed == (1 << 31)
    fixed = np.where(top, fixed // 2, fixed)
    shift = np.where(top, shift + 1, shift)
    tiny = shift < -31
    fixed = np.where(tiny, 0, fixed)
    shift = np.where(tiny, 0, shift)
    if single_rounding:
        big = shift > 30
        fixed = np.where(big, (1 << 31) - 1, fixed)
        shift = np.where(big, 30, shift)
    if arr.ndim == 0:
        return int(fixed), int(shift)
    return fixed.astype(np.int32), shift.astype(np.int32)


def saturating_rounding_doubling_high_mul(a, b) -> np.ndarray:
    """gemmlowp SRDHM on int32 values held in int64: ``trunc((a*b + nudge) / 2^31)``, nudge = 2^30 or 1 - 2^30."""
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    ab = a * b
    s = ab + np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    q = np.where(s >= 0, s >> 31, -((-s) >> 31))  # C++ division truncates toward zero
    return np.where((a == b) & (a == INT32_MIN), INT32_MAX, q)


def rounding_divide_by_pot(x, exponent) -> np.ndarray:
    """gemmlowp RoundingDivideByPOT: ``x / 2^exponent`` rounded half away from zero (0 <= exponent <= 31)."""
    x = np.asarray(x, dtype=np.int64)
    exponent = np.asarray(exponent, dtype=np.int64)
    mask = (np.int64(1) << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> exponent) + (remainder > threshold)


def multiply_by_quantized_multiplier(x, multiplier, shift, single_rounding: bool = False) -> np.ndarray:
    """tflite::MultiplyByQuantizedMultiplier on int32 values (held in int64); arrays broadcast.

    double rounding: ``RDBPOT(SRDHM(wrap_i32(x * 2^max(shift,0)), M0), max(-shift,0))``;
    single rounding: ``(x * M0 + 2^(30 - shift)) >> (31 - shift)``.
    """
    x = np.asarray(x, dtype=np.int64)
    multiplier = np.asarray(multiplier, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    if single_rounding:
        if np.any(shift > 30) or np.any(shift < -31):
            raise ValueError("single-rounding MultiplyByQuantizedMultiplier needs -31 <= shift <= 30")
        total = 31 - shift
        return (x * multiplier + (np.int64(1) << (total - 1))) >> total
    if np.any(shift > 30):
        raise ValueError("MultiplyByQuantizedMultiplier: shift > 30 overflows the int32 left shift")
    left = np.maximum(shift, 0)
    right = np.maximum(-shift, 0)
    shifted = x << left
    shifted = ((shifted - INT32_MIN) & 0xFFFFFFFF) + INT32_MIN  # int32 wrap-around, as on the target
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(shifted, multiplier), right)


# ----------------------------------------------------------------------------------------- requantize
def requantize(acc, multiplier_real, zero_point=0, qmin: int = -128, qmax: int = 127, scheme="ort",
               axis: int | None = None, *, rounding: str | None = None, dtype=None) -> np.ndarray:
    """``q = clamp(R(acc * multiplier) + zero_point, qmin, qmax)`` with the arithmetic of ``scheme``.

    acc: integer array (int32/int64) of exact accumulators (bias included).
    multiplier_real: scalar or array. ``ort`` multiplies by its float32 value (pass :func:`ort_multiplier`);
      ``onnx_reference`` uses its value in its own dtype (float32/float16 scale products); ``tflite_*``
      convert its float64 value with :func:`quantize_multiplier`; ``exact`` uses it as an exact rational
      (a float is taken exactly; Fractions, or an object array of them, are accepted).
    zero_point: scalar or array (per channel, like the multiplier).
    axis: when given, a 1-D multiplier / zero point of length C runs along ``acc``'s dimension ``axis``;
      otherwise they broadcast against ``acc`` as NumPy arrays do.
    scheme: a name in SCHEMES, a :class:`Scheme` (``exact("half_up")``) or text such as "exact(half_away)";
      ``rounding`` overrides the exact scheme's rounding.
    dtype: output dtype; default uint8/int8/uint16/int16 when (qmin, qmax) is that type's range, else int32.
    """
    sch = as_scheme(scheme, rounding)
    acc = np.asarray(acc)
    if acc.dtype.kind not in "iu":
        raise TypeError(f"requantize: acc must be an integer array, got {acc.dtype}")
    mult = _along(multiplier_real, acc.ndim, axis)
    zp = _along(np.asarray(zero_point, dtype=np.int64), acc.ndim, axis)
    qmin, qmax = int(qmin), int(qmax)
    if sch.name == "ort":
        y = _ort(acc, mult, zp, qmin, qmax)
    elif sch.name == "onnx_reference":
        y = _onnx_reference(acc, mult, zp, qmin, qmax)
    elif sch.name in ("tflite_double", "tflite_single"):
        single = sch.name == "tflite_single"
        acc = _check_int32(acc, sch.name)
        m0, shift = quantize_multiplier(np.asarray(mult, dtype=np.float64), single_rounding=single)
        y = multiply_by_quantized_multiplier(acc.astype(np.int64), m0, shift, single_rounding=single)
        y = np.clip(y + zp, qmin, qmax)
    else:
        y = np.clip(_exact_round(acc.astype(np.int64), mult, sch.rounding) + zp, qmin, qmax)
    out = np.dtype(dtype) if dtype is not None else np.dtype(_RANGE_DTYPES.get((qmin, qmax), np.int32))
    if qmin < np.iinfo(out).min or qmax > np.iinfo(out).max:
        out = np.dtype(np.int64)
    return np.asarray(y).astype(out)


def _along(value, ndim: int, axis: int | None):
    """A per-channel 1-D array reshaped to run along ``axis`` of an ndim array (object arrays too)."""
    if isinstance(value, Fraction):
        return value
    arr = np.asarray(value)
    if axis is None or arr.ndim == 0 or arr.size == 1:
        return arr.reshape(()) if arr.size == 1 and axis is not None else arr
    if arr.ndim != 1:
        raise ValueError(f"requantize: a per-channel parameter must be 1-D along axis {axis}, got shape {arr.shape}")
    axis %= ndim
    return arr.reshape((1,) * axis + (-1,) + (1,) * (ndim - axis - 1))


_wrap = threading.local()


class int32_wraparound:
    """Context manager for a target whose int32 accumulators wrap around (two's complement, modulo 2^32: the
    int32 adds of onnxruntime's MLAS kernels and of C targets): inside it an accumulator that leaves int32
    wraps instead of raising OverflowError, and every wrap is recorded in ``events`` as (where, exact low,
    exact high) for the caller to report. Per thread (the integer kernels check in the calling thread)."""

    def __enter__(self):
        self._saved = getattr(_wrap, "events", None)
        self.events: list[tuple[str, int, int]] = []
        _wrap.events = self.events
        return self

    def __exit__(self, *exc):
        _wrap.events = self._saved
        return False


def int32_or_wrap(acc, where: str, message: str) -> np.ndarray:
    """``acc`` (exact integers) as int32: unchanged when it fits; wrapped modulo 2^32 inside
    :class:`int32_wraparound` (recorded); otherwise OverflowError(``message``)."""
    acc = np.asarray(acc)
    if not acc.size:
        return acc.astype(np.int32)
    low, high = int(acc.min()), int(acc.max())
    if INT32_MIN <= low and high <= INT32_MAX:
        return acc.astype(np.int32)
    events = getattr(_wrap, "events", None)
    if events is None:
        raise OverflowError(message.format(low=low, high=high))
    events.append((where, low, high))
    return ((acc.astype(np.int64) - INT32_MIN) % (1 << 32) + INT32_MIN).astype(np.int32)


def _check_int32(acc, name):
    """The accumulator as the target holds it: int32 (wrapped inside int32_wraparound), or OverflowError."""
    if acc.size and (acc.dtype.itemsize > 4 or acc.dtype == np.uint32):
        return int32_or_wrap(acc, f"requantize ({name})", f"requantize ({name}): accumulator range [{{low}}, "
                             "{high}] exceeds int32; the target accumulates in int32")
    return acc


def _ort(acc, mult, zp, qmin, qmax):
    acc = _check_int32(acc, "ort")
    m = np.asarray(mult, dtype=F32)
    f = acc.astype(np.int32, copy=False).astype(F32) * m  # float32 product (both operands float32)
    low = (qmin - zp).astype(F32)
    high = (qmax - zp).astype(F32)
    f = np.minimum(np.maximum(f, low), high)
    return np.rint(f).astype(np.int64) + zp


def _onnx_reference(acc, mult, zp, qmin, qmax):
    acc = _check_int32(acc, "onnx_reference")  # the reference casts to int32: a wider accumulator would wrap
    m = np.asarray(mult)
    if m.dtype.kind != "f":
        m = m.astype(np.float64)
    r = acc.astype(np.int32, copy=False).astype(np.float64) * m.astype(np.float64)
    r = r + zp.astype(np.float64)
    return np.round(np.clip(r, qmin, qmax)).astype(np.int64)


# ----------------------------------------------------------------------------------------- exact
def _fraction_parts(mult):
    """(numerators, denominators) of exact multipliers as object arrays of Python ints (broadcastable)."""
    if isinstance(mult, Fraction):
        return np.array(mult.numerator, dtype=object), np.array(mult.denominator, dtype=object)
    arr = np.asarray(mult)
    flat = arr.reshape(-1)
    fr = [v if isinstance(v, Fraction) else Fraction(v) if isinstance(v, int) else Fraction(float(v))
          for v in flat.tolist()]
    num = np.empty(len(fr), dtype=object)
    den = np.empty(len(fr), dtype=object)
    num[:] = [f.numerator for f in fr]
    den[:] = [f.denominator for f in fr]
    return num.reshape(arr.shape), den.reshape(arr.shape)


def _round_from_parts(q, twice_r, den, negative, rounding):
    """floor quotient q and 2*remainder (0 <= 2r < 2*den): nearest integer with the tie rule."""
    up = twice_r > den
    tie = twice_r == den
    if rounding == "half_even":
        up = up | (tie & (q % 2 != 0))
    elif rounding == "half_up":
        up = up | tie
    else:  # half_away: a tie rounds up for positive values, stays at floor for negative ones
        up = up | (tie & ~negative)
    return q + up


def _round_int(p: int, d: int, rounding: str) -> int:
    """round(p / d) for Python ints, d > 0, with the tie rule."""
    q, r = divmod(p, d)
    if 2 * r > d or 2 * r == d and (rounding == "half_up" or rounding == "half_even" and q % 2
                                     or rounding == "half_away" and p > 0):
        return q + 1
    return q


def _exact_round(acc, mult, rounding):
    num, den = _fraction_parts(mult)
    if np.any(den <= 0):
        raise ValueError("requantize (exact): a multiplier has a non-positive denominator")
    max_acc = int(np.abs(acc).max()) if acc.size else 0
    max_num = max((abs(int(v)) for v in num.reshape(-1)), default=0)
    max_den = max((int(v) for v in den.reshape(-1)), default=1)
    if max_acc * max_num < (1 << 62) and max_num < (1 << 62) and max_den < (1 << 61):
        n64 = num.astype(np.int64)
        d64 = den.astype(np.int64)
        product = acc * n64
        q = np.floor_divide(product, d64)
        r = product - q * d64
        return _round_from_parts(q, 2 * r, d64, product < 0, rounding).astype(np.int64)
    # big numbers: a float64 estimate decides every element not within rounding error of a tie;
    # the few others are done with Python integers
    m64 = np.vectorize(lambda n, d: float(Fraction(int(n), int(d))), otypes=[np.float64])(num, den)
    t = acc.astype(np.float64) * m64
    result = np.rint(t)
    near = np.abs(t - np.floor(t) - 0.5) <= np.abs(t) * 2.0 ** -48 + 2.0 ** -60
    near |= np.abs(acc) >= (1 << 52)
    if near.any():
        shape = np.broadcast_shapes(acc.shape, np.shape(num))
        acc_b = np.broadcast_to(acc, shape)
        num_b = np.broadcast_to(num, shape)
        den_b = np.broadcast_to(den, shape)
        result = np.broadcast_to(result, shape).copy()
        for index in zip(*np.nonzero(np.broadcast_to(near, shape))):
            p = int(acc_b[index]) * int(num_b[index])
            d = int(den_b[index])
            result[index] = float(min(max(_round_int(p, d, rounding), -(1 << 62)), 1 << 62))
    # a huge multiplier can take acc * M past int64: saturate (the caller clamps to [qmin, qmax] anyway)
    return np.clip(result, -2.0 ** 62, 2.0 ** 62).astype(np.int64)
