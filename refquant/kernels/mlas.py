"""onnxruntime's MLAS float32 logistic, tanh, erf and exp, bit for bit.

onnxruntime's CPU Sigmoid, Tanh, Erf and Exp (and everything built on them: its LSTM/GRU gates,
QLinearSigmoid's lookup table, DynamicQuantizeLSTM, BiasGelu) call MLAS: float32 rational or
polynomial approximations, not the correctly rounded functions. A float runtime that must agree with
onnxruntime bit for bit (a dynamically quantized model requantizes each activation, and one ulp at a
rounding boundary flips a code) has to evaluate the same formulas in the same order.

Every step below is one float32 operation. ``fma(a, b, c)`` is a fused multiply-add (one rounding), as
MLAS's x86-64 kernels for CPUs with FMA3 (AVX2 and AVX-512 machines: LogisticKernelFma3,
TanhKernelFma3, ErfKernelFma3, the Exp kernels) compute it. The loops are compiled by Numba with the
LLVM fast-math flag ``contract`` and no other: LLVM then fuses exactly the ``a * b + c`` written in the
source into one FMA (every other flag would allow reassociation or reciprocal division, which changes
results). Each formula is written so that every FMA in MLAS is an ``a * b + c`` here and no other
multiply feeds an add. Verified against onnxruntime 1.32 on x86-64 with AVX-512 (every one of the 2^32
float32 inputs: ``bench/mlas_exhaustive.py``). On a CPU without FMA, LLVM keeps a rounded multiply and
add, but onnxruntime then runs MLAS's generic SSE2 kernels, whose Erf is a different algorithm (it
clamps |x| to 3.725); ARM64 runs the generic kernels too. Neither is reproduced here.

Element order does not matter (each output depends on its own input only), so large tensors are split
into contiguous chunks over :mod:`refquant.parallel`'s thread budget.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from .. import parallel

F32 = np.float32

# ----------------------------------------------------------------- MlasLogisticConstants (logistic.cpp)
LOGISTIC_LO, LOGISTIC_HI = F32(-18.0), F32(18.0)
L_A9, L_A7, L_A5, L_A3, L_A1 = (F32(4.37031012579801e-11), F32(1.15627324459942e-07),
                                F32(6.08574864600143e-05), F32(8.51377133304701e-03),
                                F32(2.48287947061529e-01))
L_B10, L_B8, L_B6, L_B4, L_B2, L_B0 = (F32(6.10247389755681e-13), F32(5.76102136993427e-09),
                                       F32(6.29106785017040e-06), F32(1.70198817374094e-03),
                                       F32(1.16817656904453e-01), F32(9.93151921023180e-01))
HALF = F32(0.5)
ZERO = F32(0.0)
ONE = F32(1.0)

# ----------------------------------------------------------------- MlasTanhConstants (tanh.cpp, Eigen's)
TANH_LO, TANH_HI = F32(-9.0), F32(9.0)
T_A13, T_A11, T_A9, T_A7, T_A5, T_A3, T_A1 = (F32(-2.76076847742355e-16), F32(2.00018790482477e-13),
                                              F32(-8.60467152213735e-11), F32(5.12229709037114e-08),
                                              F32(1.48572235717979e-05), F32(6.37261928875436e-04),
                                              F32(4.89352455891786e-03))
T_B6, T_B4, T_B2, T_B0 = (F32(1.19825839466702e-06), F32(1.18534705686654e-04), F32(2.26843463243900e-03),
                          F32(4.89352518554385e-03))

# ----------------------------------------------------------------- MlasErfConstants (erf.cpp)
ERF_SPLIT = F32(0.921875)
E_S0, E_S1, E_S2, E_S3, E_S4, E_S5 = (F32(-5.99104969e-4), F32(4.99339588e-3), F32(-2.67667342e-2),
                                      F32(1.12818025e-1), F32(-3.76124859e-1), F32(1.28379151e-1))
E_B0, E_B1, E_B2, E_B3, E_B4, E_B5, E_B6 = (F32(1.72948930e-5), F32(-3.83208680e-4), F32(3.88393435e-3),
                                            F32(-2.42545605e-2), F32(1.06777847e-1), F32(6.34846687e-1),
                                            F32(1.28717512e-1))
EXP_LOWER = F32(-88.3762626647949)
EXP_LOG2E = F32(1.44269504088896341)
EXP_LN2_HI, EXP_LN2_LO = F32(-6.93145752e-1), F32(-1.42860677e-6)
EXP_P0, EXP_P1, EXP_P2, EXP_P3, EXP_P4, EXP_P5, EXP_P6 = (F32(1.38319808e-3), F32(8.37550033e-3),
                                                          F32(4.16689515e-2), F32(1.66664466e-1),
                                                          F32(4.99999851e-1), F32(1.0), F32(1.0))
EXP_ROUND = F32(1.25829120e+7)  # 1.5 * 2^23: adding and subtracting it rounds to an integer (ties to even)

# ----------------------------------------------------------------- MlasExpConstants (compute.cpp)
X_LO, X_HI = F32(-103.9720840454), F32(88.7762626647950)
X_P0, X_P1, X_P2, X_P3, X_P4, X_P56 = (F32(float.fromhex(h)) for h in (
    "0x1.694000p-10", "0x1.125edcp-7", "0x1.555b5ap-5", "0x1.555450p-3", "0x1.fffff6p-2", "0x1.000000p+0"))

# error_model="numpy": IEEE division (Numba's default checks for a zero divisor, which also stops LLVM
# from vectorizing the loop).
_FLAGS = dict(cache=True, nogil=True, error_model="numpy", fastmath={"contract"})




@njit(**_FLAGS)
def _logistic_loop(x, out):
    """v = clamp(x, -18, 18) (NaN passes); s = v*v;
    p = fma(fma(fma(fma(s, a9, a7), s, a5), s, a3), s, a1);
    q = fma(fma(fma(fma(fma(s, b10, b8), s, b6), s, b4), s, b2), s, b0);
    y = max((v * p) / q + 0.5, 0)."""
    for k in range(x.size):
        v = x[k]
        v = LOGISTIC_LO if v < LOGISTIC_LO else v
        v = LOGISTIC_HI if v > LOGISTIC_HI else v
        s = v * v
        p = s * L_A9 + L_A7
        p = s * p + L_A5
        p = s * p + L_A3
        p = s * p + L_A1
        q = s * L_B10 + L_B8
        q = s * q + L_B6
        q = s * q + L_B4
        q = s * q + L_B2
        q = s * q + L_B0
        y = (v * p) / q + HALF
        out[k] = ZERO if y < ZERO else y


@njit(**_FLAGS)
def _tanh_loop(x, out):
    """v = clamp(x, -9, 9) (NaN passes); s = v*v;
    p = v * fma(fma(fma(fma(fma(fma(s, a13, a11), s, a9), s, a7), s, a5), s, a3), s, a1);
    q = fma(fma(fma(s, b6, b4), s, b2), s, b0); y = p / q (no final clamp: |y| <= 1 by the fit)."""
    for k in range(x.size):
        v = x[k]
        v = TANH_LO if v < TANH_LO else v
        v = TANH_HI if v > TANH_HI else v
        s = v * v
        p = s * T_A13 + T_A11
        p = p * s + T_A9
        p = p * s + T_A7
        p = p * s + T_A5
        p = p * s + T_A3
        p = p * s + T_A1
        p = p * v
        q = s * T_B6 + T_B4
        q = q * s + T_B2
        q = q * s + T_B0
        out[k] = p / q


@njit(**_FLAGS)
def _erf_loop(x, out):
    """a = |x|; below the split (a < 0.921875, and NaN): r = fma(P(a*a), a, a) with
    P(s) = fma(fma(fma(fma(fma(s0, s, s1), s, s2), s, s3), s, s4), s, s5);
    above: t = -fma(B(a), a, a) with B(a) = fma(..fma(fma(b0, a, b1), a, b2).., a, b6), clamped below at
    -88.376, then 1 - exp(t) by MLAS's exp: n = fma(log2e, t, 1.5*2^23) - 1.5*2^23 (t/ln2 rounded to an
    integer), f = fma(n, ln2_lo, fma(ln2_hi, n, t)), e = fma(..fma(p0, f, p1).., f, p6),
    r = 1 - e * 2^n (a rounded product, then the subtraction; 2^-127 is 0 as MLAS builds it from exponent
    bits); the result gets x's sign bit. Both branches are computed and one selected, as the vector
    kernel does. |x| is not clamped: onnxruntime 1.32 returns exactly +-1 far out and NaN for NaN."""
    for k in range(x.size):
        v = x[k]
        a = abs(v)
        s = a * a
        small = s * E_S0 + E_S1
        small = small * s + E_S2
        small = small * s + E_S3
        small = small * s + E_S4
        small = small * s + E_S5
        small = small * a + a
        t = E_B0 * a + E_B1
        t = t * a + E_B2
        t = t * a + E_B3
        t = t * a + E_B4
        t = t * a + E_B5
        t = t * a + E_B6
        t = t * a + a
        t = -t
        t = t if t > EXP_LOWER else EXP_LOWER
        n = EXP_LOG2E * t + EXP_ROUND
        n = n - EXP_ROUND
        f = EXP_LN2_HI * n + t
        f = n * EXP_LN2_LO + f
        e = EXP_P0 * f + EXP_P1
        e = e * f + EXP_P2
        e = e * f + EXP_P3
        e = e * f + EXP_P4
        e = e * f + EXP_P5
        e = e * f + EXP_P6
        i = np.int32(n) + 127  # in 0 .. 127: t is in [-88.38, 0]
        i = 0 if i < 0 else (127 if i > 127 else i)
        big = ONE - _mul(e, _pow2_bits(i))
        r = big if a >= ERF_SPLIT else small  # NaN fails the comparison: the small branch, NaN
        out[k] = math.copysign(r, v)


@njit(cache=True, nogil=True)
def _pow2_bits(biased_exponent):
    """The float32 whose bits are ``biased_exponent << 23`` (2^(e - 127); e = 0 gives 0.0), as MLAS
    builds its scale factors."""
    return np.uint32(biased_exponent << 23).view(np.float32)


@njit(cache=True, nogil=True)
def _mul(a, b):
    """A float32 product never fused into the add that follows (MLAS: a separate multiply). Compiled
    without ``contract``."""
    return a * b


@njit(**_FLAGS)
def _exp_loop(x, out):
    """MlasComputeExp: v = clamp(x, -103.972, 88.776) (NaN passes); b = fma(v, log2e, 1.5*2^23);
    m = b - 1.5*2^23 (v/ln2 rounded to an integer); r = fma(m, ln2_lo, fma(m, ln2_hi, v));
    the scale 2^m is split in two normal powers, 2^n with n = clamp(m, -126, 127) and 2^(m - n), so that
    results down to the denormals and up to 2^128 come out right;
    p = fma(fma(fma(fma(fma(p0, r, p1), r, p2), r, p3), r, p4), r, p56);
    y = fma(p, r * 2^(m-n), 2^(m-n)) * 2^n (XNNPACK's trick: the polynomial's last term merged into the
    scaling)."""
    for k in range(x.size):
        v = x[k]
        v = X_HI if v > X_HI else v
        v = X_LO if v < X_LO else v
        b = v * EXP_LOG2E + EXP_ROUND
        m = b - EXP_ROUND
        v = m * EXP_LN2_HI + v
        v = m * EXP_LN2_LO + v
        c = m if m >= F32(-150.0) else F32(-150.0)  # m is in -150 .. 128; NaN (result NaN anyway) -> -150,
        i = np.int32(c if c <= F32(128.0) else F32(128.0))  # so the conversion is always defined
        n = -126 if i < -126 else (127 if i > 127 else i)
        over = _pow2_bits(i - n + 127)
        normal = _pow2_bits(n + 127)
        p = X_P0 * v + X_P1
        p = p * v + X_P2
        p = p * v + X_P3
        p = p * v + X_P4
        p = p * v + X_P56
        v = _mul(v, over)
        p = p * v + over
        out[k] = p * normal


def _run(loop, x, out):
    x = np.asarray(x, dtype=F32, order="C")  # (np.ascontiguousarray would make a 0-d array 1-d)
    if out is None:
        out = np.empty_like(x)
    elif out.dtype != F32 or out.shape != x.shape or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 array of shape {x.shape}, "
                         f"got {out.dtype} {out.shape}")
    flat_x, flat_out = x.reshape(-1), out.reshape(-1)
    threads = parallel.budget()
    if threads <= 1 or x.size < parallel.MIN_PARALLEL_ELEMENTS:
        loop(flat_x, flat_out)
        return out
    blocks = parallel.split(x.size, 4 * threads)

    def chunk(i):
        lo, hi = blocks[i]
        loop(flat_x[lo:hi], flat_out[lo:hi])

    parallel.parallel_for(len(blocks), chunk)
    return out


def logistic(x, out: np.ndarray | None = None) -> np.ndarray:
    """MlasComputeLogistic (onnxruntime's Sigmoid) of float32 ``x``; see :func:`_logistic_loop` for the
    formula. ``out``: a C-contiguous float32 array of x's shape to write into (may be x itself)."""
    return _run(_logistic_loop, x, out)


def tanh(x, out: np.ndarray | None = None) -> np.ndarray:
    """MlasComputeTanh (onnxruntime's Tanh) of float32 ``x``; formula in :func:`_tanh_loop`."""
    return _run(_tanh_loop, x, out)


def erf(x, out: np.ndarray | None = None) -> np.ndarray:
    """MlasComputeErf (onnxruntime's Erf) of float32 ``x``; formula in :func:`_erf_loop`."""
    return _run(_erf_loop, x, out)


def exp(x, out: np.ndarray | None = None) -> np.ndarray:
    """MlasComputeExp (onnxruntime's Exp) of float32 ``x``; formula in :func:`_exp_loop`."""
    return _run(_exp_loop, x, out)
