"""The residual-stream rule (issue 9's MiniLM target): the validator's structural "residual-stream" finding
(refquant.validate.residual_streams) and QuantSim's default 16-bit quantizers on those tensors.

A hand-built post-LN transformer layer with an attention mask: the rule fires on exactly the tensors from each
residual branch's last MatMul to the LayerNorm's input, changes no FP32 output, cuts the W8A8 error when one
channel of the residual stream is 200x the others, is switchable off, and never fires on the AIMET samples
(conv net, MLP, MTCNN R-Net), whose QuantSim results test_quantsim compares with AIMET's byte for byte. The
MiniLM figure itself is tested in test_prepare (test_minilm_w8a8_...)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

import refquant
from refquant.cli import main
from refquant.prepare import residual_activations
from refquant.quant import QuantSim
from refquant.validate import residual_streams, validate

from .helpers import FLOAT, INT64, SAMPLE_MODELS, load_sample, make_model, needs_samples, sample_inputs

D, T = 16, 8  # model width, tokens


def encoder_layer(outlier: float = 0.0, seed: int = 3):
    """One BERT layer: masked single-head attention, output projection + bias + residual + LayerNorm, FFN
    (MatMul + bias, Relu, MatMul + bias) + residual + LayerNorm. The mask is (1 - mask) * -1e9 added to the
    scores. ``outlier``: the attention output bias of channel 3, a residual-stream channel that large at
    every token, which the first LayerNorm divides out as BERT's do: its weight there is small, and the
    other channels' weight and bias undo the per-token scale and shift the outlier causes (so the
    LayerNorm's output is the other channels of the sum, at their normal size)."""
    rng = np.random.default_rng(seed)  # the same weights whatever the tests' order

    def w(*shape, scale=None):
        scale = 1 / np.sqrt(shape[0]) if scale is None else scale
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    bias_o = w(D, scale=0.1)
    gamma, beta = np.ones(D, np.float32), np.zeros(D, np.float32)
    if outlier:
        bias_o[3] = outlier
        # per token the sum has mean ~outlier / D and standard deviation ~outlier * sqrt(D - 1) / D
        gamma[:], gamma[3] = outlier * np.sqrt(D - 1) / D, 0.01
        beta[:], beta[3] = outlier / D, 0.0
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"], name="q"),
             helper.make_node("MatMul", ["x", "wk"], ["k"], name="k"),
             helper.make_node("MatMul", ["x", "wv"], ["v"], name="v"),
             helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["s"], name="scores"),
             helper.make_node("Div", ["s", "sqrt_d"], ["sd"], name="scale"),
             helper.make_node("Cast", ["mask"], ["mf"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Sub", ["one", "mf"], ["inv"], name="inv"),
             helper.make_node("Mul", ["inv", "big"], ["mb"], name="mask_bias"),
             helper.make_node("Unsqueeze", ["mb", "axis1"], ["mb3"], name="unsqueeze"),
             helper.make_node("Add", ["sd", "mb3"], ["masked"], name="masked"),
             helper.make_node("Softmax", ["masked"], ["p"], name="softmax", axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["a"], name="context"),
             helper.make_node("MatMul", ["a", "wo"], ["o"], name="out"),
             helper.make_node("Add", ["o", "bo"], ["ob"], name="out_bias"),
             helper.make_node("Add", ["ob", "x"], ["r1"], name="residual1"),
             helper.make_node("LayerNormalization", ["r1", "g1", "be1"], ["ln1"], name="ln1", axis=-1),
             helper.make_node("MatMul", ["ln1", "w1"], ["h"], name="ffn1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="ffn1_bias"),
             helper.make_node("Relu", ["hb"], ["g"], name="relu"),
             helper.make_node("MatMul", ["g", "w2"], ["f"], name="ffn2"),
             helper.make_node("Add", ["f", "b2"], ["fb"], name="ffn2_bias"),
             helper.make_node("Add", ["fb", "ln1"], ["r2"], name="residual2"),
             helper.make_node("LayerNormalization", ["r2", "g2", "be2"], ["y"], name="ln2", axis=-1)]
    inits = {"wq": w(D, D), "wk": w(D, D), "wv": w(D, D), "wo": w(D, D), "bo": bias_o,
             "sqrt_d": np.float32(np.sqrt(D)), "one": np.float32(1), "big": np.float32(-1e9),
             "axis1": np.int64([1]), "g1": gamma, "be1": beta,
             "w1": w(D, 4 * D), "b1": w(4 * D, scale=0.1), "w2": w(4 * D, D), "b2": w(D, scale=0.1),
             "g2": np.ones(D, np.float32), "be2": np.zeros(D, np.float32)}
    return make_model(nodes, [("x", FLOAT, ["n", T, D]), ("mask", INT64, ["n", T])], [("y", FLOAT, ["n", T, D])],
                      inits)


def feeds(n: int, seed: int) -> dict[str, np.ndarray]:
    r = np.random.default_rng(seed)
    mask = (np.arange(T) < r.integers(2, T + 1, size=(n, 1))).astype(np.int64)  # ones, then padding
    return {"x": r.standard_normal((n, T, D)).astype(np.float32), "mask": mask}


# the branches' last MatMul, their bias (a constant, 8-bit per tensor like an activation) and bias Add, the sums
RESIDUAL = ["o", "bo", "ob", "r1", "f", "b2", "fb", "r2"]


def test_the_validator_finds_each_residual_sum_a_layernorm_reads_and_the_branch_up_to_its_matmul():
    graph = refquant.load(encoder_layer())
    streams = residual_streams(graph)
    # r1 = ob + x: x is the graph input (no producer, nothing to widen); r2 = fb + ln1: a LayerNorm output
    # is normalized, the walk stops there
    assert [(s.input, s.tensors) for s in streams] == [("r1", RESIDUAL[:4]), ("r2", RESIDUAL[4:])]
    assert "LayerNormalization 'ln1'" in streams[0].norm
    findings = validate(graph).by_code("residual-stream")
    assert [f.tensors for f in findings] == [RESIDUAL[:4], RESIDUAL[4:]]
    assert [f.nodes for f in findings] == [["residual1"], ["residual2"]]
    finding = findings[0]
    assert finding.severity == "info" and finding.fixed_by is None  # no prepare pass: QuantSim's rule
    assert "QuantSim does this by default" in finding.fix and "residual_rule=False" in finding.fix
    assert "256 / r" in finding.why
    # the attention scores + mask Add is no residual sum: nothing on the attention side is listed
    assert not {"s", "sd", "masked", "p", "a", "q", "k", "v", "h", "hb", "g"} & set(residual_activations(graph))


def test_the_decomposed_layernorm_of_older_exports_is_recognised():
    """Opset < 17 exports write LayerNorm as x - ReduceMean(x), ... : the mean-centering marks it."""
    rng = np.random.default_rng(0)

    def w(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    nodes = [helper.make_node("MatMul", ["x", "wd"], ["d"], name="dense"),
             helper.make_node("Add", ["bd", "d"], ["db"], name="dense_bias"),  # bias first, as torch exports
             helper.make_node("Reshape", ["db", "shape"], ["dr"], name="reshape"),
             helper.make_node("Mul", ["dr", "layer_scale"], ["ds"], name="layer_scale"),
             helper.make_node("Add", ["x", "ds"], ["r"], name="residual"),
             helper.make_node("ReduceMean", ["r"], ["m"], name="mean", axes=[-1]),
             helper.make_node("Sub", ["r", "m"], ["c"], name="center"),
             helper.make_node("Mul", ["c", "c"], ["y"], name="square")]
    model = make_model(nodes, [("x", FLOAT, [2, D])], [("y", FLOAT, [2, D])],
                       {"wd": w(D, D), "bd": w(D), "shape": np.int64([2, D]), "layer_scale": w(D)})
    (stream,) = residual_streams(refquant.load(model))
    assert stream.input == "r" and "ReduceMean 'mean' -> Sub 'center'" in stream.norm
    # the Reshape output has no quantizer of its own: not listed; bias and layer scale are
    assert stream.tensors == ["d", "bd", "db", "layer_scale", "ds", "r"]


def test_quantsim_gives_the_residual_stream_16_bits_by_default_and_changes_no_fp32_output():
    model = encoder_layer()
    sim = QuantSim(refquant.load(model), precision="w8a8")
    assert sorted(sim.widened) == sorted(RESIDUAL)
    assert all(why.startswith("residual-stream: ") for why in sim.widened.values())
    bits = {n: q.bitwidth for n, q in sim.activation_quantizers().items() if q.enabled}
    assert {n for n, b in bits.items() if b == 16} == set(RESIDUAL) and set(bits.values()) == {8, 16}
    # the rule rewrites nothing: the simulated graph is the prepared graph with or without it, and its FP32
    # outputs are the model's (the mask clamp keeps them within prepare's 1e-5 relative check)
    off = QuantSim(refquant.load(model), precision="w8a8", residual_rule=False)
    assert off.widened == {} and all(q.bitwidth == 8 for q in off.activation_quantizers().values())
    assert [(n.op_type, n.inputs, n.outputs) for n in sim.graph.nodes] == \
        [(n.op_type, n.inputs, n.outputs) for n in off.graph.nodes]
    assert all(np.array_equal(sim.graph.initializers[k], v) for k, v in off.graph.initializers.items())
    x = feeds(4, seed=5)
    expected = refquant.Session(refquant.load(model)).run(x)["y"]
    np.testing.assert_array_equal(sim.run_float(x)["y"], off.run_float(x)["y"])
    got = sim.run_float(x)["y"]
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    # switched off three ways: residual_rule=False (above), outlier_bw=None, no preparation (AIMET's QuantSim)
    assert QuantSim(refquant.load(model), precision="w8a8", outlier_bw=None).widened == {}
    assert QuantSim(refquant.load(model), precision="w8a8", prepare=False).widened == {}
    assert QuantSim(refquant.load(model), precision="w8a16").widened == {}  # already 16 bits: nothing to widen


def test_the_rule_recovers_a_residual_stream_with_a_200x_channel():
    """Channel 3 of the attention output is 200 at every token, the others ~1 (MiniLM's first FFN output:
    channel 99 at 200 vs a median channel of 0.98). The 8-bit grid of o, ob and r1 then has a step of ~0.8,
    the size of the other channels' values: the first LayerNorm's output (their values at normal size)
    carries an error of the order of its signal. At 16 bits those steps are 256x finer and what remains is
    the error of the 8-bit tensors sized for normal data, as in the same layer without the outlier. The
    bounds: without the rule, the output's mean squared error is > 10x the outlier-free layer's; with it,
    < 4x (a factor 256 finer grid on three tensors leaves the other tensors' error, which the outlier-free
    layer has too)."""
    calib, evaluation = feeds(32, seed=1), feeds(32, seed=2)
    errors = {}
    for outlier in (0.0, 200.0):
        model = encoder_layer(outlier=outlier)
        expected = refquant.Session(refquant.load(model)).run(evaluation)["y"].astype(np.float64)
        for rule in (True, False):
            sim = QuantSim(refquant.load(model), precision="w8a8", residual_rule=rule)
            sim.compute_encodings(calib, progress=False)
            assert sim.encoding_of("r1").bitwidth == (16 if rule else 8)
            errors[outlier, rule] = float(np.mean((sim.run(evaluation)["y"] - expected) ** 2))
    plain = errors[0.0, False]  # W8A8 throughout, no outlier
    assert errors[200.0, False] > 10 * plain and errors[200.0, True] < 4 * plain


@needs_samples
@pytest.mark.parametrize("entry", sorted(SAMPLE_MODELS))
def test_the_rule_never_fires_on_the_aimet_samples(entry):
    graph = load_sample(entry)
    assert residual_streams(graph) == []
    sim = QuantSim(graph, precision="w8a8")
    assert sim.widened == {} and all(q.bitwidth == 8 for q in sim.activation_quantizers().values())
    calib = sample_inputs(entry, "calib")
    report = validate(graph, data={"input": calib[:16]}, max_batches=2)
    assert not report.by_code("residual-stream")
    # what `refquant quantize --data calib` builds: the outlier rule on the calibration data widens nothing
    # either (the convnet's quantized activations span at most 15x the median channel's range, under the
    # 32x outlier-channel threshold; its Conv outputs, where the outlier-dominated check would fire on the
    # unfolded model, are inside Conv+Relu supergroups once BN is folded)
    batches = [{"input": calib[i:i + 8]} for i in range(0, len(calib), 8)]
    assert QuantSim(graph, precision="w8a8", prepare_data=batches).widened == {}


def test_quantize_command_lists_the_widened_activations_and_calibrates_them_at_16_bits(tmp_path, capsys):
    import json

    model = tmp_path / "layer.onnx"
    model.write_bytes(encoder_layer().SerializeToString())
    np.savez(tmp_path / "calib.npz", **feeds(16, seed=1))
    assert main(["quantize", str(model), "--data", str(tmp_path / "calib.npz"), "-o", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "8 activation(s) at 16 bits" in out
    assert all(f"  {name}: residual-stream" in out for name in RESIDUAL)
    listed = json.loads((tmp_path / "out" / "layer.encodings").read_text())["activation_encodings"]
    bits = {e["name"]: e["bw"] for e in listed}  # AIMET 1.0.0 format
    assert bits["r1"] == bits["fb"] == 16 and bits["h"] == bits["ln1"] == 8
