"""`refquant explain`: the integer arithmetic of one output element (refquant.intsim.explain).

The accumulator is checked against a hand computation in int64 from the codes (receptive field / row and
column taken here with NumPy slicing, weights quantized here from the float weights and the encoding), the bias
against round(b / (x_scale * w_scale)), the result against onnxruntime's requantization formula written out
(numerics.md §2.1) and against the code the integer program computes."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

import refquant
from refquant.cli import main
from refquant.errors import RefquantError
from refquant.intsim.explain import default_feeds, explain
from refquant.intsim.program import IntSim
from refquant.quant import QuantSim, quantize_dequantize

from .helpers import FLOAT, make_model

F32 = np.float32


def _model():
    rng = np.random.default_rng(3)
    init = {"wc": rng.normal(0, 0.3, (6, 2, 3, 3)), "bc": rng.normal(0, 0.2, 6),
            "wg": rng.normal(0, 0.2, (5, 96)), "bg": rng.normal(0, 0.2, 5),
            "wm": rng.normal(0, 0.3, (8, 5))}
    nodes = [helper.make_node("Conv", ["x", "wc", "bc"], ["conv_out"], name="conv", group=2, strides=[2, 2],
                              pads=[1, 1, 1, 1]),
             helper.make_node("Flatten", ["conv_out"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "wg", "bg"], ["gemm_out"], name="gemm", transB=1),
             helper.make_node("MatMul", ["a", "wm"], ["mm_out"], name="matmul")]
    return make_model(nodes, [("x", FLOAT, [2, 4, 7, 7]), ("a", FLOAT, [2, 3, 8])],
                      [("conv_out", FLOAT, [2, 6, 4, 4]), ("gemm_out", FLOAT, [2, 5]), ("mm_out", FLOAT, [2, 3, 5])],
                      {k: v.astype(np.float32) for k, v in init.items()})


@pytest.fixture(scope="module")
def sim():
    rng = np.random.default_rng(4)
    s = QuantSim(refquant.load(_model()))
    s.compute_encodings([{"x": rng.normal(size=(2, 4, 7, 7)).astype(F32),
                          "a": rng.normal(size=(2, 3, 8)).astype(F32)} for _ in range(4)], progress=False)
    return s


@pytest.fixture(scope="module")
def feeds():
    rng = np.random.default_rng(5)
    return {"x": rng.normal(size=(2, 4, 7, 7)).astype(F32), "a": rng.normal(size=(2, 3, 8)).astype(F32)}


def weight_codes(sim, name):
    """int8 codes of a symmetric per-channel weight: round(QDQ(w) / scale) along the encoding's axis."""
    enc = sim.encoding_of(name)
    w = sim.graph.initializers[name]
    shape = [1] * w.ndim
    shape[enc.axis] = -1
    scale = np.asarray(enc.scale, dtype=np.float64).reshape(shape)
    return np.rint(quantize_dequantize(w, enc, "half_even").astype(np.float64) / scale).astype(np.int64), \
        np.asarray(enc.scale, F32)


def bias_codes(sim, name, x_scale, w_scale):
    b = sim.graph.initializers[name].astype(np.float64)
    return np.round(b / (F32(x_scale) * w_scale).astype(F32).astype(np.float64)).astype(np.int64)


def ort_requant(acc, x_scale, w_scale, y_scale, y_zp):
    """onnxruntime's MlasRequantizeOutput, numerics.md §2.1: rint_even(clamp(f32(acc) * m)) + zp."""
    m = F32(F32(F32(x_scale) * F32(w_scale)) / F32(y_scale))
    f = F32(F32(acc) * m)
    f = min(max(f, F32(0 - y_zp)), F32(255 - y_zp))
    return int(np.rint(f)) + y_zp


@pytest.mark.parametrize("scheme", ["ort", "tflite_double", "exact(half_up)"])
@pytest.mark.parametrize("index", [(0, 4, 0, 0), (1, 1, 2, 3), (1, 5, 3, 1)])  # (0, *, 0, 0) reads padding
def test_conv_element(sim, feeds, scheme, index):
    isim = IntSim(sim, requant=scheme)
    ex = explain(isim, "conv", index, feeds)
    n, m, oh, ow = index
    x = isim.tensor_codes(feeds, ["x"])["x"].astype(np.int64)
    xg = isim.grid("x")
    w, ws = weight_codes(sim, "wc")
    padded = np.pad(x, [(0, 0), (0, 0), (1, 1), (1, 1)], constant_values=xg.zero_point)
    group = m // 3  # 6 output channels in 2 groups of 3; each group reads 2 input channels
    window = padded[n, 2 * group:2 * group + 2, 2 * oh:2 * oh + 3, 2 * ow:2 * ow + 3]
    hand = int(np.sum((window - xg.zero_point) * w[m]))
    bias = int(bias_codes(sim, "bc", xg.scale, ws)[m])
    assert (ex.sum_products, ex.bias, ex.acc) == (hand, bias, hand + bias)
    assert len(ex.terms) == 18 and ex.channel == m
    program = isim.run(feeds, codes=True)["conv_out"]
    assert np.array_equal(np.asarray(ex.code), program[index])
    yg = isim.grid("conv_out")
    if scheme == "ort":
        assert ex.code == ort_requant(hand + bias, xg.scale, ws[m], yg.scale, yg.zero_point)
    assert ex.value == float(F32(F32(ex.code - yg.zero_point) * yg.scale))
    assert ex.value == float(isim.run(feeds)["conv_out"][index])
    text = str(ex)
    assert f"acc = {hand} + {bias} = {hand + bias}" in text and f"result  code {ex.code}" in text
    assert "receptive field: input channels" in text and f"M0 = {ex.fixed_point[0]}" in text


@pytest.mark.parametrize("scheme", ["ort", "tflite_single"])
def test_gemm_element(sim, feeds, scheme):
    isim = IntSim(sim, requant=scheme)
    ex = explain(isim, "gemm", 8, feeds)  # flat index 8 of [2, 5] -> (1, 3)
    assert ex.index == (1, 3)
    a = isim.tensor_codes(feeds, ["flat"])["flat"].astype(np.int64)
    ag = isim.grid("flat")
    w, ws = weight_codes(sim, "wg")  # [N, K], transB=1, per output column (axis 0)
    hand = int(np.sum((a[1] - ag.zero_point) * w[3]))
    bias = int(bias_codes(sim, "bg", ag.scale, ws)[3])
    assert (ex.sum_products, ex.acc, len(ex.terms)) == (hand, hand + bias, 96)
    assert np.array_equal(np.asarray(ex.code), isim.run(feeds, codes=True)["gemm_out"][1, 3])
    if scheme == "ort":
        yg = isim.grid("gemm_out")
        assert ex.code == ort_requant(hand + bias, ag.scale, ws[3], yg.scale, yg.zero_point)
    assert "... " in str(ex) and "more terms" in str(ex)  # 96 terms are shortened, totals printed


def test_matmul_element_with_a_batch_dimension(sim, feeds):
    isim = IntSim(sim)
    ex = explain(isim, "matmul", "1,2,4", feeds)
    a = isim.tensor_codes(feeds, ["a"])["a"].astype(np.int64)
    ag = isim.grid("a")
    w, ws = weight_codes(sim, "wm")  # [K, N]: MatMul weights are per column (axis 1)
    hand = int(np.sum((a[1, 2] - ag.zero_point) * w[:, 4]))
    assert (ex.sum_products, ex.bias, ex.acc) == (hand, None, hand)
    code = isim.run(feeds, codes=True)["mm_out"][1, 2, 4]
    assert np.array_equal(np.asarray(ex.code), code)
    yg = isim.grid("mm_out")
    assert ex.code == ort_requant(hand, ag.scale, ws[4] if ws.size > 1 else ws, yg.scale, yg.zero_point)


def test_default_feed_is_deterministic_and_said(sim):
    isim = IntSim(sim)
    one, two = explain(isim, "conv", 7), explain(isim, "conv", 7)
    assert (one.acc, one.code) == (two.acc, two.code)
    assert "deterministic random feed" in str(one)
    feeds = default_feeds(isim)
    assert np.array_equal(np.asarray(one.code), isim.run(feeds, codes=True)["conv_out"].reshape(-1)[7])


def test_errors_name_the_node(sim, feeds):
    isim = IntSim(sim)
    with pytest.raises(RefquantError, match=r"no node named 'conv_1'.*near: 'conv'"):
        explain(isim, "conv_1")
    with pytest.raises(RefquantError, match=r"'flatten' \(Flatten\) became Flatten \(codes\).*copy them unchanged"):
        explain(isim, "flatten")
    with pytest.raises(RefquantError, match=r"outside the 192 elements"):
        explain(isim, "conv", 192)
    with pytest.raises(RefquantError, match=r"does not address an element"):
        explain(isim, "conv", (0, 6, 0, 0))
    # an output tensor name finds its node
    assert explain(isim, "gemm_out", 0, feeds).node == "gemm"


def test_cli_explain(sim, tmp_path, capsys):
    sim.export(tmp_path, prefix="net")
    args = ["explain", str(tmp_path / "net.onnx"), "--encodings", str(tmp_path / "net.encodings")]
    assert main(args + ["--node", "conv", "--index", "0,1,2,3", "--requant", "tflite_double"]) == 0
    out = capsys.readouterr().out
    assert "element [0,1,2,3]" in out and "SaturatingRoundingDoublingHighMul" in out
    assert "deterministic random feed" in out and "result  code" in out
    np.savez(tmp_path / "data.npz", x=np.ones((2, 4, 7, 7), F32), a=np.ones((2, 3, 8), F32))
    assert main(args + ["--node", "gemm", "--data", str(tmp_path / "data.npz")]) == 0
    assert "the first sample of" in capsys.readouterr().out
    assert main(args + ["--node", "cnv"]) == 2
    assert "no node named 'cnv'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- element-wise layers
@pytest.fixture(scope="module")
def elementwise():
    shape = [1, 4, 5, 5]
    nodes = [helper.make_node("Add", ["x", "z"], ["add_out"], name="add"),
             helper.make_node("Mul", ["add_out", "z"], ["mul_out"], name="mul"),
             helper.make_node("Add", ["mul_out", "s"], ["badd_out"], name="badd"),  # s [1, 4, 1, 1] broadcasts
             helper.make_node("Sigmoid", ["badd_out"], ["sig_out"], name="sig"),
             helper.make_node("LeakyRelu", ["mul_out"], ["lrelu_out"], name="lrelu", alpha=0.1),
             helper.make_node("Tanh", ["add_out"], ["tanh_out"], name="tanh"),
             helper.make_node("GlobalAveragePool", ["lrelu_out"], ["gap_out"], name="gap")]
    outputs = ["add_out", "mul_out", "badd_out", "sig_out", "lrelu_out", "tanh_out", "gap_out"]
    model = make_model(nodes, [("x", FLOAT, shape), ("z", FLOAT, shape), ("s", FLOAT, [1, 4, 1, 1])],
                       [(n, FLOAT, None) for n in outputs])
    rng = np.random.default_rng(6)

    def feed():
        return {"x": rng.normal(size=shape).astype(F32), "z": rng.normal(size=shape).astype(F32),
                "s": rng.normal(size=(1, 4, 1, 1)).astype(F32)}

    s = QuantSim(refquant.load(model))
    s.compute_encodings([feed() for _ in range(3)], progress=False)
    isim = IntSim(s)
    feeds = feed()
    return isim, feeds, isim.run(feeds, codes=True), isim.tensor_codes(feeds)


@pytest.mark.parametrize("node, out, op", [("add", "add_out", "QLinearAdd"), ("mul", "mul_out", "QLinearMul"),
                                           ("badd", "badd_out", "QLinearAdd"), ("sig", "sig_out", "QLinearSigmoid"),
                                           ("lrelu", "lrelu_out", "QLinearLeakyRelu"), ("tanh", "tanh_out", "Gather"),
                                           ("gap", "gap_out", "QLinearGlobalAveragePool")])
def test_elementwise_element(elementwise, node, out, op):
    isim, feeds, codes, tensors = elementwise
    size = codes[out].size
    for flat in sorted({0, 37 % size, 61 % size, size - 1}):
        ex = explain(isim, node, flat, feeds)
        assert op in ex.program_ops
        assert np.array_equal(np.asarray(ex.code), codes[out].reshape(-1)[flat])
        y = isim.grid(out)
        assert ex.value == float(F32(F32(ex.code - y.zero_point) * y.scale))
        index = ex.index
        if op in ("QLinearAdd", "QLinearMul"):
            a_name, b_name = ("x", "z") if node == "add" else ("add_out", "z") if node == "mul" else ("mul_out", "s")
            a = int(tensors[a_name][index])
            b = int(tensors[b_name][index[:2] + (0, 0)] if b_name == "s" else tensors[b_name][index])
            assert ex.inputs == {a_name: a, b_name: b}
            ga, gb = isim.grid(a_name), isim.grid(b_name)
            if op == "QLinearAdd":
                real = (float(ga.scale) * (a - ga.zero_point) + float(gb.scale) * (b - gb.zero_point)) / float(y.scale)
                # float32 evaluation of |t| <= 2^8 in three roundings: error < 3 * 2^-24 * 2^8 < 1e-4 steps
                assert abs(ex.code - np.clip(real + y.zero_point, 0, 255)) <= 0.5 + 1e-4
            else:  # numerics.md §5: rint(f32(f32(product) * f32(f32(sa sb) / sc)) + zc)
                m = F32(F32(ga.scale * gb.scale) / y.scale)
                t = F32(F32(F32((a - ga.zero_point) * (b - gb.zero_point)) * m) + F32(y.zero_point))
                assert ex.code == int(np.clip(np.rint(t), 0, 255))
        elif op == "QLinearGlobalAveragePool":
            window = tensors["lrelu_out"][index[0], index[1]].astype(np.int64)
            assert ex.inputs == {"lrelu_out": int(window.sum())}
            assert f"acc = sum x - N x_zp = {int(window.sum())} - 25 * " in str(ex)
        else:
            source = {"sig": "badd_out", "lrelu": "mul_out", "tanh": "add_out"}[node]
            q = int(tensors[source][index])
            assert ex.inputs == {source: q}
            g = isim.grid(source)
            x = float(g.scale) * (q - g.zero_point)
            f = {"sig": lambda v: 1 / (1 + np.exp(-v)), "lrelu": lambda v: v if v >= 0 else 0.1 * v,
                 "tanh": np.tanh}[node](x)
            # the targets' float32 function (MLAS's logistic approximation, float32 tanh) may flip a rounding
            # that the exact function leaves on the other side of a tie: at most one step
            assert abs(ex.code - np.clip(np.rint(f / float(y.scale)) + y.zero_point, 0, 255)) <= 1

