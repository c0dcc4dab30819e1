"""AutoQuant: a step is kept only when it raises the metric (ties dropped), the flow stops once the goal is
met, serial / thread / process executors give identical results, the reports and the export are written,
the reported score is the score of the exported model, and bad input is refused or reported."""
import inspect
import json
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

import refquant
from refquant.errors import RefquantError
from refquant.ptq import fold_batchnorms
from refquant.ptq.autoquant import AutoQuantError, autoquant
from refquant.quant import QuantSim
from refquant.quant.encodings_io import read_encodings

from .helpers import FLOAT, make_model, ort_run

SCRIPTED_STEPS = ("bn_fold", "quant_scheme", "cle", "adaround")
SHARED = Path(os.environ.get("REFQUANT_SHARED", "/work/shared"))
CONVNET = SHARED / "refs" / "aimet_samples" / "convnet"
needs_convnet = pytest.mark.skipif(not CONVNET.is_dir(), reason=f"AIMET convnet sample not found at {CONVNET}")


# ------------------------------------------------------------------------------------ models
def conv_bn_relu_conv(seed=0) -> onnx.ModelProto:
    """Conv -> BatchNormalization -> Relu -> Conv: BN folding and CLE both apply."""
    rng = np.random.default_rng(seed)
    inits = {"w1": rng.normal(size=(6, 3, 3, 3)).astype(np.float32), "b1": rng.normal(size=6).astype(np.float32),
             "g": rng.uniform(0.5, 2, 6).astype(np.float32), "beta": rng.normal(size=6).astype(np.float32),
             "mean": rng.normal(size=6).astype(np.float32), "var": rng.uniform(0.5, 2, 6).astype(np.float32),
             "w2": rng.normal(size=(4, 6, 1, 1)).astype(np.float32), "b2": rng.normal(size=4).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "g", "beta", "mean", "var"], ["bn"], name="bn"),
             helper.make_node("Relu", ["bn"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2", "b2"], ["y"], name="conv2")]
    return make_model(nodes, [("x", FLOAT, [None, 3, 8, 8])], [("y", FLOAT, [None, 4, 8, 8])], inits)


def single_conv() -> onnx.ModelProto:
    """One Conv: nothing to fold, no pair to equalize."""
    rng = np.random.default_rng(1)
    inits = {"w": rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    return make_model(nodes, [("x", FLOAT, [None, 3, 8, 8])], [("y", FLOAT, [None, 4, 8, 8])], inits)


def feeds(n=16, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 3, 8, 8)).astype(np.float32)


# ------------------------------------------------------------------------------------ a scripted metric
# A metric whose value for each candidate is fixed by hand, so the decisions AutoQuant must make are known
# in advance: BN folded +5; QuantScheme bonus per (weights, activations); AdaRound's fixed weights +0.5;
# CLE changes nothing the metric sees, so its candidate ties and must be dropped. FP32 scores 20.
SCHEME_BONUS = {("min_max", "min_max"): 0.0, ("min_max", "tf_enhanced"): 2.0, ("tf_enhanced", "tf_enhanced"): 1.0,
                ("min_max", "percentile"): 3.0, ("min_max", "mse"): -1.0, ("min_max", "entropy"): 3.0}


def scripted_metric(model) -> float:
    if not isinstance(model, QuantSim):
        return 20.0
    score = 10.0
    if not any(n.op_type == "BatchNormalization" for n in model.graph.nodes):
        score += 5.0
    score += SCHEME_BONUS[(model.param_scheme, model.quant_scheme)]
    if any(q.fixed_value is not None for q in model.quantizers.values()):
        score += 0.5
    return score


def test_kept_only_when_the_metric_improves():
    graph = refquant.load(conv_bn_relu_conv())
    result = autoquant(graph, feeds(), scripted_metric, target=100, steps=SCRIPTED_STEPS, adaround_iterations=5,
                       progress=False)
    by_step = {s.step: s for s in result.steps}
    # hand-computed from SCHEME_BONUS: baseline 10, BN fold 15, best scheme percentile (3; entropy ties
    # later in the candidate order and loses), CLE ties (dropped), AdaRound +0.5
    assert [(s.step, s.status, s.score) for s in result.steps] == [
        ("fp32", "reference", 20.0), ("baseline", "baseline", 10.0), ("bn_fold", "kept", 15.0),
        ("quant_scheme", "kept", 18.0), ("cle", "dropped", 18.0), ("adaround", "kept", 18.5)]
    assert [t[1] for t in by_step["quant_scheme"].trials] == [15.0, 17.0, 16.0, 18.0, 14.0, 18.0]
    assert result.score == 18.5 and not result.target_met
    assert result.applied == ["bn_fold", "quant_scheme", "adaround"]
    assert (result.sim.param_scheme, result.sim.quant_scheme) == ("min_max", "percentile")
    # the dropped CLE left the weights exactly as BN folding made them
    folded = fold_batchnorms(graph)
    for name in ("w1", "b1", "w2", "b2"):
        assert np.array_equal(result.graph.initializers[name], folded.initializers[name]), name
    # AdaRound was kept: every weight of the final sim has a fixed rounding
    assert all(result.sim.quantizers[w].fixed_value is not None for w in ("w1", "w2"))


def test_a_step_that_lowers_the_metric_is_dropped():
    def prefers_batchnorm(model):  # BN folding now costs 1 point: it must be dropped and the BN kept
        score = scripted_metric(model)
        return score - 6.0 if isinstance(model, QuantSim) and score >= 15 else score

    graph = refquant.load(conv_bn_relu_conv())
    result = autoquant(graph, feeds(), prefers_batchnorm, target=100, steps=("bn_fold",), progress=False)
    assert [(s.step, s.status, s.score, s.best) for s in result.steps[1:]] == [
        ("baseline", "baseline", 10.0, 10.0), ("bn_fold", "dropped", 9.0, 10.0)]
    assert any(n.op_type == "BatchNormalization" for n in result.graph.nodes)


def test_stops_as_soon_as_the_goal_is_met():
    graph = refquant.load(conv_bn_relu_conv())
    # goal = 20 - 5 = 15: reached by BN folding; nothing after it runs
    result = autoquant(graph, feeds(), scripted_metric, allowed_drop=5, steps=SCRIPTED_STEPS, progress=False)
    assert result.goal == 15.0 and result.target_met and result.score == 15.0
    assert [(s.step, s.status) for s in result.steps[2:]] == [
        ("bn_fold", "kept"), ("quant_scheme", "skipped"), ("cle", "skipped"), ("adaround", "skipped")]
    assert all(s.score is None and s.seconds == 0 for s in result.steps[3:])
    # met by the baseline already: no step is tried
    result = autoquant(graph, feeds(), scripted_metric, allowed_drop=10, steps=SCRIPTED_STEPS, progress=False)
    assert [s.status for s in result.steps[2:]] == ["skipped"] * 4 and result.applied == []


def test_not_applicable_steps_say_so_and_leave_the_model_unchanged():
    graph = refquant.load(single_conv())
    result = autoquant(graph, feeds(), "sqnr", target=200, steps=("bn_fold", "cle"), progress=False)
    by_step = {s.step: s for s in result.steps}
    assert by_step["bn_fold"].status == "not applicable" and "no BatchNormalization" in by_step["bn_fold"].note
    assert by_step["cle"].status == "not applicable" and "no pair" in by_step["cle"].note
    assert result.score == by_step["baseline"].score
    for name, array in graph.initializers.items():
        assert np.array_equal(result.graph.initializers[name], array)


def test_bad_input():
    graph = refquant.load(conv_bn_relu_conv())
    with pytest.raises(AutoQuantError, match="target"):  # SQNR of FP32 is +inf: a drop below it means nothing
        autoquant(graph, feeds(), "sqnr", allowed_drop=1, progress=False)
    with pytest.raises(AutoQuantError, match="allowed_drop"):
        autoquant(graph, feeds(), "top1", progress=False)
    with pytest.raises(AutoQuantError, match="allowed_drop"):
        autoquant(graph, feeds(), "top1", allowed_drop=-1, progress=False)
    with pytest.raises(AutoQuantError, match="'fold'"):
        autoquant(graph, feeds(), "top1", allowed_drop=1, steps=("fold",), progress=False)
    with pytest.raises(AutoQuantError, match="NaN"):
        autoquant(graph, feeds(), lambda model: float("nan"), allowed_drop=1, progress=False)
    with pytest.raises(RefquantError, match="scheme"):
        autoquant(graph, feeds(), "top1", allowed_drop=1, schemes=[("min_max", "nonsense")], progress=False)
    bad = feeds()
    bad[3, 0, 2, 2] = np.nan
    with pytest.raises(RefquantError, match="NaN or Inf"):
        autoquant(graph, bad, "top1", allowed_drop=0, eval_data=feeds(seed=1), progress=False)
    with pytest.raises(RefquantError):  # wrong shape: 4 channels for a 3-channel input
        autoquant(graph, np.zeros((4, 4, 8, 8), np.float32), "top1", allowed_drop=0, progress=False)


# ------------------------------------------------------------------------------------ a real model
def plain_sim(graph, **kwargs):
    """A QuantSim of ``graph`` as given (no preparation rewrite, as AutoQuant exports it)."""
    if "prepare" in inspect.signature(QuantSim.__init__).parameters:
        kwargs["prepare"] = False
    return QuantSim(graph, **kwargs)


def sqnr_db(ref, out):
    ref64 = ref.astype(np.float64)
    return 10 * np.log10(np.sum(ref64 ** 2) / np.sum((ref64 - out) ** 2))


@needs_convnet
def test_executors_give_identical_results_and_the_export_scores_what_was_reported(tmp_path):
    model = onnx.load(CONVNET / "model.onnx")  # BN not folded, so every step has something to do
    calib = np.load(CONVNET / "calib.npz")["input"]
    ev = np.load(CONVNET / "eval.npz")["input"][:64]
    kwargs = dict(target=60, eval_data=ev, precision="w4a8", config="per_tensor", adaround_iterations=20,
                  schemes=[("min_max", "min_max"), ("tf_enhanced", "tf_enhanced"), ("min_max", "percentile")],
                  progress=False)
    runs = {"serial": autoquant(refquant.load(model), calib, "sqnr", output_dir=tmp_path / "serial", **kwargs)}
    with ThreadPoolExecutor(2) as pool:
        runs["threads"] = autoquant(refquant.load(model), calib, "sqnr", executor=pool,
                                    output_dir=tmp_path / "threads", **kwargs)
    with ProcessPoolExecutor(2) as pool:
        runs["processes"] = autoquant(refquant.load(model), calib, "sqnr", executor=pool,
                                      output_dir=tmp_path / "processes", **kwargs)
    serial = runs["serial"]
    steps = [(s.step, s.status, s.score, [t[:2] for t in s.trials]) for s in serial.steps]
    encodings = read_encodings(tmp_path / "serial" / "model.encodings").encodings
    for name, run in runs.items():
        assert [(s.step, s.status, s.score, [t[:2] for t in s.trials]) for s in run.steps] == steps, name
        theirs = read_encodings(tmp_path / name / "model.encodings").encodings
        assert sorted(theirs) == sorted(encodings), name
        for tensor, encoding in encodings.items():
            assert np.array_equal(theirs[tensor].scale, encoding.scale), (name, tensor)
            assert np.array_equal(theirs[tensor].offset, encoding.offset), (name, tensor)

    # cle runs after bn_fold, and the folded BNs' statistics still feed its high-bias absorption (dw -> pw)
    assert "absorbed 1 high bias(es)" in next(s.note for s in serial.steps if s.step == "cle")

    # the decisions follow the scores: kept iff above the best so far, and the result is the best
    best = serial.steps[1].score
    for s in serial.steps[2:]:
        if s.status == "kept":
            assert s.score > best
            best = s.score
        elif s.status == "dropped":
            assert s.score <= best
        assert s.best == best
    assert serial.score == best == max(s.score for s in serial.steps[1:] if s.score is not None)
    assert best > serial.steps[1].score  # on this per-tensor W4A8 model something does help

    # the exported model + encodings, reloaded, against onnxruntime's FP32 outputs of the original model
    out = tmp_path / "serial"
    sim = plain_sim(refquant.load(out / "model.onnx"), precision="w4a8", config="per_tensor")
    sim.load_encodings(out / "model.encodings")
    ours = np.concatenate([sim.run({"input": ev[i:i + 16]})["logits"] for i in range(0, len(ev), 16)])
    reference = ort_run(model, {"input": ev})["logits"]
    # onnxruntime's FP32 logits differ from refquant's by ~1e-6 relative; the quantization noise is ~1e-1
    # relative (SQNR ~ 20 dB), so the SQNR moves by far less than 0.01 dB
    assert abs(sqnr_db(reference, ours) - serial.score) < 0.01

    # the reports
    report = json.loads((out / "autoquant.json").read_text())
    assert [s["step"] for s in report["steps"]] == [s.step for s in serial.steps]
    assert [s["score"] for s in report["steps"][1:]] == [s.score for s in serial.steps[1:]]
    assert report["score"] == serial.score and report["target_met"] is False and report["fp32_score"] == "inf"
    page = (out / "autoquant.html").read_text()
    for s in serial.steps:
        assert f"<td>{s.step}</td>" in page
    assert {"model", "encodings", "qdq", "json", "html"} <= set(serial.paths)
    assert all(Path(p).is_file() for p in serial.paths.values())


def test_adaround_tries_each_kind_of_layer_input_and_keeps_the_best():
    """Three AdaRound trials: the default layer inputs (the activation quantizers on for the output layers only),
    the quantized inputs everywhere, and QDrop's mix of the latter with the FP32 inputs; each trial's score is the
    SQNR of that AdaRound recomputed here, and the step's score is the best one. An explicit quantize_activations
    leaves one trial. Shrinkage off: on these N(0, 1)
    inputs its "auto" intensity is near 1, nearest rounding whatever the inputs, and the trials would not differ.
    AIMET's step, 1e-3: at 30 iterations the default "scaled" one (0.05) gives all three the same rounding here."""
    from refquant.ptq.adaround import adaround

    graph = refquant.load(conv_bn_relu_conv())
    x = feeds(32)
    result = autoquant(graph, x, "sqnr", target=1000, steps=("adaround",), adaround_iterations=30,
                       precision="w4a8", adaround_options={"shrinkage": 0, "learning_rate": 1e-3}, progress=False)
    step = next(s for s in result.steps if s.step == "adaround")
    reference = graph.copy()
    expected = {}
    for key, quantized, qdrop in (("adaround", "outputs", 0.0), ("adaround, quantized inputs", True, 0.0),
                                  ("adaround, qdrop", True, 0.5), ("inputs off", False, 0.0)):
        sim = QuantSim(reference.copy(), precision="w4a8", prepare=False)  # AutoQuant's prepare is a step
        sim.compute_encodings(x, progress=False)
        adaround(sim, x, num_iterations=30, quantize_activations=quantized, qdrop=qdrop, shrinkage=0,
                 learning_rate=1e-3, progress=False)
        sim.compute_encodings(x, progress=False)
        fp32 = refquant.Session(reference).run({"x": x})["y"]
        expected[key] = sqnr_db(fp32, sim.run({"x": x})["y"].astype(np.float64))
    off = expected.pop("inputs off")
    assert [t[0] for t in step.trials] == list(expected)
    for (key, score, _), want in zip(step.trials, expected.values()):
        assert score == pytest.approx(want, abs=1e-9), key
    assert len(set(expected.values())) == 3  # the three inputs do differ here
    assert step.score == max(expected.values())

    single = autoquant(graph, x, "sqnr", target=1000, steps=("adaround",), adaround_iterations=30, precision="w4a8",
                       adaround_options={"quantize_activations": False, "shrinkage": 0, "learning_rate": 1e-3},
                       progress=False)
    single_step = next(s for s in single.steps if s.step == "adaround")
    assert single_step.trials == [] and single_step.score == pytest.approx(off, abs=1e-9)


def test_adaround_with_lbfgs_has_no_qdrop_trial():
    """L-BFGS cannot take QDrop's random masks (adaround raises): AutoQuant leaves that trial out."""
    graph = refquant.load(conv_bn_relu_conv())
    x = feeds(32)
    result = autoquant(graph, x, "sqnr", target=1000, steps=("adaround",), adaround_iterations=10,
                       precision="w4a8", adaround_options={"optimizer": "lbfgs"}, progress=False)
    step = next(s for s in result.steps if s.step == "adaround")
    assert [t[0] for t in step.trials] == ["adaround", "adaround, quantized inputs"]
