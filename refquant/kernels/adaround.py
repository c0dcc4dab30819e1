"""AdaRound's elementwise work fused into single passes: the sampled reconstruction gradient, and the soft
rounding and Adam step of every weight.

For a layer output ``y = z + dW cols`` ([G, M/G, B], float32) and the FP32 model's ``t`` (already through
the activation ``f``), ``dL/dy = c * f'(y) * (f(y) - t)`` with ``c = 2 / positions``. NumPy needs five or
six passes over ``y`` for this (add, activation, subtract, scale, mask); on a conv layer with many
positions those passes cost more than the two GEMMs around them (MTCNN O-Net conv1: 135,424 positions,
two thirds of the layer's time). The operations and their float32 rounding are exactly NumPy's
(:class:`refquant.ptq.adaround_loss.SampledLoss`), in the same order, so the result is bit for bit the same.
Per weight, NumPy's soft rounding, regularizer and Adam update take about 25 passes over float64 arrays the size
of the weight (10.7 ms a step for 295k weights, 30 ms for MobileNetV2's classifier); here two, plus NumPy's own
exp and pow (SIMD, several times faster than libm's scalar ones), with the same operations: the result is NumPy's
bit for bit (``tests/test_ptq_adaround.py``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

IDENTITY, CLIP, PRELU = 0, 1, 2  # the activation kinds


@njit(cache=True, nogil=True)
def reconstruction_gradient(y, z, target, kind, lo, hi, slope, scale):
    """In place: ``y <- scale * f'(y + z) * (f(y + z) - target)``, all float32; ``f`` is the identity,
    ``clip(., lo, hi)`` (``f' = lo < y < hi``) or a PRelu with ``slope[g, m]`` (``f' = 1`` for ``y >= 0``,
    else the slope)."""
    groups, channels, positions = y.shape
    for g in range(groups):
        for m in range(channels):
            a = slope[g, m]
            for p in range(positions):
                v = y[g, m, p] + z[g, m, p]
                if kind == CLIP:
                    out = min(max(v, lo), hi)
                    d = (out - target[g, m, p]) * scale
                    y[g, m, p] = d if (v > lo and v < hi) else d * np.float32(0.0)
                elif kind == PRELU:
                    if v >= 0:
                        y[g, m, p] = (v - target[g, m, p]) * scale
                    else:
                        y[g, m, p] = a * ((a * v - target[g, m, p]) * scale)
                else:
                    y[g, m, p] = (v - target[g, m, p]) * scale


ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (Nagel et al. 2020; AIMET's AdaroundConstants)


# error_model="numpy": a division by zero gives inf/nan as in NumPy instead of raising, which lets LLVM vectorize
# the loops (adam_step 3.6x faster, soft_weights 1.3x; the results are the same bits)
@njit(cache=True, nogil=True, error_model="numpy")
def soft_weights(exp_neg_v, base, lo, hi, scale, w_soft, dw_dh, dh_dv, h, magnitude):
    """Fill (flat, float64) ``h = clip(sigmoid(v) (zeta - gamma) + gamma, 0, 1)`` with ``sigmoid(v) =
    1 / (1 + exp(-v))`` (``exp(-v)`` given: NumPy's SIMD exp is 5x libm's), ``dh/dv``,
    ``w_soft = scale clip(base + h, lo, hi)``, ``dw_soft/dh = scale [lo <= base + h <= hi]`` and the
    regularizer's ``|2h - 1|``: :meth:`refquant.ptq.adaround_optimize.SoftRounding.h` and ``soft_h`` in one pass."""
    for i in range(exp_neg_v.shape[0]):
        sig = 1.0 / (1.0 + exp_neg_v[i])
        raw = sig * (ZETA - GAMMA) + GAMMA
        hv = min(max(raw, 0.0), 1.0)
        codes = base[i] + hv
        h[i] = hv
        magnitude[i] = abs(2 * hv - 1)
        dh_dv[i] = (ZETA - GAMMA) * sig * (1 - sig) * (1.0 if (raw > 0 and raw < 1) else 0.0)
        w_soft[i] = scale[i] * min(max(codes, lo[i]), hi[i])
        dw_dh[i] = scale[i] * (1.0 if (codes >= lo[i] and codes <= hi[i]) else 0.0)


@njit(cache=True, nogil=True, error_model="numpy")
def adam_step(v, grad_w, dw_dh, dh_dv, h, free, beta, powed, reg_param, m, s, rate, correction):
    """One Adam step (torch's defaults: 0.9, 0.999, eps 1e-8) on the flat ``v``:
    ``v -= rate m / (sqrt(s / correction) + 1e-8)`` with ``rate = lr / (1 - 0.9^t)``, ``correction = 1 - 0.999^t``
    (given, computed by Python's pow as the NumPy path does), for the gradient ``(dL/dW dW/dh + reg_param dreg/dh)
    dh/dv`` on free weights, ``dreg/dh = -2 beta |2h - 1|^(beta - 1) sign(2h - 1)`` with ``powed`` =
    ``|2h - 1|^(beta - 1)`` given (NumPy's SIMD pow: libm's costs 30 ns a weight); no regularizer when ``beta``
    is NaN (the warm start)."""
    regularized = not np.isnan(beta)
    for i in range(v.shape[0]):
        g = grad_w[i] * dw_dh[i]
        if regularized:
            a = 2 * h[i] - 1
            sign = 1.0 if a > 0 else (-1.0 if a < 0 else 0.0)
            g = g + reg_param * (-2 * beta * powed[i] * sign)
        g = g * dh_dv[i] * (1.0 if free[i] else 0.0)
        m[i] = m[i] * 0.9 + 0.1 * g
        s[i] = s[i] * 0.999 + 0.001 * g * g
        v[i] -= rate * m[i] / (np.sqrt(s[i] / correction) + 1e-8)


@njit(cache=True, nogil=True, error_model="numpy")
def mix_columns(a, b, draws, first_draw, threshold, start, stop, out):
    """QDrop's inputs, positions ``start:stop`` of ``[G, K, B]`` columns into ``out`` ``[G, K, stop - start]``:
    ``b`` where ``draws < threshold`` (uint8 draws, position ``p``'s at ``p - start + first_draw``: ``b`` with
    probability ``threshold / 256``), else ``a``.
    The select is written ``m b + (1 - m) a`` with ``m`` 0 or 1 (exactly ``a`` or ``b`` for finite values), which
    LLVM vectorizes: 2-4x NumPy's ``where`` (measured on MobileNetV2's and MTCNN's column shapes)."""
    groups, rows, _ = a.shape
    for g in range(groups):
        for k in range(rows):
            a_row, b_row, draw_row, out_row = a[g, k], b[g, k], draws[g, k], out[g, k]
            for p in range(start, stop):
                m = np.float32(draw_row[p - start + first_draw] < threshold)
                out_row[p - start] = m * b_row[p] + (np.float32(1) - m) * a_row[p]
