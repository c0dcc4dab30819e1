"""Quantized operators (refquant.ops.qoperators) against onnxruntime 1.32 CPU, bit for bit.

Every case builds a one-node model, runs onnxruntime with ORT_DISABLE_ALL and ORT_ENABLE_ALL, and
requires np.array_equal (plus dtype and shape) with refquant.load + refquant.Session. Random cases
rarely land on a rounding tie, so each op also gets a *discriminating* corpus: inputs searched (with a
fixed seed, no onnxruntime needed for the search) on which our arithmetic and a plausible alternative
(float64, another rounding, the zero point added before rounding, no FMA, ...) disagree; onnxruntime
must side with ours there. Power-of-two scales with odd zero points make exact .5 ties.

CPU dependence (golden results depend on CPU flags): u8 x s8 products in onnxruntime's AVX2 kernels
without VNNI saturate pairs of products to int16 (vpmaddubsw). On such CPUs onnxruntime runs a model with
uint8 activations with its constant int8 weights stored as uint8 (tests.helpers.exact_ort_session: the same
function, exact u8 x u8 kernels), and int8 weights and activations are narrowed where int8 activations meet
them (no exact kernel takes those), so the comparison stays one of exact arithmetic. QLinearAdd and the logistic
reproduce the AVX2/FMA3 kernels; without AVX2+FMA their tests are skipped.
"""

from __future__ import annotations

import itertools
import zlib
from fractions import Fraction

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import refquant
from refquant import zoo
from refquant.errors import OpError
from refquant.intsim import requant as R
from refquant.ops import qoperators as Q

from .helpers import cpu_flags, exact_ort_session, onnxruntime_saturates_u8s8

F32 = np.float32
MS = "com.microsoft"
LEVELS = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
TYPES = {np.dtype(np.uint8): TensorProto.UINT8, np.dtype(np.int8): TensorProto.INT8,
         np.dtype(np.int32): TensorProto.INT32, np.dtype(np.float32): TensorProto.FLOAT,
         np.dtype(np.float16): TensorProto.FLOAT16}
IR = {13: 7, 17: 8, 19: 9, 21: 10}




# int8 activations have no exact onnxruntime kernel where u8 x s8 pairs saturate (it shifts them into that kernel):
# there the int8 weights are narrowed to [-64, 63]
W_LOW, W_HIGH = (-64, 63) if onnxruntime_saturates_u8s8() else (-128, 127)
# QLinearAdd and the logistic behind QLinearSigmoid are the AVX2/FMA3 kernels' arithmetic
needs_fma = pytest.mark.skipif(not {"avx2", "fma"} <= cpu_flags(), reason="onnxruntime runs its SSE2 kernels here")


# ----------------------------------------------------------------------------------------- harness
def build(op, inputs, attrs=None, domain="", opset=13, out_types=None, name="node"):
    """inputs: (name, array, constant) triples, None for an omitted optional input."""
    names, graph_inputs, inits = [], [], []
    for item in inputs:
        if item is None:
            names.append("")
            continue
        n, a, const = item
        a = np.asarray(a)
        names.append(n)
        if const:
            inits.append(numpy_helper.from_array(a, n))
        else:
            graph_inputs.append(helper.make_tensor_value_info(n, TYPES[a.dtype], list(a.shape)))
    out_types = out_types or [TYPES[np.asarray(next(i for i in inputs if i is not None)[1]).dtype]]
    outs = [f"y{i}" for i in range(len(out_types))]
    node = helper.make_node(op, names, outs, name=name, domain=domain or None, **(attrs or {}))
    graph = helper.make_graph([node], "g", graph_inputs,
                              [helper.make_tensor_value_info(o, t, None) for o, t in zip(outs, out_types)],
                              initializer=inits)
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(MS, 1)] if domain == MS else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = IR.get(opset, 8)
    return model


def run_ort(model, feeds, level=LEVELS[0]):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = 1
    return exact_ort_session(model, options).run(None, feeds)


def run_refquant(model, feeds):
    graph = refquant.load(model)
    got = refquant.Session(graph).run(feeds)
    return [np.asarray(got[o.name]) for o in model.graph.output]


def check(model, feeds):
    """refquant's outputs, asserted bit-identical to onnxruntime's at both optimization levels."""
    ours = run_refquant(model, feeds)
    for level in LEVELS:
        for want, got in zip(run_ort(model, feeds, level), ours):
            assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, want.dtype, got.shape, want.shape)
            assert np.array_equal(got, want), f"{level}: {int((got != want).sum())} of {got.size} differ"
    return ours


def search(make, ours, alternative, tries):
    """The first case (from ``make(i)``) on which ``ours`` and ``alternative`` disagree."""
    for i in range(tries):
        case = make(i)
        if not np.array_equal(ours(case), alternative(case)):
            return case
    raise AssertionError(f"no discriminating case in {tries} tries")


def rand_scale(rng, low=-3.0, high=-1.0, size=None):
    v = 10 ** rng.uniform(low, high, size)
    return F32(v) if size is None else np.asarray(v, dtype=F32)


def out_scale(scale_product, k, spread=40.0):
    """An output scale putting acc * scale_product / out_scale mostly within +-spread: |acc| ~ sqrt(k) * 74^2
    for full-range 8-bit operands (74 = the standard deviation of a uniform 8-bit code)."""
    return F32(float(scale_product) * np.sqrt(k) * 74 * 74 / spread)


def rand_q(rng, dtype, shape=None):
    info = np.iinfo(dtype)
    if shape is None:
        return dtype(rng.integers(info.min, info.max + 1))
    return rng.integers(info.min, info.max + 1, shape).astype(dtype)


# ----------------------------------------------------------------------------------------- QLinearConv
def _conv_case(seed):
    rng = np.random.default_rng(seed)
    act = (np.uint8, np.int8)[seed % 2]
    wdt = np.int8 if act == np.int8 or seed % 5 else np.uint8
    nd = (2, 2, 1, 3, 2)[seed % 5]
    depthwise = seed % 4 == 3
    group = 1 if seed % 3 == 0 else (2, 4)[seed % 2]
    cg = int(rng.integers(1, 5))
    c = cg * group
    if depthwise:
        group = c = int(rng.integers(2, 9))
        cg = 1
    m = group * int(rng.integers(1, 4))
    kernel = [int(rng.choice([1, 2, 3])) for _ in range(nd)]
    spatial = [int(rng.integers(max(kernel) + 2, 10 if nd < 3 else 6)) for _ in range(nd)]
    attrs = dict(kernel_shape=kernel, group=group,
                 strides=[int(rng.integers(1, 3)) for _ in range(nd)],
                 pads=[int(rng.integers(0, k)) for k in kernel] * 2 if seed % 3 else [0] * (2 * nd),
                 dilations=[2 if (seed % 7 == 0 and k > 1) else 1 for k in kernel])
    x = rand_q(rng, act, [int(rng.integers(1, 3)), c] + spatial)
    if wdt == np.int8:
        w = rng.integers(W_LOW, W_HIGH + 1, [m, cg] + kernel).astype(np.int8)
    else:
        w = rand_q(rng, np.uint8, [m, cg] + kernel)
    per_channel = seed % 3 != 1
    ws = rand_scale(rng, size=m) if per_channel else rand_scale(rng)
    wz = np.zeros(m if per_channel else (), wdt) + (wdt(rng.integers(0, 256)) if wdt == np.uint8 else 0)
    xs = rand_scale(rng)
    ys = out_scale(xs * float(np.mean(ws)) * rng.uniform(0.5, 2), cg * np.prod(kernel))
    bias = rng.integers(-30000, 30000, m).astype(np.int32) if seed % 4 else None
    inputs = [("x", x, False), ("xs", xs, True), ("xz", rand_q(rng, act), True), ("w", w, True), ("ws", ws, True),
              ("wz", wz.astype(wdt), True), ("ys", ys, True), ("yz", rand_q(rng, act), True)]
    if bias is not None:
        inputs.append(("b", bias, True))
    if seed % 8 == 6:
        attrs["auto_pad"] = ("SAME_UPPER", "SAME_LOWER", "VALID")[seed % 3]
        del attrs["pads"]
    return inputs, attrs, x


@pytest.mark.parametrize("seed", range(24))
def test_qlinearconv_random(seed):
    inputs, attrs, x = _conv_case(seed)
    check(build("QLinearConv", inputs, attrs, opset=(13, 19, 21)[seed % 3]), {"x": x})


def _tie_conv(seed, act):
    """Power-of-two scales, odd output zero point: acc * M lands on exact .5 ties (numerics.md §5)."""
    rng = np.random.default_rng(seed)
    m = 16
    x = rand_q(rng, act, (1, 8, 6, 6))
    w = rng.integers(W_LOW, W_HIGH + 1, (m, 8, 3, 3)).astype(np.int8)
    ys = F32(2.0 ** int(rng.integers(-4, 0)))
    yz = act(int(rng.integers(-60, 60)) * 2 + 1 + (128 if act == np.uint8 else 0))
    ws = np.full(m, 2.0 ** -5, F32) if seed % 2 else F32(2.0 ** -5)
    inputs = [("x", x, False), ("xs", F32(2.0 ** -4), True), ("xz", rand_q(rng, act), True), ("w", w, True),
              ("ws", ws, True), ("wz", np.zeros(np.shape(ws), np.int8), True), ("ys", ys, True), ("yz", yz, True),
              ("b", rng.integers(-5000, 5000, m).astype(np.int32), True)]
    return inputs, x


@pytest.mark.parametrize("act", [np.uint8, np.int8])
def test_qlinearconv_ties_follow_round_half_even_then_zero_point(act):
    ties = differing = 0
    for seed in range(6):
        inputs, x = _tie_conv(seed, act)
        (y,) = check(build("QLinearConv", inputs, dict(pads=[1, 1, 1, 1])), {"x": x})
        args = {n: a for n, a, _ in inputs}
        acc = Q._conv_accumulate(x, int(args["xz"]), args["w"], np.zeros(1, np.int64),
                                 Q._conv_attrs("NOTSET", None, 1, None, [1, 1, 1, 1], None))[0]
        acc = acc.astype(np.int64) + args["b"].reshape(1, -1, 1, 1)
        mult = R.ort_multiplier(args["xs"], args["ws"], args["ys"]).reshape(-1)
        frac = (acc * mult.astype(np.float64).reshape(1, -1, 1, 1)) % 1
        ties += int((frac == 0.5).sum())
        qmin, qmax = np.iinfo(act).min, np.iinfo(act).max
        ref = R.requantize(acc, mult, int(args["yz"]), qmin, qmax, "onnx_reference", axis=1)
        differing += int((ref != y).sum())
    assert ties > 20           # the corpus holds exact ties ...
    assert differing > 0       # ... on which adding the zero point before rounding would be wrong


def test_qlinearconv_int32_overflow_is_an_error_naming_the_node():
    c = 8192  # K = 8192 * 9 = 73728; 73728 * 255 * 127 > 2^31
    x = np.full((1, c, 3, 3), 255, np.uint8)
    w = np.full((1, c, 3, 3), 127, np.int8)
    model = build("QLinearConv", [("x", x, False), ("xs", F32(1), True), ("xz", np.uint8(0), True),
                                  ("w", w, True), ("ws", F32(1), True), ("wz", np.int8(0), True),
                                  ("ys", F32(1e6), True), ("yz", np.uint8(0), True)], name="big_conv")
    session = refquant.Session(refquant.load(model))
    with pytest.raises(OpError, match="big_conv.*int32 accumulator overflows"):
        session.run({"x": x})


def test_float64_accumulation_bound_and_int64_fallback_agree():
    rng = np.random.default_rng(0)
    # realistic reductions are far below 2^53 for 8-bit operands: 255 * 255 * K < 2^53 for K < 1.3e11
    for k in (3 * 3 * 2048, 7 * 7 * 4096, 1 << 20):
        assert k * 255 * 255 < Q.EXACT_LIMIT
    x = rand_q(rng, np.uint8, (2, 6, 9, 9))
    w = rand_q(rng, np.int8, (8, 3, 3, 3))
    attrs = Q._conv_attrs("NOTSET", [2, 1], 2, None, [1, 0, 2, 1], [1, 2])
    fast, _ = Q._conv_accumulate(x, 7, w, np.arange(8, dtype=np.int64), attrs)
    slow, _ = Q._conv_accumulate(x, 7, w, np.arange(8, dtype=np.int64), attrs, force_int64=True)
    assert fast.dtype == np.float64 and slow.dtype == np.int64
    assert np.array_equal(fast, slow)
    a, b = rand_q(rng, np.int8, (3, 5, 40)), rand_q(rng, np.uint8, (40, 7))
    fast, _ = Q._matmul_accumulate(a, np.int64(3), b, np.arange(7, dtype=np.int64))
    slow, _ = Q._matmul_accumulate(a, np.int64(3), b, np.arange(7, dtype=np.int64), force_int64=True)
    assert np.array_equal(fast, slow)


# ----------------------------------------------------------------------------------------- QLinearMatMul
def _matmul_case(seed, ties=False):
    rng = np.random.default_rng(100 + seed)
    act = (np.uint8, np.int8)[seed % 2]
    bdt = np.uint8 if act == np.uint8 and seed % 4 == 0 else np.int8
    batch = [2] if seed % 3 == 0 else []
    m, k, n = (int(rng.integers(1, 30)) for _ in range(3))
    a = rand_q(rng, act, batch + [m, k])
    b = (rand_q(rng, np.uint8, (k, n)) if bdt == np.uint8
         else rng.integers(W_LOW, W_HIGH + 1, (k, n)).astype(np.int8))
    per_column = seed % 2 == 0 and bdt == np.int8
    if ties:
        as_, bs = F32(2.0 ** -4), (np.full(n, 2.0 ** -5, F32) if per_column else F32(2.0 ** -5))
        ys = F32(2.0 ** int(rng.integers(-3, 0)))
        yz = act(int(rng.integers(-50, 50)) * 2 + 1 + (128 if act == np.uint8 else 0))
    else:
        as_, bs = rand_scale(rng), (rand_scale(rng, size=n) if per_column else rand_scale(rng))
        ys = out_scale(as_ * float(np.mean(bs)) * rng.uniform(0.5, 2), k)
        yz = rand_q(rng, act)
    bz = np.zeros(np.shape(bs), bdt) + (bdt(rng.integers(0, 256)) if bdt == np.uint8 else 0)
    inputs = [("a", a, False), ("as", as_, True), ("az", rand_q(rng, act), True), ("b", b, True), ("bs", bs, True),
              ("bz", bz.astype(bdt), True), ("ys", ys, True), ("yz", yz, True)]
    return inputs, a


@pytest.mark.parametrize("seed", range(16))
def test_qlinearmatmul_random(seed):
    inputs, a = _matmul_case(seed)
    check(build("QLinearMatMul", inputs, opset=(13, 21)[seed % 2]), {"a": a})


def test_qlinearmatmul_ties():
    differing = 0
    for seed in range(8):
        inputs, a = _matmul_case(seed, ties=True)
        (y,) = check(build("QLinearMatMul", inputs), {"a": a})
        args = {n: v for n, v, _ in inputs}
        acc = (a.astype(np.int64) - int(args["az"])) @ (args["b"].astype(np.int64) - args["bz"].astype(np.int64))
        mult = R.ort_multiplier(args["as"], args["bs"], args["ys"])
        info = np.iinfo(a.dtype)
        differing += int((R.requantize(acc, mult, int(args["yz"]), info.min, info.max, "onnx_reference") != y).sum())
    assert differing > 0


def test_qlinearmatmul_float16_scales_are_widened_to_float32_like_onnxruntime():
    rng = np.random.default_rng(7)
    h = np.float16

    def make(i):
        a = rand_q(rng, np.uint8, (8, 16))
        b = rng.integers(W_LOW, W_HIGH + 1, (16, 8)).astype(np.int8)
        as_, bs = h(10 ** rng.uniform(-3, -1)), h(10 ** rng.uniform(-3, -1))
        return a, as_, b, bs, h(float(as_) * float(bs) * rng.uniform(20, 200))

    def ours(case):
        a, as_, b, bs, ys = case
        return Q.qlinear_matmul_21(a, as_, np.uint8(7), b, bs, np.int8(0), ys, np.uint8(9))

    def in_float16(case):  # onnx.reference's way: the multiplier computed in float16
        a, as_, b, bs, ys = case
        acc = (a.astype(np.int64) - 7) @ b.astype(np.int64)
        return R.requantize(acc, (as_ * bs / ys).astype(np.float32), 9, 0, 255, "ort")

    a, as_, b, bs, ys = search(make, ours, in_float16, 3000)
    (y,) = check(build("QLinearMatMul", [("a", a, False), ("as", as_, True), ("az", np.uint8(7), True), ("b", b, True),
                                         ("bs", bs, True), ("bz", np.int8(0), True), ("ys", ys, True),
                                         ("yz", np.uint8(9), True)], opset=21), {"a": a})
    assert not np.array_equal(y, in_float16((a, as_, b, bs, ys)))


# ----------------------------------------------------------------------------------------- ConvInteger / MatMulInteger
@pytest.mark.parametrize("seed", range(8))
def test_conv_integer_and_matmul_integer_random(seed):
    rng = np.random.default_rng(200 + seed)
    act = (np.uint8, np.int8)[seed % 2]
    wdt = (np.uint8, np.int8)[(seed // 2) % 2]
    low, high = np.iinfo(wdt).min, np.iinfo(wdt).max
    # int8 activations: onnxruntime has no exact kernel for them on CPUs where u8 x s8 pairs saturate (it shifts
    # operands by 128 into its u8 x s8 kernel). Activations in [-63, 63] and weights within 64 of their type's
    # middle keep every shifted pair sum below 2 * 191 * 64 < 2^15, so the comparison stays one of exact sums.
    narrow = act == np.int8 and onnxruntime_saturates_u8s8()
    if narrow:
        low, high = (64, 191) if wdt == np.uint8 else (-64, 63)

    def activations(shape=None):
        return np.clip(rand_q(rng, act, shape), -63, 63).astype(act) if narrow else rand_q(rng, act, shape)

    x = activations((2, 4, 7, 8))
    w = rng.integers(low, high + 1, (6, 2, 3, 3)).astype(wdt)
    zps = [("xz", activations(), True), ("wz", wdt(rng.integers(low, high + 1)), True)][: 1 + seed % 2]
    model = build("ConvInteger", [("x", x, False), ("w", w, True)] + zps,
                  dict(group=2, pads=[1, 0, 1, 1], strides=[2, 1], dilations=[1, 1 + seed % 2]),
                  out_types=[TensorProto.INT32])
    check(model, {"x": x})
    a = activations((2, 5, 33))
    b = rng.integers(low, high + 1, (33, 6)).astype(wdt)
    bz = np.asarray(rng.integers(low, high + 1, 6 if seed % 2 else ())).astype(wdt)  # per column or per tensor
    model = build("MatMulInteger", [("a", a, False), ("b", b, True), ("az", activations(), True), ("bz", bz, True)],
                  out_types=[TensorProto.INT32])
    check(model, {"a": a})


def test_conv_integer_per_channel_zero_points_follow_the_spec():
    # onnxruntime refuses per-channel w_zero_point in ConvInteger; the ONNX spec allows it: check exactly
    rng = np.random.default_rng(3)
    x, w = rand_q(rng, np.uint8, (1, 3, 5, 5)), rand_q(rng, np.uint8, (4, 3, 3, 3))
    wz = np.array([0, 7, 200, 255], np.uint8)
    y = Q.conv_integer(x, w, np.uint8(9), wz, pads=[1, 1, 1, 1])
    xp = np.pad(x.astype(np.int64) - 9, ((0, 0), (0, 0), (1, 1), (1, 1)))
    wd = w.astype(np.int64) - wz.reshape(-1, 1, 1, 1)
    want = np.zeros((1, 4, 5, 5), np.int64)
    for i, j in itertools.product(range(5), range(5)):
        want[0, :, i, j] = (wd * xp[0, :, i:i + 3, j:j + 3]).sum(axis=(1, 2, 3))
    assert y.dtype == np.int32 and np.array_equal(y, want)


# ----------------------------------------------------------------------------------------- DynamicQuantizeLinear
def _dql_model(x):
    return build("DynamicQuantizeLinear", [("x", x, False)], opset=13,
                 out_types=[TensorProto.UINT8, TensorProto.FLOAT, TensorProto.UINT8])


@pytest.mark.parametrize("kind", ["mixed", "positive", "negative", "zeros", "constant", "wide"])
def test_dynamic_quantize_linear(kind):
    rng = np.random.default_rng(len(kind))
    x = rng.normal(0.3, 1.7, (3, 7, 11)).astype(F32)
    x = {"mixed": x, "positive": np.abs(x), "negative": -np.abs(x), "zeros": np.zeros_like(x),
         "constant": np.full_like(x, 2.5), "wide": x * F32(1e4)}[kind]
    check(_dql_model(x), {"x": x})


def test_dynamic_quantize_linear_divides_by_the_scale():
    rng = np.random.default_rng(5)

    def make(i):  # values at (k + 1/2) * scale: near-ties where x / s and x * (1/s) can round apart
        low, high = F32(-rng.uniform(0.5, 3)), F32(rng.uniform(0.5, 3))
        scale = F32(F32(high - low) / F32(255))
        k = rng.integers(int(np.ceil(low / scale)), int(np.floor(high / scale)), 500)
        return np.concatenate([[low, high], ((k + 0.5) * float(scale)).astype(F32)]).astype(F32)

    def ours(x):
        return Q.dynamic_quantize_linear(x)[0]

    def reciprocal(x):
        _, s, z = Q.dynamic_quantize_linear(x)
        return np.clip(np.rint(x * (F32(1) / s)) + int(z), 0, 255).astype(np.uint8)

    x = search(make, ours, reciprocal, 300)
    (y, _, _) = check(_dql_model(x), {"x": x})
    assert not np.array_equal(y, reciprocal(x))


# ----------------------------------------------------------------------------------------- QGemm
@pytest.mark.parametrize("seed", range(12))
def test_qgemm_random(seed):
    rng = np.random.default_rng(300 + seed)
    act = (np.uint8, np.int8)[seed % 2]
    m, k, n = (int(rng.integers(1, 30)) for _ in range(3))
    trans_a, trans_b = seed % 3 == 0, seed % 4 < 2
    a = rand_q(rng, act, (k, m) if trans_a else (m, k))
    b = rng.integers(W_LOW, W_HIGH + 1, (n, k) if trans_b else (k, n)).astype(np.int8)
    per_column = seed % 2 == 0
    bs = rand_scale(rng, size=n) if per_column else rand_scale(rng)
    c_shape = [(), (n,), (1, n), (m, 1), (m, n)][seed % 5]
    as_, alpha = rand_scale(rng), float(rng.choice([1.0, 0.5, 1.7]))
    ys = out_scale(as_ * float(np.mean(bs)) * alpha, k)
    inputs = [("a", a, False), ("as", as_, True), ("az", rand_q(rng, act), True), ("b", b, True), ("bs", bs, True),
              ("bz", np.zeros(np.shape(bs), np.int8), True),
              ("c", rng.integers(-20000, 20000, c_shape).astype(np.int32), True) if seed % 6 else None]
    quantized_output = seed % 3 != 2
    if quantized_output:
        inputs += [("ys", ys, True), ("yz", rand_q(rng, act), True)]
    elif seed % 2:
        inputs += [("ys", ys, True)]
    out = [TYPES[np.dtype(act)] if quantized_output else TensorProto.FLOAT]
    model = build("QGemm", inputs, dict(alpha=alpha, transA=int(trans_a), transB=int(trans_b)), domain=MS,
                  out_types=out)
    check(model, {"a": a})


def test_qgemm_scale_is_alpha_times_a_scale_first():
    rng = np.random.default_rng(9)

    def make(i):
        a, b = rand_q(rng, np.uint8, (512, 64)), rng.integers(W_LOW, W_HIGH + 1, (64, 16)).astype(np.int8)
        as_, bs = rand_scale(rng), rand_scale(rng, size=16)
        alpha = F32(rng.uniform(0.3, 3))
        return a, as_, b, bs, alpha, out_scale(alpha * as_ * bs.mean(), 64, spread=100)

    def ours(case):
        a, as_, b, bs, alpha, ys = case
        return Q.qgemm(a, as_, np.uint8(3), b, bs, np.zeros(16, np.int8), None, ys, np.uint8(5), alpha=float(alpha))

    def other_order(case):  # alpha * (a_scale * b_scale) / y_scale
        a, as_, b, bs, alpha, ys = case
        acc = (a.astype(np.int64) - 3) @ b.astype(np.int64)
        scale = ((alpha * (as_ * bs).astype(F32)).astype(F32) / ys).astype(F32)
        return R.requantize(acc, scale, 5, 0, 255, "ort")

    case = search(make, ours, other_order, 500)
    a, as_, b, bs, alpha, ys = case
    model = build("QGemm", [("a", a, False), ("as", as_, True), ("az", np.uint8(3), True), ("b", b, True),
                            ("bs", bs, True), ("bz", np.zeros(16, np.int8), True), None, ("ys", ys, True),
                            ("yz", np.uint8(5), True)], dict(alpha=float(alpha)), domain=MS)
    (y,) = check(model, {"a": a})
    assert not np.array_equal(y, other_order(case))


# ----------------------------------------------------------------------------------------- QLinearAdd / QLinearMul
BROADCASTS = [((2, 3, 4, 5), (2, 3, 4, 5)), ((2, 3, 4, 5), (1, 3, 1, 1)), ((1, 3, 1, 1), (2, 3, 4, 5)),
              ((37,), ()), ((), (6, 7)), ((3, 1, 5), (1, 4, 1)), ((2, 1, 1), (2, 5, 1)), ((1,), (1,))]


@pytest.mark.parametrize("shapes", BROADCASTS, ids=str)
@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("op", ["QLinearAdd", "QLinearMul"])
def test_qlinear_binary_random(op, dtype, shapes):
    if op == "QLinearAdd" and not {"avx2", "fma"} <= cpu_flags():
        pytest.skip("missing CPU features avx2+fma: onnxruntime runs its SSE2 QLinearAdd formula here")
    rng = np.random.default_rng(zlib.crc32(repr((op, np.dtype(dtype).name, shapes)).encode()))
    for _ in range(3):
        a, b = rand_q(rng, dtype, shapes[0]), rand_q(rng, dtype, shapes[1])
        if op == "QLinearAdd":
            sa, sb = rand_scale(rng), rand_scale(rng)
            sc = F32((sa + sb) * rng.uniform(0.3, 1.5))
        else:
            sa, sb = rand_scale(rng, -2, 0), rand_scale(rng, -2, 0)
            sc = F32(sa * sb * rng.uniform(20, 200))
        inputs = [("a", a, False), ("sa", sa, True), ("za", rand_q(rng, dtype), True), ("b", b, False),
                  ("sb", sb, True), ("zb", rand_q(rng, dtype), True), ("sc", sc, True),
                  ("zc", rand_q(rng, dtype), True)]
        check(build(op, inputs, domain=MS), {"a": a, "b": b})


def test_onnxruntime_broadcast_structure():
    mode = Q.ort_broadcast_mode
    assert mode((2, 3, 4, 5), (2, 3, 4, 5)) == "general"
    assert mode((2, 3, 4, 5), (1, 3, 1, 1)) == "b_scalar"
    assert mode((1, 3, 1, 1), (2, 3, 4, 5)) == "a_scalar"
    assert mode((3, 1, 5), (1, 4, 1)) == "b_scalar"
    assert mode((), (6, 7)) == "a_scalar" and mode((37,), ()) == "b_scalar"
    assert mode((1, 3, 1, 1), (1, 3, 1, 1)) == "general"
    assert mode((1,), (1,)) == "a_scalar"


# (A_scale, B_scale, C_scale, A_zp, B_zp, C_zp) on which MLAS's FMA contractions change results;
# found by search (see module docstring): the first group needs ZeroPointC - fma(rAC, zA, rBC*zB),
# the second FixedPart = fma(b, rBC, FixedPart) for a broadcast operand
FIXED_PART_CASES = [
    (np.uint8, 0.0024679696653038263, 0.002205738564953208, 0.002418398391455412, 104, 201, 154),
    (np.uint8, 0.0032666462939232588, 0.00208114692941308, 0.0027539038565009832, 40, 215, 78),
    (np.int8, 0.03099081851541996, 0.001121055567637086, 0.011507799848914146, -44, 109, 40),
    (np.int8, 0.07046117633581161, 0.01976524293422699, 0.037265896797180176, -70, -79, 118),
]
SCALAR_CASES = [
    (np.uint8, 0.009528880938887596, 0.036996662616729736, 0.05719130113720894, 91, 137, 241),
    (np.uint8, 0.001146745285950601, 0.004244604147970676, 0.005967431236058474, 225, 236, 165),
    (np.int8, 0.0036887056194245815, 0.04289292171597481, 0.04822506383061409, 5, 53, -20),
    (np.int8, 0.008691463619470596, 0.002973766764625907, 0.0071639372035861015, -38, -22, -36),
]


@needs_fma
@pytest.mark.parametrize("case", FIXED_PART_CASES + SCALAR_CASES)
def test_qlinear_add_reproduces_the_avx2_kernels_fma(case, monkeypatch):
    dtype, sa, sb, sc, za, zb, zc = case
    info = np.iinfo(dtype)
    codes = np.arange(info.min, info.max + 1)
    scalar = case in SCALAR_CASES
    if scalar:  # B broadcast along the innermost span: the kernel's IsScalarB path
        a, b = np.tile(codes, 256).reshape(256, 256).astype(dtype), codes.reshape(256, 1).astype(dtype)
    else:
        a, b = np.repeat(codes, 256).astype(dtype), np.tile(codes, 256).astype(dtype)
    inputs = [("a", a, False), ("sa", F32(sa), True), ("za", dtype(za), True), ("b", b, False),
              ("sb", F32(sb), True), ("zb", dtype(zb), True), ("sc", F32(sc), True), ("zc", dtype(zc), True)]
    (y,) = check(build("QLinearAdd", inputs, domain=MS), {"a": a, "b": b})
    monkeypatch.setattr(Q, "QLADD_SCALAR_FMA" if scalar else "QLADD_FIXED_PART_FMA", False)
    unfused = Q.qlinear_add(a, F32(sa), dtype(za), b, F32(sb), dtype(zb), F32(sc), dtype(zc))
    assert not np.array_equal(y, unfused)


def test_qlinear_mul_is_float32_multiply_then_add():
    rng = np.random.default_rng(12)

    def make(i):
        dtype = (np.uint8, np.int8)[i % 2]
        info = np.iinfo(dtype)
        a = np.repeat(np.arange(info.min, info.max + 1), 256).astype(dtype)
        b = np.tile(np.arange(info.min, info.max + 1), 256).astype(dtype)
        sa, sb = F32(2.0 ** int(rng.integers(-8, -3))), F32(2.0 ** int(rng.integers(-8, -3)))
        return (dtype, a, sa, rand_q(rng, dtype), b, sb, rand_q(rng, dtype), F32(2.0 ** int(rng.integers(-6, -1))),
                dtype(int(rand_q(rng, dtype)) | 1))

    def ours(c):
        return Q.qlinear_mul(*c[1:])

    def exact_round_then_zero_point_in_float64(c):
        dtype, a, sa, za, b, sb, zb, sc, zc = c
        v = (a.astype(np.float64) - za) * (b.astype(np.float64) - zb) * float(sa) * float(sb) / float(sc)
        info = np.iinfo(dtype)
        return np.clip(np.rint(v) + int(zc), info.min, info.max).astype(dtype)

    for _ in range(2):
        case = search(make, ours, exact_round_then_zero_point_in_float64, 200)
        dtype, a, sa, za, b, sb, zb, sc, zc = case
        inputs = [("a", a, False), ("sa", sa, True), ("za", za, True), ("b", b, False), ("sb", sb, True),
                  ("zb", zb, True), ("sc", sc, True), ("zc", zc, True)]
        (y,) = check(build("QLinearMul", inputs, domain=MS), {"a": a, "b": b})
        assert not np.array_equal(y, exact_round_then_zero_point_in_float64(case))


def test_fma32_is_one_rounding():
    rng = np.random.default_rng(1)
    a = (rng.normal(0, 1, 20000) * 10 ** rng.uniform(-5, 5, 20000)).astype(F32)
    b = (rng.normal(0, 1, 20000) * 10 ** rng.uniform(-5, 5, 20000)).astype(F32)
    c = (rng.normal(0, 1, 20000) * 10 ** rng.uniform(-10, 10, 20000)).astype(F32)
    got = Q.fma32(a, b, c)
    for x, y, z, r in zip(a[:3000], b[:3000], c[:3000], got[:3000]):
        exact = Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z))
        lo = F32(float(exact))  # neighbours of the exact value: r must be the nearest float32 (ties to even)
        candidates = {lo, np.nextafter(lo, F32(np.inf)), np.nextafter(lo, F32(-np.inf))}
        best = min(candidates, key=lambda v: (abs(Fraction(float(v)) - exact),
                                              int(np.asarray(v).view(np.int32)) & 1))
        assert r == best
    # (1 + 2^-12)^2 = 1 + 2^-11 + 2^-24 is a float32 midpoint: a float64 sum with 2^-60 rounds onto it
    # and a second rounding to float32 would go to even (down); one rounding goes up
    one = F32(1 + 2.0 ** -12)
    assert Q.fma32(one, one, F32(2.0 ** -60)) == F32(1 + 2.0 ** -11 + 2.0 ** -23)
    assert F32(float(one) * float(one) + 2.0 ** -60) == F32(1 + 2.0 ** -11)


# ----------------------------------------------------------------------------------------- lookup-table ops
def _all_codes(dtype):
    return np.arange(256, dtype=np.uint8).view(dtype).reshape(4, 64)


def _lut_model(op, dtype, xs, xz, ys, yz, attrs=None):
    x = _all_codes(dtype)
    return build(op, [("x", x, False), ("xs", F32(xs), True), ("xz", dtype(xz), True), ("ys", F32(ys), True),
                      ("yz", dtype(yz), True)], attrs, domain=MS), x


@needs_fma
@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_qlinear_sigmoid_and_leaky_relu_random(dtype):
    rng = np.random.default_rng(np.dtype(dtype).itemsize + (dtype == np.int8))
    info = np.iinfo(dtype)
    for _ in range(6):
        xs, xz = rand_scale(rng, -2.5, -0.5), rand_q(rng, dtype)
        model, x = _lut_model("QLinearSigmoid", dtype, xs, xz, F32(rng.uniform(0.8, 1.2) / 256), info.min)
        check(model, {"x": x})
        model, x = _lut_model("QLinearLeakyRelu", dtype, xs, xz, rand_scale(rng, -2.5, -0.5), rand_q(rng, dtype),
                              dict(alpha=float(rng.choice([0.01, 0.1, 0.2, 1 / 3]))))
        check(model, {"x": x})


@needs_fma
def test_qlinear_sigmoid_uses_mlas_logistic_not_the_exact_sigmoid():
    rng = np.random.default_rng(10)

    def make(i):
        dtype = (np.uint8, np.int8)[i % 2]
        info = np.iinfo(dtype)
        return dtype, rand_scale(rng, -2.5, -0.5), int(rand_q(rng, dtype)), F32(rng.uniform(0.8, 1.2) / 256), info.min

    def ours(c):
        return Q.lookup_table(*c[1:], c[0], Q.mlas_logistic)

    def exact_sigmoid(c):
        return Q.lookup_table(*c[1:], c[0], lambda v: (1 / (1 + np.exp(-v.astype(np.float64)))).astype(F32))

    case = search(make, ours, exact_sigmoid, 10000)
    model, x = _lut_model("QLinearSigmoid", case[0], *case[1:])
    (y,) = check(model, {"x": x})
    assert not np.array_equal(y, exact_sigmoid(case)[x.view(np.uint8)])


def test_qlinear_leaky_relu_multiplies_alpha_in_float32():
    rng = np.random.default_rng(10)

    def make(i):
        dtype = (np.uint8, np.int8)[i % 2]
        return (dtype, rand_scale(rng, -2.5, -0.5), int(rand_q(rng, dtype)), rand_scale(rng, -2.5, -0.5),
                int(rand_q(rng, dtype)), float(rng.choice([0.01, 0.1, 0.2, 0.3])))

    def ours(c):
        dtype, xs, xz, ys, yz, alpha = c
        return Q.qlinear_leaky_relu(np.arange(256, dtype=np.uint8).view(dtype), xs, dtype(xz), ys, dtype(yz),
                                    alpha=alpha)

    def in_float64(c):
        dtype, xs, xz, ys, yz, alpha = c
        info = np.iinfo(dtype)
        v = float(xs) * (np.arange(256, dtype=np.uint8).view(dtype).astype(np.float64) - xz)
        return np.clip(np.rint(np.where(v >= 0, v, alpha * v) / float(ys)) + yz, info.min, info.max).astype(dtype)

    case = search(make, ours, in_float64, 30000)
    model, x = _lut_model("QLinearLeakyRelu", case[0], *case[1:5], dict(alpha=case[5]))
    (y,) = check(model, {"x": x})
    assert not np.array_equal(y.reshape(-1), in_float64(case))


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_qlinear_concat(dtype):
    rng = np.random.default_rng(20 + (dtype == np.int8))
    for axis in (0, 1, -1):
        shapes = [[2, 3, 4], [2, 3, 4], [2, 3, 4]]
        for s, extra in zip(shapes, (1, 2, 3)):
            s[axis] += extra
        xs_ = [rand_q(rng, dtype, s) for s in shapes]
        ys, yz = rand_scale(rng, -2, -1), rand_q(rng, dtype)
        inputs = [("ys", ys, True), ("yz", yz, True)]
        for i, x in enumerate(xs_):  # input 1 has Y's parameters: copied, not requantized
            same = i == 1
            inputs += [(f"x{i}", x, False), (f"s{i}", ys if same else rand_scale(rng, -2, -1), True),
                       (f"z{i}", yz if same else rand_q(rng, dtype), True)]
        model = build("QLinearConcat", inputs, dict(axis=axis), domain=MS, out_types=[TYPES[np.dtype(dtype)]])
        check(model, {f"x{i}": x for i, x in enumerate(xs_)})


def test_qlinear_concat_requantizes_with_round_then_zero_point():
    rng = np.random.default_rng(4)

    def make(i):  # power-of-two scale ratio: .5 ties; odd output zero point
        dtype = (np.uint8, np.int8)[i % 2]
        return dtype, F32(2.0 ** -3), int(rand_q(rng, dtype)), F32(2.0 ** -2), int(rand_q(rng, dtype)) | 1

    def ours(c):
        return Q.lookup_table(*c[1:], c[0], lambda v: v)

    def zero_point_first(c):
        dtype, xs, xz, ys, yz = c
        info = np.iinfo(dtype)
        codes = np.arange(256, dtype=np.uint8).view(dtype).astype(np.float64)
        return np.clip(np.rint((codes - xz) * float(xs) / float(ys) + yz), info.min, info.max).astype(dtype)

    case = search(make, ours, zero_point_first, 10)
    dtype, xs, xz, ys, yz = case
    x = np.arange(256, dtype=np.uint8).view(dtype).reshape(1, 256)
    model = build("QLinearConcat", [("ys", ys, True), ("yz", dtype(yz), True), ("x0", x, False), ("s0", xs, True),
                                    ("z0", dtype(xz), True)], dict(axis=0), domain=MS,
                  out_types=[TYPES[np.dtype(dtype)]])
    (y,) = check(model, {"x0": x})
    assert not np.array_equal(y[0], zero_point_first(case))


# ----------------------------------------------------------------------------------------- pooling
def _pool_inputs(rng, dtype, shape, ties=False):
    x = rand_q(rng, dtype, shape)
    if ties:
        xs, ys = F32(2.0 ** -4), F32(2.0 ** -int(rng.integers(2, 6)))
        yz = dtype(int(rand_q(rng, dtype)) | 1)
    else:
        xs = rand_scale(rng, -2, -1)
        ys, yz = F32(xs * rng.uniform(0.3, 2)), rand_q(rng, dtype)
    return x, [("x", x, False), ("xs", xs, True), ("xz", rand_q(rng, dtype), True), ("ys", ys, True), ("yz", yz, True)]


@pytest.mark.parametrize("seed", range(16))
def test_qlinear_average_pool_random(seed):
    rng = np.random.default_rng(400 + seed)
    dtype = (np.uint8, np.int8)[seed % 2]
    channels_last = int(seed % 4 >= 2)
    nd = (2, 2, 1, 2, 3, 2, 2, 1)[seed % 8]
    spatial = [int(rng.integers(4, 9 if nd < 3 else 6)) for _ in range(nd)]
    kernel = [int(rng.integers(1, 4)) for _ in range(nd)]
    shape = [2, 5] + spatial
    if channels_last:
        shape = [shape[0]] + shape[2:] + [shape[1]]
    attrs = dict(kernel_shape=kernel, strides=[int(rng.integers(1, 3)) for _ in range(nd)],
                 count_include_pad=seed % 3 == 0, channels_last=channels_last)
    if seed % 5:
        attrs["pads"] = [int(rng.integers(0, k)) for k in kernel] * 2
    if seed % 6 == 5:
        attrs["ceil_mode"] = 1
    if seed % 8 == 7:
        attrs = dict(kernel_shape=kernel, auto_pad="SAME_UPPER", channels_last=channels_last)
    x, inputs = _pool_inputs(rng, dtype, shape, ties=seed % 2 == 0)
    attrs = {k: int(v) if isinstance(v, (bool, np.bool_)) else v for k, v in attrs.items()}
    check(build("QLinearAveragePool", inputs, attrs, domain=MS), {"x": x})


@pytest.mark.parametrize("channels_last", [0, 1])
def test_qlinear_average_pool_over_the_whole_image_is_the_integer_global_path(channels_last):
    rng = np.random.default_rng(31)
    shape = [2, 6, 5, 7] if not channels_last else [2, 5, 7, 6]
    x, inputs = _pool_inputs(rng, np.uint8, shape, ties=True)
    check(build("QLinearAveragePool", inputs, dict(kernel_shape=[5, 7], channels_last=channels_last), domain=MS),
          {"x": x})


def test_qlinear_average_pool_sums_in_float32_and_adds_the_zero_point_before_rounding():
    rng = np.random.default_rng(11)
    attrs = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2])

    def make(i):
        dtype = (np.uint8, np.int8)[i % 2]
        return _pool_inputs(rng, dtype, (1, 8, 9, 9), ties=i % 4 < 2)

    def ours(c):
        return Q.qlinear_average_pool(*[v for _, v, _ in c[1]], **attrs)

    def exact_mean(c):
        x, xs, xz, ys, yz = [v for _, v, _ in c[1]]
        xp = np.pad(x.astype(np.int64) - int(xz), ((0, 0), (0, 0), (1, 1), (1, 1)))
        inside = np.pad(np.ones((9, 9), np.int64), 1)
        total = sum(xp[:, :, i:i + 9:2, j:j + 9:2] for i in range(3) for j in range(3))
        count = sum(inside[i:i + 9:2, j:j + 9:2] for i in range(3) for j in range(3))
        info = np.iinfo(x.dtype)
        return np.clip(np.rint(total * float(xs) / count / float(ys)) + int(yz), info.min, info.max).astype(x.dtype)

    for _ in range(3):
        case = search(make, ours, exact_mean, 200)
        (y,) = check(build("QLinearAveragePool", case[1], attrs, domain=MS), {"x": case[0]})
        assert not np.array_equal(y, exact_mean(case))


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("channels_last", [0, 1])
def test_qlinear_global_average_pool(dtype, channels_last):
    rng = np.random.default_rng(50 + channels_last + 2 * (dtype == np.int8))
    differing = 0
    for seed in range(6):
        shape = [2, 64, 4, 8] if not channels_last else [2, 4, 8, 64]  # 32 pixels: power-of-two scales tie
        x, inputs = _pool_inputs(rng, dtype, shape, ties=seed % 2 == 0)
        (y,) = check(build("QLinearGlobalAveragePool", inputs, dict(channels_last=channels_last), domain=MS), {"x": x})
        _, xs, xz, ys, yz = [v for _, v, _ in inputs]
        axes = (1, 2) if channels_last else (2, 3)
        acc = x.astype(np.int64).sum(axis=axes, keepdims=True) - int(xz) * 32
        scale = F32(xs / F32(ys * F32(32)))
        info = np.iinfo(dtype)
        zero_point_first = R.requantize(acc, scale, int(yz), info.min, info.max, "onnx_reference")
        differing += int((zero_point_first != y).sum())
    assert differing > 0


# ----------------------------------------------------------------------------------------- node cases and shapes
def test_shape_inference_of_the_quantized_ops():
    rng = np.random.default_rng(0)
    x = rand_q(rng, np.uint8, (1, 4, 8, 8))
    inputs = [("x", x, False), ("xs", F32(0.1), True), ("xz", np.uint8(3), True),
              ("w", rand_q(rng, np.int8, (6, 4, 3, 3)), True), ("ws", F32(0.01), True), ("wz", np.int8(0), True),
              ("ys", F32(0.2), True), ("yz", np.uint8(0), True)]
    graph = refquant.load(build("QLinearConv", inputs, dict(strides=[2, 2], pads=[1, 1, 1, 1])))
    value = graph.values[graph.output_names[0]]
    assert value.dtype == np.uint8 and value.shape == (1, 6, 4, 4)
    graph = refquant.load(build("QLinearAveragePool", [("x", rand_q(rng, np.int8, (1, 7, 7, 3)), False),
                                                       ("xs", F32(0.1), True), ("xz", np.int8(1), True),
                                                       ("ys", F32(0.1), True), ("yz", np.int8(1), True)],
                                dict(kernel_shape=[3, 3], strides=[2, 2], channels_last=1), domain=MS))
    value = graph.values[graph.output_names[0]]
    assert value.dtype == np.int8 and value.shape == (1, 3, 3, 3)


# ----------------------------------------------------------------------------------------- end to end
SHARED = zoo.shared_dir()
MOBILENET = SHARED / "models" / "mobilenet_v2_imagenet.onnx"


@needs_fma
@pytest.mark.skipif(not MOBILENET.exists(), reason=f"{MOBILENET} not found")
def test_mobilenet_v2_quantized_by_onnxruntime_runs_bit_exact(tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from refquant.data import Preprocess, load_image

    imagenet = Preprocess.parse("resize_shorter=256;crop=224,224;mean=0.485,0.456,0.406;std=0.229,0.224,0.225")
    photos = [SHARED / "data" / n for n in ("chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png", "horse.png",
                                            "motorcycle_left.png")]
    images = np.stack([load_image(p, imagenet) for p in photos])

    class Reader(CalibrationDataReader):  # calibrated on three photos, evaluated on three others
        def __init__(self):
            self.batches = iter([{"input": images[i:i + 1]} for i in (3, 4, 5)])

        def get_next(self):
            return next(self.batches, None)

    quantized = tmp_path / "mobilenet_v2_qoperator.onnx"
    quantize_static(str(MOBILENET), str(quantized), Reader(), quant_format=QuantFormat.QOperator, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    reduce_range=False)
    ops = {(n.domain, n.op_type) for n in onnx.load(quantized).graph.node}
    assert {("", "QLinearConv"), (MS, "QLinearAdd"), (MS, "QLinearGlobalAveragePool"), (MS, "QGemm")} <= ops
    feeds = {"input": images[:3]}
    ours = refquant.Session(refquant.load(quantized)).run(feeds)["logits"]
    for level in LEVELS:
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        assert np.array_equal(exact_ort_session(quantized, options).run(None, feeds)[0], ours), level
    fp32 = ort.InferenceSession(str(MOBILENET), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert all(np.corrcoef(f, q)[0, 1] > 0.95 for f, q in zip(fp32, ours))  # a working W8A8 model ...
    assert list(ours.argmax(axis=1)[:2]) == [285, 967]  # ... that still sees the cat and the coffee
