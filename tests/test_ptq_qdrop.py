"""AdaRound on QDrop inputs (Wei et al. 2022): each element of a layer's input is the FP32 model's with
probability q, else the simulation's. The quadratic form is the exact expectation over the masks (checked by
enumerating every mask of a small Gemm), the sampled loss is an unbiased draw of it (its mean over many draws,
within four standard errors), its gradient is that of its own draw (finite differences), and the mask kernel is
NumPy's ``where``.
"""

import itertools

import numpy as np
import pytest
from onnx import helper

import refquant
from refquant.errors import RefquantError
from refquant.kernels.adaround import mix_columns
from refquant.ptq import adaround as A
from refquant.quant import QuantSim

from .helpers import FLOAT, make_model
from .test_ptq_pointwise import ACTIVATIONS, traced


def gemm_sim(relu: bool, samples: int = 3, features: int = 2, outputs: int = 2, seed: int = 5):
    """x [samples, features] -> Gemm (-> Relu), W4A8: the graph input's 8-bit quantizer makes the simulation's
    layer input differ from the FP32 one."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=1)]
    if relu:
        nodes.append(helper.make_node("Relu", ["y"], ["r"]))
    inits = {"W": rng.normal(size=(outputs, features)).astype(np.float32),
             "B": rng.normal(size=outputs).astype(np.float32)}
    model = make_model(nodes, [("x", FLOAT, ["N", features])], [("r" if relu else "y", FLOAT, None)], inits)
    x = rng.normal(size=(samples, features)).astype(np.float32)
    sim = QuantSim(refquant.load(model), precision="w4a8")
    sim.compute_encodings(x, progress=False)
    return sim, x, inits


def objective_of(sim, x, qdrop, seed=0):
    layer = A.find_layers(sim)[0][0]
    inputs = A.LayerInputs(sim, x, 16)
    return A.build_objective(sim, layer, inputs, qdrop=qdrop, rng=np.random.default_rng(seed), shrinkage=0)


def every_mask_expectation(sim, x, inits, w_soft, q, relu):
    """``E_mask sum_channels mean_positions (f(t) - f(c W_soft^T + B))^2`` by enumerating all masks,
    ``c = where(mask, x, qdq(x))``, each weighted by ``q^ones (1 - q)^zeros``."""
    a = sim.run({"x": x}, outputs=["x"])["x"].astype(np.float64)  # the simulation's input: qdq(x)
    assert not np.array_equal(a, x)
    b, bias = x.astype(np.float64), inits["B"].astype(np.float64)
    f = (lambda y: np.maximum(y, 0)) if relu else (lambda y: y)
    target = f(b @ inits["W"].astype(np.float64).T + bias)
    total = 0.0
    for bits in itertools.product((0, 1), repeat=x.size):
        mask = np.array(bits, dtype=bool).reshape(x.shape)
        c = np.where(mask, b, a)
        loss = np.sum(np.square(target - f(c @ w_soft.T + bias))) / x.shape[0]
        total += q ** mask.sum() * (1 - q) ** (~mask).sum() * loss
    return total


@pytest.mark.parametrize("q", [0.5, 0.25])
def test_the_quadratic_form_is_the_expectation_over_every_mask(q):
    sim, x, inits = gemm_sim(relu=False)
    objective, form, _ = objective_of(sim, x, q)
    assert form == "quadratic"
    w_soft = inits["W"].astype(np.float64) + np.array([[0.3, -0.2], [-0.1, 0.25]])
    expected = every_mask_expectation(sim, x, inits, w_soft, q, relu=False)
    # the moments are float64 sums of float32 columns and outputs: float32 rounding of the inputs bounds it
    assert objective.loss(w_soft[None], grad=False) == pytest.approx(expected, rel=1e-6)
    # without the input's variance term it would be the loss at the mean input, which is smaller
    assert objective_of(sim, x, 0.0)[0].loss(w_soft[None], grad=False) != pytest.approx(expected, rel=1e-3)


def test_the_sampled_loss_is_an_unbiased_draw_of_the_expectation():
    sim, x, inits = gemm_sim(relu=True)
    objective, form, _ = objective_of(sim, x, 0.5, seed=3)
    loss = objective.loss
    assert form == "sampled" and isinstance(loss, A.MixedSampledLoss)
    w_soft = inits["W"].astype(np.float64) + np.array([[0.3, -0.2], [-0.1, 0.25]])
    expected = every_mask_expectation(sim, x, inits, w_soft, 0.5, relu=True)
    draws = np.array([loss(w_soft[None], grad=True, value=True)[0] for _ in range(4000)])
    assert abs(draws.mean() - expected) <= 4 * draws.std() / np.sqrt(len(draws))
    assert draws.std() > 0  # the masks do vary
    # a value (no gradient) is one fixed mask's: the same every time
    assert loss(w_soft[None], grad=False) == loss(w_soft[None], grad=False)


@pytest.mark.parametrize("activation", ["clip", "silu", None])
def test_the_gradient_is_that_of_its_own_draw(activation, monkeypatch):
    rng = np.random.default_rng(7)
    g, m, k, b = 2, 3, 5, 40
    w = rng.normal(size=(g, m, k))
    a, fp = (rng.normal(size=(g, k, b)).astype(np.float32) for _ in range(2))
    z, t = (rng.normal(size=(g, m, b)).astype(np.float32) for _ in range(2))
    act = {"clip": (0.0, 2.0), "silu": traced(*ACTIVATIONS["SiLU as Mul(y, Sigmoid(y))"])}.get(activation)
    loss = A.MixedSampledLoss(a, fp, z, t, w, act, 0.5, rng)
    monkeypatch.setattr(loss, "_draws", lambda shape: loss.fixed_draws)  # the gradient's draw = the value's mask
    w_soft = w + rng.normal(size=w.shape) * 0.2
    grad = loss(w_soft)[1]
    eps, numeric = 2e-3, np.zeros_like(w_soft)
    for i in np.ndindex(w_soft.shape):
        d = np.zeros_like(w_soft)
        d[i] = eps
        numeric[i] = (loss(w_soft + d, grad=False) - loss(w_soft - d, grad=False)) / (2 * eps)
    # float32 products and central differences of step 2e-3: as test_ptq_adaround's sampled gradients
    assert np.abs(grad - numeric).max() <= 2e-3 * np.abs(numeric).max()


def test_the_layer_output_of_the_simulations_columns_is_its_output():
    """``y = W cols + bias_p`` with every mask element 0 (the simulation's columns) is ``z + (W - W_fp32) a``."""
    rng = np.random.default_rng(2)
    w = rng.normal(size=(1, 4, 6))
    a, fp = (rng.normal(size=(1, 6, 30)).astype(np.float32) for _ in range(2))
    z, t = (rng.normal(size=(1, 4, 30)).astype(np.float32) for _ in range(2))
    mixed = A.MixedSampledLoss(a, fp, z, t, w, None, 0.5, rng)
    plain = A.SampledLoss(a, z, t, w, None)
    mixed.fixed_draws = np.full(a.shape, 255, dtype=np.uint8)  # never below 128: all from the simulation
    w_soft = w + 0.1
    # float32 GEMMs of the whole weight vs of its change: a few float32 ulps of the outputs (|y| ~ 5)
    assert mixed(w_soft, grad=False) == pytest.approx(plain(w_soft, grad=False), rel=1e-5)


def test_the_mask_takes_the_fp32_input_with_its_probability_and_is_numpys_where():
    rng = np.random.default_rng(0)
    a, b = (rng.normal(size=(3, 7, 5000)).astype(np.float32) for _ in range(2))
    draws = rng.integers(0, 256, size=a.shape, dtype=np.uint8)
    for q in (0.5, 0.25, 0.1):
        threshold = A.qdrop_threshold(q)
        expected = np.where(draws < threshold, b, a)
        out = np.empty((3, 7, 2990), dtype=np.float32)
        mix_columns(a, b, draws, 10, threshold, 10, 3000, out)  # the draws of the same positions
        assert np.array_equal(out, expected[:, :, 10:3000])
        mix_columns(a, b, np.ascontiguousarray(draws[:, :, 10:3000]), 0, threshold, 10, 3000, out)  # draws of the part
        assert np.array_equal(out, expected[:, :, 10:3000])
        share = np.mean(draws < threshold)
        assert abs(share - threshold / 256) < 4 * np.sqrt(q * (1 - q) / draws.size)
    assert A.qdrop_threshold(0.5) == 128 and A.qdrop_threshold(0.1) == 26


@pytest.mark.parametrize("carry", [True, False])
def test_layer_inputs_pair_the_simulation_with_the_fp32_model(carry):
    sim, x, _ = gemm_sim(relu=True, samples=40, features=6, outputs=4)
    layer = A.find_layers(sim)[0][0]
    inputs = A.LayerInputs(sim, x, 16, carry=carry)
    batches = list(inputs.batches(layer, fp32_inputs=True))
    assert [len(batch) for batch in batches] == [4, 4, 4]
    xs, fps = np.concatenate([bt[0] for bt in batches]), np.concatenate([bt[3] for bt in batches])
    np.testing.assert_array_equal(xs, sim.run({"x": x}, outputs=["x"])["x"])
    np.testing.assert_array_equal(fps, x)


def test_adaround_with_qdrop_rounds_down_or_up_and_a_seed_repeats_it():
    codes = []
    for _ in range(2):
        sim, x, inits = gemm_sim(relu=True, samples=64, features=12, outputs=6)
        A.adaround(sim, x, num_iterations=200, qdrop=0.5, quantize_activations=True, progress=False, seed=4)
        enc = sim.encoding_of("W")
        w_q = sim.quantizers["W"].fixed_value
        ratio = inits["W"] / enc.scale.reshape(-1, 1)
        code = np.round(w_q / enc.scale.reshape(-1, 1))
        assert np.all((code == np.floor(ratio)) | (code == np.ceil(ratio)))
        codes.append(code)
    assert np.array_equal(codes[0], codes[1])


@pytest.mark.parametrize("q", [-0.1, 1.0, 1.5])
def test_a_qdrop_probability_outside_0_to_1_is_an_error(q):
    sim, x, _ = gemm_sim(relu=True)
    with pytest.raises(RefquantError, match="qdrop"):
        A.adaround(sim, x, num_iterations=5, qdrop=q, progress=False)


def test_qdrop_with_lbfgs_is_an_error_not_a_noisy_line_search():
    sim, x, _ = gemm_sim(relu=True)
    with pytest.raises(RefquantError, match="L-BFGS"):
        A.adaround(sim, x, num_iterations=5, qdrop=0.5, optimizer="lbfgs", progress=False)
