"""aimet-onnx 2.42.0's placement on decomposed normalizations under the htp_v73 config (tests/test_norm_fusion.py).

Run with the Python that has aimet-onnx (it needs PyTorch, which refquant does not), from the repository root:

    /tmp/aimet-venv/bin/python golden/aimet/make_norm_fusion_golden.py

The htp configs name "LayerNormalization" and "RMSNormalization" in their supergroup_pass_list: AIMET fuses those
decompositions into single nodes before placing quantizers. Each case below is a small model built with
onnx.helper (x: [2, 4, 8], normalized over the last axis) that probes one of its rules: the LayerNorm forms at
opset 13 (axes attribute) and 18 (axes input), a centering mean read outside the pattern, LLM-style RMSNorms
(Pow(-0.5), Reciprocal, 1 / Sqrt, the scale first), the Cast rules, a LayerNorm without a scale, and a bias Add
followed by Relu (the Add + Relu supergroup). (An RMSNorm whose eps is not a constant makes aimet-onnx 2.42.0 raise
a TypeError in its fusion check, so it has no case: ``rms_norm("div", eps_input=True)`` reproduces it; refquant leaves
it unfused.)

Written to golden/aimet/norm_fusion/: ``<case>.onnx``, the two config copies of ``RUNS`` and ``placement.json``: for
each case and run (config, parameter and activation type; min_max), AIMET's enabled activation quantizers, enabled
parameter quantizers, each enabled parameter quantizer's bitwidth and symmetry, and the enabled symmetric
activation quantizers (no calibration: placement only).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent / "norm_fusion"
CONFIG = Path(__file__).resolve().parent / "parity" / "configs" / "htp_quantsim_config_v73.json"
SHAPE = [2, 4, 8]


def _model(name: str, nodes, initializers: dict, opset: int, outputs=("y",), inputs=("x",)) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info(i, TensorProto.FLOAT, SHAPE if i == "x" else [1])
                      for i in inputs],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, SHAPE if o == "y" else SHAPE[:-1] + [1])
         for o in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset < 19 else 9
    onnx.checker.check_model(model)
    return model


def _mean(src: str, dst: str, opset: int, name: str):
    """ReduceMean over the last axis, keepdims: the axes an attribute before opset 18, an input from it."""
    if opset >= 18:
        return helper.make_node("ReduceMean", [src, "axes"], [dst], keepdims=1, name=name)
    return helper.make_node("ReduceMean", [src], [dst], axes=[-1], keepdims=1, name=name)


def layer_norm(opset: int, *, scale=True, bias=True, relu=False, mean_out=False) -> onnx.ModelProto:
    rng = np.random.default_rng(opset)
    n = helper.make_node
    nodes = [_mean("x", "mean", opset, "mean"), n("Sub", ["x", "mean"], ["centered"], name="sub"),
             n("Pow", ["centered", "two"], ["squared"], name="pow"), _mean("squared", "var", opset, "var"),
             n("Add", ["var", "eps"], ["var_eps"], name="add_eps"), n("Sqrt", ["var_eps"], ["std"], name="sqrt"),
             n("Div", ["centered", "std"], ["normalized"], name="div")]
    init = {"two": np.float32(2), "eps": np.float32(1e-5)}
    if opset >= 18:
        init["axes"] = np.int64([-1])
    last = "normalized"
    if scale:
        nodes.append(n("Mul", ["normalized", "gamma"], ["scaled"], name="mul_gamma"))
        init["gamma"] = rng.uniform(0.5, 1.5, 8).astype(np.float32)
        last = "scaled"
    if bias:
        nodes.append(n("Add", ["beta", last] if opset == 13 else [last, "beta"], ["shifted"], name="add_beta"))
        init["beta"] = rng.uniform(-0.5, 0.5, 8).astype(np.float32)
        last = "shifted"
    nodes.append(n("Relu" if relu else "Identity", [last], ["y"], name="after"))
    outputs = ("y", "mean") if mean_out else ("y",)
    return _model("layer_norm", nodes, init, opset, outputs)


def rms_norm(form: str, opset: int = 17, *, cast_inside=False, cast_before=False, eps_input=False,
             scale_first=False) -> onnx.ModelProto:
    """x * Pow(mean(x * x) + eps, -0.5) ("pow"), x * Reciprocal(Sqrt(.)) ("reciprocal"), x * (1 / Sqrt(.))
    ("one_over"), x / Sqrt(.) ("div"); times a scale."""
    n = helper.make_node
    nodes, init = [], {"eps": np.float32(1e-6), "gamma": np.linspace(0.5, 1.5, 8).astype(np.float32)}
    x = "x"
    if cast_before:
        nodes.append(n("Cast", ["x"], ["x_cast"], to=TensorProto.FLOAT, name="cast_in"))
        x = "x_cast"
    nodes += [n("Mul", [x, x], ["squared"], name="square"), _mean("squared", "ms", opset, "ms"),
              n("Add", ["ms", "eps_in" if eps_input else "eps"], ["ms_eps"], name="add_eps")]
    if opset >= 18:
        init["axes"] = np.int64([-1])
    if form == "pow":
        init["minus_half"] = np.float32(-0.5)
        nodes += [n("Pow", ["ms_eps", "minus_half"], ["inv"], name="rsqrt"),
                  n("Mul", [x, "inv"], ["normed"], name="norm")]
    elif form == "reciprocal":
        nodes += [n("Sqrt", ["ms_eps"], ["rms"], name="sqrt"), n("Reciprocal", ["rms"], ["inv"], name="recip"),
                  n("Mul", ["inv", x], ["normed"], name="norm")]
    elif form == "one_over":
        init["one"] = np.float32(1)
        nodes += [n("Sqrt", ["ms_eps"], ["rms"], name="sqrt"), n("Div", ["one", "rms"], ["inv"], name="recip"),
                  n("Mul", [x, "inv"], ["normed"], name="norm")]
    else:
        nodes += [n("Sqrt", ["ms_eps"], ["rms"], name="sqrt"), n("Div", [x, "rms"], ["normed"], name="norm")]
    normed = "normed"
    if cast_inside:
        nodes.append(n("Cast", ["normed"], ["normed_cast"], to=TensorProto.FLOAT, name="cast_mid"))
        normed = "normed_cast"
    nodes.append(n("Mul", ["gamma", normed] if scale_first else [normed, "gamma"], ["y"], name="mul_gamma"))
    return _model("rms_norm", nodes, init, opset, inputs=("x", "eps_in") if eps_input else ("x",))


CASES = {
    "ln_opset13": lambda: layer_norm(13),
    "ln_opset17_relu": lambda: layer_norm(17, relu=True),
    "ln_opset18": lambda: layer_norm(18),
    "ln_no_bias": lambda: layer_norm(13, bias=False),
    "ln_no_scale": lambda: layer_norm(13, scale=False, bias=False),
    "ln_mean_read_outside": lambda: layer_norm(13, mean_out=True),
    "rms_pow": lambda: rms_norm("pow"),
    "rms_pow_opset18": lambda: rms_norm("pow", 18),
    "rms_reciprocal_scale_first": lambda: rms_norm("reciprocal", scale_first=True),
    "rms_one_over": lambda: rms_norm("one_over"),
    "rms_div": lambda: rms_norm("div"),
    "rms_cast_inside": lambda: rms_norm("pow", cast_inside=True),
    "rms_cast_before_and_inside": lambda: rms_norm("pow", cast_inside=True, cast_before=True),
}
# (config, param_type, activation_type): the htp_v73 file itself, and copies naming only one of the two passes (then
# the other's decompositions reach AIMET's graph passes unfused)
RUNS = [("htp_v73", "int8", "int8"), ("htp_v73", "int16", "int8"), ("ln_pass_only", "int8", "int8"),
        ("ln_pass_only", "int8", "int16"), ("rms_pass_only", "int8", "int8")]
PASSES = {"htp_v73": None, "ln_pass_only": ["LayerNormalization"], "rms_pass_only": ["RMSNormalization"]}


def config_file(name: str) -> Path:
    """The htp_v73 config, or a copy (in norm_fusion/) whose supergroup_pass_list is PASSES[name]."""
    if PASSES[name] is None:
        return CONFIG
    config = json.loads(CONFIG.read_text())
    config["supergroup_pass_list"] = PASSES[name]
    path = HERE / f"{name}.json"
    path.write_text(json.dumps(config, indent=1) + "\n")
    return path


def main() -> None:
    from aimet_onnx.quantsim import QuantizationSimModel

    HERE.mkdir(parents=True, exist_ok=True)
    placement = {}
    for case, build in CASES.items():
        model = build()
        onnx.save(model, HERE / f"{case}.onnx")
        for config, param_type, act_type in RUNS:
            sim = QuantizationSimModel(onnx.load(HERE / f"{case}.onnx"), param_type=param_type,
                                       activation_type=act_type, quant_scheme="min_max",
                                       config_file=str(config_file(config)))
            quantizers = sim.qc_quantize_op_dict
            params = [p for p in sim.param_names if quantizers[p].enabled]
            key = f"{case}/{config}/{param_type}/{act_type}"
            placement[key] = {
                "act_enabled": sorted(a for a in sim.activation_names if quantizers[a].enabled),
                "param_enabled": sorted(params),
                "param_settings": {p: [quantizers[p].bitwidth, bool(quantizers[p].use_symmetric_encodings)]
                                   for p in params},
                "symmetric_activations": sorted(a for a in sim.activation_names
                                                if quantizers[a].enabled and quantizers[a].use_symmetric_encodings),
            }
            print(key, placement[key], flush=True)
    (HERE / "placement.json").write_text(json.dumps(placement, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
