"""aimet-onnx 2.42.0's tied quantizers on small probe models (tests/test_aimet_ties.py).

Run with the Python that has aimet-onnx (it needs PyTorch, which refquant does not), from the repository root:

    /tmp/aimet-venv/bin/python golden/aimet/make_tie_golden.py

AIMET ties quantizers in two passes (backward through Concat, then forward through Relu, AveragePool, Resize), and
a later move overrides an earlier one. Each case is built with onnx.helper (x: [1, 2, 4, 4]): a Relu whose input
has two readers, Resize outputs feeding a Concat whose input is read elsewhere, Relu and AveragePool feeding one
Concat, a Concat of two Sigmoids (one fixed range) and of a Sigmoid and a Conv (conflicting ranges), and under the
htp_v73 config a Relu (fixed min 0) whose input has another reader. Calibrated with min_max on
``ties_batches.npy`` (three batches of N(0, 1) times 1, 3 and 0.5, seed 0).

Written to golden/aimet/ties/: ``<case>.onnx``, ``ties_batches.npy`` and ``ties.json``: per case, each enabled
activation quantizer's group (the first tensor, in AIMET's activation order, sharing its quantizer object) and its
encoding's min and max.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent / "ties"
CONFIGS = Path(__file__).resolve().parent / "configs"


def _model(nodes, outputs, initializers) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "ties", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                              [numpy_helper.from_array(v, k) for k, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def cases() -> dict:
    n = helper.make_node
    rng = np.random.default_rng(0)
    w = rng.normal(0, 1, (2, 2, 1, 1)).astype(np.float32)
    w3 = (w * 3).astype(np.float32)
    scales = np.float32([1, 1, 2, 2])
    return {
        "relu_two_readers": ("default_config_per_channel", _model(
            [n("Conv", ["x", "w"], ["c"]), n("Relu", ["c"], ["y"]), n("Neg", ["c"], ["z"])], ["y", "z"], {"w": w})),
        "resize_concat": ("default_config_per_channel", _model(
            [n("Conv", ["x", "w"], ["c"]), n("Resize", ["c", "", "sc"], ["r"], mode="nearest"),
             n("Conv", ["x", "w3"], ["t"]), n("Resize", ["t", "", "sc"], ["t2"], mode="nearest"),
             n("Concat", ["r", "t2"], ["cat"], axis=1), n("Neg", ["c"], ["z"])], ["cat", "z"],
            {"w": w, "w3": w3, "sc": scales})),
        "relu_pool_concat": ("default_config_per_channel", _model(
            [n("Conv", ["x", "w"], ["c"]), n("Neg", ["c"], ["nc"]), n("Relu", ["nc"], ["r"]),
             n("Conv", ["x", "w3"], ["t"]), n("Neg", ["t"], ["nt"]),
             n("AveragePool", ["nt"], ["p"], kernel_shape=[1, 1]), n("Concat", ["r", "p", "x"], ["cat"], axis=1)],
            ["cat"], {"w": w, "w3": w3})),
        "sigmoid_concat": ("default_config_per_channel", _model(
            [n("Sigmoid", ["x"], ["s1"]), n("Neg", ["x"], ["nx"]), n("Sigmoid", ["nx"], ["s2"]),
             n("Concat", ["s1", "s2"], ["cat"], axis=1)], ["cat"], {})),
        "sigmoid_conv_concat": ("default_config_per_channel", _model(
            [n("Sigmoid", ["x"], ["s1"]), n("Conv", ["x", "w3"], ["t"]), n("Concat", ["s1", "t"], ["cat"], axis=1)],
            ["cat"], {"w3": w3})),
        "htp_relu_two_readers": ("htp_quantsim_config_v73", _model(
            [n("Conv", ["x", "w"], ["c"]), n("Neg", ["c"], ["nc"]), n("Relu", ["nc"], ["y"]), n("Abs", ["nc"], ["z"]),
             n("Neg", ["c"], ["m"]), n("Relu", ["m"], ["y2"])], ["y", "z", "y2"], {"w": w})),
    }


def main() -> None:
    from aimet_onnx.quantsim import QuantizationSimModel

    HERE.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    batches = np.stack([rng.normal(0, 1, (1, 2, 4, 4)).astype(np.float32) * s for s in (1, 3, 0.5)])
    np.save(HERE / "ties_batches.npy", batches)
    result = {}
    for case, (config, model) in cases().items():
        onnx.save(model, HERE / f"{case}.onnx")
        sim = QuantizationSimModel(onnx.load(HERE / f"{case}.onnx"), param_type="int8", activation_type="int8",
                                   quant_scheme="min_max", config_file=str(CONFIGS / f"{config}.json"))
        sim.compute_encodings([{"x": b} for b in batches])
        quantizers = sim.qc_quantize_op_dict
        first: dict[int, str] = {}
        entries = {}
        for name in sim.activation_names:
            q = quantizers[name]
            if not q.enabled:
                continue
            first.setdefault(id(q), name)
            encoding = q.get_encodings()[0]
            entries[name] = {"group": first[id(q)], "min": float(encoding.min), "max": float(encoding.max)}
        result[case] = {"config": config, "activations": entries}
        print(case, entries, flush=True)
    (HERE / "ties.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
