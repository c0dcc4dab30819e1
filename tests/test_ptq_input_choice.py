"""adaround(quantize_activations="choose"): the held-out split (a partition of the samples), the held-out SQNR (the
formula, recomputed with NumPy), the trials (recomputed by hand here: copy, calibrate on
the fitted part, AdaRound, recalibrate, score), the final run (bit for bit the plain run with the chosen inputs), and
the sim left as it was when the choice is interrupted.
"""

import math

import numpy as np
import pytest

import refquant
from refquant.errors import RefquantError
from refquant.ptq import input_choice as IC
from refquant.ptq.adaround import adaround
from refquant.quant import QuantSim

from .helpers import FLOAT, make_model
from .test_ptq_adaround import needs_samples, sample_sim


def fixed_values(sim):
    return {n: q.fixed_value for n, q in sim.quantizers.items() if q.fixed_value is not None}


def two_layer_model(batch=None):
    """Gemm + Relu + Gemm with N(0, 1) weights, two outputs (the hidden layer and the result)."""
    rng = np.random.default_rng(3)
    w1, w2 = rng.normal(size=(8, 12)).astype(np.float32), rng.normal(size=(12, 4)).astype(np.float32)
    from onnx import helper

    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    return refquant.load(make_model(nodes, [("x", FLOAT, [batch, 8])], [("r", FLOAT, None), ("y", FLOAT, None)],
                                    {"w1": w1, "w2": w2}))


def test_held_out_split_is_a_seeded_partition_of_the_samples_holding_out_a_quarter():
    graph = two_layer_model()
    x = np.arange(37 * 8, dtype=np.float32).reshape(37, 8)
    feeds = [{"x": x[i:i + 10]} for i in range(0, 37, 10)]  # batches of 10, 10, 10, 7
    fit, held = IC.held_out_split(feeds, graph, seed=5)
    rows = lambda part: [tuple(r) for f in part for r in f["x"]]  # noqa: E731
    assert len(rows(held)) == 37 // 4
    assert sorted(rows(fit) + rows(held)) == sorted(tuple(r) for r in x)  # every sample once
    again = IC.held_out_split(feeds, graph, seed=5)
    assert rows(again[1]) == rows(held)
    assert rows(IC.held_out_split(feeds, graph, seed=6)[1]) != rows(held)
    with pytest.raises(RefquantError, match="at least 2 samples"):
        IC.held_out_split([{"x": x[:1]}], graph)


def test_a_model_with_a_fixed_batch_size_holds_out_whole_batches():
    graph = two_layer_model(batch=4)
    feeds = [{"x": np.full((4, 8), i, np.float32)} for i in range(8)]
    fit, held = IC.held_out_split(feeds, graph, seed=0)
    assert len(held) == 2 and len(fit) == 6
    assert all(f["x"].shape == (4, 8) for f in fit + held)
    assert sorted(int(f["x"][0, 0]) for f in fit + held) == list(range(8))
    with pytest.raises(RefquantError, match="at least 2 batches"):
        IC.held_out_split(feeds[:1], graph)


def test_held_out_sqnr_is_the_mean_relative_noise_over_outputs():
    graph = two_layer_model()
    x = np.random.default_rng(0).normal(size=(32, 8)).astype(np.float32)
    sim = QuantSim(graph, precision="w4a8")
    sim.compute_encodings(x, progress=False)
    feeds = [{"x": x[:16]}, {"x": x[16:]}]
    ratios = []
    for name in ("r", "y"):
        ref = np.concatenate([sim.run_float(f)[name] for f in feeds]).astype(np.float64)
        out = np.concatenate([sim.run(f)[name] for f in feeds]).astype(np.float64)
        ratios.append(np.sum((ref - out) ** 2) / np.sum(ref ** 2))
    assert abs(10 * math.log10(ratios[0] / ratios[1])) > 1  # the mean is not either output's
    expected = -10 * math.log10(np.mean(ratios))
    assert IC.held_out_sqnr(sim, feeds) == pytest.approx(expected, rel=1e-12)  # float64 sums, other order


@needs_samples
def test_choose_scores_each_kind_as_a_trial_by_hand_and_then_runs_the_pick_on_all_the_data():
    sim, calib, _ = sample_sim("mlp")
    untouched, _, _ = sample_sim("mlp")
    report = []
    adaround(sim, calib, num_iterations=40, quantize_activations="choose", progress=False, report=report)
    choice = report[0]
    assert isinstance(choice, IC.InputChoice) and len(report) == 1 + 3  # the choice, then the three Gemms
    assert (choice.fit_samples, choice.held_out_samples) == (48, 16)

    feeds = [{"input": calib[i:i + 16]} for i in range(0, 64, 16)]
    fit, held = IC.held_out_split(feeds, untouched.graph, seed=0)
    for quantized, score in ((False, choice.sqnr_fp32_activations), (True, choice.sqnr_quantized_activations)):
        trial, _, _ = sample_sim("mlp")
        trial.compute_encodings(fit, progress=False)
        adaround(trial, fit, num_iterations=40, quantize_activations=quantized, progress=False)
        trial.compute_encodings(fit, progress=False)
        assert IC.held_out_sqnr(trial, held) == score  # the same computation, bit for bit
    assert choice.quantize_activations == (choice.sqnr_quantized_activations > choice.sqnr_fp32_activations)

    adaround(untouched, calib, num_iterations=40, quantize_activations=choice.quantize_activations, progress=False)
    ours, plain = fixed_values(sim), fixed_values(untouched)
    assert ours.keys() == plain.keys() and len(ours) == 3
    assert all(np.array_equal(ours[n], plain[n]) for n in ours)  # the trials left nothing behind in the sim


@needs_samples
def test_per_layer_scores_both_fits_of_each_layer_by_hand_and_refits_the_pick_on_all_the_data():
    """Layer by layer: each kind fitted on the held-in three quarters (a copy of the simulation as the layers
    before left it, AdaRound on that layer alone) and run on the held-out quarter with the activation quantizers on;
    the quantized kind is picked when its per-sample noise is lower by more than two standard errors of the paired
    differences, and the pick fitted again on all the samples is the rounding kept."""
    sim, calib, _ = sample_sim("mlp")
    report = []
    adaround(sim, calib, num_iterations=40, quantize_activations="per_layer", progress=False, report=report)
    assert [r.layer for r in report] == ["/l1/Gemm", "/l2/Gemm", "/l3/Gemm"]

    hand, _, _ = sample_sim("mlp")
    feeds = [{"input": calib[i:i + 16]} for i in range(0, 64, 16)]
    fit, held = IC.held_out_split(feeds, hand.graph, seed=0)
    ref = np.concatenate([hand.run_float(f)["logits"] for f in held]).astype(np.float64)
    for r in report:
        noise = []
        for quantized in (False, True):
            trial = hand.copy()
            adaround(trial, fit, num_iterations=40, quantize_activations=quantized, nodes_to_include=[r.layer],
                     progress=False)
            out = np.concatenate([trial.run(f)["logits"] for f in held]).astype(np.float64)
            noise.append(np.sum((ref - out) ** 2, axis=1) / np.sum(ref ** 2))  # per held-out sample
            # float64 sums in another order than held_out_sqnr's: equal to 1e-12
            assert -10 * np.log10(noise[-1].sum()) == pytest.approx(IC.held_out_sqnr(trial, held), rel=1e-12)
        assert r.held_out_sqnr == pytest.approx((-10 * np.log10(noise[0].sum()), -10 * np.log10(noise[1].sum())),
                                                rel=1e-12)
        d = noise[0] - noise[1]
        assert r.quantized_inputs == (d.mean() > 2 * d.std(ddof=1) / np.sqrt(len(d)))
        adaround(hand, calib, num_iterations=40, quantize_activations=r.quantized_inputs, nodes_to_include=[r.layer],
                 progress=False)
        np.testing.assert_array_equal(sim.quantizers[r.weight].fixed_value, hand.quantizers[r.weight].fixed_value)
    assert {r.quantized_inputs for r in report} == {False, True}  # both paths taken here (the last layer quantized)


def test_the_quantized_fit_wins_only_by_more_than_two_standard_errors():
    assert IC.quantized_fit_wins(np.array([2.0, 2.0, 2.0]), np.array([1.0, 1.0, 1.0]))
    # mean difference 0.5, sd 1.0: 0.5 > 2 / sqrt(n) needs n > 16
    d = np.tile([1.5, -0.5], 8)  # n = 16: mean 0.5, sd = 1.0328 (ddof 1): 2 * 1.0328 / 4 = 0.516 > 0.5
    assert not IC.quantized_fit_wins(d, np.zeros(16))
    d = np.tile([1.5, -0.5], 10)  # n = 20: 2 * 1.026 / 4.47 = 0.459 < 0.5
    assert IC.quantized_fit_wins(d, np.zeros(20))
    assert not IC.quantized_fit_wins(np.array([5.0]), np.array([0.0]))  # one sample: no error estimate
    assert not IC.quantized_fit_wins(np.ones(4), np.ones(4) * 1.5)  # worse


def test_row_noise_is_each_samples_share_of_the_mean_relative_noise():
    ref = [{"a": np.array([[1.0, 2.0], [3.0, 0.0]]), "b": np.array([[2.0], [0.0]])},
           {"a": np.array([[0.0, 1.0]]), "b": np.array([[1.0]])}]
    out = [{"a": np.array([[1.0, 1.0], [3.0, 1.0]]), "b": np.array([[1.0], [0.0]])},
           {"a": np.array([[2.0, 1.0]]), "b": np.array([[1.0]])}]
    signal = {"a": 1 + 4 + 9 + 1, "b": 4 + 1}  # S_a = 15, S_b = 5
    noise = IC.row_noise(out, ref, signal)
    # per row, / (S_o * 2 outputs): a rows 1, 1, 4 (over 30); b rows 1, 0, 0 (over 10)
    np.testing.assert_allclose(noise, [1 / 30, 1 / 30, 1 / 10, 0, 4 / 30, 0], rtol=1e-15)
    assert noise.sum() == pytest.approx(((1 + 1 + 4) / 15 + 1 / 5) / 2, rel=1e-15)


@needs_samples
def test_choose_picks_the_quantized_inputs_when_they_score_higher(monkeypatch):
    """The pick follows the scores: with the held-out score of the quantized trial forced higher, the final run
    equals quantize_activations=True."""
    scores = iter([10.0, 20.0])  # fp32 trial, quantized trial
    monkeypatch.setattr(IC, "held_out_sqnr", lambda sim, feeds: next(scores))
    sim, calib, _ = sample_sim("mlp")
    report = []
    adaround(sim, calib, num_iterations=20, quantize_activations="choose", progress=False, report=report)
    assert report[0].quantize_activations is True
    quantized, _, _ = sample_sim("mlp")
    adaround(quantized, calib, num_iterations=20, quantize_activations=True, progress=False)
    plain, _, _ = sample_sim("mlp")
    adaround(plain, calib, num_iterations=20, quantize_activations=False, progress=False)
    ours, want, other = fixed_values(sim), fixed_values(quantized), fixed_values(plain)
    assert all(np.array_equal(ours[n], want[n]) for n in want)
    assert any(not np.array_equal(want[n], other[n]) for n in want)  # the two kinds do round differently here


@needs_samples
def test_an_interrupted_choice_leaves_the_sim_as_it_was(monkeypatch):
    sim, calib, _ = sample_sim("mlp")
    before = {n: (q.enabled, q.encoding, q.frozen, q.fixed_value) for n, q in sim.quantizers.items()}

    def interrupt(sim, feeds):
        raise KeyboardInterrupt

    monkeypatch.setattr(IC, "held_out_sqnr", interrupt)
    with pytest.raises(KeyboardInterrupt):
        adaround(sim, calib, num_iterations=5, quantize_activations="choose", progress=False)
    after = {n: (q.enabled, q.encoding, q.frozen, q.fixed_value) for n, q in sim.quantizers.items()}
    assert after.keys() == before.keys()
    assert all(after[n][:3] == before[n][:3] and after[n][3] is None and before[n][3] is None for n in before)


def test_without_activation_quantizers_there_is_nothing_to_choose():
    graph = two_layer_model()
    x = np.random.default_rng(1).normal(size=(32, 8)).astype(np.float32)
    sims = []
    for mode in ("choose", "per_layer", False):
        sim = QuantSim(graph, precision="w4a8")
        for q in sim.quantizers.values():
            if q.kind != "param":
                q.enabled = False
        report = []
        adaround(sim, x, num_iterations=30, quantize_activations=mode, progress=False, report=report)
        assert all(not isinstance(r, IC.InputChoice) and r.held_out_sqnr is None for r in report)  # no trials
        sims.append(sim)
    a, b, c = (fixed_values(s) for s in sims)
    assert a.keys() == b.keys() == c.keys() and all(np.array_equal(a[n], c[n]) and np.array_equal(b[n], c[n])
                                                    for n in a)


def test_quantized_inputs_on_an_uncalibrated_sim_calibrate_it_first():
    """Before, the quantizers without an encoding passed their inputs through: quantize_activations=True silently
    ran with FP32 activations."""
    graph = two_layer_model()
    x = np.random.default_rng(2).normal(size=(64, 8)).astype(np.float32)
    runs = {}
    for name, calibrate, quantized in (("fresh", False, True), ("calibrated", True, True), ("fp32", True, False)):
        sim = QuantSim(graph, param_bw=4, output_bw=4)  # 4-bit activations: the two kinds round w2 differently
        if calibrate:
            sim.compute_encodings(x, progress=False)
        adaround(sim, x, num_iterations=300, quantize_activations=quantized, progress=False)
        runs[name] = sim
    a, b, c = (fixed_values(runs[k]) for k in ("fresh", "calibrated", "fp32"))
    assert a.keys() == b.keys() and all(np.array_equal(a[n], b[n]) for n in a)
    assert not np.array_equal(a["w2"], c["w2"])
    assert runs["fresh"].encoding_of("r") == runs["calibrated"].encoding_of("r")


@pytest.mark.parametrize("options, message", [
    ({"quantize_activations": "yes"}, "True, False, 'outputs', 'choose' or"),
    ({"quantize_activations": "choose", "qdrop": 0.5}, "does not combine with qdrop"),
    ({"quantize_activations": "per_layer", "qdrop": 0.5}, "does not combine with qdrop"),
    ({"quantize_activations": "choose", "use_fp32_inputs": True}, "does not combine"),
])
def test_bad_input_options_are_named(options, message):
    sim = QuantSim(two_layer_model(), precision="w4a8")
    with pytest.raises(RefquantError, match=message):
        adaround(sim, np.zeros((4, 8), np.float32), num_iterations=1, progress=False, **options)


def test_a_copy_of_a_sim_is_independent():
    graph = two_layer_model()
    x = np.random.default_rng(4).normal(size=(32, 8)).astype(np.float32)
    sim = QuantSim(graph, precision="w4a8")
    sim.compute_encodings(x, progress=False)
    out = sim.run({"x": x})["y"]
    twin = sim.copy()
    assert np.array_equal(twin.run({"x": x})["y"], out)
    twin.compute_encodings(x[:4] * 3, progress=False)
    adaround(twin, x, num_iterations=20, progress=False)
    assert not np.array_equal(twin.run({"x": x})["y"], out)
    assert np.array_equal(sim.run({"x": x})["y"], out)
    assert all(q.fixed_value is None for q in sim.quantizers.values())


def test_an_interrupted_run_on_an_uncalibrated_sim_leaves_it_uncalibrated(monkeypatch):
    import refquant.ptq.adaround as A

    graph = two_layer_model()
    x = np.random.default_rng(5).normal(size=(32, 8)).astype(np.float32)
    sim = QuantSim(graph, param_bw=4, output_bw=4)

    def interrupt(*args, **kwargs):
        assert sim.encoding_of("r") is not None  # calibrated by then
        raise KeyboardInterrupt

    monkeypatch.setattr(A, "adaround_layer", interrupt)
    with pytest.raises(KeyboardInterrupt):
        adaround(sim, x, num_iterations=5, quantize_activations=True, progress=False)
    assert all(sim.encoding_of(n) is None for n, q in sim.quantizers.items() if q.kind == "activation")
    assert all(q.fixed_value is None for q in sim.quantizers.values())
