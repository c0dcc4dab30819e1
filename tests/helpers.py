"""Small model builders shared by the tests."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper


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
