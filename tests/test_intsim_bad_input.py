"""Bad input to the integer program (issue 5, "Bad input" and deliverable 3), under every requantization scheme:
missing encodings, scales that no fixed-point multiplier represents (zero, negative, NaN, too small or too large
for float32 or for the scheme), a bias that overflows int32, and int32 accumulator overflow, which is reported
per layer and never wrapped, and target dumps of the wrong shape, dtype or name (the dump format's own errors:
tests/test_intsim_verify.py).

Every case is a real QuantSim calibration with one encoding edited to the bad value (in memory with
QuantSim.set_encoding, which does not validate, or in an exported AIMET encodings file)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import helper

import refquant
from refquant.errors import OpError, RefquantError
from refquant.intsim.lowering import LoweringError
from refquant.intsim.overflow import AccumulatorOverflowError
from refquant.intsim.program import IntSim
from refquant.intsim.requant import INT32_MAX
from refquant.quant import QuantSim

from .helpers import FLOAT, exact_ort_session, make_model

F32 = np.float32
SCHEMES = ["ort", "onnx_reference", "tflite_double", "tflite_single", "exact(half_even)"]


# ----------------------------------------------------------------------------------------- a small calibrated net
def _net():
    """conv (bias) -> gemm (bias), and a MatMul, an Add, a Softmax on a second input."""
    rng = np.random.default_rng(0)
    init = {"w": rng.normal(0, 0.3, (4, 3, 3, 3)), "b": rng.normal(0, 0.2, 4),
            "wg": rng.normal(0, 0.2, (5, 64)), "bg": rng.normal(0, 0.2, 5), "wm": rng.normal(0, 0.3, (8, 6))}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Flatten", ["c"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "wg", "bg"], ["g"], name="gemm", transB=1),
             helper.make_node("MatMul", ["a", "wm"], ["m"], name="matmul"),
             helper.make_node("Add", ["m", "m"], ["s"], name="add"),
             helper.make_node("Softmax", ["s"], ["p"], name="softmax", axis=-1)]
    return make_model(nodes, [("x", FLOAT, [1, 3, 4, 4]), ("a", FLOAT, [1, 2, 8])],
                      [("g", FLOAT, [1, 5]), ("p", FLOAT, [1, 2, 6])], {k: v.astype(F32) for k, v in init.items()})


def _feed(rng):
    return {"x": rng.normal(size=(1, 3, 4, 4)).astype(F32), "a": rng.normal(size=(1, 2, 8)).astype(F32)}


@pytest.fixture()
def sim():
    rng = np.random.default_rng(1)
    s = QuantSim(refquant.load(_net()), prepare=False)
    s.compute_encodings([_feed(rng) for _ in range(3)], progress=False)
    return s


def _edit_scale(sim, name, scale):
    sim.set_encoding(name, sim.encoding_of(name).with_scale(scale))


def _lowering_error(sim, scheme, *fragments):
    with pytest.raises(LoweringError) as info:
        IntSim(sim, requant=scheme)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    return info.value


def test_the_unedited_net_lowers_under_every_scheme(sim):
    """The cases below fail because of the edit, not because the net cannot be lowered."""
    feeds = _feed(np.random.default_rng(2))
    for scheme in SCHEMES:
        out = IntSim(sim, requant=scheme).run(feeds, codes=True)
        assert out["g"].dtype == np.uint8 and out["p"].shape == (1, 2, 6)


# ----------------------------------------------------------------------------------------- missing encodings
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("tensor, fragments", [
    ("x", ["node 'conv' (Conv)", "input 'x' is not quantized"]),
    ("w", ["node 'conv' (Conv)", "weight 'w' has no active quantizer"]),
    ("g", ["node 'gemm' (Gemm)", "output 'g' has no active quantizer"]),
    ("m", ["node 'matmul' (MatMul)", "output 'm' has no active quantizer"]),
    ("s", ["node 'add' (Add)", "output 's' has no active quantizer"]),
    ("p", ["node 'softmax' (Softmax)", "output 'p' has no active quantizer"]),
])
def test_missing_encoding_names_the_node_and_tensor(sim, scheme, tensor, fragments):
    if tensor == "g" and scheme == "ort":  # onnxruntime's QGemm has a float-output form: no error, a float output
        sim.quantizers[tensor].enabled = False
        isim = IntSim(sim, requant=scheme)
        assert "float output" in isim.summary()
        assert isim.run(_feed(np.random.default_rng(3)), codes=True)["g"].dtype == np.float32
        return
    sim.quantizers[tensor].enabled = False
    _lowering_error(sim, scheme, *fragments, "float_fallback=True")


def test_encodings_file_without_a_tensor(sim, tmp_path):
    """An AIMET encodings file that lacks the conv output: load_encodings disables its quantizer, and the
    integer program names the tensor it needs."""
    sim.export(tmp_path, prefix="net")
    path = tmp_path / "net.encodings"
    doc = json.loads(path.read_text())
    before = len(doc["activation_encodings"])
    doc["activation_encodings"] = [e for e in doc["activation_encodings"] if e["name"] != "c"]
    assert len(doc["activation_encodings"]) == before - 1
    path.write_text(json.dumps(doc))
    loaded = QuantSim(refquant.load(tmp_path / "net.onnx"), prepare=False)
    loaded.load_encodings(path)
    with pytest.raises(LoweringError, match=r"node 'conv' \(Conv\): output 'c' has no active quantizer"):
        IntSim(loaded)


def test_encodings_file_with_a_zero_scale_is_refused_on_load(sim, tmp_path):
    sim.export(tmp_path, prefix="net")
    path = tmp_path / "net.encodings"
    doc = json.loads(path.read_text())
    entry = next(e for e in doc["activation_encodings"] if e["name"] == "c")
    entry["scale"] = [0.0]
    path.write_text(json.dumps(doc))
    loaded = QuantSim(refquant.load(tmp_path / "net.onnx"), prepare=False)
    with pytest.raises(RefquantError, match=r"'c'.*finite and > 0"):
        loaded.load_encodings(path)


def test_encodings_file_with_a_scale_beyond_float32(sim, tmp_path):
    """1e45 is a finite, positive float64, so the file loads; as a float32 scale it is inf: the lowering refuses."""
    sim.export(tmp_path, prefix="net")
    path = tmp_path / "net.encodings"
    doc = json.loads(path.read_text())
    next(e for e in doc["activation_encodings"] if e["name"] == "s")["scale"] = [1e45]
    path.write_text(json.dumps(doc))
    loaded = QuantSim(refquant.load(tmp_path / "net.onnx"), prepare=False)
    loaded.load_encodings(path)
    with pytest.raises(LoweringError, match=r"node 'add' \(Add\): tensor 's' has scale 1e\+45: too large for float32"):
        IntSim(loaded)


# ----------------------------------------------------------------------------------------- bad scales
BAD_SCALES = [(0.0, "zero"), (-0.05, "negative"), (float("nan"), "NaN"),
              (1e-50, "too small for float32"), (1e45, "too large for float32")]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("value, why", BAD_SCALES)
@pytest.mark.parametrize("tensor, where", [("x", "graph input 'x': tensor 'x'"),
                                           ("c", "node 'conv' (Conv): tensor 'c'"),
                                           ("s", "node 'add' (Add): tensor 's'")])
def test_bad_activation_scale(sim, scheme, value, why, tensor, where):
    """Set by hand (QuantSim.set_encoding does not validate; an encodings file is validated on load)."""
    _edit_scale(sim, tensor, value)
    _lowering_error(sim, scheme, where, f"scale {value!r}", why)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("value, why", BAD_SCALES)
def test_bad_weight_scale_names_the_channel(sim, scheme, value, why):
    scale = np.array(sim.encoding_of("w").scale, dtype=np.float64)
    assert scale.shape == (4,)  # per output channel
    scale[2] = value
    _edit_scale(sim, "w", scale)
    _lowering_error(sim, scheme, "node 'conv' (Conv): weight 'w'", f"scale {value!r} (channel 2)", why)


# ----------------------------------------------------------------------------------------- multiplier range
def _gemm_multiplier(sim):
    f, w, g = (np.asarray(sim.encoding_of(n).scale, np.float64) for n in ("c", "wg", "g"))  # f = Flatten(c)
    return f * w / g


def _gemm_acc(isim, feeds):
    """The gemm's exact accumulator: the program's own int64 acc + bias tensor, or (ort: one QGemm node) the
    same sum recomputed in int64 from QGemm's operands."""
    by_name = {n.name: n for n in isim.graph.nodes}
    nodes = [by_name[n] for n in next(e for e in isim.program.lowered if e.node == "gemm").program_nodes]
    node = next(n for n in nodes if n.op_type in ("Add", "QGemm"))
    if node.op_type == "Add":
        return isim.session.run(feeds, outputs=[node.outputs[0]])[node.outputs[0]]
    c = isim.session.constants
    a = isim.session.run(feeds, outputs=[node.inputs[0]])[node.inputs[0]].astype(np.int64)
    b = c[node.inputs[3]].astype(np.int64).T  # transB = 1
    return (a - int(c[node.inputs[2]])) @ (b - c[node.inputs[5]].astype(np.int64)) + c[node.inputs[6]]


@pytest.mark.parametrize("y_scale, rejected", [
    # M ~ 1e-41: a float32 subnormal (ort, onnx_reference) and below tflite's 2^-32 (flushed to 0)
    (1e37, {"ort", "onnx_reference", "tflite_double", "tflite_single"}),
    # M ~ 1e-14: a normal float32, but below 2^-32 for tflite::QuantizeMultiplier
    (1e10, {"tflite_double", "tflite_single"}),
    # M ~ 1e12: shift > 30, which tflite's int32 left shift cannot do (double) or saturates (single)
    (1e-16, {"tflite_double", "tflite_single"}),
])
def test_multiplier_outside_the_schemes_range(sim, y_scale, rejected):
    _edit_scale(sim, "g", y_scale)
    feeds = _feed(np.random.default_rng(4))
    m = _gemm_multiplier(sim)
    for scheme in SCHEMES:
        name = scheme.split("(")[0]
        if name in rejected:
            limit = "QuantizeMultiplier needs 2^-32 <= M < 2^30" if name.startswith("tflite") else \
                "float32 multiplier"
            _lowering_error(sim, scheme, "node 'gemm' (Gemm)", "requantization multiplier", f"requant={scheme}",
                            limit)
            continue
        isim = IntSim(sim, requant=scheme)  # representable: the program runs and follows the formula
        acc = _gemm_acc(isim, feeds)
        zp = isim.grid("g").zero_point
        codes = isim.run(feeds, codes=True)["g"].astype(np.int64)
        if y_scale > 1:  # |acc| < 2^31 and M < 2^-32: |acc * M| < 1/2, every code is the zero point
            assert np.all(m < 2.0 ** -32) and np.all(codes == zp)
        else:  # M > 2^31: every non-zero accumulator saturates to its sign's end of the range
            assert np.all(m > 2.0 ** 31) and np.count_nonzero(acc) > 0
            assert np.array_equal(codes, np.where(acc > 0, 255, np.where(acc < 0, 0, zp)))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_multiplier_overflowing_float32(sim, scheme):
    """Weight scale 1e30 and output scale 1e-15 (both valid float32): M ~ 1e43 overflows float32 (ort's
    multiplier would be inf, and inf * 0 = NaN) and tflite's shift; the exact scheme takes it."""
    _edit_scale(sim, "wg", np.full(5, 1e30))
    _edit_scale(sim, "g", 1e-15)
    if scheme.startswith("exact"):
        isim = IntSim(sim, requant=scheme)
        feeds = _feed(np.random.default_rng(5))
        acc = _gemm_acc(isim, feeds)
        zp = isim.grid("g").zero_point
        # (the weights quantize to 0 on a grid of step 1e30, so acc is the zero bias: every code is the zero point)
        assert np.array_equal(isim.run(feeds, codes=True)["g"], np.where(acc > 0, 255, np.where(acc < 0, 0, zp)))
        return
    _lowering_error(sim, scheme, "node 'gemm' (Gemm)", "requantization multiplier", "cannot be represented")


def test_exact_scheme_with_a_multiplier_past_int64():
    """acc * M beyond int64 (M = 2e43) saturates to the range's ends, never wraps (a bug fixed with this file:
    the int64 cast turned 5 * 2e43 into 0)."""
    from refquant.intsim.requant import exact_multiplier, requantize

    m = exact_multiplier(F32(0.02), F32(1e30), F32(1e-15))
    acc = np.array([5, -3, 0, 100000, 1 << 40], np.int64)
    assert requantize(acc, m, 7, 0, 255, scheme="exact").tolist() == [255, 0, 7, 255, 255]
    per_channel = np.array([m] * 5, dtype=object)
    assert requantize(acc[None], per_channel, 7, 0, 255, scheme="exact", axis=1).tolist() == [[255, 0, 7, 255, 255]]


def test_softmax_output_scale_above_one(sim):
    """onnxruntime's QLinearSoftmax multiplies by floor(1 / y_scale): 0 for y_scale > 1."""
    _edit_scale(sim, "p", 2.0)
    for scheme in SCHEMES:
        _lowering_error(sim, scheme, "node 'softmax' (Softmax)", "floor(1 / y_scale) = 0")


def test_add_ratio_overflowing_float32(sim):
    """s = m + m with m's scale 1e30 and s's 1e-10: QLinearAdd's float32 ratio m_scale / s_scale = 1e40 is inf.
    (The edit also makes the MatMul's multiplier 1e-34, a normal float32 but below tflite's 2^-32: the tflite
    schemes stop there.)"""
    _edit_scale(sim, "m", 1e30)
    _edit_scale(sim, "s", 1e-10)
    for scheme in SCHEMES:
        if scheme.startswith("tflite"):
            _lowering_error(sim, scheme, "node 'matmul' (MatMul)", "requantization multiplier")
        else:
            _lowering_error(sim, scheme, "node 'add' (Add)", "QLinearAdd overflow or underflow float32")


def test_global_average_pool_scale_outside_onnxruntimes_range():
    """MLAS requires 2^-32 <= x_scale / (y_scale N) < 256: refused when lowering where the image size is known,
    else when running (both name the node)."""
    def calibrated(shape, op="GlobalAveragePool", **attrs):
        model = make_model([helper.make_node(op, ["x"], ["y"], name="gap", **attrs)],
                           [("x", FLOAT, shape)], [("y", FLOAT, None)])
        s = QuantSim(refquant.load(model), prepare=False)
        s.compute_encodings([{"x": rng.normal(size=(1, 2, 3, 3)).astype(F32)}], progress=False)
        x_enc = s.encoding_of("x")
        s.quantizers["y"].tied_to = None  # (AIMET ties an AveragePool's output to its input)
        s.set_encoding("y", x_enc.with_scale(float(x_enc.scale) / 9 / 512))  # x_scale / (y_scale * 9) = 512
        return s

    rng = np.random.default_rng(6)
    known, unknown = calibrated([1, 2, 3, 3]), calibrated([1, 2, "h", "w"])
    for scheme in SCHEMES:
        _lowering_error(known, scheme, "node 'gap' (GlobalAveragePool)", "outside onnxruntime's range [2^-32, 256)")
        isim = IntSim(unknown, requant=scheme)
        with pytest.raises(OpError, match=r"node 'gap' \(QLinearGlobalAveragePool\).*out of onnxruntime's range"):
            isim.run({"x": rng.normal(size=(1, 2, 3, 3)).astype(F32)})
    # an AveragePool whose kernel covers the image takes the same integer path in onnxruntime
    _lowering_error(calibrated([1, 2, 3, 3], "AveragePool", kernel_shape=[3, 3]), "ort",
                    "node 'gap' (AveragePool)", "outside onnxruntime's range")


# ----------------------------------------------------------------------------------------- bias overflow
@pytest.mark.parametrize("scheme", SCHEMES)
def test_bias_overflowing_int32(sim, scheme, tmp_path):
    """Input scale 1e-7 and weight scale 1e-4: bias_scale = 1e-11, and b / bias_scale ~ 1e10 > 2^31. The codes are
    clipped to int32 as onnxruntime's quantizer clips them (so the exported model is what onnxruntime would have
    made), never silently: a RuntimeWarning names the layer, the bias and the channel, and the summary notes it."""
    _edit_scale(sim, "x", 1e-7)
    _edit_scale(sim, "w", np.full(4, 1e-4))
    b = sim.graph.initializers["b"]
    assert np.all(np.abs(b.astype(np.float64) / float(F32(F32(1e-7) * F32(1e-4)))) > INT32_MAX)
    isim = _clipped_bias(sim, scheme, "node 'conv' (Conv)", "bias 'b' overflows int32", "4 of 4 channels",
                         "channel 0")
    codes = _int32_constants(isim).astype(np.int64)
    assert np.array_equal(codes[np.abs(codes) > 2 ** 30], np.where(b > 0, INT32_MAX, -INT32_MAX - 1))
    if scheme == "ort":  # onnxruntime runs the exported program with the clipped bias: bit for bit the same
        _same_as_onnxruntime(isim, tmp_path)
    # x = 1 everywhere: input codes at the top of the grid, so a channel whose weight codes sum to the sign of
    # its (clipped) bias pushes the accumulator past int32; the error says why
    weight_sums = np.clip(np.rint(sim.graph.initializers["w"] / F32(1e-4)), -127, 127).reshape(4, -1).sum(axis=1)
    assert np.any(np.sign(weight_sums) == np.sign(b))
    feeds = _feed(np.random.default_rng(6))
    feeds["x"][:] = 1.0
    with pytest.raises(AccumulatorOverflowError, match="layer 'conv'.*bias was clipped to int32"):
        isim.run(feeds)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_gemm_bias_overflowing_int32_in_one_channel(sim, scheme):
    scale = np.array(sim.encoding_of("wg").scale, np.float64)
    # one output column with a tiny scale (AIMET gives 2^-23 to an all-zero channel): small enough for its bias
    # code to leave int32, large enough for every scheme's multiplier (>= 2^-32 for the tflite ones)
    scale[3] = 2e-9
    _edit_scale(sim, "wg", scale)
    x_scale = float(sim.encoding_of("c").scale)  # the Gemm's input: conv's output, through the Flatten
    bias_code = abs(float(sim.graph.initializers["bg"][3])) / float(F32(F32(x_scale) * F32(2e-9)))
    assert bias_code > INT32_MAX and x_scale * 2e-9 / float(sim.encoding_of("g").scale) > 2.0 ** -32
    isim = _clipped_bias(sim, scheme, "node 'gemm' (Gemm)", "bias 'bg' overflows int32 in 1 of 5 channels",
                         "channel 3")
    codes = _int32_constants(isim).astype(np.int64)
    assert np.sum(np.abs(codes) >= INT32_MAX) == 1


def test_a_nan_bias_is_an_error(sim):
    sim.graph.initializers["b"] = np.array([0.1, np.nan, 0.2, 0.3], F32)
    _lowering_error(sim, "ort", "node 'conv' (Conv)", "bias 'b' is NaN in channel 1")


def _clipped_bias(sim, scheme, *fragments):
    with pytest.warns(RuntimeWarning) as record:
        isim = IntSim(sim, requant=scheme)
    message = " ".join(str(w.message) for w in record)
    for fragment in (*fragments, "clipped to"):
        assert fragment in message, message
    assert "bias clipped to int32" in isim.summary()
    return isim


def _int32_constants(isim) -> np.ndarray:
    """Every int32 / int64 constant of the program, flattened (the biases: int64 where a scheme adds them to a
    widened accumulator; the other int64 constants are shapes and axes, far below 2^30)."""
    arrays = [np.asarray(a).reshape(-1) for a in isim.program.graph.initializers.values()
              if np.asarray(a).dtype in (np.int32, np.int64)]
    return np.concatenate(arrays)


def _same_as_onnxruntime(isim, tmp_path):

    path = isim.export(tmp_path / "clipped.onnx")
    feeds = _feed(np.random.default_rng(5))
    feeds["x"][:] = 0.0  # x codes = zero point: acc = the clipped bias alone (any product could overflow int32)
    session = exact_ort_session(path)
    names = [o.name for o in session.get_outputs()]
    expected = dict(zip(names, session.run(names, feeds)))
    got = isim.run(feeds)
    for name in names:
        assert np.array_equal(got[name], expected[name]), name


# ----------------------------------------------------------------------------------------- accumulator overflow
K = 66312  # 255 * 127 * (K - 1) = 2147481735: the sum of products fits int32 by 1912; the bias pushes it over


def _overflow_net(precision="w8a8", k=K):
    """A Gemm y = x w^T + b with K terms: weights 1 except w[0, 0] = -1 (symmetric int8: scale 1/127, codes 127
    and one -127), bias 1; x calibrated to [0, 1] (zero point 0, scale 1 / qmax). Fed x = 1 except x[0, 0] = 0,
    the sum of products is qmax * 127 * (K - 1). And a small MatMul on a second input that can never overflow."""
    rng = np.random.default_rng(7)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="big_gemm", transB=1),
             helper.make_node("MatMul", ["z", "wz"], ["u"], name="small_matmul")]
    w = np.ones((1, k), F32)
    w[0, 0] = -1.0
    model = make_model(nodes, [("x", FLOAT, [1, k]), ("z", FLOAT, [1, 8])], [("y", FLOAT, [1, 1]),
                                                                              ("u", FLOAT, [1, 4])],
                       {"w": w, "b": np.ones(1, F32), "wz": rng.normal(0, 1, (8, 4)).astype(F32)})
    s = QuantSim(refquant.load(model), precision=precision, prepare=False)
    x = np.zeros((1, k), F32)
    x[0, :2] = 1.0  # calibrates x to [0, 1]
    s.compute_encodings([{"x": x, "z": rng.normal(size=(1, 8)).astype(F32)}], progress=False)
    s.set_encoding("y", s.encoding_of("y").with_scale(1.0))
    return s


def _hot(k):
    x = np.ones((1, k), F32)
    x[0, 0] = 0.0
    return {"x": x, "z": np.ones((1, 8), F32)}


def _bias_code(isim):
    """round(b / f32(x_scale * w_scale)) of b = 1, as onnxruntime's quantize_bias_static_impl."""
    return int(np.round(1.0 / float(F32(isim.grid("x").scale * F32(1 / 127)))))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_accumulator_overflow_is_reported_per_layer_and_never_wrapped(scheme):
    sim = _overflow_net()
    isim = IntSim(sim, requant=scheme)
    assert isim.grid("x").zero_point == 0 and isim.grid("x").scale == F32(1 / 255)
    assert np.array_equal(sim.encoding_of("w").scale, [F32(1 / 127)])
    bias = _bias_code(isim)
    assert bias == 32385
    safe = {"x": np.full((1, K), 0.25, F32), "z": np.ones((1, 8), F32)}
    # worst case from the weights' codes: 255 * (127 * K) + bias > INT32_MAX, so the layer can overflow; the small
    # MatMul provably cannot (8 terms)
    report = isim.overflow_report(safe)
    big, small = (next(layer for layer in report.layers if layer.node == n) for n in ("big_gemm", "small_matmul"))
    assert big.bound == 255 * 127 * K + bias and big.can_overflow and big.reduction == K
    assert not small.can_overflow and small.bound <= 255 * 255 * 8 and small.reduction == 8
    static = isim.overflow_report()  # no feeds: the bounds alone, also listed by summary()
    assert [(layer.node, layer.bound, layer.reached) for layer in static.layers] == \
        [("big_gemm", big.bound, False), ("small_matmul", small.bound, False)]
    assert "can overflow: checked on every run" in str(static) and "cannot overflow" in str(static)
    assert "int32 accumulators: 1 layers can exceed int32 for some inputs" in isim.summary()
    assert "big_gemm" in isim.summary().split("int32 accumulators:")[1]
    code = int(isim.tensor_codes(safe, ["x"])["x"][0, 0])  # round(0.25 * 255) = 64
    assert code == 64
    assert big.overflow == 0 and report.overflowing == [] and big.high == code * 127 * (K - 2) + bias
    isim.run(safe)
    # hot: sum = 255 * 127 * (K - 1) = 2147481735 fits int32; + bias 32385 = 2147514120 does not
    hot = _hot(K)
    report = isim.overflow_report(hot)
    assert [layer.node for layer in report.overflowing] == ["big_gemm"]
    big = report.overflowing[0]
    assert 255 * 127 * (K - 1) <= INT32_MAX < big.low == big.high == 255 * 127 * (K - 1) + bias
    assert big.overflow == 1 and "OVERFLOW: 1 of 1 elements outside int32" in str(report)
    assert "'big_gemm' (1 elements)" in str(report)
    small = next(layer for layer in report.layers if layer.node == "small_matmul")
    assert small.reached and small.overflow == 0 and "fits int32 (for every input)" in str(report)
    # the run refuses, naming the layer; nothing is wrapped (int32 would wrap 2147514120 to -2147453176)
    with pytest.raises(AccumulatorOverflowError, match=r"layer 'big_gemm' \(Gemm\).*overflows.*overflow_report"):
        isim.run(hot)
    with pytest.raises(AccumulatorOverflowError, match="big_gemm"):
        isim.run(hot, codes=True)
    with pytest.raises(AccumulatorOverflowError, match="big_gemm"):
        isim.tensor_codes(hot, ["y"])
    from refquant.intsim.explain import explain

    with pytest.raises(AccumulatorOverflowError, match="big_gemm"):
        explain(isim, "big_gemm", 0, hot)
    assert explain(isim, "small_matmul", 0, hot).node == "small_matmul"  # its own run never reaches big_gemm


@pytest.mark.parametrize("scheme", SCHEMES[1:])  # onnxruntime has no 16-bit integer GEMM: ort cannot lower W8A16
def test_w8a16_accumulator_overflow(scheme):
    """uint16 activations x int8 weights, K = 1024: 65535 * 127 * 1023 = 8.5e9 > 2^31."""
    k = 1024
    sim = _overflow_net("w8a16", k)
    isim = IntSim(sim, requant=scheme)
    assert isim.grid("x").dtype == np.uint16 and isim.grid("x").zero_point == 0
    report = isim.overflow_report(_hot(k))
    assert [layer.node for layer in report.overflowing] == ["big_gemm"]
    assert report.overflowing[0].high == 65535 * 127 * (k - 1) + _bias_code(isim)
    with pytest.raises(AccumulatorOverflowError, match=r"layer 'big_gemm' \(Gemm\)"):
        isim.run(_hot(k))
    with pytest.raises(LoweringError, match="uint16"):
        IntSim(sim, requant="ort")


def _conv_overflow_net(k=K):
    """The Gemm of _overflow_net as a 1x1 Conv over K input channels (QLinearConv / ConvInteger)."""
    w = np.ones((1, k, 1, 1), F32)
    w[0, 0] = -1.0
    model = make_model([helper.make_node("Conv", ["x", "w", "b"], ["y"], name="big_conv")],
                       [("x", FLOAT, [1, k, 1, 1])], [("y", FLOAT, [1, 1, 1, 1])], {"w": w, "b": np.ones(1, F32)})
    s = QuantSim(refquant.load(model), prepare=False)
    x = np.zeros((1, k, 1, 1), F32)
    x[0, :2] = 1.0
    s.compute_encodings([{"x": x}], progress=False)
    s.set_encoding("y", s.encoding_of("y").with_scale(1.0))
    return s


@pytest.mark.parametrize("scheme, kernels", [(s, "fast") for s in SCHEMES] + [("ort", "reference")])
def test_conv_accumulator_overflow(scheme, kernels):
    """QLinearConv (the fused Numba kernel and the reference) and ConvInteger + bias: the sum of products
    255 * 127 * (K - 1) fits int32, the bias pushes it over; never wrapped."""
    isim = IntSim(_conv_overflow_net(), requant=scheme, kernels=kernels)
    hot = {"x": _hot(K)["x"].reshape(1, K, 1, 1)}
    big = isim.overflow_report(hot).overflowing[0]
    assert big.node == "big_conv" and big.high == 255 * 127 * (K - 1) + _bias_code(isim) > INT32_MAX
    assert big.bound == 255 * 127 * K + _bias_code(isim)
    with pytest.raises(AccumulatorOverflowError, match=r"layer 'big_conv' \(Conv\)"):
        isim.run(hot)
    safe = {"x": np.full((1, K, 1, 1), 0.25, F32)}
    assert isim.overflow_report(safe).overflowing == [] and isim.run(safe, codes=True)["y"].shape == (1, 1, 1, 1)


# ----------------------------------------------------------------------------------------- target dumps
@pytest.mark.parametrize("scheme", SCHEMES)
def test_dump_with_wrong_shape_dtype_or_name_under_every_scheme(sim, scheme, tmp_path):
    """(The dump format's own errors are tested in tests/test_intsim_verify.py; here: each scheme's program.)"""
    from refquant.intsim.verify import DumpError, tensor_filename, verify, write_dump

    feeds = _feed(np.random.default_rng(8))
    codes = IntSim(sim, requant=scheme).tensor_codes(feeds)
    assert verify(sim, write_dump(tmp_path / "good", codes), requant=scheme, progress=False).exact

    def expect(folder, *fragments):
        with pytest.raises(DumpError) as info:
            verify(sim, folder, requant=scheme, progress=False)
        for fragment in fragments:
            assert fragment in str(info.value), str(info.value)

    expect(write_dump(tmp_path / "shape", {**codes, "c": codes["c"].reshape(1, 4, 16)}), tensor_filename("c"),
           "shape [1, 4, 16]", "[1, 4, 4, 4]")
    expect(write_dump(tmp_path / "dtype", {**codes, "g": codes["g"].astype(np.int16)}), tensor_filename("g"),
           "int16", "uint8")
    folder = write_dump(tmp_path / "name", codes)
    np.save(folder / "conv_out.npy", codes["c"])
    expect(folder, "conv_out.npy", "not a tensor of the model")


def test_verify_names_the_layer_whose_accumulator_overflows(tmp_path):
    from refquant.intsim.verify import verify, write_dump

    sim = _overflow_net()
    hot = _hot(K)
    codes = IntSim(sim).tensor_codes({"x": np.full((1, K), 0.25, F32), "z": hot["z"]})
    codes["x"] = IntSim(sim).tensor_codes(hot, ["x"])["x"]  # the target fed x = 1: big_gemm overflows
    with pytest.raises(AccumulatorOverflowError, match=r"layer 'big_gemm' \(Gemm\)"):
        verify(sim, write_dump(tmp_path / "dump", codes), progress=False)


def test_overflow_wrap_reproduces_onnxruntimes_wraparound(tmp_path):
    """IntSim(..., overflow="wrap") is the profile of a target whose int32 adds wrap: onnxruntime's. On the hot
    input the exact accumulator 2147514120 wraps to -2147453176, which requantizes to code 0 where the exact
    (or a saturating) accumulator gives 255: the exported QGemm run by onnxruntime says 0 too, and so does the
    wrapping integer program, with a warning (never silent)."""
    import onnxruntime as ort

    sim = _overflow_net()
    hot = _hot(K)
    with pytest.raises(AccumulatorOverflowError):
        IntSim(sim).run(hot)  # the default stays an error
    isim = IntSim(sim, overflow="wrap")
    with pytest.warns(RuntimeWarning, match=r"wrapped around \(overflow='wrap'\).*QGemm"):
        ours = isim.run(hot)
    with pytest.warns(RuntimeWarning):
        codes = isim.run(hot, codes=True)
    assert codes["y"].item() == 0  # 255 with an exact or saturating accumulator
    path = isim.export(tmp_path / "wrap.onnx")
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        session = exact_ort_session(path, options)
        names = [o.name for o in session.get_outputs()]
        for name, value in zip(names, session.run(names, hot)):
            assert np.array_equal(value, ours[name]), (level, name)
    with pytest.raises(RefquantError, match="overflow='sometimes'"):
        IntSim(sim, overflow="sometimes")


def test_overflow_wrap_through_a_clipped_bias_matches_onnxruntimes_qlinearconv(sim, tmp_path):
    """The clipped-bias conv of test_bias_overflowing_int32 fed x = 1 (it overflows there): with overflow="wrap"
    the integer program equals onnxruntime's QLinearConv on the exported model, bit for bit."""

    _edit_scale(sim, "x", 1e-7)
    _edit_scale(sim, "w", np.full(4, 1e-4))
    with pytest.warns(RuntimeWarning, match="clipped"):
        isim = IntSim(sim, overflow="wrap")
    feeds = _feed(np.random.default_rng(6))
    feeds["x"][:] = 1.0
    with pytest.warns(RuntimeWarning, match="wrapped around"):
        ours = isim.run(feeds)
    path = isim.export(tmp_path / "conv_wrap.onnx")
    session = exact_ort_session(path)
    names = [o.name for o in session.get_outputs()]
    for name, value in zip(names, session.run(names, feeds)):
        assert np.array_equal(value, ours[name]), name
