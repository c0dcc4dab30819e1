"""refquant.model_info: parameters and multiply-accumulates, for float models and their integer forms."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import quantize_dynamic

import refquant
from refquant.model_info import describe


def _float_model():
    """Conv 3->8 (3x3, 16x16, pad 1) -> Reshape [16, 1, 128] -> LSTM (hidden 4) -> MatMul 4->5."""
    rng = np.random.default_rng(0)
    inits = {"w": rng.normal(size=(8, 3, 3, 3)), "shape": np.array([16, 1, 128]), "W": rng.normal(size=(1, 16, 128)),
             "R": rng.normal(size=(1, 16, 4)), "m": rng.normal(size=(4, 5))}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["c", "shape"], ["s"]),
             helper.make_node("LSTM", ["s", "W", "R"], ["", "h"], hidden_size=4),
             helper.make_node("MatMul", ["h", "m"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 5])],
                              [numpy_helper.from_array(v.astype(np.int64 if k == "shape" else np.float32), k)
                               for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_integer_layers_count_like_their_float_forms(tmp_path):
    model = _float_model()
    onnx.save(model, tmp_path / "f.onnx")
    quantize_dynamic(tmp_path / "f.onnx", tmp_path / "q.onnx", op_types_to_quantize=["Conv", "LSTM", "MatMul"])
    ops = {n.op_type for n in onnx.load(tmp_path / "q.onnx").graph.node}
    assert {"ConvInteger", "DynamicQuantizeLSTM", "MatMulInteger"} <= ops
    # by hand: Conv 8*16*16 outputs * 27 taps; LSTM 16 steps * 1 row * 16 gate rows * (128 + 4); MatMul 5 * 4
    expected = 8 * 256 * 27 + 16 * 16 * (128 + 4) + 5 * 4
    parameters = 8 * 27 + 16 * 128 + 16 * 4 + 4 * 5
    for path in (tmp_path / "f.onnx", tmp_path / "q.onnx"):
        info = describe(refquant.load(path))
        assert info.macs == expected and not info.macs_unknown, path.name
        # the quantized model adds its scales and zero points (a handful of scalars) to the weights' codes
        assert parameters <= info.parameters <= parameters + 16, (path.name, info.parameters)
