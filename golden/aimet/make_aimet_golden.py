"""Golden files from aimet-onnx 2.42.0 itself, for tests/test_aimet_golden.py.

Run with a Python that has aimet-onnx (it needs PyTorch, which refquant does not; see bench/aimet_run.py for the
virtual environment), from the repository root:

    /tmp/aimet-venv/bin/python golden/aimet/make_aimet_golden.py

It writes, next to itself:

* ``scale_guard.onnx``: a small model built with onnx.helper whose layers have near-dead channels (weights of
  1e-9..1e-7 beside a large bias), so that AIMET's weight-scale guard (its "Adjusted weight scale ... to prevent
  bias/scale overflow-underflow") changes their scales: Conv (output quantized), Conv+Relu (output not quantized),
  MatMul+Add (see ``scale_guard_model``). ``scale_guard_calib.npy``: its 64 calibration inputs (N(0,1), seed 0).
  ``scale_guard_<cfg>.encodings``: AIMET's encodings 1.0.0 after ``compute_encodings`` on them, for
  cfg = ``pc`` (config "default", per-channel) and ``pt`` (the package's default_config.json, per-tensor).
* ``mobilenet_v2_params.npz``: AIMET's weight encodings (scale, offset per weight) of
  /work/shared/models/mobilenet_v2_imagenet.onnx under W8 per-channel, W8 per-tensor and W4 per-channel, keys
  ``<cfg>/<weight>/scale|offset`` (cfg = w8_pc, w8_pt, w4_pc). They depend on the weights only (no channel of
  this model needs the guard, checked: the scales equal the plain formula), so one calibration batch is enough.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
MOBILENET = Path("/work/shared/models/mobilenet_v2_imagenet.onnx")


def scale_guard_model() -> onnx.ModelProto:
    """conv1 (output quantized: steps 2 and 3 bind) -> conv2 + Relu (output not quantized: step 1) -> Flatten ->
    Gemm -> "logits"; input -> Flatten -> MatMul + Add (all weights tiny: the per-tensor scale needs the guard)
    -> "aux". Near-dead weights are 1e-4 of the others, above AIMET's minimum scale 2^-23."""
    rng = np.random.default_rng(0)
    f32 = np.float32
    w1 = rng.normal(0, 0.3, (8, 4, 3, 3)).astype(f32)
    w1[0:3] *= 1e-4
    b1 = rng.normal(0, 0.1, 8).astype(f32)
    b1[0:3] = (100.0, -100.0, 0.0)
    w2 = rng.normal(0, 0.3, (8, 8, 1, 1)).astype(f32)
    w2[0] *= 1e-4
    b2 = rng.normal(0, 0.1, 8).astype(f32)
    b2[0] = 5000.0
    w3 = rng.normal(0, 0.05, (10, 512)).astype(f32)
    b3 = rng.normal(0, 0.1, 10).astype(f32)
    w5 = rng.normal(0, 1e-5, (256, 6)).astype(f32)
    b5 = rng.normal(0, 0.1, 6).astype(f32)
    b5[0:2] = (-30.0, 30.0)
    inits = [numpy_helper.from_array(a, n) for a, n in
             ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"), (w3, "w3"), (b3, "b3"), (w5, "w5"), (b5, "b5"))]
    n = helper.make_node
    nodes = [n("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             n("Conv", ["c1", "w2", "b2"], ["c2"], name="conv2"),
             n("Relu", ["c2"], ["r2"], name="relu2"),
             n("Flatten", ["r2"], ["f"], name="flatten"),
             n("Gemm", ["f", "w3", "b3"], ["logits"], name="gemm", transB=1),
             n("Flatten", ["input"], ["f0"], name="flatten0"),
             n("MatMul", ["f0", "w5"], ["m"], name="matmul"),
             n("Add", ["m", "b5"], ["aux"], name="add")]
    graph = helper.make_graph(nodes, "scale_guard",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10]),
                               helper.make_tensor_value_info("aux", TensorProto.FLOAT, ["batch", 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def aimet_sim(model, param_type: str, config: str, batches):
    from aimet_onnx.quantsim import QuantizationSimModel

    sim = QuantizationSimModel(model, param_type=param_type, activation_type="int8", quant_scheme="min_max",
                               config_file=config)
    sim.compute_encodings(batches)
    return sim


def per_tensor_config() -> str:
    import aimet_onnx

    return str(Path(aimet_onnx.__file__).parent / "common" / "quantsim_config" / "default_config.json")


def main() -> None:
    model = scale_guard_model()
    onnx.save(model, HERE / "scale_guard.onnx")
    calib = np.random.default_rng(0).standard_normal((64, 4, 8, 8)).astype(np.float32)
    np.save(HERE / "scale_guard_calib.npy", calib)
    batches = [{"input": calib[i:i + 16]} for i in range(0, 64, 16)]
    for cfg, config in (("pc", "default"), ("pt", per_tensor_config())):
        sim = aimet_sim(onnx.load(HERE / "scale_guard.onnx"), "int8", config, batches)
        sim.export(str(HERE), f"scale_guard_{cfg}", export_model=False, encoding_version="1.0.0")

    rng = np.random.default_rng(0)
    batch = [{"input": rng.standard_normal((2, 3, 224, 224)).astype(np.float32)}]
    arrays = {}
    for cfg, param_type, config in (("w8_pc", "int8", "default"), ("w8_pt", "int8", per_tensor_config()),
                                    ("w4_pc", "int4", "default")):
        sim = aimet_sim(onnx.load(MOBILENET), param_type, config, batch)
        sim.export("/tmp", "mnv2_params", export_model=False, encoding_version="1.0.0")
        for entry in json.loads(Path("/tmp/mnv2_params.encodings").read_text())["param_encodings"]:
            arrays[f"{cfg}/{entry['name']}/scale"] = np.asarray(entry["scale"], dtype=np.float64)
            arrays[f"{cfg}/{entry['name']}/offset"] = np.asarray(entry["offset"], dtype=np.float64)
    np.savez_compressed(HERE / "mobilenet_v2_params.npz", **arrays)


if __name__ == "__main__":
    main()
