"""Sequential MSE (AIMET's apply_seq_mse): the candidate ranges, the streamed losses against a brute
force on the op kernel, and on the AIMET sample models at W4A8 per channel: chosen encodings among
the candidates, each layer's loss not above min-max's, the logits SQNR above min-max's.
"""

import os
from pathlib import Path

import numpy as np
import pytest
from onnx import helper

import refquant
from refquant.errors import RefquantError
from refquant.ptq import adaround as A
from refquant.ptq import layer_inputs
from refquant.ptq import seq_mse as S
from refquant.ptq.seq_mse import seq_mse
from refquant.quant import QuantSim, from_min_max, quantize_dequantize

from .helpers import FLOAT, make_model

SHARED = Path(os.environ.get("REFQUANT_SHARED", "/work/shared"))
SAMPLES = SHARED / "refs" / "aimet_samples"
needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"AIMET samples not found at {SAMPLES}")
MODELS = {"convnet": "model_bnfolded.onnx", "mlp": "model.onnx"}


def sample_sim(entry, precision="w4a8"):
    sim = QuantSim(refquant.load(SAMPLES / entry / MODELS[entry]), precision=precision)
    calib = np.load(SAMPLES / entry / "calib.npz")["input"]
    sim.compute_encodings(calib, progress=False)
    return sim, calib, np.load(SAMPLES / entry / "eval.npz")["input"]


def sqnr(ref, out):
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    return 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - out) ** 2))


def logits_sqnr(sim, data):
    return sqnr(sim.run_float({"input": data})["logits"], sim.run({"input": data})["logits"])


def weight_quantizers(sim):
    return {n: q for n, q in sim.quantizers.items() if q.kind == "param" and q.enabled}


# ----------------------------------------------------------------------------------- candidates
@pytest.mark.parametrize("symmetric", [True, False])
def test_candidates_are_the_encoding_range_shrunk_and_the_last_is_the_encoding(symmetric):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 20)) * np.linspace(0.1, 2, 6)[:, None] + (0 if symmetric else 0.5)
    enc = from_min_max(w.min(axis=1), w.max(axis=1), 4, symmetric, axis=0)

    class Q:  # the quantizer settings candidate encodings follow
        strict_symmetric = unsigned_symmetric = False

    Q.symmetric = symmetric
    candidates = S.candidate_encodings(enc, Q, 20)
    np.testing.assert_array_equal(candidates[-1].scale, enc.scale)
    np.testing.assert_array_equal(candidates[-1].offset, enc.offset)
    for i, cand in enumerate(candidates):
        np.testing.assert_allclose(cand.min, enc.min * (i + 1) / 20, rtol=1e-6)
        np.testing.assert_allclose(cand.max, enc.max * (i + 1) / 20, rtol=1e-6, atol=1e-12)
        if symmetric:  # scale_i = scale (i+1)/n, rounded to float32 as AIMET stores symmetric scales
            np.testing.assert_array_equal(cand.scale, (enc.scale * (i + 1) / 20).astype(np.float32))


# ----------------------------------------------------------------------------------- losses
@pytest.mark.parametrize("form", ["auto", "direct", "moments", "switch"])
@pytest.mark.parametrize("loss", ["mse", "l1", "sqnr"])
@pytest.mark.parametrize("op", ["conv", "gemm"])
def test_streamed_losses_equal_a_brute_force_on_the_op_kernel(loss, op, form, monkeypatch):
    """Each form of the sum (candidate_losses): direct, moments, and "switch" = direct for the first 100 positions
    and the moments for the rest (what "auto" does past the break-even count)."""
    if form == "switch":
        monkeypatch.setattr(S, "direct_position_limit", lambda *shape: 100)
    rng = np.random.default_rng(1)
    if op == "conv":
        node = helper.make_node("Conv", ["x", "W", "B"], ["y"], pads=[1, 1, 1, 1], strides=[2, 2])
        x = (rng.normal(size=(40, 1, 7, 7)) + 0.5 * rng.normal(size=(40, 3, 7, 7))).astype(np.float32)
        inits = {"W": rng.normal(size=(5, 3, 3, 3)).astype(np.float32), "B": rng.normal(size=5).astype(np.float32)}
    else:
        node = helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=0, alpha=0.7)
        x = (rng.normal(size=(300, 1)) + 0.5 * rng.normal(size=(300, 6))).astype(np.float32)
        inits = {"W": rng.normal(size=(6, 4)).astype(np.float32), "B": rng.normal(size=4).astype(np.float32)}
    model = make_model([node], [("x", FLOAT, ["N", *x.shape[1:]])], [("y", FLOAT, None)], inits)
    sim = QuantSim(refquant.load(model), precision="w4a8")
    sim.compute_encodings(x, progress=False)
    (layer,), _ = A.find_layers(sim)
    candidates = S.candidate_encodings(sim.encoding_of("W"), sim.quantizers["W"], 8)
    A.disable_activation_quantizers(sim)
    got = S.candidate_losses(sim, layer, A.LayerInputs(sim, x, 16), candidates, loss,
                             form="auto" if form == "switch" else form)
    # brute force: run the node with each candidate's weight on the whole set, per output channel
    session = refquant.Session(sim.graph)
    target = session.run({"x": x})["y"].astype(np.float64)
    axis = 1  # the output channels of Conv [N, M, H, W] and of Gemm [N, M]
    for i, enc in enumerate(candidates):
        session.set_constant("W", quantize_dequantize(inits["W"], enc, sim.rounding))
        err = session.run({"x": x})["y"].astype(np.float64) - target
        reduce = tuple(a for a in range(err.ndim) if a != axis)
        if loss == "mse":
            want = np.mean(err ** 2, axis=reduce)
        elif loss == "l1":
            want = np.mean(np.abs(err), axis=reduce)
        else:
            want = -10 * np.log10(np.mean(target ** 2, axis=reduce) / (np.mean(err ** 2, axis=reduce) + 1e-10))
        np.testing.assert_allclose(got[i], want, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("form", ["direct", "moments"])
@pytest.mark.parametrize("loss", ["mse", "l1", "sqnr"])
def test_asym_losses_compare_with_the_fp32_models_output_on_the_simulations_input(loss, form):
    """inp_symmetry="asym" (AIMET's option): layer 2's input is the simulation's (layer 1's weight
    quantized), the target the FP32 model's layer 2 output; brute force: layer 2 alone with each
    candidate weight on that input, against the FP32 model run on the same data."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Gemm", ["x", "W1", "B1"], ["h"], transB=1),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "W2", "B2"], ["y"], transB=1)]
    inits = {"W1": rng.normal(size=(8, 6)).astype(np.float32), "B1": rng.normal(size=8).astype(np.float32),
             "W2": rng.normal(size=(5, 8)).astype(np.float32), "B2": rng.normal(size=5).astype(np.float32)}
    x = rng.normal(size=(200, 6)).astype(np.float32)
    sim = QuantSim(refquant.load(make_model(nodes, [("x", FLOAT, ["N", 6])], [("y", FLOAT, None)], inits)),
                   precision="w4a8")
    sim.compute_encodings(x, progress=False)
    layers, _ = A.find_layers(sim)
    second = layers[1]
    candidates = S.candidate_encodings(sim.encoding_of("W2"), sim.quantizers["W2"], 8)
    A.disable_activation_quantizers(sim)
    got = S.candidate_losses(sim, second, A.LayerInputs(sim, x, 16), candidates, loss, fp32_target=True, form=form)
    target = refquant.Session(sim.graph).run({"x": x})["y"].astype(np.float64)  # the FP32 model
    r = sim.run({"x": x}, outputs=["r"])["r"]  # layer 2's input with W1 quantized
    assert not np.allclose(r, refquant.Session(sim.graph).run({"x": x}, outputs=["r"])["r"], rtol=1e-2)
    for i, enc in enumerate(candidates):
        w2 = quantize_dequantize(inits["W2"], enc, sim.rounding).astype(np.float64)
        err = r.astype(np.float64) @ w2.T + inits["B2"] - target
        if loss == "mse":
            want = np.mean(err ** 2, axis=0)
        elif loss == "l1":
            want = np.mean(np.abs(err), axis=0)
        else:
            want = -10 * np.log10(np.mean(target ** 2, axis=0) / (np.mean(err ** 2, axis=0) + 1e-10))
        # float32 layer outputs against a float64 brute force: relative 1e-4 of each channel's loss
        np.testing.assert_allclose(got[i], want, rtol=1e-4, atol=1e-9)


def test_direct_position_limit_is_the_flop_break_even():
    """n m k P = k^2 P + n m k^2 at P = n m k / (n m - k); the direct form always when n m <= k or H is too big."""
    n, m, k = 20, 96, 576
    limit = S.direct_position_limit(n, 1, m, k)
    assert n * m * k * limit == pytest.approx(k * k * limit + n * m * k * k)
    assert S.direct_position_limit(20, 1, 10, 1280) == np.inf  # a 10-class head on 1280 features
    assert S.direct_position_limit(20, 1, 4096, 25088) == np.inf  # VGG's fc6: H would be 5 GB


def test_a_layer_too_big_for_h_or_for_all_deltas_gives_the_same_losses_without_them(monkeypatch):
    """With H over MOMENTS_BUDGET and the candidates' dW over DELTAS_BUDGET, candidate_losses takes the direct form
    and remakes each dW when used: the same losses as the moments form (float64 sums in another order)."""
    rng = np.random.default_rng(4)
    node = helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=1)
    x = rng.normal(size=(50, 12)).astype(np.float32)
    inits = {"W": rng.normal(size=(5, 12)).astype(np.float32), "B": rng.normal(size=5).astype(np.float32)}
    sim = QuantSim(refquant.load(make_model([node], [("x", FLOAT, ["N", 12])], [("y", FLOAT, None)], inits)),
                   precision="w4a8")
    sim.compute_encodings(x, progress=False)
    (layer,), _ = A.find_layers(sim)
    candidates = S.candidate_encodings(sim.encoding_of("W"), sim.quantizers["W"], 8)
    A.disable_activation_quantizers(sim)
    want = S.candidate_losses(sim, layer, A.LayerInputs(sim, x, 16), candidates, "mse", form="moments")
    monkeypatch.setattr(S, "MOMENTS_BUDGET", 12 * 12 - 1)
    monkeypatch.setattr(S, "DELTAS_BUDGET", 8 * 60 - 1)

    def no_moments(*args):
        raise AssertionError("H was built")

    monkeypatch.setattr(A._Moments, "add", no_moments)
    made = []
    real_make = S._Deltas._make
    monkeypatch.setattr(S._Deltas, "_make", lambda self, enc: made.append(enc) or real_make(self, enc))
    got = S.candidate_losses(sim, layer, A.LayerInputs(sim, x, 16), candidates, "mse")
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-15)
    assert len(made) == 8 * 4  # 50 samples in batches of 16: every candidate's dW made again for each batch


def test_quantized_activations_keep_the_activation_quantizers_during_the_search(monkeypatch):
    """With quantized_activations=True the layer inputs are the simulation's with its activation
    quantizers on; by default (AIMET) they are off while searching. Afterwards they are restored."""
    rng = np.random.default_rng(3)
    node = helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)
    x = rng.normal(size=(64, 6)).astype(np.float32)
    sim = QuantSim(refquant.load(make_model([node], [("x", FLOAT, ["N", 6])], [("y", FLOAT, None)],
                                            {"W": rng.normal(size=(4, 6)).astype(np.float32)})), precision="w4a8")
    sim.compute_encodings(x, progress=False)
    seen = {}

    def spy(sim_, layer, inputs, *args, **kwargs):
        seen["x"] = np.concatenate([b[0] for b in inputs.batches(layer, fp32_target=False)])
        raise KeyboardInterrupt

    monkeypatch.setattr(S, "candidate_losses", spy)
    quantized_x = quantize_dequantize(x, sim.encoding_of("x"), sim.rounding)
    assert not np.array_equal(quantized_x, x)
    for on in (False, True):
        with pytest.raises(KeyboardInterrupt):
            seq_mse(sim, x, progress=False, quantized_activations=on)
        np.testing.assert_array_equal(seen["x"], quantized_x if on else x)
        assert sim.quantizers["x"].enabled


# ----------------------------------------------------------------------------------- AIMET samples
@needs_samples
@pytest.mark.parametrize("entry", ["convnet", "mlp"])
def test_chosen_encodings_are_candidates_and_frozen(entry):
    sim, calib, _ = sample_sim(entry)
    original = {n: sim.encoding_of(n) for n in weight_quantizers(sim)}
    report = []
    seq_mse(sim, calib, progress=False, report=report)
    assert len(report) == len(original)
    shrunk = 0
    for name, enc in original.items():
        q = sim.quantizers[name]
        chosen = sim.encoding_of(name)
        assert q.frozen and chosen.axis == enc.axis and chosen.bitwidth == 4
        candidates = S.candidate_encodings(enc, q, 20)
        scales = np.stack([c.scale for c in candidates])  # [candidates, channels]
        offsets = np.stack([c.offset for c in candidates])
        match = (scales == chosen.scale[None]) & (offsets == chosen.offset[None])
        assert match.any(axis=0).all(), name
        shrunk += np.sum(chosen.scale < enc.scale)
    assert shrunk > 0  # some ranges did shrink


@needs_samples
@pytest.mark.parametrize("entry", ["convnet", "mlp"])
def test_each_layer_loss_is_not_above_min_max(entry):
    """Independent of the search: with inp_symmetry="symqt" (AIMET's default), each layer on its input
    in the sim after SeqMSE (weights of the layers before at their chosen encodings, activations
    unquantized, as during the search), squared error of the layer output against the FP32 weight's,
    with the chosen encoding and with min-max's."""
    sim, calib, _ = sample_sim(entry)
    layers, _ = A.find_layers(sim)
    min_max = {layer.weight: sim.encoding_of(layer.weight) for layer in layers}
    seq_mse(sim, calib, progress=False, inp_symmetry="symqt")
    for q in sim.quantizers.values():
        if q.kind != "param":
            q.disable()
    improved = 0
    for layer in layers:
        x = sim.run({"input": calib}, outputs=[layer.input])[layer.input]
        probe = layer_inputs._probe(sim, layer)
        target = probe.run({layer.input: x})["y"].astype(np.float64)
        w = sim.graph.initializers[layer.weight]

        def error(enc):
            probe.set_constant(layer.weight, quantize_dequantize(w, enc, sim.rounding))
            return np.sum((probe.run({layer.input: x})["y"] - target) ** 2)

        chosen, reference = error(sim.encoding_of(layer.weight)), error(min_max[layer.weight])
        assert chosen <= reference * (1 + 1e-6), layer.name
        improved += chosen < 0.9 * reference
    assert improved >= len(layers) - 1


@needs_samples
@pytest.mark.parametrize("entry, inp_symmetry, at_least", [
    ("convnet", "asym", 34.0), ("mlp", "asym", 24.0), ("convnet", "symqt", 27.0), ("mlp", "symqt", 24.0)])
def test_seq_mse_raises_the_logits_sqnr(entry, inp_symmetry, at_least):
    sim, calib, ev = sample_sim(entry)
    before = logits_sqnr(sim, ev)
    seq_mse(sim, calib, progress=False, inp_symmetry=inp_symmetry)
    sim.compute_encodings(calib, progress=False)  # activation ranges for the new weight grids
    after = logits_sqnr(sim, ev)
    # measured: asym (default) 22.18 -> 35.97, 23.15 -> 24.47 dB; symqt 22.18 -> 27.88, 23.15 -> 24.35 dB
    assert after > before + 0.8 and after > at_least


def weight_encodings(sim):
    return {n: sim.encoding_of(n) for n in weight_quantizers(sim)}


def same_encodings(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[n].scale, b[n].scale) and np.array_equal(a[n].offset, b[n].offset)
                                        for n in a)


def search_output_sqnr(sim, calib):
    """The outputs' SQNR as the search sees the sim: weights quantized, activation quantizers off."""
    with A.SimState(sim):
        A.disable_activation_quantizers(sim)
        return sqnr(sim.run_float({"input": calib})["logits"], sim.run({"input": calib})["logits"])


@needs_samples
@pytest.mark.parametrize("entry", ["convnet", "mlp"])
def test_auto_keeps_the_target_with_the_higher_output_sqnr(entry):
    """Each target run alone and scored here; "auto" must end with the encodings of the better one and
    report both scores."""
    scores, encodings = {}, {}
    for target in ("asym", "symqt"):
        sim, calib, _ = sample_sim(entry)
        seq_mse(sim, calib, progress=False, inp_symmetry=target)
        scores[target], encodings[target] = search_output_sqnr(sim, calib), weight_encodings(sim)
    sim, calib, _ = sample_sim(entry)
    report = []
    seq_mse(sim, calib, progress=False, report=report)  # default "auto"
    best = max(scores, key=scores.get)
    assert same_encodings(weight_encodings(sim), encodings[best])
    assert {r.inp_symmetry for r in report} == {best}
    for target, value in scores.items():
        # the search scores batches of 16, this test one batch of 64: the kernels' float sums may differ
        assert report[0].target_scores[target] == pytest.approx(value, abs=1e-3)
    assert abs(scores["asym"] - scores["symqt"]) > 0.05  # the two targets do differ on these models


@needs_samples
def test_auto_scores_alike_with_and_without_cached_activations():
    """The output SQNR comes from the carried tensors (cache_activations=True) or from sim.run/run_float per batch
    (False): the same choice, encodings and scores (the same kernels on the same batches)."""
    results = []
    for carry in (True, False):
        sim, calib, _ = sample_sim("convnet")
        report = []
        seq_mse(sim, calib, progress=False, cache_activations=carry, report=report)
        results.append((weight_encodings(sim), report[0].target_scores))
    assert same_encodings(results[0][0], results[1][0])
    assert results[0][1].keys() == results[1][1].keys() == {"asym", "symqt"}
    for target in ("asym", "symqt"):
        assert results[0][1][target] == pytest.approx(results[1][1][target], abs=1e-6)


@needs_samples
def test_auto_searches_each_target_from_the_same_start(monkeypatch):
    """With the score rigged so that "symqt" (the second pass) wins, the result is exactly a "symqt"
    run's: the first pass's encodings did not leak into the second."""
    sim, calib, _ = sample_sim("convnet")
    seq_mse(sim, calib, progress=False, inp_symmetry="symqt")
    expected = weight_encodings(sim)
    rigged = iter([10.0, 20.0])
    monkeypatch.setattr(A.LayerInputs, "output_sqnr", lambda self: next(rigged))
    sim, calib, _ = sample_sim("convnet")
    seq_mse(sim, calib, progress=False, inp_symmetry="auto")
    assert same_encodings(weight_encodings(sim), expected)
    assert all(sim.quantizers[n].frozen for n in expected)


@needs_samples
def test_frozen_weight_encodings_are_left_alone():
    sim, calib, _ = sample_sim("mlp")
    kept = sim.encoding_of("l2.weight")
    sim.set_encoding("l2.weight", kept)  # frozen by hand
    with pytest.warns(UserWarning, match="frozen"):
        seq_mse(sim, calib, progress=False)
    assert sim.encoding_of("l2.weight") is kept
    assert sim.encoding_of("l1.weight") is not kept and sim.quantizers["l1.weight"].frozen


@needs_samples
@pytest.mark.parametrize("at_call", [3, 8])  # convnet has 5 layers: "auto"'s first pass, then its second
def test_an_interruption_leaves_the_sim_as_it_was(monkeypatch, at_call):
    sim, calib, ev = sample_sim("convnet")
    before = sim.run({"input": ev})["logits"]
    state = {n: (q.enabled, q.encoding, q.frozen, q.fixed_value) for n, q in sim.quantizers.items()}
    calls = []
    real = S.candidate_losses

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == at_call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(S, "candidate_losses", interrupted)
    with pytest.raises(KeyboardInterrupt):
        seq_mse(sim, calib, progress=False)
    assert len(calls) == at_call
    assert {n: (q.enabled, q.encoding, q.frozen, q.fixed_value) for n, q in sim.quantizers.items()} == state
    np.testing.assert_array_equal(sim.run({"input": ev})["logits"], before)


def test_bad_arguments_are_refquant_errors():
    node = helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)
    sim = QuantSim(refquant.load(make_model([node], [("x", FLOAT, [2, 3])], [("y", FLOAT, None)],
                                            {"W": np.ones((2, 3), np.float32)})), precision="w8a8")
    with pytest.raises(RefquantError, match="loss"):
        seq_mse(sim, np.zeros((2, 3), np.float32), loss="huber")
    with pytest.raises(RefquantError, match="num_candidates"):
        seq_mse(sim, np.zeros((2, 3), np.float32), num_candidates=0)
    with pytest.raises(RefquantError, match="inp_symmetry"):
        seq_mse(sim, np.zeros((2, 3), np.float32), inp_symmetry="sym")
