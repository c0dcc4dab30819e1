"""AdaRound (Nagel et al. 2020): the layers as matrix products (checked against the op kernels), the
gradients (finite differences), the carried layer inputs (bitwise equal to sim.run), and on the AIMET
sample models at W4A8 per channel: every weight rounded down or up, the layer loss below nearest
rounding's, the logits SQNR above it, and a Ctrl-C that leaves the sim as it was.
"""

import copy
import os
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

import refquant
from refquant.errors import RefquantError
from refquant.ptq import adaround as A
from refquant.ptq import layer_inputs, layers
from refquant.ptq.adaround import adaround, find_layers
from refquant.quant import QuantSim, quantize_dequantize

from .helpers import FLOAT, make_model
from .test_ptq_pointwise import ACTIVATIONS, traced

SHARED = Path(os.environ.get("REFQUANT_SHARED", "/work/shared"))
SAMPLES = SHARED / "refs" / "aimet_samples"
needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"AIMET samples not found at {SAMPLES}")
MODELS = {"convnet": "model_bnfolded.onnx", "mlp": "model.onnx", "mtcnn_rnet": "model.onnx"}


def sample_sim(entry, precision="w4a8", calibrate=True):
    graph = refquant.load(SAMPLES / entry / MODELS[entry])
    sim = QuantSim(graph, precision=precision)
    calib = np.load(SAMPLES / entry / "calib.npz")["input"]
    if calibrate:
        sim.compute_encodings(calib, progress=False)
    return sim, calib, np.load(SAMPLES / entry / "eval.npz")["input"]


def sqnr(ref, out):
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    return 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - out) ** 2))


def logits_sqnr(sim, data):
    return sqnr(sim.run_float({"input": data})["logits"], sim.run({"input": data})["logits"])


def one_node_sim(node, x_shape, inits, precision="w8a8"):
    model = make_model([node], [("x", FLOAT, list(x_shape))], [("y", FLOAT, None)], inits)
    return QuantSim(refquant.load(model), precision=precision)


RNG = np.random.default_rng(0)


def _f(*shape):
    return RNG.normal(size=shape).astype(np.float32)


LAYERS = {
    "conv grouped strided dilated": (helper.make_node("Conv", ["x", "W", "B"], ["y"], group=2, strides=[2, 1],
                                                      dilations=[1, 2], pads=[1, 0, 2, 1]),
                                     (2, 4, 9, 8), {"W": _f(6, 2, 3, 2), "B": _f(6)}),
    "depthwise": (helper.make_node("Conv", ["x", "W"], ["y"], group=4, pads=[1, 1, 1, 1]), (2, 4, 9, 8),
                  {"W": _f(4, 1, 3, 3)}),
    "conv same_upper": (helper.make_node("Conv", ["x", "W"], ["y"], auto_pad="SAME_UPPER", strides=[2, 2]),
                        (2, 4, 9, 8), {"W": _f(5, 4, 3, 3)}),
    "conv 1-D": (helper.make_node("Conv", ["x", "W"], ["y"], strides=[2]), (2, 4, 11), {"W": _f(5, 4, 3)}),
    "conv transpose": (helper.make_node("ConvTranspose", ["x", "W", "B"], ["y"], strides=[2, 3], pads=[1, 0, 0, 1],
                                        output_padding=[1, 0]), (2, 4, 9, 8), {"W": _f(4, 3, 3, 2), "B": _f(3)}),
    "conv transpose grouped, pads > kernel": (helper.make_node("ConvTranspose", ["x", "W"], ["y"], group=2,
                                                               strides=[2, 2], dilations=[2, 1], pads=[3, 1, 2, 1]),
                                              (2, 4, 9, 8), {"W": _f(4, 3, 3, 3)}),
    "gemm transB alpha beta": (helper.make_node("Gemm", ["x", "W", "C"], ["y"], transB=1, alpha=0.5, beta=2.0),
                               (7, 5), {"W": _f(3, 5), "C": _f(3)}),
    "gemm transA": (helper.make_node("Gemm", ["x", "W", "C"], ["y"], transA=1), (5, 7), {"W": _f(5, 3), "C": _f(1, 3)}),
    "matmul 3-D input": (helper.make_node("MatMul", ["x", "W"], ["y"]), (2, 3, 5), {"W": _f(5, 4)}),
}


# ----------------------------------------------------------------------------------- matrix form
@pytest.mark.parametrize("case", list(LAYERS))
def test_every_layer_is_its_weight_matrix_times_its_columns(case):
    node, x_shape, inits = LAYERS[case]
    sim = one_node_sim(node, x_shape, inits)
    (layer,), skipped = find_layers(sim)
    assert not skipped
    x = _f(*x_shape)
    y = refquant.Session(sim.graph).run({"x": x})["y"]
    w = sim.graph.initializers[layer.weight]
    np.testing.assert_array_equal(layer.from_matrix(layer.to_matrix(w)), w)  # a permutation
    columns = layer.columns(x)
    w_mat = layer.to_matrix(w).astype(np.float64)
    for positions in (None, np.sort(RNG.choice(columns.count, min(columns.count, 17), replace=False))):
        predicted = np.matmul(w_mat, columns.take(positions).astype(np.float64))
        actual = layer.output_matrix(y, positions)
        bias = (actual - predicted)[:, :, :1]  # whatever the op adds is the same at every position
        np.testing.assert_allclose(actual, predicted + bias, rtol=0, atol=1e-5)
    # the per-channel axis the sim uses for the weight is the layer's output-channel axis
    assert sim.quantizers[layer.weight].axis % w.ndim == layer.output_axis


def test_a_following_relu_or_clip_is_found():
    nodes = [helper.make_node("Gemm", ["x", "W"], ["h"], transB=1), helper.make_node("Clip", ["h", "lo", "hi"], ["a"]),
             helper.make_node("Gemm", ["a", "W2"], ["b"], transB=1), helper.make_node("Relu", ["b"], ["y"])]
    model = make_model(nodes, [("x", FLOAT, [2, 4])], [("y", FLOAT, None)],
                       {"W": _f(3, 4), "lo": np.float32(0), "hi": np.float32(6), "W2": _f(2, 3)})
    layers, _ = find_layers(QuantSim(refquant.load(model), precision="w8a8"))
    assert [layer.activation for layer in layers] == [(0.0, 6.0), (0.0, np.inf)]


@pytest.mark.parametrize("op, axis, opset, found", [
    ("Gemm", 1, 17, True), ("Gemm", -1, 11, True), ("Gemm", 0, 17, False),
    ("Conv", 1, 17, True), ("Conv", -1, 17, False),
    ("Conv", 1, 11, False)])  # opset 11: axis 1 of [N, M, H, W] normalizes over M*H*W together
def test_a_following_softmax_over_the_output_channels_is_found(op, axis, opset, found):
    if op == "Gemm":
        node, x_shape, w = helper.make_node("Gemm", ["x", "W"], ["h"], transB=1), [2, 4], _f(3, 4)
    else:
        node, x_shape, w = helper.make_node("Conv", ["x", "W"], ["h"]), [2, 4, 5, 5], _f(3, 4, 3, 3)
    model = make_model([node, helper.make_node("Softmax", ["h"], ["y"], axis=axis)], [("x", FLOAT, x_shape)],
                       [("y", FLOAT, None)], {"W": w}, opset=opset)
    layers, _ = find_layers(QuantSim(refquant.load(model), precision="w8a8"))
    assert layers[0].activation == (A.SOFTMAX if found else None)


@pytest.mark.parametrize("op, slope, expected", [
    ("Gemm", np.array([0.1, 0.2, 0.3], np.float32), [0.1, 0.2, 0.3]),
    ("Conv", np.array([0.1, 0.2, 0.3], np.float32).reshape(3, 1, 1), [0.1, 0.2, 0.3]),
    ("Conv", np.array([0.25], np.float32), [0.25]),
    ("Conv", np.full((1, 5, 5), 0.2, np.float32), None)])  # varies along the spatial axes: not per channel
def test_a_following_prelu_gives_its_slope_per_output_channel(op, slope, expected):
    if op == "Gemm":
        node, x_shape, w = helper.make_node("Gemm", ["x", "W"], ["h"], transB=1), [2, 4], _f(3, 4)
    else:
        node, x_shape, w = helper.make_node("Conv", ["x", "W"], ["h"], pads=[1, 1, 1, 1]), [2, 4, 5, 5], _f(3, 4, 3, 3)
    model = make_model([node, helper.make_node("PRelu", ["h", "a"], ["y"])], [("x", FLOAT, x_shape)],
                       [("y", FLOAT, None)], {"W": w, "a": slope})
    activation = find_layers(QuantSim(refquant.load(model), precision="w8a8"))[0][0].activation
    if expected is None:
        assert activation is None
    else:
        np.testing.assert_allclose(activation.slope, expected, rtol=1e-7)


def test_the_prelu_loss_is_the_squared_error_after_the_prelu():
    """Against the formula in float64, slope a_m of output channel m (group-major: G*M/G channels)."""
    rounding, _, _, rng = small_problem(None)
    slope = np.array([0.1, 0.5, 0.9, 0.2, 0.0, 1.5])
    _, sampled, _, _ = small_problem(layers.PRelu(slope))
    w = rounding.soft(rounding.v0 + rng.normal(size=rounding.v0.shape))[0]
    y = sampled.z.astype(np.float64) + np.einsum("gmk,gkb->gmb", w - sampled.w.astype(np.float64),
                                                  sampled.cols.astype(np.float64))
    t = small_problem(None)[1].target.astype(np.float64)
    a = slope.reshape(2, 3, 1)
    expected = np.sum((np.where(t >= 0, t, a * t) - np.where(y >= 0, y, a * y)) ** 2) / y.shape[2]
    assert sampled(w, grad=False) == pytest.approx(expected, rel=1e-5)  # float32 forward
    assert sampled.per_channel(w).sum() == pytest.approx(expected, rel=1e-5)


def test_the_softmax_loss_is_the_squared_error_of_the_probabilities():
    """Against the formula in float64: sum over channels, mean over positions of (softmax(t) - softmax(y))^2
    with y = z + (W - W_fp32) cols, softmax over the channels of each position."""
    rounding, sampled, _, rng = small_problem(A.SOFTMAX)
    w = rounding.soft(rounding.v0 + rng.normal(size=rounding.v0.shape))[0]

    def softmax(a):
        e = np.exp(a - a.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    y = sampled.z.astype(np.float64) + np.einsum("gmk,gkb->gmb", w - sampled.w.astype(np.float64),
                                                  sampled.cols.astype(np.float64))
    t = small_problem(None)[1].target.astype(np.float64)  # the same seeded problem: t before the softmax
    expected = np.sum((softmax(t) - softmax(y)) ** 2) / y.shape[2]
    assert sampled(w, grad=False) == pytest.approx(expected, rel=1e-5)  # float32 forward
    assert sampled.per_channel(w).sum() == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------------- losses, gradients
def small_problem(activation):
    g, m, k, b = 2, 3, 5, 40
    rng = np.random.default_rng(1)
    w = rng.normal(size=(g, m, k))
    scale = np.full((g, m, k), 0.3)
    rounding = A.SoftRounding(w, scale, np.full_like(scale, -8), np.full_like(scale, 7))
    cols = rng.normal(size=(g, k, b)).astype(np.float32)
    z = rng.normal(size=(g, m, b)).astype(np.float32)
    t = rng.normal(size=(g, m, b)).astype(np.float32)
    moments = A._Moments()
    moments.add(cols, t - z)
    sampled = A.SampledLoss(cols, z, t, w, activation)
    return rounding, sampled, A.QuadraticLoss(moments, w), rng


@pytest.mark.parametrize("form", ["sampled+clip", "sampled+softmax", "sampled+prelu", "sampled+silu",
                                  "sampled+hardswish", "sampled", "quadratic"])
@pytest.mark.parametrize("beta", [None, 5.0])
def test_gradients_match_finite_differences(form, beta):
    activation = {"sampled+clip": (0.0, 2.0), "sampled+softmax": A.SOFTMAX,
                  "sampled+silu": traced(*ACTIVATIONS["SiLU as Mul(y, Sigmoid(y))"]),
                  "sampled+hardswish": traced(*ACTIVATIONS["HardSwish as y relu6(y + 3) / 6"]),
                  "sampled+prelu": layers.PRelu(np.array([0.1, 0.5, 0.9, 0.2, 0.0, 1.5]))}.get(form)
    rounding, sampled, quadratic, rng = small_problem(activation)
    objective = A.Objective(rounding, quadratic if form == "quadratic" else sampled, 0.01)
    eps = 1e-6 if form == "quadratic" else 2e-3  # the sampled loss computes in float32
    tol = 1e-6 if form == "quadratic" else 2e-3
    v = rounding.v0 + rng.normal(size=rounding.v0.shape) * 0.3
    h = rounding.h(v)[0]
    for fun, x in ((lambda a: objective(a, beta), v), (lambda a: objective.in_h(a, beta), h)):
        grad = fun(x)[1]
        numeric = np.zeros_like(x)
        for i in np.ndindex(x.shape):
            d = np.zeros_like(x)
            d[i] = eps
            numeric[i] = (fun(x + d)[0] - fun(x - d)[0]) / (2 * eps)
        assert np.abs(grad - numeric).max() <= tol * np.abs(numeric).max()


@pytest.mark.parametrize("form", ["sampled+clip", "sampled+relu", "sampled+softmax", "sampled+prelu", "sampled",
                                  "quadratic"])
@pytest.mark.parametrize("minibatch", [None, 16])
def test_the_fused_adam_steps_equal_numpys_bit_for_bit(form, minibatch):
    """The Numba kernels (refquant.kernels.adaround) against the NumPy objective and Adam update, through the
    warm start and the annealing; a grid narrow enough that some codes clip, and some weights exactly on it."""
    activation = {"sampled+clip": (-0.5, 1.25), "sampled+relu": (0.0, np.inf), "sampled+softmax": A.SOFTMAX,
                  "sampled+prelu": layers.PRelu(np.array([0.1, 0.5, 0.9, 0.2, 0.0, 1.5]))}.get(form)
    runs = []
    for fused in (False, True):
        _, sampled, quadratic, rng = small_problem(activation)  # a fresh one: minibatches shuffle the cache
        w = sampled.w.astype(np.float64)
        w[0, 0, :2] = [0.5, -0.75]  # on the grid (scale 0.25): fixed weights
        scale = np.full(w.shape, 0.25)
        rounding = A.SoftRounding(w, scale, np.full_like(scale, -3), np.full_like(scale, 2))
        assert rounding.fixed.any() and ((rounding.base < -3) | (rounding.base + 1 > 2)).any()
        objective = A.Objective(rounding, quadratic if form == "quadratic" else sampled, 0.01)
        v0 = rounding.v0 + rng.normal(size=w.shape)
        runs.append(A.optimize_adam(objective, v0, 60, (20, 2), 0.2, minibatch, np.random.default_rng(3), lr=0.05,
                                    fused=fused))
    assert np.array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], v0)


def test_the_quadratic_form_is_the_mean_squared_error_of_the_cached_positions():
    rounding, sampled, quadratic, rng = small_problem(None)
    w = rounding.soft(rounding.v0 + rng.normal(size=rounding.v0.shape))[0]
    assert quadratic(w, grad=False) == pytest.approx(sampled(w, grad=False), rel=1e-5)
    np.testing.assert_allclose(quadratic.per_channel(w), sampled.per_channel(w), rtol=1e-5)
    assert quadratic.per_channel(w).sum() == pytest.approx(quadratic(w, grad=False), rel=1e-12)


def test_soft_rounding_starts_at_the_float_weight_and_rounds_to_nearest():
    rng = np.random.default_rng(2)
    w = rng.uniform(-1.95, 1.7, size=(1, 6, 40))  # inside the grid [-8, 7] * 0.25
    w[0, 0, :3] = [0.75, -0.5, 1.5]  # exact multiples of the step: kept, never optimized
    scale = np.full(w.shape, 0.25)
    rounding = A.SoftRounding(w, scale, np.full_like(w, -8), np.full_like(w, 7))
    np.testing.assert_allclose(rounding.soft(rounding.v0)[0], w, rtol=0, atol=1e-12)
    nearest = np.clip(np.floor(w / scale + 0.5), -8, 7)  # half up, like V >= 0 at h = 1/2
    np.testing.assert_array_equal(rounding.codes(rounding.up(rounding.v0)), nearest)
    assert rounding.fixed[0, 0, :3].all() and rounding.fixed.sum() == 3
    assert not rounding.up(np.full_like(w, 5.0))[rounding.fixed].any()


def test_beta_follows_aimets_cosine_schedule():
    assert A.annealed_beta(199, 1000, (20, 2), 0.2) is None
    assert A.annealed_beta(200, 1000, (20, 2), 0.2) == pytest.approx(20)
    assert A.annealed_beta(600, 1000, (20, 2), 0.2) == pytest.approx(11)
    assert A.annealed_beta(999, 1000, (20, 2), 0.2) == pytest.approx(2, abs=1e-3)
    stages = A.lbfgs_stages(1000, (20, 2), 0.2)
    assert stages[0] == (None, 200) and sum(n for _, n in stages) == 1000
    betas = [b for b, _ in stages[1:]]
    assert betas == sorted(betas, reverse=True) and 2 < betas[-1] < betas[0] < 20


@pytest.mark.parametrize("size", [7, 40, 1000])
def test_the_column_cache_is_the_bottom_k_of_random_keys_with_matching_data(size):
    node = helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1])
    sim = one_node_sim(node, ("N", 2, 5, 5), {"W": _f(3, 2, 3, 3)})
    (layer,), _ = find_layers(sim)
    rng = np.random.default_rng(0)
    reservoir = A._Reservoir(size, rng)
    keys, cols, outputs = [], [], []
    for b in range(5):
        x = np.random.default_rng(b).normal(size=(3, 2, 5, 5)).astype(np.float32)
        columns = layer.columns(x)
        y = refquant.Session(sim.graph).run({"x": x})["y"]
        state = rng.bit_generator.state
        keys.append(rng.random(columns.count))  # the keys the reservoir is about to draw
        rng.bit_generator.state = state
        cols.append(columns.take())
        outputs.append(layer.output_matrix(y))
        reservoir.offer(layer, columns, y, 2 * y)
    keys, cols, outputs = np.concatenate(keys), np.concatenate(cols, axis=2), np.concatenate(outputs, axis=2)
    assert reservoir.filled == min(size, len(keys)) and reservoir.complete == (size >= len(keys))
    np.testing.assert_array_equal(np.sort(reservoir.keys[:reservoir.filled]), np.sort(keys)[:reservoir.filled])
    where = {k: i for i, k in enumerate(keys)}
    index = np.array([where[k] for k in reservoir.keys[:reservoir.filled]])
    got_cols, got_z, got_t = reservoir.arrays()
    np.testing.assert_array_equal(got_cols, cols[:, :, index])
    np.testing.assert_array_equal(got_z, outputs[:, :, index])
    np.testing.assert_array_equal(got_t, 2 * outputs[:, :, index])


# ----------------------------------------------------------------------------------- carried inputs
@needs_samples
@pytest.mark.parametrize("entry", ["convnet", "mtcnn_rnet"])
def test_carried_layer_inputs_equal_sim_run_while_weights_change(entry):
    sim, calib, _ = sample_sim(entry, "w8a8")
    layers, _ = find_layers(sim)
    feeds = [{"input": calib[i:i + 16]} for i in range(0, len(calib), 16)]
    carried = A.LayerInputs(sim, calib, 16)
    fp32 = A.LayerInputs(sim, calib, 16, use_fp32_inputs=True)
    for layer in layers:
        got = list(carried.batches(layer))
        for (x, z, t), f in zip(got, feeds):
            np.testing.assert_array_equal(x, sim.run(f, outputs=[layer.input])[layer.input])
            np.testing.assert_array_equal(t, sim.run_float(f, outputs=[layer.output])[layer.output])
        for (x, z, t), f in zip(fp32.batches(layer), feeds):
            np.testing.assert_array_equal(x, sim.run_float(f, outputs=[layer.input])[layer.input])
            assert z is t
        # change this layer's quantized weight: the next layer's carried input must see it
        w = sim.graph.initializers[layer.weight]
        sim.set_quantized_parameter(layer.weight, quantize_dequantize(w * 1.5, sim.encoding_of(layer.weight)))


@needs_samples
def test_the_rest_of_a_carried_side_equals_sim_run_from_every_layer_on():
    sim, calib, _ = sample_sim("convnet", "w8a8")
    feeds = [{"input": calib[i:i + 16]} for i in range(0, len(calib), 16)]
    side = layer_inputs._CarriedSide(sim, feeds, simulated=True)
    names = ["logits"]
    for layer in find_layers(sim)[0]:
        side.tensor(layer.input)
        w = sim.graph.initializers[layer.weight]
        sim.set_quantized_parameter(layer.weight, quantize_dequantize(w * 1.5, sim.encoding_of(layer.weight)))
        for got, f in zip(side.rest(names), feeds):
            want = sim.run(f, outputs=names)
            for name in names:
                np.testing.assert_array_equal(got[name], want[name])


# ----------------------------------------------------------------------------------- AIMET samples
def rounded_codes(sim, name):
    """(integer codes of the simulated weight, floor and ceil of W/s clipped to the grid); asserts that
    the weight is exactly ``code * scale`` in float32, i.e. on the grid."""
    enc = sim.encoding_of(name)
    w = sim.graph.initializers[name].astype(np.float64)
    scale, offset = A.grid_arrays(enc, w.shape)  # float32, as the simulation's qdq uses it
    fixed = sim.quantizers[name].fixed_value
    codes = np.rint(fixed / scale)
    np.testing.assert_array_equal(codes.astype(np.float32) * scale, fixed)
    ratio = w / scale.astype(np.float64)
    lo, hi = offset, offset + enc.steps
    return codes, np.clip(np.floor(ratio), lo, hi), np.clip(np.ceil(ratio), lo, hi)


@needs_samples
@pytest.mark.parametrize("entry", ["convnet", "mlp"])
def test_every_weight_is_rounded_down_or_up_on_its_grid(entry):
    sim, calib, ev = sample_sim(entry)
    encodings = {n: sim.encoding_of(n) for n, q in sim.quantizers.items() if q.kind == "param"}
    enabled = {n: q.enabled for n, q in sim.quantizers.items()}
    before = sim.run_float({"input": ev})["logits"]
    report = []
    adaround(sim, calib, num_iterations=200, progress=False, report=report)
    assert len(report) == (5 if entry == "convnet" else 3)
    for r in report:
        codes, down, up = rounded_codes(sim, r.weight)
        assert np.all((codes == down) | (codes == up))
        assert sim.quantizers[r.weight].frozen and sim.encoding_of(r.weight) is encodings[r.weight]
    assert sum(r.flipped for r in report) > 0  # AdaRound did change some roundings
    np.testing.assert_array_equal(sim.run_float({"input": ev})["logits"], before)  # FP32 weights untouched
    assert {n: q.enabled for n, q in sim.quantizers.items()} == enabled  # activation quantizers back on


@needs_samples
def test_adaround_lowers_each_layers_loss_below_nearest_rounding():
    """Checked independently of the optimizer's bookkeeping: each layer alone on its FP32 input (what
    ``use_fp32_inputs`` optimizes), ``sum_channels mean_positions (relu(y) - relu(y_q))^2`` over the
    whole calibration set with the op's own kernel, AdaRound's weight against nearest rounding's.
    ``num_columns`` holds every position (c1 has 64 x 32 x 32), so what is fitted is what is measured. AIMET's step
    size: at the default "scaled" one (1e-2 here) the depthwise conv ends at nearest rounding after its refit (next
    test)."""
    sim, calib, _ = sample_sim("convnet")
    nearest = {layer.weight: sim.session.constants[layer.weight].copy() for layer in find_layers(sim)[0]}
    report = []
    adaround(sim, calib, num_iterations=1000, use_fp32_inputs=True, num_columns=65536, progress=False,
             report=report, learning_rate=A.ADAM_LR)
    for layer, r in zip(find_layers(sim)[0], report):
        assert not r.kept_nearest and r.loss_adaround < r.loss_nearest
        x = sim.run_float({"input": calib}, outputs=[layer.input])[layer.input]
        target = sim.run_float({"input": calib}, outputs=[layer.output])[layer.output]
        lo, hi = layer.activation or (-np.inf, np.inf)

        def loss(weight):
            probe = layer_inputs._probe(sim, layer)
            probe.set_constant(layer.weight, weight)
            diff = np.clip(probe.run({layer.input: x})["y"], lo, hi) - np.clip(target, lo, hi)
            return np.sum(np.square(diff, dtype=np.float64)) / layer.output_matrix(diff).shape[2]

        assert loss(sim.quantizers[layer.weight].fixed_value) < loss(nearest[layer.weight]), layer.name


@needs_samples
def test_a_layer_the_scaled_step_leaves_worse_than_nearest_is_fitted_again_at_aimets_step():
    """Each layer on its FP32 input: a layer whose "scaled" fit (1e-2 at 1,000 iterations) ends worse than nearest
    rounding on its own loss is fitted again at 1e-3 (measured: the depthwise conv), and what is kept is never worse
    than nearest rounding; the other layers keep the larger step's fit."""
    sim, calib, _ = sample_sim("convnet")
    nearest = {layer.weight: sim.session.constants[layer.weight].copy() for layer in find_layers(sim)[0]}
    report = []
    adaround(sim, calib, num_iterations=1000, use_fp32_inputs=True, num_columns=65536, progress=False,
             report=report)
    refit = [r.layer for r in report if r.learning_rate == A.ADAM_LR]
    assert "/dw/Conv" in refit and len(refit) < len(report)
    for r in report:
        fixed = sim.quantizers[r.weight].fixed_value
        if r.kept_nearest:
            assert r.layer in refit and np.array_equal(fixed, nearest[r.weight]), r.layer
        else:
            assert r.loss_adaround <= r.loss_nearest, r.layer
            assert r.layer in refit or r.learning_rate == pytest.approx(1e-2), r.layer


@needs_samples
def test_adaround_raises_the_convnet_logits_sqnr():
    sim, calib, ev = sample_sim("convnet")
    nearest = logits_sqnr(sim, ev)
    assert nearest == pytest.approx(22.18, abs=0.05)  # AIMET's w4a8_minmax
    adaround(sim, calib, num_iterations=1000, progress=False)
    sim.compute_encodings(calib, progress=False)  # activation ranges for the AdaRounded weights
    assert logits_sqnr(sim, ev) > nearest + 3  # measured 25.8 dB (AIMET's PyTorch AdaRound: 37 s; ours ~2 s)


@needs_samples
def test_adaround_raises_the_mlp_logits_sqnr_given_enough_samples():
    """The MLP has 17,024 weights in fully connected layers; its 64 calibration samples are fitted
    (calibration-set SQNR 23.1 -> 29.3 dB) without generalizing (eval 23.2 -> 23.3). With 1,024
    samples of the same N(0, 1) distribution the gain is real."""
    sim, calib, ev = sample_sim("mlp")
    nearest = logits_sqnr(sim, ev)
    more = np.random.default_rng(3).standard_normal((1024, 64)).astype(np.float32)
    adaround(sim, more, num_iterations=1000, progress=False)
    sim.compute_encodings(calib, progress=False)
    assert logits_sqnr(sim, ev) > nearest + 1.5  # measured 23.15 -> 25.2 dB


@needs_samples
def test_greedy_finish_and_lbfgs_also_round_down_or_up_and_beat_nearest():
    """On AdaRound's loss as written (shrinkage 0: the figures below were measured on it)."""
    for kwargs in ({"finish": "greedy", "shrinkage": 0}, {"optimizer": "lbfgs", "shrinkage": 0}):
        sim, calib, ev = sample_sim("convnet")
        nearest = logits_sqnr(sim, ev)
        report = []
        adaround(sim, calib, num_iterations=200, progress=False, report=report, **kwargs)
        for r in report:
            codes, down, up = rounded_codes(sim, r.weight)
            assert np.all((codes == down) | (codes == up))
            assert r.loss_adaround <= r.loss_nearest
        sim.compute_encodings(calib, progress=False)
        assert logits_sqnr(sim, ev) > nearest + 3, kwargs  # measured greedy 38.0, lbfgs 25.8 dB


@needs_samples
def test_zero_iterations_is_nearest_rounding():
    sim, calib, ev = sample_sim("convnet")
    before = sim.run({"input": ev})["logits"]
    report = []
    adaround(sim, calib, num_iterations=0, progress=False, report=report)
    assert all(r.flipped == 0 and r.loss_adaround == r.loss_nearest for r in report)
    # half up instead of the sim's half even: the same codes unless W/s is exactly halfway
    np.testing.assert_array_equal(sim.run({"input": ev})["logits"], before)


@needs_samples
def test_nodes_to_include_adarounds_those_layers_and_a_second_call_the_rest_as_one_call_would():
    sim, calib, _ = sample_sim("convnet")
    names = [layer.name for layer in find_layers(sim)[0]]
    whole, _, _ = sample_sim("convnet")
    adaround(whole, calib, num_iterations=200, progress=False)
    report = []
    adaround(sim, calib, num_iterations=200, progress=False, nodes_to_include=names[:2], report=report)
    assert [r.layer for r in report] == names[:2]
    weights = [layer.weight for layer in find_layers(sim)[0]]
    assert [sim.quantizers[w].fixed_value is not None for w in weights] == [True, True, False, False, False]
    adaround(sim, calib, num_iterations=200, progress=False, nodes_to_include=names[2:])
    # each layer fitted to the simulation as the layers before it were left: the same as one call
    for w in weights:
        np.testing.assert_array_equal(sim.quantizers[w].fixed_value, whole.quantizers[w].fixed_value)


@needs_samples
@pytest.mark.parametrize("name, why", [("/nope/Conv", "not in the graph"), ("/relu/Relu", "a Relu node")])
def test_a_node_to_include_that_is_no_layer_is_an_error_naming_it(name, why):
    sim, calib, ev = sample_sim("convnet")
    before = sim.run({"input": ev})["logits"]
    with pytest.raises(RefquantError, match=f"{name}.*{why}"):
        adaround(sim, calib, num_iterations=10, progress=False, nodes_to_include=["/c1/Conv", name])
    np.testing.assert_array_equal(sim.run({"input": ev})["logits"], before)
    with pytest.raises(RefquantError, match="list of node names"):
        adaround(sim, calib, num_iterations=10, progress=False, nodes_to_include="/c1/Conv")


@needs_samples
def test_an_uncalibrated_sim_gets_its_weight_encodings_computed():
    sim, calib, _ = sample_sim("mlp", calibrate=False)
    adaround(sim, calib, num_iterations=50, progress=False)
    reference, _, _ = sample_sim("mlp")
    for name in ("l1.weight", "l2.weight", "l3.weight"):
        np.testing.assert_array_equal(sim.encoding_of(name).scale, reference.encoding_of(name).scale)
        assert sim.quantizers[name].fixed_value is not None
    assert all(q.encoding is None for q in sim.quantizers.values() if q.kind == "activation")


@needs_samples
@pytest.mark.parametrize("carry", [True, False])
def test_an_interruption_leaves_the_sim_as_it_was(monkeypatch, carry):
    sim, calib, ev = sample_sim("convnet")
    before = sim.run({"input": ev})["logits"]
    state = {n: (q.enabled, q.encoding, q.frozen, q.fixed_value) for n, q in sim.quantizers.items()}
    calls = []
    real = A.optimize_adam

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(A, "optimize_adam", interrupted)
    with pytest.raises(KeyboardInterrupt):
        adaround(sim, calib, num_iterations=20, progress=False, cache_activations=carry)
    assert {n: (q.enabled, q.encoding, q.frozen, q.fixed_value) for n, q in sim.quantizers.items()} == state
    np.testing.assert_array_equal(sim.run({"input": ev})["logits"], before)


def test_conv_transpose_layers_are_adarounded():
    node, x_shape, inits = LAYERS["conv transpose"]
    sim = one_node_sim(node, x_shape, inits, precision="w4a8")
    rng = np.random.default_rng(4)
    # correlated input channels: rounding errors of different weights can cancel (with independent
    # inputs, H = E[cols cols^T] is diagonal and nearest rounding is already the best)
    shared = rng.normal(size=(32, 1) + x_shape[2:])
    data = (shared + 0.3 * rng.normal(size=(32,) + x_shape[1:])).astype(np.float32)
    sim.compute_encodings(data, progress=False)
    report = []
    adaround(sim, data, num_iterations=1000, progress=False, report=report)
    (r,) = report
    codes, down, up = rounded_codes(sim, "W")
    assert np.all((codes == down) | (codes == up)) and r.loss_adaround < r.loss_nearest


def test_bad_arguments_are_refquant_errors():
    node, x_shape, inits = LAYERS["gemm transB alpha beta"]
    sim = one_node_sim(node, x_shape, inits)
    with pytest.raises(RefquantError, match="optimizer"):
        adaround(sim, np.zeros(x_shape, np.float32), optimizer="sgd")
    with pytest.raises(RefquantError, match="finish"):
        adaround(sim, np.zeros(x_shape, np.float32), finish="round")
    for bad in (0, -1e-3, float("inf"), float("nan"), True, "auto"):
        with pytest.raises(RefquantError, match="learning_rate"):
            adaround(sim, np.zeros(x_shape, np.float32), learning_rate=bad)


@pytest.mark.parametrize("learning_rate, iterations, expected", [(0.004, 30, 0.004), ("scaled", 200, 0.05),
                                                                 ("scaled", 1000, 0.01), ("scaled", 40, 0.05),
                                                                 ("scaled", 10000, 1e-3), ("scaled", 20000, 1e-3)])
def test_the_learning_rate_reaches_adam(monkeypatch, learning_rate, iterations, expected):
    """``learning_rate`` is Adam's step; "scaled" is 1e-3 x max(1, 10000 / max(200, iterations)), the same path
    length as 10,000 steps of 1e-3 (AIMET's default count and step) from 200 iterations on."""
    node, x_shape, inits = LAYERS["gemm transB alpha beta"]
    sim = one_node_sim(node, x_shape, inits)
    rates = []

    def spy(objective, v, num_iterations, beta_range, warm_start, sample_size=None, rng=None, lr=None, **kwargs):
        rates.append(lr)
        return v  # nearest rounding: the step size is all this test is about

    monkeypatch.setattr(A, "optimize_adam", spy)
    adaround(sim, np.random.default_rng(0).normal(size=x_shape).astype(np.float32), num_iterations=iterations,
             progress=False, learning_rate=learning_rate)
    assert rates == [pytest.approx(expected, rel=1e-12)]



def test_layers_inside_if_branches_are_named_as_not_optimized():
    """Silero VAD keeps all its convs in If branches: AdaRound and SeqMSE work on the top-level graph only, so a
    layer in a branch is listed among the layers not optimized, and the top-level one is still rounded."""
    rng = np.random.default_rng(0)
    w, v = rng.normal(size=(4, 4)).astype(np.float32), rng.normal(size=(4, 4)).astype(np.float32)
    then = helper.make_graph([helper.make_node("MatMul", ["h", "v"], ["z"], name="inner_matmul")], "then", [],
                             [helper.make_tensor_value_info("z", FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", ["h"], ["u"])], "else", [],
                              [helper.make_tensor_value_info("u", FLOAT, None)])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="outer_matmul"),
             helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)]
    model = make_model(nodes, [("x", FLOAT, [8, 4]), ("c", TensorProto.BOOL, [])],
                       [("y", FLOAT, None)], {"w": w, "v": v})
    sim = QuantSim(refquant.load(model), precision="w4a8", prepare=False)
    feed = {"x": rng.normal(size=(8, 4)).astype(np.float32), "c": np.array(True)}
    layers, skipped = find_layers(sim)
    assert [layer.node.name for layer in layers] == ["outer_matmul"]
    assert skipped == ["1 inside If/Loop/Scan subgraphs (inner_matmul: subgraphs are simulated as given)"]
    with pytest.warns(UserWarning, match="layers not optimized: 1 inside If/Loop/Scan subgraphs .inner_matmul"):
        adaround(sim, [feed], num_iterations=10, progress=False)
    sim = QuantSim(refquant.load(model), precision="w4a8", prepare=False)
    with pytest.warns(UserWarning, match="seq_mse: layers not optimized: 1 inside If/Loop/Scan subgraphs"):
        refquant.seq_mse(sim, [feed], num_candidates=2, progress=False)

@needs_samples
def test_layers_that_fit_the_budget_are_fitted_full_batch_and_do_not_depend_on_the_seed():
    """MTCNN R-Net (PRelu, Softmax: the sampled loss, but for the bbox head): all of its layers keep every position (positions x
    weights < 2^27) and Adam takes them all at each step, so two seeds give the same rounding; with 1,024-position
    minibatches they do not (measured at 1000 iterations: 36.6-46.7 dB over four seeds, 45.33 dB full batch)."""
    codes = {}
    for seed, per_iteration in [(0, None), (1, None), (1, 1024)]:
        sim, calib, _ = sample_sim("mtcnn_rnet")
        report = []
        adaround(sim, calib, num_iterations=60, progress=False, seed=seed, columns_per_iteration=per_iteration,
                 report=report)
        conv1 = next(r for r in report if r.layer == "/conv1/Conv")
        assert conv1.form == "sampled" and conv1.columns == 64 * 22 * 22  # all positions, above a sample's 8,192
        codes[(seed, per_iteration)] = [rounded_codes(sim, r.weight) for r in report]
    for a, b in zip(codes[(0, None)], codes[(1, None)]):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(codes[(1, None)], codes[(1, 1024)]))


def test_a_layer_beyond_the_budget_keeps_the_usual_sample():
    """positions x weights above 2^27 (9,216 positions x 65,536 weights): 8,192 sampled positions, as before."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(256, 256, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["y"])]
    model = make_model(nodes, [("x", FLOAT, [4, 256, 48, 48])], [("y", FLOAT, None)], {"w": w})
    sim = QuantSim(refquant.load(model), precision="w4a8")
    report = []
    adaround(sim, rng.normal(size=(4, 256, 48, 48)).astype(np.float32), num_iterations=2, progress=False,
             report=report)
    assert report[0].form == "sampled" and report[0].columns == 8192


def test_a_layer_whose_h_would_pass_the_moments_budget_takes_the_sampled_loss(monkeypatch):
    """A Gemm without activation on many positions takes the exact quadratic form, unless its H = sum x x^T
    (K^2 float64: VGG's 25088-input head, 5 GB) passes MOMENTS_BUDGET: then H is never built."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)]
    model = make_model(nodes, [("x", FLOAT, ["N", 16])], [("y", FLOAT, None)],
                       {"w": rng.normal(size=(4, 16)).astype(np.float32)})
    x = rng.normal(size=(200, 16)).astype(np.float32)
    forms = []
    for budget in (A.MOMENTS_BUDGET, 16 * 16 - 1):
        monkeypatch.setattr(A, "MOMENTS_BUDGET", budget)
        report = []
        adaround(QuantSim(refquant.load(model), precision="w4a8"), x, num_iterations=2, progress=False, report=report)
        forms.append(report[0].form)
    assert forms == ["quadratic", "sampled"]


def test_a_layer_whose_full_batch_step_would_read_too_much_takes_minibatches(monkeypatch):
    """A depthwise conv, 512 channels, 3,600 positions: positions x weights is within 2^27 but a full-batch step
    would read 3,600 x 512 x (9 + 2) floats > 2^24 (FULL_BATCH_FLOATS), so all positions are kept and Adam takes
    MINIBATCH of them per step (MobileNetV2's depthwise layers: 108 MB a full-batch step)."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(512, 1, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], group=512, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"])]
    model = make_model(nodes, [("x", FLOAT, [4, 512, 30, 30])], [("y", FLOAT, None)], {"w": w})
    sim = QuantSim(refquant.load(model), precision="w4a8")
    sizes = []
    real = A.optimize_adam

    def spy(objective, v, num_iterations, beta_range, warm_start, sample_size=None, *args, **kwargs):
        sizes.append(sample_size)
        return real(objective, v, num_iterations, beta_range, warm_start, sample_size, *args, **kwargs)

    monkeypatch.setattr(A, "optimize_adam", spy)
    report = []
    adaround(sim, rng.normal(size=(4, 512, 30, 30)).astype(np.float32), num_iterations=2, progress=False,
             report=report)
    assert 3600 * 512 * 9 < A.FULL_BATCH_MACS and 3600 * 512 * 11 > A.FULL_BATCH_FLOATS
    # a fit worse than nearest rounding at the scaled step is fitted again (at 1e-3), with the same minibatches
    assert report[0].form == "sampled" and report[0].columns == 3600 and set(sizes) == {A.MINIBATCH}


# ------------------------------------------------------------------------------------ carrying the data
def test_carried_bytes_is_the_peak_of_the_live_tensors():
    """x -> Relu a -> Neg b -> Add(a, b) c -> Relu y, [2, 4] float32 (32 bytes a tensor): the Add holds a, b and c
    (96 bytes); two batches of 2 samples and two sides: 96 x 2 x 2."""
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["c"]), helper.make_node("Relu", ["c"], ["y"])]
    sim = QuantSim(refquant.load(make_model(nodes, [("x", FLOAT, ["N", 4])], [("y", FLOAT, None)], {})))
    first = {"x": np.ones((2, 4), np.float32)}
    assert layer_inputs.carried_bytes(sim, first, samples=4, sides=2) == 96 * 2 * 2
    assert layer_inputs.carried_bytes(sim, first, samples=2, sides=1) == 96


def two_gemm_sim():
    rng = np.random.default_rng(21)
    nodes = [helper.make_node("Gemm", ["x", "W1", "B1"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "W2", "B2"], ["y"], transB=1)]
    inits = {"W1": rng.normal(size=(8, 6)).astype(np.float32), "B1": rng.normal(size=8).astype(np.float32),
             "W2": rng.normal(size=(5, 8)).astype(np.float32), "B2": rng.normal(size=5).astype(np.float32)}
    model = make_model(nodes, [("x", FLOAT, ["N", 6])], [("y", FLOAT, None)], inits)
    x = rng.normal(size=(64, 6)).astype(np.float32)
    sim = QuantSim(refquant.load(model), precision="w4a8")
    sim.compute_encodings(x, progress=False)
    return sim, x


def _technique_results(run, **kwargs):
    sim, x = two_gemm_sim()
    run(sim, x, **kwargs)
    return ({n: q.encoding.scale for n, q in sim.quantizers.items() if q.kind == "param" and q.encoding is not None},
            {n: q.fixed_value for n, q in sim.quantizers.items() if q.fixed_value is not None},
            {n: sim.graph.initializers[n].copy() for n in ("B1", "B2")})


def _same(a, b):
    for one, other in zip(a, b):
        assert one.keys() == other.keys()
        for name in one:
            np.testing.assert_array_equal(one[name], other[name], err_msg=name)


@pytest.mark.parametrize("technique", ["adaround", "seq_mse", "bias_correction"])
def test_activations_that_would_not_fit_in_memory_are_streamed(technique, monkeypatch):
    """When the carried activations would pass half the memory available, the technique warns and streams the data
    (a forward pass up to each layer): the same result as cache_activations/carry=False, bit for bit."""
    run = getattr(refquant, technique)
    options = {"adaround": dict(num_iterations=30), "seq_mse": {}, "bias_correction": {}}[technique]
    off = {"bias_correction": {"carry": False}}.get(technique, {"cache_activations": False})
    streamed = _technique_results(run, progress=False, **options, **off)
    monkeypatch.setattr(layer_inputs, "available_memory", lambda: 1000)  # bytes: nothing fits
    with pytest.warns(UserWarning, match="the data is streamed instead"):
        fallback = _technique_results(run, progress=False, **options)
    _same(fallback, streamed)


def test_per_layer_inputs_streamed_or_carried_round_the_same():
    """quantize_activations="per_layer" carries six sides and the held-out quarter; streamed (a forward pass per
    layer and a full run of the held-out data per score) it must round every weight the same."""
    options = dict(num_iterations=30, quantize_activations="per_layer", progress=False)
    reports = [], []
    carried = _technique_results(refquant.adaround, report=reports[0], **options)
    streamed = _technique_results(refquant.adaround, cache_activations=False, report=reports[1], **options)
    _same(carried, streamed)
    assert len(carried[1]) == 2
    assert [r.held_out_sqnr for r in reports[0]] == [r.held_out_sqnr for r in reports[1]]
    assert all(r.held_out_sqnr is not None for r in reports[0])  # the choice was made, per layer


@pytest.mark.parametrize("technique", ["adaround", "seq_mse", "bias_correction"])
def test_a_generator_of_batches_works_like_the_list(technique):
    """seq_mse ("auto": one pass per target), bias correction (FP32 means, then the simulation) and AdaRound without
    caching read the data more than once: a one-shot generator is read once into its batches."""
    run = getattr(refquant, technique)
    options = {"adaround": dict(num_iterations=30, cache_activations=False), "seq_mse": {},
               "bias_correction": {}}[technique]

    def generator(sim, x, **kwargs):
        return run(sim, (x[i:i + 16] for i in range(0, len(x), 16)), **kwargs)

    def batches(sim, x, **kwargs):
        return run(sim, [x[i:i + 16] for i in range(0, len(x), 16)], **kwargs)

    _same(_technique_results(generator, progress=False, **options), _technique_results(batches, progress=False, **options))


def test_an_activation_subgraph_after_a_layer_is_in_its_loss():
    """Conv -> (Sigmoid, Mul(y, Sigmoid(y))), YOLOv8's SiLU, and Conv -> Tanh: the layer's activation is that
    subgraph, and the sampled loss is sum (f(y) - f(t))^2 with f written out (y s(y), tanh y); a Mul that also
    reads another tensor leaves the Sigmoid alone (an SE gate), and a Relu stays the fused kernel's clip."""
    rng = np.random.default_rng(31)
    w = rng.normal(size=(4, 3, 1, 1)).astype(np.float32)
    sigmoid = helper.make_node("Sigmoid", ["c"], ["s"])
    cases = {"silu": ([sigmoid, helper.make_node("Mul", ["c", "s"], ["y"])], "Sigmoid > Mul",
                      lambda a: a / (1 + np.exp(-a))),
             "gate": ([sigmoid, helper.make_node("Mul", ["g", "s"], ["y"])], "Sigmoid", None),
             "tanh": ([helper.make_node("Tanh", ["c"], ["y"])], "Tanh", np.tanh),
             "relu": ([helper.make_node("Relu", ["c"], ["y"])], (0.0, np.inf), None)}
    for name, (activation, expected, formula) in cases.items():
        nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv")] + activation
        model = make_model(nodes, [("x", FLOAT, [2, 3, 4, 4]), ("g", FLOAT, [2, 4, 4, 4])], [("y", FLOAT, None)],
                           {"w": w})
        sim = QuantSim(refquant.load(model), precision="w4a8", prepare=False)
        (layer,), _ = find_layers(sim)
        if isinstance(expected, tuple):
            assert layer.activation == expected
            continue
        assert layer.activation.describe() == expected
        if formula is None:
            continue
        y = rng.normal(size=(1, 4, 5)).astype(np.float32) * 4
        loss = A.SampledLoss(np.zeros((1, 3, 5), np.float32), y, np.zeros_like(y),
                             w.reshape(1, 4, 3).astype(np.float64), layer.activation)
        expected_loss = np.sum((formula(y.astype(np.float64)) - formula(0.0)) ** 2) / 5
        np.testing.assert_allclose(loss(w.reshape(1, 4, 3).astype(np.float64), grad=False), expected_loss, rtol=1e-5)


def test_other_activation_subgraphs_enter_the_loss_only_when_asked():
    """A HardSwish written out (PaddlePaddle's) after a conv: by default the exact quadratic form of the
    pre-activation error; include_activation="all" puts it in the sampled loss, and that loss is
    sum (f(y) - f(t))^2 over the positions with f = y relu6(y + 3) / 6."""
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv")] + copy.deepcopy(ACTIVATIONS[
        "HardSwish as y relu6(y + 3) / 6"][0])  # a copy: renamed below
    nodes[-1].output[0] = "y"
    inits = {"w": rng.normal(size=(4, 3, 1, 1)).astype(np.float32), "c0": np.float32(0), "c3": np.float32(3),
             "c6": np.float32(6)}
    for node in nodes[1:]:
        node.input[:] = ["c" if name == "y" else name for name in node.input]
    model = make_model(nodes, [("x", FLOAT, [8, 3, 4, 4])], [("y", FLOAT, None)], inits)
    x = rng.normal(size=(8, 3, 4, 4)).astype(np.float32) * 3
    forms = {}
    for include in (True, "all"):
        sim = QuantSim(refquant.load(model), precision="w4a8", prepare=False)
        sim.compute_encodings(x, progress=False)
        (layer,), _ = find_layers(sim)
        assert layer.activation is None and layer.activation_all.describe() == "Add > Clip > Mul > Div"
        inputs = A.LayerInputs(sim, x, 8)
        objective, forms[include], _ = A.build_objective(sim, layer, inputs, include_activation=include)
        if include == "all":
            c = sim.run_float({"x": x}, outputs=["c"])["c"]
            hardswish = np.asarray(c, np.float64) * np.clip(c + 3.0, 0, 6) / 6
            # the cache holds the positions in a random order: compare each channel's values, sorted
            target = np.sort(objective.loss.target[0], axis=1)
            expected = np.sort(hardswish.transpose(1, 0, 2, 3).reshape(4, -1), axis=1)
            np.testing.assert_allclose(target, expected, rtol=1e-6, atol=2e-6)  # float32 ops; |f| < 16, ulp 1e-6
    assert forms == {True: "quadratic", "all": "sampled"}
    with pytest.raises(RefquantError, match="include_activation"):
        A.adaround(QuantSim(refquant.load(model), precision="w4a8", prepare=False), x, include_activation="yes")
