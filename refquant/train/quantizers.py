"""Quantizers as the gradient engine sees them: quantize-dequantize forward, straight-through backward,
and learned ranges (LSQ / AIMET range learning).

Forward is exactly the simulation's: ``y = quantize_dequantize(x, encoding, rounding)`` (refquant.quant.qdq),
``y = s (q + o)``, ``q = clamp(r - o, 0, n)``, ``r = round(x / s)`` with the sim's rounding, ``n`` the
number of steps, ``s`` the scale and ``o`` the (integer, <= 0) offset of the unsigned grid.

Gradients, per element, with ``m = [0 <= r - o <= n]`` (inside the grid's range):

* input, straight-through estimator (STE): ``dy/dx = m`` (1 inside the range, 0 where clamped);
* scale (LSQ, Esser et al. 2020; AIMET's ``grad_scale``): ``dy/ds = (q + o) - m x / s``, i.e.
  ``round(x/s) - x/s`` inside the range (round passed straight through) and the clamped level
  ``o`` or ``o + n`` outside it;
* offset (LSQ+, Bhalgat et al. 2020; AIMET's ``grad_offset``; the offset's rounding passed straight
  through): ``dy/do = s (1 - m)``.

Summed over the elements sharing a scale (the whole tensor, or one channel), these give ``G_s`` and
``G_o``. The trained parameters are those of AIMET's range learning
(``aimet_torch/quantsim_straight_through_grad.py``):

* asymmetric grids: the range ends ``(min, max)``, with ``s = (max - min) / n`` and ``o = min / s``
  (rounded in the forward, as :func:`refquant.quant.encoding.from_min_max` does), so
  ``dL/dmin = -G_s / n + G_o n max / (max - min)^2`` and ``dL/dmax = G_s / n - G_o n min / (max - min)^2``;
* grids with a fixed offset (symmetric, unsigned symmetric): one parameter ``t = s k`` with
  ``k = o + n`` the number of positive steps (``t`` is the range's max, AIMET's ``absmax`` with
  ``s = absmax / floor(n/2)``; ``k = -o`` for a grid without positive steps), so ``dL/dt = G_s / k``.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..errors import RefquantError
from ..quant.encoding import MIN_SCALE, Encoding, from_min_max
from ..quant.qdq import _channel_view, quantize_dequantize


@njit(cache=True)
def _qdq_backward(x, g, scale, offset, steps, half_up, with_range, gx, g_scale, g_offset):
    """One pass over a (outer, channels, inner) view: ``gx = m g`` and, with ``with_range``, the per-channel
    sums ``G_s = sum g ((q + o) - m x/s)`` and ``G_o = s sum g (1 - m)`` (module docstring). ``x / s`` is
    computed in x's precision like the forward kernel; the sums accumulate in float64."""
    for o in range(x.shape[0]):
        for c in range(x.shape[1]):
            s = scale[c]
            off = offset[c]
            acc_s = 0.0
            acc_out = 0.0
            for i in range(x.shape[2]):
                ratio = x[o, c, i] / s
                r = np.floor(ratio + 0.5) if half_up else np.rint(ratio)
                q = r - off
                gi = g[o, c, i]
                if q < 0:
                    gx[o, c, i] = 0
                    acc_s += off * gi
                    acc_out += gi
                elif q > steps:
                    gx[o, c, i] = 0
                    acc_s += (off + steps) * gi
                    acc_out += gi
                else:
                    gx[o, c, i] = gi
                    if with_range:
                        acc_s += (r - ratio) * gi
            if with_range:
                g_scale[c] += acc_s
                g_offset[c] += acc_out * s


def _backward_pass(x, grad, encoding: Encoding, rounding: str, with_range: bool):
    dtype = np.float64 if x.dtype == np.float64 else np.float32
    xv, scale, offset = _channel_view(np.ascontiguousarray(x, dtype=dtype), encoding)
    if dtype == np.float64:
        scale = np.asarray(encoding.scale, dtype=np.float64).reshape(scale.shape) if encoding.block_size is None \
            else scale.astype(np.float64)
        offset = offset.astype(np.float64)
    gv = np.ascontiguousarray(grad, dtype=dtype).reshape(xv.shape)
    gx = np.empty_like(gv)
    g_scale = np.zeros(scale.shape, dtype=np.float64)
    g_offset = np.zeros(scale.shape, dtype=np.float64)
    _qdq_backward(xv, gv, scale, offset, dtype(encoding.steps), rounding == "half_up", with_range, gx, g_scale,
                  g_offset)
    return gx.reshape(x.shape).astype(grad.dtype, copy=False), g_scale, g_offset


def ste_grad(x: np.ndarray, grad: np.ndarray, encoding: Encoding, rounding: str = "half_even") -> np.ndarray:
    """dL/dx by the straight-through estimator: the gradient inside the grid's range, 0 outside."""
    if encoding.kind != "int":
        return grad  # an FP16 cast: identity for the gradient
    return _backward_pass(x, grad, encoding, rounding, False)[0]


def lsq_grads(x: np.ndarray, grad: np.ndarray, encoding: Encoding, rounding: str = "half_even"):
    """``(dL/dx, G_s, G_o)``: STE input gradient and the LSQ/LSQ+ scale and offset gradients summed
    per scale (float64, the shape of ``encoding.scale``)."""
    if encoding.block_size is not None:
        raise RefquantError("range learning of per-block encodings is not supported (per-tensor and "
                            "per-channel are)")
    gx, g_scale, g_offset = _backward_pass(x, grad, encoding, rounding, True)
    shape = np.shape(encoding.scale)
    return gx, g_scale.reshape(shape), g_offset.reshape(shape)


def minmax_grads(g_scale, g_offset, lo, hi, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """AIMET's chain rule from (G_s, G_o) to the range ends of an asymmetric grid (module docstring)."""
    width2 = np.square(hi - lo)
    d_lo = -g_scale / steps + g_offset * steps * hi / width2
    d_hi = g_scale / steps - g_offset * steps * lo / width2
    return d_lo, d_hi


class QDQ:
    """A quantizer with a fixed encoding (set by the trainer between steps): STE backward.

    ``key`` names it (tied tensors share one object); ``encoding`` may be replaced at any time."""

    learnable = False

    def __init__(self, key: str, encoding: Encoding, rounding: str = "half_even"):
        self.key, self.encoding, self.rounding = key, encoding, rounding

    def forward(self, x: np.ndarray):
        encoding = self.encoding
        if encoding is None:
            return x, None
        y = quantize_dequantize(x, encoding, self.rounding).astype(x.dtype, copy=False)
        return y, (x, encoding)

    def backward(self, grad: np.ndarray, saved):
        if saved is None:
            return grad, {}
        x, encoding = saved
        return ste_grad(x, grad, encoding, self.rounding), {}


class LearnedRangeQDQ(QDQ):
    """A quantizer whose range is trained (module docstring): parameters ``{"min", "max"}`` for an
    asymmetric grid, ``{"max"}`` (the range's larger end ``t``) for a fixed-offset grid."""

    learnable = True

    def __init__(self, key: str, encoding: Encoding, rounding: str = "half_even"):
        if encoding is None or encoding.kind != "int":
            raise RefquantError(f"quantizer {key!r}: range learning needs an integer encoding")
        if encoding.block_size is not None:
            raise RefquantError(f"quantizer {key!r}: range learning of per-block encodings is not supported")
        super().__init__(key, encoding, rounding)
        self.asymmetric = not encoding.symmetric
        offset = np.asarray(encoding.offset, dtype=np.float64)
        if self.asymmetric:
            self.params = {"min": np.array(encoding.min, dtype=np.float64),
                           "max": np.array(encoding.max, dtype=np.float64)}
        else:
            self.k = np.where(offset + encoding.steps > 0, offset + encoding.steps, -offset)
            self.params = {"max": np.asarray(encoding.scale, dtype=np.float64) * self.k}

    def set_params(self, params: dict[str, np.ndarray]) -> None:
        """New parameter values (after an optimizer step): projected onto valid ranges (min <= 0 <= max,
        a positive scale) and turned into the encoding used from the next forward on."""
        e = self.encoding
        if self.asymmetric:
            lo = np.minimum(params["min"], 0.0)
            hi = np.maximum(params["max"], 0.0)
            hi = np.maximum(hi, lo + MIN_SCALE * e.steps)
            self.params = {"min": lo, "max": hi}
            self.encoding = from_min_max(lo, hi, e.bitwidth, False, axis=e.axis)
        else:
            t = np.maximum(params["max"], MIN_SCALE * self.k)
            self.params = {"max": t}
            scale = (t / self.k).astype(np.float32).astype(np.float64)  # symmetric scales are float32 (AIMET)
            self.encoding = e.with_scale(np.maximum(scale, MIN_SCALE))

    def backward(self, grad: np.ndarray, saved):
        if saved is None:
            return grad, {}
        x, encoding = saved
        gx, g_scale, g_offset = lsq_grads(x, grad, encoding, self.rounding)
        if self.asymmetric:
            d_lo, d_hi = minmax_grads(g_scale, g_offset, self.params["min"], self.params["max"], encoding.steps)
            return gx, {"min": d_lo, "max": d_hi}
        return gx, {"max": g_scale / self.k}


__all__ = ["QDQ", "LearnedRangeQDQ", "lsq_grads", "minmax_grads", "ste_grad"]
