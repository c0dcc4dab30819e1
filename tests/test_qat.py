"""Quantization-aware training (refquant.qat): the training forward is the sim's, training lowers the
distillation loss and raises the sim's SQNR against the FP32 model (measured), range learning writes
learned encodings, checkpoints resume exactly, and the CLI runs end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import TensorProto, helper

import refquant
from refquant.runtime import Session
from refquant.train.cli import fp32_sqnr
from refquant.train.losses import cross_entropy, kl_distill, mse_distill, sqnr_distill
from refquant.train.qat import training_setup

from .helpers import make_model

FLOAT = TensorProto.FLOAT


def small_convnet(seed: int = 0):
    """x[N,3,8,8] -> Conv 3x3 (8) -> Relu -> Conv 3x3 s2 (8) -> Relu -> GlobalAveragePool -> Flatten -> Gemm (4)."""
    rng = np.random.default_rng(seed)
    inits = {"w1": rng.normal(size=(8, 3, 3, 3)) * 0.3, "b1": rng.normal(size=8) * 0.1,
             "w2": rng.normal(size=(8, 8, 3, 3)) * 0.2, "b2": rng.normal(size=8) * 0.1,
             "wf": rng.normal(size=(4, 8)) * 0.5, "bf": rng.normal(size=4) * 0.1}
    inits = {k: v.astype(np.float32) for k, v in inits.items()}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c2"], ["r2"]), helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]), helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1)]
    model = make_model(nodes, [("x", FLOAT, ["N", 3, 8, 8])], [("y", FLOAT, ["N", 4])], inits)
    data = rng.normal(size=(48, 3, 8, 8)).astype(np.float32)
    return model, data


def calibrated(precision="w4a4", seed=0):
    model, data = small_convnet(seed)
    graph = refquant.load(model)
    sim = refquant.QuantSim(graph, precision=precision)
    sim.compute_encodings(data, batch_size=16, progress=False)
    return sim, data, Session(graph.copy())


def distill_loss(sim, reference, data) -> float:
    return mse_distill(sim.run({"x": data}), reference.run({"x": data}))[0]


def test_training_forward_is_the_sims_forward_bit_for_bit():
    sim, data, _ = calibrated()
    for range_learning in (False, True):
        engine, params, _, _ = training_setup(sim, range_learning)
        ours = engine.forward({"x": data[:16]}, params, record=False).outputs["y"]
        np.testing.assert_array_equal(ours, sim.run({"x": data[:16]})["y"])


def test_adaround_weights_are_the_starting_point():
    sim, data, _ = calibrated()
    enc = sim.encoding_of("w1")
    rounded_down = (np.floor(sim.graph.initializers["w1"] / enc.scale[:, None, None, None])
                    * enc.scale[:, None, None, None]).astype(np.float32)
    sim.set_quantized_parameter("w1", np.clip(rounded_down, enc.min[:, None, None, None],
                                              enc.max[:, None, None, None]).astype(np.float32))
    engine, params, _, _ = training_setup(sim)
    np.testing.assert_array_equal(params["w1"], sim.quantizers["w1"].fixed_value)
    np.testing.assert_array_equal(engine.forward({"x": data[:8]}, params, record=False).outputs["y"],
                                  sim.run({"x": data[:8]})["y"])


def test_regular_qat_lowers_the_distillation_loss_and_raises_sqnr():
    sim, data, reference = calibrated()
    loss0 = distill_loss(sim, reference, data)
    sqnr0 = fp32_sqnr(sim, reference, data, 16)["y"]
    activation_encodings = {n: sim.encoding_of(n) for n, q in sim.quantizers.items() if q.kind == "activation"}
    result = refquant.qat(sim, data, epochs=8, lr=1e-3, batch_size=16, progress=False)
    assert result.steps == 24 and len(result.losses) == 24
    loss1 = distill_loss(sim, reference, data)
    sqnr1 = fp32_sqnr(sim, reference, data, 16)["y"]
    # measured: loss 0.00599 -> 0.00398, SQNR 18.3 -> 20.0 dB (deterministic; margins for kernel changes)
    assert loss1 < 0.8 * loss0, (loss0, loss1)
    assert sqnr1 > sqnr0 + 1.0, (sqnr0, sqnr1)
    # activation encodings stayed; weight encodings follow the trained weights (min-max, per channel)
    for name, enc in activation_encodings.items():
        assert sim.encoding_of(name) is enc
    w = sim.graph.initializers["w2"].reshape(8, -1).astype(np.float64)
    # int4 symmetric (refs/aimet.md 5.1): scale = max(max / 7, -min / 8) per output channel, stored as float32
    want = np.maximum(w.max(axis=1).clip(0) / 7, -w.min(axis=1).clip(None, 0) / 8).astype(np.float32)
    np.testing.assert_array_equal(sim.encoding_of("w2").scale, want.astype(np.float64))


def test_range_learning_trains_and_writes_frozen_encodings():
    sim, data, reference = calibrated()
    loss0 = distill_loss(sim, reference, data)
    start = {n: sim.encoding_of(n) for n in ("r1", "w1")}
    result = refquant.qat(sim, data, epochs=8, lr=1e-3, batch_size=16, progress=False, range_learning=True)
    loss1 = distill_loss(sim, reference, data)
    assert loss1 < 0.85 * loss0, (loss0, loss1)  # measured 0.00599 -> 0.00464
    for name, enc in start.items():
        q = sim.quantizers[name]
        assert q.frozen and not np.array_equal(q.encoding.scale, enc.scale)
    # the sim runs the learned encodings: same outputs as the training forward with the final values
    engine, params, _, _ = training_setup(sim, range_learning=True)
    np.testing.assert_array_equal(engine.forward({"x": data}, params, record=False).outputs["y"],
                                  sim.run({"x": data})["y"])
    assert result.backward_seconds > 0 and result.forward_seconds > 0


def test_checkpoint_resume_equals_an_uninterrupted_run(tmp_path):
    class Interrupt(Exception):
        pass

    def stop_at_5(info):
        if info["step"] == 5:
            raise Interrupt

    whole, data, _ = calibrated()
    refquant.qat(whole, data, epochs=3, lr=1e-3, batch_size=16, progress=False, range_learning=True)
    parted, _, _ = calibrated()
    with pytest.raises(Interrupt):
        refquant.qat(parted, data, epochs=3, lr=1e-3, batch_size=16, progress=False, range_learning=True,
                     checkpoint_dir=tmp_path, checkpoint_every=2, callback=stop_at_5)
    fresh, _, _ = calibrated()  # a new process would start from the same calibrated sim
    result = refquant.qat(fresh, data, epochs=3, lr=1e-3, batch_size=16, progress=False, range_learning=True,
                          checkpoint_dir=tmp_path, checkpoint_every=2)
    assert result.resumed_from == 4 and result.steps == 9
    for name in whole.graph.initializers:
        np.testing.assert_array_equal(fresh.graph.initializers[name], whole.graph.initializers[name])
    for name in whole.quantizers:
        a, b = whole.encoding_of(name), fresh.encoding_of(name)
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_array_equal(a.scale, b.scale)
            np.testing.assert_array_equal(a.offset, b.offset)
    with pytest.raises(refquant.RefquantError, match="another run"):
        refquant.qat(fresh, data, epochs=3, lr=1e-3, batch_size=16, progress=False, range_learning=False,
                     checkpoint_dir=tmp_path)


def test_losses_and_their_gradients():
    s = {"y": np.array([[1.0, 2.0, 0.5]])}
    t = {"y": np.array([[0.0, 2.0, 1.5]])}
    value, grads = mse_distill(s, t, normalize=False)
    assert value == pytest.approx(2.0 / 3)
    np.testing.assert_allclose(grads["y"], [[2 / 3, 0.0, -2 / 3]])
    value, grads = kl_distill(s, t, temperature=2.0)
    p = np.exp(t["y"] / 2) / np.exp(t["y"] / 2).sum()
    q = np.exp(s["y"] / 2) / np.exp(s["y"] / 2).sum()
    assert value == pytest.approx(4 * np.sum(p * np.log(p / q)))
    np.testing.assert_allclose(grads["y"], 2 * (q - p))
    value, grad = cross_entropy(np.array([[2.0, 0.0], [0.0, 1.0]]), np.array([0, 0]))
    assert value == pytest.approx((np.log(1 + np.exp(-2.0)) + np.log(1 + np.exp(1.0))) / 2)
    soft = np.exp([[2.0, 0.0], [0.0, 1.0]]) / np.exp([[2.0, 0.0], [0.0, 1.0]]).sum(1, keepdims=True)
    np.testing.assert_allclose(grad, (soft - [[1, 0], [1, 0]]) / 2)


def test_cli_qat_end_to_end(tmp_path):
    from refquant.cli import main

    model, data = small_convnet()
    import onnx

    onnx.save(model, tmp_path / "net.onnx")
    np.save(tmp_path / "data.npy", data[:32])
    np.save(tmp_path / "labels.npy", np.arange(32) % 4)
    out = tmp_path / "out"
    code = main(["qat", str(tmp_path / "net.onnx"), "--data", str(tmp_path / "data.npy"), "--precision", "w4a8",
                 "--epochs", "2", "--lr", "1e-3", "--range-learning", "-o", str(out)])
    assert code == 0
    summary = json.loads((out / "qat.json").read_text())
    assert summary["steps"] == 4 and summary["range_learning"]
    encodings = json.loads((out / "net.encodings").read_text())
    assert {e["name"] for e in encodings["param_encodings"]} >= {"w1", "w2", "wf"}
    exported = refquant.load(out / "net_qdq.onnx")
    assert any(n.op_type == "QuantizeLinear" for n in exported.nodes)
    assert (out / "checkpoint" / "qat_checkpoint.npz").exists()
    code = main(["qat", str(tmp_path / "net.onnx"), "--data", str(tmp_path / "data.npy"), "--precision", "w4a8",
                 "--labels", str(tmp_path / "labels.npy"), "--epochs", "1", "-o", str(tmp_path / "out2")])
    assert code == 0 and json.loads((tmp_path / "out2" / "qat.json").read_text())["steps"] == 2
    assert main(["qat", str(tmp_path / "net.onnx"), "--data", str(tmp_path / "missing.npy"), "--epochs", "1",
                 "-o", str(tmp_path / "out3")]) == 2


def test_unknown_loss_and_uncalibrated_sim_are_user_errors():
    model, data = small_convnet()
    sim = refquant.QuantSim(refquant.load(model), precision="w8a8")
    with pytest.raises(refquant.RefquantError, match="compute_encodings"):
        refquant.qat(sim, data, progress=False)
    sim.compute_encodings(data, progress=False)
    with pytest.raises(refquant.RefquantError, match="loss"):
        refquant.qat(sim, data, loss="hinge", progress=False)
    with pytest.raises(refquant.RefquantError, match="needs labels"):
        refquant.qat(sim, data, loss="cross_entropy", progress=False)
    with pytest.raises(refquant.RefquantError, match="one-shot iterator"):
        refquant.qat(sim, iter([data[:16]]), progress=False)


def test_bn_training_mode_then_reestimation_and_folding():
    rng = np.random.default_rng(3)
    inits = {"W": rng.normal(size=(8, 3, 3, 3)) * 0.3, "gamma": rng.uniform(0.5, 1.5, 8),
             "beta": rng.normal(size=8) * 0.1, "mean": np.zeros(8), "var": np.ones(8),
             "wf": rng.normal(size=(4, 8)), "bf": np.zeros(4)}
    inits = {k: v.astype(np.float32) for k, v in inits.items()}
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["n"]),
             helper.make_node("Relu", ["n"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]), helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1)]
    graph = refquant.load(make_model(nodes, [("x", FLOAT, ["N", 3, 8, 8])], [("y", FLOAT, ["N", 4])], inits))
    data = rng.normal(size=(48, 3, 8, 8)).astype(np.float32)
    conv = Session(graph).run({"x": data}, outputs=["c"])["c"].astype(np.float64)
    # running statistics that describe the data, so the batch-statistics forward matches the FP32 model
    graph.initializers["mean"] = conv.mean(axis=(0, 2, 3)).astype(np.float32)
    graph.initializers["var"] = conv.var(axis=(0, 2, 3)).astype(np.float32)
    reference = Session(graph.copy())
    sim = refquant.QuantSim(graph, precision="w4a8", prepare=False)
    sim.compute_encodings(data, progress=False)
    sqnr0 = fp32_sqnr(sim, reference, data, 16)["y"]
    result = refquant.qat(sim, data, epochs=4, lr=1e-3, progress=False, bn_training=True)
    assert [n.op_type for n in sim.graph.nodes].count("BatchNormalization") == 1  # the sim keeps inference BN
    assert sim.graph.nodes[1].attrs.get("training_mode", 0) == 0
    assert "BatchNormalization" not in [n.op_type for n in result.folded_graph.nodes]
    # measured 16.5 -> 27.8 dB
    assert fp32_sqnr(sim, reference, data, 16)["y"] > sqnr0 + 3.0


def test_normalized_mse_weighs_each_output_by_its_teacher_variance():
    # hand-computed: output "a" (teacher [1, 3]: mean 2, variance 1), student [2, 3]: MSE 0.5, term 0.5;
    # output "b" (teacher [0.1, 0.3]: variance 0.01), student [0.1, 0.2]: MSE 0.005, term 0.005 / 0.01 = 0.5
    s = {"a": np.array([[2.0, 3.0]]), "b": np.array([[0.1, 0.2]])}
    t = {"a": np.array([[1.0, 3.0]]), "b": np.array([[0.1, 0.3]])}
    value, grads = mse_distill(s, t)
    assert value == pytest.approx(1.0, rel=1e-12)  # float64 rounding of 0.1-0.3 only
    # dL/ds = 2 (s - t) / (size var): a: 2 [1, 0] / (2 * 1) = [1, 0]; b: 2 [0, -0.1] / (2 * 0.01) = [0, -10]
    np.testing.assert_allclose(grads["a"], [[1.0, 0.0]], rtol=1e-12)
    np.testing.assert_allclose(grads["b"], [[0.0, -10.0]], rtol=1e-12, atol=1e-12)
    raw, _ = mse_distill(s, t, normalize=False)  # the raw sum: 0.5 + 0.005, "a" dominates
    assert raw == pytest.approx(0.505, rel=1e-12)
    # rescaling an output (units) changes nothing; a constant teacher output falls back to the raw MSE
    scaled, _ = mse_distill({"a": s["a"], "b": 1000 * s["b"]}, {"a": t["a"], "b": 1000 * t["b"]})
    assert scaled == pytest.approx(value, rel=1e-12)
    const, grad = mse_distill({"c": np.array([1.0, 2.0])}, {"c": np.array([2.0, 2.0])})
    assert const == pytest.approx(0.5) and np.allclose(grad["c"], [-1.0, 0.0])


def test_normalized_mse_gradient_matches_central_differences():
    rng = np.random.default_rng(3)
    t = {"p": rng.random((5, 2)), "box": rng.normal(size=(5, 4)) * 0.05}
    s = {k: v + rng.normal(size=v.shape) * 0.01 for k, v in t.items()}
    _, grads = mse_distill(s, t)
    # a quadratic: central differences are exact up to float64 cancellation (~1e-16 L / h)
    for name, index, numeric in _central_differences(mse_distill, s, t):
        assert numeric == pytest.approx(grads[name][index], rel=1e-6, abs=1e-8)


def _central_differences(loss, s, t, h=1e-6):
    """(tensor, index, (loss(s + h e) - loss(s - h e)) / 2h) for every element of every student tensor."""
    for name in s:
        for index in np.ndindex(s[name].shape):
            up = {k: v.copy() for k, v in s.items()}
            down = {k: v.copy() for k, v in s.items()}
            up[name][index] += h
            down[name][index] -= h
            yield name, index, (loss(up, t)[0] - loss(down, t)[0]) / (2 * h)


def test_qat_distill_options():
    sim, data, _ = calibrated()
    with pytest.raises(refquant.RefquantError, match="mse_raw"):
        refquant.qat(sim, data, distill="l1", progress=False)
    seen = []
    refquant.qat(sim, data[:16], distill="mse_raw", lr=1e-3, batch_size=16, progress=False,
                 callback=lambda info: seen.append(info["loss"]))
    reference = Session(calibrated()[0].graph.copy()).run({"x": data[:16]})
    fresh, _, _ = calibrated()
    assert seen[0] == pytest.approx(mse_distill(fresh.run({"x": data[:16]}), reference, normalize=False)[0], rel=1e-6)


def test_sqnr_loss_is_minus_the_summed_sqnr_in_db():
    # hand-computed: "a": teacher [1, 3] (power (1 + 9) / 2 = 5), student [2, 3] (MSE 0.5): 10 log10(0.1) = -10;
    # "b": teacher [0.1, 0.3] (power 0.05), student [0.1, 0.2] (MSE 0.005): -10 as well; total -20
    s = {"a": np.array([[2.0, 3.0]]), "b": np.array([[0.1, 0.2]])}
    t = {"a": np.array([[1.0, 3.0]]), "b": np.array([[0.1, 0.3]])}
    value, grads = sqnr_distill(s, t)
    assert value == pytest.approx(-20.0, rel=1e-12)
    # dL/ds = (10 / ln 10) 2 (s - t) / (size mse): a: c [2, 0]; b: c [0, -20]
    c = 10 / np.log(10)
    np.testing.assert_allclose(grads["a"], [[2 * c, 0.0]], rtol=1e-12)
    np.testing.assert_allclose(grads["b"], [[0.0, -20 * c]], rtol=1e-12, atol=1e-12)
    # central differences (not a quadratic: step 1e-6 leaves O(h^2) ~ 1e-12 relative curvature error)
    for name, index, numeric in _central_differences(sqnr_distill, s, t):
        assert numeric == pytest.approx(grads[name][index], rel=1e-6, abs=1e-6)
    # a student equal to the teacher: the floor (120 dB) and a zero gradient
    value, grads = sqnr_distill(t, t)
    assert value == pytest.approx(-240.0) and not np.any(grads["a"]) and not np.any(grads["b"])
