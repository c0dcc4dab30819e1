"""Requantization schemes (refquant.intsim.requant).

* ``ort``: equals onnxruntime's QLinearConv / QLinearMatMul outputs, given exact accumulators computed
  here independently (int64 sliding windows), on random scales and on exact-tie corpora.
* ``onnx_reference``: equals ``onnx.reference``'s QLinearConv / QLinearMatMul, ties included.
* ``tflite_double`` / ``tflite_single``: hand-computed values of QuantizeMultiplier, SRDHM, RDBPOT and
  MultiplyByQuantizedMultiplier, a pure-Python transcription of the gemmlowp/TFLite formulas, and the
  tie facts measured in the numerics notes (double rounding turns 7/16 into 1; single rounding is
  round-half-up; both disagree with onnxruntime on a small share of a tie corpus).
* ``exact``: hand-computed ties for each rounding, per-channel rationals, big numerators.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from refquant.intsim import requant as R

from .helpers import cpu_flags, litert_int8_layer

F32 = np.float32
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1


def _has_vnni() -> bool:
    return bool({"avx512_vnni", "avx_vnni"} & cpu_flags())


# without VNNI, onnxruntime's u8 x s8 kernels saturate pairs of products to int16 (vpmaddubsw): keep the
# weights small enough that exact arithmetic is what onnxruntime computes there too
W_MAX = 127 if _has_vnni() else 63


# ----------------------------------------------------------------------------------------- helpers
def conv_acc(x, x_zp, w, bias, pad):
    """Exact int64 sum_{c,i,j} (x - x_zp) w, 2-D, stride 1, symmetric zero padding of the shifted input."""
    xd = np.pad(x.astype(np.int64) - int(x_zp), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    k = w.shape[2]
    windows = np.lib.stride_tricks.sliding_window_view(xd, (k, k), axis=(2, 3))  # n c oh ow kh kw
    acc = np.einsum("ncxyij,mcij->nmxy", windows, w.astype(np.int64))
    return acc + bias.astype(np.int64).reshape(1, -1, 1, 1)


def conv_model(x, xs, xz, w, ws, ys, yz, bias, pad):
    inits = {"xs": xs, "xz": xz, "w": w, "ws": ws, "wz": np.zeros(np.shape(ws), np.int8), "ys": ys, "yz": yz, "b": bias}
    node = helper.make_node("QLinearConv", ["x", *inits], ["y"], pads=[pad] * 4)
    elem = TensorProto.UINT8 if x.dtype == np.uint8 else TensorProto.INT8
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", elem, list(x.shape))],
                              [helper.make_tensor_value_info("y", elem, None)],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model


def run_ort(model, feeds):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def conv_corpus(act, ties, count=8):
    """(model, x, acc, multiplier, y_zp) cases; ties: power-of-two scales and odd output zero points."""
    rng = np.random.default_rng(7 if ties else 8)
    info = np.iinfo(act)
    for _ in range(count):
        m = 16
        x = rng.integers(info.min, info.max + 1, (1, 8, 6, 6)).astype(act)
        w = rng.integers(-W_MAX, W_MAX + 1, (m, 8, 3, 3)).astype(np.int8)
        xz = act(rng.integers(info.min, info.max + 1))
        bias = rng.integers(-5000, 5000, m).astype(np.int32)
        if ties:
            xs, ws, ys = F32(2.0 ** -4), np.full(m, 2.0 ** -5, F32), F32(2.0 ** int(rng.integers(-4, 0)))
            yz = act(int(rng.integers(-60, 60)) * 2 + 1 + (128 if act == np.uint8 else 0))
        else:
            xs, ws = F32(10 ** rng.uniform(-3, -1)), (10 ** rng.uniform(-3, -1, m)).astype(F32)
            ys = F32(float(xs) * float(ws.mean()) * 72 * 74 * 74 / 60)
            yz = act(rng.integers(info.min, info.max + 1))
        acc = conv_acc(x, xz, w, bias, 1)
        yield conv_model(x, xs, xz, w, ws, ys, yz, bias, 1), x, acc, R.ort_multiplier(xs, ws, ys), int(yz)


# ----------------------------------------------------------------------------------------- ort
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("act", [np.uint8, np.int8])
def test_ort_scheme_equals_onnxruntime_qlinearconv(act, ties):
    info = np.iinfo(act)
    n_ties = 0
    for model, x, acc, mult, yz in conv_corpus(act, ties):
        y = R.requantize(acc, mult, yz, info.min, info.max, scheme="ort", axis=1)
        assert y.dtype == act
        assert np.array_equal(y, run_ort(model, {"x": x}))
        n_ties += int(((acc * mult.astype(np.float64).reshape(1, -1, 1, 1)) % 1 == 0.5).sum())
    assert (n_ties > 20) == ties


def test_ort_scheme_equals_onnxruntime_qlinearmatmul_per_column():
    rng = np.random.default_rng(3)
    for _ in range(6):
        a = rng.integers(-128, 128, (20, 50)).astype(np.int8)
        b = rng.integers(-128, 128, (50, 12)).astype(np.int8)
        as_, bs = F32(10 ** rng.uniform(-3, -1)), (10 ** rng.uniform(-3, -1, 12)).astype(F32)
        ys = F32(float(as_) * float(bs.mean()) * 7 * 74 * 74 / 50)
        az, yz = np.int8(rng.integers(-128, 128)), np.int8(-3)
        inits = {"as": as_, "az": az, "b": b, "bs": bs, "bz": np.zeros(12, np.int8), "ys": ys, "yz": yz}
        node = helper.make_node("QLinearMatMul", ["a", *inits], ["y"])
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("a", TensorProto.INT8, [20, 50])],
                                  [helper.make_tensor_value_info("y", TensorProto.INT8, None)],
                                  [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 7
        acc = (a.astype(np.int64) - int(az)) @ b.astype(np.int64)
        y = R.requantize(acc, R.ort_multiplier(as_, bs, ys), -3, -128, 127, "ort")
        assert np.array_equal(y, run_ort(model, {"a": a}))


def test_ort_scheme_arithmetic_details():
    # the float32 product: int32 -> float32 rounds above 2^24 (2^24 + 1 -> 2^24), then round half even
    acc = np.array([(1 << 24) + 1, 3, 5, -3, -5, 7], np.int32)
    y = R.requantize(acc, 0.5, 0, INT32_MIN, INT32_MAX, "ort")
    assert y.tolist() == [1 << 23, 2, 2, -2, -2, 4]
    # round half even *then* add the zero point: 1.5 -> 2, + 1 = 3 (adding 1 first would give round(2.5) = 2)
    assert R.requantize(np.array([3]), 0.5, 1, 0, 255, "ort").tolist() == [3]
    # clamped to [qmin, qmax]; per-channel multipliers and zero points along an axis
    acc = np.arange(-6, 6).reshape(2, 3, 2)
    y = R.requantize(acc, np.array([1.0, 10.0, 100.0], F32), np.array([0, 1, 2]), -128, 127, "ort", axis=1)
    assert y.tolist() == [[[-6, -5], [-39, -29], [-128, -98]], [[0, 1], [21, 31], [127, 127]]]
    with pytest.raises(OverflowError, match="int32"):
        R.requantize(np.array([1 << 31], np.int64), 1.0, 0, 0, 255, "ort")
    # ort_multiplier is float32 throughout and left to right
    xs, ws, ys = F32(0.1), F32(0.3), F32(0.7)
    assert R.ort_multiplier(xs, ws, ys) == F32(F32(xs * ws) / ys)


# ----------------------------------------------------------------------------------------- onnx_reference
def test_onnx_reference_scheme_equals_onnx_reference_evaluator_and_differs_from_onnxruntime_on_ties():
    differs = 0
    for model, x, acc, mult, yz in conv_corpus(np.uint8, ties=True):
        want = ReferenceEvaluator(model).run(None, {"x": x})[0]
        got = R.requantize(acc, mult, yz, 0, 255, "onnx_reference", axis=1)
        assert np.array_equal(got, want)
        differs += int((got != run_ort(model, {"x": x})).sum())
    assert differs > 0  # the reference adds the zero point before rounding: odd zero points break ties differently


def test_onnx_reference_scheme_equals_onnx_reference_qlinearmatmul_with_float16_scales():
    rng = np.random.default_rng(1)
    h = np.float16
    a = rng.integers(0, 256, (9, 40)).astype(np.uint8)
    b = rng.integers(0, 256, (40, 7)).astype(np.uint8)
    inits = {"as": h(2.0 ** -4), "az": np.uint8(100), "b": b, "bs": h(0.0123), "bz": np.uint8(131),
             "ys": h(3.75), "yz": np.uint8(77)}
    node = helper.make_node("QLinearMatMul", ["a", *inits], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("a", TensorProto.UINT8, [9, 40])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    want = ReferenceEvaluator(model).run(None, {"a": a})[0]
    acc = (a.astype(np.int64) - 100) @ (b.astype(np.int64) - 131)
    mult = inits["as"] * inits["bs"] / inits["ys"]  # float16 arithmetic, as the reference does
    assert mult.dtype == np.float16
    assert np.array_equal(R.requantize(acc, mult, 77, 0, 255, "onnx_reference"), want)


# ----------------------------------------------------------------------------------------- tflite
def test_quantize_multiplier_hand_computed():
    qm = R.quantize_multiplier
    assert qm(0.5) == (1 << 30, 0)
    assert qm(1.0) == (1 << 30, 1)
    assert qm(0.75) == (3 << 29, 0)
    assert qm(2.0 ** -4) == (1 << 30, -3)
    assert qm(0.0) == (0, 0)
    assert qm(2.0 ** -40) == (0, 0)  # shift < -31 flushes to zero
    assert qm(1 - 2.0 ** -40) == (1 << 30, 1)  # q * 2^31 rounds to 2^31: halved, shift + 1
    assert qm(0.1) == (round(0.8 * 2 ** 31), -3)  # 0.1 = 0.8 * 2^-3
    assert qm(2.0 ** 35) == (1 << 30, 36)
    assert qm(2.0 ** 35, single_rounding=True) == ((1 << 31) - 1, 30)  # single rounding saturates the shift
    m, s = qm(np.array([0.5, 0.75, 0.0]))
    assert m.tolist() == [1 << 30, 3 << 29, 0] and s.tolist() == [0, 0, 0]


def test_gemmlowp_primitives_hand_computed():
    srdhm, rdbpot = R.saturating_rounding_doubling_high_mul, R.rounding_divide_by_pot
    assert srdhm(INT32_MIN, INT32_MIN) == INT32_MAX  # the one saturating case
    assert srdhm(24, 1 << 30) == 12 and srdhm(-24, 1 << 30) == -12
    assert srdhm(7, 1 << 30) == 4    # 3.5 -> 4: the first of two roundings
    assert srdhm(-7, 1 << 30) == -3  # -3.5 -> -3: the nudge 1 - 2^30 and truncation send negative ties up
    # round half away from zero
    assert rdbpot(np.array([5, -5, 3, -3, 6, -6, 5, 4]), np.array([1, 1, 1, 1, 2, 2, 2, 3])).tolist() == \
        [3, -3, 2, -2, 2, -2, 1, 1]


def _tflite_python(acc: int, real: float, single: bool) -> int:
    """TFLite's MultiplyByQuantizedMultiplier transcribed with Python integers (C semantics spelled out)."""
    m, shift = R.quantize_multiplier(real, single_rounding=single)
    if single:
        total = 31 - shift
        return (acc * m + (1 << (total - 1))) >> total
    left, right = max(shift, 0), max(-shift, 0)
    x = acc * (1 << left)
    x = (x + (1 << 31)) % (1 << 32) - (1 << 31)  # int32 wrap
    ab = x * m
    n = ab + ((1 << 30) if ab >= 0 else 1 - (1 << 30))
    high = n // (1 << 31) if n >= 0 else -((-n) // (1 << 31))  # C division truncates
    if x == m == INT32_MIN:
        high = INT32_MAX
    mask = (1 << right) - 1
    rem = high & mask
    threshold = (mask >> 1) + (1 if high < 0 else 0)
    return (high >> right) + (1 if rem > threshold else 0)


@pytest.mark.parametrize("single", [False, True])
def test_tflite_schemes_equal_a_python_transcription(single):
    rng = np.random.default_rng(11)
    scheme = "tflite_single" if single else "tflite_double"
    for real in (2.0 ** -4, 0.0123, 0.7, 3e-5, 1.9, 0.333333):
        acc = rng.integers(-(1 << 22), 1 << 22, 400)
        got = R.requantize(acc, real, 0, INT32_MIN, INT32_MAX, scheme)
        assert got.tolist() == [_tflite_python(int(a), real, single) for a in acc]


def test_tflite_rounding_facts():
    acc = np.array([7, -7, 24, -24, 8, -8, 9])
    y = lambda scheme: R.requantize(acc, 2.0 ** -4, 0, -128, 127, scheme).tolist()
    # 7/16 = 0.4375: gemmlowp's two roundings (7/2 -> 4, 4/8 -> 1) give 1; one rounding gives 0
    # (-7: -3.5 -> -3, -3/8 -> 0); exact ties (+-1.5, +-0.5) go away from zero
    assert y("tflite_double") == [1, 0, 2, -2, 1, -1, 1]
    assert y("tflite_single") == [0, 0, 2, -1, 1, 0, 1]     # ties toward +inf
    assert y("exact") == [0, 0, 2, -2, 0, 0, 1]             # ties to even
    assert y(R.exact("half_away")) == [0, 0, 2, -2, 1, -1, 1]
    assert y(R.exact("half_up")) == y("tflite_single")


def test_tflite_single_is_round_half_up_when_the_multiplier_is_exact():
    rng = np.random.default_rng(5)
    for _ in range(20):
        m0, shift = int(rng.integers(1 << 30, 1 << 31)), int(rng.integers(-20, 5))
        real = Fraction(m0, 1 << (31 - shift)) if shift < 31 else Fraction(m0 << (shift - 31))
        assert R.quantize_multiplier(float(real), True) == (m0, shift)
        acc = rng.integers(-(1 << 20), 1 << 20, 2000)
        assert np.array_equal(R.requantize(acc, float(real), 0, INT32_MIN, INT32_MAX, "tflite_single"),
                              R.requantize(acc, real, 0, INT32_MIN, INT32_MAX, R.exact("half_up")))


def test_schemes_on_the_tie_corpus_reproduce_the_measured_agreement_with_onnxruntime():
    # numerics notes (verify_ties.py): on power-of-two scales with odd zero points onnxruntime disagrees
    # with onnx.reference, TFLite double and single rounding on a fraction of a percent of the outputs
    agree = {s: 0 for s in ("ort", "onnx_reference", "tflite_double", "tflite_single", "exact")}
    total = 0
    for model, x, acc, mult, yz in conv_corpus(np.uint8, ties=True, count=12):
        y = run_ort(model, {"x": x})
        for scheme in agree:
            got = R.requantize(acc, mult, yz, 0, 255, scheme, axis=1)
            agree[scheme] += int((got == y).sum())
        total += y.size
    assert agree["ort"] == total and agree["exact"] == total  # exact half-even equals float RNE on pow-2 scales
    for scheme in ("onnx_reference", "tflite_double", "tflite_single"):
        assert 0.99 * total < agree[scheme] < total, (scheme, agree[scheme], total)


def test_tflite_schemes_in_the_integer_program_equal_the_conv_formula():
    """A Conv + Relu layer of IntSim(requant="tflite_*") against TFLite's conv formula spelled out here
    (numerics.md §3): acc = sum (x - x_zp) w + bias, exact in int64 (the bias as the lowering quantizes it:
    round(b / f32(x_scale * w_scale[m])), half to even); per output channel (M, shift) =
    QuantizeMultiplier(f64(x_scale) * f64(w_scale[m]) / f64(y_scale)); y = clamp(MBQM(acc) + y_zp, Q(0), 255),
    MBQM as the Python transcription above; the Relu is the clamp's lower bound. Power-of-two scales (x 2^-5
    with zero point 129, w 2^-6, y 2^-3: multiplier 2^-8) put accumulators on exact ties, where the two
    roundings differ."""
    import refquant
    from refquant.intsim.program import IntSim
    from refquant.quant import QuantSim
    from refquant.quant.encoding import from_min_max

    rng = np.random.default_rng(12)
    w = rng.integers(-100, 101, (5, 3, 3, 3)).astype(F32) * F32(2 ** -6)
    w[:, 0, 0, 0] = 127 * 2 ** -6  # each channel's max |w|: symmetric per-channel scale 127 * 2^-6 / 127
    b = rng.normal(0, .2, 5).astype(F32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = rng.normal(0, 1, (4, 3, 6, 6)).astype(F32)
    sim = QuantSim(refquant.load(model), precision="w8a8", prepare=False)
    sim.compute_encodings([{"x": x}], progress=False)
    sim.set_encoding("x", from_min_max(-129 / 32, 126 / 32, 8, False))
    sim.set_encoding("y", from_min_max(0.0, 255 / 8, 8, False))
    xs, xz, _ = sim.encoding_of("x").to_onnx(signed=False)
    ys, yz, _ = sim.encoding_of("y").to_onnx(signed=False)
    enc = sim.encoding_of("w")
    ws = np.asarray(enc.scale, F32).reshape(-1)
    assert (xs, int(xz), ys, int(yz)) == (2 ** -5, 129, 2 ** -3, 0) and np.all(ws == 2 ** -6)
    offset = np.asarray(enc.offset).reshape(-1, 1, 1, 1)  # AIMET: w = (q + offset) * scale, q in [0, 255]
    w_int = np.clip(np.rint(w.astype(np.float64) / ws.astype(np.float64).reshape(-1, 1, 1, 1)), offset, offset + 255)
    bias = np.round(b.astype(np.float64) / (F32(xs) * ws).astype(F32).astype(np.float64))
    real = np.float64(F32(xs)) * ws.astype(np.float64) / np.float64(F32(ys))
    results = {}
    for single in (False, True):
        isim = IntSim(sim, requant="tflite_single" if single else "tflite_double")
        xq = isim.tensor_codes({"x": x}, ["x"])["x"]
        acc = conv_acc(xq, xz, w_int.astype(np.int64), bias.astype(np.int64), 1)
        expected = np.array([[[[min(max(_tflite_python(int(acc[n, m, i, j]), float(real[m]), single) + int(yz),
                                        int(yz)), 255) for j in range(6)] for i in range(6)] for m in range(5)]
                              for n in range(4)])
        got = isim.run({"x": x}, codes=True)["y"]
        assert got.dtype == np.uint8 and np.array_equal(got, expected), single
        results[single] = got
    assert np.any(results[False] != results[True])  # the tie corpus tells the two roundings apart


def _litert_conv(x, w, bias, xs, xz, ws, ys, yz):
    """A one-op int8 CONV_2D LiteRT model (NHWC, SAME padding, stride 1, per-channel weights), built with the
    flatbuffer schema that ai-edge-litert ships; returns the model bytes."""
    from ai_edge_litert import schema_py_generated as S

    opts = S.Conv2DOptionsT()
    opts.padding, opts.strideW, opts.strideH = S.Padding.SAME, 1, 1
    opts.dilationWFactor = opts.dilationHFactor = 1
    return litert_int8_layer("CONV_2D", 3, ("Conv2DOptions", opts), x, w, bias, xs, xz, ws, ys, yz,
                             x.shape[:3] + (len(bias),))


def test_tflite_double_equals_litert_reference_conv_kernel():
    """tflite_double against LiteRT's reference int8 CONV_2D kernel (BUILTIN_REF op resolver), on random scales and
    on power-of-two scales (exact ties), where it is the only scheme that agrees everywhere; LiteRT's default
    (XNNPACK) kernel rounds ties to even instead: it is the ort scheme. Measured with ai-edge-litert 2.3.0."""
    litert = pytest.importorskip("ai_edge_litert.interpreter",
                                 reason="ai-edge-litert is not installed (the test extra installs it)")
    rng = np.random.default_rng(3)
    agree = {(k, s): 0 for k in ("ref", "default") for s in ("tflite_double", "tflite_single", "ort")}
    total = 0
    for ties in (False, True) * 6:
        n, c, h, w_, m, k = 2, 4, 7, 7, 6, 3
        x = rng.integers(-128, 128, (n, h, w_, c)).astype(np.int8)
        w = rng.integers(-127, 128, (m, k, k, c)).astype(np.int8)
        bias = rng.integers(-3000, 3000, m).astype(np.int32)
        xz, yz = int(rng.integers(-128, 128)), int(rng.integers(-128, 128))
        if ties:
            xs, ws, ys = F32(2 ** -4), np.full(m, 2 ** -6, F32), F32(2.0 ** -int(rng.integers(0, 3)))
        else:
            xs, ws, ys = F32(10 ** rng.uniform(-3, -1)), (10 ** rng.uniform(-3, -1, m)).astype(F32), None
        # exact int64 accumulators, NHWC with SAME padding of the shifted input
        xd = np.pad(x.astype(np.int64) - xz, ((0, 0), (1, 1), (1, 1), (0, 0)))
        windows = np.lib.stride_tricks.sliding_window_view(xd, (k, k), axis=(1, 2))  # n oh ow c kh kw
        acc = np.einsum("nxycij,mijc->nxym", windows, w.astype(np.int64)) + bias
        ys = ys if ys is not None else F32(np.abs(acc * (xs * ws)).max() / 100.0)
        model = _litert_conv(x, w, bias, xs, xz, ws, ys, yz)
        for kind, resolver in (("ref", litert.OpResolverType.BUILTIN_REF), ("default", litert.OpResolverType.AUTO)):
            interpreter = litert.Interpreter(model_content=model, experimental_op_resolver_type=resolver, num_threads=1)
            interpreter.allocate_tensors()
            interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
            interpreter.invoke()
            y = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
            for scheme in ("tflite_double", "tflite_single", "ort"):
                mult = R.ort_multiplier(xs, ws, ys) if scheme == "ort" else R.tflite_multiplier(xs, ws, ys)
                agree[(kind, scheme)] += int((R.requantize(acc, mult, yz, -128, 127, scheme, axis=3) == y).sum())
        total += acc.size
    assert agree[("ref", "tflite_double")] == total and agree[("default", "ort")] == total
    for key in (("ref", "tflite_single"), ("ref", "ort"), ("default", "tflite_double")):
        assert agree[key] < total, key  # the ties tell the roundings apart


# ----------------------------------------------------------------------------------------- exact
def test_exact_ties_hand_computed():
    acc = np.array([-5, -3, -1, 1, 3, 5])  # * 1/2 = -2.5 -1.5 -0.5 0.5 1.5 2.5
    half = Fraction(1, 2)
    assert R.requantize(acc, half, 0, -100, 100, R.exact("half_even")).tolist() == [-2, -2, 0, 0, 2, 2]
    assert R.requantize(acc, half, 0, -100, 100, R.exact("half_up")).tolist() == [-2, -1, 0, 1, 2, 3]
    assert R.requantize(acc, half, 0, -100, 100, R.exact("half_away")).tolist() == [-3, -2, -1, 1, 2, 3]
    # the same through the scheme text and the rounding keyword
    assert R.requantize(acc, 0.5, 0, -100, 100, "exact(half_away)").tolist() == [-3, -2, -1, 1, 2, 3]
    assert R.requantize(acc, 0.5, 0, -100, 100, "exact", rounding="half_up").tolist() == [-2, -1, 0, 1, 2, 3]
    # rationals that are no binary fraction: 7 * 5/14 = 2.5 exactly, 1/3 never ties
    assert R.requantize(np.array([7, -7]), Fraction(5, 14), 0, -9, 9, R.exact("half_even")).tolist() == [2, -2]
    assert R.requantize(np.array([7, -7]), Fraction(5, 14), 0, -9, 9, R.exact("half_up")).tolist() == [3, -2]
    assert R.requantize(np.array([1, 2, -2]), Fraction(1, 3), 0, -9, 9, "exact").tolist() == [0, 1, -1]
    # zero point after rounding, then the clamp
    assert R.requantize(np.array([3, 1000]), half, 1, 0, 255, "exact").tolist() == [3, 255]


def test_exact_per_channel_and_big_numbers():
    rng = np.random.default_rng(2)
    acc = rng.integers(-(1 << 30), 1 << 30, (3, 4, 50))
    mults = [Fraction(1, 7), Fraction(2 ** 61 + 1, 2 ** 70), Fraction(3, 2), 0.0123]  # one needs Python ints
    got = R.requantize(acc, np.array(mults, dtype=object), np.array([0, 1, 2, 3]), INT32_MIN, INT32_MAX,
                       R.exact("half_even"), axis=1, dtype=np.int64)
    for c, m in enumerate(mults):
        m = Fraction(m)
        for a, g in zip(acc[:, c].reshape(-1), got[:, c].reshape(-1)):
            assert g == round(int(a) * m) + c  # Python's round() is half-even on Fractions
    assert R.exact_multiplier(F32(0.1), F32(0.2), F32(0.3)) == \
        Fraction(float(F32(0.1))) * Fraction(float(F32(0.2))) / Fraction(float(F32(0.3)))


def test_scheme_parsing_and_errors():
    assert str(R.as_scheme("exact(half_up)")) == "exact(half_up)" == str(R.exact("half_up"))
    assert R.as_scheme("tflite_double").name == "tflite_double"
    with pytest.raises(ValueError, match="unknown requantization scheme"):
        R.requantize(np.array([1]), 1.0, scheme="gemmlowp")
    with pytest.raises(ValueError, match="unknown rounding"):
        R.exact("half_down")
    with pytest.raises(TypeError, match="integer"):
        R.requantize(np.array([1.5]), 1.0)
    assert R.requantize(np.array([1]), 1.0, 0, 0, 255).dtype == np.uint8
    assert R.requantize(np.array([1]), 1.0, 0, -32768, 32767).dtype == np.int16
    assert R.requantize(np.array([1]), 1.0, 0, INT32_MIN, INT32_MAX).dtype == np.int32
