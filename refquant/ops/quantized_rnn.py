"""com.microsoft DynamicQuantizeLSTM, bit-exact with onnxruntime 1.32 CPU (x86-64, FMA3).

What onnxruntime's ``quantize_dynamic`` makes of an LSTM: W and R are stored quantized (int8 or uint8,
TRANSPOSED against ONNX LSTM: W [dirs, input, 4H], R [dirs, H, 4H], gates in the order i o f c) with one
scale and zero point per direction (W_scale [dirs]) or per gate column (W_scale [dirs, 4H]); the float
activations are quantized on the fly. For each direction (onnxruntime: ``DynamicQuantizeLSTM`` ->
``LSTMBase::ComputeImpl`` -> ``UniDirectionalLstm``, deep_cpu kernels; ``rnn_helpers.cc ComputeGemm``)::

    A          = X[:Tmax] as [Tmax*B, I] (reverse: each sequence reversed within its length; Tmax = max length)
    (sa, za)   = DynamicQuantizeLinear parameters of A (uint8, range widened to 0, float32)
    G_x        = f32(i32 (q(A) - za) @ (W - zw)) * f32(sa * sw)           input projection, every step at once
    per step t, per row group g of the batch (see below):
      (sh, zh) = DynamicQuantizeLinear parameters of H_{t-1}[g]
      G        = f32(f32(i32 (q(H_{t-1}[g]) - zh) @ (R - zr)) * f32(sh * sr)) + G_x[t]   (multiply, then add)
      i  = f(clamp((G_i + C_{t-1} * P_i) + b_i))   b = f32(Wb + Rb); clamp to [-clip, clip] (clip: FLT_MAX)
      f  = 1 - i  (input_forget)  or  f(clamp((G_f + C_{t-1} * P_f) + b_f))
      c~ = g(clamp(G_c + b_c))
      C  = f32(C_{t-1} * f) + f32(i * c~)                                   (two products, one add, no FMA)
      o  = f(clamp((G_o + C * P_o) + b_o))
      H  = h(C) * o

every operation a float32 operation rounded on its own (no FMA outside MLAS). f, g, h default to Sigmoid,
Tanh, Tanh, which are MLAS's rational approximations (:func:`mlas_sigmoid`, :func:`mlas_tanh`: the FMA3
kernels, :mod:`refquant.kernels.mlas`). The other ONNX activations follow onnxruntime's
``rnn_activation_functors.h`` (Elu, Softplus and ScaledTanh call the C library's expf/logf, called here
too) and MLAS ReLU, with onnxruntime's alpha/beta defaults (ThresholdedRelu: 0, not ONNX's 1).

Details onnxruntime's arithmetic depends on, reproduced here:

* Hidden-state quantization is per **row group**, not per row or per batch: with ``B > 4`` or
  ``2 <= B and H <= 256`` onnxruntime partitions the batch into groups of ``ceil(B / threads)`` rows
  (``threads``: the session's intra-op degree of parallelism) and quantizes each group's ``H_{t-1}`` with
  its own scale. The result therefore depends on ``intra_op_num_threads``; this kernel uses
  :data:`ORT_INTRA_OP_THREADS` (set it with :func:`set_ort_intra_op_threads` to the value of the
  onnxruntime session being reproduced). The default is what a default onnxruntime session uses: one
  thread per physical core of this machine (:func:`physical_cores`); 1 quantizes the whole batch together.
* A finished sequence (``t >= sequence_lens[b]``) keeps its state. Its row of ``H_{t-1}`` still enters
  its group's quantization range: as zeros when the node has the Y output (onnxruntime reads the
  zero-filled Y rows), as its last hidden state when Y is omitted (it reads Y_h's buffer). Only min/max
  matter and the range always includes 0, so zeros change nothing, but a stale state can.
* The integer products are exact (AVX512-VNNI / AVX-VNNI, or u8 x u8 weights). On AVX2 CPUs without VNNI
  onnxruntime's u8 x s8 kernel saturates pairs of products to int16 (``vpmaddubsw``) and computes
  something else; this kernel does not reproduce that.
* With ``sequence_lens[b] == 0`` and Y omitted, onnxruntime quantizes the later steps' hidden state
  with an uninitialized buffer row in the group (no defined result); we use that row's initial state.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import numpy as np

from ..kernels import mlas
from .qoperators import EXACT_LIMIT, MS, dynamic_quantize_linear
from .registry import register
from .shapes import TensorInfo

F32 = np.float32
FLT_MAX = float(np.finfo(np.float32).max)
INT32_LIMIT = 1 << 31

def physical_cores() -> int:
    """onnxruntime's default ``intra_op_num_threads``: the number of physical cores this process may run on
    (distinct (package, core) pairs of the CPUs in its affinity mask; the CPU count where the topology is
    not readable)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        topology = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        try:
            with open(topology + "physical_package_id") as package, open(topology + "core_id") as core:
                cores.add((package.read().strip(), core.read().strip()))
        except OSError:
            return len(cpus) or 1
    return len(cores) or 1


ORT_INTRA_OP_THREADS = physical_cores()
"""onnxruntime intra-op threads being reproduced: decides the row groups of the hidden-state quantization.
The default reproduces a default onnxruntime session on this machine (one thread per physical core)."""


def set_ort_intra_op_threads(threads: int) -> int:
    """Reproduce onnxruntime sessions created with ``intra_op_num_threads=threads`` (see the module doc);
    returns the previous setting."""
    global ORT_INTRA_OP_THREADS
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise ValueError(f"onnxruntime intra-op threads must be an integer >= 1, got {threads!r}")
    previous, ORT_INTRA_OP_THREADS = ORT_INTRA_OP_THREADS, int(threads)
    return previous


# ----------------------------------------------------------------------------------------- activations
def mlas_tanh(x) -> np.ndarray:
    """MlasComputeTanh as onnxruntime computes it (Eigen's rational approximation, float32):
    v = clamp(x, -9, 9); p = v * (((((a13 v^2 + a11) v^2 + a9) v^2 + a7) v^2 + a5) v^2 + a3) v^2 + a1);
    q = ((b6 v^2 + b4) v^2 + b2) v^2 + b0, every step one FMA; y = p / q (no final clamp).
    See :func:`refquant.kernels.mlas.tanh`."""
    return mlas.tanh(np.asarray(x, dtype=F32))


def mlas_sigmoid(x) -> np.ndarray:
    """MlasComputeLogistic (clamp to +-18, odd/even rational polynomial with FMA, p / q + 0.5, max 0):
    :func:`refquant.kernels.mlas.logistic`."""
    return mlas.logistic(np.asarray(x, dtype=F32))


def _load_libm():
    """The C library's float32 ``expf``/``logf`` (what onnxruntime's RNN activation functors call), or None."""
    name = ctypes.util.find_library("m")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        lib = None
    if lib is None:
        return None
    for fn in ("expf", "logf"):
        getattr(lib, fn).restype, getattr(lib, fn).argtypes = ctypes.c_float, [ctypes.c_float]
    return lib


_LIBM = _load_libm()


def _libm(fn: str, x) -> np.ndarray:
    """libm's float32 ``fn`` ("expf" or "logf") element by element. glibc's expf/logf are not correctly
    rounded (0.06 % / 0.02 % of arguments differ from the rounded exact value), so only the library itself
    reproduces onnxruntime; without a loadable libm the rounded float64 value is used (within 1 ulp)."""
    x = np.asarray(x, dtype=F32)
    if _LIBM is None:
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            return (np.exp if fn == "expf" else np.log)(x.astype(np.float64)).astype(F32)
    call = getattr(_LIBM, fn)
    return np.fromiter((call(float(v)) for v in x.ravel()), dtype=F32, count=x.size).reshape(x.shape)


def _ort_sigmoid_scalar(x):
    """rnn_activation_functors.h Sigmoid (inside ScaledTanh): 1 / (1 + expf(-x)) for x >= 0, else
    expf(x) / (1 + expf(x))."""
    x = np.asarray(x, dtype=F32)
    with np.errstate(over="ignore", invalid="ignore"):
        e_neg, e_pos = _libm("expf", -x), _libm("expf", x)
        pos = (F32(1) / (F32(1) + e_neg).astype(F32)).astype(F32)
        neg = (e_pos / (F32(1) + e_pos).astype(F32)).astype(F32)
    return np.where(x >= 0, pos, neg)


def _activation(name: str, alpha: float, beta: float):
    """onnxruntime's RNN activation ``name`` (lower case) as a float32 -> float32 function."""
    a, b = F32(alpha), F32(beta)
    if name == "sigmoid":
        return mlas_sigmoid
    if name == "tanh":
        return mlas_tanh
    if name == "relu":
        return lambda x: np.maximum(x, F32(0))
    if name == "affine":
        return lambda x: ((a * x).astype(F32) + b).astype(F32)
    if name == "leakyrelu":
        return lambda x: np.where(x >= 0, x, (a * x).astype(F32))
    if name == "thresholdedrelu":
        return lambda x: np.where(x > a, x, F32(0))
    if name == "hardsigmoid":
        return lambda x: np.minimum(F32(1), np.maximum(F32(0), ((a * x).astype(F32) + b).astype(F32)))
    if name == "softsign":
        return lambda x: (x / (F32(1) + np.abs(x)).astype(F32)).astype(F32)
    if name == "elu":
        def elu(x):
            em1 = (_libm("expf", np.minimum(x, F32(0))) - F32(1)).astype(F32)  # expf only where x < 0 is used
            return np.where(x >= 0, x, (a * em1).astype(F32))
        return elu
    if name == "softplus":
        return lambda x: _libm("logf", (F32(1) + _libm("expf", x)).astype(F32))
    if name == "scaledtanh":
        def scaled_tanh(x):
            s = _ort_sigmoid_scalar((F32(2) * (b * x).astype(F32)).astype(F32))
            return (a * ((F32(2) * s).astype(F32) - F32(1)).astype(F32)).astype(F32)
        return scaled_tanh
    raise ValueError(f"unsupported LSTM activation {name!r}")


# onnxruntime rnn_helpers.cc NameToArgUsageMap / NameToArgDefaultsMap: (takes alpha, takes beta), defaults
_ARG_USAGE = {"affine": (True, True), "relu": (False, False), "leakyrelu": (True, False),
              "thresholdedrelu": (True, False), "tanh": (False, False), "scaledtanh": (True, True),
              "sigmoid": (False, False), "hardsigmoid": (True, True), "elu": (True, False),
              "softsign": (False, False), "softplus": (False, False)}
_ARG_DEFAULTS = {"leakyrelu": (0.01, 0.0), "hardsigmoid": (0.2, 0.5), "elu": (1.0, 0.0)}


def _activations(names, alphas, betas, dirs: int):
    """[(f, g, h)] per direction; alpha/beta consumed in order by the activations that take them, missing
    ones defaulting as onnxruntime does (0 unless listed in _ARG_DEFAULTS)."""
    names = [n.lower() for n in (names or ["sigmoid", "tanh", "tanh"] * dirs)]
    if len(names) != 3 * dirs:
        raise ValueError(f"activations must name 3 functions per direction ({3 * dirs}), got {len(names)}")
    alphas, betas = list(alphas or []), list(betas or [])
    fns = []
    for name in names:
        if name not in _ARG_USAGE:
            raise ValueError(f"unsupported LSTM activation {name!r}")
        takes_alpha, takes_beta = _ARG_USAGE[name]
        alpha, beta = _ARG_DEFAULTS.get(name, (0.0, 0.0))
        if takes_alpha and alphas:
            alpha = alphas.pop(0)
        if takes_beta and betas:
            beta = betas.pop(0)
        fns.append(_activation(name, alpha, beta))
    return [tuple(fns[3 * d:3 * d + 3]) for d in range(dirs)]


# ----------------------------------------------------------------------------------------- quantized GEMM
def _weight_params(scale, zero_point, d: int, n: int, name: str):
    """Direction ``d``'s weight scale (float32 [1] or [4H]) and zero point: onnxruntime reads one per direction
    (the first of its row) and accepts per-column [dirs, 4H] zero points only when all are equal (uint8) or
    all 0 (int8)."""
    s = np.asarray(scale, dtype=F32)
    z = np.asarray(zero_point)
    if s.ndim not in (1, 2) or s.shape[0] <= d or (s.ndim == 2 and s.shape[1] != n):
        raise ValueError(f"{name}_scale must have shape [dirs] or [dirs, {n}], got {list(s.shape)}")
    if z.shape != s.shape:
        raise ValueError(f"{name}_zero_point must have the shape of {name}_scale {list(s.shape)}, "
                         f"got {list(z.shape)}")
    if z.ndim == 2 and z.dtype == np.int8 and np.any(z != 0):
        raise ValueError(f"{name}_zero_point must be 0 for int8 weights quantized per column")
    if z.ndim == 2 and np.any(z != z.flat[0]):
        raise ValueError(f"{name}_zero_point must be the same for every column (and direction)")
    return s[d].reshape(-1), int(z[d].flat[0])


def _integer_gemm(codes, codes_zp, weights, w_zp: int, what: str):
    """sum_k (codes - codes_zp)(weights - w_zp) as float32 (``codes_zp`` a scalar or one per row [M, 1]).

    Exact: the float64 products and sums are integers below K * 255 * 255 < 2^53; onnxruntime holds them in
    int32, so a sum that could leave int32 is checked. The float32 conversion rounds once, like cvtdq2ps."""
    k = weights.shape[0]
    if k * 255 * 255 >= EXACT_LIMIT:
        raise ValueError(f"DynamicQuantizeLSTM {what}: reduction length {k} is too long for an exact sum")
    acc = np.matmul(codes.astype(np.float64) - codes_zp, weights.astype(np.float64) - w_zp)
    if k * 255 * 255 >= INT32_LIMIT and acc.size and np.abs(acc).max() >= INT32_LIMIT:
        raise OverflowError(f"DynamicQuantizeLSTM {what}: the int32 accumulator overflows; onnxruntime would "
                            "wrap around, so no bit-exact result exists")
    return acc.astype(F32)


def _quantized_projection(a, weights, w_scale, w_zp: int, what: str):
    """``f32(acc) * f32(sa * sw)`` for float rows ``a`` [M, K] quantized together (DynamicQuantizeLinear)."""
    codes, sa, za = dynamic_quantize_linear(a)
    acc = _integer_gemm(codes, int(za), weights, w_zp, what)
    return (acc * (F32(sa) * w_scale).astype(F32)).astype(F32)


def _recurrent_projection(h, groups, weights, w_scale, w_zp: int):
    """``f32(acc) * f32(sh[g] * sr)`` with each row group ``g`` of ``h`` [B, H] quantized on its own."""
    codes = np.empty(h.shape, dtype=np.uint8)
    row_zp = np.empty((h.shape[0], 1), dtype=np.int64)
    row_scale = np.empty((h.shape[0], 1), dtype=F32)
    for rows in groups:
        codes[rows], scale, zp = dynamic_quantize_linear(h[rows])
        row_zp[rows], row_scale[rows] = int(zp), scale
    acc = _integer_gemm(codes, row_zp, weights, w_zp, "recurrent GEMM")
    return (acc * (row_scale * w_scale).astype(F32)).astype(F32)


def row_groups(batch: int, hidden: int, threads: int) -> list[slice]:
    """onnxruntime's batch partition (UniDirectionalLstm::SetNumThreads): groups of ceil(B / threads) rows
    when B > 4 or (B >= 2 and H <= 256), else the whole batch."""
    if batch > 4 or (batch >= 2 and hidden <= 256):
        size = -(-batch // max(threads, 1))
    else:
        size = max(batch, 1)
    return [slice(start, min(start + size, batch)) for start in range(0, batch, size)]


# ----------------------------------------------------------------------------------------- one direction
def _gate(pre, bias, clip):
    """clip_add_bias / clip_ignore_bias: f32(pre + bias) clamped to [-clip, clip]."""
    x = pre if bias is None else (pre + bias).astype(F32)
    return np.maximum(F32(-clip), np.minimum(F32(clip), x))


def _peephole(pre, c, p):
    """deepcpu::elementwise_product: pre += c * p (product rounded, then the add)."""
    return pre if p is None else (pre + (c * p).astype(F32)).astype(F32)


def _direction(x, lens, reverse, w, w_scale, w_zp, r, r_scale, r_zp, bias, peep, h0, c0, fns, clip,
               input_forget, keep_finished_h, groups):
    """One direction. Returns Y [T, B, H] (original time order), Y_h [B, H], Y_c [B, H]."""
    steps, batch, _ = x.shape
    hidden = r.shape[0]
    max_len = int(lens.max(initial=0))
    t_idx = np.arange(steps)[:, None]
    if reverse:  # ReverseSequence: each sequence reversed within its length, the padding left in place
        order = np.where(t_idx < lens[None, :], lens[None, :] - 1 - t_idx, t_idx)
    else:
        order = np.broadcast_to(t_idx, (steps, batch))
    xs = x[order, np.arange(batch)[None, :]]
    gx = _quantized_projection(xs[:max_len].reshape(max_len * batch, -1), w, w_scale, w_zp, "input GEMM")
    gx = gx.reshape(max_len, batch, 4 * hidden)

    f_act, g_act, h_act = fns
    p_i, p_o, p_f = (None, None, None) if peep is None else np.split(peep, 3)
    b_i, b_o, b_f, b_c = (None,) * 4 if bias is None else np.split(bias, 4)
    h, c = h0.copy(), c0.copy()
    h_in = h0.copy()  # what the next step quantizes: the step's output rows (zeros or stale rows when finished)
    y = np.zeros((steps, batch, hidden), dtype=F32)
    for t in range(max_len):
        gates = (_recurrent_projection(h_in, groups, r, r_scale, r_zp) + gx[t]).astype(F32)
        g_i, g_o, g_f, g_c = np.split(gates, 4, axis=1)
        i = f_act(_gate(_peephole(g_i, c, p_i), b_i, clip))
        if input_forget:
            f = (F32(1) - i).astype(F32)
        else:
            f = f_act(_gate(_peephole(g_f, c, p_f), b_f, clip))
        cand = g_act(_gate(g_c, b_c, clip))
        c_new = ((c * f).astype(F32) + (i * cand).astype(F32)).astype(F32)
        o = f_act(_gate(_peephole(g_o, c_new, p_o), b_o, clip))
        h_new = (h_act(c_new) * o).astype(F32)
        active = (t < lens)[:, None]
        h = np.where(active, h_new, h)
        c = np.where(active, c_new, c)
        y[t] = np.where(active, h_new, F32(0))
        h_in = np.where(active, h_new, h if keep_finished_h else F32(0))
    final_h = np.where((lens > 0)[:, None], h, F32(0))
    final_c = np.where((lens > 0)[:, None], c, F32(0))
    if reverse:  # back to the original time order
        out = np.zeros_like(y)
        out[order, np.arange(batch)[None, :]] = y
        y = out
    return y, final_h, final_c


# ----------------------------------------------------------------------------------------- the op
def _dynamic_quantize_lstm_rule(x, w, r, *rest, direction="forward", hidden_size=None, **attrs):
    dirs = 2 if direction == "bidirectional" else 1
    shape = x.shape if x is not None else None
    steps, batch = (shape[0], shape[1]) if shape is not None and len(shape) == 3 else (None, None)
    info = TensorInfo(np.dtype(np.float32), (dirs, batch, hidden_size))
    return (TensorInfo(np.dtype(np.float32), (steps, dirs, batch, hidden_size)), info, info)


@register("DynamicQuantizeLSTM", since=1, domain=MS, infer=_dynamic_quantize_lstm_rule)
def dynamic_quantize_lstm(X, W, R, B=None, sequence_lens=None, initial_h=None, initial_c=None, P=None,
                          W_scale=None, W_zero_point=None, R_scale=None, R_zero_point=None, *,
                          activation_alpha=None, activation_beta=None, activations=None, clip=None,
                          direction="forward", hidden_size=None, input_forget=0, noutputs=1,
                          present_outputs=None):
    """LSTM over int8/uint8 W [dirs, I, 4H], R [dirs, H, 4H] (gates i o f c) with X and each step's hidden
    state quantized dynamically (uint8, DynamicQuantizeLinear), int32 GEMMs scaled back to float32:
    G = f32(acc_x) * f32(sx * sw) + f32(acc_h) * f32(sh * sr); i, o, f = f(G + P*C + b), c~ = g(G + b),
    C = f*C + i*c~, H = o * h(C); f, g, h = MLAS sigmoid, tanh, tanh. Exact order of operations in the
    module docstring. Returns Y [T, dirs, B, H], Y_h, Y_c [dirs, B, H]."""
    if X.ndim != 3:
        raise ValueError(f"X must be [seq_length, batch, input_size], got shape {list(X.shape)}")
    if W_scale is None or W_zero_point is None or R_scale is None or R_zero_point is None:
        raise ValueError("W_scale, W_zero_point, R_scale and R_zero_point are required")
    if direction not in ("forward", "reverse", "bidirectional"):
        raise ValueError(f"direction must be forward, reverse or bidirectional, got {direction!r}")
    dirs = 2 if direction == "bidirectional" else 1
    x = np.asarray(X, dtype=F32)
    steps, batch, input_size = x.shape
    hidden = int(hidden_size) if hidden_size is not None else R.shape[1]
    n = 4 * hidden
    if W.shape != (dirs, input_size, n) or R.shape != (dirs, hidden, n):
        raise ValueError(f"W must be [{dirs}, {input_size}, {n}] and R [{dirs}, {hidden}, {n}] (transposed "
                         f"against ONNX LSTM), got {list(W.shape)} and {list(R.shape)}")
    if B is not None and B.shape != (dirs, 8 * hidden):
        raise ValueError(f"B must be [{dirs}, {8 * hidden}], got {list(B.shape)}")
    if P is not None and P.shape != (dirs, 3 * hidden):
        raise ValueError(f"P must be [{dirs}, {3 * hidden}], got {list(P.shape)}")
    for name, state in (("initial_h", initial_h), ("initial_c", initial_c)):
        if state is not None and state.shape != (dirs, batch, hidden):
            raise ValueError(f"{name} must be [{dirs}, {batch}, {hidden}], got {list(state.shape)}")
    if sequence_lens is None:
        lens = np.full(batch, steps, dtype=np.int64)
    else:
        lens = np.asarray(sequence_lens).astype(np.int64).reshape(-1)
        if lens.shape != (batch,) or np.any(lens < 0) or np.any(lens > steps):
            raise ValueError(f"sequence_lens must hold {batch} values in [0, {steps}], got {lens.tolist()}")
    clip_value = FLT_MAX if clip is None else float(clip)
    if not clip_value > 0:
        raise ValueError(f"clip must be positive, got {clip}")
    fns = _activations(activations, activation_alpha, activation_beta, dirs)
    present = tuple(present_outputs) if present_outputs is not None else (True,) * max(noutputs, 1)
    keep_finished_h = not (len(present) > 0 and present[0])  # Y omitted: onnxruntime re-reads Y_h's rows
    groups = row_groups(batch, hidden, ORT_INTRA_OP_THREADS)

    zeros = np.zeros((dirs, batch, hidden), dtype=F32)
    y = np.zeros((steps, dirs, batch, hidden), dtype=F32)
    if lens.max(initial=0) == 0:  # onnxruntime: every output zero, nothing computed
        return (y, zeros, zeros.copy())[:max(noutputs, 1)]
    h0 = zeros if initial_h is None else np.asarray(initial_h, dtype=F32)
    c0 = zeros if initial_c is None else np.asarray(initial_c, dtype=F32)
    y_h, y_c = zeros.copy(), zeros.copy()
    for d in range(dirs):
        w_scale, w_zp = _weight_params(W_scale, W_zero_point, d, n, "W")
        r_scale, r_zp = _weight_params(R_scale, R_zero_point, d, n, "R")
        bias = None
        if B is not None:
            b = np.asarray(B[d], dtype=F32)
            bias = (b[:n] + b[n:]).astype(F32)  # LoadBias: Wb + Rb once, in float32
        peep = None if P is None else np.asarray(P[d], dtype=F32)
        reverse = direction == "reverse" or d == 1
        y[:, d], y_h[d], y_c[d] = _direction(x, lens, reverse, W[d], w_scale, w_zp, R[d], r_scale, r_zp, bias,
                                             peep, h0[d], c0[d], fns[d], clip_value, input_forget,
                                             keep_finished_h, groups)
    return (y, y_h, y_c)[:max(noutputs, 1)]
