"""Quantize-dequantize hot loops over a (outer, channels, inner) view, one grid per channel.

All arithmetic is float32, as onnxruntime's QuantizeLinear/DequantizeLinear do it: ``x / scale`` is a
float32 division (not a multiplication by 1/scale, which differs in 0.4-2.2 % of values), and the
integer code is held as an integer-valued float32 (exact below 2^24).
"""

import numpy as np
from numba import njit


@njit(cache=True)
def qdq_half_even(x, scale, lo, hi, out):
    """out = clamp(rint(x / scale), lo, hi) * scale: ONNX QuantizeLinear then DequantizeLinear with
    ties to even, written with the zero point folded into the clamp bounds ``lo = offset``,
    ``hi = offset + num_steps``."""
    for o in range(x.shape[0]):
        for c in range(x.shape[1]):
            s = scale[c]
            a = lo[c]
            b = hi[c]
            src = x[o, c]
            dst = out[o, c]
            for i in range(src.shape[0]):
                t = np.rint(src[i] / s)
                t = a if t < a else t
                t = b if t > b else t
                dst[i] = t * s


@njit(cache=True)
def qdq_half_up(x, scale, offset, steps, out):
    """AIMET's simulation: x_c = clamp(x, scale*offset, scale*(offset+steps));
    q = round(x_c / scale - offset) with C round() on a non-negative value, so ties go up;
    out = scale * (q + offset)."""
    for o in range(x.shape[0]):
        for c in range(x.shape[1]):
            s = scale[c]
            off = offset[c]
            n = steps[c]
            emin = s * off
            emax = s * (off + n)
            src = x[o, c]
            dst = out[o, c]
            for i in range(src.shape[0]):
                v = src[i]
                v = emin if v < emin else v
                v = emax if v > emax else v
                q = np.floor(v / s - off + np.float32(0.5))
                q = np.float32(0.0) if q < 0 else q
                q = n if q > n else q
                dst[i] = s * (q + off)
