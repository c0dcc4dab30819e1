"""Bias correction (Nagel et al. 2019, section 4.2): hand-computed cases, the analytical E[relu(BN)],
and the AIMET sample models with coarse weight quantization.

Note: ``sim.set_parameter`` moves the bias of ``sim``'s FP32 reference too, so "the error of the
corrected model" is measured against a Session on a copy of the graph made before the correction.
"""

import os
from pathlib import Path

import numpy as np
import pytest
from onnx import helper
from scipy.stats import norm

import refquant
from refquant.errors import FeedError, RefquantError
from refquant.ptq.bias_correction import (analytical_input_mean, bias_correction, expected_relu_of_gaussian,
                                          find_layers)
from refquant.quant import QuantSim

from .helpers import FLOAT, make_model

SHARED = Path(os.environ.get("REFQUANT_SHARED", "/work/shared"))
SAMPLES = SHARED / "refs" / "aimet_samples"
needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"AIMET samples not found at {SAMPLES}")


def disable_activation_quantizers(sim):
    """Leave only the weight quantizers: the layer output is then exactly W_q x + b."""
    for quantizer in sim.quantizers.values():
        if quantizer.kind != "param":
            quantizer.disable()


def channel_means(y, axis):
    y = np.moveaxis(np.asarray(y, dtype=np.float64), axis, 0)
    return y.reshape(y.shape[0], -1).mean(axis=1)


def gemm_graph(w, b, trans_b=1, alpha=1.0, beta=1.0):
    k = w.shape[1] if trans_b else w.shape[0]
    n = len(b)
    node = helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=trans_b, alpha=alpha, beta=beta)
    return refquant.load(make_model([node], [("x", FLOAT, ["N", k])], [("y", FLOAT, ["N", n])], {"W": w, "B": b}))


# --------------------------------------------------------------------------------- hand-computed
@pytest.mark.parametrize("trans_b, alpha, beta", [(1, 1.0, 1.0), (0, 0.5, 2.0)])
def test_gemm_bias_is_corrected_by_the_weight_error_times_the_input_mean(trans_b, alpha, beta):
    rng = np.random.default_rng(0)
    w_out = rng.uniform(-1, 1, (5, 8)).astype(np.float32)  # [N, K]
    w = w_out if trans_b else np.ascontiguousarray(w_out.T)
    b = rng.normal(size=5).astype(np.float32)
    sim = QuantSim(gemm_graph(w, b, trans_b, alpha, beta), precision="w4a8")
    means = np.linspace(-2, 3, 8)  # inputs with a clearly non-zero, known mean per feature
    batches = [(means + rng.normal(size=(16, 8))).astype(np.float32) for _ in range(4)]
    sim.compute_encodings(batches, progress=False)
    disable_activation_quantizers(sim)

    # W_q by hand: 4-bit symmetric per output channel, round half to even, codes in [-8, 7]
    scale = np.asarray(sim.encoding_of("W").scale, dtype=np.float64)
    scale = scale[:, None] if trans_b else scale[None, :]
    w_q = (np.clip(np.rint(w / scale), -8, 7) * scale).astype(np.float32)
    sim.run({"x": batches[0]})
    np.testing.assert_array_equal(sim.session.constants["W"], w_q)  # what the simulation computes with

    mean_x = np.concatenate(batches).astype(np.float64).mean(axis=0)
    dw = w_q.astype(np.float64) - w.astype(np.float64)
    shift = alpha * ((dw @ mean_x) if trans_b else (mean_x @ dw))  # E[y_q] - E[y]
    expected = (b.astype(np.float64) - shift / beta).astype(np.float32)

    fp32 = refquant.Session(sim.graph.copy())
    bias_correction(sim, batches, progress=False)
    corrected = sim.graph.initializers["B"]
    assert np.abs(shift).max() > 1e-2  # the correction is not trivially zero
    np.testing.assert_allclose(corrected, expected, rtol=0, atol=np.spacing(np.abs(expected)).max())
    # and so the corrected quantized layer has the FP32 layer's mean output on this data
    x = np.concatenate(batches)
    np.testing.assert_allclose(sim.run({"x": x})["y"].mean(axis=0, dtype=np.float64),
                               fp32.run({"x": x})["y"].mean(axis=0, dtype=np.float64), rtol=0, atol=1e-5)


def test_matmul_add_bias_is_corrected_and_the_mean_output_matches_fp32():
    rng = np.random.default_rng(7)
    w, b = rng.uniform(-1, 1, (8, 5)).astype(np.float32), rng.normal(size=5).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["m", "B"], ["y"])]
    graph = refquant.load(make_model(nodes, [("x", FLOAT, ["N", 3, 8])], [("y", FLOAT, ["N", 3, 5])],
                                     {"W": w, "B": b}))
    batches = [(rng.normal(size=(16, 3, 8)) + 1.0).astype(np.float32) for _ in range(3)]
    sim = QuantSim(graph, precision="w4a8")
    sim.compute_encodings(batches, progress=False)
    disable_activation_quantizers(sim)  # the Add's constant too: it is quantized like an activation
    (layer,), _ = find_layers(sim)
    assert (layer.bias, layer.channel_axis) == ("B", -1)
    fp32 = refquant.Session(graph.copy())
    x = np.concatenate(batches)
    before = channel_means(sim.run({"x": x})["y"], -1) - channel_means(fp32.run({"x": x})["y"], -1)
    bias_correction(sim, batches, progress=True)  # the progress bar path too
    after = channel_means(sim.run({"x": x})["y"], -1) - channel_means(fp32.run({"x": x})["y"], -1)
    assert np.abs(before).max() > 1e-2
    np.testing.assert_allclose(after, 0, atol=1e-5)


@pytest.mark.parametrize("op, attrs, w_shape", [
    ("Conv", dict(pads=[1, 1, 1, 1], strides=[2, 2], group=2), (6, 2, 3, 3)),
    ("Conv", dict(pads=[1, 1, 1, 1], group=4), (4, 1, 3, 3)),  # depthwise
    ("ConvTranspose", dict(pads=[1, 1, 1, 1], strides=[2, 2]), (4, 3, 3, 3)),
])
def test_conv_mean_output_equals_fp32_after_correction_padding_included(op, attrs, w_shape):
    """Padding makes E[y_q] - E[y] differ between border and interior pixels: the empirical mode
    uses the layer's own kernel, so the corrected mean is exact, borders included."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=w_shape).astype(np.float32)
    out_channels = w_shape[0] if op == "Conv" else w_shape[1]
    b = rng.normal(size=out_channels).astype(np.float32)
    node = helper.make_node(op, ["x", "W", "B"], ["y"], **attrs)
    graph = refquant.load(make_model([node], [("x", FLOAT, ["N", 4, 9, 9])], [("y", FLOAT, None)],
                                     {"W": w, "B": b}))
    batches = [(rng.normal(size=(8, 4, 9, 9)) + 1.5).astype(np.float32) for _ in range(3)]
    sim = QuantSim(graph, precision="w4a8")
    sim.compute_encodings(batches, progress=False)
    disable_activation_quantizers(sim)
    fp32 = refquant.Session(graph.copy())
    x = np.concatenate(batches)
    before = channel_means(sim.run({"x": x})["y"], 1) - channel_means(fp32.run({"x": x})["y"], 1)
    bias_correction(sim, batches, progress=False, batch_size=5)
    after = channel_means(sim.run({"x": x})["y"], 1) - channel_means(fp32.run({"x": x})["y"], 1)
    assert np.abs(before).max() > 1e-2
    np.testing.assert_allclose(after, 0, atol=1e-5)


# --------------------------------------------------------------------------------- analytical
def bn_relu_conv_graph(gamma, beta, mean, var, w, b, relu=True):
    nodes = [helper.make_node("BatchNormalization", ["x", "g", "be", "m", "v"], ["bn"], epsilon=1e-5)]
    if relu:
        nodes.append(helper.make_node("Relu", ["bn"], ["r"]))
    nodes.append(helper.make_node("Conv", ["r" if relu else "bn", "W", "B"], ["y"], pads=[1, 1, 1, 1]))
    c = len(gamma)
    return refquant.load(make_model(nodes, [("x", FLOAT, ["N", c, 8, 8])], [("y", FLOAT, None)],
                                    {"g": gamma, "be": beta, "m": mean, "v": var, "W": w, "B": b}))


BN = dict(gamma=np.array([1.0, 0.5, 2.0, 0.3], np.float32), beta=np.array([0.5, -1.0, 0.0, 2.0], np.float32),
          mean=np.array([3.0, -1.0, 0.5, 0.0], np.float32), var=np.array([4.0, 0.25, 1.0, 2.0], np.float32))


def test_expected_relu_of_gaussian_is_the_textbook_formula():
    mu, sigma = np.array([-2.0, 0.0, 0.7, 3.0]), np.array([1.0, 2.0, 0.5, 0.1])
    z = -mu / sigma
    np.testing.assert_allclose(expected_relu_of_gaussian(mu, sigma),
                               mu * (1 - norm.cdf(z)) + sigma * norm.pdf(z), rtol=1e-12)
    np.testing.assert_array_equal(expected_relu_of_gaussian([-1.0, 2.0], [0.0, 0.0]), [0.0, 2.0])


def test_analytical_input_mean_matches_the_sampled_mean_of_relu_bn():
    """x ~ N(mean, var) per channel, so BN(x) ~ N(beta, gamma^2 var / (var + eps)), eps/var <= 4e-5.
    The sampled mean of relu(BN(x)) over n = 200*8*8 values per channel must lie within 5 standard
    errors (std(relu(BN(x))) / sqrt(n)) of the analytical value."""
    rng = np.random.default_rng(2)
    w = rng.normal(size=(3, 4, 3, 3)).astype(np.float32)
    graph = bn_relu_conv_graph(**BN, w=w, b=np.zeros(3, np.float32))
    x = (BN["mean"][None, :, None, None] + np.sqrt(BN["var"])[None, :, None, None]
         * rng.normal(size=(200, 4, 8, 8))).astype(np.float32)
    relu = refquant.Session(graph).run({"x": x}, outputs=["r"])["r"].astype(np.float64)
    sampled = relu.mean(axis=(0, 2, 3))
    stderr = relu.std(axis=(0, 2, 3)) / np.sqrt(relu[:, 0].size)
    sim = QuantSim(graph, precision="w4a8")
    (layer,), _ = find_layers_after_calibration(sim, x[:32])
    analytical = analytical_input_mean(graph, layer)
    assert np.all(np.abs(analytical - sampled) < 5 * stderr), (analytical, sampled, stderr)
    # and without the Relu, E[x] is beta
    graph = bn_relu_conv_graph(**BN, w=w, b=np.zeros(3, np.float32), relu=False)
    sim = QuantSim(graph, precision="w4a8")
    (layer,), _ = find_layers_after_calibration(sim, x[:32])
    np.testing.assert_array_equal(analytical_input_mean(graph, layer), BN["beta"])


def find_layers_after_calibration(sim, x):
    sim.compute_encodings([x], progress=False)
    return find_layers(sim)


def test_analytical_correction_is_the_formula_without_data():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(3, 4, 3, 3)).astype(np.float32)
    b = rng.normal(size=3).astype(np.float32)
    graph = bn_relu_conv_graph(**BN, w=w, b=b)
    sim = QuantSim(graph, precision="w4a8")
    sim.compute_encodings([rng.normal(size=(8, 4, 8, 8)).astype(np.float32)], progress=False)
    sim.run({"x": np.zeros((1, 4, 8, 8), np.float32)})
    dw = sim.session.constants["W"].astype(np.float64) - w.astype(np.float64)
    mu, sigma = BN["beta"].astype(np.float64), np.abs(BN["gamma"].astype(np.float64))
    mean_x = mu * (1 - norm.cdf(-mu / sigma)) + sigma * norm.pdf(-mu / sigma)
    expected = (b - np.einsum("ocij,c->o", dw, mean_x)).astype(np.float32)  # sum over taps: padding ignored
    bias_correction(sim, None, analytical=True, progress=False)
    np.testing.assert_allclose(sim.graph.initializers["B"], expected, rtol=0, atol=1e-6)


def test_analytical_correction_uses_a_batchnorm_the_quantsims_preparation_folded():
    """conv1 -> BN -> Relu -> conv2: the default QuantSim folds the BN into conv1, and conv2's input is then
    Relu(conv1(.)). Its statistics still give E[x] (the BN's record, checked to describe conv1 as folded):
    conv2's corrected bias is the formula's, with the BN's beta and gamma, as without preparation."""
    rng = np.random.default_rng(5)
    w1 = rng.normal(size=(4, 3, 1, 1)).astype(np.float32)
    w2 = rng.normal(size=(3, 4, 3, 3)).astype(np.float32)
    b2 = rng.normal(size=3).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c1"], name="conv1"),
             helper.make_node("BatchNormalization", ["c1", "g", "be", "m", "v"], ["bn"], epsilon=1e-5),
             helper.make_node("Relu", ["bn"], ["r"]),
             helper.make_node("Conv", ["r", "W2", "B2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    graph = refquant.load(make_model(nodes, [("x", FLOAT, ["N", 3, 8, 8])], [("y", FLOAT, None)],
                                     {"W1": w1, "g": BN["gamma"], "be": BN["beta"], "m": BN["mean"], "v": BN["var"],
                                      "W2": w2, "B2": b2}))
    x = rng.normal(size=(8, 3, 8, 8)).astype(np.float32)
    corrected = {}
    for prepare in (True, False):
        sim = QuantSim(graph, precision="w4a8", prepare=prepare)
        assert any(n.op_type == "BatchNormalization" for n in sim.graph.nodes) != prepare
        sim.compute_encodings([x], progress=False)
        sim.run({"x": x[:1]})
        dw = sim.session.constants["W2"].astype(np.float64) - w2.astype(np.float64)
        with pytest.warns(UserWarning, match="conv1"):  # no BN output for its input (or no bias, unprepared)
            bias_correction(sim, None, analytical=True, progress=False)
        corrected[prepare] = sim.graph.initializers["B2"]
    mu, sigma = BN["beta"].astype(np.float64), np.abs(BN["gamma"].astype(np.float64))
    mean_x = mu * (1 - norm.cdf(-mu / sigma)) + sigma * norm.pdf(-mu / sigma)
    expected = (b2 - np.einsum("ocij,c->o", dw, mean_x)).astype(np.float32)
    np.testing.assert_allclose(corrected[True], expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(corrected[True], corrected[False])


def test_analytical_mode_without_data_skips_layers_without_a_batchnorm_and_says_so():
    rng = np.random.default_rng(4)
    w, b = rng.normal(size=(5, 8)).astype(np.float32), rng.normal(size=5).astype(np.float32)
    sim = QuantSim(gemm_graph(w, b), precision="w4a8")
    sim.compute_encodings([rng.normal(size=(16, 8)).astype(np.float32)], progress=False)
    with pytest.warns(UserWarning, match="skipped: .*Gemm"):
        bias_correction(sim, None, analytical=True, progress=False)
    np.testing.assert_array_equal(sim.graph.initializers["B"], b)


# --------------------------------------------------------------------------------- AIMET samples
def sample_sim(entry, precision, config):
    model = "model_bnfolded.onnx" if entry == "convnet" else "model.onnx"
    graph = refquant.load(SAMPLES / entry / model)
    fp32 = refquant.Session(graph.copy())  # the original FP32 model, untouched by the correction
    sim = QuantSim(graph, precision=precision, config=config)
    calib = np.load(SAMPLES / entry / "calib.npz")["input"]
    sim.compute_encodings(calib, progress=False)
    return sim, fp32, calib


def mean_errors(sim, fp32, layers, x):
    """sum over channels of |E[y_sim - y_fp32]| at each layer's output, over the calibration data."""
    names = [layer.node.outputs[0] for layer in layers]
    quantized, reference = sim.run({"input": x}, outputs=names), fp32.run({"input": x}, outputs=names)
    return np.array([np.abs(channel_means(quantized[n], layer.channel_axis)
                            - channel_means(reference[n], layer.channel_axis)).sum()
                     for n, layer in zip(names, layers)])


def sqnr_db(ref, out):
    ref, out = ref.astype(np.float64), out.astype(np.float64)
    return 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - out) ** 2))


@needs_samples
@pytest.mark.parametrize("entry, precision, config", [
    ("convnet", "w4a8", "default"), ("convnet", "w4a8", "per_tensor"), ("convnet", "w8a8", "per_tensor"),
    ("mlp", "w4a8", "default"), ("mlp", "w4a8", "per_tensor"),
])
def test_bias_correction_shrinks_the_mean_error_of_every_layer(entry, precision, config):
    """Measured (calibration data, sum over channels of |mean error| per layer; logits SQNR on eval):
    convnet w4a8 per-channel: first layer 1.07e-3 -> 2.2e-4, others 4-14x smaller, SQNR 22.18 -> 35.28 dB
    convnet w4a8 per-tensor:  7.0e-3 -> 2.2e-4, SQNR 11.48 -> 21.71 dB
    convnet w8a8 per-tensor:  7.3e-4 -> 2.2e-4, SQNR 35.62 -> 42.15 dB
    mlp w4a8 per-channel:     0.444 -> 0.053, SQNR 23.15 -> 24.02 dB
    mlp w4a8 per-tensor:      0.450 -> 0.053, SQNR 22.38 -> 23.75 dB
    What remains at the first layer is the input quantizer's error, which bias correction does not target."""
    sim, fp32, calib = sample_sim(entry, precision, config)
    layers, no_bias = find_layers(sim)
    assert len(layers) == (5 if entry == "convnet" else 3) and not no_bias
    evaluation = np.load(SAMPLES / entry / "eval.npz")["input"]
    reference = fp32.run({"input": evaluation})["logits"]
    before = mean_errors(sim, fp32, layers, calib)
    sqnr_before = sqnr_db(reference, sim.run({"input": evaluation})["logits"])
    bias_correction(sim, calib, progress=False)
    after = mean_errors(sim, fp32, layers, calib)
    sqnr_after = sqnr_db(reference, sim.run({"input": evaluation})["logits"])
    assert after[0] * 2 <= before[0], (before, after)
    assert np.all(after < before), (before, after)
    assert sqnr_after > sqnr_before - 0.1, (sqnr_before, sqnr_after)


# --------------------------------------------------------------------------------- edge cases
def test_nothing_to_correct_warns_and_changes_nothing():
    rng = np.random.default_rng(5)
    node = helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)  # no bias
    graph = refquant.load(make_model([node], [("x", FLOAT, ["N", 8])], [("y", FLOAT, ["N", 5])],
                                     {"W": rng.normal(size=(5, 8)).astype(np.float32)}))
    sim = QuantSim(graph, precision="w4a8")
    data = [rng.normal(size=(16, 8)).astype(np.float32)]
    sim.compute_encodings(data, progress=False)
    before = {k: v.copy() for k, v in graph.initializers.items()}
    with pytest.warns(UserWarning) as record:
        assert bias_correction(sim, data, progress=False) is sim
    messages = [str(r.message) for r in record]
    assert any("no per-channel bias" in m for m in messages) and any("nothing to correct" in m for m in messages)
    assert all(np.array_equal(before[k], v) for k, v in graph.initializers.items())


def test_bad_data_and_missing_calibration_are_refquant_errors():
    rng = np.random.default_rng(6)
    w, b = rng.normal(size=(5, 8)).astype(np.float32), rng.normal(size=5).astype(np.float32)
    sim = QuantSim(gemm_graph(w, b), precision="w4a8")
    with pytest.raises(RefquantError, match="compute_encodings"):
        bias_correction(sim, [np.zeros((2, 8), np.float32)], progress=False)
    sim.compute_encodings([rng.normal(size=(16, 8)).astype(np.float32)], progress=False)
    bad = rng.normal(size=(16, 8)).astype(np.float32)
    bad[3, 2] = np.nan
    with pytest.raises(FeedError, match="NaN"):
        bias_correction(sim, bad, progress=False)
    with pytest.raises(FeedError, match="shape"):
        bias_correction(sim, np.zeros((16, 7), np.float32), progress=False)
    with pytest.raises(RefquantError, match="needs data"):
        bias_correction(sim, None, progress=False)
    np.testing.assert_array_equal(sim.graph.initializers["B"], b)


@needs_samples
def test_interrupt_midway_restores_every_bias():
    sim, fp32, calib = sample_sim("convnet", "w4a8", "default")
    layers, _ = find_layers(sim)
    before = {layer.bias: sim.graph.initializers[layer.bias].copy() for layer in layers}
    x = calib[:8]
    out_before, float_before = sim.run({"input": x})["logits"], sim.run_float({"input": x})["logits"]
    batches = [calib[i:i + 16] for i in range(0, len(calib), 16)]
    served = [0]

    def data():  # carry=False: a fresh pass per layer; Ctrl-C arrives during the third layer's pass
        for batch in batches:
            served[0] += 1
            if served[0] == 2 * len(batches) + 2:
                raise KeyboardInterrupt
            yield batch

    with pytest.raises(KeyboardInterrupt):
        bias_correction(sim, data, progress=False, carry=False)
    for name, array in before.items():
        np.testing.assert_array_equal(sim.graph.initializers[name], array)
    np.testing.assert_array_equal(sim.run({"input": x})["logits"], out_before)
    np.testing.assert_array_equal(sim.run_float({"input": x})["logits"], float_before)


@needs_samples
def test_carried_activations_give_the_streamed_correction():
    """carry=True (one forward pass, tensors advanced layer by layer) computes the same sequential
    correction as carry=False (a fresh forward prefix per layer): every layer's input is the quantized
    simulation's with the biases before it already corrected, either way. The two differ only in how
    the float32 forward is split into sessions, so they agree to float32 rounding of the biases:
    rtol 1e-5 of the largest bias change, nothing looser."""
    results = {}
    for carry in (False, True):
        sim, _, calib = sample_sim("convnet", "w4a8", "default")
        layers, _ = find_layers(sim)
        before = {layer.bias: sim.graph.initializers[layer.bias].astype(np.float64) for layer in layers}
        bias_correction(sim, calib, progress=False, carry=carry)
        results[carry] = {name: sim.graph.initializers[name].astype(np.float64) - b for name, b in before.items()}
    assert len(results[True]) >= 4
    for name, change in results[False].items():
        assert np.abs(change).max() > 0, name  # every layer was actually corrected
        np.testing.assert_allclose(results[True][name], change, rtol=0, atol=1e-5 * np.abs(change).max())


@needs_samples
@pytest.mark.parametrize("entry", ["convnet", "mlp"])
def test_fp32_model_reference_makes_every_layer_mean_the_fp32_models(entry):
    """reference="fp32_model" (AIMET's empirical correction) with the activation quantizers off: layer k's
    new bias moves its output mean by exactly -(E[y_sim] - E[y_fp32]), and later corrections do not reach
    back, so afterwards every layer output of the simulation has the FP32 model's per-channel mean on
    the calibration data, errors inherited from the layers before included. The weight-only reference
    ("layer") leaves those inherited errors. Tolerance: float32 sums over the data, 1e-3 of the error
    before correction (measured residuals are ~1e-6 of it)."""
    results = {}
    for reference in ("fp32_model", "layer"):
        sim, fp32, calib = sample_sim(entry, "w4a8", "default")
        layers, _ = find_layers(sim)
        enabled = {n: q.enabled for n, q in sim.quantizers.items()}
        for q in sim.quantizers.values():
            if q.kind == "activation":
                q.enabled = False
        before = mean_errors(sim, fp32, layers, calib)
        bias_correction(sim, calib, progress=False, reference=reference, quantized_activations=False)
        results[reference] = mean_errors(sim, fp32, layers, calib)
        assert {n: q.enabled for n, q in sim.quantizers.items()} == enabled | {
            n: False for n, q in sim.quantizers.items() if q.kind == "activation"}
    assert np.all(results["fp32_model"] <= 1e-3 * before), (before, results["fp32_model"])
    assert np.all(results["layer"][1:] > 10 * results["fp32_model"][1:]), results


def test_activation_quantizers_are_restored_after_the_correction():
    """quantized_activations=False turns them off while correcting and back on afterwards."""
    rng = np.random.default_rng(4)
    node = helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=1)
    sim = QuantSim(refquant.load(make_model([node], [("x", FLOAT, ["N", 6])], [("y", FLOAT, None)],
                                            {"W": rng.normal(size=(4, 6)).astype(np.float32),
                                             "B": np.zeros(4, np.float32)})), precision="w4a8")
    x = rng.normal(size=(64, 6)).astype(np.float32)
    sim.compute_encodings(x, progress=False)
    enabled = {n: q.enabled for n, q in sim.quantizers.items()}
    assert any(q.kind == "activation" and q.enabled for q in sim.quantizers.values())
    bias_correction(sim, x, progress=False, quantized_activations=False)
    assert {n: q.enabled for n, q in sim.quantizers.items()} == enabled
    with pytest.raises(RefquantError, match="reference"):
        bias_correction(sim, x, progress=False, reference="weights")
