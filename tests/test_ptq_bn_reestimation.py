"""BatchNormalization re-estimation: exact streamed statistics, the AIMET sample convnet whose BN
statistics were deliberately perturbed, and the quantized path."""

import os
from pathlib import Path

import numpy as np
import pytest
from onnx import helper

import refquant
from refquant.errors import FeedError
from refquant.ptq.bn_reestimation import ChannelMoments, batchnorms, prefold_quantizers, reestimate_batchnorm
from refquant.quant import QuantSim

from .helpers import FLOAT, make_model

SHARED = Path(os.environ.get("REFQUANT_SHARED", "/work/shared"))
SAMPLES = SHARED / "refs" / "aimet_samples"
needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"AIMET samples not found at {SAMPLES}")


def convnet_sim(precision="w8a8"):
    graph = refquant.load(SAMPLES / "convnet" / "model.onnx")  # BNs unfolded, statistics perturbed
    calib = np.load(SAMPLES / "convnet" / "calib.npz")["input"]
    sim = QuantSim(graph, precision=precision, prepare=False)  # preparation would fold the BNs
    sim.compute_encodings(calib, progress=False)
    return sim, calib


def statistics_by_hand(graph, data_batches):
    """Sequential, as re-estimation defines it: each BN's input gathered whole with a Session hook over
    the model whose earlier BNs already carry their new statistics; numpy's mean and (population) var."""
    graph = graph.copy()
    result = {}
    for bn in batchnorms(graph):
        seen = []

        def hook(name, array, node, wanted=bn.inputs[0]):
            if name == wanted:
                seen.append(array.astype(np.float64))

        session = refquant.Session(graph)
        for batch in data_batches:
            session.run({"input": batch}, hooks=[hook])
        x = np.concatenate(seen)
        mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
        graph.initializers[bn.inputs[3]] = mean.astype(np.float32)
        graph.initializers[bn.inputs[4]] = var.astype(np.float32)
        result[bn.name] = (mean, var)
    return result


def sqnr_db(ref, out):
    ref, out = ref.astype(np.float64), out.astype(np.float64)
    return 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - out) ** 2))


# --------------------------------------------------------------------------------- statistics
def test_channel_moments_streamed_and_merged_equal_numpy_without_cancellation():
    rng = np.random.default_rng(0)
    # a mean 1e4 times the spread: E[x^2] - E[x]^2 in float64 would lose about 8 of 16 digits
    x = 1e4 + rng.normal(size=(37, 3, 5, 4)) * np.array([1.0, 0.01, 3.0])[None, :, None, None]
    whole = ChannelMoments()
    for start in range(0, len(x), 6):
        whole.update(x[start:start + 6])
    a, b = ChannelMoments(), ChannelMoments()
    a.update(x[:11])
    b.update(x[11:20])
    b.update(x[20:])
    a.merge(b)
    for moments in (whole, a):
        assert moments.count == 37 * 5 * 4
        np.testing.assert_allclose(moments.mean, x.mean(axis=(0, 2, 3)), rtol=1e-14)
        np.testing.assert_allclose(moments.variance, x.var(axis=(0, 2, 3)), rtol=1e-9)


@needs_samples
def test_fp32_reestimation_gives_numpys_statistics_of_the_bn_inputs():
    sim, calib = convnet_sim()
    for quantizer in sim.quantizers.values():
        quantizer.disable()  # the FP32 path
    old = {name: sim.graph.initializers[name].copy() for bn in batchnorms(sim.graph) for name in bn.inputs[3:5]}
    expected = statistics_by_hand(sim.graph, [calib[i:i + 16] for i in range(0, len(calib), 16)])
    result = reestimate_batchnorm(sim, calib, batch_size=10, progress=False, fold=False)  # batches differ on purpose
    assert result is sim  # updated in place
    graph = sim.graph
    for bn in batchnorms(graph):
        mean, var = expected[bn.name]
        np.testing.assert_allclose(graph.initializers[bn.inputs[3]], mean, rtol=1e-6, atol=1e-7 * np.abs(mean).max())
        np.testing.assert_allclose(graph.initializers[bn.inputs[4]], var, rtol=1e-6)
        # the perturbed statistics really were wrong: the re-estimate moved them
        assert np.abs(old[bn.inputs[4]] - var).max() > 0.1


def folded_sqnr_vs_own_fp32(graph, precision, calib, evaluation):
    """A fresh QuantSim on a folded graph, calibrated, against that graph's own FP32 output (eval)."""
    sim = QuantSim(graph.copy(), precision=precision)
    sim.compute_encodings(calib, progress=False)
    return sqnr_db(sim.run_float({"input": evaluation})["logits"], sim.run({"input": evaluation})["logits"])


@needs_samples
def test_quantized_reestimation_recentres_the_bn_outputs_and_quantizes_better_than_fp32_statistics():
    """Measured on convnet (calibration 64 samples, SQNR of the logits on the 128 eval samples).
    Sum over channels of |E[BN output] - beta| per BN in the W4A8 simulation (pre-fold QDQs bypassed):
    before [4.01, 27.5, 20.8, 23.5] -> after [0.00, 0.21, 0.35, 0.15].
    Folded graph, fresh QuantSim, SQNR vs its own FP32, statistics re-estimated in FP32 / in the
    quantized model (default) / in the quantized model with observe_folded=False:
      W4A8 16.21 / 15.17 / 16.72 dB;  W8A8 39.12 / 40.16 / 32.19 dB;  W8A16 49.07 / 49.07 / 49.01 dB
    (2026-11-26, with AIMET's signed grids for all-positive weight channels; with unsigned ones W4A8 was
    16.21 / 17.48 / 6.96: at 4 bits the folded grids move so much that neither way of observing wins reliably,
    so the SQNR claims are checked at W8A8).
    (The model with the original, perturbed statistics scores 22.18 dB at W4A8, but it is another
    function: FP32 with and without re-estimation agree to only 1.6 dB SQNR.)"""
    evaluation = np.load(SAMPLES / "convnet" / "eval.npz")["input"]
    sim, calib = convnet_sim("w4a8")
    bns = batchnorms(sim.graph)
    bypassed = prefold_quantizers(sim, bns)
    assert [q.tensor for q in bypassed] == [bn.inputs[0] for bn in bns]  # every conv output before a BN

    def distance_from_beta():
        for quantizer in bypassed:
            quantizer.disable()
        outs = sim.run({"input": calib}, outputs=[bn.outputs[0] for bn in bns])
        for quantizer in bypassed:
            quantizer.enable()
        return np.array([np.abs(outs[bn.outputs[0]].astype(np.float64).mean(axis=(0, 2, 3))
                                - sim.graph.initializers[bn.inputs[2]]).sum() for bn in bns])

    before = distance_from_beta()
    reestimate_batchnorm(sim, calib, progress=False, fold=False)  # keep the BNs to look at their outputs
    after = distance_from_beta()
    assert all(q.enabled for q in bypassed)  # the simulation is left as it was given
    assert np.all(after * 10 < before), (before, after)

    sim_fp32, _ = convnet_sim("w8a8")
    for quantizer in sim_fp32.quantizers.values():
        quantizer.disable()
    fp32_statistics = folded_sqnr_vs_own_fp32(reestimate_batchnorm(sim_fp32, calib, progress=False).graph, "w8a8",
                                              calib, evaluation)
    sim, _ = convnet_sim("w8a8")
    quantized_statistics = folded_sqnr_vs_own_fp32(reestimate_batchnorm(sim, calib, progress=False).graph, "w8a8",
                                                   calib, evaluation)
    assert quantized_statistics > fp32_statistics + 0.5, (quantized_statistics, fp32_statistics)

    sim, _ = convnet_sim("w8a8")
    through_qdq = reestimate_batchnorm(sim, calib, progress=False, observe_folded=False).graph
    assert folded_sqnr_vs_own_fp32(through_qdq, "w8a8", calib, evaluation) < quantized_statistics - 5


@needs_samples
def test_the_simulation_is_folded_in_place_and_is_then_a_simulation_of_the_folded_graph():
    """After re-estimation the sim simulates the folded graph (the issue: techniques on a QuantSim update it in
    place and return it): it runs at once, and once calibrated again it is bit for bit a fresh QuantSim of that
    graph calibrated the same way."""
    unfolded_sim, calib = convnet_sim()
    unfolded = reestimate_batchnorm(unfolded_sim, calib, progress=False, fold=False).graph  # the new statistics
    sim, calib = convnet_sim()
    before = {name: q.encoding for name, q in sim.quantizers.items() if q.kind == "activation"}
    assert reestimate_batchnorm(sim, calib, progress=False) is sim
    assert not any(n.op_type == "BatchNormalization" for n in sim.graph.nodes)
    x = np.load(SAMPLES / "convnet" / "eval.npz")["input"][:32]
    reference = refquant.Session(unfolded).run({"input": x})["logits"]  # unfolded, with the new statistics
    np.testing.assert_allclose(sim.run_float({"input": x})["logits"], reference, rtol=1e-4, atol=1e-4 * np.abs(
        reference).max())  # folding is exact up to float32 rounding of the folded weights
    # placed alike in both graphs (the Relu outputs, the input...): their encodings stay until recalibration; a
    # conv output fed a BN and was quantized, it feeds the Relu now (a supergroup: no quantizer on)
    kept = [name for name in before if name in sim.quantizers and sim.quantizers[name].enabled]
    assert "/relu/Relu_output_0" in kept and all(sim.quantizers[name].encoding is before[name] for name in kept)
    assert not sim.quantizers["/c1/Conv_output_0"].enabled
    assert np.isfinite(sim.run({"input": x})["logits"]).all()  # the folded layers' weight encodings exist
    sim.compute_encodings(calib, progress=False)
    fresh = QuantSim(sim.graph.copy(), precision="w8a8", prepare=False)
    fresh.compute_encodings(calib, progress=False)
    assert set(fresh.quantizers) == set(sim.quantizers)
    np.testing.assert_array_equal(sim.run({"input": x})["logits"], fresh.run({"input": x})["logits"])


# --------------------------------------------------------------------------------- edge cases
def test_model_without_batchnorm_warns_and_comes_back_unchanged():
    rng = np.random.default_rng(1)
    node = helper.make_node("Gemm", ["input", "W", "B"], ["y"], transB=1)
    w, b = rng.normal(size=(5, 8)).astype(np.float32), rng.normal(size=5).astype(np.float32)
    graph = refquant.load(make_model([node], [("input", FLOAT, ["N", 8])], [("y", FLOAT, ["N", 5])],
                                     {"W": w, "B": b}))
    sim = QuantSim(graph, precision="w8a8")
    data = rng.normal(size=(16, 8)).astype(np.float32)
    sim.compute_encodings(data, progress=False)
    with pytest.warns(UserWarning, match="nothing to re-estimate"):
        result = reestimate_batchnorm(sim, data, progress=False)
    assert result is sim and [n.op_type for n in sim.graph.nodes] == ["Gemm"]
    np.testing.assert_array_equal(sim.graph.initializers["W"], w)
    np.testing.assert_array_equal(sim.graph.initializers["B"], b)


@needs_samples
def test_bad_data_is_a_feed_error_and_changes_nothing():
    sim, calib = convnet_sim()
    names = [name for bn in batchnorms(sim.graph) for name in bn.inputs[3:5]]
    old = {name: sim.graph.initializers[name].copy() for name in names}
    bad = calib[:16].copy()
    bad[5, 1, 2, 3] = np.inf
    with pytest.raises(FeedError, match="NaN or Inf"):
        reestimate_batchnorm(sim, bad, progress=False, fold=False)
    with pytest.raises(FeedError, match="shape"):
        reestimate_batchnorm(sim, calib[:, :2], progress=False, fold=False)
    assert all(np.array_equal(sim.graph.initializers[name], array) for name, array in old.items())


@needs_samples
def test_interrupt_midway_restores_the_statistics_in_the_simulation_and_its_fp32():
    sim, calib = convnet_sim()
    names = [name for bn in batchnorms(sim.graph) for name in bn.inputs[3:5]]
    old = {name: sim.graph.initializers[name].copy() for name in names}
    x = calib[:8]
    out_before, float_before = sim.run({"input": x})["logits"], sim.run_float({"input": x})["logits"]
    batches = [calib[i:i + 16] for i in range(0, len(calib), 16)]
    served = [0]

    def data():  # one pass per BN; Ctrl-C during the third BN's pass
        for batch in batches:
            served[0] += 1
            if served[0] == 2 * len(batches) + 3:
                raise KeyboardInterrupt
            yield batch

    enabled = {name: q.enabled for name, q in sim.quantizers.items()}
    with pytest.raises(KeyboardInterrupt):
        reestimate_batchnorm(sim, data, progress=False, fold=False)
    assert {name: q.enabled for name, q in sim.quantizers.items()} == enabled
    assert all(np.array_equal(sim.graph.initializers[name], array) for name, array in old.items())
    np.testing.assert_array_equal(sim.run({"input": x})["logits"], out_before)
    np.testing.assert_array_equal(sim.run_float({"input": x})["logits"], float_before)


@needs_samples
def test_a_failing_fold_leaves_the_simulation_as_it_was_given(monkeypatch):
    """The statistics are set before the fold: an error in the fold puts them back too."""
    from refquant.ptq import bn_fold

    sim, calib = convnet_sim()
    names = [name for bn in batchnorms(sim.graph) for name in bn.inputs[3:5]]
    old = {name: sim.graph.initializers[name].copy() for name in names}
    x = calib[:8]
    out_before = sim.run({"input": x})["logits"]

    def broken(*args, **kwargs):
        raise RuntimeError("fold failed")

    monkeypatch.setattr(bn_fold, "fold_batchnorms_info", broken)
    with pytest.raises(RuntimeError, match="fold failed"):
        reestimate_batchnorm(sim, calib, progress=False)
    assert all(np.array_equal(sim.graph.initializers[name], array) for name, array in old.items())
    np.testing.assert_array_equal(sim.run({"input": x})["logits"], out_before)
