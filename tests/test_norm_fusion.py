"""Decomposed LayerNormalization / RMSNormalization as one op (refquant.quant.norm_fusion), against aimet-onnx itself.

Golden: golden/aimet/norm_fusion/placement.json, made by golden/aimet/make_norm_fusion_golden.py with aimet-onnx
2.42.0 on fourteen small models (its docstring lists what each probes: opset 13 and 18 LayerNorms, a mean read
outside the pattern, LLM-style RMSNorms, the Cast rules, a missing scale or bias, a bias Add before a Relu) under
five runs: AIMET's htp_v73 config file at int8 and int16 parameters, and copies of it naming only one of the two
passes (the other's decompositions then reach AIMET's graph passes unfused), at int8 and int16 activations. For
each, refquant places exactly AIMET's enabled quantizers, parameter bitwidths and symmetry and symmetric
activations. The simulation of a fused LayerNorm is held to its formula computed in NumPy.
"""

import json
from pathlib import Path

import numpy as np
import pytest

import refquant
from refquant.quant import QuantSim
from refquant.quant.norm_fusion import fused_norms

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "aimet" / "norm_fusion"
HTP = GOLDEN.parent / "parity" / "configs" / "htp_quantsim_config_v73.json"
PLACEMENT = json.loads((GOLDEN / "placement.json").read_text())
F32 = np.float32


def htp_sim(case: str, config: str = "htp_v73", param_bw: int = 8, output_bw: int = 8, **options) -> QuantSim:
    """As the golden script gives the model to AIMET: as built, AIMET's placement rules (parity settings)."""
    path = HTP if config == "htp_v73" else GOLDEN / f"{config}.json"
    return QuantSim(refquant.load(GOLDEN / f"{case}.onnx"), param_bw=param_bw, output_bw=output_bw,
                    config=str(path), prepare=False, residual_rule=False, constant_inputs="aimet", **options)


@pytest.mark.parametrize("key", sorted(PLACEMENT))
def test_placement_is_aimets(key):
    case, config, param_type, act_type = key.split("/")
    want = PLACEMENT[key]
    sim = htp_sim(case, config, int(param_type[3:]), int(act_type[3:]))
    quantizers = sim.quantizers
    assert sorted(n for n, q in quantizers.items() if q.kind != "param" and q.enabled) == want["act_enabled"]
    assert sorted(n for n, q in quantizers.items() if q.kind == "param" and q.enabled) == want["param_enabled"]
    for name, (bitwidth, symmetric) in want["param_settings"].items():
        assert (quantizers[name].bitwidth, bool(quantizers[name].symmetric)) == (bitwidth, symmetric), name
    assert sorted(n for n, q in quantizers.items()
                  if q.kind != "param" and q.enabled and q.symmetric) == want["symmetric_activations"]


def test_groups_found():
    """What the placement rests on, stated per case: the fused op, its input, output, scale and bias."""
    def groups(case, passes=("LayerNormalization", "RMSNormalization")):
        graph = refquant.load(GOLDEN / f"{case}.onnx")
        return [(g.op_type, g.input, g.output, g.scale, g.bias) for g in fused_norms(graph, passes)]

    assert groups("ln_opset13") == [("LayerNormalization", "x", "shifted", "gamma", "beta")]
    # opset 18: the centering mean's axes are an input, which AIMET's LayerNorm pattern does not take; the rest of
    # it is an RMSNormalization of x - mean(x)
    assert groups("ln_opset18") == [("RMSNormalization", "centered", "scaled", "gamma", None)]
    assert groups("ln_opset18", ["LayerNormalization"]) == []
    assert groups("ln_no_scale") == [("RMSNormalization", "centered", "normalized", None, None)]
    assert groups("ln_mean_read_outside") == [("RMSNormalization", "centered", "scaled", "gamma", None)]
    assert groups("rms_reciprocal_scale_first") == [("RMSNormalization", "x", "y", "gamma", None)]
    # a Cast between the normalization and its scale fuses only when x itself comes from a Cast
    assert groups("rms_cast_inside") == [("RMSNormalization", "x", "normed", None, None)]
    assert groups("rms_cast_before_and_inside") == [("RMSNormalization", "x_cast", "y", "gamma", None)]
    assert groups("ln_opset13", ["MatmulAdd"]) == []


def test_fused_layer_norm_simulates_its_formula():
    """x quantized, then (x - m) / sqrt(v + eps) * gamma_q + beta in float (no quantizer inside the group; gamma on
    its 8-bit parameter grid, beta float as the config leaves biases), then the output quantizer: the same float32
    operations in the same order as the decomposition, so the result is bit-exact."""
    rng = np.random.default_rng(0)
    calib = (rng.standard_normal((16, 4, 8)) * 3 + 1).astype(F32)
    sim = htp_sim("ln_opset13")
    sim.compute_encodings([calib[i:i + 2] for i in range(0, 16, 2)], progress=False)  # the model's batch is 2
    x = (rng.standard_normal((2, 4, 8)) * 3 + 1).astype(F32)
    graph = sim.graph

    def qdq(values, name):
        encoding = sim.encoding_of(name)
        scale, offset = F32(np.ravel(encoding.scale)[0]), F32(np.ravel(encoding.offset)[0])
        return (np.clip(np.rint(values / scale), offset, offset + encoding.steps) * scale).astype(F32)

    xq = qdq(x, "x")
    mean = np.mean(xq, axis=-1, keepdims=True, dtype=F32)
    centered = xq - mean
    variance = np.mean(centered ** F32(2), axis=-1, keepdims=True, dtype=F32)
    normalized = centered / np.sqrt(variance + graph.initializers["eps"])
    shifted = graph.initializers["beta"] + normalized * qdq(graph.initializers["gamma"], "gamma")
    assert sim.encoding_of("gamma").bitwidth == 8 and not sim.encoding_of("gamma").symmetric
    assert not sim.quantizers["beta"].enabled
    expected = qdq(shifted.astype(F32), "shifted")
    assert np.array_equal(sim.run({"x": x})["y"], expected)
