"""`refquant explain` for AveragePool (QLinearAveragePool), Concat (QLinearConcat / Concat) and Softmax
(QLinearSoftmax): under every requantization scheme the explained code equals the program's code at that element
(isim.run(codes=True)); the inputs it reports equal the codes read here with NumPy slicing; the result agrees with
the op's real-valued formula written out here (within the float32 error stated at each check); int8 softmax
explanations equal onnxruntime's QLinearSoftmax."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import refquant
from refquant.errors import RefquantError
from refquant.intsim.explain import explain
from refquant.intsim.explain_pool_concat import explain_pool_concat
from refquant.intsim.program import IntSim
from refquant.ir import Node
from refquant.quant import QuantSim
from refquant.quant.encoding import from_min_max

from .helpers import FLOAT, make_model

F32 = np.float32
SCHEMES = ["ort", "onnx_reference", "tflite_double", "tflite_single", "exact(half_up)"]
OUTPUTS = ["ap_out", "ap_pad_out", "ap_all_out", "cat_out", "same_out", "sm_out"]


def _model():
    nodes = [helper.make_node("AveragePool", ["x"], ["ap_out"], name="ap", kernel_shape=[3, 3], strides=[2, 2],
                              pads=[1, 1, 1, 1]),  # count_include_pad = 0: border windows divide by their taps
             helper.make_node("AveragePool", ["x"], ["ap_pad_out"], name="ap_pad", kernel_shape=[3, 3],
                              strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1, ceil_mode=1),
             helper.make_node("AveragePool", ["x"], ["ap_all_out"], name="ap_all", kernel_shape=[7, 7]),
             helper.make_node("Concat", ["x", "x2"], ["cat_out"], name="cat", axis=1),
             helper.make_node("Concat", ["x", "x"], ["same_out"], name="same", axis=3),
             helper.make_node("Softmax", ["s"], ["sm_out"], name="sm", axis=-1)]
    return make_model(nodes, [("x", FLOAT, [1, 3, 7, 7]), ("x2", FLOAT, [1, 2, 7, 7]), ("s", FLOAT, [1, 4, 10])],
                      [(n, FLOAT, None) for n in OUTPUTS])


def _feed(rng):
    return {"x": rng.normal(size=(1, 3, 7, 7)).astype(F32), "x2": rng.uniform(-4, 9, size=(1, 2, 7, 7)).astype(F32),
            "s": rng.normal(0, 2, size=(1, 4, 10)).astype(F32)}


@pytest.fixture(scope="module")
def sim():
    rng = np.random.default_rng(11)
    s = QuantSim(refquant.load(_model()), prepare=False)
    s.compute_encodings([_feed(rng) for _ in range(3)], progress=False)
    # AIMET ties the pools' outputs to x's quantizer, and a Concat's output to its inputs only where no other op reads
    # them (x is read by the pools too: "cat" is tied to x2, "same" to nothing); give the pools and x2 grids of their
    # own, so that the pools requantize and "cat" is a QLinearConcat, and tie "same" to x so that it stays a plain
    # Concat on x's grid
    assert s.quantizers["cat_out"].tied_to == "x2" and s.quantizers["same_out"].tied_to is None
    for name, (lo, hi) in {"x2": (-4.0, 9.0), "ap_out": (-1.3, 1.1), "ap_pad_out": (-0.9, 1.7),
                           "ap_all_out": (-0.3, 0.35)}.items():
        assert s.quantizers[name].tied_to == (None if name == "x2" else "x")
        s.quantizers[name].tied_to = None
        s.set_encoding(name, from_min_max(lo, hi, 8, False))
    s.quantizers["cat_out"].tied_to = None
    s.set_encoding("cat_out", from_min_max(-4.0, 9.0, 8, False))
    s.quantizers["same_out"].tied_to = "x"
    return s


@pytest.fixture(scope="module")
def feeds():
    return _feed(np.random.default_rng(12))


@pytest.fixture(scope="module", params=SCHEMES)
def program(request, sim, feeds):
    isim = IntSim(sim, requant=request.param)
    return isim, isim.run(feeds, codes=True), isim.tensor_codes(feeds)


def _flat_indices(size):
    return sorted({0, 5 % size, 23 % size, 37 % size, size - 1})


def _checked(isim, node, out, flat, feeds, codes, op):
    ex = explain(isim, node, flat, feeds)
    assert op in ex.program_ops
    assert np.array_equal(np.asarray(ex.code), codes[out].reshape(-1)[flat])  # the program's code
    y = isim.grid(out)
    assert ex.value == float(F32(F32(ex.code - y.zero_point) * y.scale))
    assert f"result  code {ex.code}" in str(ex)
    return ex


@pytest.mark.parametrize("node, out, include_pad", [("ap", "ap_out", False), ("ap_pad", "ap_pad_out", True)])
def test_average_pool_element(program, feeds, node, out, include_pad):
    isim, codes, tensors = program
    x = tensors["x"].astype(np.int64)
    g, y = isim.grid("x"), isim.grid(out)
    for flat in _flat_indices(codes[out].size):
        ex = _checked(isim, node, out, flat, feeds, codes, "QLinearAveragePool")
        n, c, oy, ox = ex.index
        window = x[n, c, max(0, 2 * oy - 1):2 * oy + 2, max(0, 2 * ox - 1):2 * ox + 2]  # 3x3 at stride 2, pad 1
        assert ex.inputs == {"x": window.reshape(-1).tolist()}
        count = 9 if include_pad else window.size
        real = float(g.scale) * float((window - g.zero_point).sum()) / count / float(y.scale) + y.zero_point
        # float32 dequantize, sum of <= 9 terms, divide, divide, add: < 6 roundings of 2^-24 relative on |t| < 2^9
        assert abs(ex.code - np.clip(real, 0, 255)) <= 0.5 + 1e-3
        assert "count = " in str(ex) and "float32 sum of the taps" in str(ex)


def test_average_pool_over_the_whole_image_is_the_integer_global_average(program, feeds):
    isim, codes, tensors = program
    x = tensors["x"].astype(np.int64)
    for c in range(3):
        ex = _checked(isim, "ap_all", "ap_all_out", c, feeds, codes, "QLinearAveragePool")
        assert ex.inputs == {"x": int(x[0, c].sum())}
        assert "integer global average" in str(ex) and f"acc = sum x - N x_zp = {int(x[0, c].sum())} - 49 * " in str(ex)


def test_concat_element_requantized_from_another_grid(program, feeds):
    isim, codes, tensors = program
    y = isim.grid("cat_out")
    assert "QLinearConcat" in next(e for e in isim.program.lowered if e.node == "cat").ops
    for flat in sorted({0, 60, 147, 150, 200, codes["cat_out"].size - 1}):  # channels 0..2 from x, 3..4 from x2
        ex = _checked(isim, "cat", "cat_out", flat, feeds, codes, "QLinearConcat")
        n, c, h, w = ex.index
        src, local = ("x", (n, c, h, w)) if c < 3 else ("x2", (n, c - 3, h, w))
        q = int(tensors[src][local])
        assert ex.inputs == {src: q}
        g = isim.grid(src)
        if g.same_grid(y):
            assert ex.code == q
        else:  # MlasQuantizeLinear of the dequantized code, written out
            f = F32(F32(g.scale * F32(q - g.zero_point)) / y.scale)
            assert ex.code == int(np.clip(np.rint(f) + y.zero_point, 0, 255))
            assert "256-entry table" in str(ex)


def test_concat_of_inputs_on_the_output_grid_copies(program, feeds):
    isim, codes, tensors = program
    assert next(e for e in isim.program.lowered if e.node == "same").ops == ["Concat"]
    for flat in (0, 10, 13, 293):  # [1, 3, 7, 14]: w < 7 from the first x, else the second
        ex = _checked(isim, "same", "same_out", flat, feeds, codes, "Concat")
        n, c, h, w = ex.index
        assert ex.code == int(tensors["x"][n, c, h, w % 7]) and "copied" in str(ex)


def test_softmax_element(program, feeds):
    isim, codes, tensors = program
    s = tensors["s"].astype(np.int64)
    g, y = isim.grid("s"), isim.grid("sm_out")
    for flat in _flat_indices(codes["sm_out"].size):
        ex = _checked(isim, "sm", "sm_out", flat, feeds, codes, "QLinearSoftmax")
        n, r, j = ex.index
        assert ex.inputs == {"s": int(s[n, r, j])}
        row = float(g.scale) * (s[n, r] - s[n, r].max()).astype(np.float64)
        p = np.exp(row[j]) / np.exp(row).sum()
        # onnxruntime scales by floor(1 / y_scale); the float32 table and sum are within ~1e-6 relative of exp:
        # on a result <= 255 that is < 1e-3 of a step
        expected = p * np.floor(1 / float(y.scale)) + y.zero_point
        assert abs(ex.code - min(expected, 255)) <= 0.5 + 1e-3
        assert f"x_max = {int(s[n, r].max())}" in str(ex) and "floor(1 / y_scale)" in str(ex)


def test_softmax_before_opset_13_reduces_the_flattened_dims():
    model = make_model([helper.make_node("Softmax", ["s"], ["p"], name="sm11", axis=1)],
                       [("s", FLOAT, [2, 3, 4])], [("p", FLOAT, None)], opset=11)
    rng = np.random.default_rng(13)
    sim = QuantSim(refquant.load(model), prepare=False)
    sim.compute_encodings([{"s": rng.normal(size=(2, 3, 4)).astype(F32)} for _ in range(2)], progress=False)
    feeds = {"s": rng.normal(size=(2, 3, 4)).astype(F32)}
    for scheme in ("ort", "tflite_double"):
        isim = IntSim(sim, requant=scheme)
        codes = isim.run(feeds, codes=True)
        for flat in (0, 7, 13, 23):
            ex = explain(isim, "sm11", flat, feeds)
            assert np.array_equal(np.asarray(ex.code), codes["p"].reshape(-1)[flat])
            assert "D = 12 codes" in str(ex) and "flattened from axis 1 (opset 11)" in str(ex)


def test_int8_softmax_explanation_equals_onnxruntime():
    """The explanation's arithmetic on int8 codes (a QLinearSoftmax node built by hand) against onnxruntime."""
    rng = np.random.default_rng(14)
    x = rng.integers(-128, 128, (3, 9)).astype(np.int8)
    for xs, ys, yz in [(0.1, 1 / 256, -128), (0.3, 1 / 250, 0), (0.9, 0.003, 5)]:
        consts = {"xs": F32(xs), "xz": np.int8(-3), "ys": F32(ys), "yz": np.int8(yz)}
        onnx_node = helper.make_node("QLinearSoftmax", ["x", *consts], ["y"], domain="com.microsoft", axis=-1,
                                     opset=13)
        graph = helper.make_graph([onnx_node], "g", [helper.make_tensor_value_info("x", TensorProto.INT8, [3, 9])],
                                  [helper.make_tensor_value_info("y", TensorProto.INT8, None)],
                                  [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                        helper.make_opsetid("com.microsoft", 1)])
        model.ir_version = 8
        expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"x": x})[0]
        node = Node("QLinearSoftmax", ["x", *consts], ["y"], {"axis": -1, "opset": 13}, "sm", "com.microsoft", 1)
        values = dict(consts, x=x)
        for index in [(0, 0), (1, 4), (2, 8), tuple(int(i) for i in np.unravel_index(np.argmax(x), x.shape))]:
            lines, code, inputs = explain_pool_concat(node, values.get, {}, index)
            assert code == int(expected[index]), (xs, ys, yz, index)
            assert inputs == {"x": int(x[index])}


def test_fallback_and_code_ops_still_say_what_they_became(sim, feeds):
    model = make_model([helper.make_node("AveragePool", ["x"], ["y"], name="ap16", kernel_shape=[2, 2])],
                       [("x", FLOAT, [1, 2, 4, 4])], [("y", FLOAT, None)])
    rng = np.random.default_rng(15)
    s16 = QuantSim(refquant.load(model), precision="w8a16", prepare=False)
    s16.compute_encodings([{"x": rng.normal(size=(1, 2, 4, 4)).astype(F32)}], progress=False)
    isim = IntSim(s16, float_fallback=True)  # 16-bit codes: no QLinearAveragePool, the node runs in float
    with pytest.raises(RefquantError, match=r"'ap16' \(AveragePool\) became AveragePool \+ QuantizeLinear \(float\)"):
        explain(isim, "ap16")


def test_cli_explain_softmax_and_average_pool(sim, tmp_path, capsys):
    from refquant.cli import main

    sim.export(tmp_path, prefix="net")
    args = ["explain", str(tmp_path / "net.onnx"), "--encodings", str(tmp_path / "net.encodings")]
    assert main(args + ["--node", "sm", "--index", "0,1,2", "--requant", "tflite_single"]) == 0
    out = capsys.readouterr().out
    assert "(Softmax -> QLinearSoftmax)" in out and "element [0,1,2]" in out and "exp table" in out
    assert main(args + ["--node", "ap_pad", "--index", "5"]) == 0
    out = capsys.readouterr().out
    assert "(AveragePool -> QLinearAveragePool)" in out and "float32 sum of the taps" in out
