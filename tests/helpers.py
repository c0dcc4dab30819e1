"""Small model builders shared by the tests."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from refquant.intsim.unsigned_weights import cpu_flags, onnxruntime_saturates_u8s8, unsigned_weights  # noqa: F401


def make_model(nodes, inputs, outputs, initializers=(), opset=17, ir_version=None) -> onnx.ModelProto:
    """inputs/outputs: (name, elem_type, shape) tuples; initializers: {name: array}."""
    graph = helper.make_graph(
        nodes, "test",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
        [numpy_helper.from_array(np.asarray(a), name) for name, a in dict(initializers).items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version or {7: 3, 9: 4, 11: 6, 13: 7, 17: 8, 21: 10}.get(opset, 8)
    return model


def ort_run(model: onnx.ModelProto, feeds: dict) -> dict:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64


# ------------------------------------------------------------------ the AIMET samples (../shared/refs/aimet_samples)
SHARED = Path(os.environ.get("REFQUANT_SHARED", "/work/shared"))
SAMPLES = SHARED / "refs" / "aimet_samples"
SAMPLE_MODELS = {"convnet": "model_bnfolded.onnx", "mlp": "model.onnx", "mtcnn_rnet": "model.onnx"}
needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(),
                                   reason=f"missing external resource: AIMET samples at {SAMPLES}")


def load_sample(entry):
    """The sample's model (convnet: the BN-folded one AIMET simulated)."""
    import refquant

    return refquant.load(SAMPLES / entry / SAMPLE_MODELS[entry])


def sample_inputs(entry, split, n=None):
    """The sample's ``split`` inputs ("calib" or "eval"), the first ``n`` when given."""
    x = np.load(SAMPLES / entry / f"{split}.npz")["input"]
    return x if n is None else x[:n]


def exact_ort_session(model, options=None):
    """An onnxruntime CPU session of ``model`` (a path or a ModelProto) whose integer ops compute the exact sums the
    ONNX operators define. Where onnxruntime's u8 x s8 kernels saturate pairs of products to int16 (x86 AVX2 without
    VNNI), that is the same model with its int8 weights stored as uint8, w + 128 with zero point z + 128: the same
    function, run by the u8 x u8 kernels, which are exact on every x86 CPU (refquant.intsim.unsigned_weights)."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    if onnxruntime_saturates_u8s8():
        proto = unsigned_weights(proto)[0]
    if options is None:
        options = ort.SessionOptions()
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def litert_int8_layer(op: str, version: int, options, x, w, bias, xs, xz, ws, ys, yz, out_shape) -> bytes:
    """A one-op int8 LiteRT model (flatbuffer schema shipped with ai-edge-litert): input x (scale xs, zero
    point xz), symmetric int8 weights w with one scale or one per output channel (axis 0), int32 bias at scale
    xs * ws, int8 output of ``out_shape`` (ys, yz). ``op``: a BuiltinOperator name (CONV_2D, FULLY_CONNECTED);
    ``options``: (BuiltinOptions name, options object) built from the same schema."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as S

    def tensor(shape, ttype, buf, name, scale, zp):
        t = S.TensorT()
        t.shape, t.type, t.buffer, t.name = list(shape), ttype, buf, name
        q = S.QuantizationParametersT()
        q.scale, q.zeroPoint = [float(v) for v in np.atleast_1d(scale)], [int(v) for v in np.atleast_1d(zp)]
        q.quantizedDimension = 0
        t.quantization = q
        return t

    ws = np.atleast_1d(ws)
    tensors = [tensor(x.shape, S.TensorType.INT8, 1, "x", xs, xz),
               tensor(w.shape, S.TensorType.INT8, 2, "w", ws, np.zeros(ws.size, int)),
               tensor((len(bias),), S.TensorType.INT32, 3, "b", (xs * ws).astype(np.float32), np.zeros(ws.size, int)),
               tensor(out_shape, S.TensorType.INT8, 4, "y", ys, yz)]
    operator = S.OperatorT()
    operator.opcodeIndex, operator.inputs, operator.outputs = 0, [0, 1, 2], [3]
    operator.builtinOptionsType, operator.builtinOptions = getattr(S.BuiltinOptions, options[0]), options[1]
    code = S.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = getattr(S.BuiltinOperator, op)
    code.version = version
    graph = S.SubGraphT()
    graph.tensors, graph.inputs, graph.outputs, graph.operators = tensors, [0], [3], [operator]
    model = S.ModelT()
    model.version, model.operatorCodes, model.subgraphs, model.buffers = 3, [code], [graph], []
    for data in (None, None, w, bias, None):
        buffer = S.BufferT()
        buffer.data = None if data is None else np.frombuffer(data.tobytes(), np.uint8).tolist()
        model.buffers.append(buffer)
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())
