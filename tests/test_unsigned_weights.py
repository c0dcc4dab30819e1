"""int8 weights stored as uint8 (refquant.intsim.unsigned_weights): the same function by construction, checked with
the ONNX reference evaluator (exact integer semantics, no CPU kernels) and with onnxruntime on this CPU."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from refquant.intsim.unsigned_weights import onnxruntime_saturates_u8s8, unsigned_weights

from .helpers import exact_ort_session

RNG = np.random.default_rng(11)


def integer_model():
    """QLinearConv (per-channel int8 weights) -> QLinearMatMul (per-tensor int8 weights, zero point -3) ->
    a QDQ weight pair in float feeding a MatMul; full-range weights, so u8 x s8 pair sums reach 2 * 255 * 128."""
    w_conv = RNG.integers(-128, 128, (4, 3, 3, 3)).astype(np.int8)
    w_conv[0, 0, 0, :2] = -128  # a pair of extreme products at the first taps
    w_mm = RNG.integers(-128, 128, (4 * 6 * 6, 5)).astype(np.int8)
    w_float = RNG.normal(size=(5, 3)).astype(np.float32)
    inits = {"xs": np.float32(0.02), "xz": np.uint8(128), "wcs": np.full(4, 0.01, np.float32),
             "wcz": np.zeros(4, np.int8), "wc": w_conv, "ys": np.float32(0.5), "yz": np.uint8(120),
             "wm": w_mm, "wms": np.float32(0.003), "wmz": np.int8(-3), "zs": np.float32(0.7), "zz": np.uint8(100),
             "wf": w_float, "wfs": np.float32(0.02), "wfz": np.int8(0)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("QLinearConv", ["xq", "xs", "xz", "wc", "wcs", "wcz", "ys", "yz"], ["yq"]),
             helper.make_node("Flatten", ["yq"], ["fq"]),
             helper.make_node("QLinearMatMul", ["fq", "ys", "yz", "wm", "wms", "wmz", "zs", "zz"], ["zq"]),
             helper.make_node("DequantizeLinear", ["zq", "zs", "zz"], ["z"]),
             helper.make_node("QuantizeLinear", ["wf", "wfs", "wfz"], ["wfq"]),
             helper.make_node("DequantizeLinear", ["wfq", "wfs", "wfz"], ["wfd"]),
             helper.make_node("MatMul", ["z", "wfd"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 3]),
                               helper.make_tensor_value_info("zq", TensorProto.UINT8, [2, 5])],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    return model


def test_the_uint8_form_computes_what_the_int8_form_computes():
    model = integer_model()
    rewritten, count = unsigned_weights(model)
    assert count == 3  # the conv's and the matmul's weights, and the float weight's QDQ pair
    inits = {t.name: numpy_helper.to_array(t) for t in rewritten.graph.initializer}
    assert {"wc", "wm", "wcz", "wmz"}.isdisjoint(inits)  # the int8 originals are gone
    conv = next(n for n in rewritten.graph.node if n.op_type == "QLinearConv")
    np.testing.assert_array_equal(inits[conv.input[3]], (numpy_helper.to_array(
        next(t for t in model.graph.initializer if t.name == "wc")).astype(np.int16) + 128).astype(np.uint8))
    assert inits[conv.input[5]].dtype == np.uint8 and np.all(inits[conv.input[5]] == 128)
    matmul = next(n for n in rewritten.graph.node if n.op_type == "QLinearMatMul")
    assert inits[matmul.input[5]] == np.uint8(125)  # -3 + 128
    onnx.checker.check_model(rewritten)
    x = RNG.normal(size=(2, 3, 8, 8)).astype(np.float32) * 3
    want = ReferenceEvaluator(model).run(None, {"x": x})
    got = ReferenceEvaluator(rewritten).run(None, {"x": x})
    for a, b in zip(want, got):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    # onnxruntime on this CPU, through the tests' harness, agrees with the exact reference on the codes
    theirs = exact_ort_session(model).run(None, {"x": x})
    assert np.array_equal(theirs[1], want[1])


def test_int8_activations_and_computed_weights_are_left_alone():
    model = integer_model()
    for init in model.graph.initializer:
        if init.name in ("xz", "yz"):
            init.CopyFrom(numpy_helper.from_array(np.asarray(0, np.int8), init.name))  # int8 activations
    rewritten, count = unsigned_weights(model)
    assert count == 1  # only the QDQ weight pair: onnxruntime has no int8 x uint8 kernel
    assert {t.name for t in rewritten.graph.initializer} >= {"wc", "wm"}


@pytest.mark.parametrize("flags,machine,saturates", [({"avx2", "fma"}, "x86_64", True),
                                                     ({"avx2", "avx512_vnni"}, "x86_64", False),
                                                     ({"avx2", "avx_vnni"}, "x86_64", False),
                                                     ({"sse2"}, "x86_64", False),
                                                     ({"avx2"}, "aarch64", False)])
def test_which_cpus_saturate(monkeypatch, flags, machine, saturates):
    import platform

    monkeypatch.setattr(platform, "machine", lambda: machine)
    assert onnxruntime_saturates_u8s8(flags) is saturates
